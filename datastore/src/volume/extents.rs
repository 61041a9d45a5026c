//! Dirty tracking on reflink filesystems (XFS, btrfs): which byte ranges of
//! a new clone of the live image differ from the previous clone, found by
//! comparing their extent maps (`FIEMAP`, logical → physical).
//!
//! Both clones are snapshots nobody writes. A range that maps to the same
//! physical blocks in both holds the same bytes: the previous clone still
//! references those blocks, so the filesystem cannot have freed and reused
//! them, and a write to the live image after the previous clone went to new
//! blocks (copy on write of a shared extent). Everything else (a hole on
//! one side only, different blocks, or an extent whose location the
//! filesystem does not state exactly: unknown, delayed allocation, inline,
//! encoded, encrypted, not aligned) is changed. Holes on both sides are
//! zeros on both. Cost: one pass over both extent maps, none over the data.

use std::fs::File;
use std::io;
use std::ops::Range;

/// `FIEMAP_EXTENT_*` flags that make an extent's physical address
/// meaningless for comparison (kernel ABI values, `linux/fiemap.h`).
const UNTRUSTED_FLAGS: u32 = 0x2 // UNKNOWN
    | 0x4 // DELALLOC
    | 0x8 // ENCODED
    | 0x80 // DATA_ENCRYPTED
    | 0x100 // NOT_ALIGNED
    | 0x200 // DATA_INLINE
    | 0x400; // DATA_TAIL

/// `FIEMAP_EXTENT_UNWRITTEN`: allocated, reads as zeros.
const UNWRITTEN: u32 = 0x800;

/// One extent of a file's map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the device (or the filesystem's address space).
    pub physical: u64,
    /// Bytes.
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

impl Extent {
    fn end(&self) -> u64 {
        self.logical.saturating_add(self.length)
    }

    fn exact(&self) -> bool {
        self.flags & UNTRUSTED_FLAGS == 0
    }

    /// Whether `self` and `other` map byte `at` (inside both) to the same
    /// place in the same state.
    fn same_at(&self, other: &Self, at: u64) -> bool {
        self.exact()
            && other.exact()
            && (self.flags & UNWRITTEN) == (other.flags & UNWRITTEN)
            && self.physical.wrapping_add(at - self.logical)
                == other.physical.wrapping_add(at - other.logical)
    }
}

/// The extent map of `file`, in logical order, after the filesystem has
/// written back its dirty pages (`FIEMAP_FLAG_SYNC`), read lazily.
pub fn extents(file: &File) -> impl Iterator<Item = io::Result<Extent>> + '_ {
    fiemap::Fiemap::with_flags(file, fiemap::FiemapFlags::SYNC).map(|e| {
        e.map(|e| Extent {
            logical: e.fe_logical,
            physical: e.fe_physical,
            length: e.fe_length,
            flags: e.fe_flags.bits(),
        })
    })
}

/// One side of the comparison: the extent covering or following `pos`.
struct Side<I> {
    it: I,
    cur: Option<Extent>,
}

impl<E, I: Iterator<Item = Result<Extent, E>>> Side<I> {
    /// Move past every extent that ends at or before `pos`.
    fn advance(&mut self, pos: u64) -> Result<(), E> {
        while self.cur.is_some_and(|c| c.end() <= pos) {
            self.cur = self.it.next().transpose()?;
        }
        Ok(())
    }

    /// The extent mapping `pos` (if any), and where that state ends.
    fn at(&self, pos: u64) -> (Option<Extent>, u64) {
        match self.cur {
            Some(c) if c.logical <= pos => (Some(c), c.end()),
            Some(c) => (None, c.logical),
            None => (None, u64::MAX),
        }
    }
}

/// The byte ranges of the first `size` bytes whose mapping differs between
/// the `old` and `new` extent maps (each in logical order, as FIEMAP
/// returns them), merged and in order.
///
/// # Errors
/// The first error either map yields.
pub fn changed_ranges<E>(
    old: impl Iterator<Item = Result<Extent, E>>,
    new: impl Iterator<Item = Result<Extent, E>>,
    size: u64,
) -> Result<Vec<Range<u64>>, E> {
    let mut a = Side { it: old, cur: None };
    let mut b = Side { it: new, cur: None };
    a.cur = a.it.next().transpose()?;
    b.cur = b.it.next().transpose()?;
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        a.advance(pos)?;
        b.advance(pos)?;
        let (ea, end_a) = a.at(pos);
        let (eb, end_b) = b.at(pos);
        let end = end_a.min(end_b).min(size);
        let changed = match (ea, eb) {
            (None, None) => false,
            (Some(x), Some(y)) => !x.same_at(&y, pos),
            _ => true,
        };
        if changed {
            match out.last_mut() {
                Some(last) if last.end == pos => last.end = end,
                _ => out.push(pos..end),
            }
        }
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
// Tables of ranges read best as literal slices.
#[allow(clippy::single_range_in_vec_init, clippy::type_complexity)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ext(logical: u64, physical: u64, length: u64) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags: 0,
        }
    }

    fn diff(old: &[Extent], new: &[Extent], size: u64) -> Vec<Range<u64>> {
        changed_ranges::<()>(
            old.iter().copied().map(Ok),
            new.iter().copied().map(Ok),
            size,
        )
        .unwrap()
    }

    #[test]
    fn extent_maps_compare_by_physical_location() {
        let k = 4096;
        let table: &[(&str, &[Extent], &[Extent], &[Range<u64>])] = &[
            ("both empty", &[], &[], &[]),
            (
                "identical",
                &[ext(0, 100 * k, 8 * k)],
                &[ext(0, 100 * k, 8 * k)],
                &[],
            ),
            (
                "split differently, same blocks",
                &[ext(0, 100 * k, 8 * k)],
                &[ext(0, 100 * k, 3 * k), ext(3 * k, 103 * k, 5 * k)],
                &[],
            ),
            (
                "one block rewritten (copy on write)",
                &[ext(0, 100 * k, 8 * k)],
                &[
                    ext(0, 100 * k, 2 * k),
                    ext(2 * k, 500 * k, k),
                    ext(3 * k, 103 * k, 5 * k),
                ],
                &[2 * k..3 * k],
            ),
            (
                "new data in a hole",
                &[],
                &[ext(4 * k, 9 * k, k)],
                &[4 * k..5 * k],
            ),
            ("punched", &[ext(4 * k, 9 * k, 2 * k)], &[], &[4 * k..6 * k]),
            (
                "adjacent changes merge",
                &[ext(0, 100 * k, 4 * k)],
                &[
                    ext(0, 7 * k, k),
                    ext(k, 300 * k, k),
                    ext(2 * k, 102 * k, 2 * k),
                ],
                &[0..2 * k],
            ),
            (
                "clipped to the size",
                &[],
                &[ext(0, 0, 100 * k)],
                &[0..10 * k],
            ),
        ];
        for (what, old, new, want) in table {
            assert_eq!(diff(old, new, 10 * k), *want, "{what}");
        }
    }

    #[test]
    fn inexact_extents_count_as_changed() {
        let k = 4096;
        for flags in [0x2, 0x4, 0x8, 0x80, 0x100, 0x200, 0x400] {
            let mut e = ext(0, 100 * k, 4 * k);
            e.flags = flags;
            assert_eq!(diff(&[e], &[e], 4 * k), vec![0..4 * k], "flags {flags:#x}");
        }
        // Same blocks, one side converted from unwritten: changed.
        let mut u = ext(0, 100 * k, 4 * k);
        u.flags = UNWRITTEN;
        assert_eq!(diff(&[u], &[ext(0, 100 * k, 4 * k)], 4 * k), vec![0..4 * k]);
        assert_eq!(diff(&[u], &[u], 4 * k), vec![]);
        // LAST, SHARED and MERGED say nothing about where the data is.
        let mut s = ext(0, 100 * k, 4 * k);
        s.flags = 0x1 | 0x2000 | 0x1000;
        assert_eq!(diff(&[s], &[ext(0, 100 * k, 4 * k)], 4 * k), vec![]);
    }

    #[test]
    fn errors_from_either_map_stop_the_comparison() {
        let ok = [Ok(ext(0, 0, 4096))];
        let bad: [Result<Extent, &str>; 1] = [Err("ioctl failed")];
        assert_eq!(
            changed_ranges(ok.iter().copied(), bad.iter().copied(), 8192),
            Err("ioctl failed")
        );
    }

    /// A file of `blocks` blocks as a block → physical block map (None: hole).
    fn to_extents(map: &[Option<u64>], bs: u64) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for (i, p) in map.iter().enumerate() {
            let Some(p) = p else { continue };
            let (l, ph) = (i as u64 * bs, p * bs);
            match out.last_mut() {
                // FIEMAP merges contiguous runs; sometimes it does not.
                Some(e) if e.end() == l && e.physical + e.length == ph && p % 3 != 0 => {
                    e.length += bs;
                }
                _ => out.push(ext(l, ph, bs)),
            }
        }
        out
    }

    proptest! {
        /// On random block maps, the ranges found are exactly the blocks
        /// whose physical location differs.
        #[test]
        fn diff_matches_a_block_by_block_comparison(
            old in proptest::collection::vec(proptest::option::of(0u64..64), 0..80),
            edits in proptest::collection::vec((0usize..80, proptest::option::of(64u64..128)), 0..20),
            size_blocks in 0u64..90,
        ) {
            let bs = 4096;
            let mut new = old.clone();
            new.resize(80, None);
            for (i, p) in edits {
                new[i] = p;
            }
            let want: Vec<u64> = (0..size_blocks)
                .filter(|&i| old.get(i as usize).copied().flatten() != new.get(i as usize).copied().flatten())
                .collect();
            let got: Vec<u64> = diff(&to_extents(&old, bs), &to_extents(&new, bs), size_blocks * bs)
                .into_iter()
                .flat_map(|r| (r.start / bs)..r.end.div_ceil(bs))
                .collect();
            prop_assert_eq!(got, want);
        }
    }
}
