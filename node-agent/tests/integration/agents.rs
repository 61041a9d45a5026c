//! Real `fieldrack` agents on loopback.

use crate::common;

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
    // Round trips come from SWIM's probes, one peer per protocol period.
    wait_until(
        Duration::from_secs(5),
        "a round trip to every peer",
        || async {
            status(&fleet.client("a"))
                .await
                .is_some_and(|s| s.peers.iter().all(|p| p.rtt_ms.is_some()))
        },
    )
    .await;
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

/// GET `path` from `addr`: the head as text, the body as bytes.
async fn get_bytes(addr: &str, path: &str) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |i| i + 4);
    (
        String::from_utf8_lossy(&out[..end]).into_owned(),
        out[end..].to_vec(),
    )
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
    assert!(all.contains("imported the sample map"), "{all}");
    assert!(
        all.contains("Deployed the sample appliance logbook"),
        "{all}"
    );
    assert!(
        all.contains("/console/  (login: "),
        "console URL printed: {all}"
    );
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

/// Two racks and a witness planned in a field.toml, bundled, installed
/// under their own roots, started: each tells systemd it is ready and
/// feeds the watchdog, the field forms, and `doctor` passes everywhere.
/// A bundle with one flipped byte is refused, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundled_racks_install_notify_systemd_and_pass_doctor() {
    use std::os::unix::net::UnixDatagram;
    let laptop = tempfile::tempdir().unwrap();
    let l = laptop.path();
    // Distinct loopback ports per member (mesh, mesh + 1 bulk, api, proxy).
    let base = 20_000 + (std::process::id() % 2_000) as u16 * 10;
    let mut field =
        String::from("fleet = \"bundled\"\n[[site]]\nname = \"s1\"\n[[site]]\nname = \"s2\"\n");
    for (i, (table, name, site)) in [
        ("rack", "a", "s1"),
        ("rack", "b", "s2"),
        ("witness", "w", "s2"),
    ]
    .into_iter()
    .enumerate()
    {
        let p = base + i as u16 * 4;
        field.push_str(&format!(
            "[[{table}]]\nname = \"{name}\"\nsite = \"{site}\"\naddress = \"127.0.0.1\"\n\
             ports = {{ mesh = {}, api = {}, proxy = {} }}\n",
            p,
            p + 2,
            p + 3
        ));
        if table == "rack" {
            field.push_str("cpus = 2\nmemory_mb = 1024\ndisk = \"1G\"\n");
        }
    }
    // The sample map as the pack of s1; its source's upstream is closed,
    // so a tile a serves comes from the imported pack.
    field.push_str(
        "[[tile_source]]\nname = \"sample\"\nurl = \"http://127.0.0.1:9/{z}/{x}/{y}.png\"\nformat = \"png\"\n\
         [[tile_pack]]\nname = \"map\"\npath = \"map.pmtiles\"\nsource = \"sample\"\nsites = [\"s1\"]\n",
    );
    field.push_str("[[appliance]]\nmanifest = \"apps.toml\"\nimages = { db = \"db.img\" }\n");
    std::fs::write(l.join("field.toml"), &field).unwrap();
    std::fs::write(
        l.join("apps.toml"),
        "[[appliance]]\nname = \"clinic\"\ndriver = \"process\"\ncommand = [\"sleep\", \"3600\"]\n\
         tier = 0\nmemory_mb = 64\n[[appliance.volume]]\nname = \"db\"\nsize = \"1M\"\n",
    )
    .unwrap();
    std::fs::write(l.join("db.img"), vec![7u8; 1 << 20]).unwrap();
    std::fs::write(
        l.join("map.pmtiles"),
        node_agent::sample_tiles::sample_pmtiles(),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let field_toml = l.join("field.toml");
    let field_arg = field_toml.to_str().unwrap();
    let (code, plan, err) = run(&["fleet", "plan", field_arg]);
    assert_eq!(code, Some(0), "{plan}{err}");
    assert!(plan.contains("if a rack dies:"), "{plan}");
    let out = l.join("bundles");
    let (code, text, err) = run(&["fleet", "bundle", field_arg, "--out", out.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}{err}");
    let fleet_key = std::fs::read_to_string(l.join("fleet/fleet.toml"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("public_key = \""))
        .map(|k| k.trim_end_matches('"').to_string())
        .unwrap();

    // One flipped byte in a's tile pack: refused, naming the file.
    let tampered = l.join("tampered");
    let _ = Command::new("cp")
        .arg("-a")
        .arg(out.join("a"))
        .arg(&tampered)
        .status();
    let pack = tampered.join("tiles/sample/map.pmtiles");
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[3] ^= 0x20;
    std::fs::write(&pack, bytes).unwrap();
    let root_t = l.join("root-t");
    let (code, _, err) = run(&[
        "install",
        tampered.to_str().unwrap(),
        "--root",
        root_t.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("tiles/sample/map.pmtiles"), "{err}");
    assert!(!root_t.join("etc/fieldrack/rack.toml").exists());

    let mut agents = Vec::new();
    let mut configs = Vec::new();
    for name in ["a", "b", "w"] {
        let root = l.join(format!("root-{name}"));
        let (code, text, err) = run(&[
            "install",
            out.join(name).to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
            "--fleet-key",
            &fleet_key,
        ]);
        assert_eq!(code, Some(0), "{text}{err}");
        assert!(text.contains("skipped systemctl"), "{text}");
        let config = root.join("etc/fieldrack/rack.toml");
        let sock_path = l.join(format!("notify-{name}"));
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let log = std::fs::File::create(l.join(format!("{name}.log"))).unwrap();
        let child = Command::new(BIN)
            .args(["agent", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "400000")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        agents.push(Agent {
            child,
            log: l.join(format!("{name}.log")),
        });
        configs.push((name, config, sock));
    }
    for (name, _, sock) in &configs {
        let mut buf = [0u8; 256];
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{name}: no READY=1: {e}"));
        assert!(
            buf[..n].starts_with(b"READY=1"),
            "{name}: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1", "{name}");
    }
    let client = |i: usize| node_agent::client::AgentClient::from_config(&configs[i].1).unwrap();
    wait_until(
        Duration::from_secs(20),
        "every member alive and a leader",
        || async {
            for i in 0..3 {
                let Some(s) = status(&client(i)).await else {
                    return false;
                };
                let alive = s
                    .peers
                    .iter()
                    .filter(|p| format!("{:?}", p.state) == "Alive")
                    .count();
                if alive < 2 || s.control.as_ref().and_then(|c| c.leader.as_ref()).is_none() {
                    return false;
                }
            }
            true
        },
    )
    .await;
    // Every member reaches every time-to-protected step with no operator:
    // the installed catalog deploys itself, the preloaded volume is
    // protected at power-on.
    let protected = wait_until(
        Duration::from_secs(60),
        "every member protected",
        || async {
            for i in 0..3 {
                let Some(s) = status(&client(i)).await else {
                    return false;
                };
                if s.protected
                    .as_ref()
                    .and_then(|t| t.protected_ms())
                    .is_none()
                {
                    return false;
                }
            }
            true
        },
    )
    .await;
    for (i, (name, _, _)) in configs.iter().enumerate() {
        let s = status(&client(i)).await.unwrap();
        eprintln!("{name}: {}", s.protected.unwrap().render());
    }
    eprintln!("field protected {protected:?} after the wait began");
    // a imported its site's pack (pinned): its tiles are served with the
    // source's upstream closed. b's site carries none.
    let tile = *node_agent::sample_tiles::sample_tiles().last().unwrap();
    let path = format!("/tiles/sample/{}/{}/{}.png", tile.z, tile.x, tile.y);
    let (head, body) = get_bytes(&format!("127.0.0.1:{}", base + 3), &path).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    assert!(body.starts_with(b"\x89PNG"), "{path}: not a PNG");
    for (name, config, _) in &configs {
        let t0 = Instant::now();
        let (code, text, err) = run(&["doctor", "--config", config.to_str().unwrap()]);
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "doctor took {:?}",
            t0.elapsed()
        );
        assert_eq!(code, Some(0), "{name}: {text}{err}");
        eprintln!("{name}: doctor in {:.1?}\n{text}", t0.elapsed());
        for check in [
            "permissions",
            "certificate",
            "bundle",
            "agent",
            "peers",
            "majority",
            "clock",
            "tile-packs",
        ] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with("pass") && l.contains(check)),
                "{name}: {check} did not pass:\n{text}"
            );
        }
        let (code, json, _) = run(&["doctor", "--config", config.to_str().unwrap(), "--json"]);
        assert_eq!(code, Some(0));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(v["checks"].as_array().unwrap().len() >= 12, "{json}");
        // On ext4 or tmpfs (CI) these warn; they never fail here.
        for check in ["filesystem", "backhaul"] {
            assert!(
                v["checks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["name"] == check && c["verdict"] != "fail"),
                "{check}: {json}"
            );
        }
    }
    // doctor fails (exit 1) once a key is readable by others.
    {
        use std::os::unix::fs::PermissionsExt;
        let key = configs[0].1.parent().unwrap().join("identity.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (code, text, _) = run(&["doctor", "--config", configs[0].1.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{text}");
        assert!(text.contains("chmod 600"), "{text}");
    }
    let status_text = run(&["status", "--config", configs[0].1.to_str().unwrap()]).1;
    assert!(status_text.contains("readiness: "), "{status_text}");
    assert!(status_text.contains("-> protected in "), "{status_text}");
    drop(agents);
}

#[test]
fn console_hash_password_prints_a_hash_that_logs_in() {
    use node_agent::console::auth::Credentials;
    use node_agent::console::session::Role;
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(["console", "hash-password"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"correct horse\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let creds = Credentials {
        api_token: "token".into(),
        operator_password: None,
        viewer_password: Some(hash.clone()),
    };
    assert_eq!(creds.check("correct horse"), Some(Role::Viewer), "{hash}");
    assert_eq!(creds.check("correct horse\n"), None);
    // Nothing typed: refused, no hash printed.
    let out = Command::new(BIN)
        .args(["console", "hash-password"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty password"));
}

/// Cold start: after every rack stopped, the rack that owned an appliance
/// comes back alone and never starts it (no majority, no lease); the
/// operator's `override quorum` makes it run it, recorded in the event log
/// with who and why; a second rack's return ends the override (recorded),
/// and an override is refused while a majority exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_rack_runs_appliances_only_under_an_audited_override() {
    let fleet = Fleet::init("a,b,c", &[]);
    let mut agents: Vec<(String, Agent)> = ["a", "b", "c"]
        .iter()
        .map(|r| (r.to_string(), fleet.start(r)))
        .collect();
    wait_until(
        Duration::from_secs(20),
        "a leader on every rack",
        || async {
            for r in ["a", "b", "c"] {
                let Some(s) = status(&fleet.client(r)).await else {
                    return false;
                };
                if s.control.as_ref().and_then(|c| c.leader.as_ref()).is_none() {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let starts = fleet.dir.path().join("starts");
    let manifest = fleet.dir.path().join("keeper.toml");
    std::fs::write(
        &manifest,
        format!(
            "[[appliance]]\nname = \"keeper\"\ndriver = \"process\"\n\
             command = [\"sh\", \"-c\", \"echo $$ >> {}; exec sleep 3600\"]\ntier = 0\nmemory_mb = 16\n",
            starts.display()
        ),
    )
    .unwrap();
    cli(&fleet, "a", &["app", "deploy", manifest.to_str().unwrap()]);
    let count = || {
        std::fs::read_to_string(&starts)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(20), "keeper started", || async {
        count() >= 1
    })
    .await;
    let owner = status(&fleet.client("a"))
        .await
        .unwrap()
        .appliances
        .iter()
        .find(|a| a.name == "keeper")
        .and_then(|a| a.owner.clone())
        .unwrap();
    // Every rack stops (SIGTERM: each stops its appliances first).
    for (_, agent) in &mut agents {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }
    for (_, agent) in &mut agents {
        let _ = agent.child.wait();
    }
    let before = count();
    // The owner returns alone: no start within two leases' worth.
    let lone = fleet.start(&owner);
    let c = fleet.client(&owner);
    wait_until(
        Duration::from_secs(10),
        "the lone agent answers",
        || async { status(&c).await.is_some() },
    )
    .await;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(8) {
        assert_eq!(
            count(),
            before,
            "a lone rack started an appliance without the override"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = cli(
        &fleet,
        &owner,
        &[
            "override",
            "quorum",
            "--why",
            "b and c lost in the flood",
            "--who",
            "ana",
        ],
    );
    assert!(out.contains("quorum override in force"), "{out}");
    wait_until(
        Duration::from_secs(20),
        "keeper started under the override",
        || async { count() > before },
    )
    .await;
    let events = c.events(100).await.unwrap();
    let ev = events.iter().find(|e| e.kind == "quorum_override").unwrap();
    assert_eq!(ev.detail["who"], "ana");
    assert_eq!(ev.detail["why"], "b and c lost in the flood");
    // A second rack returns: a majority again, the override ends.
    let other = ["a", "b", "c"].into_iter().find(|r| *r != owner).unwrap();
    let _back = fleet.start(other);
    wait_until(Duration::from_secs(30), "quorum_override_ended", || async {
        c.events(100)
            .await
            .is_ok_and(|evs| evs.iter().any(|e| e.kind == "quorum_override_ended"))
    })
    .await;
    let refused = cli_output(&fleet, &owner, &["override", "quorum", "--why", "again"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("majority"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    drop(lone);
}
