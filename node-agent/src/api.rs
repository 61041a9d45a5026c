//! The admin HTTP API (hyper), bearer-token protected.
//!
//! Routes:
//! - `GET /api/v1/status`: the [`Status`] document.
//! - `GET /api/v1/field`: the field view (`control::FieldView`): which
//!   racks are up, admitted, revoked, renewing, dying, with what capacity.
//! - `GET /api/v1/revocations`: revocations known to this rack.
//! - `POST /api/v1/revocations`: add a fleet-signed revocation; answered only
//!   once it is stored durably; then spread through the mesh.
//! - `GET /api/v1/events?limit=N`: the local event log.
//! - `GET /metrics`: Prometheus text.
//! - `GET|POST /api/v1/drill/faults`, `POST /api/v1/drill/abort`,
//!   `GET|POST /api/v1/drill/reports`, `GET /api/v1/drill/probe`: drills
//!   (`fieldrack drill`): the faults in force here, a fault order, healing
//!   them all, the reports kept, a steady-state probe.
//!
//! Every request needs `Authorization: Bearer <api-token>` (401 otherwise,
//! and the connection is closed); malformed requests get 400 with a reason;
//! bodies over [`MAX_BODY`] get 413. A failed operation is answered by
//! [`classify`], the one mapping from typed errors to status codes (507 disk
//! full, 503 no majority, 404 unknown, 409 conflict, 400 naming the field),
//! with the whole error chain in `error`.
//!
//! Connections are held in two bounded pools so that no flood of silent or
//! unauthenticated connections can lock an operator out: see [`slots`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent::Rack;

pub mod paths;
pub mod slots;

use slots::Ticket;

/// Largest request body accepted: a revocation is under 1 KiB.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest drill report accepted: a minute of probes of a few racks is a
/// few KiB; this bounds a stored report whatever the drill.
pub const MAX_REPORT_BODY: usize = 1024 * 1024;
/// A connection must send a whole request head this soon after it is
/// accepted, and after each response: the CLI sends its request at once,
/// so a connection still silent after this is not an honest client. hyper
/// restarts this timer whenever it waits for a request head, so it is also
/// the keep-alive idle timeout (scrapers simply reconnect).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// After `accept` fails (`EMFILE`: out of descriptors), wait this long
/// before trying again, instead of spinning on the error.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// How long open connections get to finish on shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Most events returned by one `/api/v1/events` call.
pub const MAX_EVENTS_PER_CALL: usize = 1000;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(body.into()).boxed())
        .expect("static response parts are valid")
}

/// Progress lines queued for a streaming response; a slow client makes
/// the operation skip progress lines, never stall.
const PROGRESS_QUEUE: usize = 16;

/// A long operation's response: NDJSON lines `{"progress": {"done", "total"}}`
/// then one `{"result": ...}` or `{"error": "..."}`.
fn ndjson_stream(mut rx: tokio::sync::mpsc::Receiver<serde_json::Value>) -> Response<Body> {
    use futures::StreamExt;
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(|v| {
        let mut line = serde_json::to_vec(&v).expect("json");
        line.push(b'\n');
        Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(line)))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/x-ndjson")
        .body(BodyExt::boxed(http_body_util::StreamBody::new(stream)))
        .expect("valid")
}

/// A progress callback handed to a long operation.
type ProgressFn = Box<dyn FnMut(u64, u64) + Send>;

/// Run a long operation in the background and stream its NDJSON: an
/// optional first line, progress lines, then `{"result": ...}` or
/// `{"error": "..."}`.
fn stream_operation<T, E, Fut>(
    first: Option<serde_json::Value>,
    op: impl FnOnce(ProgressFn) -> Fut + Send + 'static,
) -> Response<Body>
where
    T: serde::Serialize,
    E: std::fmt::Display,
    Fut: std::future::Future<Output = Result<T, E>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(PROGRESS_QUEUE);
    if let Some(line) = first {
        let _ = tx.try_send(line);
    }
    let progress: ProgressFn = Box::new(progress_sender(tx.clone()));
    tokio::spawn(async move {
        let line = match op(progress).await {
            Ok(v) => serde_json::json!({ "result": v }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        let _ = tx.send(line).await;
    });
    ndjson_stream(rx)
}

/// A progress callback that sends at most one line per 1 % or 250 ms.
fn progress_sender(
    tx: tokio::sync::mpsc::Sender<serde_json::Value>,
) -> impl FnMut(u64, u64) + Send + 'static {
    let mut last = std::time::Instant::now();
    let mut last_pct = u64::MAX;
    move |done, total| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        if pct != last_pct && (last.elapsed() >= Duration::from_millis(250) || done == total) {
            last = std::time::Instant::now();
            last_pct = pct;
            let _ =
                tx.try_send(serde_json::json!({ "progress": { "done": done, "total": total } }));
        }
    }
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    reply(
        status,
        "application/json",
        serde_json::to_vec(v).expect("serializable"),
    )
}

fn error(status: StatusCode, reason: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": reason.into() }))
}

/// How the API answers an error: its status and, for bad input, the field
/// of the request at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorClass {
    /// The HTTP status.
    pub status: StatusCode,
    /// The request field that was wrong (400 only).
    pub field: Option<&'static str>,
}

impl ErrorClass {
    const fn status(status: StatusCode) -> Self {
        Self {
            status,
            field: None,
        }
    }

    const fn bad(field: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            field: Some(field),
        }
    }
}

/// The one mapping from the typed errors the handlers meet to HTTP status:
/// a full disk anywhere in the chain 507, no control-plane majority (or a
/// stopped mesh, an unreachable rack) 503, an unknown volume or appliance
/// 404, a conflict with what exists or who owns it 409, bad input 400
/// naming the field; anything else 500.
#[must_use]
pub fn classify(e: &(dyn std::error::Error + 'static)) -> ErrorClass {
    use crate::volumes::VolumeError;
    use control::{ControlError, Refusal};
    use datastore::volume::{
        CreateError, ExportError, ImportError, NameError, PromoteError, SnapshotError,
        StoreError as VolumeStoreError,
    };
    const NOT_FOUND: ErrorClass = ErrorClass::status(StatusCode::NOT_FOUND);
    const CONFLICT: ErrorClass = ErrorClass::status(StatusCode::CONFLICT);
    const UNAVAILABLE: ErrorClass = ErrorClass::status(StatusCode::SERVICE_UNAVAILABLE);
    const INTERNAL: ErrorClass = ErrorClass::status(StatusCode::INTERNAL_SERVER_ERROR);

    if is_disk_full(e) {
        return ErrorClass::status(StatusCode::INSUFFICIENT_STORAGE);
    }
    // Wrappers: their `#[error(transparent)]` variants hide the inner error
    // from `source()`, so they are unwrapped here.
    if let Some(e) = e.downcast_ref::<VolumeError>() {
        return match e {
            VolumeError::Create(e) => classify(e),
            VolumeError::Snapshot(e) => classify(e),
            VolumeError::Import(e) => classify(e),
            VolumeError::Export(e) => classify(e),
            VolumeError::Promote(e) => classify(e),
            VolumeError::Store(e) => classify(e),
            VolumeError::Transport(_) => UNAVAILABLE,
            VolumeError::Witness => CONFLICT,
            _ => INTERNAL,
        };
    }
    if let Some(e) = e.downcast_ref::<CreateError>() {
        return match e {
            CreateError::AlreadyExists(_) => CONFLICT,
            CreateError::InvalidSize(_) => ErrorClass::bad("size"),
            CreateError::Store(e) => classify(e),
            _ => INTERNAL,
        };
    }
    if let Some(e) = e.downcast_ref::<SnapshotError>() {
        return match e {
            // A replica here: the volume is owned by another rack.
            SnapshotError::NoLiveImage(_) => CONFLICT,
            SnapshotError::Store(e) => classify(e),
            _ => INTERNAL,
        };
    }
    if let Some(e) = e.downcast_ref::<ImportError>() {
        return match e {
            ImportError::NotOwner(_) => CONFLICT,
            ImportError::Shrink { .. }
            | ImportError::InvalidSize(_)
            | ImportError::QemuImg { .. }
            | ImportError::Source(_) => ErrorClass::bad("from"),
            ImportError::Store(e) => classify(e),
            _ => INTERNAL,
        };
    }
    if let Some(e) = e.downcast_ref::<ExportError>() {
        return match e {
            ExportError::NoSnapshot(_)
            | ExportError::NoSuchGeneration { .. }
            | ExportError::NoSuchKept { .. } => NOT_FOUND,
            ExportError::Store(e) => classify(e),
            _ => INTERNAL,
        };
    }
    if let Some(e) = e.downcast_ref::<PromoteError>() {
        return match e {
            PromoteError::AlreadyOwner(_) => CONFLICT,
            PromoteError::NoSnapshot(_) => NOT_FOUND,
            PromoteError::Store(e) => classify(e),
            _ => INTERNAL,
        };
    }
    if let Some(e) = e.downcast_ref::<VolumeStoreError>() {
        return match e {
            VolumeStoreError::NotFound(_) => NOT_FOUND,
            VolumeStoreError::Name(_) => ErrorClass::bad("name"),
            _ => INTERNAL,
        };
    }
    if e.is::<NameError>() {
        return ErrorClass::bad("name");
    }
    if let Some(e) = e.downcast_ref::<ControlError>() {
        return match e {
            ControlError::NoLeader(_) | ControlError::Raft(_) => UNAVAILABLE,
            ControlError::Refused(r) => classify(r),
            ControlError::Store(e) => classify(e),
        };
    }
    if let Some(r) = e.downcast_ref::<Refusal>() {
        return match r {
            Refusal::UnknownAppliance { .. } | Refusal::UnknownRack { .. } => NOT_FOUND,
            Refusal::StaleEpoch { .. }
            | Refusal::NotAHandover { .. }
            | Refusal::StaleRelease { .. }
            | Refusal::VolumeShared { .. } => CONFLICT,
            Refusal::GivenTwice { .. } | Refusal::Dependencies(_) => ErrorClass::bad("manifest"),
            _ => INTERNAL,
        };
    }
    if let Some(e) = e.downcast_ref::<crate::agent::RevokeError>() {
        return match e {
            crate::agent::RevokeError::Invalid(_) => ErrorClass::status(StatusCode::BAD_REQUEST),
            crate::agent::RevokeError::Store(e) => classify(e),
            crate::agent::RevokeError::Mesh(_) => UNAVAILABLE,
        };
    }
    if e.is::<mesh::MeshError>() {
        return UNAVAILABLE;
    }
    if let Some(e) = e.downcast_ref::<crate::drill::DrillError>() {
        use crate::drill::faults::OrderError;
        return match e {
            crate::drill::DrillError::Refused(OrderError::OtherDrill(_)) => CONFLICT,
            crate::drill::DrillError::Refused(OrderError::Duration(_)) => {
                ErrorClass::bad("duration_ms")
            }
            crate::drill::DrillError::Refused(_) => ErrorClass::bad("fault"),
            crate::drill::DrillError::Store(e) => classify(e),
        };
    }
    e.source().map_or(INTERNAL, classify)
}

/// Whether the disk (or quota) ran full, wherever in the chain: every
/// storage error type knows it of itself.
fn is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    use datastore::volume::{
        CreateError, ExportError, ImportError, PromoteError, SnapshotError,
        StoreError as VolumeStoreError,
    };
    let full = if let Some(e) = e.downcast_ref::<std::io::Error>() {
        util::fs::is_disk_full(e)
    } else if let Some(sled::Error::Io(e)) = e.downcast_ref::<sled::Error>() {
        util::fs::is_disk_full(e)
    } else if let Some(e) = e.downcast_ref::<VolumeStoreError>() {
        e.is_disk_full()
    } else if let Some(e) = e.downcast_ref::<CreateError>() {
        e.is_disk_full()
    } else if let Some(e) = e.downcast_ref::<SnapshotError>() {
        e.is_disk_full()
    } else if let Some(e) = e.downcast_ref::<ImportError>() {
        e.is_disk_full()
    } else if let Some(e) = e.downcast_ref::<ExportError>() {
        e.is_disk_full()
    } else if let Some(e) = e.downcast_ref::<PromoteError>() {
        e.is_disk_full()
    } else if let Some(e) = e.downcast_ref::<datastore::ChunkStoreError>() {
        e.is_disk_full()
    } else if let Some(e) = e.downcast_ref::<datastore::replicate::push::PushError>() {
        e.is_disk_full()
    } else if let Some(e) = e.downcast_ref::<crate::store::StoreError>() {
        e.is_disk_full()
    } else {
        false
    };
    full || e.source().is_some_and(is_disk_full)
}

/// The whole chain of `e`, outermost first, as `anyhow`'s `{:#}` prints it.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// The answer to a failed operation: [`classify`]'s status, the whole
/// error chain as `error`, and for bad input the field as `field` (and at
/// the head of the message).
fn error_reply(e: &(dyn std::error::Error + 'static)) -> Response<Body> {
    let class = classify(e);
    let text = chain(e);
    match class.field {
        Some(field) => json(
            class.status,
            &serde_json::json!({ "error": format!("invalid `{field}`: {text}"), "field": field }),
        ),
        None => error(class.status, text),
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte.
fn token_matches(given: &[u8], want: &[u8]) -> bool {
    if given.len() != want.len() {
        return false;
    }
    given
        .iter()
        .zip(want)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

fn closing(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    resp
}

/// Serve the API on `listener` until `cancel`, within the rack's
/// [`slots::Slots`] (see [`slots`] for how connections are admitted and shed).
pub async fn serve(
    listener: TcpListener,
    rack: Arc<Rack>,
    token: String,
    cancel: CancellationToken,
) {
    let token = Arc::new(token);
    let slots = rack.api_slots.clone();
    let mut conns = JoinSet::new();
    loop {
        // Accepting never waits for a slot: a new connection takes the
        // place of the oldest silent one instead of queueing behind it.
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    slots
                        .stats
                        .accept_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(error = %e, "api accept failed; pausing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let ticket = Arc::new(slots.admit(peer.ip()));
        let rack = rack.clone();
        let token = token.clone();
        let cancel = cancel.clone();
        while conns.try_join_next().is_some() {}
        conns.spawn(serve_connection(stream, ticket, rack, token, cancel));
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}

/// One connection: hyper with a header-read (and so keep-alive idle)
/// timeout, closed when shed, or after a 401/503.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    ticket: Arc<Ticket>,
    rack: Arc<Rack>,
    token: Arc<String>,
    cancel: CancellationToken,
) {
    let svc = {
        let ticket = ticket.clone();
        service_fn(move |req: Request<Incoming>| {
            let rack = rack.clone();
            let token = token.clone();
            let ticket = ticket.clone();
            async move {
                let resp = if !authorized(&req, &token) {
                    rack.metrics
                        .api_requests
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    closing(unauthorized())
                } else if ticket.authenticate().is_err() {
                    rack.metrics
                        .api_requests
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    closing(error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many admin API connections; try again",
                    ))
                } else {
                    handle(req, &rack, &token).await
                };
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                if e.is_timeout() {
                    ticket
                        .stats()
                        .timed_out
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                tracing::debug!(error = %e, "api connection error");
            }
        }
        _ = ticket.shed.cancelled() => {
            tracing::debug!("api connection shed for a newer one");
        }
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await;
        }
    }
}

fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| token_matches(t.trim().as_bytes(), token.as_bytes()))
}

fn unauthorized() -> Response<Body> {
    Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header("www-authenticate", "Bearer")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(br#"{"error":"missing or wrong bearer token (see the api-token file beside rack.toml)"}"#)).boxed())
        .expect("valid")
}

async fn handle(req: Request<Incoming>, rack: &Rack, token: &str) -> Response<Body> {
    rack.metrics
        .api_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if !authorized(&req, token) {
        return unauthorized();
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, paths::STATUS) => match rack.status().await {
            Ok(s) => json(StatusCode::OK, &s),
            Err(e) => error_reply(&e),
        },
        (Method::GET, paths::FIELD) => json(
            StatusCode::OK,
            &rack.appliances.control().field_view().await,
        ),
        (Method::GET, paths::METRICS) => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            rack.metrics_text().await,
        ),
        (Method::GET, paths::REVOCATIONS) => match rack.state.revocations() {
            Ok(list) => json(StatusCode::OK, &list),
            Err(e) => error_reply(&e),
        },
        (Method::POST, paths::REVOCATIONS) => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let rev: deploy::Revocation = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("body is not a revocation: {e}"),
                    )
                }
            };
            match rack.revoke(rev).await {
                Ok(new) => json(StatusCode::OK, &serde_json::json!({ "new": new })),
                Err(e) => error_reply(&e),
            }
        }
        (Method::GET, paths::EVENTS) => {
            let limit = match parse_limit(&query) {
                Ok(l) => l,
                Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
            };
            match rack.state.recent_events(limit) {
                Ok(ev) => json(StatusCode::OK, &ev),
                Err(e) => error_reply(&e),
            }
        }
        (Method::GET, paths::VOLUMES) => json(StatusCode::OK, &rack.volumes.status().await),
        (Method::POST, paths::VOLUMES) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Create {
                name: String,
                size: String,
            }
            let c: Create = match json_body(req, r#"{"name", "size"}"#).await {
                Ok(c) => c,
                Err(resp) => return resp,
            };
            let size = match deploy::appliance::parse_size(&c.size) {
                Ok(s) => s,
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("size: {e}")),
            };
            match rack.volumes.create(c.name.clone(), size).await {
                Ok(()) => json(
                    StatusCode::CREATED,
                    &serde_json::json!({ "name": c.name, "size_bytes": size }),
                ),
                Err(e) => error_reply(&e),
            }
        }
        (Method::GET, paths::VOLUMES_KEPT) => match rack.volumes.kept().await {
            Ok(k) => json(StatusCode::OK, &k),
            Err(e) => error_reply(&e),
        },
        (Method::POST, paths::VOLUMES_SCRUB) => {
            let (corrupt, repaired) = rack.volumes.scrub_now().await;
            json(
                StatusCode::OK,
                &serde_json::json!({ "corrupt": corrupt, "repaired": repaired }),
            )
        }
        (Method::POST, p) if p.starts_with(paths::VOLUME_PREFIX) => {
            volume_action(req, rack, p).await
        }
        (Method::GET, paths::APPS) => json(StatusCode::OK, &rack.appliances.status()),
        (Method::POST, paths::APPS) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Deploy {
                manifest: String,
            }
            let d: Deploy = match json_body(req, r#"{"manifest": "<manifest TOML>"}"#).await {
                Ok(d) => d,
                Err(resp) => return resp,
            };
            let specs = match deploy::appliance::parse_manifest(&d.manifest) {
                Ok(s) => s,
                Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
            };
            let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
            propose(
                rack,
                control::Command::Deploy { specs },
                serde_json::json!({ "deployed": names }),
            )
            .await
        }
        (Method::POST, p) if p.starts_with(paths::APP_PREFIX) => app_action(req, rack, p).await,
        (Method::POST, paths::CACHE_OFFLINE) => {
            let Some(proxy) = &rack.proxy else {
                return error(StatusCode::NOT_FOUND, "this rack runs no proxy");
            };
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Offline {
                offline: bool,
            }
            match json_body::<Offline>(req, r#"{"offline": true|false}"#).await {
                Ok(o) => {
                    proxy.handle.set_forced_offline(o.offline);
                    tracing::warn!(offline = o.offline, "operator switched forced offline mode");
                    json(StatusCode::OK, &serde_json::json!({ "offline": o.offline }))
                }
                Err(resp) => resp,
            }
        }
        (Method::GET, paths::DRILL_FAULTS) => json(
            StatusCode::OK,
            &serde_json::json!({ "rack": rack.config.rack, "faults": rack.drill.active() }),
        ),
        (Method::POST, paths::DRILL_FAULTS) => {
            let order: crate::drill::FaultOrder =
                match json_body(req, r#"{"drill", "fault": {"kind", ...}, "duration_ms"}"#).await {
                    Ok(o) => o,
                    Err(resp) => return resp,
                };
            match rack.drill.order(order).await {
                Ok(a) => json(StatusCode::OK, &a),
                Err(e) => error_reply(&e),
            }
        }
        (Method::POST, paths::DRILL_ABORT) => match rack.drill.abort().await {
            Ok(healed) => json(StatusCode::OK, &serde_json::json!({ "healed": healed })),
            Err(e) => error_reply(&e),
        },
        (Method::GET, paths::DRILL_REPORTS) => match rack.drill.reports() {
            Ok(r) => json(StatusCode::OK, &r),
            Err(e) => error_reply(&e),
        },
        (Method::POST, paths::DRILL_REPORTS) => {
            let body = match Limited::new(req.into_body(), MAX_REPORT_BODY)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("a report is at most {MAX_REPORT_BODY} bytes"),
                    )
                }
            };
            let report: crate::drill::report::Report = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("body is not a drill report: {e}"),
                    )
                }
            };
            match rack.drill.store_report(&report.id, &body) {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({ "stored": report.id })),
                Err(e) => error_reply(&e),
            }
        }
        (Method::GET, paths::DRILL_PROBE) => json(
            StatusCode::OK,
            &crate::drill::probe::probe(&rack.config, rack.proxy.is_some()).await,
        ),
        (Method::POST, paths::OVERRIDE_QUORUM) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Override {
                who: String,
                why: String,
            }
            let o: Override =
                match json_body(req, r#"{"who": "<operator>", "why": "<reason>"}"#).await {
                    Ok(o) => o,
                    Err(resp) => return resp,
                };
            let leader = crate::quorum_override::majority(rack);
            match rack.quorum_override.start(
                &o.who,
                &o.why,
                leader.as_deref(),
                util::time::unix_ms(),
            ) {
                Ok(a) => {
                    tracing::warn!(who = %a.who, why = %a.why, "quorum override: running this rack's appliances without a majority");
                    if let Err(e) = rack.state.record_event(
                        "quorum_override",
                        serde_json::json!({ "who": a.who, "why": a.why }),
                    ) {
                        return error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("cannot record the override: {e}"),
                        );
                    }
                    json(StatusCode::OK, &a)
                }
                Err(e @ crate::quorum_override::OverrideError::Majority(_)) => {
                    error(StatusCode::CONFLICT, e.to_string())
                }
                Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
            }
        }
        (Method::POST, paths::TILES_SEED) => tiles_seed(req, rack).await,
        (Method::POST, paths::TILES_IMPORT | paths::TILES_EXPORT) => {
            tiles_mbtiles(req, rack, &path).await
        }
        (
            _,
            paths::STATUS
            | paths::FIELD
            | paths::METRICS
            | paths::REVOCATIONS
            | paths::EVENTS
            | paths::APPS
            | paths::VOLUMES,
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not allowed on {path}", req.method()),
        ),
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

/// Like [`stream_operation`], for an import or export whose client may go
/// away: the job gets a token that fires when the client disconnects (its
/// response body, the NDJSON stream, is dropped) or when this task is
/// dropped (the runtime shutting down). The job then stops on its own
/// terms (a tile import removes what it stored, a volume import leaves the
/// volume unchanged) and its result goes nowhere.
fn stream_cancellable<T, E, Fut>(
    op: impl FnOnce(ProgressFn, CancellationToken) -> Fut + Send + 'static,
) -> Response<Body>
where
    T: serde::Serialize,
    E: std::fmt::Display,
    Fut: std::future::Future<Output = Result<T, E>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(PROGRESS_QUEUE);
    let progress: ProgressFn = Box::new(progress_sender(tx.clone()));
    tokio::spawn(async move {
        let cancel = CancellationToken::new();
        let _cancel_on_drop = cancel.clone().drop_guard();
        // Watches for the client leaving (the receiver, in the response
        // body, dropped); gone with this task.
        let watcher = {
            let (tx, cancel) = (tx.clone(), cancel.clone());
            tokio::spawn(async move {
                tx.closed().await;
                tracing::info!(
                    event = "job_client_gone",
                    "the client left; cancelling its job"
                );
                cancel.cancel();
            })
        };
        let _watcher = tokio_util::task::AbortOnDropHandle::new(watcher);
        let line = match op(progress, cancel).await {
            Ok(v) => serde_json::json!({ "result": v }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        let _ = tx.send(line).await;
    });
    ndjson_stream(rx)
}

/// `POST /api/v1/volumes/{name}/{snapshot|import|export}`.
async fn volume_action(req: Request<Incoming>, rack: &Rack, path: &str) -> Response<Body> {
    let rest = &path[paths::VOLUME_PREFIX.len()..];
    let Some((name, action)) = rest.split_once('/') else {
        return error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}"));
    };
    let name = name.to_string();
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Args {
        from: Option<std::path::PathBuf>,
        to: Option<std::path::PathBuf>,
        generation: Option<u64>,
        /// A kept copy (export, drop-kept).
        kept_ms: Option<u64>,
    }
    let args: Args = if body.is_empty() {
        Args::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(a) => a,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad arguments: {e}")),
        }
    };
    match action {
        "snapshot" => match rack.volumes.snapshot(name).await {
            Ok(m) => json(
                StatusCode::OK,
                &serde_json::json!({ "volume": m.volume, "generation": m.generation }),
            ),
            Err(e) => error_reply(&e),
        },
        "import" | "export" => {
            let volumes = rack.volumes.clone();
            match (action, args.from, args.to) {
                ("import", Some(from), _) => {
                    stream_cancellable(move |progress, cancel| async move {
                        volumes.import(name, from, cancel, progress).await.map(
                            |m| serde_json::json!({ "volume": m.volume, "generation": m.generation }),
                        )
                    })
                }
                ("export", _, Some(to)) => stream_operation(None, move |progress| async move {
                    match args.kept_ms {
                        Some(kept_ms) => {
                            volumes
                                .export_kept(name, kept_ms, to.clone(), progress)
                                .await
                        }
                        None => {
                            volumes
                                .export(name, args.generation, to.clone(), progress)
                                .await
                        }
                    }
                    .map(|()| serde_json::json!({ "to": to }))
                }),
                ("import", None, _) => error(
                    StatusCode::BAD_REQUEST,
                    "import needs {\"from\": \"/path/to/image\"}",
                ),
                _ => error(
                    StatusCode::BAD_REQUEST,
                    "export needs {\"to\": \"/path/to/out.img\"}",
                ),
            }
        }
        "drop-kept" => {
            let Some(kept_ms) = args.kept_ms else {
                return error(StatusCode::BAD_REQUEST, "drop-kept needs {\"kept_ms\": N}");
            };
            match rack.volumes.drop_kept(name, kept_ms).await {
                Ok(k) => json(StatusCode::OK, &k),
                Err(e) => error_reply(&e),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no such volume action: {action}"),
        ),
    }
}

/// `POST /api/v1/tiles/seed {"source", "bbox": "W,S,E,N", "zoom": "0-16"}`:
/// NDJSON progress, then the final counts.
async fn tiles_seed(req: Request<Incoming>, rack: &Rack) -> Response<Body> {
    let Some(proxy) = &rack.proxy else {
        return error(StatusCode::NOT_FOUND, "this rack runs no proxy");
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Seed {
        source: String,
        bbox: String,
        zoom: String,
    }
    let s: Seed = match json_body(req, r#"{"source", "bbox", "zoom"}"#).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let bbox: cache_proxy::tiles::BBox = match s.bbox.parse() {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bbox: {e}")),
    };
    let (min_zoom, max_zoom) = match parse_zoom_range(&s.zoom) {
        Ok(z) => z,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("zoom: {e}")),
    };
    let plan = cache_proxy::seed::SeedPlan {
        source: s.source,
        bbox,
        min_zoom,
        max_zoom,
    };
    let handle = proxy.handle.clone();
    let estimate = serde_json::json!({ "estimate": { "tiles": plan.count() } });
    stream_operation(Some(estimate), move |mut progress| async move {
        handle.seed(&plan, move |p| progress(p.done, p.total)).await.map(|p| {
            serde_json::json!({ "total": p.total, "fetched": p.fetched, "skipped": p.skipped, "failed": p.failed })
        })
    })
}

/// `POST /api/v1/tiles/import {"source", "from": "/abs/region.mbtiles"}` and
/// `POST /api/v1/tiles/export {"source", "bbox", "zoom", "to": "/abs/out.mbtiles"}`:
/// NDJSON progress, then the report.
async fn tiles_mbtiles(req: Request<Incoming>, rack: &Rack, path: &str) -> Response<Body> {
    let Some(proxy) = &rack.proxy else {
        return error(StatusCode::NOT_FOUND, "this rack runs no proxy");
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Args {
        source: String,
        from: Option<std::path::PathBuf>,
        to: Option<std::path::PathBuf>,
        bbox: Option<String>,
        zoom: Option<String>,
    }
    let a: Args = match json_body(
        req,
        r#"{"source", "from"} or {"source", "bbox", "zoom", "to"}"#,
    )
    .await
    {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let handle = proxy.handle.clone();
    if path.ends_with("/import") {
        let Some(from) = a.from else {
            return error(
                StatusCode::BAD_REQUEST,
                "import needs {\"source\", \"from\"}",
            );
        };
        return stream_cancellable(move |mut progress, cancel| async move {
            cache_proxy::mbtiles::import_cancellable(&handle, &a.source, &from, &cancel, move |p| {
                progress(p.read, p.total)
            })
            .await
        });
    }
    let (Some(to), Some(bbox), Some(zoom)) = (a.to, a.bbox, a.zoom) else {
        return error(
            StatusCode::BAD_REQUEST,
            "export needs {\"source\", \"bbox\", \"zoom\", \"to\"}",
        );
    };
    let bbox: cache_proxy::tiles::BBox = match bbox.parse() {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bbox: {e}")),
    };
    let (min_zoom, max_zoom) = match parse_zoom_range(&zoom) {
        Ok(z) => z,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("zoom: {e}")),
    };
    let plan = cache_proxy::mbtiles::ExportPlan {
        source: a.source,
        bbox,
        min_zoom,
        max_zoom,
    };
    stream_cancellable(move |mut progress, cancel| async move {
        cache_proxy::mbtiles::export_cancellable(&handle, &plan, &to, &cancel, move |p| {
            progress(p.done, p.total)
        })
        .await
    })
}

/// `"0-16"` or `"12"`.
pub fn parse_zoom_range(s: &str) -> Result<(u8, u8), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u8 = a
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a zoom range like 0-16"))?;
    let b: u8 = b
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a zoom range like 0-16"))?;
    if a > b || b > 30 {
        return Err(format!("{s:?}: expected MIN-MAX with MIN <= MAX <= 30"));
    }
    Ok((a, b))
}

fn parse_limit(query: &str) -> Result<usize, String> {
    let mut limit = 100;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("limit", v)) => {
                limit = v
                    .parse::<usize>()
                    .map_err(|_| format!("limit must be a number, got {v:?}"))?;
            }
            _ => return Err(format!("unknown query parameter {pair:?}")),
        }
    }
    Ok(limit.min(MAX_EVENTS_PER_CALL))
}

/// Read and parse a JSON request body; a malformed one is a 400 that says
/// what was expected.
/// Commit a control-plane command; a refusal or no leader is answered by
/// [`classify`] (404 unknown, 409 conflict, 400 bad manifest, 503 no
/// majority).
async fn propose(rack: &Rack, cmd: control::Command, ok: serde_json::Value) -> Response<Body> {
    match rack
        .appliances
        .control()
        .propose(cmd, std::time::Duration::from_secs(10))
        .await
    {
        Ok(_) => json(StatusCode::OK, &ok),
        Err(e) => error_reply(&e),
    }
}

/// `POST /api/v1/apps/{name}/{stop|start|move}`.
async fn app_action(req: Request<Incoming>, rack: &Rack, path: &str) -> Response<Body> {
    let rest = &path[paths::APP_PREFIX.len()..];
    let Some((name, action)) = rest.split_once('/') else {
        return error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}"));
    };
    let name = name.to_owned();
    match action {
        "stop" | "start" => {
            let running = action == "start";
            propose(
                rack,
                control::Command::SetRunning {
                    name: name.clone(),
                    running,
                },
                serde_json::json!({ "appliance": name, "running": running }),
            )
            .await
        }
        "move" => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Move {
                to: String,
            }
            let m: Move = match json_body(req, r#"{"to": "<rack>"}"#).await {
                Ok(m) => m,
                Err(resp) => return resp,
            };
            propose(
                rack,
                control::Command::Move {
                    name: name.clone(),
                    to: m.to.clone(),
                },
                serde_json::json!({ "appliance": name, "to": m.to }),
            )
            .await
        }
        other => error(
            StatusCode::NOT_FOUND,
            format!("no appliance action {other:?} (stop, start, move)"),
        ),
    }
}

async fn json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    expected: &str,
) -> Result<T, Response<Body>> {
    let body = read_body(req).await?;
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("expected {expected}: {e}")))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {MAX_BODY} bytes"),
            ))
        }
        Err(e) => Err(error(StatusCode::BAD_REQUEST, format!("reading body: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abd", b"abc"));
        assert!(!token_matches(b"ab", b"abc"));
    }

    mod errors {
        use std::path::PathBuf;
        use std::time::Duration;

        use control::{ControlError, Refusal};
        use datastore::volume::{
            CreateError, ImportError, NameError, SnapshotError, StoreError as VolumeStoreError,
        };
        use hyper::StatusCode;

        use super::super::{classify, error_reply, ErrorClass};
        use crate::volumes::VolumeError;

        fn enospc() -> std::io::Error {
            std::io::Error::from_raw_os_error(28)
        }

        fn class(e: &(dyn std::error::Error + 'static)) -> (u16, Option<&'static str>) {
            let ErrorClass { status, field } = classify(e);
            (status.as_u16(), field)
        }

        #[test]
        fn each_kind_of_error_has_its_status() {
            let cases: Vec<(Box<dyn std::error::Error + 'static>, u16, Option<&str>)> = vec![
                // Disk full, wherever in the chain.
                (
                    Box::new(VolumeError::Snapshot(SnapshotError::Store(
                        VolumeStoreError::DiskFull {
                            path: PathBuf::from("/v"),
                        },
                    ))),
                    507,
                    None,
                ),
                (
                    Box::new(VolumeError::Create(CreateError::Store(
                        VolumeStoreError::Io {
                            op: "write",
                            path: PathBuf::from("/v"),
                            source: enospc(),
                        },
                    ))),
                    507,
                    None,
                ),
                (
                    Box::new(crate::store::StoreError::Backend(sled::Error::Io(enospc()))),
                    507,
                    None,
                ),
                (
                    Box::new(VolumeError::Push {
                        rack: "b".into(),
                        source: datastore::replicate::push::PushError::Volumes(
                            VolumeStoreError::DiskFull {
                                path: PathBuf::from("/v"),
                            },
                        ),
                    }),
                    507,
                    None,
                ),
                (
                    Box::new(ControlError::Store(control::store::OpenError::Sled(
                        sled::Error::Io(enospc()),
                    ))),
                    507,
                    None,
                ),
                // No majority.
                (
                    Box::new(ControlError::NoLeader(Duration::from_secs(10))),
                    503,
                    None,
                ),
                (Box::new(mesh::MeshError::Stopped), 503, None),
                (
                    Box::new(VolumeError::Transport(
                        datastore::service::TransportError::NotConnected { rack: "b".into() },
                    )),
                    503,
                    None,
                ),
                // Unknown.
                (
                    Box::new(VolumeError::Store(VolumeStoreError::NotFound("v".into()))),
                    404,
                    None,
                ),
                (
                    Box::new(ControlError::Refused(Refusal::UnknownAppliance {
                        name: "db".into(),
                    })),
                    404,
                    None,
                ),
                // Conflicts.
                (
                    Box::new(VolumeError::Create(CreateError::AlreadyExists("v".into()))),
                    409,
                    None,
                ),
                (
                    Box::new(VolumeError::Import(ImportError::NotOwner("v".into()))),
                    409,
                    None,
                ),
                (
                    Box::new(VolumeError::Import(ImportError::Source(
                        datastore::SourceError::Relative("img".into()),
                    ))),
                    400,
                    Some("from"),
                ),
                (
                    Box::new(ControlError::Refused(Refusal::StaleEpoch {
                        name: "db".into(),
                        expected: 1,
                        now: 2,
                    })),
                    409,
                    None,
                ),
                (Box::new(VolumeError::Witness), 409, None),
                // Bad input, naming the field.
                (
                    Box::new(VolumeError::Create(CreateError::InvalidSize(3))),
                    400,
                    Some("size"),
                ),
                (
                    Box::new(VolumeError::Store(VolumeStoreError::Name(NameError::Empty))),
                    400,
                    Some("name"),
                ),
                (
                    Box::new(ControlError::Refused(Refusal::GivenTwice {
                        name: "db".into(),
                    })),
                    400,
                    Some("manifest"),
                ),
                // Anything else.
                (
                    Box::new(VolumeError::Create(CreateError::Store(
                        VolumeStoreError::Io {
                            op: "write",
                            path: PathBuf::from("/v"),
                            source: std::io::Error::from_raw_os_error(5),
                        },
                    ))),
                    500,
                    None,
                ),
            ];
            for (e, status, field) in &cases {
                assert_eq!(class(e.as_ref()), (*status, *field), "{e}");
            }
        }

        #[tokio::test]
        async fn the_answer_carries_the_whole_chain_and_the_field() {
            use http_body_util::BodyExt;
            let e = VolumeError::Create(CreateError::Store(VolumeStoreError::Io {
                op: "fsync",
                path: PathBuf::from("/v/x"),
                source: std::io::Error::from_raw_os_error(5),
            }));
            let r = error_reply(&e);
            assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
            let body = r.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let text = v["error"].as_str().unwrap();
            assert!(text.starts_with("fsync /v/x"), "{text}");
            assert!(text.contains("Input/output error"), "{text}");

            let r = error_reply(&VolumeError::Create(CreateError::InvalidSize(3)));
            assert_eq!(r.status(), StatusCode::BAD_REQUEST);
            let body = r.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["field"], "size");
            assert!(v["error"].as_str().unwrap().starts_with("invalid `size`: "));
        }

        /// Unmounts a test's tmpfs.
        struct Mounted(PathBuf);

        impl Drop for Mounted {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.0)
                    .status();
            }
        }

        /// A real full disk: a volume store on a 8 MiB tmpfs, a live image
        /// of 6 MiB of random data; its snapshot runs out of space, and
        /// the API answers 507.
        #[tokio::test]
        async fn a_full_disk_answers_507() {
            use rand::RngCore;
            use std::io::Write;
            let dir = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
                .arg(dir.path())
                .status();
            if !status.as_ref().is_ok_and(|s| s.success()) {
                eprintln!("skipped: cannot mount a tmpfs here (needs root): {status:?}");
                return;
            }
            let _mounted = Mounted(dir.path().to_owned());
            let store = datastore::VolumeStore::open(dir.path().join("volumes")).unwrap();
            store.create("full", 6 << 20).unwrap();
            let mut data = vec![0u8; 6 << 20];
            rand::thread_rng().fill_bytes(&mut data);
            let image = store.image_path("full");
            let written = std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .and_then(|mut f| f.write_all(&data).and_then(|()| f.sync_all()));
            // The image may already fill the disk; either way a write failed.
            let e: VolumeError = match written {
                Err(e) => {
                    assert!(util::fs::is_disk_full(&e), "{e}");
                    eprintln!("the live image itself filled the disk");
                    return;
                }
                Ok(()) => store
                    .snapshot("full", &datastore::NoPause, &mut |_, _| {})
                    .expect_err("8 MiB cannot hold the image and its chunks")
                    .into(),
            };
            assert_eq!(class(&e), (507, None), "{e:?}");
            assert_eq!(error_reply(&e).status(), StatusCode::INSUFFICIENT_STORAGE);
        }
    }

    #[test]
    fn limits_parse() {
        assert_eq!(parse_limit(""), Ok(100));
        assert_eq!(parse_limit("limit=5"), Ok(5));
        assert_eq!(parse_limit("limit=999999"), Ok(MAX_EVENTS_PER_CALL));
        assert!(parse_limit("limit=x").is_err());
        assert!(parse_limit("foo=1").is_err());
    }
}
