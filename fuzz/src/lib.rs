//! Fixtures shared by the fuzz targets in `fuzz_targets/`.
//!
//! Every target calls the real parser of a Fieldrack crate; this library
//! only holds the fixed inputs those parsers need besides the fuzzed bytes
//! (a fleet key, a presenting PeerId, tile sources) and small input
//! splitters. The seed corpus in `corpus/<target>/` is written by the
//! crates' `write_fuzz_seeds` tests from the same fixed values (see
//! `scripts/fuzz seeds`), so seeds verify against these keys.

use libp2p::identity::{ed25519, Keypair};
use libp2p::PeerId;

/// Fleet name the certificate targets verify against.
pub const FLEET: &str = "fuzz";

/// "Now" for certificate validity (2027-01-15), inside the seeds' validity.
pub const NOW: u64 = 1_800_000_000;

/// Secret of the fixed fleet key. The seed generators use the same bytes.
pub const FLEET_SECRET: [u8; 32] = [7; 32];

/// Secret of the rack that presents certificates. The seed generators use
/// the same bytes.
pub const PRESENTER_SECRET: [u8; 32] = [9; 32];

/// The fixed fleet key pair (the fuzz targets also sign fuzzed bodies with
/// it, to reach the checks behind the signature).
pub fn fleet_keypair() -> ed25519::Keypair {
    let secret = ed25519::SecretKey::try_from_bytes(FLEET_SECRET).expect("32 bytes");
    ed25519::Keypair::from(secret)
}

/// The PeerId that presents certificates.
pub fn presenter() -> PeerId {
    peer(PRESENTER_SECRET)
}

/// The PeerId of the ed25519 key with this secret.
pub fn peer(secret: [u8; 32]) -> PeerId {
    let secret = ed25519::SecretKey::try_from_bytes(secret).expect("32 bytes");
    Keypair::from(ed25519::Keypair::from(secret))
        .public()
        .to_peer_id()
}

/// Splits an input into a selector byte and the rest, so one target can
/// drive a few related entry points and libFuzzer learns which is which.
pub fn split_mode(data: &[u8]) -> Option<(u8, &[u8])> {
    let (&mode, rest) = data.split_first()?;
    Some((mode, rest))
}

/// Header fields from text lines `name: value`; lines that are not a valid
/// field are skipped (hyper would have refused them before any parser of
/// ours saw them).
pub fn headers_from_text(text: &str) -> hyper::HeaderMap {
    let mut h = hyper::HeaderMap::new();
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::from_bytes(name.trim().as_bytes()),
            hyper::header::HeaderValue::from_bytes(value.trim().as_bytes()),
        ) else {
            continue;
        };
        h.append(name, value);
    }
    h
}

/// Little-endian `u32` at the front of `data`, and the rest (zero when
/// `data` is shorter).
pub fn take_u32(data: &[u8]) -> (u32, &[u8]) {
    if data.len() < 4 {
        return (0, &[]);
    }
    let (n, rest) = data.split_at(4);
    (u32::from_le_bytes([n[0], n[1], n[2], n[3]]), rest)
}

/// A tile source as `rack.toml` would name it (built through serde, so the
/// defaults of fields added later apply).
pub fn tile_source(
    name: &str,
    format: &str,
    min_zoom: u8,
    max_zoom: u8,
    url: &str,
) -> cache_proxy::TileSource {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "url": url,
        "format": format,
        "min_zoom": min_zoom,
        "max_zoom": max_zoom,
        "allow_bulk": true,
    }))
    .expect("a valid tile source")
}

/// The base generation the `replication_wire` target applies manifest
/// deltas to: the manifest of the seeds (`datastore`'s `fuzz_seeds`) at
/// generation 2, whose generation 3 the `push-owner-delta` seed sends as
/// a delta.
pub fn manifest_delta_base() -> datastore::Manifest {
    let chunk_size = 4096u32;
    let a = vec![1u8; chunk_size as usize];
    let id = datastore::ChunkId::of(&a);
    datastore::Manifest {
        volume: "registry-data".into(),
        generation: 2,
        size: 5 * u64::from(chunk_size) - 512,
        chunk_size,
        chunks: vec![Some(id), None, None, Some(id), None],
        created_at_ms: 1_799_999_990_000,
    }
}
