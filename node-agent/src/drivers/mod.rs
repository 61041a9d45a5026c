//! Appliance drivers: run an [`ApplianceSpec`] as a process group or a QEMU
//! VM, stop it, pause it for a snapshot, and probe its health.
//!
//! - [`process`]: `command` in its own process group, environment, logs.
//! - [`qemu`]: `qemu-system-x86_64`, one virtio drive per volume, QMP.
//! - [`qmp`]: a small QMP client (async, plus a blocking one for pauses).
//! - [`health`]: TCP, HTTP and command probes.
//!
//! Guarantees shared by both drivers:
//!
//! - **An appliance dies with the agent.** Every appliance is started as
//!   `setpriv --pdeathsig KILL -- <program>` (no `unsafe`, so no
//!   `pre_exec`), and always from one dedicated spawner thread that lives as
//!   long as the agent: Linux sends the parent-death signal when the
//!   *thread* that forked the child exits, so spawning from a runtime worker
//!   or a blocking-pool thread would kill appliances when that thread is
//!   retired. setpriv arms the signal just before it execs the program, so
//!   a launch returns only once the process runs the program, no longer
//!   setpriv ([`wait_past_wrapper`]): an agent killed after that never
//!   leaves it behind. The signal covers the appliance's main process (a VM is one
//!   process); processes *it* forks are killed with the whole group on every
//!   orderly path, and [`kill_leftover`] kills a stale group at the next start.
//! - **The appliance is its process group.** It runs in a new group
//!   (`process_group(0)`); stop, kill and pause act on the group. When the
//!   main process exits, what is left of the group is SIGKILLed (appliances
//!   must run in the foreground; a daemonising program is not supported).
//!   After that the group id is never signalled again, so a recycled id
//!   cannot hit an unrelated process.
//! - **Dropping an [`Instance`] kills it** (SIGKILL to the group): an
//!   appliance nobody tracks is a second copy waiting to happen.
//! - stdout and stderr go to `run_dir/<name>.log`, at most [`LOG_CAP`]
//!   bytes, with one rotation to `<name>.log.1`; the pid is in `run_dir/pid`.

pub mod health;
pub mod process;
mod procfs;
pub mod qemu;
pub mod qmp;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use datastore::PauseHooks;
use deploy::appliance::{ApplianceSpec, DriverKind};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use health::check_health;
pub use qemu::{Accel, Capture, CaptureKind};

/// Size of an appliance's log before it is rotated to `<name>.log.1`.
pub const LOG_CAP: u64 = 8 << 20;
/// Chunks of output queued between the pipe readers and the log writer;
/// a slow disk back-pressures the appliance instead of growing memory.
const LOG_QUEUE: usize = 64;
/// After the main process exited and its group was killed, how long the
/// log writer may take to drain what is left in the pipes.
const LOG_DRAIN: Duration = Duration::from_secs(2);
/// How often a stopping group is checked for remaining members.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// What to launch, and where.
#[derive(Debug)]
pub struct LaunchSpec<'a> {
    /// This rack's name (`FIELDRACK_RACK`).
    pub rack: &'a str,
    /// The appliance.
    pub spec: &'a ApplianceSpec,
    /// The placement epoch this instance runs under (`FIELDRACK_EPOCH`).
    pub epoch: u64,
    /// Every volume of the spec, with the path of its live raw image.
    pub volumes: Vec<(String, PathBuf)>,
    /// Per-appliance directory: logs, QMP sockets, pid file; created if
    /// missing; the process driver's working directory.
    pub run_dir: PathBuf,
}

/// Why a driver operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// A program the driver needs is not installed.
    #[error("{binary} not found in PATH (install the {package} package)")]
    MissingBinary {
        /// The program.
        binary: String,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// The appliance's own program does not exist or is not executable.
    #[error("appliance {appliance:?}: cannot run {program:?}: not found or not executable")]
    MissingProgram {
        /// The appliance.
        appliance: String,
        /// `command[0]`.
        program: String,
    },
    /// The launch does not match the spec (a volume without a path, ...).
    #[error("appliance {appliance:?}: {reason}")]
    Invalid {
        /// The appliance.
        appliance: String,
        /// Why.
        reason: String,
    },
    /// fork/exec failed.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: io::Error,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// QEMU answered a QMP command with an error.
    #[error("QMP {command}: {class}: {desc}")]
    Qmp {
        /// The command.
        command: String,
        /// QEMU's error class, e.g. `GenericError`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The QMP conversation itself failed (connection lost, bad JSON,
    /// timeout).
    #[error("QMP: {0}")]
    QmpProtocol(String),
    /// A block job (capture) ended without success.
    #[error("block job {job} failed: {reason}")]
    BlockJob {
        /// The job id.
        job: String,
        /// QEMU's error text, or "cancelled".
        reason: String,
    },
    /// QEMU exited before its monitor came up.
    #[error("qemu for {appliance:?} exited during start ({exit}); its log ends: {log_tail}")]
    QemuExited {
        /// The appliance.
        appliance: String,
        /// How it exited.
        exit: ExitInfo,
        /// The last lines of its log.
        log_tail: String,
    },
    /// A QEMU-only operation on a process appliance.
    #[error("appliance {0:?} is not a QEMU VM")]
    NotQemu(String),
    /// `qemu-img` (creating a capture target, mapping what it holds) failed.
    #[error("qemu-img {what}: {reason}")]
    QemuImg {
        /// What it was asked to do, with the file.
        what: String,
        /// Its exit and the end of its stderr.
        reason: String,
    },
    /// `qemu-img map` answered something the capture cannot trust.
    #[error("capture target {path}: {source}")]
    Map {
        /// The qcow2 target.
        path: PathBuf,
        /// What is wrong with the map.
        source: qemu::bitmap::MapError,
    },
    /// `capture` of a volume the appliance does not have.
    #[error("appliance {appliance:?} has no volume {volume:?}")]
    UnknownVolume {
        /// The appliance.
        appliance: String,
        /// The volume asked for.
        volume: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DriverError {
    let what = what.into();
    move |source| DriverError::Io { what, source }
}

/// How an appliance ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit status, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
}

impl ExitInfo {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl From<std::process::ExitStatus> for ExitInfo {
    fn from(s: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Self {
            code: s.code(),
            signal: s.signal(),
        }
    }
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit status {c}"),
            (None, Some(s)) => match Signal::try_from(s) {
                Ok(sig) => write!(f, "killed by {sig}"),
                Err(_) => write!(f, "killed by signal {s}"),
            },
            (None, None) => f.write_str("unknown exit"),
        }
    }
}

/// Start an appliance with the driver its spec names. Kills a leftover
/// group recorded in `run_dir` first (see [`kill_leftover`]).
///
/// Cancel-safe: dropping the future kills whatever it had started (the
/// process group once spawned, the child of a spawn still in flight).
///
/// # Errors
/// [`DriverError`]: a missing program or binary, a volume without a path,
/// a spawn failure, QEMU failing to start.
pub async fn launch(l: LaunchSpec<'_>) -> Result<Instance, DriverError> {
    match l.spec.driver {
        DriverKind::Process => process::launch(l).await,
        DriverKind::Qemu => qemu::launch(l, Accel::Auto).await,
    }
}

/// A running (or exited, not yet dropped) appliance.
pub struct Instance {
    name: String,
    pid: u32,
    child: tokio::process::Child,
    group: Arc<Group>,
    exit: Option<ExitInfo>,
    log_pump: Option<JoinHandle<()>>,
    kind: Kind,
}

enum Kind {
    Process,
    /// Shared with [`Capturer`]s, so a capture runs in a task of its own
    /// while the instance's owner can still stop it at any moment.
    Qemu(Arc<qemu::Vm>),
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("exit", &self.exit)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// A just-spawned appliance, tracked as a plain process.
    pub(crate) fn spawned(name: &str, s: Spawned) -> Self {
        Self {
            name: name.to_owned(),
            pid: s.pid,
            child: s.child,
            group: s.group,
            exit: None,
            log_pump: Some(s.log_pump),
            kind: Kind::Process,
        }
    }

    /// The appliance's main process (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The appliance's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Resolves when the appliance has exited; then kills what is left of
    /// its group and drains its log. Cancel-safe; returns the same
    /// [`ExitInfo`] when called again.
    pub async fn wait(&mut self) -> ExitInfo {
        let info = self.wait_leader().await;
        self.reap_group();
        if let Some(pump) = self.log_pump.as_mut() {
            if tokio::time::timeout(LOG_DRAIN, &mut *pump).await.is_err() {
                tracing::warn!(appliance = %self.name, "log still open after exit; tail dropped");
                pump.abort();
            }
            self.log_pump = None;
        }
        info
    }

    /// The exit, if the appliance has exited (then its group is killed as
    /// in [`Instance::wait`]); never blocks.
    pub fn try_wait(&mut self) -> Option<ExitInfo> {
        if self.exit.is_none() {
            match self.child.try_wait() {
                Ok(Some(status)) => self.exit = Some(status.into()),
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(appliance = %self.name, error = %e, "try_wait failed");
                    return None;
                }
            }
        }
        self.reap_group();
        self.exit
    }

    /// Stop: SIGTERM to the group (QEMU: QMP `quit`, SIGTERM if that
    /// fails), SIGKILL to the group once `grace` has passed with any of
    /// it still running, then reap.
    pub async fn stop(&mut self, grace: Duration) -> ExitInfo {
        if self.exit.is_none() {
            let deadline = Instant::now() + grace;
            let polite = match &self.kind {
                Kind::Qemu(vm) => vm.quit(grace).await,
                Kind::Process => false,
            };
            if !polite {
                self.group.signal(Signal::SIGTERM);
            }
            if tokio::time::timeout_at(deadline, self.wait_leader())
                .await
                .is_err()
            {
                tracing::info!(appliance = %self.name, "still running after the grace period: SIGKILL");
                self.group.signal(Signal::SIGKILL);
            }
            self.wait_leader().await;
            // Let the rest of the group finish its own TERM handling.
            while Instant::now() < deadline && !procfs::group_members(self.group.pgid).is_empty() {
                tokio::time::sleep(GROUP_POLL).await;
            }
        }
        self.wait().await
    }

    /// SIGKILL the whole group now (fencing). Synchronous; the exit is
    /// then collected by [`Instance::wait`].
    pub fn kill(&mut self) {
        self.group.signal(Signal::SIGKILL);
    }

    /// Hooks that freeze every writer of the appliance's volumes for a
    /// snapshot. Process: SIGSTOP the group, returning once every thread
    /// of every member is stopped; resume = SIGCONT. QEMU: QMP `stop` /
    /// `cont` (QEMU drains in-flight I/O before `stop` returns). Both are
    /// no-ops once the appliance has exited. Blocking: call them from a
    /// blocking thread.
    pub fn pause_hooks(&self) -> Arc<dyn PauseHooks + Send + Sync> {
        match &self.kind {
            Kind::Process => Arc::new(process::GroupPause::new(self.group.clone())),
            Kind::Qemu(vm) => Arc::new(vm.pause_hooks(self.group.clone())),
        }
    }

    /// A point-in-time copy of `volume` at `dest` (raw). QEMU makes it
    /// itself while the VM runs and this returns `Ok(true)`; a process
    /// appliance returns `Ok(false)` (snapshot the live image under
    /// [`Instance::pause_hooks`] instead).
    ///
    /// # Errors
    /// [`DriverError::UnknownVolume`], QMP and block-job errors, I/O on `dest`.
    pub async fn capture(&self, volume: &str, dest: &Path) -> Result<bool, DriverError> {
        match &self.kind {
            Kind::Process => Ok(false),
            Kind::Qemu(vm) => vm.capture(&self.name, volume, dest).await.map(|()| true),
        }
    }

    /// A handle that makes point-in-time copies of this VM's volumes from
    /// another task (none for a process appliance). It does not keep the
    /// VM alive: once the instance is stopped its captures fail.
    pub fn capturer(&self) -> Option<Capturer> {
        match &self.kind {
            Kind::Process => None,
            Kind::Qemu(vm) => Some(Capturer {
                name: self.name.clone(),
                vm: vm.clone(),
            }),
        }
    }

    /// Run one QMP command (QEMU only) and return its `return` value.
    ///
    /// # Errors
    /// [`DriverError::NotQemu`], [`DriverError::Qmp`] (QEMU's error),
    /// [`DriverError::QmpProtocol`].
    pub async fn qmp(
        &self,
        cmd: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, DriverError> {
        match &self.kind {
            Kind::Process => Err(DriverError::NotQemu(self.name.clone())),
            Kind::Qemu(vm) => vm.qmp.execute(cmd, args).await,
        }
    }

    /// Which accelerator a VM runs on (`None` for a process).
    pub fn accel(&self) -> Option<&str> {
        match &self.kind {
            Kind::Process => None,
            Kind::Qemu(vm) => Some(vm.accel.as_str()),
        }
    }

    async fn wait_leader(&mut self) -> ExitInfo {
        if let Some(e) = self.exit {
            return e;
        }
        let info = match self.child.wait().await {
            Ok(status) => status.into(),
            Err(e) => {
                tracing::warn!(appliance = %self.name, error = %e, "wait failed");
                ExitInfo::default()
            }
        };
        self.exit = Some(info);
        info
    }

    /// After the main process exited: SIGKILL what is left of the group,
    /// once, and never signal that group id again.
    fn reap_group(&mut self) {
        if self.exit.is_some() && !self.group.is_done() {
            if !procfs::group_members(self.group.pgid).is_empty() {
                tracing::info!(appliance = %self.name, "main process exited: killing the rest of its group");
                self.group.signal(Signal::SIGKILL);
            }
            let escaped = self.group.kill_escapees();
            if escaped > 0 {
                tracing::info!(appliance = %self.name, escaped, "killed processes that had left its group");
            }
            self.group.set_done();
        }
    }
}

/// Captures of a running VM's volumes, usable while another task owns
/// the [`Instance`] (see [`Instance::capturer`]).
#[derive(Clone)]
pub struct Capturer {
    name: String,
    vm: Arc<qemu::Vm>,
}

impl std::fmt::Debug for Capturer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capturer")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Capturer {
    /// As [`Instance::capture`] on a VM.
    ///
    /// # Errors
    /// [`DriverError::UnknownVolume`], QMP and block-job errors, I/O on `dest`.
    pub async fn capture(&self, volume: &str, dest: &Path) -> Result<(), DriverError> {
        self.vm.capture(&self.name, volume, dest).await
    }

    /// A capture of `volume` into files in `dir`: only what changed since
    /// `latest` (the store's newest generation of it) when the drive's
    /// dirty bitmap is provably clean against it, else a full copy;
    /// `Ok(None)` when nothing was written since `latest`. Tell the outcome
    /// with [`Capturer::committed`] or [`Capturer::abandoned`] (until then,
    /// the next capture is a full pass).
    ///
    /// # Errors
    /// [`DriverError::UnknownVolume`], QMP, block-job and `qemu-img`
    /// errors, I/O in `dir`.
    pub async fn capture_since(
        &self,
        volume: &str,
        dir: &Path,
        latest: Option<u64>,
    ) -> Result<Option<qemu::Capture>, DriverError> {
        self.vm.capture_since(&self.name, volume, dir, latest).await
    }

    /// The store committed the last capture of `volume` as `generation`:
    /// the next one may build on it.
    pub fn committed(&self, volume: &str, generation: u64) {
        self.vm.committed(volume, generation);
    }

    /// The store did not commit the last capture of `volume`.
    pub fn abandoned(&self, volume: &str) {
        self.vm.abandoned(volume);
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.group.signal(Signal::SIGKILL);
            self.group.kill_escapees();
        }
    }
}

/// An appliance's process group; signalled only while it is ours.
#[derive(Debug)]
pub(crate) struct Group {
    pgid: i32,
    done: AtomicBool,
    /// `FIELDRACK_RUN_DIR=<dir>`, inherited by every process the appliance
    /// starts, also those that leave its group (`setsid`): how the ones
    /// that escaped are found once it is gone.
    marker: Option<String>,
}

impl Group {
    fn new(pgid: i32, marker: Option<String>) -> Self {
        Self {
            pgid,
            done: AtomicBool::new(false),
            marker,
        }
    }

    /// SIGKILL every process that carries the appliance's marker (called
    /// once its main process is gone: they are all leftovers); how many.
    fn kill_escapees(&self) -> usize {
        let Some(marker) = &self.marker else {
            return 0;
        };
        kill_marked(marker)
    }

    /// Signal every member; false if the group is done or gone.
    pub(crate) fn signal(&self, sig: Signal) -> bool {
        if self.is_done() {
            return false;
        }
        match killpg(Pid::from_raw(self.pgid), sig) {
            Ok(()) => true,
            Err(nix::errno::Errno::ESRCH) => false,
            Err(e) => {
                tracing::warn!(pgid = self.pgid, signal = %sig, error = %e, "killpg failed");
                false
            }
        }
    }

    pub(crate) fn pgid(&self) -> i32 {
        self.pgid
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    fn set_done(&self) {
        self.done.store(true, Ordering::Release);
    }
}

/// A job for the spawner thread.
type SpawnJob = Box<dyn FnOnce() + Send>;

/// Spawn `cmd` from the one long-lived spawner thread, in the runtime of
/// the caller (see the module doc: the parent-death signal follows the
/// spawning thread).
async fn spawn_on_spawner(mut cmd: tokio::process::Command) -> io::Result<tokio::process::Child> {
    static SPAWNER: OnceLock<std_mpsc::Sender<SpawnJob>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("fieldrack-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("cannot start the appliance spawner thread");
        tx
    });
    let handle = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: SpawnJob = Box::new(move || {
        let _runtime = handle.enter();
        // The caller gave up (a launch raced against a fence): the child
        // must not outlive the spawn nobody waits for.
        if let Err(Ok(mut orphan)) = tx.send(cmd.spawn()) {
            if let Some(pid) = orphan.id() {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let _ = orphan.start_kill();
        }
    });
    spawner
        .send(job)
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    rx.await
        .map_err(|_| io::Error::other("the spawner thread dropped a spawn"))?
}

/// Everything both drivers do around the spawn: leftovers, wrapper,
/// process group, pipes to the log, pid files.
pub(crate) struct Spawned {
    pub(crate) child: tokio::process::Child,
    pub(crate) pid: u32,
    pub(crate) group: Arc<Group>,
    pub(crate) log_pump: JoinHandle<()>,
    pub(crate) log_path: PathBuf,
}

/// Start `argv` wrapped in `setpriv --pdeathsig KILL --`, in a new process
/// group, with exactly `env`, cwd `run_dir`, output to the log.
pub(crate) async fn spawn_appliance(
    l: &LaunchSpec<'_>,
    argv: &[String],
    env: &[(String, String)],
) -> Result<Spawned, DriverError> {
    let name = &l.spec.name;
    tokio::fs::create_dir_all(&l.run_dir)
        .await
        .map_err(io_err(format!("cannot create {}", l.run_dir.display())))?;
    match kill_leftover(&l.run_dir) {
        Ok(Some(pid)) => {
            tracing::warn!(appliance = %name, pid, "killed a leftover process group from an earlier run")
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(appliance = %name, error = %e, "cannot check for leftovers"),
    }
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let setpriv = find_in_path("setpriv", &std::env::var("PATH").unwrap_or_default())
        .or_else(|| find_in_path("setpriv", DEFAULT_PATH))
        .ok_or(DriverError::MissingBinary {
            binary: "setpriv".into(),
            package: "util-linux",
        })?;
    let program = &argv[0];
    if find_in_path(program, &path_var).is_none() {
        // Relative paths with a slash are relative to run_dir (the cwd).
        let in_run_dir = program.contains('/') && is_executable(&l.run_dir.join(program));
        if !in_run_dir {
            return Err(DriverError::MissingProgram {
                appliance: name.clone(),
                program: program.clone(),
            });
        }
    }
    let log_path = l.run_dir.join(format!("{name}.log"));
    let mut log = LogWriter::open(&log_path, LOG_CAP)
        .await
        .map_err(io_err(format!("cannot open {}", log_path.display())))?;

    let mut cmd = tokio::process::Command::new(&setpriv);
    cmd.arg("--pdeathsig")
        .arg("KILL")
        .arg("--")
        .args(argv)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&l.run_dir)
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = spawn_on_spawner(cmd)
        .await
        .map_err(|source| DriverError::Spawn {
            program: program.clone(),
            source,
        })?;
    let pid = child.id().expect("a just-spawned child has a pid");
    let marker = env
        .iter()
        .find(|(k, _)| k == RUN_DIR_ENV)
        .map(|(k, v)| format!("{k}={v}"));
    let group = Arc::new(Group::new(pid as i32, marker));

    // From here on a failure must not leave the child running.
    let mut guard = util::process::GroupKillGuard::new(Some(pid));
    // setpriv arms the parent-death signal only just before it execs the
    // appliance: an agent that died before then would leave the appliance
    // running without it. The appliance counts as started once it has.
    wait_past_wrapper(pid, &setpriv).await;
    let header = format!(
        "=== fieldrack: {name} epoch {} on rack {}: started pid {pid}: {} ===\n",
        l.epoch,
        l.rack,
        argv.join(" ")
    );
    if let Err(e) = log.write(header.as_bytes()).await {
        tracing::warn!(appliance = %name, error = %e, "cannot write the log");
    }
    let log_pump = start_log_pump(child.stdout.take(), child.stderr.take(), log);
    write_pid_files(&l.run_dir, pid, argv).map_err(io_err(format!(
        "cannot write {}",
        l.run_dir.join(PID_FILE).display()
    )))?;
    guard.disarm();
    Ok(Spawned {
        child,
        pid,
        group,
        log_pump,
        log_path,
    })
}

/// How long [`wait_past_wrapper`] waits for `setpriv` to exec; far more
/// than the milliseconds it takes on a loaded machine.
const WRAPPER_EXEC_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits until process `pid` no longer runs `wrapper` (`setpriv` has set
/// the parent-death signal and exec'd the appliance), or it exited (its
/// exit is seen as usual), or [`WRAPPER_EXEC_WAIT`] passed (logged).
async fn wait_past_wrapper(pid: u32, wrapper: &Path) {
    let wrapper = std::fs::canonicalize(wrapper).unwrap_or_else(|_| wrapper.to_path_buf());
    let exe = PathBuf::from(format!("/proc/{pid}/exe"));
    let deadline = tokio::time::Instant::now() + WRAPPER_EXEC_WAIT;
    loop {
        match std::fs::read_link(&exe) {
            Ok(p) if p == wrapper => {
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(
                        pid,
                        "setpriv has not exec'd the appliance after {WRAPPER_EXEC_WAIT:?}"
                    );
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            _ => return,
        }
    }
}

/// Used when the agent's own environment has no PATH.
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Looks at a recorded group before it is called foreign, and the gap
/// between them: 5 × 10 ms covers an `exec` on a loaded machine and costs
/// 40 ms only when the recorded pid now belongs to someone else.
const OWNERSHIP_LOOKS: usize = 5;
const OWNERSHIP_LOOK_GAP: std::time::Duration = std::time::Duration::from_millis(10);

/// The pid file in a run directory.
pub const PID_FILE: &str = "pid";
/// The expected `/proc/<pid>/cmdline` of the process in [`PID_FILE`].
const CMDLINE_FILE: &str = "pid.cmdline";
/// Set for every process appliance: lets [`kill_leftover`] recognise the
/// group's other members after the main process is gone.
pub const RUN_DIR_ENV: &str = "FIELDRACK_RUN_DIR";

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Resolve a program like `execvp` does.
pub fn find_in_path(program: &str, path: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_executable(&p).then_some(p);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| is_executable(p))
}

fn expected_cmdline(argv: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for a in argv {
        out.extend_from_slice(a.as_bytes());
        out.push(0);
    }
    out
}

fn write_pid_files(run_dir: &Path, pid: u32, argv: &[String]) -> io::Result<()> {
    std::fs::write(run_dir.join(CMDLINE_FILE), expected_cmdline(argv))?;
    std::fs::write(run_dir.join(PID_FILE), format!("{pid}\n"))
}

/// Kill the process group recorded in `run_dir/pid` by an earlier agent
/// incarnation, if it is still ours: its leader's `/proc/<pid>/cmdline` is
/// the recorded command, or (leader gone) a member's environment has
/// `FIELDRACK_RUN_DIR=<run_dir>`. Returns the group id killed. Removes the
/// stale pid file either way.
///
/// # Errors
/// I/O errors reading the pid file (a missing file is `Ok(None)`).
pub fn kill_leftover(run_dir: &Path) -> Result<Option<u32>, DriverError> {
    let pid_path = run_dir.join(PID_FILE);
    let text = match std::fs::read_to_string(&pid_path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("cannot read {}", pid_path.display()))(e)),
    };
    let remove = || {
        let _ = std::fs::remove_file(&pid_path);
    };
    let Ok(pgid) = text.trim().parse::<i32>() else {
        remove();
        return Ok(None);
    };
    if pgid <= 1 {
        remove();
        return Ok(None);
    }
    let expected = std::fs::read(run_dir.join(CMDLINE_FILE)).unwrap_or_default();
    let marker = format!(
        "{RUN_DIR_ENV}={}",
        std::path::absolute(run_dir)
            .unwrap_or_else(|_| run_dir.to_owned())
            .display()
    );
    let is_ours = || {
        procfs::group_members(pgid).into_iter().any(|p| {
            (p == pgid
                && !expected.is_empty()
                && procfs::cmdline(p).as_deref() == Some(&expected[..]))
                || procfs::environ_has(p, &marker)
        })
    };
    // A member in the middle of an `exec` shows an empty environment and
    // command line for a moment (the kernel sets them after switching to
    // the new image): look again a few times before calling the group
    // foreign.
    let ours = (0..OWNERSHIP_LOOKS).any(|look| {
        if look > 0 {
            std::thread::sleep(OWNERSHIP_LOOK_GAP);
        }
        is_ours()
    });
    remove();
    // Whatever carries this run dir's marker is a leftover of ours, in the
    // group or not (a process that called setsid).
    let marked = kill_marked(&marker);
    if marked > 0 {
        tracing::warn!(dir = %run_dir.display(), marked, "killed leftovers of an earlier run");
    }
    if !ours {
        return Ok(None);
    }
    match killpg(Pid::from_raw(pgid), Signal::SIGKILL) {
        Ok(()) => Ok(Some(pgid as u32)),
        // The marked members were the whole group and are already gone
        // (their parent reaped them between the two kills): we killed it.
        Err(nix::errno::Errno::ESRCH) if marked > 0 => Ok(Some(pgid as u32)),
        Err(nix::errno::Errno::ESRCH) => Ok(None),
        Err(e) => Err(DriverError::Io {
            what: format!("cannot kill leftover group {pgid}"),
            source: io::Error::from(e),
        }),
    }
}

/// SIGKILL every live process whose environment holds `marker`; how many.
fn kill_marked(marker: &str) -> usize {
    procfs::with_env(marker)
        .into_iter()
        .filter(|pid| nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGKILL).is_ok())
        .count()
}

/// Appends to `<name>.log`, rotating once to `<name>.log.1` at `cap`.
pub(crate) struct LogWriter {
    path: PathBuf,
    file: tokio::fs::File,
    size: u64,
    cap: u64,
}

impl LogWriter {
    pub(crate) async fn open(path: &Path, cap: u64) -> io::Result<Self> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        let size = file.metadata().await?.len();
        Ok(Self {
            path: path.to_owned(),
            file,
            size,
            cap,
        })
    }

    pub(crate) async fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + buf.len() as u64 > self.cap {
            self.rotate().await?;
        }
        self.file.write_all(buf).await?;
        self.size += buf.len() as u64;
        Ok(())
    }

    async fn rotate(&mut self) -> io::Result<()> {
        self.file.flush().await?;
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        tokio::fs::rename(&self.path, &old).await?;
        self.file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)
            .await?;
        self.size = 0;
        Ok(())
    }
}

fn start_log_pump(
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
    mut log: LogWriter,
) -> JoinHandle<()> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(LOG_QUEUE);
    fn reader(
        mut r: impl tokio::io::AsyncRead + Unpin + Send + 'static,
        tx: mpsc::Sender<Vec<u8>>,
    ) {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 || tx.send(buf[..n].to_vec()).await.is_err() {
                    break;
                }
            }
        });
    }
    if let Some(out) = stdout {
        reader(out, tx.clone());
    }
    if let Some(err) = stderr {
        reader(err, tx);
    }
    tokio::spawn(async move {
        let mut failed = false;
        while let Some(chunk) = rx.recv().await {
            if let Err(e) = log.write(&chunk).await {
                if !failed {
                    tracing::warn!(log = %log.path.display(), error = %e, "cannot write appliance log");
                    failed = true;
                }
            }
        }
        let _ = log.file.flush().await;
    })
}

/// The last `lines` lines of a file, for error messages.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(4096);
    let text = String::from_utf8_lossy(&text[start..]);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

#[cfg(test)]
mod tests;
