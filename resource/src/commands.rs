//! The three commands, each from the request text to the response value. Errors are one-line
//! reasons for the build log. With `source.pool` set, each hands over to the pool mode
//! (`pool_commands.rs`).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use reqwest::StatusCode;
use serde_json::{Map, Value, json};

use crate::client::{Client, ClientError, RetryPolicy, since};
use crate::error::ResourceError;
use crate::lock::{BuildEnv, Holding, state_metadata, version_of};
use crate::log;
use crate::models::{
    CheckRequest, InRequest, LockOp, LockTarget, MetadataField, OutParams, OutRequest, Source,
    Trigger, Version, VersionResponse, check_lock_name, parse_in_params,
};
use crate::pool_commands;
use crate::trigger;
use locker_client::acquire::{self, Outcome};
use locker_client::duration::WireDuration;
use locker_client::longpoll::{ABORT_DEADLINE, answered_at_once};
use locker_client::wait::{self, Round, Schedule, Waited, Waiter};
use locker_client::wire::{Holder, LockGrant, LockReleased, LockRequest, LockStatus};
use locker_client::{Reply, Target};

/// What `out` is doing, for the clean-up when a signal stops it (kept by the shared acquire
/// loop).
pub use locker_client::Abort;

/// After a signal, with the work abandoned (its requests dropped, so the server withdraws a
/// waiting acquire): releases what the acquire (or claim) may have been granted, and says what
/// it did.
pub async fn clean_up(abort: &Abort, signal: &str) -> String {
    let Some(pending) = abort.take() else {
        return format!("stopped by {signal}; holding no lock");
    };
    if matches!(pending.target, Target::Pool { .. }) {
        return pool_commands::clean_up(&pending, signal).await;
    }
    // The key cannot be held by this requestor otherwise: it would have been granted at once,
    // not kept waiting.
    let what = if pending.granted {
        "it had been granted"
    } else {
        "a grant may have raced with the signal"
    };
    let (target, key) = (&pending.target, pending.key());
    let requestor = pending.requestor().unwrap_or(key);
    let outcome = match pending.release().await {
        Some(Ok(reply)) if reply.status == StatusCode::OK => {
            let said = reply
                .parse::<LockReleased>()
                .map(|released| released.response)
                .filter(|said| !said.is_empty())
                .unwrap_or_else(|| "released".to_string());
            format!("released key {key:?} as {requestor:?} ({said})")
        }
        Some(Ok(reply)) => format!(
            "nothing to release: the server answered {} ({})",
            reply.status,
            reply.error_message()
        ),
        Some(Err(e)) => format!(
            "could not release key {key:?} as {requestor:?}: {}; the server withdraws a \
             grant to a client that has gone, and a ttl would end any holding",
            ClientError::from(e)
        ),
        None => format!(
            "could not release key {key:?} as {requestor:?} within {}: the server \
             withdraws a grant to a client that has gone",
            humantime::format_duration(ABORT_DEADLINE)
        ),
    };
    format!("stopped by {signal} while acquiring {target}; {what}: {outcome}")
}

pub(crate) fn parse_request<T: serde::de::DeserializeOwned>(
    input: &str,
) -> Result<T, ResourceError> {
    serde_json::from_str(input).map_err(ResourceError::Request)
}

pub(crate) fn warn_all(warnings: Vec<String>) {
    for warning in warnings {
        log!("{warning}");
    }
}

/// Reads `source`, warning of unknown fields.
fn read_source(source: &Value) -> Result<Source, ResourceError> {
    let (source, warnings) = Source::parse(source)?;
    warn_all(warnings);
    Ok(source)
}

/// Sets up the client and finds the lock's name.
async fn connect(source: &Source, retry: RetryPolicy) -> Result<(Client, String), ResourceError> {
    let client = Client::new(source, retry)?;
    let name = match &source.target {
        LockTarget::Name(name) | LockTarget::Pool(name) => name.clone(),
        LockTarget::BoshDirector(url) => {
            log!("determining the lock name from the BOSH director at {url}");
            let name = client.bosh_director_name(url).await?;
            check_lock_name("the BOSH director's name", &name)?;
            log!("using the director's name {name:?} as the lock name");
            name
        }
    };
    Ok((client, name))
}

/// `check`: the current version of this one lock. Concourse adds it if it is new.
pub async fn check(input: &str, retry: RetryPolicy) -> Result<Value, ResourceError> {
    // The version's kind depends on `source`: read it once that is known.
    let request: CheckRequest<Value> = parse_request(input)?;
    let source = read_source(&request.source)?;
    if let LockTarget::Pool(pool) = &source.target {
        return pool_commands::check(input, &source, pool, retry).await;
    }
    let (client, name) = connect(&source, retry).await?;
    if source.trigger == Some(Trigger::Released) {
        return trigger::check(&client, &name, request.version.as_ref()).await;
    }
    let request = CheckRequest {
        source: request.source,
        version: typed_version(request.version)?,
    };
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
pub async fn fetch(
    input: &str,
    directory: &Path,
    retry: RetryPolicy,
) -> Result<Value, ResourceError> {
    let request: InRequest<Value> = parse_request(input)?;
    let source = read_source(&request.source)?;
    if let LockTarget::Pool(pool) = &source.target {
        return pool_commands::fetch(input, directory, &source, pool, retry).await;
    }
    let (client, name) = connect(&source, retry).await?;
    let (params, warnings) = parse_in_params(&request.params)?;
    warn_all(warnings);
    if params.wait {
        wait_until_free(&client, &source, &name, params.wait_timeout).await?;
    }
    // A release (`source.trigger`); a `put`'s version of the same resource is a state.
    if let (Some(version), Some(id)) = (
        &request.version,
        trigger::event_id(request.version.as_ref())?,
    ) {
        return trigger::fetch(&client, &name, version, id, directory).await;
    }
    let request = InRequest {
        source: request.source,
        version: typed_version(request.version)?,
        params: request.params,
    };
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

    std::fs::create_dir_all(directory).map_err(|source| ResourceError::CreateDirectory {
        path: directory.to_path_buf(),
        source,
    })?;
    let (key, locked_by, status) = match &holding {
        Some(h) => {
            let mut status = h.raw.clone();
            status.insert("name".into(), json!(name));
            (
                h.holder.key.clone(),
                json!(h.holder.locked_by),
                Value::Object(status),
            )
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
    serde_json::to_value(response).map_err(ResourceError::Encode)
}

/// A lock state's version, from the request's JSON.
fn typed_version(version: Option<Value>) -> Result<Option<Version>, ResourceError> {
    version
        .map(serde_json::from_value::<Version>)
        .transpose()
        .map_err(ResourceError::Request)
}

pub(crate) fn write(directory: &Path, file: &str, content: &str) -> Result<(), ResourceError> {
    let path = directory.join(file);
    std::fs::write(&path, content).map_err(|source| ResourceError::Write { path, source })
}

/// `out`: locks or unlocks (with `source.pool`, what pool-resource's params say, with the
/// directories they name under `sources`).
pub async fn put(
    input: &str,
    sources: &Path,
    build: &BuildEnv,
    retry: RetryPolicy,
    abort: &Abort,
) -> Result<Value, ResourceError> {
    let request: OutRequest = parse_request(input)?;
    let source = read_source(&request.source)?;
    if let LockTarget::Pool(pool) = &source.target {
        return pool_commands::put(&request, sources, &source, pool, build, retry, abort).await;
    }
    // Params before any network call: a missing key is reported at once.
    let (params, warnings) = OutParams::parse(&request.params)?;
    warn_all(warnings);
    let (client, name) = connect(&source, retry).await?;
    let response = match params.op {
        LockOp::Lock => lock(&client, &source, &name, &params, build, abort).await?,
        LockOp::Unlock => unlock(&client, &name, &params).await?,
        LockOp::Wait => {
            let started = Instant::now();
            wait_until_free(&client, &source, &name, params.wait_timeout).await?;
            VersionResponse {
                version: version_of(None),
                metadata: vec![
                    MetadataField::new("lock", &name),
                    MetadataField::new("waited", since(started)),
                ],
            }
        }
    };
    serde_json::to_value(response).map_err(ResourceError::Encode)
}

/// The body of a lock or unlock request: as the original resource sent it, plus holder info and
/// the lease for a lock.
fn request_body(params: &OutParams, build: Option<&BuildEnv>) -> LockRequest {
    let with_build = |wanted: bool| build.is_some() && wanted;
    LockRequest {
        key: params.key.clone(),
        requestor: params.locked_by.clone(),
        info: build.map(BuildEnv::info).filter(|info| !info.is_empty()),
        ttl: params.ttl.map(WireDuration),
        slots: params.slots.filter(|_| build.is_some()),
        release_when_build_ends: with_build(params.release_when_build_ends),
        ..LockRequest::default()
    }
}

/// Takes the lock: a first try that does not wait (so the log names the holder at once), then
/// long-polls of `wait_poll` each until granted, or sleeps of `retry_interval` between tries
/// against a server that does not long-poll. `main` races this future against SIGTERM and
/// SIGINT.
async fn lock(
    client: &Client,
    source: &Source,
    name: &str,
    params: &OutParams,
    build: &BuildEnv,
    abort: &Abort,
) -> Result<VersionResponse, ResourceError> {
    let body = request_body(params, Some(build));
    let requestor = params
        .locked_by
        .clone()
        .unwrap_or_else(|| params.key.clone());
    warn_if_build_unknown(params.release_when_build_ends, build);
    if let Some(slots) = params.slots {
        log!("lock {name:?} is a semaphore of {slots} slots");
    }
    let started = Instant::now();
    log!(
        "acquiring lock {name:?} with key {:?} as {requestor:?}",
        params.key
    );
    let target = Target::lock(name);
    let request = acquire::Request {
        target: &target,
        body: &body,
        deadline: params.wait_timeout.map(|timeout| started + timeout),
        poll: source.wait_poll,
        fallback_pause: source.retry_interval,
    };
    let mut waiting = Waiting::new(client, &target, started, source);
    let outcome = acquire::acquire(client.shared(), &request, abort, &mut waiting)
        .await
        .map_err(ClientError::from)?;
    let granted = match outcome {
        Outcome::Granted(reply) => reply,
        Outcome::TimedOut(_) => {
            return Err(ResourceError::GaveUp {
                name: name.to_string(),
                free: false,
                waited: since(started),
                holder: waiting.holder,
            });
        }
        Outcome::Refused(reply) if reply.status == StatusCode::CONFLICT => {
            return Err(ResourceError::SlotsDiffer {
                name: name.to_string(),
                message: reply.error_message(),
            });
        }
        Outcome::Refused(reply) => {
            return Err(ResourceError::Refused {
                action: "lock",
                name: name.to_string(),
                status: reply.status,
                message: reply.error_message(),
            });
        }
    };

    let generation = granted
        .parse::<LockGrant>()
        .and_then(|grant| grant.generation)
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

/// With `release_when_build_ends`, says when the build's identity is unknown.
pub(crate) fn warn_if_build_unknown(release_when_build_ends: bool, build: &BuildEnv) {
    if release_when_build_ends && build.build_url().is_none() && build.build_id.is_none() {
        log!(
            "warning: release_when_build_ends is set but the build's identity (BUILD_* and \
             ATC_EXTERNAL_URL) is unknown: the server cannot tell when the build ends"
        );
    }
}

/// The resource's part in the shared acquire loop: a log line naming the holder each round,
/// one line when the server turns out not to long-poll. The resource's client already rides
/// out an unreachable server with its own retries.
pub(crate) struct Waiting<'a> {
    client: &'a Client,
    target: &'a Target,
    started: Instant,
    retry_interval: Duration,
    told_fallback: bool,
    /// The holder as last described, for the message when time runs out.
    pub holder: String,
}

impl<'a> Waiting<'a> {
    pub fn new(client: &'a Client, target: &'a Target, started: Instant, source: &Source) -> Self {
        Waiting {
            client,
            target,
            started,
            retry_interval: source.retry_interval,
            told_fallback: false,
            holder: String::new(),
        }
    }
}

impl acquire::Hooks for Waiting<'_> {
    async fn held(&mut self, reply: &Reply, _out_of_time: bool) {
        let message = reply.error_message();
        let line = match self.target {
            Target::Lock(name) => {
                self.holder = match self.client.holding(name).await {
                    Ok(Some(holding)) => holding.describe(SystemTime::now()),
                    Ok(None) => format!(
                        "nobody GET /locks lists (freed just now? the server said: {message})"
                    ),
                    Err(e) => format!("an unknown holder ({e}; the server said: {message})"),
                };
                format!("lock {name:?} is held by {}", self.holder)
            }
            Target::Pool { pool, item } => {
                let (line, holder) =
                    pool_commands::describe_wait(self.client, pool, item.as_deref(), &message)
                        .await;
                self.holder = holder;
                line
            }
        };
        log!("{line}; waited {} so far", since(self.started));
    }

    fn answered_at_once(&mut self) {
        if !self.told_fallback {
            log!(
                "the server answered at once instead of waiting (no long-poll support, e.g. \
                 the original locker): trying again every {}",
                humantime::format_duration(self.retry_interval)
            );
            self.told_fallback = true;
        }
    }
}

/// `lock_op: wait`: returns once the lock is free, holding nothing, through the one wait loop.
/// Long-polls `GET /lock/{name}?wait_free=`; against a server without it (no `"free"` in the
/// answer) reads `GET /locks` every `retry_interval` instead.
async fn wait_until_free(
    client: &Client,
    source: &Source,
    name: &str,
    wait_timeout: Option<Duration>,
) -> Result<(), ResourceError> {
    let started = Instant::now();
    let schedule = Schedule {
        deadline: wait_timeout.map(|timeout| started + timeout),
        poll: source.wait_poll,
        fallback_pause: source.retry_interval,
    };
    let mut waiter = FreeWaiter {
        client,
        name,
        started,
        retry_interval: source.retry_interval,
        told_fallback: false,
    };
    log!("waiting until lock {name:?} is free (taking nothing)");
    match wait::until(&schedule, &mut waiter).await? {
        Waited::Done(()) => {
            log!("lock {name:?} is free after {}", since(started));
            Ok(())
        }
        Waited::TimedOut(holder) => Err(ResourceError::GaveUp {
            name: name.to_string(),
            free: true,
            waited: since(started),
            holder,
        }),
    }
}

/// `lock_op: wait`'s questions; the state is the holder, described.
struct FreeWaiter<'a> {
    client: &'a Client,
    name: &'a str,
    started: Instant,
    retry_interval: Duration,
    told_fallback: bool,
}

impl Waiter for FreeWaiter<'_> {
    type Done = ();
    type State = String;
    type Error = ResourceError;

    async fn ask(&mut self, wait: Option<Duration>) -> Result<Round<(), String>, ResourceError> {
        let name = self.name;
        // The first question does not wait, so the log names the holder straight away.
        let reply = self
            .client
            .wait_free(name, wait.unwrap_or_default())
            .await?;
        let free = match reply.status {
            StatusCode::OK => reply.parse::<LockStatus>().and_then(|status| status.free),
            _ => None,
        };
        let (free, holder) = match free {
            Some(true) => (true, None),
            Some(false) => (false, Holding::from_entry(&reply.body)),
            None => {
                if !self.told_fallback {
                    log!(
                        "the server cannot wait until a lock is free (no ?wait_free): \
                         checking every {}",
                        humantime::format_duration(self.retry_interval)
                    );
                    self.told_fallback = true;
                }
                let holding = self.client.holding(name).await?;
                (holding.is_none(), holding)
            }
        };
        if free {
            return Ok(Round::Done(()));
        }
        Ok(Round::NotYet {
            state: holder
                .map(|h| h.describe(SystemTime::now()))
                .unwrap_or_else(|| "someone".to_string()),
            // A server that says "held" without waiting must not be asked again at once.
            at_once: self.told_fallback || answered_at_once(wait, reply.elapsed, ""),
        })
    }

    async fn not_yet(&mut self, holder: &String, _out_of_time: bool) {
        log!(
            "lock {:?} is held by {holder}; waited {} so far",
            self.name,
            since(self.started)
        );
    }
}

/// What we know of the holding we were just granted, when the server cannot tell us.
fn own_holding(params: &OutParams, requestor: &str, generation: &str) -> Holding {
    let mut entry = json!({"key": params.key, "locked_by": {requestor: 1}});
    if let Ok(generation) = generation.parse::<u64>() {
        entry["generation"] = json!(generation);
    }
    // The entry above is always a held lock.
    Holding::from_entry(&entry).unwrap_or(Holding {
        holder: Holder {
            key: params.key.clone(),
            locked_by: [(requestor.to_string(), 1)].into(),
            ..Holder::default()
        },
        raw: Map::new(),
    })
}

/// Releases the lock (by force when asked).
async fn unlock(
    client: &Client,
    name: &str,
    params: &OutParams,
) -> Result<VersionResponse, ResourceError> {
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
            return Err(ResourceError::NotHolder {
                name: name.to_string(),
                key: params.key.clone(),
                message: reply.error_message(),
            });
        }
        status => {
            return Err(ResourceError::Refused {
                action: "unlock",
                name: name.to_string(),
                status,
                message: reply.error_message(),
            });
        }
    }
    if let Some(released) = reply.parse::<LockReleased>()
        && !released.response.is_empty()
    {
        log!("{}", released.response);
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
                    .and_then(|h| h.holder.generation)
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
    fn request_bodies() {
        let params = OutParams {
            key: "k".into(),
            locked_by: None,
            op: LockOp::Lock,
            ttl: Some(Duration::from_secs(90)),
            force: false,
            wait_timeout: None,
            slots: Some(3),
            release_when_build_ends: true,
        };
        let build = BuildEnv {
            job: Some("deploy".into()),
            ..BuildEnv::default()
        };
        assert_eq!(
            serde_json::to_value(request_body(&params, Some(&build))).expect("json"),
            json!({"key": "k", "ttl": "90s", "info": {"job": "deploy"}, "slots": 3,
                "release_when_build_ends": true})
        );
        let unlock = OutParams {
            locked_by: Some("r".into()),
            op: LockOp::Unlock,
            ttl: None,
            ..params
        };
        assert_eq!(
            serde_json::to_value(request_body(&unlock, None)).expect("json"),
            json!({"key": "k", "requestor": "r"})
        );
    }
}
