//! The push and fetch protocols between two real stores over in-memory
//! streams: round trip, deltas, deduplication, a lying peer, resumption.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use datastore::replicate::limiter::LinkLimiter;
use datastore::replicate::{fetch, push, TransferCounters};
use datastore::VolumeStore;
use futures::{AsyncRead, AsyncWrite};
use rand::{Rng, RngCore, SeedableRng};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

const MIB: usize = 1 << 20;

fn stream_pair() -> (
    Compat<tokio::io::DuplexStream>,
    Compat<tokio::io::DuplexStream>,
) {
    let (a, b) = tokio::io::duplex(4 * MIB);
    (a.compat(), b.compat())
}

/// A random image with zero regions.
fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    for block in v.chunks_mut(64 * 1024) {
        if rng.gen_bool(0.7) {
            rng.fill_bytes(block);
        }
    }
    v
}

struct Rack {
    _dir: tempfile::TempDir,
    store: Arc<VolumeStore>,
}

fn rack() -> Rack {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(VolumeStore::open(dir.path()).unwrap());
    Rack { _dir: dir, store }
}

fn owner_with(name: &str, data: &[u8]) -> Rack {
    let r = rack();
    let src = r._dir.path().join("src.img");
    std::fs::write(&src, data).unwrap();
    r.store.import(name, &src, &mut |_, _| {}).unwrap();
    r
}

async fn push_latest(
    owner: &Rack,
    replica: &Rack,
    name: &str,
) -> Result<push::PushReport, push::PushError> {
    let m = owner.store.latest(name).unwrap().unwrap();
    let (a, b) = stream_pair();
    let sent = TransferCounters::default();
    let recv = TransferCounters::default();
    let limiter = LinkLimiter::new(0);
    let (s, r) = tokio::join!(
        push::push(owner.store.clone(), "a", m, a, &limiter, &sent),
        push::serve(replica.store.clone(), "a", b, &recv)
    );
    r?;
    s
}

fn export(r: &Rack, name: &str, generation: Option<u64>) -> Vec<u8> {
    let out = r._dir.path().join(format!("out-{name}-{generation:?}.img"));
    r.store
        .export(name, generation, &out, &mut |_, _| {})
        .unwrap();
    std::fs::read(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_exports_bit_identical_and_second_push_sends_nothing() {
    let data = image(8 * MIB, 1);
    let a = owner_with("vol", &data);
    let b = rack();
    let r = push_latest(&a, &b, "vol").await.unwrap();
    assert!(r.chunks > 0);
    assert_eq!(export(&b, "vol", None), data);
    // same generation again: already held, nothing sent
    let again = push_latest(&a, &b, "vol").await.unwrap();
    assert_eq!((again.chunks, again.deltas, again.bytes), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scattered_small_writes_travel_as_4k_deltas() {
    let mut data = image(16 * MIB, 2);
    let a = owner_with("vol", &data);
    let b = rack();
    push_latest(&a, &b, "vol").await.unwrap();
    // 1 % of the 4 KiB blocks change.
    let blocks = data.len() / 4096;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut changed = std::collections::HashSet::new();
    while changed.len() < blocks / 100 {
        let blk = rng.gen_range(0..blocks);
        if changed.insert(blk) {
            rng.fill_bytes(&mut data[blk * 4096..(blk + 1) * 4096]);
        }
    }
    let src = a._dir.path().join("v2.img");
    std::fs::write(&src, &data).unwrap();
    a.store.import("vol", &src, &mut |_, _| {}).unwrap();
    let r = push_latest(&a, &b, "vol").await.unwrap();
    let changed_bytes = (changed.len() * 4096) as u64;
    assert!(r.deltas > 0, "{r:?}");
    assert!(
        r.bytes < changed_bytes * 13 / 10,
        "sent {} bytes for {} changed bytes: {r:?}",
        r.bytes,
        changed_bytes
    );
    assert_eq!(export(&b, "vol", Some(r.generation)), data);
    assert_eq!(
        export(&b, "vol", Some(r.generation - 1)).len(),
        data.len(),
        "previous generation still held"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_cost_one_base() {
    let base = image(8 * MIB, 4);
    let a = rack();
    for i in 0..5u8 {
        let mut d = base.clone();
        d[i as usize * 100_000] ^= 0xff; // a small difference each
        let src = a._dir.path().join(format!("c{i}.img"));
        std::fs::write(&src, &d).unwrap();
        a.store
            .import(&format!("clone-{i}"), &src, &mut |_, _| {})
            .unwrap();
    }
    let b = rack();
    let mut total = 0;
    for i in 0..5 {
        total += push_latest(&a, &b, &format!("clone-{i}"))
            .await
            .unwrap()
            .bytes;
    }
    let stored_base = base
        .chunks(64 * 1024)
        .filter(|c| c.iter().any(|b| *b != 0))
        .count() as u64
        * 64
        * 1024;
    assert!(
        total <= stored_base * 12 / 10,
        "five clones sent {total} bytes, base is {stored_base}"
    );
}

/// A link fault injected into the sending side of a stream.
enum Fault {
    /// Flip one byte in every large write (chunk bodies, not headers): a
    /// peer that sends wrong bytes.
    Corrupt,
    /// Fail every write after this many more bytes: a link cut mid-transfer.
    CutAfter(usize),
}

/// A stream whose writes suffer `fault`; reads pass through.
struct Faulty<S> {
    inner: S,
    fault: Fault,
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Faulty<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.fault {
            Fault::Corrupt => {
                let mut b = buf.to_vec();
                if b.len() > 1000 {
                    b[500] ^= 0x55;
                }
                Pin::new(&mut self.inner).poll_write(cx, &b)
            }
            Fault::CutAfter(0) => Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            Fault::CutAfter(left) => {
                let n = buf.len().min(left);
                let r = Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
                if let Poll::Ready(Ok(w)) = r {
                    self.fault = Fault::CutAfter(left - w);
                }
                r
            }
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Faulty<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_wrong_bytes_is_caught_and_nothing_is_published() {
    let data = image(4 * MIB, 5);
    let a = owner_with("vol", &data);
    let b = rack();
    let m = a.store.latest("vol").unwrap().unwrap();
    let (s1, s2) = stream_pair();
    let (sent, recv) = (TransferCounters::default(), TransferCounters::default());
    let limiter = LinkLimiter::new(0);
    let (_s, r) = tokio::join!(
        push::push(
            a.store.clone(),
            "a",
            m.clone(),
            Faulty {
                inner: s1,
                fault: Fault::Corrupt
            },
            &limiter,
            &sent
        ),
        push::serve(b.store.clone(), "a", s2, &recv)
    );
    assert!(matches!(r, Err(push::PushError::BadData(_))), "{r:?}");
    assert!(
        b.store.latest("vol").unwrap().is_none(),
        "nothing published"
    );
    for id in m.chunks.iter().flatten() {
        if let Some(bytes) = b.store.chunks().read(id).unwrap() {
            assert_eq!(
                datastore::ChunkId::of(&bytes),
                *id,
                "only verified chunks kept"
            );
        }
    }
    // an honest retry completes and only sends what is missing
    let r = push_latest(&a, &b, "vol").await.unwrap();
    assert_eq!(export(&b, "vol", Some(r.generation)), data);
}

/// Every pack file under `dir`.
fn pack_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(pack_files(&p));
        } else if p.extension().is_some_and(|x| x == "pack") {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_rotten_on_the_owner_is_caught_by_the_replica_and_never_resent() {
    let data = image(4 * MIB, 8);
    let a = owner_with("vol", &data);
    let b = rack();
    let m = a.store.latest("vol").unwrap().unwrap();
    // Rot one chunk on the owner's disk (pushes read it without re-hashing).
    let victim = m.chunks.iter().flatten().nth(3).copied().unwrap();
    let bytes = a.store.chunks().read(&victim).unwrap().unwrap();
    let mut hit = false;
    for pack in pack_files(a._dir.path()) {
        let mut content = std::fs::read(&pack).unwrap();
        if let Some(at) = content.windows(bytes.len()).position(|w| w == bytes) {
            content[at + 1000] ^= 0x10;
            std::fs::write(&pack, content).unwrap();
            hit = true;
        }
    }
    assert!(hit, "the victim's bytes are in a pack file");

    let (s1, s2) = stream_pair();
    let (sent, recv) = (TransferCounters::default(), TransferCounters::default());
    let limiter = LinkLimiter::new(0);
    let (s, r) = tokio::join!(
        push::push(a.store.clone(), "a", m.clone(), s1, &limiter, &sent),
        push::serve(b.store.clone(), "a", s2, &recv)
    );
    assert!(matches!(r, Err(push::PushError::BadData(_))), "{r:?}");
    assert!(
        matches!(s, Err(push::PushError::CorruptLocal(id)) if id == victim),
        "the owner checked its copy and found it rotten: {s:?}"
    );
    assert!(
        !a.store.chunks().contains(&victim).unwrap(),
        "the owner dropped its rotten copy"
    );
    assert!(!b.store.chunks().contains(&victim).unwrap());
    assert!(
        b.store.latest("vol").unwrap().is_none(),
        "nothing published"
    );
    // The next push refuses to go on without the chunk (a scrub fetches it
    // from a peer) instead of sending the rotten bytes again.
    let (s1, s2) = stream_pair();
    let (again, r) = tokio::join!(
        push::push(a.store.clone(), "a", m, s1, &limiter, &sent),
        push::serve(b.store.clone(), "a", s2, &recv)
    );
    assert!(
        matches!(&again, Err(push::PushError::MissingChunk(id)) if *id == victim),
        "{again:?}"
    );
    assert!(r.is_err());
    assert!(!b.store.chunks().contains(&victim).unwrap());
    assert!(b.store.latest("vol").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_transfer_resumes_without_resending() {
    let data = image(16 * MIB, 6);
    let a = owner_with("vol", &data);
    let b = rack();
    let m = a.store.latest("vol").unwrap().unwrap();
    // cut the stream after ~half the data: the receiver keeps what it verified
    let (s1, s2) = stream_pair();
    let (sent, recv) = (TransferCounters::default(), TransferCounters::default());
    let limiter = LinkLimiter::new(0);
    let cut = Faulty {
        inner: s1,
        fault: Fault::CutAfter(8 * MIB),
    };
    let (_s, r) = tokio::join!(
        push::push(a.store.clone(), "a", m.clone(), cut, &limiter, &sent),
        push::serve(b.store.clone(), "a", s2, &recv)
    );
    assert!(r.is_err());
    assert!(
        b.store.latest("vol").unwrap().is_none(),
        "partial generation not published"
    );
    let resumed = push_latest(&a, &b, "vol").await.unwrap();
    let total: u64 = m.chunks.iter().flatten().count() as u64 * 64 * 1024;
    assert!(
        resumed.bytes < total * 7 / 10,
        "resumed transfer sent {} of {total}",
        resumed.bytes
    );
    assert_eq!(export(&b, "vol", None), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_repairs_chunks_from_a_peer() {
    let data = image(4 * MIB, 7);
    let a = owner_with("vol", &data);
    let b = rack();
    push_latest(&a, &b, "vol").await.unwrap();
    let m = b.store.latest("vol").unwrap().unwrap();
    let victims: Vec<datastore::ChunkId> = m.chunks.iter().flatten().take(3).copied().collect();
    for id in &victims {
        b.store.chunks().remove(id).unwrap();
    }
    let (s1, s2) = stream_pair();
    let (c1, c2) = (TransferCounters::default(), TransferCounters::default());
    let limiter = LinkLimiter::new(0);
    let (got, served) = tokio::join!(
        fetch::fetch(b.store.clone(), victims.clone(), s1, &c1),
        fetch::serve(a.store.clone(), s2, &limiter, &c2)
    );
    assert_eq!(served.unwrap(), 3);
    let got = got.unwrap();
    assert_eq!(got.repaired.len(), 3);
    assert!(got.missing.is_empty());
    assert_eq!(export(&b, "vol", None), data);
}
