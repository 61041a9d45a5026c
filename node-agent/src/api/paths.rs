//! Every path of the admin API, in one place: the router in `api.rs`
//! matches on these constants and [`crate::client::AgentClient`] builds
//! its requests from them, so the server and its client cannot drift
//! apart (a renamed route fails to compile on both sides, not at run time
//! on a rack in the field).

/// `/api/v1/` + a literal, at compile time (so the constants can be used
/// as `match` patterns).
macro_rules! v1 {
    ($rest:literal) => {
        concat!("/api/v1/", $rest)
    };
}

/// `GET`: the status document.
pub const STATUS: &str = v1!("status");
/// `GET`: the field view (which racks are up, and why).
pub const FIELD: &str = v1!("field");
/// `GET`: Prometheus text (outside `/api/v1`, where scrapers expect it).
pub const METRICS: &str = "/metrics";
/// `GET` the revocations known; `POST` one more.
pub const REVOCATIONS: &str = v1!("revocations");
/// `GET ?limit=N`: the local event log.
pub const EVENTS: &str = v1!("events");
/// `GET` the volumes held here; `POST` creates one.
pub const VOLUMES: &str = v1!("volumes");
/// `GET` the kept copies of volumes this rack stopped owning.
pub const VOLUMES_KEPT: &str = v1!("volumes/kept");
/// `POST`: scrub every chunk now.
pub const VOLUMES_SCRUB: &str = v1!("volumes/scrub");
/// Prefix of `/api/v1/volumes/{name}/{action}` (see [`VolumeAction`]).
pub const VOLUME_PREFIX: &str = v1!("volumes/");
/// `GET` every appliance of the field; `POST` a manifest.
pub const APPS: &str = v1!("apps");
/// Prefix of `/api/v1/apps/{name}/{action}` (see [`AppAction`]).
pub const APP_PREFIX: &str = v1!("apps/");
/// `POST {"offline": bool}`: the proxy's operator switch.
pub const CACHE_OFFLINE: &str = v1!("cache/offline");
/// `POST {"who", "why"}`: the operator's quorum override (cold start).
pub const OVERRIDE_QUORUM: &str = v1!("override/quorum");
/// `POST`: seed a region of tiles (NDJSON answer).
pub const TILES_SEED: &str = v1!("tiles/seed");
/// `POST`: import an MBTiles or PMTiles file (NDJSON answer).
pub const TILES_IMPORT: &str = v1!("tiles/import");
/// `POST`: export a region to an MBTiles file (NDJSON answer).
pub const TILES_EXPORT: &str = v1!("tiles/export");

/// `GET` the drill faults in force here; `POST` a fault order.
pub const DRILL_FAULTS: &str = v1!("drill/faults");
/// `POST`: heal every drill fault here now.
pub const DRILL_ABORT: &str = v1!("drill/abort");
/// `GET` the drill reports kept here; `POST` one more.
pub const DRILL_REPORTS: &str = v1!("drill/reports");
/// `GET`: a drill's steady-state probe of this rack (a tile through its proxy).
pub const DRILL_PROBE: &str = v1!("drill/probe");

/// What `POST /api/v1/volumes/{name}/{action}` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeAction {
    /// Snapshot now.
    Snapshot,
    /// Import an image (NDJSON answer).
    Import,
    /// Export a generation or a kept copy (NDJSON answer).
    Export,
    /// Drop a kept copy (`{"kept_ms": N}`).
    DropKept,
}

impl VolumeAction {
    /// The last path segment.
    #[must_use]
    pub const fn segment(self) -> &'static str {
        match self {
            Self::Snapshot => "snapshot",
            Self::Import => "import",
            Self::Export => "export",
            Self::DropKept => "drop-kept",
        }
    }
}

/// What `POST /api/v1/apps/{name}/{action}` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppAction {
    /// Stop (it stays deployed).
    Stop,
    /// Start again.
    Start,
    /// Move to another rack (`{"to": rack}`).
    Move,
}

impl AppAction {
    /// The last path segment.
    #[must_use]
    pub const fn segment(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Start => "start",
            Self::Move => "move",
        }
    }
}

/// `/api/v1/volumes/{name}/{action}`.
#[must_use]
pub fn volume(name: &str, action: VolumeAction) -> String {
    format!("{VOLUME_PREFIX}{name}/{}", action.segment())
}

/// `/api/v1/apps/{name}/{action}`.
#[must_use]
pub fn app(name: &str, action: AppAction) -> String {
    format!("{APP_PREFIX}{name}/{}", action.segment())
}

/// `/api/v1/events?limit={limit}`.
#[must_use]
pub fn events(limit: usize) -> String {
    format!("{EVENTS}?limit={limit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_built_under_their_prefixes() {
        assert_eq!(STATUS, "/api/v1/status");
        assert_eq!(
            volume("db", VolumeAction::Import),
            "/api/v1/volumes/db/import"
        );
        assert_eq!(
            app("registry", AppAction::Move),
            "/api/v1/apps/registry/move"
        );
        assert_eq!(events(7), "/api/v1/events?limit=7");
        assert!(VOLUMES_SCRUB.starts_with(VOLUME_PREFIX));
        assert!(volume("x", VolumeAction::Snapshot).starts_with(VOLUME_PREFIX));
        assert!(app("x", AppAction::Stop).starts_with(APP_PREFIX));
    }
}
