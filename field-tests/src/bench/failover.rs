//! The kill-rack drill over emulated links (`linkbench failover`).
//!
//! Runs [`crate::drill::kill_rack`] with every pair of racks on one profile
//! (default `radio-poor`) and turns its report into figures and targets.
//! A run's *failover time* is from the SIGKILL to the appliance healthy on
//! its new owner, from that owner's `failover` event (detected, decided,
//! started, healthy: each on the machine's one clock, to the millisecond);
//! for a run whose event was not found, the first status poll that showed
//! it running on a survivor stands in (`failover_from = "status"`).
//! Targets: median at most [`TARGET_MEDIAN`], and no dual-active: no two
//! copies of the recorder ever wrote at once, from the history checker
//! ([`crate::history`]) on the recorders' shared witness log.

use serde::Serialize;

use super::{median, secs, Check};
use crate::drill::{self, KillRack, KillRackReport, TARGET_MEDIAN};

/// What to run.
#[derive(Clone, Debug)]
pub struct FailoverArgs {
    /// Link profile between every pair of racks.
    pub profile: String,
    /// How many kills.
    pub runs: usize,
    /// Keep the fleet dir (configs, logs, witness).
    pub keep: bool,
}

/// One kill, times in seconds from the SIGKILL.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverRun {
    /// The killed owner and the recorder's epoch there.
    pub owner: String,
    pub epoch: u64,
    /// Where it ran next.
    pub new_owner: String,
    pub new_epoch: u64,
    /// Status polls: owner suspect, dead, appliance reassigned, running.
    pub suspect_s: Option<f64>,
    pub dead_s: Option<f64>,
    pub reassigned_s: Option<f64>,
    pub running_s: f64,
    /// The new owner's `failover` event.
    pub detected_s: Option<f64>,
    pub decided_s: Option<f64>,
    pub started_s: Option<f64>,
    pub healthy_s: Option<f64>,
    /// The run's failover time (see the module doc).
    pub failover_s: f64,
    /// `event` or `status`.
    pub failover_from: String,
}

/// Everything `linkbench failover` measured, with its targets.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverReport {
    pub profile: String,
    pub runs: Vec<FailoverRun>,
    pub median_s: Option<f64>,
    pub max_s: Option<f64>,
    /// Intervals in which two copies of the recorder wrote.
    pub dual_active: usize,
    /// Those intervals, for people.
    pub overlaps: Vec<String>,
    /// Wall time of the drill.
    pub seconds: f64,
    pub checks: Vec<Check>,
}

/// Runs the drill over `args.profile`.
///
/// # Errors
/// As [`drill::kill_rack`]: a field that cannot be set up, a wait that
/// times out, a broken image on the new owner.
pub fn run(args: &FailoverArgs) -> anyhow::Result<FailoverReport> {
    let report = drill::kill_rack(&KillRack {
        runs: args.runs,
        keep: args.keep,
        profile: Some(args.profile.clone()),
    })?;
    Ok(summarise(&args.profile, &report))
}

/// Figures and targets from a drill's report.
#[must_use]
pub fn summarise(profile: &str, report: &KillRackReport) -> FailoverReport {
    let runs: Vec<FailoverRun> = report
        .runs
        .iter()
        .map(|r| {
            let ev = r.event.unwrap_or([None; 4]);
            let (failover_s, failover_from) = match ev[3] {
                Some(healthy) => (healthy, "event"),
                None => (secs(r.running), "status"),
            };
            FailoverRun {
                owner: r.owner.clone(),
                epoch: r.epoch,
                new_owner: r.new_owner.clone(),
                new_epoch: r.new_epoch,
                suspect_s: r.suspect.map(secs),
                dead_s: r.dead.map(secs),
                reassigned_s: r.reassigned.map(secs),
                running_s: secs(r.running),
                detected_s: ev[0],
                decided_s: ev[1],
                started_s: ev[2],
                healthy_s: ev[3],
                failover_s,
                failover_from: failover_from.to_owned(),
            }
        })
        .collect();
    let times: Vec<f64> = runs.iter().map(|r| r.failover_s).collect();
    let median_s = median(&times);
    let dual_active = report.overlaps.len();
    let checks = vec![
        Check::at_most(
            "failover",
            format!("{profile}: kill -> healthy, median of {}", runs.len()),
            median_s,
            secs(TARGET_MEDIAN),
            "s",
        ),
        Check::at_most(
            "failover",
            format!("{profile}: dual-active intervals"),
            Some(dual_active as f64),
            0.0,
            "",
        ),
    ];
    FailoverReport {
        profile: profile.to_owned(),
        median_s,
        max_s: times.iter().copied().reduce(f64::max),
        dual_active,
        overlaps: report.overlaps.iter().map(ToString::to_string).collect(),
        seconds: secs(report.took),
        runs,
        checks,
    }
}

/// One line per run: the status polls and the event's times.
#[must_use]
pub fn runs_table(report: &FailoverReport) -> String {
    use std::fmt::Write as _;
    let o = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"));
    let mut out = format!(
        "{:>3}  {:<8} {:<8} {:>7} {:>6} {:>10} {:>7} | {:>8} {:>7} {:>7} {:>7} | {:>8}\n",
        "run",
        "owner",
        "new",
        "suspect",
        "dead",
        "reassigned",
        "running",
        "detected",
        "decided",
        "started",
        "healthy",
        "failover"
    );
    for (i, r) in report.runs.iter().enumerate() {
        let _ =
            writeln!(
            out,
            "{:>3}  {:<8} {:<8} {:>7} {:>6} {:>10} {:>7.1} | {:>8} {:>7} {:>7} {:>7} | {:>6.1} s{}",
            i + 1,
            format!("{}@{}", r.owner, r.epoch),
            format!("{}@{}", r.new_owner, r.new_epoch),
            o(r.suspect_s),
            o(r.dead_s),
            o(r.reassigned_s),
            r.running_s,
            o(r.detected_s),
            o(r.decided_s),
            o(r.started_s),
            o(r.healthy_s),
            r.failover_s,
            if r.failover_from == "status" { " (status)" } else { "" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::drill::Run;
    use crate::history::{Copy, Overlap};

    fn run(owner: &str, running_s: u64, healthy: Option<f64>) -> Run {
        Run {
            owner: owner.to_owned(),
            epoch: 3,
            new_owner: "b".to_owned(),
            new_epoch: 4,
            suspect: Some(Duration::from_secs(2)),
            dead: Some(Duration::from_secs(5)),
            reassigned: Some(Duration::from_secs(9)),
            running: Duration::from_secs(running_s),
            event: Some([Some(4.5), Some(8.9), Some(9.5), healthy]),
            overlaps_so_far: 0,
        }
    }

    fn copy(rack: &str, epoch: u64, first_ms: u64, last_ms: u64) -> Copy {
        Copy {
            rack: rack.to_owned(),
            epoch,
            first_ms,
            last_ms,
            records: 2,
        }
    }

    #[test]
    fn failover_time_is_the_events_healthy_else_the_status_poll() {
        let report = KillRackReport {
            profile: Some("radio-poor".into()),
            runs: vec![
                run("a", 12, Some(11.2)),
                run("c", 30, None),
                run("a", 14, Some(13.0)),
            ],
            overlaps: Vec::new(),
            took: Duration::from_secs(200),
        };
        let s = summarise("radio-poor", &report);
        assert_eq!(s.runs[0].failover_s, 11.2);
        assert_eq!(s.runs[1].failover_s, 30.0);
        assert_eq!(s.runs[1].failover_from, "status");
        assert_eq!(s.median_s, Some(13.0));
        assert_eq!(s.max_s, Some(30.0));
        assert!(s.checks.iter().all(|c| c.pass), "{:?}", s.checks);
        let t = runs_table(&s);
        assert_eq!(t.lines().count(), 4, "{t}");
        assert!(t.contains("(status)"), "{t}");
    }

    #[test]
    fn dual_active_fails_whatever_the_times() {
        let overlap = Overlap {
            appliance: "recorder".into(),
            earlier: copy("a", 3, 100, 900),
            later: copy("b", 4, 800, 1000),
            from_ms: 800,
            to_ms: 900,
        };
        let report = KillRackReport {
            profile: Some("radio-poor".into()),
            runs: vec![run("a", 12, Some(11.0))],
            overlaps: vec![overlap],
            took: Duration::from_secs(60),
        };
        let s = summarise("radio-poor", &report);
        assert_eq!(s.dual_active, 1);
        assert!(s.checks[0].pass);
        assert!(!s.checks[1].pass);
        assert!(s.overlaps[0].contains("100 ms"), "{:?}", s.overlaps);
    }
}
