//! The pieces of a long-poll that every client needs the same way: how long to ask the server
//! to wait, how to tell a server that does not wait (the original answers at once), and how
//! long the clean-up after a signal may take.

use std::time::Duration;

/// Longest single long-poll to ask of the server (it clamps longer ones anyway).
pub const DEFAULT_POLL: Duration = Duration::from_secs(60);

/// Longest the release after a signal may take: Concourse kills a step soon after signalling
/// it, and both clients promise to exit within a second.
pub const ABORT_DEADLINE: Duration = Duration::from_millis(700);

/// The long-poll to ask for: `poll`, or less when the caller's own limit runs out sooner.
pub fn poll_length(poll: Duration, remaining: Option<Duration>) -> Duration {
    remaining.map_or(poll, |r| r.min(poll))
}

/// Whether an answer to a request that asked the server to wait `asked` came after a wait.
/// The original locker ignores `?wait` and answers at once; this server answers when the wait
/// ran out (or at once with a "timed out" error if it clamps the wait to very little).
///
/// The error's text is the only sign of that last case: a wait that ran out and a lock held
/// when asked without a wait are both `423` with the body `{"error": ...}` (the status the
/// original resource greps for, the body every client of the original reads), and the server
/// sends no other field or header that tells them apart. Matching the text costs nothing when
/// it is missing: the client then pauses before asking again, as with the original.
pub fn server_waited(asked: Duration, elapsed: Duration, error: &str) -> bool {
    elapsed >= (asked / 2).min(Duration::from_secs(1)) || error.contains("timed out")
}

/// Whether a "not yet" to a question that asked the server to wait `asked` (`None`: asked
/// not to wait) came without a wait, so that a pause must come before the next question (see
/// [`server_waited`]).
pub fn answered_at_once(asked: Option<Duration>, elapsed: Duration, error: &str) -> bool {
    asked.is_some_and(|asked| !server_waited(asked, elapsed, error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_a_server_that_does_not_wait() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let cases = [
            // asked, took, error, waited?
            (s(60), ms(5), "lock \"a\" is held under key \"k\"", false),
            (s(60), s(60), "timed out after 60s", true),
            (s(60), s(1), "held", true),
            (ms(200), ms(120), "held", true),
            (ms(200), ms(20), "held", false),
            // Clamped by the server to a tiny wait, but it says it waited.
            (s(60), ms(10), "timed out after 10ms waiting for lock", true),
        ];
        for (asked, took, error, expected) in cases {
            assert_eq!(
                server_waited(asked, took, error),
                expected,
                "{asked:?} {took:?} {error}"
            );
        }
    }

    #[test]
    fn poll_length_respects_the_callers_limit() {
        let s = Duration::from_secs;
        assert_eq!(poll_length(s(60), None), s(60));
        assert_eq!(poll_length(s(60), Some(s(5))), s(5));
        assert_eq!(poll_length(s(60), Some(s(600))), s(60));
    }
}
