//! The request flow both stores share: how an acquire (waiting or not), a release, a reclaim
//! and a force release become operations on the lock rules, and what their effects mean for the
//! client. A backend says only what differs ([`Backend`]): how an operation is made durable, how
//! a waiter's grant reaches it, and how a grant is confirmed.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{oneshot, watch};

use super::{Counted, ItemGrant, ItemState, LockWrites, Released, StoreError, WaitGuard, Withdraw};
use crate::rules::{
    Acquire, AcquireOutcome, Effect, Grant, Holder, Item, Limit, Op, PoolOutcome, Reclaim,
    ReleaseOutcome, Target, WaiterGrant, WaiterId,
};

/// What a store does its own way; everything else of a request is [`acquire`], [`release`],
/// [`reclaim`] and [`force_release`].
#[async_trait]
pub(crate) trait Backend: Send + Sync {
    /// How this backend takes back a queued waiter.
    type Withdrawer: Withdraw + Send;

    /// Applies one operation and makes it durable; for an acquire that may queue, `grant` is
    /// where the waiter's grant is to be delivered later.
    async fn submit(
        &self,
        op: Op,
        grant: Option<oneshot::Sender<WaiterGrant>>,
    ) -> Result<Effect, StoreError>;

    /// An id for a new waiter, unique among every waiter of the store.
    fn new_waiter(&self) -> WaiterId;

    fn withdrawer(&self) -> Self::Withdrawer;

    /// The grant a waiter received, made the client's before it is answered. The file store
    /// has nothing to do; the etcd store records it, so a grant revoked meanwhile (this server
    /// was taken for dead) is not given.
    async fn confirm(&self, grant: WaiterGrant) -> Result<Grant, StoreError> {
        Ok(grant.grant)
    }

    /// [`LockWrites::wait_item`] done this backend's way: told of changes, or looking again.
    async fn wait_item(
        &self,
        pool: &str,
        item: &str,
        state: ItemState,
        wait: Duration,
    ) -> Result<Option<Item>, StoreError>;

    /// The keys holding `name` now, for a timeout's message.
    fn current_keys(&self, name: &str) -> Vec<String>;

    /// Requests counted against the waiter limit, and the limit.
    fn waiting(&self) -> (&Arc<AtomicUsize>, usize);

    /// Set to `true` when the store begins shutting down.
    fn shutdown(&self) -> &watch::Sender<bool>;
}

/// Acquires `name`; with `wait`, queues in arrival order for up to that long.
pub(crate) async fn acquire<B: Backend>(
    backend: &B,
    name: String,
    request: Acquire,
    wait: Option<Duration>,
) -> Result<Grant, StoreError> {
    match wait.filter(|w| !w.is_zero()) {
        Some(wait) => acquire_waiting(backend, name, request, wait).await,
        None => {
            let op = Op::Acquire {
                name: name.clone(),
                request,
                waiter: None,
            };
            acquire_result(&name, backend.submit(op, None).await)
        }
    }
}

async fn acquire_waiting<B: Backend>(
    backend: &B,
    name: String,
    request: Acquire,
    wait: Duration,
) -> Result<Grant, StoreError> {
    let target = Target::Lock(name.clone());
    let op = |waiter| Op::Acquire {
        name: name.clone(),
        request,
        waiter: Some(waiter),
    };
    match submit_waiting(backend, target, op, wait).await? {
        Waited::Answered(effect) => acquire_result(&name, Ok(effect)),
        Waited::Granted(grant) => Ok(grant.grant),
        Waited::TimedOut => Err(StoreError::TimedOut {
            keys: backend.current_keys(&name),
            name,
            waited: wait,
        }),
    }
}

/// How a request that may wait ended.
pub(super) enum Waited {
    /// Answered without queueing: the effect of its operation.
    Answered(Effect),
    /// Queued, then granted (and the grant confirmed).
    Granted(WaiterGrant),
    /// Queued until the wait ran out; withdrawn.
    TimedOut,
}

/// Submits an operation that may queue a waiter on `target` (built by `op` from the waiter's
/// id) and waits up to `wait` for its grant. The waiter is withdrawn whenever the request ends
/// without the grant in hand, and a grant that raced with that is given back.
pub(super) async fn submit_waiting<B: Backend>(
    backend: &B,
    target: Target,
    op: impl FnOnce(WaiterId) -> Op,
    wait: Duration,
) -> Result<Waited, StoreError> {
    let mut shutdown = backend.shutdown().subscribe();
    if *shutdown.borrow() {
        return Err(StoreError::ShuttingDown);
    }
    let waiter = backend.new_waiter();
    let (grant_sender, grant_receiver) = oneshot::channel();
    let mut guard = WaitGuard {
        target,
        waiter,
        backend: backend.withdrawer(),
        grant: Some(grant_receiver),
        leaving: crate::rules::events::Leaving::Withdrawn,
    };
    match backend.submit(op(waiter), Some(grant_sender)).await {
        Ok(effect) if effect.is_queued() => {}
        Ok(effect) => {
            guard.disarm();
            return Ok(Waited::Answered(effect));
        }
        // Whether a failed operation left the waiter queued is the backend's to know (a file
        // store rolled it back, an etcd transaction may have landed): the guard withdraws it,
        // which is harmless when it is not there.
        Err(e) => return Err(e),
    }
    let (waiting, limit) = backend.waiting();
    let _slot = match guard.count(waiting, limit)? {
        Counted::Waiting(slot) => slot,
        Counted::Granted(grant) => return confirmed(backend, grant).await,
    };
    match guard.wait(wait, &mut shutdown).await? {
        Some(grant) => confirmed(backend, grant).await,
        None => Ok(Waited::TimedOut),
    }
}

async fn confirmed<B: Backend>(backend: &B, mut grant: WaiterGrant) -> Result<Waited, StoreError> {
    grant.grant = backend.confirm(grant.clone()).await?;
    Ok(Waited::Granted(grant))
}

/// Clears `requestor`'s count on `name` held under `key`.
pub(crate) async fn release<B: Backend>(
    backend: &B,
    name: String,
    key: String,
    requestor: String,
) -> Result<Released, StoreError> {
    let op = Op::Release {
        name: name.clone(),
        key,
        requestor,
    };
    release_result(name, backend.submit(op, None).await)
}

/// Releases a finished build's hold if it is still that build's.
pub(crate) async fn reclaim<B: Backend>(
    backend: &B,
    hold: Reclaim,
) -> Result<Released, StoreError> {
    let name = hold.name.clone();
    release_result(name, backend.submit(Op::Reclaim(hold), None).await)
}

/// Releases every holding of `name`; returns the previous holdings.
pub(crate) async fn force_release<B: Backend>(
    backend: &B,
    name: String,
    by: Option<String>,
) -> Result<Vec<Holder>, StoreError> {
    force_release_result(backend.submit(Op::ForceRelease { name, by }, None).await)
}

/// What an acquire's effect means for its client.
fn acquire_result(name: &str, effect: Result<Effect, StoreError>) -> Result<Grant, StoreError> {
    match effect? {
        Effect::Acquire(AcquireOutcome::Granted(grant)) => Ok(grant),
        Effect::Acquire(AcquireOutcome::Held(conflict)) => Err(StoreError::Held {
            name: name.to_string(),
            keys: conflict.keys,
        }),
        Effect::Acquire(AcquireOutcome::OverLimit(Limit::Locks(limit))) => {
            Err(StoreError::TooManyLocks {
                name: name.to_string(),
                limit,
            })
        }
        Effect::Acquire(AcquireOutcome::OverLimit(Limit::Requestors(limit))) => {
            Err(StoreError::TooManyRequestors {
                name: name.to_string(),
                limit,
            })
        }
        Effect::Acquire(AcquireOutcome::SlotsMismatch { slots }) => {
            Err(StoreError::SlotsMismatch {
                name: name.to_string(),
                slots,
            })
        }
        other => Err(StoreError::Unavailable(format!(
            "unexpected outcome of an acquire: {other:?}"
        ))),
    }
}

/// What a release's effect means for its client.
fn release_result(
    name: String,
    effect: Result<Effect, StoreError>,
) -> Result<Released, StoreError> {
    match effect? {
        Effect::Release(ReleaseOutcome::Released { changed: true, .. }) => Ok(Released::Released),
        Effect::Release(ReleaseOutcome::Released { changed: false, .. })
        | Effect::Release(ReleaseOutcome::NotHeld) => Ok(Released::NotHeld),
        Effect::Release(ReleaseOutcome::WrongKey(conflict)) => Err(StoreError::WrongKey {
            name,
            keys: conflict.keys,
        }),
        // A reclaim of a pool item's claim.
        Effect::Pool(PoolOutcome::Freed { previous, .. }) if previous.is_some() => {
            Ok(Released::Released)
        }
        Effect::Pool(PoolOutcome::Freed { .. } | PoolOutcome::NoSuchItem) => Ok(Released::NotHeld),
        other => Err(StoreError::Unavailable(format!(
            "unexpected outcome of a release: {other:?}"
        ))),
    }
}

/// The holders a force release removed.
fn force_release_result(effect: Result<Effect, StoreError>) -> Result<Vec<Holder>, StoreError> {
    match effect? {
        Effect::ForceRelease(force) => Ok(force.previous),
        other => Err(StoreError::Unavailable(format!(
            "unexpected outcome of a force release: {other:?}"
        ))),
    }
}

/// Logs what a committed batch did that an operator should see: force releases (with the
/// holdings they ended) and leases that ran out. The same lines from both stores.
pub(crate) fn log_effects(effects: &[Effect]) {
    for effect in effects {
        match effect {
            Effect::ForceRelease(force) if !force.previous.is_empty() => {
                let previous: Vec<String> = force
                    .previous
                    .iter()
                    .map(|h| format!("key {:?} held by {:?}", h.key, h.counts()))
                    .collect();
                log::warn!(
                    "force-released lock {:?}: {}",
                    force.name,
                    previous.join("; ")
                );
            }
            Effect::Expiry(expiry) => {
                for gone in &expiry.expired {
                    let what = match &gone.item {
                        Some(item) => format!("item {item:?} of pool {:?}", gone.name),
                        None => format!("lock {:?}", gone.name),
                    };
                    log::info!(
                        "lease of {:?} on {what} (key {:?}) expired",
                        gone.requestor,
                        gone.key
                    );
                }
            }
            _ => {}
        }
    }
}

/// Every backend's changes: the one request flow over its [`Backend`].
#[async_trait]
impl<B: Backend + 'static> LockWrites for B {
    async fn acquire(
        &self,
        name: String,
        request: Acquire,
        wait: Option<Duration>,
    ) -> Result<Grant, StoreError> {
        acquire(self, name, request, wait).await
    }

    async fn release(
        &self,
        name: String,
        key: String,
        requestor: String,
    ) -> Result<Released, StoreError> {
        release(self, name, key, requestor).await
    }

    async fn reclaim(&self, hold: crate::rules::Reclaim) -> Result<Released, StoreError> {
        reclaim(self, hold).await
    }

    async fn force_release(
        &self,
        name: String,
        by: Option<String>,
    ) -> Result<Vec<Holder>, StoreError> {
        force_release(self, name, by).await
    }

    async fn claim(
        &self,
        pool: String,
        item: Option<String>,
        request: Acquire,
        wait: Option<Duration>,
    ) -> Result<ItemGrant, StoreError> {
        super::pool_flow::claim(self, pool, item, request, wait).await
    }

    async fn release_item(
        &self,
        pool: String,
        item: String,
        key: Option<String>,
        requestor: Option<String>,
        by: Option<String>,
    ) -> Result<Option<Holder>, StoreError> {
        super::pool_flow::release(self, pool, item, key, requestor, by).await
    }

    async fn add_item(
        &self,
        pool: String,
        item: String,
        metadata: Arc<str>,
        claim: Option<Acquire>,
    ) -> Result<bool, StoreError> {
        super::pool_flow::add(self, pool, item, metadata, claim).await
    }

    async fn remove_item(
        &self,
        pool: String,
        item: String,
        key: Option<String>,
    ) -> Result<Option<Holder>, StoreError> {
        super::pool_flow::remove(self, pool, item, key).await
    }

    /// Waits for the item to be free through this backend's [`Backend::wait_item`].
    async fn update_item(
        &self,
        pool: String,
        item: String,
        metadata: Arc<str>,
        wait: Option<Duration>,
    ) -> Result<bool, StoreError> {
        super::pool_flow::update(self, pool, item, metadata, wait).await
    }

    async fn wait_item(
        &self,
        pool: &str,
        item: &str,
        state: ItemState,
        wait: Duration,
    ) -> Result<Option<Item>, StoreError> {
        Backend::wait_item(self, pool, item, state, wait).await
    }
}
