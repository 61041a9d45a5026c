//! The rack's own web pages on the proxy address: the offline map viewer
//! at `/` (open to `allow_networks`, no login) and the hook through which
//! the agent serves the operator console under `/console/`.
//!
//! Routes:
//! - `GET /`, `/map/*`, `/console/`, `/console/*.{js,css}`: the embedded
//!   pages ([`webui`]), with a strong ETag, `Cache-Control`, gzip when
//!   accepted, 304 on `If-None-Match`.
//! - `GET /map/api/sources`: the TileJSON of every `[[tile_source]]`.
//! - `GET /map/api/state`: the rack's name and whether the backhaul is up
//!   (the page's "offline" badge).
//! - `GET /map/api/coverage?source=S&z=Z&bbox=W,S,E,N`: which tiles of
//!   the box at zoom `z` are held (`[x, y, pinned]`), at most
//!   [`MAX_COVERAGE_TILES`] looked up.
//! - `GET /map/api/estimate?source=S&bbox=..&minzoom=A&maxzoom=B`: tiles
//!   in the region, how many are held, and the size of a download.
//! - `GET /map/api/export.mbtiles?...` (same query): the held tiles of the
//!   region as an MBTiles file ([`crate::mbtiles::export`]), streamed.
//! - `/console/api/*`: handed to the [`LocalSite`] the agent installed
//!   (404 on a proxy without one).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

use crate::engine::{full, Body, BoxError, Engine};
use crate::mbtiles::{self, ExportPlan};
use crate::store::key_hash;
use crate::tiles::{self, BBox, TileId};
use crate::ProxyHandle;

/// Most tiles one coverage request looks up: a full-HD screen shows about
/// 8×5 tiles, so a box of 4096 covers zooming out several levels; beyond
/// that the overlay says "zoom in" instead of walking the index.
pub const MAX_COVERAGE_TILES: u64 = 4096;
/// Most tiles one "save this area" download may walk: about 1 GB of
/// raster tiles at 20 KB each, what a phone or laptop in the field should
/// take; larger regions go through `fieldrack tiles export`.
pub const MAX_SAVE_TILES: u64 = 50_000;
/// Downloads built at once: each holds a temporary file and walks the
/// index; more wait (the page shows the wait as a slow start).
pub const MAX_CONCURRENT_EXPORTS: usize = 2;
/// Bytes read from the export file per body frame.
const EXPORT_CHUNK: usize = 64 * 1024;

/// The agent's side of the console: every request under `/console/api/`
/// goes to it, with the client's address. Implemented by the agent
/// (node-agent), which owns the data and the credentials; the proxy only
/// routes, so it does not depend on the agent.
pub trait LocalSite: Send + Sync + 'static {
    /// Answers one request.
    fn handle(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
}

/// What the site routes need beyond the engine.
pub(crate) struct Site {
    /// The console's handler, if the agent installed one.
    pub local: Option<Arc<dyn LocalSite>>,
    /// Where exports are built (the cache directory).
    pub cache_dir: PathBuf,
    /// Bounds downloads built at once.
    pub exports: Semaphore,
}

impl Site {
    pub(crate) fn new(local: Option<Arc<dyn LocalSite>>, cache_dir: PathBuf) -> Site {
        Site {
            local,
            cache_dir,
            exports: Semaphore::new(MAX_CONCURRENT_EXPORTS),
        }
    }
}

/// Whether `path` is one of the site's (so the server hands it here).
pub(crate) fn is_site_path(path: &str) -> bool {
    path == "/" || path.starts_with("/map/") || path == "/console" || path.starts_with("/console/")
}

/// Serves a site path (`is_site_path`).
pub(crate) async fn serve(
    engine: &Arc<Engine>,
    site: &Site,
    base: &str,
    client: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path.starts_with("/console/api/") {
        return match &site.local {
            Some(l) => l.handle(req, client).await,
            None => plain(StatusCode::NOT_FOUND, "404: this rack serves no console"),
        };
    }
    if path == "/console" {
        let mut r = plain(StatusCode::MOVED_PERMANENTLY, "see /console/");
        r.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_static("/console/"));
        return r;
    }
    let get = req.method() == hyper::Method::GET || req.method() == hyper::Method::HEAD;
    if !get {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "405: GET or HEAD only");
    }
    let query = parse_query(req.uri().query().unwrap_or(""));
    match path.as_str() {
        "/map/api/sources" => {
            let list: Vec<_> = engine
                .sources
                .iter()
                .map(|s| tiles::tilejson(s, base))
                .collect();
            json(&serde_json::Value::Array(list))
        }
        "/map/api/state" => json(&serde_json::json!({
            "rack": engine.name,
            "backhaul_up": engine.health.backhaul_up() && !engine.health.forced_offline(),
            "forced_offline": engine.health.forced_offline(),
        })),
        "/map/api/coverage" => match coverage(engine, &query) {
            Ok(v) => json(&v),
            Err(e) => plain(StatusCode::BAD_REQUEST, &format!("400: {e}")),
        },
        "/map/api/estimate" => match region(engine, &query) {
            Ok(r) => json(&estimate(engine, &r)),
            Err(e) => plain(StatusCode::BAD_REQUEST, &format!("400: {e}")),
        },
        "/map/api/export.mbtiles" => match region(engine, &query) {
            Ok(r) => export(engine, site, r).await,
            Err(e) => plain(StatusCode::BAD_REQUEST, &format!("400: {e}")),
        },
        p => match webui::get(p) {
            Some(asset) => static_asset(asset, &req),
            None => plain(StatusCode::NOT_FOUND, "404 Not Found"),
        },
    }
}

/// An embedded page or file, negotiated (304, gzip or raw).
pub fn static_asset<B>(asset: &webui::Asset, req: &Request<B>) -> Response<Body> {
    let h = req.headers();
    let inm = h.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok());
    let ae = h.get(header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok());
    let answer = asset.negotiate(inm, ae);
    let mut r = match answer {
        webui::Answer::NotModified => {
            let mut r = Response::new(crate::engine::empty());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r
        }
        webui::Answer::Gzip => {
            let mut r = Response::new(full(Bytes::from_static(asset.gzip)));
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            r
        }
        webui::Answer::Identity => Response::new(full(Bytes::from_static(asset.body))),
    };
    let h = r.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(asset.cache_control()),
    );
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if answer != webui::Answer::NotModified {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
    }
    // The pages load only from the rack itself.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// A short text answer (never stored).
pub fn plain(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{msg}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json(v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `a=b&c=d`, percent-decoded (`URLSearchParams` encodes the bbox's
/// commas).
pub fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (hex, b[i]) {
            (Some(v), _) => {
                out.push(v);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, c) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why a map query was refused (a 400 naming the parameter).
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum QueryError {
    /// A parameter is missing.
    #[error("missing parameter `{0}`")]
    Missing(&'static str),
    /// A parameter is malformed.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The parameter.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// No such tile source.
    #[error("no tile source named {0:?}")]
    UnknownSource(String),
}

fn param<'a>(q: &'a HashMap<String, String>, k: &'static str) -> Result<&'a str, QueryError> {
    q.get(k).map(String::as_str).ok_or(QueryError::Missing(k))
}

fn zoom(q: &HashMap<String, String>, k: &'static str) -> Result<u8, QueryError> {
    param(q, k)?
        .parse::<u8>()
        .ok()
        .filter(|z| *z <= tiles::MAX_ZOOM)
        .ok_or_else(|| QueryError::Invalid {
            field: k,
            reason: format!("a zoom level 0-{}", tiles::MAX_ZOOM),
        })
}

fn bbox(q: &HashMap<String, String>) -> Result<BBox, QueryError> {
    // A map zoomed far out shows more than the world; clamp to it.
    let raw = param(q, "bbox")?;
    let clamped: Vec<String> = raw
        .split(',')
        .enumerate()
        .map(|(i, v)| match v.trim().parse::<f64>() {
            Ok(f) if i % 2 == 0 => f.clamp(-180.0, 180.0).to_string(),
            Ok(f) => f.clamp(-85.05, 85.05).to_string(),
            Err(_) => v.to_string(),
        })
        .collect();
    clamped
        .join(",")
        .parse::<BBox>()
        .map_err(|reason| QueryError::Invalid {
            field: "bbox",
            reason,
        })
}

fn source_index(engine: &Engine, q: &HashMap<String, String>) -> Result<usize, QueryError> {
    let name = param(q, "source")?;
    engine
        .sources
        .iter()
        .position(|s| s.name == name)
        .ok_or_else(|| QueryError::UnknownSource(name.to_string()))
}

/// Which tiles of a box are held at one zoom.
fn coverage(engine: &Engine, q: &HashMap<String, String>) -> Result<serde_json::Value, QueryError> {
    let idx = source_index(engine, q)?;
    let z = zoom(q, "z")?;
    let b = bbox(q)?;
    let count = tiles::tile_count(&b, z..=z);
    if count > MAX_COVERAGE_TILES {
        return Ok(serde_json::json!({ "z": z, "too_many": true, "tiles": [] }));
    }
    let name = &engine.sources[idx].name;
    let mut held = Vec::new();
    for t in tiles::tiles(b, z..=z) {
        if let Ok(Some(m)) = engine.store.get_meta(&key_hash(&tiles::cache_key(name, t))) {
            if m.status == 200 {
                held.push(serde_json::json!([t.x, t.y, m.pinned]));
            }
        }
    }
    Ok(serde_json::json!({ "z": z, "too_many": false, "tiles": held }))
}

/// A "save this area" request, checked.
#[derive(Debug, Clone)]
pub struct Region {
    plan: ExportPlan,
}

fn region(engine: &Engine, q: &HashMap<String, String>) -> Result<Region, QueryError> {
    let idx = source_index(engine, q)?;
    let src = &engine.sources[idx];
    let b = bbox(q)?;
    let min = zoom(q, "minzoom")?.max(src.min_zoom);
    let max = zoom(q, "maxzoom")?.min(src.max_zoom);
    if min > max {
        return Err(QueryError::Invalid {
            field: "maxzoom",
            reason: format!(
                "below minzoom, or outside the source's range {}-{}",
                src.min_zoom, src.max_zoom
            ),
        });
    }
    Ok(Region {
        plan: ExportPlan {
            source: src.name.clone(),
            bbox: b,
            min_zoom: min,
            max_zoom: max,
        },
    })
}

/// Tiles in the region, how many are held, and the expected size: the held
/// count times the store's mean object size (reading every body would cost
/// what the export itself costs).
fn estimate(engine: &Engine, r: &Region) -> serde_json::Value {
    let total = r.plan.count();
    let allowed = total <= MAX_SAVE_TILES;
    let mut held = 0u64;
    if allowed {
        for t in tiles::tiles(r.plan.bbox, r.plan.min_zoom..=r.plan.max_zoom) {
            if engine
                .store
                .contains(&key_hash(&tiles::cache_key(&r.plan.source, t)))
            {
                held += 1;
            }
        }
    }
    let s = engine.store.stats();
    let mean = s.logical_bytes.checked_div(s.objects).unwrap_or(0);
    serde_json::json!({
        "source": r.plan.source,
        "minzoom": r.plan.min_zoom,
        "maxzoom": r.plan.max_zoom,
        "tiles": total,
        "held": held,
        "bytes_estimate": held * mean,
        "allowed": allowed,
        "max_tiles": MAX_SAVE_TILES,
    })
}

/// Builds the MBTiles file in the cache directory, then streams it; the
/// file is unlinked as soon as it is open, so nothing is left behind
/// whether the download completes or not.
async fn export(engine: &Arc<Engine>, site: &Site, r: Region) -> Response<Body> {
    let total = r.plan.count();
    if total > MAX_SAVE_TILES {
        return plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "413: the area has {total} tiles at those zooms, more than the {MAX_SAVE_TILES} a download may hold; zoom in or lower the deepest zoom"
            ),
        );
    }
    let Ok(_permit) = site.exports.acquire().await else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "503: shutting down");
    };
    let dir = site.cache_dir.join("exports");
    if let Err(e) = tokio::fs::create_dir_all(&dir).await {
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("500: creating {}: {e}", dir.display()),
        );
    }
    let out = dir.join(format!("{}-{}.mbtiles", r.plan.source, next_export_id()));
    let handle = ProxyHandle {
        engine: engine.clone(),
        cache_dir: site.cache_dir.clone(),
    };
    let report = match mbtiles::export(&handle, &r.plan, &out, |_| {}).await {
        Ok(rep) => rep,
        Err(e) => {
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("500: export failed: {e}"),
            )
        }
    };
    let file = match tokio::fs::File::open(&out).await {
        Ok(f) => f,
        Err(e) => {
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("500: opening the export: {e}"),
            )
        }
    };
    let _ = tokio::fs::remove_file(&out).await;
    let len = file.metadata().await.map(|m| m.len()).ok();
    tracing::info!(
        event = "map_area_saved",
        source = %r.plan.source,
        tiles = report.tiles,
        bytes = len.unwrap_or(0),
        "map area exported for download"
    );
    let stream = futures::stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; EXPORT_CHUNK];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Frame::data(Bytes::from(buf))), f))
            }
            Err(e) => Some((Err(Box::new(e) as BoxError), f)),
        }
    });
    let body = http_body_util::StreamBody::new(stream).boxed_unsync();
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.sqlite3"),
    );
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    let name = format!(
        "attachment; filename=\"{}-z{}-{}.mbtiles\"",
        r.plan.source, r.plan.min_zoom, r.plan.max_zoom
    );
    if let Ok(v) = HeaderValue::from_str(&name) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-tiles", HeaderValue::from(report.tiles));
    resp
}

/// A per-process counter keeps concurrent exports' file names apart.
fn next_export_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The tile of `t` as `[west, south, east, north]` degrees (for tests of
/// the overlay's geometry).
pub fn tile_bounds(t: TileId) -> [f64; 4] {
    let n = f64::from(1u32 << t.z);
    let lon = |x: f64| x / n * 360.0 - 180.0;
    let lat = |y: f64| {
        (std::f64::consts::PI * (1.0 - 2.0 * y / n))
            .sinh()
            .atan()
            .to_degrees()
    };
    [
        lon(f64::from(t.x)),
        lat(f64::from(t.y + 1)),
        lon(f64::from(t.x + 1)),
        lat(f64::from(t.y)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode() {
        let q = parse_query("source=osm&bbox=-72.4%2C18.5%2C-72.3%2C18.6&z=12&x");
        assert_eq!(q["source"], "osm");
        assert_eq!(q["bbox"], "-72.4,18.5,-72.3,18.6");
        assert_eq!(q["z"], "12");
        assert_eq!(q["x"], "");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("a+b%20c"), "a b c");
    }

    #[test]
    fn a_world_wide_view_is_clamped_not_refused() {
        let q = parse_query("bbox=-400,-89,400,89");
        let b = bbox(&q).unwrap();
        assert_eq!((b.west, b.east), (-180.0, 180.0));
        assert_eq!((b.south, b.north), (-85.05, 85.05));
        assert!(matches!(
            bbox(&parse_query("bbox=1,2,3")),
            Err(QueryError::Invalid { field: "bbox", .. })
        ));
        assert_eq!(bbox(&parse_query("")), Err(QueryError::Missing("bbox")));
    }

    #[test]
    fn tile_bounds_cover_the_range_of_their_box() {
        let t = TileId { z: 3, x: 2, y: 5 };
        let [w, s, e, n] = tile_bounds(t);
        let b = BBox {
            west: w + 1e-6,
            south: s + 1e-6,
            east: e - 1e-6,
            north: n - 1e-6,
        };
        assert_eq!(tiles::tile_range(&b, 3), (2, 2, 5, 5));
    }

    #[test]
    fn site_paths() {
        for p in ["/", "/map/leaflet.js", "/console", "/console/api/login"] {
            assert!(is_site_path(p), "{p}");
        }
        for p in ["/tiles/osm.json", "/proxy.pac", "/mapx"] {
            assert!(!is_site_path(p), "{p}");
        }
    }
}
