//! `fieldrack agent`: wires the mesh, the store, power telemetry and the API
//! into one rack, and shuts them all down within a deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use deploy::config::{RackConfig, API_TOKEN_FILE};
use deploy::power::PowerStatus;
use deploy::{Certificate, Revocation, Role};
use libp2p::identity::Keypair;
use libp2p::PeerId;
use mesh::membership::State;
use mesh::{MeshEvent, MeshHandle, MeshSettings, RackInfo};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use util::time::unix_secs;

use crate::state::{AgentState, RecoveryReport};
use crate::status::{PeerEntry, RevokedEntry, Status};
use crate::store::{SledStore, Store};

/// The whole shutdown must finish within this (SIGTERM → return from
/// [`run`]); every phase gets what is left of it. `main` then gives the
/// runtime [`RUNTIME_SHUTDOWN_GRACE`] more and exits whatever still runs
/// (a blocking import stuck in a system call cannot hold the process), so
/// SIGTERM to exit stays under the 5 s the README promises.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(4);
/// What the runtime gets, after [`run`] returned, to finish its tasks
/// before the process exits anyway (`Runtime::shutdown_timeout`).
pub const RUNTIME_SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
/// The appliance supervisor's share of [`SHUTDOWN_DEADLINE`]: it stops
/// appliances while the mesh still carries lease renewals.
const SUPERVISOR_SHARE: Duration = Duration::from_secs(2);
/// The control plane's share of [`SHUTDOWN_DEADLINE`].
const CONTROL_SHARE: Duration = Duration::from_secs(1);

/// Counters kept by the agent itself (the mesh keeps its own).
#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// API requests served.
    pub api_requests: AtomicU64,
    /// Store write failures (full disk...).
    pub store_errors: AtomicU64,
    /// Console snapshots computed (one per tick while a console is open,
    /// however many are open).
    pub console_snapshots: AtomicU64,
}

/// Why a revocation was not taken.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// Not a valid revocation for this fleet.
    #[error("{0}")]
    Invalid(String),
    /// It could not be stored durably (nothing acknowledged).
    #[error("storing the revocation: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The mesh has stopped.
    #[error(transparent)]
    Mesh(#[from] mesh::MeshError),
}

/// A running rack, shared by the API handlers.
pub struct Rack {
    /// Its config.
    pub config: RackConfig,
    /// Durable state.
    pub state: AgentState,
    /// The mesh.
    pub mesh: MeshHandle,
    /// Latest power reading.
    pub power: watch::Receiver<PowerStatus>,
    /// Counters.
    pub metrics: AgentMetrics,
    /// What the store held at start.
    pub recovery: RecoveryReport,
    /// Volumes: snapshots and replication.
    pub volumes: Arc<crate::volumes::VolumeService>,
    /// The fleet's public key (decoded once from `config.fleet.public_key`).
    pub fleet_key: libp2p::identity::ed25519::PublicKey,
    /// The caching proxy and tile server, if this rack runs one.
    pub proxy: Option<crate::proxy::RunningProxy>,
    /// Appliances: lease renewal and the supervisor (with the control plane).
    pub appliances: Arc<crate::supervisor::Supervisor>,
    /// The admin API's connection pools (shared with `/metrics`).
    pub api_slots: Arc<crate::api::slots::Slots>,
    /// How the open-file limit is shared between listeners.
    pub fd_budget: crate::limits::FdBudget,
    /// A drill's faults on this rack.
    pub drill: Arc<crate::drill::Enforcer>,
    /// The operator's quorum override, if one is in force.
    pub quorum_override: crate::quorum_override::QuorumOverride,
    /// Time to protected: when each step was first reached.
    pub protected: Arc<std::sync::Mutex<crate::protected::Timeline>>,
    started: Instant,
}

impl Rack {
    /// The status document.
    ///
    /// # Errors
    /// If the mesh has stopped.
    pub async fn status(&self) -> Result<Status, mesh::MeshError> {
        let m = self.mesh.status().await?;
        let volumes = self.volumes.status().await;
        let volumes_kept = self.volumes.kept().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "listing kept copies");
            Vec::new()
        });
        let field = self.appliances.control().field_view().await;
        let peers = m
            .peers
            .iter()
            .map(|p| PeerEntry {
                rack: p.rack.clone(),
                peer_id: p.peer_id.to_base58(),
                state: p.state,
                rtt_ms: p
                    .rtt
                    .map(|d| (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0),
                last_seen_s: p.last_seen.map(|d| (d.as_secs_f64() * 10.0).round() / 10.0),
                state_since_s: (p.since.as_secs_f64() * 10.0).round() / 10.0,
                connected: p.connected,
                incarnation: p.incarnation,
                role: p.meta.as_ref().map(|x| x.role),
                site: p.meta.as_ref().map(|x| x.site.clone()),
                power: p.meta.as_ref().map(|x| x.power.clone()),
                api: p.meta.as_ref().map(|x| x.api.clone()),
            })
            .collect();
        let revoked = m
            .revocations
            .iter()
            .filter_map(|r| r.verify(&self.fleet_key, &self.config.fleet.name).ok())
            .map(|b| RevokedEntry {
                rack: b.rack,
                peer_id: b.peer_id,
                reason: b.reason,
            })
            .collect();
        Ok(Status {
            rack: self.config.rack.clone(),
            peer_id: m.peer_id.to_base58(),
            role: self.config.role,
            site: self.config.site.clone(),
            fleet: self.config.fleet.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            incarnation: m.incarnation,
            uptime_s: (self.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            listen: m.listen_addrs.iter().map(|a| a.to_string()).collect(),
            peers,
            power: self.power.borrow().clone(),
            volumes,
            volumes_kept,
            volume_store: Some(self.volumes.store_info()),
            cache: self
                .proxy
                .as_ref()
                .map(|p| serde_json::to_value(p.handle.status()).expect("cache status serializes")),
            revoked,
            store: self.recovery.clone(),
            appliances: self.appliances.status(),
            control: Some(self.appliances.control().status()),
            field: Some(field),
            bulk: m.bulk_addr.map(|a| crate::status::BulkStatus {
                listen: a.to_string(),
                connections: m.bulk_connections,
            }),
            protected: Some(
                self.protected
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone(),
            ),
        })
    }

    /// Verify, persist durably, then apply and spread a revocation.
    ///
    /// # Errors
    /// [`RevokeError`]; nothing is acknowledged unless stored.
    pub async fn revoke(&self, rev: Revocation) -> Result<bool, RevokeError> {
        let body = rev
            .verify(&self.fleet_key, &self.config.fleet.name)
            .map_err(|e| RevokeError::Invalid(format!("revocation refused: {e}")))?;
        if let Err(e) = self.state.add_revocation(&body.peer_id, &rev) {
            self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
            return Err(e.into());
        }
        Ok(self.mesh.revoke(rev).await?)
    }

    /// Prometheus text exposition.
    pub async fn metrics_text(&self) -> String {
        crate::metrics::render(self).await
    }
}

fn detect_capacity(config: &RackConfig) -> (u32, u64) {
    let cpus = if config.capacity.cpus > 0 {
        config.capacity.cpus
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    };
    let mem = if config.capacity.memory_mb > 0 {
        config.capacity.memory_mb
    } else {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb / 1024)
    };
    (cpus, mem)
}

fn rack_info(config: &RackConfig, power: PowerStatus) -> RackInfo {
    let (cpus, memory_mb) = if config.role == Role::Witness {
        (0, 0)
    } else {
        detect_capacity(config)
    };
    RackInfo {
        rack: config.rack.clone(),
        role: config.role,
        site: config.site.clone(),
        cpus,
        memory_mb,
        power,
        version: env!("CARGO_PKG_VERSION").into(),
        api: config.api.listen.clone(),
        bulk_port: None, // the mesh fills it in
    }
}

/// Load the identity key and certificate named by `config`, and check the
/// certificate is ours and valid (a rack with a bad certificate would only
/// be refused by every peer: better to say so at start).
///
/// # Errors
/// A message naming the file and the problem.
pub fn load_identity(config: &RackConfig) -> Result<(Keypair, Certificate)> {
    let key_bytes = std::fs::read(&config.identity_key)
        .with_context(|| format!("reading identity_key {}", config.identity_key.display()))?;
    let keypair = Keypair::from_protobuf_encoding(&key_bytes).with_context(|| {
        format!(
            "identity_key {} is not a libp2p key",
            config.identity_key.display()
        )
    })?;
    let cert_text = std::fs::read_to_string(&config.certificate)
        .with_context(|| format!("reading certificate {}", config.certificate.display()))?;
    let cert = Certificate::from_json(&cert_text)
        .with_context(|| format!("certificate {}", config.certificate.display()))?;
    let fleet_key = deploy::cert::decode_public_key(&config.fleet.public_key)?;
    let body = cert
        .verify(
            &fleet_key,
            &config.fleet.name,
            &PeerId::from(keypair.public()),
            unix_secs(),
        )
        .with_context(|| {
            format!(
                "certificate {} is not valid for this rack",
                config.certificate.display()
            )
        })?;
    if body.rack != config.rack {
        anyhow::bail!(
            "certificate {} names rack {:?}, rack.toml says {:?}",
            config.certificate.display(),
            body.rack,
            config.rack
        );
    }
    Ok((keypair, cert))
}

/// Run a rack until `shutdown` is cancelled.
///
/// # Errors
/// If a component cannot start (bad key, port in use, store unreadable).
pub async fn run(
    config: RackConfig,
    config_path: &std::path::Path,
    shutdown: CancellationToken,
) -> Result<()> {
    // Time to protected counts from here, before the components start.
    let started = Instant::now();
    let (keypair, certificate) = load_identity(&config)?;
    match crate::limits::raise_fd_limit() {
        Ok(l) => tracing::info!(
            before = l.before,
            after = l.after,
            hard = l.hard,
            "open-file limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let fd_budget = crate::limits::fd_budget();
    tracing::info!(
        limit = fd_budget.limit,
        api_handshakes = fd_budget.api_handshakes,
        api_authenticated = fd_budget.api_authenticated,
        proxy_connections = fd_budget.proxy_connections,
        "listener connection caps"
    );
    if crate::limits::RESERVED_FDS + fd_budget.listeners_total() >= fd_budget.limit {
        tracing::warn!(
            limit = fd_budget.limit,
            "the open-file limit is too low for the listeners' minimum caps; raise the hard limit (LimitNOFILE=)"
        );
    }
    let token_path = deploy::config::config_dir(config_path).join(API_TOKEN_FILE);
    let token = std::fs::read_to_string(&token_path)
        .with_context(|| format!("reading the API token {}", token_path.display()))?
        .trim()
        .to_string();
    if token.is_empty() {
        anyhow::bail!("the API token file {} is empty", token_path.display());
    }
    let console = crate::console::Console::new(crate::console::auth::Credentials {
        api_token: token.clone(),
        operator_password: config.console.operator_password_hash.clone(),
        viewer_password: config.console.viewer_password_hash.clone(),
    });
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    let store: Arc<dyn Store> = Arc::new(
        SledStore::open(&config.data_dir.join("state"))
            .with_context(|| format!("opening the store in {}", config.data_dir.display()))?,
    );
    let (state, recovery) = AgentState::open(store)?;
    if recovery.corrupt > 0 {
        tracing::error!(
            corrupt = recovery.corrupt,
            "the store held corrupt records; they were skipped"
        );
    }
    let incarnation = state.bump_incarnation(unix_secs())?;
    let revocations = state.revocations()?;
    let api_listener = tokio::net::TcpListener::bind(config.api_addr())
        .await
        .with_context(|| format!("binding the API on {}", config.api.listen))?;

    let cancel = CancellationToken::new();
    let monitor = crate::power::PowerMonitor::spawn(config.power.clone(), cancel.child_token());
    // A drill's generator fault overrides the reading everywhere it is used.
    let (power, generator) =
        crate::drill::power_overlay(monitor, config.power.dying_runtime_s, cancel.child_token());
    let meta = rack_info(&config, power.borrow().clone());
    let fleet_key = deploy::cert::decode_public_key(&config.fleet.public_key)?;
    // The process's one mDNS daemon: the mesh's discovery and the proxy's
    // advertisement share it (started by the first of them that needs it).
    let mdns = mesh::discovery::Mdns::new(cancel.child_token());
    let mesh_addrs = deploy::config::MeshAddrs::try_from(&config.mesh)?;
    let settings = MeshSettings {
        keypair,
        certificate,
        fleet_key: fleet_key.clone(),
        fleet_name: config.fleet.name.clone(),
        rack: config.rack.clone(),
        listen: mesh_addrs.listen,
        bootstrap: mesh_addrs.bootstrap,
        mdns: config.mesh.mdns.then(|| mdns.clone()),
        admission_timeout: Duration::from_millis(config.mesh.admission_timeout_ms),
        max_connections: config.mesh.max_connections,
        max_connections_per_peer: config.mesh.max_connections_per_peer,
        idle_timeout: Duration::from_millis(config.mesh.idle_timeout_ms),
        reconnect_initial: Duration::from_millis(config.mesh.reconnect_initial_ms),
        reconnect_max: Duration::from_millis(config.mesh.reconnect_max_ms),
        membership: mesh::membership::Config::from_toml(&config.membership),
        incarnation,
        meta,
        revocations,
        seed: rand::random(),
        bulk: crate::bulk::settings(&config),
    };
    let (mesh, mesh_task) = mesh::start(settings, cancel.child_token())
        .await
        .context("starting the mesh")?;
    tracing::info!(rack = %config.rack, peer_id = %mesh.peer_id, incarnation, api = %config.api.listen, "rack up");

    let volume_control = crate::volumes::ControlSlot::default();
    let volumes =
        crate::volumes::open(&config, mesh.clone(), state.clone(), volume_control.clone())
            .context("opening the volume service")?;
    let mut tasks = tokio::task::JoinSet::new();
    let proxy = match crate::proxy::config(&config)? {
        Some(mut cfg) => Some({
            // One open-file budget for every listener: unless the operator
            // set a cap, the proxy takes its share, not the whole limit.
            if cfg.proxy.max_connections == 0 {
                cfg.proxy.max_connections = fd_budget
                    .proxy_connections
                    .min(cache_proxy::server::MAX_CONNECTIONS);
            }
            crate::proxy::start(
                cfg,
                &config.site,
                mesh.clone(),
                &mdns,
                console.clone(),
                &mut tasks,
                cancel.child_token(),
            )
            .await?
        }),
        None => None,
    };
    let control_settings = control::ControlSettings::from_config(
        &config.control,
        config.data_dir.join("control"),
        &config.rack,
    );
    let control_cancel = CancellationToken::new();
    let control = control::Control::start(
        control_settings,
        mesh.clone(),
        mesh.peer_id,
        control_cancel.clone(),
    )
    .await
    .context("starting the control plane")?;
    // Replica placement and the cache mesh read the field view.
    let _ = volume_control.set(control.clone());
    if let Some(p) = &proxy {
        p.mesh.attach_control(control.clone());
    }
    let appliances = crate::supervisor::Supervisor::new(
        &config.rack,
        config.role,
        &config.site,
        if config.role == Role::Witness {
            (0, 0)
        } else {
            detect_capacity(&config)
        },
        control.clone(),
        volumes.clone(),
        power.clone(),
        state.clone(),
        config.data_dir.join("appliances"),
    );
    if let Some(p) = &proxy {
        appliances.attach_backhaul(Arc::new(p.handle.clone()));
    }
    let drill = crate::drill::Enforcer::open(
        &config.rack,
        state.clone(),
        crate::drill::Targets {
            mesh: mesh.clone(),
            supervisor: appliances.clone(),
            proxy: proxy.as_ref().map(|p| p.handle.clone()),
            generator,
        },
    )
    .context("reading the drill's faults")?;
    tasks.spawn(drill.clone().run(cancel.child_token()));
    let rack = Arc::new(Rack {
        drill,
        fleet_key,
        proxy,
        appliances: appliances.clone(),
        volumes: volumes.clone(),
        config: config.clone(),
        state: state.clone(),
        mesh: mesh.clone(),
        power: power.clone(),
        metrics: AgentMetrics::default(),
        recovery,
        api_slots: crate::api::slots::Slots::new(crate::api::slots::ApiLimits::from_budget(
            &fd_budget,
        )),
        fd_budget,
        protected: Arc::default(),
        quorum_override: Default::default(),
        started: Instant::now(),
    });
    tasks.spawn(crate::api::serve(
        api_listener,
        rack.clone(),
        token,
        cancel.child_token(),
    ));
    tasks.spawn(console.attach(rack.clone(), cancel.child_token()));
    tasks.spawn(record_mesh_events(rack.clone(), cancel.child_token()));
    tasks.spawn(record_control_events(
        state.clone(),
        control.subscribe(),
        cancel.child_token(),
    ));
    tasks.spawn(publish_power(rack.clone(), cancel.child_token()));
    tasks.spawn(volumes.run(cancel.child_token()));
    let supervisor_cancel = cancel.child_token();
    let supervisor = tokio::spawn(appliances.run(supervisor_cancel.clone()));
    tasks.spawn(crate::quorum_override::run(
        rack.clone(),
        cancel.child_token(),
    ));
    if let Some(p) = &rack.proxy {
        let packs =
            crate::tile_packs::bundled(&deploy::config::config_dir(config_path), &config.data_dir);
        if !packs.is_empty() {
            tasks.spawn(crate::tile_packs::import_all(
                p.handle.clone(),
                packs,
                state.clone(),
                cancel.child_token(),
            ));
        }
    }
    tasks.spawn(crate::protected::run(
        rack.clone(),
        deploy::config::config_dir(config_path),
        started,
        cancel.child_token(),
    ));
    let notifier = match crate::sd_notify::Notifier::from_env() {
        Ok(n) => n.map(Arc::new),
        Err(e) => {
            tracing::warn!(error = %e, "$NOTIFY_SOCKET is set but unreachable");
            None
        }
    };
    if let Some(n) = &notifier {
        let health = control.clone();
        tasks.spawn(crate::sd_notify::ready_and_feed(
            n.clone(),
            move || health.core_failure(),
            cancel.child_token(),
        ));
    }

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    if let Some(n) = &notifier {
        let _ = n.notify("STOPPING=1");
    }
    // One deadline for the whole shutdown; each phase gets its share of
    // what is left. Appliances stop first (while the mesh still carries
    // lease renewals), then the control plane, then everything else.
    let deadline = tokio::time::Instant::now() + SHUTDOWN_DEADLINE;
    let share =
        |d: Duration| d.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
    supervisor_cancel.cancel();
    let _ = tokio::time::timeout(share(SUPERVISOR_SHARE), supervisor).await;
    control_cancel.cancel();
    let _ = tokio::time::timeout(share(CONTROL_SHARE), control.shutdown()).await;
    cancel.cancel();
    let drained = tokio::time::timeout_at(deadline, async {
        while tasks.join_next().await.is_some() {}
        let _ = mesh_task.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown deadline passed; abandoning remaining tasks");
    }
    // Tasks still running (a blocking import among them) are abandoned:
    // aborting does not wait for them.
    tasks.abort_all();
    if let Err(e) = state.flush() {
        tracing::error!(error = %e, "final flush failed");
    }
    Ok(())
}

/// Record what the control plane does to the field's membership (merges,
/// voters taken out, revoked racks forgotten) in the event log.
async fn record_control_events(
    state: crate::state::AgentState,
    mut rx: tokio::sync::broadcast::Receiver<control::ControlEvent>,
    cancel: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return,
            ev = rx.recv() => ev,
        };
        match ev {
            Ok(ev) => {
                let detail = serde_json::to_value(&ev).unwrap_or_default();
                if let Err(e) = state.record_event(ev.kind(), detail) {
                    tracing::warn!(error = %e, "cannot record a control event");
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "control event recorder lagged");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Persist what the mesh learns: revocations (durably) and state changes
/// (the event log, for drills and post-mortems).
async fn record_mesh_events(rack: Arc<Rack>, cancel: CancellationToken) {
    let mut rx = rack.mesh.subscribe();
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => break,
            ev = rx.recv() => ev,
        };
        let result = match ev {
            Ok(MeshEvent::Revoked(rev)) => {
                                match rev.verify(&rack.fleet_key, &rack.config.fleet.name) {
                    Ok(body) => rack
                        .state
                        .add_revocation(&body.peer_id, &rev)
                        .and_then(|_| rack.state.record_event("revoked", serde_json::json!({ "rack": body.rack, "peer_id": body.peer_id })).map(|_| ())),
                    Err(_) => Ok(()),
                }
            }
            Ok(MeshEvent::StateChanged { peer, rack: name, from, to }) => rack
                .state
                .record_event(
                    "peer_state",
                    serde_json::json!({ "peer_id": peer.to_base58(), "rack": name, "from": from, "to": to }),
                )
                .map(|_| ()),
            Ok(MeshEvent::Rejected { peer, reason }) => rack
                .state
                .record_event("admission_refused", serde_json::json!({ "peer_id": peer.to_base58(), "reason": reason }))
                .map(|_| ()),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "event recorder lagged");
                Ok(())
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        };
        if let Err(e) = result {
            rack.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "could not record a mesh event");
        }
    }
}

/// Gossip our power state whenever it changes.
async fn publish_power(rack: Arc<Rack>, cancel: CancellationToken) {
    let mut power = rack.power.clone();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = power.changed() => {
                if changed.is_err() { break; }
                let p = power.borrow_and_update().clone();
                if rack.mesh.set_meta(rack_info(&rack.config, p)).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Count peers per state (for metrics).
pub fn count_states(peers: &[mesh::PeerStatus]) -> [(State, usize); 3] {
    let n = |s: State| peers.iter().filter(|p| p.state == s).count();
    [
        (State::Alive, n(State::Alive)),
        (State::Suspect, n(State::Suspect)),
        (State::Dead, n(State::Dead)),
    ]
}
