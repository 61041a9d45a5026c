//! When a bulk connection went silent (a radio fade) and when to probe for
//! the link's return: a sans-IO rule over the datagrams the connection
//! received, time injected.
//!
//! Why probe at all: while a link is down, QUIC's loss recovery backs off
//! exponentially (RFC 9002's PTO doubles with every unanswered probe), so
//! after a fade of `d` seconds the sender's next probe may come up to about
//! `d` seconds after the link's return, and nothing the receiver sends can
//! make it come sooner (only an acknowledgement of a new packet does, and
//! the stalled sender sends none; a PING of its own is held back by its
//! full congestion window). A new connection's first packet leaves at
//! once. So while a connection hears nothing, the plane dials small probe
//! connections to the peer on a short period; the first that completes
//! proves the link is back and replaces the stalled connection, and the
//! transfers cut with it resume on the new one (a replica keeps whatever
//! whole frames arrived).

use std::time::{Duration, Instant};

/// A connection that sent something its peer must acknowledge (stream
/// data, a PING, flow-control credit) and then heard nothing at all for
/// this long is silent: a fade. Every live peer acknowledges within a
/// round trip plus its acknowledgement delay (25 ms), so one second is
/// several round trips of every radio profile; the satellite hop's round
/// trip, longer under load, stretches it to [`silence_after`]'s two round
/// trips. Shorter would probe on every loss burst, longer would leave the
/// backed-off recovery in charge for longer. A connection with nothing
/// outstanding (a transfer that ended, a replica syncing before its
/// answer, an idle link between keep-alives) is never silent, however
/// long it hears nothing: its peer owes it no packet.
pub const SILENCE: Duration = Duration::from_secs(1);

/// How long a connection with round trip `rtt` may wait for its peer
/// before it is silent: [`SILENCE`], or two round trips if longer.
#[must_use]
pub fn silence_after(rtt: Duration) -> Duration {
    SILENCE.max(rtt * 2)
}

/// Period of probe dials while silent: the link's return is noticed about
/// this long after it happens (one check of the plane, 100 ms), plus one
/// round trip. Each probe is one QUIC Initial (1200 bytes), so ten a
/// second cost 12 kB/s while the link is down.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Probe dials in flight at once per connection: a probe whose Initial
/// was lost to the fade is useless (its retransmission comes only after
/// QUIC's initial PTO), so older probes are abandoned after
/// [`probe_timeout`] (at least 1 s); ten cover that second at
/// [`PROBE_INTERVAL`] and bound the handshakes one fade costs the peer
/// when the link returns.
pub const MAX_PROBES: usize = 10;

/// How long one probe dial may take: a few round trips of the connection
/// as last measured (the satellite hop's handshake takes one round trip
/// and more under load), at least one second.
#[must_use]
pub fn probe_timeout(rtt: Duration) -> Duration {
    (rtt * 4).clamp(Duration::from_secs(1), super::plane::HANDSHAKE_TIMEOUT)
}

/// What one connection counted, as the plane reads it on each check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Datagrams received in all.
    pub rx: u64,
    /// Frames sent in all that the peer must acknowledge (stream data,
    /// PING, flow-control credit, resets).
    pub eliciting: u64,
}

impl Counts {
    /// The counts of `stats`.
    #[must_use]
    pub fn of(stats: &quinn::ConnectionStats) -> Self {
        let f = &stats.frame_tx;
        Self {
            rx: stats.udp_rx.datagrams,
            // PMTU probes are PINGs, but one lost (too large) is never
            // answered and is no sign of a fade.
            eliciting: f.stream
                + f.ping.saturating_sub(stats.path.sent_plpmtud_probes)
                + f.max_data
                + f.max_stream_data
                + f.reset_stream
                + f.stop_sending,
        }
    }
}

/// What the plane should do after an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The connection hears its peer, or owes it nothing: nothing.
    Live,
    /// Silent, but a probe is not due (period or bound).
    Silent,
    /// Silent: dial a probe now.
    Probe,
}

/// The silence state of one connection.
#[derive(Debug, Clone)]
pub struct Silence {
    /// The counts as last observed.
    last: Counts,
    /// When the received count last grew.
    heard_at: Instant,
    /// Since when the connection has waited for an answer: the first
    /// observation that found eliciting frames sent since it last heard
    /// its peer (None: nothing outstanding).
    waiting_since: Option<Instant>,
    /// When the last probe was started (while silent).
    probed_at: Option<Instant>,
}

impl Silence {
    /// A connection first observed at `now` with `counts`.
    #[must_use]
    pub fn new(now: Instant, counts: Counts) -> Self {
        Self {
            last: counts,
            heard_at: now,
            waiting_since: None,
            probed_at: None,
        }
    }

    /// Whether the connection has heard nothing from its peer for
    /// [`SILENCE`], whatever it owes: a connection the peer replaces by a
    /// new one of its own when both exist (the peer dialled because its
    /// side stalled, or lost it).
    #[must_use]
    pub fn is_deaf(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.heard_at) >= SILENCE
    }

    /// Whether the connection is silent now: it has waited for its peer
    /// for [`silence_after`] `rtt` and heard nothing.
    #[must_use]
    pub fn is_silent(&self, now: Instant, rtt: Duration) -> bool {
        self.waiting_since
            .is_some_and(|t| now.saturating_duration_since(t) >= silence_after(rtt))
    }

    /// Observe the connection's `counts` and round trip `rtt` at `now`,
    /// with `probes` probe dials in flight.
    pub fn observe(
        &mut self,
        now: Instant,
        counts: Counts,
        rtt: Duration,
        probes: usize,
    ) -> Verdict {
        let heard = counts.rx != self.last.rx;
        let sent = counts.eliciting != self.last.eliciting;
        self.last = counts;
        if heard {
            // What it sent since the last check may have been answered by
            // what it heard (the end of a transfer): only frames sent in a
            // later check without an answer count. A sender cut off
            // mid-transfer still sends (the rest of its congestion window,
            // then loss-recovery probes), so a fade is found at most one
            // probe timeout later.
            self.heard_at = now;
            self.waiting_since = None;
            self.probed_at = None;
            return Verdict::Live;
        }
        if sent && self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
        if !self.is_silent(now, rtt) {
            return Verdict::Live;
        }
        let due = self
            .probed_at
            .is_none_or(|t| now.saturating_duration_since(t) >= PROBE_INTERVAL);
        if due && probes < MAX_PROBES {
            self.probed_at = Some(now);
            Verdict::Probe
        } else {
            Verdict::Silent
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const TICK: Duration = Duration::from_millis(100);
    const RTT: Duration = Duration::from_millis(20);

    fn counts(rx: u64, eliciting: u64) -> Counts {
        Counts { rx, eliciting }
    }

    /// Drives a transfer's sender (sends and hears every tick) for
    /// `busy_for`, then a fade (it retransmits, hears nothing) for
    /// `quiet_for`; returns the verdicts of the fade.
    fn fade_after(busy_for: Duration, quiet_for: Duration) -> Vec<Verdict> {
        let t0 = Instant::now();
        let mut s = Silence::new(t0, Counts::default());
        let (mut rx, mut tx) = (0, 0);
        let mut now = t0;
        while now < t0 + busy_for {
            now += TICK;
            rx += 20;
            tx += 40;
            assert_eq!(s.observe(now, counts(rx, tx), RTT, 0), Verdict::Live);
        }
        let quiet_from = now;
        let mut out = Vec::new();
        while now < quiet_from + quiet_for {
            now += TICK;
            tx += 1;
            out.push(s.observe(now, counts(rx, tx), RTT, 0));
        }
        out
    }

    #[test]
    fn a_sender_that_hears_nothing_probes_on_a_period() {
        let v = fade_after(Duration::from_secs(2), Duration::from_secs(2));
        // It waits from the fade's first check: ticks 1..10 are under
        // SILENCE from there, the 11th reaches it, then every tick.
        assert!(v[..10].iter().all(|x| *x == Verdict::Live), "{v:?}");
        assert!(v[10..].iter().all(|x| *x == Verdict::Probe), "{v:?}");
    }

    #[test]
    fn a_transfer_that_ends_is_not_silent() {
        // Its last data and their acknowledgements in one check, then
        // nothing either way for 10 s.
        let t0 = Instant::now();
        let mut s = Silence::new(t0, Counts::default());
        for i in 1..=100u32 {
            let c = if i <= 20 {
                counts(u64::from(i) * 20, u64::from(i) * 40)
            } else {
                counts(400, 800)
            };
            assert_eq!(
                s.observe(t0 + TICK * i, c, RTT, 0),
                Verdict::Live,
                "tick {i}"
            );
        }
    }

    #[test]
    fn a_connection_that_owes_nothing_never_probes() {
        // A transfer's receiver or a finished sender: acknowledged, then
        // nothing to say for 10 s; keep-alives every 2 s, answered.
        let t0 = Instant::now();
        let mut s = Silence::new(t0, Counts::default());
        let (mut rx, mut tx) = (0, 0);
        for i in 1..=100u32 {
            let now = t0 + TICK * i;
            if i % 20 == 0 {
                tx += 1; // a PING
            }
            if i % 20 == 1 && i > 1 {
                rx += 1; // its acknowledgement, a tick later
            }
            assert_eq!(
                s.observe(now, counts(rx, tx), RTT, 0),
                Verdict::Live,
                "tick {i}"
            );
            assert!(!s.is_silent(now, RTT));
        }
        assert!(s.is_deaf(t0 + TICK * 100));
    }

    #[test]
    fn a_long_round_trip_waits_longer() {
        let t0 = Instant::now();
        let rtt = Duration::from_millis(900);
        let mut s = Silence::new(t0, Counts::default());
        assert_eq!(s.observe(t0 + TICK, counts(0, 1), rtt, 0), Verdict::Live);
        let at = t0 + TICK + SILENCE;
        assert_eq!(s.observe(at, counts(0, 1), rtt, 0), Verdict::Live);
        assert_eq!(
            s.observe(t0 + TICK + rtt * 2, counts(0, 1), rtt, 0),
            Verdict::Probe
        );
    }

    #[test]
    fn probes_are_bounded_and_hearing_the_peer_ends_the_silence() {
        let t0 = Instant::now();
        let mut s = Silence::new(t0, Counts::default());
        let mut now = t0 + TICK;
        s.observe(now, counts(0, 5), RTT, 0);
        now += SILENCE;
        assert_eq!(s.observe(now, counts(0, 6), RTT, 0), Verdict::Probe);
        now += PROBE_INTERVAL;
        assert_eq!(
            s.observe(now, counts(0, 6), RTT, MAX_PROBES),
            Verdict::Silent
        );
        assert!(s.is_silent(now, RTT) && s.is_deaf(now));
        now += TICK;
        assert_eq!(s.observe(now, counts(1, 6), RTT, MAX_PROBES), Verdict::Live);
        assert!(!s.is_silent(now, RTT) && !s.is_deaf(now));
    }

    #[test]
    fn probe_timeouts_follow_the_round_trip_within_bounds() {
        assert_eq!(
            probe_timeout(Duration::from_millis(10)),
            Duration::from_secs(1)
        );
        assert_eq!(
            probe_timeout(Duration::from_millis(900)),
            Duration::from_millis(3600)
        );
        assert_eq!(
            probe_timeout(Duration::from_secs(60)),
            super::super::plane::HANDSHAKE_TIMEOUT
        );
        // Probes in flight cover the shortest timeout at the period.
        assert!(PROBE_INTERVAL * u32::try_from(MAX_PROBES).unwrap() >= Duration::from_secs(1));
    }

    proptest! {
        /// Whatever the traffic, a probe comes only after the connection
        /// sent something and then heard nothing for SILENCE, never twice
        /// within PROBE_INTERVAL, never beyond the bound.
        #[test]
        fn probes_only_in_silence(
            traffic in prop::collection::vec((0u64..30, 0u64..3), 1..200),
            inflight in prop::collection::vec(0usize..12, 200),
        ) {
            let t0 = Instant::now();
            let mut s = Silence::new(t0, Counts::default());
            let (mut rx, mut tx, mut heard, mut last_probe) = (0u64, 0u64, t0, None::<Instant>);
            let mut owed_since = None::<Instant>;
            for (i, (a, e)) in traffic.iter().enumerate() {
                let now = t0 + TICK * (u32::try_from(i).unwrap() + 1);
                rx += a;
                tx += e;
                if *a > 0 {
                    heard = now;
                    owed_since = None;
                } else if *e > 0 && owed_since.is_none() {
                    owed_since = Some(now);
                }
                if s.observe(now, counts(rx, tx), RTT, inflight[i]) == Verdict::Probe {
                    prop_assert!(now - heard >= SILENCE);
                    prop_assert!(owed_since.is_some_and(|t| now - t >= SILENCE));
                    prop_assert!(inflight[i] < MAX_PROBES);
                    prop_assert!(last_probe.is_none_or(|t| now - t >= PROBE_INTERVAL));
                    last_probe = Some(now);
                }
            }
        }
    }
}
