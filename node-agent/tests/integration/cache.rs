//! The caching proxy and tile server inside real agents: a tile fetched
//! over the backhaul by one rack is served by another from the mesh, and
//! survives the first rack's death.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A PNG-ish body (the proxy checks the content type, not the pixels).
fn tile_body(z: u32, x: u32, y: u32) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    b.extend(format!("tile {z}/{x}/{y}").into_bytes());
    b.extend(std::iter::repeat_n((z * 31 + x * 7 + y) as u8, 2000));
    b
}

/// A tile origin on loopback that counts the requests it serves.
async fn origin() -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = 0;
                loop {
                    let Ok(n) = s.read(&mut buf[got..]).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got += n;
                    if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let req = String::from_utf8_lossy(&buf[..got]).into_owned();
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                let parts: Vec<u32> = path
                    .trim_start_matches('/')
                    .trim_end_matches(".png")
                    .split('/')
                    .filter_map(|p| p.parse().ok())
                    .collect();
                h.fetch_add(1, Ordering::SeqCst);
                let body = if parts.len() == 3 {
                    tile_body(parts[0], parts[1], parts[2])
                } else {
                    b"nope".to_vec()
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nCache-Control: max-age=86400\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    (port, hits, task)
}

fn add_tile_source(fleet: &Fleet, rack: &str, port: u16) -> String {
    common::add_tile_source(fleet, rack, "test", port, "")
}

async fn get(proxy: &str, path: &str) -> (u16, String, Vec<u8>) {
    common::http(proxy, "GET", path, &[], None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tile_fetched_by_one_rack_is_served_by_the_others_without_the_origin() {
    let (port, hits, origin_task) = origin().await;
    let fleet = Fleet::init("a,b,c", &[]);
    let proxies: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|r| add_tile_source(&fleet, r, port))
        .collect();
    let a = fleet.start("a");
    let _b = fleet.start("b");
    let _c = fleet.start("c");
    wait_until(Duration::from_secs(10), "mesh", || {
        all_see(&fleet, &["a", "b", "c"], "alive")
    })
    .await;
    wait_until(Duration::from_secs(10), "proxies up", || async {
        for p in &proxies {
            if tokio::net::TcpStream::connect(p).await.is_err() {
                return false;
            }
        }
        true
    })
    .await;

    let (code, head, body) = get(&proxies[0], "/tiles/test/3/2/1.png").await;
    assert_eq!(code, 200, "{head}");
    assert_eq!(body, tile_body(3, 2, 1));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let (code, head, _) = get(&proxies[0], "/tiles/test/3/2/1.png").await;
    assert_eq!(code, 200);
    assert!(head.to_ascii_lowercase().contains("cache-status"), "{head}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "a fresh hit never reaches the origin"
    );

    // Every tile fetched over the backhaul is copied to another rack...
    wait_until(
        Duration::from_secs(15),
        "a copies the tile to a peer",
        || async {
            metric(&fleet.client("a"), "fieldrack_cache_mesh_replicated_total").await >= 1.0
        },
    )
    .await;
    // ...and the third rack finds it through the digests, no broadcast.
    let mut before = Vec::new();
    for r in ["b", "c"] {
        before.push(
            metric(
                &fleet.client(r),
                "fieldrack_cache_mesh_digests_received_total",
            )
            .await,
        );
    }
    wait_until(
        Duration::from_secs(15),
        "fresh digests from both peers",
        || async {
            let mut ok = true;
            for (i, r) in ["b", "c"].iter().enumerate() {
                ok &= metric(
                    &fleet.client(r),
                    "fieldrack_cache_mesh_digests_received_total",
                )
                .await
                    >= before[i] + 2.0;
            }
            ok
        },
    )
    .await;
    for p in &proxies[1..] {
        let (code, head, body) = get(p, "/tiles/test/3/2/1.png").await;
        assert_eq!(code, 200, "{head}");
        assert_eq!(body, tile_body(3, 2, 1));
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "no client of b or c touched the origin"
    );
    let peer_fetches = metric(
        &fleet.client("b"),
        "fieldrack_cache_mesh_peer_fetches_total",
    )
    .await
        + metric(
            &fleet.client("c"),
            "fieldrack_cache_mesh_peer_fetches_total",
        )
        .await;
    assert!(
        peer_fetches >= 1.0,
        "the rack without the copy fetched it from a peer"
    );

    // a dies and the backhaul goes with it: b and c still serve the tile.
    drop(a);
    origin_task.abort();
    for p in &proxies[1..] {
        let (code, _, body) = get(p, "/tiles/test/3/2/1.png").await;
        assert_eq!(code, 200);
        assert_eq!(body, tile_body(3, 2, 1));
    }
    let s = status(&fleet.client("b")).await.unwrap();
    let cache = s.cache.expect("status has a cache object");
    assert!(cache["objects"].as_u64().unwrap() >= 1, "{cache}");
    for field in [
        "objects",
        "bytes",
        "hit_ratio",
        "backhaul",
        "budget_left_bytes",
    ] {
        assert!(cache.get(field).is_some(), "cache.{field} in {cache}");
    }
}

#[test]
fn a_bad_tile_source_exits_64_naming_the_field() {
    let fleet = Fleet::init("a", &[]);
    let p = fleet.config("a");
    let mut text = std::fs::read_to_string(&p).unwrap();
    text.push_str("\n[[tile_source]]\nname = \"x\"\nurl = \"http://127.0.0.1:1/{z}/{x}.png\"\n");
    std::fs::write(&p, text).unwrap();
    let out = std::process::Command::new(BIN)
        .arg("agent")
        .arg("--config")
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tile_source"), "{err}");
}

fn fieldrack(fleet: &Fleet, rack: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(fleet.config(rack))
        .output()
        .unwrap()
}

/// `fieldrack tiles seed` of the whole world at `zoom` on `rack`.
fn seed_world(fleet: &Fleet, rack: &str, source: &str, zoom: &str) -> std::process::Output {
    fieldrack(
        fleet,
        rack,
        &[
            "tiles",
            "seed",
            "--source",
            source,
            "--bbox=-180,-85,180,85",
            "--zoom",
            zoom,
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeding_fetches_a_region_once_and_offline_mode_answers_from_the_cache() {
    let (port, hits, _origin) = origin().await;
    let fleet = Fleet::init("a", &[]);
    let proxy = add_tile_source(&fleet, "a", port);
    // a second source whose provider forbids bulk download
    let p = fleet.config("a");
    let mut text = std::fs::read_to_string(&p).unwrap();
    text = text.replace(
        "format = \"png\"\n",
        "format = \"png\"\nallow_bulk = true\nrequests_per_sec = 1000\n",
    );
    text.push_str(&format!("\n[[tile_source]]\nname = \"osm\"\nurl = \"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.png\"\nformat = \"png\"\n"));
    std::fs::write(&p, text).unwrap();
    let _a = fleet.start("a");
    wait_until(Duration::from_secs(10), "agent up", || async {
        status(&fleet.client("a")).await.is_some()
    })
    .await;

    let out = seed_world(&fleet, "a", "osm", "0-2");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not allow bulk download"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0);

    let out = seed_world(&fleet, "a", "test", "0-2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"tiles\":21"),
        "estimate printed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(hits.load(Ordering::SeqCst), 21, "1 + 4 + 16 tiles");
    let out = seed_world(&fleet, "a", "test", "0-2");
    assert!(out.status.success());
    assert_eq!(
        hits.load(Ordering::SeqCst),
        21,
        "a second seed fetches nothing"
    );

    // Forced offline: seeded tiles answer, misses get a fast 504.
    let out = fieldrack(&fleet, "a", &["cache", "offline", "on"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, _, body) = get(&proxy, "/tiles/test/2/3/1.png").await;
    assert_eq!(code, 200);
    assert_eq!(body, tile_body(2, 3, 1));
    let t0 = std::time::Instant::now();
    let (code, head, _) = get(&proxy, "/tiles/test/9/3/1.png").await;
    assert_eq!(code, 504, "{head}");
    assert!(t0.elapsed() < Duration::from_millis(500));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        21,
        "offline never touches the backhaul"
    );
    let s = status(&fleet.client("a")).await.unwrap();
    assert_eq!(s.cache.unwrap()["backhaul"], "down");

    // Hand the region to another rack as an MBTiles file: it serves every
    // tile offline without ever touching the origin.
    let file = fleet.dir.path().join("region.mbtiles");
    let out = fieldrack(
        &fleet,
        "a",
        &[
            "tiles",
            "export",
            file.to_str().unwrap(),
            "--source",
            "test",
            "--bbox=-180,-85,180,85",
            "--zoom",
            "0-2",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other = Fleet::init("b", &[]);
    let proxy_b = add_tile_source(&other, "b", port);
    let _b = other.start("b");
    wait_until(Duration::from_secs(10), "b up", || async {
        status(&other.client("b")).await.is_some()
    })
    .await;
    assert!(fieldrack(&other, "b", &["cache", "offline", "on"])
        .status
        .success());
    let out = fieldrack(
        &other,
        "b",
        &[
            "tiles",
            "import",
            file.to_str().unwrap(),
            "--source",
            "test",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (z, x, y) in [(0, 0, 0), (1, 1, 0), (2, 3, 3)] {
        let (code, head, body) = get(&proxy_b, &format!("/tiles/test/{z}/{x}/{y}.png")).await;
        assert_eq!(code, 200, "{head}");
        assert_eq!(body, tile_body(z, x, y));
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        21,
        "the imported rack never touched the origin"
    );
    let bad = fleet.dir.path().join("not.mbtiles");
    std::fs::write(&bad, b"this is not sqlite").unwrap();
    let out = fieldrack(
        &other,
        "b",
        &["tiles", "import", bad.to_str().unwrap(), "--source", "test"],
    );
    assert!(
        !out.status.success(),
        "a file that is not MBTiles is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_region_reaches_every_rack_of_the_site_pinned() {
    let (port, hits, _origin) = origin().await;
    let fleet = Fleet::init("a,b", &[]);
    let mut proxies = Vec::new();
    for r in ["a", "b"] {
        proxies.push(add_tile_source(&fleet, r, port));
        let p = fleet.config(r);
        let text = std::fs::read_to_string(&p).unwrap().replace(
            "format = \"png\"\n",
            "format = \"png\"\nallow_bulk = true\nrequests_per_sec = 1000\n",
        );
        std::fs::write(&p, text).unwrap();
    }
    let _a = fleet.start("a");
    let _b = fleet.start("b");
    wait_until(Duration::from_secs(10), "mesh", || {
        all_see(&fleet, &["a", "b"], "alive")
    })
    .await;
    let out = seed_world(&fleet, "a", "test", "0-1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(hits.load(Ordering::SeqCst), 5);
    wait_until(Duration::from_secs(15), "all five copied to b", || async {
        metric(&fleet.client("a"), "fieldrack_cache_mesh_replicated_total").await >= 5.0
    })
    .await;
    assert!(fieldrack(&fleet, "b", &["cache", "offline", "on"])
        .status
        .success());
    for (z, x, y) in [(0, 0, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)] {
        let (code, head, body) = get(&proxies[1], &format!("/tiles/test/{z}/{x}/{y}.png")).await;
        assert_eq!(code, 200, "{head}");
        assert_eq!(body, tile_body(z, x, y));
    }
    assert_eq!(hits.load(Ordering::SeqCst), 5, "b never touched the origin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_import_cancels_it_and_its_tiles_are_removed() {
    use cache_proxy::pmtiles::{self, WriteOptions};
    use cache_proxy::tiles::TileId;
    let fleet = Fleet::init("a", &[]);
    // Nobody listens on the discard port: offline, tiles come only from the import.
    let proxy = add_tile_source(&fleet, "a", 9);
    let _a = fleet.start("a");
    wait_until(Duration::from_secs(10), "a up", || async {
        status(&fleet.client("a")).await.is_some()
    })
    .await;
    assert!(fieldrack(&fleet, "a", &["cache", "offline", "on"])
        .status
        .success());
    // 200,000 distinct tiles at zoom 12: seconds of storing.
    let tiles: Vec<(TileId, Vec<u8>)> = (0..200_000u32)
        .map(|i| {
            let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
            b.extend_from_slice(&i.to_le_bytes());
            (
                TileId {
                    z: 12,
                    x: i % 4096,
                    y: i / 4096,
                },
                b,
            )
        })
        .collect();
    let file = fleet.dir.path().join("big.pmtiles");
    std::fs::write(&file, pmtiles::write(&tiles, &WriteOptions::default())).unwrap();

    let cfg = deploy::RackConfig::load(&fleet.config("a")).unwrap();
    let token = std::fs::read_to_string(
        fleet
            .dir
            .path()
            .join("a")
            .join(deploy::config::API_TOKEN_FILE),
    )
    .unwrap();
    let body = serde_json::to_vec(&serde_json::json!({ "source": "test", "from": file })).unwrap();
    let mut s = tokio::net::TcpStream::connect(&cfg.api.listen)
        .await
        .unwrap();
    s.write_all(
        format!(
            "POST /api/v1/tiles/import HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            token.trim(),
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&body).await.unwrap();
    // Wait for the first progress line: tiles are being stored.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(20), async {
        while !String::from_utf8_lossy(&got).contains("\"progress\"") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the agent closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("a progress line");
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        !text.contains("\"result\""),
        "the import already finished: {text}"
    );
    drop(s); // the client goes away
    let log = fleet.dir.path().join("a.log");
    wait_until(
        Duration::from_secs(30),
        "the import rolled back",
        || async {
            let l = std::fs::read_to_string(&log).unwrap_or_default();
            l.contains("job_client_gone") && l.contains("mbtiles_import_rolled_back")
        },
    )
    .await;
    // The first tiles of the file had been stored; they are gone.
    for (x, y) in [(0, 0), (1, 0), (100, 0)] {
        let (code, head, _) = get(&proxy, &format!("/tiles/test/12/{x}/{y}.png")).await;
        assert_eq!(code, 504, "12/{x}/{y} was left behind: {head}");
    }
}
