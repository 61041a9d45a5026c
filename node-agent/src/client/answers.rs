//! The small acknowledgements the API builds inline (its bigger answers
//! are the library's own types: `Status`, `ApplianceStatus`,
//! `VolumeStatus`, `Event`, `Revocation`), and the progress of long jobs.

use std::path::PathBuf;

use serde::Deserialize;

/// `POST /api/v1/revocations`: whether the revocation was new here.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RevocationAdded {
    /// False if the agent already had it.
    pub new: bool,
}

/// `POST /api/v1/volumes` (201).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VolumeCreated {
    /// The volume.
    pub name: String,
    /// Its size as parsed by the agent.
    pub size_bytes: u64,
}

/// A volume generation made by a snapshot or an import.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VolumeGeneration {
    /// The volume.
    pub volume: String,
    /// The new generation.
    pub generation: u64,
}

/// A finished volume export.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VolumeExported {
    /// The file written (on the rack).
    pub to: PathBuf,
}

/// `POST /api/v1/volumes/scrub`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ScrubReport {
    /// Chunks found corrupt.
    pub corrupt: u64,
    /// Of those, repaired from a replica.
    pub repaired: u64,
}

/// `POST /api/v1/apps`: the appliances deployed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Deployed {
    /// Their names.
    pub deployed: Vec<String>,
}

/// `POST /api/v1/apps/{name}/stop|start`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RunningSet {
    /// The appliance.
    pub appliance: String,
    /// Whether it is now meant to run.
    pub running: bool,
}

/// `POST /api/v1/apps/{name}/move`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MoveAccepted {
    /// The appliance.
    pub appliance: String,
    /// The target rack.
    pub to: String,
}

/// `POST /api/v1/cache/offline`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OfflineSet {
    /// Forced offline now.
    pub offline: bool,
}

/// The final counts of `POST /api/v1/tiles/seed`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct SeedReport {
    /// Tiles in the plan.
    pub total: u64,
    /// Fetched now.
    pub fetched: u64,
    /// Already stored.
    pub skipped: u64,
    /// Failed (a later run retries them).
    pub failed: u64,
}

/// A line of a long operation's NDJSON answer, before its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEvent {
    /// What the operation will do (tile seeding: how many tiles).
    Estimate {
        /// Tiles in the plan.
        tiles: u64,
    },
    /// How far it got: `done` of `total` (bytes or tiles).
    Progress {
        /// Done so far.
        done: u64,
        /// Of this many.
        total: u64,
    },
}
