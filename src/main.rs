//! The `locker` binary: parses configuration, sets up logging, opens the store and serves.

use std::process::ExitCode;
use std::sync::Arc;

use log::{error, info, warn};

use locker::config::{Args, Command, Settings};
use locker::metrics::Metrics;
use locker::server;
use locker::startup::StartupError;
use locker::store::LockStore;
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
    let args = locker::config::parse_args(argv);
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    // An empty RUST_LOG counts as unset too (env_logger would log errors only).
    if std::env::var_os("RUST_LOG").is_some_and(|v| v.is_empty()) {
        logger.parse_filters("info");
    }
    logger.init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!("{error}");
            eprintln!("locker: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), StartupError> {
    if let Some(command) = args.command.clone() {
        return run_command(&args, command);
    }
    let mut settings = Settings::from_args(args)?;
    settings.max_connections = Some(locker::connection::fit_descriptor_limit(
        settings.max_connections,
    )?);
    let tls = match &settings.tls {
        Some((cert, key)) => Some(locker::tls::server_config(cert, key)?),
        None => None,
    };
    let listener = server::bind(settings.listen).map_err(|source| StartupError::Listen {
        addr: settings.listen,
        source,
    })?;
    if let Some(warning) = server::exposure_warning(
        listener.local_addr().unwrap_or(settings.listen),
        settings.credentials.is_some(),
    ) {
        warn!("{warning}");
    }
    let metrics = Arc::new(Metrics::with_max_lock_labels(
        settings.metrics_max_lock_labels,
    ));
    let store: Arc<dyn LockStore> = match &settings.etcd {
        Some(connection) => etcd::open(connection, &settings, &metrics)?,
        None => {
            let store = FileStore::open(FileStoreOptions {
                path: settings.state_file.clone(),
                max_waiters: settings.max_waiters,
                limits: settings.limits,
                metrics: metrics.clone(),
                journal_bytes: settings.journal_bytes,
                history: settings.history,
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
        .map_err(StartupError::Serve)
}

/// Runs a subcommand instead of serving.
fn run_command(args: &Args, command: Command) -> Result<(), StartupError> {
    let summary = match command {
        Command::Import { file, replace } => {
            locker::config::require_etcd_backend("`locker import`")?;
            let connection = locker::config::etcd_connection(args)?;
            etcd::import_file(&connection, &file, replace)?
        }
        Command::Export { file } => {
            locker::config::require_etcd_backend("`locker export`")?;
            let connection = locker::config::etcd_connection(args)?;
            etcd::export_file(&connection, &file)?
        }
    };
    eprintln!("locker: {summary}");
    Ok(())
}

/// The etcd backend (the `etcd` feature): opening the store, `locker import` and `export`.
#[cfg(feature = "etcd")]
mod etcd {
    use std::sync::Arc;

    use log::info;

    use locker::config::{EtcdConnection, Settings};
    use locker::metrics::Metrics;
    use locker::server;
    use locker::store::LockStore;
    use locker::store::etcd::{EtcdStore, EtcdStoreOptions, OpenError};

    pub use locker::store::etcd::migrate::{export_file, import_file};

    pub fn open(
        connection: &EtcdConnection,
        settings: &Settings,
        metrics: &Arc<Metrics>,
    ) -> Result<Arc<dyn LockStore>, OpenError> {
        let store = EtcdStore::open(EtcdStoreOptions {
            connection: connection.clone(),
            max_waiters: settings.max_waiters,
            limits: settings.limits,
            metrics: metrics.clone(),
            history: settings.history,
        })?;
        info!(
            "locks in etcd at {} under {:?}; {}",
            connection.endpoints.join(","),
            connection.prefix,
            server::auth_summary(settings.credentials.as_ref())
        );
        Ok(Arc::new(store))
    }
}

/// Built without the etcd backend: `LOCKER_STORE=etcd`, `import` and `export` are refused at
/// start-up (already by [`locker::config`]; these only repeat the refusal).
#[cfg(not(feature = "etcd"))]
mod etcd {
    use std::path::Path;
    use std::sync::Arc;

    use locker::config::{ConfigError, EtcdConnection, Settings};
    use locker::metrics::Metrics;
    use locker::store::LockStore;

    pub fn open(
        _: &EtcdConnection,
        _: &Settings,
        _: &Arc<Metrics>,
    ) -> Result<Arc<dyn LockStore>, ConfigError> {
        Err(ConfigError::NoEtcdBackend("LOCKER_STORE=etcd"))
    }

    pub fn import_file(_: &EtcdConnection, _: &Path, _: bool) -> Result<String, ConfigError> {
        Err(ConfigError::NoEtcdBackend("`locker import`"))
    }

    pub fn export_file(_: &EtcdConnection, _: &Path) -> Result<String, ConfigError> {
        Err(ConfigError::NoEtcdBackend("`locker export`"))
    }
}
