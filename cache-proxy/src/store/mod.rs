//! The object store: packed bodies, a sled index, dedup, LRU above a cap.
//!
//! Layout of a cache directory:
//! - `packs/NNNNNNNN.pack`: append-only pack files. Each starts with
//!   [`PACK_MAGIC`]; each record is `"FRB1" | len u32 LE | hash[16] | body`.
//!   Bodies are content-addressed by BLAKE3 (first 128 bits), so identical
//!   bodies (a sea of single-colour tiles) are stored once.
//! - `index/`: sled, behind this module only. Trees:
//!   - `obj`: key hash (16 bytes) → [`codec::ObjectRecord`] (status, times,
//!     body hash, shared header block id, per-object headers, flags);
//!   - `blob`: body hash → [`codec::BlobLoc`] (pack, offset, len, refcount);
//!   - `hdr`: header block id → refcount u32 LE ++ header text;
//!   - `vary`: primary key hash → the `Vary` field names of that URI.
//!
//! # Durability contract
//! One writer thread applies every mutation, in batches (group commit): it
//! appends new bodies to the active pack, `fdatasync`s it, then updates the
//! index and flushes sled, and only then acknowledges the batch. So an
//! acknowledged [`Store::put`] survives kill -9 and power loss (to the
//! extent sled keeps its flush promise). Index entries are created after the
//! bytes they point to and removed before those bytes are released, so a
//! crash can leak space (an orphan record, a refcount one too high) but never
//! leave an entry pointing at garbage. Every read re-hashes the body and
//! checks it against the index; a mismatch is a miss (and the entry is
//! dropped), never a corrupt response. After a restart the writer opens a
//! fresh pack, so a torn tail is never appended to.
//!
//! # Eviction
//! Nothing is evicted below [`StoreOptions::max_bytes`] (deduplicated body
//! bytes). Above it the writer evicts by *sampled* LRU, as Redis does: it
//! draws [`EVICTION_SAMPLES`] random keys (keys are hashes, so a range scan
//! from a random point is a uniform sample), skips pinned ones, and evicts
//! the least recently used, until under the cap. Access times are kept in
//! minutes and written at most once per [`TOUCH_GRANULARITY_MIN`] per
//! object, so hits cost no write in the common case. Pinned objects (seeded
//! regions) are never evicted. Packs whose live bytes fall under
//! [`COMPACT_LIVE_RATIO`] are rewritten and deleted.

pub mod codec;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::HeaderMap;
use tokio::sync::{mpsc, oneshot};

use codec::{body_hash, BlobLoc, BodyHash, ObjectRecord, FLAG_PINNED, HASH_LEN};

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
/// true LRU (Redis's measurements) at 16 index reads.
pub const EVICTION_SAMPLES: usize = 16;
/// Access times are refreshed at most this often (minutes): an hourly
/// granularity would be enough to order months of tiles; a minute keeps
/// tests and busy hours meaningful while sparing the index a write per hit.
pub const TOUCH_GRANULARITY_MIN: u32 = 1;
/// A sealed pack with less than this fraction live is compacted.
pub const COMPACT_LIVE_RATIO: f64 = 0.5;
/// Writes waiting for the writer thread; senders wait when it is full.
pub const WRITE_QUEUE: usize = 1024;
/// Memory for recently read objects (bodies already verified), so hot tiles
/// skip the pack read and re-hash. Each entry is re-validated against the
/// index record on every hit, so it can never serve a replaced object.
pub const HOT_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Bodies above this are not kept in the hot cache.
pub const HOT_MAX_OBJECT: usize = 256 * 1024;
/// Attempts (50 ms apart) to take the index lock at open.
pub const OPEN_LOCK_RETRIES: u32 = 100;
/// Most operations per group commit: bounds ack latency under load.
pub const MAX_BATCH: usize = 512;

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
    /// Eviction threshold on stored (deduplicated) body bytes.
    pub max_bytes: u64,
    /// A pack is sealed once it reaches this size.
    pub pack_target_bytes: u64,
    /// fsync packs and flush the index before acknowledging writes. Only
    /// benchmarks turn this off.
    pub sync: bool,
    /// sled's page cache.
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
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
    /// sled refused to open the index.
    #[error("cache index: {0}")]
    Index(#[from] sled::Error),
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
    Index(#[from] sled::Error),
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
    /// Unique body bytes stored (what the cap applies to).
    pub stored_bytes: u64,
    /// Objects evicted since start.
    pub evicted: u64,
    /// Reads that failed verification since start (served as misses).
    pub corrupt_reads: u64,
    /// Packs compacted since start.
    pub compactions: u64,
}

#[derive(Default)]
struct Counters {
    objects: AtomicU64,
    logical_bytes: AtomicU64,
    stored_bytes: AtomicU64,
    evicted: AtomicU64,
    corrupt: AtomicU64,
    compactions: AtomicU64,
}

#[derive(Default)]
struct Hot {
    map: HashMap<KeyHash, (sled::IVec, Object)>,
    bytes: usize,
}

struct Shared {
    hot: std::sync::Mutex<Hot>,
    db: sled::Db,
    obj: sled::Tree,
    blob: sled::Tree,
    hdr: sled::Tree,
    vary: sled::Tree,
    packs: RwLock<HashMap<u32, Arc<File>>>,
    counters: Counters,
    opts: StoreOptions,
}

enum Op {
    Put {
        key: KeyHash,
        meta: ObjectMeta,
        body: Bytes,
        ack: oneshot::Sender<Result<(), StoreError>>,
    },
    UpdateMeta {
        key: KeyHash,
        meta: ObjectMeta,
        ack: oneshot::Sender<Result<(), StoreError>>,
    },
    Remove {
        key: KeyHash,
        ack: Option<oneshot::Sender<Result<(), StoreError>>>,
    },
    SetPinned {
        key: KeyHash,
        pinned: bool,
        ack: oneshot::Sender<Result<(), StoreError>>,
    },
    Flush {
        ack: oneshot::Sender<Result<(), StoreError>>,
    },
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

impl Store {
    /// Opens (or creates) the store in `dir`. Blocking: scans the index to
    /// rebuild counters (about a second per million objects).
    ///
    /// # Errors
    /// The directory or index cannot be opened.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store, OpenError> {
        let packs_dir = dir.join("packs");
        std::fs::create_dir_all(&packs_dir).map_err(io_err(&packs_dir))?;
        let sled_config = sled::Config::new()
            .path(dir.join("index"))
            .cache_capacity(opts.index_cache_bytes)
            .flush_every_ms(Some(1000));
        // A previous instance in this process may still be closing (its
        // writer thread flushes after the last handle drops): retry the
        // index lock briefly.
        let mut tries = 0;
        let db = loop {
            match sled_config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if tries < OPEN_LOCK_RETRIES && e.to_string().contains("lock") =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let obj = db.open_tree("obj")?;
        let blob = db.open_tree("blob")?;
        let hdr = db.open_tree("hdr")?;
        let vary = db.open_tree("vary")?;

        let mut files = HashMap::new();
        let mut max_id = 0u32;
        for entry in std::fs::read_dir(&packs_dir).map_err(io_err(&packs_dir))? {
            let entry = entry.map_err(io_err(&packs_dir))?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".pack"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let f = File::open(entry.path()).map_err(io_err(&entry.path()))?;
            files.insert(id, Arc::new(f));
            max_id = max_id.max(id);
        }

        // Rebuild counters from the index.
        let counters = Counters::default();
        let mut pack_live: HashMap<u32, u64> = HashMap::new();
        for item in blob.iter() {
            let (_, v) = item?;
            if let Ok(loc) = BlobLoc::decode(&v) {
                counters
                    .stored_bytes
                    .fetch_add(u64::from(loc.len), Ordering::Relaxed);
                *pack_live.entry(loc.pack).or_default() +=
                    RECORD_HEADER as u64 + u64::from(loc.len);
            }
        }
        for item in obj.iter() {
            let (_, v) = item?;
            if let Ok(r) = ObjectRecord::decode(&v) {
                counters.objects.fetch_add(1, Ordering::Relaxed);
                counters
                    .logical_bytes
                    .fetch_add(u64::from(r.body_len), Ordering::Relaxed);
            }
        }
        // Packs nothing refers to (orphans of a crash, or emptied) go.
        for id in files.keys().copied().collect::<Vec<_>>() {
            if !pack_live.contains_key(&id) {
                files.remove(&id);
                let _ = std::fs::remove_file(pack_path(&packs_dir, id));
            }
        }

        let shared = Arc::new(Shared {
            hot: std::sync::Mutex::default(),
            db,
            obj,
            blob,
            hdr,
            vary,
            packs: RwLock::new(files),
            counters,
            opts,
        });
        let mut writer = Writer {
            shared: shared.clone(),
            dir: packs_dir,
            active: None,
            next_id: max_id + 1,
            pack_live,
            pack_size: HashMap::new(),
            rng: system_clock() | 1,
        };
        for (id, f) in shared.packs.read().expect("lock").iter() {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            writer.pack_size.insert(*id, len);
        }
        writer.new_pack().map_err(io_err(dir))?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        std::thread::Builder::new()
            .name("cache-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(dir))?;
        Ok(Store { shared, tx })
    }

    fn now_min(&self) -> u32 {
        ((self.shared.opts.clock)() / 60) as u32
    }

    /// Reads an object and verifies its body. Fast (index lookup plus one
    /// positioned read, usually from the page cache), so callers run it on
    /// the async thread. `Ok(None)` for a miss *and* for an object that failed
    /// verification (counted in [`StoreStats::corrupt_reads`] and dropped).
    ///
    /// # Errors
    /// Index errors.
    pub fn get(&self, key: &KeyHash) -> Result<Option<Object>, StoreError> {
        for _attempt in 0..2 {
            let Some(raw) = self.shared.obj.get(key)? else {
                return Ok(None);
            };
            if let Some((r, o)) = self.shared.hot.lock().expect("lock").map.get(key) {
                if *r == raw {
                    return Ok(Some(o.clone()));
                }
            }
            let Ok(rec) = ObjectRecord::decode(&raw) else {
                self.corrupt(key);
                return Ok(None);
            };
            let Some(loc) = self
                .shared
                .blob
                .get(rec.body_hash)?
                .and_then(|v| BlobLoc::decode(&v).ok())
            else {
                if self.shared.obj.get(key)?.as_deref() == Some(&raw[..]) {
                    self.corrupt(key);
                    return Ok(None);
                }
                continue; // replaced meanwhile
            };
            let file = self
                .shared
                .packs
                .read()
                .expect("lock")
                .get(&loc.pack)
                .cloned();
            let body = file.and_then(|f| read_record(&f, &loc, &rec.body_hash));
            let Some(body) = body else {
                // Compaction may have moved it between our two lookups.
                let again = self
                    .shared
                    .blob
                    .get(rec.body_hash)?
                    .and_then(|v| BlobLoc::decode(&v).ok());
                if again.is_some_and(|a| a.pack != loc.pack || a.offset != loc.offset) {
                    continue;
                }
                self.corrupt(key);
                return Ok(None);
            };
            let meta = self.meta_of(&rec)?;
            let now = self.now_min();
            let mut raw = raw;
            if now >= rec.last_access.saturating_add(TOUCH_GRANULARITY_MIN) {
                let mut touched = rec.clone();
                touched.last_access = now;
                let enc = sled::IVec::from(touched.encode());
                // Lost races are fine: the writer's newer record wins.
                if let Ok(()) =
                    self.shared
                        .obj
                        .compare_and_swap(key, Some(raw.clone()), Some(enc.clone()))?
                {
                    raw = enc;
                }
            }
            let obj = Object { meta, body };
            if obj.body.len() <= HOT_MAX_OBJECT {
                let mut hot = self.shared.hot.lock().expect("lock");
                let size = obj.body.len() + 256;
                while hot.bytes + size > HOT_CACHE_BYTES {
                    let Some(k) = hot.map.keys().next().copied() else {
                        break;
                    };
                    if let Some((_, o)) = hot.map.remove(&k) {
                        hot.bytes -= o.body.len() + 256;
                    }
                }
                if let Some((_, old)) = hot.map.insert(*key, (raw, obj.clone())) {
                    hot.bytes -= old.body.len() + 256;
                }
                hot.bytes += size;
            }
            return Ok(Some(obj));
        }
        Ok(None)
    }

    /// Metadata only, no body read (for `HEAD`-like checks and seeding).
    ///
    /// # Errors
    /// Index errors.
    pub fn get_meta(&self, key: &KeyHash) -> Result<Option<ObjectMeta>, StoreError> {
        let Some(raw) = self.shared.obj.get(key)? else {
            return Ok(None);
        };
        match ObjectRecord::decode(&raw) {
            Ok(rec) => Ok(Some(self.meta_of(&rec)?)),
            Err(_) => Ok(None),
        }
    }

    /// Whether `key` is stored (index only; a body may still fail to verify).
    pub fn contains(&self, key: &KeyHash) -> bool {
        self.shared.obj.contains_key(key).unwrap_or(false)
    }

    fn meta_of(&self, rec: &ObjectRecord) -> Result<ObjectMeta, StoreError> {
        let block = if rec.header_block == [0; 8] {
            None
        } else {
            self.shared.hdr.get(rec.header_block)?
        };
        let block = block
            .as_deref()
            .map(|b| &b[4.min(b.len())..])
            .unwrap_or(&[]);
        Ok(ObjectMeta {
            status: rec.status,
            headers: codec::join_headers(block, &rec.volatile),
            request_time: u64::from(rec.request_time),
            response_time: u64::from(rec.response_time),
            pinned: rec.flags & FLAG_PINNED != 0,
        })
    }

    fn corrupt(&self, key: &KeyHash) {
        self.shared.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(key = %hex(key), "cache object failed verification; dropped");
        let _ = self.tx.try_send(Op::Remove {
            key: *key,
            ack: None,
        });
    }

    async fn call(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<(), StoreError>>) -> Op,
    ) -> Result<(), StoreError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(op(ack))
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
        self.call(|ack| Op::Put {
            key,
            meta,
            body,
            ack,
        })
        .await
    }

    /// Replaces the metadata of a stored object, keeping its body (after a
    /// 304 freshened it).
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if it is gone, or write errors.
    pub async fn update_meta(&self, key: KeyHash, meta: ObjectMeta) -> Result<(), StoreError> {
        self.call(|ack| Op::UpdateMeta { key, meta, ack }).await
    }

    /// Removes an object (invalidation). Removing a missing key is fine.
    ///
    /// # Errors
    /// Write errors.
    pub async fn remove(&self, key: KeyHash) -> Result<(), StoreError> {
        self.call(|ack| Op::Remove {
            key,
            ack: Some(ack),
        })
        .await
    }

    /// Pins or unpins an object.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] or write errors.
    pub async fn set_pinned(&self, key: KeyHash, pinned: bool) -> Result<(), StoreError> {
        self.call(|ack| Op::SetPinned { key, pinned, ack }).await
    }

    /// Waits until everything queued before it is durable.
    ///
    /// # Errors
    /// Write errors.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(|ack| Op::Flush { ack }).await
    }

    /// The `Vary` field names recorded for a primary key.
    pub fn vary_fields(&self, primary: &KeyHash) -> Option<Vec<String>> {
        let v = self.shared.vary.get(primary).ok()??;
        let s = std::str::from_utf8(&v).ok()?;
        Some(
            s.split('\n')
                .filter(|f| !f.is_empty())
                .map(String::from)
                .collect(),
        )
    }

    /// Records the `Vary` field names for a primary key (not flushed: losing
    /// it costs a miss, nothing more).
    ///
    /// # Errors
    /// Index errors.
    pub fn set_vary(&self, primary: &KeyHash, fields: &[String]) -> Result<(), StoreError> {
        if fields.is_empty() {
            self.shared.vary.remove(primary)?;
        } else {
            self.shared
                .vary
                .insert(primary, fields.join("\n").as_bytes())?;
        }
        Ok(())
    }

    /// Calls `f` with every stored key hash (for digests).
    pub fn for_each_key(&self, mut f: impl FnMut(&KeyHash)) {
        for k in self.shared.obj.iter().keys().flatten() {
            if let Ok(k) = <KeyHash>::try_from(&k[..]) {
                f(&k);
            }
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

fn read_record(f: &File, loc: &BlobLoc, hash: &BodyHash) -> Option<Bytes> {
    let mut buf = vec![0u8; RECORD_HEADER + loc.len as usize];
    f.read_exact_at(&mut buf, loc.offset).ok()?;
    if &buf[0..4] != RECORD_MAGIC
        || u32::from_le_bytes(buf[4..8].try_into().expect("4")) != loc.len
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

struct ActivePack {
    id: u32,
    file: File,
    len: u64,
}

struct Writer {
    shared: Arc<Shared>,
    dir: PathBuf,
    active: Option<ActivePack>,
    next_id: u32,
    /// Live record bytes per pack (header included).
    pack_live: HashMap<u32, u64>,
    /// File size per pack.
    pack_size: HashMap<u32, u64>,
    rng: u64,
}

impl Writer {
    fn new_pack(&mut self) -> std::io::Result<()> {
        let id = self.next_id;
        self.next_id += 1;
        let path = pack_path(&self.dir, id);
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        file.write_all(PACK_MAGIC)?;
        file.sync_all()?;
        File::open(&self.dir)?.sync_all()?;
        let reader = File::open(&path)?;
        self.shared
            .packs
            .write()
            .expect("lock")
            .insert(id, Arc::new(reader));
        self.pack_size.insert(id, PACK_MAGIC.len() as u64);
        self.active = Some(ActivePack {
            id,
            file,
            len: PACK_MAGIC.len() as u64,
        });
        Ok(())
    }

    fn append(&mut self, hash: &BodyHash, body: &[u8]) -> std::io::Result<BlobLoc> {
        if self
            .active
            .as_ref()
            .is_none_or(|a| a.len >= self.shared.opts.pack_target_bytes)
        {
            self.new_pack()?;
        }
        let a = self.active.as_mut().expect("active pack");
        let mut rec = Vec::with_capacity(RECORD_HEADER + body.len());
        rec.extend_from_slice(RECORD_MAGIC);
        rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
        rec.extend_from_slice(hash);
        rec.extend_from_slice(body);
        let offset = a.len;
        if let Err(e) = a.file.write_all(&rec) {
            // Leave no half record to append after: start a new pack.
            self.active = None;
            return Err(e);
        }
        a.len += rec.len() as u64;
        *self.pack_size.entry(a.id).or_default() = a.len;
        *self.pack_live.entry(a.id).or_default() += rec.len() as u64;
        Ok(BlobLoc {
            pack: a.id,
            offset,
            len: body.len() as u32,
            refs: 0,
        })
    }

    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.commit(batch);
            self.evict();
            self.compact();
        }
        let _ = self.shared.db.flush();
    }

    fn commit(&mut self, batch: Vec<Op>) {
        // Phase 1: new bodies go to the pack, then to disk.
        let mut fresh: HashMap<BodyHash, Result<BlobLoc, String>> = HashMap::new();
        let mut hashes = Vec::with_capacity(batch.len());
        for op in &batch {
            let h = match op {
                Op::Put { body, .. } => {
                    let h = body_hash(body);
                    if !fresh.contains_key(&h) && !self.shared.blob.contains_key(h).unwrap_or(false)
                    {
                        let r = self.append(&h, body).map_err(|e| e.to_string());
                        fresh.insert(h, r);
                    }
                    Some(h)
                }
                _ => None,
            };
            hashes.push(h);
        }
        let mut sync_err = None;
        if self.shared.opts.sync && !fresh.is_empty() {
            if let Some(a) = &self.active {
                if let Err(e) = a.file.sync_data() {
                    sync_err = Some(e.to_string());
                }
            }
        }
        // Phase 2: the index, then one flush, then the acks.
        let mut acks = Vec::with_capacity(batch.len());
        for (op, h) in batch.into_iter().zip(hashes) {
            match op {
                Op::Put {
                    key,
                    meta,
                    body,
                    ack,
                } => {
                    let h = h.expect("hashed");
                    let r = match (&sync_err, fresh.get(&h)) {
                        (_, Some(Err(e))) => Err(StoreError::Io(std::io::Error::other(e.clone()))),
                        (Some(e), Some(Ok(_))) => {
                            Err(StoreError::Io(std::io::Error::other(e.clone())))
                        }
                        (_, f) => self.put(
                            key,
                            &meta,
                            &body,
                            h,
                            f.and_then(|r| r.as_ref().ok()).copied(),
                        ),
                    };
                    acks.push((Some(ack), r));
                }
                Op::UpdateMeta { key, meta, ack } => {
                    let r = self.update_meta(key, &meta);
                    acks.push((Some(ack), r));
                }
                Op::Remove { key, ack } => {
                    let r = self.remove(&key).map(|_| ());
                    acks.push((ack, r));
                }
                Op::SetPinned { key, pinned, ack } => {
                    let r = self.set_pinned(key, pinned);
                    acks.push((Some(ack), r));
                }
                Op::Flush { ack } => acks.push((Some(ack), Ok(()))),
            }
        }
        let flush = if self.shared.opts.sync {
            self.shared.db.flush().map(|_| ())
        } else {
            Ok(())
        };
        for (ack, r) in acks {
            let r = match (&flush, r) {
                (Err(e), Ok(())) => Err(StoreError::Index(e.clone())),
                (_, r) => r,
            };
            if let Some(ack) = ack {
                let _ = ack.send(r);
            }
        }
    }

    fn record_for(
        &self,
        meta: &ObjectMeta,
        body_len: u32,
        hash: BodyHash,
        flags: u8,
    ) -> (ObjectRecord, Vec<u8>) {
        let (block, volatile) = codec::split_headers(&meta.headers);
        let rec = ObjectRecord {
            flags,
            status: meta.status,
            request_time: meta.request_time.min(u64::from(u32::MAX)) as u32,
            response_time: meta.response_time.min(u64::from(u32::MAX)) as u32,
            last_access: ((self.shared.opts.clock)() / 60) as u32,
            body_len,
            body_hash: hash,
            header_block: codec::block_id(&block),
            volatile,
        };
        (rec, block)
    }

    fn put(
        &mut self,
        key: KeyHash,
        meta: &ObjectMeta,
        body: &[u8],
        hash: BodyHash,
        fresh: Option<BlobLoc>,
    ) -> Result<(), StoreError> {
        let s = self.shared.clone();
        let old = s.obj.get(key)?.and_then(|v| ObjectRecord::decode(&v).ok());
        let pinned = meta.pinned || old.as_ref().is_some_and(|o| o.flags & FLAG_PINNED != 0);
        let (rec, block) = self.record_for(
            meta,
            body.len() as u32,
            hash,
            if pinned { FLAG_PINNED } else { 0 },
        );
        // References first, entry second, releases last: never dangling.
        if old.as_ref().is_none_or(|o| o.body_hash != hash) {
            let mut loc = match fresh {
                Some(l) => s
                    .blob
                    .get(hash)?
                    .and_then(|v| BlobLoc::decode(&v).ok())
                    .unwrap_or(l),
                None => match s.blob.get(hash)?.and_then(|v| BlobLoc::decode(&v).ok()) {
                    Some(l) => l,
                    None => {
                        // Released since phase 1: write it again.
                        self.append(&hash, body)?
                    }
                },
            };
            if loc.refs == 0 {
                s.counters
                    .stored_bytes
                    .fetch_add(u64::from(loc.len), Ordering::Relaxed);
            }
            loc.refs += 1;
            s.blob.insert(hash, &loc.encode())?;
        }
        if old
            .as_ref()
            .is_none_or(|o| o.header_block != rec.header_block)
        {
            self.incref_block(rec.header_block, &block)?;
        }
        s.obj.insert(key, rec.encode())?;
        match old {
            None => {
                s.counters.objects.fetch_add(1, Ordering::Relaxed);
            }
            Some(o) => {
                s.counters
                    .logical_bytes
                    .fetch_sub(u64::from(o.body_len), Ordering::Relaxed);
                if o.body_hash != hash {
                    self.decref_blob(&o.body_hash)?;
                }
                if o.header_block != rec.header_block {
                    self.decref_block(o.header_block)?;
                }
            }
        }
        s.counters
            .logical_bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn update_meta(&mut self, key: KeyHash, meta: &ObjectMeta) -> Result<(), StoreError> {
        let s = self.shared.clone();
        let Some(old) = s.obj.get(key)?.and_then(|v| ObjectRecord::decode(&v).ok()) else {
            return Err(StoreError::NotFound);
        };
        let flags = if meta.pinned {
            old.flags | FLAG_PINNED
        } else {
            old.flags
        };
        let (rec, block) = self.record_for(meta, old.body_len, old.body_hash, flags);
        if old.header_block != rec.header_block {
            self.incref_block(rec.header_block, &block)?;
        }
        s.obj.insert(key, rec.encode())?;
        if old.header_block != rec.header_block {
            self.decref_block(old.header_block)?;
        }
        Ok(())
    }

    fn set_pinned(&mut self, key: KeyHash, pinned: bool) -> Result<(), StoreError> {
        let s = self.shared.clone();
        let Some(mut rec) = s.obj.get(key)?.and_then(|v| ObjectRecord::decode(&v).ok()) else {
            return Err(StoreError::NotFound);
        };
        if pinned {
            rec.flags |= FLAG_PINNED;
        } else {
            rec.flags &= !FLAG_PINNED;
        }
        s.obj.insert(key, rec.encode())?;
        Ok(())
    }

    fn remove(&mut self, key: &KeyHash) -> Result<bool, StoreError> {
        let s = self.shared.clone();
        let Some(old) = s.obj.remove(key)? else {
            return Ok(false);
        };
        s.counters.objects.fetch_sub(1, Ordering::Relaxed);
        if let Ok(o) = ObjectRecord::decode(&old) {
            s.counters
                .logical_bytes
                .fetch_sub(u64::from(o.body_len), Ordering::Relaxed);
            self.decref_blob(&o.body_hash)?;
            self.decref_block(o.header_block)?;
        }
        Ok(true)
    }

    fn incref_block(&mut self, id: [u8; 8], block: &[u8]) -> Result<(), StoreError> {
        if id == [0; 8] {
            return Ok(());
        }
        let v = match self.shared.hdr.get(id)? {
            Some(v) if v.len() >= 4 => {
                let n = u32::from_le_bytes(v[..4].try_into().expect("4")).saturating_add(1);
                let mut nv = v.to_vec();
                nv[..4].copy_from_slice(&n.to_le_bytes());
                nv
            }
            _ => {
                let mut nv = 1u32.to_le_bytes().to_vec();
                nv.extend_from_slice(block);
                nv
            }
        };
        self.shared.hdr.insert(id, v)?;
        Ok(())
    }

    fn decref_block(&mut self, id: [u8; 8]) -> Result<(), StoreError> {
        if id == [0; 8] {
            return Ok(());
        }
        if let Some(v) = self.shared.hdr.get(id)? {
            let n = u32::from_le_bytes(v[..4.min(v.len())].try_into().unwrap_or([1, 0, 0, 0]));
            if n <= 1 {
                self.shared.hdr.remove(id)?;
            } else {
                let mut nv = v.to_vec();
                nv[..4].copy_from_slice(&(n - 1).to_le_bytes());
                self.shared.hdr.insert(id, nv)?;
            }
        }
        Ok(())
    }

    fn decref_blob(&mut self, hash: &BodyHash) -> Result<(), StoreError> {
        let Some(mut loc) = self
            .shared
            .blob
            .get(hash)?
            .and_then(|v| BlobLoc::decode(&v).ok())
        else {
            return Ok(());
        };
        if loc.refs <= 1 {
            self.shared.blob.remove(hash)?;
            self.shared
                .counters
                .stored_bytes
                .fetch_sub(u64::from(loc.len), Ordering::Relaxed);
            if let Some(l) = self.pack_live.get_mut(&loc.pack) {
                *l = l.saturating_sub(RECORD_HEADER as u64 + u64::from(loc.len));
            }
        } else {
            loc.refs -= 1;
            self.shared.blob.insert(hash, &loc.encode())?;
        }
        Ok(())
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64: eviction sampling needs spread, not secrecy.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn evict(&mut self) {
        let max = self.shared.opts.max_bytes;
        let mut fruitless = 0;
        while self.shared.counters.stored_bytes.load(Ordering::Relaxed) > max && fruitless < 8 {
            let mut best: Option<(u32, sled::IVec)> = None;
            for _ in 0..EVICTION_SAMPLES {
                let mut start = [0u8; 16];
                start[..8].copy_from_slice(&self.next_rand().to_le_bytes());
                start[8..].copy_from_slice(&self.next_rand().to_le_bytes());
                let item = self
                    .shared
                    .obj
                    .range(start..)
                    .next()
                    .or_else(|| self.shared.obj.iter().next());
                let Some(Ok((k, v))) = item else { continue };
                let Ok(rec) = ObjectRecord::decode(&v) else {
                    continue;
                };
                if rec.flags & FLAG_PINNED != 0 {
                    continue;
                }
                if best.as_ref().is_none_or(|(t, _)| rec.last_access < *t) {
                    best = Some((rec.last_access, k));
                }
            }
            let Some((_, k)) = best else {
                fruitless += 1;
                continue;
            };
            let Ok(key) = <KeyHash>::try_from(&k[..]) else {
                continue;
            };
            match self.remove(&key) {
                Ok(true) => {
                    self.shared.counters.evicted.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "eviction failed");
                    return;
                }
            }
        }
        if fruitless >= 8 {
            tracing::warn!("cache above its cap but every sampled object is pinned");
        }
    }

    fn compact(&mut self) {
        let active = self.active.as_ref().map(|a| a.id);
        let victim = self.pack_size.iter().find_map(|(id, size)| {
            let live = self.pack_live.get(id).copied().unwrap_or(0);
            (Some(*id) != active && (live as f64) < (*size as f64) * COMPACT_LIVE_RATIO)
                .then_some(*id)
        });
        let Some(victim) = victim else { return };
        if let Err(e) = self.compact_pack(victim) {
            tracing::warn!(pack = victim, error = %e, "compaction failed");
            // Do not retry this pack in a loop; try again after restart.
            self.pack_size.remove(&victim);
        }
    }

    fn compact_pack(&mut self, victim: u32) -> Result<(), StoreError> {
        let s = self.shared.clone();
        let file = s.packs.read().expect("lock").get(&victim).cloned();
        let mut moved = 0u64;
        if let Some(file) = file {
            let mut todo = Vec::new();
            for item in s.blob.iter() {
                let (k, v) = item?;
                if let Ok(loc) = BlobLoc::decode(&v) {
                    if loc.pack == victim {
                        todo.push((k, loc));
                    }
                }
            }
            for (k, loc) in todo {
                let Ok(hash) = <BodyHash>::try_from(&k[..]) else {
                    continue;
                };
                match read_record(&file, &loc, &hash) {
                    Some(body) => {
                        let mut nl = self.append(&hash, &body)?;
                        nl.refs = loc.refs;
                        s.blob.insert(k, &nl.encode())?;
                        moved += 1;
                    }
                    None => {
                        // Unreadable: readers will find it missing and drop it.
                        s.blob.remove(k)?;
                        s.counters
                            .stored_bytes
                            .fetch_sub(u64::from(loc.len), Ordering::Relaxed);
                    }
                }
            }
            if let Some(a) = &self.active {
                a.file.sync_data()?;
            }
            s.db.flush()?;
        }
        s.packs.write().expect("lock").remove(&victim);
        self.pack_size.remove(&victim);
        self.pack_live.remove(&victim);
        let _ = std::fs::remove_file(pack_path(&self.dir, victim));
        s.counters.compactions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(pack = victim, moved, "pack compacted");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
