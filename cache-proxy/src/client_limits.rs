//! Abuse limits per client: requests per second (a token bucket) and
//! `CONNECT` tunnel bytes per UTC day.
//!
//! A client is a [`ClientId`]: its key ([`crate::listener::client_key`]:
//! the IPv4 address, or the IPv6 /64) and, for a request another rack
//! forwarded to this one as a gateway, that rack. A gateway limits
//! forwarded clients with its own limits, so a client cannot multiply its
//! allowance by going through several racks without an uplink to one
//! gateway: each requesting rack's clients are counted apart (two racks'
//! clients may share addresses), and their sum at the gateway is bounded by
//! the gateway's fair share of forwarded slots
//! ([`crate::gateway::ForwardShares`]).
//!
//! The cores ([`TokenBuckets`], [`DailyBytes`]) are sans-IO: time and the
//! day are passed in. [`ClientLimits`] wraps them with a clock and a
//! mutex held only for a table update, never across an await.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::mesh::PeerId;

/// Clients tracked at once by each table. A relief site has a few hundred
/// devices; this leaves room for every rack's clients at a gateway while
/// bounding the memory an address-hopping client can make the proxy use
/// (~100 bytes a key, so ~7 MB a table at most).
pub const MAX_CLIENT_KEYS: usize = 65_536;

/// `Retry-After` of a tunnel refused for its client's daily bytes.
pub const TUNNEL_RETRY_AFTER_SECS: u64 = 3600;

/// Whose request this is: a client of this rack, or of the rack that
/// forwarded it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientId {
    /// The rack that forwarded the request to this one; `None` for this
    /// rack's own clients.
    pub rack: Option<PeerId>,
    /// The client's key ([`crate::listener::client_key`]).
    pub key: IpAddr,
}

impl ClientId {
    /// A client connected to this rack.
    pub fn local(ip: IpAddr) -> ClientId {
        ClientId {
            rack: None,
            key: crate::listener::client_key(ip),
        }
    }

    /// A client of `rack`, whose request `rack` forwarded to this one.
    pub fn forwarded(rack: &str, ip: IpAddr) -> ClientId {
        ClientId {
            rack: Some(rack.to_owned()),
            key: crate::listener::client_key(ip),
        }
    }
}

/// Token scale: a token is this many units, so refill is exact in integers.
const UNIT: u128 = 1_000_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Units left (at most `burst * UNIT`).
    units: u128,
    /// When `units` was computed.
    at: Duration,
}

/// Token buckets per key: `per_sec` tokens a second, at most `burst` held.
/// A new key starts full. At most `max_keys` are kept: when a new key
/// finds the table full, buckets that have refilled to full are dropped
/// (forgetting them changes nothing), else the least recently used eighth.
#[derive(Debug)]
pub struct TokenBuckets<K> {
    per_sec: u128,
    burst: u128,
    max_keys: usize,
    map: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Clone> TokenBuckets<K> {
    /// Buckets of `per_sec` tokens a second and `burst` tokens at most
    /// (both at least 1), for up to `max_keys` keys.
    pub fn new(per_sec: u32, burst: u32, max_keys: usize) -> Self {
        TokenBuckets {
            per_sec: u128::from(per_sec.max(1)),
            burst: u128::from(burst.max(1)),
            max_keys: max_keys.max(1),
            map: HashMap::new(),
        }
    }

    fn refilled(&self, b: Bucket, now: Duration) -> u128 {
        let dt = now.saturating_sub(b.at).as_nanos();
        let add = dt.saturating_mul(self.per_sec).saturating_mul(UNIT) / 1_000_000_000;
        b.units.saturating_add(add).min(self.burst * UNIT)
    }

    /// Takes one token for `key` at `now` (a monotonic time). `Err` holds
    /// how long until a token is there.
    ///
    /// # Errors
    /// The wait, when the bucket is empty.
    pub fn take(&mut self, key: &K, now: Duration) -> Result<(), Duration> {
        if !self.map.contains_key(key) && self.map.len() >= self.max_keys {
            self.make_room(now);
        }
        let full = Bucket {
            units: self.burst * UNIT,
            at: now,
        };
        let b = *self.map.get(key).unwrap_or(&full);
        let units = self.refilled(b, now);
        let at = now.max(b.at);
        if units >= UNIT {
            self.map.insert(
                key.clone(),
                Bucket {
                    units: units - UNIT,
                    at,
                },
            );
            Ok(())
        } else {
            self.map.insert(key.clone(), Bucket { units, at });
            let missing = UNIT - units;
            let nanos = (missing * 1_000_000_000).div_ceil(self.per_sec * UNIT);
            Err(Duration::from_nanos(
                u64::try_from(nanos).unwrap_or(u64::MAX),
            ))
        }
    }

    fn make_room(&mut self, now: Duration) {
        let cap = self.burst * UNIT;
        let per_sec = self.per_sec;
        self.map.retain(|_, b| {
            let dt = now.saturating_sub(b.at).as_nanos();
            let add = dt.saturating_mul(per_sec).saturating_mul(UNIT) / 1_000_000_000;
            b.units.saturating_add(add) < cap
        });
        if self.map.len() >= self.max_keys {
            evict_oldest(&mut self.map, |b| b.at);
        }
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Drops the eighth of `map` (at least one entry) with the oldest `at`.
fn evict_oldest<K: Hash + Eq + Clone, V>(map: &mut HashMap<K, V>, at: impl Fn(&V) -> Duration) {
    let mut ages: Vec<Duration> = map.values().map(&at).collect();
    let n = (ages.len() / 8).max(1);
    let (_, cut, _) = ages.select_nth_unstable(n - 1);
    let cut = *cut;
    let mut dropped = 0;
    map.retain(|_, v| {
        if dropped < n && at(v) <= cut {
            dropped += 1;
            false
        } else {
            true
        }
    });
}

#[derive(Debug, Clone, Copy)]
struct Day {
    day: u64,
    bytes: u64,
    at: Duration,
}

/// Bytes per key per UTC day against a cap. At most `max_keys` are kept:
/// when a new key finds the table full, entries of past days go first,
/// else the least recently used eighth (a forgotten client starts the day
/// afresh: bounded memory is worth more than an exact count for a client
/// hopping across 65 536 addresses).
#[derive(Debug)]
pub struct DailyBytes<K> {
    cap: u64,
    max_keys: usize,
    map: HashMap<K, Day>,
}

impl<K: Hash + Eq + Clone> DailyBytes<K> {
    /// `cap` bytes per key per day (0: no cap, nothing is tracked).
    pub fn new(cap: u64, max_keys: usize) -> Self {
        DailyBytes {
            cap,
            max_keys: max_keys.max(1),
            map: HashMap::new(),
        }
    }

    /// The cap (0: none).
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Bytes `key` used on `day`.
    pub fn used(&self, key: &K, day: u64) -> u64 {
        self.map
            .get(key)
            .filter(|d| d.day == day)
            .map_or(0, |d| d.bytes)
    }

    /// Whether `key` may still move bytes on `day`.
    pub fn allows(&self, key: &K, day: u64) -> bool {
        self.cap == 0 || self.used(key, day) < self.cap
    }

    /// Adds `n` bytes for `key` on `day` at `now`; whether it is still
    /// within the cap afterwards (`used <= cap`).
    pub fn charge(&mut self, key: &K, day: u64, n: u64, now: Duration) -> bool {
        if self.cap == 0 {
            return true;
        }
        if !self.map.contains_key(key) && self.map.len() >= self.max_keys {
            self.map.retain(|_, d| d.day >= day);
            if self.map.len() >= self.max_keys {
                evict_oldest(&mut self.map, |d| d.at);
            }
        }
        let d = self.map.entry(key.clone()).or_insert(Day {
            day,
            bytes: 0,
            at: now,
        });
        if d.day != day {
            *d = Day {
                day,
                bytes: 0,
                at: now,
            };
        }
        d.bytes = d.bytes.saturating_add(n);
        d.at = now;
        d.bytes <= self.cap
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A request refused by a limit: the 429 to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// Whole seconds for `Retry-After` (at least 1).
    pub retry_after_secs: u64,
    /// The body's sentence, naming the limit.
    pub message: String,
}

/// The proxy's limits per client, shared by every connection.
#[derive(Debug)]
pub struct ClientLimits {
    per_sec: u32,
    rate: Mutex<TokenBuckets<ClientId>>,
    tunnel: Mutex<DailyBytes<ClientId>>,
    epoch: tokio::time::Instant,
}

impl ClientLimits {
    /// `per_sec` requests a second with bursts of `burst`, and
    /// `tunnel_bytes_per_day` (0: no cap) through tunnels, per client.
    pub fn new(per_sec: u32, burst: u32, tunnel_bytes_per_day: u64) -> ClientLimits {
        ClientLimits {
            per_sec,
            rate: Mutex::new(TokenBuckets::new(per_sec, burst, MAX_CLIENT_KEYS)),
            tunnel: Mutex::new(DailyBytes::new(tunnel_bytes_per_day, MAX_CLIENT_KEYS)),
            epoch: tokio::time::Instant::now(),
        }
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// One request (or `CONNECT`) from `who`.
    ///
    /// # Errors
    /// The 429's contents when `who` is over its rate.
    pub fn request(&self, who: &ClientId) -> Result<(), Limited> {
        let now = self.now();
        let r = self.rate.lock().expect("rate lock").take(who, now);
        r.map_err(|wait| Limited {
            retry_after_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            message: format!(
                "429 Too Many Requests: more than {} requests a second from your address",
                self.per_sec
            ),
        })
    }

    /// Whether `who` may open a tunnel on `day` (UTC days since 1970).
    ///
    /// # Errors
    /// The 429's contents when `who` used its tunnel bytes for the day.
    pub fn tunnel_open(&self, who: &ClientId, day: u64) -> Result<(), Limited> {
        let t = self.tunnel.lock().expect("tunnel lock");
        if t.allows(who, day) {
            return Ok(());
        }
        Err(tunnel_limited(t.cap()))
    }

    /// Charges `n` tunnel bytes to `who` on `day`; `false` once over the
    /// cap (the tunnel is then closed).
    pub fn tunnel_bytes(&self, who: &ClientId, day: u64, n: u64) -> bool {
        let now = self.now();
        self.tunnel
            .lock()
            .expect("tunnel lock")
            .charge(who, day, n, now)
    }
}

/// The 429 for a client past its tunnel bytes for the day.
fn tunnel_limited(cap: u64) -> Limited {
    Limited {
        // Until the next UTC midnight would be exact, but a client told to
        // wait most of a day helps nobody: an hour, then ask again.
        retry_after_secs: TUNNEL_RETRY_AFTER_SECS,
        message: format!(
            "429 Too Many Requests: your address moved more than {cap} bytes through HTTPS tunnels today (the daily cap per address; it resets at 00:00 UTC)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn bucket_allows_burst_then_rate() {
        let mut b = TokenBuckets::new(10, 40, 100);
        let t = Duration::from_secs(5);
        for i in 0..40 {
            assert!(b.take(&1u32, t).is_ok(), "burst {i}");
        }
        let wait = b.take(&1, t).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // Another key is untouched.
        assert!(b.take(&2, t).is_ok());
        // 100 ms later: one more token.
        assert!(b.take(&1, t + Duration::from_millis(100)).is_ok());
        assert!(b.take(&1, t + Duration::from_millis(100)).is_err());
        // A second later: ten.
        let t2 = t + Duration::from_millis(1100);
        for _ in 0..10 {
            assert!(b.take(&1, t2).is_ok());
        }
        assert!(b.take(&1, t2).is_err());
    }

    #[test]
    fn a_full_table_forgets_refilled_buckets_first() {
        let mut b = TokenBuckets::new(1, 2, 4);
        let t = Duration::from_secs(100);
        for k in 0..4u32 {
            b.take(&k, t).unwrap();
        }
        // Key 0 and 1 drained, 2 and 3 half.
        b.take(&0, t).unwrap();
        b.take(&1, t).unwrap();
        assert!(b.take(&0, t).is_err());
        // Two seconds on, 2 and 3 are full again, 0 and 1 too (refill is
        // 1/s, burst 2): all are forgettable; a new key fits.
        b.take(&9, t + 2 * S).unwrap();
        assert!(b.len() <= 4);
        // No refill: the least recently used go, never past the bound.
        let mut b = TokenBuckets::new(1, 1, 4);
        for k in 0..100u32 {
            let _ = b.take(&k, t);
            assert!(b.len() <= 4);
        }
        assert!(b.take(&99, t).is_err(), "the newest key is kept");
    }

    #[test]
    fn ids_group_ipv6_slash_64_and_separate_racks() {
        let a = ClientId::local("2001:db8:1:2::1".parse().unwrap());
        let b = ClientId::local("2001:db8:1:2:ffff::9".parse().unwrap());
        assert_eq!(a, b);
        let m = ClientId::local("::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(m, ClientId::local("10.0.0.1".parse().unwrap()));
        assert_ne!(
            ClientId::forwarded("rack-b", "10.0.0.1".parse().unwrap()),
            ClientId::forwarded("rack-c", "10.0.0.1".parse().unwrap())
        );
        assert_ne!(
            m,
            ClientId::forwarded("rack-b", "10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn daily_bytes_cap_and_reset() {
        let mut d = DailyBytes::new(1000, 10);
        assert!(d.allows(&1u8, 7));
        assert!(d.charge(&1, 7, 600, S));
        assert!(d.charge(&1, 7, 400, S), "exactly the cap is within it");
        assert!(!d.allows(&1, 7));
        assert!(!d.charge(&1, 7, 1, S));
        assert!(d.allows(&2, 7));
        assert!(d.allows(&1, 8), "a new UTC day");
        assert!(d.charge(&1, 8, 10, S));
        assert_eq!(d.used(&1, 8), 10);
        let mut none = DailyBytes::new(0, 10);
        assert!(none.charge(&1u8, 7, u64::MAX, S));
        assert!(none.is_empty(), "no cap, nothing tracked");
    }

    #[test]
    fn limits_name_the_limit() {
        let l = ClientLimits::new(100, 2, 5);
        let who = ClientId::local("10.0.0.9".parse().unwrap());
        l.request(&who).unwrap();
        l.request(&who).unwrap();
        let e = l.request(&who).unwrap_err();
        assert_eq!(e.retry_after_secs, 1);
        assert!(
            e.message
                .contains("more than 100 requests a second from your address"),
            "{}",
            e.message
        );
        l.tunnel_open(&who, 1).unwrap();
        assert!(!l.tunnel_bytes(&who, 1, 6));
        let e = l.tunnel_open(&who, 1).unwrap_err();
        assert!(e.message.contains("more than 5 bytes"), "{}", e.message);
    }

    proptest! {
        /// However many keys come, the table stays within its bound.
        #[test]
        fn bucket_table_stays_bounded(
            steps in prop::collection::vec((0u64..50, 0u16..300), 1..600),
        ) {
            let mut b = TokenBuckets::new(5, 3, 32);
            let mut t = Duration::from_secs(1);
            for (dt_ms, key) in steps {
                t += Duration::from_millis(dt_ms);
                let _ = b.take(&key, t);
                prop_assert!(b.len() <= 32);
            }
        }

        #[test]
        fn one_key_is_held_to_its_rate(
            per_sec in 1u32..50,
            burst in 1u32..50,
            gaps in prop::collection::vec(0u64..200, 1..400),
        ) {
            let mut b = TokenBuckets::new(per_sec, burst, 16);
            let mut t = Duration::from_secs(1);
            let start = t;
            let mut granted = 0u64;
            for g in gaps {
                t += Duration::from_millis(g);
                if b.take(&0u8, t).is_ok() {
                    granted += 1;
                }
            }
            let window = (t - start).as_secs_f64();
            prop_assert!(granted as f64 <= f64::from(burst) + f64::from(per_sec) * window + 1e-6);
        }

        #[test]
        fn a_refusal_says_when_to_come_back(
            per_sec in 1u32..1000,
            burst in 1u32..20,
        ) {
            let mut b = TokenBuckets::new(per_sec, burst, 4);
            let t = Duration::from_secs(3);
            for _ in 0..burst {
                b.take(&0u8, t).unwrap();
            }
            let wait = b.take(&0, t).unwrap_err();
            prop_assert!(wait <= Duration::from_secs(1));
            prop_assert!(b.take(&0, t + wait).is_ok());
        }

        #[test]
        fn daily_bytes_table_stays_bounded(
            charges in prop::collection::vec((0u16..500, 0u64..3, 0u64..2000), 1..500),
        ) {
            let mut d = DailyBytes::new(1000, 64);
            let mut t = Duration::ZERO;
            for (key, day, n) in charges {
                t += Duration::from_millis(1);
                let within = d.charge(&key, day, n, t);
                prop_assert!(d.len() <= 64);
                prop_assert_eq!(within, d.used(&key, day) <= 1000);
            }
        }
    }
}
