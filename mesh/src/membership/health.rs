//! Lifeguard's local health multiplier (LHM).
//!
//! SWIM assumes the prober is healthy: a rack behind a bad link (or starved
//! of CPU) misses acks and accuses everyone else. Lifeguard (Dadgar et al.,
//! 2018) has each rack score its own health from evidence only it has: a
//! probe that got no ack at all, or a suspicion about itself it had to
//! refute, raises the score; a probe answered in time lowers it. Probe
//! timeouts and the probe interval are scaled by `score + 1`, so a rack
//! that is itself the problem waits longer before accusing anyone, and
//! probes less often, while healthy racks keep detecting at full speed.

use std::time::Duration;

/// Highest score (timeouts and interval at most 9 times their base).
/// Lifeguard's evaluation used 8; past it a rack probes so rarely that
/// a healthy link takes minutes to bring it back to full speed.
pub const MAX_LOCAL_HEALTH: u32 = 8;

/// Our own health score, `0..=MAX_LOCAL_HEALTH`; 0 is healthy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalHealth {
    score: u32,
}

impl LocalHealth {
    /// The current score.
    pub fn score(self) -> u32 {
        self.score
    }

    /// Evidence that our side may be the problem (a probe with no ack at
    /// all, a suspicion about us we had to refute).
    pub fn worse(&mut self) {
        self.score = (self.score + 1).min(MAX_LOCAL_HEALTH);
    }

    /// Evidence that we are fine (a probe acked in time).
    pub fn better(&mut self) {
        self.score = self.score.saturating_sub(1);
    }

    /// `d * (score + 1)`, capped at [`super::MAX_TIMER`].
    pub fn scale(self, d: Duration) -> Duration {
        d.saturating_mul(self.score + 1).min(super::MAX_TIMER)
    }
}
