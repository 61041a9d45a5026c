//! Reconnect backoff: exponential with jitter, time injected; and the
//! longer hold-off for peers that failed admission ([`Rejections`]).

use std::collections::HashMap;
use std::hash::Hash;
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

    /// When the next attempt is allowed.
    pub fn next_at(&self) -> Instant {
        self.next_at
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

/// How long the side with the higher peer id waits before its first dial
/// of a peer it has just learned of (times a jitter in `[0.5, 1.5)`).
/// Racks that start together learn of each other at about the same time:
/// if both dialled at once, every pair would make two connections, two TLS
/// handshakes and two admissions, and then close one; at 32 racks that
/// doubled the CPU of a cold start, which is what delayed convergence. The
/// lower id dials at once; the higher one only if no connection came by
/// then (the lower side may not know its address, or cannot reach it).
pub const FIRST_DIAL_DEFER: Duration = Duration::from_secs(2);

/// How long to wait before the first dial of `peer`, learned of just now,
/// from `local`: nothing for the lower id, [`FIRST_DIAL_DEFER`] times
/// `jitter` (clamped to `[0.5, 1.5)`) for the higher one. Later dials (the
/// peer was connected before) follow the reconnect backoff alone.
pub fn first_dial_delay<T: Ord>(local: &T, peer: &T, jitter: f64) -> Duration {
    if local < peer {
        Duration::ZERO
    } else {
        FIRST_DIAL_DEFER.mul_f64(jitter.clamp(0.5, 1.5))
    }
}

/// First hold-off after a peer failed admission (in either direction: we
/// refused its certificate or it refused ours). Redialling sooner cannot
/// help: a certificate does not become valid by itself, and an operator who
/// fixes one restarts the agent, which starts with a clean slate.
pub const REJECTED_INITIAL: Duration = Duration::from_secs(30);
/// Longest hold-off for a rejected peer: a rack whose certificate was
/// renewed gets back in within five minutes at worst (or at once when *it*
/// dials, since its inbound connections are always heard).
pub const REJECTED_MAX: Duration = Duration::from_secs(300);
/// Most rejected peers remembered. Outsiders can make up PeerIds at will;
/// past the bound the one whose hold-off ends first is forgotten.
pub const MAX_REJECTED: usize = 1024;

/// What to do about one more rejection of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A new backoff step: log it (once) and tell the event log.
    Warn {
        /// Rejections since the last warning, not logged.
        suppressed: u64,
        /// How long until we dial it again.
        retry_in: Duration,
    },
    /// Within the current step: count it, say nothing.
    Quiet,
}

/// Peers that failed admission, each on a long backoff ([`REJECTED_INITIAL`]
/// doubling to [`REJECTED_MAX`]): we do not dial them meanwhile, and their
/// rejections are logged once per backoff step, not once per attempt.
#[derive(Debug)]
pub struct Rejections<K> {
    peers: HashMap<K, Rejected>,
}

#[derive(Debug)]
struct Rejected {
    backoff: Backoff,
    suppressed: u64,
}

impl<K: Hash + Eq + Copy> Default for Rejections<K> {
    fn default() -> Self {
        Self {
            peers: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Copy> Rejections<K> {
    /// `peer` failed admission at `now`; `jitter` in `[0.5, 1.5)`.
    pub fn rejected(&mut self, peer: K, now: Instant, jitter: f64) -> Verdict {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_REJECTED {
            if let Some(oldest) = self
                .peers
                .iter()
                .min_by_key(|(_, r)| r.backoff.next_at())
                .map(|(k, _)| *k)
            {
                self.peers.remove(&oldest);
            }
        }
        let r = self.peers.entry(peer).or_insert_with(|| Rejected {
            backoff: Backoff::new(REJECTED_INITIAL, REJECTED_MAX, now),
            suppressed: 0,
        });
        if r.backoff.due(now) {
            r.backoff.attempted(now, jitter);
            Verdict::Warn {
                suppressed: std::mem::take(&mut r.suppressed),
                retry_in: r.backoff.next_at().saturating_duration_since(now),
            }
        } else {
            r.suppressed += 1;
            Verdict::Quiet
        }
    }

    /// Must we leave `peer` alone (not dial it) at `now`?
    pub fn holds(&self, peer: &K, now: Instant) -> bool {
        self.peers.get(peer).is_some_and(|r| !r.backoff.due(now))
    }

    /// `peer` was admitted: forget its rejections.
    pub fn admitted(&mut self, peer: &K) {
        self.peers.remove(peer);
    }

    /// Forget peers whose hold-off ended more than [`REJECTED_MAX`] ago
    /// without another rejection.
    pub fn prune(&mut self, now: Instant) {
        self.peers
            .retain(|_, r| now.saturating_duration_since(r.backoff.next_at()) < REJECTED_MAX);
    }

    /// How many peers are remembered.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_lower_id_dials_a_new_peer_at_once() {
        assert_eq!(first_dial_delay(&1, &2, 1.0), Duration::ZERO);
        assert_eq!(first_dial_delay(&2, &1, 1.0), FIRST_DIAL_DEFER);
        // Exactly one side of every pair waits, and the wait is jittered
        // within bounds.
        for (a, b) in [(3, 9), (9, 3), (5, 6)] {
            let waits = [first_dial_delay(&a, &b, 0.7), first_dial_delay(&b, &a, 0.7)];
            assert_eq!(waits.iter().filter(|w| w.is_zero()).count(), 1);
        }
        assert_eq!(first_dial_delay(&2, &1, 0.0), FIRST_DIAL_DEFER / 2);
        assert_eq!(first_dial_delay(&2, &1, 9.0), FIRST_DIAL_DEFER.mul_f64(1.5));
    }

    #[test]
    fn rejected_peers_hold_off_and_warn_once_per_step() {
        let t0 = Instant::now();
        let mut r = Rejections::default();
        // A peer rejected ten times a second for 20 minutes.
        let mut warns = Vec::new();
        let mut quiet = 0u64;
        let mut now = t0;
        while now < t0 + Duration::from_secs(1200) {
            match r.rejected(1u32, now, 1.0) {
                Verdict::Warn {
                    suppressed,
                    retry_in,
                } => {
                    assert!(r.holds(&1, now));
                    assert!(!r.holds(&1, now + retry_in));
                    warns.push(((now - t0).as_secs(), suppressed, retry_in.as_secs()));
                }
                Verdict::Quiet => quiet += 1,
            }
            now += Duration::from_millis(100);
        }
        let steps: Vec<u64> = warns.iter().map(|w| w.2).collect();
        assert_eq!(steps, vec![30, 60, 120, 240, 300, 300, 300]);
        assert_eq!(warns[0].1, 0, "nothing suppressed before the first");
        assert_eq!(warns[1].1, 299, "the 30 s step swallowed 299 attempts");
        assert_eq!(
            quiet + warns.len() as u64,
            12_000,
            "every rejection counted once"
        );
        // Admission forgets it; others are untouched.
        r.rejected(2, now, 1.0);
        r.admitted(&1);
        assert!(!r.holds(&1, now));
        assert!(r.holds(&2, now));
        // Forgotten once quiet for long enough.
        r.prune(now + REJECTED_INITIAL + REJECTED_MAX);
        assert!(r.is_empty());
    }

    #[test]
    fn rejected_set_is_bounded() {
        let t0 = Instant::now();
        let mut r = Rejections::default();
        for i in 0..(MAX_REJECTED as u32 * 3) {
            r.rejected(i, t0 + Duration::from_millis(u64::from(i)), 1.0);
            assert!(r.len() <= MAX_REJECTED);
        }
        // The newest are the ones kept.
        assert!(r.holds(&(MAX_REJECTED as u32 * 3 - 1), t0));
        assert!(!r.holds(&0, t0));
    }

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
