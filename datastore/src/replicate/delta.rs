//! Sub-chunk deltas: a changed chunk sent as the 4 KiB blocks that differ
//! from the chunk at the same position in a generation the receiver holds.
//!
//! Small scattered writes (a database appending records, a VM touching a
//! few sectors) change one 4 KiB block of a 64 KiB chunk; sending the whole
//! chunk would cost 16×. The receiver rebuilds the new chunk from its base
//! and the blocks, then verifies the rebuilt chunk's BLAKE3 against the id
//! the manifest names, so a delta can never plant wrong bytes.
//!
//! Payload: `[new id: 32][base id: 32][len: u32 LE][n: u16 LE][block index: u16 LE]*n[block bytes]*n`
//! where every block is `BLOCK` bytes except possibly the last block of a
//! short chunk, which runs to the chunk's end. `base id` = [`ZERO_BASE`]
//! means "an all-zero chunk of `len` bytes", which every rack holds
//! implicitly (zero chunks are never stored): a 4 KiB write into an unused
//! region of a thin image costs 4 KiB, not a whole chunk.

/// Delta granularity: the page / sector size small writes come in.
pub const BLOCK: usize = 4096;

/// The base id that stands for an all-zero chunk.
pub const ZERO_BASE: [u8; 32] = [0; 32];

/// Fixed part of a delta payload: two ids, the length, the block count.
const HEADER: usize = 32 + 32 + 4 + 2;

/// Send a delta only if it is at most this fraction of the whole chunk;
/// beyond that the whole chunk is simpler and about as small.
pub const MAX_DELTA_FRACTION: f64 = 0.5;

/// One block of zeros to compare against.
static ZERO_BLOCK: [u8; BLOCK] = [0; BLOCK];

/// Indices of the blocks where `new` differs from `base`. `None` when the
/// two differ in length (no delta possible).
pub fn changed_blocks(base: &[u8], new: &[u8]) -> Option<Vec<u16>> {
    changed(Some(base), new)
}

/// As [`changed_blocks`]; `base` `None` stands for zeros.
fn changed(base: Option<&[u8]>, new: &[u8]) -> Option<Vec<u16>> {
    if base.is_some_and(|b| b.len() != new.len()) || new.len() > BLOCK * u16::MAX as usize {
        return None;
    }
    Some(
        new.chunks(BLOCK)
            .enumerate()
            .filter(|(i, n)| match base {
                Some(b) => &b[i * BLOCK..i * BLOCK + n.len()] != *n,
                None => *n != &ZERO_BLOCK[..n.len()],
            })
            .map(|(i, _)| i as u16)
            .collect(),
    )
}

/// Encode a delta, or `None` if it would not pay off.
pub fn encode(new_id: &[u8; 32], base_id: &[u8; 32], base: &[u8], new: &[u8]) -> Option<Vec<u8>> {
    encode_inner(new_id, base_id, Some(base), new)
}

/// Encode `new` as a delta against an all-zero chunk of its length
/// ([`ZERO_BASE`]), without materialising the zeros; `None` if it would
/// not pay off.
pub fn encode_against_zeros(new_id: &[u8; 32], new: &[u8]) -> Option<Vec<u8>> {
    encode_inner(new_id, &ZERO_BASE, None, new)
}

fn encode_inner(
    new_id: &[u8; 32],
    base_id: &[u8; 32],
    base: Option<&[u8]>,
    new: &[u8],
) -> Option<Vec<u8>> {
    let blocks = changed(base, new)?;
    let data_len: usize = blocks
        .iter()
        .map(|b| block_range(*b, new.len()).len())
        .sum();
    if blocks.is_empty() || data_len as f64 > new.len() as f64 * MAX_DELTA_FRACTION {
        return None;
    }
    let mut out = Vec::with_capacity(HEADER + blocks.len() * 2 + data_len);
    out.extend_from_slice(new_id);
    out.extend_from_slice(base_id);
    out.extend_from_slice(&(new.len() as u32).to_le_bytes());
    out.extend_from_slice(&(blocks.len() as u16).to_le_bytes());
    for b in &blocks {
        out.extend_from_slice(&b.to_le_bytes());
    }
    for b in &blocks {
        out.extend_from_slice(&new[block_range(*b, new.len())]);
    }
    Some(out)
}

fn block_range(block: u16, len: usize) -> std::ops::Range<usize> {
    let start = block as usize * BLOCK;
    start.min(len)..(start + BLOCK).min(len)
}

/// The parts of a received delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaHeader {
    /// Id of the chunk it rebuilds.
    pub new_id: [u8; 32],
    /// Id of the base chunk it applies to ([`ZERO_BASE`]: zeros).
    pub base_id: [u8; 32],
    /// Length of the rebuilt chunk (and of its base).
    pub len: usize,
}

/// Read the ids of a delta payload.
///
/// # Errors
/// A reason if the payload is too short.
pub fn header(payload: &[u8]) -> Result<DeltaHeader, String> {
    if payload.len() < HEADER {
        return Err(format!("delta of {} bytes is too short", payload.len()));
    }
    Ok(DeltaHeader {
        new_id: payload[..32].try_into().expect("32 bytes"),
        base_id: payload[32..64].try_into().expect("32 bytes"),
        len: u32::from_le_bytes(payload[64..68].try_into().expect("4 bytes")) as usize,
    })
}

/// Rebuild the new chunk from `base` and a delta payload. The caller
/// verifies the result's hash against `header(payload).new_id`.
///
/// # Errors
/// A reason if the payload is malformed or does not fit `base`.
pub fn apply(base: &[u8], payload: &[u8]) -> Result<Vec<u8>, String> {
    let h = header(payload)?;
    if h.len != base.len() {
        return Err(format!(
            "delta for a {}-byte chunk applied to a {}-byte base",
            h.len,
            base.len()
        ));
    }
    let n = u16::from_le_bytes([payload[68], payload[69]]) as usize;
    let idx_end = HEADER + n * 2;
    if payload.len() < idx_end {
        return Err("delta block list truncated".into());
    }
    let mut out = base.to_vec();
    let mut pos = idx_end;
    let mut prev: Option<u16> = None;
    for i in 0..n {
        let b = u16::from_le_bytes([payload[HEADER + i * 2], payload[HEADER + 1 + i * 2]]);
        if prev.is_some_and(|p| b <= p) {
            return Err("delta blocks out of order".into());
        }
        prev = Some(b);
        let r = block_range(b, base.len());
        if r.is_empty() {
            return Err(format!("delta block {b} beyond a {}-byte base", base.len()));
        }
        let end = pos + r.len();
        if end > payload.len() {
            return Err("delta data truncated".into());
        }
        out[r].copy_from_slice(&payload[pos..end]);
        pos = end;
    }
    if pos != payload.len() {
        return Err("trailing bytes after delta data".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_changed_block_costs_one_block() {
        let base = vec![7u8; 65536];
        let mut new = base.clone();
        new[10_000] = 1;
        let d = encode(&[1; 32], &[2; 32], &base, &new).unwrap();
        assert_eq!(d.len(), HEADER + 2 + BLOCK);
        assert_eq!(apply(&base, &d).unwrap(), new);
        assert_eq!(header(&d).unwrap().base_id, [2; 32]);
        assert_eq!(header(&d).unwrap().len, 65536);
        // against zeros
        let mut sparse = vec![0u8; 65536];
        sparse[5] = 9;
        let z = encode(&[1; 32], &ZERO_BASE, &[0u8; 65536], &sparse).unwrap();
        assert_eq!(apply(&[0u8; 65536], &z).unwrap(), sparse);
        assert_eq!(encode_against_zeros(&[1; 32], &sparse).unwrap(), z);
        assert!(encode_against_zeros(&[1; 32], &vec![3u8; 65536]).is_none());
        assert!(apply(&[0u8; 100], &z).is_err(), "length is checked");
    }

    #[test]
    fn big_changes_and_length_changes_are_not_deltas() {
        let base = vec![0u8; 65536];
        assert!(encode(&[1; 32], &[2; 32], &base, &vec![1u8; 65536]).is_none());
        assert!(encode(&[1; 32], &[2; 32], &base, &vec![1u8; 1000]).is_none());
        assert!(
            encode(&[1; 32], &[2; 32], &base, &base).is_none(),
            "identical: nothing to send"
        );
    }

    proptest! {
        #[test]
        fn apply_inverts_encode(
            len in 1usize..70_000,
            seed in any::<u64>(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        ) {
            let base: Vec<u8> = (0..len).map(|i| (i as u64).wrapping_mul(seed | 1) as u8).collect();
            let mut new = base.clone();
            for (pos, v) in edits {
                let p = pos % len;
                new[p] = new[p].wrapping_add(v | 1);
            }
            if let Some(d) = encode(&[9; 32], &[8; 32], &base, &new) {
                prop_assert_eq!(apply(&base, &d).unwrap(), new.clone());
            }
            // the same edits into zeros, against the implicit zero base
            let mut sparse = vec![0u8; len];
            for (i, (a, b)) in base.iter().zip(&new).enumerate() {
                if a != b {
                    sparse[i] = *b;
                }
            }
            let zeros = vec![0u8; len];
            prop_assert_eq!(
                encode_against_zeros(&[9; 32], &sparse),
                encode(&[9; 32], &ZERO_BASE, &zeros, &sparse)
            );
        }

        #[test]
        fn hostile_deltas_never_panic(base_len in 0usize..20_000, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let base = vec![0u8; base_len];
            let _ = apply(&base, &payload);
        }
    }
}
