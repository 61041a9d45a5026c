//! Plain types and pure functions shared by every Fieldrack component.
//!
//! This crate does no I/O beyond parsing, so everything in it is tested as a
//! pure function.
//!
//! Layout:
//! - [`config`]: `rack.toml`, parsed and validated with field-naming errors.
//! - [`cert`]: the fleet signing key, rack certificates and revocations.
//! - [`appliance`]: appliance manifests (`[[appliance]]`), parsed and validated.
//! - [`bundle`]: the signed manifest (BLAKE3 of every file) of a rack bundle.
//! - [`field`]: `field.toml`, the plan of a whole field (sites, racks, catalog, tile packs).

pub mod appliance;
pub mod bundle;
pub mod cert;
pub mod config;
pub mod field;
pub mod power;

#[cfg(test)]
mod fuzz_seeds;

pub use appliance::{
    ApplianceSpec, DriverKind, HealthCheck, HealthSpec, ManifestError, Placement, RestartMode,
    RestartPolicy, VolumeSpec,
};
pub use cert::{CertBody, CertError, Certificate, FleetKey, Revocation, RevocationBody};
pub use config::{ConfigError, RackConfig};

use serde::{Deserialize, Serialize};

/// What a rack does in its fleet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs appliances, stores volumes, serves the proxy.
    #[default]
    Rack,
    /// Votes and relays only: no appliances, no volumes.
    Witness,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Rack => "rack",
            Role::Witness => "witness",
        })
    }
}

/// Longest rack name accepted; short names keep tables and mDNS labels readable.
pub const MAX_RACK_NAME: usize = 32;

/// Why a rack name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RackNameError {
    /// Empty.
    #[error("a rack name must not be empty")]
    Empty,
    /// Too long.
    #[error("a rack name is at most {MAX_RACK_NAME} characters")]
    TooLong,
    /// Bad character.
    #[error("a rack name uses only a-z, 0-9 and '-', and does not start with '-' (found {0:?})")]
    BadChar(char),
}

/// Rack names become directory names, mDNS labels and metric labels: keep
/// them to `[a-z0-9-]`, not starting with `-`.
///
/// # Errors
/// [`RackNameError`] says why.
pub fn validate_rack_name(name: &str) -> Result<(), RackNameError> {
    if name.is_empty() {
        return Err(RackNameError::Empty);
    }
    if name.len() > MAX_RACK_NAME {
        return Err(RackNameError::TooLong);
    }
    if name.starts_with('-') {
        return Err(RackNameError::BadChar('-'));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        Some(c) => Err(RackNameError::BadChar(c)),
        None => Ok(()),
    }
}

/// Parse a QUIC multiaddr (`/ip4|ip6|dns/.../udp/PORT/quic-v1[/p2p/ID]`).
///
/// # Errors
/// A human-readable reason.
pub fn parse_quic_multiaddr(s: &str) -> Result<libp2p::Multiaddr, String> {
    use libp2p::multiaddr::Protocol;
    let addr: libp2p::Multiaddr = s
        .parse()
        .map_err(|e| format!("{s:?} is not a multiaddr: {e}"))?;
    let mut it = addr.iter();
    match it.next() {
        Some(
            Protocol::Ip4(_)
            | Protocol::Ip6(_)
            | Protocol::Dns(_)
            | Protocol::Dns4(_)
            | Protocol::Dns6(_),
        ) => {}
        _ => return Err(format!("{s:?} must start with /ip4, /ip6 or /dns")),
    }
    if !matches!(it.next(), Some(Protocol::Udp(_))) {
        return Err(format!(
            "{s:?} must be a UDP address (.../udp/PORT/quic-v1)"
        ));
    }
    if !matches!(it.next(), Some(Protocol::QuicV1)) {
        return Err(format!("{s:?} must use QUIC (.../quic-v1)"));
    }
    match it.next() {
        None | Some(Protocol::P2p(_)) => {}
        Some(p) => return Err(format!("{s:?}: unexpected component {p}")),
    }
    if it.next().is_some() {
        return Err(format!("{s:?}: trailing components after /p2p"));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rack_names() {
        assert!(validate_rack_name("a").is_ok());
        assert!(validate_rack_name("port-au-prince-1").is_ok());
        assert_eq!(validate_rack_name(""), Err(RackNameError::Empty));
        assert_eq!(validate_rack_name("-a"), Err(RackNameError::BadChar('-')));
        assert_eq!(validate_rack_name("A"), Err(RackNameError::BadChar('A')));
        assert_eq!(validate_rack_name("a/b"), Err(RackNameError::BadChar('/')));
        assert_eq!(
            validate_rack_name(&"a".repeat(33)),
            Err(RackNameError::TooLong)
        );
    }

    #[test]
    fn quic_multiaddrs() {
        assert!(parse_quic_multiaddr("/ip4/127.0.0.1/udp/7400/quic-v1").is_ok());
        assert!(parse_quic_multiaddr(
            "/ip4/10.0.0.1/udp/1/quic-v1/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
        )
        .is_ok());
        assert!(parse_quic_multiaddr("/ip4/127.0.0.1/tcp/7400").is_err());
        assert!(parse_quic_multiaddr("/ip4/127.0.0.1/udp/7400").is_err());
        assert!(parse_quic_multiaddr("nonsense").is_err());
    }
}
