//! The console's live view: one JSON document per tick, computed once and
//! shared by every open console (50 consoles cost one computation, and none
//! at all while no console is open).
//!
//! It holds the agent's own status document (the same as
//! `GET /api/v1/status`: peers with state and RTT, power, appliances,
//! volumes, control plane, cache, field view), the local event log's tail,
//! and the field-wide transfers from the replicated state (every rack sees
//! each failover's `detected`/`decided` times, not only the rack that took
//! it over). `at_ms` stamps the document; the page shows every value's
//! age from it and from the ages inside (`last_seen_s`, `since_s`...).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::agent::Rack;

/// How often the snapshot is recomputed while a console is open: the
/// issue's bound is 2 s behind the agents; 1 s leaves room for the
/// membership's own detection and the browser.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(1);
/// Events of the local log in each snapshot (the timeline's length).
pub const TIMELINE_EVENTS: usize = 60;

/// One snapshot.
pub async fn build(rack: &Rack, seq: u64) -> serde_json::Value {
    let status = rack.status().await.ok();
    let events = rack
        .state
        .recent_events(TIMELINE_EVENTS)
        .unwrap_or_default();
    let field = rack.appliances.control().state().borrow().clone();
    let transfers: Vec<serde_json::Value> = field
        .apps
        .iter()
        .filter_map(|(name, a)| {
            let t = a.transfer.as_ref()?;
            Some(serde_json::json!({
                "appliance": name,
                "owner": a.owner,
                "epoch": a.epoch,
                "from": t.from,
                "reason": t.reason,
                "planned": t.planned,
                "detected_ms": t.detected_ms,
                "decided_ms": t.decided_ms,
            }))
        })
        .collect();
    serde_json::json!({
        "seq": seq,
        "at_ms": util::time::unix_ms(),
        "rack": rack.config.rack,
        "status": status,
        "events": events,
        "transfers": transfers,
    })
}

/// Recomputes the snapshot every [`SNAPSHOT_INTERVAL`] while anyone
/// listens, as one ready SSE frame.
pub async fn run(rack: Arc<Rack>, tx: watch::Sender<Bytes>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(SNAPSHOT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if tx.receiver_count() == 0 {
            continue;
        }
        seq += 1;
        let doc = build(&rack, seq).await;
        rack.metrics
            .console_snapshots
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tx.send_replace(Bytes::from(format!("data: {doc}\n\n")));
    }
}
