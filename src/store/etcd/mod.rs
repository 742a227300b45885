//! The etcd backend: several locker servers share one lock state kept in an etcd cluster.
//!
//! The lock rules are the same pure [`LockTable`] the file backend uses. Each server runs one
//! writer task that takes every operation queued while its previous transaction was in flight,
//! loads the locks they touch from its cache, applies them through [`LockTable::apply`] and
//! commits the changed locks in one etcd transaction that compares the mod revision of every
//! lock it read (and of the generation counter when it moved). When another server got there
//! first the transaction fails, returns the current values, and the batch is applied again on
//! them. Nothing is answered before etcd committed.
//!
//! Pools are kept the same way, one value per pool (its items' metadata under keys of their own:
//! see [`codec`]); a batch touches locks and pools alike ([`Target`]).
//!
//! Waiting acquires (and claims) queue inside the stored lock (or pool), so arrival order holds
//! across servers. The transaction that lets a waiter in records the grant in the value; every
//! server watches the prefix and hands grants to its own waiters. Queue entries carry the id of the server whose
//! client waits; a server's liveness is a key on its etcd lease, and queue entries of servers
//! that are gone are dropped by whichever server notices. Leases of holds are plain times in
//! the stored value: any server expires them. See `docs/scaling-out.md`.

mod cache;
pub mod codec;
mod connection;
mod history;
mod listing;
pub mod members;
pub mod migrate;
mod replica;
mod writer;

use self::cache::{Cache, Entry, LoadError, load_all, watch_prefix};
pub use self::connection::{ConnectError, ProbeFailure, runtime};
use self::history::Recorder;
use self::replica::{keep_alive, register, take_replica_id};
use self::writer::Writer;

/// How to reach etcd: checked from the flags by [`crate::config`], which knows it in every build.
pub use crate::config::EtcdConnection;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, Event, EventType, GetOptions,
    KeyValue, KvClient, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use log::{error, info, warn};
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use self::codec::{KeyKind, Keys, WAITER_BITS, waiter_replica};
use self::members::Members;
use super::flow::Backend;
use super::{
    ItemState, LockPage, LockStore, LockView, Page, PoolCounts, StoreError, WaiterSlot, Withdraw,
    status_view,
};
use crate::metrics::{LockStats, Metrics};
use crate::rules::{
    Effect, Grant, Item, Lock, LockTable, Op, Pool, PoolChange, Target, WaiterGrant, WaiterId,
};

/// Longest one etcd request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest the readiness check waits for etcd.
pub const READY_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest a batch keeps retrying conflicting transactions; and the age past which a queued
/// operation is refused unapplied. Together they bound how long a request waits for etcd.
const BATCH_DEADLINE: Duration = Duration::from_secs(4);
/// Most operations in each branch of one transaction (etcd allows 128 by default,
/// `--max-txn-ops`); the rest is room for the generation counter and the history (the record,
/// [`history::TRIM_ROOM`] deletes of old ones and `history-lost`). A lock costs one, a pool two
/// (its value, and the metadata its items' keys hold); see `writer::Budget`.
const MAX_TXN_OPS: usize = 100;
const _: () = assert!(MAX_TXN_OPS + 1 + 2 + history::TRIM_ROOM <= 128);
/// Of [`MAX_TXN_OPS`], what a batch keeps for expiring leases that ran out.
const EXPIRY_ROOM: usize = 20;
/// Most item metadata one transaction writes, in bytes: etcd refuses requests over
/// `--max-request-bytes` (1.5 MiB by default), and the pools' values and the locks of the batch
/// need room too. A single addition or update (at most 64 KiB of metadata) always fits.
const MAX_TXN_METADATA_BYTES: usize = 512 * 1024;
/// Largest answer this server takes from etcd (gRPC's default is 4 MiB): reading a pool with its
/// metadata, or everything under the prefix at start-up, can be more.
const MAX_ANSWER_BYTES: usize = 1 << 30;
/// How often a `check` of a pool item (`wait_item`) looks at this server's cache, and how
/// often at least it asks etcd itself.
const POLL_ITEM: Duration = Duration::from_millis(50);
const RECHECK_ITEM: Duration = Duration::from_secs(1);
/// Most operations in one batch.
const MAX_BATCH: usize = 4096;
/// Lifetime of a server's liveness lease, and how often it is renewed.
const REPLICA_LEASE_SECONDS: i64 = 5;
const KEEP_ALIVE_EVERY: Duration = Duration::from_millis(1500);
/// How often queue entries of servers that are gone are looked for.
const PURGE_EVERY: Duration = Duration::from_secs(2);
/// Attempts to reach etcd at start-up, one second apart.
const CONNECT_TRIES: u32 = 5;

/// Settings of the etcd backend.
#[derive(Clone)]
pub struct EtcdStoreOptions {
    pub connection: EtcdConnection,
    pub max_waiters: usize,
    /// Caps on locks and requestors per holding. The lock cap is checked against this
    /// server's view of etcd, so replicas that create locks at the same moment can pass it by
    /// one lock each.
    pub limits: crate::rules::Limits,
    pub metrics: Arc<Metrics>,
    /// How much history to keep in etcd; none when disabled.
    pub history: crate::history::Bounds,
}

/// Why the etcd store could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("etcd: cannot register this server: {0}")]
    Register(#[source] etcd_client::Error),
    #[error("etcd: cannot load the lock state: {0}")]
    Load(#[source] LoadError),
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}"))
}

type Reply = oneshot::Sender<Result<Effect, StoreError>>;

enum Command {
    Client {
        op: Op,
        reply: Reply,
        since: Instant,
    },
    /// A waiter's server has handed it its grant: take it off the unconfirmed list. Answers
    /// whether the grant still stood (it may have been revoked meanwhile).
    Confirm {
        grant: WaiterGrant,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    /// Clean-up nobody waits for (cancel, revoke); retried until committed.
    Internal(Op),
    Shutdown,
}

/// State shared by the store, its writer and its watch.
pub(crate) struct Shared {
    keys: Keys,
    replica: u64,
    cache: Mutex<Cache>,
    waiters: Mutex<HashMap<WaiterId, oneshot::Sender<WaiterGrant>>>,
    commands: mpsc::UnboundedSender<Command>,
    /// Wakes the writer when the watch brought news (a new lease to expire, a server gone).
    wake: Notify,
    metrics: Arc<Metrics>,
    /// The history, when kept.
    recorder: Option<Recorder>,
    /// The last revision the watch (or a full read) has taken in.
    seen: watch::Sender<i64>,
}

impl Shared {
    /// Hands a grant to this server's waiter; one that is gone gets its grant revoked.
    fn deliver(&self, grant: WaiterGrant) {
        let sender = self.waiters.lock().remove(&grant.waiter);
        let undelivered = match sender {
            Some(sender) => sender.send(grant).err(),
            None => Some(grant),
        };
        if let Some(grant) = undelivered {
            let _ = self.commands.send(Command::Internal(Op::Revoke(grant)));
        }
    }

    /// Hands over the grants, recorded in values this server took in, to its own waiters.
    fn deliver_all(&self, grants: Vec<WaiterGrant>) {
        for grant in grants {
            if waiter_replica(grant.waiter) == self.replica {
                self.deliver(grant);
            }
        }
    }
}

/// A KV client that takes answers of up to [`MAX_ANSWER_BYTES`].
fn kv(client: &Client) -> KvClient {
    client
        .kv_client()
        .max_decoding_message_size(MAX_ANSWER_BYTES)
}

pub struct EtcdStore {
    shared: Arc<Shared>,
    members: Arc<Members>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    next_waiter: AtomicU64,
    waiting: Arc<AtomicUsize>,
    max_waiters: usize,
    shutdown: watch::Sender<bool>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    lease: Arc<AtomicU64>,
}

impl EtcdStore {
    /// Connects, registers this server and loads the state. Errors say what is wrong.
    pub fn open(options: EtcdStoreOptions) -> Result<Self, OpenError> {
        let runtime = runtime()?;
        let handle = runtime.handle().clone();
        let (commands, receiver) = mpsc::unbounded_channel();
        let connection = options.connection.clone();
        let metrics = options.metrics.clone();
        let history = options.history;
        let started = runtime.block_on(async move {
            let members = Arc::new(connection.members().await?);
            start(members, &connection, commands, receiver, metrics, history).await
        })?;
        let (shared, members, writer, lease) = started;
        shared.cache.lock().limits = options.limits;
        let (locks, pools) = {
            let cache = shared.cache.lock();
            (cache.held().count(), cache.present_pools().count())
        };
        info!(
            "etcd at {}, prefix {:?}: {locks} lock(s) held, {pools} pool(s), this server is \
             replica {}",
            options.connection.endpoints.join(","),
            options.connection.prefix,
            shared.replica
        );
        let (shutdown, _) = watch::channel(false);
        Ok(EtcdStore {
            next_waiter: AtomicU64::new(1),
            shared,
            members,
            runtime: Mutex::new(Some(runtime)),
            handle,
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiters: options.max_waiters,
            shutdown,
            writer: Mutex::new(Some(writer)),
            lease,
        })
    }

    /// Runs an etcd read on the store's runtime within `timeout`, on the member in use (or
    /// the next ones, when it cannot be connected to: see [`members`]).
    async fn read<T, F, Make>(&self, timeout: Duration, make: Make) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
        Make: FnMut(Client) -> F + Send + 'static,
    {
        let members = self.members.clone();
        let task = self
            .handle
            .spawn(async move { members.call(timeout, make).await });
        match task.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(e) => Err(unavailable(e)),
        }
    }
}

impl EtcdStore {
    /// Runs a transaction of reads (linearizable, at one revision); the answers of its gets.
    async fn read_txn(&self, txn: Txn) -> Result<Vec<etcd_client::GetResponse>, StoreError> {
        let response = self
            .read(REQUEST_TIMEOUT, move |client| {
                let (mut kv, txn) = (kv(&client), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await?;
        Ok(response
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(get) => Some(get),
                _ => None,
            })
            .collect())
    }

    /// Fills in `pool`'s metadata from the cache if the cache holds the pool as of
    /// `mod_revision` with every item's metadata; `false` (nothing changed) otherwise.
    fn metadata_from_cache(&self, name: &str, mod_revision: i64, pool: &mut Pool) -> bool {
        let cache = self.shared.cache.lock();
        let current = cache
            .pools
            .get(name)
            .is_some_and(|e| e.value.is_some() && e.mod_revision == mod_revision);
        if !current {
            return false;
        }
        let known = cache.metadata.get(name);
        let complete = pool.items.keys().all(|item| {
            known
                .and_then(|m| m.get(item))
                .is_some_and(|m| m.mod_revision <= mod_revision)
        });
        if !complete {
            return false;
        }
        if let Some(known) = known {
            for (item, state) in &mut pool.items {
                if let Some(m) = known.get(item) {
                    state.metadata = m.text.clone();
                }
            }
        }
        true
    }

    /// A pool's value and its items' metadata, read from etcd at one revision.
    async fn read_pool(&self, name: &str) -> Result<Option<Pool>, StoreError> {
        let txn = Txn::new().and_then([
            TxnOp::get(self.shared.keys.pool(name), None),
            TxnOp::get(
                self.shared.keys.pool_items(name),
                Some(GetOptions::new().with_prefix()),
            ),
        ]);
        let mut gets = self.read_txn(txn).await?.into_iter();
        let (Some(value), Some(items)) = (gets.next(), gets.next()) else {
            return Err(unavailable("a pool read came back incomplete"));
        };
        let Some(kv) = value.kvs().first() else {
            return Ok(None);
        };
        let mut pool = codec::decode_pool(name, kv.value())
            .map_err(unavailable)?
            .pool;
        let prefix = self.shared.keys.pool_items(name);
        for kv in items.kvs() {
            let Some(item) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
                continue;
            };
            if let Some(state) = pool.items.get_mut(item) {
                state.metadata =
                    codec::decode_metadata(name, item, kv.value()).map_err(unavailable)?;
            }
        }
        Ok(Some(pool))
    }

    /// One item of a pool with its metadata, read at one revision; `None`: no such item.
    async fn read_item(&self, pool: &str, item: &str) -> Result<Option<Item>, StoreError> {
        let txn = Txn::new().and_then([
            TxnOp::get(self.shared.keys.pool(pool), None),
            TxnOp::get(self.shared.keys.pool_item(pool, item), None),
        ]);
        let mut gets = self.read_txn(txn).await?.into_iter();
        let (Some(value), Some(metadata)) = (gets.next(), gets.next()) else {
            return Err(unavailable("an item read came back incomplete"));
        };
        let Some(kv) = value.kvs().first() else {
            return Ok(None);
        };
        let mut decoded = codec::decode_pool(pool, kv.value())
            .map_err(unavailable)?
            .pool;
        let Some(mut found) = decoded.items.remove(item) else {
            return Ok(None);
        };
        if let Some(kv) = metadata.kvs().first() {
            found.metadata = codec::decode_metadata(pool, item, kv.value()).map_err(unavailable)?;
        }
        Ok(Some(found))
    }
}

#[async_trait]
impl Backend for EtcdStore {
    type Withdrawer = Arc<Shared>;

    async fn submit(
        &self,
        op: Op,
        grant: Option<oneshot::Sender<WaiterGrant>>,
    ) -> Result<Effect, StoreError> {
        // Known before the transaction runs: the watch may deliver the grant before the
        // writer answers.
        if let (Some(grant), Some(id)) = (grant, op.queues_waiter()) {
            self.shared.waiters.lock().insert(id, grant);
        }
        let (reply, answer) = oneshot::channel();
        self.shared
            .commands
            .send(Command::Client {
                op,
                reply,
                since: Instant::now(),
            })
            .map_err(|_| StoreError::ShuttingDown)?;
        match tokio::time::timeout(BATCH_DEADLINE * 3, answer).await {
            Ok(answer) => answer.map_err(|_| StoreError::ShuttingDown)?,
            Err(_) => Err(unavailable("no answer in time")),
        }
    }

    /// This server's replica id in the high bits, so waiter ids are unique across servers.
    fn new_waiter(&self) -> WaiterId {
        let counter = self.next_waiter.fetch_add(1, Ordering::Relaxed) & ((1 << WAITER_BITS) - 1);
        (self.shared.replica << WAITER_BITS) | counter
    }

    fn withdrawer(&self) -> Self::Withdrawer {
        self.shared.clone()
    }

    /// Looks at etcd (a linearizable read); while the item is not in `state`, waits until this
    /// server's cache (kept by the watch) shows it other than etcd did, or [`RECHECK_ITEM`]
    /// passed, and looks at etcd again: at most once per [`POLL_ITEM`], usually once a second.
    async fn wait_item(
        &self,
        pool: &str,
        item: &str,
        state: ItemState,
        wait: Duration,
    ) -> Result<Option<Item>, StoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut shutdown = self.shutdown.subscribe();
        let mut slot = None;
        loop {
            let Some(current) = self.read_item(pool, item).await? else {
                return Ok(None);
            };
            let seen = ItemState::of(&current);
            if seen == state || tokio::time::Instant::now() >= deadline {
                return Ok(Some(current));
            }
            if slot.is_none() {
                slot = Some(WaiterSlot::take(&self.waiting, self.max_waiters)?);
            }
            let recheck = deadline.min(tokio::time::Instant::now() + RECHECK_ITEM);
            loop {
                let pause = recheck.min(tokio::time::Instant::now() + POLL_ITEM);
                tokio::select! {
                    () = tokio::time::sleep_until(pause) => {}
                    _ = shutdown.wait_for(|stopping| *stopping) => {
                        return Err(StoreError::ShuttingDown);
                    }
                }
                let cached = self.shared.cache.lock().item_state(pool, item);
                if cached != Some(seen) || tokio::time::Instant::now() >= recheck {
                    break;
                }
            }
        }
    }

    /// Records that this server handed a grant to its waiter, before the client is answered:
    /// from then on the hold is the client's even if this server dies. A grant revoked
    /// meanwhile (this server was taken for dead) is not the client's.
    async fn confirm(&self, grant: WaiterGrant) -> Result<Grant, StoreError> {
        let mut pending = ConfirmGuard {
            grant: Some(grant.clone()),
            shared: self.shared.clone(),
        };
        let (reply, answer) = oneshot::channel();
        self.shared
            .commands
            .send(Command::Confirm {
                grant: grant.clone(),
                reply,
            })
            .map_err(|_| StoreError::ShuttingDown)?;
        let answer = match tokio::time::timeout(BATCH_DEADLINE * 3, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(StoreError::ShuttingDown),
            Err(_) => Err(unavailable("no answer in time")),
        };
        match answer {
            Ok(true) => {
                pending.grant = None;
                Ok(grant.grant)
            }
            Ok(false) => {
                pending.grant = None;
                Err(unavailable(
                    "the grant was withdrawn while this server was out of touch with etcd",
                ))
            }
            Err(e) => Err(e),
        }
    }

    fn current_keys(&self, name: &str) -> Vec<String> {
        self.shared
            .cache
            .lock()
            .locks
            .get(name)
            .and_then(|e| e.value.as_ref())
            .map(|l| l.keys())
            .unwrap_or_default()
    }

    fn waiting(&self) -> (&Arc<AtomicUsize>, usize) {
        (&self.waiting, self.max_waiters)
    }

    fn shutdown(&self) -> &watch::Sender<bool> {
        &self.shutdown
    }
}

/// Registers this server and starts its watch, writer and lease keeper.
async fn start(
    members: Arc<Members>,
    connection: &EtcdConnection,
    commands: mpsc::UnboundedSender<Command>,
    receiver: mpsc::UnboundedReceiver<Command>,
    metrics: Arc<Metrics>,
    history: crate::history::Bounds,
) -> Result<
    (
        Arc<Shared>,
        Arc<Members>,
        tokio::task::JoinHandle<()>,
        Arc<AtomicU64>,
    ),
    OpenError,
> {
    let keys = Keys::new(&connection.prefix);
    // Start-up uses the member that just answered; it fails as a whole if that member fails.
    let (_, mut etcd) = members.pinned().await.map_err(OpenError::Register)?;
    let replica = take_replica_id(&mut etcd, &keys)
        .await
        .map_err(OpenError::Register)?;
    let lease = register(&mut etcd, &keys, replica)
        .await
        .map_err(OpenError::Register)?;
    let lease = Arc::new(AtomicU64::new(lease as u64));
    let shared = Arc::new(Shared {
        keys: keys.clone(),
        replica,
        cache: Mutex::new(Cache::default()),
        waiters: Mutex::new(HashMap::new()),
        commands,
        wake: Notify::new(),
        recorder: history
            .enabled()
            .then(|| Recorder::new(history).observing(keys.history_of(replica), metrics.clone())),
        metrics,
        seen: watch::channel(0).0,
    });
    let revision = load_all(&etcd, &shared, false)
        .await
        .map_err(OpenError::Load)?;
    tokio::spawn(keep_alive(members.clone(), shared.clone(), lease.clone()));
    tokio::spawn(watch_prefix(members.clone(), shared.clone(), revision + 1));
    let writer = Writer {
        shared: shared.clone(),
        members: members.clone(),
        retry: Vec::new(),
        backlog: VecDeque::new(),
        last_failure: None,
        last_purge: Instant::now(),
        records: 0,
    };
    let writer = tokio::spawn(writer.run(receiver));
    Ok((shared, members, writer, lease))
}

#[async_trait]
impl LockStore for EtcdStore {
    /// A linearizable read of the pool's value. Its items' metadata comes from this server's
    /// cache when the cache holds that very value (the usual case: the watch is quick), as the
    /// cache then holds the metadata as of it too (see `cache.rs`); otherwise it is read from
    /// etcd with the value, at one revision. So a claim's answer, which shows its item's
    /// metadata, does not read every item's.
    async fn pool(&self, name: &str) -> Result<Option<Pool>, StoreError> {
        let key = self.shared.keys.pool(name);
        let response = self
            .read(REQUEST_TIMEOUT, move |client| {
                let (mut kv, key) = (kv(&client), key.clone());
                async move { kv.get(key, None).await }
            })
            .await?;
        let Some(kv) = response.kvs().first() else {
            return Ok(None);
        };
        let mut pool = codec::decode_pool(name, kv.value())
            .map_err(unavailable)?
            .pool;
        if self.metadata_from_cache(name, kv.mod_revision(), &mut pool) {
            return Ok(Some(pool));
        }
        self.read_pool(name).await
    }

    /// A linearizable read of every pool's value (their metadata is not needed).
    async fn pools(&self) -> Result<Vec<PoolCounts>, StoreError> {
        let prefix = self.shared.keys.pools_prefix();
        let start = prefix.clone();
        let response = self
            .read(REQUEST_TIMEOUT, move |client| {
                let (mut kv, start) = (kv(&client), start.clone());
                async move { kv.get(start, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let mut pools = Vec::new();
        for kv in response.kvs() {
            let Some(name) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
                continue;
            };
            let pool = codec::decode_pool(name, kv.value())
                .map_err(unavailable)?
                .pool;
            pools.push(PoolCounts::of(name, &pool));
        }
        Ok(pools)
    }

    async fn status(&self, name: &str) -> Result<Option<LockView>, StoreError> {
        let key = self.shared.keys.lock(name);
        let response = self
            .read(REQUEST_TIMEOUT, move |mut client| {
                let key = key.clone();
                async move { client.get(key, None).await }
            })
            .await?;
        match response.kvs().first() {
            Some(kv) => {
                let lock = codec::decode_lock(name, kv.value())
                    .map_err(unavailable)?
                    .lock;
                Ok(lock.is_held().then(|| status_view(name, &lock)))
            }
            None => Ok(None),
        }
    }

    async fn list(&self, page: &Page) -> Result<LockPage, StoreError> {
        self.list_page(page).await
    }

    /// Ready when etcd answered a linearizable request (which needs a quorum) within the last
    /// [`READY_TIMEOUT`], or answers one now within it.
    async fn ready(&self) -> Result<(), StoreError> {
        if self.members.answered_within(READY_TIMEOUT) {
            return Ok(());
        }
        let meta = self.shared.keys.meta();
        self.read(READY_TIMEOUT, move |mut client| {
            let meta = meta.clone();
            async move {
                client
                    .get(meta, Some(GetOptions::new().with_count_only()))
                    .await
            }
        })
        .await
        .map(|_| ())
    }

    async fn wait_free(&self, name: &str, wait: Duration) -> Result<Option<LockView>, StoreError> {
        let status = self.status(name).await?;
        if status.is_none() {
            return Ok(None);
        }
        let _slot = WaiterSlot::take(&self.waiting, self.max_waiters)?;
        super::poll_free(self, name, wait).await
    }

    fn stats(&self) -> LockStats {
        let cache = self.shared.cache.lock();
        LockStats {
            waiting_requests: self.waiting.load(Ordering::Relaxed),
            // The replicas' liveness keys the cache holds (from the load and the watch).
            replicas: Some(cache.replicas.len()),
            ..super::table_stats(&cache.table())
        }
    }

    fn history(&self) -> Option<&Arc<crate::history::History>> {
        self.shared.recorder.as_ref().map(|r| &r.history)
    }

    fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
        // Live event streams end, so they do not hold the shutdown up.
        if let Some(recorder) = &self.shared.recorder {
            recorder.history.close();
        }
    }

    async fn close(&self) {
        self.begin_shutdown();
        let _ = self.shared.commands.send(Command::Shutdown);
        let writer = self.writer.lock().take();
        if let Some(writer) = writer
            && tokio::time::timeout(BATCH_DEADLINE * 2, writer)
                .await
                .is_err()
        {
            error!("the etcd writer did not stop in time");
        }
        let lease = self.lease.load(Ordering::Relaxed) as i64;
        let revoked = self
            .read(REQUEST_TIMEOUT, move |mut client| async move {
                client.lease_revoke(lease).await
            })
            .await;
        if let Err(e) = revoked {
            warn!("could not deregister from etcd (its lease expires by itself): {e}");
        }
        if let Some(runtime) = self.runtime.lock().take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.lock().take() {
            runtime.shutdown_background();
        }
    }
}

/// An etcd-store waiter is withdrawn by the writer and forgotten by the grant dispatcher.
impl Withdraw for Arc<Shared> {
    fn withdraw(&self, op: Op) {
        let _ = self.commands.send(Command::Internal(op));
    }

    fn forget(&self, waiter: WaiterId) {
        self.waiters.lock().remove(&waiter);
    }
}

/// Gives a grant back if its client is not told about it (the confirmation failed, or the
/// request ended while confirming).
struct ConfirmGuard {
    grant: Option<WaiterGrant>,
    shared: Arc<Shared>,
}

impl Drop for ConfirmGuard {
    fn drop(&mut self) {
        if let Some(grant) = self.grant.take() {
            let _ = self
                .shared
                .commands
                .send(Command::Internal(Op::Revoke(grant)));
        }
    }
}
