//! `locker lock NAME -- CMD...`: wait for the lock, run the command while holding it, renew the
//! lease in the background, forward signals, release when the command exits.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use locker_client::duration::WireDuration;
use locker_client::wire::LockRequest;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::http::{Connection, Reply, refused};
use super::show::describe_holder;
use super::{Failure, LockArgs, exit};
use locker_client::longpoll::DEFAULT_POLL as POLL;
use locker_client::{Abort, Error, Outcome};

/// Shortest pause between renewals, whatever the TTL.
const MIN_RENEWAL: Duration = Duration::from_millis(200);

/// The signals `locker lock` handles: while waiting they stop the wait, while the command runs
/// they are forwarded to it.
struct Signals {
    streams: Vec<(i32, &'static str, Signal)>,
}

impl Signals {
    fn new() -> Result<Signals, Failure> {
        let mut streams = Vec::new();
        for (number, name, kind) in [
            (libc::SIGINT, "SIGINT", SignalKind::interrupt()),
            (libc::SIGTERM, "SIGTERM", SignalKind::terminate()),
            (libc::SIGHUP, "SIGHUP", SignalKind::hangup()),
        ] {
            let stream = signal(kind)
                .map_err(|e| Failure::new(exit::USAGE, format!("cannot listen for {name}: {e}")))?;
            streams.push((number, name, stream));
        }
        Ok(Signals { streams })
    }

    /// The next signal: its number and name.
    async fn next(&mut self) -> (i32, &'static str) {
        let waits = self.streams.iter_mut().map(|(number, name, stream)| {
            let (number, name) = (*number, *name);
            Box::pin(async move {
                stream.recv().await;
                (number, name)
            })
        });
        futures_util::future::select_all(waits).await.0
    }
}

/// Something unique to this invocation: host, pid and start time.
fn invocation_id() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most buffer.len() bytes into our buffer.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    let host = if result == 0 {
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    } else {
        "localhost".to_string()
    };
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("{host}/{}/{millis}", std::process::id())
}

/// What is sent with the acquire (and every renewal).
struct Holding {
    name: String,
    key: String,
    requestor: String,
    body: LockRequest,
}

fn command_line(args: &LockArgs) -> String {
    args.command
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Holder info: who runs what, within the server's limits.
fn info(args: &LockArgs, id: &str) -> BTreeMap<String, String> {
    let mut command = command_line(args);
    if locker_client::limits::truncate(&mut command, 300) {
        command.push('…');
    }
    let mut info = BTreeMap::new();
    info.insert("client".to_string(), "locker lock".to_string());
    info.insert("invocation".to_string(), id.chars().take(300).collect());
    info.insert("command".to_string(), command);
    if let Ok(user) = std::env::var("USER") {
        info.insert("user".to_string(), user.chars().take(100).collect());
    }
    info
}

pub async fn run(connection: Connection, args: LockArgs) -> Result<u8, Failure> {
    let mut signals = Signals::new()?;
    let id = invocation_id();
    let key = args.key.clone().unwrap_or_else(|| id.clone());
    let requestor = args.requestor.clone().unwrap_or_else(|| id.clone());
    let body = LockRequest {
        key: key.clone(),
        requestor: Some(requestor.clone()),
        info: Some(info(&args, &id)),
        ttl: (!args.ttl.is_zero()).then_some(WireDuration(args.ttl)),
        slots: args.slots,
        ..LockRequest::default()
    };
    let holding = Holding {
        name: args.name.clone(),
        key,
        requestor,
        body,
    };

    // Wait for the lock, stopping at once on a signal.
    let abort = Abort::default();
    let generation = tokio::select! {
        result = acquire(&connection, &holding, &args, &abort) => result?,
        (_, signal) = signals.next() => {
            // The request in flight is dropped, so the server withdraws the waiter; a grant
            // that raced with the signal is released here.
            let outcome = match abort.take() {
                None => "holding nothing".to_string(),
                Some(pending) => match pending.release().await {
                    Some(Ok(reply)) if reply.status == StatusCode::OK => {
                        "holding nothing".to_string()
                    }
                    Some(Ok(reply)) => format!("release answered {}", reply.error_message()),
                    Some(Err(error)) => {
                        format!("could not make sure: {}", connection.failure(error).message)
                    }
                    None => "could not make sure: the release timed out".to_string(),
                },
            };
            return Err(Failure::new(
                128 + signal_number(signal),
                format!(
                    "stopped by {signal} while waiting for lock {:?}; {outcome}",
                    holding.name
                ),
            ));
        }
    };

    let status = run_command(&connection, &holding, &args, generation, &mut signals).await;
    // Whatever happened, give the lock back (a lost lock answers "not held" or wrong key).
    release(&connection, &holding).await;
    status
}

fn signal_number(name: &str) -> u8 {
    match name {
        "SIGINT" => libc::SIGINT as u8,
        "SIGHUP" => libc::SIGHUP as u8,
        _ => libc::SIGTERM as u8,
    }
}

/// Takes the lock: a first try without waiting, then long-polls until granted or `--wait`
/// runs out. Returns the grant's generation.
async fn acquire(
    connection: &Connection,
    holding: &Holding,
    args: &LockArgs,
    abort: &Abort,
) -> Result<u64, Failure> {
    let name = &holding.name;
    let started = Instant::now();
    let limit = args.wait.and_then(|w| w.0);
    let request = locker_client::acquire::Request {
        name,
        body: &holding.body,
        deadline: limit.map(|l| started + l),
        poll: POLL,
        fallback_pause: Duration::from_secs(1),
    };
    let mut waiting = Waiting {
        connection,
        name,
        told: false,
        holder: String::new(),
    };
    let outcome =
        locker_client::acquire::acquire(connection.client(), &request, abort, &mut waiting)
            .await
            .map_err(|e| connection.failure(e))?;
    match outcome {
        Outcome::Granted(reply) => {
            let generation = reply
                .body
                .get("generation")
                .and_then(Value::as_u64)
                .unwrap_or_default();
            if waiting.told {
                eprintln!(
                    "locker: acquired lock {name:?} after {} (generation {generation})",
                    short(started.elapsed())
                );
            }
            Ok(generation)
        }
        Outcome::TimedOut(_) => {
            let waited = if limit == Some(Duration::ZERO) {
                "(no --wait)".to_string()
            } else {
                format!("after waiting {}", short(started.elapsed()))
            };
            Err(Failure::new(
                exit::HELD,
                format!("lock {name:?} is held by {} {waited}", waiting.holder),
            ))
        }
        Outcome::Refused(reply) if reply.status == StatusCode::CONFLICT => Err(refused(
            &reply,
            &format!("cannot lock {name:?} (--slots must match the lock's)"),
        )),
        Outcome::Refused(reply) => Err(refused(&reply, &format!("cannot lock {name:?}"))),
    }
}

/// The CLI's part in the shared acquire loop: one line when the wait begins, naming the holder,
/// and riding out a server restart for a little while (each request is tried once).
struct Waiting<'a> {
    connection: &'a Connection,
    name: &'a str,
    /// Whether the "waiting for lock" line was written.
    told: bool,
    /// The holder when time ran out, for the message.
    holder: String,
}

impl locker_client::acquire::Hooks for Waiting<'_> {
    async fn held(&mut self, _reply: &Reply, out_of_time: bool) {
        if out_of_time {
            self.holder = holder_of(self.connection, self.name).await;
        } else if !self.told {
            eprintln!(
                "locker: waiting for lock {:?}, held by {}",
                self.name,
                holder_of(self.connection, self.name).await
            );
            self.told = true;
        }
    }

    fn unreachable(&mut self, error: &Error, failures: u32) -> Option<Duration> {
        if failures > 5 {
            return None;
        }
        let pause = Duration::from_millis(500) * (1 << failures);
        let message = self.connection.failure(error.clone()).message;
        eprintln!("locker: {message}; retrying in {pause:?}");
        Some(pause)
    }
}

async fn holder_of(connection: &Connection, name: &str) -> String {
    match connection.status(name, None).await {
        Ok(reply) if reply.status == StatusCode::OK => describe_holder(&reply.body),
        _ => "someone".to_string(),
    }
}

fn short(duration: Duration) -> String {
    humantime::format_duration(Duration::from_millis(duration.as_millis() as u64)).to_string()
}

/// Why the lock was lost.
struct Lost(String);

/// Renews the lease every third of the TTL by acquiring again with `"renew": true` (same key
/// and requestor: the server refreshes the lease without counting up). Returns only when the
/// lock is lost.
async fn renew(connection: Connection, holding: Holding, ttl: Duration, generation: u64) -> Lost {
    let interval = (ttl / 3).max(MIN_RENEWAL);
    // The lease runs from the last renewal the server accepted; counted from when it was sent.
    let mut renewed_at = Instant::now();
    let mut next = renewed_at + interval;
    let connection = connection.with_timeout(interval.max(Duration::from_secs(1)));
    let body = LockRequest {
        renew: true,
        ..holding.body.clone()
    };
    loop {
        tokio::time::sleep_until(next.into()).await;
        let expires = renewed_at + ttl;
        let sent = Instant::now();
        if sent >= expires {
            return Lost(format!(
                "its lease ({}) ran out while the server could not be reached",
                short(ttl)
            ));
        }
        let attempt = tokio::time::timeout(
            expires - sent,
            connection.acquire(&holding.name, &body, None),
        )
        .await;
        match attempt {
            Ok(Ok(reply)) if reply.status == StatusCode::OK => {
                let granted = reply.body.get("generation").and_then(Value::as_u64);
                if granted.is_some_and(|g| g != generation) {
                    return Lost(format!(
                        "it expired and was granted anew (generation {generation} → {}): \
                         someone else may have held it in between",
                        granted.unwrap_or_default()
                    ));
                }
                renewed_at = sent;
                next = sent + interval;
            }
            Ok(Ok(reply)) => {
                return Lost(format!(
                    "the renewal was refused ({}: {})",
                    reply.status,
                    reply.error_message()
                ));
            }
            Ok(Err(failure)) => {
                eprintln!("locker: cannot renew the lease: {}", failure.message);
                next = (Instant::now() + interval.min(Duration::from_secs(1))).min(expires);
            }
            Err(_) => next = Instant::now(),
        }
    }
}

/// Runs the command while holding the lock. Returns the exit code for locker.
async fn run_command(
    connection: &Connection,
    holding: &Holding,
    args: &LockArgs,
    generation: u64,
    signals: &mut Signals,
) -> Result<u8, Failure> {
    let Some((program, rest)) = args.command.split_first() else {
        return Err(Failure::new(exit::USAGE, "no command given after --"));
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(rest)
        .env("LOCKER_LOCK_NAME", &holding.name)
        .env("LOCKER_LOCK_KEY", &holding.key)
        .env("LOCKER_LOCK_REQUESTOR", &holding.requestor)
        .env("LOCKER_LOCK_GENERATION", generation.to_string());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                exit::NOT_FOUND
            } else {
                exit::CANNOT_RUN
            };
            return Err(Failure::new(
                code,
                format!("cannot run {}: {e}", program.to_string_lossy()),
            ));
        }
    };
    let pid = child.id();
    let send = |signal: i32| {
        if let Some(pid) = pid {
            // SAFETY: kill(2) on our own child's pid, which is not reaped before this returns
            // (tokio reaps it only in `wait`, which we have not seen complete).
            unsafe { libc::kill(pid as i32, signal) };
        }
    };

    let renewal = if args.ttl.is_zero() {
        None
    } else {
        Some(tokio::spawn(renew(
            connection.clone(),
            Holding {
                name: holding.name.clone(),
                key: holding.key.clone(),
                requestor: holding.requestor.clone(),
                body: holding.body.clone(),
            },
            args.ttl,
            generation,
        )))
    };
    let lost_lock = async {
        match renewal {
            Some(task) => task.await.ok(),
            None => std::future::pending().await,
        }
    };
    tokio::pin!(lost_lock);

    let lost = loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|e| {
                    Failure::new(exit::CANNOT_RUN, format!("cannot wait for the command: {e}"))
                })?;
                return Ok(exit_code(status));
            }
            (number, name) = signals.next() => {
                eprintln!("locker: forwarding {name} to the command; the lock is released once it exits");
                send(number);
            }
            lost = &mut lost_lock => {
                break lost.map_or_else(|| "the renewal task failed".to_string(), |l| l.0);
            }
        }
    };

    eprintln!(
        "locker: lost lock {:?}: {lost}; sending SIGTERM to the command",
        holding.name
    );
    send(libc::SIGTERM);
    let grace = tokio::time::sleep(args.grace);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            _ = child.wait() => break,
            (number, _) = signals.next() => send(number),
            _ = &mut grace => {
                eprintln!(
                    "locker: the command is still running after {}: sending SIGKILL",
                    short(args.grace)
                );
                let _ = child.kill().await;
                break;
            }
        }
    }
    Err(Failure::new(
        exit::LOST,
        format!("lost lock {:?} while the command ran: {lost}", holding.name),
    ))
}

/// The command's exit status as locker's: its code, or 128+N when killed by signal N.
fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(signal)) => (128 + signal).clamp(0, 255) as u8,
        (None, None) => 1,
    }
}

/// Releases the lock, retrying a few times if the server cannot be reached; the lease ends it
/// otherwise.
async fn release(connection: &Connection, holding: &Holding) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match connection
            .release(&holding.name, &holding.body.release(), false)
            .await
        {
            Ok(reply) if reply.status == StatusCode::OK => return,
            Ok(reply) => {
                eprintln!(
                    "locker: releasing lock {:?}: the server answered {}",
                    holding.name,
                    reply.error_message()
                );
                return;
            }
            Err(failure) if attempt < 4 && failure.code == exit::UNREACHABLE => {
                tokio::time::sleep(Duration::from_millis(250) * attempt).await;
            }
            Err(failure) => {
                eprintln!(
                    "locker: could not release lock {:?}: {} (its lease ends it)",
                    holding.name, failure.message
                );
                return;
            }
        }
    }
}
