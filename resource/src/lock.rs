//! Pure decisions about a lock's state, with no I/O: whether an entry of `GET /locks` is held,
//! the version of a state, how to describe a holder, and the holder info sent with a lock.

use std::collections::BTreeMap;
use std::time::SystemTime;

pub use locker_client::duration::short_duration;
use locker_client::limits::{MAX_INFO_BYTES, MAX_INFO_ENTRIES, info_bytes, truncate};
use locker_client::wire::{Holder, Info};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha1::{Digest, Sha1};

use crate::models::{MetadataField, Version};

/// The version of a lock that nobody holds.
pub const FREE: &str = "free";

/// A held lock, as `GET /locks` (any server) or `GET /lock/{name}` (this server) describe it.
#[derive(Debug, Clone, PartialEq)]
pub struct Holding {
    /// The (oldest) holding, with only the requestors whose count is above 0.
    pub holder: Holder,
    /// The server's whole entry, as `in` writes it to `metadata.json`.
    pub raw: Map<String, Value>,
}

impl Holding {
    /// Reads one entry of `GET /locks`. `None` when it describes a free lock: the original Go
    /// locker keeps released locks in its map with an empty key or zero counts.
    pub fn from_entry(entry: &Value) -> Option<Holding> {
        let raw = entry.as_object()?;
        let mut holder = Holder::<Info>::deserialize(entry).ok()?;
        if !holder.is_held() {
            return None;
        }
        holder.locked_by.retain(|_, count| *count > 0);
        Some(Holding {
            holder,
            raw: raw.clone(),
        })
    }

    /// Who holds the lock, for a log line: key, requestors, since when, which build.
    pub fn describe(&self, now: SystemTime) -> String {
        describe_holder(&self.holder, now)
    }
}

/// Who holds a lock or a pool's item, for a log line: key, requestors, since when, which
/// build, the lease.
pub fn describe_holder(holder: &Holder, now: SystemTime) -> String {
    let mut text = format!("key {:?} (requestors: {})", holder.key, holder.requestors());
    if let Some(since) = &holder.acquired_at {
        text.push_str(&format!(" since {since}"));
        if let Some(held) = humantime::parse_rfc3339_weak(since)
            .ok()
            .and_then(|at| now.duration_since(at).ok())
        {
            text.push_str(&format!(" ({} ago)", short_duration(held)));
        }
    }
    if let Some(build) = build_description(&holder.info) {
        text.push_str(&format!(", build {build}"));
    }
    if let Some(expires) = &holder.expires_at {
        text.push_str(&format!(", lease until {expires}"));
    }
    text
}

/// The build named by holder info, e.g. `main/deploy/prod #12 (https://ci/...)`.
pub fn build_description(info: &BTreeMap<String, String>) -> Option<String> {
    let get = |name: &str| info.get(name).map(String::as_str).filter(|v| !v.is_empty());
    let mut text = match (get("team"), get("pipeline"), get("job"), get("build_name")) {
        (Some(team), Some(pipeline), Some(job), Some(build)) => {
            format!("{team}/{pipeline}/{job} #{build}")
        }
        (_, _, _, Some(build)) => format!("#{build}"),
        _ => String::new(),
    };
    if let Some(url) = get("build_url") {
        text = if text.is_empty() {
            url.to_string()
        } else {
            format!("{text} ({url})")
        };
    }
    Some(text).filter(|t| !t.is_empty())
}

/// The version of this lock's state. It changes when the lock's key, its holders or the
/// generation of its holding change, and only then: the waiter count, lease times and other
/// locks on the server do not matter. A stable hash (SHA-1, as the original used) keeps
/// versions identical across releases of the resource.
pub fn version_of(state: Option<&Holding>) -> Version {
    let Some(Holding {
        holder: holding, ..
    }) = state
    else {
        return Version {
            reference: FREE.to_string(),
        };
    };
    let mut fingerprint = Fingerprint::default();
    fingerprint.field(&holding.key);
    for requestor in holding.locked_by.keys() {
        fingerprint.field(requestor);
    }
    let hash = fingerprint.hex();
    let reference = match holding.generation {
        Some(generation) => format!("g{generation}-{hash}"),
        None => hash,
    };
    Version { reference }
}

/// A stable hash of a state, field by field (SHA-1, as the original used): the same fields give
/// the same hex on every release of the resource, so versions survive upgrades.
#[derive(Default)]
pub struct Fingerprint(Sha1);

impl Fingerprint {
    /// Adds one field. Length-prefixed, so no two different sequences hash the same input.
    pub fn field(&mut self, text: &str) {
        self.0.update((text.len() as u64).to_be_bytes());
        self.0.update(text.as_bytes());
    }

    /// The first 8 bytes of the digest in hex.
    pub fn hex(self) -> String {
        self.0
            .finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Metadata describing a lock's current state, as `in` shows it.
pub fn state_metadata(name: &str, state: Option<&Holding>) -> Vec<MetadataField> {
    let mut fields = vec![MetadataField::new("lock", name)];
    match state {
        None => {
            fields.push(MetadataField::new("key", ""));
            fields.push(MetadataField::new("locked_by", ""));
            fields.push(MetadataField::new("generation", ""));
        }
        Some(Holding {
            holder: holding, ..
        }) => {
            fields.push(MetadataField::new("key", holding.key.clone()));
            fields.push(MetadataField::new("locked_by", holding.requestors()));
            fields.push(MetadataField::new(
                "generation",
                holding
                    .generation
                    .map(|g| g.to_string())
                    .unwrap_or_default(),
            ));
            if let Some(since) = &holding.acquired_at {
                fields.push(MetadataField::new("acquired_at", since.clone()));
            }
            if let Some(expires) = &holding.expires_at {
                fields.push(MetadataField::new("expires_at", expires.clone()));
            }
            if let Some(build) = build_description(&holding.info) {
                fields.push(MetadataField::new("holder_build", build));
            }
        }
    }
    fields
}

/// The build's identity from Concourse's environment (the `BUILD_*` variables and
/// `ATC_EXTERNAL_URL`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildEnv {
    pub team: Option<String>,
    pub pipeline: Option<String>,
    pub job: Option<String>,
    pub build_name: Option<String>,
    pub build_id: Option<String>,
    pub atc_url: Option<String>,
}

impl BuildEnv {
    pub fn from_process() -> Self {
        let [team, pipeline, job, build_name, build_id, atc_url] =
            crate::variables::BUILD.map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
        BuildEnv {
            team,
            pipeline,
            job,
            build_name,
            build_id,
            atc_url,
        }
    }

    /// The build's page: `{atc}/teams/T/pipelines/P/jobs/J/builds/N` for a job's build,
    /// `{atc}/builds/ID` for a one-off build.
    pub fn build_url(&self) -> Option<String> {
        let atc = self.atc_url.as_deref()?.trim_end_matches('/');
        match (&self.team, &self.pipeline, &self.job, &self.build_name) {
            (Some(team), Some(pipeline), Some(job), Some(build)) => Some(format!(
                "{atc}/teams/{}/pipelines/{}/jobs/{}/builds/{}",
                segment(team),
                segment(pipeline),
                segment(job),
                segment(build)
            )),
            _ => self
                .build_id
                .as_ref()
                .map(|id| format!("{atc}/builds/{}", segment(id))),
        }
    }

    /// Holder info for the server: at most [`MAX_INFO_ENTRIES`] entries and
    /// [`MAX_INFO_BYTES`] in all (the server's limits); values are shortened to fit, the URL
    /// dropped first if even that is not enough.
    pub fn info(&self) -> BTreeMap<String, String> {
        let mut entries: Vec<(&str, String)> = [
            ("team", &self.team),
            ("pipeline", &self.pipeline),
            ("job", &self.job),
            ("build_name", &self.build_name),
            ("build_id", &self.build_id),
            ("atc_url", &self.atc_url),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value.clone()?)))
        .collect();
        if let Some(url) = self.build_url() {
            entries.push(("build_url", url));
        }
        let size =
            |entries: &[(&str, String)]| info_bytes(entries.iter().map(|(k, v)| (*k, v.as_str())));
        // The URL repeats the others; drop it, then the ATC URL, before cutting values.
        for droppable in ["build_url", "atc_url"] {
            if size(&entries) > MAX_INFO_BYTES {
                entries.retain(|(name, _)| *name != droppable);
            }
        }
        if size(&entries) > MAX_INFO_BYTES {
            for (_, value) in entries.iter_mut() {
                truncate(value, MAX_INFO_VALUE);
            }
        }
        entries.truncate(MAX_INFO_ENTRIES);
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }
}

/// With six fields left, 150 bytes each keeps the whole under [`MAX_INFO_BYTES`].
const MAX_INFO_VALUE: usize = 150;

/// Percent-encodes one segment of a Concourse URL (RFC 3986 unreserved characters stay).
fn segment(text: &str) -> String {
    const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, UNRESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn holding(entry: Value) -> Option<Holding> {
        Holding::from_entry(&entry)
    }

    #[test]
    fn which_entries_are_held() {
        let cases = [
            (json!({"key": "k", "locked_by": {"k": 1}}), true),
            (json!({"key": "k", "locked_by": {"a": 0, "b": 2}}), true),
            // The original keeps released locks: empty key or zero counts mean free.
            (json!({"key": "", "locked_by": {"k": 1}}), false),
            (json!({"key": "k", "locked_by": {"k": 0}}), false),
            (json!({"key": "k", "locked_by": {}}), false),
            (json!({"key": "k"}), false),
            (json!(null), false),
            (json!("k"), false),
        ];
        for (entry, held) in cases {
            assert_eq!(holding(entry.clone()).is_some(), held, "{entry}");
        }
        let h = holding(json!({"key": "k", "locked_by": {"a": 0, "b": 2}})).unwrap();
        assert_eq!(h.holder.locked_by, BTreeMap::from([("b".to_string(), 2)]));
    }

    #[test]
    fn versions_follow_key_holders_and_generation_only() {
        let base = json!({"key": "k", "locked_by": {"a": 1}, "generation": 7,
            "acquired_at": "2024-01-01T00:00:00Z", "waiters": 0});
        let v = |entry: Value| version_of(holding(entry).as_ref()).reference;
        let reference = v(base.clone());
        assert!(reference.starts_with("g7-"), "{reference}");
        assert_eq!(version_of(None).reference, FREE);

        // Unchanged by waiters, counts, lease and info.
        let same = [
            json!({"key": "k", "locked_by": {"a": 3}, "generation": 7, "waiters": 4,
                "expires_at": "2030-01-01T00:00:00Z", "info": {"job": "x"}}),
            json!({"key": "k", "locked_by": {"a": 1}, "generation": 7}),
        ];
        for entry in same {
            assert_eq!(v(entry.clone()), reference, "{entry}");
        }
        // Changed by key, holders, generation.
        let different = [
            json!({"key": "j", "locked_by": {"a": 1}, "generation": 7}),
            json!({"key": "k", "locked_by": {"a": 1, "b": 1}, "generation": 7}),
            json!({"key": "k", "locked_by": {"b": 1}, "generation": 7}),
            json!({"key": "k", "locked_by": {"a": 1}, "generation": 8}),
            json!({"key": "k", "locked_by": {"a": 1}}),
        ];
        for entry in different {
            assert_ne!(v(entry.clone()), reference, "{entry}");
        }
        // The original server has no generation: the hash alone.
        let original = v(json!({"key": "k", "locked_by": {"a": 1}}));
        assert_eq!(original.len(), 16);
        // No ambiguity between key and requestor boundaries.
        assert_ne!(
            v(json!({"key": "ab", "locked_by": {"c": 1}})),
            v(json!({"key": "a", "locked_by": {"bc": 1}}))
        );
        // Stable across releases: fixed values (SHA-1 over length-prefixed key and requestors,
        // its first 8 bytes in hex). A change of the hash input changes these and would make
        // every pipeline see a new version after an upgrade of the resource.
        assert_eq!(original, "62185eee9941db6b");
        assert_eq!(reference, "g7-62185eee9941db6b");
        assert_eq!(
            v(json!({"key": "prod", "locked_by": {"smoke": 2, "deploy": 1}, "generation": 3})),
            "g3-8404e8452c7a107a"
        );
        assert_eq!(original, v(json!({"key": "k", "locked_by": {"a": 2}})));
    }

    #[test]
    fn describes_the_holder() {
        let h = holding(json!({
            "key": "prod", "locked_by": {"deploy": 1, "smoke": 2}, "generation": 3,
            "acquired_at": "2024-01-01T00:00:00Z",
            "info": {"team": "main", "pipeline": "cf", "job": "deploy", "build_name": "12",
                     "build_url": "https://ci/b"}
        }))
        .unwrap();
        let now = humantime::parse_rfc3339("2024-01-01T00:01:05Z").unwrap();
        assert_eq!(
            h.describe(now),
            "key \"prod\" (requestors: deploy, smoke (x2)) since 2024-01-01T00:00:00Z (1m 5s ago), \
             build main/cf/deploy #12 (https://ci/b)"
        );
        let bare = holding(json!({"key": "k", "locked_by": {"k": 1}})).unwrap();
        assert_eq!(bare.describe(now), "key \"k\" (requestors: k)");
    }

    #[test]
    fn build_urls() {
        let job = BuildEnv {
            team: Some("main".into()),
            pipeline: Some("my pipeline".into()),
            job: Some("deploy".into()),
            build_name: Some("12.1".into()),
            build_id: Some("999".into()),
            atc_url: Some("https://ci.example.com/".into()),
        };
        assert_eq!(
            job.build_url().as_deref(),
            Some(
                "https://ci.example.com/teams/main/pipelines/my%20pipeline/jobs/deploy/builds/12.1"
            )
        );
        let one_off = BuildEnv {
            build_id: Some("999".into()),
            atc_url: Some("https://ci".into()),
            ..BuildEnv::default()
        };
        assert_eq!(
            one_off.build_url().as_deref(),
            Some("https://ci/builds/999")
        );
        assert_eq!(BuildEnv::default().build_url(), None);
        assert!(BuildEnv::default().info().is_empty());
        assert_eq!(
            job.info().get("build_url").map(String::as_str),
            job.build_url().as_deref()
        );
    }

    #[test]
    fn info_fits_the_server_limits() {
        let long = "x".repeat(2000);
        let env = BuildEnv {
            team: Some(long.clone()),
            pipeline: Some(long.clone()),
            job: Some(long.clone()),
            build_name: Some("é".repeat(500)),
            build_id: Some(long.clone()),
            atc_url: Some(format!("https://{long}")),
        };
        let info = env.info();
        let bytes: usize = info.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(bytes <= MAX_INFO_BYTES, "{bytes}");
        assert!(info.len() <= MAX_INFO_ENTRIES);
        assert!(info.contains_key("team") && info.contains_key("build_name"));
    }
}
