use std::os::unix::fs::PermissionsExt;

use deploy::config::FleetRef;
use deploy::FleetKey;

use super::*;
use crate::status::PeerEntry;

/// A rack.toml with a real identity and a certificate valid `days`.
fn rack_with_cert(dir: &Path, days: u64) -> (PathBuf, RackConfig) {
    let key = FleetKey::generate();
    let (identity, cert) = crate::fleet::issue_identity(&key, "f", "a", Role::Rack, "s", days);
    std::fs::write(
        dir.join("identity.key"),
        identity.to_protobuf_encoding().unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("rack.cert"), cert.to_json()).unwrap();
    let config = RackConfig {
        fleet: FleetRef {
            name: "f".into(),
            public_key: key.public_key_b64(),
        },
        ..RackConfig::parse(
            &format!(
                "rack = \"a\"\n[fleet]\nname = \"f\"\npublic_key = \"{}\"\n",
                key.public_key_b64()
            ),
            Path::new("rack.toml"),
        )
        .unwrap()
    };
    let path = dir.join("rack.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    (path.clone(), RackConfig::load(&path).unwrap())
}

#[test]
fn permissions_fail_on_a_readable_secret() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("api-token");
    std::fs::write(&f, "t").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(permissions(std::slice::from_ref(&f)).verdict, Verdict::Pass);
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = permissions(std::slice::from_ref(&f));
    assert_eq!(c.verdict, Verdict::Fail);
    assert!(c.fix.starts_with("chmod 600"), "{c:?}");
    let c = permissions(&[d.path().join("missing")]);
    assert_eq!(c.verdict, Verdict::Fail);
}

#[test]
fn certificate_warns_near_its_end_and_fails_after_or_when_foreign() {
    let d = tempfile::tempdir().unwrap();
    let now = util::time::unix_secs();
    let (_, config) = rack_with_cert(d.path(), 365);
    assert_eq!(certificate(&config, now).verdict, Verdict::Pass);
    let c = certificate(&config, now + 340 * 86_400);
    assert_eq!(c.verdict, Verdict::Warn, "{c:?}");
    let c = certificate(&config, now + 400 * 86_400);
    assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
    assert!(c.detail.contains("expired"), "{c:?}");
    // Another rack's identity beside the certificate.
    std::fs::write(
        &config.identity_key,
        Keypair::generate_ed25519().to_protobuf_encoding().unwrap(),
    )
    .unwrap();
    let c = certificate(&config, now);
    assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
}

#[test]
fn disk_fails_when_nearly_full_and_warns_under_ten_percent() {
    let g = 1u64 << 30;
    assert_eq!(
        disk_verdict(500 * g, 1000 * g, "xfs").verdict,
        Verdict::Pass
    );
    assert_eq!(disk_verdict(50 * g, 1000 * g, "xfs").verdict, Verdict::Warn);
    assert_eq!(disk_verdict(g / 2, 1000 * g, "xfs").verdict, Verdict::Fail);
    assert_eq!(
        disk_verdict(500 * g, 1000 * g, "tmpfs").verdict,
        Verdict::Warn
    );
    let d = tempfile::tempdir().unwrap();
    assert_ne!(
        disk(d.path()).verdict,
        Verdict::Fail,
        "{:?}",
        disk(d.path())
    );
}

#[test]
fn virtualization_fails_only_when_the_catalog_needs_a_vm() {
    let d = tempfile::tempdir().unwrap();
    let kvm = d.path().join("kvm");
    std::fs::write(&kvm, "").unwrap();
    let all = |t: &str| Some(PathBuf::from("/usr/bin").join(t));
    let none = |_: &str| None;
    assert_eq!(virtualization(d.path(), &all, &kvm).verdict, Verdict::Pass);
    let c = virtualization(d.path(), &none, &d.path().join("nokvm"));
    assert_eq!(c.verdict, Verdict::Warn, "{c:?}");
    assert!(
        c.detail.contains("qemu-system-x86_64") && c.detail.contains("setpriv"),
        "{c:?}"
    );
    std::fs::write(
        d.path().join(crate::bundle::APPLIANCES_FILE),
        "[[appliance]]\nname = \"vm\"\ndriver = \"qemu\"\nimage = \"vm.qcow2\"\n",
    )
    .unwrap();
    assert!(deploy::appliance::load(&d.path().join(crate::bundle::APPLIANCES_FILE)).is_ok());
    let c = virtualization(d.path(), &none, &kvm);
    assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
}

#[tokio::test]
async fn power_fails_when_telemetry_is_unreadable() {
    let d = tempfile::tempdir().unwrap();
    let (_, mut config) = rack_with_cert(d.path(), 365);
    assert_eq!(power(&config).await.verdict, Verdict::Pass, "grid");
    let file = d.path().join("generator.json");
    config.power.file = Some(file.clone());
    let c = power(&config).await;
    assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
    std::fs::write(&file, r#"{"source": "generator", "fuel_pct": 80}"#).unwrap();
    assert_eq!(power(&config).await.verdict, Verdict::Pass);
    std::fs::write(&file, r#"{"source": "battery", "dying": true}"#).unwrap();
    assert_eq!(power(&config).await.verdict, Verdict::Warn);
}

/// A status whose control plane names leader b (remembered or live);
/// `majority`: whether a majority answered lately.
fn status(peers: &[mesh::membership::State], majority: bool, volumes: serde_json::Value) -> Status {
    Status {
        rack: "a".into(),
        peer_id: "p".into(),
        role: Role::Rack,
        site: "s".into(),
        fleet: "f".into(),
        version: "0".into(),
        incarnation: 0,
        uptime_s: 5.0,
        listen: Vec::new(),
        peers: peers
            .iter()
            .map(|s| PeerEntry {
                rack: Some("b".into()),
                peer_id: "q".into(),
                state: *s,
                rtt_ms: None,
                last_seen_s: None,
                state_since_s: 0.0,
                connected: true,
                incarnation: 0,
                role: None,
                site: None,
                power: None,
                api: None,
            })
            .collect(),
        power: Default::default(),
        revoked: Vec::new(),
        store: Default::default(),
        volumes: serde_json::from_value(volumes).unwrap(),
        volumes_kept: Vec::new(),
        volume_store: None,
        cache: None,
        appliances: Vec::new(),
        control: Some(control::ControlStatus {
            node_id: 1,
            initialized: true,
            role: "follower".into(),
            leader: Some("b".into()),
            term: 1,
            voters: Vec::new(),
            applied: None,
            majority,
        }),
        field: None,
        bulk: None,
        protected: None,
    }
}

fn volume(generation: u64, replica: Option<u64>) -> serde_json::Value {
    serde_json::json!([{
        "name": "db", "owner": "a", "generation": generation, "size_bytes": 1,
        "generations_held": [generation],
        "replicas": replica.map(|g| vec![serde_json::json!({"rack": "b", "generation": g})]).unwrap_or_default(),
    }])
}

#[test]
fn field_checks_fail_without_agent_peers_majority_or_replicas() {
    use mesh::membership::State::{Alive, Dead};
    let verdicts = |s: Result<&Status, String>| -> Vec<(&'static str, Verdict)> {
        field(s, 2, Role::Rack)
            .into_iter()
            .map(|c| (c.name, c.verdict))
            .collect()
    };
    assert_eq!(
        verdicts(Err("connection refused".into())),
        [("agent", Verdict::Fail)]
    );
    let good = status(&[Alive, Alive], true, volume(3, Some(3)));
    assert_eq!(
        verdicts(Ok(&good)),
        [
            ("agent", Verdict::Pass),
            ("peers", Verdict::Pass),
            ("majority", Verdict::Pass),
            ("replicas", Verdict::Pass),
            ("backhaul", Verdict::Pass)
        ]
    );
    // A lone rack after a restart still names the leader of before: no
    // majority for all that.
    let bad = status(&[Dead, Dead], false, volume(3, None));
    assert_eq!(
        verdicts(Ok(&bad)),
        [
            ("agent", Verdict::Pass),
            ("peers", Verdict::Fail),
            ("majority", Verdict::Fail),
            ("replicas", Verdict::Fail),
            ("backhaul", Verdict::Pass)
        ]
    );
    assert!(
        readiness_line(&good).starts_with("readiness: ready ("),
        "{}",
        readiness_line(&good)
    );
    assert!(
        readiness_line(&bad).starts_with("readiness: NOT READY: peers"),
        "{}",
        readiness_line(&bad)
    );
    let partial = status(&[Alive, Dead], true, volume(3, Some(2)));
    assert_eq!(
        verdicts(Ok(&partial))[1..4],
        [
            ("peers", Verdict::Warn),
            ("majority", Verdict::Pass),
            ("replicas", Verdict::Warn)
        ]
    );
}

#[test]
fn bundle_check_fails_when_an_installed_file_changed() {
    let d = tempfile::tempdir().unwrap();
    let c = bundle(d.path(), d.path());
    assert_eq!(c.verdict, Verdict::Warn, "not from a bundle: {c:?}");
    // A real bundle, installed.
    let laptop = tempfile::tempdir().unwrap();
    let l = laptop.path();
    std::fs::write(
        l.join("field.toml"),
        "fleet = \"t\"\n[[site]]\nname = \"s\"\n[[rack]]\nname = \"a\"\nsite = \"s\"\naddress = \"10.0.0.1\"\ncpus = 1\nmemory_mb = 1\ndisk = 1\n[[tile_source]]\nname = \"osm\"\nurl = \"http://127.0.0.1:9/{z}/{x}/{y}.png\"\n[[tile_pack]]\nname = \"m\"\npath = \"m.pmtiles\"\nsource = \"osm\"\nsites = [\"s\"]\n",
    )
    .unwrap();
    std::fs::write(l.join("m.pmtiles"), b"PMTiles pretend").unwrap();
    crate::bundle::build(
        &l.join("field.toml"),
        &l.join("out"),
        &l.join("fleet"),
        &mut |_, _, _| {},
    )
    .unwrap();
    let root = d.path().join("root");
    let done = crate::bundle::install(
        &l.join("out/a"),
        &root,
        None,
        Path::new("/bin/true"),
        &mut |_, _, _| {},
    )
    .unwrap();
    let etc = done.config.parent().unwrap().to_owned();
    let c = bundle(&etc, &done.data_dir);
    assert_eq!(c.verdict, Verdict::Pass, "{c:?}");
    // The whole local run passes its file checks on a fresh install.
    let config = RackConfig::load(&done.config).unwrap();
    let checks = run_local(&done.config, &config, util::time::unix_secs());
    for name in ["permissions", "certificate", "bundle"] {
        let c = checks.iter().find(|c| c.name == name).unwrap();
        assert_eq!(c.verdict, Verdict::Pass, "{c:?}");
    }
    // A tile pack altered after install.
    let pack = done
        .data_dir
        .join(TILE_PACKS_DIR)
        .join("osm")
        .join("m.pmtiles");
    std::fs::write(&pack, b"PMTiles pretenD").unwrap();
    let c = bundle(&etc, &done.data_dir);
    assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
    assert!(c.detail.contains("m.pmtiles"), "{c:?}");
}

#[test]
fn the_report_says_ready_unless_something_fails() {
    let r = Report {
        checks: vec![Check::pass("a", "ok"), Check::warn("b", "meh", "do x")],
    };
    assert_eq!(r.worst(), Verdict::Warn);
    let text = r.render();
    assert!(
        text.contains("fix: do x") && text.ends_with("ready: 1 pass, 1 warn, 0 fail\n"),
        "{text}"
    );
    let r = Report {
        checks: vec![Check::fail("c", "bad", "do y")],
    };
    assert_eq!(r.worst(), Verdict::Fail);
    assert!(r.render().contains("NOT READY"));
}

#[test]
fn filesystem_warns_without_reflink_or_in_memory() {
    for (fs, reflink, probed, want, says) in [
        ("xfs", true, true, Verdict::Pass, "with reflink"),
        ("btrfs", true, false, Verdict::Pass, "guessed"),
        (
            "ext4",
            false,
            true,
            Verdict::Warn,
            "reads and hashes all of it",
        ),
        // XFS formatted without reflink=1: the agent's probe is believed.
        ("xfs", false, true, Verdict::Warn, "without reflink"),
        ("tmpfs", false, true, Verdict::Warn, "lost at power-off"),
    ] {
        let c = filesystem_verdict(fs, reflink, probed);
        assert_eq!(c.verdict, want, "{fs}: {c:?}");
        assert!(c.detail.contains(says), "{fs}: {}", c.detail);
        if want != Verdict::Pass {
            assert!(c.fix.contains("reflink"), "{}", c.fix);
        }
    }
    // Without the agent, the store's filesystem is named from the data
    // directory (the first existing parent).
    let d = tempfile::tempdir().unwrap();
    let c = filesystem(None, &d.path().join("not/yet"));
    assert!(c.detail.contains("guessed"), "{}", c.detail);
}

#[test]
fn tile_packs_fail_when_missing_or_truncated_and_warn_until_imported() {
    let p = PathBuf::from("/var/lib/fieldrack/tile-packs/osm/haiti.mbtiles");
    let seen = |want: u64, found: Option<u64>, imported: bool| PackSeen {
        path: p.clone(),
        want,
        found,
        imported,
    };
    assert_eq!(tile_packs_verdict(&[]).verdict, Verdict::Pass);
    let pinned = tile_packs_verdict(&[seen(10, Some(10), true)]);
    assert_eq!(pinned.verdict, Verdict::Pass);
    assert!(pinned.detail.contains("pinned"), "{}", pinned.detail);
    let missing = tile_packs_verdict(&[seen(10, Some(10), true), seen(5, None, false)]);
    assert_eq!(missing.verdict, Verdict::Fail);
    assert!(
        missing.detail.contains("haiti.mbtiles missing"),
        "{}",
        missing.detail
    );
    let short = tile_packs_verdict(&[seen(1 << 20, Some(4096), false)]);
    assert_eq!(short.verdict, Verdict::Fail);
    assert!(short.detail.contains("incomplete"), "{}", short.detail);
    let waiting = tile_packs_verdict(&[seen(10, Some(10), true), seen(10, Some(10), false)]);
    assert_eq!(waiting.verdict, Verdict::Warn);
    assert!(
        waiting
            .detail
            .contains("1 of 2 tile packs not yet in the map cache"),
        "{}",
        waiting.detail
    );
}

#[test]
fn backhaul_passes_through_a_gateway_and_warns_on_cached_service_only() {
    let doc =
        |uplink: &str, field: u64| serde_json::json!({"uplink": uplink, "field_uplinks": field});
    assert_eq!(backhaul(None).verdict, Verdict::Pass);
    assert_eq!(backhaul(Some(&doc("up", 1))).verdict, Verdict::Pass);
    let shared = backhaul(Some(&doc("down", 1)));
    assert_eq!(shared.verdict, Verdict::Pass);
    assert!(
        shared.detail.contains("1 other racks' uplinks"),
        "{}",
        shared.detail
    );
    // Degraded counts as in use: two in the field means one other.
    assert_eq!(backhaul(Some(&doc("degraded", 2))).verdict, Verdict::Pass);
    assert_eq!(backhaul(Some(&doc("degraded", 1))).verdict, Verdict::Warn);
    let cached = backhaul(Some(&doc("down", 0)));
    assert_eq!(cached.verdict, Verdict::Warn);
    assert!(
        cached.detail.contains("cached service only"),
        "{}",
        cached.detail
    );
    // In the field checks (and so the status line) too.
    let mut s = status(&[], true, serde_json::json!([]));
    s.cache = Some(doc("down", 0));
    assert!(field(Ok(&s), 0, Role::Rack)
        .iter()
        .any(|c| c.name == "backhaul" && c.verdict == Verdict::Warn));
}

#[test]
fn clock_verdict_warns_over_two_seconds_and_fails_over_thirty() {
    let one = |r: Result<f64, String>| clock_verdict(&[("b".into(), Ok(0.3)), ("c".into(), r)]);
    assert_eq!(one(Ok(-1.5)).verdict, Verdict::Pass);
    let warn = one(Ok(-5.0));
    assert_eq!(warn.verdict, Verdict::Warn);
    assert!(warn.detail.contains("worst c -5.0 s"), "{}", warn.detail);
    assert_eq!(one(Ok(45.0)).verdict, Verdict::Fail);
    // An unreadable peer does not hide the others.
    assert_eq!(one(Err("x".into())).verdict, Verdict::Pass);
    let none = clock_verdict(&[("b".into(), Err("refused".into()))]);
    assert_eq!(none.verdict, Verdict::Warn);
    assert!(none.detail.contains("b: refused"), "{}", none.detail);
    assert_eq!(clock_verdict(&[]).verdict, Verdict::Warn);
}

#[test]
fn http_dates_parse() {
    assert_eq!(
        parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
        Some(784_111_777)
    );
    assert_eq!(
        parse_http_date("Wed, 02 Dec 2026 05:23:35 GMT"),
        Some(1_796_189_015)
    );
    assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 PST"), None);
    assert_eq!(parse_http_date("yesterday"), None);
}

/// A peer's API answering with its `Date` header `offset_s` from ours
/// (as hyper does, on a refusal too); returns its address.
async fn peer_api_with_clock(offset_s: i64) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf).await;
            let t = std::time::SystemTime::now()
                .checked_add(Duration::from_secs(offset_s.unsigned_abs()))
                .filter(|_| offset_s >= 0)
                .unwrap_or_else(|| {
                    std::time::SystemTime::now() - Duration::from_secs(offset_s.unsigned_abs())
                });
            let date = httpdate_of(t);
            let _ = c
                .write_all(
                    format!(
                        "HTTP/1.1 401 Unauthorized\r\ndate: {date}\r\ncontent-length: 0\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await;
        }
    });
    addr
}

/// IMF-fixdate of `t` (the inverse of [`parse_http_date`], for the test).
fn httpdate_of(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    format!(
        "{weekday}, {d:02} {} {y} {:02}:{:02}:{:02} GMT",
        months[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[tokio::test]
async fn clock_reads_peers_date_headers_and_fails_on_a_minute_of_skew() {
    use mesh::membership::State::Alive;
    let with_peers = |apis: Vec<String>| {
        let mut s = status(&vec![Alive; apis.len()], true, serde_json::json!([]));
        for (p, api) in s.peers.iter_mut().zip(apis) {
            p.api = Some(api);
        }
        s
    };
    let in_step = with_peers(vec![peer_api_with_clock(0).await]);
    let c = clock(Some(&in_step)).await;
    assert_eq!(c.verdict, Verdict::Pass, "{c:?}");
    let behind = with_peers(vec![
        peer_api_with_clock(0).await,
        peer_api_with_clock(-60).await,
    ]);
    let c = clock(Some(&behind)).await;
    assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
    assert!(
        c.detail.contains("-60") || c.detail.contains("-59"),
        "{}",
        c.detail
    );
    // A peer whose API is gone: a warning naming it, within the probe's time.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let started = std::time::Instant::now();
    let c = clock(Some(&with_peers(vec![gone]))).await;
    assert_eq!(c.verdict, Verdict::Warn, "{c:?}");
    assert!(started.elapsed() <= CLOCK_PROBE_TIMEOUT + Duration::from_secs(1));
}
