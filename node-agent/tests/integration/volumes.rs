//! Volumes with real agents on loopback: replication, incremental updates,
//! kill -9 mid-transfer, scrub repair, re-protection.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use hyper::Method;
use node_agent::volumes::VolumeStatus;
use rand::{Rng, RngCore, SeedableRng};

const MIB: usize = 1 << 20;

/// A fleet whose racks snapshot every second, optionally rate-limited.
fn fleet(racks: &str, link_bytes_per_s: u64) -> Fleet {
    let f = Fleet::init(racks, &[]);
    for r in racks.split(',') {
        let p = f.config(r);
        let mut text = std::fs::read_to_string(&p).unwrap();
        text = text.replace(
            "[volumes]\nreplication_factor = 2\nsnapshot_interval_s = 2",
            "[volumes]\nreplication_factor = 2\nsnapshot_interval_s = 1",
        );
        text = text.replace(
            "link_bytes_per_s = 0",
            &format!("link_bytes_per_s = {link_bytes_per_s}"),
        );
        // The tests write their images at the fleet directory's top.
        text = text.replace(
            "import_dirs = []",
            &format!("import_dirs = [{:?}]", f.dir.path().display().to_string()),
        );
        std::fs::write(&p, text).unwrap();
    }
    f
}

fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    for block in v.chunks_mut(64 * 1024) {
        if rng.gen_bool(0.8) {
            rng.fill_bytes(block);
        }
    }
    v
}

async fn volumes(fleet: &Fleet, rack: &str) -> Vec<VolumeStatus> {
    status(&fleet.client(rack))
        .await
        .map(|s| s.volumes)
        .unwrap_or_default()
}

fn export(fleet: &Fleet, rack: &str, name: &str, generation: Option<u64>) -> Vec<u8> {
    let out = fleet
        .dir
        .path()
        .join(format!("export-{rack}-{name}-{generation:?}.img"));
    let mut args = vec!["volume", "export", name, "--to", out.to_str().unwrap()];
    let g = generation.map(|g| g.to_string());
    if let Some(g) = &g {
        args.extend(["--generation", g]);
    }
    cli(fleet, rack, &args);
    std::fs::read(out).unwrap()
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_is_bit_identical_and_small_changes_move_little() {
    let fleet = fleet("a,b", 0);
    let _a = fleet.start("a");
    let _b = fleet.start("b");
    wait_until(Duration::from_secs(10), "mesh", || {
        all_see(&fleet, &["a", "b"], "alive")
    })
    .await;
    let mut data = image(16 * MIB, 1);
    let src = write_file(fleet.dir.path(), "src.img", &data);
    cli(
        &fleet,
        "a",
        &["volume", "import", "db", "--from", src.to_str().unwrap()],
    );
    let g1 = generation_on(&fleet, "a", "db").await.unwrap();
    wait_until(Duration::from_secs(20), "b holds the volume", || async {
        generation_on(&fleet, "b", "db").await >= Some(g1)
    })
    .await;
    assert_eq!(
        export(&fleet, "b", "db", Some(g1)),
        data,
        "replica exports bit-identical"
    );
    let v = volumes(&fleet, "a")
        .await
        .into_iter()
        .find(|v| v.name == "db")
        .unwrap();
    assert_eq!(v.owner.as_deref(), Some("a"));
    assert_eq!(v.replicas.len(), 1);
    assert_eq!(v.replicas[0].rack, "b");
    let b_view = volumes(&fleet, "b")
        .await
        .into_iter()
        .find(|v| v.name == "db")
        .unwrap();
    assert_eq!(b_view.owner.as_deref(), Some("a"));

    // The appliance writes 1 % of the 4 KiB blocks of its live image.
    let image_path = v.image.clone().expect("owner reports the live image");
    let sent_before = metric(&fleet.client("a"), "fieldrack_replication_sent_bytes_total").await;
    let blocks = data.len() / 4096;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut changed = std::collections::HashSet::new();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image_path)
            .unwrap();
        while changed.len() < blocks / 100 {
            let blk = rng.gen_range(0..blocks);
            if changed.insert(blk) {
                rng.fill_bytes(&mut data[blk * 4096..(blk + 1) * 4096]);
                f.seek(SeekFrom::Start((blk * 4096) as u64)).unwrap();
                f.write_all(&data[blk * 4096..(blk + 1) * 4096]).unwrap();
            }
        }
        f.sync_all().unwrap();
    }
    let out = cli(&fleet, "a", &["volume", "snapshot", "db"]);
    let g2: u64 = out.trim().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(g2 > g1);
    wait_until(Duration::from_secs(20), "b catches up", || async {
        generation_on(&fleet, "b", "db").await >= Some(g2)
    })
    .await;
    let sent =
        metric(&fleet.client("a"), "fieldrack_replication_sent_bytes_total").await - sent_before;
    let changed_bytes = (changed.len() * 4096) as f64;
    eprintln!("1% of 4 KiB blocks changed ({changed_bytes} bytes): {sent} bytes sent");
    // the manifest travels too (33 bytes per 64 KiB chunk); allow 50 % overhead
    assert!(
        sent < changed_bytes * 1.5 + 16_384.0,
        "sent {sent} for {changed_bytes} changed bytes"
    );
    assert_eq!(export(&fleet, "b", "db", Some(g2)), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_transfer_keeps_the_last_generation_and_resumes() {
    // 4 MB/s: a 32 MiB volume takes ~8 s to replicate, long enough to kill.
    let fleet = fleet("a,b", 4_000_000);
    let _a = fleet.start("a");
    let mut b = fleet.start("b");
    wait_until(Duration::from_secs(10), "mesh", || {
        all_see(&fleet, &["a", "b"], "alive")
    })
    .await;
    let small = image(2 * MIB, 2);
    let src = write_file(fleet.dir.path(), "small.img", &small);
    cli(
        &fleet,
        "a",
        &["volume", "import", "vm", "--from", src.to_str().unwrap()],
    );
    let g1 = generation_on(&fleet, "a", "vm").await.unwrap();
    wait_until(
        Duration::from_secs(20),
        "first generation replicated",
        || async { generation_on(&fleet, "b", "vm").await >= Some(g1) },
    )
    .await;

    // A big new generation; kill the receiver mid-way.
    let big = image(32 * MIB, 3);
    let src = write_file(fleet.dir.path(), "big.img", &big);
    cli(
        &fleet,
        "a",
        &["volume", "import", "vm", "--from", src.to_str().unwrap()],
    );
    let g2 = generation_on(&fleet, "a", "vm").await.unwrap();
    // Kill the receiver once it has received 6 MiB of the ~25 MiB of the new
    // generation: ~5 s of transfer still to go at 4 MB/s, so a slow metrics
    // answer on a loaded machine cannot let it finish before the kill.
    let recv0 = metric(
        &fleet.client("b"),
        "fieldrack_replication_received_bytes_total",
    )
    .await;
    let t0 = std::time::Instant::now();
    let received = loop {
        let r = metric(
            &fleet.client("b"),
            "fieldrack_replication_received_bytes_total",
        )
        .await
            - recv0;
        if r > 6.0 * MIB as f64 {
            break r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "transfer never got under way"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // What b holds completely just before the kill: g1, or a later
    // snapshot of the small image taken between the two imports (the
    // snapshot loop runs every second), never the big one.
    let before = generation_on(&fleet, "b", "vm").await.unwrap();
    assert!(before < g2, "the big generation arrived before the kill");
    b.sigkill();
    let mut b = fleet.start("b");
    wait_until(Duration::from_secs(10), "b back", || async {
        status(&fleet.client("b")).await.is_some()
    })
    .await;
    // The restarted agent lists its volumes once its store is open.
    wait_until(Duration::from_secs(10), "b lists vm", || async {
        generation_on(&fleet, "b", "vm").await.is_some()
    })
    .await;
    let held = generation_on(&fleet, "b", "vm").await.unwrap();
    assert!(
        held >= before && held < g2,
        "after kill -9 (at {received} bytes received) the replica still serves its last complete generation: held {held}, before the kill {before}, the big one {g2}"
    );
    assert_eq!(export(&fleet, "b", "vm", Some(held)), small);
    wait_until(
        Duration::from_secs(40),
        "resumed transfer completes",
        || async { generation_on(&fleet, "b", "vm").await >= Some(g2) },
    )
    .await;
    // The restarted receiver's counter starts at zero: it counts exactly what
    // the resumed transfer brought (the sender's doomed first attempt keeps
    // writing into the dead connection for a while, so its count would not).
    let resent = metric(
        &fleet.client("b"),
        "fieldrack_replication_received_bytes_total",
    )
    .await;
    let payload = big
        .chunks(64 * 1024)
        .filter(|c| c.iter().any(|x| *x != 0))
        .count() as f64
        * 65536.0;
    eprintln!("receiver killed after receiving {received} of {payload} bytes; the resumed transfer sent {resent}");
    // What arrived is durable within 0.5 s (2 MB at this rate): never resent.
    assert!(
        resent < payload - received + 3.0 * MIB as f64,
        "resumption resent finished chunks: {resent}"
    );
    assert_eq!(export(&fleet, "b", "vm", None), big);

    // Now kill the sender mid-transfer of a third generation.
    let big3 = image(32 * MIB, 4);
    let src = write_file(fleet.dir.path(), "big3.img", &big3);
    cli(
        &fleet,
        "a",
        &["volume", "import", "vm", "--from", src.to_str().unwrap()],
    );
    let g3 = generation_on(&fleet, "a", "vm").await.unwrap();
    let sent0 = metric(&fleet.client("a"), "fieldrack_replication_sent_bytes_total").await;
    wait_until(
        Duration::from_secs(20),
        "third transfer under way",
        || async {
            metric(&fleet.client("a"), "fieldrack_replication_sent_bytes_total").await - sent0
                > 8.0 * MIB as f64
        },
    )
    .await;
    drop(_a); // SIGKILL
    let held = generation_on(&fleet, "b", "vm").await.unwrap();
    assert!(
        held < g3,
        "nothing of the interrupted generation is published"
    );
    assert_eq!(
        export(&fleet, "b", "vm", None),
        big,
        "the replica still serves the previous complete generation"
    );
    let _a = fleet.start("a");
    wait_until(
        Duration::from_secs(60),
        "transfer completes after the sender's restart",
        || async { generation_on(&fleet, "b", "vm").await >= Some(g3) },
    )
    .await;
    assert_eq!(export(&fleet, "b", "vm", None), big3);
    b.sigkill();
}

fn pack_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "pack") {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_detects_a_corrupt_chunk_and_repairs_it_from_another_rack() {
    let fleet = fleet("a,b", 0);
    let _a = fleet.start("a");
    let mut b = fleet.start("b");
    wait_until(Duration::from_secs(10), "mesh", || {
        all_see(&fleet, &["a", "b"], "alive")
    })
    .await;
    let data = image(4 * MIB, 5);
    let src = write_file(fleet.dir.path(), "src.img", &data);
    cli(
        &fleet,
        "a",
        &["volume", "import", "doc", "--from", src.to_str().unwrap()],
    );
    let g = generation_on(&fleet, "a", "doc").await.unwrap();
    wait_until(Duration::from_secs(20), "replicated", || async {
        generation_on(&fleet, "b", "doc").await >= Some(g)
    })
    .await;
    // Flip a byte inside b's pack files (the chunk data, on disk).
    b.sigkill();
    let packs = pack_files(&fleet.dir.path().join("b/data/volumes"));
    assert!(!packs.is_empty(), "b stores chunks in pack files");
    let biggest = packs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(biggest).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(biggest, bytes).unwrap();
    let _b = fleet.start("b");
    wait_until(Duration::from_secs(10), "mesh again", || {
        all_see(&fleet, &["a", "b"], "alive")
    })
    .await;
    let (code, body) = fleet
        .client("b")
        .request(Method::POST, "/api/v1/volumes/scrub", None)
        .await
        .unwrap();
    assert_eq!(code, 200);
    let r: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        r["corrupt"].as_u64().unwrap() >= 1,
        "scrub found the corruption: {r}"
    );
    assert_eq!(
        r["repaired"], r["corrupt"],
        "every corrupt chunk repaired from a: {r}"
    );
    assert_eq!(export(&fleet, "b", "doc", None), data);
    assert!(metric(&fleet.client("b"), "fieldrack_scrub_repairs_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_replica_rack_is_replaced_without_an_operator() {
    let fleet = fleet("a,b,c", 0);
    let _a = fleet.start("a");
    let mut b = fleet.start("b");
    let mut c = fleet.start("c");
    wait_until(Duration::from_secs(10), "mesh", || {
        all_see(&fleet, &["a", "b", "c"], "alive")
    })
    .await;
    let data = image(4 * MIB, 6);
    let src = write_file(fleet.dir.path(), "src.img", &data);
    cli(
        &fleet,
        "a",
        &["volume", "import", "voip", "--from", src.to_str().unwrap()],
    );
    let g = generation_on(&fleet, "a", "voip").await.unwrap();
    let first = wait_for_replica(&fleet, g).await;
    let other = if first == "b" { "c" } else { "b" };
    if first == "b" {
        b.sigkill()
    } else {
        c.sigkill()
    }
    let took = wait_until(
        Duration::from_secs(30),
        "re-protected on the other rack",
        || async { generation_on(&fleet, other, "voip").await >= Some(g) },
    )
    .await;
    eprintln!("re-protection after {first} died: {took:?}");
    let v = volumes(&fleet, "a")
        .await
        .into_iter()
        .find(|v| v.name == "voip")
        .unwrap();
    assert_eq!(
        v.replicas
            .iter()
            .map(|r| r.rack.as_str())
            .collect::<Vec<_>>(),
        vec![other]
    );
    assert_eq!(export(&fleet, other, "voip", None), data);
}

async fn wait_for_replica(fleet: &Fleet, g: u64) -> String {
    let t0 = std::time::Instant::now();
    loop {
        for r in ["b", "c"] {
            if generation_on(fleet, r, "voip").await >= Some(g) {
                return r.to_string();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no replica within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `fieldrack volume import` on `rack`, off the test's runtime, failing the
/// test if it has not answered within 10 s (an import blocked on a FIFO
/// used to hang, holding the volume lock).
async fn import_answers_at_once(fleet: &Fleet, rack: &str, name: &str, from: &Path) -> String {
    let (config, from) = (fleet.config(rack), from.to_owned());
    let name = name.to_string();
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(["volume", "import", &name, "--from"])
                .arg(&from)
                .arg("--config")
                .arg(&config)
                .output()
                .unwrap()
        }),
    )
    .await
    .expect("the import answered within 10 s")
    .unwrap();
    assert!(!out.status.success(), "refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_refuse_fifos_and_files_outside_the_import_directories_at_once() {
    let fleet = Fleet::init("a", &[]);
    let p = fleet.config("a");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("snapshot_interval_s = 2", "snapshot_interval_s = 1");
    std::fs::write(&p, text).unwrap();
    let _a = fleet.start("a");
    wait_until(Duration::from_secs(10), "a up", || async {
        status(&fleet.client("a")).await.is_some()
    })
    .await;
    let import_dir = fleet.dir.path().join("a/data/import");
    assert!(import_dir.is_dir(), "the agent made its import directory");
    // A volume that snapshots while the refused imports are tried.
    let ok = write_file(&import_dir, "ok.img", &image(MIB, 1));
    cli(
        &fleet,
        "a",
        &["volume", "import", "steady", "--from", ok.to_str().unwrap()],
    );

    let fifo = import_dir.join("fifo.img");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let err = import_answers_at_once(&fleet, "a", "x", &fifo).await;
    assert!(err.contains("is a FIFO, not a regular file"), "{err}");

    let err = import_answers_at_once(&fleet, "a", "x", Path::new("/etc/passwd")).await;
    assert!(err.contains("outside the import directories"), "{err}");

    let odd = write_file(&import_dir, "odd.img", &[1u8; 1000]);
    let err = import_answers_at_once(&fleet, "a", "x", &odd).await;
    assert!(err.contains("not a multiple of 512"), "{err}");

    // The API itself refuses a relative path and a symlink (the CLI would
    // resolve both before asking).
    let client = fleet.client("a");
    let post = |from: serde_json::Value| {
        let client = &client;
        async move {
            let body = serde_json::to_vec(&serde_json::json!({ "from": from })).unwrap();
            let (_, body) = client
                .request(Method::POST, "/api/v1/volumes/x/import", Some(body))
                .await
                .unwrap();
            String::from_utf8_lossy(&body).into_owned()
        }
    };
    let body = post(serde_json::json!("ok.img")).await;
    assert!(body.contains("not an absolute path"), "{body}");
    let link = import_dir.join("link.img");
    std::os::unix::fs::symlink(&ok, &link).unwrap();
    let body = post(serde_json::json!(link)).await;
    assert!(body.contains("is a symbolic link"), "{body}");

    // The other volume keeps snapshotting.
    let g0 = generation_on(&fleet, "a", "steady").await.unwrap();
    let live = fleet.dir.path().join("a/data/volumes/volumes/steady.img");
    std::fs::write(&live, image(MIB, 2)).unwrap();
    wait_until(Duration::from_secs(10), "a new snapshot", || async {
        generation_on(&fleet, "a", "steady").await > Some(g0)
    })
    .await;
    assert!(volumes(&fleet, "a").await.iter().all(|v| v.name != "x"));

    // Exports are private to the agent's user.
    use std::os::unix::fs::PermissionsExt;
    let out = fleet.dir.path().join("steady-export.img");
    cli(
        &fleet,
        "a",
        &["volume", "export", "steady", "--to", out.to_str().unwrap()],
    );
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
}
