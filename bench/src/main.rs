//! locker-bench: drives a real `locker` server binary and prints the figures the README quotes.
//!
//! Each scenario starts the server on a fresh temp state file (optionally pre-filled with held
//! locks), loads it over keep-alive HTTP/1.1 connections from this process, and stops it.
//! Every mutation the server acknowledges is fsynced, exactly as in production.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
#[command(about = "Benchmarks for the locker server")]
struct Args {
    /// The server binary to benchmark.
    #[arg(long, default_value = "target/release/locker")]
    server: PathBuf,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Clone, Copy)]
enum Scenario {
    /// Every scenario below, as in the README's table.
    All,
    /// Lock+unlock cycles from N clients, each on its own lock, with `held` other locks held.
    Throughput {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        held: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Throughput as in `throughput`, while `pollers` idle `wait_free` requests wait for held
    /// locks that nobody releases (issue 16: each commit used to wake every one of them).
    Pollers {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 2_000)]
        pollers: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Acquire latency at a fixed offered load: N clients each send lock+unlock cycles on a
    /// schedule adding up to `rate` requests/s (open loop). When a cycle starts late because the
    /// previous one was still running, latency counts from the scheduled time, so a slow server
    /// is not hidden by a client that waited for it.
    Latency {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 5_000)]
        rate: u64,
        #[arg(long, default_value_t = 100)]
        held: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Time from a release's answer to the next waiter's grant.
    Handoff {
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// Resident memory with `held` locks held and `waiters` waiting requests.
    Memory {
        #[arg(long, default_value_t = 10_000)]
        held: usize,
        #[arg(long, default_value_t = 2_000)]
        waiters: usize,
    },
    /// The etcd backend: throughput at `clients` clients and hand-offs, through two replicas
    /// on a 3-member etcd cluster on loopback (Debian's `etcd` binary). Only with the `etcd`
    /// feature, and a server built with it (`bench/run` builds both so).
    #[cfg(feature = "etcd")]
    Etcd {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 1000)]
        handoffs: usize,
    },
    /// A large table (issue 16): with `held` locks held, the latency and server CPU of `cycles`
    /// lock+unlock cycles on another lock, one at a time; a page of `GET /locks` (200) and the
    /// whole listing; and RSS. Without and with the journal (which leaves only the per-batch
    /// work, the state file being rewritten about once a second).
    Large {
        #[arg(long, default_value_t = 100_000)]
        held: usize,
        #[arg(long, default_value_t = 300)]
        cycles: usize,
    },
    /// A long queue (issue 18): `waiters` waiting acquires of one held lock. How long queueing
    /// them takes and the server CPU it costs (each batch used to copy the whole queue), then the
    /// latency of lock+unlock cycles on another lock while they wait. The default fits the
    /// 20,000-descriptor hard limit of the project's machine (two per waiting connection).
    Queue {
        #[arg(long, default_value_t = 9_000)]
        waiters: usize,
        #[arg(long, default_value_t = 300)]
        cycles: usize,
    },
    /// Pools (issue 19): claim+release of any item of a pool of `items` from `clients`
    /// clients, and the hand-off of a pool's only item to a waiting claim.
    Pool {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        items: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 1000)]
        handoffs: usize,
    },
    /// The history's cost (issue 20): lock+unlock throughput from `clients` clients with the
    /// history on (the default) and off (`LOCKER_HISTORY_BYTES=0`), `runs` runs of each,
    /// alternating, so a busy machine weighs on both alike.
    History {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Start-up time with a state file of `held` locks.
    Startup {
        #[arg(long, default_value_t = 10_000)]
        held: usize,
    },
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = args.server.clone();
    runtime.block_on(async move {
        match args.scenario {
            Scenario::All => {
                startup(&server, 10_000).await?;
                throughput(&server, 64, 100, 10).await?;
                latency(&server, 64, 5_000, 100, 10).await?;
                latency(&server, 64, 10_000, 100, 10).await?;
                throughput(&server, 64, 10_000, 10).await?;
                pollers_beside(&server, 64, 2_000, 10).await?;
                handoff(&server, 1000).await?;
                pool(&server, 64, 100, 10, 1000).await?;
                history(&server, 64, 10, 3).await?;
                memory(&server, 10_000, 2_000).await?;
                #[cfg(feature = "etcd")]
                etcd(&server, 64, 10, 1000).await?;
                Ok(())
            }
            #[cfg(feature = "etcd")]
            Scenario::Etcd {
                clients,
                seconds,
                handoffs,
            } => etcd(&server, clients, seconds, handoffs).await,
            Scenario::Throughput {
                clients,
                held,
                seconds,
            } => throughput(&server, clients, held, seconds).await,
            Scenario::Pollers {
                clients,
                pollers,
                seconds,
            } => pollers_beside(&server, clients, pollers, seconds).await,
            Scenario::Handoff { count } => handoff(&server, count).await,
            Scenario::Memory { held, waiters } => memory(&server, held, waiters).await,
            Scenario::Latency {
                clients,
                rate,
                held,
                seconds,
            } => latency(&server, clients, rate, held, seconds).await,
            Scenario::Startup { held } => startup(&server, held).await,
            Scenario::History {
                clients,
                seconds,
                runs,
            } => history(&server, clients, seconds, runs).await,
            Scenario::Large { held, cycles } => large(&server, held, cycles).await,
            Scenario::Queue { waiters, cycles } => queue(&server, waiters, cycles).await,
            Scenario::Pool {
                clients,
                items,
                seconds,
                handoffs,
            } => pool(&server, clients, items, seconds, handoffs).await,
        }
    })
}

/// A running server on a temp state file; killed when dropped.
struct Server {
    child: Child,
    address: String,
    started_in: Duration,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(binary: &Path, held: usize) -> Result<Server, Error> {
        Server::start_with(binary, held, &[]).await
    }

    async fn start_with(
        binary: &Path,
        held: usize,
        env: &[(&str, String)],
    ) -> Result<Server, Error> {
        let dir = tempfile::tempdir()?;
        let state = dir.path().join("locker.yml");
        if held > 0 {
            write_state(&state, held)?;
        }
        let started = Instant::now();
        let mut child = Command::new(binary)
            .env("LOCKER_CONFIG", &state)
            .env("PORT", "0")
            .env("LOCKER_LISTEN", "127.0.0.1")
            .env("LOCKER_MAX_WAITERS", "100000")
            .env("RUST_LOG", "warn,locker::server=info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (found, address) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("listening on http://") {
                    let _ =
                        found.send(line[at + "listening on http://".len()..].trim().to_string());
                } else if !line.contains("listening") {
                    eprintln!("[server] {line}");
                }
            }
        });
        let address = address.recv_timeout(Duration::from_secs(30))?;
        // Ready means answering requests, not just bound.
        let mut connection = Connection::open(&address).await?;
        connection.request("GET", "/health", "").await?;
        let started_in = started.elapsed();
        Ok(Server {
            child,
            address,
            started_in,
            _dir: dir,
        })
    }

    /// CPU time the server has used so far (user + system).
    fn cpu_time(&self) -> Duration {
        proc_cpu_time(&format!("/proc/{}/stat", self.child.id()))
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(f64::NAN)
    }
}

/// CPU time (user + system) of the process whose `/proc/PID/stat` is at `path`.
fn proc_cpu_time(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let hz = 100; // USER_HZ on Linux
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a state file in the server's own format (one lock per line) with `held` locks.
fn write_state(path: &Path, held: usize) -> Result<(), Error> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    write!(
        out,
        r#"{{"format":"locker/v2","next_generation":{},"locks":{{"#,
        held + 1
    )?;
    for i in 0..held {
        let separator = if i == 0 { "" } else { "," };
        write!(
            out,
            "{separator}\n\"held-{i}\":{{\"holders\":[{{\"key\":\"prefill-key-{i}\",\"generation\":{},\
             \"acquired_at\":\"2026-11-24T12:00:00.000Z\",\"info\":{{\"team\":\"main\",\"pipeline\":\"deploy-{i}\"}},\
             \"requestors\":{{\"job-{i}\":{{\"count\":1}}}}}}]}}",
            i + 1
        )?;
    }
    writeln!(out, "\n}}}}")?;
    out.flush()?;
    Ok(())
}

/// One keep-alive HTTP/1.1 connection.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
}

impl Connection {
    async fn open(address: &str) -> Result<Connection, Error> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Connection { sender })
    }

    async fn request(&mut self, method: &str, path: &str, body: &str) -> Result<u16, Error> {
        Ok(self.exchange(method, path, body).await?.0)
    }

    /// A request's status and body.
    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<(u16, Bytes), Error> {
        self.sender.ready().await?;
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "bench")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        Ok((status, response.into_body().collect().await?.to_bytes()))
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn millis(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn startup(binary: &Path, held: usize) -> Result<(), Error> {
    let mut times = Vec::new();
    for _ in 0..5 {
        let server = Server::start(binary, held).await?;
        times.push(server.started_in);
    }
    times.sort();
    println!(
        "startup        {held} locks in the state file: median {} (min {}, max {}) from exec to first /health answer",
        millis(percentile(&times, 0.5)),
        millis(times[0]),
        millis(times[times.len() - 1])
    );
    Ok(())
}

async fn throughput(binary: &Path, clients: usize, held: usize, seconds: u64) -> Result<(), Error> {
    let server = Server::start(binary, held).await?;
    let figures = load(std::slice::from_ref(&server.address), clients, seconds).await?;
    println!(
        "throughput     {clients} clients, {held} locks held: {figures}; RSS {:.1} MiB",
        server.rss_mib()
    );
    Ok(())
}

async fn history(binary: &Path, clients: usize, seconds: u64, runs: usize) -> Result<(), Error> {
    let mut on = Vec::new();
    let mut off = Vec::new();
    for _ in 0..runs {
        for (history, rates) in [("on", &mut on), ("off", &mut off)] {
            let env = match history {
                "off" => vec![("LOCKER_HISTORY_BYTES", "0".to_string())],
                _ => Vec::new(),
            };
            let server = Server::start_with(binary, 100, &env).await?;
            let figures = load(std::slice::from_ref(&server.address), clients, seconds).await?;
            println!("history {history:<3}    {clients} clients, 100 locks held: {figures}");
            // The figures start with the rate of requests.
            let rate = figures
                .split_whitespace()
                .next()
                .and_then(|rate| rate.parse::<f64>().ok())
                .ok_or("no rate in the load's figures")?;
            rates.push(rate);
        }
    }
    let median = |rates: &mut Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let (on, off) = (median(&mut on), median(&mut off));
    println!(
        "history        median of {runs}: {on:.0} requests/s with the history, {off:.0} without ({:+.1}%)",
        (on / off - 1.0) * 100.0
    );
    Ok(())
}

async fn pollers_beside(
    binary: &Path,
    clients: usize,
    pollers: usize,
    seconds: u64,
) -> Result<(), Error> {
    const HELD: usize = 100;
    let server = Server::start(binary, HELD).await?;
    let mut polling = Vec::new();
    for i in 0..pollers {
        let address = server.address.clone();
        polling.push(tokio::spawn(async move {
            let mut connection = Connection::open(&address).await?;
            let path = format!("/lock/held-{}?wait_free=60s", i % HELD);
            loop {
                connection.request("GET", &path, "").await?;
            }
            #[allow(unreachable_code)]
            Ok::<_, Error>(())
        }));
    }
    // Every poller is waiting once the server counts them (a server that does not count
    // wait_free requests is given two seconds instead).
    let mut observer = Connection::open(&server.address).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let counting_since = Instant::now();
    loop {
        match metric(&mut observer, "locker_waiting_requests").await? {
            Some(waiting) if waiting >= pollers as f64 => break,
            None if counting_since.elapsed() > Duration::from_secs(2) => break,
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!("the {pollers} pollers never all waited").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let figures = load(std::slice::from_ref(&server.address), clients, seconds).await?;
    let wakeups = metric(&mut observer, "locker_wait_free_wakeups_total").await?;
    let wakeups = wakeups.map_or("not counted".to_string(), |w| format!("{w:.0}"));
    println!(
        "pollers        {clients} clients, {pollers} idle wait_free pollers: {figures}; poller wake-ups {wakeups}"
    );
    for task in polling {
        task.abort();
    }
    Ok(())
}

/// One unlabelled sample of `/metrics`, `None` when the server has no such metric.
async fn metric(observer: &mut Connection, name: &str) -> Result<Option<f64>, Error> {
    observer.sender.ready().await?;
    let request = hyper::Request::builder()
        .uri("/metrics")
        .header("host", "bench")
        .body(Full::new(Bytes::new()))?;
    let response = observer.sender.send_request(request).await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()))
}

async fn latency(
    binary: &Path,
    clients: usize,
    rate: u64,
    held: usize,
    seconds: u64,
) -> Result<(), Error> {
    let server = Server::start(binary, held).await?;
    let mut observer = Connection::open(&server.address).await?;
    let writes_before = writes(&mut observer).await?;
    let cpu_before = (server.cpu_time(), own_cpu_time());
    let cycles_per_client = rate as f64 / 2.0 / clients as f64;
    let period = Duration::from_secs_f64(1.0 / cycles_per_client);
    let warm_up = Duration::from_secs(1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let address = server.address.clone();
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::open(&address).await?;
            let path = format!("/lock/latency-{client}");
            let body = format!(r#"{{"key":"client-{client}"}}"#);
            // Clients spread evenly over the period, so the load is smooth.
            let offset = period.mul_f64(client as f64 / clients as f64);
            let mut schedule =
                tokio::time::interval_at(tokio::time::Instant::from_std(started + offset), period);
            schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut acquires = Vec::new();
            let mut previous_done = started;
            loop {
                let due = schedule.tick().await.into_std();
                if due >= started + warm_up + Duration::from_secs(seconds) {
                    return Ok::<_, Error>(acquires);
                }
                // The timer wakes up to a millisecond late; that lateness is not the server's.
                let sent = if previous_done > due {
                    due
                } else {
                    Instant::now()
                };
                let status = connection.request("PUT", &path, &body).await?;
                let acquired = sent.elapsed();
                let status_release = connection.request("DELETE", &path, &body).await?;
                if status != 200 || status_release != 200 {
                    return Err(format!("unexpected status {status}/{status_release}").into());
                }
                previous_done = Instant::now();
                if due >= started + warm_up {
                    acquires.push(acquired);
                }
            }
        }));
    }
    let mut acquires = Vec::new();
    for task in tasks {
        acquires.extend(task.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let server_cpu = server.cpu_time().saturating_sub(cpu_before.0);
    let bench_cpu = own_cpu_time().saturating_sub(cpu_before.1);
    let written = writes(&mut observer).await?.since(&writes_before);
    acquires.sort();
    println!(
        "latency        {clients} clients, {rate} requests/s offered, {held} locks held: {:.0} requests/s done; acquire p50 {} p99 {} p99.9 {} max {}",
        acquires.len() as f64 * 2.0 / seconds as f64,
        millis(percentile(&acquires, 0.5)),
        millis(percentile(&acquires, 0.99)),
        millis(percentile(&acquires, 0.999)),
        millis(percentile(&acquires, 1.0)),
    );
    println!(
        "               CPU (cores): server {:.2}, load client {:.2}; {written}",
        server_cpu.as_secs_f64() / elapsed,
        bench_cpu.as_secs_f64() / elapsed,
    );
    Ok(())
}

/// CPU time this process (the load client) has used so far (user + system).
fn own_cpu_time() -> Duration {
    proc_cpu_time("/proc/self/stat")
}

/// The server's durable writes so far, from `/metrics` (the `locker_state_write_*` series).
#[derive(Default)]
struct Writes {
    count: f64,
    operations: f64,
    seconds: f64,
    /// Cumulative counts by upper bound (seconds), as the histogram's buckets.
    buckets: Vec<(f64, f64)>,
}

impl Writes {
    fn since(&self, before: &Writes) -> Writes {
        Writes {
            count: self.count - before.count,
            operations: self.operations - before.operations,
            seconds: self.seconds - before.seconds,
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| {
                    let earlier = before.buckets.iter().find(|(b, _)| b == le);
                    (*le, n - earlier.map_or(0.0, |(_, m)| *m))
                })
                .collect(),
        }
    }
}

impl std::fmt::Display for Writes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.count == 0.0 {
            return write!(f, "no durable writes counted");
        }
        write!(
            f,
            "{:.0} durable writes, {:.1} operations each, {:.2} ms mean",
            self.count,
            self.operations / self.count,
            self.seconds / self.count * 1000.0
        )?;
        // The slow tail: how many writes took longer than each bound from 4 ms up.
        let slower: Vec<String> = self
            .buckets
            .iter()
            .filter(|(le, _)| *le >= 0.004 && le.is_finite())
            .map(|(le, n)| (le, self.count - n))
            .filter(|(_, n)| *n > 0.0)
            .map(|(le, n)| format!("{n:.0} over {:.0} ms", le * 1000.0))
            .collect();
        if !slower.is_empty() {
            write!(f, " ({})", slower.join(", "))?;
        }
        Ok(())
    }
}

async fn writes(observer: &mut Connection) -> Result<Writes, Error> {
    let (_, body) = observer.exchange("GET", "/metrics", "").await?;
    let mut writes = Writes::default();
    for line in String::from_utf8_lossy(&body).lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        match name {
            "locker_state_write_duration_seconds_count" => writes.count = value,
            "locker_state_write_duration_seconds_sum" => writes.seconds = value,
            "locker_state_write_batch_size_sum" => writes.operations = value,
            _ => {
                if let Some(le) = name
                    .strip_prefix("locker_state_write_duration_seconds_bucket{le=\"")
                    .and_then(|rest| rest.strip_suffix("\"}"))
                {
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse()?
                    };
                    writes.buckets.push((le, value));
                }
            }
        }
    }
    Ok(writes)
}

/// Lock+unlock cycles from `clients` clients, each on its own lock, spread over `addresses`.
async fn load(addresses: &[String], clients: usize, seconds: u64) -> Result<String, Error> {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for client in 0..clients {
        let address = addresses[client % addresses.len()].clone();
        let stop = stop.clone();
        let measuring = measuring.clone();
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::open(&address).await?;
            let path = format!("/lock/bench-{client}");
            let body = format!(r#"{{"key":"client-{client}"}}"#);
            let mut acquires = Vec::new();
            let mut releases = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let status = connection.request("PUT", &path, &body).await?;
                let acquired = started.elapsed();
                let status_release = connection.request("DELETE", &path, &body).await?;
                let released = started.elapsed() - acquired;
                if status != 200 || status_release != 200 {
                    return Err::<_, Error>(
                        format!("unexpected status {status}/{status_release}").into(),
                    );
                }
                if measuring.load(Ordering::Relaxed) {
                    acquires.push(acquired);
                    releases.push(released);
                }
            }
            Ok((acquires, releases))
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut acquires = Vec::new();
    let mut all = Vec::new();
    for task in tasks {
        let (a, r) = task.await??;
        all.extend(&a);
        all.extend(&r);
        acquires.extend(a);
    }
    acquires.sort();
    all.sort();
    Ok(format!(
        "{:.0} requests/s (lock+unlock), latency p50 {} p99 {}; acquire p50 {} p99 {}",
        all.len() as f64 / elapsed.as_secs_f64(),
        millis(percentile(&all, 0.5)),
        millis(percentile(&all, 0.99)),
        millis(percentile(&acquires, 0.5)),
        millis(percentile(&acquires, 0.99)),
    ))
}

async fn handoff(binary: &Path, count: usize) -> Result<(), Error> {
    let server = Server::start(binary, 0).await?;
    let figures = handoffs(&server.address, &server.address, count).await?;
    println!("handoff        {count} hand-offs: {figures}");
    Ok(())
}

/// Where a hand-off happens: a lock, or a pool's only item.
struct Handoff {
    /// Waiting acquire or claim (with `?wait=`).
    acquire: &'static str,
    release: &'static str,
    /// What says how many wait.
    status: &'static str,
}

const LOCK_HANDOFF: Handoff = Handoff {
    acquire: "/lock/handoff?wait=30s",
    release: "/lock/handoff",
    status: "/lock/handoff",
};

/// Pools: claim+release cycles of any item from `clients` clients on a pool of `items`, then
/// hand-offs of a one-item pool to a waiting claim.
async fn pool(
    binary: &Path,
    clients: usize,
    items: usize,
    seconds: u64,
    count: usize,
) -> Result<(), Error> {
    let server = Server::start(binary, 0).await?;
    let mut setup = Connection::open(&server.address).await?;
    for item in 0..items {
        let path = format!("/pool/bench/item/env-{item}");
        if setup
            .request(
                "POST",
                &path,
                r#"{"metadata":"url: https://env.example\n"}"#,
            )
            .await?
            != 201
        {
            return Err("adding an item was refused".into());
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for client in 0..clients {
        let address = server.address.clone();
        let (stop, measuring) = (stop.clone(), measuring.clone());
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::open(&address).await?;
            let body = format!(r#"{{"key":"client-{client}"}}"#);
            let mut cycles = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let (status, answer) = connection
                    .exchange("PUT", "/pool/bench/claim?wait=30s", &body)
                    .await?;
                let claim: serde_json::Value = serde_json::from_slice(&answer)?;
                let item = claim["item"].as_str().unwrap_or_default();
                let path = format!("/pool/bench/item/{item}/claim");
                let released = connection.request("DELETE", &path, &body).await?;
                if status != 200 || released != 200 {
                    return Err::<_, Error>(
                        format!("unexpected status {status}/{released}").into(),
                    );
                }
                if measuring.load(Ordering::Relaxed) {
                    cycles.push(started.elapsed());
                }
            }
            Ok(cycles)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut cycles = Vec::new();
    for task in tasks {
        cycles.extend(task.await??);
    }
    cycles.sort();
    println!(
        "pool           {clients} clients, pool of {items}: {:.0} requests/s (claim+release), cycle p50 {} p99 {}",
        2.0 * cycles.len() as f64 / elapsed.as_secs_f64(),
        millis(percentile(&cycles, 0.5)),
        millis(percentile(&cycles, 0.99)),
    );
    let one = Handoff {
        acquire: "/pool/handoff/claim?wait=30s",
        release: "/pool/handoff/item/only/claim",
        status: "/pool/handoff",
    };
    if setup
        .request("POST", "/pool/handoff/item/only", r#"{"metadata":""}"#)
        .await?
        != 201
    {
        return Err("adding the hand-off item was refused".into());
    }
    let figures = handoffs_of(&one, &server.address, &server.address, count).await?;
    println!("pool handoff   {count} hand-offs: {figures}");
    Ok(())
}

/// Ping-pong of one lock between two clients, the holder on `first`, the waiter on `second`
/// (then the other way round).
async fn handoffs(first: &str, second: &str, count: usize) -> Result<String, Error> {
    handoffs_of(&LOCK_HANDOFF, first, second, count).await
}

/// Ping-pong of what `at` names between two clients.
async fn handoffs_of(
    at: &Handoff,
    first: &str,
    second: &str,
    count: usize,
) -> Result<String, Error> {
    let mut holder = Connection::open(first).await?;
    let mut observer = Connection::open(first).await?;
    let mut waiter = Some(Connection::open(second).await?);
    let (mut holder_key, mut waiter_key) = ("a", "b");
    if holder.request("PUT", at.acquire, r#"{"key":"a"}"#).await? != 200 {
        return Err("first acquire refused".into());
    }
    let mut handoffs: Vec<Duration> = Vec::with_capacity(count);
    let mut end_to_end = Vec::with_capacity(count);
    for _ in 0..count {
        let mut connection = waiter.take().ok_or("no waiter connection")?;
        let body = format!(r#"{{"key":"{waiter_key}"}}"#);
        let acquire = at.acquire;
        let waiting = tokio::spawn(async move {
            let status = connection.request("PUT", acquire, &body).await;
            (status, Instant::now(), connection)
        });
        // Release only once the waiter is queued, so each hand-off is a real one.
        loop {
            let status = observer_waiters(&mut observer, at.status).await?;
            if status >= 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let release = format!(r#"{{"key":"{holder_key}"}}"#);
        let release_sent = Instant::now();
        if holder.request("DELETE", at.release, &release).await? != 200 {
            return Err("release refused".into());
        }
        let released = Instant::now();
        let (status, granted, connection) = waiting.await?;
        if status? != 200 {
            return Err("waiter was not granted".into());
        }
        handoffs.push(granted.saturating_duration_since(released));
        end_to_end.push(granted.saturating_duration_since(release_sent));
        // The old holder becomes the next waiter.
        waiter = Some(std::mem::replace(&mut holder, connection));
        std::mem::swap(&mut holder_key, &mut waiter_key);
    }
    handoffs.sort();
    end_to_end.sort();
    Ok(format!(
        "release answered → next waiter's 200 received: p50 {} p99 {} max {}; release sent → next waiter's 200 (includes the durable write): p50 {} p99 {}",
        millis(percentile(&handoffs, 0.5)),
        millis(percentile(&handoffs, 0.99)),
        millis(handoffs[handoffs.len() - 1]),
        millis(percentile(&end_to_end, 0.5)),
        millis(percentile(&end_to_end, 0.99)),
    ))
}

async fn observer_waiters(observer: &mut Connection, status: &str) -> Result<u64, Error> {
    observer.sender.ready().await?;
    let request = hyper::Request::builder()
        .method("GET")
        .uri(status)
        .header("host", "bench")
        .body(Full::new(Bytes::new()))?;
    let response = observer.sender.send_request(request).await?;
    let body = response.into_body().collect().await?.to_bytes();
    let status: serde_json::Value = serde_json::from_slice(&body)?;
    Ok(status["waiters"].as_u64().unwrap_or(0))
}

async fn memory(binary: &Path, held: usize, waiters: usize) -> Result<(), Error> {
    let server = Server::start(binary, held).await?;
    let idle = server.rss_mib();
    let mut tasks = Vec::new();
    for i in 0..waiters {
        let address = server.address.clone();
        let lock = i % held.max(1);
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::open(&address).await?;
            let body = format!(r#"{{"key":"waiter-{i}"}}"#);
            connection
                .request("PUT", &format!("/lock/held-{lock}?wait=60s"), &body)
                .await
        }));
    }
    wait_for_waiters(&server, waiters).await?;
    println!(
        "memory         {held} locks held: RSS {idle:.1} MiB idle, {:.1} MiB with {waiters} waiting requests",
        server.rss_mib()
    );
    drop(server);
    for task in tasks {
        task.abort();
    }
    Ok(())
}

async fn large(binary: &Path, held: usize, cycles: usize) -> Result<(), Error> {
    let room = ("LOCKER_MAX_LOCKS", (held + 1_000).to_string());
    for journal in [None, Some(16 << 20)] {
        let mut env = vec![room.clone()];
        if let Some(bytes) = journal {
            env.push(("LOCKER_JOURNAL_BYTES", format!("{bytes}")));
        }
        let server = Server::start_with(binary, held, &env).await?;
        let mut connection = Connection::open(&server.address).await?;
        let body = r#"{"key":"large-bench"}"#;
        let mut acquires = Vec::new();
        let cpu_before = server.cpu_time();
        let started = Instant::now();
        for _ in 0..cycles {
            let sent = Instant::now();
            let status = connection.request("PUT", "/lock/large-bench", body).await?;
            acquires.push(sent.elapsed());
            let released = connection
                .request("DELETE", "/lock/large-bench", body)
                .await?;
            if status != 200 || released != 200 {
                return Err(format!("unexpected status {status}/{released}").into());
            }
        }
        let elapsed = started.elapsed();
        let cpu = server.cpu_time().saturating_sub(cpu_before);
        acquires.sort();
        let mode = if journal.is_some() {
            "journal on "
        } else {
            "journal off"
        };
        println!(
            "large          {held} locks held, {mode}: acquire of another lock p50 {} p99 {}; \
             server CPU {:.2} ms per request ({cycles} lock+unlock cycles in {:.1} s)",
            millis(percentile(&acquires, 0.5)),
            millis(percentile(&acquires, 0.99)),
            cpu.as_secs_f64() * 1000.0 / (2 * cycles) as f64,
            elapsed.as_secs_f64(),
        );
        if journal.is_some() {
            continue;
        }
        for path in ["/locks?limit=200", "/locks"] {
            let cpu_before = server.cpu_time();
            let mut times = Vec::new();
            let mut size = 0;
            for _ in 0..5 {
                let sent = Instant::now();
                let (status, bytes) = connection.exchange("GET", path, "").await?;
                times.push(sent.elapsed());
                if status != 200 {
                    return Err(format!("GET {path} answered {status}").into());
                }
                size = bytes.len();
            }
            let cpu = server.cpu_time().saturating_sub(cpu_before);
            times.sort();
            println!(
                "large          {held} locks held: GET {path} median {} ({:.1} MiB, server CPU {:.0} ms each)",
                millis(percentile(&times, 0.5)),
                size as f64 / (1 << 20) as f64,
                cpu.as_secs_f64() * 1000.0 / 5.0,
            );
        }
        println!(
            "large          {held} locks held: RSS {:.1} MiB",
            server.rss_mib()
        );
    }
    Ok(())
}

/// Waits until the server counts `waiters` queued waiters; asks the cheap /metrics, not /locks,
/// so the observer does not inflate what it measures.
async fn wait_for_waiters(server: &Server, waiters: usize) -> Result<(), Error> {
    let mut observer = Connection::open(&server.address).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, body) = observer.exchange("GET", "/metrics", "").await?;
        let text = String::from_utf8_lossy(&body);
        let queued = text
            .lines()
            .find_map(|l| l.strip_prefix("locker_waiters "))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if queued >= waiters {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("only {queued} of {waiters} waiters queued").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The rules alone: `waiters` waiters queue on one lock, one per batch, with the committed copy
/// taken after each batch as the file store does. Prints the cost of an enqueue at the start
/// and at the end of the queue: equal when queueing costs O(1), growing when each batch copies
/// the queue.
fn queue_in_rules(waiters: usize) {
    use locker::rules::{Acquire, Info, LockTable};
    let request = |key: String| Acquire {
        key,
        requestor: "job".into(),
        ttl: None,
        info: Info::new(),
        slots: None,
        release_with_build: None,
        renew: false,
    };
    let now = std::time::SystemTime::now();
    let mut working = LockTable::default();
    working.acquire("one", request("holder".into()), now, None);
    let mut committed = working.clone();
    let tenth = (waiters / 10).max(1);
    let mut tenths = Vec::new();
    let mut started = Instant::now();
    for i in 0..waiters {
        working.acquire("one", request(format!("waiter-{i}")), now, Some(i as u64));
        // What a commit does: readers get a copy that shares the locks.
        committed = working.clone();
        if (i + 1) % tenth == 0 {
            tenths.push(started.elapsed() / tenth as u32);
            started = Instant::now();
        }
    }
    drop(committed);
    let micros = |d: &Duration| format!("{:.2} µs", d.as_secs_f64() * 1e6);
    println!(
        "queue (rules)  {waiters} waiters on one lock, one per batch: an enqueue costs {} among the first tenth, {} among the last",
        tenths.first().map(micros).unwrap_or_default(),
        tenths.last().map(micros).unwrap_or_default(),
    );
}

async fn queue(binary: &Path, waiters: usize, cycles: usize) -> Result<(), Error> {
    queue_in_rules(10_000);
    let server = Server::start(binary, 0).await?;
    let mut connection = Connection::open(&server.address).await?;
    let status = connection
        .request("PUT", "/lock/one", r#"{"key":"holder"}"#)
        .await?;
    if status != 200 {
        return Err(format!("the first acquire answered {status}").into());
    }
    let cpu_before = server.cpu_time();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..waiters {
        let address = server.address.clone();
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::open(&address).await?;
            let body = format!(r#"{{"key":"waiter-{i}"}}"#);
            connection
                .request("PUT", "/lock/one?wait=300s", &body)
                .await
        }));
    }
    wait_for_waiters(&server, waiters).await?;
    let queued_in = started.elapsed();
    let cpu = server.cpu_time().saturating_sub(cpu_before);
    let mut acquires = Vec::new();
    for _ in 0..cycles {
        let sent = Instant::now();
        let status = connection
            .request("PUT", "/lock/beside", "{\"key\":\"k\"}")
            .await?;
        acquires.push(sent.elapsed());
        let released = connection
            .request("DELETE", "/lock/beside", "{\"key\":\"k\"}")
            .await?;
        if status != 200 || released != 200 {
            return Err(format!("unexpected status {status}/{released}").into());
        }
    }
    acquires.sort();
    println!(
        "queue          {waiters} waiters on one lock: queued in {:.2} s, server CPU {:.0} µs per waiter; \
         lock+unlock of another lock beside them: acquire p50 {} p99 {}",
        queued_in.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / waiters as f64,
        millis(percentile(&acquires, 0.5)),
        millis(percentile(&acquires, 0.99)),
    );
    drop(server);
    for task in tasks {
        task.abort();
    }
    Ok(())
}

/// A 3-member etcd cluster on loopback ports with temp data dirs; killed when dropped.
#[cfg(feature = "etcd")]
struct EtcdCluster {
    members: Vec<Child>,
    endpoints: String,
    _dir: tempfile::TempDir,
}

#[cfg(feature = "etcd")]
impl EtcdCluster {
    async fn start() -> Result<EtcdCluster, Error> {
        let dir = tempfile::tempdir()?;
        let ports: Vec<(u16, u16)> = (0..3)
            .map(|_| Ok::<_, Error>((free_port()?, free_port()?)))
            .collect::<Result<_, _>>()?;
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let child = Command::new("etcd")
                .args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(dir.path().join(format!("m{i}")))
                .args([
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                ])
                .args(["--initial-cluster", &initial.join(",")])
                .args([
                    "--initial-cluster-state",
                    "new",
                    "--log-level",
                    "error",
                    "--logger",
                    "zap",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start etcd (install Debian's etcd-server): {e}"))?;
            members.push(child);
        }
        let endpoints: Vec<String> = ports
            .iter()
            .map(|(client, _)| format!("http://127.0.0.1:{client}"))
            .collect();
        // Healthy when every member answers its health check.
        let deadline = Instant::now() + Duration::from_secs(30);
        for (client, _) in &ports {
            loop {
                let healthy = match Connection::open(&format!("127.0.0.1:{client}")).await {
                    Ok(mut c) => c.request("GET", "/health", "").await.ok() == Some(200),
                    Err(_) => false,
                };
                if healthy {
                    break;
                }
                if Instant::now() > deadline {
                    return Err("etcd did not become healthy".into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(EtcdCluster {
            members,
            endpoints: endpoints.join(","),
            _dir: dir,
        })
    }
}

#[cfg(feature = "etcd")]
impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            let _ = member.kill();
            let _ = member.wait();
        }
    }
}

#[cfg(feature = "etcd")]
fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(feature = "etcd")]
async fn etcd(binary: &Path, clients: usize, seconds: u64, count: usize) -> Result<(), Error> {
    let cluster = EtcdCluster::start().await?;
    let env = [
        ("LOCKER_STORE", "etcd".to_string()),
        ("LOCKER_ETCD_ENDPOINTS", cluster.endpoints.clone()),
    ];
    let first = Server::start_with(binary, 0, &env).await?;
    let second = Server::start_with(binary, 0, &env).await?;
    let addresses = [first.address.clone(), second.address.clone()];
    let figures = load(&addresses, clients, seconds).await?;
    println!("etcd           {clients} clients over 2 replicas, 3 etcd members: {figures}");
    let figures = handoffs(&first.address, &second.address, count).await?;
    println!("etcd handoff   {count} hand-offs between 2 replicas: {figures}");
    Ok(())
}
