//! locker: a lock server for Concourse pipelines.
//!
//! # Layout
//! - [`rules`]: the lock rules (acquire, release, counts, queues, slots, leases) and the pool
//!   rules ([`rules::pool`]: items with metadata, claims in one FIFO queue per pool). Pure, no I/O.
//!   What each operation changed, as history events: [`rules::events`].
//! - [`history`]: the kept history of every change ([`history::History`]: numbered events,
//!   bounded, paged for `GET /history`, fed live to `GET /events`) and the file store's history
//!   file ([`history::file`], synced about once a second by a thread of its own).
//! - [`store`]: the [`store::LockStore`] interface, the request flow both backends share
//!   (`store::flow`, and `store::pool_flow` for pools) and the backends: [`store::file`] keeps the state in a YAML file (and an
//!   opt-in journal, [`store::journal`]) with group-committed, fsynced writes; `store::etcd`
//!   (with the `etcd` feature) shares it between servers through an etcd cluster.
//! - [`api`]: HTTP routes and thin handlers; [`auth`] basic auth; [`tls`] rustls set-up.
//! - [`config`]: flags and environment variables, checked once into [`config::Settings`].
//! - [`startup`]: [`startup::StartupError`], what stops the server before it serves (each area's
//!   own error type, gathered); runtime errors are the store's and the API's.
//! - [`server`]: wires it together and shuts down cleanly; [`connection`] times request heads
//!   and caps connections within the descriptor limit.
//! - [`metrics`]: Prometheus counters and gauges.
//! - [`reclaim`]: releases holds whose Concourse build has ended (opt-in).
//! - [`timefmt`]: RFC 3339 times (the duration syntax is the wire protocol's, in `locker-client`).
//! - [`cli`]: `locker lock`, `locks`, `status`, `release`, `wait-free`, `pool ...`, `history`,
//!   `watch`: the binary as a client.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod connection;
pub mod history;
pub mod metrics;
pub mod reclaim;
pub mod rules;
pub mod server;
pub mod startup;
pub mod store;
pub mod timefmt;
pub mod tls;
