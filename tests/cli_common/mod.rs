//! What the tests of `locker` as a client share (`tests/cli.rs`, `tests/cli_pools.rs`): run the
//! real binary against a test server with no connection settings leaking in, wait for it with
//! a deadline, and send it signals.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::Server;

/// `locker ARGS` pointed at `server`, with no connection settings leaking in.
pub fn locker(server: &Server, args: &[&str]) -> Command {
    let mut command = Command::new(crate::common::locker_binary());
    for name in [
        "LOCKER_URL",
        "LOCKER_USER",
        "LOCKER_PASSWORD",
        "LOCKER_CA_CERT",
        "AUTH_USER",
        "AUTH_PASS",
    ] {
        command.env_remove(name);
    }
    command
        .env("LOCKER_URL", &server.base)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Waits for `child` up to `timeout` (then kills it and fails).
pub fn finish(mut child: Child, started: Instant, timeout: Duration) -> Finished {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!(
                "locker did not finish in {timeout:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let elapsed = started.elapsed();
    let output = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    eprintln!("[locker] {stderr}");
    Finished {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr,
        elapsed,
    }
}

pub fn run(command: &mut Command) -> Finished {
    let started = Instant::now();
    finish(
        command.spawn().expect("start locker"),
        started,
        Duration::from_secs(30),
    )
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn signal(child: &Child, signal: i32) {
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}
