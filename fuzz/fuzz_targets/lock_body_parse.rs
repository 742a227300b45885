//! The request-body parser and its accessors must answer any bytes with a value or an error,
//! never a panic, and what they accept must be within the documented limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use locker::api::request::{self, MAX_INFO_BYTES, MAX_INFO_ENTRIES, MAX_KEY};
use locker::timefmt::MAX_DURATION;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = request::lock_request(data) else {
        return;
    };
    if let Ok(key) = request::key(&body) {
        assert!(!key.is_empty() && key.len() <= MAX_KEY);
        let requestor = request::requestor(&body, &key).expect("a requestor with a valid key");
        assert!(!requestor.is_empty() && requestor.len() <= MAX_KEY);
    }
    for duration in [body.wait, body.ttl].into_iter().flatten() {
        assert!(duration.0 <= MAX_DURATION);
    }
    if let Ok(info) = request::info(&body) {
        assert!(info.len() <= MAX_INFO_ENTRIES);
        assert!(info.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() <= MAX_INFO_BYTES);
    }
});
