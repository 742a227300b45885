//! The three commands, each from the request text to the response value. Errors are one-line
//! reasons for the build log.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use reqwest::StatusCode;
use serde_json::{Map, Value, json};

use crate::client::{Client, ClientError, RetryPolicy, since};
use crate::lock::{BuildEnv, Holding, state_metadata, version_of};
use crate::log;
use crate::models::{
    CheckRequest, ConfigError, InRequest, LockOp, LockTarget, MetadataField, OutParams, OutRequest,
    Source, VersionResponse, check_lock_name, parse_in_params,
};

impl From<ConfigError> for String {
    fn from(error: ConfigError) -> String {
        error.0
    }
}

impl From<ClientError> for String {
    fn from(error: ClientError) -> String {
        error.to_string()
    }
}

fn parse_request<T: serde::de::DeserializeOwned>(input: &str) -> Result<T, String> {
    serde_json::from_str(input)
        .map_err(|e| format!("the request on stdin is not valid JSON for this command: {e}"))
}

fn warn_all(warnings: Vec<String>) {
    for warning in warnings {
        log!("{warning}");
    }
}

/// Reads `source`, sets up the client and finds the lock's name.
async fn connect(source: &Value, retry: RetryPolicy) -> Result<(Source, Client, String), String> {
    let (source, warnings) = Source::parse(source)?;
    warn_all(warnings);
    let client = Client::new(&source, retry)?;
    let name = match &source.target {
        LockTarget::Name(name) => name.clone(),
        LockTarget::BoshDirector(url) => {
            log!("determining the lock name from the BOSH director at {url}");
            let name = client.bosh_director_name(url).await?;
            check_lock_name("the BOSH director's name", &name)?;
            log!("using the director's name {name:?} as the lock name");
            name
        }
    };
    Ok((source, client, name))
}

/// `check`: the current version of this one lock. Concourse adds it if it is new.
pub async fn check(input: &str, retry: RetryPolicy) -> Result<Value, String> {
    let request: CheckRequest = parse_request(input)?;
    let (_, client, name) = connect(&request.source, retry).await?;
    let holding = client.holding(&name).await?;
    let version = version_of(holding.as_ref());
    match &holding {
        Some(h) => log!("lock {name:?} is held: {}", h.describe(SystemTime::now())),
        None => log!("lock {name:?} is free"),
    }
    if request.version.as_ref() == Some(&version) {
        log!("unchanged since the last check");
    }
    Ok(json!([version]))
}

/// `in`: writes the lock's current state into `directory`.
pub async fn fetch(input: &str, directory: &Path, retry: RetryPolicy) -> Result<Value, String> {
    let request: InRequest = parse_request(input)?;
    let (_, client, name) = connect(&request.source, retry).await?;
    warn_all(parse_in_params(&request.params)?);
    let holding = client.holding(&name).await?;
    let current = version_of(holding.as_ref());
    let version = match request.version {
        Some(requested) => {
            if requested != current {
                log!(
                    "lock {name:?} has changed since version {:?}; writing its current state ({:?})",
                    requested.reference,
                    current.reference
                );
            }
            requested
        }
        None => current,
    };

    std::fs::create_dir_all(directory)
        .map_err(|e| format!("cannot create {}: {e}", directory.display()))?;
    let (key, locked_by, status) = match &holding {
        Some(h) => {
            let mut status = h.raw.clone();
            status.insert("name".into(), json!(name));
            (h.key.clone(), json!(h.locked_by), Value::Object(status))
        }
        None => (String::new(), json!({}), Value::Object(Map::new())),
    };
    write(directory, "lock", &key)?;
    write(directory, "locked_by", &locked_by.to_string())?;
    write(directory, "metadata.json", &status.to_string())?;
    match &holding {
        Some(h) => log!("lock {name:?} is held: {}", h.describe(SystemTime::now())),
        None => log!("lock {name:?} is free"),
    }
    let response = VersionResponse {
        version,
        metadata: state_metadata(&name, holding.as_ref()),
    };
    serde_json::to_value(response).map_err(|e| format!("cannot encode the response: {e}"))
}

fn write(directory: &Path, file: &str, content: &str) -> Result<(), String> {
    let path = directory.join(file);
    std::fs::write(&path, content).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `out`: locks or unlocks.
pub async fn put(input: &str, build: &BuildEnv, retry: RetryPolicy) -> Result<Value, String> {
    let request: OutRequest = parse_request(input)?;
    // Params first: a missing key is reported before any network call.
    let (params, warnings) = OutParams::parse(&request.params)?;
    warn_all(warnings);
    let (source, client, name) = connect(&request.source, retry).await?;
    let response = match params.op {
        LockOp::Lock => lock(&client, &source, &name, &params, build).await?,
        LockOp::Unlock => unlock(&client, &name, &params).await?,
    };
    serde_json::to_value(response).map_err(|e| format!("cannot encode the response: {e}"))
}

/// The body of a lock or unlock request: as the original resource sent it, plus holder info and
/// the lease for a lock.
fn request_body(params: &OutParams, build: Option<&BuildEnv>) -> Value {
    let mut body = Map::new();
    body.insert("key".into(), json!(params.key));
    if let Some(requestor) = &params.locked_by {
        body.insert("requestor".into(), json!(requestor));
    }
    if let Some(build) = build {
        let info = build.info();
        if !info.is_empty() {
            body.insert("info".into(), json!(info));
        }
    }
    if let Some(ttl) = params.ttl {
        body.insert("ttl".into(), json!(crate::client::wire_duration(ttl)));
    }
    Value::Object(body)
}

/// Whether a 423 answer to a request that asked to wait came after a wait. The original locker
/// ignores `?wait` and answers at once; this server answers after the wait ran out (or at
/// once with a "timed out" error if it clamps the wait to very little).
pub fn server_waited(asked: Duration, elapsed: Duration, error: &str) -> bool {
    elapsed >= (asked / 2).min(Duration::from_secs(1)) || error.contains("timed out")
}

/// Takes the lock: a first try that does not wait (so the log names the holder at once), then
/// long-polls of `wait_poll` each until granted, or sleeps of `retry_interval` between tries
/// against a server that does not long-poll. A later SIGTERM handler can race this future.
async fn lock(
    client: &Client,
    source: &Source,
    name: &str,
    params: &OutParams,
    build: &BuildEnv,
) -> Result<VersionResponse, String> {
    let body = request_body(params, Some(build));
    let requestor = params
        .locked_by
        .clone()
        .unwrap_or_else(|| params.key.clone());
    let started = Instant::now();
    let deadline = params.wait_timeout.map(|timeout| started + timeout);
    let mut wait: Option<Duration> = None;
    let mut told_fallback = false;
    log!(
        "acquiring lock {name:?} with key {:?} as {requestor:?}",
        params.key
    );
    let granted = loop {
        let reply = client.acquire(name, &body, wait).await?;
        match reply.status {
            StatusCode::OK => break reply.body,
            StatusCode::LOCKED => {}
            status => {
                return Err(format!(
                    "cannot lock {name:?}: the server answered {status}: {}",
                    reply.error_message()
                ));
            }
        }
        let message = reply.error_message();
        let holder = match client.holding(name).await {
            Ok(Some(holding)) => holding.describe(SystemTime::now()),
            Ok(None) => {
                format!("nobody GET /locks lists (freed just now? the server said: {message})")
            }
            Err(e) => format!("an unknown holder ({e}; the server said: {message})"),
        };
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        log!(
            "lock {name:?} is held by {holder}; waited {} so far",
            since(started)
        );
        if remaining == Some(Duration::ZERO) {
            return Err(format!(
                "gave up waiting for lock {name:?} after {} (params.wait_timeout): it is held by {holder}",
                since(started)
            ));
        }
        if let Some(asked) = wait
            && !server_waited(asked, reply.elapsed, &message)
        {
            if !told_fallback {
                log!(
                    "the server answered at once instead of waiting (no long-poll support, e.g. \
                     the original locker): trying again every {}",
                    humantime::format_duration(source.retry_interval)
                );
                told_fallback = true;
            }
            let pause = remaining.map_or(source.retry_interval, |r| r.min(source.retry_interval));
            tokio::time::sleep(pause).await;
        }
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        wait = Some(poll_length(source.wait_poll, remaining));
    };

    let generation = granted
        .get("generation")
        .and_then(Value::as_u64)
        .map(|g| g.to_string())
        .unwrap_or_default();
    log!(
        "acquired lock {name:?} with key {:?} as {requestor:?} after {}{}",
        params.key,
        since(started),
        if generation.is_empty() {
            String::new()
        } else {
            format!(" (generation {generation})")
        }
    );
    let holding = match client.holding(name).await {
        Ok(holding) => holding,
        Err(e) => {
            // The lock is held: do not fail the step over a status read.
            log!("warning: cannot read the lock's state after acquiring it: {e}");
            Some(own_holding(params, &requestor, &generation))
        }
    };
    Ok(VersionResponse {
        version: version_of(holding.as_ref()),
        metadata: vec![
            MetadataField::new("lock", name),
            MetadataField::new("key", params.key.clone()),
            MetadataField::new("locked_by", requestor),
            MetadataField::new("generation", generation),
            MetadataField::new("waited", since(started)),
        ],
    })
}

/// The long-poll to ask for: `wait_poll`, or less when `wait_timeout` runs out sooner.
fn poll_length(wait_poll: Duration, remaining: Option<Duration>) -> Duration {
    remaining.map_or(wait_poll, |r| r.min(wait_poll))
}

/// What we know of the holding we were just granted, when the server cannot tell us.
fn own_holding(params: &OutParams, requestor: &str, generation: &str) -> Holding {
    let mut entry = json!({"key": params.key, "locked_by": {requestor: 1}});
    if let Ok(generation) = generation.parse::<u64>() {
        entry["generation"] = json!(generation);
    }
    // The entry above is always a held lock.
    Holding::from_entry(&entry).unwrap_or(Holding {
        key: params.key.clone(),
        locked_by: [(requestor.to_string(), 1)].into(),
        generation: None,
        acquired_at: None,
        expires_at: None,
        waiters: None,
        info: Default::default(),
        raw: Map::new(),
    })
}

/// Releases the lock (by force when asked).
async fn unlock(
    client: &Client,
    name: &str,
    params: &OutParams,
) -> Result<VersionResponse, String> {
    let body = request_body(params, None);
    let requestor = params
        .locked_by
        .clone()
        .unwrap_or_else(|| params.key.clone());
    if params.force {
        log!("force-releasing lock {name:?}, whoever holds it");
    } else {
        log!(
            "releasing lock {name:?} with key {:?} as {requestor:?}",
            params.key
        );
    }
    let reply = client.release(name, &body, params.force).await?;
    match reply.status {
        StatusCode::OK => {}
        StatusCode::LOCKED => {
            return Err(format!(
                "cannot unlock {name:?} with key {:?}: {}",
                params.key,
                reply.error_message()
            ));
        }
        status => {
            return Err(format!(
                "cannot unlock {name:?}: the server answered {status}: {}",
                reply.error_message()
            ));
        }
    }
    if let Some(response) = reply.body.get("response").and_then(Value::as_str) {
        log!("{response}");
    }
    let holding = match client.holding(name).await {
        Ok(holding) => holding,
        Err(e) => {
            log!("warning: cannot read the lock's state after releasing it: {e}");
            None
        }
    };
    match &holding {
        Some(h) => log!(
            "lock {name:?} is still held: {}",
            h.describe(SystemTime::now())
        ),
        None => log!("lock {name:?} is free"),
    }
    Ok(VersionResponse {
        version: version_of(holding.as_ref()),
        metadata: vec![
            MetadataField::new("lock", name),
            MetadataField::new("key", params.key.clone()),
            MetadataField::new("locked_by", requestor),
            MetadataField::new(
                "generation",
                holding
                    .and_then(|h| h.generation)
                    .map(|g| g.to_string())
                    .unwrap_or_default(),
            ),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_a_server_that_does_not_wait() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let cases = [
            // asked, took, error, waited?
            (s(60), ms(5), "lock \"a\" is held under key \"k\"", false),
            (s(60), s(60), "timed out after 60s", true),
            (s(60), s(1), "held", true),
            (ms(200), ms(120), "held", true),
            (ms(200), ms(20), "held", false),
            // Clamped by the server to a tiny wait, but it says it waited.
            (s(60), ms(10), "timed out after 10ms waiting for lock", true),
        ];
        for (asked, took, error, expected) in cases {
            assert_eq!(
                server_waited(asked, took, error),
                expected,
                "{asked:?} {took:?} {error}"
            );
        }
    }

    #[test]
    fn poll_length_respects_wait_timeout() {
        let s = Duration::from_secs;
        assert_eq!(poll_length(s(60), None), s(60));
        assert_eq!(poll_length(s(60), Some(s(5))), s(5));
        assert_eq!(poll_length(s(60), Some(s(600))), s(60));
    }

    #[test]
    fn request_bodies() {
        let params = OutParams {
            key: "k".into(),
            locked_by: None,
            op: LockOp::Lock,
            ttl: Some(Duration::from_secs(90)),
            force: false,
            wait_timeout: None,
        };
        let build = BuildEnv {
            job: Some("deploy".into()),
            ..BuildEnv::default()
        };
        assert_eq!(
            request_body(&params, Some(&build)),
            json!({"key": "k", "ttl": "90s", "info": {"job": "deploy"}})
        );
        let unlock = OutParams {
            locked_by: Some("r".into()),
            op: LockOp::Unlock,
            ttl: None,
            ..params
        };
        assert_eq!(
            request_body(&unlock, None),
            json!({"key": "k", "requestor": "r"})
        );
    }
}
