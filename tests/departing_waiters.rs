//! A waiter whose client leaves just as its grant arrives. The request's handler then finds
//! both at once: the grant already sent to it, and its client gone. Whichever it takes, nobody
//! may hold the lock without having been told: either the client got its 200 (then it holds the
//! lock), or the grant is revoked and the lock goes on to the next one.
//!
//! The moment is made wide rather than hoped for: the server runs under `strace`, which holds
//! each return from `epoll_wait` for 200 ms and each `fsync`/`fdatasync` for 100 ms. The client
//! sends its FIN as soon as the new state file is renamed into place with the grant in it; the
//! store's writer thread (which never waits in `epoll_wait`) hands the grant over after the
//! directory's sync, 100 ms later, while the event loop is still held after learning of the
//! FIN. So the handler finds both at once, and its `select!` picks either at random.

pub mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::{Server, call};
use serde_json::json;

const STRACE: &str = "/usr/bin/strace";
const ROUNDS: usize = 12;

fn server_with_a_slow_event_loop() -> Server {
    assert!(
        std::path::Path::new(STRACE).exists(),
        "{STRACE} is missing: install Debian's strace (ci/scripts/run-tests does)"
    );
    common::server()
        .binary(STRACE)
        .args([
            "-D",
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "trace=epoll_wait,epoll_pwait,epoll_pwait2,fsync,fdatasync",
            "-e",
            "inject=epoll_wait,epoll_pwait,epoll_pwait2:delay_exit=200ms",
            "-e",
            "inject=fsync,fdatasync:delay_exit=100ms",
            "--",
        ])
        .arg(common::locker_binary().display().to_string())
        // No request log: each line is more work for the slowed event loop.
        .env("RUST_LOG", "info,actix_web::middleware::logger=warn")
        .start()
}

fn generation(reply: &common::Reply) -> u64 {
    reply.json()["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no generation in {}", reply.body))
}

/// The key holding `name` now, if any.
fn holder(server: &Server, name: &str) -> Option<String> {
    let reply = call("GET", &server.url(&format!("/lock/{name}")), None);
    match reply.status {
        404 => None,
        200 => reply.json()["key"].as_str().map(String::from),
        other => panic!("GET /lock/{name}: {other} {}", reply.body),
    }
}

#[test]
fn a_waiter_leaving_as_its_grant_arrives_either_got_the_lock_or_gave_it_back() {
    let server = server_with_a_slow_event_loop();
    let address = server.base.trim_start_matches("http://").to_string();
    let mut revoked = 0;
    let mut told = 0;
    for round in 0..ROUNDS {
        let name = format!("race-{round}");
        let held = server.lock(&name, json!({"key": "holder"}));
        assert_eq!(held.status, 200, "{}", held.body);
        let holder_generation = generation(&held);

        let body = r#"{"key":"leaving"}"#;
        let mut waiter = TcpStream::connect(&address).expect("connect");
        write!(
            waiter,
            "PUT /lock/{name}?wait=60s HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        common::wait_for_waiters(&server, &name, 1);

        // The release grants the lock to the waiter. The writer makes the grant durable, then
        // hands it to the waiting handler; the moment the state file shows it, the client says
        // goodbye (FIN), while the event loop is still held in epoll_wait.
        let url = server.url(&format!("/lock/{name}"));
        let release =
            std::thread::spawn(move || call("DELETE", &url, Some(r#"{"key":"holder"}"#)).status);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&server.state_file)
            .unwrap_or_default()
            .contains(r#""key":"leaving""#)
        {
            assert!(
                Instant::now() < deadline,
                "the release never granted the waiter"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        waiter.shutdown(Shutdown::Write).expect("FIN");
        assert_eq!(release.join().expect("release"), 200);

        // What the waiter's client was told, if anything.
        waiter
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut answer = String::new();
        let _ = waiter.read_to_string(&mut answer);
        if answer.starts_with("HTTP/1.1 200") {
            // Told: it holds the lock, as a client that got its 200 does.
            told += 1;
            assert_eq!(
                holder(&server, &name).as_deref(),
                Some("leaving"),
                "{answer}"
            );
            let released = server.unlock(&name, json!({"key": "leaving"}));
            assert_eq!(released.status, 200, "{}", released.body);
        } else {
            // Not told: the lock must not stay with it.
            let deadline = Instant::now() + Duration::from_secs(20);
            while holder(&server, &name).is_some() {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: {name} is held by {:?}, whose client was never told \
                     (it got {answer:?})",
                    holder(&server, &name)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            // The grant had been made (a generation was spent on it) and was given back.
            let next = server.lock(&name, json!({"key": "next"}));
            assert_eq!(next.status, 200, "{}", next.body);
            if generation(&next) > holder_generation + 1 {
                revoked += 1;
            }
        }
    }
    eprintln!("{ROUNDS} rounds: {told} waiters told of their grant, {revoked} grants revoked");
    assert!(
        revoked > 0,
        "no round revoked a grant: the race this test is for never happened"
    );
}
