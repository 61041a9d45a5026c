//! The caching pipeline shared by the forward proxy and the tile server:
//! store → (peer → backhaul, through one flight per key) → store, with the
//! decisions taken by [`crate::http_cache`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, BodyStream, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::budget::{Budget, Class};
use crate::config::TileSource;
use crate::flight::{FailKind, Flight, Flights, Head, Subscriber};
use crate::gateway::{ForwardRequest, Gateways, GATEWAY_TIMEOUT, MAX_GATEWAY_TRIES};
use crate::health::Health;
use crate::http_cache::{self, evaluate, CacheStatus, Fwd, Stored, Verdict};
use crate::mesh::{PeerDirectory, PeerObject, Replicator};
use crate::stats::Counters;
use crate::store::{key_hash, KeyHash, Object, ObjectMeta, Store, MAX_OBJECT_BYTES};
use crate::upstream::{Client, FetchError, Target, UpBody};

/// Boxed error for response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Response body type of the server.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Peers asked per miss before the backhaul (digest false positives make
/// asking many pointless).
pub const MAX_PEER_TRIES: usize = 2;
/// How long a peer gets to deliver an object.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Upstream body silence that aborts a fetch.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bodies up to this size (declared `Content-Length`) are answered once
/// stored, so `Cache-Status` can say `stored` truthfully; a tile waits for
/// one group commit. Larger or streamed bodies are answered at once and make
/// no claim.
pub const CONFIRM_STORED_BYTES: usize = 256 * 1024;
/// Background revalidations (stale-while-revalidate) at once; beyond this
/// they are skipped (the next request tries again).
pub const MAX_BACKGROUND_REVALIDATIONS: usize = 64;

/// A complete body.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// Spaces upstream requests to a tile source at its `requests_per_sec`.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    next: tokio::sync::Mutex<Instant>,
}

impl RateLimiter {
    /// `per_sec` = 0 means unlimited.
    pub fn new(per_sec: u32) -> RateLimiter {
        RateLimiter {
            interval: if per_sec == 0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(1.0 / f64::from(per_sec))
            },
            next: tokio::sync::Mutex::new(Instant::now()),
        }
    }

    /// Waits for this request's slot. Cancel-safe only in that a cancelled
    /// wait still used its slot.
    pub async fn acquire(&self) {
        if self.interval.is_zero() {
            return;
        }
        let slot = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// A request the cache may answer.
#[derive(Debug, Clone)]
pub struct CacheRequest {
    /// GET or HEAD.
    pub method: Method,
    /// The client's headers (hop-by-hop removed).
    pub headers: HeaderMap,
    /// Primary cache key (normalised URL, or `tile:source/z/x/y`).
    pub key: String,
    /// Upstream.
    pub target: Target,
    /// Headers to send upstream (no conditionals: the cache adds its own).
    pub upstream_headers: HeaderMap,
    /// Index of the tile source, for tile requests.
    pub tile: Option<usize>,
    /// Budget class.
    pub class: Class,
    /// Add `Via` to responses (forward proxy) or not (tile server, an origin).
    pub via: bool,
    /// The client's address when the request may go through another
    /// rack's uplink (see [`crate::gateway`]); `None` for the rack's own
    /// work (seeding).
    pub client: Option<std::net::IpAddr>,
    /// Came from another rack through the shared backhaul: never sent on
    /// to a further gateway.
    pub forwarded: bool,
}

/// The engine: one per proxy.
pub struct Engine {
    /// Cache name for `Via` and `Cache-Status`.
    pub name: String,
    /// Tile sources, by index.
    pub sources: Vec<TileSource>,
    /// Object store.
    pub store: Store,
    /// Flights in progress.
    pub flights: Arc<Flights>,
    /// Upstream client.
    pub client: Client,
    /// Link health.
    pub health: Health,
    /// Backhaul budget.
    pub budget: Budget,
    /// Counters.
    pub counters: Counters,
    /// The mesh directory.
    pub peers: Arc<dyn PeerDirectory>,
    /// The mesh replicator.
    pub replicator: Arc<dyn Replicator>,
    /// Per tile source rate limiters.
    pub limiters: HashMap<String, Arc<RateLimiter>>,
    /// Wall clock, Unix seconds.
    pub clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Fetch tasks (so shutdown can wait for them).
    pub tasks: TaskTracker,
    /// Bounds background revalidations.
    pub background: Arc<Semaphore>,
    /// How long a client with a stored copy waits for its revalidation
    /// before the stored copy is served (`stale_deadline_ms`).
    pub stale_deadline: Duration,
    /// How long a miss waits for a response head before a 504; an
    /// upstream silent that long is marked hung (`miss_deadline_ms`).
    pub miss_deadline: Duration,
    /// Other racks' uplinks, for misses this rack's cannot fetch.
    pub gateways: Arc<dyn Gateways>,
    /// Bounds the requests this rack serves for others at once
    /// ([`crate::gateway::MAX_FORWARDED`]).
    pub forward_permits: Arc<Semaphore>,
    /// Forwarded requests per originating client
    /// ([`crate::gateway::MAX_FORWARDED_PER_CLIENT`]).
    pub forward_slots: Arc<crate::listener::ClientSlots>,
    /// Each requesting rack's share of the forwarded slots
    /// ([`crate::gateway::ForwardShares`]).
    pub forward_shares: Arc<crate::gateway::ForwardShares>,
    /// Request rate and tunnel bytes per client, this rack's and, as a
    /// gateway, other racks' (`client_requests_per_sec`,
    /// `client_tunnel_bytes_per_day`).
    pub client_limits: crate::client_limits::ClientLimits,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn to_stored(m: &ObjectMeta) -> Stored {
    Stored {
        status: m.status,
        headers: m.headers.clone(),
        request_time: m.request_time,
        response_time: m.response_time,
    }
}

/// The 503 for a response whose declared length does not fit in what is
/// left of the day's backhaul quota.
fn too_large_message(declared: u64, left: u64) -> String {
    format!(
        "503 Service Unavailable: this response is {declared} bytes, more than the {left} bytes left of today's satellite backhaul quota; it was not fetched."
    )
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Headers removed from what we send upstream for a cacheable request: the
/// cache adds its own validators, and a client's would get us a 304 we could
/// not store.
const CLIENT_CONDITIONALS: [HeaderName; 4] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_RANGE,
];

impl Engine {
    fn inc(c: &std::sync::atomic::AtomicU64) {
        Counters::inc(c);
    }

    fn tile_source(&self, req: &CacheRequest) -> Option<&TileSource> {
        req.tile.and_then(|i| self.sources.get(i))
    }

    /// A response generated by the proxy itself.
    pub fn error_response(&self, status: StatusCode, msg: &str, cs: CacheStatus) -> Response<Body> {
        let mut r = Response::new(full(format!("{msg}\n")));
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::AGE, HeaderValue::from_static("0"));
        h.insert("cache-status", hv(&cs.render(&self.name)));
        r
    }

    fn offline_504(&self, fwd: Fwd) -> Response<Body> {
        Self::inc(&self.counters.offline_misses);
        let msg = if self.health.forced_offline() {
            "504 Gateway Timeout: this rack is in offline mode (forced by the operator) and does not hold this object."
        } else {
            "504 Gateway Timeout: this rack is offline (satellite backhaul down) and does not hold this object."
        };
        self.error_response(
            StatusCode::GATEWAY_TIMEOUT,
            msg,
            CacheStatus {
                fwd: Some(fwd),
                detail: Some("offline"),
                ..Default::default()
            },
        )
    }

    /// Builds the response for a stored object; `st` is `obj`'s
    /// [`Stored`] (its headers become the response's, without a copy).
    fn cached_response(
        &self,
        req: &CacheRequest,
        obj: &Object,
        st: Stored,
        cs: CacheStatus,
        now: u64,
    ) -> Response<Body> {
        let age = st.current_age(now);
        let mut headers = st.headers;
        headers.insert(header::AGE, HeaderValue::from(age));
        headers.insert("cache-status", hv(&cs.render(&self.name)));
        self.decorate(req, &mut headers);
        let not_modified = obj.meta.status == 200
            && http_cache::client_not_modified(&req.headers, &obj.meta.headers);
        let (status, body) = if not_modified {
            headers.remove(header::CONTENT_LENGTH);
            (StatusCode::NOT_MODIFIED, empty())
        } else if req.method == Method::HEAD {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(obj.body.len()));
            (
                StatusCode::from_u16(obj.meta.status).unwrap_or(StatusCode::OK),
                empty(),
            )
        } else {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(obj.body.len()));
            (
                StatusCode::from_u16(obj.meta.status).unwrap_or(StatusCode::OK),
                full(obj.body.clone()),
            )
        };
        let mut r = Response::new(body);
        *r.status_mut() = status;
        *r.headers_mut() = headers;
        r
    }

    fn decorate(&self, req: &CacheRequest, headers: &mut HeaderMap) {
        if req.via {
            headers.append(header::VIA, hv(&format!("1.1 {}", self.name)));
        }
        if req.tile.is_some() {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        }
    }

    /// Answers a cacheable request.
    pub async fn serve(self: &Arc<Self>, req: CacheRequest) -> Response<Body> {
        let now = (self.clock)();
        let primary = key_hash(&req.key);
        let vary = if req.tile.is_none() {
            self.store.vary_fields(&primary)
        } else {
            None
        };
        let kh = match &vary {
            Some(f) => key_hash(&format!(
                "{}\n{}",
                req.key,
                http_cache::vary_key(f, &req.headers)
            )),
            None => primary,
        };
        let stored = match self.store.get(&kh) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "store read failed; treating as a miss");
                None
            }
        };
        let mut fwd = if vary.is_some() {
            Fwd::VaryMiss
        } else {
            Fwd::UriMiss
        };
        if let Some(obj) = &stored {
            let st = to_stored(&obj.meta);
            let ev = evaluate(&req.headers, &st, now);
            match ev.verdict {
                Verdict::Fresh => {
                    Self::inc(&self.counters.hits);
                    return self.cached_response(
                        &req,
                        obj,
                        st,
                        CacheStatus {
                            hit: true,
                            ttl: Some(ev.ttl),
                            ..Default::default()
                        },
                        now,
                    );
                }
                // Link health only matters once the object is not fresh.
                _ if !self.health.host_usable(&req.target.authority()) => {
                    // RFC 9111 §4.2.4: disconnected. Tiles are ours to serve
                    // (we are their origin); proxied objects obey their
                    // must-revalidate.
                    if req.tile.is_some() || st.stale_allowed() {
                        Self::inc(&self.counters.hits);
                        Self::inc(&self.counters.stale_hits);
                        return self.cached_response(
                            &req,
                            obj,
                            st,
                            CacheStatus {
                                hit: true,
                                ttl: Some(ev.ttl),
                                detail: Some("offline"),
                                ..Default::default()
                            },
                            now,
                        );
                    }
                    Self::inc(&self.counters.misses);
                    return self.offline_504(Fwd::Stale);
                }
                Verdict::StaleWhileRevalidate => {
                    Self::inc(&self.counters.hits);
                    Self::inc(&self.counters.stale_hits);
                    self.revalidate_in_background(&req, kh, obj.clone());
                    return self.cached_response(
                        &req,
                        obj,
                        st,
                        CacheStatus {
                            hit: true,
                            ttl: Some(ev.ttl),
                            detail: Some("stale-while-revalidate"),
                            ..Default::default()
                        },
                        now,
                    );
                }
                Verdict::MustValidate => {
                    fwd = if http_cache::Directives::parse_request(&req.headers).no_cache {
                        Fwd::Request
                    } else {
                        Fwd::Stale
                    };
                }
            }
        }
        Self::inc(&self.counters.misses);
        let usable = self.health.host_usable(&req.target.authority());
        if stored.is_none()
            && !usable
            && self.peers.candidates(&kh).is_empty()
            && !self.may_use_gateway(&req)
        {
            return self.offline_504(fwd);
        }
        // Subscribed before the fetch starts: a fetch with no subscriber
        // for a body it will not store is abandoned.
        let (flight, sub, leader) = self.flights.join(&kh);
        if leader {
            self.start_fetch(&req, kh, stored.clone(), flight, usable);
        } else {
            Self::inc(&self.counters.coalesced);
        }
        self.answer_from_flight(req, kh, stored, sub, !leader, fwd)
            .await
    }

    fn revalidate_in_background(self: &Arc<Self>, req: &CacheRequest, kh: KeyHash, obj: Object) {
        let Ok(permit) = self.background.clone().try_acquire_owned() else {
            return;
        };
        // Nobody waits on a background revalidation: if its answer will
        // not be stored, it is abandoned as soon as that is known.
        let (flight, _nobody, leader) = self.flights.join(&kh);
        if !leader {
            return; // someone is already fetching it
        }
        let req = req.clone();
        let this = self.clone();
        self.tasks.spawn(async move {
            this.fetch(req, kh, Some(obj), flight, true).await;
            drop(permit);
        });
    }

    fn start_fetch(
        self: &Arc<Self>,
        req: &CacheRequest,
        kh: KeyHash,
        stored: Option<Object>,
        flight: Arc<Flight>,
        backhaul: bool,
    ) {
        let this = self.clone();
        let req = req.clone();
        self.tasks
            .spawn(async move { this.fetch(req, kh, stored, flight, backhaul).await });
    }

    async fn answer_from_flight(
        self: &Arc<Self>,
        req: CacheRequest,
        kh: KeyHash,
        stored: Option<Object>,
        mut sub: Subscriber,
        collapsed: bool,
        fwd: Fwd,
    ) -> Response<Body> {
        let now = (self.clock)();
        let stale_fallback = |kind_unreachable: bool,
                              fwd_status: Option<u16>,
                              detail: Option<&'static str>|
         -> Option<Response<Body>> {
            let obj = stored.as_ref()?;
            let st = to_stored(&obj.meta);
            let ok = if req.tile.is_some() {
                kind_unreachable || http_cache::stale_if_error(&req.headers, &st, now, false)
            } else {
                http_cache::stale_if_error(&req.headers, &st, now, kind_unreachable)
            };
            if !ok {
                return None;
            }
            Self::inc(&self.counters.stale_hits);
            let ttl = st.ttl(now);
            Some(self.cached_response(
                &req,
                obj,
                st,
                CacheStatus {
                    fwd: Some(Fwd::Stale),
                    fwd_status,
                    ttl: Some(ttl),
                    collapsed,
                    detail: Some(detail.unwrap_or(
                        if kind_unreachable && !self.health.backhaul_up() {
                            "offline"
                        } else {
                            "stale-if-error"
                        },
                    )),
                    ..Default::default()
                },
                now,
            ))
        };
        // Never wait long on the upstream: a stored copy is served after
        // the stale deadline (the revalidation goes on in the background),
        // a miss gets its 504 at the miss deadline.
        let first = if stored.is_some() {
            self.stale_deadline.min(self.miss_deadline)
        } else {
            self.miss_deadline
        };
        let head = match tokio::time::timeout(first, sub.head()).await {
            Ok(head) => head,
            Err(_) => {
                if let Some(r) = stale_fallback(true, None, Some("revalidating")) {
                    Self::inc(&self.counters.deadline_stale);
                    return r;
                }
                let left = self.miss_deadline.saturating_sub(first);
                match tokio::time::timeout(left, sub.head()).await {
                    Ok(head) => head,
                    Err(_) => {
                        Self::inc(&self.counters.deadline_504);
                        return self.error_response(
                            StatusCode::GATEWAY_TIMEOUT,
                            &format!(
                                "504 Gateway Timeout: {} did not answer within {} ms; the backhaul may be hung.",
                                req.target.authority(),
                                self.miss_deadline.as_millis()
                            ),
                            CacheStatus {
                                fwd: Some(fwd),
                                collapsed,
                                detail: Some("deadline"),
                                ..Default::default()
                            },
                        );
                    }
                }
            }
        };
        match head {
            Head::Revalidated => match self.store.get(&kh).ok().flatten() {
                Some(obj) => {
                    let st = to_stored(&obj.meta);
                    let ttl = st.ttl((self.clock)());
                    self.cached_response(
                        &req,
                        &obj,
                        st,
                        CacheStatus {
                            fwd: Some(Fwd::Stale),
                            fwd_status: Some(304),
                            ttl: Some(ttl),
                            collapsed,
                            ..Default::default()
                        },
                        (self.clock)(),
                    )
                }
                None => self.error_response(
                    StatusCode::BAD_GATEWAY,
                    "502 Bad Gateway: revalidated object vanished",
                    CacheStatus::default(),
                ),
            },
            Head::Failed(FailKind::Refused(r)) => {
                crate::server::refused(self, r, &req.target.authority())
            }
            Head::Failed(kind) => {
                let unreachable = matches!(
                    kind,
                    FailKind::Offline | FailKind::Unreachable | FailKind::Upstream
                );
                if let Some(r) = stale_fallback(unreachable, None, None) {
                    return r;
                }
                let cs = CacheStatus {
                    fwd: Some(fwd),
                    collapsed,
                    ..Default::default()
                };
                match kind {
                    FailKind::Offline => self.offline_504(fwd),
                    FailKind::Unreachable => self.error_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!(
                            "504 Gateway Timeout: {} did not answer; the satellite backhaul may be down.",
                            req.target.authority()
                        ),
                        cs,
                    ),
                    FailKind::Upstream => self.error_response(
                        StatusCode::BAD_GATEWAY,
                        &format!("502 Bad Gateway: {} failed (refused, reset or malformed answer).", req.target.authority()),
                        cs,
                    ),
                    FailKind::Quota => self.error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "503 Service Unavailable: today's satellite backhaul quota is used up; only cached content is available.",
                        cs,
                    ),
                    FailKind::TooLarge { declared, left } => self.error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &too_large_message(declared, left),
                        cs,
                    ),
                    FailKind::Refused(r) => crate::server::refused(self, r, &req.target.authority()),
                    FailKind::WrongContent => self.error_response(
                        StatusCode::BAD_GATEWAY,
                        "502 Bad Gateway: the tile source answered with something that is not a tile (a captive portal or login page?); not stored.",
                        cs,
                    ),
                }
            }
            Head::Response {
                status,
                mut headers,
                storing,
                from_peer,
                request_time,
                response_time,
            } => {
                if http_cache::is_error_status(status) {
                    if let Some(r) = stale_fallback(false, Some(status), None) {
                        return r;
                    }
                }
                let st = Stored {
                    status,
                    headers: headers.clone(),
                    request_time,
                    response_time,
                };
                headers.insert(header::AGE, HeaderValue::from(st.current_age(now)));
                // `stored` only when it was: for a small body (a tile) the
                // answer waits for the store; a large or streamed one is
                // answered at once, without the claim.
                let small = from_peer
                    || headers
                        .get(header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<usize>().ok())
                        .is_some_and(|n| n <= CONFIRM_STORED_BYTES);
                let was_stored = storing && small && sub.stored().await;
                let cs = CacheStatus {
                    fwd: Some(fwd),
                    fwd_status: Some(status),
                    ttl: storing.then(|| st.ttl(now)),
                    stored: was_stored,
                    collapsed,
                    detail: from_peer.then_some("peer"),
                    ..Default::default()
                };
                headers.insert("cache-status", hv(&cs.render(&self.name)));
                self.decorate(&req, &mut headers);
                let not_modified =
                    status == 200 && http_cache::client_not_modified(&req.headers, &headers);
                let (status, body) = if not_modified {
                    headers.remove(header::CONTENT_LENGTH);
                    (StatusCode::NOT_MODIFIED, empty())
                } else if req.method == Method::HEAD {
                    (
                        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                        empty(),
                    )
                } else {
                    let stream = sub
                        .into_stream()
                        .map(|r| r.map(Frame::data).map_err(|e| Box::new(e) as BoxError));
                    (
                        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                        StreamBody::new(stream).boxed_unsync(),
                    )
                };
                let mut r = Response::new(body);
                *r.status_mut() = status;
                *r.headers_mut() = headers;
                r
            }
        }
    }

    /// The flight leader's work: peers, then the backhaul; store; replicate.
    /// The table entry goes once the outcome is known (stored or not), so
    /// later requests find the object in the store.
    async fn fetch(
        self: Arc<Self>,
        req: CacheRequest,
        kh: KeyHash,
        stored: Option<Object>,
        flight: Arc<Flight>,
        backhaul: bool,
    ) {
        self.fetch_inner(&req, kh, stored, &flight, backhaul).await;
        self.flights.remove(&kh, &flight);
    }

    async fn try_peers(&self, req: &CacheRequest, kh: KeyHash, flight: &Arc<Flight>) -> bool {
        for peer in self.peers.candidates(&kh).into_iter().take(MAX_PEER_TRIES) {
            let got = tokio::time::timeout(PEER_TIMEOUT, self.peers.fetch(&peer, &kh)).await;
            let Ok(Ok(Some(obj))) = got else {
                tracing::debug!(%peer, "peer did not provide the object");
                continue;
            };
            if let Some(src) = self.tile_source(req) {
                let ct = obj
                    .meta
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if obj.meta.status != 200 || !src.format.accepts_content_type(ct) {
                    continue;
                }
            }
            Self::inc(&self.counters.peer_hits);
            flight.set_head(Head::Response {
                status: obj.meta.status,
                headers: obj.meta.headers.clone(),
                storing: true,
                from_peer: true,
                request_time: obj.meta.request_time,
                response_time: obj.meta.response_time,
            });
            let fits = matches!(
                flight.push(obj.body.clone(), &self.flights, &kh).await,
                Ok(true)
            );
            flight.finish(true);
            let mut meta = obj.meta;
            meta.pinned = false;
            let ok = fits
                && match self.store.put(kh, meta, obj.body).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "storing a peer's object failed");
                        false
                    }
                };
            if !ok {
                Self::inc(&self.counters.not_stored);
            }
            flight.set_stored(ok);
            return true;
        }
        false
    }

    /// Whether `req` may go through another rack's uplink now: a client's
    /// request, not itself forwarded, with a gateway known, and the
    /// operator has not forced this rack offline.
    fn may_use_gateway(&self, req: &CacheRequest) -> bool {
        req.client.is_some()
            && !req.forwarded
            && !self.health.forced_offline()
            && !self.gateways.gateways().is_empty()
    }

    /// Sends a miss through the best gateways in turn; the first answer is
    /// streamed to the waiters and stored like any upstream answer.
    async fn try_gateways(&self, req: &CacheRequest, kh: KeyHash, flight: &Arc<Flight>) -> bool {
        let Some(client) = req.client.filter(|_| self.may_use_gateway(req)) else {
            return false;
        };
        let target = match req.tile {
            Some(i) => match (self.sources.get(i), req.key.strip_prefix("tile:")) {
                (Some(src), Some(path)) => format!("/tiles/{path}.{}", src.format.extension()),
                _ => return false,
            },
            None => req.target.url(),
        };
        for gw in self.gateways.gateways().into_iter().take(MAX_GATEWAY_TRIES) {
            let fr = ForwardRequest {
                method: Method::GET,
                target: target.clone(),
                headers: req.headers.clone(),
                client,
                class: req.class,
            };
            let request_time = (self.clock)();
            let got = tokio::time::timeout(GATEWAY_TIMEOUT, self.gateways.forward(&gw, fr)).await;
            let resp = match got {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::debug!(gateway = %gw, error = %e, "gateway failed");
                    continue;
                }
                Err(_) => {
                    tracing::debug!(gateway = %gw, "gateway timed out");
                    continue;
                }
            };
            let response_time = (self.clock)();
            Self::inc(&self.counters.forwarded_sent);
            let mut headers = resp.headers;
            http_cache::strip_hop_by_hop(&mut headers);
            headers.remove("cache-status");
            let mut storing =
                http_cache::storable(&Method::GET, &req.headers, resp.status, &headers).is_ok();
            if let Some(src) = self.tile_source(req) {
                let ct = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                storing &= resp.status == 200 && src.format.accepts_content_type(ct);
            }
            flight.set_head(Head::Response {
                status: resp.status,
                headers: headers.clone(),
                storing,
                from_peer: true,
                request_time,
                response_time,
            });
            let fits = matches!(
                flight.push(resp.body.clone(), &self.flights, &kh).await,
                Ok(true)
            );
            flight.finish(true);
            let ok = storing
                && fits
                && self
                    .store_response(
                        req,
                        kh,
                        resp.status,
                        headers,
                        request_time,
                        response_time,
                        resp.body,
                    )
                    .await;
            flight.set_stored(ok);
            return true;
        }
        false
    }

    fn upstream_request(&self, req: &CacheRequest, stored: Option<&Object>) -> Request<UpBody> {
        let mut r = Request::new(Empty::new().map_err(|e| match e {}).boxed());
        *r.method_mut() = Method::GET;
        *r.uri_mut() = req
            .target
            .path_and_query
            .parse()
            .unwrap_or_else(|_| hyper::Uri::from_static("/"));
        let mut h = req.upstream_headers.clone();
        for c in &CLIENT_CONDITIONALS {
            h.remove(c);
        }
        h.insert(header::HOST, hv(&req.target.host_header()));
        if let Some(obj) = stored {
            for (n, v) in to_stored(&obj.meta).conditional_headers() {
                h.insert(n, v);
            }
        }
        *r.headers_mut() = h;
        r
    }

    async fn fetch_inner(
        &self,
        req: &CacheRequest,
        kh: KeyHash,
        mut stored: Option<Object>,
        flight: &Arc<Flight>,
        backhaul: bool,
    ) {
        if stored.is_none() && self.try_peers(req, kh, flight).await {
            return;
        }
        if !backhaul {
            if stored.is_none() && self.try_gateways(req, kh, flight).await {
                return;
            }
            flight.set_head(Head::Failed(FailKind::Offline));
            return;
        }
        if self.budget.may_start(req.class).is_err() {
            flight.set_head(Head::Failed(FailKind::Quota));
            return;
        }
        if let Some(src) = self.tile_source(req) {
            if let Some(l) = self.limiters.get(&src.name) {
                l.acquire().await;
            }
        }
        // At most two rounds: a 304 for a validator we do not hold sends
        // us back for a full response.
        for _round in 0..2 {
            let request_time = (self.clock)();
            if stored
                .as_ref()
                .is_some_and(|o| to_stored(&o.meta).has_validator())
            {
                Self::inc(&self.counters.revalidations);
            }
            Self::inc(&self.counters.upstream_requests);
            let up = self.upstream_request(req, stored.as_ref());
            let (resp, conn) = match self.send_watched(&req.target, up).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(target = %req.target.authority(), error = %e, "upstream fetch failed");
                    let kind = match e {
                        FetchError::Offline => FailKind::Offline,
                        FetchError::Refused(r) => FailKind::Refused(r),
                        e if e.is_link_failure() => FailKind::Unreachable,
                        _ => FailKind::Upstream,
                    };
                    flight.set_head(Head::Failed(kind));
                    return;
                }
            };
            let response_time = (self.clock)();
            let (parts, mut body) = resp.into_parts();
            let mut headers = parts.headers;
            http_cache::strip_hop_by_hop(&mut headers);
            let status = parts.status.as_u16();
            if status == 304 {
                if let Some(obj) = stored.as_ref() {
                    let _ = body.collect().await;
                    self.client.release(conn);
                    match to_stored(&obj.meta).freshen(&headers, request_time, response_time) {
                        Some(fresh) => {
                            Self::inc(&self.counters.revalidated_304);
                            let meta = ObjectMeta {
                                status: fresh.status,
                                headers: fresh.headers,
                                request_time,
                                response_time,
                                pinned: obj.meta.pinned,
                            };
                            if let Err(e) = self.store.update_meta(kh, meta).await {
                                tracing::warn!(error = %e, "freshening failed");
                            }
                            flight.set_head(Head::Revalidated);
                            return;
                        }
                        None => {
                            stored = None;
                            continue;
                        }
                    }
                }
            }
            if !headers.contains_key(header::DATE) {
                headers.insert(header::DATE, hv(&http_cache::fmt_date(response_time)));
            }
            let mut storing =
                http_cache::storable(&Method::GET, &req.headers, status, &headers).is_ok();
            if let Some(src) = self.tile_source(req) {
                let ct = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if status == 200 && !src.format.accepts_content_type(ct) {
                    Self::inc(&self.counters.wrong_content);
                    tracing::warn!(source = %src.name, content_type = ct, "tile source returned a non-tile; not stored");
                    flight.set_head(Head::Failed(FailKind::WrongContent));
                    return;
                }
                storing &= status == 200;
            }
            let declared = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok());
            if declared.is_some_and(|n| n > MAX_OBJECT_BYTES) {
                storing = false;
            }
            // What it declared counts against the quota until it arrives;
            // one that does not fit is not fetched (dropping the body
            // closes the connection).
            let mut reservation = match self.budget.reserve(req.class, declared.unwrap_or(0) as u64)
            {
                Ok(r) => r,
                Err(e) => {
                    Self::inc(&self.counters.too_large_for_quota);
                    tracing::info!(target = %req.target.authority(), error = %e, "response not fetched");
                    flight.set_head(Head::Failed(FailKind::TooLarge {
                        declared: e.declared,
                        left: e.left,
                    }));
                    return;
                }
            };
            flight.set_head(Head::Response {
                status,
                headers: headers.clone(),
                storing,
                from_peer: false,
                request_time,
                response_time,
            });
            if !storing {
                flight.stop_keeping(&self.flights, &kh);
            }
            // The flight holds the only copy of the body while it arrives.
            loop {
                let frame = tokio::select! {
                    f = tokio::time::timeout(BODY_IDLE_TIMEOUT, body.frame()) => f,
                    _ = flight.readers_gone(), if !storing => {
                        // Nobody waits and it will not be stored: stop the
                        // transfer (dropping the body closes the connection).
                        Self::inc(&self.counters.abandoned_fetches);
                        tracing::debug!(target = %req.target.authority(), "fetch abandoned: no waiter left");
                        flight.finish(false);
                        return;
                    }
                };
                match frame {
                    Ok(Some(Ok(frame))) => {
                        let Ok(data) = frame.into_data() else {
                            continue;
                        };
                        self.budget.consume(req.class, data.len() as u64).await;
                        reservation.arrived(data.len() as u64);
                        self.counters
                            .upstream_bytes
                            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        match flight.push(data, &self.flights, &kh).await {
                            Ok(true) => {}
                            Ok(false) => {
                                if storing {
                                    Self::inc(&self.counters.not_stored);
                                }
                                storing = false;
                            }
                            Err(e) => {
                                Self::inc(&self.counters.abandoned_fetches);
                                tracing::debug!(target = %req.target.authority(), error = %e, "fetch abandoned");
                                flight.finish(false);
                                return;
                            }
                        }
                    }
                    Ok(None) => break,
                    Ok(Some(Err(_))) | Err(_) => {
                        tracing::debug!(target = %req.target.authority(), "upstream body cut short");
                        flight.finish(false);
                        return;
                    }
                }
            }
            flight.finish(true);
            self.client.release(conn);
            let ok = match flight.body().filter(|_| storing) {
                Some(body) => {
                    self.store_response(req, kh, status, headers, request_time, response_time, body)
                        .await
                }
                None => false,
            };
            flight.set_stored(ok);
            return;
        }
        flight.set_head(Head::Failed(FailKind::Upstream));
    }

    /// Sends upstream; an upstream with no response head after the miss
    /// deadline is marked hung (later requests for it fail at once) while
    /// this exchange goes on waiting, up to the response timeout.
    async fn send_watched(
        &self,
        target: &Target,
        up: Request<UpBody>,
    ) -> Result<(Response<hyper::body::Incoming>, crate::upstream::Conn), FetchError> {
        let send = self.client.send(target, up);
        tokio::pin!(send);
        tokio::select! {
            r = &mut send => r,
            _ = tokio::time::sleep(self.miss_deadline) => {
                self.health.record_hung(target);
                send.await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn store_response(
        &self,
        req: &CacheRequest,
        kh: KeyHash,
        status: u16,
        headers: HeaderMap,
        request_time: u64,
        response_time: u64,
        body: Bytes,
    ) -> bool {
        let mut key = kh;
        if req.tile.is_none() {
            let primary = key_hash(&req.key);
            let fields = http_cache::vary_fields(&headers).unwrap_or_default();
            if let Err(e) = self.store.set_vary(&primary, &fields) {
                tracing::warn!(error = %e, "recording Vary failed");
            }
            key = if fields.is_empty() {
                primary
            } else {
                key_hash(&format!(
                    "{}\n{}",
                    req.key,
                    http_cache::vary_key(&fields, &req.headers)
                ))
            };
        }
        let meta = ObjectMeta {
            status,
            headers,
            request_time,
            response_time,
            pinned: req.class == Class::Seeding,
        };
        let replicate = req.tile.is_some().then(|| PeerObject {
            meta: meta.clone(),
            body: body.clone(),
        });
        match self.store.put(key, meta, body).await {
            Ok(()) => {
                if let Some(obj) = replicate {
                    self.replicator.replicate(&key, &obj);
                }
                true
            }
            Err(e) => {
                Self::inc(&self.counters.not_stored);
                tracing::warn!(error = %e, "storing a response failed");
                false
            }
        }
    }

    /// Forwards a request the cache does not answer (other methods,
    /// `no-store` requests, authenticated requests), streaming both ways.
    /// Unsafe methods that succeed invalidate the URL's stored response.
    pub async fn pass_through(
        self: &Arc<Self>,
        method: Method,
        target: Target,
        mut headers: HeaderMap,
        body: hyper::body::Incoming,
        fwd: Fwd,
    ) -> Response<Body> {
        if !self.health.host_usable(&target.authority()) {
            Self::inc(&self.counters.misses);
            return self.offline_504(fwd);
        }
        if self.budget.may_start(Class::Interactive).is_err() {
            return self.error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "503 Service Unavailable: today's satellite backhaul quota is used up.",
                CacheStatus {
                    fwd: Some(fwd),
                    ..Default::default()
                },
            );
        }
        headers.insert(header::HOST, hv(&target.host_header()));
        headers.append(header::VIA, hv(&format!("1.1 {}", self.name)));
        let mut r = Request::new(body.boxed());
        *r.method_mut() = method.clone();
        *r.uri_mut() = target
            .path_and_query
            .parse()
            .unwrap_or_else(|_| hyper::Uri::from_static("/"));
        *r.headers_mut() = headers;
        Self::inc(&self.counters.upstream_requests);
        // A safe request is a miss like any other: 504 at the miss
        // deadline. Others (a form being processed) wait up to the response
        // timeout, the upstream marked hung meanwhile.
        let sent = if method == Method::GET || method == Method::HEAD {
            match tokio::time::timeout(self.miss_deadline, self.client.send(&target, r)).await {
                Ok(r) => r,
                Err(_) => {
                    self.health.record_hung(&target);
                    Err(FetchError::ResponseTimeout(target.authority()))
                }
            }
        } else {
            self.send_watched(&target, r).await
        };
        let (resp, _conn) = match sent {
            Ok(x) => x,
            Err(FetchError::Refused(r)) => {
                return crate::server::refused(self, r, &target.authority())
            }
            Err(e) => {
                let status = if e.is_link_failure() {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::BAD_GATEWAY
                };
                return self.error_response(
                    status,
                    &format!("{status}: {e}"),
                    CacheStatus {
                        fwd: Some(fwd),
                        ..Default::default()
                    },
                );
            }
        };
        if http_cache::invalidates(&method, resp.status()) {
            let store = self.store.clone();
            let k = key_hash(&target.url());
            tokio::spawn(async move { store.remove(k).await });
        }
        let (mut parts, body) = resp.into_parts();
        // The body of a GET that does not fit in what is left of the quota
        // is not fetched. Any other method has done its work upstream by
        // now: its answer is delivered whatever its size.
        let declared = if method == Method::GET {
            parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        } else {
            0
        };
        let reservation = match self.budget.reserve(Class::Interactive, declared) {
            Ok(r) => Arc::new(std::sync::Mutex::new(r)),
            Err(e) => {
                Self::inc(&self.counters.too_large_for_quota);
                tracing::info!(target = %target.authority(), error = %e, "response not fetched");
                return self.error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &too_large_message(e.declared, e.left),
                    CacheStatus {
                        fwd: Some(fwd),
                        ..Default::default()
                    },
                );
            }
        };
        http_cache::strip_hop_by_hop(&mut parts.headers);
        if !parts.headers.contains_key(header::AGE) {
            parts
                .headers
                .insert(header::AGE, HeaderValue::from_static("0"));
        }
        let cs = CacheStatus {
            fwd: Some(fwd),
            fwd_status: Some(parts.status.as_u16()),
            ..Default::default()
        };
        parts
            .headers
            .insert("cache-status", hv(&cs.render(&self.name)));
        parts
            .headers
            .append(header::VIA, hv(&format!("1.1 {}", self.name)));
        let this = self.clone();
        let metered = BodyStream::new(body).then(move |frame| {
            let (this, reservation) = (this.clone(), reservation.clone());
            async move {
                let frame = frame.map_err(|e| Box::new(e) as BoxError)?;
                if let Some(d) = frame.data_ref() {
                    this.budget
                        .consume(Class::Interactive, d.len() as u64)
                        .await;
                    reservation
                        .lock()
                        .expect("reservation lock")
                        .arrived(d.len() as u64);
                    this.counters
                        .upstream_bytes
                        .fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Ok::<_, BoxError>(frame)
            }
        });
        Response::from_parts(parts, StreamBody::new(metered).boxed_unsync())
    }
}
