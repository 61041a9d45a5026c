//! Racks on loopback meshes form one control plane, place an appliance,
//! keep committing after the leader dies (which leaves the voters, and
//! whose report goes when it is revoked); clusters that formed apart merge
//! when they meet.

use std::sync::Arc;
use std::time::{Duration, Instant};

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
use util::time::unix_secs;

const RACKS: [&str; 3] = ["a", "b", "c"];

fn cert_for(fleet: &FleetKey, rack: &str, key: &Keypair) -> Certificate {
    fleet.issue(&CertBody {
        version: CERT_VERSION,
        fleet: "test".into(),
        rack: rack.into(),
        peer_id: PeerId::from(key.public()).to_base58(),
        role: Role::Rack,
        site: "s".into(),
        serial: 1,
        not_before: unix_secs() - 60,
        not_after: unix_secs() + 3600,
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
        mdns: None,
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
            bulk_port: None,
        },
        revocations: vec![],
        seed: 7,
        bulk: None,
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
        let bootstrap = addrs.clone();
        let rack = start_rack(
            &fleet,
            name,
            |m| m.bootstrap = bootstrap,
            |c| {
                c.settle = Duration::from_millis(1000);
                c.remove_dead_after = Some(Duration::from_secs(2));
            },
        )
        .await;
        addrs.push(addr_of(&rack.mesh).await);
        meshes.push(rack.mesh.clone());
        racks.push(rack);
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
    // Every rack's field view has all three: reported, admitted, alive in
    // SWIM, renewing, so up and reachable.
    for r in &racks {
        let view = r.control.field_view().await;
        for name in RACKS {
            let s = view.rack(name).expect("every rack in the view");
            assert_eq!(s.local, name == r.name, "{s:?}");
            assert!(s.reported && s.admitted && s.renewing, "{s:?}");
            assert!(s.up && s.reachable && s.down_since_ms.is_none(), "{s:?}");
            assert_eq!(s.site.as_deref(), Some("s"), "{s:?}");
            if name != r.name {
                assert_eq!(s.membership, Some(mesh::membership::State::Alive), "{s:?}");
            }
        }
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
    let r = set_running(follower, "web", false).await.unwrap();
    assert_eq!(r, Response::Ok);
    let refused = set_running(follower, "nope", false).await;
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
    let r = set_running(follower, "web", true).await.unwrap();
    assert_eq!(r, Response::Ok, "two voters of two still commit");

    // Revoked: its report is forgotten too.
    let revocation = fleet.revoke(&RevocationBody {
        version: CERT_VERSION,
        fleet: "test".into(),
        rack: leader.clone(),
        peer_id: dead.peer.to_base58(),
        revoked_at: unix_secs(),
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
    // The view still names it, revoked and down, on both survivors.
    for r in &racks {
        let view = r.control.field_view().await;
        let s = view
            .rack(&leader)
            .expect("a revoked rack stays in the view");
        assert!(s.revoked && !s.up && !s.reachable && !s.reported, "{s:?}");
        assert!(s.down_since_ms.is_some(), "{s:?}");
    }

    for r in &racks {
        stop(r).await;
    }
    assert!(t0.elapsed() < Duration::from_secs(60));
}

/// Commit `SetRunning` through `rack`.
async fn set_running(
    rack: &Rack,
    name: &str,
    running: bool,
) -> Result<Response, control::ControlError> {
    let cmd = Command::SetRunning {
        name: name.into(),
        running,
    };
    rack.control.propose(cmd, Duration::from_secs(5)).await
}

/// Stop a rack's control plane and mesh.
async fn stop(r: &Rack) {
    r.control_cancel.cancel();
    r.control.shutdown().await;
    r.mesh_cancel.cancel();
}

/// Logs of the control plane in the test output (`RUST_LOG` to change).
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "control=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Start a rack's mesh and control plane.
async fn start_rack(
    fleet: &FleetKey,
    name: &'static str,
    mesh_settings_of: impl FnOnce(&mut MeshSettings),
    control_settings_of: impl FnOnce(&mut ControlSettings),
) -> Rack {
    let key = Keypair::generate_ed25519();
    let dir = tempfile::tempdir().unwrap();
    start_rack_in(fleet, name, key, dir, mesh_settings_of, control_settings_of).await
}

/// [`start_rack`] with a given identity and state directory (a restart).
async fn start_rack_in(
    fleet: &FleetKey,
    name: &'static str,
    key: Keypair,
    dir: TempDir,
    mesh_settings_of: impl FnOnce(&mut MeshSettings),
    control_settings_of: impl FnOnce(&mut ControlSettings),
) -> Rack {
    let peer = PeerId::from(key.public());
    let mut ms = mesh_settings(fleet, name, key, vec![]);
    mesh_settings_of(&mut ms);
    let mesh_cancel = CancellationToken::new();
    let (mesh, _) = mesh::start(ms, mesh_cancel.clone()).await.unwrap();
    let mut settings = ControlSettings::new(dir.path().join("control"), name);
    settings.heartbeat = Duration::from_millis(100);
    settings.election_timeout = Duration::from_millis(600);
    settings.settle = Duration::from_millis(500);
    settings.plan_every = Duration::from_millis(200);
    control_settings_of(&mut settings);
    let control_cancel = CancellationToken::new();
    // A restarted rack's store may still be held by its stopping
    // predecessor's tasks (a new process would not wait).
    let deadline = Instant::now() + Duration::from_secs(15);
    let control = loop {
        match Control::start(settings.clone(), mesh.clone(), peer, control_cancel.clone()).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "control store busy; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("starting the control plane: {e}"),
        }
    };
    Rack {
        name,
        peer,
        mesh,
        mesh_cancel,
        control_cancel,
        control,
        _dir: dir,
    }
}

fn deploy_one(name: &str) -> Command {
    let specs = parse_manifest(&format!(
        "[[appliance]]\nname = \"{name}\"\ndriver = \"process\"\ncommand = [\"/bin/true\"]\ntier = 1\n"
    ))
    .unwrap();
    Command::Deploy { specs }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_clusters_formed_apart_merge_into_one() {
    init_tracing();
    let fleet = FleetKey::generate();
    // b dials a through a gate that stays shut until both formed a
    // cluster of their own (as racks cut off at first boot do).
    let a = start_rack(&fleet, "a", |_| {}, |_| {}).await;
    let gate = Gate::to(udp_of(&a).await).await;
    let b = start_rack(
        &fleet,
        "b",
        |s| {
            s.bootstrap = vec![gate.multiaddr()];
            s.reconnect_initial = Duration::from_millis(500);
            s.reconnect_max = Duration::from_secs(1);
        },
        |_| {},
    )
    .await;
    for r in [&a, &b] {
        until(Duration::from_secs(5), "a cluster of one", async || {
            (r.control.status().voters == vec![r.name.to_string()]).then_some(())
        })
        .await;
    }
    assert!(a.mesh.admitted().is_empty(), "the two formed apart");
    for (r, app) in [(&a, "web"), (&b, "db")] {
        let got = r
            .control
            .propose(deploy_one(app), Duration::from_secs(5))
            .await;
        assert_eq!(got.unwrap(), Response::Ok);
        let renew = Command::Renew {
            rack: r.name.into(),
            report: report(),
        };
        r.control
            .propose(renew, Duration::from_secs(5))
            .await
            .unwrap();
    }
    // Each placed its appliance on itself (epoch 1 or more).
    let mut epochs = std::collections::BTreeMap::new();
    for (r, app) in [(&a, "web"), (&b, "db")] {
        let e = until(Duration::from_secs(10), "placed", async || {
            let st = state_of(r);
            let rec = st.apps.get(app)?;
            (rec.owner.as_deref() == Some(r.name)).then_some(rec.epoch)
        })
        .await;
        assert!(e >= 1);
        epochs.insert(app, e);
    }

    // The meshes meet: one cluster of both, with both appliances.
    let mut events = [a.control.subscribe(), b.control.subscribe()];
    gate.open();
    until(Duration::from_secs(30), "one cluster of two", async || {
        [&a, &b]
            .iter()
            .all(|r| {
                let s = r.control.status();
                s.voters.len() == 2 && s.leader.is_some()
            })
            .then_some(())
    })
    .await;
    until(
        Duration::from_secs(15),
        "both appliances in the merged field",
        async || {
            [&a, &b]
                .iter()
                .all(|r| {
                    let st = state_of(r);
                    st.apps.contains_key("web") && st.apps.contains_key("db")
                })
                .then_some(())
        },
    )
    .await;
    let leaders: Vec<_> = [&a, &b].iter().map(|r| r.control.status().leader).collect();
    assert_eq!(leaders[0], leaders[1], "one leader");
    // The rack that left said so, and adopted what it carried.
    let mut seen = Vec::new();
    until(Duration::from_secs(5), "the merge's events", async || {
        for rx in &mut events {
            while let Ok(ev) = rx.try_recv() {
                seen.push(ev.kind());
            }
        }
        (seen.len() >= 2).then_some(())
    })
    .await;
    seen.sort_unstable();
    assert_eq!(
        seen,
        ["control_adopted", "control_left_cluster"],
        "{seen:?}"
    );
    for (app, before) in &epochs {
        let now = state_of(&a).apps[*app].epoch;
        assert!(
            now >= *before,
            "{app}: epoch {now} after the merge, {before} before"
        );
    }
    // And it keeps committing.
    let r = set_running(&a, "db", false).await.unwrap();
    assert_eq!(r, Response::Ok);
    for r in [a, b] {
        stop(&r).await;
    }
}

/// The UDP address a rack's mesh listens on.
async fn udp_of(r: &Rack) -> std::net::SocketAddr {
    let s = r.mesh.status().await.unwrap();
    let port = s.listen_addrs.iter().find_map(|m| {
        m.iter().find_map(|p| match p {
            libp2p::multiaddr::Protocol::Udp(port) => Some(port),
            _ => None,
        })
    });
    format!("127.0.0.1:{}", port.unwrap()).parse().unwrap()
}

/// A UDP relay on loopback that drops everything until opened: two groups
/// of racks that must not meet yet (formed apart, as racks cut off at
/// first boot are) dial each other through it.
struct Gate {
    addr: std::net::SocketAddr,
    open: Arc<std::sync::atomic::AtomicBool>,
}

impl Gate {
    async fn to(target: std::net::SocketAddr) -> Gate {
        use std::collections::HashMap;
        use std::sync::atomic::Ordering;
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gate = open.clone();
        tokio::spawn(async move {
            // One upstream socket per client, relaying replies back.
            let mut ups: HashMap<std::net::SocketAddr, Arc<tokio::net::UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else {
                    return;
                };
                if !gate.load(Ordering::Relaxed) {
                    continue;
                }
                let up = match ups.get(&from) {
                    Some(u) => u.clone(),
                    None => {
                        let u = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
                        u.connect(target).await.unwrap();
                        let (u2, front2) = (u.clone(), front.clone());
                        tokio::spawn(async move {
                            let mut b = vec![0u8; 65_536];
                            while let Ok(n) = u2.recv(&mut b).await {
                                let _ = front2.send_to(&b[..n], from).await;
                            }
                        });
                        ups.insert(from, u.clone());
                        u
                    }
                };
                let _ = up.send(&buf[..n]).await;
            }
        });
        Gate { addr, open }
    }

    fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn multiaddr(&self) -> Multiaddr {
        format!("/ip4/127.0.0.1/udp/{}/quic-v1", self.addr.port())
            .parse()
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_clusters_of_two_merge_into_one_of_four() {
    init_tracing();
    let fleet = FleetKey::generate();
    let a = start_rack(&fleet, "a", |_| {}, |_| {}).await;
    let a_addr = addr_of(&a.mesh).await;
    let b = start_rack(&fleet, "b", |s| s.bootstrap = vec![a_addr.clone()], |_| {}).await;
    // Two gated links, a-d and b-c, so that every rack reaches every
    // other directly or through one relay once they open (Raft calls
    // relay one hop).
    let gate_a = Gate::to(udp_of(&a).await).await;
    let gate_b = Gate::to(udp_of(&b).await).await;
    let redial = |s: &mut MeshSettings, to: Vec<Multiaddr>| {
        s.bootstrap = to;
        s.reconnect_initial = Duration::from_millis(500);
        s.reconnect_max = Duration::from_secs(1);
    };
    let c = start_rack(&fleet, "c", |s| redial(s, vec![gate_b.multiaddr()]), |_| {}).await;
    let c_addr = addr_of(&c.mesh).await;
    let d = start_rack(
        &fleet,
        "d",
        |s| redial(s, vec![c_addr.clone(), gate_a.multiaddr()]),
        |_| {},
    )
    .await;
    let groups = [[&a, &b], [&c, &d]];
    for g in &groups {
        until(Duration::from_secs(15), "a cluster of two", async || {
            g.iter()
                .all(|r| r.control.status().voters.len() == 2)
                .then_some(())
        })
        .await;
    }
    for (g, app) in groups.iter().zip(["web", "db"]) {
        let got = g[0]
            .control
            .propose(deploy_one(app), Duration::from_secs(5))
            .await;
        assert_eq!(got.unwrap(), Response::Ok);
    }
    assert!(a.mesh.admitted().iter().all(|(_, r)| r == "b"), "apart");

    gate_a.open();
    gate_b.open();
    let all = [&a, &b, &c, &d];
    until(Duration::from_secs(40), "one cluster of four", async || {
        let st: Vec<_> = all.iter().map(|r| r.control.status()).collect();
        (st.iter().all(|s| s.voters.len() == 4 && s.leader.is_some())
            && st.iter().all(|s| s.leader == st[0].leader))
        .then_some(())
    })
    .await;
    until(
        Duration::from_secs(15),
        "both appliances on every rack",
        async || {
            all.iter()
                .all(|r| {
                    let st = state_of(r);
                    st.apps.contains_key("web") && st.apps.contains_key("db")
                })
                .then_some(())
        },
    )
    .await;
    for r in [a, b, c, d] {
        stop(&r).await;
    }
}
