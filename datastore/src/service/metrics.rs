//! Replication counters, read by the agent's `/metrics`.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::replicate::TransferCounters;

/// Replication counters, per peer rack where it matters. The per-peer maps
/// are bounded by the fleet: one entry per rack ever exchanged with.
#[derive(Debug, Default)]
pub struct VolumeMetrics {
    /// Bytes sent per peer.
    pub sent: Mutex<HashMap<String, Arc<TransferCounters>>>,
    /// Bytes received per peer.
    pub received: Mutex<HashMap<String, Arc<TransferCounters>>>,
    /// Failed transfers (either direction).
    pub failures: AtomicU64,
    /// Chunks repaired after a scrub found them corrupt.
    pub scrub_repairs: AtomicU64,
    /// Corrupt chunks found by scrubs.
    pub scrub_corrupt: AtomicU64,
    /// Snapshots taken.
    pub snapshots: AtomicU64,
}

impl VolumeMetrics {
    /// The counters of `rack` in `map` (created on first use).
    pub(crate) fn counters(
        map: &Mutex<HashMap<String, Arc<TransferCounters>>>,
        rack: &str,
    ) -> Arc<TransferCounters> {
        map.lock()
            .expect("metrics lock")
            .entry(rack.to_string())
            .or_default()
            .clone()
    }
}
