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
    /// A pool command (`source.pool`) failed; the message says why.
    #[error("{0}")]
    Pool(String),
    /// Stopped by SIGTERM or SIGINT; says what the clean-up did.
    #[error("{0}")]
    Stopped(String),
}
