//! The signed manifest of a rack bundle (`fieldrack fleet bundle`): every
//! file of the bundle with its size and BLAKE3 hash, signed by the fleet
//! key the same way certificates are (the exact JSON bytes travel verbatim
//! with their signature). `fieldrack install` verifies the signature first,
//! then every file against it; hashing itself is I/O and lives in the agent.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use libp2p::identity::ed25519;
use serde::{Deserialize, Serialize};

use crate::FleetKey;

/// Version of [`BundleBody`].
pub const BUNDLE_VERSION: u32 = 1;

/// The signed manifest's file name at the bundle's root.
pub const BUNDLE_MANIFEST: &str = "bundle.json";

/// Largest signed manifest read: a bundle lists a few thousand files (the
/// volume store's packs and sled files) at about 120 bytes each.
pub const MAX_MANIFEST_LEN: u64 = 16 << 20;

/// What a bundle holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleBody {
    /// [`BUNDLE_VERSION`].
    pub version: u32,
    /// The fleet.
    pub fleet: String,
    /// The rack it is for.
    pub rack: String,
    /// When it was built (unix seconds).
    pub created_at: u64,
    /// Path relative to the bundle root (`/`-separated) → its hash.
    pub files: BTreeMap<String, FileHash>,
}

/// One file of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHash {
    /// Bytes.
    pub size: u64,
    /// BLAKE3, lowercase hex.
    pub blake3: String,
}

/// A signed [`BundleBody`], the content of [`BUNDLE_MANIFEST`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedBundle {
    /// base64 of the exact signed JSON bytes.
    pub body: String,
    /// base64 ed25519 signature over the decoded body.
    pub signature: String,
}

/// Why a bundle manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Not JSON, not base64, or not a body.
    #[error("malformed: {0}")]
    Malformed(String),
    /// Not signed by this fleet's key (a foreign or altered manifest).
    #[error("signature does not verify against the fleet key")]
    BadSignature,
    /// An unknown version.
    #[error("unsupported version {0}")]
    Version(u32),
    /// A listed path that would land outside the bundle.
    #[error("file {0:?} is not a plain relative path")]
    BadPath(String),
}

impl FleetKey {
    /// Sign a bundle manifest.
    pub fn sign_bundle(&self, body: &BundleBody) -> SignedBundle {
        let bytes = serde_json::to_vec(body).expect("BundleBody serializes");
        SignedBundle {
            body: B64.encode(&bytes),
            signature: B64.encode(self.sign_bytes(&bytes)),
        }
    }
}

impl SignedBundle {
    /// Verify the signature against `fleet_key`, then the body's version
    /// and paths. Returns the body.
    ///
    /// # Errors
    /// The first check that failed.
    pub fn verify(&self, fleet_key: &ed25519::PublicKey) -> Result<BundleBody, BundleError> {
        let bytes = B64
            .decode(&self.body)
            .map_err(|e| BundleError::Malformed(format!("body is not base64: {e}")))?;
        let sig = B64
            .decode(&self.signature)
            .map_err(|e| BundleError::Malformed(format!("signature is not base64: {e}")))?;
        if !fleet_key.verify(&bytes, &sig) {
            return Err(BundleError::BadSignature);
        }
        let body: BundleBody = serde_json::from_slice(&bytes)
            .map_err(|e| BundleError::Malformed(format!("body: {e}")))?;
        if body.version != BUNDLE_VERSION {
            return Err(BundleError::Version(body.version));
        }
        if let Some(bad) = body.files.keys().find(|p| !is_plain_relative(p)) {
            return Err(BundleError::BadPath(bad.clone()));
        }
        Ok(body)
    }

    /// The body without checking the signature: for reading the file list
    /// of a bundle already verified at install (`doctor` verifies).
    ///
    /// # Errors
    /// [`BundleError::Malformed`].
    pub fn unverified_body(&self) -> Result<BundleBody, BundleError> {
        let bytes = B64
            .decode(&self.body)
            .map_err(|e| BundleError::Malformed(format!("body is not base64: {e}")))?;
        serde_json::from_slice(&bytes).map_err(|e| BundleError::Malformed(format!("body: {e}")))
    }

    /// Parse the file form.
    ///
    /// # Errors
    /// [`BundleError::Malformed`].
    pub fn from_json(text: &str) -> Result<Self, BundleError> {
        serde_json::from_str(text).map_err(|e| BundleError::Malformed(e.to_string()))
    }

    /// The file form.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("SignedBundle serializes")
    }
}

/// `a/b/c`: relative, only normal components, not the manifest itself.
fn is_plain_relative(p: &str) -> bool {
    !p.is_empty()
        && p != BUNDLE_MANIFEST
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(files: &[&str]) -> BundleBody {
        BundleBody {
            version: BUNDLE_VERSION,
            fleet: "f".into(),
            rack: "a".into(),
            created_at: 1,
            files: files
                .iter()
                .map(|f| {
                    (
                        (*f).to_string(),
                        FileHash {
                            size: 3,
                            blake3: "00".into(),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn signed_by_the_fleet_verifies_and_nothing_else_does() {
        let key = FleetKey::generate();
        let b = body(&["config/rack.toml", "data/volumes/meta/db"]);
        let signed = key.sign_bundle(&b);
        let parsed = SignedBundle::from_json(&signed.to_json()).unwrap();
        assert_eq!(parsed.verify(&key.public()).unwrap(), b);
        // Another fleet's key.
        let other = FleetKey::generate();
        assert_eq!(
            parsed.verify(&other.public()),
            Err(BundleError::BadSignature)
        );
        // An altered body under the old signature.
        let mut forged = parsed.clone();
        let mut b2 = b.clone();
        b2.files.get_mut("config/rack.toml").unwrap().blake3 = "11".into();
        forged.body = B64.encode(serde_json::to_vec(&b2).unwrap());
        assert_eq!(forged.verify(&key.public()), Err(BundleError::BadSignature));
        assert!(matches!(
            SignedBundle::from_json("{}"),
            Err(BundleError::Malformed(_))
        ));
    }

    #[test]
    fn paths_outside_the_bundle_are_refused_even_when_signed() {
        let key = FleetKey::generate();
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "",
            BUNDLE_MANIFEST,
            "./a",
        ] {
            let signed = key.sign_bundle(&body(&[bad]));
            assert_eq!(
                signed.verify(&key.public()),
                Err(BundleError::BadPath(bad.into())),
                "{bad:?}"
            );
        }
        let mut v2 = body(&["a"]);
        v2.version = 2;
        assert_eq!(
            key.sign_bundle(&v2).verify(&key.public()),
            Err(BundleError::Version(2))
        );
    }
}
