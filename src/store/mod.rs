//! The store: where lock state lives and how mutations become durable.
//!
//! [`LockStore`] is the narrow interface the HTTP layer talks to; [`file::FileStore`] keeps the
//! state in a YAML file with group commit; `etcd::EtcdStore` (only with the `etcd` feature) in
//! an etcd cluster shared by several servers. Handlers never know which backend they have.

pub mod atomic_file;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod file;
mod flow;
pub mod journal;
mod pool_flow;
pub mod state_file;

use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::metrics::{LockStats, Subject};
use crate::rules::{Acquire, Grant, Holder, Item, ItemGrant, LockTable, Pool};

/// How often [`poll_free`] looks again.
#[cfg(feature = "etcd")]
const POLL_FREE: Duration = Duration::from_millis(50);

/// A lock as the API shows it: its holdings (oldest first), slot count and queue length, and
/// for one lock's status ([`status_view`]) who waits, in arrival order. Listings leave `queue`
/// empty: they show only its length, and copying every queue would cost what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockView {
    pub name: String,
    pub slots: u32,
    pub holders: Vec<Holder>,
    pub waiters: usize,
    pub queue: Vec<Queued>,
}

/// A queued request as a lock's status shows it: who asks, and since when (`None` when the
/// backend did not keep the time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub request: Acquire,
    pub since: Option<std::time::SystemTime>,
}

/// The state an item is waited for in (`check`: unclaimed; `check_unclaimed`: claimed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemState {
    Claimed,
    Unclaimed,
}

impl ItemState {
    pub fn of(item: &Item) -> ItemState {
        if item.is_claimed() {
            ItemState::Claimed
        } else {
            ItemState::Unclaimed
        }
    }
}

/// A pool's counts, for `GET /pools`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolCounts {
    pub name: String,
    pub items: usize,
    pub claimed: usize,
    pub waiters: usize,
}

impl PoolCounts {
    pub fn of(name: &str, pool: &Pool) -> Self {
        PoolCounts {
            name: name.to_string(),
            items: pool.items.len(),
            claimed: pool.items.values().filter(|i| i.is_claimed()).count(),
            waiters: pool.waiters(),
        }
    }
}

/// Which held locks a listing shows, in name order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// Only names starting with this.
    pub prefix: String,
    /// Only locks whose name, a holder's key, a requestor or an info value contains this,
    /// ignoring case (what the dashboard's filter box searches).
    pub search: Option<String>,
    /// Only names after this one (the last name of the previous page).
    pub after: Option<String>,
    /// At most this many; `None`: all of them.
    pub limit: Option<usize>,
}

impl Page {
    /// Every held lock.
    pub fn all() -> Self {
        Page::default()
    }

    /// Whether a lock belongs to the listing, its name range aside.
    fn shows(&self, name: &str, lock: &crate::rules::Lock) -> bool {
        lock.is_held()
            && name.starts_with(&self.prefix)
            && self
                .search
                .as_deref()
                .is_none_or(|search| found(search, name, lock))
    }
}

/// Case-insensitive search of a lock's name, keys, requestors and info values.
fn found(search: &str, name: &str, lock: &crate::rules::Lock) -> bool {
    let search = search.to_lowercase();
    let has = |text: &str| text.to_lowercase().contains(&search);
    has(name)
        || lock.holders.iter().any(|h| {
            has(&h.key) || h.requestors.keys().any(|r| has(r)) || h.info.values().any(|v| has(v))
        })
}

/// One page of a listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockPage {
    pub locks: Vec<LockView>,
    /// How many held locks the listing has over all its pages.
    pub total: usize,
    /// Whether locks follow this page (ask again with `after` = the last name of this one).
    pub more: bool,
}

/// A page of the locks of a name-ordered map: the start of the range is found by the map, so a
/// page costs its own size plus the count of what matches, not a copy of every lock.
pub(crate) fn page_of<'a, L: AsRef<crate::rules::Lock> + 'a>(
    locks: &'a std::collections::BTreeMap<String, L>,
    page: &Page,
) -> LockPage {
    use std::ops::Bound;
    let matching = |start: Bound<&str>| {
        locks
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(|(name, _)| name.starts_with(&page.prefix))
            .filter(|(name, lock)| page.shows(name, (*lock).as_ref()))
    };
    // Every lock the table keeps is held (a free lock's queue is served at once, and a lock
    // with neither holders nor waiters is dropped), so the whole listing's total is the map's.
    let total = if page.prefix.is_empty() && page.search.is_none() {
        locks.len()
    } else {
        matching(Bound::Included(&page.prefix)).count()
    };
    let start = match &page.after {
        Some(after) if after.as_str() >= page.prefix.as_str() => Bound::Excluded(after.as_str()),
        _ => Bound::Included(page.prefix.as_str()),
    };
    let limit = page.limit.unwrap_or(usize::MAX);
    let mut shown = matching(start);
    let locks: Vec<LockView> = shown
        .by_ref()
        .take(limit)
        .map(|(name, lock)| view(name, lock.as_ref()))
        .collect();
    let more = shown.next().is_some();
    LockPage { locks, total, more }
}

/// The result of a release that was allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// The requestor's count was cleared.
    Released,
    /// Nothing to do: the lock was free, or the requestor held no count under that key.
    NotHeld,
}

/// Why a store refused or failed an operation. Each maps to one HTTP status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("lock {name:?} is held under key {}", keys_text(.keys))]
    Held { name: String, keys: Vec<String> },
    #[error("timed out after {waited:?} waiting for lock {name:?}, held under key {}", keys_text(.keys))]
    TimedOut {
        name: String,
        keys: Vec<String>,
        waited: Duration,
    },
    #[error("lock {name:?} is held under key {}, not under the key given", keys_text(.keys))]
    WrongKey { name: String, keys: Vec<String> },
    #[error("lock {name:?} has {slots} slot(s); the request names another number")]
    SlotsMismatch { name: String, slots: u32 },
    #[error("too many waiting requests (limit {limit}); try again later")]
    TooManyWaiters { limit: usize },
    #[error(
        "lock {name:?} would be one lock too many: the server keeps at most {limit} \
         (LOCKER_MAX_LOCKS); release some or raise the limit"
    )]
    TooManyLocks { name: String, limit: usize },
    #[error(
        "lock {name:?} is shared under this key by {limit} requestors, the most allowed \
         (LOCKER_MAX_REQUESTORS); a new requestor must wait for one to release"
    )]
    TooManyRequestors { name: String, limit: usize },
    #[error("{}", no_such_item_text(.pool, .item.as_deref()))]
    NoSuchItem { pool: String, item: Option<String> },
    #[error("{} is claimed{}", item_text(.pool, .item.as_deref()), held_text(.keys))]
    ItemClaimed {
        pool: String,
        item: Option<String>,
        keys: Vec<String>,
    },
    #[error("item {item:?} of pool {pool:?} already exists with other metadata or state")]
    ItemExists { pool: String, item: String },
    #[error("timed out after {waited:?} waiting for {}", item_text(.pool, .item.as_deref()))]
    ItemTimedOut {
        pool: String,
        item: Option<String>,
        waited: Duration,
    },
    #[error("the server is shutting down; try again")]
    ShuttingDown,
    #[error("state could not be saved, nothing was changed: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// The `outcome` label this refusal is counted under in the request metrics: one per kind,
    /// so that an alert on `unavailable` fires only when the store could not do its work.
    pub fn outcome(&self) -> &'static str {
        match self {
            StoreError::Held { .. } => "conflict",
            StoreError::TimedOut { .. } => "timed_out",
            StoreError::WrongKey { .. } => "wrong_key",
            StoreError::SlotsMismatch { .. } => "slots_mismatch",
            StoreError::TooManyWaiters { .. } => "too_many_waiters",
            StoreError::TooManyLocks { .. } => "too_many_locks",
            StoreError::TooManyRequestors { .. } => "too_many_requestors",
            StoreError::NoSuchItem { .. } => "no_such_item",
            StoreError::ItemClaimed { .. } => "conflict",
            StoreError::ItemExists { .. } => "item_exists",
            StoreError::ItemTimedOut { .. } => "timed_out",
            StoreError::ShuttingDown => "shutting_down",
            StoreError::Unavailable(_) => "unavailable",
        }
    }
}

fn item_text(pool: &str, item: Option<&str>) -> String {
    match item {
        Some(item) => format!("item {item:?} of pool {pool:?}"),
        None => format!("every item of pool {pool:?}"),
    }
}

fn no_such_item_text(pool: &str, item: Option<&str>) -> String {
    match item {
        Some(item) => format!("pool {pool:?} has no item {item:?}"),
        None => format!("pool {pool:?} has no items"),
    }
}

fn held_text(keys: &[String]) -> String {
    if keys.is_empty() {
        String::new()
    } else {
        format!(" under key {}", keys_text(keys))
    }
}

fn keys_text(keys: &[String]) -> String {
    let quoted: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
    quoted.join(", ")
}

/// The changes every backend offers (and the wait for an item an update is made of): the same
/// request flow over each backend's [`Backend`] (`flow.rs`, `pool_flow.rs`), so they are
/// implemented once, for every backend. Waiting
/// acquires honour cancellation: dropping the future of [`LockWrites::acquire`] withdraws the
/// request, and a grant that raced with the drop is given back, so a client that went away
/// never ends up holding the lock.
///
/// [`Backend`]: flow::Backend
#[async_trait]
pub trait LockWrites: Send + Sync + 'static {
    /// Acquires `name`. With `wait`, queues in arrival order for up to that long.
    async fn acquire(
        &self,
        name: String,
        request: Acquire,
        wait: Option<Duration>,
    ) -> Result<Grant, StoreError>;

    /// Clears `requestor`'s count on `name` held under `key`.
    async fn release(
        &self,
        name: String,
        key: String,
        requestor: String,
    ) -> Result<Released, StoreError>;

    /// Releases a finished build's hold, only if it is still that build's (see [`Op::Reclaim`]);
    /// `NotHeld` when it changed meanwhile.
    ///
    /// [`Op::Reclaim`]: crate::rules::Op::Reclaim
    async fn reclaim(&self, hold: crate::rules::Reclaim) -> Result<Released, StoreError>;

    /// Releases every holding of `name` whatever its key; returns the previous holdings.
    /// `by`: who asked, for the history.
    async fn force_release(
        &self,
        name: String,
        by: Option<String>,
    ) -> Result<Vec<Holder>, StoreError>;

    /// Claims `item` of `pool`, or any free item; with `wait`, queues in arrival order.
    async fn claim(
        &self,
        pool: String,
        item: Option<String>,
        request: Acquire,
        wait: Option<Duration>,
    ) -> Result<ItemGrant, StoreError>;

    /// Releases `item`: with a key, only that holding's `requestor` (or all of them); with
    /// none, whoever holds it (`by`: who asked, for the history). The holding ended, if any.
    async fn release_item(
        &self,
        pool: String,
        item: String,
        key: Option<String>,
        requestor: Option<String>,
        by: Option<String>,
    ) -> Result<Option<Holder>, StoreError>;

    /// Adds `item` unclaimed, or claimed by `claim`; `Ok(false)` when already there so.
    async fn add_item(
        &self,
        pool: String,
        item: String,
        metadata: std::sync::Arc<str>,
        claim: Option<Acquire>,
    ) -> Result<bool, StoreError>;

    /// Removes `item`, claimed or not (with a key: only if unclaimed or held under it).
    async fn remove_item(
        &self,
        pool: String,
        item: String,
        key: Option<String>,
    ) -> Result<Option<Holder>, StoreError>;

    /// Replaces `item`'s metadata (adding it if absent), waiting up to `wait` while claimed.
    async fn update_item(
        &self,
        pool: String,
        item: String,
        metadata: std::sync::Arc<str>,
        wait: Option<Duration>,
    ) -> Result<bool, StoreError>;

    /// Waits up to `wait` for `item` of `pool` to be in `state`; the item as it is then
    /// (`None`: there is no such item, answered at once). Counts against the waiter limit
    /// while it waits.
    async fn wait_item(
        &self,
        pool: &str,
        item: &str,
        state: ItemState,
        wait: Duration,
    ) -> Result<Option<Item>, StoreError>;
}

/// Everything the HTTP layer asks of a store: its changes ([`LockWrites`]) and what each
/// backend reads and reports its own way.
#[async_trait]
pub trait LockStore: LockWrites {
    /// The committed state of one lock; `None` when free.
    async fn status(&self, name: &str) -> Result<Option<LockView>, StoreError>;

    /// The held locks of one page of a listing, by name.
    async fn list(&self, page: &Page) -> Result<LockPage, StoreError>;

    /// Waits up to `wait` for `name` to be free, holding nothing. `None` once it is free;
    /// the lock's status if it is still held when the time runs out.
    ///
    /// A request that has to wait counts against the waiter limit like a waiting acquire.
    async fn wait_free(&self, name: &str, wait: Duration) -> Result<Option<LockView>, StoreError>;

    /// The committed state of one pool; `None` when it has no items and no waiters.
    async fn pool(&self, name: &str) -> Result<Option<Pool>, StoreError>;

    /// Every pool's counts, by name.
    async fn pools(&self) -> Result<Vec<PoolCounts>, StoreError>;

    /// One item of a pool as committed; `None`: no such item. Cheaper than [`LockStore::pool`]
    /// where a store can read one item alone.
    async fn item(&self, pool: &str, item: &str) -> Result<Option<Item>, StoreError> {
        Ok(self
            .pool(pool)
            .await?
            .and_then(|p| p.items.get(item).cloned()))
    }

    /// Whether the store can take writes now, cheaply and within about a second: `Err` with
    /// the reason when it cannot. Answers `GET /ready`.
    async fn ready(&self) -> Result<(), StoreError>;

    /// Counts for the metrics gauges, from the committed state.
    fn stats(&self) -> LockStats;

    /// The kept history and the live events; `None` when the history is off.
    fn history(&self) -> Option<&std::sync::Arc<crate::history::History>> {
        None
    }

    /// Starts shutting down: every waiter is answered at once and new waits are refused.
    fn begin_shutdown(&self);

    /// Finishes pending work and makes everything durable; call after the last request ended.
    async fn close(&self);
}

/// Waits for `name` to be free by asking [`LockStore::status`] again every [`POLL_FREE`], for
/// backends that are not told of changes.
#[cfg(feature = "etcd")]
pub(crate) async fn poll_free<S: LockStore + ?Sized>(
    store: &S,
    name: &str,
    wait: Duration,
) -> Result<Option<LockView>, StoreError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let status = store.status(name).await?;
        if status.is_none() || tokio::time::Instant::now() >= deadline {
            return Ok(status);
        }
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + POLL_FREE)).await;
    }
}

/// After a failed write, internal work (expiry, clean-up) is tried again this much later.
pub(crate) const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// What is left of the pause after the write that failed at `last_failure`.
pub(crate) fn backoff_left(last_failure: Option<std::time::Instant>) -> Duration {
    last_failure
        .map(|at| RETRY_AFTER_FAILURE.saturating_sub(at.elapsed()))
        .unwrap_or(Duration::ZERO)
}

/// How long a writer may sleep waiting for commands: at most `limit`, and no later than the
/// next lease runs out or internal work that failed to persist (`retry_pending`) is due again,
/// but not before the `backoff` after a failed write has passed.
pub(crate) fn writer_idle_time(
    limit: Duration,
    next_expiry: Option<std::time::SystemTime>,
    retry_pending: bool,
    backoff: Duration,
) -> Duration {
    let mut idle = limit;
    if let Some(at) = next_expiry {
        let until = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO);
        idle = idle.min(until.max(backoff));
    }
    if retry_pending {
        idle = idle.min(backoff);
    }
    idle
}

/// Gauge values of a lock table.
pub fn table_stats(table: &LockTable) -> LockStats {
    let mut stats = LockStats::default();
    let earliest = |a: Option<SystemTime>, b: Option<SystemTime>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    for (name, lock) in table.locks() {
        // Queues are in arrival order: each one's first waiter is its oldest.
        let first = lock.queued_since().next().and_then(|(_, _, since)| since);
        stats.oldest_waiting_since = earliest(stats.oldest_waiting_since, first);
        if !lock.is_held() {
            continue;
        }
        stats.held += 1;
        stats.waiters += lock.waiters();
        stats.slots_used += lock.holders.len();
        stats.slots_total += lock.slots as usize;
        let oldest = lock.holders.iter().map(|h| h.acquired_at).min();
        stats.oldest_acquired_at = earliest(stats.oldest_acquired_at, oldest);
        if let Some(oldest) = oldest {
            stats.holdings.push((Subject::Lock(name.clone()), oldest));
        }
    }
    for (name, pool) in table.pools() {
        stats.pool_items += pool.items.len();
        stats.pool_items_claimed += pool.items.values().filter(|i| i.is_claimed()).count();
        stats.pool_waiters += pool.waiters();
        let oldest = pool
            .items
            .values()
            .filter_map(|item| item.holder.as_ref().map(|h| h.acquired_at))
            .min();
        if let Some(oldest) = oldest {
            stats.holdings.push((Subject::Pool(name.clone()), oldest));
        }
        let first = pool
            .queued_since()
            .next()
            .and_then(|(_, _, _, since)| since);
        stats.oldest_waiting_since = earliest(stats.oldest_waiting_since, first);
    }
    stats
}

/// The API's view of one lock of a table, for a listing (without its queue).
pub(crate) fn view(name: &str, lock: &crate::rules::Lock) -> LockView {
    LockView {
        name: name.to_string(),
        slots: lock.slots,
        holders: lock.holders.clone(),
        waiters: lock.waiters(),
        queue: Vec::new(),
    }
}

/// The API's view of one lock's status: [`view`] with who waits, in arrival order.
pub(crate) fn status_view(name: &str, lock: &crate::rules::Lock) -> LockView {
    LockView {
        queue: lock
            .queued_since()
            .map(|(_, request, since)| Queued {
                request: request.clone(),
                since,
            })
            .collect(),
        ..view(name, lock)
    }
}

/// Counts one waiting request against the limit for as long as it lives.
pub(crate) struct WaiterSlot(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl WaiterSlot {
    pub(crate) fn take(
        waiting: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
        limit: usize,
    ) -> Result<Self, StoreError> {
        let before = waiting.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let slot = WaiterSlot(waiting.clone());
        if before >= limit {
            return Err(StoreError::TooManyWaiters { limit });
        }
        Ok(slot)
    }
}

impl Drop for WaiterSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A queued request, counted against the waiter limit (or already granted).
pub(crate) enum Counted {
    Waiting(WaiterSlot),
    Granted(crate::rules::WaiterGrant),
}

/// How a backend takes back a queued waiter: its writer applies the operation (a cancel, or
/// the revoke of a grant nobody received), and it forgets where the grant was to go.
pub(crate) trait Withdraw {
    fn withdraw(&self, op: crate::rules::Op);
    fn forget(&self, _waiter: crate::rules::WaiterId) {}
}

/// Withdraws a queued acquire when its request ends without the grant in hand (timeout,
/// shutdown, or the client went away and its future was dropped). A grant that arrived in the
/// meantime is given back, so nobody holds a lock its client never learned about.
pub(crate) struct WaitGuard<W: Withdraw> {
    /// The lock or pool waited for.
    pub(crate) target: crate::rules::Target,
    pub(crate) waiter: crate::rules::WaiterId,
    pub(crate) backend: W,
    pub(crate) grant: Option<tokio::sync::oneshot::Receiver<crate::rules::WaiterGrant>>,
    /// Why the waiter would leave now, for the history: its wait ran out, or it is withdrawn.
    pub(crate) leaving: crate::rules::events::Leaving,
}

impl<W: Withdraw> WaitGuard<W> {
    async fn granted(&mut self) -> Option<crate::rules::WaiterGrant> {
        let receiver = self.grant.as_mut()?;
        let grant = receiver.await.ok();
        if grant.is_some() {
            self.disarm();
        }
        grant
    }

    /// Counts a request that has just queued against the waiter limit; requests answered
    /// without queueing are never counted. Over the limit the waiter is withdrawn and the
    /// request refused, unless its grant already arrived: then it never had to wait.
    pub(crate) fn count(
        &mut self,
        waiting: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
        limit: usize,
    ) -> Result<Counted, StoreError> {
        match WaiterSlot::take(waiting, limit) {
            Ok(slot) => Ok(Counted::Waiting(slot)),
            Err(refused) => match self.give_up() {
                Some(grant) => Ok(Counted::Granted(grant)),
                None => Err(refused),
            },
        }
    }

    /// Stops waiting. Returns a grant that raced with giving up (the caller keeps it);
    /// otherwise withdraws the waiter.
    fn give_up(&mut self) -> Option<crate::rules::WaiterGrant> {
        let mut receiver = self.grant.take()?;
        receiver.close();
        match receiver.try_recv() {
            Ok(grant) => Some(grant),
            Err(_) => {
                self.cancel();
                None
            }
        }
    }

    /// Waits for the grant, up to `wait` or until shutdown. `Ok(None)`: the wait ran out and
    /// the waiter was withdrawn.
    pub(crate) async fn wait(
        &mut self,
        wait: Duration,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<crate::rules::WaiterGrant>, StoreError> {
        let outcome = tokio::select! {
            granted = self.granted() => granted,
            _ = tokio::time::sleep(wait) => {
                self.leaving = crate::rules::events::Leaving::TimedOut;
                None
            }
            _ = shutdown.wait_for(|stopping| *stopping) => None,
        };
        if let Some(grant) = outcome.or_else(|| self.give_up()) {
            return Ok(Some(grant));
        }
        if *shutdown.borrow() {
            return Err(StoreError::ShuttingDown);
        }
        Ok(None)
    }

    /// The request was answered without queueing, or its grant was received: nothing to undo.
    pub(crate) fn disarm(&mut self) {
        self.backend.forget(self.waiter);
        self.grant = None;
    }

    fn cancel(&self) {
        self.backend.forget(self.waiter);
        self.backend.withdraw(crate::rules::Op::cancel(
            &self.target,
            self.waiter,
            self.leaving,
        ));
    }
}

impl<W: Withdraw> Drop for WaitGuard<W> {
    fn drop(&mut self) {
        let Some(mut receiver) = self.grant.take() else {
            return;
        };
        receiver.close();
        match receiver.try_recv() {
            Ok(grant) => {
                self.backend.forget(self.waiter);
                self.backend.withdraw(crate::rules::Op::Revoke(grant));
            }
            Err(_) => self.cancel(),
        }
    }
}
