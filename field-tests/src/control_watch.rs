//! Watching the control plane from outside, through `fieldrack status`:
//! leader changes and terms, lease renewal gaps and appliance moves, the
//! figures that say whether Raft and the leases hold over a slow or fading
//! link.
//!
//! A renewal gap is read from the field view of the rack that leads
//! (`field.racks[].renew_age_ms`: how long ago a renewal of that rack's
//! lease was applied there). Each poll samples it; when it drops, the
//! sample before the drop is one gap (a lower bound: the poll interval,
//! about 0.3 s with three status calls, is the resolution).

use std::collections::BTreeMap;

use crate::agent::Status;

/// What one watch saw.
#[derive(Debug, Default, Clone)]
pub struct ControlWatch {
    /// Polls that produced every rack's status.
    pub samples: usize,
    /// Leader (by rack name) each rack last reported.
    leader_seen: BTreeMap<String, Option<String>>,
    /// Times a rack's reported leader changed to another rack (a rack
    /// losing its leader and finding the same one again is no change).
    pub leader_changes: usize,
    /// Samples in which some rack reported no leader.
    pub leaderless_samples: usize,
    /// Lowest and highest term reported by any rack.
    pub terms: Option<(u64, u64)>,
    /// Per appliance: (owner, epoch) as first seen running, and every
    /// later (owner, epoch) it moved to.
    pub placements: BTreeMap<String, Vec<(Option<String>, u64)>>,
    /// Last renewal age per rack, as the leader saw it (ms).
    last_age: BTreeMap<String, u64>,
    /// Renewal gaps per rack (ms), see the module doc.
    pub gaps: BTreeMap<String, Vec<u64>>,
    /// Highest renewal age per rack seen so far (ms), gap ended or not.
    pub max_age: BTreeMap<String, u64>,
}

impl ControlWatch {
    /// Takes one poll: every rack's status.
    pub fn sample(&mut self, all: &[Status]) {
        self.samples += 1;
        for s in all {
            let Some(c) = &s.control else { continue };
            self.terms = Some(match self.terms {
                None => (c.term, c.term),
                Some((lo, hi)) => (lo.min(c.term), hi.max(c.term)),
            });
            if c.leader.is_none() {
                self.leaderless_samples += 1;
                continue;
            }
            let before = self.leader_seen.insert(s.rack.clone(), c.leader.clone());
            if let Some(Some(prev)) = before {
                if Some(&prev) != c.leader.as_ref() {
                    self.leader_changes += 1;
                }
            }
        }
        for s in all {
            for a in &s.appliances {
                if a.state != "running" {
                    continue;
                }
                let seen = self.placements.entry(a.name.clone()).or_default();
                let now = (a.owner.clone(), a.epoch);
                if seen.last() != Some(&now) && seen.iter().all(|(_, e)| *e < a.epoch) {
                    seen.push(now);
                }
            }
        }
        let leader = all.iter().find(|s| {
            s.control
                .as_ref()
                .is_some_and(|c| c.role == "leader" && c.leader.as_deref() == Some(&s.rack))
        });
        if let Some(view) = leader.and_then(|l| l.field.as_ref()) {
            for r in &view.racks {
                let Some(age) = r.renew_age_ms else { continue };
                if let Some(prev) = self.last_age.insert(r.name.clone(), age) {
                    if age < prev {
                        self.gaps.entry(r.name.clone()).or_default().push(prev);
                    }
                }
                let max = self.max_age.entry(r.name.clone()).or_default();
                *max = (*max).max(age);
            }
        }
    }

    /// Times an appliance moved after it first ran (epoch bumps seen).
    #[must_use]
    pub fn moves(&self, appliance: &str) -> usize {
        self.placements
            .get(appliance)
            .map_or(0, |p| p.len().saturating_sub(1))
    }

    /// Terms started during the watch.
    #[must_use]
    pub fn term_bumps(&self) -> u64 {
        self.terms.map_or(0, |(lo, hi)| hi - lo)
    }

    /// The `q` quantile (0..=1) of `rack`'s renewal gaps, with the longest
    /// age still open counted too (ms).
    #[must_use]
    pub fn gap_quantile(&self, rack: &str, q: f64) -> Option<u64> {
        let mut gaps = self.gaps.get(rack).cloned().unwrap_or_default();
        if let Some(age) = self.last_age.get(rack) {
            gaps.push(*age);
        }
        if gaps.is_empty() {
            return None;
        }
        gaps.sort_unstable();
        let i = ((gaps.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(gaps[i])
    }

    /// One paragraph of figures, each line prefixed with `label`.
    pub fn print(&self, label: &str) {
        println!(
            "[{label}] control: {} samples, {} leader changes, {} term bumps, {} leaderless samples",
            self.samples,
            self.leader_changes,
            self.term_bumps(),
            self.leaderless_samples
        );
        for (app, p) in &self.placements {
            println!("[{label}]   {app}: placements {p:?}");
        }
        for rack in self.max_age.keys() {
            println!(
                "[{label}]   renewals of {rack}: {} gaps, p50 {:?} ms, p99 {:?} ms, max age {:?} ms",
                self.gaps.get(rack).map_or(0, Vec::len),
                self.gap_quantile(rack, 0.5),
                self.gap_quantile(rack, 0.99),
                self.max_age.get(rack)
            );
        }
    }
}
