//! Snapshots: on demand, from an appliance's own point-in-time copy, and
//! the loop that snapshots every owned volume that changed, then prunes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{VolumeError, VolumeService};
use crate::replicate::blocking;
use crate::volume::{PruneError, SnapshotError};
use crate::{Manifest, NoPause};

/// (ctime seconds, ctime nanoseconds, size) of a live image, taken before a
/// snapshot starts: if it has not moved by the next tick, nothing was written.
type ImageStamp = (i64, i64, u64);

fn image_stamp(path: &Path) -> Option<ImageStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ctime(), m.ctime_nsec(), m.size()))
}

impl VolumeService {
    /// Snapshot one owned volume now; returns the new (or unchanged) manifest.
    ///
    /// # Errors
    /// [`VolumeError::Snapshot`].
    pub async fn snapshot(&self, name: String) -> Result<Manifest, VolumeError> {
        let st = self.store.clone();
        let hooks = self.pause.lock().expect("pause lock").get(&name).cloned();
        let m = blocking(move || match hooks {
            Some(h) => st.snapshot(&name, h.as_ref(), &mut |_, _| {}),
            None => st.snapshot(&name, &NoPause, &mut |_, _| {}),
        })
        .await?;
        self.snapshot_taken();
        Ok(m)
    }

    /// Record a point-in-time copy of an owned volume as its next
    /// generation (see [`crate::VolumeStore::snapshot_from`]).
    ///
    /// # Errors
    /// [`VolumeError::Snapshot`].
    pub async fn snapshot_from(
        &self,
        name: &str,
        source: PathBuf,
    ) -> Result<Manifest, VolumeError> {
        let (st, n) = (self.store.clone(), name.to_owned());
        let m = blocking(move || st.snapshot_from(&n, &source, &mut |_, _| {})).await?;
        self.snapshot_taken();
        Ok(m)
    }

    /// A snapshot for the loop: [`SnapshotError::Busy`] at once if another
    /// operation holds the volume.
    async fn snapshot_if_idle(&self, name: String) -> Result<Manifest, SnapshotError> {
        let st = self.store.clone();
        let hooks = self.pause.lock().expect("pause lock").get(&name).cloned();
        let m = blocking(move || match hooks {
            Some(h) => st.snapshot_if_idle(&name, h.as_ref(), &mut |_, _| {}),
            None => st.snapshot_if_idle(&name, &NoPause, &mut |_, _| {}),
        })
        .await?;
        self.snapshot_taken();
        Ok(m)
    }

    /// Count a snapshot and wake the replication loop to offer it.
    fn snapshot_taken(&self) {
        self.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Every [`super::ServiceSettings::snapshot_interval`]: snapshot each
    /// owned volume written since the last round (skipping busy ones and
    /// those their appliance captures itself), then prune old generations.
    pub(super) async fn snapshot_loop(self: Arc<Self>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.snapshot_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_stamp: HashMap<String, ImageStamp> = HashMap::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let st = self.store.clone();
            let owned: Vec<String> = blocking(move || st.list())
                .await
                .map(|l| {
                    l.into_iter()
                        .filter(|v| v.has_live_image)
                        .map(|v| v.name)
                        .collect()
                })
                .unwrap_or_default();
            for name in owned {
                if self.external.lock().expect("external lock").contains(&name) {
                    continue;
                }
                // An idle volume gets no new generation: each would cost a
                // manifest on every replica link for nothing. (ctime moves on
                // every write, mmap'd ones included once flushed.)
                let seen = image_stamp(&self.store.image_path(&name));
                if seen.is_some() && last_stamp.get(&name) == seen.as_ref() {
                    continue;
                }
                match self.snapshot_if_idle(name.clone()).await {
                    Err(SnapshotError::Busy(_)) => {
                        tracing::debug!(volume = %name, "busy (an import?); snapshot skipped this round");
                    }
                    Ok(m) => {
                        tracing::debug!(volume = %name, generation = m.generation, "snapshot");
                        if let Some(stamp) = seen {
                            last_stamp.insert(name, stamp);
                        }
                    }
                    Err(e) => tracing::warn!(volume = %name, error = %e, "snapshot failed"),
                }
            }
            let (st, keep) = (self.store.clone(), self.settings.keep_snapshots);
            match blocking(move || st.prune(keep)).await {
                Ok(_) => {}
                Err(PruneError::Busy) => {
                    tracing::debug!("volume store busy; pruning deferred to the next round");
                }
                Err(e) => tracing::warn!(error = %e, "pruning old snapshots failed"),
            }
        }
    }
}
