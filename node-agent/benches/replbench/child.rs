//! The replica rack: a second OS process (the benchmark re-executed with
//! [`ctl::CHILD_ENV`] set) that hosts
//! - a mesh node accepting the volume push protocol into its own
//!   `VolumeStore` (exactly what the agent's serve loop does), and
//! - a raw quinn endpoint with the same identity that reads streams to
//!   their end and discards the bytes (the transport's ceiling).
//!
//! It talks to the parent through [`ctl`] lines on stdin/stdout.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use datastore::replicate::{push, TransferCounters, PUSH_PROTOCOL};
use datastore::VolumeStore;
use deploy::FleetKey;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ctl::{self, Reply, Request};
use crate::net;

/// Rack name of the replica.
pub const RACK: &str = "replica";

/// Replies queued for stdout; the parent reads them promptly.
const OUT_QUEUE: usize = 64;

/// Read size of the raw sink: large, zero-copy reads (quinn's fastest path).
const SINK_READ: usize = 1 << 20;

/// Run the child until the parent says `Quit` or closes stdin.
pub async fn run(dir: PathBuf) -> anyhow::Result<()> {
    let fleet = FleetKey::from_secret_b64(&std::env::var(ctl::FLEET_ENV).context("fleet secret")?)
        .map_err(|e| anyhow!("fleet secret: {e}"))?;
    let keypair = Keypair::generate_ed25519();
    let cancel = CancellationToken::new();
    let (mesh, _mesh_task) = mesh::start(
        net::mesh_settings(&fleet, RACK, keypair.clone(), vec![]),
        cancel.child_token(),
    )
    .await
    .map_err(|e| anyhow!("starting the mesh: {e}"))?;
    let store_dir = dir.join("store");
    let store = Arc::new(
        tokio::task::spawn_blocking(move || VolumeStore::open(&store_dir))
            .await?
            .map_err(|e| anyhow!("opening the replica store: {e}"))?,
    );

    let (out_tx, mut out_rx) = mpsc::channel::<Reply>(OUT_QUEUE);
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(r) = out_rx.recv().await {
            let mut line = serde_json::to_vec(&r).expect("replies serialise");
            line.push(b'\n');
            if stdout.write_all(&line).await.is_err() || stdout.flush().await.is_err() {
                break;
            }
        }
    });

    // Pushes over the mesh, served as the agent serves them.
    let mut incoming = mesh
        .accept_streams(PUSH_PROTOCOL)
        .map_err(|e| anyhow!("{e}"))?;
    {
        let (mesh, store, out) = (mesh.clone(), store.clone(), out_tx.clone());
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                let from = mesh
                    .admitted()
                    .into_iter()
                    .find(|(p, _)| *p == peer)
                    .map(|(_, r)| r)
                    .unwrap_or_default();
                let (store, out) = (store.clone(), out.clone());
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    let counters = TransferCounters::default();
                    let r = push::serve(store, &from, stream, &counters).await;
                    let ms = t0.elapsed().as_millis() as u64;
                    let reply = match r {
                        Ok(r) => Reply::Served {
                            volume: r.volume,
                            generation: r.generation,
                            chunks: r.chunks,
                            deltas: r.deltas,
                            deduplicated: r.deduplicated,
                            bytes: r.bytes,
                            ms,
                            error: None,
                        },
                        Err(e) => Reply::Served {
                            volume: String::new(),
                            generation: 0,
                            chunks: 0,
                            deltas: 0,
                            deduplicated: 0,
                            bytes: 0,
                            ms,
                            error: Some(e.to_string()),
                        },
                    };
                    let _ = out.send(reply).await;
                });
            }
        });
    }

    // A mesh stream sink: the mesh transport alone, without the store (a
    // diagnostic splitting the full path's cost into transport and store).
    let mut sinks = mesh
        .accept_streams(ctl::SINK_PROTOCOL)
        .map_err(|e| anyhow!("{e}"))?;
    tokio::spawn(async move {
        while let Some((_, mut stream)) = sinks.next().await {
            tokio::spawn(async move {
                use futures::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; SINK_READ];
                let mut n = 0u64;
                while let Ok(k) = stream.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                let _ = stream.write_all(&n.to_le_bytes()).await;
                let _ = stream.close().await;
            });
        }
    });

    // The raw QUIC sink.
    let endpoint = net::quic_server(&keypair)?;
    let quic_addr = endpoint.local_addr()?;
    {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        tokio::spawn(async move {
                            let mut n = 0u64;
                            while let Ok(Some(chunk)) = recv.read_chunk(SINK_READ, true).await {
                                n += chunk.bytes.len() as u64;
                            }
                            let _ = send.write_all(&n.to_le_bytes()).await;
                            let _ = send.finish();
                            let _ = send.stopped().await;
                        });
                    }
                });
            }
        });
    }

    let status = mesh.status().await.map_err(|e| anyhow!("{e}"))?;
    let mesh_addr = status
        .listen_addrs
        .first()
        .context("mesh has no listen address")?
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(mesh.peer_id));
    out_tx
        .send(Reply::Ready {
            mesh_addr: mesh_addr.to_string(),
            quic_addr: quic_addr.to_string(),
            peer_id: mesh.peer_id.to_base58(),
        })
        .await?;

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                out_tx
                    .send(Reply::Failed {
                        error: format!("bad request {line:?}: {e}"),
                    })
                    .await?;
                continue;
            }
        };
        let reply = match req {
            Request::Quit => break,
            Request::WaitAdmitted { peer } => {
                let peer: PeerId = peer.parse().map_err(|e| anyhow!("peer id: {e}"))?;
                let t0 = Instant::now();
                loop {
                    if mesh.admitted().iter().any(|(p, _)| *p == peer) {
                        break Reply::Admitted;
                    }
                    if t0.elapsed() > Duration::from_secs(30) {
                        break Reply::Failed {
                            error: format!("{peer} not admitted after 30 s"),
                        };
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Request::Export {
                volume,
                generation,
                to,
            } => {
                let st = store.clone();
                let r = tokio::task::spawn_blocking(move || {
                    st.export(&volume, Some(generation), &to, &mut |_, _| {})
                })
                .await?;
                Reply::Exported {
                    error: r.err().map(|e| e.to_string()),
                }
            }
            Request::Stats => {
                let st = store.clone();
                match tokio::task::spawn_blocking(move || st.chunks().stats()).await? {
                    Ok(s) => Reply::Stats {
                        chunks: s.chunks,
                        payload_bytes: s.payload_bytes,
                        disk_bytes: s.disk_bytes,
                    },
                    Err(e) => Reply::Failed {
                        error: e.to_string(),
                    },
                }
            }
        };
        out_tx.send(reply).await?;
    }
    endpoint.close(0u32.into(), b"bye");
    cancel.cancel();
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    Ok(())
}
