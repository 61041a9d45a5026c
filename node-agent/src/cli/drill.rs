//! `fieldrack drill list|plan|run|report|abort`: faults on a live field,
//! ordered through each rack's admin API (each rack's own token, from the
//! fleet directory: `FLEET/<rack>/rack.toml` beside the given one),
//! enforced and healed by the agents themselves, measured by probes every
//! 500 ms and reported (table, JSON kept on every rack, HTML timeline).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use futures::future::join_all;
use node_agent::client::AgentClient;
use node_agent::drill::faults::FaultOrder;
use node_agent::drill::plan::{self, Plan, RackAnswer};
use node_agent::drill::probe::ProbeAnswer;
use node_agent::drill::report::{
    build_step, RackSample, Report, Round, StepInput, PROBE_INTERVAL_MS, REPORT_VERSION,
    RPO_TARGET_FLOOR_S, RPO_TARGET_INTERVALS,
};
use node_agent::drill::scenario::{self, Scenario, SCENARIOS};
use node_agent::status::Status;
use tokio_util::sync::CancellationToken;
use util::time::unix_ms;

use super::exit::Failure;
use super::DrillCmd;

/// A probe's answers must come within this, so a round stays near its
/// 500 ms period even when a rack is gone.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// After the faults are lifted, probes go on until the field is whole
/// again, at most this long.
const HEAL_WAIT: Duration = Duration::from_secs(30);
/// An appliance of a cut-off rack not running anywhere this long after
/// the fault is down longer than its target: the drill aborts.
const DOWN_ABORT: Duration = Duration::from_secs(40);
/// A rack the drill does not fault that misses this many rounds in a row
/// has really failed: the drill aborts.
const MISSED_ROUNDS_ABORT: u32 = 6;
/// Events read from each rack for the timeline.
const EVENTS_READ: usize = 1000;

/// Run a drill command.
///
/// # Errors
/// Refused preconditions, unreachable racks, failed targets.
pub async fn run(cmd: DrillCmd) -> Result<(), Failure> {
    match cmd {
        DrillCmd::List => {
            print!("{}", render_list());
            Ok(())
        }
        DrillCmd::Plan { config, scenario } => {
            let sc = scenario.scenario()?;
            let field = Field::open(&config).await?;
            let plan = field.plan(&sc).await;
            print!("{}", plan.render(&sc));
            if plan.ok() {
                Ok(())
            } else {
                Err(anyhow!("a precondition fails: the drill would be refused").into())
            }
        }
        DrillCmd::Run {
            config,
            scenario,
            dry_run,
            html,
        } => {
            let sc = scenario.scenario()?;
            let field = Field::open(&config).await?;
            let plan = field.plan(&sc).await;
            print!("{}", plan.render(&sc));
            if !plan.ok() {
                return Err(anyhow!("a precondition fails: nothing was changed").into());
            }
            if dry_run {
                println!("dry run: stopping here");
                return Ok(());
            }
            let cancel = super::agent::shutdown_token();
            let report = field.run(&sc, &plan, cancel).await?;
            print!("{}", report.render());
            let path = html.unwrap_or_else(|| PathBuf::from(format!("drill-{}.html", report.id)));
            std::fs::write(&path, report.html())
                .with_context(|| format!("writing {}", path.display()))?;
            println!("timeline: {}", path.display());
            match report.outcome.as_str() {
                "passed" => Ok(()),
                other => Err(anyhow!("the drill {other}").into()),
            }
        }
        DrillCmd::Report {
            config,
            id,
            json,
            html,
        } => {
            let client = super::client_for(&config)?;
            let reports = client.drill_reports().await?;
            let chosen: Vec<&Report> = match &id {
                Some(id) => reports.iter().filter(|r| &r.id == id).collect(),
                None => reports.iter().collect(),
            };
            if id.is_some() && chosen.is_empty() {
                return Err(anyhow!("no report {} on this rack", id.unwrap_or_default()).into());
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&chosen)?);
            } else if id.is_some() {
                for r in &chosen {
                    print!("{}", r.render());
                }
            } else {
                print!("{}", render_report_list(&reports));
            }
            if let (Some(path), Some(r)) = (html, chosen.last()) {
                std::fs::write(&path, r.html())
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("timeline: {}", path.display());
            }
            Ok(())
        }
        DrillCmd::Abort { config } => {
            let field = Field::open(&config).await?;
            let healed = field.abort_all().await;
            for (rack, r) in &healed {
                match r {
                    Ok(n) => println!("{rack}: {n} fault(s) healed"),
                    Err(e) => println!("{rack}: {e}"),
                }
            }
            if healed.iter().any(|(_, r)| r.is_err()) {
                Err(
                    anyhow!("some racks did not answer (their faults heal at their deadline)")
                        .into(),
                )
            } else {
                Ok(())
            }
        }
    }
}

/// `drill list`.
#[must_use]
pub fn render_list() -> String {
    let mut out = String::from("scenarios (fieldrack drill run SCENARIO --config rack.toml):\n");
    for (s, what) in SCENARIOS {
        out.push_str(&format!("  {s:<30} {what}\n"));
    }
    out.push_str("options: --duration S (default 60), --file drill.toml, --dry-run, --html FILE\n");
    out
}

/// `drill report` without an id: one line per report.
#[must_use]
pub fn render_report_list(reports: &[Report]) -> String {
    if reports.is_empty() {
        return "no drill reports on this rack\n".into();
    }
    let mut out = String::from("id                       outcome  scenario\n");
    for r in reports {
        out.push_str(&format!("{:<24} {:<8} {}\n", r.id, r.outcome, r.scenario));
    }
    out
}

/// The field the drill runs on: every rack's client.
struct Field {
    controller: String,
    /// `[volumes] snapshot_interval_s` of the controller's rack.toml: the
    /// RPO target's unit (the interval in status grows while replication
    /// lags, so it would excuse the lag it should measure).
    snapshot_interval_s: f64,
    /// Rack name → its client, the controller's first.
    racks: Vec<(String, AgentClient)>,
}

impl Field {
    /// The controller from `config`, and every rack it knows of, each
    /// with its own token from the fleet directory.
    async fn open(config: &Path) -> anyhow::Result<Self> {
        let client = super::client_for(config)?;
        let snapshot_interval_s = deploy::config::RackConfig::load(config)
            .with_context(|| format!("reading {}", config.display()))?
            .volumes
            .snapshot_interval_s as f64;
        let status = client
            .status()
            .await
            .context("asking the controlling rack")?;
        let fleet_dir = deploy::config::config_dir(config)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut racks = vec![(status.rack.clone(), client)];
        for p in &status.peers {
            let Some(name) = &p.rack else { continue };
            let path = fleet_dir.join(name).join("rack.toml");
            let c = AgentClient::from_config(&path).with_context(|| {
                format!(
                    "no credentials for rack {name}: expected its rack.toml and api-token in {}",
                    path.parent().unwrap_or(&fleet_dir).display()
                )
            })?;
            racks.push((name.clone(), c));
        }
        Ok(Self {
            controller: status.rack,
            snapshot_interval_s,
            racks,
        })
    }

    async fn answers(&self) -> Vec<RackAnswer> {
        join_all(self.racks.iter().map(|(rack, c)| async move {
            let (status, faults) = tokio::join!(c.status(), c.drill_faults());
            RackAnswer {
                rack: rack.clone(),
                status: status.map_err(|e| format!("{e:#}")),
                faults: faults.map_err(|e| format!("{e:#}")),
            }
        }))
        .await
    }

    async fn plan(&self, sc: &Scenario) -> Plan {
        plan::plan(sc, &self.controller, &self.answers().await)
    }

    /// Heal everything everywhere; per rack, how many faults.
    async fn abort_all(&self) -> Vec<(String, anyhow::Result<usize>)> {
        join_all(self.racks.iter().map(|(rack, c)| async move {
            let r = c
                .drill_abort()
                .await
                .map(|h| h.len())
                .map_err(anyhow::Error::from);
            (rack.clone(), r)
        }))
        .await
    }

    /// One probe round: every rack's status and probe.
    async fn round(&self) -> (Round, BTreeMap<String, Status>) {
        let at_ms = unix_ms();
        let answers = join_all(self.racks.iter().map(|(rack, c)| async move {
            let (s, p) = tokio::join!(
                tokio::time::timeout(PROBE_TIMEOUT, c.status()),
                tokio::time::timeout(PROBE_TIMEOUT, c.drill_probe())
            );
            let s: Option<Status> = s.ok().and_then(Result::ok);
            let p: Option<ProbeAnswer> = p.ok().and_then(Result::ok);
            (rack.clone(), s, p)
        }))
        .await;
        let mut statuses = BTreeMap::new();
        let racks = answers
            .into_iter()
            .map(|(rack, s, p)| {
                let sample = RackSample::from_status(&rack, s.as_ref(), p.as_ref());
                if let Some(s) = s {
                    statuses.insert(rack, s);
                }
                sample
            })
            .collect();
        (Round { at_ms, racks }, statuses)
    }

    /// Run every step; always ends with the faults healed everywhere
    /// (aborted, or at their deadline by the agents themselves).
    async fn run(
        &self,
        sc: &Scenario,
        plan: &Plan,
        cancel: CancellationToken,
    ) -> anyhow::Result<Report> {
        let started_ms = unix_ms();
        let id = format!("{started_ms:013}-{}", self.controller);
        let mut steps = Vec::new();
        let mut abort_reason = None;
        for step in &sc.steps {
            let cut: Vec<String> = step
                .fault
                .moves_from()
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
            // What may move, as the field is now.
            let (_, statuses) = self.round().await;
            let moves: Vec<plan::Move> = plan
                .moves
                .iter()
                .filter(|m| cut.contains(&m.from))
                .cloned()
                .collect();
            let before = before_fault(&moves, &statuses, self.snapshot_interval_s);
            let order = FaultOrder {
                drill: id.clone(),
                fault: step.fault.clone(),
                duration_ms: step.duration.as_millis() as u64,
            };
            // The fault's time 0: when the orders leave (the faulted rack
            // acts on its order at once, before the others answer).
            let fault_ms = unix_ms();
            let ordered = join_all(self.racks.iter().map(|(rack, c)| {
                let order = order.clone();
                async move { (rack.clone(), c.drill_order(&order).await) }
            }))
            .await;
            if let Some((rack, Err(e))) = ordered.iter().find(|(_, r)| r.is_err()) {
                let reason = format!("{rack} refused the order: {e:#}");
                self.abort_all().await;
                abort_reason = Some(reason);
                break;
            }
            println!(
                "fault in force: {} for {} s (drill {id}); Ctrl-C aborts",
                step.fault.describe(),
                step.duration.as_secs()
            );
            let deadline = fault_ms + order.duration_ms;
            let mut rounds = Vec::new();
            let mut lifted_ms = None;
            let mut missed: BTreeMap<String, u32> = BTreeMap::new();
            let mut tick = tokio::time::interval(Duration::from_millis(PROBE_INTERVAL_MS));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => {
                        abort_reason = Some("interrupted (Ctrl-C)".into());
                    }
                    _ = tick.tick() => {}
                }
                if abort_reason.is_some() {
                    break;
                }
                let (round, statuses) = self.round().await;
                let now = round.at_ms;
                // Abort conditions.
                for s in &round.racks {
                    let named = step.fault.racks().contains(&s.rack.as_str());
                    let m = missed.entry(s.rack.clone()).or_default();
                    *m = if s.answered { 0 } else { *m + 1 };
                    if !named && *m >= MISSED_ROUNDS_ABORT && lifted_ms.is_none() {
                        abort_reason = Some(format!(
                            "rack {} stopped answering: a real failure during the drill",
                            s.rack
                        ));
                    }
                }
                if lifted_ms.is_none() && now >= fault_ms + DOWN_ABORT.as_millis() as u64 {
                    for m in &moves {
                        let running = round.racks.iter().any(|s| {
                            !cut.contains(&s.rack)
                                && s.apps.get(&m.appliance).is_some_and(|(o, st, _)| {
                                    o.as_deref() == Some(s.rack.as_str()) && st == "running"
                                })
                        });
                        if !running {
                            abort_reason = Some(format!(
                                "{} down longer than {} s",
                                m.appliance,
                                DOWN_ABORT.as_secs()
                            ));
                        }
                    }
                }
                if lifted_ms.is_none() && now < deadline {
                    let ours = statuses.contains_key(&self.controller);
                    if ours {
                        if let Ok(f) = self.racks[0].1.drill_faults().await {
                            if f.is_empty() {
                                abort_reason = Some("aborted by `fieldrack drill abort`".into());
                            }
                        }
                    }
                }
                rounds.push(round);
                if abort_reason.is_some() {
                    break;
                }
                if lifted_ms.is_none() && now >= deadline {
                    lifted_ms = Some(deadline);
                    println!("fault lifted (deadline); waiting for the field to heal");
                }
                if let Some(l) = lifted_ms {
                    let whole = rounds.last().is_some_and(|r| {
                        let names: Vec<&str> = r.racks.iter().map(|s| s.rack.as_str()).collect();
                        r.racks.iter().all(|s| {
                            s.answered
                                && names.iter().filter(|n| **n != s.rack).all(|n| {
                                    s.peers.get(*n) == Some(&mesh::membership::State::Alive)
                                })
                        })
                    });
                    if whole || now >= l + HEAL_WAIT.as_millis() as u64 {
                        break;
                    }
                }
            }
            if let Some(reason) = &abort_reason {
                println!("aborting: {reason}");
                self.abort_all().await;
                lifted_ms = Some(unix_ms());
                // A few more rounds to see the field come back.
                for _ in 0..4 {
                    tokio::time::sleep(Duration::from_millis(PROBE_INTERVAL_MS)).await;
                    rounds.push(self.round().await.0);
                }
            }
            let events = self.events_since(fault_ms.saturating_sub(1000)).await;
            steps.push(build_step(&StepInput {
                fault: &step.fault,
                fault_ms,
                lifted_ms,
                moves: &moves,
                before: &before,
                rounds: &rounds,
                events: &events,
            }));
            if abort_reason.is_some() {
                break;
            }
        }
        let mut report = Report {
            version: REPORT_VERSION,
            id,
            scenario: sc.describe(),
            controller: self.controller.clone(),
            started_ms,
            ended_ms: unix_ms(),
            outcome: String::new(),
            abort_reason,
            steps,
        };
        report.outcome = if report.abort_reason.is_some() {
            "aborted"
        } else if report.targets_pass() {
            "passed"
        } else {
            "failed"
        }
        .into();
        for (rack, c) in &self.racks {
            if let Err(e) = c.drill_store_report(&report).await {
                println!("note: the report could not be kept on {rack}: {e:#}");
            }
        }
        Ok(report)
    }

    /// Every rack's events from `since_ms` on.
    async fn events_since(&self, since_ms: u64) -> Vec<(String, node_agent::state::Event)> {
        let all = join_all(self.racks.iter().map(|(rack, c)| async move {
            (
                rack.clone(),
                c.events(EVENTS_READ).await.unwrap_or_default(),
            )
        }))
        .await;
        all.into_iter()
            .flat_map(|(rack, evs)| {
                evs.into_iter()
                    .filter(move |e| e.at_ms >= since_ms)
                    .map(move |e| (rack.clone(), e))
            })
            .collect()
    }
}

/// Each moved appliance's epoch and RPO target at the fault: the epoch
/// from any rack's view, the target from the configured snapshot interval.
fn before_fault(
    moves: &[plan::Move],
    statuses: &BTreeMap<String, Status>,
    snapshot_interval_s: f64,
) -> BTreeMap<String, (u64, f64)> {
    moves
        .iter()
        .map(|m| {
            let epoch = statuses
                .values()
                .find_map(|s| s.appliances.iter().find(|a| a.name == m.appliance))
                .map_or(0, |a| a.epoch);
            let target = (snapshot_interval_s * RPO_TARGET_INTERVALS).max(RPO_TARGET_FLOOR_S);
            (m.appliance.clone(), (epoch, target))
        })
        .collect()
}

/// The scenario arguments shared by `plan` and `run`.
#[derive(clap::Args)]
pub struct ScenarioArgs {
    /// The scenario: `power-loss RACK`, `isolate RACK`, `cut-link A B`,
    /// `partition A,B|C`, `generator RACK`, `backhaul-down [RACK]`
    /// (`fieldrack drill list`).
    pub words: Vec<String>,
    /// Steps from a drill file (TOML `[[step]]` tables) instead.
    #[arg(long, conflicts_with = "words")]
    pub file: Option<PathBuf>,
    /// How long the fault lasts, seconds (the agents heal it then).
    #[arg(long, default_value_t = scenario::DEFAULT_DURATION.as_secs())]
    pub duration: u64,
    /// cut-link and partition: drop one direction only.
    #[arg(long)]
    pub one_way: bool,
    /// generator: battery runtime at the start, seconds.
    #[arg(long)]
    pub runtime: Option<u64>,
}

impl ScenarioArgs {
    fn scenario(&self) -> Result<Scenario, Failure> {
        match &self.file {
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))
                    .map_err(Failure::BadInput)?;
                scenario::parse_file(&text).map_err(|e| Failure::BadInput(e.into()))
            }
            None => scenario::parse_words(
                &self.words,
                self.one_way,
                self.runtime,
                Duration::from_secs(self.duration),
            )
            .map_err(|e| Failure::BadInput(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_names_every_scenario() {
        let l = render_list();
        for (s, _) in SCENARIOS {
            assert!(l.contains(s), "{s}");
        }
        assert_eq!(render_report_list(&[]), "no drill reports on this rack\n");
    }
}
