//! The control channel between the benchmark (parent, the owner rack) and
//! its re-executed child (the replica rack): one JSON object per line, on
//! the child's stdin (requests) and stdout (replies and events). Bulk data
//! never goes here; it goes over the mesh or raw QUIC.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Environment variable that turns the binary into the replica child.
pub const CHILD_ENV: &str = "REPLBENCH_CHILD_DIR";
/// Environment variable carrying the fleet secret (base64) to the child.
pub const FLEET_ENV: &str = "REPLBENCH_FLEET_SECRET";

/// Mesh protocol of the child's byte sink (diagnostic: the mesh transport
/// without the store).
pub const SINK_PROTOCOL: &str = "/replbench/sink/1";

/// Parent → child.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Reply `Admitted` once `peer` (base58) is an admitted fleet member.
    WaitAdmitted { peer: String },
    /// Export a replica generation to a file (to compare with the source).
    Export {
        volume: String,
        generation: u64,
        to: PathBuf,
    },
    /// Reply with the replica's chunk store statistics.
    Stats,
    /// Stop.
    Quit,
}

/// Child → parent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// The child is listening.
    Ready {
        mesh_addr: String,
        quic_addr: String,
        peer_id: String,
    },
    /// Answer to `WaitAdmitted`.
    Admitted,
    /// A push was served (the replica published `generation`), or failed.
    Served {
        volume: String,
        generation: u64,
        chunks: u64,
        deltas: u64,
        deduplicated: u64,
        bytes: u64,
        ms: u64,
        error: Option<String>,
    },
    /// Answer to `Export`.
    Exported { error: Option<String> },
    /// Answer to `Stats`.
    Stats {
        chunks: u64,
        payload_bytes: u64,
        disk_bytes: u64,
    },
    /// A request failed.
    Failed { error: String },
}
