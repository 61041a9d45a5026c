//! PMTiles v3 import: archives built with the crate's writer, imported
//! into a proxy with nothing behind it (forced offline) and served; broken
//! archives refused before anything is stored.

mod common;

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
