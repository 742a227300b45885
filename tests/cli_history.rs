//! `locker history` and `locker watch` against the real server on loopback: a lock's last
//! events as a table and as JSON lines, every event after an id a page at a time, and events
//! printed as they happen, each once and in order, across a restart of the server.

pub mod cli_common;
pub mod common;

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use cli_common::{finish, locker, run, signal};
use common::history::ids;
use common::{Server, call, server, wait_until};

fn acquire(server: &Server, name: &str, body: Value) {
    let reply = call(
        "PUT",
        &server.url(&format!("/lock/{name}")),
        Some(&body.to_string()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
}

fn release(server: &Server, name: &str, key: &str) {
    release_by(server, name, key, key);
}

fn release_by(server: &Server, name: &str, key: &str, requestor: &str) {
    let reply = call(
        "DELETE",
        &server.url(&format!("/lock/{name}")),
        Some(&json!({"key": key, "requestor": requestor}).to_string()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
}

fn force_release(server: &Server, name: &str) {
    let reply = call(
        "DELETE",
        &server.url(&format!("/lock/{name}?force=true")),
        Some("{}"),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
        })
        .collect()
}

fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["kind"].as_str().unwrap_or("?"),
                e["lock"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn build_info(build: &str) -> Value {
    json!({"team": "main", "pipeline": "deploy", "job": "prod", "build_name": build})
}

#[test]
fn history_of_a_lock_shows_its_last_events_as_a_table_or_json_lines() {
    let server = Server::start();
    acquire(
        &server,
        "deploy",
        json!({"key": "pipeline-a", "requestor": "build-17", "info": build_info("17")}),
    );
    acquire(&server, "other", json!({"key": "x"}));
    release_by(&server, "deploy", "pipeline-a", "build-17");
    acquire(
        &server,
        "deploy",
        json!({"key": "pipeline-b", "info": build_info("18")}),
    );
    force_release(&server, "deploy");

    let done = run(&mut locker(&server, &["history", "deploy", "--json"]));
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let events = json_lines(&done.stdout);
    // Only this lock's, oldest first.
    assert_eq!(
        kinds(&events),
        [
            "acquired deploy",
            "released deploy",
            "acquired deploy",
            "force-released deploy"
        ]
    );
    assert!(ids(&events).windows(2).all(|w| w[0] < w[1]), "{events:?}");
    assert_eq!(events[1]["requestor"], "build-17");
    assert!(events[1]["held_ms"].is_u64(), "{}", events[1]);

    let done = run(&mut locker(&server, &["history", "deploy"]));
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let lines: Vec<&str> = done.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", done.stdout);
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "TIME",
            "KIND",
            "KEY",
            "REQUESTOR",
            "GEN",
            "FOR",
            "BUILD",
            "BY"
        ]
    );
    let released = lines[2];
    for text in [
        "released",
        "pipeline-a",
        "build-17",
        "held ",
        "main/deploy/prod #17",
    ] {
        assert!(
            released.contains(text),
            "{text:?} missing from {released:?}"
        );
    }
    let forced = lines[4];
    for text in [
        "force-released",
        "pipeline-b",
        "main/deploy/prod #18",
        "127.0.0.1",
    ] {
        assert!(forced.contains(text), "{text:?} missing from {forced:?}");
    }

    // --limit: the last N.
    let done = run(&mut locker(
        &server,
        &["history", "deploy", "--limit", "1", "--json"],
    ));
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    assert_eq!(kinds(&json_lines(&done.stdout)), ["force-released deploy"]);

    let done = run(&mut locker(&server, &["history", "never-used"]));
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    assert_eq!(done.stdout.trim(), "no events of lock \"never-used\"");
}

#[test]
fn history_all_pages_every_event_after_an_id() {
    let server = Server::start();
    for n in 0..3 {
        let key = format!("k{n}");
        acquire(&server, &format!("lock-{n}"), json!({"key": key}));
        release(&server, &format!("lock-{n}"), &key);
    }
    let done = run(&mut locker(&server, &["history", "--all", "--json"]));
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let every = json_lines(&done.stdout);
    assert_eq!(
        kinds(&every),
        [
            "acquired lock-0",
            "released lock-0",
            "acquired lock-1",
            "released lock-1",
            "acquired lock-2",
            "released lock-2"
        ]
    );
    assert!(!done.stderr.contains("more events"), "{}", done.stderr);

    // After the second event, at most three: the next three, and where to go on from.
    let since = ids(&every)[1].to_string();
    let done = run(&mut locker(
        &server,
        &[
            "history", "--all", "--since", &since, "--limit", "3", "--json",
        ],
    ));
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let page = json_lines(&done.stdout);
    assert_eq!(ids(&page), ids(&every)[2..5]);
    let resume = format!("locker history --all --since {}", ids(&every)[4]);
    assert!(done.stderr.contains(&resume), "{}", done.stderr);

    // The table names each event's lock.
    let done = run(&mut locker(&server, &["history", "--all"]));
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let lines: Vec<&str> = done.stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{}", done.stdout);
    assert!(
        lines[0].split_whitespace().any(|c| c == "LOCK"),
        "{}",
        lines[0]
    );
    assert!(
        lines[6].contains("released") && lines[6].contains("lock-2"),
        "{}",
        lines[6]
    );
}

#[test]
fn history_errors_are_one_line_with_their_exit_code() {
    // A server with its history off answers 404.
    let server = server().env("LOCKER_HISTORY_BYTES", "0").start();
    let done = run(&mut locker(&server, &["history", "deploy"]));
    assert_eq!(done.code, Some(76), "{}", done.stderr);
    assert_eq!(done.stderr.trim().lines().count(), 1, "{}", done.stderr);
    assert!(done.stderr.contains("404"), "{}", done.stderr);

    // Nobody listens.
    let mut gone = Server::start();
    gone.kill();
    let done = run(&mut locker(&gone, &["watch", "deploy"]));
    assert_eq!(done.code, Some(75), "{}", done.stderr);
    assert_eq!(done.stderr.trim().lines().count(), 1, "{}", done.stderr);
    assert!(
        done.stderr.contains("cannot reach the server"),
        "{}",
        done.stderr
    );
}

/// `locker watch ARGS` running, its standard output and error collected line by line.
struct Watch {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Watch {
    fn start(server: &Server, args: &[&str]) -> Watch {
        let mut all = vec!["watch"];
        all.extend_from_slice(args);
        let mut child = locker(server, &all).spawn().expect("start locker watch");
        let collect = |stream: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    sink.lock().expect("lines").push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().expect("stdout")));
        let stderr = collect(Box::new(child.stderr.take().expect("stderr")));
        Watch {
            child,
            stdout,
            stderr,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.stdout.lock().expect("lines").clone()
    }

    fn said(&self, text: &str) -> bool {
        self.stderr
            .lock()
            .expect("lines")
            .iter()
            .any(|l| l.contains(text))
    }

    fn wait_for_lines(&self, count: usize) -> Vec<String> {
        wait_until(&format!("{count} lines from locker watch"), || {
            self.lines().len() >= count
        });
        self.lines()
    }

    /// Stops it with SIGINT (as Ctrl-C does) and reaps it.
    fn stop(self) {
        signal(&self.child, libc::SIGINT);
        let done = finish(self.child, Instant::now(), Duration::from_secs(10));
        assert_eq!(
            done.code, None,
            "killed by SIGINT, not exited: {}",
            done.stderr
        );
    }
}

#[test]
fn watch_prints_each_event_once_in_order_across_a_restart_of_the_server() {
    let dir = common::temp_dir();
    let state = dir.path().join("locker.yml");
    let mut first = server().state_file(&state).start();
    let port = first.base.rsplit(':').next().expect("port").to_string();
    // Before the watch starts: printed all the same, from --since 0.
    acquire(&first, "deploy", json!({"key": "a"}));
    let watch = Watch::start(&first, &["deploy", "--since", "0", "--json"]);
    wait_until("the watch to connect", || {
        watch.said("watching lock \"deploy\"")
    });
    release(&first, "deploy", "a");
    acquire(&first, "other", json!({"key": "not watched"}));
    acquire(&first, "deploy", json!({"key": "b"}));
    watch.wait_for_lines(3);

    // The server goes away with the watch's connection, and comes back on the same port and
    // state: the watch reconnects and resumes after the last event it printed.
    first.kill();
    wait_until("the watch to notice", || {
        watch.said("lost the event stream")
    });
    let second = server()
        .state_file(&state)
        .env("PORT", port.as_str())
        .start();
    release(&second, "deploy", "b");
    acquire(&second, "deploy", json!({"key": "c"}));
    force_release(&second, "deploy");
    // The last one: anything printed twice would come before it.
    acquire(&second, "deploy", json!({"key": "last"}));
    let lines = watch.wait_for_lines(7);
    wait_until("the watch to say it reconnected", || {
        watch.said("reconnected")
    });
    let events = json_lines(&lines.join("\n"));
    assert_eq!(
        events
            .iter()
            .map(|e| format!(
                "{} {}",
                e["kind"].as_str().unwrap_or("?"),
                e["key"].as_str().unwrap_or("?")
            ))
            .collect::<Vec<_>>(),
        [
            "acquired a",
            "released a",
            "acquired b",
            "released b",
            "acquired c",
            "force-released c",
            "acquired last"
        ],
        "{lines:#?}"
    );
    assert!(events.iter().all(|e| e["lock"] == "deploy"), "{events:?}");
    assert!(ids(&events).windows(2).all(|w| w[0] < w[1]), "{events:?}");
    // It resumed after the last event printed before the server went away.
    let resumed = format!("resuming after event {}", ids(&events)[2]);
    assert!(watch.said(&resumed), "no {resumed:?}");
    watch.stop();
}

#[test]
fn watch_prints_one_line_per_event() {
    let server = Server::start();
    let watch = Watch::start(&server, &[]);
    wait_until("the watch to connect", || {
        watch.said("watching every lock and pool")
    });
    acquire(
        &server,
        "deploy",
        json!({"key": "pipeline-a", "info": build_info("3")}),
    );
    release(&server, "deploy", "pipeline-a");
    let lines = watch.wait_for_lines(2);
    assert!(
        lines[0].contains(" acquired deploy key=pipeline-a requestor=pipeline-a "),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].ends_with("build=\"main/deploy/prod #3\""),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains(" released deploy key=pipeline-a "),
        "{}",
        lines[1]
    );
    assert!(lines[1].contains(" held="), "{}", lines[1]);
    watch.stop();
}
