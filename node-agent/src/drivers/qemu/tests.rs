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

/// Launch `spec` under TCG as epoch 1 on `rack-a`, its volume `x` on
/// `image`, its run directory `dir/run`.
async fn launch_tcg(
    dir: &Path,
    spec: &deploy::appliance::ApplianceSpec,
    image: std::path::PathBuf,
) -> Result<crate::drivers::Instance, DriverError> {
    launch(
        LaunchSpec {
            rack: "rack-a",
            spec,
            epoch: 1,
            volumes: vec![("x".into(), image)],
            run_dir: dir.join("run"),
        },
        Accel::Tcg,
    )
    .await
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
    let mut inst = launch_tcg(dir.path(), &spec, image.clone()).await.unwrap();
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
    let e = launch_tcg(dir.path(), &spec, image).await.unwrap_err();
    match &e {
        DriverError::QemuExited { log_tail, .. } => assert!(!log_tail.is_empty(), "{e}"),
        other => panic!("expected QemuExited, got {other}"),
    }
}

async fn qemu_io(inst: &crate::drivers::Instance, cmd: &str) {
    let out = inst
        .qmp(
            "human-monitor-command",
            json!({ "command-line": format!("qemu-io drive-x \"{cmd}\"") }),
        )
        .await
        .unwrap();
    // qemu-io reports success on QEMU's stdout; errors come back here.
    assert_eq!(out, json!(""), "qemu-io {cmd}: {out}");
}

/// The bitmap's bookkeeping end to end on a real VM: a first capture is a
/// full pass, the next ones copy exactly the written clusters (a zeroed
/// one included) on the committed generation, nothing written is nothing
/// captured, and any doubt about the base is a full pass again.
#[tokio::test]
async fn captures_copy_only_what_the_guest_wrote() {
    use super::CaptureKind;
    if qemu_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(dir.path());
    let spec = vm_spec(64);
    let inst = launch_tcg(dir.path(), &spec, image.clone()).await.unwrap();
    let cap = inst.capturer().unwrap();
    let out = dir.path().join("run");
    qemu_io(&inst, "write -P 0x11 0 4k").await;
    let first = cap.capture_since("x", &out, None).await.unwrap().unwrap();
    assert_eq!(first.kind, CaptureKind::Full);
    assert_eq!(std::fs::read(&first.source).unwrap()[..4096], [0x11; 4096]);
    drop(first);
    cap.committed("x", 1);

    qemu_io(&inst, "write -P 0x22 1M 4k").await;
    qemu_io(&inst, "write -P 0x33 3M 100k").await;
    qemu_io(&inst, "write -z 0 4k").await;
    let c = cap
        .capture_since("x", &out, Some(1))
        .await
        .unwrap()
        .unwrap();
    let m = 1 << 20;
    assert_eq!(
        c.kind,
        CaptureKind::Changed {
            base: 1,
            ranges: vec![0..65536, m..m + 65536, 3 * m..3 * m + 2 * 65536]
        }
    );
    let data = std::fs::read(&c.source).unwrap();
    assert_eq!(data.len(), 16 << 20);
    assert!(data[..4096].iter().all(|b| *b == 0), "the zeroed block");
    assert!(data[m as usize..m as usize + 4096]
        .iter()
        .all(|b| *b == 0x22));
    assert!(data[3 << 20..(3 << 20) + 102400].iter().all(|b| *b == 0x33));
    let files = [c.source.clone(), out.join("capture-x.qcow2")];
    drop(c);
    assert!(files.iter().all(|f| !f.exists()), "capture files removed");
    cap.committed("x", 2);

    // Nothing written since generation 2.
    assert!(cap
        .capture_since("x", &out, Some(2))
        .await
        .unwrap()
        .is_none());
    // The store moved on without us: a full pass.
    qemu_io(&inst, "write -P 0x44 8M 4k").await;
    let c = cap
        .capture_since("x", &out, Some(3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.kind, CaptureKind::Full);
    drop(c);
    // Not committed: a full pass again, which resets the bitmap too.
    let c = cap
        .capture_since("x", &out, Some(3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.kind, CaptureKind::Full);
    cap.committed("x", 4);
    assert!(cap
        .capture_since("x", &out, Some(4))
        .await
        .unwrap()
        .is_none());
    // The bitmap vanished (removed behind our back): full pass, tracking again.
    inst.qmp(
        "block-dirty-bitmap-remove",
        json!({ "node": drive_id("x"), "name": super::BITMAP }),
    )
    .await
    .unwrap();
    let c = cap
        .capture_since("x", &out, Some(4))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.kind, CaptureKind::Full);
    cap.committed("x", 5);
    qemu_io(&inst, "write -P 0x55 12M 4k").await;
    let c = cap
        .capture_since("x", &out, Some(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        c.kind,
        CaptureKind::Changed {
            base: 5,
            ranges: std::iter::once(12 * m..12 * m + 65536).collect()
        }
    );
}
