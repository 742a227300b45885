//! This server's membership: a replica id, a liveness key on an etcd lease, and the task that
//! keeps the lease alive (registering again when it was lost).

use super::*;

/// Takes the next replica id from the counter.
pub(super) async fn take_replica_id(
    client: &mut Client,
    keys: &Keys,
) -> Result<u64, etcd_client::Error> {
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
pub(super) async fn register(
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

pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Renews this server's liveness lease; registers again if it was lost (etcd unreachable for
/// longer than the lease). Waiters queued meanwhile may have been dropped by other servers:
/// they time out and their clients repeat.
pub(super) async fn keep_alive(members: Arc<Members>, shared: Arc<Shared>, lease: Arc<AtomicU64>) {
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
