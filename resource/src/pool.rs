//! Pure decisions of the pool mode (`source.pool`), with no I/O: the version of a pool's
//! state, which item a version found by `check` names, the key of a claim, the `claim.json`
//! that `in` writes beside pool-resource's `name` and `metadata`, and the descriptions in log
//! lines and metadata.

use std::time::SystemTime;

use locker_client::limits::{MAX_KEY, truncate};
use locker_client::wire::{Holder, PoolItem, PoolStatus};
use serde::{Deserialize, Serialize};

use crate::lock::{BuildEnv, Fingerprint, build_description, describe_holder};
use crate::models::{MetadataField, PoolVersion};

/// The `ref` of a pool without items.
pub const EMPTY: &str = "empty";

/// The file `in` writes beside `name` and `metadata` when the version is a claim: what lets a
/// later `release` or `remove` of that directory check that the item is still held by it.
pub const CLAIM_FILE: &str = "claim.json";

/// The `ref` of a pool's state: a hash of every item's name, metadata and claim (key,
/// generation and requestors), so it changes when an item is added, removed, updated, claimed
/// or released, and not when claims wait, counts change or leases are renewed. A pool that
/// returns to an earlier state (every item free again, say) has that state's `ref` again: the
/// version's `at` keeps it new to Concourse.
pub fn state_ref(pool: Option<&PoolStatus>) -> String {
    let Some(pool) = pool.filter(|p| !p.items.is_empty()) else {
        return EMPTY.to_string();
    };
    let mut items: Vec<&PoolItem> = pool.items.iter().collect();
    items.sort_by(|a, b| a.name.cmp(&b.name));
    let mut fingerprint = Fingerprint::default();
    for item in items {
        fingerprint.field(&item.name);
        fingerprint.field(&item.metadata);
        match item.holder.as_ref().filter(|_| item.claimed) {
            None => fingerprint.field("unclaimed"),
            Some(holder) => {
                fingerprint.field("claimed");
                fingerprint.field(&holder.key);
                fingerprint.field(&holder.generation.unwrap_or_default().to_string());
                fingerprint.field(&holder.locked_by.len().to_string());
                for requestor in holder.locked_by.keys() {
                    fingerprint.field(requestor);
                }
            }
        }
    }
    fingerprint.hex()
}

/// The item claimed last (the highest fencing generation) that is still claimed.
pub fn latest_claim(pool: &PoolStatus) -> Option<&PoolItem> {
    pool.items
        .iter()
        .filter(|item| item.claimed)
        .max_by_key(|item| item.holder.as_ref().and_then(|h| h.generation))
}

/// The version `check` emits, taken `at`: the state's `ref`, naming the item claimed last (what
/// a plain `get` then writes, as pool-resource's names the item of the last commit), or no item
/// when none is claimed.
pub fn check_version(pool: Option<&PoolStatus>, at: SystemTime) -> PoolVersion {
    PoolVersion {
        reference: state_ref(pool),
        item: pool.and_then(latest_claim).map(|item| item.name.clone()),
        key: None,
        generation: None,
        at: Some(timestamp(at)),
    }
}

/// A version's `at`: RFC 3339, UTC, in milliseconds.
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// The key of one claim: the build's page (`{ATC_EXTERNAL_URL}/builds/{BUILD_ID}`, else
/// `build {BUILD_ID}`) and a nonce, so that a later job can release exactly this claim, two
/// claims of one build never share a holding, and a claim interrupted by a signal can be found
/// by its key.
pub fn claim_key(build: &BuildEnv, nonce: u64) -> String {
    let mut build_part = match (&build.atc_url, &build.build_id) {
        (Some(atc), Some(id)) => format!("{}/builds/{id}", atc.trim_end_matches('/')),
        (None, Some(id)) => format!("build {id}"),
        (_, None) => "a build".to_string(),
    };
    let nonce = format!(" claim {:012x}", nonce & 0xffff_ffff_ffff);
    truncate(&mut build_part, MAX_KEY - nonce.len());
    build_part + &nonce
}

/// `claim.json`: the claim a directory's item was got by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimFile {
    pub pool: String,
    pub item: String,
    pub key: String,
    /// The claim's fencing generation.
    pub generation: u64,
}

impl ClaimFile {
    /// The claim a version names, if it names one.
    pub fn of_version(pool: &str, version: &PoolVersion) -> Option<ClaimFile> {
        Some(ClaimFile {
            pool: pool.to_string(),
            item: version.item.clone()?,
            key: version.key.clone()?,
            generation: version.generation.as_deref()?.parse().ok()?,
        })
    }

    /// Whether `holder` is this claim.
    pub fn is(&self, holder: &Holder) -> bool {
        holder.key == self.key && holder.generation == Some(self.generation)
    }

    /// For messages: `key "..." (generation 7)`.
    pub fn describe(&self) -> String {
        format!("key {:?} (generation {})", self.key, self.generation)
    }
}

/// An item's state, for a log line: `claimed by key ... since ..., build ...` or `unclaimed`.
pub fn describe_item(item: &PoolItem, now: SystemTime) -> String {
    match item.holder.as_ref().filter(|_| item.claimed) {
        Some(holder) => format!("claimed by {}", describe_holder(holder, now)),
        None => "unclaimed".to_string(),
    }
}

/// Most claimed items a line names.
const NAMED_CLAIMS: usize = 10;

/// Why a claim of any item waits, for a log line: how many items are claimed and by whom (the
/// first [`NAMED_CLAIMS`] of them), and how many claims wait.
pub fn describe_claims(pool: &PoolStatus, now: SystemTime) -> String {
    let claimed: Vec<&PoolItem> = pool.items.iter().filter(|i| i.claimed).collect();
    let mut named: Vec<String> = claimed
        .iter()
        .take(NAMED_CLAIMS)
        .map(|item| format!("{} {}", item.name, describe_item(item, now)))
        .collect();
    if claimed.len() > NAMED_CLAIMS {
        named.push(format!("and {} more", claimed.len() - NAMED_CLAIMS));
    }
    let holders = match named.is_empty() {
        true => String::new(),
        false => format!(" ({})", named.join("; ")),
    };
    format!(
        "{} of {} item(s) claimed{holders}; {} claim(s) waiting",
        claimed.len(),
        pool.items.len(),
        pool.waiters
    )
}

/// Metadata for an item: pool-resource's `lock_name` and `pool_name`, then whether it is
/// claimed, and the claim's key, generation and build.
pub fn item_metadata(pool: &str, item: &str, holder: Option<&Holder>) -> Vec<MetadataField> {
    let mut fields = vec![
        MetadataField::new("lock_name", item),
        MetadataField::new("pool_name", pool),
        MetadataField::new("claimed", holder.is_some().to_string()),
    ];
    if let Some(holder) = holder {
        fields.push(MetadataField::new("key", holder.key.clone()));
        if let Some(generation) = holder.generation {
            fields.push(MetadataField::new("generation", generation.to_string()));
        }
        if let Some(build) = build_description(&holder.info) {
            fields.push(MetadataField::new("holder_build", build));
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn pool(items: Value) -> PoolStatus {
        serde_json::from_value(json!({"name": "aws", "waiters": 0, "items": items}))
            .expect("pool status")
    }

    fn claimed(name: &str, key: &str, generation: u64) -> Value {
        json!({"name": name, "metadata": "m", "claimed": true,
            "holder": {"key": key, "locked_by": {key: 1}, "generation": generation}})
    }

    fn unclaimed(name: &str, metadata: &str) -> Value {
        json!({"name": name, "metadata": metadata, "claimed": false})
    }

    #[test]
    fn the_ref_follows_items_metadata_and_claims_only() {
        let base = pool(json!([unclaimed("a", "m"), claimed("b", "k", 3)]));
        let reference = state_ref(Some(&base));
        assert_eq!(reference.len(), 16);
        assert_eq!(state_ref(None), EMPTY);
        assert_eq!(state_ref(Some(&pool(json!([])))), EMPTY);

        // Unchanged by waiters, item order, counts, leases and info.
        let mut same = pool(json!([claimed("b", "k", 3), unclaimed("a", "m")]));
        same.waiters = 4;
        let holder = same.items[0].holder.as_mut().expect("holder");
        holder.locked_by.insert("k".into(), 3);
        holder.expires_at = Some("2030-01-01T00:00:00Z".into());
        holder.info.insert("job".into(), "j".into());
        assert_eq!(state_ref(Some(&same)), reference);

        // Changed by each of the others.
        let different = [
            json!([unclaimed("a", "m2"), claimed("b", "k", 3)]),
            json!([unclaimed("a", "m"), claimed("b", "k", 4)]),
            json!([unclaimed("a", "m"), claimed("b", "j", 3)]),
            json!([unclaimed("a", "m"), unclaimed("b", "m")]),
            json!([claimed("a", "k", 5), claimed("b", "k", 3)]),
            json!([unclaimed("a", "m")]),
            json!([
                unclaimed("a", "m"),
                claimed("b", "k", 3),
                unclaimed("c", "")
            ]),
            json!([unclaimed("x", "m"), claimed("b", "k", 3)]),
        ];
        for items in different {
            assert_ne!(state_ref(Some(&pool(items.clone()))), reference, "{items}");
        }
        // No ambiguity between fields: a name's end and the metadata's start.
        assert_ne!(
            state_ref(Some(&pool(json!([unclaimed("ab", "c")])))),
            state_ref(Some(&pool(json!([unclaimed("a", "bc")]))))
        );
        // Stable across releases of the resource: a fixed value.
        assert_eq!(
            state_ref(Some(&pool(json!([unclaimed("env-1", "")])))),
            "62e69374e4573e3c"
        );
    }

    #[test]
    fn check_names_the_item_claimed_last() {
        let p = pool(json!([
            claimed("a", "k", 9),
            unclaimed("b", "m"),
            claimed("c", "j", 4)
        ]));
        let at = humantime::parse_rfc3339("2024-01-01T00:00:00.5Z").expect("time");
        let version = check_version(Some(&p), at);
        assert_eq!(version.item.as_deref(), Some("a"));
        assert_eq!((version.key, version.generation), (None, None));
        assert_eq!(version.at.as_deref(), Some("2024-01-01T00:00:00.500Z"));
        let free = pool(json!([unclaimed("a", "m")]));
        assert_eq!(check_version(Some(&free), at).item, None);
        assert_eq!(check_version(None, at).item, None);
    }

    #[test]
    fn claim_keys_name_the_build_and_differ_per_claim() {
        let build = BuildEnv {
            build_id: Some("4242".into()),
            atc_url: Some("https://ci.example.com/".into()),
            ..BuildEnv::default()
        };
        assert_eq!(
            claim_key(&build, 0xabc),
            "https://ci.example.com/builds/4242 claim 000000000abc"
        );
        assert_ne!(claim_key(&build, 1), claim_key(&build, 2));
        let bare = BuildEnv {
            build_id: Some("7".into()),
            ..BuildEnv::default()
        };
        assert_eq!(claim_key(&bare, 1), "build 7 claim 000000000001");
        assert_eq!(
            claim_key(&BuildEnv::default(), 1),
            "a build claim 000000000001"
        );
        let long = BuildEnv {
            build_id: Some("1".into()),
            atc_url: Some(format!("https://{}", "x".repeat(5000))),
            ..BuildEnv::default()
        };
        let key = claim_key(&long, 1);
        assert!(key.len() <= MAX_KEY && key.ends_with(" claim 000000000001"));
    }

    #[test]
    fn claim_files_come_from_claim_versions_only() {
        let version =
            |item: Option<&str>, key: Option<&str>, generation: Option<&str>| PoolVersion {
                reference: "r".into(),
                item: item.map(str::to_string),
                key: key.map(str::to_string),
                generation: generation.map(str::to_string),
                at: None,
            };
        let claim = ClaimFile::of_version("aws", &version(Some("e"), Some("k"), Some("7")))
            .expect("a claim");
        assert_eq!(
            claim,
            ClaimFile {
                pool: "aws".into(),
                item: "e".into(),
                key: "k".into(),
                generation: 7
            }
        );
        for partial in [
            version(Some("e"), None, None),
            version(None, Some("k"), Some("7")),
            version(Some("e"), Some("k"), None),
            version(Some("e"), Some("k"), Some("seven")),
        ] {
            assert_eq!(ClaimFile::of_version("aws", &partial), None, "{partial:?}");
        }
        let holder = |key: &str, generation| Holder {
            key: key.into(),
            generation: Some(generation),
            ..Holder::default()
        };
        assert!(claim.is(&holder("k", 7)));
        assert!(!claim.is(&holder("k", 8)));
        assert!(!claim.is(&holder("j", 7)));
    }

    #[test]
    fn a_wait_names_the_first_holders_and_counts() {
        let now = SystemTime::UNIX_EPOCH;
        let mut items: Vec<Value> = (0..12)
            .map(|n| claimed(&format!("e{n:02}"), "k", n))
            .collect();
        items.push(unclaimed("free", ""));
        let mut p = pool(Value::Array(items));
        p.waiters = 3;
        let line = describe_claims(&p, now);
        assert!(
            line.starts_with("12 of 13 item(s) claimed (e00 claimed by key \"k\""),
            "{line}"
        );
        assert!(
            line.contains("e09 claimed") && !line.contains("e10 claimed"),
            "{line}"
        );
        assert!(
            line.ends_with("; and 2 more); 3 claim(s) waiting"),
            "{line}"
        );
        assert!(!line.contains("free"), "{line}");
        let none = pool(json!([unclaimed("a", "")]));
        assert_eq!(
            describe_claims(&none, now),
            "0 of 1 item(s) claimed; 0 claim(s) waiting"
        );
    }

    #[test]
    fn metadata_starts_with_pool_resources_names() {
        let p = pool(json!([claimed("a", "k", 9)]));
        let fields = item_metadata("aws", "a", p.items[0].holder.as_ref());
        let pairs: Vec<(&str, &str)> = fields
            .iter()
            .map(|f| (f.name.as_str(), f.value.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("lock_name", "a"),
                ("pool_name", "aws"),
                ("claimed", "true"),
                ("key", "k"),
                ("generation", "9")
            ]
        );
        assert_eq!(item_metadata("aws", "b", None).len(), 3);
    }
}
