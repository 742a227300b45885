//! What changed: the events of the history, found by comparing a lock or pool before and after
//! one operation.
//!
//! The rules change a lock in many places (a grant, a release, a queue served, a lease run
//! out); rather than have each of them report itself, [`LockTable::apply_recorded`] keeps the
//! targets an operation may touch as they were (sharing them costs a reference count), applies
//! the operation, and [`changes`] compares. What the operation was says why a holding went
//! (released, expired, force-released, reclaimed); the comparison says what went. So the
//! history cannot miss a change the rules make, and records nothing for a refused one.
//!
//! Pure like the rest of the rules: the store gives each event its number and time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Acquire, Holder, Info, Lock, LockTable, Op, Pool, PoolChange, Target, WaiterId};

/// What happened to a lock or pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
    /// A request is waiting in the queue.
    Queued,
    /// A requestor holds (or holds once more: see [`Event::count`]); for a pool, claimed an item.
    Acquired,
    /// A requestor released (or released once: see [`Event::count`]).
    Released,
    /// Every holding was taken away by a force release.
    ForceReleased,
    /// A lease ran out.
    Expired,
    /// The holding's build ended (`release_when_build_ends`).
    Reclaimed,
    /// A waiter's wait ran out before it was served.
    TimedOut,
    /// A waiter's client went away before it was served (or before its grant reached it).
    Withdrawn,
    /// The lock's slot count changed.
    SlotsChanged,
    /// An item was added to a pool.
    ItemAdded,
    /// An item was removed from a pool.
    ItemRemoved,
    /// An item's metadata was replaced.
    ItemUpdated,
}

impl EventKind {
    /// The name on the wire and in the history file.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Queued => "queued",
            EventKind::Acquired => "acquired",
            EventKind::Released => "released",
            EventKind::ForceReleased => "force-released",
            EventKind::Expired => "expired",
            EventKind::Reclaimed => "reclaimed",
            EventKind::TimedOut => "timed-out",
            EventKind::Withdrawn => "withdrawn",
            EventKind::SlotsChanged => "slots-changed",
            EventKind::ItemAdded => "item-added",
            EventKind::ItemRemoved => "item-removed",
            EventKind::ItemUpdated => "item-updated",
        }
    }

    /// Every kind, for parsing and documentation.
    pub const ALL: [EventKind; 12] = [
        EventKind::Queued,
        EventKind::Acquired,
        EventKind::Released,
        EventKind::ForceReleased,
        EventKind::Expired,
        EventKind::Reclaimed,
        EventKind::TimedOut,
        EventKind::Withdrawn,
        EventKind::SlotsChanged,
        EventKind::ItemAdded,
        EventKind::ItemRemoved,
        EventKind::ItemUpdated,
    ];

    pub fn parse(text: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// Whether the kind ends a holding (the requestor no longer holds).
    pub fn ends_holding(self) -> bool {
        matches!(
            self,
            EventKind::Released
                | EventKind::ForceReleased
                | EventKind::Expired
                | EventKind::Reclaimed
                | EventKind::Withdrawn
        )
    }
}

/// One change to one lock or pool item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// The lock, or the pool when `pool` is set.
    pub name: String,
    /// Whether `name` is a pool's.
    pub pool: bool,
    pub item: Option<String>,
    pub key: Option<String>,
    pub requestor: Option<String>,
    /// The holding's fencing generation.
    pub generation: Option<u64>,
    /// How many times the requestor holds after the change (an acquire or release of a hold
    /// held more than once); `None` when it no longer holds.
    pub count: Option<u64>,
    /// The holding's (or the waiting request's) info: the build, for Concourse.
    pub info: Info,
    /// How long the request waited in the queue before it was served (or gave up).
    pub waited: Option<Duration>,
    /// How long the holding was held, for a holding that ended.
    pub held: Option<Duration>,
    /// The slot count, for a slot change.
    pub slots: Option<u32>,
    /// Who asked, for a force release: the user and address the server saw.
    pub by: Option<String>,
}

impl Event {
    fn new(kind: EventKind, target: &Target, item: Option<&str>) -> Self {
        Event {
            kind,
            name: target.name().to_string(),
            pool: matches!(target, Target::Pool(_)),
            item: item.map(str::to_string),
            key: None,
            requestor: None,
            generation: None,
            count: None,
            info: Info::new(),
            waited: None,
            held: None,
            slots: None,
            by: None,
        }
    }
}

/// Why waiters leave a queue unserved in a cancel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Leaving {
    /// The client went away (or the server is stopping).
    #[default]
    Withdrawn,
    /// The wait the request asked for ran out.
    TimedOut,
}

/// A lock or pool as it was before an operation (shared, not copied).
#[derive(Clone, Debug)]
pub enum Snapshot {
    Lock(Option<Arc<Lock>>),
    Pool(Option<Arc<Pool>>),
}

impl LockTable {
    /// The targets `op` may change, as they are now: the op's own, or for an expiry every lock
    /// and pool with a lease run out by `now`.
    pub fn snapshot_for(&self, op: &Op, now: SystemTime) -> Vec<(Target, Snapshot)> {
        let targets: Vec<Target> = match op.target() {
            Some(target) => vec![target],
            None => self.expiring(now).cloned().collect(),
        };
        targets
            .into_iter()
            .map(|target| {
                let snapshot = self.snapshot(&target);
                (target, snapshot)
            })
            .collect()
    }

    fn snapshot(&self, target: &Target) -> Snapshot {
        match target {
            Target::Lock(name) => Snapshot::Lock(self.locks.get(name).cloned()),
            Target::Pool(name) => Snapshot::Pool(self.pools.get(name).cloned()),
        }
    }

    /// Applies `op` like [`LockTable::apply`] and appends what it changed to `events`.
    pub fn apply_recorded(
        &mut self,
        op: &Op,
        now: SystemTime,
        events: &mut Vec<Event>,
    ) -> super::Effect {
        let before = self.snapshot_for(op, now);
        let effect = self.apply(op, now);
        if effect.changes_holdings() || effect.is_queued() || op.cancelled_waiter().is_some() {
            for (target, before) in before {
                let after = self.snapshot(&target);
                changes(op, &target, &before, &after, now, events);
            }
        }
        effect
    }
}

/// Why holdings that went in `op` went, and who asked.
fn ending(op: &Op) -> (EventKind, Option<&str>) {
    match op {
        Op::ForceRelease { by, .. } => (EventKind::ForceReleased, by.as_deref()),
        Op::Expire => (EventKind::Expired, None),
        Op::Reclaim(_) => (EventKind::Reclaimed, None),
        Op::Revoke(_) => (EventKind::Withdrawn, None),
        Op::Pool {
            change: PoolChange::Release { key: None, by, .. },
            ..
        } if by.is_some() => (EventKind::ForceReleased, by.as_deref()),
        _ => (EventKind::Released, None),
    }
}

/// Why waiters that left unserved in `op` left.
fn leaving(op: &Op) -> EventKind {
    match op {
        Op::Cancel {
            leaving: Leaving::TimedOut,
            ..
        }
        | Op::Pool {
            change:
                PoolChange::Cancel {
                    leaving: Leaving::TimedOut,
                    ..
                },
            ..
        } => EventKind::TimedOut,
        _ => EventKind::Withdrawn,
    }
}

/// Appends the changes between `before` and `after` of `target` that `op` made at `now`.
pub fn changes(
    op: &Op,
    target: &Target,
    before: &Snapshot,
    after: &Snapshot,
    now: SystemTime,
    events: &mut Vec<Event>,
) {
    match (before, after) {
        (Snapshot::Lock(before), Snapshot::Lock(after)) => {
            let before = before.as_deref();
            let after = after.as_deref();
            let side = |lock: Option<&Lock>| Side {
                holdings: holdings(None, lock.map_or(&[][..], |l| &l.holders)),
                queue: lock.map_or_else(Vec::new, |l| {
                    l.queued_since()
                        .map(|(id, request, since)| Queued {
                            id,
                            item: None,
                            request: request.clone(),
                            since,
                        })
                        .collect()
                }),
            };
            compare(op, target, side(before), side(after), now, events);
            let slots = |lock: Option<&Lock>| lock.map(|l| l.slots);
            let changed = match (slots(before), slots(after)) {
                (Some(was), Some(is)) => was != is,
                (None, Some(is)) => is != 1,
                _ => false,
            };
            if changed {
                let mut event = Event::new(EventKind::SlotsChanged, target, None);
                event.slots = slots(after);
                events.push(event);
            }
        }
        (Snapshot::Pool(before), Snapshot::Pool(after)) => {
            let before = before.as_deref();
            let after = after.as_deref();
            items_changed(target, before, after, true, events);
            let side = |pool: Option<&Pool>| Side {
                holdings: pool.map_or_else(BTreeMap::new, |p| {
                    p.items
                        .iter()
                        .flat_map(|(name, item)| holdings(Some(name), item.holder.as_slice()))
                        .collect()
                }),
                queue: pool.map_or_else(Vec::new, |p| {
                    p.queued_since()
                        .map(|(id, item, request, since)| Queued {
                            id,
                            item: item.map(str::to_string),
                            request: request.clone(),
                            since,
                        })
                        .collect()
                }),
            };
            compare(op, target, side(before), side(after), now, events);
            items_changed(target, before, after, false, events);
        }
        _ => {}
    }
}

/// Items added (`added`) or else removed or given new metadata: additions come before the
/// claims of an item added claimed, removals after the end of a removed item's claim.
fn items_changed(
    target: &Target,
    before: Option<&Pool>,
    after: Option<&Pool>,
    added: bool,
    events: &mut Vec<Event>,
) {
    let empty = BTreeMap::new();
    let was = before.map_or(&empty, |p| &p.items);
    let is = after.map_or(&empty, |p| &p.items);
    if added {
        for name in is.keys().filter(|name| !was.contains_key(*name)) {
            events.push(Event::new(EventKind::ItemAdded, target, Some(name)));
        }
        return;
    }
    for (name, item) in was {
        match is.get(name) {
            None => events.push(Event::new(EventKind::ItemRemoved, target, Some(name))),
            Some(now) if now.metadata != item.metadata => {
                events.push(Event::new(EventKind::ItemUpdated, target, Some(name)));
            }
            Some(_) => {}
        }
    }
}

/// A requestor's hold, identified by (item, key, requestor, generation).
type HoldingId = (Option<String>, String, String, u64);

struct Holding {
    count: u64,
    info: Info,
    acquired_at: SystemTime,
}

struct Queued {
    id: WaiterId,
    item: Option<String>,
    request: Acquire,
    since: Option<SystemTime>,
}

/// One side of the comparison: every requestor's hold, and the queue in order.
struct Side {
    holdings: BTreeMap<HoldingId, Holding>,
    queue: Vec<Queued>,
}

fn holdings(item: Option<&String>, holders: &[Holder]) -> BTreeMap<HoldingId, Holding> {
    holders
        .iter()
        .flat_map(|holder| {
            holder.requestors.iter().map(move |(requestor, hold)| {
                (
                    (
                        item.cloned(),
                        holder.key.clone(),
                        requestor.clone(),
                        holder.generation,
                    ),
                    Holding {
                        count: hold.count,
                        info: holder.info.clone(),
                        acquired_at: holder.acquired_at,
                    },
                )
            })
        })
        .collect()
}

fn compare(
    op: &Op,
    target: &Target,
    before: Side,
    after: Side,
    now: SystemTime,
    events: &mut Vec<Event>,
) {
    let since = |at: SystemTime| now.duration_since(at).ok();
    let (ended, by) = ending(op);
    let holding_event = |kind, id: &HoldingId, holding: &Holding| {
        let (item, key, requestor, generation) = id;
        let mut event = Event::new(kind, target, item.as_deref());
        event.key = Some(key.clone());
        event.requestor = Some(requestor.clone());
        event.generation = Some(*generation);
        event.info = holding.info.clone();
        event
    };
    // Holdings that went, or were released once of several times.
    for (id, was) in &before.holdings {
        match after.holdings.get(id) {
            None => {
                let mut event = holding_event(ended, id, was);
                event.held = since(was.acquired_at);
                event.by = by.map(str::to_string);
                events.push(event);
            }
            Some(is) if is.count < was.count => {
                let mut event = holding_event(EventKind::Released, id, is);
                event.count = Some(is.count);
                events.push(event);
            }
            Some(_) => {}
        }
    }
    // Waiters that left the queue: served (matched below by key and requestor) or not.
    let mut left: Vec<&Queued> = before
        .queue
        .iter()
        .filter(|w| !after.queue.iter().any(|a| a.id == w.id))
        .collect();
    // Holdings that came, or were acquired once more.
    for (id, is) in &after.holdings {
        let counted_up = match before.holdings.get(id) {
            None => true,
            Some(was) => is.count > was.count,
        };
        if !counted_up {
            continue;
        }
        let (item, key, requestor, _) = id;
        let served = left.iter().position(|w| {
            &w.request.key == key
                && &w.request.requestor == requestor
                && (w.item.is_none() || w.item == *item)
        });
        let mut event = holding_event(EventKind::Acquired, id, is);
        event.count = Some(is.count);
        if let Some(index) = served {
            let waiter = left.remove(index);
            event.waited = waiter.since.and_then(since);
        }
        events.push(event);
    }
    let waiter_event = |kind, waiter: &Queued| {
        let mut event = Event::new(kind, target, waiter.item.as_deref());
        event.key = Some(waiter.request.key.clone());
        event.requestor = Some(waiter.request.requestor.clone());
        event.info = waiter.request.info.clone();
        event
    };
    let gave_up = leaving(op);
    for waiter in left {
        let mut event = waiter_event(gave_up, waiter);
        event.waited = waiter.since.and_then(since);
        events.push(event);
    }
    for waiter in after
        .queue
        .iter()
        .filter(|w| !before.queue.iter().any(|b| b.id == w.id))
    {
        events.push(waiter_event(EventKind::Queued, waiter));
    }
}
