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
        assert_eq!(s.stats().stored_bytes, 308);
        s.remove(key_hash("other")).await.unwrap();
        assert_eq!(s.stats().stored_bytes, 303);
        assert_eq!(s.stats().objects, 50);
    }
    // The writer thread flushes and exits when the last handle drops; give
    // it a moment before sled is reopened.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let s = Store::open(dir.path(), opts).unwrap();
    assert_eq!(s.stats().objects, 50);
    assert_eq!(s.stats().stored_bytes, 303);
    assert_eq!(&s.get(&key_hash("k7")).unwrap().unwrap().body[..], b"new");
    assert_eq!(s.get(&key_hash("k8")).unwrap().unwrap().body.len(), 300);
}

#[tokio::test]
async fn eviction_is_lru_above_cap_only_and_spares_pinned() {
    let dir = tempfile::tempdir().unwrap();
    // Cap: 20 objects of 1000 bytes.
    let (opts, now) = clocked(20_000);
    let s = Store::open(dir.path(), opts).unwrap();
    let body = |i: u32| Bytes::from(vec![(i % 251) as u8; 1000 - (i as usize % 7)]);
    for i in 0..20u32 {
        let mut m = meta("\"e\"");
        m.pinned = i < 3;
        s.put(key_hash(&format!("k{i}")), m, body(i)).await.unwrap();
        now.fetch_add(600, Ordering::Relaxed);
    }
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
    // 10 more objects: 10 evictions needed, and the 12 untouched old ones
    // are the least recently used.
    for i in 100..110u32 {
        s.put(key_hash(&format!("k{i}")), meta("\"n\""), body(i))
            .await
            .unwrap();
        now.fetch_add(60, Ordering::Relaxed);
    }
    // Eviction runs after each commit; a flush waits for the last one.
    s.flush().await.unwrap();
    let st = s.stats();
    assert!(st.stored_bytes <= 20_000, "{st:?}");
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
    assert!(old_left <= 4, "old survivors {old_left}");
    assert!(touched_left >= 4, "touched survivors {touched_left}");
    assert!(new_left >= 8, "new survivors {new_left}");
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
}

#[tokio::test]
async fn compaction_reclaims_space_and_keeps_live_objects() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, _) = clocked(u64::MAX);
    let s = Store::open(dir.path(), opts).unwrap();
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
    let mut m = meta("\"2\"");
    m.response_time += 100;
    s.update_meta(k, m.clone()).await.unwrap();
    let o = s.get(&k).unwrap().unwrap();
    assert_eq!(o.meta, m);
    assert_eq!(&o.body[..], b"body");
    s.set_pinned(k, true).await.unwrap();
    assert!(s.get_meta(&k).unwrap().unwrap().pinned);
    assert!(matches!(
        s.update_meta(key_hash("missing"), m).await,
        Err(StoreError::NotFound)
    ));
    s.set_vary(&k, &["accept-encoding".to_string()]).unwrap();
    assert_eq!(s.vary_fields(&k).unwrap(), vec!["accept-encoding"]);
}
