//! The state file's format: encoding the lock table, and decoding both our format and the
//! original Go locker's (a JSON map of name → `{key, locked_by}`), which loads as is.
//!
//! We write YAML in its flow style, which is also JSON, one lock per line:
//!
//! ```text
//! {"format":"locker/v2","next_generation":18,"locks":{
//! "deploy-prod":{"holders":[{"key":"build-42","generation":17,...}]}
//! }}
//! ```
//!
//! Each lock's line is kept by the [`Encoder`] and re-encoded only when that lock changed, so a
//! write costs the changed locks plus one copy of the file, not a full serialisation (block YAML
//! through `serde_yaml_ng` took over 100 ms for 10,000 locks). Loading tries JSON first (fast) and
//! falls back to the YAML parser, so hand-edited block YAML loads too.
//!
//! Our format is a mapping whose `format` entry is the string `locker/v2`. In the original format
//! every top-level value is a mapping, so the two can never be confused.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::rules::{Holder, Info, Lock, LockTable, Pool, RequestorHold, Requestors, Target};

/// Why a state file (or a journal record) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not YAML or JSON, or not the shape of a state file; the message names the line and
    /// column where the decoder found it.
    #[error("{0}")]
    Invalid(String),
    #[error(
        "unknown state file format {0:?} (this server reads {FORMAT:?} and the original locker's)"
    )]
    UnknownFormat(String),
    #[error("the state file must hold a mapping of lock names")]
    NotAMapping,
    #[error("journal record {index} does not decode: {source}")]
    JournalRecord {
        index: usize,
        source: serde_json::Error,
    },
}

/// A lock that could not be encoded (it cannot happen with the types we have; serde_json
/// still reports it rather than panicking).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode state: {0}")]
pub struct EncodeError(#[from] serde_json::Error);

/// The `format` marker of files this server writes.
pub const FORMAT: &str = "locker/v2";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateIn {
    #[allow(dead_code)] // checked before this is decoded
    format: String,
    next_generation: u64,
    /// The epoch of the journal records that extend this file (see `journal.rs`); 0: none.
    #[serde(default)]
    journal: u64,
    #[serde(default)]
    locks: BTreeMap<String, Lock>,
    #[serde(default)]
    pools: BTreeMap<String, Pool>,
}

/// One journal record: the new state of every lock a batch changed (`None`: no longer held).
/// Whole states, not operations, so replaying a record twice changes nothing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordIn {
    next_generation: u64,
    #[serde(default)]
    locks: BTreeMap<String, Option<Lock>>,
    #[serde(default)]
    pools: BTreeMap<String, Option<Pool>>,
}

/// One lock of the original Go locker's file.
#[derive(Deserialize)]
struct OriginalLock {
    #[serde(default)]
    key: String,
    #[serde(default)]
    locked_by: BTreeMap<String, i64>,
}

/// Keeps one encoded line per held lock and per pool, and renders the whole file from them.
#[derive(Clone, Debug, Default)]
pub struct Encoder {
    /// Locks first, then pools (the order of [`Target`]), as the file has them.
    lines: BTreeMap<Target, String>,
}

impl Encoder {
    /// Encodes every lock and pool of `table`.
    pub fn new(table: &LockTable) -> Result<Self, EncodeError> {
        let mut encoder = Encoder::default();
        let locks = table.locks().keys().map(|name| Target::Lock(name.clone()));
        let pools = table.pools().keys().map(|name| Target::Pool(name.clone()));
        let all: Vec<Target> = locks.chain(pools).collect();
        encoder.update(table, &all)?;
        Ok(encoder)
    }

    /// Re-encodes the locks and pools in `changed` as they are now in `table`.
    pub fn update<'a>(
        &mut self,
        table: &LockTable,
        changed: impl IntoIterator<Item = &'a Target>,
    ) -> Result<(), EncodeError> {
        for target in changed {
            let line = match target {
                Target::Lock(name) => match table.lock(name).filter(|lock| lock.is_held()) {
                    Some(lock) => Some(format!("{}:{}", json(name)?, json(lock)?)),
                    None => None,
                },
                Target::Pool(name) => {
                    match table.pool(name).filter(|pool| !pool.items.is_empty()) {
                        Some(pool) => Some(format!("{}:{}", json(name)?, json(pool)?)),
                        None => None,
                    }
                }
            };
            match line {
                Some(line) => self.lines.insert(target.clone(), line),
                None => self.lines.remove(target),
            };
        }
        Ok(())
    }

    /// The complete file, naming the journal epoch that extends it (0: none).
    pub fn render(&self, next_generation: u64, journal: u64) -> Vec<u8> {
        let size: usize = self.lines.values().map(|l| l.len() + 2).sum();
        let mut out = String::with_capacity(size + 100);
        out.push_str(&format!(
            "{{\"format\":\"{FORMAT}\",\"next_generation\":{next_generation},"
        ));
        if journal != 0 {
            out.push_str(&format!("\"journal\":{journal},"));
        }
        out.push_str("\"locks\":{");
        let mut pools = false;
        let mut first = true;
        for (target, line) in &self.lines {
            if !pools && matches!(target, Target::Pool(_)) {
                // Only files with pools have the section, so files without them stay as before.
                out.push_str("\n},\"pools\":{");
                pools = true;
                first = true;
            }
            out.push_str(if first { "\n" } else { ",\n" });
            out.push_str(line);
            first = false;
        }
        out.push_str("\n}}\n");
        out.into_bytes()
    }
}

impl Encoder {
    /// A journal record of the locks and pools in `changed`, from their current lines.
    pub fn record<'a>(
        &self,
        changed: impl IntoIterator<Item = &'a Target>,
        next_generation: u64,
    ) -> Result<Vec<u8>, EncodeError> {
        let mut locks = Vec::new();
        let mut pools = Vec::new();
        for target in changed {
            let (name, section) = match target {
                Target::Lock(name) => (name, &mut locks),
                Target::Pool(name) => (name, &mut pools),
            };
            section.push(match self.lines.get(target) {
                Some(line) => line.clone(),
                None => format!("{}:null", json(name)?),
            });
        }
        let out = format!(
            "{{\"next_generation\":{next_generation},\"locks\":{{{}}},\"pools\":{{{}}}}}",
            locks.join(","),
            pools.join(",")
        );
        Ok(out.into_bytes())
    }
}

/// Applies journal records, in order, to a decoded table.
pub fn replay(table: LockTable, records: &[Vec<u8>]) -> Result<LockTable, DecodeError> {
    if records.is_empty() {
        return Ok(table);
    }
    let mut pools: BTreeMap<String, Pool> = table
        .pools()
        .iter()
        .map(|(name, pool)| (name.clone(), Pool::clone(pool)))
        .collect();
    let (mut locks, mut next_generation) = table.into_parts();
    for (index, bytes) in records.iter().enumerate() {
        let record: RecordIn =
            serde_json::from_slice(bytes).map_err(|source| DecodeError::JournalRecord {
                index: index + 1,
                source,
            })?;
        next_generation = next_generation.max(record.next_generation);
        for (name, lock) in record.locks {
            match lock {
                Some(lock) => locks.insert(name, lock),
                None => locks.remove(&name),
            };
        }
        for (name, pool) in record.pools {
            match pool {
                Some(pool) => pools.insert(name, pool),
                None => pools.remove(&name),
            };
        }
    }
    Ok(LockTable::from_parts(locks, next_generation).with_pools(pools))
}

fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, EncodeError> {
    Ok(serde_json::to_string(value)?)
}

/// Encodes the whole table as a complete file.
pub fn encode(table: &LockTable) -> Result<Vec<u8>, EncodeError> {
    Ok(Encoder::new(table)?.render(table.next_generation(), 0))
}

/// Decodes a state file. `now` stamps locks loaded from the original format, which has no times.
/// Errors name the line and column where the decoder found them.
pub fn decode(text: &str, now: SystemTime) -> Result<LockTable, DecodeError> {
    decode_with_journal(text, now).map(|(table, _)| table)
}

/// Decodes a state file and the journal epoch it names (0 for none, and for the original format).
pub fn decode_with_journal(text: &str, now: SystemTime) -> Result<(LockTable, u64), DecodeError> {
    if let Some(table) = decode_json(text, now) {
        return table;
    }
    let document: Value =
        serde_yaml_ng::from_str(text).map_err(|e| DecodeError::Invalid(e.to_string()))?;
    match &document {
        Value::Null => Ok((LockTable::default(), 0)),
        Value::Mapping(map) => match map.get("format") {
            Some(Value::String(format)) if format == FORMAT => decode_ours(document, text),
            Some(Value::String(format)) => Err(DecodeError::UnknownFormat(format.clone())),
            _ => decode_original(document, text, now).map(|table| (table, 0)),
        },
        _ => Err(DecodeError::NotAMapping),
    }
}

/// The fast path for files that are JSON (ours, and the original locker's). `None` when the
/// text is not JSON: the YAML parser then reads it.
fn decode_json(text: &str, now: SystemTime) -> Option<Result<(LockTable, u64), DecodeError>> {
    let text_start = text.trim_start();
    if !text_start.starts_with('{') {
        return None;
    }
    // Our own files start with the format marker: decode them straight into their shape.
    if text_start.starts_with(&format!("{{\"format\":\"{FORMAT}\"")) {
        return Some(
            serde_json::from_str::<StateIn>(text)
                .map_err(|e| DecodeError::Invalid(e.to_string()))
                .map(StateIn::into_table),
        );
    }
    let document: serde_json::Value = serde_json::from_str(text).ok()?;
    let format = document.get("format").cloned();
    Some(match format {
        Some(serde_json::Value::String(format)) if format == FORMAT => {
            serde_json::from_value::<StateIn>(document)
                .map_err(|_| json_located_error::<StateIn>(text))
                .map(StateIn::into_table)
        }
        Some(serde_json::Value::String(format)) => Err(DecodeError::UnknownFormat(format)),
        _ => serde_json::from_value::<BTreeMap<String, OriginalLock>>(document)
            .map_err(|_| json_located_error::<BTreeMap<String, OriginalLock>>(text))
            .map(|original| (from_original(original, now), 0)),
    })
}

fn json_located_error<T: serde::de::DeserializeOwned>(text: &str) -> DecodeError {
    DecodeError::Invalid(match serde_json::from_str::<T>(text) {
        Err(e) => e.to_string(),
        Ok(_) => "the state file has the wrong shape".to_string(),
    })
}

fn decode_ours(document: Value, text: &str) -> Result<(LockTable, u64), DecodeError> {
    let state: StateIn =
        serde_yaml_ng::from_value(document).map_err(|_| located_error::<StateIn>(text))?;
    Ok(state.into_table())
}

impl StateIn {
    fn into_table(self) -> (LockTable, u64) {
        (
            LockTable::from_parts(self.locks, self.next_generation).with_pools(self.pools),
            self.journal,
        )
    }
}

fn decode_original(document: Value, text: &str, now: SystemTime) -> Result<LockTable, DecodeError> {
    let original: BTreeMap<String, OriginalLock> = serde_yaml_ng::from_value(document)
        .map_err(|_| located_error::<BTreeMap<String, OriginalLock>>(text))?;
    Ok(from_original(original, now))
}

fn from_original(original: BTreeMap<String, OriginalLock>, now: SystemTime) -> LockTable {
    let mut generation = 0;
    let mut locks = BTreeMap::new();
    for (name, lock) in original {
        let requestors: Requestors = lock
            .locked_by
            .into_iter()
            .filter(|(_, count)| *count > 0)
            .map(|(requestor, count)| {
                let hold = RequestorHold {
                    count: count.unsigned_abs(),
                    expires_at: None,
                    release_with_build: None,
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
    LockTable::from_parts(locks, generation + 1)
}

/// Decoding from a `Value` loses positions; decoding the text again reports where it went wrong.
/// Only runs on the error path.
fn located_error<T: serde::de::DeserializeOwned>(text: &str) -> DecodeError {
    DecodeError::Invalid(match serde_yaml_ng::from_str::<T>(text) {
        Err(e) => e.to_string(),
        Ok(_) => "the state file has the wrong shape".to_string(),
    })
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
            info: Info::from_iter([("team".to_string(), "main".to_string())]),
            slots: None,
            release_with_build: None,
            renew: false,
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
    fn incremental_encoding_matches_a_full_encoding() {
        let mut table = LockTable::default();
        for i in 0..5 {
            table.acquire(&format!("l{i}"), request("k", "r", None), at(10), None);
        }
        let mut encoder = Encoder::new(&table).expect("encodes");
        table.acquire("l2", request("k", "r2", Some(5)), at(20), None);
        table.release("l4", "k", "r", at(21));
        table.acquire("new", request("k", "r", None), at(22), None);
        let changed: Vec<Target> = ["l2", "l4", "new"].map(|n| Target::Lock(n.into())).to_vec();
        encoder.update(&table, &changed).expect("updates");
        let rendered = encoder.render(table.next_generation(), 0);
        assert_eq!(rendered, encode(&table).expect("encodes"));
        let text = String::from_utf8(rendered).expect("utf-8");
        assert_eq!(text.lines().count(), 7, "one line per lock:\n{text}");
        assert_eq!(decode(&text, at(0)).expect("decodes"), table);
        // JSON is YAML: the YAML parser reads the same file.
        let document: Value = serde_yaml_ng::from_str(&text).expect("valid YAML");
        assert_eq!(
            decode_ours(document, &text).expect("decodes as YAML"),
            (table, 0)
        );
    }

    #[test]
    fn hand_written_block_yaml_loads() {
        let text = "# edited by hand\nformat: locker/v2\nnext_generation: 9\nlocks:\n  deploy:\n    holders:\n    - key: k\n      generation: 8\n      acquired_at: 2026-11-24T12:00:00Z\n      requestors:\n        r: {count: 2}\n";
        let table = decode(text, at(0)).expect("loads");
        assert_eq!(
            table.lock("deploy").expect("held").holders[0].counts(),
            [("r".into(), 2)].into()
        );
        assert_eq!(table.next_generation(), 9);
    }

    #[test]
    fn syntax_and_shape_errors_name_line_and_column() {
        let json_shape = decode(
            "{\"format\":\"locker/v2\",\n\"next_generation\":\"x\"}",
            at(0),
        )
        .expect_err("bad shape")
        .to_string();
        assert!(json_shape.contains("line 2"), "{json_shape}");
        let syntax = decode("a: {b: [}\n", at(0))
            .expect_err("bad syntax")
            .to_string();
        assert!(syntax.contains("line"), "{syntax}");
        let shape =
            decode("format: locker/v2\nnext_generation: many\n", at(0)).expect_err("bad shape");
        let shape = shape.to_string();
        assert!(shape.contains("line 2"), "{shape}");
        let original_shape = decode("a:\n  key: k\n  locked_by: [1, 2]\n", at(0))
            .expect_err("bad shape")
            .to_string();
        assert!(original_shape.contains("line"), "{original_shape}");
        assert!(matches!(
            decode("- a\n- b\n", at(0)),
            Err(DecodeError::NotAMapping)
        ));
        assert!(matches!(
            decode("format: locker/v9\n", at(0)),
            Err(DecodeError::UnknownFormat(f)) if f == "locker/v9"
        ));
    }
}
