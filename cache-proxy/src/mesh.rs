//! The mesh as a cache: how the proxy asks other racks before the backhaul,
//! and hands fresh tiles to them. The mesh crate implements these traits;
//! this crate ships no-op versions and the digest format.
//!
//! The fetch path is: local store → a peer whose latest digest says it holds
//! the key ([`PeerDirectory::candidates`], no network traffic per miss) →
//! the backhaul. After a tile is fetched over the backhaul and stored,
//! [`Replicator::replicate`] is called so at least one other rack holds it.
//! The other direction (serving peers, accepting replicas, publishing our
//! digest) goes through [`crate::ProxyHandle`].

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::store::{KeyHash, ObjectMeta};

/// Identifies a peer rack to the mesh (its PeerId, as text).
pub type PeerId = String;

/// An object as it travels between racks.
#[derive(Debug, Clone)]
pub struct PeerObject {
    /// Metadata, as the sender stored it.
    pub meta: ObjectMeta,
    /// Body; the receiver verifies the content type for tiles and stores it
    /// content-addressed like any other body.
    pub body: Bytes,
}

/// A failed peer fetch (the proxy then tries the next peer, then the backhaul).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The peer is unreachable or timed out.
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// The peer answered something malformed.
    #[error("bad answer from peer: {0}")]
    Protocol(String),
}

/// Who in the mesh may hold a key, and how to get it from them.
pub trait PeerDirectory: Send + Sync + 'static {
    /// Peers whose latest digest contains `key`, best first (same site,
    /// lowest latency). Must not do I/O: it is called on every local miss.
    fn candidates(&self, key: &KeyHash) -> Vec<PeerId>;

    /// Fetches `key` from `peer`. `Ok(None)` when the peer does not have it
    /// after all (a digest false positive or an eviction since).
    fn fetch(
        &self,
        peer: &PeerId,
        key: &KeyHash,
    ) -> BoxFuture<'static, Result<Option<PeerObject>, PeerError>>;
}

/// Copies objects fetched over the backhaul to other racks.
pub trait Replicator: Send + Sync + 'static {
    /// Called after a backhaul-fetched object was stored. Must not block:
    /// queue (bounded) and return; dropping under overload is acceptable
    /// because digests let peers find the object here anyway.
    fn replicate(&self, key: &KeyHash, object: &PeerObject);
}

/// A [`PeerDirectory`] for a rack alone: nobody holds anything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPeers;

impl PeerDirectory for NoPeers {
    fn candidates(&self, _key: &KeyHash) -> Vec<PeerId> {
        Vec::new()
    }
    fn fetch(
        &self,
        _peer: &PeerId,
        _key: &KeyHash,
    ) -> BoxFuture<'static, Result<Option<PeerObject>, PeerError>> {
        Box::pin(async { Ok(None) })
    }
}

/// A [`Replicator`] that copies nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoReplication;

impl Replicator for NoReplication {
    fn replicate(&self, _key: &KeyHash, _object: &PeerObject) {}
}

/// A Bloom filter over the [`KeyHash`]es a store holds, exchanged between
/// racks so a miss goes to a rack that has the key without asking everyone.
///
/// **False positives** (a peer is asked for something it lacks; it answers
/// `None` and we move on) happen at rate `(1 - e^(-k·n/m))^k` for `n` keys
/// in `m` bits with `k` hash functions; [`KeyDigest::for_keys`] picks
/// `m = -n·ln(p)/ln(2)²` and `k = (m/n)·ln 2` for a target `p`: at 1 %
/// that is 9.6 bits (1.2 bytes) per key, 1.2 MB for a million tiles; at
/// 5 %, 6.2 bits. **No false negatives** for keys present when it was built;
/// keys stored later are missing until the next digest (the peer is then
/// simply not asked).
///
/// Keys are already uniform 128-bit hashes, so the `k` probe positions come
/// from double hashing (Kirsch–Mitzenmacher) of its two 64-bit halves.
///
/// Wire format (little endian): `"FRDG"`, version `1` (u8), `k` (u8),
/// `n` (u64), `m` in bits (u64), then `ceil(m/64)` u64 words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDigest {
    k: u8,
    n: u64,
    m: u64,
    bits: Vec<u64>,
}

/// Digest magic.
pub const DIGEST_MAGIC: &[u8; 4] = b"FRDG";
/// Largest digest accepted from a peer: 64 MiB of bits (50 M keys at 1 %).
pub const MAX_DIGEST_BITS: u64 = 512 * 1024 * 1024;

/// A digest did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DigestError {
    /// Bad magic, version or length.
    #[error("malformed digest")]
    Malformed,
    /// Larger than [`MAX_DIGEST_BITS`].
    #[error("digest too large")]
    TooLarge,
}

impl KeyDigest {
    /// An empty digest sized for `expected` keys at false-positive rate `fp`.
    pub fn with_capacity(expected: u64, fp: f64) -> KeyDigest {
        let n = expected.max(1) as f64;
        let fp = fp.clamp(1e-9, 0.5);
        let ln2 = std::f64::consts::LN_2;
        let m = ((-n * fp.ln()) / (ln2 * ln2)).ceil().max(64.0) as u64;
        let k = ((m as f64 / n) * ln2).round().clamp(1.0, 32.0) as u8;
        KeyDigest {
            k,
            n: 0,
            m,
            bits: vec![0; m.div_ceil(64) as usize],
        }
    }

    /// A digest of `keys` at false-positive rate `fp`.
    pub fn for_keys<'a>(keys: impl ExactSizeIterator<Item = &'a KeyHash>, fp: f64) -> KeyDigest {
        let mut d = KeyDigest::with_capacity(keys.len() as u64, fp);
        for k in keys {
            d.insert(k);
        }
        d
    }

    fn positions(&self, key: &KeyHash) -> impl Iterator<Item = u64> + '_ {
        let h1 = u64::from_le_bytes(key[..8].try_into().expect("8"));
        let h2 = u64::from_le_bytes(key[8..].try_into().expect("8")) | 1;
        (0..u64::from(self.k)).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % self.m)
    }

    /// Adds a key.
    pub fn insert(&mut self, key: &KeyHash) {
        let pos: Vec<u64> = self.positions(key).collect();
        for p in pos {
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        self.n += 1;
    }

    /// Whether the key may be present (false positives at the documented rate).
    pub fn contains(&self, key: &KeyHash) -> bool {
        self.positions(key)
            .all(|p| self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }

    /// Keys inserted.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// Whether nothing was inserted.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The expected false-positive rate at the current fill,
    /// `(1 - e^(-k·n/m))^k`.
    pub fn expected_fp_rate(&self) -> f64 {
        let k = f64::from(self.k);
        (1.0 - (-k * self.n as f64 / self.m as f64).exp()).powf(k)
    }

    /// Serialises.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(22 + self.bits.len() * 8);
        v.extend_from_slice(DIGEST_MAGIC);
        v.push(1);
        v.push(self.k);
        v.extend_from_slice(&self.n.to_le_bytes());
        v.extend_from_slice(&self.m.to_le_bytes());
        for w in &self.bits {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v
    }

    /// Deserialises a digest received from a peer.
    ///
    /// # Errors
    /// Malformed or oversized input.
    pub fn from_bytes(b: &[u8]) -> Result<KeyDigest, DigestError> {
        if b.len() < 22 || &b[..4] != DIGEST_MAGIC || b[4] != 1 {
            return Err(DigestError::Malformed);
        }
        let k = b[5];
        let n = u64::from_le_bytes(b[6..14].try_into().expect("8"));
        let m = u64::from_le_bytes(b[14..22].try_into().expect("8"));
        if m > MAX_DIGEST_BITS {
            return Err(DigestError::TooLarge);
        }
        if k == 0 || m == 0 || (b.len() - 22) as u64 != m.div_ceil(64) * 8 {
            return Err(DigestError::Malformed);
        }
        let bits = b[22..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect();
        Ok(KeyDigest { k, n, m, bits })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::key_hash;

    #[test]
    fn digest_no_false_negatives_and_documented_fp_rate() {
        let keys: Vec<KeyHash> = (0..100_000)
            .map(|i| key_hash(&format!("tile:osm/{i}")))
            .collect();
        let d = KeyDigest::for_keys(keys.iter(), 0.01);
        assert!(keys.iter().all(|k| d.contains(k)));
        let fp = (0..100_000)
            .filter(|i| d.contains(&key_hash(&format!("absent/{i}"))))
            .count() as f64
            / 100_000.0;
        let expected = d.expected_fp_rate();
        assert!((0.008..0.012).contains(&expected), "{expected}");
        assert!(
            fp < 0.013 && fp > 0.007,
            "measured {fp}, expected {expected}"
        );
        let bytes = d.to_bytes();
        assert!(bytes.len() < 125_000, "{} bytes for 100k keys", bytes.len());
        let back = KeyDigest::from_bytes(&bytes).unwrap();
        assert_eq!(back, d);
        assert!(KeyDigest::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(KeyDigest::from_bytes(&bad).is_err());
    }
}
