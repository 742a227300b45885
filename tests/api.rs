//! The HTTP contract of the original locker, against the real binary.

pub mod common;

use std::collections::HashMap;

use common::{Server, call, raw_exchange};
use serde::Deserialize;
use serde_json::json;

/// A holding as a typed client (Go's `map[string]string`, a Rust map) reads it.
#[derive(Debug, Deserialize)]
struct TypedHolder {
    key: String,
    locked_by: HashMap<String, u64>,
    generation: u64,
    acquired_at: String,
    expires_at: Option<String>,
    info: HashMap<String, String>,
}

/// A lock as `GET /locks` and `GET /lock/{name}` show it, read by a typed client.
#[derive(Debug, Deserialize)]
struct TypedLock {
    key: String,
    locked_by: HashMap<String, u64>,
    info: HashMap<String, String>,
    waiters: u64,
    slots: u32,
    holders: Vec<TypedHolder>,
    name: Option<String>,
    free: Option<bool>,
}

#[test]
fn every_view_parses_into_typed_maps_with_or_without_info() {
    let server = Server::start();
    assert_eq!(server.lock("plain", json!({"key": "k"})).status, 200);
    let with_info = json!({"key": "k", "info": {"team": "main"}});
    assert_eq!(server.lock("tagged", with_info).status, 200);
    for key in ["a", "b"] {
        let reply = server.lock("shared", json!({"key": key, "slots": 2}));
        assert_eq!(reply.status, 200, "{}", reply.body);
    }

    let listed = call("GET", &server.url("/locks"), None);
    let locks: HashMap<String, TypedLock> = serde_json::from_str(&listed.body).expect(&listed.body);
    assert!(locks["plain"].info.is_empty());
    assert!(locks["plain"].holders[0].info.is_empty());
    assert_eq!(locks["tagged"].info["team"], "main");
    assert_eq!(locks["shared"].holders.len(), 2);

    for name in ["plain", "tagged", "shared"] {
        let reply = call("GET", &server.url(&format!("/lock/{name}")), None);
        let lock: TypedLock = serde_json::from_str(&reply.body).expect(&reply.body);
        assert_eq!(lock.name.as_deref(), Some(name));
        assert!(
            lock.holders
                .iter()
                .all(|h| h.key == "k" || name == "shared")
        );
        // The original's fields at the top level: the oldest holding's.
        let oldest = &lock.holders[0];
        assert_eq!(
            (&lock.key, &lock.locked_by),
            (&oldest.key, &oldest.locked_by)
        );
        assert_eq!(lock.slots, if name == "shared" { 2 } else { 1 });
        assert_eq!(lock.waiters, 0);
        for holder in &lock.holders {
            assert!(
                holder.locked_by.values().any(|&count| count > 0),
                "{holder:?}"
            );
            assert!(holder.generation > 0, "{holder:?}");
            assert!(!holder.acquired_at.is_empty(), "{holder:?}");
            assert_eq!(holder.expires_at, None, "{holder:?}");
        }
    }
    // A wait for the lock to be free that runs out shows the same fields.
    let waited = call("GET", &server.url("/lock/plain?wait_free=50ms"), None);
    let lock: TypedLock = serde_json::from_str(&waited.body).expect(&waited.body);
    assert_eq!(lock.free, Some(false));
    assert!(lock.info.is_empty());
    assert!(waited.body.contains(r#""info":{}"#), "{}", waited.body);
}

#[test]
fn lock_conflict_and_release_follow_the_original_api() {
    let server = Server::start();
    let first = server.lock("deploy", json!({"key": "k1"}));
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(first.json()["response"].is_string());

    let other = server.lock("deploy", json!({"key": "k2"}));
    assert_eq!(other.status, 423);
    assert_eq!(other.reason, "Locked");
    let error = other.error();
    assert!(error.contains("deploy") && error.contains("k1"), "{error}");

    let wrong_release = server.unlock("deploy", json!({"key": "k2"}));
    assert_eq!(wrong_release.status, 423);
    assert!(wrong_release.error().contains("k1"));
    assert_eq!(server.locks()["deploy"]["key"], "k1");

    assert_eq!(server.unlock("deploy", json!({"key": "k1"})).status, 200);
    assert_eq!(server.locks(), json!({}));
    // Releasing a lock nobody holds is fine.
    assert_eq!(server.unlock("deploy", json!({"key": "k1"})).status, 200);
    assert_eq!(server.lock("deploy", json!({"key": "k2"})).status, 200);
}

#[test]
fn counts_are_kept_per_requestor_and_one_delete_clears_a_requestor() {
    let server = Server::start();
    for requestor in ["a", "a", "b"] {
        let reply = server.lock("env", json!({"key": "shared", "requestor": requestor}));
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    assert_eq!(server.locks()["env"]["locked_by"], json!({"a": 2, "b": 1}));
    assert_eq!(
        server
            .unlock("env", json!({"key": "shared", "requestor": "a"}))
            .status,
        200
    );
    assert_eq!(server.locks()["env"]["locked_by"], json!({"b": 1}));
    assert_eq!(
        server
            .unlock("env", json!({"key": "shared", "requestor": "b"}))
            .status,
        200
    );
    assert_eq!(server.locks(), json!({}));
}

#[test]
fn requestor_is_read_under_all_three_names_and_defaults_to_the_key() {
    let server = Server::start();
    for (field, who) in [("requestor", "r1"), ("lock_by", "r2"), ("locked_by", "r3")] {
        let reply = server.lock("l", json!({"key": "k", field: who}));
        assert_eq!(reply.status, 200, "{field}: {}", reply.body);
    }
    server.lock("l", json!({"key": "k"}));
    assert_eq!(
        server.locks()["l"]["locked_by"],
        json!({"r1": 1, "r2": 1, "r3": 1, "k": 1})
    );
    // DELETE reads the same spellings.
    server.unlock("l", json!({"key": "k", "lock_by": "r2"}));
    server.unlock("l", json!({"key": "k", "locked_by": "r3"}));
    assert_eq!(server.locks()["l"]["locked_by"], json!({"r1": 1, "k": 1}));
}

#[test]
fn a_form_encoded_body_is_parsed_as_json_like_the_original_resource_sends_it() {
    let server = Server::start();
    let response = common::client()
        .put(server.url("/lock/form"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(r#"{"key":"k","lock_by":"build-1"}"#)
        .send()
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(server.locks()["form"]["locked_by"], json!({"build-1": 1}));
}

#[test]
fn the_status_line_carries_the_standard_reason_phrase_the_resource_greps_for() {
    let server = Server::start();
    server.lock("x", json!({"key": "a"}));
    let body = r#"{"key":"b"}"#;
    let request = format!(
        "PUT /lock/x HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = raw_exchange(&server, request.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 423 Locked\r\n"), "{answer}");
}

#[test]
fn bad_requests_get_400_with_a_json_error() {
    let server = Server::start();
    let url = server.url("/lock/x");
    let cases = [
        ("PUT", url.as_str(), Some("{}"), "key"),
        ("PUT", url.as_str(), Some(r#"{"key":""}"#), "key"),
        ("PUT", url.as_str(), None, "key"),
        ("PUT", url.as_str(), Some("{not json"), "JSON"),
        ("PUT", url.as_str(), Some(r#"{"key": 42}"#), "JSON"),
        ("DELETE", url.as_str(), Some(r#"{"requestor":"r"}"#), "key"),
        ("DELETE", url.as_str(), Some("]"), "JSON"),
    ];
    for (method, url, body, mentions) in cases {
        let reply = call(method, url, body);
        assert_eq!(reply.status, 400, "{method} {body:?}: {}", reply.body);
        let error = reply.error();
        assert!(error.contains(mentions), "{method} {body:?}: {error}");
    }
    assert_eq!(server.locks(), json!({}));
}

#[test]
fn names_are_percent_decoded_and_validated() {
    let server = Server::start();
    let ok = server.lock("bosh%2Fdirector%20%C3%A9", json!({"key": "k"}));
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(
        server.locks().get("bosh/director é").is_some(),
        "{}",
        server.locks()
    );
    let status = call("GET", &server.url("/lock/bosh%2Fdirector%20%C3%A9"), None);
    assert_eq!(status.json()["name"], "bosh/director é");

    let long = "n".repeat(256);
    for name in ["%FF%FE", "a%0Ab", long.as_str(), ""] {
        let reply = server.lock(name, json!({"key": "k"}));
        assert_eq!(reply.status, 400, "{name:?}: {}", reply.body);
        assert!(reply.json()["error"].is_string());
    }
    assert_eq!(
        server.lock(&"n".repeat(255), json!({"key": "k"})).status,
        200
    );
}

#[test]
fn unknown_routes_wrong_methods_and_big_bodies_get_json_errors() {
    let server = Server::start();
    let not_found = call("GET", &server.url("/nope"), None);
    assert_eq!(not_found.status, 404);
    assert!(not_found.json()["error"].is_string());

    for (method, path) in [
        ("POST", "/locks"),
        ("DELETE", "/locks"),
        ("POST", "/lock/x"),
    ] {
        let reply = call(method, &server.url(path), Some("{}"));
        assert_eq!(reply.status, 405, "{method} {path}");
        assert!(reply.json()["error"].is_string());
    }

    let padding = "x".repeat(70 * 1024);
    let big = json!({"key": "k", "padding": padding}).to_string();
    let reply = call("PUT", &server.url("/lock/x"), Some(&big));
    assert_eq!(reply.status, 413);
    assert!(reply.error().contains("larger"));
    assert_eq!(server.locks(), json!({}));
}

#[test]
fn health_answers_ok() {
    let server = Server::start();
    let reply = call("GET", &server.url("/health"), None);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), json!({"status": "OK"}));
}

#[test]
fn ready_answers_200_when_the_store_can_take_writes() {
    let server = Server::start();
    let reply = call("GET", &server.url("/ready"), None);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json(), json!({"status": "ready"}));
}

also_on_etcd!(
    lock_conflict_and_release_follow_the_original_api,
    counts_are_kept_per_requestor_and_one_delete_clears_a_requestor,
    requestor_is_read_under_all_three_names_and_defaults_to_the_key,
    a_form_encoded_body_is_parsed_as_json_like_the_original_resource_sends_it,
    the_status_line_carries_the_standard_reason_phrase_the_resource_greps_for,
    bad_requests_get_400_with_a_json_error,
    names_are_percent_decoded_and_validated,
    unknown_routes_wrong_methods_and_big_bodies_get_json_errors,
    health_answers_ok,
    ready_answers_200_when_the_store_can_take_writes,
);
