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
    /// Connections and requests refused by access control
    /// (`allow_networks`).
    pub forbidden: AtomicU64,
    /// Client requests refused by the destination policy, by rule
    /// ([`crate::policy::Refusal::index`]).
    pub refused: [AtomicU64; 12],
    /// Connections closed at accept because their client had too many.
    pub over_client_cap: AtomicU64,
    /// Requests and `CONNECT`s answered 429 because their client was over
    /// `client_requests_per_sec` (here or, forwarded, at this gateway).
    pub over_client_rate: AtomicU64,
    /// Tunnels refused (429) or closed because their client passed
    /// `client_tunnel_bytes_per_day`.
    pub over_client_tunnel_bytes: AtomicU64,
    /// Forwarded requests and tunnels refused (503) because their rack
    /// held its share of this gateway's forwarded slots.
    pub over_rack_share: AtomicU64,
    /// Connections and tunnels closed because nothing moved for the idle
    /// timeout.
    pub idle_closed: AtomicU64,
    /// Upstream fetches abandoned because nobody waited for an object that
    /// would not be stored.
    pub abandoned_fetches: AtomicU64,
    /// Responses not fetched because the length they declared did not fit
    /// in what was left of the day's backhaul quota.
    pub too_large_for_quota: AtomicU64,
    /// Responses that were to be stored but were not (too big for the
    /// in-flight byte budget, cut short, or a store error).
    pub not_stored: AtomicU64,
    /// Stale copies served because their revalidation had no answer within
    /// the stale deadline (it went on in the background).
    pub deadline_stale: AtomicU64,
    /// Misses answered 504 because the upstream gave no response head
    /// within the miss deadline.
    pub deadline_504: AtomicU64,
    /// Misses this rack sent through another rack's uplink and got an
    /// answer for.
    pub forwarded_sent: AtomicU64,
    /// Requests of other racks this rack served through its uplink.
    pub forwarded_served: AtomicU64,
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
    /// Bytes the field's uplinks (every rack's) used today, as this rack
    /// knows them.
    pub field_used_today_bytes: u64,
    /// Bytes left in the field's quota today; `null` without one.
    pub field_budget_left_bytes: Option<u64>,
    /// Bytes of the field's quota the control plane granted this rack's
    /// uplink today; `null` without a field quota or a grant.
    pub field_budget_granted_bytes: Option<u64>,
    /// Uplinks in use across the field, this rack's included.
    pub field_uplinks: u32,
    /// This rack's uplink: `"up"`, `"degraded"` (slow or failing hosts)
    /// or `"down"`.
    pub uplink: &'static str,
    /// Smoothed round-trip time of the uplink probes (ms); `null` before
    /// the first probe answered.
    pub uplink_rtt_ms: Option<u64>,
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
    /// See [`Counters`]: `(rule, count)`.
    pub refused: Vec<(&'static str, u64)>,
    /// See [`Counters`].
    pub over_client_cap: u64,
    /// See [`Counters`].
    pub over_client_rate: u64,
    /// See [`Counters`].
    pub over_client_tunnel_bytes: u64,
    /// See [`Counters`].
    pub over_rack_share: u64,
    /// See [`Counters`].
    pub idle_closed: u64,
    /// See [`Counters`].
    pub abandoned_fetches: u64,
    /// See [`Counters`].
    pub too_large_for_quota: u64,
    /// See [`Counters`].
    pub not_stored: u64,
    /// See [`Counters`].
    pub deadline_stale: u64,
    /// See [`Counters`].
    pub deadline_504: u64,
    /// See [`Counters`].
    pub forwarded_sent: u64,
    /// See [`Counters`].
    pub forwarded_served: u64,
    /// The uplink's state.
    pub uplink: crate::health::UplinkState,
    /// Smoothed probe RTT (ms).
    pub uplink_rtt_ms: Option<u64>,
    /// Body bytes held by fetches in flight (see [`crate::flight`]).
    pub flight_bytes: u64,
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
    // One argument per source of figures, each read once by its caller.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        c: &Counters,
        store: StoreStats,
        budget: BudgetStats,
        backhaul_up: bool,
        forced_offline: bool,
        in_flight: u64,
        flight_bytes: u64,
        uplink: crate::health::UplinkState,
        uplink_rtt_ms: Option<u64>,
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
            refused: crate::policy::Refusal::ALL
                .iter()
                .map(|r| (r.label(), l(&c.refused[r.index()])))
                .collect(),
            over_client_cap: l(&c.over_client_cap),
            over_client_rate: l(&c.over_client_rate),
            over_client_tunnel_bytes: l(&c.over_client_tunnel_bytes),
            over_rack_share: l(&c.over_rack_share),
            idle_closed: l(&c.idle_closed),
            abandoned_fetches: l(&c.abandoned_fetches),
            too_large_for_quota: l(&c.too_large_for_quota),
            not_stored: l(&c.not_stored),
            deadline_stale: l(&c.deadline_stale),
            deadline_504: l(&c.deadline_504),
            forwarded_sent: l(&c.forwarded_sent),
            forwarded_served: l(&c.forwarded_served),
            uplink,
            uplink_rtt_ms,
            flight_bytes,
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
            field_used_today_bytes: self.budget.field_used_today_bytes,
            field_budget_left_bytes: self.budget.field_left_today_bytes,
            field_budget_granted_bytes: self.budget.field_granted_today_bytes,
            field_uplinks: self.budget.field_uplinks,
            uplink: self.uplink.as_str(),
            uplink_rtt_ms: self.uplink_rtt_ms,
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
            "deadline_stale_total",
            "counter",
            "Stale copies served because the revalidation missed the stale deadline.",
            self.deadline_stale.to_string(),
        );
        m(
            "deadline_504_total",
            "counter",
            "Misses answered 504 because the upstream missed the miss deadline.",
            self.deadline_504.to_string(),
        );
        m(
            "forwarded_sent_total",
            "counter",
            "Misses fetched through another rack's uplink.",
            self.forwarded_sent.to_string(),
        );
        m(
            "forwarded_served_total",
            "counter",
            "Requests of other racks served through this rack's uplink.",
            self.forwarded_served.to_string(),
        );
        m(
            "uplink_state",
            "gauge",
            "This rack's uplink: 2 up, 1 degraded, 0 down.",
            match self.uplink {
                crate::health::UplinkState::Up => "2",
                crate::health::UplinkState::Degraded => "1",
                crate::health::UplinkState::Down => "0",
            }
            .to_string(),
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
            "field_budget_used_today_bytes",
            "gauge",
            "Bytes the field's uplinks (every rack's) used since 00:00 UTC.",
            self.budget.field_used_today_bytes.to_string(),
        );
        if let Some(left) = self.budget.field_left_today_bytes {
            m(
                "field_budget_left_bytes",
                "gauge",
                "Bytes left in the field's quota today.",
                left.to_string(),
            );
        }
        if let Some(granted) = self.budget.field_granted_today_bytes {
            m(
                "field_budget_granted_bytes",
                "gauge",
                "Bytes of the field's quota granted to this rack's uplink today.",
                granted.to_string(),
            );
        }
        m(
            "field_uplinks",
            "gauge",
            "Uplinks in use across the field, this rack's included.",
            self.budget.field_uplinks.to_string(),
        );
        m(
            "in_flight",
            "gauge",
            "Upstream fetches in progress.",
            self.in_flight.to_string(),
        );
        m(
            "flight_bytes",
            "gauge",
            "Body bytes held in memory by fetches in progress.",
            self.flight_bytes.to_string(),
        );
        m(
            "forbidden_total",
            "counter",
            "Connections and requests from clients outside allow_networks.",
            self.forbidden.to_string(),
        );
        m(
            "over_client_cap_total",
            "counter",
            "Connections closed at accept: their client had too many open.",
            self.over_client_cap.to_string(),
        );
        m(
            "over_client_rate_total",
            "counter",
            "Requests and CONNECTs answered 429: their client was over client_requests_per_sec.",
            self.over_client_rate.to_string(),
        );
        m(
            "over_client_tunnel_bytes_total",
            "counter",
            "Tunnels refused or closed: their client passed client_tunnel_bytes_per_day.",
            self.over_client_tunnel_bytes.to_string(),
        );
        m(
            "over_rack_share_total",
            "counter",
            "Forwarded requests refused 503: their rack held its share of this gateway.",
            self.over_rack_share.to_string(),
        );
        m(
            "idle_closed_total",
            "counter",
            "Connections and tunnels closed after the idle timeout.",
            self.idle_closed.to_string(),
        );
        m(
            "abandoned_fetches_total",
            "counter",
            "Upstream fetches stopped because no client waited for an uncacheable body.",
            self.abandoned_fetches.to_string(),
        );
        m(
            "too_large_for_quota_total",
            "counter",
            "Responses not fetched: their declared length did not fit in what was left of the day's backhaul quota.",
            self.too_large_for_quota.to_string(),
        );
        m(
            "not_stored_total",
            "counter",
            "Cacheable responses that could not be stored after all.",
            self.not_stored.to_string(),
        );
        s.push_str(
            "# HELP fieldrack_cache_refused_total Client requests refused by the destination policy, by rule.\n\
             # TYPE fieldrack_cache_refused_total counter\n",
        );
        for (rule, n) in &self.refused {
            s.push_str(&format!(
                "fieldrack_cache_refused_total{{reason=\"{rule}\"}} {n}\n"
            ));
        }
        s
    }
}
