//! `locker pool import DIR`: a checked-out concourse/pool-resource repository into a running
//! server. The repository holds one directory per pool, each with `unclaimed/` and `claimed/`
//! directories whose files are the items (the file's name is the item's, its contents the
//! metadata); names starting with `.` (`.gitkeep`, `.git`) are passed over, as pool-resource
//! does.
//!
//! Three steps: [`read_repository`] reads the directory, [`plan`] compares each item with what
//! the server has (a pure function), and [`run`] prints the plan and, unless it is a dry run,
//! adds the items. Adding is idempotent on the server too (an item already there the same way
//! answers 200 `changed: false`; one there otherwise 409), so a second import, or one racing
//! with a pipeline, changes nothing it should not.

use std::collections::BTreeMap;
use std::path::Path;

use locker_client::wire::{Info, ItemBody, LockRequest, PoolItem, PoolStatus};
use reqwest::StatusCode;

use super::http::{Connection, refused};
use super::{Failure, exit};

/// The key items claimed in git are claimed under on the server. A pipeline's `release:` step
/// whose directory holds only `name` and `metadata` releases by name whatever the key; this
/// key says where the claim came from.
pub const IMPORT_KEY: &str = "imported-from-git";

/// Largest metadata the server takes (`MAX_METADATA` in `src/api/pools.rs`).
const MAX_METADATA: usize = 64 * 1024;

/// One item as the repository has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitItem {
    pub metadata: String,
    pub claimed: bool,
}

/// What the repository holds: pool → item → item, and each thing passed over, with why.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Repository {
    pub pools: BTreeMap<String, BTreeMap<String, GitItem>>,
    /// Items that cannot be imported: (pool, item, why).
    pub unusable: Vec<(String, String, String)>,
    /// Directories and files passed over, with why (said on stderr).
    pub notes: Vec<String>,
}

/// What to do with one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Not on the server: add it, as the repository has it.
    Add(GitItem),
    /// On the server the same way (metadata and state): nothing to do.
    Same,
    /// On the server otherwise: left as it is, and said why.
    Differs(String),
    /// Cannot be imported (not UTF-8, too long ...): said why.
    Unusable(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub pool: String,
    pub item: String,
    pub action: Action,
}

/// Reads a pool-resource repository checked out at `dir`.
pub fn read_repository(dir: &Path) -> Result<Repository, Failure> {
    let mut repository = Repository::default();
    for (pool, pool_dir) in entries(dir, &mut repository.notes)? {
        if !pool_dir.is_dir() {
            continue;
        }
        let mut items = BTreeMap::new();
        let mut found = false;
        for (state, claimed) in [("unclaimed", false), ("claimed", true)] {
            let state_dir = pool_dir.join(state);
            if !state_dir.is_dir() {
                continue;
            }
            found = true;
            for (item, path) in entries(&state_dir, &mut repository.notes)? {
                if !path.is_file() {
                    repository
                        .notes
                        .push(format!("{} is not a file: passed over", path.display()));
                    continue;
                }
                let unusable = |why: String| (pool.clone(), item.clone(), why);
                let bytes = match std::fs::read(&path) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        repository
                            .unusable
                            .push(unusable(format!("cannot read {}: {e}", path.display())));
                        continue;
                    }
                };
                if bytes.len() > MAX_METADATA {
                    repository.unusable.push(unusable(format!(
                        "its metadata is {} bytes long; the server takes at most {MAX_METADATA}",
                        bytes.len()
                    )));
                    continue;
                }
                let Ok(metadata) = String::from_utf8(bytes) else {
                    repository
                        .unusable
                        .push(unusable("its metadata is not UTF-8 text".to_string()));
                    continue;
                };
                if items
                    .insert(item.clone(), GitItem { metadata, claimed })
                    .is_some()
                {
                    items.remove(&item);
                    repository.unusable.push(unusable(
                        "it is in both claimed/ and unclaimed/".to_string(),
                    ));
                }
            }
        }
        if !found {
            repository.notes.push(format!(
                "{} has neither claimed/ nor unclaimed/: not a pool, passed over",
                pool_dir.display()
            ));
        } else if items.is_empty() {
            repository.notes.push(format!(
                "pool {pool:?} has no items in the repository: nothing to import"
            ));
        } else {
            repository.pools.insert(pool, items);
        }
    }
    Ok(repository)
}

/// The entries of `dir` by name, those starting with `.` left out; names that are not UTF-8
/// are noted and left out.
fn entries(
    dir: &Path,
    notes: &mut Vec<String>,
) -> Result<Vec<(String, std::path::PathBuf)>, Failure> {
    let read = std::fs::read_dir(dir).map_err(|e| {
        Failure::new(
            exit::USAGE,
            format!("cannot read the directory {}: {e}", dir.display()),
        )
    })?;
    let mut found = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| {
            Failure::new(
                exit::USAGE,
                format!("cannot read the directory {}: {e}", dir.display()),
            )
        })?;
        match entry.file_name().into_string() {
            Ok(name) if name.starts_with('.') => {}
            Ok(name) => found.push((name, entry.path())),
            Err(_) => notes.push(format!(
                "{}: the name is not UTF-8, passed over",
                entry.path().display()
            )),
        }
    }
    found.sort();
    Ok(found)
}

/// What to do with each item of the repository, given what the server has (pool → its
/// status; a pool the server does not have is absent).
pub fn plan(repository: &Repository, server: &BTreeMap<String, PoolStatus>) -> Vec<Step> {
    let mut steps = Vec::new();
    for (pool, items) in &repository.pools {
        let on_server: BTreeMap<&str, &PoolItem> = server
            .get(pool)
            .map(|status| status.items.iter().map(|i| (i.name.as_str(), i)).collect())
            .unwrap_or_default();
        for (item, git) in items {
            let action = match on_server.get(item.as_str()) {
                None => Action::Add(git.clone()),
                Some(there) => compare(git, there),
            };
            steps.push(Step {
                pool: pool.clone(),
                item: item.clone(),
                action,
            });
        }
    }
    for (pool, item, why) in &repository.unusable {
        steps.push(Step {
            pool: pool.clone(),
            item: item.clone(),
            action: Action::Unusable(why.clone()),
        });
    }
    steps
}

/// Whether the server has the item as the repository does: the same metadata, unclaimed, or
/// claimed under [`IMPORT_KEY`] (what an earlier import made of an item claimed in git).
fn compare(git: &GitItem, there: &PoolItem) -> Action {
    let state = match (&there.holder, git.claimed) {
        (None, false) => None,
        (Some(holder), true) if holder.key == IMPORT_KEY => None,
        (Some(holder), true) => Some(format!(
            "the server has it claimed under key {:?}, not {IMPORT_KEY:?}",
            holder.key
        )),
        (Some(holder), false) => Some(format!(
            "the server has it claimed (key {:?}), git unclaimed",
            holder.key
        )),
        (None, true) => Some("the server has it unclaimed, git claimed".to_string()),
    };
    let metadata = (there.metadata != git.metadata).then(|| {
        format!(
            "the server has other metadata ({} bytes, git {})",
            there.metadata.len(),
            git.metadata.len()
        )
    });
    match (state, metadata) {
        (None, None) => Action::Same,
        (Some(why), None) | (None, Some(why)) => Action::Differs(why),
        (Some(state), Some(metadata)) => Action::Differs(format!("{state}; {metadata}")),
    }
}

fn describe(git: &GitItem) -> String {
    let state = if git.claimed {
        format!("claimed under key {IMPORT_KEY:?}")
    } else {
        "unclaimed".to_string()
    };
    format!("{state}, {} bytes of metadata", git.metadata.len())
}

/// Counts of what an import did (or would do).
#[derive(Debug, Default)]
struct Tally {
    added: usize,
    same: usize,
    differs: usize,
    failed: usize,
}

pub async fn run(connection: &Connection, dir: &Path, dry_run: bool) -> Result<u8, Failure> {
    if !dir.is_dir() {
        return Err(Failure::new(
            exit::USAGE,
            format!("{} is not a directory", dir.display()),
        ));
    }
    let repository = read_repository(dir)?;
    for note in &repository.notes {
        eprintln!("locker: {note}");
    }
    let mut server = BTreeMap::new();
    for pool in repository.pools.keys() {
        let reply = connection.answer(connection.client().pool(pool)).await?;
        match reply.status {
            StatusCode::OK => {
                let status = reply.parse::<PoolStatus>().ok_or_else(|| {
                    Failure::new(
                        exit::REFUSED,
                        format!("cannot read pool {pool:?}: the answer is not a pool"),
                    )
                })?;
                server.insert(pool.clone(), status);
            }
            StatusCode::NOT_FOUND => {}
            _ => return Err(refused(&reply, &format!("cannot read pool {pool:?}"))),
        }
    }

    let info: Info = [
        ("client", "locker pool import".to_string()),
        (
            "imported_from",
            dir.display().to_string().chars().take(300).collect(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut tally = Tally::default();
    for step in plan(&repository, &server) {
        let name = format!("pool {:?} item {:?}", step.pool, step.item);
        let line = match &step.action {
            Action::Add(git) if dry_run => {
                tally.added += 1;
                format!("would add {name}: {}", describe(git))
            }
            Action::Add(git) => {
                let body = ItemBody {
                    metadata: git.metadata.clone(),
                    claim: git.claimed.then(|| LockRequest {
                        key: IMPORT_KEY.to_string(),
                        info: Some(info.clone()),
                        ..LockRequest::default()
                    }),
                };
                let call = connection.client().add_item(&step.pool, &step.item, &body);
                let reply = connection.answer(call).await?;
                match reply.status {
                    StatusCode::CREATED => {
                        tally.added += 1;
                        format!("added {name}: {}", describe(git))
                    }
                    // Added meanwhile, the same way (another import).
                    StatusCode::OK => {
                        tally.same += 1;
                        format!("unchanged {name}: on the server the same way")
                    }
                    StatusCode::CONFLICT => {
                        tally.differs += 1;
                        format!(
                            "differs {name}: added on the server meanwhile, otherwise; left \
                             as it is"
                        )
                    }
                    _ => {
                        tally.failed += 1;
                        format!("failed {name}: {}: {}", reply.status, reply.error_message())
                    }
                }
            }
            Action::Same => {
                tally.same += 1;
                format!("unchanged {name}: on the server the same way")
            }
            Action::Differs(why) => {
                tally.differs += 1;
                format!("differs {name}: {why}; left as it is")
            }
            Action::Unusable(why) => {
                tally.failed += 1;
                format!("cannot import {name}: {why}")
            }
        };
        out!("{line}")?;
    }
    let verb = if dry_run { "would add" } else { "added" };
    out!(
        "{}{verb} {} items to {} pools; {} already there, {} differ (left as they are), {} \
         could not be imported",
        if dry_run {
            "dry run, nothing changed: "
        } else {
            ""
        },
        tally.added,
        repository.pools.len(),
        tally.same,
        tally.differs,
        tally.failed
    )?;
    if tally.differs + tally.failed > 0 {
        return Err(Failure::new(
            exit::REFUSED,
            format!(
                "{} items differ from the repository or could not be imported (see above)",
                tally.differs + tally.failed
            ),
        ));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use locker_client::wire::Holder;

    fn git(metadata: &str, claimed: bool) -> GitItem {
        GitItem {
            metadata: metadata.to_string(),
            claimed,
        }
    }

    fn on_server(name: &str, metadata: &str, key: Option<&str>) -> PoolItem {
        PoolItem {
            name: name.to_string(),
            metadata: metadata.to_string(),
            claimed: key.is_some(),
            holder: key.map(|key| Holder {
                key: key.to_string(),
                ..Holder::default()
            }),
        }
    }

    #[test]
    fn each_item_is_added_left_alone_or_reported_never_overwritten() {
        let mut repository = Repository::default();
        repository.pools.insert(
            "aws".into(),
            [
                ("new", git("a", false)),
                ("same", git("b", false)),
                ("same-claimed", git("c", true)),
                ("other-metadata", git("d", false)),
                ("claimed-there", git("e", false)),
                ("other-key", git("f", true)),
                ("unclaimed-there", git("g", true)),
            ]
            .map(|(n, g)| (n.to_string(), g))
            .into(),
        );
        repository
            .unusable
            .push(("aws".into(), "binary".into(), "not UTF-8".into()));
        let server: BTreeMap<String, PoolStatus> = [(
            "aws".to_string(),
            PoolStatus {
                name: "aws".into(),
                waiters: 0,
                items: vec![
                    on_server("same", "b", None),
                    on_server("same-claimed", "c", Some(IMPORT_KEY)),
                    on_server("other-metadata", "D", None),
                    on_server("claimed-there", "e", Some("build-7")),
                    on_server("other-key", "f", Some("build-8")),
                    on_server("unclaimed-there", "g", None),
                ],
                queue: Vec::new(),
            },
        )]
        .into();
        let actions: BTreeMap<String, Action> = plan(&repository, &server)
            .into_iter()
            .map(|s| (s.item, s.action))
            .collect();
        assert_eq!(actions["new"], Action::Add(git("a", false)));
        assert_eq!(actions["same"], Action::Same);
        assert_eq!(actions["same-claimed"], Action::Same);
        for differs in [
            "other-metadata",
            "claimed-there",
            "other-key",
            "unclaimed-there",
        ] {
            assert!(
                matches!(actions[differs], Action::Differs(_)),
                "{differs}: {:?}",
                actions[differs]
            );
        }
        assert_eq!(actions["binary"], Action::Unusable("not UTF-8".into()));
        // A pool the server does not have: everything is added.
        let fresh = plan(&repository, &BTreeMap::new());
        assert!(
            fresh
                .iter()
                .all(|s| matches!(s.action, Action::Add(_) | Action::Unusable(_)))
        );
        assert_eq!(fresh.len(), 8);
    }
}
