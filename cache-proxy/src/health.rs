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
//! [`HealthCore`] is sans-IO (time passed in); [`Health`] shares it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

/// Consecutive link failures (any host) that declare the backhaul down.
pub const GLOBAL_FAILURE_THRESHOLD: u32 = 3;
/// Upstream hosts tracked; the least recently seen is forgotten beyond.
pub const MAX_TRACKED_HOSTS: usize = 1024;

/// The outcome of an upstream attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Got a response.
    Success,
    /// Timed out, unreachable, DNS failed: the path is broken.
    LinkFailure,
    /// Refused, reset, bad response: the far end is broken, not the link.
    ServiceFailure,
}

#[derive(Debug, Clone)]
struct HostState {
    down_since: Option<Instant>,
    last_seen: Instant,
}

/// Sans-IO health state.
#[derive(Debug, Default)]
pub struct HealthCore {
    hosts: HashMap<String, HostState>,
    consecutive_failures: u32,
    probes_failing: bool,
    down_since: Option<Instant>,
}

impl HealthCore {
    /// Records the outcome of a request or probe to `host` (`host:port`).
    pub fn record(&mut self, host: &str, outcome: Outcome, now: Instant) {
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
        });
        st.last_seen = now;
        match outcome {
            Outcome::Success => {
                st.down_since = None;
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
            Outcome::ServiceFailure => {}
        }
    }

    /// A re-probe found `host` reachable again: clears its own down mark,
    /// not the backhaul's (only a probe round or a real exchange does that).
    pub fn record_host_reachable(&mut self, host: &str) {
        if let Some(h) = self.hosts.get_mut(host) {
            h.down_since = None;
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

    /// Hosts currently marked down (for re-probing).
    pub fn down_hosts(&self) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|(_, s)| s.down_since.is_some())
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

    #[test]
    fn forced_offline_overrides() {
        let h = Health::new(true);
        assert!(!h.backhaul_up());
        assert!(!h.host_usable("x:1"));
        h.set_forced_offline(false);
        assert!(h.host_usable("x:1"));
    }
}
