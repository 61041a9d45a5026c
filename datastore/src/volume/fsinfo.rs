//! What the volume store's filesystem offers snapshots, for the status
//! document and the readiness check: good recovery points at any disk size
//! need reflink (XFS, btrfs), where a snapshot reads only what changed.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// How a snapshot of a process appliance's live image finds what changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DirtyTracking {
    /// Reflink clones compared by their extent maps (FIEMAP): a snapshot
    /// reads the 64 KiB chunks whose blocks moved, whatever the disk size.
    Extents,
    /// No reflink (ext4 and others): a snapshot of a written image reads
    /// and hashes all of its allocated bytes.
    FullRead,
}

/// `status.volume_store`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStoreInfo {
    /// The filesystem holding the store (`xfs`, `btrfs`, `ext4`, `tmpfs`,
    /// ..., or `unknown (0x…)`).
    pub filesystem: String,
    /// Whether reflink clones work there.
    pub reflink: bool,
    /// What that gives snapshots.
    pub dirty_tracking: DirtyTracking,
}

/// The name of the filesystem holding `path`, from its `statfs` magic.
#[must_use]
pub fn filesystem_name(path: &Path) -> String {
    let Ok(s) = rustix::fs::statfs(path) else {
        return "unknown".to_owned();
    };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let magic = s.f_type as u64;
    match magic {
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0xef53 => "ext4",
        0x0102_1994 => "tmpfs",
        0x794c_7630 => "overlayfs",
        0x2fc1_2fc1 => "zfs",
        0x6969 => "nfs",
        0xf2f5_2010 => "f2fs",
        _ => return format!("unknown ({magic:#x})"),
    }
    .to_owned()
}
