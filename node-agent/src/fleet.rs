//! Fleet provisioning, done on the provisioning laptop before racks ship.
//!
//! ```text
//! FLEET/fleet.toml          fleet name, public key, racks (public)
//! FLEET/fleet.key           fleet signing key (0600; never leaves the laptop)
//! FLEET/revocations/<rack>.json   signed revocations issued
//! FLEET/<rack>/rack.toml    the rack's config
//! FLEET/<rack>/identity.key its libp2p key (0600)
//! FLEET/<rack>/rack.cert    its certificate, signed by the fleet key
//! FLEET/<rack>/api-token    the admin API bearer token (0600)
//! ```

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use deploy::cert::{CertBody, CERT_VERSION};
use deploy::config::{ApiConfig, BulkConfig, FleetRef, MeshConfig, RackConfig, API_TOKEN_FILE};
use deploy::{validate_rack_name, FleetKey, Revocation, RevocationBody, Role};
use libp2p::identity::Keypair;
use libp2p::PeerId;
use rand::Rng;
use serde::{Deserialize, Serialize};
use util::time::unix_secs;

use util::fs::{write_durable, PUBLIC, SECRET};

/// The fleet's public description, `FLEET/fleet.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    /// Fleet name.
    pub name: String,
    /// The fleet public key, base64.
    pub public_key: String,
    /// Whether racks were given loopback addresses (`--local`).
    pub local: bool,
    /// Certificate lifetime for racks added later.
    pub valid_days: u64,
    /// Every rack ever provisioned.
    #[serde(default, rename = "rack")]
    pub racks: Vec<FleetRack>,
}

/// One rack in `fleet.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetRack {
    /// Rack name.
    pub name: String,
    /// Its PeerId.
    pub peer_id: String,
    /// Rack or witness.
    pub role: Role,
    /// Site.
    pub site: String,
    /// Its first mesh listen address.
    pub mesh: String,
    /// Its API address.
    pub api: String,
    /// Revoked?
    #[serde(default)]
    pub revoked: bool,
}

/// Options for provisioning one rack.
#[derive(Debug, Clone)]
pub struct RackSpec {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Site.
    pub site: String,
}

/// File name of the fleet key.
pub const FLEET_KEY_FILE: &str = "fleet.key";
/// File name of the fleet description.
pub const FLEET_FILE: &str = "fleet.toml";

/// `fieldrack fleet init`.
///
/// # Errors
/// If the directory already holds a fleet, a name is invalid, or a write fails.
pub fn init(
    dir: &Path,
    name: &str,
    racks: &[RackSpec],
    local: bool,
    valid_days: u64,
) -> Result<FleetFile> {
    if dir.join(FLEET_FILE).exists() {
        bail!(
            "{} already holds a fleet (fleet.toml exists); use `fleet add-rack`",
            dir.display()
        );
    }
    if racks.is_empty() {
        bail!("--racks: name at least one rack");
    }
    for (i, r) in racks.iter().enumerate() {
        validate_rack_name(&r.name).with_context(|| format!("rack name {:?}", r.name))?;
        if racks[..i].iter().any(|o| o.name == r.name) {
            bail!("rack {:?} named twice", r.name);
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = FleetKey::generate();
    write_durable(
        &dir.join(FLEET_KEY_FILE),
        key.to_secret_b64().as_bytes(),
        SECRET,
    )
    .context("writing fleet.key")?;
    let mut fleet = FleetFile {
        name: name.into(),
        public_key: key.public_key_b64(),
        local,
        valid_days,
        racks: Vec::new(),
    };
    for spec in racks {
        provision_rack(dir, &key, &mut fleet, spec)?;
    }
    // In a local field every rack knows every other from the start.
    if local {
        link_local_bootstrap(dir, &fleet)?;
    }
    save_fleet(dir, &fleet)?;
    Ok(fleet)
}

/// `fieldrack fleet add-rack`.
///
/// # Errors
/// If the fleet cannot be read, the name is taken, or a write fails.
pub fn add_rack(dir: &Path, spec: &RackSpec) -> Result<FleetRack> {
    let (mut fleet, key) = load(dir)?;
    validate_rack_name(&spec.name).with_context(|| format!("rack name {:?}", spec.name))?;
    if fleet.racks.iter().any(|r| r.name == spec.name) {
        bail!("rack {:?} already exists in this fleet", spec.name);
    }
    provision_rack(dir, &key, &mut fleet, spec)?;
    if fleet.local {
        link_local_bootstrap(dir, &fleet)?;
    }
    save_fleet(dir, &fleet)?;
    Ok(fleet.racks.last().cloned().expect("just added"))
}

/// `fieldrack fleet revoke`: sign a revocation for `rack`, record it in the
/// fleet directory, and return it (the CLI then hands it to an agent).
///
/// # Errors
/// If the rack is unknown or a write fails.
pub fn revoke(dir: &Path, rack: &str, reason: &str) -> Result<Revocation> {
    let (mut fleet, key) = load(dir)?;
    let Some(entry) = fleet.racks.iter_mut().find(|r| r.name == rack) else {
        bail!("no rack {rack:?} in {}", dir.display());
    };
    let rev = key.revoke(&RevocationBody {
        version: CERT_VERSION,
        fleet: fleet.name.clone(),
        rack: rack.into(),
        peer_id: entry.peer_id.clone(),
        revoked_at: unix_secs(),
        reason: reason.into(),
    });
    entry.revoked = true;
    let rdir = dir.join("revocations");
    std::fs::create_dir_all(&rdir)?;
    write_durable(
        &rdir.join(format!("{rack}.json")),
        serde_json::to_string_pretty(&rev)?.as_bytes(),
        PUBLIC,
    )?;
    save_fleet(dir, &fleet)?;
    Ok(rev)
}

/// Read `fleet.toml` and `fleet.key`.
///
/// # Errors
/// If either is missing or malformed.
pub fn load(dir: &Path) -> Result<(FleetFile, FleetKey)> {
    let path = dir.join(FLEET_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let fleet: FleetFile =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let kpath = dir.join(FLEET_KEY_FILE);
    let ktext =
        std::fs::read_to_string(&kpath).with_context(|| format!("reading {}", kpath.display()))?;
    let key = FleetKey::from_secret_b64(&ktext)
        .with_context(|| format!("parsing {}", kpath.display()))?;
    if key.public_key_b64() != fleet.public_key {
        bail!(
            "{} does not match the public key in {}",
            kpath.display(),
            path.display()
        );
    }
    Ok((fleet, key))
}

/// Write `fleet.toml`.
///
/// # Errors
/// If the write fails.
pub fn save_fleet(dir: &Path, fleet: &FleetFile) -> Result<()> {
    let text = toml::to_string_pretty(fleet)?;
    write_durable(&dir.join(FLEET_FILE), text.as_bytes(), PUBLIC).context("writing fleet.toml")
}

/// The directory of one rack.
pub fn rack_dir(dir: &Path, rack: &str) -> PathBuf {
    dir.join(rack)
}

fn provision_rack(
    dir: &Path,
    key: &FleetKey,
    fleet: &mut FleetFile,
    spec: &RackSpec,
) -> Result<()> {
    let rdir = rack_dir(dir, &spec.name);
    std::fs::create_dir_all(&rdir).with_context(|| format!("creating {}", rdir.display()))?;
    let (identity, cert) = issue_identity(
        key,
        &fleet.name,
        &spec.name,
        spec.role,
        &spec.site,
        fleet.valid_days,
    );
    let peer = PeerId::from(identity.public());
    write_durable(
        &rdir.join("identity.key"),
        &identity
            .to_protobuf_encoding()
            .context("encoding identity")?,
        SECRET,
    )?;
    write_durable(&rdir.join("rack.cert"), cert.to_json().as_bytes(), PUBLIC)?;
    write_durable(
        &rdir.join(API_TOKEN_FILE),
        new_api_token().as_bytes(),
        SECRET,
    )?;
    let (mesh, api, bulk) = if fleet.local {
        // The bulk plane on the mesh port + 1 (free_ports checked it).
        let (udp, tcp) = free_ports()?;
        (
            MeshConfig {
                listen: vec![format!("/ip4/127.0.0.1/udp/{udp}/quic-v1")],
                mdns: false,
                ..MeshConfig::default()
            },
            ApiConfig {
                listen: format!("127.0.0.1:{tcp}"),
            },
            BulkConfig {
                listen: format!("127.0.0.1:{}", udp + 1),
                ..BulkConfig::default()
            },
        )
    } else {
        (
            MeshConfig::default(),
            ApiConfig::default(),
            BulkConfig::default(),
        )
    };
    let config = RackConfig {
        rack: spec.name.clone(),
        role: spec.role,
        site: spec.site.clone(),
        fleet: FleetRef {
            name: fleet.name.clone(),
            public_key: key.public_key_b64(),
        },
        data_dir: "data".into(),
        identity_key: "identity.key".into(),
        certificate: "rack.cert".into(),
        mesh,
        membership: Default::default(),
        api,
        power: Default::default(),
        capacity: Default::default(),
        volumes: Default::default(),
        control: Default::default(),
        bulk,
        proxy: (spec.role == Role::Rack)
            .then(|| proxy_table(fleet.local))
            .transpose()?,
        tile_source: Vec::new(),
        log: Default::default(),
        console: Default::default(),
    };
    fleet.racks.push(FleetRack {
        name: spec.name.clone(),
        peer_id: peer.to_base58(),
        role: spec.role,
        site: spec.site.clone(),
        mesh: config.mesh.listen[0].clone(),
        api: config.api.listen.clone(),
        revoked: false,
    });
    write_durable(&rdir.join("rack.toml"), config.to_toml().as_bytes(), PUBLIC)?;
    Ok(())
}

/// A new libp2p identity for a rack and its certificate, valid from an
/// hour ago (clock skew between laptop and rack) for `valid_days`.
#[must_use]
pub fn issue_identity(
    key: &FleetKey,
    fleet: &str,
    rack: &str,
    role: Role,
    site: &str,
    valid_days: u64,
) -> (Keypair, deploy::Certificate) {
    let identity = Keypair::generate_ed25519();
    let now = unix_secs();
    let cert = key.issue(&CertBody {
        version: CERT_VERSION,
        fleet: fleet.into(),
        rack: rack.into(),
        peer_id: PeerId::from(identity.public()).to_base58(),
        role,
        site: site.into(),
        serial: rand::thread_rng().gen(),
        not_before: now.saturating_sub(3600),
        not_after: now + valid_days * 86_400,
    });
    (identity, cert)
}

/// A fresh admin API token: 24 random bytes, hex.
#[must_use]
pub fn new_api_token() -> String {
    let bytes: [u8; 24] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `[proxy]` table of a new rack: a distinct loopback port in a local
/// field; otherwise port 3128 on every interface, open to the private
/// networks relief staff's devices are on (never an open proxy).
fn proxy_table(local: bool) -> Result<deploy::config::ProxyConfig> {
    let (listen, allow): (String, Vec<&str>) = if local {
        let (_, tcp) = free_ports()?;
        (format!("127.0.0.1:{tcp}"), vec!["127.0.0.0/8"])
    } else {
        (
            "0.0.0.0:3128".into(),
            vec![
                "127.0.0.0/8",
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "fd00::/8",
            ],
        )
    };
    Ok(deploy::config::ProxyConfig {
        listen: listen.parse()?,
        allow_networks: allow.into_iter().map(String::from).collect(),
        ..Default::default()
    })
}

/// Point every local rack's bootstrap list at every other rack.
fn link_local_bootstrap(dir: &Path, fleet: &FleetFile) -> Result<()> {
    for r in fleet.racks.iter().filter(|r| !r.revoked) {
        let path = rack_dir(dir, &r.name).join("rack.toml");
        // parse, not load: keep the relative paths as written
        let text = std::fs::read_to_string(&path)?;
        let mut config = RackConfig::parse(&text, &path)?;
        config.mesh.bootstrap = fleet
            .racks
            .iter()
            .filter(|o| o.name != r.name && !o.revoked)
            .map(|o| format!("{}/p2p/{}", o.mesh, o.peer_id))
            .collect();
        write_durable(&path, config.to_toml().as_bytes(), PUBLIC)?;
    }
    Ok(())
}

/// Ports this process gave out already (a fleet's racks are provisioned
/// one after another, and each one's ports are only checked free).
static CHOSEN_PORTS: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// The kernel's range of ephemeral ports (`low high`).
const EPHEMERAL_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Where a local fleet's listeners go: the larger stretch of
/// `10000..=65535` outside the kernel's ephemeral range (`range_text` as in
/// [`EPHEMERAL_RANGE`]). A port picked from the ephemeral range may be
/// taken, between a rack's stop and its restart, by any outgoing
/// connection on the machine, and the restarted agent could not bind it.
/// Unreadable range: the Linux default's complement, `10000..32768`.
fn listen_range(range_text: &str) -> std::ops::Range<u16> {
    const FLOOR: u16 = 10_000;
    const ENOUGH: u16 = 2_000;
    let mut bounds = range_text
        .split_whitespace()
        .filter_map(|x| x.parse::<u16>().ok());
    let (Some(lo), Some(hi)) = (bounds.next(), bounds.next()) else {
        return FLOOR..32_768;
    };
    let below = FLOOR..lo.max(FLOOR);
    let above = hi.saturating_add(1).max(FLOOR)..u16::MAX;
    let best = if below.len() >= above.len() {
        below
    } else {
        above
    };
    if best.len() >= usize::from(ENOUGH) {
        best
    } else {
        // The ephemeral range covers nearly everything: share it.
        FLOOR..u16::MAX
    }
}

/// Find a UDP port (with the next one free too, for the bulk plane) and a
/// TCP port that are free on 127.0.0.1 right now, outside the kernel's
/// ephemeral range ([`listen_range`]).
fn free_ports() -> Result<(u16, u16)> {
    let mut rng = rand::thread_rng();
    let range = listen_range(&std::fs::read_to_string(EPHEMERAL_RANGE).unwrap_or_default());
    for _ in 0..200 {
        let udp: u16 = rng.gen_range(range.clone());
        let tcp: u16 = rng.gen_range(range.clone());
        if udp == tcp || udp.checked_add(1).is_none_or(|b| !range.contains(&b)) {
            continue;
        }
        // Free now is not enough: the racks provisioned before this one
        // have not bound theirs yet.
        let mut chosen = CHOSEN_PORTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if [udp, udp + 1, tcp].iter().any(|p| chosen.contains(p)) {
            continue;
        }
        let u = UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, udp)));
        let b = UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, udp + 1)));
        let t = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, tcp)));
        if u.is_ok() && b.is_ok() && t.is_ok() {
            chosen.extend([udp, udp + 1, tcp]);
            return Ok((udp, tcp));
        }
    }
    bail!("no free ports found on 127.0.0.1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn specs(names: &[&str]) -> Vec<RackSpec> {
        names
            .iter()
            .map(|n| RackSpec {
                name: n.to_string(),
                role: Role::Rack,
                site: "s".into(),
            })
            .collect()
    }

    #[test]
    fn local_listeners_stay_out_of_the_ephemeral_range() {
        assert_eq!(listen_range("32768\t60999\n"), 10_000..32_768);
        assert_eq!(listen_range("1024 40000"), 40_001..u16::MAX);
        assert_eq!(listen_range("1024 65535"), 10_000..u16::MAX);
        assert_eq!(listen_range(""), 10_000..32_768);
        let range = listen_range(&std::fs::read_to_string(EPHEMERAL_RANGE).unwrap());
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..64 {
            let (udp, tcp) = free_ports().unwrap();
            for p in [udp, udp + 1, tcp] {
                assert!(range.contains(&p), "{p} outside {range:?}");
                assert!(seen.insert(p), "port {p} given out twice");
            }
        }
    }

    #[test]
    fn init_provisions_verifiable_racks() {
        let d = tempfile::tempdir().unwrap();
        let fleet = init(d.path(), "haiti", &specs(&["a", "b", "c"]), true, 30).unwrap();
        assert_eq!(fleet.racks.len(), 3);
        let mode = std::fs::metadata(d.path().join(FLEET_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        for r in &fleet.racks {
            let cfg = RackConfig::load(&d.path().join(&r.name).join("rack.toml")).unwrap();
            assert_eq!(cfg.mesh.bootstrap.len(), 2);
            let key = Keypair::from_protobuf_encoding(&std::fs::read(&cfg.identity_key).unwrap())
                .unwrap();
            let cert =
                deploy::Certificate::from_json(&std::fs::read_to_string(&cfg.certificate).unwrap())
                    .unwrap();
            let fk = deploy::cert::decode_public_key(&cfg.fleet.public_key).unwrap();
            let body = cert
                .verify(&fk, "haiti", &PeerId::from(key.public()), unix_secs())
                .unwrap();
            assert_eq!(body.rack, r.name);
        }
        // a second init refuses to overwrite the fleet key
        assert!(init(d.path(), "haiti", &specs(&["a"]), true, 30).is_err());
    }

    #[test]
    fn add_and_revoke() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), "haiti", &specs(&["a", "b"]), true, 30).unwrap();
        let c = add_rack(
            d.path(),
            &RackSpec {
                name: "c".into(),
                role: Role::Witness,
                site: "s2".into(),
            },
        )
        .unwrap();
        assert_eq!(c.role, Role::Witness);
        assert!(add_rack(d.path(), &specs(&["c"])[0]).is_err());
        let cfg = RackConfig::load(&d.path().join("a/rack.toml")).unwrap();
        assert_eq!(
            cfg.mesh.bootstrap.len(),
            2,
            "existing racks learn the new one"
        );
        let rev = revoke(d.path(), "c", "lost").unwrap();
        let (fleet, key) = load(d.path()).unwrap();
        let body = rev.verify(&key.public(), "haiti").unwrap();
        assert_eq!(body.peer_id, c.peer_id);
        assert!(fleet.racks.iter().find(|r| r.name == "c").unwrap().revoked);
        assert!(revoke(d.path(), "zz", "x").is_err());
    }
}
