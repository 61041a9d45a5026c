//! `rack.toml`: the one file an operator edits on a rack.
//!
//! Every field is documented, every table has a `Default` that works on one
//! machine, and unknown keys are rejected so that a typo never silently turns
//! into a default. [`RackConfig::load`] parses *and* validates; its errors
//! name the offending field so `fieldrack` can exit 64 with a useful message.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{validate_rack_name, Role};

/// The name of the file holding the admin API bearer token, beside `rack.toml`.
pub const API_TOKEN_FILE: &str = "api-token";

/// A whole `rack.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RackConfig {
    /// The rack's name, unique in its fleet (`[a-z0-9-]`, at most 32 chars).
    pub rack: String,
    /// `rack` runs appliances and stores volumes; `witness` only votes and relays.
    #[serde(default)]
    pub role: Role,
    /// Failure domain: copies of data go to distinct sites when possible.
    #[serde(default = "default_site")]
    pub site: String,
    /// Which fleet this rack belongs to, and the key that signs its members.
    pub fleet: FleetRef,
    /// Local state directory (sled store). Relative paths are relative to
    /// the directory holding `rack.toml`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The rack's libp2p identity key (protobuf encoding, mode 0600).
    #[serde(default = "default_identity_key")]
    pub identity_key: PathBuf,
    /// The rack's fleet certificate, signed by the fleet key.
    #[serde(default = "default_certificate")]
    pub certificate: PathBuf,
    /// The libp2p mesh: listen addresses, bootstrap peers, discovery.
    #[serde(default)]
    pub mesh: MeshConfig,
    /// SWIM failure-detector timings.
    #[serde(default)]
    pub membership: MembershipConfig,
    /// The admin HTTP API.
    #[serde(default)]
    pub api: ApiConfig,
    /// Where the rack's power telemetry comes from.
    #[serde(default)]
    pub power: PowerConfig,
    /// What this rack can host; gossiped to the fleet.
    #[serde(default)]
    pub capacity: Capacity,
    /// Volume snapshots and replication.
    #[serde(default)]
    pub volumes: VolumesConfig,
    /// The control plane: leases and Raft timings (`[control]`).
    #[serde(default)]
    pub control: ControlConfig,
    /// The caching HTTP proxy and tile server (`[proxy]`); absent: no proxy.
    /// Its fields are defined and validated by the `cache-proxy` crate (the
    /// agent checks them at start and exits 64 naming the field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<toml::Table>,
    /// Map tile sources (`[[tile_source]]`), validated like `[proxy]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tile_source: Vec<toml::Table>,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

/// `[fleet]`: the fleet this rack trusts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetRef {
    /// Fleet name; part of every certificate, so two fleets never mix.
    pub name: String,
    /// The fleet's ed25519 public key, base64 (standard, padded).
    pub public_key: String,
}

/// `[mesh]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// libp2p listen multiaddrs (QUIC), e.g. `/ip4/0.0.0.0/udp/7400/quic-v1`.
    pub listen: Vec<String>,
    /// Static peers for routed radio links where multicast does not reach.
    /// May end in `/p2p/<peer id>`.
    pub bootstrap: Vec<String>,
    /// Discover fleet peers on the local segment with mDNS (DNS-SD).
    pub mdns: bool,
    /// A peer that has not presented a valid fleet certificate this long
    /// after connecting is disconnected.
    pub admission_timeout_ms: u64,
    /// Upper bound on established connections (all peers).
    pub max_connections: u32,
    /// Upper bound on connections per peer.
    pub max_connections_per_peer: u32,
    /// QUIC idle timeout: how long a silent link (a radio fade) is tolerated
    /// before the connection is dropped. libp2p's default of 10 s is too short.
    pub idle_timeout_ms: u64,
    /// First reconnect delay; doubles per failure up to `reconnect_max_ms`.
    pub reconnect_initial_ms: u64,
    /// Cap on the reconnect delay. Short, so a rack that comes back (a
    /// healed link, a restart) is reconnected within seconds; a dial costs
    /// one QUIC Initial packet.
    pub reconnect_max_ms: u64,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            listen: vec!["/ip4/0.0.0.0/udp/7400/quic-v1".into()],
            bootstrap: Vec::new(),
            mdns: true,
            admission_timeout_ms: 3_000,
            max_connections: 256,
            max_connections_per_peer: 3,
            idle_timeout_ms: 30_000,
            reconnect_initial_ms: 500,
            reconnect_max_ms: 3_000,
        }
    }
}

/// `[membership]`: SWIM timings. Defaults detect a SIGKILLed rack as dead
/// within about 7 s (probe cycle + indirect probes + suspicion).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MembershipConfig {
    /// Period of the probe round (one direct probe per round).
    pub probe_interval_ms: u64,
    /// Wait this long for a direct ack before asking others to probe.
    pub probe_timeout_ms: u64,
    /// How many other racks are asked to probe indirectly.
    pub indirect_probes: usize,
    /// How long a suspect rack has to refute before it is declared dead.
    pub suspect_timeout_ms: u64,
    /// How many gossip updates ride on each message.
    pub max_piggyback: usize,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            probe_interval_ms: 1_000,
            probe_timeout_ms: 500,
            indirect_probes: 3,
            suspect_timeout_ms: 4_000,
            max_piggyback: 16,
        }
    }
}

/// `[api]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// `host:port` of the admin HTTP API.
    pub listen: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7480".into(),
        }
    }
}

/// `[power]`: where power telemetry comes from. At most one of `nut`,
/// `file`, `command` may be set; none means "grid, healthy".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PowerConfig {
    /// Network UPS Tools server (`upsd`).
    pub nut: Option<NutConfig>,
    /// A JSON file written by a generator controller, re-read every poll.
    pub file: Option<PathBuf>,
    /// A command printing the same JSON on stdout, run every poll.
    pub command: Option<Vec<String>>,
    /// How often telemetry is read.
    pub poll_interval_ms: u64,
    /// The rack is `dying` when battery runtime falls below this.
    pub dying_runtime_s: u64,
}

impl Default for PowerConfig {
    fn default() -> Self {
        Self {
            nut: None,
            file: None,
            command: None,
            poll_interval_ms: 2_000,
            dying_runtime_s: 300,
        }
    }
}

/// `[power.nut]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NutConfig {
    /// `host:port` of upsd; port 3493 is NUT's.
    #[serde(default = "default_nut_addr")]
    pub addr: String,
    /// The UPS name as configured in `ups.conf`.
    pub ups: String,
    /// Optional upsd credentials (only needed if upsd requires them).
    #[serde(default)]
    pub username: Option<String>,
    /// Password for `username`.
    #[serde(default)]
    pub password: Option<String>,
}

/// `[volumes]`: snapshots and replication of appliance disks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumesConfig {
    /// Copies of each volume on distinct racks, the owner's included.
    pub replication_factor: usize,
    /// How often the owner snapshots each volume it owns.
    pub snapshot_interval_s: u64,
    /// Snapshots kept per volume (older ones are garbage-collected).
    pub keep_snapshots: usize,
    /// Bytes per second per peer link for replication (0 = unlimited).
    pub link_bytes_per_s: u64,
    /// How often stored chunks are re-verified (0 = never).
    pub scrub_interval_s: u64,
}

impl Default for VolumesConfig {
    fn default() -> Self {
        Self {
            replication_factor: 2,
            snapshot_interval_s: 10,
            keep_snapshots: 3,
            link_bytes_per_s: 0,
            scrub_interval_s: 3600,
        }
    }
}

/// `[control]`: fencing leases and Raft timings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// How long a granted lease lets a rack run its appliances.
    pub lease_ms: u64,
    /// How often a rack renews its lease.
    pub renew_every_ms: u64,
    /// A rack that cannot renew stops its appliances this long before its
    /// lease ends.
    pub fence_before_ms: u64,
    /// Added to the lease before another rack may start an appliance
    /// (clock-rate drift, scheduling).
    pub drift_margin_ms: u64,
    /// Raft heartbeat.
    pub heartbeat_ms: u64,
    /// Raft election timeout (min; max is twice this).
    pub election_timeout_ms: u64,
    /// Wait this long after start before forming a new cluster.
    pub settle_ms: u64,
    /// The leader takes a rack that has been dead this long out of the
    /// control plane's voters, so that a field which lost racks for good
    /// keeps a majority for the next loss (the rack is added back when it
    /// returns). 0: never. Revoked racks are taken out at once.
    pub remove_dead_voter_after_s: u64,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            lease_ms: 8_000,
            renew_every_ms: 1_000,
            fence_before_ms: 3_000,
            drift_margin_ms: 1_000,
            heartbeat_ms: 250,
            election_timeout_ms: 1_500,
            settle_ms: 2_000,
            remove_dead_voter_after_s: 600,
        }
    }
}

/// `[capacity]`: zero means "detect from this machine".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capacity {
    /// CPU cores offered to appliances.
    pub cpus: u32,
    /// Memory offered to appliances, MiB.
    pub memory_mb: u64,
}

/// `[log]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `plain` (human) or `json` (one object per line).
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `mesh=debug,info`; `RUST_LOG` wins.
    pub level: Option<String>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

fn default_site() -> String {
    "default".into()
}
fn default_data_dir() -> PathBuf {
    "data".into()
}
fn default_identity_key() -> PathBuf {
    "identity.key".into()
}
fn default_certificate() -> PathBuf {
    "rack.cert".into()
}
fn default_nut_addr() -> String {
    "127.0.0.1:3493".into()
}

/// Why a `rack.toml` was refused. Always names the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax or type error (the message names the key and line).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, which names the key.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("{path}: invalid `{field}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted field name, e.g. `mesh.listen[0]`.
        field: String,
        /// Why.
        reason: String,
    },
}

impl RackConfig {
    /// Parse and validate `text`; `path` is only used in messages.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] or [`ConfigError::Invalid`], naming the field.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: RackConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config
            .validate()
            .map_err(|(field, reason)| ConfigError::Invalid {
                path: path.to_owned(),
                field,
                reason,
            })?;
        Ok(config)
    }

    /// Read, parse and validate a `rack.toml`, and make its relative paths
    /// absolute (relative to the file's directory).
    ///
    /// # Errors
    /// See [`ConfigError`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        let dir = config_dir(path);
        for p in [
            &mut config.data_dir,
            &mut config.identity_key,
            &mut config.certificate,
        ] {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        if let Some(file) = config.power.file.as_mut() {
            if file.is_relative() {
                *file = dir.join(&*file);
            }
        }
        Ok(config)
    }

    /// The parsed API listen address (validated by [`RackConfig::parse`]).
    pub fn api_addr(&self) -> SocketAddr {
        self.api
            .listen
            .parse()
            .expect("validated by RackConfig::parse")
    }

    /// Serialize back to TOML (used by provisioning).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("RackConfig always serializes")
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, reason: String| Err((field.to_string(), reason));
        if let Err(e) = validate_rack_name(&self.rack) {
            return bad("rack", e.to_string());
        }
        if self.site.is_empty() {
            return bad("site", "must not be empty".into());
        }
        if self.fleet.name.is_empty() {
            return bad("fleet.name", "must not be empty".into());
        }
        if let Err(e) = crate::cert::decode_public_key(&self.fleet.public_key) {
            return bad("fleet.public_key", e.to_string());
        }
        let c = &self.control;
        if c.fence_before_ms >= c.lease_ms {
            return bad(
                "control.fence_before_ms",
                "must be shorter than control.lease_ms".into(),
            );
        }
        if c.renew_every_ms == 0
            || c.renew_every_ms.saturating_mul(2) > c.lease_ms - c.fence_before_ms
        {
            return bad(
                "control.renew_every_ms",
                "must leave at least two renewals before fencing starts (2 × renew_every_ms ≤ lease_ms − fence_before_ms)".into(),
            );
        }
        if c.heartbeat_ms == 0 || c.heartbeat_ms.saturating_mul(3) > c.election_timeout_ms {
            return bad(
                "control.heartbeat_ms",
                "must be positive and at most a third of control.election_timeout_ms".into(),
            );
        }
        if self.mesh.listen.is_empty() {
            return bad(
                "mesh.listen",
                "at least one listen address is needed".into(),
            );
        }
        for (i, a) in self.mesh.listen.iter().enumerate() {
            if let Err(e) = crate::parse_quic_multiaddr(a) {
                return bad(&format!("mesh.listen[{i}]"), e);
            }
        }
        for (i, a) in self.mesh.bootstrap.iter().enumerate() {
            if let Err(e) = crate::parse_quic_multiaddr(a) {
                return bad(&format!("mesh.bootstrap[{i}]"), e);
            }
        }
        for (field, v) in [
            ("mesh.admission_timeout_ms", self.mesh.admission_timeout_ms),
            ("mesh.idle_timeout_ms", self.mesh.idle_timeout_ms),
            ("mesh.reconnect_initial_ms", self.mesh.reconnect_initial_ms),
            ("mesh.reconnect_max_ms", self.mesh.reconnect_max_ms),
            (
                "membership.probe_interval_ms",
                self.membership.probe_interval_ms,
            ),
            (
                "membership.probe_timeout_ms",
                self.membership.probe_timeout_ms,
            ),
            (
                "membership.suspect_timeout_ms",
                self.membership.suspect_timeout_ms,
            ),
            ("power.poll_interval_ms", self.power.poll_interval_ms),
        ] {
            if v == 0 {
                return bad(field, "must be greater than 0".into());
            }
        }
        if self.mesh.max_connections == 0 {
            return bad("mesh.max_connections", "must be greater than 0".into());
        }
        if self.mesh.max_connections_per_peer == 0 {
            return bad(
                "mesh.max_connections_per_peer",
                "must be greater than 0".into(),
            );
        }
        if self.mesh.reconnect_max_ms < self.mesh.reconnect_initial_ms {
            return bad(
                "mesh.reconnect_max_ms",
                "must be at least mesh.reconnect_initial_ms".into(),
            );
        }
        if self.membership.probe_timeout_ms >= self.membership.probe_interval_ms {
            return bad(
                "membership.probe_timeout_ms",
                "must be shorter than membership.probe_interval_ms".into(),
            );
        }
        if self.volumes.replication_factor == 0 {
            return bad("volumes.replication_factor", "must be at least 1".into());
        }
        if self.volumes.snapshot_interval_s == 0 {
            return bad(
                "volumes.snapshot_interval_s",
                "must be greater than 0".into(),
            );
        }
        if self.volumes.keep_snapshots == 0 {
            return bad("volumes.keep_snapshots", "must be at least 1".into());
        }
        if self.membership.max_piggyback == 0 {
            return bad("membership.max_piggyback", "must be greater than 0".into());
        }
        if let Err(e) = self.api.listen.parse::<SocketAddr>() {
            return bad("api.listen", format!("expected host:port ({e})"));
        }
        let sources = [
            self.power.nut.is_some(),
            self.power.file.is_some(),
            self.power.command.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            return bad(
                "power",
                "set at most one of power.nut, power.file, power.command".into(),
            );
        }
        if let Some(nut) = &self.power.nut {
            if nut.ups.is_empty() {
                return bad("power.nut.ups", "must not be empty".into());
            }
            if nut.addr.is_empty() {
                return bad("power.nut.addr", "must not be empty".into());
            }
        }
        if let Some(cmd) = &self.power.command {
            if cmd.is_empty() {
                return bad("power.command", "must name a program".into());
            }
        }
        Ok(())
    }
}

/// The directory holding a config file (`.` for a bare file name).
pub fn config_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

    fn minimal() -> String {
        format!("rack = \"a\"\n[fleet]\nname = \"haiti\"\npublic_key = \"{KEY}\"\n")
    }

    fn field_of(text: &str) -> String {
        match RackConfig::parse(text, Path::new("rack.toml")) {
            Err(ConfigError::Invalid { field, .. }) => field,
            Err(e) => format!("parse: {e}"),
            Ok(_) => "ok".into(),
        }
    }

    #[test]
    fn minimal_config_gets_working_defaults() {
        let c = RackConfig::parse(&minimal(), Path::new("rack.toml")).unwrap();
        assert_eq!(c.role, Role::Rack);
        assert_eq!(
            c.mesh.listen,
            vec!["/ip4/0.0.0.0/udp/7400/quic-v1".to_string()]
        );
        assert!(c.mesh.mdns);
        assert_eq!(c.api_addr().port(), 7480);
        assert_eq!(c.power.dying_runtime_s, 300);
        // and survives a round trip through provisioning's serializer
        let again = RackConfig::parse(&c.to_toml(), Path::new("rack.toml")).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn invalid_values_name_their_field() {
        let m = minimal();
        assert_eq!(field_of(&m.replace("rack = \"a\"", "rack = \"A\"")), "rack");
        assert_eq!(field_of(&m.replace(KEY, "nope")), "fleet.public_key");
        assert_eq!(
            field_of(&format!("{m}[mesh]\nlisten = []\n")),
            "mesh.listen"
        );
        assert_eq!(
            field_of(&format!(
                "{m}[mesh]\nbootstrap = [\"/ip4/1.2.3.4/tcp/1\"]\n"
            )),
            "mesh.bootstrap[0]"
        );
        assert_eq!(
            field_of(&format!("{m}[membership]\nprobe_timeout_ms = 5000\n")),
            "membership.probe_timeout_ms"
        );
        assert_eq!(
            field_of(&format!("{m}[api]\nlisten = \"localhost\"\n")),
            "api.listen"
        );
        assert_eq!(
            field_of(&format!("{m}[power]\nfile = \"x\"\ncommand = [\"y\"]\n")),
            "power"
        );
        assert_eq!(
            field_of(&format!("{m}[power.nut]\nups = \"\"\n")),
            "power.nut.ups"
        );
        assert!(field_of(&format!("{m}typo = 1\n")).contains("typo"));
        assert!(field_of(&format!("{m}[mesh]\nmdns = \"yes\"\n")).contains("mdns"));
        assert!(field_of("rack = ").starts_with("parse"));
    }

    /// `3 × heartbeat_ms` overflowed for huge values (a panic with
    /// overflow checks, a wrapped product and so a wrong verdict without)
    /// instead of refusing the value.
    #[test]
    fn huge_control_periods_are_refused_not_overflowed() {
        let m = minimal();
        // TOML integers stop at i64::MAX; three of those overflow a u64.
        let max = i64::MAX;
        assert_eq!(
            field_of(&format!("{m}[control]\nheartbeat_ms = {max}\n")),
            "control.heartbeat_ms"
        );
        assert_eq!(
            field_of(&format!("{m}[control]\nrenew_every_ms = {max}\n")),
            "control.renew_every_ms"
        );
    }

    proptest! {
        /// Arbitrary text never panics the parser.
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,400}") {
            let _ = RackConfig::parse(&text, Path::new("rack.toml"));
        }

        /// Arbitrary values for every numeric knob either parse or are
        /// refused with the knob's own name.
        #[test]
        fn numeric_knobs_are_validated(
            table in prop::sample::select(vec!["mesh", "membership", "power"]),
            key in prop::sample::select(vec![
                "admission_timeout_ms", "max_connections", "idle_timeout_ms", "reconnect_initial_ms",
                "probe_interval_ms", "probe_timeout_ms", "suspect_timeout_ms", "max_piggyback",
                "poll_interval_ms", "dying_runtime_s",
            ]),
            value in any::<i64>(),
        ) {
            let text = format!("{}[{table}]\n{key} = {value}\n", minimal());
            match RackConfig::parse(&text, Path::new("rack.toml")) {
                Ok(_) => {}
                Err(ConfigError::Invalid { field, .. }) => prop_assert!(field.starts_with(table) || field == "membership.probe_timeout_ms" || field == "mesh.reconnect_max_ms"),
                Err(ConfigError::Parse { message, .. }) => prop_assert!(message.contains(key) || message.contains(table), "{}", message),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
