//! Placement: which rack owns which appliance, as a pure function of the
//! field's state (desired state, rack reports) and the leader's view of
//! which racks are up.
//!
//! Rules, in order:
//! - appliances are considered by tier (0 first), then name;
//! - an appliance stays where it is while its owner is up and not dying
//!   (no flapping: a returning rack takes nothing back on its own);
//! - an operator's `move` is honoured when the target is up and fits;
//! - an appliance stranded on its owner (reported `failed` there because
//!   the owner holds none of a volume that other racks hold, and will not
//!   create it empty) moves to a usable rack that holds it (`replica`);
//! - a new owner is an up, non-dying rack (never a witness) with room for
//!   the appliance's CPUs and memory and no anti-affine neighbour; a rack
//!   holding more of the appliance's volumes first (a rack holding none
//!   would have to start it with empty disks), then preferred racks, then
//!   preferred sites, then the freshest replicas, then the least loaded;
//! - when nothing fits, lower tiers are stopped (preempted) on the rack
//!   where the fewest have to go.

use std::collections::{BTreeMap, BTreeSet};

use deploy::appliance::ApplianceSpec;
use deploy::Role;

use crate::field::{AppRecord, AppState, Command, FieldState, Transfer};

/// One rack as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RackView {
    /// Name.
    pub name: String,
    /// Up: alive in membership and renewing its lease.
    pub up: bool,
    /// When it was first seen down (unix ms), if it is down.
    pub down_since_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Use {
    cpus: u64,
    memory_mb: u64,
}

struct Planner<'a> {
    state: &'a FieldState,
    up: BTreeMap<&'a str, &'a RackView>,
    owner: BTreeMap<String, Option<String>>,
    used: BTreeMap<String, Use>,
}

impl<'a> Planner<'a> {
    fn usable(&self, rack: &str) -> bool {
        self.up.get(rack).is_some_and(|v| v.up)
            && self
                .state
                .racks
                .get(rack)
                .is_some_and(|r| r.role == Role::Rack && !r.power_dying)
    }

    fn fits(&self, rack: &str, spec: &ApplianceSpec) -> bool {
        let Some(r) = self.state.racks.get(rack) else {
            return false;
        };
        let u = self.used.get(rack).copied().unwrap_or_default();
        u.cpus + u64::from(spec.cpus) <= u64::from(r.cpus)
            && u.memory_mb + spec.memory_mb <= r.memory_mb
    }

    fn apps_on<'b>(&'b self, rack: &'b str) -> impl Iterator<Item = &'a AppRecord> + 'b {
        self.state
            .apps
            .values()
            .filter(move |a| self.owner.get(&a.spec.name).and_then(|o| o.as_deref()) == Some(rack))
    }

    fn anti_affine(&self, rack: &str, spec: &ApplianceSpec) -> bool {
        self.apps_on(rack).any(|other| {
            other.spec.name != spec.name
                && (spec.placement.anti_affinity.contains(&other.spec.name)
                    || other.spec.placement.anti_affinity.contains(&spec.name))
        })
    }

    fn take(&mut self, rack: &str, spec: &ApplianceSpec, sign: i64) {
        let u = self.used.entry(rack.to_owned()).or_default();
        let apply = |v: &mut u64, d: u64| {
            *v = if sign > 0 {
                *v + d
            } else {
                v.saturating_sub(d)
            };
        };
        apply(&mut u.cpus, u64::from(spec.cpus));
        apply(&mut u.memory_mb, spec.memory_mb);
    }

    /// Ranking key: larger is better. Holding the volumes comes before any
    /// preference: an operator's preferred rack without a replica would
    /// start the appliance on empty disks.
    fn score(
        &self,
        rack: &str,
        spec: &ApplianceSpec,
    ) -> (usize, bool, bool, u64, i64, std::cmp::Reverse<String>) {
        let report = &self.state.racks[rack];
        let held: Vec<u64> = spec
            .volume
            .iter()
            .filter_map(|v| report.volumes.get(&v.name).copied())
            .collect();
        let u = self.used.get(rack).copied().unwrap_or_default();
        (
            held.len(),
            spec.placement.racks.iter().any(|r| r == rack),
            spec.placement.sites.contains(&report.site),
            held.iter().sum(),
            -(u.cpus as i64),
            std::cmp::Reverse(rack.to_owned()),
        )
    }

    /// Where to move `a`, stranded on its up owner `owner`: the owner
    /// reported it `failed` at its current epoch and holds none of some
    /// volume of it (it refuses to create a volume the field has seen),
    /// while a usable rack that fits it holds every such volume. `None`:
    /// not stranded, or no such rack.
    fn holder_for_stranded(&self, a: &AppRecord, owner: &str) -> Option<String> {
        let report = self.state.racks.get(owner)?;
        let failed = report
            .apps
            .get(&a.spec.name)
            .is_some_and(|r| r.epoch == a.epoch && r.state == AppState::Failed);
        let missing: Vec<&str> = a
            .spec
            .volume
            .iter()
            .map(|v| v.name.as_str())
            .filter(|v| !report.volumes.contains_key(*v))
            .collect();
        if !failed || missing.is_empty() {
            return None;
        }
        let to = self.best(&a.spec, Some(owner))?;
        let holds = &self.state.racks.get(&to)?.volumes;
        missing
            .iter()
            .all(|v| holds.get(*v).is_some_and(|g| *g > 0))
            .then_some(to)
    }

    fn best(&self, spec: &ApplianceSpec, exclude: Option<&str>) -> Option<String> {
        self.state
            .racks
            .keys()
            .filter(|r| Some(r.as_str()) != exclude)
            .filter(|r| self.usable(r) && self.fits(r, spec) && !self.anti_affine(r, spec))
            .max_by_key(|r| self.score(r, spec))
            .cloned()
    }

    /// The rack where evicting the fewest lower-tier appliances makes room.
    fn preempt(&self, spec: &ApplianceSpec, tier: u8) -> Option<(String, Vec<String>)> {
        let mut best: Option<(String, Vec<String>)> = None;
        for rack in self.state.racks.keys().filter(|r| self.usable(r)) {
            if self.anti_affine(rack, spec) {
                continue;
            }
            // Only running appliances use room; a stopped one still owned
            // here frees nothing.
            let mut victims: Vec<&AppRecord> = self
                .apps_on(rack)
                .filter(|a| a.running && a.spec.tier > tier)
                .collect();
            victims.sort_by_key(|a| (std::cmp::Reverse(a.spec.tier), a.spec.name.clone()));
            let r = &self.state.racks[rack];
            let mut u = self.used.get(rack.as_str()).copied().unwrap_or_default();
            let mut out = Vec::new();
            for v in victims {
                if u.cpus + u64::from(spec.cpus) <= u64::from(r.cpus)
                    && u.memory_mb + spec.memory_mb <= r.memory_mb
                {
                    break;
                }
                u.cpus = u.cpus.saturating_sub(u64::from(v.spec.cpus));
                u.memory_mb = u.memory_mb.saturating_sub(v.spec.memory_mb);
                out.push(v.spec.name.clone());
            }
            let fits = u.cpus + u64::from(spec.cpus) <= u64::from(r.cpus)
                && u.memory_mb + spec.memory_mb <= r.memory_mb;
            if fits && best.as_ref().is_none_or(|(_, b)| out.len() < b.len()) {
                best = Some((rack.clone(), out));
            }
        }
        best
    }
}

/// Whether a leader elected `leading_for` ago may plan yet. While the
/// field had no leader nobody could renew, so right after an election
/// every rack's renewal looks old and only those that renewed with the
/// new leader count as up: planning then would pass over a live rack that
/// holds an appliance's volumes and pick one that holds none (a second
/// move and a whole lease later, the appliance would run where its data
/// is, or a rack that kept running it would be fenced for nothing). So the
/// new leader waits until every rack that may be alive (`racks`: not known
/// dead in the mesh, and up) has renewed with it, or until `settle` has
/// passed, whichever comes first; a rack the mesh knows dead holds
/// nothing up.
#[must_use]
pub fn settled_after_election(
    leading_for: std::time::Duration,
    settle: std::time::Duration,
    racks: &[(bool, bool)],
) -> bool {
    leading_for >= settle || racks.iter().all(|&(maybe_alive, up)| up || !maybe_alive)
}

/// The assignments the leader should propose now. Each carries the epoch
/// it was decided against, so one decided on stale state is refused.
#[must_use]
pub fn plan(state: &FieldState, racks: &[RackView], now_ms: u64) -> Vec<Command> {
    let mut p = Planner {
        state,
        up: racks.iter().map(|r| (r.name.as_str(), r)).collect(),
        owner: state
            .apps
            .iter()
            .map(|(k, a)| (k.clone(), a.owner.clone()))
            .collect(),
        used: BTreeMap::new(),
    };
    for a in state.apps.values() {
        if let Some(o) = a.owner.as_deref() {
            if a.running && p.usable(o) {
                p.take(o, &a.spec, 1);
            }
        }
    }
    let mut order: Vec<&AppRecord> = state.apps.values().collect();
    order.sort_by_key(|a| (a.spec.tier, a.spec.name.clone()));
    let mut out = Vec::new();
    let mut decided: BTreeSet<String> = BTreeSet::new();
    let transfer =
        |from: Option<&str>, reason: &str, planned: bool, detected: Option<u64>| Transfer {
            from: from.map(str::to_owned),
            reason: reason.into(),
            planned,
            released: None,
            detected_ms: detected,
            decided_ms: now_ms,
        };
    for a in order {
        let name = &a.spec.name;
        if decided.contains(name) {
            continue;
        }
        let cur = p.owner.get(name).cloned().flatten();
        let cur_up = cur
            .as_deref()
            .is_some_and(|o| p.up.get(o).is_some_and(|v| v.up));
        if !a.running {
            if let Some(o) = cur.as_deref() {
                out.push(assign(a, None, transfer(Some(o), "stopped", cur_up, None)));
            }
            continue;
        }
        let cur_usable = cur.as_deref().is_some_and(|o| p.usable(o));
        if cur_usable {
            let o = cur.as_deref().expect("usable owner");
            if let Some(to) = a.move_to.as_deref().filter(|t| *t != o) {
                if p.usable(to) && p.fits(to, &a.spec) && !p.anti_affine(to, &a.spec) {
                    p.take(o, &a.spec, -1);
                    p.take(to, &a.spec, 1);
                    p.owner.insert(name.clone(), Some(to.to_owned()));
                    out.push(assign(a, Some(to), transfer(Some(o), "move", true, None)));
                    decided.insert(name.clone());
                }
            } else if let Some(to) = p.holder_for_stranded(a, o) {
                p.take(o, &a.spec, -1);
                p.take(&to, &a.spec, 1);
                p.owner.insert(name.clone(), Some(to.clone()));
                out.push(assign(
                    a,
                    Some(&to),
                    transfer(Some(o), "replica", false, None),
                ));
                decided.insert(name.clone());
            }
            continue;
        }
        // A new owner is needed: never placed, owner down, or owner dying.
        let dying = cur_up && !cur_usable;
        let (reason, detected) = match cur.as_deref() {
            None => ("placed", None),
            Some(_) if dying => ("power", None),
            Some(o) => ("failover", p.up.get(o).and_then(|v| v.down_since_ms)),
        };
        let target = match p.best(&a.spec, cur.as_deref()) {
            Some(t) => Some(t),
            None => match p.preempt(&a.spec, a.spec.tier) {
                Some((t, victims)) => {
                    for v in victims {
                        let va = &state.apps[&v];
                        p.take(&t, &va.spec, -1);
                        p.owner.insert(v.clone(), None);
                        out.push(assign(
                            va,
                            None,
                            transfer(Some(&t), "preempted", true, None),
                        ));
                        decided.insert(v);
                    }
                    Some(t)
                }
                None => None,
            },
        };
        if let Some(t) = target {
            p.take(&t, &a.spec, 1);
            p.owner.insert(name.clone(), Some(t.clone()));
            out.push(assign(
                a,
                Some(&t),
                transfer(cur.as_deref(), reason, dying, detected),
            ));
            decided.insert(name.clone());
        }
    }
    out
}

fn assign(a: &AppRecord, owner: Option<&str>, transfer: Transfer) -> Command {
    Command::Assign {
        name: a.spec.name.clone(),
        owner: owner.map(str::to_owned),
        expect_epoch: a.epoch,
        transfer,
    }
}

#[cfg(test)]
mod tests;
