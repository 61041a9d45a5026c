//! Chunk identifiers: the BLAKE3 hash of a chunk's bytes.

use std::fmt;
use std::str::FromStr;

/// The identity of a chunk: the BLAKE3 hash of its bytes.
///
/// Content addressing makes every chunk self-verifying (a reader recomputes
/// the hash and compares) and makes identical chunks from different volumes
/// collapse into one stored copy.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Length of an id in bytes.
    pub const LEN: usize = 32;

    /// The id of `data`.
    #[must_use]
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// The raw hash bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Build an id from a 32-byte slice.
    #[must_use]
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Self)
    }

    /// Lower-case hex, 64 characters.
    #[must_use]
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(HEX[usize::from(b >> 4)] as char);
            s.push(HEX[usize::from(b & 0xf)] as char);
        }
        s
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Twelve hex digits are plenty to tell chunks apart in logs and
        // assertion failures; the full id is in Display.
        write!(f, "ChunkId({}…)", &self.to_hex()[..12])
    }
}

/// A string that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a chunk id is 64 hex digits")]
#[non_exhaustive]
pub struct ParseChunkIdError;

impl FromStr for ChunkId {
    type Err = ParseChunkIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return Err(ParseChunkIdError);
        }
        let digit = |c: u8| -> Result<u8, ParseChunkIdError> {
            match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                b'A'..=b'F' => Ok(c - b'A' + 10),
                _ => Err(ParseChunkIdError),
            }
        };
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = (digit(s[2 * i])? << 4) | digit(s[2 * i + 1])?;
        }
        Ok(Self(out))
    }
}

impl serde::Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Zeros to compare against: slice equality compiles to `memcmp`, which is
/// fast even in unoptimised test builds.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Whether every byte of `data` is zero (an empty slice counts as zero).
///
/// All-zero chunks are never stored or sent: manifests record them as
/// `None`, which is how thin (sparse) images stay thin everywhere.
#[must_use]
pub fn is_zero(data: &[u8]) -> bool {
    data.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Most threads used to hash one batch of chunks. Hashing is the CPU cost
/// of every capture; racks have few cores and other work to do, so a batch
/// never takes more than four of them.
pub const MAX_HASH_THREADS: usize = 4;

/// Below this many bytes a batch is hashed on the calling thread: spawning
/// threads costs tens of microseconds, hashing 1 MiB about half a millisecond.
const PARALLEL_HASH_MIN_BYTES: usize = 1 << 20;

/// Hash every chunk of a batch, in parallel on up to [`MAX_HASH_THREADS`]
/// threads when the batch is big enough to be worth it.
#[must_use]
pub fn hash_many(chunks: &[&[u8]]) -> Vec<ChunkId> {
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(MAX_HASH_THREADS)
        .min(chunks.len());
    if threads <= 1 || total < PARALLEL_HASH_MIN_BYTES {
        return chunks.iter().map(|c| ChunkId::of(c)).collect();
    }
    let mut out = vec![ChunkId([0; 32]); chunks.len()];
    let per = chunks.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (ins, outs) in chunks.chunks(per).zip(out.chunks_mut(per)) {
            s.spawn(move || {
                for (i, o) in ins.iter().zip(outs.iter_mut()) {
                    *o = ChunkId::of(i);
                }
            });
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_serde() {
        let id = ChunkId::of(b"hello");
        let hex = id.to_string();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(hex.parse::<ChunkId>().unwrap(), id);
        assert_eq!(hex.to_uppercase().parse::<ChunkId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{hex}\""));
        assert_eq!(serde_json::from_str::<ChunkId>(&json).unwrap(), id);
        assert!("xyz".parse::<ChunkId>().is_err());
        assert!(hex[..63].parse::<ChunkId>().is_err());
        assert!(format!("{hex}g")[1..].parse::<ChunkId>().is_err());
    }

    #[test]
    fn parallel_hashing_matches_serial() {
        let data: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 65536]).collect();
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let ids = hash_many(&refs);
        for (d, id) in data.iter().zip(&ids) {
            assert_eq!(*id, ChunkId::of(d));
        }
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0; 200_000]));
        let mut v = vec![0; 200_000];
        v[199_999] = 1;
        assert!(!is_zero(&v));
        v[199_999] = 0;
        v[0] = 1;
        assert!(!is_zero(&v));
    }
}
