//! Reclaiming holds whose build has ended, against a small local stand-in for the Concourse API
//! (a real Concourse cannot run here): it answers build status by path, like Concourse's
//! `/api/v1/teams/{team}/pipelines/{pipeline}/jobs/{job}/builds/{name}` and `/api/v1/builds/{id}`.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, call};
use serde_json::json;

/// Path → (status code, body); unknown paths get 404. Remembers the Authorization headers seen.
#[derive(Clone, Default)]
struct FakeConcourse {
    answers: Arc<Mutex<HashMap<String, (u16, String)>>>,
    authorization: Arc<Mutex<Vec<String>>>,
    requests: Arc<Mutex<usize>>,
}

impl FakeConcourse {
    fn start() -> (FakeConcourse, String) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let fake = FakeConcourse::default();
        let served = fake.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                served.answer(stream);
            }
        });
        (fake, url)
    }

    fn set(&self, path: &str, code: u16, status: &str) {
        let body = json!({"id": 1, "status": status}).to_string();
        self.answers
            .lock()
            .expect("answers")
            .insert(path.to_string(), (code, body));
    }

    fn requests(&self) -> usize {
        *self.requests.lock().expect("count")
    }

    fn answer(&self, stream: std::net::TcpStream) {
        let mut reader = BufReader::new(&stream);
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).is_err() {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_string();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                break;
            }
            if let Some(value) = header.to_ascii_lowercase().strip_prefix("authorization:") {
                self.authorization
                    .lock()
                    .expect("auth")
                    .push(value.trim().to_string());
            }
        }
        *self.requests.lock().expect("count") += 1;
        let (code, body) = self
            .answers
            .lock()
            .expect("answers")
            .get(&path)
            .cloned()
            .unwrap_or((404, r#"{"error":"not found"}"#.to_string()));
        let mut stream = stream;
        let _ = write!(
            stream,
            "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

const BUILD_PATH: &str = "/api/v1/teams/main/pipelines/deploy/jobs/prod/builds/42";

fn build_info() -> serde_json::Value {
    json!({"team": "main", "pipeline": "deploy", "job": "prod", "build_name": "42",
           "build_url": "https://ci.example.com/teams/main/pipelines/deploy/jobs/prod/builds/42"})
}

fn start(concourse: &str) -> Server {
    common::server()
        .env("LOCKER_CONCOURSE_URL", concourse)
        .env("LOCKER_CONCOURSE_TOKEN", "test-token")
        .env("LOCKER_RECLAIM_INTERVAL", "200ms")
        .start()
}

/// Waits until the fake has answered `count` more requests than `since`.
fn wait_for_checks(fake: &FakeConcourse, since: usize, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.requests() < since + count {
        assert!(
            Instant::now() < deadline,
            "the server stopped asking Concourse"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_hold_of_a_running_build_is_kept_and_the_token_is_sent() {
    let (fake, url) = FakeConcourse::start();
    fake.set(BUILD_PATH, 200, "started");
    let server = start(&url);
    let reply = server.lock(
        "env",
        json!({"key": "k", "info": build_info(), "release_when_build_ends": true}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    wait_for_checks(&fake, fake.requests(), 3);
    assert_eq!(server.locks()["env"]["key"], "k");
    assert!(
        fake.authorization
            .lock()
            .expect("auth")
            .iter()
            .all(|a| a == "bearer test-token"),
        "{:?}",
        fake.authorization.lock().expect("auth")
    );
    assert!(!server.log().contains("test-token"), "the token was logged");
}

#[test]
fn a_hold_of_an_aborted_build_is_released_and_the_next_waiter_granted() {
    let (fake, url) = FakeConcourse::start();
    fake.set(BUILD_PATH, 200, "started");
    let server = start(&url);
    server.lock(
        "env",
        json!({"key": "k", "info": build_info(), "release_when_build_ends": true}),
    );
    let waiter_url = server.url("/lock/env?wait=20s");
    let waiter =
        std::thread::spawn(move || call("PUT", &waiter_url, Some(r#"{"key":"next"}"#)).status);
    wait_for_checks(&fake, fake.requests(), 2);
    fake.set(BUILD_PATH, 200, "aborted");
    assert_eq!(waiter.join().expect("waiter"), 200);
    assert_eq!(server.locks()["env"]["key"], "next");
    let log = server.log();
    assert!(
        log.contains("WARN") && log.contains("ci.example.com") && log.contains("aborted"),
        "{log}"
    );
    let metrics = call("GET", &server.url("/metrics"), None).body;
    assert!(
        metrics.contains("locker_releases_total{outcome=\"reclaimed\"} 1"),
        "{metrics}"
    );
}

#[test]
fn an_unreachable_or_failing_api_releases_nothing() {
    let (fake, url) = FakeConcourse::start();
    fake.set(BUILD_PATH, 500, "aborted");
    let server = start(&url);
    server.lock(
        "env",
        json!({"key": "k", "info": build_info(), "release_when_build_ends": true}),
    );
    wait_for_checks(&fake, fake.requests(), 2);
    assert_eq!(server.locks()["env"]["key"], "k");

    // Nothing listening at all.
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("http://{}", closed.local_addr().expect("address"));
    drop(closed);
    let server = start(&dead_url);
    server.lock(
        "env",
        json!({"key": "k", "info": build_info(), "release_when_build_ends": true}),
    );
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(server.locks()["env"]["key"], "k");
}

#[test]
fn holds_that_did_not_opt_in_are_untouched() {
    let (fake, url) = FakeConcourse::start();
    fake.set(BUILD_PATH, 200, "failed");
    fake.set("/api/v1/builds/77", 200, "succeeded");
    let server = start(&url);
    server.lock("plain", json!({"key": "k", "info": build_info()}));
    server.lock(
        "by-id",
        json!({"key": "k", "info": {"build_id": "77"}, "release_when_build_ends": true}),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.locks().get("by-id").is_some() {
        assert!(
            Instant::now() < deadline,
            "the finished build's hold was kept"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(server.locks()["plain"]["key"], "k");
}

#[test]
fn release_when_build_ends_needs_info_naming_a_build() {
    let server = Server::start();
    let reply = server.lock(
        "env",
        json!({"key": "k", "info": {"team": "main"}, "release_when_build_ends": true}),
    );
    assert_eq!(reply.status, 400);
    assert!(reply.error().contains("build"), "{}", reply.body);
}
