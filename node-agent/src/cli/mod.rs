//! The `fieldrack` command line: the clap definitions (here), one module
//! per command group that fetches through the typed
//! [`node_agent::client::AgentClient`] and renders separately, and
//! [`exit`], the one place that prints a failure with its whole cause
//! chain and picks the exit code.
//!
//! Layout:
//! - [`agent`]: `fieldrack agent` (logging, signals, config checks).
//! - [`status`]: `status`, `events`.
//! - [`fleet`]: `fleet init|add-rack|revoke`.
//! - [`field`]: `fleet plan|bundle`, `install`, `doctor`.
//! - [`app`]: `app deploy|list|stop|start|move`.
//! - [`volume`]: `volume create|import|export|snapshot|status`.
//! - [`tiles`]: `tiles seed|import|export`.
//! - [`cache`]: `cache offline`, `discover`.
//! - [`drill`]: `drill list|plan|run|report|abort`.
//! - [`progress`]: progress lines of long operations.
//! - [`exit`]: error printing and exit codes.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use deploy::config::LogFormat;
use node_agent::client::AgentClient;

pub mod agent;
pub mod app;
pub mod cache;
pub mod drill;
pub mod exit;
pub mod field;
pub mod fleet;
pub mod progress;
pub mod status;
pub mod tiles;
pub mod volume;

use exit::Failure;

#[derive(Parser)]
#[command(
    name = "fieldrack",
    version,
    about = "Field-deployable edge racks: mesh, replication, caching, failover"
)]
pub struct Cli {
    /// Log format (overrides `[log] format` in rack.toml).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    Plain,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run a rack's agent.
    Agent {
        /// The rack's rack.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Provision and manage a fleet (on the provisioning laptop).
    #[command(subcommand)]
    Fleet(FleetCmd),
    /// Show the field as seen by one rack.
    Status {
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
        /// Print the status JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a rack's recent events (membership changes, revocations, refusals).
    Events {
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Volumes: appliance disk images, snapshotted and replicated between racks.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Appliances: deploy, list, stop, start and move them.
    #[command(subcommand)]
    App(AppCmd),
    /// Map tiles: seed a region into the rack's cache.
    #[command(subcommand)]
    Tiles(TilesCmd),
    /// The caching proxy: operator switches.
    #[command(subcommand)]
    Cache(CacheCmd),
    /// The operator console (`/console/` on the proxy's address).
    #[command(subcommand)]
    Console(ConsoleCmd),
    /// Find racks' proxies and tile servers on this network segment (mDNS).
    Discover {
        /// How long to listen, seconds.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// Drills: inject a fault into the live field, measure the failover, report.
    #[command(subcommand)]
    Drill(DrillCmd),
    /// Verify a rack bundle (built by `fleet bundle`) and install it: config, data, systemd unit.
    Install {
        /// The rack's bundle directory.
        bundle: PathBuf,
        /// Install under this directory instead of `/` (systemctl is then not run).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// The fleet's public key (base64) the bundle must be signed by; without it, the key in the bundle's rack.toml.
        #[arg(long)]
        fleet_key: Option<String>,
    },
    /// Check that this rack is ready: files, disk, hardware, power, peers, majority, replicas.
    Doctor {
        /// The rack's rack.toml.
        #[arg(long)]
        config: PathBuf,
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Audited overrides of the field's safety rules.
    #[command(subcommand)]
    Override(OverrideCmd),
    /// Run a local field of racks on this machine (no configuration needed).
    Demo {
        /// How many racks (named a-z up to 26, r01, r02... beyond).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=64))]
        racks: u8,
        /// Provision into this directory instead of a temporary one.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum DrillCmd {
    /// The scenarios.
    List,
    /// Check the preconditions and print the blast radius; changes nothing.
    Plan {
        /// The rack.toml of the rack to run from (the others' are beside it).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        scenario: drill::ScenarioArgs,
    },
    /// Run a drill: preconditions, faults with deadlines, probes, report.
    Run {
        /// The rack.toml of the rack to run from (the others' are beside it).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        scenario: drill::ScenarioArgs,
        /// Stop after the preconditions and the blast radius.
        #[arg(long)]
        dry_run: bool,
        /// Where to write the HTML timeline (default: drill-<id>.html here).
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// The drill reports kept on a rack (one in full with --id).
    Report {
        /// The rack.toml of the rack to ask.
        #[arg(long)]
        config: PathBuf,
        /// One report.
        #[arg(long)]
        id: Option<String>,
        /// JSON.
        #[arg(long)]
        json: bool,
        /// Write the (last chosen) report's HTML timeline here.
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// Heal every drill fault on every rack now.
    Abort {
        /// The rack.toml of any rack (the others' are beside it).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum OverrideCmd {
    /// After a cold start, run this rack's appliances without a majority of voters, until one returns (recorded in the event log).
    Quorum {
        /// Why (recorded with your name).
        #[arg(long)]
        why: String,
        /// Who is asking (default: $SUDO_USER, else $USER).
        #[arg(long)]
        who: Option<String>,
        /// The rack.toml of the agent to tell.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum AppCmd {
    /// Deploy (or update) the appliances of a manifest file.
    Deploy {
        /// The manifest (`[[appliance]]` tables).
        manifest: PathBuf,
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
    },
    /// Every appliance of the field, where it runs and its state.
    List {
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop an appliance (it stays deployed).
    Stop {
        /// Appliance name.
        name: String,
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
    },
    /// Start a stopped appliance again.
    Start {
        /// Appliance name.
        name: String,
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
    },
    /// Move an appliance to another rack (a planned handover: no data lost).
    Move {
        /// Appliance name.
        name: String,
        /// Target rack.
        #[arg(long)]
        to: String,
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create an empty (thin) volume owned by this rack.
    Create {
        /// Volume name ([a-z0-9-]).
        name: String,
        /// Size, e.g. 4G, 64M, 1T.
        #[arg(long)]
        size: String,
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
    },
    /// Import a raw or qcow2 image (into a new volume, or as an existing volume's next generation).
    Import {
        /// Volume name.
        name: String,
        /// The image file (on the rack).
        #[arg(long)]
        from: PathBuf,
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
    },
    /// Export a generation (the newest by default), or a kept copy, as a raw image.
    Export {
        /// Volume name.
        name: String,
        /// Output file (on the rack).
        #[arg(long)]
        to: PathBuf,
        /// Which generation.
        #[arg(long, conflicts_with = "kept")]
        generation: Option<u64>,
        /// The kept copy kept at this time (`KEPT_MS` of `volume kept`).
        #[arg(long, value_name = "KEPT_MS")]
        kept: Option<u64>,
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
    },
    /// Snapshot a volume now (it is also snapshotted on a schedule).
    Snapshot {
        /// Volume name.
        name: String,
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
    },
    /// Copies this rack kept of volumes another rack took over (writes their new owner may lack).
    Kept {
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drop a kept copy (after exporting what it holds, or deciding it is not needed).
    DropKept {
        /// Volume name.
        name: String,
        /// Its `KEPT_MS`, from `volume kept`.
        kept_ms: u64,
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
    },
    /// Volumes on this rack, their replicas and recovery points.
    Status {
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum TilesCmd {
    /// Fetch every tile of a region from a source that allows bulk download (pinned: never evicted; resumable).
    Seed {
        #[command(flatten)]
        region: TileRegion,
    },
    /// Preload tiles from an MBTiles or PMTiles v3 file (pinned; served offline) before or after shipping.
    Import {
        /// The .mbtiles or .pmtiles file (on the rack; told apart by content).
        file: PathBuf,
        /// The [[tile_source]] the tiles belong to.
        #[arg(long)]
        source: String,
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
    },
    /// Write the generated sample map (PNG tiles, zoom 0-16 around one small region) as a PMTiles file: a pack to try `tiles import` and field.toml's [[tile_pack]] with.
    Sample {
        /// Output .pmtiles file.
        file: PathBuf,
    },
    /// Write the cached tiles of a region to an MBTiles file for a field laptop or phone.
    Export {
        /// Output .mbtiles file (on the rack).
        file: PathBuf,
        #[command(flatten)]
        region: TileRegion,
    },
}

/// A region of one tile source on one agent: what `tiles seed` fetches and
/// `tiles export` writes.
#[derive(clap::Args)]
pub struct TileRegion {
    /// Tile source name (a [[tile_source]] of rack.toml).
    #[arg(long)]
    pub source: String,
    /// West,South,East,North in degrees.
    #[arg(long, allow_hyphen_values = true)]
    pub bbox: String,
    /// Zoom range, e.g. 0-16.
    #[arg(long)]
    pub zoom: String,
    /// The rack.toml of the agent to ask.
    #[arg(long)]
    pub config: PathBuf,
}

#[derive(Subcommand)]
pub enum ConsoleCmd {
    /// Read a password on stdin (one line) and print its hashed form for
    /// `operator_password_hash` or `viewer_password_hash` in `[console]`.
    HashPassword,
}

#[derive(Subcommand)]
pub enum CacheCmd {
    /// Force offline mode on or off (offline: never touch the backhaul).
    Offline {
        /// on or off.
        #[arg(value_parser = ["on", "off"])]
        state: String,
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum FleetCmd {
    /// Create a fleet: signing key, and per rack its config, key, certificate and API token.
    Init {
        /// Fleet directory to create.
        #[arg(long)]
        dir: PathBuf,
        /// Comma-separated rack names.
        #[arg(long, value_delimiter = ',', required = true)]
        racks: Vec<String>,
        /// A witness (votes and relays only); repeatable.
        #[arg(long)]
        witness: Vec<String>,
        /// Give every rack distinct 127.0.0.1 ports and bootstrap addresses pointing at the others.
        #[arg(long)]
        local: bool,
        /// Fleet name (defaults to the directory name).
        #[arg(long)]
        name: Option<String>,
        /// Site of every rack (sites of individual racks can be edited in rack.toml).
        #[arg(long)]
        site: Option<String>,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = 365)]
        valid_days: u64,
    },
    /// Validate a field plan (field.toml) and print what happens when each rack dies.
    Plan {
        /// The field plan.
        field: PathBuf,
    },
    /// Build one signed bundle per rack of a field plan (config, identity, preloaded volumes, tile packs).
    Bundle {
        /// The field plan.
        field: PathBuf,
        /// Directory to write the bundles into (one subdirectory per rack).
        #[arg(long)]
        out: PathBuf,
        /// Fleet directory holding the signing key (created if missing); default: `fleet/` beside field.toml.
        #[arg(long)]
        fleet: Option<PathBuf>,
    },
    /// Add one rack (or witness) to an existing fleet.
    AddRack {
        /// Fleet directory.
        #[arg(long)]
        dir: PathBuf,
        /// The new rack's name.
        #[arg(long)]
        rack: String,
        /// Make it a witness.
        #[arg(long)]
        witness: bool,
        /// Its site.
        #[arg(long)]
        site: Option<String>,
    },
    /// Revoke a rack's certificate; with --config, hand the revocation to that agent, which spreads it through the mesh.
    Revoke {
        /// Fleet directory.
        #[arg(long)]
        dir: PathBuf,
        /// The rack to revoke.
        #[arg(long)]
        rack: String,
        /// Why (recorded in the revocation).
        #[arg(long, default_value = "revoked by operator")]
        reason: String,
        /// rack.toml of a running agent to hand the revocation to.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Run one command.
///
/// # Errors
/// The command's failure, which says how the process exits.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Cmd::Agent { config } => agent::run(&config, cli.log_format).await,
        Cmd::Fleet(cmd) => {
            agent::init_logging(
                agent::log_format(cli.log_format, LogFormat::Plain),
                Some("warn"),
            );
            fleet::run(cmd).await
        }
        Cmd::Status { config, json } => status::status(&client_for(&config)?, json).await,
        Cmd::Events { config, limit } => status::events(&client_for(&config)?, limit).await,
        Cmd::Volume(cmd) => volume::run(cmd).await,
        Cmd::App(cmd) => app::run(cmd).await,
        Cmd::Tiles(cmd) => tiles::run(cmd).await,
        Cmd::Cache(cmd) => cache::run(cmd).await,
        Cmd::Console(ConsoleCmd::HashPassword) => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password on stdin")?;
            let password = line.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                return Err(anyhow::anyhow!("an empty password: type one line on stdin").into());
            }
            println!(
                "{}",
                node_agent::console::auth::hash_password(password, rand::random())
            );
            Ok(())
        }
        Cmd::Discover { timeout } => cache::discover(timeout).await,
        Cmd::Drill(cmd) => drill::run(cmd).await,
        Cmd::Install {
            bundle,
            root,
            fleet_key,
        } => {
            agent::init_logging(
                agent::log_format(cli.log_format, LogFormat::Plain),
                Some("warn"),
            );
            field::install(&bundle, &root, fleet_key.as_deref())
        }
        Cmd::Doctor { config, json } => field::doctor(&config, json).await,
        Cmd::Override(OverrideCmd::Quorum { why, who, config }) => {
            field::override_quorum(&config, &why, who).await
        }
        Cmd::Demo { racks, dir } => {
            agent::init_logging(
                agent::log_format(cli.log_format, LogFormat::Plain),
                Some("warn"),
            );
            node_agent::demo::run(usize::from(racks), dir, agent::shutdown_token()).await?;
            Ok(())
        }
    }
}

/// The client of the agent whose rack.toml is `config`.
fn client_for(config: &Path) -> anyhow::Result<AgentClient> {
    AgentClient::from_config(config).with_context(|| format!("using {}", config.display()))
}

/// A path on this machine as the agent needs it (it does not share our
/// working directory): absolute, relative ones taken from here.
fn absolute(path: PathBuf) -> anyhow::Result<PathBuf> {
    Ok(if path.is_absolute() {
        path
    } else {
        std::env::current_dir()
            .context("finding the current directory")?
            .join(path)
    })
}
