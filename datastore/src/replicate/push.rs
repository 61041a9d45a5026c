//! The push protocol: owner → replica.
//!
//! ```text
//! owner                                   replica
//! Hello{proto 2, volume, generation, manifest_len} ->
//!                                          <- Holding{generations}  (or Committed: held already)
//! DeltaHead{base, delta_len, manifest_id}, ManifestDeltaPart*   (or ManifestPart*: whole)
//!                                          <- [Holding{} : base gone, send it whole: ManifestPart*]
//!                                          <- NeedPart* (bitmap), NeedEnd{have_generation}
//! (Chunk | Delta)* for every marked index  ->   verify each, insert, sync every 32 MiB / 0.5 s
//! Done                                     ->
//!                                          <- Committed{generation}   (published)
//! ```
//! The manifest goes as a delta ([`crate::manifest::delta`]) of the
//! generation the replica holds that differs least from it, when that is
//! smaller than the whole manifest; the replica rebuilds it and checks it
//! against `manifest_id` (the whole manifest's BLAKE3) before staging it.
//!
//! Version 1 (still served; spoken to a replica that refuses version 2 by
//! aborting with "unsupported protocol version", on a new stream:
//! [`push_v1_with_progress`]) has no `Holding` round: `ManifestPart*`
//! follow the `Hello` at once.
//!
//! Either side may send `Abort{reason}` at any point; a replica that
//! rejects a chunk names it (`bad_chunk`), and the owner, which reads chunks
//! for a push without re-hashing them, then verifies its own copy (dropping
//! it if it is corrupt, so rotten bytes are never offered again). A
//! replica never publishes a generation it does not hold completely; until
//! then it keeps serving the previous one. Its syncs run on a thread of
//! their own, so the stream keeps flowing during an fsync.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::limiter::{Class, LinkLimiter};
use super::recv::{BufferPool, DataBatch, DataReader, Received};
use super::wire::{
    self, append_frame, begin_frame, end_frame, expect_frame, read_frame, write_frame, Committed,
    DeltaHead, Frame, Hello, Holding, Kind, NeedEnd, WireError, HEADER_LEN, MAX_FRAME, MAX_HOLDING,
    PROTO, PROTO_V1,
};
use super::{
    blocking, delta, TransferCounters, BATCH_BYTES, PIPELINE_BATCHES, SYNC_EVERY, SYNC_EVERY_BYTES,
};
use crate::chunk_store::ChunkStoreError;
use crate::manifest::delta as manifest_delta;
use crate::{ChunkId, Manifest, VolumeStore};

/// After a write to the replica failed, how long to wait for the abort it
/// may have sent before it stopped reading (which chunk it rejected).
const ABORT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

mod error;

pub use error::PushError;

/// Largest manifest accepted: 256 MiB describes about 8 M chunks (512 GiB at 64 KiB).
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;

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
    send_hello(&mut stream, PROTO, owner, &manifest, encoded.len()).await?;
    stream.flush().await?;

    // The replica answers with the generations it holds (or that it holds
    // this one already); the manifest goes as a delta of the best of them.
    let holding: Holding = match read_frame(&mut stream).await {
        Ok(Some(f)) if f.kind == Kind::Holding => f.parse()?,
        Ok(Some(f)) if f.kind == Kind::Committed => {
            let c: Committed = f.parse()?;
            return Ok(PushReport {
                volume: manifest.volume,
                generation: c.generation,
                ..Default::default()
            });
        }
        Ok(Some(f)) => {
            return Err(
                WireError::Protocol(format!("unexpected {:?} after the offer", f.kind)).into(),
            )
        }
        Ok(None) => {
            return Err(WireError::Protocol("replica closed before answering".into()).into())
        }
        Err(WireError::Aborted(reason)) if reason.starts_with(UNSUPPORTED_VERSION) => {
            return Err(PushError::OldReplica)
        }
        Err(e) => return Err(e.into()),
    };
    if holding.generations.len() > MAX_HOLDING {
        return Err(WireError::Protocol(format!(
            "replica lists {} generations, at most {MAX_HOLDING}",
            holding.generations.len()
        ))
        .into());
    }
    let delta = {
        let (st, m) = (store.clone(), manifest.clone());
        let full = encoded.len();
        blocking(move || best_delta(&st, &m, &holding.generations, full)).await?
    };
    let sent_delta = match delta {
        Some((base, bytes)) => {
            let head = DeltaHead {
                base,
                delta_len: bytes.len() as u64,
                manifest_id: ChunkId::of(&encoded),
            };
            let f = Frame::json(Kind::DeltaHead, &head);
            write_frame(&mut stream, f.kind, &f.payload).await?;
            counters
                .manifest_bytes
                .fetch_add(f.wire_len() as u64, Relaxed);
            send_parts(
                &mut stream,
                Kind::ManifestDeltaPart,
                &bytes,
                limiter,
                counters,
            )
            .await?;
            true
        }
        None => {
            send_parts(&mut stream, Kind::ManifestPart, &encoded, limiter, counters).await?;
            false
        }
    };
    stream.flush().await?;
    push_data(
        store, manifest, stream, limiter, counters, progress, &encoded, sent_delta,
    )
    .await
}

/// [`push_with_progress`] in protocol version 1 (the whole manifest, no
/// [`Holding`] round), for a replica that refused version 2
/// ([`PushError::OldReplica`]): retry on a new stream with this.
///
/// # Errors
/// [`PushError`]; the replica then still serves its previous generation.
pub async fn push_v1_with_progress<S>(
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
    send_hello(&mut stream, PROTO_V1, owner, &manifest, encoded.len()).await?;
    send_parts(&mut stream, Kind::ManifestPart, &encoded, limiter, counters).await?;
    stream.flush().await?;
    push_data(
        store, manifest, stream, limiter, counters, progress, &encoded, false,
    )
    .await
}

/// Open a transfer: the [`Hello`] offer of `manifest` in protocol `proto`,
/// the same for both protocol versions (only `proto` differs).
async fn send_hello<S: AsyncWrite + Unpin>(
    stream: &mut S,
    proto: u32,
    owner: &str,
    manifest: &Manifest,
    manifest_len: usize,
) -> Result<(), WireError> {
    let hello = Hello {
        proto,
        owner: owner.to_string(),
        volume: manifest.volume.clone(),
        generation: manifest.generation,
        manifest_len: manifest_len as u64,
    };
    let f = Frame::json(Kind::Hello, &hello);
    write_frame(stream, f.kind, &f.payload).await
}

/// Send `bytes` as frames of `kind` of at most [`MAX_FRAME`] each,
/// rate-limited, counted.
async fn send_parts<S: AsyncWrite + Unpin>(
    stream: &mut S,
    kind: Kind,
    bytes: &[u8],
    limiter: &LinkLimiter,
    counters: &TransferCounters,
) -> Result<(), PushError> {
    for part in bytes.chunks(MAX_FRAME) {
        limiter.acquire(Class::Replication, part.len()).await;
        write_frame(stream, kind, part).await?;
        counters
            .manifest_bytes
            .fetch_add((HEADER_LEN + part.len()) as u64, Relaxed);
    }
    Ok(())
}

/// The smallest manifest delta of `manifest` against one of `held` (the
/// replica's generations) that this rack still holds, if smaller than the
/// whole manifest (`full` bytes): `(base, delta)`.
fn best_delta(
    store: &VolumeStore,
    manifest: &Manifest,
    held: &[u64],
    full: usize,
) -> Result<Option<(u64, Vec<u8>)>, PushError> {
    let mut best: Option<(usize, Manifest)> = None;
    for g in held.iter().filter(|g| **g < manifest.generation) {
        let Some(base) = store.manifest(&manifest.volume, *g)? else {
            continue; // pruned here
        };
        if base.chunk_size != manifest.chunk_size {
            continue;
        }
        let d = manifest_delta::differences(&base, manifest);
        if best.as_ref().is_none_or(|(b, _)| d < *b) {
            best = Some((d, base));
        }
    }
    Ok(best
        .map(|(_, base)| (base.generation, manifest_delta::encode(&base, manifest)))
        .filter(|(_, d)| d.len() < full))
}

/// Prefix of the abort reason a replica gives for a protocol version it
/// does not speak (all versions so far word it so): how an owner tells a
/// replica that predates version 2.
const UNSUPPORTED_VERSION: &str = "unsupported protocol version";

/// The rest of a push once the replica has the manifest offer: its need
/// bitmap, the data, the commit. `sent_delta`: the manifest went as a
/// delta, so the replica may ask for the whole one instead (its base was
/// pruned meanwhile).
#[allow(clippy::too_many_arguments)]
async fn push_data<S>(
    store: Arc<VolumeStore>,
    manifest: Manifest,
    mut stream: S,
    limiter: &LinkLimiter,
    counters: &TransferCounters,
    progress: &TransferProgress,
    encoded: &[u8],
    mut sent_delta: bool,
) -> Result<PushReport, PushError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
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
            Some(f) if f.kind == Kind::Holding && sent_delta && bitmap.is_empty() => {
                // The delta's base is gone on the replica: the whole
                // manifest, once.
                sent_delta = false;
                send_parts(&mut stream, Kind::ManifestPart, encoded, limiter, counters).await?;
                stream.flush().await?;
            }
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
            blocking(move || st.manifest(&vol, g)).await?
        }
        _ => None,
    };

    // Disk side: read chunks straight into batches of wire frames; network
    // side: send them. Reads are not re-hashed: the replica verifies every
    // chunk, and a chunk it rejects is checked here (`check_rejected`).
    let (tx, mut rx) = mpsc::channel::<Result<Batch, PushError>>(PIPELINE_BATCHES);
    // Sent batches' buffers go back to the disk side: the same few buffers
    // carry the whole transfer (no allocation, page faults or regrowth per
    // batch, and they stay warm in the CPU caches).
    let (recycle, recycled) = std::sync::mpsc::sync_channel::<Vec<u8>>(PIPELINE_BATCHES + 2);
    let producer = {
        let store = store.clone();
        let manifest_chunks = manifest.chunks.clone();
        tokio::task::spawn_blocking(move || {
            let fresh = || Batch {
                bytes: recycled
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(BATCH_CAPACITY)),
                ..Batch::default()
            };
            let mut batch = fresh();
            for i in missing {
                let id = manifest_chunks[i].expect("filtered to present chunks");
                // The base is what the replica holds at this index: a chunk,
                // zeros (None in its manifest), or unknown.
                let base_at = base.as_ref().and_then(|b| b.chunks.get(i).copied());
                match build_frame(&store, &id, base_at, &mut batch.bytes) {
                    Ok(Kind::Delta) => batch.deltas += 1,
                    Ok(_) => batch.chunks += 1,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
                if batch.bytes.len() >= BATCH_BYTES
                    && tx
                        .blocking_send(Ok(std::mem::replace(&mut batch, fresh())))
                        .is_err()
                {
                    return;
                }
            }
            if !batch.bytes.is_empty() {
                let _ = tx.blocking_send(Ok(batch));
            }
        })
    };
    let mut report = PushReport {
        volume: manifest.volume.clone(),
        ..Default::default()
    };
    let sent: Result<(), PushError> = async {
        while let Some(batch) = rx.recv().await {
            let batch = batch?;
            // The limiter's burst is about one frame: take tokens frame by
            // frame's worth, then write the batch at once.
            for part in batch.bytes.chunks(LIMITER_STEP) {
                limiter.acquire(Class::Replication, part.len()).await;
            }
            stream.write_all(&batch.bytes).await?;
            let len = batch.bytes.len() as u64;
            report.bytes += len;
            report.chunks += batch.chunks;
            report.deltas += batch.deltas;
            progress
                .sent_chunks
                .fetch_add(batch.chunks + batch.deltas, Relaxed);
            counters.bytes.fetch_add(len, Relaxed);
            counters.chunks.fetch_add(batch.chunks, Relaxed);
            counters.deltas.fetch_add(batch.deltas, Relaxed);
            let mut buffer = batch.bytes;
            buffer.clear();
            let _ = recycle.try_send(buffer);
        }
        Ok(())
    }
    .await;
    if let Err(e) = sent {
        return Err(failed(&store, &mut stream, e).await);
    }
    producer.await.map_err(|source| PushError::Task {
        task: "reader",
        source,
    })?;
    let committed: Result<Committed, WireError> = async {
        write_frame(&mut stream, Kind::Done, &[]).await?;
        stream.flush().await?;
        expect_frame(&mut stream, Kind::Committed).await?.parse()
    }
    .await;
    let c = match committed {
        Ok(c) => c,
        Err(e) => return Err(failed(&store, &mut stream, e.into()).await),
    };
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

/// Why the data phase failed: a replica that gives up sends an abort and
/// stops reading, so a failed write is explained by the abort if there is
/// one; a chunk the replica rejected is checked in our store.
async fn failed<S: AsyncRead + Unpin>(
    store: &Arc<VolumeStore>,
    stream: &mut S,
    e: PushError,
) -> PushError {
    let e = match e {
        PushError::Wire(WireError::Io(_)) => peer_abort(stream).await.map_or(e, Into::into),
        e => e,
    };
    check_rejected(store, e).await
}

/// After a failed write: the abort the replica sent before it stopped
/// reading, if it sent one.
async fn peer_abort<S: AsyncRead + Unpin>(stream: &mut S) -> Option<WireError> {
    match tokio::time::timeout(ABORT_GRACE, read_frame(stream)).await {
        Ok(Err(e @ (WireError::Aborted(_) | WireError::RejectedChunk { .. }))) => Some(e),
        _ => None,
    }
}

/// A push reads chunks without re-hashing them, so when the replica rejects
/// one, the fault may be bit rot in our copy: verify it, which drops it
/// from our store if it is corrupt (it is then never sent again and a scrub
/// repairs it from a peer). If ours is sound, the replica or the link is
/// at fault and the error stands.
async fn check_rejected(store: &Arc<VolumeStore>, e: PushError) -> PushError {
    let PushError::Wire(WireError::RejectedChunk { chunk, .. }) = &e else {
        return e;
    };
    let (st, id) = (store.clone(), *chunk);
    match blocking(move || st.chunks().verify(&id)).await {
        Err(ChunkStoreError::Corrupt { .. }) => {
            tracing::warn!(chunk = %id, "the replica rejected a chunk that is corrupt in our store; dropped it");
            PushError::CorruptLocal(id)
        }
        Ok(_) => e,
        Err(other) => {
            tracing::warn!(chunk = %id, error = %other, "cannot check a chunk the replica rejected");
            e
        }
    }
}

/// Frames on their way from the disk side to the network side of a push.
#[derive(Debug, Default)]
struct Batch {
    /// Whole frames, as they go on the wire.
    bytes: Vec<u8>,
    /// Chunk frames in it.
    chunks: u64,
    /// Delta frames in it.
    deltas: u64,
}

/// Capacity of a batch buffer: a batch is sent once it holds
/// [`BATCH_BYTES`], so it never holds more than that plus one frame.
const BATCH_CAPACITY: usize = BATCH_BYTES + HEADER_LEN + 32 + crate::CHUNK_SIZE as usize;

/// Tokens are taken from the link limiter in steps of at most this many
/// bytes (a chunk frame), whatever the batch size: the limiter grants at
/// most one burst per call.
const LIMITER_STEP: usize = 64 * 1024;

/// Append the frame that brings the replica `id` to `out`; its kind.
///
/// `base`: `Some(Some(id))` the replica holds that chunk at this index,
/// `Some(None)` it holds zeros there, `None` unknown.
///
/// The chunk is read unverified straight into `out` (the replica verifies
/// it); a delta base is read verified, since a wrong base would make a
/// wrong delta (rare: only chunks that changed in place).
fn build_frame(
    store: &VolumeStore,
    id: &ChunkId,
    base: Option<Option<ChunkId>>,
    out: &mut Vec<u8>,
) -> Result<Kind, PushError> {
    out.reserve(HEADER_LEN + 32 + crate::CHUNK_SIZE as usize);
    let start = begin_frame(out, Kind::Chunk);
    out.extend_from_slice(&id.0);
    let data_at = out.len();
    let held = store.chunks().read_unverified_into(id, out);
    if !held.map_err(|e| {
        out.truncate(start);
        PushError::Chunks(e)
    })? {
        out.truncate(start);
        return Err(PushError::MissingChunk(*id));
    }
    let mut payload = None;
    if let Some(Some(base_id)) = base.filter(|b| *b != Some(*id)) {
        if let Ok(Some(base)) = store.chunks().read(&base_id) {
            payload = delta::encode(&id.0, &base_id.0, &base, &out[data_at..]);
        }
    }
    // Zeros are held by every rack: a mostly-zero chunk (a few writes into
    // an unused region) travels as its non-zero blocks.
    if payload.is_none() {
        payload = delta::encode_against_zeros(&id.0, &out[data_at..]);
    }
    if let Some(payload) = payload {
        out.truncate(start);
        append_frame(out, Kind::Delta, &payload)?;
        return Ok(Kind::Delta);
    }
    end_frame(out, start)?;
    Ok(Kind::Chunk)
}

/// Read frames of `kind` until `len` bytes arrived (`first`: one already
/// read). `len` is bounded by the caller before this allocates.
async fn read_parts<S: AsyncRead + Unpin>(
    stream: &mut S,
    kind: Kind,
    len: u64,
    first: Option<Frame>,
) -> Result<Vec<u8>, PushError> {
    let mut out = Vec::with_capacity(len.min(MAX_FRAME as u64 * 4) as usize);
    let mut first = first;
    while (out.len() as u64) < len {
        let f = match first.take() {
            Some(f) => f,
            None => expect_frame(stream, kind).await?,
        };
        out.extend_from_slice(&f.payload);
        if out.len() as u64 > len {
            return Err(WireError::Protocol(format!("{kind:?} longer than announced")).into());
        }
    }
    Ok(out)
}

/// Decode a whole offered manifest and check it is the one `hello`
/// offers; on failure the owner is told why.
async fn decode_offer<S: AsyncWrite + Unpin>(
    stream: &mut S,
    hello: &Hello,
    encoded: &[u8],
) -> Result<Manifest, PushError> {
    match Manifest::decode(encoded) {
        Ok(m) if m.volume == hello.volume && m.generation == hello.generation => Ok(m),
        Ok(_) => {
            wire::abort(stream, "manifest does not match the offer").await;
            Err(PushError::BadData(
                "manifest does not match the offer".into(),
            ))
        }
        Err(e) => {
            wire::abort(stream, &format!("bad manifest: {e}")).await;
            Err(PushError::BadData(format!("bad manifest: {e}")))
        }
    }
}

/// The manifest of a version-2 offer: whole, or a delta of a generation we
/// hold, rebuilt and checked against the identity the owner announced. If
/// the delta's base is gone (pruned since we listed it), ask for the whole
/// manifest with an empty [`Holding`].
async fn receive_manifest<S: AsyncRead + AsyncWrite + Unpin>(
    store: &Arc<VolumeStore>,
    hello: &Hello,
    stream: &mut S,
) -> Result<Manifest, PushError> {
    let Some(f) = read_frame(stream).await? else {
        return Err(WireError::Protocol("stream ended before the manifest".into()).into());
    };
    let head: DeltaHead = match f.kind {
        Kind::ManifestPart => {
            let encoded =
                read_parts(stream, Kind::ManifestPart, hello.manifest_len, Some(f)).await?;
            return decode_offer(stream, hello, &encoded).await;
        }
        Kind::DeltaHead => f.parse()?,
        other => {
            return Err(WireError::Protocol(format!("expected a manifest, got {other:?}")).into())
        }
    };
    // The owner sends a delta only when it is smaller than the manifest.
    if head.delta_len > hello.manifest_len {
        wire::abort(stream, "manifest delta larger than the manifest").await;
        return Err(
            WireError::Protocol(format!("manifest delta of {} bytes", head.delta_len)).into(),
        );
    }
    let delta = read_parts(stream, Kind::ManifestDeltaPart, head.delta_len, None).await?;
    let (st, vol, g) = (store.clone(), hello.volume.clone(), head.base);
    let Some(base) = blocking(move || st.manifest(&vol, g)).await? else {
        let f = Frame::json(
            Kind::Holding,
            &Holding {
                generations: Vec::new(),
            },
        );
        write_frame(stream, f.kind, &f.payload).await?;
        stream.flush().await?;
        let encoded = read_parts(stream, Kind::ManifestPart, hello.manifest_len, None).await?;
        return decode_offer(stream, hello, &encoded).await;
    };
    // A whole manifest of `manifest_len` bytes describes at most 8 chunks
    // per byte (zero chunks cost a bit): the same bound for the delta.
    let max_chunks = hello.manifest_len.saturating_mul(8);
    let rebuilt = manifest_delta::apply(&base, &delta, &head.manifest_id, max_chunks)
        .map(|m| (m.generation == hello.generation).then_some(m));
    match rebuilt {
        Ok(Some(m)) => Ok(m),
        Ok(None) => {
            wire::abort(stream, "manifest does not match the offer").await;
            Err(PushError::BadData(
                "manifest does not match the offer".into(),
            ))
        }
        Err(e) => {
            wire::abort(stream, &format!("bad manifest delta: {e}")).await;
            Err(PushError::ManifestDelta(e))
        }
    }
}

/// Refuse an offer of `generation` of `volume` that this rack owns, or
/// holds a newer generation of; if it holds exactly that one, say so
/// (`Some`: the push is done).
async fn check_offer<S: AsyncWrite + Unpin>(
    store: &Arc<VolumeStore>,
    from: &str,
    volume: &str,
    generation: u64,
    stream: &mut S,
) -> Result<Option<PushReport>, PushError> {
    let (st, vol) = (store.clone(), volume.to_owned());
    let (owned, held) = blocking(move || -> Result<(bool, Option<u64>), PushError> {
        let owned = st.owns(&vol)?;
        let held = st.latest(&vol)?.map(|m| m.generation);
        Ok((owned, held))
    })
    .await?;
    if owned {
        wire::abort(stream, "this rack owns the volume").await;
        return Err(PushError::BadData(format!(
            "{from} pushed {volume}, which this rack owns"
        )));
    }
    match held {
        Some(h) if h == generation => {
            let f = Frame::json(Kind::Committed, &Committed { generation: h });
            write_frame(stream, f.kind, &f.payload).await?;
            stream.flush().await?;
            Ok(Some(PushReport {
                volume: volume.to_owned(),
                generation: h,
                ..Default::default()
            }))
        }
        Some(h) if h > generation => {
            wire::abort(stream, &format!("replica holds newer generation {h}")).await;
            Err(WireError::Protocol(format!("offered {generation} but hold {h}")).into())
        }
        _ => Ok(None),
    }
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
    if hello.proto != PROTO && hello.proto != PROTO_V1 {
        wire::abort(
            &mut stream,
            &format!("{UNSUPPORTED_VERSION} {}", hello.proto),
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
    let manifest = if hello.proto == PROTO_V1 {
        let encoded = read_parts(&mut stream, Kind::ManifestPart, hello.manifest_len, None).await?;
        decode_offer(&mut stream, &hello, &encoded).await?
    } else {
        if let Some(done) =
            check_offer(&store, from, &hello.volume, hello.generation, &mut stream).await?
        {
            return Ok(done);
        }
        let (st, vol, g) = (store.clone(), hello.volume.clone(), hello.generation);
        let generations = blocking(move || st.generations_below(&vol, g, MAX_HOLDING)).await?;
        let f = Frame::json(Kind::Holding, &Holding { generations });
        write_frame(&mut stream, f.kind, &f.payload).await?;
        stream.flush().await?;
        receive_manifest(&store, &hello, &mut stream).await?
    };
    // (Checked again for a version-2 offer: the volume may have changed
    // hands while the manifest travelled.)
    if let Some(done) = check_offer(
        &store,
        from,
        &manifest.volume,
        manifest.generation,
        &mut stream,
    )
    .await?
    {
        return Ok(done);
    }
    let volume = manifest.volume.clone();
    let (st, vol) = (store.clone(), volume.clone());
    let held = blocking(move || st.latest(&vol))
        .await?
        .map(|m| m.generation);

    // Stage the offer first: its chunks are then safe from garbage
    // collection until it is published (or superseded), also across a
    // crash, so an interrupted transfer resumes with what already arrived.
    let (st, staged) = (store.clone(), manifest.clone());
    blocking(move || st.stage(&staged))
        .await
        .map_err(PushError::Stage)?;

    // What do we lack? One bit per index; each missing id asked for once.
    let chunks = manifest.chunks.clone();
    let st = store.clone();
    let (bitmap, wanted) = blocking(move || -> Result<(Vec<u8>, HashSet<ChunkId>), PushError> {
        let mut bitmap = vec![0u8; chunks.len().div_ceil(8)];
        let mut wanted = HashSet::new();
        for (i, c) in chunks.iter().enumerate() {
            if let Some(id) = c {
                if !wanted.contains(id) && !st.chunks().contains(id)? {
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

    // Receive, verify and store, off the runtime, pipelined: frames go to
    // the disk side in the buffers they were read into, in batches of up to
    // BATCH_BYTES, or whatever has arrived when the stream has nothing more
    // for now; the disk side hands the buffers back for reuse.
    let (tx, mut rx) = mpsc::channel::<DataBatch>(PIPELINE_BATCHES);
    let pool = BufferPool::default();
    let (st, disk_pool) = (store.clone(), pool.clone());
    let writer =
        tokio::task::spawn_blocking(move || store_frames(&st, wanted, &mut rx, &disk_pool));
    let mut reader = DataReader::new(pool);
    let received: Result<(), PushError> = async {
        let mut counted = 0;
        loop {
            let next = reader.next(&mut stream, BATCH_BYTES).await;
            // Live byte counts (metrics, progress) as batches arrive.
            counters
                .bytes
                .fetch_add(reader.wire_bytes - counted, Relaxed);
            counted = reader.wire_bytes;
            let (batch, done) = match next {
                Ok(Received::Batch(b)) => (Some(b), false),
                Ok(Received::Done(b)) => (b, true),
                Err(e) => {
                    // Cut mid-transfer: keep what arrived whole.
                    if let Some(b) = reader.salvage() {
                        let _ = tx.send(b).await;
                    }
                    return Err(e.into());
                }
            };
            if let Some(b) = batch {
                if tx.send(b).await.is_err() {
                    return Ok(()); // the writer stopped: its error explains why
                }
            }
            if done {
                return Ok(());
            }
        }
    }
    .await;
    let bytes = reader.wire_bytes;
    drop(tx);
    let written = writer.await.map_err(|source| PushError::Task {
        task: "writer",
        source,
    })?;
    let (chunks, deltas) = match (received, written) {
        (_, Err((e, bad_chunk))) => {
            if e.is_local() {
                wire::abort_with(&mut stream, &e.to_string(), bad_chunk).await;
            }
            return Err(e);
        }
        (Err(e), _) => {
            if e.is_local() {
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
    if let Err(error) = blocking(move || st.publish(manifest)).await {
        let e = PushError::Publish { generation, error };
        wire::abort(&mut stream, &e.to_string()).await;
        return Err(e);
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

/// Why the replica's disk side stopped, and the chunk that failed its
/// verification if that was the reason.
type Rejection = (PushError, Option<ChunkId>);

/// The replica's disk side: verify and store every received frame; make
/// what arrived durable every [`SYNC_EVERY`] / [`SYNC_EVERY_BYTES`] on a
/// thread of its own, so inserts (and so the stream) keep going during
/// the fsync; a last sync before returning. Returns `(chunks, deltas)`.
fn store_frames(
    st: &Arc<VolumeStore>,
    wanted: HashSet<ChunkId>,
    rx: &mut mpsc::Receiver<DataBatch>,
    pool: &BufferPool,
) -> Result<(u64, u64), Rejection> {
    let mut syncer = BackgroundSync::start(st.clone()).map_err(|e| (e, None))?;
    let stored = store_frames_with(st, wanted, rx, pool, &mut syncer);
    let synced = syncer.finish();
    let counts = match (stored, synced) {
        // A refused sync request is explained by the failed sync.
        (Err((stored, None)), Err(e)) if stored.is_store() => return Err((e, None)),
        (Ok(_), Err(e)) => return Err((e, None)),
        (stored, _) => stored?,
    };
    st.chunks()
        .sync_uncached()
        .map_err(|e| (PushError::Chunks(e), None))?;
    Ok(counts)
}

fn store_frames_with(
    st: &VolumeStore,
    mut wanted: HashSet<ChunkId>,
    rx: &mut mpsc::Receiver<DataBatch>,
    pool: &BufferPool,
    syncer: &mut BackgroundSync,
) -> Result<(u64, u64), Rejection> {
    let mut counts = (0u64, 0u64);
    let (mut since_sync, mut last_sync) = (0u64, std::time::Instant::now());
    while let Some(batch) = rx.blocking_recv() {
        for (kind, range) in &batch.frames {
            let payload = &batch.buf[range.clone()];
            since_sync += payload.len() as u64;
            store_frame(st, &mut wanted, *kind, payload, &mut counts)?;
            if since_sync >= SYNC_EVERY_BYTES || last_sync.elapsed() >= SYNC_EVERY {
                syncer.request().map_err(|e| (e, None))?;
                since_sync = 0;
                last_sync = std::time::Instant::now();
            }
        }
        pool.put(batch.buf);
    }
    Ok(counts)
}

/// Verify and store one data frame; counts `(chunks, deltas)`.
fn store_frame(
    st: &VolumeStore,
    wanted: &mut HashSet<ChunkId>,
    kind: Kind,
    payload: &[u8],
    (chunks, deltas): &mut (u64, u64),
) -> Result<(), Rejection> {
    let bad = |e: PushError| (e, None);
    let rebuilt;
    let (id, data): (ChunkId, &[u8]) = match kind {
        Kind::Chunk => {
            if payload.len() < 32 {
                return Err(bad(PushError::BadData("chunk frame too short".into())));
            }
            *chunks += 1;
            (
                ChunkId(payload[..32].try_into().expect("32")),
                &payload[32..],
            )
        }
        Kind::Delta => {
            let h = delta::header(payload).map_err(|e| bad(PushError::BadData(e)))?;
            let base = if h.base_id == delta::ZERO_BASE {
                if h.len > crate::CHUNK_SIZE as usize {
                    return Err(bad(PushError::BadData(format!(
                        "delta for a {}-byte chunk",
                        h.len
                    ))));
                }
                vec![0u8; h.len]
            } else {
                st.chunks()
                    .read(&ChunkId(h.base_id))
                    .map_err(|e| bad(PushError::Chunks(e)))?
                    .ok_or_else(|| {
                        bad(PushError::BadData(
                            "delta against a chunk we do not hold".into(),
                        ))
                    })?
            };
            *deltas += 1;
            rebuilt = delta::apply(&base, payload).map_err(|e| bad(PushError::BadData(e)))?;
            (ChunkId(h.new_id), rebuilt.as_slice())
        }
        other => {
            return Err(bad(WireError::Protocol(format!(
                "unexpected {other:?} in data"
            ))
            .into()))
        }
    };
    if !wanted.remove(&id) {
        return Err(bad(PushError::BadData(format!("unsolicited chunk {id}"))));
    }
    match st.chunks().insert_verified_uncached(&id, data) {
        Ok(_) => Ok(()),
        Err(e @ ChunkStoreError::HashMismatch { .. }) => {
            Err((PushError::BadData(format!("chunk {id}: {e}")), Some(id)))
        }
        Err(e @ (ChunkStoreError::ZeroChunk | ChunkStoreError::TooLarge { .. })) => {
            Err(bad(PushError::BadData(format!("chunk {id}: {e}"))))
        }
        Err(e) => Err(bad(PushError::Chunks(e))),
    }
}

/// Syncs a chunk store on a thread of its own, one sync at a time,
/// dropping what it synced from the page cache (a replica does not read
/// back what it receives; see [`crate::ChunkStore::sync_uncached`]).
struct BackgroundSync {
    request: std::sync::mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<Result<(), ChunkStoreError>>,
}

impl BackgroundSync {
    fn start(store: Arc<VolumeStore>) -> Result<Self, PushError> {
        // One request queued behind the running sync is enough: when it
        // starts it covers everything inserted until then.
        let (request, requests) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("chunk-sync".into())
            .spawn(move || {
                while requests.recv().is_ok() {
                    store.chunks().sync_uncached()?;
                }
                Ok(())
            })
            .map_err(PushError::SyncThread)?;
        Ok(Self { request, thread })
    }

    /// Make everything inserted so far durable, soon. Fails if an earlier
    /// sync failed (the store is then poisoned or the disk full).
    fn request(&mut self) -> Result<(), PushError> {
        match self.request.try_send(()) {
            Ok(()) | Err(std::sync::mpsc::TrySendError::Full(())) => Ok(()),
            Err(std::sync::mpsc::TrySendError::Disconnected(())) => Err(PushError::SyncStopped),
        }
    }

    /// Wait for the syncs asked for; the error of a failed one.
    fn finish(self) -> Result<(), PushError> {
        drop(self.request);
        match self.thread.join() {
            Ok(r) => r.map_err(PushError::Chunks),
            Err(_) => Err(PushError::SyncPanicked),
        }
    }
}
