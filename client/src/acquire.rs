//! The acquire, one for every client and for everything that can be held: a lock, a named
//! item of a pool, or any free item of a pool ([`Target`]). A first try that does not wait (so
//! the caller can name the holder at once), then `PUT ...?wait=...` until granted or the
//! deadline passes; against a server that answers at once (the original locker ignores
//! `?wait`) a pause between tries instead: the one wait loop of [`crate::wait`]. While it runs
//! it keeps an [`Abort`] up to date, so that a caller stopped by a signal can give back what a
//! request in flight may have been granted. What the front ends say along the way (log lines,
//! messages, exit codes) is theirs, through [`Hooks`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::error::Error;
use crate::http::{Client, Reply};
use crate::longpoll::{ABORT_DEADLINE, answered_at_once};
use crate::wait::{self, Round, Schedule, Waited, Waiter};
use crate::wire::{ItemClaim, ItemRelease, LockRequest, PoolStatus};

/// What an acquire takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A lock: `PUT /lock/{name}`.
    Lock(String),
    /// An item of a pool: the named one (`PUT /pool/{pool}/item/{item}/claim`), or with no
    /// item any free one (`PUT /pool/{pool}/claim`).
    Pool { pool: String, item: Option<String> },
}

impl Target {
    /// A lock by name.
    pub fn lock(name: &str) -> Target {
        Target::Lock(name.to_string())
    }

    /// What a grant made definite: for a claim of any item, the item the server granted (the
    /// answer's `item`); otherwise the same target.
    pub fn granted(&self, reply: &Reply) -> Target {
        match self {
            Target::Pool { pool, item: None } => Target::Pool {
                pool: pool.clone(),
                item: reply.parse::<ItemClaim>().map(|claim| claim.item),
            },
            other => other.clone(),
        }
    }

    /// One `PUT` asking for the target, the server waiting up to `wait`.
    pub async fn ask(
        &self,
        client: &Client,
        body: &LockRequest,
        wait: Option<Duration>,
    ) -> Result<Reply, Error> {
        match self {
            Target::Lock(name) => client.acquire(name, body, wait).await,
            Target::Pool { pool, item } => client.claim(pool, item.as_deref(), body, wait).await,
        }
    }

    /// Gives back what `body`'s key and requestor hold of the target: `DELETE /lock/{name}`,
    /// or `DELETE /pool/{pool}/item/{item}/claim`. For a claim of any item that was not seen
    /// granted, every item of the pool held under that key and requestor is released (the key
    /// is the caller's own; a release names the requestor, so a shared key loses nothing of
    /// another's); the answer is then the last release's, or the pool's status when nothing
    /// was held.
    pub async fn give_back(&self, client: &Client, body: &LockRequest) -> Result<Reply, Error> {
        let release = ItemRelease {
            key: Some(body.key.clone()),
            requestor: body.requestor.clone(),
        };
        match self {
            Target::Lock(name) => client.release(name, &body.release(), false).await,
            Target::Pool {
                pool,
                item: Some(item),
            } => client.release_item(pool, item, &release).await,
            Target::Pool { pool, item: None } => {
                let status = client.pool(pool).await?;
                let requestor = body.requestor.as_deref().unwrap_or(&body.key);
                let held: Vec<String> = status
                    .parse::<PoolStatus>()
                    .map(|p| p.items)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|i| {
                        i.holder.as_ref().is_some_and(|h| {
                            h.key == body.key && h.locked_by.contains_key(requestor)
                        })
                    })
                    .map(|i| i.name)
                    .collect();
                let mut answer = status;
                for item in held {
                    answer = client.release_item(pool, &item, &release).await?;
                }
                Ok(answer)
            }
        }
    }
}

impl std::fmt::Display for Target {
    /// `lock "name"`, `item "env-1" of pool "aws"`, `an item of pool "aws"`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Lock(name) => write!(f, "lock {name:?}"),
            Target::Pool {
                pool,
                item: Some(item),
            } => write!(f, "item {item:?} of pool {pool:?}"),
            Target::Pool { pool, item: None } => write!(f, "an item of pool {pool:?}"),
        }
    }
}

/// One acquire to run.
pub struct Request<'a> {
    pub target: &'a Target,
    /// Sent with every `PUT`; its key and requestor with the `DELETE` that gives back a grant
    /// after an abort.
    pub body: &'a LockRequest,
    /// When to stop waiting; `None` waits for ever.
    pub deadline: Option<Instant>,
    /// Longest single long-poll to ask for.
    pub poll: Duration,
    /// Pause between tries against a server that does not long-poll.
    pub fallback_pause: Duration,
}

/// How an acquire ended, short of a transport error.
#[derive(Debug)]
pub enum Outcome {
    /// 200: the lock (the item) is ours.
    Granted(Reply),
    /// 423 when the deadline had passed: the last answer.
    TimedOut(Reply),
    /// Any other answer (409 for a slot count that differs, 404 for a pool without items or
    /// an item that does not exist, 4xx ...), given up at once.
    Refused(Reply),
}

/// What each front end says or decides along the way.
#[allow(async_fn_in_trait)] // Used with concrete types on one task; no `Send` bound wanted.
pub trait Hooks {
    /// Each answer that the lock is held. `out_of_time` is true for the last one, after which
    /// [`acquire`] returns [`Outcome::TimedOut`].
    async fn held(&mut self, reply: &Reply, out_of_time: bool);

    /// The server could not be reached while waiting, for the `failures`-th time in a row
    /// (from 1): the pause before trying again, or `None` to give up with the error.
    fn unreachable(&mut self, _error: &Error, _failures: u32) -> Option<Duration> {
        None
    }

    /// The server answered at once instead of waiting; a pause follows.
    fn answered_at_once(&mut self) {}
}

/// Takes the target (see the module doc), through the one wait loop ([`wait::until`]).
/// Transport errors on the first try, and those [`Hooks::unreachable`] does not ride out, are
/// returned as they are.
pub async fn acquire<H: Hooks>(
    client: &Client,
    request: &Request<'_>,
    abort: &Abort,
    hooks: &mut H,
) -> Result<Outcome, Error> {
    let schedule = Schedule {
        deadline: request.deadline,
        poll: request.poll,
        fallback_pause: request.fallback_pause,
    };
    let mut asking = Asking {
        client,
        request,
        abort,
        hooks,
    };
    Ok(match wait::until(&schedule, &mut asking).await? {
        Waited::Done(outcome) => outcome,
        Waited::TimedOut(reply) => Outcome::TimedOut(reply),
    })
}

/// One acquire as a [`Waiter`]: each question keeps the [`Abort`] up to date and rides out an
/// unreachable server as [`Hooks::unreachable`] says.
struct Asking<'a, 'r, H> {
    client: &'a Client,
    request: &'a Request<'r>,
    abort: &'a Abort,
    hooks: &'a mut H,
}

impl<H: Hooks> Waiter for Asking<'_, '_, H> {
    type Done = Outcome;
    /// The 423.
    type State = Reply;
    type Error = Error;

    async fn ask(&mut self, wait: Option<Duration>) -> Result<Round<Outcome, Reply>, Error> {
        let target = self.request.target;
        let mut failures = 0u32;
        let reply = loop {
            self.abort.set(Some(Pending {
                client: self.client.clone(),
                target: target.clone(),
                release_body: self.request.body.release(),
                granted: false,
            }));
            match target.ask(self.client, self.request.body, wait).await {
                Ok(reply) => break reply,
                Err(error) if error.is_unreachable() && wait.is_some() => {
                    failures += 1;
                    match self.hooks.unreachable(&error, failures) {
                        Some(pause) => tokio::time::sleep(pause).await,
                        None => return Err(error),
                    }
                }
                Err(error) => return Err(error),
            }
        };
        match reply.status {
            StatusCode::OK => {
                self.abort.mark_granted(target.granted(&reply));
                Ok(Round::Done(Outcome::Granted(reply)))
            }
            StatusCode::LOCKED => {
                self.abort.set(None);
                let at_once = answered_at_once(wait, reply.elapsed, &reply.error_message());
                Ok(Round::NotYet {
                    state: reply,
                    at_once,
                })
            }
            _ => {
                self.abort.set(None);
                Ok(Round::Done(Outcome::Refused(reply)))
            }
        }
    }

    async fn not_yet(&mut self, reply: &Reply, out_of_time: bool) {
        self.hooks.held(reply, out_of_time).await;
    }

    fn answered_at_once(&mut self) {
        self.hooks.answered_at_once();
    }
}

/// What an acquire is doing, for the clean-up when a signal stops it: whether a request is in
/// flight or was granted, and how to give it back. Cheap to clone; [`acquire`] keeps it up to
/// date.
#[derive(Clone, Default)]
pub struct Abort(Arc<Mutex<Option<Pending>>>);

/// An acquire request in flight, or granted.
pub struct Pending {
    client: Client,
    /// What was asked for; once granted, what was granted (the item, for a claim of any).
    pub target: Target,
    release_body: LockRequest,
    /// Whether the server's grant arrived (else it may have raced with the signal).
    pub granted: bool,
}

impl Abort {
    fn set(&self, pending: Option<Pending>) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = pending;
        }
    }

    fn mark_granted(&self, target: Target) {
        if let Ok(mut slot) = self.0.lock()
            && let Some(pending) = slot.as_mut()
        {
            pending.granted = true;
            pending.target = target;
        }
    }

    /// The request in flight or granted, if any, leaving nothing behind.
    pub fn take(&self) -> Option<Pending> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

impl Pending {
    /// The key the acquire asked for.
    pub fn key(&self) -> &str {
        &self.release_body.key
    }

    /// The requestor the acquire asked as; `None` when the server takes the key for it.
    pub fn requestor(&self) -> Option<&str> {
        self.release_body.requestor.as_deref()
    }

    /// [`Target::give_back`] with the release body, each request tried once, all within
    /// [`ABORT_DEADLINE`] (Concourse kills a step soon after signalling it). `None` when it
    /// did not finish in time. A waiter is never granted once its connection is gone, but a
    /// grant may have been on its way when the request was dropped: this gives it back either
    /// way.
    pub async fn release(&self) -> Option<Result<Reply, Error>> {
        let quick = self.client.quick(ABORT_DEADLINE);
        tokio::time::timeout(
            ABORT_DEADLINE,
            self.target.give_back(&quick, &self.release_body),
        )
        .await
        .ok()
    }
}
