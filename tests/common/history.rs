//! Reading the history back, and the load whose every acknowledged change it must keep: what
//! the history tests of both backends share (`tests/history.rs`, `tests/etcd_history.rs`).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};

use serde_json::{Value, json};

use super::http::{call, client};
use super::server::Server;

/// Every kept event of `server`'s `GET /history`, page after page.
pub fn all_events(server: &Server) -> Vec<Value> {
    let mut events = Vec::new();
    let mut since = 0;
    loop {
        let reply = call(
            "GET",
            &server.url(&format!("/history?since={since}&limit=1000")),
            None,
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        let page = reply.json();
        events.extend(page["events"].as_array().expect("events").iter().cloned());
        if page["more"] != json!(true) {
            return events;
        }
        since = page["next"].as_u64().expect("next");
    }
}

/// The id of each event.
pub fn ids(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["id"].as_u64().expect("id"))
        .collect()
}

/// (kind, lock, requestor, generation) of every change a client was told succeeded.
pub type Change = (String, String, String, Option<u64>);

/// Clients acquiring and releasing `lock-{0,1,2}` in threads, each through one server, until
/// stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<(Vec<Change>, Vec<String>)>>,
}

impl Load {
    /// One client through each of `bases` (the servers' base URLs).
    pub fn start(bases: impl IntoIterator<Item = String>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = bases
            .into_iter()
            .enumerate()
            .map(|(worker, base)| {
                let stop = stop.clone();
                thread::spawn(move || load(base, worker, stop))
            })
            .collect();
        Load { stop, clients }
    }

    /// Stops the clients: the changes acknowledged, and the requestors refused. Fails unless
    /// more than `least` changes were acknowledged and the load met a held lock.
    pub fn stop(self, least: usize) -> (Vec<Change>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut acknowledged, mut refused) = (Vec::new(), Vec::new());
        for client in self.clients {
            let (a, r) = client.join().expect("client");
            acknowledged.extend(a);
            refused.extend(r);
        }
        assert!(
            acknowledged.len() > least,
            "too little load: {}",
            acknowledged.len()
        );
        assert!(!refused.is_empty(), "the load never met a held lock");
        (acknowledged, refused)
    }
}

/// Acquires and releases `lock-{0,1,2}` through `base` until `stop`, or until the server is
/// gone; the changes acknowledged, and the requestors refused (the lock was held).
fn load(base: String, worker: usize, stop: Arc<AtomicBool>) -> (Vec<Change>, Vec<String>) {
    let client = client();
    let (mut acknowledged, mut refused) = (Vec::new(), Vec::new());
    for n in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let lock = format!("lock-{}", n % 3);
        let requestor = format!("w{worker}-{n}");
        // A lease, so that a lock held by the client of a killed server comes free again
        // and the other clients go on (without one, all three can stay held for good).
        let body = json!({"key": requestor, "requestor": requestor, "ttl": "3s"}).to_string();
        let url = format!("{base}/lock/{lock}");
        let Ok(reply) = client.put(&url).body(body.clone()).send() else {
            break;
        };
        match reply.status().as_u16() {
            200 => {
                let generation = reply
                    .json::<Value>()
                    .ok()
                    .and_then(|v| v["generation"].as_u64());
                let change = |kind: &str| {
                    (
                        kind.to_string(),
                        lock.clone(),
                        requestor.clone(),
                        generation,
                    )
                };
                acknowledged.push(change("acquired"));
                match client.delete(&url).body(body).send() {
                    Ok(r) if r.status().as_u16() == 200 => acknowledged.push(change("released")),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            423 => refused.push(requestor),
            _ => {}
        }
    }
    (acknowledged, refused)
}

/// Fails unless `events` hold every `acknowledged` change and nothing of a `refused` requestor.
pub fn assert_kept(events: &[Value], acknowledged: &[Change], refused: &[String]) {
    let recorded: HashSet<Change> = events
        .iter()
        .map(|e| {
            let text = |field: &str| e[field].as_str().unwrap_or_default().to_string();
            (
                text("kind"),
                text("lock"),
                text("requestor"),
                e["generation"].as_u64(),
            )
        })
        .collect();
    let missing: Vec<&Change> = acknowledged
        .iter()
        .filter(|change| !recorded.contains(*change))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not in the history: {missing:?}"
    );
    let refused: HashSet<&str> = refused.iter().map(String::as_str).collect();
    let phantom: Vec<&Value> = events
        .iter()
        .filter(|e| e["requestor"].as_str().is_some_and(|r| refused.contains(r)))
        .collect();
    assert!(phantom.is_empty(), "refused but recorded: {phantom:?}");
}
