//! The SQLite index: schema, connection setup, and the readers' pool.
//!
//! Only this module and the writer know SQL. Tables (all keyed by fixed-size
//! hashes, so `WITHOUT ROWID` B-trees hold each row once):
//! - `obj`: key hash → body hash, header block id, last access (Unix
//!   minutes), flags, [`MetaRecord`](super::codec::MetaRecord);
//! - `blob`: body hash → pack, offset, length, reference count (`pack` is
//!   [`BAD_PACK`] once the body was found corrupt on disk);
//! - `hdr`: header block id → reference count, header text;
//! - `vary`: primary key hash → the `Vary` field names of that URI;
//! - `pack`: pack id → live record bytes (so open needs no scan);
//! - `meta`: format version and the persisted counters.
//!
//! Every change to these tables happens in one writer transaction per
//! group commit, so reference counts, counters and rows never disagree
//! after a crash.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::codec::{BodyHash, HASH_LEN};
use super::KeyHash;

/// Version of the index schema, kept in `meta.format`.
pub(super) const INDEX_FORMAT: i64 = 1;

/// `blob.pack` of a body found corrupt: kept (so its references still
/// count) but never read; the next put of the same body rewrites it.
pub(super) const BAD_PACK: i64 = -1;

/// Idle reader connections kept. Each costs its page cache; hits take one,
/// so this bounds parallel hits that avoid opening a connection (opening
/// costs ~100 µs, once).
pub(super) const READER_POOL: usize = 8;

/// How long a reader waits on SQLite's own locks (only the WAL reset after
/// a checkpoint takes one briefly). A hit that waits longer is a miss.
const READER_BUSY: Duration = Duration::from_millis(200);

/// How long the writer waits on SQLite's locks (readers never block it in
/// WAL mode except around checkpoints).
const WRITER_BUSY: Duration = Duration::from_secs(5);

/// WAL pages between automatic checkpoints (SQLite's default, 4 MiB).
const WAL_AUTOCHECKPOINT_PAGES: i64 = 1000;

/// The WAL file is truncated back to this after a checkpoint, so it never
/// holds more than a few checkpoints' worth of disk.
const WAL_LIMIT_BYTES: i64 = 8 * 1024 * 1024;

/// Memory-mapped reads of the index: hits then read B-tree pages straight
/// from the OS page cache instead of copying them into each connection's
/// cache. Covers the index of a few million objects; beyond it SQLite
/// falls back to ordinary reads.
const MMAP_BYTES: i64 = 1 << 30;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS obj(
    key BLOB PRIMARY KEY,
    body BLOB NOT NULL,
    hdr INTEGER NOT NULL,
    atime INTEGER NOT NULL,
    flags INTEGER NOT NULL,
    rec BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blob(
    hash BLOB PRIMARY KEY,
    pack INTEGER NOT NULL,
    off INTEGER NOT NULL,
    len INTEGER NOT NULL,
    refs INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hdr(id INTEGER PRIMARY KEY, refs INTEGER NOT NULL, block BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS vary(key BLOB PRIMARY KEY, fields TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pack(id INTEGER PRIMARY KEY, live INTEGER NOT NULL);
";

/// Everything a hit needs, in one statement (one consistent snapshot).
pub(super) const SQL_GET: &str =
    "SELECT o.body, o.hdr, o.atime, o.flags, o.rec, b.pack, b.off, b.len, h.block \
     FROM obj o LEFT JOIN blob b ON b.hash = o.body LEFT JOIN hdr h ON o.hdr != 0 AND h.id = o.hdr \
     WHERE o.key = ?1";

/// Where a body lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    /// Pack id, or [`BAD_PACK`].
    pub pack: i64,
    /// Offset of the record (header included).
    pub off: u64,
    /// Body length.
    pub len: u32,
}

/// An `obj` row joined with its body location and header block.
#[derive(Debug, Clone)]
pub(super) struct ObjRow {
    pub body: BodyHash,
    pub hdr: i64,
    pub atime: u32,
    pub flags: u8,
    pub rec: Vec<u8>,
    /// `None` if the blob row is missing (never, unless the index was
    /// damaged outside the store).
    pub loc: Option<Loc>,
    /// `None` for `hdr == 0` or a missing block.
    pub block: Option<Vec<u8>>,
}

pub(super) fn hash16(v: Vec<u8>) -> rusqlite::Result<[u8; HASH_LEN]> {
    <[u8; HASH_LEN]>::try_from(v.as_slice()).map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            "hash of the wrong length".into(),
        )
    })
}

pub(super) fn get_row(conn: &Connection, key: &KeyHash) -> rusqlite::Result<Option<ObjRow>> {
    conn.prepare_cached(SQL_GET)?
        .query_row([&key[..]], |r| {
            let pack: Option<i64> = r.get(5)?;
            Ok(ObjRow {
                body: hash16(r.get(0)?)?,
                hdr: r.get(1)?,
                atime: r.get::<_, i64>(2)?.clamp(0, i64::from(u32::MAX)) as u32,
                flags: r.get::<_, i64>(3)? as u8,
                rec: r.get(4)?,
                loc: match pack {
                    Some(pack) => Some(Loc {
                        pack,
                        off: r.get::<_, i64>(6)? as u64,
                        len: r.get::<_, i64>(7)? as u32,
                    }),
                    None => None,
                },
                block: r.get(8)?,
            })
        })
        .optional()
}

pub(super) fn blob_loc(conn: &Connection, hash: &BodyHash) -> rusqlite::Result<Option<Loc>> {
    conn.prepare_cached("SELECT pack, off, len FROM blob WHERE hash = ?1")?
        .query_row([&hash[..]], |r| {
            Ok(Loc {
                pack: r.get(0)?,
                off: r.get::<_, i64>(1)? as u64,
                len: r.get::<_, i64>(2)? as u32,
            })
        })
        .optional()
}

/// Path of the database inside the cache directory.
pub(super) fn db_path(dir: &Path) -> PathBuf {
    dir.join("index").join("cache.db")
}

/// Opens the writer's connection and creates the schema.
pub(super) fn open_writer(
    path: &Path,
    cache_bytes: u64,
    sync: bool,
) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(WRITER_BUSY)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode stayed {mode}"
        )));
    }
    conn.pragma_update(None, "synchronous", if sync { "FULL" } else { "OFF" })?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
    conn.pragma_update(None, "journal_size_limit", WAL_LIMIT_BYTES)?;
    conn.pragma_update(
        None,
        "cache_size",
        -((cache_bytes / 2 / 1024).max(256) as i64),
    )?;
    conn.pragma_update(None, "mmap_size", MMAP_BYTES)?;
    conn.set_prepared_statement_cache_capacity(64);
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// A pool of read-only connections for the hit path. A caller takes one
/// out under the mutex, uses it without any lock, and puts it back: no lock
/// is held across I/O.
pub(super) struct Readers {
    path: PathBuf,
    /// Page cache per connection, KiB.
    cache_kib: i64,
    pool: Mutex<Vec<Connection>>,
}

impl Readers {
    pub(super) fn new(path: PathBuf, cache_bytes: u64) -> Readers {
        Readers {
            path,
            cache_kib: (cache_bytes / 2 / READER_POOL as u64 / 1024).max(256) as i64,
            pool: Mutex::new(Vec::new()),
        }
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(READER_BUSY)?;
        conn.pragma_update(None, "query_only", true)?;
        conn.pragma_update(None, "cache_size", -self.cache_kib)?;
        conn.pragma_update(None, "mmap_size", MMAP_BYTES)?;
        Ok(conn)
    }

    /// Runs `f` on a pooled connection.
    pub(super) fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let pooled = self.pool.lock().expect("lock").pop();
        let conn = match pooled {
            Some(c) => c,
            None => self.open()?,
        };
        let r = f(&conn);
        let mut pool = self.pool.lock().expect("lock");
        if pool.len() < READER_POOL {
            pool.push(conn);
        }
        r
    }
}
