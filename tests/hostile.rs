//! Hostile input: slow clients, oversized heads and bodies, garbage on the socket, bad names,
//! deeply nested JSON and out-of-range numbers. Each gets a clear 4xx, nothing is applied, and
//! the server keeps serving afterwards.

pub mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::json;

/// The status code of a raw HTTP answer, or 0 when there was none.
fn status_of(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Sends raw bytes and returns the status and the whole answer.
fn raw(server: &Server, request: &[u8]) -> (u16, String) {
    let answer = common::raw_exchange(server, request);
    (status_of(&answer), answer)
}

/// Asserts that a raw answer carries the API's JSON error body (also when actix-http wrote the
/// refusal itself: 400, 408, 431), and that its Content-Length is the body's.
fn assert_json_error(what: &str, answer: &str) {
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{what}: no complete head in {answer:?}"));
    let parsed: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {answer:?}"));
    assert!(
        parsed["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: {answer:?}"
    );
    let length = format!("content-length: {}", body.len());
    assert!(
        head.to_ascii_lowercase().contains(&length),
        "{what}: {head:?} lacks {length}"
    );
}

fn address(server: &Server) -> String {
    server
        .base
        .strip_prefix("http://")
        .expect("plain http")
        .to_string()
}

/// The server still answers, and still locks and unlocks.
fn assert_serving(server: &Server) {
    let health = common::call("GET", &server.url("/health"), None);
    assert_eq!(health.status, 200, "health after hostile input");
    let lock = server.lock("canary", json!({"key": "canary"}));
    assert_eq!(lock.status, 200, "lock after hostile input: {}", lock.body);
    let unlock = server.unlock("canary", json!({"key": "canary"}));
    assert_eq!(
        unlock.status, 200,
        "unlock after hostile input: {}",
        unlock.body
    );
}

#[test]
fn slow_header_clients_do_not_block_others_and_are_cut_off_with_408() {
    const SLOW: usize = 50;
    let server = Server::start();
    let address = address(&server);
    let started = Instant::now();
    // Each slow client trickles a request head one byte every 100 ms, for at most 8 s; a
    // reader beside it notes what the server answers and when.
    let slow: Vec<_> = (0..SLOW)
        .map(|i| {
            let address = address.clone();
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(&address).expect("connect");
                let mut reader = stream.try_clone().expect("clone");
                reader
                    .set_read_timeout(Some(Duration::from_secs(12)))
                    .expect("timeout");
                let answer = std::thread::spawn(move || {
                    let mut answer = Vec::new();
                    let mut buffer = [0u8; 1024];
                    let mut first_at = None;
                    while let Ok(n) = reader.read(&mut buffer) {
                        if n == 0 {
                            break;
                        }
                        first_at.get_or_insert_with(Instant::now);
                        answer.extend_from_slice(&buffer[..n]);
                    }
                    (String::from_utf8_lossy(&answer).into_owned(), first_at)
                });
                let head = format!("PUT /lock/slow-{i} HTTP/1.1\r\nHost: x\r\nX-Trickle: ");
                let trickle = head.bytes().chain(std::iter::repeat(b'a'));
                let until = Instant::now() + Duration::from_secs(8);
                for byte in trickle {
                    if Instant::now() > until || stream.write_all(&[byte]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                answer.join().expect("reader")
            })
        })
        .collect();
    // Meanwhile ordinary clients are served promptly.
    std::thread::sleep(Duration::from_millis(500));
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let asked = Instant::now();
        let reply = server.lock(&format!("fast-{i}"), json!({"key": "k"}));
        assert_eq!(reply.status, 200, "{}", reply.body);
        slowest = slowest.max(asked.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let ordinary_done = Instant::now();
    for (i, thread) in slow.into_iter().enumerate() {
        let (answer, first_at) = thread.join().expect("slow client");
        assert_eq!(
            status_of(&answer),
            408,
            "slow client {i} got {answer:?} instead of 408"
        );
        assert_json_error(&format!("slow client {i}"), &answer);
        let first_at = first_at.expect("answered");
        // Served while the slow clients still held their connections (not once they were cut
        // off): an order, whatever the machine's speed.
        assert!(
            ordinary_done < first_at,
            "ordinary requests (slowest {slowest:?}) were served only after slow client {i} \
             was cut off"
        );
        let after = first_at.duration_since(started);
        assert!(
            after < Duration::from_secs(8),
            "slow client {i} was cut off only after {after:?}"
        );
    }
    assert_serving(&server);
}

#[test]
fn oversized_headers_are_refused_with_431() {
    let server = Server::start();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "one 64 KiB header",
            format!(
                "GET /locks HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "a".repeat(64 * 1024)
            )
            .into_bytes(),
        ),
        (
            "many 1 KiB headers",
            format!(
                "GET /locks HTTP/1.1\r\nHost: x\r\n{}\r\n",
                (0..40)
                    .map(|i| format!("X-H{i}: {}\r\n", "b".repeat(1024)))
                    .collect::<String>()
            )
            .into_bytes(),
        ),
        (
            "200 headers",
            format!(
                "GET /locks HTTP/1.1\r\nHost: x\r\n{}\r\n",
                (0..200)
                    .map(|i| format!("X-H{i}: c\r\n"))
                    .collect::<String>()
            )
            .into_bytes(),
        ),
        (
            "a 200 KiB header",
            format!(
                "PUT /lock/big HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "d".repeat(200 * 1024)
            )
            .into_bytes(),
        ),
    ];
    for (what, request) in cases {
        let (status, answer) = raw(&server, &request);
        assert_eq!(status, 431, "{what}: {answer}");
        assert_json_error(what, &answer);
        assert_serving(&server);
    }
    // Ordinary sizes pass.
    let request = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Ok: {}\r\n\r\n",
        "e".repeat(8 * 1024)
    );
    assert_eq!(raw(&server, request.as_bytes()).0, 200);
}

#[test]
fn oversized_bodies_get_413_without_waiting_for_them() {
    let server = Server::start();
    let big = format!(
        r#"{{"key":"k","info":{{"a":"{}"}}}}"#,
        "x".repeat(64 * 1024)
    );
    let reply = server.lock("big", serde_json::from_str(&big).expect("json"));
    assert_eq!(reply.status, 413, "{}", reply.body);
    assert!(reply.error().contains("65536"), "{}", reply.body);

    // Chunked, so no Content-Length announces it: refused once the limit is passed.
    let chunk = format!("8000\r\n{}\r\n", " ".repeat(0x8000));
    let request = format!(
        "PUT /lock/big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{}0\r\n\r\n",
        chunk.repeat(3)
    );
    let (status, answer) = raw(&server, request.as_bytes());
    assert_eq!(status, 413, "{answer}");
    assert!(answer.contains("\"error\""), "{answer}");

    // A huge announced length is refused without reading or awaiting the body: only `{` of it
    // is sent and the connection stays open, so a server that waited for the rest would answer
    // 408 once its body timeout ran out (or nothing); the client waits well past that timeout.
    let answer = common::raw_exchange_within(
        &server,
        b"PUT /lock/big HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{",
        locker::api::request::BODY_TIMEOUT * 6,
    );
    assert_eq!(status_of(&answer), 413, "{answer}");
    assert_json_error("an announced length over the limit", &answer);
    assert_eq!(server.locks(), json!({}));
    assert_serving(&server);
}

#[test]
fn a_body_that_never_arrives_is_given_up_with_408() {
    let server = Server::start();
    let mut stream = TcpStream::connect(address(&server)).expect("connect");
    // Generous: a busy machine may answer late; the 408 and its message are what is tested.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    stream
        .write_all(b"PUT /lock/stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"key\":")
        .expect("write");
    let asked = Instant::now();
    let mut answer = vec![0u8; 4096];
    let n = stream
        .read(&mut answer)
        .expect("an answer before the read timeout");
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert_eq!(status_of(&answer), 408, "{answer}");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let body: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("did not arrive")),
        "{answer}"
    );
    // Not given up early: the body timeout is 10 s, counted from before `asked`.
    assert!(
        asked.elapsed() >= Duration::from_secs(9),
        "given up after {:?}",
        asked.elapsed()
    );
    assert_eq!(server.locks(), json!({}));
    assert_serving(&server);
}

#[test]
fn garbage_on_the_socket_gets_400_and_the_server_carries_on() {
    let server = Server::start();
    let mut noise = Vec::with_capacity(4096);
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    for _ in 0..4096 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        noise.push(state as u8);
    }
    let tls_hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03".to_vec();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", noise),
        ("a TLS client hello", tls_hello),
        ("NUL bytes", vec![0; 1024]),
        ("bytes 0 to 255", (0..=255u8).collect()),
        ("an unknown HTTP version", b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n".to_vec()),
        ("a header without a colon", b"GET /health HTTP/1.1\r\nHost x\r\n\r\n".to_vec()),
        (
            "a negative Content-Length",
            b"PUT /lock/a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}".to_vec(),
        ),
        (
            "two Content-Lengths",
            b"PUT /lock/a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
                .to_vec(),
        ),
        (
            "a bad chunk size",
            b"PUT /lock/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
                .to_vec(),
        ),
        (
            "a control character in the target",
            b"GET /lock/a\x01b HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
    ];
    for (what, bytes) in cases {
        let (status, answer) = raw(&server, &bytes);
        assert!(
            (400..500).contains(&status),
            "{what}: expected a 4xx, got {answer:?}"
        );
        assert_json_error(what, &answer);
        assert_serving(&server);
    }
    assert_eq!(server.locks(), json!({}));
}

#[test]
fn invalid_and_huge_names_get_400() {
    let server = Server::start();
    let body = Some(r#"{"key":"k"}"#);
    let names = [
        ("%FF", "not valid UTF-8"),
        ("a%C3", "not valid UTF-8"),
        ("%ED%A0%80", "not valid UTF-8"), // an encoded UTF-16 surrogate
        ("a%00b", "control"),
        ("a%0Ab", "control"),
    ];
    for (name, error) in names {
        for method in ["PUT", "DELETE", "GET"] {
            let reply = common::call(method, &server.url(&format!("/lock/{name}")), body);
            assert_eq!(reply.status, 400, "{method} {name}: {}", reply.body);
            assert!(
                reply.error().contains(error),
                "{method} {name}: {}",
                reply.body
            );
        }
    }
    let long = "n".repeat(10_000);
    let long_encoded = "%C3%A9".repeat(5_000); // 10,000 bytes once decoded
    for name in [&long, &long_encoded] {
        for method in ["PUT", "DELETE", "GET"] {
            let reply = common::call(method, &server.url(&format!("/lock/{name}")), body);
            assert_eq!(reply.status, 400, "{method}: {}", reply.body);
            assert!(reply.error().contains("10000 bytes"), "{}", reply.body);
        }
    }
    // A raw (unencoded) 0xFF byte in the request target.
    let (status, answer) = raw(&server, b"PUT /lock/\xff HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 400, "{answer}");
    assert_json_error("a raw 0xFF in the path", &answer);
    assert_eq!(server.locks(), json!({}));
    assert_serving(&server);
}

#[test]
fn deeply_nested_json_gets_400_or_413_not_a_crash() {
    let server = Server::start();
    let url = server.url("/lock/nested");
    let cases = [
        ("60,000 [", "[".repeat(60_000), 400),
        ("100,000 [", "[".repeat(100_000), 413),
        ("60,000 {\"a\":", "{\"a\":".repeat(12_000), 400),
        (
            "nested info",
            format!(r#"{{"key":"k","info":{}"#, "[".repeat(50_000)),
            400,
        ),
        (
            "nested ttl",
            format!(
                r#"{{"key":"k","ttl":{}1{}}}"#,
                "[".repeat(20_000),
                "]".repeat(20_000)
            ),
            400,
        ),
        (
            "balanced 30,000 deep",
            format!("{}{}", "[".repeat(30_000), "]".repeat(30_000)),
            400,
        ),
    ];
    for (what, body, expected) in cases {
        for method in ["PUT", "DELETE"] {
            let reply = common::call(method, &url, Some(&body));
            assert_eq!(reply.status, expected, "{method} {what}: {}", reply.body);
            assert!(!reply.error().is_empty());
        }
        assert_serving(&server);
    }
    assert_eq!(server.locks(), json!({}));
}

#[test]
fn out_of_range_ttls_and_waits_get_400() {
    let server = Server::start();
    let url = server.url("/lock/numbers");
    let values = [
        "1e400",
        "-1",
        "18446744073709551616",
        "18446744073709551615",
        "315360001",
        "\"99999999999h\"",
        "\"-5s\"",
        "1.5",
        "1e308",
        "true",
        "null",
        "\"\"",
        "\"5 fortnights\"",
        "[]",
        "{}",
    ];
    for value in values {
        for field in ["ttl", "wait"] {
            let body = format!(r#"{{"key":"k","{field}":{value}}}"#);
            let reply = common::call("PUT", &url, Some(&body));
            // `null` means "not given" to serde, so that one is a plain acquire.
            if value == "null" {
                assert_eq!(reply.status, 200, "{body}: {}", reply.body);
                let reply = server.unlock("numbers", json!({"key": "k"}));
                assert_eq!(reply.status, 200);
                continue;
            }
            assert_eq!(reply.status, 400, "{body}: {}", reply.body);
            assert!(!reply.error().is_empty());
        }
    }
    for wait in [
        "1e400",
        "-1",
        "18446744073709551616",
        "18446744073709551615",
        "99999999999h",
        "-5s",
        "%FF",
        "1.5",
    ] {
        let reply = common::call("PUT", &format!("{url}?wait={wait}"), Some(r#"{"key":"k"}"#));
        assert_eq!(reply.status, 400, "wait={wait}: {}", reply.body);
    }
    assert_eq!(server.locks(), json!({}));
    assert_serving(&server);
}
