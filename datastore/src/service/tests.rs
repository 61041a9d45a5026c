//! The service run for real between racks joined by in-memory pipes
//! (`tokio::io::duplex`): real stores, real protocol runs, real loops.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt as _;
use rand::{RngCore, SeedableRng};
use tokio::sync::mpsc;
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::replicate::plan::RackView;

/// Bytes buffered in each direction of a pipe.
const PIPE_BYTES: usize = 1 << 20;
/// Streams queued at a listener before `open` waits.
const BACKLOG: usize = 8;
/// How long a test waits for the loops to converge before failing.
const CONVERGE: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// Who listens for which protocol: (rack, protocol) → its inbound queue.
type Listeners = HashMap<(String, &'static str), mpsc::Sender<(String, PeerStream)>>;

/// Racks joined by pipes: who listens for what, and the view of the field
/// every rack's replica planner gets.
#[derive(Default)]
struct Fabric {
    listeners: Mutex<Listeners>,
    views: Mutex<Vec<RackView>>,
}

impl Fabric {
    fn set_alive(&self, rack: &str, alive: bool) {
        for v in self.views.lock().unwrap().iter_mut() {
            if v.rack == rack {
                v.alive = alive;
            }
        }
    }

    fn listening(&self, rack: &str) -> bool {
        self.listeners
            .lock()
            .unwrap()
            .keys()
            .filter(|(r, _)| r == rack)
            .count()
            == 2
    }
}

/// One rack's end of the fabric.
struct Pipes {
    me: String,
    fabric: Arc<Fabric>,
}

impl Transport for Pipes {
    fn open<'a>(
        &'a self,
        rack: &'a str,
        protocol: &'static str,
    ) -> BoxFuture<'a, Result<PeerStream, TransportError>> {
        Box::pin(async move {
            let tx = self
                .fabric
                .listeners
                .lock()
                .unwrap()
                .get(&(rack.to_owned(), protocol))
                .cloned()
                .ok_or_else(|| TransportError::NotConnected {
                    rack: rack.to_owned(),
                })?;
            let (here, there) = tokio::io::duplex(PIPE_BYTES);
            tx.send((self.me.clone(), Box::new(there.compat())))
                .await
                .map_err(|_| TransportError::Open {
                    rack: rack.to_owned(),
                    protocol,
                    source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
                })?;
            Ok(Box::new(here.compat()) as PeerStream)
        })
    }

    fn incoming(&self, protocol: &'static str) -> Result<Incoming, TransportError> {
        let (tx, rx) = mpsc::channel(BACKLOG);
        self.fabric
            .listeners
            .lock()
            .unwrap()
            .insert((self.me.clone(), protocol), tx);
        Ok(
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
                .boxed(),
        )
    }

    fn connected(&self) -> Vec<String> {
        let mut racks: Vec<String> = self
            .fabric
            .listeners
            .lock()
            .unwrap()
            .keys()
            .map(|(r, _)| r.clone())
            .filter(|r| *r != self.me)
            .collect();
        racks.sort();
        racks.dedup();
        racks
    }
}

impl Peers for Pipes {
    fn replica_candidates(&self) -> BoxFuture<'_, Vec<RackView>> {
        let views = self.fabric.views.lock().unwrap().clone();
        Box::pin(async move { views.into_iter().filter(|v| v.rack != self.me).collect() })
    }
}

/// One running rack.
struct Rack {
    service: Arc<VolumeService>,
    records: sled::Tree,
    _dir: tempfile::TempDir,
}

fn rack(fabric: &Arc<Fabric>, name: &str, site: &str, factor: usize) -> Rack {
    rack_with_link(fabric, name, site, factor, 0)
}

/// [`rack`] whose pushes are limited to `link_bytes_per_s` per peer link.
fn rack_with_link(
    fabric: &Arc<Fabric>,
    name: &str,
    site: &str,
    factor: usize,
    link_bytes_per_s: u64,
) -> Rack {
    let dir = tempfile::tempdir().unwrap();
    fabric.views.lock().unwrap().push(RackView {
        rack: name.into(),
        site: site.into(),
        alive: true,
        dying: false,
        witness: false,
        free_bytes: None,
    });
    let records = sled::open(dir.path().join("records"))
        .unwrap()
        .open_tree("volumes")
        .unwrap();
    let settings = ServiceSettings {
        rack: name.into(),
        site: site.into(),
        witness: false,
        replication_factor: factor,
        // Snapshots are taken by the tests themselves.
        snapshot_interval: Duration::from_secs(3600),
        snapshot_max_interval: Duration::from_secs(3600),
        keep_snapshots: 3,
        link_bytes_per_s,
        scrub_interval: None,
        import_dir: dir.path().join("import"),
        extra_import_dirs: Vec::new(),
    };
    let pipes = Arc::new(Pipes {
        me: name.into(),
        fabric: fabric.clone(),
    });
    let service = VolumeService::open(
        &dir.path().join("volumes"),
        settings,
        pipes.clone(),
        pipes,
        Arc::new(records.clone()),
    )
    .unwrap();
    Rack {
        service,
        records,
        _dir: dir,
    }
}

/// Start every rack's loops; returns once all listen.
async fn run(fabric: &Fabric, racks: &[&Rack], cancel: &CancellationToken) {
    for r in racks {
        tokio::spawn(r.service.clone().run(cancel.clone()));
    }
    for r in racks {
        eventually(|| async { fabric.listening(&r.service.settings.rack) }).await;
    }
}

/// Poll `f` until it holds, failing the test after [`CONVERGE`].
async fn eventually<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tokio::time::timeout(CONVERGE, async {
        while !f().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the racks converged in time");
}

/// Create `name` on `r` filled with `len` random bytes; returns them.
async fn owned_volume(r: &Rack, name: &str, len: usize, seed: u64) -> Vec<u8> {
    r.service.create(name.into(), 4 * MIB).await.unwrap();
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    let path = r.service.store.image_path(name);
    let mut image = std::fs::read(&path).unwrap();
    image[..len].copy_from_slice(&data);
    std::fs::write(&path, &image).unwrap();
    image
}

async fn exported(r: &Rack, name: &str) -> Vec<u8> {
    let to = r._dir.path().join(format!("{name}.export"));
    r.service
        .export(name.into(), None, to.clone(), |_, _| {})
        .await
        .unwrap();
    std::fs::read(to).unwrap()
}

async fn held(r: &Rack, name: &str) -> Option<u64> {
    r.service.held_generations().await.get(name).copied()
}

/// The replica racks `r`'s status shows for `name`, with their generations.
async fn replicas(r: &Rack, name: &str) -> Vec<(String, Option<u64>)> {
    r.service
        .status()
        .await
        .into_iter()
        .find(|v| v.name == name)
        .map(|v| {
            v.replicas
                .into_iter()
                .map(|x| (x.rack, x.generation))
                .collect()
        })
        .unwrap_or_default()
}

fn stored_record(r: &Rack, name: &str) -> VolumeRecord {
    serde_json::from_slice(&r.records.get(name).unwrap().expect("a stored record")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_reaches_the_replica_and_both_sides_record_it() {
    let fabric = Arc::new(Fabric::default());
    let (a, b) = (rack(&fabric, "a", "s1", 2), rack(&fabric, "b", "s2", 2));
    let cancel = CancellationToken::new();
    run(&fabric, &[&a, &b], &cancel).await;

    let image = owned_volume(&a, "vol", 3 * MIB as usize, 1).await;
    let g = a.service.snapshot("vol".into()).await.unwrap().generation;
    eventually(|| async { held(&b, "vol").await >= Some(g) }).await;
    eventually(|| async { replicas(&a, "vol").await == vec![("b".to_owned(), Some(g))] }).await;

    assert_eq!(
        exported(&b, "vol").await,
        image,
        "the replica is bit-identical"
    );
    let on_b = b.service.status().await;
    assert_eq!(on_b[0].owner.as_deref(), Some("a"));
    assert!(on_b[0].image.is_none(), "a replica has no live image");
    assert_eq!(stored_record(&b, "vol").owner.as_deref(), Some("a"));
    let rec = stored_record(&a, "vol");
    assert_eq!(rec.replicas.len(), 1);
    assert_eq!(rec.replicas[0].generation, Some(g));
    let sent = a.service.metrics.sent.lock().unwrap()["b"]
        .bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(sent >= 3 * MIB, "{sent} bytes sent");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replica_rack_is_replaced_and_the_new_one_filled() {
    let fabric = Arc::new(Fabric::default());
    let a = rack(&fabric, "a", "s1", 2);
    let (b, c) = (rack(&fabric, "b", "s2", 2), rack(&fabric, "c", "s3", 2));
    let cancel = CancellationToken::new();
    run(&fabric, &[&a, &b, &c], &cancel).await;

    owned_volume(&a, "vol", MIB as usize, 2).await;
    let g = a.service.snapshot("vol".into()).await.unwrap().generation;
    eventually(|| async { replicas(&a, "vol").await.iter().any(|r| r.1 == Some(g)) }).await;
    let first = replicas(&a, "vol").await[0].0.clone();
    let other = if first == "b" { "c" } else { "b" };

    fabric.set_alive(&first, false);
    eventually(|| async { replicas(&a, "vol").await == vec![(other.to_owned(), Some(g))] }).await;
    let holder = if other == "b" { &b } else { &c };
    assert_eq!(held(holder, "vol").await, Some(g));
    assert_eq!(
        stored_record(&a, "vol").replicas[0].rack,
        other,
        "the new placement is durable"
    );
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shipped_volume_is_promoted_by_its_new_owner() {
    let fabric = Arc::new(Fabric::default());
    // Factor 1: no background replication, only the handover's push.
    let (a, b) = (rack(&fabric, "a", "s1", 1), rack(&fabric, "b", "s1", 1));
    let cancel = CancellationToken::new();
    run(&fabric, &[&a, &b], &cancel).await;

    let image = owned_volume(&a, "vol", 2 * MIB as usize, 3).await;
    let g = a.service.ship("vol", "b").await.unwrap();
    assert_eq!(
        held(&b, "vol").await,
        Some(g),
        "published before ship returns"
    );
    let kept = a.service.demote("vol", Some(g)).await.unwrap();
    assert_eq!(
        kept, None,
        "the new owner got exactly this state: nothing to keep"
    );
    assert!(a.service.kept().await.unwrap().is_empty());
    assert!(!a.service.owns("vol").await.unwrap());
    assert_eq!(held(&a, "vol").await, None);

    let (path, how) = b.service.ensure_owned("vol", 4 * MIB, None).await.unwrap();
    assert_eq!(how, "promoted");
    assert!(b.service.owns("vol").await.unwrap());
    assert_eq!(std::fs::read(path).unwrap(), image);
    assert_eq!(
        stored_record(&b, "vol").owner,
        None,
        "no longer anyone's replica"
    );
    let (_, again) = b.service.ensure_owned("vol", 4 * MIB, None).await.unwrap();
    assert_eq!(again, "owned");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_owner_keeps_the_writes_its_successor_never_got() {
    let fabric = Arc::new(Fabric::default());
    let a = rack(&fabric, "a", "s1", 1);
    owned_volume(&a, "vol", MIB as usize, 5).await;
    let g = a.service.snapshot("vol".into()).await.unwrap().generation;
    // Writes after the last generation a replica could have: the owner was
    // cut off and fenced before it captured them, and another rack took
    // the appliance over from generation `g`.
    let path = a.service.store.image_path("vol");
    let mut last = std::fs::read(&path).unwrap();
    last[3 * MIB as usize..3 * MIB as usize + 4096].fill(0xAB);
    std::fs::write(&path, &last).unwrap();

    let kept = a.service.demote("vol", None).await.unwrap().expect("kept");
    assert_eq!(kept.volume, "vol");
    assert!(
        kept.generation > g,
        "the last capture, with the late writes"
    );
    assert!(!a.service.owns("vol").await.unwrap());
    assert_eq!(held(&a, "vol").await, None, "the volume itself is gone");
    assert_eq!(a.service.kept().await.unwrap(), vec![kept.clone()]);

    // Garbage collection leaves the kept copy whole.
    a.service.store.prune(1).unwrap();
    let to = a._dir.path().join("kept.img");
    a.service
        .export_kept("vol".into(), kept.kept_ms, to.clone(), |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(&to).unwrap(),
        last,
        "bit for bit what the owner last had"
    );
    let e = a
        .service
        .export_kept("vol".into(), kept.kept_ms + 1, to.clone(), |_, _| {})
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no kept copy of volume vol"), "{e}");

    // Dropped, its chunks go at the next prune.
    let chunks_before = a.service.store.chunks().stats().unwrap().chunks;
    assert_eq!(
        a.service
            .drop_kept("vol".into(), kept.kept_ms)
            .await
            .unwrap(),
        kept
    );
    assert!(a.service.kept().await.unwrap().is_empty());
    a.service.store.prune(1).unwrap();
    assert!(a.service.store.chunks().stats().unwrap().chunks < chunks_before);
    assert!(a
        .service
        .drop_kept("vol".into(), kept.kept_ms)
        .await
        .is_err());
}

#[test]
fn at_most_three_kept_copies_per_volume_the_oldest_go() {
    let dir = tempfile::tempdir().unwrap();
    let st = crate::VolumeStore::open(dir.path()).unwrap();
    for round in 0..5u64 {
        st.create("vol", 4 * MIB).unwrap();
        let path = st.image_path("vol");
        let mut image = std::fs::read(&path).unwrap();
        image[..8].copy_from_slice(&round.to_le_bytes());
        std::fs::write(&path, &image).unwrap();
        st.snapshot("vol", &crate::NoPause, &mut |_, _| {}).unwrap();
        // The same clock reading each time: kept copies never overwrite.
        st.keep_and_delete("vol", 1_000).unwrap().unwrap();
    }
    let kept = st.kept().unwrap();
    assert_eq!(
        kept.iter().map(|k| k.kept_ms).collect::<Vec<_>>(),
        vec![1_002, 1_003, 1_004]
    );
    let to = dir.path().join("newest.img");
    st.export_kept("vol", 1_004, &to, &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::read(&to).unwrap()[..8], 4u64.to_le_bytes());
    // A volume never snapshotted has nothing to keep.
    st.create("empty", 4 * MIB).unwrap();
    assert_eq!(st.keep_and_delete("empty", 2_000).unwrap(), None);
    assert_eq!(st.kept().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipping_to_an_unconnected_rack_is_a_transport_error() {
    let fabric = Arc::new(Fabric::default());
    let a = rack(&fabric, "a", "s1", 1);
    owned_volume(&a, "vol", MIB as usize, 4).await;
    let e = a.service.ship("vol", "nowhere").await.unwrap_err();
    assert!(
        matches!(&e, VolumeError::Transport(TransportError::NotConnected { rack }) if rack == "nowhere"),
        "{e:?}"
    );
    let e = a.service.ship("missing", "nowhere").await.unwrap_err();
    assert!(matches!(e, VolumeError::Snapshot(_)), "{e:?}");
}

fn pack_files(root: &std::path::Path) -> Vec<PathBuf> {
    let dir = root.join("volumes/chunks/packs");
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrub_fetches_a_rotten_chunk_back_from_a_peer() {
    let fabric = Arc::new(Fabric::default());
    let (a, b) = (rack(&fabric, "a", "s1", 2), rack(&fabric, "b", "s2", 2));
    let cancel = CancellationToken::new();
    run(&fabric, &[&a, &b], &cancel).await;
    let image = owned_volume(&a, "vol", 2 * MIB as usize, 5).await;
    let m = a.service.snapshot("vol".into()).await.unwrap();
    eventually(|| async { held(&b, "vol").await >= Some(m.generation) }).await;

    // Rot one chunk on a's disk.
    let victim = m.chunks.iter().flatten().nth(2).copied().unwrap();
    let bytes = a.service.store.chunks().read(&victim).unwrap().unwrap();
    let mut hit = false;
    for pack in pack_files(a._dir.path()) {
        let mut content = std::fs::read(&pack).unwrap();
        if let Some(at) = content.windows(bytes.len()).position(|w| w == bytes) {
            content[at + 100] ^= 0xff;
            std::fs::write(&pack, content).unwrap();
            hit = true;
        }
    }
    assert!(hit, "the victim's bytes are in a pack file");

    assert_eq!(a.service.scrub_now().await, (1, 1));
    assert_eq!(
        a.service.store.chunks().read(&victim).unwrap().unwrap(),
        bytes
    );
    assert_eq!(exported(&a, "vol").await, image);
    assert_eq!(
        a.service.scrub_now().await,
        (0, 0),
        "nothing left to repair"
    );
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_runs_no_loops() {
    let fabric = Arc::new(Fabric::default());
    let a = rack(&fabric, "a", "s1", 2);
    let mut settings = a.service.settings.clone();
    settings.witness = true;
    let pipes = Arc::new(Pipes {
        me: "w".into(),
        fabric: fabric.clone(),
    });
    let dir = tempfile::tempdir().unwrap();
    settings.import_dir = dir.path().join("import");
    let w = VolumeService::open(
        &dir.path().join("volumes"),
        settings,
        pipes.clone(),
        pipes,
        Arc::new(a.records.clone()),
    )
    .unwrap();
    let cancel = CancellationToken::new();
    let running = tokio::spawn(w.run(cancel.clone()));
    tokio::task::yield_now().await;
    assert!(
        fabric.listeners.lock().unwrap().is_empty(),
        "a witness serves nothing"
    );
    assert!(dir.path().join("import").is_dir());
    cancel.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_shows_bytes_waiting_and_the_push_rate() {
    let fabric = Arc::new(Fabric::default());
    // 2 MB/s: a 1 MiB generation is still on its way when the status is read.
    let a = rack_with_link(&fabric, "a", "s1", 2, 2_000_000);
    let b = rack(&fabric, "b", "s2", 2);
    let cancel = CancellationToken::new();
    run(&fabric, &[&a, &b], &cancel).await;

    owned_volume(&a, "vol", 3 * MIB as usize, 4).await;
    let g = a.service.snapshot("vol".into()).await.unwrap().generation;
    eventually(|| async { replicas(&a, "vol").await == vec![("b".to_owned(), Some(g))] }).await;
    let st = a.service.status().await;
    let v = st.iter().find(|v| v.name == "vol").unwrap();
    assert_eq!(v.bytes_waiting, Some(0), "the replica holds everything");
    assert_eq!(v.eta_s, Some(0.0), "nothing to send");
    assert!(v.rpo_s.is_some());
    let rate = v.replicas[0]
        .push_bytes_per_s
        .expect("a 3 MiB push is measured");
    assert!(rate > 0.0);

    // A new generation waits for the replica while it is pushed.
    owned_volume_rewrite(&a, "vol", MIB as usize, 5);
    let r = a.service.snapshot("vol".into()).await.unwrap();
    let v = a
        .service
        .status()
        .await
        .into_iter()
        .find(|v| v.name == "vol")
        .unwrap();
    let waiting = v.bytes_waiting.unwrap();
    assert!(
        waiting >= MIB,
        "{waiting} bytes waiting after generation {}",
        r.generation
    );
    assert_eq!(v.replicas[0].bytes_waiting, waiting);
    let eta = v.eta_s.expect("a measured rate gives an eta");
    assert!((eta - round1(waiting as f64 / rate)).abs() <= 0.1, "{eta}");
    // Once pushed, nothing waits.
    eventually(|| async {
        a.service
            .status()
            .await
            .iter()
            .any(|v| v.name == "vol" && v.bytes_waiting == Some(0))
    })
    .await;
    cancel.cancel();
}

/// Overwrite the first `len` bytes of `name`'s live image with new random bytes.
fn owned_volume_rewrite(r: &Rack, name: &str, len: usize, seed: u64) {
    use std::os::unix::fs::FileExt;
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(r.service.store.image_path(name))
        .unwrap();
    f.write_all_at(&data, 0).unwrap();
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
