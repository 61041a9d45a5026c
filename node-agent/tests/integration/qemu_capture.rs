//! QEMU captures with dirty bitmaps, end to end on real VMs (TCG): a 4 GiB
//! disk written through QEMU (`qemu-io` on the monitor) at random offsets,
//! captured 20 times (full passes and incremental ones), QEMU SIGKILLed at
//! random moments across the captures and started again; every generation
//! is pushed to a replica store, and each one the replica holds must be the
//! disk exactly as it was at its capture's point in time: the writes
//! issued before the capture began, none issued once its job ran (those
//! land on clusters QEMU copies before the write: copy-before-write).
//!
//! The reference is the same writes applied, in order, to a model of the
//! disk; each generation's manifest on the replica is compared with it
//! chunk by chunk, and every chunk is read back from the replica's store.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datastore::replicate::limiter::LinkLimiter;
use datastore::replicate::{push, TransferCounters};
use datastore::{ChunkId, VolumeStore, CHUNK_SIZE};
use deploy::appliance::{parse_manifest, ApplianceSpec};
use node_agent::drivers::{self, qemu, Accel, CaptureKind, Capturer, Instance, LaunchSpec};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const VOLUME: &str = "disk";
const GIB: u64 = 1 << 30;
const BLOCK: u64 = 4096;

fn qemu_present() -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = drivers::find_in_path(qemu::QEMU, &path).is_some()
        && drivers::find_in_path(qemu::QEMU_IMG, &path).is_some();
    assert!(
        found || std::env::var_os("CI").is_none(),
        "qemu-system-x86_64 and qemu-img are missing: run ./scripts/setup"
    );
    found
}

fn vm_spec(size: u64) -> ApplianceSpec {
    parse_manifest(&format!(
        "[[appliance]]\nname = \"vm\"\ndriver = \"qemu\"\nmemory_mb = 64\n\
         [[appliance.volume]]\nname = \"{VOLUME}\"\nsize = \"{size}\"\n"
    ))
    .unwrap()
    .remove(0)
}

/// The disk as the writes made it: 4 KiB block index → fill byte (0 for
/// zeroed blocks), the last write winning.
#[derive(Clone, Default)]
struct Model {
    blocks: BTreeMap<u64, u8>,
}

impl Model {
    fn apply(&mut self, w: &Write) {
        for b in w.offset / BLOCK..(w.offset + w.len) / BLOCK {
            self.blocks.insert(b, w.fill);
        }
    }

    /// Expected bytes of chunk `i`, `None` if all zeros.
    fn chunk(&self, i: u64, size: u64) -> Option<Vec<u8>> {
        let cs = u64::from(CHUNK_SIZE);
        let start = i * cs;
        let len = cs.min(size - start);
        let mut data = vec![0u8; len as usize];
        for (b, fill) in self.blocks.range(start / BLOCK..(start + len) / BLOCK) {
            let at = (b * BLOCK - start) as usize;
            data[at..at + BLOCK as usize].fill(*fill);
        }
        data.iter().any(|b| *b != 0).then_some(data)
    }

    fn touched_chunks(&self) -> std::collections::BTreeSet<u64> {
        let per = u64::from(CHUNK_SIZE) / BLOCK;
        self.blocks.keys().map(|b| b / per).collect()
    }
}

#[derive(Debug, Clone, Copy)]
struct Write {
    offset: u64,
    len: u64,
    fill: u8,
}

async fn write(inst: &Instance, w: Write) {
    let cmd = if w.fill == 0 {
        format!("write -z {} {}", w.offset, w.len)
    } else {
        format!("write -P {} {} {}", w.fill, w.offset, w.len)
    };
    let out = inst
        .qmp(
            "human-monitor-command",
            json!({ "command-line": format!("qemu-io {} \"{cmd}\"", qemu::drive_id(VOLUME)) }),
        )
        .await
        .unwrap();
    assert_eq!(out, json!(""), "qemu-io {cmd}: {out}");
}

fn random_write(rng: &mut impl Rng, size: u64, fill: u8) -> Write {
    Write {
        offset: rng.gen_range(0..size / BLOCK) * BLOCK,
        len: BLOCK,
        // One write in eight zeroes its block.
        fill: if rng.gen_ratio(1, 8) { 0 } else { fill },
    }
}

async fn start_vm(dir: &Path, spec: &ApplianceSpec, image: &Path) -> Instance {
    qemu::launch(
        LaunchSpec {
            rack: "rack-a",
            spec,
            epoch: 1,
            volumes: vec![(VOLUME.into(), image.to_owned())],
            run_dir: dir.join("run"),
        },
        Accel::Tcg,
    )
    .await
    .unwrap()
}

/// What the supervisor does with a capture (`supervisor::effects`), on a
/// bare store: record it, tell the ledger. `None`: nothing captured.
async fn capture_and_record(
    store: &Arc<VolumeStore>,
    cap: &Capturer,
    dir: &Path,
) -> anyhow::Result<Option<(u64, CaptureKind)>> {
    let latest = store.latest(VOLUME)?.map(|m| m.generation);
    let Some(c) = cap.capture_since(VOLUME, dir, latest).await? else {
        return Ok(None);
    };
    let (st, source, kind) = (store.clone(), c.source.clone(), c.kind.clone());
    let recorded = tokio::task::spawn_blocking(move || match &kind {
        CaptureKind::Full => st
            .snapshot_changed(VOLUME, &source, 0, &[], &mut |_, _| {})
            .map_err(anyhow::Error::from),
        CaptureKind::Changed { base, ranges } => st
            .snapshot_changes_only(VOLUME, &source, *base, ranges, &mut |_, _| {})
            .map_err(anyhow::Error::from),
    })
    .await?;
    match recorded {
        Ok(r) => {
            cap.committed(VOLUME, r.manifest.generation);
            Ok(Some((r.manifest.generation, c.kind.clone())))
        }
        Err(e) => {
            cap.abandoned(VOLUME);
            Err(e)
        }
    }
}

/// Push generation `generation` of the owner's store to the replica's.
async fn replicate(owner: &Arc<VolumeStore>, replica: &Arc<VolumeStore>, generation: u64) {
    let m = owner.manifest(VOLUME, generation).unwrap().unwrap();
    use tokio_util::compat::TokioAsyncReadCompatExt as _;
    let (a, b) = tokio::io::duplex(1 << 20);
    let (a, b) = (a.compat(), b.compat());
    let limiter = LinkLimiter::new(0);
    let (out, inn) = (TransferCounters::default(), TransferCounters::default());
    let (sent, got) = tokio::join!(
        push::push(owner.clone(), "rack-a", m, a, &limiter, &out),
        push::serve(replica.clone(), "rack-a", b, &inn),
    );
    sent.unwrap();
    assert_eq!(got.unwrap().generation, generation);
}

/// The replica's generation equals the model, chunk by chunk, every chunk
/// read back (and verified) from the replica's store.
fn check_generation(replica: &VolumeStore, generation: u64, model: &Model, size: u64) {
    let m = replica
        .manifest(VOLUME, generation)
        .unwrap()
        .unwrap_or_else(|| panic!("generation {generation} is not on the replica"));
    assert_eq!(m.size, size);
    let touched = model.touched_chunks();
    for (i, entry) in m.chunks.iter().enumerate() {
        let i = i as u64;
        let want = if touched.contains(&i) {
            model.chunk(i, size)
        } else {
            None
        };
        match (entry, want) {
            (None, None) => {}
            (Some(id), Some(data)) => {
                assert_eq!(
                    *id,
                    ChunkId::of(&data),
                    "generation {generation}, chunk {i}"
                );
                let held = replica.chunks().read(id).unwrap();
                assert_eq!(held.as_deref(), Some(&data[..]), "chunk {i} on the replica");
            }
            (got, want) => panic!(
                "generation {generation}, chunk {i}: manifest has {}, the writes made it {}",
                if got.is_some() { "data" } else { "zeros" },
                if want.is_some() { "data" } else { "zeros" },
            ),
        }
    }
}

/// Whether a capture job of this VM is running now.
async fn job_running(inst: &Instance) -> bool {
    match inst.qmp("query-jobs", Value::Null).await {
        Ok(Value::Array(jobs)) => jobs.iter().any(|j| {
            j["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("capture-job"))
                && j["status"] == json!("running")
        }),
        _ => false,
    }
}

fn stores(dir: &Path, size: u64) -> (Arc<VolumeStore>, Arc<VolumeStore>, PathBuf) {
    let owner = Arc::new(VolumeStore::open(dir.join("owner")).unwrap());
    let replica = Arc::new(VolumeStore::open(dir.join("replica")).unwrap());
    owner.create(VOLUME, size).unwrap();
    let image = owner.image_path(VOLUME);
    (owner, replica, image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_vms_captures_restore_crash_consistent_images_on_the_replica() {
    if !qemu_present() {
        return;
    }
    let started = Instant::now();
    let seed: u64 = std::env::var("QEMU_CAPTURE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (QEMU_CAPTURE_SEED={seed} repeats this run)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let size = 4 * GIB;
    let dir = tempfile::tempdir().unwrap();
    let (owner, replica, image) = stores(dir.path(), size);
    let spec = vm_spec(size);
    let run = dir.path().join("run");
    let mut inst = start_vm(dir.path(), &spec, &image).await;
    let mut model = Model::default();
    let mut fill = 0u8;
    let mut next_fill = || {
        fill = fill % 254 + 1;
        fill
    };
    let (mut full, mut incremental, mut kills, mut restarts_checked) = (0, 0, 0, 0);
    let mut fresh_vm = true;
    let mut captures = 0;
    let mut round = 0;
    // Writes that landed while a capture job was copying.
    let mut during = 0;
    while captures < 20 {
        round += 1;
        assert!(round < 100, "20 captures never completed");
        for _ in 0..rng.gen_range(5..40) {
            let w = random_write(&mut rng, size, next_fill());
            write(&inst, w).await;
            model.apply(&w);
        }
        // Now and then a long run, so that a capture job runs long
        // enough for writes to land while QEMU copies.
        let long = rng.gen_ratio(1, 3).then(|| Write {
            offset: rng.gen_range(0..(size - 64 * (1 << 20)) / BLOCK) * BLOCK,
            len: 32 << 20,
            fill: next_fill(),
        });
        if let Some(w) = long {
            write(&inst, w).await;
            model.apply(&w);
        }
        let at_capture = model.clone();
        // A kill between captures: the writes so far are on the image
        // (QEMU wrote them to the file), the bitmap is gone.
        let kill_before = rng.gen_ratio(1, 8);
        // A kill at a random moment during the capture.
        let kill_during = !kill_before && rng.gen_ratio(1, 6);
        if kill_before {
            inst.kill();
            inst.wait().await;
            kills += 1;
            inst = start_vm(dir.path(), &spec, &image).await;
            fresh_vm = true;
        }
        let cap = inst.capturer().unwrap();
        let task = {
            let (owner, cap, run) = (owner.clone(), cap.clone(), run.clone());
            tokio::spawn(async move { capture_and_record(&owner, &cap, &run).await })
        };
        let mut after: Vec<Write> = Vec::new();
        if kill_during {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..60))).await;
            inst.kill();
            inst.wait().await;
            kills += 1;
        } else if let Some(long) = long {
            // Once the job runs (its point in time has passed), overwrite
            // blocks it may not have copied yet.
            let t = Instant::now();
            while !task.is_finished() && t.elapsed() < Duration::from_secs(5) {
                if job_running(&inst).await {
                    for k in 0..8u64 {
                        let w = Write {
                            offset: long.offset + k * (4 << 20),
                            len: BLOCK,
                            fill: next_fill(),
                        };
                        write(&inst, w).await;
                        after.push(w);
                    }
                    break;
                }
            }
        }
        let result = task.await.unwrap();
        eprintln!(
            "round {round}: long {:?}, kill before {kill_before}, during {kill_during}, {} writes during the copy: {:?}",
            long.map(|w| w.offset),
            after.len(),
            result.as_ref().map(|r| r.as_ref().map(|(g, k)| (*g, k.clone()))).map_err(|e| format!("{e:#}")),
        );
        during += after.len();
        for w in &after {
            model.apply(w);
        }
        match result {
            Ok(Some((generation, kind))) => {
                captures += 1;
                match kind {
                    CaptureKind::Full => full += 1,
                    CaptureKind::Changed { base, .. } => {
                        assert!(!fresh_vm, "a new QEMU's first capture must be a full pass");
                        assert_eq!(base, generation - 1);
                        incremental += 1;
                    }
                }
                if fresh_vm && kills > 0 {
                    restarts_checked += 1;
                }
                fresh_vm = false;
                replicate(&owner, &replica, generation).await;
                check_generation(&replica, generation, &at_capture, size);
            }
            Ok(None) => panic!("writes were made, yet nothing was captured"),
            Err(e) => {
                assert!(kill_during, "capture failed without a kill: {e:#}");
            }
        }
        if kill_during {
            inst = start_vm(dir.path(), &spec, &image).await;
            fresh_vm = true;
        }
    }
    // Quiet: what is left (writes made during the last copy; a full pass
    // if QEMU is new) is captured once, then there is nothing to capture.
    let cap = inst.capturer().unwrap();
    if let Some((generation, kind)) = capture_and_record(&owner, &cap, &run).await.unwrap() {
        assert!(fresh_vm || matches!(kind, CaptureKind::Changed { .. }));
        replicate(&owner, &replica, generation).await;
        check_generation(&replica, generation, &model, size);
    }
    assert!(capture_and_record(&owner, &cap, &run)
        .await
        .unwrap()
        .is_none());
    eprintln!(
        "{captures} captures ({full} full, {incremental} incremental), {kills} kills, \
         {restarts_checked} restarts captured, {during} writes during a copy, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        incremental >= 5,
        "too few incremental captures to mean anything"
    );
    let _ = inst.stop(Duration::from_secs(5)).await;
}

/// A QEMU restarted without a persistent bitmap (raw drives cannot keep
/// one) captures one full pass, whose image on the replica is the disk's,
/// and is incremental again after it.
/// The dirty bitmap across QEMU restarts on the same rack: a clean stop
/// saves it and the next QEMU captures incrementally on the same base; a
/// SIGKILLed QEMU, or an image written while no QEMU ran, leaves nothing
/// to trust and the next capture is one full pass. Every generation is
/// checked on the replica against the model, and the last one restores to
/// the disk itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_keeps_incremental_capture_and_a_kill_makes_one_full_pass() {
    if !qemu_present() {
        return;
    }
    let size = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let (owner, replica, image) = stores(dir.path(), size);
    let spec = vm_spec(size);
    let run = dir.path().join("run");
    let mut model = Model::default();
    let mut inst = start_vm(dir.path(), &spec, &image).await;
    let writes = |offsets: Range<u64>, fill: u8| {
        offsets.map(move |o| Write {
            offset: o * (1 << 20),
            len: BLOCK,
            fill,
        })
    };
    // Write, capture, replicate and check one generation; its kind.
    macro_rules! step {
        ($inst:expr, $cap:expr, $offsets:expr, $fill:expr) => {{
            for w in writes($offsets, $fill) {
                write(&$inst, w).await;
                model.apply(&w);
            }
            let (g, k) = capture_and_record(&owner, &$cap, &run)
                .await
                .unwrap()
                .unwrap();
            replicate(&owner, &replica, g).await;
            check_generation(&replica, g, &model, size);
            (g, k)
        }};
    }
    let cap = inst.capturer().unwrap();
    let (_, k) = step!(inst, cap, 0..8, 0x11);
    assert_eq!(k, CaptureKind::Full);
    let (g2, k) = step!(inst, cap, 4..12, 0x22);
    assert!(matches!(k, CaptureKind::Changed { .. }));

    // Written after the last capture, then a clean stop: the bitmap (and
    // these writes in it) is saved.
    for w in writes(30..33, 0x44) {
        write(&inst, w).await;
        model.apply(&w);
    }
    let _ = inst.stop(Duration::from_secs(10)).await;
    let mut inst = start_vm(dir.path(), &spec, &image).await;
    let cap = inst.capturer().unwrap();
    let (g3, k) = step!(inst, cap, 10..14, 0x33);
    match &k {
        CaptureKind::Changed { base, ranges } => {
            assert_eq!(
                *base, g2,
                "restored bitmap is clean against the last generation"
            );
            // The writes before the stop and after the start, no more.
            let copied: u64 = ranges.iter().map(|r| r.end - r.start).sum();
            assert_eq!(copied, 7 * u64::from(CHUNK_SIZE), "{ranges:?}");
        }
        other => panic!("a clean restart must keep incremental capture, got {other:?}"),
    }

    // SIGKILL: nothing was saved, the next capture is a full pass.
    inst.kill();
    let _ = inst.wait().await;
    let mut inst = start_vm(dir.path(), &spec, &image).await;
    let cap = inst.capturer().unwrap();
    let (g4, k) = step!(inst, cap, 40..42, 0x55);
    assert_eq!(k, CaptureKind::Full, "no bitmap to trust after a kill");
    let (_, k) = step!(inst, cap, 20..22, 0);
    assert!(matches!(k, CaptureKind::Changed { base, .. } if base == g4));

    // A clean stop, then the image written while no QEMU runs (a restore,
    // a tool): the saved bitmap does not cover that write; full pass.
    let _ = inst.stop(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    {
        use std::os::unix::fs::FileExt;
        let w = Write {
            offset: 50 << 20,
            len: BLOCK,
            fill: 0x66,
        };
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all_at(&[w.fill; BLOCK as usize], w.offset).unwrap();
        model.apply(&w);
    }
    let inst = start_vm(dir.path(), &spec, &image).await;
    let cap = inst.capturer().unwrap();
    let (g6, k) = step!(inst, cap, 60..61, 0x77);
    assert_eq!(
        k,
        CaptureKind::Full,
        "the image changed while QEMU was down"
    );
    assert!(g6 > g3);
    // The replica's newest generation restores to the disk itself.
    let out = dir.path().join("restored.img");
    replica
        .export(VOLUME, Some(g6), &out, &mut |_, _| {})
        .unwrap();
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&image).unwrap(),
        "restored image differs from the disk"
    );
}
