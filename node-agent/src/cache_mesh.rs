//! The mesh as a cache: the proxy's [`PeerDirectory`] and [`Replicator`]
//! over raw streams on the admitted mesh connections.
//!
//! - Every [`DIGEST_INTERVAL`] each rack sends every admitted peer whose
//!   copy is out of date (or older than [`DIGEST_REFRESH`]) a Bloom digest
//!   of the keys it holds (`/fieldrack/cache-digest/1`); a local miss then
//!   asks only peers whose digest has the key — no per-miss broadcast.
//! - `/fieldrack/cache-get/1`: fetch one object by key hash.
//! - `/fieldrack/cache-put/1`: a tile fetched over the backhaul is copied to
//!   another rack (one whose digest lacks it), so a rack's loss loses no map
//!   coverage; a seeded (pinned) tile is copied, pinned, to every rack of
//!   this rack's site, so a whole site keeps its seeded regions offline.
//!
//! - `/fieldrack/uplink/1`: each rack tells every peer the state of its
//!   uplink ([`UplinkReport`]) within a [`PEERS_REFRESH`] of a change, and
//!   every [`UPLINK_REFRESH`] otherwise; the proxy ranks them
//!   ([`cache_proxy::gateway::rank`]) as its gateways.
//! - `/fieldrack/backhaul-http/1` (bulk plane): a miss this rack's uplink
//!   cannot fetch, sent through a gateway's uplink; the gateway answers
//!   with meta and body like a cache GET.
//! - `/fieldrack/backhaul-connect/1` (bulk plane): a `CONNECT` tunnel
//!   through a gateway's uplink: host, port and client; the gateway answers
//!   with meta (200 when connected, else its refusal with a body), then the
//!   stream carries the tunnel's bytes both ways.
//!
//! The peers are the racks the field view (`control::view`) says this rack
//! can reach directly, refreshed every [`PEERS_REFRESH`].
//!
//! Streams carry `[u32 LE len][bytes]` messages, every length bounded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cache_proxy::mesh::PeerError;
use cache_proxy::{
    ForwardRequest, ForwardResponse, Gateways, KeyDigest, KeyHash, ObjectMeta, PeerDirectory,
    PeerObject, ProxyHandle, Replicator, TunnelOpen, UplinkReport, UplinkState,
};
use futures::future::BoxFuture;
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::PeerId;
use mesh::MeshHandle;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

use crate::resend::Resend;

/// Digest exchange protocol.
pub const DIGEST_PROTOCOL: &str = "/fieldrack/cache-digest/1";
/// Object fetch protocol.
pub const GET_PROTOCOL: &str = "/fieldrack/cache-get/1";
/// Object replication protocol.
pub const PUT_PROTOCOL: &str = "/fieldrack/cache-put/1";
/// Uplink report protocol.
pub const UPLINK_PROTOCOL: &str = "/fieldrack/uplink/1";
/// A miss sent through another rack's uplink.
pub const FORWARD_PROTOCOL: &str = "/fieldrack/backhaul-http/1";
/// A `CONNECT` tunnel through another rack's uplink.
pub const TUNNEL_PROTOCOL: &str = "/fieldrack/backhaul-connect/1";
/// Largest forwarded request (URL and client headers).
pub const MAX_FORWARD_REQUEST_BYTES: usize = 256 << 10;
/// Largest uplink report.
pub const MAX_UPLINK_REPORT_BYTES: usize = 1024;

/// How often digests are sent. Objects stored since the last digest are
/// simply not found on this rack by peers until the next one.
pub const DIGEST_INTERVAL: Duration = Duration::from_secs(5);
/// Target false-positive rate of digests (a wasted peer ask).
pub const DIGEST_FP: f64 = 0.01;
/// A peer's digest older than this is ignored (the peer went quiet).
pub const DIGEST_MAX_AGE: Duration = Duration::from_secs(180);
/// An unchanged digest is sent to a peer again after this (a changed one
/// at the next [`DIGEST_INTERVAL`]): well inside [`DIGEST_MAX_AGE`]. Every
/// rack sends one to every other, so at 32 racks a refresh every 20 s was
/// three streams a second into and out of every rack.
pub const DIGEST_REFRESH: Duration = Duration::from_secs(60);
/// An unchanged uplink report is sent to a peer again after this (a
/// changed one within a [`PEERS_REFRESH`]): one lost report still leaves
/// the peer a fresh one ([`cache_proxy::gateway::REPORT_MAX_AGE`]).
pub const UPLINK_REFRESH: Duration = Duration::from_secs(4);
/// An unchanged report of a `down` uplink is sent again after this. Most
/// racks have no uplink, and nothing reads the age of a `down` report (it
/// is never a gateway, and its bytes used today count whatever its age),
/// so it is refreshed only against a lost message: at 32 racks, a
/// refresh every [`UPLINK_REFRESH`] was 8 streams a second from every
/// rack and as many into it.
pub const UPLINK_DOWN_REFRESH: Duration = Duration::from_secs(60);
/// Largest digest accepted: 16 MiB covers ~13 M keys at 1 %.
pub const MAX_DIGEST_BYTES: usize = 16 << 20;
/// Largest object moved between racks (tiles are KBs; web objects a few MB).
pub const MAX_OBJECT_BYTES: usize = 64 << 20;
/// Largest metadata record.
pub const MAX_META_BYTES: usize = 256 << 10;
/// Replications queued; beyond this they are dropped (the digest still
/// lets peers find the object here).
pub const REPLICATE_QUEUE: usize = 1024;
/// A peer fetch that takes longer than this is abandoned for the backhaul.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Copies in flight at once: each holds a stream and a body; a seeding
/// burst waits in the bounded queue instead of opening 1,024 streams.
pub const MAX_REPLICATIONS: usize = 8;
/// Tries of one copy of a pinned (seeded) object to one rack: a seeded
/// region must reach the whole site even if a copy meets a connection
/// being replaced or a peer's store momentarily busy. An unpinned copy is
/// tried once (the digest still lets peers find it here).
pub const PINNED_ATTEMPTS: u32 = 5;
/// Wait before the second try of a pinned copy; doubles each time
/// (0.5 + 1 + 2 + 4 s: a copy is given up after ~8 s of failures).
pub const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// How long one copy may take: 10 s plus 1 s per MiB (a 64 MiB object over
/// a 10 Mbit/s radio link takes ~55 s). A peer that stops reading is
/// abandoned instead of holding a replication slot forever.
fn put_timeout(len: usize) -> Duration {
    Duration::from_secs(10) + Duration::from_secs((len >> 20) as u64)
}

/// How often the peers come from the field view again: a second, like a
/// SWIM probe round, so a rack that went away stops being asked within
/// about one probe of SWIM noticing.
pub const PEERS_REFRESH: Duration = Duration::from_secs(1);
/// Sending digests or copies, the peers are taken again if older than
/// this (or if the admitted set changed: a copy's targets are chosen once,
/// so a rack admitted a moment ago must not be missed); a burst of copies
/// (seeding) still asks the view at most a few times a second.
pub const PEERS_MAX_AGE: Duration = Duration::from_millis(200);

/// Who was sent what ([`Resend`]), shared with the sending tasks.
fn lock<V>(m: &Mutex<Resend<PeerId, V>>) -> std::sync::MutexGuard<'_, Resend<PeerId, V>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One message to one peer on a stream of its own ([`CacheMesh::send_once`]).
struct SendOnce {
    mesh: MeshHandle,
    peer: PeerId,
    protocol: &'static str,
    body: Vec<u8>,
    limit: Option<Duration>,
}

impl SendOnce {
    /// Send it; if it fails, `peer` is due again in `sent` next period.
    async fn run<V: PartialEq + Clone>(self, sent: Arc<Mutex<Resend<PeerId, V>>>) {
        let send = async {
            let mut s = self.mesh.open_stream(self.peer, self.protocol).await.ok()?;
            write_msg(&mut s, &self.body).await.ok()?;
            s.close().await.ok()
        };
        let done = match self.limit {
            Some(limit) => tokio::time::timeout(limit, send).await.ok().flatten(),
            None => send.await,
        };
        if done.is_none() {
            lock(&sent).failed(&self.peer);
        }
    }
}

/// A rack the cache may use, from the field view.
#[derive(Debug, Clone)]
struct CachePeer {
    /// The PeerId of its admitted connection.
    id: PeerId,
    /// Its site, if known: pinned objects go to every rack of ours.
    site: Option<String>,
    /// rack / witness, if known.
    role: Option<deploy::Role>,
}

#[derive(Serialize, Deserialize)]
struct WireMeta {
    status: u16,
    request_time: u64,
    response_time: u64,
    headers: Vec<(String, Vec<u8>)>,
}

fn encode_meta(m: &ObjectMeta) -> Vec<u8> {
    let w = WireMeta {
        status: m.status,
        request_time: m.request_time,
        response_time: m.response_time,
        headers: m
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
    };
    serde_json::to_vec(&w).expect("meta serializes")
}

fn decode_meta(b: &[u8]) -> Result<ObjectMeta, String> {
    let w: WireMeta = serde_json::from_slice(b).map_err(|e| format!("meta: {e}"))?;
    let mut headers = hyper::HeaderMap::new();
    for (k, v) in w.headers {
        let name = hyper::header::HeaderName::from_bytes(k.as_bytes())
            .map_err(|e| format!("header name: {e}"))?;
        let value =
            hyper::header::HeaderValue::from_bytes(&v).map_err(|e| format!("header value: {e}"))?;
        headers.append(name, value);
    }
    Ok(ObjectMeta {
        status: w.status,
        headers,
        request_time: w.request_time,
        response_time: w.response_time,
        pinned: false,
    })
}

/// Sends a gateway's answer (status, headers, body) on `s` and closes it,
/// all within `limit`: a requester that stops reading does not hold the
/// answer (and its body) forever.
async fn send_answer<W: futures::AsyncWrite + Unpin>(
    s: &mut W,
    resp: ForwardResponse,
    limit: Duration,
) {
    let meta = ObjectMeta {
        status: resp.status,
        headers: resp.headers,
        request_time: 0,
        response_time: 0,
        pinned: false,
    };
    let send = async {
        write_msg(s, &encode_meta(&meta)).await?;
        write_msg(s, &resp.body).await?;
        s.close().await
    };
    let _ = tokio::time::timeout(limit, send).await;
}

async fn write_msg<W: futures::AsyncWrite + Unpin>(w: &mut W, b: &[u8]) -> std::io::Result<()> {
    w.write_all(&(b.len() as u32).to_le_bytes()).await?;
    w.write_all(b).await
}

async fn read_msg<R: futures::AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message of {len} bytes exceeds {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct CacheMeshStats {
    /// Objects fetched from peers.
    pub peer_fetches: AtomicU64,
    /// Objects served to peers.
    pub peer_serves: AtomicU64,
    /// Objects replicated to peers.
    pub replicated: AtomicU64,
    /// Replications dropped (queue full or no peer).
    pub replicate_dropped: AtomicU64,
    /// Digests received.
    pub digests_received: AtomicU64,
}

/// The mesh side of the cache.
pub struct CacheMesh {
    mesh: MeshHandle,
    /// This rack's site: pinned objects go to every rack of it.
    site: String,
    digests: RwLock<HashMap<PeerId, (KeyDigest, Instant)>>,
    /// The racks of the field view this rack can reach directly now
    /// (refreshed every [`PEERS_REFRESH`]; empty until the control plane
    /// is attached).
    peers: RwLock<Vec<CachePeer>>,
    /// When `peers` was last taken from the view, and the admitted peers
    /// then; held while taking it again, so a burst of users causes one
    /// refresh.
    refreshed: tokio::sync::Mutex<Option<(Instant, Vec<PeerId>)>>,
    /// The control plane, whose field view says which racks to use; set
    /// once by [`CacheMesh::attach_control`].
    control: std::sync::OnceLock<Arc<control::Control>>,
    replicate_tx: mpsc::Sender<(KeyHash, PeerObject)>,
    /// The latest uplink report of each peer, and when it came (bounded
    /// by the admitted peers: reports of others are dropped).
    uplinks: RwLock<HashMap<PeerId, (UplinkReport, Instant)>>,
    /// Counters.
    pub stats: Arc<CacheMeshStats>,
}

impl CacheMesh {
    /// The directory/replicator, and the receiving end of the replication
    /// queue for [`CacheMesh::run`].
    pub fn new(mesh: MeshHandle, site: &str) -> (Arc<Self>, mpsc::Receiver<(KeyHash, PeerObject)>) {
        let (tx, rx) = mpsc::channel(REPLICATE_QUEUE);
        (
            Arc::new(Self {
                mesh,
                site: site.to_string(),
                digests: RwLock::default(),
                peers: RwLock::default(),
                refreshed: tokio::sync::Mutex::new(None),
                control: std::sync::OnceLock::new(),
                replicate_tx: tx,
                uplinks: RwLock::default(),
                stats: Arc::default(),
            }),
            rx,
        )
    }

    /// Hand the cache the control plane, whose field view says which
    /// racks to use (it starts after the proxy).
    pub fn attach_control(&self, control: Arc<control::Control>) {
        let _ = self.control.set(control);
    }

    /// Hands every peer's last uplink report to the proxy's budget (the
    /// field's quota counts every rack's uplink; the field's rate is split
    /// among the uplinks in use).
    fn note_field_budget(&self, proxy: &ProxyHandle) {
        let reports: Vec<(UplinkReport, bool)> = self
            .uplinks
            .read()
            .expect("uplinks lock")
            .values()
            .map(|(r, at)| (*r, at.elapsed() <= cache_proxy::gateway::REPORT_MAX_AGE))
            .collect();
        proxy.note_peer_reports(&reports);
    }

    /// `body` for `peer` on `protocol`, within `limit` if any.
    fn send_once(
        &self,
        peer: PeerId,
        protocol: &'static str,
        body: Vec<u8>,
        limit: Option<Duration>,
    ) -> SendOnce {
        SendOnce {
            mesh: self.mesh.clone(),
            peer,
            protocol,
            body,
            limit,
        }
    }

    /// The peers to exchange digests, objects and copies with.
    fn admitted_peers(&self) -> Vec<PeerId> {
        self.peers
            .read()
            .expect("peers lock")
            .iter()
            .map(|p| p.id)
            .collect()
    }

    /// Take the peers from the field view again: the racks this rack can
    /// reach directly (`reachable`: admitted, not revoked, not dead), on
    /// the connections admitted now. Not `up`: a cached object is worth
    /// sharing whatever the leases, so the racks of a partition's
    /// minority side, where nobody renews, go on sharing their caches.
    /// Nothing happens if they were taken less than `max_age` ago and no
    /// peer was admitted or dropped since (a rack admitted a moment ago is
    /// never missed).
    async fn refresh_peers(&self, max_age: Duration) {
        let Some(control) = self.control.get() else {
            return;
        };
        let mut refreshed = self.refreshed.lock().await;
        let admitted = self.mesh.admitted();
        let mut ids: Vec<PeerId> = admitted.iter().map(|(p, _)| *p).collect();
        ids.sort_unstable();
        if refreshed
            .as_ref()
            .is_some_and(|(t, before)| t.elapsed() < max_age && *before == ids)
        {
            return;
        }
        let view = control.field_view().await;
        let fresh: Vec<CachePeer> = admitted
            .into_iter()
            .filter_map(|(id, rack)| {
                let r = view.rack(&rack).filter(|r| r.reachable && !r.local)?;
                Some(CachePeer {
                    id,
                    site: r.site.clone(),
                    role: r.role,
                })
            })
            .collect();
        // An admitted rack the view does not call reachable yet (SWIM has
        // not caught up) is asked about again at the next use.
        let complete = fresh.len() == ids.len();
        *self.peers.write().expect("peers lock") = fresh;
        *refreshed = complete.then(|| (Instant::now(), ids));
    }

    /// Serve peers and exchange digests until `cancel`.
    pub async fn run(
        self: Arc<Self>,
        proxy: ProxyHandle,
        replicate_rx: mpsc::Receiver<(KeyHash, PeerObject)>,
        cancel: CancellationToken,
    ) {
        let (Ok(mut digests), Ok(mut gets), Ok(mut puts), Ok(mut uplinks), Ok(mut forwards)) = (
            self.mesh.accept_streams(DIGEST_PROTOCOL),
            self.mesh.accept_streams(GET_PROTOCOL),
            self.mesh.accept_streams(PUT_PROTOCOL),
            self.mesh.accept_streams(UPLINK_PROTOCOL),
            self.mesh.accept_streams(FORWARD_PROTOCOL),
        ) else {
            tracing::error!("cache mesh protocols already registered");
            return;
        };
        let Ok(mut tunnels) = self.mesh.accept_streams(TUNNEL_PROTOCOL) else {
            tracing::error!("cache mesh protocols already registered");
            return;
        };
        let replicating = tokio::spawn(self.clone().replicate_loop(replicate_rx, cancel.clone()));
        let _replicating = tokio_util::task::AbortOnDropHandle::new(replicating);
        let mut tick = tokio::time::interval(DIGEST_INTERVAL);
        let mut refresh = tokio::time::interval(PEERS_REFRESH);
        let uplink_sent = Arc::new(Mutex::new(Resend::new(UPLINK_REFRESH)));
        let digest_sent = Arc::new(Mutex::new(Resend::new(DIGEST_REFRESH)));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = refresh.tick() => {
                    self.refresh_peers(Duration::ZERO).await;
                    let report = proxy.uplink_report();
                    let peers = self.admitted_peers();
                    self.uplinks.write().expect("uplinks lock").retain(|p, _| peers.contains(p));
                    self.note_field_budget(&proxy);
                    let refresh = if report.state == UplinkState::Down {
                        UPLINK_DOWN_REFRESH
                    } else {
                        UPLINK_REFRESH
                    };
                    let due = lock(&uplink_sent).due_within(&peers, &report, Instant::now(), refresh);
                    let body = serde_json::to_vec(&report).expect("report serializes");
                    for peer in due {
                        let send = self.send_once(peer, UPLINK_PROTOCOL, body.clone(), Some(PEERS_REFRESH));
                        tokio::spawn(send.run(uplink_sent.clone()));
                    }
                }
                Some((peer, mut s)) = uplinks.next() => {
                    let this = self.clone();
                    let proxy = proxy.clone();
                    tokio::spawn(async move {
                        let read = read_msg(&mut s, MAX_UPLINK_REPORT_BYTES);
                        let Ok(Ok(b)) = tokio::time::timeout(PEERS_REFRESH, read).await else { return };
                        match serde_json::from_slice::<UplinkReport>(&b) {
                            Ok(r) if this.admitted_peers().contains(&peer) => {
                                this.uplinks.write().expect("uplinks lock").insert(peer, (r, Instant::now()));
                                this.note_field_budget(&proxy);
                            }
                            Ok(_) => {}
                            Err(e) => tracing::debug!(%peer, error = %e, "bad uplink report"),
                        }
                    });
                }
                Some((peer, mut s)) = tunnels.next() => {
                    let proxy = proxy.clone();
                    tokio::spawn(async move {
                        let read = read_msg(&mut s, MAX_FORWARD_REQUEST_BYTES);
                        let Ok(Ok(b)) = tokio::time::timeout(FETCH_TIMEOUT, read).await else { return };
                        let Ok(w) = serde_json::from_slice::<WireTunnel>(&b) else {
                            tracing::warn!(%peer, "bad tunnel request");
                            return;
                        };
                        // Limits count under the rack the mesh authenticated,
                        // never one the request names.
                        match proxy.open_tunnel(&peer.to_base58(), &w.host, w.port, w.client).await {
                            Ok(tunnel) => {
                                let ok = ObjectMeta {
                                    status: 200,
                                    headers: hyper::HeaderMap::new(),
                                    request_time: 0,
                                    response_time: 0,
                                    pinned: false,
                                };
                                if write_msg(&mut s, &encode_meta(&ok)).await.is_err() || s.flush().await.is_err() {
                                    return;
                                }
                                tunnel.run(s.compat()).await;
                            }
                            Err(resp) => send_answer(&mut s, resp, FETCH_TIMEOUT).await,
                        }
                    });
                }
                Some((peer, mut s)) = forwards.next() => {
                    let proxy = proxy.clone();
                    tokio::spawn(async move {
                        let read = read_msg(&mut s, MAX_FORWARD_REQUEST_BYTES);
                        let Ok(Ok(b)) = tokio::time::timeout(FETCH_TIMEOUT, read).await else { return };
                        let req = match decode_forward(&b) {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::warn!(%peer, error = %e, "bad forwarded request");
                                return;
                            }
                        };
                        let resp = proxy.serve_forwarded(&peer.to_base58(), req).await;
                        let limit = put_timeout(resp.body.len());
                        send_answer(&mut s, resp, limit).await;
                    });
                }
                _ = tick.tick() => {
                    self.refresh_peers(PEERS_MAX_AGE).await;
                    let digest = proxy.digest(DIGEST_FP).to_bytes();
                    let fingerprint = *blake3::hash(&digest).as_bytes();
                    let due = lock(&digest_sent).due(&self.admitted_peers(), &fingerprint, Instant::now());
                    for peer in due {
                        let send = self.send_once(peer, DIGEST_PROTOCOL, digest.clone(), None);
                        tokio::spawn(send.run(digest_sent.clone()));
                    }
                    let now = Instant::now();
                    self.digests.write().expect("digests lock").retain(|_, (_, at)| now.duration_since(*at) < DIGEST_MAX_AGE);
                }
                Some((peer, mut s)) = digests.next() => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        match read_msg(&mut s, MAX_DIGEST_BYTES).await.map(|b| KeyDigest::from_bytes(&b)) {
                            Ok(Ok(d)) => {
                                this.stats.digests_received.fetch_add(1, Ordering::Relaxed);
                                this.digests.write().expect("digests lock").insert(peer, (d, Instant::now()));
                            }
                            Ok(Err(e)) => tracing::warn!(%peer, error = %e, "bad cache digest"),
                            Err(e) => tracing::debug!(%peer, error = %e, "cache digest failed"),
                        }
                    });
                }
                Some((peer, mut s)) = gets.next() => {
                    let (this, proxy) = (self.clone(), proxy.clone());
                    tokio::spawn(async move {
                        let Ok(key) = read_msg(&mut s, 16).await else { return };
                        let Ok(key) = <KeyHash>::try_from(key.as_slice()) else { return };
                        match proxy.lookup(&key) {
                            Some(obj) => {
                                let _ = write_msg(&mut s, &encode_meta(&obj.meta)).await;
                                let _ = write_msg(&mut s, &obj.body).await;
                                this.stats.peer_serves.fetch_add(1, Ordering::Relaxed);
                            }
                            None => {
                                let _ = write_msg(&mut s, &[]).await;
                            }
                        }
                        let _ = s.close().await;
                        tracing::trace!(%peer, "served a cache object");
                    });
                }
                Some((peer, mut s)) = puts.next() => {
                    let proxy = proxy.clone();
                    tokio::spawn(async move {
                        let r: Result<(), String> = async {
                            let key = read_msg(&mut s, 16).await.map_err(|e| e.to_string())?;
                                                        let key = <KeyHash>::try_from(key.as_slice()).map_err(|_| "bad key".to_string())?;
                            let pinned = read_msg(&mut s, 1).await.map_err(|e| e.to_string())? == [1];
                            let meta = decode_meta(&read_msg(&mut s, MAX_META_BYTES).await.map_err(|e| e.to_string())?)?;
                            let body = read_msg(&mut s, MAX_OBJECT_BYTES).await.map_err(|e| e.to_string())?;
                            proxy
                                                                .accept_replica(key, PeerObject { meta, body: Bytes::from(body) }, pinned)
                                .await
                                .map_err(|e| e.to_string())?;
                            write_msg(&mut s, b"ok").await.map_err(|e| e.to_string())
                        }
                        .await;
                        if let Err(e) = r {
                            tracing::warn!(%peer, error = %e, "refused a cache replica");
                        }
                        let _ = s.close().await;
                    });
                }
            }
        }
    }

    /// Drain the replication queue, [`MAX_REPLICATIONS`] copies at a time
    /// (a full slot set leaves items in the bounded queue, and the proxy's
    /// `try_send` then drops new ones and counts them).
    async fn replicate_loop(
        self: Arc<Self>,
        mut replicate_rx: mpsc::Receiver<(KeyHash, PeerObject)>,
        cancel: CancellationToken,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_REPLICATIONS));
        loop {
            let item = tokio::select! {
                _ = cancel.cancelled() => return,
                item = replicate_rx.recv() => item,
            };
            let Some((key, obj)) = item else { return };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let this = self.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = this.replicate_now(key, obj) => {}
                }
                drop(permit);
            });
        }
    }

    /// Copy one object: a pinned (seeded) one to every rack of our site,
    /// anything else to one admitted peer that does not have it yet.
    async fn replicate_now(&self, key: KeyHash, obj: PeerObject) {
        self.refresh_peers(PEERS_MAX_AGE).await;
        let peers = self.admitted_peers();
        let mut targets: Vec<PeerId> = Vec::new();
        if obj.meta.pinned {
            targets = self
                .peers
                .read()
                .expect("peers lock")
                .iter()
                .filter(|p| {
                    p.site.as_deref() == Some(self.site.as_str())
                        && p.role == Some(deploy::Role::Rack)
                })
                .map(|p| p.id)
                .collect();
        }
        if targets.is_empty() {
            let lacking: Vec<PeerId> = {
                let d = self.digests.read().expect("digests lock");
                peers
                    .iter()
                    .filter(|p| !d.get(p).is_some_and(|(dg, _)| dg.contains(&key)))
                    .copied()
                    .collect()
            };
            targets.extend(lacking.first().or(peers.first()).copied());
        }
        if targets.is_empty() {
            self.stats.replicate_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let attempts = if obj.meta.pinned { PINNED_ATTEMPTS } else { 1 };
        let copies = targets.into_iter().map(|peer| {
            let obj = &obj;
            async move {
                let mut backoff = RETRY_BACKOFF;
                for attempt in 1..=attempts {
                    match self.put_to(peer, key, obj).await {
                        Ok(()) => return,
                        Err(e) if attempt < attempts => {
                            tracing::debug!(%peer, attempt, error = %e, "cache replication failed; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff *= 2;
                        }
                        Err(e) => {
                            self.stats.replicate_dropped.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(%peer, attempts, error = %e, "cache replication given up");
                        }
                    }
                }
            }
        });
        futures::future::join_all(copies).await;
    }

    /// One copy of one object to one peer, within [`put_timeout`].
    async fn put_to(&self, peer: PeerId, key: KeyHash, obj: &PeerObject) -> Result<(), String> {
        let put = async {
            let mut s = self
                .mesh
                .open_stream(peer, PUT_PROTOCOL)
                .await
                .map_err(|e| e.to_string())?;
            write_msg(&mut s, &key).await.map_err(|e| e.to_string())?;
            write_msg(&mut s, &[u8::from(obj.meta.pinned)])
                .await
                .map_err(|e| e.to_string())?;
            write_msg(&mut s, &encode_meta(&obj.meta))
                .await
                .map_err(|e| e.to_string())?;
            write_msg(&mut s, &obj.body)
                .await
                .map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            let ack = read_msg(&mut s, 16).await.map_err(|e| e.to_string())?;
            if ack != b"ok" {
                return Err("peer did not acknowledge".to_string());
            }
            Ok(())
        };
        tokio::time::timeout(put_timeout(obj.body.len()), put)
            .await
            .map_err(|_| "timed out".to_string())??;
        self.stats.replicated.fetch_add(1, Ordering::Relaxed);
        // Until its next digest, remember the peer has it now.
        if let Some((d, _)) = self.digests.write().expect("digests lock").get_mut(&peer) {
            d.insert(&key);
        }
        Ok(())
    }
}

impl PeerDirectory for CacheMesh {
    fn candidates(&self, key: &KeyHash) -> Vec<String> {
        let admitted = self.admitted_peers();
        let now = Instant::now();
        let d = self.digests.read().expect("digests lock");
        admitted
            .into_iter()
            .filter(|p| {
                d.get(p).is_some_and(|(dg, at)| {
                    now.duration_since(*at) < DIGEST_MAX_AGE && dg.contains(key)
                })
            })
            .map(|p| p.to_base58())
            .collect()
    }

    fn fetch(
        &self,
        peer: &String,
        key: &KeyHash,
    ) -> BoxFuture<'static, Result<Option<PeerObject>, PeerError>> {
        let mesh = self.mesh.clone();
        let stats = self.stats.clone();
        let key = *key;
        let peer: Result<PeerId, _> = peer.parse();
        Box::pin(async move {
            let peer = peer.map_err(|_| PeerError::Protocol("bad peer id".into()))?;
            let fut = async {
                let mut s = mesh
                    .open_stream(peer, GET_PROTOCOL)
                    .await
                    .map_err(|e| PeerError::Unreachable(e.to_string()))?;
                write_msg(&mut s, &key)
                    .await
                    .map_err(|e| PeerError::Unreachable(e.to_string()))?;
                s.flush()
                    .await
                    .map_err(|e| PeerError::Unreachable(e.to_string()))?;
                let meta = read_msg(&mut s, MAX_META_BYTES)
                    .await
                    .map_err(|e| PeerError::Protocol(e.to_string()))?;
                if meta.is_empty() {
                    return Ok(None);
                }
                let meta = decode_meta(&meta).map_err(PeerError::Protocol)?;
                let body = read_msg(&mut s, MAX_OBJECT_BYTES)
                    .await
                    .map_err(|e| PeerError::Protocol(e.to_string()))?;
                stats.peer_fetches.fetch_add(1, Ordering::Relaxed);
                Ok(Some(PeerObject {
                    meta,
                    body: Bytes::from(body),
                }))
            };
            tokio::time::timeout(FETCH_TIMEOUT, fut)
                .await
                .map_err(|_| PeerError::Unreachable("timed out".into()))?
        })
    }
}

#[derive(Serialize, Deserialize)]
struct WireForward {
    method: String,
    target: String,
    client: std::net::IpAddr,
    headers: Vec<(String, Vec<u8>)>,
    /// The request's budget class at the sender.
    #[serde(default)]
    class: cache_proxy::budget::Class,
}

fn encode_forward(r: &ForwardRequest) -> Vec<u8> {
    serde_json::to_vec(&WireForward {
        method: r.method.as_str().to_string(),
        target: r.target.clone(),
        client: r.client,
        class: r.class,
        headers: r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
    })
    .expect("request serializes")
}

fn decode_forward(b: &[u8]) -> Result<ForwardRequest, String> {
    let w: WireForward = serde_json::from_slice(b).map_err(|e| format!("request: {e}"))?;
    let method =
        hyper::Method::from_bytes(w.method.as_bytes()).map_err(|e| format!("method: {e}"))?;
    let mut headers = hyper::HeaderMap::new();
    for (k, v) in w.headers {
        let name = hyper::header::HeaderName::from_bytes(k.as_bytes())
            .map_err(|e| format!("header name: {e}"))?;
        let value =
            hyper::header::HeaderValue::from_bytes(&v).map_err(|e| format!("header value: {e}"))?;
        headers.append(name, value);
    }
    Ok(ForwardRequest {
        method,
        target: w.target,
        headers,
        client: w.client,
        class: w.class,
    })
}

#[derive(Serialize, Deserialize)]
struct WireTunnel {
    host: String,
    port: u16,
    client: std::net::IpAddr,
}

impl Gateways for CacheMesh {
    fn gateways(&self) -> Vec<String> {
        let admitted = self.admitted_peers();
        let now = Instant::now();
        let cands: Vec<(String, UplinkReport, Duration)> = {
            let u = self.uplinks.read().expect("uplinks lock");
            admitted
                .iter()
                .filter_map(|p| {
                    let (r, at) = u.get(p)?;
                    Some((p.to_base58(), *r, now.duration_since(*at)))
                })
                .collect()
        };
        cache_proxy::gateway::rank(&cands)
    }

    fn forward(
        &self,
        peer: &String,
        req: ForwardRequest,
    ) -> BoxFuture<'static, Result<ForwardResponse, PeerError>> {
        let mesh = self.mesh.clone();
        let peer: Result<PeerId, _> = peer.parse();
        Box::pin(async move {
            let peer = peer.map_err(|_| PeerError::Protocol("bad peer id".into()))?;
            let unreachable = |e: std::io::Error| PeerError::Unreachable(e.to_string());
            let mut s = mesh
                .open_stream(peer, FORWARD_PROTOCOL)
                .await
                .map_err(|e| PeerError::Unreachable(e.to_string()))?;
            write_msg(&mut s, &encode_forward(&req))
                .await
                .map_err(unreachable)?;
            s.flush().await.map_err(unreachable)?;
            let meta = read_msg(&mut s, MAX_META_BYTES)
                .await
                .map_err(|e| PeerError::Protocol(e.to_string()))?;
            let meta = decode_meta(&meta).map_err(PeerError::Protocol)?;
            let body = read_msg(&mut s, MAX_OBJECT_BYTES)
                .await
                .map_err(|e| PeerError::Protocol(e.to_string()))?;
            Ok(ForwardResponse {
                status: meta.status,
                headers: meta.headers,
                body: Bytes::from(body),
            })
        })
    }

    fn tunnel(
        &self,
        peer: &String,
        host: String,
        port: u16,
        client: std::net::IpAddr,
    ) -> BoxFuture<'static, Result<TunnelOpen, PeerError>> {
        let mesh = self.mesh.clone();
        let peer: Result<PeerId, _> = peer.parse();
        Box::pin(async move {
            let peer = peer.map_err(|_| PeerError::Protocol("bad peer id".into()))?;
            let unreachable = |e: std::io::Error| PeerError::Unreachable(e.to_string());
            let mut s = mesh
                .open_stream(peer, TUNNEL_PROTOCOL)
                .await
                .map_err(|e| PeerError::Unreachable(e.to_string()))?;
            let req =
                serde_json::to_vec(&WireTunnel { host, port, client }).expect("request serializes");
            write_msg(&mut s, &req).await.map_err(unreachable)?;
            s.flush().await.map_err(unreachable)?;
            let meta = read_msg(&mut s, MAX_META_BYTES)
                .await
                .map_err(|e| PeerError::Protocol(e.to_string()))?;
            let meta = decode_meta(&meta).map_err(PeerError::Protocol)?;
            if meta.status == 200 {
                return Ok(TunnelOpen::Open(Box::new(s.compat())));
            }
            let body = read_msg(&mut s, MAX_META_BYTES)
                .await
                .map_err(|e| PeerError::Protocol(e.to_string()))?;
            Ok(TunnelOpen::Answer(ForwardResponse {
                status: meta.status,
                headers: meta.headers,
                body: Bytes::from(body),
            }))
        })
    }
}

impl Replicator for CacheMesh {
    /// Queue and return; a full queue drops the copy (the digest still lets
    /// peers find the object here).
    fn replicate(&self, key: &KeyHash, object: &PeerObject) {
        if self.replicate_tx.try_send((*key, object.clone())).is_err() {
            self.stats.replicate_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        let mut headers = hyper::HeaderMap::new();
        headers.insert("content-type", "image/png".parse().unwrap());
        headers.append(
            "x-odd",
            hyper::header::HeaderValue::from_bytes(b"\xffbytes").unwrap(),
        );
        let m = ObjectMeta {
            status: 200,
            headers,
            request_time: 5,
            response_time: 6,
            pinned: true,
        };
        let back = decode_meta(&encode_meta(&m)).unwrap();
        assert_eq!(back.status, 200);
        assert_eq!(back.headers, m.headers);
        assert!(!back.pinned, "pinning is the receiver's decision");
        let mut h = hyper::HeaderMap::new();
        h.insert("accept", "image/png".parse().unwrap());
        let r = ForwardRequest {
            method: hyper::Method::GET,
            target: "/tiles/osm/1/0/0.png".into(),
            headers: h,
            client: "10.0.0.7".parse().unwrap(),
            class: cache_proxy::budget::Class::Seeding,
        };
        let back = decode_forward(&encode_forward(&r)).unwrap();
        assert_eq!(
            (
                back.method,
                back.target,
                back.headers,
                back.client,
                back.class
            ),
            (r.method, r.target, r.headers, r.client, r.class)
        );
        assert!(decode_forward(
            br#"{"method":"G T","target":"/","client":"10.0.0.1","headers":[]}"#
        )
        .is_err());
        assert!(decode_meta(b"{not json").is_err());
        assert!(decode_meta(
            br#"{"status":200,"request_time":0,"response_time":0,"headers":[["bad name",[]]]}"#
        )
        .is_err());
    }
}
