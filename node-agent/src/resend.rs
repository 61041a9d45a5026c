//! Which peers need a periodic message again (sans-IO): a rack sends its
//! uplink report and its cache digest to every peer, but only when what it
//! would send changed since that peer last got it, or that peer last got
//! it longer than a refresh period ago. In an idle field of 32 racks this
//! turns a message to each of 31 peers every period into one every few
//! periods, while a change still goes out at the next period.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// What each peer was last sent, and when.
#[derive(Debug)]
pub struct Resend<P, V> {
    refresh: Duration,
    sent: HashMap<P, (V, Instant)>,
}

impl<P: Eq + Hash + Clone, V: PartialEq + Clone> Resend<P, V> {
    /// Peers get an unchanged value again after `refresh`.
    #[must_use]
    pub fn new(refresh: Duration) -> Self {
        Self {
            refresh,
            sent: HashMap::new(),
        }
    }

    /// The peers among `peers` to send `value` to at `now`: new peers,
    /// peers last sent something else, peers last sent it `refresh` ago.
    /// They are recorded as sent; peers no longer listed are forgotten.
    pub fn due(&mut self, peers: &[P], value: &V, now: Instant) -> Vec<P> {
        self.due_within(peers, value, now, self.refresh)
    }

    /// Like [`Resend::due`], an unchanged `value` going out again after
    /// `refresh` rather than the usual period (a value whose age nobody
    /// reads needs refreshing only against a lost message).
    pub fn due_within(
        &mut self,
        peers: &[P],
        value: &V,
        now: Instant,
        refresh: Duration,
    ) -> Vec<P> {
        self.sent.retain(|p, _| peers.contains(p));
        let mut out = Vec::new();
        for p in peers {
            let fresh = self
                .sent
                .get(p)
                .is_some_and(|(v, at)| v == value && now.saturating_duration_since(*at) < refresh);
            if !fresh {
                self.sent.insert(p.clone(), (value.clone(), now));
                out.push(p.clone());
            }
        }
        out
    }

    /// A send to `peer` failed: it is due again next time.
    pub fn failed(&mut self, peer: &P) {
        self.sent.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REFRESH: Duration = Duration::from_secs(4);

    #[test]
    fn changes_go_out_at_once_and_the_same_value_only_after_refresh() {
        let t0 = Instant::now();
        let mut r = Resend::new(REFRESH);
        assert_eq!(r.due(&["a", "b"], &1, t0), vec!["a", "b"]);
        assert!(r
            .due(&["a", "b"], &1, t0 + Duration::from_secs(1))
            .is_empty());
        assert_eq!(
            r.due(&["a", "b", "c"], &1, t0 + Duration::from_secs(2)),
            vec!["c"],
            "a new peer gets it at once"
        );
        assert_eq!(
            r.due(&["a", "b", "c"], &2, t0 + Duration::from_secs(3)),
            vec!["a", "b", "c"],
            "a change goes to everyone"
        );
        assert_eq!(
            r.due(&["a", "b", "c"], &2, t0 + Duration::from_secs(7)),
            vec!["a", "b", "c"],
            "refreshed"
        );
        r.failed(&"b");
        assert_eq!(
            r.due(&["a", "b"], &2, t0 + Duration::from_secs(8)),
            vec!["b"]
        );
        assert_eq!(
            r.due(&["b"], &2, t0 + Duration::from_secs(9)),
            Vec::<&str>::new()
        );
        assert_eq!(
            r.due(&["a", "b"], &2, t0 + Duration::from_secs(9)),
            vec!["a"],
            "a peer that left and came back is new"
        );
    }

    #[test]
    fn a_longer_refresh_holds_an_unchanged_value_longer_and_a_change_still_goes_at_once() {
        let t0 = Instant::now();
        let long = REFRESH * 5;
        let mut r = Resend::new(REFRESH);
        assert_eq!(r.due_within(&["a"], &1, t0, long), vec!["a"]);
        assert!(r.due_within(&["a"], &1, t0 + REFRESH * 2, long).is_empty());
        assert_eq!(
            r.due(&["a"], &1, t0 + REFRESH * 2),
            vec!["a"],
            "the usual period still applies to a call that asks for it"
        );
        assert_eq!(
            r.due_within(&["a"], &2, t0 + REFRESH * 2, long),
            vec!["a"],
            "a change goes at once"
        );
        assert!(r.due_within(&["a"], &2, t0 + REFRESH * 6, long).is_empty());
        assert_eq!(r.due_within(&["a"], &2, t0 + REFRESH * 7, long), vec!["a"]);
    }

    proptest! {
        /// Whatever the sequence, no peer ever goes longer than `refresh`
        /// (plus one period) without the current value, and none gets an
        /// unchanged value twice within `refresh`.
        #[test]
        fn every_peer_holds_the_value_within_refresh(
            steps in proptest::collection::vec((0u8..3, proptest::collection::vec(0u8..5, 0..5)), 1..60)
        ) {
            let t0 = Instant::now();
            let period = Duration::from_secs(1);
            let mut r = Resend::new(REFRESH);
            let mut held: HashMap<u8, (u8, Instant)> = HashMap::new();
            for (i, (value, peers)) in steps.iter().enumerate() {
                let now = t0 + period * u32::try_from(i).unwrap();
                held.retain(|p, _| peers.contains(p));
                for p in r.due(peers, value, now) {
                    if let Some((v, at)) = held.get(&p) {
                        prop_assert!(v != value || now - *at >= REFRESH, "resent too early");
                    }
                    held.insert(p, (*value, now));
                }
                for p in peers {
                    let (v, at) = held[p];
                    prop_assert_eq!(v, *value);
                    prop_assert!(now - at < REFRESH + period);
                }
            }
        }
    }
}
