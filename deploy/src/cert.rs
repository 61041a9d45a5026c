//! Fleet identity: the fleet signing key, rack certificates, revocations.
//!
//! A certificate is the exact JSON bytes of a [`CertBody`] plus an ed25519
//! signature over those bytes by the fleet key. Carrying the signed bytes
//! verbatim avoids any canonical-encoding question: the verifier checks the
//! signature over what it received, then parses. A certificate from another
//! fleet fails the signature check (and the fleet-name check); a certificate
//! presented by the wrong PeerId fails the binding check.
//!
//! A [`Revocation`] is signed the same way and names the PeerId it revokes,
//! so any rack can verify a revocation it hears from any other rack.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use libp2p::identity::ed25519;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::Role;

/// On-wire version of certificate and revocation bodies.
pub const CERT_VERSION: u32 = 1;

/// Largest encoded certificate or revocation accepted from the network;
/// a real one is about 600 bytes, so anything bigger is a lie or an attack.
pub const MAX_SIGNED_LEN: usize = 4096;

/// Why a certificate or revocation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// Not base64, not JSON, or too large.
    #[error("malformed: {0}")]
    Malformed(String),
    /// Signature does not verify against the fleet key.
    #[error("signature does not verify against the fleet key")]
    BadSignature,
    /// Issued for another fleet.
    #[error("issued for fleet {found:?}, expected {expected:?}")]
    WrongFleet {
        /// Fleet named in the body.
        found: String,
        /// Our fleet.
        expected: String,
    },
    /// The PeerId in the certificate is not the one that presented it.
    #[error("certificate is bound to {bound}, presented by {presented}")]
    WrongPeer {
        /// PeerId in the certificate.
        bound: String,
        /// PeerId of the connection.
        presented: String,
    },
    /// Expired or not yet valid.
    #[error("not valid at {now} (valid {not_before}..{not_after})")]
    Expired {
        /// Unix seconds now.
        now: u64,
        /// Start of validity.
        not_before: u64,
        /// End of validity.
        not_after: u64,
    },
    /// Unsupported body version.
    #[error("unsupported version {0}")]
    Version(u32),
    /// The key is not an ed25519 public key.
    #[error("bad public key: {0}")]
    BadKey(String),
}

/// Decode a base64 ed25519 public key (as written in `rack.toml`).
///
/// # Errors
/// [`CertError::BadKey`].
pub fn decode_public_key(s: &str) -> Result<ed25519::PublicKey, CertError> {
    let bytes = B64
        .decode(s.trim())
        .map_err(|e| CertError::BadKey(format!("not base64: {e}")))?;
    ed25519::PublicKey::try_from_bytes(&bytes).map_err(|e| CertError::BadKey(e.to_string()))
}

/// Encode an ed25519 public key as base64.
pub fn encode_public_key(k: &ed25519::PublicKey) -> String {
    B64.encode(k.to_bytes())
}

/// The fleet signing key. Lives only on the provisioning laptop.
pub struct FleetKey(ed25519::Keypair);

impl std::fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("FleetKey")
            .field(&self.public_key_b64())
            .finish()
    }
}

impl FleetKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self(ed25519::Keypair::generate())
    }

    /// The secret key as base64 text (for the 0600 key file).
    pub fn to_secret_b64(&self) -> String {
        B64.encode(self.0.secret().as_ref())
    }

    /// Parse [`FleetKey::to_secret_b64`] output.
    ///
    /// # Errors
    /// [`CertError::BadKey`].
    pub fn from_secret_b64(s: &str) -> Result<Self, CertError> {
        let bytes = B64
            .decode(s.trim())
            .map_err(|e| CertError::BadKey(format!("not base64: {e}")))?;
        let secret = ed25519::SecretKey::try_from_bytes(bytes)
            .map_err(|e| CertError::BadKey(e.to_string()))?;
        Ok(Self(ed25519::Keypair::from(secret)))
    }

    /// The public half, as base64 (goes into every `rack.toml`).
    pub fn public_key_b64(&self) -> String {
        encode_public_key(&self.0.public())
    }

    /// The public half.
    pub fn public(&self) -> ed25519::PublicKey {
        self.0.public()
    }

    /// Sign a certificate body.
    pub fn issue(&self, body: &CertBody) -> Certificate {
        let bytes = serde_json::to_vec(body).expect("CertBody serializes");
        Certificate {
            body: B64.encode(&bytes),
            signature: B64.encode(self.0.sign(&bytes)),
        }
    }

    /// Sign arbitrary bytes (a bundle manifest: [`crate::bundle`]).
    pub(crate) fn sign_bytes(&self, bytes: &[u8]) -> Vec<u8> {
        self.0.sign(bytes)
    }

    /// Sign a revocation body.
    pub fn revoke(&self, body: &RevocationBody) -> Revocation {
        let bytes = serde_json::to_vec(body).expect("RevocationBody serializes");
        Revocation {
            body: B64.encode(&bytes),
            signature: B64.encode(self.0.sign(&bytes)),
        }
    }
}

/// What a certificate asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertBody {
    /// [`CERT_VERSION`].
    pub version: u32,
    /// Fleet name.
    pub fleet: String,
    /// Rack name.
    pub rack: String,
    /// The rack's libp2p PeerId (base58).
    pub peer_id: String,
    /// Rack or witness.
    pub role: Role,
    /// Failure domain.
    pub site: String,
    /// Random serial, distinguishes re-issued certificates.
    pub serial: u64,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub not_after: u64,
}

/// A signed [`CertBody`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// base64 of the exact signed JSON bytes.
    pub body: String,
    /// base64 ed25519 signature over the decoded body.
    pub signature: String,
}

fn open_signed(
    body: &str,
    signature: &str,
    fleet_key: &ed25519::PublicKey,
) -> Result<Vec<u8>, CertError> {
    if body.len() + signature.len() > MAX_SIGNED_LEN {
        return Err(CertError::Malformed("too large".into()));
    }
    let bytes = B64
        .decode(body)
        .map_err(|e| CertError::Malformed(format!("body is not base64: {e}")))?;
    let sig = B64
        .decode(signature)
        .map_err(|e| CertError::Malformed(format!("signature is not base64: {e}")))?;
    if !fleet_key.verify(&bytes, &sig) {
        return Err(CertError::BadSignature);
    }
    Ok(bytes)
}

impl Certificate {
    /// Verify signature, fleet, binding to `presenter` and validity at `now`
    /// (unix seconds). Returns the body.
    ///
    /// # Errors
    /// The first check that failed.
    pub fn verify(
        &self,
        fleet_key: &ed25519::PublicKey,
        fleet_name: &str,
        presenter: &PeerId,
        now: u64,
    ) -> Result<CertBody, CertError> {
        let bytes = open_signed(&self.body, &self.signature, fleet_key)?;
        let body: CertBody = serde_json::from_slice(&bytes)
            .map_err(|e| CertError::Malformed(format!("body: {e}")))?;
        if body.version != CERT_VERSION {
            return Err(CertError::Version(body.version));
        }
        if body.fleet != fleet_name {
            return Err(CertError::WrongFleet {
                found: body.fleet,
                expected: fleet_name.into(),
            });
        }
        if body.peer_id != presenter.to_base58() {
            return Err(CertError::WrongPeer {
                bound: body.peer_id,
                presented: presenter.to_base58(),
            });
        }
        if now < body.not_before || now >= body.not_after {
            return Err(CertError::Expired {
                now,
                not_before: body.not_before,
                not_after: body.not_after,
            });
        }
        Ok(body)
    }

    /// Parse the JSON file form.
    ///
    /// # Errors
    /// [`CertError::Malformed`].
    pub fn from_json(text: &str) -> Result<Self, CertError> {
        serde_json::from_str(text).map_err(|e| CertError::Malformed(e.to_string()))
    }

    /// The JSON file form.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("Certificate serializes")
    }
}

/// What a revocation asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationBody {
    /// [`CERT_VERSION`].
    pub version: u32,
    /// Fleet name.
    pub fleet: String,
    /// The revoked rack's name (informational).
    pub rack: String,
    /// The revoked PeerId: the binding that stops being trusted.
    pub peer_id: String,
    /// Unix seconds.
    pub revoked_at: u64,
    /// Free text for operators.
    pub reason: String,
}

/// A signed [`RevocationBody`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    /// base64 of the exact signed JSON bytes.
    pub body: String,
    /// base64 ed25519 signature over the decoded body.
    pub signature: String,
}

impl Revocation {
    /// Verify signature and fleet; returns the body.
    ///
    /// # Errors
    /// The first check that failed.
    pub fn verify(
        &self,
        fleet_key: &ed25519::PublicKey,
        fleet_name: &str,
    ) -> Result<RevocationBody, CertError> {
        let bytes = open_signed(&self.body, &self.signature, fleet_key)?;
        let body: RevocationBody = serde_json::from_slice(&bytes)
            .map_err(|e| CertError::Malformed(format!("body: {e}")))?;
        if body.version != CERT_VERSION {
            return Err(CertError::Version(body.version));
        }
        if body.fleet != fleet_name {
            return Err(CertError::WrongFleet {
                found: body.fleet,
                expected: fleet_name.into(),
            });
        }
        if body.peer_id.parse::<PeerId>().is_err() {
            return Err(CertError::Malformed(format!(
                "peer_id {:?} is not a PeerId",
                body.peer_id
            )));
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn body(peer: &PeerId) -> CertBody {
        CertBody {
            version: CERT_VERSION,
            fleet: "haiti".into(),
            rack: "a".into(),
            peer_id: peer.to_base58(),
            role: Role::Rack,
            site: "s1".into(),
            serial: 7,
            not_before: 100,
            not_after: 200,
        }
    }

    #[test]
    fn valid_certificate_verifies() {
        let fleet = FleetKey::generate();
        let peer = PeerId::random();
        let cert = fleet.issue(&body(&peer));
        let got = cert.verify(&fleet.public(), "haiti", &peer, 150).unwrap();
        assert_eq!(got.rack, "a");
        // and survives the file round trip
        let again = Certificate::from_json(&cert.to_json()).unwrap();
        assert_eq!(again, cert);
    }

    #[test]
    fn other_fleet_key_is_refused() {
        let fleet = FleetKey::generate();
        let other = FleetKey::generate();
        let peer = PeerId::random();
        let cert = other.issue(&body(&peer));
        assert_eq!(
            cert.verify(&fleet.public(), "haiti", &peer, 150),
            Err(CertError::BadSignature)
        );
    }

    #[test]
    fn other_fleet_name_is_refused() {
        let fleet = FleetKey::generate();
        let peer = PeerId::random();
        let cert = fleet.issue(&body(&peer));
        assert!(matches!(
            cert.verify(&fleet.public(), "nepal", &peer, 150),
            Err(CertError::WrongFleet { .. })
        ));
    }

    #[test]
    fn stolen_certificate_is_refused() {
        let fleet = FleetKey::generate();
        let peer = PeerId::random();
        let cert = fleet.issue(&body(&peer));
        let thief = PeerId::random();
        assert!(matches!(
            cert.verify(&fleet.public(), "haiti", &thief, 150),
            Err(CertError::WrongPeer { .. })
        ));
    }

    #[test]
    fn expiry_is_enforced() {
        let fleet = FleetKey::generate();
        let peer = PeerId::random();
        let cert = fleet.issue(&body(&peer));
        assert!(matches!(
            cert.verify(&fleet.public(), "haiti", &peer, 99),
            Err(CertError::Expired { .. })
        ));
        assert!(matches!(
            cert.verify(&fleet.public(), "haiti", &peer, 200),
            Err(CertError::Expired { .. })
        ));
    }

    #[test]
    fn tampered_body_is_refused() {
        let fleet = FleetKey::generate();
        let peer = PeerId::random();
        let mut b = body(&peer);
        let cert = fleet.issue(&b);
        b.not_after = u64::MAX;
        let forged = Certificate {
            body: B64.encode(serde_json::to_vec(&b).unwrap()),
            signature: cert.signature.clone(),
        };
        assert_eq!(
            forged.verify(&fleet.public(), "haiti", &peer, 150),
            Err(CertError::BadSignature)
        );
    }

    #[test]
    fn fleet_key_round_trips() {
        let k = FleetKey::generate();
        let k2 = FleetKey::from_secret_b64(&k.to_secret_b64()).unwrap();
        assert_eq!(k.public_key_b64(), k2.public_key_b64());
        assert!(decode_public_key(&k.public_key_b64()).is_ok());
        assert!(decode_public_key("not a key").is_err());
    }

    #[test]
    fn revocations_verify() {
        let fleet = FleetKey::generate();
        let peer = PeerId::random();
        let r = fleet.revoke(&RevocationBody {
            version: CERT_VERSION,
            fleet: "haiti".into(),
            rack: "c".into(),
            peer_id: peer.to_base58(),
            revoked_at: 5,
            reason: "stolen".into(),
        });
        assert_eq!(
            r.verify(&fleet.public(), "haiti").unwrap().peer_id,
            peer.to_base58()
        );
        assert_eq!(
            r.verify(&FleetKey::generate().public(), "haiti"),
            Err(CertError::BadSignature)
        );
    }

    proptest! {
        /// Whatever arrives over the wire, verification returns an error
        /// rather than panicking, and never accepts an unsigned body.
        #[test]
        fn arbitrary_certificates_never_verify(body in ".{0,300}", sig in ".{0,200}") {
            let fleet = FleetKey::generate();
            let cert = Certificate { body, signature: sig };
            prop_assert!(cert.verify(&fleet.public(), "haiti", &PeerId::random(), 150).is_err());
        }

        #[test]
        fn arbitrary_json_never_panics(text in ".{0,400}") {
            let _ = Certificate::from_json(&text);
        }

        /// Flipping any byte of a valid signed body breaks it.
        #[test]
        fn any_bit_flip_is_detected(pos in 0usize..400, bit in 0u8..8) {
            let fleet = FleetKey::generate();
            let peer = PeerId::random();
            let cert = fleet.issue(&body(&peer));
            let mut bytes = B64.decode(&cert.body).unwrap();
            let pos = pos % bytes.len();
            bytes[pos] ^= 1 << bit;
            let forged = Certificate { body: B64.encode(&bytes), signature: cert.signature };
            prop_assert!(forged.verify(&fleet.public(), "haiti", &peer, 150).is_err());
        }
    }
}
