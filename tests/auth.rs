//! Basic auth: every route but /health and /ready needs it when configured.

pub mod common;

use common::{Reply, Server, call, call_with, client};
use serde_json::json;

fn start_with_auth() -> Server {
    common::server().auth("admin", "s3cret-pass").start()
}

fn assert_refused(reply: &Reply) {
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert_eq!(
        reply
            .headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Basic realm=\"locker\"")
    );
    assert!(reply.json()["error"].is_string());
}

#[test]
fn without_auth_configured_everything_is_open() {
    let server = Server::start();
    assert_eq!(server.lock("x", json!({"key": "k"})).status, 200);
}

#[test]
fn every_route_but_health_and_ready_requires_credentials() {
    let server = start_with_auth();
    assert_eq!(call("GET", &server.url("/health"), None).status, 200);
    // Probes carry no credentials; readiness tells nothing about the locks.
    assert_eq!(call("GET", &server.url("/ready"), None).status, 200);
    assert_refused(&call("GET", &server.url("/locks"), None));
    assert_refused(&call("GET", &server.url("/lock/x"), None));
    assert_refused(&call("PUT", &server.url("/lock/x"), Some(r#"{"key":"k"}"#)));
    assert_refused(&call(
        "DELETE",
        &server.url("/lock/x"),
        Some(r#"{"key":"k"}"#),
    ));
    assert_refused(&call("GET", &server.url("/unknown"), None));
    // The dashboard and its assets, and the metrics (they name locks), are behind auth too.
    for path in ["/", "/dashboard.css", "/dashboard.js", "/metrics"] {
        assert_refused(&call("GET", &server.url(path), None));
        let reply = call_with(&client(), "GET", &authorized(&server, path), None);
        assert_eq!(reply.status, 200, "{path} with credentials: {}", reply.body);
    }
    // The history and the pools: a lock and an unclaimed pool item exist, so each read below
    // answers 200 at once with credentials (checked last), and a change without them would show.
    let with_credentials = |method: &str, path: &str, body: Option<&str>| {
        call_with(&client(), method, &authorized(&server, path), body)
    };
    assert_eq!(
        with_credentials("PUT", "/lock/x", Some(r#"{"key":"k"}"#)).status,
        200
    );
    let added = with_credentials("POST", "/pool/p/item/a", Some(r#"{"metadata":"m"}"#));
    assert_eq!(added.status, 201, "{}", added.body);
    let reads = [
        "/history",
        "/lock/x/history",
        "/pools",
        "/pool/p",
        "/pool/p/item/a",
        "/pool/p/item/a?until=unclaimed&wait=30s",
    ];
    for path in reads {
        assert_refused(&call("GET", &server.url(path), None));
    }
    let changes = [
        ("PUT", "/pool/p/claim", r#"{"key":"k"}"#),
        ("PUT", "/pool/p/item/a/claim", r#"{"key":"k"}"#),
        ("DELETE", "/pool/p/item/a/claim", "{}"),
        ("POST", "/pool/p/item/b", r#"{"metadata":"m"}"#),
        ("PUT", "/pool/p/item/a", r#"{"metadata":"changed"}"#),
        ("DELETE", "/pool/p/item/a", "{}"),
    ];
    for (method, path, body) in changes {
        assert_refused(&call(method, &server.url(path), Some(body)));
    }
    // The live events: refused without credentials, a stream with them.
    assert_refused(&call("GET", &server.url("/events"), None));
    let events = client()
        .get(authorized(&server, "/events"))
        .send()
        .expect("request sent");
    assert_eq!(events.status(), 200);
    assert_eq!(
        events
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    drop(events);
    for path in reads {
        let reply = with_credentials("GET", path, None);
        assert_eq!(reply.status, 200, "{path} with credentials: {}", reply.body);
    }
    // Nothing the refused requests asked for happened.
    let pool = with_credentials("GET", "/pool/p", None).json();
    assert_eq!(
        pool["items"],
        json!([{"name": "a", "metadata": "m", "claimed": false}]),
        "{pool}"
    );
}

/// `server`'s URL of `path` with the test credentials in the userinfo.
fn authorized(server: &Server, path: &str) -> String {
    server
        .url(path)
        .replacen("http://", "http://admin:s3cret-pass@", 1)
}

#[test]
fn right_credentials_pass_and_wrong_or_malformed_ones_do_not() {
    let server = start_with_auth();
    let http = client();
    let ok = http
        .put(server.url("/lock/x"))
        .basic_auth("admin", Some("s3cret-pass"))
        .body(r#"{"key":"k"}"#)
        .send()
        .expect("request");
    assert_eq!(ok.status(), 200);

    let wrong = http
        .get(server.url("/locks"))
        .basic_auth("admin", Some("wrong"))
        .send()
        .expect("request");
    assert_eq!(wrong.status(), 401);

    for header in [
        "Basic !!!notbase64",
        "Bearer abc",
        "Basic",
        "Basic YWRtaW4=",
    ] {
        let reply = call_with(
            &reqwest::blocking::Client::builder()
                .default_headers(
                    [(
                        reqwest::header::AUTHORIZATION,
                        header.parse().expect("header value"),
                    )]
                    .into_iter()
                    .collect(),
                )
                .build()
                .expect("client"),
            "GET",
            &server.url("/locks"),
            None,
        );
        assert_refused(&reply);
    }
}

#[test]
fn neither_the_password_nor_the_authorization_header_is_logged() {
    let server = start_with_auth();
    let http = client();
    for password in ["s3cret-pass", "guessed-pass"] {
        http.put(server.url("/lock/x"))
            .basic_auth("admin", Some(password))
            .body(r#"{"key":"k"}"#)
            .send()
            .expect("request");
    }
    // The request log is written when the response is: wait for both lines.
    server.wait_for_log("PUT /lock/x", 2);
    let log = server.log();
    assert!(log.contains("PUT /lock/x"), "requests are logged:\n{log}");
    for secret in ["s3cret-pass", "guessed-pass", "YWRtaW4", "Basic "] {
        assert!(!log.contains(secret), "{secret} appears in the log:\n{log}");
    }
}
