//! The journal beside the state file: each durable batch becomes one record, written in place
//! into a preallocated file and made durable by a single `fdatasync`, instead of a new copy of
//! the whole state file (a new file, a rename and two file-system journal commits per batch).
//!
//! The state file is rewritten from time to time (compaction), which starts a new *epoch*; the
//! state file names its epoch, and on start-up the records of that epoch are replayed over it.
//!
//! Record layout, little-endian: `len: u32 | crc32: u32 | epoch: u64 | seq: u64 | payload`; the
//! CRC covers epoch, seq and payload. Reading stops at the first record that is torn, of another
//! epoch or out of sequence: what follows is zeroes or left over from an older epoch. Records are
//! written over old ones without clearing them first, which is safe for that reason.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes before each record's payload.
const HEADER: usize = 24;

/// The journal file of a state file: `locks.yml` → `locks.yml.journal`.
pub fn path_for(state_file: &Path) -> PathBuf {
    let mut name = state_file.as_os_str().to_owned();
    name.push(".journal");
    PathBuf::from(name)
}

/// An open journal, positioned after the last record of the current epoch.
pub struct Journal {
    file: File,
    capacity: u64,
    epoch: u64,
    next_seq: u64,
    end: u64,
}

impl Journal {
    /// Opens an existing journal of the right size to go on appending records of `epoch` after
    /// `replayed`, the records read from it. `None` when there is no such journal.
    pub fn reuse(
        path: &Path,
        capacity: u64,
        epoch: u64,
        replayed: &[Vec<u8>],
    ) -> io::Result<Option<Journal>> {
        let reusable = std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == capacity);
        if !reusable {
            return Ok(None);
        }
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Some(Journal {
            file,
            capacity,
            epoch,
            next_seq: replayed.len() as u64 + 1,
            end: replayed.iter().map(|r| (HEADER + r.len()) as u64).sum(),
        }))
    }

    /// (Re)creates the journal, filled with zeroes, so that later writes never allocate blocks:
    /// they cannot fail for lack of space, and `fdatasync` has no metadata to commit.
    pub fn create(path: &Path, capacity: u64, epoch: u64) -> io::Result<Journal> {
        Ok(Journal {
            file: preallocate(path, capacity)?,
            capacity,
            epoch,
            next_seq: 1,
            end: 0,
        })
    }

    /// Appends one record and makes it durable. `Ok(false)`: it does not fit in the space left
    /// (nothing was written).
    pub fn append(&mut self, payload: &[u8]) -> io::Result<bool> {
        let size = (HEADER + payload.len()) as u64;
        if self.end + size > self.capacity {
            return Ok(false);
        }
        let record = encode_record(self.epoch, self.next_seq, payload)?;
        self.file.write_all_at(&record, self.end)?;
        self.file.sync_data()?;
        self.end += size;
        self.next_seq += 1;
        Ok(true)
    }

    /// Overwrites, durably, the header of the record whose `append` failed, so that it is never
    /// replayed: its write may have reached the disk although its sync failed, and the change it
    /// holds was refused. (Zeroes end the replay, like the end of the journal.)
    pub fn erase_unacknowledged(&mut self) -> io::Result<()> {
        let room = self.capacity.saturating_sub(self.end).min(HEADER as u64) as usize;
        self.file.write_all_at(&[0u8; HEADER][..room], self.end)?;
        self.file.sync_data()
    }

    /// Starts a new epoch after the state file was rewritten: older records no longer count.
    pub fn start_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.next_seq = 1;
        self.end = 0;
    }

    /// Bytes of records in the current epoch.
    pub fn used(&self) -> u64 {
        self.end
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

/// The payloads of the records of `epoch` in the journal at `path`, in order; none when there
/// is no journal.
pub fn read(path: &Path, epoch: u64) -> io::Result<Vec<Vec<u8>>> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut file) => file.read_to_end(&mut bytes)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(records(&bytes, epoch))
}

fn records(bytes: &[u8], epoch: u64) -> Vec<Vec<u8>> {
    let mut payloads = Vec::new();
    let mut at = 0;
    let mut seq = 1;
    while let Some(header) = bytes.get(at..at + HEADER) {
        let field = |range: std::ops::Range<usize>| &header[range];
        let len = u32::from_le_bytes(field(0..4).try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(field(4..8).try_into().unwrap_or_default());
        let record_epoch = u64::from_le_bytes(field(8..16).try_into().unwrap_or_default());
        let record_seq = u64::from_le_bytes(field(16..24).try_into().unwrap_or_default());
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if len == 0 || record_epoch != epoch || record_seq != seq {
            break;
        }
        if checksum(&header[8..HEADER], payload) != crc {
            break;
        }
        payloads.push(payload.to_vec());
        at += HEADER + len;
        seq += 1;
    }
    payloads
}

fn encode_record(epoch: u64, seq: u64, payload: &[u8]) -> io::Result<Vec<u8>> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "journal record too large"))?;
    let mut ids = [0u8; 16];
    ids[..8].copy_from_slice(&epoch.to_le_bytes());
    ids[8..].copy_from_slice(&seq.to_le_bytes());
    let mut record = Vec::with_capacity(HEADER + payload.len());
    record.extend_from_slice(&len.to_le_bytes());
    record.extend_from_slice(&checksum(&ids, payload).to_le_bytes());
    record.extend_from_slice(&ids);
    record.extend_from_slice(payload);
    Ok(record)
}

fn checksum(ids: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(ids);
    hasher.update(payload);
    hasher.finalize()
}

/// Writes a zero-filled journal and puts it in place, durably.
fn preallocate(path: &Path, capacity: u64) -> io::Result<File> {
    super::atomic_file::replace(path, |file| {
        let zeroes = vec![0u8; 1 << 20];
        let mut left = capacity;
        while left > 0 {
            let chunk = left.min(zeroes.len() as u64) as usize;
            file.write_all(&zeroes[..chunk])?;
            left -= chunk as u64;
        }
        Ok(())
    })
    .map_err(|e| io::Error::new(e.io().kind(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(dir: &Path, epoch: u64) -> Journal {
        Journal::create(&dir.join("j"), 4096, epoch).expect("journal")
    }

    #[test]
    fn records_of_the_epoch_are_read_back_in_order() {
        let dir = tempfile::tempdir().expect("dir");
        let mut j = journal(dir.path(), 7);
        assert!(j.append(b"one").expect("append"));
        assert!(j.append(b"two").expect("append"));
        assert_eq!(j.used(), (2 * HEADER + 6) as u64);
        let read = read(&dir.path().join("j"), 7).expect("read");
        assert_eq!(read, vec![b"one".to_vec(), b"two".to_vec()]);
        assert!(read_epoch(dir.path(), 8).is_empty());
    }

    fn read_epoch(dir: &Path, epoch: u64) -> Vec<Vec<u8>> {
        read(&dir.join("j"), epoch).expect("read")
    }

    #[test]
    fn a_new_epoch_hides_older_records_it_does_not_overwrite() {
        let dir = tempfile::tempdir().expect("dir");
        let mut j = journal(dir.path(), 1);
        for payload in [b"aaaa", b"bbbb", b"cccc"] {
            assert!(j.append(payload).expect("append"));
        }
        j.start_epoch(2);
        assert!(j.append(b"dd").expect("append"));
        assert_eq!(read_epoch(dir.path(), 2), vec![b"dd".to_vec()]);
        // The old epoch's first record was overwritten; its later ones no longer form a sequence.
        assert!(read_epoch(dir.path(), 1).is_empty());
    }

    #[test]
    fn a_reused_journal_goes_on_after_the_records_it_holds() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("j");
        let mut j = journal(dir.path(), 5);
        assert!(j.append(b"first").expect("append"));
        drop(j);
        let replayed = read(&path, 5).expect("read");
        let mut j = Journal::reuse(&path, 4096, 5, &replayed)
            .expect("reuse")
            .expect("right size");
        assert_eq!(j.used(), (HEADER + 5) as u64);
        assert!(j.append(b"second").expect("append"));
        assert_eq!(
            read(&path, 5).expect("read"),
            vec![b"first".to_vec(), b"second".to_vec()]
        );
        // Another size is not reused.
        assert!(
            Journal::reuse(&path, 8192, 5, &[])
                .expect("reuse")
                .is_none()
        );
    }

    #[test]
    fn a_torn_or_corrupt_record_ends_the_journal() {
        let dir = tempfile::tempdir().expect("dir");
        let mut j = journal(dir.path(), 3);
        assert!(j.append(b"kept").expect("append"));
        assert!(j.append(b"damaged").expect("append"));
        assert!(j.append(b"after").expect("append"));
        let path = dir.path().join("j");
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[2 * HEADER + 4 + 2] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        assert_eq!(read_epoch(dir.path(), 3), vec![b"kept".to_vec()]);
    }

    #[test]
    fn an_erased_record_is_not_replayed_and_the_next_one_takes_its_place() {
        let dir = tempfile::tempdir().expect("dir");
        let mut j = journal(dir.path(), 4);
        assert!(j.append(b"kept").expect("append"));
        // What a record whose sync failed looks like on disk: written in full, not counted.
        let path = dir.path().join("j");
        let refused = encode_record(4, 2, b"refused").expect("encodes");
        let at = j.used();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open")
            .write_all_at(&refused, at)
            .expect("write");
        assert_eq!(read_epoch(dir.path(), 4).len(), 2, "the record is readable");
        j.erase_unacknowledged().expect("erase");
        assert_eq!(read_epoch(dir.path(), 4), vec![b"kept".to_vec()]);
        assert!(j.append(b"next").expect("append"));
        assert_eq!(
            read_epoch(dir.path(), 4),
            vec![b"kept".to_vec(), b"next".to_vec()]
        );
    }

    #[test]
    fn a_record_that_does_not_fit_is_refused_without_writing() {
        let dir = tempfile::tempdir().expect("dir");
        let mut j = journal(dir.path(), 1);
        assert!(!j.append(&[b'x'; 4096]).expect("append"));
        assert_eq!(j.used(), 0);
        assert!(j.append(&[b'x'; 4096 - HEADER]).expect("append"));
        assert!(!j.append(b"y").expect("append"));
        assert_eq!(read_epoch(dir.path(), 1).len(), 1);
    }

    proptest::proptest! {
        /// Whatever a crash or a disk leaves in the file, reading returns a prefix of the
        /// records written, and never panics.
        #[test]
        fn any_damage_leaves_a_prefix_of_the_records(
            payloads in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..40), 0..8),
            damage_at in 0usize..400,
            damage in proptest::collection::vec(proptest::num::u8::ANY, 0..30),
        ) {
            let mut bytes = Vec::new();
            for (i, payload) in payloads.iter().enumerate() {
                bytes.extend(encode_record(9, i as u64 + 1, payload).expect("encodes"));
            }
            bytes.resize(bytes.len() + 64, 0);
            let at = damage_at.min(bytes.len());
            let end = (at + damage.len()).min(bytes.len());
            bytes[at..end].copy_from_slice(&damage[..end - at]);
            let read = records(&bytes, 9);
            proptest::prop_assert!(read.len() <= payloads.len());
            proptest::prop_assert_eq!(&read[..], &payloads[..read.len()]);
        }
    }

    #[test]
    fn a_missing_journal_reads_as_empty_and_is_created_zero_filled() {
        let dir = tempfile::tempdir().expect("dir");
        assert!(read_epoch(dir.path(), 1).is_empty());
        std::fs::write(dir.path().join("j"), b"short").expect("write");
        let _j = journal(dir.path(), 1);
        let bytes = std::fs::read(dir.path().join("j")).expect("read");
        assert_eq!(bytes.len(), 4096);
        assert!(bytes.iter().all(|b| *b == 0));
    }
}
