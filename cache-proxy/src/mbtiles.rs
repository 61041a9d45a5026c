//! MBTiles (and PMTiles) import and MBTiles export: preloading a rack
//! before it ships, and handing a region to a field laptop or phone.
//!
//! [MBTiles 1.3] is SQLite with a `metadata(name, value)` table and
//! `tiles(zoom_level, tile_column, tile_row, tile_data)`, rows in TMS order
//! (`tile_row = 2^z - 1 - y`); `tiles` is often a view over `map` and
//! `images` tables that store identical images once.
//!
//! **Import** ([`import`]) reads either layout (a `tiles` table or view; or,
//! lacking `tiles`, the `map` ⋈ `images` join), streaming rows from a
//! blocking reader thread through a bounded queue ([`IMPORT_QUEUE`]), never
//! holding the file in memory. Each tile goes into the object store under
//! the same key a fetched tile has ([`crate::tiles::cache_key`]), so
//! `/tiles/{source}/{z}/{x}/{y}.{ext}` serves it exactly like a fetched one,
//! online or offline, as a 200 with:
//! - `Content-Type`: the source format's ([`TileFormat::content_type`]);
//! - `Content-Encoding: gzip` for gzip-compressed vector tiles (MBTiles
//!   stores `pbf` tiles gzipped; the bytes are stored as given);
//! - `Cache-Control: public, max-age=86400, s-maxage=2147483648`: fresh for
//!   this cache forever (RFC 9111 caps delta-seconds at 2^31), so it is never
//!   refetched over the satellite link; clients re-check daily;
//! - an `ETag` derived from the body (`"mb-"` + 64 bits of BLAKE3, hex), so
//!   clients revalidate with a 304 and a re-run of the import can tell an
//!   identical tile is already stored without reading it;
//! - `Date`: the import time.
//!
//! Imported tiles are *pinned* (never evicted). Identical bodies are stored
//! once (the store deduplicates by content). Every store write is durable
//! when acknowledged, so a killed import loses nothing it stored, and
//! re-running it resumes cheaply: a tile already stored pinned with the same
//! ETag costs one index lookup and no write. Tiles outside the source's zoom
//! range, with impossible coordinates, or whose bytes are not of the
//! source's format (a PNG source only takes PNG signatures; a `pbf` source
//! takes gzip data, an empty tile, or a raw tile starting with the layer tag
//! `0x1a`) are skipped and counted. Imported tiles are not replicated to
//! other racks (the [`crate::mesh::Replicator`] is for backhaul fetches);
//! peers still find them through the digest.
//!
//! The file's `metadata.format` must name the source's format (`png`, `jpg`
//! or `jpeg`, `webp`, `pbf` or `mvt`, or the media type), or the import is
//! refused; a file without `format` (MBTiles 1.0/1.1) is judged by its first
//! tile's signature. For vector sources the file's `json` metadata (layer
//! list) is kept in the store (key `mbtiles-json:{source}`) for export.
//!
//! **Export** ([`export`]) writes every cached tile of a source in a bounding
//! box and zoom range to a new MBTiles 1.3 file in the *deduplicated*
//! layout: `images(tile_data, tile_id)` holding each distinct body once
//! (`tile_id` = 128 bits of BLAKE3, hex), `map(zoom_level, tile_column,
//! tile_row, tile_id)`, a `tiles` view joining them, and `metadata` with
//! `name`, `format`, `bounds`, `center`, `minzoom`, `maxzoom` (of the tiles
//! actually written), `attribution`, `type`, `description`, and `json` for
//! vector sources. The file is built as `{out}.partial` and renamed onto
//! `out` only once complete and fsynced, so a crash or cancellation never
//! leaves a half file at `out`. Tiles are exported with the bytes stored;
//! a vector tile stored without compression is exported uncompressed
//! (readers detect gzip by its signature), and one stored with another
//! content coding (`br`...) is skipped and counted.
//!
//! **PMTiles**: [`import`] also takes a PMTiles v3 archive, recognised by
//! its first bytes (`PMTiles`, version 3) whatever the file is called. The
//! archive is validated whole first ([`crate::pmtiles::Archive::validate`]:
//! every directory walked, every entry inside its section, tile ids in
//! order, the header's counts right), so a truncated or lying archive is
//! refused ([`ImportError::Pmtiles`]) before anything is stored. The
//! header's tile type stands for `metadata.format` (unknown: the first
//! tile's signature); tile compression `none` or `gzip` (a gzipped tile is
//! stored only if its gzip stream inflates completely); each tile of a run
//! is stored under its own key (the store keeps the body once), and the
//! parts of runs outside the source's zooms are counted as skipped without
//! being walked. `total` and `read` count addressed tiles. A vector
//! archive's `vector_layers` metadata is kept like MBTiles' `json`.
//!
//! **Budgets and untrusted files.** A tile file comes from outside the
//! rack and is read by the agent, so it is never allowed to run work of its
//! own or to cost more than a bound:
//! - MBTiles is opened read-only with SQLite's defensive settings
//!   (`SQLITE_DBCONFIG_DEFENSIVE`, `trusted_schema = OFF`,
//!   `query_only = ON`) and no string or blob over [`MAX_SQL_VALUE_BYTES`].
//!   Only plain tables are read: a file with a trigger, or whose `metadata`
//!   is a view or a virtual table, is refused ([`ImportError::UnsafeSchema`]);
//!   a `tiles` *view* is read through the `map` and `images` tables it
//!   stands for (the deduplicated layout, [`export`]'s own), never through
//!   its own SQL, and refused when those tables are not there. So no query
//!   the file defines is ever run (a recursive view cannot run forever).
//! - `metadata`: at most [`MAX_METADATA_ROWS`] rows and
//!   [`MAX_METADATA_BYTES`] bytes; tiles: at most [`MAX_IMPORT_TILES`] rows
//!   (PMTiles: addressed tiles, [`crate::pmtiles::MAX_ADDRESSED_TILES`],
//!   with the archive's own budgets on directories).
//! - A gzipped tile is inflated to check it (into nothing; the bytes are
//!   stored as given) up to [`MAX_GZIP_RATIO`] times its size (at least
//!   [`GZIP_RATIO_FLOOR`], at most [`MAX_INFLATED_TILE`]); one that inflates
//!   further refuses the import ([`ImportError::GzipBomb`]); a broken stream
//!   is counted invalid and skipped.
//!
//! **Cancellation and roll-back.** [`import_cancellable`] stops when its
//! token fires (the API fires it when the client that started the import
//! goes away, and at shutdown): the reader thread is stopped at its next
//! row or directory and an SQLite statement in progress is interrupted.
//! An import that does not complete (cancelled, refused mid-way by a
//! budget, a read or store failure) removes every tile *this run* stored
//! (their keys are journalled in an anonymous temp file, 16 bytes each),
//! so it leaves the store as it found it, except that a tile it had
//! replaced is gone rather than restored (the proxy fetches it again). Only
//! a crash, or dropping the future, leaves what was acknowledged; a re-run
//! completes it.
//!
//! [MBTiles 1.3]: https://github.com/mapbox/mbtiles-spec/blob/master/1.3/spec.md

use std::collections::HashMap;
use std::io::{BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hyper::header::{self, HeaderMap, HeaderValue};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{TileFormat, TileSource};
use crate::engine::Engine;
use crate::http_cache::fmt_date;
use crate::pmtiles::{self, Archive, PmtilesError, TileType};
use crate::store::{key_hash, KeyHash, ObjectMeta, StoreError, MAX_OBJECT_BYTES};
use crate::tiles::{self, BBox, TileId, MAX_ZOOM};
use crate::ProxyHandle;

/// Tiles read ahead of the store by the reader thread: enough to keep the
/// store's group commit fed while the reader waits on the disk.
pub const IMPORT_QUEUE: usize = 256;
/// Store writes awaiting acknowledgement at once. The store acknowledges in
/// group commits of up to [`crate::store::MAX_BATCH`] writes with one fsync;
/// awaiting each write in turn would cost an fsync per tile.
pub const IMPORT_IN_FLIGHT: usize = 256;
/// Body bytes in those writes at once, so a file of large tiles cannot hold
/// gigabytes in memory.
pub const IMPORT_IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;
/// Tiles queued from the store to the export writer thread.
pub const EXPORT_QUEUE: usize = 256;
/// Largest tile count an export may walk: about a country at zoom 16. Each
/// tile of the plan costs an index lookup whether or not it is cached.
pub const MAX_EXPORT_TILES: u64 = 64 * 1024 * 1024;
/// Freshness of an imported tile for this cache (`s-maxage`): 2^31 s, the
/// largest delta-seconds RFC 9111 §1.2.2 asks caches to honour; "forever".
pub const IMPORTED_S_MAXAGE: u64 = 2_147_483_648;
/// Freshness of an imported tile for the client (`max-age`): a day, so a
/// phone re-checks (and gets a 304) once a day instead of every view.
pub const IMPORTED_CLIENT_MAX_AGE: u64 = 86_400;
/// `metadata` rows read at most (a sane file has a dozen); more refuse the
/// file.
pub const MAX_METADATA_ROWS: usize = 1024;
/// `metadata` bytes (names and values) read at most: the largest value a
/// sane file has is the vector layer list, tens of kilobytes.
pub const MAX_METADATA_BYTES: usize = 16 * 1024 * 1024;
/// Tile rows an MBTiles import reads at most, the same budget as the tiles
/// a PMTiles archive may address (each becomes a pinned object).
pub const MAX_IMPORT_TILES: u64 = pmtiles::MAX_ADDRESSED_TILES;
/// Largest string or blob SQLite may produce while reading an MBTiles file
/// (`SQLITE_LIMIT_LENGTH`): a stored object's limit and a little, so no
/// value, however computed, allocates gigabytes.
pub const MAX_SQL_VALUE_BYTES: usize = MAX_OBJECT_BYTES + 64 * 1024;
/// A gzipped tile may inflate to this many times its size: vector tiles
/// compress 3–10×; a stream inflating further is built to.
pub const MAX_GZIP_RATIO: u64 = 64;
/// Inflated bytes always allowed, whatever the ratio (a tiny tile of a few
/// repeated features compresses well).
pub const GZIP_RATIO_FLOOR: u64 = 64 * 1024;
/// Inflated bytes never exceeded: a vector tile over a few megabytes is
/// unusable by any client.
pub const MAX_INFLATED_TILE: u64 = 32 * 1024 * 1024;
/// Rows or tiles between two checks of the cancellation flag by the reader
/// thread (an SQLite step in progress is interrupted at once anyway).
const CANCEL_CHECK_EVERY: u64 = 64;
/// Stored tiles removed at once when an import rolls back.
const ROLLBACK_IN_FLIGHT: usize = 256;
/// Store key prefix of a vector source's `json` metadata.
pub const JSON_KEY_PREFIX: &str = "mbtiles-json:";

/// Why an import was refused or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// No such tile source is configured.
    #[error("no tile source named {0:?}")]
    UnknownSource(String),
    /// The file cannot be opened or read.
    #[error("cannot read {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is neither an SQLite database nor a PMTiles archive.
    #[error("{path} is not an MBTiles or PMTiles file: not an SQLite database, no PMTiles magic")]
    NotSqlite {
        /// The file.
        path: PathBuf,
    },
    /// The file starts like a PMTiles archive but cannot be imported:
    /// another version, truncated, inconsistent, or compressed in a way not
    /// supported. Checked before anything is stored.
    #[error("{path} is not a usable PMTiles v3 archive: {source}")]
    Pmtiles {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: PmtilesError,
    },
    /// A required table (or view) is missing.
    #[error("{path} is not an MBTiles file: no {table:?} table or view")]
    MissingTable {
        /// The file.
        path: PathBuf,
        /// `metadata` or `tiles`.
        table: &'static str,
    },
    /// A required column is missing.
    #[error("{path} is not an MBTiles file: {table:?} has no {column:?} column")]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The table.
        table: &'static str,
        /// The column.
        column: &'static str,
    },
    /// `metadata.format` names no format we know.
    #[error("{path}: unknown tile format {format:?} in metadata (expected png, jpg, webp or pbf)")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// What the file says (or why it could not be told).
        format: String,
    },
    /// The file's tiles are not in the source's format.
    #[error(
        "{path} holds {file} tiles but tile source {source_name:?} serves {expected}; refusing to import"
    )]
    WrongFormat {
        /// The file.
        path: PathBuf,
        /// The file's format.
        file: String,
        /// The source.
        source_name: String,
        /// The source's format.
        expected: &'static str,
    },
    /// SQLite failed while reading (a corrupt page, an I/O error).
    #[error("reading {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: rusqlite::Error,
    },
    /// The store refused a write (disk full...). The tiles this run had
    /// stored are removed; re-run the import once fixed.
    #[error("storing tiles: {0}")]
    Store(#[from] StoreError),
    /// The file's schema would make SQLite run something of the file's own
    /// (a trigger, a view, a virtual table) where a plain table is read.
    #[error("{path}: refusing an MBTiles file whose {what}; only plain tables are read")]
    UnsafeSchema {
        /// The file.
        path: PathBuf,
        /// What is wrong, e.g. "`metadata` is a view".
        what: String,
    },
    /// The file is larger than an import may be.
    #[error("{path} exceeds the import budget: {what} over {max}")]
    Budget {
        /// The file.
        path: PathBuf,
        /// `tile rows`, `metadata rows`, `metadata bytes`.
        what: &'static str,
        /// The budget.
        max: u64,
    },
    /// A gzipped tile inflates past its bound (see [`MAX_GZIP_RATIO`]).
    #[error(
        "{path}: tile {z}/{x}/{y} is a gzip bomb ({compressed} bytes inflate past {limit}); refusing the import"
    )]
    GzipBomb {
        /// The file.
        path: PathBuf,
        /// Zoom.
        z: u8,
        /// Column.
        x: u32,
        /// Row (XYZ).
        y: u32,
        /// The tile's bytes.
        compressed: u64,
        /// The bound it passed.
        limit: u64,
    },
    /// The import was cancelled (its client went away, or the agent is
    /// shutting down); what it had stored was removed.
    #[error("the import was cancelled; the tiles it had stored were removed")]
    Cancelled,
    /// Writing the roll-back journal failed.
    #[error("writing the import's roll-back journal: {0}")]
    Journal(std::io::Error),
}

/// Why an export was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// No such tile source is configured.
    #[error("no tile source named {0:?}")]
    UnknownSource(String),
    /// The zoom range is empty or outside the source's.
    #[error(
        "zoom {min}-{max} is outside tile source {source_name:?}'s range {source_min}-{source_max}"
    )]
    Zoom {
        /// Requested lowest zoom.
        min: u8,
        /// Requested highest zoom.
        max: u8,
        /// The source.
        source_name: String,
        /// Its lowest zoom.
        source_min: u8,
        /// Its highest zoom.
        source_max: u8,
    },
    /// The region has more tiles than [`MAX_EXPORT_TILES`].
    #[error("the region has {0} tiles at those zooms, more than the {MAX_EXPORT_TILES} an export may walk; split it")]
    TooLarge(u64),
    /// Writing the file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// SQLite failed while writing.
    #[error("writing {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: rusqlite::Error,
    },
    /// The export was cancelled; the partial file was removed.
    #[error("the export was cancelled; nothing was written")]
    Cancelled,
}

/// Import progress, and the final report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImportReport {
    /// Rows in the file's `tiles` (PMTiles: tiles addressed).
    pub total: u64,
    /// Rows read so far.
    pub read: u64,
    /// Tiles stored (acknowledged durable) by this run.
    pub tiles: u64,
    /// Body bytes of those tiles (before deduplication).
    pub bytes: u64,
    /// Tiles already stored, pinned and identical (a resumed import).
    pub unchanged: u64,
    /// Tiles outside the source's zoom range.
    pub skipped: u64,
    /// Rows with impossible coordinates, no data, or data not of the
    /// source's format.
    pub invalid: u64,
}

/// Export progress, and the final report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExportReport {
    /// Tiles in the plan (bounding box × zooms).
    pub total: u64,
    /// Tiles of the plan looked up so far.
    pub done: u64,
    /// Tiles written (cached ones).
    pub tiles: u64,
    /// Body bytes of those tiles (before deduplication).
    pub bytes: u64,
    /// Distinct bodies written (set in the final report only).
    pub unique: u64,
    /// Cached tiles not exportable (a content coding other than gzip).
    pub skipped: u64,
}

/// An export job.
#[derive(Debug, Clone)]
pub struct ExportPlan {
    /// Tile source name.
    pub source: String,
    /// Region.
    pub bbox: BBox,
    /// Lowest zoom.
    pub min_zoom: u8,
    /// Highest zoom.
    pub max_zoom: u8,
}

impl ExportPlan {
    /// Tiles the plan walks.
    pub fn count(&self) -> u64 {
        tiles::tile_count(&self.bbox, self.min_zoom..=self.max_zoom)
    }
}

fn find_source<'a>(engine: &'a Engine, name: &str) -> Option<&'a TileSource> {
    engine.sources.iter().find(|s| s.name == name)
}

/// Parses `metadata.format` (the spec's names, common variants and media
/// types).
fn parse_format(s: &str) -> Option<TileFormat> {
    match s.trim().to_ascii_lowercase().as_str() {
        "png" | "image/png" => Some(TileFormat::Png),
        "jpg" | "jpeg" | "image/jpeg" | "image/jpg" => Some(TileFormat::Jpg),
        "webp" | "image/webp" => Some(TileFormat::Webp),
        "pbf" | "mvt" | "application/x-protobuf" | "application/vnd.mapbox-vector-tile" => {
            Some(TileFormat::Pbf)
        }
        _ => None,
    }
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];

/// The format a tile's bytes announce, if any.
fn sniff(data: &[u8]) -> Option<TileFormat> {
    if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(TileFormat::Png)
    } else if data.starts_with(&[0xff, 0xd8, 0xff]) {
        Some(TileFormat::Jpg)
    } else if data.len() >= 12 && &data[..4] == b"RIFF" && &data[8..12] == b"WEBP" {
        Some(TileFormat::Webp)
    } else if data.is_empty() || data.starts_with(GZIP_MAGIC) || data[0] == 0x1a {
        Some(TileFormat::Pbf)
    } else {
        None
    }
}

/// What the reader thread found out before streaming.
struct FileInfo {
    /// `metadata.format`, or a description of the first tile.
    format_text: String,
    format: Option<TileFormat>,
    /// `metadata.json`.
    json: Option<String>,
    total: u64,
}

/// One row (or a run of PMTiles tiles), as the reader judged it.
enum Item {
    Tile(TileId, Bytes),
    /// This many tiles outside the source's zoom range.
    OutOfRange(u64),
    /// This many tiles with impossible coordinates or bytes not of the format.
    Invalid(u64),
    Failed(ImportError),
}

const TILES_QUERY: &str = "SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles";
const JOIN_QUERY: &str = "SELECT map.zoom_level, map.tile_column, map.tile_row, images.tile_data \
     FROM map JOIN images ON images.tile_id = map.tile_id";

fn columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut st = conn.prepare(&format!("PRAGMA table_info(\"{table}\")"))?;
    let names = st
        .query_map([], |r| r.get::<_, String>(1))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(names)
}

/// How [`open_mbtiles`] names a plain table.
const TABLE: &str = "a table";
/// `sqlite_master` rows looked at: an MBTiles file has a handful.
const MAX_SCHEMA_OBJECTS: usize = 10_000;

/// SQLite's defences against a hostile database file: no schema-defined
/// functions run with privileges, no writes of any kind, no huge values.
fn harden(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::config::DbConfig;
    use rusqlite::limits::Limit;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    conn.execute_batch("PRAGMA trusted_schema = OFF; PRAGMA query_only = ON;")?;
    conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, MAX_SQL_VALUE_BYTES as i32);
    Ok(())
}

/// How the reader thread is told to stop: a flag it checks between rows,
/// directories and tiles, and the interrupt handle of its SQLite
/// connection, for a statement in progress.
#[derive(Default)]
struct Stop {
    flag: Arc<AtomicBool>,
    sqlite: Mutex<Option<rusqlite::InterruptHandle>>,
}

impl Stop {
    fn fire(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Some(h) = self
            .sqlite
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            h.interrupt();
        }
    }

    fn fired(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn set_sqlite(&self, h: rusqlite::InterruptHandle) {
        *self.sqlite.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        // Fired before the handle was there: interrupt now.
        if self.fired() {
            self.fire();
        }
    }

    /// An SQLite error, or [`ImportError::Cancelled`] if it came from
    /// being interrupted.
    fn error(&self, path: &Path, source: rusqlite::Error) -> ImportError {
        if self.fired() {
            ImportError::Cancelled
        } else {
            ImportError::Sqlite {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Fires a [`Stop`] when dropped: an import future dropped mid-way stops
/// its reader thread too.
struct FireOnDrop(Arc<Stop>);

impl Drop for FireOnDrop {
    fn drop(&mut self) {
        self.0.fire();
    }
}

/// Opens and validates a file; returns the connection, what it holds and
/// the query that streams its tiles.
fn open_mbtiles(
    path: &Path,
    stop: &Stop,
) -> Result<(Connection, FileInfo, &'static str), ImportError> {
    let sql = |source| ImportError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 16];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|source| ImportError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        if f.read_exact(&mut head).is_err() || &head != b"SQLite format 3\0" {
            return Err(ImportError::NotSqlite {
                path: path.to_path_buf(),
            });
        }
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql)?;
    stop.set_sqlite(conn.get_interrupt_handle());
    harden(&conn).map_err(sql)?;
    let unsafe_schema = |what: String| ImportError::UnsafeSchema {
        path: path.to_path_buf(),
        what,
    };
    // What each name is: a plain table, a view, a virtual table.
    let mut objects: HashMap<String, &'static str> = HashMap::new();
    {
        let mut st = conn
            .prepare(&format!(
                "SELECT type, name, coalesce(sql, '') FROM sqlite_master LIMIT {MAX_SCHEMA_OBJECTS}"
            ))
            .map_err(|e| match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase) => ImportError::NotSqlite {
                    path: path.to_path_buf(),
                },
                _ => sql(e),
            })?;
        let mut rows = st.query([]).map_err(sql)?;
        while let Some(r) = rows.next().map_err(sql)? {
            let kind: String = r.get(0).map_err(sql)?;
            let name: String = r.get(1).map_err(sql)?;
            let text: String = r.get(2).map_err(sql)?;
            if kind == "trigger" {
                return Err(unsafe_schema(format!("schema holds a trigger ({name:?})")));
            }
            let name = name.to_ascii_lowercase();
            if !["metadata", "tiles", "map", "images"].contains(&name.as_str()) {
                continue;
            }
            let what = match kind.as_str() {
                "view" => "a view",
                "table"
                    if text
                        .trim_start()
                        .get(..20)
                        .is_some_and(|h| h.eq_ignore_ascii_case("create virtual table")) =>
                {
                    "a virtual table"
                }
                "table" => TABLE,
                _ => continue,
            };
            objects.insert(name, what);
        }
    }
    let plain = |name: &str| objects.get(name) == Some(&TABLE);
    let missing_table = |table| ImportError::MissingTable {
        path: path.to_path_buf(),
        table,
    };
    let require = |table: &'static str, cols: &[&'static str]| -> Result<(), ImportError> {
        let have = columns(&conn, table).map_err(sql)?;
        for c in cols {
            if !have.iter().any(|h| h.eq_ignore_ascii_case(c)) {
                return Err(ImportError::MissingColumn {
                    path: path.to_path_buf(),
                    table,
                    column: c,
                });
            }
        }
        Ok(())
    };
    match objects.get("metadata") {
        None => return Err(missing_table("metadata")),
        Some(&what) if what != TABLE => {
            return Err(unsafe_schema(format!("`metadata` is {what}")));
        }
        Some(_) => {}
    }
    require("metadata", &["name", "value"])?;
    let query = if plain("tiles") {
        require(
            "tiles",
            &["zoom_level", "tile_column", "tile_row", "tile_data"],
        )?;
        TILES_QUERY
    } else if plain("map") && plain("images") {
        // The deduplicated layout; a `tiles` view over it is not run.
        require("map", &["zoom_level", "tile_column", "tile_row", "tile_id"])?;
        require("images", &["tile_data", "tile_id"])?;
        JOIN_QUERY
    } else if let Some(what) = objects.get("tiles") {
        return Err(unsafe_schema(format!(
            "`tiles` is {what} without plain `map` and `images` tables"
        )));
    } else {
        return Err(missing_table("tiles"));
    };
    let budget = |what: &'static str, max: u64| ImportError::Budget {
        path: path.to_path_buf(),
        what,
        max,
    };
    let mut meta: HashMap<String, String> = HashMap::new();
    {
        let mut st = conn
            .prepare(&format!(
                "SELECT name, value FROM metadata LIMIT {}",
                MAX_METADATA_ROWS + 1
            ))
            .map_err(sql)?;
        let mut rows = st.query([]).map_err(sql)?;
        let (mut n, mut bytes) = (0usize, 0usize);
        while let Some(r) = rows.next().map_err(|e| stop.error(path, e))? {
            n += 1;
            if n > MAX_METADATA_ROWS {
                return Err(budget("metadata rows", MAX_METADATA_ROWS as u64));
            }
            let (Ok(Some(name)), Ok(Some(value))) = (
                r.get_ref(0).map(|v| v.as_str_or_null().ok().flatten()),
                r.get_ref(1).map(|v| v.as_str_or_null().ok().flatten()),
            ) else {
                continue;
            };
            bytes += name.len() + value.len();
            if bytes > MAX_METADATA_BYTES {
                return Err(budget("metadata bytes", MAX_METADATA_BYTES as u64));
            }
            meta.insert(name.to_ascii_lowercase(), value.to_string());
        }
    }
    let total: u64 = conn
        .query_row(
            &format!(
                "SELECT count(*) FROM ({query} LIMIT {})",
                MAX_IMPORT_TILES + 1
            ),
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(|e| stop.error(path, e))?
        .max(0) as u64;
    if total > MAX_IMPORT_TILES {
        return Err(budget("tile rows", MAX_IMPORT_TILES));
    }
    let (format_text, format) = match meta.get("format") {
        Some(f) => (f.clone(), parse_format(f)),
        None => {
            // MBTiles 1.0/1.1 had no `format`: judge by the first tile.
            let first: Option<Vec<u8>> = conn
                .query_row(&format!("{query} LIMIT 1"), [], |r| {
                    r.get::<_, Option<Vec<u8>>>(3)
                })
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })
                .map_err(|e| stop.error(path, e))?
                .flatten();
            match first.as_deref().and_then(sniff) {
                Some(f) => (f.extension().to_string(), Some(f)),
                None if first.is_none() => ("(no format, no tiles)".into(), None),
                None => ("(no format; first tile unrecognised)".into(), None),
            }
        }
    };
    Ok((
        conn,
        FileInfo {
            format_text,
            format,
            json: meta.get("json").cloned(),
            total,
        },
        query,
    ))
}

/// Judges one row.
fn judge(
    row: &rusqlite::Row<'_>,
    path: &Path,
    format: TileFormat,
    zooms: (u8, u8),
) -> rusqlite::Result<Item> {
    let z = row.get_ref(0)?.as_i64().ok();
    let x = row.get_ref(1)?.as_i64().ok();
    let tms = row.get_ref(2)?.as_i64().ok();
    let (Some(z), Some(x), Some(tms)) = (z, x, tms) else {
        return Ok(Item::Invalid(1));
    };
    if !(0..=i64::from(MAX_ZOOM)).contains(&z) {
        return Ok(Item::Invalid(1));
    }
    let side = 1i64 << z;
    if !(0..side).contains(&x) || !(0..side).contains(&tms) {
        return Ok(Item::Invalid(1));
    }
    if z < i64::from(zooms.0) || z > i64::from(zooms.1) {
        return Ok(Item::OutOfRange(1));
    }
    let Ok(data) = row.get_ref(3)?.as_blob() else {
        return Ok(Item::Invalid(1));
    };
    if data.len() > MAX_OBJECT_BYTES || sniff(data) != Some(format) {
        return Ok(Item::Invalid(1));
    }
    let tile = TileId {
        z: z as u8,
        x: x as u32,
        y: (side - 1 - tms) as u32,
    };
    Ok(match check_gzip(data) {
        Gzip::Plain | Gzip::Complete => Item::Tile(tile, Bytes::copy_from_slice(data)),
        Gzip::Broken => Item::Invalid(1),
        Gzip::Bomb { limit } => Item::Failed(gzip_bomb(path, tile, data.len(), limit)),
    })
}

/// What [`check_gzip`] found.
#[derive(Debug, PartialEq, Eq)]
enum Gzip {
    /// No gzip signature: nothing to check.
    Plain,
    /// One complete stream within its bound.
    Complete,
    /// Cut short or corrupt.
    Broken,
    /// Inflates past `limit` bytes.
    Bomb { limit: u64 },
}

/// Inflates a gzipped tile into nothing, up to its bound (see
/// [`MAX_GZIP_RATIO`]), to tell a complete stream from a broken one or a
/// bomb; never holds the inflated bytes.
fn check_gzip(data: &[u8]) -> Gzip {
    if !data.starts_with(GZIP_MAGIC) {
        return Gzip::Plain;
    }
    let limit = (data.len() as u64)
        .saturating_mul(MAX_GZIP_RATIO)
        .clamp(GZIP_RATIO_FLOOR, MAX_INFLATED_TILE);
    let mut d = flate2::read::GzDecoder::new(data).take(limit + 1);
    match std::io::copy(&mut d, &mut std::io::sink()) {
        Ok(n) if n > limit => Gzip::Bomb { limit },
        Ok(_) => Gzip::Complete,
        Err(_) => Gzip::Broken,
    }
}

fn gzip_bomb(path: &Path, t: TileId, compressed: usize, limit: u64) -> ImportError {
    ImportError::GzipBomb {
        path: path.to_path_buf(),
        z: t.z,
        x: t.x,
        y: t.y,
        compressed: compressed as u64,
        limit,
    }
}

/// The reader thread: streams judged rows into `tx` until the file ends or
/// the receiver is gone.
fn read_rows(
    conn: &Connection,
    path: &Path,
    query: &str,
    format: TileFormat,
    zooms: (u8, u8),
    stop: &Stop,
    tx: &mpsc::Sender<Item>,
) {
    let fail = |source| {
        let _ = tx.blocking_send(Item::Failed(stop.error(path, source)));
    };
    let mut n = 0u64;
    let mut st = match conn.prepare(query) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut rows = match st.query([]) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    loop {
        n += 1;
        if n.is_multiple_of(CANCEL_CHECK_EVERY) && stop.fired() {
            let _ = tx.blocking_send(Item::Failed(ImportError::Cancelled));
            return;
        }
        if n > MAX_IMPORT_TILES {
            let _ = tx.blocking_send(Item::Failed(ImportError::Budget {
                path: path.to_path_buf(),
                what: "tile rows",
                max: MAX_IMPORT_TILES,
            }));
            return;
        }
        let item = match rows.next() {
            Ok(Some(row)) => match judge(row, path, format, zooms) {
                Ok(i) => i,
                Err(e) => return fail(e),
            },
            Ok(None) => return,
            Err(e) => return fail(e),
        };
        if tx.blocking_send(item).is_err() {
            return; // the import was cancelled or failed
        }
    }
}

/// An opened, validated file.
enum Opened {
    Mbtiles(Connection, &'static str),
    Pmtiles(Archive),
}

/// Opens an MBTiles or PMTiles file, told apart by their first bytes
/// (`SQLite format 3\0`, `PMTiles` + version), whatever the file's name.
fn open_file(path: &Path, stop: &Stop) -> Result<(Opened, FileInfo), ImportError> {
    let mut head = [0u8; 7];
    let n = {
        let mut f = std::fs::File::open(path).map_err(|source| ImportError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        std::io::Read::read(&mut f, &mut head).map_err(|source| ImportError::Open {
            path: path.to_path_buf(),
            source,
        })?
    };
    if n == head.len() && &head == pmtiles::MAGIC {
        let (a, info) = open_pmtiles(path, &stop.flag).map_err(|source| match source {
            PmtilesError::Cancelled => ImportError::Cancelled,
            PmtilesError::Io(source) => ImportError::Open {
                path: path.to_path_buf(),
                source,
            },
            source => ImportError::Pmtiles {
                path: path.to_path_buf(),
                source,
            },
        })?;
        return Ok((Opened::Pmtiles(a), info));
    }
    let (conn, info, query) = open_mbtiles(path, stop)?;
    Ok((Opened::Mbtiles(conn, query), info))
}

/// Opens and validates a PMTiles archive: every directory is walked and
/// checked before a tile is read (see [`pmtiles::Archive::validate`]).
fn open_pmtiles(path: &Path, stop: &Arc<AtomicBool>) -> Result<(Archive, FileInfo), PmtilesError> {
    let mut a = Archive::open(path)?;
    a.set_cancel(stop.clone());
    let summary = a.validate()?;
    let h = a.header().clone();
    let tile_gzip = match h.tile_compression {
        pmtiles::Compression::None | pmtiles::Compression::Unknown => false,
        pmtiles::Compression::Gzip => true,
        code => {
            return Err(PmtilesError::Compression { what: "tile", code });
        }
    };
    let (format_text, format) = match h.tile_type {
        TileType::Mvt => ("mvt".to_string(), Some(TileFormat::Pbf)),
        TileType::Png => ("png".to_string(), Some(TileFormat::Png)),
        TileType::Jpeg => ("jpg".to_string(), Some(TileFormat::Jpg)),
        TileType::Webp => ("webp".to_string(), Some(TileFormat::Webp)),
        TileType::Avif => ("avif".to_string(), None),
        TileType::Other(c) => (format!("(tile type {c})"), None),
        TileType::Unknown => {
            // Judge by the first tile, as for an MBTiles 1.0 file.
            let mut first = None;
            a.for_each_entry(|a, e| {
                first = Some(a.tile_data(e)?);
                Ok(false)
            })?;
            match first.as_deref().and_then(sniff) {
                Some(f) => (f.extension().to_string(), Some(f)),
                None if first.is_none() => ("(no tile type, no tiles)".into(), None),
                None => ("(no tile type; first tile unrecognised)".into(), None),
            }
        }
    };
    if tile_gzip && format != Some(TileFormat::Pbf) {
        return Err(PmtilesError::Compression {
            what: "tile",
            code: h.tile_compression,
        });
    }
    // Vector layers, kept like MBTiles' `json` for export.
    let json = if format == Some(TileFormat::Pbf) {
        let meta = a.metadata()?;
        serde_json::from_slice::<serde_json::Value>(&meta)
            .ok()
            .and_then(|v| {
                let layers = v.get("vector_layers")?.clone();
                Some(serde_json::json!({ "vector_layers": layers }).to_string())
            })
    } else {
        None
    };
    Ok((
        a,
        FileInfo {
            format_text,
            format,
            json,
            total: summary.addressed_tiles,
        },
    ))
}

/// The PMTiles reader thread: every tile of every run, judged like an
/// MBTiles row, into `tx` until the archive ends or the receiver is gone.
/// Tile ids of a zoom are contiguous, so the parts of a run outside the
/// source's zooms are counted without being walked tile by tile.
fn read_pmtiles(
    a: &mut Archive,
    path: &Path,
    format: TileFormat,
    zooms: (u8, u8),
    stop: &Stop,
    tx: &mpsc::Sender<Item>,
) {
    let first = pmtiles::zoom_base(zooms.0);
    let end = pmtiles::zoom_base(zooms.1.min(MAX_ZOOM) + 1);
    let walked = a.for_each_entry(|a, e| {
        let (lo, hi) = (e.tile_id, e.tile_id + u64::from(e.run_length));
        let (in_lo, in_hi) = (lo.max(first), hi.min(end));
        let outside = if in_lo < in_hi {
            (hi - lo) - (in_hi - in_lo)
        } else {
            hi - lo
        };
        if outside > 0 && tx.blocking_send(Item::OutOfRange(outside)).is_err() {
            return Ok(false);
        }
        if in_lo >= in_hi {
            return Ok(true);
        }
        let n = in_hi - in_lo;
        let body = if e.length as usize > MAX_OBJECT_BYTES {
            None
        } else {
            let data = a.tile_data(e)?;
            match check_gzip(&data) {
                _ if sniff(&data) != Some(format) => None,
                Gzip::Broken => None,
                Gzip::Bomb { limit } => {
                    let t = pmtiles::tile_of(in_lo).unwrap_or(TileId { z: 0, x: 0, y: 0 });
                    let _ = tx.blocking_send(Item::Failed(gzip_bomb(path, t, data.len(), limit)));
                    return Ok(false);
                }
                Gzip::Plain | Gzip::Complete => Some(Bytes::from(data)),
            }
        };
        let Some(body) = body else {
            return Ok(tx.blocking_send(Item::Invalid(n)).is_ok());
        };
        for id in in_lo..in_hi {
            if (id - in_lo).is_multiple_of(CANCEL_CHECK_EVERY) && stop.fired() {
                return Err(PmtilesError::Cancelled);
            }
            let item = match pmtiles::tile_of(id) {
                Some(t) => Item::Tile(t, body.clone()),
                None => Item::Invalid(1),
            };
            if tx.blocking_send(item).is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    });
    let failed = match walked {
        Ok(_) => return,
        Err(PmtilesError::Cancelled) => ImportError::Cancelled,
        Err(source) => ImportError::Pmtiles {
            path: path.to_path_buf(),
            source,
        },
    };
    let _ = tx.blocking_send(Item::Failed(failed));
}

/// The `ETag` of an imported body.
fn etag_for(body: &[u8]) -> HeaderValue {
    let h = blake3::hash(body);
    HeaderValue::from_str(&format!("\"mb-{}\"", hex(&h.as_bytes()[..8])))
        .expect("hex is a valid header value")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The headers every tile of an import shares (`ETag` and, for gzip,
/// `Content-Encoding` are added per tile).
fn import_headers(format: TileFormat, now: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_str(&format!(
            "public, max-age={IMPORTED_CLIENT_MAX_AGE}, s-maxage={IMPORTED_S_MAXAGE}"
        ))
        .expect("ascii"),
    );
    h.insert(
        header::DATE,
        HeaderValue::from_str(&fmt_date(now)).expect("ascii"),
    );
    h
}

type PutResult = (usize, Result<(), StoreError>);

/// The keys of the tiles one import run stored, in an anonymous temp file
/// (16 bytes each), so an import that does not complete can remove them
/// without holding millions of keys in memory.
struct Journal {
    file: BufWriter<std::fs::File>,
    count: u64,
}

impl Journal {
    fn new() -> Result<Journal, ImportError> {
        let file = tempfile::tempfile().map_err(ImportError::Journal)?;
        Ok(Journal {
            file: BufWriter::new(file),
            count: 0,
        })
    }

    fn record(&mut self, key: &KeyHash) -> Result<(), ImportError> {
        self.file.write_all(key).map_err(ImportError::Journal)?;
        self.count += 1;
        Ok(())
    }

    /// Removes every journalled key from the store; returns how many.
    async fn roll_back(self, store: &crate::store::Store) -> Result<u64, ImportError> {
        let mut file = self
            .file
            .into_inner()
            .map_err(|e| ImportError::Journal(e.into_error()))?;
        file.rewind().map_err(ImportError::Journal)?;
        let mut reader = std::io::BufReader::new(file);
        let mut removing = FuturesUnordered::new();
        let mut removed = 0u64;
        for _ in 0..self.count {
            let mut key: KeyHash = [0; 16];
            reader.read_exact(&mut key).map_err(ImportError::Journal)?;
            if removing.len() >= ROLLBACK_IN_FLIGHT {
                if let Some(Err(e)) = removing.next().await {
                    tracing::warn!(error = %e, "removing a tile of a cancelled import failed");
                }
            }
            let store = store.clone();
            removing.push(async move { store.remove(key).await });
            removed += 1;
        }
        while let Some(r) = removing.next().await {
            if let Err(e) = r {
                tracing::warn!(error = %e, "removing a tile of a cancelled import failed");
            }
        }
        Ok(removed)
    }
}

/// Imports an MBTiles or PMTiles file into the cache as tiles of `source`,
/// pinned (see the module docs). `progress` is called after every row.
/// Needs no backhaul; the proxy need not be running yet (a handle from
/// [`crate::Proxy::handle`] after `bind` works).
///
/// Like [`import_cancellable`] with a token nobody fires. Dropping the
/// future stops the import (and its reader thread); every tile reported
/// stored is durable, and re-running the same import completes it without
/// rewriting those.
///
/// # Errors
/// See [`ImportError`].
pub async fn import(
    proxy: &ProxyHandle,
    source: &str,
    path: &Path,
    progress: impl FnMut(&ImportReport),
) -> Result<ImportReport, ImportError> {
    import_cancellable(proxy, source, path, &CancellationToken::new(), progress).await
}

/// [`import`], stopped by `cancel`: the reader thread stops at its next
/// row or directory (an SQLite statement in progress is interrupted), the
/// tiles this run stored are removed, and the import fails with
/// [`ImportError::Cancelled`].
///
/// # Errors
/// See [`ImportError`]: the file is refused before anything is stored when
/// it is not a tile file, not of the source's format, or over a budget
/// that can be told up front; a refusal, read or store failure mid-way
/// stops the import and removes what this run stored.
pub async fn import_cancellable(
    proxy: &ProxyHandle,
    source: &str,
    path: &Path,
    cancel: &CancellationToken,
    mut progress: impl FnMut(&ImportReport),
) -> Result<ImportReport, ImportError> {
    let engine = &proxy.engine;
    let src = find_source(engine, source)
        .ok_or_else(|| ImportError::UnknownSource(source.to_string()))?
        .clone();
    let stop = Arc::new(Stop::default());
    let _stop_on_drop = FireOnDrop(stop.clone());
    let bridge = {
        let (stop, cancel) = (stop.clone(), cancel.clone());
        tokio::spawn(async move {
            cancel.cancelled().await;
            stop.fire();
        })
    };
    let _bridge = tokio_util::task::AbortOnDropHandle::new(bridge);
    let (info_tx, info_rx) = tokio::sync::oneshot::channel();
    let (tx, mut rx) = mpsc::channel::<Item>(IMPORT_QUEUE);
    let (go_tx, go_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let file = path.to_path_buf();
    let (format, zooms) = (src.format, (src.min_zoom, src.max_zoom));
    let reader_stop = stop.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let stop = reader_stop;
        let (opened, info) = match open_file(&file, &stop) {
            Ok(x) => x,
            Err(e) => {
                let _ = info_tx.send(Err(e));
                return;
            }
        };
        let _ = info_tx.send(Ok(info));
        // Stream only once the format has been accepted.
        if go_rx.recv().is_ok() {
            match opened {
                Opened::Mbtiles(conn, query) => {
                    read_rows(&conn, &file, query, format, zooms, &stop, &tx);
                }
                Opened::Pmtiles(mut archive) => {
                    read_pmtiles(&mut archive, &file, format, zooms, &stop, &tx);
                }
            }
        }
    });
    let info = tokio::select! {
        biased;
        () = cancel.cancelled() => {
            stop.fire();
            drop(go_tx);
            let _ = reader.await;
            return Err(ImportError::Cancelled);
        }
        info = info_rx => info,
    };
    let info = info.map_err(|_| ImportError::Open {
        path: path.to_path_buf(),
        source: std::io::Error::other("the tile file reader thread failed"),
    })??;
    if info.format != Some(src.format) {
        drop(go_tx);
        let _ = reader.await;
        return Err(match info.format {
            Some(_) => ImportError::WrongFormat {
                path: path.to_path_buf(),
                file: info.format_text,
                source_name: src.name.clone(),
                expected: src.format.extension(),
            },
            None => ImportError::UnknownFormat {
                path: path.to_path_buf(),
                format: info.format_text,
            },
        });
    }
    let _ = go_tx.send(());
    let mut journal = Journal::new()?;
    let mut report = ImportReport {
        total: info.total,
        ..Default::default()
    };
    let outcome = store_tiles(
        engine,
        &src,
        &info,
        &mut rx,
        cancel,
        &mut journal,
        &mut report,
        &mut progress,
    )
    .await;
    stop.fire();
    drop(rx);
    let _ = reader.await;
    if let Err(e) = outcome {
        let removed = journal.roll_back(&engine.store).await?;
        tracing::warn!(
            event = "mbtiles_import_rolled_back",
            source = %src.name,
            file = %path.display(),
            removed,
            error = %e,
            "tile import stopped; the tiles it stored were removed"
        );
        return Err(e);
    }
    tracing::info!(
        event = "mbtiles_imported",
        source = %src.name,
        file = %path.display(),
        tiles = report.tiles,
        unchanged = report.unchanged,
        skipped = report.skipped,
        invalid = report.invalid,
        "MBTiles import finished"
    );
    Ok(report)
}

/// The storing half of an import: every judged item from the reader into
/// the store, each new key journalled before its write is issued. Returns
/// at the first failure (after the writes in flight settled).
#[allow(clippy::too_many_arguments)]
async fn store_tiles(
    engine: &Engine,
    src: &TileSource,
    info: &FileInfo,
    rx: &mut mpsc::Receiver<Item>,
    cancel: &CancellationToken,
    journal: &mut Journal,
    report: &mut ImportReport,
    progress: &mut impl FnMut(&ImportReport),
) -> Result<(), ImportError> {
    let now = (engine.clock)();
    let store = engine.store.clone();
    if let (TileFormat::Pbf, Some(json)) = (src.format, &info.json) {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let meta = ObjectMeta {
            status: 200,
            headers,
            request_time: now,
            response_time: now,
            pinned: true,
        };
        let key = key_hash(&format!("{JSON_KEY_PREFIX}{}", src.name));
        journal.record(&key)?;
        store
            .put(key, meta, Bytes::from(json.clone().into_bytes()))
            .await?;
    }
    let base = import_headers(src.format, now);
    let mut in_flight = FuturesUnordered::new();
    let mut in_flight_bytes = 0usize;
    let settle = |r: PutResult, report: &mut ImportReport, bytes: &mut usize| {
        let (len, res) = r;
        *bytes -= len;
        res.map(|()| {
            report.tiles += 1;
            report.bytes += len as u64;
        })
    };
    let mut failed: Option<ImportError> = None;
    loop {
        let item = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                failed = Some(ImportError::Cancelled);
                break;
            }
            item = rx.recv() => match item {
                Some(item) => item,
                None => break,
            },
        };
        let (tile, body) = match item {
            Item::Tile(t, b) => (t, b),
            Item::OutOfRange(n) => {
                report.read += n;
                report.skipped += n;
                progress(report);
                continue;
            }
            Item::Invalid(n) => {
                report.read += n;
                report.invalid += n;
                progress(report);
                continue;
            }
            Item::Failed(e) => {
                failed = Some(e);
                break;
            }
        };
        report.read += 1;
        let kh: KeyHash = key_hash(&tiles::cache_key(&src.name, tile));
        let etag = etag_for(&body);
        if let Ok(Some(m)) = store.get_meta(&kh) {
            if m.pinned && m.status == 200 && m.headers.get(header::ETAG) == Some(&etag) {
                report.unchanged += 1;
                progress(report);
                continue;
            }
        }
        let mut headers = base.clone();
        if src.format == TileFormat::Pbf && body.starts_with(GZIP_MAGIC) {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        headers.insert(header::ETAG, etag);
        let meta = ObjectMeta {
            status: 200,
            headers,
            request_time: now,
            response_time: now,
            pinned: true,
        };
        let len = body.len();
        while !in_flight.is_empty()
            && (in_flight.len() >= IMPORT_IN_FLIGHT
                || in_flight_bytes + len > IMPORT_IN_FLIGHT_BYTES)
        {
            let r = in_flight.next().await.expect("not empty");
            if let Err(e) = settle(r, report, &mut in_flight_bytes) {
                failed = Some(e.into());
                break;
            }
            progress(report);
        }
        if failed.is_some() {
            break;
        }
        if let Err(e) = journal.record(&kh) {
            failed = Some(e);
            break;
        }
        in_flight_bytes += len;
        let store = store.clone();
        in_flight.push(async move { (len, store.put(kh, meta, body).await) });
    }
    // Writes in flight settle either way: on failure they are journalled
    // and removed with the rest.
    while let Some(r) = in_flight.next().await {
        match settle(r, report, &mut in_flight_bytes) {
            Ok(()) => progress(report),
            Err(e) => {
                failed.get_or_insert(e.into());
            }
        }
    }
    if failed.is_none() && cancel.is_cancelled() {
        // Cancelled while the last writes settled: still not done.
        failed = Some(ImportError::Cancelled);
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What the export writer thread receives.
enum Row {
    Tile { tile: TileId, body: Bytes },
    Finish(Vec<(&'static str, String)>),
}

const SCHEMA: &str = "
PRAGMA journal_mode = OFF;
PRAGMA synchronous = OFF;
PRAGMA application_id = 1297105496;
CREATE TABLE metadata (name TEXT, value TEXT);
CREATE UNIQUE INDEX metadata_name ON metadata (name);
CREATE TABLE images (tile_data BLOB, tile_id TEXT);
CREATE UNIQUE INDEX images_id ON images (tile_id);
CREATE TABLE map (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_id TEXT);
CREATE UNIQUE INDEX map_index ON map (zoom_level, tile_column, tile_row);
CREATE VIEW tiles AS SELECT map.zoom_level AS zoom_level, map.tile_column AS tile_column,
    map.tile_row AS tile_row, images.tile_data AS tile_data
    FROM map JOIN images ON images.tile_id = map.tile_id;
BEGIN;
";

/// The export writer thread: builds the file at `tmp`; returns the number
/// of distinct images, or `None` if the export was abandoned (the sender
/// dropped without `Finish`).
fn write_file(tmp: &Path, rx: &mut mpsc::Receiver<Row>) -> rusqlite::Result<Option<u64>> {
    let conn = Connection::open(tmp)?;
    conn.execute_batch(SCHEMA)?;
    let mut unique = 0u64;
    {
        let mut put_image =
            conn.prepare("INSERT OR IGNORE INTO images (tile_data, tile_id) VALUES (?1, ?2)")?;
        let mut put_map = conn.prepare(
            "INSERT OR REPLACE INTO map (zoom_level, tile_column, tile_row, tile_id) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut put_meta =
            conn.prepare("INSERT OR REPLACE INTO metadata (name, value) VALUES (?1, ?2)")?;
        loop {
            match rx.blocking_recv() {
                Some(Row::Tile { tile, body }) => {
                    let id = hex(&blake3::hash(&body).as_bytes()[..16]);
                    unique += put_image.execute(rusqlite::params![&body[..], id])? as u64;
                    let tms = (1u64 << tile.z) - 1 - u64::from(tile.y);
                    put_map.execute(rusqlite::params![tile.z, tile.x, tms as i64, id])?;
                }
                Some(Row::Finish(meta)) => {
                    for (k, v) in meta {
                        put_meta.execute(rusqlite::params![k, v])?;
                    }
                    break;
                }
                None => return Ok(None),
            }
        }
    }
    conn.execute_batch("COMMIT;")?;
    conn.close().map_err(|(_, e)| e)?;
    Ok(Some(unique))
}

/// `out` + `.partial`, beside it (same filesystem, so the rename is atomic).
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

/// Exports every cached tile of a source in a region to a new MBTiles file
/// at `out` (replacing it), in the deduplicated layout (see the module
/// docs). Reads only the cache: needs no backhaul. `progress` is called
/// after every tile of the plan looked up.
///
/// Cancel-safe: dropping the future abandons the export and removes the
/// partial file; `out` is only ever replaced by a complete file.
///
/// # Errors
/// See [`ExportError`].
pub async fn export(
    proxy: &ProxyHandle,
    plan: &ExportPlan,
    out: &Path,
    progress: impl FnMut(&ExportReport),
) -> Result<ExportReport, ExportError> {
    export_cancellable(proxy, plan, out, &CancellationToken::new(), progress).await
}

/// [`export`], stopped by `cancel` ([`ExportError::Cancelled`]; the
/// partial file is removed and `out` is untouched).
///
/// # Errors
/// See [`ExportError`].
pub async fn export_cancellable(
    proxy: &ProxyHandle,
    plan: &ExportPlan,
    out: &Path,
    cancel: &CancellationToken,
    mut progress: impl FnMut(&ExportReport),
) -> Result<ExportReport, ExportError> {
    let engine = &proxy.engine;
    let src = find_source(engine, &plan.source)
        .ok_or_else(|| ExportError::UnknownSource(plan.source.clone()))?
        .clone();
    if plan.min_zoom > plan.max_zoom || plan.min_zoom < src.min_zoom || plan.max_zoom > src.max_zoom
    {
        return Err(ExportError::Zoom {
            min: plan.min_zoom,
            max: plan.max_zoom,
            source_name: src.name,
            source_min: src.min_zoom,
            source_max: src.max_zoom,
        });
    }
    let total = plan.count();
    if total > MAX_EXPORT_TILES {
        return Err(ExportError::TooLarge(total));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Io { path, source }
    };
    let tmp = partial_path(out);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&tmp)(e)),
    }
    let (tx, mut rx) = mpsc::channel::<Row>(EXPORT_QUEUE);
    let writer_tmp = tmp.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let r = write_file(&writer_tmp, &mut rx);
        if !matches!(r, Ok(Some(_))) {
            let _ = std::fs::remove_file(&writer_tmp);
        }
        r
    });
    // If this future is dropped, `tx` goes with it and the writer removes
    // the partial file.
    let mut report = ExportReport {
        total,
        ..Default::default()
    };
    let mut zooms_written: Option<(u8, u8)> = None;
    let mut writer_gone = false;
    for t in tiles::tiles(plan.bbox, plan.min_zoom..=plan.max_zoom) {
        report.done += 1;
        if report.done.is_multiple_of(1024) {
            tokio::task::yield_now().await;
        }
        if cancel.is_cancelled() {
            // Dropping `tx` without `Finish` makes the writer remove the
            // partial file.
            drop(tx);
            let _ = writer.await;
            return Err(ExportError::Cancelled);
        }
        let kh = key_hash(&tiles::cache_key(&src.name, t));
        let obj = match engine.store.get(&kh) {
            Ok(Some(o)) if o.meta.status == 200 => o,
            Ok(_) => {
                progress(&report);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "store read failed during export; tile left out");
                progress(&report);
                continue;
            }
        };
        let coding = obj
            .meta
            .headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase())
            .unwrap_or_default();
        if !(coding.is_empty() || coding == "identity" || coding == "gzip") {
            report.skipped += 1;
            progress(&report);
            continue;
        }
        report.tiles += 1;
        report.bytes += obj.body.len() as u64;
        zooms_written = Some(match zooms_written {
            None => (t.z, t.z),
            Some((a, b)) => (a.min(t.z), b.max(t.z)),
        });
        if tx
            .send(Row::Tile {
                tile: t,
                body: obj.body,
            })
            .await
            .is_err()
        {
            writer_gone = true;
            break;
        }
        progress(&report);
    }
    if !writer_gone {
        let meta = export_metadata(engine, &src, plan, zooms_written).await;
        let _ = tx.send(Row::Finish(meta)).await;
    }
    drop(tx);
    let written = writer.await.map_err(|_| ExportError::Io {
        path: tmp.clone(),
        source: std::io::Error::other("the MBTiles writer thread panicked"),
    })?;
    let unique = match written {
        Ok(Some(n)) => n,
        Ok(None) => {
            return Err(ExportError::Io {
                path: tmp,
                source: std::io::Error::other("the MBTiles writer stopped early"),
            })
        }
        Err(source) => return Err(ExportError::Sqlite { path: tmp, source }),
    };
    report.unique = unique;
    let (tmp2, out2) = (tmp.clone(), out.to_path_buf());
    tokio::task::spawn_blocking(move || -> Result<(), ExportError> {
        // A region of the cache, for whoever holds the file: the agent's
        // user only, like a volume export.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp2, std::fs::Permissions::from_mode(0o600))
            .map_err(io(&tmp2))?;
        util::fs::fsync_file(&tmp2).map_err(io(&tmp2))?;
        util::fs::rename_durable(&tmp2, &out2).map_err(io(&out2))
    })
    .await
    .map_err(|_| ExportError::Io {
        path: out.to_path_buf(),
        source: std::io::Error::other("the rename task panicked"),
    })
    .and_then(|r| r)
    .inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    tracing::info!(
        event = "mbtiles_exported",
        source = %src.name,
        file = %out.display(),
        tiles = report.tiles,
        unique = report.unique,
        "MBTiles export finished"
    );
    Ok(report)
}

async fn export_metadata(
    engine: &Arc<Engine>,
    src: &TileSource,
    plan: &ExportPlan,
    zooms: Option<(u8, u8)>,
) -> Vec<(&'static str, String)> {
    let b = &plan.bbox;
    let lat_max = 85.051_128_779_806_6;
    let (south, north) = (b.south.max(-lat_max), b.north.min(lat_max));
    let (minz, maxz) = zooms.unwrap_or((plan.min_zoom, plan.max_zoom));
    let mut m = vec![
        ("name", src.name.clone()),
        ("format", src.format.extension().to_string()),
        (
            "bounds",
            format!("{},{},{},{}", b.west, south, b.east, north),
        ),
        (
            "center",
            format!(
                "{},{},{}",
                (b.west + b.east) / 2.0,
                (south + north) / 2.0,
                minz
            ),
        ),
        ("minzoom", minz.to_string()),
        ("maxzoom", maxz.to_string()),
        ("attribution", src.attribution.clone()),
        ("type", "baselayer".to_string()),
        (
            "description",
            format!(
                "{} tiles exported by Fieldrack rack {}",
                src.name, engine.name
            ),
        ),
    ];
    if src.format == TileFormat::Pbf {
        let key = key_hash(&format!("{JSON_KEY_PREFIX}{}", src.name));
        let json = engine
            .store
            .get(&key)
            .ok()
            .flatten()
            .and_then(|o| String::from_utf8(o.body.to_vec()).ok())
            .unwrap_or_else(|| r#"{"vector_layers":[]}"#.to_string());
        m.push(("json", json));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(parse_format("PNG"), Some(TileFormat::Png));
        assert_eq!(parse_format("jpeg"), Some(TileFormat::Jpg));
        assert_eq!(parse_format("image/webp"), Some(TileFormat::Webp));
        assert_eq!(parse_format("pbf"), Some(TileFormat::Pbf));
        assert_eq!(
            parse_format("application/x-protobuf"),
            Some(TileFormat::Pbf)
        );
        assert_eq!(parse_format("tiff"), None);
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nrest"), Some(TileFormat::Png));
        assert_eq!(sniff(&[0xff, 0xd8, 0xff, 0xe0]), Some(TileFormat::Jpg));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some(TileFormat::Webp));
        assert_eq!(sniff(&[0x1f, 0x8b, 8, 0]), Some(TileFormat::Pbf));
        assert_eq!(sniff(&[0x1a, 3]), Some(TileFormat::Pbf));
        assert_eq!(sniff(b""), Some(TileFormat::Pbf));
        assert_eq!(sniff(b"<html>"), None);
    }

    #[test]
    fn partial_is_beside_out() {
        assert_eq!(
            partial_path(Path::new("/a/b/out.mbtiles")),
            PathBuf::from("/a/b/out.mbtiles.partial")
        );
        assert_eq!(
            partial_path(Path::new("out.mbtiles")),
            PathBuf::from("out.mbtiles.partial")
        );
    }

    #[test]
    fn etags_are_quoted_and_stable() {
        let a = etag_for(b"abc");
        assert_eq!(a, etag_for(b"abc"));
        assert_ne!(a, etag_for(b"abd"));
        let s = a.to_str().unwrap();
        assert!(
            s.starts_with("\"mb-") && s.ends_with('"') && s.len() == 21,
            "{s}"
        );
    }
}
