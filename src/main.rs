//! The `locker` binary: parses configuration, sets up logging, opens the store and serves.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::{error, info};

use locker::config::{Args, Command, Settings};
use locker::metrics::Metrics;
use locker::server;
use locker::store::LockStore;
use locker::store::etcd::{EtcdStore, EtcdStoreOptions, migrate};
use locker::store::file::{FileStore, FileStoreOptions};

/// jemalloc rather than glibc's malloc: a waiting request's fixed 8 KiB connection buffers stay
/// mostly untouched, and jemalloc (no per-chunk headers) leaves those pages non-resident.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc options read at its start-up (`_RJEM_MALLOC_CONF` in the environment overrides):
/// one arena (two workers and a writer thread do not contend) and freed pages handed back at
/// once. Measured with `bench/run memory`: 10,000 locks + 2,000 waiters in 59 MiB instead of
/// 67 MiB with the defaults (74 MiB with glibc), at the same throughput.
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_OPTIONS: &[u8; 44] = b"narenas:1,dirty_decay_ms:0,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    // `locker lock|locks|status|release|wait-free ...`: the client; anything else: the server.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if locker::cli::is_client(&argv) {
        return locker::cli::main(argv);
    }
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            error!("{message}");
            eprintln!("locker: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    if let Some(command) = args.command.clone() {
        return run_command(&args, command);
    }
    let settings = Settings::from_args(args)?;
    let tls = match &settings.tls {
        Some((cert, key)) => Some(locker::tls::server_config(cert, key)?),
        None => None,
    };
    let listener = server::bind(settings.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    let metrics = Arc::new(Metrics::new());
    let store: Arc<dyn LockStore> = match &settings.etcd {
        Some(connection) => {
            let store = EtcdStore::open(EtcdStoreOptions {
                connection: connection.clone(),
                max_waiters: settings.max_waiters,
                metrics: metrics.clone(),
            })?;
            info!(
                "locks in etcd at {} under {:?}; {}",
                connection.endpoints.join(","),
                connection.prefix,
                server::auth_summary(settings.credentials.as_ref())
            );
            Arc::new(store)
        }
        None => {
            let store = FileStore::open(FileStoreOptions {
                path: settings.state_file.clone(),
                max_waiters: settings.max_waiters,
                metrics: metrics.clone(),
                journal_bytes: settings.journal_bytes,
            })?;
            info!(
                "state file {}; {}",
                settings.state_file.display(),
                server::auth_summary(settings.credentials.as_ref())
            );
            Arc::new(store)
        }
    };
    actix_web::rt::System::new()
        .block_on(server::serve(
            listener,
            &settings,
            store,
            metrics,
            tls,
            server::termination_signal(),
        ))
        .map_err(|e| format!("server failed: {e}"))
}

/// Runs a subcommand instead of serving.
fn run_command(args: &Args, command: Command) -> Result<(), String> {
    let summary = match command {
        Command::Import { file, replace } => {
            let connection = locker::config::etcd_connection(args)?;
            migrate::import_file(&connection, &file, replace)?
        }
        Command::Export { file } => {
            let connection = locker::config::etcd_connection(args)?;
            migrate::export_file(&connection, &file)?
        }
    };
    eprintln!("locker: {summary}");
    Ok(())
}
