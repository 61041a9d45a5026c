//! Embeds the web pages: our own files from `assets/` and the map library
//! from `node_modules/` (installed by `./scripts/setup`, `npm ci`).
//!
//! Each file is copied into `OUT_DIR` raw and gzip-compressed (level 9, once
//! here instead of on every request), and `assets.rs` there lists them with
//! their URL path, media type and a strong ETag (128 bits of BLAKE3 of the
//! raw bytes), for `include_bytes!`.

use std::io::Write;
use std::path::{Path, PathBuf};

/// (URL path, file under the crate, media type).
const FILES: &[(&str, &str, &str)] = &[
    ("/", "assets/map.html", "text/html; charset=utf-8"),
    (
        "/map/map.js",
        "assets/map.js",
        "text/javascript; charset=utf-8",
    ),
    (
        "/map/common.css",
        "assets/common.css",
        "text/css; charset=utf-8",
    ),
    ("/map/map.css", "assets/map.css", "text/css; charset=utf-8"),
    (
        "/map/leaflet.js",
        "node_modules/leaflet/dist/leaflet.js",
        "text/javascript; charset=utf-8",
    ),
    (
        "/map/leaflet.css",
        "node_modules/leaflet/dist/leaflet.css",
        "text/css; charset=utf-8",
    ),
    (
        "/map/images/layers.png",
        "node_modules/leaflet/dist/images/layers.png",
        "image/png",
    ),
    (
        "/map/images/layers-2x.png",
        "node_modules/leaflet/dist/images/layers-2x.png",
        "image/png",
    ),
    (
        "/map/images/marker-icon.png",
        "node_modules/leaflet/dist/images/marker-icon.png",
        "image/png",
    ),
    (
        "/map/images/marker-icon-2x.png",
        "node_modules/leaflet/dist/images/marker-icon-2x.png",
        "image/png",
    ),
    (
        "/map/images/marker-shadow.png",
        "node_modules/leaflet/dist/images/marker-shadow.png",
        "image/png",
    ),
    (
        "/console/",
        "assets/console.html",
        "text/html; charset=utf-8",
    ),
    (
        "/console/console.js",
        "assets/console.js",
        "text/javascript; charset=utf-8",
    ),
    (
        "/console/console.css",
        "assets/console.css",
        "text/css; charset=utf-8",
    ),
];

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    println!("cargo:rerun-if-changed=assets");
    println!("cargo:rerun-if-changed=package-lock.json");
    let leaflet = root.join("node_modules/leaflet/dist/leaflet.js");
    if !leaflet.exists() {
        panic!(
            "webui: {} is missing: the map library comes from the npm registry; run ./scripts/setup \
             (it runs `npm ci` in webui/) and build again",
            leaflet.display()
        );
    }
    let mut table = String::from("&[\n");
    for (i, (url, file, mime)) in FILES.iter().enumerate() {
        let src = root.join(file);
        println!("cargo:rerun-if-changed={}", src.display());
        let raw = std::fs::read(&src).unwrap_or_else(|e| {
            panic!(
                "webui: reading {}: {e} (run ./scripts/setup)",
                src.display()
            )
        });
        let gz = gzip(&raw);
        let etag = format!("\"{}\"", &blake3::hash(&raw).to_hex()[..32]);
        let raw_path = out.join(format!("asset{i}"));
        let gz_path = out.join(format!("asset{i}.gz"));
        write(&raw_path, &raw);
        write(&gz_path, &gz);
        table.push_str(&format!(
            "    Asset {{ path: {url:?}, content_type: {mime:?}, etag: {etag:?}, body: include_bytes!({:?}), gzip: include_bytes!({:?}) }},\n",
            raw_path.display().to_string(),
            gz_path.display().to_string(),
        ));
    }
    table.push_str("]\n");
    write(&out.join("assets.rs"), table.as_bytes());
}

fn gzip(raw: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(raw).expect("writing to memory");
    enc.finish().expect("writing to memory")
}

fn write(p: &Path, b: &[u8]) {
    std::fs::write(p, b).unwrap_or_else(|e| panic!("webui: writing {}: {e}", p.display()));
}
