//! Link health: is the backhaul up, and is this upstream reachable?
//!
//! Two inputs: *probes* (a background task, [`crate::server`]'s prober,
//! sends them every `probe_interval_ms`, or `probe_interval_down_ms` while
//! down) and *passive* results of real requests. The point is never to make
//! a client wait on a connect timeout once we know the link is down:
//! - an upstream host that timed out or was unreachable is **down** until a
//!   probe or request to it succeeds; requests for it fail fast;
//! - the **backhaul** is down when forced offline, when every probe of the
//!   last round failed, or after [`GLOBAL_FAILURE_THRESHOLD`] consecutive
//!   link failures on any hosts with no success in between; then every
//!   upstream request fails fast. Any success brings it back up.
//!
//! Refused or reset connections say the network works and the service does
//! not: they count against the host's reachability only for the one request.
//!
//! **Hung links.** A link that accepts TCP and then says nothing (a
//! satellite modem's TCP accelerator answering SYNs locally while the
//! satellite is gone, an origin that wedged) is invisible to a TCP connect.
//! So a TCP connect ([`Outcome::Connected`]) proves nothing about the link:
//! only a response head ([`Outcome::Success`]) brings a host or the
//! backhaul back, and an upstream that gives no response head within the
//! miss deadline is marked **hung** ([`HealthCore::record_hung`]): down, not
//! cleared by a TCP accept, re-probed by the prober with a real HTTP request
//! ([`HealthCore::hung_targets`]). Probes are real HTTP requests too.
//!
//! The uplink's state for the rest of the field ([`UplinkState`]: up,
//! degraded, down) also weighs the probes' smoothed round-trip time.
//!
//! [`HealthCore`] is sans-IO (time passed in); [`Health`] shares it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use tokio::time::Instant;

use crate::upstream::Target;

/// Consecutive link failures (any host) that declare the backhaul down.
pub const GLOBAL_FAILURE_THRESHOLD: u32 = 3;
/// Upstream hosts tracked; the least recently seen is forgotten beyond.
pub const MAX_TRACKED_HOSTS: usize = 1024;
/// A smoothed probe round-trip time above this makes the uplink
/// *degraded*: a geostationary satellite answers a small GET in about
/// 0.6-1.2 s; past 2 s interactive browsing suffers and another rack's
/// healthy uplink is the better choice.
pub const DEGRADED_RTT: Duration = Duration::from_secs(2);
/// Weight of a new probe RTT sample in the smoothed RTT (RFC 6298's alpha).
const RTT_ALPHA: f64 = 0.125;

/// The state of this rack's uplink as the rest of the field sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UplinkState {
    /// Probes answer and nothing is failing.
    Up,
    /// Up, but slow (smoothed probe RTT over [`DEGRADED_RTT`]) or with
    /// hosts failing: usable, a healthy uplink elsewhere is preferred.
    Degraded,
    /// Forced offline, probes failing, or too many link failures.
    Down,
}

impl UplinkState {
    /// Lower case name for status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            UplinkState::Up => "up",
            UplinkState::Degraded => "degraded",
            UplinkState::Down => "down",
        }
    }
}

/// The outcome of an upstream attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Got a response head: the link and the far end both work.
    Success,
    /// A TCP connection was accepted. Proves little (a hung link or a
    /// TCP-accelerating modem accepts too): it clears a host's down mark
    /// only when the host is not hung, and never the backhaul's.
    Connected,
    /// Timed out, unreachable, DNS failed: the path is broken.
    LinkFailure,
    /// Refused, reset, bad response: the far end is broken, not the link.
    ServiceFailure,
}

#[derive(Debug, Clone)]
struct HostState {
    down_since: Option<Instant>,
    last_seen: Instant,
    /// Set when a request got no response head in time: what to re-probe
    /// with a real request (a TCP accept does not clear it).
    hung: Option<Target>,
}

/// Sans-IO health state.
#[derive(Debug, Default)]
pub struct HealthCore {
    hosts: HashMap<String, HostState>,
    consecutive_failures: u32,
    probes_failing: bool,
    down_since: Option<Instant>,
    /// Smoothed round-trip time of successful probes.
    srtt: Option<Duration>,
}

impl HealthCore {
    fn host_mut(&mut self, host: &str, now: Instant) -> &mut HostState {
        if self.hosts.len() >= MAX_TRACKED_HOSTS && !self.hosts.contains_key(host) {
            if let Some(oldest) = self
                .hosts
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(h, _)| h.clone())
            {
                self.hosts.remove(&oldest);
            }
        }
        let st = self.hosts.entry(host.to_string()).or_insert(HostState {
            down_since: None,
            last_seen: now,
            hung: None,
        });
        st.last_seen = now;
        st
    }

    /// Records the outcome of a request or probe to `host` (`host:port`).
    pub fn record(&mut self, host: &str, outcome: Outcome, now: Instant) {
        let st = self.host_mut(host, now);
        match outcome {
            Outcome::Success => {
                st.down_since = None;
                st.hung = None;
                self.consecutive_failures = 0;
                self.probes_failing = false;
                self.down_since = None;
            }
            Outcome::LinkFailure => {
                st.down_since.get_or_insert(now);
                self.consecutive_failures += 1;
                if self.consecutive_failures >= GLOBAL_FAILURE_THRESHOLD {
                    self.down_since.get_or_insert(now);
                }
            }
            Outcome::Connected => {
                if st.hung.is_none() {
                    st.down_since = None;
                }
            }
            Outcome::ServiceFailure => {}
        }
    }

    /// `target`'s host gave no response head within the miss deadline: it
    /// is down (requests for it fail fast) until a real response from it,
    /// and counts as a link failure towards the backhaul's.
    pub fn record_hung(&mut self, target: &Target, now: Instant) {
        let mut probe = target.clone();
        probe.path_and_query = "/".into();
        self.host_mut(&target.authority(), now).hung = Some(probe);
        self.record(&target.authority(), Outcome::LinkFailure, now);
    }

    /// Hung hosts, as targets the prober re-probes with a real request.
    pub fn hung_targets(&self) -> Vec<Target> {
        self.hosts.values().filter_map(|h| h.hung.clone()).collect()
    }

    /// A successful probe took `rtt` (to its response head).
    pub fn record_probe_rtt(&mut self, rtt: Duration) {
        self.srtt = Some(match self.srtt {
            None => rtt,
            Some(s) => s.mul_f64(1.0 - RTT_ALPHA) + rtt.mul_f64(RTT_ALPHA),
        });
    }

    /// Smoothed probe round-trip time, once a probe succeeded.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The uplink's state for the field (forced offline is the shell's).
    pub fn state(&self) -> UplinkState {
        if !self.backhaul_up() {
            UplinkState::Down
        } else if self.srtt.is_some_and(|s| s > DEGRADED_RTT)
            || self.consecutive_failures > 0
            || self.hosts.values().any(|h| h.hung.is_some())
        {
            UplinkState::Degraded
        } else {
            UplinkState::Up
        }
    }

    /// A re-probe found `host` accepting TCP again: clears its own down
    /// mark unless it is hung, never the backhaul's (only a probe round or
    /// a real exchange does that).
    pub fn record_host_reachable(&mut self, host: &str) {
        if let Some(h) = self.hosts.get_mut(host) {
            if h.hung.is_none() {
                h.down_since = None;
            }
        }
    }

    /// Records a whole probe round: `any_ok` if at least one target answered.
    pub fn record_probe_round(&mut self, any_ok: bool, now: Instant) {
        self.probes_failing = !any_ok;
        if any_ok {
            self.consecutive_failures = 0;
            self.down_since = None;
        } else {
            self.down_since.get_or_insert(now);
        }
    }

    /// Whether the backhaul is believed up.
    pub fn backhaul_up(&self) -> bool {
        self.down_since.is_none() && !self.probes_failing
    }

    /// Whether a request to `host` should be attempted.
    pub fn host_usable(&self, host: &str) -> bool {
        self.backhaul_up() && self.hosts.get(host).is_none_or(|h| h.down_since.is_none())
    }

    /// Hosts currently marked down and not hung (re-probed by TCP
    /// connect; hung ones by [`HealthCore::hung_targets`]).
    pub fn down_hosts(&self) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|(_, s)| s.down_since.is_some() && s.hung.is_none())
            .map(|(h, _)| h.clone())
            .collect()
    }
}

/// Shared link health, plus the operator's forced-offline switch.
#[derive(Clone, Default)]
pub struct Health {
    core: Arc<Mutex<HealthCore>>,
    forced_offline: Arc<AtomicBool>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("backhaul_up", &self.backhaul_up())
            .finish()
    }
}

impl Health {
    /// Health with the forced-offline switch set as given.
    pub fn new(forced_offline: bool) -> Health {
        let h = Health::default();
        h.set_forced_offline(forced_offline);
        h
    }

    /// Sets the operator's switch.
    pub fn set_forced_offline(&self, on: bool) {
        self.forced_offline.store(on, Ordering::Relaxed);
    }

    /// The operator's switch.
    pub fn forced_offline(&self) -> bool {
        self.forced_offline.load(Ordering::Relaxed)
    }

    /// Records an outcome.
    pub fn record(&self, host: &str, outcome: Outcome) {
        let mut c = self.core.lock().expect("lock");
        let was = c.backhaul_up();
        c.record(host, outcome, Instant::now());
        log_change(was, c.backhaul_up());
    }

    /// See [`HealthCore::record_hung`].
    pub fn record_hung(&self, target: &Target) {
        let mut c = self.core.lock().expect("lock");
        let was = c.backhaul_up();
        c.record_hung(target, Instant::now());
        tracing::warn!(
            event = "upstream_hung",
            upstream = %target.authority(),
            "upstream gave no response in time; failing fast until it answers a probe"
        );
        log_change(was, c.backhaul_up());
    }

    /// See [`HealthCore::hung_targets`].
    pub fn hung_targets(&self) -> Vec<Target> {
        self.core.lock().expect("lock").hung_targets()
    }

    /// See [`HealthCore::record_probe_rtt`].
    pub fn record_probe_rtt(&self, rtt: Duration) {
        self.core.lock().expect("lock").record_probe_rtt(rtt);
    }

    /// Smoothed probe round-trip time.
    pub fn srtt(&self) -> Option<Duration> {
        self.core.lock().expect("lock").srtt()
    }

    /// The uplink's state (down when forced offline).
    pub fn state(&self) -> UplinkState {
        if self.forced_offline() {
            UplinkState::Down
        } else {
            self.core.lock().expect("lock").state()
        }
    }

    /// See [`HealthCore::record_host_reachable`].
    pub fn record_host_reachable(&self, host: &str) {
        self.core.lock().expect("lock").record_host_reachable(host);
    }

    /// Records a probe round.
    pub fn record_probe_round(&self, any_ok: bool) {
        let mut c = self.core.lock().expect("lock");
        let was = c.backhaul_up();
        c.record_probe_round(any_ok, Instant::now());
        log_change(was, c.backhaul_up());
    }

    /// Up, and not forced offline.
    pub fn backhaul_up(&self) -> bool {
        !self.forced_offline() && self.core.lock().expect("lock").backhaul_up()
    }

    /// Whether to try `host` now.
    pub fn host_usable(&self, host: &str) -> bool {
        !self.forced_offline() && self.core.lock().expect("lock").host_usable(host)
    }

    /// Hosts to re-probe.
    pub fn down_hosts(&self) -> Vec<String> {
        self.core.lock().expect("lock").down_hosts()
    }
}

fn log_change(was: bool, now: bool) {
    if was && !now {
        tracing::warn!(
            event = "backhaul_down",
            "backhaul down: serving from cache and mesh only"
        );
    } else if !was && now {
        tracing::info!(event = "backhaul_up", "backhaul up");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passive_and_probe_transitions() {
        let mut h = HealthCore::default();
        let t = Instant::now();
        assert!(h.backhaul_up());
        h.record("a:80", Outcome::LinkFailure, t);
        assert!(!h.host_usable("a:80"), "the failed host fails fast");
        assert!(h.host_usable("b:80"));
        assert!(h.backhaul_up());
        h.record("b:80", Outcome::ServiceFailure, t);
        assert!(h.host_usable("b:80"), "refused is not a link failure");
        h.record("c:80", Outcome::LinkFailure, t);
        h.record("d:80", Outcome::LinkFailure, t);
        assert!(!h.backhaul_up());
        assert!(!h.host_usable("b:80"));
        assert_eq!(h.down_hosts().len(), 3);
        h.record("a:80", Outcome::Success, t);
        assert!(h.backhaul_up());
        assert!(h.host_usable("a:80"));
        assert!(!h.host_usable("c:80"), "c is still down itself");
        h.record_probe_round(false, t);
        assert!(!h.backhaul_up());
        h.record_probe_round(true, t);
        assert!(h.backhaul_up());
    }

    fn target(url: &str) -> Target {
        Target::parse(url).unwrap()
    }

    /// One step of a table: what happens, then what the state must be.
    enum Step {
        Rec(&'static str, Outcome),
        Hung(&'static str),
        Reachable(&'static str),
        Round(bool),
        Rtt(u64),
    }

    #[test]
    fn hung_links_table() {
        use Outcome::*;
        use Step::*;
        use UplinkState::{Degraded, Down, Up};
        // (steps, state, usable hosts, unusable hosts, hung targets)
        type Row = (
            Vec<Step>,
            UplinkState,
            Vec<&'static str>,
            Vec<&'static str>,
            usize,
        );
        let table: Vec<Row> = vec![
            (vec![], Up, vec!["a:80"], vec![], 0),
            // A hung host fails fast and makes the uplink degraded.
            (
                vec![Hung("http://a/x")],
                Degraded,
                vec!["b:80"],
                vec!["a:80"],
                1,
            ),
            // A TCP accept does not clear a hung host...
            (
                vec![Hung("http://a/x"), Rec("a:80", Connected)],
                Degraded,
                vec![],
                vec!["a:80"],
                1,
            ),
            (
                vec![Hung("http://a/x"), Reachable("a:80")],
                Degraded,
                vec![],
                vec!["a:80"],
                1,
            ),
            // ...a response head does.
            (
                vec![Hung("http://a/x"), Rec("a:80", Success)],
                Up,
                vec!["a:80"],
                vec![],
                0,
            ),
            // Three hung hosts: the backhaul is down.
            (
                vec![Hung("http://a/"), Hung("http://b/"), Hung("https://c/")],
                Down,
                vec![],
                vec!["a:80", "b:80", "c:443", "d:80"],
                3,
            ),
            // Connects in between do not reset the failure count.
            (
                vec![
                    Rec("a:80", LinkFailure),
                    Rec("x:80", Connected),
                    Rec("b:80", LinkFailure),
                    Rec("y:80", Connected),
                    Rec("c:80", LinkFailure),
                ],
                Down,
                vec![],
                vec!["x:80"],
                0,
            ),
            // A failed probe round: down, however hosts connect.
            (
                vec![Round(false), Rec("a:80", Connected)],
                Down,
                vec![],
                vec!["a:80"],
                0,
            ),
            (vec![Round(false), Round(true)], Up, vec!["a:80"], vec![], 0),
            // Slow probes: degraded, still usable.
            (vec![Rtt(3_000)], Degraded, vec!["a:80"], vec![], 0),
            (vec![Rtt(600)], Up, vec!["a:80"], vec![], 0),
            // The smoothed RTT comes down as fast answers come back.
            (
                std::iter::once(Rtt(5_000))
                    .chain((0..30).map(|_| Rtt(500)))
                    .collect(),
                Up,
                vec!["a:80"],
                vec![],
                0,
            ),
            // A refused connection is the service, not the link.
            (
                vec![Rec("a:80", ServiceFailure)],
                Up,
                vec!["a:80"],
                vec![],
                0,
            ),
            // A plain link failure is re-probed by TCP, not as hung.
            (
                vec![Rec("a:80", LinkFailure), Reachable("a:80")],
                Degraded,
                vec!["a:80"],
                vec![],
                0,
            ),
        ];
        for (i, (steps, state, usable, unusable, hung)) in table.into_iter().enumerate() {
            let mut h = HealthCore::default();
            let t0 = Instant::now();
            for (k, step) in steps.into_iter().enumerate() {
                let now = t0 + Duration::from_millis(k as u64);
                match step {
                    Rec(host, o) => h.record(host, o, now),
                    Hung(url) => h.record_hung(&target(url), now),
                    Reachable(host) => h.record_host_reachable(host),
                    Round(ok) => h.record_probe_round(ok, now),
                    Rtt(ms) => h.record_probe_rtt(Duration::from_millis(ms)),
                }
            }
            assert_eq!(h.state(), state, "row {i}");
            for u in usable {
                assert!(h.host_usable(u), "row {i}: {u} should be usable");
            }
            for u in unusable {
                assert!(!h.host_usable(u), "row {i}: {u} should not be usable");
            }
            let targets = h.hung_targets();
            assert_eq!(targets.len(), hung, "row {i}");
            assert!(
                targets.iter().all(|t| t.path_and_query == "/"),
                "row {i}: hung hosts are re-probed at /"
            );
        }
    }

    #[test]
    fn forced_offline_overrides() {
        let h = Health::new(true);
        assert!(!h.backhaul_up());
        assert_eq!(h.state(), UplinkState::Down);
        assert!(!h.host_usable("x:1"));
        h.set_forced_offline(false);
        assert!(h.host_usable("x:1"));
    }
}
