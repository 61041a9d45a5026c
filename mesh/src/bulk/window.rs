//! Sizing a bulk connection's send window from what the connection
//! measures, so that a transfer keeps the bottleneck busy without filling
//! its queue: a sans-IO rule, time injected.
//!
//! The windows of `transport.rs` cover the largest bandwidth-delay product
//! the field's links have, several times over. On a thin link that lets the
//! congestion controller (BBR aims at twice its estimate in flight; CUBIC
//! and NewReno until a drop) keep the radio's or modem's queue full, and
//! the control traffic sharing the link (SWIM, Raft, lease renewals, on the
//! mesh connection) waits behind it or is tail-dropped and waits for its
//! own retransmission: over a 2 Mbit/s, 600 ms satellite hop SWIM round
//! trips reached 3.3 s under a push. Here the send window follows the
//! connection's own figures, in the manner of TCP Vegas: the queue is the
//! smoothed round trip minus the lowest one recently seen; above
//! [`QUEUE_TARGET`] the window becomes the measured sending rate times
//! that lowest round trip (the path's BDP: the queue drains, and the
//! lowest round trip is measured afresh, so it cannot creep up with a
//! standing queue), at most halving it, then holds for a round trip (at
//! most two base round trips: the smoothed figure lags the drain); below half the target it grows by
//! a quarter per step (up to the static window); in between it holds. The
//! rate is the highest one step measured over the last two seconds or so
//! (BBR's bandwidth filter), not the last step's: a window that just shrank
//! sends little until acknowledgements return, and reading that as the
//! link's rate would collapse the window. So the window saws
//! between the BDP and the BDP plus about the target, and the link stays
//! full. Where the bottleneck's own queue is shorter than the target (the
//! radio profiles) it never engages and the congestion controller alone
//! decides.

use std::time::{Duration, Instant};

/// Queueing delay a transfer may add on its bottleneck. A tenth of a
/// second keeps a satellite hop's SWIM round trips well inside their
/// adaptive probe timeout, and is above the radio profiles' jitter (±10 ms)
/// so that jitter is not read as queue.
pub const QUEUE_TARGET: Duration = Duration::from_millis(100);

/// How often the window is reconsidered: a few times per satellite round
/// trip; a radio link's many round trips per step smooth the rate.
pub const STEP: Duration = Duration::from_millis(200);

/// How long the lowest round trip is remembered: a path's base delay may
/// grow (a route change), so older minima expire, in two halves (BBR keeps
/// its minimum for 10 s).
pub const BASE_RTT_WINDOW: Duration = Duration::from_secs(10);

/// Steps whose highest sending rate is taken as the link's (about two
/// seconds: three satellite round trips).
pub const RATE_STEPS: usize = 10;

/// The smallest window ever set: a few dozen packets, so a link whose
/// rate was measured while the transfer paused still starts quickly.
pub const MIN_WINDOW: u64 = 64 * 1024;

/// The send window of one connection.
#[derive(Debug, Clone)]
pub struct Window {
    /// The static window (the largest this sets).
    max: u64,
    /// The window now.
    window: u64,
    /// Lowest smoothed RTT in the current half of [`BASE_RTT_WINDOW`] and
    /// in the previous half.
    base: (Option<Duration>, Option<Duration>),
    /// When the current half began.
    half_started: Instant,
    /// Step boundaries and the bytes sent by each, oldest first, at most
    /// [`RATE_STEPS`] + 1: the rate is measured over them.
    steps: std::collections::VecDeque<(Instant, u64)>,
    /// No shrinking before this (one round trip after the last shrink).
    hold_until: Instant,
}

impl Window {
    /// A connection with static window `max`, first observed at `now`
    /// having sent `sent` bytes.
    #[must_use]
    pub fn new(max: u64, now: Instant, sent: u64) -> Self {
        Self {
            max,
            window: max,
            base: (None, None),
            half_started: now,
            steps: std::collections::VecDeque::from([(now, sent)]),
            hold_until: now,
        }
    }

    /// The lowest round trip recently seen.
    #[must_use]
    pub fn base_rtt(&self) -> Option<Duration> {
        match self.base {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Observe the connection's smoothed RTT `srtt` and the bytes it sent
    /// in all (`sent`) at `now`; returns the new send window when a step
    /// ends and it changed.
    pub fn observe(&mut self, now: Instant, srtt: Duration, sent: u64) -> Option<u64> {
        if now.saturating_duration_since(self.half_started) >= BASE_RTT_WINDOW / 2 {
            self.base = (None, self.base.0);
            self.half_started = now;
        }
        self.base.0 = Some(self.base.0.map_or(srtt, |b| b.min(srtt)));
        let last = self.steps.back().map_or(now, |(t, _)| *t);
        if now.saturating_duration_since(last) < STEP {
            return None;
        }
        self.steps.push_back((now, sent));
        if self.steps.len() > RATE_STEPS + 1 {
            self.steps.pop_front();
        }
        let rate = self
            .steps
            .iter()
            .zip(self.steps.iter().skip(1))
            .map(|((t0, b0), (t1, b1))| {
                b1.saturating_sub(*b0) as f64 / t1.saturating_duration_since(*t0).as_secs_f64()
            })
            .fold(0.0, f64::max);
        let base = self.base_rtt().unwrap_or(srtt);
        let queue = srtt.saturating_sub(base);
        let next = if queue > QUEUE_TARGET {
            if now < self.hold_until {
                return None;
            }
            // The drain shows after about one base round trip; a lagging
            // smoothed figure must not stretch the hold further.
            self.hold_until = now + srtt.min(base * 2);
            // Bytes/s times seconds: far inside f64's exact range.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let target = (rate * base.as_secs_f64()) as u64;
            // Never grow while the queue is long; at most halve.
            target.clamp(self.window / 2, self.window)
        } else if queue < QUEUE_TARGET / 2 {
            self.window + self.window / 4
        } else {
            self.window
        }
        .clamp(MIN_WINDOW.min(self.max), self.max);
        (next != self.window).then(|| {
            self.window = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MAX: u64 = 2_000_000;

    /// A bottleneck of `rate` bytes/s, base RTT `base`, with a FIFO: the
    /// sender keeps `window` bytes in flight; the RTT is base + queue.
    fn run(rate: f64, base: Duration, steps: usize) -> (Window, Vec<Duration>) {
        let t0 = Instant::now();
        let mut w = Window::new(MAX, t0, 0);
        // The handshake's round trip: nothing queued yet.
        w.observe(t0, base, 0);
        let mut sent = 0u64;
        let mut rtts = Vec::new();
        let tick = Duration::from_millis(50);
        for i in 1..=steps * 4 {
            let now = t0 + tick * u32::try_from(i).unwrap();
            let bdp = rate * base.as_secs_f64();
            let queue_bytes = (w.window as f64 - bdp).max(0.0);
            let rtt = base + Duration::from_secs_f64(queue_bytes / rate);
            // Window-limited below the BDP, link-limited above it.
            let send_rate = (w.window as f64 / rtt.as_secs_f64()).min(rate);
            sent += (send_rate * tick.as_secs_f64()) as u64;
            w.observe(now, rtt, sent);
            rtts.push(rtt);
        }
        (w, rtts)
    }

    #[test]
    fn a_satellite_hop_settles_near_its_bdp_plus_the_target() {
        let rate = 2_000_000.0 / 8.0;
        let base = Duration::from_millis(600);
        let (w, rtts) = run(rate, base, 200);
        let bdp = rate * base.as_secs_f64();
        let settled = &rtts[rtts.len() - 100..];
        let worst = settled.iter().max().unwrap();
        assert!(
            *worst <= base + QUEUE_TARGET * 2,
            "queueing {worst:?} over a {base:?} base"
        );
        // Never so small that the link idles for long.
        assert!(
            w.window as f64 >= bdp * 0.8,
            "window {} < BDP {bdp}",
            w.window
        );
    }

    #[test]
    fn a_fast_radio_link_keeps_a_large_window() {
        let rate = 50_000_000.0 / 8.0;
        let (w, _) = run(rate, Duration::from_millis(10), 100);
        assert!(w.window as f64 >= rate * 0.010, "window {}", w.window);
    }

    #[test]
    fn a_long_queue_shrinks_the_window_to_the_bdp() {
        let t0 = Instant::now();
        let mut w = Window::new(250_000, t0, 0);
        assert_eq!(w.observe(t0, Duration::from_millis(600), 0), None);
        // 250 kB/s measured while the round trip is 1.6 s: 250 kB/s ×
        // 0.6 s.
        let now = t0 + STEP;
        let v = w
            .observe(now, Duration::from_millis(1600), 50_000)
            .expect("shrinks");
        assert!((149_000..=150_000).contains(&v), "{v}");
        // Still long a step later: held for a round trip.
        assert_eq!(
            w.observe(now + STEP, Duration::from_millis(1500), 100_000),
            None
        );
        // Within the band: holds.
        assert_eq!(
            w.observe(now + STEP * 2, Duration::from_millis(675), 150_000),
            None
        );
        // Back near the base: grows by a quarter.
        let got = w.observe(now + STEP * 3, Duration::from_millis(610), 200_000);
        assert_eq!(got, Some(v + v / 4));
    }

    #[test]
    fn a_shrink_at_most_halves_the_window() {
        let t0 = Instant::now();
        let mut w = Window::new(MAX, t0, 0);
        w.observe(t0, Duration::from_millis(600), 0);
        // Almost nothing sent (the window is waiting for acks): halved only.
        let got = w.observe(t0 + STEP, Duration::from_millis(1600), 1000);
        assert_eq!(got, Some(MAX / 2));
    }

    #[test]
    fn old_minima_expire() {
        let t0 = Instant::now();
        let mut w = Window::new(MAX, t0, 0);
        w.observe(t0, Duration::from_millis(20), 0);
        let later = t0 + BASE_RTT_WINDOW / 2;
        w.observe(later, Duration::from_millis(300), 0);
        assert_eq!(w.base_rtt(), Some(Duration::from_millis(20)));
        w.observe(later + BASE_RTT_WINDOW / 2, Duration::from_millis(300), 0);
        assert_eq!(w.base_rtt(), Some(Duration::from_millis(300)));
    }

    proptest! {
        /// Whatever it observes, the window stays within its bounds and
        /// changes at most once per step.
        #[test]
        fn the_window_stays_in_bounds(
            obs in prop::collection::vec((1u64..3000, 0u64..2_000_000), 1..300),
        ) {
            let t0 = Instant::now();
            let mut w = Window::new(MAX, t0, 0);
            let (mut sent, mut last_change) = (0u64, None::<Instant>);
            for (i, (rtt_ms, bytes)) in obs.into_iter().enumerate() {
                let now = t0 + Duration::from_millis(50) * u32::try_from(i + 1).unwrap();
                sent += bytes;
                if let Some(v) = w.observe(now, Duration::from_millis(rtt_ms), sent) {
                    prop_assert!((MIN_WINDOW..=MAX).contains(&v));
                    prop_assert!(last_change.is_none_or(|t| now - t >= STEP));
                    last_change = Some(now);
                }
            }
        }
    }
}
