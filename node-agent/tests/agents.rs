//! Real `fieldrack` agents on loopback.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_racks_form_a_full_mesh_quickly() {
    let fleet = Fleet::init("a,b,c", &[]);
    let _a = fleet.start("a");
    let _b = fleet.start("b");
    let _c = fleet.start("c");
    let took = wait_until(Duration::from_secs(5), "full mesh of a, b, c", || {
        all_see(&fleet, &["a", "b", "c"], "alive")
    })
    .await;
    eprintln!("full mesh formed in {took:?}");
    let s = status(&fleet.client("a")).await.unwrap();
    assert_eq!(s.rack, "a");
    assert_eq!(s.peers.len(), 2);
    for p in &s.peers {
        assert!(p.rtt_ms.is_some(), "rtt measured for {:?}", p.rack);
        assert!(p.last_seen_s.unwrap() < 3.0);
        assert!(p.connected);
        assert_eq!(
            p.power.as_ref().map(|p| p.dying),
            Some(false),
            "power gossiped"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_rack_is_dead_within_10s_and_rejoins() {
    let fleet = Fleet::init("a,b,c", &[]);
    let _a = fleet.start("a");
    let _b = fleet.start("b");
    let mut c = fleet.start("c");
    wait_until(Duration::from_secs(10), "full mesh", || {
        all_see(&fleet, &["a", "b", "c"], "alive")
    })
    .await;
    let incarnation_before = status(&fleet.client("c")).await.unwrap().incarnation;
    c.sigkill();
    let took = wait_until(Duration::from_secs(10), "c dead on a and b", || async {
        let a = status(&fleet.client("a")).await;
        let b = status(&fleet.client("b")).await;
        matches!((a, b), (Some(a), Some(b)) if state_of(&a, "c").as_deref() == Some("dead") && state_of(&b, "c").as_deref() == Some("dead"))
    })
    .await;
    eprintln!("SIGKILL -> dead on both survivors in {took:?}");
    // a and b still see each other
    assert!(all_see(&fleet, &["a", "b"], "alive").await);
    let _c = fleet.start("c");
    let took = wait_until(Duration::from_secs(8), "c alive again everywhere", || {
        all_see(&fleet, &["a", "b", "c"], "alive")
    })
    .await;
    eprintln!("restart -> alive everywhere in {took:?}");
    let incarnation_after = status(&fleet.client("c")).await.unwrap().incarnation;
    assert!(
        incarnation_after > incarnation_before,
        "incarnation grows across restarts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_another_fleet_never_gets_in() {
    let fleet = Fleet::init("a,b", &[]);
    let _a = fleet.start("a");
    let _b = fleet.start("b");
    // Fleet 2's rack x, told to bootstrap from our racks.
    let other = Fleet::init("x", &[]);
    let xcfg = other.config("x");
    let text = std::fs::read_to_string(&xcfg).unwrap();
    let ours: Vec<String> = ["a", "b"]
        .iter()
        .map(|r| {
            let c = deploy::RackConfig::load(&fleet.config(r)).unwrap();
            format!("\"{}\"", c.mesh.listen[0])
        })
        .collect();
    let text = text.replace(
        "bootstrap = []",
        &format!("bootstrap = [{}]", ours.join(", ")),
    );
    std::fs::write(&xcfg, text).unwrap();
    let _x = other.start("x");
    wait_until(Duration::from_secs(10), "a and b meet", || {
        all_see(&fleet, &["a", "b"], "alive")
    })
    .await;
    wait_until(Duration::from_secs(10), "x is refused by a", || async {
        metric(&fleet.client("a"), "fieldrack_mesh_rejected_total").await > 0.0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for r in ["a", "b"] {
        let s = status(&fleet.client(r)).await.unwrap();
        assert_eq!(s.peers.len(), 1, "{r} sees only its fleet: {:?}", s.peers);
    }
    let xs = status(&other.client("x")).await.unwrap();
    assert!(xs.peers.is_empty(), "x admitted nobody: {:?}", xs.peers);
    assert_eq!(
        metric(&other.client("x"), "fieldrack_mesh_rpc_received_total").await,
        0.0,
        "no rack data reached x"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_spreads_and_keeps_the_rack_out() {
    let fleet = Fleet::init("a,b,c", &[]);
    let _a = fleet.start("a");
    let _b = fleet.start("b");
    let mut c = fleet.start("c");
    wait_until(Duration::from_secs(10), "full mesh", || {
        all_see(&fleet, &["a", "b", "c"], "alive")
    })
    .await;
    // Revoke c through a only; b must learn it through the mesh.
    let out = Command::new(BIN)
        .args(["fleet", "revoke", "--dir"])
        .arg(fleet.dir.path())
        .args(["--rack", "c", "--reason", "stolen", "--config"])
        .arg(fleet.config("a"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = wait_until(Duration::from_secs(5), "c gone from a and b", || async {
        let a = status(&fleet.client("a")).await.unwrap();
        let b = status(&fleet.client("b")).await.unwrap();
        state_of(&a, "c").is_none()
            && state_of(&b, "c").is_none()
            && b.revoked.iter().any(|r| r.rack == "c")
    })
    .await;
    eprintln!("revocation spread in {took:?}");
    // A restart of c does not bring it back, and b remembers across its own restart.
    c.sigkill();
    let _c = fleet.start("c");
    tokio::time::sleep(Duration::from_secs(4)).await;
    for r in ["a", "b"] {
        let s = status(&fleet.client(r)).await.unwrap();
        assert!(
            state_of(&s, "c").is_none(),
            "{r} lists revoked c: {:?}",
            s.peers
        );
        assert!(metric(&fleet.client(r), "fieldrack_mesh_rejected_total").await > 0.0);
    }
    let (code, body) = fleet
        .client("b")
        .request(Method::GET, "/api/v1/revocations", None)
        .await
        .unwrap();
    assert_eq!(code, 200);
    let list: Vec<deploy::Revocation> = serde_json::from_slice(&body).unwrap();
    assert_eq!(list.len(), 1, "b stored the revocation it heard from a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requires_the_token_and_explains_bad_requests() {
    let fleet = Fleet::init("a", &[]);
    let _a = fleet.start("a");
    let client = fleet.client("a");
    wait_until(Duration::from_secs(10), "api up", || async {
        status(&client).await.is_some()
    })
    .await;
    let cfg = deploy::RackConfig::load(&fleet.config("a")).unwrap();
    // No token: raw request.
    let no_token = raw_get(&cfg.api.listen, "/api/v1/status", None).await;
    assert!(no_token.starts_with("HTTP/1.1 401"), "{no_token}");
    let wrong = raw_get(&cfg.api.listen, "/metrics", Some("nope")).await;
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    // Malformed revocation.
    let (code, body) = client
        .request(
            Method::POST,
            "/api/v1/revocations",
            Some(b"{not json".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(code, 400);
    assert!(String::from_utf8_lossy(&body).contains("not a revocation"));
    // Well-formed but not signed by the fleet.
    let forged = deploy::FleetKey::generate().revoke(&deploy::RevocationBody {
        version: 1,
        fleet: "test".into(),
        rack: "a".into(),
        peer_id: libp2p::PeerId::random().to_base58(),
        revoked_at: 0,
        reason: "x".into(),
    });
    let (code, body) = client
        .request(
            Method::POST,
            "/api/v1/revocations",
            Some(serde_json::to_vec(&forged).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("signature"));
    let (code, _) = client
        .request(Method::GET, "/api/v1/events?limit=abc", None)
        .await
        .unwrap();
    assert_eq!(code, 400);
    let (code, _) = client
        .request(Method::GET, "/api/v1/nope", None)
        .await
        .unwrap();
    assert_eq!(code, 404);
    let (code, _) = client
        .request(Method::DELETE, "/api/v1/status", None)
        .await
        .unwrap();
    assert_eq!(code, 405);
    let (code, body) = client
        .request(
            Method::POST,
            "/api/v1/revocations",
            Some(vec![b' '; 100_000]),
        )
        .await
        .unwrap();
    assert_eq!(code, 413, "{}", String::from_utf8_lossy(&body));
    // Metrics.
    let (code, body) = client.request(Method::GET, "/metrics", None).await.unwrap();
    assert_eq!(code, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("# TYPE fieldrack_peers gauge"));
    assert!(text.contains("fieldrack_power_dying{rack=\"a\"} 0"));
}

async fn raw_get(addr: &str, path: &str, token: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_agent_within_5s() {
    let fleet = Fleet::init("a,b", &[]);
    let mut a = fleet.start("a");
    let _b = fleet.start("b");
    wait_until(Duration::from_secs(10), "mesh", || {
        all_see(&fleet, &["a", "b"], "alive")
    })
    .await;
    let t0 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    loop {
        if let Some(status) = a.child.try_wait().unwrap() {
            assert!(status.success(), "clean exit: {status}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("SIGTERM -> exit in {:?}", t0.elapsed());
    assert!(a.log_text().contains("shutting down"));
}

#[test]
fn bad_rack_toml_exits_64_naming_the_field() {
    let fleet = Fleet::init("a", &[]);
    let cfg = fleet.config("a");
    let good = std::fs::read_to_string(&cfg).unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            good.replace("[api]\nlisten = \"", "[api]\nlisten = \"nonsense"),
            "api.listen",
        ),
        (
            good.replace("probe_interval_ms = 1000", "probe_interval_ms = 0"),
            "membership.probe_interval_ms",
        ),
        (good.replacen("rack = \"a\"", "rack = \"A B\"", 1), "rack"),
        (format!("{good}\nbogus_key = 1\n"), "bogus_key"),
        (
            good.replace("[mesh]", "[mesh]\nfrobnicate = true"),
            "frobnicate",
        ),
        (good.replace("/quic-v1", "/tcp-nope"), "mesh.listen"),
        ("rack = ".to_string(), "rack.toml"),
    ];
    for (text, field) in cases {
        std::fs::write(&cfg, &text).unwrap();
        let out = Command::new(BIN)
            .arg("agent")
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "exit code for {field}: {err}");
        assert!(err.contains(field), "error names {field}: {err}");
    }
    // A missing identity key is a configuration error too.
    std::fs::write(&cfg, &good).unwrap();
    std::fs::remove_file(fleet.dir.path().join("a/identity.key")).unwrap();
    let out = Command::new(BIN)
        .arg("agent")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("identity_key"));
}

#[test]
fn demo_runs_a_field_and_stops_cleanly_on_ctrl_c() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["demo", "--dir"])
        .arg(dir.path().join("field"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let t0 = Instant::now();
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("Ctrl-C stops the field"))
    {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("demo printed no ready line in time: {seen:#?}"),
        }
    }
    let all = seen.join("\n");
    assert!(all.contains("Full mesh formed"), "{all}");
    assert!(all.contains("/api/v1/status"), "URLs printed: {all}");
    assert!(all.contains("alive"), "status table printed: {all}");
    eprintln!("demo ready in {:?}", t0.elapsed());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let t1 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t1.elapsed() < Duration::from_secs(10), "demo did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    let rest: Vec<String> = rx.try_iter().collect();
    assert_eq!(
        rest.iter()
            .filter(|l| l.contains("stopped (exit status: 0)"))
            .count(),
        3,
        "all racks stopped cleanly: {rest:#?}"
    );
}
