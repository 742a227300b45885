//! `source.trigger: released`: a version for each release of the lock, so that a pipeline can
//! run a job when the lock becomes free ("run when deploy-prod is released").
//!
//! The versions come from the server's history (docs/history.md): `check` reads the lock's
//! events after the last version's event id (`GET /history?lock=NAME&since=ID`) and emits one
//! version per `released`, `force-released`, `expired` or `reclaimed` event, oldest first;
//! without a version, only the latest such event (Concourse's convention for a first check).
//! `in` writes the event's JSON to `event.json`.

use std::path::Path;
use std::time::Duration;

use locker_client::duration::short_duration;
use locker_client::wire::Event;
use serde_json::Value;

use crate::client::Client;
use crate::error::ResourceError;
use crate::lock::build_description;
use crate::log;
use crate::models::{ConfigError, EventVersion, MetadataField, VersionResponse, invalid};

/// The kinds of event that end a holding of the lock.
pub const RELEASES: [&str; 4] = ["released", "force-released", "expired", "reclaimed"];

/// The lock's last events `check` looks through for its first version (the server keeps at
/// most 1,000 per lock by default).
const LAST_EVENTS: u64 = 1000;

/// The most events one `check` reads after the last version.
const MOST_EVENTS: u64 = 100_000;

pub fn is_release(event: &Event) -> bool {
    RELEASES.contains(&event.kind.as_str())
}

/// The version of a release event.
pub fn version_of(event: &Event) -> EventVersion {
    EventVersion {
        event: event.id.to_string(),
        kind: Some(event.kind.clone()),
        at: Some(event.at.clone()),
    }
}

/// The event id of a version `check` or `in` was given: `None` for a version of another kind
/// (a `put`'s `{"ref": ...}`, which a resource with a trigger still emits), an error for an
/// event id that is not a number.
pub fn event_id(version: Option<&Value>) -> Result<Option<u64>, ConfigError> {
    let Some(event) = version.and_then(|v| v.get("event")) else {
        return Ok(None);
    };
    let parsed = match event {
        Value::String(text) => text.trim().parse::<u64>().ok(),
        Value::Number(number) => number.as_u64(),
        _ => None,
    };
    parsed.map(Some).ok_or_else(|| {
        invalid(
            "version.event",
            format!("must be an event id (a whole number), not {event}"),
        )
    })
}

/// The versions for `check`, from the lock's events: after `previous` (itself first, as
/// Concourse expects of a version that is still the latest), or the latest release alone.
pub fn versions(previous: Option<(&Value, u64)>, events: &[Event]) -> Vec<Value> {
    let releases = events.iter().filter(|e| is_release(e));
    let mut versions: Vec<Value> = Vec::new();
    match previous {
        Some((version, id)) => {
            versions.push(version.clone());
            versions.extend(
                releases
                    .filter(|e| e.id > id)
                    .filter_map(|e| serde_json::to_value(version_of(e)).ok()),
            );
        }
        None => versions.extend(
            releases
                .max_by_key(|e| e.id)
                .and_then(|e| serde_json::to_value(version_of(e)).ok()),
        ),
    }
    versions
}

/// `check` with a trigger: the lock's releases after `version`.
pub async fn check(
    client: &Client,
    name: &str,
    version: Option<&Value>,
) -> Result<Value, ResourceError> {
    let previous = event_id(version)?;
    let (events, previous) = match (previous, version) {
        (Some(id), Some(version)) => {
            let (events, last) = client.lock_events_after(name, id, MOST_EVENTS).await?;
            if last.lost > id {
                log!(
                    "warning: the server no longer keeps lock {name:?}'s events from {} to {}: \
                     releases among them are missed",
                    id + 1,
                    last.lost
                );
            }
            (events, Some((version, id)))
        }
        _ => (client.lock_history(name, LAST_EVENTS).await?.events, None),
    };
    let versions = versions(previous, &events);
    let new = versions.len() - usize::from(previous.is_some());
    match (new, previous) {
        (0, Some((_, id))) => log!("lock {name:?} has not been released since event {id}"),
        (0, None) => log!("no release of lock {name:?} in its history"),
        (n, _) => log!("lock {name:?}: {n} new release(s)"),
    }
    Ok(Value::Array(versions))
}

/// The event `id` of lock `name`, if the server still keeps it.
async fn find(client: &Client, name: &str, id: u64) -> Result<Option<Event>, ResourceError> {
    let (events, _) = client
        .lock_events_after(name, id.saturating_sub(1), 1)
        .await?;
    Ok(events.into_iter().find(|e| e.id == id))
}

/// `in` with a release version: writes the event to `event.json`.
pub async fn fetch(
    client: &Client,
    name: &str,
    version: &Value,
    id: u64,
    directory: &Path,
) -> Result<Value, ResourceError> {
    let requested: EventVersion = serde_json::from_value(version.clone())
        .map_err(|e| invalid("version", format!("is not a release of the lock: {e}")))?;
    let event = match find(client, name, id).await? {
        Some(event) => event,
        None => {
            log!(
                "warning: the server no longer keeps event {id} of lock {name:?}: writing what \
                 the version says"
            );
            Event {
                id,
                at: requested.at.clone().unwrap_or_default(),
                kind: requested.kind.clone().unwrap_or_default(),
                lock: Some(name.to_string()),
                ..Event::default()
            }
        }
    };
    std::fs::create_dir_all(directory).map_err(|source| ResourceError::CreateDirectory {
        path: directory.to_path_buf(),
        source,
    })?;
    let json = serde_json::to_string(&event).map_err(ResourceError::Encode)?;
    let path = directory.join("event.json");
    std::fs::write(&path, json).map_err(|source| ResourceError::Write { path, source })?;
    log!("lock {name:?}: {} at {} (event {id})", event.kind, event.at);
    let response = VersionResponse {
        version: requested,
        metadata: metadata(name, &event),
    };
    serde_json::to_value(response).map_err(ResourceError::Encode)
}

/// What `in` shows of a release.
fn metadata(name: &str, event: &Event) -> Vec<MetadataField> {
    let mut fields = vec![
        MetadataField::new("lock", name),
        MetadataField::new("event", event.id.to_string()),
        MetadataField::new("kind", event.kind.clone()),
        MetadataField::new("at", event.at.clone()),
    ];
    let mut add = |field: &str, value: Option<String>| {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            fields.push(MetadataField::new(field, value));
        }
    };
    add("key", event.key.clone());
    add("requestor", event.requestor.clone());
    add("generation", event.generation.map(|g| g.to_string()));
    add(
        "held",
        event
            .held_ms
            .map(|ms| short_duration(Duration::from_millis(ms))),
    );
    add("holder_build", build_description(&event.info));
    add("by", event.by.clone());
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(id: u64, kind: &str) -> Event {
        Event {
            id,
            at: format!("t{id}"),
            kind: kind.into(),
            lock: Some("prod".into()),
            ..Event::default()
        }
    }

    fn ids(versions: &[Value]) -> Vec<String> {
        versions
            .iter()
            .map(|v| v["event"].as_str().unwrap_or("?").to_string())
            .collect()
    }

    #[test]
    fn one_version_per_release_in_order_after_the_previous() {
        let events = [
            event(3, "acquired"),
            event(4, "released"),
            event(5, "queued"),
            event(6, "acquired"),
            event(7, "force-released"),
            event(8, "acquired"),
            event(9, "expired"),
            event(10, "acquired"),
            event(11, "reclaimed"),
            event(12, "acquired"),
        ];
        let previous = json!({"event": "2", "kind": "released", "at": "t2"});
        let versions = versions(Some((&previous, 2)), &events);
        assert_eq!(ids(&versions), ["2", "4", "7", "9", "11"]);
        assert_eq!(
            versions[0], previous,
            "the previous version comes back as it was"
        );
        assert_eq!(
            versions[2],
            json!({"event": "7", "kind": "force-released", "at": "t7"})
        );
        // Nothing released since: the previous version alone.
        assert_eq!(ids(&versions_after(&events[9..], 11)), ["11"]);
        // A first check: the latest release only; none without one.
        assert_eq!(ids(&super::versions(None, &events)), ["11"]);
        assert!(super::versions(None, &events[..1]).is_empty());
    }

    fn versions_after(events: &[Event], id: u64) -> Vec<Value> {
        let previous = json!({"event": id.to_string()});
        versions(Some((&previous, id)), events)
    }

    #[test]
    fn event_ids_of_versions() {
        assert_eq!(event_id(Some(&json!({"event": "42"}))), Ok(Some(42)));
        assert_eq!(event_id(Some(&json!({"event": 42}))), Ok(Some(42)));
        assert_eq!(event_id(Some(&json!({"ref": "free"}))), Ok(None));
        assert_eq!(event_id(None), Ok(None));
        let error = event_id(Some(&json!({"event": "soon"}))).expect_err("not a number");
        assert!(error.to_string().contains("version.event"), "{error}");
    }
}
