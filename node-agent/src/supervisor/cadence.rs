//! How often the renewal loop renews: every period while the rack has
//! something to run or to tell, half as often while it has nothing.
//!
//! Every renewal is a Raft entry that every other rack stores and applies,
//! so a field of N racks renewing each second writes N entries a second on
//! every rack. Most racks of a large field run nothing (replica holders,
//! witnesses, spares), and for them a renewal only keeps them `renewing`
//! (a renewal applied less than one lease ago) and their report fresh. An
//! idle rack renews every [`idle_every`] (2 s by default against an 8 s
//! lease: three renewals in a row may be lost before it stops counting as
//! renewing), and at once when its report changes in anything but its
//! clock and free bytes, or when the field assigns it an appliance (the
//! loop ticks every period and looks). A renewal that did not commit in
//! time sends the next one at the full rate, so loss never stretches the
//! gap beyond what the busy rate tolerates.

use std::time::{Duration, Instant};

use control::{LeaseConfig, RackReport};

/// The renewal period of a rack with nothing to run or report: twice the
/// period, at most a quarter of the lease, never less than the period.
#[must_use]
pub fn idle_every(cfg: &LeaseConfig) -> Duration {
    (cfg.renew_every * 2)
        .min(cfg.lease / 4)
        .max(cfg.renew_every)
}

/// Whether a rack with `report` needs the full renewal rate: it runs, ran
/// or is assigned an appliance, it uses or asks for backhaul quota, or its
/// power is failing.
#[must_use]
pub fn busy(report: &RackReport, assigned: bool) -> bool {
    assigned || !report.apps.is_empty() || report.backhaul.is_some() || report.power_dying
}

/// Whether two reports differ in what the field acts on (all but the
/// clock and the free bytes, which move all the time and are carried by
/// the next periodic renewal).
#[must_use]
pub fn changed(a: &RackReport, b: &RackReport) -> bool {
    a.role != b.role
        || a.site != b.site
        || a.cpus != b.cpus
        || a.memory_mb != b.memory_mb
        || a.power_dying != b.power_dying
        || a.power_source != b.power_source
        || a.volumes != b.volumes
        || a.apps != b.apps
        || a.backhaul != b.backhaul
}

/// The renewal loop's memory: what it sent last, and when.
#[derive(Debug, Default)]
pub struct Cadence {
    last: Option<(Instant, RackReport)>,
}

impl Cadence {
    /// Whether to renew at `now` with `report`. `granted_sent` is when the
    /// latest renewal that committed was sent; `every` the period.
    #[must_use]
    pub fn due(
        &self,
        now: Instant,
        report: &RackReport,
        assigned: bool,
        granted_sent: Option<Instant>,
        every: Duration,
        idle_every: Duration,
    ) -> bool {
        let Some((sent, last)) = &self.last else {
            return true;
        };
        if busy(report, assigned) || changed(last, report) {
            return true;
        }
        if now.saturating_duration_since(*sent) >= idle_every {
            return true;
        }
        // The last one has not committed in time (lost, or slow): renew
        // at the full rate until one does.
        granted_sent.is_none_or(|g| now.saturating_duration_since(g) >= idle_every + every * 2)
    }

    /// A renewal with `report` left at `now`.
    pub fn sent(&mut self, now: Instant, report: RackReport) {
        self.last = Some((now, report));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control::{AppReport, AppState};

    const S: Duration = Duration::from_secs(1);

    fn cfg() -> LeaseConfig {
        LeaseConfig::default()
    }

    fn app() -> AppReport {
        AppReport {
            epoch: 1,
            state: AppState::Running,
            since_ms: 0,
        }
    }

    #[test]
    fn idle_period_is_twice_the_period_within_a_quarter_lease() {
        let c = cfg();
        assert_eq!(idle_every(&c), 2 * c.renew_every);
        let slow = LeaseConfig {
            renew_every: Duration::from_secs(2),
            ..c
        };
        assert_eq!(idle_every(&slow), slow.lease / 4);
        let slower = LeaseConfig {
            renew_every: Duration::from_secs(3),
            lease: Duration::from_secs(8),
            ..c
        };
        assert_eq!(idle_every(&slower), slower.renew_every);
    }

    #[test]
    fn an_idle_rack_renews_every_idle_period_while_renewals_commit() {
        let t0 = Instant::now();
        let report = RackReport::default();
        let mut c = Cadence::default();
        assert!(c.due(t0, &report, false, None, S, 2 * S), "the first one");
        c.sent(t0, report.clone());
        // Committed at once: next at t0 + 2 s, not before.
        assert!(!c.due(t0 + S, &report, false, Some(t0), S, 2 * S));
        assert!(c.due(t0 + 2 * S, &report, false, Some(t0), S, 2 * S));
    }

    #[test]
    fn clock_and_free_bytes_alone_do_not_make_a_renewal_due() {
        let t0 = Instant::now();
        let report = RackReport::default();
        let mut c = Cadence::default();
        c.sent(t0, report.clone());
        let moved = RackReport {
            at_ms: 99,
            free_bytes: Some(5),
            ..report
        };
        assert!(!c.due(t0 + S, &moved, false, Some(t0), S, 2 * S));
    }

    #[test]
    fn a_busy_assigned_or_changed_rack_renews_every_period() {
        let t0 = Instant::now();
        let idle = RackReport::default();
        let mut c = Cadence::default();
        c.sent(t0, idle.clone());
        let at = t0 + S;
        assert!(c.due(at, &idle, true, Some(t0), S, 2 * S), "assigned");
        let mut running = idle.clone();
        running.apps.insert("clinic".into(), app());
        assert!(c.due(at, &running, false, Some(t0), S, 2 * S), "runs one");
        let dying = RackReport {
            power_dying: true,
            ..idle.clone()
        };
        assert!(
            c.due(at, &dying, false, Some(t0), S, 2 * S),
            "power failing"
        );
        let mut volumes = idle.clone();
        volumes.volumes.insert("db".into(), 3);
        assert!(
            c.due(at, &volumes, false, Some(t0), S, 2 * S),
            "a new generation"
        );
    }

    #[test]
    fn a_renewal_that_did_not_commit_brings_back_the_full_rate() {
        let t0 = Instant::now();
        let report = RackReport::default();
        let mut c = Cadence::default();
        // The one sent at t0 committed; those sent at t0 + 2 s and t0 + 4 s
        // did not: the next goes a period later, not an idle period.
        c.sent(t0 + 4 * S, report.clone());
        assert!(c.due(t0 + 5 * S, &report, false, Some(t0), S, 2 * S));
        // Had the one of t0 + 2 s committed, t0 + 4 s is merely in flight.
        assert!(!c.due(t0 + 5 * S, &report, false, Some(t0 + 2 * S), S, 2 * S));
        // None committed yet (start-up): every period.
        assert!(c.due(t0 + 3 * S, &report, false, None, S, 2 * S));
    }
}
