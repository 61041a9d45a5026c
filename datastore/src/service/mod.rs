//! The volume service: snapshots owned volumes on a schedule, keeps each
//! one replicated to the racks the planner picks (re-protecting when a
//! replica rack dies), serves pushes and fetches from peers, scrubs, and
//! ships or demotes volumes when their appliance moves.
//!
//! It reaches other racks only through a [`Transport`] (streams) and
//! [`Peers`] (where replicas may go), and keeps its bookkeeping in a
//! [`RecordStore`], so it runs the same over the agent's mesh and over
//! in-memory pipes in tests.
//!
//! Imports read only regular files inside the import directories
//! ([`ServiceSettings::import_dir`] and
//! [`ServiceSettings::extra_import_dirs`]), opened without blocking before
//! any lock is taken ([`crate::ImportSource`]); an import holds only its
//! own volume, and the snapshot loop skips a volume that is busy instead of
//! waiting for it, so one slow or stuck import never delays the snapshots
//! of other volumes.
//!
//! Layout: `ops` (local operations the API and the supervisor call),
//! `snapshots` (the snapshot loop), `replication` (placement and pushes),
//! `schedule` (which pushes a tick starts, a pure function), `pacing`
//! (when to snapshot, a pure function), `backlog` (bytes waiting, rates),
//! `serve` (inbound transfers), `scrub`, `status`, `records`
//! (bookkeeping), `transport` (the traits), `settings`, `metrics`.

mod backlog;
mod changes;
mod error;
mod metrics;
mod ops;
pub mod pacing;
mod records;
mod replication;
mod schedule;
mod scrub;
mod serve;
mod settings;
mod snapshots;
mod status;
mod transport;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use backlog::{HISTORY as BACKLOG_HISTORY, RATE_MIN_BYTES};
pub use error::{OpenServiceError, VolumeError};
pub use metrics::VolumeMetrics;
pub use records::{RecordStore, RecordStoreError, ReplicaRecord, VolumeRecord};
pub use replication::{MAX_PUSHES, REPLICATION_TICK, RETRY_AFTER};
pub use serve::MAX_SERVES;
pub use settings::ServiceSettings;
pub use snapshots::{PACE_TICK, PRUNE_EVERY};
pub use status::{ReplicaStatus, VolumeStatus};
pub use transport::{
    DuplexStream, Incoming, PeerStream, Peers, Transport, TransportError, TransportSource,
};

use crate::replicate::limiter::LinkLimiter;
use crate::replicate::{FETCH_PROTOCOL, PUSH_PROTOCOL};
use crate::{PauseHooks, VolumeStore};
use records::Records;
use replication::Running;

/// Pause hooks shared between the appliance supervisor and snapshots.
pub type SharedPause = Arc<dyn PauseHooks + Send + Sync>;

/// The service, shared by the API, the supervisor and its own loops.
pub struct VolumeService {
    /// The local volume store.
    store: Arc<VolumeStore>,
    settings: ServiceSettings,
    /// Where imports may read images: the import dir and the extra ones.
    import_dirs: Vec<PathBuf>,
    transport: Arc<dyn Transport>,
    peers: Arc<dyn Peers>,
    /// Counters.
    pub metrics: VolumeMetrics,
    records: Records,
    /// One rate limiter per peer link, shared by pushes and fetch serves.
    limiters: Mutex<HashMap<String, Arc<LinkLimiter>>>,
    /// Pushes in flight: (volume, rack) → (generation, progress).
    running: Mutex<Running>,
    /// When a push of (volume, rack) last failed: retried after [`RETRY_AFTER`].
    failed_at: Mutex<HashMap<(String, String), std::time::Instant>>,
    /// Racks of failed pushes seen unreachable since (their link was lost):
    /// their pushes start again as soon as they are back.
    lost: Mutex<std::collections::HashSet<String>>,
    /// Candidate racks unavailable for pushes, and since when: their
    /// replicas are kept for a while rather than re-protected at once.
    away: Mutex<HashMap<String, std::time::Instant>>,
    /// Wakes the replication loop when a new generation exists.
    wake: Notify,
    /// How to freeze the appliance writing a volume while it is captured.
    pause: Mutex<HashMap<String, SharedPause>>,
    /// Volumes whose appliance captures them itself (QEMU over QMP): the
    /// snapshot loop leaves them to the supervisor.
    external: Mutex<HashSet<String>>,
    /// Bytes each recent generation added and the push rate per link.
    backlogs: Mutex<backlog::Backlogs>,
    /// Snapshot pacing per owned volume (one entry per owned volume).
    paces: Mutex<HashMap<String, pacing::Pace>>,
}

impl VolumeService {
    /// Open the volume store at `store_root` and the bookkeeping in
    /// `records`; create the import directory.
    ///
    /// # Errors
    /// [`OpenServiceError`].
    pub fn open(
        store_root: &Path,
        settings: ServiceSettings,
        transport: Arc<dyn Transport>,
        peers: Arc<dyn Peers>,
        records: Arc<dyn RecordStore>,
    ) -> Result<Arc<Self>, OpenServiceError> {
        let store = Arc::new(VolumeStore::open(store_root)?);
        let records = Records::load(records)?;
        std::fs::create_dir_all(&settings.import_dir).map_err(|source| {
            OpenServiceError::ImportDir {
                path: settings.import_dir.clone(),
                source,
            }
        })?;
        let import_dirs = std::iter::once(settings.import_dir.clone())
            .chain(settings.extra_import_dirs.iter().cloned())
            .collect();
        Ok(Arc::new(Self {
            store,
            settings,
            import_dirs,
            transport,
            peers,
            metrics: VolumeMetrics::default(),
            records,
            limiters: Mutex::default(),
            running: Mutex::default(),
            failed_at: Mutex::default(),
            lost: Mutex::default(),
            away: Mutex::default(),
            wake: Notify::new(),
            pause: Mutex::default(),
            external: Mutex::default(),
            backlogs: Mutex::default(),
            paces: Mutex::default(),
        }))
    }

    /// The directories imports may read from.
    #[must_use]
    pub fn import_dirs(&self) -> &[PathBuf] {
        &self.import_dirs
    }

    /// The volume store's root directory (its filesystem's free space is
    /// what the rack reports for replica placement).
    #[must_use]
    pub fn store_root(&self) -> &std::path::Path {
        self.store.root()
    }

    /// The shortest interval between snapshots of an owned volume.
    #[must_use]
    pub fn snapshot_interval(&self) -> Duration {
        self.settings.snapshot_interval
    }

    /// The volume store's filesystem and what it gives snapshots
    /// (`status.volume_store`).
    #[must_use]
    pub fn store_info(&self) -> crate::VolumeStoreInfo {
        self.store.info_fs()
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
    /// point-in-time copy recorded with [`VolumeService::snapshot_from`]),
    /// not by the snapshot loop.
    pub fn set_external_capture(&self, volume: &str, on: bool) {
        let mut e = self.external.lock().expect("external lock");
        if on {
            e.insert(volume.to_owned());
        } else {
            e.remove(volume);
        }
    }

    /// Run the service's loops until `cancel` (a witness runs none).
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        if self.settings.witness {
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

    /// The rate limiter of the link to `rack`.
    fn limiter(&self, rack: &str) -> Arc<LinkLimiter> {
        self.limiters
            .lock()
            .expect("limiters lock")
            .entry(rack.to_string())
            .or_insert_with(|| Arc::new(LinkLimiter::new(self.settings.link_bytes_per_s)))
            .clone()
    }
}
