//! The long-poll acquire loop, one for every client: a first try that does not wait (so the
//! caller can name the holder at once), then `PUT /lock/{name}?wait=...` until granted or the
//! deadline passes; against a server that answers at once (the original locker ignores
//! `?wait`) a pause between tries instead. While it runs it keeps an [`Abort`] up to date, so
//! that a caller stopped by a signal can give back what a request in flight may have been
//! granted. What the front ends say along the way (log lines, messages, exit codes) is theirs,
//! through [`Hooks`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::error::Error;
use crate::http::{Client, Reply};
use crate::longpoll::{ABORT_DEADLINE, poll_length, server_waited};
use crate::wire::LockRequest;

/// One acquire to run.
pub struct Request<'a> {
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

/// How an acquire ended, short of a transport error.
#[derive(Debug)]
pub enum Outcome {
    /// 200: the lock is ours.
    Granted(Reply),
    /// 423 when the deadline had passed: the last answer.
    TimedOut(Reply),
    /// Any other answer (409 for a slot count that differs, 4xx ...), given up at once.
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

/// Takes the lock (see the module doc). Transport errors on the first try, and those
/// [`Hooks::unreachable`] does not ride out, are returned as they are.
pub async fn acquire<H: Hooks>(
    client: &Client,
    request: &Request<'_>,
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
            release_body: request.body.release(),
            granted: false,
        }));
        let reply = match client.acquire(name, request.body, wait).await {
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
                abort.mark_granted();
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
/// flight or was granted, and how to give it back. Cheap to clone; [`acquire`] keeps it up to
/// date.
#[derive(Clone, Default)]
pub struct Abort(Arc<Mutex<Option<Pending>>>);

/// An acquire request in flight, or granted.
pub struct Pending {
    client: Client,
    pub name: String,
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

    fn mark_granted(&self) {
        if let Ok(mut slot) = self.0.lock()
            && let Some(pending) = slot.as_mut()
        {
            pending.granted = true;
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

    /// `DELETE /lock/{name}` with the release body, tried once within [`ABORT_DEADLINE`]
    /// (Concourse kills a step soon after signalling it). `None` when it did not finish in
    /// time. A waiter is never granted once its connection is gone, but a grant may have been
    /// on its way when the request was dropped: this gives it back either way.
    pub async fn release(&self) -> Option<Result<Reply, Error>> {
        let quick = self.client.quick(ABORT_DEADLINE);
        tokio::time::timeout(
            ABORT_DEADLINE,
            quick.release(&self.name, &self.release_body, false),
        )
        .await
        .ok()
    }
}
