//! Volumes: the per-rack registry of volumes, their live images (on the
//! owner) and the manifests (snapshots) held for each.
//!
//! # Layout (under the store's root)
//! - `FORMAT`: `fieldrack-volume-store 1`.
//! - `chunks/`: the [`ChunkStore`].
//! - `meta/`: a sled database, one tree:
//!   `v/<name>` → the volume record (size, latest generation);
//!   `m/<name>/<generation, u64 BE>` → an encoded [`Manifest`];
//!   `s/<name>` → a *staged* manifest (a transfer in progress; its chunks
//!   are kept by gc). Records carry a checksum; manifests are
//!   self-checking. One `apply_batch` + flush per change.
//! - `volumes/<name>.img`: the live raw image, on the owner only.
//! - `tmp/`: clones and conversions in progress; `<name>.base`, the reflink
//!   clone the latest generation of `name` was read from (dirty tracking);
//!   emptied on open.
//!
//! # Durability contract
//! - `create`, `import`, `snapshot`, `publish`, `stage`, `delete`, `prune`
//!   return after their effect is on disk (chunks synced before the
//!   manifest that needs them is written; manifest and volume record in
//!   one atomic batch, then flushed).
//! - A crash at any point leaves every volume at a complete generation: a
//!   manifest is either fully there with every chunk it references, or not
//!   there at all.
//! - An incremental snapshot ([`VolumeStore::snapshot_changed`], or a
//!   reflink snapshot with a kept base clone) syncs the chunks it read
//!   before writing its manifest, like a full one; the entries it copies
//!   from the base generation's manifest reference chunks that manifest
//!   already made durable. Only a base that is exactly the latest
//!   generation is used; anything else is a full pass.
//! - `export` and `promote` write a temp file, fsync it, rename it into
//!   place and fsync the directory: the target is the old file or the
//!   complete new one.

pub mod dirty;
pub mod extents;
pub mod fsinfo;
pub mod image;
pub mod incremental;
pub mod kept;
pub mod names;
mod preclone;
pub mod source;

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use fsinfo::{DirtyTracking, VolumeStoreInfo};
pub use image::MaterialiseError;
pub use names::{validate_name, NameError, MAX_NAME_LEN};
pub use source::{ImportSource, SourceError};

use crate::chunk_store::{ChunkStore, ChunkStoreError, ChunkStoreOptions, GcReport, ScrubReport};
use crate::fsutil::{self, FormatError, TempFile};
use crate::id::ChunkId;
use crate::manifest::{chunk_count, InvalidManifest, Manifest, MAX_VOLUME_SIZE};

/// Bytes per chunk of every volume image: 64 KiB, chosen by measurement
/// (`cargo test -p datastore --release --test integration measure:: -- --ignored
/// --nocapture` prints the tables; figures from this 2-core VM):
///
/// | chunk  | BLAKE3/thread | index/chunk | manifest | new after 1 % | 10 clones |
/// |--------|---------------|-------------|----------|---------------|-----------|
/// | 4 KiB  | ~2.2 GB/s     | 212 B       | 32 MiB   | 40 MiB        | 1.01×     |
/// | 16 KiB | ~5–6 GB/s     | 200 B       | 8 MiB    | 161 MiB       | 1.04×     |
/// | 64 KiB | ~5–7 GB/s     | 178 B       | 2 MiB    | 611 MiB       | 1.16×     |
/// | 1 MiB  | ~6–7 GB/s     | 139 B       | 128 KiB  | 3809 MiB      | 3.26×     |
/// | 4 MiB  | ~7 GB/s       | 140 B       | 32 KiB   | 4096 MiB      | 7.43×     |
///
/// (manifest: of a 4 GiB image; new after 1 %: chunk bytes stored anew
/// when 1 % of a 4 GiB image's 4 KiB blocks are rewritten at random;
/// 10 clones: storage of ten clones of a 1 GiB base, each with 0.1 %
/// scattered writes, in bases.)
///
/// - Below 16 KiB, hashing loses BLAKE3's SIMD parallelism and the
///   per-chunk costs (index entry, record header, manifest entry, lookups)
///   dominate: the index of 1 TiB would be ~53 GiB of sled at 4 KiB chunks,
///   ~2.8 GiB at 64 KiB, and every generation's manifest 16× larger.
/// - Above 64 KiB, every small write costs a whole chunk of storage, and
///   clones that differ in scattered blocks stop deduplicating.
/// - Wire cost after small scattered writes is ~41 MiB for every chunk size
///   *if* replication sends only the changed 4 KiB blocks of a changed chunk
///   (a delta against the previous generation's chunk); whole chunks would
///   be 611 MiB at 64 KiB (rsync needs ~606 MiB). The manifest should travel
///   as a delta too (0.34 MiB for the changed entries vs 2 MiB whole).
/// - The price of 64 KiB is storage per generation: 1 % scattered writes
///   store ~15 % of the image anew (16 KiB: ~4 %).
pub const CHUNK_SIZE: u32 = 64 * 1024;

/// Manifests kept per volume by [`VolumeStore::prune`] unless told
/// otherwise: the last complete generation plus two to fall back to.
pub const DEFAULT_KEEP: usize = 3;

/// How long after an image's last change (ctime) a pre-copy waits before
/// reading it, so that any later write moves the ctime to a different
/// value: timestamps are taken from a coarse clock that ticks every 1–10 ms
/// (HZ 1000 to 100), and a write in the same tick as the last one would
/// leave the ctime unchanged. Two ticks at HZ 100, plus margin.
const CTIME_SETTLE: Duration = Duration::from_millis(25);

/// Pre-copy passes (while the appliance runs) before pausing. A second pass
/// runs only if the image changed during the first; if it is quiet for one
/// pass, the pause shrinks from a full re-hash to one fstat. More passes
/// would cost a full read and hash each for appliances that never stop
/// writing, which gain nothing from them.
const MAX_PRECOPY_PASSES: u32 = 2;

/// Volume sizes must be whole 512-byte sectors (what every hypervisor and
/// block layer expects).
const SECTOR: u64 = 512;

const FORMAT: &str = "fieldrack-volume-store 1\n";
/// Mode of an exported image: it is a copy of an appliance's whole disk
/// (its keys, its data), readable by the agent's user only.
pub const EXPORT_MODE: u32 = 0o600;
/// Mode a promoted live image is created with (before the umask), as a
/// created or imported one: the appliance's driver opens it.
const LIVE_IMAGE_MODE: u32 = 0o644;
/// How long [`VolumeStore::prune`] waits for operations holding the gc
/// lock shared (snapshots take well under this) before giving up for this
/// round with [`PruneError::Busy`]: long enough for snapshots, short enough
/// that the snapshot loop running prune never stalls behind an import.
pub const PRUNE_WAIT: Duration = Duration::from_secs(2);
const RECORD_VERSION: u32 = 1;

/// How a running appliance is frozen while a snapshot captures its disk.
///
/// The appliance layer implements it (SIGSTOP/SIGCONT of the process
/// group, waiting until every process is stopped). `pause` must return only
/// once no process can write to the image any more; `resume` is called
/// exactly once after every `pause`, including a failed one.
pub trait PauseHooks {
    /// Freeze every writer of the image.
    ///
    /// # Errors
    /// Any I/O error; the snapshot is abandoned (after `resume`).
    fn pause(&self) -> io::Result<()>;
    /// Let them run again.
    fn resume(&self);
}

/// No appliance to pause (an idle volume, or tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPause;

impl PauseHooks for NoPause {
    fn pause(&self) -> io::Result<()> {
        Ok(())
    }
    fn resume(&self) {}
}

/// Calls `resume` when dropped, so every exit path after a `pause` resumes.
struct Paused<'a>(&'a dyn PauseHooks);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.resume();
    }
}

fn pause(hooks: &dyn PauseHooks) -> Result<Paused<'_>, SnapshotError> {
    let guard = Paused(hooks);
    hooks.pause().map_err(SnapshotError::Pause)?;
    Ok(guard)
}

/// What `list` says about a volume.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Latest generation (0: created, never snapshotted).
    pub generation: u64,
    /// Whether this rack holds the live image (it is the owner).
    pub has_live_image: bool,
    /// Generations whose manifests this rack holds, ascending.
    pub generations_held: Vec<u64>,
}

/// How a snapshot captured its point in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub enum CaptureMethod {
    /// A reflink clone made while the appliance ran, brought up to its
    /// point in time in the pause by re-cloning only what it wrote since
    /// (btrfs/XFS; the pause follows the last writes, not the image).
    Reflink,
    /// Pre-copy while running; the image had not changed when paused, so
    /// the pause only checked that.
    PrecopyUnchanged,
    /// Pre-copy while running; the image had changed, so the whole image
    /// was re-read and re-hashed during the pause (only changed chunks are
    /// stored).
    PrecopyRescan,
    /// A point-in-time copy made by the appliance's own machinery and
    /// handed in ([`VolumeStore::snapshot_changed`]): nothing was paused.
    Provided,
}

/// Details of a snapshot (see [`VolumeStore::snapshot_report`]).
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    /// The new manifest (durable).
    pub manifest: Manifest,
    /// How the point in time was captured.
    pub method: CaptureMethod,
    /// How long the appliance was paused.
    pub pause: Duration,
    /// Whole snapshot duration.
    pub elapsed: Duration,
    /// Chunks stored that the store did not hold before.
    pub new_chunks: u64,
    /// Their bytes.
    pub new_bytes: u64,
    /// Bytes read from the image (holes and unchanged chunks are not read).
    pub bytes_read: u64,
    /// The generation whose manifest the unchanged chunks were taken from
    /// (an incremental snapshot), or `None`: the whole image was read.
    pub base: Option<u64>,
}

/// What a scan cost and stored.
#[derive(Debug, Default, Clone, Copy)]
struct ScanCost {
    new_chunks: u64,
    new_bytes: u64,
    bytes_read: u64,
}

impl ScanCost {
    /// The report of a snapshot of caller-provided bytes
    /// ([`CaptureMethod::Provided`], no pause) that this scan produced.
    fn provided_report(
        self,
        manifest: Manifest,
        started: Instant,
        base: Option<u64>,
    ) -> SnapshotReport {
        SnapshotReport {
            manifest,
            method: CaptureMethod::Provided,
            pause: Duration::ZERO,
            elapsed: started.elapsed(),
            new_chunks: self.new_chunks,
            new_bytes: self.new_bytes,
            bytes_read: self.bytes_read,
            base,
        }
    }
}

fn scan_err(e: image::ScanError<ChunkStoreError>, path: &Path) -> SnapshotError {
    match e {
        image::ScanError::Read(e) => SnapshotError::from(io_err("read", path)(e)),
        image::ScanError::Sink(e) => SnapshotError::from(e),
    }
}

/// Result of [`VolumeStore::prune`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PruneReport {
    /// Manifests dropped.
    pub manifests_dropped: u64,
    /// What chunk gc did.
    pub gc: GcReport,
}

/// Failures shared by every operation on the registry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The sled metadata database failed.
    #[error("volume metadata: {0}")]
    Meta(#[from] sled::Error),
    /// A stored record or manifest fails its checks.
    #[error("damaged {what} record for volume {name}")]
    Damaged {
        /// Record kind.
        what: &'static str,
        /// Volume.
        name: String,
    },
    /// No such volume.
    #[error("no volume named {0}")]
    NotFound(String),
    /// Bad volume name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The disk is full; nothing already durable was lost.
    #[error("disk full writing {path}")]
    DiskFull {
        /// The file.
        path: PathBuf,
    },
    /// The chunk store failed.
    #[error(transparent)]
    Chunks(#[from] ChunkStoreError),
}

impl StoreError {
    /// Whether the disk (or quota) is full: free space (prune) and retry.
    #[must_use]
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::DiskFull { .. } => true,
            Self::Io { source, .. } => fsutil::is_disk_full(source),
            Self::Meta(sled::Error::Io(e)) => fsutil::is_disk_full(e),
            Self::Chunks(e) => e.is_disk_full(),
            _ => false,
        }
    }
}

impl MaterialiseError {
    /// Whether the disk (or quota) is full.
    #[must_use]
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::DiskFull { .. } => true,
            Self::Io { source, .. } => fsutil::is_disk_full(source),
            Self::Chunks(e) => e.is_disk_full(),
            _ => false,
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| {
        if fsutil::is_disk_full(&source) {
            StoreError::DiskFull { path }
        } else {
            StoreError::Io { op, path, source }
        }
    }
}

/// Why the store did not open.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Files, sled or the chunk store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The directory holds a store of another format version.
    #[error("unsupported volume store format {found:?} in {path}")]
    UnsupportedFormat {
        /// The FORMAT file.
        path: PathBuf,
        /// Its content.
        found: String,
    },
}

/// Why `create` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// The volume already exists.
    #[error("volume {0} already exists")]
    AlreadyExists(String),
    /// Size zero, not whole sectors, or too large.
    #[error("invalid volume size {0}: must be a non-zero multiple of 512 bytes up to 64 TiB")]
    InvalidSize(u64),
    /// Anything else.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why `snapshot` failed. The volume stays at its previous generation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// This rack has no live image of the volume (it is a replica).
    #[error("volume {0} has no live image on this rack")]
    NoLiveImage(String),
    /// The pause hook failed (resume was still called).
    #[error("pausing the appliance: {0}")]
    Pause(io::Error),
    /// Another operation on the volume (an import) is running
    /// ([`VolumeStore::snapshot_if_idle`] only).
    #[error("volume {0} is busy (an import or another operation is running)")]
    Busy(String),
    /// Anything else.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why `import` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The volume exists here as a replica: only its owner writes new
    /// generations.
    #[error("volume {0} is a replica on this rack; import on its owner")]
    NotOwner(String),
    /// The image is smaller than the volume (volumes never shrink).
    #[error("image is {image} bytes, smaller than the volume's {volume}")]
    Shrink {
        /// Volume size.
        volume: u64,
        /// Image size.
        image: u64,
    },
    /// The image is empty or larger than 64 TiB.
    #[error("image size {0} out of range")]
    InvalidSize(u64),
    /// `qemu-img` is not installed.
    #[error("qcow2 import needs qemu-img, which was not found")]
    QemuImgMissing,
    /// `qemu-img convert` failed.
    #[error("qemu-img convert failed ({status}): {stderr}")]
    QemuImg {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of its stderr.
        stderr: String,
    },
    /// The source was refused (not a regular file, not allowed...).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The import was cancelled; the volume is unchanged.
    #[error("the import was cancelled; the volume is unchanged")]
    Cancelled,
    /// Anything else.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why `export` failed; the target path is untouched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The volume has no snapshot yet.
    #[error("volume {0} has no snapshot")]
    NoSnapshot(String),
    /// The generation asked for is not held.
    #[error("volume {name} generation {generation} is not held here")]
    NoSuchGeneration {
        /// Volume.
        name: String,
        /// Generation.
        generation: u64,
    },
    /// No kept copy of the volume was kept at that time.
    #[error("no kept copy of volume {name} kept at {kept_ms} (fieldrack volume kept lists them)")]
    NoSuchKept {
        /// Volume.
        name: String,
        /// When it would have been kept (ms since the Unix epoch).
        kept_ms: u64,
    },
    /// Reading chunks or writing the image failed.
    #[error(transparent)]
    Materialise(#[from] MaterialiseError),
    /// Anything else.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why `publish` refused a manifest. Nothing changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// This many distinct referenced chunks are not in the store yet.
    #[error("{0} chunks of the manifest are missing")]
    MissingChunks(usize),
    /// A newer (or the same, different) generation is already held.
    #[error("volume {name} already at generation {held}, offered {offered}")]
    Stale {
        /// Volume.
        name: String,
        /// Latest generation held.
        held: u64,
        /// Generation offered.
        offered: u64,
    },
    /// The manifest is inconsistent.
    #[error(transparent)]
    Invalid(#[from] InvalidManifest),
    /// This rack owns the volume (holds its live image): it does not take
    /// generations from elsewhere.
    #[error("volume {0} is owned by this rack")]
    Owned(String),
    /// Anything else.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why `promote` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PromoteError {
    /// The volume already has a live image here.
    #[error("volume {0} already has a live image on this rack")]
    AlreadyOwner(String),
    /// No generation to promote.
    #[error("volume {0} has no snapshot to promote")]
    NoSnapshot(String),
    /// Reading chunks or writing the image failed.
    #[error(transparent)]
    Materialise(#[from] MaterialiseError),
    /// Anything else.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why `prune` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PruneError {
    /// `keep` must be at least 1: the latest generation is never dropped.
    #[error("prune must keep at least one generation")]
    KeepZero,
    /// A long operation (an import, an export, a promote) held the gc lock
    /// for longer than [`PRUNE_WAIT`]; nothing was pruned, try again later.
    #[error("the volume store is busy (an import or export is running); pruning deferred")]
    Busy,
    /// Anything else.
    #[error(transparent)]
    Store(#[from] StoreError),
}

macro_rules! store_from {
    ($($t:ty),*) => {$(
        impl From<sled::Error> for $t {
            fn from(e: sled::Error) -> Self { StoreError::Meta(e).into() }
        }
        impl From<ChunkStoreError> for $t {
            fn from(e: ChunkStoreError) -> Self { StoreError::Chunks(e).into() }
        }
        impl From<NameError> for $t {
            fn from(e: NameError) -> Self { StoreError::Name(e).into() }
        }
    )*};
}
store_from!(
    CreateError,
    SnapshotError,
    ImportError,
    ExportError,
    PublishError,
    PromoteError,
    PruneError,
    OpenError
);

macro_rules! disk_full {
    ($($t:ty $(, $mat:ident)?);*) => {$(
        impl $t {
            /// Whether the disk (or quota) is full: free space (prune) and
            /// retry; nothing durable was lost.
            #[must_use]
            pub fn is_disk_full(&self) -> bool {
                match self {
                    Self::Store(e) => e.is_disk_full(),
                    $(Self::$mat(e) => e.is_disk_full(),)?
                    _ => false,
                }
            }
        }
    )*};
}
disk_full!(
    CreateError;
    SnapshotError;
    ImportError;
    ExportError, Materialise;
    PublishError;
    PromoteError, Materialise;
    PruneError;
    OpenError
);

/// The volume record in `v/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct VolumeRecord {
    /// Record format version.
    v: u32,
    /// Image size.
    size: u64,
    /// Latest generation (0: none yet).
    generation: u64,
    /// When the volume was first known here.
    created_at_ms: u64,
}

/// Tunables; [`Default`] is right for production.
#[derive(Debug, Clone, Default)]
pub struct VolumeStoreOptions {
    /// Chunk store options.
    pub chunks: ChunkStoreOptions,
    /// Force (`Some(false)`: never try) or skip probing reflink support.
    pub reflink: Option<bool>,
}

/// The per-rack volume registry. `Send + Sync`; methods block on disk I/O
/// (call them from `spawn_blocking`).
pub struct VolumeStore {
    /// Root directory.
    root: PathBuf,
    /// `root/volumes`: live images.
    volumes_dir: PathBuf,
    /// `root/tmp`: clones and conversions.
    tmp_dir: PathBuf,
    /// Chunks of every volume.
    chunks: ChunkStore,
    /// Metadata database (kept to flush).
    db: sled::Db,
    /// Its tree.
    meta: sled::Tree,
    /// Held shared by operations that create references to chunks
    /// (snapshot, import, publish, stage) or read them (export, promote);
    /// held exclusively by prune, so gc never drops a chunk that an
    /// operation in flight is about to reference.
    gc_lock: RwLock<()>,
    /// One mutex per volume: operations on one volume run one at a time.
    vol_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Whether FICLONE works on this filesystem.
    reflink: AtomicBool,
    /// Per volume, the reflink clone its latest generation was read from:
    /// the next snapshot reads only the ranges whose extents moved since.
    bases: Mutex<HashMap<String, DirtyBase>>,
}

/// A clone of a live image kept after a snapshot read it.
#[derive(Debug, Clone)]
struct DirtyBase {
    /// The generation read from it.
    generation: u64,
    /// `tmp/<name>.base`.
    path: PathBuf,
}

impl std::fmt::Debug for VolumeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn seal(payload: &[u8]) -> Vec<u8> {
    let mut v = blake3::hash(payload).as_bytes()[..8].to_vec();
    v.extend_from_slice(payload);
    v
}

fn unseal(v: &[u8]) -> Option<&[u8]> {
    let (sum, payload) = v.split_at_checked(8)?;
    (blake3::hash(payload).as_bytes()[..8] == *sum).then_some(payload)
}

fn record_key(name: &str) -> Vec<u8> {
    format!("v/{name}").into_bytes()
}

fn manifest_prefix(name: &str) -> Vec<u8> {
    format!("m/{name}/").into_bytes()
}

fn manifest_key(name: &str, generation: u64) -> Vec<u8> {
    let mut k = manifest_prefix(name);
    k.extend_from_slice(&generation.to_be_bytes());
    k
}

fn staged_key(name: &str) -> Vec<u8> {
    format!("s/{name}").into_bytes()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What identifies the content state of a live image between a pre-copy
/// and the pause: any write changes the ctime (see [`CTIME_SETTLE`]).
#[derive(Debug, PartialEq, Eq)]
struct ImageStamp {
    dev: u64,
    ino: u64,
    len: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl ImageStamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        }
    }

    fn time(&self) -> SystemTime {
        let secs = u64::try_from(self.ctime).unwrap_or(0);
        let nanos = u64::try_from(self.ctime_nsec).unwrap_or(0);
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(nanos)
    }
}

impl VolumeStore {
    /// Open (creating if needed) the store under `root`.
    ///
    /// # Errors
    /// [`OpenError`].
    pub fn open(root: impl AsRef<Path>) -> Result<Self, OpenError> {
        Self::open_with(root, VolumeStoreOptions::default())
    }

    /// Open with options.
    ///
    /// # Errors
    /// [`OpenError`].
    pub fn open_with(root: impl AsRef<Path>, opts: VolumeStoreOptions) -> Result<Self, OpenError> {
        let root = root.as_ref().to_path_buf();
        let volumes_dir = root.join("volumes");
        let tmp_dir = root.join("tmp");
        for d in [&root, &volumes_dir, &tmp_dir] {
            fsutil::create_dir_durable(d).map_err(io_err("create", d))?;
        }
        fsutil::check_format(&root, FORMAT).map_err(|e| match e {
            FormatError::Unsupported { path, found } => {
                OpenError::UnsupportedFormat { path, found }
            }
            FormatError::Io { op, path, source } => io_err(op, &path)(source).into(),
        })?;
        // Leftovers of operations a crash interrupted.
        clean_tmp(&tmp_dir, |_| true)?;
        clean_tmp(&volumes_dir, |n| n.starts_with('.') && n.ends_with(".tmp"))?;

        let chunks = ChunkStore::open_with(root.join("chunks"), opts.chunks)?;
        let db = fsutil::open_sled(
            &sled::Config::new()
                .path(root.join("meta"))
                .cache_capacity(8 << 20),
        )?;
        let meta = (*db).clone();
        let reflink = opts
            .reflink
            .unwrap_or_else(|| image::probe_reflink(&tmp_dir));
        tracing::info!(root = %root.display(), reflink, "volume store open");
        Ok(Self {
            root,
            volumes_dir,
            tmp_dir,
            chunks,
            db,
            meta,
            gc_lock: RwLock::new(()),
            vol_locks: Mutex::new(HashMap::new()),
            reflink: AtomicBool::new(reflink),
            bases: Mutex::new(HashMap::new()),
        })
    }

    /// The chunk store (replication reads, inserts and verifies through it).
    #[must_use]
    pub fn chunks(&self) -> &ChunkStore {
        &self.chunks
    }

    /// The store's root directory.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether snapshots use reflink clones on this filesystem.
    #[must_use]
    pub fn reflink_supported(&self) -> bool {
        self.reflink.load(Ordering::Relaxed)
    }

    /// The store's filesystem and what it gives snapshots (one `statfs`).
    #[must_use]
    pub fn info_fs(&self) -> VolumeStoreInfo {
        let reflink = self.reflink_supported();
        VolumeStoreInfo {
            filesystem: fsinfo::filesystem_name(&self.root),
            reflink,
            dirty_tracking: if reflink {
                DirtyTracking::Extents
            } else {
                DirtyTracking::FullRead
            },
        }
    }

    /// Where the live image of `name` lives (whether or not it exists).
    #[must_use]
    pub fn image_path(&self, name: &str) -> PathBuf {
        self.volumes_dir.join(format!("{name}.img"))
    }

    fn vol_lock(&self, name: &str) -> Arc<Mutex<()>> {
        Arc::clone(lock(&self.vol_locks).entry(name.to_owned()).or_default())
    }

    /// The gc lock, exclusively, waiting at most [`PRUNE_WAIT`]. Never
    /// queues behind a long import or export: a writer waiting on a std
    /// `RwLock` blocks new readers, so a blocking `write()` behind one
    /// import would stall every other volume's snapshots.
    fn gc_exclusive(&self) -> Result<std::sync::RwLockWriteGuard<'_, ()>, PruneError> {
        let deadline = Instant::now() + PRUNE_WAIT;
        loop {
            match self.gc_lock.try_write() {
                Ok(g) => return Ok(g),
                Err(std::sync::TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(std::sync::TryLockError::WouldBlock) => return Err(PruneError::Busy),
            }
        }
    }

    fn gc_shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gc_lock
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, name: &str) -> Result<Option<VolumeRecord>, StoreError> {
        let Some(v) = self.meta.get(record_key(name))? else {
            return Ok(None);
        };
        let damaged = || StoreError::Damaged {
            what: "volume",
            name: name.to_owned(),
        };
        let payload = unseal(&v).ok_or_else(damaged)?;
        let r: VolumeRecord = serde_json::from_slice(payload).map_err(|_| damaged())?;
        if r.v != RECORD_VERSION {
            return Err(damaged());
        }
        Ok(Some(r))
    }

    fn existing(&self, name: &str) -> Result<VolumeRecord, StoreError> {
        validate_name(name)?;
        self.record(name)?
            .ok_or_else(|| StoreError::NotFound(name.to_owned()))
    }

    fn put_record(batch: &mut sled::Batch, name: &str, r: &VolumeRecord) {
        let json = serde_json::to_vec(r).unwrap_or_default();
        batch.insert(record_key(name), seal(&json));
    }

    fn commit(&self, batch: sled::Batch) -> Result<(), StoreError> {
        self.meta.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    fn decode_manifest(name: &str, v: &[u8]) -> Result<Manifest, StoreError> {
        Manifest::decode(v).map_err(|_| StoreError::Damaged {
            what: "manifest",
            name: name.to_owned(),
        })
    }

    /// Whether this rack holds the live image of `name` (is its owner).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn owns(&self, name: &str) -> Result<bool, StoreError> {
        validate_name(name)?;
        Ok(self.record(name)?.is_some() && self.image_path(name).exists())
    }

    /// Create a volume owned by this rack: a sparse live image of `size`
    /// bytes, generation 0, no manifest yet.
    ///
    /// # Errors
    /// [`CreateError`].
    pub fn create(&self, name: &str, size: u64) -> Result<VolumeInfo, CreateError> {
        validate_name(name)?;
        if size == 0 || !size.is_multiple_of(SECTOR) || size > MAX_VOLUME_SIZE {
            return Err(CreateError::InvalidSize(size));
        }
        let vl = self.vol_lock(name);
        let _v = lock(&vl);
        if self.record(name)?.is_some() {
            return Err(CreateError::AlreadyExists(name.to_owned()));
        }
        let path = self.image_path(name);
        let tmp = TempFile::new(
            self.volumes_dir
                .join(fsutil::unique_tmp_name(&format!(".{name}"))),
        );
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp.path())
            .map_err(io_err("create", tmp.path()))?;
        f.set_len(size).map_err(io_err("truncate", tmp.path()))?;
        f.sync_all().map_err(io_err("fsync", tmp.path()))?;
        fsutil::rename_durable(tmp.path(), &path).map_err(io_err("rename", &path))?;
        tmp.disarm();
        let mut batch = sled::Batch::default();
        let rec = VolumeRecord {
            v: RECORD_VERSION,
            size,
            generation: 0,
            created_at_ms: fsutil::now_ms(),
        };
        Self::put_record(&mut batch, name, &rec);
        self.commit(batch)?;
        tracing::info!(volume = name, size, "volume created");
        Ok(VolumeInfo {
            name: name.to_owned(),
            size,
            generation: 0,
            has_live_image: true,
            generations_held: vec![],
        })
    }

    /// Capture the live image as a new generation. See
    /// [`VolumeStore::snapshot_report`].
    ///
    /// # Errors
    /// [`SnapshotError`].
    pub fn snapshot(
        &self,
        name: &str,
        hooks: &dyn PauseHooks,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, SnapshotError> {
        Ok(self.snapshot_report(name, hooks, progress)?.manifest)
    }

    /// Record `source`, a point-in-time copy of the live image made by its
    /// appliance's own machinery (QEMU's `drive-backup` over QMP), as
    /// generation + 1. Nothing writes `source`, so nothing is paused; the
    /// live image is not read.
    ///
    /// # Errors
    /// [`SnapshotError`]; the volume stays at its previous generation.
    pub fn snapshot_from(
        &self,
        name: &str,
        source: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, SnapshotError> {
        Ok(self
            .snapshot_inner(name, Some(source), true, &NoPause, progress)?
            .manifest)
    }

    /// [`VolumeStore::snapshot_from`], with the details.
    ///
    /// # Errors
    /// [`SnapshotError`]; the volume stays at its previous generation.
    pub fn snapshot_from_report(
        &self,
        name: &str,
        source: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<SnapshotReport, SnapshotError> {
        self.snapshot_inner(name, Some(source), true, &NoPause, progress)
    }

    /// [`VolumeStore::snapshot_if_idle`], with the details.
    ///
    /// # Errors
    /// [`SnapshotError`].
    pub fn snapshot_report_if_idle(
        &self,
        name: &str,
        hooks: &dyn PauseHooks,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<SnapshotReport, SnapshotError> {
        self.snapshot_inner(name, None, false, hooks, progress)
    }

    /// Capture a crash-consistent point in time of the live image as
    /// generation + 1, durably (chunks synced before the manifest).
    ///
    /// With reflink (btrfs, XFS): pause, clone the image (metadata only),
    /// resume, then chunk the clone. The pause does not grow with the
    /// volume's size (it grows with the extent count and the dirty page
    /// cache the clone flushes).
    ///
    /// Without (ext4): chunk the image while the appliance runs (after an
    /// fdatasync, so writes through mmap fault and bump the ctime; a second
    /// pass if it changed meanwhile), then pause; if the image's ctime did
    /// not move, nothing was written since the last pass began and that
    /// pass *is* the point in time (pause: one fstat). If it moved, the
    /// allocated part of the image is re-read and re-hashed inside the pause
    /// (page cache speed; only changed chunks are stored): that pause grows
    /// with the volume's allocated size.
    ///
    /// # Errors
    /// [`SnapshotError`]; the volume stays at its previous generation.
    pub fn snapshot_report(
        &self,
        name: &str,
        hooks: &dyn PauseHooks,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<SnapshotReport, SnapshotError> {
        self.snapshot_inner(name, None, true, hooks, progress)
    }

    /// [`VolumeStore::snapshot`], unless another operation holds the
    /// volume (an import copying gigabytes): then [`SnapshotError::Busy`]
    /// at once, so a loop over every volume never waits on one of them.
    ///
    /// # Errors
    /// [`SnapshotError`].
    pub fn snapshot_if_idle(
        &self,
        name: &str,
        hooks: &dyn PauseHooks,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, SnapshotError> {
        Ok(self
            .snapshot_inner(name, None, false, hooks, progress)?
            .manifest)
    }

    fn snapshot_inner(
        &self,
        name: &str,
        source: Option<&Path>,
        wait: bool,
        hooks: &dyn PauseHooks,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<SnapshotReport, SnapshotError> {
        let started = Instant::now();
        let _g = self.gc_shared();
        let vl = self.vol_lock(name);
        let _v = if wait {
            lock(&vl)
        } else {
            match vl.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    return Err(SnapshotError::Busy(name.to_owned()))
                }
            }
        };
        let rec = self.existing(name)?;
        if source.is_some() && !self.image_path(name).exists() {
            return Err(SnapshotError::NoLiveImage(name.to_owned()));
        }
        let path = source.map_or_else(|| self.image_path(name), Path::to_path_buf);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SnapshotError::NoLiveImage(name.to_owned()))
            }
            Err(e) => return Err(io_err("open", &path)(e).into()),
        };
        let mut new_chunks = 0u64;
        let mut new_bytes = 0u64;
        // Inside the pause, inserts never wait for an fsync.
        let paused_now = std::cell::Cell::new(false);
        let mut sink = |_: usize, data: &[u8], id: ChunkId| -> Result<(), ChunkStoreError> {
            let new = if paused_now.get() {
                self.chunks.insert_hashed_no_sync(id, data)?
            } else {
                self.chunks.insert_hashed(id, data)?
            };
            if new {
                new_chunks += 1;
                new_bytes += data.len() as u64;
            }
            Ok(())
        };
        let bytes_read = std::cell::Cell::new(0u64);
        let scan = |f: &File,
                    progress: &mut dyn FnMut(u64, u64),
                    sink: &mut image::Sink<'_, ChunkStoreError>| {
            let s = image::scan(f, rec.size, CHUNK_SIZE, progress, sink)
                .map_err(|e| scan_err(e, &path))?;
            bytes_read.set(bytes_read.get() + s.bytes_read);
            Ok::<_, SnapshotError>(s.entries)
        };

        let mut captured = None;
        let mut extra = ScanCost::default();
        let mut based = None;
        let mut next_base = None;
        if self.reflink.load(Ordering::Relaxed) {
            // Write back dirty pages first: the clone flushes what is still
            // dirty.
            file.sync_data().map_err(io_err("fdatasync", &path))?;
            let clone = TempFile::new(
                self.tmp_dir
                    .join(fsutil::unique_tmp_name(&format!("{name}-clone"))),
            );
            // Clone while the appliance runs; in the pause, re-clone only
            // what it wrote since (see `volume/preclone.rs`).
            match preclone::preclone(&file, clone.path(), rec.size) {
                Ok(pre) => {
                    let (r, paused, at) = {
                        let guard = pause(hooks)?;
                        let t = Instant::now();
                        let at = fsutil::now_ms();
                        let r = preclone::finish(&file, &pre, rec.size);
                        let paused = t.elapsed();
                        drop(guard);
                        (r, paused, at)
                    };
                    r.map_err(io_err("re-clone", &path))?;
                    let cf = pre.file();
                    // The live image's own clone: compare it with the
                    // previous one and read only what moved.
                    let tracked = if source.is_none() {
                        self.changed_since_base(name, &rec, cf)
                    } else {
                        None
                    };
                    let (base_m, changed) = match &tracked {
                        Some((m, c)) => (Some(m), c.as_slice()),
                        None => (None, &[][..]),
                    };
                    let (entries, cost) =
                        self.scan_from_base(cf, clone.path(), rec.size, base_m, changed, progress)?;
                    extra = cost;
                    based = base_m.map(|m| m.generation);
                    if source.is_none() {
                        next_base = Some(clone);
                    }
                    captured = Some((entries, CaptureMethod::Reflink, paused, at));
                }
                Err(e) if matches!(e.raw_os_error(), Some(95 | 18 | 22 | 25)) => {
                    // EOPNOTSUPP, EXDEV, EINVAL, ENOTTY: not here after all.
                    tracing::warn!(
                        volume = name,
                        error = %e,
                        "reflink failed; falling back to pre-copy"
                    );
                    self.reflink.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(io_err("clone", &path)(e).into()),
            }
        }
        let (entries, method, paused, at) = match captured {
            Some(c) => c,
            None => {
                let mut pass = 0;
                let (stamp, pre) = loop {
                    pass += 1;
                    let stamp = ImageStamp::of(&file.metadata().map_err(io_err("stat", &path))?);
                    let since = SystemTime::now()
                        .duration_since(stamp.time())
                        .unwrap_or(Duration::ZERO);
                    if since < CTIME_SETTLE {
                        std::thread::sleep(CTIME_SETTLE - since);
                    }
                    file.sync_data().map_err(io_err("fdatasync", &path))?;
                    // Progress covers the first pass, the one that does the work.
                    let pre = if pass == 1 {
                        scan(&file, progress, &mut sink)?
                    } else {
                        scan(&file, &mut |_, _| {}, &mut sink)?
                    };
                    let changed =
                        ImageStamp::of(&std::fs::metadata(&path).map_err(io_err("stat", &path))?)
                            != stamp;
                    if !changed || pass >= MAX_PRECOPY_PASSES {
                        break (stamp, pre);
                    }
                    tracing::debug!(
                        volume = name,
                        pass,
                        "image changed during pre-copy; another pass"
                    );
                };
                let guard = pause(hooks)?;
                let t = Instant::now();
                let at = fsutil::now_ms();
                let now = std::fs::metadata(&path).map_err(io_err("stat", &path))?;
                let (entries, method) = if ImageStamp::of(&now) == stamp {
                    (pre, CaptureMethod::PrecopyUnchanged)
                } else {
                    paused_now.set(true);
                    let r = scan(&file, &mut |_, _| {}, &mut sink);
                    paused_now.set(false);
                    (r?, CaptureMethod::PrecopyRescan)
                };
                let paused = t.elapsed();
                drop(guard);
                (entries, method, paused, at)
            }
        };
        new_chunks += extra.new_chunks;
        new_bytes += extra.new_bytes;
        bytes_read.set(bytes_read.get() + extra.bytes_read);
        let manifest = self.commit_generation(name, rec, entries, at)?;
        if let Some(clone) = next_base {
            self.keep_base(name, manifest.generation, clone);
        }
        tracing::info!(
            volume = name,
            generation = manifest.generation,
            base = based,
            ?method,
            pause_us = paused.as_micros() as u64,
            new_chunks,
            bytes_read = bytes_read.get(),
            "snapshot"
        );
        Ok(SnapshotReport {
            manifest,
            method,
            pause: paused,
            elapsed: started.elapsed(),
            new_chunks,
            new_bytes,
            bytes_read: bytes_read.get(),
            base: based,
        })
    }

    /// The byte ranges in which `clone`, a fresh reflink clone of `name`'s
    /// live image, differs from the clone its latest generation was read
    /// from, with that generation's manifest; `None` when there is no such
    /// clone (first snapshot since the store opened, a generation written
    /// another way since) or its extents cannot be read: read everything.
    fn changed_since_base(
        &self,
        name: &str,
        rec: &VolumeRecord,
        clone: &File,
    ) -> Option<(Manifest, Vec<Range<u64>>)> {
        let base = lock(&self.bases).get(name).cloned()?;
        if base.generation != rec.generation {
            return None;
        }
        let m = self
            .manifest(name, base.generation)
            .ok()
            .flatten()
            .filter(|m| m.chunk_size == CHUNK_SIZE)?;
        let old = File::open(&base.path).ok()?;
        match extents::changed_ranges(extents::extents(&old), extents::extents(clone), rec.size) {
            Ok(changed) => Some((m, changed)),
            Err(e) => {
                tracing::warn!(volume = name, error = %e, "reading extent maps failed; reading the whole image");
                None
            }
        }
    }

    /// Keep `clone` (generation `generation` was read from it) as the base
    /// the next snapshot of `name` compares against, replacing the previous
    /// one. It lives in `tmp/`, emptied on open: after a restart the first
    /// snapshot reads everything. Holds the blocks written since, no more.
    fn keep_base(&self, name: &str, generation: u64, clone: TempFile) {
        let path = self.tmp_dir.join(format!("{name}.base"));
        match std::fs::rename(clone.path(), &path) {
            Ok(()) => {
                clone.disarm();
                lock(&self.bases).insert(name.to_owned(), DirtyBase { generation, path });
            }
            Err(e) => {
                tracing::warn!(volume = name, error = %e, "keeping the snapshot clone failed; the next snapshot reads everything");
                lock(&self.bases).remove(name);
            }
        }
    }

    /// Forget `name`'s dirty-tracking base and free its blocks.
    fn drop_base(&self, name: &str) {
        if let Some(b) = lock(&self.bases).remove(name) {
            let _ = std::fs::remove_file(b.path);
        }
    }

    /// Sync the chunks, then write generation `rec.generation + 1` with
    /// `entries` and its volume record in one batch, flushed.
    fn commit_generation(
        &self,
        name: &str,
        rec: VolumeRecord,
        entries: Vec<Option<ChunkId>>,
        at: u64,
    ) -> Result<Manifest, StoreError> {
        self.chunks.sync()?;
        let generation = rec.generation + 1;
        let manifest = Manifest {
            volume: name.to_owned(),
            generation,
            size: rec.size,
            chunk_size: CHUNK_SIZE,
            chunks: entries,
            created_at_ms: at,
        };
        let mut batch = sled::Batch::default();
        batch.insert(manifest_key(name, generation), manifest.encode());
        Self::put_record(&mut batch, name, &VolumeRecord { generation, ..rec });
        self.commit(batch)?;
        Ok(manifest)
    }

    /// Record `source`, a point-in-time copy of the live image that differs
    /// from generation `base` only inside the byte ranges `changed`, as
    /// generation `base + 1`, reading and hashing only the [`CHUNK_SIZE`]
    /// chunks that overlap `changed`; every other entry is taken from
    /// `base`'s manifest. Nothing is paused; the live image is not read.
    ///
    /// `base` must name the volume's latest generation exactly: if it does
    /// not (another snapshot or an import came in between), if that
    /// manifest is not held, or if it uses another chunk size, the whole
    /// of `source` is read instead ([`SnapshotReport::base`] is then
    /// `None`), so a stale caller gets a correct manifest, never a wrong
    /// one. Ranges are clipped to the volume; a size change re-reads from
    /// the old end on. Same durability as [`VolumeStore::snapshot`]: the
    /// chunks read are synced before the manifest and volume record are
    /// written in one batch; the chunks kept from `base` are already
    /// durable (its manifest is) and the shared gc lock keeps prune from
    /// dropping them meanwhile.
    ///
    /// # Errors
    /// [`SnapshotError`]; the volume stays at its previous generation.
    pub fn snapshot_changed(
        &self,
        name: &str,
        source: &Path,
        base: u64,
        changed: &[Range<u64>],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<SnapshotReport, SnapshotError> {
        let started = Instant::now();
        let _g = self.gc_shared();
        let vl = self.vol_lock(name);
        let _v = lock(&vl);
        let rec = self.live_record(name)?;
        let file = File::open(source).map_err(io_err("open", source))?;
        let at = fsutil::now_ms();
        let base_manifest = if base > 0 && base == rec.generation {
            self.manifest(name, base)?
                .filter(|m| m.chunk_size == CHUNK_SIZE)
        } else {
            None
        };
        if base_manifest.is_none() {
            tracing::info!(
                volume = name,
                base,
                latest = rec.generation,
                "incremental snapshot without its base; reading the whole image"
            );
        }
        let (entries, scanned) = self.scan_from_base(
            &file,
            source,
            rec.size,
            base_manifest.as_ref(),
            changed,
            progress,
        )?;
        let manifest = self.commit_generation(name, rec, entries, at)?;
        tracing::info!(
            volume = name,
            generation = manifest.generation,
            base = base_manifest.as_ref().map(|m| m.generation),
            new_chunks = scanned.new_chunks,
            bytes_read = scanned.bytes_read,
            "snapshot"
        );
        let base = base_manifest.map(|m| m.generation);
        Ok(scanned.provided_report(manifest, started, base))
    }

    /// The record of `name`, which must have a live image: the two checks
    /// every snapshot of caller-provided bytes makes first, under the
    /// volume's lock.
    fn live_record(&self, name: &str) -> Result<VolumeRecord, SnapshotError> {
        let rec = self.existing(name)?;
        if !self.image_path(name).exists() {
            return Err(SnapshotError::NoLiveImage(name.to_owned()));
        }
        Ok(rec)
    }

    /// The entries of a `size`-byte image in `file`: read whole when there
    /// is no `base`, else only the chunks `changed` touches, the rest taken
    /// from `base`. Chunks read are inserted (not yet synced).
    fn scan_from_base(
        &self,
        file: &File,
        path: &Path,
        size: u64,
        base: Option<&Manifest>,
        changed: &[Range<u64>],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(Vec<Option<ChunkId>>, ScanCost), SnapshotError> {
        let mut cost = ScanCost::default();
        let mut sink = |_: usize, data: &[u8], id: ChunkId| -> Result<(), ChunkStoreError> {
            if self.chunks.insert_hashed(id, data)? {
                cost.new_chunks += 1;
                cost.new_bytes += data.len() as u64;
            }
            Ok(())
        };
        let entries = match base {
            None => {
                let s = image::scan(file, size, CHUNK_SIZE, progress, &mut sink)
                    .map_err(|e| scan_err(e, path))?;
                cost.bytes_read = s.bytes_read;
                s.entries
            }
            Some(b) => {
                let runs = dirty::chunks_to_read(b.size, size, CHUNK_SIZE, changed);
                let s = image::scan_chunks(file, size, CHUNK_SIZE, &runs, progress, &mut sink)
                    .map_err(|e| scan_err(e, path))?;
                cost.bytes_read = s.bytes_read;
                let n = usize::try_from(chunks_for(size)).unwrap_or(usize::MAX);
                dirty::merge_entries(&b.chunks, n, &runs, &s.entries)
            }
        };
        Ok((entries, cost))
    }

    /// Import a raw or qcow2 image as the next generation of `name`
    /// (creating the volume, owned by this rack, if missing). The live
    /// image is replaced by the imported one: stop the volume's appliance
    /// first. `progress(done, total)` over the image bytes.
    ///
    /// The new live image is put in place before the manifest is written:
    /// a crash in between leaves the imported data live at the old
    /// generation, and the next snapshot captures it.
    ///
    /// # Errors
    /// [`ImportError`].
    pub fn import(
        &self,
        name: &str,
        from: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, ImportError> {
        let src = ImportSource::open(from, None)?;
        self.import_source(name, src, &AtomicBool::new(false), progress)
    }

    /// [`VolumeStore::import`] from a source already opened and checked
    /// ([`ImportSource::open`], which never blocks), stopping with
    /// [`ImportError::Cancelled`] (nothing changed) once `cancel` is set.
    ///
    /// Locks: a qcow2 image is converted before any lock is taken; the copy
    /// holds this volume's lock (other volumes' snapshots go on) and the
    /// shared gc lock, which [`VolumeStore::prune`] waits for only briefly.
    ///
    /// # Errors
    /// [`ImportError`].
    pub fn import_source(
        &self,
        name: &str,
        src: ImportSource,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, ImportError> {
        validate_name(name)?;
        let from = src.path.clone();
        let from = from.as_path();
        let mut src_file = src.file;
        let _converted;
        if src.qcow2 {
            let out = TempFile::new(
                self.tmp_dir
                    .join(fsutil::unique_tmp_name(&format!("{name}-import"))),
            );
            qemu_img_to_raw(&src_file, from, out.path())?;
            src_file = File::open(out.path()).map_err(io_err("open", out.path()))?;
            _converted = out;
        }
        let src = src_file;
        let size = src.metadata().map_err(io_err("stat", from))?.len();
        if size == 0 || size > MAX_VOLUME_SIZE || size % SECTOR != 0 {
            return Err(ImportError::InvalidSize(size));
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(ImportError::Cancelled);
        }

        let _g = self.gc_shared();
        let vl = self.vol_lock(name);
        let _v = lock(&vl);
        let rec = self.record(name)?;
        let image = self.image_path(name);
        if rec.is_some() && !image.exists() {
            return Err(ImportError::NotOwner(name.to_owned()));
        }
        if let Some(r) = &rec {
            if size < r.size {
                return Err(ImportError::Shrink {
                    volume: r.size,
                    image: size,
                });
            }
        }

        let tmp = TempFile::new(
            self.volumes_dir
                .join(fsutil::unique_tmp_name(&format!(".{name}"))),
        );
        let live = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp.path())
            .map_err(io_err("create", tmp.path()))?;
        live.set_len(size).map_err(io_err("truncate", tmp.path()))?;
        let cs = u64::from(CHUNK_SIZE);
        #[derive(Debug)]
        enum SinkErr {
            Chunks(ChunkStoreError),
            Write(io::Error),
            Cancelled,
        }
        let entries = image::scan(&src, size, CHUNK_SIZE, progress, &mut |i, data, id| {
            if cancel.load(Ordering::Relaxed) {
                return Err(SinkErr::Cancelled);
            }
            self.chunks
                .insert_hashed(id, data)
                .map_err(SinkErr::Chunks)?;
            live.write_all_at(data, i as u64 * cs)
                .map_err(SinkErr::Write)
        })
        .map_err(|e| -> ImportError {
            match e {
                image::ScanError::Read(e) => io_err("read", from)(e).into(),
                image::ScanError::Sink(SinkErr::Chunks(e)) => e.into(),
                image::ScanError::Sink(SinkErr::Write(e)) => io_err("write", tmp.path())(e).into(),
                image::ScanError::Sink(SinkErr::Cancelled) => ImportError::Cancelled,
            }
        })?
        .entries;
        self.chunks.sync()?;
        live.sync_all().map_err(io_err("fsync", tmp.path()))?;
        drop(live);
        fsutil::rename_durable(tmp.path(), &image).map_err(io_err("rename", &image))?;
        tmp.disarm();

        let generation = rec.as_ref().map_or(0, |r| r.generation) + 1;
        let manifest = Manifest {
            volume: name.to_owned(),
            generation,
            size,
            chunk_size: CHUNK_SIZE,
            chunks: entries,
            created_at_ms: fsutil::now_ms(),
        };
        let mut batch = sled::Batch::default();
        batch.insert(manifest_key(name, generation), manifest.encode());
        let created_at_ms = rec
            .as_ref()
            .map_or(manifest.created_at_ms, |r| r.created_at_ms);
        Self::put_record(
            &mut batch,
            name,
            &VolumeRecord {
                v: RECORD_VERSION,
                size,
                generation,
                created_at_ms,
            },
        );
        self.commit(batch)?;
        tracing::info!(volume = name, generation, size, "imported");
        Ok(manifest)
    }

    /// Write generation `generation` (default: the latest held) of `name`
    /// to `to` as a raw image: sparse where chunks are zero, via a temp
    /// file, fsync and rename. Works on replicas (no live image needed).
    ///
    /// # Errors
    /// [`ExportError`]; `to` is untouched on error.
    pub fn export(
        &self,
        name: &str,
        generation: Option<u64>,
        to: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, ExportError> {
        let _g = self.gc_shared();
        self.existing(name)?;
        let m = match generation {
            Some(g) => self
                .manifest(name, g)?
                .ok_or_else(|| ExportError::NoSuchGeneration {
                    name: name.to_owned(),
                    generation: g,
                })?,
            None => self
                .latest(name)?
                .ok_or_else(|| ExportError::NoSnapshot(name.to_owned()))?,
        };
        image::materialise(&self.chunks, &m, to, EXPORT_MODE, progress)?;
        Ok(m)
    }

    /// Store a manifest received from the owner. Accepted only if every
    /// chunk it references is in the store (synced first) and its
    /// generation is newer than any held; re-publishing a manifest already
    /// held is a no-op. Creates the volume record (as a replica) if new.
    ///
    /// # Errors
    /// [`PublishError`]; nothing changes on error.
    pub fn publish(&self, manifest: Manifest) -> Result<(), PublishError> {
        manifest.validate()?;
        let name = manifest.volume.clone();
        let _g = self.gc_shared();
        let vl = self.vol_lock(&name);
        let _v = lock(&vl);
        let rec = self.record(&name)?;
        if let Some(r) = &rec {
            if let Some(held) = self.manifest(&name, manifest.generation)? {
                if held == manifest {
                    return Ok(());
                }
            }
            if manifest.generation <= r.generation {
                return Err(PublishError::Stale {
                    name,
                    held: r.generation,
                    offered: manifest.generation,
                });
            }
            if self.image_path(&name).exists() {
                return Err(PublishError::Owned(name));
            }
        }
        let wanted: Vec<ChunkId> = manifest.referenced().into_iter().collect();
        let missing = self.chunks.missing(&wanted)?.len();
        if missing > 0 {
            return Err(PublishError::MissingChunks(missing));
        }
        self.chunks.sync()?;
        // Between `missing` and here nothing can drop a chunk: gc needs the
        // exclusive gc lock. Check again anyway: a chunk found corrupt by a
        // concurrent read is dropped without it.
        let missing = self.chunks.missing(&wanted)?.len();
        if missing > 0 {
            return Err(PublishError::MissingChunks(missing));
        }
        let mut batch = sled::Batch::default();
        batch.insert(manifest_key(&name, manifest.generation), manifest.encode());
        let created_at_ms = rec
            .as_ref()
            .map_or_else(fsutil::now_ms, |r| r.created_at_ms);
        let record = VolumeRecord {
            v: RECORD_VERSION,
            size: manifest.size,
            generation: manifest.generation,
            created_at_ms,
        };
        Self::put_record(&mut batch, &name, &record);
        if let Some(s) = self.staged(&name)? {
            if s.generation <= manifest.generation {
                batch.remove(staged_key(&name));
            }
        }
        self.commit(batch)?;
        tracing::info!(volume = %name, generation = manifest.generation, "published");
        Ok(())
    }

    /// Record a manifest whose chunks are being received: until it is
    /// published (or another is staged, or [`VolumeStore::unstage`]), prune
    /// keeps every chunk it references, so an interrupted transfer resumes
    /// without resending what already arrived. Stage before checking which
    /// chunks are missing. Staging the manifest already staged (a transfer
    /// resuming after a cut) writes and syncs nothing: it was synced when
    /// first staged, and a sync on a busy disk would hold up the resume.
    ///
    /// # Errors
    /// [`StoreError`], or the manifest is invalid.
    pub fn stage(&self, manifest: &Manifest) -> Result<(), PublishError> {
        manifest.validate()?;
        let _g = self.gc_shared();
        let key = staged_key(&manifest.volume);
        let encoded = manifest.encode();
        if self
            .meta
            .get(&key)
            .map_err(StoreError::from)?
            .is_some_and(|v| *v == *encoded)
        {
            return Ok(());
        }
        self.meta.insert(key, encoded).map_err(StoreError::from)?;
        self.db.flush().map_err(StoreError::from)?;
        Ok(())
    }

    /// Forget the staged manifest of `name`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn unstage(&self, name: &str) -> Result<(), StoreError> {
        validate_name(name)?;
        self.meta.remove(staged_key(name))?;
        self.db.flush()?;
        Ok(())
    }

    /// The staged manifest of `name`, if any.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn staged(&self, name: &str) -> Result<Option<Manifest>, StoreError> {
        validate_name(name)?;
        match self.meta.get(staged_key(name))? {
            Some(v) => Self::decode_manifest(name, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Every manifest held for `name`, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn manifests(&self, name: &str) -> Result<Vec<Manifest>, StoreError> {
        validate_name(name)?;
        self.meta
            .scan_prefix(manifest_prefix(name))
            .map(|kv| {
                let (_, v) = kv?;
                Self::decode_manifest(name, &v)
            })
            .collect()
    }

    /// The manifest of one generation, if held.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn manifest(&self, name: &str, generation: u64) -> Result<Option<Manifest>, StoreError> {
        validate_name(name)?;
        match self.meta.get(manifest_key(name, generation))? {
            Some(v) => Self::decode_manifest(name, &v).map(Some),
            None => Ok(None),
        }
    }

    /// The newest manifest held for `name`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn latest(&self, name: &str) -> Result<Option<Manifest>, StoreError> {
        validate_name(name)?;
        match self.meta.scan_prefix(manifest_prefix(name)).next_back() {
            Some(kv) => Self::decode_manifest(name, &kv?.1).map(Some),
            None => Ok(None),
        }
    }

    /// The newest (at most `max`) generations of `name` held below
    /// `below`, newest first: the bases a replica offers for a manifest
    /// delta.
    ///
    /// # Errors
    /// [`StoreError`].
    pub(crate) fn generations_below(
        &self,
        name: &str,
        below: u64,
        max: usize,
    ) -> Result<Vec<u64>, StoreError> {
        validate_name(name)?;
        let mut gens = self.generations(name)?;
        gens.retain(|g| *g < below);
        gens.reverse();
        gens.truncate(max);
        Ok(gens)
    }

    fn generations(&self, name: &str) -> Result<Vec<u64>, StoreError> {
        let prefix = manifest_prefix(name);
        self.meta
            .scan_prefix(&prefix)
            .keys()
            .map(|k| {
                let k = k?;
                let g = k
                    .get(prefix.len()..)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .ok_or_else(|| StoreError::Damaged {
                        what: "manifest key",
                        name: name.to_owned(),
                    })?;
                Ok(u64::from_be_bytes(g))
            })
            .collect()
    }

    /// One volume's summary.
    ///
    /// # Errors
    /// [`StoreError`] ([`StoreError::NotFound`] if unknown).
    pub fn info(&self, name: &str) -> Result<VolumeInfo, StoreError> {
        let rec = self.existing(name)?;
        Ok(VolumeInfo {
            name: name.to_owned(),
            size: rec.size,
            generation: rec.generation,
            has_live_image: self.image_path(name).exists(),
            generations_held: self.generations(name)?,
        })
    }

    /// Every volume known on this rack, by name.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn list(&self) -> Result<Vec<VolumeInfo>, StoreError> {
        let mut out = Vec::new();
        for k in self.meta.scan_prefix(b"v/").keys() {
            let k = k?;
            let name = String::from_utf8_lossy(&k[2..]).into_owned();
            out.push(self.info(&name)?);
        }
        Ok(out)
    }

    /// Forget a volume: its live image, manifests and staged manifest. Its
    /// chunks are reclaimed by the next [`VolumeStore::prune`].
    ///
    /// # Errors
    /// [`StoreError`] ([`StoreError::NotFound`] if unknown).
    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        let vl = self.vol_lock(name);
        let _v = lock(&vl);
        self.existing(name)?;
        let mut batch = sled::Batch::default();
        for k in self.meta.scan_prefix(manifest_prefix(name)).keys() {
            batch.remove(k?);
        }
        batch.remove(staged_key(name));
        batch.remove(record_key(name));
        self.commit(batch)?;
        self.drop_base(name);
        let image = self.image_path(name);
        match std::fs::remove_file(&image) {
            Ok(()) => {
                fsutil::fsync_dir(&self.volumes_dir).map_err(io_err("fsync", &self.volumes_dir))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &image)(e)),
        }
        tracing::info!(volume = name, "volume deleted");
        Ok(())
    }

    /// Make this rack the owner of a volume it replicates: materialise the
    /// latest generation held as the live image. Later snapshots continue
    /// from that generation.
    ///
    /// # Errors
    /// [`PromoteError`].
    pub fn promote(
        &self,
        name: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, PromoteError> {
        let _g = self.gc_shared();
        let vl = self.vol_lock(name);
        let _v = lock(&vl);
        self.existing(name)?;
        let image = self.image_path(name);
        if image.exists() {
            return Err(PromoteError::AlreadyOwner(name.to_owned()));
        }
        let m = self
            .latest(name)?
            .ok_or_else(|| PromoteError::NoSnapshot(name.to_owned()))?;
        image::materialise(&self.chunks, &m, &image, LIVE_IMAGE_MODE, progress)?;
        tracing::info!(
            volume = name,
            generation = m.generation,
            "promoted to owner"
        );
        Ok(m)
    }

    /// Keep the newest `keep` manifests of every volume, then gc every
    /// chunk that no remaining (or staged) manifest references. Blocks
    /// snapshots, imports and publishes while it runs.
    ///
    /// # Errors
    /// [`PruneError`].
    pub fn prune(&self, keep: usize) -> Result<PruneReport, PruneError> {
        if keep == 0 {
            return Err(PruneError::KeepZero);
        }
        let _g = self.gc_exclusive()?;
        let mut report = PruneReport::default();
        let mut batch = sled::Batch::default();
        // The live set goes to a sorted run on disk, not a hash set: its
        // memory stays bounded however many chunks the store holds.
        let mut live = self.chunks.live_set();
        for kv in self.meta.iter() {
            let (k, v) = kv?;
            if let Some(name) = k.strip_prefix(b"v/") {
                let name = String::from_utf8_lossy(name).into_owned();
                let gens = self.generations(&name)?;
                let cut = gens.len().saturating_sub(keep);
                for g in &gens[..cut] {
                    batch.remove(manifest_key(&name, *g));
                    report.manifests_dropped += 1;
                }
                for g in &gens[cut..] {
                    if let Some(m) = self.manifest(&name, *g)? {
                        live.extend(m.chunks.iter().flatten())
                            .map_err(StoreError::from)?;
                    }
                }
            } else if let Some(name) = k.strip_prefix(b"s/") {
                let name = String::from_utf8_lossy(name).into_owned();
                live.extend(Self::decode_manifest(&name, &v)?.chunks.iter().flatten())
                    .map_err(StoreError::from)?;
            }
        }
        // Kept copies (see [`kept`]) hold their chunks until dropped.
        for m in self.kept_manifests() {
            live.extend(m?.chunks.iter().flatten())
                .map_err(StoreError::from)?;
        }
        self.commit(batch)?;
        report.gc = self.chunks.gc(live).map_err(StoreError::from)?;
        tracing::info!(
            dropped = report.manifests_dropped,
            chunks_removed = report.gc.removed_chunks,
            "pruned"
        );
        Ok(report)
    }

    /// Re-verify every stored chunk (see [`ChunkStore::scrub`]); corrupt
    /// ones are dropped so replication fetches them again.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn scrub(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<ScrubReport, StoreError> {
        Ok(self.chunks.scrub(progress)?)
    }

    /// Chunks of `name`'s held manifests (or any volume's when `None`) that
    /// the store lacks: what a scrub dropped and a peer must resend.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn missing_chunks(&self, name: Option<&str>) -> Result<Vec<ChunkId>, StoreError> {
        let names: Vec<String> = match name {
            Some(n) => vec![n.to_owned()],
            None => self.list()?.into_iter().map(|v| v.name).collect(),
        };
        let mut ids = HashSet::new();
        for n in names {
            for m in self.manifests(&n)? {
                ids.extend(m.chunks.iter().flatten().copied());
            }
        }
        let ids: Vec<ChunkId> = ids.into_iter().collect();
        Ok(self.chunks.missing(&ids)?)
    }
}

/// Remove leftover files in `dir` whose names match.
fn clean_tmp(dir: &Path, matches: impl Fn(&str) -> bool) -> Result<(), StoreError> {
    let mut removed = false;
    for e in std::fs::read_dir(dir).map_err(io_err("list", dir))? {
        let e = e.map_err(io_err("list", dir))?;
        let name = e.file_name();
        if name.to_str().is_some_and(&matches)
            && e.file_type().map(|t| t.is_file()).unwrap_or(false)
        {
            let p = e.path();
            std::fs::remove_file(&p).map_err(io_err("remove", &p))?;
            removed = true;
        }
    }
    if removed {
        fsutil::fsync_dir(dir).map_err(io_err("fsync", dir))?;
    }
    Ok(())
}

/// Convert a qcow2 image to a (sparse) raw file with `qemu-img convert`.
/// Converts the qcow2 image open as `src` (named `from` in errors) to a
/// raw image at `to`. `qemu-img` reads the very file that was opened and
/// checked (handed over as its stdin and named `/dev/stdin`), never
/// whatever `from` names by now.
fn qemu_img_to_raw(src: &File, from: &Path, to: &Path) -> Result<(), ImportError> {
    let stdin = src.try_clone().map_err(io_err("dup", from))?;
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "qcow2", "-O", "raw", "/dev/stdin"])
        .arg(to)
        .stdin(std::process::Stdio::from(stdin))
        .output();
    match out {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ImportError::QemuImgMissing),
        Err(e) => Err(io_err("run qemu-img for", from)(e).into()),
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => {
            let s = String::from_utf8_lossy(&o.stderr);
            let tail: String = s
                .chars()
                .rev()
                .take(500)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(ImportError::QemuImg {
                status: o.status,
                stderr: tail.trim().to_owned(),
            })
        }
    }
}

/// `chunk_count` for the volume size and [`CHUNK_SIZE`].
#[must_use]
pub fn chunks_for(size: u64) -> u64 {
    chunk_count(size, CHUNK_SIZE)
}

#[cfg(test)]
mod tests;
