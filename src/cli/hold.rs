//! Holding something while a command runs, for `locker lock` (a lock) and `locker pool
//! acquire` (a pool's item): wait for it (the shared long-poll loop of `locker-client`,
//! stopping at once on a signal and giving back a grant that raced with it), run the command
//! with what was granted in its environment, renew the lease in the background, forward
//! signals, and give it back when the command exits.

use std::ffi::OsString;
use std::time::{Duration, Instant, SystemTime};

use locker_client::acquire::{Hooks, Request};
use locker_client::longpoll::DEFAULT_POLL as POLL;
use locker_client::wire::{Info, LockGrant, LockRequest, LockStatus, PoolStatus};
use locker_client::{Abort, Error, Outcome, Target};
use reqwest::StatusCode;
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::http::{Connection, Reply, refused};
use super::show::{describe_holding, describe_lock};
use super::{Failure, exit};

/// Shortest pause between renewals, whatever the TTL.
const MIN_RENEWAL: Duration = Duration::from_millis(200);

/// The signals `locker lock` and `locker pool acquire` handle: while waiting they stop the
/// wait, while the command runs they are forwarded to it.
pub struct Signals {
    streams: Vec<(i32, &'static str, Signal)>,
}

impl Signals {
    pub fn new() -> Result<Signals, Failure> {
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
pub fn invocation_id() -> String {
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

/// Holder info sent with an acquire: which client, this invocation, the command (shortened)
/// and the user, within the server's limits.
pub fn info(client: &str, id: &str, command: &[OsString]) -> Info {
    let mut line = command
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    if locker_client::limits::truncate(&mut line, 300) {
        line.push('…');
    }
    let mut info = Info::new();
    info.insert("client".to_string(), client.to_string());
    info.insert("invocation".to_string(), id.chars().take(300).collect());
    if !line.is_empty() {
        info.insert("command".to_string(), line);
    }
    if let Ok(user) = std::env::var("USER") {
        info.insert("user".to_string(), user.chars().take(100).collect());
    }
    info
}

/// What to take and how: the target, the body sent with the acquire (its key and requestor
/// give it back), and how long to wait (`None`: without limit).
pub struct Holding {
    pub target: Target,
    pub body: LockRequest,
    pub wait: Option<Duration>,
}

/// What was granted: the holding with its target made definite (the item granted, for a
/// claim of any item), the fencing generation and the server's answer.
pub struct Held {
    pub holding: Holding,
    pub generation: u64,
    pub reply: Reply,
}

/// Takes what `holding` asks for: a first try without waiting, then long-polls until granted
/// or its wait runs out. A signal stops the wait at once: the request in flight is dropped (the
/// server withdraws a waiter whose connection closes), a grant that raced with the signal is
/// given back, and locker exits 128+N.
pub async fn take(
    connection: &Connection,
    holding: Holding,
    signals: &mut Signals,
) -> Result<Held, Failure> {
    let abort = Abort::default();
    let granted = tokio::select! {
        result = acquire(connection, &holding, &abort) => result?,
        (_, signal) = signals.next() => {
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
                    "stopped by {signal} while waiting for {}; {outcome}",
                    holding.target
                ),
            ));
        }
    };
    let generation = generation_of(&granted).unwrap_or_default();
    Ok(Held {
        holding: Holding {
            target: holding.target.granted(&granted),
            ..holding
        },
        generation,
        reply: granted,
    })
}

/// The fencing token of a grant (a lock's [`LockGrant`], a claim's [`ItemClaim`]: both name
/// it `generation`); `None` from the original server, which sends none.
///
/// [`ItemClaim`]: locker_client::wire::ItemClaim
fn generation_of(grant: &Reply) -> Option<u64> {
    grant.parse::<LockGrant>().and_then(|g| g.generation)
}

fn signal_number(name: &str) -> u8 {
    match name {
        "SIGINT" => libc::SIGINT as u8,
        "SIGHUP" => libc::SIGHUP as u8,
        _ => libc::SIGTERM as u8,
    }
}

/// The shared acquire loop with the CLI's hooks; the grant's answer, or the failure for
/// anything else.
async fn acquire(
    connection: &Connection,
    holding: &Holding,
    abort: &Abort,
) -> Result<Reply, Failure> {
    let target = &holding.target;
    let started = Instant::now();
    let request = Request {
        target,
        body: &holding.body,
        deadline: holding.wait.map(|l| started + l),
        poll: POLL,
        fallback_pause: Duration::from_secs(1),
    };
    let mut waiting = Waiting {
        connection,
        target,
        told: false,
        busy: String::new(),
    };
    let outcome =
        locker_client::acquire::acquire(connection.client(), &request, abort, &mut waiting)
            .await
            .map_err(|e| connection.failure(e))?;
    match outcome {
        Outcome::Granted(reply) => {
            if waiting.told {
                let generation = generation_of(&reply);
                eprintln!(
                    "locker: took {} after {} (generation {})",
                    target.granted(&reply),
                    short(started.elapsed()),
                    generation.unwrap_or_default()
                );
            }
            Ok(reply)
        }
        Outcome::TimedOut(_) => {
            let waited = if holding.wait == Some(Duration::ZERO) {
                "(no --wait)".to_string()
            } else {
                format!("after waiting {}", short(started.elapsed()))
            };
            Err(Failure::new(
                exit::HELD,
                format!("could not take {target} {waited}: {}", waiting.busy),
            ))
        }
        Outcome::Refused(reply) if reply.status == StatusCode::CONFLICT => Err(refused(
            &reply,
            &format!("cannot take {target} (--slots must match the lock's)"),
        )),
        Outcome::Refused(reply) => Err(refused(&reply, &format!("cannot take {target}"))),
    }
}

/// The CLI's part in the shared acquire loop: one line when the wait begins, saying who holds
/// what it waits for, and riding out a server restart for a little while (each request is
/// tried once).
struct Waiting<'a> {
    connection: &'a Connection,
    target: &'a Target,
    /// Whether the "waiting for" line was written.
    told: bool,
    /// Who held it when time ran out, for the message.
    busy: String,
}

impl Hooks for Waiting<'_> {
    async fn held(&mut self, _reply: &Reply, out_of_time: bool) {
        if out_of_time {
            self.busy = busy(self.connection, self.target).await;
        } else if !self.told {
            eprintln!(
                "locker: waiting for {}, {}",
                self.target,
                busy(self.connection, self.target).await
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

/// Why the target cannot be taken now, e.g. `held by key "k" (requestors: r) since ...` or
/// `all 4 items are claimed`.
async fn busy(connection: &Connection, target: &Target) -> String {
    match target {
        Target::Lock(name) => match connection.status(name, None).await {
            Ok(reply) if reply.status == StatusCode::OK => match reply.parse::<LockStatus>() {
                Some(status) => format!("held by {}", describe_lock(&status.lock)),
                None => "held by someone (its status is unreadable)".to_string(),
            },
            _ => "held by someone".to_string(),
        },
        Target::Pool { pool, item } => {
            let status = connection.client().pool(pool).await.ok();
            let status = status.and_then(|r| r.parse::<PoolStatus>());
            match (status, item) {
                (Some(status), Some(item)) => status
                    .items
                    .into_iter()
                    .find(|i| i.name == *item)
                    .and_then(|i| i.holder)
                    .map_or("claimed by someone".to_string(), |holder| {
                        format!("claimed by {}", describe_holding(&holder))
                    }),
                (Some(status), None) => format!(
                    "all {} items are claimed ({} claims waiting)",
                    status.items.len(),
                    status.waiters
                ),
                (None, _) => "claimed by someone".to_string(),
            }
        }
    }
}

fn short(duration: Duration) -> String {
    humantime::format_duration(Duration::from_millis(duration.as_millis() as u64)).to_string()
}

/// Why the holding was lost.
struct Lost(String);

/// Renews the lease every third of the TTL by asking again with `"renew": true` (same key and
/// requestor: the server refreshes the lease without counting up). Returns only when the
/// holding is lost.
async fn renew(
    connection: Connection,
    target: Target,
    body: LockRequest,
    ttl: Duration,
    generation: u64,
) -> Lost {
    let interval = (ttl / 3).max(MIN_RENEWAL);
    // The lease runs from the last renewal the server accepted; counted from when it was sent.
    let mut renewed_at = Instant::now();
    let mut next = renewed_at + interval;
    let connection = connection.with_timeout(interval.max(Duration::from_secs(1)));
    let body = LockRequest {
        renew: true,
        ..body
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
        let attempt =
            tokio::time::timeout(expires - sent, target.ask(connection.client(), &body, None))
                .await;
        match attempt {
            Ok(Ok(reply)) if reply.status == StatusCode::OK => {
                let granted = generation_of(&reply);
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
            Ok(Err(error)) => {
                let failure = connection.failure(error);
                eprintln!("locker: cannot renew the lease: {}", failure.message);
                next = (Instant::now() + interval.min(Duration::from_secs(1))).min(expires);
            }
            Err(_) => next = Instant::now(),
        }
    }
}

/// How to run the command while holding: the command, what it finds in its environment, the
/// lease to renew (zero: none) and the grace between SIGTERM and SIGKILL when the holding is
/// lost.
pub struct Run<'a> {
    pub command: &'a [OsString],
    pub env: Vec<(String, OsString)>,
    pub ttl: Duration,
    pub grace: Duration,
}

/// Runs the command while holding, then gives back what is held whatever happened (a lost
/// holding answers "not held" or wrong key). Returns the exit code for locker: the command's.
pub async fn run_and_release(
    connection: &Connection,
    held: &Held,
    run: Run<'_>,
    signals: &mut Signals,
) -> Result<u8, Failure> {
    let status = run_command(connection, held, &run, signals).await;
    release(connection, &held.holding).await;
    status
}

async fn run_command(
    connection: &Connection,
    held: &Held,
    run: &Run<'_>,
    signals: &mut Signals,
) -> Result<u8, Failure> {
    let Some((program, rest)) = run.command.split_first() else {
        return Err(Failure::new(exit::USAGE, "no command given after --"));
    };
    let mut command = tokio::process::Command::new(program);
    command.args(rest).envs(run.env.iter().map(|(k, v)| (k, v)));
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

    let target = &held.holding.target;
    let renewal = (!run.ttl.is_zero()).then(|| {
        tokio::spawn(renew(
            connection.clone(),
            target.clone(),
            held.holding.body.clone(),
            run.ttl,
            held.generation,
        ))
    });
    let lost_hold = async {
        match renewal {
            Some(task) => task.await.ok(),
            None => std::future::pending().await,
        }
    };
    tokio::pin!(lost_hold);

    let lost = loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|e| {
                    Failure::new(exit::CANNOT_RUN, format!("cannot wait for the command: {e}"))
                })?;
                return Ok(exit_code(status));
            }
            (number, name) = signals.next() => {
                eprintln!("locker: forwarding {name} to the command; {target} is released once it exits");
                send(number);
            }
            lost = &mut lost_hold => {
                break lost.map_or_else(|| "the renewal task failed".to_string(), |l| l.0);
            }
        }
    };

    eprintln!("locker: lost {target}: {lost}; sending SIGTERM to the command");
    send(libc::SIGTERM);
    let grace = tokio::time::sleep(run.grace);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            _ = child.wait() => break,
            (number, _) = signals.next() => send(number),
            _ = &mut grace => {
                eprintln!(
                    "locker: the command is still running after {}: sending SIGKILL",
                    short(run.grace)
                );
                let _ = child.kill().await;
                break;
            }
        }
    }
    Err(Failure::new(
        exit::LOST,
        format!("lost {target} while the command ran: {lost}"),
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

/// Gives back what is held, retrying a few times if the server cannot be reached; the lease
/// ends it otherwise.
async fn release(connection: &Connection, holding: &Holding) {
    let target = &holding.target;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match target.give_back(connection.client(), &holding.body).await {
            Ok(reply) if reply.status == StatusCode::OK => return,
            Ok(reply) => {
                eprintln!(
                    "locker: releasing {target}: the server answered {}",
                    reply.error_message()
                );
                return;
            }
            Err(error) if attempt < 4 && error.is_unreachable() => {
                tokio::time::sleep(Duration::from_millis(250) * attempt).await;
            }
            Err(error) => {
                eprintln!(
                    "locker: could not release {target}: {} (its lease ends it)",
                    connection.failure(error).message
                );
                return;
            }
        }
    }
}
