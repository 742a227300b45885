//! The one wait-until loop: ask, and while the answer is "not yet", ask again with a long-poll
//! until the answer is "done" or the deadline passes. The first question does not wait (so the
//! caller can say at once how things stand); each later one asks the server to wait up to the
//! poll length, or what is left of the deadline; against a server that answers at once (the
//! original locker ignores `?wait`) a pause comes between questions instead.
//!
//! Everything that waits runs it: the acquire of a lock or a pool's item ([`crate::acquire`],
//! which keeps its [`crate::Abort`] up to date in its [`Waiter::ask`]), and the waits that take
//! nothing (`locker wait-free`, `locker pool update`, the resource's `lock_op: wait`, its pool
//! `update`, `check` and `check_unclaimed`). What is asked, and what is said along the way, is
//! each [`Waiter`]'s; a signal stops a wait by dropping its future.

use std::time::{Duration, Instant};

use crate::longpoll::poll_length;

/// One answer.
#[derive(Debug)]
pub enum Round<T, S> {
    /// It happened (or the wait is over for another reason the caller reads in `T`).
    Done(T),
    /// Not yet: how things stand, and whether the server answered without waiting (see
    /// [`crate::longpoll::answered_at_once`]), so that a pause must come before the next
    /// question.
    NotYet { state: S, at_once: bool },
}

/// How a wait ended.
#[derive(Debug)]
pub enum Waited<T, S> {
    Done(T),
    /// The deadline passed: how things stood at the last answer.
    TimedOut(S),
}

/// When to give up and how often to ask.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// When to give up; `None` waits for ever.
    pub deadline: Option<Instant>,
    /// Longest single long-poll to ask for.
    pub poll: Duration,
    /// Pause between questions to a server that answers at once.
    pub fallback_pause: Duration,
}

/// What a wait asks, and what it says along the way.
#[allow(async_fn_in_trait)] // Used with concrete types on one task; no `Send` bound wanted.
pub trait Waiter {
    type Done;
    type State;
    type Error;

    /// One question, the server waiting up to `wait` (`None`: answer at once).
    async fn ask(
        &mut self,
        wait: Option<Duration>,
    ) -> Result<Round<Self::Done, Self::State>, Self::Error>;

    /// Each "not yet". `out_of_time` is true for the last one, after which [`until`] returns
    /// [`Waited::TimedOut`].
    async fn not_yet(&mut self, _state: &Self::State, _out_of_time: bool) {}

    /// The server answered at once instead of waiting; a pause follows.
    fn answered_at_once(&mut self) {}
}

/// Asks `waiter` until it is done or `schedule`'s deadline has passed (see the module doc).
pub async fn until<W: Waiter>(
    schedule: &Schedule,
    waiter: &mut W,
) -> Result<Waited<W::Done, W::State>, W::Error> {
    let remaining = || {
        schedule
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    };
    let mut wait = None;
    loop {
        let (state, at_once) = match waiter.ask(wait).await? {
            Round::Done(done) => return Ok(Waited::Done(done)),
            Round::NotYet { state, at_once } => (state, at_once),
        };
        let left = remaining();
        let out_of_time = left == Some(Duration::ZERO);
        waiter.not_yet(&state, out_of_time).await;
        if out_of_time {
            return Ok(Waited::TimedOut(state));
        }
        // A server that does not long-poll answers at once: do not hammer it.
        if at_once {
            waiter.answered_at_once();
            let pause = schedule.fallback_pause;
            tokio::time::sleep(left.map_or(pause, |r| r.min(pause))).await;
        }
        wait = Some(poll_length(schedule.poll, remaining()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Not done for `rounds` answers; each question waits as asked, unless `at_once`.
    struct Counting {
        rounds: u32,
        asked: Vec<Option<Duration>>,
        at_once: bool,
        told: u32,
        last: Option<bool>,
    }

    impl Waiter for Counting {
        type Done = u32;
        type State = u32;
        type Error = ();

        async fn ask(&mut self, wait: Option<Duration>) -> Result<Round<u32, u32>, ()> {
            self.asked.push(wait);
            if let Some(wait) = wait.filter(|_| !self.at_once) {
                tokio::time::sleep(wait).await;
            }
            let n = self.asked.len() as u32;
            Ok(match n > self.rounds {
                true => Round::Done(n),
                false => Round::NotYet {
                    state: n,
                    at_once: self.at_once && wait.is_some(),
                },
            })
        }

        async fn not_yet(&mut self, _state: &u32, out_of_time: bool) {
            self.last = Some(out_of_time);
        }

        fn answered_at_once(&mut self) {
            self.told += 1;
        }
    }

    fn counting(rounds: u32, at_once: bool) -> Counting {
        Counting {
            rounds,
            asked: Vec::new(),
            at_once,
            told: 0,
            last: None,
        }
    }

    // The loop reads the deadline off `std::time::Instant`, which Tokio's paused clock does not
    // move: these run in real (short) time.

    #[tokio::test]
    async fn first_at_once_then_long_polls_until_done() {
        let ms = Duration::from_millis;
        let schedule = Schedule {
            deadline: None,
            poll: ms(20),
            fallback_pause: ms(1),
        };
        let mut waiter = counting(2, false);
        let ended = until(&schedule, &mut waiter).await.expect("no error");
        assert!(matches!(ended, Waited::Done(3)));
        assert_eq!(waiter.asked, [None, Some(ms(20)), Some(ms(20))]);
        assert_eq!(waiter.told, 0);
    }

    #[tokio::test]
    async fn the_deadline_shortens_the_last_poll_and_ends_the_wait() {
        let ms = Duration::from_millis;
        let started = Instant::now();
        let schedule = Schedule {
            deadline: Some(started + ms(150)),
            poll: ms(100),
            fallback_pause: ms(1),
        };
        let mut waiter = counting(10, false);
        let ended = until(&schedule, &mut waiter).await.expect("no error");
        assert!(matches!(ended, Waited::TimedOut(3)), "{ended:?}");
        assert_eq!(waiter.asked[..2], [None, Some(ms(100))]);
        assert!(
            waiter.asked[2].is_some_and(|w| w <= ms(50)),
            "{:?}",
            waiter.asked
        );
        assert_eq!(waiter.last, Some(true));
        assert!(started.elapsed() >= ms(150));
    }

    #[tokio::test]
    async fn a_server_that_answers_at_once_is_asked_after_a_pause() {
        let ms = Duration::from_millis;
        let started = Instant::now();
        let schedule = Schedule {
            deadline: None,
            poll: ms(1000),
            fallback_pause: ms(50),
        };
        let mut waiter = counting(3, true);
        let ended = until(&schedule, &mut waiter).await.expect("no error");
        assert!(matches!(ended, Waited::Done(4)));
        // The first answer came from a question that did not ask to wait: no pause after it.
        assert_eq!(waiter.told, 2);
        let took = started.elapsed();
        assert!(took >= ms(100) && took < ms(1000), "{took:?}");
    }
}
