//! The QEMU driver: one `qemu-system-x86_64` per appliance.
//!
//! Command line (all paths in the run directory unless given):
//!
//! ```text
//! setpriv --pdeathsig KILL -- qemu-system-x86_64 -name <name> -nodefaults -no-user-config -S
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
//! `snapshot=on`, so it is never modified.
//!
//! Captures are `blockdev-backup` jobs: QEMU copies the disk as it was when
//! the job started (copy-before-write) while the VM keeps running, so each
//! is a crash-consistent point in time. Every drive carries a dirty bitmap
//! ([`BITMAP`], added at start while the VM is still stopped by `-S`, in
//! QEMU's memory: a raw image cannot hold a persistent one). A clean stop
//! saves it as a persistent bitmap in a qcow2 file of its own, and the
//! next QEMU on this rack merges it back before the guest runs
//! ([`saved`]); a kill, a changed image or an inconsistent bitmap leaves
//! nothing to trust. [`Vm::capture_since`] asks its [`bitmap::Ledger`]
//! whether the bitmap is provably clean against the store's newest
//! generation:
//!
//! - yes: `sync=incremental` into a fresh qcow2 whose data lives in an
//!   external raw file at the guest's offsets; `qemu-img map` of the qcow2
//!   names exactly the clusters copied (a zero cluster included), and the
//!   raw file holds their bytes, so the store reads only those;
//! - no (a new QEMU, a failed or unseen job, a commit not confirmed,
//!   another generation in between): `sync=full` into the same kind of
//!   target, one full pass, which also resets the bitmap at its point in
//!   time (zero clusters stay metadata in the qcow2, so the raw file stays
//!   as sparse as the disk).
//!
//! Both use `bitmap-mode: on-success`: a failed job leaves the bitmap as it
//! was. [`super::Instance::capture`] is a plain full copy that leaves the
//! bitmap alone.

pub mod bitmap;
pub mod saved;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
/// The name of the dirty bitmap every drive carries while its VM runs.
pub const BITMAP: &str = "fieldrack-dirty";
/// Bytes per bit of the dirty bitmaps: the capture targets' qcow2 cluster
/// and the datastore's chunk size (64 KiB), and QEMU's default for a raw
/// drive; stated so a saved bitmap merges into a new one bit for bit.
const BITMAP_GRANULARITY: u64 = 65536;
/// `qemu-img` (from qemu-utils): creates incremental capture targets and
/// maps what they hold.
pub const QEMU_IMG: &str = "qemu-img";
/// Longest `qemu-img` run (create or map of one capture target; both touch
/// metadata only) before the capture is given up.
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a clean stop spends saving the drives' bitmaps (a qcow2 of
/// metadata and four monitor commands per drive) before it quits anyway:
/// a stop is bounded by its grace period, and a bitmap not saved only
/// costs one full pass.
const SAVE_BITMAPS_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// volume name → its drive
    drives: BTreeMap<String, Drive>,
    captures: AtomicU64,
    /// `PATH` of the agent, where `qemu-img` is looked up.
    path: String,
    /// The appliance's run directory: where the bitmaps are saved between
    /// two QEMUs on this rack.
    run_dir: PathBuf,
}

/// One volume's block device in the VM.
struct Drive {
    /// QEMU's device name ([`drive_id`]).
    id: String,
    /// Bytes.
    size: u64,
    /// The live image, whose stamp a saved bitmap is checked against.
    path: PathBuf,
    /// What its dirty bitmap is clean against.
    ledger: Mutex<bitmap::Ledger>,
}

/// A point-in-time capture of one drive, as files the store reads; they
/// are removed when this is dropped.
#[derive(Debug)]
pub struct Capture {
    /// A raw file of the drive's size holding the captured bytes at their
    /// offsets: the whole disk for [`CaptureKind::Full`], only the changed
    /// ranges (holes elsewhere) for [`CaptureKind::Changed`].
    pub source: PathBuf,
    /// What `source` holds.
    pub kind: CaptureKind,
    /// Bytes QEMU copied (the job's length).
    pub copied: u64,
    files: Vec<PathBuf>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// What a [`Capture`] holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptureKind {
    /// The whole disk: record it with a full pass.
    Full,
    /// Only `ranges` changed since generation `base`, which the bitmap was
    /// proven clean against: record it on `base`.
    Changed {
        /// The generation the changes apply to.
        base: u64,
        /// Sorted byte ranges, 64 KiB clusters, copied from the disk.
        ranges: Vec<Range<u64>>,
    },
}

/// How a block job ended without success, as the bitmap sees it.
enum JobError {
    /// QEMU refused or failed the job: with `on-success` the bitmap is as
    /// it was.
    Failed(DriverError),
    /// The job's end is not known (the monitor went away): nothing about
    /// the bitmap is.
    Unknown(DriverError),
}

impl From<JobError> for DriverError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Failed(e) | JobError::Unknown(e) => e,
        }
    }
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
    // -S: the guest runs only once every drive's bitmap is in place.
    push(&["-name", &spec.name, "-nodefaults", "-no-user-config", "-S"]);
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
        drives.insert(
            v.name.clone(),
            Drive {
                id: drive,
                size,
                path: path.clone(),
                ledger: Mutex::new(bitmap::Ledger::new()),
            },
        );
    }

    let env = vec![("PATH".to_string(), agent_path.clone())];
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
    let vm = Vm {
        qmp,
        accel: accel.into(),
        pause_socket,
        drives,
        captures: AtomicU64::new(0),
        path: agent_path,
        run_dir,
    };
    for d in vm.drives.values() {
        // Tracking starts before the guest runs; a failure here only
        // costs full passes (each capture tries again).
        if let Err(e) = vm.add_bitmap(&d.id).await {
            tracing::warn!(appliance = %spec.name, drive = %d.id, error = %e, "cannot add a dirty bitmap; captures will be full passes");
            continue;
        }
        match vm.restore_bitmap(d).await {
            Ok(Some(base)) => {
                tracing::info!(appliance = %spec.name, drive = %d.id, base, "dirty bitmap restored from the previous QEMU");
                d.ledger.lock().expect("ledger lock").restored(base);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(appliance = %spec.name, drive = %d.id, error = %e, "saved dirty bitmap unusable; the first capture is a full pass");
                // Whatever was merged, the ledger knows nothing.
                d.ledger.lock().expect("ledger lock").lost();
            }
        }
    }
    let vm = Arc::new(vm);
    instance.kind = Kind::Qemu(vm.clone());
    if let Err(e) = vm.qmp.execute("cont", Value::Null).await {
        instance.kill();
        let _ = instance.wait().await;
        return Err(e);
    }
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
    /// Save the drives' bitmaps ([`saved`]), then ask QEMU to quit; true
    /// if it accepted.
    pub(crate) async fn quit(&self, grace: Duration) -> bool {
        let bound = grace.min(SAVE_BITMAPS_TIMEOUT);
        if tokio::time::timeout(bound, self.save_bitmaps())
            .await
            .is_err()
        {
            tracing::warn!("saving the dirty bitmaps took longer than {bound:?}; the next captures will be full passes");
            self.forget_saved_bitmaps();
        }
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

    fn drive(&self, appliance: &str, volume: &str) -> Result<&Drive, DriverError> {
        self.drives
            .get(volume)
            .ok_or_else(|| DriverError::UnknownVolume {
                appliance: appliance.into(),
                volume: volume.into(),
            })
    }

    /// A full copy of `volume` at `dest` (raw), leaving the bitmap alone.
    pub(crate) async fn capture(
        &self,
        appliance: &str,
        volume: &str,
        dest: &Path,
    ) -> Result<(), DriverError> {
        let drive = self.drive(appliance, volume)?;
        let dest = std::path::absolute(dest).unwrap_or_else(|_| dest.to_owned());
        self.backup_to_raw(&drive.id, drive.size, &dest, None)
            .await
            .map(|_| ())
            .map_err(DriverError::from)
    }

    /// Capture `volume` into files in `dir`, incrementally when its bitmap
    /// is provably clean against `latest` (the store's newest generation
    /// of the volume), else as a full pass. `Ok(None)`: the bitmap is
    /// clean against `latest` and empty, nothing was written since.
    ///
    /// Report what the store did with the capture: [`Vm::committed`] with
    /// its generation, or [`Vm::abandoned`]; until then the next capture
    /// is a full pass. One capture of a volume at a time.
    pub(crate) async fn capture_since(
        &self,
        appliance: &str,
        volume: &str,
        dir: &Path,
        latest: Option<u64>,
    ) -> Result<Option<Capture>, DriverError> {
        let drive = self.drive(appliance, volume)?;
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
        let tracked = match self.bitmap_usable(&drive.id).await {
            Ok(Some(dirty)) => {
                let base = drive.ledger.lock().expect("ledger lock").base();
                if dirty == 0 && base.is_some() && base == latest {
                    return Ok(None);
                }
                true
            }
            Ok(None) => {
                // Missing or unusable: start tracking again from the full
                // pass below.
                drive.ledger.lock().expect("ledger lock").lost();
                match self.add_bitmap(&drive.id).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(appliance, volume, error = %e, "cannot add a dirty bitmap; full pass");
                        false
                    }
                }
            }
            Err(e) => return Err(e),
        };
        let pass = if tracked {
            drive.ledger.lock().expect("ledger lock").begin(latest)
        } else {
            bitmap::Pass::Full
        };
        let bitmap = tracked.then_some(BITMAP);
        let result = match pass {
            bitmap::Pass::Full => {
                self.backup_to_qcow2(drive, volume, &dir, None, bitmap)
                    .await
            }
            bitmap::Pass::Incremental { base } => {
                self.backup_to_qcow2(drive, volume, &dir, Some(base), bitmap)
                    .await
            }
        };
        if tracked {
            let mut ledger = drive.ledger.lock().expect("ledger lock");
            match &result {
                Ok(_) => ledger.job_succeeded(),
                Err(JobError::Failed(_)) => ledger.job_failed(),
                Err(JobError::Unknown(_)) => ledger.lost(),
            }
        }
        Ok(Some(result?))
    }

    /// The store committed the capture of `volume` as `generation`.
    pub(crate) fn committed(&self, volume: &str, generation: u64) {
        if let Some(d) = self.drives.get(volume) {
            d.ledger.lock().expect("ledger lock").committed(generation);
        }
    }

    /// The store did not commit the capture of `volume`.
    pub(crate) fn abandoned(&self, volume: &str) {
        if let Some(d) = self.drives.get(volume) {
            d.ledger.lock().expect("ledger lock").lost();
        }
    }

    async fn add_bitmap(&self, drive: &str) -> Result<(), DriverError> {
        self.qmp
            .execute(
                "block-dirty-bitmap-add",
                json!({ "node": drive, "name": BITMAP, "persistent": false, "granularity": BITMAP_GRANULARITY }),
            )
            .await
            .map(|_| ())
    }

    /// Stop the guest and save the bitmap of every drive whose ledger
    /// knows its base, so the next QEMU on this rack captures
    /// incrementally; drives without one get no saved file.
    async fn save_bitmaps(&self) {
        let known: Vec<(&Drive, u64)> = self
            .drives
            .values()
            .filter_map(|d| Some((d, d.ledger.lock().expect("ledger lock").base()?)))
            .collect();
        self.forget_saved_bitmaps();
        if known.is_empty() {
            return;
        }
        // No guest write may follow the copy of its bitmap.
        if let Err(e) = self.qmp.execute("stop", Value::Null).await {
            tracing::warn!(error = %e, "cannot stop the VM to save its dirty bitmaps");
            return;
        }
        for (d, base) in known {
            let files = saved::Files::new(&self.run_dir, &d.id);
            match self.save_bitmap(d, base, &files).await {
                Ok(()) => {
                    tracing::info!(drive = %d.id, base, "dirty bitmap saved for the next QEMU");
                }
                Err(e) => {
                    tracing::warn!(drive = %d.id, error = %e, "cannot save the dirty bitmap; the next QEMU starts with a full pass");
                    let _ = files.remove();
                }
            }
        }
    }

    /// Remove every drive's saved bitmap files.
    fn forget_saved_bitmaps(&self) {
        for d in self.drives.values() {
            let _ = saved::Files::new(&self.run_dir, &d.id).remove();
        }
    }

    /// Copy `d`'s bitmap (clean against `base`) into a persistent bitmap
    /// of a new qcow2, close it (QEMU writes the bitmap), then write the
    /// record that makes it usable.
    async fn save_bitmap(
        &self,
        d: &Drive,
        base: u64,
        files: &saved::Files,
    ) -> Result<(), DriverError> {
        let qemu_img =
            super::find_in_path(QEMU_IMG, &self.path).ok_or(DriverError::MissingBinary {
                binary: QEMU_IMG.into(),
                package: "qemu-utils",
            })?;
        run_qemu_img(
            &qemu_img,
            &[
                "create".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-o".as_ref(),
                "cluster_size=65536".as_ref(),
                files.qcow2.as_os_str(),
                d.size.to_string().as_ref(),
            ],
            &format!("create {}", files.qcow2.display()),
        )
        .await?;
        let node = self.open_bitmap_file(&files.qcow2).await?;
        let copied = async {
            self.qmp
                .execute(
                    "block-dirty-bitmap-add",
                    json!({ "node": node, "name": saved::SAVED_BITMAP, "persistent": true, "granularity": BITMAP_GRANULARITY }),
                )
                .await?;
            self.qmp
                .execute(
                    "block-dirty-bitmap-merge",
                    json!({ "node": node, "target": saved::SAVED_BITMAP,
                            "bitmaps": [{ "node": d.id, "name": BITMAP }] }),
                )
                .await
        }
        .await;
        // Closing the node writes the persistent bitmap into the file.
        let closed = self
            .qmp
            .execute("blockdev-del", json!({ "node-name": node }))
            .await;
        copied?;
        closed?;
        // A capture that began meanwhile moved the ledger: save nothing.
        if d.ledger.lock().expect("ledger lock").base() != Some(base) {
            return Err(DriverError::QmpProtocol(
                "a capture ran while the bitmap was saved".into(),
            ));
        }
        let stamp =
            saved::Stamp::of(&d.path).map_err(io_err(format!("stat {}", d.path.display())))?;
        files
            .write_record(&saved::Record::new(&d.id, d.size, base, stamp))
            .map_err(io_err(format!("write {}", files.record.display())))
    }

    /// Merge the bitmap a previous QEMU saved for `d` into `d`'s (new,
    /// empty, the guest not yet running) bitmap; the generation it is
    /// clean against, or `None` if nothing usable was saved. The saved
    /// files are gone afterwards whatever the outcome.
    async fn restore_bitmap(&self, d: &Drive) -> Result<Option<u64>, DriverError> {
        let files = saved::Files::new(&self.run_dir, &d.id);
        let record = files.take_record();
        let result = async {
            let Some(record) = record.map_err(io_err(format!("read {}", files.record.display())))? else {
                return Ok(None);
            };
            let now = saved::Stamp::of(&d.path).map_err(io_err(format!("stat {}", d.path.display())))?;
            if !record.matches(&d.id, d.size, &now) {
                tracing::info!(drive = %d.id, "the image changed since its bitmap was saved; full pass");
                return Ok(None);
            }
            let node = self.open_bitmap_file(&files.qcow2).await?;
            let merged = async {
                let nodes = self
                    .qmp
                    .execute("query-named-block-nodes", json!({ "flat": true }))
                    .await?;
                let info = nodes
                    .as_array()
                    .and_then(|a| a.iter().find(|n| n["node-name"] == json!(node)))
                    .and_then(|n| n["dirty-bitmaps"].as_array())
                    .and_then(|b| b.iter().find(|b| b["name"] == json!(saved::SAVED_BITMAP)))
                    .cloned();
                match info {
                    Some(i) if i["inconsistent"] != json!(true) => {}
                    other => {
                        tracing::info!(drive = %d.id, bitmap = ?other, "saved bitmap missing or inconsistent; full pass");
                        return Ok(None);
                    }
                }
                self.qmp
                    .execute(
                        "block-dirty-bitmap-merge",
                        json!({ "node": d.id, "target": BITMAP,
                                "bitmaps": [{ "node": node, "name": saved::SAVED_BITMAP }] }),
                    )
                    .await?;
                Ok(Some(record.base))
            }
            .await;
            if let Err(e) = self
                .qmp
                .execute("blockdev-del", json!({ "node-name": node }))
                .await
            {
                tracing::warn!(drive = %d.id, error = %e, "cannot close the saved bitmap's file");
            }
            merged
        }
        .await;
        let _ = files.remove();
        result
    }

    /// Open the qcow2 at `path` as a block node; its name.
    async fn open_bitmap_file(&self, path: &Path) -> Result<String, DriverError> {
        let n = self.captures.fetch_add(1, Ordering::Relaxed);
        let node = format!("saved-bitmap-{n}");
        self.qmp
            .execute(
                "blockdev-add",
                json!({ "driver": "qcow2", "node-name": node,
                        "file": { "driver": "file", "filename": path.display().to_string() } }),
            )
            .await?;
        Ok(node)
    }

    /// The bitmap's dirty byte count if it exists and can be trusted;
    /// `None` after removing it if it exists but cannot (not recording,
    /// inconsistent), or if it does not exist.
    async fn bitmap_usable(&self, drive: &str) -> Result<Option<u64>, DriverError> {
        let blocks = self.qmp.execute("query-block", Value::Null).await?;
        let info = blocks
            .as_array()
            .and_then(|a| a.iter().find(|b| b["device"] == json!(drive)))
            .and_then(|b| b["inserted"]["dirty-bitmaps"].as_array())
            .and_then(|bm| bm.iter().find(|b| b["name"] == json!(BITMAP)))
            .cloned();
        let Some(info) = info else { return Ok(None) };
        let usable = info["recording"] == json!(true)
            && info["inconsistent"] != json!(true)
            && info["busy"] != json!(true);
        match info["count"].as_u64() {
            Some(count) if usable => Ok(Some(count)),
            _ => {
                tracing::warn!(drive, bitmap = %info, "dirty bitmap unusable; re-creating it");
                self.qmp
                    .execute(
                        "block-dirty-bitmap-remove",
                        json!({ "node": drive, "name": BITMAP }),
                    )
                    .await?;
                Ok(None)
            }
        }
    }

    /// `blockdev-backup` sync=full of `drive` into a new raw file `dest`;
    /// with `bitmap`, which is reset at the copy's point in time when the
    /// job succeeds. Returns the bytes copied.
    async fn backup_to_raw(
        &self,
        drive: &str,
        size: u64,
        dest: &Path,
        bitmap: Option<&str>,
    ) -> Result<u64, JobError> {
        let fail = JobError::Failed;
        let file = tokio::fs::File::create(dest)
            .await
            .map_err(io_err(format!("cannot create {}", dest.display())))
            .map_err(fail)?;
        file.set_len(size)
            .await
            .map_err(io_err(format!("cannot size {}", dest.display())))
            .map_err(fail)?;
        drop(file);
        let node = json!({
            "driver": "raw",
            "file": { "driver": "file", "filename": dest.display().to_string() },
        });
        self.backup_into(drive, node, "full", bitmap).await
    }

    /// `blockdev-backup` of `drive` into a fresh qcow2 whose data goes to
    /// an external raw file at the guest's offsets. With `base`:
    /// sync=incremental (only the clusters the bitmap has set), then map
    /// what the qcow2 holds. Without: sync=full; the raw file is then the
    /// whole disk, sparse: QEMU writes a cluster that reads as zeros as a
    /// zero flag in the qcow2's metadata, where a raw target would get a
    /// `FALLOC_FL_ZERO_RANGE` that allocates it (a 40 GiB disk's every
    /// full pass would take 40 GiB of disk).
    async fn backup_to_qcow2(
        &self,
        drive: &Drive,
        volume: &str,
        dir: &Path,
        base: Option<u64>,
        bitmap: Option<&str>,
    ) -> Result<Capture, JobError> {
        let fail = JobError::Failed;
        let meta = dir.join(format!("capture-{volume}.qcow2"));
        let data = dir.join(format!("capture-{volume}.data"));
        for f in [&meta, &data] {
            match std::fs::remove_file(f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(fail(io_err(format!("cannot remove {}", f.display()))(e))),
            }
        }
        // From here on the files are the capture's, removed with it.
        let files = vec![meta.clone(), data.clone()];
        let qemu_img =
            super::find_in_path(QEMU_IMG, &self.path).ok_or(fail(DriverError::MissingBinary {
                binary: QEMU_IMG.into(),
                package: "qemu-utils",
            }))?;
        let mut holder = Capture {
            source: data.clone(),
            kind: CaptureKind::Full,
            copied: 0,
            files,
        };
        run_qemu_img(
            &qemu_img,
            &[
                "create".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-o".as_ref(),
                format!("cluster_size=65536,data_file={}", escape(&data)).as_ref(),
                meta.as_os_str(),
                drive.size.to_string().as_ref(),
            ],
            &format!("create {}", meta.display()),
        )
        .await
        .map_err(fail)?;
        let node = json!({
            "driver": "qcow2",
            "file": { "driver": "file", "filename": meta.display().to_string() },
            "data-file": { "driver": "file", "filename": data.display().to_string() },
        });
        let sync = if base.is_some() {
            "incremental"
        } else {
            "full"
        };
        let copied = self.backup_into(&drive.id, node, sync, bitmap).await?;
        holder.copied = copied;
        let Some(base) = base else {
            return Ok(holder);
        };
        // The job succeeded: from here a failure leaves the bitmap reset,
        // so it is not a `Failed` one (the ledger must forget its base).
        let unknown = JobError::Unknown;
        let map = run_qemu_img(
            &qemu_img,
            &[
                "map".as_ref(),
                "--output=json".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                meta.as_os_str(),
            ],
            &format!("map {}", meta.display()),
        )
        .await
        .map_err(unknown)?;
        let ranges = bitmap::changed_ranges(&map, drive.size)
            .map_err(|source| DriverError::Map {
                path: meta.clone(),
                source,
            })
            .map_err(unknown)?;
        holder.kind = CaptureKind::Changed { base, ranges };
        Ok(holder)
    }

    /// Add `node` as a block node, back `drive` up into it, remove it.
    async fn backup_into(
        &self,
        drive: &str,
        mut node: Value,
        sync: &str,
        bitmap: Option<&str>,
    ) -> Result<u64, JobError> {
        let n = self.captures.fetch_add(1, Ordering::Relaxed);
        let target = format!("capture-{n}");
        let job = format!("capture-job-{n}");
        node["node-name"] = json!(target);
        self.qmp
            .execute("blockdev-add", node)
            .await
            .map_err(JobError::Failed)?;
        let mut args = json!({ "job-id": job, "device": drive, "target": target, "sync": sync });
        if let Some(b) = bitmap {
            args["bitmap"] = json!(b);
            args["bitmap-mode"] = json!("on-success");
        }
        let result = self.backup(args, &job).await;
        // Closing the node is what writes the target's metadata (a qcow2's
        // L2 tables, cached in QEMU) to its file: a job that completed but
        // whose target was never closed (QEMU killed in between) left a
        // file that maps fewer clusters than were copied.
        let closed = self
            .qmp
            .execute("blockdev-del", json!({ "node-name": target }))
            .await;
        match (result, closed) {
            (Ok(copied), Ok(_)) => Ok(copied),
            (Ok(_), Err(e)) => Err(JobError::Unknown(DriverError::BlockJob {
                job,
                reason: format!("completed, but its target could not be closed: {e}"),
            })),
            (Err(failed), closed) => {
                if let Err(e) = closed {
                    tracing::warn!(drive, error = %e, "cannot remove the capture target node");
                }
                Err(failed)
            }
        }
    }

    async fn backup(&self, args: Value, job: &str) -> Result<u64, JobError> {
        // Subscribe before starting the job so its end cannot be missed.
        let mut events = self.qmp.subscribe();
        match self.qmp.execute("blockdev-backup", args).await {
            Ok(_) => {}
            // Refused: no job, the bitmap untouched.
            Err(e @ DriverError::Qmp { .. }) => return Err(JobError::Failed(e)),
            Err(e) => return Err(JobError::Unknown(e)),
        }
        let failed = |reason: String| {
            JobError::Failed(DriverError::BlockJob {
                job: job.into(),
                reason,
            })
        };
        let unknown = |reason: String| {
            JobError::Unknown(DriverError::BlockJob {
                job: job.into(),
                reason,
            })
        };
        loop {
            let ev = match events.recv().await {
                Ok(ev) => ev,
                Err(RecvError::Lagged(_)) => {
                    // Missed events: ask whether the job still exists.
                    let jobs = self
                        .qmp
                        .execute("query-jobs", Value::Null)
                        .await
                        .map_err(JobError::Unknown)?;
                    let ours = jobs
                        .as_array()
                        .is_some_and(|a| a.iter().any(|j| j["id"] == json!(job)));
                    if ours {
                        continue;
                    }
                    return Err(unknown("its completion event was lost".into()));
                }
                Err(RecvError::Closed) => return Err(unknown("QMP connection closed".into())),
            };
            if ev["data"]["device"] != json!(job) {
                continue;
            }
            match ev["event"].as_str() {
                Some("BLOCK_JOB_COMPLETED") => {
                    return match ev["data"]["error"].as_str() {
                        Some(e) => Err(failed(e.into())),
                        None => Ok(ev["data"]["len"].as_u64().unwrap_or(0)),
                    }
                }
                Some("BLOCK_JOB_CANCELLED") => return Err(failed("cancelled".into())),
                _ => {}
            }
        }
    }
}

/// Run `qemu-img` with `args` (bounded by [`QEMU_IMG_TIMEOUT`]) and return
/// its stdout.
async fn run_qemu_img(
    qemu_img: &Path,
    args: &[&std::ffi::OsStr],
    what: &str,
) -> Result<Vec<u8>, DriverError> {
    let bad = |reason: String| DriverError::QemuImg {
        what: what.into(),
        reason,
    };
    let child = tokio::process::Command::new(qemu_img)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(QEMU_IMG_TIMEOUT, child)
        .await
        .map_err(|_| bad(format!("no answer within {QEMU_IMG_TIMEOUT:?}")))?
        .map_err(io_err(format!("cannot run {}", qemu_img.display())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err
            .chars()
            .rev()
            .take(400)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(bad(format!("{}: {}", out.status, tail.trim())));
    }
    Ok(out.stdout)
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
