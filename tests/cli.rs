//! The `locker` binary as a client (`locker lock`, `locks`, `status`, `release`, `wait-free`)
//! against the real server on loopback.

pub mod cli_common;
pub mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use cli_common::{Holdable, finish, locker, read, run};
use common::{Server, wait_until};

fn key_of(server: &Server, name: &str) -> Option<String> {
    server.locks()[name]["key"].as_str().map(str::to_string)
}

/// Takes `name` under `key`, waiting up to 10 s.
fn take(server: &Server, name: &str, key: &str) -> common::Reply {
    common::call(
        "PUT",
        &server.url(&format!("/lock/{name}?wait=10s")),
        Some(&json!({"key": key}).to_string()),
    )
}

#[test]
fn the_command_runs_only_while_the_lock_is_held_and_its_status_passes_through() {
    let server = Server::start();
    let dir = common::temp_dir();
    let seen = dir.path().join("seen");
    assert_eq!(server.lock("deploy", json!({"key": "other"})).status, 200);

    let script = format!(
        "echo \"$LOCKER_LOCK_NAME $LOCKER_LOCK_KEY $LOCKER_LOCK_GENERATION\" > {}; sleep 1; exit 7",
        seen.display()
    );
    let started = Instant::now();
    let child = locker(
        &server,
        &[
            "lock", "deploy", "--key", "cli-key", "--wait", "20s", "--", "sh", "-c", &script,
        ],
    )
    .spawn()
    .expect("start");
    // Queued behind the other key (the server says so): the command must not have run.
    common::wait_for_waiters(&server, "deploy", 1);
    assert_eq!(
        read(&seen),
        "",
        "the command ran while another key held the lock"
    );

    assert_eq!(server.unlock("deploy", json!({"key": "other"})).status, 200);
    wait_until("the command to start", || !read(&seen).is_empty());
    let line = read(&seen);
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[..2], ["deploy", "cli-key"], "{line}");
    assert!(fields[2].parse::<u64>().is_ok(), "{line}");
    // While it runs, the lock is held under its key, with a lease and holder info.
    let status = &server.locks()["deploy"];
    assert_eq!(status["key"], "cli-key");
    assert!(status["expires_at"].is_string(), "{status}");
    assert_eq!(status["info"]["client"], "locker lock");

    let done = finish(child, started, Duration::from_secs(20));
    assert_eq!(done.code, Some(7), "{}", done.stderr);
    assert!(
        done.stderr.contains("waiting for lock \"deploy\""),
        "{}",
        done.stderr
    );
    assert_eq!(key_of(&server, "deploy"), None, "not released");
}

#[test]
fn concurrent_locks_on_one_name_never_overlap() {
    let server = Server::start();
    let dir = common::temp_dir();
    let log = dir.path().join("log");
    let script = format!(
        "echo enter >> {0}; sleep 0.3; echo exit >> {0}",
        log.display()
    );
    let started = Instant::now();
    let children: Vec<Child> = (0..3)
        .map(|_| {
            locker(&server, &["lock", "shared", "--", "sh", "-c", &script])
                .spawn()
                .expect("start")
        })
        .collect();
    for child in children {
        let done = finish(child, started, Duration::from_secs(20));
        assert_eq!(done.code, Some(0), "{}", done.stderr);
    }
    let lines: Vec<String> = read(&log).lines().map(str::to_string).collect();
    assert_eq!(
        lines,
        ["enter", "exit", "enter", "exit", "enter", "exit"],
        "overlapping runs"
    );
    assert_eq!(key_of(&server, "shared"), None);
}

#[test]
fn renewals_keep_the_lease_without_counting_up() {
    let server = Server::start();
    let dir = common::temp_dir();
    let stop = dir.path().join("stop");
    // The command runs until the test is done looking, however slow the machine. The lease has
    // room for two late renewals (they come every third of the TTL).
    let script = format!("while [ ! -e {} ]; do sleep 0.05; done", stop.display());
    let started = Instant::now();
    let child = locker(
        &server,
        &["lock", "renewing", "--ttl", "4s", "--", "sh", "-c", &script],
    )
    .spawn()
    .expect("start");
    wait_until("the lock to be taken", || {
        key_of(&server, "renewing").is_some()
    });
    let expires_at = |lock: &Value| {
        let text = lock["expires_at"].as_str().unwrap_or_default().to_string();
        humantime::parse_rfc3339_weak(&text).unwrap_or_else(|e| panic!("{lock}: {e}"))
    };
    let first_end = expires_at(&server.locks()["renewing"]);
    wait_until("the first lease to end", || {
        std::time::SystemTime::now() > first_end
    });
    // Past the first lease's end and still held: the renewals kept it, under one requestor.
    let lock = server.locks()["renewing"].clone();
    assert!(lock.is_object(), "not held past the first lease's end");
    assert!(expires_at(&lock) > first_end, "not renewed: {lock}");
    assert_eq!(
        lock["locked_by"].as_object().map(|m| m.len()),
        Some(1),
        "{lock}"
    );
    assert!(
        lock["locked_by"]
            .as_object()
            .is_some_and(|m| m.values().all(|c| c == 1)),
        "renewals counted up: {lock}"
    );
    std::fs::write(&stop, "").expect("end the command");
    let done = finish(child, started, Duration::from_secs(20));
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    assert_eq!(key_of(&server, "renewing"), None);
}

/// The lock `name`, for the scenarios `locker lock` shares with `locker pool acquire`.
fn with_lock(server: &Server, name: &str, scenario: fn(&Holdable)) {
    let take = ["lock", name];
    let named = format!("lock {name:?}");
    scenario(&Holdable {
        server,
        take: &take,
        named: &named,
        key: &|| key_of(server, name),
        waiters: &|| server.locks()[name]["waiters"].as_u64().unwrap_or(0),
        hold: &|key| server.lock(name, json!({ "key": key })).status == 200,
        force_release: &|| {
            let url = server.url(&format!("/lock/{name}?force=true"));
            let forced = common::call("DELETE", &url, Some("{}"));
            assert_eq!(forced.status, 200, "{}", forced.body);
        },
    });
}

#[test]
fn a_lost_lock_signals_the_command_and_exits_74() {
    with_lock(
        &Server::start(),
        "lease",
        cli_common::a_lost_holding_signals_the_command_and_exits_74,
    );
}

#[test]
fn a_command_ignoring_sigterm_is_killed_after_the_grace_period() {
    let server = Server::start();
    let dir = common::temp_dir();
    let log = dir.path().join("log");
    let script = format!(
        "trap '' TERM; echo started >> {0}; while true; do sleep 0.1; done",
        log.display()
    );
    let started = Instant::now();
    let child = locker(
        &server,
        &[
            "lock", "stubborn", "--ttl", "600ms", "--grace", "500ms", "--", "sh", "-c", &script,
        ],
    )
    .spawn()
    .expect("start");
    wait_until("the command to start", || read(&log).contains("started"));
    let forced = common::call(
        "DELETE",
        &server.url("/lock/stubborn?force=true"),
        Some("{}"),
    );
    assert_eq!(forced.status, 200);
    assert_eq!(take(&server, "stubborn", "thief").status, 200);
    let done = finish(child, started, Duration::from_secs(20));
    assert_eq!(done.code, Some(74), "{}", done.stderr);
    assert!(done.stderr.contains("SIGKILL"), "{}", done.stderr);
}

#[test]
fn sigint_is_forwarded_and_the_lock_released_after_the_command_exits() {
    with_lock(
        &Server::start(),
        "ctrl-c",
        cli_common::sigint_is_forwarded_and_released_after_the_command_exits,
    );
}

#[test]
fn a_signal_while_waiting_stops_at_once_and_holds_nothing() {
    with_lock(
        &Server::start(),
        "busy",
        cli_common::a_signal_while_waiting_stops_at_once_and_holds_nothing,
    );
}

#[test]
fn exit_codes_name_each_failure() {
    let server = Server::start();
    assert_eq!(server.lock("held", json!({"key": "holder"})).status, 200);

    let held = run(&mut locker(
        &server,
        &["lock", "held", "--wait", "0", "--", "true"],
    ));
    assert_eq!(held.code, Some(73), "{}", held.stderr);
    assert!(held.stderr.contains("key \"holder\""), "{}", held.stderr);
    let timed_out = run(&mut locker(
        &server,
        &["lock", "held", "--wait", "400ms", "--", "true"],
    ));
    assert_eq!(timed_out.code, Some(73), "{}", timed_out.stderr);
    assert!(timed_out.elapsed >= Duration::from_millis(400));

    let missing = run(&mut locker(
        &server,
        &["lock", "free", "--", "/nonexistent/command"],
    ));
    assert_eq!(missing.code, Some(127), "{}", missing.stderr);
    assert_eq!(
        key_of(&server, "free"),
        None,
        "released after a failed start"
    );

    let mut unreachable = locker(&server, &["locks"]);
    unreachable.env("LOCKER_URL", "http://127.0.0.1:1");
    let unreachable = run(&mut unreachable);
    assert_eq!(unreachable.code, Some(75), "{}", unreachable.stderr);
    assert_eq!(unreachable.stderr.trim().lines().count(), 1);

    let wrong_key = run(&mut locker(&server, &["release", "held", "--key", "nope"]));
    assert_eq!(wrong_key.code, Some(76), "{}", wrong_key.stderr);

    let usage = run(&mut locker(&server, &["lock", "x"]));
    assert_eq!(usage.code, Some(2));
}

#[test]
fn credentials_from_either_environment_name_and_401() {
    let server = common::server().auth("ops", "s3cret").start();
    let refused = run(&mut locker(&server, &["locks"]));
    assert_eq!(refused.code, Some(77), "{}", refused.stderr);
    assert!(refused.stderr.contains("401"), "{}", refused.stderr);
    for (user, password) in [
        ("LOCKER_USER", "LOCKER_PASSWORD"),
        ("AUTH_USER", "AUTH_PASS"),
    ] {
        let mut command = locker(&server, &["lock", "x", "--", "true"]);
        command.env(user, "ops").env(password, "s3cret");
        let done = run(&mut command);
        assert_eq!(done.code, Some(0), "{user}: {}", done.stderr);
    }
    let flags = run(&mut locker(
        &server,
        &["locks", "--user", "ops", "--password", "s3cret"],
    ));
    assert_eq!(flags.code, Some(0), "{}", flags.stderr);
}

#[test]
fn locks_status_release_and_wait_free() {
    let server = Server::start();
    assert_eq!(
        server
            .lock(
                "env",
                json!({"key": "k1", "requestor": "alice", "info": {"job": "deploy"}})
            )
            .status,
        200
    );
    let table = run(&mut locker(&server, &["locks"]));
    assert_eq!(table.code, Some(0));
    assert!(table.stdout.starts_with("NAME"), "{}", table.stdout);
    assert!(table.stdout.contains("env") && table.stdout.contains("alice"));
    let listed: Value =
        serde_json::from_str(&run(&mut locker(&server, &["locks", "--json"])).stdout)
            .expect("JSON");
    assert_eq!(listed["env"]["key"], "k1");

    let status = run(&mut locker(&server, &["status", "env"]));
    assert!(status.stdout.contains("info.job:") && status.stdout.contains("deploy"));
    let status: Value =
        serde_json::from_str(&run(&mut locker(&server, &["status", "env", "--json"])).stdout)
            .expect("JSON");
    assert_eq!(status["locked_by"]["alice"], 1);
    let free: Value =
        serde_json::from_str(&run(&mut locker(&server, &["status", "none", "--json"])).stdout)
            .expect("JSON");
    assert_eq!(free, json!({"name": "none", "free": true}));

    // A holding without info shows `info` as an object, as typed clients read it.
    assert_eq!(server.lock("bare", json!({"key": "k"})).status, 200);
    type Info = std::collections::HashMap<String, String>;
    #[derive(serde::Deserialize)]
    struct Typed {
        info: Info,
        holders: Vec<TypedHolder>,
    }
    #[derive(serde::Deserialize)]
    struct TypedHolder {
        info: Info,
    }
    let listed = run(&mut locker(&server, &["locks", "--json"])).stdout;
    let listed: std::collections::HashMap<String, Typed> =
        serde_json::from_str(&listed).expect(&listed);
    assert!(listed["bare"].info.is_empty() && listed["bare"].holders[0].info.is_empty());
    assert_eq!(listed["env"].info["job"], "deploy");
    let bare = run(&mut locker(&server, &["status", "bare", "--json"])).stdout;
    let bare: Typed = serde_json::from_str(&bare).expect(&bare);
    assert!(bare.info.is_empty() && bare.holders[0].info.is_empty());
    assert_eq!(server.unlock("bare", json!({"key": "k"})).status, 200);

    // wait-free: still held when the wait runs out → 73; returns once released.
    let still = run(&mut locker(
        &server,
        &["wait-free", "env", "--wait", "300ms"],
    ));
    assert_eq!(still.code, Some(73), "{}", still.stderr);
    let started = Instant::now();
    let waiting = locker(&server, &["wait-free", "env", "--wait", "20s"])
        .spawn()
        .expect("start");
    server.wait_for_metric("locker_waiting_requests 1");
    let released = run(&mut locker(
        &server,
        &["release", "env", "--key", "k1", "--requestor", "alice"],
    ));
    assert_eq!(released.code, Some(0), "{}", released.stderr);
    let done = finish(waiting, started, Duration::from_secs(10));
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    assert!(done.stdout.contains("is free"));
    assert_eq!(key_of(&server, "env"), None, "wait-free took the lock");

    assert_eq!(server.lock("env", json!({"key": "k2"})).status, 200);
    let forced = run(&mut locker(&server, &["release", "env", "--force"]));
    assert_eq!(forced.code, Some(0), "{}", forced.stderr);
    assert_eq!(key_of(&server, "env"), None);
}

/// A pipe whose reader is already closed, as `locker locks | head -1` leaves it once `head`
/// has read its line: the write end, to be the child's standard output.
fn closed_pipe() -> Stdio {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two new descriptors, which are owned below and nowhere else.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: fds[0] and fds[1] are open and owned by nobody else.
    let (reader, writer) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    drop(reader);
    Stdio::from(writer)
}

#[test]
fn a_closed_standard_output_ends_the_command_quietly_with_141() {
    let server = Server::start();
    for i in 0..3 {
        let reply = server.lock(&format!("piped-{i}"), json!({"key": "k"}));
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let cases: [&[&str]; 5] = [
        &["locks"],
        &["locks", "--json"],
        &["status", "piped-0"],
        &["status", "piped-0", "--json"],
        &["wait-free", "free-one", "--wait", "0"],
    ];
    for args in cases {
        let mut command = locker(&server, args);
        command.stdout(closed_pipe());
        let done = run(&mut command);
        assert_eq!(done.code, Some(141), "{args:?}: {}", done.stderr);
        assert_eq!(done.stderr, "", "{args:?} must exit quietly");
    }
    // The release is done before its answer cannot be printed.
    let mut command = locker(&server, &["release", "piped-1", "--key", "k"]);
    command.stdout(closed_pipe());
    assert_eq!(run(&mut command).code, Some(141));
    assert_eq!(key_of(&server, "piped-1"), None);
}

/// The shell commands of the README's recipe "HTTPS with a certificate of your own".
fn readme_certificate_recipe() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let recipe = readme
        .split("**HTTPS with a certificate of your own.**")
        .nth(1)
        .expect("the recipe in the README");
    let block = recipe
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a sh block in the recipe");
    block.to_string()
}

/// Runs `script` with `sh -e` in `dir`; panics with openssl's output if it fails.
fn shell(dir: &Path, script: &str) {
    common::run_ok(
        Command::new("sh")
            .args(["-e", "-c", script])
            .current_dir(dir),
    );
}

#[test]
fn the_readme_certificate_recipe_works_over_tls() {
    let dir = common::temp_dir();
    shell(dir.path(), &readme_certificate_recipe());
    let server = common::server()
        .tls(
            &dir.path().join("server.pem"),
            &dir.path().join("server.key"),
        )
        .start();
    let ca = dir.path().join("ca.pem");
    let trusting = reqwest::blocking::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&ca).expect("ca.pem")).expect("PEM"),
        )
        .build()
        .expect("client");
    let reply = common::call_with(
        &trusting,
        "PUT",
        &server.url("/lock/tls"),
        Some(&json!({"key": "k"}).to_string()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ca = ca.to_str().expect("path");
    for host in ["localhost", "127.0.0.1"] {
        let url = server.base.replace("127.0.0.1", host);
        let listed = run(&mut locker(
            &server,
            &["locks", "--url", &url, "--ca-cert", ca],
        ));
        assert_eq!(listed.code, Some(0), "{host}: {}", listed.stderr);
        assert!(listed.stdout.contains("tls"), "{}", listed.stdout);
    }
    // Without the CA, the client says which flag it needs.
    let refused = run(&mut locker(&server, &["locks"]));
    assert_eq!(refused.code, Some(75), "{}", refused.stderr);
    assert!(refused.stderr.contains("--ca-cert"), "{}", refused.stderr);
}

#[test]
fn a_self_signed_ca_certificate_is_refused_saying_what_is_wrong_and_how_to_fix_it() {
    let dir = common::temp_dir();
    // What most people type first: a self-signed certificate, which openssl makes a CA.
    shell(
        dir.path(),
        "openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost \
         -keyout key.pem -out cert.pem",
    );
    let cert = dir.path().join("cert.pem");
    let server = common::server()
        .tls(&cert, &dir.path().join("key.pem"))
        .start();
    let url = server.base.replace("127.0.0.1", "localhost");
    let refused = run(&mut locker(
        &server,
        &[
            "locks",
            "--url",
            &url,
            "--ca-cert",
            cert.to_str().expect("path"),
        ],
    ));
    assert_eq!(refused.code, Some(75), "{}", refused.stderr);
    for text in [
        "is a CA certificate",
        "subjectAltName",
        "SSL_CERT",
        "--ca-cert",
        "HTTPS with a certificate of your own",
    ] {
        assert!(
            refused.stderr.contains(text),
            "lacks {text:?}: {}",
            refused.stderr
        );
    }
    assert_eq!(
        refused.stderr.trim_end().lines().count(),
        1,
        "{}",
        refused.stderr
    );
}
