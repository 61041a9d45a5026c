//! `--section qemu`: a QEMU appliance's captures with dirty bitmaps vs
//! today's full-pass capture, on one volume.
//!
//! A thin disk (40 GiB, 8 GiB allocated by default) is the live image of a
//! TCG VM; a writer issues scattered 4 KiB writes through QEMU (`qemu-io`
//! on the VM's second monitor) at 1 MB/s for the whole run. Every
//! `--qemu-interval-ms` the owner captures the disk as the agent does
//! (`blockdev-backup` incremental on the bitmap, recorded with
//! `snapshot_changes_only`) and pushes the generation to the replica over
//! the mesh; then a few captures are forced to be full passes (the bitmap
//! forgotten: `sync=full` into a raw file, the whole copy read and hashed).
//!
//! Per capture: CPU seconds (this process, QEMU and the replica), bytes
//! read (QEMU's reads while it copies, from `/proc/<pid>/io` `rchar`, plus
//! what the store read of the copy), bytes QEMU copied, bytes on the wire.
//! RPO: the age of the newest generation the replica holds (from the
//! moment its capture began), sampled every 100 ms over the incremental
//! phase; p95. The allocated data is a 64 MiB random pattern repeated, so
//! the stores stay small (a full pass still reads and hashes all of it).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use datastore::VolumeStore;
use node_agent::drivers::qemu::{self, Accel};
use node_agent::drivers::qmp::Qmp;
use node_agent::drivers::{CaptureKind, Capturer, Instance, LaunchSpec};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;

use super::{blocking, cpu_secs, mib, Bench, Row};

/// The volume's name.
const VOLUME: &str = "vm-disk";
/// Bytes of one guest write.
const WRITE: u64 = 4096;
/// Writes per batch of the workload (batches are paced, so the rate holds
/// on average even when one `qemu-io` is slow).
const BATCH: u64 = 8;
/// The random pattern the allocated part repeats.
const PATTERN: usize = 64 << 20;
/// How long the workload runs alone, to measure its own CPU.
const BASELINE: Duration = Duration::from_secs(5);
/// How often the RPO is sampled.
const RPO_SAMPLE: Duration = Duration::from_millis(100);
/// Seed of the fill and of the writes' offsets.
const SEED: u64 = 7;
/// Targets: read per snapshot ≥ 50× less than a full pass.
const TARGET_READ_RATIO: f64 = 50.0;
/// RPO p95 targets: on a LAN, and on the `radio-poor` profile.
const TARGET_RPO_LAN_S: f64 = 3.0;
const TARGET_RPO_RADIO_POOR_S: f64 = 15.0;

/// Settings of the section.
#[derive(Debug, Clone)]
pub struct Settings {
    pub disk: u64,
    pub allocated: u64,
    pub write_bytes_per_s: u64,
    pub interval: Duration,
    pub incremental_secs: u64,
    pub full_passes: usize,
    /// The links the incremental phase runs over, one after the other.
    pub links: Vec<super::net::Link>,
}

/// One capture, measured.
#[derive(Debug, Default, Clone)]
struct Sample {
    full: bool,
    secs: f64,
    /// Of `secs`: QEMU's part (the backup job, `qemu-img` create and map).
    qemu_secs: f64,
    read: u64,
    copied: u64,
    store_read: u64,
}

/// `rchar` of a process: bytes it read through system calls (page cache
/// hits included: what a capture costs the host, whatever is cached).
fn rchar(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("rchar: ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// Write the allocated part: `allocated` bytes in 64 MiB extents spread
/// evenly over the disk, each the same random pattern.
fn fill(path: &Path, disk: u64, allocated: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut pattern = vec![0u8; PATTERN];
    StdRng::seed_from_u64(SEED).fill_bytes(&mut pattern);
    let extents = (allocated / PATTERN as u64).max(1);
    let stride = disk / extents;
    for k in 0..extents {
        f.write_all_at(&pattern, k * stride)?;
    }
    f.sync_all()?;
    Ok(())
}

fn spec(disk: u64) -> anyhow::Result<deploy::appliance::ApplianceSpec> {
    Ok(deploy::appliance::parse_manifest(&format!(
        "[[appliance]]\nname = \"vm\"\ndriver = \"qemu\"\nmemory_mb = 64\n\
         [[appliance.volume]]\nname = \"{VOLUME}\"\nsize = \"{disk}\"\n"
    ))?
    .remove(0))
}

/// A monitor the workload writes through.
enum Monitor {
    /// The VM's second monitor, connected here.
    Own(Qmp),
    /// The driver's own connection (shared with the captures).
    Instance(Arc<Instance>),
}

impl Monitor {
    async fn execute(
        &self,
        cmd: &str,
        args: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        Ok(match self {
            Monitor::Own(q) => q.execute(cmd, args).await?,
            Monitor::Instance(i) => i.qmp(cmd, args).await?,
        })
    }
}

/// Scattered 4 KiB writes at `rate` bytes/s through `qmp` until `stop`;
/// counts them in `done`. (One `qemu-io` at a time per monitor: two
/// monitors write in parallel to reach 1 MB/s under TCG.)
async fn workload(
    qmp: Monitor,
    seed: u64,
    disk: u64,
    rate: u64,
    stop: tokio_util::sync::CancellationToken,
    done: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let batches_per_s = (rate / WRITE / BATCH).max(1);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / batches_per_s as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let drive = qemu::drive_id(VOLUME);
    let mut fill = 0u8;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        for _ in 0..BATCH {
            fill = fill % 254 + 1;
            let offset = rng.gen_range(0..disk / WRITE) * WRITE;
            let cmd = format!("qemu-io {drive} \"write -P {fill} {offset} 4k\"");
            let out = qmp
                .execute("human-monitor-command", json!({ "command-line": cmd }))
                .await?;
            if out != json!("") {
                return Err(anyhow!("qemu-io: {out}"));
            }
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Capture and record one generation as the supervisor does; the
/// generation and what it cost.
async fn capture(
    store: &Arc<VolumeStore>,
    cap: &Capturer,
    dir: &Path,
    qemu_pid: u32,
) -> anyhow::Result<Option<(u64, Sample)>> {
    let (q0, r0) = (rchar(qemu_pid), Instant::now());
    let latest = {
        let st = store.clone();
        blocking(move || st.latest(VOLUME))
            .await?
            .map(|m| m.generation)
    };
    let Some(c) = cap.capture_since(VOLUME, dir, latest).await? else {
        return Ok(None);
    };
    let qemu_secs = r0.elapsed().as_secs_f64();
    let (st, source, kind) = (store.clone(), c.source.clone(), c.kind.clone());
    let recorded = blocking(move || match &kind {
        CaptureKind::Full => st
            .snapshot_changed(VOLUME, &source, 0, &[], &mut |_, _| {})
            .map_err(anyhow::Error::from),
        CaptureKind::Changed { base, ranges } => st
            .snapshot_changes_only(VOLUME, &source, *base, ranges, &mut |_, _| {})
            .map_err(anyhow::Error::from),
    })
    .await;
    let r = match recorded {
        Ok(r) => {
            cap.committed(VOLUME, r.manifest.generation);
            r
        }
        Err(e) => {
            cap.abandoned(VOLUME);
            return Err(e);
        }
    };
    let sample = Sample {
        full: c.kind == CaptureKind::Full,
        secs: r0.elapsed().as_secs_f64(),
        qemu_secs,
        read: rchar(qemu_pid) - q0 + r.bytes_read,
        copied: c.copied,
        store_read: r.bytes_read,
    };
    Ok(Some((r.manifest.generation, sample)))
}

fn p95(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * 0.95).ceil() as usize).clamp(1, v.len()) - 1]
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// What one incremental phase measured.
struct Phase {
    samples: Vec<Sample>,
    /// Bytes on the wire per capture.
    wire: u64,
    /// RPO samples, seconds.
    rpo: Vec<f64>,
    /// Mean time of a push, from opening its stream to the replica's commit.
    push_secs: f64,
    /// Pushes made (the newest generation each time: fewer than captures
    /// when a push outlasts the interval).
    pushes: usize,
    secs: f64,
    /// CPU seconds per capture, the workload's own subtracted (set by the caller).
    cpu: f64,
    /// The workload's rate over the phase, bytes/s (set by the caller).
    rate: f64,
}

/// Captures every `s.interval` for `s.incremental_secs` in a task of their
/// own (the supervisor's), pushes of the newest generation one at a time
/// here (the replication loop's), over `b.link`; the RPO every 100 ms
/// from the first replicated generation.
async fn phase(
    b: &mut Bench,
    store: &Arc<VolumeStore>,
    cap: &Capturer,
    run_dir: &Path,
    qemu_pid: u32,
    s: &Settings,
) -> anyhow::Result<Phase> {
    let phase = Instant::now();
    let (gen_tx, mut gen_rx) = tokio::sync::watch::channel(0u64);
    let began_at = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let captures = {
        let (store, cap, run_dir, began_at) = (
            store.clone(),
            cap.clone(),
            run_dir.to_path_buf(),
            began_at.clone(),
        );
        let (secs, interval) = (s.incremental_secs, s.interval);
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while phase.elapsed() < Duration::from_secs(secs) {
                let began = Instant::now();
                if let Some((g, sample)) = capture(&store, &cap, &run_dir, qemu_pid).await? {
                    began_at.lock().expect("lock").insert(g, began);
                    samples.push(sample);
                    let _ = gen_tx.send(g);
                }
                tokio::time::sleep_until((began + interval).into()).await;
            }
            anyhow::Ok(samples)
        })
    };
    // (when the capture began, when the replica held it)
    let mut held: Vec<(Instant, Instant)> = Vec::new();
    let (mut wire, mut push_secs) = (0u64, Vec::new());
    while gen_rx.changed().await.is_ok() {
        let p = b.push_one(VOLUME).await?;
        wire += p.wire();
        push_secs.push(p.secs);
        if let Some(began) = began_at.lock().expect("lock").get(&p.report.generation) {
            held.push((*began, Instant::now()));
        }
    }
    let samples = captures.await??;
    let secs = phase.elapsed().as_secs_f64();
    let mut rpo = Vec::new();
    if let Some(first) = held.first() {
        let mut t = first.1;
        let end = phase + Duration::from_secs_f64(secs);
        while t < end {
            let newest = held.iter().filter(|h| h.1 <= t).map(|h| h.0).max();
            if let Some(began) = newest {
                rpo.push(t.duration_since(began).as_secs_f64());
            }
            t += RPO_SAMPLE;
        }
    }
    let wire = wire / samples.len().max(1) as u64;
    Ok(Phase {
        push_secs: mean(&push_secs),
        pushes: push_secs.len(),
        samples,
        wire,
        rpo,
        secs,
        cpu: 0.0,
        rate: 0.0,
    })
}

/// Run the section; its rows of the final table.
pub async fn section(b: &mut Bench, s: Settings) -> anyhow::Result<Vec<Row>> {
    println!(
        "\n[qemu] a QEMU appliance's captures: {} disk, {} allocated, {} of scattered 4 KiB writes per second through QEMU, a capture every {:?}",
        mib(s.disk),
        mib(s.allocated),
        mib(s.write_bytes_per_s),
        s.interval
    );
    let store = b.store.clone();
    {
        let st = store.clone();
        let disk = s.disk;
        blocking(move || st.create(VOLUME, disk))
            .await
            .map_err(|e| anyhow!("create: {e}"))?;
    }
    let image = store.image_path(VOLUME);
    let t = Instant::now();
    {
        let (image, disk, allocated) = (image.clone(), s.disk, s.allocated);
        blocking(move || fill(&image, disk, allocated)).await?;
    }
    println!(
        "  wrote the allocated part in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let run_dir = b.dir.join("vm");
    let spec = spec(s.disk)?;
    let inst = qemu::launch(
        LaunchSpec {
            rack: "owner",
            spec: &spec,
            epoch: 1,
            volumes: vec![(VOLUME.into(), image.clone())],
            run_dir: run_dir.clone(),
        },
        Accel::Tcg,
    )
    .await
    .context("starting the VM")?;
    let qemu_pid = inst.pid();
    // No guest OS runs (the firmware finds nothing to boot and spins);
    // under TCG its vCPU holds QEMU's big lock most of the time and every
    // monitor command waits for it. Paused, the vCPU leaves the block layer
    // (writes, backup jobs) to the workload and the captures.
    inst.qmp("stop", serde_json::Value::Null).await?;
    let cap = inst.capturer().context("a VM has a capturer")?;

    // The first capture is a full pass (a new QEMU has no bitmap to trust).
    let t = Instant::now();
    let (g, first) = capture(&store, &cap, &run_dir, qemu_pid)
        .await?
        .context("the first capture made nothing")?;
    let pushed = b.push_one(VOLUME).await?;
    println!(
        "  first capture (full pass): generation {g}, {:.1} s, {} read, {} on the wire, {:.1} s in all",
        first.secs,
        mib(first.read),
        mib(pushed.wire()),
        t.elapsed().as_secs_f64()
    );

    let stop = tokio_util::sync::CancellationToken::new();
    let writes = Arc::new(AtomicU64::new(0));
    let inst = Arc::new(inst);
    let half = s.write_bytes_per_s / 2;
    let writers = [
        tokio::spawn(workload(
            Monitor::Own(Qmp::connect(&run_dir.join(qemu::PAUSE_SOCKET)).await?),
            SEED + 1,
            s.disk,
            half,
            stop.clone(),
            writes.clone(),
        )),
        tokio::spawn(workload(
            Monitor::Instance(inst.clone()),
            SEED + 2,
            s.disk,
            s.write_bytes_per_s - half,
            stop.clone(),
            writes.clone(),
        )),
    ];

    // The workload alone, to subtract its CPU from the captures'.
    let all_cpu = |b: &Bench| {
        let (owner, replica) = b.cpu_sides();
        owner + replica + cpu_secs(qemu_pid)
    };
    let (t0, cpu0) = (Instant::now(), all_cpu(b));
    tokio::time::sleep(BASELINE).await;
    let idle_cpu_per_s = (all_cpu(b) - cpu0) / t0.elapsed().as_secs_f64();

    // Incremental phases, one per link: captures on their schedule, pushes
    // of the newest generation behind the link.
    let mut phases = Vec::new();
    for &link in &s.links {
        let cpu0 = all_cpu(b);
        let w0 = writes.load(Ordering::Relaxed);
        b.link = Some(link);
        let r = phase(b, &store, &cap, &run_dir, qemu_pid, &s).await;
        b.link = None;
        let mut p = r?;
        p.cpu = (all_cpu(b) - cpu0 - idle_cpu_per_s * p.secs) / p.samples.len().max(1) as f64;
        p.rate = (writes.load(Ordering::Relaxed) - w0) as f64 * WRITE as f64 / p.secs;
        phases.push((link, p));
    }
    anyhow::ensure!(!phases.is_empty(), "no link to measure (--qemu-links)");

    // Today's capture on the same volume, under the same writes.
    let mut full: Vec<Sample> = Vec::new();
    let (t0, cpu0) = (Instant::now(), all_cpu(b));
    let mut full_wire = 0u64;
    for _ in 0..s.full_passes {
        cap.abandoned(VOLUME);
        if let Some((_, sample)) = capture(&store, &cap, &run_dir, qemu_pid).await? {
            anyhow::ensure!(sample.full, "a forgotten bitmap must give a full pass");
            full_wire += b.push_one(VOLUME).await?.wire();
            full.push(sample);
        }
    }
    let full_cpu = (all_cpu(b) - cpu0 - idle_cpu_per_s * t0.elapsed().as_secs_f64())
        / full.len().max(1) as f64;
    let full_wire = full_wire / full.len().max(1) as u64;
    stop.cancel();
    for w in writers {
        w.await??;
    }
    let mut inst = Arc::try_unwrap(inst).map_err(|_| anyhow!("the VM is still shared"))?;
    inst.stop(Duration::from_secs(5)).await;

    let avg =
        |v: &[&Sample], f: fn(&Sample) -> f64| mean(&v.iter().map(|s| f(s)).collect::<Vec<_>>());
    let fulls: Vec<&Sample> = full.iter().collect();
    let row = |label: &str, v: &[&Sample], cpu: f64, wire: u64| {
        println!(
            "  {label:<22} {:>3} captures: {:>6.2} s each, CPU {:>6.2} s (owner, QEMU, replica; the workload's own subtracted), read {:>10}, QEMU copied {:>10}, store read {:>10}, wire {:>10}",
            v.len(),
            avg(v, |s| s.secs),
            cpu,
            mib(avg(v, |s| s.read as f64) as u64),
            mib(avg(v, |s| s.copied as f64) as u64),
            mib(avg(v, |s| s.store_read as f64) as u64),
            mib(wire),
        );
    };
    println!("  (the workload alone costs {idle_cpu_per_s:.2} CPU s/s)");
    let mut rpo_rows = Vec::new();
    for (link, p) in &phases {
        let inc: Vec<&Sample> = p.samples.iter().filter(|s| !s.full).collect();
        println!(
            "  over {} ({:.1} Mbit/s, {:?} one way): workload {:.2} MB/s of 4 KiB writes through QEMU for {:.0} s",
            link.name,
            link.bytes_per_s * 8.0 / 1e6,
            link.one_way,
            p.rate / 1e6,
            p.secs
        );
        row(&format!("incremental, {}", link.name), &inc, p.cpu, p.wire);
        println!(
            "  where the time goes over {}: capture {:.3} s (QEMU {:.3} s, store {:.3} s), push {:.3} s ({} pushes for {} captures), interval {:?}",
            link.name,
            avg(&inc, |s| s.secs),
            avg(&inc, |s| s.qemu_secs),
            avg(&inc, |s| s.secs - s.qemu_secs),
            p.push_secs,
            p.pushes,
            p.samples.len(),
            s.interval
        );
        let rpo95 = p95(p.rpo.clone());
        let mut sorted = p.rpo.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "  RPO over {} (age of the replica's newest generation) over {} samples: p50 {:.2} s, p95 {rpo95:.2} s, max {:.2} s",
            link.name,
            p.rpo.len(),
            sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN),
            sorted.last().copied().unwrap_or(f64::NAN),
        );
        let (figure, target) = match link.name {
            "lan" => ("qemu: RPO p95 over lan", TARGET_RPO_LAN_S),
            _ => ("qemu: RPO p95 over radio-poor", TARGET_RPO_RADIO_POOR_S),
        };
        rpo_rows.push(Row {
            figure,
            measured: format!("{rpo95:.2} s"),
            target: format!("<= {target:.0} s"),
            pass: Some(rpo95 <= target),
        });
    }
    row("full pass", &fulls, full_cpu, full_wire);
    // Read per capture from the first link's phase (the read does not
    // depend on the link).
    let inc: Vec<&Sample> = phases[0].1.samples.iter().filter(|s| !s.full).collect();
    anyhow::ensure!(!inc.is_empty(), "no incremental capture was made");
    let read_inc = avg(&inc, |s| s.read as f64);
    let read_full = avg(&fulls, |s| s.read as f64);
    let ratio = read_full / read_inc.max(1.0);
    Ok(vec![Row {
        figure: "qemu: bytes read per capture, full pass / incremental",
        measured: format!(
            "{ratio:.0}x ({} vs {})",
            mib(read_full as u64),
            mib(read_inc as u64)
        ),
        target: format!(">= {TARGET_READ_RATIO:.0}x"),
        pass: (!fulls.is_empty()).then_some(ratio >= TARGET_READ_RATIO),
    }]
    .into_iter()
    .chain(rpo_rows)
    .collect())
}
