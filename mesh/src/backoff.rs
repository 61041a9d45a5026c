//! Reconnect backoff: exponential with jitter, time injected.

use std::time::{Duration, Instant};

/// Per-target reconnect schedule.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    next_at: Instant,
}

impl Backoff {
    /// A schedule that allows an attempt right away.
    pub fn new(initial: Duration, max: Duration, now: Instant) -> Self {
        Self {
            initial,
            max,
            current: initial,
            next_at: now,
        }
    }

    /// May we try now?
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_at
    }

    /// An attempt was made (or failed): wait `current * jitter`, then double.
    /// `jitter` in `[0.5, 1.5)` spreads reconnect storms after an outage.
    pub fn attempted(&mut self, now: Instant, jitter: f64) {
        let wait = self.current.mul_f64(jitter.clamp(0.5, 1.5));
        self.next_at = now + wait;
        self.current = (self.current * 2).min(self.max);
    }

    /// The link works again: next failure starts from the initial delay.
    pub fn reset(&mut self, now: Instant) {
        self.current = self.initial;
        self.next_at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_and_resets() {
        let t0 = Instant::now();
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(4), t0);
        assert!(b.due(t0));
        let mut now = t0;
        let mut waits = vec![];
        for _ in 0..6 {
            b.attempted(now, 1.0);
            let mut t = now;
            while !b.due(t) {
                t += Duration::from_millis(100);
            }
            waits.push((t - now).as_millis());
            now = t;
        }
        assert_eq!(waits, vec![500, 1000, 2000, 4000, 4000, 4000]);
        b.reset(now);
        assert!(b.due(now));
        b.attempted(now, 1.0);
        assert!(!b.due(now + Duration::from_millis(400)));
        assert!(b.due(now + Duration::from_millis(500)));
    }
}
