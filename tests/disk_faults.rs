//! Disk faults in the middle of a write, injected into the real binary with libfiu (Debian's
//! `fiu-utils`: `fiu-run` preloads its POSIX wrappers, `fiu-ctrl` makes the next `fsync` or
//! `fdatasync` fail once with EIO). What each test checks: a change refused with 503 never comes
//! back after a crash, and an acknowledged one is never lost.

pub mod common;

use std::path::Path;
use std::process::Command;

use common::{Server, wait_until};
use serde_json::json;

const FIU_RUN: &str = "/usr/bin/fiu-run";
const FIU_CTRL: &str = "/usr/bin/fiu-ctrl";

/// The server under `fiu-run`, with remote control through FIFOs under `dir`.
fn server_with_faults(dir: &Path, journal_bytes: &str) -> Server {
    builder_with_faults(dir, journal_bytes).start()
}

fn builder_with_faults(dir: &Path, journal_bytes: &str) -> common::ServerBuilder {
    for tool in [FIU_RUN, FIU_CTRL] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: install Debian's fiu-utils (ci/scripts/run-tests does)"
        );
    }
    common::server()
        .binary(FIU_RUN)
        .arg("-x")
        .arg("-f")
        .arg(fifo_prefix(dir).display().to_string())
        .arg(common::locker_binary().display().to_string())
        .state_file(dir.join("locker.yml"))
        .env("LOCKER_JOURNAL_BYTES", journal_bytes)
}

fn fifo_prefix(dir: &Path) -> std::path::PathBuf {
    dir.join("fiu")
}

/// Makes the next call of `function` (`fsync` or `fdatasync`) in the server fail with EIO.
fn fail_next(dir: &Path, server: &Server, function: &str) {
    fail_next_at(dir, server, &format!("posix/io/sync/{function}"));
}

fn state_text(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("locker.yml")).expect("state file")
}

#[test]
fn without_the_journal_a_refused_rewrite_is_undone_on_disk_before_the_503() {
    let dir = common::temp_dir();
    let server = server_with_faults(dir.path(), "0");
    assert_eq!(server.lock("kept", json!({"key": "k"})).status, 200);

    // The new file is renamed into place, then the directory's fsync fails.
    fail_next(dir.path(), &server, "fsync");
    let refused = server.lock("refused", json!({"key": "k"}));
    assert_eq!(refused.status, 503, "{}", refused.body);
    let text = state_text(dir.path());
    assert!(
        !text.contains("refused"),
        "the refused change is on disk: {text}"
    );
    assert!(text.contains("kept"), "{text}");

    let server = server.restart();
    let locks = server.locks();
    assert_eq!(locks["kept"]["key"], "k", "{locks}");
    assert!(
        locks.get("refused").is_none(),
        "a refused lock came back: {locks}"
    );
    assert_eq!(server.lock("refused", json!({"key": "other"})).status, 200);
}

#[test]
fn with_the_journal_a_record_whose_sync_failed_is_not_replayed_after_a_crash() {
    let dir = common::temp_dir();
    let server = server_with_faults(dir.path(), "65536");
    assert_eq!(server.lock("kept", json!({"key": "k"})).status, 200);
    // The state file absorbs the journal a second later; past that, the only sync a lock
    // makes is its journal record's fdatasync.
    wait_until("the state file holds the first lock", || {
        state_text(dir.path()).contains("kept")
    });

    fail_next(dir.path(), &server, "fdatasync");
    let refused = server.lock("refused", json!({"key": "k"}));
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(server.locks().get("refused").is_none());

    let server = server.restart();
    let locks = server.locks();
    assert_eq!(locks["kept"]["key"], "k", "{locks}");
    assert!(
        locks.get("refused").is_none(),
        "a refused lock came back: {locks}"
    );
}

#[test]
fn with_the_journal_a_rewrite_whose_directory_sync_failed_loses_no_later_change() {
    let dir = common::temp_dir();
    let server = server_with_faults(dir.path(), "65536");
    // The next fsync is the directory's, after the rewrite that absorbs this lock's record.
    fail_next(dir.path(), &server, "fsync");
    assert_eq!(server.lock("first", json!({"key": "k"})).status, 200);
    wait_until("the rewrite of the state file failed", || {
        server.log().contains("cannot rewrite the state file yet")
    });

    assert_eq!(server.lock("later", json!({"key": "k"})).status, 200);
    let server = server.restart();
    let locks = server.locks();
    assert_eq!(locks["first"]["key"], "k", "{locks}");
    assert_eq!(
        locks["later"]["key"], "k",
        "an acknowledged lock was lost: {locks}"
    );
}

#[test]
fn a_force_release_that_cannot_be_written_is_refused_kept_and_counted() {
    let dir = common::temp_dir();
    let server = server_with_faults(dir.path(), "0");
    assert_eq!(server.lock("held", json!({"key": "k"})).status, 200);
    fail_next(dir.path(), &server, "fsync");
    let forced = common::call("DELETE", &server.url("/lock/held?force=true"), None);
    assert_eq!(forced.status, 503, "{}", forced.body);
    assert_eq!(server.locks()["held"]["key"], "k");
    let metrics = common::call("GET", &server.url("/metrics"), None).body;
    assert!(
        metrics.contains(r#"locker_releases_total{outcome="unavailable"} 1"#),
        "{metrics}"
    );
    let server = server.restart();
    assert_eq!(server.locks()["held"]["key"], "k");
}

/// What a client of the load below knows: each of its own locks is held or free.
type Model = std::collections::HashMap<String, bool>;

/// Four clients lock and unlock locks of their own as fast as they can while a fault is armed,
/// over and over, at whatever moment of a write it lands, in the functions the writer uses:
/// every failure must answer 503 with nothing applied, nothing acknowledged may be lost, nothing
/// refused may come back after a SIGKILL, and once no fault is armed every request succeeds.
fn faults_under_load(journal_bytes: &str, functions: &[&str]) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    const CLIENTS: usize = 4;
    const FAULTS_PER_FUNCTION: usize = 5;
    let dir = common::temp_dir();
    // Request logging off: each log line is a write(2) that would take the armed fault.
    let server = builder_with_faults(dir.path(), journal_bytes)
        .env("RUST_LOG", "warn,locker::server=info")
        .start();
    let base = server.base.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (base, stop) = (base.clone(), stop.clone());
            let (answered, refused) = (answered.clone(), refused.clone());
            std::thread::spawn(move || -> Result<Model, String> {
                let mut model = Model::new();
                let http = common::client();
                let mut round = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("c{client}-{}", round % 3);
                    let held = model.get(&name).copied().unwrap_or(false);
                    let method = if held { "DELETE" } else { "PUT" };
                    let url = format!("{base}/lock/{name}");
                    let reply = common::call_with(&http, method, &url, Some(r#"{"key":"k"}"#));
                    match reply.status {
                        200 => {
                            model.insert(name, !held);
                        }
                        503 if reply.error().contains("nothing was changed") => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        other => return Err(format!("{method} {name}: {other} {}", reply.body)),
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                    round += 1;
                }
                Ok(model)
            })
        })
        .collect();

    // Arms one failure of `function` and waits for 30 more answers: the writer met it.
    let after_answers = |count: usize| {
        let target = answered.load(Ordering::Relaxed) + count;
        wait_until("the clients got more answers", || {
            answered.load(Ordering::Relaxed) >= target
        });
    };
    let mut refused_by = Vec::new();
    for function in functions {
        let before = refused.load(Ordering::Relaxed);
        for _ in 0..FAULTS_PER_FUNCTION {
            let point = match *function {
                "pwrite" => "posix/io/rw/pwrite".to_string(),
                "rename" => "posix/io/dir/rename".to_string(),
                sync => format!("posix/io/sync/{sync}"),
            };
            fail_next_at(dir.path(), &server, &point);
            after_answers(30);
        }
        refused_by.push((*function, refused.load(Ordering::Relaxed) - before));
    }
    // No fault armed any more: every request must succeed.
    let refused_before_recovery = refused.load(Ordering::Relaxed);
    after_answers(200);
    stop.store(true, Ordering::Relaxed);
    let mut expected = serde_json::Map::new();
    for client in clients {
        let model = client.join().expect("client thread").expect("client");
        for (name, held) in model {
            if held {
                expected.insert(name, json!("k"));
            }
        }
    }
    assert_eq!(
        refused.load(Ordering::Relaxed),
        refused_before_recovery,
        "requests were refused after the faults were removed"
    );
    for (function, count) in &refused_by {
        assert!(
            *count > 0,
            "no request was refused while {function} failed: {refused_by:?}"
        );
    }
    eprintln!("refused while each function failed: {refused_by:?}");

    let keys = |server: &Server| -> serde_json::Map<String, serde_json::Value> {
        let locks = server.locks();
        let locks = locks.as_object().cloned().unwrap_or_default();
        locks
            .into_iter()
            .map(|(name, lock)| (name, lock["key"].clone()))
            .collect()
    };
    assert_eq!(
        keys(&server),
        expected,
        "memory differs from what was acknowledged"
    );
    let server = server.restart();
    assert_eq!(
        keys(&server),
        expected,
        "the disk differs from what was acknowledged"
    );
}

/// Makes the next call through libfiu's failure point `point` fail once with EIO.
fn fail_next_at(dir: &Path, server: &Server, point: &str) {
    let command = format!("enable name={point},failnum=1,failinfo=5,onetime");
    common::run_ok(
        Command::new(FIU_CTRL)
            .arg("-f")
            .arg(fifo_prefix(dir))
            .args(["-c", &command])
            .arg(server.pid().to_string()),
    );
}

// `write` is not among the points: libfiu's `posix/io/rw/write` also fails the eventfd writes
// with which tokio wakes its I/O driver, and tokio treats that as fatal. Failing writes of the
// state file are covered by the full-disk tests in tests/persistence.rs (ENOSPC on a tmpfs).
#[test]
fn under_load_each_failing_fsync_and_rename_refuses_and_loses_nothing() {
    faults_under_load("0", &["fdatasync", "fsync", "rename"]);
}

#[test]
fn under_load_with_the_journal_each_failing_write_and_sync_refuses_and_loses_nothing() {
    faults_under_load("65536", &["pwrite", "fdatasync"]);
}
