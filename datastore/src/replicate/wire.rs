//! Framing of the replication protocols.
//!
//! Every frame is `[kind: u8][len: u32 LE][payload]`. Control frames carry
//! JSON; data frames carry raw bytes. Nothing is trusted: lengths are
//! bounded before anything is allocated, kinds are checked, JSON is parsed
//! into closed types.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{Deserialize, Serialize};

/// Largest frame payload: a chunk or delta frame is at most one chunk plus
/// a few hundred bytes; manifests and bitmaps are split into parts of this
/// size.
pub const MAX_FRAME: usize = 1 << 20;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Push: the offer (JSON [`Hello`]).
    Hello = 1,
    /// Push: a slice of the encoded manifest.
    ManifestPart = 2,
    /// Push: a slice of the receiver's "missing" bitmap (one bit per manifest index).
    NeedPart = 3,
    /// Push: the end of the bitmap (JSON [`NeedEnd`]).
    NeedEnd = 4,
    /// A whole chunk: `[id: 32][bytes]`.
    Chunk = 5,
    /// A chunk as changed blocks of a base chunk the receiver holds.
    Delta = 6,
    /// Push: everything was sent.
    Done = 7,
    /// Push: the receiver published the generation (JSON [`Committed`]).
    Committed = 8,
    /// Either side gives up (JSON [`Abort`]).
    Abort = 9,
    /// Fetch: ids wanted, `[id: 32]*`.
    Want = 10,
    /// Fetch: the responder lacks this chunk, `[id: 32]`.
    Missing = 11,
    /// Fetch: no more ids / no more answers.
    End = 12,
    /// Push (version 2): the generations the replica holds, its answer to
    /// the offer (JSON [`Holding`]); sent again, empty, to ask for the
    /// whole manifest when the delta's base is gone.
    Holding = 13,
    /// Push (version 2): a manifest delta follows (JSON [`DeltaHead`]).
    DeltaHead = 14,
    /// Push (version 2): a slice of the encoded manifest delta.
    ManifestDeltaPart = 15,
}

impl Kind {
    pub(crate) fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => ManifestPart,
            3 => NeedPart,
            4 => NeedEnd,
            5 => Chunk,
            6 => Delta,
            7 => Done,
            8 => Committed,
            9 => Abort,
            10 => Want,
            11 => Missing,
            12 => End,
            13 => Holding,
            14 => DeltaHead,
            15 => ManifestDeltaPart,
            _ => return None,
        })
    }
}

/// The offer that opens a push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// Protocol version.
    pub proto: u32,
    /// The owner rack (sender).
    pub owner: String,
    /// Volume name.
    pub volume: String,
    /// Generation offered.
    pub generation: u64,
    /// Length of the encoded manifest that follows.
    pub manifest_len: u64,
}

/// Most generations a replica lists in [`Holding`]: its newest ones are
/// the best delta bases, and the owner reads each one it considers, so
/// the list stays short.
pub const MAX_HOLDING: usize = 16;

/// The replica's answer to a version-2 offer: the generations of the
/// volume it holds (newest first, at most [`MAX_HOLDING`]), for the owner
/// to choose the base of a manifest delta. Empty: send the whole manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Holding {
    /// Generations held, newest first.
    pub generations: Vec<u64>,
}

/// Announces a manifest delta (the parts follow).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaHead {
    /// The generation the delta is against (one the replica listed).
    pub base: u64,
    /// Length of the encoded delta that follows.
    pub delta_len: u64,
    /// Identity of the whole manifest ([`crate::Manifest::id`]): the
    /// replica checks what it rebuilt against it before using it.
    pub manifest_id: crate::ChunkId,
}

/// The receiver's answer after the bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeedEnd {
    /// The newest generation the receiver holds (delta base), if any.
    pub have_generation: Option<u64>,
    /// How many indices are marked missing.
    pub missing: u64,
}

/// The receiver published the generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Committed {
    /// Generation now held.
    pub generation: u64,
}

/// Why a side gave up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Abort {
    /// Human-readable reason.
    pub reason: String,
    /// A receiver gives up because this chunk failed verification. Senders
    /// do not re-hash what they read for a push (the receiver does), so
    /// the sender then checks its own copy: bit rot on its disk is caught
    /// and the chunk dropped rather than offered again. Absent otherwise
    /// (and from older receivers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bad_chunk: Option<crate::ChunkId>,
}

/// Protocol version spoken by owners: 2 sends manifests as deltas of a
/// generation the replica holds (the replica answers the offer with
/// [`Holding`] first). Replicas serve 2 and [`PROTO_V1`].
pub const PROTO: u32 = 2;

/// The previous version (whole manifests, no [`Holding`] round), still
/// served to old owners and spoken to replicas that refuse version 2.
pub const PROTO_V1: u32 = 1;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The stream failed or closed.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not a valid frame.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The peer gave up.
    #[error("peer aborted: {0}")]
    Aborted(String),
    /// The peer gave up because a chunk we sent failed its verification.
    #[error("peer rejected chunk {chunk}: {reason}")]
    RejectedChunk {
        /// The chunk.
        chunk: crate::ChunkId,
        /// The peer's reason.
        reason: String,
    },
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its kind.
    pub kind: Kind,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A JSON control frame.
    pub fn json<T: Serialize>(kind: Kind, v: &T) -> Frame {
        Frame {
            kind,
            payload: serde_json::to_vec(v).expect("control frames serialize"),
        }
    }

    /// Parse a JSON control frame's payload.
    ///
    /// # Errors
    /// [`WireError::Protocol`].
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, WireError> {
        serde_json::from_slice(&self.payload)
            .map_err(|e| WireError::Protocol(format!("bad {:?} frame: {e}", self.kind)))
    }

    /// Size on the wire.
    pub fn wire_len(&self) -> usize {
        5 + self.payload.len()
    }
}

/// Length of a frame header: kind and payload length.
pub(crate) const HEADER_LEN: usize = 5;

/// Start a frame of `kind` at the end of `out` (a batch of frames laid out
/// as they go on the wire); append its payload, then [`end_frame`]. Lets a
/// disk reader build frames in place and the sender write many at once.
pub(crate) fn begin_frame(out: &mut Vec<u8>, kind: Kind) -> usize {
    let start = out.len();
    out.push(kind as u8);
    out.extend_from_slice(&[0; 4]);
    start
}

/// Finish the frame begun at `start`: write its payload length.
///
/// # Errors
/// [`WireError::Protocol`] if the payload exceeds [`MAX_FRAME`]; the frame
/// is then removed from `out`.
pub(crate) fn end_frame(out: &mut Vec<u8>, start: usize) -> Result<(), WireError> {
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(WireError::Protocol(format!(
            "frame of {len} bytes exceeds {MAX_FRAME}"
        )));
    }
    out[start + 1..start + HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Append a whole frame to `out`.
///
/// # Errors
/// As [`end_frame`].
pub(crate) fn append_frame(out: &mut Vec<u8>, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
    let start = begin_frame(out, kind);
    out.extend_from_slice(payload);
    end_frame(out, start)
}

/// Write one frame (not flushed).
///
/// # Errors
/// [`WireError::Io`]; [`WireError::Protocol`] if the payload is too large.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: Kind,
    payload: &[u8],
) -> Result<(), WireError> {
    if payload.len() > MAX_FRAME {
        return Err(WireError::Protocol(format!(
            "frame of {} bytes exceeds {MAX_FRAME}",
            payload.len()
        )));
    }
    let mut header = [0u8; HEADER_LEN];
    header[0] = kind as u8;
    header[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    w.write_all(&header).await?;
    w.write_all(payload).await?;
    Ok(())
}

/// Read one frame. `None` on a clean end of stream before a header.
///
/// # Errors
/// [`WireError`]; an `Abort` frame becomes [`WireError::Aborted`] (or
/// [`WireError::RejectedChunk`]).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, WireError> {
    FrameReader::default().next(r).await
}

/// Reads frames, keeping a partly read frame between calls: a
/// [`FrameReader::next`] future may be dropped at any await point without
/// losing bytes (cancel-safe), so a receiver can ask "is another frame
/// ready right now?" and hand over what it has if not.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    header: [u8; HEADER_LEN],
    /// Header bytes read.
    got: usize,
    /// The payload being read, once the header is complete.
    payload: Option<Vec<u8>>,
    /// Payload bytes read.
    filled: usize,
}

impl FrameReader {
    /// The next frame. `None` on a clean end of stream before a header.
    ///
    /// # Errors
    /// As [`read_frame`].
    pub(crate) async fn next<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<Frame>, WireError> {
        while self.got < HEADER_LEN {
            let n = r.read(&mut self.header[self.got..]).await?;
            if n == 0 {
                if self.got == 0 {
                    return Ok(None);
                }
                return Err(WireError::Protocol(
                    "stream ended inside a frame header".into(),
                ));
            }
            self.got += n;
        }
        let h = self.header;
        let kind = Kind::from_u8(h[0])
            .ok_or_else(|| WireError::Protocol(format!("unknown frame kind {}", h[0])))?;
        let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
        if len > MAX_FRAME {
            return Err(WireError::Protocol(format!(
                "frame of {len} bytes exceeds {MAX_FRAME}"
            )));
        }
        let payload = self.payload.get_or_insert_with(|| vec![0u8; len]);
        while self.filled < len {
            let n = r.read(&mut payload[self.filled..]).await?;
            if n == 0 {
                return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            self.filled += n;
        }
        let payload = self.payload.take().unwrap_or_default();
        (self.got, self.filled) = (0, 0);
        let frame = Frame { kind, payload };
        if kind == Kind::Abort {
            return Err(abort_error(&frame.payload));
        }
        Ok(Some(frame))
    }
}

/// The error an `Abort` frame with this payload stands for.
pub(crate) fn abort_error(payload: &[u8]) -> WireError {
    match serde_json::from_slice::<Abort>(payload) {
        Ok(Abort {
            reason,
            bad_chunk: Some(chunk),
        }) => WireError::RejectedChunk { chunk, reason },
        Ok(Abort { reason, .. }) => WireError::Aborted(reason),
        Err(e) => WireError::Protocol(format!("bad Abort frame: {e}")),
    }
}

/// Read a frame that must exist and be of `kind`.
///
/// # Errors
/// [`WireError::Protocol`] on end of stream or another kind.
pub async fn expect_frame<R: AsyncRead + Unpin>(r: &mut R, kind: Kind) -> Result<Frame, WireError> {
    match read_frame(r).await? {
        Some(f) if f.kind == kind => Ok(f),
        Some(f) => Err(WireError::Protocol(format!(
            "expected {kind:?}, got {:?}",
            f.kind
        ))),
        None => Err(WireError::Protocol(format!(
            "stream ended, expected {kind:?}"
        ))),
    }
}

/// Send an abort (best effort) and close.
pub async fn abort<W: AsyncWrite + Unpin>(w: &mut W, reason: &str) {
    abort_with(w, reason, None).await;
}

/// Send an abort naming the chunk that failed verification, if any (best
/// effort), and close.
pub async fn abort_with<W: AsyncWrite + Unpin>(
    w: &mut W,
    reason: &str,
    bad_chunk: Option<crate::ChunkId>,
) {
    let f = Frame::json(
        Kind::Abort,
        &Abort {
            reason: reason.to_string(),
            bad_chunk,
        },
    );
    let _ = write_frame(w, f.kind, &f.payload).await;
    let _ = w.flush().await;
    let _ = w.close().await;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use futures::io::Cursor;
    use proptest::prelude::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let mut buf = Cursor::new(Vec::new());
        write_frame(&mut buf, Kind::Chunk, b"hello").await.unwrap();
        let hello = Frame::json(
            Kind::Hello,
            &Hello {
                proto: 1,
                owner: "a".into(),
                volume: "v".into(),
                generation: 3,
                manifest_len: 9,
            },
        );
        write_frame(&mut buf, hello.kind, &hello.payload)
            .await
            .unwrap();
        let mut r = Cursor::new(buf.into_inner());
        let f = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((f.kind, f.payload.as_slice()), (Kind::Chunk, &b"hello"[..]));
        let h: Hello = expect_frame(&mut r, Kind::Hello)
            .await
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(h.generation, 3);
        assert!(read_frame(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_and_unknown_frames_are_refused() {
        let mut bytes = vec![5u8];
        bytes.extend_from_slice(&(u32::MAX).to_le_bytes());
        assert!(matches!(
            read_frame(&mut Cursor::new(bytes)).await,
            Err(WireError::Protocol(_))
        ));
        let bytes = vec![99u8, 0, 0, 0, 0];
        assert!(matches!(
            read_frame(&mut Cursor::new(bytes)).await,
            Err(WireError::Protocol(_))
        ));
        let bytes = vec![5u8, 10, 0, 0, 0, 1, 2];
        assert!(matches!(
            read_frame(&mut Cursor::new(bytes)).await,
            Err(WireError::Io(_))
        ));
    }

    #[tokio::test]
    async fn abort_becomes_an_error() {
        let mut buf = Cursor::new(Vec::new());
        abort(&mut buf, "chunk failed verification").await;
        let r = read_frame(&mut Cursor::new(buf.into_inner())).await;
        assert!(matches!(r, Err(WireError::Aborted(m)) if m.contains("verification")));
    }

    #[tokio::test]
    async fn an_abort_naming_a_chunk_says_which() {
        let id = crate::ChunkId::of(b"x");
        let mut buf = Cursor::new(Vec::new());
        abort_with(&mut buf, "hash mismatch", Some(id)).await;
        let r = read_frame(&mut Cursor::new(buf.into_inner())).await;
        assert!(
            matches!(&r, Err(WireError::RejectedChunk { chunk, reason }) if *chunk == id && reason == "hash mismatch"),
            "{r:?}"
        );
        // what an older receiver sends still parses
        let old = br#"{"reason":"no"}"#;
        let f = Frame {
            kind: Kind::Abort,
            payload: old.to_vec(),
        };
        assert_eq!(f.parse::<Abort>().unwrap().bad_chunk, None);
    }

    #[tokio::test]
    async fn frames_built_in_place_read_back_as_frames() {
        let mut out = Vec::new();
        let start = begin_frame(&mut out, Kind::Chunk);
        out.extend_from_slice(b"payload!");
        end_frame(&mut out, start).unwrap();
        append_frame(&mut out, Kind::Delta, b"d").unwrap();
        assert_eq!(out.len(), 2 * HEADER_LEN + 9);
        let too_big = vec![0u8; MAX_FRAME + 1];
        assert!(matches!(
            append_frame(&mut out, Kind::Chunk, &too_big),
            Err(WireError::Protocol(_))
        ));
        assert_eq!(
            out.len(),
            2 * HEADER_LEN + 9,
            "a refused frame leaves nothing behind"
        );
        let mut r = Cursor::new(out);
        let f = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!(
            (f.kind, f.payload.as_slice()),
            (Kind::Chunk, &b"payload!"[..])
        );
        let f = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((f.kind, f.payload.as_slice()), (Kind::Delta, &b"d"[..]));
        assert!(read_frame(&mut r).await.unwrap().is_none());
    }

    /// A reader that hands out at most `step` bytes per call and is not
    /// ready every other call (it wakes itself, so awaiting it works).
    pub(crate) struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
        ready: bool,
    }

    impl Trickle {
        pub(crate) fn new(data: Vec<u8>, step: usize) -> Self {
            Self {
                data,
                pos: 0,
                step,
                ready: false,
            }
        }
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.ready = !self.ready;
            if !self.ready {
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            }
            let n = self.step.min(buf.len()).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn a_frame_reader_loses_nothing_when_its_future_is_dropped() {
        use futures::FutureExt;
        let mut wire = Vec::new();
        for i in 0..20u8 {
            append_frame(&mut wire, Kind::Chunk, &vec![i; 1000 + usize::from(i)]).unwrap();
        }
        let mut r = Trickle::new(wire, 3);
        let mut reader = FrameReader::default();
        let mut frames = Vec::new();
        let mut polls = 0;
        loop {
            polls += 1;
            assert!(polls < 100_000, "no progress");
            // Poll once, then drop the future, as a receiver asking "is a
            // frame ready now?" does.
            match reader.next(&mut r).now_or_never() {
                None => continue,
                Some(Ok(Some(f))) => frames.push(f),
                Some(Ok(None)) => break,
                Some(Err(e)) => panic!("{e}"),
            }
        }
        assert_eq!(frames.len(), 20);
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f.payload, vec![i as u8; 1000 + i]);
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let mut r = Cursor::new(bytes);
                while let Ok(Some(_)) = read_frame(&mut r).await {}
            });
        }
    }
}
