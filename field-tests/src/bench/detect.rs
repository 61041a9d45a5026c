//! Failure detection over emulated links (`linkbench detect`).
//!
//! Two parts, each on a fresh field of three racks whose every pair talks
//! through the link emulator (mDNS still finds peers over the bridge):
//!
//! - **watch**, per profile (default `lossy` and `satellite`): nothing
//!   fails; every [`SAMPLE_EVERY`] each rack's status is read (all three
//!   at once) and each rack's view of each peer is one sample. Targets:
//!   no sample `dead` ([`Check`] "false dead"), at most
//!   [`MAX_SUSPECT_FRACTION`] of samples `suspect`. A sample whose status
//!   call failed (a busy machine) is counted as such, not as a state.
//! - **kill**, on one profile (default `radio-poor`): after the racks have
//!   measured the links for [`SETTLE`], one rack's agent is SIGKILLed and
//!   both others are polled until each reports it `dead`; the time is from
//!   the kill to the end of the status call that first showed it on the
//!   later of the two (polling included, so an upper bound). The rack is
//!   then restarted and rejoins, and the next run kills the next rack.
//!   Target: the median at most [`DEAD_WITHIN`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use super::{link_every_pair, median, profile, sample_statuses, secs, Check};
use crate::{wait_until, Agent, Field, Fleet, PeerState};

/// The racks of the field.
pub const RACKS: [&str; 3] = ["a", "b", "c"];

/// How often the watch samples every rack's view (every 500 ms, as the target is defined).
pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// How often the kill part polls the survivors: finer than the watch, as
/// the poll interval is part of the measured time.
pub const KILL_POLL: Duration = Duration::from_millis(100);

/// Issue 12: at most this fraction of peer-state samples `suspect`.
pub const MAX_SUSPECT_FRACTION: f64 = 0.05;

/// Issue 12: a killed rack is `dead` on both others within this.
pub const DEAD_WITHIN: Duration = Duration::from_secs(10);

/// From start until every rack sees the others `alive`: over satellite
/// links the first exchanges take several 600 ms round trips, on a machine
/// shared with builds.
pub const FORM_TIMEOUT: Duration = Duration::from_secs(90);

/// How long the racks exchange traffic before a kill, so their RTT
/// estimates are the link's, not a fresh start's.
pub const SETTLE: Duration = Duration::from_secs(10);

/// A kill run gives up waiting for `dead` after this (and counts as not
/// detected): three times the target.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on a restarted rack rejoining (every rack `alive` everywhere).
pub const REJOIN_TIMEOUT: Duration = Duration::from_secs(90);

/// A watch gives up when no status call succeeded for this long: the
/// agents are gone, not slow.
pub const STATUS_OUTAGE: Duration = Duration::from_secs(30);

/// What to run.
#[derive(Clone, Debug)]
pub struct DetectArgs {
    /// Profiles to watch (names with optional overrides).
    pub profiles: Vec<String>,
    /// How long each watch lasts.
    pub watch: Duration,
    /// Profile of the kill part.
    pub kill_profile: String,
    /// How many kills (0: none).
    pub kills: usize,
    /// Keep every fleet dir (configs, logs).
    pub keep: bool,
}

/// One rack's view of one peer over a watch.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PairReport {
    pub observer: String,
    pub subject: String,
    pub samples: u64,
    pub suspect: u64,
    pub dead: u64,
    /// The peer was not listed, or in a state this harness does not know.
    pub missing: u64,
    /// Last round-trip time the observer reported, ms.
    pub last_rtt_ms: Option<f64>,
}

/// One profile watched.
#[derive(Clone, Debug, Serialize)]
pub struct WatchReport {
    pub profile: String,
    /// From agent start to a full mesh of `alive` racks.
    pub formed_s: f64,
    /// How long the watch lasted.
    pub seconds: f64,
    /// Sample rounds (each reads every rack's status).
    pub rounds: u64,
    /// Peer-state samples (rack × peer × round whose status call worked).
    pub samples: u64,
    pub alive: u64,
    pub suspect: u64,
    pub dead: u64,
    pub missing: u64,
    /// Status calls that failed or timed out.
    pub failed_calls: u64,
    /// `suspect / samples`.
    pub suspect_fraction: f64,
    /// When the first `dead` sample was seen, from the watch's start.
    pub first_dead_s: Option<f64>,
    pub pairs: Vec<PairReport>,
}

/// One kill.
#[derive(Clone, Debug, Serialize)]
pub struct KillRun {
    /// The rack killed.
    pub victim: String,
    /// Survivor → seconds from the kill to its first `dead` report.
    pub dead_on: BTreeMap<String, f64>,
    /// The later of the two; `None` if one never did within the timeout.
    pub both_s: Option<f64>,
    /// A survivor reported the other survivor `dead` meanwhile.
    pub false_dead: bool,
}

/// The kill part.
#[derive(Clone, Debug, Serialize)]
pub struct KillReport {
    pub profile: String,
    pub runs: Vec<KillRun>,
    /// Median of `both_s` over the runs that detected; `None` if none did.
    pub median_s: Option<f64>,
    pub max_s: Option<f64>,
    /// Runs in which a survivor never reported the victim dead.
    pub undetected: usize,
}

/// Everything `linkbench detect` measured, with its targets.
#[derive(Clone, Debug, Serialize)]
pub struct DetectReport {
    pub watches: Vec<WatchReport>,
    pub kills: Option<KillReport>,
    pub checks: Vec<Check>,
}

/// A running fleet on a field. Agents stop (drop) before the fleet dir.
struct Scene {
    agents: Vec<Agent>,
    fleet: Fleet,
}

impl Scene {
    /// Provisions and starts three racks on `field`; waits for a full mesh.
    fn start(field: &Field, keep: bool) -> Result<(Scene, Duration)> {
        let mut fleet = Fleet::provision(&RACKS)?;
        if keep {
            fleet.keep();
        }
        let agents = fleet.start_all(field)?;
        let scene = Scene { agents, fleet };
        let formed = wait_until(FORM_TIMEOUT, "a full mesh of alive racks", || {
            scene.full_mesh(field)
        });
        match formed {
            Ok(took) => Ok((scene, took)),
            Err(e) => Err(scene.fail(e)),
        }
    }

    fn full_mesh(&self, field: &Field) -> Result<bool> {
        for (status, _) in sample_statuses(&self.fleet, field, &RACKS) {
            let s = status?;
            for other in RACKS.iter().filter(|o| **o != s.rack) {
                if s.state_of(other) != Some(PeerState::Alive) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Prints the agents' log tails and keeps the fleet dir; returns `e`.
    fn fail(mut self, e: anyhow::Error) -> anyhow::Error {
        eprintln!("detect: {e:#}");
        self.fleet.dump_logs(40);
        self.fleet.keep();
        e
    }
}

/// Runs the watches and the kills.
///
/// # Errors
/// A bad profile, a field or fleet that cannot be set up, racks that never
/// form a mesh, or status calls failing for [`STATUS_OUTAGE`]. Targets
/// missed are not errors: they are FAIL in [`DetectReport::checks`].
pub fn run(args: &DetectArgs) -> Result<DetectReport> {
    let mut watches = Vec::new();
    for spec in &args.profiles {
        eprintln!("detect: watching {spec} for {:.0} s", secs(args.watch));
        let w = watch_profile(spec, args.watch, args.keep)
            .with_context(|| format!("watching {spec}"))?;
        eprintln!(
            "detect: {spec}: {} of {} samples suspect ({:.2} %), {} dead, {} failed status calls",
            w.suspect,
            w.samples,
            w.suspect_fraction * 100.0,
            w.dead,
            w.failed_calls
        );
        watches.push(w);
    }
    let kills = if args.kills > 0 {
        Some(
            kill_runs(&args.kill_profile, args.kills, args.keep)
                .with_context(|| format!("killing racks behind {}", args.kill_profile))?,
        )
    } else {
        None
    };
    let checks = checks(&watches, kills.as_ref());
    Ok(DetectReport {
        watches,
        kills,
        checks,
    })
}

/// The targets of a detect run.
#[must_use]
pub fn checks(watches: &[WatchReport], kills: Option<&KillReport>) -> Vec<Check> {
    let mut checks = Vec::new();
    for w in watches {
        checks.push(Check::at_most(
            "detect",
            format!("{}: peer-state samples dead", w.profile),
            Some(w.dead as f64),
            0.0,
            "",
        ));
        checks.push(Check::at_most(
            "detect",
            format!("{}: peer-state samples suspect", w.profile),
            (w.samples > 0).then_some(w.suspect_fraction * 100.0),
            MAX_SUSPECT_FRACTION * 100.0,
            "%",
        ));
    }
    if let Some(k) = kills {
        checks.push(Check::at_most(
            "detect",
            format!(
                "{}: killed rack dead on both, median of {}",
                k.profile,
                k.runs.len()
            ),
            k.median_s,
            secs(DEAD_WITHIN),
            "s",
        ));
        let false_dead = k.runs.iter().filter(|r| r.false_dead).count();
        checks.push(Check::at_most(
            "detect",
            format!("{}: survivors reported dead during kills", k.profile),
            Some(false_dead as f64),
            0.0,
            "",
        ));
    }
    checks
}

/// One watch: a fresh field on `spec`, sampled for `duration`.
fn watch_profile(spec: &str, duration: Duration, keep: bool) -> Result<WatchReport> {
    let p = profile(spec)?;
    let field = Field::new(RACKS)?;
    let links = link_every_pair(&field, &p)?;
    let (scene, formed) = Scene::start(&field, keep)?;
    eprintln!(
        "detect: {spec}: full mesh {:.1} s after start",
        secs(formed)
    );
    let result = sample_for(&scene, &field, duration);
    let mut report = match result {
        Ok(r) => r,
        Err(e) => return Err(scene.fail(e)),
    };
    report.profile = spec.to_owned();
    report.formed_s = secs(formed);
    drop(scene);
    drop(links);
    Ok(report)
}

/// Samples every rack's view every [`SAMPLE_EVERY`] for `duration`. Rounds
/// keep their cadence: a slow round delays the next, a round that would
/// start more than one period late is skipped.
fn sample_for(scene: &Scene, field: &Field, duration: Duration) -> Result<WatchReport> {
    let mut pairs: BTreeMap<(String, String), PairReport> = BTreeMap::new();
    let (mut rounds, mut failed_calls) = (0u64, 0u64);
    let mut first_dead: Option<Duration> = None;
    let start = Instant::now();
    let mut last_ok = start;
    let mut next = start;
    while start.elapsed() < duration {
        rounds += 1;
        for (status, at) in sample_statuses(&scene.fleet, field, &RACKS) {
            let s = match status {
                Ok(s) => s,
                Err(_) => {
                    failed_calls += 1;
                    continue;
                }
            };
            last_ok = last_ok.max(at);
            for other in RACKS.iter().filter(|o| **o != s.rack) {
                let pair = pairs
                    .entry((s.rack.clone(), (*other).to_owned()))
                    .or_insert_with(|| PairReport {
                        observer: s.rack.clone(),
                        subject: (*other).to_owned(),
                        ..PairReport::default()
                    });
                pair.samples += 1;
                match s.peer(other) {
                    None => pair.missing += 1,
                    Some(peer) => {
                        match peer.state {
                            PeerState::Suspect => pair.suspect += 1,
                            PeerState::Dead => {
                                pair.dead += 1;
                                if first_dead.is_none() {
                                    first_dead = Some(start.elapsed());
                                    eprintln!(
                                        "detect: FALSE DEAD after {:.1} s: {}",
                                        secs(start.elapsed()),
                                        s.summary()
                                    );
                                }
                            }
                            PeerState::Unknown => pair.missing += 1,
                            PeerState::Alive => {}
                        }
                        if peer.rtt_ms.is_some() {
                            pair.last_rtt_ms = peer.rtt_ms;
                        }
                    }
                }
            }
        }
        if last_ok.elapsed() > STATUS_OUTAGE {
            bail!(
                "no status call succeeded for {:.0} s",
                secs(last_ok.elapsed())
            );
        }
        next += SAMPLE_EVERY;
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        } else if now - next > SAMPLE_EVERY {
            next = now;
        }
    }
    let pairs: Vec<PairReport> = pairs.into_values().collect();
    let sum = |f: fn(&PairReport) -> u64| pairs.iter().map(f).sum::<u64>();
    let (samples, suspect, dead, missing) = (
        sum(|p| p.samples),
        sum(|p| p.suspect),
        sum(|p| p.dead),
        sum(|p| p.missing),
    );
    Ok(WatchReport {
        profile: String::new(),
        formed_s: 0.0,
        seconds: secs(start.elapsed()),
        rounds,
        samples,
        alive: samples - suspect - dead - missing,
        suspect,
        dead,
        missing,
        failed_calls,
        suspect_fraction: if samples == 0 {
            0.0
        } else {
            suspect as f64 / samples as f64
        },
        first_dead_s: first_dead.map(secs),
        pairs,
    })
}

/// The kill part: `runs` kills on one field, rotating the victim.
fn kill_runs(spec: &str, runs: usize, keep: bool) -> Result<KillReport> {
    let p = profile(spec)?;
    let field = Field::new(RACKS)?;
    let links = link_every_pair(&field, &p)?;
    let (mut scene, formed) = Scene::start(&field, keep)?;
    eprintln!(
        "detect: {spec}: full mesh {:.1} s after start",
        secs(formed)
    );
    let mut done = Vec::new();
    for n in 0..runs {
        // c first (as the field tests do), then a, b, c, ...
        let victim = RACKS[(n + 2) % RACKS.len()];
        match kill_once(&mut scene, &field, victim) {
            Ok(run) => {
                eprintln!(
                    "detect: kill {}/{runs} of {victim} behind {spec}: dead on both after {}",
                    n + 1,
                    run.both_s
                        .map_or_else(|| "never".to_owned(), |s| format!("{s:.2} s"))
                );
                done.push(run);
            }
            Err(e) => return Err(scene.fail(e.context(format!("kill {} of {victim}", n + 1)))),
        }
    }
    drop(scene);
    drop(links);
    let detected: Vec<f64> = done.iter().filter_map(|r| r.both_s).collect();
    Ok(KillReport {
        profile: spec.to_owned(),
        median_s: median(&detected),
        max_s: detected.iter().copied().reduce(f64::max),
        undetected: done.len() - detected.len(),
        runs: done,
    })
}

/// Settle, SIGKILL `victim`, time `dead` on both survivors, restart it and
/// wait until it has rejoined.
fn kill_once(scene: &mut Scene, field: &Field, victim: &str) -> Result<KillRun> {
    std::thread::sleep(SETTLE);
    let survivors: Vec<&str> = RACKS.iter().copied().filter(|r| *r != victim).collect();
    let idx = scene
        .agents
        .iter()
        .position(|a| a.rack() == victim)
        .ok_or_else(|| anyhow!("no agent for rack {victim}"))?;
    scene.agents[idx].kill()?;
    let killed = Instant::now();
    let mut dead_on: BTreeMap<String, f64> = BTreeMap::new();
    let mut false_dead = false;
    while dead_on.len() < survivors.len() && killed.elapsed() < KILL_TIMEOUT {
        for (status, at) in sample_statuses(&scene.fleet, field, &survivors) {
            let Ok(s) = status else { continue };
            let other = survivors
                .iter()
                .find(|r| **r != s.rack)
                .expect("two survivors");
            if s.state_of(other) == Some(PeerState::Dead) {
                false_dead = true;
            }
            if s.state_of(victim) == Some(PeerState::Dead) {
                dead_on
                    .entry(s.rack.clone())
                    .or_insert_with(|| secs(at.duration_since(killed)));
            }
        }
        std::thread::sleep(KILL_POLL);
    }
    let both_s = (dead_on.len() == survivors.len())
        .then(|| dead_on.values().copied().reduce(f64::max))
        .flatten();
    scene.agents[idx] = scene.fleet.start(field, victim)?;
    let took = wait_until(REJOIN_TIMEOUT, "the killed rack rejoined", || {
        scene.full_mesh(field)
    })?;
    eprintln!(
        "detect: {victim} restarted, rejoined in {:.1} s",
        secs(took)
    );
    Ok(KillRun {
        victim: victim.to_owned(),
        dead_on,
        both_s,
        false_dead,
    })
}
