//! The file store's history: `LOCKER_CONFIG.history`, one JSON event per line, appended and
//! synced after each durable batch's state write and before its answers.
//!
//! The state file is written first: a crash between the two loses the events of a batch that
//! was never answered, and never records a change the state does not have. A line cut short by
//! a crash is cut off at the next start. Once the file passes the byte bound it is replaced,
//! atomically and privately (`atomic_file`), by the events the bounds keep (each lock's last
//! ones, at most half the byte bound), so it never holds more than about the bound.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use locker_client::wire::Event;
use log::warn;

use super::History;
use crate::store::atomic_file;

/// The history file beside `state`.
pub fn path_beside(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(".history");
    PathBuf::from(name)
}

/// The open history file.
#[derive(Debug)]
pub struct HistoryFile {
    path: PathBuf,
    file: File,
    /// Its length: where the next batch goes, and where a failed append is cut back to.
    len: u64,
}

impl HistoryFile {
    /// Opens the file (creating it, owner-only), loads the events it keeps into `history`, and
    /// cuts off a last line a crash left unfinished.
    pub fn open(path: PathBuf, history: &History) -> io::Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        let (events, good) = read(&file, &path)?;
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
        Ok(HistoryFile {
            path,
            file,
            len: good,
        })
    }

    /// Appends one batch's events and syncs them; returns each one's size. On failure the
    /// file is cut back to where it was.
    pub fn append(&mut self, events: &[Arc<Event>]) -> io::Result<Vec<u64>> {
        let mut buffer = Vec::with_capacity(events.len() * 256);
        let mut sizes = Vec::with_capacity(events.len());
        for event in events {
            let start = buffer.len();
            serde_json::to_writer(&mut buffer, &**event).map_err(io::Error::other)?;
            buffer.push(b'\n');
            sizes.push((buffer.len() - start) as u64);
        }
        let written = self
            .file
            .write_all(&buffer)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += buffer.len() as u64;
                Ok(sizes)
            }
            Err(e) => {
                // Nothing half-written stays to be read back as history.
                if self.file.set_len(self.len).is_err() {
                    warn!("{}: cannot cut back a failed append", self.path.display());
                }
                Err(e)
            }
        }
    }

    /// Whether the file has grown past `bytes` and should be rewritten.
    pub fn due(&self, bytes: u64) -> bool {
        self.len > bytes
    }

    /// Replaces the file with what `history` keeps.
    pub fn rewrite(&mut self, history: &History) -> io::Result<()> {
        let kept = history.kept();
        let mut buffer = Vec::with_capacity(history.kept_bytes() as usize);
        for (event, _) in &kept {
            serde_json::to_writer(&mut buffer, &**event).map_err(io::Error::other)?;
            buffer.push(b'\n');
        }
        atomic_file::replace(&self.path, |file| file.write_all(&buffer))
            .map_err(|e| io::Error::new(e.io().kind(), e.to_string()))?;
        self.file = OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)?;
        self.len = buffer.len() as u64;
        Ok(())
    }
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

    #[test]
    fn events_survive_a_reopen_and_a_torn_last_line_is_cut_off() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.yml.history");
        let history = History::new(Bounds::default());
        let mut file = HistoryFile::open(path.clone(), &history).expect("open");
        let batch = vec![event(1, "a"), event(2, "b")];
        let sizes = file.append(&batch).expect("append");
        history.keep(batch.into_iter().zip(sizes));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"id\":3,\"at"))
            .expect("tear");
        let reopened = History::new(Bounds::default());
        let file = HistoryFile::open(path.clone(), &reopened).expect("reopen");
        let page = reopened.page(&Query {
            limit: 10,
            ..Query::default()
        });
        assert_eq!(page.events.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(reopened.next_id(), 3);
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), file.len);
    }

    #[test]
    fn a_rewrite_keeps_each_locks_last_events_within_the_bounds() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.yml.history");
        let history = History::new(Bounds {
            bytes: 1 << 20,
            per_subject: 3,
        });
        let mut file = HistoryFile::open(path.clone(), &history).expect("open");
        let batch: Vec<_> = (1..=10)
            .map(|id| event(id, if id == 1 { "quiet" } else { "busy" }))
            .collect();
        let sizes = file.append(&batch).expect("append");
        history.keep(batch.into_iter().zip(sizes));
        file.rewrite(&history).expect("rewrite");
        let reopened = History::new(Bounds::default());
        HistoryFile::open(path, &reopened).expect("reopen");
        let ids: Vec<u64> = reopened
            .page(&Query {
                limit: 100,
                ..Query::default()
            })
            .events
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, [1, 8, 9, 10]);
    }
}
