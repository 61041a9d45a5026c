//! The mesh as a cache: the proxy's [`PeerDirectory`] and [`Replicator`]
//! over raw streams on the admitted mesh connections.
//!
//! - Every [`DIGEST_INTERVAL`] each rack sends every admitted peer a Bloom
//!   digest of the keys it holds (`/fieldrack/cache-digest/1`); a local miss
//!   then asks only peers whose digest has the key — no per-miss broadcast.
//! - `/fieldrack/cache-get/1`: fetch one object by key hash.
//! - `/fieldrack/cache-put/1`: a tile fetched over the backhaul is copied to
//!   another rack (one whose digest lacks it), so a rack's loss loses no map
//!   coverage; a seeded (pinned) tile is copied, pinned, to every rack of
//!   this rack's site, so a whole site keeps its seeded regions offline.
//!
//! The peers are the racks the field view (`control::view`) says this rack
//! can reach directly, refreshed every [`PEERS_REFRESH`].
//!
//! Streams carry `[u32 LE len][bytes]` messages, every length bounded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cache_proxy::mesh::PeerError;
use cache_proxy::{
    KeyDigest, KeyHash, ObjectMeta, PeerDirectory, PeerObject, ProxyHandle, Replicator,
};
use futures::future::BoxFuture;
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::PeerId;
use mesh::MeshHandle;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Digest exchange protocol.
pub const DIGEST_PROTOCOL: &str = "/fieldrack/cache-digest/1";
/// Object fetch protocol.
pub const GET_PROTOCOL: &str = "/fieldrack/cache-get/1";
/// Object replication protocol.
pub const PUT_PROTOCOL: &str = "/fieldrack/cache-put/1";

/// How often digests are sent. Objects stored since the last digest are
/// simply not found on this rack by peers until the next one.
pub const DIGEST_INTERVAL: Duration = Duration::from_secs(5);
/// Target false-positive rate of digests (a wasted peer ask).
pub const DIGEST_FP: f64 = 0.01;
/// A peer's digest older than this is ignored (the peer went quiet).
pub const DIGEST_MAX_AGE: Duration = Duration::from_secs(60);
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
        let (Ok(mut digests), Ok(mut gets), Ok(mut puts)) = (
            self.mesh.accept_streams(DIGEST_PROTOCOL),
            self.mesh.accept_streams(GET_PROTOCOL),
            self.mesh.accept_streams(PUT_PROTOCOL),
        ) else {
            tracing::error!("cache mesh protocols already registered");
            return;
        };
        let replicating = tokio::spawn(self.clone().replicate_loop(replicate_rx, cancel.clone()));
        let _replicating = tokio_util::task::AbortOnDropHandle::new(replicating);
        let mut tick = tokio::time::interval(DIGEST_INTERVAL);
        let mut refresh = tokio::time::interval(PEERS_REFRESH);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = refresh.tick() => self.refresh_peers(Duration::ZERO).await,
                _ = tick.tick() => {
                    self.refresh_peers(PEERS_MAX_AGE).await;
                    let digest = proxy.digest(DIGEST_FP).to_bytes();
                    for peer in self.admitted_peers() {
                        let (mesh, digest) = (self.mesh.clone(), digest.clone());
                        tokio::spawn(async move {
                            if let Ok(mut s) = mesh.open_stream(peer, DIGEST_PROTOCOL).await {
                                let _ = write_msg(&mut s, &digest).await;
                                let _ = s.close().await;
                            }
                        });
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
        assert!(decode_meta(b"{not json").is_err());
        assert!(decode_meta(
            br#"{"status":200,"request_time":0,"response_time":0,"headers":[["bad name",[]]]}"#
        )
        .is_err());
    }
}
