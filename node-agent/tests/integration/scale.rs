//! A field of 32 racks on this machine (loopback), the most a field may
//! hold: how long the mesh takes to converge, that the control plane keeps
//! at most 7 voters, that losing a voter (with the appliance it ran)
//! promotes a learner and fails the appliance over, and what an idle agent
//! costs in CPU.
//!
//! A benchmark, not run by the suite (32 agents take both cores for a
//! while): `cargo test -p node-agent --test integration scale:: -- --ignored --nocapture`.
//! The agents are the test build's `fieldrack`, or the binary
//! `FIELDRACK_AGENT_BIN` names (a release build: what a rack runs).
//! The voter killed is the first other than r01, or with
//! `SCALE_KILL_LEADER=1` the leader (unless r01 leads).
//! It prints each figure against its target with PASS / FAIL and fails
//! only when something does not happen at all.

use std::time::{Duration, Instant};

use crate::common::*;

const RACKS: usize = 32;
/// Targets: mesh converged after the last start, failover, idle CPU.
const CONVERGE_TARGET: Duration = Duration::from_secs(10);
const FAILOVER_TARGET: Duration = Duration::from_secs(20);
const IDLE_CPU_TARGET: f64 = 2.0;
/// How long after the control plane formed idle CPU starts being counted.
const IDLE_SETTLE: Duration = Duration::from_secs(30);

fn names() -> Vec<String> {
    (1..=RACKS).map(|i| format!("r{i:02}")).collect()
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

/// CPU time (user + system) of `pid` so far, in clock ticks.
/// The hypervisor's share of this machine's CPU time over a window (the
/// `steal` column of /proc/stat): on a shared VM the figures above move
/// with it, so each is printed beside it.
struct Steal {
    at: Instant,
    ticks: u64,
}

impl Steal {
    fn now() -> Steal {
        Steal {
            at: Instant::now(),
            ticks: steal_ticks(),
        }
    }

    /// A sentence on the steal since `now()`.
    fn since(&self) -> String {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let ticks = steal_ticks().saturating_sub(self.ticks);
        let share = ticks as f64 / 100.0 / (self.at.elapsed().as_secs_f64() * cpus) * 100.0;
        format!("(the hypervisor took {share:.1} % of the machine's CPU time meanwhile)")
    }
}

/// CPU time taken by the hypervisor so far, in clock ticks (0 on bare metal).
fn steal_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().next()?.split_whitespace().nth(8)?.parse().ok())
        .unwrap_or(0)
}

fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: state is field 3,
    // utime 14 and stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum()
}

/// Every rack in `up` sees every other one of them alive.
async fn converged(fleet: &Fleet, up: &[String]) -> bool {
    for r in up {
        let Some(s) = status(&fleet.client(r)).await else {
            return false;
        };
        let alive = s
            .peers
            .iter()
            .filter(|p| format!("{:?}", p.state) == "Alive")
            .filter(|p| p.rack.as_ref().is_some_and(|n| up.contains(n)))
            .count();
        if alive + 1 < up.len() {
            return false;
        }
    }
    true
}

async fn control(fleet: &Fleet, rack: &str) -> Option<control::ControlStatus> {
    status(&fleet.client(rack)).await?.control
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test -p node-agent --test integration scale:: -- --ignored --nocapture"]
async fn thirty_two_racks_converge_keep_seven_voters_and_fail_over() {
    let names = names();
    let fleet = Fleet::init(&names.join(","), &[]);
    // A dead voter is replaced after 10 minutes by default; 20 s here, to
    // see the learner promoted within the benchmark.
    for r in &names {
        let p = fleet.config(r);
        let text = std::fs::read_to_string(&p).unwrap();
        let text = text.replacen(
            "remove_dead_voter_after_s = 600",
            "remove_dead_voter_after_s = 20",
            1,
        );
        assert!(text.contains("remove_dead_voter_after_s = 20"), "{p:?}");
        std::fs::write(&p, text).unwrap();
    }
    let bin = std::env::var("FIELDRACK_AGENT_BIN").unwrap_or_else(|_| BIN.to_owned());
    println!("agents: {bin}");
    let mut agents: Vec<(String, Agent)> = Vec::new();
    let start_steal = Steal::now();
    for r in &names {
        let log = fleet.dir.path().join(format!("{r}.log"));
        agents.push((r.clone(), Agent::start_bin(&bin, &fleet.config(r), &log)));
    }
    let took = wait_until(Duration::from_secs(180), "32 racks converged", || {
        converged(&fleet, &names)
    })
    .await;
    println!(
        "{RACKS} racks: mesh converged (every rack sees {} alive) {:.1} s after the last start (target {} s): {}",
        RACKS - 1,
        took.as_secs_f64(),
        CONVERGE_TARGET.as_secs(),
        verdict(took <= CONVERGE_TARGET)
    );
    println!("  {}", start_steal.since());

    // The control plane: a leader, at most 7 voters, every rack a member.
    wait_until(
        Duration::from_secs(120),
        "7 voters and a leader",
        || async {
            control(&fleet, &names[0])
                .await
                .is_some_and(|c| c.leader.is_some() && c.voters.len() == 7)
        },
    )
    .await;
    let voters = control(&fleet, &names[0]).await.unwrap().voters;
    println!("voters: {} ({})", voters.len(), voters.join(","));

    // Idle: what each agent costs with nothing to do, once the start's
    // aftermath (learners catching up, first snapshots) has passed.
    tokio::time::sleep(IDLE_SETTLE).await;
    let leader = control(&fleet, &names[0]).await.and_then(|c| c.leader);
    let window = Duration::from_secs(30);
    let idle_steal = Steal::now();
    let before: Vec<u64> = agents.iter().map(|(_, a)| cpu_ticks(a.pid())).collect();
    tokio::time::sleep(window).await;
    let after: Vec<u64> = agents.iter().map(|(_, a)| cpu_ticks(a.pid())).collect();
    let idle_steal = idle_steal.since();
    let tick = 100.0; // USER_HZ on Linux
    let per_agent: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 / tick / window.as_secs_f64() * 100.0)
        .collect();
    let mean = per_agent.iter().sum::<f64>() / per_agent.len() as f64;
    let max = per_agent.iter().copied().fold(0.0, f64::max);
    println!(
        "idle CPU per agent over {} s, {} s after the voters were chosen: mean {mean:.2} % of a core, max {max:.2} % (target {IDLE_CPU_TARGET} %): {}",
        window.as_secs(),
        IDLE_SETTLE.as_secs(),
        verdict(mean <= IDLE_CPU_TARGET)
    );
    println!("  {idle_steal}");
    let role_mean = |pick: &dyn Fn(&str) -> bool| {
        let v: Vec<f64> = agents
            .iter()
            .zip(&per_agent)
            .filter(|((r, _), _)| pick(r))
            .map(|(_, c)| *c)
            .collect();
        (v.iter().sum::<f64>() / v.len().max(1) as f64, v.len())
    };
    let is_leader = |r: &str| leader.as_deref() == Some(r);
    let (l, _) = role_mean(&is_leader);
    let (v, nv) = role_mean(&|r| voters.iter().any(|x| x == r) && !is_leader(r));
    let (n, nn) = role_mean(&|r| !voters.iter().any(|x| x == r));
    println!(
        "  by role: leader {l:.2} %, {nv} other voters {v:.2} % each, {nn} learners {n:.2} % each"
    );

    // An appliance on a voter; that rack is killed.
    let manifest = fleet.dir.path().join("clinic.toml");
    std::fs::write(
        &manifest,
        "[[appliance]]\nname = \"clinic\"\ndriver = \"process\"\ncommand = [\"sleep\", \"3600\"]\ntier = 0\nmemory_mb = 64\n",
    )
    .unwrap();
    // r01 answers the benchmark's commands, so it is never the victim.
    // `SCALE_KILL_LEADER=1`: the leader, the slowest case (an election
    // comes first), unless r01 leads.
    let wants_leader = std::env::var_os("SCALE_KILL_LEADER").is_some_and(|v| v == "1");
    let victim = voters
        .iter()
        .find(|v| wants_leader && leader.as_deref() == Some(v.as_str()) && **v != names[0])
        .or_else(|| voters.iter().find(|v| **v != names[0]))
        .expect("a voter other than r01")
        .clone();
    // A loaded field answers slowly: a command may time out and is retried.
    let retried = |args: &[&str]| {
        for _ in 0..5 {
            if cli_output(&fleet, &names[0], args).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        panic!("fieldrack {args:?} failed 5 times");
    };
    retried(&["app", "deploy", manifest.to_str().unwrap()]);
    retried(&["app", "move", "clinic", "--to", &victim]);
    wait_until(
        Duration::from_secs(60),
        "clinic running on a voter",
        || async {
            status(&fleet.client(&names[0]))
                .await
                .and_then(|s| s.appliances.into_iter().find(|a| a.name == "clinic"))
                .is_some_and(|a| {
                    a.state == "running" && a.owner.as_deref() == Some(victim.as_str())
                })
        },
    )
    .await;
    let epoch = status(&fleet.client(&names[0]))
        .await
        .and_then(|s| s.appliances.into_iter().find(|a| a.name == "clinic"))
        .unwrap()
        .epoch;
    let leader_then = control(&fleet, &names[0]).await.and_then(|c| c.leader);
    agents
        .iter_mut()
        .find(|(r, _)| *r == victim)
        .unwrap()
        .1
        .sigkill();
    let killed = Instant::now();
    // The phases, as r01 sees them: reassigned (a new epoch), running.
    let reassigned = std::sync::Mutex::new(None::<(Duration, Option<String>)>);
    let failover = wait_until(Duration::from_secs(120), "clinic failed over", || async {
        let row = status(&fleet.client(&names[0]))
            .await
            .and_then(|s| s.appliances.into_iter().find(|a| a.name == "clinic"));
        let Some(a) = row else { return false };
        if a.epoch > epoch {
            let mut r = reassigned.lock().unwrap();
            if r.is_none() {
                *r = Some((killed.elapsed(), a.owner.clone()));
            }
        }
        a.state == "running" && a.epoch > epoch && a.owner.as_deref() != Some(victim.as_str())
    })
    .await;
    let (assigned_after, new_owner) = reassigned.into_inner().unwrap().unwrap_or_default();
    println!(
        "SIGKILL of voter {victim} ({}) running clinic: running elsewhere {:.1} s later (target {} s): {}",
        if leader_then.as_deref() == Some(victim.as_str()) {
            "the leader"
        } else {
            "not the leader"
        },
        failover.as_secs_f64(),
        FAILOVER_TARGET.as_secs(),
        verdict(failover <= FAILOVER_TARGET)
    );
    println!(
        "  reassigned to {} {:.1} s after the kill (as r01 saw it)",
        new_owner.as_deref().unwrap_or("?"),
        assigned_after.as_secs_f64()
    );
    wait_until(Duration::from_secs(180), "a learner promoted", || async {
        control(&fleet, &names[0]).await.is_some_and(|c| {
            c.voters.len() == 7 && !c.voters.contains(&victim) && c.leader.is_some()
        })
    })
    .await;
    let promoted = killed.elapsed();
    let new_voters = control(&fleet, &names[0]).await.unwrap().voters;
    println!(
        "a learner promoted in {victim}'s place {:.1} s after the kill (a voter dead for 20 s is taken out): voters {}",
        promoted.as_secs_f64(),
        new_voters.join(",")
    );
    assert!(new_voters.len() <= 7);
}
