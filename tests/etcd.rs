//! The etcd backend across servers: several locker replicas on one 3-member loopback etcd
//! cluster. Mutual exclusion and fencing under contention, FIFO across replicas, leases that
//! outlive the replica that granted them, force release through another replica, faults
//! (etcd leader killed, quorum lost and regained, a replica killed), start-up errors, and
//! migration between a state file and etcd.
//!
//! The tests run one at a time (they share two cores with etcd and the replicas).
//!
//! Only with the `etcd` feature (`cargo test --features etcd`, as `ci/scripts/run-tests` does):
//! without it the server has no etcd backend.
#![cfg(feature = "etcd")]

pub mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::etcd::{self, EtcdCluster, locker_command, replicas, serial, spawn_waiter};
use common::{Server, call, call_with, wait_for_waiters};
use serde_json::{Value, json};

fn generation(reply: &common::Reply) -> u64 {
    reply.json()["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no generation in {}", reply.body))
}

#[test]
fn holdings_never_overlap_and_generations_increase_across_replicas() {
    let _serial = serial();
    let cluster = etcd::shared();
    let servers = Arc::new(replicas(cluster, 3));
    const CLIENTS: usize = 16;
    const HANDOFFS: usize = 1008;
    let holder = Arc::new(AtomicUsize::new(usize::MAX));
    let last_generation = Arc::new(Mutex::new(0u64));
    let handoffs = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (servers, holder, last_generation, handoffs) = (
                servers.clone(),
                holder.clone(),
                last_generation.clone(),
                handoffs.clone(),
            );
            thread::spawn(move || {
                let http = common::client();
                let server = &servers[client % servers.len()];
                let body = json!({"key": format!("client-{client}")}).to_string();
                let url = server.url("/lock/mutex");
                while handoffs.load(Ordering::SeqCst) < HANDOFFS {
                    let reply = call_with(&http, "PUT", &format!("{url}?wait=30s"), Some(&body));
                    assert_eq!(reply.status, 200, "{}", reply.body);
                    let previous = holder.swap(client, Ordering::SeqCst);
                    assert_eq!(previous, usize::MAX, "client {client} overlaps {previous}");
                    {
                        let mut last = last_generation.lock().expect("generation");
                        let now = generation(&reply);
                        assert!(now > *last, "generation {now} after {last}");
                        *last = now;
                    }
                    // Inside the section the lock is held by this key and this grant, as any
                    // replica sees it (etcd reads are linearizable).
                    let other = &servers[(client + 1) % servers.len()];
                    let status = call_with(&http, "GET", &other.url("/lock/mutex"), None);
                    assert_eq!(status.status, 200, "{}", status.body);
                    let view = status.json();
                    assert_eq!(view["key"], json!(format!("client-{client}")), "{view}");
                    assert_eq!(view["generation"], json!(generation(&reply)), "{view}");
                    handoffs.fetch_add(1, Ordering::SeqCst);
                    holder.store(usize::MAX, Ordering::SeqCst);
                    let reply = call_with(&http, "DELETE", &url, Some(&body));
                    assert_eq!(reply.status, 200, "{}", reply.body);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("client thread");
    }
    let total = handoffs.load(Ordering::SeqCst);
    eprintln!(
        "{total} hand-offs among {CLIENTS} clients on 3 replicas in {:?}",
        started.elapsed()
    );
    assert!(total >= HANDOFFS);
    assert!(servers[0].locks().get("mutex").is_none());
}

#[test]
fn waiters_on_different_replicas_are_served_in_arrival_order() {
    let _serial = serial();
    let servers = replicas(etcd::shared(), 3);
    assert_eq!(
        servers[0].lock("fifo", json!({"key": "holder"})).status,
        200
    );
    let (done, results) = mpsc::channel();
    let keys = ["w1", "w2", "w3", "w4", "w5", "w6"];
    for (i, key) in keys.iter().enumerate() {
        spawn_waiter(&servers[(i + 1) % 3], "fifo", key, "30s", &done);
        wait_for_waiters(&servers[i % 3], "fifo", i as u64 + 1);
    }
    let mut previous = "holder".to_string();
    let mut order = Vec::new();
    for i in 0..keys.len() {
        let reply = servers[(i + 2) % 3].unlock("fifo", json!({"key": previous}));
        assert_eq!(reply.status, 200, "{}", reply.body);
        let (key, status) = results
            .recv_timeout(Duration::from_secs(10))
            .expect("next waiter granted");
        assert_eq!(status, 200);
        order.push(key.clone());
        previous = key;
    }
    assert_eq!(order, keys);
}

#[test]
fn a_lease_expires_after_the_granting_replica_was_killed_and_holds_survive_it() {
    let _serial = serial();
    let mut servers = replicas(etcd::shared(), 2);
    // The lease starts after this instant: it cannot end before 2 s past it.
    let before_lease = Instant::now();
    assert_eq!(
        servers[0]
            .lock("leased", json!({"key": "a", "ttl": "2s"}))
            .status,
        200
    );
    assert_eq!(servers[0].lock("kept", json!({"key": "k"})).status, 200);
    let (done, results) = mpsc::channel();
    spawn_waiter(&servers[1], "leased", "b", "20s", &done);
    wait_for_waiters(&servers[1], "leased", 1);
    servers[0].kill();
    // Granted within its 20 s wait (a 200, not a 423), so by the lease's end; and not before
    // that end (a lease that ends early fails here).
    let (key, status) = results
        .recv_timeout(Duration::from_secs(30))
        .expect("the waiter is granted once the lease runs out");
    assert_eq!((key.as_str(), status), ("b", 200));
    let waited = before_lease.elapsed();
    assert!(waited >= Duration::from_secs(2), "granted after {waited:?}");
    // Killing a replica frees nothing: holds belong to keys.
    let locks = servers[1].locks();
    assert_eq!(locks["kept"]["locked_by"], json!({"k": 1}), "{locks}");
    assert_eq!(locks["leased"]["key"], json!("b"), "{locks}");
}

#[test]
fn force_release_through_another_replica_grants_the_next_waiter() {
    let _serial = serial();
    let servers = replicas(etcd::shared(), 3);
    assert_eq!(servers[0].lock("stuck", json!({"key": "dead"})).status, 200);
    let (done, results) = mpsc::channel();
    spawn_waiter(&servers[2], "stuck", "next", "20s", &done);
    wait_for_waiters(&servers[0], "stuck", 1);
    let forced = call("DELETE", &servers[1].url("/lock/stuck?force=true"), None);
    assert_eq!(forced.status, 200, "{}", forced.body);
    let (key, status) = results
        .recv_timeout(Duration::from_secs(10))
        .expect("granted");
    assert_eq!((key.as_str(), status), ("next", 200));
}

#[test]
fn waiters_of_a_killed_replica_do_not_block_the_queue() {
    let _serial = serial();
    let mut servers = replicas(etcd::shared(), 3);
    assert_eq!(servers[0].lock("q", json!({"key": "holder"})).status, 200);
    let (done, results) = mpsc::channel();
    spawn_waiter(&servers[1], "q", "doomed", "60s", &done);
    wait_for_waiters(&servers[0], "q", 1);
    spawn_waiter(&servers[2], "q", "later", "60s", &done);
    wait_for_waiters(&servers[0], "q", 2);
    servers[1].kill();
    assert_eq!(servers[0].unlock("q", json!({"key": "holder"})).status, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match results.recv_timeout(Duration::from_millis(200)) {
            Ok((key, status)) if key == "later" => {
                assert_eq!(status, 200);
                break;
            }
            Ok(_) => {}
            Err(_) => assert!(
                Instant::now() < deadline,
                "the later waiter was never served"
            ),
        }
    }
    let locks = servers[0].locks();
    assert_eq!(locks["q"]["key"], json!("later"), "{locks}");
}

/// Clients that lock and unlock until `stop`, each on a lock of its own (checking through
/// another replica that every acknowledged acquire is held) and all on one shared lock
/// (checking that holdings never overlap). Returns the count of successful cycles so far.
struct Load {
    stop: Arc<AtomicBool>,
    cycles: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(servers: &Arc<Vec<Server>>, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let cycles = Arc::new(AtomicU64::new(0));
        let holder = Arc::new(AtomicUsize::new(usize::MAX));
        let threads = (0..clients)
            .map(|client| {
                let (servers, stop, cycles, holder) = (
                    servers.clone(),
                    stop.clone(),
                    cycles.clone(),
                    holder.clone(),
                );
                thread::spawn(move || {
                    let http = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(20))
                        .build()
                        .expect("client");
                    let mine = &servers[client % servers.len()];
                    let other = &servers[(client + 1) % servers.len()];
                    let key = format!("c{client}");
                    let body = json!({"key": key}).to_string();
                    let own = format!("/lock/own-{client}");
                    while !stop.load(Ordering::SeqCst) {
                        let Ok(reply) = try_call(&http, "PUT", &mine.url(&own), &body) else {
                            continue;
                        };
                        if reply.0 == 200 {
                            // Acknowledged: every replica must see it held, whatever happens.
                            let status = loop {
                                if let Ok(s) = try_call(&http, "GET", &other.url(&own), "")
                                    && s.0 != 503
                                {
                                    break s;
                                }
                                thread::sleep(Duration::from_millis(50));
                            };
                            assert_eq!(status.0, 200, "acknowledged acquire lost: {}", status.1);
                            let held: Value = serde_json::from_str(&status.1).expect("json");
                            assert_eq!(held["key"], json!(key), "{}", status.1);
                            loop {
                                match try_call(&http, "DELETE", &mine.url(&own), &body) {
                                    Ok(r) if r.0 == 200 => break,
                                    _ => thread::sleep(Duration::from_millis(50)),
                                }
                            }
                        }
                        let shared = mine.url("/lock/shared?wait=5s");
                        if let Ok(reply) = try_call(&http, "PUT", &shared, &body)
                            && reply.0 == 200
                        {
                            let previous = holder.swap(client, Ordering::SeqCst);
                            assert_eq!(previous, usize::MAX, "overlap with client {previous}");
                            holder.store(usize::MAX, Ordering::SeqCst);
                            loop {
                                match try_call(&http, "DELETE", &mine.url("/lock/shared"), &body) {
                                    Ok(r) if r.0 == 200 => break,
                                    _ => thread::sleep(Duration::from_millis(50)),
                                }
                            }
                            cycles.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            cycles,
            threads,
        }
    }

    fn cycles(&self) -> u64 {
        self.cycles.load(Ordering::SeqCst)
    }

    /// Waits until `more` further cycles completed, or fails after `within`.
    fn progresses(&self, more: u64, within: Duration) {
        let target = self.cycles() + more;
        let deadline = Instant::now() + within;
        while self.cycles() < target {
            assert!(Instant::now() < deadline, "service did not continue");
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            thread.join().expect("load thread");
        }
    }
}

fn try_call(
    http: &reqwest::blocking::Client,
    method: &str,
    url: &str,
    body: &str,
) -> Result<(u16, String), reqwest::Error> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let response = http.request(method, url).body(body.to_string()).send()?;
    let status = response.status().as_u16();
    Ok((status, response.text()?))
}

#[test]
fn service_survives_the_etcd_leader_being_killed_and_a_replica_being_killed() {
    let _serial = serial();
    let mut cluster = EtcdCluster::start(3);
    let mut servers = replicas(&cluster, 3);
    let kept = servers[2].lock("kept-by-replica-2", json!({"key": "k"}));
    assert_eq!(kept.status, 200);
    let victim = servers.pop().expect("third replica");
    let servers = Arc::new(servers);
    let load = Load::start(&servers, 8);
    load.progresses(20, Duration::from_secs(20));
    let leader = cluster.leader();
    eprintln!("killing etcd leader m{leader}");
    cluster.kill(leader);
    load.progresses(20, Duration::from_secs(30));
    // A replica killed under load: the others keep serving, and its holds stay.
    let mut victim = victim;
    victim.kill();
    load.progresses(20, Duration::from_secs(30));
    let locks = servers[0].locks();
    assert_eq!(locks["kept-by-replica-2"]["locked_by"], json!({"k": 1}));
    load.finish();
    cluster.restart(leader);
    cluster.wait_healthy(leader);
}

#[test]
fn without_quorum_mutations_answer_503_in_time_and_service_resumes() {
    let _serial = serial();
    let mut cluster = EtcdCluster::start(3);
    let servers = replicas(&cluster, 2);
    assert_eq!(servers[0].lock("before", json!({"key": "k"})).status, 200);
    cluster.kill(1);
    cluster.kill(2);
    for (method, path) in [
        ("PUT", "/lock/during"),
        ("GET", "/lock/before"),
        ("GET", "/locks"),
    ] {
        let started = Instant::now();
        let reply = call(method, &servers[1].url(path), Some(r#"{"key": "k"}"#));
        let took = started.elapsed();
        assert_eq!(reply.status, 503, "{method} {path}: {}", reply.body);
        assert!(!reply.error().is_empty());
        assert!(
            took < Duration::from_secs(10),
            "{method} {path} took {took:?}"
        );
    }
    cluster.restart(1);
    cluster.restart(2);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = servers[1].lock("after", json!({"key": "k"}));
        if reply.status == 200 {
            break;
        }
        assert_eq!(reply.status, 503, "{}", reply.body);
        assert!(Instant::now() < deadline, "service did not resume");
        thread::sleep(Duration::from_millis(200));
    }
    // The other replica recovers by itself too (its client may still be reconnecting).
    let locks = loop {
        let reply = call("GET", &servers[0].url("/locks"), None);
        if reply.status == 200 {
            break reply.json();
        }
        assert_eq!(reply.status, 503, "{}", reply.body);
        assert!(
            Instant::now() < deadline,
            "the other replica did not resume"
        );
        thread::sleep(Duration::from_millis(200));
    };
    assert!(
        locks.get("before").is_some() && locks.get("after").is_some(),
        "{locks}"
    );
}

#[test]
fn an_unreachable_etcd_stops_start_up_with_a_clear_message() {
    let _serial = serial();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let started = Instant::now();
    let output = common::server()
        .etcd(&format!("http://127.0.0.1:{port}"))
        .run_to_exit();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot reach etcd"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let output = common::server().env("LOCKER_STORE", "etcd").run_to_exit();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("LOCKER_ETCD_ENDPOINTS"), "{stderr}");
}

#[test]
fn import_then_export_round_trips_a_state_file() {
    let _serial = serial();
    // A state file with held locks, counts, leases and info, written by the file backend.
    let mut file_server = Server::start();
    let info = json!({"team": "main", "build": "42"});
    file_server.lock("a", json!({"key": "k1", "requestor": "r1", "info": info}));
    file_server.lock("a", json!({"key": "k1", "requestor": "r1"}));
    file_server.lock("a", json!({"key": "k1", "requestor": "r2"}));
    file_server.lock("b", json!({"key": "k2", "ttl": "1h"}));
    file_server.lock("gone", json!({"key": "k3"}));
    file_server.unlock("gone", json!({"key": "k3"}));
    let before = file_server.locks();
    file_server.signal(libc::SIGTERM);
    file_server.wait_exit(Duration::from_secs(10));
    let state_file = file_server.state_file.clone();
    let original = std::fs::read_to_string(&state_file).expect("state file");

    let prefix = etcd::unique_prefix();
    let imported = locker_command(&prefix, &["import", &state_file.display().to_string()]);
    assert!(imported.status.success());
    // Importing again would overwrite: refused without --replace.
    let again = locker_command(&prefix, &["import", &state_file.display().to_string()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--replace"));

    let server = common::server()
        .etcd(&etcd::shared().endpoints())
        .env("LOCKER_ETCD_PREFIX", prefix.clone())
        .start();
    assert_eq!(server.locks(), before);
    let next = server.lock("c", json!({"key": "k4"}));
    let original_json: Value = serde_json::from_str(&original).expect("our file is JSON");
    assert!(generation(&next) >= original_json["next_generation"].as_u64().expect("next"));
    server.unlock("c", json!({"key": "k4"}));

    let dir = common::temp_dir();
    let exported_path = dir.path().join("exported.yml");
    let exported = locker_command(&prefix, &["export", &exported_path.display().to_string()]);
    assert!(exported.status.success());
    // Private, as the state file is: it says who holds what.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&exported_path)
            .expect("exported file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "export mode {mode:o}");
    let exported: Value =
        serde_json::from_str(&std::fs::read_to_string(&exported_path).expect("export"))
            .expect("export is JSON");
    assert_eq!(exported["locks"], original_json["locks"]);

    // The original Go locker's format imports as is.
    let go_file = dir.path().join("go.json");
    std::fs::write(
        &go_file,
        r#"{"a": {"locked_by": {"k1": 0}, "key": ""}, "b": {"locked_by": {"k2": 1}, "key": "k2"}}"#,
    )
    .expect("write");
    let go_prefix = etcd::unique_prefix();
    let imported = locker_command(&go_prefix, &["import", &go_file.display().to_string()]);
    assert!(imported.status.success());
    let server = common::server()
        .etcd(&etcd::shared().endpoints())
        .env("LOCKER_ETCD_PREFIX", go_prefix)
        .start();
    let locks = server.locks();
    let names: BTreeMap<String, Value> =
        serde_json::from_value(locks.clone()).expect("map of locks");
    assert_eq!(names.keys().collect::<Vec<_>>(), ["b"], "{locks}");
    assert_eq!(locks["b"]["locked_by"], json!({"k2": 1}));
}

#[test]
fn import_includes_what_a_crashed_server_left_in_the_journal() {
    let _serial = serial();
    // The journal is opt-in; with it the state file is rewritten a second after a change, so a
    // server killed at once leaves the lock in the journal only. Checked, and tried again in
    // the rare case a loaded machine let the rewrite happen first.
    let mut attempts = Vec::new();
    let (_crashed, state_file) = loop {
        let mut file_server = common::server()
            .env("LOCKER_JOURNAL_BYTES", "65536")
            .start();
        assert_eq!(
            file_server.lock("journaled", json!({"key": "k"})).status,
            200
        );
        file_server.kill();
        let state_file = file_server.state_file.clone();
        let text = std::fs::read_to_string(&state_file).expect("state file");
        let journal = std::fs::read(format!("{}.journal", state_file.display())).expect("journal");
        if !text.contains("journaled") {
            assert!(
                journal
                    .windows(b"journaled".len())
                    .any(|w| w == b"journaled"),
                "the journal lacks the lock too"
            );
            // Kept (killed) to the end: its temp dir holds the state file and journal.
            break (file_server, state_file);
        }
        attempts.push(text);
        assert!(
            attempts.len() < 5,
            "the state file always had the lock already: {attempts:?}"
        );
    };

    let prefix = etcd::unique_prefix();
    let imported = locker_command(&prefix, &["import", &state_file.display().to_string()]);
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let server = common::server()
        .etcd(&etcd::shared().endpoints())
        .env("LOCKER_ETCD_PREFIX", prefix)
        .start();
    assert_eq!(server.locks()["journaled"]["key"], "k");
}

/// Which etcd member a test kills.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Leader,
    Follower,
}

/// With one member of three killed, etcd keeps a quorum: once it has a leader again, every
/// request through every replica must succeed. Each replica gets `CYCLES` rounds of a PUT, a
/// GET and a DELETE; every failure is counted (nothing is retried) and the count must be 0.
fn one_member_down_fails_no_request(victim: Victim) {
    const CYCLES: usize = 100;
    let _serial = serial();
    let mut cluster = EtcdCluster::start(3);
    let servers = replicas(&cluster, 2);
    // Every replica has talked to etcd before the fault.
    for (i, server) in servers.iter().enumerate() {
        let name = format!("warm-{i}");
        assert_eq!(server.lock(&name, json!({"key": "k"})).status, 200);
        assert_eq!(server.unlock(&name, json!({"key": "k"})).status, 200);
    }
    let leader = cluster.leader();
    let killed = match victim {
        Victim::Leader => leader,
        Victim::Follower => (leader + 1) % 3,
    };
    eprintln!("killing etcd member m{killed} ({victim:?})");
    cluster.kill(killed);
    let new_leader = cluster.leader();
    eprintln!("etcd leader is m{new_leader}");
    let http = common::client();
    let mut failures = Vec::new();
    let mut total = 0;
    for (i, server) in servers.iter().enumerate() {
        let body = json!({"key": format!("r{i}")}).to_string();
        for cycle in 0..CYCLES {
            let path = format!("/lock/down-{i}-{cycle}");
            for method in ["PUT", "GET", "DELETE"] {
                total += 1;
                let started = Instant::now();
                match try_call(&http, method, &server.url(&path), &body) {
                    Ok((200, _)) => {}
                    Ok((status, text)) => failures.push(format!(
                        "replica {i} {method} {path}: {status} after {:?}: {text}",
                        started.elapsed()
                    )),
                    Err(e) => failures.push(format!("replica {i} {method} {path}: {e}")),
                }
            }
        }
    }
    eprintln!(
        "{victim:?} killed: {} of {total} requests failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed with one etcd member down, first: {:?}",
        failures.len(),
        failures.iter().take(3).collect::<Vec<_>>()
    );
    cluster.restart(killed);
    cluster.wait_healthy(killed);
}

#[test]
fn every_request_succeeds_with_the_etcd_leader_killed() {
    one_member_down_fails_no_request(Victim::Leader);
}

#[test]
fn every_request_succeeds_with_an_etcd_follower_killed() {
    one_member_down_fails_no_request(Victim::Follower);
}

/// Polls `GET {path}` on `server` until it answers `status`; fails after `within`.
fn wait_for_status(server: &Server, path: &str, status: u16, within: Duration) -> common::Reply {
    let deadline = Instant::now() + within;
    loop {
        let reply = call("GET", &server.url(path), None);
        if reply.status == status {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} never answered {status}; last: {} {}",
            reply.status,
            reply.body
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn readiness_follows_the_etcd_quorum_while_liveness_stays() {
    let _serial = serial();
    let mut cluster = EtcdCluster::start(3);
    let servers = replicas(&cluster, 2);
    for server in &servers {
        let reply = call("GET", &server.url("/ready"), None);
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    cluster.kill(1);
    cluster.kill(2);
    for server in &servers {
        let reply = wait_for_status(server, "/ready", 503, Duration::from_secs(10));
        assert!(!reply.error().is_empty(), "{}", reply.body);
        assert_eq!(call("GET", &server.url("/health"), None).status, 200);
        // Not ready means writes fail: the answer is not a false alarm.
        assert_eq!(server.lock("no-quorum", json!({"key": "k"})).status, 503);
        server.wait_for_metric("locker_store_ready 0");
    }
    cluster.restart(1);
    cluster.restart(2);
    for server in &servers {
        wait_for_status(server, "/ready", 200, Duration::from_secs(30));
        server.wait_for_metric("locker_store_ready 1");
    }
}

#[test]
fn every_replica_counts_the_replicas_sharing_its_prefix_and_drops_a_killed_one() {
    let _serial = serial();
    let mut servers = replicas(etcd::shared(), 3);
    for server in &servers {
        server.wait_for_metric("locker_replicas 3");
    }
    servers[2].kill();
    // Its liveness key goes with its lease (a few seconds).
    for server in &servers[..2] {
        server.wait_for_metric("locker_replicas 2");
    }
}
