//! Prometheus metrics: counters the handlers and the store bump as things happen, gauges read
//! from the store at scrape time, encoded by `prometheus-client` (OpenMetrics text).

use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

/// What the gauges show: read from the store when scraped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockStats {
    pub held: usize,
    pub waiters: usize,
    pub slots_used: usize,
    pub slots_total: usize,
    pub oldest_acquired_at: Option<SystemTime>,
    /// Requests counted against `LOCKER_MAX_WAITERS` now: queued acquires and `wait_free`s.
    pub waiting_requests: usize,
    /// Items of every pool, those claimed, and claims queued for one.
    pub pool_items: usize,
    pub pool_items_claimed: usize,
    pub pool_waiters: usize,
}

pub struct Metrics {
    registry: Registry,
    acquires: Family<Outcome, Counter>,
    releases: Family<Outcome, Counter>,
    writes: Counter,
    write_seconds: Histogram,
    write_batch_size: Histogram,
    write_failures: Counter,
    history_write_failures: Counter,
    wait_free_wakeups: Counter,
    locks_held: Gauge,
    waiters: Gauge,
    waiting_requests: Gauge,
    slots_used: Gauge,
    slots_total: Gauge,
    oldest_lock_age: Gauge<f64, AtomicU64>,
    pool_items: Gauge,
    pool_items_claimed: Gauge,
    pool_waiters: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("locker");
        let metrics = Metrics {
            acquires: Family::default(),
            releases: Family::default(),
            writes: Counter::default(),
            write_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
            write_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            write_failures: Counter::default(),
            history_write_failures: Counter::default(),
            wait_free_wakeups: Counter::default(),
            locks_held: Gauge::default(),
            waiters: Gauge::default(),
            waiting_requests: Gauge::default(),
            slots_used: Gauge::default(),
            slots_total: Gauge::default(),
            oldest_lock_age: Gauge::default(),
            pool_items: Gauge::default(),
            pool_items_claimed: Gauge::default(),
            pool_waiters: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "acquires",
            "Acquire requests and pool claims by outcome (granted, conflict, timed_out, client_gone, slots_mismatch, no_such_item, too_many_waiters, shutting_down, unavailable)",
            metrics.acquires.clone(),
        );
        registry.register(
            "releases",
            "Releases by outcome (released, not_held, wrong_key, forced, expired, reclaimed, shutting_down, unavailable)",
            metrics.releases.clone(),
        );
        registry.register(
            "state_writes",
            "Durable writes of the state file",
            metrics.writes.clone(),
        );
        registry.register_with_unit(
            "state_write_duration",
            "Time to write, fsync and rename the state file",
            Unit::Seconds,
            metrics.write_seconds.clone(),
        );
        registry.register(
            "state_write_batch_size",
            "Operations made durable by one write (group commit)",
            metrics.write_batch_size.clone(),
        );
        registry.register(
            "state_write_failures",
            "Failed writes of the state file; their requests got 503",
            metrics.write_failures.clone(),
        );
        registry.register(
            "history_write_failures",
            "Failed appends or rewrites of the history (the changes themselves were durable)",
            metrics.history_write_failures.clone(),
        );
        registry.register(
            "locks_held",
            "Locks currently held",
            metrics.locks_held.clone(),
        );
        registry.register(
            "waiters",
            "Requests waiting for a lock",
            metrics.waiters.clone(),
        );
        registry.register(
            "waiting_requests",
            "Requests counted against LOCKER_MAX_WAITERS: waiting acquires and wait_free requests",
            metrics.waiting_requests.clone(),
        );
        registry.register(
            "wait_free_wakeups",
            "Times a wait_free request looked at its lock again after a change to it",
            metrics.wait_free_wakeups.clone(),
        );
        registry.register(
            "slots_used",
            "Holdings of all held locks (one per key; semaphores have several)",
            metrics.slots_used.clone(),
        );
        registry.register(
            "slots_total",
            "Slots of all held locks",
            metrics.slots_total.clone(),
        );
        registry.register_with_unit(
            "oldest_lock_age",
            "Age of the oldest holding of any lock (0 when none is held)",
            Unit::Seconds,
            metrics.oldest_lock_age.clone(),
        );
        registry.register(
            "pool_items",
            "Items of all pools",
            metrics.pool_items.clone(),
        );
        registry.register(
            "pool_items_claimed",
            "Items of all pools that are claimed",
            metrics.pool_items_claimed.clone(),
        );
        registry.register(
            "pool_waiters",
            "Claims waiting for a pool item",
            metrics.pool_waiters.clone(),
        );
        registry.register(
            "build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    pub fn acquire(&self, outcome: &'static str) {
        self.acquires.get_or_create(&Outcome { outcome }).inc();
    }

    pub fn release(&self, outcome: &'static str) {
        self.release_by(outcome, 1);
    }

    pub fn release_by(&self, outcome: &'static str, count: u64) {
        self.releases
            .get_or_create(&Outcome { outcome })
            .inc_by(count);
    }

    /// One successful durable write of `operations` operations.
    pub fn write(&self, took: Duration, operations: usize) {
        self.writes.inc();
        self.write_seconds.observe(took.as_secs_f64());
        self.write_batch_size.observe(operations as f64);
    }

    /// A `wait_free` request was woken to look at its lock again.
    pub fn wait_free_woken(&self) {
        self.wait_free_wakeups.inc();
    }

    pub fn write_failed(&self) {
        self.write_failures.inc();
    }

    /// Events could not be written to the history (the change itself was durable).
    pub fn history_write_failed(&self) {
        self.history_write_failures.inc();
    }

    /// Encodes every metric, with the gauges set from `stats` as of `now`.
    pub fn encode(&self, stats: LockStats, now: SystemTime) -> Result<String, std::fmt::Error> {
        self.locks_held.set(stats.held as i64);
        self.waiters.set(stats.waiters as i64);
        self.waiting_requests.set(stats.waiting_requests as i64);
        self.slots_used.set(stats.slots_used as i64);
        self.slots_total.set(stats.slots_total as i64);
        self.pool_items.set(stats.pool_items as i64);
        self.pool_items_claimed.set(stats.pool_items_claimed as i64);
        self.pool_waiters.set(stats.pool_waiters as i64);
        let age = stats
            .oldest_acquired_at
            .and_then(|at| now.duration_since(at).ok())
            .unwrap_or_default();
        self.oldest_lock_age.set(age.as_secs_f64());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}
