//! `fieldrack doctor`: the readiness check an operator runs on arrival.
//! Every check ends `pass`, `warn` or `fail` with one line saying how to
//! fix it, like kubeadm's preflight checks. Local checks read files and
//! the machine; the field checks ask the running agent. The whole run is
//! bounded by [`DOCTOR_BUDGET`].
//!
//! Each check is a function of what it looked at, so its tests make it
//! fail without breaking the machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use deploy::bundle::{SignedBundle, BUNDLE_MANIFEST};
use deploy::cert::decode_public_key;
use deploy::config::{config_dir, RackConfig, API_TOKEN_FILE};
use deploy::{Certificate, Role};
use libp2p::identity::Keypair;
use libp2p::PeerId;
use serde::Serialize;

use crate::bundle::{hash_file, CONFIG_DIR, TILES_DIR, TILE_PACKS_DIR};
use crate::status::{human_bytes, Status};

/// The longest a doctor run takes: an operator waits for it on arrival,
/// and scripts run it in a loop. Each slow probe (the agent, power
/// telemetry) gets [`PROBE_TIMEOUT`] and they run at once.
pub const DOCTOR_BUDGET: Duration = Duration::from_secs(10);

/// Each network probe's share of [`DOCTOR_BUDGET`].
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(4);

/// A certificate closer than this to its end is a warning: time to ship a
/// new one before it lapses in the field.
pub const CERT_WARN_DAYS: u64 = 30;

/// Below this free space on the data directory's filesystem: fail (a
/// snapshot or a received generation would not fit).
pub const MIN_FREE_BYTES: u64 = 1 << 30;

/// Below this share of the filesystem free: warn.
pub const WARN_FREE_PCT: u64 = 10;

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Fine.
    Pass,
    /// Works, but look at it.
    Warn,
    /// Not ready.
    Fail,
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Short name, stable for scripts (`certificate`, `disk`...).
    pub name: &'static str,
    /// Outcome.
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// How to fix it, one line (empty on pass).
    pub fix: String,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            verdict: Verdict::Pass,
            detail: detail.into(),
            fix: String::new(),
        }
    }
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            verdict: Verdict::Warn,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            verdict: Verdict::Fail,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}

/// Every check of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// In the order run.
    pub checks: Vec<Check>,
}

impl Report {
    /// The worst verdict.
    #[must_use]
    pub fn worst(&self) -> Verdict {
        self.checks
            .iter()
            .map(|c| c.verdict)
            .max()
            .unwrap_or(Verdict::Pass)
    }

    /// The table an operator reads.
    #[must_use]
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for c in &self.checks {
            let word = match c.verdict {
                Verdict::Pass => "pass",
                Verdict::Warn => "WARN",
                Verdict::Fail => "FAIL",
            };
            let _ = writeln!(out, "{word}  {:<16} {}", c.name, c.detail);
            if !c.fix.is_empty() {
                let _ = writeln!(out, "      {:<16} fix: {}", "", c.fix);
            }
        }
        let (p, w, f) = self
            .checks
            .iter()
            .fold((0, 0, 0), |(p, w, f), c| match c.verdict {
                Verdict::Pass => (p + 1, w, f),
                Verdict::Warn => (p, w + 1, f),
                Verdict::Fail => (p, w, f + 1),
            });
        let _ = writeln!(
            out,
            "{}: {p} pass, {w} warn, {f} fail",
            if f == 0 { "ready" } else { "NOT READY" }
        );
        out
    }
}

/// The checks that read only this machine: permissions, certificate,
/// bundle integrity, disk, virtualization, tile packs. ([`power`] and [`field`] need
/// the network and run beside them.)
#[must_use]
pub fn run_local(config_path: &Path, config: &RackConfig, now_s: u64) -> Vec<Check> {
    let dir = config_dir(config_path);
    vec![
        permissions(&[config.identity_key.clone(), dir.join(API_TOKEN_FILE)]),
        certificate(config, now_s),
        bundle(&dir, &config.data_dir),
        disk(&config.data_dir),
        virtualization(&dir, &|tool| find_on_path(tool), Path::new("/dev/kvm")),
        tile_packs(&dir, &config.data_dir),
    ]
}

/// Keys and token readable by the agent's user only.
#[must_use]
pub fn permissions(secrets: &[PathBuf]) -> Check {
    use std::os::unix::fs::PermissionsExt;
    for path in secrets {
        match std::fs::metadata(path) {
            Err(e) => {
                return Check::fail(
                    "permissions",
                    format!("{}: {e}", path.display()),
                    "reinstall the rack's bundle (fieldrack install BUNDLE)",
                )
            }
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                return Check::fail(
                    "permissions",
                    format!(
                        "{} is mode {:o}: others can read a secret",
                        path.display(),
                        m.permissions().mode() & 0o777
                    ),
                    format!("chmod 600 {}", path.display()),
                )
            }
            Ok(_) => {}
        }
    }
    Check::pass("permissions", "identity key and API token are mode 600")
}

/// The certificate verifies against the fleet key, is bound to our
/// identity, and is not near its end.
#[must_use]
pub fn certificate(config: &RackConfig, now_s: u64) -> Check {
    const FIX: &str = "issue a new one on the laptop (fieldrack fleet bundle) and reinstall";
    let loaded = (|| -> anyhow::Result<deploy::CertBody> {
        let key = Keypair::from_protobuf_encoding(&std::fs::read(&config.identity_key)?)?;
        let cert = Certificate::from_json(&std::fs::read_to_string(&config.certificate)?)?;
        let fleet = decode_public_key(&config.fleet.public_key)?;
        // Verify at not_before's side of now only for the binding; expiry
        // is judged below with a margin.
        let body = cert.verify(
            &fleet,
            &config.fleet.name,
            &PeerId::from(key.public()),
            now_s,
        );
        match body {
            Ok(b) => Ok(b),
            Err(deploy::CertError::Expired { not_after, .. }) if now_s >= not_after => {
                anyhow::bail!("expired {} days ago", (now_s - not_after) / 86_400)
            }
            Err(e) => Err(e.into()),
        }
    })();
    match loaded {
        Err(e) => Check::fail(
            "certificate",
            format!("{}: {e:#}", config.certificate.display()),
            FIX,
        ),
        Ok(body) => {
            let days = body.not_after.saturating_sub(now_s) / 86_400;
            if days < CERT_WARN_DAYS {
                Check::warn("certificate", format!("expires in {days} days"), FIX)
            } else {
                Check::pass("certificate", format!("valid for {days} more days"))
            }
        }
    }
}

/// Installed configuration and tile packs still match the signed bundle
/// manifest they came from.
#[must_use]
pub fn bundle(config_dir: &Path, data_dir: &Path) -> Check {
    const FIX: &str = "reinstall the rack's bundle (fieldrack install BUNDLE)";
    let manifest = config_dir.join(BUNDLE_MANIFEST);
    let Ok(text) = std::fs::read_to_string(&manifest) else {
        return Check::warn(
            "bundle",
            format!("no {} (not installed from a bundle)", manifest.display()),
            "install from a bundle built by fieldrack fleet bundle",
        );
    };
    let body = match SignedBundle::from_json(&text).and_then(|s| {
        let config = RackConfig::parse(
            &std::fs::read_to_string(config_dir.join("rack.toml")).unwrap_or_default(),
            Path::new("rack.toml"),
        )
        .map_err(|e| deploy::bundle::BundleError::Malformed(e.to_string()))?;
        let key = decode_public_key(&config.fleet.public_key)
            .map_err(|e| deploy::bundle::BundleError::Malformed(e.to_string()))?;
        s.verify(&key)
    }) {
        Ok(b) => b,
        Err(e) => return Check::fail("bundle", format!("{}: {e}", manifest.display()), FIX),
    };
    let mut checked = 0;
    for (rel, want) in &body.files {
        let installed = if let Some(name) = rel.strip_prefix(&format!("{CONFIG_DIR}/")) {
            config_dir.join(name)
        } else if let Some(name) = rel.strip_prefix(&format!("{TILES_DIR}/")) {
            data_dir.join(TILE_PACKS_DIR).join(name)
        } else {
            continue; // data changes as the rack runs; the unit is rendered
        };
        match hash_file(&installed, &mut |_| {}) {
            Ok(found) if found == *want => checked += 1,
            Ok(_) => {
                return Check::fail(
                    "bundle",
                    format!("{} differs from the signed bundle", installed.display()),
                    FIX,
                )
            }
            Err(e) => return Check::fail("bundle", format!("{}: {e}", installed.display()), FIX),
        }
    }
    Check::pass(
        "bundle",
        format!(
            "{checked} installed files match the signed bundle of {}",
            body.rack
        ),
    )
}

/// Free space on the data directory's filesystem.
#[must_use]
pub fn disk(data_dir: &Path) -> Check {
    let probe = existing_parent(data_dir);
    match probe.map(rustix::fs::statvfs) {
        Some(Ok(s)) => disk_verdict(
            s.f_bavail * s.f_frsize,
            s.f_blocks * s.f_frsize,
            &datastore::volume::fsinfo::filesystem_name(probe.unwrap_or(data_dir)),
        ),
        Some(Err(e)) => Check::fail(
            "disk",
            format!("{}: {e}", data_dir.display()),
            "check the disk is mounted",
        ),
        None => Check::fail(
            "disk",
            format!("{} does not exist", data_dir.display()),
            "check the disk is mounted",
        ),
    }
}

/// `path` or its first existing parent (a data directory not created
/// yet lives on its parent's filesystem).
fn existing_parent(path: &Path) -> Option<&Path> {
    std::iter::successors(Some(path), |p| p.parent()).find(|p| p.exists())
}

/// [`disk`] from the figures (pure).
#[must_use]
pub fn disk_verdict(free: u64, total: u64, filesystem: &str) -> Check {
    let detail = format!(
        "{} free of {} ({filesystem})",
        human_bytes(free),
        human_bytes(total)
    );
    if free < MIN_FREE_BYTES {
        Check::fail(
            "disk",
            detail,
            "free space: fieldrack volume status shows what is held; prune or add a disk",
        )
    } else if free.saturating_mul(100) < total.saturating_mul(WARN_FREE_PCT) {
        Check::warn(
            "disk",
            detail,
            "less than 10% free: plan more disk before new appliances arrive",
        )
    } else if filesystem == "tmpfs" {
        Check::warn("disk", detail, "the data directory is in memory: put it on a disk (XFS or btrfs for reflink snapshots)")
    } else {
        Check::pass("disk", detail)
    }
}

/// `/dev/kvm`, `qemu-system-x86_64` and `setpriv`: a failure when the
/// catalog beside rack.toml has a VM appliance, a warning otherwise.
#[must_use]
pub fn virtualization(
    config_dir: &Path,
    find: &dyn Fn(&str) -> Option<PathBuf>,
    kvm: &Path,
) -> Check {
    let needs_vm = deploy::appliance::load(&config_dir.join(crate::bundle::APPLIANCES_FILE))
        .map(|apps| apps.iter().any(|a| a.driver == deploy::DriverKind::Qemu))
        .unwrap_or(false);
    let mut missing = Vec::new();
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm)
        .is_err()
    {
        missing.push(kvm.display().to_string());
    }
    for tool in ["qemu-system-x86_64", "setpriv"] {
        if find(tool).is_none() {
            missing.push(tool.to_string());
        }
    }
    if missing.is_empty() {
        return Check::pass(
            "virtualization",
            "/dev/kvm, qemu-system-x86_64 and setpriv present",
        );
    }
    let detail = format!("missing: {}", missing.join(", "));
    let fix = "enable VT-x/AMD-V in firmware; apt install qemu-system-x86 util-linux";
    if needs_vm {
        Check::fail("virtualization", detail, fix)
    } else {
        Check::warn(
            "virtualization",
            format!("{detail} (no VM appliance in the catalog)"),
            fix,
        )
    }
}

/// An executable named `tool` on `$PATH`.
#[must_use]
pub fn find_on_path(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(tool))
            .find(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    })
}

/// One power telemetry reading, as the agent would take it.
pub async fn power(config: &RackConfig) -> Check {
    let p = &config.power;
    let fix = "check the UPS/generator link and [power] in rack.toml";
    let read = async {
        if let Some(nut) = &p.nut {
            crate::power::read_nut(nut)
                .await
                .map(|vars| deploy::power::status_from_nut(&vars, p.dying_runtime_s))
                .map_err(|e| e.to_string())
        } else if let Some(file) = &p.file {
            let bytes = crate::power::read_power_file(file)
                .await
                .map_err(|e| e.to_string())?;
            deploy::power::parse_generator_json(&bytes, p.dying_runtime_s)
                .map_err(|e| e.to_string())
        } else if let Some(cmd) = &p.command {
            let bytes = crate::power::run_power_command(cmd)
                .await
                .map_err(|e| e.to_string())?;
            deploy::power::parse_generator_json(&bytes, p.dying_runtime_s)
                .map_err(|e| e.to_string())
        } else {
            Err(String::new())
        }
    };
    if p.nut.is_none() && p.file.is_none() && p.command.is_none() {
        return Check::pass("power", "grid, no telemetry configured");
    }
    match tokio::time::timeout(PROBE_TIMEOUT, read).await {
        Err(_) => Check::fail("power", "no reading within 4 s", fix),
        Ok(Err(e)) => Check::fail("power", e, fix),
        Ok(Ok(s)) if s.dying => Check::warn(
            "power",
            format!("{:?}, dying", s.source),
            "restore power or shut appliances down",
        ),
        Ok(Ok(s)) => Check::pass("power", format!("{:?} readable", s.source)),
    }
}

/// The checks that need the running agent's view of the field;
/// `expected_peers` is how many members the rack should see (its
/// bootstrap list).
#[must_use]
pub fn field(status: Result<&Status, String>, expected_peers: usize, role: Role) -> Vec<Check> {
    let s = match status {
        Ok(s) => s,
        Err(e) => {
            return vec![Check::fail(
                "agent",
                e,
                "start it: systemctl start fieldrack (journalctl -u fieldrack says why it stopped)",
            )]
        }
    };
    let mut out = vec![Check::pass(
        "agent",
        format!("running for {:.0} s", s.uptime_s),
    )];
    // Peers: every member named in the bootstrap list admitted and alive.
    let expected = expected_peers;
    let alive = s
        .peers
        .iter()
        .filter(|p| p.state == mesh::membership::State::Alive)
        .count();
    out.push(if expected == 0 || alive >= expected {
        Check::pass("peers", format!("{alive} peers alive and admitted"))
    } else if alive == 0 {
        Check::fail("peers", format!("0 of {expected} peers reachable"), "check the radio link and that peers run: fieldrack discover; ping the addresses in mesh.bootstrap")
    } else {
        Check::warn("peers", format!("{alive} of {expected} peers alive"), "fieldrack status lists which peers are missing")
    });
    out.push(match s.control.as_ref() {
        Some(c) if c.majority => Check::pass(
            "majority",
            format!(
                "a majority of voters answers; leader {}",
                c.leader.as_deref().unwrap_or("unknown")
            ),
        ),
        _ => Check::fail(
            "majority",
            "no majority of voters answered within a lease (a leader remembered from before a restart does not count)",
            "bring up more racks or witnesses; see fieldrack status",
        ),
    });
    if role == Role::Rack {
        out.push(replicas(s));
    }
    out.push(backhaul(s.cache.as_ref()));
    out
}

/// One line for `fieldrack status`: the field checks of [`field`] as
/// the agent sees them (every peer it knows expected alive).
#[must_use]
pub fn readiness_line(s: &Status) -> String {
    let checks = field(Ok(s), s.peers.len(), s.role);
    let failing: Vec<String> = checks
        .iter()
        .filter(|c| c.verdict != Verdict::Pass)
        .map(|c| format!("{} ({})", c.name, c.detail))
        .collect();
    let worst = checks
        .iter()
        .map(|c| c.verdict)
        .max()
        .unwrap_or(Verdict::Pass);
    match worst {
        Verdict::Pass => format!(
            "readiness: ready ({})",
            checks
                .iter()
                .skip(1)
                .map(|c| c.detail.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        ),
        Verdict::Warn => format!("readiness: ready, with warnings: {}", failing.join("; ")),
        Verdict::Fail => format!("readiness: NOT READY: {}", failing.join("; ")),
    }
}

/// A volume has a replica holding its owner's latest generation.
#[must_use]
pub fn in_sync(v: &crate::volumes::VolumeStatus) -> bool {
    v.replicas
        .iter()
        .any(|r| r.generation.is_some() && r.generation >= v.generation)
}

/// Every volume this rack owns has a replica at its generation.
#[must_use]
pub fn replicas(s: &Status) -> Check {
    let owned: Vec<_> = s
        .volumes
        .iter()
        .filter(|v| v.owner.as_deref() == Some(s.rack.as_str()))
        .collect();
    let mut behind = Vec::new();
    let mut none = Vec::new();
    for v in &owned {
        if v.replicas.is_empty() {
            none.push(v.name.clone());
        } else if !in_sync(v) {
            behind.push(v.name.clone());
        }
    }
    if !none.is_empty() {
        Check::fail(
            "replicas",
            format!("no replica for: {}", none.join(", ")),
            "bring up a second rack; fieldrack volume status shows where copies go",
        )
    } else if !behind.is_empty() {
        Check::warn(
            "replicas",
            format!("replicas behind for: {}", behind.join(", ")),
            "wait for replication (fieldrack volume status shows the ETA)",
        )
    } else {
        Check::pass(
            "replicas",
            format!("{} owned volumes each have a replica in sync", owned.len()),
        )
    }
}

/// A peer's clock this far from ours is a warning: event logs, drill
/// reports and the time-to-protected timeline stop lining up.
pub const CLOCK_WARN_S: f64 = 2.0;

/// A peer's clock this far from ours fails: certificates are judged by
/// wall-clock time (`not_before` / `not_after`, rechecked every second),
/// so a rack whose clock is minutes off refuses, or is refused by, peers
/// around a renewal or a freshly issued certificate.
pub const CLOCK_FAIL_S: f64 = 30.0;

/// Each peer's clock probe: well inside [`DOCTOR_BUDGET`] after the
/// agent's own [`PROBE_TIMEOUT`].
pub const CLOCK_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The volume store's filesystem: reflink (XFS, btrfs) keeps snapshots
/// cheap; without it a snapshot of a written image reads all of it.
/// `store` is what the running agent found; without it the data
/// directory's filesystem is named and XFS/btrfs assumed to reflink.
#[must_use]
pub fn filesystem(store: Option<&datastore::VolumeStoreInfo>, data_dir: &Path) -> Check {
    match store {
        Some(s) => filesystem_verdict(&s.filesystem, s.reflink, true),
        None => {
            let probe = existing_parent(data_dir).unwrap_or(data_dir);
            let fs = datastore::volume::fsinfo::filesystem_name(probe);
            let reflink = fs == "xfs" || fs == "btrfs";
            filesystem_verdict(&fs, reflink, false)
        }
    }
}

/// [`filesystem`] from what was found (pure); `probed`: the agent tried a
/// reflink clone (otherwise it is guessed from the name).
#[must_use]
pub fn filesystem_verdict(fs: &str, reflink: bool, probed: bool) -> Check {
    const FIX: &str =
        "put the data directory on XFS (mkfs.xfs -m reflink=1) or btrfs for cheap snapshots";
    let how = if probed {
        ""
    } else {
        " (agent not running: guessed from the name)"
    };
    if reflink {
        Check::pass(
            "filesystem",
            format!("{fs} with reflink: snapshots read only what changed{how}"),
        )
    } else if fs == "tmpfs" {
        Check::warn(
            "filesystem",
            "tmpfs: volumes are lost at power-off (a demo or test rack)",
            FIX,
        )
    } else {
        Check::warn(
            "filesystem",
            format!("{fs} without reflink: every snapshot of a written volume reads and hashes all of it{how}"),
            FIX,
        )
    }
}

/// The tile packs the installed bundle carried, in place at their signed
/// size (content is [`bundle`]'s business) and imported into their
/// source's cache, pinned.
#[must_use]
pub fn tile_packs(config_dir: &Path, data_dir: &Path) -> Check {
    let packs: Vec<PackSeen> = crate::tile_packs::bundled(config_dir, data_dir)
        .into_iter()
        .map(|p| PackSeen {
            found: std::fs::metadata(&p.path).ok().map(|m| m.len()),
            imported: p.imported(),
            path: p.path,
            want: p.size,
        })
        .collect();
    tile_packs_verdict(&packs)
}

/// A bundled tile pack as `doctor` finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackSeen {
    /// Where it is installed.
    pub path: PathBuf,
    /// Its signed size.
    pub want: u64,
    /// Its size on disk, if there.
    pub found: Option<u64>,
    /// Imported into its source's cache since it was installed.
    pub imported: bool,
}

/// [`tile_packs`] from what was found (pure).
#[must_use]
pub fn tile_packs_verdict(packs: &[PackSeen]) -> Check {
    const FIX: &str = "reinstall the rack's bundle (fieldrack install BUNDLE)";
    if packs.is_empty() {
        return Check::pass("tile-packs", "no tile pack in this rack's bundle");
    }
    for p in packs {
        match p.found {
            None => return Check::fail("tile-packs", format!("{} missing", p.path.display()), FIX),
            Some(n) if n != p.want => {
                return Check::fail(
                    "tile-packs",
                    format!(
                        "{} is {} of {} (incomplete copy)",
                        p.path.display(),
                        human_bytes(n),
                        human_bytes(p.want)
                    ),
                    FIX,
                )
            }
            Some(_) => {}
        }
    }
    let waiting: Vec<&PackSeen> = packs.iter().filter(|p| !p.imported).collect();
    if let Some(first) = waiting.first() {
        return Check::warn(
            "tile-packs",
            format!(
                "{} of {} tile packs not yet in the map cache ({} first)",
                waiting.len(),
                packs.len(),
                first.path.display()
            ),
            "the agent imports them at start; if this persists, journalctl -u fieldrack says why (event tile_pack_imported when done)",
        );
    }
    Check::pass(
        "tile-packs",
        format!(
            "{} tile packs of the bundle in place and pinned in the map cache",
            packs.len()
        ),
    )
}

/// The backhaul as the proxy sees it (`cache` of the status): pass when
/// this rack's uplink or another rack's (the shared backhaul) is up,
/// warn when only cached content can be served.
#[must_use]
pub fn backhaul(cache: Option<&serde_json::Value>) -> Check {
    let Some(c) = cache else {
        return Check::pass("backhaul", "no proxy on this rack");
    };
    let uplink = c.get("uplink").and_then(|v| v.as_str()).unwrap_or("down");
    let field = c
        .get("field_uplinks")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let own = u64::from(uplink != "down");
    let others = field.saturating_sub(own);
    const FIX: &str = "check the satellite/cellular modem and [proxy] upstream; until then only cached and pinned content is served";
    match uplink {
        "up" => Check::pass(
            "backhaul",
            format!("own uplink up ({others} other racks' uplinks in use)"),
        ),
        _ if others > 0 => Check::pass(
            "backhaul",
            format!("own uplink {uplink}; {others} other racks' uplinks shared through the mesh"),
        ),
        "degraded" => Check::warn(
            "backhaul",
            "own uplink degraded, no other rack's uplink",
            FIX,
        ),
        _ => Check::warn(
            "backhaul",
            "no uplink up in the field: cached service only",
            FIX,
        ),
    }
}

/// Clock skew against every alive peer whose API address the status
/// carries: each peer's HTTP `Date` (any answer carries one, an
/// unauthenticated refusal too) against our clock at the middle of the
/// exchange.
pub async fn clock(status: Option<&Status>) -> Check {
    let Some(s) = status else {
        return clock_verdict(&[]);
    };
    let probes = s
        .peers
        .iter()
        .filter(|p| p.state == mesh::membership::State::Alive)
        .filter_map(|p| {
            let api = p.api.clone()?;
            let name = p.rack.clone().unwrap_or_else(|| p.peer_id.clone());
            Some(async move {
                let r = tokio::time::timeout(CLOCK_PROBE_TIMEOUT, peer_clock_skew(&api))
                    .await
                    .unwrap_or_else(|_| Err(format!("{api}: no answer within 2 s")));
                (name, r)
            })
        });
    let skews = futures::future::join_all(probes).await;
    clock_verdict(&skews)
}

/// One peer's clock minus ours, in seconds (±0.5 s: `Date` has whole
/// seconds).
async fn peer_clock_skew(api: &str) -> Result<f64, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = api
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let t0 = util::time::unix_ms() as f64 / 1000.0;
    let mut conn = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
        crate::api::paths::STATUS
    );
    conn.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    let head = loop {
        let n = conn
            .read(&mut buf[len..])
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        len += n;
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        if text.contains("\r\n\r\n") || n == 0 || len == buf.len() {
            break text;
        }
    };
    let t1 = util::time::unix_ms() as f64 / 1000.0;
    let date = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("date")
                .then(|| v.trim().to_owned())
        })
        .ok_or_else(|| format!("{addr}: no Date header in the answer"))?;
    let peer = parse_http_date(&date).ok_or_else(|| format!("{addr}: bad Date {date:?}"))?;
    Ok(peer as f64 + 0.5 - (t0 + t1) / 2.0)
}

/// Unix seconds of an IMF-fixdate (`Wed, 02 Dec 2026 05:23:35 GMT`).
#[must_use]
pub fn parse_http_date(s: &str) -> Option<u64> {
    let mut f = s.split_whitespace().skip(1);
    let day: i64 = f.next()?.parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| Some(*m) == f.clone().next())? as i64
        + 1;
    f.next();
    let year: i64 = f.next()?.parse().ok()?;
    let mut hms = f.next()?.split(':').map(|x| x.parse::<i64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if f.next()? != "GMT" {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + m * 60 + sec).ok()
}

/// [`clock`] from each peer's skew or why it could not be read (pure).
#[must_use]
pub fn clock_verdict(skews: &[(String, Result<f64, String>)]) -> Check {
    const FIX: &str = "set the clock: chronyc makestep (or date -s from a GPS/phone), then keep chrony on every rack";
    let read: Vec<(&str, f64)> = skews
        .iter()
        .filter_map(|(n, r)| r.as_ref().ok().map(|s| (n.as_str(), *s)))
        .collect();
    let Some((worst, skew)) = read
        .iter()
        .copied()
        .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
    else {
        let why = skews
            .first()
            .and_then(|(n, r)| r.as_ref().err().map(|e| format!(": {n}: {e}")))
            .unwrap_or_default();
        return Check::warn(
            "clock",
            format!("no peer's clock readable{why}"),
            "run doctor again once peers are up (fieldrack status lists them)",
        );
    };
    let detail = format!("{} peers read; worst {worst} {:+.1} s", read.len(), skew);
    if skew.abs() > CLOCK_FAIL_S {
        Check::fail("clock", detail, FIX)
    } else if skew.abs() > CLOCK_WARN_S {
        Check::warn("clock", detail, FIX)
    } else {
        Check::pass("clock", detail)
    }
}

#[cfg(test)]
mod tests;
