//! Prometheus metrics: counters the handlers and the store bump as things happen, histograms of
//! hold and wait times fed by the history's events ([`Metrics::observe_event`]), gauges read
//! from the store at scrape time, encoded by `prometheus-client` (OpenMetrics text).
//!
//! Series per lock or pool name are bounded: the first `max_lock_labels` lock names (and as
//! many pool names) seen get a label of their own for the life of the process; the rest share
//! the label value [`OTHER`] (see [`Subject`]).

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use locker_client::wire::Event;
use parking_lot::Mutex;
use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
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

/// The label value shared by the lock (or pool) names beyond the cap on labels.
pub const OTHER: &str = "_other";

/// Default of `LOCKER_METRICS_MAX_LOCK_LABELS`.
pub const DEFAULT_MAX_LOCK_LABELS: usize = 100;

/// What a per-name series is about: a lock (label `lock`) or a pool (label `pool`; a pool's
/// items share their pool's series).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Subject {
    Lock(String),
    Pool(String),
}

impl Subject {
    /// The lock or pool an event is about, if any.
    pub fn of(event: &Event) -> Option<Subject> {
        match (&event.lock, &event.pool) {
            (Some(lock), _) => Some(Subject::Lock(lock.clone())),
            (None, Some(pool)) => Some(Subject::Pool(pool.clone())),
            (None, None) => None,
        }
    }

    fn other(&self) -> Subject {
        match self {
            Subject::Lock(_) => Subject::Lock(OTHER.to_string()),
            Subject::Pool(_) => Subject::Pool(OTHER.to_string()),
        }
    }
}

impl EncodeLabelSet for Subject {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let label = match self {
            Subject::Lock(name) => ("lock", name.as_str()),
            Subject::Pool(name) => ("pool", name.as_str()),
        };
        [label].encode(encoder)
    }
}

/// No labels: a family used for a series that exists only sometimes (`locker_replicas`).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Whole;

impl EncodeLabelSet for Whole {
    fn encode(&self, _encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        Ok(())
    }
}

/// The names that have a label of their own: the first `max` lock names and the first `max`
/// pool names seen, kept until the process ends.
struct LabelCap {
    max: usize,
    locks: Mutex<HashSet<String>>,
    pools: Mutex<HashSet<String>>,
}

impl LabelCap {
    fn new(max: usize) -> Self {
        LabelCap {
            max,
            locks: Mutex::new(HashSet::new()),
            pools: Mutex::new(HashSet::new()),
        }
    }

    /// `subject` itself if its name has (or can still get) a label of its own, else its kind's
    /// [`OTHER`].
    fn label(&self, subject: Subject) -> Subject {
        let (names, name) = match &subject {
            Subject::Lock(name) => (&self.locks, name),
            Subject::Pool(name) => (&self.pools, name),
        };
        let mut names = names.lock();
        if names.contains(name) {
            return subject;
        }
        if names.len() < self.max {
            names.insert(name.clone());
            return subject;
        }
        subject.other()
    }
}

fn seconds_buckets() -> Histogram {
    // 100 ms to a day: a CI lock is held for seconds to hours.
    Histogram::new([
        0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
        14400.0, 28800.0, 86400.0,
    ])
}

/// What the gauges show: read from the store when scraped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    /// When the longest-waiting request (an acquire or a pool claim) was queued.
    pub oldest_waiting_since: Option<SystemTime>,
    /// Each held lock with its oldest holding's start, and each pool with a claimed item with
    /// its oldest claim's start.
    pub holdings: Vec<(Subject, SystemTime)>,
    /// Servers registered in the shared store (etcd), as this one sees them; `None` for a
    /// store of one server.
    pub replicas: Option<usize>,
}

type PerName<M> = Family<Subject, M, fn() -> M>;

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
    hold_seconds: PerName<Histogram>,
    wait_seconds: PerName<Histogram>,
    hold_age: Family<Subject, Gauge<f64, AtomicU64>>,
    oldest_waiter_age: Gauge<f64, AtomicU64>,
    store_ready: Gauge,
    replicas: Family<Whole, Gauge>,
    labels: LabelCap,
    /// One scrape at a time: the gauges are set, then encoded.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Metrics with the default cap on per-name labels ([`DEFAULT_MAX_LOCK_LABELS`]).
    pub fn new() -> Self {
        Self::with_max_lock_labels(DEFAULT_MAX_LOCK_LABELS)
    }

    /// Metrics giving at most `max` lock names (and `max` pool names) series of their own.
    pub fn with_max_lock_labels(max: usize) -> Self {
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
            hold_seconds: Family::new_with_constructor(seconds_buckets),
            wait_seconds: Family::new_with_constructor(seconds_buckets),
            hold_age: Family::default(),
            oldest_waiter_age: Gauge::default(),
            store_ready: Gauge::default(),
            replicas: Family::default(),
            labels: LabelCap::new(max),
            scrape: Mutex::new(()),
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
        registry.register_with_unit(
            "hold",
            "How long holdings of a lock (label lock) or a pool's items (label pool) were held, observed when each ended (released, force-released, expired, reclaimed); names beyond LOCKER_METRICS_MAX_LOCK_LABELS share the value _other",
            Unit::Seconds,
            metrics.hold_seconds.clone(),
        );
        registry.register_with_unit(
            "wait",
            "How long requests that queued for a lock (label lock) or a pool's item (label pool) waited, observed when each left the queue (acquired, timed-out, withdrawn); names beyond LOCKER_METRICS_MAX_LOCK_LABELS share the value _other",
            Unit::Seconds,
            metrics.wait_seconds.clone(),
        );
        registry.register_with_unit(
            "hold_age",
            "Age of the oldest current holding of each held lock (label lock) or claimed item of each pool (label pool); _other: the oldest of the names beyond LOCKER_METRICS_MAX_LOCK_LABELS",
            Unit::Seconds,
            metrics.hold_age.clone(),
        );
        registry.register_with_unit(
            "oldest_waiter",
            "Age of the longest-waiting queued request, an acquire or a pool claim (0 when none waits)",
            Unit::Seconds,
            metrics.oldest_waiter_age.clone(),
        );
        registry.register(
            "store_ready",
            "1 when the store can take writes now (what GET /ready answers 200 for), else 0",
            metrics.store_ready.clone(),
        );
        registry.register(
            "replicas",
            "Servers registered in the shared etcd store, as this one sees them (only with LOCKER_STORE=etcd)",
            metrics.replicas.clone(),
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

    /// Feeds one recorded event to the histograms: the `held_ms` of an event that ends a
    /// holding (`released`, `force-released`, `expired`, `reclaimed`) to `locker_hold_seconds`,
    /// the `waited_ms` of one that ends a wait (`acquired`, `timed-out`, `withdrawn`) to
    /// `locker_wait_seconds`. Events without that field (a release of one of several counts,
    /// an acquire granted without queueing) and every other kind are not observed.
    pub fn observe_event(&self, event: &Event) {
        let (family, millis) = match event.kind.as_str() {
            "released" | "force-released" | "expired" | "reclaimed" => {
                (&self.hold_seconds, event.held_ms)
            }
            "acquired" | "timed-out" | "withdrawn" => (&self.wait_seconds, event.waited_ms),
            _ => return,
        };
        let (Some(millis), Some(subject)) = (millis, Subject::of(event)) else {
            return;
        };
        family
            .get_or_create(&self.labels.label(subject))
            .observe(millis as f64 / 1000.0);
    }

    /// Whether the store could take writes when last asked (set before each scrape).
    pub fn set_store_ready(&self, ready: bool) {
        self.store_ready.set(i64::from(ready));
    }

    /// Events could not be written to the history (the change itself was durable).
    pub fn history_write_failed(&self) {
        self.history_write_failures.inc();
    }

    /// Encodes every metric, with the gauges set from `stats` as of `now`.
    pub fn encode(&self, stats: LockStats, now: SystemTime) -> Result<String, std::fmt::Error> {
        let _one_scrape = self.scrape.lock();
        let age_of = |at: SystemTime| now.duration_since(at).unwrap_or_default().as_secs_f64();
        self.hold_age.clear();
        for (subject, since) in stats.holdings {
            let age = age_of(since);
            let gauge = self.hold_age.get_or_create(&self.labels.label(subject));
            if age > gauge.get() {
                gauge.set(age);
            }
        }
        self.oldest_waiter_age
            .set(stats.oldest_waiting_since.map(age_of).unwrap_or(0.0));
        self.replicas.clear();
        if let Some(replicas) = stats.replicas {
            self.replicas.get_or_create(&Whole).set(replicas as i64);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, lock: Option<&str>, pool: Option<&str>) -> Event {
        Event {
            kind: kind.to_string(),
            lock: lock.map(str::to_string),
            pool: pool.map(str::to_string),
            item: pool.map(|_| "item".to_string()),
            ..Event::default()
        }
    }

    fn held(kind: &str, lock: &str, millis: u64) -> Event {
        Event {
            held_ms: Some(millis),
            ..event(kind, Some(lock), None)
        }
    }

    fn waited(kind: &str, lock: &str, millis: u64) -> Event {
        Event {
            waited_ms: Some(millis),
            ..event(kind, Some(lock), None)
        }
    }

    fn text(metrics: &Metrics, stats: LockStats, now: SystemTime) -> String {
        metrics.encode(stats, now).expect("encodes")
    }

    /// The value of the sample named exactly `series` (name and labels), if present.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            Some(value.parse().expect("a number"))
        })
    }

    #[test]
    fn holdings_that_end_feed_the_hold_histogram_of_their_lock() {
        let metrics = Metrics::new();
        for kind in ["released", "force-released", "expired", "reclaimed"] {
            metrics.observe_event(&held(kind, "deploy", 2_000));
        }
        metrics.observe_event(&held("released", "other", 500));
        let text = text(&metrics, LockStats::default(), SystemTime::now());
        assert_eq!(
            sample(&text, r#"locker_hold_seconds_count{lock="deploy"}"#),
            Some(4.0)
        );
        assert_eq!(
            sample(&text, r#"locker_hold_seconds_sum{lock="deploy"}"#),
            Some(8.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"locker_hold_seconds_bucket{le="1.0",lock="deploy"}"#
            ),
            Some(0.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"locker_hold_seconds_bucket{le="5.0",lock="deploy"}"#
            ),
            Some(4.0)
        );
        assert_eq!(
            sample(&text, r#"locker_hold_seconds_sum{lock="other"}"#),
            Some(0.5)
        );
        assert_eq!(
            sample(&text, r#"locker_wait_seconds_count{lock="deploy"}"#),
            None
        );
    }

    #[test]
    fn waits_that_end_feed_the_wait_histogram_of_their_lock() {
        let metrics = Metrics::new();
        metrics.observe_event(&waited("acquired", "deploy", 1_000));
        metrics.observe_event(&waited("timed-out", "deploy", 30_000));
        metrics.observe_event(&waited("withdrawn", "deploy", 250));
        let text = text(&metrics, LockStats::default(), SystemTime::now());
        assert_eq!(
            sample(&text, r#"locker_wait_seconds_count{lock="deploy"}"#),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, r#"locker_wait_seconds_sum{lock="deploy"}"#),
            Some(31.25)
        );
        assert_eq!(
            sample(&text, r#"locker_hold_seconds_count{lock="deploy"}"#),
            None
        );
    }

    #[test]
    fn events_without_a_duration_or_of_other_kinds_are_not_observed() {
        let metrics = Metrics::new();
        // A release of one of several counts, an acquire granted at once: no duration.
        metrics.observe_event(&event("released", Some("a"), None));
        metrics.observe_event(&event("acquired", Some("a"), None));
        // Kinds that neither end a holding nor a wait, even with a duration set.
        for kind in [
            "queued",
            "slots-changed",
            "item-added",
            "item-updated",
            "item-removed",
        ] {
            metrics.observe_event(&held(kind, "a", 1_000));
            metrics.observe_event(&waited(kind, "a", 1_000));
        }
        // The wrong duration for the kind.
        metrics.observe_event(&waited("released", "a", 1_000));
        metrics.observe_event(&held("acquired", "a", 1_000));
        // Nothing named.
        metrics.observe_event(&Event {
            held_ms: Some(1_000),
            ..event("released", None, None)
        });
        let text = text(&metrics, LockStats::default(), SystemTime::now());
        // A family with no series is not encoded at all.
        assert!(!text.contains("locker_hold_seconds"), "{text}");
        assert!(!text.contains("locker_wait_seconds"), "{text}");
        assert!(text.contains("locker_locks_held 0"), "{text}");
    }

    #[test]
    fn a_pool_items_events_count_under_the_pool() {
        let metrics = Metrics::new();
        metrics.observe_event(&Event {
            held_ms: Some(3_000),
            ..event("released", None, Some("envs"))
        });
        metrics.observe_event(&Event {
            waited_ms: Some(1_500),
            ..event("acquired", None, Some("envs"))
        });
        let text = text(&metrics, LockStats::default(), SystemTime::now());
        assert_eq!(
            sample(&text, r#"locker_hold_seconds_sum{pool="envs"}"#),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, r#"locker_wait_seconds_sum{pool="envs"}"#),
            Some(1.5)
        );
    }

    #[test]
    fn names_beyond_the_cap_share_the_other_label_and_earlier_names_keep_theirs() {
        let metrics = Metrics::with_max_lock_labels(2);
        for lock in ["a", "b", "c", "d", "a"] {
            metrics.observe_event(&held("released", lock, 1_000));
        }
        // Pools have a cap of their own.
        for pool in ["p", "q", "r"] {
            metrics.observe_event(&Event {
                held_ms: Some(1_000),
                ..event("released", None, Some(pool))
            });
        }
        let text = text(&metrics, LockStats::default(), SystemTime::now());
        let count = |labels: &str| sample(&text, &format!("locker_hold_seconds_count{{{labels}}}"));
        assert_eq!(count(r#"lock="a""#), Some(2.0));
        assert_eq!(count(r#"lock="b""#), Some(1.0));
        assert_eq!(count(r#"lock="c""#), None);
        assert_eq!(count(r#"lock="d""#), None);
        assert_eq!(count(r#"lock="_other""#), Some(2.0));
        assert_eq!(count(r#"pool="p""#), Some(1.0));
        assert_eq!(count(r#"pool="q""#), Some(1.0));
        assert_eq!(count(r#"pool="_other""#), Some(1.0));
        let series = text
            .lines()
            .filter(|l| l.starts_with("locker_hold_seconds_count"))
            .count();
        assert_eq!(series, 6, "{text}");
    }

    #[test]
    fn a_cap_of_zero_puts_every_name_under_other() {
        let metrics = Metrics::with_max_lock_labels(0);
        metrics.observe_event(&waited("acquired", "a", 1_000));
        metrics.observe_event(&waited("acquired", "b", 1_000));
        let text = text(&metrics, LockStats::default(), SystemTime::now());
        assert_eq!(
            sample(&text, r#"locker_wait_seconds_count{lock="_other"}"#),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, r#"locker_wait_seconds_count{lock="a"}"#),
            None
        );
    }

    #[test]
    fn hold_ages_are_per_name_with_the_oldest_beyond_the_cap_under_other() {
        let metrics = Metrics::with_max_lock_labels(1);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ago = |secs| now - Duration::from_secs(secs);
        let stats = LockStats {
            holdings: vec![
                (Subject::Lock("a".into()), ago(10)),
                (Subject::Lock("b".into()), ago(30)),
                (Subject::Lock("c".into()), ago(20)),
                (Subject::Pool("envs".into()), ago(40)),
            ],
            ..LockStats::default()
        };
        let first = text(&metrics, stats, now);
        assert_eq!(
            sample(&first, r#"locker_hold_age_seconds{lock="a"}"#),
            Some(10.0)
        );
        assert_eq!(
            sample(&first, r#"locker_hold_age_seconds{lock="_other"}"#),
            Some(30.0)
        );
        assert_eq!(
            sample(&first, r#"locker_hold_age_seconds{pool="envs"}"#),
            Some(40.0)
        );
        // A lock no longer held has no age series at the next scrape.
        let stats = LockStats {
            holdings: vec![(Subject::Lock("b".into()), ago(31))],
            ..LockStats::default()
        };
        let second = text(&metrics, stats, now);
        assert_eq!(
            sample(&second, r#"locker_hold_age_seconds{lock="a"}"#),
            None
        );
        assert_eq!(
            sample(&second, r#"locker_hold_age_seconds{lock="_other"}"#),
            Some(31.0)
        );
        assert_eq!(
            sample(&second, r#"locker_hold_age_seconds{pool="envs"}"#),
            None
        );
    }

    #[test]
    fn oldest_waiter_store_readiness_and_replicas_are_scrape_time_gauges() {
        let metrics = Metrics::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let idle = text(&metrics, LockStats::default(), now);
        assert_eq!(sample(&idle, "locker_oldest_waiter_seconds"), Some(0.0));
        assert_eq!(sample(&idle, "locker_store_ready"), Some(0.0));
        assert!(
            !idle.contains("locker_replicas"),
            "a store of one server: {idle}"
        );

        metrics.set_store_ready(true);
        let stats = LockStats {
            oldest_waiting_since: Some(now - Duration::from_secs(90)),
            replicas: Some(3),
            ..LockStats::default()
        };
        let busy = text(&metrics, stats, now);
        assert_eq!(sample(&busy, "locker_oldest_waiter_seconds"), Some(90.0));
        assert_eq!(sample(&busy, "locker_store_ready"), Some(1.0));
        assert_eq!(sample(&busy, "locker_replicas"), Some(3.0));

        metrics.set_store_ready(false);
        let failing = text(&metrics, LockStats::default(), now);
        assert_eq!(sample(&failing, "locker_store_ready"), Some(0.0));
    }
}
