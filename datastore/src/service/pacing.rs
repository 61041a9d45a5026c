//! When to snapshot an owned volume: sans-IO (time injected), so it is
//! tested by tables and properties.
//!
//! A volume is snapshotted only when it was written since its last
//! snapshot, never twice within its current interval. The interval starts
//! at the configured minimum (`[volumes] snapshot_interval_s`) and adapts
//! to replication (the replica that holds the most of the volume, which
//! sets its recovery point): when, as a snapshot falls due, the bytes of
//! earlier generations still waiting to reach it grew since the last one
//! and the link needs longer than one interval to send them, it doubles (up to the maximum); once the backlog drains within
//! half an interval it halves again (down to the minimum). A link that
//! cannot keep up thus gets fewer, larger generations instead of a queue of
//! ones it would skip anyway, and a fast link gets a recovery point of
//! about the minimum interval plus one push.

use std::time::Duration;

/// The bounds of the interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaceConfig {
    /// Shortest time between two snapshots of one volume.
    pub min_interval: Duration,
    /// Longest the interval grows to while replication lags.
    pub max_interval: Duration,
}

/// What replication says about one volume when a snapshot falls due
/// (before that snapshot adds its own bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// Bytes of new generations its best-synced replica does not hold yet.
    pub waiting_bytes: u64,
    /// The measured push rate to that replica (bytes/s), if any push has
    /// been measured yet.
    pub push_bytes_per_s: Option<f64>,
}

impl Backlog {
    /// How long the link needs to send what waits (`None`: nothing
    /// measured yet, or nothing waits).
    #[must_use]
    pub fn eta(&self) -> Option<Duration> {
        if self.waiting_bytes == 0 {
            return Some(Duration::ZERO);
        }
        let rate = self.push_bytes_per_s.filter(|r| *r > 0.0)?;
        Duration::try_from_secs_f64(self.waiting_bytes as f64 / rate).ok()
    }
}

/// One volume's pacing state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// The current interval.
    pub interval: Duration,
    /// When it was last snapshotted (time since any fixed origin).
    pub last_at: Option<Duration>,
    /// Bytes waiting at that snapshot.
    pub waiting_at_last: u64,
}

impl Pace {
    /// A volume first seen at `now` (created, imported, promoted, or found
    /// when the service starts): its first snapshot comes one interval
    /// later, as if it had just been taken, so a volume being filled is not
    /// captured half-way at once.
    #[must_use]
    pub fn new(cfg: &PaceConfig, now: Duration) -> Self {
        Self {
            interval: cfg.min_interval,
            last_at: Some(now),
            waiting_at_last: 0,
        }
    }

    /// Whether to snapshot now: written since the last snapshot and at
    /// least one interval after it.
    #[must_use]
    pub fn due(&self, now: Duration, written: bool) -> bool {
        written
            && self
                .last_at
                .is_none_or(|t| now.saturating_sub(t) >= self.interval)
    }

    /// When the next snapshot may be taken (if written by then).
    #[must_use]
    pub fn next_at(&self) -> Duration {
        self.last_at.map_or(Duration::ZERO, |t| t + self.interval)
    }

    /// Record a snapshot taken at `now` with `backlog`, adapting the
    /// interval.
    pub fn snapshotted(&mut self, cfg: &PaceConfig, now: Duration, backlog: Backlog) {
        self.interval = next_interval(cfg, self.interval, self.waiting_at_last, backlog);
        self.last_at = Some(now);
        self.waiting_at_last = backlog.waiting_bytes;
    }
}

/// The backlog that paces a volume's snapshots, of its replicas' ones: the
/// replica with the least waiting (the one that sets the recovery point).
/// No replica: nothing waits.
#[must_use]
pub fn best_synced(replicas: impl IntoIterator<Item = Backlog>) -> Backlog {
    replicas
        .into_iter()
        .min_by_key(|b| b.waiting_bytes)
        .unwrap_or(Backlog {
            waiting_bytes: 0,
            push_bytes_per_s: None,
        })
}

/// The interval after a snapshot: doubled when the backlog grew and needs
/// more than one interval to send (or its rate is unknown), halved when it
/// drains within half an interval, else kept; always within the bounds.
#[must_use]
pub fn next_interval(
    cfg: &PaceConfig,
    current: Duration,
    waiting_before: u64,
    backlog: Backlog,
) -> Duration {
    let (lo, hi) = (cfg.min_interval, cfg.max_interval.max(cfg.min_interval));
    let current = current.clamp(lo, hi);
    let eta = backlog.eta();
    let grew = backlog.waiting_bytes > waiting_before;
    let next = match eta {
        Some(e) if e <= current / 2 => current / 2,
        Some(e) if grew && e > current => current.saturating_mul(2),
        None if grew => current.saturating_mul(2),
        _ => current,
    };
    next.clamp(lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    fn cfg() -> PaceConfig {
        PaceConfig {
            min_interval: 2 * S,
            max_interval: 60 * S,
        }
    }

    fn backlog(waiting: u64, rate: Option<f64>) -> Backlog {
        Backlog {
            waiting_bytes: waiting,
            push_bytes_per_s: rate,
        }
    }

    #[test]
    #[allow(clippy::type_complexity)] // a table reads best as literal tuples
    fn the_interval_follows_the_backlog() {
        let mb = 1_000_000;
        let table: &[(&str, u32, u64, u64, Option<f64>, u32)] = &[
            // (what, current s, waiting before, waiting now, rate, next s)
            ("nothing waits", 2, 0, 0, None, 2),
            ("drains fast", 8, 0, mb, Some(10e6), 4),
            ("drains fast, at the floor", 2, 0, mb, Some(10e6), 2),
            ("grows, link too slow", 2, mb, 10 * mb, Some(1e6), 4),
            ("grows, rate unknown", 4, 0, mb, None, 8),
            ("grows but fits one interval", 4, 0, 3 * mb, Some(1e6), 4),
            ("shrinks, still slow", 8, 20 * mb, 10 * mb, Some(1e6), 8),
            ("capped", 40, mb, 100 * mb, Some(1e6), 60),
        ];
        for &(what, cur, before, now, rate, want) in table {
            assert_eq!(
                next_interval(&cfg(), cur * S, before, backlog(now, rate)),
                want * S,
                "{what}"
            );
        }
    }

    #[test]
    fn a_replica_catching_up_does_not_slow_the_pace() {
        let mb = 1_000_000;
        let c = cfg();
        let in_sync = backlog(mb / 10, Some(10e6));
        let catching_up = backlog(500 * mb, Some(1e6));
        let paced = best_synced([catching_up, in_sync]);
        assert_eq!(paced, in_sync);
        // Its backlog grew a lot since the last snapshot, yet the interval
        // stays at the minimum: the replica in sync drains in 10 ms.
        assert_eq!(next_interval(&c, 2 * S, 0, paced), 2 * S);
        // Only when every replica lags does the pace back off.
        let paced = best_synced([catching_up, backlog(50 * mb, Some(1e6))]);
        assert_eq!(next_interval(&c, 2 * S, mb, paced), 4 * S);
        assert_eq!(best_synced([]), backlog(0, None));
    }

    #[test]
    fn only_written_volumes_are_snapshotted_and_never_too_often() {
        let c = cfg();
        let mut p = Pace::new(&c, Duration::ZERO);
        assert!(!p.due(Duration::ZERO, false));
        assert!(!p.due(S, true));
        assert!(p.due(2 * S, true));
        p.snapshotted(&c, 10 * S, backlog(0, None));
        assert!(!p.due(11 * S, true));
        assert!(p.due(12 * S, true));
        assert!(!p.due(100 * S, false));
        assert_eq!(p.next_at(), 12 * S);
    }

    #[test]
    fn the_eta_is_the_backlog_over_the_rate() {
        assert_eq!(backlog(0, None).eta(), Some(Duration::ZERO));
        assert_eq!(backlog(10, None).eta(), None);
        assert_eq!(backlog(10, Some(0.0)).eta(), None);
        assert_eq!(backlog(3_000_000, Some(1e6)).eta(), Some(3 * S));
    }

    proptest! {
        /// Under any sequence of backlogs and write patterns: the interval
        /// stays within its bounds, no two snapshots are closer than the
        /// minimum, none is taken of an unwritten volume, and a link that
        /// keeps up brings the interval back to the minimum.
        #[test]
        fn pacing_stays_within_bounds(
            steps in proptest::collection::vec((0u64..3000, any::<bool>(), 0u64..50_000_000, proptest::option::of(1e4f64..1e8)), 1..200),
        ) {
            let c = cfg();
            let mut now = Duration::ZERO;
            let mut p = Pace::new(&c, now);
            let mut last: Option<Duration> = Some(now);
            for (dt_ms, written, waiting, rate) in steps {
                now += Duration::from_millis(dt_ms);
                if p.due(now, written) {
                    prop_assert!(written);
                    if let Some(l) = last {
                        prop_assert!(now - l >= c.min_interval);
                    }
                    p.snapshotted(&c, now, backlog(waiting, rate));
                    last = Some(now);
                }
                prop_assert!(p.interval >= c.min_interval && p.interval <= c.max_interval);
            }
            for _ in 0..8 {
                now += p.interval;
                prop_assert!(p.due(now, true));
                p.snapshotted(&c, now, backlog(0, Some(1e6)));
            }
            prop_assert_eq!(p.interval, c.min_interval);
        }
    }
}
