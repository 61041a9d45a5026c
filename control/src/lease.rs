//! Fencing by leases, as pure bookkeeping over injected instants.
//!
//! A rack renews its lease by committing [`Command::Renew`] through Raft.
//! The lease counts from the moment the rack *sent* the renewal, which is
//! before the leader put it in its log, before any rack received that
//! entry, and before any rack applied it, so:
//!
//! ```text
//! owner's lease ends  ≤  sent_at + lease  ≤  seen on any rack + lease
//! ```
//!
//! where a rack *sees* an entry when it first receives it into its log
//! ([`Receipts`]) or, failing a record of that, when it applies it. The
//! two differ most when the leader dies: its followers then apply its
//! last entries only once a new leader commits, an election later.
//!
//! A renewal applied after the appliance was reassigned does not cover it
//! (the grant list is computed at apply time, in log order). Hence a new
//! owner that starts no earlier than the moment *it* saw the previous
//! owner's last renewal before the reassignment, plus the lease, plus a
//! margin for clock-rate drift, never overlaps the old owner. That is
//! [`LeaseWatch::gate`]. Only monotonic clocks and durations are used;
//! wall clocks never decide anything.
//!
//! The owner side is [`Lease`]: an appliance may start while the latest
//! granted renewal lists it at its current epoch and the lease has more
//! than `fence_before` left. Once running, it may go on until the fence
//! time of the latest grant that listed it at that epoch, even if a newer
//! grant dropped it (it was moved or failed over): that grant is at the
//! latest the old owner's last renewal before the reassignment, which is
//! what every new owner's gate counts from. Past that the rack stops
//! (fences) it, so it is down before any other rack may start it.
//!
//! # Why fencing always ends before the lease
//!
//! Each running instance is stopped by a task of its own whose only
//! deadline is [`Lease::deadline`] (the *fence time* `sent + lease −
//! fence_before` of the latest grant listing it at its epoch): SIGTERM, at most
//! `fence_grace`, then SIGKILL, which takes effect and is reaped within
//! [`KILL_REAP`]. Instances are fenced concurrently, so their number does
//! not add up, and nothing else (a renewal, a transfer, a health probe)
//! runs in that task. [`LeaseConfig::validate`] requires
//! `fence_grace + KILL_REAP < fence_before`, which gives, for the old
//! owner's last renewal sent at `sent` and seen by the new owner at
//! `seen`:
//!
//! ```text
//! fencing ends ≤ sent + lease − fence_before + fence_grace + KILL_REAP   (one task per instance)
//!              < sent + lease                                            (validate)
//!              ≤ seen + lease                                            (sent before any receipt)
//!              < seen + lease + drift_margin = gate                      (the new owner's start)
//! ```
//!
//! so the new owner starts at least `fence_before − fence_grace −
//! KILL_REAP + drift_margin` (by default 3 − 1.5 − 0.5 + 1 = 2 s) after the
//! old owner's copy is certainly dead ([`LeaseConfig::gate_margin`]).
//! A renewal that is delayed or fails never moves a deadline later: only
//! a newer grant does, and it counts from its own `sent`.
//!
//! [`Command::Renew`]: crate::field::Command::Renew

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Upper bound for a SIGKILLed appliance (a whole process group, or a QEMU
/// process) to be dead and reaped after the signal: the kernel tears a
/// killed process down in milliseconds even under load; 500 ms leaves room
/// for a busy 2-core rack. Part of the fencing budget (module doc).
pub const KILL_REAP: Duration = Duration::from_millis(deploy::config::KILL_REAP_MS);

/// Lease timings (`[control]` in rack.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a granted renewal lets a rack run its appliances.
    pub lease: Duration,
    /// Added on the new owner's side for clock-rate drift and scheduling.
    pub drift_margin: Duration,
    /// An owner stops its appliances this long before its lease ends.
    pub fence_before: Duration,
    /// How often a rack renews.
    pub renew_every: Duration,
    /// When fencing, how long an appliance gets between SIGTERM (QMP
    /// `quit`) and SIGKILL; its own `stop_grace_ms` if shorter.
    pub fence_grace: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(8),
            drift_margin: Duration::from_secs(1),
            fence_before: Duration::from_secs(3),
            renew_every: Duration::from_millis(1000),
            fence_grace: Duration::from_millis(1500),
        }
    }
}

impl LeaseConfig {
    /// Whether the timings make sense together.
    ///
    /// # Errors
    /// A sentence naming the problem.
    pub fn validate(&self) -> Result<(), String> {
        if self.fence_before >= self.lease {
            return Err("fence_before_ms must be shorter than lease_ms".into());
        }
        if self.renew_every * 2 > self.lease - self.fence_before {
            return Err(
                "renew_every_ms must leave at least two renewals before fencing starts".into(),
            );
        }
        if self.fence_grace + KILL_REAP >= self.fence_before {
            return Err(format!(
                "fence_grace_ms + {} ms (SIGKILL and reap) must be shorter than fence_before_ms",
                KILL_REAP.as_millis()
            ));
        }
        Ok(())
    }

    /// The latest an instance fenced from `fence_at` is certainly dead:
    /// SIGTERM at `fence_at`, SIGKILL `fence_grace` later, reaped within
    /// [`KILL_REAP`].
    #[must_use]
    pub fn fencing_ends(&self, fence_at: Instant) -> Instant {
        fence_at + self.fence_grace + KILL_REAP
    }

    /// How long after the old owner's copy is certainly dead a new owner
    /// may start it at the earliest (see the module doc); zero if the
    /// timings are invalid.
    #[must_use]
    pub fn gate_margin(&self) -> Duration {
        (self.fence_before + self.drift_margin).saturating_sub(self.fence_grace + KILL_REAP)
    }
}

/// The lease this rack holds.
#[derive(Debug, Clone, Default)]
pub struct Lease {
    sent_at: Option<Instant>,
    grants: BTreeMap<String, u64>,
    /// Per appliance, the epoch and send time of the latest grant that
    /// listed it: what it may keep running on (see [`Lease::deadline`]).
    listed: BTreeMap<String, (u64, Instant)>,
}

impl Lease {
    /// A renewal sent at `sent_at` was committed and granted these.
    /// An older renewal answered late never replaces a newer one.
    pub fn granted(&mut self, sent_at: Instant, grants: Vec<(String, u64)>) {
        if self.sent_at.is_some_and(|s| s > sent_at) {
            return;
        }
        self.sent_at = Some(sent_at);
        self.grants = grants.into_iter().collect();
        for (app, epoch) in &self.grants {
            self.listed.insert(app.clone(), (*epoch, sent_at));
        }
        // An appliance no grant listed for long has no deadline left.
        self.listed
            .retain(|_, (_, s)| sent_at.saturating_duration_since(*s) < PRUNE_LISTED_AFTER);
    }

    /// When the lease ends (none: never granted).
    #[must_use]
    pub fn expires(&self, cfg: &LeaseConfig) -> Option<Instant> {
        self.sent_at.map(|s| s + cfg.lease)
    }

    /// When this rack must have begun stopping what it runs.
    #[must_use]
    pub fn fence_at(&self, cfg: &LeaseConfig) -> Option<Instant> {
        self.sent_at.map(|s| s + cfg.lease - cfg.fence_before)
    }

    /// Whether `app` at `epoch` may run (or keep running) at `now`.
    #[must_use]
    pub fn may_run(&self, app: &str, epoch: u64, now: Instant, cfg: &LeaseConfig) -> bool {
        self.grants.get(app) == Some(&epoch) && self.fence_at(cfg).is_some_and(|f| now < f)
    }

    /// The instant by which `app` at `epoch`, running, must be stopped:
    /// the fence time of the latest grant that listed it at that epoch,
    /// even when a newer grant no longer does; `None` if none did (stop
    /// now). A newer grant that drops it (it moved) leaves the deadline
    /// where it was: a new owner starts only after that grant's lease
    /// (module doc), so the rack may go on until then, which leaves it
    /// time to learn of the move from its log and hand the appliance over
    /// rather than fence it (the answer to its renewal often arrives
    /// first). Only a newer grant listing it moves the deadline later.
    #[must_use]
    pub fn deadline(&self, app: &str, epoch: u64, cfg: &LeaseConfig) -> Option<Instant> {
        match self.listed.get(app) {
            Some((e, sent)) if *e == epoch => Some(*sent + cfg.lease - cfg.fence_before),
            _ => None,
        }
    }

    /// Whether `app` at `epoch`, already running, may go on at `now`:
    /// before its [`Lease::deadline`]. Starting needs more
    /// ([`Lease::may_run`]: the latest grant lists it).
    #[must_use]
    pub fn covers(&self, app: &str, epoch: u64, now: Instant, cfg: &LeaseConfig) -> bool {
        self.deadline(app, epoch, cfg).is_some_and(|d| now < d)
    }

    /// When the latest grant was sent (none: never granted).
    #[must_use]
    pub fn sent_at(&self) -> Option<Instant> {
        self.sent_at
    }

    /// Whether the lease is current at all (some renewal still valid).
    #[must_use]
    pub fn held(&self, now: Instant, cfg: &LeaseConfig) -> bool {
        self.fence_at(cfg).is_some_and(|f| now < f)
    }

    /// The grants of the latest renewal.
    #[must_use]
    pub fn grants(&self) -> &BTreeMap<String, u64> {
        &self.grants
    }
}

/// How long an appliance no grant listed any more is remembered: longer
/// than any lease, so its deadline is long past.
const PRUNE_LISTED_AFTER: Duration = Duration::from_secs(3600);

/// What one rack learns, by applying the log, about when other racks'
/// leases certainly ended. Kept in memory only: after a restart or a
/// snapshot install everything counts from that moment (`horizon`), which
/// only ever makes a gate later.
#[derive(Debug, Clone)]
pub struct LeaseWatch {
    cfg: LeaseConfig,
    horizon: Instant,
    last_renew: HashMap<String, Instant>,
    gates: HashMap<String, (u64, Instant)>,
}

impl LeaseWatch {
    /// Start knowing nothing at `now`.
    #[must_use]
    pub fn new(cfg: LeaseConfig, now: Instant) -> Self {
        Self {
            cfg,
            horizon: now,
            last_renew: HashMap::new(),
            gates: HashMap::new(),
        }
    }

    /// A renewal of `rack`, which this rack saw at `seen` (its first
    /// receipt, else its apply: module doc), was applied. Renewals apply
    /// in log order; the latest applied counts, and never moves earlier.
    pub fn renew_applied(&mut self, rack: &str, seen: Instant) {
        let last = self.last_renew.entry(rack.to_owned()).or_insert(seen);
        *last = (*last).max(seen);
    }

    /// The assignment of `app` moved from `from` under the new `epoch`
    /// (called as it is applied).
    pub fn assignment_applied(&mut self, app: &str, epoch: u64, from: Option<&str>) {
        let from_gate = from.map_or(self.horizon, |r| {
            self.last_renew
                .get(r)
                .copied()
                .unwrap_or(self.horizon)
                .max(self.horizon)
        }) + self.cfg.lease
            + self.cfg.drift_margin;
        // An owner from two assignments ago (stopped, then placed again)
        // may still hold its lease: never let a gate move earlier.
        let gate = match self.gates.get(app) {
            Some((_, g)) => from_gate.max(*g),
            None => from_gate,
        };
        self.gates.insert(app.to_owned(), (epoch, gate));
    }

    /// An appliance carried over from a cluster that merged into this one
    /// was adopted at `now`. Its owner there stopped it before leaving, but
    /// this cluster never saw that owner's lease: no rack starts it before
    /// a whole lease (and the drift margin) from now.
    pub fn adopted(&mut self, app: &str, epoch: u64, now: Instant) {
        let gate = now + self.cfg.lease + self.cfg.drift_margin;
        let gate = match self.gates.get(app) {
            Some((_, g)) => gate.max(*g),
            None => gate,
        };
        self.gates.insert(app.to_owned(), (epoch, gate));
    }

    /// A snapshot replaced the state at `now`: renewals before it are unknown.
    pub fn snapshot_installed(&mut self, now: Instant) {
        self.horizon = now;
    }

    /// The earliest instant at which `app` may start under `epoch` on this
    /// rack without a handover from its previous owner.
    #[must_use]
    pub fn gate(&self, app: &str, epoch: u64) -> Instant {
        let unknown = self.horizon + self.cfg.lease + self.cfg.drift_margin;
        match self.gates.get(app) {
            Some((e, g)) if *e == epoch => *g,
            _ => unknown,
        }
    }

    /// The timings.
    #[must_use]
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// How long ago this rack saw `rack`'s last renewal that it applied
    /// (none: not since `horizon`).
    #[must_use]
    pub fn renew_age(&self, rack: &str, now: Instant) -> Option<Duration> {
        self.last_renew
            .get(rack)
            .map(|t| now.saturating_duration_since(*t))
    }
}

/// Most receipts [`Receipts`] keeps: far more than a log holds received
/// but not yet applied. Past it the oldest is forgotten, and its renewal
/// counts from its apply, which only makes a gate later.
pub const MAX_RECEIPTS: usize = 65_536;

/// When this rack first received each renewal entry now in its log, by
/// index, with the entry's id `I` (a Raft log id: index and term). The
/// log store records an entry as it is appended (on the leader: as it is
/// proposed), the state machine takes the record as it applies the entry
/// ([`LeaseWatch::renew_applied`]). In memory only: after a restart an
/// entry counts from its apply, which only makes a gate later.
#[derive(Debug)]
pub struct Receipts<I> {
    by_index: BTreeMap<u64, (I, Instant)>,
}

impl<I> Default for Receipts<I> {
    fn default() -> Self {
        Self {
            by_index: BTreeMap::new(),
        }
    }
}

impl<I: Copy + Eq> Receipts<I> {
    /// Entry `id` arrived at `index` at `now`. The same entry received again
    /// (a leader resending it) keeps its first receipt; another entry at
    /// that index (the log was truncated and rewritten) replaces it.
    pub fn received(&mut self, index: u64, id: I, now: Instant) {
        match self.by_index.get(&index) {
            Some((known, _)) if *known == id => {}
            _ => {
                self.by_index.insert(index, (id, now));
            }
        }
        while self.by_index.len() > MAX_RECEIPTS {
            self.by_index.pop_first();
        }
    }

    /// The log lost its entries from `index` on.
    pub fn truncated(&mut self, index: u64) {
        self.by_index.split_off(&index);
    }

    /// Entry `id` at `index` is applied: when it was received, if recorded
    /// for that very entry. Forgets every receipt up to `index`.
    /// Costs the receipts it forgets, not the ones still waiting: a
    /// follower catching up holds many.
    pub fn applied(&mut self, index: u64, id: I) -> Option<Instant> {
        let mut found = None;
        while let Some(first) = self.by_index.first_entry() {
            if *first.key() > index {
                break;
            }
            let (at, (known, received)) = first.remove_entry();
            if at == index && known == id {
                found = Some(received);
            }
        }
        found
    }

    /// How many receipts are kept.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_index.len()
    }

    /// Whether none is kept.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_index.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LeaseConfig {
        LeaseConfig::default()
    }

    #[test]
    fn an_owner_fences_before_its_lease_ends() {
        let t0 = Instant::now();
        let mut l = Lease::default();
        assert!(!l.may_run("a", 1, t0, &cfg()), "no lease before a grant");
        l.granted(t0, vec![("a".into(), 1)]);
        assert!(l.may_run("a", 1, t0 + Duration::from_secs(4), &cfg()));
        assert!(
            !l.may_run("a", 2, t0, &cfg()),
            "another epoch is not granted"
        );
        assert!(!l.may_run("b", 1, t0, &cfg()));
        let fence = l.fence_at(&cfg()).unwrap();
        assert!(!l.may_run("a", 1, fence, &cfg()));
        assert!(fence + cfg().fence_before == l.expires(&cfg()).unwrap());
    }

    #[test]
    fn a_late_answer_never_replaces_a_newer_grant() {
        let t0 = Instant::now();
        let mut l = Lease::default();
        l.granted(t0 + Duration::from_secs(2), vec![]);
        l.granted(t0, vec![("a".into(), 1)]);
        assert!(!l.may_run("a", 1, t0 + Duration::from_secs(2), &cfg()));
    }

    #[test]
    fn the_gate_is_the_last_renewal_before_the_move_plus_lease_and_margin() {
        let t0 = Instant::now();
        let c = cfg();
        let mut w = LeaseWatch::new(c, t0);
        w.renew_applied("r1", t0 + Duration::from_secs(10));
        w.assignment_applied("app", 2, Some("r1"));
        // Renewals applied after the move do not cover the app.
        w.renew_applied("r1", t0 + Duration::from_secs(11));
        assert_eq!(
            w.gate("app", 2),
            t0 + Duration::from_secs(10) + c.lease + c.drift_margin
        );
        // Any other epoch is unknown: counts from the horizon.
        assert_eq!(w.gate("app", 3), t0 + c.lease + c.drift_margin);
    }

    #[test]
    fn an_adopted_appliance_waits_a_full_lease_wherever_it_goes_next() {
        let t0 = Instant::now();
        let c = cfg();
        let mut w = LeaseWatch::new(c, t0);
        let adopted_at = t0 + Duration::from_secs(100);
        w.adopted("app", 7, adopted_at);
        let gate = adopted_at + c.lease + c.drift_margin;
        assert_eq!(w.gate("app", 7), gate, "its old owner keeps it: waits");
        // Placed elsewhere (its old owner, unknown here, is not renewing).
        w.assignment_applied("app", 8, Some("old"));
        assert_eq!(w.gate("app", 8), gate, "never earlier");
    }

    #[test]
    fn a_gate_never_moves_earlier_across_an_unplaced_step() {
        let t0 = Instant::now();
        let c = cfg();
        let mut w = LeaseWatch::new(c, t0);
        w.renew_applied("r1", t0 + Duration::from_secs(30));
        w.assignment_applied("app", 2, Some("r1")); // preempted: owner none
        w.assignment_applied("app", 3, None); // placed elsewhere later
        assert_eq!(
            w.gate("app", 3),
            t0 + Duration::from_secs(30) + c.lease + c.drift_margin
        );
    }

    #[test]
    fn after_a_restart_or_snapshot_everything_waits_a_full_lease() {
        let t0 = Instant::now();
        let c = cfg();
        let mut w = LeaseWatch::new(c, t0);
        w.renew_applied("r1", t0);
        let later = t0 + Duration::from_secs(100);
        w.snapshot_installed(later);
        w.assignment_applied("app", 5, Some("r1"));
        assert_eq!(w.gate("app", 5), later + c.lease + c.drift_margin);
    }

    /// The inequality chain of the module doc, for the defaults and for
    /// timings at the edge of what `validate` accepts.
    #[test]
    fn fencing_ends_before_the_lease_and_well_before_any_gate() {
        let edge = LeaseConfig {
            fence_grace: Duration::from_millis(2499),
            ..cfg()
        };
        for c in [cfg(), edge] {
            c.validate().unwrap();
            let t0 = Instant::now();
            let sent = t0 + Duration::from_secs(5);
            let mut l = Lease::default();
            l.granted(sent, vec![("app".into(), 3)]);
            let deadline = l.deadline("app", 3, &c).unwrap();
            let dead = c.fencing_ends(deadline);
            assert!(dead < l.expires(&c).unwrap(), "{c:?}");
            // The new owner applied that renewal no earlier than it was sent.
            let mut w = LeaseWatch::new(c, t0);
            w.renew_applied("old", sent);
            w.assignment_applied("app", 4, Some("old"));
            let gate = w.gate("app", 4);
            assert!(gate >= dead + c.gate_margin(), "{c:?}");
            assert!(c.gate_margin() > c.drift_margin, "{c:?}");
        }
        assert_eq!(cfg().gate_margin(), Duration::from_secs(2));
    }

    #[test]
    fn a_grace_that_leaves_no_time_to_kill_is_refused() {
        let bad = LeaseConfig {
            fence_grace: Duration::from_millis(2500),
            ..cfg()
        };
        let e = bad.validate().unwrap_err();
        assert!(e.contains("fence_grace_ms"), "{e}");
    }

    #[test]
    fn a_deadline_moves_only_with_a_newer_grant() {
        let c = cfg();
        let t0 = Instant::now();
        let mut l = Lease::default();
        assert_eq!(l.deadline("a", 1, &c), None);
        l.granted(t0, vec![("a".into(), 1)]);
        let d0 = l.deadline("a", 1, &c).unwrap();
        assert_eq!(d0, t0 + c.lease - c.fence_before);
        // A late answer to an older renewal changes nothing.
        l.granted(t0 - Duration::from_secs(1), vec![("a".into(), 1)]);
        assert_eq!(l.deadline("a", 1, &c), Some(d0));
        // Another epoch: stop now.
        assert_eq!(l.deadline("a", 2, &c), None);
        // A grant without it (it moved): it may go on until the fence time
        // of the last grant that listed it, no later; it may not start.
        let t1 = t0 + Duration::from_secs(1);
        l.granted(t1, vec![]);
        assert_eq!(l.deadline("a", 1, &c), Some(d0));
        assert!(l.covers("a", 1, t1, &c));
        assert!(!l.covers("a", 1, d0, &c));
        assert!(!l.may_run("a", 1, t1, &c));
        // Listed again at a new epoch: the old one has no deadline left.
        l.granted(t0 + Duration::from_secs(2), vec![("a".into(), 3)]);
        assert_eq!(l.deadline("a", 1, &c), None);
        assert!(l.covers("a", 3, t1, &c));
    }

    /// The safety chain holds for the deadline a dropped appliance keeps:
    /// a new owner's gate counts from its own apply of the old owner's
    /// last renewal before the move, which listed the appliance, so it
    /// is after that grant's fencing ends.
    #[test]
    fn a_dropped_appliance_is_dead_before_any_new_owner_may_start_it() {
        let c = cfg();
        let t0 = Instant::now();
        let mut l = Lease::default();
        let mut w = LeaseWatch::new(c, t0);
        // Renewals sent at 0, 1, 2 s, each applied on the new owner 300 ms
        // later; the move is applied between the second and the third.
        for (i, listed) in [(0u64, true), (1, true), (2, false)] {
            let sent = t0 + Duration::from_secs(i);
            if !listed {
                w.assignment_applied("app", 2, Some("old"));
            }
            w.renew_applied("old", sent + Duration::from_millis(300));
            let grants = if listed {
                vec![("app".into(), 1)]
            } else {
                vec![]
            };
            l.granted(sent, grants);
        }
        let deadline = l.deadline("app", 1, &c).expect("kept");
        assert_eq!(
            deadline,
            t0 + Duration::from_secs(1) + c.lease - c.fence_before
        );
        assert!(c.fencing_ends(deadline) + c.gate_margin() <= w.gate("app", 2));
    }

    #[test]
    fn a_receipt_is_the_first_of_that_very_entry() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut r = Receipts::default();
        r.received(5, (1, 5), at(0));
        r.received(6, (1, 6), at(10));
        // The leader sends entry 5 again: its first receipt stands.
        r.received(5, (1, 5), at(20));
        // Entry 6 of term 1 is truncated away, term 2 writes another.
        r.truncated(6);
        assert_eq!(r.len(), 1);
        r.received(6, (2, 6), at(30));
        r.received(7, (2, 7), at(40));
        assert_eq!(r.applied(5, (1, 5)), Some(at(0)));
        // Applying a different entry than the one received finds nothing.
        assert_eq!(r.applied(6, (1, 6)), None);
        assert_eq!(r.len(), 1, "everything up to an applied index is forgotten");
        assert_eq!(r.applied(7, (2, 7)), Some(at(40)));
        assert!(r.is_empty());
        // Entries applied after a restart were never received here.
        assert_eq!(r.applied(8, (2, 8)), None);
    }

    #[test]
    fn receipts_are_bounded_and_forget_the_oldest() {
        let t0 = Instant::now();
        let mut r = Receipts::default();
        for i in 0..(MAX_RECEIPTS as u64 + 10) {
            r.received(i, i, t0);
        }
        assert_eq!(r.len(), MAX_RECEIPTS);
        assert_eq!(r.applied(3, 3), None, "forgotten: counts from its apply");
        assert_eq!(r.applied(20, 20), Some(t0));
    }

    #[test]
    fn the_latest_renewal_counts_and_never_moves_earlier() {
        let c = cfg();
        let t0 = Instant::now();
        let mut w = LeaseWatch::new(c, t0);
        w.renew_applied("old", t0 + Duration::from_secs(5));
        // An entry later in the log, seen earlier (its receipt was kept,
        // the one before it was forgotten): the later instant stands.
        w.renew_applied("old", t0 + Duration::from_secs(4));
        w.assignment_applied("app", 2, Some("old"));
        assert_eq!(
            w.gate("app", 2),
            t0 + Duration::from_secs(5) + c.lease + c.drift_margin
        );
    }

    /// The leader dies: its followers received the old owner's last
    /// renewal at once but apply it only after the election. The gate
    /// counts from the receipt, an election earlier, and still after
    /// the old owner's copy is dead, whatever the delays.
    #[test]
    fn a_gate_from_a_receipt_is_still_after_the_old_owner_is_dead() {
        let c = cfg();
        let t0 = Instant::now();
        for (receipt_ms, apply_ms) in [(0u64, 0u64), (1, 6000), (40, 9000), (2000, 2500)] {
            let mut l = Lease::default();
            let mut w = LeaseWatch::new(c, t0);
            let sent = t0 + Duration::from_secs(1);
            l.granted(sent, vec![("app".into(), 1)]);
            let seen = (sent + Duration::from_millis(receipt_ms))
                .min(sent + Duration::from_millis(apply_ms));
            w.renew_applied("old", seen);
            w.assignment_applied("app", 2, Some("old"));
            let gate = w.gate("app", 2);
            assert_eq!(gate, seen + c.lease + c.drift_margin);
            let deadline = l.deadline("app", 1, &c).expect("listed");
            assert!(c.fencing_ends(deadline) + c.gate_margin() <= gate);
        }
    }

    #[test]
    fn default_timings_are_consistent() {
        assert!(cfg().validate().is_ok());
        let bad = LeaseConfig {
            fence_before: Duration::from_secs(9),
            ..cfg()
        };
        assert!(bad.validate().is_err());
    }
}
