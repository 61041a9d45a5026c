//! Inbound transfers: replicas receive pushes from owners; any rack serves
//! chunk fetches (a peer repairing what its scrub found corrupt).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::StreamExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::metrics::VolumeMetrics;
use super::transport::PeerStream;
use super::VolumeService;
use crate::replicate::{fetch, push, PUSH_PROTOCOL};

/// Inbound transfers served at once, per protocol: more are refused (the
/// sender retries), so a burst of peers cannot pile up disk work here.
pub const MAX_SERVES: usize = 4;

impl VolumeService {
    /// Accept `protocol` streams until `cancel`, serving each on a task of
    /// its own (at most [`MAX_SERVES`]).
    pub(super) async fn serve_loop(
        self: Arc<Self>,
        protocol: &'static str,
        cancel: CancellationToken,
    ) {
        let mut incoming = match self.transport.incoming(protocol) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(%protocol, error = %e, "cannot accept streams");
                return;
            }
        };
        let serves = Arc::new(Semaphore::new(MAX_SERVES));
        loop {
            let (rack, stream) = tokio::select! {
                _ = cancel.cancelled() => return,
                next = incoming.next() => match next { Some(x) => x, None => return },
            };
            let Ok(permit) = serves.clone().try_acquire_owned() else {
                tracing::warn!(%rack, %protocol, "too many transfers; refusing one");
                continue;
            };
            let service = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if protocol == PUSH_PROTOCOL {
                    service.serve_push(&rack, stream).await;
                } else {
                    service.serve_fetch(&rack, stream).await;
                }
            });
        }
    }

    /// Receive a generation pushed by `rack`, the volume's owner.
    async fn serve_push(&self, rack: &str, stream: PeerStream) {
        let counters = VolumeMetrics::counters(&self.metrics.received, rack);
        match push::serve(self.store.clone(), rack, stream, &counters).await {
            Ok(r) => {
                tracing::info!(volume = %r.volume, from = %rack, generation = r.generation, chunks = r.chunks, deltas = r.deltas, "replica generation published");
                self.records.update(&r.volume, |rec| {
                    rec.owner = Some(rack.to_owned());
                });
            }
            Err(e) => {
                self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(from = %rack, error = %e, "incoming replication failed");
            }
        }
    }

    /// Send `rack` the chunks it asks for, rate-limited on that link.
    async fn serve_fetch(&self, rack: &str, stream: PeerStream) {
        let limiter = self.limiter(rack);
        let sent = VolumeMetrics::counters(&self.metrics.sent, rack);
        if let Err(e) = fetch::serve(self.store.clone(), stream, &limiter, &sent).await {
            tracing::warn!(from = %rack, error = %e, "chunk fetch failed");
        }
    }
}
