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
//!   background work can never eat the last of the day's bytes); a download
//!   that started within quota finishes. The day rolls over at 00:00 UTC.
//!
//! The core is sans-IO ([`BudgetCore`]: time passed in); [`Budget`] wraps it
//! with a mutex and tokio sleeps.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Traffic class, in priority order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// A person is waiting.
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
}

impl BudgetCore {
    /// A budget of `bytes_per_sec` (0 = unlimited) and `daily_quota` (0 = none).
    pub fn new(bytes_per_sec: u64, daily_quota: u64) -> BudgetCore {
        BudgetCore {
            rate: bytes_per_sec as f64,
            burst: bytes_per_sec as f64,
            tokens: bytes_per_sec as f64,
            last: None,
            quota: daily_quota,
            day: 0,
            used_today: 0,
            waiting: [0; 3],
            by_class: [0; 3],
        }
    }

    fn roll(&mut self, unix_secs: u64) {
        let day = unix_secs / 86_400;
        if day != self.day {
            self.day = day;
            self.used_today = 0;
        }
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
        if self.quota == 0 {
            return Ok(());
        }
        let allowed = (self.quota as f64 * class.quota_share()) as u64;
        if self.used_today >= allowed {
            return Err(QuotaExhausted(class));
        }
        Ok(())
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
            bytes_per_sec: self.rate as u64,
            daily_quota_bytes: self.quota,
            used_today_bytes: self.used_today,
            left_today_bytes: (self.quota > 0).then(|| self.quota.saturating_sub(self.used_today)),
            bytes_by_class: self.by_class,
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
        Budget {
            core: Arc::new(Mutex::new(BudgetCore::new(bytes_per_sec, daily_quota))),
            clock,
        }
    }

    /// See [`BudgetCore::may_start`].
    ///
    /// # Errors
    /// Quota used up for `class`.
    pub fn may_start(&self, class: Class) -> Result<(), QuotaExhausted> {
        let now = (self.clock)();
        self.core.lock().expect("lock").may_start(class, now)
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
}
