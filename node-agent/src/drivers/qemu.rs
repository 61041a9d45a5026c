//! The QEMU driver: one `qemu-system-x86_64` per appliance.
//!
//! Command line (all paths in the run directory unless given):
//!
//! ```text
//! setpriv --pdeathsig KILL -- qemu-system-x86_64 -name <name> -nodefaults -no-user-config
//!   -display none -accel kvm -accel tcg | -accel tcg   (KVM when /dev/kvm opens read-write;
//!                                                       QEMU falls back to TCG if KVM fails)
//!   -m <memory_mb> -smp <cpus> -serial file:serial.log
//!   -qmp unix:qmp.sock,server=on,wait=off          (the Instance's async client)
//!   -qmp unix:qmp-pause.sock,server=on,wait=off    (synchronous pause/resume)
//!   [-drive file=<image>,if=none,id=image,snapshot=on,format=raw|qcow2
//!    -device virtio-blk-pci,drive=image,bootindex=0]
//!   per volume: -drive driver=raw,file.driver=file,file.filename=<raw image>,if=none,id=drive-<v>
//!               -device virtio-blk-pci,drive=drive-<v>,id=dev-<v>[,bootindex=0]
//! ```
//!
//! Each volume is a block device named by [`drive_id`] (`drive-<volume>`),
//! so HMP `qemu-io drive-x "..."` and QMP block commands address it by
//! that name (`-drive` rather than `-blockdev`, because a named block
//! device is what `qemu-io` writes through without a permission conflict
//! with the guest's virtio device); `file.driver=file` keeps a `:` in a path
//! from being read as a protocol. A boot image is attached with
//! `snapshot=on`, so it is never modified. [`super::Instance::capture`]
//! runs a `blockdev-backup` (sync=full) of a volume's node into a new raw
//! file: QEMU copies the disk as it was when the job started while the VM
//! keeps running.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use datastore::PauseHooks;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::qmp::{self, Qmp};
use super::{
    io_err, log_tail, process::check_volumes, spawn_appliance, DriverError, Group, Instance, Kind,
    LaunchSpec, DEFAULT_PATH,
};

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// How long QEMU has to open its monitor socket after it is started.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one synchronous pause/resume exchange.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest generated drive or device id: QEMU limits node names to 31
/// characters and ids stay readable in `info block` at that length too.
const MAX_ID: usize = 31;
/// The async monitor's socket in the run directory.
pub const QMP_SOCKET: &str = "qmp.sock";
/// The synchronous (pause/resume) monitor's socket.
pub const PAUSE_SOCKET: &str = "qmp-pause.sock";
/// The guest's serial console, in the run directory.
pub const SERIAL_LOG: &str = "serial.log";

/// Which accelerator to ask QEMU for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM when `/dev/kvm` opens read-write (with TCG as QEMU's fallback),
    /// else TCG.
    Auto,
    /// Software emulation only.
    Tcg,
}

/// The running VM's driver state.
pub(crate) struct Vm {
    pub(crate) qmp: Qmp,
    pub(crate) accel: String,
    pause_socket: PathBuf,
    /// volume name → (drive id, size in bytes)
    drives: BTreeMap<String, (String, u64)>,
    captures: AtomicU64,
}

/// QEMU's block device name (drive id) for a volume: `drive-<volume>`, or
/// for a name longer than 31 characters in all, a prefix plus a hash.
pub fn drive_id(volume: &str) -> String {
    qemu_id("drive", volume)
}

fn qemu_id(prefix: &str, volume: &str) -> String {
    let plain = format!("{prefix}-{volume}");
    if plain.len() <= MAX_ID {
        return plain;
    }
    // FNV-1a: stable across releases, and collisions need 2^32 names.
    let hash = volume.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let keep = MAX_ID - prefix.len() - 2 - 8;
    format!("{prefix}-{}-{:08x}", &volume[..keep], hash as u32)
}

/// QEMU option values escape `,` as `,,`.
fn escape(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Launch a VM appliance with an explicit accelerator choice ([`super::launch`]
/// uses [`Accel::Auto`]).
///
/// # Errors
/// See [`DriverError`]; [`DriverError::QemuExited`] carries the end of
/// QEMU's log when it dies during start.
pub async fn launch(l: LaunchSpec<'_>, accel: Accel) -> Result<Instance, DriverError> {
    let spec = l.spec;
    let invalid = |reason: String| DriverError::Invalid {
        appliance: spec.name.clone(),
        reason,
    };
    if spec.image.is_none() && spec.volume.is_empty() {
        return Err(invalid("the qemu driver needs an image or a volume".into()));
    }
    check_volumes(&l)?;
    let agent_path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into());
    let qemu = super::find_in_path(QEMU, &agent_path).ok_or(DriverError::MissingBinary {
        binary: QEMU.into(),
        package: "qemu-system-x86",
    })?;
    let run_dir = std::path::absolute(&l.run_dir).unwrap_or_else(|_| l.run_dir.clone());
    let qmp_socket = run_dir.join(QMP_SOCKET);
    let pause_socket = run_dir.join(PAUSE_SOCKET);
    // sockaddr_un holds 107 bytes of path.
    if pause_socket.as_os_str().len() > 107 {
        return Err(invalid(format!(
            "run directory {} is too long for a unix socket path",
            run_dir.display()
        )));
    }
    for s in [&qmp_socket, &pause_socket] {
        match std::fs::remove_file(s) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("cannot remove {}", s.display()))(e)),
        }
    }

    let accel_args: &[&str] = match accel {
        Accel::Auto if kvm_usable() => &["-accel", "kvm", "-accel", "tcg"],
        _ => &["-accel", "tcg"],
    };
    let mut argv: Vec<String> = vec![qemu.display().to_string()];
    let mut push = |args: &[&str]| argv.extend(args.iter().map(|a| a.to_string()));
    push(&["-name", &spec.name, "-nodefaults", "-no-user-config"]);
    push(&["-display", "none"]);
    push(accel_args);
    push(&[
        "-m",
        &spec.memory_mb.to_string(),
        "-smp",
        &spec.cpus.to_string(),
    ]);
    push(&[
        "-serial",
        &format!("file:{}", escape(&run_dir.join(SERIAL_LOG))),
    ]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", escape(&qmp_socket)),
    ]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", escape(&pause_socket)),
    ]);
    if let Some(image) = &spec.image {
        let image = Path::new(image);
        std::fs::metadata(image).map_err(io_err(format!("image {}", image.display())))?;
        let format = if image.extension().is_some_and(|e| e == "qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        push(&[
            "-drive",
            &format!(
                "file={},if=none,id=image,snapshot=on,format={format}",
                escape(image)
            ),
            "-device",
            "virtio-blk-pci,drive=image,bootindex=0",
        ]);
    }
    let mut drives = BTreeMap::new();
    for (i, v) in spec.volume.iter().enumerate() {
        let (_, path) = l
            .volumes
            .iter()
            .find(|(n, _)| *n == v.name)
            .expect("checked by check_volumes");
        let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        let size = std::fs::metadata(&path)
            .map_err(io_err(format!("volume {:?} at {}", v.name, path.display())))?
            .len();
        let drive = drive_id(&v.name);
        let boot = if i == 0 && spec.image.is_none() {
            ",bootindex=0"
        } else {
            ""
        };
        push(&[
            "-drive",
            &format!(
                "driver=raw,file.driver=file,file.filename={},if=none,id={drive}",
                escape(&path)
            ),
            "-device",
            &format!(
                "virtio-blk-pci,drive={drive},id={}{boot}",
                qemu_id("dev", &v.name)
            ),
        ]);
        drives.insert(v.name.clone(), (drive, size));
    }

    let env = vec![("PATH".to_string(), agent_path)];
    let s = spawn_appliance(&l, &argv, &env).await?;
    let log_path = s.log_path.clone();
    // A plain process until its monitor answers (then `Kind::Qemu`).
    let mut instance = Instance::spawned(&spec.name, s);
    let qmp = match connect_monitor(&mut instance, &qmp_socket).await {
        Ok(q) => q,
        Err(e) => {
            instance.kill();
            let exit = instance.wait().await;
            return Err(match e {
                None => DriverError::QemuExited {
                    appliance: spec.name.clone(),
                    exit,
                    log_tail: log_tail(&log_path, 5),
                },
                Some(e) => e,
            });
        }
    };
    let accel = match qmp.execute("query-kvm", Value::Null).await {
        Ok(v) if v["enabled"] == json!(true) => "kvm",
        _ => "tcg",
    };
    tracing::info!(appliance = %spec.name, pid = instance.pid(), accel, epoch = l.epoch, "VM appliance started");
    instance.kind = Kind::Qemu(Arc::new(Vm {
        qmp,
        accel: accel.into(),
        pause_socket,
        drives,
        captures: AtomicU64::new(0),
    }));
    Ok(instance)
}

/// Wait for QEMU's monitor socket and connect; `Err(None)` if QEMU exited.
async fn connect_monitor(inst: &mut Instance, socket: &Path) -> Result<Qmp, Option<DriverError>> {
    let deadline = tokio::time::Instant::now() + MONITOR_TIMEOUT;
    loop {
        if inst.try_wait().is_some() {
            return Err(None);
        }
        if socket.exists() {
            match Qmp::connect(socket).await {
                Ok(q) => return Ok(q),
                Err(e) if tokio::time::Instant::now() > deadline => return Err(Some(e)),
                Err(_) => {}
            }
        } else if tokio::time::Instant::now() > deadline {
            return Err(Some(DriverError::QmpProtocol(format!(
                "{} did not appear within {MONITOR_TIMEOUT:?}",
                socket.display()
            ))));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Vm {
    /// Ask QEMU to quit; true if it accepted.
    pub(crate) async fn quit(&self, grace: Duration) -> bool {
        let bound = grace.min(Duration::from_secs(2));
        match tokio::time::timeout(bound, self.qmp.execute("quit", Value::Null)).await {
            Ok(Ok(_)) => true,
            // QEMU may close the socket before its answer arrives.
            Ok(Err(DriverError::QmpProtocol(_))) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "QMP quit failed; sending SIGTERM");
                false
            }
            Err(_) => false,
        }
    }

    pub(crate) fn pause_hooks(&self, group: Arc<Group>) -> QmpPause {
        QmpPause {
            socket: self.pause_socket.clone(),
            group,
        }
    }

    pub(crate) async fn capture(
        &self,
        appliance: &str,
        volume: &str,
        dest: &Path,
    ) -> Result<(), DriverError> {
        let Some((drive, size)) = self.drives.get(volume) else {
            return Err(DriverError::UnknownVolume {
                appliance: appliance.into(),
                volume: volume.into(),
            });
        };
        let dest = std::path::absolute(dest).unwrap_or_else(|_| dest.to_owned());
        let file = tokio::fs::File::create(&dest)
            .await
            .map_err(io_err(format!("cannot create {}", dest.display())))?;
        file.set_len(*size)
            .await
            .map_err(io_err(format!("cannot size {}", dest.display())))?;
        drop(file);
        let n = self.captures.fetch_add(1, Ordering::Relaxed);
        let target = format!("capture-{n}");
        let job = format!("capture-job-{n}");
        self.qmp
            .execute(
                "blockdev-add",
                json!({
                    "driver": "raw",
                    "node-name": target,
                    "file": { "driver": "file", "filename": dest.display().to_string() },
                }),
            )
            .await?;
        let result = self.backup(drive, &target, &job).await;
        if let Err(e) = self
            .qmp
            .execute("blockdev-del", json!({ "node-name": target }))
            .await
        {
            tracing::warn!(appliance, volume, error = %e, "cannot remove the capture target node");
        }
        result
    }

    async fn backup(&self, drive: &str, target: &str, job: &str) -> Result<(), DriverError> {
        // Subscribe before starting the job so its end cannot be missed.
        let mut events = self.qmp.subscribe();
        self.qmp
            .execute(
                "blockdev-backup",
                json!({ "job-id": job, "device": drive, "target": target, "sync": "full" }),
            )
            .await?;
        let failed = |reason: String| DriverError::BlockJob {
            job: job.into(),
            reason,
        };
        loop {
            let ev = match events.recv().await {
                Ok(ev) => ev,
                Err(RecvError::Lagged(_)) => {
                    // Missed events: ask whether the job still exists.
                    let jobs = self.qmp.execute("query-jobs", Value::Null).await?;
                    let ours = jobs
                        .as_array()
                        .is_some_and(|a| a.iter().any(|j| j["id"] == json!(job)));
                    if ours {
                        continue;
                    }
                    return Err(failed("its completion event was lost".into()));
                }
                Err(RecvError::Closed) => return Err(failed("QMP connection closed".into())),
            };
            if ev["data"]["device"] != json!(job) {
                continue;
            }
            match ev["event"].as_str() {
                Some("BLOCK_JOB_COMPLETED") => {
                    return match ev["data"]["error"].as_str() {
                        Some(e) => Err(failed(e.into())),
                        None => Ok(()),
                    }
                }
                Some("BLOCK_JOB_CANCELLED") => return Err(failed("cancelled".into())),
                _ => {}
            }
        }
    }
}

/// Pauses a VM with QMP `stop` / `cont` on the synchronous monitor.
pub(crate) struct QmpPause {
    socket: PathBuf,
    group: Arc<Group>,
}

impl PauseHooks for QmpPause {
    fn pause(&self) -> std::io::Result<()> {
        if self.group.is_done() {
            return Ok(());
        }
        qmp::execute_blocking(&self.socket, "stop", Value::Null, PAUSE_TIMEOUT)
            .map(|_| ())
            .map_err(std::io::Error::other)
    }

    fn resume(&self) {
        if self.group.is_done() {
            return;
        }
        if let Err(e) = qmp::execute_blocking(&self.socket, "cont", Value::Null, PAUSE_TIMEOUT) {
            tracing::error!(socket = %self.socket.display(), error = %e, "cannot resume the VM");
        }
    }
}

#[cfg(test)]
mod tests;
