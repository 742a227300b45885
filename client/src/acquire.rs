//! The long-poll acquire loop, one for every client and for both things a client can wait to
//! hold: a lock (`PUT /lock/{name}?wait=...`) and an item of a pool
//! (`PUT /pool/{pool}/claim?wait=...`, or `.../item/{item}/claim` for a named one). A first try
//! that does not wait (so the caller can name the holder at once), then long-polls until
//! granted or the deadline passes; against a server that answers at once (the original locker
//! ignores `?wait`) a pause between tries instead. While it runs it keeps an [`Abort`] up to
//! date, so that a caller stopped by a signal can give back what a request in flight may have
//! been granted. What the front ends say along the way (log lines, messages, exit codes) is
//! theirs, through [`Hooks`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::error::Error;
use crate::http::{Client, Reply};
use crate::longpoll::{ABORT_DEADLINE, poll_length, server_waited};
use crate::pools::claimed_by;
use crate::wire::{ItemFreed, ItemRelease, LockRequest, PoolStatus};

/// One acquire to run.
pub struct Request<'a> {
    /// The lock's name; for a [`Claim`], the pool's.
    pub name: &'a str,
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

/// One claim of an item of the pool `request.name` to run.
pub struct Claim<'a> {
    pub request: Request<'a>,
    /// The item asked for; `None`: any free item (the server picks the one freed longest ago).
    pub item: Option<&'a str>,
}

/// What an acquire asks for.
#[derive(Debug, Clone, Copy)]
enum Asked<'a> {
    Lock,
    Item(Option<&'a str>),
}

/// How an acquire ended, short of a transport error.
#[derive(Debug)]
pub enum Outcome {
    /// 200: the lock (or item, named in the answer's `item`) is ours.
    Granted(Reply),
    /// 423 when the deadline had passed: the last answer.
    TimedOut(Reply),
    /// Any other answer (409 for a slot count that differs, 404 for an item or pool that does
    /// not exist, 4xx ...), given up at once.
    Refused(Reply),
}

/// What each front end says or decides along the way.
#[allow(async_fn_in_trait)] // Used with concrete types on one task; no `Send` bound wanted.
pub trait Hooks {
    /// Each answer that the lock (or every item the claim could take) is held. `out_of_time` is true for the last one, after which
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

/// Takes the lock (see the module doc). Transport errors on the first try, and those
/// [`Hooks::unreachable`] does not ride out, are returned as they are.
pub async fn acquire<H: Hooks>(
    client: &Client,
    request: &Request<'_>,
    abort: &Abort,
    hooks: &mut H,
) -> Result<Outcome, Error> {
    run(client, request, Asked::Lock, abort, hooks).await
}

/// Claims an item of a pool, as [`acquire`] takes a lock; the granted answer is an
/// [`crate::wire::ItemClaim`] naming the item.
pub async fn claim<H: Hooks>(
    client: &Client,
    claim: &Claim<'_>,
    abort: &Abort,
    hooks: &mut H,
) -> Result<Outcome, Error> {
    run(
        client,
        &claim.request,
        Asked::Item(claim.item),
        abort,
        hooks,
    )
    .await
}

/// The loop of [`acquire`] and [`claim`].
async fn run<H: Hooks>(
    client: &Client,
    request: &Request<'_>,
    what: Asked<'_>,
    abort: &Abort,
    hooks: &mut H,
) -> Result<Outcome, Error> {
    let name = request.name;
    let mut wait: Option<Duration> = None;
    let mut failures = 0u32;
    loop {
        abort.set(Some(Pending {
            client: client.clone(),
            name: name.to_string(),
            kind: match what {
                Asked::Lock => Kind::Lock,
                Asked::Item(item) => Kind::Item(item.map(str::to_string)),
            },
            release_body: request.body.release(),
            granted: false,
        }));
        let sent = match what {
            Asked::Lock => client.acquire(name, request.body, wait).await,
            Asked::Item(item) => client.claim(name, item, request.body, wait).await,
        };
        let reply = match sent {
            Ok(reply) => {
                failures = 0;
                reply
            }
            Err(error) if error.is_unreachable() && wait.is_some() => {
                failures += 1;
                match hooks.unreachable(&error, failures) {
                    Some(pause) => {
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                    None => return Err(error),
                }
            }
            Err(error) => return Err(error),
        };
        match reply.status {
            StatusCode::OK => {
                abort.mark_granted(reply.body.get("item").and_then(|i| i.as_str()));
                return Ok(Outcome::Granted(reply));
            }
            StatusCode::LOCKED => abort.set(None),
            _ => {
                abort.set(None);
                return Ok(Outcome::Refused(reply));
            }
        }
        let remaining = request
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        let out_of_time = remaining == Some(Duration::ZERO);
        hooks.held(&reply, out_of_time).await;
        if out_of_time {
            return Ok(Outcome::TimedOut(reply));
        }
        // A server that does not long-poll answers at once: do not hammer it.
        if let Some(asked) = wait
            && !server_waited(asked, reply.elapsed, &reply.error_message())
        {
            hooks.answered_at_once();
            let pause = request.fallback_pause;
            tokio::time::sleep(remaining.map_or(pause, |r| r.min(pause))).await;
        }
        let remaining = request
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        wait = Some(poll_length(request.poll, remaining));
    }
}

/// What an acquire is doing, for the clean-up when a signal stops it: whether a request is in
/// flight or was granted, and how to give it back. Cheap to clone; [`acquire`] and [`claim`]
/// keep it up to date.
#[derive(Clone, Default)]
pub struct Abort(Arc<Mutex<Option<Pending>>>);

/// An acquire request in flight, or granted.
pub struct Pending {
    client: Client,
    /// The lock's name, or the pool's.
    pub name: String,
    kind: Kind,
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

    /// Records the grant; for a claim, of the item the answer names.
    fn mark_granted(&self, item: Option<&str>) {
        if let Ok(mut slot) = self.0.lock()
            && let Some(pending) = slot.as_mut()
        {
            pending.granted = true;
            if let (Kind::Item(asked), Some(item)) = (&mut pending.kind, item) {
                *asked = Some(item.to_string());
            }
        }
    }

    /// The request in flight or granted, if any, leaving nothing behind.
    pub fn take(&self) -> Option<Pending> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// What a [`Pending`] request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Lock,
    /// An item of the pool: the one asked for or granted, `None` while a claim of any item has
    /// not been answered.
    Item(Option<String>),
}

impl Pending {
    /// Whether this is a claim of a pool's item (else an acquire of a lock).
    pub fn is_claim(&self) -> bool {
        matches!(self.kind, Kind::Item(_))
    }

    /// The item of a claim: the one asked for, or granted; `None` for a lock and for a claim of
    /// any item that has no answer yet.
    pub fn item(&self) -> Option<&str> {
        match &self.kind {
            Kind::Item(item) => item.as_deref(),
            Kind::Lock => None,
        }
    }

    /// What the request asks for, for messages: `lock "prod"`, `item "env-1" of pool "aws"`,
    /// `an item of pool "aws"`.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Lock => format!("lock {:?}", self.name),
            Kind::Item(Some(item)) => format!("item {item:?} of pool {:?}", self.name),
            Kind::Item(None) => format!("an item of pool {:?}", self.name),
        }
    }

    /// The key the acquire asked for.
    pub fn key(&self) -> &str {
        &self.release_body.key
    }

    /// The requestor the acquire asked as; `None` when the server takes the key for it.
    pub fn requestor(&self) -> Option<&str> {
        self.release_body.requestor.as_deref()
    }

    /// Gives back what the request may have been granted, tried once within
    /// [`ABORT_DEADLINE`] (Concourse kills a step soon after signalling it); `None` when it did
    /// not finish in time. A waiter is never granted once its connection is gone, but a grant
    /// may have been on its way when the request was dropped: this gives it back either way.
    ///
    /// A lock: `DELETE /lock/{name}` with the key and requestor. An item: `DELETE
    /// /pool/{pool}/item/{item}/claim` with them; when a claim of any item was cut off before
    /// its answer, the item is looked up (`GET /pool/{pool}`) as the one held under this key by
    /// this requestor, released if there is exactly one (a client that claims several items
    /// under one key and requestor at once cannot tell which was granted, and none is
    /// released), else answered as the server answers a release of an unclaimed item.
    pub async fn release(&self) -> Option<Result<Reply, Error>> {
        let quick = self.client.quick(ABORT_DEADLINE);
        tokio::time::timeout(ABORT_DEADLINE, self.give_back(&quick))
            .await
            .ok()
    }

    async fn give_back(&self, client: &Client) -> Result<Reply, Error> {
        let item = match &self.kind {
            Kind::Lock => return client.release(&self.name, &self.release_body, false).await,
            Kind::Item(item) => item,
        };
        let body = ItemRelease {
            key: Some(self.release_body.key.clone()),
            requestor: self.release_body.requestor.clone(),
        };
        if let Some(item) = item {
            return client.release_item(&self.name, item, &body).await;
        }
        let listing = client.pool(&self.name).await?;
        let held: Vec<String> = listing
            .parse::<PoolStatus>()
            .map(|pool| {
                claimed_by(&pool, self.key(), self.requestor())
                    .map(|item| item.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        match held.as_slice() {
            [item] => client.release_item(&self.name, item, &body).await,
            [] => Ok(Reply {
                status: StatusCode::OK,
                body: serde_json::to_value(ItemFreed {
                    pool: self.name.clone(),
                    item: String::new(),
                    released: false,
                    previous: None,
                })
                .unwrap_or_default(),
                elapsed: listing.elapsed,
            }),
            several => Ok(Reply {
                status: StatusCode::CONFLICT,
                body: serde_json::json!({"error": format!(
                    "items {} of pool {:?} are held under this key and requestor: which one \
                     the interrupted claim was granted is unknown, so none was released",
                    several.join(", "),
                    self.name
                )}),
                elapsed: listing.elapsed,
            }),
        }
    }
}
