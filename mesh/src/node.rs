//! The swarm actor: one task owns the libp2p swarm, the admission and
//! membership state machines, and carries out what they decide.
//!
//! Data flow: swarm events and timer ticks go into [`Admission`] and
//! [`Membership`]; their outputs (send this, disconnect that, state changed)
//! come back here and are turned into libp2p calls and [`MeshEvent`]s. The
//! rest of the agent talks to the actor through a [`MeshHandle`] (bounded
//! channel, oneshot replies).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deploy::cert::CertError;
use deploy::{Certificate, Revocation};
use futures::StreamExt;
use libp2p::identity::{ed25519, Keypair};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{connection_limits, identify, Multiaddr, PeerId, StreamProtocol, Swarm};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use util::time::unix_secs;

use crate::admission::{Admission, RevokeOutcome};
use crate::backoff::{first_dial_delay, Backoff, Rejections, Verdict};
use crate::bulk::plane::Wiring;
use crate::bulk::{BindError, BulkAddrs, BulkPlane, BulkSettings, MeshStream};
use crate::discovery::{self, Discovered};
use crate::filter::{FilterError, TrafficFilter};
use crate::membership::{self, Input, Membership, Message, Output, State};
use crate::protocol::{
    AdmitRequest, AdmitResponse, RackInfo, Rpc, RpcReply, ADMIT_PROTOCOL,
    MAX_REVOCATIONS_PER_MESSAGE, RPC_PROTOCOL,
};

/// Commands queued to the actor. Small: callers are the API and the agent,
/// a handful of requests per second.
pub const COMMAND_QUEUE: usize = 64;
/// Events buffered for slow subscribers (they then see `Lagged`).
pub const EVENT_QUEUE: usize = 256;
/// mDNS sightings queued before being dropped (announcements repeat).
pub const DISCOVERY_QUEUE: usize = 64;
/// Inbound SWIM pings whose ack we still owe. An ack not sent within
/// [`PENDING_ACK_TTL`] is useless to the prober anyway.
pub const MAX_PENDING_ACKS: usize = 1024;
/// See [`MAX_PENDING_ACKS`].
pub const PENDING_ACK_TTL: Duration = Duration::from_secs(5);
/// Addresses remembered per peer: a rack has a few radios, not dozens.
pub const MAX_ADDRS_PER_PEER: usize = 8;
/// How often the actor's timers run (SWIM ticks, admission deadlines, redials).
pub const TICK: Duration = Duration::from_millis(100);
/// Redials of one known peer in flight at once. A dial whose first
/// packet was lost to a radio fade retransmits only on QUIC's backed-off
/// handshake timer (1 s, then 2 s more, until libp2p's 5 s handshake
/// timeout), so waiting for it before dialling again would leave the link
/// unused for up to two seconds after it returns; dials on the redial
/// schedule (about one a second) go out beside it instead. Five cover the
/// handshake timeout at that pace; each costs one 1200-byte packet and
/// its retransmissions.
pub const MAX_REDIALS_PER_PEER: usize = 5;
/// A refused peer gets this long to read the reason before we hang up.
pub const REJECT_LINGER: Duration = Duration::from_millis(300);
/// How often admitted peers' certificates are checked again: expiry is a
/// wall-clock matter that no connection event reports, so a rack whose
/// certificate expires while connected is disconnected within this.
pub const CERT_RECHECK: Duration = Duration::from_secs(1);
/// Times our certificate is offered again to a connected peer after an
/// offer failed, per connection (a busy rack may lose several streams).
pub const MAX_CERT_OFFERS: u32 = 8;

/// Everything the mesh needs to run.
#[derive(Debug, Clone)]
pub struct MeshSettings {
    /// The rack's libp2p identity.
    pub keypair: Keypair,
    /// Its fleet certificate.
    pub certificate: Certificate,
    /// The fleet's public key.
    pub fleet_key: ed25519::PublicKey,
    /// The fleet's name.
    pub fleet_name: String,
    /// This rack's name.
    pub rack: String,
    /// QUIC listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Static peers.
    pub bootstrap: Vec<Multiaddr>,
    /// Announce and browse with mDNS, on the process's shared daemon.
    pub mdns: Option<discovery::Mdns>,
    /// How long a peer has to present its certificate.
    pub admission_timeout: Duration,
    /// Connection limits.
    pub max_connections: u32,
    /// Connection limits per peer.
    pub max_connections_per_peer: u32,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// Reconnect backoff bounds.
    pub reconnect_initial: Duration,
    /// Reconnect backoff bounds.
    pub reconnect_max: Duration,
    /// SWIM timings.
    pub membership: membership::Config,
    /// Our incarnation (persisted by the agent, grows on every start).
    pub incarnation: u64,
    /// What we gossip about ourselves.
    pub meta: RackInfo,
    /// Revocations already known (from the local store).
    pub revocations: Vec<Revocation>,
    /// Seed for the membership RNG and jitter.
    pub seed: u64,
    /// The bulk data plane (None: every stream on the mesh).
    pub bulk: Option<BulkSettings>,
}

/// Something the rest of the agent may want to react to.
#[derive(Debug, Clone)]
pub enum MeshEvent {
    /// A peer's membership state changed.
    StateChanged {
        /// The peer.
        peer: PeerId,
        /// Its rack name, if known.
        rack: Option<String>,
        /// Previous state (None: newly learned).
        from: Option<State>,
        /// New state.
        to: State,
    },
    /// A revocation we had not seen before: persist it.
    Revoked(Revocation),
    /// A peer was refused admission.
    Rejected {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
}

/// One peer as seen from here.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    /// Its PeerId.
    pub peer_id: PeerId,
    /// Its rack name (from its certificate or gossip).
    pub rack: Option<String>,
    /// SWIM state.
    pub state: State,
    /// Its incarnation.
    pub incarnation: u64,
    /// Round trip of the last direct SWIM probe.
    pub rtt: Option<Duration>,
    /// Time since we last heard from it directly.
    pub last_seen: Option<Duration>,
    /// Time in the current state.
    pub since: Duration,
    /// Whether a connection is open right now.
    pub connected: bool,
    /// What it gossips about itself.
    pub meta: Option<RackInfo>,
}

/// A snapshot of the mesh.
#[derive(Debug, Clone)]
pub struct MeshStatus {
    /// Our PeerId.
    pub peer_id: PeerId,
    /// Our incarnation.
    pub incarnation: u64,
    /// Where we listen.
    pub listen_addrs: Vec<Multiaddr>,
    /// Every peer we know of.
    pub peers: Vec<PeerStatus>,
    /// Revocations we know of.
    pub revocations: Vec<Revocation>,
    /// The peers they revoke, with their racks' names (each revocation
    /// verified when it arrived).
    pub revoked_peers: Vec<(PeerId, String)>,
    /// Where the bulk plane listens (None: disabled).
    pub bulk_addr: Option<SocketAddr>,
    /// Bulk connections open right now.
    pub bulk_connections: usize,
}

/// Counters for `/metrics`. Atomics so the API reads them without a round
/// trip through the actor.
#[derive(Debug, Default)]
pub struct MeshStats {
    /// Peers admitted (certificate verified).
    pub admitted_total: AtomicU64,
    /// Peers refused (bad, foreign, stolen, expired or revoked certificate).
    pub rejected_total: AtomicU64,
    /// Peers disconnected for not presenting a certificate in time.
    pub admission_timeouts_total: AtomicU64,
    /// Offers of our certificate sent again after one failed.
    pub cert_offers_retried_total: AtomicU64,
    /// Rack messages sent to admitted peers.
    pub rpc_sent_total: AtomicU64,
    /// Rack messages received from admitted peers.
    pub rpc_received_total: AtomicU64,
    /// Rack messages received from peers not admitted (dropped unread).
    pub rpc_dropped_unadmitted_total: AtomicU64,
    /// Dial attempts.
    pub dials_total: AtomicU64,
    /// Membership state transitions.
    pub transitions_total: AtomicU64,
    /// Revocations learned.
    pub revocations_total: AtomicU64,
    /// Inbound raw streams from peers not admitted, dropped.
    pub streams_refused_total: AtomicU64,
    /// Admitted peers disconnected because their certificate expired while
    /// they were connected.
    pub expired_total: AtomicU64,
    /// Stream bytes written on the bulk plane.
    pub bulk_bytes_sent: AtomicU64,
    /// Stream bytes read on the bulk plane.
    pub bulk_bytes_received: AtomicU64,
    /// Stream bytes written on libp2p streams of the mesh.
    pub mesh_stream_bytes_sent: AtomicU64,
    /// Stream bytes read on libp2p streams of the mesh.
    pub mesh_stream_bytes_received: AtomicU64,
    /// Bulk connections and streams refused: their peer was not admitted.
    pub bulk_refused_total: AtomicU64,
    /// Messages and connections dropped by a drill's traffic filter.
    pub filtered_total: AtomicU64,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

enum Command {
    Status(oneshot::Sender<MeshStatus>),
    SetMeta(Box<RackInfo>),
    Revoke(Box<Revocation>, oneshot::Sender<Result<bool, CertError>>),
    /// The traffic filter changed (already written to the shared copy).
    FilterChanged,
}

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The QUIC transport or behaviour could not be built.
    #[error("building the swarm: {0}")]
    Build(String),
    /// A listen address could not be bound.
    #[error("listening on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// mDNS could not start.
    #[error(transparent)]
    Discovery(#[from] discovery::DiscoveryError),
    /// The bulk endpoint could not start.
    #[error(transparent)]
    Bulk(#[from] BindError),
}

/// Why a request to the mesh actor failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// The actor has stopped (shutdown in progress).
    #[error("the mesh has stopped")]
    Stopped,
    /// The revocation is not valid for this fleet.
    #[error("revocation refused: {0}")]
    BadRevocation(#[from] CertError),
    /// The peer is not admitted (not connected, or not a fleet member).
    #[error("peer {0} is not admitted")]
    NotAdmitted(PeerId),
    /// A raw stream could not be opened or accepted.
    #[error("stream: {0}")]
    Stream(String),
}

/// A cloneable handle to the mesh actor.
#[derive(Clone)]
pub struct MeshHandle {
    tx: mpsc::Sender<Command>,
    events: broadcast::Sender<MeshEvent>,
    /// Opens and accepts raw streams (bulk data) on the mesh connections.
    control: libp2p_stream::Control,
    /// The bulk plane, if enabled: carries its registered protocols to
    /// peers that have one.
    bulk: Option<BulkPlane>,
    /// Peers admitted right now, with their rack names. Written only by
    /// the actor; read by stream users to gate bulk data.
    admitted: Admitted,
    /// The drill's traffic filter, read by the actor on every message.
    filter: Arc<std::sync::RwLock<TrafficFilter>>,
    /// Counters for metrics.
    pub stats: Arc<MeshStats>,
    /// Our PeerId.
    pub peer_id: PeerId,
}

/// The set of admitted peers, shared with stream users.
pub type Admitted = Arc<std::sync::RwLock<HashMap<PeerId, String>>>;

/// Inbound streams of one protocol, from admitted peers only: libp2p
/// streams on the mesh and, for a bulk protocol, streams of the bulk plane.
pub struct AdmittedStreams {
    inner: libp2p_stream::IncomingStreams,
    bulk: Option<mpsc::Receiver<(PeerId, MeshStream)>>,
    admitted: Admitted,
    stats: Arc<MeshStats>,
}

impl AdmittedStreams {
    /// The next stream from an admitted peer, on either plane; streams
    /// from anyone else are dropped unread. `None` when the mesh stops.
    ///
    /// Cancel-safe: no stream is lost if the future is dropped.
    pub async fn next(&mut self) -> Option<(PeerId, MeshStream)> {
        loop {
            let (peer, stream) = tokio::select! {
                m = self.inner.next() => {
                    let (peer, s) = m?;
                    (peer, MeshStream::mesh(s, self.stats.clone()))
                }
                Some(b) = recv_bulk(&mut self.bulk) => b,
            };
            if self
                .admitted
                .read()
                .expect("admitted lock")
                .contains_key(&peer)
            {
                return Some((peer, stream));
            }
            inc(&self.stats.streams_refused_total);
            drop(stream);
        }
    }
}

/// The next bulk stream, or pending forever without a bulk queue (or
/// once it closed), so `select!` waits on the mesh side alone.
async fn recv_bulk(
    rx: &mut Option<mpsc::Receiver<(PeerId, MeshStream)>>,
) -> Option<(PeerId, MeshStream)> {
    match rx {
        Some(r) => match r.recv().await {
            Some(x) => Some(x),
            None => {
                *rx = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

impl MeshHandle {
    /// Open a stream to an admitted peer: a protocol of the bulk registry
    /// goes over the bulk plane when the peer has one, anything else (or if
    /// the bulk dial fails) over a libp2p stream on the mesh connection.
    ///
    /// # Errors
    /// [`MeshError::NotAdmitted`] if the peer is not admitted right now (no
    /// rack data goes to a peer whose certificate is not verified);
    /// [`MeshError::Stream`] if the stream cannot be opened.
    pub async fn open_stream(
        &self,
        peer: PeerId,
        protocol: &'static str,
    ) -> Result<MeshStream, MeshError> {
        if !self
            .admitted
            .read()
            .expect("admitted lock")
            .contains_key(&peer)
        {
            return Err(MeshError::NotAdmitted(peer));
        }
        if let Some(bulk) = self.bulk.as_ref().filter(|b| b.carries(protocol)) {
            match bulk.open(peer, protocol).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    tracing::debug!(%peer, protocol, error = %e, "bulk stream unavailable: using the mesh")
                }
            }
        }
        let mut control = self.control.clone();
        control
            .open_stream(peer, StreamProtocol::new(protocol))
            .await
            .map(|s| MeshStream::mesh(s, self.stats.clone()))
            .map_err(|e| MeshError::Stream(e.to_string()))
    }

    /// Where the bulk plane listens (None: disabled).
    #[must_use]
    pub fn bulk_addr(&self) -> Option<SocketAddr> {
        self.bulk.as_ref().and_then(BulkPlane::local_addr)
    }

    /// Accept inbound streams of `protocol` (once per protocol), from
    /// both planes for a bulk protocol.
    ///
    /// # Errors
    /// [`MeshError::Stream`] if the protocol is already being accepted.
    pub fn accept_streams(&self, protocol: &'static str) -> Result<AdmittedStreams, MeshError> {
        let inner = self
            .control
            .clone()
            .accept(StreamProtocol::new(protocol))
            .map_err(|_| MeshError::Stream(format!("{protocol} is already accepted")))?;
        let bulk = self.bulk.as_ref().and_then(|b| b.take_incoming(protocol));
        Ok(AdmittedStreams {
            inner,
            bulk,
            admitted: self.admitted.clone(),
            stats: self.stats.clone(),
        })
    }

    /// Admitted peers right now, with their rack names.
    pub fn admitted(&self) -> Vec<(PeerId, String)> {
        self.admitted
            .read()
            .expect("admitted lock")
            .iter()
            .map(|(p, r)| (*p, r.clone()))
            .collect()
    }

    /// A snapshot of the mesh.
    ///
    /// # Errors
    /// [`MeshError::Stopped`] once the actor has stopped.
    pub async fn status(&self) -> Result<MeshStatus, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Status(tx))
            .await
            .map_err(|_| MeshError::Stopped)?;
        rx.await.map_err(|_| MeshError::Stopped)
    }

    /// Replace what we gossip about ourselves.
    ///
    /// # Errors
    /// [`MeshError::Stopped`].
    pub async fn set_meta(&self, meta: RackInfo) -> Result<(), MeshError> {
        self.tx
            .send(Command::SetMeta(Box::new(meta)))
            .await
            .map_err(|_| MeshError::Stopped)
    }

    /// Apply and spread a revocation. Returns true if it was new.
    ///
    /// # Errors
    /// [`MeshError::BadRevocation`] if not signed by our fleet.
    pub async fn revoke(&self, rev: Revocation) -> Result<bool, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Revoke(Box::new(rev), tx))
            .await
            .map_err(|_| MeshError::Stopped)?;
        Ok(rx.await.map_err(|_| MeshError::Stopped)??)
    }

    /// Subscribe to mesh events.
    pub fn subscribe(&self) -> broadcast::Receiver<MeshEvent> {
        self.events.subscribe()
    }

    /// Install a drill's traffic filter (an open one lifts it): from now
    /// on the actor drops what it names (see [`crate::filter`]).
    ///
    /// # Errors
    /// [`SetFilterError`]: a filter over its bounds, or the mesh stopped.
    pub async fn set_filter(&self, filter: TrafficFilter) -> Result<(), SetFilterError> {
        filter.validate()?;
        *self.filter.write().expect("filter lock") = filter;
        self.tx
            .send(Command::FilterChanged)
            .await
            .map_err(|_| SetFilterError::Mesh(MeshError::Stopped))
    }

    /// The traffic filter in force.
    #[must_use]
    pub fn filter(&self) -> TrafficFilter {
        self.filter.read().expect("filter lock").clone()
    }
}

/// Why a traffic filter was not installed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetFilterError {
    /// Over its bounds.
    #[error(transparent)]
    Invalid(#[from] FilterError),
    /// The mesh has stopped.
    #[error(transparent)]
    Mesh(#[from] MeshError),
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    admit: request_response::cbor::Behaviour<AdmitRequest, AdmitResponse>,
    rpc: request_response::cbor::Behaviour<Rpc, RpcReply>,
    stream: libp2p_stream::Behaviour,
}

/// Start the mesh: bind, start discovery, spawn the actor.
///
/// # Errors
/// [`StartError`] if the swarm cannot be built or an address cannot be bound.
pub async fn start(
    mut settings: MeshSettings,
    cancel: CancellationToken,
) -> Result<(MeshHandle, tokio::task::JoinHandle<()>), StartError> {
    let mut swarm = build_swarm(&settings)?;
    for addr in &settings.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| StartError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    // Wait for the listeners so the caller knows the real ports (port 0).
    let mut listen_addrs = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while listen_addrs.len() < settings.listen.len() {
        match tokio::time::timeout_at(deadline, swarm.select_next_some()).await {
            Ok(SwarmEvent::NewListenAddr { address, .. }) => listen_addrs.push(address),
            Ok(SwarmEvent::ListenerError { error, .. })
            | Ok(SwarmEvent::ListenerClosed {
                reason: Err(error), ..
            }) => {
                return Err(StartError::Listen {
                    addr: settings.listen[0].clone(),
                    reason: error.to_string(),
                })
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let (disc_tx, disc_rx) = mpsc::channel(DISCOVERY_QUEUE);
    if let Some(mdns) = &settings.mdns {
        let port = listen_addrs
            .iter()
            .find_map(|a| {
                a.iter().find_map(|p| {
                    if let Protocol::Udp(port) = p {
                        Some(port)
                    } else {
                        None
                    }
                })
            })
            .unwrap_or(0);
        discovery::spawn(
            mdns,
            &settings.fleet_name,
            &settings.rack,
            *swarm.local_peer_id(),
            port,
            disc_tx,
            cancel.child_token(),
        )?;
    }
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (events, _) = broadcast::channel(EVENT_QUEUE);
    let stats = Arc::new(MeshStats::default());
    let peer_id = *swarm.local_peer_id();
    let admitted: Admitted = Arc::default();
    let filter: Arc<std::sync::RwLock<TrafficFilter>> = Arc::default();
    let (admitted_changed, changed_rx) = watch::channel(());
    let bulk_addrs = BulkAddrs::default();
    let bulk = match &settings.bulk {
        Some(b) => Some(BulkPlane::bind(
            b,
            &settings.keypair,
            settings.idle_timeout,
            Wiring {
                admitted: admitted.clone(),
                changed: changed_rx,
                addrs: bulk_addrs.clone(),
                stats: stats.clone(),
            },
            cancel.child_token(),
        )?),
        None => None,
    };
    let bulk_addr = bulk.as_ref().and_then(BulkPlane::local_addr);
    if let Some(addr) = bulk_addr {
        tracing::info!(%addr, "bulk plane listening");
    }
    settings.meta.bulk_port = bulk_addr.map(|a| a.port());
    let handle = MeshHandle {
        tx,
        events: events.clone(),
        control: swarm.behaviour().stream.new_control(),
        bulk: bulk.clone(),
        admitted: admitted.clone(),
        filter: filter.clone(),
        stats: stats.clone(),
        peer_id,
    };
    let actor = Actor::new(
        settings,
        swarm,
        listen_addrs,
        rx,
        disc_rx,
        events,
        stats,
        Shared {
            admitted,
            admitted_changed,
            bulk_addrs,
            bulk,
            filter,
        },
    );
    let task = tokio::spawn(actor.run(cancel));
    Ok((handle, task))
}

/// QUIC's keep-alive on a quiet mesh connection: a PING frame when nothing
/// else was sent for this long, well inside the idle timeout and NAT/UDP
/// state lifetimes. There is no libp2p ping: every rack would ping every
/// other one, which at 32 racks was the largest idle traffic of the field
/// and most of an idle agent's CPU. A connection that stopped carrying
/// packets is closed by SWIM (a peer it declares dead is disconnected), by
/// a fresh connection from a peer held suspect or dead, by a restarted
/// peer's stateless reset, or at the idle timeout.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How often identify runs again on a connection (it runs once as the
/// connection opens): listen addresses seldom change in a field.
pub const IDENTIFY_EVERY: Duration = Duration::from_secs(600);

fn build_swarm(s: &MeshSettings) -> Result<Swarm<Behaviour>, StartError> {
    let idle_ms = u32::try_from(s.idle_timeout.as_millis()).unwrap_or(u32::MAX);
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(s.max_connections))
        .with_max_established_per_peer(Some(s.max_connections_per_peer))
        .with_max_pending_incoming(Some(64))
        .with_max_pending_outgoing(Some(64));
    let swarm = libp2p::SwarmBuilder::with_existing_identity(s.keypair.clone())
        .with_tokio()
        .with_quic_config(|mut c| {
            c.max_idle_timeout = idle_ms;
            c.keep_alive_interval = KEEP_ALIVE.min(s.idle_timeout / 2);
            c
        })
        .with_behaviour(|key| Behaviour {
            limits: connection_limits::Behaviour::new(limits),
            identify: identify::Behaviour::new(
                identify::Config::new("/fieldrack/id/1".into(), key.public())
                    .with_agent_version(format!("fieldrack/{}", env!("CARGO_PKG_VERSION")))
                    .with_interval(IDENTIFY_EVERY),
            ),
            admit: request_response::cbor::Behaviour::new(
                [(StreamProtocol::new(ADMIT_PROTOCOL), ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(5)),
            ),
            rpc: request_response::cbor::Behaviour::new(
                [(StreamProtocol::new(RPC_PROTOCOL), ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(5))
                    .with_max_concurrent_streams(256),
            ),
            stream: libp2p_stream::Behaviour::new(),
        })
        .map_err(|e| StartError::Build(e.to_string()))?
        // Keep-alive is SWIM's and QUIC's business; never drop a quiet but
        // healthy link to a fellow rack.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    Ok(swarm)
}

/// What the actor publishes to stream users.
struct Shared {
    /// Admitted peers; rebuilt from `admission` whenever it changes.
    admitted: Admitted,
    /// Fires after each rebuild (the bulk plane closes lapsed peers).
    admitted_changed: watch::Sender<()>,
    /// Admitted peers' bulk endpoints.
    bulk_addrs: BulkAddrs,
    /// Our bulk plane (its port is gossiped).
    bulk: Option<BulkPlane>,
    /// The drill's traffic filter (written by [`MeshHandle::set_filter`]).
    filter: Arc<std::sync::RwLock<TrafficFilter>>,
}

struct Actor {
    /// What stream users read (admitted peers, their bulk endpoints).
    shared: Shared,
    settings: MeshSettings,
    swarm: Swarm<Behaviour>,
    listen_addrs: Vec<Multiaddr>,
    commands: mpsc::Receiver<Command>,
    discovered: mpsc::Receiver<Discovered>,
    events: broadcast::Sender<MeshEvent>,
    stats: Arc<MeshStats>,
    admission: Admission,
    membership: Membership<RackInfo>,
    rng: StdRng,
    /// Open connections per peer, oldest first, with when each was
    /// established.
    connections: HashMap<PeerId, Vec<(ConnectionId, Instant)>>,
    /// Remote addresses we are connected to (to skip bootstrap redials).
    connected_addrs: HashMap<ConnectionId, Multiaddr>,
    /// Where each known fleet peer can be dialled.
    addresses: HashMap<PeerId, Vec<Multiaddr>>,
    /// Rack names learned from certificates (kept after disconnect).
    rack_names: HashMap<PeerId, String>,
    /// Reconnect schedule per bootstrap address.
    bootstrap_backoff: Vec<(Multiaddr, Backoff)>,
    /// Reconnect schedule per known peer.
    peer_backoff: HashMap<PeerId, Backoff>,
    /// Redials in flight (at most [`MAX_REDIALS_PER_PEER`] per peer): a
    /// second one that completes after the first is closed.
    redials: HashMap<ConnectionId, PeerId>,
    /// Ack channels for inbound pings: (peer, seq) -> (channel, when).
    pending_acks: HashMap<(PeerId, u64), (ResponseChannel<RpcReply>, Instant)>,
    /// Refused peers to hang up on once they had time to read why.
    to_disconnect: Vec<(PeerId, Instant)>,
    /// Our certificate's offers to each connected peer that failed (the
    /// stream could not open, the connection it took closed...): resent
    /// while the peer is connected, at most [`MAX_CERT_OFFERS`] times, or
    /// the peer would drop us at its admission timeout.
    cert_offers_failed: HashMap<PeerId, u32>,
    /// Peers that failed admission (either way): not dialled during their
    /// hold-off, and logged once per backoff step.
    rejections: Rejections<PeerId>,
    /// Peers that timed out or found admission full: logged once per
    /// backoff step, but not held off (a fleet rack on a bad link or
    /// behind a flood must be redialled on its normal schedule).
    quiet_failures: Rejections<PeerId>,
    /// The peer last found behind each bootstrap address without a
    /// `/p2p/` suffix (so a rejected one is held off like a known peer).
    bootstrap_peers: HashMap<Multiaddr, PeerId>,
    /// When admitted peers' certificates are next re-checked.
    next_recheck: Instant,
}

impl Actor {
    // Called once, from `start`, with the pieces it just built.
    #[allow(clippy::too_many_arguments)]
    fn new(
        settings: MeshSettings,
        swarm: Swarm<Behaviour>,
        listen_addrs: Vec<Multiaddr>,
        commands: mpsc::Receiver<Command>,
        discovered: mpsc::Receiver<Discovered>,
        events: broadcast::Sender<MeshEvent>,
        stats: Arc<MeshStats>,
        shared: Shared,
    ) -> Self {
        let now = Instant::now();
        let mut admission = Admission::new(
            settings.fleet_key.clone(),
            settings.fleet_name.clone(),
            settings.admission_timeout,
        );
        for rev in &settings.revocations {
            if let Err(e) = admission.revoke(rev) {
                tracing::warn!(error = %e, "ignoring a stored revocation that does not verify");
            }
        }
        let local = *swarm.local_peer_id();
        let membership = Membership::new(
            local,
            settings.incarnation,
            settings.meta.clone(),
            settings.membership.clone(),
            StdRng::seed_from_u64(settings.seed),
            now,
        );
        let mut rng = StdRng::seed_from_u64(settings.seed ^ 0x5eed);
        // A bootstrap address naming its peer is dialled at once by the
        // lower id of the two only (see FIRST_DIAL_DEFER).
        let bootstrap_backoff = settings
            .bootstrap
            .iter()
            .map(|a| {
                let first = p2p_of(a).map_or(now, |peer| {
                    now + first_dial_delay(&local, &peer, rng.gen_range(0.5..1.5))
                });
                (
                    a.clone(),
                    Backoff::new(settings.reconnect_initial, settings.reconnect_max, first),
                )
            })
            .collect();
        Self {
            shared,
            rng,
            settings,
            swarm,
            listen_addrs,
            commands,
            discovered,
            events,
            stats,
            admission,
            membership,
            connections: HashMap::new(),
            connected_addrs: HashMap::new(),
            addresses: HashMap::new(),
            rack_names: HashMap::new(),
            bootstrap_backoff,
            peer_backoff: HashMap::new(),
            redials: HashMap::new(),
            pending_acks: HashMap::new(),
            to_disconnect: Vec::new(),
            cert_offers_failed: HashMap::new(),
            rejections: Rejections::default(),
            quiet_failures: Rejections::default(),
            bootstrap_peers: HashMap::new(),
            next_recheck: now + CERT_RECHECK,
        }
    }

    async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                Some(found) = self.discovered.recv() => self.on_discovered(found),
                _ = tick.tick() => self.on_tick(),
                ev = self.swarm.select_next_some() => self.on_swarm(ev),
            }
        }
        tracing::info!("mesh stopping");
    }

    fn jitter(&mut self) -> f64 {
        self.rng.gen_range(0.5..1.5)
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::SetMeta(mut meta) => {
                // The bulk port is the mesh's to say.
                meta.bulk_port = self
                    .shared
                    .bulk
                    .as_ref()
                    .and_then(BulkPlane::local_addr)
                    .map(|a| a.port());
                let out = self
                    .membership
                    .handle(Instant::now(), Input::SetMeta(*meta));
                self.apply(out);
            }
            Command::Revoke(rev, reply) => {
                let res = self.apply_revocation(&rev, None);
                let _ = reply.send(res);
            }
            Command::FilterChanged => {
                let filter = self.filter();
                tracing::warn!(?filter, "drill traffic filter installed");
                if filter.silent {
                    let peers: Vec<PeerId> = self.connections.keys().copied().collect();
                    for p in peers {
                        inc(&self.stats.filtered_total);
                        let _ = self.swarm.disconnect_peer_id(p);
                    }
                }
                self.sync_admitted();
            }
        }
    }

    fn filter(&self) -> TrafficFilter {
        self.shared.filter.read().expect("filter lock").clone()
    }

    /// Whether the filter lets a message from `peer` in (counted if not).
    fn passes_from(&self, peer: &PeerId) -> bool {
        let rack = self.rack_name(peer);
        let ok = self
            .shared
            .filter
            .read()
            .expect("filter lock")
            .passes_from(rack.as_deref());
        if !ok {
            inc(&self.stats.filtered_total);
        }
        ok
    }

    /// Whether the filter lets a message to `peer` out (counted if not).
    fn passes_to(&self, peer: &PeerId) -> bool {
        let rack = self.rack_name(peer);
        let ok = self
            .shared
            .filter
            .read()
            .expect("filter lock")
            .passes_to(rack.as_deref());
        if !ok {
            inc(&self.stats.filtered_total);
        }
        ok
    }

    /// Apply a revocation from the API (`from` None) or a peer. New ones
    /// are announced (to be persisted) and passed on to every admitted peer.
    fn apply_revocation(
        &mut self,
        rev: &Revocation,
        from: Option<PeerId>,
    ) -> Result<bool, CertError> {
        match self.admission.revoke(rev)? {
            RevokeOutcome::Known => Ok(false),
            RevokeOutcome::New(body) => {
                self.sync_admitted();
                inc(&self.stats.revocations_total);
                let peer: PeerId = body.peer_id.parse().expect("verified");
                tracing::warn!(rack = %body.rack, %peer, reason = %body.reason, "rack revoked");
                let _ = self.events.send(MeshEvent::Revoked(rev.clone()));
                let out = self
                    .membership
                    .handle(Instant::now(), Input::Revoked { id: peer });
                self.apply(out);
                if self.swarm.is_connected(&peer) {
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
                self.addresses.remove(&peer);
                self.peer_backoff.remove(&peer);
                let targets: Vec<PeerId> = self
                    .admission
                    .admitted_peers()
                    .map(|(p, _)| *p)
                    .filter(|p| Some(*p) != from)
                    .collect();
                for t in targets {
                    self.send_rpc(t, Rpc::Revocations(vec![rev.clone()]));
                }
                Ok(true)
            }
        }
    }

    /// Publish the admitted set to stream users, without the racks the
    /// traffic filter cuts off either way (no stream to or from them).
    fn sync_admitted(&self) {
        let filter = self.filter();
        let fresh: HashMap<PeerId, String> = self
            .admission
            .admitted_peers()
            .filter(|(_, b)| filter.carries_streams(Some(&b.rack)))
            .map(|(p, b)| (*p, b.rack.clone()))
            .collect();
        *self.shared.admitted.write().expect("admitted lock") = fresh;
        self.shared.admitted_changed.send_replace(());
        self.sync_bulk_addrs();
    }

    /// Publish each admitted peer's bulk endpoint: the port it gossips,
    /// at the IP of our mesh connection to it (the address that is known
    /// to reach it; a rack listening on 0.0.0.0 has many).
    fn sync_bulk_addrs(&self) {
        if self.shared.bulk.is_none() {
            return;
        }
        let fresh: HashMap<PeerId, SocketAddr> = self
            .admission
            .admitted_peers()
            .filter_map(|(p, _)| {
                let port = self.membership.member(p)?.meta.as_ref()?.bulk_port?;
                let ip = self
                    .connections
                    .get(p)?
                    .iter()
                    .rev()
                    .find_map(|(c, _)| self.connected_addrs.get(c).and_then(ip_of))?;
                Some((*p, SocketAddr::new(ip, port)))
            })
            .collect();
        *self.shared.bulk_addrs.write().expect("bulk addrs lock") = fresh;
    }

    /// The reconnect schedule of `peer`, made if it is new: its first
    /// dial is deferred on the higher id's side ([`first_dial_delay`]).
    fn peer_backoff_of(&mut self, peer: PeerId, now: Instant) -> &mut Backoff {
        if !self.peer_backoff.contains_key(&peer) {
            let j = self.jitter();
            let first = now + first_dial_delay(&self.membership.local_id(), &peer, j);
            self.peer_backoff.insert(
                peer,
                Backoff::new(
                    self.settings.reconnect_initial,
                    self.settings.reconnect_max,
                    first,
                ),
            );
        }
        self.peer_backoff.get_mut(&peer).expect("inserted above")
    }

    fn on_discovered(&mut self, found: Discovered) {
        if self.admission.is_revoked(&found.peer) {
            return;
        }
        self.remember_addrs(found.peer, found.addrs);
        self.peer_backoff_of(found.peer, Instant::now());
    }

    fn remember_addrs(&mut self, peer: PeerId, addrs: impl IntoIterator<Item = Multiaddr>) {
        let book = self.addresses.entry(peer).or_default();
        for a in addrs {
            let a = strip_p2p(a);
            let dialable = a.iter().next().is_some_and(|p| match p {
                Protocol::Ip4(ip) => !ip.is_unspecified(),
                Protocol::Ip6(ip) => !ip.is_unspecified(),
                _ => true,
            });
            if dialable && !book.contains(&a) {
                if book.len() >= MAX_ADDRS_PER_PEER {
                    book.remove(0);
                }
                book.push(a);
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let out = self.membership.handle(now, Input::Tick);
        self.apply(out);
        for peer in self.admission.expired(now) {
            inc(&self.stats.admission_timeouts_total);
            self.note_rejection(
                peer,
                "no fleet certificate within the admission timeout: disconnecting",
                "admission timeout".into(),
                false,
            );
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        if now >= self.next_recheck {
            self.next_recheck = now + CERT_RECHECK;
            self.recheck_admitted(now);
            self.rejections.prune(now);
            self.quiet_failures.prune(now);
        }
        let due: Vec<PeerId> = self
            .to_disconnect
            .iter()
            .filter(|(_, t)| *t <= now)
            .map(|(p, _)| *p)
            .collect();
        self.to_disconnect.retain(|(_, t)| *t > now);
        for p in due {
            if !self.admission.is_admitted(&p) {
                let _ = self.swarm.disconnect_peer_id(p);
            }
        }
        self.pending_acks
            .retain(|_, (_, t)| now.duration_since(*t) < PENDING_ACK_TTL);
        self.redial(now);
    }

    /// Certificates expire while connections stay up: drop the admission
    /// of every peer whose certificate is no longer valid, disconnect it,
    /// and declare it dead (so it stops being alive, and a voter, in this
    /// rack's view; the death is gossiped). It may come back with a
    /// renewed certificate.
    fn recheck_admitted(&mut self, now: Instant) {
        let lapsed = self.admission.recheck(unix_secs());
        if lapsed.is_empty() {
            return;
        }
        self.sync_admitted();
        for (peer, body, why) in lapsed {
            inc(&self.stats.expired_total);
            tracing::warn!(rack = %body.rack, %peer, %why, "admitted peer lost its admission: disconnecting");
            let _ = self.events.send(MeshEvent::Rejected {
                peer,
                reason: why.to_string(),
            });
            let out = self.membership.handle(now, Input::Expelled { id: peer });
            self.apply(out);
            let _ = self.swarm.disconnect_peer_id(peer);
            self.pending_acks.retain(|(p, _), _| *p != peer);
            let j = self.jitter();
            let _ = self.rejections.rejected(peer, now, j);
        }
    }

    /// One more admission failure of `peer` (we refused it, it refused us,
    /// or it timed out): log and record it once per backoff step rather
    /// than once per attempt, and with `hold`, stop dialling it for the
    /// step's duration.
    fn note_rejection(&mut self, peer: PeerId, what: &'static str, reason: String, hold: bool) {
        let now = Instant::now();
        let j = self.jitter();
        let table = if hold {
            &mut self.rejections
        } else {
            &mut self.quiet_failures
        };
        match table.rejected(peer, now, j) {
            Verdict::Warn {
                suppressed,
                retry_in,
            } => {
                tracing::warn!(%peer, %reason, suppressed, ?retry_in, "{what}");
                let _ = self.events.send(MeshEvent::Rejected { peer, reason });
            }
            Verdict::Quiet => tracing::debug!(%peer, %reason, "{what} (again)"),
        }
    }

    /// Keep trying bootstrap addresses and known fleet peers we are not
    /// connected to, each on its own backoff.
    fn redial(&mut self, now: Instant) {
        if self.filter().silent {
            return;
        }
        for i in 0..self.bootstrap_backoff.len() {
            let addr = self.bootstrap_backoff[i].0.clone();
            let peer = p2p_of(&addr).or_else(|| self.bootstrap_peers.get(&addr).copied());
            // The schedule starts over only once the peer there is
            // admitted: a connection that is then refused must not reset it,
            // or a rejected peer would be redialled every tick.
            if peer.is_some_and(|p| self.admission.is_admitted(&p)) {
                let (_, b) = &mut self.bootstrap_backoff[i];
                b.reset(now);
                continue;
            }
            let leave_alone = match peer {
                Some(peer) => {
                    self.swarm.is_connected(&peer)
                        || self.admission.is_revoked(&peer)
                        || peer == self.membership.local_id()
                        || self.rejections.holds(&peer, now)
                }
                None => false,
            } || self
                .connected_addrs
                .values()
                .any(|a| strip_p2p(a.clone()) == addr);
            if leave_alone {
                continue;
            }
            if self.bootstrap_backoff[i].1.due(now) {
                let j = self.jitter();
                self.bootstrap_backoff[i].1.attempted(now, j);
                inc(&self.stats.dials_total);
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::debug!(%addr, error = %e, "dial failed");
                }
            }
        }
        let candidates: Vec<PeerId> = self.peer_backoff.keys().copied().collect();
        for peer in candidates {
            if self.swarm.is_connected(&peer)
                || self.admission.is_revoked(&peer)
                || self.rejections.holds(&peer, now)
            {
                continue;
            }
            let Some(addrs) = self.addresses.get(&peer).cloned() else {
                continue;
            };
            if addrs.is_empty() || !self.peer_backoff[&peer].due(now) {
                continue;
            }
            if self.redials.values().filter(|p| **p == peer).count() >= MAX_REDIALS_PER_PEER {
                continue;
            }
            let j = self.jitter();
            if let Some(b) = self.peer_backoff.get_mut(&peer) {
                b.attempted(now, j);
            }
            inc(&self.stats.dials_total);
            // Beside any dial still waiting on its handshake timer (see
            // MAX_REDIALS_PER_PEER), not after it.
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::Disconnected)
                .build();
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    self.redials.insert(id, peer);
                }
                Err(e) => tracing::debug!(%peer, error = %e, "dial failed"),
            }
        }
    }

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } if !self.listen_addrs.contains(&address) => {
                self.listen_addrs.push(address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let now = Instant::now();
                let redial = self.redials.remove(&connection_id).is_some();
                if self.filter().silent {
                    // No power: nobody gets in.
                    inc(&self.stats.filtered_total);
                    self.swarm.close_connection(connection_id);
                    return;
                }
                if redial
                    && self
                        .connections
                        .get(&peer_id)
                        .is_some_and(|c| !c.is_empty())
                {
                    // A redial that completed after another connection to
                    // the peer did: one is enough.
                    self.swarm.close_connection(connection_id);
                    return;
                }
                if !self.admission.connected(peer_id, now) {
                    inc(&self.stats.rejected_total);
                    let revoked = self.admission.is_revoked(&peer_id);
                    let reason = if revoked {
                        "revoked"
                    } else {
                        "too many peers waiting for admission"
                    };
                    self.note_rejection(peer_id, "refusing a connection", reason.into(), revoked);
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                self.connected_addrs
                    .insert(connection_id, endpoint.get_remote_address().clone());
                if endpoint.is_dialer() {
                    let remote = strip_p2p(endpoint.get_remote_address().clone());
                    if self.bootstrap_backoff.iter().any(|(a, _)| *a == remote) {
                        self.bootstrap_peers.insert(remote, peer_id);
                    }
                    self.remember_addrs(peer_id, [endpoint.get_remote_address().clone()]);
                }
                // A fresh connection to a peer we hold suspect or dead means
                // it restarted or a link healed: connections older than the
                // suspicion are stale (they would swallow messages until
                // they time out); see `stale`.
                let suspected_since = self
                    .membership
                    .member(&peer_id)
                    .filter(|m| matches!(m.state, State::Dead | State::Suspect))
                    .map(|m| m.since);
                let conns = self.connections.entry(peer_id).or_default();
                if let Some(since) = suspected_since {
                    let old = crate::stale::stale(conns, since);
                    conns.retain(|(c, _)| !old.contains(c));
                    for c in old {
                        self.swarm.close_connection(c);
                    }
                }
                conns.push((connection_id, Instant::now()));
                self.sync_bulk_addrs();
                self.offer_certificate(peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.connected_addrs.remove(&connection_id);
                if let Some(c) = self.connections.get_mut(&peer_id) {
                    c.retain(|(id, _)| *id != connection_id);
                }
                self.sync_bulk_addrs();
                if num_established == 0 {
                    self.connections.remove(&peer_id);
                    self.cert_offers_failed.remove(&peer_id);
                    self.admission.disconnected(&peer_id);
                    self.sync_admitted();
                    self.pending_acks.retain(|(p, _), _| *p != peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id,
                error,
                connection_id,
            } => {
                self.redials.remove(&connection_id);
                tracing::debug!(peer = ?peer_id, %error, "outgoing connection failed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Admit(ev)) => self.on_admit(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(ev)) => self.on_rpc(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if self.admission.is_admitted(&peer_id) => {
                let addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .into_iter()
                    .filter(|a| !is_loopback(a) || self.is_local_field())
                    .collect();
                self.remember_addrs(peer_id, addrs);
            }
            _ => {}
        }
    }

    /// A field running entirely on loopback (the demo, tests) keeps
    /// loopback addresses; a real rack ignores them.
    fn is_local_field(&self) -> bool {
        self.listen_addrs.iter().all(is_loopback)
    }

    fn on_admit(&mut self, ev: request_response::Event<AdmitRequest, AdmitResponse>) {
        use request_response::{Event, Message as RrMessage};
        match ev {
            Event::Message {
                peer,
                message:
                    RrMessage::Request {
                        request, channel, ..
                    },
                ..
            } => {
                match self
                    .admission
                    .present(peer, &request.certificate, unix_secs())
                {
                    Ok((body, newly)) => {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .admit
                            .send_response(channel, AdmitResponse::Accepted);
                        self.rack_names.insert(peer, body.rack.clone());
                        self.rejections.admitted(&peer);
                        self.quiet_failures.admitted(&peer);
                        if newly {
                            inc(&self.stats.admitted_total);
                            self.sync_admitted();
                            tracing::info!(rack = %body.rack, %peer, "peer admitted");
                            let now = Instant::now();
                            self.peer_backoff_of(peer, now).reset(now);
                            let revs: Vec<Revocation> = self
                                .admission
                                .revocations()
                                .iter()
                                .take(MAX_REVOCATIONS_PER_MESSAGE)
                                .cloned()
                                .collect();
                            if !revs.is_empty() {
                                self.send_rpc(peer, Rpc::Revocations(revs));
                            }
                        }
                        // Also on a re-admission over a fresh connection: if
                        // we hold the peer dead or suspect, this pokes it so
                        // it refutes at once.
                        let out = self
                            .membership
                            .handle(Instant::now(), Input::Discovered { id: peer });
                        self.apply(out);
                    }
                    Err(e) => {
                        inc(&self.stats.rejected_total);
                        let reason = e.to_string();
                        self.note_rejection(peer, "peer refused admission", reason.clone(), true);
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .admit
                            .send_response(channel, AdmitResponse::Rejected { reason });
                        self.to_disconnect
                            .push((peer, Instant::now() + REJECT_LINGER));
                    }
                }
            }
            Event::Message {
                peer,
                message:
                    RrMessage::Response {
                        response: AdmitResponse::Rejected { reason },
                        ..
                    },
                ..
            } => {
                self.note_rejection(peer, "peer refused our certificate", reason, true);
            }
            Event::Message {
                peer,
                message:
                    RrMessage::Response {
                        response: AdmitResponse::Accepted,
                        ..
                    },
                ..
            } => {
                self.cert_offers_failed.remove(&peer);
            }
            Event::OutboundFailure { peer, error, .. } => {
                let connected = self.connections.get(&peer).is_some_and(|c| !c.is_empty());
                let failed = self.cert_offers_failed.entry(peer).or_default();
                *failed += 1;
                tracing::debug!(%peer, %error, failed = *failed, connected, "our certificate did not reach the peer");
                if connected && *failed <= MAX_CERT_OFFERS {
                    inc(&self.stats.cert_offers_retried_total);
                    self.offer_certificate(peer);
                }
            }
            _ => {}
        }
    }

    /// Send our certificate to `peer` (on any of its connections).
    fn offer_certificate(&mut self, peer: PeerId) {
        let cert = self.settings.certificate.clone();
        self.swarm
            .behaviour_mut()
            .admit
            .send_request(&peer, AdmitRequest { certificate: cert });
    }

    fn on_rpc(&mut self, ev: request_response::Event<Rpc, RpcReply>) {
        use request_response::{Event, Message as RrMessage};
        let now = Instant::now();
        match ev {
            Event::Message {
                peer,
                message:
                    RrMessage::Request {
                        request, channel, ..
                    },
                ..
            } => {
                if !self.admission.is_admitted(&peer) {
                    // Not a fleet member (yet): read nothing, answer nothing.
                    inc(&self.stats.rpc_dropped_unadmitted_total);
                    return;
                }
                if !self.passes_from(&peer) {
                    // A drill cut this link: as if it never arrived.
                    return;
                }
                inc(&self.stats.rpc_received_total);
                match request {
                    Rpc::Swim(msg) => {
                        if let Message::Ping { seq, .. } = &msg {
                            if self.pending_acks.len() < MAX_PENDING_ACKS {
                                self.pending_acks.insert((peer, *seq), (channel, now));
                            }
                        } else {
                            let _ = self
                                .swarm
                                .behaviour_mut()
                                .rpc
                                .send_response(channel, RpcReply::Ok);
                        }
                        let out = self
                            .membership
                            .handle(now, Input::Received { from: peer, msg });
                        self.apply(out);
                    }
                    Rpc::Revocations(list) => {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .rpc
                            .send_response(channel, RpcReply::Ok);
                        for rev in list.iter().take(MAX_REVOCATIONS_PER_MESSAGE) {
                            if let Err(e) = self.apply_revocation(rev, Some(peer)) {
                                tracing::warn!(%peer, error = %e, "peer sent a revocation that does not verify");
                            }
                        }
                    }
                }
            }
            Event::Message {
                peer,
                message:
                    RrMessage::Response {
                        response: RpcReply::Swim(msg),
                        ..
                    },
                ..
            } if self.admission.is_admitted(&peer) && self.passes_from(&peer) => {
                inc(&self.stats.rpc_received_total);
                let out = self
                    .membership
                    .handle(now, Input::Received { from: peer, msg });
                self.apply(out);
            }
            Event::OutboundFailure { peer, error, .. } => {
                tracing::trace!(%peer, %error, "rpc failed");
            }
            _ => {}
        }
    }

    fn send_rpc(&mut self, to: PeerId, rpc: Rpc) {
        if !self.passes_to(&to) {
            return;
        }
        inc(&self.stats.rpc_sent_total);
        self.swarm.behaviour_mut().rpc.send_request(&to, rpc);
    }

    fn apply(&mut self, outputs: Vec<Output<RackInfo>>) {
        for out in outputs {
            match out {
                Output::Send { to, msg } => {
                    if !self.admission.is_admitted(&to) {
                        // Not connected (or not yet re-admitted): no rack data
                        // goes out before the certificate is checked. SWIM
                        // treats this as a lost message; the redial loop
                        // reconnects.
                        if !self.swarm.is_connected(&to) && !self.admission.is_revoked(&to) {
                            self.peer_backoff_of(to, Instant::now());
                        }
                        continue;
                    }
                    if !self.passes_to(&to) {
                        // A drill cut this link (SWIM counts it as loss).
                        self.pending_acks.retain(|(p, _), _| *p != to);
                        continue;
                    }
                    if let Message::Ack { seq, .. } = &msg {
                        if let Some((channel, _)) = self.pending_acks.remove(&(to, *seq)) {
                            inc(&self.stats.rpc_sent_total);
                            match self
                                .swarm
                                .behaviour_mut()
                                .rpc
                                .send_response(channel, RpcReply::Swim(msg))
                            {
                                Ok(()) => continue,
                                Err(RpcReply::Swim(msg)) => {
                                    self.send_rpc(to, Rpc::Swim(msg));
                                    continue;
                                }
                                Err(_) => continue,
                            }
                        }
                    }
                    self.send_rpc(to, Rpc::Swim(msg));
                }
                Output::Changed { id, from, to } => {
                    inc(&self.stats.transitions_total);
                    let rack = self.rack_name(&id);
                    match to {
                        State::Alive => {
                            tracing::info!(rack = ?rack, peer = %id, ?from, "rack alive")
                        }
                        State::Suspect => {
                            tracing::warn!(rack = ?rack, peer = %id, ?from, "rack suspect")
                        }
                        State::Dead => tracing::warn!(rack = ?rack, peer = %id, ?from, "rack dead"),
                    }
                    if to == State::Dead && self.swarm.is_connected(&id) {
                        // SWIM decided: its connections are stale (a killed
                        // rack's QUIC connections linger until the idle
                        // timeout and fill its connection slots, so its
                        // restart could not get in). If it is alive after
                        // all, it reconnects and refutes.
                        let _ = self.swarm.disconnect_peer_id(id);
                    }
                    if !self.admission.is_revoked(&id) {
                        self.peer_backoff_of(id, Instant::now());
                    }
                    let _ = self.events.send(MeshEvent::StateChanged {
                        peer: id,
                        rack,
                        from,
                        to,
                    });
                }
                Output::MetaChanged { id } => {
                    if let Some(meta) = self.membership.member(&id).and_then(|m| m.meta.clone()) {
                        self.rack_names.entry(id).or_insert(meta.rack);
                    }
                    self.sync_bulk_addrs();
                }
            }
        }
    }

    fn rack_name(&self, id: &PeerId) -> Option<String> {
        self.rack_names.get(id).cloned().or_else(|| {
            self.membership
                .member(id)
                .and_then(|m| m.meta.as_ref().map(|x| x.rack.clone()))
        })
    }

    fn status(&self) -> MeshStatus {
        let now = Instant::now();
        let peers = self
            .membership
            .members()
            .filter(|m| !self.admission.is_revoked(&m.id))
            .map(|m| PeerStatus {
                peer_id: m.id,
                rack: self.rack_name(&m.id),
                state: m.state,
                incarnation: m.incarnation,
                rtt: m.rtt,
                last_seen: m.last_seen.map(|t| now.saturating_duration_since(t)),
                since: now.saturating_duration_since(m.since),
                connected: self.swarm.is_connected(&m.id),
                meta: m.meta.clone(),
            })
            .collect();
        MeshStatus {
            peer_id: self.membership.local_id(),
            incarnation: self.membership.local_incarnation(),
            listen_addrs: self.listen_addrs.clone(),
            peers,
            revocations: self.admission.revocations().to_vec(),
            revoked_peers: self
                .admission
                .revoked_peers()
                .map(|(p, r)| (*p, r.clone()))
                .collect(),
            bulk_addr: self.shared.bulk.as_ref().and_then(BulkPlane::local_addr),
            bulk_connections: self.shared.bulk.as_ref().map_or(0, BulkPlane::connections),
        }
    }
}

fn strip_p2p(mut a: Multiaddr) -> Multiaddr {
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

fn p2p_of(a: &Multiaddr) -> Option<PeerId> {
    a.iter().find_map(|p| {
        if let Protocol::P2p(id) = p {
            Some(id)
        } else {
            None
        }
    })
}

fn ip_of(a: &Multiaddr) -> Option<std::net::IpAddr> {
    match a.iter().next()? {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    }
}

fn is_loopback(a: &Multiaddr) -> bool {
    match a.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        _ => false,
    }
}
