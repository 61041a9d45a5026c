//! Drills: repeated faults on a live field, with timings.
//!
//! `kill-rack`: three racks in namespaces, a tier-0 recorder appliance
//! (volumes snapshotted every second). Each run waits until the recorder
//! runs and a replica holds a snapshot taken on its current owner,
//! SIGKILLs the owner's agent, and times, from the survivors' status:
//! the owner `suspect` and `dead` (SWIM), the appliance reassigned (a new
//! epoch) and `running` on a survivor. It then reads the new owner's
//! `failover` event (detected/decided/started/healthy times), checks the
//! witness log (never two copies at once) and the new owner's image, and
//! restarts the killed rack. At the end: median, p90 and max of
//! kill → running against the target.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use field_tests::agent::ApplianceStatus;
use field_tests::appliance::{check_records, check_witness, recorder_manifest};
use field_tests::{wait_until, Agent, Field, Fleet, PeerState, Status};
use util::time::unix_ms;

const RACKS: [&str; 3] = ["a", "b", "c"];
const APP: &str = "recorder";
const VOLUME: &str = "recorder-data";

/// Target: median SIGKILL → running on a survivor.
const TARGET_MEDIAN: Duration = Duration::from_secs(20);

/// Bound on waiting for the control plane, a deploy, a replica, a rejoin.
const SETUP_TIMEOUT: Duration = Duration::from_secs(90);

/// Bound on one failover.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(90);

/// A field of three racks running the recorder. Agents drop (stop) before
/// the fleet dir and the namespaces.
struct Rig {
    agents: Vec<Agent>,
    fleet: Fleet,
    field: Field,
    witness: PathBuf,
}

/// What one run measured, from the SIGKILL.
#[derive(Debug, Default)]
struct Run {
    owner: String,
    epoch: u64,
    new_owner: String,
    new_epoch: u64,
    suspect: Option<Duration>,
    dead: Option<Duration>,
    reassigned: Option<Duration>,
    running: Duration,
    /// From the `failover` event: detected, decided, started, healthy,
    /// each relative to the kill (seconds; negative if a clock says so).
    event: Option<[Option<f64>; 4]>,
}

fn secs(d: Duration) -> String {
    format!("{:5.1} s", d.as_secs_f64())
}

impl Rig {
    fn status(&self, rack: &str) -> Result<Status> {
        self.fleet.status(&self.field, rack)
    }

    fn app(&self, rack: &str) -> Result<ApplianceStatus> {
        self.status(rack)?
            .appliance(APP)
            .cloned()
            .ok_or_else(|| anyhow!("rack {rack} does not list {APP}"))
    }

    /// Every rack sees the others alive and a control plane of 3 voters.
    fn healthy(&self) -> Result<bool> {
        for rack in RACKS {
            let s = self.status(rack)?;
            if !s.has_control_of(RACKS.len()) {
                return Ok(false);
            }
            if RACKS
                .iter()
                .any(|o| *o != rack && s.state_of(o) != Some(PeerState::Alive))
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Waits until the recorder runs and a replica holds a snapshot newer
    /// than when it was first seen running; returns owner and epoch.
    fn running_and_replicated(&self) -> Result<(String, u64)> {
        let mut seen: Option<(String, u64, u64)> = None;
        wait_until(SETUP_TIMEOUT, "the recorder running and replicated", || {
            let a = self.app(RACKS[0])?;
            let Some(owner) = a.owner.filter(|_| a.state == "running") else {
                seen = None;
                return Ok(false);
            };
            let s = self.status(&owner)?;
            let v = s
                .volume(VOLUME)
                .ok_or_else(|| anyhow!("{owner} does not hold {VOLUME}"))?;
            let generation = v.generation.unwrap_or(0);
            match &seen {
                Some((o, e, g)) if *o == owner && *e == a.epoch => {
                    Ok(v.replicas.iter().any(|r| r.generation.unwrap_or(0) > *g))
                }
                _ => {
                    seen = Some((owner, a.epoch, generation));
                    Ok(false)
                }
            }
        })?;
        let (owner, epoch, _) = seen.expect("set when the wait succeeds");
        Ok((owner, epoch))
    }

    fn agent_index(&self, rack: &str) -> Result<usize> {
        self.agents
            .iter()
            .position(|a| a.rack() == rack)
            .ok_or_else(|| anyhow!("no agent for rack {rack}"))
    }

    /// One kill: SIGKILL the owner, time the failover, check, restart.
    fn run_once(&mut self, n: usize, runs: usize) -> Result<Run> {
        let (owner, epoch) = self.running_and_replicated()?;
        let survivors: Vec<&str> = RACKS.iter().copied().filter(|r| *r != owner).collect();
        println!("run {n}/{runs}: {APP} on {owner} at epoch {epoch}, replicated");
        let idx = self.agent_index(&owner)?;
        let killed_ms = unix_ms();
        let killed = Instant::now();
        self.agents[idx].kill()?;
        let mut run = Run {
            owner: owner.clone(),
            epoch,
            ..Run::default()
        };
        let mut done: Option<(String, u64)> = None;
        let took = wait_until(
            FAILOVER_TIMEOUT,
            "the recorder running on a survivor",
            || {
                let mut last = Err(anyhow!("no survivor answered"));
                for rack in &survivors {
                    let s = match self.status(rack) {
                        Ok(s) => s,
                        Err(e) => {
                            last = Err(e);
                            continue;
                        }
                    };
                    let now = killed.elapsed();
                    match s.state_of(&owner) {
                        Some(PeerState::Suspect) => {
                            run.suspect.get_or_insert(now);
                        }
                        Some(PeerState::Dead) => {
                            run.suspect.get_or_insert(now);
                            run.dead.get_or_insert(now);
                        }
                        _ => {}
                    }
                    let Some(a) = s.appliance(APP) else {
                        last = Ok(false);
                        continue;
                    };
                    if a.epoch > epoch {
                        run.reassigned.get_or_insert(now);
                    }
                    let on_survivor = a.owner.as_deref().is_some_and(|o| survivors.contains(&o));
                    if a.state == "running" && a.epoch > epoch && on_survivor {
                        done = Some((a.owner.clone().expect("checked"), a.epoch));
                        return Ok(true);
                    }
                    last = Ok(false);
                }
                last
            },
        )?;
        run.running = took;
        let (new_owner, new_epoch) = done.expect("set when the wait succeeds");
        run.new_owner = new_owner.clone();
        run.new_epoch = new_epoch;

        // The new owner's account of it.
        run.event = self.failover_event(&new_owner, new_epoch, killed_ms);

        println!("  +{}  SIGKILL of {owner}'s agent", secs(Duration::ZERO));
        let line = |what: &str, t: Option<Duration>| match t {
            Some(t) => println!("  +{}  {what}", secs(t)),
            None => println!("        -   {what}: not seen (between polls)"),
        };
        line(
            &format!("{owner} suspect on a survivor (SWIM)"),
            run.suspect,
        );
        line(&format!("{owner} dead on a survivor (SWIM)"), run.dead);
        line(
            &format!("reassigned: epoch {epoch} -> {new_epoch}"),
            run.reassigned,
        );
        line(&format!("running on {new_owner}"), Some(run.running));
        match &run.event {
            Some(ev) => {
                let f = |x: Option<f64>| x.map_or("-".into(), |x| format!("+{x:.1} s"));
                println!(
                    "  failover event on {new_owner}: detected {}, decided {}, started {}, healthy {}",
                    f(ev[0]),
                    f(ev[1]),
                    f(ev[2]),
                    f(ev[3])
                );
            }
            None => println!("  failover event on {new_owner}: not found"),
        }

        // Let the new copy write, then check what it runs on.
        std::thread::sleep(Duration::from_secs(1));
        let runs_seen = check_witness(&self.witness).context("witness check")?;
        let last = runs_seen
            .get(&new_epoch)
            .ok_or_else(|| anyhow!("the witness has no record of epoch {new_epoch}"))?;
        ensure!(
            last.rack == new_owner,
            "epoch {new_epoch} ran on {}",
            last.rack
        );
        let image = self
            .status(&new_owner)?
            .volume(VOLUME)
            .and_then(|v| v.image.clone())
            .ok_or_else(|| anyhow!("{new_owner} holds no live image"))?;
        let records = check_records(image.as_ref()).context("records check")?;
        let written = runs_seen.get(&epoch).map_or(0, |r| r.records);
        println!(
            "  witness ok ({} epochs, never two at once); image ok: {} records, {} of epoch {epoch}'s {written} restored",
            runs_seen.len(),
            records.count,
            records.epochs.get(&epoch).map_or(0, |e| e.1 + 1 - e.0),
        );

        // Bring the killed rack back.
        self.agents[idx] = self.fleet.start(&self.field, &owner)?;
        let took = wait_until(SETUP_TIMEOUT, "the killed rack rejoined", || {
            // Caught up too: it sees the new assignment, not its own.
            Ok(self.healthy()? && self.app(&owner)?.epoch >= new_epoch)
        })?;
        println!("  {owner} restarted, rejoined in {}", secs(took));
        Ok(run)
    }

    /// The `failover` event of `epoch` on `rack`, its times relative to
    /// `killed_ms`. The event is written once the appliance is healthy,
    /// which may be a moment after status says running.
    fn failover_event(&self, rack: &str, epoch: u64, killed_ms: u64) -> Option<[Option<f64>; 4]> {
        let mut found = None;
        let waited = wait_until(Duration::from_secs(15), "the failover event", || {
            let events = self.fleet.events(&self.field, rack, 50)?;
            found = events
                .into_iter()
                .rev()
                .find(|e| e["kind"] == "failover" && e["detail"]["epoch"].as_u64() == Some(epoch));
            Ok(found.is_some())
        });
        if let Err(e) = waited {
            println!("  note: {e:#}");
        }
        let d = &found?["detail"];
        let rel = |key: &str| {
            d[key]
                .as_u64()
                .map(|ms| (ms as f64 - killed_ms as f64) / 1000.0)
        };
        Some([
            rel("detected_ms"),
            rel("decided_ms"),
            rel("started_ms"),
            rel("healthy_ms"),
        ])
    }
}

/// Nearest-rank percentile of sorted `v`.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// `field-tests drill kill-rack`.
///
/// # Errors
/// If the field cannot be built, a wait times out, or a check fails (the
/// witness above all).
pub fn kill_rack(runs: usize, keep: bool) -> Result<ExitCode> {
    ensure!(runs >= 1, "--runs must be at least 1");
    if let Err(why) = field_tests::available() {
        println!("SKIP: {why}");
        return Ok(ExitCode::from(2));
    }
    let field = Field::new(RACKS)?;
    let mut fleet = Fleet::provision(&RACKS)?;
    fleet.edit_configs("snapshot_interval_s = 10", "snapshot_interval_s = 1")?;
    if keep {
        fleet.keep();
    }
    let witness = fleet.dir().join("witness.log");
    let agents = fleet.start_all(&field)?;
    let mut rig = Rig {
        agents,
        fleet,
        field,
        witness,
    };
    let result = drill(&mut rig, runs);
    if let Err(e) = &result {
        eprintln!("drill failed: {e:#}");
        for rack in RACKS {
            match rig.status(rack) {
                Ok(s) => eprintln!("  {} | {:?}", s.summary(), s.appliance(APP)),
                Err(e) => eprintln!("  {rack}: status failed: {e:#}"),
            }
        }
        rig.fleet.dump_logs(60);
        rig.fleet.keep();
    }
    result
}

fn drill(rig: &mut Rig, runs: usize) -> Result<ExitCode> {
    let started = Instant::now();
    let took = wait_until(SETUP_TIMEOUT, "3 racks and a control plane", || {
        rig.healthy()
    })?;
    println!("field of 3 racks with a control plane in {}", secs(took));
    let manifest = rig.fleet.dir().join(format!("{APP}.toml"));
    std::fs::write(&manifest, recorder_manifest(APP, 0, &rig.witness))?;
    let manifest = manifest.to_str().context("temp path is UTF-8")?;
    wait_until(Duration::from_secs(30), "app deploy accepted", || {
        rig.fleet
            .cli(&rig.field, RACKS[0], &["app", "deploy", manifest])
            .map(|_| true)
    })?;
    println!("deployed tier-0 {APP}");
    let mut results = Vec::new();
    for n in 1..=runs {
        results.push(rig.run_once(n, runs)?);
    }

    println!("\nkill-rack: {runs} runs");
    println!("run  owner  new    suspect   dead      reassigned  running   | event: detected decided started healthy");
    for (i, r) in results.iter().enumerate() {
        let o = |t: Option<Duration>| t.map_or("    -   ".into(), secs);
        let ev = r.event.map_or("-".into(), |e| {
            e.iter()
                .map(|x| x.map_or("-".into(), |x| format!("{x:.1}")))
                .collect::<Vec<_>>()
                .join(" / ")
        });
        println!(
            "{:>3}  {}@{:<3} {}@{:<3} {}  {}  {}    {}  | {ev}",
            i + 1,
            r.owner,
            r.epoch,
            r.new_owner,
            r.new_epoch,
            o(r.suspect),
            o(r.dead),
            o(r.reassigned),
            secs(r.running),
        );
    }
    let mut times: Vec<Duration> = results.iter().map(|r| r.running).collect();
    times.sort();
    let median = percentile(&times, 0.5);
    println!(
        "SIGKILL -> running on a survivor: median {}, p90 {}, max {} (target: median <= {})",
        secs(median),
        secs(percentile(&times, 0.9)),
        secs(*times.last().expect("runs >= 1")),
        secs(TARGET_MEDIAN)
    );
    let mut healthy: Vec<Duration> = results
        .iter()
        .filter_map(|r| r.event.and_then(|e| e[3]))
        .map(|s| Duration::from_secs_f64(s.max(0.0)))
        .collect();
    healthy.sort();
    if let Some(max) = healthy.last() {
        println!(
            "SIGKILL -> healthy per the failover events: median {}, p90 {}, max {} ({} runs)",
            secs(percentile(&healthy, 0.5)),
            secs(percentile(&healthy, 0.9)),
            secs(*max),
            healthy.len()
        );
    }
    println!(
        "witness checked after every run: no duplicate ({:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    if median <= TARGET_MEDIAN {
        println!("PASS: median within target");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("MISS: median above target");
        Ok(ExitCode::FAILURE)
    }
}
