//! Seeding: fetch every tile of a region ahead of time, pinned.
//!
//! Refuses sources whose `allow_bulk` is false (the OpenStreetMap tile
//! servers forbid bulk download). Walks tiles in [`crate::tiles::tiles`]
//! order through the same engine as clients (so single flight, budget under
//! the *seeding* class, the source's rate limit and User-Agent all apply),
//! pins every tile, and skips tiles already stored (pinning them), so a
//! killed run resumes without refetching: the store *is* the resume state,
//! and a cursor file beside the cache (`seed-<source>.cursor`) lets a resumed
//! run skip even the index lookups of the part already done.

use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::Method;

use crate::budget::Class;
use crate::engine::{CacheRequest, Engine};
use crate::store::key_hash;
use crate::tiles::{self, BBox};
use crate::upstream::Target;

/// Tiles per cursor save: bounds refetching after a kill to this many index
/// lookups (never refetches: stored tiles are skipped anyway).
pub const CURSOR_EVERY: u64 = 256;

/// Why seeding refused or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SeedError {
    /// No such source.
    #[error("no tile source named {0:?}")]
    UnknownSource(String),
    /// The source's policy forbids bulk download.
    #[error(
        "tile source {0:?} does not allow bulk download (allow_bulk = false); refusing to seed"
    )]
    BulkForbidden(String),
    /// Zoom range outside the source's.
    #[error("zoom {0}-{1} is outside the source's range")]
    Zoom(u8, u8),
    /// The backhaul is down or forced offline.
    #[error("backhaul is down; seeding needs it")]
    Offline,
    /// Today's seeding share of the quota is used.
    #[error("daily quota for seeding used up")]
    Quota,
}

/// Progress, reported after every tile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SeedProgress {
    /// Tiles in the plan.
    pub total: u64,
    /// Tiles walked.
    pub done: u64,
    /// Of those, fetched now.
    pub fetched: u64,
    /// Of those, already stored.
    pub skipped: u64,
    /// Of those, failed (not stored; a later run retries them).
    pub failed: u64,
}

/// A seeding job.
#[derive(Debug, Clone)]
pub struct SeedPlan {
    /// Source name.
    pub source: String,
    /// Region.
    pub bbox: BBox,
    /// Lowest zoom.
    pub min_zoom: u8,
    /// Highest zoom.
    pub max_zoom: u8,
}

impl SeedPlan {
    /// Number of tiles.
    pub fn count(&self) -> u64 {
        tiles::tile_count(&self.bbox, self.min_zoom..=self.max_zoom)
    }
}

fn cursor_path(dir: &std::path::Path, source: &str) -> PathBuf {
    dir.join(format!("seed-{source}.cursor"))
}

/// Runs a plan. `progress` is called after every tile.
///
/// # Errors
/// See [`SeedError`]; individual tile failures are counted, not fatal,
/// except that seeding stops when the backhaul goes down or the quota ends.
pub async fn seed(
    engine: &Arc<Engine>,
    cache_dir: &std::path::Path,
    plan: &SeedPlan,
    mut progress: impl FnMut(&SeedProgress),
) -> Result<SeedProgress, SeedError> {
    let idx = engine
        .sources
        .iter()
        .position(|s| s.name == plan.source)
        .ok_or_else(|| SeedError::UnknownSource(plan.source.clone()))?;
    let src = engine.sources[idx].clone();
    if !src.allow_bulk {
        return Err(SeedError::BulkForbidden(src.name));
    }
    if plan.min_zoom < src.min_zoom || plan.max_zoom > src.max_zoom || plan.min_zoom > plan.max_zoom
    {
        return Err(SeedError::Zoom(plan.min_zoom, plan.max_zoom));
    }
    let plan_id = format!(
        "{} {} {} {} {} {} {}",
        plan.source,
        plan.bbox.west,
        plan.bbox.south,
        plan.bbox.east,
        plan.bbox.north,
        plan.min_zoom,
        plan.max_zoom
    );
    let cpath = cursor_path(cache_dir, &plan.source);
    let start = std::fs::read_to_string(&cpath)
        .ok()
        .and_then(|s| {
            let (id, n) = s.rsplit_once('\n')?;
            (id == plan_id).then(|| n.trim().parse::<u64>().ok())?
        })
        .unwrap_or(0);
    let mut p = SeedProgress {
        total: plan.count(),
        ..Default::default()
    };
    for (i, t) in tiles::tiles(plan.bbox, plan.min_zoom..=plan.max_zoom).enumerate() {
        let i = i as u64;
        p.done = i + 1;
        if i < start {
            p.skipped += 1;
            continue;
        }
        let key = tiles::cache_key(&src.name, t);
        let kh = key_hash(&key);
        if engine.store.contains(&kh) {
            let _ = engine.store.set_pinned(kh, true).await;
            p.skipped += 1;
        } else {
            if !engine.health.backhaul_up() {
                return Err(SeedError::Offline);
            }
            if engine.budget.may_start(Class::Seeding).is_err() {
                return Err(SeedError::Quota);
            }
            let Ok(target) = Target::parse(&tiles::upstream_url(&src.url, t)) else {
                p.failed += 1;
                continue;
            };
            let mut upstream_headers = HeaderMap::new();
            if let Ok(ua) = HeaderValue::from_str(&src.user_agent) {
                upstream_headers.insert(header::USER_AGENT, ua);
            }
            let req = CacheRequest {
                method: Method::GET,
                headers: HeaderMap::new(),
                key,
                target,
                upstream_headers,
                tile: Some(idx),
                class: Class::Seeding,
                via: false,
                client: None,
                forwarded: false,
            };
            let resp = engine.serve(req).await;
            let ok = resp.status().is_success();
            let _ = resp.into_body().collect().await;
            // The store write follows the body: wait for the flight to end
            // (it ends once stored) so the cursor never runs ahead of what
            // is durable.
            while engine.flights.contains(&kh) {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            if ok && engine.store.contains(&kh) {
                let _ = engine.store.set_pinned(kh, true).await;
                p.fetched += 1;
            } else {
                p.failed += 1;
            }
        }
        if p.done.is_multiple_of(CURSOR_EVERY) && p.failed == 0 {
            let _ = std::fs::write(&cpath, format!("{plan_id}\n{}", p.done));
        }
        progress(&p);
    }
    if p.failed == 0 {
        let _ = std::fs::remove_file(&cpath);
    }
    Ok(p)
}
