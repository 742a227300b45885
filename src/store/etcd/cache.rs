//! What this server knows of etcd's state: the cache of every lock and pool, kept current by
//! the server's own transactions and by a watch of the prefix, which also hands grants to this
//! server's waiters and tracks which servers are alive.
//!
//! A pool's items take their metadata from [`Cache::metadata`], kept from the `pool-items/`
//! keys. Every transaction that writes an item's metadata writes its pool's value too, so the
//! cache holds, for each pool, every metadata write up to the pool value's mod revision: each
//! way news arrives (a watch response, a committed or failed transaction, a reload) applies the
//! metadata before the pool's value, under one lock of the cache.

use super::*;

/// One lock or pool as this server last saw it in etcd.
#[derive(Clone, Debug)]
pub(super) struct Entry<T> {
    /// `None`: the key does not exist (the lock is free; the pool has neither items nor
    /// waiting claims).
    pub(super) value: Option<T>,
    /// Grants not yet confirmed by their waiters' servers.
    pub(super) unconfirmed: Vec<WaiterGrant>,
    /// The key's mod revision (0 when absent), compared by transactions.
    pub(super) mod_revision: i64,
    /// The store revision this view is valid at; older news never overwrites it.
    pub(super) as_of: i64,
}

/// One item's metadata as last seen in etcd.
#[derive(Clone, Debug)]
pub(super) struct Metadata {
    pub(super) text: Arc<str>,
    pub(super) mod_revision: i64,
}

/// What this server knows of etcd's state, from its watch and its own transactions.
#[derive(Default)]
pub(super) struct Cache {
    pub(super) locks: BTreeMap<String, Entry<Lock>>,
    /// Pools, their items' metadata filled in from `metadata`.
    pub(super) pools: BTreeMap<String, Entry<Pool>>,
    /// Item metadata by pool and item.
    pub(super) metadata: BTreeMap<String, BTreeMap<String, Metadata>>,
    pub(super) next_generation: u64,
    pub(super) meta_revision: i64,
    pub(super) meta_as_of: i64,
    pub(super) replicas: BTreeSet<u64>,
    /// Last revision the watch delivered.
    pub(super) watched: i64,
    /// How many entries hold a lock (`value` is `Some`), for the lock limit.
    pub(super) present: usize,
    /// (earliest lease expiry, lock or pool) of every lock and pool with a lease, so that
    /// neither the writer's sleep nor its expiry pass scans the cache.
    pub(super) expiries: BTreeSet<(SystemTime, Target)>,
    pub(super) limits: crate::rules::Limits,
}

impl Cache {
    pub(super) fn set_lock(&mut self, name: &str, entry: Entry<Lock>) {
        if self
            .locks
            .get(name)
            .is_some_and(|current| current.as_of >= entry.as_of)
        {
            return;
        }
        let target = Target::Lock(name.to_string());
        let after = entry.value.as_ref().and_then(Lock::expires_at);
        self.present += usize::from(entry.value.is_some());
        let before = match self.locks.insert(name.to_string(), entry) {
            Some(old) => {
                self.present -= usize::from(old.value.is_some());
                old.value.as_ref().and_then(Lock::expires_at)
            }
            None => None,
        };
        self.reindex(target, before, after);
    }

    /// Takes in a pool's value as of `entry.as_of`, its items' metadata filled in from what the
    /// cache holds (metadata is taken in first: see the module's doc), and forgets the
    /// metadata of items it no longer has.
    pub(super) fn set_pool(&mut self, name: &str, mut entry: Entry<Pool>) {
        if self
            .pools
            .get(name)
            .is_some_and(|current| current.as_of >= entry.as_of)
        {
            return;
        }
        if let Some(known) = self.metadata.get_mut(name) {
            // Written no later than this view, of an item this view lacks: the item was
            // removed since, and its key with it.
            let items = entry.value.as_ref().map(|p| &p.items);
            known.retain(|item, m| {
                m.mod_revision > entry.as_of || items.is_some_and(|i| i.contains_key(item))
            });
            if let Some(pool) = &mut entry.value {
                for (item, state) in &mut pool.items {
                    if let Some(m) = known.get(item) {
                        state.metadata = m.text.clone();
                    }
                }
            }
            if known.is_empty() {
                self.metadata.remove(name);
            }
        }
        let target = Target::Pool(name.to_string());
        let after = entry.value.as_ref().and_then(Pool::expires_at);
        let before = self
            .pools
            .insert(name.to_string(), entry)
            .and_then(|old| old.value.as_ref().and_then(Pool::expires_at));
        self.reindex(target, before, after);
    }

    /// Takes in one item's metadata (`None`: its key was deleted) written at `revision`.
    pub(super) fn set_metadata(
        &mut self,
        pool: &str,
        item: &str,
        text: Option<Arc<str>>,
        revision: i64,
    ) {
        let known = self.metadata.entry(pool.to_string()).or_default();
        let newer = known.get(item).is_none_or(|m| m.mod_revision < revision);
        match text {
            Some(text) if newer => {
                // A cached pool older than this write may show it early: harmless, as a
                // transaction planned on that pool's value fails its comparison.
                if let Some(state) = self
                    .pools
                    .get_mut(pool)
                    .and_then(|e| e.value.as_mut())
                    .and_then(|p| p.items.get_mut(item))
                {
                    state.metadata = text.clone();
                }
                known.insert(
                    item.to_string(),
                    Metadata {
                        text,
                        mod_revision: revision,
                    },
                );
            }
            None if newer => {
                known.remove(item);
            }
            _ => {}
        }
        if known.is_empty() {
            self.metadata.remove(pool);
        }
    }

    fn reindex(&mut self, target: Target, before: Option<SystemTime>, after: Option<SystemTime>) {
        if before == after {
            return;
        }
        if let Some(at) = before {
            self.expiries.remove(&(at, target.clone()));
        }
        if let Some(at) = after {
            self.expiries.insert((at, target));
        }
    }

    /// Takes in one lock's value (or its deletion) seen at `as_of`; returns the grants the
    /// value records (made by the transaction that wrote it).
    pub(super) fn observe_lock(
        &mut self,
        name: &str,
        kv: Option<&KeyValue>,
        as_of: i64,
    ) -> Vec<WaiterGrant> {
        let Some((entry, grants)) = observed(kv, as_of, |v| codec::decode_lock(name, v)) else {
            return Vec::new();
        };
        self.set_lock(name, entry);
        grants
    }

    /// [`Cache::observe_lock`] of a pool's value.
    pub(super) fn observe_pool(
        &mut self,
        name: &str,
        kv: Option<&KeyValue>,
        as_of: i64,
    ) -> Vec<WaiterGrant> {
        let Some((entry, grants)) = observed(kv, as_of, |v| codec::decode_pool(name, v)) else {
            return Vec::new();
        };
        self.set_pool(name, entry);
        grants
    }

    /// Takes in one item's metadata key (`None`: deleted at `revision`).
    pub(super) fn observe_metadata(
        &mut self,
        pool: &str,
        item: &str,
        kv: Option<&KeyValue>,
        revision: i64,
    ) {
        match kv {
            Some(kv) => match codec::decode_metadata(pool, item, kv.value()) {
                Ok(text) => self.set_metadata(pool, item, Some(text), kv.mod_revision()),
                Err(e) => error!("{e}"),
            },
            None => self.set_metadata(pool, item, None, revision),
        }
    }

    pub(super) fn set_meta(&mut self, next_generation: u64, mod_revision: i64, as_of: i64) {
        if as_of > self.meta_as_of {
            self.next_generation = next_generation;
            self.meta_revision = mod_revision;
            self.meta_as_of = as_of;
        }
    }

    /// Forgets free locks and unused pools the watch has moved past (their news can no longer
    /// be stale).
    pub(super) fn prune(&mut self) {
        let watched = self.watched;
        self.locks
            .retain(|_, e| e.value.is_some() || e.as_of > watched);
        self.pools
            .retain(|_, e| e.value.is_some() || e.as_of > watched);
    }

    pub(super) fn held(&self) -> impl Iterator<Item = (&String, &Lock)> {
        self.locks
            .iter()
            .filter_map(|(name, e)| e.value.as_ref().map(|l| (name, l)))
    }

    pub(super) fn present_pools(&self) -> impl Iterator<Item = (&String, &Pool)> {
        self.pools
            .iter()
            .filter_map(|(name, e)| e.value.as_ref().map(|p| (name, p)))
    }

    pub(super) fn table(&self) -> LockTable {
        let locks = self.held().map(|(n, l)| (n.clone(), l.clone())).collect();
        let pools = self
            .present_pools()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        LockTable::from_parts(locks, self.next_generation).with_pools(pools)
    }

    pub(super) fn next_expiry(&self) -> Option<SystemTime> {
        self.expiries.first().map(|(at, _)| *at)
    }

    /// The locks and pools with a lease run out at `now`, earliest first.
    pub(super) fn expired(&self, now: SystemTime) -> impl Iterator<Item = &Target> {
        self.expiries
            .iter()
            .take_while(move |(at, _)| *at <= now)
            .map(|(_, target)| target)
    }

    /// The state of `item` of `pool` as this server last saw it; `None`: no such item.
    pub(super) fn item_state(&self, pool: &str, item: &str) -> Option<ItemState> {
        self.pools
            .get(pool)
            .and_then(|e| e.value.as_ref())
            .and_then(|p| p.items.get(item))
            .map(ItemState::of)
    }
}

/// The entry a lock's or pool's key (`None`: deleted) makes as seen at `as_of`, and the grants
/// its value records; `None` when the value does not decode (logged).
fn observed<T, D: Into<Observed<T>>>(
    kv: Option<&KeyValue>,
    as_of: i64,
    decode: impl FnOnce(&[u8]) -> Result<D, codec::CodecError>,
) -> Option<(Entry<T>, Vec<WaiterGrant>)> {
    let Some(kv) = kv else {
        return Some((absent(as_of), Vec::new()));
    };
    match decode(kv.value()) {
        Ok(decoded) => {
            let decoded = decoded.into();
            let entry = Entry {
                value: Some(decoded.value),
                unconfirmed: decoded.unconfirmed,
                mod_revision: kv.mod_revision(),
                as_of,
            };
            Some((entry, decoded.grants))
        }
        Err(e) => {
            error!("{e}");
            None
        }
    }
}

/// A decoded lock or pool value.
struct Observed<T> {
    value: T,
    /// The grants the transaction that wrote it made.
    grants: Vec<WaiterGrant>,
    unconfirmed: Vec<WaiterGrant>,
}

impl From<codec::Decoded> for Observed<Lock> {
    fn from(decoded: codec::Decoded) -> Self {
        Observed {
            value: decoded.lock,
            grants: decoded.grants,
            unconfirmed: decoded.unconfirmed,
        }
    }
}

impl From<codec::DecodedPool> for Observed<Pool> {
    fn from(decoded: codec::DecodedPool) -> Self {
        Observed {
            value: decoded.pool,
            grants: decoded.grants,
            unconfirmed: decoded.unconfirmed,
        }
    }
}

fn absent<T>(as_of: i64) -> Entry<T> {
    Entry {
        value: None,
        unconfirmed: Vec::new(),
        mod_revision: 0,
        as_of,
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
    client: &Client,
    shared: &Arc<Shared>,
    deliver: bool,
) -> Result<i64, LoadError> {
    let response = kv(client)
        .get(shared.keys.prefix(), Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = response.header().map(|h| h.revision()).unwrap_or(0);
    let mut cache = shared.cache.lock();
    let mut grants = Vec::new();
    let mut seen_locks = BTreeSet::new();
    let mut seen_pools = BTreeSet::new();
    let mut seen_items = BTreeSet::new();
    let mut replicas = BTreeSet::new();
    let kinds: Vec<(KeyKind, &KeyValue)> = response
        .kvs()
        .iter()
        .filter_map(|kv| Some((shared.keys.classify(kv.key_str().ok()?), kv)))
        .collect();
    // Metadata first: see the module's doc.
    for (kind, kv) in &kinds {
        if let KeyKind::PoolItem(pool, item) = kind {
            seen_items.insert((pool.clone(), item.to_string()));
            cache.observe_metadata(pool, item, Some(kv), revision);
        }
    }
    for (kind, kv) in &kinds {
        match kind {
            KeyKind::Meta => {
                let next = codec::decode_meta(kv.value())?;
                cache.set_meta(next, kv.mod_revision(), revision);
            }
            KeyKind::Lock(name) => {
                seen_locks.insert(name.to_string());
                let fresh = cache
                    .locks
                    .get(*name)
                    .is_none_or(|e| e.mod_revision < kv.mod_revision());
                let granted = cache.observe_lock(name, Some(kv), revision);
                if deliver && fresh {
                    grants.extend(granted);
                }
            }
            KeyKind::Pool(name) => {
                seen_pools.insert(name.to_string());
                let fresh = cache
                    .pools
                    .get(*name)
                    .is_none_or(|e| e.mod_revision < kv.mod_revision());
                let granted = cache.observe_pool(name, Some(kv), revision);
                if deliver && fresh {
                    grants.extend(granted);
                }
            }
            KeyKind::Replica(id) => {
                replicas.insert(*id);
            }
            KeyKind::PoolItem(..) | KeyKind::History | KeyKind::HistoryLost | KeyKind::Other => {}
        }
    }
    let gone_items: Vec<(String, String)> = cache
        .metadata
        .iter()
        .flat_map(|(pool, items)| items.keys().map(|item| (pool.clone(), item.clone())))
        .filter(|key| !seen_items.contains(key))
        .collect();
    for (pool, item) in gone_items {
        cache.set_metadata(&pool, &item, None, revision);
    }
    let gone: Vec<String> = cache
        .locks
        .keys()
        .filter(|name| !seen_locks.contains(*name))
        .cloned()
        .collect();
    for name in gone {
        cache.set_lock(&name, absent(revision));
    }
    let gone: Vec<String> = cache
        .pools
        .keys()
        .filter(|name| !seen_pools.contains(*name))
        .cloned()
        .collect();
    for name in gone {
        cache.set_pool(&name, absent(revision));
    }
    cache.replicas = replicas;
    cache.watched = cache.watched.max(revision);
    drop(cache);
    if let Some(recorder) = &shared.recorder {
        let mut records = Vec::new();
        for (kind, kv) in &kinds {
            match kind {
                KeyKind::History => {
                    if let Ok(key) = kv.key_str() {
                        records.push((key, kv.create_revision(), kv.value()));
                    }
                }
                KeyKind::HistoryLost => recorder.lost(kv.value()),
                _ => {}
            }
        }
        // Before any grant is handed over: a waiter's client then finds its grant's events.
        recorder.reload(records, deliver);
    }
    shared.seen.send_if_modified(|seen| {
        let newer = revision > *seen;
        *seen = (*seen).max(revision);
        newer
    });
    shared.deliver_all(grants);
    Ok(revision)
}

/// Follows every change under the prefix: keeps the cache current, hands grants to this
/// server's waiters, and tracks which servers are alive. Reconnects by itself.
pub(super) async fn watch_prefix(members: Arc<Members>, shared: Arc<Shared>, mut next: i64) {
    loop {
        let (member, client) = match members.pinned().await {
            Ok(pinned) => pinned,
            Err(e) => {
                warn!("cannot watch etcd: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        let options = WatchOptions::new().with_prefix().with_start_revision(next);
        let watching = client
            .watch_client()
            .max_decoding_message_size(MAX_ANSWER_BYTES)
            .watch(shared.keys.prefix(), Some(options))
            .await;
        match watching {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(response)) => {
                        if response.compact_revision() > 0 || response.canceled() {
                            warn!(
                                "etcd watch lost its place (compacted at {}); reloading",
                                response.compact_revision()
                            );
                            match load_all(&client, &shared, true).await {
                                Ok(revision) => next = revision + 1,
                                Err(e) => warn!("reloading from etcd failed: {e}"),
                            }
                            break;
                        }
                        if let Some(last) = apply_events(&shared, response.events()) {
                            next = next.max(last + 1);
                        }
                        {
                            let mut cache = shared.cache.lock();
                            cache.watched = cache.watched.max(next - 1);
                            cache.prune();
                        }
                        shared.seen.send_if_modified(|seen| {
                            let newer = next - 1 > *seen;
                            *seen = (*seen).max(next - 1);
                            newer
                        });
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

/// Applies one watch response's events (whole revisions: etcd never splits one) under one
/// lock of the cache, metadata first (see the module's doc), then hands over the grants they
/// record. Returns the last revision seen.
pub(super) fn apply_events(shared: &Arc<Shared>, events: &[Event]) -> Option<i64> {
    let mut cache = shared.cache.lock();
    let mut grants = Vec::new();
    let mut last = None;
    let mut history = Vec::new();
    let with_kind = events.iter().filter_map(|event| {
        let kv = event.kv()?;
        let kind = shared.keys.classify(kv.key_str().ok()?);
        Some((kind, event.event_type(), kv))
    });
    let (metadata, others): (Vec<_>, Vec<_>) =
        with_kind.partition(|(kind, _, _)| matches!(kind, KeyKind::PoolItem(..)));
    for (kind, event, kv) in metadata.into_iter().chain(others) {
        let revision = kv.mod_revision();
        last = last.max(Some(revision));
        let put = event == EventType::Put;
        match kind {
            KeyKind::PoolItem(pool, item) => {
                cache.observe_metadata(&pool, item, put.then_some(kv), revision)
            }
            KeyKind::Lock(name) => {
                grants.extend(cache.observe_lock(name, put.then_some(kv), revision))
            }
            KeyKind::Pool(name) => {
                grants.extend(cache.observe_pool(name, put.then_some(kv), revision))
            }
            KeyKind::Meta if put => match codec::decode_meta(kv.value()) {
                Ok(next) => cache.set_meta(next, revision, revision),
                Err(e) => error!("{e}"),
            },
            KeyKind::Replica(id) if put => {
                cache.replicas.insert(id);
            }
            KeyKind::Replica(id) => {
                cache.replicas.remove(&id);
            }
            KeyKind::History | KeyKind::HistoryLost => history.push((kind, put, kv)),
            KeyKind::Meta | KeyKind::Other => {}
        }
    }
    drop(cache);
    if let Some(recorder) = &shared.recorder {
        // In revision order, and before any grant is handed over (see `load_all`).
        for (kind, put, kv) in history {
            let Ok(key) = kv.key_str() else { continue };
            match (kind, put) {
                (KeyKind::History, true) => {
                    recorder.take_in(key, kv.create_revision(), kv.value(), true)
                }
                (KeyKind::History, false) => recorder.removed(key),
                (KeyKind::HistoryLost, true) => recorder.lost(kv.value()),
                _ => {}
            }
        }
    }
    shared.deliver_all(grants);
    last
}
