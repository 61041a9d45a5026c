//! The drill report, sans IO: from the steady-state samples (every rack's
//! status and probe, every 500 ms) and the racks' event logs, the timeline
//! of each appliance that moved (fault → suspect → dead → reassigned → old
//! lease expired → started → healthy → re-protected → healed, in ms from
//! the fault) and a verdict per target. The JSON ([`Report`], `version`
//! 1) is a stable contract: the console shows it, and every rack keeps it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use mesh::membership::State;
use serde::{Deserialize, Serialize};

use super::faults::Fault;
use super::plan::Move;
use super::probe::ProbeAnswer;
use crate::state::Event;
use crate::status::Status;

/// The report format's version.
pub const REPORT_VERSION: u32 = 1;
/// Target: fault → the appliance healthy on a survivor.
pub const FAILOVER_TARGET_MS: u64 = 20_000;
/// The RPO target is this many snapshot intervals (a snapshot being
/// pushed while the next is taken), and never under
/// [`RPO_TARGET_FLOOR_S`].
pub const RPO_TARGET_INTERVALS: f64 = 2.0;
/// See [`RPO_TARGET_INTERVALS`].
pub const RPO_TARGET_FLOOR_S: f64 = 5.0;
/// Sampling period of the steady-state probes.
pub const PROBE_INTERVAL_MS: u64 = 500;
/// Reports each rack keeps (the oldest go).
pub const MAX_REPORTS: usize = 32;

/// The steps of an appliance's timeline, in order.
pub const MARKS: [&str; 9] = [
    "fault",
    "suspect",
    "dead",
    "reassigned",
    "old_lease_expired",
    "started",
    "healthy",
    "reprotected",
    "healed",
];

/// A drill's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// [`REPORT_VERSION`].
    pub version: u32,
    /// Unique, sorts by start time.
    pub id: String,
    /// As the command line spells it.
    pub scenario: String,
    /// The rack the drill ran from.
    pub controller: String,
    /// Unix ms.
    pub started_ms: u64,
    /// Unix ms.
    pub ended_ms: u64,
    /// `passed`, `failed` or `aborted`.
    pub outcome: String,
    /// Why it was aborted.
    pub abort_reason: Option<String>,
    /// One per step.
    pub steps: Vec<StepReport>,
}

/// One fault's measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// The fault.
    pub fault: Fault,
    /// When the racks took the order (unix ms, the controller's clock).
    pub fault_ms: u64,
    /// When the fault was lifted (deadline or abort).
    pub lifted_ms: Option<u64>,
    /// The appliances that moved (or were expected to).
    pub appliances: Vec<AppTimeline>,
    /// Verdicts.
    pub targets: Vec<Target>,
    /// What the probes saw.
    pub probes: ProbeSummary,
}

/// One appliance's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppTimeline {
    /// The appliance.
    pub appliance: String,
    /// Its owner at the fault.
    pub from: String,
    /// Where it ran next.
    pub to: Option<String>,
    /// Epoch at the fault.
    pub epoch_before: u64,
    /// Epoch after.
    pub epoch_after: Option<u64>,
    /// RPO at the fault, seconds.
    pub rpo_s: Option<f64>,
    /// Its RPO target, seconds.
    pub rpo_target_s: f64,
    /// The steps seen, in [`MARKS`] order.
    pub marks: Vec<Mark>,
}

/// One step of a timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    /// One of [`MARKS`].
    pub step: String,
    /// Unix ms.
    pub at_ms: u64,
    /// Ms since the fault.
    pub t_ms: i64,
    /// Where it was seen (`event` on a rack or `probe`).
    pub source: String,
}

/// A target and its verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// What.
    pub name: String,
    /// The limit, in words.
    pub limit: String,
    /// What was measured, in words.
    pub measured: String,
    /// `pass`, `fail` or `n/a`.
    pub verdict: String,
}

/// What the probes saw during one step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeSummary {
    /// Sampling period.
    pub interval_ms: u64,
    /// Rounds sampled.
    pub rounds: u32,
    /// Per rack: rounds whose status did not come.
    pub status_missing: BTreeMap<String, u32>,
    /// Per rack: tiles served / not served.
    pub tiles_ok: BTreeMap<String, u32>,
    /// See `tiles_ok`.
    pub tiles_failed: BTreeMap<String, u32>,
    /// Rounds in which two racks ran one appliance.
    pub two_copies_rounds: u32,
}

/// What one rack answered in one probe round.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RackSample {
    /// The rack.
    pub rack: String,
    /// Whether its status came.
    pub answered: bool,
    /// How it sees the other racks.
    pub peers: BTreeMap<String, State>,
    /// Appliances: (owner, state, epoch), as this rack sees them.
    pub apps: BTreeMap<String, (Option<String>, String, u64)>,
    /// Volumes it owns: (generation, each replica rack's generation).
    pub volumes: BTreeMap<String, (u64, BTreeMap<String, u64>)>,
    /// Its tile probe (None: no proxy or no answer).
    pub tile: Option<bool>,
}

impl RackSample {
    /// From a rack's status and probe answer (None: it did not answer).
    #[must_use]
    pub fn from_status(rack: &str, status: Option<&Status>, probe: Option<&ProbeAnswer>) -> Self {
        let Some(s) = status else {
            return Self {
                rack: rack.to_owned(),
                tile: probe.and_then(|p| p.tile.as_ref()).map(|t| t.ok),
                ..Self::default()
            };
        };
        Self {
            rack: rack.to_owned(),
            answered: true,
            peers: s
                .peers
                .iter()
                .filter_map(|p| Some((p.rack.clone()?, p.state)))
                .collect(),
            apps: s
                .appliances
                .iter()
                .map(|a| (a.name.clone(), (a.owner.clone(), a.state.clone(), a.epoch)))
                .collect(),
            volumes: s
                .volumes
                .iter()
                .filter(|v| v.image.is_some())
                .map(|v| {
                    let replicas = v
                        .replicas
                        .iter()
                        .filter_map(|r| Some((r.rack.clone(), r.generation?)))
                        .collect();
                    (v.name.clone(), (v.generation.unwrap_or(0), replicas))
                })
                .collect(),
            tile: probe.and_then(|p| p.tile.as_ref()).map(|t| t.ok),
        }
    }

    fn runs_locally(&self, app: &str) -> bool {
        self.apps
            .get(app)
            .is_some_and(|(o, st, _)| o.as_deref() == Some(self.rack.as_str()) && st == "running")
    }
}

/// One probe round.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Round {
    /// When it began (unix ms).
    pub at_ms: u64,
    /// Every rack's answer.
    pub racks: Vec<RackSample>,
}

/// Everything one step's report is built from.
#[derive(Debug, Clone)]
pub struct StepInput<'a> {
    /// The fault.
    pub fault: &'a Fault,
    /// When it was ordered.
    pub fault_ms: u64,
    /// When it was lifted.
    pub lifted_ms: Option<u64>,
    /// The blast radius printed before.
    pub moves: &'a [Move],
    /// Each moved appliance's epoch and RPO target at the fault.
    pub before: &'a BTreeMap<String, (u64, f64)>,
    /// The probe rounds of this step.
    pub rounds: &'a [Round],
    /// Every rack's events from the step's time.
    pub events: &'a [(String, Event)],
}

fn mark(step: &str, at_ms: u64, fault_ms: u64, source: String) -> Mark {
    Mark {
        step: step.to_owned(),
        at_ms,
        t_ms: at_ms as i64 - fault_ms as i64,
        source,
    }
}

/// Build one step's report.
#[must_use]
pub fn build_step(i: &StepInput<'_>) -> StepReport {
    let cut: BTreeSet<&str> = i.fault.cut_off().into_iter().collect();
    let after = |at: u64| at >= i.fault_ms;
    let mut appliances = Vec::new();
    for m in i.moves {
        let (epoch_before, rpo_target_s) = i
            .before
            .get(&m.appliance)
            .copied()
            .unwrap_or((0, RPO_TARGET_FLOOR_S));
        let mut marks = vec![mark("fault", i.fault_ms, i.fault_ms, "drill".into())];
        // SWIM, from the survivors' event logs.
        for (step, state) in [("suspect", "suspect"), ("dead", "dead")] {
            let seen = i
                .events
                .iter()
                .filter(|(r, e)| {
                    !cut.contains(r.as_str())
                        && e.kind == "peer_state"
                        && after(e.at_ms)
                        && e.detail["rack"] == m.from.as_str()
                        && e.detail["to"] == state
                })
                .min_by_key(|(_, e)| e.at_ms);
            if let Some((r, e)) = seen {
                marks.push(mark(step, e.at_ms, i.fault_ms, format!("event on {r}")));
            }
        }
        // The new owner's failover event.
        let failover = i
            .events
            .iter()
            .filter(|(_, e)| {
                e.kind == "failover"
                    && e.detail["appliance"] == m.appliance.as_str()
                    && e.detail["epoch"].as_u64().is_some_and(|x| x > epoch_before)
                    && after(e.at_ms)
            })
            .min_by_key(|(_, e)| e.at_ms);
        let first_round = |f: &dyn Fn(&RackSample) -> bool| {
            i.rounds.iter().filter(|r| after(r.at_ms)).find_map(|r| {
                r.racks
                    .iter()
                    .find(|s| f(s))
                    .map(|s| (r.at_ms, s.rack.clone()))
            })
        };
        let new_epoch = |s: &RackSample| {
            s.apps
                .get(&m.appliance)
                .is_some_and(|(_, _, e)| *e > epoch_before)
        };
        let ms = |key: &str| failover.and_then(|(_, e)| e.detail[key].as_u64());
        match (ms("decided_ms"), first_round(&new_epoch)) {
            (Some(t), _) => marks.push(mark(
                "reassigned",
                t,
                i.fault_ms,
                format!("event on {}", failover.map_or("", |f| f.0.as_str())),
            )),
            (None, Some((t, r))) => {
                marks.push(mark("reassigned", t, i.fault_ms, format!("probe of {r}")))
            }
            (None, None) => {}
        }
        // The old owner fenced its copy: its lease ended `lease_left_ms`
        // after that.
        let fenced = i
            .events
            .iter()
            .filter(|(r, e)| {
                *r == m.from
                    && e.kind == "appliance_fenced"
                    && e.detail["appliance"] == m.appliance.as_str()
                    && e.detail["epoch"].as_u64() == Some(epoch_before)
                    && after(e.at_ms)
            })
            .min_by_key(|(_, e)| e.at_ms);
        if let Some((r, e)) = fenced {
            if let Some(left) = e.detail["lease_left_ms"].as_i64() {
                let at = (e.at_ms as i64 + left).max(0) as u64;
                marks.push(mark(
                    "old_lease_expired",
                    at,
                    i.fault_ms,
                    format!("event on {r}"),
                ));
            }
        }
        let to = failover.map(|(r, _)| r.clone()).or_else(|| {
            first_round(&|s: &RackSample| new_epoch(s) && s.runs_locally(&m.appliance))
                .map(|(_, r)| r)
        });
        let running_on_new =
            |s: &RackSample| Some(&s.rack) == to.as_ref() && s.runs_locally(&m.appliance);
        let probe_running = first_round(&running_on_new);
        let src = |what: &str| format!("{what} on {}", to.as_deref().unwrap_or("?"));
        match (ms("started_ms"), &probe_running) {
            (Some(t), _) => marks.push(mark("started", t, i.fault_ms, src("event"))),
            (None, Some((t, _))) => marks.push(mark("started", *t, i.fault_ms, src("probe"))),
            _ => {}
        }
        match (ms("healthy_ms"), &probe_running) {
            (Some(t), _) => marks.push(mark("healthy", t, i.fault_ms, src("event"))),
            (None, Some((t, _))) => marks.push(mark("healthy", *t, i.fault_ms, src("probe"))),
            _ => {}
        }
        // Re-protected: the new owner's volumes of this appliance each
        // have a replica within one snapshot again, on a rack the fault
        // did not cut off (the old owner's stale copy does not count).
        let vols: Vec<String> = failover
            .and_then(|(_, e)| e.detail["volumes"].as_object())
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        let started_at = marks.iter().find(|x| x.step == "started").map(|x| x.at_ms);
        if let (Some(start), Some(owner), false) = (started_at, &to, vols.is_empty()) {
            let seen = i.rounds.iter().filter(|r| r.at_ms >= start).find(|r| {
                r.racks.iter().any(|s| {
                    s.rack == *owner
                        && vols.iter().all(|v| {
                            s.volumes.get(v).is_some_and(|(g, replicas)| {
                                replicas.iter().any(|(r, rg)| {
                                    !cut.contains(r.as_str()) && *rg > 0 && rg + 1 >= *g
                                })
                            })
                        })
                })
            });
            if let Some(r) = seen {
                marks.push(mark(
                    "reprotected",
                    r.at_ms,
                    i.fault_ms,
                    format!("probe of {owner}"),
                ));
            }
        }
        if let Some(h) = healed_at(i) {
            marks.push(mark("healed", h, i.fault_ms, "probe".into()));
        }
        let epoch_after = i
            .rounds
            .iter()
            .rev()
            .flat_map(|r| r.racks.iter())
            .filter_map(|s| s.apps.get(&m.appliance).map(|a| a.2))
            .find(|e| *e > epoch_before);
        appliances.push(AppTimeline {
            appliance: m.appliance.clone(),
            from: m.from.clone(),
            to,
            epoch_before,
            epoch_after,
            rpo_s: m.rpo_s,
            rpo_target_s,
            marks,
        });
    }
    let probes = summarize(i, &cut);
    let targets = verdicts(i, &appliances, &probes, &cut);
    StepReport {
        fault: i.fault.clone(),
        fault_ms: i.fault_ms,
        lifted_ms: i.lifted_ms,
        appliances,
        targets,
        probes,
    }
}

/// The first round after the fault was lifted in which every rack that
/// answered sees every other rack alive.
fn healed_at(i: &StepInput<'_>) -> Option<u64> {
    let lifted = i.lifted_ms?;
    i.rounds
        .iter()
        .filter(|r| r.at_ms >= lifted)
        .find(|r| {
            let names: Vec<&str> = r.racks.iter().map(|s| s.rack.as_str()).collect();
            r.racks.iter().all(|s| {
                s.answered
                    && names
                        .iter()
                        .filter(|n| **n != s.rack)
                        .all(|n| s.peers.get(*n) == Some(&State::Alive))
            })
        })
        .map(|r| r.at_ms)
}

fn summarize(i: &StepInput<'_>, _cut: &BTreeSet<&str>) -> ProbeSummary {
    let mut p = ProbeSummary {
        interval_ms: PROBE_INTERVAL_MS,
        ..ProbeSummary::default()
    };
    for r in i.rounds {
        p.rounds += 1;
        let mut apps: BTreeMap<&str, u32> = BTreeMap::new();
        for s in &r.racks {
            if !s.answered {
                *p.status_missing.entry(s.rack.clone()).or_default() += 1;
            }
            match s.tile {
                Some(true) => *p.tiles_ok.entry(s.rack.clone()).or_default() += 1,
                Some(false) => *p.tiles_failed.entry(s.rack.clone()).or_default() += 1,
                None => {}
            }
            for name in s.apps.keys() {
                if s.runs_locally(name) {
                    *apps.entry(name.as_str()).or_default() += 1;
                }
            }
        }
        if apps.values().any(|n| *n > 1) {
            p.two_copies_rounds += 1;
        }
    }
    p
}

fn target(name: &str, limit: String, measured: String, verdict: Option<bool>) -> Target {
    Target {
        name: name.to_owned(),
        limit,
        measured,
        verdict: match verdict {
            Some(true) => "pass",
            Some(false) => "fail",
            None => "n/a",
        }
        .to_owned(),
    }
}

fn verdicts(
    i: &StepInput<'_>,
    apps: &[AppTimeline],
    probes: &ProbeSummary,
    cut: &BTreeSet<&str>,
) -> Vec<Target> {
    let mut out = Vec::new();
    let healthy: Vec<(String, Option<i64>)> = apps
        .iter()
        .map(|a| {
            (
                a.appliance.clone(),
                a.marks.iter().find(|m| m.step == "healthy").map(|m| m.t_ms),
            )
        })
        .collect();
    let worst = healthy.iter().map(|(_, t)| t.unwrap_or(i64::MAX)).max();
    out.push(target(
        "failover",
        format!("fault -> healthy <= {} s", FAILOVER_TARGET_MS / 1000),
        if healthy.is_empty() {
            "no appliance moved".into()
        } else {
            healthy
                .iter()
                .map(|(a, t)| match t {
                    Some(t) => format!("{a} {:.1} s", *t as f64 / 1000.0),
                    None => format!("{a} never healthy"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        },
        worst.map(|w| w <= FAILOVER_TARGET_MS as i64),
    ));
    // A generator drill's move is a handover: the old owner stops the
    // appliance and ships its last snapshot, so no write is at risk. If
    // the handover failed and the lease ran out instead (a `dead` or
    // `old_lease_expired` mark), the replica's lag counts as for a crash.
    let handed_over = |a: &AppTimeline| {
        matches!(i.fault, Fault::Generator { .. })
            && a.to.is_some()
            && !a
                .marks
                .iter()
                .any(|m| m.step == "dead" || m.step == "old_lease_expired")
    };
    let rpo: Vec<String> = apps
        .iter()
        .map(|a| match a.rpo_s {
            _ if handed_over(a) => format!("{} handed over with its last snapshot", a.appliance),
            Some(r) => format!("{} {r:.1} s (target {:.1} s)", a.appliance, a.rpo_target_s),
            None => format!("{} unknown", a.appliance),
        })
        .collect();
    out.push(target(
        "rpo",
        format!("<= {RPO_TARGET_INTERVALS} snapshot intervals (at least {RPO_TARGET_FLOOR_S} s)"),
        if rpo.is_empty() {
            "no appliance moved".into()
        } else {
            rpo.join(", ")
        },
        (!apps.is_empty()).then(|| {
            apps.iter()
                .all(|a| handed_over(a) || a.rpo_s.is_some_and(|r| r <= a.rpo_target_s))
        }),
    ));
    out.push(target(
        "one copy",
        "zero rounds with two copies of an appliance running".into(),
        format!("{} of {} rounds", probes.two_copies_rounds, probes.rounds),
        (probes.rounds > 0).then_some(probes.two_copies_rounds == 0),
    ));
    let survivors_failed: u32 = probes
        .tiles_failed
        .iter()
        .filter(|(r, _)| !cut.contains(r.as_str()))
        .map(|(_, n)| *n)
        .sum();
    let survivors_ok: u32 = probes
        .tiles_ok
        .iter()
        .filter(|(r, _)| !cut.contains(r.as_str()))
        .map(|(_, n)| *n)
        .sum();
    out.push(target(
        "tiles",
        "served throughout on the surviving racks".into(),
        if survivors_ok + survivors_failed == 0 {
            "no rack serves tiles".into()
        } else {
            format!("{survivors_ok} served, {survivors_failed} failed")
        },
        (survivors_ok + survivors_failed > 0).then_some(survivors_failed == 0),
    ));
    let _ = i;
    out
}

impl Report {
    /// Whether every target passed (or does not apply).
    #[must_use]
    pub fn targets_pass(&self) -> bool {
        self.steps
            .iter()
            .flat_map(|s| &s.targets)
            .all(|t| t.verdict != "fail")
    }

    /// The table printed at the end of a run and by `drill report`.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = format!(
            "drill {}: {} (from {}), {}, {:.1} s\n",
            self.id,
            self.scenario,
            self.controller,
            self.outcome.to_uppercase(),
            self.ended_ms.saturating_sub(self.started_ms) as f64 / 1000.0
        );
        if let Some(r) = &self.abort_reason {
            let _ = writeln!(out, "  aborted: {r}");
        }
        for s in &self.steps {
            let _ = writeln!(out, "step {}:", s.fault.describe());
            for a in &s.appliances {
                let _ = writeln!(
                    out,
                    "  {}: {} -> {}, epoch {} -> {}",
                    a.appliance,
                    a.from,
                    a.to.as_deref().unwrap_or("-"),
                    a.epoch_before,
                    a.epoch_after.map_or("-".into(), |e| e.to_string())
                );
                for step in MARKS {
                    match a.marks.iter().find(|m| m.step == step) {
                        Some(m) => {
                            let _ =
                                writeln!(out, "    {step:<18} {:>+8} ms  ({})", m.t_ms, m.source);
                        }
                        None => {
                            let _ = writeln!(out, "    {step:<18} {:>8}", "-");
                        }
                    }
                }
            }
            for t in &s.targets {
                let _ = writeln!(
                    out,
                    "  [{:^4}] {}: {} (limit: {})",
                    t.verdict, t.name, t.measured, t.limit
                );
            }
            let _ = writeln!(
                out,
                "  probes: {} rounds every {} ms; status missing {:?}; tiles failed {:?}",
                s.probes.rounds,
                s.probes.interval_ms,
                s.probes.status_missing,
                s.probes.tiles_failed
            );
        }
        out
    }

    /// A standalone HTML page: the timeline of each appliance as an SVG
    /// chart (one row per appliance, a dot per step, the fault's span
    /// shaded), then the targets.
    #[must_use]
    pub fn html(&self) -> String {
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', "&quot;")
        };
        let mut body = String::new();
        for s in &self.steps {
            let end = s
                .appliances
                .iter()
                .flat_map(|a| a.marks.iter().map(|m| m.t_ms))
                .chain(s.lifted_ms.map(|l| l as i64 - s.fault_ms as i64))
                .max()
                .unwrap_or(1000)
                .max(1000) as f64;
            // One lane per step of each appliance (a Gantt-like chart:
            // labels never overlap however close the steps are).
            let (w, left, right, lane) = (900.0, 150.0, 90.0, 16.0);
            let x = |t: i64| left + (t.max(0) as f64 / end) * (w - left - right);
            let per_app = lane * (MARKS.len() as f64 + 1.5);
            let h = 30.0 + per_app * s.appliances.len().max(1) as f64;
            let _ = write!(
                body,
                "<h2>{}</h2>\n<svg width=\"{w}\" height=\"{h}\" xmlns=\"http://www.w3.org/2000/svg\" font-family=\"sans-serif\" font-size=\"11\">\n",
                esc(&s.fault.describe())
            );
            if let Some(l) = s.lifted_ms {
                let lx = x(l as i64 - s.fault_ms as i64);
                let _ = writeln!(
                    body,
                    "<rect x=\"{left}\" y=\"4\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#fde2e2\"/><text x=\"{:.1}\" y=\"16\" text-anchor=\"end\">fault in force</text>",
                    lx - left,
                    h - 8.0,
                    lx - 4.0
                );
            }
            for (n, a) in s.appliances.iter().enumerate() {
                let top = 30.0 + per_app * n as f64;
                let _ = writeln!(
                    body,
                    "<text x=\"4\" y=\"{top}\" font-weight=\"bold\">{} {}→{}</text>",
                    esc(&a.appliance),
                    esc(&a.from),
                    esc(a.to.as_deref().unwrap_or("?"))
                );
                for (k, step) in MARKS.iter().enumerate() {
                    let y = top + lane * (k as f64 + 1.0);
                    let _ = writeln!(
                        body,
                        "<text x=\"14\" y=\"{y}\">{step}</text><line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
                        y - 4.0,
                        w - right,
                        y - 4.0
                    );
                    if let Some(m) = a.marks.iter().find(|m| m.step == *step) {
                        let mx = x(m.t_ms);
                        let _ = writeln!(
                            body,
                            "<circle cx=\"{mx:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#c0392b\"><title>{} +{} ms ({})</title></circle><text x=\"{:.1}\" y=\"{y}\">+{:.1} s</text>",
                            y - 4.0,
                            esc(&m.step),
                            m.t_ms,
                            esc(&m.source),
                            mx + 7.0,
                            m.t_ms as f64 / 1000.0
                        );
                    }
                }
            }
            body.push_str("</svg>\n<table border=\"1\" cellpadding=\"4\"><tr><th>target</th><th>limit</th><th>measured</th><th>verdict</th></tr>\n");
            for t in &s.targets {
                let _ = writeln!(
                    body,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&t.name),
                    esc(&t.limit),
                    esc(&t.measured),
                    esc(&t.verdict)
                );
            }
            body.push_str("</table>\n");
        }
        format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Fieldrack drill {id}</title></head>\n<body style=\"font-family:sans-serif\">\n<h1>Drill {id}: {sc}</h1>\n<p>From {ctl}; outcome <b>{out}</b>.</p>\n{body}<script type=\"application/json\" id=\"report\">{json}</script>\n</body></html>\n",
            id = esc(&self.id),
            sc = esc(&self.scenario),
            ctl = esc(&self.controller),
            out = esc(&self.outcome),
            json = serde_json::to_string(self)
                .expect("report serializes")
                .replace("</", "<\\/"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rack: &str, peers: &[(&str, State)], apps: &[(&str, &str, &str, u64)]) -> RackSample {
        RackSample {
            rack: rack.into(),
            answered: true,
            peers: peers.iter().map(|(r, s)| ((*r).into(), *s)).collect(),
            apps: apps
                .iter()
                .map(|(n, o, st, e)| ((*n).into(), (Some((*o).into()), (*st).into(), *e)))
                .collect(),
            volumes: BTreeMap::new(),
            tile: Some(true),
        }
    }

    fn event(seq: u64, at_ms: u64, kind: &str, detail: serde_json::Value) -> Event {
        Event {
            seq,
            at_ms,
            kind: kind.into(),
            detail,
        }
    }

    /// A power loss of b, whose recorder moves to c: every step seen.
    #[test]
    fn power_loss_timeline_and_verdicts() {
        use State::{Alive, Dead};
        let fault = Fault::PowerLoss { rack: "b".into() };
        let moves = vec![Move {
            appliance: "recorder".into(),
            from: "b".into(),
            to: Some("c".into()),
            rpo_s: Some(1.2),
        }];
        let before: BTreeMap<String, (u64, f64)> = [("recorder".to_owned(), (3, 5.0))].into();
        let t0 = 1_000_000;
        let alive_all = |r: &str| {
            ["a", "b", "c"]
                .into_iter()
                .filter(|x| *x != r)
                .map(|x| (x, Alive))
                .collect::<Vec<_>>()
        };
        let mut rounds = Vec::new();
        for k in 0..40u64 {
            let at = t0 + k * 500;
            let moved = at >= t0 + 9_000;
            let (owner, epoch) = if moved { ("c", 4) } else { ("b", 3) };
            let healed = at >= t0 + 16_000;
            let mut racks = Vec::new();
            for r in ["a", "c"] {
                let mut peers = alive_all(r);
                if !healed && at >= t0 + 6_000 {
                    peers.retain(|(x, _)| *x != "b");
                    peers.push(("b", Dead));
                }
                let mut s = sample(r, &peers, &[("recorder", owner, "running", epoch)]);
                if r == "c" && moved {
                    // b's stale copy is listed throughout; a's arrives at +12 s.
                    let mut replicas: BTreeMap<String, u64> = [("b".to_owned(), 9)].into();
                    if at >= t0 + 12_000 {
                        replicas.insert("a".into(), 10);
                    }
                    s.volumes.insert("recorder-data".into(), (10, replicas));
                }
                racks.push(s);
            }
            racks.push(RackSample {
                rack: "b".into(),
                answered: true,
                peers: alive_all("b")
                    .into_iter()
                    .map(|(r, s)| (r.to_owned(), s))
                    .collect(),
                apps: [(
                    "recorder".to_owned(),
                    (Some("b".to_owned()), "fenced".to_owned(), 3),
                )]
                .into(),
                volumes: BTreeMap::new(),
                tile: None,
            });
            rounds.push(Round { at_ms: at, racks });
        }
        let events = vec![
            (
                "a".to_owned(),
                event(
                    1,
                    t0 + 1_500,
                    "peer_state",
                    serde_json::json!({"rack": "b", "to": "suspect"}),
                ),
            ),
            (
                "c".to_owned(),
                event(
                    2,
                    t0 + 5_600,
                    "peer_state",
                    serde_json::json!({"rack": "b", "to": "dead"}),
                ),
            ),
            (
                "b".to_owned(),
                event(
                    3,
                    t0 + 1_400,
                    "appliance_fenced",
                    serde_json::json!({"appliance": "recorder", "epoch": 3, "lease_left_ms": 6_000}),
                ),
            ),
            (
                "c".to_owned(),
                event(
                    4,
                    t0 + 9_300,
                    "failover",
                    serde_json::json!({
                "appliance": "recorder", "epoch": 4, "decided_ms": t0 + 6_100,
                "started_ms": t0 + 8_600, "healthy_ms": t0 + 8_900,
                "volumes": {"recorder-data": "promoted"}}),
                ),
            ),
        ];
        let r = build_step(&StepInput {
            fault: &fault,
            fault_ms: t0,
            lifted_ms: Some(t0 + 15_000),
            moves: &moves,
            before: &before,
            rounds: &rounds,
            events: &events,
        });
        let a = &r.appliances[0];
        let t = |s: &str| a.marks.iter().find(|m| m.step == s).map(|m| m.t_ms);
        assert_eq!(t("fault"), Some(0));
        assert_eq!(t("suspect"), Some(1_500));
        assert_eq!(t("dead"), Some(5_600));
        assert_eq!(t("reassigned"), Some(6_100));
        assert_eq!(t("old_lease_expired"), Some(7_400));
        assert_eq!(t("started"), Some(8_600));
        assert_eq!(t("healthy"), Some(8_900));
        assert_eq!(t("reprotected"), Some(12_000));
        assert_eq!(t("healed"), Some(16_000));
        assert_eq!(a.to.as_deref(), Some("c"));
        assert_eq!(a.epoch_after, Some(4));
        let v: BTreeMap<&str, &str> = r
            .targets
            .iter()
            .map(|t| (t.name.as_str(), t.verdict.as_str()))
            .collect();
        assert_eq!(v["failover"], "pass");
        assert_eq!(v["rpo"], "pass");
        assert_eq!(v["one copy"], "pass");
        assert_eq!(v["tiles"], "pass");
        assert_eq!(r.probes.rounds, 40);
    }

    #[test]
    fn two_copies_and_slow_failover_fail() {
        let fault = Fault::Isolate { rack: "b".into() };
        let moves = vec![Move {
            appliance: "db".into(),
            from: "b".into(),
            to: None,
            rpo_s: Some(30.0),
        }];
        let before: BTreeMap<String, (u64, f64)> = [("db".to_owned(), (1, 5.0))].into();
        let rounds = vec![Round {
            at_ms: 10,
            racks: vec![
                sample("b", &[], &[("db", "b", "running", 1)]),
                sample("c", &[], &[("db", "c", "running", 2)]),
            ],
        }];
        let r = build_step(&StepInput {
            fault: &fault,
            fault_ms: 0,
            lifted_ms: None,
            moves: &moves,
            before: &before,
            rounds: &rounds,
            events: &[],
        });
        let v: BTreeMap<&str, &str> = r
            .targets
            .iter()
            .map(|t| (t.name.as_str(), t.verdict.as_str()))
            .collect();
        assert_eq!(r.probes.two_copies_rounds, 1);
        assert_eq!(v["one copy"], "fail");
        assert_eq!(v["rpo"], "fail");
        // Running on c at the only round: healthy at +10 ms per the probe.
        assert_eq!(v["failover"], "pass");
        let report = Report {
            version: REPORT_VERSION,
            id: "x".into(),
            scenario: fault.describe(),
            controller: "a".into(),
            started_ms: 0,
            ended_ms: 10,
            outcome: "failed".into(),
            abort_reason: None,
            steps: vec![r],
        };
        assert!(!report.targets_pass());
        let html = report.html();
        assert!(html.contains("<svg") && html.contains("isolate b"));
        assert!(report.render().contains("[fail] one copy"));
        let back: Report = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        assert_eq!(back, report);
    }

    /// A generator drill hands the appliance over with its last snapshot:
    /// the replica's lag at the fault is no loss. If the lease ran out
    /// instead (the handover failed), the lag counts.
    #[test]
    fn a_handover_risks_no_writes_but_a_lease_expiry_does() {
        let fault = Fault::Generator {
            rack: "b".into(),
            runtime_s: 305,
        };
        let moves = vec![Move {
            appliance: "db".into(),
            from: "b".into(),
            to: None,
            rpo_s: Some(30.0),
        }];
        let before: BTreeMap<String, (u64, f64)> = [("db".to_owned(), (1, 5.0))].into();
        let rounds = vec![Round {
            at_ms: 7_000,
            racks: vec![
                sample("b", &[], &[("db", "c", "stopped", 2)]),
                sample("c", &[], &[("db", "c", "running", 2)]),
            ],
        }];
        let fenced = (
            "b".to_owned(),
            event(
                1,
                1_400,
                "appliance_fenced",
                serde_json::json!({"appliance": "db", "epoch": 1, "lease_left_ms": 6_000}),
            ),
        );
        for (events, want) in [(vec![], "pass"), (vec![fenced], "fail")] {
            let r = build_step(&StepInput {
                fault: &fault,
                fault_ms: 0,
                lifted_ms: Some(30_000),
                moves: &moves,
                before: &before,
                rounds: &rounds,
                events: &events,
            });
            let rpo = r.targets.iter().find(|t| t.name == "rpo").unwrap();
            assert_eq!(rpo.verdict, want, "{events:?}: {rpo:?}");
        }
    }
}
