//! Pools on the etcd backend across servers: several locker replicas sharing one prefix of a
//! 3-member loopback etcd cluster. Claims wait in one queue per pool whichever replica they
//! came through; items added, updated and removed through one replica are what the others see,
//! metadata and all, however much of it there is (more than etcd takes in one request); item
//! leases expire; a waiting claim whose client went away is withdrawn, and one whose replica
//! was killed is dropped; claims never overlap; `locker import` and `locker export` carry pools.
//!
//! The tests run one at a time (they share two cores with etcd and the replicas). Nothing is
//! retried until it succeeds: every answer is checked as it comes.
//!
//! Only with the `etcd` feature (`cargo test --features etcd`, as `ci/scripts/run-tests` does).
#![cfg(feature = "etcd")]

pub mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::etcd::{self, locker_command, replicas, serial};
use common::{Reply, Server, call, call_with};
use serde_json::{Value, json};

/// `POST /pool/{pool}/item/{item}`: adds an unclaimed item.
fn add(server: &Server, pool: &str, item: &str, metadata: &str) -> Reply {
    let body = json!({ "metadata": metadata }).to_string();
    call(
        "POST",
        &server.url(&format!("/pool/{pool}/item/{item}")),
        Some(&body),
    )
}

/// `PUT /pool/{pool}/claim` (any item) or `/pool/{pool}/item/{item}/claim`, waiting `wait`.
fn claim_url(server: &Server, pool: &str, item: Option<&str>, wait: Option<&str>) -> String {
    let path = match item {
        Some(item) => format!("/pool/{pool}/item/{item}/claim"),
        None => format!("/pool/{pool}/claim"),
    };
    let query = wait.map(|w| format!("?wait={w}")).unwrap_or_default();
    server.url(&format!("{path}{query}"))
}

fn claim(server: &Server, pool: &str, item: Option<&str>, body: Value) -> Reply {
    call(
        "PUT",
        &claim_url(server, pool, item, None),
        Some(&body.to_string()),
    )
}

/// `DELETE /pool/{pool}/item/{item}/claim` under `key`.
fn release(server: &Server, pool: &str, item: &str, key: &str) -> Reply {
    call(
        "DELETE",
        &server.url(&format!("/pool/{pool}/item/{item}/claim")),
        Some(&json!({ "key": key }).to_string()),
    )
}

/// `GET /pool/{pool}`: 200 with the pool, or what it answered.
fn pool_status(server: &Server, pool: &str) -> Reply {
    call("GET", &server.url(&format!("/pool/{pool}")), None)
}

/// The items of a pool's status by name.
fn items(status: &Value) -> BTreeMap<String, Value> {
    status["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {status}"))
        .iter()
        .map(|item| {
            (
                item["name"].as_str().expect("name").to_string(),
                item.clone(),
            )
        })
        .collect()
}

/// Polls `GET /pool/{pool}` on `server` until its `waiters` count is `count`; fails after
/// `within`.
fn wait_for_pool_waiters(server: &Server, pool: &str, count: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let reply = pool_status(server, pool);
        if reply.status == 200 && reply.json()["waiters"] == json!(count) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {count} waiter(s) on pool {pool}: {} {}",
            reply.status,
            reply.body
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A waiting claim in a thread; (key, reply) comes back on the channel, unless the
/// connection failed (its replica was killed).
fn spawn_claim(
    server: &Server,
    pool: &str,
    item: Option<&str>,
    key: &str,
    wait: &str,
    done: &mpsc::Sender<(String, Reply)>,
) {
    let url = claim_url(server, pool, item, Some(wait));
    let body = json!({ "key": key }).to_string();
    let (key, done) = (key.to_string(), done.clone());
    thread::spawn(move || {
        let sent = common::client().put(&url).body(body).send();
        let Ok(response) = sent else { return };
        let status = response.status();
        let reply = Reply {
            status: status.as_u16(),
            reason: status.canonical_reason().unwrap_or("").to_string(),
            headers: response.headers().clone(),
            body: response.text().unwrap_or_default(),
        };
        let _ = done.send((key, reply));
    });
}

#[test]
fn claims_through_different_replicas_wait_in_one_queue_and_are_served_in_arrival_order() {
    let _serial = serial();
    let servers = replicas(etcd::shared(), 2);
    let (a, b) = (&servers[0], &servers[1]);
    assert_eq!(add(a, "envs", "e1", "url: one").status, 201);
    let first = claim(b, "envs", None, json!({"key": "holder"}));
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.json()["item"], "e1");
    assert_eq!(first.json()["metadata"], "url: one");
    let mut generation = first.json()["generation"].as_u64().expect("generation");
    // Waiters alternate between the replicas and between any item and the named one.
    let (done, results) = mpsc::channel();
    let waiters = [
        ("w1", None),
        ("w2", Some("e1")),
        ("w3", None),
        ("w4", Some("e1")),
    ];
    for (i, (key, item)) in waiters.iter().enumerate() {
        spawn_claim(&servers[i % 2], "envs", *item, key, "30s", &done);
        wait_for_pool_waiters(
            &servers[(i + 1) % 2],
            "envs",
            i as u64 + 1,
            Duration::from_secs(10),
        );
    }
    let mut holder = "holder".to_string();
    let mut order = Vec::new();
    for i in 0..waiters.len() {
        let freed = release(&servers[(i + 1) % 2], "envs", "e1", &holder);
        assert_eq!(freed.status, 200, "{}", freed.body);
        assert_eq!(freed.json()["released"], true, "{}", freed.body);
        let (key, reply) = results
            .recv_timeout(Duration::from_secs(10))
            .expect("the next waiter is granted");
        assert_eq!(reply.status, 200, "{}", reply.body);
        let granted = reply.json();
        assert_eq!(granted["item"], "e1", "{granted}");
        assert_eq!(granted["metadata"], "url: one", "{granted}");
        let now = granted["generation"].as_u64().expect("generation");
        assert!(now > generation, "generation {now} after {generation}");
        generation = now;
        // Both replicas see the new holder at once (etcd reads are linearizable).
        for server in &servers {
            let status = pool_status(server, "envs").json();
            assert_eq!(
                items(&status)["e1"]["holder"]["key"],
                json!(key),
                "{status}"
            );
        }
        order.push(key.clone());
        holder = key;
    }
    assert_eq!(order, ["w1", "w2", "w3", "w4"]);
    assert_eq!(pool_status(a, "envs").json()["waiters"], 0);
}

#[test]
fn items_changed_through_one_replica_are_what_the_other_sees_however_much_metadata() {
    let _serial = serial();
    let servers = Arc::new(replicas(etcd::shared(), 2));
    let (a, b) = (&servers[0], &servers[1]);
    // 32 items of 64 KiB each (the most an item takes): 2 MiB of metadata, more than etcd
    // takes in one request (1.5 MiB), added all at once through both replicas, so the
    // writers batch them.
    const ITEMS: usize = 32;
    let metadata = |i: usize| {
        let line = format!("item: big-{i}\nurl: https://example.com/{i}\n");
        let mut text = line.repeat(64 * 1024 / line.len());
        text.push_str(&"#".repeat(64 * 1024 - text.len()));
        text
    };
    let failures = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..ITEMS)
        .map(|i| {
            let (servers, failures) = (servers.clone(), failures.clone());
            let text = metadata(i);
            thread::spawn(move || {
                let reply = add(&servers[i % 2], "big", &format!("big-{i:02}"), &text);
                if reply.status != 201 {
                    failures
                        .lock()
                        .expect("failures")
                        .push(format!("big-{i:02}: {} {}", reply.status, reply.body));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("adding thread");
    }
    let failures = failures.lock().expect("failures").clone();
    assert!(
        failures.is_empty(),
        "{} additions failed: {failures:?}",
        failures.len()
    );
    for server in servers.iter() {
        let status = pool_status(server, "big");
        assert_eq!(status.status, 200, "{}", status.status);
        let found = items(&status.json());
        assert_eq!(found.len(), ITEMS);
        for i in 0..ITEMS {
            let item = &found[&format!("big-{i:02}")];
            assert!(item["metadata"] == json!(metadata(i)), "big-{i:02} differs");
            assert_eq!(item["claimed"], false);
        }
    }
    let listed = call("GET", &b.url("/pools"), None).json();
    let summary = listed["pools"]
        .as_array()
        .expect("pools")
        .iter()
        .find(|p| p["name"] == "big")
        .cloned()
        .unwrap_or_else(|| panic!("pool big not listed: {listed}"));
    assert_eq!(summary["items"], ITEMS);
    assert_eq!(summary["claimed"], 0);

    // A named claim through one replica; the other sees it with the item's metadata.
    let claimed = claim(
        a,
        "big",
        Some("big-07"),
        json!({"key": "k7", "requestor": "r"}),
    );
    assert_eq!(claimed.status, 200, "{}", claimed.body);
    assert!(claimed.json()["metadata"] == json!(metadata(7)));
    let item = call("GET", &b.url("/pool/big/item/big-07"), None).json();
    assert_eq!(item["holder"]["key"], "k7", "{}", item["holder"]);
    assert_eq!(item["holder"]["locked_by"], json!({"r": 1}));

    // An update waits while its item is claimed, and lands once it is released.
    let update_url = b.url("/pool/big/item/big-07?wait=20s");
    let updating = thread::spawn(move || {
        call(
            "PUT",
            &update_url,
            Some(&json!({"metadata": "small now"}).to_string()),
        )
    });
    // A check through the other replica waits for the item to be unclaimed too.
    let check_url = a.url("/pool/big/item/big-07?until=unclaimed&wait=20s");
    let checking = thread::spawn(move || call("GET", &check_url, None));
    thread::sleep(Duration::from_millis(500));
    assert!(!updating.is_finished() && !checking.is_finished());
    assert_eq!(release(a, "big", "big-07", "k7").status, 200);
    let updated = updating.join().expect("update thread");
    assert_eq!(updated.status, 200, "{}", updated.body);
    assert_eq!(updated.json()["changed"], true);
    let checked = checking.join().expect("check thread");
    assert_eq!(checked.status, 200, "{}", checked.body);
    assert_eq!(checked.json()["claimed"], false, "{}", checked.body);
    for server in servers.iter() {
        let item = call("GET", &server.url("/pool/big/item/big-07"), None).json();
        assert_eq!(item["metadata"], "small now");
    }

    // Removals: an item, then every item, and the pool is gone from both.
    let removed = call("DELETE", &b.url("/pool/big/item/big-00"), None);
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert_eq!(
        call("GET", &a.url("/pool/big/item/big-00"), None).status,
        404
    );
    assert_eq!(items(&pool_status(a, "big").json()).len(), ITEMS - 1);
    for i in 1..ITEMS {
        let removed = call(
            "DELETE",
            &servers[i % 2].url(&format!("/pool/big/item/big-{i:02}")),
            None,
        );
        assert_eq!(removed.status, 200, "{}", removed.body);
    }
    for server in servers.iter() {
        assert_eq!(pool_status(server, "big").status, 404);
        let listed = call("GET", &server.url("/pools"), None).json();
        assert!(
            !listed["pools"]
                .as_array()
                .expect("pools")
                .iter()
                .any(|p| p["name"] == "big"),
            "{listed}"
        );
    }
    // Added again, the pool starts afresh with the new metadata.
    assert_eq!(add(b, "big", "big-07", "again").status, 201);
    let item = call("GET", &a.url("/pool/big/item/big-07"), None).json();
    assert_eq!(item["metadata"], "again");
    assert_eq!(items(&pool_status(a, "big").json()).len(), 1);
}

#[test]
fn an_item_lease_expires_after_the_granting_replica_was_killed_and_its_waiter_is_served() {
    let _serial = serial();
    let mut servers = replicas(etcd::shared(), 2);
    assert_eq!(add(&servers[0], "leased", "only", "m").status, 201);
    let before_lease = Instant::now();
    let claimed = claim(
        &servers[0],
        "leased",
        None,
        json!({"key": "a", "ttl": "2s"}),
    );
    assert_eq!(claimed.status, 200, "{}", claimed.body);
    let (done, results) = mpsc::channel();
    spawn_claim(&servers[1], "leased", Some("only"), "b", "20s", &done);
    wait_for_pool_waiters(&servers[1], "leased", 1, Duration::from_secs(10));
    servers[0].kill();
    let (key, reply) = results
        .recv_timeout(Duration::from_secs(30))
        .expect("the waiter is granted once the lease runs out");
    assert_eq!((key.as_str(), reply.status), ("b", 200), "{}", reply.body);
    let waited = before_lease.elapsed();
    assert!(waited >= Duration::from_secs(2), "granted after {waited:?}");
    let item = call("GET", &servers[1].url("/pool/leased/item/only"), None).json();
    assert_eq!(item["holder"]["key"], "b", "{item}");
}

#[test]
fn a_waiting_claim_whose_client_goes_away_is_withdrawn() {
    let _serial = serial();
    let servers = replicas(etcd::shared(), 2);
    let (a, b) = (&servers[0], &servers[1]);
    assert_eq!(add(a, "gone", "e1", "m").status, 201);
    assert_eq!(claim(a, "gone", None, json!({"key": "holder"})).status, 200);
    // A client that gives up after a second, well within its 60 s wait.
    let impatient = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .expect("client");
    let url = claim_url(b, "gone", Some("e1"), Some("60s"));
    let gave_up = impatient
        .put(&url)
        .body(json!({"key": "impatient"}).to_string())
        .send();
    assert!(gave_up.is_err(), "the claim was answered: {gave_up:?}");
    // Its claim leaves the queue, on every replica's view.
    wait_for_pool_waiters(a, "gone", 0, Duration::from_secs(10));
    let freed = release(a, "gone", "e1", "holder");
    assert_eq!(freed.status, 200, "{}", freed.body);
    for server in &servers {
        let item = call("GET", &server.url("/pool/gone/item/e1"), None).json();
        assert_eq!(
            item["claimed"], false,
            "granted to a departed client: {item}"
        );
    }
}

#[test]
fn a_claim_queued_through_a_killed_replica_is_dropped_and_the_next_is_served() {
    let _serial = serial();
    let mut servers = replicas(etcd::shared(), 3);
    assert_eq!(add(&servers[0], "q", "e1", "m").status, 201);
    assert_eq!(
        claim(&servers[0], "q", None, json!({"key": "holder"})).status,
        200
    );
    let (done, results) = mpsc::channel();
    spawn_claim(&servers[1], "q", None, "doomed", "60s", &done);
    wait_for_pool_waiters(&servers[0], "q", 1, Duration::from_secs(10));
    spawn_claim(&servers[2], "q", Some("e1"), "later", "60s", &done);
    wait_for_pool_waiters(&servers[0], "q", 2, Duration::from_secs(10));
    servers[1].kill();
    // Dropped within its etcd lease (5 s) plus a purge pass (every 2 s), with room to spare.
    let killed_at = Instant::now();
    wait_for_pool_waiters(&servers[0], "q", 1, Duration::from_secs(20));
    eprintln!(
        "dead replica's claim dropped {:?} after the kill",
        killed_at.elapsed()
    );
    let freed = release(&servers[0], "q", "e1", "holder");
    assert_eq!(freed.status, 200, "{}", freed.body);
    let (key, reply) = results
        .recv_timeout(Duration::from_secs(10))
        .expect("the later claim is granted");
    assert_eq!(
        (key.as_str(), reply.status),
        ("later", 200),
        "{}",
        reply.body
    );
    let item = call("GET", &servers[2].url("/pool/q/item/e1"), None).json();
    assert_eq!(item["holder"]["key"], "later", "{item}");
}

/// Item → (the client holding it now, the highest generation it was granted under).
type Holders = BTreeMap<String, (Option<usize>, u64)>;

#[test]
fn claims_of_a_pool_never_overlap_across_replicas() {
    let _serial = serial();
    let servers = Arc::new(replicas(etcd::shared(), 2));
    const ITEMS: usize = 3;
    const CLIENTS: usize = 8;
    const CLAIMS: usize = 300;
    for i in 0..ITEMS {
        assert_eq!(
            add(&servers[i % 2], "shared", &format!("s{i}"), "m").status,
            201
        );
    }
    // Who holds each item now, and the highest generation it was granted under.
    let holders: Arc<Mutex<Holders>> = Arc::default();
    let claims = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (servers, holders, claims) = (servers.clone(), holders.clone(), claims.clone());
            thread::spawn(move || {
                let http = common::client();
                let server = &servers[client % 2];
                let body = json!({"key": format!("c{client}")}).to_string();
                let url = claim_url(server, "shared", None, Some("30s"));
                while claims.fetch_add(1, Ordering::SeqCst) < CLAIMS {
                    let reply = call_with(&http, "PUT", &url, Some(&body));
                    assert_eq!(reply.status, 200, "{}", reply.body);
                    let granted = reply.json();
                    let item = granted["item"].as_str().expect("item").to_string();
                    let generation = granted["generation"].as_u64().expect("generation");
                    {
                        let mut holders = holders.lock().expect("holders");
                        let entry = holders.entry(item.clone()).or_insert((None, 0));
                        assert_eq!(entry.0, None, "{item} granted to c{client} while held");
                        assert!(generation > entry.1, "{item}: generation {generation}");
                        *entry = (Some(client), generation);
                    }
                    thread::sleep(Duration::from_millis(2));
                    holders
                        .lock()
                        .expect("holders")
                        .get_mut(&item)
                        .expect("held")
                        .0 = None;
                    let other = &servers[(client + 1) % 2];
                    let freed = call_with(
                        &http,
                        "DELETE",
                        &other.url(&format!("/pool/shared/item/{item}/claim")),
                        Some(&body),
                    );
                    assert_eq!(freed.status, 200, "{}", freed.body);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("client thread");
    }
    let status = pool_status(&servers[0], "shared").json();
    assert_eq!(status["waiters"], 0, "{status}");
    assert!(
        items(&status).values().all(|i| i["claimed"] == false),
        "{status}"
    );
}

#[test]
fn import_then_export_round_trips_pools() {
    let _serial = serial();
    // A state file with pools (claimed and unclaimed items, metadata of every kind) and a lock,
    // written by the file backend.
    let mut file_server = Server::start();
    let yaml = "url: https://example.com/a\nuser: \"admin\"\nnote: ünïcode, tabs\tand /slashes/\n";
    assert_eq!(add(&file_server, "aws", "env-1", yaml).status, 201);
    assert_eq!(
        add(&file_server, "aws", "env-2", "{\"json\": true}").status,
        201
    );
    assert_eq!(add(&file_server, "aws", "env-3", "").status, 201);
    assert_eq!(
        add(&file_server, "other%2Fpool", "x", "in a pool with a slash").status,
        201
    );
    let info = json!({"team": "main", "pipeline": "p", "job": "j", "build": "7"});
    let claimed = claim(
        &file_server,
        "aws",
        Some("env-2"),
        json!({"key": "k", "requestor": "r", "info": info}),
    );
    assert_eq!(claimed.status, 200, "{}", claimed.body);
    assert_eq!(file_server.lock("a-lock", json!({"key": "lk"})).status, 200);
    let aws_before = pool_status(&file_server, "aws").json();
    let other_before = pool_status(&file_server, "other%2Fpool").json();
    file_server.signal(libc::SIGTERM);
    file_server.wait_exit(Duration::from_secs(10));
    let state_file = file_server.state_file.clone();
    let original: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).expect("state file"))
            .expect("our file is JSON");
    assert!(original["pools"]["aws"].is_object(), "{original}");

    let prefix = etcd::unique_prefix();
    let imported = locker_command(&prefix, &["import", &state_file.display().to_string()]);
    assert!(imported.status.success());
    let said = String::from_utf8_lossy(&imported.stdout).into_owned()
        + &String::from_utf8_lossy(&imported.stderr);
    assert!(said.contains("2 pool(s)"), "{said}");
    // Pools count as state already there: importing again is refused without --replace.
    let again = locker_command(&prefix, &["import", &state_file.display().to_string()]);
    assert!(!again.status.success());

    let servers: Vec<Server> = (0..2)
        .map(|_| {
            common::server()
                .etcd(&etcd::shared().endpoints())
                .env("LOCKER_ETCD_PREFIX", prefix.clone())
                .start()
        })
        .collect();
    for server in &servers {
        assert_eq!(pool_status(server, "aws").json(), aws_before);
        assert_eq!(pool_status(server, "other%2Fpool").json(), other_before);
        assert_eq!(server.locks()["a-lock"]["key"], "lk");
    }
    // The imported claim is released through the etcd store like any other.
    assert_eq!(release(&servers[1], "aws", "env-2", "k").status, 200);
    assert_eq!(
        claim(
            &servers[0],
            "aws",
            Some("env-2"),
            json!({"key": "k", "requestor": "r", "info": info})
        )
        .status,
        200
    );

    let dir = common::temp_dir();
    let exported_path = dir.path().join("exported.yml");
    let exported = locker_command(&prefix, &["export", &exported_path.display().to_string()]);
    assert!(exported.status.success());
    let exported: Value =
        serde_json::from_str(&std::fs::read_to_string(&exported_path).expect("export"))
            .expect("export is JSON");
    assert_eq!(
        exported["pools"]["other/pool"],
        original["pools"]["other/pool"]
    );
    // env-2 was released and claimed again: a newer holding; the rest is as it was.
    let mut aws = exported["pools"]["aws"].clone();
    let mut aws_original = original["pools"]["aws"].clone();
    assert_eq!(aws["items"]["env-2"]["holder"]["key"], "k");
    assert!(
        aws["items"]["env-2"]["holder"]["generation"].as_u64()
            > aws_original["items"]["env-2"]["holder"]["generation"].as_u64()
    );
    for pool in [&mut aws, &mut aws_original] {
        pool["items"]["env-2"]["holder"] = Value::Null;
        pool["items"]["env-2"]["freed"] = Value::Null;
        pool["clock"] = Value::Null;
    }
    assert_eq!(aws, aws_original);
    assert_eq!(exported["locks"], original["locks"]);

    // The exported file serves the same pools from the file backend.
    let from_export = common::server().state_file(&exported_path).start();
    let status = pool_status(&from_export, "aws").json();
    assert_eq!(items(&status)["env-1"]["metadata"], yaml);
    assert_eq!(items(&status)["env-2"]["holder"]["key"], "k");
}
