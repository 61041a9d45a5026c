//! Appliance manifests: what a rack runs, as operators write it.
//!
//! A manifest file holds `[[appliance]]` tables:
//!
//! ```toml
//! [[appliance]]
//! name = "registry"             # [a-z0-9][a-z0-9-]*, at most 63 chars, unique
//! driver = "process"            # "process" | "qemu"
//! command = ["/usr/bin/python3", "registry.py"]   # process: required
//! # image = "/srv/images/os.qcow2"  # qemu: disk to boot (else the first volume)
//! cpus = 1                      # default 1
//! memory_mb = 64                # default 64 (process), 256 (qemu)
//! tier = 0                      # 0 (most important) ..= 3, default 2
//! after = ["db"]                # start after these appliances
//! stop_grace_ms = 3000          # SIGTERM, then SIGKILL after this long
//! env = { MODE = "field" }      # identifiers; FIELDRACK_* is reserved
//!
//! [[appliance.volume]]
//! name = "registry-data"        # same rule as appliance names
//! size = "64M"                  # bytes or K/M/G/T (binary); a multiple of 4096
//!
//! [appliance.health]            # optional
//! kind = "tcp"                  # "tcp" { port, host? } | "http" { url, status? } | "command" { command }
//! port = 5000
//! interval_ms = 1000            # default 1000
//! timeout_ms = 1000             # default 1000
//! start_grace_ms = 30000        # a starting appliance may be unhealthy this long
//!
//! [appliance.restart]
//! policy = "on-failure"         # "always" | "on-failure" | "never"
//! max_restarts = 5              # within window_s, then the appliance is failed
//! window_s = 300
//!
//! [appliance.placement]
//! racks = ["a"]                 # preferred racks
//! sites = ["north"]             # preferred sites
//! anti_affinity = ["registry-b"] # never on the same rack as these
//! ```
//!
//! [`parse_manifest`] parses and validates one file; [`check_dependencies`]
//! checks `after` across the whole deployed set. Every type round-trips
//! through serde (JSON for replication, TOML via [`to_toml`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

/// Longest appliance or volume name.
pub const MAX_NAME: usize = 63;
/// Highest (least important) tier.
pub const MAX_TIER: u8 = 3;
/// Volume sizes must be a multiple of this (the block size drivers expose).
pub const VOLUME_ALIGN: u64 = 4096;
/// Prefix of the environment variables the drivers set; reserved.
pub const RESERVED_ENV_PREFIX: &str = "FIELDRACK_";

/// How an appliance is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// A process group on the rack.
    Process,
    /// A QEMU virtual machine.
    Qemu,
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriverKind::Process => "process",
            DriverKind::Qemu => "qemu",
        })
    }
}

/// One `[[appliance]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawSpec")]
pub struct ApplianceSpec {
    /// Unique in the fleet; `[a-z0-9][a-z0-9-]*`, at most 63 chars.
    pub name: String,
    /// `process` or `qemu`.
    pub driver: DriverKind,
    /// Process: the program and its arguments (required, non-empty).
    /// QEMU: must be empty.
    pub command: Vec<String>,
    /// QEMU: a disk image to boot (attached copy-on-write, never modified);
    /// without it the first volume is the boot disk. Process: must be unset.
    pub image: Option<String>,
    /// Replicated disks (`[[appliance.volume]]`).
    pub volume: Vec<VolumeSpec>,
    /// Virtual CPUs (QEMU) or the CPU share the scheduler reserves.
    pub cpus: u32,
    /// Memory in MiB; default 64 for `process`, 256 for `qemu`.
    pub memory_mb: u64,
    /// 0 (most important) ..= 3; lower tiers are placed and restarted first.
    pub tier: u8,
    /// Appliances that must be running before this one starts.
    pub after: Vec<String>,
    /// Health check; none means "running is healthy".
    pub health: Option<HealthSpec>,
    /// What to do when the appliance exits or fails its health check.
    pub restart: RestartPolicy,
    /// Where it should (and must not) run.
    pub placement: Placement,
    /// Extra environment for the appliance.
    pub env: BTreeMap<String, String>,
    /// Time between SIGTERM (QEMU: QMP `quit`) and SIGKILL on stop.
    pub stop_grace_ms: u64,
}

/// The deserialised form: like [`ApplianceSpec`] but `memory_mb` may be
/// absent, because its default depends on `driver`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    driver: DriverKind,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    volume: Vec<VolumeSpec>,
    #[serde(default = "default_cpus")]
    cpus: u32,
    #[serde(default)]
    memory_mb: Option<u64>,
    #[serde(default = "default_tier")]
    tier: u8,
    #[serde(default)]
    after: Vec<String>,
    #[serde(default)]
    health: Option<HealthSpec>,
    #[serde(default)]
    restart: RestartPolicy,
    #[serde(default)]
    placement: Placement,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default = "default_stop_grace_ms")]
    stop_grace_ms: u64,
}

impl From<RawSpec> for ApplianceSpec {
    fn from(r: RawSpec) -> Self {
        Self {
            memory_mb: r.memory_mb.unwrap_or(default_memory_mb(r.driver)),
            name: r.name,
            driver: r.driver,
            command: r.command,
            image: r.image,
            volume: r.volume,
            cpus: r.cpus,
            tier: r.tier,
            after: r.after,
            health: r.health,
            restart: r.restart,
            placement: r.placement,
            env: r.env,
            stop_grace_ms: r.stop_grace_ms,
        }
    }
}

/// Default memory for a driver: a process is small, a VM needs firmware
/// and a kernel.
pub fn default_memory_mb(driver: DriverKind) -> u64 {
    match driver {
        DriverKind::Process => 64,
        DriverKind::Qemu => 256,
    }
}

fn default_cpus() -> u32 {
    1
}
fn default_tier() -> u8 {
    2
}
fn default_stop_grace_ms() -> u64 {
    3_000
}

/// `[[appliance.volume]]`: a replicated raw disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// `[a-z0-9][a-z0-9-]*`, at most 63 chars, unique per appliance.
    pub name: String,
    /// Bytes. Written as a number of bytes or `"64M"`, `"4G"` (binary
    /// suffixes K, M, G, T, optionally followed by `i`/`B`); serialised as
    /// a number.
    #[serde(deserialize_with = "deserialize_size")]
    pub size: u64,
}

/// `[appliance.health]`: the probe plus its timings.
///
/// ```toml
/// [appliance.health]
/// kind = "http"
/// url = "http://127.0.0.1:8080/healthz"
/// status = 200          # optional; default: any 2xx
/// interval_ms = 1000
/// timeout_ms = 1000
/// start_grace_ms = 30000
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    /// The probe (its `kind` and fields sit in the same table).
    #[serde(flatten)]
    pub check: HealthCheck,
    /// Time between probes.
    #[serde(default = "default_health_ms")]
    pub interval_ms: u64,
    /// One probe fails if it takes longer than this.
    #[serde(default = "default_health_ms")]
    pub timeout_ms: u64,
    /// How long a starting appliance may be unhealthy before it counts as
    /// failed.
    #[serde(default = "default_start_grace_ms")]
    pub start_grace_ms: u64,
}

fn default_health_ms() -> u64 {
    1_000
}
fn default_start_grace_ms() -> u64 {
    30_000
}

/// One health probe, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum HealthCheck {
    /// A TCP connect succeeds.
    Tcp {
        /// Port to connect to (not 0).
        port: u16,
        /// Host; default `127.0.0.1`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
    },
    /// An HTTP/1.1 GET answers with `status` (default: any 2xx).
    Http {
        /// `http://host[:port]/path` (no TLS).
        url: String,
        /// Expected status; default any 2xx.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
    },
    /// A command exits 0.
    Command {
        /// Program and arguments.
        command: Vec<String>,
    },
}

/// When an exited or unhealthy appliance is restarted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    /// Whatever the exit status.
    Always,
    /// Unless it exited with status 0.
    #[default]
    OnFailure,
    /// Never; an exit is final.
    Never,
}

/// `[appliance.restart]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartPolicy {
    /// `always`, `on-failure` (default) or `never`.
    pub policy: RestartMode,
    /// At most this many restarts within `window_s`; then the appliance is
    /// failed on this rack.
    pub max_restarts: u32,
    /// The window for `max_restarts`, seconds.
    pub window_s: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            policy: RestartMode::OnFailure,
            max_restarts: 5,
            window_s: 300,
        }
    }
}

/// `[appliance.placement]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Placement {
    /// Preferred racks, best first.
    pub racks: Vec<String>,
    /// Preferred sites, best first.
    pub sites: Vec<String>,
    /// Appliances this one never shares a rack with.
    pub anti_affinity: Vec<String>,
}

/// Which appliance an error is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// One with a valid name.
    Named(String),
    /// The i-th `[[appliance]]` of the file (0-based), when its name is
    /// missing or invalid.
    Index(usize),
}

/// Why a manifest was refused. The message names the appliance, the field
/// and the reason: `appliance "registry": tier: must be 0..=3, got 7`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An error in a file (adds its path to the message).
    #[error("{path}: {source}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        source: Box<ManifestError>,
    },
    /// Not TOML, or not the manifest's shape at the top level.
    #[error("{message}")]
    Syntax {
        /// toml's message (with line and column) or ours.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("{}", fmt_invalid(subject, field, reason))]
    Invalid {
        /// Which appliance.
        subject: Subject,
        /// Dotted field, e.g. `volume[0].size`; empty when the whole table
        /// is refused by the deserialiser (the reason then names the key).
        field: String,
        /// Why.
        reason: String,
    },
}

fn fmt_invalid(subject: &Subject, field: &str, reason: &str) -> String {
    match (subject, field.is_empty()) {
        (Subject::Named(n), true) => format!("appliance {n:?}: {reason}"),
        (Subject::Named(n), false) => format!("appliance {n:?}: {field}: {reason}"),
        (Subject::Index(i), true) => format!("appliance[{i}]: {reason}"),
        (Subject::Index(i), false) => format!("appliance[{i}].{field}: {reason}"),
    }
}

impl ManifestError {
    /// The offending field, if the error names one (through `InFile`).
    pub fn field(&self) -> Option<&str> {
        match self {
            ManifestError::Invalid { field, .. } if !field.is_empty() => Some(field),
            ManifestError::InFile { source, .. } => source.field(),
            _ => None,
        }
    }

    /// The appliance the error is about, if any (through `InFile`).
    pub fn subject(&self) -> Option<&Subject> {
        match self {
            ManifestError::Invalid { subject, .. } => Some(subject),
            ManifestError::InFile { source, .. } => source.subject(),
            _ => None,
        }
    }
}

/// The top level of a manifest file.
#[derive(Serialize)]
struct ManifestFile<'a> {
    appliance: &'a [ApplianceSpec],
}

/// Parse and validate one manifest file's text.
///
/// # Errors
/// [`ManifestError::Syntax`] or [`ManifestError::Invalid`], naming the
/// appliance and field.
pub fn parse_manifest(text: &str) -> Result<Vec<ApplianceSpec>, ManifestError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| ManifestError::Syntax {
        message: e.to_string().trim_end().replace('\n', " "),
    })?;
    let mut items = Vec::new();
    for (key, value) in table {
        if key != "appliance" {
            return Err(ManifestError::Syntax {
                message: format!("unknown top-level key `{key}` (expected [[appliance]] tables)"),
            });
        }
        match value {
            toml::Value::Array(a) => items = a,
            _ => {
                return Err(ManifestError::Syntax {
                    message: "`appliance` must be an array of tables ([[appliance]])".into(),
                })
            }
        }
    }
    let mut specs: Vec<ApplianceSpec> = Vec::with_capacity(items.len());
    let mut seen = BTreeSet::new();
    for (i, value) in items.into_iter().enumerate() {
        let subject = match value.get("name").and_then(|n| n.as_str()) {
            Some(n) if validate_name(n).is_ok() => Subject::Named(n.to_string()),
            _ => Subject::Index(i),
        };
        let spec: ApplianceSpec = match value {
            toml::Value::Table(_) => {
                value
                    .try_into()
                    .map_err(|e: toml::de::Error| ManifestError::Invalid {
                        subject: subject.clone(),
                        field: String::new(),
                        reason: e.message().trim_end().replace('\n', " "),
                    })?
            }
            _ => {
                return Err(ManifestError::Invalid {
                    subject,
                    field: String::new(),
                    reason: "must be a table ([[appliance]])".into(),
                })
            }
        };
        spec.validate()
            .map_err(|(field, reason)| ManifestError::Invalid {
                subject: subject.clone(),
                field,
                reason,
            })?;
        if !seen.insert(spec.name.clone()) {
            return Err(ManifestError::Invalid {
                subject: Subject::Index(i),
                field: "name".into(),
                reason: format!("{:?} is already defined in this manifest", spec.name),
            });
        }
        specs.push(spec);
    }
    Ok(specs)
}

/// Read, parse and validate a manifest file.
///
/// # Errors
/// [`ManifestError::Read`], or a parse/validation error wrapped in
/// [`ManifestError::InFile`].
pub fn load(path: &Path) -> Result<Vec<ApplianceSpec>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_manifest(&text).map_err(|e| ManifestError::InFile {
        path: path.to_owned(),
        source: Box::new(e),
    })
}

/// Serialise appliances as a manifest file (`[[appliance]]` tables) that
/// [`parse_manifest`] reads back to the same values.
pub fn to_toml(specs: &[ApplianceSpec]) -> String {
    toml::to_string_pretty(&ManifestFile { appliance: specs })
        .expect("an ApplianceSpec always serialises to TOML")
}

/// Check `after` across a whole deployed set: every name must exist and
/// there must be no cycle.
///
/// # Errors
/// [`ManifestError::Invalid`] on field `after` of the first appliance
/// found with an unknown dependency or on a cycle (the cycle is spelled out).
pub fn check_dependencies(all: &[ApplianceSpec]) -> Result<(), ManifestError> {
    let by_name: BTreeMap<&str, &ApplianceSpec> =
        all.iter().map(|s| (s.name.as_str(), s)).collect();
    for s in all {
        for dep in &s.after {
            if !by_name.contains_key(dep.as_str()) {
                return Err(ManifestError::Invalid {
                    subject: Subject::Named(s.name.clone()),
                    field: "after".into(),
                    reason: format!("unknown appliance {dep:?}"),
                });
            }
        }
    }
    // Iterative depth-first search; colour 1 = on the stack, 2 = done.
    let mut colour: BTreeMap<&str, u8> = BTreeMap::new();
    for root in all {
        if colour.contains_key(root.name.as_str()) {
            continue;
        }
        let mut stack: Vec<(&str, usize)> = vec![(root.name.as_str(), 0)];
        colour.insert(root.name.as_str(), 1);
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            let deps = &by_name[node].after;
            if *next == deps.len() {
                colour.insert(node, 2);
                stack.pop();
                continue;
            }
            let dep = deps[*next].as_str();
            *next += 1;
            match colour.get(dep) {
                Some(1) => {
                    let start = stack.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                    let mut cycle: Vec<&str> = stack[start..].iter().map(|(n, _)| *n).collect();
                    cycle.push(dep);
                    return Err(ManifestError::Invalid {
                        subject: Subject::Named(dep.to_string()),
                        field: "after".into(),
                        reason: format!("dependency cycle {}", cycle.join(" -> ")),
                    });
                }
                Some(_) => {}
                None => {
                    colour.insert(dep, 1);
                    stack.push((dep, 0));
                }
            }
        }
    }
    Ok(())
}

/// The environment variable that carries a volume's raw image path to a
/// process appliance: `FIELDRACK_VOLUME_` + the name upper-cased, `-` → `_`.
pub fn volume_env_name(volume: &str) -> String {
    format!(
        "{RESERVED_ENV_PREFIX}VOLUME_{}",
        volume.to_ascii_uppercase().replace('-', "_")
    )
}

/// Appliance and volume names: `[a-z0-9][a-z0-9-]*`, at most 63 chars.
///
/// # Errors
/// Why, as text.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "at most {MAX_NAME} characters, got {}",
            name.chars().count()
        ));
    }
    if name.starts_with('-') {
        return Err(format!("{name:?} must start with a-z or 0-9"));
    }
    match name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
    {
        Some(c) => Err(format!(
            "{name:?} may only use a-z, 0-9 and '-' (found {c:?})"
        )),
        None => Ok(()),
    }
}

/// Why a size string is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    /// Not `<digits>[K|M|G|T][i][B]`.
    #[error("size {0:?} is not a number with an optional K, M, G or T suffix")]
    Syntax(String),
    /// Does not fit in 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parse a size as operators write it (manifests, `fieldrack volume
/// create --size`): `4G`, `64M`, `512K`, `1T`, `4096`; suffixes are binary
/// (K = 1024) and may be followed by `i` and/or `B` (`4GiB`, `4GB`);
/// case-insensitive.
///
/// # Errors
/// [`SizeError`].
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(SizeError::Syntax(s.to_owned()));
    }
    let suffix = suffix.trim().to_ascii_lowercase();
    let suffix = suffix.strip_suffix('b').unwrap_or(&suffix);
    let suffix = suffix.strip_suffix('i').unwrap_or(suffix);
    let shift = match suffix {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(SizeError::Syntax(s.to_owned())),
    };
    let n: u64 = num.parse().map_err(|_| SizeError::Overflow(s.to_owned()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_owned()))
}

pub(crate) fn deserialize_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size in bytes or a string such as \"64M\" or \"4G\"")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("size must not be negative, got {v}")))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
    }
    d.deserialize_any(V)
}

fn valid_env_key(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

impl ApplianceSpec {
    /// Check one appliance on its own (not its `after` names' existence:
    /// see [`check_dependencies`]). Returns `(field, reason)`.
    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, reason: String| Err((field.to_string(), reason));
        if let Err(e) = validate_name(&self.name) {
            return bad("name", e);
        }
        match self.driver {
            DriverKind::Process => {
                match self.command.first() {
                    None => return bad("command", "the process driver needs a command".into()),
                    Some(p) if p.is_empty() => {
                        return bad("command[0]", "must name a program".into())
                    }
                    Some(_) => {}
                }
                if self.image.is_some() {
                    return bad("image", "only the qemu driver boots an image".into());
                }
            }
            DriverKind::Qemu => {
                if !self.command.is_empty() {
                    return bad(
                        "command",
                        "the qemu driver runs no command (use image or a volume)".into(),
                    );
                }
                match &self.image {
                    Some(i) if i.is_empty() => return bad("image", "must not be empty".into()),
                    None if self.volume.is_empty() => {
                        return bad(
                            "volume",
                            "the qemu driver needs an image or at least one volume to boot".into(),
                        )
                    }
                    _ => {}
                }
            }
        }
        if self.cpus == 0 {
            return bad("cpus", "must be at least 1".into());
        }
        if self.memory_mb == 0 {
            return bad("memory_mb", "must be greater than 0".into());
        }
        if self.tier > MAX_TIER {
            return bad("tier", format!("must be 0..={MAX_TIER}, got {}", self.tier));
        }
        let mut volumes = BTreeSet::new();
        for (i, v) in self.volume.iter().enumerate() {
            if let Err(e) = validate_name(&v.name) {
                return bad(&format!("volume[{i}].name"), e);
            }
            if !volumes.insert(v.name.as_str()) {
                return bad(
                    &format!("volume[{i}].name"),
                    format!("volume {:?} is listed twice", v.name),
                );
            }
            if v.size == 0 {
                return bad(
                    &format!("volume[{i}].size"),
                    "must be greater than 0".into(),
                );
            }
            if v.size % VOLUME_ALIGN != 0 {
                return bad(
                    &format!("volume[{i}].size"),
                    format!("must be a multiple of {VOLUME_ALIGN} bytes, got {}", v.size),
                );
            }
        }
        for (i, dep) in self.after.iter().enumerate() {
            if let Err(e) = validate_name(dep) {
                return bad(&format!("after[{i}]"), e);
            }
            if *dep == self.name {
                return bad(
                    &format!("after[{i}]"),
                    "an appliance cannot depend on itself".into(),
                );
            }
        }
        if let Some(h) = &self.health {
            validate_health(h).map_err(|(f, r)| (format!("health.{f}"), r))?;
        }
        if self.restart.policy != RestartMode::Never && self.restart.window_s == 0 {
            return bad("restart.window_s", "must be greater than 0".into());
        }
        for (i, r) in self.placement.racks.iter().enumerate() {
            if let Err(e) = crate::validate_rack_name(r) {
                return bad(&format!("placement.racks[{i}]"), e.to_string());
            }
        }
        for (i, s) in self.placement.sites.iter().enumerate() {
            if s.is_empty() {
                return bad(&format!("placement.sites[{i}]"), "must not be empty".into());
            }
        }
        for (i, a) in self.placement.anti_affinity.iter().enumerate() {
            if let Err(e) = validate_name(a) {
                return bad(&format!("placement.anti_affinity[{i}]"), e);
            }
            if *a == self.name {
                return bad(
                    &format!("placement.anti_affinity[{i}]"),
                    "an appliance always shares a rack with itself".into(),
                );
            }
        }
        for key in self.env.keys() {
            if !valid_env_key(key) {
                return bad(
                    &format!("env.{key}"),
                    "not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)".into(),
                );
            }
            if key.starts_with(RESERVED_ENV_PREFIX) {
                return bad(
                    &format!("env.{key}"),
                    format!("{RESERVED_ENV_PREFIX}* is set by the agent"),
                );
            }
        }
        Ok(())
    }
}

fn validate_health(h: &HealthSpec) -> Result<(), (String, String)> {
    let bad = |field: &str, reason: &str| Err((field.to_string(), reason.to_string()));
    match &h.check {
        HealthCheck::Tcp { port, host } => {
            if *port == 0 {
                return bad("port", "must not be 0");
            }
            if host.as_deref() == Some("") {
                return bad("host", "must not be empty");
            }
        }
        HealthCheck::Http { url, status } => {
            let Some(rest) = url.strip_prefix("http://") else {
                return bad("url", "must start with http:// (TLS is not supported)");
            };
            let authority = rest.split('/').next().unwrap_or("");
            if authority.is_empty() {
                return bad("url", "must name a host");
            }
            if let Some(s) = status {
                if !(100..=599).contains(s) {
                    return bad("status", "must be an HTTP status, 100..=599");
                }
            }
        }
        HealthCheck::Command { command } => match command.first() {
            None => return bad("command", "must name a program"),
            Some(p) if p.is_empty() => return bad("command[0]", "must name a program"),
            Some(_) => {}
        },
    }
    if h.interval_ms == 0 {
        return bad("interval_ms", "must be greater than 0");
    }
    if h.timeout_ms == 0 {
        return bad("timeout_ms", "must be greater than 0");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REGISTRY: &str = r#"
[[appliance]]
name = "registry"
driver = "process"
command = ["/usr/bin/python3", "registry.py"]
tier = 0
[[appliance.volume]]
name = "registry-data"
size = "64M"
"#;

    fn error_of(text: &str) -> String {
        match parse_manifest(text) {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    fn field_of(text: &str) -> String {
        match parse_manifest(text) {
            Ok(_) => "ok".into(),
            Err(e) => e
                .field()
                .map_or_else(|| format!("no field: {e}"), str::to_string),
        }
    }

    fn with(extra: &str) -> String {
        format!("[[appliance]]\nname = \"x\"\ndriver = \"process\"\ncommand = [\"true\"]\n{extra}")
    }

    #[test]
    fn the_documented_form_parses_with_defaults() {
        let specs = parse_manifest(REGISTRY).unwrap();
        assert_eq!(specs.len(), 1);
        let s = &specs[0];
        assert_eq!(s.name, "registry");
        assert_eq!(s.driver, DriverKind::Process);
        assert_eq!(s.command, ["/usr/bin/python3", "registry.py"]);
        assert_eq!(s.tier, 0);
        assert_eq!(
            s.volume,
            [VolumeSpec {
                name: "registry-data".into(),
                size: 64 << 20
            }]
        );
        assert_eq!(s.cpus, 1);
        assert_eq!(s.memory_mb, 64);
        assert_eq!(s.stop_grace_ms, 3000);
        assert_eq!(s.restart, RestartPolicy::default());
        assert_eq!(s.restart.policy, RestartMode::OnFailure);
        assert_eq!(s.restart.max_restarts, 5);
        assert_eq!(s.restart.window_s, 300);
        assert_eq!(s.placement, Placement::default());
        assert!(s.health.is_none() && s.after.is_empty() && s.env.is_empty());
        assert!(s.image.is_none());
    }

    #[test]
    fn qemu_defaults_and_every_table() {
        let text = r#"
[[appliance]]
name = "vm"
driver = "qemu"
image = "/srv/os.img"
after = ["registry"]
env = { MODE = "field", _X1 = "y" }
[appliance.health]
kind = "http"
url = "http://127.0.0.1:8080/healthz"
status = 204
start_grace_ms = 5000
[appliance.restart]
policy = "always"
max_restarts = 2
window_s = 60
[appliance.placement]
racks = ["a", "b"]
sites = ["north"]
anti_affinity = ["vm-b"]
[[appliance.volume]]
name = "vm-disk"
size = 4096
"#;
        let s = &parse_manifest(text).unwrap()[0];
        assert_eq!(s.memory_mb, 256);
        assert_eq!(s.tier, 2);
        assert_eq!(s.volume[0].size, 4096);
        assert_eq!(s.env["MODE"], "field");
        let h = s.health.as_ref().unwrap();
        assert_eq!(
            h.check,
            HealthCheck::Http {
                url: "http://127.0.0.1:8080/healthz".into(),
                status: Some(204)
            }
        );
        assert_eq!(
            (h.interval_ms, h.timeout_ms, h.start_grace_ms),
            (1000, 1000, 5000)
        );
        assert_eq!(s.restart.policy, RestartMode::Always);
        assert_eq!(s.placement.anti_affinity, ["vm-b"]);
        // explicit memory wins over the driver default
        let p = with("memory_mb = 512\n");
        assert_eq!(parse_manifest(&p).unwrap()[0].memory_mb, 512);
    }

    #[test]
    fn health_kinds() {
        let tcp = with("[appliance.health]\nkind = \"tcp\"\nport = 5000\ntimeout_ms = 200\n");
        let h = parse_manifest(&tcp).unwrap()[0].health.clone().unwrap();
        assert_eq!(
            h.check,
            HealthCheck::Tcp {
                port: 5000,
                host: None
            }
        );
        assert_eq!(h.timeout_ms, 200);
        let cmd = with("[appliance.health]\nkind = \"command\"\ncommand = [\"true\"]\n");
        let h = parse_manifest(&cmd).unwrap()[0].health.clone().unwrap();
        assert_eq!(
            h.check,
            HealthCheck::Command {
                command: vec!["true".into()]
            }
        );
        // unknown keys in the health table are refused, not ignored
        let typo = with("[appliance.health]\nkind = \"tcp\"\nport = 1\nintervl_ms = 5\n");
        assert!(
            error_of(&typo).contains("intervl_ms"),
            "{}",
            error_of(&typo)
        );
        let kind = with("[appliance.health]\nkind = \"udp\"\nport = 1\n");
        assert!(error_of(&kind).contains("udp"), "{}", error_of(&kind));
    }

    #[test]
    fn errors_name_appliance_field_and_reason() {
        assert_eq!(
            error_of(&REGISTRY.replace("tier = 0", "tier = 7")),
            r#"appliance "registry": tier: must be 0..=3, got 7"#
        );
        let bad_name = error_of(&REGISTRY.replace("name = \"registry\"", "name = \"Registry\""));
        assert!(bad_name.starts_with("appliance[0].name: "), "{bad_name}");
        let second = format!(
            "{REGISTRY}\n[[appliance]]\nname = \"-x\"\ndriver = \"process\"\ncommand = [\"a\"]\n"
        );
        assert!(
            error_of(&second).starts_with("appliance[1].name: "),
            "{}",
            error_of(&second)
        );
        let unknown = error_of(&with("colour = \"red\"\n"));
        assert!(
            unknown.starts_with("appliance \"x\": ") && unknown.contains("colour"),
            "{unknown}"
        );
        let missing_driver = error_of("[[appliance]]\nname = \"x\"\n");
        assert!(missing_driver.contains("driver"), "{missing_driver}");
        let size = error_of(&REGISTRY.replace("\"64M\"", "\"64X\""));
        assert!(
            size.starts_with("appliance \"registry\": ") && size.contains("64X"),
            "{size}"
        );
        assert!(error_of("[appliance]\nname = \"x\"\n").contains("array of tables"));
        assert!(error_of("[[appliances]]\nname = \"x\"\n").contains("appliances"));
        assert!(error_of("[[appliance]\n").contains("line"));
    }

    #[test]
    fn every_rule_names_its_field() {
        let dup = format!("{}{}", with(""), with(""));
        assert_eq!(field_of(&dup), "name");
        assert!(error_of(&dup).contains("already defined"));
        assert_eq!(field_of(&with("cpus = 0\n")), "cpus");
        assert_eq!(field_of(&with("memory_mb = 0\n")), "memory_mb");
        assert_eq!(field_of(&with("image = \"a.img\"\n")), "image");
        assert_eq!(
            field_of("[[appliance]]\nname = \"x\"\ndriver = \"process\"\n"),
            "command"
        );
        assert_eq!(
            field_of("[[appliance]]\nname = \"x\"\ndriver = \"process\"\ncommand = [\"\"]\n"),
            "command[0]"
        );
        assert_eq!(
            field_of("[[appliance]]\nname = \"x\"\ndriver = \"qemu\"\n"),
            "volume"
        );
        assert_eq!(
            field_of("[[appliance]]\nname = \"x\"\ndriver = \"qemu\"\nimage = \"i\"\ncommand = [\"a\"]\n"),
            "command"
        );
        assert_eq!(
            field_of("[[appliance]]\nname = \"x\"\ndriver = \"qemu\"\nimage = \"i\"\n"),
            "ok"
        );
        let vol = |name: &str, size: &str| {
            format!("[[appliance.volume]]\nname = \"{name}\"\nsize = {size}\n")
        };
        assert_eq!(field_of(&with(&vol("v", "0"))), "volume[0].size");
        assert_eq!(field_of(&with(&vol("v", "4097"))), "volume[0].size");
        assert!(error_of(&with(&vol("v", "4097"))).contains("multiple of 4096"));
        assert_eq!(field_of(&with(&vol("V", "4096"))), "volume[0].name");
        assert_eq!(
            field_of(&with(&vol(&"v".repeat(64), "4096"))),
            "volume[0].name"
        );
        assert_eq!(field_of(&with(&vol(&"v".repeat(63), "4096"))), "ok");
        assert_eq!(
            field_of(&with(&format!(
                "{}{}",
                vol("v", "4096"),
                vol("v", "\"8K\"")
            ))),
            "volume[1].name"
        );
        assert_eq!(field_of(&with("after = [\"x\"]\n")), "after[0]");
        assert_eq!(field_of(&with("after = [\"Y\"]\n")), "after[0]");
        let health = |body: &str| with(&format!("[appliance.health]\n{body}"));
        assert_eq!(
            field_of(&health("kind = \"tcp\"\nport = 0\n")),
            "health.port"
        );
        assert_eq!(
            field_of(&health("kind = \"tcp\"\nport = 1\nhost = \"\"\n")),
            "health.host"
        );
        assert_eq!(
            field_of(&health("kind = \"http\"\nurl = \"https://a/\"\n")),
            "health.url"
        );
        assert_eq!(
            field_of(&health("kind = \"http\"\nurl = \"http:///x\"\n")),
            "health.url"
        );
        assert_eq!(
            field_of(&health(
                "kind = \"http\"\nurl = \"http://a/\"\nstatus = 99\n"
            )),
            "health.status"
        );
        assert_eq!(
            field_of(&health("kind = \"command\"\ncommand = []\n")),
            "health.command"
        );
        assert_eq!(
            field_of(&health("kind = \"tcp\"\nport = 1\ninterval_ms = 0\n")),
            "health.interval_ms"
        );
        assert_eq!(
            field_of(&health("kind = \"tcp\"\nport = 1\ntimeout_ms = 0\n")),
            "health.timeout_ms"
        );
        assert_eq!(
            field_of(&with("[appliance.restart]\nwindow_s = 0\n")),
            "restart.window_s"
        );
        assert_eq!(
            field_of(&with(
                "[appliance.restart]\npolicy = \"never\"\nwindow_s = 0\n"
            )),
            "ok"
        );
        {
            let e = error_of(&with("[appliance.restart]\npolicy = \"sometimes\"\n"));
            assert!(e.contains("sometimes"), "{e}");
        }
        assert_eq!(
            field_of(&with("[appliance.placement]\nracks = [\"A\"]\n")),
            "placement.racks[0]"
        );
        assert_eq!(
            field_of(&with("[appliance.placement]\nsites = [\"\"]\n")),
            "placement.sites[0]"
        );
        assert_eq!(
            field_of(&with("[appliance.placement]\nanti_affinity = [\"x\"]\n")),
            "placement.anti_affinity[0]"
        );
        assert_eq!(field_of(&with("env = { \"1A\" = \"v\" }\n")), "env.1A");
        assert_eq!(field_of(&with("env = { \"A-B\" = \"v\" }\n")), "env.A-B");
        assert_eq!(
            field_of(&with("env = { FIELDRACK_RACK = \"v\" }\n")),
            "env.FIELDRACK_RACK"
        );
        assert!(field_of(&with("tier = 300\n")).contains("no field"));
    }

    #[test]
    fn dependencies_across_the_set() {
        let spec = |name: &str, after: &[&str]| {
            let mut s = parse_manifest(&with("")).unwrap().remove(0);
            s.name = name.into();
            s.after = after.iter().map(|a| a.to_string()).collect();
            s
        };
        assert!(check_dependencies(&[]).is_ok());
        let ok = [
            spec("db", &[]),
            spec("web", &["db"]),
            spec("proxy", &["web", "db"]),
        ];
        assert!(check_dependencies(&ok).is_ok());
        let unknown = check_dependencies(&[spec("web", &["db"])]).unwrap_err();
        assert_eq!(
            unknown.to_string(),
            r#"appliance "web": after: unknown appliance "db""#
        );
        let cycle = [
            spec("a", &["b"]),
            spec("b", &["c"]),
            spec("c", &["a"]),
            spec("d", &["a"]),
        ];
        let e = check_dependencies(&cycle).unwrap_err().to_string();
        assert!(e.contains("dependency cycle a -> b -> c -> a"), "{e}");
        // a diamond is not a cycle
        let diamond = [
            spec("a", &["b", "c"]),
            spec("b", &["d"]),
            spec("c", &["d"]),
            spec("d", &[]),
        ];
        assert!(check_dependencies(&diamond).is_ok());
    }

    #[test]
    fn volume_env_names() {
        assert_eq!(
            volume_env_name("registry-data"),
            "FIELDRACK_VOLUME_REGISTRY_DATA"
        );
        assert_eq!(volume_env_name("db0"), "FIELDRACK_VOLUME_DB0");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("4 GB"), Ok(4 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("8k"), Ok(8192));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 8B "), Ok(8));
        for bad in ["", "M", "G", "4X", "4.5G", "-4G", "4GG", "4iG"] {
            assert!(
                matches!(parse_size(bad), Err(SizeError::Syntax(_))),
                "{bad}"
            );
        }
        for big in ["99999999999999999999", "20000000T"] {
            assert!(
                matches!(parse_size(big), Err(SizeError::Overflow(_))),
                "{big}"
            );
        }
        let neg = error_of(&with("[[appliance.volume]]\nname = \"v\"\nsize = -4096\n"));
        assert!(neg.contains("negative"), "{neg}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("appliances.toml");
        std::fs::write(&path, REGISTRY).unwrap();
        assert_eq!(load(&path).unwrap()[0].name, "registry");
        std::fs::write(&path, REGISTRY.replace("tier = 0", "tier = 9")).unwrap();
        let e = load(&path).unwrap_err();
        assert_eq!(e.field(), Some("tier"));
        assert!(
            e.to_string().starts_with(&path.display().to_string()),
            "{e}"
        );
        let missing = load(&dir.path().join("nope.toml")).unwrap_err();
        assert!(matches!(missing, ManifestError::Read { .. }), "{missing}");
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9-]{0,20}"
    }

    fn health() -> impl Strategy<Value = Option<HealthSpec>> {
        let check = prop_oneof![
            (1u16.., prop::option::of("[a-z0-9.]{1,10}"))
                .prop_map(|(port, host)| HealthCheck::Tcp { port, host }),
            ("[a-z0-9/]{0,10}", prop::option::of(100u16..600)).prop_map(|(p, status)| {
                HealthCheck::Http {
                    url: format!("http://127.0.0.1:80/{p}"),
                    status,
                }
            }),
            prop::collection::vec(".{1,8}", 1..3)
                .prop_map(|command| HealthCheck::Command { command }),
        ];
        prop::option::of(
            (check, 1u64..100_000, 1u64..100_000, 0u64..1_000_000).prop_map(
                |(check, interval_ms, timeout_ms, start_grace_ms)| HealthSpec {
                    check,
                    interval_ms,
                    timeout_ms,
                    start_grace_ms,
                },
            ),
        )
    }

    prop_compose! {
        fn spec()(
            name in name(),
            qemu in any::<bool>(),
            command in prop::collection::vec(".{1,12}", 1..4),
            image in prop::option::of("/[a-z]{1,8}\\.img"),
            volume in prop::collection::btree_map(name(), 1u64..1_000_000, 0..3),
            cpus in 1u32..64,
            memory_mb in 1u64..1_000_000,
            tier in 0u8..=3,
            after in prop::collection::vec(name(), 0..3),
            health in health(),
            policy in prop::sample::select(vec![RestartMode::Always, RestartMode::OnFailure, RestartMode::Never]),
            max_restarts in any::<u32>(),
            window_s in 1u64..1_000_000,
            racks in prop::collection::vec("[a-z][a-z0-9-]{0,10}", 0..3),
            sites in prop::collection::vec("[a-zA-Z ]{1,10}", 0..3),
            anti in prop::collection::vec(name(), 0..3),
            env in prop::collection::btree_map("[A-Z_][A-Z0-9_]{0,8}", ".{0,12}", 0..4),
            stop_grace_ms in any::<u32>(),
        ) -> ApplianceSpec {
            let after: Vec<String> = after.into_iter().filter(|a| *a != name).collect();
            let anti_affinity: Vec<String> = anti.into_iter().filter(|a| *a != name).collect();
            let env = env.into_iter().filter(|(k, _)| !k.starts_with(RESERVED_ENV_PREFIX)).collect();
            let volume: Vec<VolumeSpec> = volume
                .into_iter()
                .map(|(name, blocks)| VolumeSpec { name, size: blocks * VOLUME_ALIGN })
                .collect();
            let (driver, command, image, volume) = if qemu {
                let image = if volume.is_empty() { Some(image.unwrap_or_else(|| "/os.img".into())) } else { image };
                (DriverKind::Qemu, Vec::new(), image, volume)
            } else {
                (DriverKind::Process, command, None, volume)
            };
            ApplianceSpec {
                name, driver, command, image, volume, cpus, memory_mb, tier, after, health,
                restart: RestartPolicy { policy, max_restarts, window_s },
                placement: Placement { racks, sites, anti_affinity },
                env, stop_grace_ms: u64::from(stop_grace_ms),
            }
        }
    }

    proptest! {
        /// What the control plane replicates (JSON) and what provisioning
        /// writes (TOML) reads back to the same values, and valid specs
        /// stay valid.
        #[test]
        fn serialise_parse_round_trip(specs in prop::collection::vec(spec(), 0..4)) {
            let mut seen = BTreeSet::new();
            let specs: Vec<ApplianceSpec> = specs.into_iter().filter(|s| seen.insert(s.name.clone())).collect();
            let json = serde_json::to_string(&specs).unwrap();
            let back: Vec<ApplianceSpec> = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(&back, &specs);
            let text = to_toml(&specs);
            let parsed = parse_manifest(&text);
            prop_assert!(parsed.is_ok(), "{}\n{:?}", text, parsed);
            prop_assert_eq!(parsed.unwrap(), specs);
        }

        /// Arbitrary text never panics the parser.
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,400}") {
            let _ = parse_manifest(&text);
        }

        /// Arbitrary tiers are accepted exactly in 0..=3.
        #[test]
        fn tiers(tier in any::<u8>()) {
            let r = parse_manifest(&with(&format!("tier = {tier}\n")));
            prop_assert_eq!(r.is_ok(), tier <= MAX_TIER);
        }
    }
}
