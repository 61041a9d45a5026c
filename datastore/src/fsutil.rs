//! Small filesystem helpers shared by the chunk store and the volume store.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Whether an I/O error means "no space left" (ENOSPC) or "quota exceeded"
/// (EDQUOT): both are surfaced as a distinct error so callers can free space
/// (prune, gc) and retry instead of treating the store as broken.
pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(28 | 122))
}

/// fsync a directory, making renames and creations inside it durable.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Create `dir` (and parents) and make its entry in the parent durable.
pub(crate) fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// A file name that no other temp file of this process or another one will
/// use: pid, a process-wide counter and the clock.
pub(crate) fn unique_tmp_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:08x}.tmp", std::process::id())
}

/// Rename `tmp` over `dst` and fsync `dst`'s directory, so that after this
/// returns the new file is what `dst` names, even after a crash.
pub(crate) fn rename_durable(tmp: &Path, dst: &Path) -> io::Result<()> {
    std::fs::rename(tmp, dst)?;
    fsync_dir(parent_or_dot(dst))
}

/// The directory holding `p` ("." for a bare file name).
pub(crate) fn parent_or_dot(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Removes a file when dropped unless disarmed: temp files never outlive
/// a failed operation (a crash may still leave them; stores clean their
/// temp directories when they open).
pub(crate) struct TempFile {
    path: Option<PathBuf>,
}

impl TempFile {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self { path: Some(path) }
    }

    pub(crate) fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Keep the file (it was renamed into place).
    pub(crate) fn disarm(mut self) {
        self.path = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// How long opening a sled database waits for the previous holder of its
/// lock. sled's background threads keep the lock file open for a moment
/// after a database is dropped, so a store closed and reopened in one
/// process (a restart of the agent's storage, tests) would otherwise fail
/// at random.
const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Open a sled database, waiting up to [`SLED_LOCK_WAIT`] for its lock.
pub(crate) fn open_sled(config: &sled::Config) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + SLED_LOCK_WAIT;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}
