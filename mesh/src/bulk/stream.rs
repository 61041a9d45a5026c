//! The stream type of every mesh data stream, whichever plane carries it.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncWrite};

use crate::node::MeshStats;

/// Which plane carries a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// A libp2p stream on the mesh connection (control traffic, and bulk
    /// protocols to peers without a bulk endpoint).
    Mesh,
    /// A stream on the bulk QUIC endpoint.
    Bulk,
}

/// A bidirectional stream to an admitted peer: a libp2p stream on the
/// mesh connection or a QUIC stream on the bulk endpoint. Both are
/// `futures` `AsyncRead + AsyncWrite`; closing finishes the send side.
/// Bytes through it are counted per plane (`MeshStats`).
pub struct MeshStream {
    inner: Inner,
    stats: Arc<MeshStats>,
}

enum Inner {
    Mesh(libp2p::Stream),
    Bulk {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
}

impl MeshStream {
    pub(crate) fn mesh(stream: libp2p::Stream, stats: Arc<MeshStats>) -> Self {
        Self {
            inner: Inner::Mesh(stream),
            stats,
        }
    }

    pub(crate) fn bulk(
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        stats: Arc<MeshStats>,
    ) -> Self {
        Self {
            inner: Inner::Bulk { send, recv },
            stats,
        }
    }

    /// Abort a bulk stream both ways with `code` (a mesh stream is just
    /// dropped).
    pub(crate) fn reset(self, code: quinn::VarInt) {
        if let Inner::Bulk { mut send, mut recv } = self.inner {
            let _ = send.reset(code);
            let _ = recv.stop(code);
        }
    }

    /// The plane carrying this stream.
    #[must_use]
    pub fn plane(&self) -> Plane {
        match self.inner {
            Inner::Mesh(_) => Plane::Mesh,
            Inner::Bulk { .. } => Plane::Bulk,
        }
    }

    fn counters(&self) -> (&AtomicU64, &AtomicU64) {
        match self.inner {
            Inner::Mesh(_) => (
                &self.stats.mesh_stream_bytes_sent,
                &self.stats.mesh_stream_bytes_received,
            ),
            Inner::Bulk { .. } => (&self.stats.bulk_bytes_sent, &self.stats.bulk_bytes_received),
        }
    }
}

impl std::fmt::Debug for MeshStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshStream")
            .field("plane", &self.plane())
            .finish()
    }
}

fn count(r: &Poll<std::io::Result<usize>>, counter: &AtomicU64) {
    if let Poll::Ready(Ok(n)) = r {
        counter.fetch_add(*n as u64, Ordering::Relaxed);
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = match &mut this.inner {
            Inner::Mesh(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Bulk { recv, .. } => AsyncRead::poll_read(Pin::new(recv), cx, buf),
        };
        count(&r, this.counters().1);
        r
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = match &mut this.inner {
            Inner::Mesh(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Bulk { send, .. } => AsyncWrite::poll_write(Pin::new(send), cx, buf),
        };
        count(&r, this.counters().0);
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Mesh(s) => Pin::new(s).poll_flush(cx),
            Inner::Bulk { send, .. } => AsyncWrite::poll_flush(Pin::new(send), cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Mesh(s) => Pin::new(s).poll_close(cx),
            Inner::Bulk { send, .. } => AsyncWrite::poll_close(Pin::new(send), cx),
        }
    }
}
