//! Snapshots: on demand, from an appliance's own point-in-time copy, and
//! the loop that snapshots every owned volume that changed, then prunes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::pacing::{Backlog, Pace, PaceConfig};
use super::{VolumeError, VolumeService};
use crate::replicate::blocking;
use crate::volume::{PruneError, SnapshotError};
use crate::{Manifest, NoPause, SnapshotReport};

/// (ctime seconds, ctime nanoseconds, size) of a live image, taken before a
/// snapshot starts: if it has not moved by the next tick, nothing was written.
type ImageStamp = (i64, i64, u64);

/// How often the snapshot loop looks for written volumes whose interval
/// has passed: a quarter of the shortest sensible interval (2 s), so a
/// snapshot is at most this late; each look is one `stat` per volume.
pub const PACE_TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// How often old generations are pruned (and their chunks collected): gc
/// walks the whole index, too much to do on every tick.
pub const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

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
        let r = blocking(move || match hooks {
            Some(h) => st.snapshot_report(&name, h.as_ref(), &mut |_, _| {}),
            None => st.snapshot_report(&name, &NoPause, &mut |_, _| {}),
        })
        .await?;
        self.snapshot_taken(&r);
        Ok(r.manifest)
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
        let r = blocking(move || st.snapshot_from_report(&n, &source, &mut |_, _| {})).await?;
        self.snapshot_taken(&r);
        Ok(r.manifest)
    }

    /// Record a point-in-time copy that differs from generation `base`
    /// only inside `changed` (byte ranges) as the next generation, reading
    /// only the chunks they touch (see
    /// [`crate::VolumeStore::snapshot_changed`]: a `base` that is not the
    /// latest generation makes it read everything, never build a wrong
    /// manifest).
    ///
    /// # Errors
    /// [`VolumeError::Snapshot`].
    pub async fn snapshot_changed(
        &self,
        name: &str,
        source: PathBuf,
        base: u64,
        changed: Vec<std::ops::Range<u64>>,
    ) -> Result<SnapshotReport, VolumeError> {
        let (st, n) = (self.store.clone(), name.to_owned());
        let r = blocking(move || st.snapshot_changed(&n, &source, base, &changed, &mut |_, _| {}))
            .await?;
        self.snapshot_taken(&r);
        Ok(r)
    }

    /// A snapshot for the loop: [`SnapshotError::Busy`] at once if another
    /// operation holds the volume.
    async fn snapshot_if_idle(&self, name: String) -> Result<Manifest, SnapshotError> {
        let st = self.store.clone();
        let hooks = self.pause.lock().expect("pause lock").get(&name).cloned();
        let r = blocking(move || match hooks {
            Some(h) => st.snapshot_report_if_idle(&name, h.as_ref(), &mut |_, _| {}),
            None => st.snapshot_report_if_idle(&name, &NoPause, &mut |_, _| {}),
        })
        .await?;
        self.snapshot_taken(&r);
        Ok(r.manifest)
    }

    /// Count a snapshot, remember what it adds to the replication backlog
    /// and wake the replication loop to offer it.
    fn snapshot_taken(&self, r: &SnapshotReport) {
        self.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        self.backlogs.lock().expect("backlogs lock").produced(
            &r.manifest.volume,
            r.manifest.generation,
            r.new_bytes,
        );
        self.wake.notify_one();
    }

    /// Every [`PACE_TICK`]: snapshot each owned volume written since its
    /// last snapshot whose pacing interval has passed (skipping busy ones
    /// and those their appliance captures itself); every [`PRUNE_EVERY`],
    /// prune old generations.
    pub(super) async fn snapshot_loop(self: Arc<Self>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(PACE_TICK.min(self.settings.snapshot_interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let origin = tokio::time::Instant::now();
        let mut last_prune: Option<tokio::time::Instant> = None;
        let mut last_stamp: HashMap<String, ImageStamp> = HashMap::new();
        let cfg = self.pace_config();
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
            self.paces
                .lock()
                .expect("paces lock")
                .retain(|v, _| owned.contains(v));
            last_stamp.retain(|v, _| owned.contains(v));
            for name in owned {
                if self.external.lock().expect("external lock").contains(&name) {
                    continue;
                }
                // An idle volume gets no new generation: each would cost a
                // manifest on every replica link for nothing. (ctime moves on
                // every write, mmap'd ones included once flushed.)
                let seen = image_stamp(&self.store.image_path(&name));
                let written = seen.is_none() || last_stamp.get(&name) != seen.as_ref();
                let now = origin.elapsed();
                let due = self
                    .paces
                    .lock()
                    .expect("paces lock")
                    .entry(name.clone())
                    .or_insert_with(|| Pace::new(&cfg, now))
                    .due(now, written);
                if !due {
                    continue;
                }
                // What the replicas still lack of the earlier generations:
                // measured before this snapshot adds its own bytes, so a link
                // that sent every generation within its interval shows
                // nothing waiting, however much each snapshot holds.
                let backlog = self.backlog(&name);
                match self.snapshot_if_idle(name.clone()).await {
                    Err(SnapshotError::Busy(_)) => {
                        tracing::debug!(volume = %name, "busy (an import?); snapshot skipped this round");
                    }
                    Ok(m) => {
                        tracing::debug!(volume = %name, generation = m.generation, "snapshot");
                        if let Some(stamp) = seen {
                            last_stamp.insert(name.clone(), stamp);
                        }
                        if let Some(p) = self.paces.lock().expect("paces lock").get_mut(&name) {
                            let before = p.interval;
                            p.snapshotted(&cfg, origin.elapsed(), backlog);
                            if p.interval != before {
                                tracing::info!(volume = %name, interval_ms = p.interval.as_millis() as u64, waiting_bytes = backlog.waiting_bytes, "snapshot interval adapted to replication");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(volume = %name, error = %e, "snapshot failed"),
                }
            }
            if last_prune.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
                continue;
            }
            last_prune = Some(tokio::time::Instant::now());
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

    /// The bounds of every volume's snapshot interval.
    fn pace_config(&self) -> PaceConfig {
        PaceConfig {
            min_interval: self.settings.snapshot_interval,
            max_interval: self
                .settings
                .snapshot_max_interval
                .max(self.settings.snapshot_interval),
        }
    }

    /// What waits to reach the replica of `volume` that holds the most of
    /// it (the one that sets its recovery point), and that link's measured
    /// rate. A replica still catching up (new, or back from a cut) does not
    /// slow the snapshots down: it is sent the newest generation whenever
    /// its link is free, skipping the ones in between, while the replica
    /// that keeps up gets every one.
    pub(super) fn backlog(&self, volume: &str) -> Backlog {
        let rec = self.records.get(volume);
        let b = self.backlogs.lock().expect("backlogs lock");
        super::pacing::best_synced(rec.replicas.iter().map(|r| Backlog {
            waiting_bytes: b.waiting(volume, r.generation),
            push_bytes_per_s: b.rate(&r.rack),
        }))
    }
}
