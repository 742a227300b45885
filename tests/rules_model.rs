//! Property test: the lock rules against a deliberately naive model of the same contract.
//!
//! The model keeps each lock as flat lists (holds as (key, requestor, count, expiry) rows, a
//! queue, a slot count) and serves the queue by rescanning from scratch; the rules keep
//! structured holders. Both see the same random operations; every outcome and the visible
//! state after every step must agree, and the invariants must hold throughout.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use locker::rules::{
    Acquire, AcquireOutcome, Effect, Info, LockTable, Op, ReleaseOutcome, WaiterGrant, WaiterId,
};
use proptest::prelude::*;

const NAMES: [&str; 2] = ["a", "b"];
const KEYS: [&str; 3] = ["k1", "k2", "k3"];
const REQUESTORS: [&str; 2] = ["r1", "r2"];

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
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..2usize, 0..3usize, 0..2usize, prop::option::of(1..4u64),
              prop::option::weighted(0.2, 1..3u32), any::<bool>(), prop::bool::weighted(0.25))
            .prop_map(|(name, key, requestor, ttl, slots, wait, renew)| Step::Acquire {
                name, key, requestor, ttl, slots, wait, renew
            }),
        3 => (0..2usize, 0..3usize, 0..2usize)
            .prop_map(|(name, key, requestor)| Step::Release { name, key, requestor }),
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
}

#[derive(Clone, Debug)]
struct Queued {
    id: WaiterId,
    key: String,
    requestor: String,
    ttl: Option<u64>,
    renew: bool,
}

#[derive(Clone, Debug, Default)]
struct ModelLock {
    slots: u32,
    holds: Vec<Hold>,
    generations: BTreeMap<String, u64>,
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
    fn grant(
        &mut self,
        name: &str,
        key: &str,
        requestor: &str,
        ttl: Option<u64>,
        renew: bool,
        now: SystemTime,
    ) -> (u64, u64) {
        let next = &mut self.next_generation;
        let lock = self.locks.get_mut(name).expect("lock exists");
        if !lock.keys().iter().any(|k| k == key) {
            // A new holding: drop the old generation of this key (its holding ended).
            lock.generations.insert(key.to_string(), *next);
            *next += 1;
            // Keep generations in the order holdings started.
        }
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
                hold.count
            }
            None => {
                lock.holds.push(Hold {
                    key: key.into(),
                    requestor: requestor.into(),
                    count: 1,
                    expires,
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

/// Per lock: holders as (key, generation, counts) sorted by key, and the queue length.
type Visible = BTreeMap<String, (Vec<(String, u64, BTreeMap<String, u64>)>, usize)>;

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
                .map(|h| (h.key.clone(), h.generation, h.counts()))
                .collect();
            holders.sort();
            (name.clone(), (holders, lock.waiters()))
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
                        .map(|h| (h.requestor.clone(), h.count))
                        .collect();
                    let generation = lock.generations[&key];
                    (key, generation, counts)
                })
                .collect();
            holders.sort();
            (name.clone(), (holders, lock.queue.len()))
        })
        .collect()
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
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn rules_agree_with_the_model(steps in prop::collection::vec(step(), 1..60)) {
        let mut table = LockTable::default();
        let mut model = Model { next_generation: 1, ..Model::default() };
        let mut clock = 0u64;
        let mut queued: Vec<(String, WaiterId)> = Vec::new();
        let mut granted: Vec<WaiterGrant> = Vec::new();
        let mut next_id: WaiterId = 1;

        for step in steps {
            let now = at(clock);
            let (op, expected) = match step {
                Step::Acquire { name, key, requestor, ttl, slots, wait, renew } => {
                    let (name, key, requestor) = (NAMES[name], KEYS[key], REQUESTORS[requestor]);
                    let waiter = wait.then(|| { next_id += 1; next_id });
                    let lock = model.locks.entry(name.to_string()).or_insert_with(|| ModelLock {
                        slots: slots.unwrap_or(1), ..ModelLock::default()
                    });
                    let expected = if slots.is_some_and(|s| s != lock.slots) {
                        format!("mismatch {}", lock.slots)
                    } else if lock.holds_already(key, requestor) || (lock.queue.is_empty() && lock.fits(key)) {
                        let (generation, count) = model.grant(name, key, requestor, ttl, renew, now);
                        format!("granted {generation} {count}")
                    } else if let Some(id) = waiter {
                        lock.queue.push(Queued { id, key: key.into(), requestor: requestor.into(), ttl, renew });
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
                        ttl: ttl.map(Duration::from_secs), info: Info::new(), slots, release_with_build: None,
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
                    (Op::ForceRelease { name: name.into() }, format!("forced {previous} {grants:?}"))
                }
                Step::Cancel { nth } => {
                    let Some((name, id)) = queued.get(nth).cloned() else { continue };
                    if let Some(lock) = model.locks.get_mut(&name) {
                        lock.queue.retain(|q| q.id != id);
                    }
                    let grants = model.serve(&name, now);
                    (Op::Cancel { name, waiter: id }, format!("grants {grants:?}"))
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
                    let effect = table.apply(&Op::Expire, now);
                    let Effect::Expiry(expiry) = &effect else { panic!("expire gave {effect:?}") };
                    prop_assert_eq!(expiry.expired.len(), expired);
                    prop_assert_eq!(grant_ids(&expiry.grants), grants);
                    granted.extend(expiry.grants.iter().cloned());
                    prop_assert_eq!(visible(&table), visible_model(&model));
                    check_invariants(&table);
                    continue;
                }
            };
            let effect = table.apply(&op, now);
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
            };
            prop_assert_eq!(&actual, &expected, "after {:?}", op);
            prop_assert_eq!(visible(&table), visible_model(&model), "after {:?}", op);
            check_invariants(&table);
        }
    }
}
