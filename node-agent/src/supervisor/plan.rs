//! The supervisor's decisions, as a pure function: what this rack should
//! do about its appliances now, given the field's desired state, its
//! lease, the start gates and what runs here. No I/O, time injected; the
//! shell in [`super`] carries the actions out as tasks of their own.
//!
//! Rules, in the order they are applied to each appliance:
//!
//! 1. **Fence**: an instance (starting, running or stopping politely) that
//!    the latest grant does not cover at its epoch, or whose fence time has
//!    come, is fenced in this very plan. (Its own task fences it at the
//!    fence time anyway; the plan only says so for the record.)
//! 2. **Stop**: an instance still leased but no longer ours (reassigned,
//!    stopped by the operator, deleted) stops with its `stop_grace_ms`; an
//!    unhealthy one is restarted (stopped, then started after a backoff).
//! 3. **Hand over / demote**: when no instance of it runs here, an
//!    appliance a planned transfer takes from us is handed over (final
//!    snapshot shipped, `Released`); volumes the new owner reports holding
//!    are dropped here.
//! 4. **Start**: an appliance that is ours and wanted, with no instance
//!    here, starts once the lease covers it, its restart backoff is over,
//!    the previous owner has certainly stopped (it released it and we hold
//!    what it shipped, or the gate from `LeaseWatch` has passed) and what
//!    it starts `after` runs somewhere. Never twice: an appliance with a
//!    live task here (starting, running or stopping) never gets a start.
//! 5. **Probe / capture**: health probes and QEMU captures when due, one at
//!    a time per appliance.
//!
//! [`plan`] also returns when it wants to be asked again (`wake`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use control::{AppRecord, AppState, FieldState, Lease, LeaseConfig};
use deploy::appliance::{ApplianceSpec, DriverKind, RestartMode};

/// Grace for an instance whose appliance was deleted from the field (its
/// spec, and so its `stop_grace_ms`, is gone).
pub const ORPHAN_STOP_GRACE: Duration = Duration::from_secs(3);
/// Unhealthy checks in a row before a running appliance is restarted.
pub const UNHEALTHY_LIMIT: u32 = 3;
/// A failed handover, or a start whose volumes could not be prepared, is
/// tried again after this long (a peer may be back, a disk freed).
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// First restart backoff; doubles with every restart in the window, up to
/// [`BACKOFF_MAX_DOUBLINGS`] times.
pub const BACKOFF_BASE: Duration = Duration::from_millis(1000);
/// Bound on the doublings of [`BACKOFF_BASE`] (32 s at most).
pub const BACKOFF_MAX_DOUBLINGS: u32 = 5;

/// The life of an appliance's task on this rack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// No task: nothing of it runs here.
    Idle,
    /// Preparing volumes and launching.
    Starting,
    /// The instance runs (its task holds it and its deadline).
    Running,
    /// Asked to stop; `fenced` once the stop is a fence.
    Stopping {
        /// The stop is (or became) a fence.
        fenced: bool,
    },
}

impl Task {
    /// Whether a task of this appliance exists here (something may run).
    #[must_use]
    pub fn live(self) -> bool {
        self != Task::Idle
    }
}

/// Why an instance is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopWhy {
    /// Its lease does not cover it any more.
    Fence,
    /// It is not ours (reassigned, stopped by the operator, deleted).
    Unassigned,
    /// Failed its health checks: restart.
    Unhealthy,
    /// The agent shuts down.
    Shutdown,
}

/// What the supervisor knows of one appliance on this rack (pure data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The assignment epoch it runs (or last ran) under.
    pub epoch: u64,
    /// Its reported state.
    pub state: AppState,
    /// Since when (unix ms), for reports.
    pub since_ms: u64,
    /// Its task.
    pub task: Task,
    /// When the instance was launched.
    pub launched: Option<Instant>,
    /// Restarts within the policy's window.
    pub restarts: Vec<Instant>,
    /// No start before this (restart backoff, retry).
    pub not_before: Option<Instant>,
    /// Next health probe due.
    pub next_probe: Instant,
    /// A probe is in flight.
    pub probing: bool,
    /// Failed probes in a row.
    pub unhealthy: u32,
    /// The probes decided it must be restarted.
    pub restart_due: bool,
    /// Next QEMU capture due.
    pub next_capture: Instant,
    /// A capture is in flight.
    pub capturing: bool,
}

impl Slot {
    /// Nothing of `epoch` ran here yet.
    #[must_use]
    pub fn new(epoch: u64, now: Instant, now_ms: u64) -> Self {
        Self {
            epoch,
            state: AppState::Stopped,
            since_ms: now_ms,
            task: Task::Idle,
            launched: None,
            restarts: Vec::new(),
            not_before: None,
            next_probe: now,
            probing: false,
            unhealthy: 0,
            restart_due: false,
            next_capture: now,
            capturing: false,
        }
    }

    /// Change the reported state (and its `since`).
    pub fn set(&mut self, s: AppState, now_ms: u64) {
        if self.state != s {
            self.state = s;
            self.since_ms = now_ms;
        }
    }

    /// The instance was launched at `now`.
    pub fn launched(&mut self, now: Instant, now_ms: u64) {
        self.task = Task::Running;
        self.launched = Some(now);
        self.next_probe = now;
        self.unhealthy = 0;
        self.restart_due = false;
        self.set(AppState::Starting, now_ms);
    }
}

/// Background work about an appliance's volumes that is not an instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chores {
    /// Appliances with a handover or demotion in flight (one at a time).
    pub busy: BTreeSet<String>,
    /// A failed handover is retried after this.
    pub retry_at: BTreeMap<String, Instant>,
    /// (appliance, epoch, volume) already demoted.
    pub demoted: BTreeSet<(String, u64, String)>,
}

/// Everything [`plan`] decides from.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// Now (monotonic).
    pub now: Instant,
    /// This rack.
    pub rack: &'a str,
    /// Lease timings.
    pub cfg: &'a LeaseConfig,
    /// This rack's latest grant.
    pub lease: &'a Lease,
    /// The desired state.
    pub field: &'a FieldState,
    /// Start gate of each appliance at its current epoch (`LeaseWatch`).
    pub gates: &'a BTreeMap<String, Instant>,
    /// Newest complete generation held here of each volume.
    pub held: &'a BTreeMap<String, u64>,
    /// The appliances known here.
    pub slots: &'a BTreeMap<String, Slot>,
    /// Handovers and demotions.
    pub chores: &'a Chores,
    /// How often QEMU captures each volume.
    pub capture_every: Duration,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fence the instance now (fence grace, then SIGKILL).
    Fence {
        /// Appliance.
        app: String,
        /// Its epoch.
        epoch: u64,
    },
    /// Stop the instance politely.
    Stop {
        /// Appliance.
        app: String,
        /// Its epoch.
        epoch: u64,
        /// Its grace.
        grace: Duration,
        /// Why.
        why: StopWhy,
    },
    /// Prepare its volumes and launch it.
    Start {
        /// Appliance.
        app: String,
        /// The epoch to run under.
        epoch: u64,
    },
    /// Ship its volumes to the new owner, then commit `Released`.
    HandOver {
        /// Appliance.
        app: String,
        /// The epoch released to.
        epoch: u64,
        /// The new owner.
        to: String,
    },
    /// Drop these volumes here: the owner of `epoch` holds them.
    Demote {
        /// Appliance.
        app: String,
        /// The new owner's epoch.
        epoch: u64,
        /// Volumes the new owner reports.
        volumes: Vec<String>,
        /// The generations this rack shipped to the new owner in a planned
        /// handover (empty after a failover): a volume whose last state is
        /// exactly that generation is dropped, any other is kept.
        shipped: BTreeMap<String, u64>,
    },
    /// Run one health probe.
    Probe {
        /// Appliance.
        app: String,
        /// Its epoch.
        epoch: u64,
    },
    /// Capture its volumes through QEMU.
    Capture {
        /// Appliance.
        app: String,
        /// Its epoch.
        epoch: u64,
    },
}

/// What to do now, and when to look again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The actions, fences first.
    pub actions: Vec<Action>,
    /// The earliest instant at which the plan may change without any
    /// input changing (a gate, a backoff, a probe, a fence time).
    pub wake: Option<Instant>,
}

impl Plan {
    fn wake_at(&mut self, t: Instant) {
        self.wake = Some(self.wake.map_or(t, |w| w.min(t)));
    }
}

/// Whether `a` is this rack's to run at its current epoch.
fn ours(a: &AppRecord, rack: &str) -> bool {
    a.running && a.owner.as_deref() == Some(rack)
}

/// Decide.
#[must_use]
pub fn plan(v: &View<'_>) -> Plan {
    let mut p = Plan::default();
    if let Some(f) = v.lease.fence_at(v.cfg) {
        if v.slots.values().any(|s| s.task.live()) && f > v.now {
            p.wake_at(f);
        }
    }
    // 1 and 2: what runs here and may not, or must restart.
    for (name, s) in v.slots {
        let live = matches!(
            s.task,
            Task::Starting | Task::Running | Task::Stopping { fenced: false }
        );
        if !live {
            continue;
        }
        let rec = v.field.apps.get(name);
        let mine = rec.is_some_and(|a| ours(a, v.rack) && a.epoch == s.epoch);
        // Running on: until the last grant that listed it ends (a move is
        // then handed over once the log shows it, not fenced because the
        // renewal's answer came first); starting needs more (step 4).
        let leased = v.lease.covers(name, s.epoch, v.now, v.cfg);
        if !leased {
            p.actions.push(Action::Fence {
                app: name.clone(),
                epoch: s.epoch,
            });
            continue;
        }
        if s.task == (Task::Stopping { fenced: false }) {
            continue;
        }
        if !mine {
            let grace = rec.map_or(ORPHAN_STOP_GRACE, |a| {
                Duration::from_millis(a.spec.stop_grace_ms)
            });
            p.actions.push(Action::Stop {
                app: name.clone(),
                epoch: s.epoch,
                grace,
                why: StopWhy::Unassigned,
            });
        } else if s.task == Task::Running && s.restart_due {
            let a = rec.expect("mine");
            p.actions.push(Action::Stop {
                app: name.clone(),
                epoch: s.epoch,
                grace: Duration::from_millis(a.spec.stop_grace_ms),
                why: StopWhy::Unhealthy,
            });
        }
    }

    for a in v.field.apps.values() {
        let name = &a.spec.name;
        let slot = v.slots.get(name);
        let live_here = slot.is_some_and(|s| s.task.live());
        if !ours(a, v.rack) {
            // 3. Handover and demotion, once nothing of it runs here.
            if !live_here && !v.chores.busy.contains(name) {
                if let Some(act) = chore(v, a, &mut p) {
                    p.actions.push(act);
                }
            }
            continue;
        }
        let same_epoch = slot.filter(|s| s.epoch == a.epoch);
        match same_epoch {
            Some(s) if s.task == Task::Running => {
                // 5. Probes and captures.
                follow_up(v, a, s, &mut p);
                continue;
            }
            Some(s) if s.task.live() || s.state == AppState::Failed => continue,
            None if live_here => continue, // the old epoch is still stopping
            _ => {}
        }
        // 4. Start.
        if let Some(t) = same_epoch.and_then(|s| s.not_before) {
            if v.now < t {
                p.wake_at(t);
                continue;
            }
        }
        if !v.lease.may_run(name, a.epoch, v.now, v.cfg) {
            continue;
        }
        match previous_owner_gone(v, a) {
            Gone::Yes => {}
            Gone::At(t) => {
                p.wake_at(t);
                continue;
            }
            Gone::No => continue,
        }
        if !dependencies_run(v.field, &a.spec) {
            continue;
        }
        p.actions.push(Action::Start {
            app: name.clone(),
            epoch: a.epoch,
        });
    }
    p
}

/// A handover or demotion due for `a` (not ours), if any.
fn chore(v: &View<'_>, a: &AppRecord, p: &mut Plan) -> Option<Action> {
    let owner = a.owner.as_deref()?;
    let name = &a.spec.name;
    let handing_over = a
        .transfer
        .as_ref()
        .is_some_and(|t| t.planned && t.from.as_deref() == Some(v.rack) && t.released.is_none());
    if handing_over {
        if let Some(t) = v.chores.retry_at.get(name).filter(|t| v.now < **t) {
            p.wake_at(*t);
            return None;
        }
        return Some(Action::HandOver {
            app: name.clone(),
            epoch: a.epoch,
            to: owner.to_owned(),
        });
    }
    // The new owner runs it on its own copy now: ours would only conflict
    // with its generations.
    let report = v
        .field
        .racks
        .get(owner)
        .filter(|r| r.apps.get(name).is_some_and(|x| x.epoch == a.epoch))?;
    let volumes: Vec<String> = a
        .spec
        .volume
        .iter()
        .map(|vol| vol.name.clone())
        .filter(|vol| report.volumes.contains_key(vol))
        .filter(|vol| {
            !v.chores
                .demoted
                .contains(&(name.clone(), a.epoch, vol.clone()))
        })
        .collect();
    let shipped = a
        .transfer
        .as_ref()
        .filter(|t| t.planned && t.from.as_deref() == Some(v.rack))
        .and_then(|t| t.released.clone())
        .unwrap_or_default();
    (!volumes.is_empty()).then(|| Action::Demote {
        app: name.clone(),
        epoch: a.epoch,
        volumes,
        shipped,
    })
}

/// Probes and captures of a running instance.
fn follow_up(v: &View<'_>, a: &AppRecord, s: &Slot, p: &mut Plan) {
    let name = &a.spec.name;
    if a.spec.health.is_some() && !s.probing && !s.restart_due {
        if v.now >= s.next_probe {
            p.actions.push(Action::Probe {
                app: name.clone(),
                epoch: s.epoch,
            });
        } else {
            p.wake_at(s.next_probe);
        }
    }
    if a.spec.driver == DriverKind::Qemu && !a.spec.volume.is_empty() && !s.capturing {
        if v.now >= s.next_capture {
            p.actions.push(Action::Capture {
                app: name.clone(),
                epoch: s.epoch,
            });
        } else {
            p.wake_at(s.next_capture);
        }
    }
}

enum Gone {
    Yes,
    /// Not before this instant (the lease gate).
    At(Instant),
    /// Waiting for something else (the released volumes to arrive).
    No,
}

/// Whether the previous owner of `a`'s current assignment has certainly
/// stopped it: it released it and we hold what it shipped, or its lease
/// has certainly expired. An assignment nobody held before needs neither.
fn previous_owner_gone(v: &View<'_>, a: &AppRecord) -> Gone {
    let from_elsewhere = a
        .transfer
        .as_ref()
        .and_then(|t| t.from.as_deref())
        .is_some_and(|f| f != v.rack);
    if !from_elsewhere && a.epoch <= 1 {
        return Gone::Yes;
    }
    if let Some(released) = a.transfer.as_ref().and_then(|t| t.released.as_ref()) {
        if from_elsewhere {
            let holds = released
                .iter()
                .all(|(vol, g)| v.held.get(vol).is_some_and(|h| h >= g));
            return if holds { Gone::Yes } else { Gone::No };
        }
    }
    // Unknown gate: wait a whole lease from now, as `LeaseWatch` does for
    // an epoch it never saw assigned.
    let gate = v
        .gates
        .get(&a.spec.name)
        .copied()
        .unwrap_or(v.now + v.cfg.lease + v.cfg.drift_margin);
    if v.now >= gate {
        Gone::Yes
    } else {
        Gone::At(gate)
    }
}

/// Whether everything `spec` starts `after` runs healthy somewhere, at
/// its current epoch.
fn dependencies_run(field: &FieldState, spec: &ApplianceSpec) -> bool {
    spec.after.iter().all(|d| {
        field.racks.values().any(|r| {
            r.apps.get(d).is_some_and(|x| {
                x.state == AppState::Running
                    && field.apps.get(d).is_some_and(|da| da.epoch == x.epoch)
            })
        })
    })
}

/// What a health probe result means for the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// It became healthy (first time: record the failover).
    Healthy {
        /// It was `starting` until now.
        first: bool,
    },
    /// Still fine / not yet judged.
    Unchanged,
    /// Restart it (the slot's `restart_due` is set).
    Restart,
}

/// Apply one probe result to `s`.
pub fn probed(
    s: &mut Slot,
    ok: bool,
    interval: Duration,
    start_grace: Duration,
    now: Instant,
    now_ms: u64,
) -> Probed {
    s.probing = false;
    s.next_probe = now + interval;
    if ok {
        s.unhealthy = 0;
        if s.state != AppState::Running {
            let first = s.state == AppState::Starting;
            s.set(AppState::Running, now_ms);
            return Probed::Healthy { first };
        }
        return Probed::Unchanged;
    }
    let starting = s.state == AppState::Starting;
    let grace_over = s
        .launched
        .is_some_and(|t| now.saturating_duration_since(t) > start_grace);
    if !starting {
        s.unhealthy += 1;
    }
    if (starting && grace_over) || s.unhealthy >= UNHEALTHY_LIMIT {
        s.restart_due = true;
        return Probed::Restart;
    }
    Probed::Unchanged
}

/// What the restart policy decided after an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Start again, not before this.
    Restart(Instant),
    /// Leave it stopped.
    Stopped,
    /// Leave it failed (policy said no, or too many restarts).
    Failed {
        /// Because it restarted too often.
        gave_up: bool,
    },
}

/// Apply `spec`'s restart policy to `s` after its instance ended (`failed`:
/// it exited with an error, failed to launch or was unhealthy).
pub fn after_exit(
    s: &mut Slot,
    spec: &ApplianceSpec,
    failed: bool,
    now: Instant,
    now_ms: u64,
) -> AfterExit {
    s.task = Task::Idle;
    s.launched = None;
    s.restart_due = false;
    s.probing = false;
    let window = Duration::from_secs(spec.restart.window_s);
    s.restarts
        .retain(|t| now.saturating_duration_since(*t) < window);
    let restart = match spec.restart.policy {
        RestartMode::Always => true,
        RestartMode::OnFailure => failed,
        RestartMode::Never => false,
    };
    if !restart {
        if failed {
            s.set(AppState::Failed, now_ms);
            return AfterExit::Failed { gave_up: false };
        }
        s.set(AppState::Stopped, now_ms);
        return AfterExit::Stopped;
    }
    if s.restarts.len() >= spec.restart.max_restarts as usize {
        s.set(AppState::Failed, now_ms);
        return AfterExit::Failed { gave_up: true };
    }
    s.restarts.push(now);
    let doublings = (s.restarts.len() as u32 - 1).min(BACKOFF_MAX_DOUBLINGS);
    let at = now + BACKOFF_BASE * (1 << doublings);
    s.not_before = Some(at);
    s.set(AppState::Stopped, now_ms);
    AfterExit::Restart(at)
}

#[cfg(test)]
mod tests;
