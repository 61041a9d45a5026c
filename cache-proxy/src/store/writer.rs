//! The writer thread: group commit, eviction, compaction and `check`.
//!
//! It owns the only writing SQLite connection and the active pack. Each
//! round takes up to [`MAX_BATCH`] queued operations and applies them in
//! one transaction: bodies appended, the pack `fdatasync`ed, the
//! transaction committed (durably if anything in it is acknowledged), and
//! only then the acks sent. Counters and per-pack live bytes are kept in
//! memory for speed and persisted in the same transaction; a rolled-back
//! transaction reloads them from the index, so memory never drifts from
//! disk.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::mpsc;

use super::codec::{self, body_hash, BodyHash, MetaRecord, FLAG_PINNED};
use super::index::{self, hash16, Loc, BAD_PACK, INDEX_FORMAT};
use super::{
    pack_path, read_record, CheckReport, KeyHash, ObjectMeta, Op, OpenError, Shared, StoreError,
    Write, COMPACT_LIVE_RATIO, COMPACT_STEP_BYTES, EVICTION_SAMPLES, MAX_BATCH,
    MAX_EVICT_PER_ROUND, PACK_MAGIC, PRESSURE_COMPACT_RATIO, RECORD_HEADER, RECORD_MAGIC,
};

/// Records a compaction step examines at most (small records cost an index
/// lookup each, so bytes alone would not bound a step's time).
const COMPACT_STEP_RECORDS: usize = 8192;

/// Time a writer round spends compacting at most, in steps, before it
/// serves the queue again.
const COMPACT_ROUND_BUDGET: std::time::Duration = std::time::Duration::from_millis(50);

/// Rounds of eviction sampling that found only pinned objects before the
/// writer gives up until its next round.
const FRUITLESS_ROUNDS: u32 = 8;

/// Packs are at most the cap over this, so that a full cache spans many
/// packs: compaction (the only way dead space leaves the disk) then works
/// on a small part of the cache at a time, and eviction ahead of it
/// overshoots the cap by at most a fraction of one pack when old objects
/// sit in old packs.
const PACKS_PER_CAP: u64 = 16;

/// Smallest pack target, however small the cap.
const MIN_PACK_BYTES: u64 = 1024 * 1024;

/// Above the cap, a pack this small is worth compacting for any dead space
/// in it: rewriting it costs little, and this keeps eviction exact in
/// small caches that fit in a pack or two.
const SMALL_PACK_BYTES: u64 = 1024 * 1024;

/// Allocation unit of the file systems we run on: a pack's last block
/// counts whole.
const DISK_BLOCK: u64 = 4096;

/// What an operation did, when the transaction itself went fine.
type Applied = Result<(), StoreError>;

#[derive(Debug, Clone, Copy, Default)]
struct PackState {
    /// File length.
    size: u64,
    /// Bytes of records (header included) that index rows point to.
    live: u64,
}

impl PackState {
    /// Disk taken: the file length rounded up to whole blocks.
    fn disk(&self) -> u64 {
        self.size.div_ceil(DISK_BLOCK) * DISK_BLOCK
    }
    fn dead(&self) -> u64 {
        self.size
            .saturating_sub(self.live + PACK_MAGIC.len() as u64)
    }
    /// Worth compacting when the store is above its cap.
    fn worth_compacting_under_pressure(&self) -> bool {
        self.dead_ratio() >= PRESSURE_COMPACT_RATIO
            || (self.size <= SMALL_PACK_BYTES && self.dead() > 0)
    }
    fn dead_ratio(&self) -> f64 {
        if self.size == 0 {
            0.0
        } else {
            self.dead() as f64 / self.size as f64
        }
    }
}

struct ActivePack {
    id: u32,
    file: File,
}

/// A pack being rewritten, a step per writer round.
struct Compaction {
    id: u32,
    file: Arc<File>,
    /// Next record to examine.
    pos: u64,
    size: u64,
    /// A malformed record was met mid-file: the rest is found through the
    /// index instead of by scanning.
    fallback: bool,
}

/// The `obj` fields a mutation needs.
struct Brief {
    body: BodyHash,
    hdr: i64,
    flags: u8,
    /// `None` if the blob row is missing.
    len: Option<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SyncMode {
    Off,
    Normal,
    Full,
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    conn: Connection,
    /// The packs directory.
    dir: PathBuf,
    active: Option<ActivePack>,
    next_id: u32,
    packs: HashMap<u32, PackState>,
    /// Packs whose live bytes changed in the open transaction.
    dirty: HashSet<u32>,
    /// Bytes appended to the active pack since its last fsync.
    unsynced: bool,
    sync_mode: Option<SyncMode>,
    page_size: u64,
    /// Size of the index database file.
    index_bytes: u64,
    rng: u64,
    compacting: Option<Compaction>,
    /// Packs whose compaction failed: not retried until restart.
    skip: HashSet<u32>,
    /// Keys changed in the open transaction, for the hot cache.
    changed: Vec<KeyHash>,
    /// The directory lock; declared last so it is released last.
    _lock: File,
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn encode_meta(meta: &ObjectMeta) -> (Vec<u8>, i64, Vec<u8>) {
    let (block, volatile) = codec::split_headers(&meta.headers);
    let id = i64::from_le_bytes(codec::block_id(&block));
    let rec = MetaRecord {
        status: meta.status,
        request_time: meta.request_time.min(u64::from(u32::MAX)) as u32,
        response_time: meta.response_time.min(u64::from(u32::MAX)) as u32,
        volatile,
    }
    .encode();
    (block, id, rec)
}

fn load_counters(conn: &Connection, shared: &Shared) -> rusqlite::Result<()> {
    let mut st = conn.prepare_cached("SELECT k, v FROM meta")?;
    let mut rows = st.query([])?;
    let c = &shared.counters;
    let (mut objects, mut logical, mut stored) = (0, 0, 0);
    while let Some(r) = rows.next()? {
        let k: String = r.get(0)?;
        let v: i64 = r.get(1)?;
        match k.as_str() {
            "objects" => objects = count(v),
            "logical" => logical = count(v),
            "stored" => stored = count(v),
            _ => {}
        }
    }
    c.objects.store(objects, Ordering::Relaxed);
    c.logical_bytes.store(logical, Ordering::Relaxed);
    c.stored_bytes.store(stored, Ordering::Relaxed);
    Ok(())
}

fn pack_rows(conn: &Connection) -> rusqlite::Result<HashMap<u32, u64>> {
    let mut st = conn.prepare_cached("SELECT id, live FROM pack")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = HashMap::new();
    for r in rows {
        let (id, live) = r?;
        if let Ok(id) = u32::try_from(id) {
            out.insert(id, count(live));
        }
    }
    Ok(out)
}

impl Writer {
    /// Checks the index format, loads counters, reconciles pack files with
    /// the index and opens a fresh active pack.
    pub(super) fn open(
        shared: Arc<Shared>,
        conn: Connection,
        dir: PathBuf,
        lock: File,
    ) -> Result<Writer, OpenError> {
        use super::io_err as io;
        let format: Option<i64> = conn
            .query_row("SELECT v FROM meta WHERE k = 'format'", [], |r| r.get(0))
            .optional()?;
        match format {
            None => {
                conn.execute(
                    "INSERT INTO meta(k, v) VALUES ('format', ?1)",
                    [INDEX_FORMAT],
                )?;
            }
            Some(f) if f == INDEX_FORMAT => {}
            Some(found) => {
                return Err(OpenError::Format {
                    found,
                    supported: INDEX_FORMAT,
                })
            }
        }
        load_counters(&conn, &shared)?;
        let rows = pack_rows(&conn)?;
        let mut packs = HashMap::new();
        let mut files = HashMap::new();
        let mut max_id = 0u32;
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".pack"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            max_id = max_id.max(id);
            let live = rows.get(&id).copied().unwrap_or(0);
            if live == 0 {
                // Nothing indexed in it: an emptied pack, the unused active
                // pack of a previous run, or bytes of a batch that crashed
                // before its commit.
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let f = File::open(entry.path()).map_err(io(&entry.path()))?;
            let size = f.metadata().map_err(io(&entry.path()))?.len();
            files.insert(id, Arc::new(f));
            packs.insert(id, PackState { size, live });
        }
        // Index rows for packs that are gone: their bodies are lost. Mark
        // them bad so reads miss (and drop the objects) at once.
        let lost: Vec<u32> = rows
            .keys()
            .copied()
            .filter(|id| !packs.contains_key(id))
            .collect();
        if !lost.is_empty() {
            conn.execute_batch("BEGIN IMMEDIATE")?;
            for id in &lost {
                max_id = max_id.max(*id);
                if rows[id] > 0 {
                    tracing::warn!(pack = id, "cache pack missing; its objects are dropped");
                    conn.execute(
                        "UPDATE blob SET pack = ?1 WHERE pack = ?2",
                        params![BAD_PACK, id],
                    )?;
                }
                conn.execute("DELETE FROM pack WHERE id = ?1", [id])?;
            }
            conn.execute_batch("COMMIT")?;
        }
        *shared.packs.write().expect("lock") = files;
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let mut w = Writer {
            shared,
            conn,
            dir,
            active: None,
            next_id: max_id + 1,
            packs,
            dirty: HashSet::new(),
            unsynced: false,
            sync_mode: None,
            page_size: count(page_size),
            index_bytes: 0,
            rng: super::system_clock() ^ 0x9e37_79b9_7f4a_7c15 | 1,
            compacting: None,
            skip: HashSet::new(),
            changed: Vec::new(),
            _lock: lock,
        };
        // The active pack is created by the first append, so an open store
        // that writes nothing adds no file.
        w.refresh_sizes();
        Ok(w)
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        while let Some(first) = rx.blocking_recv() {
            let mut ops = vec![first];
            while ops.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let mut writes = Vec::with_capacity(ops.len());
            let mut checks = Vec::new();
            for op in ops {
                match op {
                    Op::Write { write, ack } => writes.push((write, ack)),
                    Op::Check { verify_bodies, ack } => checks.push((verify_bodies, ack)),
                    Op::Tick => {}
                }
            }
            self.commit(writes);
            self.maintain();
            for (verify, ack) in checks {
                let _ = ack.send(self.check(verify));
            }
        }
        // Last handle gone: record pending access times and Vary lists,
        // and fold the WAL into the database.
        self.commit(Vec::new());
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }

    // ---- transactions -------------------------------------------------

    fn set_sync_mode(&mut self, durable: bool) -> rusqlite::Result<()> {
        let want = match (self.shared.opts.sync, durable) {
            (false, _) => SyncMode::Off,
            (true, false) => SyncMode::Normal,
            (true, true) => SyncMode::Full,
        };
        if self.sync_mode != Some(want) {
            let v = match want {
                SyncMode::Off => "OFF",
                SyncMode::Normal => "NORMAL",
                SyncMode::Full => "FULL",
            };
            self.conn.pragma_update(None, "synchronous", v)?;
            self.sync_mode = Some(want);
        }
        Ok(())
    }

    /// Runs `f` in one transaction. Before committing: counters persisted,
    /// appended bytes fsynced. On any error the transaction is rolled back
    /// and the in-memory counters reloaded from the index.
    fn transaction<T>(
        &mut self,
        durable: bool,
        f: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.set_sync_mode(durable)?;
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let r = f(self).and_then(|t| {
            self.persist_counters()?;
            self.sync_pack()?;
            if !self.changed.is_empty() {
                // From here until `end_change`, hits on these keys go to
                // the index (see hot.rs).
                self.shared
                    .hot
                    .lock()
                    .expect("lock")
                    .begin_change(&self.changed);
            }
            self.conn.execute_batch("COMMIT")?;
            Ok(t)
        });
        // Committed or not, what readers cached of these keys may be stale
        // (and must be gone before any ack).
        if !self.changed.is_empty() {
            let changed = std::mem::take(&mut self.changed);
            self.shared.hot.lock().expect("lock").end_change(&changed);
        }
        match r {
            Ok(t) => {
                self.dirty.clear();
                self.refresh_sizes();
                Ok(t)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.unsynced = false;
                if let Err(e) = self.reload() {
                    tracing::error!(error = %e, "reloading cache counters failed");
                }
                Err(e)
            }
        }
    }

    fn sync_pack(&mut self) -> Result<(), StoreError> {
        if !self.unsynced {
            return Ok(());
        }
        if self.shared.opts.sync {
            if let Some(a) = &self.active {
                if let Err(e) = a.file.sync_data() {
                    // After a failed fsync the kernel may have dropped the
                    // dirty pages: never append to this pack again.
                    self.active = None;
                    return Err(e.into());
                }
            }
        }
        self.unsynced = false;
        Ok(())
    }

    fn persist_counters(&mut self) -> rusqlite::Result<()> {
        let c = &self.shared.counters;
        let v = |a: &std::sync::atomic::AtomicU64| {
            a.load(Ordering::Relaxed).min(i64::MAX as u64) as i64
        };
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO meta(k, v) VALUES ('objects', ?1), ('logical', ?2), ('stored', ?3)",
            )?
            .execute(params![v(&c.objects), v(&c.logical_bytes), v(&c.stored_bytes)])?;
        for id in std::mem::take(&mut self.dirty) {
            let live = self.packs.get(&id).map_or(0, |p| p.live);
            self.conn
                .prepare_cached("INSERT OR REPLACE INTO pack(id, live) VALUES (?1, ?2)")?
                .execute(params![id, live as i64])?;
        }
        Ok(())
    }

    fn reload(&mut self) -> rusqlite::Result<()> {
        self.dirty.clear();
        load_counters(&self.conn, &self.shared)?;
        let rows = pack_rows(&self.conn)?;
        for (id, p) in self.packs.iter_mut() {
            p.live = rows.get(id).copied().unwrap_or(0);
        }
        Ok(())
    }

    fn refresh_sizes(&mut self) {
        if let Ok(pages) = self
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))
        {
            self.index_bytes = count(pages) * self.page_size;
        }
        self.shared
            .counters
            .disk_bytes
            .store(self.footprint(), Ordering::Relaxed);
    }

    // ---- packs ---------------------------------------------------------

    fn new_pack(&mut self) -> std::io::Result<()> {
        if let Some(old) = self.active.take() {
            // Sealing: its unsynced tail must not be forgotten by the sync
            // before the commit, which only sees the active pack.
            if self.unsynced && self.shared.opts.sync {
                old.file.sync_data()?;
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let path = pack_path(&self.dir, id);
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        file.write_all(PACK_MAGIC)?;
        file.sync_all()?;
        util::fs::fsync_dir(&self.dir)?;
        let reader = File::open(&path)?;
        self.shared
            .packs
            .write()
            .expect("lock")
            .insert(id, Arc::new(reader));
        self.packs.insert(
            id,
            PackState {
                size: PACK_MAGIC.len() as u64,
                live: 0,
            },
        );
        self.active = Some(ActivePack { id, file });
        Ok(())
    }

    /// Appends a body record; returns where. Not yet durable.
    fn append(&mut self, hash: &BodyHash, body: &[u8]) -> std::io::Result<(u32, u64)> {
        let o = &self.shared.opts;
        let target = o
            .pack_target_bytes
            .min((o.max_bytes / PACKS_PER_CAP).max(MIN_PACK_BYTES));
        let full = self
            .active
            .as_ref()
            .is_none_or(|a| self.packs.get(&a.id).is_none_or(|p| p.size >= target));
        if full {
            self.new_pack()?;
        }
        let a = self.active.as_mut().expect("active pack");
        let st = self.packs.get_mut(&a.id).expect("active pack state");
        let mut rec = Vec::with_capacity(RECORD_HEADER + body.len());
        rec.extend_from_slice(RECORD_MAGIC);
        rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
        rec.extend_from_slice(hash);
        rec.extend_from_slice(body);
        let offset = st.size;
        self.unsynced = true;
        if let Err(e) = a.file.write_all(&rec) {
            // Leave no half record to append after: start a new pack.
            st.size = a.file.metadata().map(|m| m.len()).unwrap_or(st.size);
            self.active = None;
            return Err(e);
        }
        st.size += rec.len() as u64;
        Ok((a.id, offset))
    }

    fn add_live(&mut self, pack: i64, delta: i64) {
        let Ok(id) = u32::try_from(pack) else { return };
        if let Some(p) = self.packs.get_mut(&id) {
            p.live = p.live.saturating_add_signed(delta);
            self.dirty.insert(id);
        }
    }

    fn footprint(&self) -> u64 {
        self.packs.values().map(PackState::disk).sum::<u64>() + self.index_bytes
    }

    fn reclaimable(&self, id: u32, p: &PackState) -> bool {
        self.compacting.as_ref().is_some_and(|c| c.id == id)
            || (p.worth_compacting_under_pressure() && !self.skip.contains(&id))
    }

    /// The footprint once the packs worth compacting are compacted.
    fn projected(&self) -> u64 {
        self.packs
            .iter()
            .map(|(id, p)| {
                if self.reclaimable(*id, p) {
                    (p.live + PACK_MAGIC.len() as u64).div_ceil(DISK_BLOCK) * DISK_BLOCK
                } else {
                    p.disk()
                }
            })
            .sum::<u64>()
            + self.index_bytes
    }

    // ---- group commit --------------------------------------------------

    fn commit(&mut self, writes: Vec<(Write, Option<super::Ack>)>) {
        let touches = std::mem::take(&mut *self.shared.touches.lock().expect("lock"));
        let vary: Vec<(KeyHash, Option<String>)> = self
            .shared
            .vary
            .lock()
            .expect("lock")
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        if writes.is_empty() && touches.is_empty() && vary.is_empty() {
            return;
        }
        let durable = writes
            .iter()
            .any(|(w, ack)| ack.is_some() && !matches!(w, Write::Corrupt { .. }));
        let all = self.transaction(durable, |w| {
            let mut results = Vec::with_capacity(writes.len());
            for (op, _) in &writes {
                results.push(w.apply(op)?);
            }
            w.apply_touches(&touches)?;
            w.apply_vary(&vary)?;
            Ok(results)
        });
        let results = match all {
            Ok(r) => {
                let mut pending = self.shared.vary.lock().expect("lock");
                for (k, v) in vary {
                    if pending.get(&k) == Some(&v) {
                        pending.remove(&k);
                    }
                }
                r
            }
            Err(e) => {
                // Isolate the failure: one transaction per write, so only
                // the writes that fail report it.
                tracing::warn!(error = %e, writes = writes.len(), "cache group commit failed; retrying writes one by one");
                writes
                    .iter()
                    .map(|(op, _)| self.transaction(true, |w| w.apply(op)).and_then(|r| r))
                    .collect()
            }
        };
        for ((_, ack), r) in writes.into_iter().zip(results) {
            if let Some(ack) = ack {
                let _ = ack.send(r);
            }
        }
    }

    fn apply(&mut self, w: &Write) -> Result<Applied, StoreError> {
        match w {
            Write::Put { key, meta, body } => self.put(key, meta, body),
            Write::UpdateMeta { key, meta } => self.update_meta(key, meta),
            Write::Remove { key } => self.remove(key).map(|_| Ok(())),
            Write::SetPinned { key, pinned } => self.set_pinned(key, *pinned),
            Write::Corrupt { key, body } => self.drop_corrupt(key, body).map(Ok),
            Write::Flush => Ok(Ok(())),
        }
    }

    fn apply_touches(&mut self, touches: &HashMap<KeyHash, u32>) -> rusqlite::Result<()> {
        let mut st = self
            .conn
            .prepare_cached("UPDATE obj SET atime = ?2 WHERE key = ?1 AND atime < ?2")?;
        for (k, t) in touches {
            st.execute(params![&k[..], t])?;
        }
        Ok(())
    }

    fn apply_vary(&mut self, vary: &[(KeyHash, Option<String>)]) -> rusqlite::Result<()> {
        for (k, v) in vary {
            match v {
                Some(text) => self
                    .conn
                    .prepare_cached("INSERT OR REPLACE INTO vary(key, fields) VALUES (?1, ?2)")?
                    .execute(params![&k[..], text])?,
                None => self
                    .conn
                    .prepare_cached("DELETE FROM vary WHERE key = ?1")?
                    .execute([&k[..]])?,
            };
        }
        Ok(())
    }

    fn brief(&self, key: &KeyHash) -> rusqlite::Result<Option<Brief>> {
        self.conn
            .prepare_cached(
                "SELECT o.body, o.hdr, o.flags, b.len FROM obj o LEFT JOIN blob b ON b.hash = o.body WHERE o.key = ?1",
            )?
            .query_row([&key[..]], |r| {
                Ok(Brief {
                    body: hash16(r.get(0)?)?,
                    hdr: r.get(1)?,
                    flags: r.get::<_, i64>(2)? as u8,
                    len: r.get::<_, Option<i64>>(3)?.map(|l| l as u32),
                })
            })
            .optional()
    }

    fn now_min(&self) -> u32 {
        ((self.shared.opts.clock)() / 60) as u32
    }

    fn put(
        &mut self,
        key: &KeyHash,
        meta: &ObjectMeta,
        body: &Bytes,
    ) -> Result<Applied, StoreError> {
        let hash = body_hash(body);
        self.changed.push(*key);
        let old = self.brief(key)?;
        let pinned = meta.pinned || old.as_ref().is_some_and(|o| o.flags & FLAG_PINNED != 0);
        let (block, hdr, rec) = encode_meta(meta);
        // References first, row second, releases last.
        if old.as_ref().is_none_or(|o| o.body != hash) {
            self.incref_blob(&hash, body)?;
        }
        if old.as_ref().is_none_or(|o| o.hdr != hdr) {
            self.incref_block(hdr, &block)?;
        }
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO obj(key, body, hdr, atime, flags, rec) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                &key[..],
                &hash[..],
                hdr,
                self.now_min(),
                if pinned { FLAG_PINNED } else { 0 },
                rec
            ])?;
        let c = &self.shared.counters;
        match old {
            None => {
                c.objects.fetch_add(1, Ordering::Relaxed);
            }
            Some(o) => {
                c.logical_bytes
                    .fetch_sub(u64::from(o.len.unwrap_or(0)), Ordering::Relaxed);
                if o.body != hash {
                    self.decref_blob(&o.body)?;
                }
                if o.hdr != hdr {
                    self.decref_block(o.hdr)?;
                }
            }
        }
        self.shared
            .counters
            .logical_bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        Ok(Ok(()))
    }

    fn update_meta(&mut self, key: &KeyHash, meta: &ObjectMeta) -> Result<Applied, StoreError> {
        let Some(old) = self.brief(key)? else {
            return Ok(Err(StoreError::NotFound));
        };
        self.changed.push(*key);
        let flags = if meta.pinned {
            old.flags | FLAG_PINNED
        } else {
            old.flags
        };
        let (block, hdr, rec) = encode_meta(meta);
        if hdr != old.hdr {
            self.incref_block(hdr, &block)?;
        }
        self.conn
            .prepare_cached(
                "UPDATE obj SET hdr = ?2, atime = ?3, flags = ?4, rec = ?5 WHERE key = ?1",
            )?
            .execute(params![&key[..], hdr, self.now_min(), flags, rec])?;
        if hdr != old.hdr {
            self.decref_block(old.hdr)?;
        }
        Ok(Ok(()))
    }

    fn set_pinned(&mut self, key: &KeyHash, pinned: bool) -> Result<Applied, StoreError> {
        self.changed.push(*key);
        let n = self
            .conn
            .prepare_cached(
                "UPDATE obj SET flags = CASE WHEN ?2 THEN flags | ?3 ELSE flags & ~?3 END WHERE key = ?1",
            )?
            .execute(params![&key[..], pinned, FLAG_PINNED])?;
        Ok(if n == 0 {
            Err(StoreError::NotFound)
        } else {
            Ok(())
        })
    }

    fn remove(&mut self, key: &KeyHash) -> Result<bool, StoreError> {
        let Some(old) = self.brief(key)? else {
            return Ok(false);
        };
        self.changed.push(*key);
        self.conn
            .prepare_cached("DELETE FROM obj WHERE key = ?1")?
            .execute([&key[..]])?;
        let c = &self.shared.counters;
        c.objects.fetch_sub(1, Ordering::Relaxed);
        c.logical_bytes
            .fetch_sub(u64::from(old.len.unwrap_or(0)), Ordering::Relaxed);
        self.decref_blob(&old.body)?;
        self.decref_block(old.hdr)?;
        Ok(true)
    }

    /// A reader failed to serve `key`. If the writer agrees (same body,
    /// and it fails verification here too, or the row cannot be decoded),
    /// the body is marked bad and the key dropped; if not (compaction moved
    /// the body meanwhile, say) nothing happens.
    fn drop_corrupt(&mut self, key: &KeyHash, body: &BodyHash) -> Result<(), StoreError> {
        let Some(row) = index::get_row(&self.conn, key)? else {
            return Ok(());
        };
        if row.body != *body {
            return Ok(()); // replaced since
        }
        let meta_ok = super::Store::meta_of(&row).is_some();
        let body_ok = match row.loc {
            Some(loc) if loc.pack != BAD_PACK => {
                let good = self.read_blob(loc, body).is_some();
                if !good {
                    tracing::warn!(body = %super::hex(body), pack = loc.pack, "cache body corrupt on disk; marked bad");
                    self.mark_bad(body, loc)?;
                }
                good
            }
            _ => false,
        };
        if !(meta_ok && body_ok) {
            self.remove(key)?;
        }
        Ok(())
    }

    fn read_blob(&self, loc: Loc, hash: &BodyHash) -> Option<Bytes> {
        let f = u32::try_from(loc.pack)
            .ok()
            .and_then(|p| self.shared.packs.read().expect("lock").get(&p).cloned())?;
        read_record(&f, loc.off, loc.len, hash)
    }

    fn mark_bad(&mut self, hash: &BodyHash, loc: Loc) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("UPDATE blob SET pack = ?2 WHERE hash = ?1")?
            .execute(params![&hash[..], BAD_PACK])?;
        self.add_live(loc.pack, -((RECORD_HEADER as i64) + i64::from(loc.len)));
        Ok(())
    }

    fn incref_blob(&mut self, hash: &BodyHash, body: &[u8]) -> Result<(), StoreError> {
        match index::blob_loc(&self.conn, hash)? {
            Some(loc) if loc.pack != BAD_PACK => {
                self.conn
                    .prepare_cached("UPDATE blob SET refs = refs + 1 WHERE hash = ?1")?
                    .execute([&hash[..]])?;
            }
            Some(_) => {
                // Known bad: this put brings good bytes, so heal it.
                let (pack, off) = self.append(hash, body)?;
                self.conn
                    .prepare_cached(
                        "UPDATE blob SET pack = ?2, off = ?3, refs = refs + 1 WHERE hash = ?1",
                    )?
                    .execute(params![&hash[..], pack, off as i64])?;
                self.add_live(i64::from(pack), (RECORD_HEADER + body.len()) as i64);
            }
            None => {
                let (pack, off) = self.append(hash, body)?;
                self.conn
                    .prepare_cached(
                        "INSERT INTO blob(hash, pack, off, len, refs) VALUES (?1, ?2, ?3, ?4, 1)",
                    )?
                    .execute(params![&hash[..], pack, off as i64, body.len() as i64])?;
                self.shared
                    .counters
                    .stored_bytes
                    .fetch_add(body.len() as u64, Ordering::Relaxed);
                self.add_live(i64::from(pack), (RECORD_HEADER + body.len()) as i64);
            }
        }
        Ok(())
    }

    fn decref_blob(&mut self, hash: &BodyHash) -> rusqlite::Result<()> {
        let row = self
            .conn
            .prepare_cached("SELECT pack, len, refs FROM blob WHERE hash = ?1")?
            .query_row([&hash[..]], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .optional()?;
        let Some((pack, len, refs)) = row else {
            return Ok(());
        };
        if refs <= 1 {
            self.conn
                .prepare_cached("DELETE FROM blob WHERE hash = ?1")?
                .execute([&hash[..]])?;
            self.shared
                .counters
                .stored_bytes
                .fetch_sub(count(len), Ordering::Relaxed);
            if pack != BAD_PACK {
                self.add_live(pack, -(RECORD_HEADER as i64 + len));
            }
        } else {
            self.conn
                .prepare_cached("UPDATE blob SET refs = refs - 1 WHERE hash = ?1")?
                .execute([&hash[..]])?;
        }
        Ok(())
    }

    fn incref_block(&mut self, id: i64, block: &[u8]) -> rusqlite::Result<()> {
        if id == 0 {
            return Ok(());
        }
        self.conn
            .prepare_cached(
                "INSERT INTO hdr(id, refs, block) VALUES (?1, 1, ?2) ON CONFLICT(id) DO UPDATE SET refs = refs + 1",
            )?
            .execute(params![id, block])?;
        Ok(())
    }

    fn decref_block(&mut self, id: i64) -> rusqlite::Result<()> {
        if id == 0 {
            return Ok(());
        }
        self.conn
            .prepare_cached("UPDATE hdr SET refs = refs - 1 WHERE id = ?1")?
            .execute([id])?;
        self.conn
            .prepare_cached("DELETE FROM hdr WHERE id = ?1 AND refs <= 0")?
            .execute([id])?;
        Ok(())
    }

    // ---- eviction and compaction ----------------------------------------

    fn maintain(&mut self) {
        if let Err(e) = self.evict() {
            tracing::warn!(error = %e, "cache eviction failed");
        }
        let t0 = std::time::Instant::now();
        while t0.elapsed() < COMPACT_ROUND_BUDGET {
            match self.compact_step() {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cache compaction failed");
                    break;
                }
            }
        }
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64: eviction sampling needs spread, not secrecy.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn evict(&mut self) -> Result<(), StoreError> {
        let cap = self.shared.opts.max_bytes;
        if self.footprint() <= cap || self.projected() <= cap {
            return Ok(());
        }
        let evicted = self.transaction(false, |w| {
            let mut n = 0;
            let mut fruitless = 0;
            while n < MAX_EVICT_PER_ROUND && w.projected() > cap {
                match w.evict_one()? {
                    Some(true) => n += 1,
                    Some(false) => {}
                    None => {
                        fruitless += 1;
                        if fruitless >= FRUITLESS_ROUNDS {
                            if w.shared.counters.objects.load(Ordering::Relaxed) > 0 {
                                tracing::warn!(
                                    "cache above its cap but every sampled object is pinned"
                                );
                            }
                            break;
                        }
                    }
                }
            }
            Ok(n)
        })?;
        self.shared
            .counters
            .evicted
            .fetch_add(evicted as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Samples keys after a random point and evicts the least recently
    /// used unpinned one. `None` if the sample had none to evict.
    fn evict_one(&mut self) -> Result<Option<bool>, StoreError> {
        let mut start = [0u8; 16];
        start[..8].copy_from_slice(&self.next_rand().to_le_bytes());
        start[8..].copy_from_slice(&self.next_rand().to_le_bytes());
        let mut sample: Vec<(Vec<u8>, i64, i64)> = Vec::with_capacity(EVICTION_SAMPLES);
        {
            let mut st = self.conn.prepare_cached(
                "SELECT key, atime, flags FROM obj WHERE key >= ?1 ORDER BY key LIMIT ?2",
            )?;
            let rows = st.query_map(params![&start[..], EVICTION_SAMPLES as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            for r in rows {
                sample.push(r?);
            }
        }
        if sample.len() < EVICTION_SAMPLES {
            // Wrap around to the start of the key space.
            let mut st = self
                .conn
                .prepare_cached("SELECT key, atime, flags FROM obj ORDER BY key LIMIT ?1")?;
            let rows = st.query_map([(EVICTION_SAMPLES - sample.len()) as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            for r in rows {
                sample.push(r?);
            }
        }
        let best = sample
            .into_iter()
            .filter(|(_, _, flags)| (*flags as u8) & FLAG_PINNED == 0)
            .min_by_key(|(_, atime, _)| *atime);
        let Some((k, _, _)) = best else {
            return Ok(None);
        };
        let Ok(key) = <KeyHash>::try_from(&k[..]) else {
            return Ok(None);
        };
        Ok(Some(self.remove(&key)?))
    }

    /// The next pack to compact: any sealed pack under
    /// [`COMPACT_LIVE_RATIO`] live; above the cap, also any pack (sealing
    /// the active one) at least [`PRESSURE_COMPACT_RATIO`] dead. Most dead
    /// first.
    fn pick_victim(&mut self) -> std::io::Result<Option<u32>> {
        let active = self.active.as_ref().map(|a| a.id);
        let over = self.footprint() > self.shared.opts.max_bytes;
        let victim = self
            .packs
            .iter()
            .filter(|(id, _)| !self.skip.contains(id))
            .filter(|(id, p)| {
                let sealed = Some(**id) != active;
                (sealed && (p.live as f64) < (p.size as f64) * COMPACT_LIVE_RATIO)
                    || (over && p.worth_compacting_under_pressure())
            })
            .max_by_key(|(_, p)| p.dead())
            .map(|(id, _)| *id);
        if victim.is_some() && victim == active {
            self.new_pack()?;
        }
        Ok(victim)
    }

    /// One step of compaction; `true` if there may be more to do.
    fn compact_step(&mut self) -> Result<bool, StoreError> {
        if self.compacting.is_none() {
            let Some(id) = self.pick_victim()? else {
                return Ok(false);
            };
            let file = self.shared.packs.read().expect("lock").get(&id).cloned();
            let (Some(file), Some(p)) = (file, self.packs.get(&id).copied()) else {
                self.skip.insert(id);
                return Ok(true);
            };
            self.compacting = Some(Compaction {
                id,
                file,
                pos: PACK_MAGIC.len() as u64,
                size: p.size,
                fallback: false,
            });
        }
        let Some(mut c) = self.compacting.take() else {
            return Ok(false);
        };
        let id = c.id;
        let step = self.transaction(true, |w| w.compact_some(&mut c));
        match step {
            Ok(false) => {
                self.compacting = Some(c);
                Ok(true)
            }
            Ok(true) => {
                self.compacting = None;
                self.shared.packs.write().expect("lock").remove(&id);
                self.packs.remove(&id);
                let _ = std::fs::remove_file(pack_path(&self.dir, id));
                self.refresh_sizes();
                self.shared
                    .counters
                    .compactions
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(pack = id, "pack compacted");
                Ok(true)
            }
            Err(e) => {
                self.compacting = None;
                self.skip.insert(id);
                Err(e)
            }
        }
    }

    /// Moves the live records of the next stretch of `c`. `true` once the
    /// pack holds nothing live (its row is deleted in this transaction; the
    /// caller deletes the file after the commit).
    fn compact_some(&mut self, c: &mut Compaction) -> Result<bool, StoreError> {
        let live = |w: &Self| w.packs.get(&c.id).map_or(0, |p| p.live);
        let stop = c.pos.saturating_add(COMPACT_STEP_BYTES);
        let mut records = 0;
        // Stops early once nothing live is left: the rest is dead space.
        while live(self) > 0
            && !c.fallback
            && c.pos < c.size
            && c.pos < stop
            && records < COMPACT_STEP_RECORDS
        {
            records += 1;
            let mut head = [0u8; RECORD_HEADER];
            let tail = c.pos + RECORD_HEADER as u64 > c.size
                || c.file.read_exact_at(&mut head, c.pos).is_err();
            if tail {
                c.pos = c.size; // a torn tail: nothing indexed lives there
                break;
            }
            let len = u32::from_le_bytes(head[4..8].try_into().expect("4"));
            let end = c.pos + (RECORD_HEADER as u64) + u64::from(len);
            if &head[..4] != RECORD_MAGIC {
                c.fallback = true;
                break;
            }
            if end > c.size {
                c.pos = c.size;
                break;
            }
            let hash: BodyHash = head[8..RECORD_HEADER].try_into().expect("16");
            if let Some(loc) = index::blob_loc(&self.conn, &hash)? {
                if loc.pack == i64::from(c.id) && loc.off == c.pos && loc.len == len {
                    self.move_blob(&hash, loc, &c.file)?;
                }
            }
            c.pos = end;
        }
        let done = live(self) == 0 || c.fallback || c.pos >= c.size;
        if !done {
            return Ok(false);
        }
        if self.packs.get(&c.id).is_some_and(|p| p.live > 0) {
            // The scan met a malformed record, or the live count disagrees
            // with it: find the rest through the index (a full scan of the
            // blob table, so only in this rare case).
            let rest: Vec<(BodyHash, Loc)> = {
                let mut st = self
                    .conn
                    .prepare("SELECT hash, off, len FROM blob WHERE pack = ?1")?;
                let rows = st.query_map([c.id], |r| {
                    Ok((
                        hash16(r.get(0)?)?,
                        Loc {
                            pack: i64::from(c.id),
                            off: r.get::<_, i64>(1)? as u64,
                            len: r.get::<_, i64>(2)? as u32,
                        },
                    ))
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for (hash, loc) in rest {
                self.move_blob(&hash, loc, &c.file)?;
            }
        }
        self.conn
            .prepare_cached("DELETE FROM pack WHERE id = ?1")?
            .execute([c.id])?;
        self.dirty.remove(&c.id);
        Ok(true)
    }

    fn move_blob(&mut self, hash: &BodyHash, loc: Loc, file: &File) -> Result<(), StoreError> {
        match read_record(file, loc.off, loc.len, hash) {
            Some(body) => {
                let (pack, off) = self.append(hash, &body)?;
                self.conn
                    .prepare_cached("UPDATE blob SET pack = ?2, off = ?3 WHERE hash = ?1")?
                    .execute(params![&hash[..], pack, off as i64])?;
                let rec = (RECORD_HEADER + body.len()) as i64;
                self.add_live(loc.pack, -rec);
                self.add_live(i64::from(pack), rec);
            }
            None => {
                tracing::warn!(body = %super::hex(hash), pack = loc.pack, "cache body corrupt during compaction; marked bad");
                self.mark_bad(hash, loc)?;
            }
        }
        Ok(())
    }

    // ---- check -----------------------------------------------------------

    fn check(&mut self, verify_bodies: bool) -> Result<CheckReport, StoreError> {
        self.transaction(true, |w| w.check_inner(verify_bodies))
    }

    fn check_inner(&mut self, verify_bodies: bool) -> Result<CheckReport, StoreError> {
        struct BlobRow {
            pack: i64,
            off: u64,
            len: u32,
            refs: i64,
        }
        // Compare with what the index says, not with memory.
        self.reload()?;
        let mut report = CheckReport::default();
        let mut blobs: HashMap<BodyHash, BlobRow> = HashMap::new();
        {
            let mut st = self
                .conn
                .prepare("SELECT hash, pack, off, len, refs FROM blob")?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                blobs.insert(
                    hash16(r.get(0)?)?,
                    BlobRow {
                        pack: r.get(1)?,
                        off: r.get::<_, i64>(2)? as u64,
                        len: r.get::<_, i64>(3)? as u32,
                        refs: r.get(4)?,
                    },
                );
            }
        }
        let mut hdrs: HashMap<i64, i64> = HashMap::new();
        {
            let mut st = self.conn.prepare("SELECT id, refs FROM hdr")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            for r in rows {
                let (id, refs) = r?;
                hdrs.insert(id, refs);
            }
        }
        // Bodies whose pack is gone are lost.
        for (hash, b) in blobs.iter_mut() {
            if b.pack != BAD_PACK
                && u32::try_from(b.pack).map_or(true, |p| !self.packs.contains_key(&p))
            {
                b.pack = BAD_PACK;
                report.corrupt_bodies += 1;
                self.conn
                    .prepare_cached("UPDATE blob SET pack = ?2 WHERE hash = ?1")?
                    .execute(params![&hash[..], BAD_PACK])?;
            }
        }
        if verify_bodies {
            let hashes: Vec<BodyHash> = blobs.keys().copied().collect();
            for hash in hashes {
                let b = &blobs[&hash];
                if b.pack == BAD_PACK {
                    continue;
                }
                let loc = Loc {
                    pack: b.pack,
                    off: b.off,
                    len: b.len,
                };
                report.bodies_verified += 1;
                if self.read_blob(loc, &hash).is_none() {
                    report.corrupt_bodies += 1;
                    self.conn
                        .prepare_cached("UPDATE blob SET pack = ?2 WHERE hash = ?1")?
                        .execute(params![&hash[..], BAD_PACK])?;
                    if let Some(b) = blobs.get_mut(&hash) {
                        b.pack = BAD_PACK;
                    }
                }
            }
        }
        // Count references from the object rows; drop rows that point at
        // nothing (or, when verifying, at a bad body).
        let mut body_refs: HashMap<BodyHash, i64> = HashMap::new();
        let mut hdr_refs: HashMap<i64, i64> = HashMap::new();
        let mut drop: Vec<Vec<u8>> = Vec::new();
        let (mut objects, mut logical) = (0u64, 0u64);
        {
            let mut st = self.conn.prepare("SELECT key, body, hdr, rec FROM obj")?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let key: Vec<u8> = r.get(0)?;
                let body: Vec<u8> = r.get(1)?;
                let hdr: i64 = r.get(2)?;
                let rec: Vec<u8> = r.get(3)?;
                let blob = <BodyHash>::try_from(&body[..])
                    .ok()
                    .and_then(|h| blobs.get(&h).map(|b| (h, b)));
                let ok_hdr = hdr == 0 || hdrs.contains_key(&hdr);
                let ok_rec = MetaRecord::decode(&rec).is_ok();
                match blob {
                    Some((h, b)) if ok_hdr && ok_rec && !(verify_bodies && b.pack == BAD_PACK) => {
                        *body_refs.entry(h).or_default() += 1;
                        if hdr != 0 {
                            *hdr_refs.entry(hdr).or_default() += 1;
                        }
                        objects += 1;
                        logical += u64::from(b.len);
                    }
                    _ => drop.push(key),
                }
            }
        }
        for key in &drop {
            if let Ok(k) = <KeyHash>::try_from(&key[..]) {
                self.changed.push(k);
            }
            self.conn
                .prepare_cached("DELETE FROM obj WHERE key = ?1")?
                .execute([key])?;
        }
        report.dangling_removed = drop.len() as u64;
        let mut stored = 0u64;
        let mut live: HashMap<u32, u64> = HashMap::new();
        for (hash, b) in &blobs {
            let n = body_refs.get(hash).copied().unwrap_or(0);
            if n == 0 {
                report.orphans_removed += 1;
                self.conn
                    .prepare_cached("DELETE FROM blob WHERE hash = ?1")?
                    .execute([&hash[..]])?;
                continue;
            }
            if n != b.refs {
                report.refs_fixed += 1;
                self.conn
                    .prepare_cached("UPDATE blob SET refs = ?2 WHERE hash = ?1")?
                    .execute(params![&hash[..], n])?;
            }
            stored += u64::from(b.len);
            if let Ok(p) = u32::try_from(b.pack) {
                *live.entry(p).or_default() += (RECORD_HEADER as u64) + u64::from(b.len);
            }
        }
        for (id, refs) in &hdrs {
            let n = hdr_refs.get(id).copied().unwrap_or(0);
            if n == 0 {
                report.orphans_removed += 1;
                self.conn
                    .prepare_cached("DELETE FROM hdr WHERE id = ?1")?
                    .execute([id])?;
            } else if n != *refs {
                report.header_refs_fixed += 1;
                self.conn
                    .prepare_cached("UPDATE hdr SET refs = ?2 WHERE id = ?1")?
                    .execute(params![id, n])?;
            }
        }
        let c = &self.shared.counters;
        report.counters_fixed = c.objects.load(Ordering::Relaxed) != objects
            || c.logical_bytes.load(Ordering::Relaxed) != logical
            || c.stored_bytes.load(Ordering::Relaxed) != stored
            || self
                .packs
                .iter()
                .any(|(id, p)| p.live != live.get(id).copied().unwrap_or(0));
        c.objects.store(objects, Ordering::Relaxed);
        c.logical_bytes.store(logical, Ordering::Relaxed);
        c.stored_bytes.store(stored, Ordering::Relaxed);
        let ids: Vec<u32> = self.packs.keys().copied().collect();
        for id in ids {
            let l = live.get(&id).copied().unwrap_or(0);
            if let Some(p) = self.packs.get_mut(&id) {
                p.live = l;
            }
            self.dirty.insert(id);
        }
        report.objects = objects;
        report.bodies = body_refs.len() as u64;
        Ok(report)
    }
}
