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
//!
//! With a link profile ([`KillRack::profile`]), every pair of racks talks
//! through the link emulator ([`crate::linkem`]) on that profile instead of
//! the clean bridge (mDNS still finds peers over the bridge). Two copies of
//! the recorder writing at once (from the history checker,
//! [`crate::history`]) are counted, not fatal, so a benchmark can report
//! them; [`KillRackReport::passed`] requires none.
//!
//! [`operator_run`] drives the operator's command instead: `fieldrack
//! drill run` from one rack of such a field ([`operator`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};

use crate::agent::ApplianceStatus;
use crate::appliance::{check_records, recorder_manifest};
use crate::bench::link_every_pair;
use crate::history::{History, Overlap};
use crate::linkem::{EmulatedLink, Profile};
use crate::{wait_until, Agent, Field, Fleet, PeerState, Status};
use util::time::unix_ms;

const RACKS: [&str; 3] = ["a", "b", "c"];
const APP: &str = "recorder";
const VOLUME: &str = "recorder-data";

/// Target: median SIGKILL → running on a survivor.
pub const TARGET_MEDIAN: Duration = Duration::from_secs(20);

/// Bound on waiting for the control plane, a deploy, a replica, a rejoin.
const SETUP_TIMEOUT: Duration = Duration::from_secs(90);

/// Bound on one failover.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(90);

/// What to drill.
#[derive(Clone, Debug)]
pub struct KillRack {
    /// How many kills.
    pub runs: usize,
    /// Keep the fleet dir (configs, logs, witness) afterwards.
    pub keep: bool,
    /// Join every pair of racks by an emulated link on this profile (a
    /// name with optional overrides, see [`Profile`]); `None`: the bridge.
    pub profile: Option<String>,
}

/// A field of three racks running the recorder. Agents drop (stop) before
/// the fleet dir; the field (and its emulated links) outlive the rig.
struct Rig<'f> {
    agents: Vec<Agent>,
    fleet: Fleet,
    field: &'f Field,
    witness: PathBuf,
}

/// What one run measured, from the SIGKILL.
#[derive(Clone, Debug, Default)]
pub struct Run {
    /// The rack whose agent was killed, and the recorder's epoch there.
    pub owner: String,
    pub epoch: u64,
    /// Where the recorder ran next, at which epoch.
    pub new_owner: String,
    pub new_epoch: u64,
    /// First poll at which a survivor reported the owner `suspect`.
    pub suspect: Option<Duration>,
    /// First poll at which a survivor reported the owner `dead`.
    pub dead: Option<Duration>,
    /// First poll at which a survivor saw a new epoch.
    pub reassigned: Option<Duration>,
    /// First poll at which a survivor reported the recorder running on a
    /// survivor at a new epoch.
    pub running: Duration,
    /// From the `failover` event: detected, decided, started, healthy,
    /// each relative to the kill (seconds; negative if a clock says so).
    pub event: Option<[Option<f64>; 4]>,
    /// Overlaps in the witness log, all runs so far included, after this run.
    pub overlaps_so_far: usize,
}

/// The whole drill.
#[derive(Clone, Debug)]
pub struct KillRackReport {
    /// The link profile between racks, as given (`None`: the bridge).
    pub profile: Option<String>,
    pub runs: Vec<Run>,
    /// Every interval in which two copies of the recorder wrote (dual-active).
    pub overlaps: Vec<Overlap>,
    /// Wall time of the whole drill.
    pub took: Duration,
}

impl KillRackReport {
    /// Kill → running on a survivor, sorted.
    #[must_use]
    pub fn running_sorted(&self) -> Vec<Duration> {
        let mut v: Vec<Duration> = self.runs.iter().map(|r| r.running).collect();
        v.sort();
        v
    }

    /// Median kill → running on a survivor.
    #[must_use]
    pub fn median_running(&self) -> Option<Duration> {
        let v = self.running_sorted();
        (!v.is_empty()).then(|| percentile(&v, 0.5))
    }

    /// The median within [`TARGET_MEDIAN`] and no dual-active.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.overlaps.is_empty() && self.median_running().is_some_and(|m| m <= TARGET_MEDIAN)
    }
}

fn secs(d: Duration) -> String {
    format!("{:5.1} s", d.as_secs_f64())
}

impl Rig<'_> {
    fn status(&self, rack: &str) -> Result<Status> {
        self.fleet.status(self.field, rack)
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
        let history = History::read(&self.witness, APP).context("reading the witness log")?;
        let overlaps = history.overlaps();
        for o in &overlaps {
            println!("  DUAL-ACTIVE: {o}");
        }
        run.overlaps_so_far = overlaps.len();
        let copies = history.of(APP);
        let last = copies
            .iter()
            .find(|c| c.epoch == new_epoch)
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
        let written = copies
            .iter()
            .filter(|c| c.epoch == epoch)
            .map(|c| c.records)
            .sum::<u64>();
        println!(
            "  witness: {} copies, {} overlap(s); image ok: {} records, {} of epoch {epoch}'s {written} restored",
            copies.len(),
            overlaps.len(),
            records.count,
            records.epochs.get(&epoch).map_or(0, |e| e.1 + 1 - e.0),
        );

        // Bring the killed rack back.
        self.agents[idx] = self.fleet.start(self.field, &owner)?;
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
            let events = self.fleet.events(self.field, rack, 50)?;
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

/// Nearest-rank percentile of sorted `v` (not empty).
#[must_use]
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// `field-tests drill kill-rack`, also run by `linkbench failover`.
///
/// # Errors
/// If the field cannot be built, a wait times out, or a check fails (the
/// new owner's image above all). Dual-active is not an error: it is in the
/// report.
pub fn kill_rack(opts: &KillRack) -> Result<KillRackReport> {
    ensure!(opts.runs >= 1, "--runs must be at least 1");
    let profile = opts
        .profile
        .as_deref()
        .map(|p| {
            p.parse::<Profile>()
                .map_err(|e| anyhow!("link profile {p:?}: {e}"))
        })
        .transpose()?;
    let field = Field::new(RACKS)?;
    let mut links: Vec<EmulatedLink<'_>> = Vec::new();
    if let Some(p) = &profile {
        links = link_every_pair(&field, p)?;
        println!("every pair of racks on an emulated link: {p}");
    }
    let mut fleet = Fleet::provision(&RACKS)?;
    fleet.edit_configs("snapshot_interval_s = 2", "snapshot_interval_s = 1")?;
    if opts.keep {
        fleet.keep();
    }
    let witness = fleet.dir().join("witness.log");
    let agents = fleet.start_all(&field)?;
    let mut rig = Rig {
        agents,
        fleet,
        field: &field,
        witness,
    };
    let result = drill(&mut rig, opts);
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
    // Agents stop before the links and the namespaces go.
    drop(rig);
    drop(links);
    result
}

fn drill(rig: &mut Rig<'_>, opts: &KillRack) -> Result<KillRackReport> {
    let runs = opts.runs;
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
            .cli(rig.field, RACKS[0], &["app", "deploy", manifest])
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
    let overlaps = History::read(&rig.witness, APP)
        .context("reading the witness log")?
        .overlaps();
    println!(
        "witness checked after every run: {} overlap(s) ({:.0} s in all)",
        overlaps.len(),
        started.elapsed().as_secs_f64()
    );
    for o in &overlaps {
        println!("  DUAL-ACTIVE: {o}");
    }
    Ok(KillRackReport {
        profile: opts.profile.clone(),
        runs: results,
        overlaps,
        took: started.elapsed(),
    })
}

/// `fieldrack drill` against a live field, as an operator runs it: the
/// racks' admin APIs must be reachable from the controlling rack, so
/// [`api_on_rack_ips`] moves each API from loopback to its rack's address
/// (before the agents start).
pub mod operator {
    use std::process::Output;
    use std::time::Duration;

    use anyhow::{ensure, Context, Result};

    use crate::agent::output_with_timeout;
    use crate::{Field, Fleet};

    /// The API port every provisioned rack.toml names.
    const API_LISTEN: &str = "listen = \"127.0.0.1:7480\"";

    /// Each rack's API listens on its rack's address instead of loopback,
    /// so a drill run from one rack reaches every rack's API.
    ///
    /// # Errors
    /// A config without the provisioned API address.
    pub fn api_on_rack_ips(field: &Field, fleet: &Fleet) -> Result<()> {
        for rack in fleet.racks() {
            let path = fleet.config(rack);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            ensure!(
                text.contains(API_LISTEN),
                "{} has no {API_LISTEN}",
                path.display()
            );
            let ip = field.ip(rack)?;
            std::fs::write(
                &path,
                text.replace(API_LISTEN, &format!("listen = \"{ip}:7480\"")),
            )?;
        }
        Ok(())
    }

    /// `fieldrack drill ARGS --config <from's rack.toml>` in `from`'s
    /// namespace, waited for at most `timeout`; its output whatever its
    /// exit status.
    ///
    /// # Errors
    /// If it cannot start or does not finish in time.
    pub fn drill(
        field: &Field,
        fleet: &Fleet,
        from: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Output> {
        let mut cmd = field.command(from, fleet.bin())?;
        cmd.arg("drill")
            .args(args)
            .arg("--config")
            .arg(fleet.config(from));
        output_with_timeout(cmd, timeout)
    }

    /// The drill reports `rack` keeps (`fieldrack drill report --json`).
    ///
    /// # Errors
    /// If the command fails or prints something else than JSON.
    pub fn reports(field: &Field, fleet: &Fleet, rack: &str) -> Result<Vec<serde_json::Value>> {
        let out = fleet.cli(field, rack, &["drill", "report", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("drill report --json: {out}"))
    }
}

/// `field-tests drill run SCENARIO…`: `fieldrack drill run` on a field
/// in namespaces, as an operator runs it on deployed racks: three racks
/// (APIs on their addresses), the recorder on rack b, the drill run from
/// rack a; then the witness (no two copies) and the report kept on
/// every rack. Returns whether the drill passed.
///
/// # Errors
/// If the field cannot be built, the recorder does not run and
/// replicate, or a check fails.
pub fn operator_run(words: &[String], duration_s: u64, keep: bool) -> Result<bool> {
    let field = Field::new(RACKS)?;
    let mut fleet = Fleet::provision(&RACKS)?;
    fleet.edit_configs("snapshot_interval_s = 2", "snapshot_interval_s = 1")?;
    operator::api_on_rack_ips(&field, &fleet)?;
    if keep {
        fleet.keep();
    }
    let witness = fleet.dir().join("witness.log");
    let agents = fleet.start_all(&field)?;
    let rig = Rig {
        agents,
        fleet,
        field: &field,
        witness,
    };
    wait_until(SETUP_TIMEOUT, "3 racks and a control plane", || {
        rig.healthy()
    })?;
    let manifest = rig.fleet.dir().join(format!("{APP}.toml"));
    let recorder = crate::appliance::Recorder {
        prefer: Some("b"),
        ..crate::appliance::Recorder::new(APP, 0, &rig.witness)
    };
    std::fs::write(&manifest, recorder.manifest())?;
    let manifest = manifest.to_str().context("temp path is UTF-8")?;
    wait_until(Duration::from_secs(30), "app deploy accepted", || {
        rig.fleet
            .cli(rig.field, RACKS[0], &["app", "deploy", manifest])
            .map(|_| true)
    })?;
    let (owner, epoch) = rig.running_and_replicated()?;
    println!("{APP} on {owner} at epoch {epoch}, replicated");
    let mut args: Vec<&str> = vec!["run"];
    args.extend(words.iter().map(String::as_str));
    let duration = duration_s.to_string();
    args.extend(["--duration", &duration]);
    let html = rig.fleet.dir().join("drill.html");
    args.extend(["--html", html.to_str().context("temp path is UTF-8")?]);
    let out = operator::drill(
        rig.field,
        &rig.fleet,
        RACKS[0],
        &args,
        Duration::from_secs(duration_s + 90),
    )?;
    print!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let overlaps = History::read(&rig.witness, APP)
        .context("reading the witness log")?
        .overlaps();
    for o in &overlaps {
        println!("DUAL-ACTIVE: {o}");
    }
    for rack in RACKS {
        let kept = operator::reports(rig.field, &rig.fleet, rack)?;
        println!("{rack} keeps {} drill report(s)", kept.len());
    }
    Ok(out.status.success() && overlaps.is_empty())
}
