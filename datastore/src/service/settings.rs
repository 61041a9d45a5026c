//! What the volume service is told by its owner (the agent converts its
//! `[volumes]` config into this in one place).

use std::path::PathBuf;
use std::time::Duration;

/// The volume service's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSettings {
    /// This rack's name: the owner named in pushes and status.
    pub rack: String,
    /// This rack's site: replicas go to other sites first.
    pub site: String,
    /// A witness stores no volumes: the service's loops do not run.
    pub witness: bool,
    /// Copies of each volume on distinct racks, the owner's included.
    pub replication_factor: usize,
    /// The shortest time between two snapshots of a written volume (an
    /// unwritten one gets none).
    pub snapshot_interval: Duration,
    /// The longest the interval grows to while replication cannot keep up.
    pub snapshot_max_interval: Duration,
    /// Snapshots kept per volume (older ones are pruned).
    pub keep_snapshots: usize,
    /// Bytes per second per peer link for replication (0 = unlimited).
    pub link_bytes_per_s: u64,
    /// How often every stored chunk is re-verified (`None`: never).
    pub scrub_interval: Option<Duration>,
    /// The import directory every rack has; created when the service opens.
    pub import_dir: PathBuf,
    /// Further directories imports may read from (they must exist).
    pub extra_import_dirs: Vec<PathBuf>,
}
