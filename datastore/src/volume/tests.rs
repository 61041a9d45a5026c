use super::*;
use proptest::prelude::*;
use rand::{Rng, RngCore, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicU32};

const CS: usize = CHUNK_SIZE as usize;

fn open(dir: &Path) -> VolumeStore {
    VolumeStore::open(dir).unwrap()
}

/// A random image: per chunk, zero with probability `zeros`, a copy of an
/// earlier chunk with probability 0.1, partly zero with 0.1, else random.
fn random_image(len: usize, seed: u64, zeros: f64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    let n = len.div_ceil(CS);
    for i in 0..n {
        let (s, e) = (i * CS, ((i + 1) * CS).min(len));
        let roll: f64 = rng.gen();
        if roll < zeros {
            continue;
        } else if roll < zeros + 0.1 && i > 0 {
            let j = rng.gen_range(0..i);
            let src = v[j * CS..(j * CS + (e - s)).min(len)].to_vec();
            v[s..s + src.len()].copy_from_slice(&src);
        } else if roll < zeros + 0.2 {
            let half = s + (e - s) / 2;
            rng.fill_bytes(&mut v[half..e]);
        } else {
            rng.fill_bytes(&mut v[s..e]);
        }
    }
    v
}

fn export_bytes(s: &VolumeStore, name: &str, generation: Option<u64>, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("export-{name}-{generation:?}.img"));
    s.export(name, generation, &out, &mut |_, _| {}).unwrap();
    std::fs::read(out).unwrap()
}

fn write_image(s: &VolumeStore, name: &str, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(s.image_path(name))
        .unwrap();
    f.write_all_at(data, 0).unwrap();
}

fn distinct_nonzero_chunks(data: &[u8]) -> HashSet<ChunkId> {
    data.chunks(CS)
        .filter(|c| !crate::is_zero(c))
        .map(ChunkId::of)
        .collect()
}

#[test]
fn create_makes_a_sparse_owned_volume() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let info = s.create("web-01", 64 << 20).unwrap();
    assert_eq!(info.generation, 0);
    let meta = std::fs::metadata(s.image_path("web-01")).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert_eq!(meta.blocks(), 0, "the image is sparse");
    assert!(matches!(
        s.create("web-01", 4096),
        Err(CreateError::AlreadyExists(_))
    ));
    assert!(matches!(
        s.create("Bad", 4096),
        Err(CreateError::Store(StoreError::Name(_)))
    ));
    assert!(matches!(
        s.create("odd", 1000),
        Err(CreateError::InvalidSize(1000))
    ));
    assert!(matches!(
        s.create("zero", 0),
        Err(CreateError::InvalidSize(0))
    ));
    assert!(s.owns("web-01").unwrap());
    assert!(!s.owns("other").unwrap());
    assert_eq!(
        s.list().unwrap(),
        vec![VolumeInfo {
            name: "web-01".into(),
            size: 64 << 20,
            generation: 0,
            has_live_image: true,
            generations_held: vec![]
        }]
    );
    assert!(s.latest("web-01").unwrap().is_none());
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.info("web-01").unwrap().size, 64 << 20);
}

#[test]
fn snapshots_export_bit_identical_for_every_generation_held() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let size = 3 * 1024 * 1024 + 5 * 4096; // not a whole number of chunks
    s.create("vm", size as u64).unwrap();
    let mut versions = Vec::new();
    let mut data = random_image(size, 1, 0.3);
    for g in 1..=4u64 {
        write_image(&s, "vm", &data);
        let mut last = (0, 0);
        let m = s
            .snapshot("vm", &NoPause, &mut |d, t| last = (d, t))
            .unwrap();
        assert_eq!(last, (size as u64, size as u64));
        assert_eq!(m.generation, g);
        assert_eq!(m.chunks.len(), size.div_ceil(CS));
        for (i, c) in data.chunks(CS).enumerate() {
            assert_eq!(m.chunks[i].is_none(), crate::is_zero(c), "chunk {i}");
        }
        versions.push(data.clone());
        // Change a few scattered 4 KiB blocks for the next generation.
        let mut rng = rand::rngs::StdRng::seed_from_u64(g);
        for _ in 0..10 {
            let b = rng.gen_range(0..size / 4096);
            rng.fill_bytes(&mut data[b * 4096..(b + 1) * 4096]);
        }
    }
    for (g, v) in versions.iter().enumerate() {
        assert_eq!(
            &export_bytes(&s, "vm", Some(g as u64 + 1), dir.path()),
            v,
            "generation {}",
            g + 1
        );
    }
    assert_eq!(
        &export_bytes(&s, "vm", None, dir.path()),
        versions.last().unwrap()
    );
    // Zero chunks are never stored; identical chunks once.
    let all: HashSet<ChunkId> = versions
        .iter()
        .flat_map(|v| distinct_nonzero_chunks(v))
        .collect();
    assert_eq!(s.chunks().stats().unwrap().chunks, all.len() as u64);
    // Exports are sparse where chunks are zero.
    let out = dir.path().join("sparse.img");
    s.create("thin", 64 << 20).unwrap();
    write_image(&s, "thin", &[5u8; 100]);
    s.snapshot("thin", &NoPause, &mut |_, _| {}).unwrap();
    s.export("thin", None, &out, &mut |_, _| {}).unwrap();
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(
        meta.blocks() * 512 <= 2 * CS as u64,
        "export is sparse: {} blocks",
        meta.blocks()
    );
    // Everything survives a reopen.
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.info("vm").unwrap().generations_held, vec![1, 2, 3, 4]);
    assert_eq!(&export_bytes(&s, "vm", Some(2), dir.path()), &versions[1]);
    assert!(matches!(
        s.export("vm", Some(9), &dir.path().join("x"), &mut |_, _| {}),
        Err(ExportError::NoSuchGeneration { generation: 9, .. })
    ));
}

#[test]
fn ten_clones_of_a_base_cost_about_one_base() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let base = random_image(4 << 20, 7, 0.2);
    let base_chunks = distinct_nonzero_chunks(&base);
    for i in 0..10u8 {
        let mut d = base.clone();
        // A small difference per clone (its hostname, say).
        d[usize::from(i) * 300_000 + 17] ^= 0xa5;
        let src = dir.path().join(format!("clone-{i}.raw"));
        std::fs::write(&src, &d).unwrap();
        s.import(&format!("clone-{i}"), &src, &mut |_, _| {})
            .unwrap();
        assert_eq!(export_bytes(&s, &format!("clone-{i}"), None, dir.path()), d);
    }
    let st = s.chunks().stats().unwrap();
    let base_bytes: u64 = base_chunks.len() as u64 * CS as u64;
    // One base plus one changed chunk per clone.
    assert!(st.chunks <= base_chunks.len() as u64 + 10, "{st:?}");
    assert!(
        st.payload_bytes <= base_bytes + 10 * CS as u64,
        "{st:?} vs base {base_bytes}"
    );
    assert!(
        st.dedup_hits >= 9 * (base_chunks.len() as u64 - 1),
        "{st:?}"
    );
}

#[test]
fn zero_chunks_are_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut data = vec![0u8; 8 << 20];
    data[3 * CS + 9] = 1;
    let src = dir.path().join("mostly-zero.raw");
    std::fs::write(&src, &data).unwrap();
    let m = s.import("z", &src, &mut |_, _| {}).unwrap();
    assert_eq!(m.chunks.iter().flatten().count(), 1);
    assert_eq!(s.chunks().stats().unwrap().chunks, 1);
    assert_eq!(s.chunks().stats().unwrap().payload_bytes, CS as u64);
    assert_eq!(export_bytes(&s, "z", None, dir.path()), data);
}

#[test]
fn publish_needs_every_chunk_and_a_newer_generation() {
    let dir = tempfile::tempdir().unwrap();
    let owner = open(&dir.path().join("a"));
    let replica = open(&dir.path().join("b"));
    let data = random_image(1 << 20, 3, 0.25);
    let src = dir.path().join("img.raw");
    std::fs::write(&src, &data).unwrap();
    let m = owner.import("vol", &src, &mut |_, _| {}).unwrap();
    let ids: Vec<ChunkId> = m.referenced().into_iter().collect();
    assert!(ids.len() > 3);
    // Copy all but three chunks.
    for id in &ids[3..] {
        let bytes = owner.chunks().read(id).unwrap().unwrap();
        replica.chunks().insert_verified(id, &bytes).unwrap();
    }
    assert!(matches!(
        replica.publish(m.clone()),
        Err(PublishError::MissingChunks(3))
    ));
    assert!(replica.latest("vol").unwrap().is_none());
    assert!(replica.list().unwrap().is_empty());
    for id in &ids[..3] {
        let bytes = owner.chunks().read(id).unwrap().unwrap();
        replica.chunks().insert_verified(id, &bytes).unwrap();
    }
    replica.publish(m.clone()).unwrap();
    replica.publish(m.clone()).unwrap(); // idempotent
    let info = replica.info("vol").unwrap();
    assert!(!info.has_live_image);
    assert_eq!(info.generations_held, vec![1]);
    assert_eq!(export_bytes(&replica, "vol", None, dir.path()), data);
    // Same generation, different content: refused.
    let mut other = m.clone();
    other.created_at_ms += 1;
    assert!(matches!(
        replica.publish(other),
        Err(PublishError::Stale {
            held: 1,
            offered: 1,
            ..
        })
    ));
    // An owner takes no manifests from elsewhere.
    let mut next = m.clone();
    next.generation = 2;
    assert!(matches!(
        owner.publish(next.clone()),
        Err(PublishError::Owned(_))
    ));
    replica.publish(next).unwrap();
    let mut old = m;
    old.generation = 1;
    old.created_at_ms += 5;
    assert!(matches!(
        replica.publish(old),
        Err(PublishError::Stale {
            held: 2,
            offered: 1,
            ..
        })
    ));
    // Replicas do not import.
    assert!(matches!(
        replica.import("vol", &src, &mut |_, _| {}),
        Err(ImportError::NotOwner(_))
    ));
    // Durable across reopen.
    drop(replica);
    let replica = open(&dir.path().join("b"));
    assert_eq!(replica.info("vol").unwrap().generations_held, vec![1, 2]);
}

#[test]
fn import_writes_the_next_generation_and_never_shrinks() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let v1 = random_image(1 << 20, 11, 0.3);
    let src = dir.path().join("v1.raw");
    std::fs::write(&src, &v1).unwrap();
    assert_eq!(s.import("vol", &src, &mut |_, _| {}).unwrap().generation, 1);
    assert_eq!(
        std::fs::read(s.image_path("vol")).unwrap(),
        v1,
        "the live image is the import"
    );
    let v2 = random_image(2 << 20, 12, 0.3);
    let src2 = dir.path().join("v2.raw");
    std::fs::write(&src2, &v2).unwrap();
    let m2 = s.import("vol", &src2, &mut |_, _| {}).unwrap();
    assert_eq!((m2.generation, m2.size), (2, 2 << 20));
    assert!(matches!(
        s.import("vol", &src, &mut |_, _| {}),
        Err(ImportError::Shrink { .. })
    ));
    assert_eq!(export_bytes(&s, "vol", Some(1), dir.path()), v1);
    assert_eq!(export_bytes(&s, "vol", Some(2), dir.path()), v2);
    // A snapshot continues from the imported image.
    let m3 = s.snapshot("vol", &NoPause, &mut |_, _| {}).unwrap();
    assert_eq!(m3.generation, 3);
    assert_eq!(m3.chunks, m2.chunks);
    let empty = dir.path().join("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        s.import("new", &empty, &mut |_, _| {}),
        Err(ImportError::InvalidSize(0))
    ));
}

#[test]
fn qcow2_images_are_converted() {
    if std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("qemu-img not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let data = random_image(3 << 20, 21, 0.4);
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &data).unwrap();
    let qcow = dir.path().join("src.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(&std::fs::read(&qcow).unwrap()[..4], b"QFI\xfb");
    let m = s.import("q", &qcow, &mut |_, _| {}).unwrap();
    assert_eq!(m.size, data.len() as u64);
    assert_eq!(export_bytes(&s, "q", None, dir.path()), data);
    // A damaged qcow2 is reported, not imported.
    let bad = dir.path().join("bad.qcow2");
    // (version 3, no backing file, no external data file: the header
    // checks pass and qemu-img itself must refuse the zero cluster size)
    let mut damaged = b"QFI\xfb\0\0\0\x03".to_vec();
    damaged.resize(128, 0);
    std::fs::write(&bad, &damaged).unwrap();
    assert!(matches!(
        s.import("bad", &bad, &mut |_, _| {}),
        Err(ImportError::QemuImg { .. })
    ));
    assert!(s.list().unwrap().iter().all(|v| v.name != "bad"));
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0,
        "no temp files left"
    );
}

#[test]
fn promote_makes_a_replica_the_owner() {
    let dir = tempfile::tempdir().unwrap();
    let owner = open(&dir.path().join("a"));
    let replica = open(&dir.path().join("b"));
    let data = random_image(1 << 20, 5, 0.3);
    let src = dir.path().join("img.raw");
    std::fs::write(&src, &data).unwrap();
    let m = owner.import("vol", &src, &mut |_, _| {}).unwrap();
    for id in m.referenced() {
        replica
            .chunks()
            .insert_verified(&id, &owner.chunks().read(&id).unwrap().unwrap())
            .unwrap();
    }
    assert!(matches!(
        replica.snapshot("vol", &NoPause, &mut |_, _| {}),
        Err(SnapshotError::Store(StoreError::NotFound(_)))
    ));
    replica.publish(m).unwrap();
    assert!(matches!(
        replica.snapshot("vol", &NoPause, &mut |_, _| {}),
        Err(SnapshotError::NoLiveImage(_))
    ));
    replica.promote("vol", &mut |_, _| {}).unwrap();
    assert!(replica.owns("vol").unwrap());
    assert_eq!(std::fs::read(replica.image_path("vol")).unwrap(), data);
    assert!(matches!(
        replica.promote("vol", &mut |_, _| {}),
        Err(PromoteError::AlreadyOwner(_))
    ));
    assert_eq!(
        replica
            .snapshot("vol", &NoPause, &mut |_, _| {})
            .unwrap()
            .generation,
        2
    );
}

#[test]
fn prune_keeps_the_last_generations_and_collects_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open_with(
        dir.path(),
        VolumeStoreOptions {
            chunks: ChunkStoreOptions {
                pack_target: 1 << 20,
                ..ChunkStoreOptions::default()
            },
            reflink: None,
        },
    )
    .unwrap();
    s.create("vol", 2 << 20).unwrap();
    let mut versions = Vec::new();
    for g in 0..5u64 {
        let d = random_image(2 << 20, 100 + g, 0.2);
        write_image(&s, "vol", &d);
        s.snapshot("vol", &NoPause, &mut |_, _| {}).unwrap();
        versions.push(d);
    }
    let before = s.chunks().stats().unwrap();
    assert!(matches!(s.prune(0), Err(PruneError::KeepZero)));
    let r = s.prune(2).unwrap();
    assert_eq!(r.manifests_dropped, 3);
    assert!(r.gc.removed_chunks > 0);
    assert_eq!(s.info("vol").unwrap().generations_held, vec![4, 5]);
    let live: HashSet<ChunkId> = versions[3..]
        .iter()
        .flat_map(|v| distinct_nonzero_chunks(v))
        .collect();
    let after = s.chunks().stats().unwrap();
    assert_eq!(after.chunks, live.len() as u64);
    assert!(
        after.disk_bytes < before.disk_bytes,
        "{before:?} -> {after:?}"
    );
    assert_eq!(export_bytes(&s, "vol", Some(4), dir.path()), versions[3]);
    assert_eq!(export_bytes(&s, "vol", Some(5), dir.path()), versions[4]);
    // A staged manifest's chunks survive prune.
    let staged = Manifest {
        volume: "incoming".into(),
        generation: 1,
        size: CS as u64,
        chunk_size: CHUNK_SIZE,
        chunks: vec![Some(ChunkId::of(b"x"))],
        created_at_ms: 0,
    };
    let (id, _) = s.chunks().insert(b"x").unwrap();
    s.stage(&staged).unwrap();
    s.prune(2).unwrap();
    assert!(s.chunks().contains(&id).unwrap());
    s.unstage("incoming").unwrap();
    s.prune(2).unwrap();
    assert!(!s.chunks().contains(&id).unwrap());
    // delete forgets the volume; prune then frees its chunks.
    s.delete("vol").unwrap();
    assert!(!s.image_path("vol").exists());
    assert!(matches!(s.delete("vol"), Err(StoreError::NotFound(_))));
    s.prune(DEFAULT_KEEP).unwrap();
    assert_eq!(s.chunks().stats().unwrap().chunks, 0);
}

#[test]
fn scrub_finds_damage_that_replication_must_repair() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let data = random_image(1 << 20, 9, 0.0);
    let src = dir.path().join("img.raw");
    std::fs::write(&src, &data).unwrap();
    let m = s.import("vol", &src, &mut |_, _| {}).unwrap();
    let victim = m.chunks[4].unwrap();
    let (path, off) = s.chunks().location(&victim).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.write_all_at(b"X", off + 1234).unwrap();
    let r = s.scrub(&mut |_, _| {}).unwrap();
    assert_eq!(r.corrupt, vec![victim]);
    assert_eq!(s.missing_chunks(Some("vol")).unwrap(), vec![victim]);
    assert!(matches!(
        s.export("vol", None, &dir.path().join("out"), &mut |_, _| {}),
        Err(ExportError::Materialise(MaterialiseError::MissingChunk(id))) if id == victim
    ));
    assert!(!dir.path().join("out").exists());
    s.chunks()
        .insert_verified(&victim, &data[4 * CS..5 * CS])
        .unwrap();
    assert_eq!(export_bytes(&s, "vol", None, dir.path()), data);
}

/// A stand-in appliance: a thread writing random 4 KiB blocks to the image
/// as fast as it can, frozen by the pause hooks. The hook records the image
/// exactly as it was while frozen.
struct BusyWriter {
    path: PathBuf,
    paused: AtomicBool,
    idle: AtomicBool,
    stop: AtomicBool,
    pauses: AtomicU32,
    resumes: AtomicU32,
    frozen: Mutex<Option<Vec<u8>>>,
}

impl PauseHooks for BusyWriter {
    fn pause(&self) -> io::Result<()> {
        self.paused.store(true, Ordering::SeqCst);
        while !self.idle.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        self.pauses.fetch_add(1, Ordering::SeqCst);
        *lock(&self.frozen) = Some(std::fs::read(&self.path)?);
        Ok(())
    }
    fn resume(&self) {
        self.resumes.fetch_add(1, Ordering::SeqCst);
        self.paused.store(false, Ordering::SeqCst);
    }
}

fn run_writer(w: &BusyWriter, size: usize, seed: u64) {
    let f = OpenOptions::new().write(true).open(&w.path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut block = [0u8; 4096];
    while !w.stop.load(Ordering::SeqCst) {
        if w.paused.load(Ordering::SeqCst) {
            w.idle.store(true, Ordering::SeqCst);
            while w.paused.load(Ordering::SeqCst) && !w.stop.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            w.idle.store(false, Ordering::SeqCst);
            continue;
        }
        rng.fill_bytes(&mut block);
        let b = rng.gen_range(0..size / 4096);
        f.write_all_at(&block, (b * 4096) as u64).unwrap();
    }
}

#[test]
fn snapshots_of_a_busy_image_are_points_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let size = 4 << 20;
    s.create("busy", size as u64).unwrap();
    write_image(&s, "busy", &random_image(size, 1, 0.5));
    let w = BusyWriter {
        path: s.image_path("busy"),
        paused: AtomicBool::new(false),
        idle: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        pauses: AtomicU32::new(0),
        resumes: AtomicU32::new(0),
        frozen: Mutex::new(None),
    };
    std::thread::scope(|sc| {
        sc.spawn(|| run_writer(&w, size, 2));
        for g in 1..=3u64 {
            let r = s.snapshot_report("busy", &w, &mut |_, _| {}).unwrap();
            assert_eq!(r.manifest.generation, g);
            if !s.reflink_supported() {
                assert_eq!(r.method, CaptureMethod::PrecopyRescan);
            }
            let frozen = lock(&w.frozen).take().unwrap();
            assert!(
                export_bytes(&s, "busy", Some(g), dir.path()) == frozen,
                "generation {g} is not the paused image"
            );
        }
        w.stop.store(true, Ordering::SeqCst);
    });
    assert_eq!(w.pauses.load(Ordering::SeqCst), 3);
    assert_eq!(w.resumes.load(Ordering::SeqCst), 3);
}

#[test]
fn an_idle_image_needs_only_a_stat_while_paused() {
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open_with(
        dir.path(),
        VolumeStoreOptions {
            reflink: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    s.create("idle", 2 << 20).unwrap();
    write_image(&s, "idle", &random_image(2 << 20, 4, 0.1));
    let r = s.snapshot_report("idle", &NoPause, &mut |_, _| {}).unwrap();
    assert_eq!(r.method, CaptureMethod::PrecopyUnchanged);
    assert!(r.pause < Duration::from_millis(50), "{:?}", r.pause);
    let again = s.snapshot_report("idle", &NoPause, &mut |_, _| {}).unwrap();
    assert_eq!(again.new_chunks, 0, "unchanged chunks are deduplicated");
    assert_eq!(again.manifest.chunks, r.manifest.chunks);
}

struct FailingPause(AtomicU32);

impl PauseHooks for FailingPause {
    fn pause(&self) -> io::Result<()> {
        Err(io::Error::other("cannot stop the appliance"))
    }
    fn resume(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_failed_pause_resumes_and_keeps_the_old_generation() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.create("v", 1 << 20).unwrap();
    write_image(&s, "v", &[1u8; 1000]);
    s.snapshot("v", &NoPause, &mut |_, _| {}).unwrap();
    let hooks = FailingPause(AtomicU32::new(0));
    assert!(matches!(
        s.snapshot("v", &hooks, &mut |_, _| {}),
        Err(SnapshotError::Pause(_))
    ));
    assert_eq!(hooks.0.load(Ordering::SeqCst), 1);
    assert_eq!(s.info("v").unwrap().generation, 1);
}

/// Runs `f` in a directory on a reflink filesystem: `DATASTORE_TEST_REFLINK_DIR`
/// (btrfs, or XFS with reflink=1) if set, else a small XFS image file
/// loop-mounted in a temp dir (needs root and xfsprogs); skips otherwise.
fn with_reflink_dir(f: impl FnOnce(&Path)) {
    if let Some(base) = std::env::var_os("DATASTORE_TEST_REFLINK_DIR") {
        let dir = tempfile::tempdir_in(base).unwrap();
        return f(dir.path());
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("xfs.img");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // 300 MiB: the smallest XFS mkfs.xfs makes; sparse, a few MiB on disk.
    File::create(&img).unwrap().set_len(300 << 20).unwrap();
    let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
        std::process::Command::new(cmd)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let made = run(
        "mkfs.xfs",
        &[
            "-q".as_ref(),
            "-m".as_ref(),
            "reflink=1".as_ref(),
            img.as_os_str(),
        ],
    );
    if !made
        || !run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                img.as_os_str(),
                mnt.as_os_str(),
            ],
        )
    {
        eprintln!("no DATASTORE_TEST_REFLINK_DIR and cannot loop-mount an XFS image (root, xfsprogs); skipping");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _u = Unmount(&mnt);
    f(&mnt);
}

/// Reflink capture, on a reflink filesystem ([`with_reflink_dir`]): every
/// generation under a busy writer is the image as it was paused.
#[test]
fn reflink_snapshots_when_supported() {
    with_reflink_dir(|base| {
        let dir = tempfile::tempdir_in(base).unwrap();
        let s = open(dir.path());
        assert!(s.reflink_supported());
        let size = 4 << 20;
        s.create("r", size as u64).unwrap();
        write_image(&s, "r", &random_image(size, 8, 0.3));
        let w = BusyWriter {
            path: s.image_path("r"),
            paused: AtomicBool::new(false),
            idle: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            pauses: AtomicU32::new(0),
            resumes: AtomicU32::new(0),
            frozen: Mutex::new(None),
        };
        std::thread::scope(|sc| {
            sc.spawn(|| run_writer(&w, size, 3));
            for g in 1..=3u64 {
                let r = s.snapshot_report("r", &w, &mut |_, _| {}).unwrap();
                assert_eq!(r.method, CaptureMethod::Reflink);
                let frozen = lock(&w.frozen).take().unwrap();
                assert!(export_bytes(&s, "r", Some(g), dir.path()) == frozen);
            }
            w.stop.store(true, Ordering::SeqCst);
        });
    });
}

/// An appliance that writes between the clone made before the pause and
/// the pause itself: its last writes (a rewrite, new data in a hole, a
/// punched hole) happen as the pause begins. The generation must hold
/// them, on top of the incremental base, and the kept clone must serve
/// the next snapshot.
struct LateWriter {
    path: PathBuf,
    round: AtomicU32,
    frozen: Mutex<Option<Vec<u8>>>,
}

impl PauseHooks for LateWriter {
    fn pause(&self) -> io::Result<()> {
        let round = u64::from(self.round.fetch_add(1, Ordering::SeqCst));
        let f = OpenOptions::new().write(true).open(&self.path)?;
        f.write_all_at(&[0xA0 + round as u8; 4096], 4096 * (3 + round))?;
        f.write_all_at(&[0x55; 8192], (6 << 20) + 4096 * round)?;
        rustix::fs::fallocate(
            &f,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            (CS as u64) * (20 + round),
            CS as u64,
        )?;
        *lock(&self.frozen) = Some(std::fs::read(&self.path)?);
        Ok(())
    }
    fn resume(&self) {}
}

#[test]
fn reflink_snapshots_hold_the_writes_made_as_the_pause_begins() {
    with_reflink_dir(|base| {
        let dir = tempfile::tempdir_in(base).unwrap();
        let s = open(dir.path());
        let size = 8 << 20;
        s.create("late", size as u64).unwrap();
        write_image(&s, "late", &random_image(4 << 20, 21, 0.2));
        let w = LateWriter {
            path: s.image_path("late"),
            round: AtomicU32::new(0),
            frozen: Mutex::new(None),
        };
        for g in 1..=3u64 {
            let r = s.snapshot_report("late", &w, &mut |_, _| {}).unwrap();
            assert_eq!(r.method, CaptureMethod::Reflink);
            assert_eq!(r.base, (g > 1).then(|| g - 1), "generation {g}");
            let frozen = lock(&w.frozen).take().unwrap();
            assert!(
                export_bytes(&s, "late", Some(g), dir.path()) == frozen,
                "generation {g} differs from the image as paused"
            );
        }
    });
}

/// Runs `f` with a tmpfs of `mib` MiB mounted at a temp dir, or skips when
/// mounting is not allowed (not root, no CAP_SYS_ADMIN).
fn with_tmpfs(mib: u32, f: impl FnOnce(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("cannot mount a tmpfs here; skipping the disk-full test");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _u = Unmount(dir.path());
    f(dir.path());
}

#[test]
fn disk_full_is_an_error_and_loses_nothing_synced() {
    with_tmpfs(32, |mnt| {
        let out = tempfile::tempdir().unwrap();
        let root = mnt.join("store");
        let filler = mnt.join("filler");
        let first = random_image(8 << 20, 31, 0.0);
        let second = random_image(8 << 20, 32, 0.0);
        {
            let s = open(&root);
            s.create("vol", 8 << 20).unwrap();
            write_image(&s, "vol", &first);
            s.snapshot("vol", &NoPause, &mut |_, _| {}).unwrap();
            // Leave 2 MiB free: the next snapshot needs ~7 MiB of new chunks.
            let st = rustix::fs::statvfs(mnt).unwrap();
            let free = st.f_bavail * st.f_frsize;
            std::fs::write(
                &filler,
                vec![1u8; usize::try_from(free - (2 << 20)).unwrap()],
            )
            .unwrap();
            write_image(&s, "vol", &second);
            let e = s.snapshot("vol", &NoPause, &mut |_, _| {}).unwrap_err();
            assert!(e.is_disk_full(), "{e:?}");
            assert_eq!(s.info("vol").unwrap().generation, 1);
            assert_eq!(export_bytes(&s, "vol", Some(1), out.path()), first);
            // Still full: a retry fails the same way and breaks nothing.
            assert!(s.snapshot("vol", &NoPause, &mut |_, _| {}).is_err());
            assert_eq!(export_bytes(&s, "vol", Some(1), out.path()), first);
        }
        // Opening needs a little space (sled writes as it recovers): on a
        // full disk it fails, saying so.
        if let Err(e) = VolumeStore::open(&root) {
            assert!(e.is_disk_full(), "{e:?}");
        }
        // With space freed it opens (the unsynced tail of the pack is
        // truncated), everything synced is there, and snapshots work again.
        std::fs::remove_file(&filler).unwrap();
        let s = open(&root);
        assert_eq!(s.info("vol").unwrap().generations_held, vec![1]);
        assert_eq!(export_bytes(&s, "vol", Some(1), out.path()), first);
        assert_eq!(
            s.snapshot("vol", &NoPause, &mut |_, _| {})
                .unwrap()
                .generation,
            2
        );
        assert_eq!(export_bytes(&s, "vol", Some(2), out.path()), second);
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random images with zero regions, partial chunks and repeats chunk,
    /// dedup and export bit-identically; zero chunks are never stored.
    #[test]
    fn random_images_round_trip(seed in any::<u64>(), chunks in 1usize..40, tail in 0usize..CS, zeros in 0.0f64..0.9) {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        // Whole sectors: imports refuse anything else.
        let len = (chunks - 1) * CS + tail.max(1).div_ceil(512) * 512;
        let data = random_image(len, seed, zeros);
        let src = dir.path().join("img.raw");
        std::fs::write(&src, &data).unwrap();
        let m = s.import("p", &src, &mut |_, _| {}).unwrap();
        prop_assert_eq!(m.size, len as u64);
        let distinct = distinct_nonzero_chunks(&data);
        prop_assert_eq!(m.referenced(), distinct.clone());
        prop_assert_eq!(s.chunks().stats().unwrap().chunks, distinct.len() as u64);
        prop_assert!(export_bytes(&s, "p", None, dir.path()) == data);
    }
}

/// Runs `f` on a thread and fails the test if it does not return within
/// `secs` (an `open` that blocks on a FIFO would hang forever).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not return within {secs} s"))
}

#[test]
fn imports_read_regular_files_only_and_refuse_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(open(&dir.path().join("store")));
    let good = dir.path().join("good.raw");
    std::fs::write(&good, random_image(1 << 20, 3, 0.2)).unwrap();

    // A FIFO nobody writes to: refused at once, never opened for reading
    // in a way that blocks.
    let fifo = dir.path().join("fifo");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
    let (s2, f2) = (s.clone(), fifo.clone());
    let r = within(5, "import from a FIFO", move || {
        s2.import("v", &f2, &mut |_, _| {}).map(|_| ())
    });
    assert!(
        matches!(
            r,
            Err(ImportError::Source(SourceError::NotRegular {
                kind: "a FIFO",
                ..
            }))
        ),
        "{r:?}"
    );
    assert!(r.unwrap_err().to_string().contains("not a regular file"));

    // A symlink to a good image, a relative path, a directory, a device,
    // a size that is not whole sectors.
    let link = dir.path().join("link.raw");
    std::os::unix::fs::symlink(&good, &link).unwrap();
    assert!(matches!(
        s.import("v", &link, &mut |_, _| {}),
        Err(ImportError::Source(SourceError::Symlink(_)))
    ));
    assert!(matches!(
        s.import("v", Path::new("good.raw"), &mut |_, _| {}),
        Err(ImportError::Source(SourceError::Relative(_)))
    ));
    assert!(matches!(
        s.import("v", dir.path(), &mut |_, _| {}),
        Err(ImportError::Source(SourceError::NotRegular {
            kind: "a directory",
            ..
        }))
    ));
    assert!(matches!(
        s.import("v", Path::new("/dev/null"), &mut |_, _| {}),
        Err(ImportError::Source(SourceError::NotRegular {
            kind: "a character device",
            ..
        }))
    ));
    let odd = dir.path().join("odd.raw");
    std::fs::write(&odd, vec![1u8; 1000]).unwrap();
    let e = s.import("v", &odd, &mut |_, _| {}).unwrap_err();
    assert!(
        matches!(
            e,
            ImportError::Source(SourceError::Unaligned { size: 1000, .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("not a multiple of 512"), "{e}");
    assert!(s.list().unwrap().is_empty(), "nothing was created");
    s.import("v", &good, &mut |_, _| {}).unwrap();
}

#[test]
fn the_import_directories_are_where_the_opened_file_really_is() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("import");
    let outside = dir.path().join("elsewhere");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let inside_file = allowed.join("a.raw");
    std::fs::write(&inside_file, vec![0u8; 4096]).unwrap();
    let secret = outside.join("secret.raw");
    std::fs::write(&secret, vec![7u8; 4096]).unwrap();
    let dirs = [allowed.clone()];
    assert!(ImportSource::open(&inside_file, Some(&dirs[..])).is_ok());
    let e = ImportSource::open(&secret, Some(&dirs[..])).unwrap_err();
    assert!(matches!(e, SourceError::NotAllowed { .. }), "{e}");
    assert!(e.to_string().contains("[volumes] import_dirs"), "{e}");
    // A directory symlink inside the allowed one, pointing out of it.
    std::os::unix::fs::symlink(&outside, allowed.join("sneaky")).unwrap();
    let e = ImportSource::open(&allowed.join("sneaky/secret.raw"), Some(&dirs[..])).unwrap_err();
    assert!(matches!(e, SourceError::NotAllowed { .. }), "{e}");
    // `..` out of it.
    let e =
        ImportSource::open(&allowed.join("../elsewhere/secret.raw"), Some(&dirs[..])).unwrap_err();
    assert!(matches!(e, SourceError::NotAllowed { .. }), "{e}");
}

#[test]
fn a_slow_import_blocks_neither_other_volumes_snapshots_nor_prune() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(open(&dir.path().join("store")));
    s.create("other", 1 << 20).unwrap();
    write_image(&s, "other", &random_image(1 << 20, 5, 0.2));
    let src = dir.path().join("big.raw");
    std::fs::write(&src, random_image(16 << 20, 6, 0.2)).unwrap();
    // The import stops in its progress callback (locks held) until told.
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (s2, src2) = (s.clone(), src.clone());
    let importer = std::thread::spawn(move || {
        let mut first = true;
        s2.import("slow", &src2, &mut |_, _| {
            if std::mem::take(&mut first) {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
            }
        })
    });
    started_rx.recv().unwrap();
    // Another volume snapshots normally.
    let s3 = s.clone();
    let m = within(10, "a snapshot of another volume", move || {
        s3.snapshot("other", &NoPause, &mut |_, _| {})
    })
    .unwrap();
    assert_eq!(m.generation, 1);
    // Prune does not queue behind the import (a queued writer would block
    // every later snapshot): it gives up for this round.
    let s4 = s.clone();
    within(10, "prune", move || {
        assert!(matches!(s4.prune(DEFAULT_KEEP), Err(PruneError::Busy)));
    });
    // Snapshots still go on while prune gave up (it never queued).
    let s5 = s.clone();
    within(10, "a second snapshot", move || {
        write_image(&s5, "other", &random_image(1 << 20, 8, 0.2));
        s5.snapshot("other", &NoPause, &mut |_, _| {}).unwrap()
    });
    release_tx.send(()).unwrap();
    let m = importer.join().unwrap().unwrap();
    assert_eq!(m.generation, 1);
    s.prune(DEFAULT_KEEP).unwrap();
}

#[test]
fn a_busy_volume_is_skipped_by_snapshot_if_idle() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(open(&dir.path().join("store")));
    s.create("v", 1 << 20).unwrap();
    let src = dir.path().join("big.raw");
    std::fs::write(&src, random_image(8 << 20, 9, 0.2)).unwrap();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (s2, src2) = (s.clone(), src.clone());
    let importer = std::thread::spawn(move || {
        let mut first = true;
        s2.import("v", &src2, &mut |_, _| {
            if std::mem::take(&mut first) {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
            }
        })
    });
    started_rx.recv().unwrap();
    assert!(matches!(
        s.snapshot_if_idle("v", &NoPause, &mut |_, _| {}),
        Err(SnapshotError::Busy(_))
    ));
    release_tx.send(()).unwrap();
    importer.join().unwrap().unwrap();
    assert!(s.snapshot_if_idle("v", &NoPause, &mut |_, _| {}).is_ok());
}

#[test]
fn a_cancelled_import_leaves_the_volume_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir.path().join("store"));
    let v1 = random_image(1 << 20, 1, 0.2);
    let src1 = dir.path().join("v1.raw");
    std::fs::write(&src1, &v1).unwrap();
    s.import("v", &src1, &mut |_, _| {}).unwrap();
    let src2 = dir.path().join("v2.raw");
    std::fs::write(&src2, random_image(16 << 20, 2, 0.2)).unwrap();
    let cancel = AtomicBool::new(false);
    let r = s.import_source(
        "v",
        ImportSource::open(&src2, None).unwrap(),
        &cancel,
        &mut |_, _| cancel.store(true, Ordering::SeqCst),
    );
    assert!(matches!(r, Err(ImportError::Cancelled)), "{r:?}");
    assert_eq!(s.info("v").unwrap().generations_held, vec![1]);
    assert_eq!(std::fs::read(s.image_path("v")).unwrap(), v1);
    let tmp_left = std::fs::read_dir(dir.path().join("store/volumes"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp")
        })
        .count();
    assert_eq!(tmp_left, 0, "no temp image left");
}

#[test]
fn exports_are_private_to_the_agent() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir.path().join("store"));
    let src = dir.path().join("v.raw");
    std::fs::write(&src, random_image(1 << 20, 4, 0.2)).unwrap();
    s.import("v", &src, &mut |_, _| {}).unwrap();
    let out = dir.path().join("out.img");
    s.export("v", None, &out, &mut |_, _| {}).unwrap();
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
}

/// Apply `writes` (offset, length, fill byte; fill 0 writes zeros, so a
/// chunk may become all-zero) to the live image of `name`, clipped to
/// `size`; returns the byte ranges written.
fn apply_writes(
    s: &VolumeStore,
    name: &str,
    size: u64,
    writes: &[(u64, usize, u8)],
) -> Vec<std::ops::Range<u64>> {
    let f = OpenOptions::new()
        .write(true)
        .open(s.image_path(name))
        .unwrap();
    let mut ranges = Vec::new();
    for &(off, len, fill) in writes {
        let off = off % size;
        let len = (len as u64).min(size - off);
        f.write_all_at(&vec![fill; len as usize], off).unwrap();
        ranges.push(off..off + len);
    }
    f.sync_data().unwrap();
    ranges
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// For random images and random write patterns, the manifest built from
    /// the previous generation plus the chunks the written ranges touch is
    /// identical to a full pass over the same copy, reads no more than
    /// those chunks, and exports bit-identically.
    #[test]
    fn incremental_snapshots_equal_full_ones(
        seed in any::<u64>(),
        chunks in 1usize..24,
        sectors in 1u64..128,
        writes in proptest::collection::vec((any::<u64>(), 1usize..(3 * CS), prop_oneof![Just(0u8), any::<u8>()]), 0..10),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let size = (chunks as u64 - 1) * CS as u64 + sectors * 512;
        s.create("v", size).unwrap();
        write_image(&s, "v", &random_image(size as usize, seed, 0.3));
        let g1 = s.snapshot("v", &NoPause, &mut |_, _| {}).unwrap();
        let ranges = apply_writes(&s, "v", size, &writes);
        let copy = dir.path().join("copy.raw");
        std::fs::copy(s.image_path("v"), &copy).unwrap();

        let inc = s.snapshot_changed("v", &copy, g1.generation, &ranges, &mut |_, _| {}).unwrap();
        prop_assert_eq!(inc.base, Some(1));
        prop_assert_eq!(inc.manifest.generation, 2);
        let touched = dirty::chunks_to_read(size, size, CHUNK_SIZE, &ranges);
        let touched_bytes: u64 = touched.iter().map(|r| r.len() as u64 * CS as u64).sum();
        prop_assert!(inc.bytes_read <= touched_bytes);

        // Naming generation 1 again is stale now (2 is the latest): a full pass.
        let full = s.snapshot_changed("v", &copy, g1.generation, &[], &mut |_, _| {}).unwrap();
        prop_assert_eq!(full.base, None);
        prop_assert_eq!(&full.manifest.chunks, &inc.manifest.chunks);
        let live = std::fs::read(s.image_path("v")).unwrap();
        prop_assert!(export_bytes(&s, "v", Some(2), dir.path()) == live);
    }
}

#[test]
fn incremental_snapshots_without_their_base_read_everything() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let size = 8 * CS as u64;
    s.create("v", size).unwrap();
    write_image(&s, "v", &random_image(size as usize, 5, 0.0));
    let copy = dir.path().join("copy.raw");
    std::fs::copy(s.image_path("v"), &copy).unwrap();
    // No generation yet: base 0 means "none", a full pass.
    let r = s
        .snapshot_changed("v", &copy, 0, &[], &mut |_, _| {})
        .unwrap();
    assert_eq!((r.base, r.bytes_read), (None, size));
    // A base that was never written (a caller from the future) as well.
    apply_writes(&s, "v", size, &[(0, 10, 7)]);
    std::fs::copy(s.image_path("v"), &copy).unwrap();
    let r = s
        .snapshot_changed("v", &copy, 9, &[], &mut |_, _| {})
        .unwrap();
    assert_eq!((r.base, r.bytes_read), (None, size));
    assert!(export_bytes(&s, "v", None, dir.path()) == std::fs::read(&copy).unwrap());
    // The right base and the right range: one chunk read.
    apply_writes(&s, "v", size, &[(3 * CS as u64 + 5, 10, 9)]);
    std::fs::copy(s.image_path("v"), &copy).unwrap();
    let r = s
        .snapshot_changed(
            "v",
            &copy,
            2,
            std::slice::from_ref(&(3 * CS as u64 + 5..3 * CS as u64 + 15)),
            &mut |_, _| {},
        )
        .unwrap();
    assert_eq!((r.base, r.bytes_read), (Some(2), CS as u64));
    assert!(export_bytes(&s, "v", None, dir.path()) == std::fs::read(&copy).unwrap());
    // A replica (no live image) refuses.
    s.create("w", size).unwrap();
    std::fs::remove_file(s.image_path("w")).unwrap();
    assert!(matches!(
        s.snapshot_changed("w", &copy, 0, &[], &mut |_, _| {}),
        Err(SnapshotError::NoLiveImage(_))
    ));
}
