//! The history checker: from the recorders' shared witness log, every
//! interval in which two copies of one appliance wrote.
//!
//! Each recorder appends one line per record to the witness log, with the
//! wall-clock time it wrote it (all racks of a field test share the
//! machine's clock):
//!
//! ```text
//! <rack> <epoch> <seq> <unix ms> [<appliance>]
//! ```
//!
//! (a line without the appliance belongs to the log's default appliance).
//! A *copy* is one (rack, epoch) of an appliance; its window runs from its
//! first record to its last. Two copies of one appliance overlap when
//! their windows intersect (touching counts: two writes in the same
//! millisecond are two copies at once) — which also catches copies that
//! interleave. Lines cut short by a kill are ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// One copy of an appliance: what it wrote, when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The rack it ran on.
    pub rack: String,
    /// Its epoch.
    pub epoch: u64,
    /// First record (unix ms).
    pub first_ms: u64,
    /// Last record (unix ms).
    pub last_ms: u64,
    /// Records written.
    pub records: u64,
}

/// Two copies of one appliance writing at the same time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    /// The appliance.
    pub appliance: String,
    /// The copy that began first.
    pub earlier: Copy,
    /// The other one.
    pub later: Copy,
    /// The interval both wrote in (unix ms, inclusive).
    pub from_ms: u64,
    /// End of that interval.
    pub to_ms: u64,
}

impl fmt::Display for Overlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: epoch {} on {} and epoch {} on {} both wrote from {} to {} ({} ms)",
            self.appliance,
            self.earlier.epoch,
            self.earlier.rack,
            self.later.epoch,
            self.later.rack,
            self.from_ms,
            self.to_ms,
            self.to_ms - self.from_ms
        )
    }
}

/// Every appliance's copies, in order of their first record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Appliance → its copies.
    pub copies: BTreeMap<String, Vec<Copy>>,
}

impl History {
    /// Read a witness log; lines without an appliance name belong to
    /// `default_appliance`.
    ///
    /// # Errors
    /// If the log cannot be read.
    pub fn read(path: &Path, default_appliance: &str) -> Result<History> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(History::parse(&text, default_appliance))
    }

    /// Parse a witness log's text (see [`History::read`]).
    #[must_use]
    pub fn parse(text: &str, default_appliance: &str) -> History {
        let mut by_copy: BTreeMap<(String, String, u64), Copy> = BTreeMap::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (rack, epoch, ms, app) = match f[..] {
                [rack, epoch, _seq, ms] => (rack, epoch, ms, default_appliance),
                [rack, epoch, _seq, ms, app] => (rack, epoch, ms, app),
                _ => continue, // cut by a kill
            };
            let (Ok(epoch), Ok(ms)) = (epoch.parse::<u64>(), ms.parse::<u64>()) else {
                continue;
            };
            let c = by_copy
                .entry((app.to_owned(), rack.to_owned(), epoch))
                .or_insert_with(|| Copy {
                    rack: rack.to_owned(),
                    epoch,
                    first_ms: ms,
                    last_ms: ms,
                    records: 0,
                });
            c.first_ms = c.first_ms.min(ms);
            c.last_ms = c.last_ms.max(ms);
            c.records += 1;
        }
        let mut copies: BTreeMap<String, Vec<Copy>> = BTreeMap::new();
        for ((app, _, _), c) in by_copy {
            copies.entry(app).or_default().push(c);
        }
        for list in copies.values_mut() {
            list.sort_by_key(|c| (c.first_ms, c.epoch));
        }
        History { copies }
    }

    /// Every interval in which two copies of one appliance wrote.
    #[must_use]
    pub fn overlaps(&self) -> Vec<Overlap> {
        let mut out = Vec::new();
        for (app, list) in &self.copies {
            for (i, a) in list.iter().enumerate() {
                for b in &list[i + 1..] {
                    if a.first_ms <= b.last_ms && b.first_ms <= a.last_ms {
                        out.push(Overlap {
                            appliance: app.clone(),
                            earlier: a.clone(),
                            later: b.clone(),
                            from_ms: a.first_ms.max(b.first_ms),
                            to_ms: a.last_ms.min(b.last_ms),
                        });
                    }
                }
            }
        }
        out
    }

    /// The copies of `appliance` (empty if it never wrote).
    #[must_use]
    pub fn of(&self, appliance: &str) -> &[Copy] {
        self.copies.get(appliance).map_or(&[], Vec::as_slice)
    }

    /// Fails listing every overlap, if there is any.
    ///
    /// # Errors
    /// Two copies of one appliance wrote at the same time.
    pub fn check(&self) -> Result<()> {
        let overlaps = self.overlaps();
        if overlaps.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = overlaps.iter().map(ToString::to_string).collect();
        bail!(
            "two copies of one appliance ran at once, {} time(s):\n  {}",
            list.len(),
            list.join("\n  ")
        )
    }
}

/// Read the witness log at `path` and fail on any overlap; the history,
/// for further checks.
///
/// # Errors
/// An unreadable log, or two copies of one appliance writing at once.
pub fn check_history(path: &Path, default_appliance: &str) -> Result<History> {
    let h = History::read(path, default_appliance)?;
    h.check()?;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_failover_has_no_overlap() {
        // Two appliances; x moves from a to b after a gap, y stays on a.
        let log = "a 1 0 100 x\na 1 0 105 y\na 1 1 200 x\na 1 1 400 y\nb 2 2 260 x\nb 2 3 300 x\n\
                   a 1 2";
        let h = History::parse(log, "x");
        assert!(h.overlaps().is_empty(), "{:?}", h.overlaps());
        h.check().unwrap();
        assert_eq!(h.of("x").len(), 2);
        assert_eq!(h.of("x")[0].last_ms, 200);
        assert_eq!(h.of("x")[1].rack, "b");
        assert_eq!(h.of("y")[0].records, 2);
    }

    #[test]
    fn overlapping_and_interleaved_copies_are_reported_with_their_interval() {
        // Old-format lines (no appliance: the default one) mixed with new.
        let log = "a 1 0 100\na 1 1 200\nb 2 2 150\nb 2 3 400\n\
                   a 3 0 1000 z\nb 4 0 1010 z\na 3 1 1020 z\nb 4 1 1030 z\n";
        let h = History::parse(log, "x");
        let o = h.overlaps();
        assert_eq!(o.len(), 2, "{o:?}");
        assert_eq!(
            (o[0].appliance.as_str(), o[0].from_ms, o[0].to_ms),
            ("x", 150, 200)
        );
        assert_eq!(
            (o[0].earlier.rack.as_str(), o[0].later.rack.as_str()),
            ("a", "b")
        );
        assert_eq!(
            (o[1].appliance.as_str(), o[1].from_ms, o[1].to_ms),
            ("z", 1010, 1020)
        );
        let e = h.check().unwrap_err().to_string();
        assert!(e.contains("2 time(s)") && e.contains("50 ms"), "{e}");
    }

    #[test]
    fn one_epoch_on_two_racks_is_two_copies() {
        let h = History::parse("a 1 0 100\nb 1 1 100\n", "x");
        assert_eq!(h.overlaps().len(), 1);
    }
}
