//! Wiring the caching proxy and tile server (`cache-proxy`) into the agent:
//! its configuration from `rack.toml`, its mesh side, its status.

use std::sync::Arc;

use cache_proxy::{Config, Deps, Proxy, ProxyHandle};
use deploy::{RackConfig, Role};
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
    cfg.validate().map_err(|e| {
        let msg = e.to_string();
        ProxyConfigError {
            field: field_of(&msg),
            reason: msg,
        }
    })?;
    Ok(Some(cfg))
}

/// Best effort: the first `word.word` or `tile_source[N]...` in a message.
fn field_of(msg: &str) -> String {
    msg.split(|c: char| c.is_whitespace() || c == '`' || c == '\'' || c == '"')
        .find(|w| w.starts_with("proxy") || w.starts_with("tile_source"))
        .map(|w| w.trim_end_matches([':', ',']).to_string())
        .unwrap_or_else(|| "proxy".into())
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
    mesh: MeshHandle,
    tasks: &mut tokio::task::JoinSet<()>,
    cancel: CancellationToken,
) -> anyhow::Result<RunningProxy> {
    let (cache_mesh, replicate_rx) = CacheMesh::new(mesh);
    let deps = Deps {
        peers: cache_mesh.clone(),
        replicator: cache_mesh.clone(),
        ..Deps::default()
    };
    let listen = cfg.proxy.listen;
    let proxy = Proxy::bind(cfg, deps)
        .await
        .map_err(|e| anyhow::anyhow!("starting the proxy on {listen}: {e}"))?;
    let handle = proxy.handle();
    tracing::info!(addr = %proxy.local_addr(), "proxy and tile server up");
    tasks.spawn(proxy.run(cancel.clone()));
    tasks.spawn(cache_mesh.clone().run(handle.clone(), replicate_rx, cancel));
    Ok(RunningProxy {
        handle,
        mesh: cache_mesh,
    })
}
