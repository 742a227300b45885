//! `/metrics`: valid Prometheus exposition text whose counters move with the operations.

pub mod common;

use std::time::Duration;

use common::{Server, call};
use serde_json::json;

/// Scrapes `/metrics`, parses it as Prometheus text, and returns each sample as
/// (`name{label="value",...}`, value).
fn scrape(server: &Server) -> Vec<(String, f64)> {
    let reply = call("GET", &server.url("/metrics"), None);
    assert_eq!(reply.status, 200);
    let content_type = reply
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(reply.body.ends_with("# EOF\n"));
    let lines = reply.body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition text");
    assert!(!scrape.samples.is_empty());
    scrape
        .samples
        .into_iter()
        .filter_map(|sample| {
            let value = match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let mut labels: Vec<String> = sample
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect();
            labels.sort();
            let name = if labels.is_empty() {
                sample.metric
            } else {
                format!("{}{{{}}}", sample.metric, labels.join(","))
            };
            Some((name, value))
        })
        .collect()
}

fn value(samples: &[(String, f64)], name: &str) -> f64 {
    samples
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .unwrap_or(0.0)
}

#[test]
fn counters_and_gauges_follow_the_operations() {
    let server = Server::start();
    let before = scrape(&server);
    assert_eq!(value(&before, "locker_locks_held"), 0.0);
    assert_eq!(value(&before, "locker_build_info{version=\"0.1.0\"}"), 1.0);

    server.lock("a", json!({"key": "k1"}));
    server.lock("b", json!({"key": "k2", "ttl": "1s"}));
    server.lock("a", json!({"key": "other"}));
    call(
        "PUT",
        &server.url("/lock/a?wait=200ms"),
        Some(r#"{"key":"late"}"#),
    );
    server.unlock("a", json!({"key": "k1"}));
    server.unlock("a", json!({"key": "k1"}));
    server.lock("c", json!({"key": "k3"}));
    server.unlock("c", json!({"key": "wrong"}));
    call("DELETE", &server.url("/lock/c?force=true"), None);
    // The 1 s lease of "b" runs out: wait for the server to count it, not for a fixed time.
    let expired = "locker_releases_total{outcome=\"expired\"}";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        let after = scrape(&server);
        if value(&after, expired) - value(&before, expired) >= 1.0 {
            break after;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never expired"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let count = |name: &str| value(&after, name) - value(&before, name);
    assert_eq!(count("locker_acquires_total{outcome=\"granted\"}"), 3.0);
    assert_eq!(count("locker_acquires_total{outcome=\"conflict\"}"), 1.0);
    assert_eq!(count("locker_acquires_total{outcome=\"timed_out\"}"), 1.0);
    assert_eq!(count("locker_releases_total{outcome=\"released\"}"), 1.0);
    assert_eq!(count("locker_releases_total{outcome=\"not_held\"}"), 1.0);
    assert_eq!(count("locker_releases_total{outcome=\"wrong_key\"}"), 1.0);
    assert_eq!(count("locker_releases_total{outcome=\"forced\"}"), 1.0);
    assert_eq!(count("locker_releases_total{outcome=\"expired\"}"), 1.0);
    // Every change was written: 3 grants, 1 release, 1 force, 1 expiry (some may share a write).
    let writes = count("locker_state_writes_total");
    assert!((1.0..=6.0).contains(&writes), "{writes} writes");
    assert_eq!(count("locker_state_write_duration_seconds_count"), writes);
    assert_eq!(value(&after, "locker_state_write_failures_total"), 0.0);
    assert_eq!(value(&after, "locker_locks_held"), 0.0);

    server.lock("held", json!({"key": "k"}));
    std::thread::sleep(Duration::from_millis(1100));
    let held = scrape(&server);
    assert_eq!(value(&held, "locker_locks_held"), 1.0);
    assert_eq!(value(&held, "locker_slots_used"), 1.0);
    let age = value(&held, "locker_oldest_lock_age_seconds");
    assert!((1.0..30.0).contains(&age), "oldest lock age {age}");
}

#[test]
fn metrics_are_behind_auth_when_auth_is_on() {
    let server = common::server().auth("u", "p").start();
    assert_eq!(call("GET", &server.url("/metrics"), None).status, 401);
    let ok = common::client()
        .get(server.url("/metrics"))
        .basic_auth("u", Some("p"))
        .send()
        .expect("request");
    assert_eq!(ok.status(), 200);
}

#[test]
fn refusals_are_counted_by_kind_and_only_store_failures_as_unavailable() {
    let server = Server::start();
    let before = scrape(&server);
    assert_eq!(
        server.lock("sem", json!({"key": "a", "slots": 2})).status,
        200
    );
    let mismatch = server.lock("sem", json!({"key": "b", "slots": 3}));
    assert_eq!(mismatch.status, 409, "{}", mismatch.body);
    let free = call("DELETE", &server.url("/lock/free?force=true"), None);
    assert_eq!(free.status, 200, "{}", free.body);

    let after = scrape(&server);
    let count = |name: &str| value(&after, name) - value(&before, name);
    assert_eq!(
        count("locker_acquires_total{outcome=\"slots_mismatch\"}"),
        1.0
    );
    assert_eq!(count("locker_acquires_total{outcome=\"unavailable\"}"), 0.0);
    assert_eq!(count("locker_releases_total{outcome=\"not_held\"}"), 1.0);
    assert_eq!(count("locker_releases_total{outcome=\"forced\"}"), 0.0);
}

/// The value of the sample printed exactly as `series` (name and labels), if present.
fn series(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn hold_age_per_lock_oldest_waiter_and_store_readiness_follow_the_locks() {
    let server = Server::start();
    let idle = call("GET", &server.url("/metrics"), None).body;
    assert_eq!(series(&idle, "locker_store_ready"), Some(1.0), "{idle}");
    assert_eq!(series(&idle, "locker_oldest_waiter_seconds"), Some(0.0));
    assert!(!idle.contains("locker_hold_age_seconds{"), "{idle}");
    assert!(!idle.contains("locker_replicas"), "one server: {idle}");

    assert_eq!(server.lock("deploy", json!({"key": "first"})).status, 200);
    let waiter = {
        let url = server.url("/lock/deploy?wait=30s");
        std::thread::spawn(move || call("PUT", &url, Some(r#"{"key":"second"}"#)))
    };
    common::wait_for_waiters(&server, "deploy", 1);
    let busy = call("GET", &server.url("/metrics"), None).body;
    let waited = series(&busy, "locker_oldest_waiter_seconds").expect("oldest waiter");
    assert!(waited > 0.0, "a request is queued: {busy}");
    let held = series(&busy, "locker_hold_age_seconds{lock=\"deploy\"}").expect("hold age");
    assert!(held >= waited, "held since before the waiter came: {busy}");

    assert_eq!(server.unlock("deploy", json!({"key": "first"})).status, 200);
    let granted = waiter.join().expect("waiter thread");
    assert_eq!(granted.status, 200, "{}", granted.body);
    let after = call("GET", &server.url("/metrics"), None).body;
    assert_eq!(series(&after, "locker_oldest_waiter_seconds"), Some(0.0));
    assert!(series(&after, "locker_hold_age_seconds{lock=\"deploy\"}").is_some());

    assert_eq!(
        server.unlock("deploy", json!({"key": "second"})).status,
        200
    );
    let free = call("GET", &server.url("/metrics"), None).body;
    assert!(!free.contains("locker_hold_age_seconds{"), "{free}");
}

#[test]
fn locks_beyond_the_label_cap_share_the_other_series() {
    let server = common::server()
        .env("LOCKER_METRICS_MAX_LOCK_LABELS", "2")
        .start();
    for name in ["a", "b", "c", "d"] {
        assert_eq!(server.lock(name, json!({"key": "k"})).status, 200);
    }
    let text = call("GET", &server.url("/metrics"), None).body;
    let ages: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("locker_hold_age_seconds{"))
        .collect();
    assert_eq!(ages.len(), 3, "two names and _other: {text}");
    // Locks are scraped in name order: the first two seen keep their names.
    for name in ["a", "b", "_other"] {
        let line = format!("locker_hold_age_seconds{{lock=\"{name}\"}}");
        assert!(series(&text, &line).is_some(), "no {line}: {text}");
    }
}

#[test]
fn hold_and_wait_times_are_observed_per_lock_when_holdings_and_waits_end() {
    let server = Server::start();
    assert_eq!(server.lock("deploy", json!({"key": "first"})).status, 200);
    let waiter = {
        let url = server.url("/lock/deploy?wait=30s");
        std::thread::spawn(move || call("PUT", &url, Some(r#"{"key":"second"}"#)))
    };
    common::wait_for_waiters(&server, "deploy", 1);
    assert_eq!(server.unlock("deploy", json!({"key": "first"})).status, 200);
    assert_eq!(waiter.join().expect("waiter thread").status, 200);
    // One more that gives up waiting while "second" holds.
    let gave_up = call(
        "PUT",
        &server.url("/lock/deploy?wait=200ms"),
        Some(r#"{"key":"third"}"#),
    );
    assert_eq!(gave_up.status, 423, "{}", gave_up.body);
    assert_eq!(
        server.unlock("deploy", json!({"key": "second"})).status,
        200
    );
    // A lock taken at once and released: a hold, no wait.
    assert_eq!(server.lock("quick", json!({"key": "k"})).status, 200);
    assert_eq!(server.unlock("quick", json!({"key": "k"})).status, 200);

    server.wait_for_metric("locker_hold_seconds_count{lock=\"deploy\"} 2");
    server.wait_for_metric("locker_wait_seconds_count{lock=\"deploy\"} 2");
    server.wait_for_metric("locker_hold_seconds_count{lock=\"quick\"} 1");
    let text = call("GET", &server.url("/metrics"), None).body;
    assert_eq!(
        series(&text, "locker_wait_seconds_count{lock=\"quick\"}"),
        None
    );
    let held = series(&text, "locker_hold_seconds_sum{lock=\"deploy\"}").expect("sum");
    let waited = series(&text, "locker_wait_seconds_sum{lock=\"deploy\"}").expect("sum");
    assert!(held > 0.0 && waited > 0.0, "{text}");
    let all = series(
        &text,
        "locker_hold_seconds_bucket{le=\"+Inf\",lock=\"deploy\"}",
    );
    assert_eq!(all, Some(2.0), "{text}");
}
