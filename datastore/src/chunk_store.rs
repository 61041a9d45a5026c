//! The content-addressed chunk store: chunks packed into append-only pack
//! files, indexed in sled.
//!
//! # Layout (under the store's directory)
//! - `FORMAT`: `fieldrack-chunk-store 1`; an unknown version refuses to open.
//! - `packs/NNNNNNNN.pack`: append-only pack files: a 16-byte header
//!   (magic, version, number), then records (magic, length, chunk id,
//!   bytes); every record names its chunk. One pack
//!   is *active* (appended to) at a time; it is sealed when it reaches
//!   [`ChunkStoreOptions::pack_target`] bytes.
//! - `index/`: a sled database, one tree: chunk id (32 bytes) → location
//!   (pack, offset, length); `pack` + number → (synced length, live chunks,
//!   live bytes); a dedup-hit counter.
//!
//! # Durability contract
//! - [`ChunkStore::insert`] and [`ChunkStore::remove`] change what the
//!   store shows at once (reads, `contains`, stats) but are durable only
//!   when a later [`ChunkStore::sync`] returns. A crash before that may lose
//!   them (an insert) or undo them (a remove); it never leaves an index
//!   entry pointing at bytes that were not on disk.
//! - [`ChunkStore::sync`] writes buffered pack bytes, fsyncs every pack
//!   written since the last sync (and the packs directory if a pack was
//!   created), and only then writes the index entries (one atomic sled
//!   batch) and flushes sled. Inserts never fsync (except the implicit sync
//!   past [`ChunkStoreOptions::max_pending_bytes`]). Bytes a crash leaves
//!   past a pack's recorded synced length are unindexed garbage and are
//!   truncated on the next open.
//! - Every read re-hashes the bytes: the store returns the right bytes or
//!   [`ChunkStoreError::Corrupt`], never wrong bytes. A chunk found corrupt
//!   is dropped from the index (so `contains` turns false and replication
//!   fetches it again from a peer). The one exception is
//!   [`ChunkStore::read_unverified_into`], for a sender whose receiver
//!   hashes every chunk anyway (a push); when the receiver rejects a chunk,
//!   the sender checks it with [`ChunkStore::verify`], which drops it if
//!   it is corrupt.
//! - [`ChunkStore::gc`] copies live chunks out of mostly-dead packs, syncs,
//!   and only then drops the old packs' index records and deletes their
//!   files: a crash at any step leaves every live chunk readable. gc and
//!   [`ChunkStore::scrub`] stream over the index in bounded memory (see
//!   `maintenance.rs`); their sort runs are files in `packs/`, unlinked as
//!   soon as created (and any `*.tmp` left there is removed on open).
//! - If an fsync or an index write fails the store is *poisoned*: every
//!   later call fails with [`ChunkStoreError::Poisoned`] until it is
//!   reopened (after a failed fsync Linux may have dropped the dirty pages,
//!   so nothing written since the last good sync can be trusted). A full
//!   disk during a buffered write is not poisoning: the bytes stay buffered,
//!   the call returns [`ChunkStoreError::DiskFull`], and a later `sync`
//!   retries once space was freed. Nothing already synced is ever lost.

mod active;
mod extsort;
mod loaded;
mod maintenance;
pub(crate) mod pack;

pub use maintenance::LiveSet;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use active::{Active, Flush, PackBuf};
use pack::{Location, PackInfo, PACK_HEADER_LEN, REC_HEADER_LEN};

use crate::fsutil::{self, FormatError};
use crate::id::{hash_many, is_zero, ChunkId};

/// Largest chunk the store accepts. Volume chunks are [`crate::CHUNK_SIZE`];
/// the bound keeps a hostile or buggy caller from making one record (and
/// one read buffer) arbitrarily large.
pub const MAX_CHUNK_LEN: usize = 16 << 20;

/// Default size at which a pack is sealed and a new one started. Small
/// enough that compacting one pack copies at most 64 MiB; large enough
/// that a 1 TiB store has ~16k pack files, a comfortable directory.
pub const DEFAULT_PACK_TARGET: u64 = 64 << 20;

/// Default bound on chunk bytes inserted but not yet synced. Past it an
/// insert syncs by itself, which bounds both the memory held by pending
/// index entries and the work a crash can throw away.
pub const DEFAULT_MAX_PENDING_BYTES: u64 = 256 << 20;

/// Pack bytes buffered in memory before a write(2). 8 MiB makes writes
/// large and sequential (the throughput the store needs) at a memory cost
/// that does not matter.
const WRITE_BUF: usize = 8 << 20;

/// Read handles to pack files kept open. Bounded so a store with many
/// packs does not run out of file descriptors.
const MAX_OPEN_PACKS: usize = 64;

/// A sealed pack whose live bytes are below this fraction of its size is
/// compacted by gc: copying its live chunks out costs at most twice the
/// space it frees.
const COMPACT_LIVE_FRACTION: f64 = 0.5;

/// Sealed packs smaller than this fraction of the pack target are merged by
/// gc too (many opens of a store each leave a small pack).
const COMPACT_SMALL_FRACTION: u64 = 8;

/// Index entries dropped per lock hold in gc, so concurrent inserts and
/// reads are never stalled for long.
const GC_BATCH: usize = 4096;

/// Version written to `FORMAT`.
const FORMAT: &str = "fieldrack-chunk-store 1\n";

/// Tunables of a chunk store. [`Default`] is right for production.
#[derive(Debug, Clone)]
pub struct ChunkStoreOptions {
    /// Size at which the active pack is sealed.
    pub pack_target: u64,
    /// Unsynced chunk bytes that trigger an implicit sync.
    pub max_pending_bytes: u64,
    /// sled page cache size for the index.
    pub index_cache_bytes: u64,
}

impl Default for ChunkStoreOptions {
    fn default() -> Self {
        Self {
            pack_target: DEFAULT_PACK_TARGET,
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            // The index of a 1 TiB store of 64 KiB chunks is ~16M entries;
            // 64 MiB of cache keeps the hot part of it in memory.
            index_cache_bytes: 64 << 20,
        }
    }
}

/// Why a chunk store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkStoreError {
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The disk (or quota) is full. Nothing synced is lost; free space
    /// (prune, gc) and retry.
    #[error("disk full writing {path}")]
    DiskFull {
        /// The file being written.
        path: PathBuf,
    },
    /// The sled index failed.
    #[error("chunk index: {0}")]
    Index(#[from] sled::Error),
    /// A stored chunk's bytes no longer hash to its id. The chunk has been
    /// dropped from the index; fetch it again from a peer.
    #[error("chunk {id} is corrupt on disk")]
    Corrupt {
        /// The chunk.
        id: ChunkId,
    },
    /// Data offered under an id does not hash to that id (a peer sent
    /// wrong bytes).
    #[error("data for chunk {expected} hashes to {actual}")]
    HashMismatch {
        /// The id the data was offered under.
        expected: ChunkId,
        /// What it really hashes to.
        actual: ChunkId,
    },
    /// All-zero (or empty) chunks are never stored: manifests record them
    /// as `None`.
    #[error("all-zero chunks are never stored")]
    ZeroChunk,
    /// The chunk is longer than [`MAX_CHUNK_LEN`].
    #[error("chunk of {len} bytes exceeds the {MAX_CHUNK_LEN}-byte limit")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// An index record does not decode: the index is damaged.
    #[error("damaged index record ({what})")]
    DamagedIndex {
        /// Which kind of record.
        what: &'static str,
    },
    /// The directory holds a store of another format version.
    #[error("unsupported chunk store format {found:?} in {path}")]
    UnsupportedFormat {
        /// The FORMAT file.
        path: PathBuf,
        /// Its content.
        found: String,
    },
    /// An earlier fsync or index write failed; reopen the store.
    #[error("chunk store poisoned by an earlier failed fsync or index write; reopen it")]
    Poisoned,
}

impl ChunkStoreError {
    /// Whether this is the disk (or quota) being full, wherever it was hit
    /// (a pack write or the index): free space and retry.
    #[must_use]
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::DiskFull { .. } => true,
            Self::Io { source, .. } => fsutil::is_disk_full(source),
            Self::Index(sled::Error::Io(e)) => fsutil::is_disk_full(e),
            _ => false,
        }
    }
}

/// Chunk store result.
pub type Result<T, E = ChunkStoreError> = std::result::Result<T, E>;

/// Counters describing the store (see [`ChunkStore::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChunkStoreStats {
    /// Distinct chunks stored.
    pub chunks: u64,
    /// Their bytes (what a reader gets back).
    pub payload_bytes: u64,
    /// Bytes of pack files on disk (payload + headers + garbage awaiting gc).
    pub disk_bytes: u64,
    /// Bytes the sled index occupies on disk.
    pub index_bytes: u64,
    /// Pack files.
    pub packs: u64,
    /// Inserts that found the chunk already stored (persisted at each sync;
    /// a crash may lose the increments since the last one).
    pub dedup_hits: u64,
}

/// Result of [`ChunkStore::scrub`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScrubReport {
    /// Chunks re-read and verified.
    pub checked: u64,
    /// Bytes re-read.
    pub bytes: u64,
    /// Chunks whose bytes were wrong or unreadable; dropped from the index.
    pub corrupt: Vec<ChunkId>,
}

/// Result of [`ChunkStore::gc`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Unreferenced chunks dropped from the index.
    pub removed_chunks: u64,
    /// Their payload bytes.
    pub removed_bytes: u64,
    /// Packs whose live chunks were copied out.
    pub packs_compacted: u64,
    /// Pack files deleted.
    pub packs_deleted: u64,
    /// Live chunks copied during compaction.
    pub moved_chunks: u64,
    /// Their bytes.
    pub moved_bytes: u64,
    /// Live chunks found corrupt while compacting (dropped from the index).
    pub corrupt: Vec<ChunkId>,
    /// Pack bytes on disk before and after.
    pub disk_bytes_before: u64,
    /// Pack bytes on disk after.
    pub disk_bytes_after: u64,
}

/// Result of [`ChunkStore::rebuild_index`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RebuildReport {
    /// Pack files scanned.
    pub packs: u64,
    /// Chunks indexed.
    pub chunks: u64,
    /// Records whose chunk was already indexed from an earlier record.
    pub duplicates: u64,
    /// Records whose bytes do not hash to their id (skipped).
    pub corrupt_records: u64,
    /// Bytes skipped while looking for the next valid record.
    pub skipped_bytes: u64,
    /// Pack files with a damaged header, renamed to `*.pack.damaged`.
    pub damaged_packs: u64,
}

/// An index change not yet made durable: the index will say `new` for the
/// chunk once synced; sled still says `old`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    new: Option<Location>,
    old: Option<Location>,
}

/// Everything that changes on insert/remove, behind one mutex.
struct Writer {
    active: Active,
    /// Index changes since the last sync, by chunk.
    pending: HashMap<ChunkId, Pending>,
    /// Chunk bytes appended since the last sync started.
    pending_bytes: u64,
    /// Pack records as the store shows them now (pending changes included).
    live: BTreeMap<u32, PackInfo>,
    /// Pack records as sled holds them.
    committed: BTreeMap<u32, PackInfo>,
    /// Packs sealed since the last sync, with their final length; the next
    /// sync fsyncs them (deferring it keeps fsyncs out of inserts, which
    /// may run while an appliance is paused).
    sealed: BTreeMap<u32, (Arc<File>, u64)>,
    /// A pack file was created since the last sync: fsync the directory.
    dir_dirty: bool,
    /// Highest pack number ever used in this directory.
    max_pack: u32,
}

/// A content-addressed chunk store. `Send + Sync`: share it in an `Arc`.
///
/// Methods block on disk I/O; call them from `spawn_blocking` in async
/// code.
pub struct ChunkStore {
    /// The store's directory (for error messages).
    dir: PathBuf,
    /// `dir/packs`.
    packs_dir: PathBuf,
    /// The sled database (kept to flush it).
    db: sled::Db,
    /// Its one tree: chunk entries, pack records, counters.
    tree: sled::Tree,
    /// Insert/remove state.
    w: Mutex<Writer>,
    /// Serialises syncs: the index batch of one sync must be flushed before
    /// another sync or gc relies on it.
    sync_lock: Mutex<()>,
    /// Serialises gc and scrub (both rewrite index entries in bulk).
    maintenance: Mutex<()>,
    /// Open read handles by pack number (bounded by [`MAX_OPEN_PACKS`]).
    readers: Mutex<HashMap<u32, Arc<File>>>,
    /// Set after a failed fsync or index write.
    poisoned: AtomicBool,
    /// Inserts that found their chunk already stored.
    dedup_hits: AtomicU64,
    /// Tunables.
    opts: ChunkStoreOptions,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ChunkStoreError {
    let path = path.to_path_buf();
    move |source| {
        if fsutil::is_disk_full(&source) {
            ChunkStoreError::DiskFull { path }
        } else {
            ChunkStoreError::Io { op, path, source }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves in-memory state we cannot
    // trust less than what sled holds; the data on disk is still
    // consistent, so keep going rather than cascade the panic.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ChunkStore {
    /// Open (creating if needed) the store in `dir` with default options.
    ///
    /// # Errors
    /// I/O and index errors; [`ChunkStoreError::UnsupportedFormat`].
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, ChunkStoreOptions::default())
    }

    /// Open (creating if needed) the store in `dir`.
    ///
    /// Recovery happens here: pack files the index does not know are
    /// deleted, bytes past a pack's synced length are truncated.
    ///
    /// # Errors
    /// I/O and index errors; [`ChunkStoreError::UnsupportedFormat`].
    pub fn open_with(dir: impl AsRef<Path>, opts: ChunkStoreOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let packs_dir = dir.join("packs");
        fsutil::create_dir_durable(&packs_dir).map_err(io_err("create", &packs_dir))?;
        check_format(&dir)?;

        let db = fsutil::open_sled(
            &sled::Config::new()
                .path(dir.join("index"))
                .cache_capacity(opts.index_cache_bytes)
                // Index entries must not reach disk before the pack bytes
                // they point at; sync() orders that and flushes explicitly.
                .flush_every_ms(None),
        )?;
        let tree = (*db).clone();

        let mut committed = BTreeMap::new();
        for kv in tree.scan_prefix(pack::PACK_KEY_PREFIX) {
            let (k, v) = kv?;
            let Some(no) = pack::parse_pack_key(&k) else {
                continue;
            };
            let info =
                PackInfo::decode(&v).ok_or(ChunkStoreError::DamagedIndex { what: "pack" })?;
            committed.insert(no, info);
        }
        let dedup_hits = match tree.get(pack::META_DEDUP_HITS)? {
            Some(v) => u64::from_le_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| ChunkStoreError::DamagedIndex { what: "counter" })?,
            ),
            None => 0,
        };

        // Reconcile pack files with the index.
        let mut on_disk = BTreeMap::new();
        let mut changed_dir = false;
        for entry in std::fs::read_dir(&packs_dir).map_err(io_err("list", &packs_dir))? {
            let entry = entry.map_err(io_err("list", &packs_dir))?;
            let name = entry.file_name();
            let path = entry.path();
            let Some(no) = name.to_str().and_then(pack::parse_pack_file_name) else {
                if name.to_str().is_some_and(|n| n.ends_with(".tmp")) {
                    std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
                    changed_dir = true;
                }
                continue;
            };
            let len = entry.metadata().map_err(io_err("stat", &path))?.len();
            match committed.get(&no) {
                None => {
                    // Created and written but never synced (or its last
                    // chunk was compacted away and the delete did not
                    // happen): nothing points into it.
                    tracing::debug!(pack = no, "removing unindexed pack");
                    std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
                    changed_dir = true;
                }
                Some(info) => {
                    if len > info.synced_len {
                        tracing::debug!(
                            pack = no,
                            len,
                            synced = info.synced_len,
                            "truncating unsynced tail"
                        );
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(io_err("open", &path))?;
                        f.set_len(info.synced_len)
                            .map_err(io_err("truncate", &path))?;
                        f.sync_all().map_err(io_err("fsync", &path))?;
                    } else if len < info.synced_len {
                        tracing::warn!(
                            pack = no,
                            len,
                            synced = info.synced_len,
                            "pack shorter than synced; scrub will drop its lost chunks"
                        );
                    }
                    on_disk.insert(no, len.min(info.synced_len));
                }
            }
        }
        for no in committed.keys() {
            if !on_disk.contains_key(no) {
                tracing::warn!(
                    pack = no,
                    "indexed pack file is missing; scrub will drop its chunks"
                );
            }
        }
        if changed_dir {
            fsutil::fsync_dir(&packs_dir).map_err(io_err("fsync", &packs_dir))?;
        }

        let max_pack = committed
            .keys()
            .chain(on_disk.keys())
            .copied()
            .max()
            .unwrap_or(0);
        // Keep appending to the newest pack if it has room: frequent
        // restarts then do not litter the store with small packs.
        let reuse = on_disk
            .iter()
            .next_back()
            .filter(|(no, len)| {
                **no == max_pack && **len >= PACK_HEADER_LEN && **len < opts.pack_target
            })
            .map(|(no, len)| (*no, *len));
        let mut live = committed.clone();
        let active = match reuse {
            Some((no, len)) => {
                let path = packs_dir.join(pack::pack_file_name(no));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io_err("open", &path))?;
                Active::resume(
                    no,
                    file,
                    path.clone(),
                    len,
                    PackBuf::with_capacity(WRITE_BUF),
                )
                .map_err(io_err("open", &path))?
            }
            None => {
                let no = max_pack + 1;
                live.insert(no, PackInfo::default());
                create_pack(&packs_dir, no, PackBuf::with_capacity(WRITE_BUF))?
            }
        };
        let max_pack = max_pack.max(active.no);
        Ok(Self {
            dir,
            packs_dir,
            db,
            tree,
            w: Mutex::new(Writer {
                active,
                pending: HashMap::new(),
                pending_bytes: 0,
                live,
                committed,
                sealed: BTreeMap::new(),
                dir_dirty: true,
                max_pack,
            }),
            sync_lock: Mutex::new(()),
            maintenance: Mutex::new(()),
            readers: Mutex::new(HashMap::new()),
            poisoned: AtomicBool::new(false),
            dedup_hits: AtomicU64::new(dedup_hits),
            opts,
        })
    }

    /// The store's directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            Err(ChunkStoreError::Poisoned)
        } else {
            Ok(())
        }
    }

    fn poison<E>(&self, e: E) -> E {
        tracing::error!("chunk store poisoned: an fsync or index write failed");
        self.poisoned.store(true, Ordering::Release);
        e
    }

    fn sled_get(&self, id: &ChunkId) -> Result<Option<Location>> {
        match self.tree.get(id.as_bytes())? {
            None => Ok(None),
            Some(v) => Location::decode(&v)
                .map(Some)
                .ok_or(ChunkStoreError::DamagedIndex { what: "chunk" }),
        }
    }

    fn lookup(&self, w: &Writer, id: &ChunkId) -> Result<Option<Location>> {
        match w.pending.get(id) {
            Some(p) => Ok(p.new),
            None => self.sled_get(id),
        }
    }

    /// Point `id` at `new` (or drop it), keeping live pack records in step.
    fn set(&self, w: &mut Writer, id: ChunkId, new: Option<Location>) -> Result<()> {
        let (cur, old) = match w.pending.get(&id) {
            Some(p) => (p.new, p.old),
            None => {
                let s = self.sled_get(&id)?;
                (s, s)
            }
        };
        if let Some(l) = cur {
            w.live.entry(l.pack).or_default().sub(&l);
        }
        if let Some(l) = new {
            w.live.entry(l.pack).or_default().add(&l);
        }
        if new == old {
            w.pending.remove(&id);
        } else {
            w.pending.insert(id, Pending { new, old });
        }
        Ok(())
    }

    /// Whether the store holds `id` (without verifying its bytes).
    ///
    /// # Errors
    /// Index errors.
    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        self.check()?;
        let w = lock(&self.w);
        Ok(self.lookup(&w, id)?.is_some())
    }

    /// The ids in `ids` the store does not hold, in order (duplicates kept).
    ///
    /// # Errors
    /// Index errors.
    pub fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        self.check()?;
        let w = lock(&self.w);
        let mut out = Vec::new();
        for id in ids {
            if self.lookup(&w, id)?.is_none() {
                out.push(*id);
            }
        }
        Ok(out)
    }

    /// Read and verify a chunk. `Ok(None)` if the store does not hold it.
    ///
    /// # Errors
    /// [`ChunkStoreError::Corrupt`] if the bytes on disk do not hash to
    /// `id` (the chunk is then dropped from the index); I/O errors.
    pub fn read(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        let mut data = Vec::new();
        let Some(loc) = self.read_raw_into(id, &mut data)? else {
            return Ok(None);
        };
        if ChunkId::of(&data) != *id {
            return Err(self.drop_corrupt(*id, loc));
        }
        Ok(Some(data))
    }

    /// Append a chunk's bytes to `out` *without* re-hashing them; `false`
    /// (and `out` unchanged) if the store does not hold it.
    ///
    /// For senders whose receiver verifies every chunk anyway (a push): the
    /// hash is then computed once per transfer instead of twice. Damage
    /// the store can see without hashing (a truncated or missing pack) is
    /// still reported as [`ChunkStoreError::Corrupt`]; bit rot is not, so a
    /// caller whose peer reports a chunk as bad must check it with
    /// [`ChunkStore::read`] (or [`ChunkStore::verify`]), which drops it if
    /// it is corrupt.
    ///
    /// # Errors
    /// [`ChunkStoreError::Corrupt`] for a record that is no longer on disk;
    /// I/O errors.
    pub fn read_unverified_into(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<bool> {
        Ok(self.read_raw_into(id, out)?.is_some())
    }

    /// Re-read a chunk and check it against its id, dropping it from the
    /// index if it is corrupt. `Ok(false)`: the store does not hold it.
    ///
    /// # Errors
    /// [`ChunkStoreError::Corrupt`] (the chunk has been dropped); I/O errors.
    pub fn verify(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.read(id)?.is_some())
    }

    /// The bytes of a chunk, appended to `out`, and where they were.
    /// Unverified; on an error `out` is as it was.
    fn read_raw_into(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<Option<Location>> {
        self.check()?;
        let base = out.len();
        // Two attempts: gc may move the chunk and delete its old pack
        // between the index lookup and the open.
        for attempt in 0..2 {
            let loc = {
                let w = lock(&self.w);
                let Some(loc) = self.lookup(&w, id)? else {
                    return Ok(None);
                };
                let a = &w.active;
                if loc.pack == a.no && loc.offset + u64::from(loc.len) > a.written {
                    // Not (all) in the file yet: the rest is in the write
                    // buffer (a write that hit a full disk may have split
                    // it). Bytes in both are read from the file, like any
                    // other, so damage on disk is seen.
                    let in_file =
                        usize::try_from(a.written.saturating_sub(loc.offset)).unwrap_or(0);
                    out.resize(base + in_file, 0);
                    if in_file > 0 {
                        if let Err(e) = a.file.read_exact_at(&mut out[base..], loc.offset) {
                            out.truncate(base);
                            return Err(io_err("read", &a.path)(e));
                        }
                    }
                    let start = usize::try_from(loc.offset.max(a.written) - a.buf_start)
                        .unwrap_or(usize::MAX);
                    match a.buf.get(start..start + loc.len as usize - in_file) {
                        Some(rest) => {
                            out.extend_from_slice(rest);
                            return Ok(Some(loc));
                        }
                        None => {
                            out.truncate(base);
                            drop(w);
                            return Err(self.drop_corrupt(*id, loc));
                        }
                    }
                }
                loc
            };
            out.resize(base + loc.len as usize, 0);
            match self.read_at_into(&loc, &mut out[base..]) {
                Ok(()) => return Ok(Some(loc)),
                Err(e) => {
                    out.truncate(base);
                    match e.kind() {
                        io::ErrorKind::NotFound if attempt == 0 => continue,
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::NotFound => {
                            return Err(self.drop_corrupt(*id, loc));
                        }
                        _ => return Err(io_err("read", &self.pack_path(loc.pack))(e)),
                    }
                }
            }
        }
        Ok(None)
    }

    /// Drop a chunk found corrupt at `loc` (unless it moved meanwhile).
    fn drop_corrupt(&self, id: ChunkId, loc: Location) -> ChunkStoreError {
        tracing::warn!(
            chunk = %id,
            pack = loc.pack,
            offset = loc.offset,
            "corrupt chunk dropped from the index"
        );
        let mut w = lock(&self.w);
        if let Ok(Some(cur)) = self.lookup(&w, &id) {
            if cur == loc {
                if let Err(e) = self.set(&mut w, id, None) {
                    return e;
                }
            }
        }
        ChunkStoreError::Corrupt { id }
    }

    fn pack_path(&self, no: u32) -> PathBuf {
        self.packs_dir.join(pack::pack_file_name(no))
    }

    fn pack_file(&self, no: u32) -> io::Result<Arc<File>> {
        let mut r = lock(&self.readers);
        if let Some(f) = r.get(&no) {
            return Ok(Arc::clone(f));
        }
        let f = Arc::new(File::open(self.pack_path(no))?);
        if r.len() >= MAX_OPEN_PACKS {
            if let Some(k) = r.keys().next().copied() {
                r.remove(&k);
            }
        }
        r.insert(no, Arc::clone(&f));
        Ok(f)
    }

    fn read_at(&self, loc: &Location) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; loc.len as usize];
        self.read_at_into(loc, &mut buf)?;
        Ok(buf)
    }

    /// Read a chunk's bytes from its pack into `buf` (exactly its length).
    fn read_at_into(&self, loc: &Location, buf: &mut [u8]) -> io::Result<()> {
        let f = self.pack_file(loc.pack)?;
        f.read_exact_at(buf, loc.offset)
    }

    /// Store a chunk. Returns its id and whether it was newly stored
    /// (`false`: an identical chunk was already there — a dedup hit).
    /// Durable after the next [`ChunkStore::sync`].
    ///
    /// # Errors
    /// [`ChunkStoreError::ZeroChunk`], [`ChunkStoreError::TooLarge`],
    /// [`ChunkStoreError::DiskFull`], I/O and index errors.
    pub fn insert(&self, data: &[u8]) -> Result<(ChunkId, bool)> {
        let id = ChunkId::of(data);
        Ok((id, self.insert_hashed(id, data)?))
    }

    /// Store a chunk received under `id`, after checking that it hashes to
    /// `id` (a peer that sends wrong bytes is caught here). Returns whether
    /// it was newly stored.
    ///
    /// # Errors
    /// [`ChunkStoreError::HashMismatch`], and as [`ChunkStore::insert`].
    pub fn insert_verified(&self, id: &ChunkId, data: &[u8]) -> Result<bool> {
        self.insert_hashed(check_id(id, data)?, data)
    }

    /// Store many chunks, hashing them in parallel. Zero chunks are skipped
    /// and reported as `None`.
    ///
    /// # Errors
    /// As [`ChunkStore::insert`]; chunks before the failing one are stored.
    pub fn insert_batch(&self, chunks: &[&[u8]]) -> Result<Vec<Option<(ChunkId, bool)>>> {
        let ids = hash_many(chunks);
        let mut out = Vec::with_capacity(chunks.len());
        for (data, id) in chunks.iter().zip(ids) {
            if is_zero(data) {
                out.push(None);
            } else {
                out.push(Some((id, self.insert_hashed(id, data)?)));
            }
        }
        Ok(out)
    }

    /// Insert `data` whose id the caller computed itself.
    pub(crate) fn insert_hashed(&self, id: ChunkId, data: &[u8]) -> Result<bool> {
        self.insert_inner(id, data, true, false)
    }

    /// Insert without the implicit sync past `max_pending_bytes`: for
    /// captures inside an appliance's pause, which must not wait for disks.
    pub(crate) fn insert_hashed_no_sync(&self, id: ChunkId, data: &[u8]) -> Result<bool> {
        self.insert_inner(id, data, false, false)
    }

    /// [`ChunkStore::insert_verified`] for chunks nobody will read soon (a
    /// replica receiving a push): their bytes go to the disk without
    /// passing through the page cache where the filesystem allows (see
    /// `active.rs`); pair with [`ChunkStore::sync_uncached`].
    ///
    /// # Errors
    /// As [`ChunkStore::insert_verified`].
    pub fn insert_verified_uncached(&self, id: &ChunkId, data: &[u8]) -> Result<bool> {
        self.insert_inner(check_id(id, data)?, data, true, true)
    }

    fn insert_inner(
        &self,
        id: ChunkId,
        data: &[u8],
        may_sync: bool,
        uncached: bool,
    ) -> Result<bool> {
        if data.len() > MAX_CHUNK_LEN {
            return Err(ChunkStoreError::TooLarge { len: data.len() });
        }
        if is_zero(data) {
            return Err(ChunkStoreError::ZeroChunk);
        }
        self.check()?;
        let need_sync = {
            let mut w = lock(&self.w);
            if self.lookup(&w, &id)?.is_some() {
                self.dedup_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
            let loc = self.append(&mut w, &id, data, uncached)?;
            self.set(&mut w, id, Some(loc))?;
            w.pending_bytes += u64::from(loc.len);
            w.pending_bytes >= self.opts.max_pending_bytes
        };
        if need_sync && may_sync {
            self.sync_inner(uncached)?;
        }
        Ok(true)
    }

    /// Append a record to the active pack (rotating it first if full).
    fn append(
        &self,
        w: &mut Writer,
        id: &ChunkId,
        data: &[u8],
        uncached: bool,
    ) -> Result<Location> {
        let len =
            u32::try_from(data.len()).map_err(|_| ChunkStoreError::TooLarge { len: data.len() })?;
        let rec = REC_HEADER_LEN + u64::from(len);
        if w.active.end() > PACK_HEADER_LEN && w.active.end() + rec > self.opts.pack_target {
            self.rotate(w, uncached)?;
        }
        if w.active.buf.len() >= WRITE_BUF {
            self.flush_buf(w, Flush::Room, uncached)?;
            if w.active.buf.len() >= WRITE_BUF {
                // A previous write failed and left bytes behind; do not grow
                // the buffer without bound.
                return Err(ChunkStoreError::DiskFull {
                    path: w.active.path.clone(),
                });
            }
        }
        let offset = w.active.end() + REC_HEADER_LEN;
        w.active
            .buf
            .extend_from_slice(&pack::record_header(id, len));
        w.active.buf.extend_from_slice(data);
        Ok(Location {
            pack: w.active.no,
            offset,
            len,
        })
    }

    /// Hand buffered pack bytes to the kernel (see `active.rs`). On
    /// failure (a full disk), the bytes not written stay buffered and
    /// nothing is lost.
    fn flush_buf(&self, w: &mut Writer, how: Flush, uncached: bool) -> Result<()> {
        let a = &mut w.active;
        a.flush(how, uncached).map_err(io_err("write", &a.path))
    }

    /// Seal the active pack (its bytes handed to the kernel; the next sync
    /// fsyncs it) and start a new one.
    fn rotate(&self, w: &mut Writer, uncached: bool) -> Result<()> {
        self.flush_buf(w, Flush::All, uncached)?;
        let sealed_len = w.active.written;
        let next = w.max_pack + 1;
        let new = create_pack(&self.packs_dir, next, w.active.take_buf())?;
        let old = std::mem::replace(&mut w.active, new);
        w.sealed.insert(old.no, (Arc::clone(&old.file), sealed_len));
        w.dir_dirty = true;
        w.max_pack = next;
        w.live.entry(next).or_default();
        tracing::debug!(sealed = old.no, len = sealed_len, next, "pack sealed");
        Ok(())
    }

    /// Make everything inserted or removed before this call durable.
    ///
    /// Order: buffered pack bytes are written and fsynced, then the index
    /// entries are written in one atomic batch and sled is flushed. Inserts
    /// and reads from other threads proceed during the fsync.
    ///
    /// # Errors
    /// [`ChunkStoreError::DiskFull`] (retry after freeing space: nothing is
    /// lost); I/O and index errors, which poison the store.
    pub fn sync(&self) -> Result<()> {
        self.sync_inner(false)
    }

    /// [`ChunkStore::sync`], then drop the synced pack bytes from the page
    /// cache (best effort; clean pages only). For a receiver streaming
    /// chunks nobody will read soon: the next writes reuse the same
    /// (cache-hot) memory instead of growing the page cache, which on
    /// virtual machines makes every new page expensive to write.
    ///
    /// # Errors
    /// As [`ChunkStore::sync`].
    pub fn sync_uncached(&self) -> Result<()> {
        self.sync_inner(true)
    }

    fn sync_inner(&self, drop_cache: bool) -> Result<()> {
        let _s = lock(&self.sync_lock);
        self.check()?;
        let (snap, file, path, active_no, flushed, sealed, dir_dirty) = {
            let mut w = lock(&self.w);
            if w.pending.is_empty() && w.sealed.is_empty() && w.active.written == w.active.end() {
                return Ok(());
            }
            self.flush_buf(&mut w, Flush::All, drop_cache)?;
            let snap: Vec<(ChunkId, Pending)> = w.pending.iter().map(|(k, v)| (*k, *v)).collect();
            w.pending_bytes = 0;
            let dir_dirty = std::mem::take(&mut w.dir_dirty);
            (
                snap,
                Arc::clone(&w.active.file),
                w.active.path.clone(),
                w.active.no,
                w.active.written,
                w.sealed.clone(),
                dir_dirty,
            )
        };
        let fsynced = (|| {
            for (no, (f, _)) in &sealed {
                f.sync_data()
                    .map_err(|e| self.poison(io_err("fsync", &self.pack_path(*no))(e)))?;
            }
            file.sync_data()
                .map_err(|e| self.poison(io_err("fsync", &path)(e)))?;
            if dir_dirty {
                fsutil::fsync_dir(&self.packs_dir)
                    .map_err(|e| self.poison(io_err("fsync", &self.packs_dir)(e)))?;
            }
            Ok(())
        })();
        if let Err(e) = fsynced {
            lock(&self.w).dir_dirty |= dir_dirty;
            return Err(e);
        }
        if drop_cache {
            use rustix::fs::{fadvise, Advice};
            for (f, len) in sealed.values() {
                let _ = fadvise(&**f, 0, std::num::NonZeroU64::new(*len), Advice::DontNeed);
            }
            let _ = fadvise(
                &*file,
                0,
                std::num::NonZeroU64::new(flushed),
                Advice::DontNeed,
            );
        }

        {
            let mut w = lock(&self.w);
            let mut infos: BTreeMap<u32, PackInfo> = BTreeMap::new();
            let info = |infos: &mut BTreeMap<u32, PackInfo>, w: &Writer, no: u32| -> PackInfo {
                *infos
                    .entry(no)
                    .or_insert_with(|| w.committed.get(&no).copied().unwrap_or_default())
            };
            let mut batch = sled::Batch::default();
            for (id, p) in &snap {
                if let Some(l) = p.old {
                    let mut i = info(&mut infos, &w, l.pack);
                    i.sub(&l);
                    infos.insert(l.pack, i);
                }
                match p.new {
                    Some(l) => {
                        let mut i = info(&mut infos, &w, l.pack);
                        i.add(&l);
                        infos.insert(l.pack, i);
                        batch.insert(id.as_bytes().as_slice(), l.encode().as_slice());
                    }
                    None => batch.remove(id.as_bytes().as_slice()),
                }
            }
            for (no, (_, len)) in &sealed {
                let mut i = info(&mut infos, &w, *no);
                i.synced_len = i.synced_len.max(*len);
                infos.insert(*no, i);
            }
            let mut i = info(&mut infos, &w, active_no);
            i.synced_len = i.synced_len.max(flushed);
            infos.insert(active_no, i);
            for (no, i) in &infos {
                batch.insert(pack::pack_key(*no).as_slice(), i.encode().as_slice());
            }
            batch.insert(
                pack::META_DEDUP_HITS,
                &self.dedup_hits.load(Ordering::Relaxed).to_le_bytes(),
            );
            self.tree
                .apply_batch(batch)
                .map_err(|e| self.poison(ChunkStoreError::Index(e)))?;

            // sled now holds the snapshot; fold it out of `pending`.
            for (no, i) in infos {
                w.committed.insert(no, i);
                // A pack's synced length lives in the committed record;
                // keep the live view's in step.
                let s = i.synced_len;
                w.live.entry(no).or_default().synced_len = s;
            }
            for no in sealed.keys() {
                w.sealed.remove(no);
            }
            for (id, s) in snap {
                match w.pending.get(&id).copied() {
                    Some(cur) if cur.new == s.new => {
                        w.pending.remove(&id);
                    }
                    Some(cur) => {
                        w.pending.insert(
                            id,
                            Pending {
                                new: cur.new,
                                old: s.new,
                            },
                        );
                    }
                    None => {
                        // Reverted to what sled had before, while sled was
                        // being given the snapshot: undo it next sync.
                        w.pending.insert(
                            id,
                            Pending {
                                new: s.old,
                                old: s.new,
                            },
                        );
                    }
                }
            }
        }
        self.db
            .flush()
            .map_err(|e| self.poison(ChunkStoreError::Index(e)))?;
        Ok(())
    }

    /// Drop a chunk from the index (durable after the next sync; its bytes
    /// are reclaimed by gc). Returns whether it was present.
    ///
    /// # Errors
    /// Index errors.
    pub fn remove(&self, id: &ChunkId) -> Result<bool> {
        self.check()?;
        let mut w = lock(&self.w);
        if self.lookup(&w, id)?.is_none() {
            return Ok(false);
        }
        self.set(&mut w, *id, None)?;
        Ok(true)
    }

    /// Current counters.
    ///
    /// # Errors
    /// I/O errors reading pack sizes.
    pub fn stats(&self) -> Result<ChunkStoreStats> {
        let (chunks, payload, packs, active_no, active_end) = {
            let w = lock(&self.w);
            let chunks = w.live.values().map(|i| i.live_count).sum::<u64>();
            let footprint = w.live.values().map(|i| i.live_bytes).sum::<u64>();
            let payload = footprint - chunks * REC_HEADER_LEN;
            let packs: Vec<u32> = w.live.keys().copied().collect();
            (chunks, payload, packs, w.active.no, w.active.end())
        };
        let mut disk = 0;
        for no in &packs {
            if *no == active_no {
                disk += active_end;
                continue;
            }
            match std::fs::metadata(self.pack_path(*no)) {
                Ok(m) => disk += m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("stat", &self.pack_path(*no))(e)),
            }
        }
        Ok(ChunkStoreStats {
            chunks,
            payload_bytes: payload,
            disk_bytes: disk,
            index_bytes: self.db.size_on_disk().unwrap_or(0),
            packs: packs.len() as u64,
            dedup_hits: self.dedup_hits.load(Ordering::Relaxed),
        })
    }

    /// The chunk entries sled holds, in id order, decoded (other keys
    /// skipped); a location that does not decode is a damaged index. No
    /// pending changes: callers sync first or overlay them.
    fn indexed_chunks(&self) -> impl Iterator<Item = Result<(ChunkId, Location)>> + '_ {
        self.tree.iter().filter_map(|kv| {
            let (k, v) = match kv {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e.into())),
            };
            let id = ChunkId::from_slice(&k)?;
            Some(
                Location::decode(&v)
                    .map(|loc| (id, loc))
                    .ok_or(ChunkStoreError::DamagedIndex { what: "chunk" }),
            )
        })
    }

    /// Every indexed chunk and its location: sled's entries overlaid with
    /// pending changes.
    fn all_entries(&self) -> Result<Vec<(ChunkId, Location)>> {
        let mut out = self.indexed_chunks().collect::<Result<Vec<_>>>()?;
        let w = lock(&self.w);
        out.retain(|(id, _)| !w.pending.contains_key(id));
        out.extend(
            w.pending
                .iter()
                .filter_map(|(id, p)| p.new.map(|l| (*id, l))),
        );
        Ok(out)
    }

    /// Ids of every chunk held.
    ///
    /// # Errors
    /// Index errors.
    pub fn ids(&self) -> Result<Vec<ChunkId>> {
        Ok(self.all_entries()?.into_iter().map(|(id, _)| id).collect())
    }

    /// Rebuild the index of the (closed) store in `dir` from its pack files,
    /// for when sled's database is lost or will not open. Every record in
    /// every pack names its chunk, so every chunk whose bytes still verify
    /// is recovered. The old index directory is kept as
    /// `index.damaged-<ms>`.
    ///
    /// # Errors
    /// I/O and index errors.
    pub fn rebuild_index(dir: impl AsRef<Path>) -> Result<RebuildReport> {
        let dir = dir.as_ref();
        let packs_dir = dir.join("packs");
        let index = dir.join("index");
        if index.exists() {
            let aside = dir.join(format!("index.damaged-{}", fsutil::now_ms()));
            std::fs::rename(&index, &aside).map_err(io_err("rename", &index))?;
            fsutil::fsync_dir(dir).map_err(io_err("fsync", dir))?;
        }
        let db = fsutil::open_sled(&sled::Config::new().path(&index).flush_every_ms(None))?;
        let mut report = RebuildReport::default();
        let mut packs: Vec<(u32, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(&packs_dir).map_err(io_err("list", &packs_dir))? {
            let e = e.map_err(io_err("list", &packs_dir))?;
            if let Some(no) = e.file_name().to_str().and_then(pack::parse_pack_file_name) {
                packs.push((no, e.path()));
            }
        }
        packs.sort();
        for (no, path) in packs {
            report.packs += 1;
            let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
            if bytes.len() < PACK_HEADER_LEN as usize || bytes[..8] != pack::PACK_MAGIC {
                let aside = path.with_extension("pack.damaged");
                std::fs::rename(&path, &aside).map_err(io_err("rename", &path))?;
                report.damaged_packs += 1;
                continue;
            }
            let mut info = PackInfo {
                synced_len: bytes.len() as u64,
                ..PackInfo::default()
            };
            let mut batch = sled::Batch::default();
            let mut at = PACK_HEADER_LEN as usize;
            let hl = REC_HEADER_LEN as usize;
            while at + hl <= bytes.len() {
                let h = &bytes[at..at + hl];
                let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
                let fits = h[..4] == pack::REC_MAGIC
                    && len > 0
                    && len <= MAX_CHUNK_LEN
                    && at + hl + len <= bytes.len();
                if !fits {
                    // Look for the next record header.
                    at += 1;
                    report.skipped_bytes += 1;
                    continue;
                }
                let id = ChunkId::from_slice(&h[8..40])
                    .ok_or(ChunkStoreError::DamagedIndex { what: "record" })?;
                let data = &bytes[at + hl..at + hl + len];
                if ChunkId::of(data) != id {
                    report.corrupt_records += 1;
                    at += 1;
                    report.skipped_bytes += 1;
                    continue;
                }
                if db.contains_key(id.as_bytes())? {
                    report.duplicates += 1;
                } else {
                    let loc = Location {
                        pack: no,
                        offset: (at + hl) as u64,
                        len: len as u32,
                    };
                    batch.insert(id.as_bytes().as_slice(), loc.encode().as_slice());
                    info.add(&loc);
                    report.chunks += 1;
                }
                at += hl + len;
            }
            batch.insert(pack::pack_key(no).as_slice(), info.encode().as_slice());
            db.apply_batch(batch)?;
        }
        db.flush()?;
        tracing::warn!(?report, dir = %dir.display(), "chunk index rebuilt from packs");
        Ok(report)
    }

    #[cfg(test)]
    pub(crate) fn location(&self, id: &ChunkId) -> Option<(PathBuf, u64)> {
        let w = lock(&self.w);
        let l = self.lookup(&w, id).ok()??;
        Some((self.pack_path(l.pack), l.offset))
    }
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// `id`, if `data` hashes to it.
fn check_id(id: &ChunkId, data: &[u8]) -> Result<ChunkId> {
    let actual = ChunkId::of(data);
    if actual != *id {
        return Err(ChunkStoreError::HashMismatch {
            expected: *id,
            actual,
        });
    }
    Ok(actual)
}

/// Create pack `no` with its header, reusing `buf`'s memory. Its directory
/// entry is made durable by the next sync, before any index entry pointing
/// into it.
fn create_pack(packs_dir: &Path, no: u32, buf: PackBuf) -> Result<Active> {
    let path = packs_dir.join(pack::pack_file_name(no));
    Active::create(packs_dir, no, buf).map_err(io_err("create", &path))
}

/// Write `FORMAT` in a new store, or check it in an existing one.
fn check_format(dir: &Path) -> Result<()> {
    fsutil::check_format(dir, FORMAT).map_err(|e| match e {
        FormatError::Unsupported { path, found } => {
            ChunkStoreError::UnsupportedFormat { path, found }
        }
        FormatError::Io { op, path, source } => io_err(op, &path)(source),
    })
}

#[cfg(test)]
mod tests;
