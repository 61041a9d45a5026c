//! Configuration: the `[proxy]` table and the `[[tile_source]]` array of
//! `rack.toml`.
//!
//! The lead embeds [`ProxyConfig`] as `proxy` and `Vec<TileSource>` as
//! `tile_source` in the rack config; [`Config`] is that pair on its own so
//! this crate and its tests can load it without the rest of `rack.toml`.
//!
//! Every table rejects unknown keys (a typo must not silently become a
//! default) and every field has a default that works on one machine, except
//! a tile source's `name` and `url`. [`Config::validate`] checks what serde
//! cannot; its errors name the field.
//!
//! Override order: built-in defaults < `rack.toml` < the operator's runtime
//! switch ([`crate::ProxyHandle::set_forced_offline`]), which only exists for
//! the forced-offline flag.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The highest `client_requests_per_sec` and `client_request_burst`: far
/// above any person's browsing, low enough that the token arithmetic
/// cannot overflow.
pub const MAX_CLIENT_REQUESTS_PER_SEC: u32 = 1_000_000;

/// `[proxy]` plus `[[tile_source]]`: everything the proxy needs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[proxy]`.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// `[[tile_source]]`: upstream tile servers served under `/tiles/{name}/`.
    #[serde(default)]
    pub tile_source: Vec<TileSource>,
    /// The embedding agent's other listening sockets (admin API, mesh): the
    /// destination policy always refuses them, like the proxy's own. Not a
    /// `rack.toml` key: the agent fills it from its own configuration.
    #[serde(skip)]
    pub reserved_sockets: Vec<SocketAddr>,
}

/// `[proxy]`: the forward proxy, its cache and the backhaul it uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address the proxy and tile server listen on, `host:port`.
    pub listen: SocketAddr,
    /// A name for this cache in `Via` and `Cache-Status` headers (usually
    /// the rack name). `[a-zA-Z0-9._-]` only.
    pub name: String,
    /// Directory holding the object store (pack files and the SQLite index).
    /// The agent resolves relative paths against its data directory.
    pub cache_dir: PathBuf,
    /// Eviction starts only when the cache's disk footprint (packs, dead
    /// space included, plus the index) exceeds this. Nothing is evicted below
    /// it, however long unused; seeded (pinned) tiles never.
    pub max_cache_bytes: u64,
    /// Client networks allowed to use the proxy and tile server, as CIDRs
    /// (`10.0.0.0/8`, `fd00::/8`, or a bare address). Everyone else gets 403:
    /// this is never an open proxy.
    pub allow_networks: Vec<String>,
    /// Operator switch: behave as if the backhaul were down (serve only from
    /// the cache and the mesh, never touch the satellite link).
    pub offline: bool,
    /// Internal destinations (CIDRs) a client's forward-proxy request or
    /// `CONNECT` may reach anyway: a site intranet, `10.20.0.0/16`. Without
    /// an entry, loopback, link-local, private and reserved addresses are
    /// refused (403). The rack's own listening sockets and own addresses are
    /// refused whatever this says.
    pub allow_destinations: Vec<String>,
    /// Ports `CONNECT` may open tunnels to.
    pub connect_ports: Vec<u16>,
    /// A client must send a complete request head within this (ms) of
    /// connecting or of its previous response: also the keep-alive idle
    /// limit.
    pub header_timeout_ms: u64,
    /// A request or `CONNECT` tunnel during which no byte moves either way
    /// for this long (ms) is closed (a stalled upload, a client that stopped
    /// reading, an idle tunnel).
    pub idle_timeout_ms: u64,
    /// Connections at once from one client address; more are answered 429
    /// and closed.
    pub max_connections_per_client: usize,
    /// Connections at once in all. 0: derived from the process's open-file
    /// limit (see [`crate::listener::connection_cap`]), so a flood of the proxy
    /// leaves descriptors for the admin API and the mesh.
    pub max_connections: usize,
    /// Requests a second one client address may make (token bucket refill):
    /// plain HTTP, tiles and each `CONNECT` take a token; the map viewer's
    /// pages and `/proxy.pac` are free. Over it: 429 with `Retry-After`.
    pub client_requests_per_sec: u32,
    /// Requests one client address may make at once above its rate (the
    /// bucket's size): a map view opening dozens of tiles.
    pub client_request_burst: u32,
    /// Bytes (both ways) one client address may move through `CONNECT`
    /// tunnels per UTC day; over it, new tunnels get 429 and open ones are
    /// closed. 0: no cap.
    pub client_tunnel_bytes_per_day: u64,
    /// The satellite link: budget, probes, timeouts.
    pub backhaul: BackhaulConfig,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 3128)),
            name: "fieldrack".into(),
            cache_dir: PathBuf::from("cache"),
            max_cache_bytes: 20 * 1024 * 1024 * 1024,
            allow_networks: vec!["127.0.0.0/8".into(), "::1/128".into()],
            offline: false,
            allow_destinations: Vec::new(),
            connect_ports: vec![443],
            header_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            max_connections_per_client: 128,
            max_connections: 0,
            client_requests_per_sec: 100,
            client_request_burst: 400,
            client_tunnel_bytes_per_day: 0,
            backhaul: BackhaulConfig::default(),
        }
    }
}

/// `[proxy.backhaul]`: how much of the satellite link the proxy may use and
/// how it decides the link is down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackhaulConfig {
    /// Cap on upstream bytes per second, all classes together. 0 = no cap.
    pub bytes_per_sec: u64,
    /// Upstream bytes allowed per UTC day. 0 = no quota.
    pub daily_quota_bytes: u64,
    /// Upstream bytes per UTC day for the field's uplinks as a whole (every
    /// rack that fetches for itself or others counts the others' reported
    /// bytes); the same on every rack. 0: no field quota.
    pub field_daily_quota_bytes: u64,
    /// Cap on upstream bytes per second for the field's uplinks as a
    /// whole, split evenly among the uplinks in use. 0: no cap.
    pub field_bytes_per_sec: u64,
    /// URLs probed (GET, headers only) to decide whether the backhaul is up.
    /// Empty: the hosts of the tile sources are probed (TCP connect).
    pub probe_urls: Vec<String>,
    /// Time between probes while the link is up (ms).
    pub probe_interval_ms: u64,
    /// Time between probes while the link is down (ms): short, so service
    /// resumes quickly when the satellite comes back.
    pub probe_interval_down_ms: u64,
    /// A probe that takes longer than this failed (ms).
    pub probe_timeout_ms: u64,
    /// Upstream TCP connect timeout (ms). Only paid while the link is
    /// believed up; once it is known down, nothing waits on it.
    pub connect_timeout_ms: u64,
    /// Extra CA certificates (PEM files) trusted for `https://` upstreams,
    /// beside the public roots: a relief agency's own tile server with a
    /// private CA. Relative paths are relative to the agent's data_dir.
    pub extra_ca_files: Vec<PathBuf>,
    /// Time allowed for an upstream's response head (ms).
    pub response_timeout_ms: u64,
    /// How long a client holding a stored (stale) copy waits for its
    /// revalidation before the stale copy is served (ms); the revalidation
    /// goes on in the background. Keeps every cached answer under a second
    /// whatever the upstream does.
    pub stale_deadline_ms: u64,
    /// How long a miss waits for the upstream's response head before a 504
    /// (ms); the upstream is then marked hung and later misses for it fail
    /// at once, until a probe gets an answer from it.
    pub miss_deadline_ms: u64,
}

impl Default for BackhaulConfig {
    fn default() -> Self {
        Self {
            extra_ca_files: Vec::new(),
            bytes_per_sec: 0,
            daily_quota_bytes: 0,
            field_daily_quota_bytes: 0,
            field_bytes_per_sec: 0,
            probe_urls: Vec::new(),
            probe_interval_ms: 30_000,
            probe_interval_down_ms: 5_000,
            probe_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
            response_timeout_ms: 30_000,
            stale_deadline_ms: 800,
            miss_deadline_ms: 4_000,
        }
    }
}

/// The format of a tile source; decides the file extension in the URL and
/// which `Content-Type`s an upstream answer may have to be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TileFormat {
    /// PNG raster tiles.
    #[default]
    Png,
    /// JPEG raster tiles.
    Jpg,
    /// WebP raster tiles.
    Webp,
    /// Mapbox vector tiles (protobuf).
    Pbf,
}

impl TileFormat {
    /// The extension used in `/tiles/{source}/{z}/{x}/{y}.{ext}`.
    pub fn extension(self) -> &'static str {
        match self {
            TileFormat::Png => "png",
            TileFormat::Jpg => "jpg",
            TileFormat::Webp => "webp",
            TileFormat::Pbf => "pbf",
        }
    }

    /// Whether `ext` names this format (`jpeg` and `mvt` are accepted too).
    pub fn matches_extension(self, ext: &str) -> bool {
        ext == self.extension()
            || matches!(
                (self, ext),
                (TileFormat::Jpg, "jpeg") | (TileFormat::Pbf, "mvt")
            )
    }

    /// The `Content-Type` we answer with.
    pub fn content_type(self) -> &'static str {
        match self {
            TileFormat::Png => "image/png",
            TileFormat::Jpg => "image/jpeg",
            TileFormat::Webp => "image/webp",
            TileFormat::Pbf => "application/vnd.mapbox-vector-tile",
        }
    }

    /// Whether an upstream `Content-Type` is acceptable for this format. A
    /// tile is stored only if this holds: a captive portal's `text/html`
    /// never becomes a tile.
    pub fn accepts_content_type(self, content_type: &str) -> bool {
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match self {
            TileFormat::Png => mime == "image/png",
            TileFormat::Jpg => mime == "image/jpeg" || mime == "image/jpg",
            TileFormat::Webp => mime == "image/webp",
            TileFormat::Pbf => matches!(
                mime.as_str(),
                "application/vnd.mapbox-vector-tile"
                    | "application/x-protobuf"
                    | "application/protobuf"
                    | "application/octet-stream"
            ),
        }
    }
}

/// One `[[tile_source]]`: an upstream XYZ tile server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TileSource {
    /// Short name, the `{source}` in `/tiles/{source}/...` (`[a-z0-9_-]`).
    pub name: String,
    /// Upstream URL template with `{z}`, `{x}` and `{y}`, e.g.
    /// `http://tiles.example.org/{z}/{x}/{y}.png`.
    pub url: String,
    /// Tile format.
    #[serde(default)]
    pub format: TileFormat,
    /// Lowest zoom served.
    #[serde(default)]
    pub min_zoom: u8,
    /// Highest zoom served (at most 24).
    #[serde(default = "default_max_zoom")]
    pub max_zoom: u8,
    /// Attribution shown by map clients (TileJSON `attribution`); required
    /// by most tile licences.
    #[serde(default)]
    pub attribution: String,
    /// Whether the source's usage policy allows bulk download (seeding).
    /// The OpenStreetMap tile servers forbid it: leave this false for them.
    #[serde(default)]
    pub allow_bulk: bool,
    /// Upstream requests per second to this source, all clients and the
    /// seeder together. 0 = unlimited.
    #[serde(default = "default_requests_per_sec")]
    pub requests_per_sec: u32,
    /// `User-Agent` sent upstream; tile policies require an identifying one.
    #[serde(default = "default_user_agent")]
    pub user_agent: String,
}

fn default_max_zoom() -> u8 {
    19
}
fn default_requests_per_sec() -> u32 {
    10
}
fn default_user_agent() -> String {
    concat!("fieldrack-cache-proxy/", env!("CARGO_PKG_VERSION")).into()
}

/// A configuration error; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// `proxy.allow_networks[i]` is not a CIDR.
    #[error("proxy.allow_networks[{index}]: {value:?} is not an address or CIDR")]
    BadNetwork {
        /// Index in the list.
        index: usize,
        /// The offending text.
        value: String,
    },
    /// `proxy.allow_destinations[i]` is not a CIDR.
    #[error("proxy.allow_destinations[{index}]: {value:?} is not an address or CIDR")]
    BadDestination {
        /// Index in the list.
        index: usize,
        /// The offending text.
        value: String,
    },
    /// A `[proxy]` number out of its range.
    #[error("proxy.{field}: {reason}")]
    OutOfRange {
        /// The key.
        field: &'static str,
        /// The accepted range.
        reason: &'static str,
    },
    /// `proxy.name` has characters that do not fit in a header token.
    #[error("proxy.name: {0:?} must be 1-64 chars of [a-zA-Z0-9._-]")]
    BadName(String),
    /// A tile source is invalid.
    #[error("tile_source[{index}].{field}: {reason}")]
    BadTileSource {
        /// Index in the `[[tile_source]]` array.
        index: usize,
        /// The field at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl Config {
    /// Checks what serde cannot.
    ///
    /// # Errors
    /// The first problem found, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.proxy.name;
        if n.is_empty()
            || n.len() > 64
            || !n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(ConfigError::BadName(n.clone()));
        }
        for (index, value) in self.proxy.allow_networks.iter().enumerate() {
            if Cidr::parse(value).is_none() {
                return Err(ConfigError::BadNetwork {
                    index,
                    value: value.clone(),
                });
            }
        }
        for (index, value) in self.proxy.allow_destinations.iter().enumerate() {
            if Cidr::parse(value).is_none() {
                return Err(ConfigError::BadDestination {
                    index,
                    value: value.clone(),
                });
            }
        }
        let p = &self.proxy;
        let range = |field, ok: bool, reason| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange { field, reason })
            }
        };
        range(
            "connect_ports",
            !p.connect_ports.contains(&0),
            "ports are 1-65535",
        )?;
        range(
            "header_timeout_ms",
            (100..=600_000).contains(&p.header_timeout_ms),
            "between 100 and 600000",
        )?;
        range(
            "idle_timeout_ms",
            (100..=86_400_000).contains(&p.idle_timeout_ms),
            "between 100 and 86400000",
        )?;
        range(
            "max_connections_per_client",
            (1..=crate::server::MAX_CONNECTIONS).contains(&p.max_connections_per_client),
            "between 1 and 4096",
        )?;
        range(
            "client_requests_per_sec",
            (1..=MAX_CLIENT_REQUESTS_PER_SEC).contains(&p.client_requests_per_sec),
            "between 1 and 1000000",
        )?;
        range(
            "client_request_burst",
            (1..=MAX_CLIENT_REQUESTS_PER_SEC).contains(&p.client_request_burst),
            "between 1 and 1000000",
        )?;
        range(
            "backhaul.stale_deadline_ms",
            (1..=60_000).contains(&p.backhaul.stale_deadline_ms),
            "between 1 and 60000",
        )?;
        range(
            "backhaul.miss_deadline_ms",
            (1..=600_000).contains(&p.backhaul.miss_deadline_ms),
            "between 1 and 600000",
        )?;
        range(
            "max_connections",
            p.max_connections <= crate::server::MAX_CONNECTIONS,
            "at most 4096 (0 derives it from the open-file limit)",
        )?;
        let mut seen = std::collections::HashSet::new();
        for (index, s) in self.tile_source.iter().enumerate() {
            let bad = |field, reason: &str| ConfigError::BadTileSource {
                index,
                field,
                reason: reason.into(),
            };
            if s.name.is_empty()
                || s.name.len() > 64
                || !s
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
            {
                return Err(bad("name", "must be 1-64 chars of [a-z0-9_-]"));
            }
            if !seen.insert(s.name.as_str()) {
                return Err(bad("name", "duplicate tile source name"));
            }
            for p in ["{z}", "{x}", "{y}"] {
                if !s.url.contains(p) {
                    return Err(bad("url", &format!("template lacks {p}")));
                }
            }
            if crate::upstream::Target::parse(&s.url.replace(['{', '}'], "")).is_err() {
                return Err(bad("url", "not an http:// or https:// URL"));
            }
            if s.max_zoom > crate::tiles::MAX_ZOOM {
                return Err(bad("max_zoom", "at most 24"));
            }
            if s.min_zoom > s.max_zoom {
                return Err(bad("min_zoom", "greater than max_zoom"));
            }
            if s.user_agent.trim().is_empty()
                || hyper::header::HeaderValue::from_str(&s.user_agent).is_err()
            {
                return Err(bad("user_agent", "must be a non-empty header value"));
            }
        }
        Ok(())
    }
}

/// An address block, `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `fd00::/8` or a bare address (a /32 or /128).
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside the block. IPv4-mapped IPv6 addresses
    /// (`::ffff:10.1.2.3`, as seen on dual-stack sockets) match IPv4 blocks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_matching() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("nope").is_none());
    }

    #[test]
    fn parses_rack_toml_names() {
        let text = r#"
[proxy]
listen = "0.0.0.0:3128"
cache_dir = "/var/lib/fieldrack/cache"
max_cache_bytes = 1000000
allow_networks = ["10.0.0.0/8"]
offline = true
[proxy.backhaul]
bytes_per_sec = 100000
daily_quota_bytes = 5000000000

[[tile_source]]
name = "osm"
url = "http://tile.example.org/{z}/{x}/{y}.png"
format = "png"
min_zoom = 0
max_zoom = 19
attribution = "(c) OpenStreetMap contributors"
allow_bulk = false
requests_per_sec = 2
user_agent = "fieldrack/0.1 (ops@example.org)"
"#;
        let c: Config = toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        c.validate().unwrap();
        assert_eq!(c.tile_source[0].requests_per_sec, 2);
        assert!(c.proxy.offline);
        assert_eq!(c.proxy.backhaul.daily_quota_bytes, 5_000_000_000);
    }

    #[test]
    fn unknown_keys_rejected() {
        let v = serde_json::json!({"proxy": {"listn": "1.2.3.4:5"}});
        assert!(serde_json::from_value::<Config>(v).is_err());
        let v = serde_json::json!({"tile_source": [{"name": "a", "url": "http://x/{z}/{x}/{y}", "zoom": 3}]});
        assert!(serde_json::from_value::<Config>(v).is_err());
    }

    #[test]
    fn validation_names_fields() {
        let mut c = Config::default();
        c.tile_source.push(TileSource {
            name: "a".into(),
            url: "http://x/{z}/{y}".into(),
            format: TileFormat::Png,
            min_zoom: 0,
            max_zoom: 19,
            attribution: String::new(),
            allow_bulk: false,
            requests_per_sec: 1,
            user_agent: "x".into(),
        });
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("tile_source[0].url"), "{e}");
        c.tile_source[0].url = "http://x/{z}/{x}/{y}".into();
        c.validate().unwrap();
        c.proxy.allow_networks.push("10.0.0.0/40".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("allow_networks[2]"));
    }

    #[test]
    fn perimeter_keys_are_checked() {
        let text = r#"
[proxy]
allow_destinations = ["10.20.0.0/16", "fd00::/8"]
connect_ports = [443, 8443]
header_timeout_ms = 5000
idle_timeout_ms = 60000
max_connections_per_client = 32
max_connections = 1000
"#;
        let c: Config = toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        c.validate().unwrap();
        assert_eq!(c.proxy.connect_ports, vec![443, 8443]);
        let bad = |edit: fn(&mut ProxyConfig), field: &str| {
            let mut c = Config::default();
            edit(&mut c.proxy);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        };
        bad(
            |p| p.allow_destinations = vec!["10.0.0.0/8".into(), "intranet".into()],
            "proxy.allow_destinations[1]",
        );
        bad(|p| p.connect_ports = vec![0], "proxy.connect_ports");
        bad(|p| p.header_timeout_ms = 0, "proxy.header_timeout_ms");
        bad(|p| p.idle_timeout_ms = u64::MAX, "proxy.idle_timeout_ms");
        bad(
            |p| p.max_connections_per_client = 0,
            "proxy.max_connections_per_client",
        );
        bad(|p| p.max_connections = 1 << 20, "proxy.max_connections");
        bad(
            |p| p.client_requests_per_sec = 0,
            "proxy.client_requests_per_sec",
        );
        bad(
            |p| p.client_request_burst = 2_000_000,
            "proxy.client_request_burst",
        );
        assert_eq!(Config::default().proxy.connect_ports, vec![443]);
        assert!(Config::default().proxy.allow_destinations.is_empty());
    }
}
