//! Link profiles: what one direction of an emulated link does to packets.
//!
//! A profile is written as a name, optionally followed by overrides:
//! `radio-poor`, `radio-poor,loss=5%`, `satellite,rate=5Mbit,queue=1s`,
//! `radio-good,fade=2s/10s`. The keys are:
//!
//! | key | value | meaning |
//! |---|---|---|
//! | `rate` | `10Mbit`, `500kbit`, `1Gbit` (`/s` optional) | serialisation rate |
//! | `delay` | `20ms`, `1.5s`, `300us` | mean one-way propagation delay |
//! | `jitter` | `10ms` | delay varies within `delay ± jitter` |
//! | `loss` | `2%` or `0.02` | long-run fraction of transmitted packets lost |
//! | `burst` | `3` | mean loss burst, in packets; `1` = independent losses |
//! | `queue` | `100ms` | bottleneck queue, in time at `rate` |
//! | `fade` | `20s/120s` or `off` | link down for 20 s out of every 120 s |
//! | `reorder` | `true` / `false` | let a packet with less jitter overtake |

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The named profiles, in the order of the table in the README.
pub const PROFILE_NAMES: [&str; 6] = [
    "lan",
    "radio-good",
    "radio-poor",
    "lossy",
    "satellite",
    "fading",
];

/// How transmitted packets get lost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Loss {
    /// Nothing is lost.
    None,
    /// Each packet is lost independently with this probability.
    Random { ratio: f64 },
    /// Gilbert–Elliott with a loss-free good state and an all-loss bad state:
    /// losses come in bursts of geometric length with mean `mean_burst`
    /// packets, and `ratio` of all packets are lost in the long run.
    Bursty { ratio: f64, mean_burst: f64 },
}

impl Loss {
    /// The long-run loss ratio.
    pub fn ratio(&self) -> f64 {
        match *self {
            Loss::None => 0.0,
            Loss::Random { ratio } | Loss::Bursty { ratio, .. } => ratio,
        }
    }

    /// Mean burst length in packets (1 for independent losses).
    pub fn mean_burst(&self) -> f64 {
        match *self {
            Loss::Bursty { mean_burst, .. } => mean_burst,
            _ => 1.0,
        }
    }

    fn with(ratio: f64, mean_burst: f64) -> Loss {
        if ratio == 0.0 {
            Loss::None
        } else if mean_burst <= 1.0 {
            Loss::Random { ratio }
        } else {
            Loss::Bursty { ratio, mean_burst }
        }
    }
}

/// Scheduled fades: the link is down for `down` at the end of every
/// `every`, so a link starts up, first goes down at `every - down`, and is
/// back at `every`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fade {
    pub down: Duration,
    pub every: Duration,
}

impl Fade {
    /// Whether the link is in a scheduled fade at `now` (time since the
    /// emulator started).
    pub fn is_down(&self, now: Duration) -> bool {
        let phase = now.as_nanos() % self.every.as_nanos();
        phase >= (self.every - self.down).as_nanos()
    }
}

/// One direction of a link.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// Serialisation rate, bits per second.
    pub rate_bps: u64,
    /// Mean one-way delay added after serialisation.
    pub delay: Duration,
    /// Half-width of the delay's range: delays stay in `delay ± jitter`.
    pub jitter: Duration,
    pub loss: Loss,
    /// Most time a packet may wait for the link (tail drop beyond it). In
    /// time rather than bytes so one value suits every rate; in bytes it is
    /// `queue × rate / 8`.
    pub queue: Duration,
    pub fade: Option<Fade>,
    /// If false (the default) a packet never overtakes an earlier one.
    pub reorder: bool,
}

const MBIT: u64 = 1_000_000;

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

impl Profile {
    /// The named profile, without overrides.
    pub fn named(name: &str) -> Option<Profile> {
        let base = Profile {
            rate_bps: 0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: Loss::None,
            queue: ms(50),
            fade: None,
            reorder: false,
        };
        Some(match name {
            "lan" => Profile {
                rate_bps: 1000 * MBIT,
                delay: Duration::from_micros(100),
                queue: ms(5),
                ..base
            },
            "radio-good" => Profile {
                rate_bps: 50 * MBIT,
                delay: ms(5),
                jitter: ms(2),
                loss: Loss::Random { ratio: 0.001 },
                ..base
            },
            "radio-poor" => Profile {
                rate_bps: 10 * MBIT,
                delay: ms(20),
                jitter: ms(10),
                loss: Loss::Bursty {
                    ratio: 0.02,
                    mean_burst: 3.0,
                },
                queue: ms(100),
                ..base
            },
            "lossy" => Profile {
                rate_bps: 20 * MBIT,
                delay: ms(15),
                loss: Loss::Random { ratio: 0.05 },
                ..base
            },
            "satellite" => Profile {
                rate_bps: 2 * MBIT,
                delay: ms(300),
                loss: Loss::Random { ratio: 0.01 },
                queue: ms(500),
                ..base
            },
            "fading" => Profile {
                fade: Some(Fade {
                    down: Duration::from_secs(20),
                    every: Duration::from_secs(120),
                }),
                ..Profile::named("radio-good")?
            },
            _ => return None,
        })
    }

    /// Time to serialise `len` bytes at this profile's rate.
    pub fn tx_time(&self, len: usize) -> Duration {
        let nanos = (len as u128 * 8 * 1_000_000_000).div_ceil(self.rate_bps as u128);
        Duration::from_nanos(nanos.min(u64::MAX as u128) as u64)
    }

    fn set(&mut self, key: &str, value: &str) -> Result<(), ProfileError> {
        let bad = |reason: &str| ProfileError::BadValue {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        match key {
            "rate" => self.rate_bps = parse_rate(value).map_err(bad)?,
            "delay" => self.delay = parse_duration(value).map_err(bad)?,
            "jitter" => self.jitter = parse_duration(value).map_err(bad)?,
            "queue" => self.queue = parse_duration(value).map_err(bad)?,
            "loss" => {
                let ratio = parse_ratio(value).map_err(bad)?;
                self.loss = Loss::with(ratio, self.loss.mean_burst());
            }
            "burst" => {
                let burst: f64 = value.parse().map_err(|_| bad("not a number"))?;
                if !(burst.is_finite() && burst >= 1.0) {
                    return Err(bad("a mean burst is at least 1 packet"));
                }
                self.loss = Loss::with(self.loss.ratio(), burst);
            }
            "fade" => {
                self.fade = if value == "off" {
                    None
                } else {
                    let (down, every) = value
                        .split_once('/')
                        .ok_or_else(|| bad("expected DOWN/EVERY, e.g. 20s/120s, or off"))?;
                    Some(Fade {
                        down: parse_duration(down).map_err(bad)?,
                        every: parse_duration(every).map_err(bad)?,
                    })
                }
            }
            "reorder" => self.reorder = value.parse().map_err(|_| bad("expected true or false"))?,
            _ => return Err(ProfileError::UnknownKey(key.to_owned())),
        }
        Ok(())
    }

    /// This profile's rate and queue with `delay`, and no jitter, loss or
    /// fades: the reference `measure::path_latency` measures.
    pub fn bare(&self, delay: Duration) -> Profile {
        Profile {
            delay,
            jitter: Duration::ZERO,
            loss: Loss::None,
            fade: None,
            ..self.clone()
        }
    }

    fn validate(&self) -> Result<(), ProfileError> {
        let invalid =
            |key: &'static str, reason: &'static str| ProfileError::Invalid { key, reason };
        if self.rate_bps == 0 {
            return Err(invalid("rate", "must be above zero"));
        }
        if self.jitter > self.delay {
            return Err(invalid("jitter", "must not exceed `delay`"));
        }
        if self.queue.is_zero() {
            return Err(invalid("queue", "must be above zero"));
        }
        if let Some(fade) = self.fade {
            if fade.down.is_zero() || fade.down >= fade.every {
                return Err(invalid("fade", "DOWN must be above zero and below EVERY"));
            }
        }
        Ok(())
    }
}

impl FromStr for Profile {
    type Err = ProfileError;

    fn from_str(s: &str) -> Result<Profile, ProfileError> {
        let mut parts = s.split(',').map(str::trim);
        let name = parts.next().unwrap_or_default();
        let mut profile =
            Profile::named(name).ok_or_else(|| ProfileError::UnknownProfile(name.to_owned()))?;
        for part in parts {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| ProfileError::NotKeyValue(part.to_owned()))?;
            profile.set(key.trim(), value.trim())?;
        }
        profile.validate()?;
        Ok(profile)
    }
}

impl Profile {
    /// Every field as an override of `lan`: parses back to an equal profile.
    pub fn spec(&self) -> String {
        let fade = match self.fade {
            Some(fade) => format!("{}us/{}us", fade.down.as_micros(), fade.every.as_micros()),
            None => "off".to_owned(),
        };
        format!(
            "lan,rate={}bit,delay={}us,jitter={}us,loss={},burst={},queue={}us,fade={fade},reorder={}",
            self.rate_bps,
            self.delay.as_micros(),
            self.jitter.as_micros(),
            self.loss.ratio(),
            self.loss.mean_burst(),
            self.queue.as_micros(),
            self.reorder,
        )
    }
}

/// For people: `10 Mbit/s, 20 ms ± 10 ms, loss 2 % in bursts of 3, queue
/// 100 ms, no fades`.
impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} Mbit/s, {:?} ± {:?}, ",
            self.rate_bps as f64 / 1e6,
            self.delay,
            self.jitter
        )?;
        match self.loss {
            Loss::None => f.write_str("no loss")?,
            Loss::Random { ratio } => write!(f, "loss {} %", ratio * 100.0)?,
            Loss::Bursty { ratio, mean_burst } => {
                write!(f, "loss {} % in bursts of {mean_burst}", ratio * 100.0)?
            }
        }
        write!(f, ", queue {:?}, ", self.queue)?;
        match self.fade {
            Some(fade) => write!(f, "down {:?} every {:?}", fade.down, fade.every)?,
            None => f.write_str("no fades")?,
        }
        if self.reorder {
            f.write_str(", may reorder")?;
        }
        Ok(())
    }
}

/// Why a profile string was refused; each names the offending key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("unknown link profile {0:?} (known: {list})", list = PROFILE_NAMES.join(", "))]
    UnknownProfile(String),
    #[error("unknown link profile key {0:?} (known: rate, delay, jitter, loss, burst, queue, fade, reorder)")]
    UnknownKey(String),
    #[error("link profile override {0:?} is not KEY=VALUE")]
    NotKeyValue(String),
    #[error("invalid link profile `{key}` = {value:?}: {reason}")]
    BadValue {
        key: String,
        value: String,
        reason: String,
    },
    #[error("invalid link profile `{key}`: {reason}")]
    Invalid {
        key: &'static str,
        reason: &'static str,
    },
}

/// `20ms`, `1.5s`, `300us`, `0`.
fn parse_duration(s: &str) -> Result<Duration, &'static str> {
    let (number, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if s == "0" {
        (s, 1.0)
    } else {
        return Err("expected a duration such as 20ms, 1.5s or 300us");
    };
    let value: f64 = number.trim().parse().map_err(|_| "not a number")?;
    if !(value.is_finite() && value >= 0.0) {
        return Err("must be a finite, non-negative duration");
    }
    Duration::try_from_secs_f64(value * scale).map_err(|_| "duration out of range")
}

/// `10Mbit`, `10Mbit/s`, `500kbit`, `1Gbit`, `64000bit`.
fn parse_rate(s: &str) -> Result<u64, &'static str> {
    let lower = s.to_ascii_lowercase();
    let bits = lower.strip_suffix("/s").unwrap_or(&lower);
    let bits = bits
        .strip_suffix("bit")
        .ok_or("expected a rate such as 10Mbit, 500kbit or 1Gbit")?;
    let (number, scale) = match bits.chars().last() {
        Some('k') => (&bits[..bits.len() - 1], 1e3),
        Some('m') => (&bits[..bits.len() - 1], 1e6),
        Some('g') => (&bits[..bits.len() - 1], 1e9),
        _ => (bits, 1.0),
    };
    let value: f64 = number.trim().parse().map_err(|_| "not a number")?;
    let bps = value * scale;
    if !(1.0..=1e12).contains(&bps) {
        return Err("must be between 1 bit/s and 1 Tbit/s");
    }
    Ok(bps.round() as u64)
}

/// `2%` or `0.02`, below 1.
fn parse_ratio(s: &str) -> Result<f64, &'static str> {
    let ratio = match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map_err(|_| "not a number")? / 100.0,
        None => s.parse::<f64>().map_err(|_| "not a number")?,
    };
    if !(0.0..1.0).contains(&ratio) {
        return Err("must be at least 0 and below 100%");
    }
    Ok(ratio)
}

/// The profiles of both directions of a link between racks `a` and `b`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkProfile {
    pub a_to_b: Profile,
    pub b_to_a: Profile,
}

impl LinkProfile {
    /// The same profile both ways.
    pub fn symmetric(profile: Profile) -> LinkProfile {
        LinkProfile {
            a_to_b: profile.clone(),
            b_to_a: profile,
        }
    }

    /// Different profiles per direction (an uplink slower than its downlink,
    /// say).
    pub fn asymmetric(a_to_b: Profile, b_to_a: Profile) -> LinkProfile {
        LinkProfile { a_to_b, b_to_a }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_named_profile_matches_the_table() {
        let rows = [
            ("lan", 1000, 0.1, 0.0, 0.0),
            ("radio-good", 50, 5.0, 2.0, 0.001),
            ("radio-poor", 10, 20.0, 10.0, 0.02),
            ("lossy", 20, 15.0, 0.0, 0.05),
            ("satellite", 2, 300.0, 0.0, 0.01),
            ("fading", 50, 5.0, 2.0, 0.001),
        ];
        for (name, mbit, delay_ms, jitter_ms, loss) in rows {
            let p: Profile = name.parse().unwrap();
            assert_eq!(p.rate_bps, mbit * MBIT, "{name}");
            assert_eq!(p.delay.as_secs_f64() * 1e3, delay_ms, "{name}");
            assert_eq!(p.jitter.as_secs_f64() * 1e3, jitter_ms, "{name}");
            assert_eq!(p.loss.ratio(), loss, "{name}");
            assert_eq!(p.fade.is_some(), name == "fading", "{name}");
        }
        assert!(matches!(
            Profile::named("radio-poor").unwrap().loss,
            Loss::Bursty { .. }
        ));
        assert_eq!(
            Profile::named("fading").unwrap().fade,
            Some(Fade {
                down: Duration::from_secs(20),
                every: Duration::from_secs(120)
            })
        );
        assert_eq!(PROFILE_NAMES.len(), rows.len());
    }

    #[test]
    fn overrides_change_only_their_key() {
        let p: Profile = "radio-poor,loss=5%".parse().unwrap();
        assert_eq!(
            p.loss,
            Loss::Bursty {
                ratio: 0.05,
                mean_burst: 3.0
            }
        );
        assert_eq!(p.rate_bps, 10 * MBIT);
        let p: Profile = "satellite, rate=5Mbit/s, queue=1s, fade=2s/10s, burst=4"
            .parse()
            .unwrap();
        assert_eq!(p.rate_bps, 5 * MBIT);
        assert_eq!(p.queue, Duration::from_secs(1));
        assert_eq!(
            p.loss,
            Loss::Bursty {
                ratio: 0.01,
                mean_burst: 4.0
            }
        );
        assert_eq!(p.fade.unwrap().down, Duration::from_secs(2));
        let p: Profile = "lossy,loss=0,rate=1.5Gbit,delay=300us".parse().unwrap();
        assert_eq!(p.loss, Loss::None);
        assert_eq!(p.rate_bps, 1_500_000_000);
        assert_eq!(p.delay, Duration::from_micros(300));
        let p: Profile = "fading,fade=off,burst=1".parse().unwrap();
        assert_eq!(p.fade, None);
        assert_eq!(p.loss, Loss::Random { ratio: 0.001 });
    }

    #[test]
    fn errors_name_the_key() {
        let err = |s: &str| s.parse::<Profile>().unwrap_err().to_string();
        assert!(err("dialup").contains("unknown link profile \"dialup\""));
        assert!(err("lan,speed=1Mbit").contains("\"speed\""));
        assert!(err("lan,loss").contains("not KEY=VALUE"));
        assert!(err("lan,loss=100%").contains("`loss`"));
        assert!(err("lan,rate=fast").contains("`rate`"));
        assert!(err("lan,rate=0bit").contains("`rate`"));
        assert!(err("lan,delay=5").contains("`delay`"));
        assert!(err("lan,jitter=1ms").contains("`jitter`: must not exceed `delay`"));
        assert!(err("lan,fade=20s/10s").contains("`fade`"));
        assert!(err("lan,fade=20s").contains("`fade`"));
        assert!(err("lan,burst=0.5").contains("`burst`"));
        assert!(err("lan,reorder=maybe").contains("`reorder`"));
    }

    #[test]
    fn display_is_for_people() {
        assert_eq!(
            profile_named("radio-poor").to_string(),
            "10 Mbit/s, 20ms ± 10ms, loss 2 % in bursts of 3, queue 100ms, no fades"
        );
        assert_eq!(
            profile_named("fading").to_string(),
            "50 Mbit/s, 5ms ± 2ms, loss 0.1 %, queue 50ms, down 20s every 120s"
        );
    }

    fn profile_named(name: &str) -> Profile {
        Profile::named(name).unwrap()
    }

    #[test]
    fn fade_schedule_starts_up() {
        let fade = Fade {
            down: Duration::from_secs(20),
            every: Duration::from_secs(120),
        };
        let secs = |s: u64| Duration::from_secs(s);
        assert!(!fade.is_down(secs(0)));
        assert!(!fade.is_down(Duration::from_millis(99_999)));
        assert!(fade.is_down(secs(100)));
        assert!(fade.is_down(Duration::from_millis(119_999)));
        assert!(!fade.is_down(secs(120)));
        assert!(fade.is_down(secs(230)));
    }

    proptest! {
        #[test]
        fn spec_parses_back(
            name in proptest::sample::select(PROFILE_NAMES.to_vec()),
            loss_permille in 0u32..999,
            burst in 1u32..20,
            rate_kbit in 1u64..10_000_000,
            reorder: bool,
        ) {
            let p: Profile = format!(
                "{name},loss={}%,burst={burst},rate={rate_kbit}kbit,reorder={reorder}",
                loss_permille as f64 / 10.0
            ).parse().unwrap();
            let back: Profile = p.spec().parse().unwrap();
            prop_assert_eq!(back, p);
        }
    }
}
