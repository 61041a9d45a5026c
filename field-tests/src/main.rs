//! `field-tests`: manual entry points to the field harness.
//!
//! - `field-tests check`: build a 3-rack field, ping between racks, check
//!   multicast, a cut and a heal, tear down. A smoke check of the harness
//!   itself; it does not need the `fieldrack` binary.
//! - `field-tests drill kill-rack [--runs N] [--keep] [--profile P]`:
//!   SIGKILL the owner of a tier-0 appliance N times and time each failover
//!   (see `field_tests::drill`), with `--profile` over emulated links.
//! - `field-tests drill run SCENARIO… [--duration S] [--keep]`: the
//!   operator's `fieldrack drill run` on a 3-rack field, the recorder on b.
//! - `field-tests linkem --profile P [--reverse Q] [--measure [--long]]`:
//!   two racks joined by an emulated link (see `field_tests::linkem`);
//!   with `--measure`, the emulator's self-test both ways, else it waits
//!   for Enter while you run your own traffic in the namespaces.

use std::io::BufRead;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::{Parser, Subcommand};
use field_tests::drill::{self, KillRack};
use field_tests::linkem::measure::{self, Plan, SelfTest};
use field_tests::linkem::{EmulatedLink, LinkProfile, Profile};
use field_tests::{netns, Field};

#[derive(Parser)]
#[command(
    name = "field-tests",
    about = "Fieldrack field tests in network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Smoke-check the harness: namespaces, ping, multicast, cut, heal, cleanup.
    Check {
        /// Rack names.
        #[arg(long, value_delimiter = ',', default_value = "a,b,c")]
        racks: Vec<String>,
    },
    /// Repeated faults on a live 3-rack field, with timings.
    #[command(subcommand)]
    Drill(DrillCmd),
    /// Two racks, `a` and `b`, joined by an emulated link.
    Linkem {
        /// Profile of a -> b (and of b -> a unless --reverse): a name
        /// (lan, radio-good, radio-poor, lossy, satellite, fading) with
        /// optional overrides, e.g. `radio-poor,loss=5%`.
        #[arg(long, value_parser = profile_arg)]
        profile: String,
        /// Profile of b -> a, for an asymmetric link.
        #[arg(long, value_parser = profile_arg)]
        reverse: Option<String>,
        /// Seed of the emulator's randomness.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Measure the link both ways (delay, loss, rate) and exit.
        #[arg(long)]
        measure: bool,
        /// With --measure: about a minute per direction instead of 8 s.
        #[arg(long, requires = "measure")]
        long: bool,
    },
}

#[derive(Subcommand)]
enum DrillCmd {
    /// SIGKILL the owner of a tier-0 appliance, time its failover, repeat.
    KillRack {
        /// How many kills.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Keep the fleet dir (configs, logs, witness) afterwards.
        #[arg(long)]
        keep: bool,
        /// Join every pair of racks by an emulated link on this profile
        /// (e.g. `radio-poor`) instead of the clean bridge.
        #[arg(long, value_parser = profile_arg)]
        profile: Option<String>,
    },
    /// `fieldrack drill run SCENARIO` on a namespace field (recorder on b,
    /// run from a), e.g. `power-loss b`, `partition b|a,c`.
    Run {
        /// The scenario's words, as `fieldrack drill run` takes them.
        #[arg(required = true)]
        words: Vec<String>,
        /// How long the fault lasts, seconds.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// Keep the fleet dir (configs, logs, witness, report) afterwards.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("field-tests: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    match Cli::parse().command {
        Cmd::Check { racks } => check(&racks),
        Cmd::Drill(DrillCmd::KillRack {
            runs,
            keep,
            profile,
        }) => kill_rack(KillRack {
            runs,
            keep,
            profile,
        }),
        Cmd::Drill(DrillCmd::Run {
            words,
            duration,
            keep,
        }) => {
            if let Err(why) = field_tests::available() {
                println!("SKIP: {why}");
                return Ok(ExitCode::from(2));
            }
            Ok(if drill::operator_run(&words, duration, keep)? {
                println!("PASS: the drill passed, no dual-active");
                ExitCode::SUCCESS
            } else {
                println!("FAIL");
                ExitCode::FAILURE
            })
        }
        Cmd::Linkem {
            profile,
            reverse,
            seed,
            measure,
            long,
        } => linkem(profile, reverse, seed, measure, long),
    }
}

fn kill_rack(opts: KillRack) -> Result<ExitCode> {
    if let Err(why) = field_tests::available() {
        println!("SKIP: {why}");
        return Ok(ExitCode::from(2));
    }
    let report = drill::kill_rack(&opts)?;
    if report.passed() {
        println!("PASS: median within target, no dual-active");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("MISS: median above target or dual-active (see above)");
        Ok(ExitCode::FAILURE)
    }
}

/// Checks a profile argument at parse time, so clap reports a bad one; the
/// string is kept (a parsed `Profile` would make `Cmd` large).
fn profile_arg(s: &str) -> Result<String, field_tests::linkem::ProfileError> {
    s.parse::<Profile>().map(|_| s.to_owned())
}

fn linkem(
    profile: String,
    reverse: Option<String>,
    seed: u64,
    measure: bool,
    long: bool,
) -> Result<ExitCode> {
    if let Err(why) = field_tests::available() {
        println!("SKIP: {why}");
        return Ok(ExitCode::from(2));
    }
    let profile: Profile = profile.parse()?;
    let reverse = reverse.map(|r| r.parse::<Profile>()).transpose()?;
    let profiles = LinkProfile::asymmetric(profile.clone(), reverse.unwrap_or(profile));
    let field = Field::new(["a", "b"])?;
    // The bare path's own latency, which the self-test takes off.
    let baselines = if measure {
        measure::path_latency(&field, "a", "b", &profiles)?
    } else {
        [Duration::ZERO; 2]
    };
    let link = EmulatedLink::between(&field, "a", "b", profiles.clone(), seed)?;
    for (rack, dev) in [("a", link.device(0)), ("b", link.device(1))] {
        println!(
            "rack {rack}: namespace {} address {} (peer routed via {dev})",
            field.namespace(rack)?,
            field.ip(rack)?
        );
    }
    println!("a -> b: {}", profiles.a_to_b);
    println!("b -> a: {}", profiles.b_to_a);
    if !measure {
        println!(
            "try: ip netns exec {} ping {}\npress Enter to tear down",
            field.namespace("a")?,
            field.ip("b")?
        );
        let _ = std::io::stdin().lock().lines().next();
        return Ok(ExitCode::SUCCESS);
    }
    let plan = if long { Plan::LONG } else { Plan::QUICK };
    let mut ok = true;
    let directions = [("a", "b", &profiles.a_to_b), ("b", "a", &profiles.b_to_a)];
    for ((from, to, profile), baseline) in directions.into_iter().zip(baselines) {
        let test = SelfTest::run(&field, from, to, profile, baseline, plan)?;
        println!("{from} -> {to}: {test}");
        for failure in test.failures() {
            println!("  out of tolerance: {failure}");
            ok = false;
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn check(racks: &[String]) -> Result<ExitCode> {
    ensure!(racks.len() >= 2, "check needs at least two racks");
    if let Err(why) = field_tests::available() {
        println!("SKIP: {why}");
        return Ok(ExitCode::from(2));
    }
    let start = Instant::now();
    {
        let field = Field::new(racks.iter().cloned())?;
        println!(
            "built field: switch namespace {} with bridge br0",
            field.switch_namespace()
        );
        for rack in field.racks() {
            println!(
                "  rack {rack}: namespace {} address {}",
                field.namespace(rack)?,
                field.ip(rack)?
            );
        }
        for from in field.racks() {
            for to in field.racks().filter(|to| *to != from) {
                let ok = field.ping(from, to)?;
                println!("ping {from} -> {to}: {}", if ok { "ok" } else { "LOST" });
                ensure!(ok, "ping {from} -> {to} failed on a healthy field");
            }
        }
        let (a, b) = (racks[0].as_str(), racks[1].as_str());
        for (from, to) in [(a, b), (b, a)] {
            let ok = field.multicast_reaches(from, to)?;
            println!(
                "udp to {}:7399 {from} -> {to}: {}",
                netns::MDNS_GROUP,
                if ok { "ok" } else { "LOST" }
            );
            ensure!(ok, "multicast {from} -> {to} failed on a healthy field");
        }
        field.cut(a, b)?;
        println!("cut {a} <-> {b}");
        ensure!(!field.ping(a, b)?, "ping {a} -> {b} passed a cut");
        ensure!(!field.ping(b, a)?, "ping {b} -> {a} passed a cut");
        println!("ping {a} -> {b} and {b} -> {a}: blocked, as expected");
        if let Some(c) = racks.get(2) {
            ensure!(
                field.ping(a, c)?,
                "ping {a} -> {c} failed, but only {a}-{b} is cut"
            );
            println!("ping {a} -> {c}: still ok");
        }
        field.heal_all()?;
        ensure!(field.ping(a, b)?, "ping {a} -> {b} failed after heal");
        println!("healed: ping {a} -> {b} ok");
    }
    let left = netns::own_namespaces().context("listing namespaces")?;
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    println!(
        "torn down: no namespaces left ({:.1} s in all)",
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
