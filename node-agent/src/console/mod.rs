//! The operator console's server side, under `/console/api/` on the
//! proxy's address (the pages themselves are the embedded `webui` files,
//! served by the proxy). The proxy hands these requests to [`Console`]
//! through [`cache_proxy::LocalSite`], so the proxy never depends on the
//! agent.
//!
//! Routes:
//! - `POST login` `{"secret": "..."}`: the API token or a console password
//!   ([`auth`]); sets the session cookie (`HttpOnly; SameSite=Strict`,
//!   [`session::SESSION_TTL`]) and answers `{"role", "csrf", "rack"}`.
//! - `GET session`: the same for a live session, else 401.
//! - `POST logout`.
//! - `GET stream`: server-sent events, one `data:` line of the field
//!   snapshot ([`snapshot`]) per tick, at most [`MAX_STREAMS`] at once.
//! - `POST apps/{name}/{start|stop|move}` (`{"to": rack}` for move):
//!   operators only; the same control-plane commands as the admin API.
//! - `GET drills`: the drill reports this rack keeps (every rack keeps
//!   every report), newest first, as summaries; `GET drills/{id}`: one
//!   report's timeline chart (the same page `fieldrack drill run --html`
//!   writes).
//!
//! Every `POST` must come from a page of this rack (`Origin` equal to
//! `http://` + `Host`) and, once logged in, carry the session's
//! `X-CSRF-Token`: a page on another site can neither read the token nor
//! send the header without a CORS preflight this server never grants.

pub mod auth;
pub mod session;
pub mod snapshot;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cache_proxy::engine::{full, Body};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{watch, Semaphore};

use crate::agent::Rack;
use auth::Credentials;
use session::{Role, Session, Sessions};

/// Live streams at once: each open console holds one. 64 covers every
/// operator and wall screen of a site; more get a 503 (the page retries).
pub const MAX_STREAMS: usize = 64;
/// Largest console request body (a login or a move is tens of bytes).
pub const MAX_BODY: usize = 4096;
/// A failed login waits this long before answering, so guessing the token
/// over the site network costs seconds per try.
pub const LOGIN_FAILURE_DELAY: Duration = Duration::from_millis(400);
/// The session cookie's name.
pub const COOKIE: &str = "fieldrack_session";

/// The console; cheap to clone (one shared state).
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

struct Inner {
    creds: Credentials,
    sessions: Mutex<Sessions>,
    /// Set once the agent's `Rack` exists (the proxy starts before it).
    rack: OnceLock<Arc<Rack>>,
    /// The latest snapshot, as one SSE frame, shared by every stream.
    snapshot: watch::Sender<Bytes>,
    /// Bounds the streams ([`MAX_STREAMS`]).
    streams: Arc<Semaphore>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    /// A console accepting `creds`; serves 503 until [`Console::attach`].
    pub fn new(creds: Credentials) -> Console {
        let (tx, _) = watch::channel(Bytes::new());
        Console {
            inner: Arc::new(Inner {
                creds,
                sessions: Mutex::new(Sessions::default()),
                rack: OnceLock::new(),
                snapshot: tx,
                streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            }),
        }
    }

    /// Connects the console to the running agent and returns the snapshot
    /// task (which computes only while a stream is open).
    pub fn attach(
        &self,
        rack: Arc<Rack>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let _ = self.inner.rack.set(rack.clone());
        snapshot::run(rack, self.inner.snapshot.clone(), cancel)
    }
}

impl cache_proxy::LocalSite for Console {
    fn handle(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
        let inner = self.inner.clone();
        Box::pin(async move { route(&inner, req, client).await })
    }
}

fn reply(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn refuse(status: StatusCode, why: &str) -> Response<Body> {
    reply(status, &serde_json::json!({ "error": why }))
}

/// The session cookie's value, if sent.
fn session_id(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// A `POST` from a page of this rack: `Origin` names the same host and
/// port the request was sent to.
pub fn same_origin(origin: Option<&str>, host: Option<&str>) -> bool {
    match (origin, host) {
        (Some(o), Some(h)) => o.strip_prefix("http://") == Some(h),
        _ => false,
    }
}

fn header_str(req: &Request<Incoming>, name: header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn route(inner: &Inner, req: Request<Incoming>, client: SocketAddr) -> Response<Body> {
    let Some(rack) = inner.rack.get().cloned() else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "the agent is starting");
    };
    let path = req.uri().path()["/console/api/".len()..].to_string();
    let now = Instant::now();
    let sid = session_id(&req);
    let session: Option<Session> = sid
        .as_deref()
        .and_then(|id| inner.sessions.lock().expect("not poisoned").get(id, now));
    if req.method() == Method::POST {
        let origin = header_str(&req, header::ORIGIN);
        let host = header_str(&req, header::HOST);
        if !same_origin(origin, host) {
            tracing::info!(client = %client, ?origin, "console: cross-origin POST refused");
            return refuse(
                StatusCode::FORBIDDEN,
                "cross-site request refused: Origin must be this rack",
            );
        }
        if path != "login" {
            let Some(s) = &session else {
                return refuse(StatusCode::UNAUTHORIZED, "log in first");
            };
            let token = header_str(&req, header::HeaderName::from_static("x-csrf-token"));
            if !token.is_some_and(|t| auth::ct_eq(t.as_bytes(), s.csrf.as_bytes())) {
                return refuse(StatusCode::FORBIDDEN, "missing or wrong X-CSRF-Token");
            }
        }
    }
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "login") => login(inner, &rack, req, client).await,
        (Method::GET, "session") => match session {
            Some(s) => reply(
                StatusCode::OK,
                &serde_json::json!({ "role": s.role, "csrf": s.csrf, "rack": rack.config.rack }),
            ),
            None => refuse(StatusCode::UNAUTHORIZED, "not logged in"),
        },
        (Method::POST, "logout") => {
            if let Some(id) = sid {
                inner.sessions.lock().expect("not poisoned").remove(&id);
            }
            let mut r = reply(StatusCode::OK, &serde_json::json!({ "ok": true }));
            r.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_str(&format!(
                    "{COOKIE}=; Path=/console/; HttpOnly; SameSite=Strict; Max-Age=0"
                ))
                .expect("ascii"),
            );
            r
        }
        (Method::GET, "stream") => match session {
            Some(_) => stream(inner),
            None => refuse(StatusCode::UNAUTHORIZED, "not logged in"),
        },
        (Method::GET, "drills") => match session {
            Some(_) => drills(&rack),
            None => refuse(StatusCode::UNAUTHORIZED, "not logged in"),
        },
        (Method::GET, p) if p.starts_with("drills/") => match session {
            Some(_) => drill_chart(&rack, &p["drills/".len()..]),
            None => refuse(StatusCode::UNAUTHORIZED, "not logged in"),
        },
        (Method::POST, p) if p.starts_with("apps/") => match session {
            Some(s) if s.role == Role::Operator => {
                app_action(&rack, req, &p["apps/".len()..]).await
            }
            _ => refuse(StatusCode::FORBIDDEN, "read-only login: operators only"),
        },
        _ => refuse(StatusCode::NOT_FOUND, "no such console endpoint"),
    }
}

async fn body_json(req: Request<Incoming>) -> Result<serde_json::Value, Response<Body>> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, &format!("body is not JSON: {e}")))
}

async fn login(
    inner: &Inner,
    rack: &Rack,
    req: Request<Incoming>,
    client: SocketAddr,
) -> Response<Body> {
    let body = match body_json(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let secret = body["secret"].as_str().unwrap_or("");
    let Some(role) = inner.creds.check(secret) else {
        tracing::info!(client = %client, event = "console_login_failed", "console login refused");
        tokio::time::sleep(LOGIN_FAILURE_DELAY).await;
        return refuse(StatusCode::UNAUTHORIZED, "wrong token or password");
    };
    let (id, s) = inner.sessions.lock().expect("not poisoned").create(
        role,
        Instant::now(),
        rand::random(),
        rand::random(),
    );
    tracing::info!(client = %client, role = ?role, event = "console_login", "console login");
    let mut r = reply(
        StatusCode::OK,
        &serde_json::json!({ "role": role, "csrf": s.csrf, "rack": rack.config.rack }),
    );
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!(
            "{COOKIE}={id}; Path=/console/; HttpOnly; SameSite=Strict; Max-Age={}",
            session::SESSION_TTL.as_secs()
        ))
        .expect("hex is a valid header"),
    );
    r
}

/// The SSE stream: the current snapshot at once, then each new one. The
/// frames are shared bytes, so 50 streams cost 50 writes of one buffer.
fn stream(inner: &Inner) -> Response<Body> {
    let Ok(permit) = inner.streams.clone().try_acquire_owned() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many open consoles on this rack",
        );
    };
    let mut rx = inner.snapshot.subscribe();
    rx.mark_changed();
    let s = futures::stream::unfold((rx, permit), |(mut rx, permit)| async move {
        loop {
            rx.changed().await.ok()?;
            let frame = rx.borrow_and_update().clone();
            if !frame.is_empty() {
                return Some((Ok(Frame::data(frame)), (rx, permit)));
            }
        }
    });
    let mut r = Response::new(http_body_util::StreamBody::new(s).boxed_unsync());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The drill reports kept here, as typed reports (a stored one this
/// version cannot read is skipped), newest first.
fn kept_reports(rack: &Rack) -> Result<Vec<crate::drill::report::Report>, String> {
    let stored = rack
        .drill
        .reports()
        .map_err(|e| format!("reading the drill reports: {e}"))?;
    let mut reports: Vec<crate::drill::report::Report> = stored
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    reports.reverse();
    Ok(reports)
}

/// `drills`: one summary per report, newest first.
fn drills(rack: &Rack) -> Response<Body> {
    let reports = match kept_reports(rack) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    let list: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            let targets: Vec<&crate::drill::report::Target> =
                r.steps.iter().flat_map(|s| s.targets.iter()).collect();
            serde_json::json!({
                "id": r.id,
                "scenario": r.scenario,
                "controller": r.controller,
                "started_ms": r.started_ms,
                "ended_ms": r.ended_ms,
                "outcome": r.outcome,
                "abort_reason": r.abort_reason,
                "targets_failed": targets.iter().filter(|t| t.verdict == "fail").count(),
                "targets": targets.len(),
            })
        })
        .collect();
    reply(StatusCode::OK, &serde_json::json!({ "drills": list }))
}

/// `drills/{id}`: the report's timeline chart, a self-contained page.
fn drill_chart(rack: &Rack, id: &str) -> Response<Body> {
    let reports = match kept_reports(rack) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    let Some(report) = reports.iter().find(|r| r.id == id) else {
        return refuse(StatusCode::NOT_FOUND, "no such drill report on this rack");
    };
    let mut r = Response::new(full(report.html()));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    // The page is static: inline styles and SVG, no script, nothing fetched.
    h.insert(
        header::HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; img-src data:"),
    );
    r
}

/// `apps/{name}/{start|stop|move}`: the admin API's commands, proposed to
/// the control plane; errors answered with the API's status mapping.
async fn app_action(rack: &Rack, req: Request<Incoming>, rest: &str) -> Response<Body> {
    let Some((name, action)) = rest.split_once('/') else {
        return refuse(StatusCode::NOT_FOUND, "apps/{name}/{start|stop|move}");
    };
    let name = name.to_string();
    let cmd = match action {
        "start" | "stop" => control::Command::SetRunning {
            name: name.clone(),
            running: action == "start",
        },
        "move" => {
            let body = match body_json(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let Some(to) = body["to"].as_str() else {
                return refuse(StatusCode::BAD_REQUEST, "invalid `to`: a rack name");
            };
            control::Command::Move {
                name: name.clone(),
                to: to.to_string(),
            }
        }
        other => {
            return refuse(
                StatusCode::NOT_FOUND,
                &format!("no appliance action {other:?} (start, stop, move)"),
            )
        }
    };
    tracing::info!(appliance = %name, action, event = "console_app_action", "operator action from the console");
    match rack
        .appliances
        .control()
        .propose(cmd, Duration::from_secs(10))
        .await
    {
        Ok(_) => reply(
            StatusCode::OK,
            &serde_json::json!({ "appliance": name, "action": action }),
        ),
        Err(e) => {
            let status = crate::api::classify(&e).status;
            refuse(status, &format!("{e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_rack_may_post() {
        let table = [
            (Some("http://10.0.0.5:3128"), Some("10.0.0.5:3128"), true),
            (Some("http://evil.example"), Some("10.0.0.5:3128"), false),
            (Some("https://10.0.0.5:3128"), Some("10.0.0.5:3128"), false),
            (Some("null"), Some("10.0.0.5:3128"), false),
            (None, Some("10.0.0.5:3128"), false),
            (Some("http://10.0.0.5:3128"), None, false),
        ];
        for (origin, host, want) in table {
            assert_eq!(same_origin(origin, host), want, "{origin:?} {host:?}");
        }
    }
}
