//! Configuration: command-line flags, each with the original locker's environment variable as
//! fallback, checked once at start-up into [`Settings`]. Handlers only ever see `Settings`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

use crate::auth::Credentials;
use crate::reclaim::{ConcourseAuth, ReclaimSettings};
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

    /// Most distinct locks (held, or with someone waiting); an acquire of a new lock beyond it
    /// gets 503.
    #[arg(long, env = "LOCKER_MAX_LOCKS", default_value_t = 100_000)]
    pub max_locks: usize,

    /// Most distinct requestors sharing one holding (one key of one lock); a new requestor
    /// beyond it gets 409.
    #[arg(long, env = "LOCKER_MAX_REQUESTORS", default_value_t = 1_000)]
    pub max_requestors: usize,

    /// Time a client gets to send each request head: a connection's first from when it
    /// opened, later ones from their first byte. Slower clients get 408 and are disconnected.
    #[arg(long, env = "LOCKER_HEAD_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub head_timeout: Duration,

    /// Most client connections open at once (default 20000); more wait in the listen queue.
    /// Each needs up to two file descriptors: checked against RLIMIT_NOFILE at start-up.
    #[arg(long, env = "LOCKER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Size in bytes of the journal beside the state file (preallocated); 0 turns it off and
    /// every change rewrites the state file.
    #[arg(long, env = "LOCKER_JOURNAL_BYTES", default_value_t = crate::store::file::DEFAULT_JOURNAL_BYTES)]
    pub journal_bytes: u64,

    /// Bytes of history to keep (the file beside the state file, and in memory; default 16 MiB);
    /// 0 turns the history and live events off.
    #[arg(long, env = "LOCKER_HISTORY_BYTES", default_value_t = crate::history::DEFAULT_BYTES)]
    pub history_bytes: u64,

    /// Events kept per lock or pool (default 1000).
    #[arg(long, env = "LOCKER_HISTORY_PER_LOCK", default_value_t = crate::history::DEFAULT_PER_SUBJECT)]
    pub history_per_lock: usize,

    /// Lease applied to acquires that give no ttl (default: none, holds never expire).
    #[arg(long, env = "LOCKER_DEFAULT_TTL", value_parser = parse_duration)]
    pub default_ttl: Option<Duration>,

    /// Concourse URL whose API tells when a build ended, for holds acquired with
    /// release_when_build_ends (unset: such holds are kept until released).
    #[arg(long, env = "LOCKER_CONCOURSE_URL")]
    pub concourse_url: Option<String>,

    /// Bearer token for the Concourse API.
    #[arg(long, env = "LOCKER_CONCOURSE_TOKEN", hide_env_values = true)]
    pub concourse_token: Option<String>,

    /// Concourse local user for the Concourse API (with LOCKER_CONCOURSE_PASSWORD).
    #[arg(long, env = "LOCKER_CONCOURSE_USER")]
    pub concourse_user: Option<String>,

    /// Password of LOCKER_CONCOURSE_USER.
    #[arg(long, env = "LOCKER_CONCOURSE_PASSWORD", hide_env_values = true)]
    pub concourse_password: Option<String>,

    /// How often the builds of such holds are checked.
    #[arg(long, env = "LOCKER_RECLAIM_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub reclaim_interval: Duration,

    /// Longest the server waits at shutdown (SIGTERM) for requests in flight to finish before
    /// closing them; waiters are answered at once. A supervisor that kills after a deadline
    /// (bpm: 15 s) needs it shorter than that deadline.
    #[arg(long, env = "LOCKER_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Where the locks live: `file` (LOCKER_CONFIG) or `etcd` (shared by several servers).
    #[arg(long, env = "LOCKER_STORE", default_value = "file", value_enum)]
    pub store: StoreKind,

    /// etcd endpoints, comma-separated (e.g. http://10.0.0.1:2379,http://10.0.0.2:2379).
    #[arg(long, env = "LOCKER_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// Prefix of every key locker keeps in etcd.
    #[arg(long, env = "LOCKER_ETCD_PREFIX", default_value = "/locker/")]
    pub etcd_prefix: String,

    /// etcd user; requires LOCKER_ETCD_PASSWORD.
    #[arg(long, env = "LOCKER_ETCD_USER")]
    pub etcd_user: Option<String>,

    /// Password of LOCKER_ETCD_USER.
    #[arg(long, env = "LOCKER_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,

    /// PEM CA certificate that signed etcd's server certificates (turns on TLS to etcd).
    #[arg(long, env = "LOCKER_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,

    /// PEM client certificate for etcd; requires LOCKER_ETCD_KEY.
    #[arg(long, env = "LOCKER_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,

    /// PEM private key of LOCKER_ETCD_CERT.
    #[arg(long, env = "LOCKER_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,

    /// Most lock names (and, apart, pool names) with series of their own in the per-lock
    /// metrics (locker_hold_seconds, locker_wait_seconds, locker_hold_age_seconds): the first
    /// seen keep theirs until restart, the rest share the label value `_other`. 0: all share it.
    #[arg(long, env = "LOCKER_METRICS_MAX_LOCK_LABELS", default_value_t = crate::metrics::DEFAULT_MAX_LOCK_LABELS)]
    pub metrics_max_lock_labels: usize,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The lock store backends.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    File,
    Etcd,
}

/// Subcommands; without one, the binary serves.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Load a YAML state file (ours or the original locker's) into etcd (LOCKER_ETCD_*).
    Import {
        /// The state file to read.
        file: PathBuf,
        /// Overwrite locks already stored in etcd under the prefix.
        #[arg(long)]
        replace: bool,
    },
    /// Write etcd's locks (LOCKER_ETCD_*) to a YAML state file (`-` for standard output).
    Export {
        /// The state file to write (replaced atomically).
        file: PathBuf,
    },
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
    /// LOCKER_MAX_LOCKS and LOCKER_MAX_REQUESTORS.
    pub limits: crate::rules::Limits,
    /// Time each request head gets (LOCKER_HEAD_TIMEOUT).
    pub head_timeout: Duration,
    /// LOCKER_MAX_CONNECTIONS as given; `None`: the default, lowered to fit the descriptor limit.
    pub max_connections: Option<usize>,
    pub journal_bytes: u64,
    /// How much history to keep (LOCKER_HISTORY_BYTES, LOCKER_HISTORY_PER_LOCK).
    pub history: crate::history::Bounds,
    pub default_ttl: Option<Duration>,
    /// Reclaiming holds of ended builds, when a Concourse URL is configured.
    pub reclaim: Option<ReclaimSettings>,
    /// Set when the locks live in etcd (LOCKER_STORE=etcd).
    pub etcd: Option<EtcdConnection>,
    /// Longest shutdown waits for requests in flight (LOCKER_SHUTDOWN_GRACE).
    pub shutdown_grace: Duration,
    /// Lock (and pool) names with series of their own (LOCKER_METRICS_MAX_LOCK_LABELS).
    pub metrics_max_lock_labels: usize,
}

/// Parses the server's flags from `argv`, reading every environment variable that is set but
/// empty as unset (see [`ignore_empty_env`]). Like `Args::parse`, exits with clap's message on
/// a usage error, `--help` or `--version`.
pub fn parse_args(argv: Vec<std::ffi::OsString>) -> Args {
    use clap::{CommandFactory, FromArgMatches};
    let mut command = ignore_empty_env(Args::command());
    let parsed = command
        .try_get_matches_from_mut(argv)
        .and_then(|matches| Args::from_arg_matches(&matches));
    parsed.unwrap_or_else(|error| error.format(&mut command).exit())
}

/// Drops the environment fallback of every argument (of `command` and its subcommands) whose
/// variable is set to the empty string, so that the default applies as if it were unset.
/// BOSH templates and container environments render unset options as `NAME=`. The list of
/// variables is clap's own, so no variable can be forgotten.
pub fn ignore_empty_env(command: clap::Command) -> clap::Command {
    command
        .mut_args(|arg| {
            let empty = arg
                .get_env()
                .and_then(std::env::var_os)
                .is_some_and(|value| value.is_empty());
            if empty { arg.env(None::<&str>) } else { arg }
        })
        .mut_subcommands(ignore_empty_env)
}

/// The environment variable of every argument of `command` and its subcommands, from clap's
/// own definition (so a test that keeps them from leaking in misses none).
pub fn env_variables(command: &clap::Command) -> Vec<String> {
    let mut variables: Vec<String> = command
        .get_arguments()
        .filter_map(clap::Arg::get_env)
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    for subcommand in command.get_subcommands() {
        variables.extend(env_variables(subcommand));
    }
    variables
}

/// Treats an empty value like an unset one: deployment tools often render unset options as "".
fn non_empty<T: AsRef<std::ffi::OsStr>>(value: Option<T>) -> Option<T> {
    value.filter(|v| !v.as_ref().is_empty())
}

/// A configuration that cannot work, found at start-up: what is wrong, named by the
/// environment variable a deployment sets, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "AUTH_USER {0:?} contains ':', which basic auth cannot carry in a user name (it \
         separates user from password), so no client could log in: choose a user name without ':'"
    )]
    ColonInUser(String),
    /// One of a pair that goes together, e.g. AUTH_USER without AUTH_PASS.
    #[error("{set} is set but {unset} is not: set both to {purpose}, or neither")]
    HalfPair {
        set: &'static str,
        unset: &'static str,
        purpose: &'static str,
    },
    /// SSL_CERT without SSL_KEY, or the other way round; names the file that was given.
    #[error(
        "{set} is set ({}) but {unset} is not: set both to serve HTTPS, or neither",
        given.display()
    )]
    HalfTls {
        set: &'static str,
        unset: &'static str,
        given: PathBuf,
    },
    #[error("set LOCKER_CONCOURSE_TOKEN or LOCKER_CONCOURSE_USER/PASSWORD, not both")]
    TwoConcourseCredentials,
    #[error("{set} is set but {unset} is not")]
    Missing {
        set: &'static str,
        unset: &'static str,
    },
    #[error("Concourse credentials are set but LOCKER_CONCOURSE_URL is not")]
    CredentialsWithoutUrl,
    #[error("LOCKER_CONCOURSE_URL must be an http(s) URL, not {0:?}")]
    NotHttpUrl(String),
    #[error("{0} must be longer than zero")]
    ZeroDuration(&'static str),
    #[error("{0} must be at least 1")]
    ZeroCount(&'static str),
    #[error("{0} must not be empty")]
    Empty(&'static str),
    #[error("LOCKER_STORE=etcd needs LOCKER_ETCD_ENDPOINTS (comma-separated etcd URLs)")]
    NoEtcdEndpoints,
    /// Two settings of which one alone is useless, e.g. LOCKER_ETCD_USER and _PASSWORD.
    #[error("{0} and {1} go together: set both, or neither")]
    Together(&'static str, &'static str),
    /// `LOCKER_STORE=etcd`, `locker import` or `export` in a build without the etcd backend.
    #[error(
        "{0} needs the etcd backend, and this locker was built without it: build it with \
         `cargo build --release --features etcd` (needs protoc; see README \"Building with the \
         etcd backend\")"
    )]
    NoEtcdBackend(&'static str),
}

impl Settings {
    /// Checks the combinations clap cannot: both auth values or neither, both TLS files or
    /// neither. The TLS files themselves are read by [`crate::tls`].
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let etcd = match args.store {
            StoreKind::Etcd => {
                require_etcd_backend("LOCKER_STORE=etcd")?;
                Some(etcd_connection(&args)?)
            }
            StoreKind::File => None,
        };
        let credentials = match (non_empty(args.auth_user), non_empty(args.auth_pass)) {
            (Some(user), Some(_)) if user.contains(':') => {
                return Err(ConfigError::ColonInUser(user));
            }
            (Some(user), Some(password)) => Some(Credentials::new(user, password)),
            (None, None) => None,
            (Some(_), None) => return Err(half_auth("AUTH_USER", "AUTH_PASS")),
            (None, Some(_)) => return Err(half_auth("AUTH_PASS", "AUTH_USER")),
        };
        let tls = match (non_empty(args.ssl_cert), non_empty(args.ssl_key)) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(cert), None) => {
                return Err(ConfigError::HalfTls {
                    set: "SSL_CERT",
                    unset: "SSL_KEY",
                    given: cert,
                });
            }
            (None, Some(key)) => {
                return Err(ConfigError::HalfTls {
                    set: "SSL_KEY",
                    unset: "SSL_CERT",
                    given: key,
                });
            }
        };
        let reclaim = reclaim_settings(
            non_empty(args.concourse_url),
            non_empty(args.concourse_token),
            non_empty(args.concourse_user),
            non_empty(args.concourse_password),
            args.reclaim_interval,
        )?;
        if args.head_timeout.is_zero() {
            return Err(ConfigError::ZeroDuration("LOCKER_HEAD_TIMEOUT"));
        }
        if args.max_connections == Some(0) {
            return Err(ConfigError::ZeroCount("LOCKER_MAX_CONNECTIONS"));
        }
        if args.max_locks == 0 {
            return Err(ConfigError::ZeroCount("LOCKER_MAX_LOCKS"));
        }
        if args.max_requestors == 0 {
            return Err(ConfigError::ZeroCount("LOCKER_MAX_REQUESTORS"));
        }
        if args.max_wait.is_zero() {
            return Err(ConfigError::ZeroDuration("LOCKER_MAX_WAIT"));
        }
        Ok(Settings {
            state_file: args.config,
            listen: SocketAddr::new(args.listen, args.port),
            credentials,
            tls,
            max_wait: args.max_wait,
            max_waiters: args.max_waiters,
            limits: crate::rules::Limits {
                locks: args.max_locks,
                requestors: args.max_requestors,
            },
            head_timeout: args.head_timeout,
            max_connections: args.max_connections,
            journal_bytes: args.journal_bytes,
            history: crate::history::Bounds {
                bytes: args.history_bytes,
                per_subject: args.history_per_lock,
            },
            default_ttl: args.default_ttl.filter(|ttl| !ttl.is_zero()),
            reclaim,
            etcd,
            shutdown_grace: args.shutdown_grace,
            metrics_max_lock_labels: args.metrics_max_lock_labels,
        })
    }
}

fn half_auth(set: &'static str, unset: &'static str) -> ConfigError {
    ConfigError::HalfPair {
        set,
        unset,
        purpose: "require basic auth",
    }
}

fn reclaim_settings(
    url: Option<String>,
    token: Option<String>,
    user: Option<String>,
    password: Option<String>,
    interval: Duration,
) -> Result<Option<ReclaimSettings>, ConfigError> {
    let auth = match (token, user, password) {
        (Some(_), Some(_), _) => return Err(ConfigError::TwoConcourseCredentials),
        (Some(token), None, _) => ConcourseAuth::Token(token),
        (None, Some(user), Some(password)) => ConcourseAuth::LocalUser { user, password },
        (None, Some(_), None) => {
            return Err(ConfigError::Missing {
                set: "LOCKER_CONCOURSE_USER",
                unset: "LOCKER_CONCOURSE_PASSWORD",
            });
        }
        (None, None, Some(_)) => {
            return Err(ConfigError::Missing {
                set: "LOCKER_CONCOURSE_PASSWORD",
                unset: "LOCKER_CONCOURSE_USER",
            });
        }
        (None, None, None) => ConcourseAuth::None,
    };
    let Some(url) = url else {
        return match auth {
            ConcourseAuth::None => Ok(None),
            _ => Err(ConfigError::CredentialsWithoutUrl),
        };
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ConfigError::NotHttpUrl(url));
    }
    if interval.is_zero() {
        return Err(ConfigError::ZeroDuration("LOCKER_RECLAIM_INTERVAL"));
    }
    Ok(Some(ReclaimSettings {
        concourse_url: url,
        auth,
        interval,
    }))
}

/// How to reach etcd (LOCKER_ETCD_*). Plain data, known in every build so that the flags parse
/// the same with or without the `etcd` feature; only the etcd backend (`store::etcd`) uses it.
#[derive(Clone, Debug, Default)]
pub struct EtcdConnection {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub user: Option<(String, String)>,
    pub ca: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Whether this binary was built with the etcd backend (the `etcd` cargo feature).
pub const HAS_ETCD_BACKEND: bool = cfg!(feature = "etcd");

/// Refuses `what` (`LOCKER_STORE=etcd`, `locker import`, ...) in a build without the etcd
/// backend.
pub fn require_etcd_backend(what: &'static str) -> Result<(), ConfigError> {
    if HAS_ETCD_BACKEND {
        Ok(())
    } else {
        Err(ConfigError::NoEtcdBackend(what))
    }
}

/// The etcd settings, checked: endpoints given, user and password together, cert and key
/// together.
pub fn etcd_connection(args: &Args) -> Result<EtcdConnection, ConfigError> {
    let endpoints: Vec<String> = args
        .etcd_endpoints
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Err(ConfigError::NoEtcdEndpoints);
    }
    if args.etcd_prefix.is_empty() {
        return Err(ConfigError::Empty("LOCKER_ETCD_PREFIX"));
    }
    let user = match (
        non_empty(args.etcd_user.clone()),
        non_empty(args.etcd_password.clone()),
    ) {
        (Some(user), Some(password)) => Some((user, password)),
        (None, None) => None,
        _ => {
            return Err(ConfigError::Together(
                "LOCKER_ETCD_USER",
                "LOCKER_ETCD_PASSWORD",
            ));
        }
    };
    let client_cert = match (
        non_empty(args.etcd_cert.clone()),
        non_empty(args.etcd_key.clone()),
    ) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err(ConfigError::Together("LOCKER_ETCD_CERT", "LOCKER_ETCD_KEY")),
    };
    Ok(EtcdConnection {
        endpoints,
        prefix: args.etcd_prefix.clone(),
        user,
        ca: non_empty(args.etcd_ca.clone()),
        client_cert,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings, or the error's text (a usage error's is clap's).
    fn parse(args: &[&str]) -> Result<Settings, String> {
        let args = Args::try_parse_from(std::iter::once("locker").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Settings::from_args(args).map_err(|e| e.to_string())
    }

    fn refusal(args: &[&str]) -> ConfigError {
        let args = Args::try_parse_from(std::iter::once("locker").chain(args.iter().copied()))
            .expect("flags parse");
        Settings::from_args(args).expect_err("refused")
    }

    #[test]
    fn defaults_match_the_original() {
        let settings = parse(&[]).expect("defaults are valid");
        assert_eq!(settings.listen.to_string(), "0.0.0.0:3000");
        assert!(settings.credentials.is_none() && settings.tls.is_none());
        assert_eq!(settings.max_wait, Duration::from_secs(60));
        assert_eq!(settings.max_waiters, 10_000);
        assert_eq!(settings.default_ttl, None);
        assert_eq!(settings.shutdown_grace, Duration::from_secs(30));
        assert_eq!(settings.metrics_max_lock_labels, 100);
    }

    #[test]
    fn the_cap_on_metric_labels_is_a_flag() {
        let settings = parse(&["--metrics-max-lock-labels", "7"]).expect("valid");
        assert_eq!(settings.metrics_max_lock_labels, 7);
        let none = parse(&["--metrics-max-lock-labels", "0"]).expect("0: every name shares _other");
        assert_eq!(none.metrics_max_lock_labels, 0);
        assert!(parse(&["--metrics-max-lock-labels", "-1"]).is_err());
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
            let error = refusal(args);
            assert!(
                matches!(
                    error,
                    ConfigError::HalfPair { .. } | ConfigError::HalfTls { .. }
                ),
                "{args:?}: {error:?}"
            );
            assert!(error.to_string().contains("set both"), "{error}");
        }
        assert!(parse(&["--auth-user", "u", "--auth-pass", ""]).is_err());
        assert!(parse(&["--auth-user", "", "--auth-pass", ""]).is_ok());
    }

    #[test]
    fn a_user_name_with_a_colon_is_refused() {
        let error = refusal(&["--auth-user", "ci:bot", "--auth-pass", "p"]);
        assert_eq!(error, ConfigError::ColonInUser("ci:bot".into()));
        let error = error.to_string();
        assert!(
            error.contains("AUTH_USER") && error.contains("':'"),
            "{error}"
        );
        assert!(parse(&["--auth-user", "ci-bot", "--auth-pass", "p:q"]).is_ok());
    }

    #[test]
    fn reclaiming_needs_a_url_and_at_most_one_kind_of_credentials() {
        assert!(parse(&[]).expect("valid").reclaim.is_none());
        let on =
            parse(&["--concourse-url", "https://ci", "--concourse-token", "t"]).expect("valid");
        assert!(on.reclaim.is_some());
        let refused: [(&[&str], ConfigError); 4] = [
            (
                &["--concourse-token", "t"],
                ConfigError::CredentialsWithoutUrl,
            ),
            (
                &["--concourse-url", "ci.example.com"],
                ConfigError::NotHttpUrl("ci.example.com".into()),
            ),
            (
                &["--concourse-url", "https://ci", "--concourse-user", "u"],
                ConfigError::Missing {
                    set: "LOCKER_CONCOURSE_USER",
                    unset: "LOCKER_CONCOURSE_PASSWORD",
                },
            ),
            (
                &[
                    "--concourse-url",
                    "https://ci",
                    "--concourse-token",
                    "t",
                    "--concourse-user",
                    "u",
                    "--concourse-password",
                    "p",
                ],
                ConfigError::TwoConcourseCredentials,
            ),
        ];
        for (args, expected) in refused {
            assert_eq!(refusal(args), expected, "{args:?}");
        }
    }

    #[test]
    #[cfg(not(feature = "etcd"))]
    fn etcd_store_is_refused_without_the_feature() {
        let error = refusal(&["--store", "etcd", "--etcd-endpoints", "e:2379"]);
        assert_eq!(error, ConfigError::NoEtcdBackend("LOCKER_STORE=etcd"));
        let error = error.to_string();
        assert!(
            error.contains("built without") && error.contains("--features etcd"),
            "{error}"
        );
    }

    #[test]
    #[cfg(feature = "etcd")]
    fn etcd_settings_are_checked() {
        assert!(parse(&[]).expect("defaults").etcd.is_none());
        let error = refusal(&["--store", "etcd"]);
        assert_eq!(error, ConfigError::NoEtcdEndpoints);
        assert!(
            error.to_string().contains("LOCKER_ETCD_ENDPOINTS"),
            "{error}"
        );
        let settings = parse(&[
            "--store",
            "etcd",
            "--etcd-endpoints",
            "http://127.0.0.1:2379, http://127.0.0.1:22379",
        ])
        .expect("valid");
        let etcd = settings.etcd.expect("etcd settings");
        assert_eq!(etcd.endpoints.len(), 2);
        assert_eq!(etcd.prefix, "/locker/");
        let half = ["--store", "etcd", "--etcd-endpoints", "e:2379"];
        for extra in [["--etcd-user", "u"], ["--etcd-cert", "c.pem"]] {
            let args: Vec<&str> = half.iter().chain(extra.iter()).copied().collect();
            let error = refusal(&args);
            assert!(matches!(error, ConfigError::Together(..)), "{error:?}");
            assert!(error.to_string().contains("go together"), "{error}");
        }
    }

    #[test]
    fn durations_are_checked() {
        assert!(parse(&["--max-wait", "0"]).is_err());
        assert!(parse(&["--max-wait", "soon"]).is_err());
        let settings = parse(&["--max-wait", "5m", "--default-ttl", "1h"]).expect("valid");
        assert_eq!(settings.max_wait, Duration::from_secs(300));
        assert_eq!(settings.default_ttl, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn the_shutdown_grace_is_a_duration_and_may_be_zero() {
        let settings = parse(&["--shutdown-grace", "10s"]).expect("valid");
        assert_eq!(settings.shutdown_grace, Duration::from_secs(10));
        let settings = parse(&["--shutdown-grace", "0"]).expect("valid");
        assert_eq!(settings.shutdown_grace, Duration::ZERO);
        assert!(parse(&["--shutdown-grace", "soon"]).is_err());
    }

    #[test]
    fn the_head_timeout_and_connection_cap_must_be_positive() {
        let settings = parse(&[]).expect("defaults are valid");
        assert_eq!(settings.head_timeout, Duration::from_secs(5));
        assert_eq!(settings.max_connections, None);
        let settings = parse(&["--head-timeout", "1s", "--max-connections", "64"]).expect("valid");
        assert_eq!(settings.head_timeout, Duration::from_secs(1));
        assert_eq!(settings.max_connections, Some(64));
        assert_eq!(
            refusal(&["--head-timeout", "0"]),
            ConfigError::ZeroDuration("LOCKER_HEAD_TIMEOUT")
        );
        assert_eq!(
            refusal(&["--max-connections", "0"]).to_string(),
            "LOCKER_MAX_CONNECTIONS must be at least 1"
        );
    }
}
