//! The agent's side of the volume service ([`datastore::service`]): its
//! settings from `[volumes]`, its transport over the mesh, where replicas
//! may go, and its bookkeeping in the agent's store. The service itself
//! (snapshots, placement, transfers, scrubs) lives in `datastore`.
//!
//! Bulk data travels on raw libp2p streams over the fleet-authenticated
//! mesh connection (`MeshHandle::open_stream`, which refuses peers that
//! are not admitted).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use datastore::replicate::plan::RackView;
use datastore::service::{
    Incoming, PeerStream, Peers, RecordStore, RecordStoreError, ServiceSettings, Transport,
    TransportError,
};
use deploy::{RackConfig, Role};
use futures::future::BoxFuture;
use futures::StreamExt as _;
use mesh::membership::State;
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
        keep_snapshots: v.keep_snapshots,
        link_bytes_per_s: v.link_bytes_per_s,
        scrub_interval: (v.scrub_interval_s > 0)
            .then(|| std::time::Duration::from_secs(v.scrub_interval_s)),
        import_dir: config.data_dir.join(IMPORT_DIR),
        extra_import_dirs: v.import_dirs.clone(),
    }
}

/// Open the volume service under `config.data_dir`, over `mesh`, with its
/// bookkeeping in `state`.
///
/// # Errors
/// [`datastore::service::OpenServiceError`].
pub fn open(
    config: &RackConfig,
    mesh: MeshHandle,
    state: AgentState,
) -> Result<Arc<VolumeService>, datastore::service::OpenServiceError> {
    let transport = Arc::new(MeshTransport { mesh });
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
        Box::pin(replica_candidates(&self.mesh))
    }
}

/// The racks as the replica planner sees them: alive when membership says
/// Alive and the rack is admitted; witnesses flagged (they store nothing).
async fn replica_candidates(mesh: &MeshHandle) -> Vec<RackView> {
    let Ok(status) = mesh.status().await else {
        return Vec::new();
    };
    let admitted: HashSet<String> = mesh.admitted().into_iter().map(|(_, r)| r).collect();
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
