//! PMTiles v3 import: archives built with the crate's writer, imported
//! into a proxy with nothing behind it (forced offline) and served; broken
//! archives refused before anything is stored.

use crate::common;

use std::io::Write;
use std::path::{Path, PathBuf};

use cache_proxy::mbtiles::{self, ImportError, ImportReport};
use cache_proxy::pmtiles::{
    self, Archive, Compression, Entry, Header, PmtilesError, TileType, WriteOptions, HEADER_LEN,
};
use cache_proxy::tiles::TileId;
use cache_proxy::{Config, Deps, TileFormat, TileSource};
use common::*;

fn offline_config(format: TileFormat) -> Config {
    let mut c = Config::default();
    c.proxy.listen = "127.0.0.1:0".parse().unwrap();
    c.proxy.name = "rack-a".into();
    c.proxy.offline = true;
    let ext = format.extension();
    c.tile_source = vec![TileSource {
        name: "region".into(),
        url: format!("http://127.0.0.1:9/{{z}}/{{x}}/{{y}}.{ext}"),
        format,
        min_zoom: 0,
        max_zoom: 4,
        attribution: String::new(),
        allow_bulk: false,
        requests_per_sec: 0,
        user_agent: "fieldrack-test/1".into(),
    }];
    c
}

fn t(z: u8, x: u32, y: u32) -> TileId {
    TileId { z, x, y }
}

fn png(n: u32) -> Vec<u8> {
    tile_body(&format!("/pm/{n}"), 0).to_vec()
}

/// Every tile of zooms 0..=3; all of z3 but the first column one blank
/// body, so consecutive tile ids share it (runs).
fn region() -> Vec<(TileId, Vec<u8>)> {
    let blank = png(999_999);
    let mut v = Vec::new();
    let mut n = 0;
    for z in 0..=3u8 {
        for x in 0..(1u32 << z) {
            for y in 0..(1u32 << z) {
                n += 1;
                let body = if z == 3 && x > 0 {
                    blank.clone()
                } else {
                    png(n)
                };
                v.push((t(z, x, y), body));
            }
        }
    }
    v
}

fn save(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn gz(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn header_of(bytes: &[u8]) -> Header {
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&bytes[..HEADER_LEN]);
    Header::parse(&h).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pmtiles_archive_with_leaves_and_runs_is_imported_and_served_offline() {
    let work = tempfile::tempdir().unwrap();
    let mut tiles = region();
    tiles.push((t(5, 1, 1), png(5000))); // outside the source's zooms 0-4
    tiles.push((t(4, 0, 0), b"<html>log in</html>".to_vec())); // not a PNG
    let bytes = pmtiles::write(
        &tiles,
        &WriteOptions {
            root_entries: 8, // forces leaf directories
            ..WriteOptions::default()
        },
    );
    // No extension: the magic bytes say what it is.
    let file = save(work.path(), "region.bin", &bytes);
    let mut archive = Archive::open(&file).unwrap();
    let h = archive.header().clone();
    assert!(h.leaf_length > 0, "{h:?}");
    assert!(h.tile_entries < h.addressed_tiles, "runs: {h:?}");
    assert_eq!(archive.validate().unwrap().addressed_tiles, 87);

    let p = start(offline_config(TileFormat::Png), Deps::default()).await;
    let report = mbtiles::import(&p.handle, "region", &file, |_| {})
        .await
        .unwrap();
    let valid = region().len() as u64; // 85
    assert_eq!(
        report,
        ImportReport {
            total: valid + 2,
            read: valid + 2,
            tiles: valid,
            bytes: region().iter().map(|(_, b)| b.len() as u64).sum(),
            unchanged: 0,
            skipped: 1,
            invalid: 1,
        }
    );
    assert_eq!(p.handle.status().objects, valid);
    for (tile, body) in region() {
        let r = get(
            p.addr,
            &format!("/tiles/region/{}/{}/{}.png", tile.z, tile.x, tile.y),
        )
        .await;
        assert_eq!(r.status, 200, "{tile:?}");
        assert_eq!(&r.body[..], &body[..], "{tile:?}");
        assert_eq!(r.headers["content-type"], "image/png");
        assert!(r.cache_status().contains("hit"), "{}", r.cache_status());
    }
    // Importing it again changes nothing.
    let again = mbtiles::import(&p.handle, "region", &file, |_| {})
        .await
        .unwrap();
    assert_eq!((again.tiles, again.unchanged), (0, valid));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzipped_vector_tiles_keep_their_encoding_and_broken_gzip_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let raw = |n: u8| [0x1a, 3, b'a', b'b', n].to_vec();
    let mut cut = gz(&raw(9));
    cut.truncate(cut.len() - 4); // a gzip stream without its trailer
    let tiles = vec![
        (t(0, 0, 0), gz(&raw(0))),
        (t(1, 0, 0), gz(&raw(1))),
        (t(1, 1, 1), cut),
    ];
    let bytes = pmtiles::write(
        &tiles,
        &WriteOptions {
            tile_type: TileType::Mvt,
            tile_compression: Compression::Gzip,
            internal_compression: Compression::None,
            metadata: r#"{"name":"r","vector_layers":[{"id":"roads","fields":{}}]}"#.into(),
            ..WriteOptions::default()
        },
    );
    let file = save(work.path(), "region.pmtiles", &bytes);
    let p = start(offline_config(TileFormat::Pbf), Deps::default()).await;
    let report = mbtiles::import(&p.handle, "region", &file, |_| {})
        .await
        .unwrap();
    assert_eq!((report.tiles, report.invalid), (2, 1), "{report:?}");
    let r = get(p.addr, "/tiles/region/1/0/0.pbf").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-encoding"], "gzip");
    assert_eq!(&r.body[..], &gz(&raw(1))[..]);
    let r = get(p.addr, "/tiles/region/1/1/1.pbf").await;
    assert_eq!(r.status, 504, "the broken tile was not stored");
    // The vector layers are kept for export, like an MBTiles file's `json`.
    let json = p
        .handle
        .lookup(&cache_proxy::key_hash(&format!(
            "{}region",
            mbtiles::JSON_KEY_PREFIX
        )))
        .expect("json kept");
    assert_eq!(
        &json.body[..],
        br#"{"vector_layers":[{"fields":{},"id":"roads"}]}"#
    );
    p.stop().await;
}

/// An archive whose root directory is `root` (uncompressed) over `data`,
/// with the header's counts as given.
fn hand_made(root: &[Entry], data: &[u8], counts: (u64, u64)) -> Vec<u8> {
    let dir = pmtiles::encode_directory(root);
    let h = Header {
        root_offset: HEADER_LEN as u64,
        root_length: dir.len() as u64,
        metadata_offset: (HEADER_LEN + dir.len()) as u64,
        metadata_length: 0,
        leaf_offset: (HEADER_LEN + dir.len()) as u64,
        leaf_length: 0,
        data_offset: (HEADER_LEN + dir.len()) as u64,
        data_length: data.len() as u64,
        addressed_tiles: counts.0,
        tile_entries: counts.1,
        tile_contents: 0,
        clustered: false,
        internal_compression: Compression::None,
        tile_compression: Compression::None,
        tile_type: TileType::Png,
        min_zoom: 0,
        max_zoom: 1,
        bounds_e7: [0; 4],
        center_zoom: 0,
        center_e7: [0, 0],
    };
    let mut out = h.encode().to_vec();
    out.extend_from_slice(&dir);
    out.extend_from_slice(data);
    out
}

fn entry(tile_id: u64, offset: u64, length: u32, run_length: u32) -> Entry {
    Entry {
        tile_id,
        offset,
        length,
        run_length,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_or_lying_archives_are_refused_with_the_reason_and_store_nothing() {
    let work = tempfile::tempdir().unwrap();
    let p = start(offline_config(TileFormat::Png), Deps::default()).await;
    let good = pmtiles::write(&region(), &WriteOptions::default());
    let body = png(1);
    let body_len = body.len() as u32;

    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    for cut in [3, 8, 100, HEADER_LEN + 5, good.len() / 2, good.len() - 1] {
        cases.push(("cut", good[..cut].to_vec(), "truncated"));
    }
    let mut v2 = good.clone();
    v2[7] = 2;
    cases.push(("v2", v2, "version 2"));
    let mut brotli = good.clone();
    brotli[97] = 3;
    cases.push(("brotli", brotli, "internal compression 3 (brotli)"));
    let mut gz_root = good.clone();
    let h = header_of(&good);
    gz_root[h.root_offset as usize + 12] ^= 0xff; // inside the gzip stream
    cases.push(("gzroot", gz_root, "corrupt directory"));
    cases.push((
        "beyond",
        hand_made(&[entry(0, 0, body_len + 1, 1)], &body, (0, 0)),
        "points outside the tile data section",
    ));
    cases.push((
        "backwards",
        hand_made(
            &[entry(1, 0, body_len, 2), entry(2, 0, body_len, 1)],
            &body,
            (0, 0),
        ),
        "tile id 2 repeats or goes backwards",
    ));
    cases.push((
        "counts",
        hand_made(&[entry(0, 0, body_len, 1)], &body, (5, 1)),
        "the header says 5 addressed tiles but the directories hold 1",
    ));
    cases.push((
        "leaf",
        hand_made(&[entry(0, 0, 4, 0)], &body, (0, 0)),
        "points outside the leaf directories section",
    ));

    for (name, bytes, reason) in cases {
        let file = save(work.path(), &format!("{name}.pmtiles"), &bytes);
        let e = mbtiles::import(&p.handle, "region", &file, |_| {})
            .await
            .unwrap_err();
        let text = e.to_string();
        if name == "cut" && bytes.len() < 7 {
            // Too short to carry the magic: not a tile file at all.
            assert!(matches!(e, ImportError::NotSqlite { .. }), "{name}: {text}");
            continue;
        }
        assert!(matches!(e, ImportError::Pmtiles { .. }), "{name}: {text}");
        assert!(
            text.contains("not a usable PMTiles v3 archive"),
            "{name}: {text}"
        );
        assert!(text.contains(reason), "{name}: {text}");
        assert_eq!(p.handle.status().objects, 0, "{name} stored something");
    }
    // The reader's own errors, for the record.
    let file = save(work.path(), "v2.pmtiles", &{
        let mut v = good.clone();
        v[7] = 2;
        v
    });
    assert!(matches!(
        Archive::open(&file),
        Err(PmtilesError::Version(2))
    ));
    p.stop().await;
}

/// A gzip stream of `inflated` zero bytes (about a thousandth of it),
/// built in 1 MiB steps so the test never holds the inflated bytes.
fn gzip_of_zeros(inflated: usize) -> Vec<u8> {
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

/// An archive with an uncompressed root and leaf section as given, over
/// `data`; header counts not stated.
fn with_leaves(root: &[Entry], leaves: &[u8], data: &[u8], tile_type: TileType) -> Vec<u8> {
    let dir = pmtiles::encode_directory(root);
    let root_offset = HEADER_LEN as u64;
    let leaf_offset = root_offset + dir.len() as u64;
    let data_offset = leaf_offset + leaves.len() as u64;
    let h = Header {
        root_offset,
        root_length: dir.len() as u64,
        metadata_offset: leaf_offset,
        metadata_length: 0,
        leaf_offset,
        leaf_length: leaves.len() as u64,
        data_offset,
        data_length: data.len() as u64,
        addressed_tiles: 0,
        tile_entries: 0,
        tile_contents: 0,
        clustered: false,
        internal_compression: Compression::None,
        tile_compression: if tile_type == TileType::Mvt {
            Compression::Gzip
        } else {
            Compression::None
        },
        tile_type,
        min_zoom: 0,
        max_zoom: 4,
        bounds_e7: [0; 4],
        center_zoom: 0,
        center_e7: [0, 0],
    };
    let mut out = h.encode().to_vec();
    out.extend_from_slice(&dir);
    out.extend_from_slice(leaves);
    out.extend_from_slice(data);
    out
}

/// A leaf of `n` entries that all point back at the leaf itself (offset
/// 0 of the leaf section), its length written inside it: found by
/// iterating to the fixed point.
fn self_pointing_leaf(n: u64) -> Vec<u8> {
    let mut len = 0u32;
    loop {
        let entries: Vec<Entry> = (0..n).map(|i| entry(i, 0, len, 0)).collect();
        let b = pmtiles::encode_directory(&entries);
        if b.len() as u32 == len {
            return b;
        }
        len = b.len() as u32;
    }
}

/// Imports `bytes` as `name` and returns the error, failing the test if
/// the import does not end within 10 s (a walk that never ends) or stored
/// anything.
async fn refused(p: &TestProxy, work: &Path, name: &str, bytes: &[u8]) -> ImportError {
    let file = save(work, name, bytes);
    let before = p.handle.status().objects;
    let e = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        mbtiles::import(&p.handle, "region", &file, |_| {}),
    )
    .await
    .unwrap_or_else(|_| panic!("{name}: the import did not end within 10 s"))
    .expect_err(name);
    assert_eq!(p.handle.status().objects, before, "{name} stored something");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_pointing_at_leaves_or_at_one_leaf_again_are_refused_at_once() {
    let work = tempfile::tempdir().unwrap();
    let p = start(offline_config(TileFormat::Png), Deps::default()).await;
    let body = png(1);

    // Three levels of 2,048 pointers to one leaf: 8.6 billion directory
    // reads if followed. A leaf may not point to a leaf.
    let leaf = self_pointing_leaf(2048);
    let root: Vec<Entry> = (0..2048)
        .map(|i| entry(i, 0, leaf.len() as u32, 0))
        .collect();
    let bytes = with_leaves(&root, &leaf, &body, TileType::Png);
    assert!(bytes.len() < 40_000, "a small file: {}", bytes.len());
    let started = std::time::Instant::now();
    let e = refused(&p, work.path(), "loop.pmtiles", &bytes).await;
    assert!(
        matches!(
            e,
            ImportError::Pmtiles {
                source: PmtilesError::TooDeep,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("a leaf directory points to another leaf directory"),
        "{e}"
    );
    eprintln!("leaf loop refused in {:?}", started.elapsed());

    // One level, 2,048 pointers to the same leaf of one tile: the second
    // visit repeats the leaf's tile ids.
    let one = pmtiles::encode_directory(&[entry(0, 0, body.len() as u32, 1)]);
    let root: Vec<Entry> = (0..2048)
        .map(|i| entry(i, 0, one.len() as u32, 0))
        .collect();
    let e = refused(
        &p,
        work.path(),
        "again.pmtiles",
        &with_leaves(&root, &one, &body, TileType::Png),
    )
    .await;
    assert!(
        matches!(
            e,
            ImportError::Pmtiles {
                source: PmtilesError::Order(_),
                ..
            }
        ),
        "{e}"
    );

    // An empty leaf is refused (directories are never empty).
    let empty = pmtiles::encode_directory(&[]);
    let root = [entry(0, 0, empty.len() as u32, 0)];
    let e = refused(
        &p,
        work.path(),
        "empty.pmtiles",
        &with_leaves(&root, &empty, &body, TileType::Png),
    )
    .await;
    assert!(e.to_string().contains("an empty leaf directory"), "{e}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_over_the_tile_budget_or_a_lying_header_is_refused_before_storing() {
    let work = tempfile::tempdir().unwrap();
    let p = start(offline_config(TileFormat::Png), Deps::default()).await;
    let body = png(1);
    let n = body.len() as u32;

    // One entry, run length 2^32 - 1: a tiny file addressing 4 billion
    // tiles.
    let bytes = hand_made(&[entry(0, 0, n, u32::MAX)], &body, (0, 0));
    let e = refused(&p, work.path(), "run.pmtiles", &bytes).await;
    assert!(
        matches!(
            e,
            ImportError::Pmtiles {
                source: PmtilesError::Budget {
                    what: "tiles addressed",
                    ..
                },
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("exceeds the import budget"), "{e}");

    // Runs that add up past the budget, each under it.
    let half = (pmtiles::MAX_ADDRESSED_TILES / 2 + 1) as u32;
    let bytes = hand_made(
        &[entry(0, 0, n, half), entry(u64::from(half), 0, n, half)],
        &body,
        (0, 0),
    );
    let e = refused(&p, work.path(), "runs.pmtiles", &bytes).await;
    assert!(
        matches!(
            e,
            ImportError::Pmtiles {
                source: PmtilesError::Budget { .. },
                ..
            }
        ),
        "{e}"
    );

    // A header claiming more than the budget is refused before any
    // directory is read.
    let bytes = hand_made(&[entry(0, 0, n, 1)], &body, (1 << 40, 1));
    let e = refused(&p, work.path(), "claims.pmtiles", &bytes).await;
    assert!(
        matches!(
            e,
            ImportError::Pmtiles {
                source: PmtilesError::Budget { .. },
                ..
            }
        ),
        "{e}"
    );
    // Counts that cannot all be true.
    let bytes = hand_made(&[entry(0, 0, n, 1)], &body, (1, 2));
    let e = refused(&p, work.path(), "entries.pmtiles", &bytes).await;
    assert!(
        e.to_string()
            .contains("more tile entries than tiles addressed"),
        "{e}"
    );
    // A tile id past the highest zoom.
    let beyond = pmtiles::zoom_base(cache_proxy::tiles::MAX_ZOOM + 1);
    let bytes = hand_made(&[entry(beyond - 1, 0, n, 2)], &body, (0, 0));
    let e = refused(&p, work.path(), "beyond.pmtiles", &bytes).await;
    assert!(e.to_string().contains("beyond the highest zoom"), "{e}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_tile_refuses_the_import_and_what_was_stored_is_removed() {
    let work = tempfile::tempdir().unwrap();
    let p = start(offline_config(TileFormat::Pbf), Deps::default()).await;
    // 1 GiB of zeros in about a megabyte.
    let bomb = gzip_of_zeros(1 << 30);
    assert!(bomb.len() < 2 << 20, "{}", bomb.len());
    let raw = |n: u8| [0x1a, 3, b'a', b'b', n].to_vec();
    // Good tiles first (stored, then removed), the bomb last.
    let mut tiles: Vec<(TileId, Vec<u8>)> = Vec::new();
    for x in 0..4u32 {
        for y in 0..4u32 {
            tiles.push((t(2, x, y), gz(&raw((x * 4 + y) as u8))));
        }
    }
    tiles.push((t(4, 15, 15), bomb));
    let bytes = pmtiles::write(
        &tiles,
        &WriteOptions {
            tile_type: TileType::Mvt,
            tile_compression: Compression::Gzip,
            ..WriteOptions::default()
        },
    );
    let started = std::time::Instant::now();
    let e = refused(&p, work.path(), "bomb.pmtiles", &bytes).await;
    assert!(matches!(e, ImportError::GzipBomb { z: 4, .. }), "{e}");
    assert!(e.to_string().contains("gzip bomb"), "{e}");
    eprintln!("gzip bomb refused in {:?}", started.elapsed());
    let r = get(p.addr, "/tiles/region/2/0/0.pbf").await;
    assert_eq!(
        r.status, 504,
        "the tiles stored before the bomb were removed"
    );
    p.stop().await;
}

/// Peak memory while the PMTiles attacks run (not run by default:
/// `cargo test -p cache-proxy --test integration -- --ignored --nocapture pmtiles::pmtiles_attacks_peak_rss`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn pmtiles_attacks_peak_rss() {
    let work = tempfile::tempdir().unwrap();
    let body = png(1);
    let leaf = self_pointing_leaf(2048);
    let root: Vec<Entry> = (0..2048)
        .map(|i| entry(i, 0, leaf.len() as u32, 0))
        .collect();
    let looped = with_leaves(&root, &leaf, &body, TileType::Png);
    let run = hand_made(&[entry(0, 0, body.len() as u32, u32::MAX)], &body, (0, 0));
    let raw = [0x1a, 3, b'a'].to_vec();
    let bomb = pmtiles::write(
        &[(t(0, 0, 0), gz(&raw)), (t(1, 0, 0), gzip_of_zeros(1 << 30))],
        &WriteOptions {
            tile_type: TileType::Mvt,
            tile_compression: Compression::Gzip,
            ..WriteOptions::default()
        },
    );
    let png_proxy = start(offline_config(TileFormat::Png), Deps::default()).await;
    let pbf_proxy = start(offline_config(TileFormat::Pbf), Deps::default()).await;
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let base = common::proc_status_kib("VmRSS:");
    for (name, bytes, p) in [
        ("loop.pmtiles", &looped, &png_proxy),
        ("run.pmtiles", &run, &png_proxy),
        ("bomb.pmtiles", &bomb, &pbf_proxy),
    ] {
        let t0 = std::time::Instant::now();
        let e = refused(p, work.path(), name, bytes).await;
        println!(
            "{name} ({} bytes): refused in {:?} ({e}); peak RSS so far {} MiB",
            bytes.len(),
            t0.elapsed(),
            common::proc_status_kib("VmHWM:") / 1024
        );
    }
    println!(
        "RSS before the attacks {} MiB, peak during them {} MiB (the whole test process)",
        base / 1024,
        common::proc_status_kib("VmHWM:") / 1024
    );
    png_proxy.stop().await;
    pbf_proxy.stop().await;
}
