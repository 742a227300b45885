//! Semaphores (locks with N slots) and waiting until a lock is free.

pub mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Server, call, wait_for_waiters};
use serde_json::{Value, json};

#[test]
fn a_semaphore_admits_n_distinct_keys_and_serves_waiters_in_order() {
    let server = Server::start();
    for key in ["k1", "k2", "k3"] {
        let reply = server.lock("envs", json!({"key": key, "slots": 3}));
        assert_eq!(reply.status, 200, "{key}: {}", reply.body);
    }
    let full = server.lock("envs", json!({"key": "k4", "slots": 3}));
    assert_eq!(full.status, 423);
    // The same key joins its own slot.
    assert_eq!(
        server
            .lock(
                "envs",
                json!({"key": "k2", "requestor": "other", "slots": 3})
            )
            .status,
        200
    );

    let status = call("GET", &server.url("/lock/envs"), None).json();
    assert_eq!(status["slots"], 3);
    let holders = status["holders"].as_array().expect("holders");
    let keys: Vec<&str> = holders.iter().filter_map(|h| h["key"].as_str()).collect();
    assert_eq!(keys, ["k1", "k2", "k3"]);
    assert_eq!(holders[1]["locked_by"], json!({"k2": 1, "other": 1}));
    // The original fields describe the oldest holding.
    assert_eq!(status["key"], "k1");
    assert_eq!(status["locked_by"], json!({"k1": 1}));
    // Every holding has its own generation.
    let generations: Vec<u64> = holders
        .iter()
        .filter_map(|h| h["generation"].as_u64())
        .collect();
    assert!(
        generations.windows(2).all(|w| w[0] < w[1]),
        "{generations:?}"
    );

    let (done, granted) = mpsc::channel();
    for key in ["w1", "w2"] {
        let url = server.url("/lock/envs?wait=30s");
        let done = done.clone();
        thread::spawn(move || {
            let reply = call("PUT", &url, Some(&json!({"key": key}).to_string()));
            let _ = done.send((key, reply.status));
        });
        wait_for_waiters(&server, "envs", if key == "w1" { 1 } else { 2 });
    }
    server.unlock("envs", json!({"key": "k3"}));
    assert_eq!(
        granted
            .recv_timeout(Duration::from_secs(10))
            .expect("grant"),
        ("w1", 200)
    );
    server.unlock("envs", json!({"key": "k1"}));
    assert_eq!(
        granted
            .recv_timeout(Duration::from_secs(10))
            .expect("grant"),
        ("w2", 200)
    );
    let keys: Vec<Value> = server.locks()["envs"]["holders"]
        .as_array()
        .expect("holders")
        .iter()
        .map(|h| h["key"].clone())
        .collect();
    assert_eq!(keys, [json!("k2"), json!("w1"), json!("w2")]);
}

#[test]
fn naming_a_different_slot_count_is_a_conflict() {
    let server = Server::start();
    assert_eq!(
        server.lock("sem", json!({"key": "a", "slots": 2})).status,
        200
    );
    let reply = server.lock("sem", json!({"key": "b", "slots": 5}));
    assert_eq!(reply.status, 409, "{}", reply.body);
    assert!(reply.error().contains('2'), "{}", reply.body);
    // Not naming slots joins whatever the lock has.
    assert_eq!(server.lock("sem", json!({"key": "b"})).status, 200);
    for bad in [json!(0), json!(-1), json!(100_001), json!("two")] {
        let reply = server.lock("other", json!({"key": "a", "slots": bad}));
        assert_eq!(reply.status, 400, "{bad}: {}", reply.body);
    }
}

/// The holders' keys of `name`, oldest first.
fn holder_keys(server: &Server, name: &str) -> Vec<String> {
    let status = call("GET", &server.url(&format!("/lock/{name}")), None).json();
    status["holders"]
        .as_array()
        .map(|holders| {
            holders
                .iter()
                .filter_map(|h| h["key"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_lease_or_force_release_frees_a_slot_for_the_next_waiter() {
    let server = Server::start();
    // The lease can only have started after this instant, so it cannot end before 1 s past it.
    let before_lease = Instant::now();
    let short = server.lock("pool", json!({"key": "short", "slots": 2, "ttl": "1s"}));
    assert_eq!(short.status, 200, "{}", short.body);
    let long = server.lock("pool", json!({"key": "long", "slots": 2}));
    assert_eq!(long.status, 200, "{}", long.body);
    // Both slots are taken: a third key is refused at once.
    let full = server.lock("pool", json!({"key": "third"}));
    assert_eq!(full.status, 423, "{}", full.body);

    let reply = call(
        "PUT",
        &server.url("/lock/pool?wait=30s"),
        Some(r#"{"key":"next"}"#),
    );
    let waited = before_lease.elapsed();
    assert_eq!(reply.status, 200, "{}", reply.body);
    // Granted by the lease's end, not before it (a lease that ends early, or a slot count
    // that admits a third key at once, fails here).
    assert!(
        waited >= Duration::from_millis(1000),
        "granted after {waited:?}, before the 1 s lease ended"
    );
    assert_eq!(holder_keys(&server, "pool"), ["long", "next"]);

    // A force release with a waiter queued: everything held goes, and the waiter gets in.
    let url = server.url("/lock/pool?wait=30s");
    let waiter = thread::spawn(move || call("PUT", &url, Some(r#"{"key":"after-force"}"#)));
    wait_for_waiters(&server, "pool", 1);
    assert_eq!(holder_keys(&server, "pool"), ["long", "next"]);
    let forced = call("DELETE", &server.url("/lock/pool?force=true"), None);
    assert_eq!(forced.status, 200, "{}", forced.body);
    let granted = waiter.join().expect("waiter");
    assert_eq!(granted.status, 200, "{}", granted.body);
    assert_eq!(holder_keys(&server, "pool"), ["after-force"]);
    // Still a semaphore of two: one more key fits, a third does not.
    assert_eq!(server.lock("pool", json!({"key": "long"})).status, 200);
    assert_eq!(server.lock("pool", json!({"key": "third"})).status, 423);

    let forced = call("DELETE", &server.url("/lock/pool?force=true"), None);
    assert_eq!(forced.status, 200, "{}", forced.body);
    assert_eq!(server.locks(), json!({}));
    // After a force release the lock starts over, with any slot count.
    assert_eq!(
        server.lock("pool", json!({"key": "x", "slots": 4})).status,
        200
    );
}

#[test]
fn wait_free_returns_when_the_lock_is_released_and_takes_nothing() {
    let server = Server::start();
    let free = call("GET", &server.url("/lock/idle?wait_free=5s"), None);
    assert_eq!(free.status, 200);
    assert_eq!(free.json(), json!({"name": "idle", "free": true}));

    server.lock("busy", json!({"key": "holder"}));
    let started = Instant::now();
    let still = call("GET", &server.url("/lock/busy?wait_free=300ms"), None);
    assert_eq!(still.status, 200);
    let body = still.json();
    assert_eq!(body["free"], false);
    assert_eq!(body["key"], "holder");
    assert!(started.elapsed() >= Duration::from_millis(250));

    let url = server.url("/lock/busy?wait_free=20s");
    let waiting = thread::spawn(move || {
        let reply = call("GET", &url, None);
        (reply.status, reply.json(), Instant::now())
    });
    // The request is waiting (counted by the server), not merely sent.
    server.wait_for_metric("locker_waiting_requests 1");
    let releasing = Instant::now();
    assert_eq!(server.unlock("busy", json!({"key": "holder"})).status, 200);
    let (status, body, answered) = waiting.join().expect("waiter");
    // Free, so woken by the release: at its 20 s deadline it would say `"free": false`.
    assert_eq!((status, body["free"].clone()), (200, json!(true)), "{body}");
    assert!(answered >= releasing);
    // Waiting for free took nothing.
    assert_eq!(server.locks(), json!({}));
    let bad = call("GET", &server.url("/lock/busy?wait_free=eventually"), None);
    assert_eq!(bad.status, 400);
}
