//! What this server knows of etcd's state: the cache of every lock, kept current by the
//! server's own transactions and by a watch of the prefix, which also hands grants to this
//! server's waiters and tracks which servers are alive.

use super::*;

/// One lock as this server last saw it in etcd.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    /// `None`: the key does not exist (the lock is free).
    pub(super) lock: Option<Lock>,
    /// Grants not yet confirmed by their waiters' servers.
    pub(super) unconfirmed: Vec<WaiterGrant>,
    /// The key's mod revision (0 when absent), compared by transactions.
    pub(super) mod_revision: i64,
    /// The store revision this view is valid at; older news never overwrites it.
    pub(super) as_of: i64,
}

/// What this server knows of etcd's state, from its watch and its own transactions.
#[derive(Default)]
pub(super) struct Cache {
    pub(super) locks: BTreeMap<String, Entry>,
    pub(super) next_generation: u64,
    pub(super) meta_revision: i64,
    pub(super) meta_as_of: i64,
    pub(super) replicas: BTreeSet<u64>,
    /// Last revision the watch delivered.
    pub(super) watched: i64,
    /// How many entries hold a lock (`lock` is `Some`), for the lock limit.
    pub(super) present: usize,
    /// (earliest lease expiry, name) of every lock with a lease, so that neither the writer's
    /// sleep nor its expiry pass scans the cache.
    pub(super) expiries: BTreeSet<(SystemTime, String)>,
    pub(super) limits: crate::rules::Limits,
}

impl Cache {
    pub(super) fn set_lock(&mut self, name: &str, entry: Entry) {
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

    pub(super) fn set_meta(&mut self, next_generation: u64, mod_revision: i64, as_of: i64) {
        if as_of > self.meta_as_of {
            self.next_generation = next_generation;
            self.meta_revision = mod_revision;
            self.meta_as_of = as_of;
        }
    }

    /// Forgets free locks the watch has moved past (their news can no longer be stale).
    pub(super) fn prune(&mut self) {
        let watched = self.watched;
        self.locks
            .retain(|_, e| e.lock.is_some() || e.as_of > watched);
    }

    pub(super) fn held(&self) -> impl Iterator<Item = (&String, &Lock)> {
        self.locks
            .iter()
            .filter_map(|(name, e)| e.lock.as_ref().map(|l| (name, l)))
    }

    pub(super) fn table(&self) -> LockTable {
        let locks = self.held().map(|(n, l)| (n.clone(), l.clone())).collect();
        LockTable::from_parts(locks, self.next_generation)
    }

    pub(super) fn next_expiry(&self) -> Option<SystemTime> {
        self.expiries.first().map(|(at, _)| *at)
    }

    pub(super) fn expired_names(&self, now: SystemTime) -> Vec<String> {
        self.expiries
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, name)| name.clone())
            .take(MAX_LOCKS_PER_TXN)
            .collect()
    }
}

/// Why the state could not be read from etcd.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
}

/// Reads everything under the prefix into the cache; returns the revision it is valid at.
/// With `deliver`, grants to this server's waiters that the cache had not seen are handed over
/// (after the watch lost its place).
pub(super) async fn load_all(
    client: &mut Client,
    shared: &Arc<Shared>,
    deliver: bool,
) -> Result<i64, LoadError> {
    let response = client
        .get(shared.keys.prefix(), Some(GetOptions::new().with_prefix()))
        .await?;
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
pub(super) async fn watch_prefix(members: Arc<Members>, shared: Arc<Shared>, mut next: i64) {
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

pub(super) fn apply_event(shared: &Arc<Shared>, kind: EventType, kv: &KeyValue) {
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
