//! Cache-hit benchmark: Fieldrack's tile server against nginx `proxy_cache`
//! in front of the same origin, same tiles, same load tool, each server
//! pinned to the same core.
//!
//! ```text
//! cargo build --release -p cache-proxy --bin proxybench
//! target/release/proxybench [--tiles 1000] [--secs 10] [--conns 32] [--core 0]
//! ```
//!
//! What it does:
//! 1. starts an origin (in this process) serving 1000 tiles of a few KB;
//! 2. starts `proxybench serve-fieldrack` (a child, under `taskset -c CORE`)
//!    and, if `nginx` is installed, nginx with one worker under the same
//!    `taskset` and a `proxy_cache` configuration (`proxy_cache_lock on`,
//!    validity one day);
//! 3. warms both caches with every tile, then checks hits do not reach the
//!    origin;
//! 4. measures peak requests/s and p99 latency: with `wrk` (pinned to the
//!    other cores) if installed, else with the built-in closed-loop client;
//! 5. measures p99 at a constant rate of half nginx's peak (built-in
//!    open-loop client, latency counted from the scheduled send time).
//!
//! It prints one table. Load goes only to 127.0.0.1.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

struct Args {
    tiles: u32,
    secs: u64,
    conns: usize,
    core: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        tiles: 1000,
        secs: 10,
        conns: 32,
        core: 0,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i + 1 < v.len() {
        let n = &v[i + 1];
        match v[i].as_str() {
            "--tiles" => a.tiles = n.parse().expect("--tiles N"),
            "--secs" => a.secs = n.parse().expect("--secs N"),
            "--conns" => a.conns = n.parse().expect("--conns N"),
            "--core" => a.core = n.parse().expect("--core N"),
            _ => {}
        }
        i += 2;
    }
    a
}

fn tile_path(i: u32) -> String {
    // Zoom 10 tiles, spread over x.
    format!("10/{}/{}.png", i % 1024, i / 1024)
}

fn body_for(path: &str) -> Bytes {
    let seed = blake3::hash(path.as_bytes());
    let len = 1500 + (u32::from(seed.as_bytes()[0]) * 20) as usize;
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    while v.len() < len {
        v.extend_from_slice(seed.as_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

async fn run_origin(hits: Arc<AtomicU64>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let hits = hits.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    hits.fetch_add(1, Ordering::Relaxed);
                    let p = req.uri().path().to_string();
                    async move {
                        let mut r = Response::new(Full::new(body_for(&p)));
                        r.headers_mut()
                            .insert("content-type", "image/png".parse().expect("static"));
                        r.headers_mut()
                            .insert("cache-control", "max-age=86400".parse().expect("static"));
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn spawn_pinned(core: usize, cmd: &str, args: &[&str]) -> Child {
    let mut c = if which("taskset") {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(core.to_string()).arg(cmd).args(args);
        c
    } else {
        let mut c = Command::new(cmd);
        c.args(args);
        c
    };
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn server")
}

fn which(bin: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

async fn wait_up(addr: SocketAddr) {
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("server at {addr} never came up");
}

async fn fetch(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    host: &str,
    path: &str,
) -> Option<usize> {
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::new())
        .ok()?;
    sender.ready().await.ok()?;
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            if std::env::var_os("PROXYBENCH_DEBUG").is_some() {
                eprintln!("{path}: {e}");
            }
            return None;
        }
    };
    if !resp.status().is_success() {
        if std::env::var_os("PROXYBENCH_DEBUG").is_some() {
            eprintln!(
                "{path}: {} {:?}",
                resp.status(),
                resp.headers().get("cache-status")
            );
        }
        return None;
    }
    let b = resp.into_body().collect().await.ok()?.to_bytes();
    Some(b.len())
}

async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

/// Name, built-in peak, wrk peak (req/s, p99 µs), origin requests during the peak run.
type ServerResult = (String, Option<LoadResult>, Option<(f64, u64)>, u64);

struct LoadResult {
    rps: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
}

fn pct(lat: &mut [u64], p: f64) -> u64 {
    if lat.is_empty() {
        return 0;
    }
    lat.sort_unstable();
    lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)]
}

/// Closed loop (`rate` = None) or open loop at `rate` req/s.
async fn load(
    addr: SocketAddr,
    prefix: &str,
    tiles: u32,
    conns: usize,
    secs: u64,
    rate: Option<f64>,
) -> LoadResult {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for c in 0..conns {
        let prefix = prefix.to_string();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr).await;
            let host = addr.to_string();
            let mut lat = Vec::with_capacity(100_000);
            let mut i = c as u32 * 7919;
            let interval = rate.map(|r| Duration::from_secs_f64(conns as f64 / r));
            let mut next = Instant::now()
                + interval
                    .map(|iv| iv.mul_f64(c as f64 / conns as f64))
                    .unwrap_or_default();
            while Instant::now() < deadline {
                let scheduled = if let Some(iv) = interval {
                    tokio::time::sleep_until(next.into()).await;
                    let s = next;
                    next += iv;
                    s
                } else {
                    Instant::now()
                };
                let path = format!("{prefix}{}", tile_path(i % tiles));
                i = i.wrapping_add(1);
                match fetch(&mut sender, &host, &path).await {
                    Some(_) => lat.push(scheduled.elapsed().as_micros() as u64),
                    None => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        sender = connect(addr).await;
                    }
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    let elapsed = start.elapsed().as_secs_f64();
    LoadResult {
        rps: all.len() as f64 / elapsed,
        p50_us: pct(&mut all, 0.50),
        p99_us: pct(&mut all, 0.99),
        errors: errors.load(Ordering::Relaxed),
    }
}

/// Peak with wrk if available: returns (req/s, p99 µs).
fn wrk_peak(
    addr: SocketAddr,
    prefix: &str,
    tiles: u32,
    conns: usize,
    secs: u64,
    cores: &str,
) -> Option<(f64, u64)> {
    if !which("wrk") {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("proxybench-wrk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let script = dir.join("tiles.lua");
    let lua = format!(
        "local i = 0\nrequest = function()\n  i = (i + 1) % {tiles}\n  local x = i % 1024\n  local y = math.floor(i / 1024)\n  return wrk.format(\"GET\", \"{prefix}10/\" .. x .. \"/\" .. y .. \".png\")\nend\n\
         done = function(summary, latency, requests)\n  io.write(string.format(\"RESULT %f %d\\n\", summary.requests / (summary.duration / 1e6), latency:percentile(99)))\nend\n"
    );
    std::fs::write(&script, lua).ok()?;
    let out = Command::new("taskset")
        .args([
            "-c",
            cores,
            "wrk",
            "-t2",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "-s",
        ])
        .arg(&script)
        .arg(format!("http://{addr}/"))
        .output()
        .ok()?;
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("RESULT "))?;
    let mut it = line.split_whitespace().skip(1);
    let rps = it.next()?.parse().ok()?;
    let p99 = it.next()?.parse().ok()?;
    Some((rps, p99))
}

fn nginx_conf(dir: &std::path::Path, port: u16, origin: SocketAddr) -> String {
    format!(
        "worker_processes 1;\nmaster_process off;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  proxy_cache_path {d}/cache levels=1:2 keys_zone=tiles:64m max_size=10g inactive=1y use_temp_path=off;\n\
           upstream origin {{ server {origin}; keepalive 32; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n\
             location /tiles/test/ {{\n      proxy_pass http://origin/tile/;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
               proxy_cache tiles;\n      proxy_cache_lock on;\n      proxy_cache_valid 200 1d;\n      proxy_cache_use_stale error timeout updating;\n\
               add_header Cache-Status $upstream_cache_status;\n    }}\n  }}\n}}\n",
        d = dir.display()
    )
}

async fn serve_fieldrack(listen: &str, origin: &str, dir: &str) {
    let mut config = cache_proxy::Config::default();
    config.proxy.listen = listen.parse().expect("listen");
    config.proxy.cache_dir = dir.into();
    config.proxy.backhaul.probe_urls = vec![];
    config.tile_source = vec![cache_proxy::TileSource {
        name: "test".into(),
        url: format!("http://{origin}/tile/{{z}}/{{x}}/{{y}}.png"),
        format: cache_proxy::TileFormat::Png,
        min_zoom: 0,
        max_zoom: 18,
        attribution: String::new(),
        allow_bulk: true,
        requests_per_sec: 0,
        user_agent: "proxybench".into(),
    }];
    let cancel = tokio_util::sync::CancellationToken::new();
    if let Err(e) = cache_proxy::run(config, cache_proxy::Deps::default(), cancel).await {
        eprintln!("fieldrack: {e}");
        std::process::exit(1);
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("serve-fieldrack") {
        // One worker thread: the whole server on the core taskset gave us.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(serve_fieldrack(&argv[2], &argv[3], &argv[4]));
        return;
    }
    let args = parse_args();
    // The load generator stays off the servers' core.
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    if nproc > 1 && which("taskset") {
        let cores: Vec<String> = (0..nproc)
            .filter(|c| *c != args.core)
            .map(|c| c.to_string())
            .collect();
        let _ = Command::new("taskset")
            .args([
                "-a",
                "-pc",
                &cores.join(","),
                &std::process::id().to_string(),
            ])
            .stdout(Stdio::null())
            .status();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench(args));
}

async fn bench(args: Args) {
    let origin_hits = Arc::new(AtomicU64::new(0));
    let origin = run_origin(origin_hits.clone()).await;
    let tmp = std::env::temp_dir().join(format!("proxybench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    let exe = std::env::current_exe().expect("exe");
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let load_cores = if nproc > 1 {
        (0..nproc)
            .filter(|c| *c != args.core)
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",")
    } else {
        "0".into()
    };

    let mut results: Vec<ServerResult> = Vec::new();
    let fr_port = free_port();
    let fr_addr: SocketAddr = format!("127.0.0.1:{fr_port}").parse().expect("addr");
    let fr_dir = tmp.join("fieldrack");
    let mut children: Vec<Child> = vec![spawn_pinned(
        args.core,
        exe.to_str().expect("utf8 path"),
        &[
            "serve-fieldrack",
            &fr_addr.to_string(),
            &origin.to_string(),
            fr_dir.to_str().expect("utf8"),
        ],
    )];
    let mut servers = vec![("fieldrack".to_string(), fr_addr)];
    if which("nginx") {
        let ng_port = free_port();
        let ng_dir = tmp.join("nginx");
        std::fs::create_dir_all(ng_dir.join("cache")).expect("nginx dir");
        let conf = ng_dir.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(&ng_dir, ng_port, origin)).expect("nginx conf");
        children.push(spawn_pinned(
            args.core,
            "nginx",
            &[
                "-p",
                ng_dir.to_str().expect("utf8"),
                "-c",
                conf.to_str().expect("utf8"),
            ],
        ));
        servers.push((
            "nginx".into(),
            format!("127.0.0.1:{ng_port}").parse().expect("addr"),
        ));
    } else {
        eprintln!("nginx not installed (apt-get install -y nginx): measuring Fieldrack only");
    }
    for (name, addr) in &servers {
        wait_up(*addr).await;
        // Warm: every tile once, then check hits stay off the origin.
        let mut s = connect(*addr).await;
        let mut failed = 0;
        for i in 0..args.tiles {
            if fetch(
                &mut s,
                &addr.to_string(),
                &format!("/tiles/test/{}", tile_path(i)),
            )
            .await
            .is_none()
            {
                failed += 1;
                s = connect(*addr).await;
            }
        }
        if failed > 0 {
            eprintln!("{name}: {failed} warm-up requests failed");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = origin_hits.load(Ordering::Relaxed);
        let peak = load(
            *addr,
            "/tiles/test/",
            args.tiles,
            args.conns,
            args.secs,
            None,
        )
        .await;
        let leaked = origin_hits.load(Ordering::Relaxed) - before;
        let wrk = wrk_peak(
            *addr,
            "/tiles/test/",
            args.tiles,
            args.conns,
            args.secs,
            &load_cores,
        );
        results.push((name.clone(), Some(peak), wrk, leaked));
    }
    // p99 at half of nginx's peak (or of Fieldrack's if nginx is absent).
    let reference = results
        .iter()
        .find(|r| r.0 == "nginx")
        .or(results.first())
        .map(|r| {
            r.2.map(|w| w.0)
                .unwrap_or_else(|| r.1.as_ref().map(|l| l.rps).unwrap_or(1000.0))
        })
        .unwrap_or(1000.0);
    let half = reference / 2.0;
    println!("Cache-hit benchmark: {} tiles of ~1.5-6.6 KB, {} connections, {} s per run, servers pinned to core {}", args.tiles, args.conns, args.secs, args.core);
    println!(
        "{:<10} {:>14} {:>12} {:>14} {:>12} {:>18} {:>8}",
        "server", "peak req/s", "p99 ms", "wrk req/s", "wrk p99 ms", "p99 ms @ half-peak", "misses"
    );
    let mut peaks = Vec::new();
    for (name, addr) in &servers {
        let at_half = load(
            *addr,
            "/tiles/test/",
            args.tiles,
            args.conns,
            args.secs,
            Some(half),
        )
        .await;
        let r = results.iter().find(|r| &r.0 == name).expect("result");
        let peak = r.1.as_ref().expect("peak");
        let (wrps, wp99) =
            r.2.map(|(a, b)| (format!("{a:.0}"), format!("{:.2}", b as f64 / 1000.0)))
                .unwrap_or(("-".into(), "-".into()));
        println!(
            "{:<10} {:>14.0} {:>12.2} {:>14} {:>12} {:>18.2} {:>8}",
            name,
            peak.rps,
            peak.p99_us as f64 / 1000.0,
            wrps,
            wp99,
            at_half.p99_us as f64 / 1000.0,
            r.3
        );
        if peak.errors + at_half.errors > 0 {
            println!("  ({} errors)", peak.errors + at_half.errors);
        }
        peaks.push((
            name.clone(),
            r.2.map(|w| w.0).unwrap_or(peak.rps),
            peak.p50_us,
        ));
    }
    println!("half-peak rate used: {half:.0} req/s");
    if peaks.len() == 2 {
        println!(
            "ratio fieldrack/nginx (peak req/s): {:.2}",
            peaks[0].1 / peaks[1].1
        );
    }
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
