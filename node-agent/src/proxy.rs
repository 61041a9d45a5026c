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
        backhaul:
            BackhaulConfig {
                bytes_per_sec,
                daily_quota_bytes,
                probe_urls,
                probe_interval_ms,
                probe_interval_down_ms,
                probe_timeout_ms,
                connect_timeout_ms,
                extra_ca_files,
                response_timeout_ms,
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
        backhaul: cache_proxy::BackhaulConfig {
            bytes_per_sec,
            daily_quota_bytes,
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
    tasks: &mut tokio::task::JoinSet<()>,
    cancel: CancellationToken,
) -> anyhow::Result<RunningProxy> {
    let (cache_mesh, replicate_rx) = CacheMesh::new(mesh, site);
    let deps = Deps {
        peers: cache_mesh.clone(),
        replicator: cache_mesh.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
