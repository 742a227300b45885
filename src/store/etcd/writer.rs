//! The writer: the one task of this server that writes lock state to etcd. It takes every
//! operation queued while its previous transaction was in flight, plans the batch on the cached
//! locks with the pure rules, and commits it in one transaction that compares the revision of
//! every lock it read; on a conflict it plans again on the values etcd returned.

use super::*;
use etcd_client::TxnResponse;

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
    /// History records this writer has tried to write: the next one's key.
    pub(super) records: u64,
}

/// One client operation of a batch.
pub(super) struct Pending {
    pub(super) op: Op,
    pub(super) reply: Reply,
    pub(super) since: Instant,
}

/// Most bytes of events one history record holds (etcd refuses requests over
/// `--max-request-bytes`, 1.5 MiB by default, and the batch's locks, pools and metadata need
/// room too).
const MAX_RECORD_BYTES: usize = 512 * 1024;

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
        let suspects: Vec<(Target, WaiterId, Option<WaiterGrant>)> = {
            let cache = self.shared.cache.lock();
            let in_locks = cache.held().flat_map(|(name, lock)| {
                lock.queued()
                    .map(|(id, _)| (Target::Lock(name.clone()), id, None))
                    .collect::<Vec<_>>()
            });
            let in_pools = cache.present_pools().flat_map(|(name, pool)| {
                pool.queued()
                    .map(|(id, _, _)| (Target::Pool(name.clone()), id, None))
                    .collect::<Vec<_>>()
            });
            let unconfirmed = cache
                .locks
                .values()
                .flat_map(|e| &e.unconfirmed)
                .chain(cache.pools.values().flat_map(|e| &e.unconfirmed))
                .map(|g| (g.target(), g.waiter, Some(g.clone())));
            in_locks
                .chain(in_pools)
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
            .take(MAX_TXN_OPS)
            .map(|(target, waiter, grant)| {
                info!(
                    "dropping waiter {waiter} on {}: its server (replica {}) is gone",
                    describe(&target),
                    waiter_replica(waiter)
                );
                match grant {
                    Some(grant) => Op::Revoke(grant),
                    None => Op::cancel(&target, waiter, crate::rules::events::Leaving::Withdrawn),
                }
            })
            .collect()
    }

    /// Takes what of `incoming` fits in one transaction and commits it: plans it on the cached
    /// state, adds the history record, sends the transaction, and on success takes the result
    /// into the cache and answers; on a conflict takes in the values etcd returned and tries
    /// again, until [`BATCH_DEADLINE`].
    pub(super) async fn run_batch(&mut self, incoming: Vec<Command>) {
        let started = Instant::now();
        let mut batch = self.gather(incoming).await;
        if batch.is_empty() && !batch.expire_due {
            return;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            batch = match self.attempt(batch, started).await {
                Attempt::Done => return,
                Attempt::Split(batch) => batch,
                Attempt::Conflict(batch) if started.elapsed() > BATCH_DEADLINE => {
                    let reason = format!("still conflicting after {attempt} attempts");
                    return self.fail(batch, reason);
                }
                Attempt::Conflict(batch) => batch,
                Attempt::Failed(batch, reason) => return self.fail(batch, reason),
            };
        }
    }

    /// The batch to commit next: clean-up to retry (unless backing off with nothing new),
    /// waiters of servers that are gone (when due), then `incoming` in order, as much as one
    /// transaction takes; the rest waits in the backlog.
    async fn gather(&mut self, incoming: Vec<Command>) -> Batch {
        let expire_due = self
            .shared
            .cache
            .lock()
            .next_expiry()
            .is_some_and(|at| at <= SystemTime::now());
        let mut batch = Batch::new(expire_due);
        let mut cleanup = Vec::new();
        if self.backoff().is_zero() || !incoming.is_empty() {
            cleanup.append(&mut self.retry);
        }
        if self.last_purge.elapsed() >= PURGE_EVERY {
            cleanup.extend(self.dead_waiters().await);
        }
        for op in cleanup {
            if batch.budget.admit(op.target(), Some(&op), batch.limit) {
                batch.internal.push(op);
            } else {
                self.backlog.push_back(Command::Internal(op));
            }
        }
        self.take_commands(&mut batch, incoming);
        batch
    }

    /// Adds `incoming` to the batch in order until one does not fit; that one and the rest
    /// go to the backlog, in their order. A client operation queued longer than
    /// [`BATCH_DEADLINE`] is refused unapplied.
    fn take_commands(&mut self, batch: &mut Batch, incoming: Vec<Command>) {
        let mut commands = incoming.into_iter();
        while let Some(command) = commands.next() {
            if !batch.admit(&command) {
                self.backlog.push_back(command);
                self.backlog.extend(commands);
                return;
            }
            match command {
                Command::Client { reply, since, .. } if since.elapsed() > BATCH_DEADLINE => {
                    let _ = reply.send(Err(unavailable(
                        "no transaction could be committed in time",
                    )));
                }
                Command::Client { op, reply, since } => {
                    batch.clients.push(Pending { op, reply, since });
                }
                Command::Internal(op) => batch.internal.push(op),
                Command::Confirm { grant, reply } => {
                    batch.confirms.push(PendingConfirm { grant, reply });
                }
                Command::Shutdown => {}
            }
        }
    }

    /// One try at committing the batch on the cached state as it is now.
    async fn attempt(&mut self, mut batch: Batch, started: Instant) -> Attempt {
        let now = SystemTime::now();
        let (ops, targets) = self.operations(&batch, now);
        let mut plan = match self.plan(&targets, &ops, &batch.confirmed(), now) {
            Ok(plan) => plan,
            Err(e) => return Attempt::Failed(batch, e.to_string()),
        };
        if plan.writes.is_empty() && batch.clients.is_empty() && batch.confirms.is_empty() {
            // Internal clean-up that changed nothing (e.g. a cancel of a waiter already
            // granted or gone): nothing to commit.
            return Attempt::Done;
        }
        let divisible = ops.len() > 1 && batch.clients.len() + batch.internal.len() > 0;
        let recorded = match self.record(&plan, now, divisible) {
            Ok(Record::TooBig) => {
                // More events than one record holds: half the batch waits for the next.
                self.defer_half(&mut batch);
                return Attempt::Split(batch);
            }
            Ok(Record::None) => false,
            Ok(Record::Put(op)) => {
                plan.writes.push(op);
                true
            }
            Err(e) => return Attempt::Failed(batch, e.to_string()),
        };
        let trim = self.trim(&mut plan);
        let response = match self.send(&plan).await {
            Ok(response) => response,
            Err(e) => return Attempt::Failed(batch, e.to_string()),
        };
        let revision = response.header().map(|h| h.revision()).unwrap_or(0);
        if !response.succeeded() {
            // Another server changed what we read: take its values and apply the batch again.
            self.refresh(&targets, response.op_responses(), revision);
            return Attempt::Conflict(batch);
        }
        let answers = Answers::of(batch, &plan);
        self.commit(plan, revision, started, ops.len());
        if let (Some(recorder), Some(trim)) = (&self.shared.recorder, &trim) {
            recorder.trimmed(&trim.revisions);
        }
        self.answer(answers, recorded.then_some(revision));
        Attempt::Done
    }

    /// The batch's operations as of `now`, with the locks and pools they touch: internal ones
    /// first, then the expiry of leases that ran out (as many of their locks and pools as fit),
    /// and client operations last.
    fn operations(&self, batch: &Batch, now: SystemTime) -> (Vec<Op>, BTreeSet<Target>) {
        let mut ops = batch.internal.clone();
        let mut budget = batch.budget.clone();
        if batch.expire_due && self.admit_expired(&mut budget, now) {
            ops.push(Op::Expire);
        }
        ops.extend(batch.clients.iter().map(|p| p.op.clone()));
        (ops, budget.targets)
    }

    /// Admits the locks and pools whose leases ran out by `now`, while they fit; whether any
    /// did.
    fn admit_expired(&self, budget: &mut Budget, now: SystemTime) -> bool {
        let cache = self.shared.cache.lock();
        let mut expiring = false;
        for target in cache.expired(now).take(MAX_TXN_OPS) {
            if !budget.admit(Some(target.clone()), None, MAX_TXN_OPS) {
                break;
            }
            expiring = true;
        }
        expiring
    }

    /// With the history kept and something to write, the deletes of old records the
    /// transaction carries too (see `history.rs`).
    fn trim(&self, plan: &mut Plan) -> Option<history::Trim> {
        let recorder = self.shared.recorder.as_ref()?;
        if plan.writes.is_empty() {
            return None;
        }
        let trim = recorder.trim(&self.shared.keys);
        plan.writes.extend(trim.ops.iter().cloned());
        Some(trim)
    }

    /// Sends the plan as one transaction. Tried on another member only when it could not
    /// connect (it was never sent): a transaction that may have been applied is never sent
    /// twice.
    async fn send(&self, plan: &Plan) -> Result<TxnResponse, etcd_client::Error> {
        let txn = Txn::new()
            .when(plan.compares.clone())
            .and_then(plan.writes.clone())
            .or_else(plan.reads.clone());
        self.members
            .call(REQUEST_TIMEOUT, |client| {
                let (mut kv, txn) = (kv(&client), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await
    }

    /// Answers a committed batch; one that wrote a history record (at `recorded`) once this
    /// server's watch has taken the record in, so that a client reading the history here
    /// after its answer finds its change.
    fn answer(&self, answers: Answers, recorded: Option<i64>) {
        let Some(revision) = recorded else {
            return answers.send();
        };
        let mut seen = self.shared.seen.subscribe();
        tokio::spawn(async move {
            let taken_in = seen.wait_for(|seen| *seen >= revision);
            if tokio::time::timeout(REQUEST_TIMEOUT, taken_in)
                .await
                .is_err()
            {
                warn!(
                    "the watch has not brought revision {revision} in time; \
                     answering (the history here shows it once it does)"
                );
            }
            answers.send();
        });
    }

    /// Applies `ops` to the cached locks and pools in `targets` and turns the result into a
    /// transaction: read what the batch touches, apply it with the rules, settle the
    /// unconfirmed grants, then write every lock and pool that changed (with the metadata of
    /// items added, changed or removed, and the generation counter if it moved), on the
    /// condition that nothing read has changed in etcd meanwhile.
    pub(super) fn plan(
        &self,
        targets: &BTreeSet<Target>,
        ops: &[Op],
        confirms: &[WaiterGrant],
        now: SystemTime,
    ) -> Result<Plan, codec::CodecError> {
        let mut read = self.read_cached(targets);
        let mut events = Vec::new();
        let effects: Vec<Effect> = match &self.shared.recorder {
            Some(_) => ops
                .iter()
                .map(|op| read.table.apply_recorded(op, now, &mut events))
                .collect(),
            None => ops.iter().map(|op| read.table.apply(op, now)).collect(),
        };
        let grants = grants_by_target(&effects);
        let (unconfirmed, confirmed) =
            settle_confirmations(&read.unconfirmed, &grants, ops, confirms);
        let (mut writes, after) = self.target_writes(&read, &grants, unconfirmed)?;
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
            events,
        })
    }

    /// The put of the batch's history record (see `history.rs`), if the history is kept and
    /// the batch changed anything.
    fn record(
        &mut self,
        plan: &Plan,
        now: SystemTime,
        divisible: bool,
    ) -> Result<Record, codec::CodecError> {
        if self.shared.recorder.is_none() || plan.events.is_empty() {
            return Ok(Record::None);
        }
        let events = history::wire_events(&plan.events, now);
        let made = events.len();
        let (bytes, kept) = match fit_record(events, divisible)? {
            Fitted::TooBig => return Ok(Record::TooBig),
            Fitted::Record { bytes, kept } => (bytes, kept),
        };
        if kept < made {
            error!(
                "one operation made {made} history events, more than a record holds: the first \
                 {kept} are kept"
            );
            self.shared.metrics.history_write_failed();
        }
        self.records += 1;
        let key = self.shared.keys.history(self.shared.replica, self.records);
        Ok(Record::Put(TxnOp::put(key, bytes, None)))
    }

    /// The cached state of the locks and pools in `targets`, as a table the rules can apply a
    /// batch to, with the transaction's conditions (each key's revision as read) and reads.
    fn read_cached(&self, targets: &BTreeSet<Target>) -> CachedRead {
        let keys = &self.shared.keys;
        let cache = self.shared.cache.lock();
        let mut locks: BTreeMap<String, Option<Lock>> = BTreeMap::new();
        let mut pools: BTreeMap<String, Option<Pool>> = BTreeMap::new();
        let mut unconfirmed: BTreeMap<Target, Vec<WaiterGrant>> = BTreeMap::new();
        let mut compares = Vec::new();
        let mut reads = Vec::new();
        for target in targets {
            let (key, revision, granted) = match target {
                Target::Lock(name) => {
                    let entry = cache.locks.get(name);
                    locks.insert(name.clone(), entry.and_then(|e| e.value.clone()));
                    let revision = entry.map(|e| e.mod_revision).unwrap_or(0);
                    (keys.lock(name), revision, entry.map(|e| &e.unconfirmed))
                }
                Target::Pool(name) => {
                    let entry = cache.pools.get(name);
                    pools.insert(name.clone(), entry.and_then(|e| e.value.clone()));
                    let revision = entry.map(|e| e.mod_revision).unwrap_or(0);
                    (keys.pool(name), revision, entry.map(|e| &e.unconfirmed))
                }
            };
            compares.push(Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            ));
            reads.push(TxnOp::get(key, None));
            if let Target::Pool(name) = target {
                // Metadata written since the value read: a transaction that writes an item's
                // metadata writes its pool's value too, so nothing older can have changed.
                let since = GetOptions::new()
                    .with_prefix()
                    .with_min_mod_revision(revision + 1);
                reads.push(TxnOp::get(keys.pool_items(name), Some(since)));
            }
            unconfirmed.insert(target.clone(), granted.cloned().unwrap_or_default());
        }
        let lock_parts = locks
            .iter()
            .filter_map(|(n, l)| l.clone().map(|l| (n.clone(), l)))
            .collect();
        let pool_parts = pools
            .iter()
            .filter_map(|(n, p)| p.clone().map(|p| (n.clone(), p)))
            .collect();
        // The table holds only the locks this batch touches: the lock limit leaves room for
        // the ones it does not.
        let elsewhere = cache
            .present
            .saturating_sub(locks.values().filter(|l| l.is_some()).count());
        let limits = crate::rules::Limits {
            locks: cache.limits.locks.saturating_sub(elsewhere),
            ..cache.limits
        };
        let table = LockTable::from_parts(lock_parts, cache.next_generation.max(1))
            .with_pools(pool_parts)
            .with_limits(limits);
        CachedRead {
            start_generation: table.next_generation(),
            meta_revision: cache.meta_revision,
            locks,
            pools,
            unconfirmed,
            compares,
            reads,
            table,
        }
    }

    /// A put or delete of every lock and pool whose value changed: holdings, queue, the grants
    /// this batch made on it, or its unconfirmed grants; and of the metadata keys of every item
    /// added, changed or removed. Also what each will be after.
    fn target_writes(
        &self,
        read: &CachedRead,
        grants: &BTreeMap<Target, Vec<WaiterGrant>>,
        mut unconfirmed_after: BTreeMap<Target, Vec<WaiterGrant>>,
    ) -> Result<(Vec<TxnOp>, After), codec::CodecError> {
        let keys = &self.shared.keys;
        let mut writes = Vec::new();
        let mut after = After::default();
        let mut settle = |target: &Target, present: bool| {
            let granted = grants.get(target).map(Vec::as_slice).unwrap_or(&[]);
            let mut unconfirmed = unconfirmed_after.remove(target).unwrap_or_default();
            if !present {
                unconfirmed.clear();
            }
            let unchanged =
                granted.is_empty() && read.unconfirmed.get(target) == Some(&unconfirmed);
            (granted, unconfirmed, unchanged)
        };
        for (name, old) in &read.locks {
            let new = read.table.lock(name).cloned();
            let target = Target::Lock(name.clone());
            let (granted, unconfirmed, unchanged) = settle(&target, new.is_some());
            if &new == old && unchanged {
                continue;
            }
            let key = keys.lock(name);
            match &new {
                Some(lock) => writes.push(TxnOp::put(
                    key,
                    codec::encode_lock(lock, granted, &unconfirmed)?,
                    None,
                )),
                None => writes.push(TxnOp::delete(key, None)),
            }
            after.locks.insert(name.clone(), (new, unconfirmed));
        }
        for (name, old) in &read.pools {
            let new = read.table.pool(name).cloned();
            let target = Target::Pool(name.clone());
            let (granted, unconfirmed, unchanged) = settle(&target, new.is_some());
            if &new == old && unchanged {
                continue;
            }
            let key = keys.pool(name);
            let mut metadata = Vec::new();
            match &new {
                Some(pool) => {
                    writes.push(TxnOp::put(
                        key,
                        codec::encode_pool(pool, granted, &unconfirmed)?,
                        None,
                    ));
                    let before = old.as_ref().map(|p| &p.items);
                    for (item, state) in &pool.items {
                        let was = before.and_then(|items| items.get(item));
                        if was.is_none_or(|was| was.metadata != state.metadata) {
                            writes.push(TxnOp::put(
                                keys.pool_item(name, item),
                                codec::encode_metadata(&state.metadata),
                                None,
                            ));
                            metadata.push((item.clone(), Some(state.metadata.clone())));
                        }
                    }
                    for item in before.into_iter().flat_map(|items| items.keys()) {
                        if !pool.items.contains_key(item) {
                            writes.push(TxnOp::delete(keys.pool_item(name, item), None));
                            metadata.push((item.clone(), None));
                        }
                    }
                }
                None => {
                    writes.push(TxnOp::delete(key, None));
                    writes.push(TxnOp::delete(
                        keys.pool_items(name),
                        Some(DeleteOptions::new().with_prefix()),
                    ));
                }
            }
            after.pools.insert(
                name.clone(),
                PoolAfter {
                    pool: new,
                    unconfirmed,
                    metadata,
                },
            );
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
        for (name, (lock, unconfirmed)) in plan.after.locks {
            let mod_revision = if lock.is_some() { revision } else { 0 };
            cache.set_lock(
                &name,
                Entry {
                    value: lock,
                    unconfirmed,
                    mod_revision,
                    as_of: revision,
                },
            );
        }
        for (name, after) in plan.after.pools {
            // Metadata first: see `cache.rs`.
            for (item, text) in after.metadata {
                cache.set_metadata(&name, &item, text, revision);
            }
            let mod_revision = if after.pool.is_some() { revision } else { 0 };
            cache.set_pool(
                &name,
                Entry {
                    value: after.pool,
                    unconfirmed: after.unconfirmed,
                    mod_revision,
                    as_of: revision,
                },
            );
        }
        if let Some(next) = plan.next_generation {
            cache.set_meta(next, revision, revision);
        }
        drop(cache);
        super::super::flow::log_effects(&plan.effects);
    }

    /// Puts the later half of the batch's client operations (or, with none, of its internal
    /// ones) back at the head of the backlog, in their order, for the next batch.
    fn defer_half(&mut self, batch: &mut Batch) {
        if !batch.clients.is_empty() {
            let deferred = batch.clients.split_off(batch.clients.len() / 2);
            for pending in deferred.into_iter().rev() {
                self.backlog.push_front(Command::Client {
                    op: pending.op,
                    reply: pending.reply,
                    since: pending.since,
                });
            }
        } else {
            let deferred = batch.internal.split_off(batch.internal.len() / 2);
            for op in deferred.into_iter().rev() {
                self.backlog.push_front(Command::Internal(op));
            }
        }
    }

    /// Takes the current values a failed transaction returned into the cache, in the order
    /// [`Writer::read_cached`] asked for them.
    pub(super) fn refresh(
        &mut self,
        targets: &BTreeSet<Target>,
        responses: Vec<TxnOpResponse>,
        revision: i64,
    ) {
        let mut gets = responses.into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        });
        let mut cache = self.shared.cache.lock();
        // Grants in these values reach their waiters through the watch, not from here.
        for target in targets {
            match target {
                Target::Lock(name) => {
                    let Some(get) = gets.next() else { return };
                    cache.observe_lock(name, get.kvs().first(), revision);
                }
                Target::Pool(name) => {
                    let (Some(value), Some(items)) = (gets.next(), gets.next()) else {
                        return;
                    };
                    let prefix = self.shared.keys.pool_items(name);
                    for kv in items.kvs() {
                        let key = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix));
                        if let Some(item) = key {
                            cache.observe_metadata(name, item, Some(kv), revision);
                        }
                    }
                    cache.observe_pool(name, value.kvs().first(), revision);
                }
            }
        }
        if let Some(get) = gets.next() {
            match get.kvs().first() {
                Some(kv) => match codec::decode_meta(kv.value()) {
                    Ok(next) => cache.set_meta(next, kv.mod_revision(), revision),
                    Err(e) => error!("{e}"),
                },
                None => cache.set_meta(1, 0, revision),
            }
        }
    }

    /// Answers every request of the batch 503 with `reason`; its clean-up is kept to be
    /// applied again with a later batch.
    fn fail(&mut self, batch: Batch, reason: String) {
        error!(
            "etcd transaction failed: {reason}; {} request(s) answered 503",
            batch.clients.len()
        );
        self.shared.metrics.write_failed();
        self.last_failure = Some(Instant::now());
        for pending in batch.clients {
            let _ = pending.reply.send(Err(unavailable(&reason)));
        }
        for confirm in batch.confirms {
            let _ = confirm.reply.send(Err(unavailable(&reason)));
        }
        // Clean-up must not be lost: it is applied again with a later batch.
        self.retry
            .extend(batch.internal.into_iter().filter(Op::is_cleanup));
    }
}

/// What one batch answers and applies, within what one transaction takes.
struct Batch {
    clients: Vec<Pending>,
    confirms: Vec<PendingConfirm>,
    /// Operations of this server's own: clean-up, and commands from other tasks.
    internal: Vec<Op>,
    /// The locks and pools the batch touches.
    budget: Budget,
    /// A lease has run out: the batch expires it.
    expire_due: bool,
    /// Most operations in each branch of the transaction; with a lease run out, room is kept
    /// for expiring it.
    limit: usize,
}

impl Batch {
    fn new(expire_due: bool) -> Self {
        let limit = if expire_due {
            MAX_TXN_OPS - EXPIRY_ROOM
        } else {
            MAX_TXN_OPS
        };
        Batch {
            clients: Vec::new(),
            confirms: Vec::new(),
            internal: Vec::new(),
            budget: Budget::default(),
            expire_due,
            limit,
        }
    }

    /// Adds what `command` touches to the budget, if it fits.
    fn admit(&mut self, command: &Command) -> bool {
        match command {
            Command::Client { op, .. } | Command::Internal(op) => {
                self.budget.admit(op.target(), Some(op), self.limit)
            }
            Command::Confirm { grant, .. } => {
                self.budget.admit(Some(grant.target()), None, self.limit)
            }
            Command::Shutdown => true,
        }
    }

    fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.internal.is_empty() && self.confirms.is_empty()
    }

    /// The grants the batch confirms.
    fn confirmed(&self) -> Vec<WaiterGrant> {
        self.confirms.iter().map(|c| c.grant.clone()).collect()
    }
}

/// How one try at committing a batch ended.
enum Attempt {
    /// Committed (its answers sent or on their way), or nothing to commit.
    Done,
    /// More history events than one record holds: half the batch went back to the backlog;
    /// the rest is to be tried again.
    Split(Batch),
    /// Another server changed what the batch read: the cache holds the values etcd returned;
    /// to be tried again.
    Conflict(Batch),
    /// Not committed, for the reason given.
    Failed(Batch, String),
}

/// The answers to a committed batch: to each confirmation whether its grant still stood, to
/// each client operation its effect.
struct Answers {
    confirms: Vec<(PendingConfirm, bool)>,
    clients: Vec<(Pending, Effect)>,
}

impl Answers {
    fn of(batch: Batch, plan: &Plan) -> Self {
        // Client operations come last in the batch.
        let first = plan.effects.len() - batch.clients.len();
        let effects = plan.effects[first..].iter().cloned();
        let stood = plan.confirmed.iter().copied();
        Answers {
            confirms: batch.confirms.into_iter().zip(stood).collect(),
            clients: batch.clients.into_iter().zip(effects).collect(),
        }
    }

    fn send(self) {
        for (confirm, stood) in self.confirms {
            let _ = confirm.reply.send(Ok(stood));
        }
        for (pending, effect) in self.clients {
            let _ = pending.reply.send(Ok(effect));
        }
    }
}

/// A batch's events as a history record.
#[derive(Debug, PartialEq, Eq)]
enum Fitted {
    /// More than a record holds, from a batch that can be split.
    TooBig,
    /// The record, and how many of the events it keeps.
    Record { bytes: Vec<u8>, kept: usize },
}

/// Fits a batch's events into one record: at most [`codec::EVENTS_PER_REVISION`] events and
/// [`MAX_RECORD_BYTES`]. A batch over that is to be split (`divisible`); one that cannot be
/// (a single operation made that many events: a force release of a holding shared by more
/// requestors, say) keeps its first events, in a record of up to twice the usual bytes (still
/// well within what etcd takes in one request).
fn fit_record(
    mut events: Vec<locker_client::wire::Event>,
    divisible: bool,
) -> Result<Fitted, codec::CodecError> {
    let limit = codec::EVENTS_PER_REVISION as usize;
    let mut bytes = codec::encode_record(&events)?;
    if events.len() <= limit && bytes.len() <= MAX_RECORD_BYTES {
        let kept = events.len();
        return Ok(Fitted::Record { bytes, kept });
    }
    if divisible {
        return Ok(Fitted::TooBig);
    }
    if events.len() > limit {
        events.truncate(limit);
        bytes = codec::encode_record(&events)?;
    }
    while events.len() > 1 && bytes.len() > 2 * MAX_RECORD_BYTES {
        events.truncate(events.len() * 3 / 4);
        bytes = codec::encode_record(&events)?;
    }
    Ok(Fitted::Record {
        kept: events.len(),
        bytes,
    })
}

/// What one batch holds, kept within what etcd takes in one transaction: at most
/// [`MAX_TXN_OPS`] operations in each branch, and [`MAX_TXN_METADATA_BYTES`] of item metadata.
/// A lock costs one operation in each branch (a comparison, a put or delete, a read back on a
/// conflict); a pool two (its value, and its metadata: read back since the value's revision;
/// deleted by prefix when the pool goes); an addition, update or removal of an item one more
/// (the put or delete of its metadata key).
#[derive(Clone, Default)]
pub(super) struct Budget {
    pub(super) targets: BTreeSet<Target>,
    ops: usize,
    metadata: usize,
}

impl Budget {
    /// Adds what `target` and `op` need, if it fits within `limit` operations; an empty budget
    /// takes anything, so that no operation is ever too big to be tried.
    pub(super) fn admit(&mut self, target: Option<Target>, op: Option<&Op>, limit: usize) -> bool {
        let new = target.filter(|t| !self.targets.contains(t));
        let (item_ops, bytes) = op.map(item_writes).unwrap_or((0, 0));
        let ops = new.as_ref().map_or(0, cost) + item_ops;
        let empty = self.ops == 0 && self.metadata == 0;
        if !empty && (self.ops + ops > limit || self.metadata + bytes > MAX_TXN_METADATA_BYTES) {
            return false;
        }
        self.ops += ops;
        self.metadata += bytes;
        self.targets.extend(new);
        true
    }
}

/// The operations a lock or pool costs in each branch of a transaction.
fn cost(target: &Target) -> usize {
    match target {
        Target::Lock(_) => 1,
        Target::Pool(_) => 2,
    }
}

/// The metadata keys an operation may write (puts and deletes) and the bytes it may put.
fn item_writes(op: &Op) -> (usize, usize) {
    let Op::Pool { name, change } = op else {
        return (0, 0);
    };
    match change {
        PoolChange::Add { item, metadata, .. } | PoolChange::Update { item, metadata } => {
            (1, name.len() + item.len() + metadata.len())
        }
        PoolChange::Remove { .. } => (1, 0),
        PoolChange::Claim { .. } | PoolChange::Release { .. } | PoolChange::Cancel { .. } => (0, 0),
    }
}

/// A batch applied to the cached state: the transaction, and what it will have done.
pub(super) struct Plan {
    pub(super) compares: Vec<Compare>,
    pub(super) writes: Vec<TxnOp>,
    pub(super) reads: Vec<TxnOp>,
    pub(super) after: After,
    pub(super) next_generation: Option<u64>,
    pub(super) effects: Vec<Effect>,
    /// For each confirmation, whether its grant still stood.
    pub(super) confirmed: Vec<bool>,
    /// What the batch changed, for the history (when kept).
    pub(super) events: Vec<crate::rules::events::Event>,
}

/// A batch's history record.
enum Record {
    /// No history kept, or nothing changed.
    None,
    /// More events than one record holds: the batch is to be split.
    TooBig,
    Put(TxnOp),
}

/// Each written lock and pool as it will be.
#[derive(Default)]
pub(super) struct After {
    /// A lock's value (`None`: deleted) and its unconfirmed grants.
    pub(super) locks: BTreeMap<String, (Option<Lock>, Vec<WaiterGrant>)>,
    pub(super) pools: BTreeMap<String, PoolAfter>,
}

/// A written pool as it will be.
pub(super) struct PoolAfter {
    /// `None`: deleted, with its items' metadata.
    pub(super) pool: Option<Pool>,
    pub(super) unconfirmed: Vec<WaiterGrant>,
    /// The metadata keys written: each item's text, or `None` when deleted.
    pub(super) metadata: Vec<(String, Option<Arc<str>>)>,
}

/// What [`Writer::plan`] read from the cache for one batch.
struct CachedRead {
    /// The touched locks as cached (`None`: free).
    locks: BTreeMap<String, Option<Lock>>,
    /// The touched pools as cached (`None`: no such pool).
    pools: BTreeMap<String, Option<Pool>>,
    /// Their unconfirmed grants as cached.
    unconfirmed: BTreeMap<Target, Vec<WaiterGrant>>,
    /// The transaction's conditions: each key's mod revision as read.
    compares: Vec<Compare>,
    /// Reads returning the current values when a condition fails.
    reads: Vec<TxnOp>,
    /// The touched locks and pools, for the rules to apply the batch to.
    table: LockTable,
    start_generation: u64,
    meta_revision: i64,
}

/// The waiters a batch let in, by lock or pool.
fn grants_by_target(effects: &[Effect]) -> BTreeMap<Target, Vec<WaiterGrant>> {
    let mut grants: BTreeMap<Target, Vec<WaiterGrant>> = BTreeMap::new();
    for grant in effects.iter().flat_map(|e| e.grants()) {
        grants
            .entry(grant.target())
            .or_default()
            .push(grant.clone());
    }
    grants
}

/// The unconfirmed grants of each lock and pool after a batch (new grants join; confirmed and
/// revoked ones leave), and for each confirmation whether its grant still stood.
fn settle_confirmations(
    before: &BTreeMap<Target, Vec<WaiterGrant>>,
    grants: &BTreeMap<Target, Vec<WaiterGrant>>,
    ops: &[Op],
    confirms: &[WaiterGrant],
) -> (BTreeMap<Target, Vec<WaiterGrant>>, Vec<bool>) {
    let revoked: BTreeSet<WaiterId> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Revoke(grant) => Some(grant.waiter),
            _ => None,
        })
        .collect();
    let mut after = before.clone();
    for (target, granted) in grants {
        if let Some(list) = after.get_mut(target) {
            list.extend(granted.iter().cloned());
        }
    }
    let confirmed: Vec<bool> = confirms
        .iter()
        .map(|c| {
            !revoked.contains(&c.waiter)
                && after
                    .get(&c.target())
                    .is_some_and(|list| list.iter().any(|g| g.waiter == c.waiter))
        })
        .collect();
    let confirmed_ids: BTreeSet<WaiterId> = confirms.iter().map(|c| c.waiter).collect();
    for list in after.values_mut() {
        list.retain(|g| !revoked.contains(&g.waiter) && !confirmed_ids.contains(&g.waiter));
    }
    (after, confirmed)
}

/// A lock or pool, for log lines.
fn describe(target: &Target) -> String {
    match target {
        Target::Lock(name) => format!("lock {name:?}"),
        Target::Pool(name) => format!("pool {name:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use locker_client::wire::Event as WireEvent;

    fn events(count: usize, info_bytes: usize) -> Vec<WireEvent> {
        (0..count)
            .map(|index| WireEvent {
                id: index as u64,
                at: "2026-11-30T00:00:00.000Z".into(),
                kind: "force-released".into(),
                lock: Some("shared".into()),
                requestor: Some(format!("r{index}")),
                info: [("build".to_string(), "x".repeat(info_bytes))]
                    .into_iter()
                    .collect(),
                ..WireEvent::default()
            })
            .collect()
    }

    fn kept(fitted: Fitted) -> usize {
        match fitted {
            Fitted::Record { kept, bytes } => {
                let stored: Vec<WireEvent> = serde_json::from_slice(&bytes).expect("decodes");
                assert_eq!(stored.len(), kept);
                kept
            }
            Fitted::TooBig => panic!("too big"),
        }
    }

    #[test]
    fn a_record_holds_up_to_a_thousand_events_and_a_bigger_batch_is_split() {
        assert_eq!(kept(fit_record(events(1000, 0), true).expect("fits")), 1000);
        assert_eq!(
            fit_record(events(1001, 0), true).expect("encodes"),
            Fitted::TooBig
        );
        // 600 events of 1 KiB: over the bytes.
        assert_eq!(
            fit_record(events(600, 1024), true).expect("encodes"),
            Fitted::TooBig
        );
    }

    #[test]
    fn one_operation_with_more_events_than_a_record_holds_keeps_the_first() {
        assert_eq!(
            kept(fit_record(events(1500, 0), false).expect("fits")),
            1000
        );
        // 600 events of 1 KiB fit in twice the usual bytes; 1000 of 2 KiB do not.
        assert_eq!(
            kept(fit_record(events(600, 1024), false).expect("fits")),
            600
        );
        let big = kept(fit_record(events(1000, 2048), false).expect("fits"));
        assert!((1..1000).contains(&big), "{big}");
    }
}
