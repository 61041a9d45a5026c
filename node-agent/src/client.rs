//! A tiny HTTP client for the CLI: every command that talks to an agent
//! finds it with `--config rack.toml` (API address + the `api-token` file).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use deploy::config::{config_dir, RackConfig, API_TOKEN_FILE};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// How long the CLI waits for an agent.
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
    pub fn from_config(path: &Path) -> Result<Self> {
        let config = RackConfig::load(path)?;
        let token_path = config_dir(path).join(API_TOKEN_FILE);
        let token = std::fs::read_to_string(&token_path)
            .with_context(|| format!("reading {}", token_path.display()))?;
        Ok(Self {
            addr: config.api.listen,
            token: token.trim().to_string(),
        })
    }

    /// A connection to the agent's API, driven in the background.
    async fn connect(&self) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .with_context(|| {
                format!(
                    "connecting to the agent API at {} (is the agent running?)",
                    self.addr
                )
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// A request with the bearer token.
    fn build(&self, method: Method, path: &str, body: Vec<u8>) -> Result<Request<Full<Bytes>>> {
        Ok(Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.addr)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?)
    }

    /// Send a request; returns status and body.
    ///
    /// # Errors
    /// If the agent cannot be reached in [`TIMEOUT`].
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes)> {
        tokio::time::timeout(TIMEOUT, self.request_inner(method, path, body))
            .await
            .with_context(|| {
                format!(
                    "the agent at {} did not answer within {TIMEOUT:?}",
                    self.addr
                )
            })?
    }

    async fn request_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes)> {
        let req = self.build(method, path, body.unwrap_or_default())?;
        let resp = self.connect().await?.send_request(req).await?;

        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    /// POST and read an NDJSON stream of progress lines (long operations:
    /// no overall timeout, only on connecting). Calls `on_progress(done,
    /// total)` per progress line and returns the final `result`.
    ///
    /// # Errors
    /// Transport errors, a non-2xx answer, or the operation's `error` line.
    pub async fn post_streaming(
        &self,
        path: &str,
        body: serde_json::Value,
        mut on_progress: impl FnMut(u64, u64),
    ) -> Result<serde_json::Value> {
        let req = self.build(Method::POST, path, serde_json::to_vec(&body)?)?;
        let resp = tokio::time::timeout(TIMEOUT, self.connect())
            .await
            .with_context(|| format!("connecting to the agent API at {}", self.addr))??
            .send_request(req)
            .await?;

        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        let mut result = None;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                buf.extend_from_slice(&data);
            }
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let v: serde_json::Value = serde_json::from_slice(&line)
                    .context("agent sent a malformed progress line")?;
                if let Some(p) = v.get("progress") {
                    on_progress(
                        p["done"].as_u64().unwrap_or(0),
                        p["total"].as_u64().unwrap_or(0),
                    );
                } else if let Some(e) = v.get("estimate") {
                    eprintln!("estimate: {}", e);
                } else if v.get("error").is_some() {
                    return Err(answer_error(status, &line));
                } else if let Some(r) = v.get("result") {
                    result = Some(r.clone());
                }
            }
        }
        if !(200..300).contains(&status) {
            return Err(answer_error(status, &buf));
        }
        result.context("the agent closed the stream without a result")
    }

    /// GET a JSON document, failing on non-2xx with the agent's reason.
    ///
    /// # Errors
    /// Transport errors or a non-2xx answer.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let (status, body) = self.request(Method::GET, path, None).await?;
        if !(200..300).contains(&status) {
            return Err(answer_error(status, &body));
        }
        serde_json::from_slice(&body)
            .with_context(|| format!("agent sent malformed JSON for {path}"))
    }
}

/// An error answer of the agent as the CLI prints it: the status (with
/// its reason phrase, e.g. `507 Insufficient Storage`) and the agent's
/// whole error chain from the body's `error`, or the raw body if it has
/// none.
#[must_use]
pub fn answer_error(status: u16, body: &[u8]) -> anyhow::Error {
    let reason = hyper::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let text = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    anyhow::anyhow!("agent answered {status} {reason}: {text}")
}
