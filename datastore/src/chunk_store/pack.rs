//! On-disk encodings of the chunk store: pack files, index entries, pack
//! records in the index.
//!
//! A pack file is a 16-byte header followed by records; a record is a
//! 40-byte header (magic, length, chunk id) followed by the chunk's bytes.
//! The header lets the index be rebuilt by scanning packs (every record
//! names and so verifies itself); the index entry points straight at the
//! bytes.

use crate::ChunkId;

/// First bytes of every pack file: name and format version 1.
pub(crate) const PACK_MAGIC: [u8; 8] = *b"FRPACK\x00\x01";
/// Pack header: magic (8), pack number (u32 LE), reserved (4).
pub(crate) const PACK_HEADER_LEN: u64 = 16;
/// First bytes of every record.
pub(crate) const REC_MAGIC: [u8; 4] = *b"FRC1";
/// Record header: magic (4), data length (u32 LE), chunk id (32).
pub(crate) const REC_HEADER_LEN: u64 = 40;

/// Index key prefix for per-pack records (`b"pack"` + pack number BE).
/// Chunk keys are exactly 32 bytes, pack keys 8, meta keys other lengths,
/// so one sled tree holds all three and one `apply_batch` updates them
/// atomically.
pub(crate) const PACK_KEY_PREFIX: &[u8; 4] = b"pack";
/// Index key of the persisted dedup-hit counter.
pub(crate) const META_DEDUP_HITS: &[u8] = b"meta/dedup-hits";

pub(crate) fn pack_header(no: u32) -> [u8; PACK_HEADER_LEN as usize] {
    let mut h = [0u8; PACK_HEADER_LEN as usize];
    h[..8].copy_from_slice(&PACK_MAGIC);
    h[8..12].copy_from_slice(&no.to_le_bytes());
    h
}

pub(crate) fn record_header(id: &ChunkId, len: u32) -> [u8; REC_HEADER_LEN as usize] {
    let mut h = [0u8; REC_HEADER_LEN as usize];
    h[..4].copy_from_slice(&REC_MAGIC);
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..40].copy_from_slice(id.as_bytes());
    h
}

pub(crate) fn pack_file_name(no: u32) -> String {
    format!("{no:08}.pack")
}

pub(crate) fn parse_pack_file_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".pack")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(crate) fn pack_key(no: u32) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(PACK_KEY_PREFIX);
    k[4..].copy_from_slice(&no.to_be_bytes());
    k
}

pub(crate) fn parse_pack_key(k: &[u8]) -> Option<u32> {
    if k.len() != 8 || &k[..4] != PACK_KEY_PREFIX {
        return None;
    }
    Some(u32::from_be_bytes(k[4..8].try_into().ok()?))
}

/// Where a chunk's bytes are: pack number, offset of the data (after the
/// record header) and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Location {
    pub(crate) pack: u32,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

impl Location {
    pub(crate) const ENCODED_LEN: usize = 16;

    pub(crate) fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut b = [0u8; Self::ENCODED_LEN];
        b[..4].copy_from_slice(&self.pack.to_le_bytes());
        b[4..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != Self::ENCODED_LEN {
            return None;
        }
        Some(Self {
            pack: u32::from_le_bytes(b[..4].try_into().ok()?),
            offset: u64::from_le_bytes(b[4..12].try_into().ok()?),
            len: u32::from_le_bytes(b[12..16].try_into().ok()?),
        })
    }

    /// Bytes this chunk occupies in its pack, header included.
    pub(crate) fn footprint(&self) -> u64 {
        u64::from(self.len) + REC_HEADER_LEN
    }
}

/// What the index knows about one pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct PackInfo {
    /// Length of the pack known to be on disk (fsynced) when the index
    /// entries pointing into it were made durable. Anything past it is
    /// unindexed garbage from a crash and is truncated on open.
    pub(crate) synced_len: u64,
    /// Indexed chunks in the pack.
    pub(crate) live_count: u64,
    /// Their footprint (data + record headers).
    pub(crate) live_bytes: u64,
}

impl PackInfo {
    pub(crate) const ENCODED_LEN: usize = 24;

    pub(crate) fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut b = [0u8; Self::ENCODED_LEN];
        b[..8].copy_from_slice(&self.synced_len.to_le_bytes());
        b[8..16].copy_from_slice(&self.live_count.to_le_bytes());
        b[16..24].copy_from_slice(&self.live_bytes.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != Self::ENCODED_LEN {
            return None;
        }
        Some(Self {
            synced_len: u64::from_le_bytes(b[..8].try_into().ok()?),
            live_count: u64::from_le_bytes(b[8..16].try_into().ok()?),
            live_bytes: u64::from_le_bytes(b[16..24].try_into().ok()?),
        })
    }

    pub(crate) fn add(&mut self, loc: &Location) {
        self.live_count += 1;
        self.live_bytes += loc.footprint();
    }

    pub(crate) fn sub(&mut self, loc: &Location) {
        self.live_count = self.live_count.saturating_sub(1);
        self.live_bytes = self.live_bytes.saturating_sub(loc.footprint());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip() {
        let l = Location {
            pack: 7,
            offset: 1 << 40,
            len: 65536,
        };
        assert_eq!(Location::decode(&l.encode()), Some(l));
        assert_eq!(Location::decode(&[0; 3]), None);
        let p = PackInfo {
            synced_len: 99,
            live_count: 3,
            live_bytes: 12,
        };
        assert_eq!(PackInfo::decode(&p.encode()), Some(p));
        assert_eq!(parse_pack_key(&pack_key(42)), Some(42));
        assert_eq!(parse_pack_file_name(&pack_file_name(42)), Some(42));
        assert_eq!(parse_pack_file_name("0000004x.pack"), None);
        assert_eq!(parse_pack_file_name("42.pack"), None);
    }
}
