//! The bulk endpoint: one UDP socket, at most one QUIC connection per peer
//! pair (dialled on demand, re-dialled once lost), streams routed to the
//! bulk protocols' accept queues by their header.
//!
//! Admission is the mesh's: a connection whose verified PeerId is not
//! admitted right now is closed right after its handshake, before it can
//! open a stream; a stream is routed only if its peer is still admitted;
//! and every bulk connection of a peer that loses admission (revoked,
//! certificate expired, mesh connection lost) is closed as soon as the
//! actor publishes the change.
//!
//! A connection that goes silent in the middle of a transfer (a radio
//! fade) is watched ([`super::silence`]): probe dials find the link's
//! return within a fraction of a second, and the first that completes
//! replaces the stalled connection, whose backed-off loss recovery could
//! otherwise sit idle for as long again as the fade lasted.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use deploy::config::Congestion;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use quinn::VarInt;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::header;
use super::silence::{self, Silence, Verdict};
use super::stream::MeshStream;
use super::tls::{self, TlsError};
use super::transport;
use super::window::Window;
use crate::node::{Admitted, MeshStats};

/// Connections the endpoint keeps (all peers, duplicates during their
/// grace included): a fleet has tens of racks, each with one connection
/// to us; the bound stops a flood of admitted-but-misbehaving peers.
pub const MAX_CONNECTIONS: usize = 256;

/// Handshakes in progress at once; more incoming connections are refused
/// (a client retries). Unadmitted peers cost us a handshake each, so this
/// caps that work.
pub const MAX_HANDSHAKES: usize = 16;

/// Inbound streams of one protocol waiting for its server to take them;
/// one beyond is reset (the opener retries or falls back). The services
/// behind (`MAX_SERVES` pushes, the cache's GETs) take them at once.
pub const ACCEPT_QUEUE: usize = 16;

/// How long a handshake may take: several round trips of the 600 ms
/// satellite hop, with retransmissions at its 1 % loss.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new stream has to send its header before it is reset.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a connection's silence ([`silence`]) and send window
/// ([`super::window`]) are looked at: a tenth of [`silence::SILENCE`],
/// cheap (one stats read per connection).
pub const SILENCE_CHECK: Duration = Duration::from_millis(100);

/// After a failed dial, streams to that peer go over the mesh for this
/// long without trying again (a firewalled bulk port must not cost every
/// stream a handshake timeout).
pub const DIAL_HOLDOFF: Duration = Duration::from_secs(30);

/// A duplicate connection (both sides dialled at once) is closed this
/// long after losing the tie-break, so a stream its opener started on it
/// before learning of the other connection can finish a short exchange;
/// a long one is retried by its service.
pub const DUPLICATE_GRACE: Duration = Duration::from_secs(10);

/// Application close code: the peer is not admitted.
pub const CLOSE_NOT_ADMITTED: VarInt = VarInt::from_u32(1);
/// Application close code: the connection lost the duplicate tie-break.
pub const CLOSE_DUPLICATE: VarInt = VarInt::from_u32(2);
/// Application close code: the agent is shutting down.
pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(3);
/// Application close code: the connection went silent (a fade) and a
/// probe connection replaced it.
pub const CLOSE_REPLACED: VarInt = VarInt::from_u32(4);
/// Stream reset code: no such bulk protocol here.
pub const RESET_UNKNOWN_PROTOCOL: VarInt = VarInt::from_u32(1);
/// Stream reset code: the protocol's accept queue is full.
pub const RESET_BUSY: VarInt = VarInt::from_u32(2);
/// Stream reset code: bad header, or the peer is no longer admitted.
pub const RESET_REFUSED: VarInt = VarInt::from_u32(3);

/// Each admitted peer's bulk endpoint, as the mesh actor knows it: the
/// port it gossips, at the IP its mesh connection uses.
pub type BulkAddrs = Arc<RwLock<HashMap<PeerId, SocketAddr>>>;

/// What the bulk plane runs with.
#[derive(Debug, Clone)]
pub struct BulkSettings {
    /// UDP `host:port` to bind (port 0: any).
    pub listen: SocketAddr,
    /// Congestion controller of every bulk connection.
    pub congestion: Congestion,
    /// The protocols carried by the bulk plane when the peer has one
    /// (the registry): everything else stays on the mesh.
    pub protocols: Vec<&'static str>,
}

/// Why the bulk endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("binding the bulk endpoint on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A registered protocol name cannot be framed.
    #[error(transparent)]
    Protocol(#[from] header::NameError),
}

/// Why a bulk stream could not be opened (the caller falls back to the
/// mesh).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The peer gossips no bulk endpoint (an older rack, or disabled).
    #[error("{0} has no bulk endpoint")]
    NoEndpoint(PeerId),
    /// A dial failed recently; not retried before [`DIAL_HOLDOFF`].
    #[error("a bulk dial to {0} failed recently")]
    HeldOff(PeerId),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The dial could not start.
    #[error("dialling {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: quinn::ConnectError,
    },
    /// The handshake failed.
    #[error("bulk handshake with {addr}: {source}")]
    Handshake {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: quinn::ConnectionError,
    },
    /// The handshake took longer than [`HANDSHAKE_TIMEOUT`].
    #[error("bulk handshake with {0} timed out")]
    Timeout(SocketAddr),
    /// The endpoint there is not the peer we meant.
    #[error("the bulk endpoint at {addr} is not {expected}")]
    WrongPeer {
        /// Where.
        addr: SocketAddr,
        /// Who we expected.
        expected: PeerId,
    },
    /// The stream could not be opened on the connection.
    #[error("opening a bulk stream: {0}")]
    Stream(#[from] quinn::ConnectionError),
    /// The header could not be sent.
    #[error("sending the stream header: {0}")]
    Header(#[from] quinn::WriteError),
    /// The protocol name cannot be framed.
    #[error(transparent)]
    Protocol(#[from] header::NameError),
}

/// What the plane shares with the mesh actor.
pub(crate) struct Wiring {
    /// Peers admitted right now.
    pub admitted: Admitted,
    /// Fires whenever the admitted set changes.
    pub changed: watch::Receiver<()>,
    /// Admitted peers' bulk endpoints.
    pub addrs: BulkAddrs,
    /// Byte and refusal counters.
    pub stats: Arc<MeshStats>,
}

/// The agent's bulk endpoint (cheap to clone).
#[derive(Clone)]
pub struct BulkPlane {
    inner: Arc<Inner>,
}

struct Inner {
    local: PeerId,
    keypair: Keypair,
    endpoint: quinn::Endpoint,
    transport: Arc<quinn::TransportConfig>,
    admitted: Admitted,
    addrs: BulkAddrs,
    /// Per peer: the connection streams to it use (and dial serialisation).
    slots: Mutex<HashMap<PeerId, Arc<tokio::sync::Mutex<Slot>>>>,
    /// Every open connection (duplicates in their grace included), by
    /// `stable_id`, so a lost admission closes all of them.
    conns: Mutex<HashMap<usize, (PeerId, quinn::Connection)>>,
    /// `stable_id`s of connections that heard nothing from their peer
    /// for [`silence::SILENCE`] (a subset of `conns`): a new connection
    /// from the peer (its probe after a fade, or a redial) replaces one of
    /// these whatever the duplicate tie-break says.
    silent: Mutex<HashSet<usize>>,
    routes: HashMap<&'static str, Route>,
    handshakes: Arc<Semaphore>,
    stats: Arc<MeshStats>,
    cancel: CancellationToken,
}

struct Route {
    tx: mpsc::Sender<(PeerId, MeshStream)>,
    rx: Mutex<Option<mpsc::Receiver<(PeerId, MeshStream)>>>,
}

#[derive(Default)]
struct Slot {
    /// The connection in use, and who dialled it.
    conn: Option<(quinn::Connection, PeerId)>,
    /// When a dial last failed.
    failed_at: Option<Instant>,
}

impl BulkPlane {
    /// Bind the endpoint and start accepting.
    ///
    /// # Errors
    /// [`BindError`].
    pub(crate) fn bind(
        settings: &BulkSettings,
        keypair: &Keypair,
        idle_timeout: Duration,
        wiring: Wiring,
        cancel: CancellationToken,
    ) -> Result<Self, BindError> {
        let Wiring {
            admitted,
            changed,
            addrs,
            stats,
        } = wiring;
        for p in &settings.protocols {
            header::encode(p)?;
        }
        let transport = Arc::new(transport::config(settings.congestion, idle_timeout));
        let mut server = quinn::ServerConfig::with_crypto(tls::server(keypair)?);
        server.transport = transport.clone();
        server.migration(false);
        server.max_incoming(MAX_HANDSHAKES);
        let endpoint =
            quinn::Endpoint::server(server, settings.listen).map_err(|source| BindError::Bind {
                addr: settings.listen,
                source,
            })?;
        let routes = settings
            .protocols
            .iter()
            .map(|p| {
                let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
                (
                    *p,
                    Route {
                        tx,
                        rx: Mutex::new(Some(rx)),
                    },
                )
            })
            .collect();
        let plane = Self {
            inner: Arc::new(Inner {
                local: PeerId::from(keypair.public()),
                keypair: keypair.clone(),
                endpoint,
                transport,
                admitted,
                addrs,
                slots: Mutex::default(),
                conns: Mutex::default(),
                silent: Mutex::default(),
                routes,
                handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
                stats,
                cancel,
            }),
        };
        tokio::spawn(plane.clone().accept_loop());
        tokio::spawn(plane.clone().admission_loop(changed));
        Ok(plane)
    }

    /// The bound address (the real port when bound to port 0).
    #[must_use]
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.endpoint.local_addr().ok()
    }

    /// Whether `protocol` is one the bulk plane carries.
    #[must_use]
    pub fn carries(&self, protocol: &str) -> bool {
        self.inner.routes.contains_key(protocol)
    }

    /// The accept queue of `protocol` (once; None if not carried or taken).
    pub(crate) fn take_incoming(
        &self,
        protocol: &str,
    ) -> Option<mpsc::Receiver<(PeerId, MeshStream)>> {
        self.inner
            .routes
            .get(protocol)?
            .rx
            .lock()
            .expect("route lock")
            .take()
    }

    /// Bulk connections open right now.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.inner.conns.lock().expect("conns lock").len()
    }

    fn admitted(&self, peer: &PeerId) -> bool {
        self.inner
            .admitted
            .read()
            .expect("admitted lock")
            .contains_key(peer)
    }

    fn slot(&self, peer: PeerId) -> Arc<tokio::sync::Mutex<Slot>> {
        self.inner
            .slots
            .lock()
            .expect("slots lock")
            .entry(peer)
            .or_default()
            .clone()
    }

    /// Open a stream of `protocol` to `peer` (admitted: the caller checked)
    /// on the pair's bulk connection, dialling it first if there is none.
    ///
    /// # Errors
    /// [`OpenError`]: the caller falls back to the mesh.
    pub(crate) async fn open(&self, peer: PeerId, protocol: &str) -> Result<MeshStream, OpenError> {
        let head = header::encode(protocol)?;
        let addr = self
            .inner
            .addrs
            .read()
            .expect("bulk addrs lock")
            .get(&peer)
            .copied()
            .ok_or(OpenError::NoEndpoint(peer))?;
        let conn = self.connection(peer, addr).await?;
        let (mut send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                // Lost under us: forget it, the next stream re-dials.
                self.forget(peer, &conn).await;
                return Err(e.into());
            }
        };
        send.write_all(&head).await?;
        Ok(MeshStream::bulk(send, recv, self.inner.stats.clone()))
    }

    /// The pair's live connection, dialled if there is none.
    async fn connection(
        &self,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, OpenError> {
        let slot = self.slot(peer);
        let mut slot = slot.lock().await;
        if let Some((c, _)) = &slot.conn {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
            slot.conn = None;
        }
        if slot.failed_at.is_some_and(|t| t.elapsed() < DIAL_HOLDOFF) {
            return Err(OpenError::HeldOff(peer));
        }
        match self.dial(peer, addr).await {
            Ok(conn) => {
                slot.failed_at = None;
                slot.conn = Some((conn.clone(), self.inner.local));
                drop(slot);
                self.serve(peer, conn.clone());
                Ok(conn)
            }
            Err(e) => {
                slot.failed_at = Some(Instant::now());
                tracing::debug!(%peer, %addr, error = %e, "bulk dial failed: using the mesh");
                Err(e)
            }
        }
    }

    async fn dial(&self, peer: PeerId, addr: SocketAddr) -> Result<quinn::Connection, OpenError> {
        let mut client = quinn::ClientConfig::new(tls::client(&self.inner.keypair, peer)?);
        client.transport_config(self.inner.transport.clone());
        let connecting = self
            .inner
            .endpoint
            .connect_with(client, addr, tls::SERVER_NAME)
            .map_err(|source| OpenError::Connect { addr, source })?;
        let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
            .await
            .map_err(|_| OpenError::Timeout(addr))?
            .map_err(|source| OpenError::Handshake { addr, source })?;
        if tls::remote_peer(&conn) != Some(peer) {
            conn.close(CLOSE_NOT_ADMITTED, b"unexpected peer");
            return Err(OpenError::WrongPeer {
                addr,
                expected: peer,
            });
        }
        tracing::debug!(%peer, %addr, "bulk connection dialled");
        Ok(conn)
    }

    async fn forget(&self, peer: PeerId, conn: &quinn::Connection) {
        let slot = self.slot(peer);
        let mut slot = slot.lock().await;
        if slot
            .conn
            .as_ref()
            .is_some_and(|(c, _)| c.stable_id() == conn.stable_id())
        {
            slot.conn = None;
        }
    }

    async fn accept_loop(self) {
        loop {
            let incoming = tokio::select! {
                () = self.inner.cancel.cancelled() => break,
                i = self.inner.endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
            };
            let permit = match self.inner.handshakes.clone().try_acquire_owned() {
                Ok(p) if self.connections() < MAX_CONNECTIONS => p,
                _ => {
                    incoming.refuse();
                    continue;
                }
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                me.handshake(incoming).await;
            });
        }
        self.inner.endpoint.close(CLOSE_SHUTDOWN, b"shutting down");
    }

    async fn handshake(&self, incoming: quinn::Incoming) {
        let from = incoming.remote_address();
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%from, error = %e, "bulk handshake refused");
                return;
            }
        };
        let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(%from, error = %e, "bulk handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%from, "bulk handshake timed out");
                return;
            }
        };
        let Some(peer) = tls::remote_peer(&conn).filter(|p| self.admitted(p)) else {
            crate::node::inc(&self.inner.stats.bulk_refused_total);
            tracing::debug!(%from, "bulk connection from a peer not admitted: closing");
            conn.close(CLOSE_NOT_ADMITTED, b"not admitted");
            return;
        };
        let slot = self.slot(peer);
        let mut slot = slot.lock().await;
        // Both sides may dial at once: keep the connection the lower
        // PeerId dialled (both sides decide alike), unless the one we hold
        // has the same dialler (then the peer redialled: ours is stale).
        // A silent one (a fade) is stalled: the peer's probe replaces it.
        let canonical = self.inner.local.min(peer);
        let mut stalled = false;
        let keep_new = match &slot.conn {
            Some((c, dialler)) if c.close_reason().is_none() => {
                stalled = self.is_silent(c);
                stalled || peer == canonical || *dialler == peer
            }
            _ => true,
        };
        if keep_new {
            if let Some((old, _)) = slot.conn.replace((conn.clone(), peer)) {
                if stalled {
                    tracing::info!(%peer, "bulk link back after a fade: the peer's new connection replaces the stalled one");
                    old.close(CLOSE_REPLACED, b"replaced after a fade");
                } else {
                    retire(old);
                }
            }
        } else {
            retire(conn.clone());
        }
        slot.failed_at = None;
        drop(slot);
        tracing::debug!(%peer, %from, "bulk connection accepted");
        self.serve(peer, conn);
    }

    fn is_silent(&self, conn: &quinn::Connection) -> bool {
        self.inner
            .silent
            .lock()
            .expect("silent lock")
            .contains(&conn.stable_id())
    }

    /// Register `conn`, watch its silence and route the streams `peer`
    /// opens on it.
    fn serve(&self, peer: PeerId, conn: quinn::Connection) {
        self.inner
            .conns
            .lock()
            .expect("conns lock")
            .insert(conn.stable_id(), (peer, conn.clone()));
        tokio::spawn(self.clone().watch(peer, conn.clone()));
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let (send, recv) = tokio::select! {
                    () = me.inner.cancel.cancelled() => break,
                    s = conn.accept_bi() => match s {
                        Ok(s) => s,
                        Err(_) => break,
                    },
                };
                if !me.admitted(&peer) {
                    conn.close(CLOSE_NOT_ADMITTED, b"not admitted");
                    break;
                }
                // At most the connection's stream limit of these at once.
                tokio::spawn(me.clone().route(peer, send, recv));
            }
            me.inner
                .conns
                .lock()
                .expect("conns lock")
                .remove(&conn.stable_id());
            me.set_silent(&conn, false);
            me.forget(peer, &conn).await;
        });
    }

    async fn route(self, peer: PeerId, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, code| {
            let _ = send.reset(code);
            let _ = recv.stop(code);
        };
        let protocol = match tokio::time::timeout(HEADER_TIMEOUT, header::read(&mut recv)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "bad bulk stream header");
                refuse(&mut send, &mut recv, RESET_REFUSED);
                return;
            }
            Err(_) => {
                refuse(&mut send, &mut recv, RESET_REFUSED);
                return;
            }
        };
        let Some(route) = self.inner.routes.get(protocol.as_str()) else {
            refuse(&mut send, &mut recv, RESET_UNKNOWN_PROTOCOL);
            return;
        };
        if !self.admitted(&peer) {
            crate::node::inc(&self.inner.stats.bulk_refused_total);
            refuse(&mut send, &mut recv, RESET_REFUSED);
            return;
        }
        let stream = MeshStream::bulk(send, recv, self.inner.stats.clone());
        if let Err(e) = route.tx.try_send((peer, stream)) {
            let (_, stream) = match e {
                mpsc::error::TrySendError::Full(v) | mpsc::error::TrySendError::Closed(v) => v,
            };
            tracing::debug!(%peer, %protocol, "bulk accept queue full: resetting the stream");
            stream.reset(RESET_BUSY);
        }
    }

    fn set_silent(&self, conn: &quinn::Connection, silent: bool) {
        let mut set = self.inner.silent.lock().expect("silent lock");
        if silent {
            set.insert(conn.stable_id());
        } else {
            set.remove(&conn.stable_id());
        }
    }

    /// Watches `conn` until it closes: sizes its send window from its
    /// measured round trip and rate ([`super::window`]); while it is
    /// silent (see [`silence`]), dials probe connections to `peer`, the
    /// first that completes becomes the pair's connection and `conn` is
    /// closed, so the transfers cut with it start again on a connection
    /// whose loss recovery is not backed off.
    async fn watch(self, peer: PeerId, conn: quinn::Connection) {
        let stats = conn.stats();
        let mut state = Silence::new(Instant::now(), silence::Counts::of(&stats));
        let mut window = Window::new(transport::SEND_WINDOW, Instant::now(), stats.udp_tx.bytes);
        // Dropped on return: probes still in flight are abandoned.
        let mut probes: JoinSet<Result<quinn::Connection, OpenError>> = JoinSet::new();
        let mut tick = tokio::time::interval(SILENCE_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.inner.cancel.cancelled() => return,
                _ = conn.closed() => return,
                Some(done) = probes.join_next(), if !probes.is_empty() => {
                    if let Ok(Ok(new)) = done {
                        if conn.close_reason().is_none() {
                            self.replace(peer, &conn, new).await;
                        } else {
                            // Closed meanwhile: the probe may serve anyway.
                            self.adopt(peer, new).await;
                        }
                        return;
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let stats = conn.stats();
                    if let Some(w) = window.observe(now, conn.rtt(), stats.udp_tx.bytes) {
                        tracing::trace!(%peer, window = w, rtt_ms = conn.rtt().as_millis(), base_ms = window.base_rtt().map(|b| b.as_millis()), cwnd = stats.path.cwnd, lost = stats.path.lost_packets, "bulk send window");
                        conn.set_send_window(w);
                    }
                    let verdict = state.observe(now, silence::Counts::of(&stats), conn.rtt(), probes.len());
                    self.set_silent(&conn, state.is_deaf(now));
                    if verdict == Verdict::Probe {
                        let addr = self
                            .inner
                            .addrs
                            .read()
                            .expect("bulk addrs lock")
                            .get(&peer)
                            .copied()
                            .unwrap_or_else(|| conn.remote_address());
                        let timeout = silence::probe_timeout(conn.rtt());
                        let me = self.clone();
                        probes.spawn(async move {
                            tokio::time::timeout(timeout, me.dial(peer, addr))
                                .await
                                .map_err(|_| OpenError::Timeout(addr))?
                        });
                    }
                }
            }
        }
    }

    /// `new` (a probe that completed) replaces the stalled `old`.
    async fn replace(&self, peer: PeerId, old: &quinn::Connection, new: quinn::Connection) {
        tracing::info!(%peer, "bulk link back after a fade: replacing the stalled connection");
        self.adopt(peer, new).await;
        old.close(CLOSE_REPLACED, b"replaced after a fade");
    }

    /// Make `new`, dialled by us, the pair's connection and serve it.
    async fn adopt(&self, peer: PeerId, new: quinn::Connection) {
        if !self.admitted(&peer) {
            new.close(CLOSE_NOT_ADMITTED, b"not admitted");
            return;
        }
        let slot = self.slot(peer);
        let mut slot = slot.lock().await;
        // The peer's probe may have arrived meanwhile: the duplicate rule
        // of `handshake` decides, as it does on the peer's side.
        let theirs_wins = slot.conn.as_ref().is_some_and(|(c, dialler)| {
            c.close_reason().is_none()
                && !self.is_silent(c)
                && *dialler == peer
                && peer == self.inner.local.min(peer)
        });
        if theirs_wins {
            retire(new.clone());
        } else if let Some((prev, _)) = slot.conn.replace((new.clone(), self.inner.local)) {
            if !self.is_silent(&prev) {
                retire(prev);
            }
        }
        slot.failed_at = None;
        drop(slot);
        self.serve(peer, new);
    }

    /// Close every connection of peers no longer admitted, whenever the
    /// admitted set changes.
    async fn admission_loop(self, mut changed: watch::Receiver<()>) {
        loop {
            tokio::select! {
                () = self.inner.cancel.cancelled() => break,
                r = changed.changed() => if r.is_err() { break },
            }
            let admitted = self.inner.admitted.read().expect("admitted lock").clone();
            let lapsed: Vec<(PeerId, quinn::Connection)> = self
                .inner
                .conns
                .lock()
                .expect("conns lock")
                .values()
                .filter(|(p, _)| !admitted.contains_key(p))
                .cloned()
                .collect();
            for (peer, conn) in lapsed {
                tracing::info!(%peer, "peer lost its admission: closing its bulk connection");
                conn.close(CLOSE_NOT_ADMITTED, b"not admitted");
            }
            self.inner
                .slots
                .lock()
                .expect("slots lock")
                .retain(|p, _| admitted.contains_key(p));
        }
    }
}

/// Close a duplicate connection after its grace.
fn retire(conn: quinn::Connection) {
    tokio::spawn(async move {
        tokio::select! {
            _ = conn.closed() => {}
            () = tokio::time::sleep(DUPLICATE_GRACE) => conn.close(CLOSE_DUPLICATE, b"duplicate"),
        }
    });
}
