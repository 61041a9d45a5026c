//! One running instance, owned by a task of its own that also holds its
//! deadline, so that nothing else the rack does can delay its fencing.
//!
//! The deadline is read from the lease (a `watch` channel the renewal loop
//! writes the moment a grant arrives): the fence time of the latest grant
//! that lists this (appliance, epoch). When it passes, or a grant no
//! longer lists it, the task stops the instance itself: SIGTERM (a VM: QMP
//! `quit`), at most the fence grace (`[control] fence_grace_ms`, capped by
//! the appliance's `stop_grace_ms`), then SIGKILL of the whole group.
//! Every instance has its own task, so instances are fenced concurrently.
//! A polite stop (operator, reassignment, restart, shutdown) asked through
//! the stop channel is cut short the same way if the deadline comes first.
//! If the supervisor drops the stop channel, the instance is stopped too:
//! an appliance nobody tracks is a second copy waiting to happen.

use std::time::Duration;

use control::{Lease, LeaseConfig};
use tokio::sync::watch;
use tokio::time::Instant;

use super::plan::StopWhy;
use crate::drivers::{ExitInfo, Instance};

/// A stop asked of an instance's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopRequest {
    /// SIGTERM to SIGKILL (a fence uses the fence grace whatever this says).
    pub grace: Duration,
    /// Why.
    pub why: StopWhy,
}

/// What stops an instance: its identity, timings, lease and stop channel.
#[derive(Debug)]
pub struct Guard {
    /// Appliance.
    pub app: String,
    /// The epoch it runs under.
    pub epoch: u64,
    /// Lease timings (fence grace).
    pub cfg: LeaseConfig,
    /// The appliance's own `stop_grace_ms`.
    pub stop_grace: Duration,
    /// This rack's lease, as the renewal loop publishes it.
    pub lease: watch::Receiver<Lease>,
    /// Stop requests from the supervisor.
    pub stop: watch::Receiver<Option<StopRequest>>,
}

/// How an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Its exit.
    pub exit: ExitInfo,
    /// `None`: it exited by itself; else why it was stopped.
    pub stopped: Option<StopWhy>,
    /// How long before the lease's end it was dead (negative: after), if a
    /// lease was held.
    pub lease_left_ms: Option<i64>,
}

impl Guard {
    /// The fence grace of this appliance.
    fn fence_grace(&self) -> Duration {
        self.cfg.fence_grace.min(self.stop_grace)
    }

    /// When fencing must begin: the deadline of the latest grant that
    /// listed it at its epoch ([`control::Lease::deadline`]), or, when
    /// none did, the moment that was first seen.
    fn deadline(&self, revoked_at: &mut Option<Instant>) -> Instant {
        if let Some(t) = *revoked_at {
            return t;
        }
        let d = self
            .lease
            .borrow()
            .deadline(&self.app, self.epoch, &self.cfg);
        match d {
            Some(d) => d.into(),
            None => *revoked_at.get_or_insert_with(Instant::now),
        }
    }

    fn lease_left_ms(&self) -> Option<i64> {
        let end: Instant = self.lease.borrow().expires(&self.cfg)?.into();
        let now = Instant::now();
        Some(if end >= now {
            end.duration_since(now).as_millis() as i64
        } else {
            -(now.duration_since(end).as_millis() as i64)
        })
    }

    /// Resolves once the instance may not be launched any more (its
    /// deadline passed, a grant dropped it, or a stop was asked): a launch
    /// is raced against this.
    pub async fn must_not_run(&mut self) {
        let mut revoked_at = None;
        let mut lease_open = true;
        loop {
            if self.stop.borrow_and_update().is_some() {
                return;
            }
            let deadline = self.deadline(&mut revoked_at);
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(deadline) => return,
                r = self.lease.changed(), if lease_open => lease_open = r.is_ok(),
                r = self.stop.changed() => if r.is_err() { return },
            }
        }
    }

    /// Wait until the instance must stop (deadline or request) and say
    /// how; `Err` if it exited by itself first.
    async fn until_stop(
        &mut self,
        inst: &mut Instance,
        revoked_at: &mut Option<Instant>,
    ) -> Result<StopRequest, ExitInfo> {
        let fence = StopRequest {
            grace: self.fence_grace(),
            why: StopWhy::Fence,
        };
        let mut lease_open = true;
        loop {
            if let Some(req) = *self.stop.borrow_and_update() {
                return Ok(req);
            }
            let deadline = self.deadline(revoked_at);
            if Instant::now() >= deadline {
                return Ok(fence);
            }
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(deadline) => return Ok(fence),
                r = self.lease.changed(), if lease_open => lease_open = r.is_ok(),
                r = self.stop.changed() => {
                    if r.is_err() {
                        return Ok(StopRequest { grace: self.stop_grace, why: StopWhy::Shutdown });
                    }
                }
                exit = inst.wait() => return Err(exit),
            }
        }
    }
}

/// Own `inst` until it has ended, fencing it at its deadline. Returns how
/// it ended.
pub async fn supervise(mut inst: Instance, mut g: Guard) -> Ended {
    let mut revoked_at = None;
    let mut req = match g.until_stop(&mut inst, &mut revoked_at).await {
        Ok(r) => r,
        Err(exit) => {
            return Ended {
                exit,
                stopped: None,
                lease_left_ms: g.lease_left_ms(),
            }
        }
    };
    let fence_grace = g.fence_grace();
    let begun = Instant::now();
    let mut kill_at = begun
        + if req.why == StopWhy::Fence {
            fence_grace
        } else {
            req.grace
        };
    tracing::info!(appliance = %g.app, epoch = g.epoch, why = ?req.why, grace = ?kill_at.duration_since(begun), "stopping");
    let mut stop = Box::pin(inst.stop(kill_at.duration_since(begun)));
    let mut lease_open = true;
    let mut stop_open = true;
    // However the stop began, it never outlives the fence time plus the
    // fence grace.
    let finished = loop {
        let fence_kill = g.deadline(&mut revoked_at).max(begun) + fence_grace;
        if fence_kill < kill_at {
            kill_at = fence_kill;
            req.why = StopWhy::Fence;
        }
        tokio::select! {
            biased;
            exit = &mut stop => break Some(exit),
            () = tokio::time::sleep_until(kill_at) => break None,
            r = g.lease.changed(), if lease_open => lease_open = r.is_ok(),
            r = g.stop.changed(), if stop_open => {
                stop_open = r.is_ok();
                if let Some(newer) = *g.stop.borrow_and_update() {
                    let at = Instant::now() + newer.grace;
                    if at < kill_at {
                        kill_at = at;
                        req.why = newer.why;
                    }
                }
            }
        }
    };
    drop(stop);
    let exit = match finished {
        Some(exit) => exit,
        None => {
            tracing::info!(appliance = %g.app, epoch = g.epoch, "grace over: SIGKILL");
            inst.kill();
            inst.wait().await
        }
    };
    Ended {
        exit,
        stopped: Some(req.why),
        lease_left_ms: g.lease_left_ms(),
    }
}

#[cfg(test)]
mod tests;
