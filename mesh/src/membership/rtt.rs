//! Per-member round-trip estimate and the probe timeout derived from it.
//!
//! A fixed probe timeout is wrong on every link but one: on a satellite hop
//! (600 ms round trip) a 500 ms timeout fails every direct probe, while on a
//! LAN it waits 100 times longer than needed. Like TCP's retransmission
//! timer (RFC 6298), each member keeps a smoothed round trip `srtt` and its
//! mean deviation `rttvar`, fed by the acks of our own pings to it (each
//! ping has its own sequence number, so no sample is ambiguous: Karn's rule
//! holds by construction), and the timeout is `srtt + 4 * rttvar`, clamped.

use std::time::Duration;

/// Longest probe timeout an RTT estimate can ask for. A member whose acks
/// take longer than this is, for failure detection, on a broken link: past
/// it, waiting longer only delays detecting a rack that is really gone.
/// 3 s is five satellite round trips, room for a full satellite queue.
pub const PROBE_TIMEOUT_CEILING: Duration = Duration::from_secs(3);

/// Shortest time one leg of an indirect probe is given, whatever the
/// estimate says: below a tick (~100 ms) the core cannot act on it anyway.
pub const LEG_TIMEOUT_FLOOR: Duration = Duration::from_millis(100);

/// RFC 6298's gains: `alpha = 1/8` for `srtt`, `beta = 1/4` for `rttvar`,
/// and `K = 4` deviations of margin.
const ALPHA_DIV: u32 = 8;
const BETA_DIV: u32 = 4;
const K: u32 = 4;

/// Smoothed round trip and its variation for one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RttEstimate {
    /// Smoothed round trip.
    pub srtt: Duration,
    /// Smoothed mean deviation of the round trip.
    pub rttvar: Duration,
}

impl RttEstimate {
    /// The estimate after one more sample (RFC 6298 section 2).
    pub fn update(prev: Option<Self>, sample: Duration) -> Self {
        let sample = sample.min(super::MAX_TIMER);
        match prev {
            None => Self {
                srtt: sample,
                rttvar: sample / 2,
            },
            Some(e) => {
                let dev = e.srtt.abs_diff(sample);
                Self {
                    rttvar: e.rttvar - e.rttvar / BETA_DIV + dev / BETA_DIV,
                    srtt: e.srtt - e.srtt / ALPHA_DIV + sample / ALPHA_DIV,
                }
            }
        }
    }

    /// `srtt + 4 * rttvar`, unclamped.
    pub fn raw_timeout(&self) -> Duration {
        self.srtt.saturating_add(self.rttvar.saturating_mul(K))
    }
}

/// The direct probe timeout for a member: the estimate's timeout within
/// `[floor, max(floor, PROBE_TIMEOUT_CEILING)]`, or `floor` (the configured
/// `probe_timeout`) while nothing is measured yet.
pub fn probe_timeout(estimate: Option<RttEstimate>, floor: Duration) -> Duration {
    match estimate {
        None => floor,
        Some(e) => e
            .raw_timeout()
            .clamp(floor, floor.max(PROBE_TIMEOUT_CEILING)),
    }
}

/// The time one leg of an indirect probe (us to an intermediary, or, as our
/// best guess for it, the intermediary to the target) is given: the
/// estimate's timeout within `[LEG_TIMEOUT_FLOOR, PROBE_TIMEOUT_CEILING]`,
/// or `unknown` (the configured `probe_timeout`) while nothing is measured.
/// No configured floor here: on a LAN the indirect phase then ends with the
/// probe interval, as in plain SWIM.
pub fn leg_timeout(estimate: Option<RttEstimate>, unknown: Duration) -> Duration {
    match estimate {
        None => unknown,
        Some(e) => e
            .raw_timeout()
            .clamp(LEG_TIMEOUT_FLOOR, PROBE_TIMEOUT_CEILING),
    }
}
