//! Durations as people and the server write them: an integer number of seconds, or a number
//! with a unit (`500ms`, `30s`, `5m`, `1h`, `1h 30m`), at most [`MAX_DURATION`]; and as
//! clients put them in a query string ([`wire_duration`]).

use std::time::Duration;

/// The longest duration accepted anywhere (ten years): larger values are surely mistakes and
/// would overflow time arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A duration that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("duration {text:?} is out of range (at most 10 years)")]
    OutOfRange { text: String },
    #[error("bad duration {text:?} ({reason}): use seconds or a unit, e.g. 500ms, 30s, 5m, 1h")]
    Syntax { text: String, reason: String },
}

/// Parses `30` (seconds), `500ms`, `30s`, `5m`, `1h` or combinations such as `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    let out_of_range = || DurationError::OutOfRange {
        text: text.to_string(),
    };
    let duration = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(text.parse().map_err(|_| out_of_range())?)
    } else {
        humantime::parse_duration(text).map_err(|e| DurationError::Syntax {
            text: text.to_string(),
            reason: e.to_string(),
        })?
    };
    if duration > MAX_DURATION {
        return Err(out_of_range());
    }
    Ok(duration)
}

/// A duration as the server reads it in a query or body: whole seconds when exact, else
/// milliseconds (at least 1).
pub fn wire_duration(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis().max(1))
    }
}

/// A duration in a request body: sent in its wire form ([`wire_duration`]); read from a whole
/// number of seconds or a string in the syntax above, as the server reads `ttl` and `wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireDuration(pub Duration);

impl serde::Serialize for WireDuration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&wire_duration(self.0))
    }
}

impl<'de> serde::Deserialize<'de> for WireDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
            Other(serde_json::Value),
        }
        let parsed = match Raw::deserialize(deserializer)? {
            Raw::Seconds(seconds) => parse_duration(&seconds.to_string()),
            Raw::Text(text) => parse_duration(&text),
            Raw::Other(value) => {
                return Err(serde::de::Error::custom(format!(
                    "bad duration {value}: use a whole number of seconds or a string such as \"30s\""
                )));
            }
        };
        parsed.map(WireDuration).map_err(serde::de::Error::custom)
    }
}

/// `1h 2m 3s`, rounded down to whole seconds, for log lines.
pub fn short_duration(duration: Duration) -> String {
    humantime::format_duration(Duration::from_secs(duration.as_secs())).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let cases = [
            ("30", 30_000),
            ("0", 0),
            (" 45 ", 45_000),
            ("500ms", 500),
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("1h 30m", 5_400_000),
        ];
        for (text, millis) in cases {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(millis)),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_garbage_negative_and_huge() {
        for text in [
            "",
            "abc",
            "-5",
            "5 parsecs",
            "1.5",
            "99999999999999999999999",
            "100000000h",
        ] {
            assert!(parse_duration(text).is_err(), "{text} should be refused");
        }
        let huge = parse_duration("100000000h").expect_err("too long");
        assert!(huge.to_string().contains("at most 10 years"), "{huge}");
    }

    #[test]
    fn body_durations_take_numbers_and_strings_only() {
        let parse = |json: &str| serde_json::from_str::<WireDuration>(json).map(|d| d.0);
        assert_eq!(parse("15").ok(), Some(Duration::from_secs(15)));
        assert_eq!(parse("\"250ms\"").ok(), Some(Duration::from_millis(250)));
        assert!(parse("-1").is_err());
        assert!(parse("1.5").is_err());
        assert!(parse("true").is_err());
        assert!(parse("1e300").is_err());
        let sent = serde_json::to_string(&WireDuration(Duration::from_millis(1500))).expect("json");
        assert_eq!(sent, "\"1500ms\"");
    }

    #[test]
    fn wire_durations() {
        assert_eq!(wire_duration(Duration::from_secs(60)), "60s");
        assert_eq!(wire_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(wire_duration(Duration::from_nanos(10)), "1ms");
    }
}
