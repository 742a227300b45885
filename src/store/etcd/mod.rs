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

pub mod codec;
mod listing;
pub mod members;
pub mod migrate;

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
/// After a failed write, internal clean-up is tried again this much later.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// Attempts to reach etcd at start-up, one second apart.
const CONNECT_TRIES: u32 = 5;

impl EtcdConnection {
    fn options(&self) -> Result<ConnectOptions, String> {
        let mut options = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some((user, password)) = &self.user {
            options = options.with_user(user.clone(), password.clone());
        }
        if self.ca.is_some() || self.client_cert.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &self.ca {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("etcd CA certificate {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            if let Some((cert, key)) = &self.client_cert {
                let cert_pem = std::fs::read(cert)
                    .map_err(|e| format!("etcd client certificate {}: {e}", cert.display()))?;
                let key_pem = std::fs::read(key)
                    .map_err(|e| format!("etcd client key {}: {e}", key.display()))?;
                tls = tls.identity(etcd_client::Identity::from_pem(cert_pem, key_pem));
            }
            options = options.with_tls(tls);
        }
        Ok(options)
    }

    /// A client per member (see [`members`]), once the cluster answered a linearizable read;
    /// tried a few times.
    pub async fn members(&self) -> Result<Members, String> {
        if self.endpoints.is_empty() {
            return Err("LOCKER_ETCD_ENDPOINTS names no endpoint".into());
        }
        let members = Members::new(&self.endpoints, self.options()?);
        let endpoints = self.endpoints.join(",");
        let meta = format!("{}meta", self.prefix);
        for attempt in 1..=CONNECT_TRIES {
            let probe = members
                .call(REQUEST_TIMEOUT * 2, |mut client| {
                    let meta = meta.clone();
                    async move { client.get(meta, None).await }
                })
                .await;
            let last = match probe {
                Ok(_) => return Ok(members),
                Err(e) => e.to_string(),
            };
            warn!("etcd at {endpoints} not reachable (try {attempt} of {CONNECT_TRIES}): {last}");
            if attempt < CONNECT_TRIES {
                tokio::time::sleep(Duration::from_secs(1)).await;
            } else {
                return Err(format!(
                    "cannot reach etcd at {endpoints} after {CONNECT_TRIES} tries: {last}"
                ));
            }
        }
        Err(format!("cannot reach etcd at {endpoints}"))
    }

    /// Connects and proves the cluster answers (a linearizable read), trying a few times.
    pub async fn connect(&self) -> Result<Client, String> {
        if self.endpoints.is_empty() {
            return Err("LOCKER_ETCD_ENDPOINTS names no endpoint".into());
        }
        let options = self.options()?;
        let endpoints = self.endpoints.join(",");
        let mut last = String::new();
        for attempt in 1..=CONNECT_TRIES {
            let probe = async {
                let mut client = Client::connect(&self.endpoints, Some(options.clone())).await?;
                client.get(format!("{}meta", self.prefix), None).await?;
                Ok::<_, etcd_client::Error>(client)
            };
            match tokio::time::timeout(REQUEST_TIMEOUT * 2, probe).await {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "no answer in time".into(),
            }
            warn!("etcd at {endpoints} not reachable (try {attempt} of {CONNECT_TRIES}): {last}");
            if attempt < CONNECT_TRIES {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Err(format!(
            "cannot reach etcd at {endpoints} after {CONNECT_TRIES} tries: {last}"
        ))
    }
}

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

/// One lock as this server last saw it in etcd.
#[derive(Clone, Debug)]
struct Entry {
    /// `None`: the key does not exist (the lock is free).
    lock: Option<Lock>,
    /// Grants not yet confirmed by their waiters' servers.
    unconfirmed: Vec<WaiterGrant>,
    /// The key's mod revision (0 when absent), compared by transactions.
    mod_revision: i64,
    /// The store revision this view is valid at; older news never overwrites it.
    as_of: i64,
}

/// What this server knows of etcd's state, from its watch and its own transactions.
#[derive(Default)]
struct Cache {
    locks: BTreeMap<String, Entry>,
    next_generation: u64,
    meta_revision: i64,
    meta_as_of: i64,
    replicas: BTreeSet<u64>,
    /// Last revision the watch delivered.
    watched: i64,
    /// How many entries hold a lock (`lock` is `Some`), for the lock limit.
    present: usize,
    /// (earliest lease expiry, name) of every lock with a lease, so that neither the writer's
    /// sleep nor its expiry pass scans the cache.
    expiries: BTreeSet<(SystemTime, String)>,
    limits: crate::rules::Limits,
}

impl Cache {
    fn set_lock(&mut self, name: &str, entry: Entry) {
        if self
            .locks
            .get(name)
            .is_some_and(|current| current.as_of >= entry.as_of)
        {
            return;
        }
        let expiry = |e: &Entry| e.lock.as_ref().and_then(Lock::expires_at);
        let after = expiry(&entry);
        self.present += usize::from(entry.lock.is_some());
        if let Some(old) = self.locks.insert(name.to_string(), entry) {
            self.present -= usize::from(old.lock.is_some());
            if let Some(at) = expiry(&old) {
                self.expiries.remove(&(at, name.to_string()));
            }
        }
        if let Some(at) = after {
            self.expiries.insert((at, name.to_string()));
        }
    }

    fn set_meta(&mut self, next_generation: u64, mod_revision: i64, as_of: i64) {
        if as_of > self.meta_as_of {
            self.next_generation = next_generation;
            self.meta_revision = mod_revision;
            self.meta_as_of = as_of;
        }
    }

    /// Forgets free locks the watch has moved past (their news can no longer be stale).
    fn prune(&mut self) {
        let watched = self.watched;
        self.locks
            .retain(|_, e| e.lock.is_some() || e.as_of > watched);
    }

    fn held(&self) -> impl Iterator<Item = (&String, &Lock)> {
        self.locks
            .iter()
            .filter_map(|(name, e)| e.lock.as_ref().map(|l| (name, l)))
    }

    fn table(&self) -> LockTable {
        let locks = self.held().map(|(n, l)| (n.clone(), l.clone())).collect();
        LockTable::from_parts(locks, self.next_generation)
    }

    fn next_expiry(&self) -> Option<SystemTime> {
        self.expiries.first().map(|(at, _)| *at)
    }

    fn expired_names(&self, now: SystemTime) -> Vec<String> {
        self.expiries
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, name)| name.clone())
            .take(MAX_LOCKS_PER_TXN)
            .collect()
    }
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

/// A runtime of its own for the etcd client, the writer and the watch, so they do not depend
/// on the HTTP server's worker threads.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("etcd")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the etcd client runtime: {e}"))
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

/// Takes the next replica id from the counter.
async fn take_replica_id(client: &mut Client, keys: &Keys) -> Result<u64, etcd_client::Error> {
    let key = keys.next_replica();
    loop {
        let response = client.get(key.clone(), None).await?;
        let (current, revision) = match response.kvs().first() {
            Some(kv) => (
                std::str::from_utf8(kv.value())
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1),
                kv.mod_revision(),
            ),
            None => (1, 0),
        };
        let id = current.max(1);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(key.clone(), (id + 1).to_string(), None)]);
        if client.txn(txn).await?.succeeded() {
            return Ok(id);
        }
    }
}

/// Grants a lease and puts this server's liveness key on it. Returns the lease id.
async fn register(
    client: &mut Client,
    keys: &Keys,
    replica: u64,
) -> Result<i64, etcd_client::Error> {
    let lease = client.lease_grant(REPLICA_LEASE_SECONDS, None).await?.id();
    let value = format!(
        "{{\"pid\":{},\"host\":{:?}}}",
        std::process::id(),
        hostname()
    );
    client
        .put(
            keys.replica(replica),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    Ok(lease)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Renews this server's liveness lease; registers again if it was lost (etcd unreachable for
/// longer than the lease). Waiters queued meanwhile may have been dropped by other servers:
/// they time out and their clients repeat.
async fn keep_alive(members: Arc<Members>, shared: Arc<Shared>, lease: Arc<AtomicU64>) {
    loop {
        let id = lease.load(Ordering::Relaxed) as i64;
        let mut member = None;
        let alive = async {
            let (i, mut client) = members.pinned().await?;
            member = Some(i);
            let (mut keeper, mut stream) = client.lease_keep_alive(id).await?;
            loop {
                keeper.keep_alive().await?;
                match tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await {
                    Ok(Ok(Some(response))) if response.ttl() > 0 => {}
                    Ok(Ok(_)) => return Ok::<_, etcd_client::Error>(()),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        return Err(etcd_client::Error::LeaseKeepAliveError(
                            "no answer in time".into(),
                        ));
                    }
                }
                tokio::time::sleep(KEEP_ALIVE_EVERY).await;
            }
        };
        let result = alive.await;
        match result {
            Ok(()) => warn!("this server's etcd lease expired; registering again"),
            Err(e) => {
                warn!("renewing this server's etcd lease failed: {e}");
                if let Some(i) = member {
                    members.failed(i);
                }
            }
        }
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // The old lease may still be alive (a broken stream, not an expiry): keep it.
            let still = members
                .call(REQUEST_TIMEOUT, |mut client| async move {
                    client.lease_time_to_live(id, None).await
                })
                .await;
            if let Ok(ttl) = still
                && ttl.ttl() > 0
            {
                break;
            }
            let registered = members
                .call(REQUEST_TIMEOUT * 2, |mut client| {
                    let keys = shared.keys.clone();
                    let replica = shared.replica;
                    async move { register(&mut client, &keys, replica).await }
                })
                .await;
            match registered {
                Ok(new) => {
                    lease.store(new as u64, Ordering::Relaxed);
                    info!("registered again with etcd as replica {}", shared.replica);
                    break;
                }
                Err(e) => warn!("registering with etcd failed: {e}"),
            }
        }
    }
}

/// Reads everything under the prefix into the cache; returns the revision it is valid at.
/// With `deliver`, grants to this server's waiters that the cache had not seen are handed over
/// (after the watch lost its place).
async fn load_all(client: &mut Client, shared: &Arc<Shared>, deliver: bool) -> Result<i64, String> {
    let response = client
        .get(shared.keys.prefix(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| e.to_string())?;
    let revision = response.header().map(|h| h.revision()).unwrap_or(0);
    let mut seen = BTreeSet::new();
    let mut replicas = BTreeSet::new();
    for kv in response.kvs() {
        let Ok(key) = kv.key_str() else { continue };
        match shared.keys.classify(key) {
            KeyKind::Meta => {
                let next = codec::decode_meta(kv.value())?;
                shared
                    .cache
                    .lock()
                    .set_meta(next, kv.mod_revision(), revision);
            }
            KeyKind::Lock(name) => {
                seen.insert(name.to_string());
                let fresh = shared
                    .cache
                    .lock()
                    .locks
                    .get(name)
                    .is_none_or(|e| e.mod_revision < kv.mod_revision());
                shared.observe_lock(name, Some(kv), revision, deliver && fresh);
            }
            KeyKind::Replica(id) => {
                replicas.insert(id);
            }
            KeyKind::Other => {}
        }
    }
    let mut cache = shared.cache.lock();
    let gone: Vec<String> = cache
        .locks
        .keys()
        .filter(|name| !seen.contains(*name))
        .cloned()
        .collect();
    for name in gone {
        cache.set_lock(
            &name,
            Entry {
                lock: None,
                unconfirmed: Vec::new(),
                mod_revision: 0,
                as_of: revision,
            },
        );
    }
    cache.replicas = replicas;
    cache.watched = cache.watched.max(revision);
    Ok(revision)
}

/// Follows every change under the prefix: keeps the cache current, hands grants to this
/// server's waiters, and tracks which servers are alive. Reconnects by itself.
async fn watch_prefix(members: Arc<Members>, shared: Arc<Shared>, mut next: i64) {
    loop {
        let (member, mut client) = match members.pinned().await {
            Ok(pinned) => pinned,
            Err(e) => {
                warn!("cannot watch etcd: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        let options = WatchOptions::new().with_prefix().with_start_revision(next);
        match client.watch(shared.keys.prefix(), Some(options)).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(response)) => {
                        if response.compact_revision() > 0 || response.canceled() {
                            warn!(
                                "etcd watch lost its place (compacted at {}); reloading",
                                response.compact_revision()
                            );
                            match load_all(&mut client, &shared, true).await {
                                Ok(revision) => next = revision + 1,
                                Err(e) => warn!("reloading from etcd failed: {e}"),
                            }
                            break;
                        }
                        for event in response.events() {
                            let Some(kv) = event.kv() else { continue };
                            next = next.max(kv.mod_revision() + 1);
                            apply_event(&shared, event.event_type(), kv);
                        }
                        {
                            let mut cache = shared.cache.lock();
                            cache.watched = cache.watched.max(next - 1);
                            cache.prune();
                        }
                        shared.wake.notify_one();
                    }
                    Ok(None) => {
                        warn!("etcd watch ended; watching again");
                        break;
                    }
                    Err(e) => {
                        warn!("etcd watch failed: {e}; watching again");
                        members.failed(member);
                        break;
                    }
                }
            },
            Err(e) => {
                warn!("cannot watch etcd: {e}");
                members.failed(member);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn apply_event(shared: &Arc<Shared>, kind: EventType, kv: &KeyValue) {
    let Ok(key) = kv.key_str() else { return };
    let revision = kv.mod_revision();
    match (shared.keys.classify(key), kind) {
        (KeyKind::Lock(name), EventType::Put) => {
            shared.observe_lock(name, Some(kv), revision, true)
        }
        (KeyKind::Lock(name), EventType::Delete) => shared.observe_lock(name, None, revision, true),
        (KeyKind::Meta, EventType::Put) => match codec::decode_meta(kv.value()) {
            Ok(next) => shared.cache.lock().set_meta(next, revision, revision),
            Err(e) => error!("{e}"),
        },
        (KeyKind::Replica(id), EventType::Put) => {
            shared.cache.lock().replicas.insert(id);
        }
        (KeyKind::Replica(id), EventType::Delete) => {
            shared.cache.lock().replicas.remove(&id);
        }
        _ => {}
    }
}

/// The one task of this server that writes lock state to etcd.
struct Writer {
    shared: Arc<Shared>,
    members: Arc<Members>,
    /// Internal operations whose transaction failed; applied again with a later batch.
    retry: Vec<Op>,
    /// Commands taken from the channel that did not fit in the last batch.
    backlog: VecDeque<Command>,
    last_failure: Option<Instant>,
    last_purge: Instant,
}

/// One client operation of a batch.
struct Pending {
    op: Op,
    reply: Reply,
}

/// One confirmation of a batch.
struct PendingConfirm {
    grant: WaiterGrant,
    reply: oneshot::Sender<Result<bool, StoreError>>,
}

impl Writer {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut stopping = false;
        loop {
            let mut incoming = Vec::new();
            if self.backlog.is_empty() && !stopping {
                let idle = self.idle_time();
                tokio::select! {
                    command = commands.recv() => match command {
                        Some(Command::Shutdown) | None => stopping = true,
                        Some(command) => incoming.push(command),
                    },
                    _ = tokio::time::sleep(idle) => {}
                    _ = self.shared.wake.notified() => {}
                }
            }
            while incoming.len() < MAX_BATCH {
                if let Some(command) = self.backlog.pop_front() {
                    incoming.push(command);
                    continue;
                }
                match commands.try_recv() {
                    Ok(Command::Shutdown) => stopping = true,
                    Ok(command) => incoming.push(command),
                    Err(_) => break,
                }
            }
            let done = stopping && incoming.is_empty() && self.backlog.is_empty();
            self.run_batch(incoming).await;
            if done {
                if !self.retry.is_empty() {
                    warn!("etcd writer stopping with clean-up that could not be written");
                }
                return;
            }
        }
    }

    fn backoff(&self) -> Duration {
        self.last_failure
            .map(|at| RETRY_AFTER_FAILURE.saturating_sub(at.elapsed()))
            .unwrap_or(Duration::ZERO)
    }

    fn idle_time(&self) -> Duration {
        let mut idle = PURGE_EVERY.saturating_sub(self.last_purge.elapsed());
        let backoff = self.backoff();
        if let Some(at) = self.shared.cache.lock().next_expiry() {
            let until = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            idle = idle.min(until.max(backoff));
        }
        if !self.retry.is_empty() {
            idle = idle.min(backoff);
        }
        idle
    }

    /// Queue entries of servers that are gone, checked against a linearizable read of the
    /// live servers (the cache alone may not have seen a new server register yet).
    async fn dead_waiters(&mut self) -> Vec<Op> {
        self.last_purge = Instant::now();
        let suspects: Vec<(String, WaiterId, Option<WaiterGrant>)> = {
            let cache = self.shared.cache.lock();
            let queued = cache.held().flat_map(|(name, lock)| {
                lock.queued()
                    .map(|(id, _)| (name.clone(), id, None))
                    .collect::<Vec<_>>()
            });
            let unconfirmed = cache.locks.values().flat_map(|e| {
                e.unconfirmed
                    .iter()
                    .map(|g| (g.name.clone(), g.waiter, Some(g.clone())))
            });
            queued
                .chain(unconfirmed)
                .filter(|(_, id, _)| {
                    let replica = waiter_replica(*id);
                    replica != self.shared.replica && !cache.replicas.contains(&replica)
                })
                .collect()
        };
        if suspects.is_empty() {
            return Vec::new();
        }
        let prefix = self.shared.keys.replicas_prefix();
        let read = self.members.call(REQUEST_TIMEOUT, |mut client| {
            let prefix = prefix.clone();
            async move {
                client
                    .get(
                        prefix,
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    )
                    .await
            }
        });
        let live: BTreeSet<u64> = match read.await {
            Ok(response) => response
                .kvs()
                .iter()
                .filter_map(|kv| match self.shared.keys.classify(kv.key_str().ok()?) {
                    KeyKind::Replica(id) => Some(id),
                    _ => None,
                })
                .collect(),
            _ => return Vec::new(),
        };
        suspects
            .into_iter()
            .filter(|(_, id, _)| !live.contains(&waiter_replica(*id)))
            .take(MAX_LOCKS_PER_TXN)
            .map(|(name, waiter, grant)| {
                info!(
                    "dropping waiter {waiter} on lock {name:?}: its server (replica {}) is gone",
                    waiter_replica(waiter)
                );
                match grant {
                    Some(grant) => Op::Revoke(grant),
                    None => Op::Cancel { name, waiter },
                }
            })
            .collect()
    }

    async fn run_batch(&mut self, incoming: Vec<Command>) {
        let started = Instant::now();
        let mut internal = Vec::new();
        if self.backoff().is_zero() || !incoming.is_empty() {
            internal.append(&mut self.retry);
        }
        if self.last_purge.elapsed() >= PURGE_EVERY {
            internal.extend(self.dead_waiters().await);
        }
        let mut clients: Vec<Pending> = Vec::new();
        let mut confirms: Vec<PendingConfirm> = Vec::new();
        let mut names: BTreeSet<String> = internal
            .iter()
            .filter_map(|op| op.lock_name().map(str::to_string))
            .collect();
        let mut commands = incoming.into_iter();
        while let Some(command) = commands.next() {
            match command {
                Command::Client { op, reply, since } => {
                    if since.elapsed() > BATCH_DEADLINE {
                        let _ = reply.send(Err(unavailable(
                            "no transaction could be committed in time",
                        )));
                        continue;
                    }
                    if let Some(name) = op.lock_name()
                        && !names.contains(name)
                        && names.len() >= MAX_LOCKS_PER_TXN
                    {
                        self.backlog.push_back(Command::Client { op, reply, since });
                        self.backlog.extend(commands.by_ref());
                        break;
                    }
                    names.extend(op.lock_name().map(str::to_string));
                    clients.push(Pending { op, reply });
                }
                Command::Internal(op) => {
                    names.extend(op.lock_name().map(str::to_string));
                    internal.push(op);
                }
                Command::Confirm { grant, reply } => {
                    names.insert(grant.name.clone());
                    confirms.push(PendingConfirm { grant, reply });
                }
                Command::Shutdown => {}
            }
        }
        let expire_due = self
            .shared
            .cache
            .lock()
            .next_expiry()
            .is_some_and(|at| at <= SystemTime::now());
        if clients.is_empty() && internal.is_empty() && confirms.is_empty() && !expire_due {
            return;
        }
        let confirmed: Vec<WaiterGrant> = confirms.iter().map(|c| c.grant.clone()).collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let now = SystemTime::now();
            let mut ops: Vec<Op> = internal.clone();
            let mut names = names.clone();
            if expire_due {
                let expired = self.shared.cache.lock().expired_names(now);
                if !expired.is_empty() {
                    names.extend(expired);
                    ops.push(Op::Expire);
                }
            }
            ops.extend(clients.iter().map(|p| p.op.clone()));
            let plan = self.plan(&names, &ops, &confirmed, now);
            let plan = match plan {
                Ok(plan) => plan,
                Err(e) => {
                    self.fail(clients, confirms, internal, e);
                    return;
                }
            };
            if plan.writes.is_empty() && clients.is_empty() && confirms.is_empty() {
                // Internal clean-up that changed nothing (e.g. a cancel of a waiter already
                // granted or gone): nothing to commit.
                return;
            }
            let txn = Txn::new()
                .when(plan.compares.clone())
                .and_then(plan.writes.clone())
                .or_else(plan.reads.clone());
            // Tried on another member only when it could not connect (it was never sent):
            // a transaction that may have been applied is never sent twice.
            let result = self
                .members
                .call(REQUEST_TIMEOUT, |mut client| {
                    let txn = txn.clone();
                    async move { client.txn(txn).await }
                })
                .await;
            let response = match result {
                Ok(response) => response,
                Err(e) => {
                    self.fail(clients, confirms, internal, e.to_string());
                    return;
                }
            };
            let revision = response.header().map(|h| h.revision()).unwrap_or(0);
            if response.succeeded() {
                // Client operations come last in the batch.
                let first = plan.effects.len() - clients.len();
                let effects = plan.effects[first..].to_vec();
                let stood = plan.confirmed.clone();
                self.commit(plan, revision, started, ops.len());
                for (confirm, stood) in confirms.into_iter().zip(stood) {
                    let _ = confirm.reply.send(Ok(stood));
                }
                for (pending, effect) in clients.into_iter().zip(effects) {
                    let _ = pending.reply.send(Ok(effect));
                }
                return;
            }
            // Another server changed what we read: take its values and apply the batch again.
            self.refresh(&names, response.op_responses(), revision);
            if started.elapsed() > BATCH_DEADLINE {
                self.fail(
                    clients,
                    confirms,
                    internal,
                    format!("still conflicting after {attempt} attempts"),
                );
                return;
            }
        }
    }

    /// Applies `ops` to the cached locks in `names` and turns the result into a transaction.
    fn plan(
        &self,
        names: &BTreeSet<String>,
        ops: &[Op],
        confirms: &[WaiterGrant],
        now: SystemTime,
    ) -> Result<Plan, String> {
        let cache = self.shared.cache.lock();
        let mut before: BTreeMap<String, Option<Lock>> = BTreeMap::new();
        let mut unconfirmed_before: BTreeMap<String, Vec<WaiterGrant>> = BTreeMap::new();
        let mut compares = Vec::new();
        let mut reads = Vec::new();
        for name in names {
            let entry = cache.locks.get(name);
            let key = self.shared.keys.lock(name);
            compares.push(Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                entry.map(|e| e.mod_revision).unwrap_or(0),
            ));
            reads.push(TxnOp::get(key, None));
            before.insert(name.clone(), entry.and_then(|e| e.lock.clone()));
            unconfirmed_before.insert(
                name.clone(),
                entry.map(|e| e.unconfirmed.clone()).unwrap_or_default(),
            );
        }
        let parts = before
            .iter()
            .filter_map(|(n, l)| l.clone().map(|l| (n.clone(), l)))
            .collect();
        // The table holds only the locks this batch touches: the lock limit leaves room for
        // the ones it does not.
        let elsewhere = cache
            .present
            .saturating_sub(before.values().filter(|l| l.is_some()).count());
        let limits = crate::rules::Limits {
            locks: cache.limits.locks.saturating_sub(elsewhere),
            ..cache.limits
        };
        let mut table =
            LockTable::from_parts(parts, cache.next_generation.max(1)).with_limits(limits);
        let start_generation = table.next_generation();
        let meta_revision = cache.meta_revision;
        drop(cache);
        let mut effects = Vec::with_capacity(ops.len());
        for op in ops {
            effects.push(table.apply(op, now));
        }
        let mut grants: BTreeMap<&str, Vec<WaiterGrant>> = BTreeMap::new();
        for grant in effects.iter().flat_map(|e| e.grants()) {
            grants
                .entry(grant.name.as_str())
                .or_default()
                .push(grant.clone());
        }
        // Unconfirmed grants: new ones join; confirmed and revoked ones leave.
        let revoked: BTreeSet<WaiterId> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Revoke(grant) => Some(grant.waiter),
                _ => None,
            })
            .collect();
        let mut unconfirmed_after = unconfirmed_before.clone();
        for (name, granted) in &grants {
            if let Some(list) = unconfirmed_after.get_mut(*name) {
                list.extend(granted.iter().cloned());
            }
        }
        let confirmed: Vec<bool> = confirms
            .iter()
            .map(|c| {
                !revoked.contains(&c.waiter)
                    && unconfirmed_after
                        .get(&c.name)
                        .is_some_and(|list| list.iter().any(|g| g.waiter == c.waiter))
            })
            .collect();
        let confirmed_ids: BTreeSet<WaiterId> = confirms.iter().map(|c| c.waiter).collect();
        for list in unconfirmed_after.values_mut() {
            list.retain(|g| !revoked.contains(&g.waiter) && !confirmed_ids.contains(&g.waiter));
        }
        let mut writes = Vec::new();
        let mut after = BTreeMap::new();
        for (name, old) in &before {
            let new = table.lock(name).cloned();
            let granted = grants.get(name.as_str()).map(Vec::as_slice).unwrap_or(&[]);
            let mut unconfirmed = unconfirmed_after.remove(name).unwrap_or_default();
            if new.is_none() {
                unconfirmed.clear();
            }
            if &new == old
                && granted.is_empty()
                && unconfirmed_before.get(name) == Some(&unconfirmed)
            {
                continue;
            }
            let key = self.shared.keys.lock(name);
            match &new {
                Some(lock) => writes.push(TxnOp::put(
                    key,
                    codec::encode_lock(lock, granted, &unconfirmed)?,
                    None,
                )),
                None => writes.push(TxnOp::delete(key, None)),
            }
            after.insert(name.clone(), (new, unconfirmed));
        }
        let next_generation = table.next_generation();
        let meta_key = self.shared.keys.meta();
        reads.push(TxnOp::get(meta_key.clone(), None));
        if next_generation != start_generation {
            compares.push(Compare::mod_revision(
                meta_key.clone(),
                CompareOp::Equal,
                meta_revision,
            ));
            writes.push(TxnOp::put(
                meta_key,
                codec::encode_meta(next_generation),
                None,
            ));
        }
        Ok(Plan {
            compares,
            writes,
            reads,
            after,
            next_generation: (next_generation != start_generation).then_some(next_generation),
            effects,
            confirmed,
        })
    }

    fn commit(&mut self, plan: Plan, revision: i64, started: Instant, operations: usize) {
        self.last_failure = None;
        if !plan.writes.is_empty() {
            self.shared.metrics.write(started.elapsed(), operations);
        }
        let mut cache = self.shared.cache.lock();
        for (name, (lock, unconfirmed)) in plan.after {
            let mod_revision = if lock.is_some() { revision } else { 0 };
            cache.set_lock(
                &name,
                Entry {
                    lock,
                    unconfirmed,
                    mod_revision,
                    as_of: revision,
                },
            );
        }
        if let Some(next) = plan.next_generation {
            cache.set_meta(next, revision, revision);
        }
        drop(cache);
        log_effects(&plan.effects);
    }

    /// Takes the current values a failed transaction returned into the cache.
    fn refresh(&mut self, names: &BTreeSet<String>, responses: Vec<TxnOpResponse>, revision: i64) {
        let mut gets = responses.into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        });
        for name in names {
            let Some(get) = gets.next() else { return };
            // Grants in these values reach their waiters through the watch, not from here.
            self.shared
                .observe_lock(name, get.kvs().first(), revision, false);
        }
        if let Some(get) = gets.next() {
            match get.kvs().first() {
                Some(kv) => match codec::decode_meta(kv.value()) {
                    Ok(next) => {
                        self.shared
                            .cache
                            .lock()
                            .set_meta(next, kv.mod_revision(), revision)
                    }
                    Err(e) => error!("{e}"),
                },
                None => self.shared.cache.lock().set_meta(1, 0, revision),
            }
        }
    }

    fn fail(
        &mut self,
        clients: Vec<Pending>,
        confirms: Vec<PendingConfirm>,
        internal: Vec<Op>,
        reason: String,
    ) {
        error!(
            "etcd transaction failed: {reason}; {} request(s) answered 503",
            clients.len()
        );
        self.shared.metrics.write_failed();
        self.last_failure = Some(Instant::now());
        for pending in clients {
            let _ = pending.reply.send(Err(unavailable(&reason)));
        }
        for confirm in confirms {
            let _ = confirm.reply.send(Err(unavailable(&reason)));
        }
        // Clean-up must not be lost: it is applied again with a later batch.
        self.retry.extend(
            internal
                .into_iter()
                .filter(|op| matches!(op, Op::Cancel { .. } | Op::Revoke(_))),
        );
    }
}

/// A batch applied to the cached state: the transaction, and what it will have done.
struct Plan {
    compares: Vec<Compare>,
    writes: Vec<TxnOp>,
    reads: Vec<TxnOp>,
    after: BTreeMap<String, (Option<Lock>, Vec<WaiterGrant>)>,
    next_generation: Option<u64>,
    effects: Vec<Effect>,
    /// For each confirmation, whether its grant still stood.
    confirmed: Vec<bool>,
}

fn log_effects(effects: &[Effect]) {
    for effect in effects {
        match effect {
            Effect::ForceRelease(force) if !force.previous.is_empty() => {
                let previous: Vec<String> = force
                    .previous
                    .iter()
                    .map(|h| format!("key {:?} held by {:?}", h.key, h.counts()))
                    .collect();
                warn!("force-released a lock: {}", previous.join("; "));
            }
            Effect::Expiry(expiry) => {
                for gone in &expiry.expired {
                    info!(
                        "lease of {:?} on lock {:?} (key {:?}) expired",
                        gone.requestor, gone.name, gone.key
                    );
                }
            }
            _ => {}
        }
    }
}

#[async_trait]
impl LockStore for EtcdStore {
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
