//! A drive's dirty bitmap kept across a QEMU restart on the same rack.
//!
//! The drives are raw images, which cannot hold a persistent bitmap, so
//! when the VM stops cleanly the driver copies each drive's bitmap into a
//! *persistent* bitmap of a small qcow2 file of its own in the run
//! directory (QEMU writes it when the node closes) and records, next to
//! it, which generation the bitmap is clean against and the live image's
//! identity at that moment ([`Record`]). The next QEMU starts paused
//! (`-S`), merges the saved bitmap into its fresh one, and only then lets
//! the guest run, so no write can fall between the two.
//!
//! Errs one way, like the ledger: the record is consumed (deleted) before
//! it is used, so a QEMU killed afterwards leaves nothing to trust; a
//! record whose image changed since (written, replaced, resized: another
//! stamp), whose qcow2 bitmap QEMU reports inconsistent, or that cannot be
//! read, is dropped, and the next capture is a full pass.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Version of [`Record`]'s format.
const VERSION: u32 = 1;

/// Name of the persistent bitmap inside the saved qcow2.
pub const SAVED_BITMAP: &str = "fieldrack-saved";

/// Identity and last change of a live image: equal stamps mean nobody
/// wrote, truncated or replaced it in between (ctime moves on every
/// write, size or rename onto it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    ctime_s: i64,
    ctime_ns: i64,
    mtime_s: i64,
    mtime_ns: i64,
}

impl Stamp {
    /// The stamp of the image at `path` now.
    ///
    /// # Errors
    /// `stat` errors.
    pub fn of(path: &Path) -> io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            ctime_s: m.ctime(),
            ctime_ns: m.ctime_nsec(),
            mtime_s: m.mtime(),
            mtime_ns: m.mtime_nsec(),
        })
    }
}

/// What the saved bitmap promises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    version: u32,
    /// The drive it was saved from.
    pub drive: String,
    /// The drive's size in bytes.
    pub size: u64,
    /// The generation the bitmap is clean against.
    pub base: u64,
    /// The live image when the bitmap was saved (the VM stopped).
    pub image: Stamp,
}

impl Record {
    /// A record of `drive`'s bitmap, clean against `base`, image `image`.
    #[must_use]
    pub fn new(drive: &str, size: u64, base: u64, image: Stamp) -> Self {
        Self {
            version: VERSION,
            drive: drive.to_owned(),
            size,
            base,
            image,
        }
    }

    /// Whether this record still describes `drive` of `size` bytes whose
    /// image now has stamp `now`.
    #[must_use]
    pub fn matches(&self, drive: &str, size: u64, now: &Stamp) -> bool {
        self.version == VERSION && self.drive == drive && self.size == size && self.image == *now
    }
}

/// The files of a drive's saved bitmap in `run_dir`.
#[derive(Debug, Clone)]
pub struct Files {
    /// The qcow2 holding the persistent bitmap.
    pub qcow2: PathBuf,
    /// The [`Record`], JSON.
    pub record: PathBuf,
}

impl Files {
    /// The files for drive `drive` (a [`super::drive_id`]).
    #[must_use]
    pub fn new(run_dir: &Path, drive: &str) -> Self {
        Self {
            qcow2: run_dir.join(format!("bitmap-{drive}.qcow2")),
            record: run_dir.join(format!("bitmap-{drive}.json")),
        }
    }

    /// Remove both (missing ones are fine).
    ///
    /// # Errors
    /// Any other removal error.
    pub fn remove(&self) -> io::Result<()> {
        for f in [&self.record, &self.qcow2] {
            match std::fs::remove_file(f) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Write `r` durably (temp file, fsync, rename, fsync the directory):
    /// the last step of a save, after the qcow2 is complete.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write_record(&self, r: &Record) -> io::Result<()> {
        use std::io::Write as _;
        let tmp = self.record.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(r).map_err(io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.record)?;
        if let Some(dir) = self.record.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Read and delete the record (durably: once taken it cannot be taken
    /// again, whatever happens next). `Ok(None)`: there is none, or it is
    /// not a record this version wrote.
    ///
    /// # Errors
    /// I/O errors other than a missing file.
    pub fn take_record(&self) -> io::Result<Option<Record>> {
        let bytes = match std::fs::read(&self.record) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        std::fs::remove_file(&self.record)?;
        if let Some(dir) = self.record.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(serde_json::from_slice::<Record>(&bytes)
            .ok()
            .filter(|r| r.version == VERSION))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn a_record_is_taken_once_and_only_matches_an_untouched_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let files = Files::new(dir.path(), "drive-disk");
        assert_eq!(files.take_record().unwrap(), None);
        let stamp = Stamp::of(&image).unwrap();
        let r = Record::new("drive-disk", 1 << 20, 7, stamp);
        files.write_record(&r).unwrap();
        let taken = files.take_record().unwrap().unwrap();
        assert_eq!(taken, r);
        assert_eq!(files.take_record().unwrap(), None, "taken only once");
        assert!(taken.matches("drive-disk", 1 << 20, &Stamp::of(&image).unwrap()));
        assert!(!taken.matches("drive-other", 1 << 20, &stamp));
        assert!(!taken.matches("drive-disk", 2 << 20, &stamp));
        // Written (ctime/mtime move; wait out a coarse clock tick first).
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .write_all_at(b"x", 4096)
            .unwrap();
        assert!(!taken.matches("drive-disk", 1 << 20, &Stamp::of(&image).unwrap()));
        // Replaced by another file of the same size.
        let other = dir.path().join("other.img");
        std::fs::File::create(&other)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        std::fs::rename(&other, &image).unwrap();
        assert!(!taken.matches("drive-disk", 1 << 20, &Stamp::of(&image).unwrap()));
        // Garbage is no record.
        std::fs::write(&files.record, b"{not json").unwrap();
        assert_eq!(files.take_record().unwrap(), None);
        assert!(!files.record.exists());
    }
}
