//! Appliance failover on real `fieldrack` agents, one network namespace per
//! rack (3 racks, mDNS, the default non-`--local` config with volumes
//! snapshotted every second): a tier-0 recorder appliance (see
//! `field_tests::appliance`) is deployed, then its owner is killed, cut off
//! from the majority, or loses one link.
//!
//! Every test ends with `check_witness` on the recorder's shared witness
//! log (no two epochs ever wrote at the same time, each epoch on one rack)
//! and, where the appliance moved, `check_records` on the new owner's live
//! image (an unbroken prefix of records, epochs in order). The only
//! ordering asserted is the one the witness proves: the old owner stopped
//! writing before the new one began. Everything else waits with generous
//! bounds: the machine has 2 cores and runs three agents.
//!
//! Tests run one at a time (`field_tests::serial()`). Needs root, iproute2
//! and nftables; skips (printing `SKIP:`) only when namespaces cannot be
//! created. `FIELDTESTS_KEEP=1` keeps configs, logs and the witness; a
//! failing test keeps them anyway and prints the logs' tails.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use field_tests::agent::ApplianceStatus;
use field_tests::appliance::{check_records, check_witness, recorder_manifest, Records};
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
    fn control_of_all(&self, within: Duration) -> Result<Duration> {
        wait_until(within, "a control plane of every rack", || {
            for rack in RACKS {
                if !self.status(rack)?.has_control_of(RACKS.len()) {
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
        let took = self.control_of_all(CONTROL_TIMEOUT)?;
        println!(
            "control plane of 3 voters after {:.1} s",
            took.as_secs_f64()
        );
        let manifest = self.fleet.dir().join(format!("{APP}.toml"));
        std::fs::write(&manifest, recorder_manifest(APP, 0, &self.witness))?;
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
        let runs = check_witness(&self.witness)?;
        println!("witness: {runs:?}");
        let epochs: Vec<u64> = runs.keys().copied().collect();
        ensure!(
            epochs == [e0, e1],
            "witness epochs {epochs:?}, want [{e0}, {e1}]"
        );
        ensure!(
            runs[&e0].rack == old,
            "epoch {e0} ran on {}",
            runs[&e0].rack
        );
        ensure!(
            runs[&e1].rack == new,
            "epoch {e1} ran on {}",
            runs[&e1].rack
        );
        println!(
            "gap between epochs: {} ms (old owner's last record to new owner's first)",
            runs[&e1].first_ms.saturating_sub(runs[&e0].last_ms)
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
            runs[&e0].records,
            runs[&e0].records.saturating_sub(restored)
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
    fleet.edit_configs("snapshot_interval_s = 10", "snapshot_interval_s = 1")?;
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

fn others<'a>(rack: &str) -> Vec<&'a str> {
    RACKS.iter().copied().filter(|r| *r != rack).collect()
}

#[test]
fn kill_owner() -> Result<()> {
    scenario(|scene| {
        let (owner, e0) = scene.deploy()?;
        let survivors = others(&owner);
        scene.agent(&owner)?.kill()?;
        println!("SIGKILL of {owner}'s agent");
        let (new, e1, took) = scene.failover(&survivors, e0)?;
        println!(
            "SIGKILL of {owner} -> {APP} running on {new} at epoch {e1}: {:.1} s",
            took.as_secs_f64()
        );
        // Let the new copy write, then check it.
        std::thread::sleep(Duration::from_secs(2));
        scene.check_moved(&owner, e0, &new, e1)?;
        Ok(())
    })
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
        let before_heal = check_witness(&scene.witness)?;
        let written = before_heal.get(&e1).map_or(0, |r| r.records);
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
        let runs = check_witness(&scene.witness)?;
        println!("witness: {runs:?}");
        let epochs: Vec<u64> = runs.keys().copied().collect();
        ensure!(
            epochs == [e0],
            "witness epochs {epochs:?}, want only [{e0}]"
        );
        ensure!(
            runs[&e0].rack == owner,
            "epoch {e0} ran on {}",
            runs[&e0].rack
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
            let runs = check_witness(&scene.witness)?;
            println!("witness: {runs:?}");
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
            let left = scene
                .fleet
                .cli(&scene.field, "c", &["events", "--limit", "500"])?;
            ensure!(
                !left.contains("control_left_cluster"),
                "c left its cluster instead of rejoining it"
            );
            Ok(())
        },
    )
}
