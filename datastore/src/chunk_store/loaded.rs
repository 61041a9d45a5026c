//! The maintenance passes as they were before they streamed: the whole
//! index loaded into memory, the live set a hash set. Kept as the
//! reference the streaming passes are tested against (same result on
//! random stores) and measured against (`benches/storebench.rs`), not for
//! production use: their memory grows with the number of chunks.

use std::collections::HashSet;

use super::pack::Location;
use super::{lock, ChunkStore, GcReport, Result, ScrubReport};
use crate::id::ChunkId;

impl ChunkStore {
    /// [`ChunkStore::scrub`] holding every index entry in memory.
    ///
    /// # Errors
    /// As [`ChunkStore::scrub`].
    #[doc(hidden)]
    pub fn scrub_loaded(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<ScrubReport> {
        let _m = lock(&self.maintenance);
        self.check()?;
        self.sync()?;
        let mut entries = self.all_entries()?;
        entries.sort_by_key(|(_, l)| (l.pack, l.offset));
        let total: u64 = entries.iter().map(|(_, l)| u64::from(l.len)).sum();
        let mut report = ScrubReport::default();
        let mut last_pack = None;
        for (id, loc) in entries {
            self.scrub_entry(id, loc, &mut last_pack, &mut report)?;
            progress(report.bytes, total);
        }
        self.sync()?;
        Ok(report)
    }

    /// [`ChunkStore::gc`] with the live set and the index in memory.
    ///
    /// # Errors
    /// As [`ChunkStore::gc`].
    #[doc(hidden)]
    pub fn gc_loaded(&self, live: &HashSet<ChunkId>) -> Result<GcReport> {
        let _m = lock(&self.maintenance);
        let mut report = self.gc_start()?;
        let dead: Vec<(ChunkId, Location)> = self
            .all_entries()?
            .into_iter()
            .filter(|(id, _)| !live.contains(id))
            .collect();
        for batch in dead.chunks(super::GC_BATCH) {
            self.drop_dead(batch, &mut report)?;
        }
        self.sync()?;
        let (victims, empty) = self.compaction_victims();
        if !victims.is_empty() {
            let mut moving: Vec<(ChunkId, Location)> = self
                .all_entries()?
                .into_iter()
                .filter(|(_, l)| victims.contains(&l.pack))
                .collect();
            moving.sort_by_key(|(_, l)| (l.pack, l.offset));
            for (id, loc) in moving {
                self.move_chunk(id, loc, &mut report)?;
            }
            report.packs_compacted = victims.len() as u64;
            self.sync()?;
        }
        self.delete_dead_packs(&victims, empty, &mut report)?;
        report.disk_bytes_after = self.stats()?.disk_bytes;
        Ok(report)
    }
}
