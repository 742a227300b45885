//! Why a command failed, as types; `main` prints the one line for the build log. The messages
//! name the `source` or `params` field to fix where one is at fault.

use std::path::PathBuf;

use reqwest::StatusCode;

use crate::client::ClientError;
use crate::models::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot read the request from stdin: {0}")]
    Stdin(#[source] std::io::Error),
    #[error("the request on stdin is not valid JSON for this command: {0}")]
    Request(#[source] serde_json::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen for signals: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot create {}: {source}", path.display())]
    CreateDirectory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode the response: {0}")]
    Encode(#[source] serde_json::Error),
    /// `params.wait_timeout` ran out while the lock was held (`free`: waiting for it to be
    /// free rather than to take it).
    #[error(
        "gave up waiting for lock {name:?}{} after {waited} (params.wait_timeout): it is held by {holder}",
        if *free { " to be free" } else { "" }
    )]
    GaveUp {
        name: String,
        free: bool,
        waited: String,
        holder: String,
    },
    #[error("cannot lock {name:?}: {message} (params.slots must match the lock's)")]
    SlotsDiffer { name: String, message: String },
    /// The server refused a lock or unlock (`action`).
    #[error("cannot {action} {name:?}: the server answered {status}: {message}")]
    Refused {
        action: &'static str,
        name: String,
        status: StatusCode,
        message: String,
    },
    #[error("cannot unlock {name:?} with key {key:?}: {message}")]
    NotHolder {
        name: String,
        key: String,
        message: String,
    },
    /// A pool command (`source.pool`) failed.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// Stopped by SIGTERM or SIGINT; says what the clean-up did.
    #[error("{0}")]
    Stopped(String),
}

/// Why a pool command (`source.pool`) failed. `param` is the put's param (`release`,
/// `check` ...), `doing` what was done (`release item "a" of pool "p"`).
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot encode {file}: {0}", file = crate::pool::CLAIM_FILE)]
    EncodeClaim(#[source] serde_json::Error),
    /// `in` of a claim's version whose claim no longer holds the item.
    #[error(
        "item {item:?} of pool {pool:?} is no longer held by the claim of this version ({claim}): it is {state}"
    )]
    NoLongerHeld {
        item: String,
        pool: String,
        claim: String,
        state: String,
    },
    /// `params.wait_timeout` ran out; `state` says how things stood.
    #[error("gave up waiting for {what} after {waited} (params.wait_timeout): {state}")]
    GaveUp {
        what: String,
        waited: String,
        state: String,
    },
    #[error("cannot {doing}: the server answered {status}: {message}")]
    Refused {
        doing: String,
        status: StatusCode,
        message: String,
    },
    #[error("cannot {doing}: it is not claimed")]
    NotClaimed { doing: String },
    #[error(
        "cannot {doing}: it is held by another claim than the one in {} ({claim}): {message}",
        claim_file.display()
    )]
    HeldByAnother {
        doing: String,
        claim_file: PathBuf,
        claim: String,
        message: String,
    },
    #[error("the server granted the claim of {what} with an answer that is not a claim: {body}")]
    NotAClaim {
        what: String,
        body: serde_json::Value,
    },
    #[error("cannot {doing}: the server's answer is not understood")]
    NotUnderstood { doing: String },
    #[error("{param}: the server's answer is not an item")]
    NotAnItem { param: &'static str },
    #[error(
        "GET {base}/pool/... did not answer a pool: is source.locker_uri a locker server with pools?"
    )]
    NotAPool { base: String },
    #[error(
        "{base} has no pools (GET /pools answered 404): source.pool needs a locker server with the pool API"
    )]
    NoPools { base: String },
    #[error(
        "cannot add item {item:?} to pool {pool:?}: {message} (update changes an unclaimed item's metadata; remove takes an item out)"
    )]
    AddConflict {
        item: String,
        pool: String,
        message: String,
    },
    #[error("item {item:?} was added claimed, but it is no longer held by this claim")]
    AddedNotHeld { item: String },
    /// A file of the directory a param names cannot be read.
    #[error(
        "params.{param}: cannot read {} ({source}): the directory must hold the item's `name`{}, as a get of the pool writes them",
        path.display(),
        if *metadata { " and `metadata`" } else { "" }
    )]
    ReadDir {
        param: &'static str,
        path: PathBuf,
        metadata: bool,
        source: std::io::Error,
    },
    #[error("params.{param}: {} is empty", path.display())]
    EmptyName { param: &'static str, path: PathBuf },
    #[error("params.{param}: {} is not UTF-8 text", path.display())]
    NotText { param: &'static str, path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    ReadClaim {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a claim: {source}", path.display())]
    NotAClaimFile {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{} is the claim of item {claim_item:?} of pool {claim_pool:?}, but the directory's name is {item:?} and this resource's pool {pool:?}",
        path.display()
    )]
    ClaimElsewhere {
        path: PathBuf,
        claim_item: String,
        claim_pool: String,
        item: String,
        pool: String,
    },
}
