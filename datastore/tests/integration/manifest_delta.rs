//! Manifest deltas in the push protocol (version 2) between real stores
//! over in-memory streams: what they save, what a lying owner or a missing
//! base leads to, and interoperation with version 1 on either side.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use datastore::manifest::delta as manifest_delta;
use datastore::replicate::limiter::LinkLimiter;
use datastore::replicate::push::{self, PushError, TransferProgress};
use datastore::replicate::wire::{
    self, expect_frame, read_frame, write_frame, DeltaHead, Frame, Hello, Holding, Kind, PROTO,
};
use datastore::replicate::TransferCounters;
use datastore::{ChunkId, Manifest, VolumeStore};
use futures::AsyncWriteExt;
use rand::{Rng, RngCore, SeedableRng};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

const MIB: usize = 1 << 20;

/// A frame's header on the wire: `[kind: u8][len: u32]`.
const FRAME_HEADER: usize = 5;

type Stream = Compat<tokio::io::DuplexStream>;

fn stream_pair() -> (Stream, Stream) {
    let (a, b) = tokio::io::duplex(4 * MIB);
    (a.compat(), b.compat())
}

struct Rack {
    dir: tempfile::TempDir,
    store: Arc<VolumeStore>,
}

fn rack() -> Rack {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(VolumeStore::open(dir.path()).unwrap());
    Rack { dir, store }
}

/// Import `data` as the next generation of `name` on `r`.
fn import(r: &Rack, name: &str, data: &[u8]) -> Manifest {
    let src = r.dir.path().join("src.img");
    std::fs::write(&src, data).unwrap();
    r.store.import(name, &src, &mut |_, _| {}).unwrap()
}

fn export(r: &Rack, name: &str, generation: u64) -> Vec<u8> {
    let out = r.dir.path().join(format!("out-{generation}.img"));
    r.store
        .export(name, Some(generation), &out, &mut |_, _| {})
        .unwrap();
    std::fs::read(out).unwrap()
}

/// A random image; `changes` 4 KiB blocks rewritten by `rewrite`.
fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn rewrite(data: &mut [u8], blocks: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..blocks {
        let b = rng.gen_range(0..data.len() / 4096);
        rng.fill_bytes(&mut data[b * 4096..(b + 1) * 4096]);
    }
}

/// Push the newest generation of `name` from `owner` to `replica` (the
/// current protocol on both sides); the report and the manifest bytes sent.
async fn push_latest(owner: &Rack, replica: &Rack, name: &str) -> (push::PushReport, u64) {
    let m = owner.store.latest(name).unwrap().unwrap();
    let (a, b) = stream_pair();
    let (sent, recv) = (TransferCounters::default(), TransferCounters::default());
    let limiter = LinkLimiter::new(0);
    let (s, r) = tokio::join!(
        push::push(owner.store.clone(), "a", m, a, &limiter, &sent),
        push::serve(replica.store.clone(), "a", b, &recv)
    );
    r.unwrap();
    (s.unwrap(), sent.manifest_bytes.load(Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_generation_goes_as_a_small_manifest_delta() {
    let mut data = image(32 * MIB, 1);
    let (a, b) = (rack(), rack());
    let m1 = import(&a, "vol", &data);
    let (_, first) = push_latest(&a, &b, "vol").await;
    // No base on the replica: the whole manifest (and its frame header).
    assert_eq!(first, m1.encode().len() as u64 + FRAME_HEADER as u64);
    rewrite(&mut data, 5, 2);
    let m2 = import(&a, "vol", &data);
    let (r, second) = push_latest(&a, &b, "vol").await;
    assert_eq!(r.generation, m2.generation);
    assert!(
        second * 10 < first,
        "a delta of {second} bytes for a {first}-byte manifest"
    );
    assert_eq!(export(&b, "vol", m2.generation), data);
    assert_eq!(b.store.latest("vol").unwrap().unwrap(), m2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_base_with_fewest_differences_is_chosen() {
    // Generations 1 and 2 on both; 3 is generation 1's content again:
    // its delta against 1 is empty.
    let (a, b) = (rack(), rack());
    let d1 = image(8 * MIB, 3);
    let mut d2 = d1.clone();
    rewrite(&mut d2, 40, 4);
    import(&a, "vol", &d1);
    push_latest(&a, &b, "vol").await;
    import(&a, "vol", &d2);
    push_latest(&a, &b, "vol").await;
    let m3 = import(&a, "vol", &d1);
    let m1 = a.store.manifest("vol", 1).unwrap().unwrap();
    let m2 = a.store.manifest("vol", 2).unwrap().unwrap();
    let from1 = manifest_delta::encode(&m1, &m3).len();
    assert!(from1 < manifest_delta::encode(&m2, &m3).len());
    let (r, sent) = push_latest(&a, &b, "vol").await;
    assert_eq!(r.generation, 3);
    let head = Frame::json(
        Kind::DeltaHead,
        &DeltaHead {
            base: 1,
            delta_len: from1 as u64,
            manifest_id: m3.id(),
        },
    );
    assert_eq!(sent, (head.wire_len() + FRAME_HEADER + from1) as u64);
    assert_eq!(export(&b, "vol", 3), d1);
}

/// The owner's side of a version-2 push, by hand: the Hello, then the
/// replica's [`Holding`].
async fn offer(s: &mut Stream, m: &Manifest) -> Holding {
    let hello = Hello {
        proto: PROTO,
        owner: "a".into(),
        volume: m.volume.clone(),
        generation: m.generation,
        manifest_len: m.encode().len() as u64,
    };
    let f = Frame::json(Kind::Hello, &hello);
    write_frame(s, f.kind, &f.payload).await.unwrap();
    s.flush().await.unwrap();
    expect_frame(s, Kind::Holding)
        .await
        .unwrap()
        .parse()
        .unwrap()
}

async fn send_delta(s: &mut Stream, base: u64, delta: &[u8], manifest_id: ChunkId) {
    let head = DeltaHead {
        base,
        delta_len: delta.len() as u64,
        manifest_id,
    };
    let f = Frame::json(Kind::DeltaHead, &head);
    write_frame(s, f.kind, &f.payload).await.unwrap();
    write_frame(s, Kind::ManifestDeltaPart, delta)
        .await
        .unwrap();
    s.flush().await.unwrap();
}

/// Owner `a` with generations 1 and 2 of `vol`, replica `b` holding 1 and
/// serving a push from `a` on the far end of `s`.
struct Served {
    _a: Rack,
    b: Rack,
    m1: Manifest,
    m2: Manifest,
    s: Stream,
    serving: tokio::task::JoinHandle<Result<push::PushReport, PushError>>,
}

/// [`Served`], the image from `image_seed`, generation 2 rewriting three
/// blocks with `rewrite_seed`.
async fn serve_second_generation(image_seed: u64, rewrite_seed: u64) -> Served {
    let (a, b) = (rack(), rack());
    let mut data = image(4 * MIB, image_seed);
    import(&a, "vol", &data);
    push_latest(&a, &b, "vol").await;
    rewrite(&mut data, 3, rewrite_seed);
    let m2 = import(&a, "vol", &data);
    let m1 = a.store.manifest("vol", 1).unwrap().unwrap();
    let (s, r) = stream_pair();
    let serving = tokio::spawn({
        let st = b.store.clone();
        async move { push::serve(st, "a", r, &TransferCounters::default()).await }
    });
    Served {
        _a: a,
        b,
        m1,
        m2,
        s,
        serving,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_that_rebuilds_another_manifest_is_refused() {
    let Served {
        _a,
        b,
        m1,
        m2,
        mut s,
        serving,
    } = serve_second_generation(5, 6).await;
    assert_eq!(offer(&mut s, &m2).await.generations, vec![1]);
    // A delta of generation 2 announced under another identity (a lying
    // owner, or a base that differs from the owner's).
    let mut lie = m2.clone();
    lie.created_at_ms += 1;
    send_delta(&mut s, 1, &manifest_delta::encode(&m1, &m2), lie.id()).await;
    let answer = read_frame(&mut s).await;
    assert!(
        matches!(answer, Err(wire::WireError::Aborted(_))),
        "{answer:?}"
    );
    let served = serving.await.unwrap();
    assert!(
        matches!(
            served,
            Err(PushError::ManifestDelta(
                manifest_delta::DeltaError::Mismatch { .. }
            ))
        ),
        "{served:?}"
    );
    assert_eq!(b.store.latest("vol").unwrap().unwrap().generation, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_base_makes_the_replica_ask_for_the_whole_manifest() {
    let Served {
        _a,
        b: _b,
        m1,
        m2,
        mut s,
        serving,
    } = serve_second_generation(7, 8).await;
    offer(&mut s, &m2).await;
    // A base the replica does not hold (as if pruned since it listed it).
    let mut gone = m1.clone();
    gone.generation = 0;
    let delta = manifest_delta::encode(&gone, &m2);
    send_delta(&mut s, 0, &delta, m2.id()).await;
    let again: Holding = expect_frame(&mut s, Kind::Holding)
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(again.generations.is_empty());
    write_frame(&mut s, Kind::ManifestPart, &m2.encode())
        .await
        .unwrap();
    s.flush().await.unwrap();
    // The replica goes on with the whole manifest: its need bitmap.
    expect_frame(&mut s, Kind::NeedPart).await.unwrap();
    drop(s);
    assert!(serving.await.unwrap().is_err(), "the owner went away");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_owners_and_replicas_still_interoperate() {
    let (a, b) = (rack(), rack());
    let mut data = image(8 * MIB, 9);
    import(&a, "vol", &data);
    let limiter = LinkLimiter::new(0);
    let progress = TransferProgress::default();

    // A version-1 owner (whole manifest, no Holding round) to a current
    // replica.
    let (s, r) = stream_pair();
    let m = a.store.latest("vol").unwrap().unwrap();
    let (sent, recv) = (TransferCounters::default(), TransferCounters::default());
    let (pushed, served) = tokio::join!(
        push::push_v1_with_progress(a.store.clone(), "a", m, s, &limiter, &sent, &progress),
        push::serve(b.store.clone(), "a", r, &recv)
    );
    served.unwrap();
    assert_eq!(pushed.unwrap().generation, 1);

    // A current owner to a version-1 replica: the replica refuses the
    // offer as version 1 did; the owner learns it speaks version 1 and
    // pushes with it on a new stream.
    rewrite(&mut data, 4, 10);
    let m2 = import(&a, "vol", &data);
    let (s, mut r) = stream_pair();
    let old_replica = async move {
        let hello: Hello = expect_frame(&mut r, Kind::Hello)
            .await
            .unwrap()
            .parse()
            .unwrap();
        if hello.proto != 1 {
            let reason = format!("unsupported protocol version {}", hello.proto);
            wire::abort(&mut r, &reason).await;
        }
    };
    let (pushed, ()) = tokio::join!(
        push::push(a.store.clone(), "a", m2.clone(), s, &limiter, &sent),
        old_replica
    );
    assert!(matches!(pushed, Err(PushError::OldReplica)), "{pushed:?}");
    let (s, r) = stream_pair();
    let (pushed, served) = tokio::join!(
        push::push_v1_with_progress(
            a.store.clone(),
            "a",
            m2.clone(),
            s,
            &limiter,
            &sent,
            &progress
        ),
        push::serve(b.store.clone(), "a", r, &recv)
    );
    served.unwrap();
    assert_eq!(pushed.unwrap().generation, 2);
    assert_eq!(export(&b, "vol", 2), data);
}
