//! Property test: the pool rules against a deliberately naive model of the same contract.
//!
//! The model keeps a pool as a plain map of items and a `Vec` queue, and serves the queue by
//! rescanning it from the front; the rules keep a persistent queue, an expiry index and
//! copy-on-write pools. Both see the same random operations (adds, claims of any or a named
//! item, waiting or not, with leases, releases by key or by name, updates, removals, cancels,
//! lease expiry and a restart through the state file); every outcome and the visible state
//! after every step must agree, and after every step no queued claim may be one that could be
//! granted (nobody waits for a free item, so nobody is passed over).
//!
//! 400 cases by default; `LOCKER_PROPTEST_CASES=N` runs N.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use locker::rules::events::{Event, EventKind, Leaving};
use locker::rules::{
    Acquire, ClaimOutcome, Effect, Info, LockTable, Op, PoolChange, PoolOutcome, WaiterGrant,
};
use locker::store::state_file;
use proptest::prelude::*;

const POOL: &str = "p";
const ITEMS: [&str; 3] = ["a", "b", "c"];
const KEYS: [&str; 3] = ["k1", "k2", "k3"];
const REQUESTORS: [&str; 2] = ["r1", "r2"];
const METADATA: [&str; 2] = ["m1", "m2"];

fn cases() -> u32 {
    match std::env::var("LOCKER_PROPTEST_CASES") {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("LOCKER_PROPTEST_CASES={value:?} is not a number")),
        Err(_) => 400,
    }
}

#[derive(Clone, Debug)]
enum Step {
    Add {
        item: usize,
        metadata: usize,
        claim: Option<(usize, usize)>,
    },
    Claim {
        item: Option<usize>,
        key: usize,
        requestor: usize,
        ttl: Option<u64>,
        wait: bool,
    },
    Release {
        item: usize,
        key: Option<usize>,
        requestor: Option<usize>,
    },
    Update {
        item: usize,
        metadata: usize,
    },
    Remove {
        item: usize,
        key: Option<usize>,
    },
    /// Cancels the n-th waiter ever queued (if still queued).
    Cancel {
        nth: usize,
    },
    /// Moves the clock on and expires what ran out.
    Expire {
        seconds: u64,
    },
    /// Writes the state file and reads it back; queued claims are gone.
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    let item = 0..ITEMS.len();
    let key = 0..KEYS.len();
    let requestor = 0..REQUESTORS.len();
    prop_oneof![
        2 => (item.clone(), 0..METADATA.len(), proptest::option::weighted(0.3, (key.clone(), requestor.clone())))
            .prop_map(|(item, metadata, claim)| Step::Add { item, metadata, claim }),
        5 => (proptest::option::weighted(0.5, item.clone()), key.clone(), requestor.clone(), proptest::option::weighted(0.3, 1..4u64), any::<bool>())
            .prop_map(|(item, key, requestor, ttl, wait)| Step::Claim { item, key, requestor, ttl, wait }),
        4 => (item.clone(), proptest::option::weighted(0.7, key.clone()), proptest::option::weighted(0.5, requestor))
            .prop_map(|(item, key, requestor)| Step::Release { item, key, requestor }),
        1 => (item.clone(), 0..METADATA.len()).prop_map(|(item, metadata)| Step::Update { item, metadata }),
        1 => (item, proptest::option::weighted(0.5, key)).prop_map(|(item, key)| Step::Remove { item, key }),
        1 => (0..8usize).prop_map(|nth| Step::Cancel { nth }),
        1 => (0..3u64).prop_map(|seconds| Step::Expire { seconds }),
        1 => Just(Step::Restart),
    ]
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MHolder {
    key: String,
    generation: u64,
    /// requestor → (count, lease end in seconds)
    requestors: BTreeMap<String, (u64, Option<u64>)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MItem {
    metadata: String,
    holder: Option<MHolder>,
    freed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MWaiter {
    id: u64,
    item: Option<String>,
    key: String,
    requestor: String,
    ttl: Option<u64>,
}

#[derive(Default)]
struct Model {
    items: BTreeMap<String, MItem>,
    queue: Vec<MWaiter>,
    clock: u64,
    next_generation: u64,
}

impl Model {
    fn admits(&self, item: &str, key: &str) -> bool {
        self.items
            .get(item)
            .is_some_and(|i| i.holder.as_ref().is_none_or(|h| h.key == key))
    }

    fn pick(&self, item: Option<&str>, key: &str) -> Option<String> {
        match item {
            Some(item) => self.admits(item, key).then(|| item.to_string()),
            None => self
                .items
                .iter()
                .filter(|(_, i)| i.holder.is_none())
                .min_by_key(|(name, i)| (i.freed, name.to_string()))
                .map(|(name, _)| name.clone()),
        }
    }

    fn grant(
        &mut self,
        item: &str,
        key: &str,
        requestor: &str,
        ttl: Option<u64>,
        now: u64,
    ) -> (u64, u64) {
        let next_generation = &mut self.next_generation;
        let entry = self.items.get_mut(item).expect("granted item exists");
        let holder = entry.holder.get_or_insert_with(|| {
            *next_generation += 1;
            MHolder {
                key: key.to_string(),
                generation: *next_generation - 1,
                requestors: BTreeMap::new(),
            }
        });
        let hold = holder
            .requestors
            .entry(requestor.to_string())
            .or_insert((0, None));
        hold.0 += 1;
        hold.1 = ttl.map(|t| now + t);
        (holder.generation, hold.0)
    }

    /// Grants queued claims front to back whenever what they ask for is free.
    fn serve(&mut self, now: u64) -> Vec<u64> {
        let mut granted = Vec::new();
        for waiter in self.queue.clone() {
            if let Some(item) = self.pick(waiter.item.as_deref(), &waiter.key) {
                self.grant(&item, &waiter.key, &waiter.requestor, waiter.ttl, now);
                granted.push(waiter.id);
            }
        }
        self.queue.retain(|w| !granted.contains(&w.id));
        granted
    }

    fn free(&mut self, item: &str) -> Option<MHolder> {
        self.clock += 1;
        let entry = self.items.get_mut(item)?;
        entry.freed = self.clock;
        entry.holder.take()
    }

    /// A pool with neither items nor waiters is forgotten, its clock with it.
    fn tidy(&mut self) {
        if self.items.is_empty() && self.queue.is_empty() {
            self.clock = 0;
        }
    }

    fn insert(&mut self, item: &str, metadata: &str) {
        self.clock += 1;
        self.items.insert(
            item.to_string(),
            MItem {
                metadata: metadata.to_string(),
                holder: None,
                freed: self.clock,
            },
        );
    }
}

fn request(key: &str, requestor: &str, ttl: Option<u64>) -> Acquire {
    Acquire {
        key: key.into(),
        requestor: requestor.into(),
        ttl: ttl.map(Duration::from_secs),
        info: Info::new(),
        slots: None,
        release_with_build: None,
        renew: false,
    }
}

fn ids(grants: &[WaiterGrant]) -> Vec<u64> {
    grants.iter().map(|g| g.waiter).collect()
}

/// An outcome of the rules, as text to compare with the model's.
fn describe(effect: &Effect) -> String {
    match effect {
        Effect::Pool(PoolOutcome::Claim(ClaimOutcome::Granted(g))) => {
            format!(
                "granted {} {} {}",
                g.item, g.grant.generation, g.grant.count
            )
        }
        Effect::Pool(PoolOutcome::Claim(ClaimOutcome::Queued)) => "queued".into(),
        Effect::Pool(PoolOutcome::Claim(ClaimOutcome::Held(c))) => format!("held {:?}", c.keys),
        Effect::Pool(PoolOutcome::Claim(ClaimOutcome::NoSuchItem))
        | Effect::Pool(PoolOutcome::NoSuchItem) => "no such item".into(),
        Effect::Pool(PoolOutcome::Freed { previous, grants }) => {
            format!(
                "freed {:?} {:?}",
                previous.as_ref().map(|h| h.key.clone()),
                ids(grants)
            )
        }
        Effect::Pool(PoolOutcome::Stored { changed, grants }) => {
            format!("stored {changed} {:?}", ids(grants))
        }
        Effect::Pool(PoolOutcome::Claimed(c)) => format!("claimed {:?}", c.keys),
        Effect::Pool(PoolOutcome::Exists) => "exists".into(),
        Effect::Pool(PoolOutcome::Cancelled(grants)) => format!("cancelled {:?}", ids(grants)),
        Effect::Expiry(expiry) => {
            format!("expired {} {:?}", expiry.expired.len(), ids(&expiry.grants))
        }
        other => format!("unexpected {other:?}"),
    }
}

/// The visible state of the rules' pool, shaped like the model's.
fn visible(table: &LockTable, start: SystemTime) -> (BTreeMap<String, MItem>, Vec<u64>) {
    let Some(pool) = table.pool(POOL) else {
        return (BTreeMap::new(), Vec::new());
    };
    let items = pool
        .items
        .iter()
        .map(|(name, item)| {
            let holder = item.holder.as_ref().map(|h| MHolder {
                key: h.key.clone(),
                generation: h.generation,
                requestors: h
                    .requestors
                    .iter()
                    .map(|(r, hold)| {
                        let end = hold
                            .expires_at
                            .map(|at| at.duration_since(start).expect("after start").as_secs());
                        (r.clone(), (hold.count, end))
                    })
                    .collect(),
            });
            (
                name.clone(),
                MItem {
                    metadata: item.metadata.to_string(),
                    holder,
                    freed: item.freed,
                },
            )
        })
        .collect();
    (items, pool.queued().map(|(id, _, _)| id).collect())
}

fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut table = LockTable::default();
    let mut told = Told::default();
    let mut model = Model {
        next_generation: table.next_generation(),
        ..Model::default()
    };
    let mut now = 0u64;
    let mut next_waiter = 1u64;
    let mut queued_ids = Vec::new();
    for step in steps {
        let at = start + Duration::from_secs(now);
        let (op, expected) = match &step {
            Step::Add {
                item,
                metadata,
                claim,
            } => {
                let (item, metadata) = (ITEMS[*item], METADATA[*metadata]);
                let expected = match model.items.get(item) {
                    Some(existing) => {
                        let same = match (claim, &existing.holder) {
                            (None, None) => true,
                            (Some((k, _)), Some(h)) => h.key == KEYS[*k],
                            _ => false,
                        };
                        if same && existing.metadata == metadata {
                            "stored false []".to_string()
                        } else {
                            "exists".to_string()
                        }
                    }
                    None => {
                        model.insert(item, metadata);
                        if let Some((k, r)) = claim {
                            model.grant(item, KEYS[*k], REQUESTORS[*r], None, now);
                        }
                        format!("stored true {:?}", model.serve(now))
                    }
                };
                let change = PoolChange::Add {
                    item: item.into(),
                    metadata: Arc::from(metadata),
                    claim: claim.map(|(k, r)| request(KEYS[k], REQUESTORS[r], None)),
                };
                (
                    Op::Pool {
                        name: POOL.into(),
                        change,
                    },
                    expected,
                )
            }
            Step::Claim {
                item,
                key,
                requestor,
                ttl,
                wait,
            } => {
                let (item, key, requestor) =
                    (item.map(|i| ITEMS[i]), KEYS[*key], REQUESTORS[*requestor]);
                let waiter = wait.then(|| {
                    next_waiter += 1;
                    next_waiter
                });
                let exists = match item {
                    Some(item) => model.items.contains_key(item),
                    None => !model.items.is_empty(),
                };
                let expected = if !exists {
                    "no such item".to_string()
                } else {
                    let reentrant = item.is_some_and(|i| {
                        model.items[i].holder.as_ref().is_some_and(|h| {
                            h.key == key && h.requestors.get(requestor).is_some_and(|r| r.0 > 0)
                        })
                    });
                    let chosen = model.pick(item, key).filter(|chosen| {
                        reentrant
                            || !model.queue.iter().any(|w| match w.item.as_deref() {
                                Some(wanted) => wanted == chosen && model.admits(chosen, &w.key),
                                None => model.items[chosen.as_str()].holder.is_none(),
                            })
                    });
                    match (chosen, waiter) {
                        (Some(chosen), _) => {
                            let (generation, count) =
                                model.grant(&chosen, key, requestor, *ttl, now);
                            format!("granted {chosen} {generation} {count}")
                        }
                        (None, Some(id)) => {
                            model.queue.push(MWaiter {
                                id,
                                item: item.map(String::from),
                                key: key.into(),
                                requestor: requestor.into(),
                                ttl: *ttl,
                            });
                            queued_ids.push(id);
                            "queued".to_string()
                        }
                        (None, None) => {
                            let keys: Vec<String> = item
                                .and_then(|i| model.items[i].holder.as_ref().map(|h| h.key.clone()))
                                .into_iter()
                                .collect();
                            format!("held {keys:?}")
                        }
                    }
                };
                let change = PoolChange::Claim {
                    item: item.map(String::from),
                    request: request(key, requestor, *ttl),
                    waiter,
                };
                (
                    Op::Pool {
                        name: POOL.into(),
                        change,
                    },
                    expected,
                )
            }
            Step::Release {
                item,
                key,
                requestor,
            } => {
                let (item, key, requestor) = (
                    ITEMS[*item],
                    key.map(|k| KEYS[k]),
                    requestor.map(|r| REQUESTORS[r]),
                );
                let expected = match model.items.get(item).map(|i| i.holder.clone()) {
                    None => "no such item".to_string(),
                    Some(None) => "freed None []".to_string(),
                    Some(Some(holder)) => match (key, requestor) {
                        (Some(key), _) if holder.key != key => {
                            format!("claimed {:?}", [holder.key])
                        }
                        (Some(_), Some(requestor)) => {
                            let entry = model
                                .items
                                .get_mut(item)
                                .and_then(|i| i.holder.as_mut())
                                .expect("held");
                            if entry.requestors.remove(requestor).is_none()
                                || !entry.requestors.is_empty()
                            {
                                "freed None []".to_string()
                            } else {
                                let previous = model.free(item).map(|h| h.key);
                                format!("freed {previous:?} {:?}", model.serve(now))
                            }
                        }
                        _ => {
                            let previous = model.free(item).map(|h| h.key);
                            format!("freed {previous:?} {:?}", model.serve(now))
                        }
                    },
                };
                let change = PoolChange::Release {
                    item: item.into(),
                    key: key.map(String::from),
                    requestor: requestor.map(String::from),
                    by: None,
                };
                (
                    Op::Pool {
                        name: POOL.into(),
                        change,
                    },
                    expected,
                )
            }
            Step::Update { item, metadata } => {
                let (item, metadata) = (ITEMS[*item], METADATA[*metadata]);
                let expected = match model.items.get_mut(item) {
                    Some(existing) => match &existing.holder {
                        Some(h) => format!("claimed {:?}", std::slice::from_ref(&h.key)),
                        None if existing.metadata == metadata => "stored false []".to_string(),
                        None => {
                            existing.metadata = metadata.to_string();
                            "stored true []".to_string()
                        }
                    },
                    None => {
                        model.insert(item, metadata);
                        format!("stored true {:?}", model.serve(now))
                    }
                };
                let change = PoolChange::Update {
                    item: item.into(),
                    metadata: Arc::from(metadata),
                };
                (
                    Op::Pool {
                        name: POOL.into(),
                        change,
                    },
                    expected,
                )
            }
            Step::Remove { item, key } => {
                let (item, key) = (ITEMS[*item], key.map(|k| KEYS[k]));
                let expected = match model.items.get(item).map(|i| i.holder.clone()) {
                    None => "no such item".to_string(),
                    Some(Some(holder)) if key.is_some_and(|k| k != holder.key) => {
                        format!("claimed {:?}", [holder.key])
                    }
                    Some(holder) => {
                        model.items.remove(item);
                        format!("freed {:?} {:?}", holder.map(|h| h.key), Vec::<u64>::new())
                    }
                };
                let change = PoolChange::Remove {
                    item: item.into(),
                    key: key.map(String::from),
                };
                (
                    Op::Pool {
                        name: POOL.into(),
                        change,
                    },
                    expected,
                )
            }
            Step::Cancel { nth } => {
                let Some(&waiter) = queued_ids.get(*nth) else {
                    continue;
                };
                model.queue.retain(|w| w.id != waiter);
                let expected = format!("cancelled {:?}", model.serve(now));
                (
                    Op::Pool {
                        name: POOL.into(),
                        change: PoolChange::Cancel {
                            waiter,
                            leaving: Leaving::Withdrawn,
                        },
                    },
                    expected,
                )
            }
            Step::Expire { seconds } => {
                now += seconds;
                let at = start + Duration::from_secs(now);
                let mut expired = 0;
                let names: Vec<String> = model.items.keys().cloned().collect();
                let mut freed_any = false;
                for name in names {
                    let Some(holder) = model.items.get_mut(&name).and_then(|i| i.holder.as_mut())
                    else {
                        continue;
                    };
                    let before = holder.requestors.len();
                    holder
                        .requestors
                        .retain(|_, (_, end)| end.is_none_or(|end| end > now));
                    expired += before - holder.requestors.len();
                    if holder.requestors.is_empty() {
                        model.free(&name);
                        freed_any = true;
                    }
                }
                let grants = if expired > 0 || freed_any {
                    model.serve(now)
                } else {
                    Vec::new()
                };
                let mut events = Vec::new();
                let effect = table.apply_recorded(&Op::Expire, at, &mut events);
                told.hear(&events);
                prop_assert_eq!(&told, &Told::of(&table), "history after expiry");
                prop_assert_eq!(describe(&effect), format!("expired {expired} {grants:?}"));
                prop_assert_eq!(
                    visible(&table, start),
                    (
                        model.items.clone(),
                        model.queue.iter().map(|w| w.id).collect()
                    )
                );
                continue;
            }
            Step::Restart => {
                let bytes = state_file::encode(&table).expect("encodes");
                let text = String::from_utf8(bytes).expect("utf-8");
                table = state_file::decode(&text, at).expect("decodes");
                model.queue.clear();
                model.tidy();
                prop_assert_eq!(visible(&table, start), (model.items.clone(), Vec::new()));
                continue;
            }
        };
        model.tidy();
        let mut events = Vec::new();
        let effect = table.apply_recorded(&op, at, &mut events);
        told.hear(&events);
        prop_assert_eq!(
            &told,
            &Told::of(&table),
            "history after {:?}: {:?}",
            step,
            events
        );
        prop_assert_eq!(describe(&effect), expected, "after {:?}", step);
        prop_assert_eq!(
            visible(&table, start),
            (
                model.items.clone(),
                model.queue.iter().map(|w| w.id).collect()
            ),
            "after {:?}",
            step
        );
        // Nobody waits for what is free: a queued claim that could be granted was passed over.
        for w in &model.queue {
            prop_assert!(
                model.pick(w.item.as_deref(), &w.key).is_none(),
                "{:?} waits for a free item",
                w
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn pool_rules_agree_with_a_naive_model(steps in proptest::collection::vec(step(), 1..60)) {
        run(steps)?;
    }
}

/// What the history says the pool has: its items, and each claim (item, key, requestor) →
/// (count, generation), folded from its events alone.
#[derive(Debug, Default, PartialEq, Eq)]
struct Told {
    items: std::collections::BTreeSet<String>,
    holds: BTreeMap<(String, String, String), (u64, u64)>,
}

impl Told {
    fn hear(&mut self, events: &[Event]) {
        for event in events {
            // A claim of any item waits without naming one.
            let waiting = matches!(
                event.kind,
                EventKind::Queued | EventKind::TimedOut | EventKind::Withdrawn
            ) && event.generation.is_none();
            if waiting {
                continue;
            }
            let item = event.item.clone().expect("a pool event names its item");
            let id = (
                item.clone(),
                event.key.clone().unwrap_or_default(),
                event.requestor.clone().unwrap_or_default(),
            );
            match event.kind {
                EventKind::ItemAdded => assert!(self.items.insert(item), "added twice"),
                EventKind::ItemRemoved => {
                    assert!(self.items.remove(&item), "removed what was never added");
                    self.holds.retain(|(held, _, _), _| *held != item);
                }
                EventKind::ItemUpdated => assert!(self.items.contains(&item)),
                EventKind::Acquired => {
                    let count = event.count.expect("a claim names the count");
                    let generation = event.generation.expect("a claim names the generation");
                    self.holds.insert(id, (count, generation));
                }
                EventKind::Released if event.count.is_some() => {
                    let hold = self
                        .holds
                        .get_mut(&id)
                        .expect("released what was never claimed");
                    hold.0 = event.count.unwrap_or_default();
                }
                kind if kind.ends_holding() => {
                    let hold = self.holds.remove(&id).expect("ended a claim never made");
                    assert_eq!(Some(hold.1), event.generation, "{event:?}");
                }
                other => panic!("unexpected {other:?} in {event:?}"),
            }
        }
    }

    fn of(table: &LockTable) -> Told {
        let mut told = Told::default();
        for pool in table.pools().values() {
            for (name, item) in &pool.items {
                told.items.insert(name.clone());
                if let Some(holder) = &item.holder {
                    for (requestor, hold) in holder.requestors.iter() {
                        told.holds.insert(
                            (name.clone(), holder.key.clone(), requestor.clone()),
                            (hold.count, holder.generation),
                        );
                    }
                }
            }
        }
        told
    }
}
