//! The JSON the API speaks, as types: the server's views serialize from them and its clients
//! read them, so the two cannot disagree. [`LockRequest`] is the body the clients send.
//!
//! A lock's status carries the oldest holding's fields at the top level (`key`, `locked_by`:
//! the original API's, which its clients read), then `waiters`, `slots` and every holding in
//! `holders` (they differ from the oldest only for semaphores). Times are RFC 3339 strings.
//! Reading is lenient: the original Go server sends only `key` and `locked_by`, and keeps
//! released locks with an empty key or zero counts.
//!
//! The holder info type is a parameter: clients read a `BTreeMap`, the server writes its own
//! map without copying it (it must serialize as a JSON object, `{}` when empty).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::duration::WireDuration;

/// Holder info as clients read it.
pub type Info = BTreeMap<String, String>;

/// One holding: who holds the lock under which key, since when and until when.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(bound(deserialize = "I: Deserialize<'de> + Default"))]
pub struct Holder<I = Info> {
    #[serde(default)]
    pub key: String,
    /// Requestor → how many times it holds the lock.
    #[serde(default)]
    pub locked_by: BTreeMap<String, u64>,
    /// Fencing token of the holding; absent on the original server.
    #[serde(default)]
    pub generation: Option<u64>,
    #[serde(default)]
    pub acquired_at: Option<String>,
    /// End of the lease; `null` without one.
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub info: I,
}

impl<I> Holder<I> {
    /// Whether this describes a holding: a key and a requestor with a count above 0 (the
    /// original keeps released locks with an empty key or zero counts).
    pub fn is_held(&self) -> bool {
        !self.key.is_empty() && self.locked_by.values().any(|&count| count > 0)
    }

    /// The requestors, e.g. `deploy-a (x2), deploy-b`; those with a count of 0 left out.
    pub fn requestors(&self) -> String {
        self.locked_by
            .iter()
            .filter(|(_, count)| **count > 0)
            .map(|(requestor, count)| match count {
                1 => requestor.clone(),
                n => format!("{requestor} (x{n})"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One lock as `GET /locks` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(bound(deserialize = "I: Deserialize<'de> + Default"))]
pub struct Lock<I = Info> {
    /// The oldest holding's fields, at the top level.
    #[serde(flatten)]
    pub oldest: Option<Holder<I>>,
    #[serde(default)]
    pub waiters: Option<u64>,
    #[serde(default)]
    pub slots: Option<u32>,
    #[serde(default)]
    pub holders: Vec<Holder<I>>,
}

impl<I> Lock<I> {
    /// Every holding: `holders` when the server gives it, else the top-level fields when they
    /// describe a holding (the original server).
    pub fn holdings(&self) -> Vec<&Holder<I>> {
        if self.holders.is_empty() {
            self.oldest.iter().filter(|h| h.is_held()).collect()
        } else {
            self.holders.iter().filter(|h| h.is_held()).collect()
        }
    }
}

/// One queued request in a lock's or a pool's `queue`: who waits, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(bound(deserialize = "I: Deserialize<'de> + Default"))]
pub struct Waiting<I = Info> {
    /// The item a pool claim asks for; absent for a lock, and for a claim of any item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub requestor: String,
    #[serde(default)]
    pub info: I,
    /// When it was queued (RFC 3339); absent when the server did not keep the time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

/// `GET /lock/{name}`: the lock with its name and who waits for it, in arrival order (empty
/// from servers that do not say); `free` is `true` when a `wait_free` saw it free, `false`
/// when the wait ran out, absent otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(bound(deserialize = "I: Deserialize<'de> + Default"))]
pub struct LockStatus<I = Info> {
    #[serde(default)]
    pub name: String,
    #[serde(flatten)]
    pub lock: Lock<I>,
    #[serde(default)]
    pub queue: Vec<Waiting<I>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free: Option<bool>,
}

/// `GET /locks`: name → lock.
pub type LockMap = BTreeMap<String, Lock>;

/// `GET /lock/{name}?wait_free=` when the lock is free: `{"free": true, "name": ...}`. (When
/// the wait runs out, the answer is the [`LockStatus`] with `free: false`; clients read both
/// as a [`LockStatus`].)
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LockFree {
    // Fields in name order: the bytes the server sent when it built this as a JSON map.
    pub free: bool,
    pub name: String,
}

impl LockFree {
    /// The answer that lock `name` is free.
    pub fn new(name: &str) -> LockFree {
        LockFree {
            free: true,
            name: name.to_string(),
        }
    }
}

/// The answer to a granted `PUT /lock/{name}`: the holding's fencing token and a sentence for
/// people. Reading is lenient: the original server sends no `generation`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LockGrant {
    // Fields in name order, as above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    #[serde(default)]
    pub response: String,
}

/// The answer to a `DELETE /lock/{name}` that released (or found nothing to release): a
/// sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LockReleased {
    #[serde(default)]
    pub response: String,
}

/// `GET /health` (`"OK"`) and `GET /ready` (`"ready"`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
}

/// The body of `PUT` and `DELETE /lock/{name}`: the clients send it, the server reads it (and
/// checks it against [`crate::limits`]). Fields left at their defaults are not sent, so the
/// original server sees only what it knows. Reading is lenient, as the original's was: unknown
/// fields are ignored, `null` counts as absent, and the requestor may be spelled `lock_by` or
/// `locked_by` (the original's code and docs spell it three ways). The field order is the
/// order of a body sent as a JSON array.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LockRequest {
    /// Required by the server; empty when the body has none (then not sent: a forced
    /// release needs none).
    #[serde(default, deserialize_with = "null_as_default")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub key: String,
    #[serde(default, alias = "lock_by", alias = "locked_by")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requestor: Option<String>,
    /// How long to wait for the lock; the clients ask with `?wait=` in the query instead, which
    /// wins over this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<WireDuration>,
    /// The lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<WireDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Info>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    #[serde(default, deserialize_with = "null_as_default")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub release_when_build_ends: bool,
    /// A renewal by the holder: refresh the lease without counting up.
    #[serde(default, deserialize_with = "null_as_default")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub renew: bool,
}

/// Reads `null` as the type's default, as an absent field.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

impl LockRequest {
    /// The body that gives back what this one acquires: its key and requestor.
    pub fn release(&self) -> LockRequest {
        LockRequest {
            key: self.key.clone(),
            requestor: self.requestor.clone(),
            ..LockRequest::default()
        }
    }
}

/// `GET /pools`: every pool with its counts, by name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PoolList {
    pub pools: Vec<PoolSummary>,
}

/// One pool in `GET /pools`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PoolSummary {
    pub name: String,
    pub items: u64,
    pub claimed: u64,
    /// Claims queued for an item.
    pub waiters: u64,
}

/// One item of a pool: its metadata (text, as pool-resource keeps it) and who claimed it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(bound(deserialize = "I: Deserialize<'de> + Default"))]
pub struct PoolItem<I = Info> {
    pub name: String,
    pub metadata: String,
    pub claimed: bool,
    /// The claim, shaped like a lock's holding; absent when unclaimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<Holder<I>>,
}

/// `GET /pool/{pool}`: the pool's items by name, how many claims wait, and who waits, in
/// arrival order (empty from servers that do not say).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(bound(deserialize = "I: Deserialize<'de> + Default"))]
pub struct PoolStatus<I = Info> {
    pub name: String,
    pub waiters: u64,
    pub items: Vec<PoolItem<I>>,
    #[serde(default)]
    pub queue: Vec<Waiting<I>>,
}

/// The answer to a granted claim (`PUT /pool/{pool}/claim`, `PUT /pool/{pool}/item/{item}/claim`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ItemClaim {
    pub pool: String,
    pub item: String,
    pub metadata: String,
    pub key: String,
    /// Fencing token of the claim.
    pub generation: u64,
    /// How many times this requestor holds the claim.
    pub count: u64,
}

/// The body of `POST /pool/{pool}/item/{item}` (add; with `claim`, add claimed) and of
/// `PUT /pool/{pool}/item/{item}` (update the metadata, adding the item if absent).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ItemBody {
    #[serde(default)]
    pub metadata: String,
    /// Add the item claimed by this holder (pool-resource's `add_claimed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<LockRequest>,
}

/// The body of `DELETE /pool/{pool}/item/{item}/claim` (release) and
/// `DELETE /pool/{pool}/item/{item}` (remove). Without a key, the item is released or removed
/// whoever holds it (what pool-resource does with a step that holds only `name` and
/// `metadata`); with one, only if it is held under that key (or, for a removal, unclaimed).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ItemRelease {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requestor: Option<String>,
}

/// The answer to a release or removal of an item: whether it was claimed (the holding it
/// had, if so).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ItemFreed {
    pub pool: String,
    pub item: String,
    pub released: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Holder>,
}

/// The answer to an addition or update: whether it changed anything.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ItemStored {
    pub pool: String,
    pub item: String,
    pub changed: bool,
}

/// One change in the history (`GET /history`, `GET /lock/{name}/history`, `GET /events`).
///
/// `kind` is one of `queued`, `acquired`, `released`, `force-released`, `expired`,
/// `reclaimed`, `timed-out`, `withdrawn`, `slots-changed`, `item-added`, `item-removed`,
/// `item-updated`. A lock's events name `lock`; a pool's name `pool` and `item`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Event {
    /// Increasing over the whole history: the `id:` of a server-sent event, and what
    /// `Last-Event-ID` and `?since=` take.
    pub id: u64,
    /// When it happened, RFC 3339.
    pub at: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requestor: Option<String>,
    /// The holding's fencing token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// How many times the requestor holds after an acquire or a release of one of several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The holding's or waiting request's info (the Concourse build).
    #[serde(default, skip_serializing_if = "Info::is_empty")]
    pub info: Info,
    /// How long the request waited in the queue, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
    /// How long the holding was held, in milliseconds, when it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_ms: Option<u64>,
    /// The new slot count of a `slots-changed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// Who forced a release: the user and the address the server saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

impl Event {
    /// The lock's name, or `pool/item` for a pool's item (`pool` for a pool-wide event).
    pub fn subject(&self) -> String {
        match (&self.lock, &self.pool, &self.item) {
            (Some(lock), _, _) => lock.clone(),
            (None, Some(pool), Some(item)) => format!("{pool}/{item}"),
            (None, Some(pool), None) => pool.clone(),
            (None, None, _) => String::new(),
        }
    }
}

/// A page of the history, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HistoryPage {
    pub events: Vec<Event>,
    /// Ask again with `since` = this for the events after this page (the last event's id, or
    /// the `since` asked for when the page is empty).
    pub next: u64,
    /// Whether more events follow this page now.
    pub more: bool,
    /// The oldest event id the server still keeps (0 when it keeps none).
    pub oldest: u64,
    /// The highest event id no longer kept (0: none lost): a reader that last saw an event
    /// before it missed the events up to it. Ids need not be consecutive (the etcd store's
    /// follow its revisions), so this, not `oldest`, says whether events were lost.
    #[serde(default)]
    pub lost: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_this_server_and_the_original() {
        let ours = json!({"name": "l", "key": "k", "locked_by": {"r": 1}, "generation": 3,
            "acquired_at": "2024-01-01T00:00:00Z", "expires_at": null, "info": {"job": "j"},
            "waiters": 2, "slots": 1, "holders": [{"key": "k", "locked_by": {"r": 1},
            "generation": 3, "acquired_at": "2024-01-01T00:00:00Z", "expires_at": null,
            "info": {"job": "j"}}]});
        let status: LockStatus = serde_json::from_value(ours.clone()).expect("parses");
        assert_eq!(status.name, "l");
        assert_eq!(status.lock.waiters, Some(2));
        assert_eq!(status.lock.holdings().len(), 1);
        assert_eq!(status.lock.holdings()[0].info["job"], "j");
        assert!(
            status.queue.is_empty(),
            "a server that does not list its queue"
        );
        let mut with_queue = ours.clone();
        with_queue["queue"] = json!([]);
        assert_eq!(serde_json::to_value(&status).expect("json"), with_queue);

        let queue = json!([
            {"key": "b", "requestor": "rb", "info": {"job": "jb"},
             "since": "2024-01-01T00:00:01.000Z"},
            {"key": "c", "requestor": "rc", "info": {}}]);
        with_queue["queue"] = queue.clone();
        let status: LockStatus = serde_json::from_value(with_queue.clone()).expect("parses");
        let keys: Vec<_> = status.queue.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, ["b", "c"]);
        assert_eq!(status.queue[0].info["job"], "jb");
        assert_eq!(
            status.queue[0].since.as_deref(),
            Some("2024-01-01T00:00:01.000Z")
        );
        assert_eq!(status.queue[1].since, None);
        assert_eq!(serde_json::to_value(&status).expect("json"), with_queue);

        let original: Lock =
            serde_json::from_value(json!({"key": "k", "locked_by": {"a": 0, "b": 2}}))
                .expect("parses");
        assert_eq!(original.holdings().len(), 1);
        assert_eq!(original.holdings()[0].requestors(), "b (x2)");
        for free in [
            json!({"key": "", "locked_by": {"k": 1}}),
            json!({"key": "k", "locked_by": {}}),
            json!({}),
        ] {
            let lock: Lock = serde_json::from_value(free.clone()).expect("parses");
            assert!(lock.holdings().is_empty(), "{free}");
        }
    }

    #[test]
    fn lock_requests_send_only_what_is_set() {
        let bare = LockRequest {
            key: "k".into(),
            ..LockRequest::default()
        };
        assert_eq!(
            serde_json::to_value(&bare).expect("json"),
            json!({"key": "k"})
        );
        let full = LockRequest {
            key: "k".into(),
            requestor: Some("r".into()),
            info: Some([("job".to_string(), "j".to_string())].into()),
            wait: None,
            ttl: Some(WireDuration(std::time::Duration::from_secs(90))),
            slots: Some(3),
            release_when_build_ends: true,
            renew: true,
        };
        assert_eq!(
            serde_json::to_value(&full).expect("json"),
            json!({"key": "k", "requestor": "r", "info": {"job": "j"}, "ttl": "90s",
                "slots": 3, "release_when_build_ends": true, "renew": true})
        );
        assert_eq!(
            serde_json::to_value(full.release()).expect("json"),
            json!({"key": "k", "requestor": "r"})
        );
    }

    #[test]
    fn answers_keep_the_bytes_of_the_maps_they_replace() {
        // The server built these with `json!` (a map in name order); the bytes stay the same.
        let grant = LockGrant {
            generation: Some(17),
            response: "acquired".into(),
        };
        assert_eq!(
            serde_json::to_string(&grant).expect("json"),
            r#"{"generation":17,"response":"acquired"}"#
        );
        assert_eq!(
            serde_json::to_string(&LockFree::new("staging")).expect("json"),
            r#"{"free":true,"name":"staging"}"#
        );
        let free: LockStatus = serde_json::from_str(r#"{"free":true,"name":"s"}"#).expect("reads");
        assert_eq!((free.free, free.name.as_str()), (Some(true), "s"));
        // The original's answers: no generation.
        let original: LockGrant = serde_json::from_str(r#"{"response":"ok"}"#).expect("reads");
        assert_eq!(original.generation, None);
        assert_eq!(
            serde_json::to_value(LockRequest::default()).expect("json"),
            json!({})
        );
    }

    #[test]
    fn what_is_sent_reads_back() {
        // Fields left at their defaults are not sent, so they must read back as defaults: an
        // item added claimed carries its claim inside the body the server reads with serde.
        let body = ItemBody {
            metadata: "m".into(),
            claim: Some(LockRequest {
                key: "k".into(),
                ..LockRequest::default()
            }),
        };
        let sent = serde_json::to_string(&body).expect("json");
        assert_eq!(sent, r#"{"metadata":"m","claim":{"key":"k"}}"#);
        assert_eq!(
            serde_json::from_str::<ItemBody>(&sent).expect("reads"),
            body
        );
    }
}
