//! Waiting for something a test can observe, with a deadline, instead of sleeping and hoping.

use std::time::{Duration, Instant};

/// Polls (every 20 ms, up to 15 s) until `condition` holds.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
