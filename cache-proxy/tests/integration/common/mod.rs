//! Test helpers: an origin server that counts requests and can be told to
//! misbehave, a minimal HTTP client, and proxy setup.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cache_proxy::{Config, Deps, Proxy, ProxyHandle, TileFormat, TileSource};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::HeaderValue;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Origin behaviour.
pub const NORMAL: u8 = 0;
/// Accept connections and never answer: a black hole after TCP.
pub const BLACKHOLE: u8 = 1;
/// Answer every tile with an HTML login page.
pub const CAPTIVE: u8 = 2;
/// Answer everything with 500.
pub const ERRORS: u8 = 3;
/// Accept connections and read requests, never answer (a hung link or a
/// wedged origin: invisible to a TCP connect).
pub const HANG: u8 = 4;

#[derive(Default)]
pub struct OriginState {
    pub mode: AtomicU8,
    pub requests: AtomicU64,
    pub conditional: AtomicU64,
    pub by_path: Mutex<HashMap<String, u64>>,
    pub last_headers: Mutex<Option<HeaderMap>>,
    /// Cache-Control for /tile responses.
    pub tile_cc: Mutex<String>,
    /// ETag version for /tile responses (bump to "change" content).
    pub version: AtomicU64,
    /// Seconds added to the origin's Date (to follow the proxy's test clock).
    pub date_offset: AtomicU64,
    held: Mutex<Vec<TcpStream>>,
}

pub struct Origin {
    pub addr: SocketAddr,
    pub state: Arc<OriginState>,
    cancel: CancellationToken,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Origin {
    pub fn count(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }
    pub fn path_count(&self, p: &str) -> u64 {
        *self.state.by_path.lock().unwrap().get(p).unwrap_or(&0)
    }
    /// Moves the origin's clock forward (with the proxy's `advance`).
    pub fn advance(&self, secs: u64) {
        self.state.date_offset.fetch_add(secs, Ordering::SeqCst);
    }
    pub fn set_mode(&self, m: u8) {
        self.state.mode.store(m, Ordering::SeqCst);
    }
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// A deterministic "tile" body for a path: a few hundred bytes to a few KB.
pub fn tile_body(path: &str, version: u64) -> Bytes {
    let seed = blake3::hash(format!("{path}#{version}").as_bytes());
    let len = 200 + (seed.as_bytes()[0] as usize) * 16;
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    while v.len() < len {
        v.extend_from_slice(seed.as_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

fn resp(
    status: u16,
    headers: &[(&str, String)],
    body: Bytes,
) -> Response<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        r.headers_mut().append(
            hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    r
}

async fn origin_handle(
    st: Arc<OriginState>,
    req: Request<hyper::body::Incoming>,
) -> Response<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
    let path = req.uri().path().to_string();
    st.requests.fetch_add(1, Ordering::SeqCst);
    *st.by_path.lock().unwrap().entry(path.clone()).or_default() += 1;
    *st.last_headers.lock().unwrap() = Some(req.headers().clone());
    let conditional = req.headers().contains_key("if-none-match")
        || req.headers().contains_key("if-modified-since");
    if conditional {
        st.conditional.fetch_add(1, Ordering::SeqCst);
    }
    let mode = st.mode.load(Ordering::SeqCst);
    if mode == HANG {
        std::future::pending::<()>().await;
    }
    if mode == ERRORS {
        return resp(
            500,
            &[("content-type", "text/plain".into())],
            Bytes::from_static(b"boom"),
        );
    }
    let date = httpdate::fmt_http_date(
        std::time::SystemTime::now() + Duration::from_secs(st.date_offset.load(Ordering::SeqCst)),
    );
    if path == "/probe" {
        return resp(204, &[], Bytes::new());
    }
    if path.starts_with("/tile/") || path.starts_with("/page/") {
        if mode == CAPTIVE && path.starts_with("/tile/") {
            return resp(
                200,
                &[("content-type", "text/html".into())],
                Bytes::from_static(b"<html>Please log in to the satellite portal</html>"),
            );
        }
        let version = st.version.load(Ordering::SeqCst);
        let etag = format!("\"v{version}\"");
        if req
            .headers()
            .get("if-none-match")
            .and_then(|v| v.to_str().ok())
            == Some(etag.as_str())
        {
            return resp(
                304,
                &[
                    ("etag", etag),
                    ("date", date),
                    ("cache-control", st.tile_cc.lock().unwrap().clone()),
                ],
                Bytes::new(),
            );
        }
        let ct = if path.starts_with("/tile/") {
            "image/png"
        } else {
            "text/html"
        };
        return resp(
            200,
            &[
                ("content-type", ct.into()),
                ("cache-control", st.tile_cc.lock().unwrap().clone()),
                ("etag", etag),
                ("date", date),
                ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT".into()),
            ],
            tile_body(&path, version),
        );
    }
    if let Some(n) = path.strip_prefix("/big/") {
        // N bytes, with their Content-Length.
        let n: usize = n.parse().unwrap_or(0);
        return resp(
            200,
            &[
                ("content-type", "application/octet-stream".into()),
                ("cache-control", "max-age=600".into()),
                ("date", date),
            ],
            Bytes::from(vec![b'x'; n]),
        );
    }
    if let Some(rest) = path.strip_prefix("/slow/") {
        // Head after 300 ms, then 5 chunks 100 ms apart.
        let _ = rest;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stream = futures::stream::unfold(0u8, |i| async move {
            if i >= 5 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'a' + i; 1000]))),
                i + 1,
            ))
        });
        let mut r = Response::new(StreamBody::new(stream).boxed());
        r.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("application/octet-stream"),
        );
        r.headers_mut()
            .insert("cache-control", HeaderValue::from_static("max-age=3600"));
        return r;
    }
    let cc = match path.as_str() {
        "/nostore" => "no-store",
        "/private" => "private, max-age=600",
        "/sie" => "max-age=1, stale-if-error=100000",
        "/mustreval" => "max-age=1, must-revalidate",
        _ => "max-age=600",
    };
    let mut headers = vec![
        ("content-type", "text/plain".to_string()),
        ("cache-control", cc.to_string()),
        ("date", date),
    ];
    let mut body = format!("body of {path}");
    if path == "/vary" {
        headers.push(("vary", "Accept-Encoding".into()));
        let ae = req
            .headers()
            .get("accept-encoding")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string();
        body = format!("encoded for {ae}");
    }
    if path == "/echo" {
        let seen: Vec<String> = req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("")))
            .collect();
        body = seen.join("\n");
        headers[1].1 = "no-store".into();
    }
    resp(200, &headers, Bytes::from(body))
}

pub async fn origin() -> Origin {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(OriginState::default());
    *state.tile_cc.lock().unwrap() = "max-age=3600".into();
    let cancel = CancellationToken::new();
    let st = state.clone();
    let c = cancel.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = c.cancelled() => return,
                r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            };
            if st.mode.load(Ordering::SeqCst) == BLACKHOLE {
                st.held.lock().unwrap().push(stream);
                continue;
            }
            let st2 = st.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let st = st2.clone();
                    async move { Ok::<_, Infallible>(origin_handle(st, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Origin {
        addr,
        state,
        cancel,
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn cache_status(&self) -> String {
        self.headers
            .get("cache-status")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

/// Sends one request on a fresh connection to `proxy`. `target` is the
/// request target as sent (absolute URL for proxying, path for tiles).
pub async fn request(
    proxy: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = Request::builder().method(method).uri(target);
    let host = target
        .strip_prefix("http://")
        .map(|r| r.split('/').next().unwrap().to_string())
        .unwrap_or_else(|| proxy.to_string());
    b = b.header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = sender
        .send_request(b.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(proxy: SocketAddr, target: &str) -> Reply {
    request(proxy, "GET", target, &[]).await
}

pub struct TestProxy {
    pub addr: SocketAddr,
    pub handle: ProxyHandle,
    pub cancel: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub dir: tempfile::TempDir,
    pub clock: Arc<AtomicU64>,
}

impl TestProxy {
    pub fn advance(&self, secs: u64) {
        self.clock.fetch_add(secs, Ordering::SeqCst);
    }
    /// Waits until no fetch is in flight (responses are stored after the
    /// client got its last byte).
    pub async fn settle(&self) {
        let t0 = std::time::Instant::now();
        while self.handle.snapshot().in_flight > 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "flights never settled"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    pub async fn stop(self) -> tempfile::TempDir {
        self.cancel.cancel();
        let _ = self.task.await;
        self.dir
    }
}

/// A `/proc/self/status` figure in KiB (`VmRSS:`, `VmHWM:`), 0 if absent.
pub fn proc_status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn now_secs() -> u64 {
    util::time::unix_secs()
}

pub fn tile_source(origin: &Origin, name: &str) -> TileSource {
    TileSource {
        name: name.into(),
        url: format!("http://{}/tile/{{z}}/{{x}}/{{y}}.png", origin.addr),
        format: TileFormat::Png,
        min_zoom: 0,
        max_zoom: 18,
        attribution: "test data".into(),
        allow_bulk: true,
        requests_per_sec: 0,
        user_agent: "fieldrack-test/1 (ops@example.org)".into(),
    }
}

pub fn base_config(origin: &Origin) -> Config {
    let mut c = Config::default();
    c.proxy.listen = "127.0.0.1:0".parse().unwrap();
    c.proxy.name = "rack-a".into();
    c.proxy.backhaul.probe_urls = vec![origin.url("/probe")];
    c.proxy.backhaul.probe_interval_ms = 50;
    c.proxy.backhaul.probe_interval_down_ms = 50;
    c.proxy.backhaul.probe_timeout_ms = 300;
    c.proxy.backhaul.connect_timeout_ms = 1000;
    c.proxy.backhaul.response_timeout_ms = 1000;
    c.tile_source = vec![tile_source(origin, "test")];
    // The test origin listens on loopback, which the destination policy
    // refuses to clients unless an operator allows it.
    c.proxy.allow_destinations = vec!["127.0.0.0/8".into()];
    c
}

pub async fn start(mut config: Config, deps: Deps) -> TestProxy {
    let dir = tempfile::tempdir().unwrap();
    start_in(&mut config, deps, dir).await
}

pub async fn start_in(config: &mut Config, mut deps: Deps, dir: tempfile::TempDir) -> TestProxy {
    config.proxy.cache_dir = dir.path().to_path_buf();
    let clock = Arc::new(AtomicU64::new(now_secs()));
    let c2 = clock.clone();
    deps.clock = Arc::new(move || c2.load(Ordering::SeqCst));
    let proxy = Proxy::bind(config.clone(), deps).await.unwrap();
    let addr = proxy.local_addr();
    let handle = proxy.handle();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(proxy.run(cancel.clone()));
    TestProxy {
        addr,
        handle,
        cancel,
        task,
        dir,
        clock,
    }
}
