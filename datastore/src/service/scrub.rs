//! Scrubs: re-verify every stored chunk; fetch the corrupt ones back from
//! connected peers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::metrics::VolumeMetrics;
use super::VolumeService;
use crate::replicate::{blocking, fetch, FETCH_PROTOCOL};

impl VolumeService {
    /// Verify every stored chunk; fetch corrupt ones back from peers.
    /// Returns `(corrupt, repaired)`.
    pub async fn scrub_now(&self) -> (usize, usize) {
        let st = self.store.clone();
        let report = match blocking(move || st.chunks().scrub(&mut |_, _| {})).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "scrub failed");
                return (0, 0);
            }
        };
        if report.corrupt.is_empty() {
            return (0, 0);
        }
        self.metrics
            .scrub_corrupt
            .fetch_add(report.corrupt.len() as u64, Ordering::Relaxed);
        tracing::error!(
            corrupt = report.corrupt.len(),
            "scrub found corrupt chunks; fetching them from peers"
        );
        let mut wanted = report.corrupt.clone();
        for rack in self.transport.connected() {
            if wanted.is_empty() {
                break;
            }
            let Ok(stream) = self.transport.open(&rack, FETCH_PROTOCOL).await else {
                continue;
            };
            let counters = VolumeMetrics::counters(&self.metrics.received, &rack);
            match fetch::fetch(self.store.clone(), wanted.clone(), stream, &counters).await {
                Ok(r) => {
                    self.metrics
                        .scrub_repairs
                        .fetch_add(r.repaired.len() as u64, Ordering::Relaxed);
                    tracing::info!(from = %rack, repaired = r.repaired.len(), "scrub repairs fetched");
                    wanted = r.missing;
                }
                Err(e) => tracing::warn!(from = %rack, error = %e, "repair fetch failed"),
            }
        }
        (report.corrupt.len(), report.corrupt.len() - wanted.len())
    }

    /// Scrub every [`super::ServiceSettings::scrub_interval`] (never if unset).
    pub(super) async fn scrub_loop(self: Arc<Self>, cancel: CancellationToken) {
        let Some(every) = self.settings.scrub_interval else {
            return;
        };
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => { self.scrub_now().await; }
            }
        }
    }
}
