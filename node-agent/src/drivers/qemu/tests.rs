//! A real TCG VM (no guest OS: the firmware finds no bootable disk, which
//! is all the driver needs).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::{drive_id, launch, Accel, QEMU};
use crate::drivers::procfs::is_alive;
use crate::drivers::tests::spec;
use crate::drivers::{find_in_path, DriverError, LaunchSpec, DEFAULT_PATH};

fn qemu_missing() -> bool {
    let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into());
    if find_in_path(QEMU, &path).is_some() {
        return false;
    }
    eprintln!("SKIPPED: {QEMU} is not installed (apt-get install qemu-system-x86)");
    true
}

fn vm_spec(memory_mb: u64) -> deploy::appliance::ApplianceSpec {
    spec(&format!(
        "name = \"vm\"\ndriver = \"qemu\"\nmemory_mb = {memory_mb}\n\
         [[appliance.volume]]\nname = \"x\"\nsize = \"16M\"\n"
    ))
}

async fn status(inst: &crate::drivers::Instance) -> String {
    let s = inst.qmp("query-status", Value::Null).await.unwrap();
    s["status"].as_str().unwrap().to_string()
}

#[test]
fn node_names_fit_qemu() {
    assert_eq!(drive_id("x"), "drive-x");
    let long = "a".repeat(63);
    let n = drive_id(&long);
    assert!(n.len() <= 31 && n.starts_with("drive-aaaa"), "{n}");
    assert_ne!(n, drive_id(&format!("{}b", "a".repeat(62))));
    assert_eq!(n, drive_id(&long), "stable");
}

/// A 16 MiB sparse disk image in `dir`.
fn sparse_image(dir: &Path) -> std::path::PathBuf {
    let image = dir.join("x.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    image
}

#[tokio::test]
async fn vm_runs_pauses_captures_and_stops() {
    if qemu_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(dir.path());
    let spec = vm_spec(128);
    let mut inst = launch(
        LaunchSpec {
            rack: "rack-a",
            spec: &spec,
            epoch: 1,
            volumes: vec![("x".into(), image.clone())],
            run_dir: dir.path().join("run"),
        },
        Accel::Tcg,
    )
    .await
    .unwrap();
    assert_eq!(inst.accel(), Some("tcg"));
    assert_eq!(status(&inst).await, "running");

    let hooks = inst.pause_hooks();
    let h = hooks.clone();
    tokio::task::spawn_blocking(move || h.pause())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status(&inst).await, "paused");
    let h = hooks.clone();
    tokio::task::spawn_blocking(move || h.resume())
        .await
        .unwrap();
    assert_eq!(status(&inst).await, "running");

    // A guest-visible write through QEMU's block layer, then a capture.
    let out = inst
        .qmp(
            "human-monitor-command",
            json!({ "command-line": "qemu-io drive-x \"write -P 0x55 0 4k\"" }),
        )
        .await
        .unwrap();
    assert_eq!(out, json!(""), "qemu-io failed: {out}");
    let copy = dir.path().join("copy.raw");
    assert!(inst.capture("x", &copy).await.unwrap());
    let (live, captured) = (
        std::fs::read(&image).unwrap(),
        std::fs::read(&copy).unwrap(),
    );
    assert_eq!(captured.len(), 16 << 20);
    assert!(
        captured[..4096].iter().all(|b| *b == 0x55),
        "the write is not in the capture"
    );
    assert!(captured == live, "capture differs from the volume");
    // The capture node is gone again: a second capture works.
    assert!(inst
        .capture("x", &dir.path().join("copy2.raw"))
        .await
        .unwrap());
    assert!(matches!(
        inst.capture("nope", &dir.path().join("n")).await,
        Err(DriverError::UnknownVolume { .. })
    ));
    match inst.qmp("no-such-command", Value::Null).await {
        Err(DriverError::Qmp { class, .. }) => assert_eq!(class, "CommandNotFound"),
        other => panic!("{other:?}"),
    }

    let pid = inst.pid() as i32;
    let exit = inst.stop(Duration::from_secs(20)).await;
    assert!(exit.success(), "QMP quit should end QEMU cleanly: {exit}");
    assert!(!is_alive(pid));
    assert!(Path::new(&dir.path().join("run").join("vm.log")).exists());
}

#[tokio::test]
async fn qemu_failing_at_start_reports_its_log() {
    if qemu_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(dir.path());
    // More memory than x86_64 can address.
    let spec = vm_spec(1 << 40);
    let e = launch(
        LaunchSpec {
            rack: "rack-a",
            spec: &spec,
            epoch: 1,
            volumes: vec![("x".into(), image)],
            run_dir: dir.path().join("run"),
        },
        Accel::Tcg,
    )
    .await
    .unwrap_err();
    match &e {
        DriverError::QemuExited { log_tail, .. } => assert!(!log_tail.is_empty(), "{e}"),
        other => panic!("expected QemuExited, got {other}"),
    }
}
