//! Moving lock state between a YAML state file (ours, or the original Go locker's) and etcd:
//! `locker import FILE` and `locker export FILE`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use etcd_client::{Client, DeleteOptions, GetOptions, Txn, TxnOp};

use super::codec::{self, KeyKind, Keys};
use super::{EtcdConnection, runtime};
use crate::rules::LockTable;
use crate::store::state_file;

/// Puts per transaction (etcd allows 128 operations in one).
const CHUNK: usize = 100;

/// Loads a state file into etcd. Refuses when etcd already holds locks under the prefix,
/// unless `replace`, which deletes them first. Returns a summary for the operator.
pub fn import_file(
    connection: &EtcdConnection,
    path: &Path,
    replace: bool,
) -> Result<String, String> {
    let file = path.display();
    // With the records of its journal: a server that stopped abruptly left some there.
    let table =
        crate::store::file::load(path)?.ok_or_else(|| format!("{file}: no such state file"))?;
    let runtime = runtime()?;
    let result = runtime.block_on(async {
        let mut client = connection.connect().await?;
        import(&mut client, &Keys::new(&connection.prefix), &table, replace)
            .await
            .map_err(|e| format!("etcd: {e}"))
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
pub fn export_file(connection: &EtcdConnection, path: &Path) -> Result<String, String> {
    let runtime = runtime()?;
    let result = runtime.block_on(async {
        let mut client = connection.connect().await?;
        export(&mut client, &Keys::new(&connection.prefix))
            .await
            .map_err(|e| format!("etcd: {e}"))
    });
    runtime.shutdown_background();
    let table = result?;
    let bytes = state_file::encode(&table).map_err(|e| e.to_string())?;
    let file = path.display();
    if path.as_os_str() == "-" {
        std::io::stdout()
            .write_all(&bytes)
            .map_err(|e| format!("standard output: {e}"))?;
    } else {
        crate::store::atomic_file::replace(path, |out| out.write_all(&bytes))
            .map_err(|e| format!("{file}: {e}"))?;
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
) -> Result<usize, String> {
    let existing = client
        .get(
            keys.locks_prefix(),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .map_err(|e| e.to_string())?
        .count();
    if existing > 0 && !replace {
        return Err(format!(
            "{existing} lock(s) already stored under {:?}; export them first, or import with \
             --replace to overwrite them",
            keys.prefix()
        ));
    }
    if existing > 0 {
        client
            .delete(
                keys.locks_prefix(),
                Some(DeleteOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| e.to_string())?;
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
        .await
        .map_err(|e| e.to_string())?
        .kvs()
        .first()
        .map(|kv| codec::decode_meta(kv.value()))
        .transpose()?
        .unwrap_or(1);
    let next = current.max(table.next_generation());
    // The counter first: a server that sees the locks must never hand out a lower generation.
    client
        .put(keys.meta(), codec::encode_meta(next), None)
        .await
        .map_err(|e| e.to_string())?;
    let mut puts = puts.into_iter().peekable();
    while puts.peek().is_some() {
        let chunk: Vec<TxnOp> = puts.by_ref().take(CHUNK).collect();
        client
            .txn(Txn::new().and_then(chunk))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(count)
}

/// Reads every lock and the generation counter, at one revision.
pub async fn export(client: &mut Client, keys: &Keys) -> Result<LockTable, String> {
    let response = client
        .get(keys.prefix(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| e.to_string())?;
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
