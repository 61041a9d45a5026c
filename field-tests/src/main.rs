//! `field-tests`: manual entry points to the field harness.
//!
//! - `field-tests check`: build a 3-rack field, ping between racks, check
//!   multicast, a cut and a heal, tear down. A smoke check of the harness
//!   itself; it does not need the `fieldrack` binary.
//! - `field-tests drill kill-rack [--runs N] [--keep]`: SIGKILL the owner
//!   of a tier-0 appliance N times and time each failover (see [`drill`]).

mod drill;

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::{Parser, Subcommand};
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
        Cmd::Drill(DrillCmd::KillRack { runs, keep }) => drill::kill_rack(runs, keep),
    }
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
