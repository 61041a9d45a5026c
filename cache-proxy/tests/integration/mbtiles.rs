//! MBTiles import and export against a real proxy on loopback with no
//! origin at all (forced offline), plus one with a counting origin to show
//! imported tiles never go upstream.

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_proxy::mbtiles::{self, ExportError, ExportPlan, ImportError, ImportReport};
use cache_proxy::tiles::BBox;
use cache_proxy::{Config, Deps, TileFormat, TileSource};
use common::*;
use rusqlite::Connection;

/// A config with one source and nothing behind it: offline by the switch,
/// and the URL points at the discard port nobody listens on.
fn offline_config(format: TileFormat) -> Config {
    let mut c = Config::default();
    c.proxy.listen = "127.0.0.1:0".parse().unwrap();
    c.proxy.name = "rack-a".into();
    c.proxy.offline = true;
    c.proxy.backhaul.probe_interval_ms = 50;
    c.proxy.backhaul.probe_interval_down_ms = 50;
    let ext = format.extension();
    c.tile_source = vec![TileSource {
        name: "region".into(),
        url: format!("http://127.0.0.1:9/{{z}}/{{x}}/{{y}}.{ext}"),
        format,
        min_zoom: 0,
        max_zoom: 4,
        attribution: "(c) test contributors".into(),
        allow_bulk: false,
        requests_per_sec: 0,
        user_agent: "fieldrack-test/1".into(),
    }];
    c
}

/// XYZ tile → body.
type Tiles = Vec<((u8, u32, u32), Vec<u8>)>;

fn png(n: u32) -> Vec<u8> {
    tile_body(&format!("/mb/{n}"), 0).to_vec()
}

/// A plain-layout MBTiles file (`tiles` table, TMS rows).
fn make_plain(path: &Path, meta: &[(&str, &str)], tiles: &Tiles) {
    let c = Connection::open(path).unwrap();
    c.execute_batch(
        "CREATE TABLE metadata (name text, value text);
         CREATE TABLE tiles (zoom_level integer, tile_column integer, tile_row integer, tile_data blob);
         CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row);
         BEGIN;",
    )
    .unwrap();
    for (k, v) in meta {
        c.execute("INSERT INTO metadata VALUES (?1, ?2)", [k, v])
            .unwrap();
    }
    for ((z, x, y), data) in tiles {
        let row = (1u32 << z) - 1 - y;
        c.execute(
            "INSERT INTO tiles VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![z, x, row, data],
        )
        .unwrap();
    }
    c.execute_batch("COMMIT;").unwrap();
}

/// A deduplicated-layout file (`map` + `images`, `tiles` a view).
fn make_dedup(path: &Path, meta: &[(&str, &str)], tiles: &Tiles) {
    let c = Connection::open(path).unwrap();
    c.execute_batch(
        "CREATE TABLE metadata (name text, value text);
         CREATE TABLE map (zoom_level integer, tile_column integer, tile_row integer, tile_id text);
         CREATE TABLE images (tile_data blob, tile_id text);
         CREATE VIEW tiles AS SELECT map.zoom_level AS zoom_level, map.tile_column AS tile_column,
           map.tile_row AS tile_row, images.tile_data AS tile_data
           FROM map JOIN images ON images.tile_id = map.tile_id;
         BEGIN;",
    )
    .unwrap();
    for (k, v) in meta {
        c.execute("INSERT INTO metadata VALUES (?1, ?2)", [k, v])
            .unwrap();
    }
    for ((z, x, y), data) in tiles {
        let id = blake3::hash(data).to_hex().to_string();
        c.execute(
            "INSERT INTO images SELECT ?1, ?2 WHERE NOT EXISTS (SELECT 1 FROM images WHERE tile_id = ?2)",
            rusqlite::params![data, id],
        )
        .unwrap();
        let row = (1u32 << z) - 1 - y;
        c.execute(
            "INSERT INTO map VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![z, x, row, id],
        )
        .unwrap();
    }
    c.execute_batch("COMMIT;").unwrap();
}

/// Every tile of zooms 0..=3, half of z3 a single colour (shared body).
fn region_tiles() -> Tiles {
    let blank = png(999_999);
    let mut v = Vec::new();
    let mut n = 0;
    for z in 0..=3u8 {
        for x in 0..(1u32 << z) {
            for y in 0..(1u32 << z) {
                n += 1;
                let body = if z == 3 && x < 4 {
                    blank.clone()
                } else {
                    png(n)
                };
                v.push(((z, x, y), body));
            }
        }
    }
    v
}

fn header(r: &Reply, name: &str) -> String {
    r.headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_tiles_are_served_offline_exactly_and_export_round_trips() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("region.mbtiles");
    let mut tiles = region_tiles();
    // Outside the source's zoom range (0-4): skipped.
    tiles.push(((5, 1, 1), png(5000)));
    // Not a PNG (a captive portal page that slipped into the file): refused.
    tiles.push(((4, 0, 0), b"<html>log in</html>".to_vec()));
    make_plain(
        &file,
        &[("name", "Region"), ("format", "png"), ("minzoom", "0")],
        &tiles,
    );
    // A row with impossible coordinates.
    Connection::open(&file)
        .unwrap()
        .execute("INSERT INTO tiles VALUES (2, 9, 0, ?1)", [png(1)])
        .unwrap();

    let p = start(offline_config(TileFormat::Png), Deps::default()).await;
    let mut calls = 0u64;
    let report = mbtiles::import(&p.handle, "region", &file, |_| calls += 1)
        .await
        .unwrap();
    let valid = region_tiles().len() as u64; // 85
    assert_eq!(
        report,
        ImportReport {
            total: valid + 3,
            read: valid + 3,
            tiles: valid,
            bytes: region_tiles().iter().map(|(_, b)| b.len() as u64).sum(),
            unchanged: 0,
            skipped: 1,
            invalid: 2,
        }
    );
    assert_eq!(calls, valid + 3, "progress after every row");
    // The 32 blank z3 tiles... (x < 4, all y) share one stored body.
    let stats = p.handle.status();
    assert_eq!(stats.objects, valid);
    let st = p.handle.store().stats();
    assert!(
        st.stored_bytes < st.logical_bytes - 30 * png(999_999).len() as u64,
        "{st:?}"
    );

    // Served over HTTP, offline, byte for byte, with the source's type.
    for ((z, x, y), body) in region_tiles() {
        let r = get(p.addr, &format!("/tiles/region/{z}/{x}/{y}.png")).await;
        assert_eq!(r.status, 200, "{z}/{x}/{y}");
        assert_eq!(&r.body[..], &body[..], "{z}/{x}/{y}");
        assert_eq!(header(&r, "content-type"), "image/png");
        assert_eq!(header(&r, "content-encoding"), "");
        assert_eq!(header(&r, "access-control-allow-origin"), "*");
        assert!(r.cache_status().contains("hit"), "{}", r.cache_status());
    }
    // A client revalidates with the ETag and gets a 304.
    let r = get(p.addr, "/tiles/region/1/1/0.png").await;
    let etag = header(&r, "etag");
    assert!(etag.starts_with("\"mb-"), "{etag}");
    let r = request(
        p.addr,
        "GET",
        "/tiles/region/1/1/0.png",
        &[("if-none-match", &etag)],
    )
    .await;
    assert_eq!(r.status, 304);
    // What was not imported is a fast offline 504, not a wait.
    let t0 = Instant::now();
    let r = get(p.addr, "/tiles/region/4/0/0.png").await;
    assert_eq!(r.status, 504);
    assert!(t0.elapsed() < Duration::from_millis(500));

    // Re-running is cheap: nothing rewritten.
    let again = mbtiles::import(&p.handle, "region", &file, |_| {})
        .await
        .unwrap();
    assert_eq!((again.tiles, again.unchanged), (0, valid));

    // Export the west half at z1-3 and read it back with SQLite.
    let out = work.path().join("out.mbtiles");
    let plan = ExportPlan {
        source: "region".into(),
        bbox: "-180,-80,-0.001,80".parse::<BBox>().unwrap(),
        min_zoom: 1,
        max_zoom: 3,
    };
    let mut last = None;
    let er = mbtiles::export(&p.handle, &plan, &out, |r| last = Some(*r))
        .await
        .unwrap();
    // z1: 1x2, z2: 2x4, z3: 4x8 (the bbox stops short of ±85°: rows 0..2^z).
    assert_eq!(er.total, plan.count());
    assert_eq!(er.tiles, 2 + 8 + 32);
    assert_eq!(er.unique, 2 + 8 + 1, "the 32 blank z3 tiles are one image");
    assert_eq!(last.unwrap().done, er.total);
    assert!(!work.path().join("out.mbtiles.partial").exists());
    let c = Connection::open(&out).unwrap();
    let meta: std::collections::HashMap<String, String> = c
        .prepare("SELECT name, value FROM metadata")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(meta["name"], "region");
    assert_eq!(meta["format"], "png");
    assert_eq!(meta["minzoom"], "1");
    assert_eq!(meta["maxzoom"], "3");
    assert_eq!(meta["attribution"], "(c) test contributors");
    let b: Vec<f64> = meta["bounds"]
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(b, vec![-180.0, -80.0, -0.001, 80.0]);
    let n: i64 = c
        .query_row("SELECT count(*) FROM tiles", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n as u64, er.tiles);
    let by_xyz: std::collections::HashMap<(u8, u32, u32), Vec<u8>> =
        region_tiles().into_iter().collect();
    let mut st = c
        .prepare("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles")
        .unwrap();
    let mut rows = st.query([]).unwrap();
    while let Some(r) = rows.next().unwrap() {
        let (z, x, row): (u8, u32, u32) = (r.get(0).unwrap(), r.get(1).unwrap(), r.get(2).unwrap());
        let y = (1u32 << z) - 1 - row;
        assert!(x < (1u32 << z) / 2, "west half only");
        let data: Vec<u8> = r.get(3).unwrap();
        assert_eq!(data, by_xyz[&(z, x, y)], "{z}/{x}/{y}");
    }
    let app_id: i64 = c
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .unwrap();
    assert_eq!(app_id, 0x4d50_4258);
    drop(rows);
    drop(st);
    drop(c);

    // The exported file imports again (into a fresh rack), same bytes.
    let q = start(offline_config(TileFormat::Png), Deps::default()).await;
    let r2 = mbtiles::import(&q.handle, "region", &out, |_| {})
        .await
        .unwrap();
    assert_eq!(r2.tiles, er.tiles);
    let r = get(q.addr, "/tiles/region/3/1/5.png").await;
    assert_eq!(&r.body[..], &by_xyz[&(3, 1, 5)][..]);

    // Export refusals.
    let bad = ExportPlan {
        max_zoom: 9,
        ..plan.clone()
    };
    assert!(matches!(
        mbtiles::export(&p.handle, &bad, &out, |_| {}).await,
        Err(ExportError::Zoom { .. })
    ));
    q.stop().await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzipped_vector_tiles_from_a_deduplicated_file() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("vector.mbtiles");
    // Gzipped MVT stand-ins (stored as given once their gzip stream
    // inflates completely), one raw MVT, and an empty tile.
    let gz = |n: u8| {
        let mut v = vec![0x1a, 3];
        v.extend(std::iter::repeat_n(n, 40 + n as usize));
        gz(&v)
    };
    let tiles: Tiles = vec![
        ((0, 0, 0), gz(1)),
        ((1, 0, 0), gz(2)),
        ((1, 1, 0), gz(2)),
        ((1, 0, 1), vec![0x1a, 0x02, 0x78, 0x02]),
        ((1, 1, 1), Vec::new()),
    ];
    let json = r#"{"vector_layers":[{"id":"roads","fields":{}}]}"#;
    make_dedup(
        &file,
        &[("name", "v"), ("format", "pbf"), ("json", json)],
        &tiles,
    );
    let p = start(offline_config(TileFormat::Pbf), Deps::default()).await;
    let rep = mbtiles::import(&p.handle, "region", &file, |_| {})
        .await
        .unwrap();
    assert_eq!((rep.tiles, rep.invalid), (5, 0));
    for ((z, x, y), body) in &tiles {
        let r = get(p.addr, &format!("/tiles/region/{z}/{x}/{y}.pbf")).await;
        assert_eq!(r.status, 200);
        assert_eq!(&r.body[..], &body[..]);
        assert_eq!(
            header(&r, "content-type"),
            "application/vnd.mapbox-vector-tile"
        );
        let gzipped = body.starts_with(&[0x1f, 0x8b]);
        assert_eq!(
            header(&r, "content-encoding"),
            if gzipped { "gzip" } else { "" },
            "{z}/{x}/{y}"
        );
    }
    // Export keeps the layer list.
    let out = work.path().join("v-out.mbtiles");
    let plan = ExportPlan {
        source: "region".into(),
        bbox: "-180,-85,180,85".parse().unwrap(),
        min_zoom: 0,
        max_zoom: 4,
    };
    let er = mbtiles::export(&p.handle, &plan, &out, |_| {})
        .await
        .unwrap();
    assert_eq!((er.tiles, er.unique), (5, 4));
    let c = Connection::open(&out).unwrap();
    let (fmt, j): (String, String) = c
        .query_row(
            "SELECT (SELECT value FROM metadata WHERE name='format'), (SELECT value FROM metadata WHERE name='json')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((fmt.as_str(), j.as_str()), ("pbf", json));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_tiles_never_go_upstream_while_online() {
    let o = origin().await;
    let mut c = base_config(&o);
    c.tile_source[0].max_zoom = 4;
    let p = start(c, Deps::default()).await;
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("r.mbtiles");
    let body = png(7);
    make_plain(
        &file,
        &[("format", "png")],
        &vec![((2, 1, 3), body.clone())],
    );
    mbtiles::import(&p.handle, "test", &file, |_| {})
        .await
        .unwrap();
    // A year later, still fresh for the cache.
    p.advance(365 * 86_400);
    o.advance(365 * 86_400);
    for _ in 0..3 {
        let r = get(p.addr, "/tiles/test/2/1/3.png").await;
        assert_eq!(r.status, 200);
        assert_eq!(&r.body[..], &body[..]);
        assert!(
            r.cache_status().starts_with("rack-a; hit"),
            "{}",
            r.cache_status()
        );
    }
    assert_eq!(o.path_count("/tile/2/1/3.png"), 0);
    // A tile that was not imported is fetched as usual.
    let r = get(p.addr, "/tiles/test/2/1/2.png").await;
    assert_eq!(r.status, 200);
    assert_eq!(o.path_count("/tile/2/1/2.png"), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_files_are_refused_with_the_reason_and_store_nothing() {
    let work = tempfile::tempdir().unwrap();
    let p = start(offline_config(TileFormat::Png), Deps::default()).await;
    let imp = |name: &str| {
        let path = work.path().join(name);
        let h = p.handle.clone();
        async move { mbtiles::import(&h, "region", &path, |_| {}).await }
    };

    std::fs::write(
        work.path().join("text.mbtiles"),
        "just some text, not sqlite",
    )
    .unwrap();
    let e = imp("text.mbtiles").await.unwrap_err();
    assert!(matches!(e, ImportError::NotSqlite { .. }), "{e}");
    assert!(e.to_string().contains("not an SQLite database"), "{e}");

    std::fs::write(work.path().join("empty.mbtiles"), "").unwrap();
    assert!(matches!(
        imp("empty.mbtiles").await,
        Err(ImportError::NotSqlite { .. })
    ));

    let e = imp("missing.mbtiles").await.unwrap_err();
    assert!(matches!(e, ImportError::Open { .. }), "{e}");

    let c = Connection::open(work.path().join("notiles.mbtiles")).unwrap();
    c.execute_batch("CREATE TABLE metadata (name text, value text);")
        .unwrap();
    drop(c);
    let e = imp("notiles.mbtiles").await.unwrap_err();
    assert!(
        matches!(e, ImportError::MissingTable { table: "tiles", .. }),
        "{e}"
    );
    assert!(e.to_string().contains("no \"tiles\" table"), "{e}");

    let c = Connection::open(work.path().join("nometa.mbtiles")).unwrap();
    c.execute_batch(
        "CREATE TABLE tiles (zoom_level int, tile_column int, tile_row int, tile_data blob);",
    )
    .unwrap();
    drop(c);
    assert!(matches!(
        imp("nometa.mbtiles").await,
        Err(ImportError::MissingTable {
            table: "metadata",
            ..
        })
    ));

    let c = Connection::open(work.path().join("nodata.mbtiles")).unwrap();
    c.execute_batch(
        "CREATE TABLE metadata (name text, value text);
         CREATE TABLE tiles (zoom_level int, tile_column int, tile_row int, image blob);",
    )
    .unwrap();
    drop(c);
    let e = imp("nodata.mbtiles").await.unwrap_err();
    assert!(
        matches!(
            e,
            ImportError::MissingColumn {
                table: "tiles",
                column: "tile_data",
                ..
            }
        ),
        "{e}"
    );

    // A JPEG file for a PNG source: refused before anything is stored.
    make_plain(
        &work.path().join("jpeg.mbtiles"),
        &[("format", "jpg")],
        &vec![((0, 0, 0), vec![0xff, 0xd8, 0xff, 0xe0, 1, 2, 3])],
    );
    let e = imp("jpeg.mbtiles").await.unwrap_err();
    assert!(matches!(e, ImportError::WrongFormat { .. }), "{e}");
    assert!(e.to_string().contains("serves png"), "{e}");

    make_plain(
        &work.path().join("tiff.mbtiles"),
        &[("format", "tiff")],
        &vec![((0, 0, 0), png(1))],
    );
    assert!(matches!(
        imp("tiff.mbtiles").await,
        Err(ImportError::UnknownFormat { .. })
    ));

    // No `format` (MBTiles 1.0): judged by the first tile.
    make_plain(
        &work.path().join("old.mbtiles"),
        &[("name", "old")],
        &vec![((0, 0, 0), vec![0xff, 0xd8, 0xff, 0xe0])],
    );
    assert!(matches!(
        imp("old.mbtiles").await,
        Err(ImportError::WrongFormat { .. })
    ));

    // Unknown source.
    make_plain(
        &work.path().join("ok.mbtiles"),
        &[("format", "png")],
        &vec![((0, 0, 0), png(1))],
    );
    let path = work.path().join("ok.mbtiles");
    assert!(matches!(
        mbtiles::import(&p.handle, "nope", &path, |_| {}).await,
        Err(ImportError::UnknownSource(_))
    ));

    assert_eq!(p.handle.status().objects, 0, "nothing stored");
    // The old-format file with a PNG first tile is accepted.
    make_plain(
        &work.path().join("old-png.mbtiles"),
        &[("name", "old")],
        &vec![((0, 0, 0), png(1))],
    );
    assert_eq!(imp("old-png.mbtiles").await.unwrap().tiles, 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_import_keeps_what_it_stored_and_resumes() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("big.mbtiles");
    let mut tiles: Tiles = Vec::new();
    for x in 0..16u32 {
        for y in 0..16u32 {
            tiles.push(((4, x, y), png(x * 16 + y)));
        }
    }
    for x in 0..8u32 {
        for y in 0..8u32 {
            tiles.push(((3, x, y), png(1000 + x * 8 + y)));
        }
    }
    make_plain(&file, &[("format", "png")], &tiles);
    let mut config = offline_config(TileFormat::Png);
    let p = start(config.clone(), Deps::default()).await;
    // The import dies abruptly (a panic unwinds it, like a crash drops
    // it) once 40 tiles are acknowledged, with more writes in flight.
    let acked = Arc::new(AtomicU64::new(0));
    let (h, f, a) = (p.handle.clone(), file.clone(), acked.clone());
    let task = tokio::spawn(async move {
        mbtiles::import(&h, "region", &f, |r| {
            a.store(r.tiles, Ordering::SeqCst);
            assert!(r.tiles < 40, "simulated crash mid-import");
        })
        .await
    });
    assert!(task.await.unwrap_err().is_panic());
    let stored_before = acked.load(Ordering::SeqCst);
    assert_eq!(stored_before, 40);
    // Restart the rack on the same cache.
    let dir = p.stop().await;
    let q = start_in(&mut config, Deps::default(), dir).await;
    assert!(
        q.handle.status().objects >= stored_before,
        "acknowledged tiles survive: {} < {stored_before}",
        q.handle.status().objects
    );
    let r = mbtiles::import(&q.handle, "region", &file, |_| {})
        .await
        .unwrap();
    assert!(r.unchanged >= stored_before, "{r:?}");
    assert_eq!(r.unchanged + r.tiles, tiles.len() as u64);
    assert!(r.tiles > 0, "the first run really was cut short: {r:?}");
    for ((z, x, y), body) in &tiles {
        let resp = get(q.addr, &format!("/tiles/region/{z}/{x}/{y}.png")).await;
        assert_eq!(&resp.body[..], &body[..]);
    }
    q.stop().await;
}

/// Throughput of a larger import and export (not run by default:
/// `cargo test -p cache-proxy --release --test integration mbtiles:: -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn import_and_export_throughput() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("big.mbtiles");
    let blank = png(u32::MAX);
    let mut tiles: Tiles = Vec::new();
    for x in 0..128u32 {
        for y in 0..160u32 {
            // A third single-colour, as over sea or desert.
            let body = if (x + y) % 3 == 0 {
                blank.clone()
            } else {
                png(x * 1000 + y)
            };
            tiles.push(((8, x, y), body));
        }
    }
    make_plain(&file, &[("format", "png")], &tiles);
    let mut c = offline_config(TileFormat::Png);
    c.tile_source[0].max_zoom = 8;
    let p = start(c, Deps::default()).await;
    let t0 = Instant::now();
    let r = mbtiles::import(&p.handle, "region", &file, |_| {})
        .await
        .unwrap();
    let took = t0.elapsed();
    eprintln!(
        "import: {} tiles, {} bytes in {took:?} ({:.0} tiles/s)",
        r.tiles,
        r.bytes,
        r.tiles as f64 / took.as_secs_f64()
    );
    let t0 = Instant::now();
    let r2 = mbtiles::import(&p.handle, "region", &file, |_| {})
        .await
        .unwrap();
    eprintln!(
        "re-import (all unchanged): {} in {:?}",
        r2.unchanged,
        t0.elapsed()
    );
    let out = work.path().join("out.mbtiles");
    let plan = ExportPlan {
        source: "region".into(),
        bbox: "-180,-85,180,85".parse().unwrap(),
        min_zoom: 8,
        max_zoom: 8,
    };
    let t0 = Instant::now();
    let e = mbtiles::export(&p.handle, &plan, &out, |_| {})
        .await
        .unwrap();
    eprintln!(
        "export: {} of {} tiles ({} unique) in {:?}",
        e.tiles,
        e.total,
        e.unique,
        t0.elapsed()
    );
    assert_eq!(e.tiles, tiles.len() as u64);
    p.stop().await;
}

/// A gzip stream of `inflated` zero bytes (about a thousandth of it).
fn gzip_of_zeros(inflated: usize) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let block = vec![0u8; 1 << 20];
    let mut left = inflated;
    while left > 0 {
        let n = left.min(block.len());
        e.write_all(&block[..n]).unwrap();
        left -= n;
    }
    e.finish().unwrap()
}

fn gz(b: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// A file made by `sql` (a whole schema and its rows).
fn make_sql(path: &Path, sql: &str) {
    let c = Connection::open(path).unwrap();
    c.execute_batch(sql).unwrap();
}

/// Imports `name` from `dir` and returns the error, failing the test if
/// the import does not end within 10 s or changed the object count.
async fn refused(p: &TestProxy, dir: &Path, name: &str) -> ImportError {
    let file = dir.join(name);
    let before = p.handle.status().objects;
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        mbtiles::import(&p.handle, "region", &file, |_| {}),
    )
    .await
    .unwrap_or_else(|_| panic!("{name}: the import did not end within 10 s"))
    .expect_err(name);
    assert_eq!(p.handle.status().objects, before, "{name} stored something");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_triggers_and_oversized_metadata_are_refused_without_running_them() {
    let work = tempfile::tempdir().unwrap();
    let p = start(offline_config(TileFormat::Png), Deps::default()).await;
    let unsafe_schema = |e: &ImportError, what: &str| {
        assert!(matches!(e, ImportError::UnsafeSchema { .. }), "{e}");
        assert!(e.to_string().contains(what), "{e}");
    };

    // `tiles` a recursive view that never ends.
    make_sql(
        &work.path().join("recursive.mbtiles"),
        "CREATE TABLE metadata (name text, value text);
         INSERT INTO metadata VALUES ('format', 'png');
         CREATE VIEW tiles AS WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c)
           SELECT 0 AS zoom_level, 0 AS tile_column, 0 AS tile_row, x'89' AS tile_data
           FROM c WHERE x < 0;",
    );
    let e = refused(&p, work.path(), "recursive.mbtiles").await;
    unsafe_schema(
        &e,
        "`tiles` is a view without plain `map` and `images` tables",
    );

    // `metadata` a view of huge strings.
    make_sql(
        &work.path().join("hugemeta.mbtiles"),
        "CREATE VIEW metadata AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100)
           SELECT 'k' || x AS name, printf('%.*c', 100000000, 'x') AS value FROM c;
         CREATE TABLE tiles (zoom_level int, tile_column int, tile_row int, tile_data blob);",
    );
    let e = refused(&p, work.path(), "hugemeta.mbtiles").await;
    unsafe_schema(&e, "`metadata` is a view");

    // A trigger, even one that can never fire on a read.
    make_sql(
        &work.path().join("trigger.mbtiles"),
        "CREATE TABLE metadata (name text, value text);
         CREATE TABLE tiles (zoom_level int, tile_column int, tile_row int, tile_data blob);
         CREATE TRIGGER t AFTER INSERT ON tiles BEGIN DELETE FROM metadata; END;",
    );
    let e = refused(&p, work.path(), "trigger.mbtiles").await;
    unsafe_schema(&e, "schema holds a trigger");

    // Too many metadata rows; too many metadata bytes.
    make_sql(
        &work.path().join("rows.mbtiles"),
        &format!(
            "CREATE TABLE metadata (name text, value text);
             CREATE TABLE tiles (zoom_level int, tile_column int, tile_row int, tile_data blob);
             WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {})
               INSERT INTO metadata SELECT 'k' || x, 'v' FROM c;",
            mbtiles::MAX_METADATA_ROWS + 1
        ),
    );
    let e = refused(&p, work.path(), "rows.mbtiles").await;
    assert!(
        matches!(
            e,
            ImportError::Budget {
                what: "metadata rows",
                ..
            }
        ),
        "{e}"
    );
    make_sql(
        &work.path().join("bytes.mbtiles"),
        "CREATE TABLE metadata (name text, value text);
         CREATE TABLE tiles (zoom_level int, tile_column int, tile_row int, tile_data blob);
         INSERT INTO metadata VALUES ('a', printf('%.*c', 10000000, 'x'));
         INSERT INTO metadata VALUES ('b', printf('%.*c', 10000000, 'x'));",
    );
    let e = refused(&p, work.path(), "bytes.mbtiles").await;
    assert!(
        matches!(
            e,
            ImportError::Budget {
                what: "metadata bytes",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("exceeds the import budget"), "{e}");

    // A `tiles` view over real `map` and `images` tables (the usual
    // deduplicated layout) is still read, through those tables.
    make_dedup(
        &work.path().join("dedup.mbtiles"),
        &[("format", "png")],
        &vec![((0, 0, 0), png(1))],
    );
    let r = mbtiles::import(
        &p.handle,
        "region",
        &work.path().join("dedup.mbtiles"),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(r.tiles, 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_tile_refuses_the_import_and_removes_what_it_stored() {
    let work = tempfile::tempdir().unwrap();
    let p = start(offline_config(TileFormat::Pbf), Deps::default()).await;
    let bomb = gzip_of_zeros(1 << 30);
    assert!(bomb.len() < 2 << 20, "{}", bomb.len());
    let mut tiles: Tiles = Vec::new();
    for x in 0..8u32 {
        for y in 0..8u32 {
            tiles.push(((3, x, y), gz(&[0x1a, 3, b'a', x as u8, y as u8])));
        }
    }
    tiles.push(((4, 0, 0), bomb));
    make_plain(
        &work.path().join("bomb.mbtiles"),
        &[("format", "pbf")],
        &tiles,
    );
    let started = Instant::now();
    let e = refused(&p, work.path(), "bomb.mbtiles").await;
    assert!(
        matches!(
            e,
            ImportError::GzipBomb {
                z: 4,
                x: 0,
                y: 0,
                ..
            }
        ),
        "{e}"
    );
    eprintln!("gzip bomb refused in {:?}", started.elapsed());
    // A broken gzip stream is only counted invalid.
    let mut cut = gz(&[0x1a, 3, b'c']);
    cut.truncate(cut.len() - 4);
    make_plain(
        &work.path().join("cut.mbtiles"),
        &[("format", "pbf")],
        &vec![((0, 0, 0), gz(&[0x1a, 1])), ((1, 0, 0), cut)],
    );
    let r = mbtiles::import(
        &p.handle,
        "region",
        &work.path().join("cut.mbtiles"),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!((r.tiles, r.invalid), (1, 1), "{r:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_import_removes_the_tiles_it_stored_and_keeps_the_rest() {
    let work = tempfile::tempdir().unwrap();
    let mut config = offline_config(TileFormat::Png);
    config.tile_source[0].max_zoom = 8;
    let p = start(config, Deps::default()).await;
    // Tiles already there (an earlier import) stay.
    make_plain(
        &work.path().join("first.mbtiles"),
        &[("format", "png")],
        &vec![((0, 0, 0), png(1)), ((1, 0, 0), png(2))],
    );
    mbtiles::import(
        &p.handle,
        "region",
        &work.path().join("first.mbtiles"),
        |_| {},
    )
    .await
    .unwrap();
    let before = p.handle.status().objects;
    assert_eq!(before, 2);
    let mut tiles: Tiles = Vec::new();
    tiles.push(((0, 0, 0), png(1))); // identical: unchanged, never removed
    for x in 0..64u32 {
        for y in 0..64u32 {
            tiles.push(((6, x, y), png(100 + x * 64 + y)));
        }
    }
    make_plain(
        &work.path().join("big.mbtiles"),
        &[("format", "png")],
        &tiles,
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    let stored = Arc::new(AtomicU64::new(0));
    let s = stored.clone();
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        mbtiles::import_cancellable(
            &p.handle,
            "region",
            &work.path().join("big.mbtiles"),
            &cancel,
            move |r| {
                s.store(r.tiles, Ordering::SeqCst);
                if r.tiles >= 300 {
                    c.cancel();
                }
            },
        ),
    )
    .await
    .expect("a cancelled import ends")
    .unwrap_err();
    assert!(matches!(e, ImportError::Cancelled), "{e}");
    let stored = stored.load(Ordering::SeqCst);
    assert!(
        (300..4096).contains(&stored),
        "it had stored {stored} tiles"
    );
    assert_eq!(
        p.handle.status().objects,
        before,
        "what the cancelled run stored was removed, what was there stays"
    );
    let r = get(p.addr, "/tiles/region/0/0/0.png").await;
    assert_eq!(r.status, 200);
    let r = get(p.addr, "/tiles/region/6/0/0.png").await;
    assert_eq!(r.status, 504);
    p.stop().await;
}

/// Peak memory while every import attack runs (not run by default:
/// `cargo test -p cache-proxy --test integration -- --ignored --nocapture mbtiles::import_attacks_peak_rss`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn import_attacks_peak_rss() {
    let work = tempfile::tempdir().unwrap();
    let bomb = gzip_of_zeros(1 << 30);
    let mut tiles: Tiles = vec![((0, 0, 0), gz(&[0x1a, 1]))];
    tiles.push(((1, 0, 0), bomb.clone()));
    make_plain(
        &work.path().join("bomb.mbtiles"),
        &[("format", "pbf")],
        &tiles,
    );
    make_sql(
        &work.path().join("recursive.mbtiles"),
        "CREATE TABLE metadata (name text, value text);
         INSERT INTO metadata VALUES ('format', 'pbf');
         CREATE VIEW tiles AS WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c)
           SELECT 0 AS zoom_level, 0 AS tile_column, 0 AS tile_row, x'1a' AS tile_data FROM c;",
    );
    make_sql(
        &work.path().join("hugemeta.mbtiles"),
        "CREATE VIEW metadata AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100)
           SELECT 'k' || x AS name, printf('%.*c', 100000000, 'x') AS value FROM c;
         CREATE TABLE tiles (zoom_level int, tile_column int, tile_row int, tile_data blob);",
    );
    make_sql(
        &work.path().join("bigmeta.mbtiles"),
        "CREATE TABLE metadata (name text, value text);
         CREATE TABLE tiles (zoom_level int, tile_column int, tile_row int, tile_data blob);
         WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3)
           INSERT INTO metadata SELECT 'k' || x, printf('%.*c', 60000000, 'x') FROM c;",
    );
    let p = start(offline_config(TileFormat::Pbf), Deps::default()).await;
    // Reset the peak (VmHWM) so building the files above does not count.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let base = common::proc_status_kib("VmRSS:");
    for name in [
        "bomb.mbtiles",
        "recursive.mbtiles",
        "hugemeta.mbtiles",
        "bigmeta.mbtiles",
    ] {
        let t0 = Instant::now();
        let e = refused(&p, work.path(), name).await;
        println!(
            "{name}: refused in {:?} ({e}); peak RSS so far {} MiB",
            t0.elapsed(),
            common::proc_status_kib("VmHWM:") / 1024
        );
    }
    println!(
        "RSS before the attacks {} MiB, peak during them {} MiB (the whole test process)",
        base / 1024,
        common::proc_status_kib("VmHWM:") / 1024
    );
    p.stop().await;
}
