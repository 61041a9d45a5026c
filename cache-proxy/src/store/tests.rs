use std::sync::atomic::AtomicU64;

use hyper::header::{HeaderValue, CONTENT_TYPE, ETAG};

use super::*;

fn meta(etag: &str) -> ObjectMeta {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("image/png"));
    headers.insert(ETAG, HeaderValue::from_str(etag).unwrap());
    ObjectMeta {
        status: 200,
        headers,
        request_time: 1_700_000_000,
        response_time: 1_700_000_001,
        pinned: false,
    }
}

fn clocked(max_bytes: u64) -> (StoreOptions, Arc<AtomicU64>) {
    let now = Arc::new(AtomicU64::new(1_700_000_000));
    let n = now.clone();
    let opts = StoreOptions {
        max_bytes,
        pack_target_bytes: 64 * 1024,
        clock: Arc::new(move || n.load(Ordering::Relaxed)),
        ..StoreOptions::default()
    };
    (opts, now)
}

/// A side connection to the index, as an operator with `sqlite3` would
/// have (used to damage it on purpose).
fn side_db(dir: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(index::db_path(dir)).unwrap();
    c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    c
}

/// `check` finds nothing to repair.
async fn assert_consistent(s: &Store) {
    let r = s.check(true).await.unwrap();
    assert_eq!(
        (
            r.refs_fixed,
            r.header_refs_fixed,
            r.dangling_removed,
            r.orphans_removed,
            r.corrupt_bodies,
            r.counters_fixed
        ),
        (0, 0, 0, 0, 0, false),
        "{r:?}"
    );
    assert_eq!(r.objects, s.stats().objects);
}

/// Flushes until the background work (eviction, incremental compaction)
/// has brought the footprint under `cap`, or 5 s pass.
async fn settle(s: &Store, cap: u64) {
    for _ in 0..100 {
        s.flush().await.unwrap();
        if s.stats().disk_bytes <= cap {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn round_trip_dedup_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, _) = clocked(u64::MAX);
    {
        let s = Store::open(dir.path(), opts.clone()).unwrap();
        let white = Bytes::from(vec![0xffu8; 300]);
        for i in 0..50 {
            s.put(
                key_hash(&format!("k{i}")),
                meta(&format!("\"{i}\"")),
                white.clone(),
            )
            .await
            .unwrap();
        }
        s.put(
            key_hash("other"),
            meta("\"o\""),
            Bytes::from_static(b"hello"),
        )
        .await
        .unwrap();
        let st = s.stats();
        assert_eq!(st.objects, 51);
        assert_eq!(st.logical_bytes, 50 * 300 + 5);
        assert_eq!(st.stored_bytes, 305, "identical bodies stored once");
        let o = s.get(&key_hash("k7")).unwrap().unwrap();
        assert_eq!(o.body, white);
        assert_eq!(o.meta.headers.get(ETAG).unwrap(), "\"7\"");
        assert_eq!(o.meta, meta("\"7\""));
        assert!(s.get(&key_hash("nope")).unwrap().is_none());
        // Replace one: the shared body keeps its other references.
        s.put(key_hash("k7"), meta("\"x\""), Bytes::from_static(b"new"))
            .await
            .unwrap();
        // k7 was in the hot cache: the put invalidated it.
        assert_eq!(&s.get(&key_hash("k7")).unwrap().unwrap().body[..], b"new");
        assert_eq!(s.stats().stored_bytes, 308);
        s.remove(key_hash("other")).await.unwrap();
        assert_eq!(s.stats().stored_bytes, 303);
        assert_eq!(s.stats().objects, 50);
        assert_consistent(&s).await;
    }
    // The writer thread finishes after the last handle drops; open waits
    // for its directory lock.
    let s = Store::open(dir.path(), opts).unwrap();
    assert_eq!(s.stats().objects, 50);
    assert_eq!(s.stats().stored_bytes, 303);
    assert_eq!(s.stats().logical_bytes, 49 * 300 + 3);
    assert_eq!(&s.get(&key_hash("k7")).unwrap().unwrap().body[..], b"new");
    assert_eq!(s.get(&key_hash("k8")).unwrap().unwrap().body.len(), 300);
    assert_consistent(&s).await;
}

#[tokio::test]
async fn eviction_is_lru_above_cap_only_and_spares_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let body = |i: u32| Bytes::from(vec![(i % 251) as u8; 1000 - (i as usize % 7)]);
    let (opts, now) = clocked(u64::MAX);
    // 20 objects of ~1000 bytes; the cap is what they take on disk (index
    // included) plus half an object.
    let cap = {
        let s = Store::open(dir.path(), opts.clone()).unwrap();
        for i in 0..20u32 {
            let mut m = meta("\"e\"");
            m.pinned = i < 3;
            s.put(key_hash(&format!("k{i}")), m, body(i)).await.unwrap();
            now.fetch_add(600, Ordering::Relaxed);
        }
        s.flush().await.unwrap();
        s.stats().disk_bytes + 500
    };
    let s = Store::open(
        dir.path(),
        StoreOptions {
            max_bytes: cap,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(s.stats().objects, 20);
    assert_eq!(s.stats().evicted, 0, "nothing evicted below the cap");
    // Unused for a year: still nothing evicted.
    now.fetch_add(365 * 86_400, Ordering::Relaxed);
    s.flush().await.unwrap();
    assert_eq!(s.stats().evicted, 0);
    // Touch the oldest unpinned ones so they become the most recent.
    for i in 3..8 {
        assert!(s.get(&key_hash(&format!("k{i}"))).unwrap().is_some());
    }
    now.fetch_add(600, Ordering::Relaxed);
    // 10 more objects: about 10 evictions needed, and the 12 untouched old
    // ones are the least recently used.
    for i in 100..110u32 {
        s.put(key_hash(&format!("k{i}")), meta("\"n\""), body(i))
            .await
            .unwrap();
        now.fetch_add(60, Ordering::Relaxed);
    }
    settle(&s, cap).await;
    let st = s.stats();
    assert!(st.disk_bytes <= cap, "{st:?} cap {cap}");
    assert!(st.evicted >= 9, "{st:?}");
    for i in 0..3 {
        assert!(
            s.get(&key_hash(&format!("k{i}"))).unwrap().is_some(),
            "pinned k{i} evicted"
        );
    }
    // Approximate LRU: the untouched old ones (k8..k19) go first; the
    // recently touched k3..k7 and the new ones (nearly) all survive.
    let old_left = (8..20)
        .filter(|i| s.contains(&key_hash(&format!("k{i}"))))
        .count();
    let touched_left = (3..8)
        .filter(|i| s.contains(&key_hash(&format!("k{i}"))))
        .count();
    let new_left = (100..110)
        .filter(|i| s.contains(&key_hash(&format!("k{i}"))))
        .count();
    assert!(
        old_left <= 4,
        "old survivors {old_left} {:?} cap {cap}",
        s.stats()
    );
    assert!(touched_left >= 4, "touched survivors {touched_left}");
    assert!(new_left >= 8, "new survivors {new_left}");
    assert_consistent(&s).await;
}

#[tokio::test]
async fn footprint_stays_under_the_cap_with_churn() {
    // Replacing objects with new bodies leaves dead records in the packs;
    // they count against the cap and are compacted away, and eviction
    // makes room for the rest.
    let dir = tempfile::tempdir().unwrap();
    let cap = 300_000;
    let (opts, now) = clocked(cap);
    // Durability is not the point here; fsyncs would make it slow.
    let s = Store::open(
        dir.path(),
        StoreOptions {
            sync: false,
            ..opts
        },
    )
    .unwrap();
    for round in 0..6u32 {
        for i in 0..100u32 {
            let b = Bytes::from(format!("{round}-{i:>3000}").into_bytes());
            s.put(key_hash(&format!("k{i}")), meta("\"c\""), b)
                .await
                .unwrap();
            now.fetch_add(61, Ordering::Relaxed);
        }
    }
    settle(&s, cap).await;
    let st = s.stats();
    assert!(st.disk_bytes <= cap, "{st:?}");
    assert!(st.compactions > 0, "{st:?}");
    assert!(st.evicted > 0, "{st:?}");
    let packs = Store::disk_usage(&dir.path().join("packs"));
    assert!(packs <= cap, "packs take {packs} B");
    // The survivors are the latest versions, intact.
    let mut left = 0;
    for i in 0..100u32 {
        if let Some(o) = s.get(&key_hash(&format!("k{i}"))).unwrap() {
            assert_eq!(o.body, Bytes::from(format!("5-{i:>3000}").into_bytes()));
            left += 1;
        }
    }
    assert!(left >= 50, "only {left} survivors");
    assert_consistent(&s).await;
}

#[tokio::test]
async fn corrupt_body_is_a_miss_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, _) = clocked(u64::MAX);
    let s = Store::open(dir.path(), opts).unwrap();
    s.put(key_hash("a"), meta("\"a\""), Bytes::from(vec![7u8; 5000]))
        .await
        .unwrap();
    s.put(key_hash("b"), meta("\"b\""), Bytes::from(vec![9u8; 5000]))
        .await
        .unwrap();
    // Flip a byte in the middle of a's body on disk.
    let pack = std::fs::read_dir(dir.path().join("packs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let pos = PACK_MAGIC.len() + RECORD_HEADER + 2500;
    bytes[pos] ^= 0xff;
    std::fs::write(&pack, &bytes).unwrap();
    assert!(s.get(&key_hash("a")).unwrap().is_none());
    assert_eq!(s.stats().corrupt_reads, 1);
    assert_eq!(s.get(&key_hash("b")).unwrap().unwrap().body.len(), 5000);
    s.flush().await.unwrap();
    assert!(!s.contains(&key_hash("a")), "corrupt object dropped");
    assert_consistent(&s).await;
}

#[tokio::test]
async fn corrupt_shared_body_is_dropped_then_healed_by_the_next_put() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, _) = clocked(u64::MAX);
    let s = Store::open(dir.path(), opts).unwrap();
    let white = Bytes::from(vec![0xffu8; 4000]);
    for i in 0..3 {
        s.put(key_hash(&format!("w{i}")), meta("\"w\""), white.clone())
            .await
            .unwrap();
    }
    let pack = std::fs::read_dir(dir.path().join("packs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[PACK_MAGIC.len() + RECORD_HEADER + 100] ^= 1;
    std::fs::write(&pack, &bytes).unwrap();
    assert!(s.get(&key_hash("w0")).unwrap().is_none());
    s.flush().await.unwrap();
    // The body is marked bad: a new put of the same bytes rewrites them
    // instead of pointing at the bad copy.
    s.put(key_hash("w3"), meta("\"w\""), white.clone())
        .await
        .unwrap();
    assert_eq!(s.get(&key_hash("w3")).unwrap().unwrap().body, white);
    // The other keys that shared it now read the healed copy.
    assert_eq!(s.get(&key_hash("w1")).unwrap().unwrap().body, white);
    assert_eq!(s.stats().stored_bytes, 4000);
    assert_consistent(&s).await;
}

#[tokio::test]
async fn compaction_reclaims_space_and_keeps_live_objects() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, _) = clocked(u64::MAX);
    let s = Store::open(dir.path(), opts.clone()).unwrap();
    for i in 0..200u32 {
        let b = Bytes::from(format!("{i:>2000}").into_bytes());
        s.put(key_hash(&format!("k{i}")), meta("\"c\""), b)
            .await
            .unwrap();
    }
    let before = Store::disk_usage(&dir.path().join("packs"));
    for i in 0..200u32 {
        if i % 4 != 0 {
            s.remove(key_hash(&format!("k{i}"))).await.unwrap();
        }
    }
    s.flush().await.unwrap();
    s.flush().await.unwrap();
    let after = Store::disk_usage(&dir.path().join("packs"));
    assert!(s.stats().compactions > 0);
    assert!(after < before / 2, "{after} vs {before}");
    for i in (0..200u32).step_by(4) {
        let o = s.get(&key_hash(&format!("k{i}"))).unwrap().unwrap();
        assert_eq!(o.body, Bytes::from(format!("{i:>2000}").into_bytes()));
    }
    assert_consistent(&s).await;
    drop(s);
    // Persisted per-pack live bytes and counters agree after a reopen.
    let s = Store::open(dir.path(), opts).unwrap();
    assert_eq!(s.stats().objects, 50);
    assert_consistent(&s).await;
}

#[tokio::test]
async fn update_meta_and_pin() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, _) = clocked(u64::MAX);
    let s = Store::open(dir.path(), opts).unwrap();
    let k = key_hash("t");
    s.put(k, meta("\"1\""), Bytes::from_static(b"body"))
        .await
        .unwrap();
    assert_eq!(s.get(&k).unwrap().unwrap().meta, meta("\"1\""));
    let mut m = meta("\"2\"");
    m.response_time += 100;
    m.headers
        .insert("x-extra", HeaderValue::from_static("changes the block"));
    s.update_meta(k, m.clone()).await.unwrap();
    let o = s.get(&k).unwrap().unwrap();
    assert_eq!(o.meta, m);
    assert_eq!(&o.body[..], b"body");
    s.set_pinned(k, true).await.unwrap();
    assert!(s.get_meta(&k).unwrap().unwrap().pinned);
    s.set_pinned(k, false).await.unwrap();
    assert!(!s.get_meta(&k).unwrap().unwrap().pinned);
    assert!(matches!(
        s.update_meta(key_hash("missing"), m.clone()).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        s.set_pinned(key_hash("missing"), true).await,
        Err(StoreError::NotFound)
    ));
    s.set_vary(&k, &["accept-encoding".to_string()]).unwrap();
    assert_eq!(s.vary_fields(&k).unwrap(), vec!["accept-encoding"]);
    assert_consistent(&s).await;
}

#[tokio::test]
async fn vary_lists_are_written_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, _) = clocked(u64::MAX);
    let (a, b) = (key_hash("a"), key_hash("b"));
    {
        let s = Store::open(dir.path(), opts.clone()).unwrap();
        s.set_vary(&a, &["accept".into(), "accept-language".into()])
            .unwrap();
        s.set_vary(&b, &["accept".into()]).unwrap();
        s.flush().await.unwrap();
        s.set_vary(&b, &[]).unwrap();
        assert_eq!(s.vary_fields(&b), None);
    }
    let s = Store::open(dir.path(), opts).unwrap();
    assert_eq!(
        s.vary_fields(&a).unwrap(),
        vec!["accept", "accept-language"]
    );
    assert_eq!(s.vary_fields(&b), None);
}

#[tokio::test]
async fn check_repairs_counts_a_crash_or_a_bug_left_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, _) = clocked(u64::MAX);
    let s = Store::open(dir.path(), opts.clone()).unwrap();
    let white = Bytes::from(vec![0xffu8; 300]);
    for i in 0..10 {
        s.put(key_hash(&format!("k{i}")), meta("\"w\""), white.clone())
            .await
            .unwrap();
    }
    s.put(key_hash("x"), meta("\"x\""), Bytes::from_static(b"unique"))
        .await
        .unwrap();
    let stats = s.stats();
    {
        // Damage: a reference count one too high (what the sled index could
        // be left with after a crash), a header count off, a row pointing
        // at no body, and wrong persisted counters.
        let db = side_db(dir.path());
        db.execute_batch(
            "UPDATE blob SET refs = refs + 1;
             UPDATE hdr SET refs = 99;
             UPDATE meta SET v = v + 5 WHERE k = 'objects';
             UPDATE pack SET live = live + 7;",
        )
        .unwrap();
        db.execute(
            "INSERT INTO obj(key, body, hdr, atime, flags, rec) SELECT ?1, ?2, hdr, atime, flags, rec FROM obj LIMIT 1",
            rusqlite::params![&[9u8; 16][..], &[8u8; 16][..]],
        )
        .unwrap();
    }
    let r = s.check(false).await.unwrap();
    assert_eq!(r.refs_fixed, 2, "{r:?}");
    assert_eq!(r.header_refs_fixed, 1, "{r:?}");
    assert_eq!(r.dangling_removed, 1, "{r:?}");
    assert!(r.counters_fixed, "{r:?}");
    assert_eq!(r.objects, 11);
    let now = s.stats();
    assert_eq!(
        (now.objects, now.logical_bytes, now.stored_bytes),
        (stats.objects, stats.logical_bytes, stats.stored_bytes)
    );
    drop(s);
    let s = Store::open(dir.path(), opts).unwrap();
    assert_eq!(s.stats().objects, 11, "repaired counters persisted");
    assert_consistent(&s).await;
    // Counts right again: removing everything frees everything.
    for i in 0..10 {
        s.remove(key_hash(&format!("k{i}"))).await.unwrap();
    }
    s.remove(key_hash("x")).await.unwrap();
    assert_eq!(s.stats().stored_bytes, 0);
    let db = side_db(dir.path());
    let n: i64 = db
        .query_row(
            "SELECT (SELECT count(*) FROM blob) + (SELECT count(*) FROM hdr)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn check_with_verification_drops_objects_of_bad_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, _) = clocked(u64::MAX);
    let s = Store::open(dir.path(), opts).unwrap();
    s.put(key_hash("a"), meta("\"a\""), Bytes::from(vec![1u8; 3000]))
        .await
        .unwrap();
    s.put(key_hash("a2"), meta("\"a\""), Bytes::from(vec![1u8; 3000]))
        .await
        .unwrap();
    s.put(key_hash("b"), meta("\"b\""), Bytes::from(vec![2u8; 3000]))
        .await
        .unwrap();
    let pack = std::fs::read_dir(dir.path().join("packs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[PACK_MAGIC.len() + RECORD_HEADER + 10] ^= 1;
    std::fs::write(&pack, &bytes).unwrap();
    let r = s.check(true).await.unwrap();
    assert_eq!(r.corrupt_bodies, 1, "{r:?}");
    assert_eq!(r.bodies_verified, 2, "{r:?}");
    assert_eq!(r.dangling_removed, 2, "{r:?}");
    assert!(!s.contains(&key_hash("a")) && !s.contains(&key_hash("a2")));
    assert_eq!(s.stats().objects, 1);
    assert_eq!(s.stats().stored_bytes, 3000);
    assert_consistent(&s).await;
}

#[tokio::test]
async fn a_sled_index_is_discarded_with_its_packs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("index/blobs")).unwrap();
    std::fs::create_dir_all(dir.path().join("packs")).unwrap();
    std::fs::write(dir.path().join("index/conf"), b"segment_size: 524288\n").unwrap();
    std::fs::write(dir.path().join("index/db"), vec![0u8; 4096]).unwrap();
    std::fs::write(dir.path().join("packs/00000001.pack"), PACK_MAGIC).unwrap();
    let (opts, _) = clocked(u64::MAX);
    let s = Store::open(dir.path(), opts).unwrap();
    assert_eq!(s.stats().objects, 0);
    assert!(!dir.path().join("index/conf").exists());
    assert!(!dir.path().join("index/blobs").exists());
    assert!(!dir.path().join("packs/00000001.pack").exists());
    s.put(key_hash("k"), meta("\"k\""), Bytes::from_static(b"v"))
        .await
        .unwrap();
    assert!(s.contains(&key_hash("k")));
}

#[tokio::test]
async fn a_missing_pack_means_misses_not_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, _) = clocked(u64::MAX);
    {
        let s = Store::open(dir.path(), opts.clone()).unwrap();
        s.put(key_hash("k"), meta("\"k\""), Bytes::from(vec![5u8; 100]))
            .await
            .unwrap();
    }
    for e in std::fs::read_dir(dir.path().join("packs"))
        .unwrap()
        .flatten()
    {
        std::fs::remove_file(e.path()).unwrap();
    }
    let s = Store::open(dir.path(), opts).unwrap();
    assert!(s.get(&key_hash("k")).unwrap().is_none());
    s.flush().await.unwrap();
    assert!(!s.contains(&key_hash("k")));
    assert_eq!(s.stats().objects, 0);
    assert_consistent(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_version_older_than_an_acknowledged_put() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, _) = clocked(u64::MAX);
    let s = Store::open(
        dir.path(),
        StoreOptions {
            sync: false,
            ..opts
        },
    )
    .unwrap();
    let k = key_hash("v");
    let version = |v: u32| Bytes::from(format!("{v:>600}").into_bytes());
    let parse = |b: &Bytes| {
        std::str::from_utf8(b)
            .unwrap()
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    s.put(k, meta("\"v\""), version(0)).await.unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (s, acked, stop) = (s.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut last = 0;
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let floor = acked.load(Ordering::SeqCst) as u32;
                    let o = s.get(&k).unwrap().expect("always stored");
                    let v = parse(&o.body);
                    assert!(
                        v >= floor,
                        "read version {v} after version {floor} was acknowledged"
                    );
                    assert!(v >= last, "went back from {last} to {v}");
                    last = v;
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for v in 1..=300u32 {
        s.put(k, meta("\"v\""), version(v)).await.unwrap();
        acked.store(u64::from(v), Ordering::SeqCst);
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    assert_eq!(parse(&s.get(&k).unwrap().unwrap().body), 300);
}

#[tokio::test]
async fn a_torn_pack_tail_is_harmless_and_compacted_away() {
    // What a crash mid-append leaves: a partial record after the last
    // indexed one. Nothing points at it; compaction scanning the pack
    // stops there.
    let dir = tempfile::tempdir().unwrap();
    let (opts, _) = clocked(u64::MAX);
    let body = |i: u32| Bytes::from(format!("{i:>1500}").into_bytes());
    {
        let s = Store::open(dir.path(), opts.clone()).unwrap();
        for i in 0..20u32 {
            s.put(key_hash(&format!("k{i}")), meta("\"t\""), body(i))
                .await
                .unwrap();
        }
    }
    let pack = std::fs::read_dir(dir.path().join("packs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .next()
        .unwrap();
    let mut torn = RECORD_MAGIC.to_vec();
    torn.extend_from_slice(&5000u32.to_le_bytes());
    torn.extend_from_slice(&[3u8; 40]);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&pack)
        .unwrap();
    std::io::Write::write_all(&mut f, &torn).unwrap();
    drop(f);
    let s = Store::open(dir.path(), opts).unwrap();
    assert_eq!(s.stats().objects, 20);
    for i in 0..20u32 {
        if i % 3 != 0 {
            s.remove(key_hash(&format!("k{i}"))).await.unwrap();
        }
    }
    s.flush().await.unwrap();
    assert!(s.stats().compactions >= 1, "{:?}", s.stats());
    assert!(!pack.exists(), "the torn pack was compacted away");
    for i in (0..20u32).step_by(3) {
        assert_eq!(
            s.get(&key_hash(&format!("k{i}"))).unwrap().unwrap().body,
            body(i)
        );
    }
    assert_consistent(&s).await;
}
