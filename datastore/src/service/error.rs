//! The service's errors: the store's own typed errors kept whole (source
//! chains included), so that the agent's API can answer a full disk with
//! 507, an unknown volume with 404 and a volume owned elsewhere with 409.

use std::path::PathBuf;

use super::records::RecordStoreError;
use super::transport::TransportError;
use crate::replicate::push::PushError;
use crate::volume;

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    /// Creating the volume failed.
    #[error(transparent)]
    Create(#[from] volume::CreateError),
    /// Snapshotting it failed.
    #[error(transparent)]
    Snapshot(#[from] volume::SnapshotError),
    /// Importing an image failed.
    #[error(transparent)]
    Import(#[from] volume::ImportError),
    /// Exporting a generation failed.
    #[error(transparent)]
    Export(#[from] volume::ExportError),
    /// Promoting a replica to the live image failed.
    #[error(transparent)]
    Promote(#[from] volume::PromoteError),
    /// A registry read or delete failed.
    #[error(transparent)]
    Store(#[from] volume::StoreError),
    /// No stream to the rack could be opened.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Pushing the generation failed.
    #[error("pushing to {rack}")]
    Push {
        /// The rack.
        rack: String,
        /// Why.
        #[source]
        source: PushError,
    },
    /// This rack is a witness: it stores no volumes.
    #[error("this rack is a witness: it stores no volumes")]
    Witness,
}

/// Why the service could not open.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenServiceError {
    /// The volume store could not be opened.
    #[error("opening the volume store")]
    Store(#[from] volume::OpenError),
    /// The replication bookkeeping could not be read.
    #[error("reading the replication bookkeeping")]
    Records(#[from] RecordStoreError),
    /// The import directory could not be created.
    #[error("creating the import directory {}", path.display())]
    ImportDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An error and its sources, `: `-separated, for logs: the top-level
/// message alone (`pushing to b`) would hide why.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}
