//! The agent's bulk plane settings from `[bulk]`: which protocols ride
//! on it (the registry) and how it listens.

use deploy::RackConfig;
use mesh::BulkSettings;

/// The protocols that carry bulk data: volume pushes and chunk fetches,
/// the cache mesh's object copies, and misses sent through another rack's
/// uplink. They go over the bulk plane to a peer that has one; everything
/// else (Raft, the cache's digests, uplink reports) stays on the mesh with
/// the control traffic.
pub const BULK_PROTOCOLS: [&str; 6] = [
    datastore::replicate::PUSH_PROTOCOL,
    datastore::replicate::FETCH_PROTOCOL,
    crate::cache_mesh::GET_PROTOCOL,
    crate::cache_mesh::PUT_PROTOCOL,
    crate::cache_mesh::FORWARD_PROTOCOL,
    crate::cache_mesh::TUNNEL_PROTOCOL,
];

/// The bulk plane's settings, None when `bulk.enabled = false` (every
/// stream then goes over the mesh).
#[must_use]
pub fn settings(config: &RackConfig) -> Option<BulkSettings> {
    config.bulk.enabled.then(|| BulkSettings {
        listen: config.bulk.listen_addr(),
        congestion: config.bulk.congestion,
        protocols: BULK_PROTOCOLS.to_vec(),
    })
}
