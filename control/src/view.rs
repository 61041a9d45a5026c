//! One view of the field: which racks are up, admitted, revoked, renewing,
//! dying, where, and with what capacity, as this rack sees them now.
//!
//! Appliance placement, replica placement, the cache mesh and the status
//! document all read this one answer instead of each combining membership,
//! admission, revocations and leases its own way. [`compute`] is the pure
//! part (every fact and the time are inputs, so it is tested as a table
//! and a property); `Control::field_view` gathers the facts.
//!
//! # The one rule: `up`
//!
//! A rack is **up** when all of these hold:
//! - it is *in the mesh*: it is this rack, or a renewal of its lease was
//!   applied here within [`ViewTiming::fresh_ms`] (three renewal periods),
//!   or SWIM does not hold it dead. A fresh renewal wins over gossip
//!   because a rack that was cut off comes back believing the others dead,
//!   and SWIM repeats that until they refute it;
//! - it is *renewing*: a renewal of its lease was applied here less than
//!   one lease ago; a rack with no renewal seen counts as renewing while
//!   this rack's control plane is younger than one lease (so that a
//!   restarted leader does not move every appliance away at once);
//! - it is *not revoked*.
//!
//! `up` does not ask for a connection of this rack's own (`admitted`): a
//! rack whose direct link to this one is cut still renews through a relay
//! and keeps its appliances. Users that speak to a rack directly (replica
//! pushes, cache fetches) also need [`RackState::reachable`].

use std::collections::{BTreeMap, BTreeSet};

use deploy::power::PowerSource;
use deploy::Role;
use mesh::membership::State;
use mesh::RackInfo;
use serde::{Deserialize, Serialize};

use crate::field::RackReport;

/// The field as this rack sees it at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldView {
    /// When it was computed (unix ms, this rack's clock).
    pub at_ms: u64,
    /// Every rack known from the replicated state, the mesh or
    /// revocations, sorted by name, each once.
    pub racks: Vec<RackState>,
}

impl FieldView {
    /// The rack called `name`, if known.
    #[must_use]
    pub fn rack(&self, name: &str) -> Option<&RackState> {
        self.racks.iter().find(|r| r.name == name)
    }
}

/// One rack in the [`FieldView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RackState {
    /// Its name (from its certificate).
    pub name: String,
    /// Whether it is the rack that computed this view.
    pub local: bool,
    /// Its site (failure domain): from its latest report, else from
    /// gossip; unknown until either arrived.
    pub site: Option<String>,
    /// `rack` or `witness`: from its latest report, else from gossip.
    pub role: Option<Role>,
    /// This rack holds a connection to it whose certificate verified, now
    /// (always true for the local rack).
    pub admitted: bool,
    /// Its certificate is revoked (and no other, unrevoked, member carries
    /// its name).
    pub revoked: bool,
    /// What SWIM believes of it (alive / suspect / dead); none for the
    /// local rack and for racks only the replicated state knows.
    pub membership: Option<State>,
    /// Round trip of the last direct probe (milliseconds), if any.
    pub rtt_ms: Option<u64>,
    /// A renewal of its lease was applied here less than one lease ago
    /// (or none was seen yet and this control plane is younger than one
    /// lease).
    pub renewing: bool,
    /// How long ago a renewal of its lease was applied here (ms); none if
    /// not since this control plane started.
    pub renew_age_ms: Option<u64>,
    /// Its power is about to fail: its latest report or its gossip says so.
    pub dying: bool,
    /// Where its power comes from (its latest report, else gossip).
    pub power_source: Option<PowerSource>,
    /// CPUs it offers to appliances (report, else gossip).
    pub cpus: Option<u32>,
    /// Memory it offers to appliances in MiB (report, else gossip).
    pub memory_mb: Option<u64>,
    /// Free bytes on its volume data filesystem (its latest report).
    pub free_bytes: Option<u64>,
    /// The replicated state holds a report of it.
    pub reported: bool,
    /// Age of its latest report: our clock minus the time it stamped on it
    /// (display only: the two clocks may disagree).
    pub report_age_ms: Option<u64>,
    /// The one rule (see the module doc): in the mesh, renewing, not
    /// revoked.
    pub up: bool,
    /// This rack can speak to it directly now: it is the local rack, or it
    /// is admitted, not revoked and SWIM does not hold it dead. What
    /// replica pushes and cache fetches need on top of `up`.
    pub reachable: bool,
    /// Since when it has been seen down (unix ms), if it is down.
    pub down_since_ms: Option<u64>,
}

/// One mesh member as [`compute`] needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerFacts {
    /// Its rack name.
    pub rack: String,
    /// SWIM state.
    pub state: State,
    /// Last round trip (ms).
    pub rtt_ms: Option<u64>,
    /// What it gossips about itself.
    pub meta: Option<RackInfo>,
}

/// The lease timings the rule depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewTiming {
    /// One lease (ms): a rack not renewed for this long is not renewing.
    pub lease_ms: u64,
    /// A renewal younger than this (ms) proves the rack in the mesh
    /// whatever gossip says (three renewal periods).
    pub fresh_ms: u64,
}

/// Every fact the view is computed from.
#[derive(Debug, Clone)]
pub struct ViewInputs {
    /// The local rack's name.
    pub local: String,
    /// Reports in the replicated state.
    pub reports: BTreeMap<String, RackReport>,
    /// Mesh members that are not revoked (several may carry one name: a
    /// re-provisioned rack).
    pub peers: Vec<PeerFacts>,
    /// Names of racks admitted on a connection now.
    pub admitted: BTreeSet<String>,
    /// Names of racks whose certificates are revoked.
    pub revoked: BTreeSet<String>,
    /// Age (ms) of the latest renewal applied here, per rack.
    pub renew_age_ms: BTreeMap<String, u64>,
    /// Lease timings.
    pub timing: ViewTiming,
    /// This control plane started less than one lease ago.
    pub young: bool,
    /// When each rack was first seen down, from the previous view.
    pub down_since: BTreeMap<String, u64>,
}

/// Rank of a SWIM state: a name carried by several members takes the best.
fn rank(s: State) -> u8 {
    match s {
        State::Alive => 2,
        State::Suspect => 1,
        State::Dead => 0,
    }
}

/// The view of the field at `now_ms` (unix ms) from `inputs`.
#[must_use]
pub fn compute(inputs: &ViewInputs, now_ms: u64) -> FieldView {
    let mut best: BTreeMap<&str, &PeerFacts> = BTreeMap::new();
    for p in &inputs.peers {
        let keep = best
            .get(p.rack.as_str())
            .is_some_and(|b| rank(b.state) >= rank(p.state));
        if !keep {
            best.insert(&p.rack, p);
        }
    }
    let names: BTreeSet<&str> = std::iter::once(inputs.local.as_str())
        .chain(inputs.reports.keys().map(String::as_str))
        .chain(best.keys().copied())
        .chain(inputs.revoked.iter().map(String::as_str))
        .collect();
    let racks = names
        .into_iter()
        .map(|name| rack_state(inputs, name, best.get(name).copied(), now_ms))
        .collect();
    FieldView {
        at_ms: now_ms,
        racks,
    }
}

fn rack_state(inputs: &ViewInputs, name: &str, peer: Option<&PeerFacts>, now_ms: u64) -> RackState {
    let local = name == inputs.local;
    let report = inputs.reports.get(name);
    let meta = peer.and_then(|p| p.meta.as_ref());
    let membership = if local { None } else { peer.map(|p| p.state) };
    // A revoked name that an unrevoked member carries is a re-provisioned
    // rack, not the revoked one.
    let revoked = !local && inputs.revoked.contains(name) && peer.is_none();
    let admitted = local || inputs.admitted.contains(name);
    let renew_age_ms = inputs.renew_age_ms.get(name).copied();
    let fresh = renew_age_ms.is_some_and(|a| a < inputs.timing.fresh_ms);
    let renewing = match renew_age_ms {
        Some(a) => a < inputs.timing.lease_ms,
        None => inputs.young,
    };
    let in_mesh = local || fresh || membership.is_some_and(|s| s != State::Dead);
    let up = in_mesh && renewing && !revoked;
    let reachable = local || (admitted && !revoked && membership.is_some_and(|s| s != State::Dead));
    let down_since_ms = (!up).then(|| inputs.down_since.get(name).copied().unwrap_or(now_ms));
    RackState {
        name: name.to_owned(),
        local,
        site: report
            .map(|r| r.site.clone())
            .or_else(|| meta.map(|m| m.site.clone())),
        role: report.map(|r| r.role).or_else(|| meta.map(|m| m.role)),
        admitted,
        revoked,
        membership,
        rtt_ms: if local {
            None
        } else {
            peer.and_then(|p| p.rtt_ms)
        },
        renewing,
        renew_age_ms,
        dying: report.is_some_and(|r| r.power_dying) || meta.is_some_and(|m| m.power.dying),
        power_source: report
            .and_then(|r| r.power_source)
            .or_else(|| meta.map(|m| m.power.source)),
        cpus: report.map(|r| r.cpus).or_else(|| meta.map(|m| m.cpus)),
        memory_mb: report
            .map(|r| r.memory_mb)
            .or_else(|| meta.map(|m| m.memory_mb)),
        free_bytes: report.and_then(|r| r.free_bytes),
        reported: report.is_some(),
        report_age_ms: report.map(|r| now_ms.saturating_sub(r.at_ms)),
        up,
        reachable,
        down_since_ms,
    }
}

#[cfg(test)]
mod tests;
