//! Pools over HTTP against the real server: items with metadata, claims of any or a named
//! item that wait in one FIFO queue per pool, release by key or by name, add, update (waiting
//! while claimed), remove, checks that wait for a state, leases, departing clients, the state
//! file as the record, and restarts.

pub mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Server, call, server};
use serde_json::{Value, json};

fn add(server: &Server, pool: &str, item: &str, metadata: &str) -> common::Reply {
    call(
        "POST",
        &server.url(&format!("/pool/{pool}/item/{item}")),
        Some(&json!({ "metadata": metadata }).to_string()),
    )
}

/// `PUT` a claim of `item` (any item when `None`), waiting `wait` when given.
fn claim(
    server: &Server,
    pool: &str,
    item: Option<&str>,
    body: Value,
    wait: &str,
) -> common::Reply {
    let path = match item {
        Some(item) => format!("/pool/{pool}/item/{item}/claim"),
        None => format!("/pool/{pool}/claim"),
    };
    let query = if wait.is_empty() {
        String::new()
    } else {
        format!("?wait={wait}")
    };
    call(
        "PUT",
        &server.url(&format!("{path}{query}")),
        Some(&body.to_string()),
    )
}

fn release(server: &Server, pool: &str, item: &str, body: Option<Value>) -> common::Reply {
    call(
        "DELETE",
        &server.url(&format!("/pool/{pool}/item/{item}/claim")),
        body.map(|b| b.to_string()).as_deref(),
    )
}

fn pool(server: &Server, name: &str) -> Value {
    let reply = call("GET", &server.url(&format!("/pool/{name}")), None);
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

fn item(server: &Server, pool_name: &str, item: &str) -> Value {
    pool(server, pool_name)["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["name"] == item)
        .cloned()
        .unwrap_or_else(|| panic!("no item {item} in {pool_name}"))
}

/// Polls `GET /pool/{pool}` until `waiters` is `count` (10 s at most).
fn wait_for_pool_waiters(server: &Server, name: &str, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = call("GET", &server.url(&format!("/pool/{name}")), None);
        if reply.status == 200 && reply.json()["waiters"] == json!(count) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {count} waiter(s): {}",
            reply.body
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `GET /metrics` until `locker_waiting_requests` is `count`: checks and updates that
/// wait for an item count there (claims count in the pool's `waiters`).
fn wait_for_waiting_requests(server: &Server, count: u64) {
    server.wait_for_metric(&format!("locker_waiting_requests {count}"));
}

/// A waiting claim in a thread; (key, status, body) comes back on the channel.
fn spawn_claim(
    server: &Server,
    pool: &str,
    item: Option<&str>,
    key: &str,
    wait: &str,
    done: &mpsc::Sender<(String, u16, Value)>,
) {
    let path = match item {
        Some(item) => format!("/pool/{pool}/item/{item}/claim?wait={wait}"),
        None => format!("/pool/{pool}/claim?wait={wait}"),
    };
    let url = server.url(&path);
    let body = json!({ "key": key }).to_string();
    let key = key.to_string();
    let done = done.clone();
    thread::spawn(move || {
        let reply = call("PUT", &url, Some(&body));
        let json = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
        let _ = done.send((key, reply.status, json));
    });
}

#[test]
fn items_are_added_listed_and_kept_with_their_metadata() {
    let server = server().start();
    let metadata = "url: https://env-1.example\npassword: s3cret\n";
    let reply = add(&server, "aws", "env-1", metadata);
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(reply.json()["changed"], true);
    assert_eq!(add(&server, "aws", "env-2", "{}").status, 201);
    // The same addition again changes nothing; another one is refused.
    let again = add(&server, "aws", "env-1", metadata);
    assert_eq!(
        (again.status, again.json()["changed"].clone()),
        (200, json!(false))
    );
    let other = add(&server, "aws", "env-1", "other");
    assert_eq!(other.status, 409, "{}", other.body);
    assert!(other.error().contains("already exists"), "{}", other.body);

    let status = pool(&server, "aws");
    assert_eq!(status["name"], "aws");
    assert_eq!(status["waiters"], 0);
    let names: Vec<&str> = status["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["env-1", "env-2"]);
    assert_eq!(item(&server, "aws", "env-1")["metadata"], metadata);
    let one = call("GET", &server.url("/pool/aws/item/env-1"), None);
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(one.json()["metadata"], metadata);
    let bad = call("GET", &server.url("/pool/aws/item/env-1?until=free"), None);
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(item(&server, "aws", "env-1")["claimed"], false);
    let list = call("GET", &server.url("/pools"), None).json();
    assert_eq!(
        list,
        json!({"pools": [{"name": "aws", "items": 2, "claimed": 0, "waiters": 0}]})
    );
    let missing = call("GET", &server.url("/pool/nope"), None);
    assert_eq!(missing.status, 404, "{}", missing.body);
}

#[test]
fn an_item_is_added_claimed_with_only_a_key() {
    let server = server().start();
    let body = json!({"metadata": "m", "claim": {"key": "from-git"}}).to_string();
    let reply = call("POST", &server.url("/pool/p/item/a"), Some(&body));
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(item(&server, "p", "a")["holder"]["key"], "from-git");
    // Released by name, as a pipeline's `release:` step of a pool-resource directory does.
    assert_eq!(release(&server, "p", "a", None).json()["released"], true);
    assert_eq!(item(&server, "p", "a")["claimed"], false);
}

#[test]
fn metadata_up_to_64_kib_is_kept_and_more_is_refused() {
    let server = server().start();
    // Quotes and newlines grow in JSON: the body may be far larger than the metadata.
    let largest = "\"\n".repeat(32 * 1024);
    assert_eq!(largest.len(), 64 * 1024);
    let reply = add(&server, "big", "one", &largest);
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(item(&server, "big", "one")["metadata"], largest.as_str());
    let reply = add(&server, "big", "two", &format!("{largest}x"));
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(reply.error().contains("metadata"), "{}", reply.body);
    assert_eq!(
        pool(&server, "big")["items"].as_array().map(Vec::len),
        Some(1)
    );
}

#[test]
fn a_claim_of_any_item_takes_the_one_freed_longest_ago() {
    let server = server().start();
    for name in ["a", "b", "c"] {
        assert_eq!(add(&server, "p", name, name).status, 201);
    }
    let took = |key: &str| {
        let reply = claim(&server, "p", None, json!({ "key": key }), "");
        assert_eq!(reply.status, 200, "{}", reply.body);
        let json = reply.json();
        assert_eq!(
            json["metadata"], json["item"],
            "the metadata comes with the claim"
        );
        json["item"].as_str().expect("item").to_string()
    };
    assert_eq!(took("k1"), "a");
    assert_eq!(took("k2"), "b");
    assert_eq!(
        release(&server, "p", "a", Some(json!({"key": "k1"}))).status,
        200
    );
    // `c` was added before `a` was released.
    assert_eq!(took("k3"), "c");
    assert_eq!(took("k4"), "a");
    let none = claim(&server, "p", None, json!({"key": "k5"}), "");
    assert_eq!(none.status, 423, "{}", none.body);
    assert!(none.error().contains("every item"), "{}", none.body);
}

#[test]
fn waiting_claims_are_served_in_arrival_order() {
    let server = server().start();
    add(&server, "one", "only", "m");
    assert_eq!(
        claim(&server, "one", None, json!({"key": "holder"}), "").status,
        200
    );
    let (done, results) = mpsc::channel();
    let keys = ["w1", "w2", "w3", "w4", "w5"];
    for (i, key) in keys.iter().enumerate() {
        // Alternate claims of any item and of the item by name: one queue for both.
        let named = (i % 2 == 1).then_some("only");
        spawn_claim(&server, "one", named, key, "30s", &done);
        wait_for_pool_waiters(&server, "one", i as u64 + 1);
    }
    let mut holder = "holder".to_string();
    let mut order = Vec::new();
    for _ in keys {
        let reply = release(&server, "one", "only", Some(json!({ "key": holder })));
        assert_eq!(reply.status, 200, "{}", reply.body);
        let (key, status, body) = results
            .recv_timeout(Duration::from_secs(10))
            .expect("a waiter was granted");
        assert_eq!(status, 200, "{body}");
        assert_eq!(item(&server, "one", "only")["holder"]["key"], json!(key));
        order.push(key.clone());
        holder = key;
    }
    assert_eq!(order, keys);
}

#[test]
fn a_waiter_for_a_held_item_does_not_hold_up_a_later_claim_of_another() {
    let server = server().start();
    add(&server, "p", "a", "");
    add(&server, "p", "b", "");
    claim(&server, "p", Some("a"), json!({"key": "holds-a"}), "");
    claim(&server, "p", Some("b"), json!({"key": "holds-b"}), "");
    let (done, results) = mpsc::channel();
    spawn_claim(&server, "p", Some("a"), "wants-a", "30s", &done);
    wait_for_pool_waiters(&server, "p", 1);
    spawn_claim(&server, "p", None, "wants-any", "30s", &done);
    wait_for_pool_waiters(&server, "p", 2);
    release(&server, "p", "b", Some(json!({"key": "holds-b"})));
    let (key, status, body) = results
        .recv_timeout(Duration::from_secs(10))
        .expect("granted");
    assert_eq!((key.as_str(), status), ("wants-any", 200), "{body}");
    assert_eq!(body["item"], "b");
    assert_eq!(
        pool(&server, "p")["waiters"],
        1,
        "the waiter for a still waits"
    );
    release(&server, "p", "a", Some(json!({"key": "holds-a"})));
    let (key, status, body) = results
        .recv_timeout(Duration::from_secs(10))
        .expect("granted");
    assert_eq!((key.as_str(), status), ("wants-a", 200), "{body}");
    assert_eq!(body["item"], "a");
}

#[test]
fn claims_of_what_does_not_exist_fail_at_once() {
    let server = server().start();
    let started = Instant::now();
    let reply = claim(&server, "empty", None, json!({"key": "k"}), "30s");
    assert_eq!(reply.status, 404, "{}", reply.body);
    add(&server, "p", "a", "");
    let reply = claim(&server, "p", Some("nope"), json!({"key": "k"}), "30s");
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert!(reply.error().contains("\"nope\""), "{}", reply.body);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited for nothing"
    );
    let reply = claim(&server, "p", None, json!({"key": "k", "slots": 2}), "");
    assert_eq!(reply.status, 400, "{}", reply.body);
    let reply = claim(&server, "p", None, json!({"nokey": true}), "");
    assert_eq!(reply.status, 400, "{}", reply.body);
}

#[test]
fn a_release_checks_the_key_it_is_given_and_without_one_frees_the_item() {
    let server = server().start();
    add(&server, "p", "a", "");
    let granted = claim(
        &server,
        "p",
        Some("a"),
        json!({"key": "k", "requestor": "r"}),
        "",
    );
    assert_eq!(granted.status, 200, "{}", granted.body);
    let wrong = release(&server, "p", "a", Some(json!({"key": "other"})));
    assert_eq!(wrong.status, 423, "{}", wrong.body);
    assert_eq!(item(&server, "p", "a")["claimed"], true);
    let right = release(
        &server,
        "p",
        "a",
        Some(json!({"key": "k", "requestor": "r"})),
    );
    assert_eq!(right.status, 200, "{}", right.body);
    assert_eq!(right.json()["released"], true);
    assert_eq!(item(&server, "p", "a")["claimed"], false);
    // By name: what pool-resource does with a step that holds only `name` and `metadata`.
    claim(&server, "p", Some("a"), json!({"key": "k2"}), "");
    let forced_before = server.metric("locker_releases_total{outcome=\"forced\"}");
    let by_name = release(&server, "p", "a", None);
    assert_eq!(by_name.status, 200, "{}", by_name.body);
    assert_eq!(by_name.json()["previous"]["key"], "k2");
    assert_eq!(item(&server, "p", "a")["claimed"], false);
    assert_eq!(
        server.metric("locker_releases_total{outcome=\"forced\"}"),
        forced_before + 1.0
    );
    let again = release(&server, "p", "a", None);
    assert_eq!(
        (again.status, again.json()["released"].clone()),
        (200, json!(false))
    );
}

#[test]
fn items_are_removed_claimed_or_not_and_a_key_is_checked() {
    let server = server().start();
    for name in ["free", "held"] {
        add(&server, "p", name, "");
    }
    claim(&server, "p", Some("held"), json!({"key": "k"}), "");
    let url = |name: &str| server.url(&format!("/pool/p/item/{name}"));
    let wrong = call("DELETE", &url("held"), Some(r#"{"key":"other"}"#));
    assert_eq!(wrong.status, 423, "{}", wrong.body);
    let removed = call("DELETE", &url("held"), Some(r#"{"key":"k"}"#));
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert_eq!(removed.json()["previous"]["key"], "k");
    let removed = call("DELETE", &url("free"), None);
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert_eq!(call("DELETE", &url("free"), None).status, 404);
    // A pool with no items and no waiters is gone.
    assert_eq!(call("GET", &server.url("/pool/p"), None).status, 404);
}

#[test]
fn an_update_changes_metadata_adds_if_absent_and_waits_while_claimed() {
    let server = server().start();
    let url = |name: &str, query: &str| server.url(&format!("/pool/p/item/{name}{query}"));
    let put = |name: &str, query: &str, metadata: &str| {
        call(
            "PUT",
            &url(name, query),
            Some(&json!({ "metadata": metadata }).to_string()),
        )
    };
    assert_eq!(put("a", "", "v1").status, 200);
    assert_eq!(item(&server, "p", "a")["metadata"], "v1");
    assert_eq!(put("a", "", "v2").json()["changed"], true);
    assert_eq!(put("a", "", "v2").json()["changed"], false);
    claim(&server, "p", Some("a"), json!({"key": "k"}), "");
    let refused = put("a", "", "v3");
    assert_eq!(refused.status, 423, "{}", refused.body);
    assert_eq!(item(&server, "p", "a")["metadata"], "v2");
    let waiting = {
        let url = url("a", "?wait=30s");
        thread::spawn(move || call("PUT", &url, Some(r#"{"metadata":"v3"}"#)))
    };
    // The server counts the update among its waiting requests once it found the item claimed.
    wait_for_waiting_requests(&server, 1);
    assert!(
        !waiting.is_finished(),
        "answered while the item was claimed"
    );
    assert_eq!(
        item(&server, "p", "a")["metadata"],
        "v2",
        "changed while claimed"
    );
    release(&server, "p", "a", Some(json!({"key": "k"})));
    let reply = waiting.join().expect("update thread");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(item(&server, "p", "a")["metadata"], "v3");
    wait_for_waiting_requests(&server, 0);
    let timed_out = {
        claim(&server, "p", Some("a"), json!({"key": "k"}), "");
        put("a", "?wait=200ms", "v4")
    };
    assert_eq!(timed_out.status, 423, "{}", timed_out.body);
    assert!(
        timed_out.error().contains("timed out"),
        "{}",
        timed_out.body
    );
}

#[test]
fn checks_wait_for_an_item_to_be_unclaimed_or_claimed() {
    let server = server().start();
    add(&server, "p", "a", "m");
    let check = |until: &str, wait: &str| {
        call(
            "GET",
            &server.url(&format!("/pool/p/item/a?until={until}&wait={wait}")),
            None,
        )
    };
    // Already unclaimed: at once.
    let reply = check("unclaimed", "30s");
    assert_eq!(
        (reply.status, reply.json()["claimed"].clone()),
        (200, json!(false))
    );
    // check_unclaimed: waits until someone claims it. Once the server counts it among its
    // waiting requests it has seen the item unclaimed, so its answer can only come after the
    // claim below, and must say so.
    let waiting = {
        let url = server.url("/pool/p/item/a?until=claimed&wait=30s");
        thread::spawn(move || call("GET", &url, None))
    };
    wait_for_waiting_requests(&server, 1);
    assert!(
        !waiting.is_finished(),
        "answered before the item was claimed"
    );
    claim(&server, "p", Some("a"), json!({"key": "k"}), "");
    let reply = waiting.join().expect("check thread");
    assert_eq!(
        (reply.status, reply.json()["claimed"].clone()),
        (200, json!(true))
    );
    wait_for_waiting_requests(&server, 0);
    // check: waits until it is released; when the wait runs out, says it is still claimed.
    let reply = check("unclaimed", "200ms");
    assert_eq!(
        (reply.status, reply.json()["claimed"].clone()),
        (200, json!(true))
    );
    let waiting = {
        let url = server.url("/pool/p/item/a?until=unclaimed&wait=30s");
        thread::spawn(move || call("GET", &url, None))
    };
    wait_for_waiting_requests(&server, 1);
    assert!(
        !waiting.is_finished(),
        "answered before the item was released"
    );
    release(&server, "p", "a", None);
    let reply = waiting.join().expect("check thread");
    assert_eq!(
        (reply.status, reply.json()["claimed"].clone()),
        (200, json!(false))
    );
    // A missing item fails at once.
    let started = Instant::now();
    let reply = call(
        "GET",
        &server.url("/pool/p/item/nope?until=unclaimed&wait=30s"),
        None,
    );
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_claim_with_a_lease_is_freed_when_it_runs_out_and_the_next_waiter_gets_it() {
    let server = server().start();
    const TTL: Duration = Duration::from_secs(1);
    add(&server, "p", "a", "");
    let started = Instant::now();
    let leased = claim(&server, "p", None, json!({"key": "k", "ttl": "1s"}), "");
    assert_eq!(leased.status, 200, "{}", leased.body);
    assert!(item(&server, "p", "a")["holder"]["expires_at"].is_string());
    let next = claim(&server, "p", None, json!({"key": "next"}), "30s");
    assert_eq!(next.status, 200, "{}", next.body);
    // The lease began after `started`; the server keeps times to the millisecond, so it may
    // end up to a millisecond before a full TTL from then, never sooner.
    assert!(
        started.elapsed() >= TTL - Duration::from_millis(1),
        "granted {:?} after the claim, before its {TTL:?} lease ran out",
        started.elapsed()
    );
    assert_eq!(item(&server, "p", "a")["holder"]["key"], "next");
    assert!(next.json()["generation"].as_u64() > leased.json()["generation"].as_u64());
}

#[test]
fn a_waiting_claim_whose_client_went_away_is_withdrawn() {
    use std::io::Write;
    let server = server().start();
    add(&server, "p", "a", "");
    claim(&server, "p", None, json!({"key": "holder"}), "");
    let address = server
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let mut stream = std::net::TcpStream::connect(&address).expect("connect");
    let body = r#"{"key":"departed"}"#;
    write!(
        stream,
        "PUT /pool/p/claim?wait=60s HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    wait_for_pool_waiters(&server, "p", 1);
    drop(stream);
    wait_for_pool_waiters(&server, "p", 0);
    release(&server, "p", "a", Some(json!({"key": "holder"})));
    assert_eq!(
        item(&server, "p", "a")["claimed"],
        false,
        "granted to a client that left"
    );
}

#[test]
fn pools_and_claims_are_in_the_state_file_and_survive_a_restart() {
    let server = server().start();
    add(&server, "aws", "env-1", "url: one\n");
    add(&server, "aws", "env-2", "url: two\n");
    let granted = claim(
        &server,
        "aws",
        Some("env-2"),
        json!({"key": "build-7", "info": {"job": "deploy"}}),
        "",
    );
    assert_eq!(granted.status, 200);
    // The record is the state file, written before the answer.
    let text = std::fs::read_to_string(&server.state_file).expect("state file");
    assert!(text.contains("\"pools\""), "{text}");
    assert!(
        text.contains("build-7") && text.contains("url: two\\n"),
        "{text}"
    );
    let server = server.restart();
    let env2 = item(&server, "aws", "env-2");
    assert_eq!(env2["holder"]["key"], "build-7");
    assert_eq!(env2["holder"]["info"]["job"], "deploy");
    assert_eq!(item(&server, "aws", "env-1")["metadata"], "url: one\n");
    let next = claim(&server, "aws", None, json!({"key": "build-8"}), "");
    assert_eq!(next.json()["item"], "env-1");
    assert!(
        next.json()["generation"].as_u64() > granted.json()["generation"].as_u64(),
        "fencing generations go on increasing after a restart"
    );
}

#[test]
fn pool_gauges_count_items_claims_and_waiters() {
    let server = server().start();
    add(&server, "p", "a", "");
    add(&server, "p", "b", "");
    claim(&server, "p", None, json!({"key": "k"}), "");
    assert_eq!(server.metric("locker_pool_items"), 2.0);
    assert_eq!(server.metric("locker_pool_items_claimed"), 1.0);
    claim(&server, "p", None, json!({"key": "k2"}), "");
    let (done, _results) = mpsc::channel();
    spawn_claim(&server, "p", None, "k3", "30s", &done);
    wait_for_pool_waiters(&server, "p", 1);
    assert_eq!(server.metric("locker_pool_waiters"), 1.0);
}

also_on_etcd!(
    items_are_added_listed_and_kept_with_their_metadata,
    an_item_is_added_claimed_with_only_a_key,
    metadata_up_to_64_kib_is_kept_and_more_is_refused,
    a_claim_of_any_item_takes_the_one_freed_longest_ago,
    waiting_claims_are_served_in_arrival_order,
    a_waiter_for_a_held_item_does_not_hold_up_a_later_claim_of_another,
    claims_of_what_does_not_exist_fail_at_once,
    a_release_checks_the_key_it_is_given_and_without_one_frees_the_item,
    items_are_removed_claimed_or_not_and_a_key_is_checked,
    an_update_changes_metadata_adds_if_absent_and_waits_while_claimed,
    checks_wait_for_an_item_to_be_unclaimed_or_claimed,
    a_claim_with_a_lease_is_freed_when_it_runs_out_and_the_next_waiter_gets_it,
    a_waiting_claim_whose_client_went_away_is_withdrawn,
    pool_gauges_count_items_claims_and_waiters,
);
