//! Reclaiming holds whose build has ended, against a small local stand-in for the Concourse API
//! (a real Concourse cannot run here): it answers build status by path, like Concourse's
//! `/api/v1/teams/{team}/pipelines/{pipeline}/jobs/{job}/builds/{name}` and `/api/v1/builds/{id}`.

pub mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, call};
use serde_json::json;

/// Path → (status code, body); unknown paths get 404. Remembers the Authorization headers seen.
/// `POST /sky/issuer/token` signs in like Concourse's (a password grant, answered with a new
/// `access_token` each time: `token-1`, `token-2`, ...); once `require_token` is set, build
/// requests without that bearer token get 401, as when a token expired.
#[derive(Clone, Default)]
struct FakeConcourse {
    answers: Arc<Mutex<HashMap<String, (u16, String)>>>,
    authorization: Arc<Mutex<Vec<String>>>,
    requests: Arc<Mutex<usize>>,
    /// The path of every request, in order.
    paths: Arc<Mutex<Vec<String>>>,
    /// (Authorization header, form body) of each sign-in.
    sign_ins: Arc<Mutex<Vec<(String, String)>>>,
    require_token: Arc<Mutex<Option<String>>>,
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
        let mut authorization = String::new();
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(value) = lower.strip_prefix("authorization:") {
                // The scheme is case-insensitive; the credentials are not.
                let value = header[header.len() - value.len()..].trim();
                let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
                authorization = format!("{} {credentials}", scheme.to_ascii_lowercase());
            }
            if let Some(value) = lower.strip_prefix("content-length:") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
            return;
        }
        self.paths.lock().expect("paths").push(path.clone());
        *self.requests.lock().expect("count") += 1;
        let (code, body) = if path == "/sky/issuer/token" {
            let mut sign_ins = self.sign_ins.lock().expect("sign-ins");
            sign_ins.push((authorization, String::from_utf8_lossy(&body).into_owned()));
            let token = format!("token-{}", sign_ins.len());
            (
                200,
                json!({"access_token": token, "token_type": "bearer", "expires_in": 86400})
                    .to_string(),
            )
        } else {
            self.authorization
                .lock()
                .expect("auth")
                .push(authorization.clone());
            let required = self.require_token.lock().expect("token").clone();
            match required {
                Some(token) if authorization != format!("bearer {token}") => {
                    (401, r#"{"error":"not authorized"}"#.to_string())
                }
                _ => self
                    .answers
                    .lock()
                    .expect("answers")
                    .get(&path)
                    .cloned()
                    .unwrap_or((404, r#"{"error":"not found"}"#.to_string())),
            }
        };
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
    let sent = fake.authorization.lock().expect("auth").clone();
    // Not empty: `all` of nothing would pass with no token ever sent.
    assert!(sent.len() >= 3, "{sent:?}");
    assert!(sent.iter().all(|a| a == "bearer test-token"), "{sent:?}");
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
    // Queued before the build ends, so the history below has a fixed order.
    common::wait_for_waiters(&server, "env", 1);
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
    // The history says the build's end released it, and whose build it was.
    let history = call("GET", &server.url("/lock/env/history"), None).json();
    let kinds: Vec<&str> = history["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["acquired", "queued", "reclaimed", "acquired"]);
    let reclaimed = &history["events"][2];
    assert_eq!(reclaimed["key"], "k");
    assert_eq!(reclaimed["info"], build_info());
    assert!(reclaimed["held_ms"].as_u64().is_some(), "{reclaimed}");
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
    // The server asked, was refused, and said so: the check ran and released nothing.
    server.wait_for_log("reclaim check failed (nothing released)", 2);
    assert!(server.log().contains("500"), "{}", server.log());
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
    server.wait_for_log("reclaim check failed (nothing released)", 2);
    assert_eq!(server.locks()["env"]["key"], "k");
    let metrics = call("GET", &server.url("/metrics"), None).body;
    assert!(
        !metrics.contains("outcome=\"reclaimed\""),
        "something was reclaimed: {metrics}"
    );
}

#[test]
fn a_local_user_signs_in_at_the_token_endpoint_and_again_when_the_token_expires() {
    let (fake, url) = FakeConcourse::start();
    fake.set(BUILD_PATH, 200, "started");
    *fake.require_token.lock().expect("token") = Some("token-1".into());
    let server = common::server()
        .env("LOCKER_CONCOURSE_URL", &url)
        .env("LOCKER_CONCOURSE_USER", "reclaimer")
        .env("LOCKER_CONCOURSE_PASSWORD", "s3cret pass")
        .env("LOCKER_RECLAIM_INTERVAL", "200ms")
        .start();
    let reply = server.lock(
        "env",
        json!({"key": "k", "info": build_info(), "release_when_build_ends": true}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    wait_for_checks(&fake, fake.requests(), 3);

    // One sign-in, as fly does it: its public client (basic fly:Zmx5) and a password grant.
    let sign_ins = fake.sign_ins.lock().expect("sign-ins").clone();
    assert_eq!(sign_ins.len(), 1, "{sign_ins:?}");
    let (authorization, form) = &sign_ins[0];
    assert_eq!(authorization, "basic Zmx5OlpteDU=", "fly:Zmx5");
    for field in [
        "grant_type=password",
        "username=reclaimer",
        "password=s3cret+pass",
    ] {
        assert!(form.split('&').any(|f| f == field), "{field} in {form}");
    }
    // Then every build request carries the token it was given.
    let sent = fake.authorization.lock().expect("auth").clone();
    assert!(!sent.is_empty());
    assert!(sent.iter().all(|a| a == "bearer token-1"), "{sent:?}");
    assert_eq!(server.locks()["env"]["key"], "k");

    // The token expires: a 401, a second sign-in, and the build answers again.
    *fake.require_token.lock().expect("token") = Some("token-2".into());
    fake.set(BUILD_PATH, 200, "aborted");
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.locks().get("env").is_some() {
        assert!(
            Instant::now() < deadline,
            "the hold of the aborted build was kept: {:?}\n{}",
            fake.sign_ins.lock().expect("sign-ins"),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fake.sign_ins.lock().expect("sign-ins").len(), 2);
    let sent = fake.authorization.lock().expect("auth").clone();
    assert_eq!(sent.last().map(String::as_str), Some("bearer token-2"));
    let log = server.log();
    assert!(!log.contains("s3cret"), "the password was logged: {log}");
    assert!(!log.contains("token-1"), "a token was logged: {log}");
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
    // Every round that released "by-id" also listed "plain" (taken first), and never asked
    // about its build.
    let paths = fake.paths.lock().expect("paths").clone();
    assert!(paths.iter().any(|p| p == "/api/v1/builds/77"), "{paths:?}");
    assert!(!paths.iter().any(|p| p == BUILD_PATH), "{paths:?}");
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

#[test]
fn a_pool_item_claimed_by_an_aborted_build_is_released_and_the_next_claim_granted() {
    let (fake, url) = FakeConcourse::start();
    fake.set(BUILD_PATH, 200, "started");
    let server = start(&url);
    let added = call(
        "POST",
        &server.url("/pool/envs/item/env-1"),
        Some(r#"{"metadata":"m"}"#),
    );
    assert_eq!(added.status, 201, "{}", added.body);
    let body = json!({"key": "k", "info": build_info(), "release_when_build_ends": true});
    let claimed = call(
        "PUT",
        &server.url("/pool/envs/claim"),
        Some(&body.to_string()),
    );
    assert_eq!(claimed.status, 200, "{}", claimed.body);
    let waiter_url = server.url("/pool/envs/claim?wait=20s");
    let waiter = std::thread::spawn(move || call("PUT", &waiter_url, Some(r#"{"key":"next"}"#)));
    wait_for_checks(&fake, fake.requests(), 2);
    let item = call("GET", &server.url("/pool/envs/item/env-1"), None).json();
    assert_eq!(
        item["holder"]["key"], "k",
        "released while the build ran: {item}"
    );
    fake.set(BUILD_PATH, 200, "aborted");
    let granted = waiter.join().expect("waiter");
    assert_eq!(granted.status, 200, "{}", granted.body);
    assert_eq!(granted.json()["item"], "env-1");
    let log = server.log();
    assert!(log.contains("item \"env-1\" of pool \"envs\""), "{log}");
}

// The reclaimer works through the store's interface, so each store must apply its releases and
// record them (the `reclaimed` event, the hold histogram) the same way.
also_on_etcd!(
    a_hold_of_an_aborted_build_is_released_and_the_next_waiter_granted,
    a_pool_item_claimed_by_an_aborted_build_is_released_and_the_next_claim_granted,
);
