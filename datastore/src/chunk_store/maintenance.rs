//! Scrub and garbage collection, streaming over the index in bounded
//! memory whatever the number of chunks.
//!
//! Neither pass holds the index in memory. Both walk sled in key order
//! (chunk ids) and feed what they need into an external sort
//! ([`super::extsort`]), whose memory is a fixed buffer:
//! - gc's *live set* is built by the caller as a [`LiveSet`] (a sorted run
//!   of ids on disk) and merge-joined with the index: both are in id
//!   order, so one pass over each finds every dead entry;
//! - scrub, and gc's compaction of mostly-dead packs, sort the locations
//!   they must read by (pack, offset), so packs are read front to back as
//!   before.
//!
//! Index changes are made durable every [`MAINTENANCE_SYNC_EVERY`] entries
//! (dropped or moved), which bounds the pending changes held in memory.
//! Crash safety is that of the module docs: dropping a dead entry early is
//! what gc does anyway, and a moved chunk's new copy is fsynced before its
//! entry points at it; the old pack is deleted only once nothing points
//! into it.

use std::collections::{BTreeMap, HashSet};
use std::io;

use super::extsort::{ExtSorter, Sorted};
use super::pack::{self, Location, PackInfo};
use super::{
    fsutil, io_err, lock, ChunkStore, ChunkStoreError, GcReport, Result, ScrubReport,
    COMPACT_LIVE_FRACTION, COMPACT_SMALL_FRACTION, GC_BATCH,
};
use crate::id::ChunkId;

/// Entries dropped or moved between two syncs of a maintenance pass: the
/// pending index changes (about 100 bytes each) then never exceed a few
/// MiB, and a crash redoes at most this much work.
pub(crate) const MAINTENANCE_SYNC_EVERY: usize = 64 * 1024;

/// Bytes of a sorted location record: pack (BE), offset (BE), length,
/// chunk id. Big-endian first fields make byte order (pack, offset) order.
const LOC_REC: usize = 48;

fn loc_record(id: &ChunkId, loc: &Location) -> [u8; LOC_REC] {
    let mut r = [0u8; LOC_REC];
    r[..4].copy_from_slice(&loc.pack.to_be_bytes());
    r[4..12].copy_from_slice(&loc.offset.to_be_bytes());
    r[12..16].copy_from_slice(&loc.len.to_be_bytes());
    r[16..].copy_from_slice(id.as_bytes());
    r
}

fn parse_loc_record(r: &[u8; LOC_REC]) -> (ChunkId, Location) {
    let mut id = [0u8; 32];
    id.copy_from_slice(&r[16..]);
    let be4 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let mut off = [0u8; 8];
    off.copy_from_slice(&r[4..12]);
    (
        ChunkId(id),
        Location {
            pack: be4(&r[..4]),
            offset: u64::from_be_bytes(off),
            len: be4(&r[12..16]),
        },
    )
}

/// The chunks a [`ChunkStore::gc`] must keep, gathered from manifests in
/// bounded memory: ids go to a sorted run on disk (next to the packs,
/// unlinked at once), not a hash set, so a store of any size is collected
/// in the same few MiB. Make one with [`ChunkStore::live_set`].
pub struct LiveSet {
    sorter: ExtSorter<32>,
}

impl LiveSet {
    /// Keep `id`. Duplicates cost nothing after sorting.
    ///
    /// # Errors
    /// Writing the run failed (a full disk included).
    pub fn insert(&mut self, id: &ChunkId) -> Result<()> {
        let dir = self.sorter.dir().to_path_buf();
        self.sorter
            .push(*id.as_bytes())
            .map_err(io_err("write live set in", &dir))
    }

    /// Keep every id of `ids`.
    ///
    /// # Errors
    /// As [`LiveSet::insert`].
    pub fn extend<'a>(&mut self, ids: impl IntoIterator<Item = &'a ChunkId>) -> Result<()> {
        for id in ids {
            self.insert(id)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for LiveSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSet").finish_non_exhaustive()
    }
}

/// What reading a chunk back found.
pub(super) enum Checked {
    /// Its bytes, which hash to its id.
    Good(Vec<u8>),
    /// Wrong bytes, or gone (past the end of its pack, pack missing).
    Bad,
}

impl ChunkStore {
    /// An empty [`LiveSet`] for [`ChunkStore::gc`] on this store.
    #[must_use]
    pub fn live_set(&self) -> LiveSet {
        LiveSet {
            sorter: ExtSorter::new(&self.packs_dir),
        }
    }

    /// How a failed read or write of a sort's temporary runs is reported.
    fn sort_err(&self) -> impl Fn(io::Error) -> ChunkStoreError + '_ {
        move |e| io_err("sort in", &self.packs_dir)(e)
    }

    /// Every chunk entry sled holds, as location records sorted by (pack,
    /// offset), keeping those `keep` accepts; and their total length.
    fn sorted_locations(&self, keep: &dyn Fn(&Location) -> bool) -> Result<(Sorted<LOC_REC>, u64)> {
        let mut sorter = ExtSorter::<LOC_REC>::new(&self.packs_dir);
        let mut total = 0u64;
        for entry in self.indexed_chunks() {
            let (id, loc) = entry?;
            if keep(&loc) {
                total += u64::from(loc.len);
                sorter
                    .push(loc_record(&id, &loc))
                    .map_err(self.sort_err())?;
            }
        }
        Ok((sorter.finish().map_err(self.sort_err())?, total))
    }

    /// Read the chunk at `loc` and check it hashes to `id`. Damage (wrong
    /// bytes, a record past the end of its pack, a missing pack) is
    /// [`Checked::Bad`]; other I/O errors are errors.
    pub(super) fn check_at(&self, id: &ChunkId, loc: &Location) -> Result<Checked> {
        match self.read_at(loc) {
            Ok(d) if ChunkId::of(&d) == *id => Ok(Checked::Good(d)),
            Ok(_) => Ok(Checked::Bad),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::NotFound
                ) =>
            {
                Ok(Checked::Bad)
            }
            Err(e) => Err(io_err("read", &self.pack_path(loc.pack))(e)),
        }
    }

    /// Ask the kernel to drop pack `no`'s cached pages (best effort: clean
    /// pages only), so a scrub reads the disk.
    pub(super) fn drop_cached_pack(&self, no: u32) {
        if let Ok(f) = self.pack_file(no) {
            let _ = rustix::fs::fadvise(&*f, 0, None, rustix::fs::Advice::DontNeed);
        }
    }

    /// The start of a gc, streaming or loaded, under the maintenance lock:
    /// the store checked and synced (so sled holds every entry), and a
    /// report holding the disk use before.
    pub(super) fn gc_start(&self) -> Result<GcReport> {
        self.check()?;
        self.sync()?;
        Ok(GcReport {
            disk_bytes_before: self.stats()?.disk_bytes,
            ..GcReport::default()
        })
    }

    /// One step of a scrub, streaming or loaded: verify the chunk `id` at
    /// `loc` (first dropping the cached pages of its pack when it starts a
    /// new pack after `last_pack`), drop it from the index if it is bad,
    /// and count it into `report`. Returns whether it was dropped.
    pub(super) fn scrub_entry(
        &self,
        id: ChunkId,
        loc: Location,
        last_pack: &mut Option<u32>,
        report: &mut ScrubReport,
    ) -> Result<bool> {
        if *last_pack != Some(loc.pack) {
            *last_pack = Some(loc.pack);
            self.drop_cached_pack(loc.pack);
        }
        let bad = matches!(self.check_at(&id, &loc)?, Checked::Bad);
        if bad {
            let _ = self.drop_corrupt(id, loc);
            report.corrupt.push(id);
        }
        report.checked += 1;
        report.bytes += u64::from(loc.len);
        Ok(bad)
    }

    /// Re-read and verify every stored chunk, pack by pack in file order
    /// (after asking the kernel to drop cached pages, so the disk is read).
    /// Corrupt or unreadable chunks are dropped from the index (durably,
    /// before this returns), so `contains` says false and replication
    /// fetches them again. `progress(bytes_done, bytes_total)`.
    ///
    /// Memory is bounded whatever the number of chunks: the locations are
    /// sorted on disk (see the module docs). Chunks inserted while it runs
    /// are checked by the next scrub.
    ///
    /// # Errors
    /// I/O errors other than corruption; index errors.
    pub fn scrub(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<ScrubReport> {
        let _m = lock(&self.maintenance);
        self.check()?;
        self.sync()?;
        let (mut locs, total) = self.sorted_locations(&|_| true)?;
        let mut report = ScrubReport::default();
        let mut last_pack = None;
        let mut dropped = 0usize;
        while let Some(rec) = locs.next_record().map_err(self.sort_err())? {
            let (id, loc) = parse_loc_record(&rec);
            if self.scrub_entry(id, loc, &mut last_pack, &mut report)? {
                dropped += 1;
                if dropped.is_multiple_of(MAINTENANCE_SYNC_EVERY) {
                    self.sync()?;
                }
            }
            progress(report.bytes, total);
        }
        self.sync()?;
        if !report.corrupt.is_empty() {
            tracing::warn!(
                corrupt = report.corrupt.len(),
                "scrub dropped corrupt chunks"
            );
        }
        Ok(report)
    }

    /// Drop every chunk not in `live`, then compact packs that are mostly
    /// dead (or small) by copying their live chunks into the active pack and
    /// deleting them. Crash-safe at every step (see the module docs).
    ///
    /// `live` must name every chunk anything still needs, including chunks
    /// of transfers in progress: a chunk inserted concurrently with gc but
    /// not in `live` may be dropped if it was synced before gc started.
    ///
    /// Memory is bounded whatever the number of chunks: `live` is a sorted
    /// run on disk merge-joined with the index in key order, and the
    /// chunks to move are sorted on disk by pack and offset.
    ///
    /// # Errors
    /// I/O and index errors.
    pub fn gc(&self, live: LiveSet) -> Result<GcReport> {
        let _m = lock(&self.maintenance);
        let mut report = self.gc_start()?;

        // 1. Drop unreferenced entries: a merge join of two id-ordered
        // streams.
        let mut live = live.sorter.finish().map_err(self.sort_err())?;
        let mut next_live = live.next_record().map_err(self.sort_err())?;
        let mut dead: Vec<(ChunkId, Location)> = Vec::with_capacity(GC_BATCH);
        let mut since_sync = 0usize;
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            let Some(id) = ChunkId::from_slice(&k) else {
                continue;
            };
            while next_live.is_some_and(|l| l < id.0) {
                next_live = live.next_record().map_err(self.sort_err())?;
            }
            if next_live == Some(id.0) {
                continue;
            }
            let loc =
                Location::decode(&v).ok_or(ChunkStoreError::DamagedIndex { what: "chunk" })?;
            dead.push((id, loc));
            if dead.len() >= GC_BATCH {
                since_sync += self.drop_dead(&dead, &mut report)?;
                dead.clear();
                if since_sync >= MAINTENANCE_SYNC_EVERY {
                    self.sync()?;
                    since_sync = 0;
                }
            }
        }
        self.drop_dead(&dead, &mut report)?;
        drop(dead);
        drop(live);
        self.sync()?;

        // 2. Choose packs to compact.
        let (victims, empty) = self.compaction_victims();

        // 3. Copy live chunks out of the victims, in pack order.
        if !victims.is_empty() {
            let (mut moving, _) = self.sorted_locations(&|l| victims.contains(&l.pack))?;
            let mut moved = 0usize;
            while let Some(rec) = moving.next_record().map_err(self.sort_err())? {
                let (id, loc) = parse_loc_record(&rec);
                if self.move_chunk(id, loc, &mut report)? {
                    moved += 1;
                    if moved.is_multiple_of(MAINTENANCE_SYNC_EVERY) {
                        self.sync()?;
                    }
                }
            }
            report.packs_compacted = victims.len() as u64;
            self.sync()?;
        }

        // 4. Delete packs nothing points into any more.
        self.delete_dead_packs(&victims, empty, &mut report)?;
        report.disk_bytes_after = self.stats()?.disk_bytes;
        tracing::info!(
            removed = report.removed_chunks,
            compacted = report.packs_compacted,
            deleted = report.packs_deleted,
            before = report.disk_bytes_before,
            after = report.disk_bytes_after,
            "chunk gc done"
        );
        Ok(report)
    }

    /// Drop the entries of `dead` that still point where they did when
    /// listed (one lock hold). Returns how many were dropped.
    pub(super) fn drop_dead(
        &self,
        dead: &[(ChunkId, Location)],
        report: &mut GcReport,
    ) -> Result<usize> {
        let mut w = lock(&self.w);
        let mut n = 0;
        for (id, loc) in dead {
            if self.lookup(&w, id)? == Some(*loc) {
                self.set(&mut w, *id, None)?;
                report.removed_chunks += 1;
                report.removed_bytes += u64::from(loc.len);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Packs to compact (mostly dead ones, and small ones when there are
    /// at least two to merge) and packs with nothing live left.
    pub(super) fn compaction_victims(&self) -> (HashSet<u32>, Vec<u32>) {
        let w = lock(&self.w);
        let mut sparse = HashSet::new();
        let mut small = HashSet::new();
        let mut empty = Vec::new();
        for (no, info) in &w.committed {
            if *no == w.active.no || w.sealed.contains_key(no) {
                continue;
            }
            if info.live_count == 0 {
                empty.push(*no);
                continue;
            }
            let size = info.synced_len.max(1);
            if (info.live_bytes as f64) < COMPACT_LIVE_FRACTION * size as f64 {
                sparse.insert(*no);
            } else if size < self.opts.pack_target / COMPACT_SMALL_FRACTION {
                small.insert(*no);
            }
        }
        if small.len() >= 2 || !sparse.is_empty() {
            sparse.extend(small);
        }
        (sparse, empty)
    }

    /// Copy the chunk at `loc` into the active pack and point its entry
    /// there, unless it was removed or moved meanwhile; a corrupt one is
    /// dropped instead. Returns whether it moved.
    pub(super) fn move_chunk(
        &self,
        id: ChunkId,
        loc: Location,
        report: &mut GcReport,
    ) -> Result<bool> {
        let data = match self.check_at(&id, &loc)? {
            Checked::Good(d) => d,
            Checked::Bad => {
                let _ = self.drop_corrupt(id, loc);
                report.corrupt.push(id);
                return Ok(false);
            }
        };
        let mut w = lock(&self.w);
        if self.lookup(&w, &id)? != Some(loc) {
            return Ok(false); // removed or moved meanwhile
        }
        let new = self.append(&mut w, &id, &data, false)?;
        self.set(&mut w, id, Some(new))?;
        report.moved_chunks += 1;
        report.moved_bytes += u64::from(loc.len);
        Ok(true)
    }

    /// Delete `empty` packs and those of `victims` nothing points into any
    /// more. Their records go first (durably), then the files: a crash in
    /// between leaves an unindexed file, which open() deletes.
    pub(super) fn delete_dead_packs(
        &self,
        victims: &HashSet<u32>,
        empty: Vec<u32>,
        report: &mut GcReport,
    ) -> Result<()> {
        let mut doomed: Vec<u32> = empty;
        {
            let w = lock(&self.w);
            for no in victims {
                let dead =
                    |m: &BTreeMap<u32, PackInfo>| m.get(no).is_none_or(|i| i.live_count == 0);
                if dead(&w.committed) && dead(&w.live) {
                    doomed.push(*no);
                }
            }
        }
        if doomed.is_empty() {
            return Ok(());
        }
        {
            let _s = lock(&self.sync_lock);
            let mut w = lock(&self.w);
            let mut batch = sled::Batch::default();
            for no in &doomed {
                batch.remove(pack::pack_key(*no).as_slice());
            }
            self.tree
                .apply_batch(batch)
                .map_err(|e| self.poison(ChunkStoreError::Index(e)))?;
            self.db
                .flush()
                .map_err(|e| self.poison(ChunkStoreError::Index(e)))?;
            for no in &doomed {
                w.committed.remove(no);
                w.live.remove(no);
            }
        }
        let mut r = lock(&self.readers);
        for no in &doomed {
            r.remove(no);
            let p = self.pack_path(*no);
            match std::fs::remove_file(&p) {
                Ok(()) => report.packs_deleted += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &p)(e)),
            }
        }
        drop(r);
        fsutil::fsync_dir(&self.packs_dir).map_err(io_err("fsync", &self.packs_dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_records_sort_by_pack_then_offset() {
        let id = ChunkId([7; 32]);
        let a = Location {
            pack: 1,
            offset: 1 << 33,
            len: 9,
        };
        let b = Location {
            pack: 2,
            offset: 16,
            len: 1,
        };
        let c = Location {
            pack: 2,
            offset: 300,
            len: 1,
        };
        assert!(loc_record(&id, &a) < loc_record(&ChunkId([0; 32]), &b));
        assert!(loc_record(&id, &b) < loc_record(&ChunkId([0; 32]), &c));
        assert_eq!(parse_loc_record(&loc_record(&id, &a)), (id, a));
    }
}
