//! Measurements behind the numbers in the crate docs. Ignored by default
//! (they take minutes and need release mode):
//!
//! ```text
//! cargo test -p datastore --release --test integration measure:: -- --ignored --nocapture --test-threads=1
//! ```
//! `DATASTORE_MEASURE_MIB` sets the data size (default 1024);
//! `DATASTORE_TEST_REFLINK_DIR` points at a btrfs/XFS directory to measure
//! the reflink snapshot path too.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use datastore::{
    hash_many, CaptureMethod, ChunkId, ChunkStore, NoPause, PauseHooks, VolumeStore,
    VolumeStoreOptions, CHUNK_SIZE,
};
use rand::{Rng, RngCore, SeedableRng};

const MIB: usize = 1 << 20;

fn measure_mib() -> usize {
    std::env::var("DATASTORE_MEASURE_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024)
}

fn rate(bytes: usize, d: Duration) -> String {
    format!("{:7.0} MiB/s", bytes as f64 / MIB as f64 / d.as_secs_f64())
}

/// `n` distinct chunks of `cs` bytes carved from one random buffer.
struct Chunks {
    pool: Vec<u8>,
    cs: usize,
}

impl Chunks {
    fn new(cs: usize) -> Self {
        let mut pool = vec![0u8; 64 * MIB + cs];
        rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut pool);
        Self { pool, cs }
    }
    fn get(&self, i: usize, buf: &mut Vec<u8>) {
        let start = (i * 4099) % (64 * MIB);
        buf.clear();
        buf.extend_from_slice(&self.pool[start..start + self.cs]);
        buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
}

fn drop_cache(dir: &Path) {
    for e in std::fs::read_dir(dir.join("packs")).unwrap() {
        let f = std::fs::File::open(e.unwrap().path()).unwrap();
        let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
    }
}

#[test]
#[ignore = "measurement; run in release"]
fn measure_insert_and_read_throughput() {
    let total = measure_mib() * MIB;
    let cs = CHUNK_SIZE as usize;
    let n = total / cs;
    let gen = Chunks::new(cs);
    println!(
        "\n== chunk store throughput, {} MiB of distinct {} KiB chunks ==",
        total / MIB,
        cs / 1024
    );

    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let s = ChunkStore::open(dir.path()).unwrap();
    let mut buf = Vec::new();
    let t = Instant::now();
    for i in 0..n {
        gen.get(i, &mut buf);
        s.insert(&buf).unwrap();
    }
    let ins = t.elapsed();
    let t = Instant::now();
    s.sync().unwrap();
    let sync = t.elapsed();
    println!(
        "insert (one thread, hashing inline):   {}  (+ final sync {:?})",
        rate(total, ins),
        sync
    );
    println!(
        "  insert + sync:                         {}",
        rate(total, ins + sync)
    );

    let t = Instant::now();
    for i in 0..n {
        gen.get(i, &mut buf);
        s.insert(&buf).unwrap();
    }
    println!(
        "re-insert (all dedup hits):              {}",
        rate(total, t.elapsed())
    );

    let ids: Vec<ChunkId> = (0..n)
        .map(|i| {
            gen.get(i, &mut buf);
            ChunkId::of(&buf)
        })
        .collect();
    let t = Instant::now();
    for id in &ids {
        assert_eq!(s.read(id).unwrap().unwrap().len(), cs);
    }
    println!(
        "read + verify, page cache warm:          {}",
        rate(total, t.elapsed())
    );
    drop_cache(dir.path());
    let t = Instant::now();
    for id in &ids {
        assert_eq!(s.read(id).unwrap().unwrap().len(), cs);
    }
    println!(
        "read + verify, cold (from disk):         {}",
        rate(total, t.elapsed())
    );
    let st = s.stats().unwrap();
    println!(
        "stats: {} chunks, {} MiB payload, {} MiB packs, index {} KiB ({:.0} B/chunk), {} packs",
        st.chunks,
        st.payload_bytes / MIB as u64,
        st.disk_bytes / MIB as u64,
        st.index_bytes / 1024,
        st.index_bytes as f64 / st.chunks as f64,
        st.packs
    );
    drop(s);

    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let s = ChunkStore::open(dir.path()).unwrap();
    let batch = 128;
    let t = Instant::now();
    let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); batch];
    for first in (0..n).step_by(batch) {
        let k = batch.min(n - first);
        for (j, b) in bufs.iter_mut().take(k).enumerate() {
            gen.get(first + j, b);
        }
        let refs: Vec<&[u8]> = bufs[..k].iter().map(Vec::as_slice).collect();
        s.insert_batch(&refs).unwrap();
    }
    s.sync().unwrap();
    println!(
        "insert_batch (parallel hashing) + sync:  {}",
        rate(total, t.elapsed())
    );
}

/// Wire and storage cost of `frac` of a `size`-byte image's 4 KiB blocks
/// changed at random, for chunk size `cs`.
fn scattered(size: u64, cs: u64, frac: f64, seed: u64) -> (u64, u64) {
    let blocks = size / 4096;
    let changed = (blocks as f64 * frac) as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut set = HashSet::new();
    while (set.len() as u64) < changed {
        set.insert(rng.gen_range(0..blocks));
    }
    let touched: HashSet<u64> = set.iter().map(|b| b * 4096 / cs).collect();
    (changed, touched.len() as u64)
}

#[test]
#[ignore = "measurement; run in release"]
fn measure_chunk_sizes() {
    let data = 256 * MIB;
    println!(
        "\n== chunk size: hashing and insert throughput ({} MiB distinct data) ==",
        data / MIB
    );
    println!(
        "{:>8} {:>16} {:>18} {:>20} {:>16} {:>14}",
        "chunk",
        "hash 1 thread",
        "hash_many (par.)",
        "insert (no fsync)",
        "then sync",
        "index B/chunk"
    );
    for cs in [
        4usize << 10,
        16 << 10,
        64 << 10,
        256 << 10,
        1 << 20,
        4 << 20,
    ] {
        let gen = Chunks::new(cs);
        let n = data / cs;
        let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); 64];
        let t = Instant::now();
        for i in 0..n {
            gen.get(i, &mut bufs[0]);
            std::hint::black_box(ChunkId::of(&bufs[0]));
        }
        let hash1 = t.elapsed();
        let per = (8 * MIB / cs).max(2);
        let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); per];
        let t = Instant::now();
        for first in (0..n).step_by(per) {
            let k = per.min(n - first);
            for (j, b) in bufs.iter_mut().take(k).enumerate() {
                gen.get(first + j, b);
            }
            let refs: Vec<&[u8]> = bufs[..k].iter().map(Vec::as_slice).collect();
            std::hint::black_box(hash_many(&refs));
        }
        let hashp = t.elapsed();
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        // CPU cost per chunk size: no implicit syncs; the one sync at the
        // end is the disk's part (and this VM's disk is noisy).
        let opts = datastore::ChunkStoreOptions {
            max_pending_bytes: u64::MAX,
            ..Default::default()
        };
        let s = ChunkStore::open_with(dir.path(), opts).unwrap();
        let t = Instant::now();
        for first in (0..n).step_by(per) {
            let k = per.min(n - first);
            for (j, b) in bufs.iter_mut().take(k).enumerate() {
                gen.get(first + j, b);
            }
            let refs: Vec<&[u8]> = bufs[..k].iter().map(Vec::as_slice).collect();
            s.insert_batch(&refs).unwrap();
        }
        let ins = t.elapsed();
        let t = Instant::now();
        s.sync().unwrap();
        let sync = t.elapsed();
        let st = s.stats().unwrap();
        println!(
            "{:>6}KiB {:>16} {:>18} {:>20} {:>13.0} ms {:>14.0}",
            cs / 1024,
            rate(data, hash1),
            rate(data, hashp),
            rate(data, ins),
            sync.as_secs_f64() * 1000.0,
            st.index_bytes as f64 / st.chunks as f64
        );
    }

    let size: u64 = 4 << 30;
    println!("\n== 4 GiB image, 1 % of its 4 KiB blocks rewritten at random (rsync: ~606 MiB on the wire) ==");
    println!(
        "{:>8} {:>9} {:>14} {:>16} {:>16} {:>14} {:>16}",
        "chunk",
        "touched",
        "stored new",
        "wire whole",
        "wire 4K-delta",
        "manifest",
        "manifest delta"
    );
    for cs in [4u64 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20] {
        let (changed, touched) = scattered(size, cs, 0.01, 7);
        let n = size / cs;
        // Delta: the changed blocks plus, per changed chunk, its new id and a
        // bitmap of which 4 KiB blocks follow.
        let delta = changed * 4096 + touched * (32 + (cs / 4096).div_ceil(8));
        let manifest = n * 32 + n.div_ceil(8);
        let manifest_delta = touched * (32 + 4);
        println!(
            "{:>6}KiB {:>9} {:>10} MiB {:>12} MiB {:>12.1} MiB {:>10.1} MiB {:>12.2} MiB",
            cs / 1024,
            touched,
            (touched * cs) >> 20,
            (touched * cs) >> 20,
            delta as f64 / MIB as f64,
            manifest as f64 / MIB as f64,
            manifest_delta as f64 / MIB as f64
        );
    }
    println!(
        "\n== ten clones of a 1 GiB base, each with 0.1 % scattered 4 KiB writes: stored bytes =="
    );
    for cs in [4u64 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20] {
        let stored: u64 = (0..10)
            .map(|i| scattered(1 << 30, cs, 0.001, 100 + i).1 * cs)
            .sum();
        println!(
            "{:>6}KiB  base + {:>6} MiB ({:.2} bases)",
            cs / 1024,
            stored >> 20,
            1.0 + stored as f64 / (1u64 << 30) as f64
        );
    }
}

/// Writes `blocks` random 4 KiB blocks into the image when asked to pause:
/// the appliance wrote while the pre-copy ran.
struct WritesThenPauses<'a> {
    image: &'a Path,
    blocks: usize,
    size: u64,
}

impl PauseHooks for WritesThenPauses<'_> {
    fn pause(&self) -> io::Result<()> {
        let f = OpenOptions::new().write(true).open(self.image)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.blocks as u64);
        let mut b = [0u8; 4096];
        for _ in 0..self.blocks {
            rng.fill_bytes(&mut b);
            f.write_all_at(&b, rng.gen_range(0..self.size / 4096) * 4096)?;
        }
        Ok(())
    }
    fn resume(&self) {}
}

fn snapshot_pauses(root: &Path, reflink: bool) {
    let size = (measure_mib() * MIB) as u64;
    let s = VolumeStore::open_with(
        root,
        VolumeStoreOptions {
            reflink: Some(reflink),
            ..Default::default()
        },
    )
    .unwrap();
    s.create("vm", size).unwrap();
    let image = s.image_path("vm");
    {
        // 70 % of the chunks random, the rest zero (a typical thin disk).
        let f = OpenOptions::new().write(true).open(&image).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut chunk = vec![0u8; CHUNK_SIZE as usize];
        for i in 0..size / u64::from(CHUNK_SIZE) {
            if rng.gen_bool(0.7) {
                rng.fill_bytes(&mut chunk);
                f.write_all_at(&chunk, i * u64::from(CHUNK_SIZE)).unwrap();
            }
        }
        f.sync_all().unwrap();
    }
    let label = if reflink { "reflink" } else { "pre-copy" };
    let report = |what: &str, r: &datastore::SnapshotReport| {
        println!(
            "{label:>8} {what:<44} pause {:>10.3} ms  ({:?}; whole snapshot {:.2} s, {} new chunks)",
            r.pause.as_secs_f64() * 1000.0,
            r.method,
            r.elapsed.as_secs_f64(),
            r.new_chunks
        );
    };
    let r = s.snapshot_report("vm", &NoPause, &mut |_, _| {}).unwrap();
    report("first snapshot (all chunks new)", &r);
    std::thread::sleep(Duration::from_millis(50));
    let r = s.snapshot_report("vm", &NoPause, &mut |_, _| {}).unwrap();
    report("idle image", &r);
    for blocks in [16usize, (size / 4096 / 100) as usize] {
        let hooks = WritesThenPauses {
            image: &image,
            blocks,
            size,
        };
        let r = s.snapshot_report("vm", &hooks, &mut |_, _| {}).unwrap();
        if !reflink {
            assert_eq!(r.method, CaptureMethod::PrecopyRescan);
        }
        report(&format!("{blocks} blocks written during pre-copy"), &r);
    }
}

#[test]
#[ignore = "measurement; run in release"]
fn measure_snapshot_pause() {
    println!("\n== snapshot pause, {} MiB volume ==", measure_mib());
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    snapshot_pauses(dir.path(), false);
    if let Some(base) = std::env::var_os("DATASTORE_TEST_REFLINK_DIR") {
        let dir = tempfile::tempdir_in(base).unwrap();
        snapshot_pauses(dir.path(), true);
    } else {
        println!("(set DATASTORE_TEST_REFLINK_DIR to a btrfs/XFS directory to measure reflink)");
    }

    // For comparison: copying the page-cached image inside the pause
    // instead of re-hashing it.
    let size = measure_mib() * MIB;
    let src = dir.path().join("src.img");
    let mut data = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(9).fill_bytes(&mut data);
    std::fs::write(&src, &data).unwrap();
    drop(data);
    let inp = std::fs::File::open(&src).unwrap();
    let out = std::fs::File::create(dir.path().join("copy.img")).unwrap();
    let t = Instant::now();
    let mut left = size;
    let (mut a, mut b) = (0u64, 0u64);
    while left > 0 {
        let n = rustix::fs::copy_file_range(&inp, Some(&mut a), &out, Some(&mut b), left).unwrap();
        assert!(n > 0);
        left -= n;
    }
    println!(
        "copy_file_range of the page-cached image (ext4): {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
}
