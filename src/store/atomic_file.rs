//! Replacing a file atomically and durably: the one routine behind the state file, the journal's
//! creation and `locker export`. Whoever reads the file at any instant sees the complete old
//! content or the complete new one, and once [`replace`] returns `Ok` the new one survives a
//! crash. Files are the owner's only (0600): they hold who holds what.
//!
//! The temp file beside the target is created so that nothing planted at its path is followed.
//! The directory may be shared (or writable by others by mistake). A symlink planted at a
//! predictable temp name would otherwise make the server, often root, overwrite the link's
//! target with the lock state. So the name is first unlinked (removing a link, never its target),
//! then created with `O_CREAT | O_EXCL | O_NOFOLLOW`: if anything reappears there in between, the
//! create fails and the write is refused instead of following it.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a replacement failed, and so what the disk holds.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    /// Writing, syncing or renaming the temp file failed: the target is as it was.
    #[error("{0}")]
    Unchanged(io::Error),
    /// The new file took the target's place, but syncing the directory failed: after a crash
    /// the target may be the old file or the new one.
    #[error("syncing the directory after the rename: {0}")]
    Renamed(io::Error),
}

impl ReplaceError {
    pub fn io(&self) -> &io::Error {
        match self {
            ReplaceError::Unchanged(e) | ReplaceError::Renamed(e) => e,
        }
    }
}

/// The directory holding `path` (`.` for a bare file name).
pub fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The temp file a replacement of `path` writes first: `.NAME.locker-tmp` beside it. Left
/// behind only by a crash in the middle of a replacement.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".locker-tmp");
    directory_of(path).join(name)
}

/// Replaces `path` with what `write` puts in a new private file: written, `fdatasync`ed,
/// renamed over `path`, and the directory `fsync`ed. Returns the new file, open.
pub fn replace(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<File, ReplaceError> {
    let temp = temp_path(path);
    let written = create_private(&temp).and_then(|mut file| {
        write(&mut file)?;
        // fdatasync: the data and the size needed to read it back; the rename and the
        // directory's fsync after it make the new name durable.
        file.sync_data()?;
        std::fs::rename(&temp, path)?;
        Ok(file)
    });
    let file = written.map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        ReplaceError::Unchanged(e)
    })?;
    File::open(directory_of(path))
        .and_then(|dir| dir.sync_all())
        .map_err(ReplaceError::Renamed)?;
    Ok(file)
}

/// Creates a new, empty file at `path`, readable and writable by the owner only, replacing any
/// file or link there without following it.
pub fn create_private(path: &Path) -> io::Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_planted_symlink_is_replaced_and_its_target_left_alone() {
        let dir = tempfile::tempdir().expect("dir");
        let target = dir.path().join("target");
        std::fs::write(&target, b"precious").expect("write");
        let temp = dir.path().join(".temp");
        std::os::unix::fs::symlink(&target, &temp).expect("symlink");
        let mut file = create_private(&temp).expect("create");
        io::Write::write_all(&mut file, b"state").expect("write");
        assert_eq!(std::fs::read(&target).expect("read"), b"precious");
        let meta = std::fs::symlink_metadata(&temp).expect("meta");
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_replaced_file_is_private_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.yml");
        std::fs::write(&path, b"old").expect("write");
        replace(&path, |file| io::Write::write_all(file, b"new")).expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!temp_path(&path).exists());
        // A failed write leaves the old content and no temp file.
        let failed = replace(&path, |_| Err(io::Error::other("disk on fire")));
        assert!(matches!(failed, Err(ReplaceError::Unchanged(_))));
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        assert!(!temp_path(&path).exists());
    }
}
