//! The state-file loader must turn any bytes into a lock table or an error, never a panic; a
//! table it loads must encode, and what it writes must load back and encode to the same bytes
//! (times are written with millisecond precision, so the first load may be finer than that).
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use locker::store::state_file::{decode, encode};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if let Ok(table) = decode(text, now) {
        let written = encode(&table).expect("a loaded table encodes");
        let text = std::str::from_utf8(&written).expect("the encoder writes UTF-8");
        let again = decode(text, now).expect("what the server writes loads again");
        let rewritten = encode(&again).expect("a loaded table encodes");
        assert_eq!(rewritten, written, "write → load → write changed the file");
    }
});
