//! Manifest deltas: a generation's manifest as the changes from a base
//! generation the receiver already holds, so a push of a generation that
//! changed 1 % of a volume sends about 1 % of its manifest.
//!
//! # Encoding (version 1, little-endian)
//! ```text
//! magic "FRMD" | version u8 = 1 | reserved 3 bytes = 0
//! base_generation u64 | generation u64 | size u64 | chunk_size u32 | created_at_ms u64
//! runs u64
//! runs × ( start u64 | len u32 | presence bitmap ceil(len / 8) bytes
//!          | ids of the present chunks, 32 bytes each )
//! ```
//! The new manifest is the base's chunk list cut or extended (with zeros)
//! to the new chunk count, then every run written over it: a run is a
//! range of consecutive indices whose entries differ from the base. Runs
//! are in increasing order, do not overlap or touch, and lie inside the
//! new chunk count. The volume name is the base's.
//!
//! A delta carries no checksum of its own: [`apply`] rebuilds the whole
//! manifest and checks it against the full manifest's identity
//! ([`Manifest::id`]) the sender announced, so a damaged delta, a lying
//! peer, or a base that differs from the sender's are all refused with a
//! typed error, never turned into a wrong generation.

use super::{
    check_chunk_size, chunk_count, trailing_bits_set, InvalidManifest, Manifest, MAX_VOLUME_SIZE,
};
use crate::id::ChunkId;

const MAGIC: [u8; 4] = *b"FRMD";
/// Current delta encoding version.
pub const DELTA_VERSION: u8 = 1;
const HEADER: usize = 4 + 4 + 8 + 8 + 8 + 4 + 8 + 8;
/// Bytes of a run before its bitmap: start and length.
const RUN_HEADER: usize = 8 + 4;

/// Why a manifest delta was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaError {
    /// Shorter than its header or than a run it announces.
    #[error("truncated manifest delta")]
    Truncated,
    /// Not a manifest delta.
    #[error("not a manifest delta (bad magic)")]
    BadMagic,
    /// A version this code does not read.
    #[error("unsupported manifest delta version {0}")]
    UnsupportedVersion(u8),
    /// Reserved bytes set.
    #[error("unknown manifest delta flags")]
    UnknownFlags,
    /// The delta is against another generation than the base given.
    #[error("delta is against generation {delta}, the base is {base}")]
    WrongBase {
        /// The base generation the delta names.
        delta: u64,
        /// The generation of the base it was applied to.
        base: u64,
    },
    /// The new manifest would have more chunks than the caller allows.
    #[error("delta describes {got} chunks, at most {max} allowed")]
    TooManyChunks {
        /// Chunks described.
        got: u64,
        /// The bound.
        max: u64,
    },
    /// A run is empty, out of order, overlapping, or past the last chunk.
    #[error("bad run at index {start} (length {len})")]
    BadRun {
        /// Its first index.
        start: u64,
        /// Its length.
        len: u32,
    },
    /// Bytes left after the last run, or bitmap bits past a run's end.
    #[error("trailing bytes in manifest delta")]
    Trailing,
    /// The fields decode but the manifest is inconsistent.
    #[error(transparent)]
    Invalid(#[from] InvalidManifest),
    /// The rebuilt manifest is not the one announced: the delta is damaged,
    /// the peer lies, or our base differs from the sender's.
    #[error("rebuilt manifest {got} is not the announced {expected}")]
    Mismatch {
        /// The identity announced.
        expected: ChunkId,
        /// The identity of what the delta rebuilt.
        got: ChunkId,
    },
}

/// Whether index `i` of `new` differs from `base` (an index past the
/// base's end differs).
fn differs(base: &Manifest, new: &Manifest, i: usize) -> bool {
    base.chunks.get(i) != Some(&new.chunks[i])
}

/// How many of `new`'s indices differ from `base`: the size of a delta
/// between them, for choosing the best base.
#[must_use]
pub fn differences(base: &Manifest, new: &Manifest) -> usize {
    (0..new.chunks.len())
        .filter(|i| differs(base, new, *i))
        .count()
}

/// Encode `new` as a delta of `base` (both of the same volume).
#[must_use]
pub fn encode(base: &Manifest, new: &Manifest) -> Vec<u8> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    let n = new.chunks.len();
    while i < n {
        if !differs(base, new, i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && differs(base, new, i) {
            i += 1;
        }
        runs.push((start, i));
    }
    let mut out = Vec::with_capacity(HEADER + runs.len() * (RUN_HEADER + 1 + 32));
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[DELTA_VERSION, 0, 0, 0]);
    out.extend_from_slice(&base.generation.to_le_bytes());
    out.extend_from_slice(&new.generation.to_le_bytes());
    out.extend_from_slice(&new.size.to_le_bytes());
    out.extend_from_slice(&new.chunk_size.to_le_bytes());
    out.extend_from_slice(&new.created_at_ms.to_le_bytes());
    out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for (start, end) in runs {
        let len = end - start;
        out.extend_from_slice(&(start as u64).to_le_bytes());
        // A run is at most the whole manifest: ≤ 2^34 entries would not
        // fit, so split runs longer than u32 (never seen in practice).
        let len32 = u32::try_from(len).unwrap_or(u32::MAX);
        debug_assert_eq!(len32 as usize, len, "run longer than u32::MAX");
        out.extend_from_slice(&len32.to_le_bytes());
        let at = out.len();
        out.resize(at + len.div_ceil(8), 0);
        for (k, c) in new.chunks[start..end].iter().enumerate() {
            if c.is_some() {
                out[at + k / 8] |= 1 << (k % 8);
            }
        }
        for id in new.chunks[start..end].iter().flatten() {
            out.extend_from_slice(id.as_bytes());
        }
    }
    out
}

/// A cursor over the delta's bytes that never reads past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DeltaError> {
        let end = self.at.checked_add(n).ok_or(DeltaError::Truncated)?;
        let s = self.bytes.get(self.at..end).ok_or(DeltaError::Truncated)?;
        self.at = end;
        Ok(s)
    }

    fn u64(&mut self) -> Result<u64, DeltaError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn u32(&mut self) -> Result<u32, DeltaError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
}

/// Rebuild a manifest from `base` and `delta`, and check it is the
/// manifest whose identity ([`Manifest::id`]) is `expected`. At most
/// `max_chunks` entries are allocated (bound it by what a whole manifest
/// of the announced length could describe).
///
/// Never panics on hostile input; allocates at most `max_chunks` entries.
///
/// # Errors
/// [`DeltaError`].
pub fn apply(
    base: &Manifest,
    delta: &[u8],
    expected: &ChunkId,
    max_chunks: u64,
) -> Result<Manifest, DeltaError> {
    let mut r = Reader {
        bytes: delta,
        at: 0,
    };
    if r.take(4)? != MAGIC {
        return Err(DeltaError::BadMagic);
    }
    let v = r.take(4)?;
    if v[0] != DELTA_VERSION {
        return Err(DeltaError::UnsupportedVersion(v[0]));
    }
    if v[1..] != [0, 0, 0] {
        return Err(DeltaError::UnknownFlags);
    }
    let base_generation = r.u64()?;
    if base_generation != base.generation {
        return Err(DeltaError::WrongBase {
            delta: base_generation,
            base: base.generation,
        });
    }
    let generation = r.u64()?;
    let size = r.u64()?;
    let chunk_size = r.u32()?;
    let created_at_ms = r.u64()?;
    check_chunk_size(chunk_size)?;
    if size == 0 || size > MAX_VOLUME_SIZE {
        return Err(InvalidManifest::Size(size).into());
    }
    let n = chunk_count(size, chunk_size);
    if n > max_chunks {
        return Err(DeltaError::TooManyChunks {
            got: n,
            max: max_chunks,
        });
    }
    let n = usize::try_from(n).map_err(|_| DeltaError::TooManyChunks {
        got: n,
        max: max_chunks,
    })?;
    let runs = r.u64()?;
    // Every run takes at least RUN_HEADER + 1 bytes: refuse a count the
    // bytes cannot hold before looping.
    if runs > (delta.len().saturating_sub(r.at) / (RUN_HEADER + 1)) as u64 {
        return Err(DeltaError::Truncated);
    }
    let mut chunks = Vec::with_capacity(n);
    chunks.extend(base.chunks.iter().take(n).copied());
    chunks.resize(n, None);
    // End of the previous run: runs are maximal, so the next starts past it.
    let mut prev_end: Option<u64> = None;
    for _ in 0..runs {
        let start = r.u64()?;
        let len = r.u32()?;
        let bad = DeltaError::BadRun { start, len };
        let end = start.checked_add(u64::from(len)).ok_or(bad.clone())?;
        let ordered = prev_end.is_none_or(|p| start > p);
        if len == 0 || !ordered || end > n as u64 {
            return Err(bad);
        }
        prev_end = Some(end);
        let len = len as usize;
        let bitmap = r.take(len.div_ceil(8))?;
        if trailing_bits_set(bitmap, len) {
            return Err(DeltaError::Trailing);
        }
        let start = start as usize;
        for k in 0..len {
            chunks[start + k] = if bitmap[k / 8] & (1 << (k % 8)) != 0 {
                Some(ChunkId::from_slice(r.take(32)?).ok_or(DeltaError::Truncated)?)
            } else {
                None
            };
        }
    }
    if r.at != delta.len() {
        return Err(DeltaError::Trailing);
    }
    let m = Manifest {
        volume: base.volume.clone(),
        generation,
        size,
        chunk_size,
        chunks,
        created_at_ms,
    };
    m.validate()?;
    let got = m.id();
    if got != *expected {
        return Err(DeltaError::Mismatch {
            expected: *expected,
            got,
        });
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn manifest(generation: u64, chunks: Vec<Option<ChunkId>>) -> Manifest {
        let cs = 4096u32;
        Manifest {
            volume: "vol".into(),
            generation,
            size: (chunks.len() as u64 * u64::from(cs)).max(1),
            chunk_size: cs,
            chunks: if chunks.is_empty() {
                vec![None]
            } else {
                chunks
            },
            created_at_ms: generation * 1000,
        }
    }

    /// The bound a replica uses: what a whole manifest of the announced
    /// length could describe.
    fn bound(m: &Manifest) -> u64 {
        8 * m.encode().len() as u64
    }

    /// Chunk lists over a small id alphabet, so that pairs share entries.
    fn arb_chunks() -> impl Strategy<Value = Vec<Option<ChunkId>>> {
        proptest::collection::vec(
            proptest::option::of((0u8..6).prop_map(|b| ChunkId([b; 32]))),
            0..200,
        )
    }

    /// A base and a generation derived from it by random edits, resizing.
    fn arb_pair() -> impl Strategy<Value = (Manifest, Manifest)> {
        (arb_chunks(), arb_chunks(), any::<bool>()).prop_map(|(a, b, related)| {
            let b = if related {
                // Mostly the same: keep a's entries where b has None.
                a.iter()
                    .zip(b.iter().chain(std::iter::repeat(&None)))
                    .map(|(x, y)| y.or(*x))
                    .chain(b.iter().skip(a.len()).copied())
                    .collect()
            } else {
                b
            };
            (manifest(3, a), manifest(5, b))
        })
    }

    proptest! {
        #[test]
        fn apply_of_encode_is_the_full_manifest((base, new) in arb_pair()) {
            let d = encode(&base, &new);
            let got = apply(&base, &d, &new.id(), bound(&new)).unwrap();
            prop_assert_eq!(&got, &new);
            // A delta is never much bigger than the changes it carries.
            prop_assert!(d.len() <= HEADER + differences(&base, &new) * (RUN_HEADER + 1 + 32));
        }

        #[test]
        fn a_corrupted_delta_is_refused(
            (base, new) in arb_pair(),
            pos in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut d = encode(&base, &new);
            let p = pos.index(d.len());
            d[p] ^= flip;
            // Every byte matters: any change is refused.
            prop_assert!(apply(&base, &d, &new.id(), bound(&new)).is_err());
        }

        #[test]
        fn a_wrong_base_is_refused((base, new) in arb_pair(), other in arb_chunks()) {
            let d = encode(&base, &new);
            // Same generation number, different content: caught by the
            // identity check.
            let other = manifest(base.generation, other);
            match apply(&other, &d, &new.id(), bound(&new)) {
                Ok(m) => prop_assert_eq!(&m, &new),
                Err(e) => prop_assert!(matches!(e, DeltaError::Mismatch { .. }), "{e:?}"),
            }
            // Another generation: refused before anything is rebuilt.
            let older = manifest(base.generation - 1, base.chunks.clone());
            prop_assert_eq!(
                apply(&older, &d, &new.id(), bound(&new)).unwrap_err(),
                DeltaError::WrongBase { delta: base.generation, base: base.generation - 1 }
            );
        }

        #[test]
        fn apply_never_panics_on_noise(
            (base, _new) in arb_pair(),
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            max in 0u64..1000,
        ) {
            let _ = apply(&base, &bytes, &ChunkId([0; 32]), max);
        }
    }

    #[test]
    fn the_chunk_bound_is_checked_before_allocating() {
        let base = manifest(1, vec![Some(ChunkId([1; 32]))]);
        // A header claiming 64 TiB of 4 KiB chunks and no runs.
        let mut d = Vec::new();
        d.extend_from_slice(&MAGIC);
        d.extend_from_slice(&[DELTA_VERSION, 0, 0, 0]);
        d.extend_from_slice(&1u64.to_le_bytes());
        d.extend_from_slice(&2u64.to_le_bytes());
        d.extend_from_slice(&MAX_VOLUME_SIZE.to_le_bytes());
        d.extend_from_slice(&4096u32.to_le_bytes());
        d.extend_from_slice(&0u64.to_le_bytes());
        d.extend_from_slice(&0u64.to_le_bytes());
        assert!(matches!(
            apply(&base, &d, &ChunkId([0; 32]), 1 << 20),
            Err(DeltaError::TooManyChunks { .. })
        ));
    }

    #[test]
    fn one_percent_of_changes_costs_about_one_percent() {
        // 4 GiB of 64 KiB chunks, 1 % of them rewritten.
        let n = 65_536usize;
        let cs = 64 << 10;
        let mk = |generation: u64, salt: u8| Manifest {
            volume: "vol".into(),
            generation,
            size: n as u64 * cs as u64,
            chunk_size: cs,
            chunks: (0..n)
                .map(|i| {
                    let mut id = [0u8; 32];
                    id[..8].copy_from_slice(&(i as u64).to_le_bytes());
                    id[8] = if i % 100 == 7 { salt } else { 0 };
                    Some(ChunkId(id))
                })
                .collect(),
            created_at_ms: 0,
        };
        let (base, new) = (mk(1, 0), mk(2, 1));
        let d = encode(&base, &new);
        assert_eq!(differences(&base, &new), 656);
        assert!(
            d.len() * 50 < new.encode().len(),
            "{} vs {}",
            d.len(),
            new.encode().len()
        );
    }
}
