//! Wiring the caching proxy and tile server (`cache-proxy`) into the agent:
//! its configuration from `rack.toml`, its mesh side, its status.

use std::sync::Arc;

use anyhow::Context as _;

use cache_proxy::{Config, Deps, Proxy, ProxyHandle};
use deploy::{RackConfig, Role};
use mesh::discovery::{DiscoveryError, Mdns};
use mesh::MeshHandle;
use tokio_util::sync::CancellationToken;

use crate::cache_mesh::CacheMesh;

/// Why `[proxy]` / `[[tile_source]]` were refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid `{field}`: {reason}")]
pub struct ProxyConfigError {
    /// The field, e.g. `proxy.listen` or `tile_source[0].url`.
    pub field: String,
    /// Why.
    pub reason: String,
}

/// The proxy configuration of a rack, or `None` when it runs no proxy (no
/// `[proxy]` table, or a witness). Relative `cache_dir`s are resolved
/// against `data_dir`; the cache is named after the rack unless set.
///
/// # Errors
/// [`ProxyConfigError`] naming the field.
pub fn config(rc: &RackConfig) -> Result<Option<Config>, ProxyConfigError> {
    let Some(proxy) = rc.proxy.clone() else {
        return Ok(None);
    };
    if rc.role == Role::Witness {
        return Err(ProxyConfigError {
            field: "proxy".into(),
            reason: "a witness runs no proxy".into(),
        });
    }
    let mut proxy = proxy;
    proxy
        .entry("name")
        .or_insert_with(|| toml::Value::String(rc.rack.clone()));
    let mut doc = toml::Table::new();
    doc.insert("proxy".into(), toml::Value::Table(proxy));
    doc.insert(
        "tile_source".into(),
        toml::Value::Array(
            rc.tile_source
                .iter()
                .cloned()
                .map(toml::Value::Table)
                .collect(),
        ),
    );
    let mut cfg: Config = toml::Value::Table(doc)
        .try_into()
        .map_err(|e: toml::de::Error| {
            let msg = e.to_string().replace('\n', " ");
            ProxyConfigError {
                field: field_of(&msg),
                reason: msg,
            }
        })?;
    if cfg.proxy.cache_dir.is_relative() {
        cfg.proxy.cache_dir = rc.data_dir.join(&cfg.proxy.cache_dir);
    }
    for ca in &mut cfg.proxy.backhaul.extra_ca_files {
        if ca.is_relative() {
            *ca = rc.data_dir.join(&*ca);
        }
    }
    cfg.reserved_sockets = own_sockets(rc);
    cfg.validate().map_err(|e| {
        let msg = e.to_string();
        ProxyConfigError {
            field: field_of(&msg),
            reason: msg,
        }
    })?;
    Ok(Some(cfg))
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

/// Best effort: the first `word.word` or `tile_source[N]...` in a message.
fn field_of(msg: &str) -> String {
    msg.split(|c: char| c.is_whitespace() || c == '`' || c == '\'' || c == '"')
        .find(|w| w.starts_with("proxy") || w.starts_with("tile_source"))
        .map(|w| w.trim_end_matches([':', ',']).to_string())
        .unwrap_or_else(|| "proxy".into())
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
