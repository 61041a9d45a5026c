//! The hyper server: access control, routing, the forward proxy (absolute
//! form and `CONNECT`), `/proxy.pac`, the tile server, and the link prober.
//!
//! Routes (origin-form):
//! - `GET /proxy.pac`: proxy auto-config pointing at this rack.
//! - `GET /tiles/{source}/{z}/{x}/{y}.{ext}`, `GET /tiles/{source}.json`.
//! - `GET /`, `/map/...`, `/console/...`: the map viewer and the operator
//!   console (see [`crate::site`]).
//!
//! Absolute-form `http://` requests are proxied; `CONNECT host:port` opens a
//! tunnel (not cached). Clients outside `allow_networks` get 403 for
//! everything. Malformed requests get 400 with a reason (hyper answers 400
//! itself for unparsable HTTP).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::budget::Class;
use crate::client_limits::{ClientId, Limited};
use crate::config::Cidr;
use crate::engine::{full, Body, CacheRequest, Engine};
use crate::http_cache::{self, CacheStatus, Fwd};
use crate::listener::{Activity, ClientSlots, ConnGuard, Watched};
use crate::policy::{kernel_is_local, Host as PolicyHost, Policy, Refusal};
use crate::stats::Counters;
use crate::tiles::{self, TilePathError, TileRequest};
use crate::upstream::{connect_tcp, FetchError, Target};

pub use crate::listener::MAX_CONNECTIONS;
/// How long open connections get to finish on shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Buffer per direction of a CONNECT tunnel.
pub const TUNNEL_BUFFER: usize = 16 * 1024;

/// The answer written to a connection over its client's cap, before
/// closing it (nothing is read from it).
const TOO_MANY: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\ncontent-length: 58\r\nconnection: close\r\n\r\n429 Too Many Requests: too many connections from your address\n";

/// Everything a connection needs.
pub(crate) struct Ctx {
    pub engine: Arc<Engine>,
    pub allow: Vec<Cidr>,
    pub listen: SocketAddr,
    /// Global connection cap.
    pub max_connections: usize,
    /// Per-client connection slots.
    pub slots: Arc<ClientSlots>,
    /// Time to receive a request head (also the keep-alive idle limit).
    pub header_timeout: Duration,
    /// A request or tunnel with no byte moving for this long is closed.
    pub idle_timeout: Duration,
    /// The map viewer and the console hook.
    pub site: crate::site::Site,
}

/// A 403 naming the destination rule that refused a client's request;
/// counted per rule. Never stored (it is the proxy's own answer).
pub(crate) fn refused(e: &Engine, r: Refusal, what: &str) -> Response<Body> {
    e.counters.refused[r.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        event = "proxy_destination_refused",
        destination = what,
        rule = r.label(),
        "refused a destination"
    );
    text(
        StatusCode::FORBIDDEN,
        &format!(
            "403 Forbidden: {}; this proxy does not connect clients to internal destinations (rule: {}).",
            r.explain(),
            r.label()
        ),
        e,
    )
}

/// The early check of a client's destination: refuses addresses and
/// `localhost` from their spelling alone, before the cache is consulted.
/// Names are judged after resolution, when a connection is made.
pub(crate) fn literal_refusal(e: &Engine, host: &str, port: u16) -> Option<Refusal> {
    match Policy::parse_host(host) {
        Err(r) => Some(r),
        Ok(PolicyHost::Ip(ip)) => e
            .client
            .policy()
            .check_addr(SocketAddr::new(ip, port), &kernel_is_local)
            .err(),
        Ok(PolicyHost::Name(_)) => None,
    }
}

/// The 429 for a client over one of its [`crate::client_limits`], with
/// `Retry-After`.
fn too_many(e: &Engine, l: &Limited) -> Response<Body> {
    let mut r = text(StatusCode::TOO_MANY_REQUESTS, &l.message, e);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(l.retry_after_secs));
    r
}

fn text(status: StatusCode, msg: &str, engine: &Engine) -> Response<Body> {
    engine.error_response(
        status,
        msg,
        CacheStatus {
            fwd: Some(Fwd::Bypass),
            ..Default::default()
        },
    )
}

/// Serves connections from `listener` until `cancel`: a client outside
/// `allow_networks` is dropped at accept, before anything is read; one over
/// its per-client cap gets a 429 and is closed; every connection has a
/// header-read timeout and an idle timeout.
pub(crate) async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>, cancel: CancellationToken) {
    let limit = Arc::new(Semaphore::new(ctx.max_connections));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            p = limit.clone().acquire_owned() => p.expect("semaphore open"),
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let e = &ctx.engine;
        if !ctx.allow.iter().any(|c| c.contains(peer.ip())) {
            Counters::inc(&e.counters.forbidden);
            tracing::debug!(client = %peer, "dropped at accept: not in allow_networks");
            drop(stream);
            continue;
        }
        let Some(slot) = ctx.slots.try_take(peer.ip()) else {
            Counters::inc(&e.counters.over_client_cap);
            tracing::debug!(client = %peer, "refused: too many connections from this client");
            let _ = stream.try_write(TOO_MANY);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let guard = Arc::new(ConnGuard {
            _global: permit,
            _client: slot,
            activity: activity.clone(),
        });
        let io = Watched::new(stream, activity.clone());
        let ctx = ctx.clone();
        let cancel = cancel.clone();
        conns.spawn(async move {
            let idle = ctx.idle_timeout;
            let header = ctx.header_timeout;
            let e = ctx.engine.clone();
            let g = guard.clone();
            let svc = service_fn(move |req| {
                let ctx = ctx.clone();
                let g = g.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(ctx, peer, g, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header)
                .keep_alive(true)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = activity.idle(idle) => {
                    Counters::inc(&e.counters.idle_closed);
                    tracing::debug!(client = %peer, "closed: idle");
                }
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
                }
            }
            drop(guard);
        });
        // Reap finished connections so the set stays small.
        while conns.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}

async fn handle(
    ctx: Arc<Ctx>,
    peer: SocketAddr,
    guard: Arc<ConnGuard>,
    req: Request<Incoming>,
) -> Response<Body> {
    let e = &ctx.engine;
    // Checked at accept already; kept as defence in depth.
    if !ctx.allow.iter().any(|c| c.contains(peer.ip())) {
        e.counters
            .forbidden
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(client = %peer, "refused: not in allow_networks");
        return text(
            StatusCode::FORBIDDEN,
            "403 Forbidden: this proxy serves only the relief site's own networks.",
            e,
        );
    }
    if looped(&req, &e.name) {
        return text(
            StatusCode::LOOP_DETECTED,
            "508 Loop Detected: this request already passed through this proxy.",
            e,
        );
    }
    // The map viewer's pages and the PAC file are free: a viewer open on
    // a laptop must never lock its owner out of browsing.
    let free = req.method() != Method::CONNECT
        && req.uri().scheme().is_none()
        && (req.uri().path() == "/proxy.pac" || crate::site::is_site_path(req.uri().path()));
    if !free {
        if let Err(l) = e.client_limits.request(&ClientId::local(peer.ip())) {
            Counters::inc(&e.counters.over_client_rate);
            tracing::debug!(client = %peer, "refused: over its request rate");
            return too_many(e, &l);
        }
    }
    if req.method() == Method::CONNECT {
        return connect(ctx.clone(), peer, guard, req).await;
    }
    if req.uri().scheme().is_some() {
        return proxy(ctx.clone(), peer, req).await;
    }
    let path = req.uri().path().to_string();
    if crate::site::is_site_path(&path) {
        let base = format!("http://{}", our_authority(&req, ctx.listen));
        return crate::site::serve(e, &ctx.site, &base, peer, req).await;
    }
    match (req.method(), path.as_str()) {
        (&Method::GET | &Method::HEAD, "/proxy.pac") => pac(&ctx, &req),
        (&Method::GET | &Method::HEAD, p) if p.starts_with("/tiles/") => {
            tile(ctx.clone(), peer, req).await
        }
        (_, p) if p.starts_with("/tiles/") || p == "/proxy.pac" => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "405 Method Not Allowed: GET or HEAD only.",
            e,
        ),
        _ => text(StatusCode::NOT_FOUND, "404 Not Found", e),
    }
}

fn looped(req: &Request<Incoming>, name: &str) -> bool {
    req.headers()
        .get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|hop| hop.split_whitespace().nth(1) == Some(name))
}

/// The address clients reach us at: the request's Host, else the listener.
fn our_authority(req: &Request<Incoming>, listen: SocketAddr) -> String {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .map(String::from)
        .unwrap_or_else(|| listen.to_string())
}

fn pac(ctx: &Ctx, req: &Request<Incoming>) -> Response<Body> {
    let us = our_authority(req, ctx.listen);
    // Host header may omit the port; the PAC must name it.
    let us = if us
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !us.ends_with(']')
    {
        us
    } else {
        format!("{us}:{}", ctx.listen.port())
    };
    let body = format!(
        "// Fieldrack proxy auto-config.\n\
         function FindProxyForURL(url, host) {{\n\
         \x20 if (isPlainHostName(host) || host == \"localhost\" || shExpMatch(host, \"*.local\") ||\n\
         \x20     isInNet(host, \"10.0.0.0\", \"255.0.0.0\") || isInNet(host, \"172.16.0.0\", \"255.240.0.0\") ||\n\
         \x20     isInNet(host, \"192.168.0.0\", \"255.255.0.0\") || isInNet(host, \"127.0.0.0\", \"255.0.0.0\"))\n\
         \x20   return \"DIRECT\";\n\
         \x20 return \"PROXY {us}; DIRECT\";\n\
         }}\n"
    );
    let mut r = Response::new(full(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ns-proxy-autoconfig"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=300"),
    );
    r.headers_mut()
        .insert(header::AGE, HeaderValue::from_static("0"));
    r
}

fn client_headers(req: &Request<Incoming>) -> HeaderMap {
    let mut h = req.headers().clone();
    http_cache::strip_hop_by_hop(&mut h);
    h
}

async fn proxy(ctx: Arc<Ctx>, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let e = &ctx.engine;
    let mut target = match Target::from_uri(req.uri()) {
        Ok(t) => t,
        Err(err) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("400 Bad Request: {err}"),
                e,
            );
        }
    };
    if let Some(r) = literal_refusal(e, &target.host, target.port) {
        return refused(e, r, &target.authority());
    }
    target.judged = true;

    let headers = client_headers(&req);
    let method = req.method().clone();
    let cacheable_method = method == Method::GET || method == Method::HEAD;
    let rq = http_cache::Directives::parse_request(&headers);
    let bypass = rq.no_store
        || headers.contains_key(header::AUTHORIZATION)
        || headers.contains_key(header::RANGE);
    if !cacheable_method || bypass {
        let fwd = if cacheable_method {
            Fwd::Bypass
        } else {
            Fwd::Method
        };
        let mut upstream = headers;
        upstream.remove(header::PROXY_AUTHORIZATION);
        return e
            .pass_through(method, target, upstream, req.into_body(), fwd)
            .await;
    }
    let mut upstream_headers = headers.clone();
    upstream_headers.append(
        header::VIA,
        HeaderValue::from_str(&format!("1.1 {}", e.name)).expect("validated name"),
    );
    let creq = CacheRequest {
        method,
        headers,
        key: target.url(),
        target,
        upstream_headers,
        tile: None,
        class: Class::Interactive,
        via: true,
        client: Some(peer.ip()),
        forwarded: false,
    };
    e.serve(creq).await
}

async fn tile(ctx: Arc<Ctx>, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let e = &ctx.engine;
    let (treq, idx) = match tiles::parse_path(req.uri().path(), &e.sources) {
        Ok(x) => x,
        Err(err @ TilePathError::UnknownSource(_)) => {
            return text(StatusCode::NOT_FOUND, &format!("404 Not Found: {err}"), e)
        }
        Err(err) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("400 Bad Request: {err}"),
                e,
            )
        }
    };
    let src = &e.sources[idx];
    match treq {
        TileRequest::TileJson { .. } => {
            let base = format!("http://{}", our_authority(&req, ctx.listen));
            let mut r = Response::new(full(tiles::tilejson(src, &base).to_string()));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=300"),
            );
            h.insert(header::AGE, HeaderValue::from_static("0"));
            r
        }
        TileRequest::Tile { tile, .. } => {
            let url = tiles::upstream_url(&src.url, tile);
            let target = match Target::parse(&url) {
                Ok(t) => t,
                Err(err) => {
                    return text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("500: tile source URL: {err}"),
                        e,
                    )
                }
            };
            let mut upstream_headers = HeaderMap::new();
            if let Ok(ua) = HeaderValue::from_str(&src.user_agent) {
                upstream_headers.insert(header::USER_AGENT, ua);
            }
            upstream_headers.insert(
                header::ACCEPT,
                HeaderValue::from_static(src.format.content_type()),
            );
            let creq = CacheRequest {
                method: req.method().clone(),
                headers: client_headers(&req),
                key: tiles::cache_key(&src.name, tile),
                target,
                upstream_headers,
                tile: Some(idx),
                class: Class::Interactive,
                via: false,
                client: Some(peer.ip()),
                forwarded: false,
            };
            e.serve(creq).await
        }
    }
}

async fn connect(
    ctx: Arc<Ctx>,
    peer: SocketAddr,
    guard: Arc<ConnGuard>,
    req: Request<Incoming>,
) -> Response<Body> {
    let e = ctx.engine.clone();
    let Some(auth) = req.uri().authority().cloned() else {
        return text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: CONNECT needs host:port",
            &e,
        );
    };
    let Some(port) = auth.port_u16() else {
        return text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: CONNECT needs host:port",
            &e,
        );
    };
    let host = auth
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let key = auth.as_str().to_string();
    if let Err(r) = e.client.policy().check_connect_port(port) {
        return refused(&e, r, &key);
    }
    if let Some(r) = literal_refusal(&e, &host, port) {
        return refused(&e, r, &key);
    }
    let who = ClientId::local(peer.ip());
    if let Err(l) = e.client_limits.tunnel_open(&who, (e.clock)() / 86_400) {
        Counters::inc(&e.counters.over_client_tunnel_bytes);
        return too_many(&e, &l);
    }
    if !e.health.host_usable(&key) {
        return connect_through_gateway(&ctx, guard, req, host, port, peer).await;
    }
    let upstream = match e.client.connect_tcp(&host, port, true).await {
        Ok(s) => s,
        Err(FetchError::Refused(r)) => return refused(&e, r, &key),
        Err(err) => {
            let status = if err.is_link_failure() {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            return text(status, &format!("{status}: {err}"), &e);
        }
    };
    e.counters
        .tunnels
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tasks = e.tasks.clone();
    let idle = ctx.idle_timeout;
    tasks.spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                // The guard keeps the connection's slots while the tunnel
                // lives; the tunnel closes when nothing moved for `idle`.
                let activity = guard.activity.clone();
                tokio::select! {
                    _ = tunnel(e.clone(), TokioIo::new(upgraded), upstream, who) => {}
                    _ = activity.idle(idle) => Counters::inc(&e.counters.idle_closed),
                }
                drop(guard);
            }
            Err(err) => tracing::debug!(error = %err, "CONNECT upgrade failed"),
        }
    });
    let mut r = Response::new(crate::engine::empty());
    r.headers_mut().insert(
        header::VIA,
        HeaderValue::from_str(&format!("1.1 {}", ctx.engine.name)).expect("validated"),
    );
    r
}

/// A `CONNECT` this rack's uplink cannot carry: through the best gateway
/// rack's (see [`crate::gateway`]), else a 504.
async fn connect_through_gateway(
    ctx: &Arc<Ctx>,
    guard: Arc<ConnGuard>,
    req: Request<Incoming>,
    host: String,
    port: u16,
    peer: SocketAddr,
) -> Response<Body> {
    let e = ctx.engine.clone();
    let gateways = if e.health.forced_offline() {
        Vec::new()
    } else {
        e.gateways.gateways()
    };
    for gw in gateways.into_iter().take(crate::gateway::MAX_GATEWAY_TRIES) {
        let open = e.gateways.tunnel(&gw, host.clone(), port, peer.ip());
        let io = match tokio::time::timeout(crate::gateway::GATEWAY_TIMEOUT, open).await {
            Ok(Ok(crate::gateway::TunnelOpen::Open(io))) => io,
            Ok(Ok(crate::gateway::TunnelOpen::Answer(a))) => {
                let mut r = Response::new(full(a.body));
                *r.status_mut() = StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY);
                *r.headers_mut() = a.headers;
                return r;
            }
            Ok(Err(err)) => {
                tracing::debug!(gateway = %gw, error = %err, "gateway tunnel failed");
                continue;
            }
            Err(_) => {
                tracing::debug!(gateway = %gw, "gateway tunnel timed out");
                continue;
            }
        };
        Counters::inc(&e.counters.forwarded_sent);
        let idle = ctx.idle_timeout;
        let e2 = e.clone();
        e.tasks.spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    let activity = guard.activity.clone();
                    let client = TokioIo::new(upgraded);
                    // The gateway charges its uplink; this rack counts the
                    // client's tunnel bytes against its own cap too.
                    let relay =
                        copy_counted(e2.clone(), client, io, ClientId::local(peer.ip()), false);
                    tokio::select! {
                        _ = relay => {}
                        _ = activity.idle(idle) => Counters::inc(&e2.counters.idle_closed),
                    }
                    drop(guard);
                }
                Err(err) => tracing::debug!(error = %err, "CONNECT upgrade failed"),
            }
        });
        let mut r = Response::new(crate::engine::empty());
        r.headers_mut().insert(
            header::VIA,
            HeaderValue::from_str(&format!("1.1 {}", e.name)).expect("validated"),
        );
        return r;
    }
    text(
        StatusCode::GATEWAY_TIMEOUT,
        "504 Gateway Timeout: this rack is offline (satellite backhaul down) and no other rack's uplink is usable; HTTPS sites cannot be reached.",
        &e,
    )
}

/// Copies both ways, charging the backhaul budget and `who`'s tunnel
/// bytes for every byte; cut once `who` passes
/// `client_tunnel_bytes_per_day`.
pub(crate) async fn tunnel<C>(
    e: Arc<Engine>,
    client: C,
    upstream: tokio::net::TcpStream,
    who: ClientId,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    copy_counted(e, client, upstream, who, true).await;
}

/// Copies both ways between `client` and `upstream` until either side
/// closes or `who` passes its tunnel bytes for the day (then both are
/// dropped, which closes them). `charge`: bytes go to this rack's backhaul
/// budget (false when another rack's uplink carries them).
async fn copy_counted<C, U>(e: Arc<Engine>, client: C, upstream: U, who: ClientId, charge: bool)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let over = CancellationToken::new();
    // One direction's bytes: charged, counted, then written on.
    let count = |n: usize| {
        let (e, who, over) = (e.clone(), who.clone(), over.clone());
        async move {
            if charge {
                e.budget.consume(Class::Interactive, n as u64).await;
            }
            let day = (e.clock)() / 86_400;
            if !e.client_limits.tunnel_bytes(&who, day, n as u64) {
                over.cancel();
            }
        }
    };
    let up = async {
        let mut buf = vec![0u8; TUNNEL_BUFFER];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            count(n).await;
            if over.is_cancelled() || uw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = uw.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; TUNNEL_BUFFER];
        loop {
            let n = match ur.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            count(n).await;
            if charge {
                e.counters
                    .upstream_bytes
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
            if over.is_cancelled() || cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = over.cancelled() => {}
    }
    if over.is_cancelled() {
        Counters::inc(&e.counters.over_client_tunnel_bytes);
        tracing::info!(
            event = "proxy_tunnel_cut",
            client = %who.key,
            rack = who.rack.as_deref().unwrap_or("local"),
            "closed a tunnel: its client passed client_tunnel_bytes_per_day"
        );
    }
}

/// Probes the backhaul until `cancel` with real HTTP requests (a TCP
/// connect cannot see a link that accepts and then says nothing): the
/// configured probe URLs, else tile 0/0/0 of each tile source; a probe is
/// a GET whose response head (any status) must come within the timeout.
/// Hosts marked hung are re-probed the same way; other hosts marked down
/// by a TCP connect.
pub(crate) async fn prober(
    engine: Arc<Engine>,
    probe_urls: Vec<String>,
    interval_up: Duration,
    interval_down: Duration,
    timeout: Duration,
    cancel: CancellationToken,
) {
    let mut targets: Vec<Target> = probe_urls
        .iter()
        .filter_map(|u| Target::parse(u).ok())
        .collect();
    if targets.is_empty() {
        for s in &engine.sources {
            if let Ok(t) = Target::parse(&tiles::upstream_url(
                &s.url,
                tiles::TileId { z: 0, x: 0, y: 0 },
            )) {
                if !targets.iter().any(|x| x.authority() == t.authority()) {
                    targets.push(t);
                }
            }
        }
    }
    loop {
        let interval = if engine.health.backhaul_up() {
            interval_up
        } else {
            interval_down
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if engine.health.forced_offline() {
            continue; // never touch the link when told not to
        }
        if !targets.is_empty() {
            let rtts =
                futures::future::join_all(targets.iter().map(|t| engine.client.probe(t, timeout)))
                    .await;
            let mut any_ok = false;
            for (t, rtt) in targets.iter().zip(rtts) {
                any_ok |= rtt.is_some();
                if let Some(rtt) = rtt {
                    engine.health.record_probe_rtt(rtt);
                }
                engine.health.record(
                    &t.authority(),
                    if rtt.is_some() {
                        crate::health::Outcome::Success
                    } else {
                        crate::health::Outcome::LinkFailure
                    },
                );
            }
            engine.health.record_probe_round(any_ok);
        }
        for t in engine.health.hung_targets() {
            if engine.client.probe(&t, timeout).await.is_some() {
                engine
                    .health
                    .record(&t.authority(), crate::health::Outcome::Success);
            }
        }
        for host in engine.health.down_hosts() {
            let Some((h, p)) = host.rsplit_once(':') else {
                continue;
            };
            let Ok(p) = p.parse::<u16>() else { continue };
            let h = h.trim_start_matches('[').trim_end_matches(']');
            if connect_tcp(h, p, timeout).await.is_ok() {
                if targets.is_empty() {
                    // Nothing else can tell us the link is back.
                    engine.health.record(&host, crate::health::Outcome::Success);
                } else {
                    // A TCP accept proves less than a probe round (a black
                    // hole past the handshake accepts too).
                    engine.health.record_host_reachable(&host);
                }
            }
        }
    }
}
