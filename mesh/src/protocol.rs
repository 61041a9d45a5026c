//! What racks say to each other over the mesh.
//!
//! Two request-response protocols ride on each QUIC connection:
//! - `/fieldrack/admit/1`: the first thing each side sends on a new
//!   connection: its fleet certificate. Nothing else is accepted from, or sent
//!   to, a peer until its certificate verified.
//! - `/fieldrack/rpc/1`: everything else between admitted racks: SWIM
//!   messages (with gossip piggybacked) and revocations.

use deploy::power::PowerStatus;
use deploy::{Certificate, Revocation, Role};
use serde::{Deserialize, Serialize};

use crate::membership;

/// Protocol name of the admission exchange.
pub const ADMIT_PROTOCOL: &str = "/fieldrack/admit/1";
/// Protocol name of rack-to-rack messages.
pub const RPC_PROTOCOL: &str = "/fieldrack/rpc/1";

/// Most revocations sent in one message: a fleet revokes a handful of racks
/// in its life; this bound only stops a lying peer from flooding us.
pub const MAX_REVOCATIONS_PER_MESSAGE: usize = 1024;

/// Sent by each side on every new connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdmitRequest {
    /// The sender's certificate, bound to the connection's PeerId.
    pub certificate: Certificate,
}

/// The verdict on an [`AdmitRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdmitResponse {
    /// Welcome.
    Accepted,
    /// Refused; the connection is closed right after.
    Rejected {
        /// Human-readable reason, for the refused rack's log.
        reason: String,
    },
}

/// The gossiped description of a rack (SWIM metadata).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RackInfo {
    /// Rack name.
    pub rack: String,
    /// Rack or witness.
    pub role: Role,
    /// Failure domain.
    pub site: String,
    /// CPU cores offered to appliances.
    pub cpus: u32,
    /// Memory offered to appliances, MiB.
    pub memory_mb: u64,
    /// Power state.
    pub power: PowerStatus,
    /// Agent version.
    pub version: String,
    /// The rack's admin API address (for operators' tools).
    pub api: String,
    /// The UDP port of the rack's bulk data plane (None: it has none, or
    /// is older than the bulk plane: reach it over mesh streams). Peers
    /// dial it at the IP of their mesh connection to the rack. Set by the
    /// mesh, whatever the agent says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk_port: Option<u16>,
}

/// A message between admitted racks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Rpc {
    /// SWIM probe traffic with piggybacked gossip.
    Swim(membership::Message<RackInfo>),
    /// Fleet-signed revocations the sender knows about.
    Revocations(Vec<Revocation>),
}

/// Response to an [`Rpc`]: a SWIM `Ack` travels back on the stream of the
/// `Ping` it answers (so it uses the connection the ping came on, never a
/// stale one); everything else is acknowledged with `Ok`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RpcReply {
    /// Received.
    Ok,
    /// The SWIM answer to a `Ping`.
    Swim(membership::Message<RackInfo>),
}
