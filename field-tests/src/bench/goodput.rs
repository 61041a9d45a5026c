//! Replication goodput over emulated links, black box: two real agents in
//! namespaces joined by the link emulator, an N MiB volume imported on
//! `a`, timed until `b`'s status shows the generation. Each profile is
//! run once per data plane: the bulk plane with each congestion
//! controller (`[bulk] congestion`), and the bulk plane disabled (every
//! stream on libp2p-quic, the baseline). Goodput is given as a fraction
//! of what the link can carry, `rate × (1 − loss)`.
//!
//! While the push runs, each rack's view of the other is sampled (SWIM
//! state, round trip): control traffic sharing a saturated link must keep
//! its timing, so a `suspect` or `dead` sample during a push is a finding.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rand::{RngCore, SeedableRng};

use crate::agent::output_with_timeout;
use crate::linkem::{LinkProfile, Profile};
use crate::{wait_until, Field, Fleet, PeerState, POLL};

/// The racks of each run.
const RACKS: [&str; 2] = ["a", "b"];

/// Both racks see each other alive within this of starting (a satellite
/// hop needs several round trips per exchange).
const FORM_TIMEOUT: Duration = Duration::from_secs(40);

/// Bound on the import command (a debug build hashes 64 MiB slowly).
const IMPORT_TIMEOUT: Duration = Duration::from_secs(120);

/// The volume's name.
pub const VOLUME: &str = "goodput";

/// One data plane to compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Variant {
    /// The bulk plane with this `bulk.congestion` (`bbr`, `cubic`, `newreno`).
    Bulk(String),
    /// `bulk.enabled = false`: libp2p-quic streams, as before the bulk plane.
    Libp2p,
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Variant::Bulk(cc) => write!(f, "bulk-{cc}"),
            Variant::Libp2p => f.write_str("libp2p"),
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct GoodputArgs {
    /// Link profile specs (`radio-poor`, `satellite,loss=0.02`, ...).
    pub profiles: Vec<String>,
    /// The data planes to compare on each.
    pub variants: Vec<Variant>,
    /// Volume size, MiB (random bytes: no zero chunk is skipped).
    pub mib: u64,
    /// A run not done within this is reported unfinished.
    pub timeout: Duration,
    /// Seed of the link emulator's randomness.
    pub seed: u64,
    /// `[volumes] link_bytes_per_s` of both racks (0: unlimited), to
    /// measure a cap below the link's rate.
    pub link_bytes_per_s: u64,
}

impl Default for GoodputArgs {
    fn default() -> Self {
        Self {
            profiles: ["radio-good", "radio-poor", "lossy", "satellite"]
                .map(String::from)
                .to_vec(),
            variants: vec![
                Variant::Bulk("bbr".into()),
                Variant::Bulk("cubic".into()),
                Variant::Bulk("newreno".into()),
                Variant::Libp2p,
            ],
            mib: 64,
            timeout: Duration::from_secs(300),
            seed: 12,
            link_bytes_per_s: 0,
        }
    }
}

/// One measured transfer.
#[derive(Debug, Clone)]
pub struct GoodputRow {
    /// The link profile spec.
    pub profile: String,
    /// The data plane.
    pub variant: Variant,
    /// Bytes replicated.
    pub bytes: u64,
    /// From the import's end to the replica's generation appearing; None
    /// if not within the timeout.
    pub seconds: Option<f64>,
    /// `rate × (1 − loss)` of the profile, bits per second.
    pub capacity_bps: f64,
    /// Peer-state samples taken during the push (both racks' views).
    pub samples: usize,
    /// Of which `suspect`.
    pub suspect: usize,
    /// Of which `dead`.
    pub dead: usize,
    /// Largest round trip a rack reported for the other during the push.
    pub max_rtt_ms: Option<f64>,
    /// Raft elections (term increments) seen during the push.
    pub elections: u64,
    /// The replication cap in force (0: none).
    pub link_bytes_per_s: u64,
    /// How long the transfer was given, seconds.
    pub timeout_s: f64,
}

impl GoodputRow {
    /// The row of one transfer of `args.mib` MiB over `profile` (given as
    /// `spec`) with `variant`, under `args`' cap and timeout: `seconds` to
    /// the replica (None past the timeout), `watch` the peer states meanwhile.
    #[must_use]
    pub fn new(
        spec: &str,
        profile: &Profile,
        variant: &Variant,
        args: &GoodputArgs,
        seconds: Option<f64>,
        watch: &PeerWatch,
    ) -> GoodputRow {
        GoodputRow {
            profile: spec.to_string(),
            variant: variant.clone(),
            bytes: args.mib << 20,
            seconds,
            capacity_bps: profile.rate_bps as f64 * (1.0 - profile.loss.ratio()),
            samples: watch.samples,
            suspect: watch.suspect,
            dead: watch.dead,
            max_rtt_ms: watch.max_rtt_ms,
            elections: watch.elections(),
            link_bytes_per_s: args.link_bytes_per_s,
            timeout_s: args.timeout.as_secs_f64(),
        }
    }

    /// Goodput, bits per second.
    #[must_use]
    pub fn goodput_bps(&self) -> Option<f64> {
        self.seconds.map(|s| self.bytes as f64 * 8.0 / s)
    }

    /// Goodput as a fraction of the link's capacity.
    #[must_use]
    pub fn fraction(&self) -> Option<f64> {
        self.goodput_bps().map(|g| g / self.capacity_bps)
    }

    /// The fraction, or for a transfer not done within its timeout the
    /// most it can have been (all of it in the timeout): a bound that
    /// still lets a baseline be compared with.
    #[must_use]
    pub fn fraction_at_most(&self) -> f64 {
        self.fraction().unwrap_or_else(|| {
            self.bytes as f64 * 8.0 / self.timeout_s.max(f64::MIN_POSITIVE) / self.capacity_bps
        })
    }

    /// Whether this row is the baseline: libp2p-quic's defaults.
    #[must_use]
    pub fn is_baseline(&self) -> bool {
        self.variant == Variant::Libp2p
    }

    /// One line for a table.
    #[must_use]
    pub fn line(&self) -> String {
        let secs = self
            .seconds
            .map_or_else(|| "timeout".into(), |s| format!("{s:.1} s"));
        let frac = self
            .fraction()
            .map_or_else(|| "-".into(), |f| format!("{f:.2}"));
        let rtt = self
            .max_rtt_ms
            .map_or_else(|| "-".into(), |r| format!("{r:.0} ms"));
        let variant = if self.link_bytes_per_s > 0 {
            format!(
                "{}@{:.1}M",
                self.variant,
                self.link_bytes_per_s as f64 * 8e-6
            )
        } else {
            self.variant.to_string()
        };
        format!(
            "{:<12} {:<13} {:>5} MiB {:>9} goodput {:>5} of link, suspect {}/{} dead {}, max rtt {}, elections {}",
            self.profile,
            variant,
            self.bytes >> 20,
            secs,
            frac,
            self.suspect,
            self.samples,
            self.dead,
            rtt,
            self.elections
        )
    }
}

/// Every profile × variant of `args`, one fresh field and fleet each.
///
/// # Errors
/// If a field, link or fleet cannot be set up, or a rack misbehaves
/// (import fails, the pair never forms). A slow transfer is a row, not an
/// error.
pub fn run(args: GoodputArgs) -> Result<Vec<GoodputRow>> {
    let mut rows = Vec::new();
    for spec in &args.profiles {
        for variant in &args.variants {
            let row = run_one(spec, variant, &args)
                .with_context(|| format!("goodput over {spec} with {variant}"))?;
            println!("{}", row.line());
            rows.push(row);
        }
    }
    Ok(rows)
}

/// One transfer: `mib` MiB over `spec` with `variant`.
///
/// # Errors
/// As [`run`].
pub fn run_one(spec: &str, variant: &Variant, args: &GoodputArgs) -> Result<GoodputRow> {
    let profile: Profile = spec
        .parse()
        .map_err(|e| anyhow::anyhow!("profile {spec:?}: {e}"))?;
    let field = Field::new(RACKS)?;
    let _link =
        field.emulated_link("a", "b", LinkProfile::symmetric(profile.clone()), args.seed)?;
    let mut fleet = Fleet::provision(&RACKS)?;
    configure(&fleet, variant, args.link_bytes_per_s)?;
    let image = write_image(&fleet, args.mib)?;
    let _agents = fleet.start_all(&field)?;
    let result = transfer(&fleet, &field, &image, args.timeout);
    let (seconds, watch) = match result {
        Ok(r) => r,
        Err(e) => {
            fleet.dump_logs(40);
            fleet.keep();
            return Err(e);
        }
    };
    Ok(GoodputRow::new(
        spec, &profile, variant, args, seconds, &watch,
    ))
}

/// Snapshots rarely (the import makes the one generation timed), and the
/// data plane of `variant`. Before the agents start.
///
/// # Errors
/// If a config cannot be edited.
pub fn configure(fleet: &Fleet, variant: &Variant, link_bytes_per_s: u64) -> Result<()> {
    fleet.edit_configs("snapshot_interval_s = 2", "snapshot_interval_s = 3600")?;
    fleet.edit_configs(
        "snapshot_max_interval_s = 60",
        "snapshot_max_interval_s = 3600",
    )?;
    fleet.edit_configs(
        "link_bytes_per_s = 0",
        &format!("link_bytes_per_s = {link_bytes_per_s}"),
    )?;
    match variant {
        Variant::Bulk(cc) => {
            fleet.edit_configs("congestion = \"bbr\"", &format!("congestion = \"{cc}\""))?;
        }
        Variant::Libp2p => {
            fleet.edit_configs("[bulk]\nenabled = true", "[bulk]\nenabled = false")?
        }
    }
    Ok(())
}

/// A random image of `mib` MiB in `a`'s import directory.
///
/// # Errors
/// If it cannot be written.
pub fn write_image(fleet: &Fleet, mib: u64) -> Result<PathBuf> {
    let dir = fleet.fleet_dir().join("a").join("data").join("import");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("goodput.img");
    let mut data = vec![0u8; usize::try_from(mib << 20)?];
    rand::rngs::StdRng::seed_from_u64(mib).fill_bytes(&mut data);
    std::fs::write(&path, &data)?;
    Ok(path)
}

/// What the racks said of each other during a push.
#[derive(Debug, Default)]
pub struct PeerWatch {
    /// Peer-state samples (each rack's view of the other, per poll).
    pub samples: usize,
    /// Of which `suspect`.
    pub suspect: usize,
    /// Of which `dead`.
    pub dead: usize,
    /// Largest round trip reported.
    pub max_rtt_ms: Option<f64>,
    /// Lowest and highest Raft term the racks reported: a term that moves
    /// during a push means heartbeats were missed and a rack stood for
    /// election.
    pub terms: Option<(u64, u64)>,
}

impl PeerWatch {
    /// Raft elections seen during the push (term increments).
    #[must_use]
    pub fn elections(&self) -> u64 {
        self.terms.map_or(0, |(lo, hi)| hi - lo)
    }
}

impl PeerWatch {
    /// Record both racks' views from their statuses.
    pub fn sample(&mut self, statuses: &[crate::Status]) {
        for s in statuses {
            if let Some(c) = s.control.as_ref().filter(|c| c.term > 0) {
                let (lo, hi) = self.terms.unwrap_or((c.term, c.term));
                self.terms = Some((lo.min(c.term), hi.max(c.term)));
            }
            for p in s.peers.iter().filter(|p| p.rack != s.rack) {
                self.samples += 1;
                match p.state {
                    PeerState::Suspect => self.suspect += 1,
                    PeerState::Dead => self.dead += 1,
                    _ => {}
                }
                if let Some(r) = p.rtt_ms {
                    self.max_rtt_ms = Some(self.max_rtt_ms.map_or(r, |m: f64| m.max(r)));
                }
            }
        }
    }
}

/// Form, import `image` on `a` as volume [`VOLUME`], and time `b`'s
/// replica; returns the seconds (None past `timeout`) and what the racks
/// said of each other meanwhile.
///
/// # Errors
/// If the pair does not form or the import fails.
pub fn transfer(
    fleet: &Fleet,
    field: &Field,
    image: &std::path::Path,
    timeout: Duration,
) -> Result<(Option<f64>, PeerWatch)> {
    wait_until(FORM_TIMEOUT, "a and b alive to each other", || {
        let a = fleet.status(field, "a")?;
        let b = fleet.status(field, "b")?;
        Ok(a.state_of("b") == Some(PeerState::Alive) && b.state_of("a") == Some(PeerState::Alive))
    })?;
    let mut cmd: Command = field.command("a", fleet.bin())?;
    cmd.args(["volume", "import", VOLUME, "--from"])
        .arg(image)
        .arg("--config")
        .arg(fleet.config("a"));
    let out = output_with_timeout(cmd, IMPORT_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    let generation = fleet
        .status(field, "a")?
        .volume(VOLUME)
        .and_then(|v| v.generation)
        .context("a reports no generation after the import")?;
    let mut watch = PeerWatch::default();
    while start.elapsed() < timeout {
        let (a, b) = (fleet.status(field, "a"), fleet.status(field, "b"));
        if let Ok(b) = &b {
            if b.volume(VOLUME).and_then(|v| v.generation) >= Some(generation) {
                return Ok((Some(start.elapsed().as_secs_f64()), watch));
            }
        }
        if let (Ok(a), Ok(b)) = (a, b) {
            watch.sample(&[a, b]);
        }
        std::thread::sleep(POLL);
    }
    Ok((None, watch))
}

/// Export `rack`'s copy of [`VOLUME`] (its latest generation) to `to`.
///
/// # Errors
/// If the export fails.
pub fn export(fleet: &Fleet, field: &Field, rack: &str, to: &std::path::Path) -> Result<()> {
    let mut cmd: Command = field.command(rack, fleet.bin())?;
    cmd.args(["volume", "export", VOLUME, "--to"])
        .arg(to)
        .arg("--config")
        .arg(fleet.config(rack));
    let out = output_with_timeout(cmd, IMPORT_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "export on {rack} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
