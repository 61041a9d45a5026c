//! Per-link bandwidth limiter with priority classes.
//!
//! One token bucket per peer link, shared by every transfer to that peer.
//! When the bucket is empty, waiters are served in priority order, so
//! volume replication goes before bulk work (scrub repairs, cache sync) on
//! a thin radio link. A rate of 0 means unlimited.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Notify;

/// Transfer classes, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Volume replication (protects data against a rack's loss).
    Replication = 0,
    /// Bulk work: repairs, re-protection of cold data, cache sync.
    Bulk = 1,
}

/// Largest burst allowed: a quarter second of the rate, and at least one
/// chunk frame, so a slow link is never starved by a large frame.
const BURST_SECONDS: f64 = 0.25;
/// Minimum bucket size in bytes (one 64 KiB chunk plus framing).
const MIN_BURST: f64 = 80.0 * 1024.0;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    /// Waiters per class (index = class).
    waiting: [usize; 2],
}

/// A token bucket for one link.
#[derive(Debug)]
pub struct LinkLimiter {
    rate: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
    notify: Notify,
}

impl LinkLimiter {
    /// `bytes_per_s` = 0 means unlimited.
    pub fn new(bytes_per_s: u64) -> Self {
        let rate = bytes_per_s as f64;
        let burst = (rate * BURST_SECONDS).max(MIN_BURST);
        Self {
            rate,
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
                waiting: [0, 0],
            }),
            notify: Notify::new(),
        }
    }

    /// The configured rate (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// Wait until `bytes` may be sent in `class`. Cancel-safe: dropping the
    /// future takes no tokens.
    pub async fn acquire(&self, class: Class, bytes: usize) {
        if self.rate <= 0.0 {
            return;
        }
        let need = (bytes as f64).min(self.burst);
        let idx = class as usize;
        let mut registered = false;
        loop {
            let wait = {
                let mut b = self.bucket.lock().expect("limiter lock");
                let now = Instant::now();
                b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * self.rate)
                    .min(self.burst);
                b.last = now;
                // A lower class yields while a more urgent one waits.
                let blocked_by_higher = b.waiting[..idx].iter().any(|w| *w > 0);
                if !blocked_by_higher && b.tokens >= need {
                    b.tokens -= need;
                    if registered {
                        b.waiting[idx] -= 1;
                    }
                    drop(b);
                    self.notify.notify_waiters();
                    return;
                }
                if !registered {
                    b.waiting[idx] += 1;
                    registered = true;
                }
                Duration::from_secs_f64(((need - b.tokens).max(0.0) / self.rate).clamp(0.001, 0.25))
            };
            let guard = WaitGuard { limiter: self, idx };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.notify.notified() => {}
            }
            std::mem::forget(guard);
        }
    }
}

/// Unregisters a waiter if its future is dropped mid-wait.
struct WaitGuard<'a> {
    limiter: &'a LinkLimiter,
    idx: usize,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut b = self.limiter.bucket.lock().expect("limiter lock");
        b.waiting[self.idx] = b.waiting[self.idx].saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn unlimited_never_waits() {
        let l = LinkLimiter::new(0);
        let t0 = std::time::Instant::now();
        for _ in 0..1000 {
            l.acquire(Class::Bulk, 1 << 20).await;
        }
        assert!(t0.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_is_enforced() {
        let l = LinkLimiter::new(1_000_000);
        let t0 = tokio::time::Instant::now();
        // burst (250 KB) + 2 MB at 1 MB/s ≈ 2 s
        let mut sent = 0;
        while sent < 2_250_000 {
            l.acquire(Class::Replication, 50_000).await;
            sent += 50_000;
        }
        let took = t0.elapsed().as_secs_f64();
        assert!((1.8..2.5).contains(&took), "took {took}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replication_goes_before_bulk() {
        let l = Arc::new(LinkLimiter::new(2_000_000));
        // drain the burst
        l.acquire(Class::Replication, 500_000).await;
        let done = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (class, name) in [(Class::Bulk, "bulk"), (Class::Replication, "repl")] {
            let (l, done) = (l.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..5 {
                    l.acquire(class, 100_000).await;
                }
                done.lock().unwrap().push(name);
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*done.lock().unwrap(), vec!["repl", "bulk"]);
    }
}
