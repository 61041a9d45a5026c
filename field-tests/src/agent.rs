//! Driving the real `fieldrack` binary: finding (building) it, provisioning a
//! fleet, running agents inside a [`Field`]'s namespaces, reading status.
//!
//! The harness only uses the binary's CLI contract, never crate internals:
//!
//! - `fieldrack fleet init --dir FLEET --racks a,b,c` writes
//!   `FLEET/<rack>/rack.toml` (the real, non-`--local` deployment config);
//! - `fieldrack agent --config FLEET/<rack>/rack.toml` runs a rack in the
//!   foreground until SIGTERM, logging to stderr;
//! - `fieldrack status --config ... --json` prints the [`Status`] of the
//!   agent that config names, via its API on the rack's loopback.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Deserialize;

use crate::netns::Field;

/// How long `stop` waits after SIGTERM before SIGKILL: the contract says an
/// agent stops within 5 s of SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Bound on one `fieldrack status` call, so a hung agent fails a poll
/// instead of hanging the test.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on `fieldrack fleet init`.
const INIT_TIMEOUT: Duration = Duration::from_secs(60);

/// The workspace root: this crate's parent directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("field-tests sits inside the workspace")
        .to_path_buf()
}

/// Path of the `fieldrack` binary to test.
///
/// `FIELDRACK_BIN` wins if set. Otherwise this runs `cargo build -p
/// node-agent` once per process (a no-op when up to date; it guards against
/// testing a stale binary) and returns `target/debug/fieldrack` under the
/// workspace (or `CARGO_TARGET_DIR`). Set `FIELDTESTS_NO_BUILD=1` to skip the
/// build and take whatever binary is there.
///
/// # Errors
/// If the build fails or the binary does not exist.
pub fn fieldrack_bin() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| find_or_build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn find_or_build() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("FIELDRACK_BIN") {
        let bin = PathBuf::from(bin);
        ensure!(
            bin.is_file(),
            "FIELDRACK_BIN={} does not exist",
            bin.display()
        );
        return Ok(bin);
    }
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("debug").join("fieldrack");
    if std::env::var_os("FIELDTESTS_NO_BUILD").is_none() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!("field-tests: cargo build -p node-agent");
        let status = Command::new(cargo)
            .args(["build", "-p", "node-agent"])
            .current_dir(&root)
            .stdin(Stdio::null())
            .status()
            .context("running cargo build -p node-agent")?;
        ensure!(
            status.success(),
            "cargo build -p node-agent failed ({status}); set FIELDRACK_BIN to test a \
             prebuilt binary"
        );
    }
    ensure!(bin.is_file(), "{} does not exist", bin.display());
    Ok(bin)
}

/// Runs `cmd` with piped output, killing it after `timeout`.
///
/// # Errors
/// If it cannot start or does not finish in time (its output so far is in
/// the error).
pub fn output_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = pipe(child.stdout.take().map(|p| Box::new(p) as _));
    let err = pipe(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{cmd:?} did not finish within {timeout:?}; stderr: {}",
            String::from_utf8_lossy(&stderr).trim()
        ),
    }
}

/// A provisioned fleet: configs and logs in a temp dir. Dropping it removes
/// the dir, unless [`Fleet::keep`] was called, the thread is panicking or
/// `FIELDTESTS_KEEP` is set, in which case the path is printed so the logs
/// can be read.
#[derive(Debug)]
pub struct Fleet {
    /// Holds configs (`fleet/<rack>/rack.toml`) and logs (`logs/`).
    dir: Option<tempfile::TempDir>,
    /// The binary the fleet was provisioned with, used for agents too.
    bin: PathBuf,
    /// Rack names, in order.
    racks: Vec<String>,
    /// Set by [`Fleet::keep`]: leave the temp dir behind on Drop.
    keep: bool,
}

impl Fleet {
    /// `fieldrack fleet init` for `racks`, with the default (non-local)
    /// config, using [`fieldrack_bin`].
    ///
    /// # Errors
    /// If the binary cannot be found or built, or `fleet init` fails.
    pub fn provision(racks: &[&str]) -> Result<Fleet> {
        Fleet::provision_with(&fieldrack_bin()?, racks, &[])
    }

    /// `fieldrack fleet init` with `bin`, adding `extra` arguments.
    ///
    /// # Errors
    /// If `fleet init` fails or does not write every rack's config.
    pub fn provision_with(bin: &Path, racks: &[&str], extra: &[&str]) -> Result<Fleet> {
        let dir = tempfile::Builder::new()
            .prefix("fieldrack-fleet-")
            .tempdir()?;
        std::fs::create_dir(dir.path().join("logs"))?;
        let fleet = Fleet {
            dir: Some(dir),
            bin: bin.to_path_buf(),
            racks: racks.iter().map(|r| r.to_string()).collect(),
            keep: false,
        };
        let mut cmd = Command::new(bin);
        cmd.args(["fleet", "init", "--dir"])
            .arg(fleet.fleet_dir())
            .args(["--racks", &racks.join(",")])
            .args(extra);
        let out = output_with_timeout(cmd, INIT_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "fieldrack fleet init failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        for rack in racks {
            let config = fleet.config(rack);
            ensure!(
                config.is_file(),
                "fleet init did not write {}",
                config.display()
            );
        }
        Ok(fleet)
    }

    /// Keeps the temp dir after Drop (for a failed test's logs); returns it.
    pub fn keep(&mut self) -> &Path {
        self.keep = true;
        self.dir()
    }

    /// The temp dir holding everything.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("set until drop").path()
    }

    /// The directory passed to `fleet init --dir`.
    pub fn fleet_dir(&self) -> PathBuf {
        self.dir().join("fleet")
    }

    /// `FLEET/<rack>/rack.toml`.
    pub fn config(&self, rack: &str) -> PathBuf {
        self.fleet_dir().join(rack).join("rack.toml")
    }

    /// Where the rack's agent stderr and stdout go (appended across restarts).
    pub fn log_path(&self, rack: &str) -> PathBuf {
        self.dir().join("logs").join(format!("{rack}.log"))
    }

    /// The binary in use.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Rack names, in order.
    pub fn racks(&self) -> impl Iterator<Item = &str> {
        self.racks.iter().map(String::as_str)
    }

    /// Starts `fieldrack agent` for `rack` inside its namespace in `field`.
    ///
    /// # Errors
    /// If the log cannot be opened or the process cannot start.
    pub fn start(&self, field: &Field, rack: &str) -> Result<Agent> {
        let log_path = self.log_path(rack);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let since_epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        writeln!(
            log,
            "=== field-tests: starting rack {rack} at unix {:.3} ===",
            since_epoch.as_secs_f64()
        )?;
        let mut cmd = field.command(rack, &self.bin)?;
        cmd.arg("agent")
            .arg("--config")
            .arg(self.config(rack))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the agent of rack {rack}"))?;
        Ok(Agent {
            rack: rack.to_owned(),
            child: Some(child),
            log: log_path,
        })
    }

    /// Starts every rack's agent.
    ///
    /// # Errors
    /// As [`Fleet::start`]; agents already started are stopped by Drop.
    pub fn start_all(&self, field: &Field) -> Result<Vec<Agent>> {
        self.racks().map(|r| self.start(field, r)).collect()
    }

    /// `fieldrack status --json` for `rack`, run inside its namespace.
    ///
    /// # Errors
    /// If the command fails, times out, or prints something unparsable.
    pub fn status(&self, field: &Field, rack: &str) -> Result<Status> {
        let mut cmd = field.command(rack, &self.bin)?;
        cmd.arg("status")
            .arg("--config")
            .arg(self.config(rack))
            .arg("--json");
        let out = output_with_timeout(cmd, STATUS_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "fieldrack status for rack {rack} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "parsing status of rack {rack}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs `fieldrack ARGS --config <rack.toml>` inside the rack's
    /// namespace (the CLI talks to that rack's API on its loopback) and
    /// returns its stdout.
    ///
    /// # Errors
    /// If it fails or times out (its output is in the error).
    pub fn cli(&self, field: &Field, rack: &str, args: &[&str]) -> Result<String> {
        let mut cmd = field.command(rack, &self.bin)?;
        cmd.args(args).arg("--config").arg(self.config(rack));
        let out = output_with_timeout(cmd, STATUS_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "fieldrack {} on rack {rack} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `fieldrack events` of `rack`: its recent event log, one JSON object
    /// per event (`seq`, `at_ms`, `kind`, `detail`), oldest first.
    ///
    /// # Errors
    /// If the command fails or prints a line that is not JSON.
    pub fn events(
        &self,
        field: &Field,
        rack: &str,
        limit: usize,
    ) -> Result<Vec<serde_json::Value>> {
        let out = self.cli(field, rack, &["events", "--limit", &limit.to_string()])?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("event line {l:?}")))
            .collect()
    }

    /// Replaces `from` by `to` in every rack's `rack.toml` (before the
    /// agents start), e.g. to snapshot volumes every second.
    ///
    /// # Errors
    /// If a config cannot be rewritten or does not contain `from`.
    pub fn edit_configs(&self, from: &str, to: &str) -> Result<()> {
        for rack in self.racks() {
            let path = self.config(rack);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            ensure!(
                text.contains(from),
                "{} does not contain {from:?}",
                path.display()
            );
            std::fs::write(&path, text.replace(from, to))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// Adds a `[[tile_source]]` named `name` (PNG tiles from the URL
    /// template `url`) to every rack's config.
    ///
    /// # Errors
    /// If a config cannot be read or written.
    pub fn add_tile_source(&self, name: &str, url: &str) -> Result<()> {
        for rack in self.racks() {
            let path = self.config(rack);
            let mut text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            text.push_str(&format!(
                "\n[[tile_source]]\nname = \"{name}\"\nurl = \"{url}\"\nformat = \"png\"\nuser_agent = \"fieldrack-test/1 (ops@example.org)\"\n"
            ));
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// The last `lines` lines of the rack's log.
    pub fn log_tail(&self, rack: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(rack)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Prints, for every rack, the last `lines` log lines that contain
    /// one of `words`, each cut at 220 characters, to stderr: what a failed
    /// test's reader needs first when the whole tails would be cut short.
    pub fn dump_log_lines_with(&self, words: &[&str], lines: usize) {
        for rack in self.racks() {
            let text = std::fs::read_to_string(self.log_path(rack)).unwrap_or_default();
            let hits: Vec<&str> = text
                .lines()
                .filter(|l| words.iter().any(|w| l.contains(w)))
                .collect();
            eprintln!("----- rack {rack}: last {lines} log lines with {words:?} -----");
            for l in &hits[hits.len().saturating_sub(lines)..] {
                let cut = l.char_indices().nth(220).map_or(l.len(), |(i, _)| i);
                eprintln!("{}", &l[..cut]);
            }
        }
    }

    /// Prints the tail of every rack's log to stderr (for failed tests).
    pub fn dump_logs(&self, lines: usize) {
        for rack in self.racks() {
            eprintln!(
                "----- log of rack {rack} (last {lines} lines, {}) -----\n{}",
                self.log_path(rack).display(),
                self.log_tail(rack, lines)
            );
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let keep =
            self.keep || std::thread::panicking() || std::env::var_os("FIELDTESTS_KEEP").is_some();
        if let (true, Some(dir)) = (keep, self.dir.take()) {
            eprintln!("field-tests: keeping fleet dir {}", dir.keep().display());
        }
    }
}

/// A running `fieldrack agent`. Dropping it stops the agent (SIGTERM, then
/// SIGKILL after [`STOP_GRACE`]).
#[derive(Debug)]
pub struct Agent {
    /// Rack name, for messages.
    rack: String,
    /// The process; `None` once stopped.
    child: Option<Child>,
    /// Its log file.
    log: PathBuf,
}

/// How an agent ended.
#[derive(Debug)]
pub struct Stopped {
    /// Its exit status.
    pub status: ExitStatus,
    /// Whether it exited by itself within [`STOP_GRACE`] of SIGTERM.
    pub graceful: bool,
    /// From the signal to the exit.
    pub took: Duration,
}

impl Agent {
    /// The rack it runs.
    pub fn rack(&self) -> &str {
        &self.rack
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL.
    ///
    /// # Errors
    /// If it was already stopped or waiting fails.
    pub fn stop(&mut self) -> Result<Stopped> {
        self.signal_and_wait(Signal::SIGTERM, STOP_GRACE)
    }

    /// SIGKILL, as in a crash or power loss.
    ///
    /// # Errors
    /// If it was already stopped or waiting fails.
    pub fn kill(&mut self) -> Result<Stopped> {
        self.signal_and_wait(Signal::SIGKILL, Duration::ZERO)
    }

    fn signal_and_wait(&mut self, signal: Signal, grace: Duration) -> Result<Stopped> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("agent of rack {} is not running", self.rack))?;
        let start = Instant::now();
        if let Some(status) = child.try_wait()? {
            // Already exited on its own.
            return Ok(Stopped {
                status,
                graceful: false,
                took: Duration::ZERO,
            });
        }
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, signal);
        while start.elapsed() < grace {
            if let Some(status) = child.try_wait()? {
                return Ok(Stopped {
                    status,
                    graceful: true,
                    took: start.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let status = child.wait()?;
        Ok(Stopped {
            status,
            graceful: signal == Signal::SIGKILL,
            took: start.elapsed(),
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            match self.stop() {
                Ok(s) if !s.graceful => eprintln!(
                    "field-tests: agent of rack {} needed SIGKILL ({})",
                    self.rack, s.status
                ),
                Ok(_) => {}
                Err(e) => eprintln!("field-tests: stopping rack {}: {e:#}", self.rack),
            }
        }
    }
}

/// One of `volumes_kept` in the status: a copy of a volume this rack kept
/// when another rack took it over.
#[derive(Clone, Debug, Deserialize)]
pub struct KeptCopy {
    /// The volume.
    pub volume: String,
    /// Its generation here when kept.
    pub generation: u64,
    /// When it was kept (its identity, with `volume`).
    pub kept_ms: u64,
}

/// `fieldrack status --json`. Unknown fields are ignored: the status grows.
#[derive(Clone, Debug, Deserialize)]
pub struct Status {
    /// This rack's name.
    pub rack: String,
    /// This rack's libp2p peer id.
    pub peer_id: String,
    /// Its role (e.g. "rack").
    #[serde(default)]
    pub role: String,
    /// What it knows of the other racks.
    #[serde(default)]
    pub peers: Vec<PeerStatus>,
    /// Power state, kept raw: the harness does not interpret it yet.
    #[serde(default)]
    pub power: serde_json::Value,
    /// Every appliance of the field, as this rack sees it.
    #[serde(default)]
    pub appliances: Vec<ApplianceStatus>,
    /// Volumes held here (owned or replicated).
    #[serde(default)]
    pub volumes: Vec<VolumeStatus>,
    /// Copies this rack kept of volumes another rack took over.
    #[serde(default)]
    pub volumes_kept: Vec<KeptCopy>,
    /// The control plane as this rack sees it; `None` before it starts.
    #[serde(default)]
    pub control: Option<ControlStatus>,
    /// The field view this rack computed; `None` before the control plane
    /// starts.
    #[serde(default)]
    pub field: Option<FieldStatus>,
}

/// `field` of the status: which racks are up, as this rack sees them.
#[derive(Clone, Debug, Deserialize)]
pub struct FieldStatus {
    /// Every rack known.
    #[serde(default)]
    pub racks: Vec<FieldRack>,
}

/// `field.racks[]`.
#[derive(Clone, Debug, Deserialize)]
pub struct FieldRack {
    /// The rack's name.
    pub name: String,
    /// Whether it counts as up.
    #[serde(default)]
    pub up: bool,
    /// How long ago a renewal of its lease was applied here (ms).
    #[serde(default)]
    pub renew_age_ms: Option<u64>,
    /// Streams can be opened to it from here.
    #[serde(default)]
    pub reachable: bool,
    /// Admitted on a connection here.
    #[serde(default)]
    pub admitted: bool,
    /// What SWIM believes of it (none for the local rack).
    #[serde(default)]
    pub membership: Option<String>,
}

/// `appliances[]` of the status: one appliance of the field.
#[derive(Clone, Debug, Deserialize)]
pub struct ApplianceStatus {
    /// Its name.
    pub name: String,
    /// The rack its assignment names, if any.
    #[serde(default)]
    pub owner: Option<String>,
    /// `running`, `starting`, `stopped`, `failed` or `fenced`.
    #[serde(default)]
    pub state: String,
    /// Tier (0 = most important).
    #[serde(default)]
    pub tier: u8,
    /// Assignment epoch.
    #[serde(default)]
    pub epoch: u64,
    /// Seconds in this state, as the owner reports it.
    #[serde(default)]
    pub since_s: Option<f64>,
}

/// `volumes[]` of the status: a volume this rack holds.
#[derive(Clone, Debug, Deserialize)]
pub struct VolumeStatus {
    /// Volume name.
    pub name: String,
    /// Owning rack.
    #[serde(default)]
    pub owner: Option<String>,
    /// Newest generation held here.
    #[serde(default)]
    pub generation: Option<u64>,
    /// Replicas (owner side only).
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
    /// Path of the live raw image (owner side only).
    #[serde(default)]
    pub image: Option<String>,
    /// The transfer in progress, described for an operator.
    #[serde(default)]
    pub transfer: Option<String>,
}

/// `volumes[].replicas[]`.
#[derive(Clone, Debug, Deserialize)]
pub struct ReplicaStatus {
    /// Replica rack.
    pub rack: String,
    /// Newest generation it holds.
    #[serde(default)]
    pub generation: Option<u64>,
}

/// `control` of the status.
#[derive(Clone, Debug, Deserialize)]
pub struct ControlStatus {
    /// `leader`, `follower`, `candidate` or `learner`.
    #[serde(default)]
    pub role: String,
    /// The leader's rack, if known.
    #[serde(default)]
    pub leader: Option<String>,
    /// Current term.
    #[serde(default)]
    pub term: u64,
    /// Voting racks.
    #[serde(default)]
    pub voters: Vec<String>,
    /// A majority of voters answered this rack within one lease.
    #[serde(default)]
    pub majority: bool,
}

/// One peer as seen by a rack.
#[derive(Clone, Debug, Deserialize)]
pub struct PeerStatus {
    /// The peer's rack name.
    pub rack: String,
    /// The peer's libp2p peer id.
    #[serde(default)]
    pub peer_id: String,
    /// Membership state.
    pub state: PeerState,
    /// Last round-trip time, if measured.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// Seconds since the peer was last heard from.
    #[serde(default)]
    pub last_seen_s: Option<f64>,
}

/// Membership state of a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    Alive,
    Suspect,
    Dead,
    /// A state this harness does not know yet.
    #[serde(other)]
    Unknown,
}

impl Status {
    /// The peer entry for `rack`, if this rack knows it.
    pub fn peer(&self, rack: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.rack == rack)
    }

    /// The state of `rack` as seen here; `None` if not known.
    pub fn state_of(&self, rack: &str) -> Option<PeerState> {
        self.peer(rack).map(|p| p.state)
    }

    /// Whether this rack's field view has every one of `racks` up: they
    /// reported and renew, so placement may choose them.
    pub fn sees_up(&self, racks: &[&str]) -> bool {
        self.field.as_ref().is_some_and(|f| {
            racks
                .iter()
                .all(|r| f.racks.iter().any(|x| x.name == *r && x.up))
        })
    }

    /// The appliance `name`, if this rack knows it.
    pub fn appliance(&self, name: &str) -> Option<&ApplianceStatus> {
        self.appliances.iter().find(|a| a.name == name)
    }

    /// The volume `name`, if this rack holds it.
    pub fn volume(&self, name: &str) -> Option<&VolumeStatus> {
        self.volumes.iter().find(|v| v.name == name)
    }

    /// Whether this rack sees a control plane with a leader and `n` voters.
    pub fn has_control_of(&self, n: usize) -> bool {
        self.control
            .as_ref()
            .is_some_and(|c| c.leader.is_some() && c.voters.len() == n)
    }

    /// One-line summary, e.g. `a: b=alive(1.2ms) c=dead`.
    pub fn summary(&self) -> String {
        let peers: Vec<String> = self
            .peers
            .iter()
            .map(|p| match p.rtt_ms {
                Some(rtt) => format!("{}={:?}({rtt:.1}ms)", p.rack, p.state),
                None => format!("{}={:?}", p.rack, p.state),
            })
            .collect();
        format!("{}: {}", self.rack, peers.join(" ")).to_lowercase()
    }
}
