//! Durable file writes: temp file, fsync, rename, fsync the directory.
//!
//! After a crash a file written here holds either its old or its new
//! content, never a mix, and a rename that returned is not undone.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Mode for secrets: owner read/write only.
pub const SECRET: u32 = 0o600;
/// Mode for public files.
pub const PUBLIC: u32 = 0o644;

/// Write `bytes` to `path` atomically and durably with file mode `mode`.
/// After a crash the file holds either the old or the new content.
///
/// # Errors
/// Any I/O error (full disk included); the old file is then untouched and
/// the temp file removed.
pub fn write_durable(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_or_dot(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        rename_durable(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// fsync a file that was written (and closed) elsewhere.
///
/// # Errors
/// If it cannot be opened or synced.
pub fn fsync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// fsync a directory, making renames and creations inside it durable.
///
/// # Errors
/// If it cannot be opened or synced.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Rename `tmp` over `dst` and fsync `dst`'s directory, so that after this
/// returns the new file is what `dst` names, even after a crash. `tmp` must
/// already be synced.
///
/// # Errors
/// If the rename or the directory's fsync fails.
pub fn rename_durable(tmp: &Path, dst: &Path) -> io::Result<()> {
    std::fs::rename(tmp, dst)?;
    fsync_dir(parent_or_dot(dst))
}

/// Create `dir` (and parents) and make its entry in the parent durable.
///
/// # Errors
/// If it cannot be created or its parent synced.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// The directory holding `p` ("." for a bare file name).
#[must_use]
pub fn parent_or_dot(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// A file name that no other temp file of this process or another one will
/// use: pid, a process-wide counter and the clock.
#[must_use]
pub fn unique_tmp_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:08x}.tmp", std::process::id())
}

/// Whether an I/O error means "no space left" (ENOSPC) or "quota exceeded"
/// (EDQUOT): callers surface both as a distinct error, so an operator (or
/// the API's 507) sees a full disk rather than a broken store.
#[must_use]
pub fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(28 | 122))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_with_mode_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        write_durable(&p, b"one", SECRET).unwrap();
        write_durable(&p, b"two", SECRET).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temp files left behind"
        );
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        write_durable(&p, b"old", PUBLIC).unwrap();
        // A directory in the way of the rename: the write must fail cleanly.
        let blocked = d.path().join("sub");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"x").unwrap();
        assert!(write_durable(&blocked, b"new", PUBLIC).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "only k and sub remain: {names:?}");
    }

    #[test]
    fn disk_full_is_recognised_by_errno_and_kind() {
        assert!(is_disk_full(&io::Error::from_raw_os_error(28)));
        assert!(is_disk_full(&io::Error::from_raw_os_error(122)));
        assert!(is_disk_full(&io::Error::from(io::ErrorKind::StorageFull)));
        assert!(!is_disk_full(&io::Error::from_raw_os_error(2)));
    }

    #[test]
    fn unique_names_differ_and_parents_resolve() {
        assert_ne!(unique_tmp_name("a"), unique_tmp_name("a"));
        assert_eq!(parent_or_dot(Path::new("f")), Path::new("."));
        assert_eq!(parent_or_dot(Path::new("/x/f")), Path::new("/x"));
    }
}
