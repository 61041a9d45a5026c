//! Kept copies: the newest point in time of a volume this rack stopped
//! owning while it held writes no other rack may have.
//!
//! When an appliance fails over, its new owner continues from its replica,
//! which may lack the last seconds of writes the old owner made before it
//! was cut off and fenced. When the old owner returns it must give up its
//! copy (the new owner's generations would conflict with it), but dropping
//! it would lose those writes for good. Instead it is *kept*: the volume's
//! newest manifest is stored under `k/<name>/<kept_ms>` and its chunks stay
//! live for garbage collection, while the volume itself is deleted so the
//! new owner's generations replace it. An operator lists kept copies,
//! exports one as a raw image to reconcile by hand, and drops it.
//!
//! Kept copies cost only their own chunks: those they share with the
//! volume's later generations (usually nearly all) are stored once. At most
//! [`MAX_KEPT_PER_VOLUME`] are kept per volume; a new one drops the oldest.

use std::path::Path;

use super::{image, lock, validate_name, ExportError, StoreError, VolumeStore, EXPORT_MODE};
use crate::Manifest;

/// Kept copies per volume; keeping one more drops the oldest.
pub const MAX_KEPT_PER_VOLUME: usize = 3;

/// Prefix of every kept copy's key in the metadata tree.
pub(super) const KEPT_PREFIX: &[u8] = b"k/";

/// One kept copy, as listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeptCopy {
    /// The volume it is a copy of.
    pub volume: String,
    /// Its generation on this rack when it was kept (the new owner's
    /// generations of the same number hold other data).
    pub generation: u64,
    /// When it was kept (ms since the Unix epoch): with `volume`, its
    /// identity for export and drop.
    pub kept_ms: u64,
    /// When its point in time was captured (ms since the Unix epoch).
    pub captured_ms: u64,
    /// Image size in bytes.
    pub size: u64,
}

impl KeptCopy {
    fn of(m: &Manifest, kept_ms: u64) -> KeptCopy {
        KeptCopy {
            volume: m.volume.clone(),
            generation: m.generation,
            kept_ms,
            captured_ms: m.created_at_ms,
            size: m.size,
        }
    }
}

fn kept_prefix(name: &str) -> Vec<u8> {
    let mut k = KEPT_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k.push(b'/');
    k
}

fn kept_key(name: &str, kept_ms: u64) -> Vec<u8> {
    let mut k = kept_prefix(name);
    k.extend_from_slice(&kept_ms.to_be_bytes());
    k
}

/// A kept copy's record (key `key`) that fails its checks.
fn damaged_kept(key: &[u8]) -> StoreError {
    StoreError::Damaged {
        what: "kept copy",
        name: String::from_utf8_lossy(key).into_owned(),
    }
}

/// The manifest stored under kept-copy key `key`.
fn decode_kept(key: &[u8], v: &[u8]) -> Result<Manifest, StoreError> {
    Manifest::decode(v).map_err(|_| damaged_kept(key))
}

/// `kept_ms` from a key of [`kept_prefix`]`(name)`.
fn kept_ms_of(key: &[u8], prefix_len: usize) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(prefix_len..)?.try_into().ok()?))
}

impl VolumeStore {
    /// Keep the newest generation of `name` as a kept copy, then delete
    /// the volume (see [`VolumeStore::delete`]). The copy is committed
    /// before the volume is deleted, so a crash between leaves both, never
    /// neither. A volume with no generation is only deleted. Returns the
    /// copy kept.
    ///
    /// # Errors
    /// [`StoreError`] ([`StoreError::NotFound`] if unknown); nothing
    /// changes on error.
    pub fn keep_and_delete(
        &self,
        name: &str,
        kept_ms: u64,
    ) -> Result<Option<KeptCopy>, StoreError> {
        let kept = {
            let _g = self.gc_shared();
            let vl = self.vol_lock(name);
            let _v = lock(&vl);
            self.existing(name)?;
            match self.latest(name)? {
                None => None,
                Some(m) => {
                    // A clock that went back must not overwrite an older copy.
                    let held = self.kept_of(name)?;
                    let kept_ms = held.last().map_or(kept_ms, |k| kept_ms.max(k.kept_ms + 1));
                    let mut batch = sled::Batch::default();
                    batch.insert(kept_key(name, kept_ms), m.encode());
                    let excess = (held.len() + 1).saturating_sub(MAX_KEPT_PER_VOLUME);
                    for old in &held[..excess] {
                        batch.remove(kept_key(name, old.kept_ms));
                    }
                    self.commit(batch)?;
                    Some(KeptCopy::of(&m, kept_ms))
                }
            }
        };
        // The kept manifest holds its chunks live already: deleting the
        // volume now drops only what the copy does not need.
        self.delete(name)?;
        if let Some(k) = &kept {
            tracing::warn!(
                volume = name,
                generation = k.generation,
                kept_ms = k.kept_ms,
                "kept this rack's newest copy of a volume another rack owns now (fieldrack volume kept)"
            );
        }
        Ok(kept)
    }

    /// Every kept copy, by volume then age (oldest first).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn kept(&self) -> Result<Vec<KeptCopy>, StoreError> {
        self.scan_kept(KEPT_PREFIX)
    }

    /// The kept copies of `name`, oldest first.
    fn kept_of(&self, name: &str) -> Result<Vec<KeptCopy>, StoreError> {
        self.scan_kept(&kept_prefix(name))
    }

    /// The kept copies whose keys start with `prefix`.
    fn scan_kept(&self, prefix: &[u8]) -> Result<Vec<KeptCopy>, StoreError> {
        self.meta
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv?;
                let m = decode_kept(&k, &v)?;
                let ms =
                    kept_ms_of(&k, kept_prefix(&m.volume).len()).ok_or_else(|| damaged_kept(&k))?;
                Ok(KeptCopy::of(&m, ms))
            })
            .collect()
    }

    /// The manifest of a kept copy.
    fn kept_manifest(&self, name: &str, kept_ms: u64) -> Result<Option<Manifest>, StoreError> {
        validate_name(name)?;
        let key = kept_key(name, kept_ms);
        self.meta
            .get(&key)?
            .map(|v| decode_kept(&key, &v))
            .transpose()
    }

    /// The chunks of every kept copy, for garbage collection's live set.
    pub(super) fn kept_manifests(&self) -> impl Iterator<Item = Result<Manifest, StoreError>> + '_ {
        self.meta.scan_prefix(KEPT_PREFIX).map(|kv| {
            let (k, v) = kv?;
            decode_kept(&k, &v)
        })
    }

    /// Write kept copy (`name`, `kept_ms`) to `to` as a raw image, as
    /// [`VolumeStore::export`] does a generation.
    ///
    /// # Errors
    /// [`ExportError`] ([`ExportError::NoSuchKept`] if there is none);
    /// `to` is untouched on error.
    pub fn export_kept(
        &self,
        name: &str,
        kept_ms: u64,
        to: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, ExportError> {
        let _g = self.gc_shared();
        let m = self
            .kept_manifest(name, kept_ms)?
            .ok_or_else(|| ExportError::NoSuchKept {
                name: name.to_owned(),
                kept_ms,
            })?;
        image::materialise(&self.chunks, &m, to, EXPORT_MODE, progress)?;
        Ok(m)
    }

    /// Drop kept copy (`name`, `kept_ms`); its chunks go at the next prune
    /// unless something else references them.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if there is no such copy.
    pub fn drop_kept(&self, name: &str, kept_ms: u64) -> Result<KeptCopy, StoreError> {
        let vl = self.vol_lock(name);
        let _v = lock(&vl);
        let m = self
            .kept_manifest(name, kept_ms)?
            .ok_or_else(|| StoreError::NotFound(format!("kept copy {name} @ {kept_ms}")))?;
        let mut batch = sled::Batch::default();
        batch.remove(kept_key(name, kept_ms));
        self.commit(batch)?;
        tracing::info!(volume = name, kept_ms, "kept copy dropped");
        Ok(KeptCopy::of(&m, kept_ms))
    }
}
