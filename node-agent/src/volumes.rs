//! The volume engine: snapshots owned volumes on a schedule, keeps each one
//! replicated to the racks the planner picks (re-protecting when a replica
//! rack dies), serves pushes and fetches from peers, and scrubs.
//!
//! Bulk data travels on raw libp2p streams over the fleet-authenticated
//! mesh connection (`MeshHandle::open_stream`, which refuses peers that
//! are not admitted).
//!
//! Imports read only regular files inside the import directories
//! (`<data_dir>/import` and `[volumes] import_dirs`), opened without
//! blocking before any lock is taken ([`datastore::ImportSource`]); an
//! import holds only its own volume, and the snapshot loop skips a volume
//! that is busy instead of waiting for it, so one slow or stuck import
//! never delays the snapshots of other volumes.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use datastore::replicate::limiter::LinkLimiter;
use datastore::replicate::plan::{choose_replicas, RackView};
use datastore::replicate::{fetch, push, TransferCounters, FETCH_PROTOCOL, PUSH_PROTOCOL};
use datastore::volume::{PruneError, SnapshotError};
use datastore::{volume, ImportSource, Manifest, NoPause, PauseHooks, VolumeStore};
use deploy::config::VolumesConfig;
use deploy::Role;
use mesh::membership::State;
use mesh::MeshHandle;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use util::time::unix_ms;

use crate::state::AgentState;

/// The import directory every rack has, under its data directory.
pub const IMPORT_DIR: &str = "import";

/// Sets a flag when dropped: a blocking job whose future went away stops.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Pushes running at once across all peers (at most one per peer link):
/// each keeps a link busy; more would only contend for the same disk.
pub const MAX_PUSHES: usize = 4;
/// Inbound transfers served at once.
pub const MAX_SERVES: usize = 4;
/// After a failed push to a replica, wait this long before retrying it.
pub const RETRY_AFTER: Duration = Duration::from_secs(3);
/// How often the replication loop looks for work when not woken.
pub const REPLICATION_TICK: Duration = Duration::from_secs(1);

/// (ctime seconds, ctime nanoseconds, size) of a live image, taken before a
/// snapshot starts: if it has not moved by the next tick, nothing was written.
fn image_stamp(path: &std::path::Path) -> Option<(i64, i64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ctime(), m.ctime_nsec(), m.size()))
}

/// What we know of one replica of a volume we own (persisted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// The replica rack.
    pub rack: String,
    /// The newest generation it confirmed holding.
    pub generation: Option<u64>,
    /// When that generation was snapshotted (unix ms): the replica's point in time.
    pub generation_created_ms: Option<u64>,
}

/// Per-volume replication bookkeeping (persisted in the agent's store).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// For volumes we hold as a replica: who owns them.
    pub owner: Option<String>,
    /// For volumes we own: their replicas.
    pub replicas: Vec<ReplicaRecord>,
}

/// `volumes[]` in the status document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// Volume name.
    pub name: String,
    /// Owning rack.
    pub owner: Option<String>,
    /// Newest generation held here.
    pub generation: Option<u64>,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Replicas (owner side only).
    pub replicas: Vec<ReplicaStatus>,
    /// Recovery point: seconds of writes that would be lost if the owner
    /// died now (age of the newest snapshot some replica holds); owner side.
    pub rpo_s: Option<f64>,
    /// Generations held here.
    pub generations_held: Vec<u64>,
    /// Path of the live raw image (owner side): what appliances open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Transfer in progress to or from this rack, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<String>,
}

/// `volumes[].replicas[]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Replica rack.
    pub rack: String,
    /// Newest generation it holds.
    pub generation: Option<u64>,
    /// How far behind the owner's newest snapshot it is, in seconds.
    pub lag_s: Option<f64>,
}

/// Replication counters for `/metrics`, per peer rack.
#[derive(Debug, Default)]
pub struct VolumeMetrics {
    /// Bytes sent per peer.
    pub sent: Mutex<HashMap<String, Arc<TransferCounters>>>,
    /// Bytes received per peer.
    pub received: Mutex<HashMap<String, Arc<TransferCounters>>>,
    /// Failed transfers (either direction).
    pub failures: AtomicU64,
    /// Chunks repaired after a scrub found them corrupt.
    pub scrub_repairs: AtomicU64,
    /// Corrupt chunks found by scrubs.
    pub scrub_corrupt: AtomicU64,
    /// Snapshots taken.
    pub snapshots: AtomicU64,
}

impl VolumeMetrics {
    fn counters(
        map: &Mutex<HashMap<String, Arc<TransferCounters>>>,
        rack: &str,
    ) -> Arc<TransferCounters> {
        map.lock()
            .expect("metrics lock")
            .entry(rack.to_string())
            .or_default()
            .clone()
    }
}

/// Pushes in flight: (volume, rack) → (generation, progress).
type Running = HashMap<(String, String), (u64, Arc<push::TransferProgress>)>;

/// The engine, shared by the API and its loops.
pub struct VolumeEngine {
    /// The local volume store.
    pub store: Arc<VolumeStore>,
    rack: String,
    site: String,
    config: VolumesConfig,
    /// Where imports may read images: `<data_dir>/import` and
    /// `[volumes] import_dirs`.
    import_dirs: Vec<PathBuf>,
    mesh: MeshHandle,
    state: AgentState,
    /// Counters.
    pub metrics: VolumeMetrics,
    records: Mutex<HashMap<String, VolumeRecord>>,
    limiters: Mutex<HashMap<String, Arc<LinkLimiter>>>,
    /// Pushes in flight: (volume, rack) → (generation, progress).
    running: Mutex<Running>,
    failed_at: Mutex<HashMap<(String, String), std::time::Instant>>,
    wake: Notify,
    /// How to freeze the appliance writing a volume while it is captured.
    pause: Mutex<HashMap<String, SharedPause>>,
    /// Volumes whose appliance captures them itself (QEMU over QMP): the
    /// snapshot loop leaves them to the supervisor.
    external: Mutex<HashSet<String>>,
}

/// Pause hooks shared between the appliance supervisor and snapshots.
pub type SharedPause = Arc<dyn PauseHooks + Send + Sync>;

/// Why a volume operation failed: the store's own typed error, kept whole
/// (its source chain included) so that the API can answer a full disk with
/// 507, an unknown volume with 404 and a volume owned elsewhere with 409.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    /// Creating the volume failed.
    #[error(transparent)]
    Create(#[from] volume::CreateError),
    /// Snapshotting it failed.
    #[error(transparent)]
    Snapshot(#[from] volume::SnapshotError),
    /// Importing an image failed.
    #[error(transparent)]
    Import(#[from] volume::ImportError),
    /// Exporting a generation failed.
    #[error(transparent)]
    Export(#[from] volume::ExportError),
    /// Promoting a replica to the live image failed.
    #[error(transparent)]
    Promote(#[from] volume::PromoteError),
    /// A registry read or delete failed.
    #[error(transparent)]
    Store(#[from] volume::StoreError),
    /// The rack to ship to has no admitted connection.
    #[error("{rack} is not connected")]
    NotConnected {
        /// The rack.
        rack: String,
    },
    /// No stream to the rack could be opened.
    #[error("opening a stream to {rack}")]
    Stream {
        /// The rack.
        rack: String,
        /// Why.
        #[source]
        source: mesh::MeshError,
    },
    /// Pushing the generation failed.
    #[error("pushing to {rack}")]
    Push {
        /// The rack.
        rack: String,
        /// Why.
        #[source]
        source: push::PushError,
    },
    /// This rack is a witness: it stores no volumes.
    #[error("this rack is a witness: it stores no volumes")]
    Witness,
}

/// The store's typed error as a [`VolumeError`] (one conversion, so every
/// call site reads alike).
fn store_err<E: Into<VolumeError>>(e: E) -> VolumeError {
    e.into()
}

impl VolumeEngine {
    /// Open the store under `data_dir/volumes`.
    ///
    /// # Errors
    /// If the store cannot be opened.
    pub fn open(
        data_dir: &std::path::Path,
        rack: &str,
        site: &str,
        config: VolumesConfig,
        mesh: MeshHandle,
        state: AgentState,
    ) -> anyhow::Result<Arc<Self>> {
        let store = Arc::new(
            VolumeStore::open(data_dir.join("volumes")).context("opening the volume store")?,
        );
        let records = state.volume_records()?;
        let default_import = data_dir.join(IMPORT_DIR);
        std::fs::create_dir_all(&default_import).map_err(|e| {
            anyhow::anyhow!(
                "creating the import directory {}: {e}",
                default_import.display()
            )
        })?;
        let mut import_dirs = vec![default_import];
        import_dirs.extend(config.import_dirs.iter().cloned());
        Ok(Arc::new(Self {
            store,
            rack: rack.to_string(),
            site: site.to_string(),
            import_dirs,
            config,
            mesh,
            state,
            metrics: VolumeMetrics::default(),
            records: Mutex::new(records),
            limiters: Mutex::default(),
            running: Mutex::default(),
            failed_at: Mutex::default(),
            wake: Notify::new(),
            pause: Mutex::default(),
            external: Mutex::default(),
        }))
    }

    fn limiter(&self, rack: &str) -> Arc<LinkLimiter> {
        self.limiters
            .lock()
            .expect("limiters lock")
            .entry(rack.to_string())
            .or_insert_with(|| Arc::new(LinkLimiter::new(self.config.link_bytes_per_s)))
            .clone()
    }

    fn save_record(&self, volume: &str, rec: &VolumeRecord) {
        if let Err(e) = self.state.put_volume_record(volume, rec) {
            tracing::error!(%volume, error = %e, "could not persist replication state");
        }
    }

    /// Create an owned volume.
    ///
    /// # Errors
    /// [`VolumeError`].
    pub async fn create(&self, name: String, size: u64) -> Result<(), VolumeError> {
        let st = self.store.clone();
        tokio::task::spawn_blocking(move || st.create(&name, size).map(|_| ()))
            .await
            .expect("create task")
            .map_err(store_err)
    }

    /// Snapshot one owned volume now; returns the new (or unchanged) manifest.
    ///
    /// # Errors
    /// [`VolumeError`].
    pub async fn snapshot(&self, name: String) -> Result<Manifest, VolumeError> {
        let st = self.store.clone();
        let hooks = self.pause.lock().expect("pause lock").get(&name).cloned();
        let m = tokio::task::spawn_blocking(move || match hooks {
            Some(h) => st.snapshot(&name, h.as_ref(), &mut |_, _| {}),
            None => st.snapshot(&name, &NoPause, &mut |_, _| {}),
        })
        .await
        .expect("snapshot task")
        .map_err(store_err)?;
        self.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
        Ok(m)
    }

    /// The directories imports may read from.
    pub fn import_dirs(&self) -> &[PathBuf] {
        &self.import_dirs
    }

    /// A snapshot for the loop: [`SnapshotError::Busy`] at once if another
    /// operation holds the volume.
    async fn snapshot_if_idle(&self, name: String) -> Result<Manifest, SnapshotError> {
        let st = self.store.clone();
        let hooks = self.pause.lock().expect("pause lock").get(&name).cloned();
        let m = tokio::task::spawn_blocking(move || match hooks {
            Some(h) => st.snapshot_if_idle(&name, h.as_ref(), &mut |_, _| {}),
            None => st.snapshot_if_idle(&name, &NoPause, &mut |_, _| {}),
        })
        .await
        .expect("snapshot task")?;
        self.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
        Ok(m)
    }

    /// Import a raw or qcow2 image into a volume (its next generation).
    /// `from` must be an absolute path to a regular file inside
    /// [`VolumeEngine::import_dirs`]; it is opened and checked before any
    /// lock is taken. Stops, leaving the volume unchanged, when `cancel`
    /// fires or the future is dropped.
    ///
    /// # Errors
    /// [`VolumeError`].
    pub async fn import(
        &self,
        name: String,
        from: PathBuf,
        cancel: CancellationToken,
        progress: impl FnMut(u64, u64) + Send + 'static,
    ) -> Result<Manifest, VolumeError> {
        let st = self.store.clone();
        let dirs = self.import_dirs.clone();
        let mut progress = progress;
        let stop = Arc::new(AtomicBool::new(false));
        let _stop_on_drop = SetOnDrop(stop.clone());
        let bridge = {
            let stop = stop.clone();
            tokio::spawn(async move {
                cancel.cancelled().await;
                stop.store(true, Ordering::SeqCst);
            })
        };
        let _bridge = tokio_util::task::AbortOnDropHandle::new(bridge);
        let m = tokio::task::spawn_blocking(
            move || -> Result<Manifest, datastore::volume::ImportError> {
                let src = ImportSource::open(&from, Some(dirs.as_slice()))?;
                st.import_source(&name, src, &stop, &mut progress)
            },
        )
        .await
        .expect("import task")
        .map_err(store_err)?;
        self.wake.notify_one();
        Ok(m)
    }

    /// Export a generation (newest by default) to a raw image.
    ///
    /// # Errors
    /// [`VolumeError`].
    pub async fn export(
        &self,
        name: String,
        generation: Option<u64>,
        to: PathBuf,
        progress: impl FnMut(u64, u64) + Send + 'static,
    ) -> Result<(), VolumeError> {
        let st = self.store.clone();
        let mut progress = progress;
        tokio::task::spawn_blocking(move || {
            st.export(&name, generation, &to, &mut progress).map(|_| ())
        })
        .await
        .expect("export task")
        .map_err(store_err)
    }

    /// Snapshots of `volume` pause its appliance with `hooks` (none: no
    /// appliance runs on it).
    pub fn set_pause_hooks(&self, volume: &str, hooks: Option<SharedPause>) {
        let mut p = self.pause.lock().expect("pause lock");
        match hooks {
            Some(h) => p.insert(volume.to_owned(), h),
            None => p.remove(volume),
        };
    }

    /// While set, `volume` is snapshotted by its appliance's driver (a
    /// point-in-time copy recorded with [`VolumeEngine::snapshot_from`]),
    /// not by the snapshot loop.
    pub fn set_external_capture(&self, volume: &str, on: bool) {
        let mut e = self.external.lock().expect("external lock");
        if on {
            e.insert(volume.to_owned());
        } else {
            e.remove(volume);
        }
    }

    /// How often owned volumes are snapshotted.
    #[must_use]
    pub fn snapshot_interval(&self) -> Duration {
        Duration::from_secs(self.config.snapshot_interval_s)
    }

    /// Record a point-in-time copy of an owned volume as its next
    /// generation (see `VolumeStore::snapshot_from`).
    ///
    /// # Errors
    /// [`VolumeError`].
    pub async fn snapshot_from(
        &self,
        name: &str,
        source: PathBuf,
    ) -> Result<Manifest, VolumeError> {
        let st = self.store.clone();
        let n = name.to_owned();
        let m = tokio::task::spawn_blocking(move || st.snapshot_from(&n, &source, &mut |_, _| {}))
            .await
            .expect("snapshot task")
            .map_err(store_err)?;
        self.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
        Ok(m)
    }

    /// Newest complete generation held of every volume (owned or replica).
    pub async fn held_generations(&self) -> std::collections::BTreeMap<String, u64> {
        let st = self.store.clone();
        tokio::task::spawn_blocking(move || st.list())
            .await
            .expect("list task")
            .map(|l| {
                l.into_iter()
                    .filter(|v| v.generation > 0 || v.has_live_image)
                    .map(|v| (v.name, v.generation))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Make sure this rack owns `name` with a live image: already owned,
    /// else promoted from the newest replica generation held, else created
    /// empty with `size`. Returns the image path and how it was obtained.
    ///
    /// # Errors
    /// [`VolumeError`].
    pub async fn ensure_owned(
        &self,
        name: &str,
        size: u64,
    ) -> Result<(PathBuf, &'static str), VolumeError> {
        let st = self.store.clone();
        let n = name.to_owned();
        let how = tokio::task::spawn_blocking(move || -> Result<&'static str, VolumeError> {
            if st.owns(&n).map_err(store_err)? {
                return Ok("owned");
            }
            if st.latest(&n).map_err(store_err)?.is_some() {
                st.promote(&n, &mut |_, _| {}).map_err(store_err)?;
                return Ok("promoted");
            }
            st.create(&n, size).map_err(store_err)?;
            Ok("created")
        })
        .await
        .expect("ensure task")?;
        if how == "promoted" {
            // We own it now: forget whose replica it was.
            let mut records = self.records.lock().expect("records lock");
            let rec = records.entry(name.to_owned()).or_default();
            rec.owner = None;
            let rec = rec.clone();
            drop(records);
            self.save_record(name, &rec);
        }
        self.wake.notify_one();
        Ok((self.store.image_path(name), how))
    }

    /// Hand a volume over: snapshot it (its appliance is stopped) and push
    /// that generation to `rack`, waiting for the replica to publish it.
    ///
    /// # Errors
    /// [`VolumeError`] if the snapshot or the push fails.
    pub async fn ship(&self, name: &str, rack: &str) -> Result<u64, VolumeError> {
        let m = self.snapshot(name.to_owned()).await?;
        let generation = m.generation;
        let peer = self
            .mesh
            .admitted()
            .into_iter()
            .find(|(_, r)| r == rack)
            .map(|(p, _)| p)
            .ok_or_else(|| VolumeError::NotConnected {
                rack: rack.to_owned(),
            })?;
        let stream = self
            .mesh
            .open_stream(peer, PUSH_PROTOCOL)
            .await
            .map_err(|source| VolumeError::Stream {
                rack: rack.to_owned(),
                source,
            })?;
        let counters = VolumeMetrics::counters(&self.metrics.sent, rack);
        let limiter = self.limiter(rack);
        let progress = push::TransferProgress::default();
        push::push_with_progress(
            self.store.clone(),
            &self.rack,
            m,
            stream,
            &limiter,
            &counters,
            &progress,
        )
        .await
        .map_err(|source| VolumeError::Push {
            rack: rack.to_owned(),
            source,
        })?;
        Ok(generation)
    }

    /// Stop owning `name`: another rack is its primary now. The local copy
    /// (live image and generations) is dropped, so the new owner's
    /// generations replace it without conflict; shared chunks stay until
    /// the next prune and are not resent.
    ///
    /// # Errors
    /// [`VolumeError`].
    pub async fn demote(&self, name: &str) -> Result<(), VolumeError> {
        self.set_pause_hooks(name, None);
        let st = self.store.clone();
        let n = name.to_owned();
        tokio::task::spawn_blocking(move || st.delete(&n))
            .await
            .expect("delete task")
            .map_err(store_err)?;
        self.records.lock().expect("records lock").remove(name);
        tracing::info!(volume = %name, "demoted: another rack owns it now");
        Ok(())
    }

    /// The `volumes` part of the status document.
    pub async fn status(&self) -> Vec<VolumeStatus> {
        // Store reads stay off the runtime: the volume list and, per volume,
        // when its newest snapshot was taken (for lag and RPO).
        let st = self.store.clone();
        let list: Vec<(datastore::VolumeInfo, Option<u64>)> =
            tokio::task::spawn_blocking(move || {
                st.list()
                    .map(|l| {
                        l.into_iter()
                            .map(|v| {
                                let created =
                                    st.latest(&v.name).ok().flatten().map(|m| m.created_at_ms);
                                (v, created)
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .await
            .expect("list task");
        let records = self.records.lock().expect("records lock").clone();
        let running = self.running.lock().expect("running lock").clone();
        let now = unix_ms();
        let mut out = Vec::new();
        for (v, latest_created) in list {
            let rec = records.get(&v.name).cloned().unwrap_or_default();
            let (owner, replicas, rpo_s) = if v.has_live_image {
                let reps: Vec<ReplicaStatus> = rec
                    .replicas
                    .iter()
                    .map(|r| ReplicaStatus {
                        rack: r.rack.clone(),
                        generation: r.generation,
                        lag_s: match (latest_created, r.generation_created_ms) {
                            (Some(l), Some(c)) => Some(l.saturating_sub(c) as f64 / 1000.0),
                            _ => None,
                        },
                    })
                    .collect();
                let newest_replicated = rec
                    .replicas
                    .iter()
                    .filter_map(|r| r.generation_created_ms)
                    .max();
                (
                    Some(self.rack.clone()),
                    reps,
                    newest_replicated.map(|c| now.saturating_sub(c) as f64 / 1000.0),
                )
            } else {
                (rec.owner.clone(), Vec::new(), None)
            };
            let transfer = running.iter().find(|((vol, _), _)| vol == &v.name).map(|((_, rack), (generation, p))| {
                                let (sent, total) = p.get();
                match (sent * 100).checked_div(total) {
                    None => format!("offering generation {generation} to {rack}"),
                    Some(pct) => format!("sending generation {generation} to {rack}: {pct}% ({sent} of {total} chunks)"),
                }
            });
            let image = v
                .has_live_image
                .then(|| self.store.image_path(&v.name).display().to_string());
            out.push(VolumeStatus {
                image,
                name: v.name,
                owner,
                generation: (v.generation > 0).then_some(v.generation),
                size_bytes: v.size,
                replicas,
                rpo_s,
                generations_held: v.generations_held,
                transfer,
            });
        }
        out
    }

    /// Run the engine's loops until `cancel`.
    pub async fn run(self: Arc<Self>, role: Role, cancel: CancellationToken) {
        if role == Role::Witness {
            cancel.cancelled().await;
            return;
        }
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.clone().snapshot_loop(cancel.clone()));
        tasks.spawn(self.clone().replication_loop(cancel.clone()));
        tasks.spawn(self.clone().serve_loop(PUSH_PROTOCOL, cancel.clone()));
        tasks.spawn(self.clone().serve_loop(FETCH_PROTOCOL, cancel.clone()));
        tasks.spawn(self.clone().scrub_loop(cancel.clone()));
        cancel.cancelled().await;
        tasks.shutdown().await;
    }

    async fn snapshot_loop(self: Arc<Self>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(self.config.snapshot_interval_s));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_stamp: HashMap<String, (i64, i64, u64)> = HashMap::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let st = self.store.clone();
            let owned: Vec<String> = tokio::task::spawn_blocking(move || st.list())
                .await
                .expect("list task")
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
            let (st, keep) = (self.store.clone(), self.config.keep_snapshots);
            match tokio::task::spawn_blocking(move || st.prune(keep))
                .await
                .expect("prune task")
            {
                Ok(_) => {}
                Err(PruneError::Busy) => {
                    tracing::debug!("volume store busy; pruning deferred to the next round");
                }
                Err(e) => tracing::warn!(error = %e, "pruning old snapshots failed"),
            }
        }
    }

    /// The racks as the planner sees them.
    async fn rack_views(&self) -> Vec<RackView> {
        let Ok(status) = self.mesh.status().await else {
            return Vec::new();
        };
        let admitted: HashSet<String> = self.mesh.admitted().into_iter().map(|(_, r)| r).collect();
        status
            .peers
            .iter()
            .filter_map(|p| {
                let meta = p.meta.as_ref()?;
                Some(RackView {
                    rack: meta.rack.clone(),
                    site: meta.site.clone(),
                    alive: p.state == State::Alive && admitted.contains(&meta.rack),
                    witness: meta.role == Role::Witness,
                    free_bytes: None,
                })
            })
            .collect()
    }

    async fn replication_loop(self: Arc<Self>, cancel: CancellationToken) {
        let pushes = Arc::new(Semaphore::new(MAX_PUSHES));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(REPLICATION_TICK) => {}
            }
            let racks = self.rack_views().await;
            let st = self.store.clone();
            // Generations only: the manifest (2 MiB for a 4 GiB volume) is
            // loaded by a push, not on every tick.
            let owned: Vec<(String, u64)> = tokio::task::spawn_blocking(move || {
                st.list()
                    .map(|l| {
                        l.into_iter()
                            .filter(|v| v.has_live_image && v.generation > 0)
                            .map(|v| (v.name, v.generation))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .await
            .expect("list task");
            let me = RackView {
                rack: self.rack.clone(),
                site: self.site.clone(),
                alive: true,
                witness: false,
                free_bytes: None,
            };
            for (volume, latest) in owned {
                let mut rec = self
                    .records
                    .lock()
                    .expect("records lock")
                    .get(&volume)
                    .cloned()
                    .unwrap_or_default();
                let current: Vec<String> = rec.replicas.iter().map(|r| r.rack.clone()).collect();
                let chosen = choose_replicas(&me, &current, &racks, self.config.replication_factor);
                if chosen != current {
                    let dropped: Vec<&String> =
                        current.iter().filter(|c| !chosen.contains(c)).collect();
                    if !dropped.is_empty() {
                        tracing::warn!(%volume, ?dropped, new = ?chosen, "re-protecting: replica rack unavailable");
                    }
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
                    self.records
                        .lock()
                        .expect("records lock")
                        .insert(volume.clone(), rec.clone());
                    self.save_record(&volume, &rec);
                }
                for replica in rec.replicas.iter().filter(|r| r.generation < Some(latest)) {
                    let key = (volume.clone(), replica.rack.clone());
                    // One push per peer link at a time: concurrent pushes of
                    // volumes sharing chunks (clones of one base) would each
                    // decide at their start that the replica lacks the shared
                    // chunks and all send them; sequential pushes deduplicate.
                    // It also keeps one volume's transfer from starving another
                    // on a thin radio link.
                    if self
                        .running
                        .lock()
                        .expect("running lock")
                        .keys()
                        .any(|(_, r)| r == &replica.rack)
                    {
                        continue;
                    }
                    if self
                        .failed_at
                        .lock()
                        .expect("failed lock")
                        .get(&key)
                        .is_some_and(|t| t.elapsed() < RETRY_AFTER)
                    {
                        continue;
                    }
                    let Ok(permit) = pushes.clone().try_acquire_owned() else {
                        break;
                    };
                    let progress = Arc::new(push::TransferProgress::default());
                    self.running
                        .lock()
                        .expect("running lock")
                        .insert(key.clone(), (latest, progress.clone()));
                    let engine = self.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        engine.push_one(key, latest, progress).await;
                    });
                }
            }
        }
    }

    async fn push_one(
        self: Arc<Self>,
        key: (String, String),
        generation: u64,
        progress: Arc<push::TransferProgress>,
    ) {
        let (volume, rack) = key.clone();
        let (st, vol) = (self.store.clone(), volume.clone());
        let manifest = match tokio::task::spawn_blocking(move || st.manifest(&vol, generation))
            .await
            .expect("manifest task")
        {
            Ok(Some(m)) => m,
            // Pruned or unreadable since the tick: the next tick offers the newest.
            _ => {
                self.running.lock().expect("running lock").remove(&key);
                return;
            }
        };
        let peer = self
            .mesh
            .admitted()
            .into_iter()
            .find(|(_, r)| r == &rack)
            .map(|(p, _)| p);
        let result = match peer {
            None => Err(format!("{rack} is not connected")),
            Some(peer) => match self.mesh.open_stream(peer, PUSH_PROTOCOL).await {
                Err(e) => Err(e.to_string()),
                Ok(stream) => {
                    let counters = VolumeMetrics::counters(&self.metrics.sent, &rack);
                    let limiter = self.limiter(&rack);
                    let created = manifest.created_at_ms;
                    push::push_with_progress(
                        self.store.clone(),
                        &self.rack,
                        manifest,
                        stream,
                        &limiter,
                        &counters,
                        &progress,
                    )
                    .await
                    .map(|r| (r, created))
                    .map_err(|e| e.to_string())
                }
            },
        };
        self.running.lock().expect("running lock").remove(&key);
        match result {
            Ok((report, created)) => {
                tracing::info!(%volume, %rack, generation = report.generation, chunks = report.chunks, deltas = report.deltas, bytes = report.bytes, "replica up to date");
                self.failed_at.lock().expect("failed lock").remove(&key);
                let mut records = self.records.lock().expect("records lock");
                let rec = records.entry(volume.clone()).or_default();
                if let Some(r) = rec.replicas.iter_mut().find(|r| r.rack == rack) {
                    r.generation = Some(report.generation);
                    r.generation_created_ms = Some(created);
                }
                let rec = rec.clone();
                drop(records);
                self.save_record(&volume, &rec);
            }
            Err(e) => {
                self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%volume, %rack, error = %e, "replication failed; will retry");
                self.failed_at
                    .lock()
                    .expect("failed lock")
                    .insert(key, std::time::Instant::now());
            }
        }
        self.wake.notify_one();
    }

    async fn serve_loop(self: Arc<Self>, protocol: &'static str, cancel: CancellationToken) {
        let mut incoming = match self.mesh.accept_streams(protocol) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(%protocol, error = %e, "cannot accept streams");
                return;
            }
        };
        let serves = Arc::new(Semaphore::new(MAX_SERVES));
        loop {
            let (peer, stream) = tokio::select! {
                _ = cancel.cancelled() => return,
                next = incoming.next() => match next { Some(x) => x, None => return },
            };
            let Some(rack) = self
                .mesh
                .admitted()
                .into_iter()
                .find(|(p, _)| *p == peer)
                .map(|(_, r)| r)
            else {
                continue;
            };
            let Ok(permit) = serves.clone().try_acquire_owned() else {
                tracing::warn!(%rack, %protocol, "too many transfers; refusing one");
                continue;
            };
            let engine = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let counters = VolumeMetrics::counters(&engine.metrics.received, &rack);
                if protocol == PUSH_PROTOCOL {
                    match push::serve(engine.store.clone(), &rack, stream, &counters).await {
                        Ok(r) => {
                            tracing::info!(volume = %r.volume, from = %rack, generation = r.generation, chunks = r.chunks, deltas = r.deltas, "replica generation published");
                            let mut records = engine.records.lock().expect("records lock");
                            let rec = records.entry(r.volume.clone()).or_default();
                            if rec.owner.as_deref() != Some(rack.as_str()) {
                                rec.owner = Some(rack.clone());
                                let rec = rec.clone();
                                drop(records);
                                engine.save_record(&r.volume, &rec);
                            }
                        }
                        Err(e) => {
                            engine.metrics.failures.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(from = %rack, error = %e, "incoming replication failed");
                        }
                    }
                } else {
                    let limiter = engine.limiter(&rack);
                    let sent = VolumeMetrics::counters(&engine.metrics.sent, &rack);
                    if let Err(e) =
                        fetch::serve(engine.store.clone(), stream, &limiter, &sent).await
                    {
                        tracing::warn!(from = %rack, error = %e, "chunk fetch failed");
                    }
                }
            });
        }
    }

    /// Verify every stored chunk; fetch corrupt ones back from peers.
    pub async fn scrub_now(self: &Arc<Self>) -> (usize, usize) {
        let st = self.store.clone();
        let report = match tokio::task::spawn_blocking(move || st.chunks().scrub(&mut |_, _| {}))
            .await
            .expect("scrub task")
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "scrub failed");
                return (0, 0);
            }
        };
        if report.corrupt.is_empty() {
            return (0, 0);
        }
        self.metrics
            .scrub_corrupt
            .fetch_add(report.corrupt.len() as u64, Ordering::Relaxed);
        tracing::error!(
            corrupt = report.corrupt.len(),
            "scrub found corrupt chunks; fetching them from peers"
        );
        let mut wanted = report.corrupt.clone();
        for (peer, rack) in self.mesh.admitted() {
            if wanted.is_empty() {
                break;
            }
            let Ok(stream) = self.mesh.open_stream(peer, FETCH_PROTOCOL).await else {
                continue;
            };
            let counters = VolumeMetrics::counters(&self.metrics.received, &rack);
            match fetch::fetch(self.store.clone(), wanted.clone(), stream, &counters).await {
                Ok(r) => {
                    self.metrics
                        .scrub_repairs
                        .fetch_add(r.repaired.len() as u64, Ordering::Relaxed);
                    tracing::info!(from = %rack, repaired = r.repaired.len(), "scrub repairs fetched");
                    wanted = r.missing;
                }
                Err(e) => tracing::warn!(from = %rack, error = %e, "repair fetch failed"),
            }
        }
        (report.corrupt.len(), report.corrupt.len() - wanted.len())
    }

    async fn scrub_loop(self: Arc<Self>, cancel: CancellationToken) {
        if self.config.scrub_interval_s == 0 {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(self.config.scrub_interval_s));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => { self.scrub_now().await; }
            }
        }
    }
}
