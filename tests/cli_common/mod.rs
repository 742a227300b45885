//! What the tests of `locker` as a client share (`tests/cli.rs`, `tests/cli_pools.rs`): run the
//! real binary against a test server with no connection settings leaking in, wait for it with
//! a deadline, and send it signals.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{Server, wait_exit_within, wait_until};

/// `locker ARGS` pointed at `server`, with no connection settings leaking in.
pub fn locker(server: &Server, args: &[&str]) -> Command {
    let mut command = Command::new(crate::common::locker_binary());
    for name in locker::cli::variables() {
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
    wait_exit_within(&mut child, timeout, "locker");
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

pub fn signal(child: &Child, signal: i32) {
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

/// Something `locker` holds while a command runs (a lock, a pool's item), as the shared
/// scenarios below see it: how to ask `locker` for it, and how to look at it and act on it
/// from outside over the API.
pub struct Holdable<'a> {
    pub server: &'a Server,
    /// `locker` arguments that take it, up to (not including) `--` and the command.
    pub take: &'a [&'a str],
    /// How `locker`'s messages name it, e.g. `lock "x"`.
    pub named: &'a str,
    /// The key it is held under; `None` when free.
    pub key: &'a dyn Fn() -> Option<String>,
    /// How many wait for it.
    pub waiters: &'a dyn Fn() -> u64,
    /// Tries to take it at once under this key, from outside; whether it did.
    pub hold: &'a dyn Fn(&str) -> bool,
    /// Releases it whoever holds it, from outside.
    pub force_release: &'a dyn Fn(),
}

impl Holdable<'_> {
    /// `locker` taking it, then running `sh -c SCRIPT`.
    fn command(&self, extra: &[&str], script: &str) -> Command {
        let mut args = self.take.to_vec();
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", script]);
        locker(self.server, &args)
    }
}

/// SIGINT to `locker` reaches the command, and what it holds stays held until the command has
/// exited, then is released; locker exits with the command's status.
pub fn sigint_is_forwarded_and_released_after_the_command_exits(held: &Holdable) {
    let dir = crate::common::temp_dir();
    let log = dir.path().join("log");
    // The command cleans up until this file exists.
    let go = dir.path().join("go");
    let script = format!(
        "trap 'echo INT >> {0}; while [ ! -e {1} ]; do sleep 0.05; done; exit 130' INT; \
         echo started >> {0}; while true; do sleep 0.1; done",
        log.display(),
        go.display()
    );
    let started = Instant::now();
    let child = held.command(&[], &script).spawn().expect("start");
    wait_until("the command to start", || read(&log).contains("started"));
    signal(&child, libc::SIGINT);
    // Forwarded, and still held while the command cleans up.
    wait_until("the command to get SIGINT", || read(&log).contains("INT"));
    assert!((held.key)().is_some(), "released before the command exited");
    std::fs::write(&go, "").expect("let the command exit");
    let done = finish(child, started, Duration::from_secs(20));
    assert_eq!(done.code, Some(130), "{}", done.stderr);
    assert!(read(&log).contains("INT"), "SIGINT was not forwarded");
    assert_eq!((held.key)(), None, "not released");
}

/// A signal while `locker` waits (held by another key) ends it at once with 128+N, and the
/// server has let the waiter go: nothing is held for it afterwards.
pub fn a_signal_while_waiting_stops_at_once_and_holds_nothing(held: &Holdable) {
    assert!((held.hold)("holder"), "could not take it to begin with");
    let started = Instant::now();
    let child = held.command(&[], "true").spawn().expect("start");
    wait_until("the waiter to queue", || (held.waiters)() == 1);
    signal(&child, libc::SIGTERM);
    // It would wait forever: only the signal can end it within this (generous) bound.
    let done = finish(child, started, Duration::from_secs(20));
    assert_eq!(done.code, Some(128 + libc::SIGTERM), "{}", done.stderr);
    let said = format!("stopped by SIGTERM while waiting for {}", held.named);
    assert!(done.stderr.contains(&said), "{}", done.stderr);
    // The server let the gone waiter go; a queued one would be granted by this release.
    wait_until("the server to withdraw the waiter", || {
        (held.waiters)() == 0
    });
    (held.force_release)();
    assert_eq!((held.key)(), None, "the stopped waiter got it");
}

/// Taken away while the command runs (force-released and taken by key "thief"): `locker`
/// notices at a renewal, sends the command SIGTERM and exits 74, and its own release does not
/// free the thief's holding.
pub fn a_lost_holding_signals_the_command_and_exits_74(held: &Holdable) {
    let dir = crate::common::temp_dir();
    let log = dir.path().join("log");
    let script = format!(
        "trap 'echo TERM >> {0}; exit 0' TERM; echo started >> {0}; while true; do sleep 0.1; done",
        log.display()
    );
    let started = Instant::now();
    let child = held
        .command(&["--ttl", "1s", "--grace", "3s"], &script)
        .spawn()
        .expect("start");
    wait_until("the command to start", || read(&log).contains("started"));
    let forced_at = Instant::now();
    (held.force_release)();
    // The renewal may re-take it first (a new generation: lost all the same); the thief
    // then gets it once locker lets go.
    wait_until("the thief to take it", || {
        (held.key)().as_deref() == Some("thief") || (held.hold)("thief")
    });
    let done = finish(child, started, Duration::from_secs(20));
    assert_eq!(done.code, Some(74), "{}", done.stderr);
    // Noticed at a renewal (every 333 ms), long before the test's own deadline.
    assert!(
        forced_at.elapsed() < Duration::from_secs(15),
        "{:?}",
        forced_at.elapsed()
    );
    let said = format!("lost {}", held.named);
    assert!(done.stderr.contains(&said), "{}", done.stderr);
    assert!(read(&log).contains("TERM"), "the command was not signalled");
    // Its release did not free the new holder's.
    assert_eq!((held.key)().as_deref(), Some("thief"));
}
