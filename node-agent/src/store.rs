//! Local state that must survive a crash, in sled behind a small trait.
//!
//! sled 0.34 is barely maintained and has open corruption reports, so:
//! every record carries a format version and a CRC32 of its payload and is
//! verified when read; everything stored is either rebuildable (revocations
//! are re-learned from the mesh; the incarnation falls back to the clock) or
//! checked; and writes that must survive return only after `flush` (fsync).
//!
//! Durability contract: `put_durable` returns after the record is on disk.
//! A crash at any moment leaves every acknowledged record readable and no
//! record torn: a record either verifies or is reported corrupt and skipped.

use std::path::Path;

use util::record::RecordError;

/// Record format version (first byte of every value).
pub const RECORD_VERSION: u8 = 1;

/// Most events kept in the local event log; older ones are trimmed.
/// Events are for operators' post-mortems; a few thousand cover a deployment.
pub const MAX_EVENTS: u64 = 10_000;

/// Named key spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    /// Small agent facts (incarnation).
    Meta,
    /// Fleet revocations, by PeerId.
    Revocations,
    /// Event log, by sequence number.
    Events,
    /// Replication bookkeeping, by volume name.
    Volumes,
    /// Drills: the faults in force here (`faults`) and the reports kept
    /// (`report/<id>`).
    Drills,
}

impl Tree {
    fn name(self) -> &'static str {
        match self {
            Tree::Meta => "meta",
            Tree::Revocations => "revocations",
            Tree::Events => "events",
            Tree::Volumes => "volumes",
            Tree::Drills => "drills",
        }
    }
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend failed (I/O, full disk, corruption it detected).
    #[error("store backend")]
    Backend(#[from] sled::Error),
    /// A record failed its checksum or version check.
    #[error("corrupt record in {tree}")]
    Corrupt {
        /// Tree name.
        tree: &'static str,
        /// What was wrong.
        #[source]
        reason: RecordError,
    },
}

impl StoreError {
    /// Whether the disk (or quota) is full: free space and retry.
    #[must_use]
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Backend(sled::Error::Io(e)) if util::fs::is_disk_full(e))
    }
}

/// Verified entries of a tree, in key order, and how many failed verification.
pub type Scan = (Vec<(Vec<u8>, Vec<u8>)>, usize);

/// The store as the agent sees it.
pub trait Store: Send + Sync + 'static {
    /// Read one value (already verified).
    ///
    /// # Errors
    /// [`StoreError`].
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Write one value and return only once it is on disk.
    ///
    /// # Errors
    /// [`StoreError`], e.g. a full disk: nothing acknowledged is lost.
    fn put_durable(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    /// Write one value; it reaches disk with the next durable write or flush.
    ///
    /// # Errors
    /// [`StoreError`].
    fn put(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    /// Remove a key (not flushed).
    ///
    /// # Errors
    /// [`StoreError`].
    fn remove(&self, tree: Tree, key: &[u8]) -> Result<(), StoreError>;
    /// All verified entries of a tree, in key order, plus the number of
    /// entries that failed verification (skipped).
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    fn scan(&self, tree: Tree) -> Result<Scan, StoreError>;
    /// The last key of a tree.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    fn last_key(&self, tree: Tree) -> Result<Option<Vec<u8>>, StoreError>;
    /// Flush everything written so far.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    fn flush(&self) -> Result<(), StoreError>;
}

/// Wrap a payload: `[version][crc32 LE][payload]` (`util::record`).
#[must_use]
pub fn seal(payload: &[u8]) -> Vec<u8> {
    util::record::seal(RECORD_VERSION, payload)
}

/// Check and unwrap a sealed record.
///
/// # Errors
/// [`RecordError`] if the version or checksum is wrong.
pub fn open(record: &[u8]) -> Result<&[u8], RecordError> {
    util::record::open(RECORD_VERSION, record)
}

/// The sled-backed store.
pub struct SledStore {
    db: sled::Db,
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e)
}

impl SledStore {
    /// Open (or create) the store in `dir`.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if sled cannot open it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir).open().map_err(backend)?;
        Ok(Self { db })
    }

    fn tree(&self, tree: Tree) -> Result<sled::Tree, StoreError> {
        self.db.open_tree(tree.name()).map_err(backend)
    }
}

impl Store for SledStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.tree(tree)?.get(key).map_err(backend)? {
            None => Ok(None),
            Some(v) => open(&v)
                .map(|p| Some(p.to_vec()))
                .map_err(|reason| StoreError::Corrupt {
                    tree: tree.name(),
                    reason,
                }),
        }
    }

    fn put_durable(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.put(tree, key, value)?;
        self.flush()
    }

    fn put(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.tree(tree)?.insert(key, seal(value)).map_err(backend)?;
        Ok(())
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> Result<(), StoreError> {
        self.tree(tree)?.remove(key).map_err(backend)?;
        Ok(())
    }

    fn scan(&self, tree: Tree) -> Result<Scan, StoreError> {
        let mut good = Vec::new();
        let mut bad = 0;
        for item in self.tree(tree)?.iter() {
            let (k, v) = item.map_err(backend)?;
            match open(&v) {
                Ok(p) => good.push((k.to_vec(), p.to_vec())),
                Err(reason) => {
                    tracing::error!(tree = tree.name(), %reason, "skipping corrupt record");
                    bad += 1;
                }
            }
        }
        Ok((good, bad))
    }

    fn last_key(&self, tree: Tree) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree(tree)?
            .last()
            .map_err(backend)?
            .map(|(k, _)| k.to_vec()))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(backend)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sled_round_trip_and_scan() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        s.put_durable(Tree::Meta, b"k", b"v").unwrap();
        s.put(Tree::Events, &1u64.to_be_bytes(), b"e1").unwrap();
        s.put(Tree::Events, &2u64.to_be_bytes(), b"e2").unwrap();
        s.flush().unwrap();
        drop(s);
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.get(Tree::Meta, b"k").unwrap().as_deref(), Some(&b"v"[..]));
        let (events, bad) = s.scan(Tree::Events).unwrap();
        assert_eq!(bad, 0);
        assert_eq!(events.len(), 2);
        assert_eq!(
            s.last_key(Tree::Events).unwrap().unwrap(),
            2u64.to_be_bytes().to_vec()
        );
    }

    proptest! {
        #[test]
        fn sealed_records_round_trip(p in proptest::collection::vec(any::<u8>(), 0..512)) {
            let sealed = seal(&p);
            prop_assert_eq!(open(&sealed).unwrap(), &p[..]);
        }

        #[test]
        fn any_corruption_is_detected(p in proptest::collection::vec(any::<u8>(), 1..256), pos in any::<usize>(), bit in 0u8..8) {
            let mut r = seal(&p);
            let pos = pos % r.len();
            r[pos] ^= 1 << bit;
            prop_assert!(open(&r).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(r in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = open(&r);
        }
    }
}
