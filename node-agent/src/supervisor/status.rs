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
/// or, for appliances owned here, this rack's own latest view (`local`;
/// `starting` while it has none).
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
            // On its owner only the supervisor's own view counts: the
            // field's copy of this rack's last report may predate a
            // restart (an agent restarted while cut off keeps its
            // appliances stopped, though its last report said `running`).
            let r = if a.owner.as_deref() == Some(rack) {
                local.get(&a.spec.name).filter(|r| r.epoch == a.epoch)
            } else {
                report
            };
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

#[cfg(test)]
mod tests {
    use control::{AppRecord, AppState, RackReport};
    use deploy::appliance::parse_manifest;

    use super::*;

    fn field(owner: &str, reported: AppState) -> FieldState {
        let spec = parse_manifest(
            "[[appliance]]\nname = \"x\"\ndriver = \"process\"\ncommand = [\"true\"]\n",
        )
        .unwrap()
        .remove(0);
        let mut state = FieldState::default();
        state.apps.insert(
            "x".into(),
            AppRecord {
                spec,
                running: true,
                owner: Some(owner.into()),
                epoch: 3,
                transfer: None,
                move_to: None,
            },
        );
        let report = AppReport {
            epoch: 3,
            state: reported,
            since_ms: 1_000,
        };
        state.racks.insert(
            owner.into(),
            RackReport {
                apps: BTreeMap::from([("x".to_owned(), report)]),
                ..RackReport::default()
            },
        );
        state
    }

    #[test]
    fn another_racks_appliance_is_as_its_owner_reported_it() {
        let rows = rows(&field("b", AppState::Running), "a", &BTreeMap::new(), 2_000);
        assert_eq!(rows[0].state, "running");
        assert_eq!(rows[0].owner.as_deref(), Some("b"));
    }

    #[test]
    fn on_its_owner_only_the_local_view_counts() {
        // Restarted while cut off: the field still holds "running" from
        // before, the supervisor runs nothing.
        let state = field("a", AppState::Running);
        assert_eq!(
            rows(&state, "a", &BTreeMap::new(), 2_000)[0].state,
            "starting"
        );
        let local = BTreeMap::from([(
            "x".to_owned(),
            AppReport {
                epoch: 3,
                state: AppState::Fenced,
                since_ms: 1_500,
            },
        )]);
        assert_eq!(rows(&state, "a", &local, 2_000)[0].state, "fenced");
    }
}
