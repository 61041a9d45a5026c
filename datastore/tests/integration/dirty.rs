//! Snapshots of a process appliance's live image on a real XFS (reflink:
//! dirty tracking by extent maps) and a real ext4 (no reflink: a full read
//! per snapshot), each a loop-mounted image file: scattered 4 KiB writes,
//! snapshots (also while a writer runs), a push to a second store, and the
//! replica must be bit-identical. Prints the bytes read per snapshot.
//!
//! Needs root (mount) and `mkfs.xfs` / `mkfs.ext4` (`scripts/setup`
//! installs xfsprogs); skips with a message when a tool is missing or when
//! not root.
//!
//! `cargo test -p datastore --test integration dirty:: -- --nocapture`

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use datastore::replicate::limiter::LinkLimiter;
use datastore::replicate::{push, TransferCounters};
use datastore::{CaptureMethod, DirtyTracking, NoPause, PauseHooks, VolumeStore, CHUNK_SIZE};
use rand::{Rng, RngCore, SeedableRng};
use tokio_util::compat::TokioAsyncReadCompatExt;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// A filesystem made in an image file and loop-mounted; unmounted on drop.
struct LoopFs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    /// `None` (with a message) when `mkfs` is missing or mounting is not
    /// allowed here.
    fn new(kind: &str, size: u64) -> Option<Self> {
        let mkfs = format!("mkfs.{kind}");
        let found = ["/sbin", "/usr/sbin", "/bin", "/usr/bin"]
            .iter()
            .any(|d| Path::new(d).join(&mkfs).exists());
        if !found {
            eprintln!("{mkfs} not installed (scripts/setup installs it); skipping the {kind} test");
            return None;
        }
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        });
        if !root {
            eprintln!("not root: cannot loop-mount; skipping the {kind} test");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        File::create(&img).unwrap().set_len(size).unwrap();
        let mut cmd = Command::new(&mkfs);
        match kind {
            "xfs" => cmd.args(["-q", "-m", "reflink=1"]),
            _ => cmd.args(["-q", "-F"]),
        };
        let out = cmd.arg(&img).output().unwrap();
        assert!(
            out.status.success(),
            "{mkfs}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -o loop ({kind}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Self { mnt, _dir: dir })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

/// Write `count` random 4 KiB blocks at random block offsets.
fn scattered_writes(path: &Path, size: u64, count: usize, rng: &mut impl Rng) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    for _ in 0..count {
        rng.fill_bytes(&mut buf);
        let at = rng.gen_range(0..size / BLOCK) * BLOCK;
        f.write_all_at(&buf, at).unwrap();
    }
}

async fn push_latest(owner: &Arc<VolumeStore>, replica: &Arc<VolumeStore>, name: &str) -> u64 {
    let m = owner.latest(name).unwrap().unwrap();
    let (a, b) = tokio::io::duplex(4 << 20);
    let (sent, recv) = (TransferCounters::default(), TransferCounters::default());
    let limiter = LinkLimiter::new(0);
    let (s, r) = tokio::join!(
        push::push(owner.clone(), "owner", m, a.compat(), &limiter, &sent),
        push::serve(replica.clone(), "owner", b.compat(), &recv)
    );
    r.unwrap();
    s.unwrap().bytes
}

fn export(store: &VolumeStore, name: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("export-{name}.img"));
    store.export(name, None, &out, &mut |_, _| {}).unwrap();
    std::fs::read(out).unwrap()
}

/// Scattered writes, snapshots, pushes: the replica matches the live image
/// after every round; with reflink, every snapshot after the first reads
/// only the chunks written.
async fn rounds_on(kind: &str) {
    let Some(fs) = LoopFs::new(kind, 1024 * MIB) else {
        return;
    };
    let owner = Arc::new(VolumeStore::open(fs.mnt.join("store")).unwrap());
    let info = owner.info_fs();
    assert_eq!(info.filesystem, kind);
    let reflink = kind == "xfs";
    assert_eq!(info.reflink, reflink, "{info:?}");
    assert_eq!(
        info.dirty_tracking,
        if reflink {
            DirtyTracking::Extents
        } else {
            DirtyTracking::FullRead
        }
    );
    let replica_dir = tempfile::tempdir().unwrap();
    let replica = Arc::new(VolumeStore::open(replica_dir.path()).unwrap());
    let size = 256 * MIB;
    owner.create("app", size).unwrap();
    let live = owner.image_path("app");
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    // 32 MiB allocated in 1 MiB runs, the rest a hole.
    {
        let f = OpenOptions::new().write(true).open(&live).unwrap();
        let mut buf = vec![0u8; MIB as usize];
        for _ in 0..32 {
            rng.fill_bytes(&mut buf);
            f.write_all_at(&buf, rng.gen_range(0..size / MIB) * MIB)
                .unwrap();
        }
    }
    let mut prev = 0;
    for round in 0..4 {
        if round > 0 {
            scattered_writes(&live, size, 64, &mut rng);
        }
        let r = owner
            .snapshot_report("app", &NoPause, &mut |_, _| {})
            .unwrap();
        let g = r.manifest.generation;
        let sent = push_latest(&owner, &replica, "app").await;
        println!(
            "{kind}: snapshot {g}: {:?}, base {:?}, read {} KiB, pause {:?}, sent {} KiB",
            r.method,
            r.base,
            r.bytes_read / 1024,
            r.pause,
            sent / 1024
        );
        if reflink {
            assert_eq!(r.method, CaptureMethod::Reflink);
            if round == 0 {
                assert_eq!(r.base, None);
            } else {
                assert_eq!(r.base, Some(prev));
                // 64 blocks touch at most 64 chunks.
                assert!(
                    r.bytes_read <= 64 * u64::from(CHUNK_SIZE),
                    "{}",
                    r.bytes_read
                );
            }
        } else {
            assert_eq!(r.base, None);
        }
        prev = g;
        assert!(
            export(&replica, "app", replica_dir.path()) == std::fs::read(&live).unwrap(),
            "{kind}: replica differs from the live image after round {round}"
        );
    }
    // A second store over the same files (an agent restart) starts from a
    // full pass, then tracks again.
    drop(owner);
    let owner = Arc::new(VolumeStore::open(fs.mnt.join("store")).unwrap());
    scattered_writes(&live, size, 8, &mut rng);
    let r = owner
        .snapshot_report("app", &NoPause, &mut |_, _| {})
        .unwrap();
    assert_eq!(r.base, None);
    scattered_writes(&live, size, 8, &mut rng);
    let r = owner
        .snapshot_report("app", &NoPause, &mut |_, _| {})
        .unwrap();
    assert_eq!(r.base.is_some(), reflink);
    push_latest(&owner, &replica, "app").await;
    assert!(export(&replica, "app", replica_dir.path()) == std::fs::read(&live).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_snapshots_read_only_what_changed_and_replicate_bit_identical() {
    rounds_on("xfs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_snapshots_read_everything_and_replicate_bit_identical() {
    rounds_on("ext4").await;
}

/// A writer that stops (and acknowledges) when paused; the pause hook then
/// copies the live image: what the snapshot must hold.
struct Writer {
    path: PathBuf,
    size: u64,
    paused: AtomicBool,
    stopped: AtomicBool,
    quit: AtomicBool,
    pauses: AtomicU32,
    frozen: Mutex<Option<Vec<u8>>>,
}

impl Writer {
    fn run(&self, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let f = OpenOptions::new().write(true).open(&self.path).unwrap();
        let mut buf = vec![0u8; BLOCK as usize];
        while !self.quit.load(Ordering::SeqCst) {
            if self.paused.load(Ordering::SeqCst) {
                self.stopped.store(true, Ordering::SeqCst);
                std::thread::yield_now();
                continue;
            }
            self.stopped.store(false, Ordering::SeqCst);
            rng.fill_bytes(&mut buf);
            let at = rng.gen_range(0..self.size / BLOCK) * BLOCK;
            f.write_all_at(&buf, at).unwrap();
        }
    }
}

impl PauseHooks for Writer {
    fn pause(&self) -> io::Result<()> {
        self.paused.store(true, Ordering::SeqCst);
        while !self.stopped.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        self.pauses.fetch_add(1, Ordering::SeqCst);
        *self.frozen.lock().unwrap() = Some(std::fs::read(&self.path)?);
        Ok(())
    }
    fn resume(&self) {
        self.stopped.store(false, Ordering::SeqCst);
        self.paused.store(false, Ordering::SeqCst);
    }
}

/// While a writer rewrites random blocks, every incremental snapshot is
/// exactly the image as it was paused.
#[test]
fn xfs_incremental_snapshots_under_writes_are_points_in_time() {
    let Some(fs) = LoopFs::new("xfs", 512 * MIB) else {
        return;
    };
    let store = VolumeStore::open(fs.mnt.join("store")).unwrap();
    let size = 32 * MIB;
    store.create("busy", size).unwrap();
    let w = Writer {
        path: store.image_path("busy"),
        size,
        paused: AtomicBool::new(false),
        stopped: AtomicBool::new(false),
        quit: AtomicBool::new(false),
        pauses: AtomicU32::new(0),
        frozen: Mutex::new(None),
    };
    let out = tempfile::tempdir().unwrap();
    std::thread::scope(|sc| {
        sc.spawn(|| w.run(21));
        for g in 1..=6u64 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let r = store.snapshot_report("busy", &w, &mut |_, _| {}).unwrap();
            assert_eq!(r.manifest.generation, g);
            assert_eq!(r.base, (g > 1).then(|| g - 1));
            let frozen = w.frozen.lock().unwrap().take().unwrap();
            assert!(
                export(&store, "busy", out.path()) == frozen,
                "generation {g} is not the paused image"
            );
        }
        w.quit.store(true, Ordering::SeqCst);
    });
    assert_eq!(w.pauses.load(Ordering::SeqCst), 6);
}
