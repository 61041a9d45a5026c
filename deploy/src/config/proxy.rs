//! `[proxy]` and `[[tile_source]]`: the caching HTTP proxy and tile server.
//!
//! These are the keys the `cache-proxy` crate runs on, owned here so that
//! `rack.toml` is parsed and validated once, in one place, with every error
//! naming its field. `deploy` is a leaf crate and cannot name
//! `cache-proxy`'s types; the agent converts these structs into them field
//! by field (`node-agent/src/proxy.rs`), so a key added on one side and not
//! the other fails to compile there rather than being dropped.
//!
//! The rules mirror `cache_proxy::Config::validate` (a property test in the
//! agent checks that every configuration accepted here passes it), and add
//! ranges for the backhaul timers, which `cache-proxy` leaves to its
//! embedder.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::limits;

/// `[proxy]`: the forward proxy, its cache and the backhaul it uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address the proxy and tile server listen on, `host:port`.
    pub listen: SocketAddr,
    /// The cache's name in `Via` and `Cache-Status` headers and its DNS-SD
    /// advertisement; unset: the rack's name. `[a-zA-Z0-9._-]`, 1-64 chars.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Directory of the object store; relative paths are relative to
    /// `data_dir`.
    pub cache_dir: PathBuf,
    /// Eviction starts only above this disk footprint; seeded tiles never go.
    pub max_cache_bytes: u64,
    /// Client networks allowed to use the proxy (CIDRs or bare addresses);
    /// everyone else is refused: never an open proxy.
    pub allow_networks: Vec<String>,
    /// Operator switch: behave as if the backhaul were down.
    pub offline: bool,
    /// Internal destinations (CIDRs) clients may reach through the proxy;
    /// without an entry, private and reserved addresses are refused.
    pub allow_destinations: Vec<String>,
    /// Ports `CONNECT` may tunnel to.
    pub connect_ports: Vec<u16>,
    /// Time (ms) for a client to send a request head; also the keep-alive
    /// idle limit.
    pub header_timeout_ms: u64,
    /// A request or tunnel with no byte moving either way this long (ms) is
    /// closed.
    pub idle_timeout_ms: u64,
    /// Connections at once from one client address.
    pub max_connections_per_client: usize,
    /// Connections at once in all; 0: the agent derives it from the
    /// open-file limit.
    pub max_connections: usize,
    /// Requests a second per client address (plain HTTP, tiles, each
    /// `CONNECT`); over it: 429 with `Retry-After`.
    pub client_requests_per_sec: u32,
    /// Requests per client address allowed at once above that rate.
    pub client_request_burst: u32,
    /// Bytes per client address per UTC day through `CONNECT` tunnels,
    /// both ways; 0: no cap.
    pub client_tunnel_bytes_per_day: u64,
    /// `[proxy.backhaul]`: the satellite link.
    pub backhaul: BackhaulConfig,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 3128)),
            name: None,
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
    /// Cap on upstream bytes per second; 0: no cap.
    pub bytes_per_sec: u64,
    /// Upstream bytes per UTC day; 0: no quota.
    pub daily_quota_bytes: u64,
    /// Upstream bytes per UTC day for the field's uplinks as a whole (every
    /// rack that fetches for itself or others counts the others' reported
    /// bytes); the same on every rack. 0: no field quota.
    pub field_daily_quota_bytes: u64,
    /// Cap on upstream bytes per second for the field's uplinks as a
    /// whole, split evenly among the uplinks in use. 0: no cap.
    pub field_bytes_per_sec: u64,
    /// URLs probed to decide whether the backhaul is up; empty: the tile
    /// sources' hosts.
    pub probe_urls: Vec<String>,
    /// Time between probes while the link is up (ms).
    pub probe_interval_ms: u64,
    /// Time between probes while the link is down (ms).
    pub probe_interval_down_ms: u64,
    /// A probe slower than this failed (ms).
    pub probe_timeout_ms: u64,
    /// Upstream TCP connect timeout (ms).
    pub connect_timeout_ms: u64,
    /// Extra CA certificates (PEM) for `https://` upstreams; relative paths
    /// are relative to `data_dir`.
    pub extra_ca_files: Vec<PathBuf>,
    /// Time allowed for an upstream's response head (ms).
    pub response_timeout_ms: u64,
    /// How long a client holding a stale copy waits for its revalidation
    /// before the stale copy is served (ms).
    pub stale_deadline_ms: u64,
    /// How long a miss waits for a response head before a 504 and the
    /// upstream is marked hung (ms).
    pub miss_deadline_ms: u64,
}

impl Default for BackhaulConfig {
    fn default() -> Self {
        Self {
            bytes_per_sec: 0,
            daily_quota_bytes: 0,
            field_daily_quota_bytes: 0,
            field_bytes_per_sec: 0,
            probe_urls: Vec::new(),
            probe_interval_ms: 30_000,
            probe_interval_down_ms: 5_000,
            probe_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
            extra_ca_files: Vec::new(),
            response_timeout_ms: 30_000,
            stale_deadline_ms: 800,
            miss_deadline_ms: 4_000,
        }
    }
}

/// A tile source's format: the URL extension and the content types stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TileFormat {
    /// PNG raster tiles.
    #[default]
    Png,
    /// JPEG raster tiles.
    Jpg,
    /// WebP raster tiles.
    Webp,
    /// Mapbox vector tiles.
    Pbf,
}

/// One `[[tile_source]]`: an upstream XYZ tile server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TileSource {
    /// The `{source}` in `/tiles/{source}/...`: `[a-z0-9_-]`, 1-64 chars,
    /// unique.
    pub name: String,
    /// Upstream `http://` or `https://` URL template with `{z}`, `{x}`, `{y}`.
    pub url: String,
    /// Tile format.
    #[serde(default)]
    pub format: TileFormat,
    /// Lowest zoom served.
    #[serde(default)]
    pub min_zoom: u8,
    /// Highest zoom served (at most [`limits::MAX_ZOOM`]).
    #[serde(default = "default_max_zoom")]
    pub max_zoom: u8,
    /// Attribution shown by map clients.
    #[serde(default)]
    pub attribution: String,
    /// Whether the source's policy allows bulk download (seeding).
    #[serde(default)]
    pub allow_bulk: bool,
    /// Upstream requests per second to this source; 0: unlimited.
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

/// A field of `[proxy]` or `[[tile_source]]` that is not acceptable, as
/// `(dotted field, reason)`: the shape `RackConfig`'s validation reports.
pub(crate) type Refusal = (String, String);

/// Checks `[proxy]` (when set) and `[[tile_source]]`, first problem first.
pub(crate) fn validate(proxy: Option<&ProxyConfig>, sources: &[TileSource]) -> Result<(), Refusal> {
    let bad = |field: String, reason: String| Err((field, reason));
    if let Some(p) = proxy {
        if let Some(name) = &p.name {
            if !is_cache_name(name) {
                return bad(
                    "proxy.name".into(),
                    format!("{name:?} must be 1-64 chars of [a-zA-Z0-9._-]"),
                );
            }
        }
        for (list, values) in [
            ("allow_networks", &p.allow_networks),
            ("allow_destinations", &p.allow_destinations),
        ] {
            if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !is_cidr(v)) {
                return bad(
                    format!("proxy.{list}[{i}]"),
                    format!("{v:?} is not an address or CIDR such as 10.0.0.0/8"),
                );
            }
        }
        if p.connect_ports.contains(&0) {
            return bad("proxy.connect_ports".into(), "ports are 1-65535".into());
        }
        if let Some((i, u)) = p
            .backhaul
            .probe_urls
            .iter()
            .enumerate()
            .find(|(_, u)| http_url(u).is_err())
        {
            return bad(
                format!("proxy.backhaul.probe_urls[{i}]"),
                format!("{u:?} is not an http:// or https:// URL"),
            );
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (i, s) in sources.iter().enumerate() {
        let field = |key: &str| format!("tile_source[{i}].{key}");
        if !is_source_name(&s.name) {
            return bad(field("name"), "must be 1-64 chars of [a-z0-9_-]".into());
        }
        if !seen.insert(s.name.as_str()) {
            return bad(
                field("name"),
                format!("duplicate tile source name {:?}", s.name),
            );
        }
        for p in ["{z}", "{x}", "{y}"] {
            if !s.url.contains(p) {
                return bad(field("url"), format!("template lacks {p}"));
            }
        }
        if let Err(reason) = http_url(&s.url.replace(['{', '}'], "")) {
            return bad(
                field("url"),
                format!("not an http:// or https:// URL: {reason}"),
            );
        }
        if s.max_zoom > limits::MAX_ZOOM {
            return bad(field("max_zoom"), format!("at most {}", limits::MAX_ZOOM));
        }
        if s.min_zoom > s.max_zoom {
            return bad(field("min_zoom"), "greater than max_zoom".into());
        }
        if !is_header_value(&s.user_agent) {
            return bad(
                field("user_agent"),
                "must be a non-empty header value (no control characters)".into(),
            );
        }
    }
    Ok(())
}

/// `[proxy]`'s numeric knobs with their ranges, for `RackConfig`'s range
/// check (and its overflow property test).
pub(super) fn bounded_numbers(
    p: &ProxyConfig,
) -> Vec<(&'static str, u64, std::ops::RangeInclusive<u64>)> {
    use limits::*;
    let n = |x: usize| u64::try_from(x).unwrap_or(u64::MAX);
    let b = &p.backhaul;
    vec![
        (
            "proxy.header_timeout_ms",
            p.header_timeout_ms,
            100..=MAX_PROXY_HEADER_TIMEOUT_MS,
        ),
        (
            "proxy.idle_timeout_ms",
            p.idle_timeout_ms,
            100..=MAX_PROXY_IDLE_TIMEOUT_MS,
        ),
        (
            "proxy.max_connections_per_client",
            n(p.max_connections_per_client),
            1..=MAX_PROXY_CONNECTIONS,
        ),
        (
            "proxy.max_connections",
            n(p.max_connections),
            0..=MAX_PROXY_CONNECTIONS,
        ),
        (
            "proxy.client_requests_per_sec",
            u64::from(p.client_requests_per_sec),
            1..=MAX_PROXY_CLIENT_REQUESTS_PER_SEC,
        ),
        (
            "proxy.client_request_burst",
            u64::from(p.client_request_burst),
            1..=MAX_PROXY_CLIENT_REQUESTS_PER_SEC,
        ),
        (
            "proxy.backhaul.probe_interval_ms",
            b.probe_interval_ms,
            1..=MAX_TIMEOUT_MS,
        ),
        (
            "proxy.backhaul.probe_interval_down_ms",
            b.probe_interval_down_ms,
            1..=MAX_TIMEOUT_MS,
        ),
        (
            "proxy.backhaul.probe_timeout_ms",
            b.probe_timeout_ms,
            1..=MAX_TIMEOUT_MS,
        ),
        (
            "proxy.backhaul.connect_timeout_ms",
            b.connect_timeout_ms,
            1..=MAX_TIMEOUT_MS,
        ),
        (
            "proxy.backhaul.response_timeout_ms",
            b.response_timeout_ms,
            1..=MAX_TIMEOUT_MS,
        ),
        (
            "proxy.backhaul.stale_deadline_ms",
            b.stale_deadline_ms,
            1..=60_000,
        ),
        (
            "proxy.backhaul.miss_deadline_ms",
            b.miss_deadline_ms,
            1..=600_000,
        ),
    ]
}

/// A name fit for a `Via` / `Cache-Status` token.
fn is_cache_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A tile source name fit for a URL path segment and a file name.
fn is_source_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
}

/// `10.0.0.0/8`, `fd00::/8` or a bare address.
fn is_cidr(s: &str) -> bool {
    let s = s.trim();
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return false;
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    prefix.is_none_or(|p| p.parse::<u8>().is_ok_and(|p| p <= max))
}

/// Bytes an HTTP header value may carry: visible ASCII, space, tab and
/// obs-text; never a control character (no header injection).
fn is_header_value(v: &str) -> bool {
    !v.trim().is_empty() && v.bytes().all(|b| (b >= 0x20 && b != 0x7f) || b == b'\t')
}

/// An absolute `http://` or `https://` URL with a host, an optional port
/// and a path of RFC 3986 characters.
///
/// # Errors
/// What is wrong with it.
fn http_url(u: &str) -> Result<(), &'static str> {
    /// Longest URL the proxy's URI parser takes.
    const MAX_URL: usize = u16::MAX as usize - 1;
    if u.len() > MAX_URL {
        return Err("too long");
    }
    let (scheme, rest) = u.split_once("://").ok_or("no scheme")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err("the scheme must be http or https");
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if path.starts_with('#') || !path.bytes().all(is_uri_byte) {
        return Err("characters not allowed in a URL");
    }
    let host_port = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => {
            if !userinfo
                .bytes()
                .all(|b| is_unreserved_or_sub(b) || b == b':')
            {
                return Err("characters not allowed in the user info");
            }
            host_port
        }
        None => authority,
    };
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        let (ip, after) = v6.split_once(']').ok_or("unclosed [")?;
        ip.parse::<std::net::Ipv6Addr>()
            .map_err(|_| "not an IPv6 address")?;
        (ip, after.strip_prefix(':'))
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err("no host");
    }
    if !host_port.starts_with('[')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
    {
        return Err("characters not allowed in the host");
    }
    if let Some(p) = port {
        p.parse::<u16>().map_err(|_| "the port must be 0-65535")?;
    }
    Ok(())
}

/// RFC 3986 unreserved characters, sub-delims and percent signs.
fn is_unreserved_or_sub(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b)
}

/// A byte allowed in a URL's path, query and fragment (RFC 3986).
fn is_uri_byte(b: u8) -> bool {
    is_unreserved_or_sub(b) || b":@/?#".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        for ok in [
            "http://tiles.example.org/1/2/3.png",
            "https://a/",
            "http://127.0.0.1:8080/z/x/y.png?key=abc&x=1",
            "http://[::1]:80/t",
            "HTTP://user:pw@host/t",
            "http://host",
        ] {
            assert_eq!(http_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "ftp://x/",
            "http:///x",
            "http://",
            "x",
            "http://a b/",
            "http://host:99999/",
            "http://host/a b",
            "http://[::1/",
            "http://host:/",
        ] {
            assert!(http_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs() {
        for ok in ["10.0.0.0/8", "fd00::/8", "::1", "1.2.3.4", " 1.2.3.4/32 "] {
            assert!(is_cidr(ok), "{ok}");
        }
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/", "::/129", ""] {
            assert!(!is_cidr(bad), "{bad}");
        }
    }
}
