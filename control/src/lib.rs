//! The field's control plane.
//!
//! Every rack and witness of a field is a voter of one Raft group
//! (openraft), spoken over the fleet mesh and stored in sled. The group
//! holds the desired state ([`field::FieldState`]): which appliances exist,
//! which rack owns each one under which epoch, and each rack's latest
//! report (capacity, power, volume generations, appliance states).
//!
//! Layout:
//! - [`field`]: the replicated state and its commands (pure, deterministic).
//! - [`backhaul`]: grants of the field's backhaul quota, handed out with
//!   the lease renewals (pure).
//! - [`formation`]: who may vote: cluster formation, growth, merge and
//!   shrink (sans-IO; simulated in its tests).
//! - [`placement`]: who should own what (pure; run by the leader).
//! - [`lease`]: fencing by leases (pure bookkeeping over injected instants).
//! - [`election`]: when a follower may stand for election (sans-IO timer;
//!   openraft's own elections and heartbeats are off, see there why).
//! - [`store`]: the Raft log and state machine in sled.
//! - [`net`]: Raft calls over mesh streams, relayed around a cut link;
//!   `net::timeouts`: each peer's call timeout from its measured call time.
//! - [`view`]: which racks are up, admitted, revoked, renewing, dying,
//!   with what capacity: the one answer every user reads (pure).
//! - [`node`]: the running control plane of one rack.
//! - `settings`: `[control]` of `rack.toml` into [`ControlSettings`] and
//!   [`LeaseConfig`] (`From` / `ControlSettings::from_config`).

pub mod backhaul;
pub mod election;
pub mod field;
pub mod formation;
pub mod lease;
pub mod net;
pub mod node;
pub mod placement;
mod settings;
pub mod store;
pub mod view;

pub use field::{
    AppRecord, AppReport, AppState, Carried, Command, FieldState, RackReport, Refusal, Response,
    Transfer,
};
pub use lease::{Lease, LeaseConfig, LeaseWatch};
pub use node::{Control, ControlError, ControlEvent, ControlSettings, ControlStatus};
pub use view::{FieldView, RackState};

use serde::{Deserialize, Serialize};

/// A Raft node id: derived from the rack's PeerId, so every rack computes
/// every other rack's id without asking.
pub type NodeId = u64;

/// What Raft knows of a member: enough to reach it over the mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RackNode {
    /// Rack name.
    pub rack: String,
    /// Its libp2p PeerId (base58).
    pub peer_id: String,
}

openraft::declare_raft_types!(
    /// The control plane's Raft types.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = RackNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// The Raft node id of a PeerId.
#[must_use]
pub fn node_id(peer: &libp2p::PeerId) -> NodeId {
    let h = blake3::hash(&peer.to_bytes());
    u64::from_be_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}
