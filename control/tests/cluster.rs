//! Three racks on loopback meshes form one control plane, place an
//! appliance, and keep committing after the leader dies.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use control::{Command, Control, ControlSettings, FieldState, RackReport, Response};
use deploy::appliance::parse_manifest;
use deploy::cert::{CertBody, RevocationBody, CERT_VERSION};
use deploy::power::PowerStatus;
use deploy::{Certificate, FleetKey, Role};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use mesh::{MeshHandle, MeshSettings, RackInfo};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

const RACKS: [&str; 3] = ["a", "b", "c"];

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn cert_for(fleet: &FleetKey, rack: &str, key: &Keypair) -> Certificate {
    fleet.issue(&CertBody {
        version: CERT_VERSION,
        fleet: "test".into(),
        rack: rack.into(),
        peer_id: PeerId::from(key.public()).to_base58(),
        role: Role::Rack,
        site: "s".into(),
        serial: 1,
        not_before: now_s() - 60,
        not_after: now_s() + 3600,
    })
}

fn mesh_settings(
    fleet: &FleetKey,
    rack: &str,
    key: Keypair,
    bootstrap: Vec<Multiaddr>,
) -> MeshSettings {
    MeshSettings {
        certificate: cert_for(fleet, rack, &key),
        keypair: key,
        fleet_key: fleet.public(),
        fleet_name: "test".into(),
        rack: rack.into(),
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
        bootstrap,
        mdns: false,
        admission_timeout: Duration::from_millis(1500),
        max_connections: 64,
        max_connections_per_peer: 2,
        idle_timeout: Duration::from_secs(30),
        reconnect_initial: Duration::from_millis(200),
        reconnect_max: Duration::from_secs(1),
        membership: Default::default(),
        incarnation: 1,
        meta: RackInfo {
            rack: rack.into(),
            role: Role::Rack,
            site: "s".into(),
            cpus: 4,
            memory_mb: 4096,
            power: PowerStatus::default(),
            version: "test".into(),
            api: "127.0.0.1:1".into(),
        },
        revocations: vec![],
        seed: 7,
    }
}

async fn addr_of(h: &MeshHandle) -> Multiaddr {
    let s = h.status().await.unwrap();
    s.listen_addrs[0]
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(s.peer_id))
}

struct Rack {
    name: &'static str,
    peer: PeerId,
    mesh: MeshHandle,
    mesh_cancel: CancellationToken,
    control_cancel: CancellationToken,
    control: Arc<Control>,
    _dir: TempDir,
}

/// Poll `f` until it returns `Some`, or fail after `within`.
async fn until<T>(within: Duration, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn report() -> RackReport {
    RackReport {
        role: Role::Rack,
        site: "s".into(),
        cpus: 4,
        memory_mb: 4096,
        ..RackReport::default()
    }
}

/// The leader every live rack agrees on, with all three voters.
fn agreed_leader(racks: &[&Rack]) -> Option<String> {
    let statuses: Vec<_> = racks.iter().map(|r| r.control.status()).collect();
    let leader = statuses[0].leader.clone()?;
    let all_agree = statuses.iter().all(|s| {
        s.initialized
            && s.voters.len() == RACKS.len()
            && s.leader.as_deref() == Some(leader.as_str())
    });
    let leaders = racks.iter().filter(|r| r.control.is_leader()).count();
    (all_agree
        && leaders == 1
        && racks
            .iter()
            .any(|r| r.name == leader && r.control.is_leader()))
    .then_some(leader)
}

fn state_of(r: &Rack) -> Arc<FieldState> {
    r.control.state().borrow().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_racks_elect_place_and_survive_the_leader() {
    let t0 = Instant::now();
    let fleet = FleetKey::generate();
    let mut racks: Vec<Rack> = Vec::new();
    let mut addrs: Vec<Multiaddr> = Vec::new();
    let mut meshes = Vec::new();
    for name in RACKS {
        let key = Keypair::generate_ed25519();
        let peer = PeerId::from(key.public());
        let mesh_cancel = CancellationToken::new();
        let bootstrap = addrs.clone();
        let (mesh, _) = mesh::start(
            mesh_settings(&fleet, name, key, bootstrap),
            mesh_cancel.clone(),
        )
        .await
        .unwrap();
        addrs.push(addr_of(&mesh).await);
        meshes.push(mesh.clone());
        let dir = tempfile::tempdir().unwrap();
        let mut settings = ControlSettings::new(dir.path().join("control"), name);
        settings.heartbeat = Duration::from_millis(100);
        settings.election_timeout = Duration::from_millis(600);
        settings.settle = Duration::from_millis(1000);
        settings.plan_every = Duration::from_millis(200);
        settings.remove_dead_after = Some(Duration::from_secs(2));
        let control_cancel = CancellationToken::new();
        let control = Control::start(settings, mesh.clone(), peer, control_cancel.clone())
            .await
            .unwrap();
        racks.push(Rack {
            name,
            peer,
            mesh,
            mesh_cancel,
            control_cancel,
            control,
            _dir: dir,
        });
    }

    until(Duration::from_secs(10), "a full mesh", async || {
        meshes.iter().all(|m| m.admitted().len() == 2).then_some(())
    })
    .await;
    let all: Vec<&Rack> = racks.iter().collect();
    let leader = until(
        Duration::from_secs(15),
        "three voters and one leader",
        async || agreed_leader(&all),
    )
    .await;

    // Deploy from a follower (forwarded to the leader), renew from every rack.
    let follower = racks.iter().find(|r| r.name != leader).unwrap();
    let specs = parse_manifest(
        "[[appliance]]\nname = \"web\"\ndriver = \"process\"\ncommand = [\"/bin/true\"]\ntier = 0\n",
    )
    .unwrap();
    let r = follower
        .control
        .propose(Command::Deploy { specs }, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(r, Response::Ok);
    for r in &racks {
        let got = r
            .control
            .propose(
                Command::Renew {
                    rack: r.name.into(),
                    report: report(),
                },
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert!(matches!(got, Response::Granted(_)), "{got:?}");
    }
    // The leader's placement loop assigns it; every rack applies that.
    let owner = until(
        Duration::from_secs(10),
        "web placed on every rack",
        async || {
            let owners: Vec<_> = racks
                .iter()
                .map(|r| {
                    state_of(r)
                        .apps
                        .get("web")
                        .and_then(|a| a.owner.clone().map(|o| (o, a.epoch)))
                })
                .collect();
            let first = owners[0].clone()?;
            let reports = racks.iter().all(|r| state_of(r).racks.len() == RACKS.len());
            (reports && owners.iter().all(|o| o.as_ref() == Some(&first))).then_some(first)
        },
    )
    .await;
    assert!(RACKS.contains(&owner.0.as_str()), "{owner:?}");
    assert!(owner.1 >= 1);
    for r in &racks {
        let st = state_of(r);
        let t = st.apps["web"].transfer.as_ref().expect("a transfer record");
        assert_eq!(t.reason, "placed");
    }

    // Kill the leader: its control plane and its mesh.
    let dead = racks.iter().position(|r| r.name == leader).unwrap();
    let dead = racks.remove(dead);
    dead.control_cancel.cancel();
    dead.control.shutdown().await;
    dead.mesh_cancel.cancel();

    let live: Vec<&Rack> = racks.iter().collect();
    let new_leader = until(Duration::from_secs(15), "a new leader", async || {
        let statuses: Vec<_> = live.iter().map(|r| r.control.status()).collect();
        let l = statuses[0].leader.clone()?;
        (l != leader
            && statuses
                .iter()
                .all(|s| s.leader.as_deref() == Some(l.as_str()))
            && live.iter().any(|r| r.name == l && r.control.is_leader()))
        .then_some(l)
    })
    .await;
    assert_ne!(new_leader, leader);

    // A proposal from the remaining follower is forwarded and commits.
    let follower = racks.iter().find(|r| r.name != new_leader).unwrap();
    let r = follower
        .control
        .propose(
            Command::SetRunning {
                name: "web".into(),
                running: false,
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(r, Response::Ok);
    let refused = follower
        .control
        .propose(
            Command::SetRunning {
                name: "nope".into(),
                running: false,
            },
            Duration::from_secs(5),
        )
        .await;
    assert!(
        matches!(refused, Err(control::ControlError::Refused(_))),
        "{refused:?}"
    );
    until(
        Duration::from_secs(10),
        "the stop applied on both survivors",
        async || {
            racks
                .iter()
                .all(|r| state_of(r).apps.get("web").is_some_and(|a| !a.running))
                .then_some(())
        },
    )
    .await;

    // Dead for longer than remove_dead_after: the old leader leaves the
    // voters (its report stays: it is dead, not revoked).
    until(
        Duration::from_secs(20),
        "the dead rack taken out of the voters",
        async || {
            racks
                .iter()
                .all(|r| {
                    let v = r.control.status().voters;
                    v.len() == 2 && !v.contains(&leader)
                })
                .then_some(())
        },
    )
    .await;
    assert!(racks
        .iter()
        .all(|r| state_of(r).racks.contains_key(&leader)));
    let r = follower
        .control
        .propose(
            Command::SetRunning {
                name: "web".into(),
                running: true,
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(r, Response::Ok, "two voters of two still commit");

    // Revoked: its report is forgotten too.
    let revocation = fleet.revoke(&RevocationBody {
        version: CERT_VERSION,
        fleet: "test".into(),
        rack: leader.clone(),
        peer_id: dead.peer.to_base58(),
        revoked_at: now_s(),
        reason: "test".into(),
    });
    racks[0].mesh.revoke(revocation).await.unwrap();
    until(
        Duration::from_secs(10),
        "the revoked rack forgotten on both survivors",
        async || {
            racks
                .iter()
                .all(|r| !state_of(r).racks.contains_key(&leader))
                .then_some(())
        },
    )
    .await;

    for r in &racks {
        r.control_cancel.cancel();
        r.control.shutdown().await;
        r.mesh_cancel.cancel();
    }
    assert!(t0.elapsed() < Duration::from_secs(60));
}
