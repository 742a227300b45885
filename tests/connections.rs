//! Connections: every request head must arrive in time (not only a connection's first), the
//! number of open connections is capped, and the cap is checked against the descriptor limit at
//! start-up. Raw TCP sockets against the real binary.

pub mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Server;

fn connect(server: &Server) -> TcpStream {
    let address = server.base.strip_prefix("http://").expect("plain http");
    TcpStream::connect(address).expect("connect")
}

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";

/// Reads one whole response (head and Content-Length body) and returns its status, or 0 when
/// nothing complete arrived before the read timeout or the end of the stream.
fn read_response(stream: &mut TcpStream) -> u16 {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        if let Some(status) = complete_status(&answer) {
            return status;
        }
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return 0,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
        }
    }
}

fn complete_status(answer: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(answer);
    let end = text.find("\r\n\r\n")?;
    let length = text[..end]
        .lines()
        .find_map(|l| {
            let l = l.to_ascii_lowercase();
            l.strip_prefix("content-length:")?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(0);
    if answer.len() < end + 4 + length {
        return None;
    }
    text.get(9..12)?.parse().ok()
}

/// One request on a fresh connection, answered within `within`; 0 when it was not.
fn health_within(server: &Server, within: Duration) -> u16 {
    let mut stream = connect(server);
    stream.set_read_timeout(Some(within)).expect("timeout");
    stream.write_all(HEALTH).expect("write");
    read_response(&mut stream)
}

#[test]
fn a_connection_that_trickles_a_later_request_head_is_closed_at_the_head_timeout() {
    let server = common::server().env("LOCKER_HEAD_TIMEOUT", "1s").start();
    let mut stream = connect(&server);
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    stream.write_all(HEALTH).expect("write");
    assert_eq!(read_response(&mut stream), 200);
    // An idle keep-alive connection is not a slow head: after longer than the head timeout
    // without a byte, a whole request is still served.
    std::thread::sleep(Duration::from_millis(1500));
    stream.write_all(HEALTH).expect("write");
    assert_eq!(read_response(&mut stream), 200);
    // The next head trickles in, a byte every 100 ms: the server closes the connection once
    // the head has taken longer than a second since its first byte.
    let mut reader = stream.try_clone().expect("clone");
    let closed = std::thread::spawn(move || {
        let mut answer = Vec::new();
        let mut buffer = [0u8; 1024];
        while let Ok(n) = reader.read(&mut buffer) {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buffer[..n]);
        }
        (
            Instant::now(),
            String::from_utf8_lossy(&answer).into_owned(),
        )
    });
    let started = Instant::now();
    let head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Trickle: ";
    let trickle = head.iter().copied().chain(std::iter::repeat(b'a'));
    for byte in trickle {
        if closed.is_finished()
            || started.elapsed() > Duration::from_secs(10)
            || stream.write_all(&[byte]).is_err()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (at, answer) = closed.join().expect("reader");
    let after = at.duration_since(started);
    // Cut off by the 1 s head timeout, not by the 10 s the client would trickle on for.
    assert!(
        after < Duration::from_secs(8),
        "the trickled head kept its connection open for {after:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer:?}"
    );
}

/// The connection cap the server reports at start-up.
fn reported_cap(server: &Server) -> usize {
    let log = server.log();
    log.lines()
        .find_map(|line| {
            let rest = line.split("accepting at most ").nth(1)?;
            rest.split(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no connection cap in the log:\n{log}"))
}

#[test]
fn connections_beyond_the_cap_wait_and_are_served_once_others_close() {
    let server = common::server().env("LOCKER_MAX_CONNECTIONS", "4").start();
    let cap = reported_cap(&server);
    assert!((1..=4).contains(&cap), "cap {cap}");
    let mut held: Vec<TcpStream> = (0..cap)
        .map(|_| {
            let mut stream = connect(&server);
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            stream.write_all(HEALTH).expect("write");
            assert_eq!(read_response(&mut stream), 200);
            stream
        })
        .collect();
    // Every slot is taken by an idle keep-alive connection: a new one waits in the queue.
    let mut waiting = connect(&server);
    waiting
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    waiting.write_all(HEALTH).expect("write");
    assert_eq!(read_response(&mut waiting), 0, "served beyond the cap");
    // One closes: the waiting connection is served.
    drop(held.pop());
    waiting
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert_eq!(read_response(&mut waiting), 200);
}

#[test]
fn slow_clients_filling_the_cap_are_cut_off_and_health_is_served() {
    let server = common::server()
        .env("LOCKER_MAX_CONNECTIONS", "4")
        .env("LOCKER_HEAD_TIMEOUT", "1s")
        .start();
    let cap = reported_cap(&server);
    // Each slot is taken by a client that sent one request and now trickles the next head.
    let slow: Vec<_> = (0..cap)
        .map(|_| {
            let mut stream = connect(&server);
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            stream.write_all(HEALTH).expect("write");
            assert_eq!(read_response(&mut stream), 200);
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(20);
                for byte in b"GET /health HTTP/1.1\r\nX-Slow: "
                    .iter()
                    .chain([b'a'; 200].iter())
                {
                    if Instant::now() > until || stream.write_all(&[*byte]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    let asked = Instant::now();
    assert_eq!(health_within(&server, Duration::from_secs(10)), 200);
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "/health waited {:?} behind slow clients",
        asked.elapsed()
    );
    for thread in slow {
        thread.join().expect("slow client");
    }
}

/// Runs the server under `prlimit --nofile=soft:hard` until it listens or exits.
fn under_nofile(soft: u64, hard: u64, env: &[(&str, &str)]) -> common::ServerBuilder {
    common::server()
        .binary("prlimit")
        .arg(format!("--nofile={soft}:{hard}"))
        .arg(common::locker_binary().display().to_string())
        .envs(env)
}

#[test]
fn a_cap_that_cannot_fit_the_descriptor_limit_is_refused_when_set() {
    let output = under_nofile(256, 256, &[("LOCKER_MAX_CONNECTIONS", "1000")]).run_to_exit();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for text in ["LOCKER_MAX_CONNECTIONS", "1000", "256"] {
        assert!(stderr.contains(text), "stderr lacks {text:?}:\n{stderr}");
    }
}

#[test]
fn the_default_cap_is_lowered_to_fit_the_descriptor_limit() {
    let server = under_nofile(256, 256, &[]).start();
    let cap = reported_cap(&server);
    assert!(cap <= 64, "cap {cap} with 256 descriptors");
    assert!(
        server.log().contains("lowered"),
        "no warning:\n{}",
        server.log()
    );
    assert_eq!(health_within(&server, Duration::from_secs(5)), 200);
}

#[test]
fn the_soft_descriptor_limit_is_raised_to_fit_the_cap() {
    let server = under_nofile(256, 4096, &[("LOCKER_MAX_CONNECTIONS", "1000")]).start();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).expect("limits");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    let soft: Vec<&str> = open_files.split_whitespace().collect();
    assert_eq!(soft.get(3), Some(&"4096"), "{open_files}");
    let cap = reported_cap(&server);
    assert!((900..=1000).contains(&cap), "cap {cap}");
    assert_eq!(health_within(&server, Duration::from_secs(5)), 200);
}
