//! Snapshots from a capture that holds *only* the changed ranges: QEMU's
//! incremental backup writes the clusters its dirty bitmap had set into a
//! sparse file, with holes everywhere else. Unlike
//! [`VolumeStore::snapshot_changed`], whose source is a complete copy (so
//! a stale base can fall back to reading all of it), such a source read
//! whole would describe every unchanged chunk as zeros: here a base that is
//! not exactly the latest generation is refused, under the volume's lock,
//! and the caller makes a full capture instead.

use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use super::{fsutil, io_err, lock, SnapshotError, SnapshotReport, VolumeStore, CHUNK_SIZE};

/// Why [`VolumeStore::snapshot_changes_only`] wrote nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChangesOnlyError {
    /// The changes are relative to a generation that is not the volume's
    /// latest (another snapshot, an import or a promotion came in between),
    /// or that this rack does not hold with today's chunk size: they cannot
    /// be applied; capture the whole image instead.
    #[error("volume {volume}: changes are relative to generation {base}, but the latest is {latest}; a full capture is needed")]
    StaleBase {
        /// The volume.
        volume: String,
        /// The generation the caller named.
        base: u64,
        /// The volume's latest generation.
        latest: u64,
    },
    /// Snapshotting failed otherwise.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl VolumeStore {
    /// Record generation `base + 1` of `name` from `changes`, a file of the
    /// volume's size holding, at their offsets, the bytes of `changed` as
    /// they were at one point in time, and anything (holes) elsewhere:
    /// only the chunks overlapping `changed` are read; every other entry is
    /// `base`'s. The caller guarantees that outside `changed` the volume at
    /// that point in time equals generation `base`.
    ///
    /// Same durability as [`VolumeStore::snapshot`]: the chunks read are
    /// synced before the manifest and the volume record are written in one
    /// batch.
    ///
    /// # Errors
    /// [`ChangesOnlyError::StaleBase`] if `base` is not the latest
    /// generation, held with [`CHUNK_SIZE`] chunks; [`SnapshotError`]
    /// otherwise. The volume stays at its previous generation.
    pub fn snapshot_changes_only(
        &self,
        name: &str,
        changes: &Path,
        base: u64,
        changed: &[Range<u64>],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<SnapshotReport, ChangesOnlyError> {
        let started = Instant::now();
        let _g = self.gc_shared();
        let vl = self.vol_lock(name);
        let _v = lock(&vl);
        let rec = self.live_record(name)?;
        let stale = || ChangesOnlyError::StaleBase {
            volume: name.to_owned(),
            base,
            latest: rec.generation,
        };
        if base == 0 || base != rec.generation {
            return Err(stale());
        }
        let base_manifest = self
            .manifest(name, base)
            .map_err(SnapshotError::from)?
            .filter(|m| m.chunk_size == CHUNK_SIZE)
            .ok_or_else(stale)?;
        let file = File::open(changes)
            .map_err(io_err("open", changes))
            .map_err(SnapshotError::from)?;
        let at = fsutil::now_ms();
        let (entries, scanned) = self.scan_from_base(
            &file,
            changes,
            rec.size,
            Some(&base_manifest),
            changed,
            progress,
        )?;
        let manifest = self
            .commit_generation(name, rec, entries, at)
            .map_err(SnapshotError::from)?;
        tracing::info!(
            volume = name,
            generation = manifest.generation,
            base,
            new_chunks = scanned.new_chunks,
            bytes_read = scanned.bytes_read,
            "snapshot of changes"
        );
        Ok(scanned.provided_report(manifest, started, Some(base)))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::NoPause;

    /// Changes on the latest generation give the same manifest as a full
    /// snapshot of the whole disk; any other base is refused, nothing
    /// written.
    #[test]
    fn changes_apply_only_to_the_latest_generation() {
        let dir = tempfile::tempdir().unwrap();
        let st = VolumeStore::open(dir.path().join("s")).unwrap();
        let size = 1 << 20;
        st.create("v", size).unwrap();
        let live = std::fs::OpenOptions::new()
            .write(true)
            .open(st.image_path("v"))
            .unwrap();
        live.write_all_at(&[1; 4096], 0).unwrap();
        live.write_all_at(&[2; 4096], 500_000).unwrap();
        let g1 = st.snapshot("v", &NoPause, &mut |_, _| {}).unwrap();
        // The guest changes one block; the capture holds only its cluster.
        live.write_all_at(&[3; 4096], 600_000).unwrap();
        let changes = dir.path().join("changes");
        let f = std::fs::File::create(&changes).unwrap();
        f.set_len(size).unwrap();
        let cluster = 600_000 / 65536 * 65536;
        let mut data = vec![0u8; 65536];
        std::fs::File::open(st.image_path("v"))
            .unwrap()
            .read_exact_at(&mut data, cluster)
            .unwrap();
        f.write_all_at(&data, cluster).unwrap();
        let changed = cluster..cluster + 65536;
        let r = st
            .snapshot_changes_only(
                "v",
                &changes,
                g1.generation,
                std::slice::from_ref(&changed),
                &mut |_, _| {},
            )
            .unwrap();
        assert_eq!(r.base, Some(g1.generation));
        assert_eq!(r.bytes_read, 65536);
        let full = st.snapshot("v", &NoPause, &mut |_, _| {}).unwrap();
        assert_eq!(r.manifest.chunks, full.chunks, "same as a full pass");
        for base in [0, g1.generation, r.manifest.generation] {
            match st.snapshot_changes_only(
                "v",
                &changes,
                base,
                std::slice::from_ref(&changed),
                &mut |_, _| {},
            ) {
                Err(ChangesOnlyError::StaleBase { latest, .. }) => {
                    assert_eq!(latest, full.generation);
                }
                other => panic!("base {base}: {other:?}"),
            }
        }
        assert_eq!(st.latest("v").unwrap().unwrap().generation, full.generation);
    }
}
