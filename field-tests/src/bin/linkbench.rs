//! `linkbench`: the link benchmarks, side by side in one run over the
//! link emulator, with a table of targets (measured, limit, ratio,
//! PASS/FAIL) and, with `--json FILE`, the whole report as JSON.
//!
//! - `linkbench detect [--profile P]... [--minutes N] [--kill-profile P]
//!   [--kills N] [--quick]`: failure detection (`field_tests::bench::detect`);
//! - `linkbench failover [--profile P] [--runs N] [--quick]`: the kill-rack
//!   drill over emulated links (`field_tests::bench::failover`);
//! - `linkbench goodput [--profile P]... [--size-mib N] [--congestion C]...`:
//!   replication goodput, bulk plane vs the libp2p default
//!   (`field_tests::bench::goodput`);
//! - `linkbench all [--quick]`: the three, one after the other.
//!
//! Progress goes to stderr, tables to stdout. Exit status: 0 when every
//! target passed, 1 when one failed or a benchmark could not run, 2 when
//! this machine cannot run field tests (no root or namespaces; prints
//! `SKIP: why`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use field_tests::bench::detect::{self, DetectArgs};
use field_tests::bench::failover::{self, FailoverArgs};
use field_tests::bench::goodput::{self, GoodputArgs};
use field_tests::bench::{goodput_checks, goodput_table, table, Check};
use serde_json::{json, Value};

/// `--quick`: each detection watch lasts this long.
const QUICK_WATCH: Duration = Duration::from_secs(60);

/// `--quick`: kills (detect) and drill runs (failover).
const QUICK_RUNS: usize = 2;

#[derive(Parser)]
#[command(
    name = "linkbench",
    about = "Fieldrack over emulated radio and satellite links: failure detection, failover, goodput"
)]
struct Cli {
    /// Also write the whole report, figures and checks, as JSON to FILE.
    #[arg(long, global = true, value_name = "FILE")]
    json: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Failure detection: suspect/dead samples per profile, time to detect a killed rack.
    Detect(DetectCmd),
    /// The kill-rack drill over emulated links: failover times, dual-active.
    Failover(FailoverCmd),
    /// Replication goodput per profile: the bulk plane vs the libp2p default.
    Goodput(GoodputCmd),
    /// detect, failover and goodput, one after the other.
    All {
        /// 1-minute watches and 2 runs instead of 10 minutes and 5/10 runs.
        #[arg(long)]
        quick: bool,
        /// Keep every fleet dir (configs, logs, witness).
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Args)]
struct DetectCmd {
    /// Profiles to watch, each for --minutes (names with overrides, e.g. `lossy,loss=3%`).
    #[arg(long = "profile", value_parser = profile_arg, default_values_t = ["lossy".to_owned(), "satellite".to_owned()])]
    profiles: Vec<String>,
    /// How long each watch lasts.
    #[arg(long, default_value_t = 10.0, conflicts_with = "quick")]
    minutes: f64,
    /// Profile of the kill part.
    #[arg(long, value_parser = profile_arg, default_value = "radio-poor")]
    kill_profile: String,
    /// How many kills (0: none).
    #[arg(long, default_value_t = 5, conflicts_with = "quick")]
    kills: usize,
    /// 1-minute watches and 2 kills.
    #[arg(long)]
    quick: bool,
    /// Keep every fleet dir (configs, logs).
    #[arg(long)]
    keep: bool,
}

impl DetectCmd {
    fn args(&self) -> Result<DetectArgs> {
        let watch = if self.quick {
            QUICK_WATCH
        } else {
            Duration::try_from_secs_f64(self.minutes * 60.0).context("--minutes")?
        };
        Ok(DetectArgs {
            profiles: self.profiles.clone(),
            watch,
            kill_profile: self.kill_profile.clone(),
            kills: if self.quick { QUICK_RUNS } else { self.kills },
            keep: self.keep,
        })
    }
}

#[derive(Args)]
struct FailoverCmd {
    /// Link profile between every pair of racks.
    #[arg(long, value_parser = profile_arg, default_value = "radio-poor")]
    profile: String,
    /// How many kills.
    #[arg(long, default_value_t = 10, conflicts_with = "quick")]
    runs: usize,
    /// 2 runs.
    #[arg(long)]
    quick: bool,
    /// Keep the fleet dir (configs, logs, witness).
    #[arg(long)]
    keep: bool,
}

impl FailoverCmd {
    fn args(&self) -> FailoverArgs {
        FailoverArgs {
            profile: self.profile.clone(),
            runs: if self.quick { QUICK_RUNS } else { self.runs },
            keep: self.keep,
        }
    }
}

#[derive(Args)]
struct GoodputCmd {
    /// Profiles to measure.
    #[arg(long = "profile", value_parser = profile_arg, default_values_t = ["radio-good".to_owned(), "radio-poor".to_owned(), "lossy".to_owned(), "satellite".to_owned()])]
    profiles: Vec<String>,
    /// Size of the replicated volume, MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Congestion controllers of the bulk plane to compare, each against
    /// the libp2p baseline (default: bbr, the plane's own; also cubic,
    /// newreno).
    #[arg(long, default_values_t = ["bbr".to_owned()])]
    congestion: Vec<String>,
    /// A transfer not done within this many seconds is reported as a
    /// bound ("timeout").
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

impl GoodputCmd {
    fn args(&self) -> GoodputArgs {
        let mut variants: Vec<goodput::Variant> = self
            .congestion
            .iter()
            .map(|cc| goodput::Variant::Bulk(cc.clone()))
            .collect();
        variants.push(goodput::Variant::Libp2p);
        GoodputArgs {
            profiles: self.profiles.clone(),
            variants,
            mib: self.size_mib,
            timeout: Duration::from_secs(self.timeout_s),
            ..GoodputArgs::default()
        }
    }
}

/// Checks a profile argument at parse time, so clap reports a bad one
/// before any namespace is made; the string is kept, as the benchmarks
/// report it.
fn profile_arg(s: &str) -> Result<String, field_tests::linkem::ProfileError> {
    s.parse::<field_tests::linkem::Profile>()
        .map(|_| s.to_owned())
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("linkbench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    if let Some(why) = field_tests::linkem::unavailable() {
        println!("SKIP: {why}");
        return Ok(ExitCode::from(2));
    }
    let started = Instant::now();
    let mut out = Outcome::default();
    match &cli.command {
        Cmd::Detect(cmd) => out.detect(&cmd.args()?),
        Cmd::Failover(cmd) => out.failover(&cmd.args()),
        Cmd::Goodput(cmd) => out.goodput(&cmd.args()),
        Cmd::All { quick, keep } => {
            let detect = DetectCmd {
                profiles: vec!["lossy".to_owned(), "satellite".to_owned()],
                minutes: 10.0,
                kill_profile: "radio-poor".to_owned(),
                kills: 5,
                quick: *quick,
                keep: *keep,
            };
            out.detect(&detect.args()?);
            out.failover(
                &FailoverCmd {
                    profile: "radio-poor".to_owned(),
                    runs: 10,
                    quick: *quick,
                    keep: *keep,
                }
                .args(),
            );
            out.goodput(
                &GoodputCmd {
                    profiles: ["radio-good", "radio-poor", "lossy", "satellite"]
                        .map(str::to_owned)
                        .to_vec(),
                    size_mib: 64,
                    congestion: vec!["bbr".to_owned()],
                    timeout_s: 300,
                }
                .args(),
            );
        }
    }
    println!(
        "\nlinkbench: {} check(s), {} failed, {} error(s), {:.0} s in all",
        out.checks.len(),
        out.checks.iter().filter(|c| !c.pass).count(),
        out.errors.len(),
        started.elapsed().as_secs_f64()
    );
    print!("{}", table(&out.checks));
    for e in &out.errors {
        println!("ERROR: {e}");
    }
    let passed = out.passed();
    if let Some(path) = &cli.json {
        let mut report = out.json;
        report["checks"] = serde_json::to_value(&out.checks)?;
        report["errors"] = json!(out.errors);
        report["passed"] = json!(passed);
        report["seconds"] = json!(started.elapsed().as_secs_f64());
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What the benchmarks of one invocation gave: every check, the errors of
/// those that could not run, and the JSON report by benchmark.
struct Outcome {
    checks: Vec<Check>,
    errors: Vec<String>,
    json: Value,
}

impl Default for Outcome {
    fn default() -> Outcome {
        Outcome {
            checks: Vec::new(),
            errors: Vec::new(),
            json: json!({}),
        }
    }
}

impl Outcome {
    fn passed(&self) -> bool {
        self.errors.is_empty() && !self.checks.is_empty() && self.checks.iter().all(|c| c.pass)
    }

    /// Records a benchmark's result: its report (printed with `print`),
    /// or its error, which the others do not wait on.
    fn record<T: serde::Serialize>(
        &mut self,
        bench: &str,
        result: Result<T>,
        print: impl FnOnce(&T) -> Vec<Check>,
    ) {
        match result {
            Ok(report) => {
                self.checks.extend(print(&report));
                self.json[bench] = serde_json::to_value(&report)
                    .unwrap_or_else(|e| json!({ "error": format!("serialising: {e}") }));
            }
            Err(e) => {
                let e = format!("{bench}: {e:#}");
                eprintln!("linkbench: {e}");
                self.json[bench] = json!({ "error": e });
                self.errors.push(e);
            }
        }
    }

    fn detect(&mut self, args: &DetectArgs) {
        self.record("detect", detect::run(args), |r| {
            println!("\n== detect: peer states sampled every 500 ms ==");
            println!(
                "{:<24} {:>7} {:>7} {:>8} {:>7} {:>5} {:>7} {:>8}",
                "profile", "formed", "watched", "samples", "suspect", "dead", "failed", "suspect%"
            );
            for w in &r.watches {
                println!(
                    "{:<24} {:>5.1} s {:>5.0} s {:>8} {:>7} {:>5} {:>7} {:>7.2} %",
                    w.profile,
                    w.formed_s,
                    w.seconds,
                    w.samples,
                    w.suspect,
                    w.dead,
                    w.failed_calls,
                    w.suspect_fraction * 100.0
                );
                for p in &w.pairs {
                    println!(
                        "    {} about {}: {}/{} suspect, {} dead, rtt {}",
                        p.observer,
                        p.subject,
                        p.suspect,
                        p.samples,
                        p.dead,
                        p.last_rtt_ms
                            .map_or_else(|| "-".to_owned(), |r| format!("{r:.0} ms"))
                    );
                }
            }
            if let Some(k) = &r.kills {
                println!("\n== detect: a rack killed behind {} ==", k.profile);
                for (i, run) in k.runs.iter().enumerate() {
                    let on: Vec<String> = run
                        .dead_on
                        .iter()
                        .map(|(rack, s)| format!("{rack} {s:.2} s"))
                        .collect();
                    println!(
                        "kill {} of {}: dead on both after {} ({}){}",
                        i + 1,
                        run.victim,
                        run.both_s
                            .map_or_else(|| "never".to_owned(), |s| format!("{s:.2} s")),
                        on.join(", "),
                        if run.false_dead {
                            "; a survivor was reported dead"
                        } else {
                            ""
                        }
                    );
                }
                let f = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |x| format!("{x:.2} s"));
                println!(
                    "median {}, max {}, undetected {}",
                    f(k.median_s),
                    f(k.max_s),
                    k.undetected
                );
            }
            r.checks.clone()
        });
    }

    fn failover(&mut self, args: &FailoverArgs) {
        self.record("failover", failover::run(args), |r| {
            println!(
                "\n== failover: kill-rack over {} (times in s from the SIGKILL) ==",
                r.profile
            );
            print!("{}", failover::runs_table(r));
            let f = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |x| format!("{x:.1} s"));
            println!(
                "median {}, max {}, dual-active {} ({:.0} s in all)",
                f(r.median_s),
                f(r.max_s),
                r.dual_active,
                r.seconds
            );
            for o in &r.overlaps {
                println!("DUAL-ACTIVE: {o}");
            }
            r.checks.clone()
        });
    }

    fn goodput(&mut self, args: &GoodputArgs) {
        let result = goodput::run(args.clone()).map(|rows| GoodputJson {
            size_mib: args.mib,
            checks: goodput_checks(&rows),
            rows: rows
                .iter()
                .map(|r| GoodputRowJson {
                    profile: r.profile.clone(),
                    plane: r.variant.to_string(),
                    seconds: r.seconds,
                    goodput_fraction: r.fraction(),
                    goodput_fraction_at_most: r.fraction_at_most(),
                    suspect: r.suspect,
                    samples: r.samples,
                    dead: r.dead,
                    elections: r.elections,
                })
                .collect(),
            table: goodput_table(&rows),
        });
        self.record("goodput", result, |r| {
            println!(
                "\n== goodput: {} MiB replicated, fraction of rate x (1 - loss) ==",
                r.size_mib
            );
            print!("{}", r.table);
            r.checks.clone()
        });
    }
}

/// The goodput report as JSON (the rows are `bench::goodput`'s, which that
/// module does not serialise itself).
#[derive(serde::Serialize)]
struct GoodputJson {
    size_mib: u64,
    rows: Vec<GoodputRowJson>,
    checks: Vec<Check>,
    #[serde(skip)]
    table: String,
}

#[derive(serde::Serialize)]
struct GoodputRowJson {
    profile: String,
    plane: String,
    /// None: not done within the timeout.
    seconds: Option<f64>,
    goodput_fraction: Option<f64>,
    /// The fraction, or the most it can have been when it timed out.
    goodput_fraction_at_most: f64,
    /// SWIM peer states sampled during the push, and how many suspect/dead.
    samples: usize,
    suspect: usize,
    dead: usize,
    /// Raft elections seen during the push.
    elections: u64,
}
