//! Wall-clock times as RFC 3339 strings (state file and API), and the request duration syntax:
//! an integer number of seconds, or a number with a unit (`500ms`, `30s`, `5m`, `1h`).

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer, Serializer};

/// Formats a time as RFC 3339 in UTC with millisecond precision.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

pub fn serialize<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&rfc3339(*time))
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SystemTime, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_rfc3339_weak(&text)
        .map_err(|e| serde::de::Error::custom(format!("bad time {text:?}: {e}")))
}

/// The same, for optional times (`null` or absent means none).
pub mod optional {
    use super::*;

    pub fn serialize<S: Serializer>(
        time: &Option<SystemTime>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match time {
            Some(time) => super::serialize(time, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        match Option::<String>::deserialize(deserializer)? {
            Some(text) => humantime::parse_rfc3339_weak(&text)
                .map(Some)
                .map_err(|e| serde::de::Error::custom(format!("bad time {text:?}: {e}"))),
            None => Ok(None),
        }
    }
}

/// The longest duration accepted anywhere (ten years): larger values are surely mistakes and
/// would overflow time arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parses `30` (seconds), `500ms`, `30s`, `5m`, `1h` or combinations such as `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let duration = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let seconds: u64 = text
            .parse()
            .map_err(|_| format!("duration {text:?} is out of range"))?;
        Duration::from_secs(seconds)
    } else {
        humantime::parse_duration(text).map_err(|e| {
            format!("bad duration {text:?} ({e}): use seconds or a unit, e.g. 500ms, 30s, 5m, 1h")
        })?
    };
    if duration > MAX_DURATION {
        return Err(format!(
            "duration {text:?} is out of range (at most 10 years)"
        ));
    }
    Ok(duration)
}

/// A duration given in a JSON body: an integer number of seconds or a string as above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyDuration(pub Duration);

impl<'de> Deserialize<'de> for BodyDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
            Other(serde_json::Value),
        }
        let parsed = match Raw::deserialize(deserializer)? {
            Raw::Seconds(seconds) => parse_duration(&seconds.to_string()),
            Raw::Text(text) => parse_duration(&text),
            Raw::Other(value) => Err(format!(
                "bad duration {value}: use a whole number of seconds or a string such as \"30s\""
            )),
        };
        parsed.map(BodyDuration).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let cases = [
            ("30", 30_000),
            ("0", 0),
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
    }

    #[test]
    fn body_durations_take_numbers_and_strings_only() {
        let parse = |json: &str| serde_json::from_str::<BodyDuration>(json).map(|d| d.0);
        assert_eq!(parse("15").ok(), Some(Duration::from_secs(15)));
        assert_eq!(parse("\"250ms\"").ok(), Some(Duration::from_millis(250)));
        assert!(parse("-1").is_err());
        assert!(parse("1.5").is_err());
        assert!(parse("true").is_err());
        assert!(parse("1e300").is_err());
    }

    #[test]
    fn times_round_trip_through_rfc3339() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        let text = rfc3339(time);
        assert_eq!(humantime::parse_rfc3339_weak(&text).ok(), Some(time));
    }
}
