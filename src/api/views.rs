//! The JSON shapes of locks in responses. `key` and `locked_by` are the original API's and stay
//! (they describe the oldest holding); the other fields were added later. `holders` lists every
//! holding, which differs from the oldest one only for semaphores (`slots` > 1).
//!
//! Typed rather than built with `json!`: `info` is always a JSON object (`{}` when empty), which
//! `LiteMap`'s own serde impl does not promise (an empty one serializes as `[]`).

use std::collections::BTreeMap;

use serde::{Serialize, Serializer};

use crate::rules::{Holder, Info};
use crate::store::LockView;
use crate::timefmt::rfc3339;

/// One holding: who holds the lock under which key, since when and until when.
#[derive(Serialize)]
pub struct HolderView<'a> {
    key: &'a str,
    locked_by: BTreeMap<String, u64>,
    generation: u64,
    acquired_at: String,
    expires_at: Option<String>,
    #[serde(serialize_with = "info_object")]
    info: &'a Info,
}

impl<'a> HolderView<'a> {
    fn of(holder: &'a Holder) -> Self {
        HolderView {
            key: &holder.key,
            locked_by: holder.counts(),
            generation: holder.generation,
            acquired_at: rfc3339(holder.acquired_at),
            expires_at: holder.expires_at().map(rfc3339),
            info: &holder.info,
        }
    }
}

/// One lock as `GET /locks` shows it: the oldest holding's fields at the top level (what the
/// original's clients read), then every holding.
#[derive(Serialize)]
pub struct LockFields<'a> {
    #[serde(flatten)]
    oldest: Option<HolderView<'a>>,
    waiters: usize,
    slots: u32,
    holders: Vec<HolderView<'a>>,
}

impl<'a> LockFields<'a> {
    fn of(lock: &'a LockView) -> Self {
        LockFields {
            oldest: lock.holders.first().map(HolderView::of),
            waiters: lock.waiters,
            slots: lock.slots,
            holders: lock.holders.iter().map(HolderView::of).collect(),
        }
    }
}

/// `GET /lock/{name}`: the lock's fields with its name; `free: false` when a `wait_free` ran out.
#[derive(Serialize)]
pub struct LockStatus<'a> {
    name: &'a str,
    #[serde(flatten)]
    fields: LockFields<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    free: Option<bool>,
}

/// Always a JSON object, however many entries.
fn info_object<S: Serializer>(info: &&Info, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_map(info.iter())
}

/// `GET /locks`: name → lock, for every held lock.
pub fn lock_map(locks: &[LockView]) -> BTreeMap<&str, LockFields<'_>> {
    locks
        .iter()
        .map(|lock| (lock.name.as_str(), LockFields::of(lock)))
        .collect()
}

/// `GET /lock/{name}`: the lock's fields with its name.
pub fn lock_status(lock: &LockView) -> LockStatus<'_> {
    LockStatus {
        name: &lock.name,
        fields: LockFields::of(lock),
        free: None,
    }
}

/// `GET /lock/{name}?wait_free=` when the time ran out: the status, flagged as still held.
pub fn still_held(lock: &LockView) -> LockStatus<'_> {
    LockStatus {
        free: Some(false),
        ..lock_status(lock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Acquire, LockTable, Op};
    use std::time::SystemTime;

    fn view_of(info: Info) -> LockView {
        let mut table = LockTable::default();
        let request = Acquire {
            key: "k".into(),
            requestor: "r".into(),
            ttl: None,
            info,
            slots: None,
            release_with_build: None,
            renew: false,
        };
        let op = Op::Acquire {
            name: "l".into(),
            request,
            waiter: None,
        };
        table.apply(&op, SystemTime::now());
        let lock = table.lock("l").expect("held");
        crate::store::view("l", lock)
    }

    #[test]
    fn empty_info_is_an_empty_object_in_every_view() {
        let lock = view_of(Info::new());
        let status = serde_json::to_value(lock_status(&lock)).expect("json");
        assert_eq!(status["info"], serde_json::json!({}));
        assert_eq!(status["holders"][0]["info"], serde_json::json!({}));
        let map = serde_json::to_value(lock_map(std::slice::from_ref(&lock))).expect("json");
        assert_eq!(map["l"]["info"], serde_json::json!({}));
        let held = serde_json::to_value(still_held(&lock)).expect("json");
        assert_eq!(held["info"], serde_json::json!({}));
        assert_eq!(held["free"], false);
        assert!(status.get("free").is_none());
    }

    #[test]
    fn info_entries_are_object_members() {
        let mut info = Info::new();
        info.insert("team".into(), "main".into());
        let lock = view_of(info);
        let status = serde_json::to_value(lock_status(&lock)).expect("json");
        assert_eq!(status["info"], serde_json::json!({"team": "main"}));
        assert_eq!(status["name"], "l");
        assert_eq!(status["key"], "k");
        assert_eq!(status["locked_by"], serde_json::json!({"r": 1}));
    }
}
