//! The writer: the one task of this server that writes lock state to etcd. It takes every
//! operation queued while its previous transaction was in flight, plans the batch on the cached
//! locks with the pure rules, and commits it in one transaction that compares the revision of
//! every lock it read; on a conflict it plans again on the values etcd returned.

use super::*;

/// The one task of this server that writes lock state to etcd.
pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) members: Arc<Members>,
    /// Internal operations whose transaction failed; applied again with a later batch.
    pub(super) retry: Vec<Op>,
    /// Commands taken from the channel that did not fit in the last batch.
    pub(super) backlog: VecDeque<Command>,
    pub(super) last_failure: Option<Instant>,
    pub(super) last_purge: Instant,
}

/// One client operation of a batch.
pub(super) struct Pending {
    pub(super) op: Op,
    pub(super) reply: Reply,
}

/// One confirmation of a batch.
pub(super) struct PendingConfirm {
    pub(super) grant: WaiterGrant,
    pub(super) reply: oneshot::Sender<Result<bool, StoreError>>,
}

impl Writer {
    pub(super) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
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

    pub(super) fn backoff(&self) -> Duration {
        crate::store::backoff_left(self.last_failure)
    }

    pub(super) fn idle_time(&self) -> Duration {
        let next_expiry = self.shared.cache.lock().next_expiry();
        crate::store::writer_idle_time(
            PURGE_EVERY.saturating_sub(self.last_purge.elapsed()),
            next_expiry,
            !self.retry.is_empty(),
            self.backoff(),
        )
    }

    /// Queue entries of servers that are gone, checked against a linearizable read of the
    /// live servers (the cache alone may not have seen a new server register yet).
    pub(super) async fn dead_waiters(&mut self) -> Vec<Op> {
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

    pub(super) async fn run_batch(&mut self, incoming: Vec<Command>) {
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
                    self.fail(clients, confirms, internal, e.to_string());
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

    /// Applies `ops` to the cached locks in `names` and turns the result into a transaction:
    /// read what the batch touches, apply it with the rules, settle the unconfirmed grants,
    /// then write every lock that changed (and the generation counter if it moved), on the
    /// condition that nothing read has changed in etcd meanwhile.
    pub(super) fn plan(
        &self,
        names: &BTreeSet<String>,
        ops: &[Op],
        confirms: &[WaiterGrant],
        now: SystemTime,
    ) -> Result<Plan, codec::CodecError> {
        let mut read = self.read_cached(names);
        let effects: Vec<Effect> = ops.iter().map(|op| read.table.apply(op, now)).collect();
        let grants = grants_by_lock(&effects);
        let (unconfirmed, confirmed) =
            settle_confirmations(&read.unconfirmed, &grants, ops, confirms);
        let (mut writes, after) = self.lock_writes(&read, &grants, unconfirmed)?;
        let mut compares = read.compares;
        let mut reads = read.reads;
        let next_generation = read.table.next_generation();
        let moved = next_generation != read.start_generation;
        let meta_key = self.shared.keys.meta();
        reads.push(TxnOp::get(meta_key.clone(), None));
        if moved {
            compares.push(Compare::mod_revision(
                meta_key.clone(),
                CompareOp::Equal,
                read.meta_revision,
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
            next_generation: moved.then_some(next_generation),
            effects,
            confirmed,
        })
    }

    /// The cached state of the locks in `names`, as a table the rules can apply a batch to, with
    /// the transaction's conditions (each lock's revision as read) and reads.
    fn read_cached(&self, names: &BTreeSet<String>) -> CachedRead {
        let cache = self.shared.cache.lock();
        let mut before: BTreeMap<String, Option<Lock>> = BTreeMap::new();
        let mut unconfirmed: BTreeMap<String, Vec<WaiterGrant>> = BTreeMap::new();
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
            unconfirmed.insert(
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
        let table = LockTable::from_parts(parts, cache.next_generation.max(1)).with_limits(limits);
        CachedRead {
            start_generation: table.next_generation(),
            meta_revision: cache.meta_revision,
            before,
            unconfirmed,
            compares,
            reads,
            table,
        }
    }

    /// A put or delete of every lock whose value changed: its holdings and queue, the grants
    /// this batch made on it, or its unconfirmed grants. Also what each lock will be after.
    fn lock_writes(
        &self,
        read: &CachedRead,
        grants: &BTreeMap<&str, Vec<WaiterGrant>>,
        mut unconfirmed_after: BTreeMap<String, Vec<WaiterGrant>>,
    ) -> Result<(Vec<TxnOp>, LocksAfter), codec::CodecError> {
        let mut writes = Vec::new();
        let mut after = BTreeMap::new();
        for (name, old) in &read.before {
            let new = read.table.lock(name).cloned();
            let granted = grants.get(name.as_str()).map(Vec::as_slice).unwrap_or(&[]);
            let mut unconfirmed = unconfirmed_after.remove(name).unwrap_or_default();
            if new.is_none() {
                unconfirmed.clear();
            }
            if &new == old && granted.is_empty() && read.unconfirmed.get(name) == Some(&unconfirmed)
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
        Ok((writes, after))
    }

    pub(super) fn commit(
        &mut self,
        plan: Plan,
        revision: i64,
        started: Instant,
        operations: usize,
    ) {
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
    pub(super) fn refresh(
        &mut self,
        names: &BTreeSet<String>,
        responses: Vec<TxnOpResponse>,
        revision: i64,
    ) {
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

    pub(super) fn fail(
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
pub(super) struct Plan {
    pub(super) compares: Vec<Compare>,
    pub(super) writes: Vec<TxnOp>,
    pub(super) reads: Vec<TxnOp>,
    pub(super) after: LocksAfter,
    pub(super) next_generation: Option<u64>,
    pub(super) effects: Vec<Effect>,
    /// For each confirmation, whether its grant still stood.
    pub(super) confirmed: Vec<bool>,
}

/// Each written lock as it will be: its value (`None`: deleted) and its unconfirmed grants.
pub(super) type LocksAfter = BTreeMap<String, (Option<Lock>, Vec<WaiterGrant>)>;

/// What [`Writer::plan`] read from the cache for one batch.
struct CachedRead {
    /// The touched locks as cached (`None`: free).
    before: BTreeMap<String, Option<Lock>>,
    /// Their unconfirmed grants as cached.
    unconfirmed: BTreeMap<String, Vec<WaiterGrant>>,
    /// The transaction's conditions: each lock's mod revision as read.
    compares: Vec<Compare>,
    /// Reads returning the current values when a condition fails.
    reads: Vec<TxnOp>,
    /// The touched locks, for the rules to apply the batch to.
    table: LockTable,
    start_generation: u64,
    meta_revision: i64,
}

/// The waiters a batch let in, by lock.
fn grants_by_lock(effects: &[Effect]) -> BTreeMap<&str, Vec<WaiterGrant>> {
    let mut grants: BTreeMap<&str, Vec<WaiterGrant>> = BTreeMap::new();
    for grant in effects.iter().flat_map(|e| e.grants()) {
        grants
            .entry(grant.name.as_str())
            .or_default()
            .push(grant.clone());
    }
    grants
}

/// The unconfirmed grants of each lock after a batch (new grants join; confirmed and revoked
/// ones leave), and for each confirmation whether its grant still stood.
fn settle_confirmations(
    before: &BTreeMap<String, Vec<WaiterGrant>>,
    grants: &BTreeMap<&str, Vec<WaiterGrant>>,
    ops: &[Op],
    confirms: &[WaiterGrant],
) -> (BTreeMap<String, Vec<WaiterGrant>>, Vec<bool>) {
    let revoked: BTreeSet<WaiterId> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Revoke(grant) => Some(grant.waiter),
            _ => None,
        })
        .collect();
    let mut after = before.clone();
    for (name, granted) in grants {
        if let Some(list) = after.get_mut(*name) {
            list.extend(granted.iter().cloned());
        }
    }
    let confirmed: Vec<bool> = confirms
        .iter()
        .map(|c| {
            !revoked.contains(&c.waiter)
                && after
                    .get(&c.name)
                    .is_some_and(|list| list.iter().any(|g| g.waiter == c.waiter))
        })
        .collect();
    let confirmed_ids: BTreeSet<WaiterId> = confirms.iter().map(|c| c.waiter).collect();
    for list in after.values_mut() {
        list.retain(|g| !revoked.contains(&g.waiter) && !confirmed_ids.contains(&g.waiter));
    }
    (after, confirmed)
}

pub(super) fn log_effects(effects: &[Effect]) {
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
