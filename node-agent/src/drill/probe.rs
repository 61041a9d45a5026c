//! A rack's answer to a drill's steady-state probe: does its proxy serve a
//! tile right now? The agent fetches it through its own proxy (as a
//! client on the rack's network would), so the drill needs no address of
//! any proxy, only each rack's admin API.

use std::time::{Duration, Instant};

use bytes::Bytes;
use deploy::config::RackConfig;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

/// A probe's tile must come within this: the drill samples every 500 ms,
/// and a tile that takes longer is not "served" for an operator.
pub const TILE_TIMEOUT: Duration = Duration::from_secs(2);

/// One rack's probe answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeAnswer {
    /// The rack.
    pub rack: String,
    /// The tile fetched through its proxy; `None`: no proxy or no tile
    /// source here.
    pub tile: Option<TileProbe>,
}

/// A tile through the proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TileProbe {
    /// The path asked.
    pub path: String,
    /// Whether it came back 200 with a body.
    pub ok: bool,
    /// The HTTP status, if any came.
    pub status: Option<u16>,
    /// How long it took, ms.
    pub ms: u64,
}

/// The tile a probe asks for: the first tile source's lowest zoom's
/// top-left tile (seeded first, so cached on a rack that served maps).
#[must_use]
pub fn probe_path(config: &RackConfig) -> Option<String> {
    let src = config.tile_source.first()?;
    let ext = match src.format {
        deploy::config::proxy::TileFormat::Png => "png",
        deploy::config::proxy::TileFormat::Jpg => "jpg",
        deploy::config::proxy::TileFormat::Webp => "webp",
        deploy::config::proxy::TileFormat::Pbf => "pbf",
    };
    Some(format!("/tiles/{}/{}/0/0.{ext}", src.name, src.min_zoom))
}

/// Probe this rack.
pub async fn probe(config: &RackConfig, proxy_running: bool) -> ProbeAnswer {
    let tile = match (proxy_running, config.proxy.as_ref(), probe_path(config)) {
        (true, Some(p), Some(path)) => {
            let mut addr = p.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            let started = Instant::now();
            let status = tokio::time::timeout(TILE_TIMEOUT, fetch(addr, &path))
                .await
                .ok()
                .and_then(Result::ok);
            Some(TileProbe {
                path,
                ok: status == Some(200),
                status,
                ms: started.elapsed().as_millis() as u64,
            })
        }
        _ => None,
    };
    ProbeAnswer {
        rack: config.rack.clone(),
        tile,
    }
}

/// GET `path` from `addr`; the status, once the whole body arrived.
async fn fetch(addr: std::net::SocketAddr, path: &str) -> Result<u16, Box<dyn std::error::Error>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(if body.is_empty() { 0 } else { status })
}
