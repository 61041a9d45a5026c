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
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
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
}

/// Protocol version spoken.
pub const PROTO: u32 = 1;

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
    let mut header = [0u8; 5];
    header[0] = kind as u8;
    header[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    w.write_all(&header).await?;
    w.write_all(payload).await?;
    Ok(())
}

/// Read one frame. `None` on a clean end of stream before a header.
///
/// # Errors
/// [`WireError`]; an `Abort` frame becomes [`WireError::Aborted`].
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, WireError> {
    let mut header = [0u8; 5];
    let mut got = 0;
    while got < header.len() {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(WireError::Protocol(
                "stream ended inside a frame header".into(),
            ));
        }
        got += n;
    }
    let kind = Kind::from_u8(header[0])
        .ok_or_else(|| WireError::Protocol(format!("unknown frame kind {}", header[0])))?;
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME {
        return Err(WireError::Protocol(format!(
            "frame of {len} bytes exceeds {MAX_FRAME}"
        )));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    let frame = Frame { kind, payload };
    if kind == Kind::Abort {
        let a: Abort = frame.parse()?;
        return Err(WireError::Aborted(a.reason));
    }
    Ok(Some(frame))
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
    let f = Frame::json(
        Kind::Abort,
        &Abort {
            reason: reason.to_string(),
        },
    );
    let _ = write_frame(w, f.kind, &f.payload).await;
    let _ = w.flush().await;
    let _ = w.close().await;
}

#[cfg(test)]
mod tests {
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
