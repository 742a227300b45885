//! Configuration: command-line flags, each with the original locker's environment variable as
//! fallback, checked once at start-up into [`Settings`]. Handlers only ever see `Settings`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

use crate::auth::Credentials;
use crate::timefmt::parse_duration;

/// A lock server for Concourse pipelines: HTTP locks with reentrancy counts, FIFO waiting,
/// leases and fencing tokens, kept in a crash-safe YAML state file.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "locker",
    version,
    disable_version_flag = true,
    after_help = "Client subcommands (see `locker SUBCOMMAND --help`): lock, locks, status, \
                  release, wait-free."
)]
pub struct Args {
    /// Print the version and exit.
    #[arg(short = 'v', short_alias = 'V', long = "version", action = ArgAction::Version)]
    version: Option<bool>,

    /// Path of the YAML state file; created holding no locks if missing.
    #[arg(long, env = "LOCKER_CONFIG", default_value = "locker.yml")]
    pub config: PathBuf,

    /// TCP port to listen on.
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,

    /// Address to listen on (all interfaces by default, like the original).
    #[arg(long, env = "LOCKER_LISTEN", default_value = "0.0.0.0")]
    pub listen: IpAddr,

    /// User name for HTTP basic auth; requires AUTH_PASS.
    #[arg(long, env = "AUTH_USER")]
    pub auth_user: Option<String>,

    /// Password for HTTP basic auth; requires AUTH_USER.
    #[arg(long, env = "AUTH_PASS", hide_env_values = true)]
    pub auth_pass: Option<String>,

    /// PEM certificate chain; with SSL_KEY, serve HTTPS.
    #[arg(long, env = "SSL_CERT")]
    pub ssl_cert: Option<PathBuf>,

    /// PEM private key for SSL_CERT.
    #[arg(long, env = "SSL_KEY")]
    pub ssl_key: Option<PathBuf>,

    /// Longest a waiting acquire is held open (e.g. 60s); longer waits are clamped.
    #[arg(long, env = "LOCKER_MAX_WAIT", default_value = "60s", value_parser = parse_duration)]
    pub max_wait: Duration,

    /// Most waiting acquires at once; beyond it, 503.
    #[arg(long, env = "LOCKER_MAX_WAITERS", default_value_t = 10_000)]
    pub max_waiters: usize,

    /// Lease applied to acquires that give no ttl (default: none, holds never expire).
    #[arg(long, env = "LOCKER_DEFAULT_TTL", value_parser = parse_duration)]
    pub default_ttl: Option<Duration>,
}

/// Checked configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub state_file: PathBuf,
    pub listen: SocketAddr,
    pub credentials: Option<Credentials>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub max_wait: Duration,
    pub max_waiters: usize,
    pub default_ttl: Option<Duration>,
}

/// Treats an empty value like an unset one: deployment tools often render unset options as "".
fn non_empty<T: AsRef<std::ffi::OsStr>>(value: Option<T>) -> Option<T> {
    value.filter(|v| !v.as_ref().is_empty())
}

impl Settings {
    /// Checks the combinations clap cannot: both auth values or neither, both TLS files or
    /// neither. The TLS files themselves are read by [`crate::tls`].
    pub fn from_args(args: Args) -> Result<Self, String> {
        let credentials = match (non_empty(args.auth_user), non_empty(args.auth_pass)) {
            (Some(user), Some(password)) => Some(Credentials::new(user, password)),
            (None, None) => None,
            (Some(_), None) => {
                return Err("AUTH_USER is set but AUTH_PASS is not: set both to require basic auth, or neither".into());
            }
            (None, Some(_)) => {
                return Err("AUTH_PASS is set but AUTH_USER is not: set both to require basic auth, or neither".into());
            }
        };
        let tls = match (non_empty(args.ssl_cert), non_empty(args.ssl_key)) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(cert), None) => {
                return Err(format!(
                    "SSL_CERT is set ({}) but SSL_KEY is not: set both to serve HTTPS, or neither",
                    cert.display()
                ));
            }
            (None, Some(key)) => {
                return Err(format!(
                    "SSL_KEY is set ({}) but SSL_CERT is not: set both to serve HTTPS, or neither",
                    key.display()
                ));
            }
        };
        if args.max_wait.is_zero() {
            return Err("LOCKER_MAX_WAIT must be longer than zero".into());
        }
        Ok(Settings {
            state_file: args.config,
            listen: SocketAddr::new(args.listen, args.port),
            credentials,
            tls,
            max_wait: args.max_wait,
            max_waiters: args.max_waiters,
            default_ttl: args.default_ttl.filter(|ttl| !ttl.is_zero()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let args = Args::try_parse_from(std::iter::once("locker").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Settings::from_args(args)
    }

    #[test]
    fn defaults_match_the_original() {
        let settings = parse(&[]).expect("defaults are valid");
        assert_eq!(settings.listen.to_string(), "0.0.0.0:3000");
        assert!(settings.credentials.is_none() && settings.tls.is_none());
        assert_eq!(settings.max_wait, Duration::from_secs(60));
        assert_eq!(settings.max_waiters, 10_000);
        assert_eq!(settings.default_ttl, None);
    }

    #[test]
    fn half_configured_auth_or_tls_is_refused() {
        let cases: [&[&str]; 4] = [
            &["--auth-user", "u"],
            &["--auth-pass", "p"],
            &["--ssl-cert", "c.pem"],
            &["--ssl-key", "k.pem"],
        ];
        for args in cases {
            let error = parse(args).expect_err("must be refused");
            assert!(error.contains("set both"), "{args:?}: {error}");
        }
        assert!(parse(&["--auth-user", "u", "--auth-pass", ""]).is_err());
        assert!(parse(&["--auth-user", "", "--auth-pass", ""]).is_ok());
    }

    #[test]
    fn durations_are_checked() {
        assert!(parse(&["--max-wait", "0"]).is_err());
        assert!(parse(&["--max-wait", "soon"]).is_err());
        let settings = parse(&["--max-wait", "5m", "--default-ttl", "1h"]).expect("valid");
        assert_eq!(settings.max_wait, Duration::from_secs(300));
        assert_eq!(settings.default_ttl, Some(Duration::from_secs(3600)));
    }
}
