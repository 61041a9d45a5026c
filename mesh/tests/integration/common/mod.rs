//! Set-up shared by the mesh's integration tests: fleet certificates and
//! the settings of a loopback rack, the same in every test file.

use std::time::Duration;

use deploy::cert::{CertBody, CERT_VERSION};
use deploy::power::PowerStatus;
use deploy::{Certificate, FleetKey, Revocation, Role};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use mesh::{MeshSettings, RackInfo};
use util::time::unix_secs;

/// A rack certificate for `key` in fleet `name`, issued by `fleet`, valid
/// from a minute ago for an hour.
pub fn cert_for(fleet: &FleetKey, name: &str, rack: &str, key: &Keypair) -> Certificate {
    fleet.issue(&CertBody {
        version: CERT_VERSION,
        fleet: name.into(),
        rack: rack.into(),
        peer_id: PeerId::from(key.public()).to_base58(),
        role: Role::Rack,
        site: "s".into(),
        serial: 1,
        not_before: unix_secs() - 60,
        not_after: unix_secs() + 3600,
    })
}

/// A loopback rack `rack` of `fleet` with `cert`, dialing `bootstrap`,
/// with short timeouts and no bulk plane.
pub fn settings(
    fleet: &FleetKey,
    rack: &str,
    key: Keypair,
    cert: Certificate,
    bootstrap: Vec<Multiaddr>,
    revocations: Vec<Revocation>,
) -> MeshSettings {
    MeshSettings {
        keypair: key,
        certificate: cert,
        fleet_key: fleet.public(),
        fleet_name: "test".into(),
        rack: rack.into(),
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
        bootstrap,
        mdns: None,
        admission_timeout: Duration::from_millis(1500),
        max_connections: 64,
        max_connections_per_peer: 2,
        idle_timeout: Duration::from_secs(30),
        reconnect_initial: Duration::from_millis(200),
        reconnect_max: Duration::from_secs(1),
        membership: Default::default(),
        incarnation: 1,
        meta: RackInfo {
            rack: rack.into(),
            role: Role::Rack,
            site: "s".into(),
            cpus: 1,
            memory_mb: 1,
            power: PowerStatus::default(),
            version: "test".into(),
            api: "127.0.0.1:1".into(),
            bulk_port: None,
        },
        revocations,
        seed: 7,
        bulk: None,
    }
}
