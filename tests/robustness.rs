//! Stable, bounded stand-in for the cargo-fuzz targets in `fuzz/` (which need nightly): the
//! state-file loader and the request-body parser get arbitrary and near-valid input and must
//! answer with a value or an error, never a panic, and keep their documented limits.

use std::time::{Duration, SystemTime};

use locker::api::request::{self, MAX_INFO_BYTES, MAX_INFO_ENTRIES, MAX_KEY};
use locker::store::state_file::{decode, encode};
use locker::timefmt::MAX_DURATION;
use proptest::prelude::*;

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// The body checks of `fuzz/fuzz_targets/lock_body_parse.rs`.
fn check_body(data: &[u8]) {
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
        let bytes: usize = info.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(bytes <= MAX_INFO_BYTES);
    }
}

/// The state-file checks of `fuzz/fuzz_targets/state_file_decode.rs`.
fn check_state_file(text: &str) {
    if let Ok(table) = decode(text, now()) {
        let written = encode(&table).expect("a loaded table encodes");
        let text = std::str::from_utf8(&written).expect("the encoder writes UTF-8");
        let again = decode(text, now()).expect("what the server writes loads again");
        let rewritten = encode(&again).expect("a loaded table encodes");
        assert_eq!(rewritten, written, "write → load → write changed the file");
    }
}

/// JSON-ish fragments a body is made of, so that generated input gets past the first byte.
fn body_fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(",".to_string()),
        Just(":".to_string()),
        Just("\"key\":".to_string()),
        Just("\"requestor\":".to_string()),
        Just("\"lock_by\":".to_string()),
        Just("\"locked_by\":".to_string()),
        Just("\"wait\":".to_string()),
        Just("\"ttl\":".to_string()),
        Just("\"info\":".to_string()),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("1e400".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551616".to_string()),
        Just("\"99999999999h\"".to_string()),
        Just("\"\\ud800\"".to_string()),
        "-?[0-9]{1,25}(\\.[0-9]{1,5})?".prop_map(|s| s),
        "\"[a-z0-9 hms]{0,12}\"".prop_map(|s| s),
        "\"[^\"\\\\]{0,40}\"".prop_map(|s| s),
    ]
}

/// YAML-ish fragments of a state file, ours and the original's.
fn state_fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("format: locker/v2\n".to_string()),
        Just("next_generation: ".to_string()),
        Just("locks:\n".to_string()),
        Just("  ".to_string()),
        Just("\n".to_string()),
        Just("- ".to_string()),
        Just(": ".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(", ".to_string()),
        Just("&a ".to_string()),
        Just("*a".to_string()),
        Just("!!binary ".to_string()),
        Just("key: ".to_string()),
        Just("locked_by: ".to_string()),
        Just("holders: ".to_string()),
        Just("requestors: ".to_string()),
        Just("count: ".to_string()),
        Just("generation: ".to_string()),
        Just("acquired_at: ".to_string()),
        Just("expires_at: ".to_string()),
        Just("2026-01-01T00:00:00.123456789Z".to_string()),
        Just("\"a\": {\"locked_by\": {\"k\": 1}, \"key\": \"k\"}".to_string()),
        Just("18446744073709551616".to_string()),
        Just("-9223372036854775809".to_string()),
        Just("~".to_string()),
        "-?[0-9]{1,22}".prop_map(|s| s),
        "[a-z_]{1,12}".prop_map(|s| s),
    ]
}

// Debug builds parse YAML slowly: fewer state-file cases keep the file well under a minute.
proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_as_a_body_parse_or_fail_cleanly(data in prop::collection::vec(any::<u8>(), 0..512)) {
        check_body(&data);
    }

    #[test]
    fn near_json_bodies_parse_or_fail_cleanly(parts in prop::collection::vec(body_fragment(), 0..40)) {
        check_body(parts.concat().as_bytes());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn any_text_as_a_state_file_loads_or_fails_cleanly(text in "\\PC{0,400}") {
        check_state_file(&text);
    }

    #[test]
    fn near_yaml_state_files_load_or_fail_cleanly(parts in prop::collection::vec(state_fragment(), 0..40)) {
        check_state_file(&parts.concat());
    }
}

#[test]
fn pathological_inputs_fail_cleanly() {
    let deep = |open: &str, n| open.repeat(n);
    for body in [
        deep("[", 100_000),
        deep("{\"a\":", 50_000),
        format!("{{\"key\":\"k\",\"info\":{}", deep("{\"a\":", 20_000)),
        format!("{{\"key\":\"{}\"}}", "k".repeat(MAX_KEY + 1)),
        "\u{feff}{\"key\":\"k\"}".to_string(),
    ] {
        check_body(body.as_bytes());
    }
    // The YAML parser takes time quadratic in the nesting depth before it gives up (100,000
    // `[` take seconds, 50,000 `{a: ` most of a minute in a debug build): depths here are far
    // past its recursion limit (128) but keep the test quick. See docs/resilience.md.
    for text in [
        deep("[", 5_000),
        deep("{a: ", 5_000),
        deep("- ", 50_000),
        // A "billion laughs" alias bomb.
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
         c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n\
         e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n\
         g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n"
            .to_string(),
        "format: locker/v2\nnext_generation: 18446744073709551615\nlocks: {}\n".to_string(),
    ] {
        let started = std::time::Instant::now();
        check_state_file(&text);
        eprintln!("{:?}…: {:?}", &text[..20], started.elapsed());
    }
}
