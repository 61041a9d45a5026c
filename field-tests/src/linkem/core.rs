//! The sans-IO model of one direction of an emulated link.
//!
//! [`DirectionCore::offer`] takes a packet's arrival time (time since the
//! emulator started: the caller owns the clock) and length, and answers when
//! to deliver it, or why it is dropped. Randomness comes from a seeded RNG,
//! so a run is reproducible from its seed and arrival sequence.
//!
//! A packet goes through four stages, in this order:
//! 1. **fade**: arriving while the link is down (scheduled, or forced with
//!    [`DirectionCore::set_down`]), it is lost; packets accepted before the
//!    fade began still arrive (at most a queue's and a delay's worth);
//! 2. **queue**: the link serialises one packet at a time at the profile's
//!    rate; a packet that would wait, with its own serialisation, longer
//!    than the profile's queue is tail-dropped (a packet finding the link
//!    idle is always taken, so a small queue never blackholes big packets);
//! 3. **loss**: a serialised packet is lost at random or in Gilbert–Elliott
//!    bursts; it used the link's time all the same, as on a radio;
//! 4. **delay**: it arrives `delay ± jitter` after its serialisation ends.
//!
//! Jitter without reordering: the delay is a function of time, `D(t)`,
//! linear between knots drawn uniformly from `delay ± jitter` every
//! `4 × jitter`. Its slope is at most ½, so `t + D(t)` never decreases and a
//! later packet never overtakes an earlier one, while the mean stays
//! `delay` whatever the packet rate (clamping independent samples would
//! raise the mean under load). Packets close in time see close delays, as
//! on a real radio. With `reorder` on, each packet draws its own delay and
//! may overtake.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::profile::{Loss, Profile};

/// What happens to an offered packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver at this time (since the emulator started).
    Deliver {
        at: Duration,
    },
    Drop(DropReason),
}

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The link was down (a fade) when it arrived.
    Fade,
    /// The queue was full.
    QueueFull,
    /// Lost in transmission (random or bursty loss).
    Loss,
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub offered: u64,
    pub delivered: u64,
    pub delivered_bytes: u64,
    pub dropped_fade: u64,
    pub dropped_queue: u64,
    pub dropped_loss: u64,
}

/// One direction of a link: see the module doc.
#[derive(Debug)]
pub struct DirectionCore {
    profile: Profile,
    rng: StdRng,
    /// When the link finishes serialising what it has accepted.
    busy_until: Duration,
    /// Latest delivery time handed out, so nothing is delivered before it.
    last_delivery: Duration,
    /// Latest arrival seen: time never goes back for the model.
    last_now: Duration,
    /// Gilbert–Elliott state: in the lossy burst.
    in_burst: bool,
    jitter: JitterCurve,
    forced_down: bool,
    counters: Counters,
}

impl DirectionCore {
    pub fn new(profile: Profile, seed: u64) -> DirectionCore {
        DirectionCore {
            jitter: JitterCurve::new(&profile),
            profile,
            rng: StdRng::seed_from_u64(seed),
            busy_until: Duration::ZERO,
            last_delivery: Duration::ZERO,
            last_now: Duration::ZERO,
            in_burst: false,
            forced_down: false,
            counters: Counters::default(),
        }
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Forces the link down (a fade on command) or lifts that; scheduled
    /// fades apply regardless.
    pub fn set_down(&mut self, down: bool) {
        self.forced_down = down;
    }

    /// Whether a packet arriving at `now` meets a fade.
    pub fn is_down(&self, now: Duration) -> bool {
        self.forced_down || self.profile.fade.is_some_and(|f| f.is_down(now))
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// How long a packet arriving at `now` would wait before its
    /// serialisation starts.
    pub fn backlog(&self, now: Duration) -> Duration {
        self.busy_until.saturating_sub(now)
    }

    /// Decides the fate of a `len`-byte packet arriving at `now`.
    pub fn offer(&mut self, now: Duration, len: usize) -> Verdict {
        let now = now.max(self.last_now);
        self.last_now = now;
        self.counters.offered += 1;
        let verdict = self.decide(now, len);
        match verdict {
            Verdict::Deliver { .. } => {
                self.counters.delivered += 1;
                self.counters.delivered_bytes += len as u64;
            }
            Verdict::Drop(DropReason::Fade) => self.counters.dropped_fade += 1,
            Verdict::Drop(DropReason::QueueFull) => self.counters.dropped_queue += 1,
            Verdict::Drop(DropReason::Loss) => self.counters.dropped_loss += 1,
        }
        verdict
    }

    fn decide(&mut self, now: Duration, len: usize) -> Verdict {
        if self.is_down(now) {
            return Verdict::Drop(DropReason::Fade);
        }
        let tx = self.profile.tx_time(len);
        let backlog = self.backlog(now);
        if !backlog.is_zero() && backlog + tx > self.profile.queue {
            return Verdict::Drop(DropReason::QueueFull);
        }
        let sent = now.max(self.busy_until) + tx;
        self.busy_until = sent;
        if self.lost() {
            return Verdict::Drop(DropReason::Loss);
        }
        let at = if self.profile.reorder {
            sent + self.jitter.independent(&mut self.rng)
        } else {
            let at = sent + self.jitter.at(sent, &mut self.rng);
            // The curve already keeps order; this guards rounding.
            let at = at.max(self.last_delivery);
            self.last_delivery = at;
            at
        };
        Verdict::Deliver { at }
    }

    /// One step of the loss process for a transmitted packet.
    fn lost(&mut self) -> bool {
        match self.profile.loss {
            Loss::None => false,
            Loss::Random { ratio } => self.rng.gen::<f64>() < ratio,
            Loss::Bursty { ratio, mean_burst } => {
                // Simple Gilbert: leave the burst with probability 1/B (so
                // bursts last B packets on average) and enter it with the
                // probability that makes the stationary share of burst
                // packets `ratio`: p / (p + r) = ratio.
                let leave = 1.0 / mean_burst;
                let enter = ratio * leave / (1.0 - ratio);
                let u: f64 = self.rng.gen();
                self.in_burst = if self.in_burst { u >= leave } else { u < enter };
                self.in_burst
            }
        }
    }
}

/// The time-varying delay `D(t)`: see the module doc.
#[derive(Debug)]
struct JitterCurve {
    delay: Duration,
    jitter: Duration,
    /// Distance between knots: `4 × jitter`.
    spacing: Duration,
    /// Index of the knot at or before the last time asked for, with its
    /// value and the next knot's (None before the first call).
    knots: Option<(u128, Duration, Duration)>,
}

impl JitterCurve {
    fn new(profile: &Profile) -> JitterCurve {
        JitterCurve {
            delay: profile.delay,
            jitter: profile.jitter,
            spacing: profile.jitter * 4,
            knots: None,
        }
    }

    /// A fresh sample of `delay ± jitter`, uniform.
    fn independent(&self, rng: &mut StdRng) -> Duration {
        if self.jitter.is_zero() {
            return self.delay;
        }
        let low = self.delay - self.jitter;
        low + self.jitter.mul_f64(2.0 * rng.gen::<f64>())
    }

    /// `D(t)` for a non-decreasing `t`.
    fn at(&mut self, t: Duration, rng: &mut StdRng) -> Duration {
        if self.jitter.is_zero() {
            return self.delay;
        }
        let spacing = self.spacing.as_nanos();
        let index = t.as_nanos() / spacing;
        let (left, right) = match self.knots {
            Some((k, left, right)) if k == index => (left, right),
            Some((k, _, right)) if k + 1 == index => (right, self.independent(rng)),
            _ => (self.independent(rng), self.independent(rng)),
        };
        self.knots = Some((index, left, right));
        let frac = (t.as_nanos() - index * spacing) as f64 / spacing as f64;
        if right >= left {
            left + (right - left).mul_f64(frac)
        } else {
            left - (left - right).mul_f64(frac)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linkem::profile::Fade;
    use proptest::prelude::*;

    fn profile(s: &str) -> Profile {
        s.parse().unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Offers `count` packets of `len` bytes every `gap`, returning the
    /// verdicts with their arrival times.
    fn run(
        core: &mut DirectionCore,
        count: usize,
        gap: Duration,
        len: usize,
    ) -> Vec<(Duration, Verdict)> {
        (0..count)
            .map(|i| {
                let now = gap * i as u32;
                (now, core.offer(now, len))
            })
            .collect()
    }

    #[test]
    fn a_saturated_link_delivers_at_its_rate() {
        for name in ["lan", "radio-good", "radio-poor", "lossy", "satellite"] {
            // Offered at twice the rate, no loss, so only the rate limits.
            let p = profile(&format!("{name},loss=0"));
            let len = 1200;
            let gap = p.tx_time(len) / 2;
            let mut core = DirectionCore::new(p.clone(), 1);
            let out = run(&mut core, 20_000, gap, len);
            let delivered: Vec<Duration> = out
                .iter()
                .filter_map(|(_, v)| match v {
                    Verdict::Deliver { at } => Some(*at),
                    _ => None,
                })
                .collect();
            let span = (*delivered.last().unwrap() - delivered[0]).as_secs_f64();
            let rate = ((delivered.len() - 1) * len * 8) as f64 / span;
            let ratio = rate / p.rate_bps as f64;
            assert!(
                (ratio - 1.0).abs() < 0.01,
                "{name}: delivered at {ratio} of the rate"
            );
            assert!(
                core.counters().dropped_queue > 0,
                "{name}: overload must drop"
            );
        }
    }

    #[test]
    fn the_delay_is_uniformish_around_the_mean_and_within_jitter() {
        let p = profile("radio-poor,loss=0");
        let mut core = DirectionCore::new(p.clone(), 7);
        let len = 100;
        let tx = p.tx_time(len);
        // Sparse: one packet every 7 ms for 10 minutes, never queued.
        let delays: Vec<f64> = run(&mut core, 85_000, ms(7), len)
            .into_iter()
            .map(|(now, v)| match v {
                Verdict::Deliver { at } => (at - now - tx).as_secs_f64() * 1e3,
                other => panic!("{other:?}"),
            })
            .collect();
        let mean = delays.iter().sum::<f64>() / delays.len() as f64;
        assert!((mean - 20.0).abs() < 0.2, "mean delay {mean} ms");
        let (min, max) = delays
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), d| (lo.min(*d), hi.max(*d)));
        assert!(min >= 10.0 - 1e-6 && max <= 30.0 + 1e-6, "{min}..{max}");
        // Uses most of the range, not just the middle.
        assert!(min < 12.0 && max > 28.0, "{min}..{max}");
        let spread = delays.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / delays.len() as f64;
        assert!(spread.sqrt() > 3.0, "delay std dev {} ms", spread.sqrt());
    }

    #[test]
    fn the_mean_delay_does_not_grow_with_the_packet_rate() {
        // 1 packet every 50 us (far closer than 2 × jitter), queue not used.
        let p = profile("radio-poor,loss=0,rate=1Gbit");
        let mut core = DirectionCore::new(p.clone(), 3);
        let len = 100;
        let tx = p.tx_time(len);
        let out = run(&mut core, 400_000, Duration::from_micros(50), len);
        let mean = out
            .iter()
            .map(|(now, v)| match v {
                Verdict::Deliver { at } => (*at - *now - tx).as_secs_f64(),
                other => panic!("{other:?}"),
            })
            .sum::<f64>()
            / out.len() as f64;
        assert!((mean * 1e3 - 20.0).abs() < 1.0, "mean {} ms", mean * 1e3);
    }

    #[test]
    fn reorder_lets_packets_overtake() {
        let p = profile("radio-poor,loss=0,reorder=true");
        let mut core = DirectionCore::new(p, 5);
        let out = run(&mut core, 1000, Duration::from_micros(500), 100);
        let ats: Vec<Duration> = out
            .iter()
            .filter_map(|(_, v)| match v {
                Verdict::Deliver { at } => Some(*at),
                _ => None,
            })
            .collect();
        assert!(ats.windows(2).any(|w| w[1] < w[0]));
    }

    fn loss_runs(p: Profile, n: usize, seed: u64) -> (f64, f64) {
        let mut core = DirectionCore::new(p.clone(), seed);
        let gap = p.tx_time(100) * 2;
        let lost: Vec<bool> = run(&mut core, n, gap, 100)
            .into_iter()
            .map(|(_, v)| v == Verdict::Drop(DropReason::Loss))
            .collect();
        let total = lost.iter().filter(|l| **l).count();
        let bursts = lost.windows(2).filter(|w| w[1] && !w[0]).count() + usize::from(lost[0]);
        (total as f64 / n as f64, total as f64 / bursts as f64)
    }

    #[test]
    fn random_loss_has_the_profiles_ratio() {
        for (name, ratio) in [("radio-good", 0.001), ("lossy", 0.05), ("satellite", 0.01)] {
            let (measured, burst) = loss_runs(profile(name), 2_000_000, 11);
            assert!(
                (measured / ratio - 1.0).abs() < 0.05,
                "{name}: loss {measured} vs {ratio}"
            );
            assert!(burst < 1.1, "{name}: random losses come alone ({burst})");
        }
    }

    #[test]
    fn gilbert_elliott_loss_has_the_ratio_and_burst_length() {
        for (spec, ratio, burst) in [
            ("radio-poor", 0.02, 3.0),
            ("lossy,burst=8", 0.05, 8.0),
            ("lan,loss=10%,burst=2", 0.10, 2.0),
        ] {
            let (measured, mean_burst) = loss_runs(profile(spec), 2_000_000, 13);
            assert!(
                (measured / ratio - 1.0).abs() < 0.05,
                "{spec}: loss {measured} vs {ratio}"
            );
            assert!(
                (mean_burst / burst - 1.0).abs() < 0.05,
                "{spec}: mean burst {mean_burst} vs {burst}"
            );
        }
    }

    #[test]
    fn scheduled_fades_drop_exactly_while_down() {
        let p = profile("radio-good,loss=0,fade=2s/10s");
        let mut core = DirectionCore::new(p, 1);
        for (now, v) in run(&mut core, 3000, ms(10), 100) {
            let phase = now.as_millis() % 10_000;
            let expected_down = phase >= 8_000;
            assert_eq!(
                v == Verdict::Drop(DropReason::Fade),
                expected_down,
                "at {now:?}: {v:?}"
            );
        }
    }

    #[test]
    fn a_fade_on_command_drops_until_lifted() {
        let mut core = DirectionCore::new(profile("satellite,loss=0"), 1);
        assert!(matches!(core.offer(ms(0), 100), Verdict::Deliver { .. }));
        core.set_down(true);
        assert_eq!(core.offer(ms(1000), 100), Verdict::Drop(DropReason::Fade));
        core.set_down(false);
        assert!(matches!(core.offer(ms(2000), 100), Verdict::Deliver { .. }));
        assert_eq!(core.counters().dropped_fade, 1);
        assert_eq!(core.counters().delivered, 2);
    }

    #[test]
    fn same_seed_same_fate() {
        let run_with = |seed| {
            let mut core = DirectionCore::new(profile("radio-poor"), seed);
            run(&mut core, 5000, Duration::from_micros(900), 1000)
        };
        assert_eq!(run_with(9), run_with(9));
        assert_ne!(run_with(9), run_with(10));
    }

    fn arbitrary_profile() -> impl Strategy<Value = Profile> {
        (
            1u64..2000,                                // rate, Mbit/s
            0u64..50_000,                              // delay, us
            0u64..=100,                                // jitter, % of delay
            0u32..300,                                 // loss, permille
            1u32..10,                                  // burst
            1u64..500,                                 // queue, ms
            proptest::option::of((1u64..5, 6u64..20)), // fade, s
        )
            .prop_map(|(mbit, delay, jitter, loss, burst, queue, fade)| Profile {
                rate_bps: mbit * 1_000_000,
                delay: Duration::from_micros(delay),
                jitter: Duration::from_micros(delay * jitter / 100),
                loss: match (loss, burst) {
                    (0, _) => Loss::None,
                    (l, 1) => Loss::Random {
                        ratio: l as f64 / 1000.0,
                    },
                    (l, b) => Loss::Bursty {
                        ratio: l as f64 / 1000.0,
                        mean_burst: b as f64,
                    },
                },
                queue: ms(queue),
                fade: fade.map(|(down, every)| Fade {
                    down: Duration::from_secs(down),
                    every: Duration::from_secs(every),
                }),
                reorder: false,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// No packet overtakes another, nothing arrives before its
        /// serialisation plus `delay - jitter`, nor after its queue wait
        /// plus serialisation plus `delay + jitter`, and the backlog never
        /// exceeds the queue (plus the one packet an idle link always takes).
        #[test]
        fn order_delay_and_queue_bounds_hold(
            p in arbitrary_profile(),
            arrivals in proptest::collection::vec((0u64..3000, 40usize..1500), 1..400),
            seed: u64,
        ) {
            let mut core = DirectionCore::new(p.clone(), seed);
            let mut now = Duration::ZERO;
            let mut last = Duration::ZERO;
            for (gap_us, len) in arrivals {
                now += Duration::from_micros(gap_us);
                let backlog = core.backlog(now);
                match core.offer(now, len) {
                    Verdict::Deliver { at } => {
                        prop_assert!(at >= last, "reordered: {at:?} < {last:?}");
                        last = at;
                        let tx = p.tx_time(len);
                        prop_assert!(at >= now + backlog + tx + p.delay - p.jitter);
                        // 1 us of slack for the curve's float rounding.
                        prop_assert!(
                            at <= now + backlog + tx + p.delay + p.jitter + Duration::from_micros(1)
                        );
                    }
                    Verdict::Drop(DropReason::QueueFull) => {
                        prop_assert!(!backlog.is_zero());
                        prop_assert!(backlog + p.tx_time(len) > p.queue);
                    }
                    Verdict::Drop(DropReason::Fade) => prop_assert!(core.is_down(now)),
                    Verdict::Drop(DropReason::Loss) => prop_assert!(p.loss != Loss::None),
                }
                prop_assert!(core.backlog(now) <= p.queue.max(p.tx_time(1500)));
            }
        }
    }
}
