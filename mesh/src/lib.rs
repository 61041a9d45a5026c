//! The fleet mesh: racks that find each other, trust only their own fleet,
//! and know within seconds which racks are alive.
//!
//! Layout:
//! - [`admission`]: sans-IO fleet admission (certificate checks, deadlines, revocations).
//! - [`membership`]: sans-IO SWIM failure detector with gossip.
//! - [`backoff`]: reconnect schedule.
//! - [`protocol`]: what racks say to each other.
//! - [`filter`]: a drill's traffic filter (which racks' traffic is dropped).
//! - [`discovery`]: mDNS (DNS-SD) announcements and browsing.
//! - [`bulk`]: the bulk data plane (a QUIC endpoint of our own for volume
//!   and cache copies), admitted peers only.
//! - [`node`]: the swarm actor that carries out what the state machines decide.

pub mod admission;
pub mod backoff;
pub mod bulk;
pub mod discovery;
pub mod filter;
pub mod membership;
pub mod node;
pub mod protocol;
pub mod stale;

#[cfg(test)]
mod fuzz_seeds;

pub use bulk::{BulkSettings, MeshStream, Plane};
pub use filter::TrafficFilter;
pub use node::{
    start, AdmittedStreams, MeshError, MeshEvent, MeshHandle, MeshSettings, MeshStatus, PeerStatus,
    SetFilterError, StartError,
};
pub use protocol::RackInfo;
