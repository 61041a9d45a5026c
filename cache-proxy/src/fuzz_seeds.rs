//! Writes the seed corpus of the cache-proxy fuzz targets
//! (`fuzz/corpus/<target>/`: `tile_path`, `http_cache`, `store_codec`,
//! `pmtiles`, `mbtiles`) with the real encoders: `scripts/fuzz seeds` runs
//! it. The MBTiles seed is what an export of an imported PMTiles archive
//! writes, re-packed in 512-byte pages to stay small.

use std::io::Write as _;
use std::path::Path;

use hyper::HeaderMap;

use crate::http_cache::fmt_date;
use crate::mbtiles::{self, ExportPlan};
use crate::pmtiles::{self, Compression, TileType, WriteOptions, HEADER_LEN};
use crate::store::codec::{split_headers, BlobLoc, MetaRecord, ObjectRecord, Volatile};
use crate::tiles::{BBox, TileId};
use crate::{Config, Deps, Proxy, TileFormat, TileSource};

fn seed(target: &str, name: &str, mode: u8, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), [&[mode][..], bytes].concat()).expect("write seed");
}

fn headers(lines: &[(&str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in lines {
        h.append(
            hyper::header::HeaderName::from_bytes(n.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    h
}

fn text(h: &HeaderMap) -> String {
    h.iter()
        .map(|(n, v)| format!("{n}: {}\n", v.to_str().expect("ascii")))
        .collect()
}

/// A body the importer recognises as PNG.
fn png(n: u8) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    b.extend_from_slice(&[n; 24]);
    b
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).expect("gzip");
    e.finish().expect("gzip")
}

/// Zooms 0..=2, some tiles sharing a body (runs).
fn region(body: impl Fn(u8) -> Vec<u8>) -> Vec<(TileId, Vec<u8>)> {
    let mut v = Vec::new();
    for z in 0..=2u8 {
        for x in 0..(1u32 << z) {
            for y in 0..(1u32 << z) {
                let n = if z == 2 && x > 0 { 0 } else { z * 16 + x as u8 };
                v.push((TileId { z, x, y }, body(n)));
            }
        }
    }
    v
}

fn source(name: &str, format: TileFormat) -> TileSource {
    TileSource {
        name: name.into(),
        url: format!(
            "http://127.0.0.1:9/{{z}}/{{x}}/{{y}}.{}",
            format.extension()
        ),
        format,
        min_zoom: 0,
        max_zoom: 4,
        attribution: String::new(),
        allow_bulk: false,
        requests_per_sec: 0,
        user_agent: "fieldrack-seeds/1".into(),
    }
}

/// An MBTiles file as `mbtiles::export` writes it, holding `archive`'s
/// tiles (imported first), re-packed in 512-byte pages.
fn exported_mbtiles(archive: &[u8]) -> Vec<u8> {
    let work = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut config = Config::default();
    config.proxy.listen = "127.0.0.1:0".parse().expect("addr");
    config.proxy.cache_dir = work.path().join("cache");
    config.proxy.offline = true;
    config.tile_source = vec![source("img", TileFormat::Png)];
    let (pm, out) = (
        work.path().join("in.pmtiles"),
        work.path().join("out.mbtiles"),
    );
    std::fs::write(&pm, archive).expect("write archive");
    rt.block_on(async {
        let proxy = Proxy::bind(config, Deps::default()).await.expect("bind");
        let handle = proxy.handle();
        mbtiles::import(&handle, "img", &pm, |_| {})
            .await
            .expect("import");
        let plan = ExportPlan {
            source: "img".into(),
            bbox: BBox {
                west: -180.0,
                south: -85.0,
                east: 180.0,
                north: 85.0,
            },
            min_zoom: 0,
            max_zoom: 2,
        };
        mbtiles::export(&handle, &plan, &out, |_| {})
            .await
            .expect("export");
    });
    let conn = rusqlite::Connection::open(&out).expect("open export");
    conn.execute_batch("PRAGMA journal_mode = DELETE; PRAGMA page_size = 512; VACUUM;")
        .expect("repack");
    drop(conn);
    std::fs::read(&out).expect("read export")
}

#[test]
#[ignore = "writes fuzz/corpus; run by scripts/fuzz seeds"]
fn write_fuzz_seeds() {
    // Tile paths (mode 0) and seeding regions (mode 1).
    for (name, path) in [
        ("tile", "/tiles/osm/3/4/2.png"),
        ("tilejson", "/tiles/vec.json"),
        ("vector", "/tiles/vec/14/8000/5000.pbf"),
        ("jpeg", "/tiles/sat/5/1/2.jpeg"),
    ] {
        seed("tile_path", name, 0, path.as_bytes());
    }
    seed("tile_path", "bbox", 1, b"3-6;-72.5,18.0,-71.9,18.7");

    // HTTP caching: times, status, request / stored / 304 headers.
    let t0 = 1_800_000_000u32;
    let req = headers(&[
        ("cache-control", "max-age=60, max-stale".into()),
        ("if-none-match", "\"v1\"".into()),
        ("accept-encoding", "gzip".into()),
        ("connection", "x-hop".into()),
    ]);
    let resp = headers(&[
        ("date", fmt_date(u64::from(t0))),
        ("last-modified", fmt_date(u64::from(t0) - 86_400)),
        ("expires", fmt_date(u64::from(t0) + 600)),
        (
            "cache-control",
            "public, s-maxage=300, stale-while-revalidate=30, stale-if-error=600".into(),
        ),
        ("etag", "W/\"v1\"".into()),
        ("vary", "Accept-Encoding".into()),
        ("age", "12".into()),
    ]);
    let not_modified = headers(&[
        ("date", fmt_date(u64::from(t0) + 700)),
        ("etag", "W/\"v1\"".into()),
    ]);
    let mut input = Vec::new();
    for t in [t0 - 1, t0, t0 + 700] {
        input.extend_from_slice(&t.to_le_bytes());
    }
    input.extend_from_slice(&200u16.to_le_bytes());
    input.extend_from_slice(
        format!(
            "{}\n--\n{}\n--\n{}",
            text(&req),
            text(&resp),
            text(&not_modified)
        )
        .as_bytes(),
    );
    // http_cache reads no mode byte: write the input as it is.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/http_cache");
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join("revalidated"), &input).expect("write seed");

    // Store records.
    let (block, volatile) = split_headers(&resp);
    let object = ObjectRecord {
        flags: 1,
        status: 200,
        request_time: t0 - 1,
        response_time: t0,
        last_access: t0 / 60,
        body_len: 1234,
        body_hash: [5; 16],
        header_block: [6; 8],
        volatile: volatile.clone(),
    };
    seed("store_codec", "object", 0, &object.encode());
    let meta = MetaRecord {
        status: 304,
        request_time: t0,
        response_time: t0 + 2,
        volatile: vec![
            Volatile::Date(t0),
            Volatile::Age(5),
            Volatile::ETag(b"\"0123abcd\"".to_vec()),
            Volatile::ETag(b"W/\"not hex\"".to_vec()),
        ],
    };
    seed("store_codec", "meta", 1, &meta.encode());
    let loc = BlobLoc {
        pack: 3,
        offset: 1 << 20,
        len: 1234,
        refs: 2,
    };
    seed("store_codec", "blob", 2, &loc.encode());
    seed("store_codec", "headers", 3, text(&resp).as_bytes());
    seed("store_codec", "block", 4, &block);

    // PMTiles: a header and a directory; whole archives with and without
    // leaves, gzip and plain directories, raster and vector.
    let png_archive = pmtiles::write(&region(png), &WriteOptions::default());
    let leaves = pmtiles::write(
        &region(png),
        &WriteOptions {
            root_entries: 4,
            internal_compression: Compression::None,
            ..WriteOptions::default()
        },
    );
    let vector = pmtiles::write(
        &region(|n| gzip(&[0x1a, 2, n, n])),
        &WriteOptions {
            tile_type: TileType::Mvt,
            tile_compression: Compression::Gzip,
            metadata: r#"{"vector_layers":[{"id":"roads","fields":{}}]}"#.into(),
            ..WriteOptions::default()
        },
    );
    let entries = {
        let path = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(path.path(), &leaves).expect("write");
        let mut a = pmtiles::Archive::open(path.path()).expect("open");
        let mut entries = Vec::new();
        a.for_each_entry(|_, e| {
            entries.push(*e);
            Ok(true)
        })
        .expect("walk");
        entries
    };
    let header_and_directory = [
        &leaves[..HEADER_LEN],
        &pmtiles::encode_directory(&entries)[..],
    ]
    .concat();
    seed("pmtiles", "header-directory", 0, &header_and_directory);
    seed("pmtiles", "raster", 1, &png_archive);
    seed("pmtiles", "leaves-plain", 1, &leaves);
    seed("pmtiles", "vector-gzip", 1, &vector);

    // Imports: the mode picks the source (even: png, odd: pbf).
    seed("mbtiles", "pmtiles-raster", 0, &png_archive);
    seed("mbtiles", "pmtiles-vector", 1, &vector);
    seed(
        "mbtiles",
        "mbtiles-export",
        0,
        &exported_mbtiles(&png_archive),
    );
}
