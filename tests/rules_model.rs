//! Property test: the lock rules against a deliberately naive model of the same contract.
//!
//! The model keeps each lock as flat lists (holds as (key, requestor, count, expiry) rows, a
//! queue, a slot count) and serves the queue by rescanning from scratch; the rules keep
//! structured holders. Both see the same random operations; every outcome and the visible
//! state after every step must agree, and the invariants must hold throughout.
//!
//! The operations: acquires (waiting or not, leases, renewals, semaphores of up to 4 slots,
//! holder info naming a build, release with the build), releases, force releases, cancels and
//! revokes of waiters, lease expiry, the reclaimer's release of a finished build's hold, and a
//! restart (the table written as a state file and read back; queued waiters are gone).
//!
//! 400 cases by default; `LOCKER_PROPTEST_CASES=N` runs N (e.g. 20000 in a nightly run).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use locker::rules::events::{Event, EventKind, Leaving};
use locker::rules::{
    Acquire, AcquireOutcome, BuildRef, Effect, Info, LockTable, Op, Reclaim, ReleaseOutcome,
    WaiterGrant, WaiterId,
};
use locker::store::state_file;
use proptest::prelude::*;

const NAMES: [&str; 2] = ["a", "b"];
const KEYS: [&str; 4] = ["k1", "k2", "k3", "k4"];
const REQUESTORS: [&str; 2] = ["r1", "r2"];
/// Builds named by holder info (`build_id`).
const BUILDS: [&str; 2] = ["b1", "b2"];

/// Cases to run: `LOCKER_PROPTEST_CASES`, else 400.
fn cases() -> u32 {
    match std::env::var("LOCKER_PROPTEST_CASES") {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("LOCKER_PROPTEST_CASES={value:?} is not a number")),
        Err(_) => 400,
    }
}

/// Holder info naming build `BUILDS[index]`.
fn build_info(index: usize) -> Info {
    let mut info = Info::new();
    info.insert("build_id".into(), BUILDS[index].into());
    info
}

fn build_ref(index: usize) -> BuildRef {
    BuildRef::from_info(&build_info(index)).expect("names a build")
}

#[derive(Clone, Debug)]
enum Step {
    Acquire {
        name: usize,
        key: usize,
        requestor: usize,
        ttl: Option<u64>,
        slots: Option<u32>,
        wait: bool,
        renew: bool,
        /// Holder info naming `BUILDS[i]`, and whether the hold goes with that build.
        build: Option<(usize, bool)>,
    },
    Release {
        name: usize,
        key: usize,
        requestor: usize,
    },
    Force {
        name: usize,
    },
    /// Cancels the n-th waiter ever queued (if still queued).
    Cancel {
        nth: usize,
    },
    /// Revokes the n-th grant ever handed to a waiter.
    Revoke {
        nth: usize,
    },
    /// Moves the clock forward, then expires leases.
    Tick {
        seconds: u64,
    },
    /// The reclaimer releases a hold of `BUILDS[build]`, as seen at the key's current
    /// generation (or, `stale`, the one before).
    Reclaim {
        name: usize,
        key: usize,
        requestor: usize,
        build: usize,
        stale: bool,
    },
    /// The server restarts: the table is written as a state file and read back.
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..2usize, 0..4usize, 0..2usize, prop::option::of(1..4u64),
              prop::option::weighted(0.3, 1..5u32), any::<bool>(), prop::bool::weighted(0.25),
              prop::option::weighted(0.4, (0..2usize, any::<bool>())))
            .prop_map(|(name, key, requestor, ttl, slots, wait, renew, build)| Step::Acquire {
                name, key, requestor, ttl, slots, wait, renew, build
            }),
        3 => (0..2usize, 0..4usize, 0..2usize)
            .prop_map(|(name, key, requestor)| Step::Release { name, key, requestor }),
        1 => (0..2usize, 0..4usize, 0..2usize, 0..2usize, prop::bool::weighted(0.2))
            .prop_map(|(name, key, requestor, build, stale)| Step::Reclaim {
                name, key, requestor, build, stale
            }),
        1 => Just(Step::Restart),
        1 => (0..2usize).prop_map(|name| Step::Force { name }),
        1 => (0..8usize).prop_map(|nth| Step::Cancel { nth }),
        1 => (0..8usize).prop_map(|nth| Step::Revoke { nth }),
        1 => (0..3u64).prop_map(|seconds| Step::Tick { seconds }),
    ]
}

/// One hold row of the model.
#[derive(Clone, Debug)]
struct Hold {
    key: String,
    requestor: String,
    count: u64,
    expires: Option<SystemTime>,
    /// Released with this build (index into `BUILDS`).
    build: Option<usize>,
}

#[derive(Clone, Debug)]
struct Queued {
    id: WaiterId,
    key: String,
    requestor: String,
    ttl: Option<u64>,
    renew: bool,
    info: Option<usize>,
    with_build: bool,
}

#[derive(Clone, Debug, Default)]
struct ModelLock {
    slots: u32,
    holds: Vec<Hold>,
    generations: BTreeMap<String, u64>,
    /// Holder info per key: the build it names, if any.
    infos: BTreeMap<String, usize>,
    queue: Vec<Queued>,
}

impl ModelLock {
    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for hold in &self.holds {
            if !keys.contains(&hold.key) {
                keys.push(hold.key.clone());
            }
        }
        keys
    }

    fn fits(&self, key: &str) -> bool {
        let keys = self.keys();
        keys.iter().any(|k| k == key) || keys.len() < self.slots as usize
    }

    fn holds_already(&self, key: &str, requestor: &str) -> bool {
        self.holds
            .iter()
            .any(|h| h.key == key && h.requestor == requestor)
    }
}

#[derive(Default)]
struct Model {
    locks: BTreeMap<String, ModelLock>,
    next_generation: u64,
}

impl Model {
    #[allow(clippy::too_many_arguments)]
    fn grant(
        &mut self,
        name: &str,
        key: &str,
        requestor: &str,
        ttl: Option<u64>,
        renew: bool,
        info: Option<usize>,
        with_build: bool,
        now: SystemTime,
    ) -> (u64, u64) {
        let next = &mut self.next_generation;
        let lock = self.locks.get_mut(name).expect("lock exists");
        if !lock.keys().iter().any(|k| k == key) {
            // A new holding: drop the old generation of this key (its holding ended).
            lock.generations.insert(key.to_string(), *next);
            *next += 1;
            // Keep generations in the order holdings started. A new holding has no info.
            lock.infos.remove(key);
        }
        // Info, when given, replaces the holding's; the build goes with every grant.
        if let Some(info) = info {
            lock.infos.insert(key.to_string(), info);
        }
        let build = info.filter(|_| with_build);
        let expires = ttl.map(|s| now + Duration::from_secs(s));
        let count = match lock
            .holds
            .iter_mut()
            .find(|h| h.key == key && h.requestor == requestor)
        {
            Some(hold) => {
                // A renewal refreshes the lease without counting up.
                if !renew {
                    hold.count += 1;
                }
                hold.expires = expires;
                hold.build = build;
                hold.count
            }
            None => {
                lock.holds.push(Hold {
                    key: key.into(),
                    requestor: requestor.into(),
                    count: 1,
                    expires,
                    build,
                });
                1
            }
        };
        (lock.generations[key], count)
    }

    fn serve(&mut self, name: &str, now: SystemTime) -> Vec<(WaiterId, u64)> {
        let mut grants = Vec::new();
        while let Some(lock) = self.locks.get(name) {
            let Some(front) = lock.queue.first().cloned() else {
                break;
            };
            if !lock.fits(&front.key) {
                break;
            }
            self.locks.get_mut(name).expect("lock").queue.remove(0);
            let (generation, _) = self.grant(
                name,
                &front.key,
                &front.requestor,
                front.ttl,
                front.renew,
                front.info,
                front.with_build,
                now,
            );
            grants.push((front.id, generation));
        }
        if self
            .locks
            .get(name)
            .is_some_and(|l| l.holds.is_empty() && l.queue.is_empty())
        {
            self.locks.remove(name);
        }
        grants
    }
}

/// Requestor → (count, the build its hold goes with).
type Counts = BTreeMap<String, (u64, Option<String>)>;
/// Per lock: slots, holders as (key, generation, counts, the build the info names) sorted by
/// key, and the queue length.
type Visible = BTreeMap<String, (u32, Vec<(String, u64, Counts, Option<String>)>, usize)>;

/// Conflict messages name the holders' keys; their order is not part of the contract.
fn sorted(mut keys: Vec<String>) -> Vec<String> {
    keys.sort();
    keys
}

fn at(seconds: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
}

fn grant_ids(grants: &[WaiterGrant]) -> Vec<(WaiterId, u64)> {
    grants
        .iter()
        .map(|g| (g.waiter, g.grant.generation))
        .collect()
}

/// The visible state of the rules: per lock, holders as (key, generation, counts) sorted by
/// key, and the queue length.
fn visible(table: &LockTable) -> Visible {
    table
        .locks()
        .iter()
        .map(|(name, lock)| {
            let mut holders: Vec<_> = lock
                .holders
                .iter()
                .map(|h| {
                    let counts = h
                        .requestors
                        .iter()
                        .map(|(requestor, hold)| {
                            let build = hold.release_with_build.as_ref().and_then(|b| b.id.clone());
                            (requestor.clone(), (hold.count, build))
                        })
                        .collect();
                    let info = BuildRef::from_info(&h.info).and_then(|b| b.id);
                    (h.key.clone(), h.generation, counts, info)
                })
                .collect();
            holders.sort();
            (name.clone(), (lock.slots, holders, lock.waiters()))
        })
        .collect()
}

fn visible_model(model: &Model) -> Visible {
    model
        .locks
        .iter()
        .map(|(name, lock)| {
            let mut holders: Vec<_> = lock
                .keys()
                .into_iter()
                .map(|key| {
                    let counts = lock
                        .holds
                        .iter()
                        .filter(|h| h.key == key)
                        .map(|h| {
                            let build = h.build.map(|b| BUILDS[b].to_string());
                            (h.requestor.clone(), (h.count, build))
                        })
                        .collect();
                    let generation = lock.generations[&key];
                    let info = lock.infos.get(&key).map(|b| BUILDS[*b].to_string());
                    (key, generation, counts, info)
                })
                .collect();
            holders.sort();
            (name.clone(), (lock.slots, holders, lock.queue.len()))
        })
        .collect()
}

/// What the history says the table holds and who waits, folded from its events alone.
#[derive(Debug, Default)]
struct Told {
    /// (lock, key, requestor) → (count, generation).
    holds: BTreeMap<(String, String, String), (u64, u64)>,
    /// (lock, key, requestor) → how many of its requests wait.
    waiting: BTreeMap<(String, String, String), usize>,
}

impl Told {
    fn hear(&mut self, events: &[Event]) {
        for event in events {
            let id = (
                event.name.clone(),
                event.key.clone().unwrap_or_default(),
                event.requestor.clone().unwrap_or_default(),
            );
            let unqueue = |waiting: &mut BTreeMap<_, usize>| {
                let left = waiting
                    .get_mut(&id)
                    .expect("a waiter the history never queued left");
                *left -= 1;
                if *left == 0 {
                    waiting.remove(&id);
                }
            };
            match event.kind {
                EventKind::Queued => *self.waiting.entry(id).or_default() += 1,
                EventKind::Acquired => {
                    if event.waited.is_some() {
                        unqueue(&mut self.waiting);
                    }
                    let count = event.count.expect("an acquire names the count");
                    let generation = event.generation.expect("an acquire names the generation");
                    self.holds.insert(id, (count, generation));
                }
                EventKind::Released if event.count.is_some() => {
                    let hold = self
                        .holds
                        .get_mut(&id)
                        .expect("released what the history never gave");
                    hold.0 = event.count.unwrap_or_default();
                }
                EventKind::TimedOut | EventKind::Withdrawn if event.generation.is_none() => {
                    unqueue(&mut self.waiting);
                }
                kind if kind.ends_holding() => {
                    let hold = self
                        .holds
                        .remove(&id)
                        .expect("ended a holding the history never gave");
                    assert_eq!(Some(hold.1), event.generation, "{event:?}");
                    assert!(
                        event.held.is_some(),
                        "a holding that ends says how long: {event:?}"
                    );
                }
                EventKind::SlotsChanged => {}
                other => panic!("the lock rules made a pool event {other:?}"),
            }
        }
    }

    /// The same, read from the table.
    fn of(table: &LockTable) -> Told {
        let mut told = Told::default();
        for (name, lock) in table.locks() {
            for holder in &lock.holders {
                for (requestor, hold) in holder.requestors.iter() {
                    told.holds.insert(
                        (name.clone(), holder.key.clone(), requestor.clone()),
                        (hold.count, holder.generation),
                    );
                }
            }
            for (_, request) in lock.queued() {
                *told
                    .waiting
                    .entry((name.clone(), request.key.clone(), request.requestor.clone()))
                    .or_default() += 1;
            }
        }
        told
    }
}

fn check_invariants(table: &LockTable) {
    for (name, lock) in table.locks() {
        assert!(
            lock.holders.len() <= lock.slots as usize,
            "{name}: too many holders"
        );
        let mut keys = lock.keys();
        keys.sort();
        keys.dedup();
        assert_eq!(
            keys.len(),
            lock.holders.len(),
            "{name}: duplicate holder keys"
        );
        for holder in &lock.holders {
            assert!(!holder.requestors.is_empty(), "{name}: empty holding kept");
            assert!(
                holder.requestors.values().all(|r| r.count > 0),
                "{name}: zero count kept"
            );
            assert!(holder.generation < table.next_generation());
        }
        assert!(
            lock.is_held() || lock.waiters() > 0,
            "{name}: unused lock kept"
        );
        // No lost wake-up: a waiter is only left queued while the lock is really held.
        if lock.waiters() > 0 {
            assert!(lock.is_held(), "{name}: waiters on a free lock");
        }
    }
    // The expiry index agrees with a scan of every lease.
    let earliest = table.locks().values().filter_map(|l| l.expires_at()).min();
    assert_eq!(table.next_expiry(), earliest, "expiry index out of step");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn rules_agree_with_the_model(steps in prop::collection::vec(step(), 1..80)) {
        let mut table = LockTable::default();
        let mut model = Model { next_generation: 1, ..Model::default() };
        let mut clock = 0u64;
        let mut queued: Vec<(String, WaiterId)> = Vec::new();
        let mut granted: Vec<WaiterGrant> = Vec::new();
        let mut told = Told::default();
        let mut next_id: WaiterId = 1;

        for step in steps {
            let now = at(clock);
            let (op, expected) = match step {
                Step::Acquire { name, key, requestor, ttl, slots, wait, renew, build } => {
                    let info = build.map(|(b, _)| b);
                    let with_build = build.is_some_and(|(_, w)| w);
                    let (name, key, requestor) = (NAMES[name], KEYS[key], REQUESTORS[requestor]);
                    let waiter = wait.then(|| { next_id += 1; next_id });
                    let lock = model.locks.entry(name.to_string()).or_insert_with(|| ModelLock {
                        slots: slots.unwrap_or(1), ..ModelLock::default()
                    });
                    let expected = if slots.is_some_and(|s| s != lock.slots) {
                        format!("mismatch {}", lock.slots)
                    } else if lock.holds_already(key, requestor) || (lock.queue.is_empty() && lock.fits(key)) {
                        let (generation, count) =
                            model.grant(name, key, requestor, ttl, renew, info, with_build, now);
                        format!("granted {generation} {count}")
                    } else if let Some(id) = waiter {
                        lock.queue.push(Queued {
                            id, key: key.into(), requestor: requestor.into(), ttl, renew, info, with_build,
                        });
                        queued.push((name.to_string(), id));
                        "queued".to_string()
                    } else {
                        format!("held {:?}", sorted(lock.keys()))
                    };
                    if model.locks.get(name).is_some_and(|l| l.holds.is_empty() && l.queue.is_empty()) {
                        model.locks.remove(name);
                    }
                    let request = Acquire {
                        key: key.into(), requestor: requestor.into(),
                        ttl: ttl.map(Duration::from_secs),
                        info: info.map(build_info).unwrap_or_default(),
                        slots,
                        release_with_build: info.filter(|_| with_build).map(|b| Box::new(build_ref(b))),
                        renew,
                    };
                    (Op::Acquire { name: name.into(), request, waiter }, expected)
                }
                Step::Release { name, key, requestor } => {
                    let (name, key, requestor) = (NAMES[name], KEYS[key], REQUESTORS[requestor]);
                    let expected = match model.locks.get_mut(name) {
                        None => "not held".to_string(),
                        Some(lock) if lock.holds.is_empty() => "not held".to_string(),
                        Some(lock) if !lock.keys().iter().any(|k| k == key) => format!("wrong key {:?}", sorted(lock.keys())),
                        Some(lock) => {
                            let before = lock.holds.len();
                            lock.holds.retain(|h| !(h.key == key && h.requestor == requestor));
                            let changed = lock.holds.len() != before;
                            let grants = model.serve(name, now);
                            format!("released {changed} {grants:?}")
                        }
                    };
                    (Op::Release { name: name.into(), key: key.into(), requestor: requestor.into() }, expected)
                }
                Step::Force { name } => {
                    let name = NAMES[name];
                    let previous = model.locks.get(name).map(|l| l.keys().len()).unwrap_or(0);
                    if let Some(lock) = model.locks.get_mut(name) {
                        lock.holds.clear();
                    }
                    let grants = model.serve(name, now);
                    (Op::ForceRelease { name: name.into(), by: None }, format!("forced {previous} {grants:?}"))
                }
                Step::Cancel { nth } => {
                    let Some((name, id)) = queued.get(nth).cloned() else { continue };
                    if let Some(lock) = model.locks.get_mut(&name) {
                        lock.queue.retain(|q| q.id != id);
                    }
                    let grants = model.serve(&name, now);
                    (Op::Cancel { name, waiter: id, leaving: Leaving::Withdrawn }, format!("grants {grants:?}"))
                }
                Step::Revoke { nth } => {
                    let Some(grant) = granted.get(nth).cloned() else { continue };
                    let expected = match model.locks.get_mut(&grant.name) {
                        Some(lock) if lock.generations.get(&grant.key) == Some(&grant.grant.generation)
                            && lock.holds.iter().any(|h| h.key == grant.key && h.requestor == grant.requestor) =>
                        {
                            if let Some(index) = lock.holds.iter().position(|h| h.key == grant.key && h.requestor == grant.requestor) {
                                if lock.holds[index].count > 1 {
                                    lock.holds[index].count -= 1;
                                } else {
                                    lock.holds.remove(index);
                                }
                            }
                            let grants = model.serve(&grant.name, now);
                            format!("revoked {grants:?}")
                        }
                        _ => "not revoked".to_string(),
                    };
                    (Op::Revoke(grant), expected)
                }
                Step::Reclaim { name, key, requestor, build, stale } => {
                    let (name, key, requestor) = (NAMES[name], KEYS[key], REQUESTORS[requestor]);
                    let current = model.locks.get(name).and_then(|l| l.generations.get(key).copied());
                    let generation = current.unwrap_or(1).saturating_sub(u64::from(stale));
                    let expected = match model.locks.get_mut(name) {
                        Some(lock) if lock.keys().iter().any(|k| k == key)
                            && Some(generation) == current
                            && lock.holds.iter().any(|h| h.key == key && h.requestor == requestor && h.build == Some(build)) =>
                        {
                            lock.holds.retain(|h| !(h.key == key && h.requestor == requestor));
                            let grants = model.serve(name, now);
                            format!("released true {grants:?}")
                        }
                        _ => "not held".to_string(),
                    };
                    let hold = Reclaim {
                        item: None,
                        name: name.into(), key: key.into(), requestor: requestor.into(),
                        generation, build: build_ref(build),
                    };
                    (Op::Reclaim(hold), expected)
                }
                Step::Restart => {
                    let text = state_file::encode(&table).expect("encode");
                    let text = String::from_utf8(text).expect("UTF-8");
                    let restored = state_file::decode(&text, now).expect("decode");
                    prop_assert_eq!(restored.next_generation(), table.next_generation());
                    table = restored;
                    // Queued requests died with the server.
                    for lock in model.locks.values_mut() {
                        lock.queue.clear();
                    }
                    model.locks.retain(|_, lock| !lock.holds.is_empty());
                    prop_assert_eq!(visible(&table), visible_model(&model), "after a restart");
                    told.waiting.clear();
                    check_invariants(&table);
                    continue;
                }
                Step::Tick { seconds } => {
                    clock += seconds;
                    let now = at(clock);
                    let names: Vec<String> = model.locks.keys().cloned().collect();
                    let mut expired = 0;
                    let mut grants = Vec::new();
                    for name in names {
                        let Some(lock) = model.locks.get_mut(&name) else { continue };
                        let before = lock.holds.len();
                        lock.holds.retain(|h| h.expires.is_none_or(|at| at > now));
                        expired += before - lock.holds.len();
                        if before != lock.holds.len() {
                            grants.extend(model.serve(&name, now));
                        }
                    }
                    let mut events = Vec::new();
                    let effect = table.apply_recorded(&Op::Expire, now, &mut events);
                    told.hear(&events);
                    prop_assert_eq!(&told.holds, &Told::of(&table).holds, "history after expiry");
                    let Effect::Expiry(expiry) = &effect else { panic!("expire gave {effect:?}") };
                    prop_assert_eq!(expiry.expired.len(), expired);
                    prop_assert_eq!(grant_ids(&expiry.grants), grants);
                    granted.extend(expiry.grants.iter().cloned());
                    prop_assert_eq!(visible(&table), visible_model(&model));
                    check_invariants(&table);
                    continue;
                }
            };
            let mut events = Vec::new();
            let effect = table.apply_recorded(&op, now, &mut events);
            told.hear(&events);
            let truth = Told::of(&table);
            prop_assert_eq!(&told.holds, &truth.holds, "history after {:?}: {:?}", op, events);
            prop_assert_eq!(&told.waiting, &truth.waiting, "queue history after {:?}: {:?}", op, events);
            granted.extend(effect.grants().iter().cloned());
            let actual = match &effect {
                Effect::Acquire(AcquireOutcome::Granted(g)) => format!("granted {} {}", g.generation, g.count),
                Effect::Acquire(AcquireOutcome::Queued) => "queued".to_string(),
                Effect::Acquire(AcquireOutcome::Held(c)) => format!("held {:?}", sorted(c.keys.clone())),
                Effect::Acquire(AcquireOutcome::SlotsMismatch { slots }) => format!("mismatch {slots}"),
                Effect::Acquire(AcquireOutcome::OverLimit(limit)) => format!("over limit {limit:?}"),
                Effect::Release(ReleaseOutcome::NotHeld) => "not held".to_string(),
                Effect::Release(ReleaseOutcome::WrongKey(c)) => format!("wrong key {:?}", sorted(c.keys.clone())),
                Effect::Release(ReleaseOutcome::Released { changed, grants }) => {
                    format!("released {changed} {:?}", grant_ids(grants))
                }
                Effect::ForceRelease(force) => format!("forced {} {:?}", force.previous.len(), grant_ids(&force.grants)),
                Effect::Grants(grants) => format!("grants {:?}", grant_ids(grants)),
                Effect::Revoke(Some(grants)) => format!("revoked {:?}", grant_ids(grants)),
                Effect::Revoke(None) => "not revoked".to_string(),
                Effect::Expiry(_) => unreachable!("expiry is checked above"),
                Effect::Pool(_) => unreachable!("the lock model makes no pool changes"),
            };
            prop_assert_eq!(&actual, &expected, "after {:?}", op);
            prop_assert_eq!(visible(&table), visible_model(&model), "after {:?}", op);
            check_invariants(&table);
        }
    }
}
