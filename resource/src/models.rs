//! The Concourse resource protocol: requests read from stdin, responses written to stdout, the
//! `source` and `params` configurations, and their validation.
//!
//! `source` and `params` are read field by field from JSON rather than with a strict serde
//! derive, so that every error names its field (`source.wait_poll: ...`), loose types that
//! pipelines written for the original resource use (`skip_ssl_validation: "true"`, a numeric
//! `key`) are accepted, and unknown fields are reported as warnings instead of failures.

use std::collections::BTreeSet;
use std::time::Duration;

use locker_client::parse_duration;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use url::Url;

/// A configuration that cannot be used; each message names the field to fix, in one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A required field (or one of a set of them) is absent; `hint` says what it is for.
    #[error("{field} is required{hint}")]
    Missing {
        field: &'static str,
        hint: &'static str,
    },
    /// A field's value cannot be used: the wrong type, out of range, not a URL or a name.
    #[error("{field} {problem}")]
    Invalid { field: String, problem: String },
    /// Fields that do not go together, or one that does not apply to what the others ask.
    #[error("{field} {problem}")]
    Conflict { field: String, problem: String },
}

/// A version of the lock resource: an opaque reference to one state of one lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    #[serde(rename = "ref")]
    pub reference: String,
}

/// A version of a pool resource (`source.pool`); Concourse keeps every value a string.
///
/// `ref` identifies the pool's state (its items, their metadata and claims); `item` names the
/// item the version is about (the one a `put` acted on; for a version `check` found, the item
/// claimed last), and `key` and `generation` the claim of it when the version is a claim (an
/// `acquire`, `claim` or `add_claimed`): what `in` writes to `claim.json` so that a later
/// `release` can check the key. `at` is when the resource took the version, so that a pool
/// that returns to an earlier state (every item free again) is still a new version, as each
/// commit is with pool-resource; `check` compares `ref` only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolVersion {
    #[serde(rename = "ref")]
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
    /// RFC 3339, UTC, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

/// A version of a lock resource with `source.trigger: released`: one release of the lock
/// (`released`, `force-released`, `expired` or `reclaimed`), by the history's event id, with
/// its kind and time for the reader of the pipeline's versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventVersion {
    /// The event's id, as text (Concourse keeps every value of a version a string).
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// RFC 3339, UTC, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

/// What makes a new version of a lock resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `source.trigger: released`: each release of the lock, from its history.
    Released,
}

/// One metadata entry. Concourse requires both to be strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetadataField {
    pub name: String,
    pub value: String,
}

impl MetadataField {
    pub fn new(name: &str, value: impl Into<String>) -> Self {
        MetadataField {
            name: name.to_string(),
            value: value.into(),
        }
    }
}

/// `check`'s request; `V` is the version's type ([`Version`] of a lock, [`PoolVersion`]).
#[derive(Debug, Deserialize)]
pub struct CheckRequest<V = Version> {
    #[serde(default)]
    pub source: Value,
    #[serde(default = "none")]
    pub version: Option<V>,
}

/// `in`'s request.
#[derive(Debug, Deserialize)]
pub struct InRequest<V = Version> {
    #[serde(default)]
    pub source: Value,
    #[serde(default = "none")]
    pub version: Option<V>,
    #[serde(default)]
    pub params: Value,
}

fn none<V>() -> Option<V> {
    None
}

/// `out`'s request.
#[derive(Debug, Deserialize)]
pub struct OutRequest {
    #[serde(default)]
    pub source: Value,
    #[serde(default)]
    pub params: Value,
}

/// The response of `in` and `out`.
#[derive(Debug, Serialize)]
pub struct VersionResponse<V = Version> {
    pub version: V,
    pub metadata: Vec<MetadataField>,
}

/// Which lock (or pool) the resource is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockTarget {
    /// `source.lock_name`.
    Name(String),
    /// `source.bosh_lock`: the lock is named after this BOSH director (`GET {url}/info`).
    BoshDirector(Url),
    /// `source.pool`: the resource is about this pool's items, with pool-resource's params
    /// (see `pool_commands.rs`).
    Pool(String),
}

/// A validated `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub locker_uri: Url,
    /// Basic-auth credentials, both or neither.
    pub credentials: Option<(String, String)>,
    /// PEM text of one or more CA certificates, trusted besides the system's.
    pub ca_cert: Option<String>,
    pub skip_ssl_validation: bool,
    pub target: LockTarget,
    /// Long-poll length asked of the server per acquire request.
    pub wait_poll: Duration,
    /// Sleep between tries against a server that does not long-poll.
    pub retry_interval: Duration,
    /// Deadline of one HTTP request, on top of the long-poll wait it asks for.
    pub request_timeout: Duration,
    /// `source.trigger`: versions are the lock's releases instead of its states.
    pub trigger: Option<Trigger>,
}

pub const DEFAULT_WAIT_POLL: Duration = Duration::from_secs(60);
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

const SOURCE_FIELDS: &[&str] = &[
    "locker_uri",
    "username",
    "password",
    "ca_cert",
    "skip_ssl_validation",
    "lock_name",
    "bosh_lock",
    "pool",
    "wait_poll",
    "retry_interval",
    "request_timeout",
    "trigger",
];

/// `source` as given: typed, not yet checked for required or contradictory fields.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RawSource {
    pub locker_uri: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca_cert: Option<String>,
    pub skip_ssl_validation: Option<bool>,
    pub lock_name: Option<String>,
    pub bosh_lock: Option<String>,
    pub pool: Option<String>,
    pub wait_poll: Option<Duration>,
    pub retry_interval: Option<Duration>,
    pub request_timeout: Option<Duration>,
    pub trigger: Option<String>,
}

impl RawSource {
    /// Reads `source`, returning it with a warning for each unknown field.
    pub fn parse(value: &Value) -> Result<(RawSource, Vec<String>), ConfigError> {
        let fields = Fields::new("source", value)?;
        let raw = RawSource {
            locker_uri: fields.string("locker_uri")?,
            username: fields.string("username")?,
            password: fields.string("password")?,
            ca_cert: fields.string("ca_cert")?,
            skip_ssl_validation: fields.boolean("skip_ssl_validation")?,
            lock_name: fields.string("lock_name")?,
            bosh_lock: fields.string("bosh_lock")?,
            pool: fields.string("pool")?,
            wait_poll: fields.duration("wait_poll")?,
            retry_interval: fields.duration("retry_interval")?,
            request_timeout: fields.duration("request_timeout")?,
            trigger: fields.string("trigger")?,
        };
        Ok((raw, fields.unknown(SOURCE_FIELDS)))
    }

    /// Checks required and contradictory fields and applies defaults.
    pub fn validate(self) -> Result<Source, ConfigError> {
        let locker_uri = self
            .locker_uri
            .ok_or_else(|| missing("source.locker_uri", " (the locker server's URL)"))?;
        let locker_uri = http_url("source.locker_uri", &locker_uri)?;
        let credentials = match (self.username, self.password) {
            (Some(user), Some(password)) => Some((user, password)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(conflict(
                    "source.username",
                    "is set without source.password",
                ));
            }
            (None, Some(_)) => {
                return Err(conflict(
                    "source.password",
                    "is set without source.username",
                ));
            }
        };
        let target = match (self.lock_name, self.bosh_lock, self.pool) {
            (Some(name), None, None) => {
                check_lock_name("source.lock_name", &name)?;
                LockTarget::Name(name)
            }
            (None, Some(url), None) => {
                LockTarget::BoshDirector(http_url("source.bosh_lock", &url)?)
            }
            (None, None, Some(pool)) => {
                check_name("source.pool", &pool, "pool")?;
                LockTarget::Pool(pool)
            }
            (None, None, None) => {
                return Err(missing(
                    "source.lock_name or source.bosh_lock",
                    " (which lock to use), or source.pool (which pool's items)",
                ));
            }
            (Some(_), Some(_), _) => {
                return Err(conflict(
                    "source.lock_name and source.bosh_lock",
                    "are both set: set exactly one",
                ));
            }
            (lock_name, _, Some(_)) => {
                let other = match lock_name {
                    Some(_) => "source.lock_name",
                    None => "source.bosh_lock",
                };
                return Err(conflict(
                    format!("source.pool and {other}"),
                    "are both set: a resource is about one pool or one lock",
                ));
            }
        };
        let trigger = match self.trigger.as_deref() {
            None => None,
            Some("released") if matches!(target, LockTarget::Pool(_)) => {
                return Err(conflict(
                    "source.trigger",
                    "applies to a lock (source.lock_name or source.bosh_lock), not to source.pool",
                ));
            }
            Some("released") => Some(Trigger::Released),
            Some(other) => {
                return Err(invalid(
                    "source.trigger",
                    format!(
                        "can only be \"released\" (a version for each release of the lock), \
                         not {other:?}"
                    ),
                ));
            }
        };
        if let Some(pem) = &self.ca_cert
            && !pem.contains("-----BEGIN CERTIFICATE-----")
        {
            return Err(invalid(
                "source.ca_cert",
                "does not contain a PEM certificate (-----BEGIN CERTIFICATE-----)",
            ));
        }
        Ok(Source {
            locker_uri,
            credentials,
            ca_cert: self.ca_cert,
            skip_ssl_validation: self.skip_ssl_validation.unwrap_or(false),
            target,
            wait_poll: positive("source.wait_poll", self.wait_poll, DEFAULT_WAIT_POLL)?,
            retry_interval: positive(
                "source.retry_interval",
                self.retry_interval,
                DEFAULT_RETRY_INTERVAL,
            )?,
            request_timeout: positive(
                "source.request_timeout",
                self.request_timeout,
                DEFAULT_REQUEST_TIMEOUT,
            )?,
            trigger,
        })
    }
}

impl Source {
    /// Reads and validates `source`; unknown fields come back as warnings.
    pub fn parse(value: &Value) -> Result<(Source, Vec<String>), ConfigError> {
        let (raw, warnings) = RawSource::parse(value)?;
        Ok((raw.validate()?, warnings))
    }
}

/// `params.lock_op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOp {
    Lock,
    Unlock,
    /// Wait until the lock is free, holding nothing.
    Wait,
}

/// Validated `out` params.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutParams {
    /// Empty for `lock_op: wait`, which takes no key.
    pub key: String,
    /// The requestor; the server defaults it to the key.
    pub locked_by: Option<String>,
    pub op: LockOp,
    /// Lease: the server releases the holding after this long (lock only).
    pub ttl: Option<Duration>,
    /// Release the lock whatever its key (unlock only).
    pub force: bool,
    /// Give up waiting after this long (lock and wait only).
    pub wait_timeout: Option<Duration>,
    /// Semaphore: the number of holders with distinct keys the lock admits (lock only).
    pub slots: Option<u32>,
    /// Ask the server to release the holding once this build has finished (lock only).
    pub release_when_build_ends: bool,
}

const OUT_FIELDS: &[&str] = &[
    "key",
    "locked_by",
    "lock_op",
    "ttl",
    "force",
    "wait_timeout",
    "slots",
    "release_when_build_ends",
];

impl OutParams {
    /// Reads and validates `params` of `out`; unknown fields come back as warnings.
    pub fn parse(value: &Value) -> Result<(OutParams, Vec<String>), ConfigError> {
        let fields = Fields::new("params", value)?;
        let key = fields.string("key")?;
        let locked_by = fields.string("locked_by")?;
        let op = fields.string("lock_op")?;
        let ttl = fields.duration("ttl")?;
        let force = fields.boolean("force")?;
        let wait_timeout = fields.duration("wait_timeout")?;
        let slots = fields.integer("slots")?;
        let release_when_build_ends = fields.boolean("release_when_build_ends")?;
        let warnings = fields.unknown(OUT_FIELDS);

        let op = match op.as_deref() {
            Some("lock") => LockOp::Lock,
            Some("unlock") => LockOp::Unlock,
            Some("wait") => LockOp::Wait,
            Some(other) => {
                return Err(invalid(
                    "params.lock_op",
                    format!("must be \"lock\", \"unlock\" or \"wait\", not {other:?}"),
                ));
            }
            None if key.is_none() => {
                return Err(missing(
                    "params.key",
                    " (the key to lock or unlock the lock with)",
                ));
            }
            None => {
                return Err(missing(
                    "params.lock_op",
                    ": \"lock\", \"unlock\" or \"wait\"",
                ));
            }
        };
        let key = match (op, key) {
            (LockOp::Wait, key) => key.unwrap_or_default(),
            (_, Some(key)) => key,
            (_, None) => {
                return Err(missing(
                    "params.key",
                    " (the key to lock or unlock the lock with)",
                ));
            }
        };
        let force = force.unwrap_or(false);
        let release_when_build_ends = release_when_build_ends.unwrap_or(false);
        let only = |field: &str, ops: &str| {
            Err(conflict(
                format!("params.{field}"),
                format!("applies only to {ops}"),
            ))
        };
        match op {
            LockOp::Lock | LockOp::Wait if force => {
                return Err(conflict(
                    "params.force",
                    "applies only to lock_op: unlock (a lock cannot be taken by force)",
                ));
            }
            LockOp::Unlock | LockOp::Wait if ttl.is_some() => {
                return only("ttl", "lock_op: lock");
            }
            LockOp::Unlock if wait_timeout.is_some() => {
                return only("wait_timeout", "lock_op: lock or wait");
            }
            LockOp::Unlock | LockOp::Wait if slots.is_some() => {
                return only("slots", "lock_op: lock");
            }
            LockOp::Unlock | LockOp::Wait if release_when_build_ends => {
                return only("release_when_build_ends", "lock_op: lock");
            }
            _ => {}
        }
        if wait_timeout == Some(Duration::ZERO) {
            return Err(invalid(
                "params.wait_timeout",
                "must be more than 0 (leave it out to wait without limit)",
            ));
        }
        let slots = match slots {
            None => None,
            Some(n) if (1..=u64::from(u32::MAX)).contains(&n) => Some(n as u32),
            Some(_) => {
                return Err(invalid(
                    "params.slots",
                    "must be at least 1 (the number of holders the lock admits)",
                ));
            }
        };
        Ok((
            OutParams {
                key,
                locked_by,
                op,
                // 0 means no lease, as on the server.
                ttl: ttl.filter(|t| !t.is_zero()),
                force,
                wait_timeout,
                slots,
                release_when_build_ends,
            },
            warnings,
        ))
    }
}

/// What a pool `put` does: pool-resource's params, one per put. The directories are relative to
/// the build's directory `out` is given (a step's name, or a task's output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolOp {
    /// `acquire: true`: claim any free item, waiting for one.
    Acquire,
    /// `claim: NAME`: claim this item, waiting until it is free.
    Claim(String),
    /// `release: DIR`: release the item named in `DIR/name`.
    Release(String),
    /// `add: DIR`: add `DIR/name` with `DIR/metadata`, unclaimed.
    Add(String),
    /// `add_claimed: DIR`: the same, claimed by this build.
    AddClaimed(String),
    /// `remove: DIR`: remove the item named in `DIR/name`, claimed or not.
    Remove(String),
    /// `update: DIR`: replace the metadata (adding the item if absent), waiting while claimed.
    Update(String),
    /// `check: DIR`: wait until the item is unclaimed.
    Check(String),
    /// `check_unclaimed: DIR`: wait until the item is claimed.
    CheckUnclaimed(String),
}

impl PoolOp {
    /// The param's name.
    pub fn param(&self) -> &'static str {
        match self {
            PoolOp::Acquire => "acquire",
            PoolOp::Claim(_) => "claim",
            PoolOp::Release(_) => "release",
            PoolOp::Add(_) => "add",
            PoolOp::AddClaimed(_) => "add_claimed",
            PoolOp::Remove(_) => "remove",
            PoolOp::Update(_) => "update",
            PoolOp::Check(_) => "check",
            PoolOp::CheckUnclaimed(_) => "check_unclaimed",
        }
    }

    /// Whether it claims an item (and so takes `ttl` and `release_when_build_ends`).
    pub fn claims(&self) -> bool {
        matches!(
            self,
            PoolOp::Acquire | PoolOp::Claim(_) | PoolOp::AddClaimed(_)
        )
    }

    /// Whether it may wait (and so takes `wait_timeout`).
    pub fn waits(&self) -> bool {
        matches!(
            self,
            PoolOp::Acquire
                | PoolOp::Claim(_)
                | PoolOp::Update(_)
                | PoolOp::Check(_)
                | PoolOp::CheckUnclaimed(_)
        )
    }
}

/// Validated `out` params of a pool resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolOutParams {
    pub op: PoolOp,
    /// Lease of a claim: the server releases it after this long.
    pub ttl: Option<Duration>,
    /// Ask the server to release the claim once this build has finished.
    pub release_when_build_ends: bool,
    /// Give up waiting after this long.
    pub wait_timeout: Option<Duration>,
}

/// pool-resource's params, each naming one operation.
const POOL_OPS: &[&str] = &[
    "acquire",
    "claim",
    "release",
    "add",
    "add_claimed",
    "remove",
    "update",
    "check",
    "check_unclaimed",
];

const POOL_OUT_EXTRAS: &[&str] = &["ttl", "release_when_build_ends", "wait_timeout"];

/// The operation of a param that names a directory or an item.
type DirOp = fn(String) -> PoolOp;

impl PoolOutParams {
    /// Reads and validates `params` of a pool's `out`; unknown fields come back as warnings.
    pub fn parse(value: &Value) -> Result<(PoolOutParams, Vec<String>), ConfigError> {
        let fields = Fields::new("params", value)?;
        let mut ops = Vec::new();
        if fields.boolean("acquire")? == Some(true) {
            ops.push(PoolOp::Acquire);
        }
        let paths: [(&str, DirOp); 8] = [
            ("claim", PoolOp::Claim),
            ("release", PoolOp::Release),
            ("add", PoolOp::Add),
            ("add_claimed", PoolOp::AddClaimed),
            ("remove", PoolOp::Remove),
            ("update", PoolOp::Update),
            ("check", PoolOp::Check),
            ("check_unclaimed", PoolOp::CheckUnclaimed),
        ];
        for (name, op) in paths {
            if let Some(value) = fields.string(name)? {
                ops.push(op(value));
            }
        }
        let ttl = fields.duration("ttl")?;
        let release_when_build_ends = fields.boolean("release_when_build_ends")?.unwrap_or(false);
        let wait_timeout = fields.duration("wait_timeout")?;
        let known: Vec<&str> = POOL_OPS.iter().chain(POOL_OUT_EXTRAS).copied().collect();
        let warnings = fields.unknown(&known);

        let op = match ops.as_slice() {
            [op] => op.clone(),
            [] => {
                return Err(missing(
                    "params: one of acquire: true, claim, release, add, add_claimed, remove, \
                     update, check or check_unclaimed",
                    " (source.pool is set: the params are pool-resource's)",
                ));
            }
            [first, second, ..] => {
                return Err(conflict(
                    format!("params.{} and params.{}", first.param(), second.param()),
                    "are both set: a put does one thing to the pool",
                ));
            }
        };
        if let PoolOp::Claim(item) = &op {
            check_name("params.claim", item, "item")?;
        }
        let only = |field: &str, params: &str| {
            Err(conflict(
                format!("params.{field}"),
                format!("applies only to {params}, not to {}", op.param()),
            ))
        };
        if !op.claims() && ttl.is_some() {
            return only("ttl", "acquire, claim and add_claimed");
        }
        if !op.claims() && release_when_build_ends {
            return only("release_when_build_ends", "acquire, claim and add_claimed");
        }
        if !op.waits() && wait_timeout.is_some() {
            return only(
                "wait_timeout",
                "acquire, claim, update, check and check_unclaimed",
            );
        }
        if wait_timeout == Some(Duration::ZERO) {
            return Err(invalid(
                "params.wait_timeout",
                "must be more than 0 (leave it out to wait without limit)",
            ));
        }
        Ok((
            PoolOutParams {
                op,
                // 0 means no lease, as on the server.
                ttl: ttl.filter(|t| !t.is_zero()),
                release_when_build_ends,
                wait_timeout,
            },
            warnings,
        ))
    }
}

/// Reads a pool's `in` params: it takes none; pool-resource's `depth` (of its git clone) is
/// accepted and means nothing here. Unknown fields come back as warnings.
pub fn parse_pool_in_params(value: &Value) -> Result<Vec<String>, ConfigError> {
    let fields = Fields::new("params", value)?;
    Ok(fields.unknown(&["depth"]))
}

/// Validated `in` (`get`) params.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InParams {
    /// `lock_op: wait`: wait until the lock is free before writing its state.
    pub wait: bool,
    /// Give up waiting after this long.
    pub wait_timeout: Option<Duration>,
}

const IN_FIELDS: &[&str] = &["lock_op", "wait_timeout"];

/// Reads `in`'s params; unknown fields come back as warnings.
pub fn parse_in_params(value: &Value) -> Result<(InParams, Vec<String>), ConfigError> {
    let fields = Fields::new("params", value)?;
    let op = fields.string("lock_op")?;
    let wait_timeout = fields.duration("wait_timeout")?;
    let warnings = fields.unknown(IN_FIELDS);
    let wait = match op.as_deref() {
        None => false,
        Some("wait") => true,
        Some(other) => {
            return Err(invalid(
                "params.lock_op",
                format!(
                    "of a get can only be \"wait\" (wait until the lock is free), not {other:?}"
                ),
            ));
        }
    };
    if wait_timeout.is_some() && !wait {
        return Err(conflict(
            "params.wait_timeout",
            "applies only to lock_op: wait",
        ));
    }
    if wait_timeout == Some(Duration::ZERO) {
        return Err(invalid(
            "params.wait_timeout",
            "must be more than 0 (leave it out to wait without limit)",
        ));
    }
    Ok((InParams { wait, wait_timeout }, warnings))
}

fn missing(field: &'static str, hint: &'static str) -> ConfigError {
    ConfigError::Missing { field, hint }
}

pub(crate) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

fn conflict(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Conflict {
        field: field.into(),
        problem: problem.into(),
    }
}

fn http_url(field: &str, text: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(text.trim())
        .map_err(|e| invalid(field, format!("is not a valid URL ({e}): {text:?}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid(
            field,
            format!("must be an http:// or https:// URL with a host, not {text:?}"),
        ));
    }
    Ok(url)
}

/// Names that cannot be put in a URL path: `.` and `..` are path segments, not names.
pub fn check_lock_name(field: &str, name: &str) -> Result<(), ConfigError> {
    check_name(field, name, "lock")
}

/// [`check_lock_name`] for a lock, pool or item name (`what`).
pub fn check_name(field: &str, name: &str, what: &str) -> Result<(), ConfigError> {
    if name == "." || name == ".." {
        return Err(invalid(
            field,
            format!("{name:?} cannot be used as a {what} name"),
        ));
    }
    Ok(())
}

fn positive(
    field: &str,
    value: Option<Duration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(d) if d.is_zero() => Err(invalid(field, "must be more than 0")),
        Some(d) => Ok(d),
    }
}

/// Reads the fields of one JSON object (`source` or `params`), remembering which are known.
struct Fields<'a> {
    section: &'static str,
    map: Option<&'a Map<String, Value>>,
}

impl<'a> Fields<'a> {
    fn new(section: &'static str, value: &'a Value) -> Result<Self, ConfigError> {
        match value {
            Value::Null => Ok(Fields { section, map: None }),
            Value::Object(map) => Ok(Fields {
                section,
                map: Some(map),
            }),
            other => Err(invalid(
                section,
                format!("must be an object, not {}", kind(other)),
            )),
        }
    }

    /// The field's full name, e.g. `source.wait_poll`.
    fn field(&self, name: &str) -> String {
        format!("{}.{name}", self.section)
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map
            .and_then(|map| map.get(name))
            .filter(|v| !v.is_null())
    }

    /// A string; numbers and booleans are taken as their text; empty means absent (as `jq //
    /// ""` made it in the original resource).
    fn string(&self, name: &str) -> Result<Option<String>, ConfigError> {
        let text = match self.get(name) {
            None => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(other) => {
                return Err(invalid(
                    self.field(name),
                    format!("must be a string, not {}", kind(other)),
                ));
            }
        };
        Ok(Some(text).filter(|t| !t.is_empty()))
    }

    /// A boolean, also given as the string "true" or "false".
    fn boolean(&self, name: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) if s == "true" => Ok(Some(true)),
            Some(Value::String(s)) if s == "false" => Ok(Some(false)),
            Some(other) => Err(invalid(
                self.field(name),
                format!("must be true or false, not {other}"),
            )),
        }
    }

    /// A whole number, also given as a string of digits.
    fn integer(&self, name: &str) -> Result<Option<u64>, ConfigError> {
        let parsed = match self.get(name) {
            None => return Ok(None),
            Some(Value::String(s)) if s.is_empty() => return Ok(None),
            Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
            Some(Value::Number(n)) => n.as_u64(),
            Some(_) => None,
        };
        match parsed {
            Some(n) => Ok(Some(n)),
            None => Err(invalid(
                self.field(name),
                format!(
                    "must be a whole number, not {}",
                    self.get(name).map(Value::to_string).unwrap_or_default()
                ),
            )),
        }
    }

    /// A duration: a string as [`parse_duration`] reads it, or a number of seconds.
    fn duration(&self, name: &str) -> Result<Option<Duration>, ConfigError> {
        let text = match self.get(name) {
            None => return Ok(None),
            Some(Value::String(s)) if s.is_empty() => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(other) => {
                return Err(invalid(
                    self.field(name),
                    format!("must be a duration such as \"30s\", not {}", kind(other)),
                ));
            }
        };
        parse_duration(&text)
            .map(Some)
            .map_err(|e| invalid(format!("{}:", self.field(name)), e.to_string()))
    }

    /// A warning for each field not in `known`.
    fn unknown(&self, known: &[&str]) -> Vec<String> {
        let known: BTreeSet<&str> = known.iter().copied().collect();
        self.map
            .into_iter()
            .flat_map(|map| map.keys())
            .filter(|name| !known.contains(name.as_str()))
            .map(|name| {
                format!(
                    "warning: ignoring unknown field {}.{name} (known: {})",
                    self.section,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.iter().copied().collect::<Vec<_>>().join(", ")
                    }
                )
            })
            .collect()
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source(value: Value) -> Result<Source, ConfigError> {
        Source::parse(&value).map(|(s, _)| s)
    }

    fn params(value: Value) -> Result<OutParams, ConfigError> {
        OutParams::parse(&value).map(|(p, _)| p)
    }

    #[test]
    fn minimal_source_gets_defaults() {
        let s = source(json!({"locker_uri": "http://l:3000", "lock_name": "prod"})).unwrap();
        assert_eq!(s.target, LockTarget::Name("prod".into()));
        assert_eq!(s.wait_poll, DEFAULT_WAIT_POLL);
        assert_eq!(s.retry_interval, DEFAULT_RETRY_INTERVAL);
        assert_eq!(s.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert!(!s.skip_ssl_validation);
        assert_eq!(s.credentials, None);
    }

    #[test]
    fn loose_types_of_the_original_are_accepted() {
        let s = source(json!({
            "locker_uri": "https://l", "lock_name": 42, "skip_ssl_validation": "true",
            "username": "u", "password": "p", "wait_poll": 5, "retry_interval": "1500ms",
            "request_timeout": "", "ca_cert": ""
        }))
        .unwrap();
        assert_eq!(s.target, LockTarget::Name("42".into()));
        assert!(s.skip_ssl_validation);
        assert_eq!(s.credentials, Some(("u".into(), "p".into())));
        assert_eq!(s.wait_poll, Duration::from_secs(5));
        assert_eq!(s.retry_interval, Duration::from_millis(1500));
        assert_eq!(s.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(s.ca_cert, None);
    }

    #[test]
    fn source_errors_name_their_field() {
        let cases = [
            (json!({"lock_name": "a"}), "source.locker_uri is required"),
            (
                json!({"locker_uri": "ftp://x", "lock_name": "a"}),
                "source.locker_uri must be",
            ),
            (
                json!({"locker_uri": "nope", "lock_name": "a"}),
                "source.locker_uri is not a valid URL",
            ),
            (
                json!({"locker_uri": "http://l"}),
                "source.lock_name or source.bosh_lock is required",
            ),
            (
                json!({"locker_uri": "http://l", "lock_name": "a", "bosh_lock": "https://d"}),
                "both set",
            ),
            (
                json!({"locker_uri": "http://l", "bosh_lock": "d:25555"}),
                "source.bosh_lock",
            ),
            (
                json!({"locker_uri": "http://l", "lock_name": "a", "username": "u"}),
                "source.username is set without source.password",
            ),
            (
                json!({"locker_uri": "http://l", "lock_name": "a", "password": "p"}),
                "source.password is set without source.username",
            ),
            (
                json!({"locker_uri": "http://l", "lock_name": "a", "skip_ssl_validation": "yes"}),
                "source.skip_ssl_validation must be true or false",
            ),
            (
                json!({"locker_uri": "http://l", "lock_name": "a", "wait_poll": "soon"}),
                "source.wait_poll:",
            ),
            (
                json!({"locker_uri": "http://l", "lock_name": "a", "wait_poll": "0s"}),
                "source.wait_poll must be more than 0",
            ),
            (
                json!({"locker_uri": "http://l", "lock_name": "a", "retry_interval": 0}),
                "source.retry_interval must be more than 0",
            ),
            (
                json!({"locker_uri": "http://l", "lock_name": "a", "ca_cert": "junk"}),
                "source.ca_cert",
            ),
            (
                json!({"locker_uri": "http://l", "lock_name": ".."}),
                "source.lock_name",
            ),
            (
                json!({"locker_uri": "http://l", "lock_name": ["a"]}),
                "source.lock_name must be a string",
            ),
            (json!("http://l"), "source must be an object"),
        ];
        for (value, expected) in cases {
            let err = source(value.clone()).expect_err(&value.to_string());
            assert!(
                err.to_string().contains(expected),
                "{value}: {err} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn unknown_source_fields_warn() {
        let (_, warnings) =
            Source::parse(&json!({"locker_uri": "http://l", "lock_name": "a", "lock_pool": "x"}))
                .unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("source.lock_pool"), "{warnings:?}");
    }

    #[test]
    fn out_params() {
        let p = params(
            json!({"key": "k", "lock_op": "lock", "locked_by": "r", "ttl": "1h",
            "wait_timeout": 30}),
        )
        .unwrap();
        assert_eq!(
            p,
            OutParams {
                key: "k".into(),
                locked_by: Some("r".into()),
                op: LockOp::Lock,
                ttl: Some(Duration::from_secs(3600)),
                force: false,
                wait_timeout: Some(Duration::from_secs(30)),
                slots: None,
                release_when_build_ends: false,
            }
        );
        let p = params(json!({"key": "k", "lock_op": "lock", "slots": "40",
            "release_when_build_ends": true}))
        .unwrap();
        assert_eq!((p.slots, p.release_when_build_ends), (Some(40), true));
        let p = params(json!({"lock_op": "wait", "wait_timeout": "5m"})).unwrap();
        assert_eq!((p.op, p.key.as_str()), (LockOp::Wait, ""));
        let p = params(json!({"key": "k", "lock_op": "unlock", "force": true})).unwrap();
        assert_eq!((p.op, p.force), (LockOp::Unlock, true));
        let p = params(json!({"key": "k", "lock_op": "lock", "ttl": 0})).unwrap();
        assert_eq!(p.ttl, None);
    }

    #[test]
    fn out_param_errors_name_their_field() {
        let cases = [
            (json!({"lock_op": "lock"}), "params.key is required"),
            (
                json!({"key": "", "lock_op": "lock"}),
                "params.key is required",
            ),
            (json!({"key": "k"}), "params.lock_op is required"),
            (
                json!({"key": "k", "lock_op": "grab"}),
                "params.lock_op must be",
            ),
            (
                json!({"key": "k", "lock_op": "lock", "force": true}),
                "params.force applies only",
            ),
            (
                json!({"key": "k", "lock_op": "unlock", "ttl": "1m"}),
                "params.ttl applies only",
            ),
            (
                json!({"key": "k", "lock_op": "unlock", "wait_timeout": "1m"}),
                "params.wait_timeout applies only",
            ),
            (
                json!({"key": "k", "lock_op": "lock", "wait_timeout": "0s"}),
                "params.wait_timeout must be more than 0",
            ),
            (
                json!({"key": "k", "lock_op": "lock", "ttl": "forever"}),
                "params.ttl:",
            ),
            (
                json!({"key": {"a": 1}, "lock_op": "lock"}),
                "params.key must be a string",
            ),
            (json!(null), "params.key is required"),
            (
                json!({"key": "k", "lock_op": "lock", "slots": 0}),
                "params.slots must be at least 1",
            ),
            (
                json!({"key": "k", "lock_op": "lock", "slots": "many"}),
                "params.slots must be a whole number",
            ),
            (
                json!({"key": "k", "lock_op": "unlock", "slots": 2}),
                "params.slots applies only",
            ),
            (
                json!({"key": "k", "lock_op": "unlock", "release_when_build_ends": true}),
                "params.release_when_build_ends applies only",
            ),
            (
                json!({"lock_op": "wait", "ttl": "1m"}),
                "params.ttl applies only",
            ),
        ];
        for (value, expected) in cases {
            let err = params(value.clone()).expect_err(&value.to_string());
            assert!(
                err.to_string().contains(expected),
                "{value}: {err} lacks {expected:?}"
            );
        }
    }

    fn pool_params(value: Value) -> Result<PoolOutParams, ConfigError> {
        PoolOutParams::parse(&value).map(|(p, _)| p)
    }

    #[test]
    fn pool_source() {
        let s = source(json!({"locker_uri": "http://l", "pool": "aws"})).unwrap();
        assert_eq!(s.target, LockTarget::Pool("aws".into()));
        let cases = [
            (
                json!({"locker_uri": "http://l", "pool": "aws", "lock_name": "a"}),
                "source.pool and source.lock_name are both set",
            ),
            (
                json!({"locker_uri": "http://l", "pool": "aws", "bosh_lock": "https://d"}),
                "source.pool and source.bosh_lock are both set",
            ),
            (
                json!({"locker_uri": "http://l", "pool": ".."}),
                "source.pool \"..\" cannot be used as a pool name",
            ),
            (json!({"locker_uri": "http://l"}), "or source.pool"),
        ];
        for (value, expected) in cases {
            let err = source(value.clone()).expect_err(&value.to_string());
            assert!(err.to_string().contains(expected), "{value}: {err}");
        }
    }

    #[test]
    fn trigger_released_is_for_locks_only() {
        let plain = source(json!({"locker_uri": "http://l", "lock_name": "prod"})).unwrap();
        assert_eq!(plain.trigger, None);
        let s =
            source(json!({"locker_uri": "http://l", "lock_name": "prod", "trigger": "released"}))
                .unwrap();
        assert_eq!(s.trigger, Some(Trigger::Released));
        let bosh =
            json!({"locker_uri": "http://l", "bosh_lock": "https://d", "trigger": "released"});
        assert_eq!(source(bosh).unwrap().trigger, Some(Trigger::Released));
        let cases = [
            (
                json!({"locker_uri": "http://l", "pool": "aws", "trigger": "released"}),
                "source.trigger applies to a lock",
            ),
            (
                json!({"locker_uri": "http://l", "lock_name": "p", "trigger": "acquired"}),
                "source.trigger can only be \"released\"",
            ),
        ];
        for (value, expected) in cases {
            let err = source(value.clone()).expect_err(&value.to_string());
            assert!(err.to_string().contains(expected), "{value}: {err}");
        }
    }

    #[test]
    fn pool_params_take_pool_resources_names() {
        let cases = [
            (json!({"acquire": true}), PoolOp::Acquire),
            (json!({"acquire": "true"}), PoolOp::Acquire),
            (json!({"claim": "env-1"}), PoolOp::Claim("env-1".into())),
            (json!({"release": "step"}), PoolOp::Release("step".into())),
            (json!({"add": "d"}), PoolOp::Add("d".into())),
            (json!({"add_claimed": "d"}), PoolOp::AddClaimed("d".into())),
            (json!({"remove": "step"}), PoolOp::Remove("step".into())),
            (json!({"update": "d"}), PoolOp::Update("d".into())),
            (json!({"check": "d"}), PoolOp::Check("d".into())),
            (
                json!({"check_unclaimed": "d"}),
                PoolOp::CheckUnclaimed("d".into()),
            ),
            // `acquire: false` asks for nothing.
            (
                json!({"acquire": false, "release": "s"}),
                PoolOp::Release("s".into()),
            ),
        ];
        for (value, op) in cases {
            assert_eq!(pool_params(value.clone()).expect("valid").op, op, "{value}");
        }
        let p = pool_params(json!({"acquire": true, "ttl": "1h", "wait_timeout": 30,
            "release_when_build_ends": true}))
        .unwrap();
        assert_eq!(p.ttl, Some(Duration::from_secs(3600)));
        assert_eq!(p.wait_timeout, Some(Duration::from_secs(30)));
        assert!(p.release_when_build_ends);
        let (_, warnings) =
            PoolOutParams::parse(&json!({"claim": "e", "key": "k", "depth": 1})).unwrap();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            parse_pool_in_params(&json!({"depth": 1}))
                .unwrap()
                .is_empty()
        );
        assert_eq!(parse_pool_in_params(&json!({"x": 1})).unwrap().len(), 1);
    }

    #[test]
    fn pool_param_errors_name_their_field() {
        let cases = [
            (json!({}), "one of acquire: true, claim, release"),
            (json!({"acquire": false}), "one of acquire: true"),
            (
                json!({"key": "k", "lock_op": "lock"}),
                "one of acquire: true",
            ),
            (
                json!({"acquire": true, "release": "s"}),
                "params.acquire and params.release are both set",
            ),
            (
                json!({"add": "a", "remove": "r"}),
                "params.add and params.remove are both set",
            ),
            (json!({"claim": ".."}), "params.claim"),
            (
                json!({"release": "s", "ttl": "1m"}),
                "params.ttl applies only",
            ),
            (
                json!({"update": "s", "release_when_build_ends": true}),
                "params.release_when_build_ends applies only",
            ),
            (
                json!({"add": "s", "wait_timeout": "1m"}),
                "params.wait_timeout applies only",
            ),
            (
                json!({"acquire": true, "wait_timeout": "0s"}),
                "params.wait_timeout must be more than 0",
            ),
            (
                json!({"acquire": "yes"}),
                "params.acquire must be true or false",
            ),
            (json!({"release": ["a"]}), "params.release must be a string"),
        ];
        for (value, expected) in cases {
            let err = pool_params(value.clone()).expect_err(&value.to_string());
            assert!(
                err.to_string().contains(expected),
                "{value}: {err} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn unknown_params_warn() {
        let (_, warnings) =
            OutParams::parse(&json!({"key": "k", "lock_op": "lock", "lock_with": "x"})).unwrap();
        assert!(warnings[0].contains("params.lock_with"), "{warnings:?}");
        assert_eq!(parse_in_params(&json!({"skip": true})).unwrap().1.len(), 1);
        assert!(parse_in_params(&json!(null)).unwrap().1.is_empty());
        let (p, _) = parse_in_params(&json!({"lock_op": "wait", "wait_timeout": "1m"})).unwrap();
        assert_eq!(
            p,
            InParams {
                wait: true,
                wait_timeout: Some(Duration::from_secs(60))
            }
        );
        assert!(parse_in_params(&json!({"lock_op": "lock"})).is_err());
        assert!(parse_in_params(&json!({"wait_timeout": "1m"})).is_err());
    }
}
