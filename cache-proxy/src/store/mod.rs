//! The object store: packed bodies, a SQLite index, dedup, LRU above a cap.
//!
//! Layout of a cache directory:
//! - `packs/NNNNNNNN.pack`: append-only pack files. Each starts with
//!   [`PACK_MAGIC`]; each record is `"FRB1" | len u32 LE | hash[16] | body`.
//!   Bodies are content-addressed by BLAKE3 (first 128 bits), so identical
//!   bodies (a sea of single-colour tiles) are stored once.
//! - `index/cache.db` (+ `-wal`, `-shm`): SQLite in WAL mode, behind this
//!   module only (see `index.rs` for the tables): per-key metadata (body
//!   hash, shared header block, volatile headers as a
//!   [`codec::MetaRecord`], access time, flags), body locations with
//!   reference counts, shared header blocks, `Vary` field lists, per-pack
//!   live bytes and the counters.
//! - `lock`: `flock`ed while a store is open, so two processes (or two
//!   stores in one process) never write the same directory.
//!
//! A directory of the former format (a sled index in `index/`) is emptied
//! at open: the sled files are removed, and with them every pack becomes an
//! orphan (no row refers to it) and is deleted. A cache can be refetched;
//! reading sled would keep a second storage engine in the binary.
//!
//! # Why SQLite
//! The sled index cost ~594 B per object (0.192 × the payload of the
//! million-tile benchmark, `tests/integration/million.rs`: 1.185 × in all). Measured
//! with SQLite on that benchmark (one million tiles, 3.09 GB of payload,
//! this machine): the index takes 119 B per object including B-tree slack,
//! 0.038 × the payload, **1.032 × in all** (packs 0.993 ×); open takes
//! 0.7 ms; a `get` of a random key through the index and a pack (page
//! cache warm) takes 11 µs at p50 and 31 µs at p99, a hot-cache hit 0.3 µs;
//! a full `check` 0.9 s. The alternative costed against it, an append-only
//! metadata log beside the packs with an in-memory index rebuilt at open,
//! would take about as much disk (~100 B per object plus checkpoints) and
//! could rebuild its index from the packs, but:
//! - every object would cost ~150-250 B of RAM for ever (a 20 GB cache of
//!   3 KB tiles is ~7 M objects: 1-2 GB on a rack appliance), where SQLite
//!   is bounded by its page caches whatever the object count;
//! - open would replay the log since the last checkpoint, where SQLite
//!   opens in milliseconds because counters and per-pack live bytes are
//!   persisted in the same transactions as the rows;
//! - checkpointing, log compaction and torn-tail handling would all be new
//!   crash-sensitive code, where SQLite's WAL is among the best-tested
//!   storage code there is.
//!
//! One transaction per group commit also makes reference counts exact
//! after a crash (the sled index, updated tree by tree, could leave them
//! one too high).
//!
//! # Durability contract
//! One writer thread applies every mutation, in batches (group commit): it
//! appends new bodies to the active pack, `fdatasync`s it, commits one
//! SQLite transaction for the whole batch (WAL, `synchronous=FULL`, so the
//! commit is on disk), and only then acknowledges the batch. So an
//! acknowledged [`Store::put`] survives kill -9 and power loss. Index rows
//! are committed after the bytes they point to are synced and removed
//! before those bytes are released, so a crash can leak pack space (bytes
//! appended but never indexed: counted as dead and compacted away) but
//! never leave a row pointing at garbage. Reference counts, counters and
//! rows change in the same transaction, so they agree after any crash;
//! [`Store::check`] recounts everything anyway, on demand. Every read
//! re-hashes the body and checks it against the index; a mismatch is a
//! miss (the object is dropped and the body marked bad, so the next put of
//! the same bytes rewrites them), never a corrupt response. After a
//! restart the writer opens a fresh pack, so a torn tail is never appended
//! to. Access-time updates and `Vary` lists are not worth an fsync: they
//! ride along with the next commit, or are written within [`TICK`] without
//! one.
//!
//! # Reads
//! A hit on a recently read object is a map lookup under a mutex (see
//! [`HOT_CACHE_BYTES`]). Otherwise it is one SQLite statement on a pooled
//! read connection (taken out of the pool under a mutex, used without
//! one), one positioned read of the pack (`Arc<File>` cloned under a read
//! lock, read without it), and a BLAKE3 check. WAL readers never wait for
//! the writer. Access times are queued in memory for the writer.
//!
//! # The cap, eviction and compaction
//! [`StoreOptions::max_bytes`] bounds the store's *disk footprint*: pack
//! files (live records, their headers, and dead space not yet compacted)
//! plus the index database. Nothing is evicted while the footprint is
//! under the cap, however long unused. Above it the writer first counts
//! the dead space of packs worth compacting (at least
//! [`PRESSURE_COMPACT_RATIO`] dead) as already reclaimed, evicts by
//! *sampled* LRU until that projection is under the cap, and compacts
//! those packs. Sampling works as in Redis: [`EVICTION_SAMPLES`] keys that
//! follow a random point in key order (keys are hashes, so a uniform
//! sample), pinned ones skipped, the least recently used evicted. Access
//! times are kept in minutes and written at most once per
//! [`TOUCH_GRANULARITY_MIN`] per object, batched. Pinned objects (seeded
//! regions) are never evicted. Independently of the cap, sealed packs whose
//! live bytes fall under [`COMPACT_LIVE_RATIO`] are compacted. Compaction
//! is incremental ([`COMPACT_STEP_BYTES`] per writer round) so writes keep
//! flowing while a pack is rewritten.

pub mod codec;
mod hot;
mod index;
mod writer;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use hyper::HeaderMap;
use rusqlite::OptionalExtension;
use tokio::sync::{mpsc, oneshot};

use codec::{body_hash, BodyHash, MetaRecord, FLAG_PINNED, HASH_LEN};
use index::{ObjRow, Readers, BAD_PACK};

/// First bytes of every pack file (format version 1).
pub const PACK_MAGIC: &[u8; 8] = b"FRPACK1\n";
/// First bytes of every body record in a pack.
pub const RECORD_MAGIC: &[u8; 4] = b"FRB1";
/// Record header: magic, length, hash.
pub const RECORD_HEADER: usize = 4 + 4 + HASH_LEN;
/// Largest body stored: bigger responses are proxied, not cached. Also the
/// single-flight buffer bound.
pub const MAX_OBJECT_BYTES: usize = 64 * 1024 * 1024;
/// Objects sampled per eviction decision: 16 gets within a few percent of
/// true LRU (Redis's measurements), read with one index range query.
pub const EVICTION_SAMPLES: usize = 16;
/// Access times are refreshed at most this often (minutes): an hourly
/// granularity would be enough to order months of tiles; a minute keeps
/// tests and busy hours meaningful while sparing the index a write per hit.
pub const TOUCH_GRANULARITY_MIN: u32 = 1;
/// A sealed pack with less than this fraction live is compacted, whatever
/// the footprint.
pub const COMPACT_LIVE_RATIO: f64 = 0.5;
/// Above the cap, a pack with at least this fraction dead is compacted
/// rather than evicting more: rewriting it costs at most 4 bytes written
/// per byte freed, and in the worst case (evictions spread evenly over the
/// packs) eviction overshoots the cap by this fraction once.
pub const PRESSURE_COMPACT_RATIO: f64 = 0.2;
/// Pack bytes a compaction moves per writer round: ~10-50 ms of copying, so
/// a compaction never stalls writes for long.
pub const COMPACT_STEP_BYTES: u64 = 8 * 1024 * 1024;
/// Objects evicted per writer round at most: bounds the round's latency;
/// the rest follows in the next rounds (at least every [`TICK`]).
pub const MAX_EVICT_PER_ROUND: usize = 4096;
/// Writes waiting for the writer thread; senders wait when it is full.
pub const WRITE_QUEUE: usize = 1024;
/// Memory for recently read objects (bodies already verified), so hot tiles
/// skip the index, the pack read and the re-hash. The writer invalidates
/// what it changes before acknowledging (see `hot.rs`), so a hit never
/// serves an object replaced by a `put` that has returned.
pub const HOT_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Bodies above this are not kept in the hot cache.
pub const HOT_MAX_OBJECT: usize = 256 * 1024;
/// Attempts (50 ms apart) to take the directory lock at open: a previous
/// store on the same directory in this process may still be closing.
pub const OPEN_LOCK_RETRIES: u32 = 100;
/// Most operations per group commit: bounds ack latency under load.
pub const MAX_BATCH: usize = 512;
/// Access-time updates waiting for the writer; more are dropped (an object
/// then just looks a little older to the LRU).
pub const PENDING_TOUCHES: usize = 65_536;
/// `Vary` updates waiting for the writer; more are dropped (costing a miss).
pub const PENDING_VARY: usize = 4096;
/// The writer wakes at least this often, to write pending access times and
/// `Vary` lists and to continue eviction or compaction when idle.
pub const TICK: Duration = Duration::from_secs(1);

/// Identity of a cached object: the first 128 bits of BLAKE3 of its cache
/// key. Also what the mesh digests summarise.
pub type KeyHash = [u8; 16];

/// Hashes a cache key.
pub fn key_hash(key: &str) -> KeyHash {
    let mut h = [0u8; 16];
    h.copy_from_slice(&blake3::hash(key.as_bytes()).as_bytes()[..16]);
    h
}

/// Tuning for [`Store::open`].
#[derive(Clone)]
pub struct StoreOptions {
    /// Eviction threshold on the disk footprint: packs (dead space not yet
    /// compacted included) plus the index.
    pub max_bytes: u64,
    /// A pack is sealed once it reaches this size (or a sixteenth of
    /// `max_bytes`, if smaller).
    pub pack_target_bytes: u64,
    /// fsync packs and the index before acknowledging writes. Only
    /// benchmarks turn this off.
    pub sync: bool,
    /// SQLite page cache, split between the writer and the readers.
    pub index_cache_bytes: u64,
    /// Wall clock in Unix seconds (injected so LRU tests control time).
    pub clock: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("max_bytes", &self.max_bytes)
            .field("pack_target_bytes", &self.pack_target_bytes)
            .field("sync", &self.sync)
            .finish_non_exhaustive()
    }
}

/// Unix seconds from the system clock.
pub fn system_clock() -> u64 {
    util::time::unix_secs()
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_bytes: 20 * 1024 * 1024 * 1024,
            pack_target_bytes: 256 * 1024 * 1024,
            sync: true,
            index_cache_bytes: 64 * 1024 * 1024,
            clock: Arc::new(system_clock),
        }
    }
}

/// What is stored about a response besides its body.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectMeta {
    /// HTTP status.
    pub status: u16,
    /// End-to-end response headers (no `Content-Length`: derived).
    pub headers: HeaderMap,
    /// Unix seconds, request sent upstream.
    pub request_time: u64,
    /// Unix seconds, response head received.
    pub response_time: u64,
    /// Part of a seeded region: never evicted.
    pub pinned: bool,
}

/// A stored response, body verified.
#[derive(Debug, Clone)]
pub struct Object {
    /// Metadata.
    pub meta: ObjectMeta,
    /// The body; its hash matched the index.
    pub body: Bytes,
}

/// Failure to open a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Creating or reading the directory or a pack.
    #[error("cache directory {path}: {source}")]
    Io {
        /// What was being opened.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// SQLite refused to open or read the index.
    #[error("cache index: {0}")]
    Index(#[from] rusqlite::Error),
    /// Another store (this process or another) has the directory open.
    #[error("cache directory {0} is in use by another store")]
    Locked(PathBuf),
    /// The index was written by a newer version of this program.
    #[error("cache index format {found} is not supported (this build reads {supported})")]
    Format {
        /// Format found.
        found: i64,
        /// Format this build reads and writes.
        supported: i64,
    },
}

/// Failure of a store operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Writing a pack failed (disk full, I/O error).
    #[error("pack write: {0}")]
    Io(#[from] std::io::Error),
    /// The index failed.
    #[error("index: {0}")]
    Index(#[from] rusqlite::Error),
    /// The body exceeds [`MAX_OBJECT_BYTES`].
    #[error("object of {0} bytes exceeds the maximum")]
    TooLarge(usize),
    /// The key is not stored (for metadata updates).
    #[error("no such object")]
    NotFound,
    /// The writer thread is gone (store shutting down).
    #[error("store closed")]
    Closed,
}

/// Sizes and counters for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    /// Objects (keys) stored.
    pub objects: u64,
    /// Sum of the bodies as served (duplicates counted each time).
    pub logical_bytes: u64,
    /// Unique body bytes stored.
    pub stored_bytes: u64,
    /// Objects evicted since start.
    pub evicted: u64,
    /// Reads that failed verification since start (served as misses).
    pub corrupt_reads: u64,
    /// Packs compacted since start.
    pub compactions: u64,
    /// Disk footprint the cap applies to: packs (dead space included) plus
    /// the index database.
    pub disk_bytes: u64,
}

/// What [`Store::check`] found and repaired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// Objects in the index.
    pub objects: u64,
    /// Unique bodies in the index.
    pub bodies: u64,
    /// Body reference counts that were wrong (and were fixed).
    pub refs_fixed: u64,
    /// Header block reference counts that were wrong (fixed).
    pub header_refs_fixed: u64,
    /// Objects whose body or header block was missing (removed).
    pub dangling_removed: u64,
    /// Bodies or header blocks nothing referred to (removed).
    pub orphans_removed: u64,
    /// Bodies re-read and re-hashed (`verify_bodies`).
    pub bodies_verified: u64,
    /// Bodies that failed verification (marked bad, their objects removed).
    pub corrupt_bodies: u64,
    /// Persisted counters or per-pack live bytes that were wrong (fixed).
    pub counters_fixed: bool,
}

#[derive(Default)]
struct Counters {
    objects: AtomicU64,
    logical_bytes: AtomicU64,
    stored_bytes: AtomicU64,
    evicted: AtomicU64,
    corrupt: AtomicU64,
    compactions: AtomicU64,
    disk_bytes: AtomicU64,
}

struct Shared {
    /// Verified recent objects (see [`HOT_CACHE_BYTES`]).
    hot: Mutex<hot::Hot>,
    /// Read connections for the hit path.
    readers: Readers,
    /// Open pack files for positioned reads, by id.
    packs: RwLock<HashMap<u32, Arc<File>>>,
    /// Access times (Unix minutes) the writer has yet to record.
    touches: Mutex<HashMap<KeyHash, u32>>,
    /// `Vary` lists the writer has yet to record (`None`: remove); readers
    /// consult it first, so a `set_vary` is visible at once.
    vary: Mutex<HashMap<KeyHash, Option<String>>>,
    counters: Counters,
    opts: StoreOptions,
}

/// A mutation, applied by the writer inside a group commit.
enum Write {
    Put {
        key: KeyHash,
        meta: ObjectMeta,
        body: Bytes,
    },
    UpdateMeta {
        key: KeyHash,
        meta: ObjectMeta,
    },
    Remove {
        key: KeyHash,
    },
    SetPinned {
        key: KeyHash,
        pinned: bool,
    },
    /// A reader found this key's body bad: drop the key (if it still has
    /// that body) and mark the body bad (if the writer agrees it is).
    Corrupt {
        key: KeyHash,
        body: BodyHash,
    },
    Flush,
}

type Ack = oneshot::Sender<Result<(), StoreError>>;

enum Op {
    Write {
        write: Write,
        ack: Option<Ack>,
    },
    Check {
        verify_bodies: bool,
        ack: oneshot::Sender<Result<CheckReport, StoreError>>,
    },
    /// Periodic wake-up (see [`TICK`]).
    Tick,
}

/// A handle to the store; cheap to clone. The writer thread stops when the
/// last handle is dropped.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("stats", &self.stats())
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn pack_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08}.pack"))
}

/// Takes the directory lock, retrying while a previous store closes.
fn lock_dir(dir: &Path) -> Result<File, OpenError> {
    use rustix::fs::{flock, FlockOperation};
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let mut tries = 0;
    loop {
        match flock(&f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(f),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {
                if tries >= OPEN_LOCK_RETRIES {
                    return Err(OpenError::Locked(dir.to_path_buf()));
                }
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(io_err(&path)(e.into())),
        }
    }
}

/// Removes the sled index of format-1 stores. Its packs become orphans (no
/// index row refers to them) and are deleted at open: a cache is
/// refetchable, and the old index cannot be read without sled.
fn remove_legacy_index(index_dir: &Path) {
    if !index_dir.join("conf").exists() {
        return;
    }
    tracing::warn!(dir = %index_dir.display(), "removing a format-1 (sled) cache index; the cache starts empty");
    let Ok(rd) = std::fs::read_dir(index_dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("cache.db") {
            continue;
        }
        let p = e.path();
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`. Blocking but quick: counters
    /// and per-pack live bytes are persisted, so open reads no rows per
    /// object (milliseconds for a million objects).
    ///
    /// # Errors
    /// The directory or index cannot be opened, another store has it open,
    /// or the index is of an unknown format.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store, OpenError> {
        let packs_dir = dir.join("packs");
        let index_dir = dir.join("index");
        std::fs::create_dir_all(&packs_dir).map_err(io_err(&packs_dir))?;
        let lock = lock_dir(dir)?;
        remove_legacy_index(&index_dir);
        std::fs::create_dir_all(&index_dir).map_err(io_err(&index_dir))?;
        let db = index::db_path(dir);
        let conn = index::open_writer(&db, opts.index_cache_bytes, opts.sync)?;
        let shared = Arc::new(Shared {
            hot: Mutex::new(hot::Hot::new(HOT_CACHE_BYTES, HOT_MAX_OBJECT)),
            readers: Readers::new(db, opts.index_cache_bytes),
            packs: RwLock::new(HashMap::new()),
            touches: Mutex::default(),
            vary: Mutex::default(),
            counters: Counters::default(),
            opts,
        });
        let writer = writer::Writer::open(shared.clone(), conn, packs_dir, lock)?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        std::thread::Builder::new()
            .name("cache-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(dir))?;
        // The ticker holds only a weak sender, so it never keeps the writer
        // alive; it exits within a tick of the last handle's drop.
        let weak = tx.downgrade();
        std::thread::Builder::new()
            .name("cache-store-tick".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                let Some(tx) = weak.upgrade() else { return };
                match tx.try_send(Op::Tick) {
                    Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            })
            .map_err(io_err(dir))?;
        Ok(Store { shared, tx })
    }

    fn now_min(&self) -> u32 {
        ((self.shared.opts.clock)() / 60) as u32
    }

    /// Reads an object and verifies its body. Fast (one index statement
    /// plus one positioned read, usually from the page cache), so callers
    /// run it on the async thread. `Ok(None)` for a miss *and* for an
    /// object that failed verification (counted in
    /// [`StoreStats::corrupt_reads`] and dropped).
    ///
    /// # Errors
    /// Index errors.
    pub fn get(&self, key: &KeyHash) -> Result<Option<Object>, StoreError> {
        let now = self.now_min();
        let mut touched = None;
        let epoch = {
            let mut hot = self.shared.hot.lock().expect("lock");
            let due = |atime: u32| {
                (now >= atime.saturating_add(TOUCH_GRANULARITY_MIN)).then(|| {
                    touched = Some(now);
                    now
                })
            };
            if let Some(o) = hot.get(key, due) {
                drop(hot);
                if touched.is_some() {
                    self.touch(key, now);
                }
                return Ok(Some(o));
            }
            hot.epoch()
        };
        for _attempt in 0..3 {
            let Some(row) = self.shared.readers.with(|c| index::get_row(c, key))? else {
                return Ok(None);
            };
            let (Some(loc), Some(meta)) =
                (row.loc.filter(|l| l.pack != BAD_PACK), Self::meta_of(&row))
            else {
                self.corrupt(key, row.body);
                return Ok(None);
            };
            let file = u32::try_from(loc.pack)
                .ok()
                .and_then(|p| self.shared.packs.read().expect("lock").get(&p).cloned());
            let body = file.and_then(|f| read_record(&f, loc.off, loc.len, &row.body));
            let Some(body) = body else {
                // Since our statement, compaction may have moved the body,
                // or the object been replaced and the body released (and
                // its pack compacted away): look again.
                let again = self
                    .shared
                    .readers
                    .with(|c| index::blob_loc(c, &row.body))?;
                if again != Some(loc) {
                    continue;
                }
                self.corrupt(key, row.body);
                return Ok(None);
            };
            let mut atime = row.atime;
            if now >= atime.saturating_add(TOUCH_GRANULARITY_MIN) {
                self.touch(key, now);
                atime = now;
            }
            let obj = Object { meta, body };
            self.shared
                .hot
                .lock()
                .expect("lock")
                .insert(*key, epoch, atime, &obj);
            return Ok(Some(obj));
        }
        Ok(None)
    }

    /// Queues an access-time update for the writer.
    fn touch(&self, key: &KeyHash, now: u32) {
        let mut t = self.shared.touches.lock().expect("lock");
        if t.len() < PENDING_TOUCHES || t.contains_key(key) {
            t.insert(*key, now);
        }
    }

    /// Metadata only, no body read (for `HEAD`-like checks and seeding).
    ///
    /// # Errors
    /// Index errors.
    pub fn get_meta(&self, key: &KeyHash) -> Result<Option<ObjectMeta>, StoreError> {
        let row = self.shared.readers.with(|c| index::get_row(c, key))?;
        Ok(row.and_then(|r| Self::meta_of(&r)))
    }

    /// Whether `key` is stored (index only; a body may still fail to verify).
    pub fn contains(&self, key: &KeyHash) -> bool {
        self.shared
            .readers
            .with(|c| {
                c.prepare_cached("SELECT 1 FROM obj WHERE key = ?1")?
                    .exists([&key[..]])
            })
            .unwrap_or(false)
    }

    /// `None` if the record or its header block is damaged or missing.
    fn meta_of(row: &ObjRow) -> Option<ObjectMeta> {
        let rec = MetaRecord::decode(&row.rec).ok()?;
        let block = match (&row.block, row.hdr) {
            (_, 0) => &[][..],
            (Some(b), _) => &b[..],
            (None, _) => return None,
        };
        Some(ObjectMeta {
            status: rec.status,
            headers: codec::join_headers(block, &rec.volatile),
            request_time: u64::from(rec.request_time),
            response_time: u64::from(rec.response_time),
            pinned: row.flags & FLAG_PINNED != 0,
        })
    }

    fn corrupt(&self, key: &KeyHash, body: BodyHash) {
        self.shared.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(key = %hex(key), "cache object failed verification; dropped");
        let _ = self.tx.try_send(Op::Write {
            write: Write::Corrupt { key: *key, body },
            ack: None,
        });
    }

    async fn call(&self, write: Write) -> Result<(), StoreError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(Op::Write {
                write,
                ack: Some(ack),
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores (or replaces) an object. Returns once it is durable (see the
    /// module's durability contract). Cancel-safe in the sense that a
    /// cancelled call may or may not have stored the object.
    ///
    /// # Errors
    /// Too large, I/O or index errors, or the store is closed.
    pub async fn put(&self, key: KeyHash, meta: ObjectMeta, body: Bytes) -> Result<(), StoreError> {
        if body.len() > MAX_OBJECT_BYTES {
            return Err(StoreError::TooLarge(body.len()));
        }
        self.call(Write::Put { key, meta, body }).await
    }

    /// Replaces the metadata of a stored object, keeping its body (after a
    /// 304 freshened it).
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if it is gone, or write errors.
    pub async fn update_meta(&self, key: KeyHash, meta: ObjectMeta) -> Result<(), StoreError> {
        self.call(Write::UpdateMeta { key, meta }).await
    }

    /// Removes an object (invalidation). Removing a missing key is fine.
    ///
    /// # Errors
    /// Write errors.
    pub async fn remove(&self, key: KeyHash) -> Result<(), StoreError> {
        self.call(Write::Remove { key }).await
    }

    /// Pins or unpins an object.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] or write errors.
    pub async fn set_pinned(&self, key: KeyHash, pinned: bool) -> Result<(), StoreError> {
        self.call(Write::SetPinned { key, pinned }).await
    }

    /// Waits until everything queued before it is durable.
    ///
    /// # Errors
    /// Write errors.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(Write::Flush).await
    }

    /// Recounts every reference and counter from the index rows and repairs
    /// what disagrees (fsck); with `verify_bodies`, also re-reads and
    /// re-hashes every body. Runs on the writer thread: writes wait for it
    /// (about a second per million objects, plus the reads when verifying).
    ///
    /// # Errors
    /// Index errors, or the store is closed.
    pub async fn check(&self, verify_bodies: bool) -> Result<CheckReport, StoreError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(Op::Check { verify_bodies, ack })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// The `Vary` field names recorded for a primary key.
    pub fn vary_fields(&self, primary: &KeyHash) -> Option<Vec<String>> {
        let pending = self.shared.vary.lock().expect("lock").get(primary).cloned();
        let text = match pending {
            Some(v) => v?,
            None => self
                .shared
                .readers
                .with(|c| {
                    c.prepare_cached("SELECT fields FROM vary WHERE key = ?1")?
                        .query_row([&primary[..]], |r| r.get::<_, String>(0))
                        .optional()
                })
                .ok()??,
        };
        Some(
            text.split('\n')
                .filter(|f| !f.is_empty())
                .map(String::from)
                .collect(),
        )
    }

    /// Records the `Vary` field names for a primary key. Visible at once;
    /// written with the next commit, without an fsync of its own (losing it
    /// costs a miss, nothing more).
    ///
    /// # Errors
    /// None at present (kept for callers written against the sled index).
    pub fn set_vary(&self, primary: &KeyHash, fields: &[String]) -> Result<(), StoreError> {
        let value = (!fields.is_empty()).then(|| fields.join("\n"));
        if value.is_none() && self.vary_fields(primary).is_none() {
            return Ok(());
        }
        let mut pending = self.shared.vary.lock().expect("lock");
        if pending.len() < PENDING_VARY || pending.contains_key(primary) {
            pending.insert(*primary, value);
        }
        Ok(())
    }

    /// Calls `f` with every stored key hash (for digests). Reads one
    /// consistent snapshot; writes continue meanwhile.
    pub fn for_each_key(&self, mut f: impl FnMut(&KeyHash)) {
        let r = self.shared.readers.with(|c| {
            let mut st = c.prepare_cached("SELECT key FROM obj")?;
            let mut rows = st.query([])?;
            while let Some(row) = rows.next()? {
                let k: Vec<u8> = row.get(0)?;
                if let Ok(k) = <KeyHash>::try_from(&k[..]) {
                    f(&k);
                }
            }
            Ok(())
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "listing the cache index failed");
        }
    }

    /// Sizes and counters.
    pub fn stats(&self) -> StoreStats {
        let c = &self.shared.counters;
        StoreStats {
            objects: c.objects.load(Ordering::Relaxed),
            logical_bytes: c.logical_bytes.load(Ordering::Relaxed),
            stored_bytes: c.stored_bytes.load(Ordering::Relaxed),
            evicted: c.evicted.load(Ordering::Relaxed),
            corrupt_reads: c.corrupt.load(Ordering::Relaxed),
            compactions: c.compactions.load(Ordering::Relaxed),
            disk_bytes: c.disk_bytes.load(Ordering::Relaxed),
        }
    }

    /// Bytes on disk under `dir` (packs + index), as allocated blocks.
    pub fn disk_usage(dir: &Path) -> u64 {
        fn walk(p: &Path) -> u64 {
            use std::os::unix::fs::MetadataExt;
            let Ok(rd) = std::fs::read_dir(p) else {
                return 0;
            };
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.blocks() * 512,
                    Err(_) => 0,
                })
                .sum()
        }
        walk(dir)
    }
}

/// Reads and verifies the record at `off`: header fields and the body's
/// hash must all match, or `None`.
fn read_record(f: &File, off: u64, len: u32, hash: &BodyHash) -> Option<Bytes> {
    let mut buf = vec![0u8; RECORD_HEADER + len as usize];
    f.read_exact_at(&mut buf, off).ok()?;
    if &buf[0..4] != RECORD_MAGIC
        || u32::from_le_bytes(buf[4..8].try_into().expect("4")) != len
        || &buf[8..RECORD_HEADER] != hash
    {
        return None;
    }
    let body = Bytes::from(buf).slice(RECORD_HEADER..);
    (body_hash(&body) == *hash).then_some(body)
}

/// Lower-case hex, for logs.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests;
