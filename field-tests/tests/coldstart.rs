//! Cold start, one network namespace per rack: every rack's agent is
//! SIGKILLed at once (its appliances die with it, as in a power loss),
//! then the racks return one by one, in every order, with gaps. The
//! appliance (a process that appends its pid to a shared file, then
//! sleeps) never runs while a single rack is up, and runs again once two
//! racks are: no operator step. Then the audited override: the owner
//! returns alone, `fieldrack override quorum --why ... --who ...` makes it
//! run its appliance, the event log records who and why, and the override
//! ends (`quorum_override_ended`) once a second rack returns. A field of
//! two racks and no witness, whose lone survivor never has a majority,
//! gets the same override.
//!
//! Tests run one at a time (`field_tests::serial()`). Needs root, iproute2
//! and nftables; skips (printing `SKIP:`) only when namespaces cannot be
//! created. `FIELDTESTS_KEEP=1` keeps configs and logs; a failing test
//! keeps them anyway and prints the logs' tails.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use field_tests::{hold_for, wait_until, Agent, Field, Fleet};

/// The appliance under test.
const APP: &str = "keeper";

/// From start to a control plane of every voter with a leader.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// From the second rack's start to the appliance running again (a leader
/// elected, the owner's lease, or a failover's lease wait: about 10-20 s).
const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a lone rack is watched not starting anything: longer than a
/// lease (8 s), so a start the rack granted itself would have happened.
const LONE_HOLD: Duration = Duration::from_secs(10);

/// Between the second and the third rack's return.
const GAP: Duration = Duration::from_secs(3);

/// Status calls that may fail in a row while observing.
const STATUS_ERRORS_TOLERATED: u32 = 3;

/// Orders of return: all six.
const ORDERS: [[&str; 3]; 6] = [
    ["a", "b", "c"],
    ["c", "a", "b"],
    ["b", "c", "a"],
    ["a", "c", "b"],
    ["b", "a", "c"],
    ["c", "b", "a"],
];

/// A field with the appliance deployed. Fields drop in declaration order:
/// agents stop before the namespaces go away.
struct Scene {
    agents: Vec<Agent>,
    fleet: Fleet,
    field: Field,
    /// Every start of the appliance appends its pid here.
    starts: PathBuf,
}

impl Scene {
    fn new(racks: &[&str]) -> Result<Scene> {
        let field = Field::new(racks.iter().copied())?;
        let fleet = Fleet::provision(racks)?;
        let starts = fleet.dir().join("starts");
        let agents = fleet.start_all(&field)?;
        let scene = Scene {
            agents,
            fleet,
            field,
            starts,
        };
        scene.control_of_all(racks)?;
        let manifest = scene.fleet.dir().join("keeper.toml");
        std::fs::write(
            &manifest,
            format!(
                "[[appliance]]\nname = \"{APP}\"\ndriver = \"process\"\n\
                 command = [\"sh\", \"-c\", \"echo $$ >> {}; exec sleep 3600\"]\n\
                 tier = 0\nmemory_mb = 16\n",
                scene.starts.display()
            ),
        )?;
        scene.fleet.cli(
            &scene.field,
            racks[0],
            &["app", "deploy", manifest.to_str().context("utf-8")?],
        )?;
        wait_until(RUNNING_TIMEOUT, "the appliance running", || {
            scene.running_once()
        })?;
        Ok(scene)
    }

    /// Every rack of `racks` sees a leader and all of them as voters.
    fn control_of_all(&self, racks: &[&str]) -> Result<Duration> {
        wait_until(CONTROL_TIMEOUT, "a control plane on every rack", || {
            for r in racks {
                if !self
                    .fleet
                    .status(&self.field, r)?
                    .has_control_of(racks.len())
                {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    /// Every pid the appliance ever had, in order.
    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(&self.starts)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// The pids among [`Scene::pids`] still alive.
    fn alive(&self) -> Vec<i32> {
        self.pids()
            .into_iter()
            .filter(|p| nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), None).is_ok())
            .collect()
    }

    /// Exactly one copy of the appliance alive.
    fn running_once(&self) -> Result<bool> {
        let alive = self.alive();
        ensure!(alive.len() <= 1, "two copies of {APP} alive: {alive:?}");
        Ok(alive.len() == 1)
    }

    /// The rack whose assignment names the appliance, once every rack of
    /// `racks` names the same one at the same epoch (a rack that has just
    /// returned may still apply an older assignment).
    fn owner(&self, racks: &[&str]) -> Result<String> {
        let mut owner = None;
        wait_until(RUNNING_TIMEOUT, "every rack naming one owner", || {
            let mut seen = std::collections::BTreeSet::new();
            for r in racks {
                let s = self.fleet.status(&self.field, r)?;
                let a = s.appliance(APP).context("no appliance")?;
                seen.insert((a.owner.clone().context("no owner")?, a.epoch));
            }
            owner = (seen.len() == 1).then(|| seen.into_iter().next().expect("one").0);
            Ok(owner.is_some())
        })?;
        owner.context("no owner")
    }

    /// SIGKILL of every agent: their appliances die with them.
    fn power_loss(&mut self) -> Result<()> {
        for a in &mut self.agents {
            a.kill()?;
        }
        self.agents.clear();
        wait_until(Duration::from_secs(10), "the appliance dead", || {
            Ok(self.alive().is_empty())
        })?;
        Ok(())
    }

    fn start(&mut self, rack: &str) -> Result<()> {
        let agent = self.fleet.start(&self.field, rack)?;
        self.agents.push(agent);
        wait_until(Duration::from_secs(20), "the agent answering", || {
            self.fleet.status(&self.field, rack).map(|_| true)
        })?;
        Ok(())
    }

    /// `rack` alone: no start for [`LONE_HOLD`], and its status says no
    /// majority answers (though it remembers the leader of before).
    fn hold_nothing_runs(&self, rack: &str) -> Result<()> {
        let before = self.pids().len();
        let control = self.fleet.status(&self.field, rack)?.control;
        ensure!(
            control.as_ref().is_some_and(|c| !c.majority),
            "{rack} alone claims a majority: {control:?}"
        );
        hold_for(
            LONE_HOLD,
            &format!("nothing runs on {rack} alone"),
            STATUS_ERRORS_TOLERATED,
            || Ok(self.pids().len() == before && self.alive().is_empty()),
        )?;
        Ok(())
    }

    fn events_of(&self, rack: &str, kind: &str) -> Result<Vec<serde_json::Value>> {
        Ok(self
            .fleet
            .events(&self.field, rack, 200)?
            .into_iter()
            .filter(|e| e["kind"] == kind)
            .collect())
    }

    /// Power loss; the appliance's owner returns alone and runs nothing
    /// until the override; a second rack's return ends it.
    fn owner_alone_under_the_override(&mut self, racks: &[&str]) -> Result<()> {
        let owner = self.owner(racks)?;
        self.power_loss()?;
        self.start(&owner)?;
        self.hold_nothing_runs(&owner)?;
        let second = others(racks, &owner)[0];
        self.override_until(&owner, second)
    }

    /// The override on `rack` alone (its owner): refused by nobody, runs
    /// the appliance, recorded; ends once `second` returns.
    fn override_until(&mut self, rack: &str, second: &str) -> Result<()> {
        let why = "the other racks were lost in the flood";
        let out = self.fleet.cli(
            &self.field,
            rack,
            &["override", "quorum", "--why", why, "--who", "ana"],
        )?;
        ensure!(out.contains("quorum override in force"), "{out}");
        let took = wait_until(RUNNING_TIMEOUT, "the appliance under the override", || {
            self.running_once()
        })?;
        println!(
            "override on {rack}: {APP} running {:.1} s later",
            took.as_secs_f64()
        );
        let recorded = self.events_of(rack, "quorum_override")?;
        let last = recorded.last().context("no quorum_override event")?;
        ensure!(
            last["detail"]["who"] == "ana" && last["detail"]["why"] == why,
            "the event does not say who and why: {last}"
        );
        self.start(second)?;
        let took = wait_until(RUNNING_TIMEOUT, "quorum_override_ended", || {
            Ok(!self.events_of(rack, "quorum_override_ended")?.is_empty())
        })?;
        println!(
            "{second} back: override on {rack} ended {:.1} s later",
            took.as_secs_f64()
        );
        // The appliance keeps running, now on a committed lease.
        hold_for(
            Duration::from_secs(10),
            "one copy running after the override",
            STATUS_ERRORS_TOLERATED,
            || self.running_once(),
        )?;
        Ok(())
    }
}

fn scenario(racks: &[&str], body: impl FnOnce(&mut Scene) -> Result<()>) -> Result<()> {
    if let Err(why) = field_tests::available() {
        println!("SKIP: {why}");
        return Ok(());
    }
    let _serial = field_tests::serial();
    let t0 = Instant::now();
    let mut scene = Scene::new(racks)?;
    let result = body(&mut scene);
    if result.is_err() {
        scene.fleet.dump_logs(40);
        scene.fleet.keep();
    }
    println!("wall time {:.1} s", t0.elapsed().as_secs_f64());
    result
}

fn others<'a>(racks: &[&'a str], rack: &str) -> Vec<&'a str> {
    racks.iter().copied().filter(|r| *r != rack).collect()
}

/// Return in every order, with gaps; then the owner alone under the
/// override.
#[test]
fn racks_return_in_any_order_and_a_lone_rack_needs_the_override() -> Result<()> {
    let racks = ["a", "b", "c"];
    scenario(&racks, |scene| {
        for order in ORDERS {
            scene.power_loss()?;
            println!("power loss; return order {order:?}");
            scene.start(order[0])?;
            scene.hold_nothing_runs(order[0])?;
            scene.start(order[1])?;
            let took = wait_until(RUNNING_TIMEOUT, "the appliance with two racks up", || {
                scene.running_once()
            })?;
            println!(
                "  {} up: {APP} running {:.1} s after its start",
                order[1],
                took.as_secs_f64()
            );
            std::thread::sleep(GAP);
            scene.start(order[2])?;
            scene.control_of_all(&racks)?;
            ensure!(
                scene.running_once()?,
                "{APP} stopped when {} returned",
                order[2]
            );
        }
        scene.owner_alone_under_the_override(&racks)
    })
}

/// Two racks, no witness: either alone lacks a majority (1 of 2 voters);
/// the owner alone runs its appliance only under the override.
#[test]
fn two_racks_without_a_witness_get_the_same_override() -> Result<()> {
    let racks = ["a", "b"];
    scenario(&racks, |scene| scene.owner_alone_under_the_override(&racks))
}
