//! How long a Raft call to a peer may take, learnt from the calls
//! themselves (sans-IO: durations in, timeouts out).
//!
//! A call over the mesh costs two round trips (the stream's protocol
//! negotiation, then the request and its reply) plus the peer's work, so a
//! fixed timeout that suits a LAN (a `Hello` within 1 s) fails every call
//! over a 600 ms satellite round trip, and a rack behind such a link could
//! then never join or be heard. Each peer gets an RFC 6298 estimate over
//! its answered calls (`srtt`, `rttvar`, timeout `srtt + max(4 rttvar,
//! srtt / 2)`: the RFC's clock-granularity term, here half a call, so that
//! a steady link's variance decaying to nothing does not leave a timeout
//! just at the mean); a
//! call that timed out doubles the next one's timeout (section 5.5) until
//! one is answered. The caller's floor (what it would use on a LAN) and
//! ceiling ([`crate::ControlSettings::rpc_timeout`]) bound the result.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

/// RFC 6298's gains: alpha = 1/8, beta = 1/4, K = 4.
const ALPHA_DIV: u32 = 8;
const BETA_DIV: u32 = 4;
const K: u32 = 4;

/// Doublings after timeouts, at most: 2^5 = 32 times the estimate, which
/// the ceiling cuts anyway.
const MAX_BACKOFF: u32 = 5;

/// Peers remembered, at most: the mesh's member table holds 1024; beyond
/// that a peer is forgotten (it starts again from the floor).
pub const MAX_PEERS: usize = 1024;

/// One peer's estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Smoothed call duration.
    pub srtt: Duration,
    /// Its smoothed mean deviation.
    pub rttvar: Duration,
    /// Timeouts since the last answered call (capped).
    pub backoff: u32,
}

/// What is known of every peer's calls.
#[derive(Debug, Clone)]
pub struct CallTimeouts<P> {
    peers: HashMap<P, Estimate>,
}

impl<P> Default for CallTimeouts<P> {
    fn default() -> Self {
        Self {
            peers: HashMap::new(),
        }
    }
}

impl<P: Eq + Hash + Clone> CallTimeouts<P> {
    /// A call to `peer` was answered after `took`.
    pub fn answered(&mut self, peer: &P, took: Duration) {
        let next = match self.peers.get(peer) {
            None => Estimate {
                srtt: took,
                rttvar: took / 2,
                backoff: 0,
            },
            Some(e) => Estimate {
                rttvar: e.rttvar - e.rttvar / BETA_DIV + e.srtt.abs_diff(took) / BETA_DIV,
                srtt: e.srtt - e.srtt / ALPHA_DIV + took / ALPHA_DIV,
                backoff: 0,
            },
        };
        self.insert(peer, next);
    }

    /// A call to `peer` got no answer within its timeout `gave`: the next
    /// call gets twice as long (twice `gave` if nothing was measured yet).
    pub fn timed_out(&mut self, peer: &P, gave: Duration) {
        let next = match self.peers.get(peer) {
            Some(e) => Estimate {
                backoff: (e.backoff + 1).min(MAX_BACKOFF),
                ..*e
            },
            // Unmeasured: an estimate whose timeout is what the call was
            // given (srtt + srtt / 2 = gave), doubled.
            None => Estimate {
                srtt: gave * 2 / 3,
                rttvar: Duration::ZERO,
                backoff: 1,
            },
        };
        self.insert(peer, next);
    }

    fn insert(&mut self, peer: &P, e: Estimate) {
        if self.peers.len() >= MAX_PEERS && !self.peers.contains_key(peer) {
            // Bounded: forget an arbitrary other peer.
            if let Some(k) = self.peers.keys().next().cloned() {
                self.peers.remove(&k);
            }
        }
        self.peers.insert(peer.clone(), e);
    }

    /// What is known of `peer`.
    #[must_use]
    pub fn estimate(&self, peer: &P) -> Option<Estimate> {
        self.peers.get(peer).copied()
    }

    /// The timeout of the next call to `peer`: `(srtt + max(4 rttvar,
    /// srtt / 2)) ×
    /// 2^backoff` within `[floor, max(floor, ceiling)]`; `floor` while
    /// nothing is known.
    #[must_use]
    pub fn timeout(&self, peer: &P, floor: Duration, ceiling: Duration) -> Duration {
        let Some(e) = self.peers.get(peer) else {
            return floor;
        };
        let base = e
            .srtt
            .saturating_add(e.rttvar.saturating_mul(K).max(e.srtt / 2));
        base.saturating_mul(1 << e.backoff)
            .clamp(floor, floor.max(ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FLOOR: Duration = Duration::from_secs(1);
    const CEILING: Duration = Duration::from_secs(3);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn unknown_peers_get_the_floor() {
        let t: CallTimeouts<u8> = CallTimeouts::default();
        assert_eq!(t.timeout(&1, FLOOR, CEILING), FLOOR);
    }

    #[test]
    fn a_lan_peer_keeps_the_floor() {
        let mut t = CallTimeouts::default();
        for _ in 0..20 {
            t.answered(&1u8, ms(2));
        }
        assert_eq!(t.timeout(&1, FLOOR, CEILING), FLOOR);
    }

    /// A satellite hop: calls take about 1.2 s (two round trips of 600 ms);
    /// the first one, at the LAN floor, times out, the doubled one is
    /// answered, and from then on the timeout covers such calls.
    #[test]
    fn a_satellite_peer_is_learnt_after_one_timeout() {
        let mut t = CallTimeouts::default();
        assert_eq!(t.timeout(&1u8, FLOOR, CEILING), FLOOR);
        t.timed_out(&1, FLOOR);
        let doubled = t.timeout(&1, FLOOR, CEILING);
        assert!(doubled.abs_diff(ms(2000)) < ms(1), "{doubled:?}");
        t.answered(&1, ms(1250));
        assert!(t.timeout(&1, FLOOR, CEILING) >= ms(1250));
        for _ in 0..50 {
            t.answered(&1, ms(1200));
        }
        let steady = t.timeout(&1, FLOOR, CEILING);
        assert!(steady >= ms(1700) && steady <= ms(1900), "{steady:?}");
    }

    #[test]
    fn timeouts_back_off_to_the_ceiling_and_an_answer_resets() {
        let mut t = CallTimeouts::default();
        for _ in 0..10 {
            t.answered(&1u8, ms(300));
        }
        let before = t.timeout(&1, ms(100), CEILING);
        t.timed_out(&1, before);
        assert_eq!(t.timeout(&1, ms(100), CEILING), (before * 2).min(CEILING));
        for _ in 0..20 {
            t.timed_out(&1, CEILING);
        }
        assert_eq!(t.estimate(&1).unwrap().backoff, MAX_BACKOFF);
        assert_eq!(t.timeout(&1, ms(100), CEILING), CEILING);
        t.answered(&1, ms(300));
        assert_eq!(t.estimate(&1).unwrap().backoff, 0);
        assert!(t.timeout(&1, ms(100), CEILING) < CEILING);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = CallTimeouts::default();
        for p in 0..(MAX_PEERS as u32 + 100) {
            t.answered(&p, ms(5));
        }
        assert_eq!(t.peers.len(), MAX_PEERS);
    }

    proptest! {
        /// Whatever happened, the timeout stays within its bounds, and a
        /// floor above the ceiling wins.
        #[test]
        fn timeouts_stay_within_bounds(
            events in prop::collection::vec((any::<bool>(), 0u64..20_000), 0..64),
            floor in 1u64..5_000,
            ceiling in 1u64..10_000,
        ) {
            let mut t = CallTimeouts::default();
            for (answered, d) in events {
                if answered {
                    t.answered(&0u8, ms(d));
                } else {
                    t.timed_out(&0u8, ms(d));
                }
                let got = t.timeout(&0, ms(floor), ms(ceiling));
                prop_assert!(got >= ms(floor));
                prop_assert!(got <= ms(floor.max(ceiling)));
            }
        }
    }
}
