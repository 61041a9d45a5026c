//! Fetching chunks by id from a peer: how a scrub repairs a corrupt chunk.
//!
//! ```text
//! requester                 responder
//! Want{ids}*, End     ->
//!                     <-    (Chunk | Missing)* , End
//! ```

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::limiter::{Class, LinkLimiter};
use super::push::PushError;
use super::wire::{read_frame, write_frame, Kind, WireError, MAX_FRAME};
use super::{blocking, TransferCounters};
use crate::{ChunkId, VolumeStore};

/// Most ids one fetch may ask for: a scrub finds a handful of bad chunks;
/// the bound stops a lying peer from making us read the whole store.
pub const MAX_WANT: usize = 65_536;

/// What a fetch brought back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchReport {
    /// Chunks received, verified and stored.
    pub repaired: Vec<ChunkId>,
    /// Chunks the peer does not hold either.
    pub missing: Vec<ChunkId>,
}

/// Ask a peer for `ids`; store what verifies.
///
/// # Errors
/// [`PushError`]; chunks already stored stay stored.
pub async fn fetch<S>(
    store: Arc<VolumeStore>,
    ids: Vec<ChunkId>,
    mut stream: S,
    counters: &TransferCounters,
) -> Result<FetchReport, PushError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut pending: HashSet<ChunkId> = ids.iter().copied().collect();
    for batch in ids.chunks(MAX_FRAME / 32) {
        let payload: Vec<u8> = batch.iter().flat_map(|id| id.0).collect();
        write_frame(&mut stream, Kind::Want, &payload).await?;
    }
    write_frame(&mut stream, Kind::End, &[]).await?;
    stream.flush().await?;
    let mut report = FetchReport::default();
    loop {
        let f = read_frame(&mut stream)
            .await?
            .ok_or_else(|| WireError::Protocol("peer closed mid-fetch".into()))?;
        counters.bytes.fetch_add(f.wire_len() as u64, Relaxed);
        match f.kind {
            Kind::End => break,
            Kind::Missing if f.payload.len() == 32 => {
                let id = ChunkId(f.payload[..32].try_into().expect("32"));
                if pending.remove(&id) {
                    report.missing.push(id);
                }
            }
            Kind::Chunk if f.payload.len() >= 32 => {
                let id = ChunkId(f.payload[..32].try_into().expect("32"));
                if !pending.remove(&id) {
                    return Err(PushError::BadData(format!("unsolicited chunk {id}")));
                }
                let st = store.clone();
                let data = f.payload[32..].to_vec();
                blocking(move || st.chunks().insert_verified(&id, &data))
                    .await
                    .map_err(|e| PushError::BadData(format!("chunk {id}: {e}")))?;
                counters.chunks.fetch_add(1, Relaxed);
                report.repaired.push(id);
            }
            other => {
                return Err(
                    WireError::Protocol(format!("unexpected {other:?} in fetch reply")).into(),
                )
            }
        }
    }
    let st = store.clone();
    blocking(move || st.chunks().sync())
        .await
        .map_err(PushError::Chunks)?;
    report.missing.extend(pending);
    let _ = stream.close().await;
    Ok(report)
}

/// Answer one fetch.
///
/// # Errors
/// [`PushError`] if the stream fails or the request is malformed.
pub async fn serve<S>(
    store: Arc<VolumeStore>,
    mut stream: S,
    limiter: &LinkLimiter,
    counters: &TransferCounters,
) -> Result<usize, PushError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut ids = Vec::new();
    loop {
        let f = read_frame(&mut stream)
            .await?
            .ok_or_else(|| WireError::Protocol("peer closed mid-request".into()))?;
        match f.kind {
            Kind::End => break,
            Kind::Want if f.payload.len() % 32 == 0 => {
                ids.extend(
                    f.payload
                        .chunks(32)
                        .map(|c| ChunkId(c.try_into().expect("32"))),
                );
                if ids.len() > MAX_WANT {
                    return Err(
                        WireError::Protocol(format!("more than {MAX_WANT} ids wanted")).into(),
                    );
                }
            }
            other => {
                return Err(
                    WireError::Protocol(format!("unexpected {other:?} in fetch request")).into(),
                )
            }
        }
    }
    let mut served = 0;
    for id in ids {
        let st = store.clone();
        let data = blocking(move || st.chunks().read(&id)).await;
        match data {
            Ok(Some(bytes)) => {
                let mut payload = Vec::with_capacity(32 + bytes.len());
                payload.extend_from_slice(&id.0);
                payload.extend_from_slice(&bytes);
                limiter.acquire(Class::Bulk, payload.len() + 5).await;
                write_frame(&mut stream, Kind::Chunk, &payload).await?;
                counters.bytes.fetch_add(payload.len() as u64 + 5, Relaxed);
                served += 1;
            }
            // Not held, or corrupt here too: say so rather than send bad bytes.
            _ => write_frame(&mut stream, Kind::Missing, &id.0).await?,
        }
    }
    write_frame(&mut stream, Kind::End, &[]).await?;
    stream.flush().await?;
    let _ = stream.close().await;
    Ok(served)
}
