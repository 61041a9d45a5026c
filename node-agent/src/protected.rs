//! Time to protected: when, after the agent started, this rack first saw
//! each step a freshly landed field goes through: its mesh formed (every
//! bootstrap peer alive), a control-plane majority (a leader), the
//! field's appliances running, every volume it owns with a replica in
//! sync, and its site's tile packs imported into the map cache (pinned,
//! see [`crate::tile_packs`]). The field is protected when
//! every rack has reached every step; each rack records its own timeline
//! (`fieldrack status` shows it; the event log gets a `protected` event).
//!
//! [`Timeline`] is sans-IO: the agent feeds it [`Observation`]s taken
//! from its status every [`POLL`], with the milliseconds since start.
//! The same task deploys the catalog the rack was installed with
//! (`appliances.toml` beside rack.toml) once a majority exists, adding
//! only appliances the field does not have, so a bundled field needs no
//! operator to start its appliances.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::bundle::APPLIANCES_FILE;
use crate::status::Status;

/// How often the agent looks until protected: fine enough to time steps
/// of a few seconds, rare enough to cost nothing (one status build).
pub const POLL: Duration = Duration::from_millis(500);

/// How long one catalog deployment proposal may take before the next
/// poll tries again.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(5);

/// The catalog is deployed once every member this rack sees has reported
/// to the control plane (so placement knows which racks hold the
/// preloaded copies and puts each appliance where its data already is),
/// or this long after the majority formed, whichever comes first: a rack
/// that never arrives must not hold the others' appliances back.
pub const CATALOG_WAIT: Duration = Duration::from_secs(30);

/// One step of the timeline, in the order a field usually reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Every bootstrap peer alive.
    MeshFormed,
    /// A control-plane leader is known.
    Majority,
    /// Every appliance of the field that should run runs.
    AppliancesRunning,
    /// Every volume this rack owns has a replica at its generation (once
    /// the appliances run: ownership follows them).
    ReplicasInSync,
    /// Every tile pack of this rack's site is in place.
    TilePacks,
}

impl Step {
    /// Every step.
    pub const ALL: [Step; 5] = [
        Step::MeshFormed,
        Step::Majority,
        Step::AppliancesRunning,
        Step::ReplicasInSync,
        Step::TilePacks,
    ];

    /// Short label for the status line.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Step::MeshFormed => "mesh",
            Step::Majority => "majority",
            Step::AppliancesRunning => "appliances",
            Step::ReplicasInSync => "replicas",
            Step::TilePacks => "tiles",
        }
    }
}

/// What the rack sees at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observation {
    /// Members in its bootstrap list.
    pub peers_expected: usize,
    /// Peers alive.
    pub peers_alive: usize,
    /// A control-plane leader is known and a majority answered lately
    /// (after a restart a rack remembers the old leader: not enough).
    pub leader: bool,
    /// Appliances of the field that should run.
    pub apps_wanted: usize,
    /// Of those, running.
    pub apps_running: usize,
    /// Volumes this rack owns.
    pub volumes_owned: usize,
    /// Of those, with a replica in sync.
    pub volumes_in_sync: usize,
    /// Tile packs its bundle carried.
    pub packs_expected: usize,
    /// Of those, in place and imported into their source's cache (pinned).
    pub packs_present: usize,
}

impl Observation {
    /// Whether `step` holds now. Appliances need a majority first: before
    /// it, "no appliance wanted" only means "not known yet"; replicas need
    /// the appliances running, which settles who owns each volume.
    #[must_use]
    pub fn holds(&self, step: Step) -> bool {
        match step {
            Step::MeshFormed => self.peers_alive >= self.peers_expected,
            Step::Majority => self.leader,
            Step::AppliancesRunning => self.leader && self.apps_running >= self.apps_wanted,
            Step::ReplicasInSync => {
                self.holds(Step::AppliancesRunning) && self.volumes_in_sync >= self.volumes_owned
            }
            Step::TilePacks => self.packs_present >= self.packs_expected,
        }
    }
}

/// When each step was first reached, in ms since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    /// Step → ms since start when first reached.
    pub reached_ms: BTreeMap<Step, u64>,
}

impl Timeline {
    /// Record the steps `obs` shows for the first time, at `ms` since
    /// start; returns them. A step once reached stays reached: this is the
    /// time *to* protected, not a health check.
    pub fn observe(&mut self, ms: u64, obs: &Observation) -> Vec<Step> {
        let mut new = Vec::new();
        for step in Step::ALL {
            if !self.reached_ms.contains_key(&step) && obs.holds(step) {
                self.reached_ms.insert(step, ms);
                new.push(step);
            }
        }
        new
    }

    /// When the last step was reached, once all are.
    #[must_use]
    pub fn protected_ms(&self) -> Option<u64> {
        (self.reached_ms.len() == Step::ALL.len())
            .then(|| self.reached_ms.values().copied().max().unwrap_or(0))
    }

    /// `time to protected: mesh 1.2s, majority 2.0s, ... -> protected in 6.0s`.
    #[must_use]
    pub fn render(&self) -> String {
        let steps: Vec<String> = Step::ALL
            .iter()
            .map(|s| match self.reached_ms.get(s) {
                Some(ms) => format!("{} {:.1}s", s.label(), *ms as f64 / 1000.0),
                None => format!("{} -", s.label()),
            })
            .collect();
        let end = match self.protected_ms() {
            Some(ms) => format!("protected in {:.1}s", ms as f64 / 1000.0),
            None => "not yet protected".into(),
        };
        format!("time to protected: {} -> {end}", steps.join(", "))
    }
}

/// What this rack observes in its own status; `packs` are the tile pack
/// files its bundle carried, `catalog` the appliances it was installed
/// with (wanted even before the field has them).
#[must_use]
pub fn observe(
    s: &Status,
    peers_expected: usize,
    packs: &[crate::tile_packs::BundledPack],
    catalog: &[String],
) -> Observation {
    let wanted: Vec<_> = s
        .appliances
        .iter()
        .filter(|a| a.state != "stopped")
        .collect();
    let not_deployed = catalog
        .iter()
        .filter(|n| !s.appliances.iter().any(|a| &a.name == *n))
        .count();
    let owned: Vec<_> = s
        .volumes
        .iter()
        .filter(|v| v.owner.as_deref() == Some(s.rack.as_str()))
        .collect();
    Observation {
        peers_expected,
        peers_alive: s
            .peers
            .iter()
            .filter(|p| p.state == mesh::membership::State::Alive)
            .count(),
        leader: s
            .control
            .as_ref()
            .is_some_and(|c| c.majority && c.leader.is_some()),
        apps_wanted: wanted.len() + not_deployed,
        apps_running: wanted.iter().filter(|a| a.state == "running").count(),
        volumes_owned: owned.len(),
        volumes_in_sync: owned.iter().filter(|v| crate::doctor::in_sync(v)).count(),
        packs_expected: packs.len(),
        packs_present: packs.iter().filter(|p| p.present() && p.imported()).count(),
    }
}

/// The agent's timeline task: observe until protected (recording each
/// step and the end in the event log), deploying the installed catalog
/// once a majority exists.
pub async fn run(
    rack: Arc<crate::agent::Rack>,
    config_dir: PathBuf,
    started: Instant,
    cancel: CancellationToken,
) {
    let timeline = rack.protected.clone();
    let packs = crate::tile_packs::bundled(&config_dir, &rack.config.data_dir);
    let catalog = config_dir.join(APPLIANCES_FILE);
    let mut catalog_done = !catalog.exists();
    let catalog_names: Vec<String> = deploy::appliance::load(&catalog)
        .map(|specs| specs.into_iter().map(|s| s.name).collect())
        .unwrap_or_default();
    let peers_expected = rack.config.mesh.bootstrap.len();
    let mut tick = tokio::time::interval(POLL);
    let mut majority_at: Option<Instant> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(status) = rack.status().await else {
            continue;
        };
        let obs = observe(&status, peers_expected, &packs, &catalog_names);
        if obs.leader {
            let since = *majority_at.get_or_insert_with(Instant::now);
            if !catalog_done
                && (everyone_reported(&rack, &status) || since.elapsed() >= CATALOG_WAIT)
            {
                catalog_done = deploy_catalog(&rack, &catalog).await;
            }
        }
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let (new, protected) = {
            let mut t = timeline
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let new = t.observe(ms, &obs);
            (new, t.protected_ms())
        };
        for step in new {
            tracing::info!(step = step.label(), ms, "time to protected: step reached");
            let _ = rack.state.record_event(
                "protected_step",
                serde_json::json!({ "step": step, "ms": ms }),
            );
        }
        if let Some(total) = protected {
            tracing::info!(ms = total, "protected");
            let _ = rack
                .state
                .record_event("protected", serde_json::json!({ "ms": total }));
            if catalog_done {
                return;
            }
        }
    }
}

/// Whether this rack and every peer it sees alive have a report in the
/// replicated state (their volumes and capacity known to placement).
fn everyone_reported(rack: &crate::agent::Rack, status: &Status) -> bool {
    let state = rack.appliances.control().state();
    let state = state.borrow();
    state.racks.contains_key(&status.rack)
        && status
            .peers
            .iter()
            .filter(|p| p.state == mesh::membership::State::Alive)
            .all(|p| p.rack.as_ref().is_some_and(|r| state.racks.contains_key(r)))
}

/// Deploy the appliances of `catalog` the field does not have yet; true
/// once nothing is left to deploy.
async fn deploy_catalog(rack: &crate::agent::Rack, catalog: &Path) -> bool {
    let specs = match deploy::appliance::load(catalog) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "the installed catalog is refused; not deploying it");
            return true;
        }
    };
    let control = rack.appliances.control();
    let missing: Vec<_> = {
        let state = control.state();
        let state = state.borrow();
        specs
            .into_iter()
            .filter(|s| !state.apps.contains_key(&s.name))
            .collect()
    };
    if missing.is_empty() {
        return true;
    }
    let names: Vec<String> = missing.iter().map(|s| s.name.clone()).collect();
    match control
        .propose(control::Command::Deploy { specs: missing }, DEPLOY_TIMEOUT)
        .await
    {
        Ok(control::Response::Ok) => {
            tracing::info!(?names, "deployed the installed catalog");
            let _ = rack
                .state
                .record_event("catalog_deployed", serde_json::json!({ "deployed": names }));
            true
        }
        Ok(other) => {
            tracing::warn!(?other, "the catalog deployment was refused");
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "catalog deployment not committed yet; retrying");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs() -> Observation {
        Observation {
            peers_expected: 2,
            peers_alive: 0,
            leader: false,
            apps_wanted: 0,
            apps_running: 0,
            volumes_owned: 0,
            volumes_in_sync: 0,
            packs_expected: 1,
            packs_present: 0,
        }
    }

    #[test]
    fn steps_are_recorded_once_in_the_order_reached() {
        let mut t = Timeline::default();
        // Nothing yet; "no appliance" does not count before a majority.
        assert!(t.observe(100, &obs()).is_empty());
        let o = Observation {
            packs_present: 1,
            ..obs()
        };
        assert_eq!(t.observe(200, &o), [Step::TilePacks]);
        let o = Observation {
            peers_alive: 2,
            ..o
        };
        assert_eq!(t.observe(1_200, &o), [Step::MeshFormed]);
        let o = Observation {
            leader: true,
            apps_wanted: 2,
            apps_running: 1,
            volumes_owned: 1,
            ..o
        };
        assert_eq!(t.observe(2_000, &o), [Step::Majority]);
        assert_eq!(t.protected_ms(), None);
        assert!(t.render().ends_with("not yet protected"), "{}", t.render());
        let o = Observation {
            apps_running: 2,
            ..o
        };
        assert_eq!(t.observe(5_000, &o), [Step::AppliancesRunning]);
        // A peer lost later does not undo a reached step.
        let o = Observation {
            peers_alive: 1,
            volumes_in_sync: 1,
            ..o
        };
        assert_eq!(t.observe(6_500, &o), [Step::ReplicasInSync]);
        assert_eq!(t.protected_ms(), Some(6_500));
        assert_eq!(
            t.render(),
            "time to protected: mesh 1.2s, majority 2.0s, appliances 5.0s, replicas 6.5s, \
             tiles 0.2s -> protected in 6.5s"
        );
        assert!(t.observe(7_000, &o).is_empty());
    }

    #[test]
    fn a_lone_rack_without_peers_or_packs_needs_only_a_majority() {
        let mut t = Timeline::default();
        let o = Observation {
            peers_expected: 0,
            packs_expected: 0,
            leader: true,
            ..obs()
        };
        assert_eq!(t.observe(50, &o).len(), 5);
        assert_eq!(t.protected_ms(), Some(50));
    }
}
