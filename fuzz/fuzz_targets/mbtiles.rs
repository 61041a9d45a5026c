//! Tile file imports (`cache_proxy::mbtiles::import`): the input is written
//! to a file and imported, through the real entry point, into a proxy
//! whose cache lives in a temporary directory. The file is told apart by
//! its first bytes, so SQLite (MBTiles) and PMTiles files both reach their
//! readers, the format checks and the store.
//!
//! Mode byte: even imports into a PNG source, odd into a vector (pbf) one.
#![no_main]

use std::sync::OnceLock;

use cache_proxy::{mbtiles, Config, Deps, Proxy, ProxyHandle};
use fieldrack_fuzz::{split_mode, tile_source};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    proxy: ProxyHandle,
    dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let config: Config = serde_json::from_value(serde_json::json!({
            "proxy": {
                "listen": "127.0.0.1:0",
                "cache_dir": dir.path().join("cache"),
                "max_cache_bytes": 256u64 << 20,
                "offline": true,
            },
        }))
        .expect("proxy config");
        let config = Config {
            tile_source: vec![
                tile_source("img", "png", 0, 19, "http://127.0.0.1:9/{z}/{x}/{y}.png"),
                tile_source("vec", "pbf", 0, 14, "http://127.0.0.1:9/{z}/{x}/{y}.pbf"),
            ],
            ..config
        };
        // Bound (loopback, port 0) but never run: imports need no server.
        let proxy = runtime
            .block_on(Proxy::bind(config, Deps::default()))
            .expect("proxy binds")
            .handle();
        Fixture {
            runtime,
            proxy,
            dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = split_mode(data) else {
        return;
    };
    let f = fixture();
    let path = f.dir.path().join("input.mbtiles");
    std::fs::write(&path, rest).expect("write the tile file");
    let source = if mode % 2 == 0 { "img" } else { "vec" };
    let result = f
        .runtime
        .block_on(mbtiles::import(&f.proxy, source, &path, |_| {}));
    if let Ok(report) = result {
        assert!(report.tiles + report.unchanged <= report.read);
        assert!(report.skipped + report.invalid <= report.read);
    }
});
