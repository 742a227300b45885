//! locker: a lock server for Concourse pipelines.
//!
//! # Layout
//! - [`rules`]: the lock rules (acquire, release, counts, queues, slots, leases). Pure, no I/O.
//! - [`store`]: the [`store::LockStore`] interface and its backends; [`store::file`] keeps the
//!   state in a YAML file and its journal ([`store::journal`]) with group-committed, fsynced
//!   writes; `store::etcd` (with the `etcd` feature) shares it between servers through etcd.
//! - [`api`]: HTTP routes and thin handlers; [`auth`] basic auth; [`tls`] rustls set-up.
//! - [`config`]: flags and environment variables, checked once into [`config::Settings`].
//! - [`server`]: wires it together and shuts down cleanly; [`connection`] times request heads
//!   and caps connections within the descriptor limit.
//! - [`metrics`]: Prometheus counters and gauges.
//! - [`reclaim`]: releases holds whose Concourse build has ended (opt-in).
//! - [`timefmt`]: RFC 3339 times and the request duration syntax.
//! - [`cli`]: `locker lock`, `locks`, `status`, `release`, `wait-free`: the binary as a client.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod connection;
pub mod metrics;
pub mod reclaim;
pub mod rules;
pub mod server;
pub mod store;
pub mod timefmt;
pub mod tls;
