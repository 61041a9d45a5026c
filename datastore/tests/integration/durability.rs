//! Crash consistency: a child process (this test binary, re-run with an
//! environment variable) inserts and syncs chunks, publishes manifests,
//! snapshots a live image and prunes, and is SIGKILLed at random moments.
//! After every kill the store must open, and everything the child had been
//! told was durable must be there and verify.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use datastore::{
    ChunkId, ChunkStoreOptions, Manifest, NoPause, VolumeStore, VolumeStoreOptions, CHUNK_SIZE,
};
use rand::{Rng, RngCore, SeedableRng};

const CHILD_ENV: &str = "DATASTORE_CRASH_CHILD_DIR";
const SEED_ENV: &str = "DATASTORE_CRASH_CHILD_SEED";
const KILLS: usize = 20;
const KEEP: usize = 2;
const CS: usize = CHUNK_SIZE as usize;

fn options() -> VolumeStoreOptions {
    // Small packs so that rotation and compaction happen within a test.
    VolumeStoreOptions {
        chunks: ChunkStoreOptions {
            pack_target: 512 << 10,
            ..ChunkStoreOptions::default()
        },
        reflink: Some(false),
    }
}

/// The child's work loop; it never returns (it is killed).
fn child(dir: &Path, seed: u64) -> ! {
    let store = VolumeStore::open_with(dir.join("store"), options()).expect("child: open");
    let mut journal = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("journal"))
        .unwrap();
    let mut log = |line: String| {
        // Written only after the operation returned. A SIGKILL leaves the
        // page cache intact, so a line that was written survives it.
        journal.write_all(format!("{line}\n").as_bytes()).unwrap();
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let popular: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i + 1; CS]).collect();
    if !store.owns("own").unwrap() {
        if store.info("own").is_ok() {
            store.delete("own").unwrap();
        }
        store.create("own", 2 << 20).unwrap();
    }
    let image = std::fs::OpenOptions::new()
        .write(true)
        .open(store.image_path("own"))
        .unwrap();
    for i in 0u64.. {
        // A replica-style generation: chunks arrive, are synced, then the
        // manifest is published.
        let volume = format!("v{}", i % 3);
        let n = rng.gen_range(1..24);
        let mut chunks = Vec::with_capacity(n);
        let mut synced = Vec::new();
        let uncached = i % 2 == 1;
        for _ in 0..n {
            let data = match rng.gen_range(0..10) {
                0..=1 => None,
                2..=4 => Some(popular[rng.gen_range(0..popular.len())].clone()),
                _ => {
                    let mut d = vec![0u8; CS];
                    rng.fill_bytes(&mut d);
                    Some(d)
                }
            };
            chunks.push(data.map(|d| {
                let id = ChunkId::of(&d);
                // Half the generations arrive as a replica stores a push
                // (direct writes), half through the page cache.
                if uncached {
                    store.chunks().insert_verified_uncached(&id, &d).unwrap();
                } else {
                    store.chunks().insert_verified(&id, &d).unwrap();
                }
                synced.push(id);
                id
            }));
        }
        // Garbage nobody references, sometimes never synced.
        let mut junk = vec![0u8; 20_000];
        rng.fill_bytes(&mut junk);
        store.chunks().insert(&junk).unwrap();
        if uncached {
            store.chunks().sync_uncached().unwrap();
        } else {
            store.chunks().sync().unwrap();
        }
        for id in synced {
            log(format!("synced {id}"));
        }
        let generation = store.latest(&volume).unwrap().map_or(0, |m| m.generation) + 1;
        let m = Manifest {
            volume: volume.clone(),
            generation,
            size: (n * CS) as u64,
            chunk_size: CHUNK_SIZE,
            chunks,
            created_at_ms: i,
        };
        let id = m.id();
        store.publish(m).unwrap();
        log(format!("published {volume} {generation} {id}"));

        // An owner-style generation: the live image changes, a snapshot.
        for _ in 0..rng.gen_range(1..6) {
            let mut block = [0u8; 4096];
            rng.fill_bytes(&mut block);
            image
                .write_all_at(&block, rng.gen_range(0..512u64) * 4096)
                .unwrap();
        }
        let m = store.snapshot("own", &NoPause, &mut |_, _| {}).unwrap();
        log(format!("published own {} {}", m.generation, m.id()));

        if i % 2 == 1 {
            log("prune-start".into());
            store.prune(KEEP).unwrap();
            log("prune-done".into());
        }
        let _ = store.chunks().insert(&junk[..1000]);
    }
    unreachable!()
}

#[test]
fn crash_child() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        let seed = std::env::var(SEED_ENV)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        child(Path::new(&dir), seed);
    }
}

/// Check everything the journal says was durable.
fn verify(dir: &Path, kill: usize) {
    let store = VolumeStore::open_with(dir.join("store"), options())
        .unwrap_or_else(|e| panic!("kill {kill}: store does not open: {e}"));
    let journal = std::fs::read_to_string(dir.join("journal")).unwrap_or_default();
    // A line cut by the kill has no newline: it was never fully recorded.
    let complete = match journal.rfind('\n') {
        Some(i) => &journal[..=i],
        None => "",
    };
    let lines: Vec<&str> = complete.lines().collect();
    let last_prune = lines.iter().rposition(|l| *l == "prune-start");

    // Every held manifest is complete and every chunk verifies.
    let mut held: HashMap<String, Vec<Manifest>> = HashMap::new();
    for v in store.list().unwrap() {
        let ms = store.manifests(&v.name).unwrap();
        assert_eq!(
            ms.iter().map(|m| m.generation).collect::<Vec<_>>(),
            v.generations_held
        );
        for m in &ms {
            for id in m.chunks.iter().flatten() {
                let data = store.chunks().read(id).unwrap_or_else(|e| {
                    panic!("kill {kill}: {} gen {}: {e}", m.volume, m.generation)
                });
                let data = data.unwrap_or_else(|| {
                    panic!(
                        "kill {kill}: {} gen {} lacks chunk {id}",
                        m.volume, m.generation
                    )
                });
                assert_eq!(ChunkId::of(&data), *id);
            }
        }
        held.insert(v.name.clone(), ms);
    }

    for (n, line) in lines.iter().enumerate() {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts.as_slice() {
            ["synced", id] if last_prune.is_none_or(|p| n > p) => {
                let id: ChunkId = id.parse().unwrap();
                assert!(
                    store.chunks().contains(&id).unwrap(),
                    "kill {kill}: synced chunk {id} lost"
                );
                assert!(store.chunks().read(&id).unwrap().is_some());
            }
            ["published", vol, generation, id] => {
                let generation: u64 = generation.parse().unwrap();
                let ms = held
                    .get(*vol)
                    .unwrap_or_else(|| panic!("kill {kill}: volume {vol} lost"));
                let newest = ms.last().map_or(0, |m| m.generation);
                assert!(
                    newest >= generation,
                    "kill {kill}: {vol} went back from {generation} to {newest}"
                );
                let pruned_since = last_prune.is_some_and(|p| p > n);
                let must_hold = !pruned_since || generation + KEEP as u64 > newest;
                if must_hold {
                    let m = ms
                        .iter()
                        .find(|m| m.generation == generation)
                        .unwrap_or_else(|| {
                            panic!("kill {kill}: {vol} generation {generation} lost")
                        });
                    assert_eq!(
                        m.id().to_string(),
                        *id,
                        "kill {kill}: {vol} generation {generation} changed"
                    );
                }
            }
            _ => {}
        }
    }
    // The pack records are committed atomically with the index entries.
    let stats = store.chunks().stats().unwrap();
    assert_eq!(
        stats.chunks,
        store.chunks().ids().unwrap().len() as u64,
        "kill {kill}: stats drifted"
    );
}

#[test]
fn sigkill_at_random_moments_loses_nothing_durable() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xfeed);
    let mut journal_lines = 0;
    // DATASTORE_CRASH_KILLS=500 for a longer soak.
    let kills = std::env::var("DATASTORE_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(KILLS);
    for kill in 0..kills {
        let stderr = std::fs::File::create(dir.path().join("child.stderr")).unwrap();
        let mut child = Command::new(&exe)
            .args([
                "durability::crash_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .env(SEED_ENV, kill.to_string())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(60..450)));
        if let Some(status) = child.try_wait().unwrap() {
            let err = std::fs::read_to_string(dir.path().join("child.stderr")).unwrap_or_default();
            panic!("kill {kill}: child exited by itself ({status}): {err}");
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        verify(dir.path(), kill);
        let now = std::fs::read_to_string(dir.path().join("journal"))
            .unwrap_or_default()
            .lines()
            .count();
        journal_lines = journal_lines.max(now);
    }
    let journal = std::fs::read_to_string(dir.path().join("journal")).unwrap_or_default();
    let prunes = journal.lines().filter(|l| *l == "prune-done").count();
    let publishes = journal
        .lines()
        .filter(|l| l.starts_with("published"))
        .count();
    let store = VolumeStore::open_with(dir.path().join("store"), options()).unwrap();
    eprintln!(
        "{kills} kills: {publishes} publishes, {prunes} prunes, final {:?}",
        store.chunks().stats().unwrap()
    );
    assert!(
        journal_lines > kills * 3,
        "the child made too little progress to test anything ({journal_lines} journal lines)"
    );
}
