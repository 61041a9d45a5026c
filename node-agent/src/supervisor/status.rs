//! `status.appliances`: every appliance of the field as this rack sees it.

use std::collections::BTreeMap;

use control::{AppReport, FieldState};
use serde::Serialize;

/// One row of `status.appliances`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ApplianceStatus {
    /// Name.
    pub name: String,
    /// The rack holding its assignment.
    pub owner: Option<String>,
    /// `running`, `starting`, `stopped`, `failed` or `fenced`.
    pub state: String,
    /// Tier.
    pub tier: u8,
    /// Assignment epoch.
    pub epoch: u64,
    /// Seconds in this state (as its owner reports it).
    pub since_s: Option<f64>,
    /// How the owner got it (`failover`, `power`, `move`...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The rows of `status.appliances`: the owner's state as it reported it,
/// or, for appliances owned here, this rack's own latest view (`local`).
#[must_use]
pub fn rows(
    state: &FieldState,
    rack: &str,
    local: &BTreeMap<String, AppReport>,
    now_ms: u64,
) -> Vec<ApplianceStatus> {
    state
        .apps
        .values()
        .map(|a| {
            let report = a
                .owner
                .as_ref()
                .and_then(|o| state.racks.get(o))
                .and_then(|r| r.apps.get(&a.spec.name))
                .filter(|r| r.epoch == a.epoch);
            let mine = if a.owner.as_deref() == Some(rack) {
                local.get(&a.spec.name).filter(|r| r.epoch == a.epoch)
            } else {
                None
            };
            let r = mine.or(report);
            let state_word = match (&r, a.running) {
                (_, false) => "stopped",
                (Some(r), true) => r.state.as_str(),
                (None, true) => "starting",
            };
            ApplianceStatus {
                name: a.spec.name.clone(),
                owner: a.owner.clone(),
                state: state_word.into(),
                tier: a.spec.tier,
                epoch: a.epoch,
                since_s: r
                    .map(|r| (now_ms.saturating_sub(r.since_ms) as f64 / 100.0).round() / 10.0),
                reason: a.transfer.as_ref().map(|t| t.reason.clone()),
            }
        })
        .collect()
}
