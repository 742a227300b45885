//! Waiting acquires, lock status, fencing generations, holder info, leases and force release.

pub mod common;

use std::io::Write;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Server, call, wait_for_waiters};
use serde_json::{Value, json};

/// Starts a waiting acquire in a thread; its reply comes back on the channel.
fn spawn_waiter(
    server: &Server,
    name: &str,
    body: Value,
    wait: &str,
    done: &mpsc::Sender<(String, u16, Value)>,
) -> thread::JoinHandle<()> {
    let url = server.url(&format!("/lock/{name}?wait={wait}"));
    let done = done.clone();
    thread::spawn(move || {
        let key = body["key"].as_str().unwrap_or_default().to_string();
        let reply = call("PUT", &url, Some(&body.to_string()));
        let json = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
        let _ = done.send((key, reply.status, json));
    })
}

#[test]
fn waiters_are_served_in_arrival_order() {
    let server = Server::start();
    assert_eq!(server.lock("fifo", json!({"key": "holder"})).status, 200);
    let (done, results) = mpsc::channel();
    let keys = ["w1", "w2", "w3", "w4", "w5", "w6"];
    for (i, key) in keys.iter().enumerate() {
        spawn_waiter(&server, "fifo", json!({"key": key}), "30s", &done);
        wait_for_waiters(&server, "fifo", i as u64 + 1);
    }
    let mut previous = "holder".to_string();
    let mut order = Vec::new();
    for _ in keys {
        assert_eq!(server.unlock("fifo", json!({"key": previous})).status, 200);
        let (key, status, _) = results
            .recv_timeout(Duration::from_secs(10))
            .expect("a waiter was granted");
        assert_eq!(status, 200);
        assert_eq!(server.locks()["fifo"]["key"], json!(key));
        order.push(key.clone());
        previous = key;
    }
    assert_eq!(order, keys);
}

#[test]
fn a_same_key_request_does_not_jump_a_queued_waiter_with_another_key() {
    let server = Server::start();
    server.lock("shared", json!({"key": "team", "requestor": "a"}));
    let (done, results) = mpsc::channel();
    spawn_waiter(&server, "shared", json!({"key": "exclusive"}), "30s", &done);
    wait_for_waiters(&server, "shared", 1);

    // Without wait: refused while the exclusive waiter is queued.
    let refused = server.lock("shared", json!({"key": "team", "requestor": "b"}));
    assert_eq!(refused.status, 423, "{}", refused.body);
    // The holder itself may still count up (reentrancy), or it would wait on itself.
    assert_eq!(
        server
            .lock("shared", json!({"key": "team", "requestor": "a"}))
            .status,
        200
    );
    // With wait: it queues behind the exclusive waiter.
    spawn_waiter(
        &server,
        "shared",
        json!({"key": "team", "requestor": "b"}),
        "30s",
        &done,
    );
    wait_for_waiters(&server, "shared", 2);

    server.unlock("shared", json!({"key": "team", "requestor": "a"}));
    let (key, status, _) = results
        .recv_timeout(Duration::from_secs(10))
        .expect("grant");
    assert_eq!((key.as_str(), status), ("exclusive", 200));
    server.unlock("shared", json!({"key": "exclusive"}));
    let (key, status, _) = results
        .recv_timeout(Duration::from_secs(10))
        .expect("grant");
    assert_eq!((key.as_str(), status), ("team", 200));
}

#[test]
fn a_wait_that_runs_out_answers_423_naming_the_holder() {
    let server = Server::start();
    server.lock("busy", json!({"key": "owner"}));
    let started = Instant::now();
    let reply = call(
        "PUT",
        &server.url("/lock/busy?wait=700ms"),
        Some(r#"{"key":"late"}"#),
    );
    let waited = started.elapsed();
    assert_eq!(reply.status, 423);
    let error = reply.error();
    assert!(
        error.contains("timed out") && error.contains("owner"),
        "{error}"
    );
    assert!(
        waited >= Duration::from_millis(650) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // The wait also works as a body field.
    let reply = call(
        "PUT",
        &server.url("/lock/busy"),
        Some(r#"{"key":"late","wait":"300ms"}"#),
    );
    assert_eq!(reply.status, 423);
    assert!(reply.error().contains("timed out"));
}

#[test]
fn waits_are_clamped_to_the_server_maximum() {
    let server = common::server().env("LOCKER_MAX_WAIT", "500ms").start();
    server.lock("busy", json!({"key": "owner"}));
    let started = Instant::now();
    let reply = call(
        "PUT",
        &server.url("/lock/busy?wait=1h"),
        Some(r#"{"key":"b"}"#),
    );
    assert_eq!(reply.status, 423);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_waiter_whose_client_disconnects_is_never_granted() {
    let server = Server::start();
    server.lock("gone", json!({"key": "holder"}));
    let address = server.base.trim_start_matches("http://").to_string();
    let body = r#"{"key":"vanishing"}"#;
    let mut socket = std::net::TcpStream::connect(&address).expect("connect");
    write!(
        socket,
        "PUT /lock/gone?wait=30s HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    wait_for_waiters(&server, "gone", 1);
    drop(socket);
    wait_for_waiters(&server, "gone", 0);
    assert_eq!(server.unlock("gone", json!({"key": "holder"})).status, 200);
    assert_eq!(server.locks(), json!({}), "the gone waiter was granted");
    // And the next waiter is served normally.
    assert_eq!(server.lock("gone", json!({"key": "next"})).status, 200);
}

#[test]
fn a_lease_that_runs_out_releases_the_hold_and_grants_the_next_waiter() {
    let server = Server::start();
    // The lease starts after this instant: it cannot end before 1 s past it.
    let before_lease = Instant::now();
    let reply = server.lock("lease", json!({"key": "short", "ttl": "1s"}));
    assert_eq!(reply.status, 200);
    let status = call("GET", &server.url("/lock/lease"), None).json();
    assert!(status["expires_at"].is_string(), "{status}");
    // A wait far longer than the lease: a 200 means the lease's end let it in.
    let reply = call(
        "PUT",
        &server.url("/lock/lease?wait=60s"),
        Some(r#"{"key":"next"}"#),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let waited = before_lease.elapsed();
    // Not before the lease ended (a lease that ends early fails here).
    assert!(waited >= Duration::from_secs(1), "granted after {waited:?}");
    assert_eq!(server.locks()["lease"]["key"], "next");
    server.wait_for_log("expired", 1);
}

#[test]
fn acquiring_again_renews_the_lease() {
    let server = Server::start();
    assert_eq!(
        server
            .lock("renew", json!({"key": "k", "ttl": "3s"}))
            .status,
        200
    );
    // The first lease started before its answer came: it ends by 3 s past this instant.
    let first = Instant::now();
    thread::sleep(Duration::from_millis(500));
    server.lock("renew", json!({"key": "k", "ttl": "20s"}));
    // Past the first lease's end, the renewed lease still holds.
    thread::sleep((first + Duration::from_millis(3500)).saturating_duration_since(Instant::now()));
    assert_eq!(server.locks()["renew"]["locked_by"], json!({"k": 2}));
}

#[test]
fn a_renewal_refreshes_the_lease_without_counting_up_and_acquires_when_not_held() {
    let server = Server::start();
    let taken = server.lock("renewed", json!({"key": "k", "ttl": "3s"}));
    assert_eq!(taken.status, 200, "{}", taken.body);
    // The first lease started before its answer came: it ends by 3 s past this instant.
    let first = Instant::now();
    let generation = taken.json()["generation"].clone();
    thread::sleep(Duration::from_millis(500));
    let renewed = server.lock("renewed", json!({"key": "k", "ttl": "20s", "renew": true}));
    assert_eq!(renewed.status, 200, "{}", renewed.body);
    assert_eq!(renewed.json()["generation"], generation);
    // Past the first lease's end, the renewed lease still holds, and the count is still one.
    thread::sleep((first + Duration::from_millis(3500)).saturating_duration_since(Instant::now()));
    assert_eq!(server.locks()["renewed"]["locked_by"], json!({"k": 1}));
    // One release frees it.
    assert_eq!(server.unlock("renewed", json!({"key": "k"})).status, 200);
    assert_eq!(server.locks(), json!({}));
    // A renewal of a hold that is gone is an ordinary acquire: a new holding, count one.
    let again = server.lock("renewed", json!({"key": "k", "renew": true}));
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(again.json()["generation"].as_u64() > generation.as_u64());
    assert_eq!(server.locks()["renewed"]["locked_by"], json!({"k": 1}));
    // Another key's renewal does not get in.
    let other = server.lock("renewed", json!({"key": "other", "renew": true}));
    assert_eq!(other.status, 423, "{}", other.body);
}

#[test]
fn leases_and_generations_survive_a_restart_and_expire_while_down() {
    let server = Server::start();
    let short = server.lock("short", json!({"key": "k", "ttl": "1s"}));
    let long = server.lock("long", json!({"key": "k", "ttl": "1h"}));
    let long_generation = long.json()["generation"].as_u64().expect("generation");
    assert!(short.json()["generation"].as_u64().expect("generation") < long_generation);
    let expires_at = server.locks()["long"]["expires_at"].clone();
    let mut server = server;
    server.kill();
    thread::sleep(Duration::from_millis(1200));
    let server = server.restart();
    let locks = server.locks();
    assert!(locks.get("short").is_none(), "expired while down: {locks}");
    assert_eq!(locks["long"]["expires_at"], expires_at);
    assert_eq!(locks["long"]["generation"], json!(long_generation));
    let next = server.lock("new", json!({"key": "k"}));
    assert!(next.json()["generation"].as_u64().expect("generation") > long_generation);
}

#[test]
fn generations_strictly_increase_across_locks_and_holdings() {
    let server = Server::start();
    let mut last = 0;
    for i in 0..10 {
        let name = format!("g{}", i % 3);
        let reply = server.lock(&name, json!({"key": format!("k{i}")}));
        let generation = reply.json()["generation"].as_u64().expect("generation");
        assert!(generation > last, "{generation} after {last}");
        last = generation;
        server.unlock(&name, json!({"key": format!("k{i}")}));
    }
    // Joining a holding under the same key answers that holding's generation.
    let first = server.lock("join", json!({"key": "k", "requestor": "a"}));
    let second = server.lock("join", json!({"key": "k", "requestor": "b"}));
    assert_eq!(first.json()["generation"], second.json()["generation"]);
    assert_eq!(
        server.locks()["join"]["generation"],
        first.json()["generation"]
    );
}

#[test]
fn status_shows_holder_info_and_free_locks_are_404() {
    let server = Server::start();
    let info = json!({"team": "main", "pipeline": "deploy", "job": "prod", "build": "42"});
    server.lock("env", json!({"key": "k", "requestor": "r", "info": info}));
    let status = call("GET", &server.url("/lock/env"), None);
    assert_eq!(status.status, 200);
    let body = status.json();
    for field in [
        "name",
        "key",
        "locked_by",
        "generation",
        "acquired_at",
        "expires_at",
        "waiters",
        "info",
    ] {
        assert!(body.get(field).is_some(), "{field} missing in {body}");
    }
    assert_eq!(body["info"], info);
    assert_eq!(body["expires_at"], Value::Null);
    assert_eq!(server.locks()["env"]["info"], info);
    let free = call("GET", &server.url("/lock/free"), None);
    assert_eq!(free.status, 404);
    assert!(free.json()["error"].is_string());
}

#[test]
fn force_release_frees_any_key_and_grants_the_next_waiter() {
    let server = Server::start();
    server.lock("stuck", json!({"key": "dead-build"}));
    let (done, results) = mpsc::channel();
    spawn_waiter(&server, "stuck", json!({"key": "next"}), "30s", &done);
    wait_for_waiters(&server, "stuck", 1);
    let forced = call("DELETE", &server.url("/lock/stuck?force=true"), None);
    assert_eq!(forced.status, 200, "{}", forced.body);
    let (key, status, _) = results
        .recv_timeout(Duration::from_secs(10))
        .expect("grant");
    assert_eq!((key.as_str(), status), ("next", 200));
    server.wait_for_log("force-released", 1);
    let log = server.log();
    assert!(
        log.contains("WARN") && log.contains("force-released") && log.contains("dead-build"),
        "{log}"
    );
    // Behind auth when auth is on.
    let guarded = common::server().auth("u", "p").start();
    assert_eq!(
        call("DELETE", &guarded.url("/lock/x?force=true"), None).status,
        401
    );
}

#[test]
fn bad_durations_and_oversized_info_are_refused() {
    let server = Server::start();
    let cases = [
        ("/lock/x?wait=soon", json!({"key": "k"})),
        ("/lock/x?wait=-1", json!({"key": "k"})),
        ("/lock/x", json!({"key": "k", "wait": "forever"})),
        ("/lock/x", json!({"key": "k", "ttl": "3 fortnights"})),
        ("/lock/x", json!({"key": "k", "ttl": -5})),
        ("/lock/x", json!({"key": "k", "ttl": 1.5})),
        ("/lock/x", json!({"key": "k", "ttl": 1e300})),
        (
            "/lock/x",
            json!({"key": "k", "info": {"a": "x".repeat(1100)}}),
        ),
        (
            "/lock/x",
            json!({"key": "k", "info": {"nested": {"no": "pe"}}}),
        ),
    ];
    for (path, body) in cases {
        let reply = call("PUT", &server.url(path), Some(&body.to_string()));
        assert_eq!(reply.status, 400, "{path} {body}: {}", reply.body);
        assert!(reply.json()["error"].is_string());
    }
    let many: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let reply = server.lock("x", json!({"key": "k", "info": many}));
    assert_eq!(reply.status, 400);
    assert_eq!(server.locks(), json!({}));
}

#[test]
fn too_many_waiters_get_503() {
    let server = common::server().env("LOCKER_MAX_WAITERS", "2").start();
    server.lock("full", json!({"key": "holder"}));
    let (done, _results) = mpsc::channel();
    for key in ["w1", "w2"] {
        spawn_waiter(&server, "full", json!({"key": key}), "30s", &done);
    }
    wait_for_waiters(&server, "full", 2);
    let reply = call(
        "PUT",
        &server.url("/lock/full?wait=5s"),
        Some(r#"{"key":"w3"}"#),
    );
    assert_eq!(reply.status, 503);
    assert!(reply.error().contains("too many"), "{}", reply.body);
}

#[test]
fn a_waiting_acquire_of_a_free_lock_takes_no_waiter_slot() {
    let server = common::server().env("LOCKER_MAX_WAITERS", "1").start();
    server.lock("full", json!({"key": "holder"}));
    let (done, _results) = mpsc::channel();
    spawn_waiter(&server, "full", json!({"key": "w1"}), "30s", &done);
    wait_for_waiters(&server, "full", 1);
    // The only waiter slot is taken, but this request never has to wait.
    let asked = Instant::now();
    let reply = call(
        "PUT",
        &server.url("/lock/free?wait=60s"),
        Some(r#"{"key":"k"}"#),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    // Far less than the 60 s it asked to wait (a bound, not a speed).
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "{:?}",
        asked.elapsed()
    );
    // A request that would queue is still refused.
    let reply = call(
        "PUT",
        &server.url("/lock/free?wait=10s"),
        Some(r#"{"key":"other"}"#),
    );
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(reply.error().contains("too many"), "{}", reply.body);
}

#[test]
fn wait_free_requests_count_against_the_waiter_limit() {
    let server = common::server().env("LOCKER_MAX_WAITERS", "1").start();
    server.lock("busy", json!({"key": "holder"}));
    server.lock("other", json!({"key": "holder"}));
    let url = server.url("/lock/busy?wait_free=30s");
    let poller = thread::spawn(move || call("GET", &url, None));
    server.wait_for_metric("locker_waiting_requests 1");
    // The one slot is the poller's: neither another wait_free nor a waiting acquire gets in.
    let refused = call("GET", &server.url("/lock/other?wait_free=10s"), None);
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.error().contains("too many"), "{}", refused.body);
    let refused = call(
        "PUT",
        &server.url("/lock/other?wait=10s"),
        Some(r#"{"key":"w"}"#),
    );
    assert_eq!(refused.status, 503, "{}", refused.body);
    // A wait_free of a free lock answers at once, counted or not.
    let free = call("GET", &server.url("/lock/idle?wait_free=10s"), None);
    assert_eq!(free.status, 200, "{}", free.body);
    assert_eq!(free.json()["free"], json!(true));
    server.unlock("busy", json!({"key": "holder"}));
    let reply = poller.join().expect("poller");
    assert_eq!(reply.json()["free"], json!(true), "{}", reply.body);
    server.wait_for_metric("locker_waiting_requests 0");
}

// File store only: the etcd store is not told of changes per lock, its `wait_free` asks etcd
// again every 50 ms (`store::poll_free`), whatever changed, and counts no wakeups, so neither
// half of this test means anything there. Its waiter-limit side is shared:
// `wait_free_requests_count_against_the_waiter_limit` runs on both.
#[test]
fn a_wait_free_is_woken_only_by_changes_to_its_own_lock() {
    let server = Server::start();
    server.lock("a", json!({"key": "holder"}));
    let url = server.url("/lock/a?wait_free=30s");
    let poller = thread::spawn(move || call("GET", &url, None));
    server.wait_for_metric("locker_waiting_requests 1");
    for _ in 0..20 {
        assert_eq!(server.lock("b", json!({"key": "k"})).status, 200);
        assert_eq!(server.unlock("b", json!({"key": "k"})).status, 200);
    }
    assert_eq!(server.metric("locker_wait_free_wakeups_total"), 0.0);
    server.unlock("a", json!({"key": "holder"}));
    let reply = poller.join().expect("poller");
    assert_eq!(reply.json()["free"], json!(true), "{}", reply.body);
    assert_eq!(server.metric("locker_wait_free_wakeups_total"), 1.0);
}

#[test]
fn the_default_ttl_applies_when_a_request_gives_none() {
    let server = common::server().env("LOCKER_DEFAULT_TTL", "1h").start();
    server.lock("d", json!({"key": "k"}));
    server.lock("e", json!({"key": "k", "ttl": 0}));
    let locks = server.locks();
    assert!(locks["d"]["expires_at"].is_string(), "{locks}");
    assert_eq!(locks["e"]["expires_at"], Value::Null);
}

also_on_etcd!(
    waiters_are_served_in_arrival_order,
    a_same_key_request_does_not_jump_a_queued_waiter_with_another_key,
    a_wait_that_runs_out_answers_423_naming_the_holder,
    waits_are_clamped_to_the_server_maximum,
    a_waiter_whose_client_disconnects_is_never_granted,
    a_lease_that_runs_out_releases_the_hold_and_grants_the_next_waiter,
    acquiring_again_renews_the_lease,
    a_renewal_refreshes_the_lease_without_counting_up_and_acquires_when_not_held,
    leases_and_generations_survive_a_restart_and_expire_while_down,
    generations_strictly_increase_across_locks_and_holdings,
    status_shows_holder_info_and_free_locks_are_404,
    force_release_frees_any_key_and_grants_the_next_waiter,
    bad_durations_and_oversized_info_are_refused,
    too_many_waiters_get_503,
    a_waiting_acquire_of_a_free_lock_takes_no_waiter_slot,
    wait_free_requests_count_against_the_waiter_limit,
    the_default_ttl_applies_when_a_request_gives_none,
);
