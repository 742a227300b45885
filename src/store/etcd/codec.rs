//! How the lock state is laid out in etcd, under the configured prefix:
//!
//! - `{prefix}meta`: `{"next_generation": N}`, the fencing counter, updated in the same
//!   transaction as every grant so generations are strictly increasing across all servers.
//! - `{prefix}locks/{name}`: one JSON value per lock that is held (and so may have waiters):
//!   slots, holdings, the shared FIFO queue, and the grants the writing transaction made to
//!   queued waiters (so the waiters' servers learn of them through their watch).
//! - `{prefix}replicas/{id}`: one key per running server, attached to that server's etcd lease;
//!   it disappears when the server stops renewing it, and queue entries tagged with its id are
//!   then dropped by any other server.
//! - `{prefix}next-replica`: the counter replica ids are taken from.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::rules::{Acquire, BuildRef, Grant, Holder, Info, Lock, WaiterGrant, WaiterId};

/// Bits of a waiter id that number the waiters of one server; the bits above name the server.
pub const WAITER_BITS: u32 = 40;

/// The server (replica id) that queued `waiter`.
pub fn waiter_replica(waiter: WaiterId) -> u64 {
    waiter >> WAITER_BITS
}

/// Key names under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn meta(&self) -> String {
        format!("{}meta", self.prefix)
    }

    pub fn next_replica(&self) -> String {
        format!("{}next-replica", self.prefix)
    }

    pub fn locks_prefix(&self) -> String {
        format!("{}locks/", self.prefix)
    }

    pub fn lock(&self, name: &str) -> String {
        format!("{}locks/{name}", self.prefix)
    }

    pub fn replicas_prefix(&self) -> String {
        format!("{}replicas/", self.prefix)
    }

    pub fn replica(&self, id: u64) -> String {
        format!("{}replicas/{id}", self.prefix)
    }

    /// What an etcd key under the prefix stands for.
    pub fn classify<'a>(&self, key: &'a str) -> KeyKind<'a> {
        let Some(rest) = key.strip_prefix(self.prefix.as_str()) else {
            return KeyKind::Other;
        };
        if rest == "meta" {
            KeyKind::Meta
        } else if let Some(name) = rest.strip_prefix("locks/") {
            KeyKind::Lock(name)
        } else if let Some(id) = rest.strip_prefix("replicas/") {
            id.parse().map(KeyKind::Replica).unwrap_or(KeyKind::Other)
        } else {
            KeyKind::Other
        }
    }
}

pub enum KeyKind<'a> {
    Meta,
    Lock(&'a str),
    Replica(u64),
    Other,
}

#[derive(Serialize, Deserialize)]
pub struct Meta {
    pub next_generation: u64,
}

/// A queued waiting acquire as stored in etcd.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredWaiter {
    id: WaiterId,
    key: String,
    requestor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Info::is_empty")]
    info: Info,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    slots: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    release_with_build: Option<Box<BuildRef>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    renew: bool,
}

/// A grant to a queued waiter, made by the transaction that wrote this value.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredGrant {
    waiter: WaiterId,
    key: String,
    requestor: String,
    generation: u64,
    count: u64,
}

#[derive(Serialize, Deserialize)]
struct StoredLock {
    slots: u32,
    holders: Vec<Holder>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    queue: Vec<StoredWaiter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    grants: Vec<StoredGrant>,
    /// Grants whose waiter's server has not yet confirmed handing them over; revoked when that
    /// server is gone, so a grant to a waiter that died with its server does not hold the lock.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    unconfirmed: Vec<StoredGrant>,
}

fn stored_grant(g: &WaiterGrant) -> StoredGrant {
    StoredGrant {
        waiter: g.waiter,
        key: g.key.clone(),
        requestor: g.requestor.clone(),
        generation: g.grant.generation,
        count: g.grant.count,
    }
}

fn waiter_grant(name: &str, g: StoredGrant) -> WaiterGrant {
    WaiterGrant {
        item: None,
        waiter: g.waiter,
        name: name.to_string(),
        key: g.key,
        requestor: g.requestor,
        grant: Grant {
            generation: g.generation,
            count: g.count,
        },
    }
}

/// A stored lock: the rules' view, the grants of the transaction that wrote it, and the grants
/// not yet confirmed by their waiters' servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub lock: Lock,
    pub grants: Vec<WaiterGrant>,
    pub unconfirmed: Vec<WaiterGrant>,
}

/// Encodes a lock with its queue, the grants the writing transaction made on it, and the
/// grants not yet confirmed.
pub fn encode_lock(
    lock: &Lock,
    grants: &[WaiterGrant],
    unconfirmed: &[WaiterGrant],
) -> Result<Vec<u8>, String> {
    let stored = StoredLock {
        slots: lock.slots,
        holders: lock.holders.clone(),
        queue: lock
            .queued()
            .map(|(id, request)| StoredWaiter {
                id,
                key: request.key.clone(),
                requestor: request.requestor.clone(),
                ttl_ms: request
                    .ttl
                    .map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
                info: request.info.clone(),
                slots: request.slots,
                release_with_build: request.release_with_build.clone(),
                renew: request.renew,
            })
            .collect(),
        grants: grants.iter().map(stored_grant).collect(),
        unconfirmed: unconfirmed.iter().map(stored_grant).collect(),
    };
    serde_json::to_vec(&stored).map_err(|e| format!("cannot encode lock: {e}"))
}

/// Decodes a stored lock.
pub fn decode_lock(name: &str, bytes: &[u8]) -> Result<Decoded, String> {
    let stored: StoredLock = serde_json::from_slice(bytes)
        .map_err(|e| format!("lock {name:?} in etcd does not decode: {e}"))?;
    let queue = stored
        .queue
        .into_iter()
        .map(|w| {
            (
                w.id,
                Acquire {
                    key: w.key,
                    requestor: w.requestor,
                    ttl: w.ttl_ms.map(Duration::from_millis),
                    info: w.info,
                    slots: w.slots,
                    release_with_build: w.release_with_build,
                    renew: w.renew,
                },
            )
        })
        .collect();
    Ok(Decoded {
        lock: Lock::restore(stored.slots, stored.holders, queue),
        grants: stored
            .grants
            .into_iter()
            .map(|g| waiter_grant(name, g))
            .collect(),
        unconfirmed: stored
            .unconfirmed
            .into_iter()
            .map(|g| waiter_grant(name, g))
            .collect(),
    })
}

pub fn encode_meta(next_generation: u64) -> Vec<u8> {
    format!("{{\"next_generation\":{next_generation}}}").into_bytes()
}

pub fn decode_meta(bytes: &[u8]) -> Result<u64, String> {
    serde_json::from_slice::<Meta>(bytes)
        .map(|m| m.next_generation)
        .map_err(|e| format!("the generation counter in etcd does not decode: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::LockTable;
    use std::time::SystemTime;

    fn request(key: &str) -> Acquire {
        Acquire {
            key: key.into(),
            requestor: key.into(),
            ttl: Some(Duration::from_millis(1500)),
            info: Info::from_iter([("job".to_string(), "deploy".to_string())]),
            slots: None,
            release_with_build: None,
            renew: false,
        }
    }

    #[test]
    fn a_lock_with_its_queue_round_trips() {
        let mut table = LockTable::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        table.acquire("l", request("a"), now, None);
        table.acquire("l", request("b"), now, Some(7 << WAITER_BITS | 3));
        let lock = table.lock("l").expect("held");
        let bytes = encode_lock(lock, &[], &[]).expect("encodes");
        let decoded = decode_lock("l", &bytes).expect("decodes");
        assert_eq!(&decoded.lock, lock);
        assert_eq!(decoded.lock.queued().count(), 1);
        assert!(decoded.grants.is_empty() && decoded.unconfirmed.is_empty());
        assert_eq!(waiter_replica(7 << WAITER_BITS | 3), 7);
    }

    #[test]
    fn keys_classify() {
        let keys = Keys::new("/locker/");
        assert!(matches!(keys.classify("/locker/meta"), KeyKind::Meta));
        assert!(matches!(
            keys.classify("/locker/locks/a/b"),
            KeyKind::Lock("a/b")
        ));
        assert!(matches!(
            keys.classify("/locker/replicas/12"),
            KeyKind::Replica(12)
        ));
        assert!(matches!(keys.classify("/other/meta"), KeyKind::Other));
    }
}
