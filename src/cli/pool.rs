//! `locker pool list|acquire|release|add|remove|update` (and `import`, in
//! [`super::pool_import`]): the pool API (docs/pools.md) from a shell. Tables by default, the
//! server's JSON with `--json`; `acquire` holds an item as `locker lock` holds a lock (the
//! machinery is [`super::hold`]'s).

use std::ffi::OsString;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use locker_client::Target;
use locker_client::longpoll::{DEFAULT_POLL as POLL, answered_at_once};
use locker_client::wait::{self, Round, Schedule, Waited, Waiter};
use locker_client::wire::{
    ItemBody, ItemClaim, ItemFreed, ItemRelease, ItemStored, LockRequest, PoolList, PoolStatus,
};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::hold::{self, Holding, Run, Signals};
use super::http::{Connection, Reply, refused};
use super::show::{pretty, table};
use super::{Failure, MetadataArgs, PoolAcquireArgs, PoolCommand, WaitLimit, exit};

/// The lease a claim takes when `pool acquire` runs a command and --ttl is not given.
const COMMAND_TTL: Duration = Duration::from_secs(30);

pub async fn run(connection: Connection, command: PoolCommand) -> Result<u8, Failure> {
    match command {
        PoolCommand::List { pool, json } => match pool {
            Some(pool) => list_items(&connection, &pool, json).await,
            None => list_pools(&connection, json).await,
        },
        PoolCommand::Acquire(args) => acquire(&connection, args).await,
        PoolCommand::Release {
            pool,
            item,
            key,
            requestor,
            force: _,
            json,
        } => {
            let body = ItemRelease { key, requestor };
            release(&connection, &pool, &item, body, json).await
        }
        PoolCommand::Add {
            pool,
            item,
            metadata,
            claimed,
            key,
            json,
        } => {
            add(
                &connection,
                &pool,
                &item,
                &metadata,
                claimed.then_some(key),
                json,
            )
            .await
        }
        PoolCommand::Remove {
            pool,
            item,
            key,
            json,
        } => remove(&connection, &pool, &item, key, json).await,
        PoolCommand::Update {
            pool,
            item,
            metadata,
            wait,
            json,
        } => {
            let limit = wait.unwrap_or(WaitLimit(None));
            update(&connection, &pool, &item, &metadata, limit, json).await
        }
        PoolCommand::Import { dir, dry_run } => {
            super::pool_import::run(&connection, &dir, dry_run).await
        }
    }
}

/// The body of a 2xx answer read as `T`, or the failure saying what was not understood.
fn parse<T: DeserializeOwned>(reply: &Reply, what: &str) -> Result<T, Failure> {
    reply.parse().ok_or_else(|| {
        Failure::new(
            exit::REFUSED,
            format!("{what}: the server's answer is not what the pool API sends"),
        )
    })
}

fn or_empty<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

async fn list_pools(connection: &Connection, as_json: bool) -> Result<u8, Failure> {
    let reply = connection.answer(connection.client().pools()).await?;
    if reply.status != StatusCode::OK {
        return Err(refused(&reply, "cannot list the pools"));
    }
    if as_json {
        out!("{}", pretty(&reply.body))?;
        return Ok(0);
    }
    let list: PoolList = parse(&reply, "cannot list the pools")?;
    if list.pools.is_empty() {
        out!("no pools")?;
        return Ok(0);
    }
    let mut rows = vec![header(&["POOL", "ITEMS", "CLAIMED", "WAITERS"])];
    for pool in list.pools {
        rows.push(vec![
            pool.name,
            pool.items.to_string(),
            pool.claimed.to_string(),
            pool.waiters.to_string(),
        ]);
    }
    table(&rows)?;
    Ok(0)
}

async fn list_items(connection: &Connection, pool: &str, as_json: bool) -> Result<u8, Failure> {
    let reply = connection.answer(connection.client().pool(pool)).await?;
    let what = format!("cannot list pool {pool:?}");
    // A pool exists while it has items or waiting claims: one that does not is empty.
    let status = match reply.status {
        StatusCode::OK => parse::<PoolStatus>(&reply, &what)?,
        StatusCode::NOT_FOUND => PoolStatus {
            name: pool.to_string(),
            ..PoolStatus::default()
        },
        _ => return Err(refused(&reply, &what)),
    };
    if as_json {
        let body = match reply.status {
            StatusCode::OK => reply.body,
            _ => json!(status),
        };
        out!("{}", pretty(&body))?;
        return Ok(0);
    }
    if status.items.is_empty() {
        out!(
            "pool {pool:?} has no items ({} claims waiting)",
            status.waiters
        )?;
        return Ok(0);
    }
    let mut rows = vec![header(&[
        "ITEM",
        "STATE",
        "KEY",
        "CLAIMED BY",
        "GEN",
        "SINCE",
        "EXPIRES",
    ])];
    let mut claimed = 0;
    for item in &status.items {
        let row = match &item.holder {
            Some(holder) => {
                claimed += 1;
                vec![
                    item.name.clone(),
                    "claimed".to_string(),
                    holder.key.clone(),
                    holder.requestors(),
                    or_empty(holder.generation),
                    or_empty(holder.acquired_at.as_ref()),
                    or_empty(holder.expires_at.as_ref()),
                ]
            }
            None => vec![item.name.clone(), "unclaimed".to_string()],
        };
        rows.push(row);
    }
    table(&rows)?;
    out!(
        "pool {pool:?}: {} items, {claimed} claimed, {} claims waiting",
        status.items.len(),
        status.waiters
    )?;
    Ok(0)
}

/// Holder info of the CLI's own claims.
fn info(client: &str, id: &str, command: &[OsString]) -> Option<locker_client::wire::Info> {
    Some(hold::info(client, id, command))
}

async fn acquire(connection: &Connection, args: PoolAcquireArgs) -> Result<u8, Failure> {
    let mut signals = Signals::new()?;
    let id = hold::invocation_id();
    let key = args.key.clone().unwrap_or_else(|| id.clone());
    let requestor = args.requestor.clone().unwrap_or_else(|| id.clone());
    let with_command = !args.command.is_empty();
    let default_ttl = if with_command {
        COMMAND_TTL
    } else {
        Duration::ZERO
    };
    let ttl = args.ttl.unwrap_or(default_ttl);
    let holding = Holding {
        target: Target::Pool {
            pool: args.pool.clone(),
            item: args.item.clone(),
        },
        body: LockRequest {
            key: key.clone(),
            requestor: Some(requestor.clone()),
            info: info("locker pool acquire", &id, &args.command),
            ttl: (!ttl.is_zero()).then_some(locker_client::duration::WireDuration(ttl)),
            ..LockRequest::default()
        },
        wait: args.wait.and_then(|w| w.0),
    };
    let held = hold::take(connection, holding, &mut signals).await?;
    let claim: ItemClaim = parse(&held.reply, "claimed, but")?;
    let item = &claim.item;
    let pool = &claim.pool;

    if let Some(path) = &args.save_metadata
        && let Err(e) = std::fs::write(path, &claim.metadata)
    {
        let failure = Failure::new(
            1,
            format!("cannot write the metadata to {}: {e}", path.display()),
        );
        return give_back_after(connection, &held.holding, failure).await;
    }

    if !with_command {
        if args.json {
            out!("{}", pretty(&held.reply.body))?;
        } else {
            out!("{item}")?;
        }
        let lease = if ttl.is_zero() {
            "no lease".to_string()
        } else {
            format!(
                "lease {}: renew or lose it",
                humantime::format_duration(ttl)
            )
        };
        eprintln!(
            "locker: claimed item {item:?} of pool {pool:?} under key {key:?} ({lease}); \
             release it with: locker pool release {} {} --key {}",
            shell_word(pool),
            shell_word(item),
            shell_word(&key)
        );
        return Ok(0);
    }

    eprintln!("locker: claimed item {item:?} of pool {pool:?}");
    let file = match MetadataFile::create(&claim.metadata) {
        Ok(file) => file,
        Err(failure) => return give_back_after(connection, &held.holding, failure).await,
    };
    let mut env: Vec<(String, OsString)> = [
        ("LOCKER_POOL", pool.clone()),
        ("LOCKER_POOL_ITEM", item.clone()),
        ("LOCKER_POOL_KEY", key),
        ("LOCKER_POOL_REQUESTOR", requestor),
        ("LOCKER_POOL_GENERATION", held.generation.to_string()),
    ]
    .map(|(k, v)| (k.to_string(), v.into()))
    .to_vec();
    env.push((
        "LOCKER_POOL_METADATA_FILE".to_string(),
        file.path.clone().into(),
    ));
    // An environment variable cannot hold a NUL byte; the file always has the metadata.
    if !claim.metadata.contains('\0') {
        env.push((
            "LOCKER_POOL_METADATA".to_string(),
            claim.metadata.clone().into(),
        ));
    }
    let run = Run {
        command: &args.command,
        env,
        ttl,
        grace: args.grace,
    };
    let status = hold::run_and_release(connection, &held, run, &mut signals).await;
    drop(file);
    status
}

/// Gives back a claim this invocation cannot use, then fails.
async fn give_back_after(
    connection: &Connection,
    holding: &Holding,
    failure: Failure,
) -> Result<u8, Failure> {
    if let Err(e) = holding
        .target
        .give_back(connection.client(), &holding.body)
        .await
    {
        eprintln!(
            "locker: could not release {}: {}",
            holding.target,
            connection.failure(e).message
        );
    }
    Err(failure)
}

/// A name as a shell word: as it is when plain, else in single quotes.
fn shell_word(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c));
    if plain {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The claimed item's metadata in a private file for the command, removed when dropped.
struct MetadataFile {
    path: PathBuf,
}

impl MetadataFile {
    fn create(metadata: &str) -> Result<MetadataFile, Failure> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let millis = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "locker-pool-metadata-{}-{millis}",
            std::process::id()
        ));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut file| file.write_all(metadata.as_bytes()));
        match written {
            Ok(()) => Ok(MetadataFile { path }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(Failure::new(
                    1,
                    format!("cannot write the metadata file {}: {e}", path.display()),
                ))
            }
        }
    }
}

impl Drop for MetadataFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The answer to a release or removal, refused unless 200; `None` once printed as JSON
/// (`--json`: nothing more to say).
fn freed(reply: Reply, what: &str, as_json: bool) -> Result<Option<ItemFreed>, Failure> {
    if reply.status != StatusCode::OK {
        return Err(refused(&reply, what));
    }
    if as_json {
        out!("{}", pretty(&reply.body))?;
        return Ok(None);
    }
    parse(&reply, what).map(Some)
}

async fn release(
    connection: &Connection,
    pool: &str,
    item: &str,
    body: ItemRelease,
    as_json: bool,
) -> Result<u8, Failure> {
    let call = connection.client().release_item(pool, item, &body);
    let what = format!("cannot release item {item:?} of pool {pool:?}");
    let Some(freed) = freed(connection.answer(call).await?, &what, as_json)? else {
        return Ok(0);
    };
    match (&freed.previous, &body.key) {
        (Some(previous), _) => out!(
            "released item {item:?} of pool {pool:?} (it was claimed under key {:?})",
            previous.key
        )?,
        (None, None) => out!("item {item:?} of pool {pool:?} was not claimed")?,
        (None, Some(key)) => out!(
            "item {item:?} of pool {pool:?}: nothing more to release under key {key:?} \
             (unclaimed, or still claimed by the key's other requestors)"
        )?,
    }
    Ok(0)
}

/// The metadata the flags ask for: --metadata, --metadata-file (`-`: stdin), else standard
/// input when it is not a terminal, else empty.
fn read_metadata(args: &MetadataArgs) -> Result<String, Failure> {
    if let Some(text) = &args.metadata {
        return Ok(text.clone());
    }
    let from_stdin = match &args.metadata_file {
        Some(path) if path != Path::new("-") => {
            return std::fs::read_to_string(path).map_err(|e| {
                Failure::new(
                    exit::USAGE,
                    format!("cannot read the metadata file {}: {e}", path.display()),
                )
            });
        }
        Some(_) => true,
        None => !std::io::stdin().is_terminal(),
    };
    let mut text = String::new();
    if from_stdin {
        std::io::stdin().read_to_string(&mut text).map_err(|e| {
            Failure::new(
                exit::USAGE,
                format!("cannot read the metadata from standard input: {e}"),
            )
        })?;
    }
    Ok(text)
}

/// Says what an addition or update did (or prints its JSON).
fn stored(reply: &Reply, what: &str, done: &str, as_json: bool) -> Result<u8, Failure> {
    if as_json {
        out!("{}", pretty(&reply.body))?;
        return Ok(0);
    }
    let stored: ItemStored = parse(reply, what)?;
    let (item, pool) = (&stored.item, &stored.pool);
    if stored.changed {
        out!("{done} item {item:?} of pool {pool:?}")?;
    } else {
        out!("item {item:?} of pool {pool:?} is already so: nothing changed")?;
    }
    Ok(0)
}

async fn add(
    connection: &Connection,
    pool: &str,
    item: &str,
    metadata: &MetadataArgs,
    claimed: Option<Option<String>>,
    as_json: bool,
) -> Result<u8, Failure> {
    let id = hold::invocation_id();
    let claim = claimed.map(|key| LockRequest {
        key: key.unwrap_or_else(|| id.clone()),
        info: info("locker pool add", &id, &[]),
        ..LockRequest::default()
    });
    let body = ItemBody {
        metadata: read_metadata(metadata)?,
        claim: claim.clone(),
    };
    let reply = connection
        .answer(connection.client().add_item(pool, item, &body))
        .await?;
    let what = format!("cannot add item {item:?} to pool {pool:?}");
    if !matches!(reply.status, StatusCode::OK | StatusCode::CREATED) {
        return Err(refused(&reply, &what));
    }
    let done = match &claim {
        Some(claim) => {
            eprintln!(
                "locker: item {item:?} of pool {pool:?} is claimed under key {:?}; release it \
                 with: locker pool release {} {} --key {}",
                claim.key,
                shell_word(pool),
                shell_word(item),
                shell_word(&claim.key)
            );
            "added claimed"
        }
        None => "added",
    };
    stored(&reply, &what, done, as_json)
}

async fn remove(
    connection: &Connection,
    pool: &str,
    item: &str,
    key: Option<String>,
    as_json: bool,
) -> Result<u8, Failure> {
    let body = ItemRelease {
        key,
        requestor: None,
    };
    let call = connection.client().remove_item(pool, item, &body);
    let what = format!("cannot remove item {item:?} of pool {pool:?}");
    let Some(freed) = freed(connection.answer(call).await?, &what, as_json)? else {
        return Ok(0);
    };
    match freed.previous {
        Some(previous) => out!(
            "removed item {item:?} of pool {pool:?} (it was claimed under key {:?})",
            previous.key
        )?,
        None => out!("removed item {item:?} of pool {pool:?}")?,
    }
    Ok(0)
}

/// Replaces the metadata, long-polling while the item is claimed until `limit` runs out
/// (the one wait loop; a server that answers at once is asked again each second).
async fn update(
    connection: &Connection,
    pool: &str,
    item: &str,
    metadata: &MetadataArgs,
    limit: WaitLimit,
    as_json: bool,
) -> Result<u8, Failure> {
    let metadata = read_metadata(metadata)?;
    let what = format!("cannot update item {item:?} of pool {pool:?}");
    let started = Instant::now();
    let schedule = Schedule {
        deadline: limit.0.map(|l| started + l),
        poll: POLL,
        fallback_pause: Duration::from_secs(1),
    };
    let mut waiter = UpdateWaiter {
        connection,
        pool,
        item,
        metadata: &metadata,
        what: &what,
        told: false,
    };
    match wait::until(&schedule, &mut waiter).await? {
        Waited::Done(reply) => stored(&reply, &what, "updated", as_json),
        Waited::TimedOut(reply) => Err(Failure::new(
            exit::HELD,
            format!("{what}: {}", reply.error_message()),
        )),
    }
}

/// `pool update`'s questions: done at 200, not yet at 423 (the item is claimed).
struct UpdateWaiter<'a> {
    connection: &'a Connection,
    pool: &'a str,
    item: &'a str,
    metadata: &'a str,
    what: &'a str,
    told: bool,
}

impl Waiter for UpdateWaiter<'_> {
    type Done = Reply;
    type State = Reply;
    type Error = Failure;

    async fn ask(&mut self, wait: Option<Duration>) -> Result<Round<Reply, Reply>, Failure> {
        let call = self
            .connection
            .client()
            .update_item(self.pool, self.item, self.metadata, wait);
        let reply = self.connection.answer(call).await?;
        match reply.status {
            StatusCode::OK => Ok(Round::Done(reply)),
            StatusCode::LOCKED => Ok(Round::NotYet {
                at_once: answered_at_once(wait, reply.elapsed, &reply.error_message()),
                state: reply,
            }),
            _ => Err(refused(&reply, self.what)),
        }
    }

    async fn not_yet(&mut self, _reply: &Reply, out_of_time: bool) {
        if !self.told && !out_of_time {
            eprintln!(
                "locker: waiting until item {:?} of pool {:?} is released",
                self.item, self.pool
            );
            self.told = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_need_quoting_are_quoted_for_the_shell() {
        assert_eq!(shell_word("env-1"), "env-1");
        assert_eq!(
            shell_word("host/1234/1700000000000"),
            "host/1234/1700000000000"
        );
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }
}
