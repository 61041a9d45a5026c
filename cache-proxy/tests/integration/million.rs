//! Disk bytes per payload byte for a million generated tiles (ignored: run
//! with `cargo test -p cache-proxy --release --test integration million:: -- --ignored
//! --nocapture`; set `MILLION_TILES=100000` for a quicker run,
//! `MILLION_SYNC=1` to fsync every group commit as production does, and
//! `MILLION_DIR` to write somewhere other than /tmp).
//!
//! Besides the ratio it prints write throughput, the time to reopen the
//! store, `get` latency (p50/p99) on random keys through the index and the
//! packs and again from the hot cache, and the time of a full `check`.
//!
//! The mix follows ANCHORS.md: 65 % raster tiles, of which 30 % are
//! single-colour (8 colours, ~100-350 B PNGs, deduplicated) and the rest
//! incompressible bodies of log-normal size around 6 KB; 35 % vector
//! tiles, 80 % of them near 100 B and 20 % around 4 KB. Each tile carries
//! realistic headers (type, cache-control, its own ETag, Last-Modified,
//! Date, CORS).

use std::time::Instant;

use bytes::Bytes;
use cache_proxy::{key_hash, ObjectMeta, Store, StoreOptions};
use hyper::header::HeaderValue;
use rand::{Rng, SeedableRng};

fn tile_key(i: u64) -> String {
    let z = 4 + (i % 15);
    format!("tile:src{}/{z}/{}/{}", i % 3, i, i / 7)
}

fn lognormal(rng: &mut impl Rng, median: f64, sigma: f64) -> usize {
    // Box-Muller.
    let u1: f64 = rng.gen_range(1e-12..1.0);
    let u2: f64 = rng.gen();
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (median * (sigma * z).exp()) as usize
}

#[test]
#[ignore = "benchmark: writes ~3 GB"]
fn million_tiles_disk_ratio() {
    let n: u64 = std::env::var("MILLION_TILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir_in(std::env::var("MILLION_DIR").unwrap_or_else(|_| "/tmp".into()))
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let colours: Vec<Bytes> = (0..8u8)
        .map(|c| {
            let len = 100 + c as usize * 30;
            let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
            v.resize(len, c);
            Bytes::from(v)
        })
        .collect();
    let sync = std::env::var("MILLION_SYNC").is_ok_and(|v| v == "1");
    let t0 = Instant::now();
    let (payload, stats) = rt.block_on(async {
        let s = Store::open(
            dir.path(),
            StoreOptions {
                sync,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let mut payload = 0u64;
        let mut pending = Vec::new();
        for i in 0..n {
            let r: f64 = rng.gen();
            let (ct, body) = if r < 0.65 {
                if rng.gen::<f64>() < 0.30 {
                    ("image/png", colours[rng.gen_range(0..8)].clone())
                } else {
                    let len = lognormal(&mut rng, 5000.0, 0.6).clamp(300, 200_000);
                    let mut v = vec![0u8; len];
                    rng.fill(&mut v[..]);
                    ("image/png", Bytes::from(v))
                }
            } else if rng.gen::<f64>() < 0.8 {
                let mut v = vec![0u8; rng.gen_range(60..160)];
                rng.fill(&mut v[..]);
                ("application/vnd.mapbox-vector-tile", Bytes::from(v))
            } else {
                let len = lognormal(&mut rng, 3500.0, 0.6).clamp(200, 100_000);
                let mut v = vec![0u8; len];
                rng.fill(&mut v[..]);
                ("application/vnd.mapbox-vector-tile", Bytes::from(v))
            };
            payload += body.len() as u64;
            let mut meta = ObjectMeta {
                status: 200,
                headers: hyper::HeaderMap::new(),
                request_time: 1_700_000_000 + i / 100,
                response_time: 1_700_000_000 + i / 100,
                pinned: false,
            };
            let h = &mut meta.headers;
            h.insert("content-type", HeaderValue::from_static(ct));
            h.insert(
                "cache-control",
                HeaderValue::from_static("max-age=604800, stale-while-revalidate=86400"),
            );
            h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
            h.insert(
                "etag",
                HeaderValue::from_str(&format!("\"{:016x}\"", rng.gen::<u64>())).unwrap(),
            );
            h.insert(
                "last-modified",
                HeaderValue::from_static("Mon, 01 Jan 2024 00:00:00 GMT"),
            );
            h.insert(
                "date",
                HeaderValue::from_str(&httpdate::fmt_http_date(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000 + i / 100),
                ))
                .unwrap(),
            );
            let key = tile_key(i);
            let s2 = s.clone();
            pending.push(tokio::spawn(async move {
                s2.put(key_hash(&key), meta, body).await
            }));
            if pending.len() >= 512 {
                for p in pending.drain(..) {
                    p.await.unwrap().unwrap();
                }
            }
            if i % 100_000 == 0 && i > 0 {
                eprintln!("{i} tiles, {:.0} s", t0.elapsed().as_secs_f64());
            }
        }
        for p in pending.drain(..) {
            p.await.unwrap().unwrap();
        }
        s.flush().await.unwrap();
        let stats = s.stats();
        drop(s);
        (payload, stats)
    });
    let write_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "writes: {n} tiles in {write_s:.1} s = {:.0} puts/s, {:.0} MB/s of payload (sync {sync})",
        n as f64 / write_s,
        payload as f64 / write_s / 1e6
    );
    // Let the writer thread close the index, then measure everything in
    // the directory (packs, index, WAL, lock file).
    std::thread::sleep(std::time::Duration::from_secs(3));
    let packs = Store::disk_usage(&dir.path().join("packs"));
    let index = Store::disk_usage(&dir.path().join("index"));
    let disk = Store::disk_usage(dir.path());
    eprintln!(
        "{n} tiles: payload {payload} B (mean {} B), stored unique {} B, packs {packs} B, index {index} B \
         ({:.0} B/object), disk/payload = {:.3} (packs {:.3}, index {:.3}), store footprint {} B",
        payload / n,
        stats.stored_bytes,
        index as f64 / n as f64,
        disk as f64 / payload as f64,
        packs as f64 / payload as f64,
        index as f64 / payload as f64,
        stats.disk_bytes,
    );
    assert_eq!(stats.objects, n);

    // Reopen, then read.
    rt.block_on(async {
        let t = Instant::now();
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let open = t.elapsed();
        assert_eq!(s.stats().objects, n);
        eprintln!("open: {:.1} ms for {n} objects", open.as_secs_f64() * 1e3);
        let samples = 200_000.min(n as usize * 2);
        let mut pick = rand::rngs::StdRng::seed_from_u64(7);
        let keys: Vec<_> = (0..samples)
            .map(|_| key_hash(&tile_key(pick.gen_range(0..n))))
            .collect();
        // Random keys over the whole store (the index and the packs, from
        // the page cache), then a small hot set read over and over (from
        // the hot cache after its first round).
        let hot: Vec<_> = keys.iter().take(5_000).copied().collect();
        let hot_rounds: Vec<_> = (0..40).flat_map(|_| hot.iter().copied()).collect();
        for (label, keys) in [
            ("random keys: index + pack", &keys),
            ("5000 hot keys x 40: hot cache", &hot_rounds),
        ] {
            let mut lat = Vec::with_capacity(keys.len());
            let t = Instant::now();
            for k in keys.iter() {
                let t = Instant::now();
                let o = s.get(k).unwrap();
                lat.push(t.elapsed().as_nanos() as u64);
                assert!(o.is_some());
            }
            let total = t.elapsed();
            lat.sort_unstable();
            let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1e3;
            eprintln!(
                "get ({label}): {} gets, {:.0}/s on one thread, p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs",
                lat.len(),
                lat.len() as f64 / total.as_secs_f64(),
                q(0.50),
                q(0.99),
                q(0.999),
                q(1.0)
            );
        }
        let t = Instant::now();
        let mut listed = 0u64;
        s.for_each_key(|_| listed += 1);
        assert_eq!(listed, n);
        eprintln!(
            "for_each_key (what a mesh digest reads): {:.0} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        let t = Instant::now();
        let r = s.check(false).await.unwrap();
        eprintln!("check: {:.1} s, {r:?}", t.elapsed().as_secs_f64());
        assert_eq!(r.refs_fixed + r.dangling_removed + r.orphans_removed, 0);
        assert!(!r.counters_fixed);
    });
    assert!(
        disk as f64 <= 1.10 * payload as f64,
        "disk/payload {:.3}",
        disk as f64 / payload as f64
    );
}
