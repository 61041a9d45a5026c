//! Writes the seed corpus of the `rack_toml`, `appliance_manifest` and
//! `certificate` fuzz targets (`fuzz/corpus/<target>/`) from the README's
//! examples and the real encoders: `scripts/fuzz seeds` runs it. The keys
//! are the fuzz fixtures' fixed ones (`fuzz/src/lib.rs`), so the
//! certificates verify there; ed25519 signatures are deterministic, so a
//! rerun writes the same files.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use libp2p::identity::{ed25519, Keypair};

use crate::appliance::{parse_manifest, to_toml};
use crate::cert::CERT_VERSION;
use crate::{CertBody, FleetKey, RackConfig, RevocationBody, Role};

/// `fuzz/src/lib.rs`: `FLEET_SECRET`, `PRESENTER_SECRET`, `FLEET`, `NOW`.
const FLEET_SECRET: [u8; 32] = [7; 32];
const PRESENTER_SECRET: [u8; 32] = [9; 32];
const FLEET: &str = "fuzz";
const NOW: u64 = 1_800_000_000;

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    dir
}

fn seed(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(name), bytes).expect("write seed");
}

/// The ```toml blocks of the README, in order.
fn readme_toml_blocks() -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

fn fleet() -> FleetKey {
    FleetKey::from_secret_b64(&B64.encode(FLEET_SECRET)).expect("fleet key")
}

fn presenter() -> libp2p::PeerId {
    let secret = ed25519::SecretKey::try_from_bytes(PRESENTER_SECRET).expect("32 bytes");
    Keypair::from(ed25519::Keypair::from(secret))
        .public()
        .to_peer_id()
}

#[test]
#[ignore = "writes fuzz/corpus; run by scripts/fuzz seeds"]
fn write_fuzz_seeds() {
    let fleet = fleet();
    let blocks = readme_toml_blocks();
    let path = Path::new("rack.toml");

    // rack.toml: the README's documented file (with a real key), every
    // table filled; the minimal file; both as provisioning writes them.
    let documented = blocks
        .iter()
        .filter(|b| !b.contains("[[appliance]]"))
        .cloned()
        .collect::<String>()
        .replace("base64 ed25519 public key", &fleet.public_key_b64());
    let documented = RackConfig::parse(&documented, path).expect("the README's rack.toml");
    let minimal = format!(
        "rack = \"a\"\n[fleet]\nname = \"{FLEET}\"\npublic_key = \"{}\"\n",
        fleet.public_key_b64()
    );
    let minimal_config = RackConfig::parse(&minimal, path).expect("minimal rack.toml");
    seed("rack_toml", "minimal", minimal.as_bytes());
    seed("rack_toml", "readme", documented.to_toml().as_bytes());
    seed(
        "rack_toml",
        "minimal-provisioned",
        minimal_config.to_toml().as_bytes(),
    );

    // Manifests: the README's, and the serialiser's form of it.
    let manifest = blocks
        .iter()
        .find(|b| b.contains("[[appliance]]"))
        .expect("the README's manifest");
    let specs = parse_manifest(manifest).expect("the README's manifest parses");
    seed("appliance_manifest", "readme", manifest.as_bytes());
    seed(
        "appliance_manifest",
        "serialised",
        to_toml(&specs).as_bytes(),
    );
    let vm = "[[appliance]]\nname = \"vm\"\ndriver = \"qemu\"\nafter = [\"db\"]\n\
              [[appliance.volume]]\nname = \"disk\"\nsize = \"4GiB\"\n\
              [[appliance]]\nname = \"db\"\ndriver = \"process\"\ncommand = [\"db\"]\n\
              tier = 1\nenv = { MODE = \"field\" }\n";
    parse_manifest(vm).expect("the qemu example parses");
    seed("appliance_manifest", "qemu-after", vm.as_bytes());

    // Certificates and revocations, in the target's modes (first byte).
    let body = CertBody {
        version: CERT_VERSION,
        fleet: FLEET.into(),
        rack: "a".into(),
        peer_id: presenter().to_base58(),
        role: Role::Rack,
        site: "north".into(),
        serial: 42,
        not_before: NOW - 86_400,
        not_after: NOW + 86_400 * 365,
    };
    let cert = fleet.issue(&body);
    cert.verify(&fleet.public(), FLEET, &presenter(), NOW)
        .expect("the seed certificate verifies");
    let rev = fleet.revoke(&RevocationBody {
        version: CERT_VERSION,
        fleet: FLEET.into(),
        rack: "a".into(),
        peer_id: presenter().to_base58(),
        revoked_at: NOW,
        reason: "stolen".into(),
    });
    rev.verify(&fleet.public(), FLEET)
        .expect("the seed revocation verifies");
    let with_mode = |mode: u8, bytes: &[u8]| [&[mode][..], bytes].concat();
    seed(
        "certificate",
        "cert-file",
        &with_mode(0, cert.to_json().as_bytes()),
    );
    let rev_json = serde_json::to_vec(&rev).expect("revocation serialises");
    seed("certificate", "revocation", &with_mode(1, &rev_json));
    let body_json = serde_json::to_vec(&body).expect("body serialises");
    seed("certificate", "cert-body", &with_mode(2, &body_json));
    let rev_body = B64.decode(&rev.body).expect("base64");
    seed("certificate", "revocation-body", &with_mode(3, &rev_body));
    seed(
        "certificate",
        "public-key",
        &with_mode(4, fleet.public_key_b64().as_bytes()),
    );
}
