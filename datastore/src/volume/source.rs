//! Where a volume import reads its image from: a regular file, named by an
//! absolute path, opened without blocking and without following a symbolic
//! link, and checked *before* the import takes any lock.
//!
//! Why so strict: an import runs with the agent's rights on a path a client
//! names. A FIFO blocks `open` until something writes to it (an import
//! stuck there held the volume lock, and every other volume's snapshots
//! stalled behind it); a device is no image; a symlink or a path outside
//! the allowed directories reads files the client could not (a key,
//! `/etc/shadow`). So [`ImportSource::open`] opens with `O_NONBLOCK |
//! O_NOFOLLOW`, refuses anything `fstat` does not call a regular file, and
//! checks where the *opened* file really is (through `/proc/self/fd`, so
//! a symlink in a parent directory or a rename race changes nothing).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Raw images are whole 512-byte sectors (what every block layer expects).
pub const SECTOR: u64 = 512;

/// The first bytes of a qcow2 image.
pub(crate) const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Why an import source was refused. Nothing was locked or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// A relative path: the agent's working directory is not the client's.
    #[error("import source {0} is not an absolute path")]
    Relative(PathBuf),
    /// The path names a symbolic link.
    #[error("import source {0} is a symbolic link; name the image file itself")]
    Symlink(PathBuf),
    /// A FIFO, a device, a directory, a socket.
    #[error("import source {path} is {kind}, not a regular file; images are imported from regular files only")]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// `a FIFO`, `a block device`...
        kind: &'static str,
    },
    /// A raw image whose size is not whole sectors.
    #[error("import source {path} is {size} bytes, not a multiple of {SECTOR} (a raw image is whole sectors)")]
    Unaligned {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The file is outside every directory imports may read.
    #[error("import source {path} is outside the import directories ({dirs}); move it into one of them or add its directory to `[volumes] import_dirs`")]
    NotAllowed {
        /// The path as resolved.
        path: PathBuf,
        /// The allowed directories, comma-separated.
        dirs: String,
    },
    /// A qcow2 image that would make `qemu-img` read another file.
    #[error("import source {0} is a qcow2 image with a backing file or an external data file; convert it to a standalone image first")]
    Qcow2External(PathBuf),
    /// Opening or reading it failed (missing, not readable by the agent).
    #[error("cannot read import source {path}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

/// An opened, checked import source.
#[derive(Debug)]
pub struct ImportSource {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    pub(crate) qcow2: bool,
}

fn kind_of(t: std::fs::FileType) -> Option<&'static str> {
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_symlink() {
        Some("a symbolic link")
    } else {
        Some("not a regular file")
    }
}

impl ImportSource {
    /// Opens `path` for an import. `allowed`: the directories the file must
    /// (really) be in; `None` allows any (a local, trusted caller).
    ///
    /// # Errors
    /// [`SourceError`]. Never blocks on a FIFO or a device.
    pub fn open(path: &Path, allowed: Option<&[PathBuf]>) -> Result<ImportSource, SourceError> {
        if !path.is_absolute() {
            return Err(SourceError::Relative(path.to_owned()));
        }
        let open_err = |source| SourceError::Open {
            path: path.to_owned(),
            source,
        };
        // Refuse what is plainly not a file before even opening it (opening
        // some devices has effects of its own).
        let lmeta = std::fs::symlink_metadata(path).map_err(open_err)?;
        if lmeta.file_type().is_symlink() {
            return Err(SourceError::Symlink(path.to_owned()));
        }
        if let Some(kind) = kind_of(lmeta.file_type()) {
            return Err(SourceError::NotRegular {
                path: path.to_owned(),
                kind,
            });
        }
        let flags = rustix::fs::OFlags::NONBLOCK
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::NOCTTY;
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(flags.bits() as i32)
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                    SourceError::Symlink(path.to_owned())
                } else {
                    open_err(e)
                }
            })?;
        // What was opened is what counts (the path may have changed since).
        let meta = file.metadata().map_err(open_err)?;
        if let Some(kind) = kind_of(meta.file_type()) {
            return Err(SourceError::NotRegular {
                path: path.to_owned(),
                kind,
            });
        }
        if let Some(dirs) = allowed {
            let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .map_err(open_err)?;
            let inside = dirs
                .iter()
                .any(|d| std::fs::canonicalize(d).is_ok_and(|d| real.starts_with(&d) && real != d));
            if !inside {
                let dirs = dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(SourceError::NotAllowed { path: real, dirs });
            }
        }
        let len = meta.len();
        let mut head = [0u8; 80];
        let n = read_head(&file, &mut head).map_err(open_err)?;
        let qcow2 = n >= 4 && head[..4] == QCOW2_MAGIC;
        if qcow2 {
            // Bytes past a short file read as zeros: a truncated header
            // names no other file (and `qemu-img` refuses it).
            if qcow2_reads_other_files(&head) {
                return Err(SourceError::Qcow2External(path.to_owned()));
            }
        } else if len % SECTOR != 0 {
            return Err(SourceError::Unaligned {
                path: path.to_owned(),
                size: len,
            });
        }
        Ok(ImportSource {
            file,
            path: path.to_owned(),
            qcow2,
        })
    }

    /// The path it was opened by.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it is a qcow2 image (converted by `qemu-img`).
    #[must_use]
    pub fn is_qcow2(&self) -> bool {
        self.qcow2
    }
}

fn read_head(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Whether a qcow2 header names a backing file (bytes 8..16, non-zero) or,
/// in version 3, sets the "external data file" incompatible feature (bit 2
/// of bytes 72..80): either makes `qemu-img convert` read another file.
fn qcow2_reads_other_files(head: &[u8; 80]) -> bool {
    let be = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let version = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    be(8) != 0 || (version >= 3 && be(72) & 0b100 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_headers_with_other_files_are_recognised() {
        let mut h = [0u8; 80];
        h[..4].copy_from_slice(&QCOW2_MAGIC);
        h[7] = 3;
        assert!(!qcow2_reads_other_files(&h));
        h[15] = 0x70; // backing file offset
        assert!(qcow2_reads_other_files(&h));
        h[15] = 0;
        h[79] = 0b100; // external data file
        assert!(qcow2_reads_other_files(&h));
        h[7] = 2; // version 2 has no feature bits
        assert!(!qcow2_reads_other_files(&h));
    }
}
