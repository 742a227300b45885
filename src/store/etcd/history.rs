//! The etcd store's history: every transaction that changes a lock or pool also puts one
//! record, `{prefix}history/{replica}-{n}`, the list of the events it made (`codec::encode_record`).
//! So an acknowledged change is never missing from the history, and a transaction refused or
//! failed records nothing.
//!
//! An event's id is its record's create revision × [`EVENTS_PER_REVISION`] + its place in the
//! record: ids follow etcd's own order of the transactions, whichever server made them, and are
//! the same on every server. Every server takes the records in from its watch of the prefix (and
//! loads them at start, and after the watch lost its place), so each server's [`History`] holds
//! the events of all of them, in the one order; a writer answers its clients once its watch has
//! taken in its own record, so a client that reads the history after an answer finds its change.
//!
//! Bounds: each server's [`History`] keeps the last `per_subject` events of each lock or pool
//! (the same on every server: it depends only on the records etcd keeps). The records are
//! trimmed by the servers' own transactions, which delete (at most [`TRIM_ROOM`] each):
//! records none of whose events is kept any more (all were a busy lock's older ones), then the
//! oldest records while all of them together pass the byte bound. The highest id trimmed is
//! kept in `{prefix}history-lost`, so a server that starts later still tells a reader resuming
//! from before it that it missed events.

use super::*;
use crate::history::{Bounds, History};
use codec::EVENTS_PER_REVISION;

/// Most records one transaction deletes.
pub(super) const TRIM_ROOM: usize = 16;

/// One kept record.
struct Record {
    key: String,
    bytes: u64,
    /// How many of its events the history still keeps.
    live: usize,
}

#[derive(Default)]
struct Records {
    by_revision: BTreeMap<i64, Record>,
    by_key: HashMap<String, i64>,
    /// Bytes of all the records' values.
    bytes: u64,
    /// Records none of whose events the history keeps.
    dead: BTreeSet<i64>,
    /// Records a committed transaction deleted, until the watch says so.
    deleting: BTreeSet<i64>,
    /// The highest create revision taken in.
    last: i64,
    /// The highest id known to be trimmed.
    lost: u64,
}

/// What one transaction trims.
pub(super) struct Trim {
    pub(super) revisions: Vec<i64>,
    pub(super) ops: Vec<TxnOp>,
}

/// The history of this server and what it knows of the records in etcd.
pub(super) struct Recorder {
    pub(super) history: Arc<History>,
    records: Mutex<Records>,
    /// Bytes the records may take in etcd.
    bytes: u64,
    /// The key prefix of this replica's own records, and the metrics their events feed (the
    /// hold and wait histograms count each change once, at the replica that made it).
    own: Option<(String, Arc<crate::metrics::Metrics>)>,
}

impl Recorder {
    pub(super) fn new(bounds: Bounds) -> Self {
        // In memory, the kept events are at most the records' bytes, which the trimming keeps
        // within the bound: the history's own byte bound is only a safety net.
        let memory = Bounds {
            bytes: bounds.bytes.saturating_mul(2),
            ..bounds
        };
        Recorder {
            history: Arc::new(History::new(memory)),
            records: Mutex::new(Records::default()),
            bytes: bounds.bytes,
            own: None,
        }
    }

    /// Feeds `metrics` with the events of the records under `prefix` (this replica's) that
    /// the watch brings.
    pub(super) fn observing(
        mut self,
        prefix: String,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        self.own = Some((prefix, metrics));
        self
    }

    /// Takes in a record put at `create_revision` (ignored if already taken in), and sends its
    /// events to the live readers when `publish`.
    pub(super) fn take_in(&self, key: &str, create_revision: i64, value: &[u8], publish: bool) {
        let mut records = self.records.lock();
        if create_revision <= records.last || records.by_key.contains_key(key) {
            return;
        }
        records.last = create_revision;
        let events = match codec::decode_record(key, create_revision, value) {
            Ok(events) => events,
            Err(e) => {
                error!("{e}");
                return;
            }
        };
        let bytes = value.len() as u64;
        records.bytes += bytes;
        records.by_key.insert(key.to_string(), create_revision);
        records.by_revision.insert(
            create_revision,
            Record {
                key: key.to_string(),
                bytes,
                live: events.len(),
            },
        );
        if events.is_empty() {
            records.dead.insert(create_revision);
        }
        let published: Vec<Arc<locker_client::wire::Event>> =
            events.iter().map(|(event, _)| event.clone()).collect();
        for id in self.history.keep_reporting(events) {
            let revision = i64::try_from(id / EVENTS_PER_REVISION).unwrap_or(i64::MAX);
            if let Some(record) = records.by_revision.get_mut(&revision) {
                record.live = record.live.saturating_sub(1);
                if record.live == 0 {
                    records.dead.insert(revision);
                }
            }
        }
        drop(records);
        if publish {
            if let Some((prefix, metrics)) = &self.own
                && key.starts_with(prefix.as_str())
            {
                for event in &published {
                    metrics.observe_event(event);
                }
            }
            self.history.publish(&published);
        }
    }

    /// A record was deleted: its events are no longer kept.
    pub(super) fn removed(&self, key: &str) {
        let mut records = self.records.lock();
        let Some(revision) = records.by_key.remove(key) else {
            return;
        };
        if let Some(record) = records.by_revision.remove(&revision) {
            records.bytes -= record.bytes;
        }
        records.dead.remove(&revision);
        records.deleting.remove(&revision);
        drop(records);
        let first = u64::try_from(revision).unwrap_or(0) * EVENTS_PER_REVISION;
        self.history.forget(first..first + EVENTS_PER_REVISION);
    }

    /// The `history-lost` key's value.
    pub(super) fn lost(&self, value: &[u8]) {
        let Some(id) = std::str::from_utf8(value)
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
        else {
            error!(
                "{:?} in etcd is not an event id",
                String::from_utf8_lossy(value)
            );
            return;
        };
        let mut records = self.records.lock();
        records.lost = records.lost.max(id);
        drop(records);
        self.history.note_lost(id);
    }

    /// Takes in the records as a full read of the prefix found them (`present`, in any order):
    /// forgets the ones gone, takes in the new ones in revision order.
    pub(super) fn reload(&self, mut present: Vec<(&str, i64, &[u8])>, publish: bool) {
        let gone: Vec<String> = {
            let records = self.records.lock();
            let keys: BTreeSet<&str> = present.iter().map(|(key, _, _)| *key).collect();
            records
                .by_key
                .keys()
                .filter(|key| !keys.contains(key.as_str()))
                .cloned()
                .collect()
        };
        for key in gone {
            self.removed(&key);
        }
        present.sort_by_key(|(_, revision, _)| *revision);
        for (key, revision, value) in present {
            self.take_in(key, revision, value, publish);
        }
    }

    /// The deletes a transaction carries: records whose events are no longer kept, then the
    /// oldest while the records pass the byte bound; and `history-lost` moved past them.
    pub(super) fn trim(&self, keys: &Keys) -> Trim {
        let records = self.records.lock();
        let mut revisions: Vec<i64> = records
            .dead
            .iter()
            .filter(|revision| !records.deleting.contains(revision))
            .take(TRIM_ROOM)
            .copied()
            .collect();
        let going = |revision: &i64| records.by_revision.get(revision).map_or(0, |r| r.bytes);
        let mut bytes = records.bytes
            - revisions.iter().map(going).sum::<u64>()
            - records.deleting.iter().map(going).sum::<u64>();
        for (revision, record) in &records.by_revision {
            if bytes <= self.bytes || revisions.len() >= TRIM_ROOM {
                break;
            }
            if records.deleting.contains(revision) || revisions.contains(revision) {
                continue;
            }
            revisions.push(*revision);
            bytes -= record.bytes;
        }
        let mut ops: Vec<TxnOp> = revisions
            .iter()
            .filter_map(|revision| records.by_revision.get(revision))
            .map(|record| TxnOp::delete(record.key.clone(), None))
            .collect();
        let trimmed = revisions
            .iter()
            .map(|revision| (u64::try_from(*revision).unwrap_or(0) + 1) * EVENTS_PER_REVISION - 1)
            .max();
        if let Some(lost) = trimmed.filter(|lost| *lost > records.lost) {
            ops.push(TxnOp::put(
                keys.history_lost(),
                lost.to_string().into_bytes(),
                None,
            ));
        }
        Trim { revisions, ops }
    }

    /// A transaction that trimmed `revisions` committed.
    pub(super) fn trimmed(&self, revisions: &[i64]) {
        self.records
            .lock()
            .deleting
            .extend(revisions.iter().copied());
    }

    /// Bytes of the records in etcd, as this server last saw them.
    #[cfg(test)]
    fn stored_bytes(&self) -> u64 {
        self.records.lock().bytes
    }
}

/// A transaction's events as wire events numbered by their place (see `codec::encode_record`).
pub(super) fn wire_events(
    events: &[crate::rules::events::Event],
    at: SystemTime,
) -> Vec<locker_client::wire::Event> {
    let at = crate::timefmt::rfc3339(at);
    events
        .iter()
        .enumerate()
        .map(|(index, event)| crate::history::to_wire(event, index as u64, &at))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Query;
    use locker_client::wire::Event as WireEvent;

    fn record(locks: &[&str]) -> Vec<u8> {
        let events: Vec<WireEvent> = locks
            .iter()
            .enumerate()
            .map(|(index, lock)| WireEvent {
                id: index as u64,
                at: "2026-11-30T00:00:00.000Z".into(),
                kind: "acquired".into(),
                lock: Some(lock.to_string()),
                ..WireEvent::default()
            })
            .collect();
        codec::encode_record(&events).expect("encodes")
    }

    fn ids(recorder: &Recorder) -> Vec<u64> {
        recorder
            .history
            .page(&Query {
                limit: 1000,
                ..Query::default()
            })
            .events
            .iter()
            .map(|e| e.id)
            .collect()
    }

    #[test]
    fn ids_follow_the_revisions_and_a_record_is_taken_in_once() {
        let recorder = Recorder::new(Bounds::default());
        recorder.take_in("/p/history/1-1", 7, &record(&["a", "b"]), false);
        recorder.take_in("/p/history/2-1", 9, &record(&["c"]), false);
        recorder.take_in("/p/history/1-1", 7, &record(&["a", "b"]), false);
        assert_eq!(ids(&recorder), [7000, 7001, 9000]);
        recorder.removed("/p/history/1-1");
        assert_eq!(ids(&recorder), [9000]);
        assert_eq!(recorder.stored_bytes(), record(&["c"]).len() as u64);
    }

    #[test]
    fn trimming_deletes_dead_records_then_the_oldest_past_the_byte_bound() {
        let keys = Keys::new("/p/");
        let one = record(&["busy"]).len() as u64;
        let recorder = Recorder::new(Bounds {
            bytes: one * 2,
            per_subject: 2,
        });
        // "calm" once, then "busy" four times: the first two busy records are dead.
        recorder.take_in("/p/history/1-1", 10, &record(&["calm"]), false);
        for (n, revision) in [11, 12, 13, 14].into_iter().enumerate() {
            recorder.take_in(
                &format!("/p/history/1-{}", n + 2),
                revision,
                &record(&["busy"]),
                false,
            );
        }
        assert_eq!(ids(&recorder), [10000, 13000, 14000]);
        let trim = recorder.trim(&keys);
        // Dead 11 and 12 first; then, over two records' bytes, the oldest (10).
        assert_eq!(trim.revisions, [11, 12, 10]);
        // Three deletes, and history-lost moved to 12999.
        assert_eq!(trim.ops.len(), 4);
        recorder.trimmed(&trim.revisions);
        assert!(
            recorder.trim(&keys).revisions.is_empty(),
            "already deleting"
        );
        for key in ["/p/history/1-1", "/p/history/1-2", "/p/history/1-3"] {
            recorder.removed(key);
        }
        assert_eq!(ids(&recorder), [13000, 14000]);
        assert_eq!(recorder.stored_bytes(), one * 2);
    }

    #[test]
    fn a_reload_forgets_records_gone_and_takes_in_new_ones_in_order() {
        let recorder = Recorder::new(Bounds::default());
        recorder.take_in("/p/history/1-1", 5, &record(&["a"]), false);
        recorder.take_in("/p/history/1-2", 6, &record(&["a"]), false);
        let two = record(&["b"]);
        let three = record(&["c", "d"]);
        recorder.reload(
            vec![
                ("/p/history/2-9", 9, &three[..]),
                ("/p/history/1-2", 6, &record(&["a"])[..]),
                ("/p/history/2-8", 8, &two[..]),
            ],
            false,
        );
        assert_eq!(ids(&recorder), [6000, 8000, 9000, 9001]);
        // 5000 went: a reader from before it missed it; one from 5000 on missed nothing.
        assert_eq!(recorder.history.gap(0), Some(6000));
        assert_eq!(recorder.history.gap(5000), None);
        assert_eq!(recorder.history.gap(6000), None);
    }

    #[test]
    fn a_server_that_starts_later_knows_what_was_trimmed_before_it() {
        let recorder = Recorder::new(Bounds::default());
        recorder.take_in("/p/history/2-9", 9, &record(&["a"]), false);
        assert_eq!(recorder.history.gap(0), None, "nothing trimmed so far");
        recorder.lost(b"8999");
        assert_eq!(recorder.history.gap(0), Some(9000));
        assert_eq!(recorder.history.gap(8999), None);
    }
}
