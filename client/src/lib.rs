//! `locker-client`: the locker wire protocol and a client for it, one crate for every program
//! that speaks it: the `locker` CLI (`src/cli/`), the Concourse resource (`resource/`), and
//! the server itself, whose views serialize from the same types.
//!
//! # Layout
//!
//! - [`duration`]: the duration syntax (`30`, `500ms`, `5m`, `1h 30m`, at most ten years) and
//!   how durations go on the wire.
//! - [`path`]: `/lock/{name}` with the name percent-encoded.
//! - [`limits`]: what the server accepts (name, key, holder info, slots), so clients fit
//!   within it before they send.
//! - [`longpoll`]: poll lengths, telling a server that does not wait, the abort deadline.
//! - [`wait`]: the one wait-until loop (a first question that does not wait, long-polls until
//!   done or the deadline, a pause between questions to a server that answers at once), which
//!   every wait runs.
//! - [`acquire`]: the long-poll acquire loop both clients run, for a lock or a pool's item
//!   ([`Target`]), with the [`Abort`] state that lets a signalled client give back what it
//!   may have been granted; each front end's log lines and messages come in through
//!   [`acquire::Hooks`].
//! - [`http`]: the [`Client`]: basic auth, CA certificates, per-request deadlines, retries of
//!   what can heal; every answer worth interpreting comes back as a [`Reply`]. The lock
//!   calls are in `http.rs`, the pool calls in [`pool_client`].
//! - [`history`]: `GET /history` and `GET /lock/{name}/history` as [`wire::HistoryPage`]s,
//!   and paging through them.
//! - [`events`]: the live events of `GET /events` (server-sent events): a parser of
//!   `text/event-stream` and a reader that resumes with `Last-Event-ID` after a dropped
//!   connection, so a watcher sees every event once, in order.
//! - [`wire`]: the request and response bodies as types ([`wire::LockStatus`], ...), which
//!   the server's views serialize and the clients read.
//! - [`error`]: typed failures ([`Error`], [`SetupError`]); the front ends add their advice.

pub mod acquire;
pub mod duration;
pub mod error;
pub mod events;
pub mod history;
pub mod http;
pub mod limits;
pub mod longpoll;
pub mod path;
pub mod pool_client;
pub mod wait;
pub mod wire;

pub use acquire::{Abort, Outcome, Target};
pub use error::{CertificateProblem, Error, SetupError};
pub use http::{Client, Reply, RetryPolicy, Settings};
pub use reqwest::{StatusCode, Url};

pub use duration::{DurationError, MAX_DURATION, parse_duration, wire_duration};
pub use path::{item_path, lock_path, pool_path};
