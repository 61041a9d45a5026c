//! The replica's side of a push's data phase, without per-frame copies or
//! allocations.
//!
//! The stream is read straight into large buffers ([`RECV_BUFFER`]); the
//! frames in a buffer travel to the disk side as ranges of it (a
//! [`DataBatch`]), and the disk side hands the buffer back to a small
//! [`BufferPool`] when it has stored them. One transport read (one lock of
//! the QUIC connection) moves up to a megabyte, no frame is copied on its
//! way to the chunk store, and no memory is allocated or faulted in per
//! frame: on a two-core rack, allocator churn and page faults for 64 KiB
//! frames cost as much CPU as verifying them.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use futures::{AsyncRead, AsyncReadExt, FutureExt};

use super::wire::{abort_error, Kind, WireError, HEADER_LEN, MAX_FRAME};

/// Size of a receive buffer.
pub(crate) const RECV_BUFFER: usize = 1 << 20;

/// A partial batch is handed over when the stream pauses only once it
/// holds this much: on a fast link the stream pauses between almost every
/// pair of chunks, and handing over each one woke the disk side 10,000
/// times a second (measured: 5,000 batches of ~100 KB per 512 MiB).
const MIN_PARTIAL: usize = 256 << 10;

/// ... or once nothing more arrived for this long (a slow or stalled
/// link: what arrived still reaches the disk and its next sync soon).
const LINGER: std::time::Duration = std::time::Duration::from_millis(20);

/// Buffers kept for reuse: the batches in flight to the disk side, the one
/// being filled and one spare.
const POOL_BUFFERS: usize = super::PIPELINE_BATCHES + 2;

/// Receive buffers handed back by the disk side for reuse.
#[derive(Debug, Clone, Default)]
pub(crate) struct BufferPool(Arc<Mutex<Vec<Vec<u8>>>>);

impl BufferPool {
    /// A buffer of at least `len` initialised bytes (its length is its
    /// usable size).
    fn take(&self, len: usize) -> Vec<u8> {
        let reused = self.0.lock().map(|mut v| v.pop()).unwrap_or(None);
        match reused {
            Some(b) if b.len() >= len => b,
            _ => vec![0u8; len.max(RECV_BUFFER)],
        }
    }

    /// Give a buffer back (dropped if the pool is full or it is oversized).
    pub(crate) fn put(&self, buf: Vec<u8>) {
        if buf.len() != RECV_BUFFER {
            return;
        }
        if let Ok(mut v) = self.0.lock() {
            if v.len() < POOL_BUFFERS {
                v.push(buf);
            }
        }
    }
}

/// Data frames received in one buffer.
#[derive(Debug)]
pub(crate) struct DataBatch {
    /// The buffer; frames are ranges of it.
    pub buf: Vec<u8>,
    /// Each data frame's kind and payload.
    pub frames: Vec<(Kind, Range<usize>)>,
}

/// What [`DataReader::next`] found.
#[derive(Debug)]
pub(crate) enum Received {
    /// Frames to store; more follow.
    Batch(DataBatch),
    /// The sender's `Done`, with the last frames before it.
    Done(Option<DataBatch>),
}

/// Reads the data phase of a push into pooled buffers. Cancel-safe between
/// calls in the sense that matters here: [`DataReader::next`] is always
/// awaited to completion.
#[derive(Debug)]
pub(crate) struct DataReader {
    pool: BufferPool,
    buf: Vec<u8>,
    /// Bytes of `buf` read from the stream.
    filled: usize,
    /// Start of the first frame of `buf` not yet parsed.
    parsed: usize,
    frames: Vec<(Kind, Range<usize>)>,
    /// Payload bytes in `frames`.
    batch_bytes: usize,
    /// Wire bytes of the data frames parsed so far.
    pub wire_bytes: u64,
}

impl DataReader {
    pub(crate) fn new(pool: BufferPool) -> Self {
        let buf = pool.take(RECV_BUFFER);
        Self {
            pool,
            buf,
            filled: 0,
            parsed: 0,
            frames: Vec::new(),
            batch_bytes: 0,
            wire_bytes: 0,
        }
    }

    /// The next batch of data frames: about `batch_bytes` of them, or fewer
    /// when the stream has nothing more right now and either at least
    /// [`MIN_PARTIAL`] arrived or nothing more came for [`LINGER`].
    ///
    /// # Errors
    /// The stream failed or ended before `Done`, a frame is malformed or
    /// not a data frame, or the sender aborted.
    pub(crate) async fn next<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        batch_bytes: usize,
    ) -> Result<Received, WireError> {
        loop {
            // Every complete frame in the buffer.
            let need = loop {
                let avail = &self.buf[self.parsed..self.filled];
                if avail.len() < HEADER_LEN {
                    break HEADER_LEN;
                }
                let kind = Kind::from_u8(avail[0]).ok_or_else(|| {
                    WireError::Protocol(format!("unknown frame kind {}", avail[0]))
                })?;
                let len = u32::from_le_bytes([avail[1], avail[2], avail[3], avail[4]]) as usize;
                if len > MAX_FRAME {
                    return Err(WireError::Protocol(format!(
                        "frame of {len} bytes exceeds {MAX_FRAME}"
                    )));
                }
                if avail.len() < HEADER_LEN + len {
                    break HEADER_LEN + len;
                }
                let payload = self.parsed + HEADER_LEN..self.parsed + HEADER_LEN + len;
                self.parsed = payload.end;
                match kind {
                    Kind::Chunk | Kind::Delta => {
                        self.wire_bytes += (HEADER_LEN + len) as u64;
                        self.batch_bytes += len;
                        self.frames.push((kind, payload));
                    }
                    Kind::Done => {
                        if self.parsed != self.filled {
                            return Err(WireError::Protocol("data after Done".into()));
                        }
                        return Ok(Received::Done(self.take_batch(0)));
                    }
                    Kind::Abort => return Err(abort_error(&self.buf[payload])),
                    other => {
                        return Err(WireError::Protocol(format!("unexpected {other:?} in data")))
                    }
                }
            };
            let room = self.buf.len() - self.parsed;
            if self.batch_bytes >= batch_bytes || (room < need && !self.frames.is_empty()) {
                if let Some(b) = self.take_batch(need) {
                    return Ok(Received::Batch(b));
                }
            }
            if room < need {
                // A frame larger than what is left: move its start to the
                // front (of a larger buffer if it needs one).
                self.move_tail(need);
            }
            let read = match r.read(&mut self.buf[self.filled..]).now_or_never() {
                Some(read) => read,
                None if self.frames.is_empty() => r.read(&mut self.buf[self.filled..]).await,
                None if self.batch_bytes >= MIN_PARTIAL => {
                    // Nothing more right now: hand over what arrived.
                    return Ok(Received::Batch(self.take_batch(need).expect("frames")));
                }
                None => {
                    // A little arrived: wait a moment for more rather than
                    // wake the disk side for every chunk.
                    let more = r.read(&mut self.buf[self.filled..]);
                    match tokio::time::timeout(LINGER, more).await {
                        Ok(read) => read,
                        Err(_) => {
                            return Ok(Received::Batch(self.take_batch(need).expect("frames")))
                        }
                    }
                }
            };
            match read? {
                0 => return Err(WireError::Protocol("sender vanished mid-transfer".into())),
                n => self.filled += n,
            }
        }
    }

    /// After [`DataReader::next`] failed (the stream was cut: a fade, a
    /// lost connection): the whole frames parsed before the cut, which it
    /// had not handed over yet. Each is verified on its own when stored, so
    /// keeping them is safe, and the owner's next offer then need not send
    /// them again.
    pub(crate) fn salvage(&mut self) -> Option<DataBatch> {
        self.take_batch(0)
    }

    /// The frames parsed so far, with their buffer; the unparsed tail moves
    /// to a fresh buffer with room for at least `need` bytes.
    fn take_batch(&mut self, need: usize) -> Option<DataBatch> {
        if self.frames.is_empty() {
            return None;
        }
        let tail = self.filled - self.parsed;
        let mut next = self.pool.take(need.max(tail));
        next[..tail].copy_from_slice(&self.buf[self.parsed..self.filled]);
        let buf = std::mem::replace(&mut self.buf, next);
        (self.filled, self.parsed, self.batch_bytes) = (tail, 0, 0);
        Some(DataBatch {
            buf,
            frames: std::mem::take(&mut self.frames),
        })
    }

    /// With no parsed frames pending: make the unparsed tail start the
    /// buffer, growing it to `need` bytes if it is smaller.
    fn move_tail(&mut self, need: usize) {
        let tail = self.filled - self.parsed;
        if self.buf.len() < need {
            let mut bigger = vec![0u8; need];
            bigger[..tail].copy_from_slice(&self.buf[self.parsed..self.filled]);
            self.buf = bigger;
        } else {
            self.buf.copy_within(self.parsed..self.filled, 0);
        }
        (self.filled, self.parsed) = (tail, 0);
    }
}

impl Drop for DataReader {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicate::wire::tests::Trickle;
    use crate::replicate::wire::{append_frame, Frame};

    fn stream(payloads: &[Vec<u8>], done: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            append_frame(&mut out, Kind::Chunk, p).expect("frame");
        }
        if done {
            append_frame(&mut out, Kind::Done, &[]).expect("frame");
        }
        out
    }

    async fn read_all(data: Vec<u8>, step: usize) -> Result<Vec<Vec<u8>>, WireError> {
        let pool = BufferPool::default();
        let mut reader = DataReader::new(pool.clone());
        let mut r = Trickle::new(data, step);
        let mut got = Vec::new();
        loop {
            let (batch, done) = match reader.next(&mut r, 256 * 1024).await? {
                Received::Batch(b) => (Some(b), false),
                Received::Done(b) => (b, true),
            };
            if let Some(b) = batch {
                for (kind, range) in &b.frames {
                    assert_eq!(*kind, Kind::Chunk);
                    got.push(b.buf[range.clone()].to_vec());
                }
                pool.put(b.buf);
            }
            if done {
                return Ok(got);
            }
        }
    }

    #[tokio::test]
    async fn every_frame_arrives_whole_whatever_the_reads() {
        // Sizes around the buffer's edges, and one frame of the largest size.
        let payloads: Vec<Vec<u8>> = [1, 65_568, 5, 300_000, MAX_FRAME, 65_568, 0, 7, 1 << 19]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        for step in [1, 4, 5, 6, 4096, 65_573, RECV_BUFFER, usize::MAX] {
            let step = step.min(4 << 20);
            let got = read_all(stream(&payloads, true), step).await.expect("read");
            assert_eq!(got, payloads, "step {step}");
        }
    }

    /// What a [`Feeds`] reader does once its bytes are handed out.
    #[derive(Clone, Copy)]
    enum AfterBytes {
        /// Fails (a cut connection).
        Cut,
        /// Never yields anything more (a stalled link).
        Stall,
    }

    /// Hands out its bytes, then does what its [`AfterBytes`] says.
    struct Feeds(Vec<u8>, AfterBytes);

    impl AsyncRead for Feeds {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if self.0.is_empty() {
                return match self.1 {
                    AfterBytes::Cut => {
                        std::task::Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
                    }
                    AfterBytes::Stall => std::task::Poll::Pending,
                };
            }
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0.drain(..n);
            std::task::Poll::Ready(Ok(n))
        }
    }

    /// A cut after three whole frames and half of a fourth: the error, then
    /// the three whole ones salvaged, the half one not.
    #[tokio::test]
    async fn whole_frames_before_a_cut_are_salvaged() {
        let payloads = [vec![1u8; 100], vec![2u8; 200], vec![3u8; 300]];
        let mut bytes = stream(&payloads, false);
        let mut half = Vec::new();
        append_frame(&mut half, Kind::Chunk, &[4u8; 400]).expect("frame");
        bytes.extend_from_slice(&half[..half.len() / 2]);
        let mut reader = DataReader::new(BufferPool::default());
        let mut r = Feeds(bytes, AfterBytes::Cut);
        assert!(reader.next(&mut r, 1 << 20).await.is_err());
        let b = reader.salvage().expect("whole frames");
        let got: Vec<Vec<u8>> = b
            .frames
            .iter()
            .map(|(_, x)| b.buf[x.clone()].to_vec())
            .collect();
        assert_eq!(got, payloads);
        assert!(reader.salvage().is_none(), "salvaged once");
    }

    #[tokio::test]
    async fn a_small_batch_is_handed_over_when_the_link_stalls() {
        let mut reader = DataReader::new(BufferPool::default());
        let mut r = Feeds(
            stream(&[vec![3u8; 100], vec![4u8; 200]], false),
            AfterBytes::Stall,
        );
        let t = std::time::Instant::now();
        let Received::Batch(b) = reader.next(&mut r, 1 << 20).await.expect("batch") else {
            panic!("not done yet");
        };
        assert_eq!(b.frames.len(), 2);
        assert_eq!(&b.buf[b.frames[1].1.clone()], &[4u8; 200][..]);
        assert!(t.elapsed() >= LINGER, "waited for more first");
    }

    #[tokio::test]
    async fn a_stream_that_ends_before_done_is_an_error() {
        let payloads = vec![vec![1u8; 1000]; 3];
        let mut data = stream(&payloads, false);
        data.truncate(data.len() - 10);
        let e = read_all(data, 4096).await.expect_err("truncated");
        assert!(e.to_string().contains("vanished"), "{e}");
    }

    #[tokio::test]
    async fn an_abort_is_reported_and_control_frames_are_refused() {
        let mut data = stream(&[vec![2u8; 10]], false);
        let abort = Frame::json(
            Kind::Abort,
            &crate::replicate::wire::Abort {
                reason: "disk full".into(),
                bad_chunk: None,
            },
        );
        append_frame(&mut data, abort.kind, &abort.payload).expect("frame");
        let e = read_all(data, 7).await.expect_err("aborted");
        assert!(
            matches!(e, WireError::Aborted(ref r) if r == "disk full"),
            "{e}"
        );

        let mut data = stream(&[vec![2u8; 10]], false);
        append_frame(&mut data, Kind::NeedEnd, b"{}").expect("frame");
        let e = read_all(data, 7).await.expect_err("refused");
        assert!(e.to_string().contains("unexpected"), "{e}");

        let mut data = stream(&[], false);
        data.extend_from_slice(&[Kind::Chunk as u8, 0xff, 0xff, 0xff, 0x7f]);
        let e = read_all(data, 7).await.expect_err("oversized");
        assert!(e.to_string().contains("exceeds"), "{e}");
    }
}
