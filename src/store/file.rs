//! The YAML-file backend: one writer thread owns the working lock table and the state file.
//!
//! Group commit: the writer takes every command that queued up while it was busy, applies them
//! all, makes the batch durable with one write and only then answers. By default that write
//! replaces the state file (temp file, fdatasync, rename, fsync of the directory), so the file is
//! always the record of every acknowledged change. With the journal turned on
//! (`LOCKER_JOURNAL_BYTES`), the write is a record in the journal beside the state file (one
//! in-place write and `fdatasync`, see `journal.rs`), and the state file is rewritten when the
//! journal is half full, a second after its first record, at start-up and at shutdown.
//!
//! Readers see a second, committed copy of the table. Once a batch is durable, the locks and
//! pools it touched are copied into it from the working copy (`LockTable::copy_from`; they are
//! shared copy-on-write, so that copies pointers, and costs what the batch touched, not the size
//! of the table); a failed write rolls the working copy back the same way from the committed
//! one, and undoes whatever the failed write may have left on disk before the refusal is sent.

use crate::history::History;
use crate::history::file::HistoryFile;
use locker_client::wire::Event as WireEvent;
use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use log::{error, info, warn};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{oneshot, watch};

use super::atomic_file::{self, ReplaceError};
use super::flow::Backend;
use super::journal::{self, Journal};
use super::state_file;
use super::{
    ItemState, LockPage, LockStore, LockView, Page, PoolCounts, StoreError, WaiterSlot, Withdraw,
    status_view,
};
use crate::metrics::{LockStats, Metrics};
use crate::rules::{Effect, Item, LockTable, Op, Pool, Target, WaiterGrant, WaiterId};

/// Most commands folded into one write; bounds the latency a batch adds.
const MAX_BATCH: usize = 4096;
/// Rewrites tried, a short pause apart, to undo a refused write before giving up (see `undo`).
const UNDO_ATTEMPTS: u32 = 3;
const UNDO_PAUSE: Duration = Duration::from_millis(50);
/// Longest the writer sleeps when nothing is due.
const IDLE: Duration = Duration::from_secs(3600);
/// How long journal records wait before the state file is rewritten to include them, so the
/// file a person reads (or the original locker, after a downgrade) is at most this far behind.
const COMPACT_AFTER: Duration = Duration::from_secs(1);
/// Default journal size: off, so the state file is the record of every acknowledged change.
/// `LOCKER_JOURNAL_BYTES` turns it on (8 MiB is a good size; see the README's "State file").
pub const DEFAULT_JOURNAL_BYTES: u64 = 0;

/// Settings of the file backend.
#[derive(Clone)]
pub struct FileStoreOptions {
    pub path: PathBuf,
    pub max_waiters: usize,
    /// Caps on distinct locks and requestors per holding, enforced by the rules.
    pub limits: crate::rules::Limits,
    pub metrics: Arc<Metrics>,
    /// Size of the journal file; 0: every batch rewrites the state file.
    pub journal_bytes: u64,
    /// How much history to keep (`LOCKER_CONFIG.history`); no history when disabled.
    pub history: crate::history::Bounds,
}

/// What a client command gets back from the writer, once its batch is durable.
type Reply = oneshot::Sender<Result<Effect, StoreError>>;

pub(crate) enum Command {
    /// An operation a client waits for.
    Client {
        op: Op,
        reply: Reply,
        /// Where to deliver a later grant, for acquires that may queue.
        grant: Option<oneshot::Sender<WaiterGrant>>,
    },
    /// Cleanup nobody waits for (cancel, revoke); retried until durable.
    Internal(Op),
    /// Finish what is queued, then stop.
    Shutdown,
}

pub struct FileStore {
    commands: mpsc::Sender<Command>,
    committed: Arc<RwLock<LockTable>>,
    next_waiter: AtomicU64,
    waiting: Arc<AtomicUsize>,
    max_waiters: usize,
    shutdown: watch::Sender<bool>,
    /// Those waiting for a lock to be free, told by the writer of commits that touched it.
    watchers: Arc<Watchers>,
    metrics: Arc<Metrics>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    /// Why the writer's last write failed; `None` once one succeeded.
    write_failure: Arc<Mutex<Option<String>>>,
    /// The state file's directory, checked by [`LockStore::ready`] after a failed write.
    dir: PathBuf,
    history: Option<Arc<History>>,
}

/// The `wait_free` requests of each lock, woken by the writer only when a commit touched that
/// lock: 2,000 idle pollers woken by every commit cut unrelated throughput by four fifths.
#[derive(Default)]
struct Watchers(Mutex<HashMap<Target, Watched>>);

struct Watched {
    changed: Arc<tokio::sync::Notify>,
    watchers: usize,
}

impl Watchers {
    /// Registers a watcher of `name` until the returned guard is dropped.
    fn watch(self: &Arc<Self>, target: Target) -> Watcher {
        let mut map = self.0.lock();
        let watched = map.entry(target.clone()).or_insert_with(|| Watched {
            changed: Arc::new(tokio::sync::Notify::new()),
            watchers: 0,
        });
        watched.watchers += 1;
        Watcher {
            changed: watched.changed.clone(),
            target,
            watchers: self.clone(),
        }
    }

    /// Wakes the watchers of the locks a commit touched.
    fn changed(&self, batch: &Batch) {
        let map = self.0.lock();
        if map.is_empty() {
            return;
        }
        for target in batch.touched() {
            if let Some(watched) = map.get(&target) {
                watched.changed.notify_waiters();
            }
        }
    }
}

/// One `wait_free` request's registration; the lock's entry goes with its last watcher.
struct Watcher {
    changed: Arc<tokio::sync::Notify>,
    target: Target,
    watchers: Arc<Watchers>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let mut map = self.watchers.0.lock();
        if let Some(watched) = map.get_mut(&self.target) {
            watched.watchers -= 1;
            if watched.watchers == 0 {
                map.remove(&self.target);
            }
        }
    }
}

impl FileStore {
    /// Loads (or creates) the state file and starts the writer. Errors name the file.
    pub fn open(options: FileStoreOptions) -> Result<Self, OpenError> {
        let path = options.path;
        let paths = StatePaths::new(&path)?;
        paths.remove_stale_temp()?;
        let loaded = load_or_create(&paths)?;
        if !loaded.records.is_empty() {
            info!(
                "replayed {} journal record(s) from {}",
                loaded.records.len(),
                paths.journal.display()
            );
        }
        let history = options.history.enabled().then(|| {
            let history = Arc::new(History::new(options.history));
            let file = crate::history::file::path_beside(&paths.file);
            let metrics = options.metrics.clone();
            let on_failure = Box::new(move || metrics.history_write_failed());
            let opened = HistoryFile::open(file.clone(), history.clone(), on_failure)
                .map_err(|e| {
                    warn!(
                        "cannot open the history file {} ({e}); the history is kept in memory only",
                        file.display()
                    );
                })
                .ok();
            (history, opened)
        });
        let shared_history = history.as_ref().map(|(history, _)| history.clone());
        let mut writer = Writer {
            history,
            watchers: Arc::new(Watchers::default()),
            encoder: None,
            metrics: options.metrics.clone(),
            paths,
            working: loaded.table.clone().with_limits(options.limits),
            committed: Arc::new(RwLock::new(LockTable::default())),
            waiters: HashMap::new(),
            retry: Vec::new(),
            last_failure: None,
            write_failure: Arc::new(Mutex::new(None)),
            journal: None,
            journal_wanted: options.journal_bytes > 0,
            rewrite_pending: false,
            epoch: loaded.epoch,
            journal_since: None,
            last_compaction_failure: None,
            current: None,
            replaced: Vec::new(),
        };
        writer
            .start(&loaded, options.journal_bytes)
            .map_err(|source| OpenError::Start {
                path: path.clone(),
                source,
            })?;
        let table = writer.working.clone();
        info!(
            "state file {}: {} lock(s) held, next generation {}",
            path.display(),
            table.locks().len(),
            table.next_generation()
        );
        *writer.committed.write() = table;
        let committed = writer.committed.clone();
        let write_failure = writer.write_failure.clone();
        let dir = writer.paths.dir.clone();
        let watchers = writer.watchers.clone();
        let (commands, receiver) = mpsc::channel();
        let handle = thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(OpenError::Writer)?;
        let (shutdown, _) = watch::channel(false);
        Ok(FileStore {
            commands,
            committed,
            next_waiter: AtomicU64::new(1),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiters: options.max_waiters,
            shutdown,
            watchers,
            metrics: options.metrics,
            writer: Mutex::new(Some(handle)),
            write_failure,
            dir,
            history: shared_history,
        })
    }
}

#[async_trait]
impl Backend for FileStore {
    type Withdrawer = mpsc::Sender<Command>;

    /// Sends a client command to the writer and waits for its durable outcome.
    async fn submit(
        &self,
        op: Op,
        grant: Option<oneshot::Sender<WaiterGrant>>,
    ) -> Result<Effect, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Client { op, reply, grant })
            .map_err(|_| StoreError::ShuttingDown)?;
        answer.await.map_err(|_| StoreError::ShuttingDown)?
    }

    fn new_waiter(&self) -> WaiterId {
        self.next_waiter.fetch_add(1, Ordering::Relaxed)
    }

    fn withdrawer(&self) -> Self::Withdrawer {
        self.commands.clone()
    }

    async fn wait_item(
        &self,
        pool: &str,
        item: &str,
        state: ItemState,
        wait: Duration,
    ) -> Result<Option<Item>, StoreError> {
        let mut shutdown = self.shutdown.subscribe();
        let watcher = self.watchers.watch(Target::Pool(pool.to_string()));
        let mut slot = None;
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        loop {
            // Listening before looking, as in `wait_free`.
            let changed = watcher.changed.notified();
            let current = self
                .committed
                .read()
                .pool(pool)
                .and_then(|p| p.items.get(item).cloned());
            let Some(current) = current else {
                return Ok(None);
            };
            if ItemState::of(&current) == state {
                return Ok(Some(current));
            }
            if slot.is_none() {
                slot = Some(WaiterSlot::take(&self.waiting, self.max_waiters)?);
            }
            tokio::select! {
                () = changed => {}
                () = &mut deadline => return Ok(Some(current)),
                _ = shutdown.wait_for(|stopping| *stopping) => return Err(StoreError::ShuttingDown),
            }
        }
    }

    fn current_keys(&self, name: &str) -> Vec<String> {
        self.committed
            .read()
            .lock(name)
            .map(|l| l.keys())
            .unwrap_or_default()
    }

    fn waiting(&self) -> (&Arc<AtomicUsize>, usize) {
        (&self.waiting, self.max_waiters)
    }

    fn shutdown(&self) -> &watch::Sender<bool> {
        &self.shutdown
    }
}

#[async_trait]
impl LockStore for FileStore {
    async fn pool(&self, name: &str) -> Result<Option<Pool>, StoreError> {
        Ok(self.committed.read().pool(name).cloned())
    }

    async fn item(&self, pool: &str, item: &str) -> Result<Option<Item>, StoreError> {
        let table = self.committed.read();
        Ok(table.pool(pool).and_then(|p| p.items.get(item).cloned()))
    }

    async fn pools(&self) -> Result<Vec<PoolCounts>, StoreError> {
        let table = self.committed.read();
        Ok(table
            .pools()
            .iter()
            .map(|(name, pool)| PoolCounts::of(name, pool))
            .collect())
    }

    async fn status(&self, name: &str) -> Result<Option<LockView>, StoreError> {
        let table = self.committed.read();
        Ok(table
            .lock(name)
            .filter(|l| l.is_held())
            .map(|l| status_view(name, l)))
    }

    async fn list(&self, page: &Page) -> Result<LockPage, StoreError> {
        Ok(super::page_of(self.committed.read().locks(), page))
    }

    async fn wait_free(&self, name: &str, wait: Duration) -> Result<Option<LockView>, StoreError> {
        let mut shutdown = self.shutdown.subscribe();
        let watcher = self.watchers.watch(Target::Lock(name.to_string()));
        let mut slot = None;
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        loop {
            // Listening before looking, so no change slips between (a `Notified` receives
            // `notify_waiters` from its creation on).
            let changed = watcher.changed.notified();
            let status = self.status(name).await?;
            if status.is_none() {
                return Ok(None);
            }
            if slot.is_none() {
                slot = Some(WaiterSlot::take(&self.waiting, self.max_waiters)?);
            }
            tokio::select! {
                () = changed => self.metrics.wait_free_woken(),
                () = &mut deadline => return Ok(status),
                _ = shutdown.wait_for(|stopping| *stopping) => return Err(StoreError::ShuttingDown),
            }
        }
    }

    /// Ready unless the last write failed and the state file's directory still cannot take
    /// one (not writable, or no free space): then the next write is likely to fail too. Once
    /// the directory can be written again it is ready, and the next write tells.
    async fn ready(&self) -> Result<(), StoreError> {
        let Some(failure) = self.write_failure.lock().clone() else {
            return Ok(());
        };
        match directory_writable(&self.dir) {
            Ok(()) => Ok(()),
            Err(why) => Err(StoreError::Unavailable(format!(
                "the last write failed ({failure}) and {}: {why}",
                self.dir.display()
            ))),
        }
    }

    fn stats(&self) -> LockStats {
        LockStats {
            waiting_requests: self.waiting.load(Ordering::Relaxed),
            ..super::table_stats(&self.committed.read())
        }
    }

    fn history(&self) -> Option<&Arc<History>> {
        self.history.as_ref()
    }

    fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
        // Live event streams end, so they do not hold the shutdown up.
        if let Some(history) = &self.history {
            history.close();
        }
    }

    async fn close(&self) {
        self.begin_shutdown();
        let _ = self.commands.send(Command::Shutdown);
        let handle = self.writer.lock().take();
        if let Some(handle) = handle {
            let joined = tokio::task::spawn_blocking(move || handle.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                error!("the state writer did not stop cleanly");
            }
        }
    }
}

/// The writer withdraws a file-store waiter; grants go straight to the receiver.
impl Withdraw for mpsc::Sender<Command> {
    fn withdraw(&self, op: Op) {
        let _ = self.send(Command::Internal(op));
    }
}

/// The state file and the temp file its new versions are written to, beside it.
struct StatePaths {
    file: PathBuf,
    temp: PathBuf,
    dir: PathBuf,
    journal: PathBuf,
}

impl StatePaths {
    fn new(file: &Path) -> Result<Self, OpenError> {
        let file = &resolve_link(file)?;
        if file.file_name().is_none_or(|name| name.is_empty()) {
            return Err(OpenError::NoFileName(file.to_path_buf()));
        }
        Ok(StatePaths {
            file: file.to_path_buf(),
            temp: atomic_file::temp_path(file),
            dir: atomic_file::directory_of(file),
            journal: journal::path_for(file),
        })
    }

    /// A crash between writing the temp file and renaming it leaves the temp file behind.
    fn remove_stale_temp(&self) -> Result<(), OpenError> {
        match fs::remove_file(&self.temp) {
            Ok(()) => {
                warn!(
                    "removed {} left by an interrupted write",
                    self.temp.display()
                );
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(OpenError::StaleTemp {
                path: self.temp.clone(),
                source,
            }),
        }
    }

    /// Replaces the state file with `bytes`, durably: whoever reads the file at any instant
    /// sees either the complete old state or the complete new one. A failure says whether the
    /// new file had already taken the old one's place. Returns the new file, open.
    fn write_atomically(&self, bytes: &[u8]) -> Result<fs::File, WriteFailure> {
        let file = self.file.display();
        match atomic_file::replace(&self.file, |temp| temp.write_all(bytes)) {
            Ok(written) => Ok(written),
            Err(ReplaceError::Unchanged(e)) => Err(WriteFailure::io(
                format!("writing {file}"),
                &e,
                Left::Nothing,
            )),
            Err(ReplaceError::Renamed(e)) => Err(WriteFailure::io(
                format!("syncing the directory of {file} after replacing it"),
                &e,
                Left::StateFile,
            )),
        }
    }
}

/// Why the file store could not start, or `locker import` could not load a state file: each
/// names the file. A start-up error, never a request's (those are [`StoreError`]s).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("state file path {} names no file", .0.display())]
    NoFileName(PathBuf),
    #[error("{}: a symbolic link whose target cannot be resolved: {source}", path.display())]
    UnresolvedLink { path: PathBuf, source: io::Error },
    /// The temp file an interrupted write left behind.
    #[error("cannot remove {}: {source}", path.display())]
    StaleTemp { path: PathBuf, source: io::Error },
    #[error("{}: cannot read the state file: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: not UTF-8 text ({source})", path.display())]
    NotText {
        path: PathBuf,
        source: std::string::FromUtf8Error,
    },
    /// The state file, or a journal record, that does not decode.
    #[error("{}: {source}", path.display())]
    Decode {
        path: PathBuf,
        source: state_file::DecodeError,
    },
    #[error("{}: {source}", path.display())]
    Journal { path: PathBuf, source: io::Error },
    /// The writer's start: the journal, or the rewrite of the state file.
    #[error("{}: {source}", path.display())]
    Start {
        path: PathBuf,
        source: Box<OpenError>,
    },
    #[error("{0}")]
    Rewrite(WriteFailure),
    #[error("cannot start the state writer: {0}")]
    Writer(#[source] io::Error),
}

/// A write of the state file or the journal that failed, and what it may have left on disk.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct WriteFailure {
    message: String,
    left: Left,
    /// The file system is full (or over quota): a start-up goes on without writing.
    no_space: bool,
}

/// What a failed write may have left on disk besides the acknowledged state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Left {
    /// Nothing: the disk holds what it held before.
    Nothing,
    /// A journal record after the last acknowledged one, whose write or sync failed: it may
    /// have reached the disk, valid, and would be replayed at the next start.
    JournalRecord,
    /// The new state file, renamed into place, whose directory sync failed: after a crash
    /// either the old file or the new one is there.
    StateFile,
}

impl WriteFailure {
    fn io(context: String, error: &io::Error, left: Left) -> Self {
        let no_space = matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT));
        WriteFailure {
            message: format!("{context}: {error}"),
            left,
            no_space,
        }
    }

    /// The state could not be encoded; nothing was written.
    fn encoding(error: state_file::EncodeError) -> Self {
        WriteFailure {
            message: error.to_string(),
            left: Left::Nothing,
            no_space: false,
        }
    }
}

/// The file a symlinked state file points to (resolved once, at start-up), so that writes
/// replace the link's target beside it rather than the link itself: BOSH and container setups
/// often link `LOCKER_CONFIG` onto a persistent disk. Anything else is returned as it is.
fn resolve_link(file: &Path) -> Result<PathBuf, OpenError> {
    let is_link = fs::symlink_metadata(file).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link {
        return Ok(file.to_path_buf());
    }
    let target = fs::canonicalize(file).map_err(|source| OpenError::UnresolvedLink {
        path: file.to_path_buf(),
        source,
    })?;
    info!(
        "state file {} is a link to {}: writing there",
        file.display(),
        target.display()
    );
    Ok(target)
}

/// What start-up found: the table with the journal's records applied.
struct Loaded {
    table: LockTable,
    /// The journal epoch the state file names.
    epoch: u64,
    records: Vec<Vec<u8>>,
    file_exists: bool,
}

fn load_or_create(paths: &StatePaths) -> Result<Loaded, OpenError> {
    let file = || paths.file.clone();
    let journal = || paths.journal.clone();
    let bytes = match fs::read(&paths.file) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            info!("creating state file {}", paths.file.display());
            return Ok(Loaded {
                table: LockTable::default(),
                epoch: 0,
                records: Vec::new(),
                file_exists: false,
            });
        }
        Err(source) => {
            return Err(OpenError::Read {
                path: file(),
                source,
            });
        }
    };
    let text = String::from_utf8(bytes).map_err(|source| OpenError::NotText {
        path: file(),
        source,
    })?;
    let (table, epoch) =
        state_file::decode_with_journal(&text, SystemTime::now()).map_err(|source| {
            OpenError::Decode {
                path: file(),
                source,
            }
        })?;
    let records = match epoch {
        0 => Vec::new(),
        epoch => journal::read(&paths.journal, epoch).map_err(|source| OpenError::Journal {
            path: journal(),
            source,
        })?,
    };
    let table = state_file::replay(table, &records).map_err(|source| OpenError::Decode {
        path: journal(),
        source,
    })?;
    Ok(Loaded {
        table,
        epoch,
        records,
        file_exists: true,
    })
}

/// Loads a state file with the journal records that extend it (for `locker import`): a server
/// that stopped abruptly left its last changes there. `None` when there is no state file.
pub fn load(path: &Path) -> Result<Option<LockTable>, OpenError> {
    let paths = StatePaths::new(path)?;
    let loaded = load_or_create(&paths)?;
    Ok(loaded.file_exists.then_some(loaded.table))
}

/// The single writer: owns the working table, the waiters' grant channels and the file.
struct Writer {
    /// The kept history and its file (`None` when the file could not be opened).
    history: Option<(Arc<History>, Option<HistoryFile>)>,
    watchers: Arc<Watchers>,
    /// The file's text, one line per lock, kept in step with `working`; built by the start-up
    /// rewrite of the state file, and rebuilt if it ever cannot be trusted.
    encoder: Option<state_file::Encoder>,
    metrics: Arc<Metrics>,
    paths: StatePaths,
    working: LockTable,
    committed: Arc<RwLock<LockTable>>,
    waiters: HashMap<WaiterId, oneshot::Sender<WaiterGrant>>,
    /// Internal operations whose write failed; applied again with the next batch.
    retry: Vec<Op>,
    last_failure: Option<std::time::Instant>,
    /// Why the last write failed, for [`LockStore::ready`]; cleared by a commit.
    write_failure: Arc<Mutex<Option<String>>>,
    /// `None` when the journal is turned off: every batch rewrites the state file.
    journal: Option<Journal>,
    /// The journal is on (it may not be open yet at start-up).
    journal_wanted: bool,
    /// A rewrite of the state file replaced it but could not sync the directory: which journal
    /// epoch survives a crash is unknown, so no journal record is written until a rewrite of the
    /// state file succeeds (every batch rewrites it meanwhile).
    rewrite_pending: bool,
    /// The journal epoch the state file names.
    epoch: u64,
    /// When the first record after the last rewrite of the state file was written.
    journal_since: Option<std::time::Instant>,
    last_compaction_failure: Option<std::time::Instant>,
    /// The state file the last rewrite put in place, kept open so that the next rewrite's
    /// rename only unlinks it: the last close of a replaced file frees its blocks, and on a
    /// file system mounted with `discard` (ext4 without a journal here) that issues a TRIM
    /// and waits for it, inside the rename, before the batch is answered.
    current: Option<fs::File>,
    /// Files replaced by this batch's rewrites, closed once it is answered.
    replaced: Vec<fs::File>,
}

/// One batch being applied: the operations in order, and whom to answer once it is durable.
#[derive(Default)]
struct Batch {
    /// When the batch was applied.
    now: Option<SystemTime>,
    /// What it changed, for the history (when kept).
    events: Vec<crate::rules::events::Event>,
    ops: Vec<Op>,
    effects: Vec<Effect>,
    replies: Vec<(usize, Reply)>,
    queued: Vec<WaiterId>,
}

impl Batch {
    /// The locks and pools this batch may have changed.
    fn touched(&self) -> std::collections::BTreeSet<Target> {
        let mut targets = std::collections::BTreeSet::new();
        for (op, effect) in self.ops.iter().zip(&self.effects) {
            targets.extend(op.target());
            targets.extend(effect.targets());
        }
        targets
    }
}

impl Writer {
    fn run(mut self, commands: mpsc::Receiver<Command>) {
        loop {
            let mut stopping = false;
            let mut incoming = Vec::new();
            match commands.recv_timeout(self.idle_time()) {
                Ok(Command::Shutdown) => stopping = true,
                Ok(command) => incoming.push(command),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stopping = true,
            }
            while incoming.len() < MAX_BATCH {
                match commands.try_recv() {
                    Ok(Command::Shutdown) => stopping = true,
                    Ok(command) => incoming.push(command),
                    Err(_) => break,
                }
            }
            self.run_batch(incoming);
            // After the answers: the last close of a replaced file frees its blocks.
            self.replaced.clear();
            if self.compaction_due() || (stopping && self.journal_since.is_some()) {
                self.compact_logged();
            }
            if stopping {
                if !self.retry.is_empty() {
                    warn!("state writer stopping with cleanup that could not be written");
                }
                info!("state writer stopped");
                return;
            }
        }
    }

    /// Time left before internal work is tried again after a failed write.
    fn backoff(&self) -> Duration {
        super::backoff_left(self.last_failure)
    }

    /// How long to sleep waiting for commands: until the next lease runs out, or until
    /// internal work that failed to persist is due again.
    fn idle_time(&self) -> Duration {
        let mut idle = super::writer_idle_time(
            IDLE,
            self.working.next_expiry(),
            !self.retry.is_empty(),
            self.backoff(),
        );
        if let Some(since) = self.journal_since {
            let retry = super::backoff_left(self.last_compaction_failure);
            idle = idle.min(COMPACT_AFTER.saturating_sub(since.elapsed()).max(retry));
        }
        idle
    }

    /// Whether the state file should be rewritten to absorb the journal now.
    fn compaction_due(&self) -> bool {
        let (Some(journal), Some(since)) = (&self.journal, self.journal_since) else {
            return false;
        };
        let retry_due = self
            .last_compaction_failure
            .is_none_or(|at| at.elapsed() >= super::RETRY_AFTER_FAILURE);
        retry_due && (since.elapsed() >= COMPACT_AFTER || journal.used() > journal.capacity() / 2)
    }

    fn compact_logged(&mut self) {
        match self.compact() {
            Ok(()) => self.last_compaction_failure = None,
            Err(e) => {
                // The journal still holds every record; this is retried.
                warn!("cannot rewrite the state file yet: {}", e.message);
                self.last_compaction_failure = Some(std::time::Instant::now());
            }
        }
    }

    /// Opens or creates the journal and rewrites the state file to absorb what it replayed.
    /// A full disk does not stop the start: what was loaded is on disk already, the server
    /// serves it, and changes are refused with 503 until a write succeeds. With a usable journal
    /// the journal goes on after its records and the rewrite is retried; without room for a new
    /// journal the server goes on without one.
    fn start(&mut self, loaded: &Loaded, journal_bytes: u64) -> Result<(), Box<OpenError>> {
        let journal_path = self.paths.journal.clone();
        let in_journal = |source: io::Error| OpenError::Journal {
            path: journal_path.clone(),
            source,
        };
        if journal_bytes == 0 {
            if !loaded.file_exists || !loaded.records.is_empty() {
                self.compact_at_start()?;
            }
            return Ok(());
        }
        let reused = match loaded.epoch {
            0 => None,
            epoch => Journal::reuse(&journal_path, journal_bytes, epoch, &loaded.records)
                .map_err(in_journal)?,
        };
        match reused {
            Some(journal) => {
                self.journal = Some(journal);
                if let Err(e) = self.compact() {
                    warn!(
                        "cannot rewrite the state file at start-up, going on with the journal: {}",
                        e.message
                    );
                    self.last_compaction_failure = Some(std::time::Instant::now());
                    self.journal_since = Some(std::time::Instant::now());
                }
            }
            None => {
                // Nothing to go on from: the state file must hold everything before a new
                // journal replaces the old one.
                if !self.compact_at_start()? {
                    warn!(
                        "going on without the journal {} (LOCKER_JOURNAL_BYTES={journal_bytes}): \
                         every change rewrites the state file",
                        journal_path.display()
                    );
                    return Ok(());
                }
                match Journal::create(&journal_path, journal_bytes, self.epoch) {
                    Ok(journal) => self.journal = Some(journal),
                    Err(e) => warn!(
                        "cannot create the journal ({}), going on without it \
                         (LOCKER_JOURNAL_BYTES={journal_bytes}): every change rewrites the state file",
                        in_journal(e)
                    ),
                }
            }
        }
        Ok(())
    }

    /// Rewrites the state file at start-up; `Ok(false)` when a full disk (or a directory that
    /// could not be synced) prevented it, which does not stop the start.
    fn compact_at_start(&mut self) -> Result<bool, Box<OpenError>> {
        match self.compact() {
            Ok(()) => Ok(true),
            Err(e) if e.no_space || e.left == Left::StateFile => {
                warn!(
                    "cannot rewrite the state file at start-up ({}); serving what it holds, \
                     changes are refused until it can be written",
                    e.message
                );
                Ok(false)
            }
            Err(e) => Err(Box::new(OpenError::Rewrite(e))),
        }
    }

    /// Rewrites the state file with the working table in a new journal epoch: from now on the
    /// journal's older records no longer count.
    fn compact(&mut self) -> Result<(), WriteFailure> {
        let encoder = match &self.encoder {
            Some(encoder) => encoder,
            None => self
                .encoder
                .insert(state_file::Encoder::new(&self.working).map_err(WriteFailure::encoding)?),
        };
        // With the journal off, a stale journal beside the file must not match it either.
        let epoch = if self.journal_wanted || self.paths.journal.exists() {
            next_epoch(self.epoch)
        } else {
            0
        };
        let bytes = encoder.render(self.working.next_generation(), epoch);
        let written = match self.paths.write_atomically(&bytes) {
            Ok(written) => written,
            Err(failure) => {
                if failure.left == Left::StateFile {
                    // The file names `epoch` now, but after a crash it may be the old one.
                    self.epoch = epoch;
                    self.rewrite_pending = true;
                }
                return Err(failure);
            }
        };
        self.replaced.extend(self.current.replace(written));
        self.rewrite_pending = false;
        self.epoch = epoch;
        if let Some(journal) = &mut self.journal {
            journal.start_epoch(epoch);
        }
        self.journal_since = None;
        Ok(())
    }

    fn apply(&mut self, batch: &mut Batch, op: Op, now: SystemTime) -> usize {
        let effect = match &self.history {
            Some(_) => self.working.apply_recorded(&op, now, &mut batch.events),
            None => self.working.apply(&op, now),
        };
        batch.ops.push(op);
        batch.effects.push(effect);
        batch.ops.len() - 1
    }

    fn run_batch(&mut self, incoming: Vec<Command>) {
        let now = SystemTime::now();
        let mut batch = Batch {
            now: Some(now),
            ..Batch::default()
        };
        // After a failed write, internal work waits out the backoff unless clients are writing
        // anyway, so a full disk is not hammered.
        if self.backoff().is_zero() || !incoming.is_empty() {
            for op in std::mem::take(&mut self.retry) {
                self.apply(&mut batch, op, now);
            }
            if self.working.next_expiry().is_some_and(|at| at <= now) {
                self.apply(&mut batch, Op::Expire, now);
            }
        }
        for command in incoming {
            match command {
                Command::Client { op, reply, grant } => {
                    let index = self.apply(&mut batch, op, now);
                    if let (Some(id), Some(grant)) = (batch.ops[index].queues_waiter(), grant)
                        && batch.effects[index].is_queued()
                    {
                        self.waiters.insert(id, grant);
                        batch.queued.push(id);
                    }
                    batch.replies.push((index, reply));
                }
                Command::Internal(op) => {
                    if let Some(waiter) = op.cancelled_waiter() {
                        self.waiters.remove(&waiter);
                    }
                    self.apply(&mut batch, op, now);
                }
                Command::Shutdown => {}
            }
        }
        if batch.ops.is_empty() {
            return;
        }
        let dirty = batch.effects.iter().any(Effect::changes_holdings);
        let written = if dirty {
            let started = std::time::Instant::now();
            let written = self.persist(&batch);
            match &written {
                Ok(()) => self.metrics.write(started.elapsed(), batch.ops.len()),
                Err(_) => self.metrics.write_failed(),
            }
            written
        } else {
            Ok(())
        };
        match written {
            Ok(()) => self.commit(batch),
            Err(e) => self.roll_back(batch, e),
        }
    }

    fn persist(&mut self, batch: &Batch) -> Result<(), WriteFailure> {
        let touched = batch.touched();
        let encoder = match &mut self.encoder {
            Some(encoder) => {
                encoder
                    .update(&self.working, &touched)
                    .map_err(WriteFailure::encoding)?;
                encoder
            }
            None => self
                .encoder
                .insert(state_file::Encoder::new(&self.working).map_err(WriteFailure::encoding)?),
        };
        if let Some(journal) = self.journal.as_mut().filter(|_| !self.rewrite_pending) {
            let record = encoder
                .record(&touched, self.working.next_generation())
                .map_err(WriteFailure::encoding)?;
            let appended = journal.append(&record).map_err(|e| {
                let journal = self.paths.journal.display();
                WriteFailure::io(format!("writing {journal}"), &e, Left::JournalRecord)
            })?;
            if appended {
                self.journal_since
                    .get_or_insert_with(std::time::Instant::now);
                return Ok(());
            }
            // The journal is full: the rewritten state file holds this batch too.
        }
        self.compact()
    }

    fn commit(&mut self, batch: Batch) {
        self.last_failure = None;
        *self.write_failure.lock() = None;
        // Readers now see the batch: its locks are shared into the committed copy, at the cost
        // of the batch, not of the table.
        self.committed
            .write()
            .copy_from(&self.working, &batch.touched());
        debug_assert!(
            self.encoder
                .as_ref()
                .is_none_or(|e| state_file::encode(&self.working)
                    .is_ok_and(|full| e.render(self.working.next_generation(), 0) == full)),
            "the incremental encoding diverged from a full one"
        );
        self.watchers.changed(&batch);
        super::flow::log_effects(&batch.effects);
        let events = self.record_history(&batch);
        let expired: usize = batch
            .effects
            .iter()
            .map(|e| match e {
                Effect::Expiry(expiry) => expiry.expired.len(),
                _ => 0,
            })
            .sum();
        if expired > 0 {
            self.metrics.release_by("expired", expired as u64);
        }
        for effect in &batch.effects {
            for grant in effect.grants() {
                self.deliver(grant.clone());
            }
        }
        for (index, reply) in batch.replies {
            let _ = reply.send(Ok(batch.effects[index].clone()));
        }
        if let Some((history, _)) = &self.history {
            history.publish(&events);
        }
    }

    /// Numbers a durable batch's events, feeds them to the hold and wait histograms, writes
    /// them to the history file and keeps them, before the batch is answered (the file's sync
    /// thread syncs them). A failed write does not fail the batch, whose state is durable
    /// already: the events stay in memory and the failure is logged and counted.
    fn record_history(&mut self, batch: &Batch) -> Vec<Arc<WireEvent>> {
        let (Some((history, file)), Some(now)) = (&self.history, batch.now) else {
            return Vec::new();
        };
        if batch.events.is_empty() {
            return Vec::new();
        }
        let events = history.number(&batch.events, now);
        for event in &events {
            self.metrics.observe_event(event);
        }
        match file {
            Some(file) => {
                if let Err(e) = file.append(&events) {
                    warn!("cannot write to the history file: {e}");
                    self.metrics.history_write_failed();
                }
            }
            None => history.keep(events.iter().map(|event| (event.clone(), 0))),
        }
        events
    }

    /// Hands a grant to its waiter; one that is gone gets its grant revoked.
    fn deliver(&mut self, grant: WaiterGrant) {
        let undelivered = match self.waiters.remove(&grant.waiter) {
            Some(sender) => sender.send(grant).err(),
            None => Some(grant),
        };
        if let Some(grant) = undelivered {
            self.retry.push(Op::Revoke(grant));
            self.last_failure = None;
        }
    }

    fn roll_back(&mut self, batch: Batch, failure: WriteFailure) {
        let reason = failure.message;
        error!("{reason}; {} operation(s) refused", batch.replies.len());
        let touched = batch.touched();
        self.working.copy_from(&self.committed.read(), &touched);
        let restored = match &mut self.encoder {
            Some(encoder) => encoder.update(&self.working, &touched),
            None => Ok(()),
        };
        if restored.is_err() {
            // Rebuilt in full by the next write.
            self.encoder = None;
        }
        self.undo(failure.left);
        self.last_failure = Some(std::time::Instant::now());
        *self.write_failure.lock() = Some(reason.clone());
        for id in &batch.queued {
            self.waiters.remove(id);
        }
        for (_, reply) in batch.replies {
            let _ = reply.send(Err(StoreError::Unavailable(reason.clone())));
        }
        // Cleanup must not be lost: it is applied again with a later batch.
        self.retry
            .extend(batch.ops.into_iter().filter(Op::is_cleanup));
    }
}

impl Writer {
    /// After a failed write that may have left the refused batch on disk, makes the disk hold
    /// the acknowledged state again, before the refusal is sent: a change refused with 503 must
    /// not come back after a crash. A journal record is erased in place (no new space needed);
    /// otherwise, or if that fails, the state file is rewritten from the rolled-back table.
    ///
    /// When neither works the disk is failing and the server cannot say what it holds: it stops
    /// without answering, so those clients learn nothing false (their connection closes), and
    /// the next start reads whatever the disk kept, as after any crash.
    fn undo(&mut self, left: Left) {
        let erased = match (left, &mut self.journal) {
            (Left::Nothing, _) => return,
            (Left::JournalRecord, Some(journal)) => match journal.erase_unacknowledged() {
                Ok(()) => true,
                Err(e) => {
                    warn!(
                        "cannot erase the refused journal record ({e}); rewriting the state file"
                    );
                    false
                }
            },
            _ => false,
        };
        if erased {
            return;
        }
        // A transient failure (one I/O error) should not stop the server: try a few times.
        let mut last_error = String::new();
        for attempt in 0..UNDO_ATTEMPTS {
            if attempt > 0 {
                thread::sleep(UNDO_PAUSE);
            }
            match self.compact() {
                Ok(()) => {
                    info!("rewrote the state file without the refused change");
                    return;
                }
                Err(e) => last_error = e.message,
            }
        }
        error!(
            "cannot undo a refused write on disk ({last_error}): stopping without answering, \
             so that no refused change can pass for an acknowledged one"
        );
        std::process::exit(1);
    }
}

/// A journal epoch newer than `previous` and unlike any a restored older state file may name.
fn next_epoch(previous: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    now.max(previous.saturating_add(1))
}

/// Why a directory cannot take a write now.
#[derive(Debug, thiserror::Error)]
enum Unwritable {
    #[error("the path holds a NUL byte")]
    NulInPath,
    #[error("not writable: {0}")]
    NotWritable(io::Error),
    #[error("cannot be examined: {0}")]
    Unexaminable(io::Error),
    #[error("no free space")]
    NoSpace,
}

/// Whether `dir` can take a write now: writable by this process, with free space. Creates
/// nothing.
fn directory_writable(dir: &Path) -> Result<(), Unwritable> {
    use std::os::unix::ffi::OsStrExt;
    let path =
        std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| Unwritable::NulInPath)?;
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::access(path.as_ptr(), libc::W_OK) } != 0 {
        return Err(Unwritable::NotWritable(io::Error::last_os_error()));
    }
    // SAFETY: statvfs fills the zeroed struct it is given; `path` is valid as above.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(Unwritable::Unexaminable(io::Error::last_os_error()));
    }
    if stat.f_bavail == 0 {
        return Err(Unwritable::NoSpace);
    }
    Ok(())
}
