//! Refusals the API answers with a JSON body: lookalike lock names, control characters in keys
//! and requestors, errors actix-web answers itself get a JSON body; and `HEAD /health`.

pub mod common;

use common::Server;
use serde_json::json;

/// The status and body of a raw HTTP/1.1 exchange.
fn raw(server: &Server, request: &str) -> (u16, String, String) {
    let answer = common::raw_exchange(server, request.as_bytes());
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (status, head.to_string(), body.to_string())
}

#[test]
fn head_health_answers_like_get_without_a_body_and_without_credentials() {
    let server = common::server().auth("admin", "secret").start();
    let get = common::call("GET", &server.url("/health"), None);
    assert_eq!(get.status, 200);
    let head = common::call("HEAD", &server.url("/health"), None);
    assert_eq!(head.status, 200, "{}", head.body);
    assert_eq!(head.body, "");
}

#[test]
fn errors_actix_web_answers_itself_get_a_json_body() {
    let server = Server::start();
    for target in ["OPTIONS * HTTP/1.1", "GET * HTTP/1.1"] {
        let (status, head, body) = raw(
            &server,
            &format!("{target}\r\nHost: x\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, 404, "{target}: {head}");
        let value: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{target}: body is not JSON ({e}): {body:?}"));
        assert!(value["error"].is_string(), "{target}: {body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{head}"
        );
    }
}

#[test]
fn lookalike_names_with_format_characters_are_refused() {
    let server = Server::start();
    // Right-to-left override, zero-width space and joiner, byte order mark, a tag character.
    for encoded in [
        "prod%E2%80%AEdorp",
        "de%E2%80%8Bploy",
        "de%E2%80%8Dploy",
        "%EF%BB%BFdeploy",
        "deploy%F3%A0%81%81",
    ] {
        for method in ["PUT", "GET", "DELETE"] {
            let reply = common::call(
                method,
                &server.url(&format!("/lock/{encoded}")),
                Some(&json!({"key": "k"}).to_string()),
            );
            assert_eq!(reply.status, 400, "{method} {encoded}: {}", reply.body);
            assert!(
                reply.error().contains("format character"),
                "{method} {encoded}: {}",
                reply.body
            );
        }
    }
    assert_eq!(server.locks(), json!({}));
    // Other scripts and emoji are still names.
    let reply = server.lock("d%C3%A9ploiement-%F0%9F%9A%80", json!({"key": "k"}));
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[test]
fn control_characters_in_keys_and_requestors_are_refused() {
    let server = Server::start();
    for body in [
        json!({"key": "build\n42"}),
        json!({"key": "\u{1b}[31mred"}),
        json!({"key": "k", "requestor": "job\r\nX-Injected: 1"}),
        json!({"key": "k", "lock_by": "nul\u{0}"}),
    ] {
        let reply = server.lock("ctl", body.clone());
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
        assert!(
            reply.error().contains("control characters"),
            "{}",
            reply.body
        );
        let reply = server.unlock("ctl", body.clone());
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
    }
    assert_eq!(server.locks(), json!({}));
    let reply = server.lock("ctl", json!({"key": "k", "requestor": "job 42 ✓"}));
    assert_eq!(reply.status, 200, "{}", reply.body);
}
