//! Waiting for something that takes nothing (a pool's item to become unclaimed or claimed, an
//! update that waits while its item is claimed): locker-client's one wait loop
//! ([`locker_client::wait::until`]) with a line in the log each round, one line when the server
//! turns out to answer at once, and a message naming what was waited for when the deadline
//! passes. Claims go through locker-client's acquire instead, which also gives back a grant
//! after a signal; these waits hold nothing to give back.

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use locker_client::wait::{self, Round, Schedule, Waited, Waiter};

use crate::client::since;
use crate::error::PoolError;
use crate::log;

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
/// says at once how things stand) until it answers [`Round::Done`]; a "not yet" carries how
/// things stand, for the log. Gives up with a message naming `what` and its state once the
/// deadline has passed.
pub async fn until<T>(
    wait: &Wait<'_>,
    ask: impl AsyncFnMut(Option<Duration>) -> Result<Round<T, String>, PoolError>,
) -> Result<T, PoolError> {
    let schedule = Schedule {
        deadline: wait.deadline,
        poll: wait.poll,
        fallback_pause: wait.pause,
    };
    let mut logging = Logging {
        wait,
        ask,
        told_fallback: false,
        done: PhantomData,
    };
    match wait::until(&schedule, &mut logging).await? {
        Waited::Done(done) => Ok(done),
        Waited::TimedOut(state) => Err(PoolError::GaveUp {
            what: wait.what.to_string(),
            waited: since(wait.started),
            state: format!("it is {state}"),
        }),
    }
}

/// A wait's questions, with the log lines along the way.
struct Logging<'w, 'a, F, T> {
    wait: &'w Wait<'a>,
    ask: F,
    told_fallback: bool,
    done: PhantomData<fn() -> T>,
}

impl<F, T> Waiter for Logging<'_, '_, F, T>
where
    F: AsyncFnMut(Option<Duration>) -> Result<Round<T, String>, PoolError>,
{
    type Done = T;
    type State = String;
    type Error = PoolError;

    async fn ask(&mut self, wait: Option<Duration>) -> Result<Round<T, String>, PoolError> {
        (self.ask)(wait).await
    }

    async fn not_yet(&mut self, state: &String, _out_of_time: bool) {
        log!(
            "{} is {state}; waited {} so far",
            self.wait.what,
            since(self.wait.started)
        );
    }

    fn answered_at_once(&mut self) {
        if !self.told_fallback {
            log!(
                "the server answered at once instead of waiting: asking again every {}",
                humantime::format_duration(self.wait.pause)
            );
            self.told_fallback = true;
        }
    }
}
