//! Snapshot manifests: the ordered chunk ids of one generation of a volume.
//!
//! # Encoding (version 1, little-endian)
//! ```text
//! magic "FRMF" | version u8 = 1 | flags u8 = 0 | name_len u8 | reserved u8 = 0
//! generation u64 | size u64 | chunk_size u32 | created_at_ms u64
//! volume name (name_len bytes)
//! presence bitmap: ceil(n / 8) bytes, bit i set = chunk i is stored
//!                  (clear = all-zero chunk); n = ceil(size / chunk_size)
//! ids of the present chunks, 32 bytes each, in order
//! checksum: the first 16 bytes of BLAKE3 over everything before it
//! ```
//! A 4 GiB volume of 64 KiB chunks encodes in at most 2 MiB + 8 KiB; a thin
//! one in far less, since zero chunks cost one bit. The chunk count follows
//! from `size` and `chunk_size`, so the decoder knows the exact length to
//! expect before allocating anything: hostile bytes can neither panic it
//! nor make it allocate more than the input's own size.

use std::collections::HashSet;

use crate::id::ChunkId;
use crate::volume::names::{validate_name, NameError};

pub mod delta;

const MAGIC: [u8; 4] = *b"FRMF";
/// Current encoding version.
pub const MANIFEST_VERSION: u8 = 1;
const FIXED_HEADER: usize = 4 + 4 + 8 + 8 + 4 + 8;
const CHECKSUM_LEN: usize = 16;

/// Smallest chunk size a manifest may use (one disk block).
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest chunk size a manifest may use (the chunk store's limit).
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Largest volume a manifest may describe: 64 TiB, far beyond any rack
/// disk, yet small enough that sizes and chunk counts never overflow.
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;

/// One generation of a volume: which chunk holds each `chunk_size` slice of
/// the image. Immutable once written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Volume name.
    pub volume: String,
    /// Generation: strictly increasing per volume.
    pub generation: u64,
    /// Image size in bytes.
    pub size: u64,
    /// Bytes per chunk (the last chunk may be shorter).
    pub chunk_size: u32,
    /// One entry per chunk; `None` is an all-zero chunk (never stored).
    pub chunks: Vec<Option<ChunkId>>,
    /// When the point in time was captured (ms since the Unix epoch).
    pub created_at_ms: u64,
}

/// Why a manifest's fields are inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidManifest {
    /// The volume name is not valid.
    #[error("volume name: {0}")]
    Name(#[from] NameError),
    /// `chunk_size` is not a power of two in [4 KiB, 16 MiB].
    #[error("chunk size {0} is not a power of two between 4 KiB and 16 MiB")]
    ChunkSize(u32),
    /// `size` is zero or above [`MAX_VOLUME_SIZE`].
    #[error("volume size {0} out of range")]
    Size(u64),
    /// `chunks.len()` is not `ceil(size / chunk_size)`.
    #[error("{got} chunk entries, the size needs {want}")]
    ChunkCount {
        /// Entries present.
        got: usize,
        /// Entries needed.
        want: u64,
    },
    /// Generation 0 is the "no snapshot yet" state, never a manifest.
    #[error("generation 0 is not a snapshot")]
    GenerationZero,
}

/// Why bytes are not a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Shorter than the fixed header.
    #[error("truncated manifest")]
    Truncated,
    /// Not a manifest at all.
    #[error("not a manifest (bad magic)")]
    BadMagic,
    /// A version this code does not read.
    #[error("unsupported manifest version {0}")]
    UnsupportedVersion(u8),
    /// Flags or reserved bytes set.
    #[error("unknown manifest flags")]
    UnknownFlags,
    /// The length does not match what the header implies.
    #[error("manifest is {got} bytes, its header implies {want}")]
    Length {
        /// Actual length.
        got: usize,
        /// Implied length.
        want: u64,
    },
    /// The checksum does not match (damaged in storage or transit).
    #[error("manifest checksum mismatch")]
    Checksum,
    /// Bitmap bits set past the last chunk.
    #[error("bits set past the last chunk")]
    TrailingBits,
    /// The name is not UTF-8.
    #[error("volume name is not UTF-8")]
    NameUtf8,
    /// The fields decode but are inconsistent.
    #[error(transparent)]
    Invalid(#[from] InvalidManifest),
}

/// Number of chunks of a `size`-byte image.
#[must_use]
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size.max(1)))
}

/// Whether `bitmap`, a presence bitmap of `n` entries (bit `i % 8` of byte
/// `i / 8`), has a bit set past entry `n` in its last byte: the encoding
/// and the delta both refuse that, so each bitmap has one valid form.
fn trailing_bits_set(bitmap: &[u8], n: usize) -> bool {
    !n.is_multiple_of(8) && bitmap.last().is_some_and(|b| b >> (n % 8) != 0)
}

fn check_chunk_size(cs: u32) -> Result<(), InvalidManifest> {
    if cs.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        Ok(())
    } else {
        Err(InvalidManifest::ChunkSize(cs))
    }
}

impl Manifest {
    /// Check that the fields are consistent.
    ///
    /// # Errors
    /// [`InvalidManifest`].
    pub fn validate(&self) -> Result<(), InvalidManifest> {
        validate_name(&self.volume)?;
        check_chunk_size(self.chunk_size)?;
        if self.size == 0 || self.size > MAX_VOLUME_SIZE {
            return Err(InvalidManifest::Size(self.size));
        }
        let want = chunk_count(self.size, self.chunk_size);
        if self.chunks.len() as u64 != want {
            return Err(InvalidManifest::ChunkCount {
                got: self.chunks.len(),
                want,
            });
        }
        if self.generation == 0 {
            return Err(InvalidManifest::GenerationZero);
        }
        Ok(())
    }

    /// Length in bytes of chunk `i` (the last one may be short).
    #[must_use]
    pub fn chunk_len(&self, i: usize) -> u32 {
        let start = i as u64 * u64::from(self.chunk_size);
        let len = self
            .size
            .saturating_sub(start)
            .min(u64::from(self.chunk_size));
        u32::try_from(len).unwrap_or(self.chunk_size)
    }

    /// The distinct chunks this manifest needs.
    #[must_use]
    pub fn referenced(&self) -> HashSet<ChunkId> {
        self.chunks.iter().flatten().copied().collect()
    }

    /// Bytes of stored (non-zero) chunk data the image needs, counting
    /// repeats.
    #[must_use]
    pub fn stored_bytes(&self) -> u64 {
        self.chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_some())
            .map(|(i, _)| u64::from(self.chunk_len(i)))
            .sum()
    }

    /// The canonical encoding (see the module docs).
    ///
    /// # Panics
    /// If the manifest does not [`validate`](Self::validate) (a bug in the
    /// caller: every manifest this crate builds or decodes is valid).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        if let Err(e) = self.validate() {
            panic!("encoding an invalid manifest: {e}");
        }
        let n = self.chunks.len();
        let present = self.chunks.iter().filter(|c| c.is_some()).count();
        let mut out = Vec::with_capacity(
            FIXED_HEADER + self.volume.len() + n.div_ceil(8) + 32 * present + CHECKSUM_LEN,
        );
        out.extend_from_slice(&MAGIC);
        out.push(MANIFEST_VERSION);
        out.push(0);
        out.push(u8::try_from(self.volume.len()).unwrap_or(u8::MAX));
        out.push(0);
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.created_at_ms.to_le_bytes());
        out.extend_from_slice(self.volume.as_bytes());
        let bitmap_at = out.len();
        out.resize(bitmap_at + n.div_ceil(8), 0);
        for (i, c) in self.chunks.iter().enumerate() {
            if c.is_some() {
                out[bitmap_at + i / 8] |= 1 << (i % 8);
            }
        }
        for id in self.chunks.iter().flatten() {
            out.extend_from_slice(id.as_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(&sum.as_bytes()[..CHECKSUM_LEN]);
        out
    }

    /// Decode and validate. Never panics; allocates at most in proportion
    /// to `bytes.len()`.
    ///
    /// # Errors
    /// [`DecodeError`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() < FIXED_HEADER + CHECKSUM_LEN {
            return Err(DecodeError::Truncated);
        }
        if bytes[..4] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if bytes[4] != MANIFEST_VERSION {
            return Err(DecodeError::UnsupportedVersion(bytes[4]));
        }
        if bytes[5] != 0 || bytes[7] != 0 {
            return Err(DecodeError::UnknownFlags);
        }
        let name_len = usize::from(bytes[6]);
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
        let generation = u64_at(8);
        let size = u64_at(16);
        let chunk_size = u32::from_le_bytes(bytes[24..28].try_into().unwrap_or([0; 4]));
        let created_at_ms = u64_at(28);
        check_chunk_size(chunk_size)?;
        if size == 0 || size > MAX_VOLUME_SIZE {
            return Err(InvalidManifest::Size(size).into());
        }
        let n = chunk_count(size, chunk_size);
        let bitmap_len = n.div_ceil(8);
        // Length check before trusting any count: the ids' length needs the
        // bitmap, and the bitmap is only read once it is known to fit.
        let min = FIXED_HEADER as u64 + name_len as u64 + bitmap_len + CHECKSUM_LEN as u64;
        if (bytes.len() as u64) < min {
            return Err(DecodeError::Length {
                got: bytes.len(),
                want: min,
            });
        }
        let name_at = FIXED_HEADER;
        let bitmap_at = name_at + name_len;
        let bitmap_len = usize::try_from(bitmap_len).map_err(|_| DecodeError::Truncated)?;
        let bitmap = &bytes[bitmap_at..bitmap_at + bitmap_len];
        let present: u64 = bitmap.iter().map(|b| u64::from(b.count_ones())).sum();
        let want = min + 32 * present;
        if bytes.len() as u64 != want {
            return Err(DecodeError::Length {
                got: bytes.len(),
                want,
            });
        }
        let body_len = bytes.len() - CHECKSUM_LEN;
        if blake3::hash(&bytes[..body_len]).as_bytes()[..CHECKSUM_LEN] != bytes[body_len..] {
            return Err(DecodeError::Checksum);
        }
        // n fits in usize: the bitmap (n / 8 bytes) is inside `bytes`.
        let n = usize::try_from(n).map_err(|_| DecodeError::Truncated)?;
        if trailing_bits_set(bitmap, n) {
            return Err(DecodeError::TrailingBits);
        }
        let volume = std::str::from_utf8(&bytes[name_at..bitmap_at])
            .map_err(|_| DecodeError::NameUtf8)?
            .to_owned();
        let mut ids = bytes[bitmap_at + bitmap_len..body_len].chunks_exact(32);
        let mut chunks = Vec::with_capacity(n);
        for i in 0..n {
            if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                chunks.push(ids.next().and_then(ChunkId::from_slice));
            } else {
                chunks.push(None);
            }
        }
        let m = Self {
            volume,
            generation,
            size,
            chunk_size,
            chunks,
            created_at_ms,
        };
        m.validate()?;
        Ok(m)
    }

    /// The manifest's identity: BLAKE3 of its encoding.
    #[must_use]
    pub fn id(&self) -> ChunkId {
        ChunkId::of(&self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        (
            "[a-z0-9-]{1,64}",
            1..u64::MAX,
            prop_oneof![Just(4096u32), Just(65536), Just(1 << 20)],
            1u64..3_000_000,
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(volume, generation, chunk_size, size, seed, created_at_ms)| {
                    let n = chunk_count(size, chunk_size) as usize;
                    let chunks = (0..n)
                        .map(|i| {
                            let h = seed.wrapping_mul(i as u64 + 1).rotate_left(17);
                            (h % 3 != 0).then(|| ChunkId::of(&h.to_le_bytes()))
                        })
                        .collect();
                    Manifest {
                        volume,
                        generation,
                        size,
                        chunk_size,
                        chunks,
                        created_at_ms,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn round_trips(m in arb_manifest()) {
            let bytes = m.encode();
            let back = Manifest::decode(&bytes).unwrap();
            prop_assert_eq!(&back, &m);
            prop_assert_eq!(back.id(), m.id());
            let json = serde_json::to_string(&m).unwrap();
            prop_assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
        }

        #[test]
        fn decode_never_panics_on_noise(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = Manifest::decode(&bytes);
        }

        #[test]
        fn any_single_corruption_is_rejected(m in arb_manifest(), pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let mut bytes = m.encode();
            let i = pos.index(bytes.len());
            bytes[i] ^= flip;
            prop_assert!(Manifest::decode(&bytes).is_err());
        }

        #[test]
        fn truncation_and_extension_are_rejected(m in arb_manifest(), cut in any::<prop::sample::Index>(), extra in proptest::collection::vec(any::<u8>(), 1..40)) {
            let bytes = m.encode();
            let n = cut.index(bytes.len());
            prop_assert!(Manifest::decode(&bytes[..n]).is_err());
            let mut longer = bytes.clone();
            longer.extend_from_slice(&extra);
            prop_assert!(Manifest::decode(&longer).is_err());
        }

        /// Headers claiming huge volumes, with a valid checksum, are
        /// rejected by length before any allocation.
        #[test]
        fn hostile_headers_with_valid_checksums(size in any::<u64>(), cs_shift in 0u32..32, name_len in any::<u8>(), tail in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut b = Vec::new();
            b.extend_from_slice(&MAGIC);
            b.extend_from_slice(&[MANIFEST_VERSION, 0, name_len, 0]);
            b.extend_from_slice(&1u64.to_le_bytes());
            b.extend_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&(1u32 << cs_shift).to_le_bytes());
            b.extend_from_slice(&0u64.to_le_bytes());
            b.extend_from_slice(&tail);
            let sum = blake3::hash(&b);
            b.extend_from_slice(&sum.as_bytes()[..CHECKSUM_LEN]);
            let _ = Manifest::decode(&b);
        }
    }

    #[test]
    fn compact_for_thin_volumes() {
        let size = 4u64 << 30;
        let n = chunk_count(size, 65536) as usize;
        let mut chunks = vec![None; n];
        chunks[0] = Some(ChunkId::of(b"boot"));
        let m = Manifest {
            volume: "v".into(),
            generation: 1,
            size,
            chunk_size: 65536,
            chunks,
            created_at_ms: 0,
        };
        let enc = m.encode();
        assert_eq!(enc.len(), FIXED_HEADER + 1 + n / 8 + 32 + CHECKSUM_LEN);
        assert_eq!(m.referenced().len(), 1);
        assert_eq!(m.stored_bytes(), 65536);
    }

    #[test]
    fn invalid_manifests_are_rejected() {
        let ok = Manifest {
            volume: "v".into(),
            generation: 1,
            size: 10_000,
            chunk_size: 4096,
            chunks: vec![None; 3],
            created_at_ms: 0,
        };
        assert!(ok.validate().is_ok());
        assert_eq!(ok.chunk_len(2), 10_000 - 8192);
        let bad = |f: fn(&mut Manifest)| {
            let mut m = ok.clone();
            f(&mut m);
            m.validate().unwrap_err()
        };
        assert!(matches!(
            bad(|m| m.volume = "Bad".into()),
            InvalidManifest::Name(_)
        ));
        assert!(matches!(
            bad(|m| m.chunk_size = 5000),
            InvalidManifest::ChunkSize(_)
        ));
        assert!(matches!(
            bad(|m| m.chunks.push(None)),
            InvalidManifest::ChunkCount { .. }
        ));
        assert!(matches!(
            bad(|m| m.generation = 0),
            InvalidManifest::GenerationZero
        ));
        assert!(matches!(bad(|m| m.size = 0), InvalidManifest::Size(0)));
    }
}
