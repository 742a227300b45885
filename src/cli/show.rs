//! `locks`, `status`, `release` and `wait-free`: human-readable tables by default, JSON with
//! `--json`.

use std::time::{Duration, Instant};

use locker_client::longpoll::{DEFAULT_POLL as POLL, poll_length};
use locker_client::wire::{Holder, Lock, LockMap, LockStatus};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::http::{Connection, refused};
use super::{Failure, WaitLimit, exit};

/// A lock's status as the server sent it, typed; a body that is not one reads as a free lock.
fn typed(status: &Value) -> LockStatus {
    LockStatus::deserialize(status).unwrap_or_default()
}

fn or_empty<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// Who holds a lock, in one line, e.g. `key "deploy" (requestors: ci) since ..., lease until ...`.
pub fn describe_holder(status: &Value) -> String {
    describe(&typed(status).lock)
}

fn describe(lock: &Lock) -> String {
    let described: Vec<String> = lock.holdings().into_iter().map(describe_holding).collect();
    if described.is_empty() {
        "nobody".to_string()
    } else {
        described.join("; ")
    }
}

/// One holding in one line, e.g. `key "deploy" (requestors: ci) since ..., lease until ...`.
pub fn describe_holding(holding: &Holder) -> String {
    let mut line = format!(
        "key {:?} (requestors: {})",
        holding.key,
        holding.requestors()
    );
    if let Some(since) = &holding.acquired_at {
        line.push_str(&format!(" since {since}"));
    }
    if let Some(url) = holding.info.get("build_url") {
        line.push_str(&format!(", build {url}"));
    }
    if let Some(expires) = &holding.expires_at {
        line.push_str(&format!(", lease until {expires}"));
    }
    line
}

/// Prints rows as columns, the first row being the header.
pub fn table(rows: &[Vec<String>]) -> Result<(), Failure> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        out!("{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

pub fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

pub async fn locks(connection: &Connection, as_json: bool) -> Result<u8, Failure> {
    let locks = connection.locks().await?;
    if as_json {
        out!("{}", pretty(&locks))?;
        return Ok(0);
    }
    let mut rows = vec![
        [
            "NAME",
            "KEY",
            "LOCKED BY",
            "GEN",
            "SINCE",
            "EXPIRES",
            "SLOTS",
            "WAITERS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let map = LockMap::deserialize(&locks).map_err(|e| {
        Failure::new(
            exit::REFUSED,
            format!("cannot list the locks: the answer is not a list of locks: {e}"),
        )
    })?;
    for (name, lock) in &map {
        let slots = or_empty(
            lock.slots
                .map(|total| format!("{}/{total}", lock.holders.len())),
        );
        let waiters = or_empty(lock.waiters);
        let held = lock.holdings();
        if held.is_empty() {
            rows.push(vec![
                name.clone(),
                "(free)".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                slots.clone(),
                waiters.clone(),
            ]);
        }
        for holding in held {
            rows.push(vec![
                name.clone(),
                holding.key.clone(),
                holding.requestors(),
                or_empty(holding.generation),
                or_empty(holding.acquired_at.as_ref()),
                or_empty(holding.expires_at.as_ref()),
                slots.clone(),
                waiters.clone(),
            ]);
        }
    }
    if rows.len() == 1 {
        out!("no locks held")?;
    } else {
        table(&rows)?;
    }
    Ok(0)
}

pub async fn status(connection: &Connection, name: &str, as_json: bool) -> Result<u8, Failure> {
    let reply = connection.status(name, None).await?;
    let status = match reply.status {
        StatusCode::OK => reply.body,
        StatusCode::NOT_FOUND => json!({"name": name, "free": true}),
        _ => return Err(refused(&reply, &format!("cannot read lock {name:?}"))),
    };
    if as_json {
        out!("{}", pretty(&status))?;
        return Ok(0);
    }
    print_status(name, &status)?;
    Ok(0)
}

fn print_status(name: &str, status: &Value) -> Result<(), Failure> {
    let status = typed(status);
    let lock = &status.lock;
    let Some(oldest) = lock.holdings().first().copied() else {
        return out!("lock {name:?} is free");
    };
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut add = |label: &str, value: String| {
        if !value.is_empty() {
            rows.push(vec![format!("{label}:"), value]);
        }
    };
    add("name", name.to_string());
    add("key", oldest.key.clone());
    add("locked by", oldest.requestors());
    add("generation", or_empty(oldest.generation));
    add("acquired at", or_empty(oldest.acquired_at.as_ref()));
    add("expires at", or_empty(oldest.expires_at.as_ref()));
    add("waiters", or_empty(lock.waiters));
    add("slots", or_empty(lock.slots));
    if lock.holders.len() > 1 {
        add("holders", describe(lock));
    }
    for (key, value) in &oldest.info {
        add(&format!("info.{key}"), value.clone());
    }
    table(&rows)
}

pub async fn release(
    connection: &Connection,
    name: &str,
    key: Option<String>,
    requestor: Option<String>,
    force: bool,
    as_json: bool,
) -> Result<u8, Failure> {
    let mut body = serde_json::Map::new();
    if let Some(key) = key {
        body.insert("key".into(), json!(key));
    }
    if let Some(requestor) = requestor {
        body.insert("requestor".into(), json!(requestor));
    }
    let reply = connection
        .release(name, &Value::Object(body), force)
        .await?;
    if reply.status != StatusCode::OK {
        return Err(refused(&reply, &format!("cannot release lock {name:?}")));
    }
    if as_json {
        out!("{}", pretty(&reply.body))?;
    } else {
        let response = reply.body.get("response").and_then(Value::as_str);
        out!("{}", response.unwrap_or_default())?;
    }
    Ok(0)
}

/// Whether a status answer says the lock is free: `Some(true/false)`, or `None` when the server
/// does not know `?wait_free` (no `free` field: it answered the plain status at once).
fn free_of(reply: &super::http::Reply) -> Option<bool> {
    match reply.status {
        StatusCode::NOT_FOUND => Some(true),
        StatusCode::OK => reply.body.get("free").and_then(Value::as_bool),
        _ => None,
    }
}

pub async fn wait_free(
    connection: &Connection,
    name: &str,
    limit: WaitLimit,
    as_json: bool,
) -> Result<u8, Failure> {
    let started = Instant::now();
    let deadline = limit.0.map(|l| started + l);
    let mut told = false;
    loop {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let asked = poll_length(POLL, remaining);
        let poll = Instant::now();
        let reply = connection.status(name, Some(asked)).await?;
        if !matches!(reply.status, StatusCode::OK | StatusCode::NOT_FOUND) {
            return Err(refused(&reply, &format!("cannot read lock {name:?}")));
        }
        let free = free_of(&reply);
        // No `free` field: the server answered the plain status (held) without waiting.
        let held_status = reply.body.clone();
        if free == Some(true) || (free.is_none() && reply.status == StatusCode::NOT_FOUND) {
            if as_json {
                out!("{}", pretty(&json!({"name": name, "free": true})))?;
            } else {
                out!("lock {name:?} is free")?;
            }
            return Ok(0);
        }
        if !told {
            eprintln!(
                "locker: waiting until lock {name:?} is free; held by {}",
                describe_holder(&held_status)
            );
            told = true;
        }
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if remaining == Some(Duration::ZERO) {
            if as_json {
                let mut status = held_status.clone();
                if let Some(map) = status.as_object_mut() {
                    map.insert("free".into(), json!(false));
                }
                out!("{}", pretty(&status))?;
            }
            return Err(Failure::new(
                exit::HELD,
                format!(
                    "lock {name:?} is still held after {}: {}",
                    humantime::format_duration(Duration::from_millis(
                        started.elapsed().as_millis() as u64
                    )),
                    describe_holder(&held_status)
                ),
            ));
        }
        // A server that answers at once (no ?wait_free) is asked again each second.
        if poll.elapsed() < asked.min(Duration::from_secs(1)) / 2 {
            let pause = Duration::from_secs(1);
            tokio::time::sleep(remaining.map_or(pause, |r| r.min(pause))).await;
        }
    }
}
