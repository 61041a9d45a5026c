//! The appliance supervisor: renews this rack's lease, and runs exactly the
//! appliances the control plane assigns here, only while the lease covers
//! them.
//!
//! - **Renewal**: every `renew_every` the rack commits `Renew` with its
//!   report (capacity, power, volume generations, appliance states); the
//!   answer lists the `(appliance, epoch)` pairs its lease covers.
//! - **Fencing**: an instance keeps running only while the latest granted
//!   renewal lists it at its epoch and the lease has more than
//!   `fence_before` left; otherwise it is stopped at once (`fenced`).
//! - **Starting**: an assigned appliance starts once the lease covers it,
//!   its dependencies are healthy somewhere, and the previous owner has
//!   certainly stopped: it released the appliance (planned handover), or
//!   its lease has certainly expired (the gate from `LeaseWatch`).
//! - **Handover**: when an appliance this rack runs is assigned elsewhere
//!   by a planned transfer (move, power), this rack stops it, ships a
//!   final snapshot of its volumes to the new owner and commits `Released`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control::{AppReport, AppState, Command, Control, FieldState, Lease, RackReport, Response};
use deploy::appliance::{ApplianceSpec, RestartMode};
use deploy::power::PowerStatus;
use deploy::Role;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use util::time::unix_ms;

use crate::drivers::{self, Instance, LaunchSpec};
use crate::state::AgentState;
use crate::volumes::VolumeEngine;

/// How often the supervisor reconciles when nothing wakes it.
const TICK: Duration = Duration::from_millis(200);
/// Stop grace when fencing (the lease is about to end).
const FENCE_GRACE: Duration = Duration::from_millis(1500);
/// Unhealthy checks in a row before a running appliance is restarted.
const UNHEALTHY_LIMIT: u32 = 3;

/// One appliance on this rack.
/// The order to stop `running` appliances in: every appliance before the
/// ones it starts `after` (a web app before its database), so nothing
/// loses what it depends on while it still runs. Names outside `running`
/// are ignored; a cycle (refused at deploy) falls back to name order.
fn stop_order(running: &[String], after: impl Fn(&str) -> Vec<String>) -> Vec<String> {
    let set: BTreeSet<&str> = running.iter().map(String::as_str).collect();
    // Dependents of each appliance among the running ones.
    let mut dependents: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for name in &set {
        for dep in after(name) {
            if let Some(d) = set.get(dep.as_str()) {
                dependents.entry(d).or_default().insert(name);
            }
        }
    }
    let mut order = Vec::new();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    while done.len() < set.len() {
        // Those whose dependents have all stopped; if none (a cycle), the
        // first left.
        let ready: Vec<&str> = set
            .iter()
            .filter(|n| !done.contains(*n))
            .filter(|n| {
                dependents
                    .get(*n)
                    .is_none_or(|ds| ds.iter().all(|d| done.contains(d)))
            })
            .copied()
            .collect();
        let next = if ready.is_empty() {
            set.iter()
                .copied()
                .filter(|n| !done.contains(n))
                .take(1)
                .collect()
        } else {
            ready
        };
        for n in next {
            done.insert(n);
            order.push(n.to_owned());
        }
    }
    order
}

struct Local {
    epoch: u64,
    inst: Option<Instance>,
    state: AppState,
    since_ms: u64,
    launched: Option<Instant>,
    next_check: Instant,
    unhealthy: u32,
    restarts: Vec<Instant>,
    /// Failover timings to record once healthy.
    pending_event: Option<serde_json::Value>,
    /// Why it last failed to start (shown in events).
    last_error: Option<String>,
    /// When its volumes were last captured through QEMU.
    last_capture: Instant,
}

impl Local {
    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            inst: None,
            state: AppState::Stopped,
            since_ms: unix_ms(),
            launched: None,
            next_check: Instant::now(),
            unhealthy: 0,
            restarts: Vec::new(),
            pending_event: None,
            last_error: None,
            last_capture: Instant::now(),
        }
    }

    fn set(&mut self, s: AppState) {
        if self.state != s {
            self.state = s;
            self.since_ms = unix_ms();
        }
    }
}

/// One row of `status.appliances`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ApplianceStatus {
    /// Name.
    pub name: String,
    /// The rack holding its assignment.
    pub owner: Option<String>,
    /// `running`, `starting`, `stopped`, `failed` or `fenced`.
    pub state: String,
    /// Tier.
    pub tier: u8,
    /// Assignment epoch.
    pub epoch: u64,
    /// Seconds in this state (as its owner reports it).
    pub since_s: Option<f64>,
    /// How the owner got it (`failover`, `power`, `move`...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The supervisor.
pub struct Appliances {
    rack: String,
    role: Role,
    site: String,
    capacity: (u32, u64),
    control: Arc<Control>,
    volumes: Arc<VolumeEngine>,
    power: watch::Receiver<PowerStatus>,
    events: AgentState,
    run_root: PathBuf,
    lease: Mutex<Lease>,
    local: tokio::sync::Mutex<HashMap<String, Local>>,
    reports: Mutex<BTreeMap<String, AppReport>>,
    wake: Notify,
}

impl Appliances {
    /// A supervisor for this rack.
    #[allow(clippy::too_many_arguments)]
    #[must_use]
    pub fn new(
        rack: &str,
        role: Role,
        site: &str,
        capacity: (u32, u64),
        control: Arc<Control>,
        volumes: Arc<VolumeEngine>,
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
            lease: Mutex::default(),
            local: tokio::sync::Mutex::default(),
            reports: Mutex::default(),
            wake: Notify::new(),
        })
    }

    /// The control plane.
    #[must_use]
    pub fn control(&self) -> &Arc<Control> {
        &self.control
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
        let mut state_rx = self.control.state();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(TICK) => {}
                _ = self.wake.notified() => {}
                _ = state_rx.changed() => {}
            }
            if self.role == Role::Rack {
                self.reconcile().await;
            }
        }
        let _ = renew.await;
        let state = self.control.state().borrow().clone();
        let mut local = self.local.lock().await;
        let running: Vec<String> = local
            .iter()
            .filter(|(_, l)| l.inst.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        let after = |name: &str| {
            state
                .apps
                .get(name)
                .map(|a| a.spec.after.clone())
                .unwrap_or_default()
        };
        for name in stop_order(&running, after) {
            if let Some(mut inst) = local.get_mut(&name).and_then(|l| l.inst.take()) {
                tracing::info!(appliance = %name, "stopping for shutdown");
                inst.stop(Duration::from_secs(2)).await;
            }
        }
    }

    async fn report(&self) -> RackReport {
        let (cpus, memory_mb) = self.capacity;
        let power_dying = self.power.borrow().dying;
        RackReport {
            role: self.role,
            site: self.site.clone(),
            cpus,
            memory_mb,
            power_dying,
            volumes: if self.role == Role::Rack {
                self.volumes.held_generations().await
            } else {
                BTreeMap::new()
            },
            apps: self.reports.lock().expect("reports lock").clone(),
            at_ms: unix_ms(),
        }
    }

    async fn renew_loop(self: Arc<Self>, cancel: CancellationToken) {
        let cfg = self.control.lease_config();
        loop {
            let report = self.report().await;
            let sent = Instant::now();
            let cmd = Command::Renew {
                rack: self.rack.clone(),
                report,
            };
            match self.control.propose(cmd, cfg.renew_every * 2).await {
                Ok(Response::Granted(g)) => {
                    self.lease.lock().expect("lease lock").granted(sent, g);
                    self.wake.notify_one();
                }
                Ok(other) => tracing::warn!(?other, "unexpected renewal answer"),
                Err(e) => tracing::debug!(error = %e, "lease renewal failed"),
            }
            let next = sent + cfg.renew_every;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(next.into()) => {}
            }
        }
    }

    fn event(&self, kind: &str, detail: serde_json::Value) {
        if let Err(e) = self.events.record_event(kind, detail) {
            tracing::warn!(error = %e, "could not record an event");
        }
    }

    /// Bring what runs here in line with the desired state and the lease.
    async fn reconcile(&self) {
        let state: Arc<FieldState> = self.control.state().borrow().clone();
        let cfg = self.control.lease_config();
        let lease = self.lease.lock().expect("lease lock").clone();
        let mut local = self.local.lock().await;

        // 1. Stop what may not run any more.
        let names: Vec<String> = local.keys().cloned().collect();
        for name in &names {
            let l = local.get_mut(name).expect("listed");
            if l.inst.is_none() {
                continue;
            }
            let rec = state.apps.get(name);
            let ours = rec.is_some_and(|a| {
                a.running && a.owner.as_deref() == Some(self.rack.as_str()) && a.epoch == l.epoch
            });
            let leased = lease.may_run(name, l.epoch, Instant::now(), &cfg);
            if ours && leased {
                continue;
            }
            let mut inst = l.inst.take().expect("checked");
            let grace = match rec {
                Some(a) if ours => FENCE_GRACE.min(Duration::from_millis(a.spec.stop_grace_ms)),
                Some(a) => Duration::from_millis(a.spec.stop_grace_ms),
                None => Duration::from_secs(3),
            };
            let exit = inst.stop(grace).await;
            let fenced = ours && !leased;
            l.set(if fenced {
                AppState::Fenced
            } else {
                AppState::Stopped
            });
            if let Some(a) = rec {
                for v in &a.spec.volume {
                    self.volumes.set_pause_hooks(&v.name, None);
                    self.volumes.set_external_capture(&v.name, false);
                }
            }
            tracing::warn!(appliance = %name, epoch = l.epoch, fenced, ?exit, "appliance stopped");
            self.event(
                if fenced { "appliance_fenced" } else { "appliance_stopped" },
                serde_json::json!({"appliance": name, "epoch": l.epoch, "code": exit.code, "signal": exit.signal}),
            );
        }

        // 2. Hand over what a planned transfer takes away from us; give up
        //    volumes another rack now owns.
        for a in state.apps.values() {
            let Some(owner) = a.owner.as_deref().filter(|o| *o != self.rack) else {
                continue;
            };
            let running_here = local.get(&a.spec.name).is_some_and(|l| l.inst.is_some());
            if running_here {
                continue;
            }
            let handing_over = a.transfer.as_ref().is_some_and(|t| {
                t.planned && t.from.as_deref() == Some(self.rack.as_str()) && t.released.is_none()
            });
            if handing_over {
                self.hand_over(a.spec.clone(), a.epoch, owner).await;
                continue;
            }
            // The new owner runs it on its own copy now: ours would only
            // conflict with its generations.
            let Some(report) = state
                .racks
                .get(owner)
                .filter(|r| r.apps.get(&a.spec.name).is_some_and(|x| x.epoch == a.epoch))
            else {
                continue;
            };
            for v in &a.spec.volume {
                let owned_here = self.volumes.store.owns(&v.name).unwrap_or(false);
                if owned_here && report.volumes.contains_key(&v.name) {
                    if let Err(e) = self.volumes.demote(&v.name).await {
                        tracing::warn!(volume = %v.name, error = %e, "demote failed");
                    }
                }
            }
        }

        // 3. Reap exits, check health, apply restart policies.
        let now = Instant::now();
        for (name, l) in local.iter_mut() {
            let Some(a) = state.apps.get(name) else {
                continue;
            };
            let Some(inst) = l.inst.as_mut() else {
                continue;
            };
            if let Some(exit) = inst.try_wait() {
                l.inst = None;
                let failed = !exit.success();
                tracing::warn!(appliance = %name, ?exit, "appliance exited");
                self.event(
                    "appliance_exited",
                    serde_json::json!({"appliance": name, "epoch": l.epoch, "code": exit.code, "signal": exit.signal}),
                );
                self.after_exit(l, &a.spec, failed);
                continue;
            }
            if now < l.next_check {
                continue;
            }
            let Some(h) = a.spec.health.as_ref() else {
                if l.state == AppState::Starting {
                    l.set(AppState::Running);
                    self.healthy(name, l);
                }
                continue;
            };
            l.next_check = now + Duration::from_millis(h.interval_ms);
            match drivers::check_health(h).await {
                Ok(()) => {
                    l.unhealthy = 0;
                    if l.state != AppState::Running {
                        l.set(AppState::Running);
                        self.healthy(name, l);
                    }
                }
                Err(why) => {
                    let starting = l.state == AppState::Starting;
                    let grace_over = l
                        .launched
                        .is_some_and(|t| t.elapsed() > Duration::from_millis(h.start_grace_ms));
                    if !starting {
                        l.unhealthy += 1;
                    }
                    if (starting && grace_over) || l.unhealthy >= UNHEALTHY_LIMIT {
                        tracing::warn!(appliance = %name, %why, "unhealthy; restarting");
                        let mut inst = l.inst.take().expect("checked");
                        inst.stop(Duration::from_millis(a.spec.stop_grace_ms)).await;
                        self.after_exit(l, &a.spec, true);
                    }
                }
            }
        }

        // QEMU appliances: point-in-time copies made by QEMU itself
        // (drive-backup over QMP), so the VM is never paused for a snapshot.
        let every = self.volumes.snapshot_interval();
        for (name, l) in local.iter_mut() {
            let Some(a) = state.apps.get(name) else {
                continue;
            };
            let Some(inst) = l.inst.as_ref() else {
                continue;
            };
            if a.spec.driver != deploy::appliance::DriverKind::Qemu
                || l.last_capture.elapsed() < every
            {
                continue;
            }
            l.last_capture = Instant::now();
            for v in &a.spec.volume {
                let dest = self
                    .run_root
                    .join(name)
                    .join(format!("capture-{}.raw", v.name));
                let r = match inst.capture(&v.name, &dest).await {
                    Ok(true) => self
                        .volumes
                        .snapshot_from(&v.name, dest.clone())
                        .await
                        .map(|m| m.generation)
                        .map_err(|e| e.to_string()),
                    Ok(false) => Err("driver cannot capture".into()),
                    Err(e) => Err(e.to_string()),
                };
                let _ = std::fs::remove_file(&dest);
                match r {
                    Ok(g) => {
                        tracing::info!(volume = %v.name, generation = g, "captured through QMP")
                    }
                    Err(e) => tracing::warn!(volume = %v.name, error = %e, "QMP capture failed"),
                }
            }
        }

        // 4. Start what is ours, leased, released and whose dependencies run.
        let now = Instant::now();
        for a in state.apps.values() {
            if !(a.running && a.owner.as_deref() == Some(self.rack.as_str())) {
                continue;
            }
            let name = &a.spec.name;
            let l = local
                .entry(name.clone())
                .or_insert_with(|| Local::new(a.epoch));
            if l.epoch != a.epoch {
                if l.inst.is_some() {
                    continue; // stopped in step 1 next round
                }
                *l = Local::new(a.epoch);
            }
            if l.inst.is_some() || l.state == AppState::Failed {
                continue;
            }
            if !l.restarts.is_empty() && now < l.next_check {
                continue; // restart backoff
            }
            if !lease.may_run(name, a.epoch, now, &cfg) {
                continue;
            }
            if !self.previous_owner_gone(a, now).await {
                continue;
            }
            let deps_ok = a.spec.after.iter().all(|d| {
                state.racks.values().any(|r| {
                    r.apps.get(d).is_some_and(|x| {
                        x.state == AppState::Running
                            && state.apps.get(d).is_some_and(|da| da.epoch == x.epoch)
                    })
                })
            });
            if !deps_ok {
                continue;
            }
            self.start(a, l).await;
        }

        // Reports for the next renewal and for status.
        let reports: BTreeMap<String, AppReport> = local
            .iter()
            .map(|(k, l)| {
                (
                    k.clone(),
                    AppReport {
                        epoch: l.epoch,
                        state: l.state,
                        since_ms: l.since_ms,
                    },
                )
            })
            .collect();
        *self.reports.lock().expect("reports lock") = reports;
    }

    /// Whether the previous owner of `a`'s current assignment has certainly
    /// stopped it: it released it and we hold what it shipped, or its lease
    /// has certainly expired. An assignment nobody held before needs neither.
    async fn previous_owner_gone(&self, a: &control::AppRecord, now: Instant) -> bool {
        let from_elsewhere = a
            .transfer
            .as_ref()
            .and_then(|t| t.from.as_deref())
            .is_some_and(|f| f != self.rack);
        if !from_elsewhere && a.epoch <= 1 {
            return true;
        }
        if let Some(released) = a.transfer.as_ref().and_then(|t| t.released.as_ref()) {
            if from_elsewhere {
                let held = self.volumes.held_generations().await;
                return released
                    .iter()
                    .all(|(v, g)| held.get(v).is_some_and(|h| h >= g));
            }
        }
        let gate = self
            .control
            .leases()
            .lock()
            .expect("lease watch")
            .gate(&a.spec.name, a.epoch);
        now >= gate
    }

    async fn start(&self, a: &control::AppRecord, l: &mut Local) {
        let name = &a.spec.name;
        let started = Instant::now();
        let mut vols = Vec::new();
        let mut how = BTreeMap::new();
        for v in &a.spec.volume {
            match self.volumes.ensure_owned(&v.name, v.size).await {
                Ok((path, h)) => {
                    how.insert(v.name.clone(), h);
                    vols.push((v.name.clone(), path));
                }
                Err(e) => {
                    let msg = format!("volume {}: {e}", v.name);
                    if l.last_error.as_deref() != Some(msg.as_str()) {
                        tracing::error!(appliance = %name, error = %msg, "cannot start");
                        self.event(
                            "appliance_start_failed",
                            serde_json::json!({"appliance": name, "error": msg}),
                        );
                        l.last_error = Some(msg);
                    }
                    return;
                }
            }
        }
        let run_dir = self.run_root.join(name);
        let spec = LaunchSpec {
            rack: &self.rack,
            spec: &a.spec,
            epoch: a.epoch,
            volumes: vols,
            run_dir,
        };
        match drivers::launch(spec).await {
            Ok(inst) => {
                let hooks = inst.pause_hooks();
                let qemu = a.spec.driver == deploy::appliance::DriverKind::Qemu;
                for v in &a.spec.volume {
                    self.volumes.set_pause_hooks(&v.name, Some(hooks.clone()));
                    self.volumes.set_external_capture(&v.name, qemu);
                }
                tracing::info!(appliance = %name, epoch = a.epoch, pid = inst.pid(), volumes = ?how, "appliance started");
                l.inst = Some(inst);
                l.launched = Some(Instant::now());
                l.next_check = Instant::now();
                l.unhealthy = 0;
                l.set(AppState::Starting);
                l.last_error = None;
                if let Some(t) = a
                    .transfer
                    .as_ref()
                    .filter(|t| t.from.is_some() && t.from.as_deref() != Some(self.rack.as_str()))
                {
                    l.pending_event = Some(serde_json::json!({
                        "appliance": name,
                        "epoch": a.epoch,
                        "from": t.from,
                        "to": self.rack,
                        "reason": t.reason,
                        "tier": a.spec.tier,
                        "detected_ms": t.detected_ms,
                        "decided_ms": t.decided_ms,
                        "started_ms": unix_ms(),
                        "volumes": how,
                        "prepare_ms": started.elapsed().as_millis() as u64,
                    }));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(appliance = %name, error = %msg, "launch failed");
                self.event(
                    "appliance_start_failed",
                    serde_json::json!({"appliance": name, "error": msg}),
                );
                l.last_error = Some(msg);
                self.after_exit(l, &a.spec, true);
            }
        }
    }

    fn healthy(&self, name: &str, l: &mut Local) {
        if let Some(mut ev) = l.pending_event.take() {
            ev["healthy_ms"] = serde_json::json!(unix_ms());
            if let (Some(d), Some(h)) = (
                ev["detected_ms"].as_u64().or(ev["decided_ms"].as_u64()),
                ev["healthy_ms"].as_u64(),
            ) {
                ev["detected_to_healthy_ms"] = serde_json::json!(h.saturating_sub(d));
            }
            tracing::info!(appliance = %name, event = %ev, "failover complete");
            self.event("failover", ev);
        }
    }

    /// After an exit or a failed health check: restart per policy.
    fn after_exit(&self, l: &mut Local, spec: &ApplianceSpec, failed: bool) {
        let now = Instant::now();
        let window = Duration::from_secs(spec.restart.window_s);
        l.restarts.retain(|t| now.duration_since(*t) < window);
        let restart = match spec.restart.policy {
            RestartMode::Always => true,
            RestartMode::OnFailure => failed,
            RestartMode::Never => false,
        };
        for v in &spec.volume {
            self.volumes.set_pause_hooks(&v.name, None);
            self.volumes.set_external_capture(&v.name, false);
        }
        if !restart {
            l.set(if failed {
                AppState::Failed
            } else {
                AppState::Stopped
            });
            return;
        }
        if l.restarts.len() >= spec.restart.max_restarts as usize {
            tracing::error!(appliance = %spec.name, "restarted too often; giving up");
            self.event(
                "appliance_failed",
                serde_json::json!({"appliance": spec.name, "restarts": l.restarts.len()}),
            );
            l.set(AppState::Failed);
            return;
        }
        l.restarts.push(now);
        let backoff = 500u64 << l.restarts.len().min(5);
        l.next_check = now + Duration::from_millis(backoff);
        l.launched = None;
        l.set(AppState::Stopped);
    }

    /// Planned transfer away from us: the appliance is stopped (step 1);
    /// ship its volumes to the new owner, then release it.
    async fn hand_over(&self, spec: ApplianceSpec, epoch: u64, to: &str) {
        let mut shipped = BTreeMap::new();
        for v in &spec.volume {
            if !self.volumes.store.owns(&v.name).unwrap_or(false) {
                continue;
            }
            match self.volumes.ship(&v.name, to).await {
                Ok(g) => {
                    shipped.insert(v.name.clone(), g);
                }
                Err(e) => {
                    tracing::warn!(appliance = %spec.name, volume = %v.name, %to, error = %e, "handover shipment failed; will retry");
                    return;
                }
            }
        }
        let cmd = Command::Released {
            name: spec.name.clone(),
            epoch,
            volumes: shipped.clone(),
        };
        match self.control.propose(cmd, Duration::from_secs(5)).await {
            Ok(_) => {
                tracing::info!(appliance = %spec.name, %to, ?shipped, "handed over");
                self.event(
                    "appliance_handed_over",
                    serde_json::json!({"appliance": spec.name, "epoch": epoch, "to": to, "volumes": shipped}),
                );
            }
            Err(e) => {
                tracing::warn!(appliance = %spec.name, error = %e, "release not committed; will retry")
            }
        }
    }

    /// `status.appliances`.
    pub fn status(&self) -> Vec<ApplianceStatus> {
        let state = self.control.state().borrow().clone();
        let now = unix_ms();
        state
            .apps
            .values()
            .map(|a| {
                let report = a
                    .owner
                    .as_ref()
                    .and_then(|o| state.racks.get(o))
                    .and_then(|r| r.apps.get(&a.spec.name))
                    .filter(|r| r.epoch == a.epoch);
                let local = if a.owner.as_deref() == Some(self.rack.as_str()) {
                    self.reports
                        .lock()
                        .expect("reports lock")
                        .get(&a.spec.name)
                        .filter(|r| r.epoch == a.epoch)
                        .cloned()
                } else {
                    None
                };
                let r = local.or_else(|| report.cloned());
                let state_word = match (&r, a.running) {
                    (_, false) => "stopped",
                    (Some(r), true) => r.state.as_str(),
                    (None, true) => "starting",
                };
                ApplianceStatus {
                    name: a.spec.name.clone(),
                    owner: a.owner.clone(),
                    state: state_word.into(),
                    tier: a.spec.tier,
                    epoch: a.epoch,
                    since_s: r
                        .map(|r| (now.saturating_sub(r.since_ms) as f64 / 100.0).round() / 10.0),
                    reason: a.transfer.as_ref().map(|t| t.reason.clone()),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::stop_order;

    fn order(running: &[&str], deps: &[(&str, &[&str])]) -> Vec<String> {
        let running: Vec<String> = running.iter().map(|s| (*s).to_owned()).collect();
        stop_order(&running, |n| {
            deps.iter()
                .find(|(a, _)| *a == n)
                .map(|(_, d)| d.iter().map(|s| (*s).to_owned()).collect())
                .unwrap_or_default()
        })
    }

    #[test]
    fn dependents_stop_before_what_they_start_after() {
        // web after api after db; voip on its own; a dependency not running.
        let got = order(
            &["db", "voip", "web", "api"],
            &[("web", &["api"]), ("api", &["db", "cache"])],
        );
        let pos = |n: &str| got.iter().position(|x| x == n).expect(n);
        assert_eq!(got.len(), 4);
        assert!(pos("web") < pos("api") && pos("api") < pos("db"), "{got:?}");
    }

    #[test]
    fn a_cycle_still_stops_everything_once() {
        let mut got = order(&["a", "b"], &[("a", &["b"]), ("b", &["a"])]);
        got.sort();
        assert_eq!(got, ["a", "b"]);
    }
}
