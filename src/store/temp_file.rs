//! Temp files beside the state file, created so that nothing planted at their path is followed.
//!
//! The state file's directory may be shared (or writable by others by mistake). A symlink planted
//! at a predictable temp name would otherwise make the server, often root, overwrite the link's
//! target with the lock state. So the name is first unlinked (removing a link, never its target),
//! then created with `O_CREAT | O_EXCL | O_NOFOLLOW`: if anything reappears there in between, the
//! create fails and the write is refused instead of following it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

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
}
