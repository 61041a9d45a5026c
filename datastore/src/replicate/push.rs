//! The push protocol: owner → replica.
//!
//! ```text
//! owner                                   replica
//! Hello{volume, generation, manifest_len} ->
//! ManifestPart*                            ->
//!                                          <- NeedPart* (bitmap), NeedEnd{have_generation}
//! (Chunk | Delta)* for every marked index  ->   verify each, insert, sync every 64 MiB
//! Done                                     ->
//!                                          <- Committed{generation}   (published)
//! ```
//! Either side may send `Abort{reason}` at any point. A replica never
//! publishes a generation it does not hold completely; until then it keeps
//! serving the previous one.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::limiter::{Class, LinkLimiter};
use super::wire::{
    self, expect_frame, read_frame, write_frame, Committed, Frame, Hello, Kind, NeedEnd, WireError,
    MAX_FRAME, PROTO,
};
use super::{blocking, delta, TransferCounters, PIPELINE_FRAMES, SYNC_EVERY, SYNC_EVERY_BYTES};
use crate::{ChunkId, Manifest, VolumeStore};

/// Largest manifest accepted: 256 MiB describes about 8 M chunks (512 GiB at 64 KiB).
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The stream or the peer failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The local store failed.
    #[error("store: {0}")]
    Store(String),
    /// The peer sent data that failed verification; nothing of it was kept.
    #[error("peer sent bad data: {0}")]
    BadData(String),
}

/// What a push achieved (sender side) or received (receiver side).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushReport {
    /// The volume.
    pub volume: String,
    /// The generation now on the replica.
    pub generation: u64,
    /// Chunks sent whole.
    pub chunks: u64,
    /// Chunks sent as deltas.
    pub deltas: u64,
    /// Chunk references the replica already had.
    pub deduplicated: u64,
    /// Bytes on the wire in the data direction.
    pub bytes: u64,
}

impl From<std::io::Error> for PushError {
    fn from(e: std::io::Error) -> Self {
        PushError::Wire(WireError::Io(e))
    }
}

fn store_err(e: impl std::fmt::Display) -> PushError {
    PushError::Store(e.to_string())
}

/// Offer `manifest` (a generation this rack owns) to a replica over `stream`.
///
/// # Errors
/// [`PushError`]; the replica then still serves its previous generation.
pub async fn push<S>(
    store: Arc<VolumeStore>,
    owner: &str,
    manifest: Manifest,
    stream: S,
    limiter: &LinkLimiter,
    counters: &TransferCounters,
) -> Result<PushReport, PushError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let progress = TransferProgress::default();
    push_with_progress(store, owner, manifest, stream, limiter, counters, &progress).await
}

/// How far one transfer has got, for status displays.
#[derive(Debug, Default)]
pub struct TransferProgress {
    /// Chunks the replica lacks (known once it answered the offer).
    pub total_chunks: std::sync::atomic::AtomicU64,
    /// Chunks sent so far.
    pub sent_chunks: std::sync::atomic::AtomicU64,
}

impl TransferProgress {
    /// `(sent, total)` chunks.
    pub fn get(&self) -> (u64, u64) {
        (
            self.sent_chunks.load(Relaxed),
            self.total_chunks.load(Relaxed),
        )
    }
}

/// [`push`], reporting progress into `progress`.
///
/// # Errors
/// [`PushError`]; the replica then still serves its previous generation.
pub async fn push_with_progress<S>(
    store: Arc<VolumeStore>,
    owner: &str,
    manifest: Manifest,
    mut stream: S,
    limiter: &LinkLimiter,
    counters: &TransferCounters,
    progress: &TransferProgress,
) -> Result<PushReport, PushError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let encoded = manifest.encode();
    let hello = Hello {
        proto: PROTO,
        owner: owner.to_string(),
        volume: manifest.volume.clone(),
        generation: manifest.generation,
        manifest_len: encoded.len() as u64,
    };
    let f = Frame::json(Kind::Hello, &hello);
    write_frame(&mut stream, f.kind, &f.payload).await?;
    for part in encoded.chunks(MAX_FRAME) {
        limiter.acquire(Class::Replication, part.len()).await;
        write_frame(&mut stream, Kind::ManifestPart, part).await?;
    }
    stream.flush().await?;

    // The replica's answer: which indices it lacks.
    let n = manifest.chunks.len();
    let mut bitmap = Vec::with_capacity(n.div_ceil(8));
    let need_end: NeedEnd = loop {
        match read_frame(&mut stream).await? {
            Some(f) if f.kind == Kind::NeedPart => {
                if bitmap.len() + f.payload.len() > n.div_ceil(8) {
                    return Err(
                        WireError::Protocol("need bitmap longer than the manifest".into()).into(),
                    );
                }
                bitmap.extend_from_slice(&f.payload);
            }
            Some(f) if f.kind == Kind::NeedEnd => break f.parse()?,
            Some(f) if f.kind == Kind::Committed => {
                // Already held: nothing to send.
                let c: Committed = f.parse()?;
                return Ok(PushReport {
                    volume: manifest.volume,
                    generation: c.generation,
                    ..Default::default()
                });
            }
            Some(f) => {
                return Err(WireError::Protocol(format!(
                    "unexpected {:?} while reading needs",
                    f.kind
                ))
                .into())
            }
            None => {
                return Err(WireError::Protocol("replica closed before answering".into()).into())
            }
        }
    };
    if bitmap.len() != n.div_ceil(8) {
        return Err(WireError::Protocol(format!(
            "need bitmap has {} bytes, expected {}",
            bitmap.len(),
            n.div_ceil(8)
        ))
        .into());
    }
    let missing: Vec<usize> = (0..n)
        .filter(|i| bitmap[i / 8] & (1 << (i % 8)) != 0 && manifest.chunks[*i].is_some())
        .collect();
    let referenced = manifest.chunks.iter().filter(|c| c.is_some()).count() as u64;
    counters
        .deduplicated
        .fetch_add(referenced.saturating_sub(missing.len() as u64), Relaxed);

    progress.total_chunks.store(missing.len() as u64, Relaxed);

    // The base for deltas: the generation the replica says it holds, if we
    // still have it.
    let base = match need_end.have_generation {
        Some(g) if g < manifest.generation => {
            let (st, vol) = (store.clone(), manifest.volume.clone());
            blocking(move || st.manifest(&vol, g))
                .await
                .map_err(store_err)?
        }
        _ => None,
    };

    // Disk side: read chunks, build frames; network side: send them.
    let (tx, mut rx) = mpsc::channel::<Result<Frame, PushError>>(PIPELINE_FRAMES);
    let producer = {
        let store = store.clone();
        let manifest_chunks = manifest.chunks.clone();
        tokio::task::spawn_blocking(move || {
            for i in missing {
                let id = manifest_chunks[i].expect("filtered to present chunks");
                // The base is what the replica holds at this index: a chunk,
                // zeros (None in its manifest), or unknown.
                let base_at = base.as_ref().and_then(|b| b.chunks.get(i).copied());
                let frame = build_frame(&store, &id, base_at);
                let stop = frame.is_err();
                if tx.blocking_send(frame).is_err() || stop {
                    return;
                }
            }
        })
    };
    let mut report = PushReport {
        volume: manifest.volume.clone(),
        ..Default::default()
    };
    while let Some(frame) = rx.recv().await {
        let frame = frame?;
        limiter.acquire(Class::Replication, frame.wire_len()).await;
        write_frame(&mut stream, frame.kind, &frame.payload).await?;
        report.bytes += frame.wire_len() as u64;
        progress.sent_chunks.fetch_add(1, Relaxed);
        counters.bytes.fetch_add(frame.wire_len() as u64, Relaxed);
        if frame.kind == Kind::Delta {
            report.deltas += 1;
            counters.deltas.fetch_add(1, Relaxed);
        } else {
            report.chunks += 1;
            counters.chunks.fetch_add(1, Relaxed);
        }
    }
    producer
        .await
        .map_err(|e| PushError::Store(format!("reader task: {e}")))?;
    write_frame(&mut stream, Kind::Done, &[]).await?;
    stream.flush().await?;
    let c: Committed = expect_frame(&mut stream, Kind::Committed).await?.parse()?;
    if c.generation != manifest.generation {
        return Err(WireError::Protocol(format!(
            "replica committed generation {}, offered {}",
            c.generation, manifest.generation
        ))
        .into());
    }
    report.generation = c.generation;
    let _ = stream.close().await;
    Ok(report)
}

/// `base`: `Some(Some(id))` the replica holds that chunk at this index,
/// `Some(None)` it holds zeros there, `None` unknown.
fn build_frame(
    store: &VolumeStore,
    id: &ChunkId,
    base: Option<Option<ChunkId>>,
) -> Result<Frame, PushError> {
    let data = store.chunks().read(id).map_err(store_err)?.ok_or_else(|| {
        PushError::Store(format!(
            "chunk {id} of our own manifest is missing (scrub will repair it)"
        ))
    })?;
    if let Some(Some(base_id)) = base.filter(|b| *b != Some(*id)) {
        if let Ok(Some(base)) = store.chunks().read(&base_id) {
            if let Some(payload) = delta::encode(&id.0, &base_id.0, &base, &data) {
                return Ok(Frame {
                    kind: Kind::Delta,
                    payload,
                });
            }
        }
    }
    // Zeros are held by every rack: a mostly-zero chunk (a few writes into
    // an unused region) travels as its non-zero blocks.
    if let Some(payload) = delta::encode(&id.0, &delta::ZERO_BASE, &vec![0u8; data.len()], &data) {
        return Ok(Frame {
            kind: Kind::Delta,
            payload,
        });
    }
    let mut payload = Vec::with_capacity(32 + data.len());
    payload.extend_from_slice(&id.0);
    payload.extend_from_slice(&data);
    Ok(Frame {
        kind: Kind::Chunk,
        payload,
    })
}

/// Serve one push on the replica side. `from` names the sending rack (from
/// its verified certificate). Refuses pushes for volumes this rack owns.
///
/// # Errors
/// [`PushError`]; on bad data the offending chunk is not stored, and the
/// previous generation stays published.
pub async fn serve<S>(
    store: Arc<VolumeStore>,
    from: &str,
    mut stream: S,
    counters: &TransferCounters,
) -> Result<PushReport, PushError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let hello: Hello = expect_frame(&mut stream, Kind::Hello).await?.parse()?;
    if hello.proto != PROTO {
        wire::abort(
            &mut stream,
            &format!("unsupported protocol version {}", hello.proto),
        )
        .await;
        return Err(WireError::Protocol(format!("version {}", hello.proto)).into());
    }
    if hello.owner != from {
        wire::abort(&mut stream, "owner does not match the sending rack").await;
        return Err(PushError::BadData(format!(
            "{from} claims to push for owner {}",
            hello.owner
        )));
    }
    if hello.manifest_len > MAX_MANIFEST_BYTES {
        wire::abort(&mut stream, "manifest too large").await;
        return Err(
            WireError::Protocol(format!("manifest of {} bytes", hello.manifest_len)).into(),
        );
    }
    let mut encoded = Vec::with_capacity(hello.manifest_len.min(MAX_FRAME as u64 * 4) as usize);
    while (encoded.len() as u64) < hello.manifest_len {
        let f = expect_frame(&mut stream, Kind::ManifestPart).await?;
        encoded.extend_from_slice(&f.payload);
        if encoded.len() as u64 > hello.manifest_len {
            return Err(WireError::Protocol("manifest longer than announced".into()).into());
        }
    }
    let manifest = match Manifest::decode(&encoded) {
        Ok(m) if m.volume == hello.volume && m.generation == hello.generation => m,
        Ok(_) => {
            wire::abort(&mut stream, "manifest does not match the offer").await;
            return Err(PushError::BadData(
                "manifest does not match the offer".into(),
            ));
        }
        Err(e) => {
            wire::abort(&mut stream, &format!("bad manifest: {e}")).await;
            return Err(PushError::BadData(format!("bad manifest: {e}")));
        }
    };
    let volume = manifest.volume.clone();
    let (st, vol) = (store.clone(), volume.clone());
    let (owned, held) = blocking(move || -> Result<(bool, Option<u64>), PushError> {
        let owned = st.owns(&vol).map_err(store_err)?;
        let held = st.latest(&vol).map_err(store_err)?.map(|m| m.generation);
        Ok((owned, held))
    })
    .await?;
    if owned {
        wire::abort(&mut stream, "this rack owns the volume").await;
        return Err(PushError::BadData(format!(
            "{from} pushed {volume}, which this rack owns"
        )));
    }
    if let Some(h) = held {
        if h >= manifest.generation {
            if h == manifest.generation {
                let f = Frame::json(Kind::Committed, &Committed { generation: h });
                write_frame(&mut stream, f.kind, &f.payload).await?;
                stream.flush().await?;
                return Ok(PushReport {
                    volume,
                    generation: h,
                    ..Default::default()
                });
            }
            wire::abort(&mut stream, &format!("replica holds newer generation {h}")).await;
            return Err(WireError::Protocol(format!(
                "offered {} but hold {h}",
                manifest.generation
            ))
            .into());
        }
    }

    // Stage the offer first: its chunks are then safe from garbage
    // collection until it is published (or superseded), also across a
    // crash, so an interrupted transfer resumes with what already arrived.
    let (st, staged) = (store.clone(), manifest.clone());
    blocking(move || st.stage(&staged))
        .await
        .map_err(store_err)?;

    // What do we lack? One bit per index; each missing id asked for once.
    let chunks = manifest.chunks.clone();
    let st = store.clone();
    let (bitmap, wanted) = blocking(move || -> Result<(Vec<u8>, HashSet<ChunkId>), PushError> {
        let mut bitmap = vec![0u8; chunks.len().div_ceil(8)];
        let mut wanted = HashSet::new();
        for (i, c) in chunks.iter().enumerate() {
            if let Some(id) = c {
                if !wanted.contains(id) && !st.chunks().contains(id).map_err(store_err)? {
                    wanted.insert(*id);
                    bitmap[i / 8] |= 1 << (i % 8);
                }
            }
        }
        Ok((bitmap, wanted))
    })
    .await?;
    let referenced = manifest.chunks.iter().filter(|c| c.is_some()).count() as u64;
    counters
        .deduplicated
        .fetch_add(referenced.saturating_sub(wanted.len() as u64), Relaxed);
    for part in bitmap.chunks(MAX_FRAME) {
        write_frame(&mut stream, Kind::NeedPart, part).await?;
    }
    let end = Frame::json(
        Kind::NeedEnd,
        &NeedEnd {
            have_generation: held,
            missing: wanted.len() as u64,
        },
    );
    write_frame(&mut stream, end.kind, &end.payload).await?;
    stream.flush().await?;

    // Receive, verify and store, off the runtime, pipelined.
    let (tx, mut rx) = mpsc::channel::<Frame>(PIPELINE_FRAMES);
    let st = store.clone();
    let writer = tokio::task::spawn_blocking(move || -> Result<(u64, u64), PushError> {
        let mut wanted = wanted;
        let (mut chunks, mut deltas, mut since_sync) = (0u64, 0u64, 0u64);
        let mut last_sync = std::time::Instant::now();
        while let Some(f) = rx.blocking_recv() {
            since_sync += f.payload.len() as u64;
            let (id, data) = match f.kind {
                Kind::Chunk => {
                    if f.payload.len() < 32 {
                        return Err(PushError::BadData("chunk frame too short".into()));
                    }
                    chunks += 1;
                    (
                        ChunkId(f.payload[..32].try_into().expect("32")),
                        f.payload[32..].to_vec(),
                    )
                }
                Kind::Delta => {
                    let h = delta::header(&f.payload).map_err(PushError::BadData)?;
                    let base = if h.base_id == delta::ZERO_BASE {
                        if h.len > crate::CHUNK_SIZE as usize {
                            return Err(PushError::BadData(format!(
                                "delta for a {}-byte chunk",
                                h.len
                            )));
                        }
                        vec![0u8; h.len]
                    } else {
                        st.chunks()
                            .read(&ChunkId(h.base_id))
                            .map_err(store_err)?
                            .ok_or_else(|| {
                                PushError::BadData("delta against a chunk we do not hold".into())
                            })?
                    };
                    deltas += 1;
                    (
                        ChunkId(h.new_id),
                        delta::apply(&base, &f.payload).map_err(PushError::BadData)?,
                    )
                }
                other => {
                    return Err(WireError::Protocol(format!("unexpected {other:?} in data")).into())
                }
            };
            if !wanted.remove(&id) {
                return Err(PushError::BadData(format!("unsolicited chunk {id}")));
            }
            st.chunks()
                .insert_verified(&id, &data)
                .map_err(|e| PushError::BadData(format!("chunk {id}: {e}")))?;
            if since_sync >= SYNC_EVERY_BYTES || last_sync.elapsed() >= SYNC_EVERY {
                st.chunks().sync().map_err(store_err)?;
                since_sync = 0;
                last_sync = std::time::Instant::now();
            }
        }
        st.chunks().sync().map_err(store_err)?;
        Ok((chunks, deltas))
    });
    let mut bytes = 0u64;
    let received: Result<(), PushError> = async {
        loop {
            let f = read_frame(&mut stream)
                .await?
                .ok_or_else(|| WireError::Protocol("sender vanished mid-transfer".into()))?;
            match f.kind {
                Kind::Done => return Ok(()),
                Kind::Chunk | Kind::Delta => {
                    bytes += f.wire_len() as u64;
                    counters.bytes.fetch_add(f.wire_len() as u64, Relaxed);
                    if tx.send(f).await.is_err() {
                        return Ok(()); // the writer stopped: its error explains why
                    }
                }
                other => {
                    return Err(WireError::Protocol(format!("unexpected {other:?} in data")).into())
                }
            }
        }
    }
    .await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| PushError::Store(format!("writer task: {e}")))?;
    let (chunks, deltas) = match (received, written) {
        (_, Err(e)) | (Err(e), _) => {
            if matches!(e, PushError::BadData(_) | PushError::Store(_)) {
                wire::abort(&mut stream, &e.to_string()).await;
            }
            return Err(e);
        }
        (Ok(()), Ok(counts)) => counts,
    };
    counters.chunks.fetch_add(chunks, Relaxed);
    counters.deltas.fetch_add(deltas, Relaxed);
    let generation = manifest.generation;
    let st = store.clone();
    if let Err(e) = blocking(move || st.publish(manifest)).await {
        let reason = format!("cannot publish generation {generation}: {e}");
        wire::abort(&mut stream, &reason).await;
        return Err(PushError::Store(reason));
    }
    let f = Frame::json(Kind::Committed, &Committed { generation });
    write_frame(&mut stream, f.kind, &f.payload).await?;
    stream.flush().await?;
    Ok(PushReport {
        volume,
        generation,
        chunks,
        deltas,
        deduplicated: referenced - chunks - deltas,
        bytes,
    })
}
