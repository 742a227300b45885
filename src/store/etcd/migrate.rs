//! Moving lock state between a YAML state file (ours, or the original Go locker's) and etcd:
//! `locker import FILE` and `locker export FILE`. Held locks and pools (items, metadata,
//! claims) go both ways; waiters do not (they belong to open connections).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use etcd_client::{Client, DeleteOptions, GetOptions, Txn, TxnOp};

use super::codec::{self, CodecError, KeyKind, Keys};
use super::{ConnectError, EtcdConnection, MAX_TXN_OPS, kv, runtime};
use crate::rules::{LockTable, Pool};
use crate::store::atomic_file::ReplaceError;
use crate::store::state_file;

/// Bytes of keys and values per transaction, well under etcd's `--max-request-bytes` (1.5 MiB
/// by default); a single put larger than this goes alone.
const CHUNK_BYTES: usize = 1024 * 1024;

/// Why `locker import` or `locker export` failed; each says which side.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The state file to import (or its journal).
    #[error(transparent)]
    Load(#[from] crate::store::file::OpenError),
    #[error("{}: no such state file", .0.display())]
    NoStateFile(PathBuf),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("etcd: {0}")]
    Etcd(#[source] TransferError),
    #[error(transparent)]
    Encode(#[from] state_file::EncodeError),
    #[error("standard output: {0}")]
    Stdout(#[source] std::io::Error),
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: ReplaceError },
}

/// What went wrong moving locks to or from etcd.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(
        "{count} lock(s) and pool(s) already stored under {prefix:?}; export them first, or \
         import with --replace to overwrite them"
    )]
    AlreadyStored { count: i64, prefix: String },
}

/// Loads a state file into etcd. Refuses when etcd already holds locks under the prefix,
/// unless `replace`, which deletes them first. Returns a summary for the operator.
pub fn import_file(
    connection: &EtcdConnection,
    path: &Path,
    replace: bool,
) -> Result<String, MigrateError> {
    let file = path.display();
    // With the records of its journal: a server that stopped abruptly left some there.
    let table = crate::store::file::load(path)?
        .ok_or_else(|| MigrateError::NoStateFile(path.to_path_buf()))?;
    let runtime = runtime()?;
    let result = runtime.block_on(async {
        let mut client = connection.connect().await?;
        import(&mut client, &Keys::new(&connection.prefix), &table, replace)
            .await
            .map_err(MigrateError::Etcd)
    });
    runtime.shutdown_background();
    let imported = result?;
    Ok(format!(
        "imported {} held lock(s) and {} pool(s) ({} item(s)) from {file} into etcd under {:?}; \
         next generation {}",
        imported.locks,
        imported.pools,
        imported.items,
        connection.prefix,
        table.next_generation()
    ))
}

/// Writes etcd's state to a state file (atomically: temp file, fsync, rename), or to standard
/// output for `-`.
pub fn export_file(connection: &EtcdConnection, path: &Path) -> Result<String, MigrateError> {
    let runtime = runtime()?;
    let result = runtime.block_on(async {
        let mut client = connection.connect().await?;
        export(&mut client, &Keys::new(&connection.prefix))
            .await
            .map_err(MigrateError::Etcd)
    });
    runtime.shutdown_background();
    let table = result?;
    let bytes = state_file::encode(&table)?;
    let file = path.display();
    if path.as_os_str() == "-" {
        std::io::stdout()
            .write_all(&bytes)
            .map_err(MigrateError::Stdout)?;
    } else {
        crate::store::atomic_file::replace(path, |out| out.write_all(&bytes)).map_err(
            |source| MigrateError::Write {
                path: path.to_path_buf(),
                source,
            },
        )?;
    }
    Ok(format!(
        "exported {} held lock(s) and {} pool(s) from etcd under {:?} to {file}; next \
         generation {}",
        table.locks().len(),
        table.pools().len(),
        connection.prefix,
        table.next_generation()
    ))
}

/// What [`import`] put into etcd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Imported {
    pub locks: usize,
    pub pools: usize,
    pub items: usize,
}

/// Puts every lock and pool of `table`.
pub async fn import(
    client: &mut Client,
    keys: &Keys,
    table: &LockTable,
    replace: bool,
) -> Result<Imported, TransferError> {
    let mut existing = 0;
    for prefix in [keys.locks_prefix(), keys.pools_prefix()] {
        existing += client
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?
            .count();
    }
    if existing > 0 && !replace {
        return Err(TransferError::AlreadyStored {
            count: existing,
            prefix: keys.prefix().to_string(),
        });
    }
    if existing > 0 {
        let deletes: Vec<TxnOp> = [
            keys.locks_prefix(),
            keys.pools_prefix(),
            keys.pool_items_prefix(),
        ]
        .into_iter()
        .map(|prefix| TxnOp::delete(prefix, Some(DeleteOptions::new().with_prefix())))
        .collect();
        client.txn(Txn::new().and_then(deletes)).await?;
    }
    // Metadata before the pools that name it, so that a server never sees an item without.
    let mut puts: Vec<(String, Vec<u8>)> = Vec::new();
    let mut imported = Imported::default();
    for (name, pool) in table.pools() {
        for (item, state) in &pool.items {
            puts.push((
                keys.pool_item(name, item),
                codec::encode_metadata(&state.metadata),
            ));
            imported.items += 1;
        }
    }
    for (name, pool) in table.pools() {
        puts.push((keys.pool(name), codec::encode_pool(pool, &[], &[])?));
        imported.pools += 1;
    }
    for (name, lock) in table.locks() {
        puts.push((keys.lock(name), codec::encode_lock(lock, &[], &[])?));
        imported.locks += 1;
    }
    let current = client
        .get(keys.meta(), None)
        .await?
        .kvs()
        .first()
        .map(|kv| codec::decode_meta(kv.value()))
        .transpose()?
        .unwrap_or(1);
    let next = current.max(table.next_generation());
    // The counter first: a server that sees the locks must never hand out a lower generation.
    client
        .put(keys.meta(), codec::encode_meta(next), None)
        .await?;
    let mut puts = puts.into_iter().peekable();
    while puts.peek().is_some() {
        let mut chunk = Vec::new();
        let mut bytes = 0;
        while let Some((key, value)) = puts.next_if(|(key, value)| {
            chunk.is_empty()
                || (chunk.len() < MAX_TXN_OPS && bytes + key.len() + value.len() <= CHUNK_BYTES)
        }) {
            bytes += key.len() + value.len();
            chunk.push(TxnOp::put(key, value, None));
        }
        client.txn(Txn::new().and_then(chunk)).await?;
    }
    Ok(imported)
}

/// Reads every lock and pool and the generation counter, at one revision.
pub async fn export(client: &mut Client, keys: &Keys) -> Result<LockTable, TransferError> {
    let response = kv(client)
        .get(keys.prefix(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut locks = BTreeMap::new();
    let mut pools: BTreeMap<String, Pool> = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    let mut next_generation = 1;
    for kv in response.kvs() {
        let Ok(key) = kv.key_str() else { continue };
        match keys.classify(key) {
            KeyKind::Meta => next_generation = codec::decode_meta(kv.value())?,
            KeyKind::Lock(name) => {
                let lock = codec::decode_lock(name, kv.value())?.lock;
                // Waiters belong to live connections and are not exported.
                let lock = crate::rules::Lock::restore(lock.slots, lock.holders, Vec::new());
                locks.insert(name.to_string(), lock);
            }
            KeyKind::Pool(name) => {
                let pool = codec::decode_pool(name, kv.value())?.pool;
                // Nor are waiting claims.
                pools.insert(
                    name.to_string(),
                    Pool::restore(pool.items, pool.clock, Vec::new()),
                );
            }
            KeyKind::PoolItem(pool, item) => {
                let text = codec::decode_metadata(&pool, item, kv.value())?;
                metadata.insert((pool, item.to_string()), text);
            }
            _ => {}
        }
    }
    for ((pool, item), text) in metadata {
        if let Some(state) = pools.get_mut(&pool).and_then(|p| p.items.get_mut(&item)) {
            state.metadata = text;
        }
    }
    Ok(LockTable::from_parts(locks, next_generation).with_pools(pools))
}
