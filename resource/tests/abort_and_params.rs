//! Abort safety of `out` (SIGTERM/SIGINT while waiting), the semaphore and build-end params,
//! and `lock_op: wait`, with the real server or a loopback stub.

#[path = "../../tests/common/mod.rs"]
pub mod common;
pub mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Concourse, Stub, build_env, forward, run, start, wait_for_log};

fn source(server: &common::Server, lock: &str) -> Value {
    json!({"locker_uri": server.base, "lock_name": lock, "retry_interval": "200ms"})
}

fn out(source: &Value, params: Value) -> Value {
    json!({"source": source, "params": params})
}

fn held_key(server: &common::Server, name: &str) -> Option<String> {
    server.locks()[name]["key"].as_str().map(str::to_string)
}

/// The resource waiting for a held lock is stopped by a signal: it exits non-zero within a
/// second, says so, and never becomes the holder once the lock is released.
fn stopped_by(signal: i32, name: &str) {
    let server = common::Server::start();
    let src = source(&server, name);
    let holder = server.lock(name, json!({"key": "holder"}));
    assert_eq!(holder.status, 200, "{}", holder.body);
    let dir = common::temp_dir();
    let waiting = start(
        "out",
        Some(dir.path()),
        &out(&src, json!({"key": "waiter", "lock_op": "lock"})),
        &build_env("deploy", "1"),
    );
    wait_for_log(&waiting, "is held by key \"holder\"");
    // The long-poll is in flight now: the server has it queued.
    common::wait_for_waiters(&server, name, 1);
    waiting.signal(signal);
    // No wait_timeout: only the signal ends this run (the bound is generous, not a speed).
    let outcome = waiting.finish(Duration::from_secs(20));
    let error = outcome.error();
    assert!(error.contains("stopped by SIG"), "{error}");
    assert!(error.contains("acquiring lock"), "{error}");

    // The server let the gone waiter go; the holder releases: the lock is free, the stopped
    // waiter never holds it (a queued waiter would be granted by this very release).
    common::wait_for_waiters(&server, name, 0);
    let released = server.unlock(name, json!({"key": "holder"}));
    assert_eq!(released.status, 200, "{}", released.body);
    assert_eq!(held_key(&server, name), None, "{}", server.locks());
    // The next waiter gets it.
    let next = server.lock(name, json!({"key": "next"}));
    assert_eq!(next.status, 200, "{}", next.body);
    assert_eq!(held_key(&server, name).as_deref(), Some("next"));
}

#[test]
fn sigterm_while_waiting_exits_at_once_and_never_takes_the_lock() {
    stopped_by(libc::SIGTERM, "abort-term");
}

#[test]
fn sigint_while_waiting_exits_at_once_and_never_takes_the_lock() {
    stopped_by(libc::SIGINT, "abort-int");
}

/// A grant that raced with the signal (the real server granted, its answer was still on its
/// way) is released with the resource's key and requestor: a stub in front of the real server
/// forwards the acquire at once and withholds the grant until the resource has exited.
#[test]
fn a_grant_racing_the_signal_is_released() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let server = common::Server::start();
    let exited = Arc::new(AtomicBool::new(false));
    let (real, answer_now) = (server.base.clone(), exited.clone());
    let stub = Stub::start(move |request| {
        let answer = forward(&real, request);
        if request.method == "PUT" {
            // Granted by the real server; the grant "arrives" only after the resource exited.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !answer_now.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        answer
    });
    let src = json!({"locker_uri": stub.base, "lock_name": "race"});
    let dir = common::temp_dir();
    let waiting = start(
        "out",
        Some(dir.path()),
        &out(
            &src,
            json!({"key": "k1", "locked_by": "r1", "lock_op": "lock"}),
        ),
        &build_env("deploy", "1"),
    );
    // The real server granted the acquire: the race is on.
    let deadline = Instant::now() + Duration::from_secs(20);
    while held_key(&server, "race").as_deref() != Some("k1") {
        assert!(
            Instant::now() < deadline,
            "never granted: {}",
            server.locks()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    waiting.signal(libc::SIGTERM);
    let outcome = waiting.finish(Duration::from_secs(20));
    exited.store(true, Ordering::SeqCst);
    let error = outcome.error();
    assert!(error.contains("released key \"k1\" as \"r1\""), "{error}");
    // Released on the real server, under the resource's key and requestor.
    assert_eq!(held_key(&server, "race"), None, "{}", server.locks());
    let deletes: Vec<Value> = stub
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE" && r.path() == "/lock/race")
        .map(|r| serde_json::from_str(&r.body).expect("JSON body"))
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(deletes[0]["key"], "k1");
    assert_eq!(deletes[0]["requestor"], "r1");
    // Someone else can take it now.
    assert_eq!(server.lock("race", json!({"key": "next"})).status, 200);
}

/// A signal before any acquire was sent (or between tries) releases nothing.
#[test]
fn signal_during_a_get_holds_nothing() {
    let server = common::Server::start();
    let src = source(&server, "in-wait");
    assert_eq!(server.lock("in-wait", json!({"key": "h"})).status, 200);
    let dir = common::temp_dir();
    let waiting = start(
        "in",
        Some(dir.path()),
        &json!({"source": src, "params": {"lock_op": "wait"}}),
        &[],
    );
    wait_for_log(&waiting, "is held by");
    waiting.signal(libc::SIGTERM);
    let outcome = waiting.finish(Duration::from_secs(5));
    assert!(outcome.elapsed < Duration::from_secs(5));
    assert!(outcome.error().contains("holding no lock"));
}

/// Against the real server: `slots` makes a semaphore of that many slots, and
/// `release_when_build_ends` makes the server release the holding once Concourse (a stand-in
/// answering the build's status) says the build has ended.
#[test]
fn slots_and_release_when_build_ends_reach_the_server_and_take_effect() {
    let concourse = Concourse::start("aborted");
    let server = concourse.server();
    let src = source(&server, "envs");
    let dir = common::temp_dir();
    run(
        "out",
        Some(dir.path()),
        &out(&src, json!({"key": "k", "lock_op": "lock", "slots": 40})),
        &build_env("deploy", "5"),
    )
    .json();
    let status = common::call("GET", &server.url("/lock/envs"), None).json();
    assert_eq!(status["slots"], 40, "{status}");
    assert_eq!(status["key"], "k", "{status}");
    assert_eq!(status["info"]["job"], "deploy", "{status}");
    // Without release_when_build_ends nobody asks Concourse about the holding.
    assert!(
        concourse.stub.requests().is_empty(),
        "{:?}",
        concourse.stub.requests()
    );

    run(
        "out",
        Some(dir.path()),
        &out(
            &src,
            json!({"key": "k2", "lock_op": "lock", "release_when_build_ends": true}),
        ),
        &build_env("deploy", "6"),
    )
    .json();
    // The build has ended (aborted): the server releases k2's holding, and only that one
    // (k is the same build's, without release_when_build_ends).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = common::call("GET", &server.url("/lock/envs"), None).json();
        let keys: Vec<&str> = status["holders"]
            .as_array()
            .map(|h| h.iter().filter_map(|h| h["key"].as_str()).collect())
            .unwrap_or_default();
        if keys == ["k"] && server.log().contains("has aborted") {
            break;
        }
        assert!(Instant::now() < deadline, "k2 was kept: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // k (same build, no release_when_build_ends) was kept through every round since.
    assert!(!concourse.stub.requests().is_empty());
}

#[test]
fn without_slots_or_release_when_build_ends_neither_is_sent() {
    // A lock without slots behaves as before.
    let stub = Stub::start(|_| (200, json!({"generation": 1}).to_string()));
    let src = json!({"locker_uri": stub.base, "lock_name": "envs"});
    let dir = common::temp_dir();
    run(
        "out",
        Some(dir.path()),
        &out(&src, json!({"key": "k", "lock_op": "lock"})),
        &build_env("deploy", "5"),
    )
    .json();
    let put = stub
        .requests()
        .into_iter()
        .find(|r| r.method == "PUT")
        .expect("an acquire");
    let body: Value = serde_json::from_str(&put.body).expect("JSON body");
    assert!(body.get("slots").is_none() && body.get("release_when_build_ends").is_none());
}

/// `lock_op: wait` asks once without waiting (to name the holder), then long-polls
/// `?wait_free=` and returns once the lock is free, holding nothing.
#[test]
fn wait_op_long_polls_wait_free_and_takes_nothing() {
    let stub = Stub::start(|request| {
        if request.target.ends_with("wait_free=0s") {
            let status = json!({"name": "smoke", "free": false, "key": "busy",
                                "locked_by": {"busy": 1}, "generation": 3});
            (200, status.to_string())
        } else if request.target.contains("wait_free=") {
            std::thread::sleep(Duration::from_millis(300));
            (200, json!({"name": "smoke", "free": true}).to_string())
        } else {
            (500, json!({"error": "unexpected"}).to_string())
        }
    });
    let src = json!({"locker_uri": stub.base, "lock_name": "smoke", "wait_poll": "30s"});
    let dir = common::temp_dir();
    let outcome = run(
        "out",
        Some(dir.path()),
        &out(&src, json!({"lock_op": "wait"})),
        &build_env("smoke", "1"),
    );
    assert!(outcome.stderr.contains("busy"), "{}", outcome.stderr);
    let response = outcome.json();
    assert_eq!(response["version"]["ref"], "free");
    let targets: Vec<String> = stub.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(
        targets,
        ["/lock/smoke?wait_free=0s", "/lock/smoke?wait_free=30s"],
        "no sleeping between tries: one long poll"
    );
}

/// Against a server without `?wait_free` (the original Go locker has no `GET /lock/{name}` and
/// answers 404), `lock_op: wait` reads `GET /locks` every `retry_interval` until free; as a get
/// param too. A stub in front of the real server answers `GET /lock/...` with 404 and forwards
/// the rest.
#[test]
fn wait_op_falls_back_to_polling_and_works_as_a_get_param() {
    let server = common::Server::start();
    let real = server.base.clone();
    let original = Stub::start(move |request| {
        if request.method == "GET" && request.path().starts_with("/lock/") {
            (404, "404 page not found".to_string())
        } else {
            forward(&real, request)
        }
    });
    let src = json!({"locker_uri": original.base, "lock_name": "env",
                     "retry_interval": "200ms"});
    let dir = common::temp_dir();
    for (command, request) in [
        ("out", out(&src, json!({"lock_op": "wait"}))),
        ("in", json!({"source": src, "params": {"lock_op": "wait"}})),
    ] {
        assert_eq!(server.lock("env", json!({"key": "busy"})).status, 200);
        let lists_before = lists(&original);
        let waiting = start(command, Some(dir.path()), &request, &build_env("s", "1"));
        wait_for_log(&waiting, "the server cannot wait until a lock is free");
        wait_for_log(&waiting, "is held by key \"busy\"");
        // Polling: more than one look at the list while the lock is held.
        let deadline = Instant::now() + Duration::from_secs(20);
        while lists(&original) < lists_before + 2 {
            assert!(Instant::now() < deadline, "{command}: no polling");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(server.unlock("env", json!({"key": "busy"})).status, 200);
        let done = waiting.finish(Duration::from_secs(20));
        done.json();
        assert!(done.stderr.contains("is free after"), "{}", done.stderr);
        assert_eq!(held_key(&server, "env"), None, "{command} took the lock");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("lock")).expect("lock file"),
        ""
    );
    // Nothing but the fallback was used: the only acquire-free way is `GET /locks`.
    assert!(
        original
            .requests()
            .iter()
            .all(|r| r.method == "GET" && (r.path() == "/locks" || r.path() == "/lock/env")),
        "{:?}",
        original.requests()
    );

    // wait_timeout gives up, naming the holder.
    assert_eq!(server.lock("env", json!({"key": "busy"})).status, 200);
    let outcome = run(
        "out",
        Some(dir.path()),
        &out(&src, json!({"lock_op": "wait", "wait_timeout": "500ms"})),
        &[],
    );
    let error = outcome.error();
    assert!(
        error.contains("gave up waiting") && error.contains("busy"),
        "{error}"
    );
}

/// How many `GET /locks` the stub has seen.
fn lists(stub: &Stub) -> usize {
    stub.requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path() == "/locks")
        .count()
}
