//! The agent's side of the volume service ([`datastore::service`]): its
//! settings from `[volumes]`, its transport over the mesh, where replicas
//! may go, and its bookkeeping in the agent's store. The service itself
//! (snapshots, placement, transfers, scrubs) lives in `datastore`.
//!
//! Bulk data travels over `MeshHandle::open_stream`, which refuses peers
//! that are not admitted and carries the push and fetch protocols (in the
//! bulk registry, `crate::bulk`) on the bulk plane to racks that have one,
//! on libp2p streams of the mesh connection otherwise.

use std::collections::HashMap;
use std::sync::Arc;

use datastore::replicate::plan::RackView;
use datastore::service::{
    Incoming, PeerStream, Peers, RecordStore, RecordStoreError, ServiceSettings, Transport,
    TransportError,
};
use deploy::{RackConfig, Role};
use futures::future::BoxFuture;
use futures::StreamExt as _;
use mesh::MeshHandle;

use crate::state::AgentState;

pub use datastore::service::{
    ReplicaStatus, VolumeError, VolumeRecord, VolumeService, VolumeStatus,
};

/// The import directory every rack has, under its data directory.
pub const IMPORT_DIR: &str = "import";

/// The volume store's directory, under the data directory.
pub const STORE_DIR: &str = "volumes";

/// The service's settings from the rack's config: the one place
/// `[volumes]` is read.
#[must_use]
pub fn settings(config: &RackConfig) -> ServiceSettings {
    let v = &config.volumes;
    ServiceSettings {
        rack: config.rack.clone(),
        site: config.site.clone(),
        witness: config.role == Role::Witness,
        replication_factor: v.replication_factor,
        snapshot_interval: std::time::Duration::from_secs(v.snapshot_interval_s),
        snapshot_max_interval: std::time::Duration::from_secs(v.snapshot_max_interval_s),
        keep_snapshots: v.keep_snapshots,
        link_bytes_per_s: v.link_bytes_per_s,
        scrub_interval: (v.scrub_interval_s > 0)
            .then(|| std::time::Duration::from_secs(v.scrub_interval_s)),
        import_dir: config.data_dir.join(IMPORT_DIR),
        extra_import_dirs: v.import_dirs.clone(),
    }
}

/// Where the transport finds the control plane, whose field view says
/// where replicas may go: filled once the control plane has started (it
/// starts after the volume service opens).
pub type ControlSlot = Arc<std::sync::OnceLock<Arc<control::Control>>>;

/// Open the volume service under `config.data_dir`, over `mesh`, with its
/// bookkeeping in `state`, placing replicas by the field view of the
/// control plane `control` will hold.
///
/// # Errors
/// [`datastore::service::OpenServiceError`].
pub fn open(
    config: &RackConfig,
    mesh: MeshHandle,
    state: AgentState,
    control: ControlSlot,
) -> Result<Arc<VolumeService>, datastore::service::OpenServiceError> {
    let transport = Arc::new(MeshTransport { mesh, control });
    VolumeService::open(
        &config.data_dir.join(STORE_DIR),
        settings(config),
        transport.clone(),
        transport,
        Arc::new(AgentRecords(state)),
    )
}

/// Streams to admitted racks over the mesh.
struct MeshTransport {
    mesh: MeshHandle,
    /// The control plane, for the field view (empty until it started).
    control: ControlSlot,
}

impl Transport for MeshTransport {
    fn open<'a>(
        &'a self,
        rack: &'a str,
        protocol: &'static str,
    ) -> BoxFuture<'a, Result<PeerStream, TransportError>> {
        Box::pin(async move {
            let peer = self
                .mesh
                .admitted()
                .into_iter()
                .find(|(_, r)| r == rack)
                .map(|(p, _)| p)
                .ok_or_else(|| TransportError::NotConnected {
                    rack: rack.to_owned(),
                })?;
            let stream =
                self.mesh
                    .open_stream(peer, protocol)
                    .await
                    .map_err(|e| TransportError::Open {
                        rack: rack.to_owned(),
                        protocol,
                        source: Box::new(e),
                    })?;
            Ok(Box::new(stream) as PeerStream)
        })
    }

    fn incoming(&self, protocol: &'static str) -> Result<Incoming, TransportError> {
        let streams = self
            .mesh
            .accept_streams(protocol)
            .map_err(|e| TransportError::Listen {
                protocol,
                source: Box::new(e),
            })?;
        let mesh = self.mesh.clone();
        Ok(
            futures::stream::unfold((streams, mesh), |(mut streams, mesh)| async move {
                loop {
                    let (peer, stream) = streams.next().await?;
                    // Admitted when accepted, but it may have been revoked since.
                    let rack = mesh
                        .admitted()
                        .into_iter()
                        .find(|(p, _)| *p == peer)
                        .map(|(_, r)| r);
                    if let Some(rack) = rack {
                        return Some(((rack, Box::new(stream) as PeerStream), (streams, mesh)));
                    }
                }
            })
            .boxed(),
        )
    }

    fn connected(&self) -> Vec<String> {
        self.mesh.admitted().into_iter().map(|(_, r)| r).collect()
    }
}

impl Peers for MeshTransport {
    fn replica_candidates(&self) -> BoxFuture<'_, Vec<RackView>> {
        Box::pin(replica_candidates(&self.control))
    }
}

/// The racks as the replica planner sees them, from the field view (see
/// `control::view`): a replica needs a rack that is up and that this rack
/// can push to directly (`reachable`); `dying` and `free_bytes` are passed
/// on; witnesses are flagged (they store nothing). None before the control
/// plane started.
async fn replica_candidates(control: &ControlSlot) -> Vec<RackView> {
    let Some(control) = control.get() else {
        return Vec::new();
    };
    control
        .field_view()
        .await
        .racks
        .into_iter()
        .filter(|r| !r.local)
        .filter_map(|r| {
            Some(RackView {
                alive: r.up && r.reachable,
                dying: r.dying,
                witness: r.role? == Role::Witness,
                free_bytes: r.free_bytes,
                site: r.site?,
                rack: r.name,
            })
        })
        .collect()
}

/// The bookkeeping in the agent's own store (its `volumes` tree of sealed
/// JSON records).
struct AgentRecords(AgentState);

impl RecordStore for AgentRecords {
    fn load(&self) -> Result<HashMap<String, VolumeRecord>, RecordStoreError> {
        self.0
            .volume_records()
            .map_err(|e| RecordStoreError::Backend(Box::new(e)))
    }

    fn save(&self, volume: &str, record: &VolumeRecord) -> Result<(), RecordStoreError> {
        self.0
            .put_volume_record(volume, record)
            .map_err(|e| RecordStoreError::Backend(Box::new(e)))
    }
}
