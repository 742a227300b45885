//! Durability by observation: the real binary runs under `strace`, which records its `fsync`,
//! `fdatasync` and `rename` calls and holds each sync for a fixed delay before returning. An
//! acknowledged change must have been synced before its answer, so each answer comes after the
//! delays of the syncs its write needs: a bound that only grows on a slower machine. A SIGKILL
//! keeps the page cache, so no crash test notices a sync that is missing; these do.

pub mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::json;

const STRACE: &str = "/usr/bin/strace";
/// How long strace holds each `fsync` and `fdatasync` before returning.
const SYNC_DELAY: Duration = Duration::from_millis(300);

/// The server under `strace -D` (the tracer is a grandchild, so the server is the test's own
/// child and dies with it), its syscalls of interest written to `dir/trace`.
fn traced_server(dir: &Path, journal_bytes: &str) -> Server {
    assert!(
        Path::new(STRACE).exists(),
        "{STRACE} is missing: install Debian's strace (ci/scripts/run-tests does)"
    );
    common::server()
        .binary(STRACE)
        .arg("-D")
        .arg("-f")
        .arg("-y")
        .arg("-qq")
        .arg("-o")
        .arg(dir.join("trace").display().to_string())
        .arg("-e")
        .arg("trace=fsync,fdatasync,rename,renameat,renameat2")
        .arg("-e")
        .arg(format!(
            "inject=fsync,fdatasync:delay_exit={}us",
            SYNC_DELAY.as_micros()
        ))
        .arg("--")
        .arg(common::locker_binary().display().to_string())
        .state_file(dir.join("locker.yml"))
        .env("LOCKER_JOURNAL_BYTES", journal_bytes)
        .start()
}

/// The traced calls so far, one per line.
fn trace(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("trace"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Locks `name` and returns how long the answer took.
fn timed_lock(server: &Server, name: &str) -> Duration {
    let asked = Instant::now();
    let reply = server.lock(name, json!({"key": "k"}));
    let took = asked.elapsed();
    assert_eq!(reply.status, 200, "{}", reply.body);
    took
}

#[test]
fn without_the_journal_the_new_state_file_and_its_directory_are_synced_before_the_answer() {
    let dir = common::temp_dir();
    let server = traced_server(dir.path(), "0");
    let state = dir.path().join("locker.yml");
    let temp = ".locker.yml.locker-tmp";
    for round in 0..3 {
        let name = format!("synced-{round}");
        let before = trace(dir.path()).len();
        let took = timed_lock(&server, &name);
        // fdatasync of the new file, then fsync of the directory after the rename: two delays.
        assert!(
            took >= 2 * SYNC_DELAY,
            "{name} was answered after {took:?}, before two syncs could have returned:\n{}",
            trace(dir.path())[before..].join("\n")
        );
        let calls = trace(dir.path())[before..].to_vec();
        let position = |what: &str, test: &dyn Fn(&str) -> bool| {
            calls
                .iter()
                .position(|line| test(line))
                .unwrap_or_else(|| panic!("no {what} for {name}:\n{}", calls.join("\n")))
        };
        let file_sync = position("fdatasync of the new file", &|l| {
            l.contains("fdatasync(") && l.contains(temp)
        });
        let rename = position("rename into place", &|l| {
            l.contains("rename") && l.contains(temp) && l.contains("locker.yml\"")
        });
        let dir_sync = position("fsync of the directory", &|l| {
            l.contains("fsync(") && l.contains(&format!("{}>)", dir.path().display()))
        });
        assert!(
            file_sync < rename && rename < dir_sync,
            "{name}: out of order:\n{}",
            calls.join("\n")
        );
        let text = std::fs::read_to_string(&state).expect("state file");
        assert!(text.contains(&name), "{text}");
    }
}

#[test]
fn with_the_journal_each_record_is_synced_before_the_answer() {
    let dir = common::temp_dir();
    let server = traced_server(dir.path(), "65536");
    let journal = "locker.yml.journal>";
    for round in 0..3 {
        let name = format!("journaled-{round}");
        let before = trace(dir.path()).len();
        let took = timed_lock(&server, &name);
        assert!(
            took >= SYNC_DELAY,
            "{name} was answered after {took:?}, before its record's sync could have returned"
        );
        let calls = trace(dir.path())[before..].to_vec();
        assert!(
            calls
                .iter()
                .any(|l| l.contains("fdatasync(") && l.contains(journal)),
            "no fdatasync of the journal for {name}:\n{}",
            calls.join("\n")
        );
    }
}
