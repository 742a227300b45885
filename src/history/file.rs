//! The file store's history: `LOCKER_CONFIG.history`, one JSON event per line.
//!
//! Each durable batch's events are written to the file (the page cache) after the state file
//! and before the batch is answered, so a crash of the server loses none of an acknowledged
//! change's events, and a change whose state write failed records nothing. Syncing them to the
//! disk and rewriting the file once it passes its bound happen on a thread of their own
//! (`history-sync`), so neither adds to an answer's time: the history reaches the disk within
//! about a second (a power loss can lose its last second, never the state, which is synced
//! before the answer). Measured with `bench/run history`: syncing each batch's events before
//! its answer cost two fifths of the throughput.
//!
//! A line cut short by a crash is cut off at the next start. Once the file passes the byte
//! bound it is replaced, atomically and privately, by the events kept within half the bound,
//! then whatever was appended meanwhile; the sync thread runs at a lower CPU priority and writes
//! the replacement in paced chunks, so that it never holds the state file's syncs up for long.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Seek, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use locker_client::wire::Event;
use log::warn;
use parking_lot::{Condvar, Mutex};

use super::History;
use crate::store::atomic_file;

/// How long the sync thread sleeps when there is nothing to sync.
const IDLE: Duration = Duration::from_secs(1);
/// Least time between two syncs, as Redis's `appendfsync everysec`: under load one sync covers
/// thousands of batches. Each sync of the growing file commits the file system's journal, and
/// the state file's syncs queue behind those commits: `bench/run latency --rate 10000` showed
/// p99.9 about 10 ms syncing every 50 ms, 7-8 ms every second, the same as without a history.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// A rewrite writes and syncs its snapshot this much at a time, so that a state-file sync
/// never waits behind more than this much of it reaching the disk.
const REWRITE_CHUNK: usize = 256 << 10;
/// Pause after each chunk, so that the state file's syncs reach the disk between them.
const CHUNK_PAUSE: Duration = Duration::from_millis(2);
/// What was appended during a rewrite is copied without holding the writer up until at most
/// this much is left; only that last bit is copied under the writer's lock.
const SHORT_TAIL: u64 = 64 << 10;

/// The history file beside `state`.
pub fn path_beside(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(".history");
    PathBuf::from(name)
}

/// What the writer and the sync thread share.
struct Shared {
    path: PathBuf,
    history: Arc<History>,
    state: Mutex<FileState>,
    wake: Condvar,
    /// Called when a sync or a rewrite fails (counted in the metrics).
    on_failure: Box<dyn Fn() + Send + Sync>,
}

struct FileState {
    file: File,
    /// Its length: where the next batch goes, and where a failed append is cut back to.
    len: u64,
    /// Written since the last sync.
    dirty: bool,
    stop: bool,
}

/// The open history file and its sync thread.
pub struct HistoryFile {
    shared: Arc<Shared>,
    syncer: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for HistoryFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryFile")
            .field("path", &self.shared.path)
            .finish()
    }
}

impl HistoryFile {
    /// Opens the file (creating it, owner-only), loads the events it keeps into `history`, cuts
    /// off a last line a crash left unfinished, and starts the sync thread.
    pub fn open(
        path: PathBuf,
        history: Arc<History>,
        on_failure: Box<dyn Fn() + Send + Sync>,
    ) -> io::Result<Self> {
        let mut file = open_append(&path, true)?;
        let (events, good) = read(&file, &path)?;
        // Ids run from 1 without gaps here: any missing below the newest were dropped for a
        // bound before this start.
        let mut previous = 0;
        for (event, _) in &events {
            if event.id > previous + 1 {
                history.note_lost(event.id - 1);
            }
            previous = previous.max(event.id);
        }
        history.keep(events);
        if file.metadata()?.len() != good {
            warn!(
                "{}: cutting off an unfinished last event (a crash while it was written)",
                path.display()
            );
            file.set_len(good)?;
            file.sync_data()?;
        }
        file.seek(io::SeekFrom::End(0))?;
        let shared = Arc::new(Shared {
            path,
            history,
            state: Mutex::new(FileState {
                file,
                len: good,
                dirty: false,
                stop: false,
            }),
            wake: Condvar::new(),
            on_failure,
        });
        let syncer = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("history-sync".into())
                .spawn(move || shared.run())?
        };
        Ok(HistoryFile {
            shared,
            syncer: Some(syncer),
        })
    }

    /// Writes one batch's events (synced soon after by the sync thread) and keeps them in the
    /// history. On a failed write the file is cut back to where it was and the events are kept
    /// in memory only.
    pub fn append(&self, events: &[Arc<Event>]) -> io::Result<()> {
        let (buffer, sizes) = lines(events)?;
        let mut state = self.shared.state.lock();
        let written = state.file.write_all(&buffer);
        let kept = events.iter().cloned();
        match written {
            Ok(()) => {
                state.len += buffer.len() as u64;
                state.dirty = true;
                // Kept while the file is locked: what a rewrite snapshots is what the file has.
                self.shared.history.keep(kept.zip(sizes));
                self.shared.wake.notify_one();
                Ok(())
            }
            Err(e) => {
                // Nothing half-written stays to be read back as history.
                let len = state.len;
                if state.file.set_len(len).is_err() {
                    warn!(
                        "{}: cannot cut back a failed append",
                        self.shared.path.display()
                    );
                }
                self.shared.history.keep(kept.map(|event| (event, 0)));
                Err(e)
            }
        }
    }
}

impl Drop for HistoryFile {
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(syncer) = self.syncer.take() {
            let _ = syncer.join();
        }
    }
}

impl Shared {
    /// The sync thread: syncs what was written, and rewrites the file once it is over its bound.
    fn run(&self) {
        lower_priority();
        loop {
            let (file, due, stopping) = {
                let mut state = self.state.lock();
                while !state.dirty && !state.stop && !self.due(&state) {
                    self.wake.wait_for(&mut state, IDLE);
                }
                let file = state.file.try_clone();
                let dirty = std::mem::take(&mut state.dirty);
                (dirty.then_some(file), self.due(&state), state.stop)
            };
            if let Some(file) = file {
                if let Err(e) = file.and_then(|file| file.sync_data()) {
                    warn!("cannot sync the history file {}: {e}", self.path.display());
                    (self.on_failure)();
                }
            }
            if due && let Err(e) = self.rewrite() {
                warn!(
                    "cannot rewrite the history file {}: {e}",
                    self.path.display()
                );
                (self.on_failure)();
                // Not again at once: a full disk is not hammered.
                thread::sleep(IDLE);
            }
            if stopping {
                return;
            }
            thread::sleep(SYNC_EVERY);
        }
    }

    fn due(&self, state: &FileState) -> bool {
        state.len > self.history.bounds().bytes
    }

    /// Replaces the file with what the history keeps (trimmed to half the bound first), then
    /// what was appended meanwhile. The long write happens unlocked; only the short tail and
    /// the rename hold the writer up.
    fn rewrite(&self) -> io::Result<()> {
        let (kept, from) = {
            let state = self.state.lock();
            self.history.trim_to_half();
            (self.history.kept(), state.len)
        };
        let mut snapshot = Vec::with_capacity(self.history.kept_bytes() as usize);
        for (event, _) in &kept {
            serde_json::to_writer(&mut snapshot, &**event).map_err(io::Error::other)?;
            snapshot.push(b'\n');
        }
        let temp = atomic_file::temp_path(&self.path);
        let replaced = self.replace_with(&temp, &snapshot, from);
        if replaced.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        replaced
    }

    /// Writes `snapshot` to a new private file at `temp` and syncs it with the writer free to
    /// go on, then what was appended after `from` while it did, until little is left; then,
    /// holding the writer up only for that, adds the rest, syncs it and renames the file over
    /// the history.
    ///
    /// `atomic_file::replace` is not used: the last of the tail and the rename must happen
    /// under the writer's lock (or an append could fall between them), and the directory's
    /// sync after it; the pieces (`temp_path`, `create_private`, `directory_of`) are the same.
    fn replace_with(&self, temp: &Path, snapshot: &[u8], from: u64) -> io::Result<()> {
        let mut file = atomic_file::create_private(temp)?;
        for chunk in snapshot.chunks(REWRITE_CHUNK) {
            file.write_all(chunk)?;
            file.sync_data()?;
            // Room for the state file's syncs between the chunks'.
            thread::sleep(CHUNK_PAUSE);
        }
        let mut copied = from;
        loop {
            let (source, len) = {
                let state = self.state.lock();
                (state.file.try_clone()?, state.len)
            };
            if len - copied <= SHORT_TAIL {
                break;
            }
            copy_range(&source, &mut file, copied, len)?;
            file.sync_data()?;
            copied = len;
        }
        let mut state = self.state.lock();
        let len = state.len;
        copy_range(&state.file, &mut file, copied, len)?;
        file.sync_data()?;
        std::fs::rename(temp, &self.path)?;
        state.file = open_append(&self.path, false)?;
        state.len = snapshot.len() as u64 + (len - from);
        state.dirty = false;
        drop(state);
        File::open(atomic_file::directory_of(&self.path))?.sync_all()
    }
}

/// Appends bytes `from..until` of `source` to `to`. Bytes below the history file's length
/// never change (appends go after it, a failed one is cut back to it), so they are read
/// without holding the writer up.
fn copy_range(source: &File, to: &mut File, from: u64, until: u64) -> io::Result<()> {
    let mut bytes = vec![0; (until - from) as usize];
    source.read_exact_at(&mut bytes, from)?;
    to.write_all(&bytes)
}

/// Gives the calling thread a lower CPU priority (nice 10): a rewrite's encoding of the kept
/// events is background work that must not take a core from the threads answering requests.
fn lower_priority() {
    // SAFETY: gettid and setpriority take no pointers; a refusal only leaves the priority as is.
    let refused = unsafe {
        let thread = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, thread, 10) != 0
    };
    if refused {
        warn!(
            "cannot lower the history thread's priority: {}",
            io::Error::last_os_error()
        );
    }
}

fn open_append(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(create)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// The events as lines of the file, and each line's size.
fn lines(events: &[Arc<Event>]) -> io::Result<(Vec<u8>, Vec<u64>)> {
    let mut buffer = Vec::with_capacity(events.len() * 256);
    let mut sizes = Vec::with_capacity(events.len());
    for event in events {
        let start = buffer.len();
        serde_json::to_writer(&mut buffer, &**event).map_err(io::Error::other)?;
        buffer.push(b'\n');
        sizes.push((buffer.len() - start) as u64);
    }
    Ok((buffer, sizes))
}

/// The events of the file, each with its size, and the length of its complete lines. A line
/// that does not parse (damaged by hand, say) is skipped with a warning.
fn read(file: &File, path: &Path) -> io::Result<(Vec<super::Sized>, u64)> {
    let mut reader = io::BufReader::new(file);
    let mut events = Vec::new();
    let mut good = 0u64;
    let mut line = Vec::new();
    let mut skipped = 0usize;
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line)?;
        if read == 0 || line.last() != Some(&b'\n') {
            break;
        }
        good += read as u64;
        match serde_json::from_slice::<Event>(&line) {
            Ok(event) => events.push((Arc::new(event), read as u64)),
            Err(_) => skipped += 1,
        }
    }
    if skipped > 0 {
        warn!(
            "{}: skipped {skipped} line(s) that are not events",
            path.display()
        );
    }
    Ok((events, good))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Bounds, Query};

    fn event(id: u64, lock: &str) -> Arc<Event> {
        Arc::new(Event {
            id,
            at: "2026-11-30T00:00:00.000Z".into(),
            kind: "acquired".into(),
            lock: Some(lock.into()),
            ..Event::default()
        })
    }

    fn ids(history: &History) -> Vec<u64> {
        history
            .page(&Query {
                limit: 100,
                ..Query::default()
            })
            .events
            .iter()
            .map(|e| e.id)
            .collect()
    }

    fn open(path: &Path, bounds: Bounds) -> (Arc<History>, HistoryFile) {
        let history = Arc::new(History::new(bounds));
        let file =
            HistoryFile::open(path.to_path_buf(), history.clone(), Box::new(|| {})).expect("open");
        (history, file)
    }

    #[test]
    fn events_survive_a_reopen_and_a_torn_last_line_is_cut_off() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.yml.history");
        let (history, file) = open(&path, Bounds::default());
        file.append(&[event(1, "a"), event(2, "b")])
            .expect("append");
        assert_eq!(ids(&history), [1, 2]);
        drop(file);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"id\":3,\"at"))
            .expect("tear");
        let (reopened, file) = open(&path, Bounds::default());
        assert_eq!(ids(&reopened), [1, 2]);
        assert_eq!(reopened.next_id(), 3);
        let len = file.shared.state.lock().len;
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), len);
    }

    #[test]
    fn a_rewrite_keeps_each_locks_last_events_and_what_came_after() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.yml.history");
        let bounds = Bounds {
            bytes: 1 << 20,
            per_subject: 3,
        };
        let (history, file) = open(&path, bounds);
        let batch: Vec<_> = (1..=10)
            .map(|id| event(id, if id == 1 { "quiet" } else { "busy" }))
            .collect();
        file.append(&batch).expect("append");
        file.shared.rewrite().expect("rewrite");
        file.append(&[event(11, "quiet")]).expect("append after");
        assert_eq!(ids(&history), [1, 8, 9, 10, 11]);
        drop(file);
        let (reopened, _file) = open(&path, Bounds::default());
        assert_eq!(ids(&reopened), [1, 8, 9, 10, 11]);
    }

    #[test]
    fn a_rewrite_leaves_at_most_half_the_bound_so_the_next_one_is_far_off() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.yml.history");
        // The lock's own bound keeps more than half the byte bound in memory; the file holds
        // every event written since the last rewrite and is over the byte bound.
        let bounds = Bounds {
            bytes: 10_000,
            per_subject: 100,
        };
        let (history, file) = open(&path, bounds);
        let batch: Vec<_> = (1..=200).map(|id| event(id, "busy")).collect();
        file.append(&batch).expect("append");
        // The sync thread, woken by the append, finds the file over its bound and rewrites it.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut size = std::fs::metadata(&path).expect("meta").len();
        while size > bounds.bytes && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
            size = std::fs::metadata(&path).expect("meta").len();
        }
        assert!(size <= bounds.bytes / 2, "{size} bytes after the rewrite");
        let kept = ids(&history);
        assert_eq!(kept.last(), Some(&200), "the newest events stay");
        assert!(kept.len() < 100, "the oldest went: {} kept", kept.len());
        drop(file);
        let (reopened, _file) = open(&path, bounds);
        assert_eq!(ids(&reopened), kept);
    }
}
