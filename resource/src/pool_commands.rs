//! The pool mode: with `source.pool` set, `check`, `in` and `out` do what concourse's
//! pool-resource does, over locker's pool API (docs/pools.md) instead of a git repository.
//!
//! - `check` emits the pool's version when its state changed (see `pool::state_ref`).
//! - `in` writes pool-resource's `name` and `metadata` for the item the version names, and
//!   `claim.json` (pool, item, key, generation) when the version is a claim.
//! - `out` takes pool-resource's params (`acquire`, `claim`, `release`, `add`, `add_claimed`,
//!   `remove`, `update`, `check`, `check_unclaimed`), each directory holding `name` and
//!   `metadata` as pool-resource reads and writes them. A `release` or `remove` of a directory
//!   with `claim.json` only acts while the item is held under its key; without one, it acts by
//!   name, as pool-resource does.
//!
//! A claim waits through locker-client's acquire loop (long-polls, a grant given back after a
//! signal), under a key of its own made from the build's identity (`pool::claim_key`).

use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use locker_client::acquire::{self, Outcome, Pending};
use locker_client::longpoll::answered_at_once;
use locker_client::pool_client::Until;
use locker_client::wait::Round;
use locker_client::wire::{
    ItemBody, ItemClaim, ItemFreed, ItemRelease, ItemStored, LockRequest, PoolItem, PoolStatus,
};
use locker_client::{Reply, StatusCode, Target};
use serde_json::Value;

use crate::client::{Client, ClientError, RetryPolicy, since};
use crate::commands::{Abort, Waiting, parse_request, warn_all, warn_if_build_unknown, write};
use crate::error::{PoolError, ResourceError};
use crate::lock::BuildEnv;
use crate::log;
use crate::models::{
    CheckRequest, InRequest, MetadataField, OutRequest, PoolOp, PoolOutParams, PoolVersion, Source,
    VersionResponse, check_name, parse_pool_in_params,
};
use crate::pool::{
    CLAIM_FILE, ClaimFile, EMPTY, check_version, claim_key, describe_claims, describe_item,
    item_metadata, state_ref, timestamp,
};
use crate::waits::{self, Wait};

/// `check`: the pool's version, unless its state is the one the given version was taken in
/// (then that version, as given: nothing new). A pool without items has no version, unless it
/// had one before: then `{"ref": "empty"}`.
pub async fn check(
    input: &str,
    source: &Source,
    pool: &str,
    retry: RetryPolicy,
) -> Result<Value, ResourceError> {
    let request: CheckRequest<PoolVersion> = parse_request(input)?;
    let client = Client::new(source, retry)?;
    let status = pool_status(&client, pool).await?;
    let current = check_version(status.as_ref(), SystemTime::now());
    match &status {
        Some(status) => log!(
            "pool {pool:?}: {}",
            describe_claims(status, SystemTime::now())
        ),
        None => log!("pool {pool:?} has no items"),
    }
    match request.version {
        Some(previous) if previous.reference == current.reference => {
            log!("unchanged since the last check");
            Ok(serde_json::json!([previous]))
        }
        None if current.reference == EMPTY => Ok(serde_json::json!([])),
        _ => Ok(serde_json::json!([current])),
    }
}

/// `in`: writes `name` and `metadata` of the item the version names (nothing when it names
/// none, or the item has been removed, as pool-resource writes nothing for a lock that is
/// gone), and `claim.json` when the version is a claim, which must still hold the item.
pub async fn fetch(
    input: &str,
    directory: &Path,
    source: &Source,
    pool: &str,
    retry: RetryPolicy,
) -> Result<Value, ResourceError> {
    let request: InRequest<PoolVersion> = parse_request(input)?;
    warn_all(parse_pool_in_params(&request.params)?);
    let client = Client::new(source, retry)?;
    let version = match request.version {
        Some(version) => version,
        None => check_version(
            pool_status(&client, pool).await?.as_ref(),
            SystemTime::now(),
        ),
    };
    std::fs::create_dir_all(directory).map_err(|source| ResourceError::CreateDirectory {
        path: directory.to_path_buf(),
        source,
    })?;
    let nothing = |version: PoolVersion, item: Option<&str>| {
        let mut metadata = vec![MetadataField::new("pool_name", pool)];
        if let Some(item) = item {
            metadata.insert(0, MetadataField::new("lock_name", item));
        }
        to_value(VersionResponse { version, metadata })
    };
    let Some(name) = version.item.clone() else {
        log!(
            "version {:?} names no item (none of pool {pool:?} was claimed when it was found): \
             nothing to write",
            version.reference
        );
        return nothing(version, None);
    };
    let Some(item) = find_item(&client, pool, &name).await? else {
        log!("item {name:?} is no longer in pool {pool:?}: nothing to write");
        return nothing(version, Some(&name));
    };
    let holder = item.holder.as_ref().filter(|_| item.claimed);
    let claim = ClaimFile::of_version(pool, &version);
    if let Some(claim) = &claim
        && !holder.is_some_and(|h| claim.is(h))
    {
        // pool-resource fails the same way: "lock instance is no longer acquired".
        return Err(PoolError::NoLongerHeld {
            item: name,
            pool: pool.to_string(),
            claim: claim.describe(),
            state: describe_item(&item, SystemTime::now()),
        }
        .into());
    }
    write(directory, "name", &format!("{name}\n"))?;
    write(directory, "metadata", &item.metadata)?;
    if let Some(claim) = &claim {
        let text = serde_json::to_string(claim).map_err(PoolError::EncodeClaim)?;
        write(directory, CLAIM_FILE, &text)?;
    }
    log!(
        "item {name:?} of pool {pool:?} is {}",
        describe_item(&item, SystemTime::now())
    );
    to_value(VersionResponse {
        version,
        metadata: item_metadata(pool, &name, holder),
    })
}

/// `out`: one of pool-resource's operations.
pub async fn put(
    request: &OutRequest,
    sources: &Path,
    source: &Source,
    pool: &str,
    build: &BuildEnv,
    retry: RetryPolicy,
    abort: &Abort,
) -> Result<Value, ResourceError> {
    // Params before any network call: a missing or doubled operation is reported at once.
    let (params, warnings) = PoolOutParams::parse(&request.params)?;
    warn_all(warnings);
    let client = Client::new(source, retry)?;
    let put = Put {
        client: &client,
        source,
        pool,
        build,
        params: &params,
        sources,
        started: Instant::now(),
    };
    let response = match &params.op {
        PoolOp::Acquire => put.claim(None, abort).await?,
        PoolOp::Claim(item) => put.claim(Some(item), abort).await?,
        PoolOp::Release(dir) => put.free(dir, false).await?,
        PoolOp::Add(dir) => put.add(dir, false).await?,
        PoolOp::AddClaimed(dir) => put.add(dir, true).await?,
        PoolOp::Remove(dir) => put.free(dir, true).await?,
        PoolOp::Update(dir) => put.update(dir).await?,
        PoolOp::Check(dir) => put.watch(dir, Until::Unclaimed).await?,
        PoolOp::CheckUnclaimed(dir) => put.watch(dir, Until::Claimed).await?,
    };
    to_value(response)
}

/// One `out` of the pool mode.
struct Put<'a> {
    client: &'a Client,
    source: &'a Source,
    pool: &'a str,
    build: &'a BuildEnv,
    params: &'a PoolOutParams,
    /// The directory `out` was given: the build's steps' and tasks' directories by name.
    sources: &'a Path,
    started: Instant,
}

/// What a directory named by a param holds.
struct ItemDir {
    path: PathBuf,
    name: String,
    metadata: Option<String>,
    /// `claim.json`, written by this resource's `in` for a claim.
    claim: Option<ClaimFile>,
}

impl Put<'_> {
    /// `acquire` (any free item) and `claim` (this item): waits in the pool's queue.
    async fn claim(
        &self,
        item: Option<&str>,
        abort: &Abort,
    ) -> Result<VersionResponse<PoolVersion>, PoolError> {
        let pool = self.pool;
        let body = self.claim_body();
        let target = Target::Pool {
            pool: pool.to_string(),
            item: item.map(str::to_string),
        };
        let what = target.to_string();
        log!("claiming {what} with key {:?}", body.key);
        let request = acquire::Request {
            target: &target,
            body: &body,
            deadline: self.params.wait_timeout.map(|t| self.started + t),
            poll: self.source.wait_poll,
            fallback_pause: self.source.retry_interval,
        };
        let mut waiting = Waiting::new(self.client, &target, self.started, self.source);
        let outcome = acquire::acquire(self.client.shared(), &request, abort, &mut waiting)
            .await
            .map_err(ClientError::from)?;
        let granted = match outcome {
            Outcome::Granted(reply) => reply,
            Outcome::TimedOut(_) => {
                return Err(PoolError::GaveUp {
                    what,
                    waited: since(self.started),
                    state: waiting.holder,
                });
            }
            Outcome::Refused(reply) => return Err(refusal(&format!("claim {what}"), &reply)),
        };
        let claim: ItemClaim = granted.parse().ok_or_else(|| PoolError::NotAClaim {
            what: what.clone(),
            body: granted.body.clone(),
        })?;
        log!(
            "claimed item {:?} of pool {pool:?} with key {:?} (generation {}) after {}",
            claim.item,
            claim.key,
            claim.generation,
            since(self.started)
        );
        self.respond(&claim.item, Some((&claim.key, claim.generation)))
            .await
    }

    /// The body of a claim: a key of its own, the build as holder info, the lease and
    /// `release_when_build_ends` from the params.
    fn claim_body(&self) -> LockRequest {
        warn_if_build_unknown(self.params.release_when_build_ends, self.build);
        let nonce = std::hash::RandomState::new().hash_one((SystemTime::now(), std::process::id()));
        LockRequest {
            key: claim_key(self.build, nonce),
            requestor: None,
            info: Some(self.build.info()).filter(|info| !info.is_empty()),
            ttl: self.params.ttl.map(locker_client::duration::WireDuration),
            slots: None,
            release_when_build_ends: self.params.release_when_build_ends,
            renew: false,
            wait: None,
        }
    }

    /// `release` (with `removing` false) and `remove`: of the item named in `dir`, by name or,
    /// with `claim.json` there, only while the item is held under its key (a removal also
    /// while unclaimed). A release of an item nobody holds fails, as pool-resource's does (its
    /// item is not in `claimed/`); a removal takes claimed and unclaimed items.
    async fn free(
        &self,
        dir: &str,
        removing: bool,
    ) -> Result<VersionResponse<PoolVersion>, PoolError> {
        let (param, doing) = match removing {
            false => ("release", "releasing"),
            true => ("remove", "removing"),
        };
        let found = self.read_dir(param, dir, false)?;
        let (pool, name) = (self.pool, &found.name);
        let body = self.log_acting(doing, &found);
        let api = self.client.shared();
        let sent = match removing {
            false => api.release_item(pool, name, &body).await,
            true => api.remove_item(pool, name, &body).await,
        };
        let reply = sent.map_err(ClientError::from)?;
        let what = format!("{param} item {name:?} of pool {pool:?}");
        let freed = self.freed(&what, &found, &reply)?;
        match (freed.released, removing) {
            (false, false) => return Err(PoolError::NotClaimed { doing: what }),
            (false, true) => log!("removed item {name:?} (it was unclaimed)"),
            (true, _) => {}
        }
        self.respond(name, None).await
    }

    /// The body of a release or removal, with a line saying how it acts.
    fn log_acting(&self, doing: &str, found: &ItemDir) -> ItemRelease {
        let (pool, name) = (self.pool, &found.name);
        match &found.claim {
            Some(claim) => {
                log!(
                    "{doing} item {name:?} of pool {pool:?} held by the claim in {}: {}",
                    found.path.join(CLAIM_FILE).display(),
                    claim.describe()
                );
                ItemRelease {
                    key: Some(claim.key.clone()),
                    requestor: None,
                }
            }
            None => {
                log!(
                    "{doing} item {name:?} of pool {pool:?} by name (whoever holds it): {} has \
                     no {CLAIM_FILE}",
                    found.path.display()
                );
                ItemRelease::default()
            }
        }
    }

    /// The answer to a release or removal.
    fn freed(&self, doing: &str, found: &ItemDir, reply: &Reply) -> Result<ItemFreed, PoolError> {
        match reply.status {
            StatusCode::OK => {}
            StatusCode::LOCKED => {
                let claim = found.claim.as_ref().map(ClaimFile::describe);
                return Err(PoolError::HeldByAnother {
                    doing: doing.to_string(),
                    claim_file: found.path.join(CLAIM_FILE),
                    claim: claim.unwrap_or_default(),
                    message: reply.error_message(),
                });
            }
            _ => return Err(refusal(doing, reply)),
        }
        let freed: ItemFreed = reply.parse().ok_or_else(|| PoolError::NotUnderstood {
            doing: doing.to_string(),
        })?;
        if let Some(previous) = &freed.previous {
            log!(
                "it was claimed by {}",
                crate::lock::describe_holder(previous, SystemTime::now())
            );
            if let Some(claim) = &found.claim
                && previous.generation != Some(claim.generation)
            {
                log!(
                    "note: under the same key, but claimed again since {} (generation {:?})",
                    found.path.join(CLAIM_FILE).display(),
                    previous.generation
                );
            }
        }
        Ok(freed)
    }

    /// `add` (unclaimed) and `add_claimed` (claimed under a key of this build's).
    async fn add(
        &self,
        dir: &str,
        claimed: bool,
    ) -> Result<VersionResponse<PoolVersion>, PoolError> {
        let param = if claimed { "add_claimed" } else { "add" };
        let found = self.read_dir(param, dir, true)?;
        let (pool, name) = (self.pool, &found.name);
        let claim = claimed.then(|| self.claim_body());
        log!(
            "adding {} item {name:?} to pool {pool:?}{}",
            if claimed { "claimed" } else { "unclaimed" },
            claim
                .as_ref()
                .map(|c| format!(" with key {:?}", c.key))
                .unwrap_or_default()
        );
        let body = ItemBody {
            metadata: found.metadata.clone().unwrap_or_default(),
            claim: claim.clone(),
        };
        let reply = self
            .client
            .shared()
            .add_item(pool, name, &body)
            .await
            .map_err(ClientError::from)?;
        match reply.status {
            StatusCode::CREATED => log!("added item {name:?}"),
            StatusCode::OK => log!("item {name:?} was already in the pool, the same way"),
            StatusCode::CONFLICT => {
                return Err(PoolError::AddConflict {
                    item: name.clone(),
                    pool: pool.to_string(),
                    message: reply.error_message(),
                });
            }
            _ => {
                return Err(refusal(
                    &format!("add item {name:?} to pool {pool:?}"),
                    &reply,
                ));
            }
        }
        let Some(claim) = claim else {
            return self.respond(name, None).await;
        };
        // The answer has no generation: the item's holder does.
        let generation = find_item(self.client, pool, name)
            .await?
            .and_then(|item| item.holder)
            .filter(|holder| holder.key == claim.key)
            .and_then(|holder| holder.generation)
            .ok_or_else(|| PoolError::AddedNotHeld { item: name.clone() })?;
        self.respond(name, Some((&claim.key, generation))).await
    }

    /// `update`: replaces the metadata (adding the item if absent), waiting while the item is
    /// claimed.
    async fn update(&self, dir: &str) -> Result<VersionResponse<PoolVersion>, PoolError> {
        let found = self.read_dir("update", dir, true)?;
        let (pool, name) = (self.pool, &found.name);
        let metadata = found.metadata.clone().unwrap_or_default();
        log!("updating item {name:?} of pool {pool:?} (waiting while it is claimed)");
        let what = format!("item {name:?} of pool {pool:?}");
        let changed = waits::until(&self.wait(&what), async |wait| {
            let reply = self
                .client
                .shared()
                .update_item(pool, name, &metadata, wait)
                .await
                .map_err(ClientError::from)?;
            match reply.status {
                StatusCode::OK => Ok(Round::Done(
                    reply.parse::<ItemStored>().map(|stored| stored.changed),
                )),
                StatusCode::LOCKED => Ok(Round::NotYet {
                    state: self.state_of(name, &reply).await,
                    at_once: answered_at_once(wait, reply.elapsed, ""),
                }),
                _ => Err(refusal(&format!("update {what}"), &reply)),
            }
        })
        .await?;
        match changed {
            Some(false) => log!("updated {what}: its metadata was already this"),
            _ => log!("updated {what} after {}", since(self.started)),
        }
        self.respond(name, None).await
    }

    /// `check` (wait until unclaimed) and `check_unclaimed` (wait until claimed); an item that
    /// does not exist fails at once.
    async fn watch(
        &self,
        dir: &str,
        until: Until,
    ) -> Result<VersionResponse<PoolVersion>, PoolError> {
        let param = match until {
            Until::Unclaimed => "check",
            Until::Claimed => "check_unclaimed",
        };
        let found = self.read_dir(param, dir, false)?;
        let (pool, name) = (self.pool, &found.name);
        let wanted = match until {
            Until::Unclaimed => "unclaimed",
            Until::Claimed => "claimed",
        };
        log!("waiting until item {name:?} of pool {pool:?} is {wanted}");
        let what = format!("item {name:?} of pool {pool:?}");
        waits::until(&self.wait(&what), async |wait| {
            let reply = self
                .client
                .shared()
                .wait_item(pool, name, until, wait.unwrap_or_default())
                .await
                .map_err(ClientError::from)?;
            if reply.status != StatusCode::OK {
                return Err(refusal(&format!("{param} {what}"), &reply));
            }
            let item: PoolItem = reply.parse().ok_or(PoolError::NotAnItem { param })?;
            if item.claimed == (until == Until::Claimed) {
                return Ok(Round::Done(()));
            }
            Ok(Round::NotYet {
                state: describe_item(&item, SystemTime::now()),
                at_once: answered_at_once(wait, reply.elapsed, ""),
            })
        })
        .await?;
        log!("{what} is {wanted} after {}", since(self.started));
        self.respond(name, None).await
    }

    fn wait<'w>(&self, what: &'w str) -> Wait<'w> {
        Wait {
            what,
            started: self.started,
            deadline: self.params.wait_timeout.map(|t| self.started + t),
            poll: self.source.wait_poll,
            pause: self.source.retry_interval,
        }
    }

    /// The item's state when a request was refused because it is claimed.
    async fn state_of(&self, name: &str, reply: &Reply) -> String {
        match find_item(self.client, self.pool, name).await {
            Ok(Some(item)) => describe_item(&item, SystemTime::now()),
            Ok(None) => format!("gone (the server said: {})", reply.error_message()),
            Err(e) => format!("unknown ({e}; the server said: {})", reply.error_message()),
        }
    }

    /// Reads `name` (and `metadata`, when `metadata` is wanted, and `claim.json` if there) from
    /// the directory a param names.
    fn read_dir(
        &self,
        param: &'static str,
        dir: &str,
        metadata: bool,
    ) -> Result<ItemDir, PoolError> {
        let path = self.sources.join(dir);
        let read = |file: &str| {
            let at = path.join(file);
            std::fs::read(&at).map_err(|source| PoolError::ReadDir {
                param,
                path: at,
                metadata,
                source,
            })
        };
        let name = String::from_utf8_lossy(&read("name")?).trim().to_string();
        if name.is_empty() {
            return Err(PoolError::EmptyName {
                param,
                path: path.join("name"),
            });
        }
        check_name(&format!("{}", path.join("name").display()), &name, "item")?;
        let metadata = match metadata {
            false => None,
            true => Some(
                String::from_utf8(read("metadata")?).map_err(|_| PoolError::NotText {
                    param,
                    path: path.join("metadata"),
                })?,
            ),
        };
        let claim =
            match std::fs::read(path.join(CLAIM_FILE)) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(source) => {
                    return Err(PoolError::ReadClaim {
                        path: path.join(CLAIM_FILE),
                        source,
                    });
                }
                Ok(bytes) => Some(serde_json::from_slice::<ClaimFile>(&bytes).map_err(
                    |source| PoolError::NotAClaimFile {
                        path: path.join(CLAIM_FILE),
                        source,
                    },
                )?),
            };
        if let Some(claim) = &claim
            && (claim.pool != self.pool || claim.item != name)
        {
            return Err(PoolError::ClaimElsewhere {
                path: path.join(CLAIM_FILE),
                claim_item: claim.item.clone(),
                claim_pool: claim.pool.clone(),
                item: name,
                pool: self.pool.to_string(),
            });
        }
        Ok(ItemDir {
            path,
            name,
            metadata,
            claim,
        })
    }

    /// The response of a put about `item`: the pool's version after it (a claim's, with its
    /// key and generation), and the item's metadata.
    async fn respond(
        &self,
        item: &str,
        claim: Option<(&str, u64)>,
    ) -> Result<VersionResponse<PoolVersion>, PoolError> {
        let status = match pool_status(self.client, self.pool).await {
            Ok(status) => Some(status),
            Err(e) => {
                // Done: do not fail the step over a status read.
                log!("warning: cannot read the pool's state afterwards: {e}");
                None
            }
        };
        let reference = match &status {
            Some(status) => state_ref(status.as_ref()),
            None => format!("unread-{}", self.started.elapsed().as_nanos()),
        };
        let holder = status
            .flatten()
            .and_then(|s| s.items.into_iter().find(|i| i.name == item))
            .and_then(|i| i.holder.filter(|_| i.claimed));
        let mut metadata = item_metadata(self.pool, item, holder.as_ref());
        metadata.push(MetadataField::new("waited", since(self.started)));
        Ok(VersionResponse {
            version: PoolVersion {
                reference,
                item: Some(item.to_string()),
                key: claim.map(|(key, _)| key.to_string()),
                generation: claim.map(|(_, generation)| generation.to_string()),
                at: Some(timestamp(SystemTime::now())),
            },
            metadata,
        })
    }
}

/// `GET /pool/{pool}`: `None` when the pool has no items.
async fn pool_status(client: &Client, pool: &str) -> Result<Option<PoolStatus>, PoolError> {
    let reply = client
        .shared()
        .pool(pool)
        .await
        .map_err(ClientError::from)?;
    match reply.status {
        StatusCode::OK => reply.parse().map(Some).ok_or_else(|| PoolError::NotAPool {
            base: client.shared().shown_base().to_string(),
        }),
        StatusCode::NOT_FOUND => {
            no_pool_api(client).await?;
            Ok(None)
        }
        _ => Err(refusal(&format!("read pool {pool:?}"), &reply)),
    }
}

/// The item as the pool's listing has it (`GET /pool/{pool}`, as the CLI reads one item):
/// `None` when there is no such item.
async fn find_item(client: &Client, pool: &str, item: &str) -> Result<Option<PoolItem>, PoolError> {
    Ok(pool_status(client, pool)
        .await?
        .and_then(|status| status.items.into_iter().find(|found| found.name == item)))
}

/// After a 404: fails when the server has no pool API at all (a locker without pools, or the
/// original), so that "no such pool" is not taken for "empty".
async fn no_pool_api(client: &Client) -> Result<(), PoolError> {
    let reply = client.shared().pools().await.map_err(ClientError::from)?;
    match reply.status {
        StatusCode::NOT_FOUND => Err(PoolError::NoPools {
            base: client.shared().shown_base().to_string(),
        }),
        _ => Ok(()),
    }
}

/// A refusal: `cannot DOING: the server answered 404 Not Found: ...`.
fn refusal(doing: &str, reply: &Reply) -> PoolError {
    PoolError::Refused {
        doing: doing.to_string(),
        status: reply.status,
        message: reply.error_message(),
    }
}

fn to_value<T: serde::Serialize>(response: T) -> Result<Value, ResourceError> {
    serde_json::to_value(response).map_err(ResourceError::Encode)
}

/// A log line (and the state for the message when time runs out) while a claim waits.
pub(crate) async fn describe_wait(
    client: &Client,
    pool: &str,
    item: Option<&str>,
    message: &str,
) -> (String, String) {
    let now = SystemTime::now();
    match item {
        Some(item) => {
            let state = match find_item(client, pool, item).await {
                Ok(Some(found)) => describe_item(&found, now),
                Ok(None) => format!("gone (the server said: {message})"),
                Err(e) => format!("unknown ({e}; the server said: {message})"),
            };
            (
                format!("item {item:?} of pool {pool:?} is {state}"),
                format!("it is {state}"),
            )
        }
        None => {
            let state = match pool_status(client, pool).await {
                Ok(Some(status)) => describe_claims(&status, now),
                Ok(None) => format!("no items (the server said: {message})"),
                Err(e) => format!("unknown ({e}; the server said: {message})"),
            };
            (format!("pool {pool:?} has no free item: {state}"), state)
        }
    }
}

/// After a signal stopped a claim: gives back what it may have been granted, and says what
/// it did.
pub(crate) async fn clean_up(pending: &Pending, signal: &str) -> String {
    let what = &pending.target;
    let state = if pending.granted {
        "it had been granted"
    } else {
        "a grant may have raced with the signal"
    };
    let key = pending.key();
    let outcome = match pending.release().await {
        Some(Ok(reply)) if reply.status == StatusCode::OK => match reply.parse::<ItemFreed>() {
            Some(freed) if freed.released => {
                format!("released item {:?} held under key {key:?}", freed.item)
            }
            _ => format!("nothing to release: no item was held under key {key:?}"),
        },
        Some(Ok(reply)) => format!(
            "nothing released: the server answered {} ({})",
            reply.status,
            reply.error_message()
        ),
        Some(Err(e)) => format!(
            "could not release what key {key:?} holds: {}; the server withdraws a grant to a \
             client that has gone, and a ttl would end any claim",
            ClientError::from(e)
        ),
        None => format!(
            "could not release what key {key:?} holds within {}: the server withdraws a grant \
             to a client that has gone",
            humantime::format_duration(locker_client::longpoll::ABORT_DEADLINE)
        ),
    };
    format!("stopped by {signal} while claiming {what}; {state}: {outcome}")
}
