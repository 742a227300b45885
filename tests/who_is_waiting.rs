//! Who is waiting (docs/history.md): `GET /lock/{name}` and `GET /pool/{pool}` list their
//! queue in arrival order, each waiter's key, requestor, info and since when it waits (and for
//! a pool's claim the item it asks for), and the list shrinks as waiters are served or leave.
//! Against the real binary, on the file store and again on etcd.

pub mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, SystemTime};

use common::{Server, call, wait_for_waiters, wait_until};
use serde_json::{Value, json};

/// Starts a waiting `PUT` of `path` (a lock or a claim) in a thread; its key and status come
/// back on the channel once it is answered.
fn spawn_waiter(server: &Server, path: &str, body: Value, done: &mpsc::Sender<(String, u16)>) {
    let url = server.url(&format!("{path}?wait=60s"));
    let done = done.clone();
    thread::spawn(move || {
        let key = body["key"].as_str().unwrap_or_default().to_string();
        let reply = call("PUT", &url, Some(&body.to_string()));
        let _ = done.send((key, reply.status));
    });
}

fn get(server: &Server, path: &str) -> Value {
    let reply = call("GET", &server.url(path), None);
    assert_eq!(reply.status, 200, "GET {path}: {}", reply.body);
    reply.json()
}

/// The keys of a status's `queue`, front first.
fn queued_keys(status: &Value) -> Vec<String> {
    status["queue"]
        .as_array()
        .unwrap_or_else(|| panic!("no queue in {status}"))
        .iter()
        .map(|w| w["key"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn wait_for_queue(server: &Server, path: &str, keys: &[&str]) {
    wait_until(&format!("the queue of {path} is {keys:?}"), || {
        queued_keys(&get(server, path)) == keys
    });
}

fn granted(results: &mpsc::Receiver<(String, u16)>) -> (String, u16) {
    results
        .recv_timeout(Duration::from_secs(15))
        .expect("a waiter was answered")
}

fn parse_time(text: &Value) -> SystemTime {
    let text = text
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {text}"));
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

#[test]
fn a_lock_lists_its_queue_in_arrival_order_with_who_and_since_when() {
    let server = Server::start();
    // `since` is written to the millisecond: the earliest it can show is this, rounded down.
    let before = SystemTime::now() - Duration::from_millis(1);
    assert_eq!(server.lock("deploy", json!({"key": "holder"})).status, 200);
    let idle = get(&server, "/lock/deploy");
    assert_eq!(idle["queue"], json!([]), "nobody waits yet: {idle}");

    let (done, _results) = mpsc::channel();
    let waiters = [
        json!({"key": "pipeline-b", "requestor": "build-18",
               "info": {"team": "main", "pipeline": "b", "job": "deploy", "build": "18"}}),
        json!({"key": "pipeline-c", "requestor": "build-3"}),
        json!({"key": "pipeline-a", "requestor": "build-9", "info": {"job": "smoke"}}),
    ];
    for (i, body) in waiters.iter().enumerate() {
        spawn_waiter(&server, "/lock/deploy", body.clone(), &done);
        wait_for_waiters(&server, "deploy", i as u64 + 1);
    }
    let after = SystemTime::now();

    let status = get(&server, "/lock/deploy");
    assert_eq!(status["key"], "holder", "{status}");
    assert_eq!(status["waiters"], 3, "{status}");
    let queue = status["queue"].as_array().expect("queue");
    assert_eq!(
        queued_keys(&status),
        ["pipeline-b", "pipeline-c", "pipeline-a"],
        "arrival order, not key order: {status}"
    );
    let requestors: Vec<_> = queue.iter().map(|w| w["requestor"].clone()).collect();
    assert_eq!(
        requestors,
        [json!("build-18"), json!("build-3"), json!("build-9")]
    );
    assert_eq!(
        queue[0]["info"],
        json!({"team": "main", "pipeline": "b", "job": "deploy", "build": "18"})
    );
    assert_eq!(queue[1]["info"], json!({}), "info is always an object");
    assert_eq!(queue[2]["info"], json!({"job": "smoke"}));
    assert!(queue.iter().all(|w| w.get("item").is_none()), "{status}");
    let since: Vec<SystemTime> = queue.iter().map(|w| parse_time(&w["since"])).collect();
    for (i, at) in since.iter().enumerate() {
        assert!(
            *at >= before && *at <= after,
            "waiter {i} queued at {at:?}, outside [{before:?}, {after:?}]: {status}"
        );
    }
    assert!(
        since.windows(2).all(|pair| pair[0] <= pair[1]),
        "since follows arrival: {status}"
    );
    // A listing shows how many wait, not who.
    let listed = server.locks();
    assert_eq!(listed["deploy"]["waiters"], 3, "{listed}");
    assert!(listed["deploy"].get("queue").is_none(), "{listed}");
}

#[test]
fn the_lock_queue_shrinks_as_waiters_are_served_or_leave() {
    let server = Server::start();
    assert_eq!(server.lock("shrink", json!({"key": "holder"})).status, 200);
    let (done, results) = mpsc::channel();
    spawn_waiter(&server, "/lock/shrink", json!({"key": "first"}), &done);
    wait_for_waiters(&server, "shrink", 1);

    // The second waiter's client will go away: a raw connection we can drop.
    let address = server.base.trim_start_matches("http://").to_string();
    let body = r#"{"key":"leaving"}"#;
    let mut socket = TcpStream::connect(&address).expect("connect");
    write!(
        socket,
        "PUT /lock/shrink?wait=60s HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    wait_for_waiters(&server, "shrink", 2);
    spawn_waiter(&server, "/lock/shrink", json!({"key": "third"}), &done);
    wait_for_queue(&server, "/lock/shrink", &["first", "leaving", "third"]);

    drop(socket);
    wait_for_queue(&server, "/lock/shrink", &["first", "third"]);

    assert_eq!(
        server.unlock("shrink", json!({"key": "holder"})).status,
        200
    );
    assert_eq!(granted(&results), ("first".to_string(), 200));
    let status = get(&server, "/lock/shrink");
    assert_eq!(status["key"], "first", "{status}");
    assert_eq!(queued_keys(&status), ["third"], "{status}");

    assert_eq!(server.unlock("shrink", json!({"key": "first"})).status, 200);
    assert_eq!(granted(&results), ("third".to_string(), 200));
    let status = get(&server, "/lock/shrink");
    assert_eq!(status["key"], "third", "{status}");
    assert_eq!(status["queue"], json!([]), "{status}");
}

#[test]
fn a_pool_lists_its_claim_queue_with_the_item_each_asks_for() {
    let server = Server::start();
    let before = SystemTime::now() - Duration::from_millis(1);
    for item in ["env-1", "env-2"] {
        let added = call(
            "POST",
            &server.url(&format!("/pool/envs/item/{item}")),
            Some(r#"{"metadata":"m"}"#),
        );
        assert_eq!(added.status, 201, "{}", added.body);
    }
    for (item, key) in [("env-1", "holder-1"), ("env-2", "holder-2")] {
        let claimed = call(
            "PUT",
            &server.url(&format!("/pool/envs/item/{item}/claim")),
            Some(&json!({"key": key}).to_string()),
        );
        assert_eq!(claimed.status, 200, "{}", claimed.body);
    }
    assert_eq!(get(&server, "/pool/envs")["queue"], json!([]));

    let (done, results) = mpsc::channel();
    spawn_waiter(
        &server,
        "/pool/envs/item/env-2/claim",
        json!({"key": "wants-2", "requestor": "build-1", "info": {"job": "j"}}),
        &done,
    );
    wait_for_queue(&server, "/pool/envs", &["wants-2"]);
    spawn_waiter(&server, "/pool/envs/claim", json!({"key": "any"}), &done);
    wait_for_queue(&server, "/pool/envs", &["wants-2", "any"]);
    let after = SystemTime::now();

    let status = get(&server, "/pool/envs");
    assert_eq!(status["waiters"], 2, "{status}");
    let queue = status["queue"].as_array().expect("queue");
    assert_eq!(queue[0]["item"], "env-2", "{status}");
    assert_eq!(queue[0]["requestor"], "build-1");
    assert_eq!(queue[0]["info"], json!({"job": "j"}));
    assert!(queue[1].get("item").is_none(), "any item: {status}");
    assert_eq!(
        queue[1]["requestor"], "any",
        "the requestor defaults to the key"
    );
    for waiter in queue {
        let at = parse_time(&waiter["since"]);
        assert!(at >= before && at <= after, "{at:?}: {status}");
    }

    // env-1 freed: the claim of any item takes it, past the one waiting for env-2.
    let freed = call(
        "DELETE",
        &server.url("/pool/envs/item/env-1/claim"),
        Some(r#"{"key":"holder-1"}"#),
    );
    assert_eq!(freed.status, 200, "{}", freed.body);
    assert_eq!(granted(&results), ("any".to_string(), 200));
    assert_eq!(queued_keys(&get(&server, "/pool/envs")), ["wants-2"]);

    let freed = call(
        "DELETE",
        &server.url("/pool/envs/item/env-2/claim"),
        Some(r#"{"key":"holder-2"}"#),
    );
    assert_eq!(freed.status, 200, "{}", freed.body);
    assert_eq!(granted(&results), ("wants-2".to_string(), 200));
    assert_eq!(get(&server, "/pool/envs")["queue"], json!([]));
}

also_on_etcd!(
    a_lock_lists_its_queue_in_arrival_order_with_who_and_since_when,
    the_lock_queue_shrinks_as_waiters_are_served_or_leave,
    a_pool_lists_its_claim_queue_with_the_item_each_asks_for,
);
