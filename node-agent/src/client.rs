//! The admin API's client: one typed method per endpoint, used by the CLI
//! (`fieldrack status`, `volume …`, `app …`), the demo and the tests.
//! Every command that talks to an agent finds it with `--config rack.toml`
//! (API address + the `api-token` file beside it).
//!
//! Paths come from [`crate::api::paths`], the list the router matches on.
//! Answers are the serde types the API serialises ([`Status`],
//! [`ApplianceStatus`], [`VolumeStatus`], [`Event`], [`Revocation`]) or,
//! for the small acknowledgements the API builds inline, the types of
//! `client/answers.rs`. Long jobs are read by `client/job.rs`, sans I/O;
//! errors are in `client/error.rs`.
//! A refusal keeps the HTTP status and the agent's whole error chain
//! ([`ClientError::Answer`]).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use deploy::config::{config_dir, RackConfig, API_TOKEN_FILE};
use deploy::Revocation;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::api::paths::{self, AppAction, VolumeAction};
use job::JobReader;

mod answers;
mod error;
mod job;

use crate::state::Event;
use crate::status::Status;
use crate::supervisor::ApplianceStatus;
use crate::volumes::VolumeStatus;
pub use answers::{
    Deployed, JobEvent, MoveAccepted, OfflineSet, RevocationAdded, RunningSet, ScrubReport,
    SeedReport, VolumeCreated, VolumeExported, VolumeGeneration,
};
pub use error::{ClientError, FromConfigError};
pub use job::MAX_LINE as MAX_JOB_LINE;

/// How long the CLI waits for an agent: to connect, and for a whole
/// ordinary answer (long operations stream and only the connect is timed).
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Where an agent is and how to authenticate.
#[derive(Debug, Clone)]
pub struct AgentClient {
    addr: String,
    token: String,
}

impl AgentClient {
    /// From a `rack.toml` path.
    ///
    /// # Errors
    /// If the config or token cannot be read.
    pub fn from_config(path: &Path) -> Result<Self, FromConfigError> {
        let config = RackConfig::load(path)?;
        let token_path = config_dir(path).join(API_TOKEN_FILE);
        let token =
            std::fs::read_to_string(&token_path).map_err(|source| FromConfigError::Token {
                path: token_path,
                source,
            })?;
        Ok(Self {
            addr: config.api.listen,
            token: token.trim().to_string(),
        })
    }

    /// `GET /api/v1/status`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.get_json(paths::STATUS).await
    }

    /// `GET /api/v1/events?limit=N`: the newest `limit`, oldest first.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn events(&self, limit: usize) -> Result<Vec<Event>, ClientError> {
        self.get_json(&paths::events(limit)).await
    }

    /// `GET /api/v1/revocations`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn revocations(&self) -> Result<Vec<Revocation>, ClientError> {
        self.get_json(paths::REVOCATIONS).await
    }

    /// `POST /api/v1/revocations`: answered once the agent stored it
    /// durably; it then spreads through the mesh.
    ///
    /// # Errors
    /// See [`ClientError`]; 400 if it is not signed by the fleet.
    pub async fn revoke(&self, revocation: &Revocation) -> Result<RevocationAdded, ClientError> {
        self.post_json(paths::REVOCATIONS, Some(revocation), StatusCode::OK)
            .await
    }

    /// `GET /metrics`: Prometheus text.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let (status, body) = self.request(Method::GET, paths::METRICS, None).await?;
        if !status_ok(status) {
            return Err(ClientError::answer(status_code(status), &body));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// `GET /api/v1/volumes`: volumes held on this rack.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn volumes(&self) -> Result<Vec<VolumeStatus>, ClientError> {
        self.get_json(paths::VOLUMES).await
    }

    /// `POST /api/v1/volumes`: an empty volume of `size` (`4G`, `64M`).
    ///
    /// # Errors
    /// See [`ClientError`]; 409 if it exists, 400 naming `size`.
    pub async fn volume_create(
        &self,
        name: &str,
        size: &str,
    ) -> Result<VolumeCreated, ClientError> {
        let body = serde_json::json!({ "name": name, "size": size });
        self.post_json(paths::VOLUMES, Some(&body), StatusCode::CREATED)
            .await
    }

    /// `POST /api/v1/volumes/{name}/snapshot`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn volume_snapshot(&self, name: &str) -> Result<VolumeGeneration, ClientError> {
        let path = paths::volume(name, VolumeAction::Snapshot);
        self.post_json(&path, None::<&()>, StatusCode::OK).await
    }

    /// `POST /api/v1/volumes/{name}/import` from an absolute path on the
    /// rack, reporting bytes read.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn volume_import(
        &self,
        name: &str,
        from: &Path,
        on_event: impl FnMut(JobEvent),
    ) -> Result<VolumeGeneration, ClientError> {
        let path = paths::volume(name, VolumeAction::Import);
        let body = serde_json::json!({ "from": from });
        self.post_job(&path, &body, on_event).await
    }

    /// `POST /api/v1/volumes/{name}/export` of `generation` (the newest
    /// if `None`) to an absolute path on the rack, reporting bytes written.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn volume_export(
        &self,
        name: &str,
        to: &Path,
        generation: Option<u64>,
        on_event: impl FnMut(JobEvent),
    ) -> Result<VolumeExported, ClientError> {
        let path = paths::volume(name, VolumeAction::Export);
        let body = serde_json::json!({ "to": to, "generation": generation });
        self.post_job(&path, &body, on_event).await
    }

    /// `POST /api/v1/volumes/{name}/export` of the kept copy kept at
    /// `kept_ms` to an absolute path on the rack, reporting bytes written.
    ///
    /// # Errors
    /// See [`ClientError`]; 404 if there is no such copy.
    pub async fn volume_export_kept(
        &self,
        name: &str,
        kept_ms: u64,
        to: &Path,
        on_event: impl FnMut(JobEvent),
    ) -> Result<VolumeExported, ClientError> {
        let path = paths::volume(name, VolumeAction::Export);
        let body = serde_json::json!({ "to": to, "kept_ms": kept_ms });
        self.post_job(&path, &body, on_event).await
    }

    /// `GET /api/v1/volumes/kept`: the kept copies of volumes this rack
    /// stopped owning while it held writes their new owner may lack.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn volumes_kept(&self) -> Result<Vec<datastore::KeptCopy>, ClientError> {
        self.get_json(paths::VOLUMES_KEPT).await
    }

    /// `POST /api/v1/volumes/{name}/drop-kept`: drop the kept copy kept
    /// at `kept_ms`.
    ///
    /// # Errors
    /// See [`ClientError`]; 404 if there is no such copy.
    pub async fn volume_drop_kept(
        &self,
        name: &str,
        kept_ms: u64,
    ) -> Result<datastore::KeptCopy, ClientError> {
        let path = paths::volume(name, VolumeAction::DropKept);
        let body = serde_json::json!({ "kept_ms": kept_ms });
        self.post_json(&path, Some(&body), StatusCode::OK).await
    }

    /// `POST /api/v1/volumes/scrub`: verify every chunk now.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn volume_scrub(&self) -> Result<ScrubReport, ClientError> {
        self.post_json(paths::VOLUMES_SCRUB, None::<&()>, StatusCode::OK)
            .await
    }

    /// `GET /api/v1/apps`: every appliance of the field.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn apps(&self) -> Result<Vec<ApplianceStatus>, ClientError> {
        self.get_json(paths::APPS).await
    }

    /// `POST /api/v1/apps`: deploy (or update) a manifest's appliances.
    ///
    /// # Errors
    /// See [`ClientError`]; 400 naming `manifest`, 503 without a majority.
    pub async fn app_deploy(&self, manifest: &str) -> Result<Deployed, ClientError> {
        let body = serde_json::json!({ "manifest": manifest });
        self.post_json(paths::APPS, Some(&body), StatusCode::OK)
            .await
    }

    /// `POST /api/v1/apps/{name}/stop`.
    ///
    /// # Errors
    /// See [`ClientError`]; 404 for an unknown appliance.
    pub async fn app_stop(&self, name: &str) -> Result<RunningSet, ClientError> {
        self.app_action(name, AppAction::Stop).await
    }

    /// `POST /api/v1/apps/{name}/start`.
    ///
    /// # Errors
    /// See [`ClientError`]; 404 for an unknown appliance.
    pub async fn app_start(&self, name: &str) -> Result<RunningSet, ClientError> {
        self.app_action(name, AppAction::Start).await
    }

    async fn app_action(&self, name: &str, action: AppAction) -> Result<RunningSet, ClientError> {
        let path = paths::app(name, action);
        self.post_json(&path, Some(&serde_json::json!({})), StatusCode::OK)
            .await
    }

    /// `POST /api/v1/apps/{name}/move`: a planned handover to rack `to`.
    ///
    /// # Errors
    /// See [`ClientError`]; 404 for an unknown appliance or rack.
    pub async fn app_move(&self, name: &str, to: &str) -> Result<MoveAccepted, ClientError> {
        let path = paths::app(name, AppAction::Move);
        let body = serde_json::json!({ "to": to });
        self.post_json(&path, Some(&body), StatusCode::OK).await
    }

    /// `POST /api/v1/cache/offline`: force the proxy offline (or not).
    ///
    /// # Errors
    /// See [`ClientError`]; 404 if the rack runs no proxy.
    pub async fn cache_offline(&self, offline: bool) -> Result<OfflineSet, ClientError> {
        let body = serde_json::json!({ "offline": offline });
        self.post_json(paths::CACHE_OFFLINE, Some(&body), StatusCode::OK)
            .await
    }

    /// `POST /api/v1/override/quorum`: run this rack's appliances without
    /// a majority until one returns (recorded with `who` and `why`).
    ///
    /// # Errors
    /// See [`ClientError`]; 409 when a majority exists.
    pub async fn override_quorum(
        &self,
        who: &str,
        why: &str,
    ) -> Result<crate::quorum_override::Active, ClientError> {
        let body = serde_json::json!({ "who": who, "why": why });
        self.post_json(paths::OVERRIDE_QUORUM, Some(&body), StatusCode::OK)
            .await
    }

    /// `POST /api/v1/tiles/seed`: fetch a region (`bbox` `W,S,E,N`,
    /// `zoom` `0-16`) of a source; reports the estimate, then tiles done.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn tiles_seed(
        &self,
        source: &str,
        bbox: &str,
        zoom: &str,
        on_event: impl FnMut(JobEvent),
    ) -> Result<SeedReport, ClientError> {
        let body = serde_json::json!({ "source": source, "bbox": bbox, "zoom": zoom });
        self.post_job(paths::TILES_SEED, &body, on_event).await
    }

    /// `POST /api/v1/tiles/import` of an MBTiles or PMTiles file (an
    /// absolute path on the rack); reports rows read. The result is the
    /// proxy's import report (`tiles`, `bytes`, `unchanged`, ...).
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn tiles_import(
        &self,
        source: &str,
        from: &Path,
        on_event: impl FnMut(JobEvent),
    ) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::json!({ "source": source, "from": from });
        self.post_job(paths::TILES_IMPORT, &body, on_event).await
    }

    /// `POST /api/v1/tiles/export` of a region to an MBTiles file (an
    /// absolute path on the rack); reports tiles looked up. The result is
    /// the proxy's export report (`tiles`, `bytes`, `unique`, ...).
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn tiles_export(
        &self,
        source: &str,
        bbox: &str,
        zoom: &str,
        to: &Path,
        on_event: impl FnMut(JobEvent),
    ) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::json!({ "source": source, "bbox": bbox, "zoom": zoom, "to": to });
        self.post_job(paths::TILES_EXPORT, &body, on_event).await
    }

    /// The API address this client talks to.
    #[must_use]
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `GET /api/v1/drill/faults`: the drill faults in force there.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn drill_faults(&self) -> Result<Vec<crate::drill::ActiveFault>, ClientError> {
        #[derive(serde::Deserialize)]
        struct Answer {
            faults: Vec<crate::drill::ActiveFault>,
        }
        let a: Answer = self.get_json(paths::DRILL_FAULTS).await?;
        Ok(a.faults)
    }

    /// `POST /api/v1/drill/faults`: order a fault (stored durably there
    /// with its deadline before the answer).
    ///
    /// # Errors
    /// See [`ClientError`]; 409 if another drill runs there.
    pub async fn drill_order(
        &self,
        order: &crate::drill::FaultOrder,
    ) -> Result<crate::drill::ActiveFault, ClientError> {
        self.post_json(paths::DRILL_FAULTS, Some(order), StatusCode::OK)
            .await
    }

    /// `POST /api/v1/drill/abort`: heal every drill fault there now.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn drill_abort(&self) -> Result<Vec<crate::drill::ActiveFault>, ClientError> {
        #[derive(serde::Deserialize)]
        struct Answer {
            healed: Vec<crate::drill::ActiveFault>,
        }
        let a: Answer = self
            .post_json(paths::DRILL_ABORT, None::<&()>, StatusCode::OK)
            .await?;
        Ok(a.healed)
    }

    /// `GET /api/v1/drill/reports`: the reports kept there, oldest first.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn drill_reports(&self) -> Result<Vec<crate::drill::report::Report>, ClientError> {
        self.get_json(paths::DRILL_REPORTS).await
    }

    /// `POST /api/v1/drill/reports`: keep a report there.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn drill_store_report(
        &self,
        report: &crate::drill::report::Report,
    ) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .post_json(paths::DRILL_REPORTS, Some(report), StatusCode::OK)
            .await?;
        Ok(())
    }

    /// `GET /api/v1/drill/probe`: a tile through that rack's proxy.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn drill_probe(&self) -> Result<crate::drill::probe::ProbeAnswer, ClientError> {
        self.get_json(paths::DRILL_PROBE).await
    }

    /// A connection to the agent's API, driven in the background.
    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| self.http_error(source))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn http_error(&self, source: hyper::Error) -> ClientError {
        ClientError::Http {
            addr: self.addr.clone(),
            source,
        }
    }

    fn timeout(&self) -> ClientError {
        ClientError::Timeout {
            addr: self.addr.clone(),
            timeout: TIMEOUT,
        }
    }

    /// A request with the bearer token.
    fn build(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.addr)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|source| ClientError::Request {
                path: path.to_owned(),
                source,
            })
    }

    /// Send any request; returns the status and body whatever the status
    /// (for tests of the API's own refusals; commands use the typed
    /// methods).
    ///
    /// # Errors
    /// If the agent cannot be reached, or does not answer in [`TIMEOUT`].
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), ClientError> {
        tokio::time::timeout(TIMEOUT, self.request_inner(method, path, body))
            .await
            .map_err(|_| self.timeout())?
    }

    async fn request_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), ClientError> {
        let req = self.build(method, path, body.unwrap_or_default())?;
        let resp = self
            .connect()
            .await?
            .send_request(req)
            .await
            .map_err(|e| self.http_error(e))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.http_error(e))?
            .to_bytes();
        Ok((status, bytes))
    }

    /// GET a JSON document, failing on non-2xx with the agent's reason.
    ///
    /// # Errors
    /// Transport errors, a non-2xx answer, or JSON not of type `T`.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, body) = self.request(Method::GET, path, None).await?;
        decode(path, status, StatusCode::OK, &body)
    }

    /// POST `body` (none: an empty body) and decode the answer, which must
    /// have status `expected`.
    async fn post_json<B: serde::Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
        expected: StatusCode,
    ) -> Result<T, ClientError> {
        let body = body
            .map(|b| serde_json::to_vec(b))
            .transpose()
            .map_err(|source| ClientError::Encode {
                path: path.to_owned(),
                source,
            })?;
        let (status, answer) = self.request(Method::POST, path, body).await?;
        decode(path, status, expected, &answer)
    }

    /// POST a long operation and read its NDJSON answer (no overall
    /// timeout, only on connecting). Calls `on_event` per estimate and
    /// progress line and returns the final `result`.
    async fn post_job<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
        mut on_event: impl FnMut(JobEvent),
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|source| ClientError::Encode {
            path: path.to_owned(),
            source,
        })?;
        let req = self.build(Method::POST, path, body)?;
        let resp = tokio::time::timeout(TIMEOUT, self.connect())
            .await
            .map_err(|_| self.timeout())??
            .send_request(req)
            .await
            .map_err(|e| self.http_error(e))?;

        let mut reader = JobReader::new(resp.status());
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.map_err(|e| self.http_error(e))?.into_data() {
                reader.feed(&data, &mut on_event)?;
            }
        }
        let result = reader.finish()?;
        serde_json::from_value(result).map_err(|source| ClientError::Malformed {
            path: path.to_owned(),
            source,
        })
    }
}

fn status_ok(status: u16) -> bool {
    (200..300).contains(&status)
}

/// hyper only hands out valid status codes; this turns ours back.
fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// An answer of status `expected` decoded as `T`; any other 2xx is taken
/// as the agent meaning success too, anything else is its refusal.
fn decode<T: DeserializeOwned>(
    path: &str,
    status: u16,
    expected: StatusCode,
    body: &[u8],
) -> Result<T, ClientError> {
    if status != expected.as_u16() && !status_ok(status) {
        return Err(ClientError::answer(status_code(status), body));
    }
    serde_json::from_slice(body).map_err(|source| ClientError::Malformed {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_takes_the_expected_status_and_refuses_others() {
        let ok: VolumeCreated = decode(
            "/p",
            201,
            StatusCode::CREATED,
            br#"{"name": "db", "size_bytes": 4096}"#,
        )
        .unwrap();
        assert_eq!(ok.size_bytes, 4096);
        let err = decode::<VolumeCreated>(
            "/p",
            409,
            StatusCode::CREATED,
            br#"{"error": "volume db exists"}"#,
        )
        .unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::CONFLICT));
        let err = decode::<VolumeCreated>("/p", 200, StatusCode::OK, b"[]").unwrap_err();
        assert!(matches!(err, ClientError::Malformed { .. }), "{err:?}");
    }
}
