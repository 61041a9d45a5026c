//! Wiring the caching proxy and tile server (`cache-proxy`) into the agent:
//! its configuration from `rack.toml`, its mesh side, its status.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;

use cache_proxy::{Config, Deps, Proxy, ProxyHandle};
use deploy::config::{BackhaulConfig, ProxyConfig, TileFormat, TileSource};
use deploy::{RackConfig, Role};
use mesh::discovery::{DiscoveryError, Mdns};
use mesh::MeshHandle;
use tokio_util::sync::CancellationToken;

use crate::cache_mesh::CacheMesh;

/// Why the proxy's configuration was refused at start. `rack.toml`'s own
/// validation (`deploy`) refuses everything `cache-proxy` would, so these
/// only fire if the two crates' rules drift apart or a configuration was
/// built in code without validation; even then the field is named, from
/// `cache-proxy`'s typed error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyConfigError {
    /// A witness was given a `[proxy]`: witnesses run no proxy.
    #[error("invalid `proxy`: a witness runs no proxy")]
    OnWitness,
    /// `cache-proxy` refused a value.
    #[error("invalid `{field}`: {source}")]
    Refused {
        /// The dotted field, e.g. `proxy.allow_networks[1]` or
        /// `tile_source[0].url`.
        field: String,
        /// `cache-proxy`'s reason.
        source: cache_proxy::ConfigError,
    },
}

/// The proxy configuration of a rack, or `None` when it runs no proxy (no
/// `[proxy]` table). Relative `cache_dir` and `extra_ca_files` are resolved
/// against `data_dir`; the cache is named after the rack unless
/// `proxy.name` is set; the rack's other sockets are reserved.
///
/// # Errors
/// [`ProxyConfigError`] naming the field: never for a `RackConfig` that
/// `RackConfig::parse` accepted.
pub fn config(rc: &RackConfig) -> Result<Option<Config>, ProxyConfigError> {
    let Some(proxy) = &rc.proxy else {
        return Ok(None);
    };
    if rc.role == Role::Witness {
        return Err(ProxyConfigError::OnWitness);
    }
    let cfg = Config {
        proxy: proxy_settings(proxy, &rc.rack, &rc.data_dir),
        tile_source: rc.tile_source.iter().map(tile_source).collect(),
        reserved_sockets: own_sockets(rc),
    };
    cfg.validate().map_err(|source| ProxyConfigError::Refused {
        field: field_of(&source),
        source,
    })?;
    Ok(Some(cfg))
}

/// `[proxy]` as `cache-proxy` takes it. Destructured without `..`, so a key
/// added to either side and not carried over does not compile.
fn proxy_settings(p: &ProxyConfig, rack: &str, data_dir: &Path) -> cache_proxy::ProxyConfig {
    let ProxyConfig {
        listen,
        name,
        cache_dir,
        max_cache_bytes,
        allow_networks,
        offline,
        allow_destinations,
        connect_ports,
        header_timeout_ms,
        idle_timeout_ms,
        max_connections_per_client,
        max_connections,
        client_requests_per_sec,
        client_request_burst,
        client_tunnel_bytes_per_day,
        backhaul:
            BackhaulConfig {
                bytes_per_sec,
                daily_quota_bytes,
                field_daily_quota_bytes,
                field_bytes_per_sec,
                probe_urls,
                probe_interval_ms,
                probe_interval_down_ms,
                probe_timeout_ms,
                connect_timeout_ms,
                extra_ca_files,
                response_timeout_ms,
                stale_deadline_ms,
                miss_deadline_ms,
            },
    } = p.clone();
    cache_proxy::ProxyConfig {
        listen,
        name: name.unwrap_or_else(|| rack.to_owned()),
        cache_dir: data_dir.join(cache_dir),
        max_cache_bytes,
        allow_networks,
        offline,
        allow_destinations,
        connect_ports,
        header_timeout_ms,
        idle_timeout_ms,
        max_connections_per_client,
        max_connections,
        client_requests_per_sec,
        client_request_burst,
        client_tunnel_bytes_per_day,
        backhaul: cache_proxy::BackhaulConfig {
            bytes_per_sec,
            daily_quota_bytes,
            field_daily_quota_bytes,
            field_bytes_per_sec,
            probe_urls,
            probe_interval_ms,
            probe_interval_down_ms,
            probe_timeout_ms,
            connect_timeout_ms,
            extra_ca_files: extra_ca_files
                .into_iter()
                .map(|ca| data_dir.join(ca))
                .collect(),
            response_timeout_ms,
            stale_deadline_ms,
            miss_deadline_ms,
        },
    }
}

/// One `[[tile_source]]` as `cache-proxy` takes it (destructured like
/// [`proxy_settings`]).
fn tile_source(s: &TileSource) -> cache_proxy::TileSource {
    let TileSource {
        name,
        url,
        format,
        min_zoom,
        max_zoom,
        attribution,
        allow_bulk,
        requests_per_sec,
        user_agent,
    } = s.clone();
    cache_proxy::TileSource {
        name,
        url,
        format: match format {
            TileFormat::Png => cache_proxy::TileFormat::Png,
            TileFormat::Jpg => cache_proxy::TileFormat::Jpg,
            TileFormat::Webp => cache_proxy::TileFormat::Webp,
            TileFormat::Pbf => cache_proxy::TileFormat::Pbf,
        },
        min_zoom,
        max_zoom,
        attribution,
        allow_bulk,
        requests_per_sec,
        user_agent,
    }
}

/// The `rack.toml` field a `cache-proxy` refusal is about, from the
/// error's variant.
fn field_of(e: &cache_proxy::ConfigError) -> String {
    use cache_proxy::ConfigError as E;
    match e {
        E::BadNetwork { index, .. } => format!("proxy.allow_networks[{index}]"),
        E::BadDestination { index, .. } => format!("proxy.allow_destinations[{index}]"),
        E::OutOfRange { field, .. } => format!("proxy.{field}"),
        E::BadName(_) => "proxy.name".into(),
        E::BadTileSource { index, field, .. } => format!("tile_source[{index}].{field}"),
        _ => "proxy".into(),
    }
}

/// The rack's other listening sockets, which the proxy's destination policy
/// always refuses: the admin API's, and the mesh's (from its multiaddrs,
/// `/ip4/0.0.0.0/udp/7400/quic-v1`; a port 0 is not known in advance).
pub fn own_sockets(rc: &RackConfig) -> Vec<std::net::SocketAddr> {
    let mut v: Vec<std::net::SocketAddr> = rc.api.listen.parse().ok().into_iter().collect();
    for ma in &rc.mesh.listen {
        let parts: Vec<&str> = ma.split('/').collect();
        let ip = parts.windows(2).find_map(|w| match w[0] {
            "ip4" | "ip6" => w[1].parse::<std::net::IpAddr>().ok(),
            _ => None,
        });
        let port = parts.windows(2).find_map(|w| match w[0] {
            "udp" | "tcp" => w[1].parse::<u16>().ok(),
            _ => None,
        });
        if let (Some(ip), Some(port)) = (ip, port) {
            if port != 0 {
                v.push(std::net::SocketAddr::new(ip, port));
            }
        }
    }
    v
}

/// DNS-SD service type under which racks advertise their proxy and tile
/// server: the generic HTTP type, so ordinary clients and tools find it.
pub const PROXY_SERVICE: &str = "_http._tcp.local.";

/// Advertise the proxy on the local segment, on the process's shared mDNS
/// daemon (withdrawn when the daemon shuts down). A proxy that listens on
/// loopback only is not advertised (nobody else could reach it).
///
/// # Errors
/// If mdns-sd cannot start or register.
pub fn advertise(
    mdns: &Mdns,
    rack: &str,
    listen: std::net::SocketAddr,
) -> Result<(), DiscoveryError> {
    if listen.ip().is_loopback() {
        return Ok(());
    }
    let daemon = mdns.daemon()?;
    let props: std::collections::HashMap<String, String> = [
        ("txtvers", "1"),
        ("path", "/proxy.pac"),
        ("pac", "/proxy.pac"),
        ("tiles", "/tiles"),
        ("fieldrack", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain(std::iter::once(("rack".to_string(), rack.to_string())))
    .collect();
    let instance = format!("Fieldrack {rack} proxy and maps");
    let host = format!("fieldrack-{rack}-proxy.local.");
    let info = if listen.ip().is_unspecified() {
        mdns_sd::ServiceInfo::new(PROXY_SERVICE, &instance, &host, "", listen.port(), props)?
            .enable_addr_auto()
    } else {
        mdns_sd::ServiceInfo::new(
            PROXY_SERVICE,
            &instance,
            &host,
            listen.ip().to_string().as_str(),
            listen.port(),
            props,
        )?
    };
    daemon.register(info)?;
    Ok(())
}

/// Browse the segment for racks' proxies for `wait`; returns
/// `(rack, "ip:port")` pairs.
///
/// # Errors
/// If mdns-sd cannot start.
pub async fn discover(wait: std::time::Duration) -> Result<Vec<(String, String)>, mdns_sd::Error> {
    let daemon = mdns_sd::ServiceDaemon::new()?;
    let rx = daemon.browse(PROXY_SERVICE)?;
    let mut found = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok(ev)) = tokio::time::timeout_at(deadline, rx.recv_async()).await {
        if let mdns_sd::ServiceEvent::ServiceResolved(svc) = ev {
            if svc.txt_properties.get_property_val_str("fieldrack") != Some("1") {
                continue;
            }
            let rack = svc
                .txt_properties
                .get_property_val_str("rack")
                .unwrap_or("?")
                .to_string();
            for ip in svc
                .get_addresses_v4()
                .into_iter()
                .filter(|ip| !ip.is_loopback())
            {
                let entry = (rack.clone(), format!("{ip}:{}", svc.port));
                if !found.contains(&entry) {
                    found.push(entry);
                }
            }
        }
    }
    let _ = daemon.shutdown();
    Ok(found)
}

/// A running proxy: its handle and mesh side.
pub struct RunningProxy {
    /// Status, metrics, seeding, the offline switch.
    pub handle: ProxyHandle,
    /// Digests, peer fetches, replication.
    pub mesh: Arc<CacheMesh>,
}

/// Bind the proxy and start it and its mesh side.
///
/// # Errors
/// If it cannot bind its address or open its store.
pub async fn start(
    cfg: Config,
    site: &str,
    mesh: MeshHandle,
    mdns: &Mdns,
    console: crate::console::Console,
    tasks: &mut tokio::task::JoinSet<()>,
    cancel: CancellationToken,
) -> anyhow::Result<RunningProxy> {
    let (cache_mesh, replicate_rx) = CacheMesh::new(mesh, site);
    let deps = Deps {
        peers: cache_mesh.clone(),
        replicator: cache_mesh.clone(),
        gateways: cache_mesh.clone(),
        local_site: Some(Arc::new(console)),
        ..Deps::default()
    };
    let listen = cfg.proxy.listen;
    let name = cfg.proxy.name.clone();
    let proxy = Proxy::bind(cfg, deps)
        .await
        .with_context(|| format!("starting the proxy on {listen}"))?;
    let handle = proxy.handle();
    tracing::info!(addr = %proxy.local_addr(), "proxy and tile server up");
    if let Err(e) = advertise(mdns, &name, proxy.local_addr()) {
        tracing::warn!(error = %e, "could not advertise the proxy by mDNS");
    }
    tasks.spawn(proxy.run(cancel.clone()));
    tasks.spawn(cache_mesh.clone().run(handle.clone(), replicate_rx, cancel));
    Ok(RunningProxy {
        handle,
        mesh: cache_mesh,
    })
}

/// The proxy's budget asks for and takes the field's backhaul grants.
impl crate::supervisor::BackhaulQuota for cache_proxy::ProxyHandle {
    fn ask(&self) -> Option<control::backhaul::BackhaulUse> {
        self.field_ask().map(|a| control::backhaul::BackhaulUse {
            day: a.day,
            field_quota_bytes: a.field_quota_bytes,
            used_today_bytes: a.used_today_bytes,
            want_bytes: a.want_bytes,
            release: a.release,
        })
    }

    fn granted(&self, day: u64, granted: Option<u64>) {
        self.set_field_grant(day, granted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HEAD: &str = "rack = \"a\"\ndata_dir = \"/srv/rack\"\n[fleet]\nname = \"haiti\"\npublic_key = \"11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\"\n";

    /// `[proxy]` and `[[tile_source]]` with every key set to something
    /// other than its default (absolute paths, so nothing is resolved).
    const EVERY_KEY: &str = r#"
[proxy]
listen = "0.0.0.0:3129"
name = "rack-a.cache"
cache_dir = "/var/cache/fieldrack"
max_cache_bytes = 1000000
allow_networks = ["10.0.0.0/8", "fd00::/8"]
offline = true
allow_destinations = ["10.20.0.0/16"]
connect_ports = [443, 8443]
header_timeout_ms = 5000
idle_timeout_ms = 60000
max_connections_per_client = 32
max_connections = 1000
client_requests_per_sec = 50
client_request_burst = 200
client_tunnel_bytes_per_day = 2000000000
[proxy.backhaul]
bytes_per_sec = 100000
daily_quota_bytes = 5000000000
field_daily_quota_bytes = 20000000000
field_bytes_per_sec = 400000
probe_urls = ["http://probe.example.org/ok"]
probe_interval_ms = 20000
probe_interval_down_ms = 2000
probe_timeout_ms = 3000
connect_timeout_ms = 4000
extra_ca_files = ["/etc/fieldrack/agency-ca.pem"]
response_timeout_ms = 25000
stale_deadline_ms = 700
miss_deadline_ms = 3000

[[tile_source]]
name = "hot"
url = "https://tiles.example.org:8443/{z}/{x}/{y}.pbf?key=k"
format = "pbf"
min_zoom = 2
max_zoom = 14
attribution = "(c) OpenStreetMap contributors"
allow_bulk = true
requests_per_sec = 2
user_agent = "fieldrack/0.1 (ops@example.org)"
"#;

    fn rack(text: &str) -> RackConfig {
        RackConfig::parse(text, Path::new("rack.toml")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The keys of a serialized object whose values differ.
    fn differing(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return vec![];
        };
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Every key of `[proxy]`, `[proxy.backhaul]` and `[[tile_source]]`
    /// reaches cache-proxy with the value cache-proxy itself would read
    /// from the same text, and the text sets every key cache-proxy has.
    #[test]
    fn every_proxy_key_reaches_cache_proxy() {
        let converted = config(&rack(&format!("{HEAD}{EVERY_KEY}")))
            .unwrap()
            .unwrap();
        let direct: Config = toml::from_str(EVERY_KEY).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(converted.proxy, direct.proxy);
        assert_eq!(converted.tile_source, direct.tile_source);

        let json = |v: serde_json::Result<serde_json::Value>| v.unwrap();
        let proxy = json(serde_json::to_value(&direct.proxy));
        let default_proxy = json(serde_json::to_value(cache_proxy::ProxyConfig::default()));
        let mut same: Vec<String> = proxy
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| !differing(&proxy, &default_proxy).contains(k))
            .cloned()
            .collect();
        let backhaul = &proxy["backhaul"];
        let default_backhaul = &default_proxy["backhaul"];
        same.extend(
            backhaul
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| !differing(backhaul, default_backhaul).contains(k))
                .map(|k| format!("backhaul.{k}")),
        );
        let source = json(serde_json::to_value(&direct.tile_source[0]));
        let default_source: serde_json::Value = serde_json::to_value(
            toml::from_str::<cache_proxy::TileSource>("name = \"hot\"\nurl = \"u\"").unwrap(),
        )
        .unwrap();
        same.extend(
            source
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "name" && *k != "url")
                .filter(|k| !differing(&source, &default_source).contains(k))
                .map(|k| format!("tile_source.{k}")),
        );
        assert_eq!(
            same,
            Vec::<String>::new(),
            "keys the test leaves at their default"
        );
    }

    /// A bare `[proxy]` runs on cache-proxy's defaults, named after the
    /// rack, its cache in the data directory.
    #[test]
    fn a_bare_proxy_table_gets_cache_proxys_defaults() {
        let cfg = config(&rack(&format!("{HEAD}[proxy]\n"))).unwrap().unwrap();
        let want = cache_proxy::ProxyConfig {
            name: "a".into(),
            cache_dir: "/srv/rack/cache".into(),
            ..cache_proxy::ProxyConfig::default()
        };
        assert_eq!(cfg.proxy, want);
        assert!(cfg.tile_source.is_empty());
        let source = config(&rack(&format!(
            "{HEAD}[proxy]\n[[tile_source]]\nname = \"t\"\nurl = \"http://x/{{z}}/{{x}}/{{y}}.png\"\n"
        )))
        .unwrap()
        .unwrap();
        let direct: cache_proxy::TileSource =
            toml::from_str("name = \"t\"\nurl = \"http://x/{z}/{x}/{y}.png\"").unwrap();
        assert_eq!(source.tile_source, vec![direct]);
        assert!(config(&rack(HEAD)).unwrap().is_none());
    }

    #[test]
    fn relative_paths_resolve_against_data_dir() {
        let cfg = config(&rack(&format!(
            "{HEAD}[proxy]\ncache_dir = \"c\"\n[proxy.backhaul]\nextra_ca_files = [\"ca.pem\", \"/etc/ca.pem\"]\n"
        )))
        .unwrap()
        .unwrap();
        assert_eq!(cfg.proxy.cache_dir, Path::new("/srv/rack/c"));
        assert_eq!(
            cfg.proxy.backhaul.extra_ca_files,
            vec![
                std::path::PathBuf::from("/srv/rack/ca.pem"),
                "/etc/ca.pem".into()
            ]
        );
    }

    /// deploy's limits are cache-proxy's.
    #[test]
    fn limits_agree() {
        use deploy::config::limits;
        assert_eq!(
            limits::MAX_PROXY_CONNECTIONS,
            cache_proxy::server::MAX_CONNECTIONS as u64
        );
        assert_eq!(limits::MAX_ZOOM, cache_proxy::tiles::MAX_ZOOM);
    }

    /// A configuration built in code, past deploy's validation, is still
    /// refused by cache-proxy's check, naming the field from its variant.
    #[test]
    fn unvalidated_values_are_refused_naming_the_field() {
        let mut rc = rack(&format!("{HEAD}[proxy]\n"));
        /// A change made in code, past validation.
        type Edit = fn(&mut RackConfig);
        let cases: Vec<(Edit, &str)> = vec![
            (
                |rc| rc.proxy.as_mut().unwrap().allow_networks.push("x".into()),
                "proxy.allow_networks[2]",
            ),
            (
                |rc| rc.proxy.as_mut().unwrap().header_timeout_ms = 0,
                "proxy.header_timeout_ms",
            ),
            (
                |rc| rc.proxy.as_mut().unwrap().name = Some("a b".into()),
                "proxy.name",
            ),
            (
                |rc| {
                    rc.tile_source.push(TileSource {
                        name: "t".into(),
                        url: "http://x/{z}/{x}".into(),
                        format: TileFormat::Png,
                        min_zoom: 0,
                        max_zoom: 1,
                        attribution: String::new(),
                        allow_bulk: false,
                        requests_per_sec: 1,
                        user_agent: "u".into(),
                    })
                },
                "tile_source[0].url",
            ),
        ];
        for (edit, field) in cases {
            let mut bad = rc.clone();
            edit(&mut bad);
            match config(&bad) {
                Err(ProxyConfigError::Refused { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        rc.role = Role::Witness;
        assert!(matches!(config(&rc), Err(ProxyConfigError::OnWitness)));
    }

    #[test]
    fn the_api_and_mesh_sockets_are_reserved() {
        let text = "rack = \"a\"\n[fleet]\nname = \"haiti\"\npublic_key = \"11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\"\n\
                    [api]\nlisten = \"127.0.0.1:7480\"\n\
                    [mesh]\nlisten = [\"/ip4/0.0.0.0/udp/7400/quic-v1\", \"/ip6/::/udp/0/quic-v1\"]\n\
                    [proxy]\nlisten = \"127.0.0.1:0\"\n";
        let rc = RackConfig::parse(text, std::path::Path::new("rack.toml")).unwrap();
        let want: Vec<std::net::SocketAddr> = vec![
            "127.0.0.1:7480".parse().unwrap(),
            "0.0.0.0:7400".parse().unwrap(),
        ];
        assert_eq!(own_sockets(&rc), want);
        let cfg = config(&rc).unwrap().unwrap();
        assert_eq!(cfg.reserved_sockets, want);
    }

    /// A TOML string literal of `s`.
    fn quoted(s: &str) -> String {
        toml::Value::String(s.to_owned()).to_string()
    }

    /// Mostly values every proxy knob accepts, sometimes one across an
    /// edge, so that accepted configurations are common.
    fn number() -> impl Strategy<Value = i64> {
        prop_oneof![
            6 => 100i64..=4096,
            1 => prop::sample::select(vec![
                0i64, 99, 4097, 600_000, 600_001, 3_600_001, 86_400_001, i64::MAX,
            ]),
        ]
    }

    fn cidr() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(vec!["10.0.0.0/8", "fd00::/8", "::1", "192.168.1.7"])
                .prop_map(String::from),
            1 => "[0-9a-f:./ ]{0,16}",
        ]
    }

    /// URLs from plausible to hostile, for probes and tile templates.
    fn url() -> impl Strategy<Value = String> {
        (
            prop_oneof![
                4 => prop::sample::select(vec!["http", "https", "HTTP"]),
                1 => prop::sample::select(vec!["ftp", "", "http:"]),
            ],
            prop_oneof![
                3 => "[a-z0-9.-]{1,10}(:[0-9]{1,5})?",
                1 => "\\[::[0-9a-f]{0,4}\\](:[0-9]{0,6})?",
                1 => "[a-z0-9.:@\\[\\]_~%-]{0,14}",
            ],
            prop_oneof![
                3 => "[a-zA-Z0-9._~/?&=%-]{0,10}",
                1 => "[ -~]{0,12}",
                1 => "[\\x00-\\x7f]{0,4}",
            ],
        )
            .prop_map(|(scheme, authority, tail)| {
                format!("{scheme}://{authority}/{{z}}/{{x}}/{{y}}{tail}")
            })
    }

    fn proxy_text() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "header_timeout_ms",
                        "idle_timeout_ms",
                        "max_connections_per_client",
                        "max_connections",
                        "client_requests_per_sec",
                        "client_request_burst",
                    ]),
                    number(),
                ),
                0..3,
            ),
            prop_oneof![
                2 => Just(None),
                2 => "[a-zA-Z0-9._-]{1,10}".prop_map(Some),
                1 => "[ -~]{0,8}".prop_map(Some),
            ],
            prop::collection::vec(cidr(), 0..3),
            prop::collection::vec(prop_oneof![6 => 1u16..3, 1 => Just(0u16)], 0..3),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "probe_interval_ms",
                        "probe_interval_down_ms",
                        "probe_timeout_ms",
                        "connect_timeout_ms",
                        "response_timeout_ms",
                        "stale_deadline_ms",
                        "miss_deadline_ms",
                    ]),
                    number(),
                ),
                0..3,
            ),
            prop::collection::vec(url(), 0..2),
        )
            .prop_map(|(numbers, name, cidrs, ports, backhaul, probes)| {
                let mut t = String::from("[proxy]\n");
                let mut keys = std::collections::HashSet::new();
                for (k, v) in numbers {
                    if keys.insert(k) {
                        t.push_str(&format!("{k} = {v}\n"));
                    }
                }
                if let Some(n) = name {
                    t.push_str(&format!("name = {}\n", quoted(&n)));
                }
                let list =
                    |v: &[String]| v.iter().map(|s| quoted(s)).collect::<Vec<_>>().join(", ");
                t.push_str(&format!("allow_destinations = [{}]\n", list(&cidrs)));
                let ports: Vec<String> = ports.iter().map(|p| (p * 443).to_string()).collect();
                t.push_str(&format!(
                    "connect_ports = [{}]\n[proxy.backhaul]\n",
                    ports.join(", ")
                ));
                for (k, v) in backhaul {
                    if keys.insert(k) {
                        t.push_str(&format!("{k} = {v}\n"));
                    }
                }
                let probes: Vec<String> =
                    probes.iter().map(|u| u.replace(['{', '}'], "")).collect();
                t.push_str(&format!("probe_urls = [{}]\n", list(&probes)));
                t
            })
    }

    fn tile_source_text() -> impl Strategy<Value = String> {
        (
            prop_oneof![4 => "[a-z0-9_-]{1,6}", 1 => "[a-zA-Z0-9_ -]{0,6}"],
            url(),
            prop::sample::select(vec!["png", "pbf", "jpg", "webp"]),
            0u8..12,
            prop_oneof![4 => 12u8..=24, 1 => 0u8..30],
            prop_oneof![4 => "[ -~]{1,12}", 1 => "[\\x00-\\x7f]{0,6}"],
        )
            .prop_map(|(name, url, format, min, max, ua)| {
                format!(
                    "[[tile_source]]\nname = {}\nurl = {}\nformat = \"{format}\"\nmin_zoom = {min}\nmax_zoom = {max}\nuser_agent = {}\n",
                    quoted(&name),
                    quoted(&url),
                    quoted(&ua)
                )
            })
    }

    proptest! {
        /// Whatever rack.toml's validation accepts converts into a
        /// cache-proxy configuration that cache-proxy accepts too, without
        /// a panic: the conversion only fails on values deploy refuses.
        #[test]
        fn validated_configs_always_convert(
            proxy in proxy_text(),
            sources in prop::collection::vec(tile_source_text(), 0..3),
        ) {
            let text = format!("{HEAD}{proxy}\n{}", sources.join("\n"));
            if let Ok(rc) = RackConfig::parse(&text, Path::new("rack.toml")) {
                let converted = config(&rc);
                prop_assert!(matches!(converted, Ok(Some(_))), "{converted:?} for\n{text}");
            }
        }
    }
}
