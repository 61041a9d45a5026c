//! Integration tests: a real proxy on loopback in front of a counting origin.

use crate::common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cache_proxy::{
    Deps, KeyDigest, KeyHash, PeerDirectory, PeerId, PeerObject, ProxyHandle, Replicator,
};
use common::*;
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_hits_never_reach_origin_and_carry_age_and_cache_status() {
    let o = origin().await;
    let p = start(base_config(&o), Deps::default()).await;
    let url = o.url("/page/a");
    let r1 = get(p.addr, &url).await;
    assert_eq!(r1.status, 200);
    assert!(
        r1.cache_status()
            .starts_with("rack-a; fwd=uri-miss; fwd-status=200"),
        "{}",
        r1.cache_status()
    );
    assert!(r1.cache_status().contains("stored"));
    assert!(r1.headers.contains_key("age"));
    assert!(r1
        .headers
        .get("via")
        .unwrap()
        .to_str()
        .unwrap()
        .contains("rack-a"));
    p.settle().await;
    p.advance(5);
    for _ in 0..10 {
        let r = get(p.addr, &url).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, r1.body);
        assert!(
            r.cache_status().starts_with("rack-a; hit; ttl="),
            "{}",
            r.cache_status()
        );
        let age: u64 = r
            .headers
            .get("age")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((5..=7).contains(&age), "age {age}");
    }
    assert_eq!(o.path_count("/page/a"), 1);
    // A client's conditional request is answered 304 from the cache.
    let etag = r1
        .headers
        .get("etag")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let r = request(p.addr, "GET", &url, &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, 304);
    assert_eq!(o.path_count("/page/a"), 1);
    let s = p.handle.status();
    assert_eq!(s.backhaul, "up");
    assert!(s.hit_ratio > 0.8, "{s:?}");
    assert_eq!(s.objects, 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_misses_one_upstream_request_streamed() {
    let o = origin().await;
    // 200 clients on one address: more than one client's default cap.
    let mut c = base_config(&o);
    c.proxy.max_connections_per_client = 256;
    let p = start(c, Deps::default()).await;
    let url = o.url("/slow/big");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (addr, url) = (p.addr, url.clone());
        tasks.push(tokio::spawn(async move { get(addr, &url).await }));
    }
    let (mut collapsed, mut hits) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 5000);
        assert_eq!(&r.body[..1000], &[b'a'; 1000][..]);
        assert_eq!(&r.body[4000..], &[b'e'; 1000][..]);
        let cs = r.cache_status();
        if cs.contains("collapsed") {
            collapsed += 1;
        } else if cs.contains("hit") {
            hits += 1;
        }
    }
    assert_eq!(o.path_count("/slow/big"), 1, "exactly one upstream request");
    // Every request but the one that fetched either waited on that fetch
    // (collapsed) or, if it arrived after the fetch finished (a loaded
    // machine spawns 200 clients slowly), was a plain hit.
    assert_eq!(collapsed + hits, 199, "collapsed {collapsed}, hits {hits}");
    assert!(
        collapsed >= 1,
        "some requests waited on the fetch in flight"
    );
    // The body took 800 ms upstream; nobody waited for a timeout.
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(p.handle.snapshot().coalesced, collapsed as u64);
    // Streaming: a waiter sees the first bytes before the body is complete.
    let url2 = o.url("/slow/stream");
    let stream = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let t0 = Instant::now();
    let resp = sender
        .send_request(
            hyper::Request::get(&url2)
                .header("host", o.addr.to_string())
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    use http_body_util::BodyExt;
    let first = body.frame().await.unwrap().unwrap();
    let first_at = t0.elapsed();
    assert!(first.is_data());
    while body.frame().await.is_some() {}
    let done_at = t0.elapsed();
    assert!(
        done_at - first_at >= Duration::from_millis(250),
        "first {first_at:?} done {done_at:?}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidation_sends_one_conditional_request() {
    let o = origin().await;
    *o.state.tile_cc.lock().unwrap() = "max-age=10".into();
    let p = start(base_config(&o), Deps::default()).await;
    let url = o.url("/page/reval");
    assert_eq!(get(p.addr, &url).await.status, 200);
    p.settle().await;
    p.advance(60);
    o.advance(60);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (addr, url) = (p.addr, url.clone());
        tasks.push(tokio::spawn(async move { get(addr, &url).await }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, tile_body("/page/reval", 0));
    }
    assert_eq!(
        o.state.conditional.load(Ordering::SeqCst),
        1,
        "one conditional request"
    );
    assert_eq!(o.path_count("/page/reval"), 2);
    // Freshened: hits again without contacting the origin.
    p.settle().await;
    let r = get(p.addr, &url).await;
    assert!(r.cache_status().contains("hit"), "{}", r.cache_status());
    // A changed object: the 200 replaces the stored one.
    p.advance(60);
    o.advance(60);
    o.state.version.store(1, Ordering::SeqCst);
    let r = get(p.addr, &url).await;
    assert!(
        r.cache_status().contains("fwd=stale; fwd-status=200"),
        "{}",
        r.cache_status()
    );
    assert_eq!(r.body, tile_body("/page/reval", 1));
    p.settle().await;
    assert_eq!(get(p.addr, &url).await.body, tile_body("/page/reval", 1));
    assert_eq!(o.path_count("/page/reval"), 3);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storability_rules_no_store_private_authorization_vary() {
    let o = origin().await;
    let p = start(base_config(&o), Deps::default()).await;
    for path in ["/nostore", "/private"] {
        get(p.addr, &o.url(path)).await;
        let r = get(p.addr, &o.url(path)).await;
        assert_eq!(r.status, 200);
        assert!(
            !r.cache_status().contains("stored"),
            "{path}: {}",
            r.cache_status()
        );
        assert_eq!(o.path_count(path), 2, "{path} was cached");
    }
    let url = o.url("/authd");
    request(p.addr, "GET", &url, &[("authorization", "Bearer x")]).await;
    request(p.addr, "GET", &url, &[("authorization", "Bearer x")]).await;
    assert_eq!(o.path_count("/authd"), 2);
    // Vary: one stored variant per Accept-Encoding.
    let url = o.url("/vary");
    let g = request(p.addr, "GET", &url, &[("accept-encoding", "gzip")]).await;
    p.settle().await;
    let b = request(p.addr, "GET", &url, &[("accept-encoding", "br")]).await;
    p.settle().await;
    assert_eq!(g.body, "encoded for gzip");
    assert_eq!(b.body, "encoded for br");
    let g2 = request(p.addr, "GET", &url, &[("accept-encoding", "gzip")]).await;
    let b2 = request(p.addr, "GET", &url, &[("accept-encoding", "br")]).await;
    assert_eq!(g2.body, "encoded for gzip");
    assert_eq!(b2.body, "encoded for br");
    assert!(g2.cache_status().contains("hit"));
    assert!(b2.cache_status().contains("hit"));
    assert_eq!(o.path_count("/vary"), 2);
    // POST passes through and invalidates.
    get(p.addr, &o.url("/page/inv")).await;
    p.settle().await;
    assert!(get(p.addr, &o.url("/page/inv"))
        .await
        .cache_status()
        .contains("hit"));
    let r = request(p.addr, "POST", &o.url("/page/inv"), &[]).await;
    assert!(
        r.cache_status().contains("fwd=method"),
        "{}",
        r.cache_status()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!get(p.addr, &o.url("/page/inv"))
        .await
        .cache_status()
        .contains("hit"));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_and_via_added() {
    let o = origin().await;
    let p = start(base_config(&o), Deps::default()).await;
    let r = request(
        p.addr,
        "GET",
        &o.url("/echo"),
        &[
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("proxy-authorization", "Basic eA=="),
            ("x-kept", "2"),
        ],
    )
    .await;
    let seen = String::from_utf8_lossy(&r.body).to_string();
    assert!(!seen.contains("x-secret"), "{seen}");
    assert!(!seen.contains("proxy-authorization"), "{seen}");
    assert!(seen.contains("x-kept: 2"), "{seen}");
    assert!(seen.contains("via: 1.1 rack-a"), "{seen}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_and_must_revalidate() {
    let o = origin().await;
    let p = start(base_config(&o), Deps::default()).await;
    get(p.addr, &o.url("/sie")).await;
    get(p.addr, &o.url("/mustreval")).await;
    p.settle().await;
    p.advance(30);
    o.set_mode(ERRORS);
    let r = get(p.addr, &o.url("/sie")).await;
    assert_eq!(r.status, 200, "stale-if-error serves the stored copy");
    assert!(
        r.cache_status().contains("fwd=stale; fwd-status=500"),
        "{}",
        r.cache_status()
    );
    assert!(r.cache_status().contains("detail=stale-if-error"));
    let r = get(p.addr, &o.url("/mustreval")).await;
    assert_eq!(r.status, 500, "must-revalidate: the error passes through");
    p.stop().await;
}

/// Waits until the proxy's health says the backhaul is `want`.
pub(crate) async fn wait_backhaul(h: &ProxyHandle, want: &str) {
    let t0 = Instant::now();
    while h.status().backhaul != want {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "backhaul never went {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_backhaul_cached_tiles_fast_misses_fast_504() {
    let o = origin().await;
    *o.state.tile_cc.lock().unwrap() = "max-age=60".into();
    let p = start(base_config(&o), Deps::default()).await;
    for x in 0..8 {
        let r = get(p.addr, &format!("/tiles/test/3/{x}/1.png")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers.get("content-type").unwrap(), "image/png");
    }
    p.settle().await;
    // Make half of them stale.
    p.advance(120);
    o.set_mode(BLACKHOLE);
    wait_backhaul(&p.handle, "down").await;
    let before = o.count();
    let mut hit_times = Vec::new();
    for x in 0..8 {
        let t0 = Instant::now();
        let r = get(p.addr, &format!("/tiles/test/3/{x}/1.png")).await;
        hit_times.push(t0.elapsed());
        assert_eq!(r.status, 200);
        assert!(r.cache_status().contains("hit"), "{}", r.cache_status());
        assert!(
            r.cache_status().contains("detail=offline"),
            "{}",
            r.cache_status()
        );
        assert!(
            r.cache_status().contains("ttl=-"),
            "stale and marked: {}",
            r.cache_status()
        );
    }
    let mut miss_times = Vec::new();
    for y in 2..12 {
        let t0 = Instant::now();
        let r = get(p.addr, &format!("/tiles/test/4/0/{y}.png")).await;
        miss_times.push(t0.elapsed());
        assert_eq!(r.status, 504);
        assert!(String::from_utf8_lossy(&r.body).contains("offline"));
        assert!(r.cache_status().contains("detail=offline"));
    }
    // Forward-proxy misses too.
    let t0 = Instant::now();
    let r = get(p.addr, &o.url("/page/never")).await;
    miss_times.push(t0.elapsed());
    assert_eq!(r.status, 504);
    hit_times.sort();
    miss_times.sort();
    eprintln!(
        "offline hits: median {:?} max {:?}; misses: median {:?} max {:?}",
        hit_times[4], hit_times[7], miss_times[5], miss_times[10]
    );
    assert!(miss_times[5] < Duration::from_millis(50), "{miss_times:?}");
    assert!(
        miss_times[10] < Duration::from_millis(500),
        "{miss_times:?}"
    );
    assert!(hit_times[4] < Duration::from_millis(50), "{hit_times:?}");
    assert_eq!(o.count(), before, "nothing sent to a dead backhaul");
    // The link comes back: probes notice, misses are fetched again.
    o.set_mode(NORMAL);
    wait_backhaul(&p.handle, "up").await;
    assert_eq!(get(p.addr, "/tiles/test/4/0/2.png").await.status, 200);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_origin_never_holds_a_cached_answer_and_misses_fail_at_the_deadline() {
    let o = origin().await;
    *o.state.tile_cc.lock().unwrap() = "max-age=60".into();
    let mut c = base_config(&o);
    // Probes out of the way: this half is about the request path alone.
    c.proxy.backhaul.probe_interval_ms = 600_000;
    c.proxy.backhaul.probe_interval_down_ms = 600_000;
    c.proxy.backhaul.response_timeout_ms = 30_000;
    c.proxy.backhaul.stale_deadline_ms = 800;
    c.proxy.backhaul.miss_deadline_ms = 2_000;
    let p = start(c, Deps::default()).await;
    for x in 0..3 {
        assert_eq!(
            get(p.addr, &format!("/tiles/test/3/{x}/1.png"))
                .await
                .status,
            200
        );
    }
    p.settle().await;
    p.advance(120); // all stale
    o.set_mode(HANG);
    // The first stale tile waits for the revalidation only up to the stale
    // deadline, then the stored copy is served.
    let t0 = Instant::now();
    let r = get(p.addr, "/tiles/test/3/0/1.png").await;
    let stale = t0.elapsed();
    assert_eq!(r.status, 200);
    assert!(
        r.cache_status().contains("detail=revalidating"),
        "{}",
        r.cache_status()
    );
    assert!(
        stale < Duration::from_secs(1),
        "stale answer took {stale:?}"
    );
    // A miss gets its 504 at the miss deadline, and the origin is marked hung.
    let t0 = Instant::now();
    let r = get(p.addr, "/tiles/test/4/0/2.png").await;
    let first_miss = t0.elapsed();
    assert_eq!(r.status, 504);
    assert!(
        r.cache_status().contains("detail=deadline"),
        "{}",
        r.cache_status()
    );
    assert!(
        (Duration::from_millis(1_900)..Duration::from_secs(5)).contains(&first_miss),
        "{first_miss:?}"
    );
    assert_eq!(p.handle.status().uplink, "degraded");
    // From then on: misses 504 at once, stale tiles at once.
    let t0 = Instant::now();
    let r = get(p.addr, "/tiles/test/4/0/3.png").await;
    assert_eq!(r.status, 504);
    let r2 = get(p.addr, "/tiles/test/3/1/1.png").await;
    assert_eq!(r2.status, 200);
    assert!(
        r2.cache_status().contains("detail=offline"),
        "{}",
        r2.cache_status()
    );
    let r3 = get(p.addr, &o.url("/page/never")).await;
    assert_eq!(r3.status, 504);
    let fast = t0.elapsed();
    assert!(fast < Duration::from_millis(500), "{fast:?}");
    let snap = p.handle.snapshot();
    assert_eq!(snap.deadline_stale, 1);
    assert_eq!(snap.deadline_504, 1);
    eprintln!(
        "hung origin: stale answer {stale:?}, first miss {first_miss:?}, next three {fast:?}"
    );
    p.stop().await;

    // The prober sends real requests (here to tile 0/0/0, no probe URL
    // configured): a hung origin accepts TCP but is seen down, and comes
    // back when it answers again.
    let mut c = base_config(&o);
    c.proxy.backhaul.probe_urls = vec![];
    c.proxy.backhaul.probe_interval_ms = 100;
    c.proxy.backhaul.probe_interval_down_ms = 100;
    c.proxy.backhaul.probe_timeout_ms = 300;
    let p = start(c, Deps::default()).await;
    wait_backhaul(&p.handle, "down").await;
    assert_eq!(p.handle.status().uplink, "down");
    o.set_mode(NORMAL);
    wait_backhaul(&p.handle, "up").await;
    assert_eq!(get(p.addr, "/tiles/test/4/0/4.png").await.status, 200);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_syn_upstream_costs_one_connect_timeout_then_fails_fast() {
    // A bound socket that never accepts, its backlog full: SYNs are dropped.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let hole = sock.listen(1).unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(100),
            tokio::net::TcpStream::connect(hole_addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let o = origin().await;
    let mut c = base_config(&o);
    c.proxy.backhaul.probe_urls = vec![];
    c.proxy.backhaul.probe_interval_ms = 60_000;
    c.proxy.backhaul.probe_interval_down_ms = 60_000;
    c.proxy.backhaul.connect_timeout_ms = 300;
    c.tile_source = vec![];
    let p = start(c, Deps::default()).await;
    let url = format!("http://{hole_addr}/x");
    let t0 = Instant::now();
    let r = get(p.addr, &url).await;
    let first = t0.elapsed();
    assert_eq!(r.status, 504);
    assert!(first >= Duration::from_millis(250), "{first:?}");
    let t0 = Instant::now();
    let r = get(p.addr, &format!("http://{hole_addr}/y")).await;
    let second = t0.elapsed();
    assert_eq!(r.status, 504);
    assert!(second < Duration::from_millis(100), "{second:?}");
    drop(fillers);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_offline_never_touches_the_origin() {
    let o = origin().await;
    let mut c = base_config(&o);
    c.proxy.offline = true;
    let p = start(c, Deps::default()).await;
    let t0 = Instant::now();
    let r = get(p.addr, "/tiles/test/1/0/0.png").await;
    assert_eq!(r.status, 504);
    assert!(String::from_utf8_lossy(&r.body).contains("offline mode"));
    assert!(t0.elapsed() < Duration::from_millis(200));
    assert_eq!(p.handle.status().backhaul, "down");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(o.count(), 0, "no probes, no requests");
    p.handle.set_forced_offline(false);
    assert_eq!(get(p.addr, "/tiles/test/1/0/0.png").await.status, 200);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tile_server_paths_tilejson_and_captive_portals() {
    let o = origin().await;
    let mut c = base_config(&o);
    // No probe may reach the origin while its requests are counted.
    c.proxy.backhaul.probe_interval_ms = 600_000;
    let p = start(c, Deps::default()).await;
    let r = get(p.addr, "/tiles/test.json").await;
    assert_eq!(r.status, 200);
    let tj: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(tj["tilejson"], "3.0.0");
    assert_eq!(
        tj["tiles"][0],
        format!("http://{}/tiles/test/{{z}}/{{x}}/{{y}}.png", p.addr)
    );
    assert_eq!(tj["attribution"], "test data");
    for bad in [
        "/tiles/test/2/4/0.png",
        "/tiles/test/19/0/0.png",
        "/tiles/test/a/0/0.png",
        "/tiles/test/1/0/0.jpg",
        "/tiles/test/1/0",
    ] {
        let r = get(p.addr, bad).await;
        assert_eq!(r.status, 400, "{bad}");
    }
    assert_eq!(get(p.addr, "/tiles/nope/1/0/0.png").await.status, 404);
    assert_eq!(o.count(), 0);
    let r = get(p.addr, "/tiles/test/1/0/0.png").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("access-control-allow-origin").unwrap(), "*");
    // The origin's User-Agent is the source's.
    let ua = o
        .state
        .last_headers
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .get("user-agent")
        .cloned();
    assert_eq!(ua.unwrap(), "fieldrack-test/1 (ops@example.org)");
    // A captive portal answers HTML: refused, never stored.
    o.set_mode(CAPTIVE);
    for _ in 0..2 {
        let r = get(p.addr, "/tiles/test/1/1/0.png").await;
        assert_eq!(r.status, 502);
        assert!(String::from_utf8_lossy(&r.body).contains("captive portal"));
    }
    assert_eq!(o.path_count("/tile/1/1/0.png"), 2, "not stored");
    assert!(p.handle.snapshot().wrong_content >= 2);
    o.set_mode(NORMAL);
    let r = get(p.addr, "/tiles/test/1/1/0.png").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, tile_body("/tile/1/1/0.png", 0));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_control_pac_connect_and_bad_requests() {
    let o = origin().await;
    // PAC, CONNECT and a bad request from an allowed client.
    let mut c = base_config(&o);
    c.proxy.connect_ports = vec![o.addr.port()];
    let p = start(c, Deps::default()).await;
    let r = get(p.addr, "/proxy.pac").await;
    assert_eq!(r.status, 200);
    let pac = String::from_utf8_lossy(&r.body).to_string();
    assert!(pac.contains(&format!("PROXY {}", p.addr)), "{pac}");
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "application/x-ns-proxy-autoconfig"
    );
    let r = get(p.addr, "ftp://example.org/x").await;
    assert_eq!(r.status, 400);
    let mut raw = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    raw.write_all(b"GARBAGE\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = raw.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 400"));
    // CONNECT tunnels bytes to the origin.
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", o.addr).as_bytes())
        .await
        .unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    s.write_all(b"GET /page/tunnel HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.unwrap();
    assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 200"));
    assert_eq!(o.path_count("/page/tunnel"), 1);
    assert_eq!(p.handle.snapshot().tunnels, 1);
    p.stop().await;
    // A client outside allow_networks.
    let mut c = base_config(&o);
    c.proxy.allow_networks = vec!["10.0.0.0/8".into()];
    let p = start(c, Deps::default()).await;
    // Dropped at accept: nothing is read, nothing is answered.
    for target in [o.url("/page/x"), "/tiles/test/1/0/0.png".to_string()] {
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        let _ = s
            .write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await;
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all).await;
        assert!(all.is_empty(), "{}", String::from_utf8_lossy(&all));
    }
    assert_eq!(o.path_count("/page/x"), 0);
    assert_eq!(p.handle.snapshot().forbidden, 2);
    p.stop().await;
}

/// An in-process mesh: each rack's directory consults the others' digests
/// and handles; the replicator pushes to the next rack.
#[derive(Default, Clone)]
struct Mesh {
    racks: Arc<std::sync::Mutex<Vec<(PeerId, ProxyHandle, KeyDigest)>>>,
    fetches: Arc<std::sync::atomic::AtomicU64>,
}

struct Dir {
    me: PeerId,
    mesh: Mesh,
}

impl PeerDirectory for Dir {
    fn candidates(&self, key: &KeyHash) -> Vec<PeerId> {
        self.mesh
            .racks
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, _, d)| *id != self.me && d.contains(key))
            .map(|(id, _, _)| id.clone())
            .collect()
    }
    fn fetch(
        &self,
        peer: &PeerId,
        key: &KeyHash,
    ) -> BoxFuture<'static, Result<Option<PeerObject>, cache_proxy::mesh::PeerError>> {
        let h = self
            .mesh
            .racks
            .lock()
            .unwrap()
            .iter()
            .find(|(id, _, _)| id == peer)
            .map(|(_, h, _)| h.clone());
        let key = *key;
        self.mesh.fetches.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            match h {
                Some(h) => Ok(h.lookup(&key)),
                None => Err(cache_proxy::mesh::PeerError::Unreachable("gone".into())),
            }
        })
    }
}

struct Repl {
    me: PeerId,
    mesh: Mesh,
}

impl Replicator for Repl {
    fn replicate(&self, key: &KeyHash, object: &PeerObject) {
        let target = self
            .mesh
            .racks
            .lock()
            .unwrap()
            .iter()
            .find(|(id, _, _)| *id != self.me)
            .map(|(_, h, _)| h.clone());
        if let Some(h) = target {
            let (key, object) = (*key, object.clone());
            tokio::spawn(async move { h.accept_replica(key, object, false).await });
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_peer_hits_and_replication_survive_a_dead_rack() {
    let o = origin().await;
    let mesh = Mesh::default();
    let deps = |me: &str| Deps {
        peers: Arc::new(Dir {
            me: me.into(),
            mesh: mesh.clone(),
        }),
        replicator: Arc::new(Repl {
            me: me.into(),
            mesh: mesh.clone(),
        }),
        ..Deps::default()
    };
    let a = start(base_config(&o), deps("a")).await;
    let mut cb = base_config(&o);
    cb.proxy.name = "rack-b".into();
    let b = start(cb, deps("b")).await;
    let mut cc = base_config(&o);
    cc.proxy.name = "rack-c".into();
    let c = start(cc, deps("c")).await;
    {
        let mut r = mesh.racks.lock().unwrap();
        for (id, h) in [("a", &a.handle), ("b", &b.handle), ("c", &c.handle)] {
            r.push((id.into(), h.clone(), KeyDigest::with_capacity(10, 0.01)));
        }
    }
    // Rack A fetches tiles over the backhaul; each is replicated to one rack.
    for x in 0..6 {
        assert_eq!(
            get(a.addr, &format!("/tiles/test/3/{x}/2.png"))
                .await
                .status,
            200
        );
    }
    assert_eq!(o.count_tiles(), 6);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Digests are exchanged.
    {
        let mut r = mesh.racks.lock().unwrap();
        for e in r.iter_mut() {
            e.2 = e.1.digest(0.01);
        }
    }
    // Rack C never fetched them: it gets them from a peer, not the origin.
    for x in 0..6 {
        let r = get(c.addr, &format!("/tiles/test/3/{x}/2.png")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, tile_body(&format!("/tile/3/{x}/2.png"), 0));
        assert!(
            r.cache_status().contains("detail=peer"),
            "{}",
            r.cache_status()
        );
    }
    assert_eq!(o.count_tiles(), 6, "origin untouched");
    assert_eq!(c.handle.snapshot().peer_hits, 6);
    // Rack A dies; B (the replica target) still serves all of A's tiles
    // with the backhaul down.
    a.stop().await;
    mesh.racks.lock().unwrap().retain(|(id, _, _)| id != "a");
    b.handle.set_forced_offline(true);
    for x in 0..6 {
        let r = get(b.addr, &format!("/tiles/test/3/{x}/2.png")).await;
        assert_eq!(r.status, 200, "tile {x}");
        assert!(r.cache_status().contains("hit"), "{}", r.cache_status());
    }
    assert_eq!(o.count_tiles(), 6);
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeding_refuses_forbidden_sources_honours_rate_and_resumes() {
    use cache_proxy::seed::{SeedError, SeedPlan};
    let o = origin().await;
    let mut c = base_config(&o);
    let mut osm = tile_source(&o, "osm");
    osm.allow_bulk = false;
    c.tile_source.push(osm);
    c.tile_source[0].requests_per_sec = 50;
    let p = start(c, Deps::default()).await;
    let bbox = "-72.45,18.44,-72.21,18.67".parse().unwrap();
    let plan = SeedPlan {
        source: "osm".into(),
        bbox,
        min_zoom: 0,
        max_zoom: 8,
    };
    assert!(matches!(
        p.handle.seed(&plan, |_| {}).await,
        Err(SeedError::BulkForbidden(_))
    ));
    let plan = SeedPlan {
        source: "test".into(),
        bbox,
        min_zoom: 0,
        max_zoom: 11,
    };
    let n = plan.count();
    assert!(n > 10 && n < 60, "{n}");
    let t0 = Instant::now();
    let mut seen = 0;
    let done = p.handle.seed(&plan, |pr| seen = pr.done).await.unwrap();
    let took = t0.elapsed();
    assert_eq!(done.fetched, n);
    assert_eq!(seen, n);
    assert!(
        took >= Duration::from_secs_f64((n - 1) as f64 / 50.0 * 0.9),
        "rate limit: {took:?} for {n}"
    );
    assert_eq!(o.count_tiles(), n);
    // Pinned, and a second run fetches nothing.
    let again = p.handle.seed(&plan, |_| {}).await.unwrap();
    assert_eq!(again.fetched, 0);
    assert_eq!(again.skipped, n);
    assert_eq!(o.count_tiles(), n);
    let k = cache_proxy::key_hash("tile:test/11/613/899");
    if let Some(m) = p.handle.store().get_meta(&k).unwrap() {
        assert!(m.pinned);
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_prometheus() {
    let o = origin().await;
    let mut c = base_config(&o);
    c.proxy.backhaul.daily_quota_bytes = 1_000_000;
    let p = start(c, Deps::default()).await;
    get(p.addr, "/tiles/test/2/1/1.png").await;
    p.settle().await;
    get(p.addr, "/tiles/test/2/1/1.png").await;
    let s = p.handle.status();
    assert_eq!(s.objects, 1);
    assert!(s.bytes > 0);
    assert_eq!(s.hit_ratio, 0.5);
    let used = tile_body("/tile/2/1/1.png", 0).len() as u64;
    assert_eq!(s.budget_left_bytes, Some(1_000_000 - used));
    let json = serde_json::to_value(&s).unwrap();
    for k in [
        "objects",
        "bytes",
        "hit_ratio",
        "backhaul",
        "budget_left_bytes",
    ] {
        assert!(json.get(k).is_some(), "{k}");
    }
    let prom = p.handle.prometheus();
    for m in [
        "fieldrack_cache_hits_total 1",
        "fieldrack_cache_misses_total 1",
        "fieldrack_cache_peer_hits_total 0",
        "fieldrack_cache_coalesced_total 0",
    ] {
        assert!(prom.contains(m), "{m}\n{prom}");
    }
    assert!(prom.contains(&format!("fieldrack_cache_upstream_bytes_total {used}")));
    p.stop().await;
}

/// A response that declares more than is left of the day's quota is not
/// fetched: the client gets a 503 naming both sizes and the quota is not
/// spent; one that fits is fetched and charged. A POST has done its work
/// upstream before its answer comes: that is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_larger_than_the_quota_left_is_not_fetched() {
    let o = origin().await;
    let mut c = base_config(&o);
    c.proxy.backhaul.daily_quota_bytes = 100_000;
    let p = start(c, Deps::default()).await;
    let r = get(p.addr, &o.url("/big/500000")).await;
    assert_eq!(r.status, 503);
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.contains("500000 bytes") && text.contains("100000 bytes left"),
        "{text}"
    );
    p.settle().await;
    assert_eq!(p.handle.status().budget_left_bytes, Some(100_000));
    let snap = p.handle.snapshot();
    assert_eq!(snap.too_large_for_quota, 1);
    let prom = p.handle.prometheus();
    assert!(
        prom.contains("fieldrack_cache_too_large_for_quota_total 1"),
        "{prom}"
    );
    // 60 kB fits; then 50 kB no longer does, not even uncached.
    let r = get(p.addr, &o.url("/big/60000")).await;
    assert_eq!((r.status.as_u16(), r.body.len()), (200, 60_000));
    p.settle().await;
    let left = p.handle.status().budget_left_bytes.expect("a quota");
    assert!(left <= 40_000, "{left}");
    let r = get(p.addr, &o.url("/big/50000")).await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    let r = request(
        p.addr,
        "GET",
        &o.url("/big/50000"),
        &[("cache-control", "no-store")],
    )
    .await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    p.settle().await;
    assert_eq!(p.handle.status().budget_left_bytes, Some(left));
    assert_eq!(p.handle.snapshot().too_large_for_quota, 3);
    let r = request(p.addr, "POST", &o.url("/big/30000"), &[]).await;
    assert_eq!((r.status.as_u16(), r.body.len()), (200, 30_000));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_cache() {
    let o = origin().await;
    let mut c = base_config(&o);
    let p = start(c.clone(), Deps::default()).await;
    for x in 0..20 {
        get(p.addr, &format!("/tiles/test/5/{x}/3.png")).await;
    }
    p.settle().await;
    let dir = p.stop().await;
    o.set_mode(BLACKHOLE);
    c.proxy.offline = true;
    let p = start_in(&mut c, Deps::default(), dir).await;
    for x in 0..20 {
        let r = get(p.addr, &format!("/tiles/test/5/{x}/3.png")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, tile_body(&format!("/tile/5/{x}/3.png"), 0));
    }
    p.stop().await;
}

impl common::Origin {
    fn count_tiles(&self) -> u64 {
        self.state
            .by_path
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("/tile/"))
            .map(|(_, v)| *v)
            .sum()
    }
}

/// kill -9 during heavy writes: a child process writes objects as fast as
/// it can and prints each key once `put` returned; the parent SIGKILLs it
/// mid-stream, reopens the store, and checks that every acknowledged object
/// is there and intact and that nothing stored is corrupt.
#[test]
fn kill_dash_nine_during_heavy_writes_loses_nothing_acknowledged() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked: Vec<u64> = Vec::new();
    for round in 0..3 {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "proxy::kill9_child_writer",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KILL9_DIR", dir.path())
            .env("KILL9_START", (round * 1_000_000).to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(out).lines();
        let t0 = Instant::now();
        let mut this_round = 0;
        while let Some(Ok(l)) = lines.next() {
            if let Some(n) = l.strip_prefix("ACK ") {
                acked.push(n.parse().unwrap());
                this_round += 1;
            }
            // Kill at a varying point mid-stream, after some heavy writing.
            if (this_round >= 200 && t0.elapsed() > Duration::from_millis(400 + round as u64 * 300))
                || t0.elapsed() > Duration::from_secs(20)
            {
                break;
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(this_round > 100, "child wrote too little: {this_round}");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = cache_proxy::Store::open(dir.path(), cache_proxy::StoreOptions::default()).unwrap();
        let mut present = 0;
        for n in &acked {
            let k = cache_proxy::key_hash(&format!("obj/{n}"));
            if let Some(o) = s.get(&k).unwrap() {
                assert_eq!(o.body, kill9_body(*n), "wrong body for {n}");
                present += 1;
            }
        }
        eprintln!(
            "kill -9: {present}/{} acknowledged objects present after restart",
            acked.len()
        );
        assert_eq!(present, acked.len(), "acknowledged objects lost");
        // Nothing stored is corrupt: read everything in the index.
        let mut keys = Vec::new();
        s.for_each_key(|k| keys.push(*k));
        for k in &keys {
            assert!(s.get(k).unwrap().is_some());
        }
        assert_eq!(s.stats().corrupt_reads, 0);
    });
}

fn kill9_body(n: u64) -> Bytes {
    // Some single-colour (shared) bodies, the rest distinct, 100 B to 20 KB.
    if n.is_multiple_of(3) {
        return Bytes::from(vec![(n % 5) as u8; 700]);
    }
    let seed = blake3::hash(&n.to_le_bytes());
    let len =
        100 + (u16::from_le_bytes([seed.as_bytes()[0], seed.as_bytes()[1]]) as usize % 20_000);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        v.extend_from_slice(seed.as_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

#[test]
#[ignore = "child process of kill_dash_nine_during_heavy_writes_loses_nothing_acknowledged"]
fn kill9_child_writer() {
    let Ok(dir) = std::env::var("KILL9_DIR") else {
        return;
    };
    let start: u64 = std::env::var("KILL9_START").unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let s = cache_proxy::Store::open(
            std::path::Path::new(&dir),
            cache_proxy::StoreOptions::default(),
        )
        .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        // 32 writers in parallel: the writer thread batches them.
        for w in 0..32u64 {
            let s = s.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut n = start + w;
                loop {
                    let mut meta = cache_proxy::ObjectMeta {
                        status: 200,
                        headers: hyper::HeaderMap::new(),
                        request_time: 1_700_000_000,
                        response_time: 1_700_000_000,
                        pinned: false,
                    };
                    meta.headers.insert(
                        "content-type",
                        hyper::header::HeaderValue::from_static("image/png"),
                    );
                    s.put(
                        cache_proxy::key_hash(&format!("obj/{n}")),
                        meta,
                        kill9_body(n),
                    )
                    .await
                    .unwrap();
                    let _ = tx.send(n);
                    n += 32;
                }
            });
        }
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        while let Some(n) = rx.recv().await {
            writeln!(out, "ACK {n}").unwrap();
            out.flush().unwrap();
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_client_sequential_misses() {
    use http_body_util::BodyExt;
    let o = origin().await;
    let p = start(base_config(&o), Deps::default()).await;
    let stream = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for i in 0..300 {
        let req = hyper::Request::get(format!("/tiles/test/10/{i}/0.png"))
            .header("host", p.addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        let resp = sender
            .send_request(req)
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(resp.status(), 200, "request {i}");
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap_or_else(|e| panic!("body {i}: {e}"))
            .to_bytes();
        assert_eq!(
            body,
            tile_body(&format!("/tile/10/{i}/0.png"), 0),
            "body {i}"
        );
    }
    p.stop().await;
}

/// The shared backhaul between real proxies, the mesh replaced by direct
/// calls into the gateway rack's handle.
#[derive(Clone, Default)]
pub(crate) struct Uplinks {
    pub(crate) racks: Arc<std::sync::Mutex<Vec<(PeerId, ProxyHandle)>>>,
    /// The requesting rack, as a gateway learns it from the mesh.
    pub(crate) from: PeerId,
}

impl cache_proxy::Gateways for Uplinks {
    fn gateways(&self) -> Vec<PeerId> {
        let cands: Vec<_> = self
            .racks
            .lock()
            .unwrap()
            .iter()
            .map(|(id, h)| (id.clone(), h.uplink_report(), Duration::ZERO))
            .collect();
        cache_proxy::gateway::rank(&cands)
    }
    fn forward(
        &self,
        peer: &PeerId,
        req: cache_proxy::ForwardRequest,
    ) -> BoxFuture<'static, Result<cache_proxy::ForwardResponse, cache_proxy::mesh::PeerError>>
    {
        let h = self
            .racks
            .lock()
            .unwrap()
            .iter()
            .find(|(id, _)| id == peer)
            .map(|(_, h)| h.clone());
        let from = self.from.clone();
        Box::pin(async move {
            match h {
                Some(h) => Ok(h.serve_forwarded(&from, req).await),
                None => Err(cache_proxy::mesh::PeerError::Unreachable("gone".into())),
            }
        })
    }
    fn tunnel(
        &self,
        peer: &PeerId,
        host: String,
        port: u16,
        client: std::net::IpAddr,
    ) -> BoxFuture<'static, Result<cache_proxy::TunnelOpen, cache_proxy::mesh::PeerError>> {
        let h = self
            .racks
            .lock()
            .unwrap()
            .iter()
            .find(|(id, _)| id == peer)
            .map(|(_, h)| h.clone());
        let from = self.from.clone();
        Box::pin(async move {
            let h = h.ok_or_else(|| cache_proxy::mesh::PeerError::Unreachable("gone".into()))?;
            match h.open_tunnel(&from, &host, port, client).await {
                Ok(t) => {
                    let (here, there) = tokio::io::duplex(16 * 1024);
                    tokio::spawn(t.run(there));
                    Ok(cache_proxy::TunnelOpen::Open(Box::new(here)))
                }
                Err(answer) => Ok(cache_proxy::TunnelOpen::Answer(answer)),
            }
        })
    }
}

/// Rack c's config: tiles from `o`, its own uplink probed at `own` (made
/// to hang by the caller) every 100 ms.
pub(crate) fn rack_without_uplink(o: &Origin, own: &Origin) -> cache_proxy::Config {
    let mut cc = base_config(o);
    cc.proxy.name = "rack-c".into();
    cc.proxy.backhaul.probe_urls = vec![own.url("/probe")];
    cc.proxy.backhaul.probe_interval_ms = 100;
    cc.proxy.backhaul.probe_interval_down_ms = 100;
    cc.proxy.backhaul.probe_timeout_ms = 200;
    cc
}

/// A TCP echo server on loopback.
pub(crate) async fn echo_server() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// CONNECTs through `proxy` to `dest`; the status line, and the stream.
pub(crate) async fn connect_via(
    proxy: std::net::SocketAddr,
    dest: &str,
) -> (String, tokio::net::TcpStream) {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    let status = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    (status, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rack_without_uplink_uses_the_best_gateway_and_its_single_flight() {
    let o = origin().await;
    // Rack c's own uplink: probed at a second origin that hangs.
    let own = origin().await;
    own.set_mode(HANG);
    let uplinks = Uplinks::default();
    let echo = echo_server().await;
    let mut ca = base_config(&o);
    ca.proxy.connect_ports = vec![echo.port()];
    let a = start(ca, Deps::default()).await;
    let mut cb = base_config(&o);
    cb.proxy.name = "rack-b".into();
    cb.proxy.connect_ports = vec![echo.port()];
    let b = start(cb, Deps::default()).await;
    let mut cc = rack_without_uplink(&o, &own);
    cc.proxy.allow_destinations = vec!["127.0.0.0/8".into(), "10.0.0.0/8".into()];
    // c would tunnel to 444 too; the gateways only to the echo server.
    cc.proxy.connect_ports = vec![echo.port(), 444];
    let c = start(
        cc,
        Deps {
            gateways: Arc::new(uplinks.clone()),
            ..Deps::default()
        },
    )
    .await;
    *uplinks.racks.lock().unwrap() = vec![
        ("a".into(), a.handle.clone()),
        ("b".into(), b.handle.clone()),
    ];
    wait_backhaul(&c.handle, "down").await;
    wait_backhaul(&a.handle, "up").await;
    wait_backhaul(&b.handle, "up").await;
    // Concurrent misses on c reach the internet once, through one gateway.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let addr = c.addr;
        tasks.push(tokio::spawn(async move {
            get(addr, "/tiles/test/5/1/1.png").await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.headers.get("content-type").unwrap(), "image/png");
    }
    assert_eq!(
        o.path_count("/tile/5/1/1.png"),
        1,
        "one upstream fetch for 20 misses"
    );
    let served = |h: &ProxyHandle| h.snapshot().forwarded_served;
    assert_eq!(served(&a.handle) + served(&b.handle), 1);
    c.settle().await;
    let r = get(c.addr, "/tiles/test/5/1/1.png").await;
    assert!(
        r.cache_status().starts_with("rack-c; hit"),
        "{}",
        r.cache_status()
    );
    // A forward-proxy miss too; and a destination c allows but the
    // gateway does not is refused there.
    assert_eq!(get(c.addr, &o.url("/page/through")).await.status, 200);
    let r = get(c.addr, "http://10.1.2.3/x").await;
    assert_eq!(r.status, 403, "the gateway judges with its own policy");
    // CONNECT through the gateway: its own connect_ports decide.
    let (status, mut tunnel) = connect_via(c.addr, &echo.to_string()).await;
    assert!(status.contains(" 200"), "{status}");
    tunnel.write_all(b"ping through the mesh").await.unwrap();
    let mut back = [0u8; 21];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping through the mesh");
    drop(tunnel);
    let (status, _) = connect_via(c.addr, "127.0.0.1:444").await;
    assert!(
        status.contains(" 403"),
        "a's connect_ports refuse 444: {status}"
    );
    // The gateway that served goes down: the other takes over at once.
    let (first, second) = if served(&a.handle) > 0 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    first.handle.set_forced_offline(true);
    let before = served(&second.handle);
    assert_eq!(get(c.addr, "/tiles/test/5/2/2.png").await.status, 200);
    assert_eq!(served(&second.handle), before + 1);
    // No gateway left: cache and 504s, at once.
    second.handle.set_forced_offline(true);
    let t0 = Instant::now();
    assert_eq!(get(c.addr, "/tiles/test/5/3/3.png").await.status, 504);
    assert_eq!(get(c.addr, "/tiles/test/5/1/1.png").await.status, 200);
    assert!(t0.elapsed() < Duration::from_millis(500));
    // c's own uplink returns: misses use it, not a gateway.
    first.handle.set_forced_offline(false);
    own.set_mode(NORMAL);
    wait_backhaul(&c.handle, "up").await;
    let sent = c.handle.snapshot().forwarded_sent;
    assert_eq!(get(c.addr, "/tiles/test/5/4/4.png").await.status, 200);
    assert_eq!(c.handle.snapshot().forwarded_sent, sent);
    c.stop().await;
    b.stop().await;
    a.stop().await;
}
