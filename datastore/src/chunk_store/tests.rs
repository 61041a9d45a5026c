use super::*;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, HashSet};

fn small_opts() -> ChunkStoreOptions {
    ChunkStoreOptions {
        pack_target: 64 << 10,
        max_pending_bytes: u64::MAX,
        index_cache_bytes: 1 << 20,
    }
}

/// A [`LiveSet`] of `ids` for `s`.
fn live_of(s: &ChunkStore, ids: &HashSet<ChunkId>) -> LiveSet {
    let mut live = s.live_set();
    live.extend(ids).unwrap();
    live
}

fn random_chunk(rng: &mut impl Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v[0] |= 1; // never all-zero
    v
}

#[test]
fn insert_read_dedup_and_rejections() {
    let dir = tempfile::tempdir().unwrap();
    let s = ChunkStore::open(dir.path()).unwrap();
    let (id, new) = s.insert(b"hello").unwrap();
    assert!(new);
    assert_eq!(id, ChunkId::of(b"hello"));
    assert_eq!(s.insert(b"hello").unwrap(), (id, false));
    assert!(s.contains(&id).unwrap());
    assert_eq!(s.read(&id).unwrap().as_deref(), Some(&b"hello"[..]));
    assert_eq!(s.read(&ChunkId::of(b"nope")).unwrap(), None);
    assert!(matches!(
        s.insert(&[0; 4096]),
        Err(ChunkStoreError::ZeroChunk)
    ));
    assert!(matches!(s.insert(&[]), Err(ChunkStoreError::ZeroChunk)));
    assert!(matches!(
        s.insert(&vec![1; MAX_CHUNK_LEN + 1]),
        Err(ChunkStoreError::TooLarge { .. })
    ));
    match s.insert_verified(&id, b"liar") {
        Err(ChunkStoreError::HashMismatch { expected, actual }) => {
            assert_eq!(expected, id);
            assert_eq!(actual, ChunkId::of(b"liar"));
        }
        other => panic!("{other:?}"),
    }
    assert!(!s.contains(&ChunkId::of(b"liar")).unwrap());
    assert!(s.insert_verified(&ChunkId::of(b"truth"), b"truth").unwrap());
    let st = s.stats().unwrap();
    assert_eq!(st.chunks, 2);
    assert_eq!(st.payload_bytes, 10);
    assert_eq!(st.dedup_hits, 1);
    assert_eq!(
        s.missing(&[id, ChunkId::of(b"x")]).unwrap(),
        vec![ChunkId::of(b"x")]
    );
}

#[test]
fn synced_chunks_survive_reopen_and_unsynced_vanish_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let a = random_chunk(&mut rng, 70_000);
    let b = random_chunk(&mut rng, 70_000);
    let (ia, ib);
    {
        let s = ChunkStore::open(dir.path()).unwrap();
        ia = s.insert(&a).unwrap().0;
        s.sync().unwrap();
        ib = s.insert(&b).unwrap().0;
        // Force b's bytes into the file without indexing them.
        let mut w = lock(&s.w);
        s.flush_buf(&mut w, Flush::All, false).unwrap();
    }
    let s = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(s.read(&ia).unwrap().unwrap(), a);
    assert!(!s.contains(&ib).unwrap());
    // The unsynced tail was truncated.
    let (path, _) = s.location(&ia).unwrap();
    let len = std::fs::metadata(path).unwrap().len();
    assert_eq!(len, PACK_HEADER_LEN + REC_HEADER_LEN + a.len() as u64);
    // Appending continues in the same pack.
    let ib2 = s.insert(&b).unwrap().0;
    s.sync().unwrap();
    drop(s);
    let s = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(s.read(&ib2).unwrap().unwrap(), b);
    assert_eq!(s.stats().unwrap().packs, 1);
}

#[test]
fn a_chunk_split_by_a_partial_write_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = ChunkStore::open(dir.path()).unwrap();
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
    let (id, _) = s.insert(&data).unwrap();
    {
        // What a write cut short by a full disk leaves: the record's
        // first bytes in the file, the rest still buffered.
        let mut w = lock(&s.w);
        // (Past an aligned block, so part of the chunk leaves the buffer.)
        let n = active::ALIGN + 100;
        assert!(n < REC_HEADER_LEN as usize + data.len());
        w.active.write_prefix(n);
        assert_eq!(w.active.buf_start, active::ALIGN as u64);
    }
    assert_eq!(s.read(&id).unwrap().unwrap(), data);
    s.sync().unwrap();
    drop(s);
    let s = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(s.read(&id).unwrap().unwrap(), data);
}

#[test]
fn remove_is_durable_after_sync() {
    let dir = tempfile::tempdir().unwrap();
    let s = ChunkStore::open(dir.path()).unwrap();
    let (id, _) = s.insert(b"abc").unwrap();
    s.sync().unwrap();
    assert!(s.remove(&id).unwrap());
    assert!(!s.remove(&id).unwrap());
    assert!(!s.contains(&id).unwrap());
    s.sync().unwrap();
    drop(s);
    let s = ChunkStore::open(dir.path()).unwrap();
    assert!(!s.contains(&id).unwrap());
    assert_eq!(s.stats().unwrap().chunks, 0);
}

fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn scrub_detects_a_flipped_byte_and_forgets_the_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let s = ChunkStore::open_with(dir.path(), small_opts()).unwrap();
    let chunks: Vec<Vec<u8>> = (0..20).map(|_| random_chunk(&mut rng, 8192)).collect();
    let ids: Vec<ChunkId> = chunks.iter().map(|c| s.insert(c).unwrap().0).collect();
    s.sync().unwrap();
    let victim = ids[7];
    let (path, off) = s.location(&victim).unwrap();
    flip_byte(&path, off + 100);
    let mut calls = 0;
    let report = s
        .scrub(&mut |done, total| {
            calls += 1;
            assert!(done <= total);
        })
        .unwrap();
    assert_eq!(report.checked, 20);
    assert_eq!(report.corrupt, vec![victim]);
    assert_eq!(calls, 20);
    assert!(!s.contains(&victim).unwrap());
    for (c, id) in chunks.iter().zip(&ids) {
        if *id != victim {
            assert_eq!(s.read(id).unwrap().as_ref(), Some(c));
        }
    }
    // Dropping it was durable; a re-fetch stores it again.
    drop(s);
    let s = ChunkStore::open_with(dir.path(), small_opts()).unwrap();
    assert!(!s.contains(&victim).unwrap());
    assert!(s.insert_verified(&victim, &chunks[7]).unwrap());
    assert_eq!(s.read(&victim).unwrap().unwrap(), chunks[7]);
}

#[test]
fn read_never_returns_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let s = ChunkStore::open(dir.path()).unwrap();
    let (id, _) = s.insert(&[7u8; 5000]).unwrap();
    s.sync().unwrap();
    let (path, off) = s.location(&id).unwrap();
    flip_byte(&path, off + 4999);
    assert!(matches!(s.read(&id), Err(ChunkStoreError::Corrupt { id: c }) if c == id));
    assert!(!s.contains(&id).unwrap());
    assert_eq!(s.read(&id).unwrap(), None);
}

#[test]
fn unverified_reads_append_the_bytes_and_verify_catches_rot() {
    let dir = tempfile::tempdir().unwrap();
    let s = ChunkStore::open(dir.path()).unwrap();
    let (id, _) = s.insert(&[7u8; 5000]).unwrap();
    // still in the write buffer
    let mut out = b"prefix".to_vec();
    assert!(s.read_unverified_into(&id, &mut out).unwrap());
    assert_eq!((&out[..6], &out[6..]), (&b"prefix"[..], &[7u8; 5000][..]));
    // in the pack file
    s.sync().unwrap();
    let mut out = Vec::new();
    assert!(s.read_unverified_into(&id, &mut out).unwrap());
    assert_eq!(out, vec![7u8; 5000]);
    let mut out = b"keep".to_vec();
    assert!(!s
        .read_unverified_into(&ChunkId::of(b"nope"), &mut out)
        .unwrap());
    assert_eq!(out, b"keep", "a chunk not held leaves the buffer alone");
    assert!(s.verify(&id).unwrap());
    // Bit rot is what an unverified read does not see; verify does, and
    // drops the chunk so nothing reads (or sends) it again.
    let (path, off) = s.location(&id).unwrap();
    flip_byte(&path, off + 10);
    let mut out = Vec::new();
    assert!(s.read_unverified_into(&id, &mut out).unwrap());
    assert_ne!(out, vec![7u8; 5000]);
    assert!(matches!(s.verify(&id), Err(ChunkStoreError::Corrupt { id: c }) if c == id));
    assert!(!s.contains(&id).unwrap());
    assert!(!s.read_unverified_into(&id, &mut Vec::new()).unwrap());
    // A record that is gone is reported as corrupt without hashing.
    let (id2, _) = s.insert(&[9u8; 5000]).unwrap();
    s.sync().unwrap();
    let (path, off) = s.location(&id2).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(off + 10)
        .unwrap();
    let mut out = b"keep".to_vec();
    assert!(matches!(
        s.read_unverified_into(&id2, &mut out),
        Err(ChunkStoreError::Corrupt { .. })
    ));
    assert_eq!(out, b"keep");
}

#[test]
fn uncached_syncs_are_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let chunks: Vec<Vec<u8>> = (0..20).map(|_| random_chunk(&mut rng, 8192)).collect();
    let s = ChunkStore::open_with(dir.path(), small_opts()).unwrap();
    let ids: Vec<ChunkId> = chunks.iter().map(|c| s.insert(c).unwrap().0).collect();
    s.sync_uncached().unwrap(); // several packs sealed and the active one
    for (c, id) in chunks.iter().zip(&ids) {
        assert_eq!(s.read(id).unwrap().as_ref(), Some(c));
    }
    let (later, _) = s.insert(&[5u8; 3000]).unwrap();
    s.sync_uncached().unwrap();
    drop(s);
    let s = ChunkStore::open_with(dir.path(), small_opts()).unwrap();
    for (c, id) in chunks.iter().zip(&ids) {
        assert_eq!(s.read(id).unwrap().as_ref(), Some(c));
    }
    assert_eq!(s.read(&later).unwrap().unwrap(), vec![5u8; 3000]);
}

#[test]
fn truncated_pack_reads_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let s = ChunkStore::open(dir.path()).unwrap();
    let (id, _) = s.insert(&[9u8; 5000]).unwrap();
    s.sync().unwrap();
    let (path, off) = s.location(&id).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(off + 10)
        .unwrap();
    assert!(matches!(s.read(&id), Err(ChunkStoreError::Corrupt { .. })));
    assert!(!s.contains(&id).unwrap());
}

#[test]
fn gc_drops_dead_chunks_and_compaction_keeps_live_ones_readable() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let s = ChunkStore::open_with(dir.path(), small_opts()).unwrap();
    let chunks: Vec<Vec<u8>> = (0..120)
        .map(|i| random_chunk(&mut rng, 3000 + i * 7))
        .collect();
    let ids: Vec<ChunkId> = chunks.iter().map(|c| s.insert(c).unwrap().0).collect();
    s.sync().unwrap();
    let before = s.stats().unwrap();
    assert!(before.packs >= 5, "{before:?}");
    // Keep every third chunk.
    let live: HashSet<ChunkId> = ids.iter().step_by(3).copied().collect();
    let report = s.gc(live_of(&s, &live)).unwrap();
    assert_eq!(report.removed_chunks, 80);
    assert!(report.packs_compacted > 0, "{report:?}");
    assert!(report.packs_deleted > 0, "{report:?}");
    assert!(
        report.disk_bytes_after < report.disk_bytes_before / 2 + 70_000,
        "{report:?}"
    );
    let check = |s: &ChunkStore| {
        for (c, id) in chunks.iter().zip(&ids) {
            if live.contains(id) {
                assert_eq!(s.read(id).unwrap().as_ref(), Some(c));
            } else {
                assert!(!s.contains(id).unwrap());
            }
        }
    };
    check(&s);
    let st = s.stats().unwrap();
    assert_eq!(st.chunks, 40);
    drop(s);
    let s = ChunkStore::open_with(dir.path(), small_opts()).unwrap();
    check(&s);
    assert_eq!(s.stats().unwrap().chunks, 40);
    // A second gc with the same live set has nothing to drop.
    assert_eq!(s.gc(live_of(&s, &live)).unwrap().removed_chunks, 0);
    check(&s);
    // Dropping everything deletes every sealed pack.
    s.gc(s.live_set()).unwrap();
    assert_eq!(s.stats().unwrap().chunks, 0);
    assert!(s.stats().unwrap().packs <= 2);
}

#[test]
fn concurrent_inserts_reads_and_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(ChunkStore::open_with(dir.path(), small_opts()).unwrap());
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + t);
                let mut mine = Vec::new();
                for i in 0..60 {
                    let c = random_chunk(&mut rng, 2000);
                    let (id, _) = s.insert(&c).unwrap();
                    mine.push((id, c));
                    if i % 10 == 0 {
                        s.sync().unwrap();
                    }
                    let (id, c) = &mine[rng.gen_range(0..mine.len())];
                    assert_eq!(s.read(id).unwrap().as_ref(), Some(c));
                }
                s.sync().unwrap();
                mine
            })
        })
        .collect();
    let all: Vec<(ChunkId, Vec<u8>)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    drop(s);
    let s = ChunkStore::open_with(dir.path(), small_opts()).unwrap();
    for (id, c) in &all {
        assert_eq!(s.read(id).unwrap().as_ref(), Some(c));
    }
    assert_eq!(s.stats().unwrap().chunks, all.len() as u64);
}

#[test]
fn unsupported_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(ChunkStore::open(dir.path()).unwrap());
    std::fs::write(dir.path().join("FORMAT"), "fieldrack-chunk-store 99\n").unwrap();
    assert!(matches!(
        ChunkStore::open(dir.path()),
        Err(ChunkStoreError::UnsupportedFormat { .. })
    ));
}

#[test]
fn the_index_can_be_rebuilt_from_the_packs() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let chunks: Vec<Vec<u8>> = (0..60)
        .map(|i| random_chunk(&mut rng, 2000 + i * 50))
        .collect();
    let ids: Vec<ChunkId> = {
        let s = ChunkStore::open_with(dir.path(), small_opts()).unwrap();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| s.insert(c).unwrap().0).collect();
        s.sync().unwrap();
        s.remove(&ids[0]).unwrap();
        s.sync().unwrap();
        let (path, off) = s.location(&ids[10]).unwrap();
        flip_byte(&path, off + 5);
        // Damage a record header too: the scan must find the next record.
        let (path, off) = s.location(&ids[20]).unwrap();
        flip_byte(&path, off - REC_HEADER_LEN);
        ids
    };
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let report = ChunkStore::rebuild_index(dir.path()).unwrap();
    assert!(report.packs >= 2, "{report:?}");
    assert_eq!(report.corrupt_records, 1, "{report:?}");
    assert!(report.skipped_bytes > 0, "{report:?}");
    let s = ChunkStore::open_with(dir.path(), small_opts()).unwrap();
    for (i, (c, id)) in chunks.iter().zip(&ids).enumerate() {
        match i {
            // Removed chunks come back (their bytes were still in a pack):
            // harmless, gc drops them again.
            10 | 20 => assert!(!s.contains(id).unwrap(), "chunk {i}"),
            _ => assert_eq!(s.read(id).unwrap().as_ref(), Some(c), "chunk {i}"),
        }
    }
    assert_eq!(s.stats().unwrap().chunks, 58);
    // And the rebuilt store keeps working.
    let (id, _) = s.insert(b"after").unwrap();
    s.sync().unwrap();
    drop(s);
    let s = ChunkStore::open_with(dir.path(), small_opts()).unwrap();
    assert!(s.contains(&id).unwrap());
}

#[derive(Debug, Clone)]
enum Op {
    Insert(usize),
    /// As a replica inserts (direct writes where the filesystem allows).
    InsertUncached(usize),
    Remove(usize),
    Sync,
    SyncUncached,
    /// Make room in the write buffer (cached or direct).
    Flush(bool),
    Reopen,
    Gc(u8),
    Corrupt(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..8usize).prop_map(Op::Insert),
        3 => (0..8usize).prop_map(Op::InsertUncached),
        2 => (0..8usize).prop_map(Op::Remove),
        2 => Just(Op::Sync),
        2 => Just(Op::SyncUncached),
        2 => any::<bool>().prop_map(Op::Flush),
        2 => Just(Op::Reopen),
        1 => any::<u8>().prop_map(Op::Gc),
        1 => (0..8usize).prop_map(Op::Corrupt),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The store behaves like a map whose synced state survives reopening,
    /// through rotations, gc and compaction, and on-disk corruption.
    #[test]
    fn behaves_like_a_model(seed in any::<u64>(), ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let opts = ChunkStoreOptions { pack_target: 16 << 10, ..small_opts() };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let pool: Vec<Vec<u8>> = (0..8)
            .map(|_| {
                let n = rng.gen_range(1..12_000);
                random_chunk(&mut rng, n)
            })
            .collect();
        let ids: Vec<ChunkId> = pool.iter().map(|c| ChunkId::of(c)).collect();
        let mut s = ChunkStore::open_with(dir.path(), opts.clone()).unwrap();
        let mut current: HashSet<usize> = HashSet::new();
        let mut durable: HashSet<usize> = HashSet::new();
        for op in ops {
            match op {
                Op::Insert(k) => {
                    let (_, new) = s.insert(&pool[k]).unwrap();
                    prop_assert_eq!(new, !current.contains(&k));
                    current.insert(k);
                }
                Op::InsertUncached(k) => {
                    let new = s.insert_verified_uncached(&ids[k], &pool[k]).unwrap();
                    prop_assert_eq!(new, !current.contains(&k));
                    current.insert(k);
                }
                Op::Remove(k) => {
                    prop_assert_eq!(s.remove(&ids[k]).unwrap(), current.remove(&k));
                }
                Op::Sync => { s.sync().unwrap(); durable = current.clone(); }
                Op::SyncUncached => { s.sync_uncached().unwrap(); durable = current.clone(); }
                Op::Flush(uncached) => {
                    let mut w = lock(&s.w);
                    s.flush_buf(&mut w, Flush::Room, uncached).unwrap();
                }
                Op::Reopen => {
                    drop(s);
                    s = ChunkStore::open_with(dir.path(), opts.clone()).unwrap();
                    current = durable.clone();
                }
                Op::Gc(mask) => {
                    let live: HashSet<ChunkId> =
                        (0..8).filter(|k| mask & (1 << k) != 0).map(|k| ids[k]).collect();
                    s.gc(live_of(&s, &live)).unwrap();
                    current.retain(|k| mask & (1 << k) != 0);
                    durable = current.clone();
                }
                Op::Corrupt(k) => {
                    if current.contains(&k) {
                        s.sync().unwrap();
                        let (path, off) = s.location(&ids[k]).unwrap();
                        flip_byte(&path, off);
                        let corrupt =
                            matches!(s.read(&ids[k]), Err(ChunkStoreError::Corrupt { .. }));
                        prop_assert!(corrupt, "corrupt read must fail");
                        current.remove(&k);
                        s.sync().unwrap();
                        durable = current.clone();
                    }
                }
            }
            for k in 0..8 {
                prop_assert_eq!(s.contains(&ids[k]).unwrap(), current.contains(&k), "chunk {}", k);
                if current.contains(&k) {
                    let got = s.read(&ids[k]).unwrap();
                    prop_assert_eq!(got.as_ref(), Some(&pool[k]));
                }
            }
            let st = s.stats().unwrap();
            prop_assert_eq!(st.chunks, current.len() as u64);
            let payload: u64 = current.iter().map(|k| pool[*k].len() as u64).sum();
            prop_assert_eq!(st.payload_bytes, payload);
        }
    }
}

/// Every chunk a store holds with its bytes (sorted by id).
fn contents(s: &ChunkStore) -> Vec<(ChunkId, Vec<u8>)> {
    let mut ids = s.ids().unwrap();
    ids.sort_unstable();
    ids.into_iter()
        .map(|id| (id, s.read(&id).unwrap().unwrap()))
        .collect()
}

/// Build the same store in two directories: `n` random chunks of random
/// lengths (deterministic in `seed`), synced every `sync_every` inserts.
fn twin_stores(seed: u64, n: usize, sync_every: usize) -> [(tempfile::TempDir, ChunkStore); 2] {
    std::array::from_fn(|_| {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open_with(dir.path(), small_opts()).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for i in 0..n {
            let len = rng.gen_range(1..6000);
            s.insert(&random_chunk(&mut rng, len)).unwrap();
            if i % sync_every == 0 {
                s.sync().unwrap();
            }
        }
        s.sync().unwrap();
        (dir, s)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The streaming gc drops, moves and deletes exactly what the
    /// in-memory gc does, on random stores and live sets.
    #[test]
    fn streaming_gc_matches_in_memory_gc(
        seed in any::<u64>(),
        n in 0usize..160,
        sync_every in 1usize..40,
        keep_one_in in 1usize..6,
        rounds in 1usize..3,
    ) {
        let [(_da, a), (_db, b)] = twin_stores(seed, n, sync_every);
        for round in 0..rounds {
            let ids = {
                let mut v = a.ids().unwrap();
                v.sort_unstable();
                v
            };
            let live: HashSet<ChunkId> = ids
                .iter()
                .enumerate()
                .filter(|(i, _)| (i + round) % keep_one_in == 0)
                .map(|(_, id)| *id)
                .collect();
            let streamed = a.gc(live_of(&a, &live)).unwrap();
            let loaded = b.gc_loaded(&live).unwrap();
            prop_assert_eq!(&streamed, &loaded);
            prop_assert_eq!(contents(&a), contents(&b));
            // (sled's own size on disk may differ by a page.)
            let stats = |s: &ChunkStore| ChunkStoreStats { index_bytes: 0, ..s.stats().unwrap() };
            prop_assert_eq!(stats(&a), stats(&b));
        }
    }

    /// The streaming scrub finds the same corrupt chunks as the in-memory
    /// scrub, checking every chunk once.
    #[test]
    fn streaming_scrub_matches_in_memory_scrub(
        seed in any::<u64>(),
        n in 1usize..120,
        corrupt in proptest::collection::vec(any::<proptest::sample::Index>(), 0..4),
    ) {
        let [(_da, a), (_db, b)] = twin_stores(seed, n, 7);
        let ids = a.ids().unwrap();
        // Distinct victims: flipping a byte twice would restore it.
        let victims: BTreeSet<usize> = corrupt.iter().map(|k| k.index(ids.len())).collect();
        for s in [&a, &b] {
            for k in &victims {
                let (path, off) = s.location(&ids[*k]).unwrap();
                flip_byte(&path, off);
            }
        }
        let mut calls = 0;
        let mut streamed = a.scrub(&mut |_, _| calls += 1).unwrap();
        let mut loaded = b.scrub_loaded(&mut |_, _| {}).unwrap();
        prop_assert_eq!(calls, ids.len());
        prop_assert_eq!(streamed.checked, ids.len() as u64);
        streamed.corrupt.sort_unstable();
        loaded.corrupt.sort_unstable();
        let mut want: Vec<ChunkId> = victims.iter().map(|k| ids[*k]).collect();
        want.sort_unstable();
        prop_assert_eq!(&streamed.corrupt, &want);
        prop_assert_eq!(&streamed, &loaded);
        prop_assert_eq!(contents(&a), contents(&b));
    }
}
