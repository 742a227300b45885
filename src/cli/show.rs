//! `locks`, `status`, `release` and `wait-free`: human-readable tables by default, JSON with
//! `--json`.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::http::{Connection, refused};
use super::{Failure, WaitLimit, exit};

/// Longest single long-poll asked of the server (it clamps longer ones anyway).
pub const POLL: Duration = Duration::from_secs(60);

fn text(value: &Value, field: &str) -> String {
    match value.get(field) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// `{"a": 1, "b": 2}` → `a, b (x2)`.
fn requestors(counts: Option<&Value>) -> String {
    counts
        .and_then(Value::as_object)
        .map(|counts| {
            counts
                .iter()
                .map(|(name, count)| match count.as_u64() {
                    Some(1) | None => name.clone(),
                    Some(n) => format!("{name} (x{n})"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// The holdings of one lock's status: its `holders` list when the server gives one
/// (semaphores), else the status itself.
fn holdings(status: &Value) -> Vec<&Value> {
    match status.get("holders").and_then(Value::as_array) {
        Some(holders) if !holders.is_empty() => holders.iter().collect(),
        _ if status.get("key").is_some_and(|k| !k.is_null()) => vec![status],
        _ => Vec::new(),
    }
}

/// Who holds a lock, in one line, e.g. `key "deploy" (requestors: ci) since ..., lease until ...`.
pub fn describe_holder(status: &Value) -> String {
    let described: Vec<String> = holdings(status)
        .into_iter()
        .map(|holding| {
            let counts = holding
                .get("locked_by")
                .or_else(|| holding.get("counts"))
                .or_else(|| holding.get("requestors"));
            let mut line = format!(
                "key {:?} (requestors: {})",
                text(holding, "key"),
                requestors(counts)
            );
            let since = text(holding, "acquired_at");
            if !since.is_empty() {
                line.push_str(&format!(" since {since}"));
            }
            let info = holding.get("info").or_else(|| status.get("info"));
            if let Some(url) = info
                .and_then(|i| i.get("build_url"))
                .and_then(Value::as_str)
            {
                line.push_str(&format!(", build {url}"));
            }
            let expires = text(holding, "expires_at");
            if !expires.is_empty() {
                line.push_str(&format!(", lease until {expires}"));
            }
            line
        })
        .collect();
    if described.is_empty() {
        "nobody".to_string()
    } else {
        described.join("; ")
    }
}

/// Prints rows as columns, the first row being the header.
/// Writes a line to standard output; a closed pipe ends the command quietly (see
/// [`super::closed_stdout`]).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err(super::stdout_failure)
    }};
}

fn table(rows: &[Vec<String>]) -> Result<(), Failure> {
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

fn pretty(value: &Value) -> String {
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
    if let Some(map) = locks.as_object() {
        for (name, status) in map {
            let slots = match (status.get("slots"), status.get("holders")) {
                (Some(total), Some(Value::Array(holders))) => {
                    format!("{}/{}", holders.len(), total)
                }
                (Some(total), _) => total.to_string(),
                _ => String::new(),
            };
            let waiters = text(status, "waiters");
            let held = holdings(status);
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
                let counts = holding
                    .get("locked_by")
                    .or_else(|| holding.get("counts"))
                    .or_else(|| holding.get("requestors"));
                rows.push(vec![
                    name.clone(),
                    text(holding, "key"),
                    requestors(counts),
                    text(holding, "generation"),
                    text(holding, "acquired_at"),
                    text(holding, "expires_at"),
                    slots.clone(),
                    waiters.clone(),
                ]);
            }
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
    if holdings(status).is_empty() {
        return out!("lock {name:?} is free");
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut add = |label: &str, value: String| {
        if !value.is_empty() {
            rows.push(vec![format!("{label}:"), value]);
        }
    };
    add("name", name.to_string());
    add("key", text(status, "key"));
    add("locked by", requestors(status.get("locked_by")));
    add("generation", text(status, "generation"));
    add("acquired at", text(status, "acquired_at"));
    add("expires at", text(status, "expires_at"));
    add("waiters", text(status, "waiters"));
    if let Some(slots) = status.get("slots") {
        add("slots", slots.to_string());
    }
    if let Some(holders) = status.get("holders").and_then(Value::as_array)
        && holders.len() > 1
    {
        add("holders", describe_holder(status));
    }
    if let Some(info) = status.get("info").and_then(Value::as_object) {
        for (key, value) in info {
            add(
                &format!("info.{key}"),
                value.as_str().unwrap_or_default().to_string(),
            );
        }
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
        out!("{}", text(&reply.body, "response"))?;
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
        let asked = remaining.map_or(POLL, |r| r.min(POLL));
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
