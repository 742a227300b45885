//! Wall-clock times as RFC 3339 strings (state file and API). The duration syntax (an integer
//! number of seconds, or a number with a unit: `500ms`, `30s`, `5m`, `1h`) is
//! [`locker_client::duration`]'s, re-exported here; durations in request bodies are its
//! `WireDuration`.

use std::time::SystemTime;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_through_rfc3339() {
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_123);
        let text = rfc3339(time);
        assert_eq!(humantime::parse_rfc3339_weak(&text).ok(), Some(time));
    }
}
