//! The replicated desired state of a field, and the commands that change it.
//!
//! Every rack and witness applies the same commands in the same (Raft log)
//! order, so [`FieldState::apply`] must be a pure, deterministic function of
//! the state and the command: no clock, no randomness, no I/O. Wall-clock
//! figures inside commands (`decided_ms`...) are data chosen by the
//! proposer, used for events and display only, never for safety.

use std::collections::{BTreeMap, BTreeSet};

use deploy::appliance::{check_dependencies, ApplianceSpec};
use deploy::power::PowerSource;
use deploy::Role;
use serde::{Deserialize, Serialize};

use crate::backhaul::{BackhaulLedger, BackhaulUse};

/// What a rack reports about one appliance it runs (or ran).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppState {
    /// Launched, not yet healthy.
    Starting,
    /// Healthy.
    Running,
    /// Not running (by request, or never started).
    Stopped,
    /// Exhausted its restarts, or could not start.
    Failed,
    /// Stopped because this rack could not renew its lease.
    Fenced,
}

impl AppState {
    /// The status word (`running`, `starting`...).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            AppState::Starting => "starting",
            AppState::Running => "running",
            AppState::Stopped => "stopped",
            AppState::Failed => "failed",
            AppState::Fenced => "fenced",
        }
    }
}

/// One appliance as its rack reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppReport {
    /// The assignment epoch it runs under.
    pub epoch: u64,
    /// Its state.
    pub state: AppState,
    /// Since when (unix ms, the reporting rack's clock).
    pub since_ms: u64,
}

/// What a rack tells the field with every lease renewal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RackReport {
    /// `rack` or `witness`.
    pub role: Role,
    /// Its site (failure domain).
    pub site: String,
    /// CPUs it offers to appliances.
    pub cpus: u32,
    /// Memory it offers to appliances (MiB).
    pub memory_mb: u64,
    /// Power telemetry says it is about to go down.
    pub power_dying: bool,
    /// Where its power comes from (none in reports from agents that did
    /// not send it).
    #[serde(default)]
    pub power_source: Option<PowerSource>,
    /// Free bytes on the filesystem of its volume data directory (none if
    /// unknown, or from an agent that did not send it).
    #[serde(default)]
    pub free_bytes: Option<u64>,
    /// Newest complete generation it holds of each volume.
    pub volumes: BTreeMap<String, u64>,
    /// The appliances it runs or ran.
    pub apps: BTreeMap<String, AppReport>,
    /// When it sent this (unix ms, its own clock; display only).
    pub at_ms: u64,
    /// Its uplink's use of the field's backhaul quota, and what more it
    /// asks for (none: no uplink, or no field quota).
    #[serde(default)]
    pub backhaul: Option<BackhaulUse>,
}

/// How an appliance came to its current owner (for events and status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// The previous owner, if any.
    pub from: Option<String>,
    /// Why (`placed`, `failover`, `power`, `move`, `replica`, `preempted`,
    /// `stopped`).
    pub reason: String,
    /// The previous owner is alive and hands over (stops, ships a final
    /// snapshot, then commits [`Command::Released`]).
    pub planned: bool,
    /// For planned transfers: the volume generations the previous owner
    /// shipped before releasing, once it has.
    pub released: Option<BTreeMap<String, u64>>,
    /// When the leader saw the reason (unix ms; events only).
    pub detected_ms: Option<u64>,
    /// When the leader decided (unix ms; events only).
    pub decided_ms: u64,
}

/// One appliance in the desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    /// Its manifest.
    pub spec: ApplianceSpec,
    /// Whether the operator wants it running.
    pub running: bool,
    /// The rack that holds the assignment (none: unplaced).
    pub owner: Option<String>,
    /// Grows by one with every assignment: the fencing token.
    pub epoch: u64,
    /// How the current owner got it.
    pub transfer: Option<Transfer>,
    /// An operator asked to move it here (`fieldrack app move`).
    pub move_to: Option<String>,
}

/// A change to the desired state, proposed by a rack and applied by all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Add or update appliances (an update keeps owner and epoch).
    Deploy {
        /// The manifests.
        specs: Vec<ApplianceSpec>,
    },
    /// Start or stop an appliance (`fieldrack app stop`).
    SetRunning {
        /// Appliance.
        name: String,
        /// Desired.
        running: bool,
    },
    /// Ask for an appliance to move to a rack (`fieldrack app move`).
    Move {
        /// Appliance.
        name: String,
        /// Target rack.
        to: String,
    },
    /// The placement decision of the leader: a new owner (or none) under a
    /// new epoch. Applied only if the epoch is still `expect_epoch`, so a
    /// decision taken on stale state is dropped.
    Assign {
        /// Appliance.
        name: String,
        /// The new owner, or none (stopped / preempted / nowhere fits).
        owner: Option<String>,
        /// The epoch the decision was taken against.
        expect_epoch: u64,
        /// Why, and the timings.
        transfer: Transfer,
    },
    /// A lease renewal with the rack's report. Its response lists the
    /// assignments the rack may run until its lease expires.
    Renew {
        /// The rack.
        rack: String,
        /// Its report.
        report: RackReport,
    },
    /// The previous owner of a planned transfer has stopped the appliance
    /// and shipped these volume generations to the new owner.
    Released {
        /// Appliance.
        name: String,
        /// The epoch of the transfer it releases to.
        epoch: u64,
        /// Volume generations shipped.
        volumes: BTreeMap<String, u64>,
    },
    /// Forget a rack's report (fleet revocation).
    ForgetRack {
        /// The rack.
        rack: String,
    },
    /// Appliances a rack brought from a cluster it left (two clusters that
    /// formed apart met): added unless the field has one of the same name,
    /// keeping their epochs so that fencing tokens never go back.
    Adopt {
        /// The appliances.
        apps: Vec<Carried>,
    },
}

/// An appliance carried from a cluster that merged into this one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Carried {
    /// Its definition.
    pub spec: ApplianceSpec,
    /// Its last epoch there.
    pub epoch: u64,
    /// Whether the operator wanted it running.
    pub running: bool,
    /// The rack that held it there: it keeps it if it is up (it stopped
    /// its copy when it left, and starts it again under its lease here);
    /// otherwise placement moves it, behind the usual start gates.
    pub owner: Option<String>,
}

/// What applying a command says back to its proposer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Applied (or a membership/blank entry).
    #[default]
    Ok,
    /// A renewal: the assignments `(appliance, epoch)` this lease covers.
    Granted(Vec<(String, u64)>),
    /// Not applied, and why (unknown appliance, stale epoch...).
    Refused(Refusal),
}

/// Why the state machine refused a command. Typed so that the edge (the
/// API) can tell an unknown name from a conflict from bad input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// No appliance of that name is deployed.
    #[error("no appliance named {name:?}")]
    UnknownAppliance {
        /// The name asked for.
        name: String,
    },
    /// No rack of that name reports, or it is a witness.
    #[error("no rack named {rack:?} runs appliances")]
    UnknownRack {
        /// The rack asked for.
        rack: String,
    },
    /// A decision taken against an epoch that has moved on since.
    #[error("{name}: decision taken at epoch {expected}, now {now}")]
    StaleEpoch {
        /// The appliance.
        name: String,
        /// The epoch the decision was taken at.
        expected: u64,
        /// The current epoch.
        now: u64,
    },
    /// A release for an epoch that is not a planned handover.
    #[error("{name}: epoch {epoch} is not a handover")]
    NotAHandover {
        /// The appliance.
        name: String,
        /// The epoch released.
        epoch: u64,
    },
    /// A release for an epoch that has moved on since.
    #[error("{name}: release for epoch {epoch}, now {now}")]
    StaleRelease {
        /// The appliance.
        name: String,
        /// The epoch released.
        epoch: u64,
        /// The current epoch.
        now: u64,
    },
    /// One manifest names an appliance twice.
    #[error("appliance {name:?} is given twice")]
    GivenTwice {
        /// The name.
        name: String,
    },
    /// `after` names a missing appliance or forms a cycle (the manifest
    /// check's message).
    #[error("{0}")]
    Dependencies(String),
    /// Two appliances would write one volume.
    #[error("volume {volume:?} is used by both {first:?} and {second:?}")]
    VolumeShared {
        /// The volume.
        volume: String,
        /// The appliance that has it.
        first: String,
        /// The appliance that would also have it.
        second: String,
    },
}

/// The desired state of the field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldState {
    /// Appliances by name.
    pub apps: BTreeMap<String, AppRecord>,
    /// The latest report of every rack.
    pub racks: BTreeMap<String, RackReport>,
    /// Today's grants of the field's backhaul quota.
    #[serde(default)]
    pub backhaul: BackhaulLedger,
}

impl FieldState {
    /// Apply one command. Deterministic.
    pub fn apply(&mut self, cmd: &Command) -> Response {
        match cmd {
            Command::Deploy { specs } => self.deploy(specs),
            Command::SetRunning { name, running } => match self.apps.get_mut(name) {
                Some(a) => {
                    a.running = *running;
                    Response::Ok
                }
                None => unknown(name),
            },
            Command::Move { name, to } => {
                if !self.racks.get(to).is_some_and(|r| r.role == Role::Rack) {
                    return Response::Refused(Refusal::UnknownRack { rack: to.clone() });
                }
                match self.apps.get_mut(name) {
                    Some(a) if a.owner.as_deref() == Some(to.as_str()) => {
                        a.move_to = None;
                        Response::Ok
                    }
                    Some(a) => {
                        a.move_to = Some(to.clone());
                        Response::Ok
                    }
                    None => unknown(name),
                }
            }
            Command::Assign {
                name,
                owner,
                expect_epoch,
                transfer,
            } => {
                let Some(a) = self.apps.get_mut(name) else {
                    return unknown(name);
                };
                if a.epoch != *expect_epoch {
                    return Response::Refused(Refusal::StaleEpoch {
                        name: name.clone(),
                        expected: *expect_epoch,
                        now: a.epoch,
                    });
                }
                a.epoch += 1;
                if a.move_to.is_some() && (a.move_to == *owner || transfer.reason == "move") {
                    a.move_to = None;
                }
                a.owner.clone_from(owner);
                a.transfer = Some(transfer.clone());
                Response::Ok
            }
            Command::Renew { rack, report } => {
                if let Some(ask) = &report.backhaul {
                    self.backhaul.renewed(rack, ask);
                }
                self.racks.insert(rack.clone(), report.clone());
                Response::Granted(self.grants(rack))
            }
            Command::Released {
                name,
                epoch,
                volumes,
            } => match self.apps.get_mut(name) {
                Some(a) if a.epoch == *epoch => match a.transfer.as_mut() {
                    Some(t) if t.planned => {
                        t.released = Some(volumes.clone());
                        Response::Ok
                    }
                    _ => Response::Refused(Refusal::NotAHandover {
                        name: name.clone(),
                        epoch: *epoch,
                    }),
                },
                Some(a) => Response::Refused(Refusal::StaleRelease {
                    name: name.clone(),
                    epoch: *epoch,
                    now: a.epoch,
                }),
                None => unknown(name),
            },
            Command::ForgetRack { rack } => {
                self.racks.remove(rack);
                Response::Ok
            }
            Command::Adopt { apps } => self.adopt(apps),
        }
    }

    fn adopt(&mut self, apps: &[Carried]) -> Response {
        let new: Vec<&Carried> = apps
            .iter()
            .filter(|c| !self.apps.contains_key(&c.spec.name))
            .collect();
        let specs: Vec<ApplianceSpec> = new.iter().map(|c| c.spec.clone()).collect();
        let r = self.deploy(&specs);
        if r == Response::Ok {
            for c in new {
                if let Some(a) = self.apps.get_mut(&c.spec.name) {
                    a.epoch = c.epoch;
                    a.running = c.running;
                    a.owner = c.owner.clone();
                }
            }
        }
        r
    }

    fn deploy(&mut self, specs: &[ApplianceSpec]) -> Response {
        let mut names = BTreeSet::new();
        for s in specs {
            if !names.insert(s.name.as_str()) {
                return Response::Refused(Refusal::GivenTwice {
                    name: s.name.clone(),
                });
            }
        }
        let mut all: BTreeMap<&str, &ApplianceSpec> = self
            .apps
            .iter()
            .map(|(k, v)| (k.as_str(), &v.spec))
            .collect();
        for s in specs {
            all.insert(&s.name, s);
        }
        let merged: Vec<ApplianceSpec> = all.values().map(|s| (*s).clone()).collect();
        if let Err(e) = check_dependencies(&merged) {
            return Response::Refused(Refusal::Dependencies(e.to_string()));
        }
        // A volume belongs to one appliance: two sharing a disk would both
        // write it.
        let mut volume_owner: BTreeMap<&str, &str> = BTreeMap::new();
        for s in &merged {
            for v in &s.volume {
                if let Some(other) = volume_owner.insert(&v.name, &s.name) {
                    return Response::Refused(Refusal::VolumeShared {
                        volume: v.name.clone(),
                        first: (*other).to_owned(),
                        second: s.name.clone(),
                    });
                }
            }
        }
        for s in specs {
            match self.apps.get_mut(&s.name) {
                Some(a) => {
                    a.spec = s.clone();
                    a.running = true;
                }
                None => {
                    self.apps.insert(
                        s.name.clone(),
                        AppRecord {
                            spec: s.clone(),
                            running: true,
                            owner: None,
                            epoch: 0,
                            transfer: None,
                            move_to: None,
                        },
                    );
                }
            }
        }
        Response::Ok
    }

    /// The assignments `rack` may run: those it owns while they are wanted.
    #[must_use]
    pub fn grants(&self, rack: &str) -> Vec<(String, u64)> {
        self.apps
            .values()
            .filter(|a| a.running && a.owner.as_deref() == Some(rack))
            .map(|a| (a.spec.name.clone(), a.epoch))
            .collect()
    }

    /// The volume names of every appliance (volume → appliance).
    #[must_use]
    pub fn appliance_volumes(&self) -> BTreeMap<String, String> {
        self.apps
            .values()
            .flat_map(|a| {
                a.spec
                    .volume
                    .iter()
                    .map(|v| (v.name.clone(), a.spec.name.clone()))
            })
            .collect()
    }
}

fn unknown(name: &str) -> Response {
    Response::Refused(Refusal::UnknownAppliance {
        name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests;
