//! The bulk plane between real meshes on loopback: a registered protocol
//! goes over it (one connection per pair), an unregistered one stays on
//! the mesh, and revoking a peer closes its bulk connection at once.

use std::time::Duration;

use deploy::cert::CERT_VERSION;
use deploy::config::Congestion;
use deploy::{FleetKey, RevocationBody};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use mesh::{BulkSettings, MeshHandle, MeshSettings, Plane};
use tokio_util::sync::CancellationToken;
use util::time::unix_secs;

const BULK: &str = "/test/bulk/1";
const CONTROL: &str = "/test/control/1";

use crate::common;

/// [`common::settings`] of a fleet member, with a bulk plane carrying [`BULK`].
fn settings(fleet: &FleetKey, rack: &str, key: Keypair, bootstrap: Vec<Multiaddr>) -> MeshSettings {
    let cert = common::cert_for(fleet, "test", rack, &key);
    MeshSettings {
        bulk: Some(BulkSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            congestion: Congestion::Bbr,
            protocols: vec![BULK],
        }),
        ..common::settings(fleet, rack, key, cert, bootstrap, vec![])
    }
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn echo_server(h: &MeshHandle, protocol: &'static str) {
    let mut incoming = h.accept_streams(protocol).unwrap();
    tokio::spawn(async move {
        while let Some((_, mut s)) = incoming.next().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.close().await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_protocols_use_the_bulk_plane_until_the_peer_is_revoked() {
    let fleet = FleetKey::generate();
    let cancel = CancellationToken::new();
    let (ka, kb) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let (a, _) = mesh::start(settings(&fleet, "a", ka, vec![]), cancel.clone())
        .await
        .unwrap();
    let sa = a.status().await.unwrap();
    let a_addr = sa.listen_addrs[0]
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(sa.peer_id));
    let (b, _) = mesh::start(
        settings(&fleet, "b", kb.clone(), vec![a_addr]),
        cancel.clone(),
    )
    .await
    .unwrap();
    echo_server(&a, BULK).await;
    echo_server(&a, CONTROL).await;
    echo_server(&b, BULK).await;
    let pa = a.peer_id;
    let pb = b.peer_id;
    // Admitted both ways, and b knows a's bulk port from gossip.
    wait_for("a bulk stream from b to a", async || {
        match b.open_stream(pa, BULK).await {
            Ok(s) => s.plane() == Plane::Bulk,
            Err(_) => false,
        }
    })
    .await;

    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut s = b.open_stream(pa, BULK).await.unwrap();
    assert_eq!(s.plane(), Plane::Bulk);
    let writer = {
        let payload = payload.clone();
        async move {
            s.write_all(&payload).await.unwrap();
            let mut back = vec![0u8; payload.len()];
            s.read_exact(&mut back).await.unwrap();
            s.close().await.unwrap();
            back
        }
    };
    assert_eq!(writer.await, payload, "echoed over the bulk plane");
    let mut c = b.open_stream(pa, CONTROL).await.unwrap();
    assert_eq!(
        c.plane(),
        Plane::Mesh,
        "an unregistered protocol stays on the mesh"
    );
    c.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    c.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");

    // The reverse direction re-uses the same connection.
    wait_for("a's stream to b", async || {
        a.open_stream(pb, BULK)
            .await
            .is_ok_and(|s| s.plane() == Plane::Bulk)
    })
    .await;
    wait_for("one connection per pair", async || {
        a.status().await.unwrap().bulk_connections == 1
            && b.status().await.unwrap().bulk_connections == 1
    })
    .await;
    assert!(
        b.stats
            .bulk_bytes_sent
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1_000_000
    );

    // a revokes b: b's bulk connection is closed on a, a long stream dies.
    let mut long = b.open_stream(pa, BULK).await.unwrap();
    long.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    long.read_exact(&mut one).await.unwrap();
    let rev = fleet.revoke(&RevocationBody {
        version: CERT_VERSION,
        fleet: "test".into(),
        rack: "b".into(),
        peer_id: pb.to_base58(),
        revoked_at: unix_secs(),
        reason: "test".into(),
    });
    assert!(a.revoke(rev).await.unwrap());
    wait_for("a closes b's bulk connection", async || {
        a.status().await.unwrap().bulk_connections == 0
    })
    .await;
    let broken = tokio::time::timeout(Duration::from_secs(5), async {
        long.write_all(b"y").await?;
        long.read_exact(&mut one).await
    })
    .await
    .expect("the stream ends promptly");
    assert!(broken.is_err(), "the revoked peer's stream is dead");
    assert!(
        !a.admitted().iter().any(|(p, _)| *p == pb),
        "b is no longer admitted on a"
    );
    cancel.cancel();
}
