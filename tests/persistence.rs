//! The state file: restarts, the original locker's format, corrupt files, crashes, full disks
//! and clean shutdown.

pub mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, call};
use serde_json::json;

#[test]
fn locks_survive_a_restart() {
    let server = Server::start();
    server.lock("a", json!({"key": "k1", "requestor": "r1"}));
    server.lock("a", json!({"key": "k1", "requestor": "r1"}));
    server.lock("b", json!({"key": "k2"}));
    let before = server.locks();
    let server = server.restart();
    assert_eq!(server.locks(), before);
    assert_eq!(server.locks()["a"]["locked_by"], json!({"r1": 2}));
}

#[test]
fn a_state_file_of_the_original_go_locker_loads_as_is() {
    let dir = common::temp_dir();
    let path = dir.path().join("locker.yml");
    std::fs::write(
        &path,
        r#"{"a": {"locked_by": {"k1": 0}, "key": ""}, "b": {"locked_by": {"k2": 1}, "key": "k2"}, "c": {"locked_by": {"x": 2, "y": 1}, "key": "shared"}}"#,
    )
    .expect("write");
    let server = common::server().state_file(&path).start();
    let locks = server.locks();
    assert_eq!(locks.as_object().map(|m| m.len()), Some(2), "{locks}");
    assert_eq!(locks["b"]["key"], "k2");
    assert_eq!(locks["b"]["locked_by"], json!({"k2": 1}));
    assert_eq!(locks["c"]["locked_by"], json!({"x": 2, "y": 1}));
    // The held lock is really held, and the free one really free.
    assert_eq!(server.lock("b", json!({"key": "other"})).status, 423);
    assert_eq!(server.lock("a", json!({"key": "new"})).status, 200);
    let server = server.restart();
    assert_eq!(server.locks()["b"]["key"], "k2");
    assert_eq!(server.locks()["a"]["key"], "new");
}

#[test]
fn a_missing_file_is_created_and_an_empty_one_holds_no_locks() {
    let dir = common::temp_dir();
    let missing = dir.path().join("new.yml");
    let server = common::server().state_file(&missing).start();
    assert!(missing.exists());
    assert_eq!(server.locks(), json!({}));
    drop(server);

    let empty = dir.path().join("empty.yml");
    std::fs::write(&empty, "").expect("write");
    let server = common::server().state_file(&empty).start();
    assert_eq!(server.locks(), json!({}));
}

#[test]
fn a_corrupt_file_stops_the_start_and_is_left_untouched() {
    let dir = common::temp_dir();
    let cases = [
        ("syntax.yml", "a: {b: [}\n"),
        ("shape.yml", "a:\n  key: k\n  locked_by: [1, 2]\n"),
        (
            "ours.yml",
            "format: locker/v2\nnext_generation: lots\nlocks: {}\n",
        ),
    ];
    for (name, content) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, content).expect("write");
        let output = Command::new(common::locker_binary())
            .env("LOCKER_CONFIG", &path)
            .env("PORT", "0")
            .env("LOCKER_LISTEN", "127.0.0.1")
            .output()
            .expect("run");
        assert!(!output.status.success(), "{name} must not load");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&path.display().to_string()), "{stderr}");
        assert!(stderr.contains("line"), "{name}: {stderr}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), content);
    }
}

#[test]
fn a_temp_file_left_by_a_crash_is_removed_at_start() {
    let dir = common::temp_dir();
    let stale = dir.path().join(".locker.yml.locker-tmp");
    std::fs::write(&stale, "half a state file").expect("write");
    let _server = common::server()
        .state_file(dir.path().join("locker.yml"))
        .start();
    assert!(!stale.exists());
}

#[test]
fn sigterm_answers_waiters_finishes_and_exits_zero_with_state_durable() {
    let mut server = Server::start();
    assert_eq!(server.lock("held", json!({"key": "a"})).status, 200);
    let url = server.url("/lock/held?wait=30s");
    let waiter = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let reply = call("PUT", &url, Some(r#"{"key":"b"}"#));
        (reply.status, started.elapsed())
    });
    // Let the waiter queue up.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.locks()["held"]["waiters"] != 1 {
        assert!(std::time::Instant::now() < deadline, "waiter never queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.signal(libc::SIGTERM);
    let (status, waited) = waiter.join().expect("waiter thread");
    assert_eq!(status, 503);
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
    let exit = server.wait_exit(Duration::from_secs(20));
    assert!(exit.success(), "{exit}");
    let server = server.restart();
    assert_eq!(server.locks()["held"]["key"], "a");
}

/// What a client knows about one lock name it alone uses.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Known {
    Held(u64),
    Free,
    /// A request was sent and not answered: either outcome is allowed.
    Unknown,
}

#[test]
fn sigkill_under_load_never_loses_an_acknowledged_lock() {
    sigkill_rounds(common::server());
}

#[test]
fn sigkill_under_load_never_loses_an_acknowledged_lock_with_a_small_journal() {
    // 4 KiB holds a few records: the state file is rewritten and a new epoch started all the
    // time, so crashes land between records, rewrites and epochs.
    sigkill_rounds(common::server().env("LOCKER_JOURNAL_BYTES", "4096"));
}

#[test]
fn sigkill_under_load_never_loses_an_acknowledged_lock_with_an_8_mib_journal() {
    // The crash lands before the state file absorbed the journal: start-up replays it.
    sigkill_rounds(common::server().env("LOCKER_JOURNAL_BYTES", "8388608"));
}

fn sigkill_rounds(builder: common::ServerBuilder) {
    const ROUNDS: usize = 8;
    const CLIENTS: usize = 6;
    let mut server = builder.start();
    let known: Arc<Mutex<HashMap<String, Known>>> = Arc::default();
    let answered = Arc::new(AtomicUsize::new(0));
    let mut highest_generation = 0;
    for round in 0..ROUNDS {
        let before = answered.load(Ordering::Relaxed);
        let workers: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let base = server.base.clone();
                let known = known.clone();
                let answered = answered.clone();
                std::thread::spawn(move || hammer(&base, client, &known, &answered))
            })
            .collect();
        // The crash lands under load however slow the machine: after the clients were
        // answered a while, then at a moment that differs from round to round.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while answered.load(Ordering::Relaxed) < before + 50 {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the clients were not answered"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(40 * round as u64));
        server.kill();
        for worker in workers {
            worker.join().expect("client thread");
        }
        server = server.restart();
        let locks = server.locks();
        let mut known = known.lock().expect("model");
        for (name, state) in known.iter_mut() {
            let held = locks.get(name);
            match *state {
                Known::Held(generation) => {
                    let lock = held.unwrap_or_else(|| panic!("acknowledged lock {name} lost"));
                    assert_eq!(lock["key"], json!(name), "{name}");
                    assert_eq!(lock["generation"], json!(generation), "{name}");
                    highest_generation = highest_generation.max(generation);
                }
                Known::Free => assert!(held.is_none(), "released lock {name} came back"),
                Known::Unknown => {}
            }
            // Resynchronise the model with what survived.
            *state = match held {
                Some(lock) => Known::Held(lock["generation"].as_u64().expect("generation")),
                None => Known::Free,
            };
        }
    }
    assert!(highest_generation > 0, "the clients never got a lock");
    // Fencing tokens keep growing across the crashes.
    let fresh = server.lock("after-crashes", json!({"key": "k"}));
    assert!(fresh.json()["generation"].as_u64().expect("generation") > highest_generation);
}

/// Locks and unlocks this client's own names until the server goes away, counting answers.
fn hammer(
    base: &str,
    client: usize,
    known: &Mutex<HashMap<String, Known>>,
    answered: &AtomicUsize,
) {
    let http = common::client();
    for i in 0.. {
        let name = format!("c{client}-n{}", i % 5);
        let state = *known
            .lock()
            .expect("model")
            .entry(name.clone())
            .or_insert(Known::Free);
        let (method, next) = match state {
            Known::Held(_) => ("DELETE", Known::Free),
            _ => ("PUT", Known::Held(0)),
        };
        known
            .lock()
            .expect("model")
            .insert(name.clone(), Known::Unknown);
        let body = json!({"key": name}).to_string();
        let sent = http
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
                format!("{base}/lock/{name}"),
            )
            .body(body)
            .send();
        let Ok(response) = sent else { return };
        let status = response.status().as_u16();
        let Ok(reply) = response.json::<serde_json::Value>() else {
            return;
        };
        assert_eq!(status, 200, "{method} {name}: {reply}");
        let next = match next {
            Known::Held(_) => Known::Held(reply["generation"].as_u64().expect("generation")),
            other => other,
        };
        known.lock().expect("model").insert(name, next);
        answered.fetch_add(1, Ordering::Relaxed);
    }
}

/// A small tmpfs in a mount namespace of its own, held open by a `sleep` process and gone when
/// that process is killed (on drop). Made with util-linux's `unshare`: as any user through a
/// user namespace (`-Urm`, no privilege needed where user namespaces are allowed, as on Debian
/// and in rootless containers), else with a plain mount namespace (`-m`, root). The servers run
/// inside it through `nsenter`; the test reaches its files through `/proc/<holder>/root`.
struct Tmpfs {
    holder: std::process::Child,
    /// Whether the holder has a user namespace of its own (servers must enter it too).
    user_namespace: bool,
    /// The mount point, as the servers inside see it (an empty temp dir outside).
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = common::temp_dir();
        let mut reasons = Vec::new();
        for namespaces in [
            &["--user", "--map-root-user", "--mount"][..],
            &["--mount"][..],
        ] {
            match Tmpfs::hold(namespaces, size, dir.path()) {
                Ok(holder) => {
                    let user_namespace = namespaces.contains(&"--user");
                    return Ok(Tmpfs {
                        holder,
                        user_namespace,
                        dir,
                    });
                }
                Err(reason) => reasons.push(format!("unshare {}: {reason}", namespaces.join(" "))),
            }
        }
        Err(reasons.join("; "))
    }

    /// Starts the holder and waits until its tmpfs is mounted.
    fn hold(namespaces: &[&str], size: &str, dir: &Path) -> Result<std::process::Child, String> {
        use std::io::Read;
        let script =
            r#"mount -t tmpfs -o "size=$1" tmpfs "$2" && echo mounted && exec sleep 100000"#;
        let mut holder = Command::new("unshare")
            .args(namespaces)
            .args(["--propagation", "private", "sh", "-c", script, "sh", size])
            .arg(dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run unshare (util-linux): {e}"))?;
        let mut word = [0u8; 7];
        let stdout = holder.stdout.as_mut().expect("holder stdout");
        if stdout.read_exact(&mut word).is_ok() && &word == b"mounted" {
            return Ok(holder);
        }
        let _ = holder.kill();
        let output = holder.wait_with_output().map_err(|e| e.to_string())?;
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }

    /// `name` in the tmpfs, as the servers inside see it.
    fn inside(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `name` in the tmpfs, as this test reaches it.
    fn outside(&self, name: &str) -> PathBuf {
        let inside = self.inside(name);
        let relative = inside.strip_prefix("/").expect("absolute temp dir");
        PathBuf::from(format!("/proc/{}/root", self.holder.id())).join(relative)
    }

    /// A server that runs inside the tmpfs's namespaces, its state file `name` in the tmpfs.
    fn server(&self, name: &str) -> common::ServerBuilder {
        let mut builder = common::server()
            .binary("nsenter")
            .arg("--target")
            .arg(self.holder.id().to_string())
            .arg("--mount");
        if self.user_namespace {
            builder = builder.arg("--user").arg("--preserve-credentials");
        }
        builder
            .arg("--")
            .arg(common::locker_binary().display().to_string())
            .state_file(self.inside(name))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Writes until the file system is full.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("filler");
    let block = vec![0u8; 4096];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
}

/// A 512 KiB tmpfs: a disk that fills up. No privilege is needed where user namespaces are
/// allowed; where neither they nor a mount as root are, these tests fail with the reason rather
/// than pass untested.
fn small_tmpfs() -> Tmpfs {
    Tmpfs::mount("512k").unwrap_or_else(|reason| {
        panic!(
            "cannot mount a tmpfs in a namespace of its own ({reason}): allow unprivileged user \
             namespaces (sysctl kernel.unprivileged_userns_clone=1) or run the tests as root"
        )
    })
}

/// A server whose state file (and journal of `journal_bytes`) is on a 512 KiB tmpfs.
fn server_on_a_small_tmpfs(journal_bytes: &str) -> (Tmpfs, Server) {
    let tmpfs = small_tmpfs();
    let server = tmpfs
        .server("locker.yml")
        .env("LOCKER_JOURNAL_BYTES", journal_bytes)
        .start();
    (tmpfs, server)
}

#[test]
fn by_default_every_acknowledged_change_is_in_the_state_file_before_the_answer() {
    let server = Server::start();
    let state = server.state_file.clone();
    assert_eq!(server.lock("deploy", json!({"key": "build-1"})).status, 200);
    // Read at once, with the server still running: no journal holds it instead.
    let text = std::fs::read_to_string(&state).expect("state file");
    assert!(
        text.contains(r#""deploy":"#) && text.contains("build-1"),
        "{text}"
    );
    assert!(
        !std::path::PathBuf::from(format!("{}.journal", state.display())).exists(),
        "no journal by default"
    );
    assert_eq!(
        server.unlock("deploy", json!({"key": "build-1"})).status,
        200
    );
    let text = std::fs::read_to_string(&state).expect("state file");
    assert!(!text.contains("deploy"), "{text}");
}

#[test]
fn with_default_settings_the_server_starts_on_a_full_disk_serves_reads_and_recovers() {
    let tmpfs = small_tmpfs();
    let server = tmpfs.server("locker.yml").start();
    assert_eq!(server.lock("before", json!({"key": "k"})).status, 200);
    drop(server);
    let filler = tmpfs.outside("filler");
    fill(&filler);

    let server = tmpfs.server("locker.yml").start();
    assert_eq!(server.locks()["before"]["key"], "k");
    let refused = server.lock("during", json!({"key": "k"}));
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused.error().contains("No space left"),
        "{}",
        refused.body
    );
    // A state file that cannot even be created does not stop a start either.
    let empty = tmpfs.server("new.yml").start();
    assert_eq!(empty.locks(), json!({}));
    assert!(
        empty
            .log()
            .contains("cannot rewrite the state file at start-up")
    );

    std::fs::remove_file(&filler).expect("free space");
    assert_eq!(server.lock("during", json!({"key": "k"})).status, 200);
    let server = server.restart();
    assert_eq!(server.locks()["during"]["key"], "k");
    assert_eq!(server.locks()["before"]["key"], "k");
}

#[test]
fn readiness_is_503_while_a_full_disk_refuses_writes_and_200_once_there_is_room() {
    let tmpfs = small_tmpfs();
    let server = tmpfs.server("locker.yml").start();
    assert_eq!(call("GET", &server.url("/ready"), None).status, 200);
    let filler = tmpfs.outside("filler");
    fill(&filler);
    assert_eq!(server.lock("during", json!({"key": "k"})).status, 503);
    let ready = call("GET", &server.url("/ready"), None);
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(ready.error().contains("no free space"), "{}", ready.body);
    // Liveness stays: the process is fine, only its disk is not.
    assert_eq!(call("GET", &server.url("/health"), None).status, 200);
    std::fs::remove_file(&filler).expect("free space");
    // Ready again before any write succeeded: a load balancer must send one to find out.
    let ready = call("GET", &server.url("/ready"), None);
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(server.lock("during", json!({"key": "k"})).status, 200);
}

#[test]
fn with_the_journal_on_and_no_room_for_it_the_server_starts_without_it_and_warns() {
    let tmpfs = small_tmpfs();
    let state = tmpfs.outside("locker.yml");
    let server = tmpfs.server("locker.yml").start();
    assert_eq!(server.lock("before", json!({"key": "k"})).status, 200);
    drop(server);
    let filler = tmpfs.outside("filler");
    fill(&filler);

    let server = tmpfs
        .server("locker.yml")
        .env("LOCKER_JOURNAL_BYTES", "8388608")
        .start();
    assert!(
        server.log().contains("going on without the journal")
            && server.log().contains("LOCKER_JOURNAL_BYTES"),
        "{}",
        server.log()
    );
    assert_eq!(server.locks()["before"]["key"], "k");
    std::fs::remove_file(&filler).expect("free space");
    // Without the journal, each change rewrites the state file before it is answered.
    assert_eq!(server.lock("after", json!({"key": "k"})).status, 200);
    let text = std::fs::read_to_string(&state).expect("state file");
    assert!(text.contains(r#""after":"#), "{text}");
}

#[test]
fn without_a_journal_a_full_disk_refuses_mutations_with_503_applies_nothing_and_recovers() {
    let (tmpfs, server) = server_on_a_small_tmpfs("0");
    let state = tmpfs.outside("locker.yml");
    assert_eq!(server.lock("before", json!({"key": "k"})).status, 200);
    let on_disk = std::fs::read(&state).expect("state");

    let filler = tmpfs.outside("filler");
    fill(&filler);
    let refused = server.lock("during", json!({"key": "k"}));
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused.error().contains("nothing was changed"),
        "{}",
        refused.body
    );
    let release = server.unlock("before", json!({"key": "k"}));
    assert_eq!(release.status, 503);
    // Nothing was applied, in memory or on disk.
    let locks = server.locks();
    assert_eq!(locks.as_object().map(|m| m.len()), Some(1), "{locks}");
    assert_eq!(locks["before"]["key"], "k");
    assert_eq!(std::fs::read(&state).expect("state"), on_disk);
    // Other requests keep being served.
    assert_eq!(call("GET", &server.url("/health"), None).status, 200);

    std::fs::remove_file(&filler).expect("free space");
    assert_eq!(server.lock("during", json!({"key": "k"})).status, 200);
    assert_eq!(server.unlock("before", json!({"key": "k"})).status, 200);
    let server = server.restart();
    let locks = server.locks();
    assert_eq!(locks.as_object().map(|m| m.len()), Some(1), "{locks}");
    assert_eq!(locks["during"]["key"], "k");
}

#[test]
fn on_a_full_disk_the_journal_keeps_acknowledged_locks_then_refuses_with_503_and_recovers() {
    let (tmpfs, server) = server_on_a_small_tmpfs("16384");
    assert_eq!(server.lock("before", json!({"key": "k"})).status, 200);
    fill(&tmpfs.outside("filler"));

    // The journal's space was allocated up front: acknowledged changes are durable, even across
    // a crash and a start-up that cannot rewrite the state file.
    assert_eq!(server.lock("during", json!({"key": "k"})).status, 200);
    let server = server.restart();
    assert!(
        server.log().contains("going on with the journal"),
        "{}",
        server.log()
    );
    let locks = server.locks();
    assert_eq!(locks["during"]["key"], "k", "{locks}");
    assert_eq!(locks["before"]["key"], "k", "{locks}");

    // Once the journal is full, changes are refused and nothing is applied.
    let mut acknowledged = Vec::new();
    let refused = loop {
        let name = format!("more-{}", acknowledged.len());
        let reply = server.lock(&name, json!({"key": "k"}));
        if reply.status != 200 {
            break reply;
        }
        acknowledged.push(name);
        assert!(acknowledged.len() < 1000, "the journal never filled up");
    };
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused.error().contains("nothing was changed"),
        "{}",
        refused.body
    );
    let locks = server.locks();
    assert_eq!(
        locks.as_object().map(|m| m.len()),
        Some(2 + acknowledged.len()),
        "{locks}"
    );

    // With space again, the state file is rewritten and everything acknowledged is there.
    std::fs::remove_file(tmpfs.outside("filler")).expect("free space");
    assert_eq!(server.lock("after", json!({"key": "k"})).status, 200);
    let server = server.restart();
    let locks = server.locks();
    assert_eq!(
        locks.as_object().map(|m| m.len()),
        Some(3 + acknowledged.len()),
        "{locks}"
    );
    for name in acknowledged
        .iter()
        .chain(["before", "during", "after"].map(String::from).iter())
    {
        assert_eq!(locks[name]["key"], "k", "{name}: {locks}");
    }
}

#[test]
fn a_symlink_planted_at_the_temp_file_path_is_not_followed() {
    let server = Server::start();
    let dir = server.state_file.parent().expect("dir").to_path_buf();
    let victim = dir.join("victim");
    std::fs::write(&victim, "precious").expect("write");
    // Planted after start-up (which removes a stale temp file): the next write creates it.
    std::os::unix::fs::symlink(&victim, dir.join(".locker.yml.locker-tmp")).expect("symlink");
    assert_eq!(server.lock("planted", json!({"key": "k"})).status, 200);
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious"
    );
    let text = std::fs::read_to_string(&server.state_file).expect("state");
    assert!(text.contains("planted"), "{text}");
}

#[test]
fn a_symlinked_state_file_stays_a_link_and_its_target_is_updated() {
    let dir = common::temp_dir();
    let disk = dir.path().join("persistent-disk");
    std::fs::create_dir(&disk).expect("dir");
    let target = disk.join("locker.yml");
    std::fs::write(&target, "").expect("write");
    let link = dir.path().join("locker.yml");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");

    let server = common::server().state_file(&link).start();
    assert_eq!(server.lock("linked", json!({"key": "k"})).status, 200);
    let meta = std::fs::symlink_metadata(&link).expect("link");
    assert!(meta.file_type().is_symlink(), "the link was replaced");
    let text = std::fs::read_to_string(&target).expect("target");
    assert!(text.contains("linked"), "{text}");
    let server = server.restart();
    assert_eq!(server.locks()["linked"]["key"], "k");
}
