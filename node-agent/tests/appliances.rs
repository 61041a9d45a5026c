//! Appliances on real agents on loopback: deploy a tier-0 recorder, SIGKILL
//! its rack, and check it runs again on a survivor from the replicated
//! volume (an unbroken prefix of its records), never twice at once.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{status, wait_until, Agent, Fleet, BIN};
use field_tests::appliance::{check_records, check_witness, recorder_manifest};
use node_agent::supervisor::ApplianceStatus;

/// Racks that snapshot every second.
fn fleet(racks: &str) -> Fleet {
    fleet_with(racks, &[])
}

fn fleet_with(racks: &str, extra: &[&str]) -> Fleet {
    let f = Fleet::init(racks, extra);
    for r in racks.split(',') {
        let p = f.config(r);
        let text = std::fs::read_to_string(&p).unwrap().replace(
            "[volumes]\nreplication_factor = 2\nsnapshot_interval_s = 10",
            "[volumes]\nreplication_factor = 2\nsnapshot_interval_s = 1",
        );
        std::fs::write(&p, text).unwrap();
    }
    f
}

fn cli(fleet: &Fleet, rack: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(fleet.config(rack))
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn app(fleet: &Fleet, rack: &str, name: &str) -> Option<ApplianceStatus> {
    status(&fleet.client(rack))
        .await?
        .appliances
        .into_iter()
        .find(|a| a.name == name)
}

async fn voters(fleet: &Fleet, rack: &str) -> usize {
    status(&fleet.client(rack))
        .await
        .and_then(|s| s.control)
        .filter(|c| c.leader.is_some())
        .map_or(0, |c| c.voters.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_racks_appliance_restarts_on_a_survivor_from_its_replica() {
    let racks = ["a", "b", "c"];
    let f = fleet("a,b,c");
    let mut agents: Vec<(&str, Agent)> = racks.iter().map(|r| (*r, f.start(r))).collect();
    wait_until(
        Duration::from_secs(30),
        "a control plane of 3 voters",
        || async { voters(&f, "a").await == 3 && voters(&f, "c").await == 3 },
    )
    .await;

    // A bad manifest is refused with the field named, before anything runs.
    let bad = f.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[appliance]]\nname = \"x\"\ndriver = \"process\"\ncommand = [\"true\"]\ntier = 9\n",
    )
    .unwrap();
    let (ok, out) = cli(&f, "a", &["app", "deploy", bad.to_str().unwrap()]);
    assert!(!ok && out.contains("tier"), "{out}");

    let witness = f.dir.path().join("witness.log");
    let manifest = f.dir.path().join("registry.toml");
    std::fs::write(&manifest, recorder_manifest("registry", 0, &witness)).unwrap();
    let (ok, out) = cli(&f, "b", &["app", "deploy", manifest.to_str().unwrap()]);
    assert!(ok, "{out}");

    wait_until(Duration::from_secs(30), "registry running", || async {
        app(&f, "a", "registry")
            .await
            .is_some_and(|a| a.state == "running")
    })
    .await;
    let owner = app(&f, "a", "registry").await.unwrap().owner.unwrap();
    let (ok, listing) = cli(&f, "c", &["app", "list"]);
    assert!(
        ok && listing.contains("registry") && listing.contains(&owner),
        "{listing}"
    );

    // Let it write and replicate for a while.
    let survivors: Vec<&str> = racks.iter().copied().filter(|r| *r != owner).collect();
    wait_until(
        Duration::from_secs(30),
        "a replica of registry-data",
        || async {
            let Some(s) = status(&f.client(&owner)).await else {
                return false;
            };
            s.volumes.iter().any(|v| {
                v.name == "registry-data"
                    && v.replicas.iter().any(|r| r.generation.unwrap_or(0) >= 3)
            })
        },
    )
    .await;

    let killed_at = Instant::now();
    let (_, victim) = agents.iter_mut().find(|(r, _)| *r == owner).unwrap();
    victim.sigkill();
    let epoch_before = app(&f, survivors[0], "registry").await.unwrap().epoch;
    let took = wait_until(
        Duration::from_secs(60),
        "registry running on a survivor",
        || async {
            app(&f, survivors[0], "registry").await.is_some_and(|a| {
                a.state == "running"
                    && a.epoch > epoch_before
                    && a.owner.as_deref().is_some_and(|o| o != owner)
            })
        },
    )
    .await;
    let new_owner = app(&f, survivors[0], "registry")
        .await
        .unwrap()
        .owner
        .unwrap();
    println!(
        "SIGKILL of {owner} → registry running on {new_owner}: {:.1} s",
        took.as_secs_f64()
    );
    assert!(survivors.contains(&new_owner.as_str()));
    let _ = killed_at;

    // Let the new copy write, then check the restored volume.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = status(&f.client(&new_owner)).await.unwrap();
    let image = s
        .volumes
        .iter()
        .find(|v| v.name == "registry-data")
        .and_then(|v| v.image.clone())
        .expect("the new owner holds the live image");
    let records = check_records(std::path::Path::new(&image)).unwrap();
    let runs = check_witness(&witness).unwrap();
    println!("records: {} in epochs {:?}", records.count, records.epochs);
    assert!(
        records.epochs.len() >= 2,
        "old and new epochs both present: {records:?}"
    );
    let (first_epoch, &(_, last_old, _)) = records.epochs.iter().next().unwrap();
    let old = &runs[first_epoch];
    let lost = old.records.saturating_sub(last_old + 1);
    println!("written by the first owner: {}, restored: {}, lost since the last replicated snapshot: {lost}", old.records, last_old + 1);
    // Snapshots every second, 50 records a second: at most a few seconds lost.
    assert!(lost < 50 * 15, "lost {lost} records");

    // The promoted copy is the new primary, replicated to a second rack.
    wait_until(
        Duration::from_secs(60),
        "a new second copy of registry-data",
        || async {
            let Some(s) = status(&f.client(&new_owner)).await else {
                return false;
            };
            s.volumes.iter().any(|v| {
                v.name == "registry-data"
                    && v.replicas
                        .iter()
                        .any(|r| r.rack != owner && r.generation.is_some())
            })
        },
    )
    .await;

    // Events: the failover is recorded with its timings.
    let (ok, ev) = cli(&f, &new_owner, &["events"]);
    assert!(ok && ev.contains("failover"), "{ev}");

    // A planned move loses nothing: every record written before it is on
    // the target.
    let target = survivors.iter().copied().find(|r| *r != new_owner).unwrap();
    let (ok, out) = cli(&f, target, &["app", "move", "registry", "--to", target]);
    assert!(ok, "{out}");
    wait_until(Duration::from_secs(60), "registry moved", || async {
        app(&f, &new_owner, "registry")
            .await
            .is_some_and(|a| a.state == "running" && a.owner.as_deref() == Some(target))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = status(&f.client(target)).await.unwrap();
    let image = s
        .volumes
        .iter()
        .find(|v| v.name == "registry-data")
        .and_then(|v| v.image.clone())
        .unwrap();
    let records = check_records(std::path::Path::new(&image)).unwrap();
    let runs = check_witness(&witness).unwrap();
    let moved_epoch = *records.epochs.keys().last().unwrap();
    let before = records.epochs.range(..moved_epoch).next_back().unwrap();
    assert_eq!(
        before.1 .1 + 1,
        records.epochs[&moved_epoch].0,
        "the move continues right after the last record"
    );
    assert_eq!(
        runs[before.0].records,
        before.1 .1 - before.1 .0 + 1,
        "every record of epoch {} is on {target}",
        before.0
    );
    drop(agents);
}

/// A QEMU appliance through the whole path: placed, booted (TCG or KVM;
/// an empty disk never gets past the firmware, which is enough), stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_appliance_runs_and_stops() {
    let path = std::env::var("PATH").unwrap_or_default();
    if node_agent::drivers::find_in_path("qemu-system-x86_64", &path).is_none() {
        panic!("qemu-system-x86_64 is missing: run ./scripts/setup (package qemu-system-x86)");
    }
    let f = fleet("a");
    let _agent = f.start("a");
    wait_until(
        Duration::from_secs(30),
        "a control plane of one",
        || async { voters(&f, "a").await == 1 },
    )
    .await;
    let manifest = f.dir.path().join("vm.toml");
    std::fs::write(
        &manifest,
        "[[appliance]]\nname = \"vm\"\ndriver = \"qemu\"\ntier = 1\nmemory_mb = 64\n[[appliance.volume]]\nname = \"vm-disk\"\nsize = \"16M\"\n",
    )
    .unwrap();
    let (ok, out) = cli(&f, "a", &["app", "deploy", manifest.to_str().unwrap()]);
    assert!(ok, "{out}");
    wait_until(Duration::from_secs(60), "vm running", || async {
        app(&f, "a", "vm")
            .await
            .is_some_and(|a| a.state == "running")
    })
    .await;
    let qemu_running = || {
        Command::new("pgrep")
            .args(["-f", "qemu-system-x86_64.*drive-vm-disk"])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(qemu_running(), "a qemu process with the vm's disk");

    // Snapshots of a running VM's disk are point-in-time copies made by
    // QEMU (drive-backup over QMP): new bytes on the disk reach a new
    // generation while the VM runs.
    let gen_of = || async {
        status(&f.client("a"))
            .await
            .and_then(|s| s.volumes.into_iter().find(|v| v.name == "vm-disk"))
    };
    let vol = gen_of().await.expect("vm-disk on a");
    let image = vol.image.clone().expect("live image");
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        file.write_all_at(&[0x5a; 4096], 8192).unwrap();
    }
    let before = vol.generation;
    wait_until(
        Duration::from_secs(30),
        "a new generation of vm-disk",
        || async { gen_of().await.is_some_and(|v| v.generation > before) },
    )
    .await;
    let out_img = f.dir.path().join("vm-disk.out");
    let (ok, out) = cli(
        &f,
        "a",
        &[
            "volume",
            "export",
            "vm-disk",
            "--to",
            out_img.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    let data = std::fs::read(&out_img).unwrap();
    assert_eq!(&data[8192..8192 + 4096], &[0x5a; 4096][..]);
    let log = std::fs::read_to_string(f.dir.path().join("a.log")).unwrap();
    assert!(
        log.contains("captured through QMP"),
        "snapshots went through QEMU"
    );
    let (ok, out) = cli(&f, "a", &["app", "stop", "vm"]);
    assert!(ok, "{out}");
    wait_until(Duration::from_secs(30), "vm stopped", || async {
        app(&f, "a", "vm")
            .await
            .is_some_and(|a| a.state == "stopped")
            && !qemu_running()
    })
    .await;
}

/// Two racks and a witness fail over like three racks: the witness votes
/// (so the survivor keeps a majority) but never runs the appliance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_racks_and_a_witness_fail_over() {
    let f = fleet_with("a,b", &["--witness", "w"]);
    let mut agents: Vec<(&str, Agent)> = ["a", "b", "w"].iter().map(|r| (*r, f.start(r))).collect();
    wait_until(
        Duration::from_secs(30),
        "a control plane of 3 voters",
        || async { voters(&f, "a").await == 3 && voters(&f, "w").await == 3 },
    )
    .await;
    let witness = f.dir.path().join("witness.log");
    let manifest = f.dir.path().join("radio.toml");
    std::fs::write(&manifest, recorder_manifest("radio", 0, &witness)).unwrap();
    let (ok, out) = cli(&f, "w", &["app", "deploy", manifest.to_str().unwrap()]);
    assert!(ok, "{out}");
    wait_until(Duration::from_secs(30), "radio running", || async {
        app(&f, "w", "radio")
            .await
            .is_some_and(|a| a.state == "running")
    })
    .await;
    let first = app(&f, "w", "radio").await.unwrap();
    let owner = first.owner.clone().unwrap();
    assert_ne!(owner, "w", "a witness never runs appliances");
    let other = if owner == "a" { "b" } else { "a" };
    tokio::time::sleep(Duration::from_secs(3)).await;
    agents
        .iter_mut()
        .find(|(r, _)| *r == owner)
        .unwrap()
        .1
        .sigkill();
    let took = wait_until(
        Duration::from_secs(60),
        "radio running on the other rack",
        || async {
            app(&f, "w", "radio").await.is_some_and(|a| {
                a.state == "running" && a.owner.as_deref() == Some(other) && a.epoch > first.epoch
            })
        },
    )
    .await;
    println!(
        "two racks + witness: SIGKILL of {owner} → radio running on {other}: {:.1} s",
        took.as_secs_f64()
    );
    check_witness(&witness).unwrap();
}
