//! The real binary started on a damaged journal (`LOCKER_JOURNAL_BYTES` on). A server is killed
//! right after three acknowledged locks, so its state file lacks them and only its journal has
//! them, as three records. Then one record is damaged the way a crash or a stale file leaves
//! it: torn (its bytes no longer match its CRC), of another epoch, or out of sequence (each
//! with a valid CRC). A start replays the records before the damaged one and none after it.

pub mod common;

use std::path::{Path, PathBuf};

use serde_json::json;

const JOURNAL_BYTES: &str = "65536";
const HEADER: usize = 24;
const NAMES: [&str; 3] = ["first", "second", "third"];

/// A crashed server's files: the state file and the journal, and the journal's bytes then.
struct Crashed {
    _dir: tempfile::TempDir,
    state: PathBuf,
    journal: PathBuf,
    state_bytes: Vec<u8>,
    journal_bytes: Vec<u8>,
}

/// Locks the three names, then SIGKILLs the server before the state file absorbs them (it is
/// rewritten a second after a record); tries again the rare time a loaded machine was slower.
fn crashed() -> Crashed {
    for _ in 0..5 {
        let dir = common::temp_dir();
        let state = dir.path().join("locker.yml");
        let mut server = common::server()
            .state_file(&state)
            .env("LOCKER_JOURNAL_BYTES", JOURNAL_BYTES)
            .start();
        for name in NAMES {
            let reply = server.lock(name, json!({"key": "k"}));
            assert_eq!(reply.status, 200, "{}", reply.body);
        }
        server.kill();
        let state_bytes = std::fs::read(&state).expect("state file");
        let text = String::from_utf8_lossy(&state_bytes);
        if NAMES.iter().any(|name| text.contains(name)) {
            continue;
        }
        let journal = PathBuf::from(format!("{}.journal", state.display()));
        let journal_bytes = std::fs::read(&journal).expect("journal");
        return Crashed {
            _dir: dir,
            state,
            journal,
            state_bytes,
            journal_bytes,
        };
    }
    panic!("the state file always had the locks already: no crash left them in the journal only");
}

/// Offset and length (header included) of each record at the start of `journal`.
fn records(journal: &[u8]) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(header) = journal.get(at..at + HEADER) {
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        if len == 0 {
            break;
        }
        found.push((at, HEADER + len));
        at += HEADER + len;
    }
    found
}

fn field(record: &[u8], range: std::ops::Range<usize>) -> u64 {
    u64::from_le_bytes(record[range].try_into().expect("8 bytes"))
}

/// Sets a record's epoch and sequence number and gives it the CRC that makes it valid again.
fn rewrite(record: &mut [u8], epoch: u64, seq: u64) {
    record[8..16].copy_from_slice(&epoch.to_le_bytes());
    record[16..24].copy_from_slice(&seq.to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&record[8..]);
    record[4..8].copy_from_slice(&hasher.finalize().to_le_bytes());
}

/// Puts the crashed files back with `journal` as the journal, starts a server on them and
/// returns the names it holds.
fn start_on(crashed: &Crashed, journal: &[u8]) -> (common::Server, Vec<String>) {
    std::fs::write(&crashed.state, &crashed.state_bytes).expect("state file");
    std::fs::write(&crashed.journal, journal).expect("journal");
    let server = common::server()
        .state_file(&crashed.state)
        .env("LOCKER_JOURNAL_BYTES", JOURNAL_BYTES)
        .start();
    let locks = server.locks();
    let names = locks
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    (server, names)
}

fn held(names: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    names.sort();
    names
}

#[test]
fn a_start_replays_the_records_before_a_torn_foreign_or_out_of_sequence_one_and_none_after() {
    let crashed = crashed();
    let found = records(&crashed.journal_bytes);
    assert_eq!(
        found.len(),
        3,
        "one record per acknowledged lock: {found:?}"
    );
    let (second_at, second_len) = found[1];
    let second = second_at..second_at + second_len;
    let epoch = field(&crashed.journal_bytes[second.clone()], 8..16);
    let seq = field(&crashed.journal_bytes[second.clone()], 16..24);
    assert_eq!(
        field(&crashed.journal_bytes[found[0].0..], 16..24) + 1,
        seq,
        "records are numbered in order"
    );

    // Intact: all three are replayed.
    let (server, names) = start_on(&crashed, &crashed.journal_bytes);
    assert_eq!(names, held(&NAMES), "intact journal");
    drop(server);

    // Torn: a byte of the second record's payload no longer matches its CRC.
    let mut torn = crashed.journal_bytes.clone();
    torn[second_at + HEADER + (second_len - HEADER) / 2] ^= 0x20;
    let (server, names) = start_on(&crashed, &torn);
    assert_eq!(names, held(&NAMES[..1]), "torn second record");
    // The server goes on normally from there, and its start-up rewrite kept the first lock.
    assert_eq!(server.lock("later", json!({"key": "k"})).status, 200);
    let server = server.restart();
    let locks = server.locks();
    assert_eq!(locks["first"]["key"], "k", "{locks}");
    assert_eq!(locks["later"]["key"], "k", "{locks}");
    assert!(locks.get("second").is_none(), "{locks}");
    drop(server);

    // A valid record of another epoch (left over from before the last rewrite).
    let mut foreign = crashed.journal_bytes.clone();
    rewrite(&mut foreign[second.clone()], epoch + 1, seq);
    let (server, names) = start_on(&crashed, &foreign);
    assert_eq!(names, held(&NAMES[..1]), "second record of another epoch");
    drop(server);
    let mut older = crashed.journal_bytes.clone();
    rewrite(&mut older[second.clone()], epoch.saturating_sub(1), seq);
    let (server, names) = start_on(&crashed, &older);
    assert_eq!(names, held(&NAMES[..1]), "second record of an older epoch");
    drop(server);

    // A valid record out of sequence: skipped ahead, or repeated.
    for (wrong, why) in [(seq + 1, "skipped ahead"), (seq - 1, "repeated")] {
        let mut out_of_sequence = crashed.journal_bytes.clone();
        rewrite(&mut out_of_sequence[second.clone()], epoch, wrong);
        let (server, names) = start_on(&crashed, &out_of_sequence);
        assert_eq!(names, held(&NAMES[..1]), "second record's sequence {why}");
        drop(server);
    }

    // Zeroes from the second record on (a journal that ends there) replay the first only.
    let mut ended = crashed.journal_bytes.clone();
    ended[second_at..].fill(0);
    let (_server, names) = start_on(&crashed, &ended);
    assert_eq!(
        names,
        held(&NAMES[..1]),
        "journal ending after the first record"
    );
}

#[test]
fn the_crashed_files_hold_the_locks_in_the_journal_only() {
    // The premise of the test above, stated on its own: a reader of the state file alone
    // would miss the three locks, so every name replayed above came from the journal.
    let crashed = crashed();
    let text = String::from_utf8_lossy(&crashed.state_bytes);
    for name in NAMES {
        assert!(!text.contains(name), "{name} in {text}");
    }
    let epoch = field(&crashed.journal_bytes, 8..16);
    let payloads =
        locker::store::journal::read(Path::new(&crashed.journal), epoch).expect("read the journal");
    assert_eq!(payloads.len(), 3);
}
