//! Mutual exclusion: 32 clients with distinct keys contend for one lock with waiting acquires.
//! Each holder records its entry and exit, and asks the server inside its section that the
//! lock is held under its key and generation; over at least 2,000 hand-offs no two holdings
//! overlap, and the fencing generations strictly increase in the order of the holdings.

pub mod common;

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: usize = 32;
const HANDOFFS: usize = 2_000;
/// The test gives up (and fails) if the hand-offs take longer than this.
const DEADLINE: Duration = Duration::from_secs(45);

/// One holding, as its holder saw it.
#[derive(Debug, Clone, Copy)]
struct Holding {
    client: usize,
    generation: u64,
    /// From the 200 of the acquire to just before the DELETE is sent.
    entered: Instant,
    left: Instant,
}

#[test]
fn thirty_two_waiting_clients_never_hold_the_lock_together() {
    let server = common::server()
        .env("RUST_LOG", "info,actix_web::middleware::logger=warn")
        .start();
    let url = server.url("/lock/contended?wait=20s");
    let inside = Arc::new(AtomicI64::new(0));
    let granted = Arc::new(AtomicUsize::new(0));
    let holdings = Arc::new(Mutex::new(Vec::with_capacity(HANDOFFS + CLIENTS)));
    let started = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (url, inside, granted, holdings) = (
                url.clone(),
                inside.clone(),
                granted.clone(),
                holdings.clone(),
            );
            std::thread::spawn(move || -> Result<usize, String> {
                let http = common::client();
                let key = format!("key-{client}");
                let body = serde_json::json!({"key": key}).to_string();
                let status_url = url.replace("?wait=20s", "");
                let mut timeouts = 0;
                while granted.load(Ordering::SeqCst) < HANDOFFS {
                    if started.elapsed() > DEADLINE {
                        return Err(format!("client {client}: out of time"));
                    }
                    let reply = common::call_with(&http, "PUT", &url, Some(&body));
                    match reply.status {
                        200 => {}
                        // The wait ran out (possible only if hand-offs stall): try again.
                        423 => {
                            timeouts += 1;
                            continue;
                        }
                        other => return Err(format!("acquire → {other}: {}", reply.body)),
                    }
                    let entered = Instant::now();
                    let before = inside.fetch_add(1, Ordering::SeqCst);
                    if before != 0 {
                        return Err(format!(
                            "client {client} entered while {before} other holder(s) were inside"
                        ));
                    }
                    let generation = reply.json()["generation"]
                        .as_u64()
                        .ok_or_else(|| format!("no generation in {}", reply.body))?;
                    granted.fetch_add(1, Ordering::SeqCst);
                    // The marker above lasts microseconds; the server's own view lasts a round
                    // trip: inside the section, the lock is held by this key and this grant.
                    let status = common::call_with(&http, "GET", &status_url, None);
                    let view = status.json();
                    if status.status != 200
                        || view["key"] != key.as_str()
                        || view["generation"] != generation
                    {
                        return Err(format!(
                            "client {client} (generation {generation}) is inside, but the server \
                             says {} {}",
                            status.status, status.body
                        ));
                    }
                    let after = inside.fetch_sub(1, Ordering::SeqCst);
                    let left = Instant::now();
                    if after != 1 {
                        return Err(format!(
                            "client {client} left while {} other holder(s) were inside",
                            after - 1
                        ));
                    }
                    holdings.lock().expect("holdings").push(Holding {
                        client,
                        generation,
                        entered,
                        left,
                    });
                    let reply = common::call_with(&http, "DELETE", &url, Some(&body));
                    if reply.status != 200 {
                        return Err(format!("release → {}: {}", reply.status, reply.body));
                    }
                }
                Ok(timeouts)
            })
        })
        .collect();
    let mut timeouts = 0;
    for thread in threads {
        timeouts += thread
            .join()
            .expect("client thread panicked")
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let elapsed = started.elapsed();
    let mut holdings = holdings.lock().expect("holdings").clone();
    holdings.sort_by_key(|h| h.entered);
    assert!(
        holdings.len() >= HANDOFFS,
        "only {} holdings",
        holdings.len()
    );
    for pair in holdings.windows(2) {
        let (earlier, later) = (&pair[0], &pair[1]);
        assert!(
            later.entered > earlier.left,
            "holdings overlap: {earlier:?} and {later:?}"
        );
        assert!(
            later.generation > earlier.generation,
            "generations do not increase: {earlier:?} then {later:?}"
        );
    }
    let clients_served = {
        let mut seen: Vec<usize> = holdings.iter().map(|h| h.client).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    };
    eprintln!(
        "{} holdings by {clients_served} clients in {elapsed:.1?} ({:.1} ms per hand-off), \
         {timeouts} timed-out waits",
        holdings.len(),
        elapsed.as_secs_f64() * 1000.0 / holdings.len() as f64
    );
    assert_eq!(clients_served, CLIENTS, "some clients never got the lock");
    assert_eq!(
        server.locks(),
        serde_json::json!({}),
        "the lock is left free"
    );
    assert_eq!(
        common::call("GET", &server.url("/health"), None).status,
        200
    );
}
