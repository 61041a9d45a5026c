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
//! [MBTiles 1.3]: https://github.com/mapbox/mbtiles-spec/blob/master/1.3/spec.md

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hyper::header::{self, HeaderMap, HeaderValue};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::mpsc;

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
/// `metadata` rows read at most (a sane file has a dozen).
pub const MAX_METADATA_ROWS: usize = 1024;
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
    /// The store refused a write (disk full...). Tiles acknowledged before
    /// it are kept; re-run the import once fixed.
    #[error("storing tiles: {0}")]
    Store(#[from] StoreError),
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

/// Opens and validates a file; returns the connection, what it holds and
/// the query that streams its tiles.
fn open_mbtiles(path: &Path) -> Result<(Connection, FileInfo, &'static str), ImportError> {
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
    let objects: HashMap<String, String> = {
        let mut st = conn
            .prepare(
                "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view') \
                 AND name IN ('metadata', 'tiles', 'map', 'images')",
            )
            .map_err(|e| match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase) => ImportError::NotSqlite {
                    path: path.to_path_buf(),
                },
                _ => sql(e),
            })?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)?
    };
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
    if !objects.contains_key("metadata") {
        return Err(missing_table("metadata"));
    }
    require("metadata", &["name", "value"])?;
    let query = if objects.contains_key("tiles") {
        require(
            "tiles",
            &["zoom_level", "tile_column", "tile_row", "tile_data"],
        )?;
        TILES_QUERY
    } else if objects.contains_key("map") && objects.contains_key("images") {
        require("map", &["zoom_level", "tile_column", "tile_row", "tile_id"])?;
        require("images", &["tile_data", "tile_id"])?;
        JOIN_QUERY
    } else {
        return Err(missing_table("tiles"));
    };
    let mut meta: HashMap<String, String> = HashMap::new();
    {
        let mut st = conn
            .prepare(&format!(
                "SELECT name, value FROM metadata LIMIT {MAX_METADATA_ROWS}"
            ))
            .map_err(sql)?;
        let mut rows = st.query([]).map_err(sql)?;
        while let Some(r) = rows.next().map_err(sql)? {
            let (Ok(Some(name)), Ok(Some(value))) = (
                r.get_ref(0).map(|v| v.as_str_or_null().ok().flatten()),
                r.get_ref(1).map(|v| v.as_str_or_null().ok().flatten()),
            ) else {
                continue;
            };
            meta.insert(name.to_ascii_lowercase(), value.to_string());
        }
    }
    let total: u64 = conn
        .query_row(&format!("SELECT count(*) FROM ({query})"), [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(sql)?
        .max(0) as u64;
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
                .map_err(sql)?
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
fn judge(row: &rusqlite::Row<'_>, format: TileFormat, zooms: (u8, u8)) -> rusqlite::Result<Item> {
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
    Ok(Item::Tile(
        TileId {
            z: z as u8,
            x: x as u32,
            y: (side - 1 - tms) as u32,
        },
        Bytes::copy_from_slice(data),
    ))
}

/// The reader thread: streams judged rows into `tx` until the file ends or
/// the receiver is gone.
fn read_rows(
    conn: &Connection,
    path: &Path,
    query: &str,
    format: TileFormat,
    zooms: (u8, u8),
    tx: &mpsc::Sender<Item>,
) {
    let fail = |source| {
        let _ = tx.blocking_send(Item::Failed(ImportError::Sqlite {
            path: path.to_path_buf(),
            source,
        }));
    };
    let mut st = match conn.prepare(query) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut rows = match st.query([]) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    loop {
        let item = match rows.next() {
            Ok(Some(row)) => match judge(row, format, zooms) {
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
fn open_file(path: &Path) -> Result<(Opened, FileInfo), ImportError> {
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
        let (a, info) = open_pmtiles(path).map_err(|source| match source {
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
    let (conn, info, query) = open_mbtiles(path)?;
    Ok((Opened::Mbtiles(conn, query), info))
}

/// Opens and validates a PMTiles archive: every directory is walked and
/// checked before a tile is read (see [`pmtiles::Archive::validate`]).
fn open_pmtiles(path: &Path) -> Result<(Archive, FileInfo), PmtilesError> {
    let mut a = Archive::open(path)?;
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

/// Whether `data` is one complete gzip stream (of at most
/// [`MAX_OBJECT_BYTES`] once inflated).
fn gzip_complete(data: &[u8]) -> bool {
    use std::io::Read;
    let mut d = flate2::read::GzDecoder::new(data).take(MAX_OBJECT_BYTES as u64 + 1);
    std::io::copy(&mut d, &mut std::io::sink()).is_ok_and(|n| n <= MAX_OBJECT_BYTES as u64)
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
            let ok = sniff(&data) == Some(format)
                && (!data.starts_with(GZIP_MAGIC) || gzip_complete(&data));
            ok.then(|| Bytes::from(data))
        };
        let Some(body) = body else {
            return Ok(tx.blocking_send(Item::Invalid(n)).is_ok());
        };
        for id in in_lo..in_hi {
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
    if let Err(source) = walked {
        let _ = tx.blocking_send(Item::Failed(ImportError::Pmtiles {
            path: path.to_path_buf(),
            source,
        }));
    }
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

/// Imports an MBTiles file into the cache as tiles of `source`, pinned (see
/// the module docs). `progress` is called after every row. Needs no
/// backhaul; the proxy need not be running yet (a handle from
/// [`crate::Proxy::handle`] after `bind` works).
///
/// Cancel-safe in the sense that matters: dropping the future stops the
/// import; every tile reported stored is durable, and re-running the same
/// import completes it without rewriting those.
///
/// # Errors
/// See [`ImportError`]: the file is refused before anything is stored when
/// it is not an MBTiles file or not of the source's format; a read or store
/// failure mid-way stops the import (what was stored stays).
pub async fn import(
    proxy: &ProxyHandle,
    source: &str,
    path: &Path,
    mut progress: impl FnMut(&ImportReport),
) -> Result<ImportReport, ImportError> {
    let engine = &proxy.engine;
    let src = find_source(engine, source)
        .ok_or_else(|| ImportError::UnknownSource(source.to_string()))?
        .clone();
    let (info_tx, info_rx) = tokio::sync::oneshot::channel();
    let (tx, mut rx) = mpsc::channel::<Item>(IMPORT_QUEUE);
    let (go_tx, go_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let file = path.to_path_buf();
    let (format, zooms) = (src.format, (src.min_zoom, src.max_zoom));
    let reader = tokio::task::spawn_blocking(move || {
        let (opened, info) = match open_file(&file) {
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
                    read_rows(&conn, &file, query, format, zooms, &tx);
                }
                Opened::Pmtiles(mut archive) => {
                    read_pmtiles(&mut archive, &file, format, zooms, &tx);
                }
            }
        }
    });
    let info = info_rx.await.map_err(|_| ImportError::Open {
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
        store
            .put(key, meta, Bytes::from(json.clone().into_bytes()))
            .await?;
    }
    let base = import_headers(src.format, now);
    let mut report = ImportReport {
        total: info.total,
        ..Default::default()
    };
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
    while let Some(item) = rx.recv().await {
        let (tile, body) = match item {
            Item::Tile(t, b) => (t, b),
            Item::OutOfRange(n) => {
                report.read += n;
                report.skipped += n;
                progress(&report);
                continue;
            }
            Item::Invalid(n) => {
                report.read += n;
                report.invalid += n;
                progress(&report);
                continue;
            }
            Item::Failed(e) => return Err(e),
        };
        report.read += 1;
        let kh: KeyHash = key_hash(&tiles::cache_key(&src.name, tile));
        let etag = etag_for(&body);
        if let Ok(Some(m)) = store.get_meta(&kh) {
            if m.pinned && m.status == 200 && m.headers.get(header::ETAG) == Some(&etag) {
                report.unchanged += 1;
                progress(&report);
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
            settle(r, &mut report, &mut in_flight_bytes)?;
            progress(&report);
        }
        in_flight_bytes += len;
        let store = store.clone();
        in_flight.push(async move { (len, store.put(kh, meta, body).await) });
    }
    while let Some(r) = in_flight.next().await {
        settle(r, &mut report, &mut in_flight_bytes)?;
        progress(&report);
    }
    let _ = reader.await;
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
