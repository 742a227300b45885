//! How the lock state is laid out in etcd, under the configured prefix:
//!
//! - `{prefix}meta`: `{"next_generation": N}`, the fencing counter, updated in the same
//!   transaction as every grant so generations are strictly increasing across all servers.
//! - `{prefix}locks/{name}`: one JSON value per lock that is held (and so may have waiters):
//!   slots, holdings, the shared FIFO queue, and the grants the writing transaction made to
//!   queued waiters (so the waiters' servers learn of them through their watch).
//! - `{prefix}pools/{name}`: one JSON value per pool (a pool exists while it has items or
//!   waiting claims): every item's state (its holding, and when it was last freed), the pool's
//!   release clock, its shared FIFO claim queue, and grants as a lock's value has them (each
//!   naming the item granted). No metadata: see the next key.
//! - `{prefix}pool-items/{pool}/{item}`: one item's metadata, the text as given (not JSON).
//!   `{pool}` is escaped (`%` → `%25`, `/` → `%2F`) so a pool's items are exactly the keys
//!   under `pool-items/{pool}/`, whatever `/` the names hold.
//! - `{prefix}replicas/{id}`: one key per running server, attached to that server's etcd lease;
//!   it disappears when the server stops renewing it, and queue entries tagged with its id are
//!   then dropped by any other server.
//! - `{prefix}next-replica`: the counter replica ids are taken from.
//! - `{prefix}history/{replica}-{n}`: the events of one transaction (a JSON list, see
//!   [`encode_record`]), written by that transaction; an event's id is the key's create revision
//!   × [`EVENTS_PER_REVISION`] + its place in the list. See `history.rs`.
//! - `{prefix}history-lost`: the highest event id trimmed from the history so far.
//!
//! Why an item's metadata has a key of its own: etcd refuses a request over
//! `--max-request-bytes` (1.5 MiB by default), and metadata may be 64 KiB per item, so a pool
//! of twenty-odd such items would not fit in one value; and every claim and release rewrites
//! the pool's value, which would copy all of its metadata into etcd's history each time. A
//! transaction writes an item's metadata key only when the metadata changes (an addition or an
//! update; deleted with the item), always together with the pool's value, so the pool key's mod
//! revision covers its metadata too: a transaction whose comparison of the pool key holds was
//! planned on the metadata as it is (see `cache.rs` for how the cache keeps that true). The
//! writer keeps the metadata a transaction carries under a budget (`MAX_TXN_METADATA_BYTES`,
//! see `writer::Budget`), so a batch of additions never makes a request etcd refuses. What this
//! does not bound is a pool's own value, which grows with its items' holdings and its waiting
//! claims (`docs/scaling-out.md`, "How it works").

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::rules::{
    Acquire, BuildRef, Grant, Holder, Info, Item, Lock, Pool, WaiterGrant, WaiterId,
};

/// A value in etcd that does not decode, or a lock that cannot be encoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode lock: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("cannot encode pool: {0}")]
    EncodePool(#[source] serde_json::Error),
    #[error("lock {name:?} in etcd does not decode: {source}")]
    Lock {
        name: String,
        source: serde_json::Error,
    },
    #[error("pool {name:?} in etcd does not decode: {source}")]
    Pool {
        name: String,
        source: serde_json::Error,
    },
    #[error("metadata of item {item:?} of pool {pool:?} in etcd is not UTF-8: {source}")]
    Metadata {
        pool: String,
        item: String,
        source: std::str::Utf8Error,
    },
    #[error("the generation counter in etcd does not decode: {0}")]
    Meta(#[source] serde_json::Error),
    #[error("cannot encode history events: {0}")]
    EncodeHistory(#[source] serde_json::Error),
    #[error("history record {key:?} in etcd does not decode: {source}")]
    History {
        key: String,
        source: serde_json::Error,
    },
}

/// Event ids a transaction's record may number: an event's id is its record's create revision
/// times this, plus its place in the record.
pub const EVENTS_PER_REVISION: u64 = 1000;

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

    pub fn pools_prefix(&self) -> String {
        format!("{}pools/", self.prefix)
    }

    pub fn pool(&self, name: &str) -> String {
        format!("{}pools/{name}", self.prefix)
    }

    /// Where every pool's item metadata is kept.
    pub fn pool_items_prefix(&self) -> String {
        format!("{}pool-items/", self.prefix)
    }

    /// Where the metadata of `pool`'s items is kept: exactly the keys under this prefix.
    pub fn pool_items(&self, pool: &str) -> String {
        format!("{}pool-items/{}/", self.prefix, escape_segment(pool))
    }

    pub fn pool_item(&self, pool: &str, item: &str) -> String {
        format!("{}{item}", self.pool_items(pool))
    }

    pub fn replicas_prefix(&self) -> String {
        format!("{}replicas/", self.prefix)
    }

    pub fn replica(&self, id: u64) -> String {
        format!("{}replicas/{id}", self.prefix)
    }

    /// Where the history's records are kept.
    pub fn history_prefix(&self) -> String {
        format!("{}history/", self.prefix)
    }

    /// The record of the `n`th transaction with events that replica `replica` tried.
    pub fn history(&self, replica: u64, n: u64) -> String {
        format!("{}{n}", self.history_of(replica))
    }

    /// The start of every history record key of one replica.
    pub fn history_of(&self, replica: u64) -> String {
        format!("{}history/{replica}-", self.prefix)
    }

    /// The highest event id trimmed so far.
    pub fn history_lost(&self) -> String {
        format!("{}history-lost", self.prefix)
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
        } else if let Some(name) = rest.strip_prefix("pools/") {
            KeyKind::Pool(name)
        } else if let Some(rest) = rest.strip_prefix("pool-items/") {
            match rest.split_once('/').and_then(|(pool, item)| {
                unescape_segment(pool).map(|pool| KeyKind::PoolItem(pool, item))
            }) {
                Some(kind) => kind,
                None => KeyKind::Other,
            }
        } else if let Some(id) = rest.strip_prefix("replicas/") {
            id.parse().map(KeyKind::Replica).unwrap_or(KeyKind::Other)
        } else if rest.starts_with("history/") {
            KeyKind::History
        } else if rest == "history-lost" {
            KeyKind::HistoryLost
        } else {
            KeyKind::Other
        }
    }
}

pub enum KeyKind<'a> {
    Meta,
    Lock(&'a str),
    Pool(&'a str),
    /// An item's metadata: the pool (unescaped) and the item.
    PoolItem(String, &'a str),
    Replica(u64),
    /// A record of the history.
    History,
    HistoryLost,
    Other,
}

/// A pool name as one key segment: `%` and `/` escaped, so it never spans two segments.
fn escape_segment(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2F")
}

/// The name [`escape_segment`] escaped; `None` for text it cannot have made.
fn unescape_segment(segment: &str) -> Option<String> {
    let mut name = String::with_capacity(segment.len());
    let mut rest = segment;
    while let Some(at) = rest.find('%') {
        name.push_str(&rest[..at]);
        let escaped = rest.get(at..at + 3)?;
        name.push(match escaped {
            "%25" => '%',
            "%2F" => '/',
            _ => return None,
        });
        rest = &rest[at + 3..];
    }
    name.push_str(rest);
    Some(name)
}

#[derive(Serialize, Deserialize)]
pub struct Meta {
    pub next_generation: u64,
}

/// A queued waiting acquire (or pool claim) as stored in etcd.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredWaiter {
    id: WaiterId,
    /// The item a pool claim asks for; absent: any item (and always for a lock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    item: Option<String>,
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
    /// When it was queued, in milliseconds since the Unix epoch (the dashboard's "waiting
    /// since"); absent in values written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since_ms: Option<u64>,
}

/// A grant to a queued waiter, made by the transaction that wrote this value.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredGrant {
    waiter: WaiterId,
    /// The pool item granted; absent for a lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    item: Option<String>,
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
        item: g.item.clone(),
        key: g.key.clone(),
        requestor: g.requestor.clone(),
        generation: g.grant.generation,
        count: g.grant.count,
    }
}

fn waiter_grant(name: &str, g: StoredGrant) -> WaiterGrant {
    WaiterGrant {
        item: g.item,
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

fn stored_waiter(
    id: WaiterId,
    item: Option<&str>,
    request: &Acquire,
    since: Option<SystemTime>,
) -> StoredWaiter {
    StoredWaiter {
        id,
        item: item.map(str::to_string),
        key: request.key.clone(),
        requestor: request.requestor.clone(),
        ttl_ms: request
            .ttl
            .map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        info: request.info.clone(),
        slots: request.slots,
        release_with_build: request.release_with_build.clone(),
        renew: request.renew,
        since_ms: since.and_then(|since| {
            let ms = since
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()?
                .as_millis();
            u64::try_from(ms).ok()
        }),
    }
}

/// A stored waiter as the rules queue it: its id, the item asked for, the request, and when
/// it was queued (when kept).
type QueuedRequest = (WaiterId, Option<String>, Acquire, Option<SystemTime>);

fn queued_request(w: StoredWaiter) -> QueuedRequest {
    let request = Acquire {
        key: w.key,
        requestor: w.requestor,
        ttl: w.ttl_ms.map(Duration::from_millis),
        info: w.info,
        slots: w.slots,
        release_with_build: w.release_with_build,
        renew: w.renew,
    };
    let since = w
        .since_ms
        .and_then(|ms| SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms)));
    (w.id, w.item, request, since)
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
) -> Result<Vec<u8>, CodecError> {
    let stored = StoredLock {
        slots: lock.slots,
        holders: lock.holders.clone(),
        queue: lock
            .queued_since()
            .map(|(id, request, since)| stored_waiter(id, None, request, since))
            .collect(),
        grants: grants.iter().map(stored_grant).collect(),
        unconfirmed: unconfirmed.iter().map(stored_grant).collect(),
    };
    serde_json::to_vec(&stored).map_err(CodecError::Encode)
}

/// Decodes a stored lock.
pub fn decode_lock(name: &str, bytes: &[u8]) -> Result<Decoded, CodecError> {
    let stored: StoredLock = serde_json::from_slice(bytes).map_err(|source| CodecError::Lock {
        name: name.to_string(),
        source,
    })?;
    let queue = stored
        .queue
        .into_iter()
        .map(|w| {
            let (id, _, request, since) = queued_request(w);
            (id, request, since)
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

/// An item as stored in its pool's value: everything but its metadata.
#[derive(Serialize, Deserialize)]
struct StoredItem {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    holder: Option<Holder>,
    #[serde(default, skip_serializing_if = "is_zero")]
    freed: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

#[derive(Serialize, Deserialize)]
struct StoredPool {
    #[serde(default, skip_serializing_if = "is_zero")]
    clock: u64,
    items: BTreeMap<String, StoredItem>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    queue: Vec<StoredWaiter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    grants: Vec<StoredGrant>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    unconfirmed: Vec<StoredGrant>,
}

/// A stored pool, as [`Decoded`] is a stored lock. Its items' metadata is empty: it is kept
/// under keys of its own ([`Keys::pool_item`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedPool {
    pub pool: Pool,
    pub grants: Vec<WaiterGrant>,
    pub unconfirmed: Vec<WaiterGrant>,
}

/// Encodes a pool without its items' metadata: their state, the release clock, the claim
/// queue, the grants the writing transaction made and the grants not yet confirmed.
pub fn encode_pool(
    pool: &Pool,
    grants: &[WaiterGrant],
    unconfirmed: &[WaiterGrant],
) -> Result<Vec<u8>, CodecError> {
    let stored = StoredPool {
        clock: pool.clock,
        items: pool
            .items
            .iter()
            .map(|(name, item)| {
                let stored = StoredItem {
                    holder: item.holder.clone(),
                    freed: item.freed,
                };
                (name.clone(), stored)
            })
            .collect(),
        queue: pool
            .queued_since()
            .map(|(id, item, request, since)| stored_waiter(id, item, request, since))
            .collect(),
        grants: grants.iter().map(stored_grant).collect(),
        unconfirmed: unconfirmed.iter().map(stored_grant).collect(),
    };
    serde_json::to_vec(&stored).map_err(CodecError::EncodePool)
}

/// Decodes a stored pool; every item's metadata is empty until filled in from its own key.
pub fn decode_pool(name: &str, bytes: &[u8]) -> Result<DecodedPool, CodecError> {
    let stored: StoredPool = serde_json::from_slice(bytes).map_err(|source| CodecError::Pool {
        name: name.to_string(),
        source,
    })?;
    let no_metadata: Arc<str> = Arc::from("");
    let items = stored
        .items
        .into_iter()
        .map(|(item, s)| {
            let item_state = Item {
                metadata: no_metadata.clone(),
                holder: s.holder,
                freed: s.freed,
            };
            (item, item_state)
        })
        .collect();
    let queue = stored.queue.into_iter().map(queued_request).collect();
    let grants = |list: Vec<StoredGrant>| list.into_iter().map(|g| waiter_grant(name, g)).collect();
    Ok(DecodedPool {
        pool: Pool::restore(items, stored.clock, queue),
        grants: grants(stored.grants),
        unconfirmed: grants(stored.unconfirmed),
    })
}

/// An item's metadata as stored: the text itself.
pub fn encode_metadata(metadata: &str) -> Vec<u8> {
    metadata.as_bytes().to_vec()
}

pub fn decode_metadata(pool: &str, item: &str, bytes: &[u8]) -> Result<Arc<str>, CodecError> {
    std::str::from_utf8(bytes)
        .map(Arc::from)
        .map_err(|source| CodecError::Metadata {
            pool: pool.to_string(),
            item: item.to_string(),
            source,
        })
}

pub fn encode_meta(next_generation: u64) -> Vec<u8> {
    format!("{{\"next_generation\":{next_generation}}}").into_bytes()
}

pub fn decode_meta(bytes: &[u8]) -> Result<u64, CodecError> {
    serde_json::from_slice::<Meta>(bytes)
        .map(|m| m.next_generation)
        .map_err(CodecError::Meta)
}

/// One transaction's events as its history record: a JSON list of the events, each `id` its
/// place in the list (the id proper depends on the revision the transaction gets).
pub fn encode_record(events: &[locker_client::wire::Event]) -> Result<Vec<u8>, CodecError> {
    serde_json::to_vec(events).map_err(CodecError::EncodeHistory)
}

/// A history record's events, numbered from the key's create revision, each with its size as
/// a line of JSON (what the history's byte bound counts).
pub fn decode_record(
    key: &str,
    create_revision: i64,
    bytes: &[u8],
) -> Result<Vec<(Arc<locker_client::wire::Event>, u64)>, CodecError> {
    let events: Vec<locker_client::wire::Event> =
        serde_json::from_slice(bytes).map_err(|source| CodecError::History {
            key: key.to_string(),
            source,
        })?;
    let first = u64::try_from(create_revision).unwrap_or(0) * EVENTS_PER_REVISION;
    Ok(events
        .into_iter()
        .enumerate()
        .map(|(index, mut event)| {
            event.id = first + index as u64;
            let bytes = serde_json::to_vec(&event).map_or(0, |b| b.len() as u64 + 1);
            (Arc::new(event), bytes)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{LockTable, Op, PoolChange};

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
        let queued: Vec<_> = decoded
            .lock
            .queued_since()
            .map(|(id, r, since)| (id, r.key.clone(), since))
            .collect();
        assert_eq!(queued, [(7 << WAITER_BITS | 3, "b".to_string(), Some(now))]);
        assert!(decoded.grants.is_empty() && decoded.unconfirmed.is_empty());
        assert_eq!(waiter_replica(7 << WAITER_BITS | 3), 7);
    }

    #[test]
    fn a_waiter_stored_without_its_time_reads_back_without_one() {
        let old = br#"{"slots":1,"holders":[],"queue":[{"id":5,"key":"w","requestor":"w"}]}"#;
        let decoded = decode_lock("l", old).expect("decodes");
        let queued: Vec<_> = decoded
            .lock
            .queued_since()
            .map(|(id, _, s)| (id, s))
            .collect();
        assert_eq!(queued, [(5, None)]);
    }

    #[test]
    fn a_pool_with_its_queue_and_grants_round_trips_without_its_metadata() {
        let mut table = LockTable::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let add = |item: &str, metadata: &str| Op::Pool {
            name: "p".into(),
            change: PoolChange::Add {
                item: item.into(),
                metadata: Arc::from(metadata),
                claim: None,
            },
        };
        let claim = |item: Option<&str>, key: &str, waiter: Option<WaiterId>| Op::Pool {
            name: "p".into(),
            change: PoolChange::Claim {
                item: item.map(str::to_string),
                request: request(key),
                waiter,
            },
        };
        table.apply(&add("e1", "url: one"), now);
        table.apply(&add("e2", "url: two"), now);
        table.apply(&claim(None, "a", None), now);
        table.apply(&claim(Some("e2"), "b", None), now);
        table.apply(&claim(Some("e1"), "c", Some(7 << WAITER_BITS | 1)), now);
        table.apply(&claim(None, "d", Some(7 << WAITER_BITS | 2)), now);
        let released = table.apply(
            &Op::Pool {
                name: "p".into(),
                change: PoolChange::Release {
                    item: "e1".into(),
                    key: None,
                    requestor: None,
                    by: None,
                },
            },
            now,
        );
        let grants = released.grants().to_vec();
        assert_eq!(grants.len(), 1, "{released:?}");
        assert_eq!(grants[0].item.as_deref(), Some("e1"));
        let pool = table.pool("p").expect("pool");
        assert_eq!(pool.waiters(), 1);
        let bytes = encode_pool(pool, &grants, &grants).expect("encodes");
        assert!(
            !String::from_utf8_lossy(&bytes).contains("url:"),
            "metadata is kept under keys of its own"
        );
        let decoded = decode_pool("p", &bytes).expect("decodes");
        assert_eq!(decoded.grants, grants);
        assert_eq!(decoded.unconfirmed, grants);
        let mut restored = decoded.pool;
        for (name, item) in &mut restored.items {
            assert_eq!(&*item.metadata, "");
            item.metadata = pool.items[name].metadata.clone();
        }
        assert_eq!(&restored, pool);
        let queued: Vec<_> = restored
            .queued_since()
            .map(|(id, item, r, since)| (id, item, r.key.clone(), since))
            .collect();
        assert_eq!(
            queued,
            [(7 << WAITER_BITS | 2, None, "d".to_string(), Some(now))]
        );
    }

    #[test]
    fn metadata_is_stored_as_its_text() {
        let text = "url: https://example.com/\nuser: \"x\" ünïcode";
        let bytes = encode_metadata(text);
        assert_eq!(bytes, text.as_bytes());
        assert_eq!(&*decode_metadata("p", "i", &bytes).expect("decodes"), text);
        assert!(decode_metadata("p", "i", b"\xff").is_err());
    }

    #[test]
    fn pool_item_keys_are_unambiguous_whatever_the_names_hold() {
        let keys = Keys::new("/locker/");
        // Pool "a" with item "b/c", and pool "a/b" with item "c".
        let first = keys.pool_item("a", "b/c");
        let second = keys.pool_item("a/b", "c");
        assert_ne!(first, second);
        assert!(first.starts_with(&keys.pool_items("a")));
        assert!(!second.starts_with(&keys.pool_items("a")));
        for (pool, item) in [("a", "b/c"), ("a/b", "c"), ("100%", "x%2Fy"), ("%2F", "")] {
            match keys.classify(&keys.pool_item(pool, item)) {
                KeyKind::PoolItem(p, i) => assert_eq!((p.as_str(), i), (pool, item)),
                _ => panic!("{pool:?}/{item:?} does not classify as an item"),
            }
        }
        assert!(matches!(
            keys.classify("/locker/pools/a/b"),
            KeyKind::Pool("a/b")
        ));
        assert!(matches!(
            keys.classify("/locker/pool-items/a%2/b"),
            KeyKind::Other
        ));
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
