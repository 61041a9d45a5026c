//! Which connections to a peer are stale when a fresh one arrives.
//!
//! A peer held suspect or dead that connects afresh has restarted, or a
//! cut link healed: connections opened *before* it fell under suspicion
//! may be dead underneath (a killed process's, a link's that went quiet)
//! and would swallow messages until their idle timeout, so they are
//! closed. Connections opened *after* the suspicion began are as fresh as
//! the new one and stay: at first boot racks hear of each other through
//! gossip before they connect, hold each other suspect, and dial each
//! other at once; closing every older connection then made each side
//! close the connection the other had just opened, over and over, and
//! most certificate offers of a 32-rack field's first seconds were lost
//! to it.

use std::time::Instant;

/// The connections in `open` (each with the instant it was established)
/// that predate `suspected_since`, when the peer entered its suspect or
/// dead state.
#[must_use]
pub fn stale<C: Copy>(open: &[(C, Instant)], suspected_since: Instant) -> Vec<C> {
    open.iter()
        .filter(|(_, at)| *at < suspected_since)
        .map(|(c, _)| *c)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_connections_older_than_the_suspicion_are_stale() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let open = [(1, t0), (2, t0 + 2 * s), (3, t0 + 3 * s)];
        // A restart: the old connection predates the suspicion.
        assert_eq!(stale(&open[..1], t0 + s), vec![1]);
        // First boot: suspected before either side connected; the
        // connections opened since are kept.
        assert_eq!(stale(&open[1..], t0 + s), Vec::<i32>::new());
        assert_eq!(stale(&open, t0 + s), vec![1]);
        assert!(stale::<i32>(&[], t0).is_empty());
    }
}
