//! Waiting for something that takes nothing (a pool's item to become unclaimed or claimed, an
//! update that waits while its item is claimed): a request that asks the server to wait,
//! repeated until the server says it happened or the caller's deadline passes, with a line in
//! the log each round and a pause between tries against a server that answers at once. Claims
//! go through locker-client's acquire loop instead, which also gives back a grant after a
//! signal; these waits hold nothing to give back.

use std::time::{Duration, Instant};

use locker_client::longpoll::{poll_length, server_waited};

use crate::client::since;
use crate::log;

/// One answer.
pub enum Round<T> {
    /// It happened.
    Done(T),
    /// Not yet: how things stand (for the log and for the message when time runs out), and
    /// how long the answer took.
    NotYet { state: String, elapsed: Duration },
}

/// How to wait.
pub struct Wait<'a> {
    /// What is waited for, as the log names it: `item "env-1" of pool "aws"`.
    pub what: &'a str,
    pub started: Instant,
    /// When to give up (`params.wait_timeout`); `None` waits for ever.
    pub deadline: Option<Instant>,
    /// Longest single long-poll to ask for (`source.wait_poll`).
    pub poll: Duration,
    /// Pause between tries against a server that answers at once (`source.retry_interval`).
    pub pause: Duration,
}

/// Asks `ask` (with the long-poll to ask the server for; `None` the first time, so the log
/// says at once how things stand) until it answers [`Round::Done`]. Gives up with a message
/// naming `what` and its state once the deadline has passed.
pub async fn until<T>(
    wait: &Wait<'_>,
    mut ask: impl AsyncFnMut(Option<Duration>) -> Result<Round<T>, String>,
) -> Result<T, String> {
    let mut asked: Option<Duration> = None;
    let mut told_fallback = false;
    loop {
        let (state, elapsed) = match ask(asked).await? {
            Round::Done(done) => return Ok(done),
            Round::NotYet { state, elapsed } => (state, elapsed),
        };
        log!(
            "{} is {state}; waited {} so far",
            wait.what,
            since(wait.started)
        );
        let remaining = wait
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        if remaining == Some(Duration::ZERO) {
            return Err(format!(
                "gave up waiting for {} after {} (params.wait_timeout): it is {state}",
                wait.what,
                since(wait.started)
            ));
        }
        if let Some(asked) = asked
            && !server_waited(asked, elapsed, "")
        {
            if !told_fallback {
                log!(
                    "the server answered at once instead of waiting: asking again every {}",
                    humantime::format_duration(wait.pause)
                );
                told_fallback = true;
            }
            tokio::time::sleep(remaining.map_or(wait.pause, |r| r.min(wait.pause))).await;
        }
        let remaining = wait
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        asked = Some(poll_length(wait.poll, remaining));
    }
}
