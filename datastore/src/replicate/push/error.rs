//! Why a push (or a fetch) failed: the wire's errors, bad data from the
//! peer, and the local store's own typed errors kept whole.

use crate::chunk_store::ChunkStoreError;
use crate::replicate::wire::WireError;
use crate::volume::PublishError;
use crate::ChunkId;

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The stream or the peer failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The local volume registry failed.
    #[error(transparent)]
    Volumes(#[from] crate::volume::StoreError),
    /// The local chunk store failed.
    #[error(transparent)]
    Chunks(#[from] ChunkStoreError),
    /// The replica could not stage the offered manifest (which keeps the
    /// chunks that arrive safe from garbage collection).
    #[error("cannot stage the offered generation: {0}")]
    Stage(PublishError),
    /// The replica received every chunk but could not publish the generation.
    #[error("cannot publish generation {generation}: {error}")]
    Publish {
        /// The generation offered.
        generation: u64,
        /// Why.
        error: PublishError,
    },
    /// A chunk our own manifest references is not in our store (dropped as
    /// corrupt earlier); a scrub fetches it back from a peer.
    #[error("chunk {0} of our own manifest is missing (scrub will repair it)")]
    MissingChunk(ChunkId),
    /// The replica's background sync thread could not be started.
    #[error("starting the sync thread")]
    SyncThread(#[source] std::io::Error),
    /// The replica's background sync thread stopped: an earlier sync failed
    /// (that failure is the error reported when the transfer ends).
    #[error("the sync thread stopped (an earlier sync failed)")]
    SyncStopped,
    /// The replica's background sync thread panicked.
    #[error("the sync thread panicked")]
    SyncPanicked,
    /// A disk-side task of the transfer panicked or was cancelled.
    #[error("the {task} task failed")]
    Task {
        /// Which task (`reader`, `writer`).
        task: &'static str,
        /// Why.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The peer sent data that failed verification; nothing of it was kept.
    #[error("peer sent bad data: {0}")]
    BadData(String),
    /// The replica rejected a chunk we sent and our own copy turned out to
    /// be corrupt on disk: it has been dropped from our store (a scrub
    /// fetches it again from a peer), so it is never sent again.
    #[error(
        "our copy of chunk {0} is corrupt (the replica caught it); dropped, scrub will repair it"
    )]
    CorruptLocal(ChunkId),
    /// The replica predates protocol version 2 (manifest deltas) and
    /// refused the offer: push again on a new stream with
    /// [`crate::replicate::push::push_v1_with_progress`].
    #[error("the replica speaks only push protocol version 1")]
    OldReplica,
    /// The owner's manifest delta did not rebuild the manifest it
    /// announced (damaged, a lying peer, or a base that differs): nothing
    /// was staged.
    #[error("bad manifest delta: {0}")]
    ManifestDelta(#[source] crate::manifest::delta::DeltaError),
}

impl From<std::io::Error> for PushError {
    fn from(e: std::io::Error) -> Self {
        PushError::Wire(WireError::Io(e))
    }
}

impl PushError {
    /// Whether the stream itself failed (the connection was lost or
    /// replaced), as opposed to either side refusing or failing locally:
    /// the replica kept the whole frames that arrived, so a new push
    /// resumes where this one stopped.
    #[must_use]
    pub fn is_cut(&self) -> bool {
        matches!(self, Self::Wire(WireError::Io(_)))
    }

    /// Whether the local disk (or quota) is full: free space and retry.
    #[must_use]
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::Volumes(e) => e.is_disk_full(),
            Self::Chunks(e) => e.is_disk_full(),
            Self::Stage(e) | Self::Publish { error: e, .. } => e.is_disk_full(),
            Self::SyncThread(e) => crate::fsutil::is_disk_full(e),
            _ => false,
        }
    }

    /// Whether this side failed (bad data from the peer, or our own
    /// store): the peer is then told why with an abort. A wire failure is
    /// the peer's or the link's and needs no explanation.
    pub(super) fn is_local(&self) -> bool {
        !matches!(
            self,
            Self::Wire(_) | Self::CorruptLocal(_) | Self::OldReplica
        )
    }

    /// Whether our own store or its sync thread failed.
    pub(super) fn is_store(&self) -> bool {
        self.is_local() && !matches!(self, Self::BadData(_) | Self::ManifestDelta(_))
    }
}
