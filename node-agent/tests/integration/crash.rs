//! Crash loop: SIGKILL the agent at random moments while it writes, 50
//! times in all (two agents of their own, 25 kills each, side by side: an
//! agent's restart mostly waits, so two loops take the time of one). Every
//! restart must find a consistent store: every acknowledged revocation
//! present, no corrupt record, a contiguous event log, and an incarnation
//! that never repeats.

use crate::common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hyper::Method;
use rand::{Rng, SeedableRng};

/// Kills per agent; each loop has its own seed, so the two kill at
/// different moments.
const KILLS: usize = 25;

fn fleet_key(fleet: &Fleet) -> deploy::FleetKey {
    let text = std::fs::read_to_string(fleet.dir.path().join("fleet.key")).unwrap();
    deploy::FleetKey::from_secret_b64(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_writes_25_times_leaves_a_consistent_store() {
    crash_loop(0xc0ffee).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_writes_25_more_times_leaves_a_consistent_store() {
    crash_loop(0x5eed2).await;
}

async fn crash_loop(seed: u64) {
    let fleet = Fleet::init("a", &[]);
    let key = Arc::new(fleet_key(&fleet));
    let client = fleet.client("a");
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut last_incarnation = 0;
    let mut writes_in_flight_at_kill = 0;
    for round in 0..KILLS {
        let mut agent = fleet.start("a");
        wait_until(Duration::from_secs(20), "agent api up", || async {
            status(&client).await.is_some()
        })
        .await;
        // Check what the previous life left behind.
        let s = status(&client).await.unwrap();
        assert_eq!(
            s.store.corrupt, 0,
            "round {round}: corrupt records after kill -9"
        );
        assert!(
            s.store.events_contiguous,
            "round {round}: event log has a gap: {:?}",
            s.store
        );
        assert!(
            s.incarnation > last_incarnation,
            "round {round}: incarnation went from {last_incarnation} to {}",
            s.incarnation
        );
        last_incarnation = s.incarnation;
        let (code, body) = client
            .request(Method::GET, "/api/v1/revocations", None)
            .await
            .unwrap();
        assert_eq!(code, 200);
        let stored: Vec<deploy::Revocation> = serde_json::from_slice(&body).unwrap();
        let stored: HashSet<String> = stored
            .iter()
            .map(|r| {
                r.verify(&key.public(), "test")
                    .expect("stored revocations verify")
                    .peer_id
            })
            .collect();
        let missing: Vec<String> = acked.lock().unwrap().difference(&stored).cloned().collect();
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged revocations lost: {missing:?}"
        );

        // Write as fast as possible from two writers, then kill at a random moment.
        let stop = tokio_util::sync::CancellationToken::new();
        let mut writers = Vec::new();
        for _ in 0..2 {
            let (client, key, acked, stop) =
                (fleet.client("a"), key.clone(), acked.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.is_cancelled() {
                    let peer = libp2p::PeerId::random().to_base58();
                    let rev = key.revoke(&deploy::RevocationBody {
                        version: 1,
                        fleet: "test".into(),
                        rack: "ghost".into(),
                        peer_id: peer.clone(),
                        revoked_at: 1,
                        reason: "crash test".into(),
                    });
                    match client
                        .request(
                            Method::POST,
                            "/api/v1/revocations",
                            Some(serde_json::to_vec(&rev).unwrap()),
                        )
                        .await
                    {
                        Ok((200, _)) => {
                            acked.lock().unwrap().insert(peer);
                            n += 1;
                        }
                        _ => break, // killed mid-request: not acknowledged
                    }
                }
                n
            }));
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..300))).await;
        agent.sigkill();
        stop.cancel();
        for w in writers {
            writes_in_flight_at_kill += w.await.unwrap();
        }
    }
    let total = acked.lock().unwrap().len();
    eprintln!("{KILLS} kills, {total} acknowledged durable writes ({writes_in_flight_at_kill} counted by writers), none lost");
    assert!(total > KILLS, "the test must actually write");
}
