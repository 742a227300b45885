//! The history and live events against the real server: every kind of change recorded once,
//! in order, with its fields; nothing for a refused change; a lock's own history; the history
//! across a restart and a SIGKILL under load; its bounds under a flood; server-sent events
//! resumed with `Last-Event-ID` losing nothing; a reader that stops reading dropped without
//! slowing anyone down.

pub mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::history::{Load, all_events, assert_kept, ids};
use common::{Server, call, server, wait_for_waiters, wait_until};
use serde_json::{Value, json};

/// An event reduced to what the scenario decides: kind, subject, key, requestor, count.
fn summary(event: &Value) -> String {
    let field = |name: &str| match &event[name] {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let subject = match (&event["lock"], &event["pool"]) {
        (Value::String(lock), _) => lock.clone(),
        (_, Value::String(pool)) => format!("{pool}/{}", field("item")),
        _ => "?".into(),
    };
    format!(
        "{} {subject} {} {} {}",
        field("kind"),
        field("key"),
        field("requestor"),
        field("count")
    )
}

fn acquire(server: &Server, name: &str, body: Value) -> common::Reply {
    call(
        "PUT",
        &server.url(&format!("/lock/{name}")),
        Some(&body.to_string()),
    )
}

fn release(server: &Server, name: &str, key: &str, requestor: &str) -> common::Reply {
    call(
        "DELETE",
        &server.url(&format!("/lock/{name}")),
        Some(&json!({"key": key, "requestor": requestor}).to_string()),
    )
}

/// A waiting acquire on a thread of its own; its status arrives on the channel.
fn acquire_waiting(server: &Server, name: &str, body: Value, wait: &str) -> mpsc::Receiver<u16> {
    let url = server.url(&format!("/lock/{name}?wait={wait}"));
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let reply = call("PUT", &url, Some(&body.to_string()));
        let _ = sender.send(reply.status);
    });
    receiver
}

#[test]
fn every_kind_of_change_is_recorded_once_in_order_with_its_fields() {
    let server = server().start();
    let info = json!({"team": "main", "pipeline": "deploy", "job": "prod", "build": "17"});
    // Acquired twice (a release frees every count), then queued behind and served.
    assert_eq!(
        acquire(
            &server,
            "l",
            json!({"key": "k1", "requestor": "r1", "info": info})
        )
        .status,
        200
    );
    assert_eq!(
        acquire(&server, "l", json!({"key": "k1", "requestor": "r1"})).status,
        200
    );
    let served = acquire_waiting(&server, "l", json!({"key": "k2", "requestor": "r2"}), "30s");
    wait_for_waiters(&server, "l", 1);
    assert_eq!(release(&server, "l", "k1", "r1").status, 200);
    assert_eq!(served.recv_timeout(Duration::from_secs(10)), Ok(200));
    // A wait that runs out, and one whose client goes away.
    let timed_out = acquire_waiting(
        &server,
        "l",
        json!({"key": "k3", "requestor": "r3"}),
        "300ms",
    );
    assert_eq!(timed_out.recv_timeout(Duration::from_secs(10)), Ok(423));
    let impatient = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .expect("client");
    let gone = impatient
        .put(server.url("/lock/l?wait=30s"))
        .body(json!({"key": "k4", "requestor": "r4"}).to_string())
        .send();
    assert!(gone.is_err(), "the impatient client should have given up");
    wait_until("the departed waiter is withdrawn", || {
        all_events(&server).iter().any(|e| e["kind"] == "withdrawn")
    });
    // Forced out, then a lease that runs out, and a lock of two slots.
    let forced = call("DELETE", &server.url("/lock/l?force=true"), None);
    assert_eq!(forced.status, 200, "{}", forced.body);
    assert_eq!(
        acquire(
            &server,
            "t",
            json!({"key": "k5", "requestor": "r5", "ttl": "200ms"})
        )
        .status,
        200
    );
    wait_until("the lease runs out", || {
        all_events(&server).iter().any(|e| e["kind"] == "expired")
    });
    assert_eq!(
        acquire(
            &server,
            "s",
            json!({"key": "k6", "requestor": "r6", "slots": 2})
        )
        .status,
        200
    );
    // A pool: added, updated, claimed, released, removed.
    let pool = |method: &str, path: &str, body: Value| {
        let reply = call(method, &server.url(path), Some(&body.to_string()));
        assert!(
            reply.status < 300,
            "{method} {path}: {} {}",
            reply.status,
            reply.body
        );
    };
    pool("POST", "/pool/envs/item/e1", json!({"metadata": "a: 1"}));
    pool("PUT", "/pool/envs/item/e1", json!({"metadata": "a: 2"}));
    pool(
        "PUT",
        "/pool/envs/claim",
        json!({"key": "k7", "requestor": "r7"}),
    );
    pool(
        "DELETE",
        "/pool/envs/item/e1/claim",
        json!({"key": "k7", "requestor": "r7"}),
    );
    pool("DELETE", "/pool/envs/item/e1", json!({}));

    let events = all_events(&server);
    let summaries: Vec<String> = events.iter().map(summary).collect();
    assert_eq!(
        summaries,
        [
            "acquired l k1 r1 1",
            "acquired l k1 r1 2",
            "queued l k2 r2 -",
            "released l k1 r1 -",
            "acquired l k2 r2 1",
            "queued l k3 r3 -",
            "timed-out l k3 r3 -",
            "queued l k4 r4 -",
            "withdrawn l k4 r4 -",
            "force-released l k2 r2 -",
            "acquired t k5 r5 1",
            "expired t k5 r5 -",
            "acquired s k6 r6 1",
            "slots-changed s - - -",
            "item-added envs/e1 - - -",
            "item-updated envs/e1 - - -",
            "acquired envs/e1 k7 r7 1",
            "released envs/e1 k7 r7 -",
            "item-removed envs/e1 - - -",
        ],
    );
    let ids = ids(&events);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    // The fields each kind carries.
    let first = &events[0];
    assert_eq!(first["info"], info);
    assert_eq!(first["generation"], json!(1));
    assert!(
        first["at"].as_str().is_some_and(|at| at.ends_with('Z')),
        "{first}"
    );
    let served = &events[4];
    assert!(served["waited_ms"].as_u64().is_some(), "{served}");
    assert_eq!(served["generation"], json!(2));
    let released = &events[3];
    assert!(released["held_ms"].as_u64().is_some(), "{released}");
    assert_eq!(
        released["info"], info,
        "a release names the build that held"
    );
    assert!(
        events[6]["waited_ms"].as_u64().is_some_and(|ms| ms >= 300),
        "{}",
        events[6]
    );
    assert!(
        events[9]["by"]
            .as_str()
            .is_some_and(|by| by.contains("127.0.0.1")),
        "a force release says who asked: {}",
        events[9]
    );
    assert_eq!(events[13]["slots"], json!(2));

    // A lock's own history, last events first asked.
    let own = call("GET", &server.url("/lock/l/history?limit=3"), None);
    assert_eq!(own.status, 200, "{}", own.body);
    let own: Vec<String> = own.json()["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(summary)
        .collect();
    assert_eq!(
        own,
        [
            "queued l k4 r4 -",
            "withdrawn l k4 r4 -",
            "force-released l k2 r2 -"
        ]
    );
    let pool_only = call("GET", &server.url("/history?pool=envs"), None).json();
    assert_eq!(pool_only["events"].as_array().map(Vec::len), Some(5));

    // The history is on disk: a restart keeps it, and numbering goes on after it.
    let server = server.restart();
    assert_eq!(all_events(&server), events);
    assert_eq!(
        acquire(&server, "l", json!({"key": "k8", "requestor": "r8"})).status,
        200
    );
    let after = all_events(&server);
    assert_eq!(after.len(), events.len() + 1);
    assert!(after[events.len()]["id"].as_u64() > events.last().and_then(|e| e["id"].as_u64()));
}

#[test]
fn refused_requests_record_nothing() {
    let server = server().start();
    assert_eq!(
        acquire(&server, "l", json!({"key": "k1", "requestor": "r1"})).status,
        200
    );
    let before = all_events(&server);
    assert_eq!(before.len(), 1);
    assert_eq!(
        acquire(&server, "l", json!({"key": "k2", "requestor": "r2"})).status,
        423
    );
    assert_eq!(release(&server, "l", "k2", "r2").status, 423);
    // Releasing a free lock answers 200, as the original did, and changes nothing.
    assert_eq!(release(&server, "free", "k1", "r1").status, 200);
    assert_eq!(
        acquire(&server, "l", json!({"key": "k1", "slots": 3})).status,
        409
    );
    assert_eq!(
        call("GET", &server.url("/history?limit=x"), None).status,
        400
    );
    assert_eq!(all_events(&server), before);
}

#[test]
fn a_lock_named_with_a_slash_before_history_is_asked_for_encoded() {
    let server = server().start();
    assert_eq!(
        acquire(&server, "team%2Fdeploy", json!({"key": "k"})).status,
        200
    );
    let own = call("GET", &server.url("/lock/team%2Fdeploy/history"), None);
    assert_eq!(own.status, 200, "{}", own.body);
    assert_eq!(own.json()["events"][0]["lock"], json!("team/deploy"));
    let status = call("GET", &server.url("/lock/team%2Fdeploy"), None);
    assert_eq!(status.status, 200, "{}", status.body);
}

#[test]
fn history_survives_sigkill_under_load_with_every_acknowledged_change_and_no_refused_one() {
    let server = server().start();
    let load = Load::start((0..6).map(|_| server.base.clone()));
    wait_until("the load has made a few hundred changes", || {
        call("GET", &server.url("/history?limit=1"), None).json()["oldest"] != json!(0)
            && all_events(&server).len() > 300
    });
    server.signal(libc::SIGKILL);
    let (acknowledged, refused) = load.stop(100);
    let server = server.restart();
    let events = all_events(&server);
    assert_kept(&events, &acknowledged, &refused);
}

#[test]
fn the_bounds_hold_under_a_flood_of_changes() {
    let bytes = 64 * 1024;
    let server = server()
        .env("LOCKER_HISTORY_BYTES", bytes.to_string())
        .env("LOCKER_HISTORY_PER_LOCK", "20")
        .start();
    assert_eq!(acquire(&server, "quiet", json!({"key": "q"})).status, 200);
    let client = common::client();
    for n in 0..1500 {
        let lock = format!("busy-{}", n % 5);
        let body = json!({"key": format!("k{n}"), "requestor": format!("r{n}")}).to_string();
        let url = server.url(&format!("/lock/{lock}"));
        let acquired = client.put(&url).body(body.clone()).send().expect("acquire");
        assert_eq!(acquired.status().as_u16(), 200);
        let released = client.delete(&url).body(body).send().expect("release");
        assert_eq!(released.status().as_u16(), 200);
    }
    let mut history = server.state_file.clone().into_os_string();
    history.push(".history");
    // The file is rewritten within its bound by its sync thread, once it passes it.
    wait_until("the history file is within its bound", || {
        std::fs::metadata(&history).expect("history file").len() <= bytes
    });
    let events = all_events(&server);
    let mut per_lock = std::collections::BTreeMap::<String, usize>::new();
    for event in &events {
        *per_lock
            .entry(event["lock"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    assert!(per_lock.values().all(|n| *n <= 20), "{per_lock:?}");
    assert_eq!(
        per_lock.get("quiet"),
        Some(&1),
        "a quiet lock keeps its events: {per_lock:?}"
    );
    // The newest event of the flood is kept.
    let newest = events
        .iter()
        .filter_map(|e| e["requestor"].as_str())
        .any(|r| r == "r1499");
    assert!(newest, "the newest events are kept");
    // A reader says which events it missed by the highest id no longer kept (the quiet lock's
    // event keeps the oldest kept id at 1).
    let page = call("GET", &server.url("/history?since=1&limit=1"), None).json();
    assert_eq!(page["oldest"], json!(1), "{page}");
    let lost = page["lost"].as_u64().expect("lost");
    assert!(lost > 2, "the flood pushed events out: {page}");
    // And what is on disk is what a restart serves, telling the same loss.
    let server = server.restart();
    assert_eq!(all_events(&server), events);
    let page = call("GET", &server.url("/history?since=1&limit=1"), None).json();
    assert_eq!(page["lost"].as_u64(), Some(lost), "{page}");
}

/// A reader of `GET /events` on a thread of its own: each event's JSON on the channel.
fn subscribe(server: &Server, last_event_id: Option<u64>) -> (mpsc::Receiver<Value>, TcpStream) {
    let address = server.base.trim_start_matches("http://").to_string();
    let mut stream = TcpStream::connect(&address).expect("connect");
    let resume = last_event_id
        .map(|id| format!("Last-Event-ID: {id}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET /events HTTP/1.1\r\nHost: {address}\r\n{resume}Accept: text/event-stream\r\n\r\n"
    )
    .expect("send request");
    let (sender, receiver) = mpsc::channel();
    let reader = stream.try_clone().expect("clone");
    thread::spawn(move || {
        // Chunked transfer encoding carries whole lines here; size lines are skipped.
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { return };
            if let Some(data) = line.strip_prefix("data: ")
                && let Ok(event) = serde_json::from_str::<Value>(data)
                && sender.send(event).is_err()
            {
                return;
            }
        }
    });
    (receiver, stream)
}

fn receive(events: &mpsc::Receiver<Value>, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut received = Vec::new();
    while received.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(event) => received.push(event),
            Err(_) => panic!(
                "only {} of {count} events arrived: {received:?}",
                received.len()
            ),
        }
    }
    received
}

#[test]
fn live_events_resumed_with_last_event_id_lose_nothing_between_two_connections() {
    let server = server().start();
    let (events, connection) = subscribe(&server, None);
    // The stream is live once a change made now arrives.
    wait_until("the stream is live", || {
        acquire(&server, "warm", json!({"key": "w"})).status == 200
            && events.recv_timeout(Duration::from_millis(200)).is_ok()
    });
    while events.try_recv().is_ok() {}
    for n in 0..10 {
        assert_eq!(
            acquire(&server, "a", json!({"key": format!("k{n}")})).status,
            200
        );
        assert_eq!(
            release(&server, "a", &format!("k{n}"), &format!("k{n}")).status,
            200
        );
    }
    let first = receive(&events, 20);
    drop(connection);
    let last = first.last().and_then(|e| e["id"].as_u64()).expect("an id");
    // Changes while nobody listens.
    for n in 10..25 {
        assert_eq!(
            acquire(&server, "a", json!({"key": format!("k{n}")})).status,
            200
        );
        assert_eq!(
            release(&server, "a", &format!("k{n}"), &format!("k{n}")).status,
            200
        );
    }
    let (resumed, _connection) = subscribe(&server, Some(last));
    let second = receive(&resumed, 30);
    for n in 25..30 {
        assert_eq!(
            acquire(&server, &format!("b{n}"), json!({"key": "k"})).status,
            200
        );
    }
    let live = receive(&resumed, 5);
    let seen: Vec<u64> = ids(&first)
        .into_iter()
        .chain(ids(&second))
        .chain(ids(&live))
        .collect();
    let history: Vec<u64> = ids(&all_events(&server))
        .into_iter()
        .filter(|id| *id >= ids(&first)[0])
        .collect();
    assert_eq!(
        seen, history,
        "every event once, in order, across the two connections"
    );
}

#[test]
fn a_reader_that_stops_reading_is_dropped_without_slowing_the_server() {
    let server = server().start();
    // A reader that never reads: its socket buffers fill, then it falls behind.
    let (_, stalled) = {
        let address = server.base.trim_start_matches("http://").to_string();
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_recv_buffer_size(4096).expect("small buffer");
        let address: std::net::SocketAddr = address.parse().expect("address");
        socket.connect(&address.into()).expect("connect");
        let mut stream: TcpStream = socket.into();
        write!(stream, "GET /events HTTP/1.1\r\nHost: {address}\r\n\r\n").expect("send");
        ((), stream)
    };
    let (watching, _connection) = subscribe(&server, None);
    wait_until("the stream is live", || {
        acquire(&server, "warm", json!({"key": "w"})).status == 200
            && watching.recv_timeout(Duration::from_millis(200)).is_ok()
    });
    // Far more than the live buffer and the sockets' buffers: each event padded by its key
    // and info to about 2 KiB.
    let padding = "x".repeat(900);
    let client = common::client();
    let mut failed = 0;
    for n in 0..1500 {
        let url = server.url(&format!("/lock/flood-{}", n % 10));
        let key = format!("k{n}-{padding}");
        let body = json!({"key": key, "info": {"pad": padding}}).to_string();
        let acquired = client.put(&url).body(body).send();
        let released = client
            .delete(&url)
            .body(json!({ "key": key }).to_string())
            .send();
        for reply in [acquired, released] {
            if !reply.is_ok_and(|r| r.status().is_success()) {
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 0, "requests failed while a reader stalled");
    // The reader that kept up saw everything.
    let kept_up = receive(&watching, 3000);
    let last = kept_up.last().map(summary).unwrap_or_default();
    assert!(last.starts_with("released flood-9 k1499-"), "{last}");
    // The stalled one, once it reads, finds its stream ended short of the end.
    stalled
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let mut text = String::new();
    let mut reader = BufReader::new(&stalled);
    let ended = loop {
        let mut chunk = [0u8; 65536];
        match reader.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&chunk[..n])),
            Err(_) => break false,
        }
    };
    assert!(ended, "the server kept a stalled reader's stream open");
    assert!(
        !text.contains("k1499"),
        "a stalled reader was sent everything: it was not dropped"
    );
}

also_on_etcd!(
    every_kind_of_change_is_recorded_once_in_order_with_its_fields,
    refused_requests_record_nothing,
    a_lock_named_with_a_slash_before_history_is_asked_for_encoded,
    live_events_resumed_with_last_event_id_lose_nothing_between_two_connections,
);
