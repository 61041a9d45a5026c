//! The rack's caching HTTP proxy and offline map tile server.
//!
//! Relief staff point laptops, phones and map apps at the nearest rack. The
//! satellite backhaul is slow, metered and often down; the mesh of racks is
//! the next best source. This crate makes the best of both and keeps maps
//! working with no backhaul at all.
//!
//! Entry point: [`run`] (or [`Proxy::bind`] + [`Proxy::run`] to learn the
//! bound address first), with [`Config`] (the `[proxy]` table and the
//! `[[tile_source]]` array of `rack.toml`) and [`Deps`] (the mesh, through
//! [`mesh::PeerDirectory`] and [`mesh::Replicator`]). A [`ProxyHandle`]
//! gives the agent status, metrics, the offline switch, digests and the
//! peer-facing side of the mesh.
//!
//! Layout:
//! - [`config`]: configuration types.
//! - [`http_cache`]: RFC 9111/5861/9211 semantics, sans-IO.
//! - [`store`]: packed, deduplicated, crash-safe object store (SQLite index).
//! - [`flight`]: one upstream fetch per key, streamed to every waiter.
//! - [`upstream`]: HTTP/1.1 client with connect timeouts and a pool.
//! - [`health`]: link health (probes + passive), offline decisions.
//! - [`budget`]: backhaul token buckets and daily quota.
//! - [`gateway`]: the shared backhaul (misses through another rack's uplink).
//! - [`mesh`]: peer traits, no-op implementations, the key digest.
//! - [`tiles`]: tile paths, URL templates, TileJSON, bbox → tiles.
//! - [`seed`]: bulk seeding of a region (resumable, rate-limited).
//! - [`mbtiles`]: MBTiles and PMTiles import (pinned, offline-ready), MBTiles export.
//! - [`pmtiles`]: PMTiles v3 reader (validating) and a minimal writer.
//! - [`policy`]: where the proxy may connect on a client's behalf (sans-IO).
//! - [`listener`]: connection caps (global, per client) and idle timeouts.
//! - [`client_limits`]: request rate and tunnel bytes per client (sans-IO).
//! - [`engine`]: the caching pipeline.
//! - [`server`]: hyper server, routing, CONNECT, PAC, prober.
//! - [`site`]: the map viewer's pages and endpoints, the console hook
//!   ([`LocalSite`]).
//! - [`stats`]: status document and Prometheus counters.

pub mod budget;
pub mod client_limits;
pub mod config;
pub mod engine;
pub mod flight;
pub mod gateway;
pub mod health;
pub mod http_cache;
pub mod listener;
pub mod mbtiles;
pub mod mesh;
pub mod pmtiles;
pub mod policy;
pub mod seed;
pub mod server;
pub mod site;
pub mod stats;
pub mod store;
pub mod tiles;
pub mod upstream;

#[cfg(test)]
mod fuzz_seeds;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{BackhaulConfig, Cidr, Config, ConfigError, ProxyConfig, TileFormat, TileSource};
pub use gateway::{
    ForwardRequest, ForwardResponse, Gateways, NoGateways, TunnelOpen, UplinkReport,
};
pub use health::UplinkState;
pub use mesh::{KeyDigest, NoPeers, NoReplication, PeerDirectory, PeerId, PeerObject, Replicator};
pub use site::LocalSite;
pub use stats::{CacheStatusDoc, Snapshot};
pub use store::{key_hash, KeyHash, Object, ObjectMeta, Store, StoreOptions};

use engine::{Engine, RateLimiter};

/// What the proxy needs from the rest of the agent.
#[derive(Clone)]
pub struct Deps {
    /// Who in the mesh may hold a key.
    pub peers: Arc<dyn PeerDirectory>,
    /// Copies fresh tiles to other racks.
    pub replicator: Arc<dyn Replicator>,
    /// Other racks' uplinks (the shared backhaul).
    pub gateways: Arc<dyn Gateways>,
    /// Wall clock, Unix seconds (tests inject one).
    pub clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Serves `/console/api/` (the agent's operator console); none: 404.
    pub local_site: Option<Arc<dyn LocalSite>>,
}

impl Default for Deps {
    fn default() -> Self {
        Deps {
            peers: Arc::new(NoPeers),
            replicator: Arc::new(NoReplication),
            gateways: Arc::new(NoGateways),
            clock: Arc::new(store::system_clock),
            local_site: None,
        }
    }
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps").finish_non_exhaustive()
    }
}

/// Failure to start the proxy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The cache directory or index could not be opened.
    #[error("opening the cache: {0}")]
    Store(#[from] store::OpenError),
    /// An extra CA file could not be used.
    #[error("trusted CA files: {0}")]
    Tls(#[from] upstream::TlsConfigError),
    /// The listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// A bound, not yet running proxy.
pub struct Proxy {
    listener: TcpListener,
    engine: Arc<Engine>,
    config: Config,
    local_addr: SocketAddr,
    local_site: Option<Arc<dyn LocalSite>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

/// The agent's handle on a running proxy; cheap to clone.
#[derive(Clone)]
pub struct ProxyHandle {
    engine: Arc<Engine>,
    cache_dir: PathBuf,
}

impl std::fmt::Debug for ProxyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHandle").finish_non_exhaustive()
    }
}

impl ProxyHandle {
    /// Everything, for metrics.
    pub fn snapshot(&self) -> Snapshot {
        let e = &self.engine;
        Snapshot::new(
            &e.counters,
            e.store.stats(),
            e.budget.stats(),
            e.health.backhaul_up(),
            e.health.forced_offline(),
            e.flights.len() as u64,
            e.flights.bytes_held(),
            e.health.state(),
            e.health.srtt().map(|d| d.as_millis() as u64),
        )
    }

    /// The `cache` object of the status JSON.
    pub fn status(&self) -> CacheStatusDoc {
        self.snapshot().status()
    }

    /// Prometheus text.
    pub fn prometheus(&self) -> String {
        self.snapshot().prometheus()
    }

    /// What this rack tells the others about its uplink.
    pub fn uplink_report(&self) -> UplinkReport {
        let e = &self.engine;
        let stats = e.budget.stats();
        let (day, used_today_bytes) = e.budget.today();
        let left = match (stats.left_today_bytes, stats.field_left_today_bytes) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        UplinkReport {
            state: e.health.state(),
            rtt_ms: e.health.srtt().map(|d| d.as_millis() as u64),
            budget_left_bytes: left,
            day,
            used_today_bytes,
        }
    }

    /// What this rack's uplink used of the field's backhaul quota and asks
    /// for, for the control plane (call once per renewal); `None` without
    /// a field quota. While the uplink is down it gives back the unused
    /// part of its grant instead (see [`budget::BudgetCore::field_ask`] and
    /// [`budget::BudgetCore::field_release`]).
    pub fn field_ask(&self) -> Option<budget::FieldAsk> {
        let h = &self.engine.health;
        if h.state() == health::UplinkState::Down {
            return self.engine.budget.field_release();
        }
        self.engine.budget.field_ask(h.srtt().is_some())
    }

    /// The control plane's grant of the field's quota to this rack's
    /// uplink (see [`budget::BudgetCore::set_field_grant`]).
    pub fn set_field_grant(&self, day: u64, granted: Option<u64>) {
        self.engine.budget.set_field_grant(day, granted);
    }

    /// Takes in the other racks' last uplink reports (all of them, each
    /// time; `fresh`: younger than [`gateway::REPORT_MAX_AGE`]), for the
    /// field's budget.
    pub fn note_peer_reports(&self, reports: &[(UplinkReport, bool)]) {
        let peers: Vec<budget::PeerUse> = reports
            .iter()
            .map(|(r, fresh)| budget::PeerUse {
                day: r.day,
                used_today_bytes: r.used_today_bytes,
                uplink_in_use: *fresh && r.state != health::UplinkState::Down,
            })
            .collect();
        self.engine.budget.note_peers(&peers);
    }

    /// Serves another rack's request through this rack's uplink (see
    /// [`gateway::serve_forwarded`]).
    /// `origin` is the requesting rack, as the mesh authenticated it.
    pub async fn serve_forwarded(&self, origin: &str, req: ForwardRequest) -> ForwardResponse {
        gateway::serve_forwarded(&self.engine, origin, req).await
    }

    /// Opens a `CONNECT` tunnel for another rack's client through this
    /// rack's uplink (see [`gateway::open_tunnel`]); `origin` is the
    /// requesting rack, as the mesh authenticated it.
    ///
    /// # Errors
    /// The answer to pass to the client when refused or failed.
    pub async fn open_tunnel(
        &self,
        origin: &str,
        host: &str,
        port: u16,
        client: std::net::IpAddr,
    ) -> Result<gateway::OpenedTunnel, ForwardResponse> {
        gateway::open_tunnel(&self.engine, origin, host, port, client).await
    }

    /// The operator's offline switch (overrides `proxy.offline` until restart).
    pub fn set_forced_offline(&self, on: bool) {
        self.engine.health.set_forced_offline(on);
    }

    /// A digest of every key held, for peers. Blocking-ish: iterates the
    /// index (about a second per million keys); call from `spawn_blocking`.
    pub fn digest(&self, fp_rate: f64) -> KeyDigest {
        let mut keys = Vec::with_capacity(self.engine.store.stats().objects as usize);
        self.engine.store.for_each_key(|k| keys.push(*k));
        KeyDigest::for_keys(keys.iter(), fp_rate)
    }

    /// Serves a peer's fetch: the object if held and intact.
    pub fn lookup(&self, key: &KeyHash) -> Option<PeerObject> {
        let o = self.engine.store.get(key).ok()??;
        Some(PeerObject {
            meta: o.meta,
            body: o.body,
        })
    }

    /// Stores an object replicated to us by a peer (`pinned` for site-wide
    /// pinned regions).
    ///
    /// # Errors
    /// Store errors.
    pub async fn accept_replica(
        &self,
        key: KeyHash,
        mut object: PeerObject,
        pinned: bool,
    ) -> Result<(), store::StoreError> {
        object.meta.pinned = pinned;
        self.engine.store.put(key, object.meta, object.body).await
    }

    /// Seeds a region (see [`seed`]): pinned, resumable, rate-limited.
    ///
    /// # Errors
    /// See [`seed::SeedError`].
    pub async fn seed(
        &self,
        plan: &seed::SeedPlan,
        progress: impl FnMut(&seed::SeedProgress),
    ) -> Result<seed::SeedProgress, seed::SeedError> {
        seed::seed(&self.engine, &self.cache_dir, plan, progress).await
    }

    /// The object store (for seeding, import and export).
    pub fn store(&self) -> &Store {
        &self.engine.store
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &std::path::Path {
        &self.cache_dir
    }
}

/// The destination policy of a proxy listening on `listen`.
fn build_policy(config: &Config, listen: SocketAddr) -> policy::Policy {
    let p = &config.proxy;
    policy::Policy {
        allow: p
            .allow_destinations
            .iter()
            .filter_map(|c| Cidr::parse(c))
            .collect(),
        connect_ports: p.connect_ports.clone(),
        own_sockets: std::iter::once(listen)
            .chain(config.reserved_sockets.iter().copied())
            .collect(),
    }
}

fn build_engine(config: &Config, deps: Deps, store: Store, listen: SocketAddr) -> Arc<Engine> {
    let p = &config.proxy;
    let health = health::Health::new(p.offline);
    let client = upstream::Client::new(
        health.clone(),
        Duration::from_millis(p.backhaul.connect_timeout_ms),
        Duration::from_millis(p.backhaul.response_timeout_ms),
        Arc::new(build_policy(config, listen)),
    );
    let limiters: HashMap<String, Arc<RateLimiter>> = config
        .tile_source
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                Arc::new(RateLimiter::new(s.requests_per_sec)),
            )
        })
        .collect();
    Arc::new(Engine {
        name: p.name.clone(),
        sources: config.tile_source.clone(),
        store,
        flights: Arc::default(),
        client,
        health,
        budget: budget::Budget::with_core(
            budget::BudgetCore::with_field(
                p.backhaul.bytes_per_sec,
                p.backhaul.daily_quota_bytes,
                p.backhaul.field_bytes_per_sec,
                p.backhaul.field_daily_quota_bytes,
            ),
            deps.clock.clone(),
        ),
        counters: stats::Counters::default(),
        peers: deps.peers,
        replicator: deps.replicator,
        limiters,
        clock: deps.clock,
        tasks: TaskTracker::new(),
        background: Arc::new(Semaphore::new(engine::MAX_BACKGROUND_REVALIDATIONS)),
        stale_deadline: Duration::from_millis(p.backhaul.stale_deadline_ms),
        miss_deadline: Duration::from_millis(p.backhaul.miss_deadline_ms),
        gateways: deps.gateways,
        forward_permits: Arc::new(Semaphore::new(gateway::MAX_FORWARDED)),
        forward_slots: listener::ClientSlots::new(gateway::MAX_FORWARDED_PER_CLIENT),
        forward_shares: gateway::ForwardShares::new(gateway::MAX_FORWARDED),
        client_limits: client_limits::ClientLimits::new(
            p.client_requests_per_sec,
            p.client_request_burst,
            p.client_tunnel_bytes_per_day,
        ),
    })
}

impl Proxy {
    /// Validates the config, opens the store and binds the listener.
    ///
    /// # Errors
    /// See [`StartError`].
    pub async fn bind(config: Config, deps: Deps) -> Result<Proxy, StartError> {
        config.validate()?;
        let opts = StoreOptions {
            max_bytes: config.proxy.max_cache_bytes,
            clock: deps.clock.clone(),
            ..StoreOptions::default()
        };
        let dir = config.proxy.cache_dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&dir, opts))
            .await
            .expect("store open task panicked")?;
        let addr = config.proxy.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        let local_site = deps.local_site.clone();
        let engine = build_engine(&config, deps, store, local_addr);
        engine
            .client
            .trust_extra_cas(&config.proxy.backhaul.extra_ca_files)?;
        tracing::info!(event = "proxy_listening", addr = %local_addr, "caching proxy listening");
        Ok(Proxy {
            listener,
            engine,
            config,
            local_addr,
            local_site,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle for status and the mesh.
    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle {
            engine: self.engine.clone(),
            cache_dir: self.config.proxy.cache_dir.clone(),
        }
    }

    /// Serves until `cancel`, then stops accepting, gives connections
    /// [`server::SHUTDOWN_GRACE`] to finish, waits (bounded) for fetches to
    /// store what they got, and flushes the store.
    ///
    /// Cancel-safe: dropping the future stops serving abruptly (acknowledged
    /// writes are durable regardless).
    pub async fn run(self, cancel: CancellationToken) {
        let b = &self.config.proxy.backhaul;
        let allow = self
            .config
            .proxy
            .allow_networks
            .iter()
            .filter_map(|c| Cidr::parse(c))
            .collect();
        let p = &self.config.proxy;
        let max_connections = listener::connection_cap(p.max_connections);
        tracing::info!(
            event = "proxy_connection_caps",
            max_connections,
            per_client = p.max_connections_per_client,
            "proxy connection caps"
        );
        let ctx = Arc::new(server::Ctx {
            engine: self.engine.clone(),
            allow,
            listen: self.local_addr,
            max_connections,
            slots: listener::ClientSlots::new(p.max_connections_per_client),
            header_timeout: Duration::from_millis(p.header_timeout_ms),
            idle_timeout: Duration::from_millis(p.idle_timeout_ms),
            site: site::Site::new(self.local_site.clone(), p.cache_dir.clone()),
        });
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(server::prober(
            self.engine.clone(),
            b.probe_urls.clone(),
            Duration::from_millis(b.probe_interval_ms.max(10)),
            Duration::from_millis(b.probe_interval_down_ms.max(10)),
            Duration::from_millis(b.probe_timeout_ms.max(1)),
            cancel.child_token(),
        ));
        tasks.spawn(server::accept_loop(
            self.listener,
            ctx,
            cancel.child_token(),
        ));
        cancel.cancelled().await;
        let _ = tokio::time::timeout(server::SHUTDOWN_GRACE + Duration::from_secs(2), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.abort_all();
        self.engine.tasks.close();
        let _ = tokio::time::timeout(server::SHUTDOWN_GRACE, self.engine.tasks.wait()).await;
        let _ = tokio::time::timeout(server::SHUTDOWN_GRACE, self.engine.store.flush()).await;
        tracing::info!(event = "proxy_stopped", "caching proxy stopped");
    }
}

/// Runs the proxy until `cancel`: what the agent calls.
///
/// # Errors
/// Startup failures; once running it only stops on `cancel`.
pub async fn run(config: Config, deps: Deps, cancel: CancellationToken) -> Result<(), StartError> {
    let proxy = Proxy::bind(config, deps).await?;
    proxy.run(cancel).await;
    Ok(())
}
