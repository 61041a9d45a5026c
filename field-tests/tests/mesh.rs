//! Membership of real `fieldrack` agents, one network namespace per rack,
//! with the default (non-`--local`) fleet config: mDNS discovery, no
//! bootstrap addresses, every rack on 0.0.0.0:7400 and 127.0.0.1:7480 of
//! its own network stack.
//!
//! The tests are heavy (three agents each on a 2-core machine) and measure
//! timings, so they run one at a time: each takes `field_tests::serial()`
//! for its whole run (equivalent to `--test-threads=1` for this binary).
//! Every wait is bounded, so a test ends within about a minute.
//!
//! Needs root, iproute2 and nftables; skips (printing `SKIP:`) only when
//! namespaces cannot be created. Uses `FIELDRACK_BIN` if set, else builds
//! `node-agent` first. `FIELDTESTS_KEEP=1` keeps the temp dir with configs
//! and agent logs; a failing test keeps it anyway and prints the logs' tails.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use field_tests::{hold_for, wait_until, Agent, Field, Fleet, PeerState, Status};

const RACKS: [&str; 3] = ["a", "b", "c"];

/// Contract: all racks see each other `alive` within this, from start.
const FORM_TIMEOUT: Duration = Duration::from_secs(15);

/// Brief: survivors report an isolated rack `dead` within this (the
/// contract says 10 s; 2 s of slack for polling and a busy machine).
const DEAD_TIMEOUT: Duration = Duration::from_secs(12);

/// Brief: a healed rack is `alive` again within this (contract: 5 s).
const REJOIN_TIMEOUT: Duration = Duration::from_secs(8);

/// How long an isolated rack, once dead, must stay dead on the survivors.
const DEAD_STAYS_DEAD: Duration = Duration::from_secs(3);

/// How long a cut link is watched for false `dead` verdicts.
const CUT_OBSERVATION: Duration = Duration::from_secs(20);

/// Status calls may fail this many times in a row while observing (a
/// status process slowed down by a busy machine) before the test fails.
const STATUS_ERRORS_TOLERATED: u32 = 2;

/// A running 3-rack fleet in its own field. Fields drop in declaration
/// order: agents stop (SIGTERM) before the namespaces go away.
struct Scene {
    agents: Vec<Agent>,
    fleet: Fleet,
    field: Field,
}

impl Scene {
    fn status(&self, rack: &str) -> Result<Status> {
        self.fleet.status(&self.field, rack)
    }

    fn statuses(&self) -> Result<Vec<Status>> {
        RACKS.iter().map(|r| self.status(r)).collect()
    }

    /// Whether every rack sees every other rack `alive`.
    fn full_mesh(&self) -> Result<bool> {
        for status in self.statuses()? {
            for other in RACKS.iter().filter(|o| **o != status.rack) {
                if status.state_of(other) != Some(PeerState::Alive) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn print_statuses(&self, label: &str) {
        for rack in RACKS {
            match self.status(rack) {
                Ok(s) => println!("[{label}] {}", s.summary()),
                Err(e) => println!("[{label}] {rack}: status failed: {e:#}"),
            }
        }
    }
}

/// Runs `body` on a freshly started 3-rack fleet, then tears everything
/// down; on failure prints the agents' log tails and keeps their dir.
fn scenario(body: impl FnOnce(&Scene) -> Result<()>) -> Result<()> {
    if let Err(why) = field_tests::available() {
        println!("SKIP: {why}");
        return Ok(());
    }
    let _serial = field_tests::serial();
    let field = Field::new(RACKS)?;
    let fleet = Fleet::provision(&RACKS)?;
    let agents = fleet.start_all(&field)?;
    let mut scene = Scene {
        agents,
        fleet,
        field,
    };
    let result = body(&scene);
    if let Err(e) = &result {
        eprintln!("FAILED: {e:#}");
        scene.print_statuses("at failure");
        for agent in &mut scene.agents {
            if !agent.is_running() {
                eprintln!("agent of rack {} had exited", agent.rack());
            }
        }
        scene.fleet.dump_logs(60);
        scene.fleet.keep();
    }
    result
}

/// Waits for the full mesh from start, printing how long it took.
fn formed(scene: &Scene) -> Result<Duration> {
    let took = wait_until(FORM_TIMEOUT, "a full mesh of alive racks", || {
        scene.full_mesh()
    })?;
    println!("full mesh formed {:.1} s after start", took.as_secs_f64());
    Ok(took)
}

#[test]
fn mdns_discovery_forms_full_mesh() -> Result<()> {
    scenario(|scene| {
        formed(scene)?;
        scene.print_statuses("formed");
        // Each rack also advertises its proxy and tile server by DNS-SD:
        // a client on rack b's segment finds a's and c's.
        let bin = field_tests::fieldrack_bin()?;
        let out = scene.field.exec(
            "b",
            &[
                bin.to_str().unwrap_or("fieldrack"),
                "discover",
                "--timeout",
                "4",
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!("fieldrack discover on b:\n{text}");
        for r in ["a", "c"] {
            let want = format!("{r}\thttp://{}:3128/proxy.pac", scene.field.ip(r)?);
            if !text.contains(&want) {
                bail!("rack b did not discover {want:?}; got {text:?}");
            }
        }
        for status in scene.statuses()? {
            let expected: Vec<&str> = RACKS
                .iter()
                .copied()
                .filter(|r| *r != status.rack)
                .collect();
            let mut seen: Vec<&str> = status.peers.iter().map(|p| p.rack.as_str()).collect();
            seen.sort_unstable();
            if seen != expected {
                bail!(
                    "rack {} lists peers {seen:?}, want {expected:?}",
                    status.rack
                );
            }
        }
        Ok(())
    })
}

#[test]
fn cut_link_marks_nobody_dead() -> Result<()> {
    scenario(|scene| {
        formed(scene)?;
        scene.field.cut("a", "b")?;
        println!("cut a <-> b; watching all racks for {CUT_OBSERVATION:?}");
        // Worst state each rack reported for each peer while cut.
        let mut worst: BTreeMap<(String, String), PeerState> = BTreeMap::new();
        let watch = hold_for(
            CUT_OBSERVATION,
            "no rack reports a peer dead (or forgets one)",
            STATUS_ERRORS_TOLERATED,
            || {
                for status in scene.statuses()? {
                    for other in RACKS.iter().filter(|o| **o != status.rack) {
                        let Some(state) = status.state_of(other) else {
                            println!("rack {} no longer lists {other}", status.rack);
                            return Ok(false);
                        };
                        let key = (status.rack.clone(), other.to_string());
                        let entry = worst.entry(key).or_insert(state);
                        if state != PeerState::Alive {
                            *entry = state;
                        }
                        if state == PeerState::Dead {
                            println!(
                                "rack {} reports {other} dead: {}",
                                status.rack,
                                status.summary()
                            );
                            return Ok(false);
                        }
                    }
                }
                Ok(true)
            },
        );
        for ((rack, peer), state) in &worst {
            println!("while cut, worst state of {peer} on {rack}: {state:?}");
        }
        let polls = watch?;
        println!("nobody dead over {polls} polls");
        // Guard against a vacuous pass: the cut must still be in force.
        if scene.field.udp_reaches("a", "b")? || scene.field.udp_reaches("b", "a")? {
            bail!("the a <-> b cut was not in force");
        }
        scene.field.heal_all()?;
        let took = wait_until(REJOIN_TIMEOUT, "full mesh after heal", || scene.full_mesh())?;
        println!("healed; full mesh again after {:.2} s", took.as_secs_f64());
        Ok(())
    })
}

#[test]
fn isolated_rack_is_dead_then_rejoins() -> Result<()> {
    scenario(|scene| {
        formed(scene)?;
        let survivors = ["a", "b"];
        scene.field.isolate("c")?;
        let isolated_at = Instant::now();
        let mut dead_after: BTreeMap<&str, Duration> = BTreeMap::new();
        let mut violations = Vec::new();
        let waited = wait_until(DEAD_TIMEOUT, "a and b report c dead", || {
            for rack in survivors {
                let status = scene.status(rack)?;
                let other = if rack == "a" { "b" } else { "a" };
                if status.state_of(other) == Some(PeerState::Dead) {
                    violations.push(format!("{rack} reports {other} dead"));
                }
                if !dead_after.contains_key(rack) && status.state_of("c") == Some(PeerState::Dead) {
                    dead_after.insert(rack, isolated_at.elapsed());
                }
            }
            Ok(dead_after.len() == survivors.len())
        });
        for (rack, t) in &dead_after {
            println!("c dead on {rack} {:.2} s after isolation", t.as_secs_f64());
        }
        waited?;
        if !violations.is_empty() {
            bail!("survivors marked each other dead: {violations:?}");
        }
        match scene.status("c") {
            Ok(s) => println!("isolated c sees: {}", s.summary()),
            Err(e) => println!("isolated c: status failed: {e:#}"),
        }
        // A verdict that flaps back to alive while c is still cut off is
        // as wrong as no verdict.
        hold_for(
            DEAD_STAYS_DEAD,
            "c stays dead on a and b while isolated",
            STATUS_ERRORS_TOLERATED,
            || {
                for rack in survivors {
                    if scene.status(rack)?.state_of("c") != Some(PeerState::Dead) {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?;

        scene.field.heal_all()?;
        let healed_at = Instant::now();
        let mut alive_after: BTreeMap<&str, Duration> = BTreeMap::new();
        let waited = wait_until(REJOIN_TIMEOUT, "c alive on a and b", || {
            for rack in survivors {
                if alive_after.contains_key(rack) {
                    continue;
                }
                if scene.status(rack)?.state_of("c") == Some(PeerState::Alive) {
                    alive_after.insert(rack, healed_at.elapsed());
                }
            }
            Ok(alive_after.len() == survivors.len())
        });
        for (rack, t) in &alive_after {
            println!("c alive on {rack} {:.2} s after heal", t.as_secs_f64());
        }
        waited?;
        // Informational: how soon c sees the others again.
        match wait_until(REJOIN_TIMEOUT, "c sees a and b alive", || {
            let s = scene.status("c")?;
            Ok(survivors
                .iter()
                .all(|r| s.state_of(r) == Some(PeerState::Alive)))
        }) {
            Ok(_) => println!(
                "c sees a and b alive {:.2} s after heal",
                healed_at.elapsed().as_secs_f64()
            ),
            Err(e) => println!("note: {e:#}"),
        }
        Ok(())
    })
}
