//! The JSON shapes of locks in responses. `key` and `locked_by` are the original API's and stay
//! (they describe the oldest holding); the other fields were added later. `holders` lists every
//! holding, which differs from the oldest one only for semaphores (`slots` > 1).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::rules::Holder;
use crate::store::LockView;
use crate::timefmt::rfc3339;

/// One lock as `GET /locks` shows it. `key` and `locked_by` describe the oldest holding.
fn lock_fields(lock: &LockView) -> serde_json::Map<String, Value> {
    let mut fields = serde_json::Map::new();
    if let Some(holder) = lock.holders.first() {
        fields.insert("key".into(), json!(holder.key));
        fields.insert("locked_by".into(), json!(holder.counts()));
        fields.insert("generation".into(), json!(holder.generation));
        fields.insert("acquired_at".into(), json!(rfc3339(holder.acquired_at)));
        fields.insert("expires_at".into(), json!(holder.expires_at().map(rfc3339)));
        fields.insert("info".into(), json!(holder.info));
    }
    fields.insert("waiters".into(), json!(lock.waiters));
    fields.insert("slots".into(), json!(lock.slots));
    fields.insert(
        "holders".into(),
        Value::Array(lock.holders.iter().map(holder).collect()),
    );
    fields
}

fn holder(holder: &Holder) -> Value {
    json!({
        "key": holder.key,
        "locked_by": holder.counts(),
        "generation": holder.generation,
        "acquired_at": rfc3339(holder.acquired_at),
        "expires_at": holder.expires_at().map(rfc3339),
        "info": holder.info,
    })
}

/// `GET /locks`: name → lock, for every held lock.
pub fn lock_map(locks: &[LockView]) -> BTreeMap<&str, Value> {
    locks
        .iter()
        .map(|lock| (lock.name.as_str(), Value::Object(lock_fields(lock))))
        .collect()
}

/// `GET /lock/{name}`: the lock's fields with its name.
pub fn lock_status(lock: &LockView) -> Value {
    let mut fields = lock_fields(lock);
    fields.insert("name".into(), json!(lock.name));
    Value::Object(fields)
}

/// `GET /lock/{name}?wait_free=` when the time ran out: the status, flagged as still held.
pub fn still_held(lock: &LockView) -> Value {
    let mut fields = lock_fields(lock);
    fields.insert("name".into(), json!(lock.name));
    fields.insert("free".into(), json!(false));
    Value::Object(fields)
}
