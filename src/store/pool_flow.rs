//! The request flow of pools, shared by both stores like [`super::flow`]: a claim (waiting or
//! not), a release, an addition, an update (waiting while the item is claimed) and a removal
//! become [`PoolChange`]s on the rules, and their outcomes become answers.

use std::sync::Arc;
use std::time::Duration;

use super::flow::{Backend, Waited, submit_waiting};
use super::{ItemState, StoreError};
use crate::rules::{
    Acquire, ClaimOutcome, Effect, Holder, ItemGrant, Op, PoolChange, PoolOutcome, Target,
};

/// Claims `item` of `pool`, or any free item when `None`; with `wait`, queues in arrival order
/// for up to that long.
pub(crate) async fn claim<B: Backend>(
    backend: &B,
    pool: String,
    item: Option<String>,
    request: Acquire,
    wait: Option<Duration>,
) -> Result<ItemGrant, StoreError> {
    let claim_op = |waiter| Op::Pool {
        name: pool.clone(),
        change: PoolChange::Claim {
            item: item.clone(),
            request,
            waiter,
        },
    };
    let effect = match wait.filter(|w| !w.is_zero()) {
        None => backend.submit(claim_op(None), None).await?,
        Some(wait) => {
            let target = Target::Pool(pool.clone());
            match submit_waiting(backend, target, |waiter| claim_op(Some(waiter)), wait).await? {
                Waited::Answered(effect) => effect,
                Waited::Granted(grant) => {
                    return Ok(ItemGrant {
                        item: grant.item.unwrap_or_default(),
                        grant: grant.grant,
                    });
                }
                Waited::TimedOut => {
                    return Err(StoreError::ItemTimedOut {
                        pool,
                        item,
                        waited: wait,
                    });
                }
            }
        }
    };
    match outcome(effect)? {
        PoolOutcome::Claim(ClaimOutcome::Granted(grant)) => Ok(grant),
        PoolOutcome::Claim(ClaimOutcome::Held(conflict)) => Err(StoreError::ItemClaimed {
            pool,
            item,
            keys: conflict.keys,
        }),
        PoolOutcome::Claim(ClaimOutcome::NoSuchItem) => Err(StoreError::NoSuchItem { pool, item }),
        other => Err(unexpected("claim", &other)),
    }
}

/// Releases `item`: with a key, that key's requestor (all of them without a requestor); with
/// none, whoever holds it. Returns the holding it ended (`None`: nothing was released).
pub(crate) async fn release<B: Backend>(
    backend: &B,
    pool: String,
    item: String,
    key: Option<String>,
    requestor: Option<String>,
    by: Option<String>,
) -> Result<Option<Holder>, StoreError> {
    let change = PoolChange::Release {
        item: item.clone(),
        key,
        requestor,
        by,
    };
    freed(
        pool.clone(),
        item,
        change_pool(backend, &change_op(&pool, change)).await,
    )
}

/// Removes `item`, claimed or not; with a key, only if unclaimed or held under it.
pub(crate) async fn remove<B: Backend>(
    backend: &B,
    pool: String,
    item: String,
    key: Option<String>,
) -> Result<Option<Holder>, StoreError> {
    let change = PoolChange::Remove {
        item: item.clone(),
        key,
    };
    freed(
        pool.clone(),
        item,
        change_pool(backend, &change_op(&pool, change)).await,
    )
}

/// Adds `item`, unclaimed or claimed by `claim`; `Ok(false)` when it was there the same way.
pub(crate) async fn add<B: Backend>(
    backend: &B,
    pool: String,
    item: String,
    metadata: Arc<str>,
    claim: Option<Acquire>,
) -> Result<bool, StoreError> {
    let change = PoolChange::Add {
        item: item.clone(),
        metadata,
        claim,
    };
    match change_pool(backend, &change_op(&pool, change)).await? {
        PoolOutcome::Stored { changed, .. } => Ok(changed),
        PoolOutcome::Exists => Err(StoreError::ItemExists { pool, item }),
        other => Err(unexpected("addition", &other)),
    }
}

/// Replaces `item`'s metadata, adding it if absent. While it is claimed, waits up to `wait`
/// (without one, refuses at once) for it to be released.
pub(crate) async fn update<B: Backend>(
    backend: &B,
    pool: String,
    item: String,
    metadata: Arc<str>,
    wait: Option<Duration>,
) -> Result<bool, StoreError> {
    let deadline = wait.map(|wait| tokio::time::Instant::now() + wait);
    loop {
        let change = PoolChange::Update {
            item: item.clone(),
            metadata: metadata.clone(),
        };
        let keys = match change_pool(backend, &change_op(&pool, change)).await? {
            PoolOutcome::Stored { changed, .. } => return Ok(changed),
            PoolOutcome::Claimed(conflict) => conflict.keys,
            other => return Err(unexpected("update", &other)),
        };
        let left = deadline
            .map(|at| at.saturating_duration_since(tokio::time::Instant::now()))
            .filter(|left| !left.is_zero());
        let Some(left) = left else {
            return Err(match wait {
                Some(waited) => StoreError::ItemTimedOut {
                    pool,
                    item: Some(item),
                    waited,
                },
                None => StoreError::ItemClaimed {
                    pool,
                    item: Some(item),
                    keys,
                },
            });
        };
        Backend::wait_item(backend, &pool, &item, ItemState::Unclaimed, left).await?;
    }
}

fn change_op(pool: &str, change: PoolChange) -> Op {
    Op::Pool {
        name: pool.to_string(),
        change,
    }
}

async fn change_pool<B: Backend>(backend: &B, op: &Op) -> Result<PoolOutcome, StoreError> {
    outcome(backend.submit(op.clone(), None).await?)
}

fn outcome(effect: Effect) -> Result<PoolOutcome, StoreError> {
    match effect {
        Effect::Pool(outcome) => Ok(outcome),
        other => Err(StoreError::Unavailable(format!(
            "unexpected outcome of a pool change: {other:?}"
        ))),
    }
}

/// What a release's or removal's outcome means for its client.
fn freed(
    pool: String,
    item: String,
    outcome: Result<PoolOutcome, StoreError>,
) -> Result<Option<Holder>, StoreError> {
    match outcome? {
        PoolOutcome::Freed { previous, .. } => Ok(previous),
        PoolOutcome::NoSuchItem => Err(StoreError::NoSuchItem {
            pool,
            item: Some(item),
        }),
        PoolOutcome::Claimed(conflict) => Err(StoreError::ItemClaimed {
            pool,
            item: Some(item),
            keys: conflict.keys,
        }),
        other => Err(unexpected("release", &other)),
    }
}

fn unexpected(what: &str, outcome: &PoolOutcome) -> StoreError {
    StoreError::Unavailable(format!("unexpected outcome of a pool {what}: {outcome:?}"))
}
