//! `locker` as a client of a locker server: `locker lock NAME -- CMD...` runs a command while
//! holding a lock, `locks`, `status`, `release`, `wait-free` read and change locks from a
//! shell, and `locker pool ...` does the same for pools (docs/pools.md), down to importing a
//! pool-resource git repository. `main.rs` sends here when the first argument is one of these
//! subcommands; with none, `locker` is the server, as before.
//!
//! - [`http`]: the connection (URL, basic auth, CA certificate) and the API calls, with each
//!   failure mapped to its exit code.
//! - [`hold`]: waiting for a lock or a pool's item, running a command while holding it,
//!   renewing, forwarding signals, giving it back: shared by `lock` and `pool acquire`.
//! - [`lock`]: `locker lock`.
//! - [`history`]: `locker history` and `locker watch`: a lock's last events, every event
//!   after an id, and events as they happen (docs/history.md).
//! - [`pool`]: `locker pool list|acquire|release|add|remove|update`.
//! - [`pool_import`]: `locker pool import DIR`: a pool-resource repository into the server.
//! - [`show`]: the human-readable tables.

/// Writes a line to standard output; a closed pipe ends the command quietly (see
/// [`stdout_failure`]).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::cli::stdout_failure)
    }};
}

mod history;
mod hold;
mod http;
mod lock;
mod pool;
mod pool_import;
mod show;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use locker_client::events::Filter;

use crate::timefmt::parse_duration;

pub use http::Connection;

/// The subcommands that make `locker` a client rather than the server.
pub const SUBCOMMANDS: [&str; 8] = [
    "lock",
    "locks",
    "status",
    "release",
    "wait-free",
    "pool",
    "history",
    "watch",
];

/// Where the user and the password come from when no flag gives them, in order.
const USER_VARIABLES: [&str; 2] = ["LOCKER_USER", "AUTH_USER"];
const PASSWORD_VARIABLES: [&str; 2] = ["LOCKER_PASSWORD", "AUTH_PASS"];

/// The environment variables of the client's settings: its flags' (clap's own list) and the
/// credentials'. (`USER`, recorded in a hold's info, is the system's, not a setting.)
pub fn variables() -> Vec<String> {
    let mut variables = crate::config::env_variables(&<Cli as clap::CommandFactory>::command());
    variables.extend(
        USER_VARIABLES
            .iter()
            .chain(&PASSWORD_VARIABLES)
            .map(|name| name.to_string()),
    );
    variables
}

/// Exit codes of the client subcommands (besides a command's own status, which `locker lock`
/// passes through).
pub mod exit {
    /// Bad usage or local configuration (clap's code for usage errors).
    pub const USAGE: u8 = 2;
    /// The lock is held (and no waiting was asked for, or the wait ran out); for `wait-free`,
    /// still held when the wait ran out; for `pool acquire`, the item (every item) is claimed;
    /// for `pool update`, the item is still claimed.
    pub const HELD: u8 = 73;
    /// `locker lock`: the lock was lost while the command ran (renewal refused, or the TTL ran
    /// out while the server was unreachable); the command was signalled.
    pub const LOST: u8 = 74;
    /// The server cannot be reached (connection refused, timeout, TLS failure).
    pub const UNREACHABLE: u8 = 75;
    /// The server refused the request (bad request, wrong key, slot count mismatch, no such
    /// pool or item, an item that exists otherwise, 5xx); `pool import`: an item on the server
    /// differs from the repository's, or could not be imported.
    pub const REFUSED: u8 = 76;
    /// The server refused the credentials (401).
    pub const AUTH: u8 = 77;
    /// Standard output is a pipe nobody reads any more (`locker locks | head -1`): the command
    /// stops quietly with 128 + SIGPIPE, the status a shell shows for `cat` or `grep` killed
    /// by SIGPIPE, so that `set -o pipefail` treats locker like them.
    pub const CLOSED_PIPE: u8 = 141;
    /// `locker lock`: the command could not be run (not executable).
    pub const CANNOT_RUN: u8 = 126;
    /// `locker lock`: the command was not found.
    pub const NOT_FOUND: u8 = 127;
}

const EXIT_CODES: &str = "\
Exit codes:
  0    success (locker lock: the command's own status is passed through,
       128+N when it was killed by signal N)
  2    bad usage or configuration
  73   lock held: no wait asked for, or the wait ran out (wait-free: still held)
  74   lock lost while the command ran; the command was sent SIGTERM (then SIGKILL)
  75   server unreachable (connection, timeout, TLS)
  76   server refused the request (bad request, wrong key, slots mismatch, 5xx)
  77   server refused the credentials (401)
  126  command could not be run;  127  command not found
  141  standard output was closed by its reader (`locker locks | head -1`)

Connection: --url/LOCKER_URL (default http://127.0.0.1:3000),
--user/LOCKER_USER (or AUTH_USER), --password/LOCKER_PASSWORD (or AUTH_PASS),
--ca-cert/LOCKER_CA_CERT (PEM file of the CA that signed the server's certificate).";

/// A failure: a one-line message and the exit code it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// The failure for a write to standard output that failed: a closed pipe ends the command
/// quietly (no message) with [`exit::CLOSED_PIPE`]; anything else says what happened.
pub fn stdout_failure(error: std::io::Error) -> Failure {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        Failure::new(exit::CLOSED_PIPE, "")
    } else {
        Failure::new(1, format!("cannot write to standard output: {error}"))
    }
}

/// Client of a locker server: run a command under a lock, list, show, release and wait for
/// locks; the same for pools' items (`locker pool`). `locker` without a subcommand starts the
/// server.
#[derive(Parser, Debug)]
#[command(name = "locker", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: Command,
}

/// How to reach the server; flags override the environment.
#[derive(Args, Debug, Clone)]
pub struct ConnectionArgs {
    /// URL of the locker server.
    #[arg(
        long,
        global = true,
        env = "LOCKER_URL",
        default_value = "http://127.0.0.1:3000"
    )]
    pub url: String,
    /// User for HTTP basic auth [env: LOCKER_USER, or AUTH_USER].
    #[arg(long, global = true)]
    pub user: Option<String>,
    /// Password for HTTP basic auth [env: LOCKER_PASSWORD, or AUTH_PASS].
    #[arg(long, global = true)]
    pub password: Option<String>,
    /// PEM file with the CA certificate(s) to trust for an https:// URL, besides the system's.
    #[arg(long, global = true, env = "LOCKER_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Deadline of one request (on top of any wait it asks the server for).
    #[arg(long, global = true, default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
}

impl ConnectionArgs {
    /// User and password: flags, else `LOCKER_USER`/`LOCKER_PASSWORD`, else the server's
    /// `AUTH_USER`/`AUTH_PASS`.
    fn credentials(&self) -> Result<Option<(String, String)>, Failure> {
        let env = |names: [&str; 2]| {
            names
                .iter()
                .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
        };
        let user = self
            .user
            .clone()
            .filter(|v| !v.is_empty())
            .or_else(|| env(USER_VARIABLES));
        let password = self
            .password
            .clone()
            .filter(|v| !v.is_empty())
            .or_else(|| env(PASSWORD_VARIABLES));
        match (user, password) {
            (Some(user), Some(password)) => Ok(Some((user, password))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(Failure::new(
                exit::USAGE,
                "a user is set (--user, LOCKER_USER or AUTH_USER) but no password \
                 (--password, LOCKER_PASSWORD or AUTH_PASS)",
            )),
            (None, Some(_)) => Err(Failure::new(
                exit::USAGE,
                "a password is set but no user (--user, LOCKER_USER or AUTH_USER)",
            )),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Wait for a lock, run a command while holding it, release it when the command exits.
    ///
    /// Waits (long-polling, in arrival order) for the lock, runs CMD while holding it and
    /// renews the lease (--ttl) in the background at a third of its length. When CMD exits the
    /// lock is released and locker exits with CMD's status. If the lock is lost (renewal
    /// refused, or the lease ran out while the server was unreachable), CMD gets SIGTERM, then
    /// SIGKILL after --grace, and locker exits 74. SIGINT, SIGTERM and SIGHUP sent to locker
    /// are forwarded to CMD; the lock is released once CMD has exited. CMD sees
    /// LOCKER_LOCK_NAME, LOCKER_LOCK_KEY, LOCKER_LOCK_REQUESTOR and LOCKER_LOCK_GENERATION
    /// (the fencing token) in its environment.
    #[command(after_help = EXIT_CODES)]
    Lock(LockArgs),
    /// List the locks the server knows (held, or with waiters).
    #[command(after_help = EXIT_CODES)]
    Locks {
        /// Print the server's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one lock: holder, generation, lease, waiters, holder info.
    #[command(after_help = EXIT_CODES)]
    Status {
        name: String,
        /// Print JSON (`{"name", "free": true}` when free).
        #[arg(long)]
        json: bool,
    },
    /// Release a lock held under KEY (the requestor's whole count), or any holder with --force.
    #[command(after_help = EXIT_CODES)]
    Release {
        name: String,
        /// The key the lock is held under.
        #[arg(long, required_unless_present = "force")]
        key: Option<String>,
        /// The requestor to release (default: the key, as on the server).
        #[arg(long)]
        requestor: Option<String>,
        /// Release the lock whoever holds it.
        #[arg(long)]
        force: bool,
        /// Print the server's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Wait until a lock is free, taking nothing; exits 0 when free, 73 if still held when
    /// --wait runs out.
    #[command(name = "wait-free", after_help = EXIT_CODES)]
    WaitFree {
        name: String,
        /// Longest to wait (e.g. 10m; 0 only checks; default: no limit).
        #[arg(long, value_parser = parse_wait)]
        wait: Option<WaitLimit>,
        /// Print the lock's last status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pools of items with metadata (pool-resource's model): list, acquire, release, add,
    /// remove, update, import.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// A lock's last events (who held it under which key, for how long, for which build), or
    /// with --all every event after --since, oldest first.
    #[command(after_help = EXIT_CODES)]
    History(HistoryArgs),
    /// Print events as they happen, one line each, until interrupted; rides out a dropped
    /// connection without losing or repeating an event.
    #[command(after_help = EXIT_CODES)]
    Watch {
        /// Only this lock's events (default: every lock's and pool's).
        name: Option<String>,
        /// Only this pool's events.
        #[arg(long, conflicts_with = "name")]
        pool: Option<String>,
        /// First print the kept events after this id, then the live ones.
        #[arg(long)]
        since: Option<u64>,
        /// Print each event as one JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// The lock whose last events to show.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub name: Option<String>,
    /// Every lock's and pool's events after --since, a page at a time.
    #[arg(long)]
    pub all: bool,
    /// With --all: only the events after this id (default: from the oldest kept).
    #[arg(long, conflicts_with = "name")]
    pub since: Option<u64>,
    /// How many events: a lock's last N (default 50), or with --all the first N after
    /// --since (default 1000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// Print each event as one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

const POOL_EXIT_CODES: &str = "\
Exit codes:
  0    success (pool acquire -- CMD: the command's own status is passed through,
       128+N when it was killed by signal N)
  2    bad usage or configuration
  73   pool acquire: the item (every item) is claimed and no wait was asked for, or
       the wait ran out; pool update: the item is still claimed
  74   pool acquire -- CMD: the item was lost while the command ran
  75   server unreachable (connection, timeout, TLS)
  76   server refused the request (no such pool or item, wrong key, an item that
       exists otherwise, bad request, 5xx); pool import: an item differs or failed
  77   server refused the credentials (401)
  126  command could not be run;  127  command not found
  141  standard output was closed by its reader

Connection: --url/LOCKER_URL (default http://127.0.0.1:3000),
--user/LOCKER_USER (or AUTH_USER), --password/LOCKER_PASSWORD (or AUTH_PASS),
--ca-cert/LOCKER_CA_CERT (PEM file of the CA that signed the server's certificate).";

#[derive(Subcommand, Debug)]
pub enum PoolCommand {
    /// List the pools (items, claimed, waiting claims), or one pool's items with their state
    /// and holder.
    #[command(after_help = POOL_EXIT_CODES)]
    List {
        /// The pool whose items to list (default: every pool, in one line each).
        pool: Option<String>,
        /// Print the server's JSON (with each item's metadata) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Claim an item of a pool (any free one, or --item), waiting in arrival order; with
    /// `-- CMD`, run CMD while holding it and release it when CMD exits.
    ///
    /// Without CMD, prints the item's name on stdout and keeps the claim (no lease unless
    /// --ttl: release it with `locker pool release`). With CMD, the claim's lease is renewed
    /// while CMD runs; CMD finds the item in LOCKER_POOL, LOCKER_POOL_ITEM,
    /// LOCKER_POOL_METADATA (the metadata text), LOCKER_POOL_METADATA_FILE (a file holding
    /// it), LOCKER_POOL_KEY, LOCKER_POOL_REQUESTOR and LOCKER_POOL_GENERATION; signals are
    /// forwarded and a lost claim ends CMD as `locker lock` does.
    #[command(after_help = POOL_EXIT_CODES)]
    Acquire(PoolAcquireArgs),
    /// Release a claimed item held under KEY (the requestor's part), or whoever holds it with
    /// --force (what pool-resource's `release` does).
    #[command(after_help = POOL_EXIT_CODES)]
    Release {
        pool: String,
        item: String,
        /// The key the item is claimed under.
        #[arg(long, required_unless_present = "force")]
        key: Option<String>,
        /// The requestor to release (default: the key's whole claim).
        #[arg(long, requires = "key")]
        requestor: Option<String>,
        /// Release the item whoever holds it.
        #[arg(long, conflicts_with = "key")]
        force: bool,
        /// Print the server's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Add an item (unclaimed, or claimed with --claimed); adding it again the same way
    /// changes nothing.
    #[command(after_help = POOL_EXIT_CODES)]
    Add {
        pool: String,
        item: String,
        #[command(flatten)]
        metadata: MetadataArgs,
        /// Add the item claimed (pool-resource's `add_claimed`), under --key.
        #[arg(long)]
        claimed: bool,
        /// Key of the claim (default: unique to this invocation; printed).
        #[arg(long, requires = "claimed")]
        key: Option<String>,
        /// Print the server's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Remove an item, claimed or not (with --key: only if unclaimed or claimed under it).
    #[command(after_help = POOL_EXIT_CODES)]
    Remove {
        pool: String,
        item: String,
        /// Remove only if unclaimed or claimed under this key.
        #[arg(long)]
        key: Option<String>,
        /// Print the server's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Replace an item's metadata, adding the item if absent; waits while it is claimed.
    #[command(after_help = POOL_EXIT_CODES)]
    Update {
        pool: String,
        item: String,
        #[command(flatten)]
        metadata: MetadataArgs,
        /// Longest to wait while the item is claimed (0: do not wait; default: no limit).
        #[arg(long, value_parser = parse_wait)]
        wait: Option<WaitLimit>,
        /// Print the server's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Import a checked-out pool-resource repository (POOL/unclaimed/ITEM,
    /// POOL/claimed/ITEM; file contents are the metadata) into the server.
    ///
    /// Idempotent: an item already on the server the same way is left alone; one that is
    /// there otherwise (other metadata or state) is reported and left as it is, never
    /// overwritten (exit 76 after importing the rest). Items claimed in git are added claimed
    /// under the key "imported-from-git", so the pipeline holding one releases it by name
    /// with its `release:` step (or: locker pool release POOL ITEM --force).
    #[command(after_help = POOL_EXIT_CODES)]
    Import {
        /// The repository's top directory (one directory per pool).
        dir: PathBuf,
        /// Print what would be done and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args, Debug)]
pub struct PoolAcquireArgs {
    /// The pool.
    pub pool: String,
    /// Claim this item (default: any free item, the one released longest ago).
    #[arg(long)]
    pub item: Option<String>,
    /// Key to claim under (default: unique to this invocation: host/pid/time).
    #[arg(long)]
    pub key: Option<String>,
    /// Requestor name (default: unique to this invocation).
    #[arg(long)]
    pub requestor: Option<String>,
    /// Lease: the server releases the item if it is not renewed for this long (0: none).
    /// Default: 30s with CMD (renewed while it runs), none without.
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Longest to wait for an item (e.g. 10m; 0: do not wait; default: no limit).
    #[arg(long, value_parser = parse_wait)]
    pub wait: Option<WaitLimit>,
    /// After SIGTERM to a command whose item was lost, wait this long before SIGKILL.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Also write the item's metadata to this file.
    #[arg(long, value_name = "FILE")]
    pub save_metadata: Option<PathBuf>,
    /// Without CMD: print the claim as JSON (pool, item, metadata, key, generation) instead
    /// of the item's name.
    #[arg(long, conflicts_with = "command")]
    pub json: bool,
    /// The command and its arguments, after `--` (optional).
    #[arg(last = true, num_args = 1.., value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Where an item's metadata comes from.
#[derive(Args, Debug, Clone)]
pub struct MetadataArgs {
    /// Read the metadata from this file (`-`: standard input). Without this or --metadata,
    /// standard input is read when it is not a terminal; otherwise the metadata is empty.
    #[arg(long, value_name = "FILE", conflicts_with = "metadata")]
    pub metadata_file: Option<PathBuf>,
    /// The metadata as text.
    #[arg(long, value_name = "TEXT")]
    pub metadata: Option<String>,
}

#[derive(Args, Debug)]
pub struct LockArgs {
    /// The lock's name.
    pub name: String,
    /// Key to hold the lock under (default: unique to this invocation: host/pid/time).
    /// Holders with the same key share the lock.
    #[arg(long)]
    pub key: Option<String>,
    /// Requestor name (default: unique to this invocation, so releasing frees only this run's
    /// hold even under a shared key).
    #[arg(long)]
    pub requestor: Option<String>,
    /// Lease: the server releases the lock if it is not renewed for this long (0: no lease,
    /// held until released).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Longest to wait for the lock (e.g. 10m; 0: do not wait; default: no limit).
    #[arg(long, value_parser = parse_wait)]
    pub wait: Option<WaitLimit>,
    /// Semaphore: the lock admits up to N holders with distinct keys.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub slots: Option<u32>,
    /// After SIGTERM to a command whose lock was lost, wait this long before SIGKILL.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, num_args = 1.., value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// How long to wait: `None` without limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitLimit(pub Option<Duration>);

fn parse_wait(text: &str) -> Result<WaitLimit, String> {
    match text.trim() {
        "forever" | "inf" | "infinite" => Ok(WaitLimit(None)),
        other => parse_duration(other)
            .map(|d| WaitLimit(Some(d)))
            .map_err(|e| e.to_string()),
    }
}

/// Whether these arguments ask for a client subcommand: the first argument names one.
pub fn is_client(args: &[OsString]) -> bool {
    args.get(1)
        .and_then(|a| a.to_str())
        .is_some_and(|a| SUBCOMMANDS.contains(&a))
}

/// Runs a client subcommand and returns the process's exit code.
pub fn main(args: Vec<OsString>) -> ExitCode {
    // Empty LOCKER_URL, LOCKER_CA_CERT ... count as unset, as for the server.
    let mut command = crate::config::ignore_empty_env(<Cli as clap::CommandFactory>::command());
    let parsed = command
        .try_get_matches_from_mut(args)
        .and_then(|matches| <Cli as clap::FromArgMatches>::from_arg_matches(&matches))
        .map_err(|error| error.format(&mut command));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(error) => {
            // Help and version go to stdout with 0, usage errors to stderr with 2.
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("locker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            if !failure.message.is_empty() {
                eprintln!("locker: {}", failure.message.replace('\n', " "));
            }
            ExitCode::from(failure.code)
        }
    }
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    let connection = Connection::new(&cli.connection)?;
    match cli.command {
        Command::Lock(args) => lock::run(connection, args).await,
        Command::Locks { json } => show::locks(&connection, json).await,
        Command::Status { name, json } => show::status(&connection, &name, json).await,
        Command::Release {
            name,
            key,
            requestor,
            force,
            json,
        } => show::release(&connection, &name, key, requestor, force, json).await,
        Command::WaitFree { name, wait, json } => {
            show::wait_free(&connection, &name, wait.unwrap_or(WaitLimit(None)), json).await
        }
        Command::Pool(command) => pool::run(connection, command).await,
        Command::History(args) => match args.name {
            Some(name) => history::lock(&connection, &name, args.limit, args.json).await,
            None => {
                let limit = args.limit.unwrap_or(history::ALL_LIMIT);
                history::all(&connection, args.since.unwrap_or(0), limit, args.json).await
            }
        },
        Command::Watch {
            name,
            pool,
            since,
            json,
        } => {
            let filter = match (name, pool) {
                (Some(name), _) => Filter::Lock(name),
                (None, Some(pool)) => Filter::Pool(pool),
                (None, None) => Filter::All,
            };
            history::watch(&connection, filter, since, json).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("locker").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn lock_takes_its_command_after_the_separator() {
        let cli = parse(&[
            "lock", "prod", "--ttl", "1m", "--wait", "10m", "--", "make", "-j4",
        ])
        .expect("valid");
        let Command::Lock(args) = cli.command else {
            panic!("not lock")
        };
        assert_eq!(args.name, "prod");
        assert_eq!(args.ttl, Duration::from_secs(60));
        assert_eq!(args.wait, Some(WaitLimit(Some(Duration::from_secs(600)))));
        assert_eq!(
            args.command,
            [OsString::from("make"), OsString::from("-j4")]
        );
        assert!(parse(&["lock", "prod"]).is_err(), "a command is required");
        assert!(parse(&["lock", "prod", "--slots", "0", "--", "true"]).is_err());
        assert!(parse(&["lock", "prod", "--ttl", "soon", "--", "true"]).is_err());
        let cli = parse(&["lock", "p", "--wait", "forever", "--", "true"]).expect("valid");
        let Command::Lock(args) = cli.command else {
            panic!("not lock")
        };
        assert_eq!(args.wait, Some(WaitLimit(None)));
    }

    #[test]
    fn release_needs_a_key_unless_forced() {
        assert!(parse(&["release", "prod"]).is_err());
        assert!(parse(&["release", "prod", "--force"]).is_ok());
        assert!(parse(&["release", "prod", "--key", "k"]).is_ok());
    }

    #[test]
    fn pool_acquire_takes_an_optional_command_and_json_only_without_one() {
        let cli = parse(&["pool", "acquire", "aws", "--item", "env-1"]).expect("valid");
        let Command::Pool(PoolCommand::Acquire(args)) = cli.command else {
            panic!("not pool acquire")
        };
        assert_eq!(args.item.as_deref(), Some("env-1"));
        assert!(args.command.is_empty() && args.ttl.is_none());
        let cli = parse(&[
            "pool", "acquire", "aws", "--ttl", "1m", "--", "make", "deploy",
        ])
        .expect("valid");
        let Command::Pool(PoolCommand::Acquire(args)) = cli.command else {
            panic!("not pool acquire")
        };
        assert_eq!(args.ttl, Some(Duration::from_secs(60)));
        assert_eq!(
            args.command,
            [OsString::from("make"), OsString::from("deploy")]
        );
        assert!(parse(&["pool", "acquire", "aws", "--json", "--", "true"]).is_err());
        assert!(parse(&["pool", "acquire"]).is_err(), "the pool is required");
    }

    #[test]
    fn pool_release_needs_a_key_or_force_and_metadata_comes_from_one_place() {
        assert!(parse(&["pool", "release", "aws", "env-1"]).is_err());
        assert!(parse(&["pool", "release", "aws", "env-1", "--force"]).is_ok());
        assert!(parse(&["pool", "release", "aws", "env-1", "--key", "k", "--force"]).is_err());
        assert!(parse(&["pool", "release", "aws", "env-1", "--requestor", "r"]).is_err());
        assert!(
            parse(&["pool", "add", "aws", "e", "--key", "k"]).is_err(),
            "--key needs --claimed"
        );
        assert!(
            parse(&[
                "pool",
                "add",
                "aws",
                "e",
                "--metadata",
                "x",
                "--metadata-file",
                "f"
            ])
            .is_err()
        );
        assert!(parse(&["pool", "import", "repo", "--dry-run"]).is_ok());
    }

    #[test]
    fn history_takes_a_lock_or_all_and_watch_a_lock_or_a_pool() {
        let cli = parse(&["history", "prod", "--limit", "5"]).expect("valid");
        let Command::History(args) = cli.command else {
            panic!("not history")
        };
        assert_eq!(
            (args.name.as_deref(), args.limit, args.all),
            (Some("prod"), Some(5), false)
        );
        assert!(parse(&["history"]).is_err(), "a lock or --all is required");
        assert!(parse(&["history", "prod", "--all"]).is_err());
        assert!(
            parse(&["history", "prod", "--since", "3"]).is_err(),
            "--since needs --all"
        );
        assert!(parse(&["history", "prod", "--limit", "0"]).is_err());
        let cli = parse(&["history", "--all", "--since", "40", "--json"]).expect("valid");
        let Command::History(args) = cli.command else {
            panic!("not history")
        };
        assert_eq!((args.since, args.json), (Some(40), true));

        assert!(parse(&["watch"]).is_ok());
        assert!(parse(&["watch", "prod", "--json"]).is_ok());
        assert!(parse(&["watch", "--pool", "aws"]).is_ok());
        assert!(parse(&["watch", "prod", "--pool", "aws"]).is_err());
    }

    #[test]
    fn dispatch_is_by_the_first_argument() {
        let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(is_client(&args(&["locker", "lock", "x"])));
        assert!(is_client(&args(&["locker", "wait-free", "x"])));
        assert!(is_client(&args(&["locker", "pool", "list"])));
        assert!(is_client(&args(&["locker", "history", "x"])));
        assert!(is_client(&args(&["locker", "watch"])));
        assert!(!is_client(&args(&["locker"])));
        assert!(!is_client(&args(&["locker", "--port", "3000"])));
        assert!(!is_client(&args(&["locker", "--config", "lock"])));
    }
}
