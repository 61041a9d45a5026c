//! The link benchmarks run by `linkbench`: real
//! agents in namespaces, every pair of racks joined by the link emulator
//! ([`crate::linkem`]), driven only through the `fieldrack` CLI and its
//! status JSON, as the drills are.
//!
//! - [`detect`]: failure detection: false `dead` and the share of
//!   `suspect` peer states while nothing fails, per profile; the time
//!   until a killed rack is `dead` on both others;
//! - [`failover`]: the kill-rack drill ([`crate::drill`]) over emulated
//!   links: failover time per run and dual-active;
//! - [`goodput`]: replication goodput per profile, the quinn bulk plane
//!   against the libp2p-quic default;
//! - this file: [`Check`] (one target: measured, limit, ratio, verdict),
//!   the table that prints them, [`goodput_checks`] (goodput's targets),
//!   and the helpers the benches share ([`link_every_pair`],
//!   [`sample_statuses`]).
//!
//! Figures come from here, never from timed assertions in tests: the one
//! test of this module (`tests/linkbench.rs`) checks that a quick run's
//! report is well-formed and sane, not that it meets a target.

pub mod detect;
pub mod failover;
pub mod goodput;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use serde::Serialize;

use crate::linkem::{EmulatedLink, LinkProfile, Profile};
use crate::{Field, Fleet, Status};

/// Seeds of the emulated links between the racks of a benchmark, one per
/// pair (in [`link_every_pair`]'s order), so a rerun draws the same losses
/// for the same traffic.
pub const LINK_SEEDS: [u64; 3] = [101, 102, 103];

/// Which way a target bounds its figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// The figure must not exceed the limit.
    AtMost,
    /// The figure must reach the limit.
    AtLeast,
}

/// One target of issue 12 against what a run measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    /// `detect`, `failover` or `goodput`.
    pub bench: String,
    /// What is measured, e.g. `satellite: peer states suspect`.
    pub what: String,
    /// The figure; `None` when the run could not measure it (which fails).
    pub measured: Option<f64>,
    /// Unit of `measured` and `limit`, for people (`s`, `%`, `x`, ``).
    pub unit: String,
    pub bound: Bound,
    pub limit: f64,
    /// `measured / limit` (how far inside or outside the target), when the
    /// limit is not zero.
    pub ratio: Option<f64>,
    pub pass: bool,
}

impl Check {
    /// A figure that must stay at or below `limit`.
    #[must_use]
    pub fn at_most(
        bench: &str,
        what: String,
        measured: Option<f64>,
        limit: f64,
        unit: &str,
    ) -> Check {
        Check::new(bench, what, measured, Bound::AtMost, limit, unit)
    }

    /// A figure that must reach `limit`.
    #[must_use]
    pub fn at_least(
        bench: &str,
        what: String,
        measured: Option<f64>,
        limit: f64,
        unit: &str,
    ) -> Check {
        Check::new(bench, what, measured, Bound::AtLeast, limit, unit)
    }

    fn new(
        bench: &str,
        what: String,
        measured: Option<f64>,
        bound: Bound,
        limit: f64,
        unit: &str,
    ) -> Check {
        let pass = measured.is_some_and(|m| match bound {
            Bound::AtMost => m <= limit,
            Bound::AtLeast => m >= limit,
        });
        let ratio = measured.filter(|_| limit != 0.0).map(|m| m / limit);
        Check {
            bench: bench.to_owned(),
            what,
            measured,
            unit: unit.to_owned(),
            bound,
            limit,
            ratio,
            pass,
        }
    }
}

/// Formats a figure with its unit: `3.2 s`, `1.25 %`, `0`.
fn figure(x: f64, unit: &str) -> String {
    let digits = if x.fract() == 0.0 { 0 } else { 2 };
    if unit.is_empty() {
        format!("{x:.digits$}")
    } else {
        format!("{x:.digits$} {unit}")
    }
}

/// The table of checks: one line each, with the ratio to the limit and
/// PASS/FAIL.
#[must_use]
pub fn table(checks: &[Check]) -> String {
    let width = checks
        .iter()
        .map(|c| c.what.len())
        .max()
        .unwrap_or(0)
        .max(5);
    let mut out = format!(
        "{:<9} {:<width$}  {:>11}  {:>12}  {:>6}  verdict\n",
        "bench", "check", "measured", "target", "ratio"
    );
    for c in checks {
        let measured = c
            .measured
            .map_or_else(|| "-".to_owned(), |m| figure(m, &c.unit));
        let op = match c.bound {
            Bound::AtMost => "<=",
            Bound::AtLeast => ">=",
        };
        let target = format!("{op} {}", figure(c.limit, &c.unit));
        let ratio = c
            .ratio
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"));
        let verdict = if c.pass { "PASS" } else { "FAIL" };
        let _ = writeln!(
            out,
            "{:<9} {:<width$}  {measured:>11}  {target:>12}  {ratio:>6}  {verdict}",
            c.bench, c.what
        );
    }
    out
}

/// Parses a profile argument, naming it in the error.
///
/// # Errors
/// An unknown profile, key or value.
pub fn profile(spec: &str) -> Result<Profile> {
    spec.parse()
        .map_err(|e| anyhow!("link profile {spec:?}: {e}"))
}

/// Joins every pair of `field`'s racks by an emulated link on `profile`
/// (both directions alike). The links must be dropped before the field;
/// agents should stop before the links go (else they see a cut).
///
/// # Errors
/// If a TUN device or route cannot be set up.
pub fn link_every_pair<'f>(field: &'f Field, profile: &Profile) -> Result<Vec<EmulatedLink<'f>>> {
    let racks: Vec<&str> = field.racks().collect();
    let mut links = Vec::new();
    let mut seeds = LINK_SEEDS.iter().copied().chain(1000..);
    for (i, a) in racks.iter().enumerate() {
        for b in &racks[i + 1..] {
            let seed = seeds.next().expect("an endless iterator");
            links.push(field.emulated_link(a, b, LinkProfile::symmetric(profile.clone()), seed)?);
        }
    }
    Ok(links)
}

/// `fieldrack status --json` of every rack in `racks` at once (one thread
/// each, so one sample of a 3-rack fleet takes one status call's time, not
/// three), each with when it completed.
#[must_use]
pub fn sample_statuses(
    fleet: &Fleet,
    field: &Field,
    racks: &[&str],
) -> Vec<(Result<Status>, Instant)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = racks
            .iter()
            .map(|rack| {
                s.spawn(move || {
                    let status = fleet.status(field, rack);
                    (status, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (Err(anyhow!("status thread panicked")), Instant::now()))
            })
            .collect()
    })
}

/// Median of `v` (sorted here), `None` if empty; the lower middle of an
/// even count (nearest rank), as the drill reports it.
#[must_use]
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = v.len().div_ceil(2).max(1);
    v.get(rank - 1).copied()
}

/// Seconds, for reports.
#[must_use]
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Goodput at least this fraction of `rate × (1 − loss)` on `radio-good`
/// and `radio-poor`.
pub const GOODPUT_RADIO: f64 = 0.8;

/// Goodput at least this fraction on `satellite`.
pub const GOODPUT_SATELLITE: f64 = 0.6;

/// On `lossy`, the bulk plane at least this many times the libp2p default.
pub const GOODPUT_LOSSY_VS_BASELINE: f64 = 3.0;

/// Goodput's targets, one per bulk-plane row of a profile that has one;
/// the ratio column of a `lossy` check is the multiple of the baseline
/// (libp2p-quic's defaults; a baseline not done within its timeout counts
/// at the most it can have carried, so the multiple is a lower bound).
#[must_use]
pub fn goodput_checks(rows: &[goodput::GoodputRow]) -> Vec<Check> {
    let mut checks = Vec::new();
    for row in rows.iter().filter(|r| !r.is_baseline()) {
        let profile_name = row.profile.split(',').next().unwrap_or_default();
        let what = format!("{} {}: goodput", row.profile, row.variant);
        match profile_name {
            "radio-good" | "radio-poor" => checks.push(Check::at_least(
                "goodput",
                format!("{what} / rate(1-loss)"),
                row.fraction(),
                GOODPUT_RADIO,
                "",
            )),
            "satellite" => checks.push(Check::at_least(
                "goodput",
                format!("{what} / rate(1-loss)"),
                row.fraction(),
                GOODPUT_SATELLITE,
                "",
            )),
            "lossy" => checks.push(Check::at_least(
                "goodput",
                format!("{what} / libp2p's"),
                vs_baseline(rows, row),
                GOODPUT_LOSSY_VS_BASELINE,
                "x",
            )),
            _ => {}
        }
    }
    checks
}

/// A row's goodput as a multiple of the baseline's on the same profile.
fn vs_baseline(rows: &[goodput::GoodputRow], row: &goodput::GoodputRow) -> Option<f64> {
    let baseline = rows
        .iter()
        .find(|b| b.profile == row.profile && b.is_baseline())?
        .fraction_at_most();
    Some(row.fraction()? / baseline).filter(|_| baseline > 0.0)
}

/// The goodput rows as a table: seconds, fraction of `rate × (1 − loss)`
/// and the multiple of the libp2p baseline of the same profile
/// ("timeout" and "≥" where a transfer did not finish).
#[must_use]
pub fn goodput_table(rows: &[goodput::GoodputRow]) -> String {
    let mut out = format!(
        "{:<24} {:<16} {:>9} {:>9} {:>12}\n",
        "profile", "plane", "seconds", "fraction", "vs libp2p"
    );
    for row in rows {
        let vs = vs_baseline(rows, row).map_or_else(
            || "-".to_owned(),
            |m| {
                let base_done = rows
                    .iter()
                    .any(|b| b.profile == row.profile && b.is_baseline() && b.seconds.is_some());
                format!("{}{m:.2}x", if base_done { "" } else { ">=" })
            },
        );
        let secs = row
            .seconds
            .map_or_else(|| "timeout".to_owned(), |s| format!("{s:.1}"));
        let frac = row.fraction().map_or_else(
            || format!("<{:.3}", row.fraction_at_most()),
            |f| format!("{f:.3}"),
        );
        let _ = writeln!(
            out,
            "{:<24} {:<16} {secs:>9} {frac:>9} {vs:>12}",
            row.profile,
            row.variant.to_string()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::goodput::GoodputRow;
    use super::*;

    /// A row of 10 s whose goodput is `fraction` of a 1 Mbit/s link
    /// (`None`: not done within 10 s).
    fn row_of(profile: &str, plane: &str, fraction: Option<f64>) -> GoodputRow {
        let variant = match plane.strip_prefix("bulk-") {
            Some(cc) => goodput::Variant::Bulk(cc.to_owned()),
            None => goodput::Variant::Libp2p,
        };
        let capacity_bps = 1e6;
        GoodputRow {
            profile: profile.to_owned(),
            variant,
            bytes: (fraction.unwrap_or(1.0) * capacity_bps * 10.0 / 8.0) as u64,
            seconds: fraction.map(|_| 10.0),
            capacity_bps,
            samples: 0,
            suspect: 0,
            dead: 0,
            max_rtt_ms: None,
            elections: 0,
            link_bytes_per_s: 0,
            timeout_s: 10.0,
        }
    }

    fn row(profile: &str, plane: &str, fraction: f64) -> GoodputRow {
        row_of(profile, plane, Some(fraction))
    }

    #[test]
    fn checks_bound_both_ways_and_fail_without_a_figure() {
        let c = Check::at_most("detect", "x".into(), Some(2.0), 10.0, "s");
        assert!(c.pass);
        assert_eq!(c.ratio, Some(0.2));
        assert!(!Check::at_most("detect", "x".into(), Some(10.5), 10.0, "s").pass);
        assert!(Check::at_least("goodput", "x".into(), Some(0.8), 0.8, "").pass);
        assert!(!Check::at_least("goodput", "x".into(), Some(0.79), 0.8, "").pass);
        let none = Check::at_most("detect", "x".into(), None, 10.0, "s");
        assert!(!none.pass);
        assert_eq!(none.ratio, None);
        let zero = Check::at_most("detect", "false dead".into(), Some(0.0), 0.0, "");
        assert!(zero.pass);
        assert_eq!(zero.ratio, None);
    }

    #[test]
    fn the_table_has_one_line_per_check_and_a_verdict() {
        let checks = [
            Check::at_most("detect", "lossy: suspect".into(), Some(1.25), 5.0, "%"),
            Check::at_most(
                "detect",
                "radio-poor: killed rack dead".into(),
                None,
                10.0,
                "s",
            ),
        ];
        let t = table(&checks);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            lines[1].contains("1.25 %") && lines[1].contains("<= 5 %"),
            "{t}"
        );
        assert!(
            lines[1].ends_with("PASS") && lines[1].contains("0.25"),
            "{t}"
        );
        assert!(
            lines[2].ends_with("FAIL") && lines[2].contains(" - "),
            "{t}"
        );
    }

    #[test]
    fn median_takes_the_lower_middle_of_an_even_count() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0]), Some(1.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.0));
    }

    #[test]
    fn goodput_targets_per_profile_and_the_lossy_multiple() {
        let rows = [
            row("radio-poor", "bulk-bbr", 0.85),
            row("radio-poor", "libp2p", 0.2),
            row("satellite", "bulk-bbr", 0.5),
            row("lossy", "bulk-bbr", 0.6),
            row("lossy", "libp2p", 0.15),
            row("lan", "bulk-bbr", 0.9),
        ];
        let checks = goodput_checks(&rows);
        assert_eq!(checks.len(), 3, "{checks:?}");
        assert!(checks[0].pass && checks[0].limit == GOODPUT_RADIO);
        assert!(!checks[1].pass && checks[1].limit == GOODPUT_SATELLITE);
        assert_eq!(checks[2].measured, Some(4.0));
        assert!(checks[2].pass);
        // No baseline measured on lossy: the multiple is unknown, a FAIL.
        let alone = goodput_checks(&[row("lossy", "bulk-cubic", 0.6)]);
        assert_eq!(alone[0].measured, None);
        assert!(!alone[0].pass);
        let t = goodput_table(&rows);
        assert!(t.contains("4.00x") && t.contains("4.25x"), "{t}");
    }

    #[test]
    fn a_baseline_that_timed_out_bounds_the_multiple_from_below() {
        // The baseline carried at most its bytes in its 10 s timeout.
        let mut base = row_of("lossy", "libp2p", None);
        base.bytes /= 10;
        let rows = [row("lossy", "bulk-bbr", 0.8), base];
        assert!((rows[1].fraction_at_most() - 0.1).abs() < 1e-9);
        let checks = goodput_checks(&rows);
        assert!(checks[0].pass, "{checks:?}");
        assert!((checks[0].measured.unwrap() - 8.0).abs() < 1e-6);
        let t = goodput_table(&rows);
        assert!(t.contains(">=8.00x") && t.contains("timeout"), "{t}");
    }
}
