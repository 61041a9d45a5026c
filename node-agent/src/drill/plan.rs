//! Before a drill: its preconditions and its blast radius, as pure
//! functions of what the racks answered (their status and their faults in
//! force), so `--dry-run`, `plan` and `run` print the same thing and a
//! refused precondition is decided before anything is ordered.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use mesh::membership::State;
use serde::{Deserialize, Serialize};

use super::faults::ActiveFault;
use super::scenario::Scenario;
use crate::status::Status;

/// What each rack answered before the drill.
#[derive(Debug, Clone)]
pub struct RackAnswer {
    /// The rack.
    pub rack: String,
    /// Its status, or why it did not answer.
    pub status: Result<Status, String>,
    /// Its faults in force, or why it did not answer.
    pub faults: Result<Vec<ActiveFault>, String>,
}

/// One precondition and whether it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// What is checked.
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// An appliance the drill may move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    /// The appliance.
    pub appliance: String,
    /// Where it runs.
    pub from: String,
    /// Where it likely goes: the surviving rack holding the freshest
    /// replicas of the owner's volumes.
    pub to: Option<String>,
    /// Seconds of writes it may lose: the owner's worst volume RPO now.
    pub rpo_s: Option<f64>,
}

/// Preconditions and blast radius.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The preconditions.
    pub checks: Vec<Check>,
    /// What may move.
    pub moves: Vec<Move>,
    /// Every rack of the field.
    pub racks: Vec<String>,
}

impl Plan {
    /// Whether every precondition holds.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// As printed before a drill.
    #[must_use]
    pub fn render(&self, scenario: &Scenario) -> String {
        let mut out = format!("drill: {}\n", scenario.describe());
        for s in &scenario.steps {
            let _ = writeln!(
                out,
                "  step: {} for {} s",
                s.fault.describe(),
                s.duration.as_secs()
            );
        }
        out.push_str("preconditions:\n");
        for c in &self.checks {
            let _ = writeln!(
                out,
                "  [{}] {}: {}",
                if c.ok { "ok" } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        out.push_str("blast radius:\n");
        if self.moves.is_empty() {
            out.push_str("  no appliance moves\n");
        }
        for m in &self.moves {
            let lag = m.rpo_s.map_or("unknown".into(), |r| format!("{r:.1} s"));
            // A dying generator hands the appliance over with its last
            // snapshot; the lag is lost only if the handover fails.
            let handover = scenario.steps.iter().any(|s| {
                matches!(&s.fault, super::faults::Fault::Generator { rack, .. } if *rack == m.from)
            });
            let risk = if handover {
                format!("none if the handover completes ({lag} if it fails)")
            } else {
                lag
            };
            let _ = writeln!(
                out,
                "  {} moves {} -> {}, writes at risk: {}",
                m.appliance,
                m.from,
                m.to.as_deref().unwrap_or("(no rack holds its replicas)"),
                risk
            );
        }
        out
    }
}

/// The preconditions and blast radius of `scenario` on the field whose
/// racks answered `answers`; `controller` is the rack the drill runs from.
#[must_use]
pub fn plan(scenario: &Scenario, controller: &str, answers: &[RackAnswer]) -> Plan {
    let racks: Vec<String> = answers.iter().map(|a| a.rack.clone()).collect();
    let statuses: BTreeMap<&str, &Status> = answers
        .iter()
        .filter_map(|a| a.status.as_ref().ok().map(|s| (a.rack.as_str(), s)))
        .collect();
    let mut checks = Vec::new();

    // Every rack the scenario names is in the field.
    let unknown: Vec<&str> = scenario
        .steps
        .iter()
        .flat_map(|s| s.fault.racks())
        .filter(|r| !racks.iter().any(|x| x == r))
        .collect();
    checks.push(Check {
        name: "racks named exist".into(),
        ok: unknown.is_empty(),
        detail: if unknown.is_empty() {
            format!("field: {}", racks.join(", "))
        } else {
            format!("not in the field: {}", unknown.join(", "))
        },
    });

    // Every rack answers (an order must reach each of them).
    let silent: Vec<String> = answers
        .iter()
        .filter_map(|a| match (&a.status, &a.faults) {
            (Ok(_), Ok(_)) => None,
            (Err(e), _) | (_, Err(e)) => Some(format!("{}: {e}", a.rack)),
        })
        .collect();
    checks.push(Check {
        name: "every rack answers".into(),
        ok: silent.is_empty(),
        detail: if silent.is_empty() {
            format!("{} racks", answers.len())
        } else {
            silent.join("; ")
        },
    });

    // A control-plane majority, seen from the controller.
    let majority = statuses.get(controller).and_then(|s| {
        let c = s.control.as_ref()?;
        let alive = c
            .voters
            .iter()
            .filter(|v| {
                *v == &s.rack
                    || s.peers
                        .iter()
                        .any(|p| p.rack.as_deref() == Some(v.as_str()) && p.state == State::Alive)
            })
            .count();
        Some((c.leader.clone(), alive, c.voters.len()))
    });
    checks.push(match majority {
        Some((Some(leader), alive, voters)) if voters > 0 && alive * 2 > voters => Check {
            name: "control-plane majority".into(),
            ok: true,
            detail: format!("leader {leader}, {alive} of {voters} voters alive"),
        },
        Some((leader, alive, voters)) => Check {
            name: "control-plane majority".into(),
            ok: false,
            detail: format!(
                "leader {}, {alive} of {voters} voters alive",
                leader.as_deref().unwrap_or("none")
            ),
        },
        None => Check {
            name: "control-plane majority".into(),
            ok: false,
            detail: format!("{controller} reports no control plane"),
        },
    });

    // Every owned volume has a replica in sync (within one snapshot).
    let mut lagging = Vec::new();
    let mut volumes = 0;
    for (rack, s) in &statuses {
        for v in s.volumes.iter().filter(|v| v.image.is_some()) {
            volumes += 1;
            let g = v.generation.unwrap_or(0);
            let synced = v
                .replicas
                .iter()
                .any(|r| r.generation.is_some_and(|rg| rg > 0 && rg + 1 >= g));
            if !synced {
                lagging.push(format!("{} on {rack}", v.name));
            }
        }
    }
    checks.push(Check {
        name: "every volume has a replica in sync".into(),
        ok: lagging.is_empty(),
        detail: if lagging.is_empty() {
            format!("{volumes} volumes")
        } else {
            format!("no replica within one snapshot: {}", lagging.join(", "))
        },
    });

    // No drill running anywhere.
    let running: Vec<String> = answers
        .iter()
        .filter_map(|a| {
            let f = a.faults.as_ref().ok()?.first()?;
            Some(format!("{} on {}", f.drill, a.rack))
        })
        .collect();
    checks.push(Check {
        name: "no drill running".into(),
        ok: running.is_empty(),
        detail: if running.is_empty() {
            "none".into()
        } else {
            running.join(", ")
        },
    });

    let cut: Vec<&str> = scenario
        .steps
        .iter()
        .flat_map(|s| s.fault.moves_from())
        .collect();
    let moves = blast_radius(&cut, &statuses);
    Plan {
        checks,
        moves,
        racks,
    }
}

/// The appliances running on `cut` racks, where they likely go and what
/// they may lose.
fn blast_radius(cut: &[&str], statuses: &BTreeMap<&str, &Status>) -> Vec<Move> {
    let mut moves = Vec::new();
    let Some(any) = statuses.values().next() else {
        return moves;
    };
    for a in &any.appliances {
        let Some(owner) = a.owner.as_deref().filter(|o| cut.contains(o)) else {
            continue;
        };
        let owner_status = statuses.get(owner);
        let volumes: Vec<_> = owner_status
            .map(|s| s.volumes.iter().filter(|v| v.image.is_some()).collect())
            .unwrap_or_default();
        let rpo_s = volumes
            .iter()
            .filter_map(|v| v.rpo_s)
            .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
        let mut best: BTreeMap<&str, u64> = BTreeMap::new();
        for v in &volumes {
            for r in &v.replicas {
                if !cut.contains(&r.rack.as_str()) {
                    *best.entry(r.rack.as_str()).or_default() += r.generation.unwrap_or(0);
                }
            }
        }
        let to = best
            .iter()
            .max_by_key(|(_, g)| **g)
            .map(|(r, _)| (*r).to_owned());
        moves.push(Move {
            appliance: a.name.clone(),
            from: owner.to_owned(),
            to,
            rpo_s,
        });
    }
    moves
}
