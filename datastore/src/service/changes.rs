//! Snapshots from a capture that holds only what changed since a
//! generation (a QEMU appliance's incremental backup; see
//! [`crate::VolumeStore::snapshot_changes_only`]).

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use super::{VolumeError, VolumeService};
use crate::replicate::blocking;
use crate::SnapshotReport;

impl VolumeService {
    /// Record `changes` (the bytes of `changed` at their offsets, as they
    /// were at one point in time) on generation `base` as the next
    /// generation, reading only the chunks `changed` touches, and wake the
    /// replication loop.
    ///
    /// # Errors
    /// [`VolumeError::Changes`]: with
    /// [`crate::volume::incremental::ChangesOnlyError::StaleBase`] nothing
    /// was written and a full capture is needed.
    pub async fn snapshot_changes_only(
        &self,
        name: &str,
        changes: PathBuf,
        base: u64,
        changed: Vec<Range<u64>>,
    ) -> Result<SnapshotReport, VolumeError> {
        let (st, n) = (self.store.clone(), name.to_owned());
        let r = blocking(move || {
            st.snapshot_changes_only(&n, &changes, base, &changed, &mut |_, _| {})
        })
        .await?;
        self.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
        Ok(r)
    }
}
