//! The lock rules: acquire, release, reentrancy counts per requestor, FIFO wait queues, slots,
//! fencing generations and lease expiry.
//!
//! Pure and deterministic: no I/O and no clock (callers pass `now`), so the property tests can
//! check it against a model and every backend gets the same semantics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use litemap::LiteMap;
use rpds::QueueSync;
use serde::{Deserialize, Serialize};

pub mod events;
pub mod pool;

pub use pool::{ClaimOutcome, Item, ItemGrant, Pool, PoolChange, PoolOutcome};

/// Identifies one queued waiting acquire; chosen by the caller, unique per table.
pub type WaiterId = u64;

/// Holder info: a flat map of short strings (team, pipeline, job, build, URL ...). A sorted
/// vector rather than a tree: a handful of entries, and a tree node costs ~500 bytes per lock.
pub type Info = LiteMap<String, String>;

/// Requestor name → what it holds under one key; usually a single entry (see [`Info`]).
pub type Requestors = LiteMap<String, RequestorHold>;

/// One acquire request, as the rules see it (already validated by the caller).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acquire {
    pub key: String,
    pub requestor: String,
    /// Lease length; `None` means the hold never expires.
    pub ttl: Option<Duration>,
    /// Replaces the holding's info when not empty.
    pub info: Info,
    /// Number of holders with distinct keys the lock admits; `None` means "whatever the lock has"
    /// (1 for a free lock).
    pub slots: Option<u32>,
    /// Release this hold once this Concourse build has finished (opt-in). Boxed like
    /// [`RequestorHold::release_with_build`]: queued waiters pay for the field's size.
    pub release_with_build: Option<Box<BuildRef>>,
    /// A lease renewal: when this requestor already holds under this key, refresh its lease
    /// without counting up (one release still frees it). Otherwise an ordinary acquire.
    pub renew: bool,
}

/// A Concourse build, as named in holder info: by id, or by team, pipeline, job and build name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BuildRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where a person can see the build (for logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl BuildRef {
    /// Reads the build from holder info (`build_id`, or `team`, `pipeline`, `job` and
    /// `build_name`/`build`). `None` when the info does not name a build.
    pub fn from_info(info: &Info) -> Option<BuildRef> {
        let get = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| info.get(*n).filter(|v| !v.is_empty()).cloned())
        };
        let build = BuildRef {
            id: get(&["build_id"]),
            team: get(&["team"]),
            pipeline: get(&["pipeline"]),
            job: get(&["job"]),
            name: get(&["build_name", "build"]),
            url: get(&["build_url", "url"]),
        };
        let named = build.team.is_some()
            && build.pipeline.is_some()
            && build.job.is_some()
            && build.name.is_some();
        (build.id.is_some() || named).then_some(build)
    }
}

/// What one requestor holds under its holder's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestorHold {
    pub count: u64,
    #[serde(
        default,
        with = "crate::timefmt::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<SystemTime>,
    /// Released once this build has finished (see `release_when_build_ends`). Boxed: most
    /// holds have none, and every hold pays for the field's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_with_build: Option<Box<BuildRef>>,
}

/// One holding of a lock: a key, the requestors sharing it, and its fencing generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub key: String,
    pub generation: u64,
    #[serde(with = "crate::timefmt")]
    pub acquired_at: SystemTime,
    #[serde(default, skip_serializing_if = "LiteMap::is_empty")]
    pub info: Info,
    pub requestors: Requestors,
}

impl Holder {
    /// A new holding under `key`, with no requestors yet.
    fn new(key: &str, generation: u64, now: SystemTime) -> Self {
        Holder {
            key: key.to_string(),
            generation,
            acquired_at: now,
            info: Info::new(),
            requestors: Requestors::with_capacity(1),
        }
    }

    /// Adds `request`'s requestor to this holding (or counts it up, or renews its lease).
    fn add(&mut self, request: &Acquire, now: SystemTime) -> Grant {
        if !request.info.is_empty() {
            self.info = request.info.clone();
        }
        let hold = self
            .requestors
            .entry(request.requestor.clone())
            .or_insert(RequestorHold {
                count: 0,
                expires_at: None,
                release_with_build: None,
            });
        if !(request.renew && hold.count > 0) {
            hold.count += 1;
        }
        hold.expires_at = request.ttl.map(|ttl| now + ttl);
        hold.release_with_build = request.release_with_build.clone();
        Grant {
            generation: self.generation,
            count: hold.count,
        }
    }

    /// Requestor name → count, the shape of the original API's `locked_by`.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.requestors
            .iter()
            .map(|(name, hold)| (name.clone(), hold.count))
            .collect()
    }

    /// The earliest lease expiry among this holding's requestors.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.requestors.values().filter_map(|h| h.expires_at).min()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Waiter {
    id: WaiterId,
    request: Acquire,
    /// When it was queued; `None` when a backend restored it without the time.
    since: Option<SystemTime>,
}

/// One named lock: up to `slots` holders with distinct keys, and the queue of waiters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    #[serde(default = "one_slot", skip_serializing_if = "is_one_slot")]
    pub slots: u32,
    pub holders: Vec<Holder>,
    /// Waiters, in arrival order. Not in the state file (a waiter lives only as long as its
    /// connection); the etcd store keeps them in its own encoding ([`Lock::queued`]), since
    /// servers share the queue there.
    ///
    /// A persistent queue: a lock is copied on write while the committed table shares it (see
    /// [`LockTable`]), and copying shares the queue too, so the n-th waiter costs O(1) to queue
    /// rather than a copy of the n-1 before it.
    #[serde(skip)]
    queue: QueueSync<Waiter>,
}

fn one_slot() -> u32 {
    1
}

fn is_one_slot(slots: &u32) -> bool {
    *slots == 1
}

impl Lock {
    fn new(slots: u32) -> Self {
        Lock {
            slots: slots.max(1),
            holders: Vec::new(),
            queue: QueueSync::new_sync(),
        }
    }

    /// A single-slot lock with one holding, as loaded from the original locker's file.
    pub fn held_by(holder: Holder) -> Self {
        Lock {
            slots: 1,
            holders: vec![holder],
            queue: QueueSync::new_sync(),
        }
    }

    pub fn is_held(&self) -> bool {
        !self.holders.is_empty()
    }

    pub fn waiters(&self) -> usize {
        self.queue.len()
    }

    /// Queued waiters in arrival order, for backends that share the queue between servers.
    pub fn queued(&self) -> impl Iterator<Item = (WaiterId, &Acquire)> {
        self.queue.iter().map(|w| (w.id, &w.request))
    }

    /// Queued waiters in arrival order with when each was queued (when known), for the views
    /// of who is waiting.
    pub fn queued_since(&self) -> impl Iterator<Item = (WaiterId, &Acquire, Option<SystemTime>)> {
        self.queue.iter().map(|w| (w.id, &w.request, w.since))
    }

    /// Rebuilds a lock with its queue, as a backend that shares the queue stored it: each
    /// waiter with when it was queued, if the backend kept that.
    pub fn restore(
        slots: u32,
        holders: Vec<Holder>,
        queue: Vec<(WaiterId, Acquire, Option<SystemTime>)>,
    ) -> Self {
        Lock {
            slots: slots.max(1),
            holders,
            queue: queue
                .into_iter()
                .map(|(id, request, since)| Waiter { id, request, since })
                .collect(),
        }
    }

    /// Keys of the current holders, oldest holding first.
    pub fn keys(&self) -> Vec<String> {
        self.holders.iter().map(|h| h.key.clone()).collect()
    }

    fn is_unused(&self) -> bool {
        self.holders.is_empty() && self.queue.is_empty()
    }

    /// The earliest lease expiry of any hold of this lock.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.holders.iter().filter_map(Holder::expires_at).min()
    }

    /// Distinct requestors holding under `key`, counting queued requests that would add one.
    fn requestors_under(&self, key: &str) -> usize {
        let Some(holder) = self.holders.iter().find(|h| h.key == key) else {
            return 0;
        };
        let queued = self
            .queue
            .iter()
            .filter(|w| {
                w.request.key == key && !holder.requestors.contains_key(&w.request.requestor)
            })
            .count();
        holder.requestors.len() + queued
    }

    /// Whether granting `request` would give its key's holding one requestor too many.
    fn over_requestor_limit(&self, request: &Acquire, limit: usize) -> bool {
        let known = self
            .holders
            .iter()
            .any(|h| h.key == request.key && h.requestors.contains_key(&request.requestor));
        !known && self.requestors_under(&request.key) >= limit
    }

    fn holder_index(&self, key: &str) -> Option<usize> {
        self.holders.iter().position(|h| h.key == key)
    }

    /// Reentrant acquire: this requestor already holds a count under this key.
    fn already_holds(&self, request: &Acquire) -> bool {
        self.holders.iter().any(|h| {
            h.key == request.key
                && h.requestors
                    .get(&request.requestor)
                    .is_some_and(|r| r.count > 0)
        })
    }

    /// Whether the lock has room for this request, ignoring the queue.
    fn admits(&self, request: &Acquire) -> bool {
        self.holder_index(&request.key).is_some() || self.holders.len() < self.slots as usize
    }

    fn grant(&mut self, request: &Acquire, now: SystemTime, next_generation: &mut u64) -> Grant {
        let index = match self.holder_index(&request.key) {
            Some(index) => index,
            None => {
                let generation = *next_generation;
                *next_generation += 1;
                // Most locks have one holder; a first `push` would make room for four.
                if self.holders.capacity() == 0 {
                    self.holders.reserve_exact(1);
                }
                self.holders
                    .push(Holder::new(&request.key, generation, now));
                self.holders.len() - 1
            }
        };
        self.holders[index].add(request, now)
    }

    /// Grants queued waiters in arrival order for as long as the front one fits.
    fn serve_queue(
        &mut self,
        name: &str,
        now: SystemTime,
        next_generation: &mut u64,
        grants: &mut Vec<WaiterGrant>,
    ) {
        while let Some(waiter) = self
            .queue
            .peek()
            .filter(|w| self.admits(&w.request))
            .cloned()
        {
            self.queue.dequeue_mut();
            let grant = self.grant(&waiter.request, now, next_generation);
            grants.push(WaiterGrant {
                waiter: waiter.id,
                name: name.to_string(),
                item: None,
                key: waiter.request.key,
                requestor: waiter.request.requestor,
                grant,
            });
        }
    }

    /// Removes one requestor's hold from a holding, dropping the holding once it is empty.
    fn drop_requestor(&mut self, index: usize, requestor: &str) -> bool {
        let removed = self.holders[index].requestors.remove(requestor).is_some();
        if self.holders[index].requestors.is_empty() {
            self.holders.remove(index);
        }
        removed
    }
}

impl AsRef<Lock> for Lock {
    fn as_ref(&self) -> &Lock {
        self
    }
}

/// A successful acquire: the holding's fencing generation and the requestor's count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub generation: u64,
    pub count: u64,
}

impl WaiterGrant {
    /// The lock or pool granted.
    pub fn target(&self) -> Target {
        Target::of(&self.name, self.item.as_ref())
    }
}

/// A queued waiter that a release, expiry or cancel let in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaiterGrant {
    pub waiter: WaiterId,
    /// The lock, or with `item` the pool.
    pub name: String,
    /// The pool item granted; `None` for a lock.
    pub item: Option<String>,
    pub key: String,
    pub requestor: String,
    pub grant: Grant,
}

/// Who holds a lock, for conflict and timeout messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub keys: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcquireOutcome {
    Granted(Grant),
    /// Not grantable now; the waiter was put at the back of the queue.
    Queued,
    /// Not grantable now and the caller does not wait.
    Held(Conflict),
    /// The request names a slot count other than the held lock's.
    SlotsMismatch {
        slots: u32,
    },
    /// Refused without a change: granting or queueing it would pass one of the [`Limits`].
    OverLimit(Limit),
}

/// Bounds on how far clients can grow the table, so that one client cannot exhaust the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Distinct locks (held, or with someone waiting).
    pub locks: usize,
    /// Distinct requestors sharing one holding (one key of one lock).
    pub requestors: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            locks: usize::MAX,
            requestors: usize::MAX,
        }
    }
}

/// Which of the [`Limits`] a request ran into, with its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Locks(usize),
    Requestors(usize),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The lock was held under this key; `changed` says whether the requestor held a count.
    Released {
        changed: bool,
        grants: Vec<WaiterGrant>,
    },
    /// Nobody holds the lock: releasing it is a no-op.
    NotHeld,
    /// Held, but not under the given key.
    WrongKey(Conflict),
}

/// What a force release took away, and whom it let in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForceRelease {
    /// The lock.
    pub name: String,
    pub previous: Vec<Holder>,
    pub grants: Vec<WaiterGrant>,
}

/// One requestor's hold that ran out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expired {
    /// The lock, or with `item` the pool.
    pub name: String,
    pub item: Option<String>,
    pub key: String,
    pub requestor: String,
}

/// Leases that ran out, and the waiters they let in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expiry {
    pub expired: Vec<Expired>,
    pub grants: Vec<WaiterGrant>,
}

/// What a change is about: a lock or a pool, by name. Locks and pools have separate names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Lock(String),
    Pool(String),
}

impl Target {
    /// The lock's or the pool's name.
    pub fn name(&self) -> &str {
        match self {
            Target::Lock(name) | Target::Pool(name) => name,
        }
    }

    /// The target of a grant, an expired hold or a reclaim: the pool when an item is named.
    fn of(name: &str, item: Option<&String>) -> Target {
        match item {
            Some(_) => Target::Pool(name.to_string()),
            None => Target::Lock(name.to_string()),
        }
    }
}

/// Every lock, plus the fencing counter. Free locks with nobody waiting are not kept.
///
/// Locks are shared (`Arc`) and copied on write: the store keeps a committed copy for readers
/// beside its working copy, and [`LockTable::copy_from`] brings it up to date by sharing the
/// locks and pools a batch changed, so a batch costs what it touched, not the size of the table.
///
/// Leases are indexed by expiry, so finding the next lease to run out (every batch does) and
/// the expired ones does not scan the table either.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockTable {
    locks: BTreeMap<String, Arc<Lock>>,
    /// Pools with items or waiters; copied on write like locks.
    pools: BTreeMap<String, Arc<Pool>>,
    next_generation: u64,
    /// (earliest lease expiry, lock or pool) of every lock and pool with a lease.
    expiries: BTreeSet<(SystemTime, Target)>,
    limits: Limits,
}

impl Default for LockTable {
    fn default() -> Self {
        LockTable {
            locks: BTreeMap::new(),
            pools: BTreeMap::new(),
            next_generation: 1,
            expiries: BTreeSet::new(),
            limits: Limits::default(),
        }
    }
}

impl LockTable {
    /// Builds a table from persisted holdings; `next_generation` is raised above every holding's.
    pub fn from_parts(locks: BTreeMap<String, Lock>, next_generation: u64) -> Self {
        let highest = locks
            .values()
            .flat_map(|l| l.holders.iter().map(|h| h.generation))
            .max()
            .unwrap_or(0);
        let locks = locks
            .into_iter()
            .filter(|(_, lock)| lock.is_held())
            // A clone has exact capacities; deserialized vectors grew in steps (JSON gives no
            // lengths), which would cost 10,000 loaded locks ~5 MiB of empty room.
            .map(|(name, lock)| (name, Arc::new(lock.clone())))
            .collect::<BTreeMap<_, _>>();
        let expiries = locks
            .iter()
            .filter_map(|(name, lock)| lock.expires_at().map(|at| (at, Target::Lock(name.clone()))))
            .collect();
        LockTable {
            locks,
            pools: BTreeMap::new(),
            next_generation: next_generation.max(highest + 1),
            expiries,
            limits: Limits::default(),
        }
    }

    /// The table with these pools (as persisted), the generation counter raised above every
    /// item's holding.
    pub fn with_pools(mut self, pools: BTreeMap<String, Pool>) -> Self {
        for (name, pool) in pools {
            if pool.is_unused() {
                continue;
            }
            let highest = pool
                .items
                .values()
                .filter_map(|i| i.holder.as_ref().map(|h| h.generation))
                .max()
                .unwrap_or(0);
            self.next_generation = self.next_generation.max(highest + 1);
            let target = Target::Pool(name.clone());
            self.pools.insert(name, Arc::new(pool));
            self.reindex(&target, None);
        }
        self
    }

    /// The table with these limits on what requests may add.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Makes the locks and pools in `targets` (and the generation counter) what they are in
    /// `other`, sharing them: how a committed copy catches up with a batch, or a working copy is
    /// rolled back, at the cost of the batch rather than of the table.
    pub fn copy_from<'a>(
        &mut self,
        other: &LockTable,
        targets: impl IntoIterator<Item = &'a Target>,
    ) {
        for target in targets {
            let before = self.expiry_of(target);
            match target {
                Target::Lock(name) => match other.locks.get(name) {
                    Some(lock) => {
                        self.locks.insert(name.clone(), lock.clone());
                    }
                    None => {
                        self.locks.remove(name);
                    }
                },
                Target::Pool(name) => match other.pools.get(name) {
                    Some(pool) => {
                        self.pools.insert(name.clone(), pool.clone());
                    }
                    None => {
                        self.pools.remove(name);
                    }
                },
            }
            self.reindex(target, before);
        }
        self.next_generation = other.next_generation;
    }

    fn expiry_of(&self, target: &Target) -> Option<SystemTime> {
        match target {
            Target::Lock(name) => self.locks.get(name).and_then(|lock| lock.expires_at()),
            Target::Pool(name) => self.pools.get(name).and_then(|pool| pool.expires_at()),
        }
    }

    fn lock_expiry(&self, name: &str) -> Option<SystemTime> {
        self.locks.get(name).and_then(|lock| lock.expires_at())
    }

    /// Brings the expiry index up to date for `target`, whose earliest expiry was `before`.
    fn reindex(&mut self, target: &Target, before: Option<SystemTime>) {
        let after = self.expiry_of(target);
        if before == after {
            return;
        }
        if let Some(at) = before {
            self.expiries.remove(&(at, target.clone()));
        }
        if let Some(at) = after {
            self.expiries.insert((at, target.clone()));
        }
    }

    fn reindex_lock(&mut self, name: &str, before: Option<SystemTime>) {
        self.reindex(&Target::Lock(name.to_string()), before);
    }

    /// The held locks and the next generation, for a backend that rebuilds the table.
    pub fn into_parts(self) -> (BTreeMap<String, Lock>, u64) {
        let locks = self
            .locks
            .into_iter()
            .map(|(name, lock)| (name, Arc::unwrap_or_clone(lock)))
            .collect();
        (locks, self.next_generation)
    }

    pub fn locks(&self) -> &BTreeMap<String, Arc<Lock>> {
        &self.locks
    }

    pub fn lock(&self, name: &str) -> Option<&Lock> {
        self.locks.get(name).map(|lock| &**lock)
    }

    pub fn pools(&self) -> &BTreeMap<String, Arc<Pool>> {
        &self.pools
    }

    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.get(name).map(|pool| &**pool)
    }

    /// The lock to change, copied first if a clone of the table shares it.
    fn lock_mut(&mut self, name: &str) -> Option<&mut Lock> {
        self.locks.get_mut(name).map(Arc::make_mut)
    }

    /// The locks and pools with a lease run out by `now`.
    fn expiring(&self, now: SystemTime) -> impl Iterator<Item = &Target> {
        self.expiries
            .iter()
            .take_while(move |(at, _)| *at <= now)
            .map(|(_, target)| target)
    }

    pub fn next_generation(&self) -> u64 {
        self.next_generation
    }

    pub fn waiters(&self) -> usize {
        self.locks
            .values()
            .map(|lock| lock.waiters())
            .sum::<usize>()
            + self
                .pools
                .values()
                .map(|pool| pool.waiters())
                .sum::<usize>()
    }

    /// Acquires `name` for `request` if it can be granted now. Otherwise, with a waiter id the
    /// request joins the queue, without one it is refused.
    ///
    /// A requestor that already holds the lock is granted at once (reentrancy; renewing a lease).
    /// Anyone else is granted only when nobody is queued, so shared holders cannot starve a
    /// queued waiter with another key.
    pub fn acquire(
        &mut self,
        name: &str,
        request: Acquire,
        now: SystemTime,
        waiter: Option<WaiterId>,
    ) -> AcquireOutcome {
        let before = self.lock_expiry(name);
        let outcome = self.acquire_unindexed(name, request, now, waiter);
        self.reindex_lock(name, before);
        outcome
    }

    fn acquire_unindexed(
        &mut self,
        name: &str,
        request: Acquire,
        now: SystemTime,
        waiter: Option<WaiterId>,
    ) -> AcquireOutcome {
        if !self.locks.contains_key(name) && self.locks.len() >= self.limits.locks {
            return AcquireOutcome::OverLimit(Limit::Locks(self.limits.locks));
        }
        let lock = Arc::make_mut(
            self.locks
                .entry(name.to_string())
                .or_insert_with(|| Arc::new(Lock::new(request.slots.unwrap_or(1)))),
        );
        if let Some(slots) = request.slots
            && slots != lock.slots
        {
            return AcquireOutcome::SlotsMismatch { slots: lock.slots };
        }
        if lock.over_requestor_limit(&request, self.limits.requestors) {
            return AcquireOutcome::OverLimit(Limit::Requestors(self.limits.requestors));
        }
        if lock.already_holds(&request) || (lock.queue.is_empty() && lock.admits(&request)) {
            let grant = lock.grant(&request, now, &mut self.next_generation);
            return AcquireOutcome::Granted(grant);
        }
        match waiter {
            Some(id) => {
                lock.queue.enqueue_mut(Waiter {
                    id,
                    request,
                    since: Some(now),
                });
                AcquireOutcome::Queued
            }
            None => AcquireOutcome::Held(Conflict { keys: lock.keys() }),
        }
    }

    /// Releases `requestor`'s whole count under `key` (the original locker's release).
    pub fn release(
        &mut self,
        name: &str,
        key: &str,
        requestor: &str,
        now: SystemTime,
    ) -> ReleaseOutcome {
        let Some(lock) = self.lock(name) else {
            return ReleaseOutcome::NotHeld;
        };
        if !lock.is_held() {
            return ReleaseOutcome::NotHeld;
        }
        let Some(index) = lock.holder_index(key) else {
            return ReleaseOutcome::WrongKey(Conflict { keys: lock.keys() });
        };
        let before = lock.expires_at();
        let changed = self
            .lock_mut(name)
            .is_some_and(|lock| lock.drop_requestor(index, requestor));
        let grants = self.serve_and_tidy(name, now, before);
        ReleaseOutcome::Released { changed, grants }
    }

    /// Releases every holding of `name`, whatever its key.
    pub fn force_release(&mut self, name: &str, now: SystemTime) -> ForceRelease {
        let before = self.lock_expiry(name);
        let previous = match self.lock_mut(name) {
            Some(lock) => std::mem::take(&mut lock.holders),
            None => Vec::new(),
        };
        let grants = self.serve_and_tidy(name, now, before);
        ForceRelease {
            name: name.to_string(),
            previous,
            grants,
        }
    }

    /// Takes back one count granted to a waiter that was gone by the time the grant was
    /// delivered. Only touches the holding with that generation, so a later holding under the
    /// same key is never affected.
    /// Returns `None` when that grant is no longer held.
    pub fn revoke(&mut self, grant: &WaiterGrant, now: SystemTime) -> Option<Vec<WaiterGrant>> {
        if grant.item.is_some() {
            return self.revoke_item(grant, now);
        }
        let before = self.lock_expiry(&grant.name);
        let lock = self.lock_mut(&grant.name)?;
        let index = lock
            .holders
            .iter()
            .position(|h| h.key == grant.key && h.generation == grant.grant.generation)?;
        let holder = &mut lock.holders[index];
        match holder.requestors.get_mut(&grant.requestor) {
            Some(hold) if hold.count > 1 => hold.count -= 1,
            Some(_) => {
                lock.drop_requestor(index, &grant.requestor);
            }
            None => return None,
        }
        Some(self.serve_and_tidy(&grant.name, now, before))
    }

    /// Takes a waiter out of the queue (it gave up or its client went away). Returns whom that
    /// lets in: a waiter stuck behind it may fit now.
    pub fn cancel(&mut self, name: &str, waiter: WaiterId, now: SystemTime) -> Vec<WaiterGrant> {
        let before = self.lock_expiry(name);
        let Some(lock) = self.lock_mut(name) else {
            return Vec::new();
        };
        if lock.queue.iter().any(|w| w.id == waiter) {
            lock.queue = lock
                .queue
                .iter()
                .filter(|w| w.id != waiter)
                .cloned()
                .collect();
        }
        self.serve_and_tidy(name, now, before)
    }

    /// Whether `waiter` is still queued on `target`.
    pub fn is_queued(&self, target: &Target, waiter: WaiterId) -> bool {
        match target {
            Target::Lock(name) => self
                .locks
                .get(name)
                .is_some_and(|l| l.queue.iter().any(|w| w.id == waiter)),
            Target::Pool(name) => self.pools.get(name).is_some_and(|p| p.is_queued(waiter)),
        }
    }

    /// Releases every hold whose lease ran out at or before `now`, then serves the queues.
    pub fn expire(&mut self, now: SystemTime) -> Expiry {
        let mut expiry = Expiry::default();
        // In name order, so that generations are handed out the same whatever the leases.
        let targets: BTreeSet<Target> = self
            .expiries
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, target)| target.clone())
            .collect();
        for target in targets {
            let before = self.expiry_of(&target);
            match &target {
                Target::Lock(name) => {
                    if let Some(lock) = self.lock_mut(name) {
                        expire_lock(name, lock, now, &mut expiry.expired);
                    }
                }
                Target::Pool(name) => {
                    if let Some(pool) = self.pools.get_mut(name).map(Arc::make_mut) {
                        let expired = pool.expire(now).into_iter();
                        expiry
                            .expired
                            .extend(expired.map(|(item, key, requestor)| Expired {
                                name: name.clone(),
                                item: Some(item),
                                key,
                                requestor,
                            }));
                    }
                }
            }
            let grants = self.serve_target(&target, now, before);
            expiry.grants.extend(grants);
        }
        expiry
    }

    /// The earliest lease expiry of any hold.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.expiries.first().map(|(at, _)| *at)
    }

    /// Serves the queue of `name`, forgets the lock if nobody holds or waits for it, and
    /// brings the expiry index up to date (the lock's earliest expiry was `before`).
    fn serve_and_tidy(
        &mut self,
        name: &str,
        now: SystemTime,
        before: Option<SystemTime>,
    ) -> Vec<WaiterGrant> {
        let grants = serve_in(
            &mut self.locks,
            name,
            &mut self.next_generation,
            |lock, generation, grants| lock.serve_queue(name, now, generation, grants),
            Lock::is_unused,
        );
        self.reindex_lock(name, before);
        grants
    }

    /// [`LockTable::serve_and_tidy`] for a lock or a pool.
    fn serve_target(
        &mut self,
        target: &Target,
        now: SystemTime,
        before: Option<SystemTime>,
    ) -> Vec<WaiterGrant> {
        match target {
            Target::Lock(name) => self.serve_and_tidy(name, now, before),
            Target::Pool(name) => self.serve_pool(name, now, before),
        }
    }

    /// Serves the queue of pool `name`, forgets the pool once it has neither items nor
    /// waiters, and brings the expiry index up to date.
    fn serve_pool(
        &mut self,
        name: &str,
        now: SystemTime,
        before: Option<SystemTime>,
    ) -> Vec<WaiterGrant> {
        let grants = serve_in(
            &mut self.pools,
            name,
            &mut self.next_generation,
            |pool, generation, grants| pool.serve_queue(name, now, generation, grants),
            Pool::is_unused,
        );
        self.reindex(&Target::Pool(name.to_string()), before);
        grants
    }

    /// Applies one change to pool `name` (created by an addition or a waiting claim).
    pub fn change_pool(&mut self, name: &str, change: &PoolChange, now: SystemTime) -> PoolOutcome {
        let target = Target::Pool(name.to_string());
        let before = self.expiry_of(&target);
        let creates = matches!(change, PoolChange::Add { .. } | PoolChange::Update { .. });
        if creates && !self.pools.contains_key(name) {
            self.pools.insert(name.to_string(), Arc::default());
        }
        let Some(pool) = self.pools.get_mut(name).map(Arc::make_mut) else {
            return match change {
                PoolChange::Claim { .. } => PoolOutcome::Claim(ClaimOutcome::NoSuchItem),
                PoolChange::Cancel { .. } => PoolOutcome::Cancelled(Vec::new()),
                _ => PoolOutcome::NoSuchItem,
            };
        };
        let next_generation = &mut self.next_generation;
        let mut outcome = match change {
            PoolChange::Claim {
                item,
                request,
                waiter,
            } => PoolOutcome::Claim(pool.claim(
                item.as_deref(),
                request,
                now,
                *waiter,
                next_generation,
            )),
            PoolChange::Release {
                item,
                key,
                requestor,
                ..
            } => pool.release(item, key.as_deref(), requestor.as_deref()),
            PoolChange::Add {
                item,
                metadata,
                claim,
            } => pool.add(item, metadata, claim.as_ref(), now, next_generation),
            PoolChange::Update { item, metadata } => pool.update(item, metadata),
            PoolChange::Remove { item, key } => pool.remove(item, key.as_deref()),
            PoolChange::Cancel { waiter, .. } => {
                pool.cancel(*waiter);
                PoolOutcome::Cancelled(Vec::new())
            }
        };
        let served = self.serve_pool(name, now, before);
        match &mut outcome {
            PoolOutcome::Freed { grants, .. }
            | PoolOutcome::Stored { grants, .. }
            | PoolOutcome::Cancelled(grants) => grants.extend(served),
            // A claim, or a refusal, frees nothing.
            _ => debug_assert!(served.is_empty(), "a {change:?} let waiters in"),
        }
        outcome
    }

    /// [`LockTable::revoke`] of a pool item's grant.
    fn revoke_item(&mut self, grant: &WaiterGrant, now: SystemTime) -> Option<Vec<WaiterGrant>> {
        let target = Target::Pool(grant.name.clone());
        let before = self.expiry_of(&target);
        let pool = self.pools.get_mut(&grant.name).map(Arc::make_mut)?;
        if !pool.revoke(grant) {
            return None;
        }
        Some(self.serve_pool(&grant.name, now, before))
    }
}

/// Drops the holds of `lock` whose lease ran out at `now`, noting each in `expired`.
fn expire_lock(name: &str, lock: &mut Lock, now: SystemTime, expired: &mut Vec<Expired>) {
    for holder in &mut lock.holders {
        holder.requestors.retain(|requestor, hold| {
            let alive = hold.expires_at.is_none_or(|at| at > now);
            if !alive {
                expired.push(Expired {
                    name: name.to_string(),
                    item: None,
                    key: holder.key.clone(),
                    requestor: requestor.clone(),
                });
            }
            alive
        });
    }
    lock.holders.retain(|h| !h.requestors.is_empty());
}

/// One operation on the table, as a value: the store keeps the operations of a batch to know
/// which locks it touched and to retry internal ones after a failed write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Acquire {
        name: String,
        request: Acquire,
        waiter: Option<WaiterId>,
    },
    Release {
        name: String,
        key: String,
        requestor: String,
    },
    ForceRelease {
        name: String,
        /// Who asked (the user and address the server saw), for the history.
        by: Option<String>,
    },
    Cancel {
        name: String,
        waiter: WaiterId,
        leaving: events::Leaving,
    },
    Revoke(WaiterGrant),
    Expire,
    /// The release of a hold whose build ended: applied only if the hold is still the one the
    /// reclaimer looked at (same generation, same build), so that a next build which took the
    /// lock again with the same key and requestor in the meantime keeps it.
    Reclaim(Reclaim),
    /// A change to a pool.
    Pool {
        name: String,
        change: PoolChange,
    },
}

/// A hold of a finished build, as the reclaimer saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reclaim {
    /// The lock, or with `item` the pool.
    pub name: String,
    pub item: Option<String>,
    pub key: String,
    pub requestor: String,
    pub generation: u64,
    pub build: BuildRef,
}

impl Op {
    /// The lock this operation is about; `None` for expiry, which may touch any.
    pub fn lock_name(&self) -> Option<&str> {
        match self {
            Op::Acquire { name, .. }
            | Op::Release { name, .. }
            | Op::ForceRelease { name, .. }
            | Op::Cancel { name, .. } => Some(name),
            Op::Revoke(grant) => Some(&grant.name),
            Op::Reclaim(hold) if hold.item.is_none() => Some(&hold.name),
            Op::Reclaim(_) | Op::Pool { .. } | Op::Expire => None,
        }
    }

    /// The operation that takes `waiter` out of `target`'s queue.
    pub fn cancel(target: &Target, waiter: WaiterId, leaving: events::Leaving) -> Op {
        match target {
            Target::Lock(name) => Op::Cancel {
                name: name.clone(),
                waiter,
                leaving,
            },
            Target::Pool(name) => Op::Pool {
                name: name.clone(),
                change: PoolChange::Cancel { waiter, leaving },
            },
        }
    }

    /// The waiter this operation takes out of a queue, if it is a cancel.
    pub fn cancelled_waiter(&self) -> Option<WaiterId> {
        match self {
            Op::Cancel { waiter, .. }
            | Op::Pool {
                change: PoolChange::Cancel { waiter, .. },
                ..
            } => Some(*waiter),
            _ => None,
        }
    }

    /// The waiter this operation may queue (a waiting acquire or claim).
    pub fn queues_waiter(&self) -> Option<WaiterId> {
        match self {
            Op::Acquire { waiter, .. }
            | Op::Pool {
                change: PoolChange::Claim { waiter, .. },
                ..
            } => *waiter,
            _ => None,
        }
    }

    /// Clean-up the server does on its own (a cancel, or the revoke of an undelivered grant):
    /// after a failed write it must be applied again later, never dropped.
    pub fn is_cleanup(&self) -> bool {
        self.cancelled_waiter().is_some() || matches!(self, Op::Revoke(_))
    }

    /// The lock or pool this operation is about; `None` for expiry, which may touch any.
    pub fn target(&self) -> Option<Target> {
        match self {
            Op::Acquire { name, .. }
            | Op::Release { name, .. }
            | Op::ForceRelease { name, .. }
            | Op::Cancel { name, .. } => Some(Target::Lock(name.clone())),
            Op::Revoke(grant) => Some(Target::of(&grant.name, grant.item.as_ref())),
            Op::Reclaim(hold) => Some(Target::of(&hold.name, hold.item.as_ref())),
            Op::Pool { name, .. } => Some(Target::Pool(name.clone())),
            Op::Expire => None,
        }
    }
}

/// What applying an [`Op`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    Acquire(AcquireOutcome),
    Release(ReleaseOutcome),
    ForceRelease(ForceRelease),
    /// Waiters let in by a cancel.
    Grants(Vec<WaiterGrant>),
    /// A revoke: `None` when the grant was no longer held.
    Revoke(Option<Vec<WaiterGrant>>),
    Expiry(Expiry),
    Pool(PoolOutcome),
}

impl Effect {
    /// Whether the operation changed anything that is persisted: a lock's holdings or the
    /// generation, or a pool's items, their metadata and holdings
    /// ([`PoolOutcome::changes_state`]).
    pub fn changes_holdings(&self) -> bool {
        match self {
            Effect::Acquire(outcome) => matches!(outcome, AcquireOutcome::Granted(_)),
            Effect::Release(ReleaseOutcome::Released { changed, grants }) => {
                *changed || !grants.is_empty()
            }
            Effect::Release(_) => false,
            Effect::ForceRelease(force) => !force.previous.is_empty(),
            Effect::Grants(grants) => !grants.is_empty(),
            Effect::Revoke(revoked) => revoked.is_some(),
            Effect::Expiry(expiry) => !expiry.expired.is_empty(),
            Effect::Pool(outcome) => outcome.changes_state(),
        }
    }

    /// The locks and pools this effect changed besides its operation's own target: expired
    /// holds anywhere, and waiters let in.
    pub fn targets(&self) -> impl Iterator<Item = Target> + '_ {
        let expired = match self {
            Effect::Expiry(expiry) => expiry.expired.as_slice(),
            _ => &[],
        };
        expired
            .iter()
            .map(|e| Target::of(&e.name, e.item.as_ref()))
            .chain(self.grants().iter().map(WaiterGrant::target))
    }

    /// Whether the operation's waiter was queued (an acquire or claim that must wait).
    pub fn is_queued(&self) -> bool {
        matches!(
            self,
            Effect::Acquire(AcquireOutcome::Queued)
                | Effect::Pool(PoolOutcome::Claim(ClaimOutcome::Queued))
        )
    }

    /// Waiters this operation let in.
    pub fn grants(&self) -> &[WaiterGrant] {
        match self {
            Effect::Release(ReleaseOutcome::Released { grants, .. }) => grants,
            Effect::ForceRelease(force) => &force.grants,
            Effect::Grants(grants) | Effect::Revoke(Some(grants)) => grants,
            Effect::Expiry(expiry) => &expiry.grants,
            Effect::Pool(outcome) => outcome.grants(),
            _ => &[],
        }
    }
}

impl LockTable {
    /// Applies one operation.
    pub fn apply(&mut self, op: &Op, now: SystemTime) -> Effect {
        match op {
            Op::Acquire {
                name,
                request,
                waiter,
            } => Effect::Acquire(self.acquire(name, request.clone(), now, *waiter)),
            Op::Release {
                name,
                key,
                requestor,
            } => Effect::Release(self.release(name, key, requestor, now)),
            Op::ForceRelease { name, .. } => Effect::ForceRelease(self.force_release(name, now)),
            Op::Cancel { name, waiter, .. } => Effect::Grants(self.cancel(name, *waiter, now)),
            Op::Revoke(grant) => Effect::Revoke(self.revoke(grant, now)),
            Op::Expire => Effect::Expiry(self.expire(now)),
            Op::Reclaim(hold) => match &hold.item {
                Some(_) => Effect::Pool(self.reclaim_item(hold, now)),
                None => Effect::Release(self.reclaim(hold, now)),
            },
            Op::Pool { name, change } => Effect::Pool(self.change_pool(name, change, now)),
        }
    }

    /// Releases a finished build's claim of a pool item if it is still there, unchanged.
    fn reclaim_item(&mut self, hold: &Reclaim, now: SystemTime) -> PoolOutcome {
        let Some(item) = hold.item.as_deref() else {
            return PoolOutcome::NoSuchItem;
        };
        let unchanged = self
            .pool(&hold.name)
            .and_then(|pool| pool.holding(item, &hold.key, hold.generation))
            .and_then(|holder| holder.requestors.get(&hold.requestor))
            .is_some_and(|r| r.release_with_build.as_deref() == Some(&hold.build));
        if !unchanged {
            return PoolOutcome::NoSuchItem;
        }
        let change = PoolChange::Release {
            item: item.to_string(),
            key: Some(hold.key.clone()),
            requestor: Some(hold.requestor.clone()),
            by: None,
        };
        self.change_pool(&hold.name, &change, now)
    }

    /// Releases a finished build's hold if it is still there, unchanged.
    fn reclaim(&mut self, hold: &Reclaim, now: SystemTime) -> ReleaseOutcome {
        let unchanged = self
            .lock(&hold.name)
            .and_then(|lock| lock.holders.iter().find(|h| h.key == hold.key))
            .is_some_and(|holder| {
                holder.generation == hold.generation
                    && holder
                        .requestors
                        .get(&hold.requestor)
                        .is_some_and(|r| r.release_with_build.as_deref() == Some(&hold.build))
            });
        if !unchanged {
            return ReleaseOutcome::NotHeld;
        }
        self.release(&hold.name, &hold.key, &hold.requestor, now)
    }
}

/// Serves the queue of `name` in `map` (a lock's or a pool's; copied first if shared) with
/// `serve`, dropping it once `unused` says it holds and queues nothing. The generation counter
/// is passed apart so it can be borrowed with the map.
fn serve_in<T: Clone>(
    map: &mut BTreeMap<String, Arc<T>>,
    name: &str,
    next_generation: &mut u64,
    serve: impl FnOnce(&mut T, &mut u64, &mut Vec<WaiterGrant>),
    unused: impl Fn(&T) -> bool,
) -> Vec<WaiterGrant> {
    let mut grants = Vec::new();
    if let Some(entry) = map.get_mut(name).map(Arc::make_mut) {
        serve(entry, next_generation, &mut grants);
        if unused(entry) {
            map.remove(name);
        }
    }
    grants
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(name: &str) -> BuildRef {
        let mut info = Info::new();
        info.insert("build_id".into(), name.into());
        BuildRef::from_info(&info).expect("names a build")
    }

    fn take(table: &mut LockTable, build_id: &str, now: SystemTime) -> u64 {
        let request = Acquire {
            key: "k".into(),
            requestor: "job".into(),
            ttl: None,
            info: Info::new(),
            slots: None,
            release_with_build: Some(Box::new(build(build_id))),
            renew: false,
        };
        let op = Op::Acquire {
            name: "env".into(),
            request,
            waiter: None,
        };
        match table.apply(&op, now) {
            Effect::Acquire(AcquireOutcome::Granted(grant)) => grant.generation,
            other => panic!("not granted: {other:?}"),
        }
    }

    fn reclaim(generation: u64, build_id: &str) -> Op {
        Op::Reclaim(Reclaim {
            name: "env".into(),
            item: None,
            key: "k".into(),
            requestor: "job".into(),
            generation,
            build: build(build_id),
        })
    }

    #[test]
    fn a_reclaim_releases_the_hold_it_was_decided_for() {
        let now = SystemTime::now();
        let mut table = LockTable::default();
        let generation = take(&mut table, "1", now);
        table.apply(&reclaim(generation, "1"), now);
        assert!(table.lock("env").is_none_or(|l| !l.is_held()));
    }

    #[test]
    fn a_reclaim_leaves_a_hold_taken_again_by_the_next_build() {
        let now = SystemTime::now();
        let mut table = LockTable::default();
        let first = take(&mut table, "1", now);
        // Build 1 ended; before the reclaimer acts, it released and build 2 took the lock
        // with the same key and requestor.
        let release = Op::Release {
            name: "env".into(),
            key: "k".into(),
            requestor: "job".into(),
        };
        table.apply(&release, now);
        let second = take(&mut table, "2", now);
        assert_ne!(first, second);
        let effect = table.apply(&reclaim(first, "1"), now);
        assert_eq!(effect, Effect::Release(ReleaseOutcome::NotHeld));
        assert!(table.lock("env").is_some_and(Lock::is_held));
        // The same generation with another build is not this hold either.
        table.apply(&reclaim(second, "1"), now);
        assert!(table.lock("env").is_some_and(Lock::is_held));
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    fn request(key: &str, requestor: &str) -> Acquire {
        Acquire {
            key: key.into(),
            requestor: requestor.into(),
            ttl: None,
            info: Info::new(),
            slots: None,
            release_with_build: None,
            renew: false,
        }
    }

    fn limited(locks: usize, requestors: usize) -> LockTable {
        LockTable::default().with_limits(Limits { locks, requestors })
    }

    #[test]
    fn a_new_lock_past_the_lock_limit_is_refused_and_nothing_is_added() {
        let now = SystemTime::now();
        let mut table = limited(2, 10);
        for name in ["a", "b"] {
            let outcome = table.acquire(name, request("k", "r"), now, None);
            assert!(matches!(outcome, AcquireOutcome::Granted(_)), "{outcome:?}");
        }
        let refused = table.acquire("c", request("k", "r"), now, Some(1));
        assert_eq!(refused, AcquireOutcome::OverLimit(Limit::Locks(2)));
        assert!(table.lock("c").is_none());
        // Locks that exist still take requests: a reentrant acquire and a waiter.
        assert!(matches!(
            table.acquire("a", request("k", "r"), now, None),
            AcquireOutcome::Granted(_)
        ));
        assert_eq!(
            table.acquire("b", request("other", "r"), now, Some(2)),
            AcquireOutcome::Queued
        );
        // Once a lock is gone, a new one fits.
        table.force_release("a", now);
        assert!(matches!(
            table.acquire("c", request("k", "r"), now, None),
            AcquireOutcome::Granted(_)
        ));
    }

    #[test]
    fn a_new_requestor_past_the_requestor_limit_is_refused_counting_queued_ones() {
        let now = SystemTime::now();
        let mut table = limited(10, 2);
        let mut shared = request("k", "r1");
        shared.slots = Some(2);
        assert!(matches!(
            table.acquire("env", shared, now, None),
            AcquireOutcome::Granted(_)
        ));
        // A waiter with another key blocks the queue; one under key `k` queues behind it.
        assert_eq!(
            table.acquire("env", request("other", "x"), now, Some(1)),
            AcquireOutcome::Granted(Grant {
                generation: 2,
                count: 1
            })
        );
        assert_eq!(
            table.acquire("env", request("third", "x"), now, Some(2)),
            AcquireOutcome::Queued
        );
        assert_eq!(
            table.acquire("env", request("k", "r2"), now, Some(3)),
            AcquireOutcome::Queued
        );
        // r1 and the queued r2 make two requestors under `k`: a third is refused, at once.
        assert_eq!(
            table.acquire("env", request("k", "r3"), now, Some(4)),
            AcquireOutcome::OverLimit(Limit::Requestors(2))
        );
        // Requestors already holding still count up.
        assert!(matches!(
            table.acquire("env", request("k", "r1"), now, None),
            AcquireOutcome::Granted(Grant { count: 2, .. })
        ));
    }

    #[test]
    fn a_committed_copy_catches_up_with_the_locks_a_batch_touched() {
        let now = SystemTime::now();
        let mut working = LockTable::default();
        let mut leased = request("k", "r");
        leased.ttl = Some(Duration::from_secs(60));
        working.acquire("a", leased.clone(), now, None);
        working.acquire("b", request("k", "r"), now, None);
        let mut committed = working.clone();
        working.release("a", "k", "r", now);
        working.acquire("c", leased, now, None);
        let touched = [Target::Lock("a".into()), Target::Lock("c".into())];
        committed.copy_from(&working, &touched);
        assert_eq!(committed, working);
        assert_eq!(committed.next_expiry(), Some(now + Duration::from_secs(60)));
        // And back: a working copy rolled back to the committed one.
        working.force_release("b", now);
        working.copy_from(&committed, &[Target::Lock("b".into())]);
        assert_eq!(working, committed);
    }
}
