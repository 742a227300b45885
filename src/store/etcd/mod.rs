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
//! Waiting acquires queue inside the stored lock, so arrival order holds across servers. The
//! transaction that lets a waiter in records the grant in the lock's value; every server watches
//! the prefix and hands grants to its own waiters. Queue entries carry the id of the server whose
//! client waits; a server's liveness is a key on its etcd lease, and queue entries of servers
//! that are gone are dropped by whichever server notices. Leases of holds are plain times in
//! the stored value: any server expires them. See `docs/scaling-out.md`.

mod cache;
pub mod codec;
mod connection;
mod listing;
pub mod members;
pub mod migrate;
mod replica;
mod writer;

use self::cache::{Cache, Entry, load_all, watch_prefix};
pub use self::connection::runtime;
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
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use log::{error, info, warn};
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use self::codec::{KeyKind, Keys, WAITER_BITS, waiter_replica};
use self::members::Members;
use super::flow::{self, Backend};
use super::{
    LockPage, LockStore, LockView, Page, Released, StoreError, WaiterSlot, Withdraw, view,
};
use crate::metrics::{LockStats, Metrics};
use crate::rules::{Acquire, Effect, Grant, Holder, Lock, LockTable, Op, WaiterGrant, WaiterId};

/// Longest one etcd request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest the readiness check waits for etcd.
pub const READY_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest a batch keeps retrying conflicting transactions; and the age past which a queued
/// operation is refused unapplied. Together they bound how long a request waits for etcd.
const BATCH_DEADLINE: Duration = Duration::from_secs(4);
/// Most distinct locks one transaction touches (etcd allows 128 operations per transaction).
const MAX_LOCKS_PER_TXN: usize = 100;
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

    /// Applies one lock's value (or its deletion) seen at `as_of`, delivering grants it records.
    fn observe_lock(&self, name: &str, kv: Option<&KeyValue>, as_of: i64, deliver: bool) {
        let (entry, grants) = match kv {
            Some(kv) => match codec::decode_lock(name, kv.value()) {
                Ok(decoded) => (
                    Entry {
                        lock: Some(decoded.lock),
                        unconfirmed: decoded.unconfirmed,
                        mod_revision: kv.mod_revision(),
                        as_of,
                    },
                    decoded.grants,
                ),
                Err(e) => {
                    error!("{e}");
                    return;
                }
            },
            None => (
                Entry {
                    lock: None,
                    unconfirmed: Vec::new(),
                    mod_revision: 0,
                    as_of,
                },
                Vec::new(),
            ),
        };
        self.cache.lock().set_lock(name, entry);
        if deliver {
            for grant in grants {
                if waiter_replica(grant.waiter) == self.replica {
                    self.deliver(grant);
                }
            }
        }
    }
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
    pub fn open(options: EtcdStoreOptions) -> Result<Self, String> {
        let runtime = runtime()?;
        let handle = runtime.handle().clone();
        let (commands, receiver) = mpsc::unbounded_channel();
        let connection = options.connection.clone();
        let metrics = options.metrics.clone();
        let started = runtime.block_on(async move {
            let members = Arc::new(connection.members().await?);
            start(members, &connection, commands, receiver, metrics).await
        })?;
        let (shared, members, writer, lease) = started;
        shared.cache.lock().limits = options.limits;
        info!(
            "etcd at {}, prefix {:?}: {} lock(s) held, this server is replica {}",
            options.connection.endpoints.join(","),
            options.connection.prefix,
            shared.cache.lock().held().count(),
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
        if let (
            Some(grant),
            Op::Acquire {
                waiter: Some(id), ..
            },
        ) = (grant, &op)
        {
            self.shared.waiters.lock().insert(*id, grant);
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
            .and_then(|e| e.lock.as_ref())
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
) -> Result<
    (
        Arc<Shared>,
        Arc<Members>,
        tokio::task::JoinHandle<()>,
        Arc<AtomicU64>,
    ),
    String,
> {
    let keys = Keys::new(&connection.prefix);
    // Start-up uses the member that just answered; it fails as a whole if that member fails.
    let (_, mut etcd) = members
        .pinned()
        .await
        .map_err(|e| format!("etcd: cannot register this server: {e}"))?;
    let replica = take_replica_id(&mut etcd, &keys)
        .await
        .map_err(|e| format!("etcd: cannot register this server: {e}"))?;
    let lease = register(&mut etcd, &keys, replica)
        .await
        .map_err(|e| format!("etcd: cannot register this server: {e}"))?;
    let lease = Arc::new(AtomicU64::new(lease as u64));
    let shared = Arc::new(Shared {
        keys: keys.clone(),
        replica,
        cache: Mutex::new(Cache::default()),
        waiters: Mutex::new(HashMap::new()),
        commands,
        wake: Notify::new(),
        metrics,
    });
    let revision = load_all(&mut etcd, &shared, false)
        .await
        .map_err(|e| format!("etcd: cannot load the lock state: {e}"))?;
    tokio::spawn(keep_alive(members.clone(), shared.clone(), lease.clone()));
    tokio::spawn(watch_prefix(members.clone(), shared.clone(), revision + 1));
    let writer = Writer {
        shared: shared.clone(),
        members: members.clone(),
        retry: Vec::new(),
        backlog: VecDeque::new(),
        last_failure: None,
        last_purge: Instant::now(),
    };
    let writer = tokio::spawn(writer.run(receiver));
    Ok((shared, members, writer, lease))
}

/// Refusal of pool operations until the etcd store keeps pools.
fn pools_not_kept() -> StoreError {
    StoreError::Unavailable("pools are not kept by the etcd store yet".into())
}

#[async_trait]
impl LockStore for EtcdStore {
    async fn claim(
        &self,
        _pool: String,
        _item: Option<String>,
        _request: Acquire,
        _wait: Option<Duration>,
    ) -> Result<crate::rules::ItemGrant, StoreError> {
        Err(pools_not_kept())
    }

    async fn release_item(
        &self,
        _pool: String,
        _item: String,
        _key: Option<String>,
        _requestor: Option<String>,
    ) -> Result<Option<Holder>, StoreError> {
        Err(pools_not_kept())
    }

    async fn add_item(
        &self,
        _pool: String,
        _item: String,
        _metadata: Arc<str>,
        _claim: Option<Acquire>,
    ) -> Result<bool, StoreError> {
        Err(pools_not_kept())
    }

    async fn update_item(
        &self,
        _pool: String,
        _item: String,
        _metadata: Arc<str>,
        _wait: Option<Duration>,
    ) -> Result<bool, StoreError> {
        Err(pools_not_kept())
    }

    async fn remove_item(
        &self,
        _pool: String,
        _item: String,
        _key: Option<String>,
    ) -> Result<Option<Holder>, StoreError> {
        Err(pools_not_kept())
    }

    async fn pool(&self, _name: &str) -> Result<Option<crate::rules::Pool>, StoreError> {
        Ok(None)
    }

    async fn pools(&self) -> Result<Vec<super::PoolCounts>, StoreError> {
        Ok(Vec::new())
    }

    async fn wait_item(
        &self,
        _pool: &str,
        _item: &str,
        _state: super::ItemState,
        _wait: Duration,
    ) -> Result<Option<crate::rules::Item>, StoreError> {
        Err(pools_not_kept())
    }

    async fn acquire(
        &self,
        name: String,
        request: Acquire,
        wait: Option<Duration>,
    ) -> Result<Grant, StoreError> {
        flow::acquire(self, name, request, wait).await
    }

    async fn release(
        &self,
        name: String,
        key: String,
        requestor: String,
    ) -> Result<Released, StoreError> {
        flow::release(self, name, key, requestor).await
    }

    async fn reclaim(&self, hold: crate::rules::Reclaim) -> Result<Released, StoreError> {
        flow::reclaim(self, hold).await
    }

    async fn force_release(&self, name: String) -> Result<Vec<Holder>, StoreError> {
        flow::force_release(self, name).await
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
                Ok(lock.is_held().then(|| view(name, &lock)))
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
        LockStats {
            waiting_requests: self.waiting.load(Ordering::Relaxed),
            ..super::table_stats(&self.shared.cache.lock().table())
        }
    }

    fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
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
