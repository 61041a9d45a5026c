//! When a follower may stand for election (sans-IO: instants and a random
//! fraction in, a verdict out).
//!
//! openraft 0.9 ties three timings to its `heartbeat_interval`: the
//! heartbeat period, the timeout of every append (so of every heartbeat),
//! and its timer tick, at which it also checks for elections. Over a 600 ms
//! round trip an append takes two round trips (stream negotiation, then the
//! call), so a 250 ms heartbeat would time out every append to such a rack,
//! and a heartbeat long enough for it would check elections only every few
//! seconds. So the control plane gives openraft the Raft call timeout
//! ([`crate::ControlSettings::rpc_timeout`]) as its `heartbeat_interval`,
//! turns its own heartbeats and elections off, sends heartbeats itself every
//! [`crate::ControlSettings::heartbeat`], and starts elections through this
//! timer (after the pre-vote, [`crate::formation::election_gate`]).
//!
//! A follower may stand once it has heard no leader for the leader lease
//! (openraft's voters refuse any candidate until that long after they last
//! heard their leader: `election_timeout_max`, which the control plane sets
//! to the call timeout) or the election timeout, whichever is longer, plus
//! a random part of up to one election timeout, so that two followers that
//! lost the same leader rarely stand together. After standing it waits as
//! long again before the next try (a split vote, or a pre-vote refused).

use std::time::{Duration, Instant};

/// A follower's election timer.
#[derive(Debug, Clone)]
pub struct ElectionTimer {
    /// How long voters refuse candidates after hearing their leader.
    lease: Duration,
    /// The election timeout (`[control] election_timeout_ms`).
    timeout: Duration,
    /// The last time this rack stood for election or tried to.
    last_try: Option<Instant>,
    /// This round's random part.
    jitter: Duration,
}

impl ElectionTimer {
    /// A timer with the voters' `lease`, the election `timeout`, and a first
    /// random part `rand` (0..1).
    #[must_use]
    pub fn new(lease: Duration, timeout: Duration, rand: f64) -> Self {
        Self {
            lease,
            timeout,
            last_try: None,
            jitter: timeout.mul_f64(rand.clamp(0.0, 1.0)),
        }
    }

    /// When this follower may stand next, having last heard a leader (or
    /// started, or led) at `heard`.
    #[must_use]
    pub fn due_at(&self, heard: Instant) -> Instant {
        let from = self.last_try.map_or(heard, |t| t.max(heard));
        from + self.lease.max(self.timeout) + self.jitter
    }

    /// Whether this follower may stand at `now` (the pre-vote still has to
    /// agree).
    #[must_use]
    pub fn due(&self, now: Instant, heard: Instant) -> bool {
        now >= self.due_at(heard)
    }

    /// It tried (stood, or was refused by the pre-vote) at `now`; `rand`
    /// (0..1) draws the next round's random part.
    pub fn tried(&mut self, now: Instant, rand: f64) {
        self.last_try = Some(now);
        self.jitter = self.timeout.mul_f64(rand.clamp(0.0, 1.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Defaults: a 3 s lease, 1.5 s timeout: a follower stands 3 to 4.5 s
    /// after it last heard its leader.
    #[test]
    fn stands_after_the_lease_plus_a_random_part() {
        let t0 = Instant::now();
        for (rand, after) in [(0.0, 3000), (0.5, 3750), (1.0, 4500)] {
            let t = ElectionTimer::new(ms(3000), ms(1500), rand);
            assert!(!t.due(t0 + ms(after - 1), t0), "{rand}");
            assert!(t.due(t0 + ms(after), t0), "{rand}");
        }
    }

    /// A timeout longer than the lease counts instead.
    #[test]
    fn a_long_timeout_wins_over_a_short_lease() {
        let t0 = Instant::now();
        let t = ElectionTimer::new(ms(1000), ms(4000), 0.0);
        assert_eq!(t.due_at(t0), t0 + ms(4000));
    }

    #[test]
    fn hearing_the_leader_postpones() {
        let t0 = Instant::now();
        let t = ElectionTimer::new(ms(3000), ms(1500), 0.0);
        assert!(!t.due(t0 + ms(4000), t0 + ms(2000)));
        assert!(t.due(t0 + ms(5000), t0 + ms(2000)));
    }

    #[test]
    fn after_a_try_it_waits_a_whole_round_again() {
        let t0 = Instant::now();
        let mut t = ElectionTimer::new(ms(3000), ms(1500), 0.0);
        assert!(t.due(t0 + ms(3000), t0));
        t.tried(t0 + ms(3000), 0.2);
        assert!(!t.due(t0 + ms(6299), t0));
        assert!(t.due(t0 + ms(6300), t0));
    }

    proptest! {
        /// Never before the lease and the timeout from the later of the
        /// last leader contact and the last try; always by one round plus
        /// one timeout after it.
        #[test]
        fn due_within_one_round(
            lease in 0u64..10_000,
            timeout in 0u64..10_000,
            heard in 0u64..10_000,
            tried in prop::option::of(0u64..10_000),
            r1 in 0.0f64..1.0,
            r2 in 0.0f64..1.0,
        ) {
            let t0 = Instant::now();
            let mut t = ElectionTimer::new(ms(lease), ms(timeout), r1);
            if let Some(at) = tried {
                t.tried(t0 + ms(at), r2);
            }
            let from = t0 + ms(heard.max(tried.unwrap_or(0)));
            let round = ms(lease.max(timeout));
            prop_assert!(t.due_at(t0 + ms(heard)) >= from + round);
            prop_assert!(t.due_at(t0 + ms(heard)) <= from + round + ms(timeout));
        }
    }
}
