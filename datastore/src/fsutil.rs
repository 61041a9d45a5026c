//! Filesystem helpers of the chunk store and the volume store. The durable
//! write primitives are `util::fs`'s, re-exported here.

use std::io;
use std::path::{Path, PathBuf};

pub(crate) use util::fs::{
    create_dir_durable, fsync_dir, fsync_file, is_disk_full, parent_or_dot, rename_durable,
    unique_tmp_name,
};
/// Milliseconds since the Unix epoch (`util::time::unix_ms`).
pub(crate) use util::time::unix_ms as now_ms;

/// Why a store's `FORMAT` file could not be written or checked.
#[derive(Debug)]
pub(crate) enum FormatError {
    /// The file names another format (version).
    Unsupported { path: PathBuf, found: String },
    /// Reading or writing it failed.
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Write `format` to `dir/FORMAT` in a new store (durably), or check that
/// an existing store's `FORMAT` says exactly `format`.
pub(crate) fn check_format(dir: &Path, format: &str) -> Result<(), FormatError> {
    let path = dir.join("FORMAT");
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| FormatError::Io { op, path, source }
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if s == format => Ok(()),
        Ok(found) => Err(FormatError::Unsupported { path, found }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let tmp = dir.join(unique_tmp_name("FORMAT"));
            std::fs::write(&tmp, format).map_err(io("write", &tmp))?;
            fsync_file(&tmp).map_err(io("fsync", &tmp))?;
            rename_durable(&tmp, &path).map_err(io("rename", &path))
        }
        Err(e) => Err(io("read", &path)(e)),
    }
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
