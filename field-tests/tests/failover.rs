//! Appliance failover on real `fieldrack` agents, one network namespace per
//! rack (3 racks, mDNS, the default non-`--local` config with volumes
//! snapshotted every second): a tier-0 recorder appliance (see
//! `field_tests::appliance`) is deployed, then its owner is killed (also
//! while it leads the control plane), cut off from the majority, or loses
//! one link. The fencing tests run many
//! appliances on rack a (eight recorders that ignore SIGTERM, two QEMU VMs,
//! or a recorder next to an appliance being handed over through a 1 MB/s
//! link) and cut a off: every one must be dead before a's lease ends (the
//! `lease_left_ms` a records with each `appliance_fenced` event), then run
//! on the majority.
//!
//! The `drill_` tests run `fieldrack drill run` as an operator would,
//! from one rack's namespace against the live field: power-loss (with a
//! refused precondition first and the timeline checked against the
//! recorder's own records), isolate with the isolated rack's agent
//! restarted mid-fault, partition, cut-link then backhaul-down (a drill
//! file) and generator one after the other (each rack with a tile origin of its own, so the
//! tiles target is measured), and a drill whose controlling rack is
//! SIGKILLed.
//!
//! Every test with recorders ends with the history checker
//! (`field_tests::history`) on their shared witness log: no two copies of
//! an appliance ever wrote at the same time. Where the appliance moved,
//! `check_records` checks the new owner's live image (an unbroken prefix
//! of records, epochs in order). The only orderings asserted are the ones
//! the witness (or, for VMs, the event logs on one clock) prove: the old
//! copy stopped before the new one began. Everything else waits with
//! generous bounds: the machine has 2 cores and runs three agents; each
//! test takes 15-45 s.
//!
//! Tests run one at a time (`field_tests::serial()`). Needs root, iproute2
//! and nftables; skips (printing `SKIP:`) only when namespaces cannot be
//! created. `FIELDTESTS_KEEP=1` keeps configs, logs and the witness; a
//! failing test keeps them anyway and prints the logs' tails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use field_tests::agent::ApplianceStatus;
use field_tests::appliance::{check_records, recorder_manifest, Recorder, Records};
use field_tests::history::{check_history, Copy};
use field_tests::{hold_for, wait_until, Agent, Field, Fleet, PeerState, Status};

const RACKS: [&str; 3] = ["a", "b", "c"];

/// The appliance under test and its volume.
const APP: &str = "registry";
const VOLUME: &str = "registry-data";

/// From start to a control plane of three voters with a leader, seen by
/// every rack (mDNS discovery, admission, Raft).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// From deploy to `running` somewhere.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);

/// From `running` to a replica holding a few generations.
const REPLICATED_TIMEOUT: Duration = Duration::from_secs(60);

/// From the fault to `running` on a survivor (lease 8 s + 1 s, detection,
/// start: about 10-15 s; generous for a busy machine).
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a single cut link is held.
const CUT_OBSERVATION: Duration = Duration::from_secs(20);

/// Status calls that may fail in a row while observing.
const STATUS_ERRORS_TOLERATED: u32 = 2;

/// A running 3-rack fleet with the recorder deployed. Fields drop in
/// declaration order: agents stop before the namespaces go away.
struct Scene {
    agents: Vec<Agent>,
    fleet: Fleet,
    field: Field,
    /// The recorder's witness log, shared by all racks.
    witness: PathBuf,
}

impl Scene {
    /// Every rack sees the appliance on `owner` at `epoch`, running, for
    /// all of `d`; returns the number of polls.
    fn hold_running(&self, d: Duration, what: &str, owner: &str, epoch: u64) -> Result<u32> {
        hold_for(d, what, STATUS_ERRORS_TOLERATED, || {
            for rack in RACKS {
                let a = self.app(rack)?;
                if a.owner.as_deref() != Some(owner) || a.epoch != epoch || a.state != "running" {
                    println!("rack {rack} sees {a:?}");
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    fn status(&self, rack: &str) -> Result<Status> {
        self.fleet.status(&self.field, rack)
    }

    /// Waits until every rack sees one control plane of all racks as
    /// voters, with a leader; how long that took.
    /// Waits until every rack has a control plane of all and sees all of
    /// them up (reported and renewing): placement then may choose any.
    fn control_of_all(&self, within: Duration) -> Result<Duration> {
        wait_until(within, "a control plane of every rack, all up", || {
            for rack in RACKS {
                let s = self.status(rack)?;
                if !(s.has_control_of(RACKS.len()) && s.sees_up(&RACKS)) {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    /// The appliance as `rack` sees it.
    fn app(&self, rack: &str) -> Result<ApplianceStatus> {
        self.status(rack)?
            .appliance(APP)
            .cloned()
            .ok_or_else(|| anyhow!("rack {rack} does not list {APP}"))
    }

    fn agent(&mut self, rack: &str) -> Result<&mut Agent> {
        self.agents
            .iter_mut()
            .find(|a| a.rack() == rack)
            .ok_or_else(|| anyhow!("no agent for rack {rack}"))
    }

    /// The live image of the volume on `rack` (its owner).
    fn image(&self, rack: &str) -> Result<PathBuf> {
        self.status(rack)?
            .volume(VOLUME)
            .and_then(|v| v.image.clone())
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("rack {rack} holds no live image of {VOLUME}"))
    }

    fn print_statuses(&self, label: &str) {
        for rack in RACKS {
            match self.status(rack) {
                Ok(s) => {
                    let app = s.appliance(APP).map_or("-".into(), |a| {
                        format!(
                            "{} owner={:?} epoch={} state={}",
                            a.name, a.owner, a.epoch, a.state
                        )
                    });
                    let leader = s.control.as_ref().and_then(|c| c.leader.clone());
                    println!("[{label}] {} | leader={leader:?} | {app}", s.summary());
                }
                Err(e) => println!("[{label}] {rack}: status failed: {e:#}"),
            }
        }
    }

    /// Waits for the control plane, deploys the recorder, waits until it
    /// runs and a replica holds a few generations. Returns its owner and
    /// epoch.
    fn deploy(&self) -> Result<(String, u64)> {
        self.deploy_preferring(None)
    }

    /// The leader of the control plane, as every rack sees it.
    fn leader(&self) -> Result<String> {
        let mut seen = BTreeSet::new();
        for rack in RACKS {
            let s = self.status(rack)?;
            seen.insert(s.control.as_ref().and_then(|c| c.leader.clone()));
        }
        match Vec::from_iter(seen).as_slice() {
            [Some(leader)] => Ok(leader.clone()),
            other => Err(anyhow!("the racks see leaders {other:?}")),
        }
    }

    /// [`Scene::deploy`], with placement preferring `prefer`.
    fn deploy_preferring(&self, prefer: Option<&str>) -> Result<(String, u64)> {
        let took = self.control_of_all(CONTROL_TIMEOUT)?;
        println!(
            "control plane of 3 voters after {:.1} s",
            took.as_secs_f64()
        );
        let manifest = self.fleet.dir().join(format!("{APP}.toml"));
        let text = Recorder {
            prefer,
            ..Recorder::new(APP, 0, &self.witness)
        }
        .manifest();
        std::fs::write(&manifest, text)?;
        let manifest = manifest.to_str().context("temp path is UTF-8")?;
        wait_until(Duration::from_secs(30), "app deploy accepted", || {
            self.fleet
                .cli(&self.field, "a", &["app", "deploy", manifest])
                .map(|_| true)
        })?;
        let mut running = None;
        let took = wait_until(RUNNING_TIMEOUT, "the recorder running", || {
            let a = self.app("a")?;
            let ok = a.state == "running" && a.owner.is_some();
            running = ok.then_some(a);
            Ok(ok)
        })?;
        let a = running.expect("set when the wait succeeds");
        let owner = a.owner.expect("checked");
        println!(
            "{APP} running on {owner} at epoch {} {:.1} s after deploy",
            a.epoch,
            took.as_secs_f64()
        );
        wait_until(REPLICATED_TIMEOUT, "a replica of 3 generations", || {
            let s = self.status(&owner)?;
            Ok(s.volume(VOLUME)
                .is_some_and(|v| v.replicas.iter().any(|r| r.generation.unwrap_or(0) >= 3)))
        })?;
        Ok((owner, a.epoch))
    }

    /// Waits until a rack of `survivors` reports the appliance running on
    /// one of them at an epoch after `epoch`; returns that owner and epoch.
    fn failover(&self, survivors: &[&str], epoch: u64) -> Result<(String, u64, Duration)> {
        self.failover_watching(survivors, epoch, |_| {})
    }

    /// As [`Scene::failover`], calling `each_poll` on every round (to
    /// watch the old owner meanwhile).
    fn failover_watching(
        &self,
        survivors: &[&str],
        epoch: u64,
        mut each_poll: impl FnMut(&Scene),
    ) -> Result<(String, u64, Duration)> {
        let mut found = None;
        let took = wait_until(
            FAILOVER_TIMEOUT,
            "the recorder running on a survivor",
            || {
                each_poll(self);
                let mut last = Err(anyhow!("no survivor answered"));
                for rack in survivors {
                    match self.app(rack) {
                        Ok(a) => {
                            let on_survivor =
                                a.owner.as_deref().is_some_and(|o| survivors.contains(&o));
                            if a.state == "running" && a.epoch > epoch && on_survivor {
                                found = Some((a.owner.expect("checked"), a.epoch));
                                return Ok(true);
                            }
                            last = Ok(false);
                        }
                        Err(e) => last = Err(e),
                    }
                }
                last
            },
        )?;
        let (owner, epoch) = found.expect("set when the wait succeeds");
        Ok((owner, epoch, took))
    }

    /// The witness and the image after a move from `old` (epoch `e0`) to
    /// `new` (epoch `e1`): two epochs, each on its rack, never at once; the
    /// image holds both, in order.
    fn check_moved(&self, old: &str, e0: u64, new: &str, e1: u64) -> Result<Records> {
        let h = check_history(&self.witness, APP)?;
        let copies: Vec<Copy> = h.of(APP).to_vec();
        println!("witness: {copies:?}");
        let epochs: Vec<u64> = copies.iter().map(|c| c.epoch).collect();
        ensure!(
            epochs == [e0, e1],
            "witness epochs {epochs:?}, want [{e0}, {e1}]"
        );
        let (c0, c1) = (&copies[0], &copies[1]);
        ensure!(c0.rack == old, "epoch {e0} ran on {}", c0.rack);
        ensure!(c1.rack == new, "epoch {e1} ran on {}", c1.rack);
        println!(
            "gap between epochs: {} ms (old owner's last record to new owner's first)",
            c1.first_ms.saturating_sub(c0.last_ms)
        );
        let records = check_records(&self.image(new)?)?;
        println!(
            "records in {new}'s image: {} in epochs {:?}",
            records.count, records.epochs
        );
        ensure!(
            records.epochs.contains_key(&e0),
            "the restored image lost every record of epoch {e0}"
        );
        ensure!(
            records.epochs.get(&e1).is_some_and(|r| r.2 == new),
            "the image has no records of epoch {e1} from {new}"
        );
        let restored = records.epochs[&e0].1 + 1;
        println!(
            "epoch {e0} wrote {} records, {restored} restored, {} lost since the last replicated snapshot",
            c0.records,
            c0.records.saturating_sub(restored)
        );
        Ok(records)
    }
}

/// Runs `body` on a freshly started 3-rack fleet; on failure prints
/// statuses and the agents' log tails and keeps their dir.
fn scenario(body: impl FnOnce(&mut Scene) -> Result<()>) -> Result<()> {
    scenario_with(|_, _| Ok(()), body)
}

/// [`scenario`], with `prepare` applied to the field and the configs
/// before the agents start (a fault present from first boot, a setting).
fn scenario_with(
    prepare: impl FnOnce(&Field, &Fleet) -> Result<()>,
    body: impl FnOnce(&mut Scene) -> Result<()>,
) -> Result<()> {
    if let Err(why) = field_tests::available() {
        println!("SKIP: {why}");
        return Ok(());
    }
    let _serial = field_tests::serial();
    let started = Instant::now();
    let field = Field::new(RACKS)?;
    let fleet = Fleet::provision(&RACKS)?;
    fleet.edit_configs("snapshot_interval_s = 2", "snapshot_interval_s = 1")?;
    let witness = fleet.dir().join("witness.log");
    prepare(&field, &fleet)?;
    let agents = fleet.start_all(&field)?;
    let mut scene = Scene {
        agents,
        fleet,
        field,
        witness,
    };
    let result = body(&mut scene);
    if let Err(e) = &result {
        eprintln!("FAILED: {e:#}");
        scene.print_statuses("at failure");
        for agent in &mut scene.agents {
            if !agent.is_running() {
                eprintln!("agent of rack {} had exited", agent.rack());
            }
        }
        scene.fleet.dump_logs(80);
        scene.fleet.keep();
    }
    println!("scenario took {:.1} s", started.elapsed().as_secs_f64());
    result
}

/// Every rack offers 32 CPUs, so that placement keeps many appliances on
/// the rack they prefer (the machine's 2 cores would fit only two).
fn roomy(fleet: &Fleet) -> Result<()> {
    fleet.edit_configs("[capacity]\ncpus = 0", "[capacity]\ncpus = 32")
}

/// The appliances that ignore SIGTERM in the fencing tests.
fn stubborn(scene: &Scene, names: &[String], prefer: &str) -> String {
    names
        .iter()
        .map(|n| {
            Recorder {
                stop_grace_ms: None,
                ignore_term: true,
                size: "4M",
                prefer: Some(prefer),
                ..Recorder::new(n, 0, &scene.witness)
            }
            .manifest()
        })
        .collect()
}

impl Scene {
    /// Writes `manifest` and deploys it through rack a.
    fn deploy_manifest(&self, file: &str, manifest: &str) -> Result<()> {
        let path = self.fleet.dir().join(format!("{file}.toml"));
        std::fs::write(&path, manifest)?;
        let path = path.to_str().context("temp path is UTF-8")?;
        wait_until(Duration::from_secs(30), "app deploy accepted", || {
            self.fleet
                .cli(&self.field, "a", &["app", "deploy", path])
                .map(|_| true)
        })?;
        Ok(())
    }

    /// Waits until `viewer` sees every one of `names` running on one of
    /// `racks` at an epoch above `after` (if given); their owners and
    /// epochs.
    fn all_running(
        &self,
        names: &[String],
        viewer: &str,
        racks: &[&str],
        after: Option<&BTreeMap<String, u64>>,
        within: Duration,
    ) -> Result<BTreeMap<String, (String, u64)>> {
        let mut found = BTreeMap::new();
        let took = wait_until(within, "every appliance running", || {
            let s = self.status(viewer)?;
            found.clear();
            for n in names {
                let Some(a) = s.appliance(n) else {
                    return Ok(false);
                };
                let on = a.owner.as_deref().filter(|o| racks.contains(o));
                let newer = after.is_none_or(|e| e.get(n).is_none_or(|e0| a.epoch > *e0));
                match on {
                    Some(o) if a.state == "running" && newer => {
                        found.insert(n.clone(), (o.to_owned(), a.epoch));
                    }
                    _ => return Ok(false),
                }
            }
            Ok(true)
        })?;
        println!(
            "{} appliance(s) running on {racks:?} after {:.1} s",
            names.len(),
            took.as_secs_f64()
        );
        Ok(found)
    }

    /// Waits until `rack`'s event log shows an `appliance_fenced` event of
    /// every one of `names` at its epoch; those events.
    fn fences(
        &self,
        rack: &str,
        names: &BTreeMap<String, u64>,
        within: Duration,
    ) -> Result<BTreeMap<String, serde_json::Value>> {
        let mut fenced = BTreeMap::new();
        wait_until(within, "every appliance fenced", || {
            fenced.clear();
            for e in self.fleet.events(&self.field, rack, 1000)? {
                let d = &e["detail"];
                let (Some(app), Some(epoch)) = (d["appliance"].as_str(), d["epoch"].as_u64())
                else {
                    continue;
                };
                if e["kind"] == "appliance_fenced" && names.get(app) == Some(&epoch) {
                    fenced.insert(app.to_owned(), e.clone());
                }
            }
            Ok(fenced.len() == names.len())
        })?;
        Ok(fenced)
    }

    /// Whether `rack`'s event log has an event `kind` about `app`.
    fn logged(&self, rack: &str, kind: &str, app: &str) -> Result<bool> {
        Ok(self
            .fleet
            .events(&self.field, rack, 1000)?
            .iter()
            .any(|e| e["kind"] == kind && e["detail"]["appliance"] == app))
    }
}

/// Every appliance was dead before its lease ended, as the fenced rack
/// recorded it; returns the smallest margin (ms).
fn dead_before_lease_end(fences: &BTreeMap<String, serde_json::Value>) -> Result<i64> {
    let mut least = i64::MAX;
    for (app, e) in fences {
        let left = e["detail"]["lease_left_ms"]
            .as_i64()
            .with_context(|| format!("{app}: fence without lease_left_ms: {e}"))?;
        println!(
            "  {app}: fenced at {} ms ({}, signal {}), dead {left} ms before its lease ended",
            e["at_ms"], e["detail"]["why"], e["detail"]["signal"]
        );
        ensure!(left > 0, "{app} outlived its lease by {} ms: {e}", -left);
        least = least.min(left);
    }
    Ok(least)
}

/// Rack a runs eight appliances that ignore SIGTERM (with the default
/// `stop_grace_ms`) and is cut off from the majority: every one is dead
/// before a's lease ends (fenced concurrently, SIGKILL after the fence
/// grace), the majority restarts all eight, and no two copies of any of
/// them ever wrote at once.
#[test]
fn eight_stubborn_appliances_are_all_fenced_before_the_lease_ends() -> Result<()> {
    scenario_with(
        |_, fleet| roomy(fleet),
        |scene| {
            scene.control_of_all(CONTROL_TIMEOUT)?;
            let names: Vec<String> = (0..8).map(|i| format!("stubborn{i}")).collect();
            scene.deploy_manifest("stubborn", &stubborn(scene, &names, "a"))?;
            let on_a = scene.all_running(&names, "a", &["a"], None, RUNNING_TIMEOUT)?;
            let e0: BTreeMap<String, u64> =
                on_a.iter().map(|(n, (_, e))| (n.clone(), *e)).collect();
            std::thread::sleep(Duration::from_secs(2));
            scene.field.isolate("a")?;
            println!("isolated a");
            let fences = scene.fences("a", &e0, Duration::from_secs(30))?;
            let least = dead_before_lease_end(&fences)?;
            println!("all eight dead at least {least} ms before a's lease ended");
            let moved = scene.all_running(&names, "b", &["b", "c"], Some(&e0), FAILOVER_TIMEOUT)?;
            println!("restarted by the majority: {moved:?}");
            std::thread::sleep(Duration::from_secs(2));
            let h = check_history(&scene.witness, "-")?;
            for n in &names {
                let copies = h.of(n);
                ensure!(
                    copies.len() == 2 && copies[0].rack == "a" && copies[1].rack != "a",
                    "{n}: copies {copies:?}, want one on a, then one on the majority"
                );
                println!(
                    "  {n}: last record on a {} ms before the first on {}",
                    copies[1].first_ms as i64 - copies[0].last_ms as i64,
                    copies[1].rack
                );
            }
            Ok(())
        },
    )
}

/// While rack a ships a large final snapshot of X to b over a link limited
/// to 1 MB/s (`app move X --to b`), a is cut off from the majority: its
/// other appliance Y (which ignores SIGTERM) is still dead before a's
/// lease ends, and no two copies of Y ever wrote at once.
#[test]
fn fencing_is_never_delayed_by_a_handover() -> Result<()> {
    const BIG: &str = "big";
    const Y: &str = "stubborn";
    scenario_with(
        |_, fleet| {
            roomy(fleet)?;
            fleet.edit_configs("link_bytes_per_s = 0", "link_bytes_per_s = 1000000")
        },
        |scene| {
            scene.control_of_all(CONTROL_TIMEOUT)?;
            // X fills 24 MiB of its volume with random data (24 s at
            // 1 MB/s), then idles.
            let fill = r#"import os, time
p = [v for k, v in os.environ.items() if k.startswith("FIELDRACK_VOLUME_")][0]
with open(p, "r+b") as f:
    f.write(os.urandom(24 << 20)); f.flush(); os.fsync(f.fileno())
print("filled", flush=True)
time.sleep(1e6)"#;
            let big = format!(
                "[[appliance]]\nname = \"{BIG}\"\ndriver = \"process\"\ncommand = [\"/usr/bin/python3\", \"-c\", '''{fill}''']\ntier = 1\nstop_grace_ms = 1000\n[[appliance.volume]]\nname = \"{BIG}-data\"\nsize = \"32M\"\n[appliance.placement]\nracks = [\"a\"]\n"
            );
            let manifest = format!("{big}{}", stubborn(scene, &[Y.to_owned()], "a"));
            scene.deploy_manifest("handover", &manifest)?;
            let names = [BIG.to_owned(), Y.to_owned()];
            let on_a = scene.all_running(&names, "a", &["a"], None, RUNNING_TIMEOUT)?;
            let e0 = BTreeMap::from([(Y.to_owned(), on_a[Y].1)]);
            std::thread::sleep(Duration::from_secs(2));
            scene
                .fleet
                .cli(&scene.field, "a", &["app", "move", BIG, "--to", "b"])?;
            let moving = Instant::now();
            // a stops X, then ships its final snapshot to b.
            wait_until(
                Duration::from_secs(30),
                "a stops X for the handover",
                || scene.logged("a", "appliance_stopped", BIG),
            )?;
            std::thread::sleep(Duration::from_secs(1));
            ensure!(
                !scene.logged("a", "appliance_handed_over", BIG)?,
                "the handover of {BIG} ended before the partition: the volume is too small for the link"
            );
            scene.field.isolate("a")?;
            println!(
                "isolated a {:.1} s after the move, during the final snapshot's shipment",
                moving.elapsed().as_secs_f64()
            );
            let fences = scene.fences("a", &e0, Duration::from_secs(30))?;
            dead_before_lease_end(&fences)?;
            ensure!(
                !scene.logged("a", "appliance_handed_over", BIG)?,
                "the handover of {BIG} ended while a was cut off"
            );
            let moved = scene.all_running(
                &[Y.to_owned()],
                "b",
                &["b", "c"],
                Some(&e0),
                FAILOVER_TIMEOUT,
            )?;
            println!("{Y} restarted by the majority: {moved:?}");
            std::thread::sleep(Duration::from_secs(2));
            let h = check_history(&scene.witness, "-")?;
            let copies = h.of(Y);
            ensure!(
                copies.len() == 2 && copies[0].rack == "a" && copies[1].rack != "a",
                "{Y}: copies {copies:?}"
            );
            Ok(())
        },
    )
}

/// Two QEMU VMs on rack a (TCG without KVM), cut off from the majority:
/// both stopped before a's lease ends, and started on the majority only
/// after a had stopped them (event logs; all racks share one clock).
#[test]
fn two_vms_are_fenced_before_the_lease_ends() -> Result<()> {
    let path = std::env::var("PATH").unwrap_or_default();
    ensure!(
        path.split(':')
            .any(|d| std::path::Path::new(d).join("qemu-system-x86_64").is_file()),
        "qemu-system-x86_64 is missing: run ./scripts/setup (package qemu-system-x86)"
    );
    scenario_with(
        |_, fleet| roomy(fleet),
        |scene| {
            scene.control_of_all(CONTROL_TIMEOUT)?;
            let names: Vec<String> = (0..2).map(|i| format!("vm{i}")).collect();
            let manifest: String = names
                .iter()
                .map(|n| format!("[[appliance]]\nname = \"{n}\"\ndriver = \"qemu\"\ntier = 0\nmemory_mb = 64\n[[appliance.volume]]\nname = \"{n}-disk\"\nsize = \"16M\"\n[appliance.placement]\nracks = [\"a\"]\n"))
                .collect();
            scene.deploy_manifest("vms", &manifest)?;
            let on_a = scene.all_running(&names, "a", &["a"], None, RUNNING_TIMEOUT)?;
            let e0: BTreeMap<String, u64> =
                on_a.iter().map(|(n, (_, e))| (n.clone(), *e)).collect();
            std::thread::sleep(Duration::from_secs(2));
            scene.field.isolate("a")?;
            println!("isolated a");
            let fences = scene.fences("a", &e0, Duration::from_secs(30))?;
            dead_before_lease_end(&fences)?;
            let moved = scene.all_running(&names, "b", &["b", "c"], Some(&e0), FAILOVER_TIMEOUT)?;
            for (n, (rack, epoch)) in &moved {
                let started = scene
                    .fleet
                    .events(&scene.field, rack, 1000)?
                    .into_iter()
                    .find(|e| {
                        e["kind"] == "appliance_started"
                            && e["detail"]["appliance"] == n.as_str()
                            && e["detail"]["epoch"].as_u64() == Some(*epoch)
                    })
                    .with_context(|| format!("{rack} has no start event of {n}"))?;
                let (stopped_ms, started_ms) = (
                    fences[n]["at_ms"].as_u64().context("at_ms")?,
                    started["at_ms"].as_u64().context("at_ms")?,
                );
                println!(
                    "  {n}: stopped on a at {stopped_ms}, started on {rack} at {started_ms} ({} ms later)",
                    started_ms as i64 - stopped_ms as i64
                );
                ensure!(
                    stopped_ms < started_ms,
                    "{n} started on {rack} before a had stopped it"
                );
            }
            Ok(())
        },
    )
}

fn others<'a>(rack: &str) -> Vec<&'a str> {
    RACKS.iter().copied().filter(|r| *r != rack).collect()
}

#[test]
fn kill_owner() -> Result<()> {
    scenario(|scene| {
        let (owner, e0) = scene.deploy()?;
        kill_and_fail_over(scene, &owner, e0, "")
    })
}

/// The slowest failover: the killed rack ran the appliance and led the
/// control plane, so the survivors elect a leader before anything moves.
#[test]
fn kill_owner_that_leads() -> Result<()> {
    scenario(|scene| {
        scene.control_of_all(CONTROL_TIMEOUT)?;
        let leader = scene.leader()?;
        let (owner, e0) = scene.deploy_preferring(Some(&leader))?;
        ensure!(
            owner == leader && scene.leader()? == leader,
            "{APP} runs on {owner}, the leader is {leader}: not the case this test is for"
        );
        kill_and_fail_over(scene, &owner, e0, " (owner and leader)")
    })
}

/// SIGKILLs `owner`'s agent (running the recorder at epoch `e0`), waits
/// for a survivor to run it, prints how long that took and checks the
/// history.
fn kill_and_fail_over(scene: &mut Scene, owner: &str, e0: u64, what: &str) -> Result<()> {
    let survivors = others(owner);
    scene.agent(owner)?.kill()?;
    println!("SIGKILL of {owner}'s agent{what}");
    let (new, e1, took) = scene.failover(&survivors, e0)?;
    println!(
        "SIGKILL of {owner}{what} -> {APP} running on {new} at epoch {e1}: {:.1} s",
        took.as_secs_f64()
    );
    // Let the new copy write, then check it.
    std::thread::sleep(Duration::from_secs(2));
    scene.check_moved(owner, e0, &new, e1)?;
    Ok(())
}

#[test]
fn partition_owner_minority() -> Result<()> {
    scenario(|scene| {
        let (owner, e0) = scene.deploy()?;
        let survivors = others(&owner);
        scene.field.isolate(&owner)?;
        let isolated_at = Instant::now();
        println!("isolated {owner}");
        // What the isolated owner says of its own appliance meanwhile.
        let mut own_states: Vec<(f64, String)> = Vec::new();
        let watch_owner = |scene: &Scene, states: &mut Vec<(f64, String)>| {
            if let Ok(a) = scene.app(&owner) {
                if states.last().is_none_or(|(_, s)| *s != a.state) {
                    states.push((isolated_at.elapsed().as_secs_f64(), a.state));
                }
            }
        };
        let (new, e1, took) =
            scene.failover_watching(&survivors, e0, |s| watch_owner(s, &mut own_states))?;
        println!(
            "isolation of {owner} -> {APP} running on {new} at epoch {e1}: {:.1} s",
            took.as_secs_f64()
        );
        // The owner's own view, until it says it stopped (it cannot learn
        // of the new owner: it is cut off).
        let fenced = wait_until(Duration::from_secs(15), "the isolated owner fenced", || {
            watch_owner(scene, &mut own_states);
            Ok(own_states.last().is_some_and(|(_, s)| s != "running"))
        });
        for (t, s) in &own_states {
            println!("  {owner} reports its {APP}: {s} at +{t:.1} s");
        }
        match fenced {
            Ok(_) => println!("{owner} stopped its copy by itself"),
            Err(e) => println!("note: {e:#}; relying on the witness"),
        }
        // Let the new owner write and snapshot for a while, then count what
        // its epoch wrote before the heal.
        std::thread::sleep(Duration::from_secs(4));
        let before_heal = check_history(&scene.witness, APP)?;
        let written = before_heal
            .of(APP)
            .iter()
            .find(|c| c.epoch == e1)
            .map_or(0, |c| c.records);
        ensure!(written > 0, "epoch {e1} wrote nothing before the heal");
        scene.field.heal_all()?;
        let healed_at = Instant::now();
        println!("healed; epoch {e1} had written {written} records");

        // The old owner catches up, then nobody moves the appliance.
        let took = wait_until(Duration::from_secs(45), "the old owner catches up", || {
            let s = scene.status(&owner)?;
            let a = s
                .appliance(APP)
                .ok_or_else(|| anyhow!("{APP} not listed"))?;
            Ok(a.owner.as_deref() == Some(new.as_str())
                && a.epoch == e1
                && survivors
                    .iter()
                    .all(|r| s.state_of(r) == Some(PeerState::Alive)))
        })?;
        println!(
            "{owner} sees {new} own epoch {e1} {:.1} s after heal",
            took.as_secs_f64()
        );
        // Running throughout, too: the old owner's return must not disturb
        // the new owner (its lease renewals go on while the old owner,
        // which called elections while cut off, rejoins Raft).
        let polls = scene.hold_running(
            Duration::from_secs(10),
            "the appliance stays on the new owner, running",
            &new,
            e1,
        )?;
        println!(
            "stable on {new} at epoch {e1} over {polls} polls ({:.1} s after heal)",
            healed_at.elapsed().as_secs_f64()
        );
        // Between polls too: the new owner never stopped its copy.
        let stops: Vec<serde_json::Value> = scene
            .fleet
            .events(&scene.field, &new, 200)?
            .into_iter()
            .filter(|e| {
                e["kind"]
                    .as_str()
                    .is_some_and(|k| k.starts_with("appliance_"))
                    && e["kind"] != "appliance_started"
                    && e["detail"]["epoch"].as_u64() == Some(e1)
            })
            .collect();
        ensure!(
            stops.is_empty(),
            "the new owner {new} stopped its copy (epoch {e1}) around the heal: {stops:?}"
        );
        let records = scene.check_moved(&owner, e0, &new, e1)?;
        let (first, last, _) = records.epochs[&e1];
        ensure!(
            last + 1 - first >= written,
            "the new owner's image holds {} records of epoch {e1}, but it had written {written} before the heal",
            last + 1 - first
        );
        // The old owner gave its copy up but kept its last state: the
        // records of epoch e0 that the new owner's replica lacked (those
        // written while the owner was cut off) are in it.
        let mut kept = None;
        wait_until(
            Duration::from_secs(30),
            "the old owner keeps its copy",
            || {
                kept = scene
                    .status(&owner)?
                    .volumes_kept
                    .into_iter()
                    .find(|k| k.volume == VOLUME);
                Ok(kept.is_some())
            },
        )?;
        let kept = kept.expect("found");
        let to = scene.fleet.dir().join(format!("{owner}-kept.img"));
        scene.fleet.cli(
            &scene.field,
            &owner,
            &[
                "volume",
                "export",
                VOLUME,
                "--to",
                &to.to_string_lossy(),
                "--kept",
                &kept.kept_ms.to_string(),
            ],
        )?;
        let in_kept = check_records(&to)?;
        let written_e0 = check_history(&scene.witness, APP)?.of(APP)[0].records;
        let (k_first, k_last, _) = in_kept.epochs[&e0];
        println!(
            "{owner} kept generation {} of {VOLUME}: {} records of epoch {e0} (the witness counted {written_e0}; {new}'s image has {})",
            kept.generation,
            k_last + 1 - k_first,
            records.epochs[&e0].1 + 1 - records.epochs[&e0].0,
        );
        // The recorder writes a record into the image before it logs it to
        // the witness, and the old owner captured its image once more
        // after the appliance stopped: every record the witness saw is in.
        ensure!(
            k_last + 1 - k_first >= written_e0,
            "the kept copy holds {} records of epoch {e0}, the witness saw {written_e0}",
            k_last + 1 - k_first
        );
        Ok(())
    })
}

#[test]
fn one_cut_link() -> Result<()> {
    scenario(|scene| {
        let (owner, e0) = scene.deploy()?;
        // Cut the owner from the leader if that is another rack: the
        // harder case (its renewals must go through the third rack).
        let leader = scene
            .status(&owner)?
            .control
            .and_then(|c| c.leader)
            .filter(|l| *l != owner);
        let peer = leader.unwrap_or_else(|| others(&owner)[0].to_owned());
        scene.field.cut(&owner, &peer)?;
        println!("cut {owner} <-> {peer}; watching for {CUT_OBSERVATION:?}");
        let polls = scene.hold_running(
            CUT_OBSERVATION,
            "the recorder stays on its owner, running, same epoch",
            &owner,
            e0,
        )?;
        println!("no failover over {polls} polls");
        if scene.field.udp_reaches(&owner, &peer)? || scene.field.udp_reaches(&peer, &owner)? {
            bail!("the {owner} <-> {peer} cut was not in force");
        }
        scene.field.heal_all()?;
        let h = check_history(&scene.witness, APP)?;
        let copies = h.of(APP);
        println!("witness: {copies:?}");
        let epochs: Vec<u64> = copies.iter().map(|c| c.epoch).collect();
        ensure!(
            epochs == [e0],
            "witness epochs {epochs:?}, want only [{e0}]"
        );
        ensure!(
            copies[0].rack == owner,
            "epoch {e0} ran on {}",
            copies[0].rack
        );
        let records = check_records(&scene.image(&owner)?)?;
        ensure!(
            records.epochs.keys().copied().eq([e0]),
            "image epochs {:?}",
            records.epochs
        );
        println!("{} records, all of epoch {e0} on {owner}", records.count);
        Ok(())
    })
}

/// Rack c is cut off when the field boots: a and b form a control plane,
/// c forms one of its own and runs the recorder. When the link comes up,
/// c's cluster (one voter) joins a and b's (two): one control plane of
/// three, the recorder adopted with its epoch, running again, and never
/// two copies at once (the witness).
#[test]
fn split_at_first_boot_merges_when_the_link_comes_up() -> Result<()> {
    scenario_with(
        |field, _| field.isolate("c"),
        |scene| {
            wait_until(CONTROL_TIMEOUT, "a+b and c formed apart", || {
                Ok(scene.status("a")?.has_control_of(2)
                    && scene.status("b")?.has_control_of(2)
                    && scene.status("c")?.has_control_of(1))
            })?;
            let manifest = scene.fleet.dir().join(format!("{APP}.toml"));
            std::fs::write(&manifest, recorder_manifest(APP, 0, &scene.witness))?;
            let manifest = manifest.to_str().context("temp path is UTF-8")?;
            scene
                .fleet
                .cli(&scene.field, "c", &["app", "deploy", manifest])?;
            wait_until(RUNNING_TIMEOUT, "the recorder running on c", || {
                let a = scene.app("c")?;
                Ok(a.state == "running" && a.owner.as_deref() == Some("c"))
            })?;
            let e0 = scene.app("c")?.epoch;
            std::thread::sleep(Duration::from_secs(3));
            scene.field.heal_all()?;
            let healed = Instant::now();
            let took = scene.control_of_all(CONTROL_TIMEOUT)?;
            println!(
                "one control plane of 3 voters {:.1} s after the link came up",
                took.as_secs_f64()
            );
            let mut seen = None;
            let took = wait_until(FAILOVER_TIMEOUT, "the recorder running again", || {
                let mut views = Vec::new();
                for rack in RACKS {
                    views.push(scene.app(rack)?);
                }
                let ok = views.iter().all(|v| {
                    v.state == "running" && v.owner == views[0].owner && v.epoch == views[0].epoch
                });
                seen = ok.then(|| (views[0].owner.clone(), views[0].epoch));
                Ok(ok)
            })?;
            let (owner, e1) = seen.expect("set when the wait succeeds");
            let owner = owner.context("running has an owner")?;
            println!(
            "{APP} running on {owner} at epoch {e1} {:.1} s after the merge ({:.1} s after the link came up)",
            took.as_secs_f64(),
            healed.elapsed().as_secs_f64()
        );
            ensure!(e1 >= e0, "epoch went back from {e0} to {e1}");
            std::thread::sleep(Duration::from_secs(3));
            let h = check_history(&scene.witness, APP)?;
            println!("witness: {:?}", h.of(APP));
            let events = scene
                .fleet
                .cli(&scene.field, "c", &["events", "--limit", "500"])?;
            ensure!(
                events.contains("control_left_cluster") && events.contains("control_adopted"),
                "c's event log does not show the merge"
            );
            let records = check_records(&scene.image(&owner)?)?;
            println!(
                "records in {owner}'s image: {} in epochs {:?}",
                records.count, records.epochs
            );
            Ok(())
        },
    )
}

/// A rack dead for longer than `remove_dead_voter_after_s` leaves the
/// control plane's voters (so the field keeps a majority for its next
/// loss), and is a voter again once it is back.
#[test]
fn a_rack_long_dead_leaves_the_voters_and_returns() -> Result<()> {
    scenario_with(
        |_, fleet| {
            fleet.edit_configs(
                "remove_dead_voter_after_s = 600",
                "remove_dead_voter_after_s = 5",
            )
        },
        |scene| {
            scene.control_of_all(CONTROL_TIMEOUT)?;
            // c may have formed a cluster of its own at first boot and left
            // it for a and b's (a split at first boot merges): only a leave
            // after the cut counts.
            let left_at_boot = left_cluster_events(scene, "c")?;
            scene.field.isolate("c")?;
            let took = wait_until(Duration::from_secs(60), "c out of the voters", || {
                Ok(scene.status("a")?.has_control_of(2) && scene.status("b")?.has_control_of(2))
            })?;
            println!(
                "c out of the voters {:.1} s after it was cut off",
                took.as_secs_f64()
            );
            // The leader (a or b) took it out and recorded it.
            let mut logged = false;
            for rack in ["a", "b"] {
                let events = scene
                    .fleet
                    .cli(&scene.field, rack, &["events", "--limit", "500"])?;
                logged |= events.contains("control_voter_removed");
            }
            ensure!(logged, "no event log shows c taken out");
            scene.field.heal_all()?;
            let took = scene.control_of_all(CONTROL_TIMEOUT)?;
            println!("c a voter again {:.1} s after the heal", took.as_secs_f64());
            let left = left_cluster_events(scene, "c")?;
            ensure!(
                left == left_at_boot,
                "c left its cluster instead of rejoining it ({left_at_boot} leave(s) at boot, {left} now)"
            );
            Ok(())
        },
    )
}

/// How many times `rack`'s event log shows it leaving a control-plane
/// cluster.
fn left_cluster_events(scene: &Scene, rack: &str) -> Result<usize> {
    Ok(scene
        .fleet
        .events(&scene.field, rack, 500)?
        .iter()
        .filter(|e| e["kind"] == "control_left_cluster")
        .count())
}

/// How long a drill's fault lasts in these tests: a failover (about 9 s
/// here) with room on a busy machine.
const DRILL_FAULT_S: u64 = 20;

/// The drill's report as `rack` keeps it.
fn drill_report(scene: &Scene, rack: &str, id: &str) -> Result<serde_json::Value> {
    field_tests::drill::operator::reports(&scene.field, &scene.fleet, rack)?
        .into_iter()
        .find(|r| r["id"] == id)
        .ok_or_else(|| anyhow!("rack {rack} keeps no report {id}"))
}

/// `fieldrack drill ARGS` from `from` is refused: it exits non-zero and
/// prints `[FAIL] CHECK`.
fn refused(scene: &Scene, from: &str, args: &[&str], check: &str) -> Result<()> {
    let out = field_tests::drill::operator::drill(
        &scene.field,
        &scene.fleet,
        from,
        args,
        Duration::from_secs(20),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    ensure!(!out.status.success(), "drill {args:?} was not refused");
    ensure!(text.contains(&format!("[FAIL] {check}")), "{text}");
    Ok(())
}

/// Every rack's `drill_fault` events: a refused drill must leave none.
fn drill_fault_events(scene: &Scene) -> Result<usize> {
    let mut n = 0;
    for rack in RACKS {
        n += scene
            .fleet
            .events(&scene.field, rack, 200)?
            .iter()
            .filter(|e| e["kind"] == "drill_fault")
            .count();
    }
    Ok(n)
}

/// `fieldrack drill run power-loss OWNER` from another rack, as an
/// operator runs it: a refused precondition first changes nothing; then
/// the recorder moves, the report (kept on every rack) dates `started` and
/// `healthy` within 0.5 s of the recorder's own first record on the new
/// owner, passes its targets, and the witness shows no two copies.
#[test]
fn drill_power_loss_through_the_cli() -> Result<()> {
    use field_tests::drill::operator;
    scenario_with(operator::api_on_rack_ips, |scene| {
        let (owner, e0) = scene.deploy()?;
        let from = others(&owner)[0];
        // A precondition fails (a rack not in the field): refused,
        // nothing ordered anywhere.
        refused(
            scene,
            from,
            &["run", "isolate", "nowhere"],
            "racks named exist",
        )?;
        ensure!(
            drill_fault_events(scene)? == 0,
            "a refused drill ordered faults"
        );

        let html = scene.fleet.dir().join("drill.html");
        let html_arg = html.to_str().context("temp path is UTF-8")?;
        let duration = DRILL_FAULT_S.to_string();
        let out = operator::drill(
            &scene.field,
            &scene.fleet,
            from,
            &[
                "run",
                "power-loss",
                &owner,
                "--duration",
                &duration,
                "--html",
                html_arg,
            ],
            Duration::from_secs(DRILL_FAULT_S + 60),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!("{text}{}", String::from_utf8_lossy(&out.stderr));
        ensure!(out.status.success(), "the drill did not pass");
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("drill ")?.split(':').next())
            .context("the drill printed no id")?
            .to_owned();
        ensure!(
            std::fs::read_to_string(&html)?.contains("<svg"),
            "no timeline"
        );

        // Kept on every rack, the powered-off one included.
        let report = drill_report(scene, RACKS[0], &id)?;
        for rack in RACKS {
            ensure!(
                drill_report(scene, rack, &id)? == report,
                "{rack} keeps another report"
            );
        }
        ensure!(report["outcome"] == "passed", "{report}");
        let app = &report["steps"][0]["appliances"][0];
        let new = app["to"].as_str().context("no new owner")?.to_owned();
        let e1 = app["epoch_after"].as_u64().context("no new epoch")?;
        let records = scene.check_moved(&owner, e0, &new, e1)?;
        ensure!(records.count > 0);
        marks_match_witness(&scene.witness, app)
    })
}

/// The report's `started` and `healthy` of a moved appliance (`app`, one
/// of a step's `appliances`) are within 0.5 s of the recorder's own first
/// record at its new epoch, in the witness log.
fn marks_match_witness(witness: &std::path::Path, app: &serde_json::Value) -> Result<()> {
    let e1 = app["epoch_after"].as_u64().context("no new epoch")?;
    let h = check_history(witness, APP)?;
    let first = h
        .of(APP)
        .iter()
        .find(|c| c.epoch == e1)
        .context("no record of the new epoch")?
        .first_ms;
    for step in ["started", "healthy"] {
        let at = app["marks"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["step"] == step))
            .and_then(|m| m["at_ms"].as_u64())
            .with_context(|| format!("no `{step}` in the timeline"))?;
        let off = at.abs_diff(first);
        println!("{step}: report {at}, recorder's first record {first}: {off} ms apart");
        ensure!(
            off <= 500,
            "{step} is {off} ms from the recorder's own record"
        );
    }
    Ok(())
}

/// A drill whose controlling rack is SIGKILLed mid-drill still heals: the
/// faulted rack lifts its fault at its own deadline and rejoins. Before
/// the kill, a second drill (from another rack) is refused by its
/// precondition and changes nothing.
#[test]
fn drill_heals_without_its_controller() -> Result<()> {
    use field_tests::drill::operator;
    scenario_with(operator::api_on_rack_ips, |scene| {
        scene.control_of_all(CONTROL_TIMEOUT)?;
        let (controller, target) = ("a", "b");
        let mut cmd = scene.field.command(controller, scene.fleet.bin())?;
        cmd.args([
            "drill",
            "run",
            "isolate",
            target,
            "--duration",
            "20",
            "--config",
        ])
        .arg(scene.fleet.config(controller))
        .stdout(std::process::Stdio::null());
        let mut cli = cmd.spawn()?;
        wait_until(Duration::from_secs(20), "the fault in force on b", || {
            Ok(scene
                .fleet
                .events(&scene.field, target, 50)?
                .iter()
                .any(|e| e["kind"] == "drill_fault"))
        })?;
        let ordered = Instant::now();

        // A second drill while this one is in force is refused (no drill
        // running) and changes nothing: no rack holds a fault of it, none
        // keeps a report of it.
        let first = scene
            .fleet
            .events(&scene.field, target, 50)?
            .into_iter()
            .find(|e| e["kind"] == "drill_fault")
            .and_then(|e| e["detail"]["drill"].as_str().map(str::to_owned))
            .context("the fault names no drill")?;
        refused(
            scene,
            "c",
            &["run", "power-loss", "c", "--duration", "15"],
            "no drill running",
        )?;
        for rack in RACKS {
            for e in scene.fleet.events(&scene.field, rack, 200)? {
                ensure!(
                    e["kind"] != "drill_fault" || e["detail"]["drill"] == first.as_str(),
                    "{rack} took an order of the refused drill: {e}"
                );
            }
        }
        ensure!(
            operator::reports(&scene.field, &scene.fleet, "c")?.is_empty(),
            "the refused drill kept a report"
        );
        cli.kill()?;
        let _ = cli.wait();
        scene.agent(controller)?.kill()?;
        println!("SIGKILL of the drill and of {controller}'s agent");
        let healed = wait_until(Duration::from_secs(40), "b healed and sees c", || {
            let healed = scene
                .fleet
                .events(&scene.field, target, 50)?
                .iter()
                .any(|e| e["kind"] == "drill_healed" && e["detail"]["why"] == "deadline");
            Ok(healed && scene.status(target)?.state_of("c") == Some(PeerState::Alive))
        })?;
        let took = ordered.elapsed();
        println!(
            "healed {:.1} s after the order was seen",
            took.as_secs_f64()
        );
        ensure!(took <= Duration::from_secs(20 + 8), "healed after {took:?}");
        let _ = healed;
        Ok(())
    })
}

/// Runs `fieldrack drill run WORDS` from `from` and returns its report
/// (as the controller keeps it); fails if the drill did not pass or two
/// copies of the recorder ever wrote at once.
fn drill_passes(
    scene: &Scene,
    from: &str,
    words: &[&str],
    duration_s: u64,
) -> Result<serde_json::Value> {
    drill_passes_in(
        &scene.field,
        &scene.fleet,
        &scene.witness,
        from,
        words,
        duration_s,
    )
}

/// [`drill_passes`] on the scene's parts (so the agents stay free to be
/// restarted meanwhile).
fn drill_passes_in(
    field: &Field,
    fleet: &Fleet,
    witness: &std::path::Path,
    from: &str,
    words: &[&str],
    duration_s: u64,
) -> Result<serde_json::Value> {
    use field_tests::drill::operator;
    let duration = duration_s.to_string();
    let mut args = vec!["run"];
    args.extend(words);
    args.extend(["--duration", &duration, "--html", "/dev/null"]);
    let out = operator::drill(
        field,
        fleet,
        from,
        &args,
        Duration::from_secs(duration_s + 60),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "drill {words:?} did not pass");
    check_history(witness, APP)?;
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("drill ")?.split(':').next())
        .context("the drill printed no id")?;
    operator::reports(field, fleet, from)?
        .into_iter()
        .find(|r| r["id"] == id)
        .ok_or_else(|| anyhow!("rack {from} keeps no report {id}"))
}

/// Waits until the recorder's owner holds a replica in sync again (the
/// next drill's precondition); returns the owner.
fn reprotected(scene: &Scene) -> Result<String> {
    let mut owner = String::new();
    wait_until(REPLICATED_TIMEOUT, "the recorder re-protected", || {
        let a = scene.app("a")?;
        let Some(o) = a.owner.filter(|_| a.state == "running") else {
            return Ok(false);
        };
        let s = scene.status(&o)?;
        let synced = s.volume(VOLUME).is_some_and(|v| {
            let g = v.generation.unwrap_or(0);
            v.replicas
                .iter()
                .any(|r| r.generation.is_some_and(|rg| rg > 0 && rg + 1 >= g))
        });
        owner = o;
        Ok(synced)
    })?;
    Ok(owner)
}

/// The port of each rack's own tile origin in the drill scenarios.
const TILE_PORT: u16 = 8089;

/// Each rack's APIs on its address, and a tile source served by an
/// origin on that rack's own loopback (any path: a small PNG, cacheable
/// for an hour), so the drills' tile probes have a tile to fetch.
fn drill_field_with_tiles(field: &Field, fleet: &Fleet) -> Result<()> {
    field_tests::drill::operator::api_on_rack_ips(field, fleet)?;
    fleet.add_tile_source(
        "test",
        &format!("http://127.0.0.1:{TILE_PORT}/{{z}}/{{x}}/{{y}}.png"),
    )?;
    for rack in fleet.racks() {
        let listener = field.run_in(rack, || {
            Ok(std::net::TcpListener::bind(("127.0.0.1", TILE_PORT))?)
        })?;
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for mut s in listener.incoming().flatten() {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                // The request (a GET head, one segment on loopback) is not
                // needed: every path gets the same tile.
                let _ = s.read(&mut [0u8; 4096]);
                let body = b"\x89PNG\r\n\x1a\ntile";
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncache-control: max-age=3600\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(body);
            }
        });
    }
    Ok(())
}

/// Every step of the drill passed its tiles target: tiles were served
/// throughout on the racks it did not cut off.
fn tiles_served(report: &serde_json::Value) -> Result<()> {
    let steps = report["steps"].as_array().context("no steps")?;
    for step in steps {
        let tiles = step["targets"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["name"] == "tiles"))
            .context("no tiles target")?;
        ensure!(
            tiles["verdict"] == "pass",
            "{}: tiles: {tiles}",
            step["fault"]
        );
    }
    Ok(())
}

/// Every other scenario through `fieldrack drill run` on one field, one
/// after the other: isolate and partition move the recorder, cut-link and
/// backhaul-down (two steps of one drill file) move nothing, generator
/// hands it over; each passes its
/// targets with no two copies. The isolated rack's agent is restarted
/// mid-fault and stays cut off until its deadline.
#[test]
fn drill_scenarios_through_the_cli() -> Result<()> {
    scenario_with(drill_field_with_tiles, |scene| {
        scene.deploy()?;
        let witness = scene.witness.clone();
        let moved = |r: &serde_json::Value| -> Result<String> {
            let app = &r["steps"][0]["appliances"][0];
            ensure!(app["epoch_after"].as_u64().is_some(), "nothing moved: {r}");
            marks_match_witness(&witness, app)?;
            tiles_served(r)?;
            Ok(app["to"].as_str().unwrap_or_default().to_owned())
        };

        // Isolate the owner; restart its agent mid-fault: the stored fault
        // keeps it cut off until the deadline.
        let owner = reprotected(scene)?;
        let from = others(&owner)[0].to_owned();
        let report = {
            let Scene {
                agents,
                fleet,
                field,
                witness,
            } = &mut *scene;
            std::thread::scope(|s| -> Result<serde_json::Value> {
                let run = s.spawn(|| {
                    drill_passes_in(field, fleet, witness, &from, &["isolate", &owner], 30)
                });
                std::thread::sleep(Duration::from_secs(8));
                let agent = agents
                    .iter_mut()
                    .find(|a| a.rack() == owner)
                    .context("no agent for the owner")?;
                agent.kill()?;
                *agent = fleet.start(field, &owner)?;
                println!("{owner}'s agent restarted mid-fault");
                std::thread::sleep(Duration::from_secs(6));
                let seen = fleet.status(field, &from)?.state_of(&owner);
                ensure!(
                    seen != Some(PeerState::Alive),
                    "{owner} rejoined before its deadline ({seen:?} on {from})"
                );
                run.join().expect("drill thread")
            })?
        };
        ensure!(moved(&report)? != owner);

        let owner = reprotected(scene)?;
        let from = others(&owner)[0].to_owned();
        let minority = format!("{owner}|{}", others(&owner).join(","));
        let report = drill_passes(scene, &from, &["partition", &minority], 25)?;
        ensure!(moved(&report)? != owner);

        let owner = reprotected(scene)?;
        let rest = others(&owner);
        // Two steps from a drill file: the owner's link to one survivor
        // cut, then the backhaul down everywhere; nothing moves.
        let file = scene.fleet.dir().join("drill.toml");
        std::fs::write(
            &file,
            format!(
                "[[step]]\nfault = \"cut-link\"\na = \"{owner}\"\nb = \"{}\"\nduration_s = 15\n\
                 [[step]]\nfault = \"backhaul-down\"\nduration_s = 5\n",
                rest[1]
            ),
        )?;
        let file = file.to_str().context("temp path is UTF-8")?;
        let report = drill_passes(scene, rest[0], &["--file", file], 20)?;
        let steps = report["steps"].as_array().context("no steps")?;
        ensure!(steps.len() == 2, "{} steps", steps.len());
        ensure!(
            steps
                .iter()
                .all(|s| s["appliances"].as_array().is_some_and(Vec::is_empty)),
            "something moved: {report}"
        );
        tiles_served(&report)?;

        let owner = reprotected(scene)?;
        let from = others(&owner)[0].to_owned();
        let report = drill_passes(scene, &from, &["generator", &owner, "--runtime", "305"], 30)?;
        ensure!(moved(&report)? != owner);
        Ok(())
    })
}
