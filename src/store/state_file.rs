//! The state file's format: encoding the lock table as YAML, and decoding both our format and
//! the original Go locker's (a JSON map of name → `{key, locked_by}`), which loads as is.
//!
//! Our format is a YAML mapping whose `format` entry is the string `locker/v2`. In the original
//! format every top-level value is a mapping, so the two can never be confused.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

use crate::rules::{Holder, Info, Lock, LockTable, RequestorHold};

/// The `format` marker of files this server writes.
pub const FORMAT: &str = "locker/v2";

#[derive(Serialize)]
struct StateOut<'a> {
    format: &'static str,
    next_generation: u64,
    locks: &'a BTreeMap<String, Lock>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateIn {
    #[allow(dead_code)] // checked before this is decoded
    format: String,
    next_generation: u64,
    #[serde(default)]
    locks: BTreeMap<String, Lock>,
}

/// One lock of the original Go locker's file.
#[derive(Deserialize)]
struct OriginalLock {
    #[serde(default)]
    key: String,
    #[serde(default)]
    locked_by: BTreeMap<String, i64>,
}

/// Encodes the table as a complete YAML document.
pub fn encode(table: &LockTable) -> Result<Vec<u8>, String> {
    let state = StateOut {
        format: FORMAT,
        next_generation: table.next_generation(),
        locks: table.locks(),
    };
    let mut text =
        String::from("# locker state file: written by the server, edit only while it is stopped\n");
    text.push_str(
        &serde_yaml_ng::to_string(&state).map_err(|e| format!("cannot encode state: {e}"))?,
    );
    Ok(text.into_bytes())
}

/// Decodes a state file. `now` stamps locks loaded from the original format, which has no times.
/// Errors name the line and column where the decoder found them.
pub fn decode(text: &str, now: SystemTime) -> Result<LockTable, String> {
    let document: Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    match &document {
        Value::Null => Ok(LockTable::default()),
        Value::Mapping(map) => match map.get("format") {
            Some(Value::String(format)) if format == FORMAT => decode_ours(document, text),
            Some(Value::String(format)) => Err(format!(
                "unknown state file format {format:?} (this server reads {FORMAT:?} and the original locker's)"
            )),
            _ => decode_original(document, text, now),
        },
        _ => Err("the state file must hold a mapping of lock names".to_string()),
    }
}

fn decode_ours(document: Value, text: &str) -> Result<LockTable, String> {
    let state: StateIn =
        serde_yaml_ng::from_value(document).map_err(|_| located_error::<StateIn>(text))?;
    Ok(LockTable::from_parts(state.locks, state.next_generation))
}

fn decode_original(document: Value, text: &str, now: SystemTime) -> Result<LockTable, String> {
    let original: BTreeMap<String, OriginalLock> = serde_yaml_ng::from_value(document)
        .map_err(|_| located_error::<BTreeMap<String, OriginalLock>>(text))?;
    let mut generation = 0;
    let mut locks = BTreeMap::new();
    for (name, lock) in original {
        let requestors: BTreeMap<String, RequestorHold> = lock
            .locked_by
            .into_iter()
            .filter(|(_, count)| *count > 0)
            .map(|(requestor, count)| {
                let hold = RequestorHold {
                    count: count.unsigned_abs(),
                    expires_at: None,
                };
                (requestor, hold)
            })
            .collect();
        // The original marks a free lock with an empty key or zero counts.
        if lock.key.is_empty() || requestors.is_empty() {
            continue;
        }
        generation += 1;
        let holder = Holder {
            key: lock.key,
            generation,
            acquired_at: now,
            info: Info::new(),
            requestors,
        };
        locks.insert(name, Lock::held_by(holder));
    }
    Ok(LockTable::from_parts(locks, generation + 1))
}

/// Decoding from a `Value` loses positions; decoding the text again reports where it went wrong.
/// Only runs on the error path.
fn located_error<T: serde::de::DeserializeOwned>(text: &str) -> String {
    match serde_yaml_ng::from_str::<T>(text) {
        Err(e) => e.to_string(),
        Ok(_) => "the state file has the wrong shape".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Acquire;
    use std::time::Duration;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn request(key: &str, requestor: &str, ttl: Option<u64>) -> Acquire {
        Acquire {
            key: key.into(),
            requestor: requestor.into(),
            ttl: ttl.map(Duration::from_secs),
            info: [("team".to_string(), "main".to_string())].into(),
            slots: None,
        }
    }

    #[test]
    fn original_format_loads_with_free_locks_dropped() {
        let text = r#"{"a": {"locked_by": {"k1": 0}, "key": ""}, "b": {"locked_by": {"k2": 1}, "key": "k2"}, "c": {"locked_by": {"x": 2, "y": 1}, "key": "shared"}, "d": {"locked_by": {}, "key": "k"}}"#;
        let table = decode(text, at(100)).expect("original format loads");
        let names: Vec<&String> = table.locks().keys().collect();
        assert_eq!(names, ["b", "c"]);
        let c = &table.lock("c").expect("c held").holders[0];
        assert_eq!(c.key, "shared");
        assert_eq!(c.counts(), [("x".into(), 2), ("y".into(), 1)].into());
        assert_eq!(table.next_generation(), 3);
    }

    #[test]
    fn empty_and_comment_only_files_hold_no_locks() {
        for text in ["", "\n", "# nothing here\n", "{}"] {
            let table = decode(text, at(0)).expect("loads");
            assert!(table.locks().is_empty(), "{text:?}");
        }
    }

    #[test]
    fn our_format_round_trips_with_ttls_info_and_generation() {
        let mut table = LockTable::default();
        table.acquire("deploy", request("k1", "r1", Some(60)), at(1000), None);
        table.acquire("deploy", request("k1", "r2", None), at(1001), None);
        table.acquire("other", request("k2", "k2", None), at(1002), None);
        table.release("other", "k2", "k2", at(1003));
        let text = String::from_utf8(encode(&table).expect("encodes")).expect("utf-8");
        let loaded = decode(&text, at(5000)).expect("decodes");
        assert_eq!(loaded, table);
        assert_eq!(loaded.next_generation(), 3);
    }

    #[test]
    fn syntax_and_shape_errors_name_line_and_column() {
        let syntax = decode("a: {b: [}\n", at(0)).expect_err("bad syntax");
        assert!(syntax.contains("line"), "{syntax}");
        let shape =
            decode("format: locker/v2\nnext_generation: many\n", at(0)).expect_err("bad shape");
        assert!(shape.contains("line 2"), "{shape}");
        let original_shape =
            decode("a:\n  key: k\n  locked_by: [1, 2]\n", at(0)).expect_err("bad shape");
        assert!(original_shape.contains("line"), "{original_shape}");
        assert!(decode("- a\n- b\n", at(0)).is_err());
        assert!(decode("format: locker/v9\n", at(0)).is_err());
    }
}
