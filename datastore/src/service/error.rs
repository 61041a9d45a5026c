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
    /// Recording a capture of the changes since a generation failed.
    #[error(transparent)]
    Changes(#[from] volume::incremental::ChangesOnlyError),
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
    /// The volume is not here, but a live rack holds a generation of it:
    /// creating it empty would lose that data (and the empty volume's
    /// generations would replace the replica). Nothing was created.
    #[error(
        "rack {rack} holds generation {generation} of volume {volume} and this rack holds none: \
         not creating it empty (the appliance moves to {rack} once it can take it; \
         to accept the loss, run `fieldrack volume create {volume} --size SIZE` on this rack)"
    )]
    HeldElsewhere {
        /// The volume.
        volume: String,
        /// A rack that holds it.
        rack: String,
        /// The newest generation that rack reported.
        generation: u64,
    },
}

impl VolumeError {
    /// Whether a push's stream was cut under it (see
    /// [`PushError::is_cut`]).
    #[must_use]
    pub fn is_cut(&self) -> bool {
        matches!(self, Self::Push { source, .. } if source.is_cut())
    }
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
