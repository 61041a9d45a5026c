//! What waits to be replicated: per owned volume, the bytes each recent
//! generation stored anew (an upper bound of what it adds to a push: a
//! chunk rewritten in two generations counts twice, and deltas send less),
//! and per replica link, the measured push rate. Pure bookkeeping, fed by
//! the snapshot and replication loops, read by pacing and the status.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// Generations remembered per volume. At the shortest interval (1 s) that
/// is over four minutes of history; a replica further behind is counted as
/// waiting for all of it (then an underestimate, shown as such by its age).
pub const HISTORY: usize = 256;

/// Weight of the newest push in the smoothed rate: a few pushes move it,
/// one slow push does not halve it.
const RATE_WEIGHT: f64 = 0.3;

/// Pushes smaller than this say more about round trips than about the
/// link's rate and are not measured.
pub const RATE_MIN_BYTES: u64 = 256 * 1024;

/// One generation's cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Produced {
    generation: u64,
    bytes: u64,
}

/// The bookkeeping (behind one mutex in the service).
#[derive(Debug, Default)]
pub struct Backlogs {
    /// Per volume, its last [`HISTORY`] generations, oldest first.
    produced: HashMap<String, VecDeque<Produced>>,
    /// Per replica rack, the smoothed push rate in bytes/s.
    rates: HashMap<String, f64>,
}

impl Backlogs {
    /// Generation `generation` of `volume` stored `bytes` anew.
    pub fn produced(&mut self, volume: &str, generation: u64, bytes: u64) {
        let h = self.produced.entry(volume.to_owned()).or_default();
        h.retain(|p| p.generation < generation);
        h.push_back(Produced { generation, bytes });
        while h.len() > HISTORY {
            h.pop_front();
        }
    }

    /// `volume` is no longer owned here.
    pub fn forget(&mut self, volume: &str) {
        self.produced.remove(volume);
    }

    /// Bytes of `volume`'s generations newer than `held` (what a replica
    /// holding `held` still needs, at most).
    #[must_use]
    pub fn waiting(&self, volume: &str, held: Option<u64>) -> u64 {
        let held = held.unwrap_or(0);
        self.produced.get(volume).map_or(0, |h| {
            h.iter()
                .filter(|p| p.generation > held)
                .map(|p| p.bytes)
                .sum()
        })
    }

    /// A push of `bytes` to `rack` took `elapsed`.
    pub fn pushed(&mut self, rack: &str, bytes: u64, elapsed: Duration) {
        if bytes < RATE_MIN_BYTES || elapsed.is_zero() {
            return;
        }
        let r = bytes as f64 / elapsed.as_secs_f64();
        self.rates
            .entry(rack.to_owned())
            .and_modify(|x| *x = RATE_WEIGHT * r + (1.0 - RATE_WEIGHT) * *x)
            .or_insert(r);
    }

    /// The smoothed push rate to `rack`, bytes/s.
    #[must_use]
    pub fn rate(&self, rack: &str) -> Option<f64> {
        self.rates.get(rack).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_counts_the_generations_a_replica_lacks() {
        let mut b = Backlogs::default();
        assert_eq!(b.waiting("v", None), 0);
        for g in 1..=4 {
            b.produced("v", g, g * 100);
        }
        assert_eq!(b.waiting("v", None), 1000);
        assert_eq!(b.waiting("v", Some(2)), 700);
        assert_eq!(b.waiting("v", Some(4)), 0);
        assert_eq!(b.waiting("w", Some(1)), 0);
        // A generation written again (after a restart) replaces the later ones.
        b.produced("v", 3, 5);
        assert_eq!(b.waiting("v", Some(2)), 5);
        b.forget("v");
        assert_eq!(b.waiting("v", None), 0);
    }

    #[test]
    fn history_is_bounded() {
        let mut b = Backlogs::default();
        for g in 1..=(HISTORY as u64 + 10) {
            b.produced("v", g, 1);
        }
        assert_eq!(b.waiting("v", None), HISTORY as u64);
    }

    #[test]
    fn rates_are_smoothed_and_small_pushes_ignored() {
        let mut b = Backlogs::default();
        b.pushed("r", 1000, Duration::from_secs(1));
        assert_eq!(b.rate("r"), None);
        b.pushed("r", 10_000_000, Duration::from_secs(1));
        assert_eq!(b.rate("r"), Some(10e6));
        b.pushed("r", 1_000_000, Duration::from_secs(1));
        let r = b.rate("r").unwrap();
        assert!((r - 7.3e6).abs() < 1.0, "{r}");
    }
}
