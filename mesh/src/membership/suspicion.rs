//! Lifeguard's dynamic suspicion timeout.
//!
//! A fixed suspicion timeout trades false deaths (too short for a suspect
//! behind a slow link to hear of its suspicion and refute) against slow
//! detection (too long for a rack that is really gone). Lifeguard starts
//! each suspicion long and shortens it as other racks independently suspect
//! the same member: a dead rack is suspected by everyone within a few probe
//! rounds, a rack falsely suspected by one prober with a bad link is not.
//! With `k` confirmations expected and `c` received, the timeout is
//! `max - (max - min) * log(c + 1) / log(k + 1)`, never below `min`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// The longest suspicion, as a multiple of the configured
/// `suspect_timeout` (the shortest): 2, so that with the default 4 s a
/// suspect gets up to 8 s to refute over a bad link, while a killed rack,
/// which its other peers soon confirm, is still dead within 10 s.
pub const SUSPICION_MAX_MULT: u32 = 2;

/// Independent confirmations a suspicion waits for before running at its
/// shortest. Lifeguard's default (`SuspicionMult - 2` in memberlist) is 2;
/// we use 3, still reached within a few rounds in a fleet of a few dozen
/// racks. A fleet too small to supply them (fewer than 5 racks) runs every
/// suspicion at its shortest, as memberlist does: waiting for every other
/// rack to confirm, each probing the suspect only every few rounds, would
/// push a dead rack's detection past 10 s. Also bounds the confirmers
/// remembered per suspicion.
pub const SUSPICION_CONFIRMATIONS: u32 = 3;

/// One suspicion we hold, as seen from here.
#[derive(Debug, Clone)]
pub struct Suspicion {
    /// When we started suspecting.
    pub started: Instant,
    /// Who first accused it (not a confirmation), if known.
    pub accuser: Option<PeerId>,
    /// Distinct other racks that suspected it too, at most `expected`.
    confirmers: BTreeSet<PeerId>,
    /// Confirmations that bring the timeout down to `min`.
    expected: u32,
    /// Shortest and longest timeout.
    min: Duration,
    max: Duration,
}

impl Suspicion {
    /// A suspicion started `now` by `accuser`, in a fleet of `fleet_size`
    /// racks (ourselves included) that we believe alive or suspect.
    pub fn new(now: Instant, accuser: Option<PeerId>, fleet_size: usize, min: Duration) -> Self {
        // Besides the accuser and the suspect, fleet_size - 2 racks can
        // confirm; too few of them, and none is waited for.
        let others = u32::try_from(fleet_size.saturating_sub(2)).unwrap_or(u32::MAX);
        let expected = if others >= SUSPICION_CONFIRMATIONS {
            SUSPICION_CONFIRMATIONS
        } else {
            0
        };
        Self {
            started: now,
            accuser,
            confirmers: BTreeSet::new(),
            expected,
            min,
            max: min.saturating_mul(SUSPICION_MAX_MULT).min(super::MAX_TIMER),
        }
    }

    /// Counts `who` as a confirmation unless it is the accuser or already
    /// counted; true if it was new.
    pub fn confirm(&mut self, who: PeerId) -> bool {
        if Some(who) == self.accuser
            || self.confirmers.len() as u32 >= self.expected
            || self.confirmers.contains(&who)
        {
            return false;
        }
        self.confirmers.insert(who)
    }

    /// Confirmations counted.
    pub fn confirmations(&self) -> u32 {
        self.confirmers.len() as u32
    }

    /// The timeout for the confirmations so far.
    pub fn timeout(&self) -> Duration {
        timeout(self.min, self.max, self.expected, self.confirmations())
    }

    /// When the suspect is declared dead.
    pub fn deadline(&self) -> Instant {
        self.started + self.timeout()
    }
}

/// `max - (max - min) * log(c + 1) / log(k + 1)`, within `[min, max]`;
/// `min` when no confirmation is expected (`k == 0`).
pub fn timeout(min: Duration, max: Duration, expected: u32, confirmations: u32) -> Duration {
    let max = max.max(min);
    if expected == 0 {
        return min;
    }
    let frac = (f64::from(confirmations) + 1.0).ln() / (f64::from(expected) + 1.0).ln();
    let frac = frac.clamp(0.0, 1.0);
    let span = (max - min).as_secs_f64();
    let t = max.as_secs_f64() - span * frac;
    Duration::from_secs_f64(t).clamp(min, max)
}
