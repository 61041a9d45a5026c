//! Abuse limits per client (request rate, tunnel bytes) at a rack and at a
//! gateway rack, and each requesting rack's fair share of a gateway.

use crate::common;
use crate::proxy::{connect_via, echo_server, wait_backhaul, Uplinks};

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_proxy::{Deps, ForwardRequest, Proxy};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An answer read off the wire.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one response head and its `content-length` body.
async fn read_answer(s: &mut tokio::net::TcpStream) -> Answer {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut a = Answer {
        status,
        head,
        body: String::new(),
    };
    if a.header("transfer-encoding") == Some("chunked") {
        let mut body = Vec::new();
        loop {
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                s.read_exact(&mut b).await.unwrap();
                line.push(b[0]);
            }
            let size = usize::from_str_radix(String::from_utf8_lossy(&line).trim(), 16).unwrap();
            let mut chunk = vec![0u8; size + 2];
            s.read_exact(&mut chunk).await.unwrap();
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
        a.body = String::from_utf8_lossy(&body).to_string();
        return a;
    }
    let len: usize = a
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    a.body = String::from_utf8_lossy(&body).to_string();
    a
}

/// Sends `request` (a whole head) to `proxy` from the loopback address
/// `from`; the answer.
async fn send_from(proxy: SocketAddr, from: &str, request: &str) -> Answer {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    let mut s = sock.connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    read_answer(&mut s).await
}

async fn get_from(proxy: SocketAddr, from: &str, path: &str) -> Answer {
    send_from(
        proxy,
        from,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Bytes read from `t` until it closes; panics if it stays open 5 s.
async fn read_until_closed(t: &mut tokio::net::TcpStream) -> usize {
    let read = async {
        let mut got = 0usize;
        let mut buf = [0u8; 4096];
        loop {
            match t.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got += n,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("the tunnel was not closed")
}

/// A `CONNECT` request head for `dest`.
fn connect_head(dest: SocketAddr) -> String {
    format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n")
}

fn metric(h: &cache_proxy::ProxyHandle, name: &str) -> u64 {
    let text = h.prometheus();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("fieldrack_cache_{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_gets_429_while_another_is_served() {
    let o = origin().await;
    let mut c = base_config(&o);
    // Three at once, then one a second: ten requests in a row cannot all
    // pass unless they take over seven seconds.
    c.proxy.client_requests_per_sec = 1;
    c.proxy.client_request_burst = 3;
    let p = start(c, Deps::default()).await;
    let mut limited = None;
    for i in 0..10 {
        let a = get_from(p.addr, "127.0.0.1", &format!("/tiles/test/3/{i}/1.png")).await;
        match a.status {
            200 => {}
            429 => {
                limited = Some(a);
                break;
            }
            s => panic!("request {i}: {s} {}", a.body),
        }
    }
    let a = limited.expect("the client was never limited");
    assert_eq!(a.header("retry-after"), Some("1"), "{}", a.head);
    assert!(
        a.body
            .contains("429 Too Many Requests: more than 1 requests a second from your address"),
        "{}",
        a.body
    );
    // Another client is served; the limited one still gets the map
    // viewer's page and the PAC file, which are free.
    assert_eq!(
        get_from(p.addr, "127.0.0.2", "/tiles/test/3/0/1.png")
            .await
            .status,
        200
    );
    for path in ["/", "/proxy.pac"] {
        let a = get_from(p.addr, "127.0.0.1", path).await;
        assert_eq!(a.status, 200, "{path}: {}", a.body);
    }
    // A CONNECT takes a token too.
    let a = send_from(
        p.addr,
        "127.0.0.1",
        "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 429, "{}", a.body);
    assert!(metric(&p.handle, "over_client_rate_total") >= 2);
    assert!(p.handle.snapshot().over_client_rate >= 2);
    // A token comes back within Retry-After.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        get_from(p.addr, "127.0.0.1", "/tiles/test/3/0/1.png")
            .await
            .status,
        200
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_byte_cap_refuses_and_cuts() {
    let o = origin().await;
    let echo = echo_server().await;
    let mut c = base_config(&o);
    c.proxy.connect_ports = vec![echo.port()];
    c.proxy.client_tunnel_bytes_per_day = 10_000;
    let p = start(c, Deps::default()).await;
    let (status, mut t) = connect_via(p.addr, &echo.to_string()).await;
    assert!(status.contains(" 200"), "{status}");
    // 4000 up, 4000 back: 8000 of 10 000.
    let chunk = vec![b'x'; 4000];
    t.write_all(&chunk).await.unwrap();
    let mut back = vec![0u8; 4000];
    t.read_exact(&mut back).await.unwrap();
    // 4000 more passes the cap: the tunnel is closed.
    t.write_all(&chunk).await.unwrap();
    let cut = read_until_closed(&mut t).await;
    assert!(cut < 4000, "bytes past the cap came back: {cut}");
    // A new tunnel is refused, naming the cap; another client's is not.
    let req = connect_head(echo);
    let a = send_from(p.addr, "127.0.0.1", &req).await;
    assert_eq!(a.status, 429, "{}", a.body);
    assert!(
        a.body
            .contains("more than 10000 bytes through HTTPS tunnels today"),
        "{}",
        a.body
    );
    assert!(a.header("retry-after").is_some(), "{}", a.head);
    let a = send_from(p.addr, "127.0.0.2", &req).await;
    assert_eq!(a.status, 200, "{}", a.head);
    assert_eq!(metric(&p.handle, "over_client_tunnel_bytes_total"), 2);
    // The next UTC day, the client may tunnel again.
    p.advance(86_400);
    let a = send_from(p.addr, "127.0.0.1", &req).await;
    assert_eq!(a.status, 200, "{}", a.head);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_limit_values_are_refused_naming_the_field() {
    let o = origin().await;
    for (edit, field) in [
        (
            (|c: &mut cache_proxy::Config| c.proxy.client_requests_per_sec = 0)
                as fn(&mut cache_proxy::Config),
            "proxy.client_requests_per_sec",
        ),
        (
            |c: &mut cache_proxy::Config| c.proxy.client_request_burst = 0,
            "proxy.client_request_burst",
        ),
        (
            |c: &mut cache_proxy::Config| c.proxy.client_requests_per_sec = 1_000_001,
            "proxy.client_requests_per_sec",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = base_config(&o);
        c.proxy.cache_dir = dir.path().to_path_buf();
        edit(&mut c);
        let e = match Proxy::bind(c, Deps::default()).await {
            Ok(_) => panic!("bad config accepted: {field}"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(field), "{e}");
    }
    let text = "[proxy]\nclient_requests_per_sec = \"many\"\n";
    let e = toml::from_str::<cache_proxy::Config>(text)
        .unwrap_err()
        .to_string();
    assert!(e.contains("client_requests_per_sec"), "{e}");
}

/// Racks a (gateway) and c (no uplink: its probes hang); c's clients go
/// through a, which limits them with its own limits.
async fn gateway_and_rack(
    o: &Origin,
    own: &Origin,
    connect_ports: Vec<u16>,
    edit_a: impl FnOnce(&mut cache_proxy::Config),
) -> (TestProxy, TestProxy) {
    let mut ca = base_config(o);
    edit_a(&mut ca);
    let a = start(ca, Deps::default()).await;
    let uplinks = Uplinks {
        from: "rack-c".into(),
        ..Uplinks::default()
    };
    let mut cc = crate::proxy::rack_without_uplink(o, own);
    cc.proxy.connect_ports = connect_ports;
    let c = start(
        cc,
        Deps {
            gateways: Arc::new(uplinks.clone()),
            ..Deps::default()
        },
    )
    .await;
    *uplinks.racks.lock().unwrap() = vec![("rack-a".into(), a.handle.clone())];
    wait_backhaul(&c.handle, "down").await;
    wait_backhaul(&a.handle, "up").await;
    (a, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_limits_another_racks_client_and_its_429_reaches_it() {
    let o = origin().await;
    let own = origin().await;
    own.set_mode(HANG);
    let echo = echo_server().await;
    let (a, c) = gateway_and_rack(&o, &own, vec![echo.port()], |ca| {
        ca.proxy.client_requests_per_sec = 1;
        ca.proxy.client_request_burst = 3;
        ca.proxy.client_tunnel_bytes_per_day = 6_000;
        ca.proxy.connect_ports = vec![echo.port()];
    })
    .await;
    // c's own limits (the defaults) are far away; a's are not.
    let mut limited = None;
    for i in 0..10 {
        let r = get_from(c.addr, "127.0.0.1", &format!("/tiles/test/4/{i}/2.png")).await;
        match r.status {
            200 => {}
            429 => {
                limited = Some(r);
                break;
            }
            s => panic!("request {i}: {s} {}", r.body),
        }
    }
    let r = limited.expect("the gateway never limited c's client");
    assert!(
        r.body
            .contains("more than 1 requests a second from your address"),
        "{}",
        r.body
    );
    assert_eq!(r.header("retry-after"), Some("1"), "{}", r.head);
    assert!(a.handle.snapshot().over_client_rate >= 1);
    assert_eq!(c.handle.snapshot().over_client_rate, 0, "limited at a");
    // Another of c's clients is served through a meanwhile.
    let r = get_from(c.addr, "127.0.0.2", "/tiles/test/4/0/3.png").await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Tunnel bytes count at the gateway: a cuts the tunnel past its cap.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, mut t) = connect_via(c.addr, &echo.to_string()).await;
    assert!(status.contains(" 200"), "{status}");
    let chunk = vec![b'y'; 2500];
    t.write_all(&chunk).await.unwrap();
    let mut back = vec![0u8; 2500];
    t.read_exact(&mut back).await.unwrap();
    t.write_all(&chunk).await.unwrap();
    let cut = read_until_closed(&mut t).await;
    assert!(cut < 2500, "bytes past the gateway's cap came back: {cut}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let req = connect_head(echo);
    let r = send_from(c.addr, "127.0.0.1", &req).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(
        r.body
            .contains("more than 6000 bytes through HTTPS tunnels today"),
        "{}",
        r.body
    );
    assert!(a.handle.snapshot().over_client_tunnel_bytes >= 2);
    c.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_rack_does_not_starve_another_at_a_gateway() {
    let o = origin().await;
    let own = origin().await;
    own.set_mode(HANG);
    let (a, c) = gateway_and_rack(&o, &own, vec![443], |_| {}).await;
    // Rack b floods a with slow misses (0.8 s each), from many addresses
    // so no per-client limit stops it first, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = Vec::new();
    for t in 0..300u32 {
        let (h, stop, url) = (a.handle.clone(), stop.clone(), o.url("/slow/"));
        flood.push(tokio::spawn(async move {
            let client: IpAddr = format!("10.9.{}.{}", t / 10, 1 + t % 10).parse().unwrap();
            let mut statuses = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let req = ForwardRequest {
                    method: hyper::Method::GET,
                    target: format!("{url}b-{t}-{i}"),
                    headers: hyper::HeaderMap::new(),
                    client,
                    class: cache_proxy::budget::Class::Interactive,
                };
                statuses.push(h.serve_forwarded("rack-b", req).await.status);
                i += 1;
                if statuses.last() != Some(&200) {
                    // Refused flooders come back at 10/s each: enough to
                    // hold b at its share, without a refusal storm that
                    // would starve c of CPU, not of slots, on a busy machine.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            statuses
        }));
    }
    // b is at its share.
    let t0 = Instant::now();
    while a.handle.snapshot().over_rack_share == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "b never hit its share"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // c's few requests are answered, promptly, while b floods.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let addr = c.addr;
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = get_from(addr, "127.0.0.1", &format!("/tiles/test/6/{i}/5.png")).await;
            (r.status, r.body, t.elapsed())
        }));
    }
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let (status, body, took) = t.await.unwrap();
        assert_eq!(status, 200, "c starved by b: {body}");
        slowest = slowest.max(took);
    }
    stop.store(true, Ordering::SeqCst);
    let mut b_ok = 0;
    let mut b_503 = 0;
    for f in flood {
        for s in f.await.unwrap() {
            match s {
                200 => b_ok += 1,
                503 => b_503 += 1,
                _ => {}
            }
        }
    }
    println!(
        "c's slowest request {slowest:?} while b flooded ({b_ok} served, {b_503} over its share)"
    );
    assert!(b_ok > 0 && b_503 > 0, "b served {b_ok}, refused {b_503}");
    // Generous: the bound is not a figure, only "not starved" (a 503 is
    // instant; a starved request would be refused, not slow).
    assert!(slowest < Duration::from_secs(10), "{slowest:?}");
    c.stop().await;
    a.stop().await;
}
