//! `locks`, `status`, `release` and `wait-free`: human-readable tables by default, JSON with
//! `--json`.

use std::time::{Duration, Instant};

use locker_client::longpoll::{DEFAULT_POLL as POLL, answered_at_once};
use locker_client::wait::{self, Round, Schedule, Waited, Waiter};
use locker_client::wire::{Holder, Lock, LockFree, LockMap, LockReleased, LockRequest, LockStatus};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;

use super::http::{Connection, Reply, refused};
use super::{Failure, WaitLimit, exit};

/// A lock's status as the server sent it, typed; a body that is not one is an error.
fn typed(reply: &Reply, name: &str) -> Result<LockStatus, Failure> {
    reply.parse().ok_or_else(|| {
        Failure::new(
            exit::REFUSED,
            format!("cannot read lock {name:?}: the server's answer is not a lock's status"),
        )
    })
}

/// The answer that lock `name` is free, as JSON.
fn free_json(name: &str) -> Value {
    serde_json::to_value(LockFree::new(name)).unwrap_or_default()
}

fn or_empty<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// Who holds a lock, in one line, e.g. `key "deploy" (requestors: ci) since ..., lease until ...`.
pub fn describe_lock(lock: &Lock) -> String {
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
    let (json, status) = match reply.status {
        StatusCode::OK => (reply.body.clone(), typed(&reply, name)?),
        StatusCode::NOT_FOUND => (free_json(name), LockStatus::default()),
        _ => return Err(refused(&reply, &format!("cannot read lock {name:?}"))),
    };
    if as_json {
        out!("{}", pretty(&json))?;
        return Ok(0);
    }
    print_status(name, &status)?;
    Ok(0)
}

fn print_status(name: &str, status: &LockStatus) -> Result<(), Failure> {
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
        add("holders", describe_lock(lock));
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
    // Without a key (a forced release) the body is `{}`.
    let body = LockRequest {
        key: key.unwrap_or_default(),
        requestor,
        ..LockRequest::default()
    };
    let reply = connection.release(name, &body, force).await?;
    if reply.status != StatusCode::OK {
        return Err(refused(&reply, &format!("cannot release lock {name:?}")));
    }
    if as_json {
        out!("{}", pretty(&reply.body))?;
    } else {
        let released: LockReleased = reply.parse().unwrap_or_default();
        out!("{}", released.response)?;
    }
    Ok(0)
}

/// Waits until the lock is free, through the one wait loop: `GET /lock/{name}?wait_free=`
/// long-polls; a server that does not know `wait_free` answers the plain status at once (no
/// `free` field), and is asked again each second.
pub async fn wait_free(
    connection: &Connection,
    name: &str,
    limit: WaitLimit,
    as_json: bool,
) -> Result<u8, Failure> {
    let started = Instant::now();
    let schedule = Schedule {
        deadline: limit.0.map(|l| started + l),
        poll: POLL,
        fallback_pause: Duration::from_secs(1),
    };
    let mut waiter = FreeWaiter {
        connection,
        name,
        told: false,
    };
    let held = match wait::until(&schedule, &mut waiter).await? {
        Waited::Done(()) => {
            if as_json {
                out!("{}", pretty(&free_json(name)))?;
            } else {
                out!("lock {name:?} is free")?;
            }
            return Ok(0);
        }
        Waited::TimedOut(held) => held,
    };
    if as_json {
        let mut json = held.json;
        if let Some(map) = json.as_object_mut() {
            map.insert("free".into(), Value::Bool(false));
        }
        out!("{}", pretty(&json))?;
    }
    Err(Failure::new(
        exit::HELD,
        format!(
            "lock {name:?} is still held after {}: {}",
            humantime::format_duration(Duration::from_millis(started.elapsed().as_millis() as u64)),
            describe_lock(&held.status.lock)
        ),
    ))
}

/// `wait-free`'s questions, and its one line once the lock turns out to be held.
struct FreeWaiter<'a> {
    connection: &'a Connection,
    name: &'a str,
    told: bool,
}

/// A held lock's status, typed and as the server sent it (for `--json`).
struct Held {
    status: LockStatus,
    json: Value,
}

impl Waiter for FreeWaiter<'_> {
    type Done = ();
    type State = Held;
    type Error = Failure;

    async fn ask(&mut self, wait: Option<Duration>) -> Result<Round<(), Held>, Failure> {
        let name = self.name;
        let reply = self
            .connection
            .status(name, Some(wait.unwrap_or_default()))
            .await?;
        let status = match reply.status {
            StatusCode::NOT_FOUND => return Ok(Round::Done(())),
            StatusCode::OK => typed(&reply, name)?,
            _ => return Err(refused(&reply, &format!("cannot read lock {name:?}"))),
        };
        if status.free == Some(true) {
            return Ok(Round::Done(()));
        }
        Ok(Round::NotYet {
            // No `free` field: the server answered the plain status (held) without waiting.
            at_once: status.free.is_none() || answered_at_once(wait, reply.elapsed, ""),
            state: Held {
                status,
                json: reply.body,
            },
        })
    }

    async fn not_yet(&mut self, held: &Held, _out_of_time: bool) {
        if !self.told {
            eprintln!(
                "locker: waiting until lock {:?} is free; held by {}",
                self.name,
                describe_lock(&held.status.lock)
            );
            self.told = true;
        }
    }
}
