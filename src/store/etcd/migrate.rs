//! Moving lock state between a YAML state file (ours, or the original Go locker's) and etcd:
//! `locker import FILE` and `locker export FILE`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use etcd_client::{Client, DeleteOptions, GetOptions, Txn, TxnOp};

use super::codec::{self, CodecError, KeyKind, Keys};
use super::{ConnectError, EtcdConnection, runtime};
use crate::rules::LockTable;
use crate::store::atomic_file::ReplaceError;
use crate::store::state_file;

/// Puts per transaction (etcd allows 128 operations in one).
const CHUNK: usize = 100;

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
        "{count} lock(s) already stored under {prefix:?}; export them first, or import with \
         --replace to overwrite them"
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
    let locks = result?;
    Ok(format!(
        "imported {locks} held lock(s) from {file} into etcd under {:?}; next generation {}",
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
        "exported {} held lock(s) from etcd under {:?} to {file}; next generation {}",
        table.locks().len(),
        connection.prefix,
        table.next_generation()
    ))
}

/// Puts every lock of `table`; returns how many.
pub async fn import(
    client: &mut Client,
    keys: &Keys,
    table: &LockTable,
    replace: bool,
) -> Result<usize, TransferError> {
    let existing = client
        .get(
            keys.locks_prefix(),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?
        .count();
    if existing > 0 && !replace {
        return Err(TransferError::AlreadyStored {
            count: existing,
            prefix: keys.prefix().to_string(),
        });
    }
    if existing > 0 {
        client
            .delete(
                keys.locks_prefix(),
                Some(DeleteOptions::new().with_prefix()),
            )
            .await?;
    }
    let mut puts = Vec::new();
    for (name, lock) in table.locks() {
        puts.push(TxnOp::put(
            keys.lock(name),
            codec::encode_lock(lock, &[], &[])?,
            None,
        ));
    }
    let count = puts.len();
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
        let chunk: Vec<TxnOp> = puts.by_ref().take(CHUNK).collect();
        client.txn(Txn::new().and_then(chunk)).await?;
    }
    Ok(count)
}

/// Reads every lock and the generation counter, at one revision.
pub async fn export(client: &mut Client, keys: &Keys) -> Result<LockTable, TransferError> {
    let response = client
        .get(keys.prefix(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut locks = BTreeMap::new();
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
            _ => {}
        }
    }
    Ok(LockTable::from_parts(locks, next_generation))
}
