//! Load: 1,000 concurrent keep-alive connections do mixed lock, unlock, status and list
//! requests for about 20 s against the real binary. Every answer must be 200, 404 or 423, and
//! afterwards the server's `GET /locks` must equal a client-side model of every acknowledged
//! operation.
//!
//! The workload keeps the model exact:
//! - each connection owns a few lock names ("own" locks) that nobody else touches, with its own
//!   key and two requestors, so every acquire and release on them has a known effect (and a
//!   status or list read between two of the connection's own requests must match the model);
//! - all connections also contend for a few shared names with their own keys and without
//!   waiting: whether an acquire won (200) or lost (423) is read from the answer, and a
//!   connection only releases a shared lock it holds. Releasing a shared lock it does not hold
//!   is also tried, and must change nothing (200 when free, 423 when another key holds it).

pub mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

const CONNECTIONS: usize = 1_000;
const RUN_FOR: Duration = Duration::from_secs(20);
/// Own lock names per connection.
const OWN_NAMES: usize = 2;
/// Lock names every connection contends for.
const SHARED_NAMES: usize = 16;
/// Deadline of any single request; a request that takes longer fails the test.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// File descriptors the test process (and the server, which inherits the limit) needs.
const FD_NEEDED: u64 = 2 * CONNECTIONS as u64 + 512;

/// Raises the soft limit on open files to at least `needed`, up to the hard limit; fails with
/// a clear message when the hard limit is too low.
fn raise_fd_limit(needed: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    let result = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(result, 0, "getrlimit(RLIMIT_NOFILE) failed");
    if limit.rlim_cur >= needed {
        return;
    }
    assert!(
        limit.rlim_max >= needed,
        "this test opens {CONNECTIONS} connections and needs {needed} file descriptors, but the \
         hard limit (ulimit -Hn) is {}: raise it (e.g. `ulimit -Hn 4096` as root, or LimitNOFILE \
         in the service/container) and run again",
        limit.rlim_max
    );
    limit.rlim_cur = needed;
    // SAFETY: as above.
    let result = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(
        result,
        0,
        "setrlimit(RLIMIT_NOFILE, {needed}) failed: {}",
        std::io::Error::last_os_error()
    );
}

/// A tiny deterministic PRNG (xorshift64*), one per connection.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// What one connection holds, by lock name: requestor → count. Its key is fixed.
type Holdings = BTreeMap<String, BTreeMap<String, u64>>;

#[derive(Default)]
struct Tally {
    open: AtomicU64,
    requests: AtomicU64,
    ok: AtomicU64,
    not_found: AtomicU64,
    locked: AtomicU64,
    lists: AtomicU64,
}

struct Answer {
    status: u16,
    body: Value,
}

/// One keep-alive HTTP/1.1 connection.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl Connection {
    async fn open(address: &str) -> Result<Self, String> {
        let stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| format!("connect to {address} timed out"))?
            .map_err(|e| format!("connect to {address}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(connection);
        Ok(Connection {
            sender,
            host: address.to_string(),
        })
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Answer, String> {
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            self.sender
                .ready()
                .await
                .map_err(|e| format!("connection closed before {method} {path}: {e:?}"))?;
            let response = self
                .sender
                .send_request(request)
                .await
                .map_err(|e| format!("{method} {path}: {e:?}"))?;
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{method} {path}: body: {e}"))?
                .to_bytes();
            let body = serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "{method} {path} → {status}: body is not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })?;
            Ok(Answer { status, body })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("{method} {path} took longer than {REQUEST_TIMEOUT:?}"))?
    }
}

/// The `locked_by` map of a lock object from the server.
fn locked_by(lock: &Value) -> BTreeMap<String, u64> {
    lock["locked_by"]
        .as_object()
        .unwrap_or_else(|| panic!("no locked_by in {lock}"))
        .iter()
        .map(|(r, c)| (r.clone(), c.as_u64().unwrap_or_else(|| panic!("count {c}"))))
        .collect()
}

/// Runs one connection's workload until `stop`; returns what it holds at the end.
async fn run_connection(
    id: usize,
    address: String,
    mut go: tokio::sync::watch::Receiver<bool>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Result<Holdings, String> {
    let mut connection = Connection::open(&address).await?;
    // Every connection is open before any sends a request.
    tally.open.fetch_add(1, Ordering::SeqCst);
    go.wait_for(|go| *go)
        .await
        .map_err(|_| "the test gave up before starting".to_string())?;
    let began = Instant::now();
    let mut rng = Rng::new(id as u64 + 1);
    let key = format!("key-{id}");
    let requestors = [format!("r-{id}-a"), format!("r-{id}-b")];
    let own: Vec<String> = (0..OWN_NAMES).map(|j| format!("own-{id}-{j}")).collect();
    let shared: Vec<String> = (0..SHARED_NAMES).map(|s| format!("shared-{s}")).collect();
    let mut held: Holdings = BTreeMap::new();
    let mut sent = 0u64;
    let mut last_answer = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        sent += 1;
        let roll = rng.below(100);
        let (method, name, body) = if roll < 2 {
            ("LIST", String::new(), None)
        } else {
            let name = if roll < 70 {
                own[rng.below(OWN_NAMES as u64) as usize].clone()
            } else {
                shared[rng.below(SHARED_NAMES as u64) as usize].clone()
            };
            let requestor = requestors[rng.below(2) as usize].clone();
            let body = json!({"key": key, "requestor": requestor});
            match rng.below(10) {
                0..=3 => ("PUT", name, Some(body)),
                4..=7 => ("DELETE", name, Some(body)),
                _ => ("GET", name, None),
            }
        };
        let answer = if method == "LIST" {
            connection.send("GET", "/locks", None).await
        } else {
            let path = format!("/lock/{name}");
            connection.send(method, &path, body.clone()).await
        }
        .map_err(|e| {
            format!(
                "connection {id}, request {sent}, {:.1?} into the run, {:.1?} after the previous \
                 answer: {e}",
                began.elapsed(),
                last_answer.elapsed()
            )
        })?;
        last_answer = Instant::now();
        tally.requests.fetch_add(1, Ordering::Relaxed);
        match answer.status {
            200 => tally.ok.fetch_add(1, Ordering::Relaxed),
            404 => tally.not_found.fetch_add(1, Ordering::Relaxed),
            423 => tally.locked.fetch_add(1, Ordering::Relaxed),
            other => {
                return Err(format!(
                    "connection {id}: {method} {name} → {other}: {}",
                    answer.body
                ));
            }
        };
        let is_own = name.starts_with("own-");
        let unexpected = |why: &str| {
            format!(
                "connection {id}: {method} {name} → {} {}: {why} (model: {:?})",
                answer.status,
                answer.body,
                held.get(&name)
            )
        };
        match method {
            "LIST" => {
                tally.lists.fetch_add(1, Ordering::Relaxed);
                // Own locks change only through this connection: the list must match the model.
                let locks = answer
                    .body
                    .as_object()
                    .ok_or_else(|| unexpected("not a map"))?;
                for name in &own {
                    let expected = held.get(name);
                    let actual = locks.get(name);
                    match (expected, actual) {
                        (None, None) => {}
                        (Some(counts), Some(lock))
                            if lock["key"] == key.as_str() && &locked_by(lock) == counts => {}
                        _ => {
                            return Err(format!(
                                "connection {id}: GET /locks shows {name} as {actual:?}, model {expected:?}"
                            ));
                        }
                    }
                }
                // A shared lock this connection holds is listed under its key with its counts;
                // one it does not hold is absent or another key's.
                for name in &shared {
                    let expected = held.get(name);
                    let actual = locks.get(name);
                    let agrees = match (expected, actual) {
                        (Some(counts), Some(lock)) => {
                            lock["key"] == key.as_str() && &locked_by(lock) == counts
                        }
                        (Some(_), None) => false,
                        (None, Some(lock)) => lock["key"] != key.as_str(),
                        (None, None) => true,
                    };
                    if !agrees {
                        return Err(format!(
                            "connection {id}: GET /locks shows {name} as {actual:?}, model {expected:?}"
                        ));
                    }
                }
            }
            "GET" => match (answer.status, held.get(&name)) {
                (404, None) => {}
                (200, Some(counts))
                    if answer.body["key"] == key.as_str() && &locked_by(&answer.body) == counts => {
                }
                // A shared lock this connection does not hold: free, or another key's.
                (200, None) if !is_own && answer.body["key"] != key.as_str() => {}
                _ => return Err(unexpected("status disagrees with the model")),
            },
            "PUT" => {
                let requestor = body.as_ref().expect("body")["requestor"]
                    .as_str()
                    .expect("requestor")
                    .to_string();
                match answer.status {
                    200 => {
                        if answer.body["generation"].as_u64().is_none() {
                            return Err(unexpected("no generation"));
                        }
                        *held
                            .entry(name.clone())
                            .or_default()
                            .entry(requestor)
                            .or_default() += 1;
                    }
                    423 if !is_own && !held.contains_key(&name) => {}
                    _ => return Err(unexpected("acquire outcome disagrees with the model")),
                }
            }
            "DELETE" => {
                let requestor = body.as_ref().expect("body")["requestor"]
                    .as_str()
                    .expect("requestor")
                    .to_string();
                match answer.status {
                    200 => {
                        if let Some(counts) = held.get_mut(&name) {
                            counts.remove(&requestor);
                            if counts.is_empty() {
                                held.remove(&name);
                            }
                        }
                    }
                    // Another connection's key holds this shared lock.
                    423 if !is_own && !held.contains_key(&name) => {}
                    _ => return Err(unexpected("release outcome disagrees with the model")),
                }
            }
            _ => unreachable!(),
        }
    }
    Ok(held)
}

#[test]
fn a_thousand_connections_of_mixed_requests_leave_exactly_the_modelled_state() {
    raise_fd_limit(FD_NEEDED);
    // One log line per request would cost the debug server more than the requests themselves.
    let server = common::server()
        .env("RUST_LOG", "info,actix_web::middleware::logger=warn")
        .start();
    let address = server
        .base
        .strip_prefix("http://")
        .expect("plain http")
        .to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (go, ready) = tokio::sync::watch::channel(false);
    let mut started = Instant::now();
    let results: Vec<Result<Holdings, String>> = runtime.block_on(async {
        let tasks: Vec<_> = (0..CONNECTIONS)
            .map(|id| {
                tokio::spawn(run_connection(
                    id,
                    address.clone(),
                    ready.clone(),
                    stop.clone(),
                    tally.clone(),
                ))
            })
            .collect();
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        while tally.open.load(Ordering::SeqCst) < CONNECTIONS as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!(
            "{} connections open after {:.1?}",
            tally.open.load(Ordering::SeqCst),
            started.elapsed()
        );
        started = Instant::now();
        let _ = go.send(true);
        tokio::time::sleep(RUN_FOR).await;
        stop.store(true, Ordering::Relaxed);
        let mut results = Vec::with_capacity(CONNECTIONS);
        for task in tasks {
            results.push(
                task.await
                    .unwrap_or_else(|e| Err(format!("task failed: {e}"))),
            );
        }
        results
    });
    let elapsed = started.elapsed();
    let requests = tally.requests.load(Ordering::Relaxed);
    eprintln!(
        "{CONNECTIONS} connections, {requests} requests in {elapsed:.1?} ({:.0}/s): {} × 200, \
         {} × 404, {} × 423, {} lists",
        requests as f64 / elapsed.as_secs_f64(),
        tally.ok.load(Ordering::Relaxed),
        tally.not_found.load(Ordering::Relaxed),
        tally.locked.load(Ordering::Relaxed),
        tally.lists.load(Ordering::Relaxed),
    );
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS} connections failed; first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(10)
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        requests >= CONNECTIONS as u64 * 5,
        "only {requests} requests completed in {elapsed:?}"
    );

    // The model: every connection's holdings, under its key. Two connections holding the same
    // lock at the end would already be a broken mutual exclusion.
    let mut model: BTreeMap<String, (String, BTreeMap<String, u64>)> = BTreeMap::new();
    for (id, result) in results.into_iter().enumerate() {
        for (name, counts) in result.expect("checked above") {
            let previous = model.insert(name.clone(), (format!("key-{id}"), counts));
            assert!(previous.is_none(), "two connections hold {name}");
        }
    }
    let locks = server.locks();
    let actual: BTreeMap<String, (String, BTreeMap<String, u64>)> = locks
        .as_object()
        .expect("GET /locks is a map")
        .iter()
        .map(|(name, lock)| {
            let key = lock["key"].as_str().expect("key").to_string();
            (name.clone(), (key, locked_by(lock)))
        })
        .collect();
    let missing: Vec<_> = model
        .iter()
        .filter(|(name, lock)| actual.get(*name) != Some(lock))
        .take(10)
        .collect();
    let extra: Vec<_> = actual
        .iter()
        .filter(|(name, _)| !model.contains_key(*name))
        .take(10)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "server state differs from the model ({} modelled, {} on the server); modelled but \
         different or absent: {missing:?}; on the server only: {extra:?}",
        model.len(),
        actual.len()
    );
    eprintln!("final state: {} locks held, as modelled", model.len());
    let health = common::call("GET", &server.url("/health"), None);
    assert_eq!(health.status, 200);
}
