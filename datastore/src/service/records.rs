//! The replication bookkeeping of every volume (who owns a replica held
//! here; where the replicas of an owned volume are and what they hold),
//! kept in memory and written through to a [`RecordStore`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// What we know of one replica of a volume we own (persisted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// The replica rack.
    pub rack: String,
    /// The newest generation it confirmed holding.
    pub generation: Option<u64>,
    /// When that generation was snapshotted (unix ms): the replica's point in time.
    pub generation_created_ms: Option<u64>,
}

/// Per-volume replication bookkeeping (persisted).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// For volumes we hold as a replica: who owns them.
    pub owner: Option<String>,
    /// For volumes we own: their replicas.
    pub replicas: Vec<ReplicaRecord>,
}

/// Durable storage of [`VolumeRecord`]s, keyed by volume name. The agent
/// keeps them in its own checksummed store; losing one would only re-place
/// that volume's replicas, so a record that cannot be read is skipped.
pub trait RecordStore: Send + Sync + 'static {
    /// Every record stored.
    ///
    /// # Errors
    /// [`RecordStoreError`] if the store cannot be read at all.
    fn load(&self) -> Result<HashMap<String, VolumeRecord>, RecordStoreError>;

    /// Store `record` durably under `volume`.
    ///
    /// # Errors
    /// [`RecordStoreError`].
    fn save(&self, volume: &str, record: &VolumeRecord) -> Result<(), RecordStoreError>;
}

/// Why the bookkeeping could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordStoreError {
    /// The backing store failed.
    #[error("volume bookkeeping store")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// sled failed (the [`sled::Tree`] store).
    #[error("volume bookkeeping tree")]
    Sled(#[from] sled::Error),
}

/// A sled tree of JSON records, flushed on every save: a store of its own
/// for a service that does not share its owner's database.
impl RecordStore for sled::Tree {
    fn load(&self) -> Result<HashMap<String, VolumeRecord>, RecordStoreError> {
        let mut out = HashMap::new();
        for entry in self.iter() {
            let (k, v) = entry?;
            if let (Ok(name), Ok(rec)) = (String::from_utf8(k.to_vec()), serde_json::from_slice(&v))
            {
                out.insert(name, rec);
            }
        }
        Ok(out)
    }

    fn save(&self, volume: &str, record: &VolumeRecord) -> Result<(), RecordStoreError> {
        let bytes = serde_json::to_vec(record).expect("VolumeRecord serializes");
        self.insert(volume.as_bytes(), bytes)?;
        self.flush()?;
        Ok(())
    }
}

/// The records in memory, written through to the store on every change.
pub(crate) struct Records {
    map: Mutex<HashMap<String, VolumeRecord>>,
    store: Arc<dyn RecordStore>,
}

impl Records {
    /// Load every record from `store`.
    pub(crate) fn load(store: Arc<dyn RecordStore>) -> Result<Self, RecordStoreError> {
        Ok(Self {
            map: Mutex::new(store.load()?),
            store,
        })
    }

    /// The record of `volume` (empty if none).
    pub(crate) fn get(&self, volume: &str) -> VolumeRecord {
        self.lock().get(volume).cloned().unwrap_or_default()
    }

    /// Every record.
    pub(crate) fn all(&self) -> HashMap<String, VolumeRecord> {
        self.lock().clone()
    }

    /// Change the record of `volume` with `f`; persisted if it changed.
    pub(crate) fn update(&self, volume: &str, f: impl FnOnce(&mut VolumeRecord)) {
        let mut map = self.lock();
        let rec = map.entry(volume.to_owned()).or_default();
        let before = rec.clone();
        f(rec);
        if *rec == before {
            return;
        }
        let rec = rec.clone();
        drop(map);
        if let Err(e) = self.store.save(volume, &rec) {
            tracing::error!(%volume, error = %e, "could not persist replication state");
        }
    }

    /// Forget `volume` in memory (another rack owns it now; a record left
    /// on disk names replicas of a volume no longer held, which is inert).
    pub(crate) fn forget(&self, volume: &str) {
        self.lock().remove(volume);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VolumeRecord>> {
        self.map.lock().expect("records lock")
    }
}
