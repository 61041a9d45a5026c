//! Volumes: a content-addressed chunk store, snapshots, verified replication.

pub mod chunk_store;
mod fsutil;
mod id;
pub mod manifest;
pub mod replicate;
pub mod volume;

pub use chunk_store::{ChunkStore, ChunkStoreError, ChunkStoreOptions, ChunkStoreStats, GcReport, ScrubReport};
pub use id::{hash_many, is_zero, ChunkId, ParseChunkIdError, MAX_HASH_THREADS};
pub use manifest::Manifest;
pub use volume::{
    parse_size, validate_name, CaptureMethod, NoPause, PauseHooks, SnapshotReport, VolumeInfo, VolumeStore,
    VolumeStoreOptions, CHUNK_SIZE, DEFAULT_KEEP,
};
