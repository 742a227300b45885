//! The history on the etcd backend across replicas (docs/history.md, "Where it is kept"): two
//! replicas over one prefix of a loopback etcd cluster list the same events, with the same ids,
//! in the same order, whichever replica made the change; a live reader on one sees changes
//! made through the other and resumes on either; a replica started again loads the history
//! from etcd; every change acknowledged under load is kept when a replica is killed, and none
//! refused; and the records in etcd stay within the bounds under a flood of changes.
//!
//! Only with the `etcd` feature (`cargo test --features etcd`).
#![cfg(feature = "etcd")]

pub mod common;

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::etcd::{self, EtcdCluster, replicas, replicas_with, serial, spawn_waiter};
use common::history::{Load, all_events, assert_kept, ids};
use common::{Server, call, wait_for_waiters, wait_until};
use serde_json::{Value, json};

/// (kind, lock, key) of each event.
fn summary(events: &[Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .map(|e| {
            let text = |field: &str| e[field].as_str().unwrap_or("").to_string();
            (text("kind"), text("lock"), text("key"))
        })
        .collect()
}

/// Waits until both replicas list the same events, and returns them.
fn agreed(a: &Server, b: &Server) -> Vec<Value> {
    let mut seen = Vec::new();
    wait_until("both replicas list the same history", || {
        let (first, second) = (all_events(a), all_events(b));
        let same = first == second;
        seen = first;
        same
    });
    seen
}

/// One server-sent event: (id, event, data).
type Frame = (Option<u64>, String, Value);

/// Reads `GET /events` of `url` (with `Last-Event-ID` when given) in a thread; frames come
/// back on the channel. Returns once the server has answered the request (it has subscribed
/// to the live events by then).
fn listen(url: &str, last_event_id: Option<u64>) -> mpsc::Receiver<Frame> {
    let client = reqwest::blocking::Client::builder()
        .timeout(None::<Duration>)
        .build()
        .expect("client");
    let mut request = client.get(url);
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    let response = request.send().expect("GET /events");
    assert_eq!(response.status().as_u16(), 200);
    let (frames, received) = mpsc::channel();
    thread::spawn(move || {
        let reader = BufReader::new(response);
        let (mut id, mut event, mut data) = (None, String::new(), String::new());
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if let Some(rest) = line.strip_prefix("id: ") {
                id = rest.parse().ok();
            } else if let Some(rest) = line.strip_prefix("event: ") {
                event = rest.to_string();
            } else if let Some(rest) = line.strip_prefix("data: ") {
                data = rest.to_string();
            } else if line.is_empty() && !event.is_empty() {
                let value = serde_json::from_str(&data).unwrap_or(Value::Null);
                if frames
                    .send((id.take(), std::mem::take(&mut event), value))
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    received
}

fn next_frame(frames: &mpsc::Receiver<Frame>) -> Frame {
    frames
        .recv_timeout(Duration::from_secs(15))
        .expect("an event within 15 s")
}

#[test]
fn both_replicas_list_every_change_in_one_order_with_the_same_ids() {
    let _serial = serial();
    let servers = replicas(etcd::shared(), 2);
    let (a, b) = (&servers[0], &servers[1]);
    assert_eq!(a.lock("one", json!({"key": "k1"})).status, 200);
    assert_eq!(b.lock("two", json!({"key": "k2"})).status, 200);
    // A waiter queued through B for the lock A granted; A's release lets it in.
    let (done, finished) = mpsc::channel();
    spawn_waiter(b, "one", "k3", "20s", &done);
    wait_for_waiters(a, "one", 1);
    assert_eq!(a.unlock("one", json!({"key": "k1"})).status, 200);
    assert_eq!(
        finished
            .recv_timeout(Duration::from_secs(20))
            .expect("waiter answered"),
        ("k3".to_string(), 200)
    );
    // Released through the replica that did not grant it.
    assert_eq!(a.unlock("two", json!({"key": "k2"})).status, 200);
    assert_eq!(b.unlock("one", json!({"key": "k3"})).status, 200);

    let events = agreed(a, b);
    let expected: Vec<(String, String, String)> = [
        ("acquired", "one", "k1"),
        ("acquired", "two", "k2"),
        ("queued", "one", "k3"),
        ("released", "one", "k1"),
        ("acquired", "one", "k3"),
        ("released", "two", "k2"),
        ("released", "one", "k3"),
    ]
    .iter()
    .map(|(kind, lock, key)| (kind.to_string(), lock.to_string(), key.to_string()))
    .collect();
    assert_eq!(summary(&events), expected, "{events:#?}");
    let ids = ids(&events);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    // The waiter's queued time crossed replicas in the etcd queue entry.
    assert!(events[4]["waited_ms"].is_u64(), "{}", events[4]);
    assert!(events[3]["held_ms"].is_u64(), "{}", events[3]);
    // A lock's own history, on either replica.
    for server in [a, b] {
        let reply = call("GET", &server.url("/lock/one/history"), None);
        assert_eq!(reply.status, 200, "{}", reply.body);
        let page = reply.json();
        let kinds: Vec<&str> = page["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["kind"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            kinds,
            ["acquired", "queued", "released", "acquired", "released"]
        );
    }
}

#[test]
fn a_live_reader_on_one_replica_sees_changes_made_through_the_other_and_resumes_on_it() {
    let _serial = serial();
    let servers = replicas(etcd::shared(), 2);
    let (a, b) = (&servers[0], &servers[1]);
    let frames = listen(&a.url("/events"), None);
    assert_eq!(b.lock("live", json!({"key": "far"})).status, 200);
    let (id, event, data) = next_frame(&frames);
    assert_eq!(event, "acquired");
    assert_eq!(data["lock"], "live");
    assert_eq!(data["key"], "far");
    let first = id.expect("an id");
    assert_eq!(data["id"], json!(first));
    drop(frames);

    // Changes while no one listens, then a reader resuming on the other replica.
    assert_eq!(b.unlock("live", json!({"key": "far"})).status, 200);
    assert_eq!(a.lock("live", json!({"key": "near"})).status, 200);
    let resumed = listen(&b.url("/events?lock=live"), Some(first));
    let mut kinds = Vec::new();
    let mut last = first;
    for _ in 0..2 {
        let (id, event, data) = next_frame(&resumed);
        let id = id.expect("an id");
        assert!(id > last, "{id} after {last}");
        last = id;
        kinds.push((event, data["key"].as_str().unwrap_or("").to_string()));
    }
    assert_eq!(
        kinds,
        [
            ("released".to_string(), "far".to_string()),
            ("acquired".to_string(), "near".to_string()),
        ]
    );
    // Then live again, from the first replica.
    assert_eq!(a.unlock("live", json!({"key": "near"})).status, 200);
    let (_, event, data) = next_frame(&resumed);
    assert_eq!((event.as_str(), &data["key"]), ("released", &json!("near")));
}

#[test]
fn a_replica_started_again_loads_the_history_from_etcd() {
    let _serial = serial();
    let mut servers = replicas(etcd::shared(), 2);
    for n in 0..5 {
        let (server, name) = (&servers[n % 2], format!("l{n}"));
        assert_eq!(server.lock(&name, json!({"key": "k"})).status, 200);
        assert_eq!(server.unlock(&name, json!({"key": "k"})).status, 200);
    }
    let before = agreed(&servers[0], &servers[1]);
    assert_eq!(before.len(), 10);
    let b = servers.pop().expect("b").restart();
    // Nothing changed meanwhile: the history it loaded at start is the same, at once.
    assert_eq!(all_events(&b), before);
    let a = servers.pop().expect("a").restart();
    assert_eq!(all_events(&a), before);
    // And it goes on from there on both.
    assert_eq!(a.lock("after", json!({"key": "k"})).status, 200);
    let after = agreed(&a, &b);
    assert_eq!(&after[..10], &before[..]);
    assert_eq!(summary(&after[10..])[0].0, "acquired");
    assert!(ids(&after)[10] > ids(&before)[9]);
}

#[test]
fn hold_times_are_counted_once_by_the_replica_that_made_the_change() {
    let _serial = serial();
    let servers = replicas(etcd::shared(), 2);
    assert_eq!(servers[0].lock("timed", json!({"key": "k"})).status, 200);
    assert_eq!(servers[0].unlock("timed", json!({"key": "k"})).status, 200);
    // The other replica has the events too (from the watch) before its metrics are looked at.
    let events = agreed(&servers[0], &servers[1]);
    assert_eq!(summary(&events).len(), 2);
    let count = r#"locker_hold_seconds_count{lock="timed"}"#;
    assert_eq!(servers[0].metric(count), 1.0);
    assert_eq!(
        servers[1].metric(count),
        0.0,
        "counted by the replica that did not make it"
    );
}

#[test]
fn every_acknowledged_change_is_kept_when_a_replica_is_killed_under_load_and_no_refused_one() {
    let _serial = serial();
    let cluster = etcd::shared();
    let (prefix, mut servers) = replicas_with(cluster, 2, &[]);
    let load = Load::start((0..6).map(|worker| servers[worker % 2].url("")));
    wait_until("the load has made a few hundred changes", || {
        all_events(&servers[1]).len() > 300
    });
    servers[0].kill();
    // The other replica's clients go on a little after the kill.
    wait_until("the surviving replica has made more changes", || {
        all_events(&servers[1]).len() > 400
    });
    let (acknowledged, refused) = load.stop(200);
    // What the survivor lists, and what a replica started afresh loads, once it has everything.
    let fresh = common::server()
        .etcd(&cluster.endpoints())
        .env("LOCKER_ETCD_PREFIX", prefix)
        .start();
    let events = agreed(&servers[1], &fresh);
    assert_kept(&events, &acknowledged, &refused);
    let ids = ids(&events);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
}

/// The history records under `prefix` in etcd: (count, bytes of their values).
fn records_in_etcd(cluster: &EtcdCluster, prefix: &str) -> (usize, usize) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let endpoints: Vec<String> = cluster.endpoints().split(',').map(String::from).collect();
        let mut client = etcd_client::Client::connect(endpoints, None)
            .await
            .expect("connect to etcd");
        let response = client
            .get(
                format!("{prefix}history/"),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .expect("read the records");
        let kvs = response.kvs();
        (kvs.len(), kvs.iter().map(|kv| kv.value().len()).sum())
    })
}

/// `cycles` acquires and releases of each lock of `locks`, in turn, by one client per list.
fn flood(clients: Vec<(String, Vec<String>)>, cycles: usize) {
    let threads: Vec<_> = clients
        .into_iter()
        .map(|(base, locks)| {
            thread::spawn(move || {
                for _ in 0..cycles {
                    for lock in &locks {
                        let url = format!("{base}/lock/{lock}");
                        let body = json!({"key": lock}).to_string();
                        for method in ["PUT", "DELETE"] {
                            let reply = call(method, &url, Some(&body));
                            assert_eq!(reply.status, 200, "{method} {url}: {}", reply.body);
                        }
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("client");
    }
}

#[test]
fn the_records_stay_within_the_bounds_under_a_flood_of_changes() {
    let _serial = serial();
    const BYTES: usize = 8_000;
    const PER_LOCK: usize = 5;
    let cluster = etcd::shared();
    let (prefix, servers) = replicas_with(
        cluster,
        2,
        &[
            ("LOCKER_HISTORY_BYTES", "8000"),
            ("LOCKER_HISTORY_PER_LOCK", "5"),
        ],
    );
    let base = |n: usize| servers[n % 2].url("");
    assert_eq!(servers[0].lock("quiet", json!({"key": "q"})).status, 200);
    // Many locks changed once each, through both replicas: far more than the byte bound.
    let spread = (0..2)
        .map(|n| (base(n), (0..60).map(|i| format!("spread{n}-{i}")).collect()))
        .collect();
    flood(spread, 1);
    // Then two locks changed many times each: far more than the bound per lock.
    let busy = (0..2)
        .map(|n| (base(n), vec![format!("busy{n}")]))
        .collect();
    flood(busy, 50);

    let events = agreed(&servers[0], &servers[1]);
    for n in 0..2 {
        let lock = format!("busy{n}");
        let of_lock: Vec<&Value> = events.iter().filter(|e| e["lock"] == lock).collect();
        assert_eq!(of_lock.len(), PER_LOCK, "{lock}: {of_lock:#?}");
        assert_eq!(of_lock[PER_LOCK - 1]["kind"], "released");
    }
    let (count, bytes) = records_in_etcd(cluster, &prefix);
    // Within the byte bound, give or take the last transactions' records (about 300 bytes
    // each), and far fewer records than the 440-odd transactions made.
    assert!(bytes <= BYTES + 2_000, "{bytes} bytes in {count} records");
    assert!(count <= 60, "{count} records, {bytes} bytes");
    // The quiet lock's one event went with the oldest records: a reader from the start is told.
    assert!(events.iter().all(|e| e["lock"] != "quiet"));
    let frames = listen(&servers[1].url("/events"), Some(0));
    let (_, event, data) = next_frame(&frames);
    assert_eq!(event, "gap");
    assert_eq!(data["oldest"], json!(ids(&events)[0]));
}
