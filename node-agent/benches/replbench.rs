//! `replbench`: the replication benchmarks.
//!
//! ```text
//! cargo run --release -p node-agent --bin replbench [-- --quick | --size-mib N | --skip-rsync | --dir D]
//! ```
//!
//! Two OS processes on one machine: this one is the owner rack; it
//! re-executes itself (with `REPLBENCH_CHILD_DIR` set) as the replica rack.
//! Both join one freshly generated fleet and talk over the real mesh
//! (libp2p-stream on libp2p-quic, fleet admission). It prints three figures:
//!
//! 1. Throughput of the full replication path (read chunks from the
//!    owner's store, hash, send, verify, write and sync on the replica,
//!    publish) as a ratio to raw quinn bulk throughput between the same two
//!    processes (same TLS identity, same QUIC windows). Target ≥ 0.7.
//!    Five rounds of 512 MiB (push, then the same bytes over raw quinn);
//!    the figure is the median round ratio, because the machine is shared
//!    (raw quinn alone varies by a fifth between rounds here).
//!    Diagnostics: a mesh stream into a sink (the transport without the
//!    store) and the CPU seconds per GB of both processes for each path.
//! 2. Bytes on the wire to bring a replica of a 4 GiB thin image up to date
//!    after 1 % of its 4 KiB blocks were overwritten, next to
//!    `rsync --stats` on the same two files. Target ≤ 1/3 of rsync.
//!    Layout: 16 extents of 64 MiB random data, one every 256 MiB, holes
//!    elsewhere; the writes are uniform over the whole address space (so
//!    three quarters land in holes), go to the owner's live image, and a
//!    snapshot captures them. "Bytes on the wire" is every byte of the push
//!    stream both ways, as rsync's "Total bytes sent" + "received".
//! 3. Bytes sent to replicate five volumes cloned from one 1 GiB base with
//!    small differences, over the base size. Target ≤ 1.2. Each clone
//!    differs by a 2 MiB contiguous run plus 256 scattered 4 KiB writes;
//!    pushes run one at a time unless `--clone-pushes N`.
//!
//! Layout:
//! - `replbench/ctl.rs`: parent ↔ child control lines.
//! - `replbench/child.rs`: the replica process.
//! - `replbench/net.rs`: mesh settings, raw quinn endpoints, byte counting.
//! - `replbench/images.rs`: image generation and modification.
//! - `replbench/dirty.rs`: section `dirty` (`--section dirty`): snapshot
//!   cost of a process appliance under scattered writes, XFS vs ext4.

#[path = "replbench/child.rs"]
mod child;
#[path = "replbench/ctl.rs"]
mod ctl;
#[path = "replbench/dirty.rs"]
mod dirty;
#[path = "replbench/images.rs"]
mod images;
#[path = "replbench/net.rs"]
mod net;
#[path = "replbench/qemu.rs"]
mod qemu;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::Parser;
use datastore::replicate::limiter::LinkLimiter;
use datastore::replicate::{push, TransferCounters, PUSH_PROTOCOL};
use datastore::{Manifest, VolumeStore};
use deploy::FleetKey;
use futures::StreamExt as _;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use mesh::MeshHandle;
use rand::RngCore;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ctl::{Reply, Request};
use crate::images::{CloneDiff, ThinLayout, MIB};

/// Rack name of the owner (this process).
const OWNER: &str = "owner";

/// Replies and events buffered from the child.
const CHILD_QUEUE: usize = 64;

/// How long any single step may take before the benchmark gives up
/// (a 4 GiB export on a slow disk included).
const STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// Size of the buffer the raw QUIC sender writes from, over and over.
const RAW_WRITE: usize = 1 << 20;

/// The targets of the figures.
const TARGET_THROUGHPUT_RATIO: f64 = 0.7;
const TARGET_VS_RSYNC: f64 = 1.0 / 3.0;
const TARGET_CLONES: f64 = 1.2;

/// Seeds: every image is distinct random data, so nothing deduplicates
/// across figures by accident (the same seed would give the same bytes:
/// keep the ranges apart; rounds of figure 1 use `SEED_BULK + round`).
const SEED_BULK: u64 = 1000;
const SEED_THIN: u64 = 2;
const SEED_WRITES: u64 = 3;
const SEED_BASE: u64 = 4;
const SEED_CLONES: u64 = 100;

#[derive(Debug, Parser)]
#[command(
    name = "replbench",
    about = "Replication benchmark: full-path throughput vs raw QUIC, bytes after scattered writes vs rsync, clones vs one base"
)]
struct Args {
    /// Size of each random volume of the throughput figure, in MiB
    /// [default: 512; 64 with --quick].
    #[arg(long)]
    size_mib: Option<u64>,
    /// Rounds of the throughput figure (push, then raw quinn, each round);
    /// the figure is their median ratio.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Size of the thin image, in MiB [default: 4096; 256 with --quick].
    #[arg(long)]
    thin_mib: Option<u64>,
    /// Random data inside the thin image, in MiB [default: a quarter of it].
    #[arg(long)]
    thin_data_mib: Option<u64>,
    /// Size of the clones' base image, in MiB [default: 1024; 64 with --quick].
    #[arg(long)]
    base_mib: Option<u64>,
    /// Pushes of the five clones running at once (the agent allows up to 4).
    #[arg(long, default_value_t = 1)]
    clone_pushes: usize,
    /// Do not run rsync (figure 2 then has no comparison).
    #[arg(long)]
    skip_rsync: bool,
    /// Small sizes: a smoke run in well under a minute.
    #[arg(long)]
    quick: bool,
    /// Do not export replicas to check them bit for bit (saves time).
    #[arg(long)]
    no_verify: bool,
    /// Figures to run, e.g. `1,3` [default: all].
    #[arg(long, value_delimiter = ',')]
    figures: Vec<u8>,
    /// Directory for the temporary stores and images [default: the system temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the temporary directory.
    #[arg(long)]
    keep: bool,
    /// Sections to run besides the figures, `dirty`, `qemu` (then the
    /// figures run only if `--figures` names them).
    #[arg(long, value_delimiter = ',')]
    section: Vec<String>,
    /// `--section qemu`: the VM's disk, in GiB [default: 40; 4 with --quick].
    #[arg(long)]
    qemu_disk_gib: Option<u64>,
    /// `--section qemu`: allocated part of the disk, in GiB [default: 8; 1 with --quick].
    #[arg(long)]
    qemu_allocated_gib: Option<u64>,
    /// `--section qemu`: scattered 4 KiB writes through QEMU, bytes/s.
    #[arg(long, default_value_t = 1_000_000)]
    qemu_write_rate: u64,
    /// `--section qemu`: time between captures, ms.
    #[arg(long, default_value_t = 1000)]
    qemu_interval_ms: u64,
    /// `--section qemu`: seconds of incremental captures [default: 60; 15 with --quick].
    #[arg(long)]
    qemu_secs: Option<u64>,
    /// `--section qemu`: full-pass captures to compare with.
    #[arg(long, default_value_t = 2)]
    qemu_full_passes: usize,
    /// `--section qemu`: links the incremental phase runs over, one after
    /// the other (`lan`, `radio-poor`).
    #[arg(long, value_delimiter = ',', default_values_t = ["lan".to_string(), "radio-poor".to_string()])]
    qemu_links: Vec<String>,
    /// `dirty`: size of the large thin volume, GiB [default: 40; 4 with --quick].
    #[arg(long)]
    dirty_size_gib: Option<u64>,
    /// `dirty`: random data in it, MiB [default: 8192; 512 with --quick].
    #[arg(long)]
    dirty_alloc_mib: Option<u64>,
    /// `dirty`: snapshots under writes per volume.
    #[arg(long, default_value_t = 5)]
    dirty_rounds: usize,
    /// `dirty`: rate of the scattered 4 KiB writes, MB/s.
    #[arg(long, default_value_t = 1.0)]
    dirty_write_mbps: f64,
    /// `dirty`: seconds between snapshots.
    #[arg(long, default_value_t = 2.0)]
    dirty_interval_s: f64,
}

fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(dir) = std::env::var_os(ctl::CHILD_ENV) {
        rt.block_on(child::run(PathBuf::from(dir)))?;
        return Ok(ExitCode::SUCCESS);
    }
    let args = Args::parse();
    rt.block_on(run(args))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

/// CPU seconds (user + system, all threads) a process has used so far,
/// from `/proc/PID/stat` (in USER_HZ ticks, 100 per second on Linux).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15.
    let tick = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (tick(14) + tick(15)) as f64 / 100.0
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// One push as the owner saw it.
#[derive(Debug)]
struct Pushed {
    report: push::PushReport,
    /// Application bytes owner → replica (everything: offer, manifest, data, done).
    sent: u64,
    /// Application bytes replica → owner (need bitmap, commit).
    received: u64,
    /// From opening the stream to the replica's commit (generation published).
    secs: f64,
    /// Chunk references of the manifest (non-zero chunks).
    referenced: u64,
}

impl Pushed {
    fn wire(&self) -> u64 {
        self.sent + self.received
    }
}

/// The owner's side: its store, its mesh node, the child replica.
struct Bench {
    dir: PathBuf,
    store: Arc<VolumeStore>,
    mesh: MeshHandle,
    keypair: Keypair,
    replica: PeerId,
    quic_addr: SocketAddr,
    child: Child,
    stdin: ChildStdin,
    served: mpsc::Receiver<Reply>,
    replies: mpsc::Receiver<Reply>,
    cancel: CancellationToken,
    verify: bool,
    /// The link pushes go through (`None`: the mesh stream as it is).
    link: Option<net::Link>,
}

impl Bench {
    async fn start(dir: PathBuf, verify: bool) -> anyhow::Result<Bench> {
        let fleet = FleetKey::generate();
        let child_dir = dir.join("replica");
        std::fs::create_dir_all(&child_dir)?;
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .env(ctl::CHILD_ENV, &child_dir)
            .env(ctl::FLEET_ENV, fleet.to_secret_b64())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the replica process")?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let (served_tx, served) = mpsc::channel(CHILD_QUEUE);
        let (reply_tx, mut replies) = mpsc::channel(CHILD_QUEUE);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Reply>(&line) {
                    Ok(r @ Reply::Served { .. }) => {
                        let _ = served_tx.send(r).await;
                    }
                    Ok(r) => {
                        let _ = reply_tx.send(r).await;
                    }
                    Err(e) => eprintln!("replbench: bad line from the replica ({e}): {line}"),
                }
            }
        });
        let (mesh_addr, quic_addr, replica) =
            match tokio::time::timeout(Duration::from_secs(30), replies.recv()).await {
                Ok(Some(Reply::Ready {
                    mesh_addr,
                    quic_addr,
                    peer_id,
                })) => (mesh_addr, quic_addr, peer_id),
                Ok(other) => bail!("replica did not start: {other:?}"),
                Err(_) => bail!("replica did not start within 30 s"),
            };
        let replica: PeerId = replica
            .parse()
            .map_err(|e| anyhow!("replica peer id: {e}"))?;
        let quic_addr: SocketAddr = quic_addr.parse()?;

        let owner_dir = dir.join("owner");
        let store = Arc::new(
            blocking(move || VolumeStore::open(owner_dir.join("store")))
                .await
                .map_err(|e| anyhow!("opening the owner store: {e}"))?,
        );
        let keypair = Keypair::generate_ed25519();
        let cancel = CancellationToken::new();
        let (mesh, _task) = mesh::start(
            net::mesh_settings(&fleet, OWNER, keypair.clone(), vec![mesh_addr.parse()?]),
            cancel.child_token(),
        )
        .await
        .map_err(|e| anyhow!("starting the mesh: {e}"))?;
        let mut bench = Bench {
            dir,
            store,
            mesh,
            keypair,
            replica,
            quic_addr,
            child,
            stdin,
            served,
            replies,
            cancel,
            verify,
            link: None,
        };
        // Admission is mutual: wait until each side admitted the other.
        let t0 = Instant::now();
        while !bench.mesh.admitted().iter().any(|(p, _)| *p == replica) {
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the replica was not admitted within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match bench
            .request(Request::WaitAdmitted {
                peer: bench.mesh.peer_id.to_base58(),
            })
            .await?
        {
            Reply::Admitted => {}
            other => bail!("the replica did not admit us: {other:?}"),
        }
        println!(
            "mesh up: owner {} ⇄ replica {} (admitted in {:.2} s)",
            bench.mesh.peer_id,
            replica,
            t0.elapsed().as_secs_f64()
        );
        Ok(bench)
    }

    async fn request(&mut self, req: Request) -> anyhow::Result<Reply> {
        let mut line = serde_json::to_vec(&req)?;
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await?;
        match tokio::time::timeout(STEP_TIMEOUT, self.replies.recv()).await {
            Ok(Some(Reply::Failed { error })) => bail!("replica: {error}"),
            Ok(Some(r)) => Ok(r),
            Ok(None) => bail!("the replica process exited"),
            Err(_) => bail!("the replica did not answer {req:?} in time"),
        }
    }

    /// CPU seconds used so far by both processes.
    fn cpu(&self) -> f64 {
        let (owner, replica) = self.cpu_sides();
        owner + replica
    }

    /// CPU seconds so far of (this process, the replica process).
    fn cpu_sides(&self) -> (f64, f64) {
        (
            cpu_secs(std::process::id()),
            self.child.id().map_or(0.0, cpu_secs),
        )
    }

    async fn import(&self, name: &str, src: &Path) -> anyhow::Result<Manifest> {
        let (st, name, src) = (self.store.clone(), name.to_string(), src.to_path_buf());
        blocking(move || st.import(&name, &src, &mut |_, _| {}))
            .await
            .map_err(|e| anyhow!("import: {e}"))
    }

    /// Push the latest generation of each volume, at most `concurrency` at
    /// once, each on its own mesh stream (as the agent does), and wait for
    /// the replica to confirm every one.
    async fn push_all(
        &mut self,
        names: &[String],
        concurrency: usize,
    ) -> anyhow::Result<Vec<Pushed>> {
        let mut manifests = Vec::new();
        for name in names {
            let (st, n) = (self.store.clone(), name.clone());
            let m = blocking(move || st.latest(&n))
                .await
                .map_err(|e| anyhow!("latest: {e}"))?
                .with_context(|| format!("{name} has no generation"))?;
            manifests.push(m);
        }
        let (store, mesh, replica, link) = (
            self.store.clone(),
            self.mesh.clone(),
            self.replica,
            self.link,
        );
        let limiter = LinkLimiter::new(0);
        let limiter = &limiter;
        let results: Vec<anyhow::Result<Pushed>> = futures::stream::iter(manifests)
            .map(|m| {
                let (store, mesh) = (store.clone(), mesh.clone());
                async move {
                    let referenced = m.chunks.iter().filter(|c| c.is_some()).count() as u64;
                    let t0 = Instant::now();
                    let stream = mesh
                        .open_stream(replica, PUSH_PROTOCOL)
                        .await
                        .map_err(|e| anyhow!("opening a push stream: {e}"))?;
                    let stream: Box<dyn net::Duplex> = match link {
                        Some(l) => Box::new(net::shaped(stream, l)),
                        None => Box::new(stream),
                    };
                    let (stream, tally) = net::Counting::new(stream);
                    let counters = TransferCounters::default();
                    let report = push::push(store, OWNER, m, stream, limiter, &counters)
                        .await
                        .map_err(|e| anyhow!("push: {e}"))?;
                    let secs = t0.elapsed().as_secs_f64();
                    let (sent, received) = tally.get();
                    Ok(Pushed {
                        report,
                        sent,
                        received,
                        secs,
                        referenced,
                    })
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        let pushed = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        for _ in 0..pushed.len() {
            match tokio::time::timeout(Duration::from_secs(30), self.served.recv()).await {
                Ok(Some(Reply::Served { error: Some(e), .. })) => {
                    bail!("replica failed to serve a push: {e}")
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("the replica process exited"),
                Err(_) => bail!("the replica never reported a served push"),
            }
        }
        Ok(pushed)
    }

    async fn push_one(&mut self, name: &str) -> anyhow::Result<Pushed> {
        Ok(self.push_all(&[name.to_string()], 1).await?.remove(0))
    }

    /// Export `volume`@`generation` on the replica and compare it with `expected`.
    async fn check_replica(
        &mut self,
        volume: &str,
        generation: u64,
        expected: &Path,
    ) -> anyhow::Result<()> {
        if !self.verify {
            return Ok(());
        }
        let t0 = Instant::now();
        let out = self.dir.join(format!("export-{volume}-{generation}.img"));
        match self
            .request(Request::Export {
                volume: volume.into(),
                generation,
                to: out.clone(),
            })
            .await?
        {
            Reply::Exported { error: None } => {}
            Reply::Exported { error: Some(e) } => {
                bail!("replica export of {volume}@{generation}: {e}")
            }
            other => bail!("unexpected reply {other:?}"),
        }
        let (a, b) = (out.clone(), expected.to_path_buf());
        let same = blocking(move || images::same_bytes(&a, &b)).await?;
        let _ = std::fs::remove_file(&out);
        if !same {
            bail!("the replica's {volume}@{generation} differs from the source");
        }
        println!("  verified: replica export of {volume}@{generation} is bit-identical to the source ({:.1} s)", t0.elapsed().as_secs_f64());
        Ok(())
    }

    /// Send `bytes` over one raw quinn stream to the child's sink; seconds
    /// from opening the stream to the sink's acknowledgement of every byte.
    async fn raw_quic(&self, bytes: u64) -> anyhow::Result<f64> {
        let (endpoint, conn) =
            net::quic_connect(&self.keypair, self.quic_addr, self.replica).await?;
        let mut buf = vec![0u8; RAW_WRITE];
        rand::thread_rng().fill_bytes(&mut buf);
        let t0 = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(RAW_WRITE as u64) as usize;
            send.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        send.finish()?;
        let mut ack = [0u8; 8];
        recv.read_exact(&mut ack).await?;
        let secs = t0.elapsed().as_secs_f64();
        if u64::from_le_bytes(ack) != bytes {
            bail!("raw sink got {} bytes of {bytes}", u64::from_le_bytes(ack));
        }
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        Ok(secs)
    }

    /// Send `bytes` over one mesh stream to the child's sink (no store):
    /// seconds until the sink acknowledged every byte.
    async fn mesh_sink(&self, bytes: u64) -> anyhow::Result<f64> {
        use futures::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; RAW_WRITE];
        rand::thread_rng().fill_bytes(&mut buf);
        let t0 = Instant::now();
        let mut stream = self
            .mesh
            .open_stream(self.replica, ctl::SINK_PROTOCOL)
            .await
            .map_err(|e| anyhow!("opening a sink stream: {e}"))?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(RAW_WRITE as u64) as usize;
            stream.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        stream.close().await?;
        let mut ack = [0u8; 8];
        stream.read_exact(&mut ack).await?;
        let secs = t0.elapsed().as_secs_f64();
        if u64::from_le_bytes(ack) != bytes {
            bail!("mesh sink got {} bytes of {bytes}", u64::from_le_bytes(ack));
        }
        Ok(secs)
    }

    async fn stop(mut self) {
        // Our mesh first, so neither side reports the other as suspect.
        self.cancel.cancel();
        if let Ok(mut line) = serde_json::to_vec(&Request::Quit) {
            line.push(b'\n');
            let _ = self.stdin.write_all(&line).await;
            let _ = self.stdin.flush().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = self.child.start_kill();
        self.cancel.cancel();
    }
}

/// A line of the final table.
struct Row {
    figure: &'static str,
    measured: String,
    target: String,
    /// `None`: not measured (skipped).
    pass: Option<bool>,
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let quick = args.quick;
    let bulk = args.size_mib.unwrap_or(if quick { 64 } else { 512 }) * MIB;
    let thin_size = args.thin_mib.unwrap_or(if quick { 256 } else { 4096 }) * MIB;
    let thin_data = args.thin_data_mib.map_or(thin_size / 4, |m| m * MIB);
    let base = args.base_mib.unwrap_or(if quick { 64 } else { 1024 }) * MIB;
    let figures: Vec<u8> = if args.figures.is_empty() && args.section.is_empty() {
        vec![1, 2, 3]
    } else {
        args.figures.clone()
    };
    let root = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&root)?;
    let tmp = tempfile::Builder::new()
        .prefix("replbench-")
        .tempdir_in(&root)?;
    let dir = tmp.path().to_path_buf();
    println!(
        "replbench: working in {} ({} mode)",
        dir.display(),
        if quick { "quick" } else { "full" }
    );
    let t_all = Instant::now();

    if let Some(other) = args
        .section
        .iter()
        .find(|s| !["dirty", "qemu"].contains(&s.as_str()))
    {
        bail!("unknown section {other:?} (known: dirty, qemu)");
    }
    // `dirty` needs no replica process: it runs first, on its own.
    if args.section.iter().any(|s| s == "dirty") {
        let o = dirty::Opts {
            dir: dir.clone(),
            size: args.dirty_size_gib.unwrap_or(if quick { 4 } else { 40 }) << 30,
            alloc: args
                .dirty_alloc_mib
                .unwrap_or(if quick { 512 } else { 8192 })
                * MIB,
            rounds: args.dirty_rounds,
            write_bps: args.dirty_write_mbps * 1e6,
            interval: Duration::from_secs_f64(args.dirty_interval_s),
        };
        let rows = blocking(move || dirty::run(&o)).await?;
        print_rows(&rows);
        if figures.is_empty() && !args.section.iter().any(|s| s == "qemu") {
            println!("(total run time {:.0} s)", t_all.elapsed().as_secs_f64());
            return Ok(ExitCode::SUCCESS);
        }
    }

    let mut bench = Bench::start(dir.clone(), !args.no_verify).await?;
    let mut rows = Vec::new();
    let result = async {
        if figures.contains(&1) {
            rows.push(figure1(&mut bench, bulk, args.rounds).await?);
        }
        if figures.contains(&2) {
            rows.push(figure2(&mut bench, thin_size, thin_data, args.skip_rsync).await?);
        }
        if figures.contains(&3) {
            rows.push(figure3(&mut bench, base, args.clone_pushes).await?);
        }
        if args.section.iter().any(|s| s == "qemu") {
            let gib = 1 << 30;
            let settings = qemu::Settings {
                disk: args.qemu_disk_gib.unwrap_or(if quick { 4 } else { 40 }) * gib,
                allocated: args.qemu_allocated_gib.unwrap_or(if quick { 1 } else { 8 }) * gib,
                write_bytes_per_s: args.qemu_write_rate,
                interval: Duration::from_millis(args.qemu_interval_ms),
                incremental_secs: args.qemu_secs.unwrap_or(if quick { 15 } else { 60 }),
                full_passes: args.qemu_full_passes,
                links: args
                    .qemu_links
                    .iter()
                    .map(|l| match l.as_str() {
                        "lan" => Ok(net::LAN),
                        "radio-poor" => Ok(net::RADIO_POOR),
                        other => Err(anyhow!("unknown link {other:?} (known: lan, radio-poor)")),
                    })
                    .collect::<anyhow::Result<_>>()?,
            };
            rows.extend(qemu::section(&mut bench, settings).await?);
        }
        anyhow::Ok(())
    }
    .await;
    let t_stop = Instant::now();
    bench.stop().await;
    if args.keep {
        let kept = tmp.keep();
        println!("kept {}", kept.display());
    } else {
        drop(tmp);
    }
    println!(
        "(stopped the replica and removed the temporary files in {:.1} s)",
        t_stop.elapsed().as_secs_f64()
    );
    result?;
    print_rows(&rows);
    println!("(total run time {:.0} s)", t_all.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

/// The summary table.
fn print_rows(rows: &[Row]) {
    println!();
    println!("{:<58} {:<44} {:<8} result", "figure", "measured", "target");
    println!("{}", "-".repeat(122));
    for r in rows {
        let res = match r.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "SKIP",
        };
        println!(
            "{:<58} {:<44} {:<8} {}",
            r.figure, r.measured, r.target, res
        );
    }
}

/// Figure 1: full replication path vs raw quinn, same bytes, same processes.
///
/// The machine is shared (other builds, two cores), so one pair of runs is
/// noisy. Rounds alternate: push, raw, push, raw, ...; each push is compared
/// with the mean of the raw runs just before and after it, and the figure
/// is the median of the rounds' ratios.
async fn figure1(b: &mut Bench, size: u64, rounds: usize) -> anyhow::Result<Row> {
    let rounds = rounds.max(1);
    println!("\n[1] throughput: full replication path vs raw quinn, {rounds} rounds of {} of random data", mib(size));
    let t0 = Instant::now();
    let mut import_secs = 0f64;
    let mut generations = Vec::new();
    for r in 0..rounds {
        let src = b.dir.join("bulk.img");
        let s = src.clone();
        blocking(move || images::random_file(&s, size, SEED_BULK + r as u64)).await?;
        let t = Instant::now();
        let m = b.import(&format!("bulk-{r}"), &src).await?;
        import_secs += t.elapsed().as_secs_f64();
        generations.push(m.generation);
        let _ = std::fs::remove_file(&src);
    }
    println!(
        "  generated and imported {rounds} volumes in {:.1} s (import: read, hash, pack, sync at {:.0} MB/s)",
        t0.elapsed().as_secs_f64(),
        mbps(size * rounds as u64, import_secs)
    );
    let mut push_rates = Vec::new();
    let mut raw_rates = Vec::new();
    let (mut push_cpu, mut raw_cpu, mut sink_cpu, mut bytes) = (0f64, 0f64, 0f64, 0u64);
    let mut sink_rates = Vec::new();
    let (mut push_sides, mut raw_sides) = ((0f64, 0f64), (0f64, 0f64));
    for r in 0..rounds {
        let c0 = b.cpu_sides();
        let p = b.push_one(&format!("bulk-{r}")).await?;
        let c1 = b.cpu_sides();
        push_cpu += (c1.0 - c0.0) + (c1.1 - c0.1);
        push_sides.0 += c1.0 - c0.0;
        push_sides.1 += c1.1 - c0.1;
        bytes += p.sent;
        let rate = mbps(p.sent, p.secs);
        println!(
            "  round {}: mesh push of {} chunks, {} in {:.2} s = {:.0} MB/s (until the replica published it)",
            r + 1,
            p.report.chunks,
            mib(p.sent),
            p.secs,
            rate
        );
        push_rates.push(rate);
        let c0 = b.cpu_sides();
        let secs = b.raw_quic(p.sent).await?;
        let c1 = b.cpu_sides();
        raw_cpu += (c1.0 - c0.0) + (c1.1 - c0.1);
        raw_sides.0 += c1.0 - c0.0;
        raw_sides.1 += c1.1 - c0.1;
        let raw = mbps(p.sent, secs);
        println!(
            "           raw quinn, same bytes: {:.2} s = {raw:.0} MB/s",
            secs
        );
        raw_rates.push(raw);
        let c0 = b.cpu();
        let secs = b.mesh_sink(p.sent).await?;
        sink_cpu += b.cpu() - c0;
        let sink = mbps(p.sent, secs);
        println!("           mesh stream to a sink (transport only, no store), same bytes: {:.2} s = {sink:.0} MB/s", secs);
        sink_rates.push(sink);
    }
    let mut ratios: Vec<f64> = (0..rounds)
        .map(|r| {
            let reference = if r == 0 {
                raw_rates[0]
            } else {
                (raw_rates[r - 1] + raw_rates[r]) / 2.0
            };
            push_rates[r] / reference
        })
        .collect();
    println!(
        "  per-round ratios: {}",
        ratios
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    ratios.sort_by(f64::total_cmp);
    let ratio = ratios[rounds / 2];
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (push_med, raw_med) = (median(&push_rates), median(&raw_rates));
    println!("  median ratio full path / raw quinn: {ratio:.2} (median rates {push_med:.0} vs {raw_med:.0} MB/s)");
    let gb = bytes as f64 / 1e9;
    println!(
        "  CPU of both processes per GB: full path {:.2} s, mesh stream to a sink {:.2} s, raw quinn {:.2} s; were the two cores ours alone and all CPU-bound, full path / raw would be about {:.2}",
        push_cpu / gb,
        sink_cpu / gb,
        raw_cpu / gb,
        raw_cpu / push_cpu
    );
    println!(
        "  CPU per GB by side (sender / receiver): full path {:.2} / {:.2} s, raw quinn {:.2} / {:.2} s",
        push_sides.0 / gb,
        push_sides.1 / gb,
        raw_sides.0 / gb,
        raw_sides.1 / gb
    );
    println!(
        "  (diagnostic) median mesh-stream sink rate {:.0} MB/s = {:.2} of raw quinn",
        median(&sink_rates),
        median(&sink_rates) / raw_med
    );
    let last = rounds - 1;
    let live = b.store.image_path(&format!("bulk-{last}"));
    b.check_replica(&format!("bulk-{last}"), generations[last], &live)
        .await?;
    Ok(Row {
        figure: "1 full replication path / raw quinn (loopback)",
        measured: format!("{ratio:.2} ({push_med:.0} vs {raw_med:.0} MB/s)"),
        target: format!(">= {TARGET_THROUGHPUT_RATIO}"),
        pass: Some(ratio >= TARGET_THROUGHPUT_RATIO),
    })
}

/// Figure 2: bytes to update a thin image's replica after 1 % scattered
/// 4 KiB writes, vs rsync's delta algorithm on the same two files.
async fn figure2(b: &mut Bench, size: u64, data: u64, skip_rsync: bool) -> anyhow::Result<Row> {
    let layout = ThinLayout {
        size,
        data,
        extents: 16,
    };
    println!("\n[2] bytes on the wire after 1 % scattered 4 KiB writes to a thin image");
    println!("  layout: {}", layout.describe());
    let thin_dir = b.dir.join("thin");
    let rsync_dst = b.dir.join("rsync-dst");
    std::fs::create_dir_all(&thin_dir)?;
    std::fs::create_dir_all(&rsync_dst)?;
    let img = thin_dir.join("thin.img");
    let i2 = img.clone();
    blocking(move || images::thin_image(&i2, layout, SEED_THIN)).await?;
    let t0 = Instant::now();
    let m1 = b.import("thin", &img).await?;
    println!(
        "  import generation {}: {:.1} s",
        m1.generation,
        t0.elapsed().as_secs_f64()
    );
    // From here on the owner's live image is the volume (what an appliance
    // writes to); the imported file is no longer needed.
    let _ = std::fs::remove_file(&img);
    let live = b.store.image_path("thin");
    let p1 = b.push_one("thin").await?;
    println!(
        "  first replication: {} chunks, {} on the wire for {} of data ({:.1} s; zero chunks never travel)",
        p1.report.chunks,
        mib(p1.wire()),
        mib(data),
        p1.secs
    );
    let rsync = if skip_rsync { None } else { which_rsync() };
    if rsync.is_some() {
        // rsync's receiver gets the old image (a sparse copy).
        let st = tokio::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(&live)
            .arg(rsync_dst.join("thin.img"))
            .status()
            .await?;
        if !st.success() {
            bail!("cp --sparse=always failed");
        }
    }

    let blocks = (size / images::BLOCK) as usize;
    let count = blocks / 100;
    let l2 = live.clone();
    let written = blocking(move || images::scattered_writes(&l2, size, count, SEED_WRITES)).await?;
    let changed_bytes = written.len() as u64 * images::BLOCK;
    let extents = layout.extents();
    let in_data = written
        .iter()
        .filter(|&&blk| {
            extents
                .iter()
                .any(|&(off, len)| (off..off + len).contains(&(blk * images::BLOCK)))
        })
        .count();
    println!(
        "  overwrote {} of {} 4 KiB blocks ({}) of the live image with random data, uniformly over the address space: {} in data extents, {} in holes",
        written.len(),
        blocks,
        mib(changed_bytes),
        in_data,
        written.len() - in_data
    );
    let st = b.store.clone();
    let snap = blocking(move || st.snapshot_report("thin", &datastore::NoPause, &mut |_, _| {}))
        .await
        .map_err(|e| anyhow!("snapshot: {e}"))?;
    let m2 = snap.manifest;
    println!(
        "  snapshot generation {}: {:.1} s ({:?}, pause {:.1} ms, {} new chunks)",
        m2.generation,
        snap.elapsed.as_secs_f64(),
        snap.method,
        snap.pause.as_secs_f64() * 1e3,
        snap.new_chunks
    );
    let changed_chunks = m1
        .chunks
        .iter()
        .zip(&m2.chunks)
        .filter(|(a, b)| a != b)
        .count();
    let from_zero = m1
        .chunks
        .iter()
        .zip(&m2.chunks)
        .filter(|(a, b)| a.is_none() && b.is_some())
        .count();
    println!(
        "  {} of {} chunks ({} KiB each) changed; {} of them were all-zero (absent) in generation {}",
        changed_chunks,
        m2.chunks.len(),
        m2.chunk_size / 1024,
        from_zero,
        m1.generation
    );
    let p2 = b.push_one("thin").await?;
    println!(
        "  update push: {} whole chunks + {} deltas; {} sent + {} received = {} on the wire ({:.2} s)",
        p2.report.chunks,
        p2.report.deltas,
        mib(p2.sent),
        mib(p2.received),
        mib(p2.wire()),
        p2.secs
    );
    println!("  (wire = every byte of the push stream both ways: offer, manifest, need bitmap, chunk/delta frames, commit; QUIC headers excluded, as TCP/ssh ones are from rsync's count)");
    // What the chunks that were all-zero before cost, and what they would
    // cost as deltas against a zero chunk (a hint for the protocol).
    let cs = u64::from(m2.chunk_size);
    let mut per_zero_chunk: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    for blk in &written {
        let idx = blk * images::BLOCK / cs;
        if m1.chunks.get(idx as usize).is_some_and(Option::is_none) {
            *per_zero_chunk.entry(idx).or_default() += 1;
        }
    }
    if !per_zero_chunk.is_empty() && p2.report.chunks > 0 {
        const FRAME: u64 = 5; // kind + length
        let whole: u64 = per_zero_chunk.len() as u64 * (FRAME + 32 + cs);
        let as_delta: u64 = per_zero_chunk
            .values()
            .map(|n| FRAME + 66 + n * (2 + images::BLOCK))
            .sum();
        let projected = p2.wire().saturating_sub(whole) + as_delta;
        println!(
            "  note: {} of the changed chunks were holes before; sent whole they cost ≈ {}; as deltas against a zero chunk they would cost ≈ {} (update ≈ {} in all)",
            per_zero_chunk.len(),
            mib(whole),
            mib(as_delta),
            mib(projected)
        );
    }
    b.check_replica("thin", m2.generation, &live).await?;

    let Some(rsync) = rsync else {
        println!("  rsync: skipped");
        return Ok(Row {
            figure: "2 update of thin image after 1 % 4K writes / rsync",
            measured: format!("{} (rsync skipped)", mib(p2.wire())),
            target: "<= 1/3".into(),
            pass: None,
        });
    };
    let t0 = Instant::now();
    // Local rsync defaults to --whole-file; --no-whole-file forces the
    // block-matching (delta) algorithm between its sender and receiver
    // processes, --inplace updates the old file like a replica would,
    // --ignore-times makes it compare contents whatever the mtimes say.
    let out = tokio::process::Command::new(&rsync)
        .env("LC_ALL", "C")
        .args(["--no-whole-file", "--inplace", "--ignore-times", "--stats"])
        .arg(&live)
        .arg(rsync_dst.join("thin.img"))
        .output()
        .await?;
    if !out.status.success() {
        bail!("rsync failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stats = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = stats
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("rsync --stats has no {name:?}:\n{stats}"))?;
        let digits: String = line[name.len()..]
            .chars()
            .take_while(|c| !c.is_alphabetic())
            .filter(char::is_ascii_digit)
            .collect();
        digits
            .parse::<u64>()
            .with_context(|| format!("parsing {line:?}"))
    };
    let (sent, received) = (field("Total bytes sent:")?, field("Total bytes received:")?);
    let (literal, matched) = (field("Literal data:")?, field("Matched data:")?);
    let rsync_total = sent + received;
    println!(
        "  rsync --no-whole-file --inplace: sent {} + received {} = {} ({} literal data, {} matched by its block checksums; {:.1} s)",
        mib(sent),
        mib(received),
        mib(rsync_total),
        mib(literal),
        mib(matched),
        t0.elapsed().as_secs_f64()
    );
    if b.verify {
        let (a, c) = (live.clone(), rsync_dst.join("thin.img"));
        if !blocking(move || images::same_bytes(&a, &c)).await? {
            bail!("rsync's copy differs from the source (the comparison would be void)");
        }
    }
    let ratio = p2.wire() as f64 / rsync_total as f64;
    println!("  ratio ours / rsync: {ratio:.3}");
    let _ = std::fs::remove_file(rsync_dst.join("thin.img"));
    Ok(Row {
        figure: "2 update of thin image after 1 % 4K writes / rsync",
        measured: format!("{ratio:.3} ({} vs {})", mib(p2.wire()), mib(rsync_total)),
        target: "<= 0.333".into(),
        pass: Some(ratio <= TARGET_VS_RSYNC),
    })
}

fn which_rsync() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("rsync"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        println!("  rsync not found (apt-get install -y rsync); skipping the comparison");
    }
    found
}

/// Figure 3: five clones of one base, small differences each.
async fn figure3(b: &mut Bench, base: u64, concurrency: usize) -> anyhow::Result<Row> {
    // Differences scale with the base: 2 MiB contiguous + 256 scattered
    // 4 KiB writes per clone for a 1 GiB base (3 MiB in all).
    let scale = base as f64 / (1024 * MIB) as f64;
    let diff = CloneDiff {
        run: ((2 * MIB) as f64 * scale) as u64 / images::BLOCK * images::BLOCK,
        scattered: ((256.0 * scale) as usize).max(1),
    };
    println!(
        "\n[3] five clones of one {} random base, each differing by {}:",
        mib(base),
        mib(diff.bytes())
    );
    println!(
        "  one contiguous run of {} (new files) + {} scattered 4 KiB writes (metadata, configs)",
        mib(diff.run),
        diff.scattered
    );
    let img = b.dir.join("base.img");
    let i2 = img.clone();
    blocking(move || images::random_file(&i2, base, SEED_BASE)).await?;
    let before = match b.request(Request::Stats).await? {
        Reply::Stats { payload_bytes, .. } => payload_bytes,
        other => bail!("unexpected reply {other:?}"),
    };
    let mut names = Vec::new();
    let t0 = Instant::now();
    for i in 0..5u64 {
        let name = format!("clone-{i}");
        let i2 = img.clone();
        let undo =
            blocking(move || images::apply_clone_diff(&i2, base, diff, SEED_CLONES + i)).await?;
        b.import(&name, &img).await?;
        let i2 = img.clone();
        blocking(move || images::undo(&i2, undo)).await?;
        names.push(name);
    }
    println!(
        "  imported five clones in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let pushed = b.push_all(&names, concurrency).await?;
    let total: u64 = pushed.iter().map(Pushed::wire).sum();
    let sent: u64 = pushed.iter().map(|p| p.sent).sum();
    let mut by_name: Vec<&Pushed> = pushed.iter().collect();
    by_name.sort_by(|a, b| a.report.volume.cmp(&b.report.volume));
    for p in by_name {
        let held = p.referenced - p.report.chunks - p.report.deltas;
        println!(
            "  {}: {} chunks sent, {held} of its {} chunks already held by the replica; {} on the wire",
            p.report.volume,
            p.report.chunks,
            p.referenced,
            mib(p.wire())
        );
    }
    println!("  (the base itself is never replicated: the second clone also carries the base's version of the chunks the first one changed)");
    let after = match b.request(Request::Stats).await? {
        Reply::Stats { payload_bytes, .. } => payload_bytes,
        other => bail!("unexpected reply {other:?}"),
    };
    println!(
        "  pushes {} at a time: {} sent + {} received = {}; the replica's store grew by {}",
        concurrency.max(1),
        mib(sent),
        mib(total - sent),
        mib(total),
        mib(after.saturating_sub(before))
    );
    if b.verify {
        let i2 = img.clone();
        let undo =
            blocking(move || images::apply_clone_diff(&i2, base, diff, SEED_CLONES + 4)).await?;
        let last = names.last().expect("five names").clone();
        let (st, n) = (b.store.clone(), last.clone());
        let generation = blocking(move || st.latest(&n))
            .await
            .map_err(|e| anyhow!("latest: {e}"))?
            .context("no generation")?
            .generation;
        let checked = b.check_replica(&last, generation, &img).await;
        let i2 = img.clone();
        blocking(move || images::undo(&i2, undo)).await?;
        checked?;
    }
    let _ = std::fs::remove_file(&img);
    let ratio = total as f64 / base as f64;
    println!("  ratio bytes on the wire / base size: {ratio:.3}");
    Ok(Row {
        figure: "3 five clones of one base: bytes sent / base size",
        measured: format!("{ratio:.3} ({} for a {} base)", mib(total), mib(base)),
        target: format!("<= {TARGET_CLONES}"),
        pass: Some(ratio <= TARGET_CLONES),
    })
}
