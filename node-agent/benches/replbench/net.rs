//! The two transports the benchmark compares, set up the same way on both
//! processes: the fleet mesh (libp2p-stream over libp2p-quic, with fleet
//! admission) and a raw quinn endpoint authenticated with the same libp2p
//! TLS identity and the same QUIC transport parameters.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use deploy::cert::{CertBody, CERT_VERSION};
use deploy::config::MeshConfig;
use deploy::power::PowerStatus;
use deploy::{FleetKey, Role};
use futures::{AsyncRead, AsyncWrite};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use mesh::{MeshSettings, RackInfo};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use util::time::unix_secs;

/// Fleet name used by both processes.
pub const FLEET: &str = "replbench";

/// libp2p-quic 0.14's per-stream receive window (`Config::max_stream_data`),
/// which the mesh keeps: the raw quinn endpoint uses the same value so the
/// comparison is about the replication path, not about window sizes.
pub const STREAM_WINDOW: u32 = 10_000_000;

/// libp2p-quic 0.14's per-connection receive window
/// (`Config::max_connection_data`), mirrored for the same reason.
pub const CONNECTION_WINDOW: u32 = 15_000_000;

/// Server name libp2p-quic dials with (the certificate is checked against
/// the PeerId, not a name).
const SERVER_NAME: &str = "l";

/// Mesh settings for one benchmark rack: the production defaults of
/// `[mesh]` in rack.toml, but on loopback port 0, without mDNS.
pub fn mesh_settings(
    fleet: &FleetKey,
    rack: &str,
    keypair: Keypair,
    bootstrap: Vec<Multiaddr>,
) -> MeshSettings {
    let d = MeshConfig::default();
    let certificate = fleet.issue(&CertBody {
        version: CERT_VERSION,
        fleet: FLEET.into(),
        rack: rack.into(),
        peer_id: PeerId::from(keypair.public()).to_base58(),
        role: Role::Rack,
        site: rack.into(),
        serial: rand::random(),
        not_before: unix_secs().saturating_sub(60),
        not_after: unix_secs() + 24 * 3600,
    });
    MeshSettings {
        keypair,
        certificate,
        fleet_key: fleet.public(),
        fleet_name: FLEET.into(),
        rack: rack.into(),
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1"
            .parse()
            .expect("static multiaddr")],
        bootstrap,
        mdns: None,
        admission_timeout: Duration::from_millis(d.admission_timeout_ms),
        max_connections: d.max_connections,
        max_connections_per_peer: d.max_connections_per_peer,
        idle_timeout: Duration::from_millis(d.idle_timeout_ms),
        reconnect_initial: Duration::from_millis(d.reconnect_initial_ms),
        reconnect_max: Duration::from_millis(d.reconnect_max_ms),
        membership: Default::default(),
        incarnation: 1,
        meta: RackInfo {
            rack: rack.into(),
            role: Role::Rack,
            site: rack.into(),
            cpus: 2,
            memory_mb: 1024,
            power: PowerStatus::default(),
            version: "replbench".into(),
            api: "127.0.0.1:1".into(),
            bulk_port: None,
        },
        revocations: vec![],
        seed: rand::random(),
        bulk: None,
    }
}

/// The QUIC transport parameters libp2p-quic 0.14 derives from its config
/// (see its `QuinnConfig::from`), with the mesh's idle timeout and
/// keep-alive.
fn transport() -> Arc<quinn::TransportConfig> {
    let d = MeshConfig::default();
    let idle = Duration::from_millis(d.idle_timeout_ms);
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(0u32.into());
    t.max_concurrent_bidi_streams(256u32.into());
    t.datagram_receive_buffer_size(None);
    t.keep_alive_interval(Some(Duration::from_secs(2).min(idle / 2)));
    t.max_idle_timeout(Some(
        quinn::VarInt::from_u32(u32::try_from(idle.as_millis()).unwrap_or(u32::MAX)).into(),
    ));
    t.allow_spin(false);
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(CONNECTION_WINDOW.into());
    t.mtu_discovery_config(Some(quinn::MtuDiscoveryConfig::default()));
    Arc::new(t)
}

/// A raw quinn server endpoint on loopback, TLS by `libp2p_tls` with `keypair`.
pub fn quic_server(keypair: &Keypair) -> anyhow::Result<quinn::Endpoint> {
    let tls = libp2p_tls::make_server_config(keypair).context("libp2p TLS server config")?;
    let crypto = QuicServerConfig::try_from(tls).context("QUIC server crypto")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport = transport();
    server.migration(false);
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("static address");
    quinn::Endpoint::server(server, addr).context("binding the raw QUIC endpoint")
}

/// Connect a raw quinn client to `server`, expecting `server_peer`'s identity.
pub async fn quic_connect(
    keypair: &Keypair,
    server: SocketAddr,
    server_peer: PeerId,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let tls = libp2p_tls::make_client_config(keypair, Some(server_peer))
        .context("libp2p TLS client config")?;
    let crypto = QuicClientConfig::try_from(tls).context("QUIC client crypto")?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport());
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("static address");
    let endpoint = quinn::Endpoint::client(addr).context("binding the raw QUIC client")?;
    let conn = endpoint
        .connect_with(client, server, SERVER_NAME)
        .context("dialling the raw QUIC endpoint")?
        .await
        .context("raw QUIC handshake")?;
    Ok((endpoint, conn))
}

/// Application bytes that crossed a stream in each direction.
#[derive(Debug, Default)]
pub struct Tally {
    /// Bytes we wrote (sent).
    pub written: AtomicU64,
    /// Bytes we read (received).
    pub read: AtomicU64,
}

impl Tally {
    /// (written, read).
    pub fn get(&self) -> (u64, u64) {
        (
            self.written.load(Ordering::Relaxed),
            self.read.load(Ordering::Relaxed),
        )
    }
}

/// A stream wrapper that counts the bytes through it: "bytes on the wire"
/// at the application level, both directions (what `rsync --stats` counts
/// too; QUIC/UDP headers are not included on either side).
pub struct Counting<S> {
    inner: S,
    tally: Arc<Tally>,
}

impl<S> Counting<S> {
    /// Wrap `inner`; the tally stays readable after the stream is consumed.
    pub fn new(inner: S) -> (Self, Arc<Tally>) {
        let tally = Arc::new(Tally::default());
        (
            Self {
                inner,
                tally: tally.clone(),
            },
            tally,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.tally.read.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.tally.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// A push stream, whatever carries it.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// A link put between the owner's push and the mesh stream, so the RPO is
/// measured over a LAN and a poor radio side by side in one run on this
/// machine (namespaces and the packet-level link emulator would need the
/// agent's whole bulk plane in the benchmark).
///
/// The model is a stream-level one: a serialisation rate and a one-way
/// delay per direction. Loss is folded into the rate: on `radio-poor` the
/// bulk plane (BBR) delivers 0.92 of the link's 10 Mbit/s through the
/// packet-level emulator (README, Benchmarks), so that is the rate here;
/// its jitter (±10 ms) is not modelled.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// The profile's name (`field-tests`' link emulator).
    pub name: &'static str,
    /// Goodput, bytes/s.
    pub bytes_per_s: f64,
    /// One-way delay.
    pub one_way: Duration,
}

/// `lan`: 1 Gbit/s, 0.1 ms.
pub const LAN: Link = Link {
    name: "lan",
    bytes_per_s: 125e6,
    one_way: Duration::from_micros(100),
};

/// `radio-poor`: 10 Mbit/s at the measured 0.92 goodput of BBR, 20 ms.
pub const RADIO_POOR: Link = Link {
    name: "radio-poor",
    bytes_per_s: 0.92 * 10e6 / 8.0,
    one_way: Duration::from_millis(20),
};

/// Bytes the relay moves at a time (a few QUIC packets' worth).
const SEGMENT: usize = 16 << 10;

/// Segments in flight per direction: more than a bandwidth-delay product
/// of either link (radio-poor: 23 KB; lan: 25 KB), so the model, not this
/// bound, sets the rate.
const IN_FLIGHT: usize = 64;

/// `stream` behind `link`: a duplex pipe whose far end a task relays to
/// and from `stream`, each direction serialised at the link's rate and
/// delivered one delay later.
pub fn shaped<S>(stream: S, link: Link) -> tokio_util::compat::Compat<tokio::io::DuplexStream>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    use tokio_util::compat::{FuturesAsyncReadCompatExt as _, TokioAsyncReadCompatExt as _};
    let (near, far) = tokio::io::duplex(SEGMENT * 4);
    let (far_r, far_w) = tokio::io::split(far);
    let (s_r, s_w) = tokio::io::split(stream.compat());
    tokio::spawn(carry(far_r, s_w, link));
    tokio::spawn(carry(s_r, far_w, link));
    near.compat()
}

/// One direction of a [`shaped`] link: until `from` ends, then shut `to`.
async fn carry(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    link: Link,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::time::Instant;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let sender = async move {
        // When the link has serialised everything accepted so far.
        let mut free = Instant::now();
        loop {
            let mut buf = vec![0u8; SEGMENT];
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.truncate(n);
            let now = Instant::now();
            free = free.max(now) + Duration::from_secs_f64(n as f64 / link.bytes_per_s);
            // The sender waits for the link (as a window would make it);
            // sub-millisecond waits are folded into the next ones, since
            // the timer's resolution is 1 ms.
            if free > now + Duration::from_millis(1) {
                tokio::time::sleep_until(free).await;
            }
            if tx.send((free + link.one_way, buf)).await.is_err() {
                break;
            }
        }
    };
    let receiver = async move {
        while let Some((at, buf)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&buf).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(sender, receiver);
}
