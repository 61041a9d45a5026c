//! The proxy's perimeter, tried as an attacker would against a real proxy:
//! no spelling of an internal address gets a connection, refusals are never
//! cached, connections are bounded in number and time, and an abandoned
//! uncacheable download stops.
//!
//! Measurements (`--ignored`, they print figures and assert nothing about
//! speed):
//! `cargo test -p cache-proxy --test integration security:: -- --ignored --nocapture`

use crate::common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_proxy::{Config, Deps};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A TCP service on loopback that must never be reached: it counts every
/// connection it accepts.
struct Sentinel {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
}

async fn sentinel() -> Sentinel {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\ncache-control: max-age=600\r\n\r\nsecret")
                .await;
        }
    });
    Sentinel { addr, hits }
}

/// A proxy with the default destination policy (nothing internal allowed),
/// CONNECT allowed to `ports` so the address rules are what is tested.
async fn strict_proxy(o: &Origin, ports: Vec<u16>) -> TestProxy {
    let mut c = base_config(o);
    c.proxy.allow_destinations = Vec::new();
    c.proxy.connect_ports = ports;
    start(c, Deps::default()).await
}

/// Sends a request (`Connection: close` added) on a fresh connection and
/// reads the answer: to the end, or a CONNECT's head.
async fn raw(proxy: SocketAddr, request: &str) -> String {
    let request = request.replacen("\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1);
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut all = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                all.extend_from_slice(&buf[..n]);
                if request.starts_with("CONNECT")
                    && all.starts_with(b"HTTP/1.1 200")
                    && all.windows(4).any(|w| w == b"\r\n\r\n")
                {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

fn refused_count(p: &TestProxy, rule: &str) -> u64 {
    p.handle
        .snapshot()
        .refused
        .iter()
        .find(|(r, _)| *r == rule)
        .map(|(_, n)| *n)
        .unwrap()
}

const SPELLINGS: &[&str] = &[
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f.1",
    "0x7f000001",
    "0177.0.0.1",
    "127.0.0.1.",
    "0.0.0.0",
    "0",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::127.0.0.1]",
    "[::1]",
    "[::]",
    "[64:ff9b::7f00:1]",
    "localhost",
    "localhost.",
    "LOCALHOST",
    "api.localhost",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_loopback_is_refused_for_get_and_connect() {
    let o = origin().await;
    let s = sentinel().await;
    let port = s.addr.port();
    let p = strict_proxy(&o, vec![443, port]).await;
    let mut hosts: Vec<String> = SPELLINGS.iter().map(|h| h.to_string()).collect();
    // A name that resolves to loopback (the machine's own name, from
    // /etc/hosts) is refused after resolution.
    let me = hostname();
    if let Some(h) = &me {
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((h.as_str(), port))
            .await
            .map(|a| a.collect())
            .unwrap_or_default();
        if !resolved.is_empty() && resolved.iter().all(|a| a.ip().is_loopback()) {
            hosts.push(h.clone());
        }
    }
    for host in &hosts {
        for method in ["GET", "HEAD", "POST"] {
            let r = raw(
                p.addr,
                &format!(
                    "{method} http://{host}:{port}/api/v1/status HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-length: 0\r\n\r\n"
                ),
            )
            .await;
            assert!(r.starts_with("HTTP/1.1 403"), "{method} {host}: {r}");
            if method == "GET" {
                assert!(r.contains("rule: "), "the refusal names its rule: {r}");
            }
        }
        let r = raw(
            p.addr,
            &format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 403"), "CONNECT {host}: {r}");
    }
    // The default port of a bare URL is refused the same way.
    let r = raw(
        p.addr,
        "GET http://2130706433/ HTTP/1.1\r\nHost: 2130706433\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert_eq!(
        s.hits.load(Ordering::SeqCst),
        0,
        "the loopback service was reached"
    );
    assert!(refused_count(&p, "loopback") >= 10);
    assert!(refused_count(&p, "unspecified") >= 3);
    assert!(refused_count(&p, "localhost_name") >= 4);
    let metrics = p.handle.prometheus();
    assert!(
        metrics.contains("fieldrack_cache_refused_total{reason=\"loopback\"}"),
        "{metrics}"
    );
    assert_eq!(p.handle.status().objects, 0);
    p.stop().await;
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_only_to_allowed_ports_and_never_to_the_racks_own_services() {
    let o = origin().await;
    let s = sentinel().await;
    // Loopback allowed by the operator (as on a single-machine test rig),
    // every port allowed for CONNECT; the sentinel is the rack's admin API.
    let mut c = base_config(&o);
    c.proxy.connect_ports = vec![o.addr.port(), s.addr.port()];
    c.reserved_sockets = vec![s.addr];
    let p = start(c, Deps::default()).await;
    // The API socket, in several spellings.
    for host in ["127.0.0.1", "127.1", "[::ffff:127.0.0.1]", "127.0.0.2"] {
        let sp = s.addr.port();
        let r = raw(
            p.addr,
            &format!("GET http://{host}:{sp}/api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 403"), "{host}: {r}");
        assert!(r.contains("own_socket"), "{r}");
        let r = raw(
            p.addr,
            &format!("CONNECT {host}:{sp} HTTP/1.1\r\nHost: x\r\n\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    }
    assert_eq!(s.hits.load(Ordering::SeqCst), 0);
    p.stop().await;
    // The proxy's own port, even listed in connect_ports: no tunnel to
    // itself, no request to itself.
    let mut c = base_config(&o);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fixed = l.local_addr().unwrap();
    drop(l);
    c.proxy.listen = fixed;
    c.proxy.connect_ports = vec![fixed.port()];
    let q = start(c, Deps::default()).await;
    for host in ["127.0.0.1", "0.0.0.0", "[::ffff:127.0.0.1]", "127.9.9.9"] {
        let r = raw(
            q.addr,
            &format!(
                "CONNECT {host}:{0} HTTP/1.1\r\nHost: x\r\n\r\n",
                fixed.port()
            ),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 403"), "{host}: {r}");
        let r = raw(
            q.addr,
            &format!(
                "GET http://{host}:{0}/proxy.pac HTTP/1.1\r\nHost: x\r\n\r\n",
                fixed.port()
            ),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 403"), "{host}: {r}");
    }
    assert!(refused_count(&q, "own_socket") >= 6);
    assert_eq!(q.handle.snapshot().tunnels, 0);
    // A port outside connect_ports, to an allowed destination.
    let r = raw(
        q.addr,
        &format!("CONNECT {0} HTTP/1.1\r\nHost: x\r\n\r\n", o.addr),
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 403") && r.contains("rule: port"),
        "{r}"
    );
    // Nothing but the uplink's health probes (base_config) reached it.
    assert_eq!(o.count() - o.path_count("/probe"), 0);
    q.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_response_is_never_cached_and_an_allowed_destination_works() {
    let o = origin().await;
    let p = strict_proxy(&o, vec![443]).await;
    for _ in 0..2 {
        let r = get(p.addr, &o.url("/page/secret")).await;
        assert_eq!(r.status, 403);
        assert!(!r.cache_status().contains("stored"), "{}", r.cache_status());
        assert!(!r.cache_status().contains("hit"), "{}", r.cache_status());
        assert_eq!(r.headers.get("cache-control").unwrap(), "no-store");
    }
    p.settle().await;
    assert_eq!(o.count(), 0, "the loopback origin was reached");
    assert_eq!(p.handle.status().objects, 0);
    // The same proxy's tile server still fetches from the tile source the
    // operator named, on loopback: Fieldrack's own requests are not judged.
    let r = get(p.addr, "/tiles/test/1/0/0.png").await;
    assert_eq!(r.status, 200);
    p.stop().await;

    // An operator who allows exactly the origin's block reaches it; others
    // stay refused.
    let mut c = base_config(&o);
    c.proxy.allow_destinations = vec!["127.0.0.1/32".into()];
    let p = start(c, Deps::default()).await;
    let r = get(p.addr, &o.url("/page/open")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let other = format!("http://127.0.0.2:{}/page/open", o.addr.port());
    assert_eq!(get(p.addr, &other).await.status, 403);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_is_claimed_only_for_bodies_really_stored() {
    let o = origin().await;
    let p = start(base_config(&o), Deps::default()).await;
    // A small body: answered once stored, and says so.
    let r = get(p.addr, &o.url("/page/small")).await;
    assert!(r.cache_status().contains("stored"), "{}", r.cache_status());
    assert_eq!(p.handle.status().objects, 1, "claimed stored, and it is");
    // An uncacheable one never claims it.
    let r = get(p.addr, &o.url("/nostore")).await;
    assert!(!r.cache_status().contains("stored"), "{}", r.cache_status());
    // A streamed one is answered at once, without the claim; it is stored
    // afterwards.
    let r = get(p.addr, &o.url("/slow/streamed")).await;
    assert_eq!(r.body.len(), 5000);
    assert!(!r.cache_status().contains("stored"), "{}", r.cache_status());
    p.settle().await;
    let r = get(p.addr, &o.url("/slow/streamed")).await;
    assert!(r.cache_status().contains("hit"), "{}", r.cache_status());
    p.stop().await;
}

/// Opens `n` connections to `proxy` from `source`, each sending `send`
/// (maybe nothing), and returns them.
async fn open_many(proxy: SocketAddr, source: &str, n: usize, send: &[u8]) -> Vec<TcpStream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let mut s = sock.connect(proxy).await.unwrap();
        if !send.is_empty() {
            let _ = s.write_all(send).await;
        }
        v.push(s);
    }
    v
}

/// Waits until every connection is closed by the proxy; returns how long
/// the last one took (from `t0`).
async fn all_closed(conns: Vec<TcpStream>, t0: Instant, limit: Duration) -> Duration {
    let mut tasks = Vec::new();
    for mut s in conns {
        tasks.push(tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                match tokio::time::timeout(limit, s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Some(t0.elapsed()),
                    Ok(Ok(_)) => continue, // a 408/429 answer before the close
                    Err(_) => return None,
                }
            }
        }));
    }
    let mut last = Duration::ZERO;
    for t in tasks {
        let at = t.await.unwrap().expect("a connection stayed open");
        last = last.max(at);
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_sent_connections_are_closed_within_the_header_timeout() {
    let o = origin().await;
    let header_timeout = Duration::from_millis(500);
    // From an address outside allow_networks: dropped at accept.
    let mut c = base_config(&o);
    c.proxy.allow_networks = vec!["10.0.0.0/8".into()];
    c.proxy.header_timeout_ms = header_timeout.as_millis() as u64;
    let p = start(c, Deps::default()).await;
    let t0 = Instant::now();
    let mut conns = open_many(p.addr, "127.0.0.1", 250, b"").await;
    conns.extend(
        open_many(
            p.addr,
            "127.0.0.1",
            250,
            b"GET http://example.org/ HTTP/1.1\r\nHo",
        )
        .await,
    );
    let last = all_closed(conns, t0, Duration::from_secs(30)).await;
    eprintln!("500 connections from a non-allowed address: all closed after {last:?}");
    assert_eq!(p.handle.snapshot().forbidden, 500);
    p.stop().await;

    // From an allowed address: closed by the header timeout.
    let mut c = base_config(&o);
    c.proxy.header_timeout_ms = header_timeout.as_millis() as u64;
    c.proxy.max_connections_per_client = 1000;
    c.proxy.max_connections = 1000;
    let p = start(c, Deps::default()).await;
    let t0 = Instant::now();
    let mut conns = open_many(p.addr, "127.0.0.1", 250, b"").await;
    conns.extend(open_many(p.addr, "127.0.0.1", 250, b"GET /proxy.pac HTTP/1.1\r\nHo").await);
    let opened = t0.elapsed();
    let last = all_closed(conns, t0, Duration::from_secs(30)).await;
    eprintln!(
        "500 silent or half-sent connections: opened in {opened:?}, all closed after {last:?}"
    );
    // Each closes one header timeout after it opened, give or take
    // scheduling on a loaded test machine.
    assert!(
        last <= opened + header_timeout * 2 + Duration::from_secs(5),
        "last closed after {last:?} (opened by {opened:?})"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_address_leaves_other_clients_answered() {
    let o = origin().await;
    let p = start(base_config(&o), Deps::default()).await;
    let flood = open_many(p.addr, "127.0.0.1", 2000, b"").await;
    // Another client (another address) is answered, on fresh connections.
    for i in 0..20 {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock.connect(p.addr).await.unwrap();
        s.write_all(
            format!("GET /tiles/test/5/{i}/1.png HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
            .await
            .expect("answered")
            .unwrap();
        assert!(
            all.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&all)
        );
    }
    let snap = p.handle.snapshot();
    assert!(
        snap.over_client_cap >= 2000 - 128,
        "over_client_cap {}",
        snap.over_client_cap
    );
    // The last flood connections were told why before being closed.
    let mut last = flood.into_iter().last().unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), last.read_to_end(&mut all))
        .await
        .expect("closed")
        .unwrap();
    assert!(
        all.starts_with(b"HTTP/1.1 429"),
        "{}",
        String::from_utf8_lossy(&all)
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed() {
    let o = origin().await;
    let mut c = base_config(&o);
    c.proxy.connect_ports = vec![o.addr.port()];
    c.proxy.idle_timeout_ms = 300;
    let p = start(c, Deps::default()).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", o.addr).as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // Nothing sent either way: the tunnel is closed by the idle timeout.
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    assert_eq!(p.handle.snapshot().idle_closed, 1);
    assert_eq!(p.handle.snapshot().tunnels, 1);
    p.stop().await;
}

/// An upstream serving `total` bytes of an uncacheable body in 64 KiB
/// writes; records how much it wrote and whether the proxy hung up early.
struct BigOrigin {
    addr: SocketAddr,
    written: Arc<AtomicU64>,
    cut: Arc<AtomicU64>,
    finished: Arc<AtomicBool>,
}

async fn big_origin(total: u64) -> BigOrigin {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let (w, c, f) = (written.clone(), cut.clone(), finished.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (w, c, f) = (w.clone(), c.clone(), f.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncache-control: no-store\r\ncontent-length: {total}\r\n\r\n"
                );
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![7u8; 64 * 1024];
                let mut sent = 0u64;
                while sent < total {
                    let n = chunk.len().min((total - sent) as usize);
                    if s.write_all(&chunk[..n]).await.is_err() {
                        c.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    sent += n as u64;
                    w.fetch_add(n as u64, Ordering::SeqCst);
                    // About 64 MB/s: a fast backhaul.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                f.store(true, Ordering::SeqCst);
            });
        }
    });
    BigOrigin {
        addr,
        written,
        cut,
        finished,
    }
}

/// Starts a GET for `url` through `proxy`, reads `keep` bytes, hangs up.
async fn fetch_then_leave(proxy: SocketAddr, url: &str, keep: usize) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while got < keep {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
}

const BIG: u64 = 60 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_uncacheable_fetch_stops_the_upstream_transfer() {
    let big = big_origin(BIG).await;
    let o = origin().await;
    let p = start(base_config(&o), Deps::default()).await;
    let url = format!("http://{}/big", big.addr);
    fetch_then_leave(p.addr, &url, 1024 * 1024).await;
    let t0 = Instant::now();
    while big.cut.load(Ordering::SeqCst) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the upstream transfer went on after the client left ({} bytes)",
            big.written.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!big.finished.load(Ordering::SeqCst));
    let written = big.written.load(Ordering::SeqCst);
    eprintln!("upstream wrote {written} of {BIG} bytes before the proxy hung up");
    assert!(written < BIG);
    let snap = p.handle.snapshot();
    assert_eq!(snap.abandoned_fetches, 1);
    p.settle().await;
    assert_eq!(p.handle.snapshot().flight_bytes, 0, "nothing held any more");
    assert_eq!(p.handle.status().objects, 0);
    p.stop().await;
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Twelve 60 MB uncacheable downloads whose clients read 1 MB and leave:
/// prints the process's RSS growth (the proxy and the origin share the
/// process, so the origin's buffers are included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: prints RSS figures"]
async fn measure_rss_of_abandoned_large_downloads() {
    let big = big_origin(BIG).await;
    let o = origin().await;
    let p = start(base_config(&o), Deps::default()).await;
    let before = vm_rss_kib();
    let mut peak = before;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let url = format!("http://{}/big/{i}", big.addr);
        let addr = p.addr;
        tasks.push(tokio::spawn(async move {
            fetch_then_leave(addr, &url, 1024 * 1024).await
        }));
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        peak = peak.max(vm_rss_kib());
        if tasks.iter().all(|t| t.is_finished()) && big.cut.load(Ordering::SeqCst) >= 12 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.settle().await;
    let after = vm_rss_kib();
    println!(
        "RSS: before {before} KiB, peak {peak} KiB (+{} MiB), after {after} KiB; \
         upstream cut {} of 12, wrote {} MiB in all; flight bytes held now {}",
        (peak - before) / 1024,
        big.cut.load(Ordering::SeqCst),
        big.written.load(Ordering::SeqCst) / (1024 * 1024),
        p.handle.snapshot().flight_bytes
    );
    // Twelve clients that stay connected and stop reading after 1 MB.
    let before = vm_rss_kib();
    let mut peak = before;
    let mut held = Vec::new();
    for i in 0..12 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(
            format!(
                "GET http://{}/stall/{i} HTTP/1.1\r\nHost: x\r\n\r\n",
                big.addr
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = vec![0u8; 1024 * 1024];
        let _ = s.read_exact(&mut buf).await;
        held.push(s);
    }
    let mut max_flight = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        peak = peak.max(vm_rss_kib());
        max_flight = max_flight.max(p.handle.snapshot().flight_bytes);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "stalled clients: RSS before {before} KiB, peak {peak} KiB (+{} MiB); flight bytes at most {} MiB",
        (peak - before) / 1024,
        max_flight / (1024 * 1024)
    );
    drop(held);
    p.stop().await;
}

/// The latency a normal client sees while one address holds 2,000 idle
/// connections: prints p50/p99 over 500 tile hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: prints latency figures"]
async fn measure_latency_of_another_client_during_a_flood() {
    let o = origin().await;
    let mut c: Config = base_config(&o);
    c.proxy.header_timeout_ms = 600_000;
    // The measured client makes ~1,000 requests as fast as it can: this
    // measures the connection flood, not the request rate limit.
    c.proxy.client_requests_per_sec = 1_000_000;
    c.proxy.client_request_burst = 1_000_000;
    let p = start(c, Deps::default()).await;
    for i in 0..50 {
        assert_eq!(
            get(p.addr, &format!("/tiles/test/6/{i}/1.png"))
                .await
                .status,
            200
        );
    }
    let measure = |label: &'static str| {
        let addr = p.addr;
        async move {
            let mut lat = Vec::new();
            for i in 0..500 {
                let t = Instant::now();
                let sock = TcpSocket::new_v4().unwrap();
                sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                let mut s = sock.connect(addr).await.unwrap();
                s.write_all(
                    format!(
                        "GET /tiles/test/6/{}/1.png HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        i % 50
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
                let mut all = Vec::new();
                s.read_to_end(&mut all).await.unwrap();
                assert!(all.starts_with(b"HTTP/1.1 200"));
                lat.push(t.elapsed());
            }
            lat.sort();
            println!(
                "{label}: p50 {:?} p99 {:?} max {:?}",
                lat[lat.len() / 2],
                lat[lat.len() * 99 / 100],
                lat[lat.len() - 1]
            );
        }
    };
    measure("no flood").await;
    let flood = open_many(p.addr, "127.0.0.1", 2000, b"").await;
    measure("during a flood of 2000 idle connections from one address").await;
    println!(
        "flood connections refused at accept: {}",
        p.handle.snapshot().over_client_cap
    );
    drop(flood);
    p.stop().await;
}
