//! The shared backhaul: a rack whose own uplink is down sends its misses
//! through another rack's uplink (a *gateway*), over the mesh.
//!
//! - Each rack tells the others the state of its uplink ([`UplinkReport`]:
//!   up / degraded / down, probe RTT, quota left). The mesh carries it; this
//!   crate only defines it and ranks the candidates ([`rank`], pure).
//! - On a miss that its own uplink cannot fetch (marked down or hung), the
//!   engine asks the [`Gateways`] the mesh provides, best first, at most
//!   [`MAX_GATEWAY_TRIES`] of them: the first that answers wins, a gateway
//!   that fails or times out is skipped for the next. As soon as the rack's
//!   own uplink is back (a probe answers), misses use it again.
//! - The gateway runs a forwarded request through its own pipeline
//!   ([`serve_forwarded`]): its store, its single flight (misses for one
//!   object from several racks reach the internet once), its destination
//!   policy (the requesting rack judged the destination too: checked at
//!   both ends), its budget, a cap per originating client
//!   ([`MAX_FORWARDED_PER_CLIENT`], 429 beyond), the gateway's own
//!   request rate per client, counted under (requesting rack, client key)
//!   ([`crate::client_limits`], 429 with `Retry-After`, passed to the
//!   client unchanged), and each requesting rack's fair share of the
//!   forwarded slots ([`ForwardShares`], 503 beyond). A forwarded request is
//!   never forwarded again: a gateway whose uplink died answers from its
//!   cache or with a 504, so requests cannot loop.
//!
//! GET and HEAD of tiles and web objects travel this way, and `CONNECT`
//! tunnels ([`Gateways::tunnel`], [`open_tunnel`]): the gateway judges the
//! tunnel's destination with its own policy and `connect_ports`, counts it
//! in the originating client's slots and rate, charges its bytes to its
//! budget and to the client's `client_tunnel_bytes_per_day` there.
//! Other methods use the rack's own uplink only.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, StatusCode};

use crate::budget::Class;
use crate::engine::{CacheRequest, Engine};
use crate::health::UplinkState;
use crate::http_cache;
use crate::mesh::{PeerError, PeerId};
use crate::tiles::{self, TileRequest};
use crate::upstream::Target;

/// Gateways tried per miss: a second one covers a gateway that died since
/// its last report; more would only multiply the wait of a hopeless miss.
pub const MAX_GATEWAY_TRIES: usize = 2;
/// How long one gateway gets to deliver a whole object: its own miss
/// deadline (4 s by default) plus the transfer of a few MB over the mesh.
pub const GATEWAY_TIMEOUT: Duration = Duration::from_secs(10);
/// Forwarded requests one rack serves at once for all others: each holds
/// a body of up to [`crate::store::MAX_OBJECT_BYTES`] while it is sent back,
/// and the in-flight byte budget of [`crate::flight`] bounds the rest.
pub const MAX_FORWARDED: usize = 256;
/// Forwarded requests at once per originating client (the requesting
/// rack, as the mesh authenticated it, and the client address it names):
/// a client flooding misses through racks without an uplink gets 429s
/// from the gateway, as it would from its own rack's connection cap.
pub const MAX_FORWARDED_PER_CLIENT: usize = 32;
/// Each requesting rack's share of a gateway's [`MAX_FORWARDED`] slots: a
/// rack flooding the gateway with misses cannot starve another rack's few.
///
/// A rack may hold at most [`fair_share`]`(total, n)` slots, `n` being the
/// racks holding slots with it counted: with one rack forwarding, half the
/// slots; with two, a third each; so there is always room for one more
/// rack's requests, and as racks come the share of each shrinks (a rack
/// above its new share gets no slot until it is below it again).
#[derive(Debug)]
pub struct ForwardShares {
    total: usize,
    held: std::sync::Mutex<std::collections::HashMap<PeerId, usize>>,
}

/// One forwarded request's place in [`ForwardShares`]; released on drop.
#[derive(Debug)]
pub struct ForwardShare {
    shares: Arc<ForwardShares>,
    rack: PeerId,
}

/// The slots one of `racks` racks forwarding at once may hold out of
/// `total`: `total / (racks + 1)`, at least 1 (room is left for a rack
/// not forwarding yet).
pub fn fair_share(total: usize, racks: usize) -> usize {
    (total / (racks + 1)).max(1)
}

impl ForwardShares {
    /// Shares of `total` slots. The map holds one entry per rack holding a
    /// slot, so at most `total` entries.
    pub fn new(total: usize) -> Arc<ForwardShares> {
        Arc::new(ForwardShares {
            total,
            held: std::sync::Mutex::default(),
        })
    }

    /// A slot for a request forwarded by `rack`, or `None` when it holds its
    /// share.
    pub fn try_take(self: &Arc<Self>, rack: &str) -> Option<ForwardShare> {
        let mut m = self.held.lock().expect("shares lock");
        let held = m.get(rack).copied().unwrap_or(0);
        let racks = m.len() + usize::from(held == 0);
        if held >= fair_share(self.total, racks) {
            return None;
        }
        *m.entry(rack.to_owned()).or_insert(0) += 1;
        Some(ForwardShare {
            shares: self.clone(),
            rack: rack.to_owned(),
        })
    }

    /// Slots `rack` holds.
    pub fn held(&self, rack: &str) -> usize {
        let m = self.held.lock().expect("shares lock");
        m.get(rack).copied().unwrap_or(0)
    }
}

impl Drop for ForwardShare {
    fn drop(&mut self) {
        let mut m = self.shares.held.lock().expect("shares lock");
        if let Some(n) = m.get_mut(&self.rack) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.rack);
            }
        }
    }
}

/// A report older than this is ignored: the rack went quiet.
pub const REPORT_MAX_AGE: Duration = Duration::from_secs(10);

/// What a rack tells the others about its uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UplinkReport {
    /// Up, degraded or down.
    pub state: UplinkState,
    /// Smoothed probe round-trip time (ms), if a probe answered.
    pub rtt_ms: Option<u64>,
    /// Bytes left in today's quota (the rack's or the field's, the
    /// smaller); `None` without a quota.
    pub budget_left_bytes: Option<u64>,
    /// The UTC day of `used_today_bytes` (Unix seconds / 86 400).
    #[serde(default)]
    pub day: u64,
    /// Bytes this rack's uplink fetched that day, for the field's budget.
    #[serde(default)]
    pub used_today_bytes: u64,
}

/// A rack's request sent through another rack's uplink.
#[derive(Debug, Clone)]
pub struct ForwardRequest {
    /// GET or HEAD.
    pub method: Method,
    /// An absolute `http://` / `https://` URL, or a tile path
    /// (`/tiles/{source}/{z}/{x}/{y}.{ext}`, the gateway's own source of
    /// that name).
    pub target: String,
    /// The client's headers (hop-by-hop removed).
    pub headers: HeaderMap,
    /// The originating client's address, for per-client limits.
    pub client: IpAddr,
    /// Its budget class at the requesting rack (staff before seeding at
    /// the gateway too).
    pub class: Class,
}

/// The gateway's answer, whole.
#[derive(Debug, Clone)]
pub struct ForwardResponse {
    /// Status code.
    pub status: u16,
    /// Headers (hop-by-hop removed).
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// A byte stream to a gateway carrying a `CONNECT` tunnel.
pub trait TunnelIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> TunnelIo for T {}

/// A gateway's answer to a `CONNECT`.
pub enum TunnelOpen {
    /// Connected: the stream now carries the tunnel's bytes both ways.
    Open(Box<dyn TunnelIo>),
    /// Refused or failed at the gateway: its answer, passed to the client.
    Answer(ForwardResponse),
}

impl std::fmt::Debug for TunnelOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TunnelOpen::Open(_) => f.write_str("Open"),
            TunnelOpen::Answer(a) => f.debug_tuple("Answer").field(&a.status).finish(),
        }
    }
}

/// The racks whose uplinks this rack may use, and the way to them.
pub trait Gateways: Send + Sync + 'static {
    /// Racks with a usable uplink, best first (see [`rank`]). No I/O: it
    /// is called on every miss the own uplink cannot serve.
    fn gateways(&self) -> Vec<PeerId>;

    /// Sends `req` through `peer`'s uplink.
    fn forward(
        &self,
        peer: &PeerId,
        req: ForwardRequest,
    ) -> BoxFuture<'static, Result<ForwardResponse, PeerError>>;

    /// Opens a `CONNECT` tunnel to `host:port` through `peer`'s uplink for
    /// `client`.
    fn tunnel(
        &self,
        peer: &PeerId,
        host: String,
        port: u16,
        client: IpAddr,
    ) -> BoxFuture<'static, Result<TunnelOpen, PeerError>>;
}

/// A rack alone: no gateway.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoGateways;

impl Gateways for NoGateways {
    fn gateways(&self) -> Vec<PeerId> {
        Vec::new()
    }
    fn forward(
        &self,
        _peer: &PeerId,
        _req: ForwardRequest,
    ) -> BoxFuture<'static, Result<ForwardResponse, PeerError>> {
        Box::pin(async { Err(PeerError::Unreachable("no gateway".into())) })
    }
    fn tunnel(
        &self,
        _peer: &PeerId,
        _host: String,
        _port: u16,
        _client: IpAddr,
    ) -> BoxFuture<'static, Result<TunnelOpen, PeerError>> {
        Box::pin(async { Err(PeerError::Unreachable("no gateway".into())) })
    }
}

/// A tunnel a gateway opened for another rack's client: the upstream
/// connection and the client's slot, held while it lives.
pub struct OpenedTunnel {
    engine: Arc<Engine>,
    upstream: tokio::net::TcpStream,
    who: crate::client_limits::ClientId,
    _slot: crate::listener::ClientSlot,
    _share: ForwardShare,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl std::fmt::Debug for OpenedTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedTunnel").finish_non_exhaustive()
    }
}

impl OpenedTunnel {
    /// Copies both ways between `client` (the mesh stream from the
    /// requesting rack) and the upstream until either side closes, charging
    /// this rack's budget and the client's tunnel bytes (the tunnel is cut
    /// once they pass `client_tunnel_bytes_per_day`).
    pub async fn run<C>(self, client: C)
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        crate::stats::Counters::inc(&self.engine.counters.tunnels);
        crate::server::tunnel(self.engine.clone(), client, self.upstream, self.who).await;
    }
}

/// The gateway's side of a `CONNECT` from another rack: this rack's
/// `connect_ports` and destination policy, its uplink health, the
/// originating client's slot, rate and tunnel bytes (counted under
/// `origin`, the requesting rack, and the client's key), `origin`'s share of
/// the forwarded slots; then the connection, to a checked address.
///
/// # Errors
/// The answer for the client (403 naming the rule, 429, 503, 504, 502).
pub async fn open_tunnel(
    engine: &Arc<Engine>,
    origin: &str,
    host: &str,
    port: u16,
    client: IpAddr,
) -> Result<OpenedTunnel, ForwardResponse> {
    let key = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let refusal = |r: crate::policy::Refusal| {
        let resp = crate::server::refused(engine, r, &key);
        ForwardResponse {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: Bytes::from(format!(
                "403 Forbidden: {}; this proxy does not connect clients to internal destinations (rule: {}).\n",
                r.explain(),
                r.label()
            )),
        }
    };
    if let Err(r) = engine.client.policy().check_connect_port(port) {
        return Err(refusal(r));
    }
    if let Some(r) = crate::server::literal_refusal(engine, host, port) {
        return Err(refusal(r));
    }
    let who = crate::client_limits::ClientId::forwarded(origin, client);
    if let Err(l) = engine.client_limits.request(&who) {
        crate::stats::Counters::inc(&engine.counters.over_client_rate);
        return Err(limited(&l));
    }
    let day = (engine.clock)() / 86_400;
    if let Err(l) = engine.client_limits.tunnel_open(&who, day) {
        crate::stats::Counters::inc(&engine.counters.over_client_tunnel_bytes);
        return Err(limited(&l));
    }
    let Some(share) = engine.forward_shares.try_take(origin) else {
        crate::stats::Counters::inc(&engine.counters.over_rack_share);
        return Err(answer(StatusCode::SERVICE_UNAVAILABLE, OVER_SHARE));
    };
    let Ok(permit) = engine.forward_permits.clone().try_acquire_owned() else {
        return Err(answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "503 Service Unavailable: this gateway serves too many racks' requests",
        ));
    };
    let Some(slot) = engine.forward_slots.try_take_for(who.clone()) else {
        crate::stats::Counters::inc(&engine.counters.over_client_cap);
        return Err(answer(
            StatusCode::TOO_MANY_REQUESTS,
            "429 Too Many Requests: too many requests from your address through the shared backhaul",
        ));
    };
    if engine.health.forced_offline() || !engine.health.host_usable(&key) {
        return Err(answer(
            StatusCode::GATEWAY_TIMEOUT,
            "504 Gateway Timeout: the gateway rack's uplink is down",
        ));
    }
    crate::stats::Counters::inc(&engine.counters.forwarded_served);
    match engine.client.connect_tcp(host, port, true).await {
        Ok(upstream) => Ok(OpenedTunnel {
            engine: engine.clone(),
            upstream,
            who,
            _slot: slot,
            _share: share,
            _permit: permit,
        }),
        Err(crate::upstream::FetchError::Refused(r)) => Err(refusal(r)),
        Err(e) => {
            let status = if e.is_link_failure() {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            Err(answer(status, &format!("{status}: {e}")))
        }
    }
}

/// Orders gateway candidates `(rack, report, report age)`: down, stale
/// ([`REPORT_MAX_AGE`]) and out-of-quota uplinks are left out; up before
/// degraded; then the lower probe RTT (unknown last); then the rack id,
/// so every rack picks the same gateway and its single flight and cache
/// serve them all.
pub fn rank(candidates: &[(PeerId, UplinkReport, Duration)]) -> Vec<PeerId> {
    let mut c: Vec<&(PeerId, UplinkReport, Duration)> = candidates
        .iter()
        .filter(|(_, r, age)| {
            r.state != UplinkState::Down && *age <= REPORT_MAX_AGE && r.budget_left_bytes != Some(0)
        })
        .collect();
    c.sort_by(|(a, ra, _), (b, rb, _)| {
        let key = |r: &UplinkReport| {
            (
                r.state == UplinkState::Degraded,
                r.rtt_ms.is_none(),
                r.rtt_ms.unwrap_or(0),
            )
        };
        key(ra).cmp(&key(rb)).then_with(|| a.cmp(b))
    });
    c.into_iter().map(|(id, _, _)| id.clone()).collect()
}

/// The 503 for a request over its rack's [`ForwardShares`] share.
const OVER_SHARE: &str = "503 Service Unavailable: this gateway is serving its fair share of requests for your rack; try again in a moment";

/// A 429 from [`crate::client_limits`], as the client will see it.
fn limited(l: &crate::client_limits::Limited) -> ForwardResponse {
    let mut a = answer(StatusCode::TOO_MANY_REQUESTS, &l.message);
    a.headers
        .insert(header::RETRY_AFTER, HeaderValue::from(l.retry_after_secs));
    a
}

fn answer(status: StatusCode, msg: &str) -> ForwardResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    ForwardResponse {
        status: status.as_u16(),
        headers,
        body: Bytes::from(format!("{msg}\n")),
    }
}

/// The gateway's side: runs another rack's request through this rack's
/// pipeline, judged by this rack's destination policy and per-client
/// limits (counted under `origin`, the requesting rack, and the client's
/// key), within `origin`'s share of the forwarded slots, never forwarded
/// again. The body is collected whole (bounded by the store's object size).
pub async fn serve_forwarded(
    engine: &Arc<Engine>,
    origin: &str,
    req: ForwardRequest,
) -> ForwardResponse {
    if req.method != Method::GET && req.method != Method::HEAD {
        return answer(
            StatusCode::METHOD_NOT_ALLOWED,
            "405 Method Not Allowed: only GET and HEAD go through another rack",
        );
    }
    let who = crate::client_limits::ClientId::forwarded(origin, req.client);
    if let Err(l) = engine.client_limits.request(&who) {
        crate::stats::Counters::inc(&engine.counters.over_client_rate);
        return limited(&l);
    }
    let Some(_share) = engine.forward_shares.try_take(origin) else {
        crate::stats::Counters::inc(&engine.counters.over_rack_share);
        return answer(StatusCode::SERVICE_UNAVAILABLE, OVER_SHARE);
    };
    let Ok(_all) = engine.forward_permits.clone().try_acquire_owned() else {
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "503 Service Unavailable: this gateway serves too many racks' requests",
        );
    };
    let Some(_slot) = engine.forward_slots.try_take_for(who) else {
        crate::stats::Counters::inc(&engine.counters.over_client_cap);
        return answer(
            StatusCode::TOO_MANY_REQUESTS,
            "429 Too Many Requests: too many requests from your address through the shared backhaul",
        );
    };
    crate::stats::Counters::inc(&engine.counters.forwarded_served);
    let creq = match build(engine, &req) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let resp = engine.serve(creq).await;
    let (parts, mut body) = resp.into_parts();
    let mut buf = bytes::BytesMut::new();
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    if buf.len() + d.len() > crate::store::MAX_OBJECT_BYTES {
                        return answer(
                            StatusCode::BAD_GATEWAY,
                            "502 Bad Gateway: the object is too large to send through another rack",
                        );
                    }
                    buf.extend_from_slice(d);
                }
            }
            Some(Err(_)) => {
                return answer(
                    StatusCode::BAD_GATEWAY,
                    "502 Bad Gateway: the object was cut short",
                )
            }
        }
    }
    ForwardResponse {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: buf.freeze(),
    }
}

// The error is the answer sent back whole, once per forwarded request:
// boxing it would buy nothing.
#[allow(clippy::result_large_err)]
fn build(engine: &Arc<Engine>, req: &ForwardRequest) -> Result<CacheRequest, ForwardResponse> {
    let mut headers = req.headers.clone();
    http_cache::strip_hop_by_hop(&mut headers);
    if req.target.starts_with("/tiles/") {
        let (treq, idx) = tiles::parse_path(&req.target, &engine.sources)
            .map_err(|e| answer(StatusCode::NOT_FOUND, &format!("404 Not Found: {e}")))?;
        let TileRequest::Tile { tile, .. } = treq else {
            return Err(answer(
                StatusCode::NOT_FOUND,
                "404 Not Found: only tiles go through another rack",
            ));
        };
        let src = &engine.sources[idx];
        let target = Target::parse(&tiles::upstream_url(&src.url, tile))
            .map_err(|e| answer(StatusCode::INTERNAL_SERVER_ERROR, &format!("500: {e}")))?;
        let mut upstream_headers = HeaderMap::new();
        if let Ok(ua) = HeaderValue::from_str(&src.user_agent) {
            upstream_headers.insert(header::USER_AGENT, ua);
        }
        upstream_headers.insert(
            header::ACCEPT,
            HeaderValue::from_static(src.format.content_type()),
        );
        return Ok(CacheRequest {
            method: req.method.clone(),
            headers,
            key: tiles::cache_key(&src.name, tile),
            target,
            upstream_headers,
            tile: Some(idx),
            class: req.class,
            via: false,
            client: Some(req.client),
            forwarded: true,
        });
    }
    let mut target = Target::parse(&req.target)
        .map_err(|e| answer(StatusCode::BAD_REQUEST, &format!("400 Bad Request: {e}")))?;
    // This rack's own destination policy, whatever the sender decided.
    if let Some(r) = crate::server::literal_refusal(engine, &target.host, target.port) {
        let resp = crate::server::refused(engine, r, &target.authority());
        return Err(ForwardResponse {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: Bytes::from(format!("403 Forbidden: {}\n", r.explain())),
        });
    }
    target.judged = true;
    let mut upstream_headers = headers.clone();
    upstream_headers.append(
        header::VIA,
        HeaderValue::from_str(&format!("1.1 {}", engine.name)).expect("validated name"),
    );
    Ok(CacheRequest {
        method: req.method.clone(),
        headers,
        key: target.url(),
        target,
        upstream_headers,
        tile: None,
        class: req.class,
        via: true,
        client: Some(req.client),
        forwarded: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flooding_rack_leaves_room_for_another() {
        assert_eq!(fair_share(256, 1), 128);
        assert_eq!(fair_share(256, 2), 85);
        assert_eq!(fair_share(2, 5), 1);
        let s = ForwardShares::new(256);
        let b: Vec<ForwardShare> = std::iter::from_fn(|| s.try_take("b")).collect();
        assert_eq!(b.len(), 128, "alone, a rack gets half");
        // c arrives: it may take up to its share, b none until it is below
        // its new one.
        let c: Vec<ForwardShare> = std::iter::from_fn(|| s.try_take("c")).collect();
        assert_eq!(c.len(), 85);
        assert!(s.try_take("b").is_none());
        assert!(b.len() + c.len() <= 256);
        drop(b);
        assert_eq!(s.held("b"), 0);
        assert!(s.try_take("b").is_some());
        drop(c);
        assert_eq!(s.held("c"), 0);
    }

    fn rep(state: UplinkState, rtt: Option<u64>, left: Option<u64>) -> UplinkReport {
        UplinkReport {
            state,
            rtt_ms: rtt,
            budget_left_bytes: left,
            day: 0,
            used_today_bytes: 0,
        }
    }

    #[test]
    fn rank_table() {
        use UplinkState::{Degraded, Down, Up};
        let s = Duration::from_secs(1);
        let old = REPORT_MAX_AGE + s;
        // (candidates, expected order)
        type Candidates = Vec<(&'static str, UplinkReport, Duration)>;
        let table: Vec<(Candidates, Vec<&str>)> = vec![
            (vec![], vec![]),
            (vec![("a", rep(Down, Some(10), None), s)], vec![]),
            (vec![("a", rep(Up, Some(10), None), old)], vec![]),
            (vec![("a", rep(Up, Some(10), Some(0)), s)], vec![]),
            (
                vec![
                    ("a", rep(Degraded, Some(10), None), s),
                    ("b", rep(Up, Some(900), None), s),
                ],
                vec!["b", "a"],
            ),
            (
                vec![
                    ("a", rep(Up, None, None), s),
                    ("b", rep(Up, Some(900), Some(5)), s),
                    ("c", rep(Up, Some(600), None), s),
                ],
                vec!["c", "b", "a"],
            ),
            // Ties: the lower rack id, the same choice on every rack.
            (
                vec![
                    ("z", rep(Up, Some(600), None), s),
                    ("m", rep(Up, Some(600), None), s),
                ],
                vec!["m", "z"],
            ),
        ];
        for (i, (cands, want)) in table.into_iter().enumerate() {
            let cands: Vec<(PeerId, UplinkReport, Duration)> = cands
                .into_iter()
                .map(|(id, r, age)| (id.to_string(), r, age))
                .collect();
            assert_eq!(rank(&cands), want, "row {i}");
        }
    }
}
