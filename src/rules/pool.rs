//! Pools: named sets of items that jobs claim one at a time, the model of concourse's
//! pool-resource. An item has a name, metadata (opaque text) and at most one holding, with the
//! key, requestors, lease, build and fencing generation a lock's holding has.
//!
//! Claims wait in one FIFO queue per pool. A claim names an item or takes any free one; the
//! queue is served front to back, and a waiter is granted when what it asks for is free, so no
//! waiter is ever passed over for an item it could take (a waiter for a named item that is held
//! does not hold up a later waiter for another item). A claim of any item takes the free item
//! released longest ago (then by name), so work spreads over the pool.
//!
//! Waiting for an item to become free or claimed without taking it (pool-resource's `check`
//! and `check_unclaimed`), and an update that waits while its item is claimed, are not queued
//! here: they watch the committed state (see the store), since they take nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use rpds::QueueSync;
use serde::{Deserialize, Serialize};

use super::{Acquire, Conflict, Grant, Holder, WaiterGrant, WaiterId};

/// One item of a pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// What pool-resource keeps in the item's file: often YAML or JSON, kept as given. Shared,
    /// so copying a pool on write does not copy every item's text.
    pub metadata: Arc<str>,
    /// Who claimed the item; `None`: unclaimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<Holder>,
    /// The pool's release clock when the item was last freed (or added): the free item with the
    /// lowest value is handed out first.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub freed: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl Item {
    pub fn is_claimed(&self) -> bool {
        self.holder.is_some()
    }

    /// Whether `request`'s requestor already holds this item under its key (a reentrant claim).
    fn held_by(&self, request: &Acquire) -> bool {
        self.holder.as_ref().is_some_and(|h| {
            h.key == request.key
                && h.requestors
                    .get(&request.requestor)
                    .is_some_and(|r| r.count > 0)
        })
    }

    /// Whether `request` may be granted this item now.
    fn admits(&self, request: &Acquire) -> bool {
        match &self.holder {
            None => true,
            Some(holder) => holder.key == request.key,
        }
    }

    fn expires_at(&self) -> Option<SystemTime> {
        self.holder.as_ref().and_then(Holder::expires_at)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PoolWaiter {
    id: WaiterId,
    /// The item asked for; `None`: any free item.
    item: Option<String>,
    request: Acquire,
    /// When it was queued; `None` when a backend restored it without the time.
    since: Option<SystemTime>,
}

/// A pool: its items by name, and the queue of claims waiting for one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub items: BTreeMap<String, Item>,
    /// Ticks once per freed item; see [`Item::freed`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub clock: u64,
    /// Waiting claims, in arrival order. Persistent, as a lock's queue is (see `Lock`).
    #[serde(skip)]
    queue: QueueSync<PoolWaiter>,
}

/// A granted claim: which item, and the holding's generation and the requestor's count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemGrant {
    pub item: String,
    pub grant: Grant,
}

/// What a claim came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    Granted(ItemGrant),
    /// Not grantable now; the waiter was put at the back of the pool's queue.
    Queued,
    /// Not grantable now and the caller does not wait: the named item is claimed (by these
    /// keys), or every item is.
    Held(Conflict),
    /// The named item is not in the pool, or the pool has no items at all.
    NoSuchItem,
}

/// What a change to a pool came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolOutcome {
    Claim(ClaimOutcome),
    /// A release or removal: the previous holding (`None`: it was not claimed) and whom that
    /// let in.
    Freed {
        previous: Option<Holder>,
        grants: Vec<WaiterGrant>,
    },
    /// An addition or metadata update: whether it changed anything, and whom a new item let in.
    Stored {
        changed: bool,
        grants: Vec<WaiterGrant>,
    },
    /// Refused: the item is claimed under these keys, not the one given (a release or removal
    /// naming a key), or at all (an update, which waits while it is).
    Claimed(Conflict),
    /// Refused: an addition of an item that exists with other metadata or state.
    Exists,
    /// Refused: no such item (a release, removal or update that does not add).
    NoSuchItem,
    /// A cancelled waiter, and whom that let in.
    Cancelled(Vec<WaiterGrant>),
}

impl PoolOutcome {
    /// Whether the change altered what is persisted.
    pub fn changes_state(&self) -> bool {
        match self {
            PoolOutcome::Claim(outcome) => matches!(outcome, ClaimOutcome::Granted(_)),
            PoolOutcome::Freed { .. } => true,
            PoolOutcome::Stored { changed, .. } => *changed,
            PoolOutcome::Cancelled(grants) => !grants.is_empty(),
            PoolOutcome::Claimed(_) | PoolOutcome::Exists | PoolOutcome::NoSuchItem => false,
        }
    }

    pub fn grants(&self) -> &[WaiterGrant] {
        match self {
            PoolOutcome::Freed { grants, .. }
            | PoolOutcome::Stored { grants, .. }
            | PoolOutcome::Cancelled(grants) => grants,
            _ => &[],
        }
    }
}

/// One change to a pool, as a value (see `Op`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolChange {
    /// Claims `item`, or any free item when `None`; with a waiter id, queues if it cannot.
    Claim {
        item: Option<String>,
        request: Acquire,
        waiter: Option<WaiterId>,
    },
    /// Releases `item`: with a key, that key's requestor (or, with no requestor, the whole
    /// holding under that key); with no key, whoever holds it (a release by name, as
    /// pool-resource does, and a force release).
    Release {
        item: String,
        key: Option<String>,
        requestor: Option<String>,
        /// For a force release (no key): who asked, for the history.
        by: Option<String>,
    },
    /// Adds an item, unclaimed or (with `claim`) claimed. Adding what is already there, the
    /// same way, changes nothing; anything else that exists is refused.
    Add {
        item: String,
        metadata: Arc<str>,
        claim: Option<Acquire>,
    },
    /// Replaces an unclaimed item's metadata, adding it if absent; refused while claimed.
    Update { item: String, metadata: Arc<str> },
    /// Removes an item, claimed or not; with a key, only if it is unclaimed or held under it.
    Remove { item: String, key: Option<String> },
    /// Takes a waiter out of the queue.
    Cancel {
        waiter: WaiterId,
        leaving: super::events::Leaving,
    },
}

impl Pool {
    pub fn is_unused(&self) -> bool {
        self.items.is_empty() && self.queue.is_empty()
    }

    pub fn waiters(&self) -> usize {
        self.queue.len()
    }

    /// Queued claims in arrival order: waiter id, the item asked for (`None`: any), request.
    pub fn queued(&self) -> impl Iterator<Item = (WaiterId, Option<&str>, &Acquire)> {
        self.queue
            .iter()
            .map(|w| (w.id, w.item.as_deref(), &w.request))
    }

    /// Queued claims in arrival order with when each was queued (when known).
    pub fn queued_since(
        &self,
    ) -> impl Iterator<Item = (WaiterId, Option<&str>, &Acquire, Option<SystemTime>)> {
        self.queue
            .iter()
            .map(|w| (w.id, w.item.as_deref(), &w.request, w.since))
    }

    /// Rebuilds a pool with its queue, as a backend that shares the queue stored it.
    pub fn restore(
        items: BTreeMap<String, Item>,
        clock: u64,
        queue: Vec<(WaiterId, Option<String>, Acquire, Option<SystemTime>)>,
    ) -> Self {
        Pool {
            items,
            clock,
            queue: queue
                .into_iter()
                .map(|(id, item, request, since)| PoolWaiter {
                    id,
                    item,
                    request,
                    since,
                })
                .collect(),
        }
    }

    pub fn is_queued(&self, waiter: WaiterId) -> bool {
        self.queue.iter().any(|w| w.id == waiter)
    }

    /// The earliest lease expiry of any item's holding.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.items.values().filter_map(Item::expires_at).min()
    }

    /// The item a claim of `item` (`None`: any) by `request` would get now.
    fn pick(&self, item: Option<&str>, request: &Acquire) -> Option<String> {
        match item {
            Some(name) => self
                .items
                .get(name)
                .filter(|i| i.admits(request))
                .map(|_| name.to_string()),
            None => self
                .items
                .iter()
                .filter(|(_, i)| !i.is_claimed())
                .min_by_key(|(name, i)| (i.freed, *name))
                .map(|(name, _)| name.clone()),
        }
    }

    fn grant(
        &mut self,
        item: &str,
        request: &Acquire,
        now: SystemTime,
        next_generation: &mut u64,
    ) -> Option<ItemGrant> {
        let entry = self.items.get_mut(item)?;
        let holder = entry.holder.get_or_insert_with(|| {
            let generation = *next_generation;
            *next_generation += 1;
            Holder::new(&request.key, generation, now)
        });
        let grant = holder.add(request, now);
        Some(ItemGrant {
            item: item.to_string(),
            grant,
        })
    }

    /// Applies one claim.
    pub(super) fn claim(
        &mut self,
        item: Option<&str>,
        request: &Acquire,
        now: SystemTime,
        waiter: Option<WaiterId>,
        next_generation: &mut u64,
    ) -> ClaimOutcome {
        match item {
            Some(name) if !self.items.contains_key(name) => return ClaimOutcome::NoSuchItem,
            None if self.items.is_empty() => return ClaimOutcome::NoSuchItem,
            _ => {}
        }
        let reentrant = item.is_some_and(|name| self.items[name].held_by(request));
        // Queued waiters are exactly those that cannot be served (the queue is served after
        // every change), so granting what is free now passes over nobody.
        if let Some(chosen) = self.pick(item, request)
            && (reentrant || self.no_earlier_claim_on(&chosen))
            && let Some(grant) = self.grant(&chosen, request, now, next_generation)
        {
            return ClaimOutcome::Granted(grant);
        }
        match waiter {
            Some(id) => {
                self.queue.enqueue_mut(PoolWaiter {
                    id,
                    item: item.map(str::to_string),
                    request: request.clone(),
                    since: Some(now),
                });
                ClaimOutcome::Queued
            }
            None => ClaimOutcome::Held(Conflict {
                keys: match item {
                    Some(name) => self.items[name]
                        .holder
                        .iter()
                        .map(|h| h.key.clone())
                        .collect(),
                    None => Vec::new(),
                },
            }),
        }
    }

    /// Whether no queued waiter could take `item`: one for it that it admits, or one for any
    /// item while it is free (as [`Pool::pick`] chooses).
    fn no_earlier_claim_on(&self, item: &str) -> bool {
        let Some(entry) = self.items.get(item) else {
            return true;
        };
        !self.queue.iter().any(|w| match w.item.as_deref() {
            Some(wanted) => wanted == item && entry.admits(&w.request),
            None => !entry.is_claimed(),
        })
    }

    /// Grants queued waiters front to back, each when what it asks for is free.
    pub(super) fn serve_queue(
        &mut self,
        name: &str,
        now: SystemTime,
        next_generation: &mut u64,
        grants: &mut Vec<WaiterGrant>,
    ) {
        let mut granted = Vec::new();
        for waiter in self.queue.iter().cloned().collect::<Vec<_>>() {
            let Some(chosen) = self.pick(waiter.item.as_deref(), &waiter.request) else {
                continue;
            };
            if let Some(grant) = self.grant(&chosen, &waiter.request, now, next_generation) {
                granted.push(waiter.id);
                grants.push(WaiterGrant {
                    waiter: waiter.id,
                    name: name.to_string(),
                    item: Some(grant.item),
                    key: waiter.request.key,
                    requestor: waiter.request.requestor,
                    grant: grant.grant,
                });
            }
        }
        if !granted.is_empty() {
            self.queue = self
                .queue
                .iter()
                .filter(|w| !granted.contains(&w.id))
                .cloned()
                .collect();
        }
    }

    /// Marks `item` free, first in line for nobody: it goes to the back of the free order.
    fn free(&mut self, item: &str) -> Option<Holder> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self.items.get_mut(item)?;
        entry.freed = clock;
        entry.holder.take()
    }

    pub(super) fn release(
        &mut self,
        item: &str,
        key: Option<&str>,
        requestor: Option<&str>,
    ) -> PoolOutcome {
        let Some(entry) = self.items.get_mut(item) else {
            return PoolOutcome::NoSuchItem;
        };
        let Some(holder) = entry.holder.as_mut() else {
            return PoolOutcome::Freed {
                previous: None,
                grants: Vec::new(),
            };
        };
        if let Some(key) = key
            && holder.key != key
        {
            return PoolOutcome::Claimed(Conflict {
                keys: vec![holder.key.clone()],
            });
        }
        if let (Some(_), Some(requestor)) = (key, requestor) {
            if holder.requestors.remove(requestor).is_none() {
                // Nothing of this requestor's to release.
                return PoolOutcome::Freed {
                    previous: None,
                    grants: Vec::new(),
                };
            }
            if !holder.requestors.is_empty() {
                return PoolOutcome::Freed {
                    previous: None,
                    grants: Vec::new(),
                };
            }
        }
        let previous = self.free(item);
        PoolOutcome::Freed {
            previous,
            grants: Vec::new(),
        }
    }

    pub(super) fn add(
        &mut self,
        item: &str,
        metadata: &Arc<str>,
        claim: Option<&Acquire>,
        now: SystemTime,
        next_generation: &mut u64,
    ) -> PoolOutcome {
        if let Some(existing) = self.items.get(item) {
            let same_state = match (claim, &existing.holder) {
                (None, None) => true,
                (Some(request), Some(holder)) => holder.key == request.key,
                _ => false,
            };
            return if same_state && existing.metadata == *metadata {
                PoolOutcome::Stored {
                    changed: false,
                    grants: Vec::new(),
                }
            } else {
                PoolOutcome::Exists
            };
        }
        self.clock += 1;
        self.items.insert(
            item.to_string(),
            Item {
                metadata: metadata.clone(),
                holder: None,
                freed: self.clock,
            },
        );
        if let Some(request) = claim {
            self.grant(item, request, now, next_generation);
        }
        PoolOutcome::Stored {
            changed: true,
            grants: Vec::new(),
        }
    }

    pub(super) fn update(&mut self, item: &str, metadata: &Arc<str>) -> PoolOutcome {
        match self.items.get_mut(item) {
            Some(entry) => match &entry.holder {
                Some(holder) => PoolOutcome::Claimed(Conflict {
                    keys: vec![holder.key.clone()],
                }),
                None if entry.metadata == *metadata => PoolOutcome::Stored {
                    changed: false,
                    grants: Vec::new(),
                },
                None => {
                    entry.metadata = metadata.clone();
                    PoolOutcome::Stored {
                        changed: true,
                        grants: Vec::new(),
                    }
                }
            },
            None => {
                self.clock += 1;
                self.items.insert(
                    item.to_string(),
                    Item {
                        metadata: metadata.clone(),
                        holder: None,
                        freed: self.clock,
                    },
                );
                PoolOutcome::Stored {
                    changed: true,
                    grants: Vec::new(),
                }
            }
        }
    }

    pub(super) fn remove(&mut self, item: &str, key: Option<&str>) -> PoolOutcome {
        let Some(entry) = self.items.get(item) else {
            return PoolOutcome::NoSuchItem;
        };
        if let (Some(key), Some(holder)) = (key, &entry.holder)
            && holder.key != key
        {
            return PoolOutcome::Claimed(Conflict {
                keys: vec![holder.key.clone()],
            });
        }
        let previous = self.items.remove(item).and_then(|i| i.holder);
        PoolOutcome::Freed {
            previous,
            grants: Vec::new(),
        }
    }

    pub(super) fn cancel(&mut self, waiter: WaiterId) {
        if self.is_queued(waiter) {
            self.queue = self
                .queue
                .iter()
                .filter(|w| w.id != waiter)
                .cloned()
                .collect();
        }
    }

    /// Takes back one count of a grant its waiter never received; `false` when that holding
    /// (same item, key and generation) is gone.
    pub(super) fn revoke(&mut self, grant: &WaiterGrant) -> bool {
        let Some(item) = grant.item.as_deref() else {
            return false;
        };
        let Some(holder) = self
            .items
            .get_mut(item)
            .and_then(|i| i.holder.as_mut())
            .filter(|h| h.key == grant.key && h.generation == grant.grant.generation)
        else {
            return false;
        };
        match holder.requestors.get_mut(&grant.requestor) {
            Some(hold) if hold.count > 1 => hold.count -= 1,
            Some(_) => {
                holder.requestors.remove(&grant.requestor);
            }
            None => return false,
        }
        if holder.requestors.is_empty() {
            self.free(item);
        }
        true
    }

    /// Drops every requestor whose lease ran out at `now`; returns (item, key, requestor).
    pub(super) fn expire(&mut self, now: SystemTime) -> Vec<(String, String, String)> {
        let mut expired = Vec::new();
        let mut freed = Vec::new();
        for (name, item) in &mut self.items {
            let Some(holder) = item.holder.as_mut() else {
                continue;
            };
            holder.requestors.retain(|requestor, hold| {
                let alive = hold.expires_at.is_none_or(|at| at > now);
                if !alive {
                    expired.push((name.clone(), holder.key.clone(), requestor.clone()));
                }
                alive
            });
            if holder.requestors.is_empty() {
                freed.push(name.clone());
            }
        }
        for name in freed {
            self.free(&name);
        }
        expired
    }

    /// The holding of `item` if it is still the one with this key and generation.
    pub(super) fn holding(&self, item: &str, key: &str, generation: u64) -> Option<&Holder> {
        self.items
            .get(item)
            .and_then(|i| i.holder.as_ref())
            .filter(|h| h.key == key && h.generation == generation)
    }
}
