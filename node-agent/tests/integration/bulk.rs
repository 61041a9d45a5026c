//! The bulk data plane with real agents on loopback: a volume push goes
//! over it, a quinn client with a valid libp2p identity that is not an
//! admitted fleet member is refused, and `enabled = false` keeps every
//! stream on the mesh.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use node_agent::client::AgentClient;
use rand::{RngCore, SeedableRng};

const MIB: usize = 1 << 20;

/// A fleet of `racks` that snapshot every second, with the bulk plane on
/// or off.
fn fleet(racks: &str, bulk: bool) -> Fleet {
    let f = Fleet::init(racks, &[]);
    for r in racks.split(',') {
        let p = f.config(r);
        let mut text = std::fs::read_to_string(&p).unwrap();
        text = text.replace("snapshot_interval_s = 2", "snapshot_interval_s = 1");
        text = text.replace(
            "import_dirs = []",
            &format!("import_dirs = [{:?}]", f.dir.path().display().to_string()),
        );
        assert!(text.contains("[bulk]\nenabled = true\n"), "{text}");
        if !bulk {
            text = text.replace("[bulk]\nenabled = true\n", "[bulk]\nenabled = false\n");
        }
        std::fs::write(&p, text).unwrap();
    }
    f
}

/// `fieldrack_stream_bytes_total` of one plane and direction.
async fn stream_bytes(c: &AgentClient, plane: &str, direction: &str) -> f64 {
    let text = c.metrics().await.unwrap();
    let want = format!("plane=\"{plane}\",direction=\"{direction}\"");
    text.lines()
        .filter(|l| l.starts_with("fieldrack_stream_bytes_total{") && l.contains(&want))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Import a random `len`-byte volume on `a` and wait until `b` holds it;
/// returns the image.
async fn replicate(fleet: &Fleet, len: usize) -> Vec<u8> {
    wait_until(Duration::from_secs(15), "mesh", || {
        all_see(fleet, &["a", "b"], "alive")
    })
    .await;
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(3).fill_bytes(&mut data);
    let src = fleet.dir.path().join("src.img");
    std::fs::write(&src, &data).unwrap();
    cli(
        fleet,
        "a",
        &["volume", "import", "db", "--from", src.to_str().unwrap()],
    );
    let g = generation_on(fleet, "a", "db").await.unwrap();
    wait_until(Duration::from_secs(30), "b holds the volume", || async {
        generation_on(fleet, "b", "db").await >= Some(g)
    })
    .await;
    let out = fleet.dir.path().join("export.img");
    cli(
        fleet,
        "b",
        &[
            "volume",
            "export",
            "db",
            "--generation",
            &g.to_string(),
            "--to",
            out.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(out).unwrap() == data, "replica bit-identical");
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_push_goes_over_the_bulk_plane() {
    let fleet = fleet("a,b", true);
    let _a = fleet.start("a");
    let _b = fleet.start("b");
    let data = replicate(&fleet, 8 * MIB).await;
    let a = fleet.client("a");
    let b = fleet.client("b");
    let bulk_sent = stream_bytes(&a, "bulk", "sent").await;
    let bulk_received = stream_bytes(&b, "bulk", "received").await;
    let mesh_sent = stream_bytes(&a, "mesh", "sent").await;
    eprintln!("a sent {bulk_sent} bytes on the bulk plane, {mesh_sent} on mesh streams");
    assert!(
        bulk_sent >= data.len() as f64,
        "the push went over the bulk plane"
    );
    assert!(bulk_received >= data.len() as f64);
    assert!(
        mesh_sent < data.len() as f64 / 10.0,
        "not over mesh streams"
    );
    let s = status(&a).await.unwrap();
    let bulk = s.bulk.expect("status shows the bulk plane");
    assert!(bulk.listen.starts_with("127.0.0.1:"));
    assert_eq!(bulk.connections, 1, "one connection for the pair");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_bulk_plane_keeps_everything_on_the_mesh() {
    let fleet = fleet("a,b", false);
    let _a = fleet.start("a");
    let _b = fleet.start("b");
    let data = replicate(&fleet, 4 * MIB).await;
    let a = fleet.client("a");
    assert_eq!(stream_bytes(&a, "bulk", "sent").await, 0.0);
    assert!(stream_bytes(&a, "mesh", "sent").await >= data.len() as f64);
    assert!(status(&a).await.unwrap().bulk.is_none());
}

/// A quinn client with the libp2p TLS identity of a stranger (a valid
/// certificate, but no fleet admission) gets through TLS and is then shut
/// out: its connection is closed as not admitted, and no stream of it is
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_not_admitted_is_refused() {
    let fleet = fleet("a", true);
    let _a = fleet.start("a");
    let a = fleet.client("a");
    let s = wait_for_status(&a).await;
    let server: std::net::SocketAddr = s.bulk.unwrap().listen.parse().unwrap();
    let server_peer: PeerId = s.peer_id.parse().unwrap();

    let stranger = Keypair::generate_ed25519();
    let tls = libp2p_tls::make_client_config(&stranger, Some(server_peer)).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let client = quinn::ClientConfig::new(Arc::new(crypto));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(client, server, "l")
        .unwrap()
        .await
        .expect("TLS accepts a valid libp2p identity");
    // Try to push anyway: open a stream, send a header and bytes.
    let tried = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&[1, 24]).await?;
        send.write_all(b"/fieldrack/volume-push/1").await?;
        send.write_all(&[0u8; 4096]).await?;
        let mut buf = [0u8; 1];
        recv.read_exact(&mut buf).await?;
        anyhow::Ok(())
    };
    let r = tokio::time::timeout(Duration::from_secs(10), tried).await;
    assert!(!matches!(r, Ok(Ok(()))), "a stranger's stream was answered");
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the connection is closed");
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code,
                quinn::VarInt::from_u32(1),
                "not admitted: {c:?}"
            );
        }
        other => panic!("closed for another reason: {other:?}"),
    }
    assert!(metric(&a, "fieldrack_bulk_refused_total").await >= 1.0);
    assert_eq!(stream_bytes(&a, "bulk", "received").await, 0.0);
}

async fn wait_for_status(c: &AgentClient) -> node_agent::status::Status {
    for _ in 0..100 {
        if let Some(s) = status(c).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("agent did not answer");
}
