//! Store benchmark: memory and time of chunk-store gc and scrub at scale,
//! streaming (production) against the in-memory passes they replaced; and
//! the bytes of manifests a push sends per generation, whole against
//! delta.
//!
//! ```text
//! cargo bench -p datastore --bench storebench -- [--section store|manifest|all]
//!     [--chunks 10000000] [--chunk-bytes 64] [--dead-one-in 4] [--dir PATH]
//!     [--volume-gib 4] [--change-percent 1] [--generations 5]
//! ```
//! Without `--bench` (as `cargo test --all-targets` runs it) it does a
//! smoke run of 2000 chunks and a 1 GiB volume.
//! `store`: builds a chunk store of `--chunks` distinct chunks of
//! `--chunk-bytes` bytes (small, so 10 million fit a rack's disk and a few
//! minutes), copies it, and runs each pass in a child process of its own so
//! that each peak RSS (`VmHWM`) is that pass's alone: scrub (read-only)
//! streaming and in memory on the same store, then gc keeping all but one
//! chunk in `--dead-one-in`, streaming on one copy and in memory on the
//! other (the live set built as each production path builds it: a
//! `LiveSet` on disk, a `HashSet` in memory). The two gcs must agree.
//! `manifest`: a volume of `--volume-gib` GiB of 64 KiB chunks, every
//! chunk stored, `--change-percent` of them rewritten per generation: the
//! manifest bytes a version-1 push sends (the whole manifest) against a
//! version-2 push (a `DeltaHead` frame and the delta), framed as `push`
//! frames them (tests/integration/manifest_delta.rs checks `push` sends exactly
//! these bytes).
//!
//! Measured on the 2-core development VM (shared, load ≈ 16), a store of
//! 8.8 M chunks of 64 bytes (packs 0.9 GiB, sled index ≈ 1.6 GiB; opening
//! it costs sled ≈ 400–450 MiB of RSS, before any pass), peak RSS over
//! that: scrub +45 MiB streaming against +667 MiB in memory; gc (2.2 M
//! dead) +222 MiB streaming against +10.3 GiB in memory, same result. At
//! 1 M chunks: scrub +144 / +214 MiB, gc +247 / +834 MiB. What remains of
//! the streaming passes' memory is sled's cache and write path, not the
//! passes' own state (8 MiB sort buffer). Manifests, 4 GiB volume, 1 %
//! rewritten per generation: 2 105 414 bytes whole, about 29 400 as a
//! delta (×71).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use datastore::manifest::delta as manifest_delta;
use datastore::replicate::wire::{DeltaHead, Frame, Kind, MAX_FRAME};
use datastore::{ChunkId, ChunkStore, Manifest};
use rand::{Rng, RngCore, SeedableRng};

/// Errors of a bench binary, reported as they are (the crate has no
/// anyhow).
type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Bytes of a frame header: `[kind: u8][len: u32]`.
const FRAME_HEADER: usize = 5;

#[derive(Debug, Clone)]
struct Args {
    section: String,
    chunks: u64,
    chunk_bytes: usize,
    dead_one_in: u64,
    dir: Option<PathBuf>,
    volume_gib: u64,
    change_percent: f64,
    generations: u64,
    /// Internal: run one pass in this process (`scrub-streaming`, …).
    child: Option<String>,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        section: "all".into(),
        chunks: 10_000_000,
        chunk_bytes: 64,
        dead_one_in: 4,
        dir: None,
        volume_gib: 4,
        change_percent: 1.0,
        generations: 5,
        child: None,
    };
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary without it (with test filters, if any): then a small smoke
    // run, ignoring what it does not know.
    let bench = std::env::args().any(|a| a == "--bench" || a == "--child");
    if !bench {
        a.chunks = 2000;
        a.volume_gib = 1;
        a.generations = 1;
    }
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--section" => a.section = v()?,
            "--chunks" => a.chunks = v()?.parse()?,
            "--chunk-bytes" => a.chunk_bytes = v()?.parse()?,
            "--dead-one-in" => a.dead_one_in = v()?.parse()?,
            "--dir" => a.dir = Some(v()?.into()),
            "--volume-gib" => a.volume_gib = v()?.parse()?,
            "--change-percent" => a.change_percent = v()?.parse()?,
            "--generations" => a.generations = v()?.parse()?,
            "--child" => a.child = Some(v()?),
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            other if bench => return Err(format!("unknown argument {other}").into()),
            _ => {}
        }
    }
    if a.chunk_bytes < 16 || a.dead_one_in < 2 {
        return Err("--chunk-bytes must be ≥ 16 and --dead-one-in ≥ 2".into());
    }
    Ok(a)
}

/// The content of chunk `i`: distinct per `i`, never all zeros.
fn chunk(i: u64, len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&i.to_le_bytes());
    out.extend_from_slice(&(!i).to_le_bytes());
    out.resize(len, 0xA5);
}

/// Peak and current resident set of this process, in KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Reset the peak RSS to the current RSS (Linux ≥ 4.0), so a pass's peak
/// excludes what opening the store cost.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() -> Res<()> {
    let args = parse_args()?;
    if let Some(pass) = &args.child {
        return child(&args, pass);
    }
    if args.section == "store" || args.section == "all" {
        store_section(&args)?;
    }
    if args.section == "manifest" || args.section == "all" {
        manifest_section(&args);
    }
    Ok(())
}

fn dir_bytes(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            total += if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            };
        }
    }
    total
}

fn store_section(args: &Args) -> Res<()> {
    let tmp;
    let root = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let (a, b) = (root.join("a"), root.join("b"));
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
    println!(
        "# chunk store: {} chunks of {} bytes (+40-byte record headers)",
        args.chunks, args.chunk_bytes
    );
    let t = Instant::now();
    {
        let s = ChunkStore::open(&a)?;
        let mut buf = Vec::with_capacity(args.chunk_bytes);
        for i in 0..args.chunks {
            chunk(i, args.chunk_bytes, &mut buf);
            s.insert(&buf)?;
            if i % 200_000 == 199_999 {
                s.sync()?;
            }
        }
        s.sync()?;
        let st = s.stats()?;
        println!(
            "built in {:.1} s: {} chunks, packs {:.0} MiB, index {:.0} MiB on disk",
            t.elapsed().as_secs_f64(),
            st.chunks,
            st.disk_bytes as f64 / (1 << 20) as f64,
            dir_bytes(&a.join("index")) as f64 / (1 << 20) as f64,
        );
    }
    let t = Instant::now();
    let status = Command::new("cp").arg("-a").arg(&a).arg(&b).status()?;
    if !status.success() {
        return Err("cp -a failed".into());
    }
    println!("copied in {:.1} s", t.elapsed().as_secs_f64());
    println!(
        "{:<22} {:>10} {:>14} {:>14}  result",
        "pass", "time s", "peak RSS MiB", "open RSS MiB"
    );
    let exe = std::env::current_exe()?;
    let mut results = Vec::new();
    for (pass, dir) in [
        ("scrub-streaming", &a),
        ("scrub-in-memory", &a),
        ("gc-streaming", &a),
        ("gc-in-memory", &b),
    ] {
        let out = Command::new(&exe)
            .args(["--child", pass, "--dir"])
            .arg(dir)
            .args(["--chunks", &args.chunks.to_string()])
            .args(["--chunk-bytes", &args.chunk_bytes.to_string()])
            .args(["--dead-one-in", &args.dead_one_in.to_string()])
            .output()?;
        if !out.status.success() {
            return Err(format!("{pass} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        println!("{line}");
        results.push(line.rsplit_once("  ").map(|(_, r)| r.to_owned()));
    }
    if results[2] != results[3] {
        return Err("streaming and in-memory gc disagree".into());
    }
    Ok(())
}

/// One pass in this process; prints one table row.
fn child(args: &Args, pass: &str) -> Res<()> {
    let dir = args.dir.clone().ok_or("--dir")?;
    let s = ChunkStore::open(&dir)?;
    let (_, open_rss) = rss_kib();
    reset_peak();
    let t = Instant::now();
    let is_live = |i: u64| !i.is_multiple_of(args.dead_one_in);
    let mut buf = Vec::with_capacity(args.chunk_bytes);
    let result = match pass {
        "scrub-streaming" | "scrub-in-memory" => {
            let r = if pass == "scrub-streaming" {
                s.scrub(&mut |_, _| {})?
            } else {
                s.scrub_loaded(&mut |_, _| {})?
            };
            format!("checked {} corrupt {}", r.checked, r.corrupt.len())
        }
        "gc-streaming" => {
            let mut live = s.live_set();
            for i in (0..args.chunks).filter(|i| is_live(*i)) {
                chunk(i, args.chunk_bytes, &mut buf);
                live.insert(&ChunkId::of(&buf))?;
            }
            let r = s.gc(live)?;
            format!(
                "removed {} moved {} packs deleted {}",
                r.removed_chunks, r.moved_chunks, r.packs_deleted
            )
        }
        "gc-in-memory" => {
            let mut live = HashSet::new();
            for i in (0..args.chunks).filter(|i| is_live(*i)) {
                chunk(i, args.chunk_bytes, &mut buf);
                live.insert(ChunkId::of(&buf));
            }
            let r = s.gc_loaded(&live)?;
            format!(
                "removed {} moved {} packs deleted {}",
                r.removed_chunks, r.moved_chunks, r.packs_deleted
            )
        }
        other => return Err(format!("unknown pass {other}").into()),
    };
    let secs = t.elapsed().as_secs_f64();
    let (peak, _) = rss_kib();
    println!(
        "{pass:<22} {secs:>10.1} {:>14.1} {:>14.1}  {result}",
        peak as f64 / 1024.0,
        open_rss as f64 / 1024.0
    );
    Ok(())
}

/// Manifest bytes on the wire per generation, whole against delta.
fn manifest_section(args: &Args) {
    const CHUNK: u64 = 64 << 10;
    let n = (args.volume_gib << 30) / CHUNK;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut id = || {
        let mut b = [0u8; 32];
        rng.fill_bytes(&mut b);
        Some(ChunkId(b))
    };
    let mut m = Manifest {
        volume: "vol".into(),
        generation: 1,
        size: n * CHUNK,
        chunk_size: CHUNK as u32,
        chunks: (0..n).map(|_| id()).collect(),
        created_at_ms: 1_800_000_000_000,
    };
    let per_gen = ((n as f64) * args.change_percent / 100.0).round() as usize;
    println!(
        "# manifests: {} GiB volume, {n} chunks of 64 KiB all stored, {per_gen} ({} %) rewritten per generation",
        args.volume_gib, args.change_percent
    );
    println!(
        "{:<12} {:>16} {:>16} {:>8}",
        "generation", "v1 whole bytes", "v2 delta bytes", "ratio"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    for _ in 0..args.generations {
        let base = m.clone();
        m.generation += 1;
        m.created_at_ms += 2000;
        for _ in 0..per_gen {
            let i = rng.gen_range(0..m.chunks.len());
            let mut b = [0u8; 32];
            rng.fill_bytes(&mut b);
            m.chunks[i] = Some(ChunkId(b));
        }
        let whole = m.encode();
        let parts = |len: usize| len.div_ceil(MAX_FRAME) * FRAME_HEADER + len;
        let v1 = parts(whole.len());
        let delta = manifest_delta::encode(&base, &m);
        let head = Frame::json(
            Kind::DeltaHead,
            &DeltaHead {
                base: base.generation,
                delta_len: delta.len() as u64,
                manifest_id: ChunkId::of(&whole),
            },
        );
        let v2 = head.wire_len() + parts(delta.len());
        println!(
            "{:<12} {:>16} {:>16} {:>8.1}",
            m.generation,
            v1,
            v2,
            v1 as f64 / v2 as f64
        );
    }
}
