//! [PMTiles v3] archives: a validating reader (for `fieldrack tiles
//! import`) and a minimal writer (for tests, and for an export later).
//!
//! Layout: a 127-byte header (magic `PMTiles`, version 3, then offsets and
//! lengths of the root directory, the JSON metadata, the leaf directories
//! and the tile data, tile counts, the *internal* compression of
//! directories and metadata, the *tile* compression, the tile type, zooms,
//! bounds and center). A directory is, after internal decompression, a
//! varint entry count followed by four columns of varints: tile ids
//! (delta-encoded), run lengths, lengths, offsets (0 = right after the
//! previous entry's data, else offset + 1). An entry with run length 0
//! points at a leaf directory (offset into the leaf section); one with run
//! length `n` ≥ 1 says tiles `id..id + n` all have the bytes at `offset`
//! in the tile data section. Tile ids number the tiles zoom by zoom along
//! a Hilbert curve ([`tile_id`], [`tile_of`]).
//!
//! [`Archive::open`] checks the header against the file's length;
//! [`Archive::validate`] then walks every directory before anything is
//! imported and refuses the archive, with the reason, when a section or
//! an entry lies outside the file, a varint or a gzip stream is cut short,
//! tile ids go backwards or overlap, a leaf directory points to another
//! leaf (the layout writers produce is root → leaves, [`MAX_DEPTH`]), or
//! the header's tile counts disagree with the directories. Only internal
//! compression `none` or `gzip` is read.
//!
//! **Budgets.** A small archive can describe an enormous one: leaves that
//! point at the same leaf again and again, a gzip stream that inflates a
//! thousandfold, a 207-byte entry whose run length addresses 2³²−1 tiles.
//! So the walk is bounded by what it *costs*, not by the file's size:
//! every directory at most [`MAX_DIRECTORY_BYTES`] once inflated, all of
//! them together at most [`MAX_TOTAL_DIRECTORY_BYTES`], at most
//! [`MAX_ADDRESSED_TILES`] tiles addressed (a header that claims more is
//! refused before any directory is read), every leaf non-empty and read
//! once (a leaf pointed at twice repeats its tile ids and is refused), no
//! tile id beyond zoom [`MAX_ZOOM`]. A walk can also be cancelled from
//! another thread ([`Archive::set_cancel`]).
//!
//! [PMTiles v3]: https://github.com/protomaps/PMTiles/blob/main/spec/v3/spec.md

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::tiles::{TileId, MAX_ZOOM};

/// The first 7 bytes of every archive.
pub const MAGIC: &[u8; 7] = b"PMTiles";
/// The version this module reads and writes.
pub const VERSION: u8 = 3;
/// Header length.
pub const HEADER_LEN: usize = 127;
/// Largest directory read, compressed or not: a leaf of a planet archive
/// is well under a megabyte; this only stops a lying length from
/// allocating gigabytes.
pub const MAX_DIRECTORY_BYTES: u64 = 32 * 1024 * 1024;
/// Largest metadata JSON read, compressed or not.
pub const MAX_METADATA_BYTES: u64 = 16 * 1024 * 1024;
/// Directory levels below the root that are followed: writers produce a
/// root and one level of leaves, and every further level multiplies the
/// work a tiny file can ask for (three levels of 2,048 pointers to one leaf
/// are 8.6 billion directory reads), so a leaf that points to a leaf is
/// refused.
pub const MAX_DEPTH: u32 = 1;
/// Inflated directory bytes one walk reads at most, all directories
/// together: a country extract's leaves are a few megabytes, and
/// [`MAX_ADDRESSED_TILES`] entries of a few bytes each fit well within it;
/// it stops an archive whose root points at the same huge leaf millions of
/// times.
pub const MAX_TOTAL_DIRECTORY_BYTES: u64 = 256 * 1024 * 1024;
/// Tiles an archive may address (sum of run lengths): every addressed
/// tile becomes a pinned object of ~120 bytes of index, so 16 Mi tiles are
/// about 2 GB of index, a large country to zoom 14. Extract a region
/// (`pmtiles extract`) to import part of a bigger archive.
pub const MAX_ADDRESSED_TILES: u64 = 16 * 1024 * 1024;
/// Entries per leaf the writer uses when the root would hold more than
/// [`WriteOptions::root_entries`].
pub const LEAF_ENTRIES: usize = 4096;

/// Compression codes of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// 0: not stated.
    Unknown,
    /// 1.
    None,
    /// 2.
    Gzip,
    /// 3.
    Brotli,
    /// 4.
    Zstd,
    /// Any other code.
    Other(u8),
}

impl Compression {
    fn from_code(c: u8) -> Compression {
        match c {
            0 => Compression::Unknown,
            1 => Compression::None,
            2 => Compression::Gzip,
            3 => Compression::Brotli,
            4 => Compression::Zstd,
            c => Compression::Other(c),
        }
    }

    fn code(self) -> u8 {
        match self {
            Compression::Unknown => 0,
            Compression::None => 1,
            Compression::Gzip => 2,
            Compression::Brotli => 3,
            Compression::Zstd => 4,
            Compression::Other(c) => c,
        }
    }

    /// Its name in the spec.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Unknown => "unknown",
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Brotli => "brotli",
            Compression::Zstd => "zstd",
            Compression::Other(_) => "undefined",
        }
    }
}

/// Tile type codes of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileType {
    /// 0: not stated.
    Unknown,
    /// 1: Mapbox vector tiles.
    Mvt,
    /// 2.
    Png,
    /// 3.
    Jpeg,
    /// 4.
    Webp,
    /// 5.
    Avif,
    /// Any other code.
    Other(u8),
}

impl TileType {
    fn from_code(c: u8) -> TileType {
        match c {
            0 => TileType::Unknown,
            1 => TileType::Mvt,
            2 => TileType::Png,
            3 => TileType::Jpeg,
            4 => TileType::Webp,
            5 => TileType::Avif,
            c => TileType::Other(c),
        }
    }

    fn code(self) -> u8 {
        match self {
            TileType::Unknown => 0,
            TileType::Mvt => 1,
            TileType::Png => 2,
            TileType::Jpeg => 3,
            TileType::Webp => 4,
            TileType::Avif => 5,
            TileType::Other(c) => c,
        }
    }
}

/// Why an archive cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PmtilesError {
    /// Reading the file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The file does not start with `PMTiles`.
    #[error("no \"PMTiles\" magic")]
    NotPmtiles,
    /// A version other than 3.
    #[error("PMTiles version {0} is not supported (only version 3)")]
    Version(u8),
    /// A section or piece of data ends past the end of the file.
    #[error("truncated: the {what} ends at byte {end} but the file has {len} bytes")]
    Truncated {
        /// What was cut off.
        what: &'static str,
        /// Where it should end.
        end: u64,
        /// The file's length.
        len: u64,
    },
    /// A compression this reader does not implement.
    #[error("{what} compression {} ({}) is not supported (none or gzip only)", .code.code(), .code.name())]
    Compression {
        /// `internal` or `tile`.
        what: &'static str,
        /// The header's code.
        code: Compression,
    },
    /// A directory or the metadata is larger than allowed.
    #[error("the {what} is larger than {max} bytes")]
    TooLarge {
        /// What.
        what: &'static str,
        /// The limit.
        max: u64,
    },
    /// Malformed bytes.
    #[error("corrupt {what}: {reason}")]
    Corrupt {
        /// `directory`, `metadata`...
        what: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// An entry points outside its section.
    #[error("the entry for tile id {tile_id} points outside the {section} section")]
    OutOfBounds {
        /// The entry's first tile id.
        tile_id: u64,
        /// `tile data` or `leaf directories`.
        section: &'static str,
    },
    /// Tile ids repeat or go backwards.
    #[error("tile id {0} repeats or goes backwards")]
    Order(u64),
    /// A leaf directory points to another leaf directory (only root →
    /// leaves is followed, see [`MAX_DEPTH`]).
    #[error("a leaf directory points to another leaf directory (only {MAX_DEPTH} level of leaves is read)")]
    TooDeep,
    /// Reading the archive would cost more than a budget allows.
    #[error("the archive exceeds the import budget: {what} over {max}")]
    Budget {
        /// `tiles addressed`, `directory bytes (all directories, inflated)`.
        what: &'static str,
        /// The budget.
        max: u64,
    },
    /// The walk was cancelled ([`Archive::set_cancel`]).
    #[error("cancelled")]
    Cancelled,
    /// The header's counts disagree with the directories.
    #[error("the header says {header} {what} but the directories hold {found}")]
    Mismatch {
        /// Which count.
        what: &'static str,
        /// The header's.
        header: u64,
        /// Counted.
        found: u64,
    },
}

fn corrupt(what: &'static str, reason: &'static str) -> PmtilesError {
    PmtilesError::Corrupt { what, reason }
}

/// The header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Root directory offset.
    pub root_offset: u64,
    /// Root directory length.
    pub root_length: u64,
    /// Metadata offset.
    pub metadata_offset: u64,
    /// Metadata length.
    pub metadata_length: u64,
    /// Leaf directories offset.
    pub leaf_offset: u64,
    /// Leaf directories length.
    pub leaf_length: u64,
    /// Tile data offset.
    pub data_offset: u64,
    /// Tile data length.
    pub data_length: u64,
    /// Tiles addressed (sum of run lengths); 0 = not stated.
    pub addressed_tiles: u64,
    /// Tile entries; 0 = not stated.
    pub tile_entries: u64,
    /// Distinct tile contents; 0 = not stated.
    pub tile_contents: u64,
    /// Tile data ordered by tile id.
    pub clustered: bool,
    /// Compression of directories and metadata.
    pub internal_compression: Compression,
    /// Compression of tiles.
    pub tile_compression: Compression,
    /// Tile type.
    pub tile_type: TileType,
    /// Lowest zoom.
    pub min_zoom: u8,
    /// Highest zoom.
    pub max_zoom: u8,
    /// West, south, east, north in degrees × 10^7.
    pub bounds_e7: [i32; 4],
    /// Center zoom.
    pub center_zoom: u8,
    /// Center longitude, latitude in degrees × 10^7.
    pub center_e7: [i32; 2],
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_le_bytes(a)
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes of an archive.
    ///
    /// # Errors
    /// [`PmtilesError::NotPmtiles`], [`PmtilesError::Version`].
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, PmtilesError> {
        if &b[..7] != MAGIC {
            return Err(PmtilesError::NotPmtiles);
        }
        if b[7] != VERSION {
            return Err(PmtilesError::Version(b[7]));
        }
        Ok(Header {
            root_offset: u64_at(b, 8),
            root_length: u64_at(b, 16),
            metadata_offset: u64_at(b, 24),
            metadata_length: u64_at(b, 32),
            leaf_offset: u64_at(b, 40),
            leaf_length: u64_at(b, 48),
            data_offset: u64_at(b, 56),
            data_length: u64_at(b, 64),
            addressed_tiles: u64_at(b, 72),
            tile_entries: u64_at(b, 80),
            tile_contents: u64_at(b, 88),
            clustered: b[96] == 1,
            internal_compression: Compression::from_code(b[97]),
            tile_compression: Compression::from_code(b[98]),
            tile_type: TileType::from_code(b[99]),
            min_zoom: b[100],
            max_zoom: b[101],
            bounds_e7: [
                i32_at(b, 102),
                i32_at(b, 106),
                i32_at(b, 110),
                i32_at(b, 114),
            ],
            center_zoom: b[118],
            center_e7: [i32_at(b, 119), i32_at(b, 123)],
        })
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..7].copy_from_slice(MAGIC);
        b[7] = VERSION;
        let words = [
            self.root_offset,
            self.root_length,
            self.metadata_offset,
            self.metadata_length,
            self.leaf_offset,
            self.leaf_length,
            self.data_offset,
            self.data_length,
            self.addressed_tiles,
            self.tile_entries,
            self.tile_contents,
        ];
        for (i, w) in words.iter().enumerate() {
            b[8 + i * 8..16 + i * 8].copy_from_slice(&w.to_le_bytes());
        }
        b[96] = u8::from(self.clustered);
        b[97] = self.internal_compression.code();
        b[98] = self.tile_compression.code();
        b[99] = self.tile_type.code();
        b[100] = self.min_zoom;
        b[101] = self.max_zoom;
        for (i, v) in self.bounds_e7.iter().enumerate() {
            b[102 + i * 4..106 + i * 4].copy_from_slice(&v.to_le_bytes());
        }
        b[118] = self.center_zoom;
        b[119..123].copy_from_slice(&self.center_e7[0].to_le_bytes());
        b[123..127].copy_from_slice(&self.center_e7[1].to_le_bytes());
        b
    }
}

/// One directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// First tile id.
    pub tile_id: u64,
    /// Offset in the tile data (or leaf) section.
    pub offset: u64,
    /// Bytes.
    pub length: u32,
    /// Tiles `tile_id..tile_id + run_length` share the bytes; 0 = a leaf.
    pub run_length: u32,
}

/// The first tile id of zoom `z` (the number of tiles on the zooms below):
/// `(4^z - 1) / 3`; `z` at most 31.
pub fn zoom_base(z: u8) -> u64 {
    ((1u64 << (2 * u32::from(z))) - 1) / 3
}

/// The tile id of a tile (Hilbert order within its zoom).
pub fn tile_id(t: TileId) -> u64 {
    let (mut x, mut y) = (u64::from(t.x), u64::from(t.y));
    let mut d = 0u64;
    let mut s = if t.z == 0 { 0 } else { 1u64 << (t.z - 1) };
    while s > 0 {
        let rx = u64::from(x & s != 0);
        let ry = u64::from(y & s != 0);
        d += s * s * ((3 * rx) ^ ry);
        x &= s - 1;
        y &= s - 1;
        if ry == 0 {
            if rx == 1 {
                x = s - 1 - x;
                y = s - 1 - y;
            }
            std::mem::swap(&mut x, &mut y);
        }
        s >>= 1;
    }
    zoom_base(t.z) + d
}

/// The tile a tile id names; `None` above [`MAX_ZOOM`].
pub fn tile_of(id: u64) -> Option<TileId> {
    let z = (0..=MAX_ZOOM).find(|z| id < zoom_base(z + 1))?;
    let mut t = id - zoom_base(z);
    let (mut x, mut y) = (0u64, 0u64);
    let n = 1u64 << z;
    let mut s = 1u64;
    while s < n {
        let rx = 1 & (t / 2);
        let ry = 1 & (t ^ rx);
        if ry == 0 {
            if rx == 1 {
                x = s - 1 - x;
                y = s - 1 - y;
            }
            std::mem::swap(&mut x, &mut y);
        }
        x += s * rx;
        y += s * ry;
        t /= 4;
        s *= 2;
    }
    Some(TileId {
        z,
        x: u32::try_from(x).ok()?,
        y: u32::try_from(y).ok()?,
    })
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64, PmtilesError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.b.get(self.at) else {
                return Err(corrupt("directory", "a varint runs past the end"));
            };
            self.at += 1;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(corrupt("directory", "a varint overflows 64 bits"));
            }
            v |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt("directory", "a varint overflows 64 bits"))
    }
}

/// Encodes a directory (uncompressed).
pub fn encode_directory(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 8 + 8);
    put_varint(&mut out, entries.len() as u64);
    let mut last = 0;
    for e in entries {
        put_varint(&mut out, e.tile_id - last);
        last = e.tile_id;
    }
    for e in entries {
        put_varint(&mut out, u64::from(e.run_length));
    }
    for e in entries {
        put_varint(&mut out, u64::from(e.length));
    }
    for (i, e) in entries.iter().enumerate() {
        let follows = i > 0 && {
            let p = &entries[i - 1];
            p.offset.checked_add(u64::from(p.length)) == Some(e.offset)
        };
        put_varint(&mut out, if follows { 0 } else { e.offset + 1 });
    }
    out
}

/// Decodes a directory (uncompressed).
///
/// # Errors
/// [`PmtilesError::Corrupt`] for bytes that are not a directory.
pub fn decode_directory(b: &[u8]) -> Result<Vec<Entry>, PmtilesError> {
    let mut r = Reader { b, at: 0 };
    let n = r.varint()?;
    // Every entry takes at least four bytes.
    if n > (b.len() as u64) / 4 {
        return Err(corrupt("directory", "more entries than bytes"));
    }
    let mut entries = Vec::with_capacity(n as usize);
    let mut id = 0u64;
    for i in 0..n {
        let delta = r.varint()?;
        if i > 0 && delta == 0 {
            return Err(PmtilesError::Order(id));
        }
        id = id
            .checked_add(delta)
            .ok_or(corrupt("directory", "tile id overflows"))?;
        entries.push(Entry {
            tile_id: id,
            offset: 0,
            length: 0,
            run_length: 0,
        });
    }
    for e in &mut entries {
        e.run_length =
            u32::try_from(r.varint()?).map_err(|_| corrupt("directory", "run length over 2^32"))?;
    }
    for e in &mut entries {
        e.length =
            u32::try_from(r.varint()?).map_err(|_| corrupt("directory", "length over 2^32"))?;
    }
    for i in 0..entries.len() {
        let v = r.varint()?;
        entries[i].offset = if v == 0 {
            if i == 0 {
                return Err(corrupt("directory", "the first offset is relative"));
            }
            let p = entries[i - 1];
            p.offset
                .checked_add(u64::from(p.length))
                .ok_or(corrupt("directory", "offset overflows"))?
        } else {
            v - 1
        };
    }
    if r.at != b.len() {
        return Err(corrupt("directory", "bytes after the last entry"));
    }
    Ok(entries)
}

fn decompress(
    what: &'static str,
    c: Compression,
    data: Vec<u8>,
    max: u64,
) -> Result<Vec<u8>, PmtilesError> {
    match c {
        Compression::None => Ok(data),
        Compression::Gzip => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&data[..])
                .take(max + 1)
                .read_to_end(&mut out)
                .map_err(|_| corrupt(what, "not a complete gzip stream"))?;
            if out.len() as u64 > max {
                return Err(PmtilesError::TooLarge { what, max });
            }
            Ok(out)
        }
        code => Err(PmtilesError::Compression {
            what: "internal",
            code,
        }),
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("writing to a Vec");
    e.finish().expect("writing to a Vec")
}

/// What [`Archive::validate`] counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Tiles addressed (sum of run lengths).
    pub addressed_tiles: u64,
    /// Tile entries.
    pub tile_entries: u64,
}

/// An open archive.
#[derive(Debug)]
pub struct Archive {
    file: File,
    len: u64,
    header: Header,
    /// Set by another thread to stop a walk at the next directory or entry.
    cancel: Option<Arc<AtomicBool>>,
}

/// Tile ids seen so far by a walk, and what it has cost.
struct Walk {
    next_id: u64,
    summary: Summary,
    /// Inflated directory bytes read so far.
    directory_bytes: u64,
}

/// One past the last tile id of zoom [`MAX_ZOOM`].
fn tile_id_end() -> u64 {
    zoom_base(MAX_ZOOM + 1)
}

impl Archive {
    /// Opens `path`, reads the header and checks every section lies inside
    /// the file and the internal compression is readable.
    ///
    /// # Errors
    /// See [`PmtilesError`].
    pub fn open(path: &Path) -> Result<Archive, PmtilesError> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut b = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match file.read(&mut b[got..])? {
                0 => break,
                n => got += n,
            }
        }
        // Magic and version first: they say what the file is.
        if got < MAGIC.len() || &b[..MAGIC.len()] != MAGIC {
            return Err(PmtilesError::NotPmtiles);
        }
        if got > MAGIC.len() && b[7] != VERSION {
            return Err(PmtilesError::Version(b[7]));
        }
        if got < HEADER_LEN {
            return Err(PmtilesError::Truncated {
                what: "header",
                end: HEADER_LEN as u64,
                len,
            });
        }
        let header = Header::parse(&b)?;
        for (what, off, n) in [
            ("root directory", header.root_offset, header.root_length),
            ("metadata", header.metadata_offset, header.metadata_length),
            ("leaf directories", header.leaf_offset, header.leaf_length),
            ("tile data", header.data_offset, header.data_length),
        ] {
            let end = off.checked_add(n).ok_or(corrupt("header", what))?;
            if end > len {
                return Err(PmtilesError::Truncated { what, end, len });
            }
        }
        if header.root_length == 0 {
            return Err(corrupt("header", "no root directory"));
        }
        if !matches!(
            header.internal_compression,
            Compression::None | Compression::Gzip
        ) {
            return Err(PmtilesError::Compression {
                what: "internal",
                code: header.internal_compression,
            });
        }
        check_counts(&header)?;
        Ok(Archive {
            file,
            len,
            header,
            cancel: None,
        })
    }

    /// Walks stop with [`PmtilesError::Cancelled`] once `flag` is set.
    pub fn set_cancel(&mut self, flag: Arc<AtomicBool>) {
        self.cancel = Some(flag);
    }

    fn check_cancel(&self) -> Result<(), PmtilesError> {
        match &self.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(PmtilesError::Cancelled),
            _ => Ok(()),
        }
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn read_at(&mut self, at: u64, n: u64, what: &'static str) -> Result<Vec<u8>, PmtilesError> {
        let end = at.checked_add(n).ok_or(corrupt(what, "offset overflows"))?;
        if end > self.len {
            return Err(PmtilesError::Truncated {
                what,
                end,
                len: self.len,
            });
        }
        self.file.seek(SeekFrom::Start(at))?;
        let mut buf = vec![0u8; n as usize];
        self.file.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                PmtilesError::Truncated {
                    what,
                    end,
                    len: self.len,
                }
            } else {
                PmtilesError::Io(e)
            }
        })?;
        Ok(buf)
    }

    fn directory(&mut self, at: u64, n: u64, w: &mut Walk) -> Result<Vec<Entry>, PmtilesError> {
        self.check_cancel()?;
        let over_budget = PmtilesError::Budget {
            what: "directory bytes (all directories, inflated)",
            max: MAX_TOTAL_DIRECTORY_BYTES,
        };
        if w.directory_bytes.saturating_add(n) > MAX_TOTAL_DIRECTORY_BYTES {
            return Err(over_budget);
        }
        if n > MAX_DIRECTORY_BYTES {
            return Err(PmtilesError::TooLarge {
                what: "directory",
                max: MAX_DIRECTORY_BYTES,
            });
        }
        let raw = self.read_at(at, n, "directory")?;
        let b = decompress(
            "directory",
            self.header.internal_compression,
            raw,
            MAX_DIRECTORY_BYTES,
        )?;
        w.directory_bytes = w.directory_bytes.saturating_add(b.len() as u64);
        if w.directory_bytes > MAX_TOTAL_DIRECTORY_BYTES {
            return Err(over_budget);
        }
        decode_directory(&b)
    }

    /// The metadata JSON text (decompressed; not parsed).
    ///
    /// # Errors
    /// See [`PmtilesError`].
    pub fn metadata(&mut self) -> Result<Vec<u8>, PmtilesError> {
        let (at, n) = (self.header.metadata_offset, self.header.metadata_length);
        if n > MAX_METADATA_BYTES {
            return Err(PmtilesError::TooLarge {
                what: "metadata",
                max: MAX_METADATA_BYTES,
            });
        }
        let raw = self.read_at(at, n, "metadata")?;
        decompress(
            "metadata",
            self.header.internal_compression,
            raw,
            MAX_METADATA_BYTES,
        )
    }

    /// The bytes of a tile entry.
    ///
    /// # Errors
    /// See [`PmtilesError`].
    pub fn tile_data(&mut self, e: &Entry) -> Result<Vec<u8>, PmtilesError> {
        if e.offset.saturating_add(u64::from(e.length)) > self.header.data_length {
            return Err(PmtilesError::OutOfBounds {
                tile_id: e.tile_id,
                section: "tile data",
            });
        }
        self.read_at(
            self.header.data_offset + e.offset,
            u64::from(e.length),
            "tile data",
        )
    }

    /// Walks every directory, checking it, and calls `visit` with every
    /// tile entry in tile id order until it returns `false`.
    ///
    /// # Errors
    /// See [`PmtilesError`]; `visit`'s own.
    pub fn for_each_entry(
        &mut self,
        mut visit: impl FnMut(&mut Archive, &Entry) -> Result<bool, PmtilesError>,
    ) -> Result<Summary, PmtilesError> {
        let mut w = Walk {
            next_id: 0,
            summary: Summary::default(),
            directory_bytes: 0,
        };
        let (at, n) = (self.header.root_offset, self.header.root_length);
        self.walk(at, n, 0, &mut w, &mut visit)?;
        Ok(w.summary)
    }

    fn walk(
        &mut self,
        at: u64,
        n: u64,
        depth: u32,
        w: &mut Walk,
        visit: &mut dyn FnMut(&mut Archive, &Entry) -> Result<bool, PmtilesError>,
    ) -> Result<bool, PmtilesError> {
        let entries = self.directory(at, n, w)?;
        if depth > 0 && entries.is_empty() {
            // The spec wants directories non-empty; an empty leaf would also
            // let the same leaf be visited again without tile ids advancing.
            return Err(corrupt("directory", "an empty leaf directory"));
        }
        for e in entries {
            self.check_cancel()?;
            if e.run_length == 0 {
                if depth >= MAX_DEPTH {
                    return Err(PmtilesError::TooDeep);
                }
                if e.tile_id < w.next_id {
                    return Err(PmtilesError::Order(e.tile_id));
                }
                // The leaf's tiles start at its pointer's id: what it holds
                // below that id would repeat tiles already walked.
                w.next_id = e.tile_id;
                if e.offset.saturating_add(u64::from(e.length)) > self.header.leaf_length {
                    return Err(PmtilesError::OutOfBounds {
                        tile_id: e.tile_id,
                        section: "leaf directories",
                    });
                }
                let leaf = self.header.leaf_offset + e.offset;
                if !self.walk(leaf, u64::from(e.length), depth + 1, w, visit)? {
                    return Ok(false);
                }
                continue;
            }
            if e.tile_id < w.next_id {
                return Err(PmtilesError::Order(e.tile_id));
            }
            if e.offset.saturating_add(u64::from(e.length)) > self.header.data_length {
                return Err(PmtilesError::OutOfBounds {
                    tile_id: e.tile_id,
                    section: "tile data",
                });
            }
            w.next_id = e
                .tile_id
                .checked_add(u64::from(e.run_length))
                .ok_or(corrupt("directory", "tile id overflows"))?;
            if w.next_id > tile_id_end() {
                return Err(corrupt("directory", "a tile id beyond the highest zoom"));
            }
            w.summary.addressed_tiles += u64::from(e.run_length);
            if w.summary.addressed_tiles > MAX_ADDRESSED_TILES {
                return Err(PmtilesError::Budget {
                    what: "tiles addressed",
                    max: MAX_ADDRESSED_TILES,
                });
            }
            w.summary.tile_entries += 1;
            if !visit(self, &e)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Walks every directory (see [`Archive::for_each_entry`]) and checks
    /// the header's tile counts (where stated) against what it found.
    ///
    /// # Errors
    /// See [`PmtilesError`].
    pub fn validate(&mut self) -> Result<Summary, PmtilesError> {
        let s = self.for_each_entry(|_, _| Ok(true))?;
        let h = &self.header;
        for (what, header, found) in [
            ("addressed tiles", h.addressed_tiles, s.addressed_tiles),
            ("tile entries", h.tile_entries, s.tile_entries),
        ] {
            if header != 0 && header != found {
                return Err(PmtilesError::Mismatch {
                    what,
                    header,
                    found,
                });
            }
        }
        Ok(s)
    }
}

/// The header's own counts, before any directory is read: a claim beyond
/// the budget, or counts that cannot all be true, refuse the archive.
fn check_counts(h: &Header) -> Result<(), PmtilesError> {
    if h.addressed_tiles > MAX_ADDRESSED_TILES {
        return Err(PmtilesError::Budget {
            what: "tiles addressed",
            max: MAX_ADDRESSED_TILES,
        });
    }
    let stated = |n: u64| n != 0;
    if stated(h.addressed_tiles) && stated(h.tile_entries) && h.tile_entries > h.addressed_tiles {
        return Err(corrupt("header", "more tile entries than tiles addressed"));
    }
    if stated(h.tile_entries) && stated(h.tile_contents) && h.tile_contents > h.tile_entries {
        return Err(corrupt("header", "more tile contents than tile entries"));
    }
    Ok(())
}

/// What [`write`] makes.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// The header's tile type.
    pub tile_type: TileType,
    /// The header's tile compression (the bytes are written as given).
    pub tile_compression: Compression,
    /// Compression of directories and metadata: `None` or `Gzip`.
    pub internal_compression: Compression,
    /// Metadata JSON.
    pub metadata: String,
    /// Entries the root directory may hold; beyond, leaves of
    /// [`LEAF_ENTRIES`] entries (the spec wants header + root within
    /// 16 KiB, so a few hundred at most).
    pub root_entries: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            tile_type: TileType::Png,
            tile_compression: Compression::None,
            internal_compression: Compression::Gzip,
            metadata: "{}".into(),
            root_entries: 1000,
        }
    }
}

/// Builds an archive in memory: identical bodies stored once, consecutive
/// tile ids with the same body as one run. Duplicate tiles: the last wins.
pub fn write(tiles: &[(TileId, Vec<u8>)], opts: &WriteOptions) -> Vec<u8> {
    let internal = |b: Vec<u8>| match opts.internal_compression {
        Compression::Gzip => gzip(&b),
        _ => b,
    };
    let mut by_id: Vec<(u64, &[u8])> = tiles.iter().map(|(t, b)| (tile_id(*t), &b[..])).collect();
    by_id.sort_by_key(|(id, _)| *id);
    let mut dedup: Vec<(u64, &[u8])> = Vec::with_capacity(by_id.len());
    for (id, b) in by_id {
        match dedup.last_mut() {
            Some(last) if last.0 == id => last.1 = b,
            _ => dedup.push((id, b)),
        }
    }
    let mut data = Vec::new();
    let mut seen: HashMap<&[u8], (u64, u32)> = HashMap::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut contents = 0u64;
    for (id, body) in &dedup {
        let (offset, length) = *seen.entry(body).or_insert_with(|| {
            let at = data.len() as u64;
            data.extend_from_slice(body);
            contents += 1;
            (at, body.len() as u32)
        });
        if let Some(last) = entries.last_mut() {
            if last.offset == offset
                && last.length == length
                && last.tile_id + u64::from(last.run_length) == *id
            {
                last.run_length += 1;
                continue;
            }
        }
        entries.push(Entry {
            tile_id: *id,
            offset,
            length,
            run_length: 1,
        });
    }
    let (root, leaves) = if entries.len() <= opts.root_entries {
        (internal(encode_directory(&entries)), Vec::new())
    } else {
        let mut leaves = Vec::new();
        let mut root = Vec::new();
        for chunk in entries.chunks(LEAF_ENTRIES) {
            let leaf = internal(encode_directory(chunk));
            root.push(Entry {
                tile_id: chunk[0].tile_id,
                offset: leaves.len() as u64,
                length: leaf.len() as u32,
                run_length: 0,
            });
            leaves.extend_from_slice(&leaf);
        }
        (internal(encode_directory(&root)), leaves)
    };
    let metadata = internal(opts.metadata.clone().into_bytes());
    let zooms = dedup.iter().filter_map(|(id, _)| tile_of(*id)).map(|t| t.z);
    let (min_zoom, max_zoom) = zooms.fold((u8::MAX, 0), |(lo, hi), z| (lo.min(z), hi.max(z)));
    let min_zoom = min_zoom.min(max_zoom);
    let root_offset = HEADER_LEN as u64;
    let metadata_offset = root_offset + root.len() as u64;
    let leaf_offset = metadata_offset + metadata.len() as u64;
    let data_offset = leaf_offset + leaves.len() as u64;
    let header = Header {
        root_offset,
        root_length: root.len() as u64,
        metadata_offset,
        metadata_length: metadata.len() as u64,
        leaf_offset,
        leaf_length: leaves.len() as u64,
        data_offset,
        data_length: data.len() as u64,
        addressed_tiles: entries.iter().map(|e| u64::from(e.run_length)).sum(),
        tile_entries: entries.len() as u64,
        tile_contents: contents,
        clustered: false,
        internal_compression: opts.internal_compression,
        tile_compression: opts.tile_compression,
        tile_type: opts.tile_type,
        min_zoom,
        max_zoom,
        bounds_e7: [-1_800_000_000, -850_511_287, 1_800_000_000, 850_511_287],
        center_zoom: min_zoom,
        center_e7: [0, 0],
    };
    let mut out = header.encode().to_vec();
    out.extend_from_slice(&root);
    out.extend_from_slice(&metadata);
    out.extend_from_slice(&leaves);
    out.extend_from_slice(&data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(z: u8, x: u32, y: u32) -> TileId {
        TileId { z, x, y }
    }

    #[test]
    fn a_relative_offset_past_u64_max_is_corrupt_not_a_panic() {
        // Found by the `pmtiles` fuzz target: two entries, the first at
        // offset 2^64 - 1, the second "right after it".
        let b = [
            0x02, 0x00, 0x01, 0x01, 0x01, 0x02, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0x01, 0x00,
        ];
        assert!(matches!(
            decode_directory(&b),
            Err(PmtilesError::Corrupt { .. })
        ));
    }

    #[test]
    fn tile_ids_follow_the_spec() {
        // The spec's examples: zoom 0 is id 0, zoom 1 is ids 1-4 along a
        // Hilbert curve starting at the top left.
        assert_eq!(tile_id(t(0, 0, 0)), 0);
        assert_eq!(tile_id(t(1, 0, 0)), 1);
        assert_eq!(tile_id(t(1, 0, 1)), 2);
        assert_eq!(tile_id(t(1, 1, 1)), 3);
        assert_eq!(tile_id(t(1, 1, 0)), 4);
        assert_eq!(tile_id(t(2, 0, 0)), 5);
        assert_eq!(tile_id(t(3, 0, 0)), 21);
        // Every id of zooms 0-6 round-trips, in order, without gaps.
        let mut want = 0;
        for z in 0..=6u8 {
            let mut ids: Vec<u64> = (0..1u32 << z)
                .flat_map(|x| (0..1u32 << z).map(move |y| t(z, x, y)))
                .map(|tile| {
                    let id = tile_id(tile);
                    assert_eq!(tile_of(id), Some(tile));
                    id
                })
                .collect();
            ids.sort_unstable();
            for id in ids {
                assert_eq!(id, want);
                want += 1;
            }
        }
        let top = t(MAX_ZOOM, (1 << MAX_ZOOM) - 1, 0);
        assert_eq!(tile_of(tile_id(top)), Some(top));
        assert_eq!(tile_of(zoom_base(MAX_ZOOM + 1)), None);
    }

    #[test]
    fn directories_round_trip_and_reject_garbage() {
        let entries = vec![
            Entry {
                tile_id: 3,
                offset: 0,
                length: 10,
                run_length: 1,
            },
            Entry {
                tile_id: 4,
                offset: 10,
                length: 7,
                run_length: 30,
            },
            Entry {
                tile_id: 900,
                offset: 0,
                length: 10,
                run_length: 1,
            },
        ];
        let b = encode_directory(&entries);
        assert_eq!(decode_directory(&b).unwrap(), entries);
        for cut in 0..b.len() {
            assert!(decode_directory(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(decode_directory(&longer).is_err());
        // A count far beyond the bytes allocates nothing.
        let mut huge = Vec::new();
        put_varint(&mut huge, u64::MAX / 2);
        assert!(matches!(
            decode_directory(&huge),
            Err(PmtilesError::Corrupt { .. })
        ));
    }

    #[test]
    fn header_round_trips() {
        let b = write(
            &[(t(2, 1, 1), b"\x89PNG\r\n\x1a\nabc".to_vec())],
            &WriteOptions::default(),
        );
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&b[..HEADER_LEN]);
        let parsed = Header::parse(&h).unwrap();
        assert_eq!(parsed.encode(), h);
        assert_eq!((parsed.min_zoom, parsed.max_zoom), (2, 2));
        assert_eq!(parsed.addressed_tiles, 1);
    }
}
