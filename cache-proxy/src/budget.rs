//! The backhaul budget: a bytes/s cap shared by priority classes, and a
//! daily byte quota.
//!
//! - **Rate.** One token bucket (`bytes_per_sec`, burst of one second's
//!   worth). Bytes are charged as they arrive, so a capped link slows the
//!   download itself. Classes are strictly ordered: interactive requests,
//!   then tile seeding, then cache sync. A lower class takes tokens only when
//!   no higher class is waiting *and* the bucket holds more than its reserve
//!   (a quarter of the burst for seeding, half for sync), so a burst of
//!   interactive traffic always finds tokens.
//! - **Quota.** Bytes per UTC day. A fetch may *start* only while its class
//!   is under its share of the quota (all of it for interactive,
//!   [`SEEDING_QUOTA_SHARE`] for seeding, [`SYNC_QUOTA_SHARE`] for sync, so
//!   background work can never eat the last of the day's bytes). A response
//!   that declares its length is *reserved* before its body is fetched
//!   ([`BudgetCore::reserve`]): refused if the bytes used, those declared
//!   by responses still arriving and its own would take the class past its
//!   share. A response of unknown length that started within quota
//!   finishes. The day rolls over at 00:00 UTC.
//!
//! - **The field's budget.** `field_daily_quota_bytes` and
//!   `field_bytes_per_sec` hold for the field's uplinks as a whole. The
//!   quota is enforced by *grants*: the field's control plane hands each
//!   uplink bytes it may fetch today ([`BudgetCore::set_field_grant`];
//!   the grants never add up to more than the quota), and a fetch over this
//!   rack's uplink (for its clients or another rack's) starts only while
//!   the rack has used less than its grant. What to ask for is
//!   [`BudgetCore::field_ask`]. Every rack also tells the others what its
//!   uplink used today ([`PeerUse`], in the gossiped uplink report): the
//!   class shares apply to the field's use as to the rack's, and the
//!   field's rate is split evenly among the uplinks in use.
//!
//! The core is sans-IO ([`BudgetCore`]: time passed in); [`Budget`] wraps it
//! with a mutex and tokio sleeps.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Traffic class, in priority order.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// A person is waiting.
    #[default]
    Interactive = 0,
    /// Bulk tile seeding.
    Seeding = 1,
    /// Cache synchronisation with the mesh or upstream refreshes.
    Sync = 2,
}

impl Class {
    const ALL: [Class; 3] = [Class::Interactive, Class::Seeding, Class::Sync];
    fn idx(self) -> usize {
        self as usize
    }
    /// Fraction of the bucket's burst this class leaves for higher classes.
    fn reserve(self) -> f64 {
        match self {
            Class::Interactive => 0.0,
            Class::Seeding => 0.25,
            Class::Sync => 0.5,
        }
    }
    /// Fraction of the daily quota this class may use.
    fn quota_share(self) -> f64 {
        match self {
            Class::Interactive => 1.0,
            Class::Seeding => SEEDING_QUOTA_SHARE,
            Class::Sync => SYNC_QUOTA_SHARE,
        }
    }
}

/// Seeding stops starting downloads once 80 % of the day's quota is used:
/// the rest is kept for people.
pub const SEEDING_QUOTA_SHARE: f64 = 0.8;
/// Cache sync stops at 60 %.
pub const SYNC_QUOTA_SHARE: f64 = 0.6;
/// Longest single sleep while waiting for tokens; waiters re-check priority
/// at least this often.
pub const MAX_WAIT_SLICE: Duration = Duration::from_millis(100);

/// The daily quota is used up for this class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("daily backhaul quota used up for {0:?} traffic")]
pub struct QuotaExhausted(pub Class);

/// A response declares more bytes than are left of its class's share of
/// today's quota ([`BudgetCore::reserve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a response of {declared} bytes does not fit in the {left} bytes left of today's backhaul quota for {class:?} traffic")]
pub struct TooLarge {
    pub class: Class,
    pub declared: u64,
    pub left: u64,
}

/// Budget figures for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct BudgetStats {
    /// Configured cap, 0 = none.
    pub bytes_per_sec: u64,
    /// Configured quota, 0 = none.
    pub daily_quota_bytes: u64,
    /// Bytes used since 00:00 UTC.
    pub used_today_bytes: u64,
    /// What is left today; `None` without a quota.
    pub left_today_bytes: Option<u64>,
    /// Bytes by class since start: interactive, seeding, sync.
    pub bytes_by_class: [u64; 3],
    /// The field's daily quota (all racks' uplinks), 0 = none.
    pub field_daily_quota_bytes: u64,
    /// The field's bytes/s cap (all racks' uplinks), 0 = none.
    pub field_bytes_per_sec: u64,
    /// Bytes the field's uplinks used today: this rack's and the others'
    /// last reports.
    pub field_used_today_bytes: u64,
    /// What the field has left today; `None` without a field quota.
    pub field_left_today_bytes: Option<u64>,
    /// Uplinks in use across the field, this rack's included (the field's
    /// rate is split among them).
    pub field_uplinks: u32,
    /// The control plane's grant of the field's quota to this uplink
    /// today; `None` without a field quota or a grant.
    pub field_granted_today_bytes: Option<u64>,
}

/// What another rack's uplink used, from its last report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerUse {
    /// The report's UTC day (Unix seconds / 86 400).
    pub day: u64,
    /// Bytes its uplink used that day.
    pub used_today_bytes: u64,
    /// Its uplink is usable (up or degraded) and the report is recent.
    pub uplink_in_use: bool,
}

/// Sans-IO budget state.
#[derive(Debug, Clone)]
pub struct BudgetCore {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
    quota: u64,
    day: u64,
    used_today: u64,
    waiting: [u32; 3],
    by_class: [u64; 3],
    /// This rack's own cap (the rate in force may be lower: the field's
    /// share).
    own_rate: f64,
    field_quota: u64,
    field_rate: f64,
    /// The other racks' bytes today, from their last reports.
    others_used: u64,
    /// Other racks whose uplinks are in use.
    other_uplinks: u32,
    /// The control plane's grant: (UTC day, bytes this uplink may fetch
    /// that day in all).
    field_grant: Option<(u64, u64)>,
    /// `used_today` at the last [`BudgetCore::field_ask`].
    used_at_ask: u64,
    /// Since when (Unix seconds) the uplink is down, as the renewals saw.
    down_since: Option<u64>,
    /// A fetch was refused for want of a grant since the last ask.
    starved: bool,
    /// Bytes that responses under way declared and have not delivered
    /// yet ([`BudgetCore::reserve`]); they count against the quotas.
    reserved: u64,
}

/// What this rack's uplink used of the field's quota and asks for more
/// (sent to the control plane with every lease renewal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FieldAsk {
    /// The UTC day.
    pub day: u64,
    /// The field's daily quota as configured here.
    pub field_quota_bytes: u64,
    /// Bytes this uplink fetched today.
    pub used_today_bytes: u64,
    /// Bytes to add to its grant (0: it holds enough).
    pub want_bytes: u64,
    /// The uplink is down: give back what is unused of the grant.
    pub release: bool,
}

/// How long an uplink stays down before it gives back the unused part of
/// its grant of the field's quota ([`BudgetCore::field_release`]).
pub const RELEASE_AFTER_SECS: u64 = 5;
/// The least a rack keeps in hand of the field's quota (more: see
/// [`BudgetCore::field_ask`]).
pub const MIN_GRANT_WANTED: u64 = 64 * 1024;
/// A rack asks for this long of its uplink's capped rate at a time.
pub const GRANT_HORIZON: Duration = Duration::from_secs(10);

impl BudgetCore {
    /// A budget of `bytes_per_sec` (0 = unlimited) and `daily_quota` (0 = none).
    pub fn new(bytes_per_sec: u64, daily_quota: u64) -> BudgetCore {
        BudgetCore::with_field(bytes_per_sec, daily_quota, 0, 0)
    }

    /// A budget with this rack's caps and the field's (`field_bytes_per_sec`
    /// and `field_daily_quota` for all racks' uplinks together; 0 = none).
    pub fn with_field(
        bytes_per_sec: u64,
        daily_quota: u64,
        field_bytes_per_sec: u64,
        field_daily_quota: u64,
    ) -> BudgetCore {
        let mut c = BudgetCore {
            rate: 0.0,
            burst: 0.0,
            tokens: 0.0,
            last: None,
            quota: daily_quota,
            day: 0,
            used_today: 0,
            waiting: [0; 3],
            by_class: [0; 3],
            own_rate: bytes_per_sec as f64,
            field_quota: field_daily_quota,
            field_rate: field_bytes_per_sec as f64,
            others_used: 0,
            other_uplinks: 0,
            field_grant: None,
            used_at_ask: 0,
            down_since: None,
            starved: false,
            reserved: 0,
        };
        c.set_rate();
        c.tokens = c.burst;
        c
    }

    /// The rate in force: this rack's cap and its share of the field's.
    fn set_rate(&mut self) {
        let share = self.field_rate / f64::from(1 + self.other_uplinks);
        self.rate = match (self.own_rate > 0.0, self.field_rate > 0.0) {
            (true, true) => self.own_rate.min(share),
            (true, false) => self.own_rate,
            (false, true) => share,
            (false, false) => 0.0,
        };
        self.burst = self.rate;
        self.tokens = self.tokens.min(self.burst);
    }

    fn roll(&mut self, unix_secs: u64) {
        let day = unix_secs / 86_400;
        if day != self.day {
            self.day = day;
            self.used_today = 0;
            self.others_used = 0;
            self.used_at_ask = 0;
        }
    }

    /// Takes in the other racks' last reports (all of them, each time).
    pub fn note_peers(&mut self, peers: &[PeerUse], unix_secs: u64) {
        self.roll(unix_secs);
        self.others_used = peers
            .iter()
            .filter(|p| p.day == self.day)
            .map(|p| p.used_today_bytes)
            .sum();
        self.other_uplinks = peers.iter().filter(|p| p.uplink_in_use).count() as u32;
        self.set_rate();
    }

    /// Takes in the control plane's grant: this uplink may fetch `granted`
    /// bytes in all on UTC day `day` (`None`: no grant for that day).
    pub fn set_field_grant(&mut self, day: u64, granted: Option<u64>) {
        match granted {
            Some(g) => {
                // Grants only grow within a day: an older copy of the
                // field's state never takes bytes back.
                let g = match self.field_grant {
                    Some((d, old)) if d == day => old.max(g),
                    _ => g,
                };
                self.field_grant = Some((day, g));
            }
            None if self.field_grant.is_some_and(|(d, _)| d == day) => {}
            None => self.field_grant = None,
        }
    }

    /// What to tell the control plane with the next renewal (call it once
    /// per renewal); `None` without a field quota. It keeps in hand the
    /// most of [`MIN_GRANT_WANTED`], [`GRANT_HORIZON`] of its capped rate,
    /// and four times what it used since the last ask (so an uncapped
    /// uplink's grants grow fourfold a renewal while it is busy), and asks
    /// for more once less than half of that is left of its grant. An
    /// uplink not `proven` (no probe has answered yet) asks only once a
    /// fetch found no grant, so a rack without a working uplink holds
    /// none of the field's bytes.
    pub fn field_ask(&mut self, unix_secs: u64, proven: bool) -> Option<FieldAsk> {
        self.roll(unix_secs);
        self.down_since = None;
        let starved = std::mem::take(&mut self.starved);
        if self.field_quota == 0 || !(proven || starved) {
            return None;
        }
        let granted = match self.field_grant {
            Some((d, g)) if d == self.day => g,
            _ => 0,
        };
        let in_hand = granted.saturating_sub(self.used_today);
        let lately = self.used_today.saturating_sub(self.used_at_ask);
        self.used_at_ask = self.used_today;
        let keep = ((self.rate * GRANT_HORIZON.as_secs_f64()) as u64)
            .max(MIN_GRANT_WANTED)
            .max(lately.saturating_mul(4));
        Some(FieldAsk {
            day: self.day,
            field_quota_bytes: self.field_quota,
            used_today_bytes: self.used_today,
            want_bytes: if in_hand < keep / 2 {
                keep - in_hand
            } else {
                0
            },
            release: false,
        })
    }

    /// What to tell the control plane with the next renewal while the
    /// uplink is down: once it has been down for [`RELEASE_AFTER_SECS`]
    /// (a link that flaps keeps its grant), the unused part of the grant
    /// goes back to the field and is no longer ours to spend; `None`
    /// before that, and without a field quota.
    pub fn field_release(&mut self, unix_secs: u64) -> Option<FieldAsk> {
        self.roll(unix_secs);
        let since = *self.down_since.get_or_insert(unix_secs);
        if self.field_quota == 0 || unix_secs.saturating_sub(since) < RELEASE_AFTER_SECS {
            return None;
        }
        if let Some((d, g)) = self.field_grant {
            if d == self.day {
                self.field_grant = Some((d, g.min(self.used_today)));
            }
        }
        self.used_at_ask = self.used_today;
        Some(FieldAsk {
            day: self.day,
            field_quota_bytes: self.field_quota,
            used_today_bytes: self.used_today,
            want_bytes: 0,
            release: true,
        })
    }

    /// Whether the field's quota lets a fetch of `class` start: this
    /// uplink under its grant for today, and the field's use (its last
    /// reports) under the class's share.
    fn field_allows(&self, class: Class) -> bool {
        if self.field_quota == 0 {
            return true;
        }
        let allowed = (self.field_quota as f64 * class.quota_share()) as u64;
        if self
            .used_today
            .saturating_add(self.others_used)
            .saturating_add(self.reserved)
            >= allowed
        {
            return false;
        }
        matches!(self.field_grant, Some((d, g)) if d == self.day && self.used_today < g)
    }

    /// [`BudgetCore::field_allows`], noting a refusal for want of a grant.
    fn field_allows_noting(&mut self, class: Class) -> bool {
        let ok = self.field_allows(class);
        if !ok && self.field_quota > 0 {
            let allowed = (self.field_quota as f64 * class.quota_share()) as u64;
            self.starved |= self.used_today + self.others_used < allowed;
        }
        ok
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        }
        self.last = Some(now);
    }

    /// Whether a fetch of `class` may start now.
    ///
    /// # Errors
    /// The class's share of today's quota is used.
    pub fn may_start(&mut self, class: Class, unix_secs: u64) -> Result<(), QuotaExhausted> {
        self.roll(unix_secs);
        if !self.field_allows_noting(class) {
            return Err(QuotaExhausted(class));
        }
        if self.quota == 0 {
            return Ok(());
        }
        let allowed = (self.quota as f64 * class.quota_share()) as u64;
        if self.used_today.saturating_add(self.reserved) >= allowed {
            return Err(QuotaExhausted(class));
        }
        Ok(())
    }

    /// What is left of `class`'s share today, after the bytes used and
    /// those reserved: of the rack's quota and of the field's as the
    /// reports tell it, whichever is less; `None` without a quota.
    #[must_use]
    pub fn left_for(&mut self, class: Class, unix_secs: u64) -> Option<u64> {
        self.roll(unix_secs);
        let share = |quota: u64| (quota as f64 * class.quota_share()) as u64;
        let spoken = self.used_today.saturating_add(self.reserved);
        let rack = (self.quota > 0).then(|| share(self.quota).saturating_sub(spoken));
        let field = (self.field_quota > 0).then(|| {
            share(self.field_quota).saturating_sub(spoken.saturating_add(self.others_used))
        });
        match (rack, field) {
            (Some(r), Some(f)) => Some(r.min(f)),
            (r, f) => r.or(f),
        }
    }

    /// Reserves `declared` bytes for a response of `class` whose body is
    /// about to be fetched: refused, with what is left, if they do not
    /// fit in [`BudgetCore::left_for`]. The bytes count against the quotas
    /// until they arrive ([`BudgetCore::release`] as they are charged) or
    /// the fetch ends. The field's grants are not asked for them: a grant
    /// covers seconds of the uplink, and a large response is charged to
    /// the next grants as it arrives.
    ///
    /// # Errors
    /// [`TooLarge`] when they do not fit.
    pub fn reserve(&mut self, class: Class, declared: u64, unix_secs: u64) -> Result<(), TooLarge> {
        if let Some(left) = self.left_for(class, unix_secs) {
            if declared > left {
                return Err(TooLarge {
                    class,
                    declared,
                    left,
                });
            }
        }
        self.reserved = self.reserved.saturating_add(declared);
        Ok(())
    }

    /// `n` reserved bytes arrived (and were charged) or will not come.
    pub fn release(&mut self, n: u64) {
        self.reserved = self.reserved.saturating_sub(n);
    }

    /// Tries to take `n` bytes for `class`. `Ok(())` when taken (the bytes
    /// are counted against the quota), else how long to wait before asking
    /// again.
    pub fn try_take(
        &mut self,
        class: Class,
        n: u64,
        now: Instant,
        unix_secs: u64,
    ) -> Result<(), Duration> {
        self.roll(unix_secs);
        if self.rate > 0.0 {
            self.refill(now);
            let higher_waiting = Class::ALL[..class.idx()]
                .iter()
                .any(|c| self.waiting[c.idx()] > 0);
            let floor = self.burst * class.reserve();
            if higher_waiting {
                return Err(MAX_WAIT_SLICE);
            }
            if self.tokens <= floor {
                let need = floor - self.tokens + (n as f64).min(self.burst) * 0.1 + 1.0;
                return Err(Duration::from_secs_f64(need / self.rate).min(MAX_WAIT_SLICE));
            }
            // May go into debt: the next taker waits it off.
            self.tokens -= n as f64;
        }
        self.used_today += n;
        self.by_class[class.idx()] += n;
        Ok(())
    }

    /// Registers (`+1`) or unregisters (`-1`) a waiter of `class`.
    pub fn set_waiting(&mut self, class: Class, delta: i32) {
        let w = &mut self.waiting[class.idx()];
        *w = (*w as i32 + delta).max(0) as u32;
    }

    /// Figures.
    pub fn stats(&mut self, unix_secs: u64) -> BudgetStats {
        self.roll(unix_secs);
        BudgetStats {
            bytes_per_sec: self.own_rate as u64,
            daily_quota_bytes: self.quota,
            used_today_bytes: self.used_today,
            left_today_bytes: (self.quota > 0).then(|| self.quota.saturating_sub(self.used_today)),
            bytes_by_class: self.by_class,
            field_daily_quota_bytes: self.field_quota,
            field_bytes_per_sec: self.field_rate as u64,
            field_used_today_bytes: self.used_today + self.others_used,
            field_left_today_bytes: (self.field_quota > 0).then(|| {
                self.field_quota
                    .saturating_sub(self.used_today + self.others_used)
            }),
            field_uplinks: 1 + self.other_uplinks,
            field_granted_today_bytes: match self.field_grant {
                Some((d, g)) if self.field_quota > 0 && d == self.day => Some(g),
                _ => None,
            },
        }
    }
}

/// The shared, async budget.
#[derive(Clone)]
pub struct Budget {
    core: Arc<Mutex<BudgetCore>>,
    clock: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget").field("core", &self.core).finish()
    }
}

impl Budget {
    /// A budget with the wall clock `clock` (Unix seconds) for the quota day.
    pub fn new(
        bytes_per_sec: u64,
        daily_quota: u64,
        clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    ) -> Budget {
        Budget::with_core(BudgetCore::new(bytes_per_sec, daily_quota), clock)
    }

    /// A budget around `core` (see [`BudgetCore::with_field`]).
    pub fn with_core(core: BudgetCore, clock: Arc<dyn Fn() -> u64 + Send + Sync>) -> Budget {
        Budget {
            core: Arc::new(Mutex::new(core)),
            clock,
        }
    }

    /// See [`BudgetCore::note_peers`].
    pub fn note_peers(&self, peers: &[PeerUse]) {
        let now = (self.clock)();
        self.core.lock().expect("lock").note_peers(peers, now);
    }

    /// Today's UTC day and this rack's bytes in it, for its uplink report.
    pub fn today(&self) -> (u64, u64) {
        let now = (self.clock)();
        let mut c = self.core.lock().expect("lock");
        c.roll(now);
        (c.day, c.used_today)
    }

    /// See [`BudgetCore::set_field_grant`].
    pub fn set_field_grant(&self, day: u64, granted: Option<u64>) {
        self.core
            .lock()
            .expect("lock")
            .set_field_grant(day, granted);
    }

    /// See [`BudgetCore::field_release`].
    pub fn field_release(&self) -> Option<FieldAsk> {
        let now = (self.clock)();
        self.core.lock().expect("lock").field_release(now)
    }

    /// See [`BudgetCore::field_ask`].
    pub fn field_ask(&self, proven: bool) -> Option<FieldAsk> {
        let now = (self.clock)();
        self.core.lock().expect("lock").field_ask(now, proven)
    }

    /// See [`BudgetCore::may_start`].
    ///
    /// # Errors
    /// Quota used up for `class`.
    pub fn may_start(&self, class: Class) -> Result<(), QuotaExhausted> {
        let now = (self.clock)();
        self.core.lock().expect("lock").may_start(class, now)
    }

    /// See [`BudgetCore::reserve`]: the reservation lasts as long as the
    /// returned [`Reservation`], which releases what did not arrive.
    ///
    /// # Errors
    /// [`TooLarge`] when the bytes do not fit.
    pub fn reserve(&self, class: Class, declared: u64) -> Result<Reservation, TooLarge> {
        let now = (self.clock)();
        self.core
            .lock()
            .expect("lock")
            .reserve(class, declared, now)?;
        Ok(Reservation {
            core: self.core.clone(),
            left: declared,
        })
    }

    /// Charges `n` bytes to `class`, waiting for the rate cap. Cancel-safe
    /// (a cancelled wait charges nothing).
    pub async fn consume(&self, class: Class, n: u64) {
        let mut registered = false;
        loop {
            let r = {
                let mut c = self.core.lock().expect("lock");
                let r = c.try_take(class, n, Instant::now(), (self.clock)());
                match (&r, registered) {
                    (Ok(()), true) => c.set_waiting(class, -1),
                    (Err(_), false) => c.set_waiting(class, 1),
                    _ => {}
                }
                r
            };
            match r {
                Ok(()) => return,
                Err(wait) => {
                    registered = true;
                    let guard = WaitGuard {
                        core: &self.core,
                        class,
                    };
                    tokio::time::sleep(wait).await;
                    std::mem::forget(guard);
                }
            }
        }
    }

    /// Figures.
    pub fn stats(&self) -> BudgetStats {
        let now = (self.clock)();
        self.core.lock().expect("lock").stats(now)
    }
}

/// Bytes a response under way declared and has not delivered yet
/// ([`Budget::reserve`]); dropping it releases the rest.
#[derive(Debug)]
pub struct Reservation {
    core: Arc<Mutex<BudgetCore>>,
    left: u64,
}

impl Reservation {
    /// `n` bytes of the response arrived (charge them with
    /// [`Budget::consume`]): that much is no longer reserved.
    pub fn arrived(&mut self, n: u64) {
        let n = n.min(self.left);
        if n > 0 {
            self.left -= n;
            self.core.lock().expect("lock").release(n);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.left > 0 {
            if let Ok(mut c) = self.core.lock() {
                c.release(self.left);
            }
        }
    }
}

/// Unregisters a waiter if its future is dropped mid-sleep.
struct WaitGuard<'a> {
    core: &'a Mutex<BudgetCore>,
    class: Class,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut c) = self.core.lock() {
            c.set_waiting(self.class, -1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(t: u64) -> Arc<dyn Fn() -> u64 + Send + Sync> {
        Arc::new(move || t)
    }

    #[tokio::test(start_paused = true)]
    async fn rate_cap_holds() {
        let b = Budget::new(10_000, 0, clock(1_700_000_000));
        let start = Instant::now();
        for _ in 0..500 {
            b.consume(Class::Interactive, 1000).await;
        }
        // 500 kB at 10 kB/s with a 10 kB burst: about 49 s.
        let took = start.elapsed().as_secs_f64();
        assert!((45.0..55.0).contains(&took), "{took}");
        assert_eq!(b.stats().bytes_by_class[0], 500_000);
    }

    #[tokio::test(start_paused = true)]
    async fn interactive_goes_first() {
        let b = Budget::new(10_000, 0, clock(1_700_000_000));
        let seeding = {
            let b = b.clone();
            tokio::spawn(async move {
                for _ in 0..100 {
                    b.consume(Class::Seeding, 1000).await;
                }
                Instant::now()
            })
        };
        let interactive = {
            let b = b.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                for _ in 0..100 {
                    b.consume(Class::Interactive, 1000).await;
                }
                Instant::now()
            })
        };
        let (s, i) = (seeding.await.unwrap(), interactive.await.unwrap());
        assert!(i < s, "interactive finished after seeding");
    }

    #[test]
    fn quota_and_shares() {
        let mut c = BudgetCore::new(0, 1000);
        let t = 1_700_000_000;
        let now = Instant::now();
        c.try_take(Class::Interactive, 700, now, t).unwrap();
        assert!(c.may_start(Class::Seeding, t).is_ok());
        assert!(c.may_start(Class::Sync, t).is_err(), "sync stops at 60 %");
        c.try_take(Class::Seeding, 150, now, t).unwrap();
        assert!(
            c.may_start(Class::Seeding, t).is_err(),
            "seeding stops at 80 %"
        );
        assert!(c.may_start(Class::Interactive, t).is_ok());
        assert_eq!(c.stats(t).left_today_bytes, Some(150));
        // Next UTC day: a fresh quota.
        assert!(c.may_start(Class::Sync, t + 86_400).is_ok());
        assert_eq!(c.stats(t + 86_400).left_today_bytes, Some(1000));
        assert_eq!(BudgetCore::new(0, 0).stats(t).left_today_bytes, None);
    }

    #[test]
    fn a_declared_length_is_reserved_against_the_quota_and_released() {
        let t = 1_700_000_000;
        let now = Instant::now();
        let mut c = BudgetCore::new(0, 1000);
        c.try_take(Class::Interactive, 300, now, t).unwrap();
        assert_eq!(c.left_for(Class::Interactive, t), Some(700));
        // Seeding may use 80 %: 500 left of its share.
        assert_eq!(c.left_for(Class::Seeding, t), Some(500));
        let e = c.reserve(Class::Seeding, 501, t).unwrap_err();
        assert_eq!((e.declared, e.left), (501, 500));
        c.reserve(Class::Interactive, 600, t).unwrap();
        // Two responses under way cannot both take the last bytes.
        assert_eq!(c.left_for(Class::Interactive, t), Some(100));
        assert!(c.reserve(Class::Interactive, 101, t).is_err());
        assert!(
            c.may_start(Class::Seeding, t).is_err(),
            "900 of 1000 spoken for"
        );
        // 400 arrive (charged, released); the rest is cut short.
        c.try_take(Class::Interactive, 400, now, t).unwrap();
        c.release(400);
        assert_eq!(c.left_for(Class::Interactive, t), Some(100));
        c.release(200);
        assert_eq!(c.left_for(Class::Interactive, t), Some(300));
        assert!(c.may_start(Class::Seeding, t).is_ok());
        // Without a quota anything fits, and nothing is left to say;
        // lying lengths do not overflow the books.
        let mut free = BudgetCore::new(0, 0);
        assert_eq!(free.left_for(Class::Interactive, t), None);
        for _ in 0..3 {
            free.reserve(Class::Sync, u64::MAX, t).unwrap();
        }
        assert!(free.may_start(Class::Interactive, t).is_ok());
        // With one, a lying length is refused.
        assert_eq!(
            c.reserve(Class::Interactive, u64::MAX, t).unwrap_err().left,
            300
        );
    }

    #[test]
    fn the_field_quota_bounds_a_reservation_but_not_the_grant() {
        let t = 1_700_000_000;
        let day = t / 86_400;
        let mut c = BudgetCore::with_field(0, 0, 0, 1000);
        c.set_field_grant(day, Some(100));
        c.note_peers(&[peer(day, 600, true)], t);
        assert_eq!(c.left_for(Class::Interactive, t), Some(400));
        // Larger than the grant, within the field's quota.
        c.reserve(Class::Interactive, 300, t).unwrap();
        assert!(c.reserve(Class::Interactive, 101, t).is_err());
        // A rack quota tighter than the field's wins.
        let mut both = BudgetCore::with_field(0, 200, 0, 1000);
        both.set_field_grant(day, Some(1000));
        assert_eq!(both.left_for(Class::Interactive, t), Some(200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_releases_what_did_not_arrive_when_dropped() {
        let b = Budget::new(0, 1000, clock(1_700_000_000));
        let mut r = b.reserve(Class::Interactive, 800).unwrap();
        assert!(b.reserve(Class::Interactive, 300).is_err());
        b.consume(Class::Interactive, 100).await;
        r.arrived(100);
        // 100 used, 700 still reserved.
        assert!(b.reserve(Class::Interactive, 201).is_err());
        drop(r);
        let again = b.reserve(Class::Interactive, 900).unwrap();
        drop(again);
        assert_eq!(b.stats().left_today_bytes, Some(900));
    }

    fn peer(day: u64, used: u64, in_use: bool) -> PeerUse {
        PeerUse {
            day,
            used_today_bytes: used,
            uplink_in_use: in_use,
        }
    }

    #[test]
    fn the_field_quota_counts_every_racks_uplink() {
        let t = 1_700_000_000;
        let day = t / 86_400;
        let now = Instant::now();
        // The field may use 1000 bytes a day; this rack's own quota is none.
        let mut c = BudgetCore::with_field(0, 0, 0, 1000);
        c.set_field_grant(day, Some(1000));
        c.note_peers(&[peer(day, 600, false), peer(day - 1, 5000, false)], t);
        assert_eq!(
            c.stats(t).field_used_today_bytes,
            600,
            "yesterday's bytes ignored"
        );
        assert!(c.may_start(Class::Interactive, t).is_ok());
        assert!(
            c.may_start(Class::Sync, t).is_err(),
            "sync stops at 60 % of the field"
        );
        c.try_take(Class::Interactive, 300, now, t).unwrap();
        assert!(
            c.may_start(Class::Seeding, t).is_err(),
            "seeding stops at 80 %"
        );
        assert!(c.may_start(Class::Interactive, t).is_ok());
        c.try_take(Class::Interactive, 100, now, t).unwrap();
        assert!(
            c.may_start(Class::Interactive, t).is_err(),
            "the field is out"
        );
        assert_eq!(c.stats(t).field_left_today_bytes, Some(0));
        // The next UTC day: the others' old reports no longer count.
        c.set_field_grant(day + 1, Some(1000));
        assert!(c.may_start(Class::Sync, t + 86_400).is_ok());
    }

    #[test]
    fn an_uplink_fetches_within_its_grant_and_asks_for_more_in_time() {
        let t = 1_700_000_000;
        let day = t / 86_400;
        let now = Instant::now();
        let mut c = BudgetCore::with_field(0, 0, 0, 1 << 30);
        // No grant yet: nothing starts, and it asks for what it keeps.
        assert!(c.may_start(Class::Interactive, t).is_err());
        let ask = c.field_ask(t, true).unwrap();
        assert_eq!((ask.day, ask.want_bytes), (day, MIN_GRANT_WANTED));
        c.set_field_grant(day, Some(MIN_GRANT_WANTED));
        assert_eq!(
            c.field_ask(t, true).unwrap().want_bytes,
            0,
            "enough in hand"
        );
        // A fetch that starts within the grant finishes.
        assert!(c.may_start(Class::Interactive, t).is_ok());
        c.try_take(Class::Interactive, MIN_GRANT_WANTED - 100, now, t)
            .unwrap();
        let ask = c.field_ask(t, true).unwrap();
        // A busy uplink keeps four times what it used since the last ask.
        assert_eq!(ask.want_bytes, 4 * (MIN_GRANT_WANTED - 100) - 100);
        assert_eq!(ask.used_today_bytes, MIN_GRANT_WANTED - 100);
        // Idle since: back to the least.
        assert_eq!(
            c.field_ask(t, true).unwrap().want_bytes,
            MIN_GRANT_WANTED - 100
        );
        c.try_take(Class::Interactive, 500, now, t).unwrap();
        assert!(c.may_start(Class::Interactive, t).is_err(), "grant used");
        // An older copy of the grant never takes bytes back; a new one
        // lets fetches start again.
        c.set_field_grant(day, Some(10));
        assert!(c.may_start(Class::Interactive, t).is_err());
        c.set_field_grant(day, Some(2 * MIN_GRANT_WANTED));
        assert!(c.may_start(Class::Interactive, t).is_ok());
        // Yesterday's grant does not count today.
        assert!(c.may_start(Class::Interactive, t + 86_400).is_err());
        assert_eq!(c.field_ask(t + 86_400, true).unwrap().used_today_bytes, 0);
        // An uplink no probe has answered asks only once a fetch found no
        // grant.
        let mut d = BudgetCore::with_field(0, 0, 0, 1 << 30);
        assert_eq!(d.field_ask(t, false), None);
        assert!(d.may_start(Class::Interactive, t).is_err());
        assert!(d.field_ask(t, false).is_some());
        assert_eq!(d.field_ask(t, false), None);
        // Without a field quota there is nothing to ask.
        assert_eq!(BudgetCore::with_field(0, 0, 0, 0).field_ask(t, true), None);
    }

    #[test]
    fn a_down_uplink_gives_back_its_unused_grant() {
        let t = 1_700_000_000;
        let day = t / 86_400;
        let now = Instant::now();
        let mut c = BudgetCore::with_field(0, 0, 0, 1 << 20);
        c.field_ask(t, true).unwrap();
        c.set_field_grant(day, Some(5_000));
        c.try_take(Class::Interactive, 1_200, now, t).unwrap();
        // A link down for less than RELEASE_AFTER_SECS keeps its grant.
        assert_eq!(c.field_release(t), None);
        assert_eq!(c.field_release(t + RELEASE_AFTER_SECS - 1), None);
        assert!(c.may_start(Class::Interactive, t).is_ok());
        let t = t + RELEASE_AFTER_SECS;
        let ask = c.field_release(t).expect("a field quota: it tells");
        assert!(ask.release);
        assert_eq!((ask.want_bytes, ask.used_today_bytes), (0, 1_200));
        // What it gave back is no longer its to spend.
        assert!(c.may_start(Class::Interactive, t).is_err());
        // Back up: it asks again.
        assert!(c.field_ask(t, true).unwrap().want_bytes > 0);
        assert_eq!(
            c.field_release(t + 1),
            None,
            "up again: the clock starts over"
        );
        let mut none = BudgetCore::with_field(0, 0, 0, 0);
        none.field_release(t);
        assert_eq!(none.field_release(t + RELEASE_AFTER_SECS), None);
    }

    #[test]
    fn a_capped_uplink_keeps_ten_seconds_of_its_rate_in_hand() {
        let mut c = BudgetCore::with_field(1_000_000, 0, 0, 1 << 30);
        let ask = c.field_ask(1_700_000_000, true).unwrap();
        assert_eq!(ask.want_bytes, 10_000_000);
    }

    #[tokio::test(start_paused = true)]
    async fn the_field_rate_is_split_among_the_uplinks_in_use() {
        let t = 1_700_000_000;
        let b = Budget::with_core(BudgetCore::with_field(0, 0, 20_000, 0), clock(t));
        b.note_peers(&[peer(t / 86_400, 0, true), peer(t / 86_400, 0, false)]);
        let start = Instant::now();
        for _ in 0..200 {
            b.consume(Class::Interactive, 1000).await;
        }
        // 200 kB at half of 20 kB/s, 10 kB burst: about 19 s.
        let took = start.elapsed().as_secs_f64();
        assert!((17.0..22.0).contains(&took), "{took}");
        assert_eq!(b.stats().field_uplinks, 2);
    }
}
