//! The JSON shapes of locks in responses, built from the store's views as the types of
//! [`locker_client::wire`], which the CLI and the resource read: the server and its clients
//! cannot disagree. `key` and `locked_by` are the original API's and stay (they describe the
//! oldest holding); the other fields were added later. `holders` lists every holding, which
//! differs from the oldest one only for semaphores (`slots` > 1).
//!
//! `info` is always a JSON object (`{}` when empty), which `LiteMap`'s own serde impl does not
//! promise (an empty one serializes as `[]`): hence [`InfoObject`].

use std::collections::BTreeMap;

use locker_client::wire::{Holder, Lock, LockStatus, Waiting};
use serde::{Serialize, Serializer};

use crate::rules::{Acquire, Info};
use crate::store::LockView;
use crate::timefmt::rfc3339;

/// Holder info as the server writes it: its own map, always as a JSON object.
#[derive(Clone, Copy)]
pub struct InfoObject<'a>(&'a Info);

impl Serialize for InfoObject<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter())
    }
}

/// A holding as the API shows it (a lock's, or a pool item's claim).
pub fn holder(holder: &crate::rules::Holder) -> Holder<InfoObject<'_>> {
    Holder {
        key: holder.key.clone(),
        locked_by: holder.counts(),
        generation: Some(holder.generation),
        acquired_at: Some(rfc3339(holder.acquired_at)),
        expires_at: holder.expires_at().map(rfc3339),
        info: InfoObject(&holder.info),
    }
}

/// A holding with its info copied out, for answers that outlive the store's copy.
pub fn client_holder(holder: &crate::rules::Holder) -> Holder {
    let view = self::holder(holder);
    Holder {
        key: view.key,
        locked_by: view.locked_by,
        generation: view.generation,
        acquired_at: view.acquired_at,
        expires_at: view.expires_at,
        info: holder
            .info
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// One lock as `GET /locks` shows it: the oldest holding's fields at the top level (what the
/// original's clients read), then every holding.
fn lock(lock: &LockView) -> Lock<InfoObject<'_>> {
    Lock {
        oldest: lock.holders.first().map(holder),
        waiters: Some(lock.waiters as u64),
        slots: Some(lock.slots),
        holders: lock.holders.iter().map(holder).collect(),
    }
}

/// `GET /locks`: name → lock, for every held lock.
pub fn lock_map(locks: &[LockView]) -> BTreeMap<&str, Lock<InfoObject<'_>>> {
    locks
        .iter()
        .map(|view| (view.name.as_str(), lock(view)))
        .collect()
}

/// A queued request (a lock's waiter, or a pool's claim for `item` or any item) as the API
/// shows it; `since` is left out when the store did not keep it.
pub fn waiting<'a>(
    item: Option<&str>,
    request: &'a Acquire,
    since: Option<std::time::SystemTime>,
) -> Waiting<InfoObject<'a>> {
    Waiting {
        item: item.map(str::to_string),
        key: request.key.clone(),
        requestor: request.requestor.clone(),
        info: InfoObject(&request.info),
        since: since.map(rfc3339),
    }
}

/// `GET /lock/{name}`: the lock's fields with its name and its queue, in arrival order.
pub fn lock_status(view: &LockView) -> LockStatus<InfoObject<'_>> {
    LockStatus {
        name: view.name.clone(),
        lock: lock(view),
        queue: view
            .queue
            .iter()
            .map(|queued| waiting(None, &queued.request, queued.since))
            .collect(),
        free: None,
    }
}

/// `GET /lock/{name}?wait_free=` when the time ran out: the status, flagged as still held.
pub fn still_held(view: &LockView) -> LockStatus<InfoObject<'_>> {
    LockStatus {
        free: Some(false),
        ..lock_status(view)
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
