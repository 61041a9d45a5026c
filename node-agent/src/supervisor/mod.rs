//! The appliance supervisor: renews this rack's lease, and runs exactly the
//! appliances the control plane assigns here, only while the lease covers
//! them. It decides, then acts:
//!
//! - [`plan`]: the decisions, a pure function of the desired state, the
//!   lease, the start gates and what runs here (tested as a table and
//!   with properties).
//! - [`instance`]: each instance is owned by a task of its own holding its
//!   deadline, read straight from the lease the renewal loop publishes; the
//!   task fences the instance itself, so fencing never waits behind a
//!   lock, a transfer, a snapshot, a QMP call, a health probe or another
//!   appliance's stop.
//! - this file, the shell: the renewal loop (commits `Renew` with the
//!   rack's report every `renew_every` and publishes each grant to the
//!   instance tasks through a `watch` channel), and the loop that gathers
//!   the view, asks [`plan::plan`] and carries the actions out as tasks:
//!   an instance task per start (volume promotion, launch, supervision),
//!   handovers (final snapshot shipped, `Released`), demotions, health
//!   probes and QEMU captures each in a task of their own that reports
//!   back over one bounded channel. No lock is held across an await.
//! - `effects`: the tasks behind the actions that take time (an
//!   instance's life, a handover, a QEMU capture).
//! - [`order`]: shutdown stops appliances before those they start `after`.
//! - [`status`]: the rows of `status.appliances`.

mod cadence;
mod effects;
pub mod instance;
pub mod order;
pub mod plan;
pub mod status;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control::{AppReport, AppState, Command, Control, FieldState, Lease, RackReport, Response};
use deploy::appliance::ApplianceSpec;
use deploy::power::PowerStatus;
use deploy::Role;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use util::time::unix_ms;

use crate::drivers::{self, Capturer};
use crate::state::AgentState;
use crate::volumes::VolumeService;
use instance::{Ended, StopRequest};
use plan::{Action, AfterExit, Chores, Probed, Slot, StopWhy, Task, View};

pub use status::ApplianceStatus;

/// Longest the supervisor waits between two plans when nothing wakes it
/// (the plan names its own wake-ups; this bounds a missed one).
const TICK: Duration = Duration::from_millis(500);

/// Lease renewals in flight at once, at most. A renewal is waited for until
/// its fence time (`lease_ms − fence_before_ms` after it left: five renewal
/// periods by default), so about that many can be out over a link that
/// lost them; past this bound a period's renewal is skipped.
const MAX_RENEWALS_IN_FLIGHT: usize = 8;
/// Reports from tasks to the supervisor. Every task sends at most two
/// (an instance: launched, ended), and an appliance has at most four tasks
/// (instance, probe, capture, handover or demotion), so this holds the
/// reports of 64 appliances at once; a full queue only makes a task wait
/// after its work is done (an instance task reports *after* the stop).
const REPORT_QUEUE: usize = 256;
/// Grace of each appliance when the agent shuts down; independent
/// appliances stop together, so the agent's own shutdown deadline bounds
/// one grace per level of `after` dependency.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The supervisor.
pub struct Supervisor {
    rack: String,
    role: Role,
    site: String,
    capacity: (u32, u64),
    control: Arc<Control>,
    volumes: Arc<VolumeService>,
    power: watch::Receiver<PowerStatus>,
    events: AgentState,
    run_root: PathBuf,
    /// This rack's latest grant: written by the renewal loop only, read by
    /// every instance task (its deadline) and by the planner.
    lease: watch::Sender<Lease>,
    /// What this rack reports of its appliances (next renewal, status).
    reports: Mutex<BTreeMap<String, AppReport>>,
    /// A drill cut this rack's power: no renewal is sent or taken, so
    /// every instance is fenced at once and nothing starts.
    powered_off: std::sync::atomic::AtomicBool,
    /// When a renewal last committed (a majority of voters answered): the
    /// quorum override's proof that a majority is back. A leader named by
    /// the control plane is no proof: after a restart it is the one
    /// remembered from before.
    committed_at: std::sync::Mutex<Option<Instant>>,
    /// The proxy's share of the field's backhaul quota, asked for and
    /// granted with the renewals (set once, by the agent, if it runs a
    /// proxy).
    backhaul: std::sync::OnceLock<Arc<dyn BackhaulQuota>>,
}

/// What a task tells the supervisor.
#[derive(Debug)]
enum Report {
    Launched {
        app: String,
        epoch: u64,
        pid: u32,
        capturer: Option<Capturer>,
        volumes: BTreeMap<String, &'static str>,
        prepare_ms: u64,
    },
    NotLaunched {
        app: String,
        epoch: u64,
        error: String,
        /// Its volumes could not be prepared (retried, not a failure of
        /// the appliance).
        volumes: bool,
        /// Other racks hold its volumes and this one none: reported
        /// `failed`, so that placement moves it to a holder.
        stranded: bool,
    },
    Ended {
        app: String,
        epoch: u64,
        ended: Ended,
    },
    Probed {
        app: String,
        epoch: u64,
        result: Result<(), String>,
    },
    Captured {
        app: String,
    },
    HandedOver {
        app: String,
        ok: bool,
    },
    Demoted {
        app: String,
        epoch: u64,
        volumes: Vec<String>,
    },
}

/// The supervisor's hold on an instance task.
struct Handle {
    stop: watch::Sender<Option<StopRequest>>,
    task: JoinHandle<()>,
    capturer: Option<Capturer>,
}

impl Supervisor {
    /// A supervisor for this rack.
    #[allow(clippy::too_many_arguments)]
    #[must_use]
    pub fn new(
        rack: &str,
        role: Role,
        site: &str,
        capacity: (u32, u64),
        control: Arc<Control>,
        volumes: Arc<VolumeService>,
        power: watch::Receiver<PowerStatus>,
        events: AgentState,
        run_root: PathBuf,
    ) -> Arc<Self> {
        Arc::new(Self {
            rack: rack.to_owned(),
            role,
            site: site.to_owned(),
            capacity,
            control,
            volumes,
            power,
            events,
            run_root,
            lease: watch::Sender::new(Lease::default()),
            reports: Mutex::default(),
            powered_off: std::sync::atomic::AtomicBool::new(false),
            committed_at: std::sync::Mutex::new(None),
            backhaul: std::sync::OnceLock::new(),
        })
    }

    /// Carry `quota`'s asks with every renewal and hand it its grants.
    pub fn attach_backhaul(&self, quota: Arc<dyn BackhaulQuota>) {
        let _ = self.backhaul.set(quota);
    }

    /// Hands the proxy its grant of the field's quota as this rack's
    /// state machine has it.
    fn pass_backhaul_grant(&self) {
        if let Some(q) = self.backhaul.get() {
            let (day, granted) = {
                let state = self.control.state().borrow().clone();
                let l = &state.backhaul;
                (l.day, l.granted(&self.rack, l.day))
            };
            q.granted(day, granted);
        }
    }

    /// A drill's power cut (`true`) or its end: while cut, the lease is
    /// dropped (every instance task fences its instance at once: SIGTERM,
    /// SIGKILL after the fence grace) and no renewal is sent, so nothing
    /// runs or starts here, as on a rack without power. Afterwards the
    /// rack renews again and runs what is assigned to it then.
    pub fn set_powered_off(&self, off: bool) {
        use std::sync::atomic::Ordering;
        self.powered_off.store(off, Ordering::SeqCst);
        if off {
            // The grant goes, the renewal time stays: every instance is
            // fenced now, and its `appliance_fenced` event still says when
            // the lease would have ended (the drill report's "old lease
            // expired").
            self.lease.send_modify(|l| match l.sent_at() {
                Some(sent) => l.granted(sent, Vec::new()),
                None => *l = Lease::default(),
            });
        }
        tracing::warn!(powered_off = off, "drill power state");
    }

    fn is_powered_off(&self) -> bool {
        self.powered_off.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The control plane.
    #[must_use]
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Grant this rack, on its own authority, what its last applied field
    /// state assigns it, as if a renewal sent now had been granted: only
    /// for an operator's quorum override ([`crate::quorum_override`]),
    /// never otherwise. A committed renewal sent later replaces it.
    pub fn grant_locally(&self) {
        let grants = self.control.state().borrow().grants(&self.rack);
        let now = Instant::now();
        self.lease.send_modify(|l| l.granted(now, grants));
    }

    /// Whether a renewal committed within `within`: a majority of voters
    /// answered this rack lately.
    #[must_use]
    pub fn renewed_within(&self, within: std::time::Duration) -> bool {
        self.committed_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() <= within)
    }

    /// Run until `cancel`, then stop every appliance.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        if self.role == Role::Rack {
            if let Ok(dirs) = std::fs::read_dir(&self.run_root) {
                for d in dirs.flatten() {
                    if let Ok(Some(pgid)) = drivers::kill_leftover(&d.path()) {
                        tracing::warn!(dir = %d.path().display(), pgid, "killed an appliance left by an earlier agent");
                    }
                }
            }
        }
        let renew = tokio::spawn(self.clone().renew_loop(cancel.clone()));
        let (tx, mut rx) = mpsc::channel(REPORT_QUEUE);
        let mut shell = Shell {
            sup: self.clone(),
            slots: BTreeMap::new(),
            handles: BTreeMap::new(),
            chores: Chores::default(),
            pending_failover: BTreeMap::new(),
            last_error: BTreeMap::new(),
            tx,
        };
        let mut state_rx = self.control.state();
        let mut lease_rx = self.lease.subscribe();
        let (mut state_open, mut lease_open) = (true, true);
        let mut wake = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(r) = rx.recv() => shell.on_report(r),
                () = tokio::time::sleep_until(wake) => {}
                r = state_rx.changed(), if state_open => state_open = r.is_ok(),
                r = lease_rx.changed(), if lease_open => lease_open = r.is_ok(),
            }
            while let Ok(r) = rx.try_recv() {
                shell.on_report(r);
            }
            let next = if self.role == Role::Rack {
                shell.round().await
            } else {
                None
            };
            let now = Instant::now();
            let next = next.map_or(now + TICK, |t| t.clamp(now, now + TICK));
            wake = next.into();
        }
        shell.shutdown(&mut rx).await;
        let _ = renew.await;
    }

    async fn report(&self) -> RackReport {
        let (cpus, memory_mb) = self.capacity;
        let (power_dying, power_source) = {
            let p = self.power.borrow();
            (p.dying, p.source)
        };
        let free_bytes = if self.role == Role::Rack {
            let dir = self.volumes.store_root().to_path_buf();
            tokio::task::spawn_blocking(move || free_bytes(&dir))
                .await
                .ok()
                .flatten()
        } else {
            None
        };
        RackReport {
            role: self.role,
            site: self.site.clone(),
            cpus,
            memory_mb,
            power_dying,
            power_source: Some(power_source),
            free_bytes,
            volumes: if self.role == Role::Rack {
                self.volumes.held_generations().await
            } else {
                BTreeMap::new()
            },
            apps: self.reports.lock().expect("reports lock").clone(),
            at_ms: unix_ms(),
            backhaul: self.backhaul.get().and_then(|q| q.ask()),
        }
    }

    /// Renew every `renew_every` (every [`cadence::idle_every`] while the
    /// rack has nothing to run or tell: [`cadence`]), each renewal on its own: one that is slow
    /// (a satellite hop) or lost (a dropped packet, a fade) does not hold
    /// back the next, which leaves on time. Each grant goes straight to the
    /// instance tasks (a `watch` write: nothing awaited); a grant answered
    /// after a newer one is ignored ([`Lease::granted`]). A renewal that
    /// fails or is late changes no deadline, and one is waited for only
    /// until its own fence time, after which its grant could extend
    /// nothing.
    async fn renew_loop(self: Arc<Self>, cancel: CancellationToken) {
        let cfg = self.control.lease_config();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_RENEWALS_IN_FLIGHT));
        let mut renewals = tokio::task::JoinSet::new();
        let idle_every = cadence::idle_every(&cfg);
        let mut cadence = cadence::Cadence::default();
        let mut next = Instant::now();
        loop {
            while renewals.try_join_next().is_some() {}
            let report = if self.is_powered_off() {
                None
            } else {
                let report = self.report().await;
                let assigned = !self.control.state().borrow().grants(&self.rack).is_empty();
                let granted_sent = self.lease.borrow().sent_at();
                let now = Instant::now();
                cadence
                    .due(
                        now,
                        &report,
                        assigned,
                        granted_sent,
                        cfg.renew_every,
                        idle_every,
                    )
                    .then_some(report)
            };
            match report.map(|r| (r, slots.clone().try_acquire_owned())) {
                None => {}
                Some((report, Ok(slot))) => {
                    let sent = Instant::now();
                    cadence.sent(sent, report.clone());
                    let me = self.clone();
                    renewals.spawn(async move {
                        let _slot = slot;
                        let cmd = Command::Renew {
                            rack: me.rack.clone(),
                            report,
                        };
                        let useful_for = cfg.lease.saturating_sub(cfg.fence_before);
                        match me.control.propose(cmd, useful_for).await {
                            Ok(Response::Granted(g)) if !me.is_powered_off() => {
                                *me.committed_at
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                                    Some(Instant::now());
                                me.lease.send_modify(|l| l.granted(sent, g));
                                me.pass_backhaul_grant();
                            }
                            Ok(Response::Granted(_)) => {}
                            Ok(other) => tracing::warn!(?other, "unexpected renewal answer"),
                            Err(e) => tracing::debug!(error = %e, "lease renewal failed"),
                        }
                    });
                }
                Some((_, Err(_))) => tracing::debug!("every renewal slot busy; skipping one"),
            }
            next = (next + cfg.renew_every).max(Instant::now());
            tokio::select! {
                () = cancel.cancelled() => {
                    renewals.abort_all();
                    return;
                }
                () = tokio::time::sleep_until(next.into()) => {}
            }
        }
    }

    fn event(&self, kind: &str, detail: serde_json::Value) {
        if let Err(e) = self.events.record_event(kind, detail) {
            tracing::warn!(error = %e, "could not record an event");
        }
    }

    /// `status.appliances`.
    pub fn status(&self) -> Vec<ApplianceStatus> {
        let state = self.control.state().borrow().clone();
        let local = self.reports.lock().expect("reports lock").clone();
        status::rows(&state, &self.rack, &local, unix_ms())
    }

    /// Whether this rack owns `volume`'s live image; a registry that
    /// cannot be read counts as not owning it (nothing is shipped or
    /// demoted), and says so in the log.
    async fn owns(&self, volume: &str) -> bool {
        match self.volumes.owns(volume).await {
            Ok(owned) => owned,
            Err(e) => {
                tracing::warn!(%volume, error = %e, "cannot tell whether this rack owns the volume");
                false
            }
        }
    }
}

/// The field's backhaul quota as the renewals carry it: what this rack's
/// uplink used and asks for, and what the field granted it
/// ([`control::backhaul`]).
pub trait BackhaulQuota: Send + Sync {
    /// The ask for the next renewal; `None`: nothing to ask.
    fn ask(&self) -> Option<control::backhaul::BackhaulUse>;
    /// The grant for UTC day `day` (`None`: none for that day).
    fn granted(&self, day: u64, granted: Option<u64>);
}

/// The supervisor loop's own state: owned by that loop alone, never
/// shared, so it needs no lock.
struct Shell {
    sup: Arc<Supervisor>,
    slots: BTreeMap<String, Slot>,
    handles: BTreeMap<String, Handle>,
    chores: Chores,
    /// Failover timings to record once the appliance is healthy.
    pending_failover: BTreeMap<String, serde_json::Value>,
    /// Why each appliance last failed to start (events only once).
    last_error: BTreeMap<String, String>,
    tx: mpsc::Sender<Report>,
}

impl Shell {
    /// One plan, carried out. Returns when to plan again.
    async fn round(&mut self) -> Option<Instant> {
        let sup = self.sup.clone();
        let field: Arc<FieldState> = sup.control.state().borrow().clone();
        let cfg = sup.control.lease_config();
        let lease = sup.lease.borrow().clone();
        let gates: BTreeMap<String, Instant> = {
            let leases = sup.control.leases();
            let leases = leases.lock().expect("lease watch");
            field
                .apps
                .values()
                .map(|a| (a.spec.name.clone(), leases.gate(&a.spec.name, a.epoch)))
                .collect()
        };
        // Held generations matter only to a start waiting for a release.
        let waits_for_release = field.apps.values().any(|a| {
            a.running
                && a.owner.as_deref() == Some(sup.rack.as_str())
                && a.transfer.as_ref().is_some_and(|t| t.released.is_some())
                && !self.slots.get(&a.spec.name).is_some_and(|s| s.task.live())
        });
        let held = if waits_for_release {
            sup.volumes.held_generations().await
        } else {
            BTreeMap::new()
        };
        let now = Instant::now();
        let p = plan::plan(&View {
            now,
            rack: &sup.rack,
            cfg: &cfg,
            lease: &lease,
            field: &field,
            gates: &gates,
            held: &held,
            slots: &self.slots,
            chores: &self.chores,
            capture_every: sup.volumes.snapshot_interval(),
        });
        for action in p.actions {
            self.act(action, &field, now);
        }
        self.publish();
        p.wake
    }

    fn act(&mut self, action: Action, field: &FieldState, now: Instant) {
        let sup = self.sup.clone();
        let cfg = sup.control.lease_config();
        match action {
            Action::Fence { app, epoch } => {
                tracing::warn!(appliance = %app, epoch, "lease does not cover it: fencing");
                self.ask_stop(
                    &app,
                    StopRequest {
                        grace: cfg.fence_grace,
                        why: StopWhy::Fence,
                    },
                );
            }
            Action::Stop {
                app,
                epoch,
                grace,
                why,
            } => {
                tracing::info!(appliance = %app, epoch, ?why, "stopping");
                self.ask_stop(&app, StopRequest { grace, why });
            }
            Action::Start { app, epoch } => {
                let Some(rec) = field.apps.get(&app) else {
                    return;
                };
                let slot = self
                    .slots
                    .entry(app.clone())
                    .or_insert_with(|| Slot::new(epoch, now, unix_ms()));
                if slot.epoch != epoch {
                    *slot = Slot::new(epoch, now, unix_ms());
                }
                slot.task = Task::Starting;
                slot.not_before = None;
                let (stop_tx, stop_rx) = watch::channel(None);
                let task = tokio::spawn(effects::run_instance(
                    sup.clone(),
                    rec.spec.clone(),
                    epoch,
                    stop_rx,
                    self.tx.clone(),
                ));
                self.handles.insert(
                    app,
                    Handle {
                        stop: stop_tx,
                        task,
                        capturer: None,
                    },
                );
            }
            Action::HandOver { app, epoch, to } => {
                let Some(rec) = field.apps.get(&app) else {
                    return;
                };
                self.chores.busy.insert(app.clone());
                let spec = rec.spec.clone();
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let ok = effects::hand_over(&sup, &spec, epoch, &to).await;
                    let _ = tx.send(Report::HandedOver { app, ok }).await;
                });
            }
            Action::Demote {
                app,
                epoch,
                volumes,
                shipped,
            } => {
                self.chores.busy.insert(app.clone());
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    for v in &volumes {
                        if sup.owns(v).await {
                            if let Err(e) = sup.volumes.demote(v, shipped.get(v).copied()).await {
                                tracing::warn!(volume = %v, error = %e, "demote failed");
                            }
                        }
                    }
                    let _ = tx
                        .send(Report::Demoted {
                            app,
                            epoch,
                            volumes,
                        })
                        .await;
                });
            }
            Action::Probe { app, epoch } => {
                let Some(h) = field.apps.get(&app).and_then(|a| a.spec.health.clone()) else {
                    return;
                };
                if let Some(s) = self.slots.get_mut(&app) {
                    s.probing = true;
                }
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let result = drivers::check_health(&h).await;
                    let _ = tx.send(Report::Probed { app, epoch, result }).await;
                });
            }
            Action::Capture { app, epoch: _ } => {
                let (Some(rec), Some(capturer)) = (
                    field.apps.get(&app),
                    self.handles.get(&app).and_then(|h| h.capturer.clone()),
                ) else {
                    return;
                };
                if let Some(s) = self.slots.get_mut(&app) {
                    s.capturing = true;
                    s.next_capture = now + sup.volumes.snapshot_interval();
                }
                let spec = rec.spec.clone();
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    effects::capture(&sup, &spec, &capturer).await;
                    let _ = tx.send(Report::Captured { app }).await;
                });
            }
        }
    }

    fn ask_stop(&mut self, app: &str, req: StopRequest) {
        if let Some(h) = self.handles.get(app) {
            h.stop.send_replace(Some(req));
        }
        if let Some(s) = self.slots.get_mut(app) {
            s.task = Task::Stopping {
                fenced: req.why == StopWhy::Fence,
            };
        }
    }

    /// The slot of `app` if it is at `epoch`.
    fn slot(&mut self, app: &str, epoch: u64) -> Option<&mut Slot> {
        self.slots.get_mut(app).filter(|s| s.epoch == epoch)
    }

    fn spec(&self, app: &str) -> Option<ApplianceSpec> {
        self.sup
            .control
            .state()
            .borrow()
            .apps
            .get(app)
            .map(|a| a.spec.clone())
    }

    fn on_report(&mut self, r: Report) {
        let sup = self.sup.clone();
        let now = Instant::now();
        match r {
            Report::Launched {
                app,
                epoch,
                pid,
                capturer,
                volumes,
                prepare_ms,
            } => {
                if let Some(h) = self.handles.get_mut(&app) {
                    h.capturer = capturer;
                }
                let spec = self.spec(&app);
                let Some(s) = self.slot(&app, epoch) else {
                    return;
                };
                if s.task == Task::Starting {
                    s.launched(now, unix_ms());
                    s.next_capture = now + sup.volumes.snapshot_interval();
                }
                tracing::info!(appliance = %app, epoch, pid, ?volumes, "appliance started");
                sup.event(
                    "appliance_started",
                    serde_json::json!({"appliance": app, "epoch": epoch, "pid": pid}),
                );
                self.last_error.remove(&app);
                let field = sup.control.state().borrow().clone();
                if let Some(t) = field
                    .apps
                    .get(&app)
                    .and_then(|a| a.transfer.as_ref())
                    .filter(|t| t.from.is_some() && t.from.as_deref() != Some(sup.rack.as_str()))
                {
                    self.pending_failover.insert(
                        app.clone(),
                        serde_json::json!({
                            "appliance": app,
                            "epoch": epoch,
                            "from": t.from,
                            "to": sup.rack,
                            "reason": t.reason,
                            "tier": spec.as_ref().map(|s| s.tier),
                            "detected_ms": t.detected_ms,
                            "decided_ms": t.decided_ms,
                            "started_ms": unix_ms(),
                            "volumes": volumes,
                            "prepare_ms": prepare_ms,
                        }),
                    );
                }
                if spec.is_some_and(|s| s.health.is_none()) {
                    if let Some(s) = self.slot(&app, epoch) {
                        if s.task == Task::Running {
                            s.set(AppState::Running, unix_ms());
                            self.healthy(&app);
                        }
                    }
                }
            }
            Report::NotLaunched {
                app,
                epoch,
                error,
                volumes,
                stranded,
            } => {
                self.handles.remove(&app);
                if self.last_error.get(&app) != Some(&error) {
                    tracing::error!(appliance = %app, %error, "cannot start");
                    sup.event(
                        "appliance_start_failed",
                        serde_json::json!({"appliance": app, "error": error}),
                    );
                    self.last_error.insert(app.clone(), error);
                }
                let spec = self.spec(&app);
                let Some(s) = self.slot(&app, epoch) else {
                    return;
                };
                let stopped = matches!(s.task, Task::Stopping { .. });
                s.task = Task::Idle;
                if stranded {
                    s.set(AppState::Failed, unix_ms());
                }
                if volumes || stopped {
                    s.not_before = Some(now + plan::RETRY_AFTER);
                } else if let Some(spec) = spec {
                    self.after_exit(&app, epoch, &spec, true);
                }
            }
            Report::Ended { app, epoch, ended } => {
                self.handles.remove(&app);
                let exit = ended.exit;
                let spec = self.spec(&app);
                let kind = match ended.stopped {
                    Some(StopWhy::Fence) => "appliance_fenced",
                    Some(_) => "appliance_stopped",
                    None => "appliance_exited",
                };
                tracing::warn!(appliance = %app, epoch, ?exit, why = ?ended.stopped, lease_left_ms = ?ended.lease_left_ms, "appliance ended");
                sup.event(
                    kind,
                    serde_json::json!({
                        "appliance": app,
                        "epoch": epoch,
                        "code": exit.code,
                        "signal": exit.signal,
                        "why": ended.stopped.map(|w| format!("{w:?}").to_lowercase()),
                        "lease_left_ms": ended.lease_left_ms,
                    }),
                );
                let Some(s) = self.slot(&app, epoch) else {
                    return;
                };
                s.task = Task::Idle;
                s.probing = false;
                match ended.stopped {
                    Some(StopWhy::Fence) => s.set(AppState::Fenced, unix_ms()),
                    Some(StopWhy::Unassigned | StopWhy::Shutdown) => {
                        s.set(AppState::Stopped, unix_ms());
                    }
                    Some(StopWhy::Unhealthy) | None => {
                        let failed = ended.stopped.is_some() || !exit.success();
                        if let Some(spec) = spec {
                            self.after_exit(&app, epoch, &spec, failed);
                        }
                    }
                }
            }
            Report::Probed { app, epoch, result } => {
                let Some(spec) = self.spec(&app) else { return };
                let Some(h) = spec.health.as_ref() else {
                    return;
                };
                let Some(s) = self.slot(&app, epoch) else {
                    return;
                };
                if s.task != Task::Running {
                    s.probing = false;
                    return;
                }
                let verdict = plan::probed(
                    s,
                    result.is_ok(),
                    Duration::from_millis(h.interval_ms),
                    Duration::from_millis(h.start_grace_ms),
                    now,
                    unix_ms(),
                );
                match verdict {
                    Probed::Healthy { .. } => self.healthy(&app),
                    Probed::Restart => {
                        tracing::warn!(appliance = %app, why = ?result.err(), "unhealthy; restarting");
                    }
                    Probed::Unchanged => {}
                }
            }
            Report::Captured { app } => {
                if let Some(s) = self.slots.get_mut(&app) {
                    s.capturing = false;
                }
            }
            Report::HandedOver { app, ok } => {
                self.chores.busy.remove(&app);
                if ok {
                    self.chores.retry_at.remove(&app);
                } else {
                    self.chores.retry_at.insert(app, now + plan::RETRY_AFTER);
                }
            }
            Report::Demoted {
                app,
                epoch,
                volumes,
            } => {
                self.chores.busy.remove(&app);
                for v in volumes {
                    self.chores.demoted.insert((app.clone(), epoch, v));
                }
            }
        }
        self.publish();
    }

    fn after_exit(&mut self, app: &str, epoch: u64, spec: &ApplianceSpec, failed: bool) {
        let Some(s) = self.slot(app, epoch) else {
            return;
        };
        match plan::after_exit(s, spec, failed, Instant::now(), unix_ms()) {
            AfterExit::Failed { gave_up: true } => {
                let restarts = s.restarts.len();
                tracing::error!(appliance = %app, "restarted too often; giving up");
                self.sup.event(
                    "appliance_failed",
                    serde_json::json!({"appliance": app, "restarts": restarts}),
                );
            }
            AfterExit::Restart(_) | AfterExit::Stopped | AfterExit::Failed { .. } => {}
        }
    }

    /// The appliance became healthy: record a pending failover.
    fn healthy(&mut self, app: &str) {
        if let Some(mut ev) = self.pending_failover.remove(app) {
            ev["healthy_ms"] = serde_json::json!(unix_ms());
            if let (Some(d), Some(h)) = (
                ev["detected_ms"].as_u64().or(ev["decided_ms"].as_u64()),
                ev["healthy_ms"].as_u64(),
            ) {
                ev["detected_to_healthy_ms"] = serde_json::json!(h.saturating_sub(d));
            }
            tracing::info!(appliance = %app, event = %ev, "failover complete");
            self.sup.event("failover", ev);
        }
    }

    /// Publish the appliance reports (next renewal, status).
    fn publish(&self) {
        let reports: BTreeMap<String, AppReport> = self
            .slots
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    AppReport {
                        epoch: s.epoch,
                        state: s.state,
                        since_ms: s.since_ms,
                    },
                )
            })
            .collect();
        *self.sup.reports.lock().expect("reports lock") = reports;
    }

    /// Stop every instance, dependents first: each wave of
    /// [`order::stop_waves`] is asked to stop at once, each instance within
    /// its grace, and the next wave starts when all of this one are down.
    async fn shutdown(mut self, rx: &mut mpsc::Receiver<Report>) {
        let field = self.sup.control.state().borrow().clone();
        let live: Vec<String> = self.handles.keys().cloned().collect();
        let after = |name: &str| {
            field
                .apps
                .get(name)
                .map(|a| a.spec.after.clone())
                .unwrap_or_default()
        };
        for wave in order::stop_waves(&live, after) {
            let mut tasks = Vec::new();
            for name in wave {
                let Some(h) = self.handles.remove(&name) else {
                    continue;
                };
                tracing::info!(appliance = %name, "stopping for shutdown");
                h.stop.send_replace(Some(StopRequest {
                    grace: SHUTDOWN_GRACE,
                    why: StopWhy::Shutdown,
                }));
                tasks.push(h.task);
            }
            let mut all = futures::future::join_all(tasks);
            loop {
                tokio::select! {
                    _ = &mut all => break,
                    Some(r) = rx.recv() => self.on_report(r),
                }
            }
        }
        while let Ok(r) = rx.try_recv() {
            self.on_report(r);
        }
    }
}

/// Bytes an unprivileged writer may still put on the filesystem holding
/// `dir` (statvfs: available blocks × fragment size), for the report that
/// replica placement reads; none if it cannot be read.
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}
