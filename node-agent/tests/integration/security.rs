//! The rack's perimeter, tried as an attacker would, against real agents on
//! loopback: connection floods against the admin API, SIGTERM while a
//! blocking job runs, absurd configuration values.

use crate::common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use deploy::RackConfig;

fn api_addr(fleet: &Fleet, rack: &str) -> SocketAddr {
    RackConfig::load(&fleet.config(rack)).unwrap().api_addr()
}

/// Open `n` TCP connections to `addr` that never send a byte. Connections
/// the kernel cannot complete within a second are skipped (counted).
fn silent_connections(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut open = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => open.push(s),
            Err(_) => failed += 1,
        }
    }
    (open, failed)
}

/// How many of `conns` the server has closed (EOF or reset).
fn closed_by_server(conns: &[TcpStream]) -> usize {
    conns
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            let closed = match (&**s).read(&mut b) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
            s.set_nonblocking(false).unwrap();
            closed
        })
        .count()
}

async fn up(fleet: &Fleet, rack: &str) {
    wait_until(Duration::from_secs(15), "agent answering", || async {
        status(&fleet.client(rack)).await.is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_lock_out_the_cli() {
    let fleet = Fleet::init("a", &[]);
    let _a = fleet.start("a");
    up(&fleet, "a").await;
    let (silent, failed) = silent_connections(api_addr(&fleet, "a"), 200);
    eprintln!(
        "{} silent connections open ({failed} not completed)",
        silent.len()
    );
    assert!(silent.len() >= 150, "the flood itself failed");
    for i in 0..5 {
        let t0 = Instant::now();
        let out = Command::new(BIN)
            .args(["status", "--json", "--config"])
            .arg(fleet.config("a"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fieldrack status #{i} failed under the flood: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(s["rack"], "a");
        eprintln!("fieldrack status #{i} answered in {:?}", t0.elapsed());
    }
    let shed = metric(&fleet.client("a"), "fieldrack_api_connections_shed_total").await;
    eprintln!(
        "shed {shed}; {} of the flood closed by the agent",
        closed_by_server(&silent)
    );
    assert!(shed > 0.0, "silent connections were shed to make room");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_leave_the_api_answering() {
    let fleet = Fleet::init("a", &[]);
    let _a = fleet.start("a");
    up(&fleet, "a").await;
    let t0 = Instant::now();
    let (idle, failed) = silent_connections(api_addr(&fleet, "a"), 2_000);
    eprintln!(
        "{} idle connections open in {:?} ({failed} not completed)",
        idle.len(),
        t0.elapsed()
    );
    assert!(idle.len() >= 1_500, "the flood itself failed");
    let client = fleet.client("a");
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let s = status(&client).await;
        assert!(
            s.is_some(),
            "the API did not answer under 2,000 idle connections"
        );
        latencies.push(t.elapsed());
    }
    eprintln!("status latency under the flood: {latencies:?}");
    // The flood does not stay: silent connections are shed and time out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let closed = closed_by_server(&idle);
    eprintln!(
        "{closed} of {} idle connections closed by the agent after 3 s",
        idle.len()
    );
    assert!(
        closed >= idle.len() - 300,
        "silent connections are held: only {closed} closed"
    );
    let accept_errors = metric(&client, "fieldrack_api_accept_errors_total").await;
    assert_eq!(accept_errors, 0.0, "the agent ran out of descriptors");
}

/// Start a job that keeps a blocking task of the agent busy, returning the
/// CLI process that waits for it: a volume import of a large generated
/// image (distinct chunks, so it takes seconds) from the rack's import
/// directory. (A FIFO no longer works: imports refuse anything but a
/// regular file before they start.)
fn start_blocking_job(fleet: &Fleet) -> (std::process::Child, &'static str) {
    let import = |volume: &str, from: &std::path::Path| {
        Command::new(BIN)
            .args(["volume", "import", volume, "--from"])
            .arg(from)
            .arg("--config")
            .arg(fleet.config("a"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let import_dir = fleet
        .config("a")
        .parent()
        .unwrap()
        .join("data")
        .join("import");
    std::fs::create_dir_all(&import_dir).unwrap();
    let big = import_dir.join("big.img");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        let mut chunk = vec![0x5au8; 64 * 1024];
        for i in 0u64..(48 * 1024) {
            chunk[..8].copy_from_slice(&i.to_le_bytes());
            f.write_all(&chunk).unwrap();
        }
        f.flush().unwrap();
    }
    let mut cli = import("big", &big);
    let mut err = cli.stderr.take().unwrap();
    // Wait for the first progress line: the blocking task is running.
    let mut seen = Vec::new();
    let mut b = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("import:") {
        assert_eq!(
            err.read(&mut b).unwrap(),
            1,
            "import ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.push(b[0]);
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    (cli, "volume import of a 3 GiB image")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_agent_while_a_blocking_job_runs() {
    let fleet = Fleet::init("a", &[]);
    let mut a = fleet.start("a");
    up(&fleet, "a").await;
    let (mut cli, job) = start_blocking_job(&fleet);
    assert!(
        cli.try_wait().unwrap().is_none(),
        "the job ({job}) is running"
    );
    let t0 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = loop {
        if let Some(status) = a.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "still running 15 s after SIGTERM with a {job} in progress"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "SIGTERM -> exit in {:?} with a {job} in progress",
        t0.elapsed()
    );
    assert!(status.success(), "clean exit: {status}");
    assert!(a.log_text().contains("shutting down"));
    let _ = cli.kill();
    let _ = cli.wait();
}

#[test]
fn absurd_config_values_exit_64_naming_the_field() {
    let fleet = Fleet::init("a", &[]);
    let cfg = fleet.config("a");
    let good = std::fs::read_to_string(&cfg).unwrap();
    let max = i64::MAX;
    let cases: Vec<(String, &str)> = vec![
        (
            good.replace(
                "admission_timeout_ms = 10000",
                &format!("admission_timeout_ms = {max}"),
            ),
            "mesh.admission_timeout_ms",
        ),
        (
            good.replace(
                "idle_timeout_ms = 30000",
                &format!("idle_timeout_ms = {max}"),
            ),
            "mesh.idle_timeout_ms",
        ),
        (
            good.replace(
                "suspect_timeout_ms = 4000",
                &format!("suspect_timeout_ms = {max}"),
            ),
            "membership.suspect_timeout_ms",
        ),
        (
            good.replace("probe_interval_ms = 1000", "probe_interval_ms = 0"),
            "membership.probe_interval_ms",
        ),
        (
            good.replace("heartbeat_ms = 250", &format!("heartbeat_ms = {}", max / 2)),
            "control.heartbeat_ms",
        ),
        (
            good.replace("lease_ms = 8000", &format!("lease_ms = {max}")),
            "control.lease_ms",
        ),
        (
            good.replace(
                "[power]",
                "[power.nut]\nups = \"u\"\naddr = \"no port here\"\n\n[power]",
            ),
            "power.nut.addr",
        ),
        (
            good.replace("[log]", "[log]\nlevel = \"info,,=[[[\""),
            "log.level",
        ),
        (
            good.replace(
                "header_timeout_ms = 10000",
                &format!("header_timeout_ms = {max}"),
            ),
            "proxy.header_timeout_ms",
        ),
        (
            good.replace("connect_ports = [443]", "connect_ports = [0]"),
            "proxy.connect_ports",
        ),
    ];
    for (text, field) in cases {
        assert_ne!(text, good, "case for {field} changed nothing");
        std::fs::write(&cfg, &text).unwrap();
        let t0 = Instant::now();
        let out = Command::new(BIN)
            .arg("agent")
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "exit code for {field}: {err}");
        assert!(err.contains(field), "error names {field}: {err}");
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_file_limit_is_raised_at_start() {
    let fleet = Fleet::init("a", &[]);
    let log = fleet.dir.path().join("a.log");
    let f = std::fs::File::create(&log).unwrap();
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap()
        .1;
    let soft = 256.min(hard);
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={soft}:{hard}"))
        .arg(BIN)
        .args(["agent", "--log-format", "json", "--config"])
        .arg(fleet.config("a"))
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    up(&fleet, "a").await;
    let limit = metric(&fleet.client("a"), "fieldrack_fd_limit").await;
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("open-file limit"))
        .unwrap_or_else(|| panic!("no open-file limit line in:\n{text}"));
    eprintln!("{line}");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["fields"]["before"], soft);
    assert_eq!(v["fields"]["after"], hard);
    assert_eq!(limit, hard as f64, "caps derived from the raised limit");
}
