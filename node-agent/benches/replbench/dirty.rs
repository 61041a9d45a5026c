//! Section `dirty`: what one snapshot of a process appliance costs on a
//! reflink filesystem (XFS: dirty tracking by extent maps) and on ext4 (a
//! full read of the allocated image per written snapshot), under a steady
//! workload of scattered 4 KiB writes.
//!
//! ```text
//! cargo run --release -p node-agent --bin replbench -- --section dirty \
//!     [--dirty-size-gib 40] [--dirty-alloc-gib 8] [--dirty-rounds 5] [--quick]
//! ```
//!
//! Per filesystem, an image file is formatted and loop-mounted (root,
//! `mkfs.xfs` / `mkfs.ext4`); a thin volume (`--dirty-size-gib`, with
//! `--dirty-alloc-gib` of random data in 64 extents) is snapshotted once
//! (the full first pass: what every written snapshot cost before dirty
//! tracking), then a writer thread rewrites random 4 KiB blocks of its data
//! at `--dirty-write-mbps` (1 MB/s) while the store snapshots it every
//! `--dirty-interval-s` (2 s), pausing the writer as an appliance is paused.
//! Printed per snapshot: bytes read, CPU seconds of this process, wall time
//! and the pause. Then the same workload on a 1 GiB volume (a fifth
//! allocated), whose pause is compared with the large one's.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use datastore::{NoPause, PauseHooks, SnapshotReport, VolumeStore};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::images::{thin_image, ThinLayout, BLOCK, MIB};
use crate::Row;

const GIB: u64 = 1 << 30;

/// Data extents of the thin volumes (as in figure 2's layout).
const EXTENTS: u64 = 64;

/// Size of the small volume the pause is compared with.
const SMALL: u64 = GIB;

/// Target: an incremental snapshot reads ≥ 50× less than a
/// full pass over the same volume.
const TARGET_READ_RATIO: f64 = 50.0;

/// Seeds (apart from the other figures').
const SEED_IMAGE: u64 = 13_000;
const SEED_WRITER: u64 = 13_100;

/// The section's parameters.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Where the filesystem images go.
    pub dir: PathBuf,
    /// Size of the large volume.
    pub size: u64,
    /// Random data in it.
    pub alloc: u64,
    /// Snapshots under writes per volume.
    pub rounds: usize,
    /// Write rate of the scattered 4 KiB writes, bytes/s.
    pub write_bps: f64,
    /// Time between snapshots.
    pub interval: Duration,
}

/// One snapshot's cost.
#[derive(Debug, Clone)]
struct Sample {
    report: SnapshotReport,
    cpu_s: f64,
    wall: Duration,
}

/// A filesystem in an image file, loop-mounted; unmounted and removed on drop.
struct LoopFs {
    img: PathBuf,
    mnt: PathBuf,
}

impl LoopFs {
    fn new(kind: &str, dir: &Path, size: u64) -> anyhow::Result<Option<Self>> {
        let mkfs = format!("mkfs.{kind}");
        if Command::new(&mkfs).arg("-V").output().is_err() {
            println!("  {mkfs} not installed (scripts/setup installs xfsprogs): {kind} skipped");
            return Ok(None);
        }
        let img = dir.join(format!("{kind}.fs"));
        File::create(&img)?.set_len(size)?;
        let mut cmd = Command::new(&mkfs);
        match kind {
            "xfs" => cmd.args(["-q", "-f", "-m", "reflink=1"]),
            _ => cmd.args(["-q", "-F"]),
        };
        let out = cmd.arg(&img).output()?;
        if !out.status.success() {
            bail!("{mkfs}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mnt = dir.join(format!("{kind}.mnt"));
        std::fs::create_dir_all(&mnt)?;
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output()?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&img);
            println!(
                "  mount -o loop failed ({}): {kind} skipped (needs root)",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return Ok(None);
        }
        Ok(Some(Self { img, mnt }))
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = std::fs::remove_file(&self.img);
        let _ = std::fs::remove_dir(&self.mnt);
    }
}

/// The appliance: rewrites random 4 KiB blocks of the data extents at a
/// steady rate; stops between two writes when paused.
struct Writer {
    path: PathBuf,
    extents: Vec<(u64, u64)>,
    period: Duration,
    paused: AtomicBool,
    writing: AtomicBool,
    quit: AtomicBool,
}

impl Writer {
    fn run(&self) -> io::Result<u64> {
        let f = std::fs::OpenOptions::new().write(true).open(&self.path)?;
        let mut rng = StdRng::seed_from_u64(SEED_WRITER);
        let mut buf = vec![0u8; BLOCK as usize];
        let start = Instant::now();
        let mut n = 0u64;
        while !self.quit.load(Ordering::SeqCst) {
            let due = start + self.period * u32::try_from(n).unwrap_or(u32::MAX);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d.min(Duration::from_millis(5)));
                continue;
            }
            self.writing.store(true, Ordering::SeqCst);
            if self.paused.load(Ordering::SeqCst) {
                self.writing.store(false, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            let (off, len) = self.extents[rng.gen_range(0..self.extents.len())];
            let at = off + rng.gen_range(0..len / BLOCK) * BLOCK;
            rng.fill_bytes(&mut buf);
            let r = f.write_all_at(&buf, at);
            self.writing.store(false, Ordering::SeqCst);
            r?;
            n += 1;
        }
        Ok(n)
    }
}

impl PauseHooks for Writer {
    fn pause(&self) -> io::Result<()> {
        self.paused.store(true, Ordering::SeqCst);
        while self.writing.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        Ok(())
    }
    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

fn timed(f: impl FnOnce() -> anyhow::Result<SnapshotReport>) -> anyhow::Result<Sample> {
    let cpu0 = crate::cpu_secs(std::process::id());
    let t = Instant::now();
    let report = f()?;
    Ok(Sample {
        report,
        wall: t.elapsed(),
        cpu_s: crate::cpu_secs(std::process::id()) - cpu0,
    })
}

fn print_sample(kind: &str, vol: &str, s: &Sample) {
    let r = &s.report;
    println!(
        "  {kind:<5} {vol:<6} gen {:>3}  {:<17} base {:<5} read {:>10.1} MiB  cpu {:>6.2} s  wall {:>6.2} s  pause {:>8.2} ms  new {:>7.1} MiB",
        r.manifest.generation,
        format!("{:?}", r.method),
        r.base.map_or("-".to_owned(), |b| b.to_string()),
        r.bytes_read as f64 / MIB as f64,
        s.cpu_s,
        s.wall.as_secs_f64(),
        r.pause.as_secs_f64() * 1000.0,
        r.new_bytes as f64 / MIB as f64,
    );
}

/// The full first snapshot, then `rounds` under the writer.
fn measure(
    o: &Opts,
    kind: &str,
    store: &VolumeStore,
    name: &str,
    size: u64,
    alloc: u64,
) -> anyhow::Result<(Sample, Vec<Sample>)> {
    store.create(name, size)?;
    let layout = ThinLayout {
        size,
        data: alloc,
        extents: EXTENTS,
    };
    let path = store.image_path(name);
    thin_image(&path, layout, SEED_IMAGE).context("writing the thin image")?;
    let first = timed(|| Ok(store.snapshot_report(name, &NoPause, &mut |_, _| {})?))?;
    print_sample(kind, name, &first);
    let w = Arc::new(Writer {
        path,
        extents: layout.extents(),
        period: Duration::from_secs_f64(BLOCK as f64 / o.write_bps.max(1.0)),
        paused: AtomicBool::new(false),
        writing: AtomicBool::new(false),
        quit: AtomicBool::new(false),
    });
    let writer = {
        let w = w.clone();
        std::thread::spawn(move || w.run())
    };
    let mut samples = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for _ in 0..o.rounds {
            std::thread::sleep(o.interval);
            let s = timed(|| Ok(store.snapshot_report(name, w.as_ref(), &mut |_, _| {})?))?;
            print_sample(kind, name, &s);
            samples.push(s);
            // Keep the filesystem image small: only the latest generation
            // (the base of the next snapshot) is needed.
            store.prune(1)?;
        }
        Ok(())
    })();
    w.quit.store(true, Ordering::SeqCst);
    let written = writer.join().expect("writer panicked")?;
    result?;
    println!(
        "  {kind:<5} {name:<6} writer: {written} blocks ({:.1} MiB) written during the rounds",
        (written * BLOCK) as f64 / MIB as f64
    );
    store.prune(1)?;
    Ok((first, samples))
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run the section; returns its rows for the summary table.
pub fn run(o: &Opts) -> anyhow::Result<Vec<Row>> {
    println!(
        "\n[dirty] snapshot cost of a process appliance: {} GiB thin volume, {} GiB allocated, {:.1} MB/s of scattered 4 KiB writes, a snapshot every {:.1} s, {} rounds",
        o.size / GIB,
        o.alloc as f64 / GIB as f64,
        o.write_bps / 1e6,
        o.interval.as_secs_f64(),
        o.rounds
    );
    let mut rows = Vec::new();
    // Room for the image, the chunk store's copy of it, the small volume's
    // pair, clones and metadata, and a GiB per round for the chunks the
    // rounds rewrite (on ext4 a snapshot takes tens of seconds, and every
    // 4 KiB write meanwhile makes a whole new chunk).
    let fs_size = (2 * o.alloc + 2 * SMALL / 5 + (2 + o.rounds as u64) * GIB).div_ceil(GIB) * GIB;
    for kind in ["xfs", "ext4"] {
        let Some(fs) = LoopFs::new(kind, &o.dir, fs_size)? else {
            continue;
        };
        let store = VolumeStore::open(fs.mnt.join("store"))?;
        let info = store.info_fs();
        println!(
            "  {kind}: filesystem {}, reflink {}, dirty tracking {:?}",
            info.filesystem, info.reflink, info.dirty_tracking
        );
        let (first, big) = measure(o, kind, &store, "large", o.size, o.alloc)?;
        let (_, small) = measure(o, kind, &store, "small", SMALL, SMALL / 5)?;
        drop(store);
        drop(fs);
        let read = median(big.iter().map(|s| s.report.bytes_read as f64).collect());
        let cpu = median(big.iter().map(|s| s.cpu_s).collect());
        let full_read = first.report.bytes_read as f64;
        let ratio = full_read / read.max(1.0);
        let pause_big = median(big.iter().map(|s| s.report.pause.as_secs_f64()).collect());
        let pause_small = median(small.iter().map(|s| s.report.pause.as_secs_f64()).collect());
        rows.push(Row {
            figure: if kind == "xfs" {
                "dirty: read per snapshot under writes, XFS"
            } else {
                "dirty: read per snapshot under writes, ext4"
            },
            measured: format!(
                "{:.1} MiB, {:.2} CPU s (full pass {:.0} MiB): {:.0}x less",
                read / MIB as f64,
                cpu,
                full_read / MIB as f64,
                ratio
            ),
            target: format!(">= {TARGET_READ_RATIO:.0}x"),
            pass: Some(ratio >= TARGET_READ_RATIO),
        });
        rows.push(Row {
            figure: if kind == "xfs" {
                "dirty: pause, large vs 1 GiB volume, XFS"
            } else {
                "dirty: pause, large vs 1 GiB volume, ext4"
            },
            measured: format!(
                "{:.2} ms vs {:.2} ms (median)",
                pause_big * 1000.0,
                pause_small * 1000.0
            ),
            target: "large <= 1 GiB".to_owned(),
            // Medians of a few pauses on a shared machine: a millisecond of slack.
            pass: Some(pause_big <= pause_small * 1.5 + 0.001),
        });
    }
    Ok(rows)
}
