//! Volumes: a content-addressed chunk store, snapshots, verified replication.
//!
//! A volume is a raw block image with a name, a size and a generation
//! counter. Its owner rack keeps the live image; every rack that holds it
//! (owner and replicas) keeps *manifests*: for each generation, the ordered
//! ids of its [`CHUNK_SIZE`] chunks. Chunks are content-addressed (BLAKE3),
//! so identical chunks of different volumes and generations are stored
//! once, all-zero chunks are never stored (`None` in a manifest), and every
//! read verifies itself.
//!
//! Layers, bottom up: [`ChunkStore`] (packs + sled index), [`Manifest`] (a
//! versioned, checksummed encoding), [`VolumeStore`] (the registry of
//! volumes and manifests, snapshots, import/export), then `replicate`
//! (moving generations between racks), then `service` (the running volume
//! service: snapshot schedule, replica placement, transfers, scrubs, over
//! any [`service::Transport`]). The storage API is synchronous; async
//! callers use `spawn_blocking`.
//!
//! # On-disk layout (a [`VolumeStore`] root)
//! ```text
//! FORMAT                    "fieldrack-volume-store 1"
//! volumes/<name>.img        live raw images (owner only), sparse
//! tmp/                      clones and conversions in progress, <name>.base
//!                           (the clone the latest generation was read from); emptied on open
//! meta/                     sled: v/<name> volume records (checksummed JSON),
//!                           m/<name>/<gen BE> encoded manifests, s/<name> staged manifests
//! chunks/FORMAT             "fieldrack-chunk-store 1"
//! chunks/packs/NNNNNNNN.pack  append-only packs: 16-byte header, then records
//!                           (magic, length, chunk id, bytes); sealed at 64 MiB
//! chunks/index/             sled: chunk id -> (pack, offset, length);
//!                           per pack: (synced length, live chunks, live bytes)
//! ```
//!
//! # Durability contract (what is on disk when a call returns)
//! - [`ChunkStore::insert`] / [`ChunkStore::remove`]: visible at once,
//!   durable only after the next [`ChunkStore::sync`]. `sync` fsyncs the
//!   packs first and only then writes and flushes the index, so a crash
//!   never leaves an index entry pointing at bytes that were not on disk;
//!   unindexed bytes past a pack's synced length are truncated on open.
//! - Every chunk read re-hashes: the answer is the right bytes or
//!   [`ChunkStoreError::Corrupt`] (and the chunk is dropped from the index
//!   so that replication fetches it again), never wrong bytes.
//! - [`VolumeStore::create`], [`VolumeStore::snapshot`],
//!   [`VolumeStore::snapshot_changed`],
//!   [`VolumeStore::import`], [`VolumeStore::publish`],
//!   [`VolumeStore::stage`], [`VolumeStore::delete`] and
//!   [`VolumeStore::prune`] are durable when they return; a manifest is
//!   written (atomically with its volume record) only after every chunk it
//!   references is synced, so after any crash each volume is at a complete
//!   generation, never a torn one.
//! - [`VolumeStore::export`] and [`VolumeStore::promote`] write a temp
//!   file, fsync, rename and fsync the directory: the target is either the
//!   old file or the complete new image.
//! - gc/compaction copies live chunks and syncs before dropping the old
//!   packs' records and only then deletes their files.
//! - A full disk is an error (`is_disk_full()` on every error type), never
//!   a loss of anything already synced. A failed fsync poisons the chunk
//!   store until it is reopened.
//! - The sled index is a cache of what the packs say: if it is lost,
//!   [`ChunkStore::rebuild_index`] recovers every chunk that verifies.
//!
//! Crash consistency is tested by SIGKILLing a writer child process at
//! random moments (`tests/integration/durability.rs`); power loss (lost page cache) is
//! not simulated.

pub mod chunk_store;
mod fsutil;
mod id;
pub mod manifest;
pub mod replicate;
pub mod service;
pub mod volume;

#[cfg(test)]
mod fuzz_seeds;

pub use chunk_store::{
    ChunkStore, ChunkStoreError, ChunkStoreOptions, ChunkStoreStats, GcReport, LiveSet,
    RebuildReport, ScrubReport,
};
pub use id::{hash_many, is_zero, ChunkId, ParseChunkIdError, MAX_HASH_THREADS};
pub use manifest::Manifest;
pub use volume::{
    kept::KeptCopy, validate_name, CaptureMethod, DirtyTracking, ImportSource, NoPause, PauseHooks,
    SnapshotReport, SourceError, VolumeInfo, VolumeStore, VolumeStoreInfo, VolumeStoreOptions,
    CHUNK_SIZE, DEFAULT_KEEP,
};
