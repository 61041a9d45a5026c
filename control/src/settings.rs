//! `[control]` of `rack.toml` into the control plane's settings: the one
//! place the validated `deploy::config::ControlConfig` becomes durations.
//!
//! Every conversion here is total: `RackConfig::parse` has bounded each
//! knob (`deploy::config::limits`) and checked the fencing relations, so
//! nothing is left to fail at start.

use std::path::PathBuf;
use std::time::Duration;

use deploy::config::ControlConfig;

use crate::{ControlSettings, LeaseConfig};

impl From<&ControlConfig> for LeaseConfig {
    fn from(c: &ControlConfig) -> Self {
        Self {
            lease: Duration::from_millis(c.lease_ms),
            drift_margin: Duration::from_millis(c.drift_margin_ms),
            fence_before: Duration::from_millis(c.fence_before_ms),
            renew_every: Duration::from_millis(c.renew_every_ms),
            fence_grace: Duration::from_millis(c.fence_grace_ms),
        }
    }
}

impl ControlSettings {
    /// The settings of rack `rack` whose control state lives in `dir`, from
    /// its `[control]` table. `remove_dead_voter_after_s = 0` means never.
    #[must_use]
    pub fn from_config(c: &ControlConfig, dir: PathBuf, rack: &str) -> Self {
        Self {
            lease: LeaseConfig::from(c),
            heartbeat: Duration::from_millis(c.heartbeat_ms),
            election_timeout: Duration::from_millis(c.election_timeout_ms),
            rpc_timeout: Duration::from_millis(c.rpc_timeout_ms),
            settle: Duration::from_millis(c.settle_ms),
            remove_dead_after: (c.remove_dead_voter_after_s > 0)
                .then(|| Duration::from_secs(c.remove_dead_voter_after_s)),
            ..Self::new(dir, rack)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rack.toml`'s defaults are the control plane's defaults.
    #[test]
    fn defaults_agree() {
        let from = ControlSettings::from_config(&ControlConfig::default(), "d".into(), "a");
        let new = ControlSettings::new("d".into(), "a");
        assert_eq!(from.lease, new.lease);
        assert_eq!(from.lease, LeaseConfig::default());
        assert_eq!(from.heartbeat, new.heartbeat);
        assert_eq!(from.election_timeout, new.election_timeout);
        assert_eq!(from.rpc_timeout, new.rpc_timeout);
        assert_eq!(from.settle, new.settle);
        assert_eq!(from.remove_dead_after, new.remove_dead_after);
    }

    #[test]
    fn every_key_is_carried() {
        let c = ControlConfig {
            lease_ms: 20_000,
            renew_every_ms: 2_000,
            fence_before_ms: 6_000,
            fence_grace_ms: 3_000,
            drift_margin_ms: 1_500,
            heartbeat_ms: 100,
            election_timeout_ms: 900,
            rpc_timeout_ms: 2_500,
            settle_ms: 50,
            remove_dead_voter_after_s: 0,
        };
        let s = ControlSettings::from_config(&c, "d".into(), "a");
        let ms = Duration::from_millis;
        assert_eq!(
            s.lease,
            LeaseConfig {
                lease: ms(20_000),
                drift_margin: ms(1_500),
                fence_before: ms(6_000),
                renew_every: ms(2_000),
                fence_grace: ms(3_000),
            }
        );
        assert_eq!(s.heartbeat, ms(100));
        assert_eq!(s.election_timeout, ms(900));
        assert_eq!(s.rpc_timeout, ms(2_500));
        assert_eq!(s.settle, ms(50));
        assert_eq!(s.remove_dead_after, None);
        let c = ControlConfig {
            remove_dead_voter_after_s: 60,
            ..c
        };
        let s = ControlSettings::from_config(&c, "d".into(), "a");
        assert_eq!(s.remove_dead_after, Some(Duration::from_secs(60)));
    }
}
