//! The history: every change as an event (see `rules::events`), numbered, kept within bounds,
//! paged for `GET /history`, and fed live to `GET /events`.
//!
//! [`History`] is what a store owns and the API reads: the kept events in memory (the last
//! [`Bounds::per_subject`] of each lock or pool, at most about [`Bounds::bytes`] in all) and a
//! broadcast channel of new ones. Where the events are made durable differs: the file store
//! appends them to a file of its own ([`file::HistoryFile`]) after each durable batch; the etcd
//! store writes them in the batch's transaction.

pub mod file;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use locker_client::wire::{Event, HistoryPage};
use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::rules::events as rules;

/// Default bound on the bytes of the kept history (and of its file).
pub const DEFAULT_BYTES: u64 = 16 << 20;
/// Default bound on the events kept per lock or pool.
pub const DEFAULT_PER_SUBJECT: usize = 1_000;
/// How far a live reader may fall behind before it is dropped (and resumes).
pub const LIVE_BUFFER: usize = 1_024;
/// The most events one page holds.
pub const MAX_PAGE: usize = 1_000;

/// How much history is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// About this many bytes of events (as JSON lines) in all; 0: no history.
    pub bytes: u64,
    /// At most this many events per lock or pool.
    pub per_subject: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            bytes: DEFAULT_BYTES,
            per_subject: DEFAULT_PER_SUBJECT,
        }
    }
}

impl Bounds {
    pub fn enabled(&self) -> bool {
        self.bytes > 0 && self.per_subject > 0
    }
}

/// What a page asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    /// Events after this id.
    pub since: u64,
    /// Only this lock's events.
    pub lock: Option<String>,
    /// Only this pool's events.
    pub pool: Option<String>,
    /// At most this many.
    pub limit: usize,
    /// The last `limit` events matching, rather than the first after `since`.
    pub last: bool,
}

impl Query {
    pub fn matches(&self, event: &Event) -> bool {
        (self.lock.is_none() || event.lock == self.lock)
            && (self.pool.is_none() || event.pool == self.pool)
    }
}

/// An event with its size as a line of the history file.
pub type Sized = (Arc<Event>, u64);

/// A kept event and its size as a line of the history file.
#[derive(Debug)]
struct Kept {
    event: Arc<Event>,
    bytes: u64,
}

/// The lock or pool an event is about, for the per-subject bound.
fn subject(event: &Event) -> (bool, String) {
    match (&event.lock, &event.pool) {
        (Some(lock), _) => (false, lock.clone()),
        (None, Some(pool)) => (true, pool.clone()),
        (None, None) => (false, String::new()),
    }
}

#[derive(Debug, Default)]
struct Inner {
    by_id: BTreeMap<u64, Kept>,
    per_subject: HashMap<(bool, String), VecDeque<u64>>,
    bytes: u64,
    next_id: u64,
    /// The highest id no longer kept: dropped for a bound (a busy lock's oldest events, or
    /// the oldest of all), or trimmed before this server started. A reader that last saw an
    /// older event missed some, whatever the oldest kept event (a quiet lock keeps its own).
    lost: u64,
    /// The ids dropped by the call under way, for [`History::keep_reporting`].
    dropped: Vec<u64>,
}

impl Inner {
    /// Notes that `id` is no longer kept.
    fn note_dropped(&mut self, id: u64) {
        self.lost = self.lost.max(id);
        self.dropped.push(id);
    }

    fn keep(&mut self, event: Arc<Event>, bytes: u64, per_subject: usize) {
        let id = event.id;
        self.next_id = self.next_id.max(id + 1);
        let ids = self.per_subject.entry(subject(&event)).or_default();
        ids.push_back(id);
        let dropped = if ids.len() > per_subject {
            ids.pop_front()
        } else {
            None
        };
        self.bytes += bytes;
        self.by_id.insert(id, Kept { event, bytes });
        if let Some(old) = dropped
            && let Some(kept) = self.by_id.remove(&old)
        {
            self.bytes -= kept.bytes;
            self.note_dropped(old);
        }
    }

    /// Forgets the kept events with ids in `ids`.
    fn forget(&mut self, ids: std::ops::Range<u64>) {
        let gone: Vec<u64> = self.by_id.range(ids).map(|(id, _)| *id).collect();
        for id in gone {
            if let Some(kept) = self.by_id.remove(&id) {
                self.bytes -= kept.bytes;
                let key = subject(&kept.event);
                if let Some(ids) = self.per_subject.get_mut(&key) {
                    ids.retain(|kept| *kept != id);
                    if ids.is_empty() {
                        self.per_subject.remove(&key);
                    }
                }
                self.note_dropped(id);
            }
        }
    }

    /// Drops the oldest events until at most `bytes` are kept.
    fn trim_to(&mut self, bytes: u64) {
        while self.bytes > bytes {
            let Some((_, kept)) = self.by_id.pop_first() else {
                break;
            };
            self.bytes -= kept.bytes;
            let key = subject(&kept.event);
            if let Some(ids) = self.per_subject.get_mut(&key) {
                // The oldest of all is the oldest of its lock: the front, found at once (a
                // `retain` here made a rewrite's trim hold the history for milliseconds).
                if ids.front() == Some(&kept.event.id) {
                    ids.pop_front();
                } else {
                    ids.retain(|id| *id != kept.event.id);
                }
                if ids.is_empty() {
                    self.per_subject.remove(&key);
                }
            }
            self.note_dropped(kept.event.id);
        }
    }
}

/// The kept history and the live feed of new events.
#[derive(Debug)]
pub struct History {
    bounds: Bounds,
    inner: Mutex<Inner>,
    live: broadcast::Sender<Arc<Event>>,
    /// Set when the server stops: live readers end.
    closed: tokio::sync::watch::Sender<bool>,
}

impl History {
    pub fn new(bounds: Bounds) -> Self {
        History {
            bounds,
            inner: Mutex::new(Inner {
                next_id: 1,
                ..Inner::default()
            }),
            live: broadcast::channel(LIVE_BUFFER).0,
            closed: tokio::sync::watch::channel(false).0,
        }
    }

    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    /// Numbers the rules' events of one durable batch, in order, from the next free id.
    pub fn number(&self, events: &[rules::Event], at: SystemTime) -> Vec<Arc<Event>> {
        let mut inner = self.inner.lock();
        let at = crate::timefmt::rfc3339(at);
        events
            .iter()
            .map(|event| {
                let id = inner.next_id;
                inner.next_id += 1;
                Arc::new(to_wire(event, id, &at))
            })
            .collect()
    }

    /// Keeps events that are durable (or loaded), and trims what the bounds allow no more.
    /// Each comes with its size as a line of the history file.
    pub fn keep(&self, events: impl IntoIterator<Item = Sized>) {
        self.keep_reporting(events);
    }

    /// [`History::keep`], answering the ids of the events it dropped (older ones, or some of
    /// these) to stay within the bounds.
    pub fn keep_reporting(&self, events: impl IntoIterator<Item = Sized>) -> Vec<u64> {
        let mut inner = self.inner.lock();
        inner.dropped.clear();
        for (event, bytes) in events {
            inner.keep(event, bytes, self.bounds.per_subject);
        }
        if inner.bytes > self.bounds.bytes {
            inner.trim_to(self.bounds.bytes / 2);
        }
        std::mem::take(&mut inner.dropped)
    }

    /// Drops the oldest events until at most half the byte bound is kept: a rewrite of the
    /// history file writes only that, so the file grows by half its bound before the next one
    /// (each appended byte is rewritten at most about once).
    pub fn trim_to_half(&self) {
        let mut inner = self.inner.lock();
        inner.trim_to(self.bounds.bytes / 2);
        inner.dropped.clear();
    }

    /// Forgets the kept events with ids in `ids` (their record is gone from the store).
    pub fn forget(&self, ids: std::ops::Range<u64>) {
        let mut inner = self.inner.lock();
        inner.forget(ids);
        inner.dropped.clear();
    }

    /// Notes that every event up to `id` is gone (what the store knows was trimmed before this
    /// server started).
    pub fn note_lost(&self, id: u64) {
        let mut inner = self.inner.lock();
        inner.lost = inner.lost.max(id);
    }

    /// Whether a reader resuming after `since` missed events that are no longer kept: the
    /// oldest kept id if so.
    pub fn gap(&self, since: u64) -> Option<u64> {
        let inner = self.inner.lock();
        let oldest = inner.by_id.keys().next().copied()?;
        (inner.lost > since).then_some(oldest)
    }

    /// Sends events to the live readers (after they are kept, so a reader that resumes from
    /// the kept history finds them).
    pub fn publish(&self, events: &[Arc<Event>]) {
        for event in events {
            // No receivers is not an error worth knowing.
            let _ = self.live.send(event.clone());
        }
    }

    /// Live events from now on; subscribe before reading the kept ones, so nothing falls
    /// between the two.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.live.subscribe()
    }

    /// Completes once the server stops.
    pub fn closed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closed.subscribe()
    }

    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Every kept event in order, with their sizes (for rewriting the history file).
    pub fn kept(&self) -> Vec<Sized> {
        let inner = self.inner.lock();
        inner
            .by_id
            .values()
            .map(|kept| (kept.event.clone(), kept.bytes))
            .collect()
    }

    /// Bytes of the kept events.
    pub fn kept_bytes(&self) -> u64 {
        self.inner.lock().bytes
    }

    /// A page of the kept history.
    pub fn page(&self, query: &Query) -> HistoryPage {
        let inner = self.inner.lock();
        let limit = query.limit.clamp(1, MAX_PAGE);
        let oldest = inner.by_id.keys().next().copied().unwrap_or(0);
        let after = inner
            .by_id
            .range(query.since.saturating_add(1)..)
            .map(|(_, kept)| &kept.event)
            .filter(|event| query.matches(event));
        let (events, more): (Vec<Event>, bool) = if query.last {
            let mut last: Vec<Event> = after
                .rev()
                .take(limit)
                .map(|event| (**event).clone())
                .collect();
            last.reverse();
            (last, false)
        } else {
            let mut page: Vec<Event> = Vec::with_capacity(limit.min(64));
            let mut more = false;
            for event in after {
                if page.len() == limit {
                    more = true;
                    break;
                }
                page.push((**event).clone());
            }
            (page, more)
        };
        let next = events.last().map_or(query.since, |event| event.id);
        let lost = inner.lost;
        HistoryPage {
            events,
            next,
            more,
            oldest,
            lost,
        }
    }

    /// The id the next event gets.
    pub fn next_id(&self) -> u64 {
        self.inner.lock().next_id
    }
}

/// The wire form of a rules event.
pub fn to_wire(event: &rules::Event, id: u64, at: &str) -> Event {
    let (lock, pool) = match event.pool {
        true => (None, Some(event.name.clone())),
        false => (Some(event.name.clone()), None),
    };
    let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Event {
        id,
        at: at.to_string(),
        kind: event.kind.as_str().to_string(),
        lock,
        pool,
        item: event.item.clone(),
        key: event.key.clone(),
        requestor: event.requestor.clone(),
        generation: event.generation,
        count: event.count,
        info: event
            .info
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        waited_ms: event.waited.map(millis),
        held_ms: event.held.map(millis),
        slots: event.slots,
        by: event.by.clone(),
    }
}
