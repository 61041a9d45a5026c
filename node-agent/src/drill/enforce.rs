//! The agent's side of a drill: takes fault orders from the admin API,
//! stores them durably with their deadline (so a restarted agent still
//! heals on time), carries out what [`Faults::effect`] says for this rack
//! (the mesh's traffic filter, the supervisor's power cut, the power
//! reading, the proxy's backhaul) and heals each fault at its deadline
//! itself, whatever became of the rack that ordered it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deploy::power::PowerStatus;
use mesh::MeshHandle;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use util::time::unix_ms;

use super::faults::{ActiveFault, Effect, FaultOrder, Faults, GeneratorOverride, OrderError};
use super::report::MAX_REPORTS;
use crate::state::AgentState;
use crate::store::{StoreError, Tree};
use crate::supervisor::Supervisor;

/// The store key of the faults in force.
const FAULTS_KEY: &[u8] = b"faults";
/// Prefix of the reports' keys (ids sort by start time).
const REPORT_PREFIX: &str = "report/";
/// Longest sleep between two deadline checks: bounds the cost of a missed
/// wake-up and lets a generator's countdown tick.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Why an order or an abort failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DrillError {
    /// The order was refused (nothing changed).
    #[error(transparent)]
    Refused(#[from] OrderError),
    /// It could not be stored durably (nothing changed).
    #[error("storing the drill's faults")]
    Store(#[from] StoreError),
}

/// Where the enforcer's effects go.
pub struct Targets {
    /// The mesh (traffic filter).
    pub mesh: MeshHandle,
    /// The supervisor (power cut).
    pub supervisor: Arc<Supervisor>,
    /// The proxy (backhaul), if this rack runs one.
    pub proxy: Option<cache_proxy::ProxyHandle>,
    /// The power reading's override (see [`power_overlay`]).
    pub generator: watch::Sender<Option<GeneratorOverride>>,
}

/// The drill's faults on this rack.
pub struct Enforcer {
    rack: String,
    state: AgentState,
    targets: Targets,
    faults: Mutex<Faults>,
    /// The effect last carried out (only changes are applied).
    applied: tokio::sync::Mutex<Effect>,
    /// Wakes the deadline loop after an order.
    wake: Notify,
}

impl Enforcer {
    /// The enforcer of `rack`, with the faults the store held (those whose
    /// deadline passed while the agent was down are healed at once).
    ///
    /// # Errors
    /// The store could not be read.
    pub fn open(rack: &str, state: AgentState, targets: Targets) -> Result<Arc<Self>, StoreError> {
        let stored: Vec<ActiveFault> = state
            .store()
            .get(Tree::Drills, FAULTS_KEY)?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default();
        let (faults, healed) = Faults::restore(stored, unix_ms());
        let me = Arc::new(Self {
            rack: rack.to_owned(),
            state,
            targets,
            faults: Mutex::new(faults),
            applied: tokio::sync::Mutex::new(Effect::default()),
            wake: Notify::new(),
        });
        for h in healed {
            me.event_healed(&h, "deadline passed while the agent was down");
        }
        me.persist()?;
        Ok(me)
    }

    /// The faults in force here.
    #[must_use]
    pub fn active(&self) -> Vec<ActiveFault> {
        self.faults.lock().expect("faults lock").active().to_vec()
    }

    /// Take an order: stored durably, then carried out.
    ///
    /// # Errors
    /// [`DrillError`]; nothing changes then.
    pub async fn order(&self, order: FaultOrder) -> Result<ActiveFault, DrillError> {
        let active = {
            let mut f = self.faults.lock().expect("faults lock");
            let before = f.clone();
            let a = f.order(unix_ms(), order)?;
            if let Err(e) = self.persist_locked(&f) {
                *f = before;
                return Err(e.into());
            }
            a
        };
        tracing::warn!(drill = %active.drill, fault = %active.fault.describe(), deadline_ms = active.deadline_ms, "drill fault in force");
        self.event(
            "drill_fault",
            serde_json::json!({
                "drill": active.drill,
                "fault": active.fault,
                "since_ms": active.since_ms,
                "deadline_ms": active.deadline_ms,
            }),
        );
        self.apply().await;
        self.wake.notify_one();
        Ok(active)
    }

    /// Heal every fault now; returns what was in force.
    ///
    /// # Errors
    /// The store could not be written (the faults are healed anyway: an
    /// abort must never leave a fault in force; a restart would heal the
    /// stored ones at their deadline).
    pub async fn abort(&self) -> Result<Vec<ActiveFault>, DrillError> {
        let healed = self.faults.lock().expect("faults lock").clear();
        for h in &healed {
            self.event_healed(h, "aborted");
        }
        self.apply().await;
        self.persist()?;
        Ok(healed)
    }

    /// Heal faults at their deadlines until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        self.apply().await;
        loop {
            let now = unix_ms();
            let next = self.faults.lock().expect("faults lock").next_deadline();
            let sleep = next.map_or(CHECK_EVERY, |d| {
                Duration::from_millis(d.saturating_sub(now)).min(CHECK_EVERY)
            });
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
            }
            let healed = self.faults.lock().expect("faults lock").expire(unix_ms());
            if healed.is_empty() {
                continue;
            }
            for h in &healed {
                self.event_healed(h, "deadline");
            }
            self.apply().await;
            if let Err(e) = self.persist() {
                tracing::error!(error = %e, "cannot store the healed drill faults");
            }
        }
    }

    /// Carry out what the faults mean for this rack, changes only.
    async fn apply(&self) {
        let want = self.faults.lock().expect("faults lock").effect(&self.rack);
        let mut applied = self.applied.lock().await;
        if applied.filter != want.filter {
            if let Err(e) = self.targets.mesh.set_filter(want.filter.clone()).await {
                tracing::error!(error = %e, "cannot install the drill's traffic filter");
            }
        }
        if applied.power_off != want.power_off {
            self.targets.supervisor.set_powered_off(want.power_off);
        }
        if applied.generator != want.generator {
            self.targets.generator.send_replace(want.generator);
        }
        if applied.backhaul_down != want.backhaul_down {
            if let Some(p) = &self.targets.proxy {
                p.set_forced_offline(want.backhaul_down);
            }
        }
        *applied = want;
    }

    /// Keep a drill report (JSON with an `id`), dropping the oldest
    /// beyond [`MAX_REPORTS`]. Durable: it is the record of an exercise.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn store_report(&self, id: &str, report: &[u8]) -> Result<(), StoreError> {
        let store = self.state.store();
        let key = format!("{REPORT_PREFIX}{id}");
        store.put_durable(Tree::Drills, key.as_bytes(), report)?;
        let (entries, _) = store.scan(Tree::Drills)?;
        let reports: Vec<Vec<u8>> = entries
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with(REPORT_PREFIX.as_bytes()))
            .collect();
        for old in reports
            .iter()
            .take(reports.len().saturating_sub(MAX_REPORTS))
        {
            store.remove(Tree::Drills, old)?;
        }
        Ok(())
    }

    /// The reports kept here, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn reports(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        let (entries, _) = self.state.store().scan(Tree::Drills)?;
        Ok(entries
            .into_iter()
            .filter(|(k, _)| k.starts_with(REPORT_PREFIX.as_bytes()))
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }

    fn persist(&self) -> Result<(), StoreError> {
        let f = self.faults.lock().expect("faults lock");
        self.persist_locked(&f)
    }

    fn persist_locked(&self, f: &Faults) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(f.active()).expect("faults serialize");
        self.state
            .store()
            .put_durable(Tree::Drills, FAULTS_KEY, &bytes)
    }

    fn event_healed(&self, h: &ActiveFault, why: &str) {
        tracing::warn!(drill = %h.drill, fault = %h.fault.describe(), why, "drill fault healed");
        self.event(
            "drill_healed",
            serde_json::json!({ "drill": h.drill, "fault": h.fault, "why": why }),
        );
    }

    fn event(&self, kind: &str, detail: serde_json::Value) {
        if let Err(e) = self.state.record_event(kind, detail) {
            tracing::warn!(error = %e, "could not record a drill event");
        }
    }
}

/// The power reading the agent uses: the monitor's, unless a generator
/// fault overrides it (then on battery, counting down, re-read every
/// second). Returns the reading's receiver and the override's sender.
#[must_use]
pub fn power_overlay(
    mut monitor: watch::Receiver<PowerStatus>,
    dying_runtime_s: u64,
    cancel: CancellationToken,
) -> (
    watch::Receiver<PowerStatus>,
    watch::Sender<Option<GeneratorOverride>>,
) {
    let (tx, rx) = watch::channel(monitor.borrow().clone());
    let (gen_tx, mut gen_rx) = watch::channel(None::<GeneratorOverride>);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        let mut monitor_open = true;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                r = monitor.changed(), if monitor_open => monitor_open = r.is_ok(),
                r = gen_rx.changed() => if r.is_err() { return },
                _ = tick.tick() => {}
            }
            let reading = match *gen_rx.borrow() {
                Some(g) => g.reading(unix_ms(), dying_runtime_s),
                None => monitor.borrow().clone(),
            };
            tx.send_if_modified(|cur| {
                if *cur == reading {
                    false
                } else {
                    *cur = reading;
                    true
                }
            });
        }
    });
    (rx, gen_tx)
}
