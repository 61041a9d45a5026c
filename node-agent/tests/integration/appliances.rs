//! Appliances on real agents on loopback: deploy a tier-0 recorder, SIGKILL
//! its rack, and check it runs again on a survivor from the replicated
//! volume (an unbroken prefix of its records), never twice at once.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{cli_output, status, wait_until, Agent, Fleet};
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
            "[volumes]\nreplication_factor = 2\nsnapshot_interval_s = 2",
            "[volumes]\nreplication_factor = 2\nsnapshot_interval_s = 1",
        );
        std::fs::write(&p, text).unwrap();
    }
    f
}

fn cli(fleet: &Fleet, rack: &str, args: &[&str]) -> (bool, String) {
    let out = cli_output(fleet, rack, args);
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

/// Wait until `racks` each see a control plane of `n` voters with a leader.
async fn wait_voters(f: &Fleet, racks: &[&str], n: usize) {
    wait_until(
        Duration::from_secs(30),
        &format!("a control plane of {n} voters"),
        || async {
            for r in racks {
                if voters(f, r).await != n {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

/// Deploy a recorder appliance `name` through `via` and wait until it
/// runs; returns its witness log.
async fn deploy_recorder(f: &Fleet, via: &str, name: &str) -> std::path::PathBuf {
    let witness = f.dir.path().join("witness.log");
    let manifest = f.dir.path().join(format!("{name}.toml"));
    std::fs::write(&manifest, recorder_manifest(name, 0, &witness)).unwrap();
    let (ok, out) = cli(f, via, &["app", "deploy", manifest.to_str().unwrap()]);
    assert!(ok, "{out}");
    wait_until(
        Duration::from_secs(30),
        &format!("{name} running"),
        || async {
            app(f, via, name)
                .await
                .is_some_and(|a| a.state == "running")
        },
    )
    .await;
    witness
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_racks_appliance_restarts_on_a_survivor_from_its_replica() {
    let racks = ["a", "b", "c"];
    let f = fleet("a,b,c");
    let mut agents: Vec<(&str, Agent)> = racks.iter().map(|r| (*r, f.start(r))).collect();
    wait_voters(&f, &["a", "c"], 3).await;

    // A bad manifest is refused with the field named, before anything runs.
    let bad = f.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[appliance]]\nname = \"x\"\ndriver = \"process\"\ncommand = [\"true\"]\ntier = 9\n",
    )
    .unwrap();
    let (ok, out) = cli(&f, "a", &["app", "deploy", bad.to_str().unwrap()]);
    assert!(!ok && out.contains("tier"), "{out}");

    let witness = deploy_recorder(&f, "b", "registry").await;
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
    // This fleet's QEMU only (its command line names files under the
    // fleet's directory): other tests run VMs of their own meanwhile.
    let qemu_pattern = format!("qemu-system-x86_64.*{}", f.dir.path().display());
    let qemu_running = || {
        Command::new("pgrep")
            .args(["-f", &qemu_pattern])
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
    // A guest write, through QEMU's block layer (the drive's dirty bitmap
    // sees it; a write behind QEMU's back would not be captured), on the
    // VM's second monitor.
    let socket = find_file(f.dir.path(), node_agent::drivers::qemu::PAUSE_SOCKET)
        .expect("the VM's pause monitor socket");
    let out = node_agent::drivers::qmp::execute_blocking(
        &socket,
        "human-monitor-command",
        serde_json::json!({ "command-line": "qemu-io drive-vm-disk \"write -P 0x5a 8192 4k\"" }),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(out, serde_json::json!(""), "qemu-io: {out}");
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

/// The first file named `name` under `dir`.
fn find_file(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
        if p.is_dir() {
            if let Some(found) = find_file(&p, name) {
                return Some(found);
            }
        }
    }
    None
}

/// Two racks and a witness fail over like three racks: the witness votes
/// (so the survivor keeps a majority) but never runs the appliance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_racks_and_a_witness_fail_over() {
    let f = fleet_with("a,b", &["--witness", "w"]);
    let mut agents: Vec<(&str, Agent)> = ["a", "b", "w"].iter().map(|r| (*r, f.start(r))).collect();
    wait_voters(&f, &["a", "w"], 3).await;
    let witness = deploy_recorder(&f, "w", "radio").await;
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

/// A failover target that holds no replica while the rack holding one
/// cannot take the appliance (an anti-affine neighbour runs there): the
/// target refuses to create the volume empty and reports the appliance
/// `failed`; once the holder can take it, placement moves it there and it
/// runs on its replicated data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appliance_never_starts_on_an_empty_disk_while_a_rack_holds_its_volume() {
    let racks = ["a", "b", "c"];
    let f = fleet("a,b,c");
    let mut agents: Vec<(&str, Agent)> = racks.iter().map(|r| (*r, f.start(r))).collect();
    wait_voters(&f, &["a", "c"], 3).await;
    deploy_recorder(&f, "a", "registry").await;
    let owner = app(&f, "a", "registry").await.unwrap().owner.unwrap();
    let replicated = |s: &node_agent::status::Status| {
        s.volumes
            .iter()
            .filter(|v| v.name == "registry-data")
            .flat_map(|v| v.replicas.iter())
            .find(|r| r.generation.unwrap_or(0) >= 3)
            .map(|r| r.rack.clone())
    };
    wait_until(
        Duration::from_secs(30),
        "a replica of registry-data",
        || async {
            status(&f.client(&owner))
                .await
                .is_some_and(|s| replicated(&s).is_some())
        },
    )
    .await;
    let holder = replicated(&status(&f.client(&owner)).await.unwrap()).unwrap();
    let target = racks
        .iter()
        .copied()
        .find(|r| *r != owner && *r != holder)
        .unwrap();

    // A neighbour the registry must never share a rack with, on the holder.
    let blocker = f.dir.path().join("blocker.toml");
    std::fs::write(
        &blocker,
        format!(
            "[[appliance]]\nname = \"blocker\"\ndriver = \"process\"\ncommand = [\"/bin/sleep\", \"100000\"]\n\
             [appliance.placement]\nracks = [\"{holder}\"]\nanti_affinity = [\"registry\"]\n"
        ),
    )
    .unwrap();
    let (ok, out) = cli(&f, "a", &["app", "deploy", blocker.to_str().unwrap()]);
    assert!(ok, "{out}");
    wait_until(
        Duration::from_secs(30),
        "blocker running on the holder",
        || async {
            app(&f, &holder, "blocker").await.is_some_and(|a| {
                a.state == "running" && a.owner.as_deref() == Some(holder.as_str())
            })
        },
    )
    .await;

    let (_, victim) = agents.iter_mut().find(|(r, _)| *r == owner).unwrap();
    victim.sigkill();
    wait_until(
        Duration::from_secs(60),
        "registry refused on the rack without a replica",
        || async {
            app(&f, target, "registry")
                .await
                .is_some_and(|a| a.owner.as_deref() == Some(target) && a.state == "failed")
        },
    )
    .await;
    // It stays so, and nothing was created there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let a = app(&f, target, "registry").await.unwrap();
    assert_eq!(
        (a.owner.as_deref(), a.state.as_str()),
        (Some(target), "failed")
    );
    let s = status(&f.client(target)).await.unwrap();
    assert!(
        !s.volumes
            .iter()
            .any(|v| v.name == "registry-data" && v.image.is_some()),
        "an empty registry-data was created on {target}: {:?}",
        s.volumes
    );
    let (ok, ev) = cli(&f, target, &["events"]);
    assert!(ok && ev.contains("not creating it empty"), "{ev}");

    // The holder can take it now: it moves there and runs on its replica.
    let (ok, out) = cli(&f, &holder, &["app", "stop", "blocker"]);
    assert!(ok, "{out}");
    let took = wait_until(
        Duration::from_secs(60),
        "registry running on the holder",
        || async {
            app(&f, &holder, "registry").await.is_some_and(|a| {
                a.state == "running" && a.owner.as_deref() == Some(holder.as_str())
            })
        },
    )
    .await;
    println!(
        "registry on {holder} {:.1} s after the blocker stopped",
        took.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = status(&f.client(&holder)).await.unwrap();
    let image = s
        .volumes
        .iter()
        .find(|v| v.name == "registry-data")
        .and_then(|v| v.image.clone())
        .expect("the holder owns the live image");
    let records = check_records(std::path::Path::new(&image)).unwrap();
    let first = records.epochs.values().next().unwrap();
    assert_eq!(
        first.2, owner,
        "the records written on {owner} are on {holder}: {records:?}"
    );
    assert!(first.1 >= 50, "{records:?}");
    drop(agents);
}
