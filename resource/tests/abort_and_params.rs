//! Abort safety of `out` (SIGTERM/SIGINT while waiting), the semaphore and build-end params,
//! and `lock_op: wait`, with the real server or a loopback stub.

#[path = "../../tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Stub, build_env, run, start};

fn source(server: &common::Server, lock: &str) -> Value {
    json!({"locker_uri": server.base, "lock_name": lock, "retry_interval": "200ms"})
}

fn out(source: &Value, params: Value) -> Value {
    json!({"source": source, "params": params})
}

/// Waits until `running`'s stderr contains `text`.
fn wait_for_log(running: &support::Running, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !running.stderr().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} in:\n{}",
            running.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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
    // The long-poll is in flight now.
    std::thread::sleep(Duration::from_millis(200));
    let signalled = Instant::now();
    waiting.signal(signal);
    let outcome = waiting.finish(Duration::from_secs(5));
    let took = signalled.elapsed();
    assert!(took < Duration::from_millis(1200), "exit took {took:?}");
    let error = outcome.error();
    assert!(error.contains("stopped by SIG"), "{error}");
    assert!(error.contains("acquiring lock"), "{error}");

    // The original holder releases: the lock is free, the stopped waiter never holds it.
    let released = server.unlock(name, json!({"key": "holder"}));
    assert_eq!(released.status, 200, "{}", released.body);
    std::thread::sleep(Duration::from_millis(300));
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

/// A grant that raced with the signal (the server granted, the answer was still on its way) is
/// released with the resource's key and requestor.
#[test]
fn a_grant_racing_the_signal_is_released() {
    let stub = Stub::start(|request| {
        if request.method == "PUT" {
            // The grant "arrives" only after the signal.
            std::thread::sleep(Duration::from_secs(3));
            (
                200,
                json!({"response": "granted", "generation": 9}).to_string(),
            )
        } else if request.method == "DELETE" {
            (200, json!({"response": "released"}).to_string())
        } else {
            (200, "{}".to_string())
        }
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
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stub.requests().iter().any(|r| r.method == "PUT") {
        assert!(Instant::now() < deadline, "no acquire request");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    let signalled = Instant::now();
    waiting.signal(libc::SIGTERM);
    let outcome = waiting.finish(Duration::from_secs(5));
    assert!(signalled.elapsed() < Duration::from_millis(1200));
    let error = outcome.error();
    assert!(error.contains("released key \"k1\" as \"r1\""), "{error}");
    let deletes: Vec<Value> = stub
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE" && r.path() == "/lock/race")
        .map(|r| serde_json::from_str(&r.body).expect("JSON body"))
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(deletes[0]["key"], "k1");
    assert_eq!(deletes[0]["requestor"], "r1");
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

#[test]
fn slots_and_release_when_build_ends_are_sent_with_the_acquire() {
    let stub = Stub::start(|request| match request.method.as_str() {
        "PUT" => (200, json!({"response": "ok", "generation": 1}).to_string()),
        _ => (200, "{}".to_string()),
    });
    let src = json!({"locker_uri": stub.base, "lock_name": "envs"});
    let dir = common::temp_dir();
    run(
        "out",
        Some(dir.path()),
        &out(
            &src,
            json!({"key": "k", "lock_op": "lock", "slots": 40,
                   "release_when_build_ends": true}),
        ),
        &build_env("deploy", "5"),
    )
    .json();
    let put = stub
        .requests()
        .into_iter()
        .find(|r| r.method == "PUT")
        .expect("an acquire");
    let body: Value = serde_json::from_str(&put.body).expect("JSON body");
    assert_eq!(body["slots"], 40);
    assert_eq!(body["release_when_build_ends"], true);
    assert_eq!(body["info"]["job"], "deploy");

    // Without them, neither is sent (a lock without slots behaves as before).
    let stub2 = Stub::start(|_| (200, json!({"generation": 1}).to_string()));
    let src2 = json!({"locker_uri": stub2.base, "lock_name": "envs"});
    run(
        "out",
        Some(dir.path()),
        &out(&src2, json!({"key": "k", "lock_op": "lock"})),
        &build_env("deploy", "5"),
    )
    .json();
    let put = stub2
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

/// Against a server that ignores `?wait_free` (answers the status at once, or 404 when free),
/// `lock_op: wait` checks every `retry_interval` until free; as a get param too.
#[test]
fn wait_op_falls_back_to_polling_and_works_as_a_get_param() {
    let server = common::Server::start();
    let src = source(&server, "env");
    let dir = common::temp_dir();
    for (command, request) in [
        ("out", out(&src, json!({"lock_op": "wait"}))),
        ("in", json!({"source": src, "params": {"lock_op": "wait"}})),
    ] {
        assert_eq!(server.lock("env", json!({"key": "busy"})).status, 200);
        let waiting = start(command, Some(dir.path()), &request, &build_env("s", "1"));
        wait_for_log(&waiting, "is held by key \"busy\"");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(server.unlock("env", json!({"key": "busy"})).status, 200);
        let done = waiting.finish(Duration::from_secs(5));
        done.json();
        assert_eq!(held_key(&server, "env"), None, "{command} took the lock");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("lock")).expect("lock file"),
        ""
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
