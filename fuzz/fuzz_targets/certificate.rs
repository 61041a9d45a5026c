//! Certificates and revocations, verified against a fixed fleet key
//! (`deploy::Certificate::verify`, `deploy::Revocation::verify`).
//!
//! Mode byte, then:
//! - 0: the certificate file form (JSON), verified as presented by the
//!   fixed rack;
//! - 1: a revocation (JSON), verified;
//! - 2: raw body bytes, signed here with the fleet key so the parser and the
//!   checks behind the signature (version, fleet, binding, validity) see
//!   fuzzed bodies; a body that verifies must be one the fleet key signed;
//! - 3: the same for a revocation body;
//! - otherwise: the key parsers (`decode_public_key`, `from_secret_b64`).
#![no_main]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use deploy::cert::decode_public_key;
use deploy::{Certificate, FleetKey, Revocation};
use fieldrack_fuzz::{fleet_keypair, presenter, split_mode, FLEET, NOW};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = split_mode(data) else {
        return;
    };
    let fleet = fleet_keypair();
    let public = fleet.public();
    let peer = presenter();
    match mode {
        0 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok(cert) = Certificate::from_json(text) {
                if let Ok(body) = cert.verify(&public, FLEET, &peer, NOW) {
                    assert_eq!(body.fleet, FLEET);
                    assert_eq!(body.peer_id, peer.to_base58());
                    assert!(body.not_before <= NOW && NOW < body.not_after);
                }
            }
        }
        1 => {
            if let Ok(rev) = serde_json::from_slice::<Revocation>(rest) {
                if let Ok(body) = rev.verify(&public, FLEET) {
                    assert_eq!(body.fleet, FLEET);
                }
            }
        }
        2 => {
            let cert = Certificate {
                body: B64.encode(rest),
                signature: B64.encode(fleet.sign(rest)),
            };
            let _ = cert.verify(&public, FLEET, &peer, NOW);
            // The same bytes under another message's signature never verify.
            let other: &[u8] = if rest == b"x" { b"y" } else { b"x" };
            let forged = Certificate {
                body: cert.body.clone(),
                signature: B64.encode(fleet.sign(other)),
            };
            assert!(forged.verify(&public, FLEET, &peer, NOW).is_err());
        }
        3 => {
            let rev = Revocation {
                body: B64.encode(rest),
                signature: B64.encode(fleet.sign(rest)),
            };
            let _ = rev.verify(&public, FLEET);
        }
        _ => {
            let text = String::from_utf8_lossy(rest);
            let _ = decode_public_key(&text);
            let _ = FleetKey::from_secret_b64(&text);
        }
    }
});
