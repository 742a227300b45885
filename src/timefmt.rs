//! Wall-clock times as RFC 3339 strings (state file and API), and durations in JSON bodies. The
//! duration syntax itself (an integer number of seconds, or a number with a unit: `500ms`,
//! `30s`, `5m`, `1h`) is [`locker_client::duration`]'s, re-exported here.

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

/// The request duration syntax and its ten-year cap live in the client crate, shared with the
/// CLI and the resource.
pub use locker_client::duration::{DurationError, MAX_DURATION, parse_duration};

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
            Raw::Other(value) => {
                return Err(serde::de::Error::custom(format!(
                    "bad duration {value}: use a whole number of seconds or a string such as \"30s\""
                )));
            }
        };
        parsed.map(BodyDuration).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
