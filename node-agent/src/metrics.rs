//! Prometheus text exposition for `GET /metrics`.
//!
//! Hand-written rather than through a registry crate: a few dozen series,
//! all of them counters or gauges read from atomics or a status snapshot.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use deploy::power::PowerSource;

use crate::agent::{count_states, Rack};

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Render every metric.
pub async fn render(rack: &Rack) -> String {
    let mut out = String::new();
    let label = format!("rack=\"{}\"", rack.config.rack);
    let s = &rack.mesh.stats;
    let counters = [
        (
            "fieldrack_mesh_admitted_total",
            "Peers admitted after their fleet certificate verified.",
            &s.admitted_total,
        ),
        (
            "fieldrack_mesh_rejected_total",
            "Peers refused admission (bad, foreign, stolen, expired or revoked certificate).",
            &s.rejected_total,
        ),
        (
            "fieldrack_mesh_admission_timeouts_total",
            "Peers disconnected for presenting no certificate in time.",
            &s.admission_timeouts_total,
        ),
        (
            "fieldrack_mesh_cert_offers_retried_total",
            "Offers of this rack's certificate sent again after one failed to reach the peer.",
            &s.cert_offers_retried_total,
        ),
        (
            "fieldrack_mesh_rpc_sent_total",
            "Rack messages sent to admitted peers.",
            &s.rpc_sent_total,
        ),
        (
            "fieldrack_mesh_rpc_received_total",
            "Rack messages received from admitted peers.",
            &s.rpc_received_total,
        ),
        (
            "fieldrack_mesh_rpc_dropped_unadmitted_total",
            "Rack messages from peers not admitted, dropped unread.",
            &s.rpc_dropped_unadmitted_total,
        ),
        (
            "fieldrack_mesh_dials_total",
            "Outgoing dial attempts.",
            &s.dials_total,
        ),
        (
            "fieldrack_membership_transitions_total",
            "Membership state transitions observed.",
            &s.transitions_total,
        ),
        (
            "fieldrack_revocations_learned_total",
            "Revocations learned since start.",
            &s.revocations_total,
        ),
        (
            "fieldrack_mesh_certificates_expired_total",
            "Admitted peers disconnected because their certificate expired while connected.",
            &s.expired_total,
        ),
    ];
    for (name, help, c) in counters {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name}{{{label}}} {}", c.load(Ordering::Relaxed));
    }
    let name = "fieldrack_stream_bytes_total";
    family(
        &mut out,
        name,
        "counter",
        "Data stream bytes to and from peers, per plane (bulk: the bulk QUIC endpoint; mesh: libp2p streams).",
    );
    for (plane, direction, c) in [
        ("bulk", "sent", &s.bulk_bytes_sent),
        ("bulk", "received", &s.bulk_bytes_received),
        ("mesh", "sent", &s.mesh_stream_bytes_sent),
        ("mesh", "received", &s.mesh_stream_bytes_received),
    ] {
        let _ = writeln!(
            out,
            "{name}{{{label},plane=\"{plane}\",direction=\"{direction}\"}} {}",
            c.load(Ordering::Relaxed)
        );
    }
    let name = "fieldrack_bulk_refused_total";
    family(
        &mut out,
        name,
        "counter",
        "Bulk connections and streams refused because their peer was not admitted.",
    );
    let _ = writeln!(
        out,
        "{name}{{{label}}} {}",
        s.bulk_refused_total.load(Ordering::Relaxed)
    );
    let name = "fieldrack_mesh_drill_filtered_total";
    family(
        &mut out,
        name,
        "counter",
        "Mesh messages and connections dropped by a drill's traffic filter.",
    );
    let _ = writeln!(
        out,
        "{name}{{{label}}} {}",
        s.filtered_total.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "fieldrack_api_requests_total",
        "counter",
        "Admin API requests served.",
    );
    let _ = writeln!(
        out,
        "fieldrack_api_requests_total{{{label}}} {}",
        rack.metrics.api_requests.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "fieldrack_console_snapshots_total",
        "counter",
        "Console snapshots computed (one per tick, shared by every open console).",
    );
    let _ = writeln!(
        out,
        "fieldrack_console_snapshots_total{{{label}}} {}",
        rack.metrics.console_snapshots.load(Ordering::Relaxed)
    );
    let a = &rack.api_slots.stats;
    let api_counters = [
        (
            "fieldrack_api_connections_accepted_total",
            "Admin API connections accepted.",
            &a.accepted,
        ),
        (
            "fieldrack_api_connections_shed_total",
            "Admin API connections that had sent no authorized request, closed to make room for a newer one.",
            &a.shed,
        ),
        (
            "fieldrack_api_connections_timed_out_total",
            "Admin API connections closed for not sending a request head in time or idling too long.",
            &a.timed_out,
        ),
        (
            "fieldrack_api_connections_refused_total",
            "Authorized admin API requests refused (503) because the authenticated pool was full.",
            &a.refused,
        ),
        (
            "fieldrack_api_accept_errors_total",
            "Admin API accept failures (out of descriptors...), each followed by a pause.",
            &a.accept_errors,
        ),
    ];
    for (name, help, c) in api_counters {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name}{{{label}}} {}", c.load(Ordering::Relaxed));
    }
    let (waiting, authenticated) = rack.api_slots.occupancy();
    family(
        &mut out,
        "fieldrack_api_connections",
        "gauge",
        "Open admin API connections by pool (waiting: no authorized request yet).",
    );
    let _ = writeln!(
        out,
        "fieldrack_api_connections{{{label},pool=\"waiting\"}} {waiting}"
    );
    let _ = writeln!(
        out,
        "fieldrack_api_connections{{{label},pool=\"authenticated\"}} {authenticated}"
    );
    family(
        &mut out,
        "fieldrack_fd_limit",
        "gauge",
        "The open-file soft limit the listeners' connection caps were derived from.",
    );
    let _ = writeln!(
        out,
        "fieldrack_fd_limit{{{label}}} {}",
        rack.fd_budget.limit
    );
    family(
        &mut out,
        "fieldrack_store_errors_total",
        "counter",
        "Local store write failures.",
    );
    let _ = writeln!(
        out,
        "fieldrack_store_errors_total{{{label}}} {}",
        rack.metrics.store_errors.load(Ordering::Relaxed)
    );
    if let Ok(m) = rack.mesh.status().await {
        family(
            &mut out,
            "fieldrack_peers",
            "gauge",
            "Known peers by membership state.",
        );
        for (state, n) in count_states(&m.peers) {
            let st = format!("{state:?}").to_lowercase();
            let _ = writeln!(out, "fieldrack_peers{{{label},state=\"{st}\"}} {n}");
        }
        family(
            &mut out,
            "fieldrack_peer_rtt_seconds",
            "gauge",
            "Last probe round trip per peer.",
        );
        for p in &m.peers {
            if let Some(rtt) = p.rtt {
                let name = p.rack.as_deref().unwrap_or("?");
                let _ = writeln!(
                    out,
                    "fieldrack_peer_rtt_seconds{{{label},peer=\"{name}\"}} {:.6}",
                    rtt.as_secs_f64()
                );
            }
        }
        family(
            &mut out,
            "fieldrack_incarnation",
            "gauge",
            "This rack's incarnation.",
        );
        let _ = writeln!(out, "fieldrack_incarnation{{{label}}} {}", m.incarnation);
    }
    let p = rack.power.borrow().clone();
    family(
        &mut out,
        "fieldrack_power_source",
        "gauge",
        "1 for the current power source.",
    );
    for (src, name) in [
        (PowerSource::Grid, "grid"),
        (PowerSource::Generator, "generator"),
        (PowerSource::Battery, "battery"),
    ] {
        let _ = writeln!(
            out,
            "fieldrack_power_source{{{label},source=\"{name}\"}} {}",
            u8::from(p.source == src)
        );
    }
    family(
        &mut out,
        "fieldrack_power_dying",
        "gauge",
        "1 when the rack is about to lose power.",
    );
    let _ = writeln!(
        out,
        "fieldrack_power_dying{{{label}}} {}",
        u8::from(p.dying)
    );
    if let Some(r) = p.battery_runtime_s {
        family(
            &mut out,
            "fieldrack_power_battery_runtime_seconds",
            "gauge",
            "Battery runtime left.",
        );
        let _ = writeln!(
            out,
            "fieldrack_power_battery_runtime_seconds{{{label}}} {r}"
        );
    }
    if let Some(f) = p.fuel_pct {
        family(
            &mut out,
            "fieldrack_power_fuel_percent",
            "gauge",
            "Generator fuel left.",
        );
        let _ = writeln!(out, "fieldrack_power_fuel_percent{{{label}}} {f}");
    }
    family(
        &mut out,
        "fieldrack_power_telemetry_error",
        "gauge",
        "1 when the last power reading failed.",
    );
    let _ = writeln!(
        out,
        "fieldrack_power_telemetry_error{{{label}}} {}",
        u8::from(p.error.is_some())
    );
    family(
        &mut out,
        "fieldrack_store_corrupt_records",
        "gauge",
        "Records that failed verification at start.",
    );
    let _ = writeln!(
        out,
        "fieldrack_store_corrupt_records{{{label}}} {}",
        rack.recovery.corrupt
    );
    let vm = &rack.volumes.metrics;
    for (name, help, map) in [
        (
            "fieldrack_replication_sent_bytes_total",
            "Replication bytes sent, by peer rack.",
            &vm.sent,
        ),
        (
            "fieldrack_replication_received_bytes_total",
            "Replication bytes received, by peer rack.",
            &vm.received,
        ),
    ] {
        family(&mut out, name, "counter", help);
        for (peer, c) in map.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "{name}{{{label},peer=\"{peer}\"}} {}",
                c.bytes.load(Ordering::Relaxed)
            );
        }
    }
    family(&mut out, "fieldrack_replication_chunks_total", "counter", "Chunk references per peer rack and how they travelled (whole, delta, deduplicated = not sent).");
    for (peer, c) in vm.sent.lock().expect("metrics lock").iter() {
        for (how, v) in [
            ("whole", &c.chunks),
            ("delta", &c.deltas),
            ("deduplicated", &c.deduplicated),
        ] {
            let _ = writeln!(
                out,
                "fieldrack_replication_chunks_total{{{label},peer=\"{peer}\",how=\"{how}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
    for (name, help, v) in [
        (
            "fieldrack_replication_transfer_failures_total",
            "Replication transfers that failed (either direction).",
            &vm.failures,
        ),
        (
            "fieldrack_scrub_corrupt_chunks_total",
            "Corrupt chunks found by scrubs.",
            &vm.scrub_corrupt,
        ),
        (
            "fieldrack_scrub_repairs_total",
            "Corrupt chunks repaired from another rack.",
            &vm.scrub_repairs,
        ),
        (
            "fieldrack_snapshots_total",
            "Volume snapshots taken.",
            &vm.snapshots,
        ),
    ] {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name}{{{label}}} {}", v.load(Ordering::Relaxed));
    }
    if let Some(p) = &rack.proxy {
        out.push_str(&p.handle.prometheus());
        let m = &p.mesh.stats;
        for (name, help, v) in [
            (
                "fieldrack_cache_mesh_peer_fetches_total",
                "Objects fetched from other racks' caches.",
                &m.peer_fetches,
            ),
            (
                "fieldrack_cache_mesh_peer_serves_total",
                "Objects served to other racks.",
                &m.peer_serves,
            ),
            (
                "fieldrack_cache_mesh_replicated_total",
                "Backhaul-fetched objects copied to another rack.",
                &m.replicated,
            ),
            (
                "fieldrack_cache_mesh_replicate_dropped_total",
                "Copies dropped (queue full, no peer, peer refused).",
                &m.replicate_dropped,
            ),
            (
                "fieldrack_cache_mesh_digests_received_total",
                "Cache digests received from peers.",
                &m.digests_received,
            ),
        ] {
            family(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name}{{{label}}} {}", v.load(Ordering::Relaxed));
        }
    }
    out
}
