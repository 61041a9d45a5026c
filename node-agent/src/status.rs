//! The status document: served at `GET /api/v1/status`, printed by
//! `fieldrack status`. Field names are a contract with operators' scripts.

use deploy::power::PowerStatus;
use deploy::Role;
use serde::{Deserialize, Serialize};

/// `GET /api/v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// This rack's name.
    pub rack: String,
    /// Its PeerId.
    pub peer_id: String,
    /// rack / witness.
    pub role: Role,
    /// Its site.
    pub site: String,
    /// Fleet name.
    pub fleet: String,
    /// Agent version.
    pub version: String,
    /// Incarnation (grows on every start).
    pub incarnation: u64,
    /// Seconds since the agent started.
    pub uptime_s: f64,
    /// Mesh listen addresses.
    pub listen: Vec<String>,
    /// Every other rack known.
    pub peers: Vec<PeerEntry>,
    /// Local power.
    pub power: PowerStatus,
    /// Revoked racks known.
    pub revoked: Vec<RevokedEntry>,
    /// What the local store held at start.
    pub store: crate::state::RecoveryReport,
    /// Volumes held here (owned or replicas).
    #[serde(default)]
    pub volumes: Vec<crate::volumes::VolumeStatus>,
    /// Copies this rack kept of volumes another rack took over while this
    /// one held writes the new owner may lack (`fieldrack volume kept`).
    #[serde(default)]
    pub volumes_kept: Vec<datastore::KeptCopy>,
    /// The volume store's filesystem, whether it can reflink, and so how
    /// snapshots find what changed (`extents`: cost follows the writes;
    /// `full_read`: every snapshot of a written volume reads all of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_store: Option<datastore::VolumeStoreInfo>,
    /// The caching proxy: `{"objects", "bytes", "hit_ratio", "backhaul": "up"|"down", "budget_left_bytes", ...}`;
    /// absent when this rack runs no proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<serde_json::Value>,
    /// Every appliance of the field: who runs it, in what state.
    #[serde(default)]
    pub appliances: Vec<crate::supervisor::ApplianceStatus>,
    /// The control plane as this rack sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<control::ControlStatus>,
    /// The field as this rack sees it: which racks are up, admitted,
    /// revoked, renewing, dying, where, with what capacity (the one view
    /// placement, replication and the cache mesh use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<control::FieldView>,
    /// The bulk data plane (absent: `bulk.enabled = false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk: Option<BulkStatus>,
    /// Time to protected: when this rack first reached each step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected: Option<crate::protected::Timeline>,
}

/// The bulk data plane in the status document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BulkStatus {
    /// Where it listens (UDP `host:port`; the port is gossiped to peers).
    pub listen: String,
    /// QUIC connections open to peers right now (one per peer pair).
    pub connections: usize,
}

/// One peer in the status document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerEntry {
    /// Rack name (null if only the PeerId is known yet).
    pub rack: Option<String>,
    /// PeerId.
    pub peer_id: String,
    /// alive / suspect / dead.
    pub state: mesh::membership::State,
    /// Last round trip, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Seconds since last heard from directly.
    pub last_seen_s: Option<f64>,
    /// Seconds in the current state.
    pub state_since_s: f64,
    /// Whether a connection is open now.
    pub connected: bool,
    /// Its incarnation.
    pub incarnation: u64,
    /// rack / witness, from gossip.
    pub role: Option<Role>,
    /// Its site, from gossip.
    pub site: Option<String>,
    /// Its power, from gossip.
    pub power: Option<PowerStatus>,
    /// Its API address, from gossip.
    pub api: Option<String>,
}

/// A revoked rack.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokedEntry {
    /// Rack name.
    pub rack: String,
    /// PeerId.
    pub peer_id: String,
    /// Why.
    pub reason: String,
}

fn opt_f(v: Option<f64>, unit: &str) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}{unit}"))
}

/// A readable table of the field, for `fieldrack status`.
pub fn render_table(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let p = &s.power;
    let _ = writeln!(
        out,
        "rack {} ({}, site {}, fleet {}) up {:.0}s  power: {:?}{}{}{}",
        s.rack,
        s.role,
        s.site,
        s.fleet,
        s.uptime_s,
        p.source,
        p.battery_runtime_s
            .map(|r| format!(", {r}s battery"))
            .unwrap_or_default(),
        p.fuel_pct
            .map(|f| format!(", fuel {f:.0}%"))
            .unwrap_or_default(),
        if p.dying { "  DYING" } else { "" },
    );
    let _ = writeln!(
        out,
        "{:<12} {:<8} {:>9} {:>10} {:<8} {:<10} peer id",
        "RACK", "STATE", "RTT", "LAST SEEN", "ROLE", "POWER"
    );
    let mut peers = s.peers.clone();
    peers.sort_by(|a, b| a.rack.cmp(&b.rack));
    for peer in &peers {
        let state = format!("{:?}", peer.state).to_lowercase();
        let power = peer
            .power
            .as_ref()
            .map(|p| {
                format!(
                    "{}{}",
                    format!("{:?}", p.source).to_lowercase(),
                    if p.dying { "!" } else { "" }
                )
            })
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<12} {:<8} {:>9} {:>10} {:<8} {:<10} {}",
            peer.rack.as_deref().unwrap_or("?"),
            state,
            opt_f(peer.rtt_ms, "ms"),
            opt_f(peer.last_seen_s, "s"),
            peer.role
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
            power,
            peer.peer_id,
        );
    }
    if peers.is_empty() {
        let _ = writeln!(out, "(no peers yet)");
    }
    if let Some(c) = &s.control {
        let leader = c.leader.as_deref().unwrap_or("none");
        let leader = if c.majority {
            format!("leader {leader}")
        } else {
            format!("NO MAJORITY answers; last leader {leader}")
        };
        let _ = writeln!(
            out,
            "control: {} ({leader}, term {}, voters {})",
            c.role,
            c.term,
            c.voters.join(",")
        );
    }
    if !s.appliances.is_empty() {
        let _ = writeln!(
            out,
            "{:<20} {:<12} {:<9} {:>4} {:>6}",
            "APPLIANCE", "RACK", "STATE", "TIER", "EPOCH"
        );
        for a in &s.appliances {
            let _ = writeln!(
                out,
                "{:<20} {:<12} {:<9} {:>4} {:>6}",
                a.name,
                a.owner.as_deref().unwrap_or("-"),
                a.state,
                a.tier,
                a.epoch
            );
        }
    }
    out.push_str(&render_volumes(&s.volumes));
    if !s.volumes_kept.is_empty() {
        let names: std::collections::BTreeSet<&str> =
            s.volumes_kept.iter().map(|k| k.volume.as_str()).collect();
        out.push_str(&format!(
            "kept copies: {} of {} (writes their new owner may lack; fieldrack volume kept)\n",
            s.volumes_kept.len(),
            names.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    for r in &s.revoked {
        let _ = writeln!(out, "revoked: {} ({}) — {}", r.rack, r.peer_id, r.reason);
    }
    out
}

/// The volume table of [`render_table`] (nothing for no volumes), also
/// printed alone by `fieldrack volume status`.
#[must_use]
pub fn render_volumes(volumes: &[crate::volumes::VolumeStatus]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if volumes.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:>6} {:>10} {:>8}  replicas",
        "VOLUME", "OWNER", "GEN", "SIZE", "RPO"
    );
    for v in volumes {
        let reps: Vec<String> = v
            .replicas
            .iter()
            .map(|r| {
                let waiting = (r.bytes_waiting > 0).then(|| {
                    format!(
                        "{} waiting{}",
                        human_bytes(r.bytes_waiting),
                        r.eta_s
                            .map(|e| format!(", eta {e:.0}s"))
                            .unwrap_or_default()
                    )
                });
                let notes: Vec<String> = r
                    .lag_s
                    .map(|l| format!("lag {l:.0}s"))
                    .into_iter()
                    .chain(waiting)
                    .collect();
                format!(
                    "{}@{}{}",
                    r.rack,
                    r.generation.map_or("-".into(), |g| g.to_string()),
                    if notes.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", notes.join(", "))
                    }
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:>6} {:>10} {:>8}  {}{}",
            v.name,
            v.owner.as_deref().unwrap_or("?"),
            v.generation.map_or("-".into(), |g| g.to_string()),
            human_bytes(v.size_bytes),
            opt_f(v.rpo_s, "s"),
            reps.join(", "),
            v.transfer
                .as_ref()
                .map(|t| format!("  [{t}]"))
                .unwrap_or_default(),
        );
    }
    out
}

/// 4294967296 → "4.0G".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}
