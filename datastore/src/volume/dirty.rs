//! Incremental snapshots: which chunks a set of changed byte ranges
//! touches, and how a new generation's entries are built from the
//! previous generation's manifest plus the chunks read anew. Pure
//! functions, so the property tests can compare them with a full scan.

use std::ops::Range;

use crate::id::ChunkId;
use crate::manifest::chunk_count;

/// The chunk indices (as sorted, disjoint, merged runs) that must be read
/// to build a `new_size`-byte generation from a `base_size`-byte one when
/// only the bytes in `changed` differ.
///
/// Besides the chunks overlapping `changed` (clipped to the image; empty
/// or inverted ranges touch nothing), a size change makes every chunk from
/// the one holding the old end onwards changed: the old last chunk may
/// have been short, and bytes past the old end were never described.
#[must_use]
pub fn chunks_to_read(
    base_size: u64,
    new_size: u64,
    chunk_size: u32,
    changed: &[Range<u64>],
) -> Vec<Range<usize>> {
    let cs = u64::from(chunk_size.max(1));
    let n = chunk_count(new_size, chunk_size);
    let to_idx = |x: u64| usize::try_from(x).unwrap_or(usize::MAX);
    let mut runs: Vec<Range<u64>> = changed
        .iter()
        .filter(|r| r.start < r.end && r.start < new_size)
        .map(|r| r.start / cs..r.end.min(new_size).div_ceil(cs))
        .collect();
    if base_size != new_size {
        let from = base_size.min(new_size) / cs;
        runs.push(from..n);
    }
    runs.sort_by_key(|r| r.start);
    let mut out: Vec<Range<usize>> = Vec::with_capacity(runs.len());
    for r in runs {
        let r = to_idx(r.start)..to_idx(r.end.min(n));
        if r.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The entries of the new generation: `fresh` (one per chunk of `runs`, in
/// order, as [`chunks_to_read`] selected them) where read, `base`'s entry
/// elsewhere. `n` is the new chunk count.
///
/// # Panics
/// If `fresh` does not have one entry per chunk of `runs`, or a run lies
/// outside `n` (callers pass what [`chunks_to_read`] returned).
#[must_use]
pub fn merge_entries(
    base: &[Option<ChunkId>],
    n: usize,
    runs: &[Range<usize>],
    fresh: &[Option<ChunkId>],
) -> Vec<Option<ChunkId>> {
    assert_eq!(
        runs.iter().map(ExactSizeIterator::len).sum::<usize>(),
        fresh.len(),
        "one fresh entry per selected chunk"
    );
    let mut out: Vec<Option<ChunkId>> = (0..n).map(|i| base.get(i).copied().flatten()).collect();
    let mut fresh = fresh.iter();
    for r in runs {
        for slot in &mut out[r.clone()] {
            *slot = *fresh.next().expect("counted above");
        }
    }
    out
}

#[cfg(test)]
// Tables of ranges read best as literal slices.
#[allow(
    clippy::single_range_in_vec_init,
    clippy::type_complexity,
    clippy::reversed_empty_ranges
)]
mod tests {
    use super::*;

    const CS: u32 = 4096;

    #[test]
    fn ranges_map_to_the_chunks_they_overlap() {
        let table: &[(&[Range<u64>], &[Range<usize>])] = &[
            (&[], &[]),
            (&[0..1], &[0..1]),
            (&[4095..4097], &[0..2]),
            (&[4096..8192], &[1..2]),
            (&[8192..8192], &[]),
            (&[9000..8000], &[]),
            (&[0..1, 4096..4097, 30_000..40_000], &[0..2, 7..10]),
            (&[100..200, 50..60], &[0..1]),
            (&[39_000..1_000_000], &[9..10]),
            (&[50_000..60_000], &[]),
        ];
        for (changed, want) in table {
            assert_eq!(
                chunks_to_read(40_000, 40_000, CS, changed),
                *want,
                "{changed:?}"
            );
        }
    }

    #[test]
    fn a_size_change_rereads_from_the_old_end() {
        // Grown from 10 000 bytes (chunk 2 was short) to 20 000.
        assert_eq!(chunks_to_read(10_000, 20_000, CS, &[]), vec![2..5]);
        assert_eq!(
            chunks_to_read(10_000, 20_000, CS, &[0..1]),
            vec![0..1, 2..5]
        );
        // Shrunk to 5 000: the new last chunk is short.
        assert_eq!(chunks_to_read(20_000, 5_000, CS, &[]), vec![1..2]);
        // Aligned growth: the old chunks are whole and unchanged.
        assert_eq!(chunks_to_read(8192, 16_384, CS, &[]), vec![2..4]);
    }

    #[test]
    fn merged_entries_take_fresh_ones_where_read() {
        let id = |b: u8| Some(ChunkId::of(&[b]));
        let base = vec![id(1), None, id(3), id(4)];
        let runs = vec![1..2, 3..5];
        let fresh = vec![id(9), None, id(7)];
        assert_eq!(
            merge_entries(&base, 5, &runs, &fresh),
            vec![id(1), id(9), id(3), None, id(7)]
        );
        assert_eq!(merge_entries(&base, 2, &[], &[]), vec![id(1), None]);
    }
}
