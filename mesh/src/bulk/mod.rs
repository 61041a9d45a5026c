//! The bulk data plane: volume pushes, chunk fetches and the cache mesh's
//! copies over a QUIC endpoint of the agent's own, beside the libp2p mesh.
//!
//! libp2p-quic builds quinn's transport itself (CUBIC, fixed windows, no
//! initial RTT), and under a radio link's random loss a loss-based
//! controller reads every drop as congestion and collapses. Here the
//! controller, windows and timers are ours (`[bulk]` in rack.toml). The
//! control traffic (admission, SWIM, Raft) stays on the mesh.
//!
//! Trust is the mesh's: the endpoint authenticates with the rack's libp2p
//! identity (libp2p-tls certificates, so the remote PeerId is verified)
//! and serves only peers the mesh has admitted right now. No bulk byte
//! is read from, or sent to, anyone else.
//!
//! Layout:
//! - [`header`]: the typed header naming a stream's protocol.
//! - [`transport`]: QUIC transport parameters (congestion control, windows).
//! - [`tls`]: rustls configs from the libp2p identity; the remote PeerId.
//! - [`stream`]: [`MeshStream`], a stream on either plane.
//! - [`plane`]: the endpoint: connections, dialling, accept queues, admission.
//! - [`silence`]: when a connection went silent (a fade) and when to probe
//!   for the link's return.
//! - [`window`]: each connection's send window from its measured round
//!   trip and rate, so a transfer does not fill a thin link's queue.
//!
//! Routing lives in `MeshHandle::open_stream` / `accept_streams`: a
//! protocol in the registry (`BulkSettings::protocols`) goes over the bulk
//! plane when the peer gossips a bulk port (`RackInfo::bulk_port`), and
//! over a libp2p stream otherwise (older racks, `enabled = false`, a
//! failed dial); servers accept from both.

pub mod header;
pub mod plane;
pub mod silence;
pub mod stream;
pub mod tls;
pub mod transport;
pub mod window;

pub use plane::{BindError, BulkAddrs, BulkPlane, BulkSettings, OpenError};
pub use stream::{MeshStream, Plane};
