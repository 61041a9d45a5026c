//! How the volume service reaches other racks, kept abstract so that the
//! service runs over any authenticated byte streams: the agent's mesh in
//! production, in-memory pipes in tests. The protocols themselves
//! ([`crate::replicate`]) already speak over any `AsyncRead + AsyncWrite`.

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{AsyncRead, AsyncWrite};

use crate::replicate::plan::RackView;

/// A bidirectional byte stream to one peer rack.
pub trait DuplexStream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + ?Sized> DuplexStream for T {}

/// A stream to a peer, boxed so that [`Transport`] stays dyn-compatible.
pub type PeerStream = Box<dyn DuplexStream>;

/// Inbound streams of one protocol, each with the rack that opened it.
/// Pulled one at a time, so it buffers nothing beyond what the transport
/// itself holds.
pub type Incoming = BoxStream<'static, (String, PeerStream)>;

/// A transport's own error, kept whole as a source.
pub type TransportSource = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Streams to and from the other racks of the fleet. Every stream must be
/// to a rack the transport has authenticated (in the agent: admitted into
/// the fleet); the rack names it reports are trusted.
pub trait Transport: Send + Sync + 'static {
    /// Open a stream speaking `protocol` to `rack`.
    ///
    /// # Errors
    /// [`TransportError::NotConnected`] if there is no authenticated
    /// connection to `rack`, [`TransportError::Open`] if opening failed.
    fn open<'a>(
        &'a self,
        rack: &'a str,
        protocol: &'static str,
    ) -> BoxFuture<'a, Result<PeerStream, TransportError>>;

    /// Start accepting streams of `protocol` (once per protocol). Streams
    /// from racks that are not authenticated never appear.
    ///
    /// # Errors
    /// [`TransportError::Listen`].
    fn incoming(&self, protocol: &'static str) -> Result<Incoming, TransportError>;

    /// The racks a stream can be opened to right now (a scrub asks them
    /// for the chunks it found corrupt).
    fn connected(&self) -> Vec<String>;
}

/// Where replicas may go: the service asks on every replication tick.
pub trait Peers: Send + Sync + 'static {
    /// Every known rack as the replica planner sees it: `alive` only if
    /// it can take a replica now, `witness` if it stores no volumes.
    fn replica_candidates(&self) -> BoxFuture<'_, Vec<RackView>>;
}

/// Why a stream could not be opened or accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// No authenticated connection to the rack.
    #[error("{rack} is not connected")]
    NotConnected {
        /// The rack.
        rack: String,
    },
    /// The connection exists but the stream could not be opened.
    #[error("opening a {protocol} stream to {rack}")]
    Open {
        /// The rack.
        rack: String,
        /// The protocol.
        protocol: &'static str,
        /// The transport's error.
        #[source]
        source: TransportSource,
    },
    /// Inbound streams of the protocol cannot be accepted.
    #[error("accepting {protocol} streams")]
    Listen {
        /// The protocol.
        protocol: &'static str,
        /// The transport's error.
        #[source]
        source: TransportSource,
    },
}
