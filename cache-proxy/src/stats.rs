//! Counters for the agent's status JSON and Prometheus.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::budget::BudgetStats;
use crate::store::StoreStats;

/// Live counters, bumped on the request path (relaxed atomics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Served from the store without contacting anyone (fresh, or stale by
    /// rule: offline, stale-while-revalidate).
    pub hits: AtomicU64,
    /// Of the hits, those served stale.
    pub stale_hits: AtomicU64,
    /// Needed a fetch (peer or backhaul), or a 504 while offline.
    pub misses: AtomicU64,
    /// Misses answered by a mesh peer.
    pub peer_hits: AtomicU64,
    /// Conditional requests sent upstream.
    pub revalidations: AtomicU64,
    /// Of those, answered 304.
    pub revalidated_304: AtomicU64,
    /// Requests that joined another request's upstream fetch.
    pub coalesced: AtomicU64,
    /// Upstream requests actually sent over the backhaul.
    pub upstream_requests: AtomicU64,
    /// Body bytes received over the backhaul.
    pub upstream_bytes: AtomicU64,
    /// Misses answered 504 because the rack is offline.
    pub offline_misses: AtomicU64,
    /// Responses not stored because their content type did not match the
    /// tile source (captive portals).
    pub wrong_content: AtomicU64,
    /// CONNECT tunnels opened.
    pub tunnels: AtomicU64,
    /// Requests refused by access control.
    pub forbidden: AtomicU64,
}

impl Counters {
    /// Adds one.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The `cache` object of the agent's status JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CacheStatusDoc {
    /// Objects stored.
    pub objects: u64,
    /// Body bytes stored (deduplicated, what the cap applies to).
    pub bytes: u64,
    /// hits / (hits + misses) since start; 0 before any request.
    pub hit_ratio: f64,
    /// `"up"` or `"down"` (down also when forced offline).
    pub backhaul: &'static str,
    /// Bytes left in today's quota; `null` without a quota.
    pub budget_left_bytes: Option<u64>,
}

/// Everything at once, for metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// See [`Counters`].
    pub hits: u64,
    /// See [`Counters`].
    pub stale_hits: u64,
    /// See [`Counters`].
    pub misses: u64,
    /// See [`Counters`].
    pub peer_hits: u64,
    /// See [`Counters`].
    pub revalidations: u64,
    /// See [`Counters`].
    pub revalidated_304: u64,
    /// See [`Counters`].
    pub coalesced: u64,
    /// See [`Counters`].
    pub upstream_requests: u64,
    /// See [`Counters`].
    pub upstream_bytes: u64,
    /// See [`Counters`].
    pub offline_misses: u64,
    /// See [`Counters`].
    pub wrong_content: u64,
    /// See [`Counters`].
    pub tunnels: u64,
    /// See [`Counters`].
    pub forbidden: u64,
    /// Whether the backhaul is up.
    pub backhaul_up: bool,
    /// Forced offline by the operator.
    pub forced_offline: bool,
    /// Store figures.
    pub store: StoreStats,
    /// Budget figures.
    pub budget: BudgetStats,
    /// Flights in progress.
    pub in_flight: u64,
}

impl Snapshot {
    /// Builds a snapshot.
    pub fn new(
        c: &Counters,
        store: StoreStats,
        budget: BudgetStats,
        backhaul_up: bool,
        forced_offline: bool,
        in_flight: u64,
    ) -> Snapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            hits: l(&c.hits),
            stale_hits: l(&c.stale_hits),
            misses: l(&c.misses),
            peer_hits: l(&c.peer_hits),
            revalidations: l(&c.revalidations),
            revalidated_304: l(&c.revalidated_304),
            coalesced: l(&c.coalesced),
            upstream_requests: l(&c.upstream_requests),
            upstream_bytes: l(&c.upstream_bytes),
            offline_misses: l(&c.offline_misses),
            wrong_content: l(&c.wrong_content),
            tunnels: l(&c.tunnels),
            forbidden: l(&c.forbidden),
            backhaul_up,
            forced_offline,
            store,
            budget,
            in_flight,
        }
    }

    /// The status document.
    pub fn status(&self) -> CacheStatusDoc {
        let total = self.hits + self.misses;
        CacheStatusDoc {
            objects: self.store.objects,
            bytes: self.store.stored_bytes,
            hit_ratio: if total == 0 {
                0.0
            } else {
                self.hits as f64 / total as f64
            },
            backhaul: if self.backhaul_up { "up" } else { "down" },
            budget_left_bytes: self.budget.left_today_bytes,
        }
    }

    /// Prometheus text exposition (metric names `fieldrack_cache_*`).
    pub fn prometheus(&self) -> String {
        let mut s = String::new();
        let mut m = |name: &str, kind: &str, help: &str, v: String| {
            s.push_str(&format!(
                "# HELP fieldrack_cache_{name} {help}\n# TYPE fieldrack_cache_{name} {kind}\nfieldrack_cache_{name} {v}\n"
            ));
        };
        m(
            "hits_total",
            "counter",
            "Requests served from the local store.",
            self.hits.to_string(),
        );
        m(
            "stale_hits_total",
            "counter",
            "Hits served stale (offline, stale-while-revalidate, stale-if-error).",
            self.stale_hits.to_string(),
        );
        m(
            "misses_total",
            "counter",
            "Requests not answerable from the local store.",
            self.misses.to_string(),
        );
        m(
            "peer_hits_total",
            "counter",
            "Misses answered by a mesh peer.",
            self.peer_hits.to_string(),
        );
        m(
            "revalidations_total",
            "counter",
            "Conditional requests sent upstream.",
            self.revalidations.to_string(),
        );
        m(
            "coalesced_total",
            "counter",
            "Requests that joined another request's upstream fetch.",
            self.coalesced.to_string(),
        );
        m(
            "upstream_requests_total",
            "counter",
            "Requests sent over the backhaul.",
            self.upstream_requests.to_string(),
        );
        m(
            "upstream_bytes_total",
            "counter",
            "Body bytes received over the backhaul.",
            self.upstream_bytes.to_string(),
        );
        m(
            "offline_misses_total",
            "counter",
            "Misses answered 504 while offline.",
            self.offline_misses.to_string(),
        );
        m(
            "wrong_content_total",
            "counter",
            "Tile responses refused for their content type.",
            self.wrong_content.to_string(),
        );
        m(
            "objects",
            "gauge",
            "Objects stored.",
            self.store.objects.to_string(),
        );
        m(
            "stored_bytes",
            "gauge",
            "Deduplicated body bytes stored.",
            self.store.stored_bytes.to_string(),
        );
        m(
            "logical_bytes",
            "gauge",
            "Body bytes as served (before deduplication).",
            self.store.logical_bytes.to_string(),
        );
        m(
            "evicted_total",
            "counter",
            "Objects evicted above the size cap.",
            self.store.evicted.to_string(),
        );
        m(
            "corrupt_reads_total",
            "counter",
            "Stored bodies that failed verification.",
            self.store.corrupt_reads.to_string(),
        );
        m(
            "backhaul_up",
            "gauge",
            "1 when the backhaul is up.",
            u8::from(self.backhaul_up).to_string(),
        );
        m(
            "budget_used_today_bytes",
            "gauge",
            "Backhaul bytes used since 00:00 UTC.",
            self.budget.used_today_bytes.to_string(),
        );
        if let Some(left) = self.budget.left_today_bytes {
            m(
                "budget_left_bytes",
                "gauge",
                "Backhaul bytes left today.",
                left.to_string(),
            );
        }
        m(
            "in_flight",
            "gauge",
            "Upstream fetches in progress.",
            self.in_flight.to_string(),
        );
        s
    }
}
