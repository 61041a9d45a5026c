//! Replication: on every tick (or when a snapshot wakes it), place each
//! owned volume's replicas with the planner and push the newest generation
//! to every replica behind it; and [`VolumeService::ship`], the push a
//! handover waits for.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::error::Chain;
use super::metrics::VolumeMetrics;
use super::records::ReplicaRecord;
use super::schedule::{due, held_racks, release_returned, retry_at_once, Job, Owned};
use super::{VolumeError, VolumeService};
use crate::replicate::plan::{choose_replicas, RackView};
use crate::replicate::push::{self, PushReport, TransferProgress};
use crate::replicate::{blocking, PUSH_PROTOCOL};
use crate::Manifest;

/// Pushes running at once across all peers (at most one per peer link):
/// each keeps a link busy; more would only contend for the same disk.
pub const MAX_PUSHES: usize = 4;
/// After a failed push to a replica, wait this long before retrying it.
pub const RETRY_AFTER: Duration = Duration::from_secs(3);
/// How often the replication loop looks for work when not woken.
pub const REPLICATION_TICK: Duration = Duration::from_secs(1);
/// How often it looks while a push failed or a replica's rack is away:
/// a push cut by a fade starts again within this of the link's return
/// (see [`super::schedule::release_returned`]), well inside the 2 s a
/// field expects; each look computes the field view once.
pub const RETRY_TICK: Duration = Duration::from_millis(200);
/// How long a volume's replica rack may be unavailable (not up, or not
/// reachable) before the volume is re-protected on another rack. A radio
/// fade lasts seconds to a minute; re-protecting at once would send a whole
/// new copy elsewhere while the interrupted one waits, mostly transferred,
/// for its link. 20 s covers the `fading` profile's fades; a rack really
/// gone is down (no renewal) within a lease anyway, and its replica's
/// last generation still protects the volume meanwhile.
pub const REPROTECT_AFTER: Duration = Duration::from_secs(20);

/// Pushes in flight: (volume, rack) → (generation, progress). At most
/// [`MAX_PUSHES`] entries.
pub(super) type Running = HashMap<(String, String), (u64, Arc<TransferProgress>)>;

impl VolumeService {
    pub(super) async fn replication_loop(self: Arc<Self>, cancel: CancellationToken) {
        let pushes = Arc::new(Semaphore::new(MAX_PUSHES));
        // A push failed or a replica's rack is held: look often.
        let mut waiting = false;
        loop {
            let tick = if waiting {
                RETRY_TICK
            } else {
                REPLICATION_TICK
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
            let racks = self.peers.replica_candidates().await;
            let reachable: HashSet<String> = racks
                .iter()
                .filter(|r| r.alive)
                .map(|r| r.rack.clone())
                .collect();
            let held = held_racks(
                &racks,
                &mut self.away.lock().expect("away lock"),
                Instant::now(),
            );
            let released = release_returned(
                &mut self.failed_at.lock().expect("failed lock"),
                &mut self.lost.lock().expect("lost lock"),
                &reachable,
            );
            for (volume, rack) in &released {
                tracing::info!(%volume, %rack, "link back: resuming the push");
            }
            waiting = !held.is_empty() || !self.failed_at.lock().expect("failed lock").is_empty();
            let st = self.store.clone();
            // Generations only: the manifest (2 MiB for a 4 GiB volume) is
            // loaded by a push, not on every tick.
            let owned: Vec<(String, u64)> = blocking(move || {
                st.list()
                    .map(|l| {
                        l.into_iter()
                            .filter(|v| v.has_live_image && v.generation > 0)
                            .map(|v| (v.name, v.generation))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .await;
            let owned: Vec<Owned> = owned
                .into_iter()
                .map(|(volume, latest)| Owned {
                    replicas: self.place(&volume, &racks, &held),
                    volume,
                    latest,
                })
                .collect();
            // A held rack's link carries nothing until it is back.
            let busy: HashSet<String> = self
                .running
                .lock()
                .expect("running lock")
                .keys()
                .map(|(_, r)| r.clone())
                .chain(held.iter().cloned())
                .collect();
            let failed_at = self.failed_at.lock().expect("failed lock").clone();
            let jobs = due(
                &owned,
                &busy,
                &failed_at,
                Instant::now(),
                pushes.available_permits(),
            );
            for job in jobs {
                let Ok(permit) = pushes.clone().try_acquire_owned() else {
                    break;
                };
                self.start_push(permit, job);
            }
        }
    }

    /// Choose `volume`'s replica racks (keeping current ones that can
    /// still take it, and current ones on a `held` rack, away for less than
    /// [`REPROTECT_AFTER`]) and record any change; returns its replicas.
    fn place(
        &self,
        volume: &str,
        racks: &[RackView],
        held: &HashSet<String>,
    ) -> Vec<ReplicaRecord> {
        let me = RackView {
            rack: self.settings.rack.clone(),
            site: self.settings.site.clone(),
            alive: true,
            dying: false,
            witness: false,
            free_bytes: None,
        };
        let current: Vec<String> = self
            .records
            .get(volume)
            .replicas
            .iter()
            .map(|r| r.rack.clone())
            .collect();
        let racks: Vec<RackView> = racks
            .iter()
            .map(|r| RackView {
                alive: r.alive || (held.contains(&r.rack) && current.contains(&r.rack)),
                ..r.clone()
            })
            .collect();
        let chosen = choose_replicas(&me, &current, &racks, self.settings.replication_factor);
        if chosen != current {
            let dropped: Vec<&String> = current.iter().filter(|c| !chosen.contains(c)).collect();
            if !dropped.is_empty() {
                tracing::warn!(%volume, ?dropped, new = ?chosen, "re-protecting: replica rack unavailable");
            }
            self.records.update(volume, |rec| {
                rec.replicas = chosen
                    .iter()
                    .map(|r| {
                        rec.replicas
                            .iter()
                            .find(|x| &x.rack == r)
                            .cloned()
                            .unwrap_or(ReplicaRecord {
                                rack: r.clone(),
                                generation: None,
                                generation_created_ms: None,
                            })
                    })
                    .collect();
            });
        }
        self.records.get(volume).replicas
    }

    /// Start `job` on a task of its own, holding `permit` until it ends.
    fn start_push(self: &Arc<Self>, permit: OwnedSemaphorePermit, job: Job) {
        let key = (job.volume, job.rack);
        let progress = Arc::new(TransferProgress::default());
        self.running
            .lock()
            .expect("running lock")
            .insert(key.clone(), (job.generation, progress.clone()));
        let service = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            service.push_one(key, job.generation, progress).await;
        });
    }

    async fn push_one(
        self: Arc<Self>,
        key: (String, String),
        generation: u64,
        progress: Arc<TransferProgress>,
    ) {
        let (volume, rack) = key.clone();
        let (st, vol) = (self.store.clone(), volume.clone());
        let Ok(Some(manifest)) = blocking(move || st.manifest(&vol, generation)).await else {
            // Pruned or unreadable since the tick: the next tick offers the newest.
            self.running.lock().expect("running lock").remove(&key);
            return;
        };
        let created = manifest.created_at_ms;
        let started = Instant::now();
        let result = self.push_to(&rack, manifest, &progress).await;
        self.running.lock().expect("running lock").remove(&key);
        match result {
            Ok(report) => {
                tracing::info!(%volume, %rack, generation = report.generation, chunks = report.chunks, deltas = report.deltas, bytes = report.bytes, "replica up to date");
                self.failed_at.lock().expect("failed lock").remove(&key);
                self.backlogs.lock().expect("backlogs lock").pushed(
                    &rack,
                    report.bytes,
                    started.elapsed(),
                );
                self.records.update(&volume, |rec| {
                    if let Some(r) = rec.replicas.iter_mut().find(|r| r.rack == rack) {
                        r.generation = Some(report.generation);
                        r.generation_created_ms = Some(created);
                    }
                });
            }
            Err(e) => {
                self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                let (sent, _) = progress.get();
                if retry_at_once(e.is_cut(), sent) {
                    tracing::info!(%volume, %rack, sent_chunks = sent, error = %Chain(&e), "push cut: resuming at once");
                    self.failed_at.lock().expect("failed lock").remove(&key);
                } else {
                    tracing::warn!(%volume, %rack, error = %Chain(&e), "replication failed; will retry");
                    self.failed_at
                        .lock()
                        .expect("failed lock")
                        .insert(key, Instant::now());
                }
            }
        }
        self.wake.notify_one();
    }

    /// Push `manifest` to `rack` over a new stream, rate-limited on that
    /// link, counting into the link's sent counters.
    async fn push_to(
        &self,
        rack: &str,
        manifest: Manifest,
        progress: &TransferProgress,
    ) -> Result<PushReport, VolumeError> {
        let stream = self.transport.open(rack, PUSH_PROTOCOL).await?;
        let counters = VolumeMetrics::counters(&self.metrics.sent, rack);
        let limiter = self.limiter(rack);
        let (store, me) = (self.store.clone(), &self.settings.rack);
        let pushed = push::push_with_progress(
            store.clone(),
            me,
            manifest.clone(),
            stream,
            &limiter,
            &counters,
            progress,
        )
        .await;
        let pushed = match pushed {
            // A replica of the previous version: whole manifests, on a
            // new stream (its refusal cost one round trip).
            Err(push::PushError::OldReplica) => {
                let stream = self.transport.open(rack, PUSH_PROTOCOL).await?;
                push::push_v1_with_progress(
                    store, me, manifest, stream, &limiter, &counters, progress,
                )
                .await
            }
            other => other,
        };
        pushed.map_err(|source| VolumeError::Push {
            rack: rack.to_owned(),
            source,
        })
    }

    /// Hand a volume over: snapshot it (its appliance is stopped) and push
    /// that generation to `rack`, waiting for the replica to publish it.
    ///
    /// # Errors
    /// [`VolumeError`] if the snapshot, the stream or the push fails.
    pub async fn ship(&self, name: &str, rack: &str) -> Result<u64, VolumeError> {
        let m = self.snapshot(name.to_owned()).await?;
        let generation = m.generation;
        self.push_to(rack, m, &TransferProgress::default()).await?;
        Ok(generation)
    }
}
