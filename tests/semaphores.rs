//! Semaphores (locks with N slots) and waiting until a lock is free.

mod common;

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

#[test]
fn a_lease_or_force_release_frees_a_slot_for_the_next_waiter() {
    let server = Server::start();
    server.lock("pool", json!({"key": "short", "slots": 2, "ttl": "1s"}));
    server.lock("pool", json!({"key": "long", "slots": 2}));
    let started = Instant::now();
    let reply = call(
        "PUT",
        &server.url("/lock/pool?wait=10s"),
        Some(r#"{"key":"next"}"#),
    );
    assert_eq!(reply.status, 200);
    assert!(started.elapsed() < Duration::from_secs(5));
    let forced = call("DELETE", &server.url("/lock/pool?force=true"), None);
    assert_eq!(forced.status, 200);
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
    thread::sleep(Duration::from_millis(300));
    server.unlock("busy", json!({"key": "holder"}));
    let released = Instant::now();
    let (status, body, answered) = waiting.join().expect("waiter");
    assert_eq!((status, body["free"].clone()), (200, json!(true)));
    assert!(answered.duration_since(released) < Duration::from_secs(2));
    // Waiting for free took nothing.
    assert_eq!(server.locks(), json!({}));
    let bad = call("GET", &server.url("/lock/busy?wait_free=eventually"), None);
    assert_eq!(bad.status, 400);
}
