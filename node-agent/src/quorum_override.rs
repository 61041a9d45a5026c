//! The operator's quorum override (`fieldrack override quorum --why ...`),
//! like Proxmox's `pvecm expected 1`: after a cold start, a rack (or two
//! racks without their witness) that cannot reach a majority of voters
//! runs the appliances its last known field state assigns it, on the
//! operator's word instead of a quorum-granted lease.
//!
//! Without it a lone rack never starts an appliance: the lease comes only
//! from a committed renewal. With it, every renewal period the rack grants
//! itself, locally, exactly what its last applied state assigns it
//! ([`crate::supervisor::Supervisor::grant_locally`]); the supervisor's
//! start gates and fencing work as for a real lease. The override is
//! refused while a majority is reachable, is recorded in the event log with
//! who asked and why (`quorum_override`), and ends by itself as soon as a
//! renewal commits again (`quorum_override_ended`): from then on only
//! committed renewals grant anything. A majority is a renewal committed
//! within one lease ([`majority`]), not a leader named by the control
//! plane: after a restart that is the leader remembered from before.
//!
//! The risk is the operator's, as with Proxmox: if the other racks are
//! alive behind a partition rather than down, they may run the same
//! appliances after their failover.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Longest `why` or `who` kept: a sentence for the event log.
pub const MAX_REASON: usize = 512;

/// An override in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Active {
    /// Who asked (the operator's name as the CLI found it).
    pub who: String,
    /// Why, in their words.
    pub why: String,
    /// Since when (unix ms).
    pub since_ms: u64,
}

/// Why an override was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OverrideError {
    /// A majority of voters answers (led by the rack named): nothing to
    /// override.
    #[error("the control plane has a majority (leader {0}): no override needed")]
    Majority(String),
    /// No reason given, or one too long.
    #[error("`why` must say why, in 1..={MAX_REASON} characters")]
    Reason,
    /// No name given, or one too long.
    #[error("`who` must name the operator, in 1..={MAX_REASON} characters")]
    Who,
}

/// What the override loop does this period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tick {
    /// No override.
    Idle,
    /// Override in force and still no majority: grant locally.
    Grant,
    /// A majority is back: the override ended (record it).
    Ended(Active),
}

/// The override's state (sans-IO: the caller says whether a majority
/// answers and what time it is).
#[derive(Debug, Default)]
pub struct QuorumOverride {
    active: Mutex<Option<Active>>,
}

impl QuorumOverride {
    /// Start (or restate) an override. `leader` names the majority's
    /// leader if a majority answers now ([`majority`]).
    ///
    /// # Errors
    /// [`OverrideError`]: a majority exists, or who/why missing.
    pub fn start(
        &self,
        who: &str,
        why: &str,
        leader: Option<&str>,
        now_ms: u64,
    ) -> Result<Active, OverrideError> {
        let (who, why) = (who.trim(), why.trim());
        if why.is_empty() || why.len() > MAX_REASON {
            return Err(OverrideError::Reason);
        }
        if who.is_empty() || who.len() > MAX_REASON {
            return Err(OverrideError::Who);
        }
        if let Some(l) = leader {
            return Err(OverrideError::Majority(l.to_owned()));
        }
        let a = Active {
            who: who.to_owned(),
            why: why.to_owned(),
            since_ms: now_ms,
        };
        *self.lock() = Some(a.clone());
        Ok(a)
    }

    /// One period: grant while no majority answers; end once one does.
    pub fn tick(&self, majority: bool) -> Tick {
        let mut active = self.lock();
        match (active.as_ref(), majority) {
            (None, _) => Tick::Idle,
            (Some(_), false) => Tick::Grant,
            (Some(_), true) => Tick::Ended(active.take().expect("checked")),
        }
    }

    /// The override in force, if any.
    #[must_use]
    pub fn active(&self) -> Option<Active> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Active>> {
        self.active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The majority this rack has, if any: a renewal committed within one
/// lease (a majority of voters answered lately), named by its leader. The
/// leader the control plane names is not enough on its own: after a cold
/// start a lone rack remembers the leader of before.
#[must_use]
pub fn majority(rack: &crate::agent::Rack) -> Option<String> {
    let control = rack.appliances.control();
    rack.appliances
        .renewed_within(control.lease_config().lease)
        .then(|| control.status().leader.unwrap_or_else(|| "unknown".into()))
}

/// The agent's override loop: every renewal period, grant locally while
/// the override is in force and no majority answers; record its end.
pub async fn run(rack: Arc<crate::agent::Rack>, cancel: CancellationToken) {
    let every = rack.appliances.control().lease_config().renew_every;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match rack.quorum_override.tick(majority(&rack).is_some()) {
            Tick::Idle => {}
            Tick::Grant => rack.appliances.grant_locally(),
            Tick::Ended(a) => {
                tracing::warn!(who = %a.who, "a majority is back: the quorum override ended");
                let _ = rack.state.record_event(
                    "quorum_override_ended",
                    serde_json::json!({ "who": a.who, "why": a.why, "since_ms": a.since_ms }),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_with_a_majority_or_without_a_reason() {
        let o = QuorumOverride::default();
        assert_eq!(
            o.start("ana", "all racks lost power", Some("b"), 1),
            Err(OverrideError::Majority("b".into()))
        );
        assert_eq!(o.start("ana", "  ", None, 1), Err(OverrideError::Reason));
        assert_eq!(o.start("", "x", None, 1), Err(OverrideError::Who));
        assert_eq!(
            o.start("ana", &"x".repeat(MAX_REASON + 1), None, 1),
            Err(OverrideError::Reason)
        );
        assert_eq!(o.active(), None);
        assert_eq!(o.tick(false), Tick::Idle, "nothing granted without one");
    }

    #[test]
    fn grants_until_a_majority_answers_then_ends_once() {
        let o = QuorumOverride::default();
        let a = o.start("ana", "b and c burned", None, 7).unwrap();
        assert_eq!(o.active(), Some(a.clone()));
        assert_eq!(o.tick(false), Tick::Grant);
        assert_eq!(o.tick(false), Tick::Grant);
        assert_eq!(o.tick(true), Tick::Ended(a));
        assert_eq!(o.tick(true), Tick::Idle);
        assert_eq!(
            o.tick(false),
            Tick::Idle,
            "a lost majority later needs a new override"
        );
    }
}
