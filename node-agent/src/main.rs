//! `fieldrack`: parse the command line, set up logging, run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use deploy::config::LogFormat;
use deploy::{RackConfig, Role};
use node_agent::client::AgentClient;
use node_agent::fleet::{self, RackSpec};
use node_agent::status::{human_bytes, render_table, Status};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Exit code for a bad configuration or usage (sysexits' EX_USAGE).
const EX_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "fieldrack",
    version,
    about = "Field-deployable edge racks: mesh, replication, caching, failover"
)]
struct Cli {
    /// Log format (overrides `[log] format` in rack.toml).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Plain,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
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
    /// Find racks' proxies and tile servers on this network segment (mDNS).
    Discover {
        /// How long to listen, seconds.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// Run a local field of racks on this machine (no configuration needed).
    Demo {
        /// How many racks.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=26))]
        racks: u8,
        /// Provision into this directory instead of a temporary one.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AppCmd {
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
enum VolumeCmd {
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
    /// Export a generation (the newest by default) as a raw image.
    Export {
        /// Volume name.
        name: String,
        /// Output file (on the rack).
        #[arg(long)]
        to: PathBuf,
        /// Which generation.
        #[arg(long)]
        generation: Option<u64>,
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
enum TilesCmd {
    /// Fetch every tile of a region from a source that allows bulk download (pinned: never evicted; resumable).
    Seed {
        /// Tile source name (a [[tile_source]] of rack.toml).
        #[arg(long)]
        source: String,
        /// West,South,East,North in degrees.
        #[arg(long, allow_hyphen_values = true)]
        bbox: String,
        /// Zoom range, e.g. 0-16.
        #[arg(long)]
        zoom: String,
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
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
    /// Write the cached tiles of a region to an MBTiles file for a field laptop or phone.
    Export {
        /// Output .mbtiles file (on the rack).
        file: PathBuf,
        /// Tile source name.
        #[arg(long)]
        source: String,
        /// West,South,East,North in degrees.
        #[arg(long, allow_hyphen_values = true)]
        bbox: String,
        /// Zoom range, e.g. 0-16.
        #[arg(long)]
        zoom: String,
        /// The rack.toml of the agent to ask.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
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
enum FleetCmd {
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

fn init_logging(format: LogFormat, level: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            level.unwrap_or("info,libp2p_swarm=warn,libp2p_quic=warn,mdns_sd=warn"),
        )
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Plain => builder.init(),
    }
}

fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        t.cancel();
    });
    token
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(async {
        match run(cli).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("fieldrack: {e:#}");
                ExitCode::FAILURE
            }
        }
    });
    // Dropping a runtime waits for every blocking task (an import stuck
    // reading a file would hold the process forever): give them a bounded
    // grace, then exit regardless. `agent::run` has already flushed the
    // store by now.
    runtime.shutdown_timeout(node_agent::agent::RUNTIME_SHUTDOWN_GRACE);
    code
}

fn log_format(cli: Option<LogFormatArg>, config: LogFormat) -> LogFormat {
    match cli {
        Some(LogFormatArg::Json) => LogFormat::Json,
        Some(LogFormatArg::Plain) => LogFormat::Plain,
        None => config,
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Agent { config } => {
            let cfg = match RackConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("fieldrack: bad configuration: {e}");
                    return Ok(ExitCode::from(EX_CONFIG));
                }
            };
            if let Err(e) = node_agent::proxy::config(&cfg) {
                eprintln!("fieldrack: bad configuration: {}: {e}", config.display());
                return Ok(ExitCode::from(EX_CONFIG));
            }
            init_logging(
                log_format(cli.log_format, cfg.log.format),
                cfg.log.level.as_deref(),
            );
            if let Err(e) = node_agent::agent::load_identity(&cfg) {
                eprintln!("fieldrack: bad configuration: {e:#}");
                return Ok(ExitCode::from(EX_CONFIG));
            }
            let span = tracing::info_span!("rack", rack = %cfg.rack);
            node_agent::agent::run(cfg, &config, shutdown_token())
                .instrument(span)
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fleet(cmd) => {
            init_logging(log_format(cli.log_format, LogFormat::Plain), Some("warn"));
            fleet_cmd(cmd).await
        }
        Cmd::Status { config, json } => {
            let client = client_for(&config)?;
            let status: Status = client.get_json("/api/v1/status").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render_table(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Events { config, limit } => {
            let client = client_for(&config)?;
            let events: Vec<serde_json::Value> = client
                .get_json(&format!("/api/v1/events?limit={limit}"))
                .await?;
            for e in events {
                println!("{e}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Volume(cmd) => volume_cmd(cmd).await,
        Cmd::App(cmd) => app_cmd(cmd).await,
        Cmd::Discover { timeout } => {
            let found =
                node_agent::proxy::discover(std::time::Duration::from_secs(timeout)).await?;
            if found.is_empty() {
                eprintln!("no rack answered within {timeout}s");
            }
            for (rack, addr) in found {
                println!("{rack}\thttp://{addr}/proxy.pac\thttp://{addr}/tiles/");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Tiles(TilesCmd::Seed {
            source,
            bbox,
            zoom,
            config,
        }) => {
            let client = client_for(&config)?;
            let r = client
                .post_streaming(
                    "/api/v1/tiles/seed",
                    serde_json::json!({ "source": source, "bbox": bbox, "zoom": zoom }),
                    count_printer("seed"),
                )
                .await?;
            eprintln!();
            println!("seeded {source}: {r}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Tiles(TilesCmd::Import {
            file,
            source,
            config,
        }) => {
            let client = client_for(&config)?;
            let file =
                std::fs::canonicalize(&file).with_context(|| format!("{}", file.display()))?;
            let r = client
                .post_streaming(
                    "/api/v1/tiles/import",
                    serde_json::json!({ "source": source, "from": file }),
                    count_printer("import"),
                )
                .await?;
            eprintln!();
            println!("imported into {source}: {r}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Tiles(TilesCmd::Export {
            file,
            source,
            bbox,
            zoom,
            config,
        }) => {
            let client = client_for(&config)?;
            let file = if file.is_absolute() {
                file
            } else {
                std::env::current_dir()?.join(file)
            };
            let r = client
                .post_streaming(
                    "/api/v1/tiles/export",
                    serde_json::json!({ "source": source, "bbox": bbox, "zoom": zoom, "to": file }),
                    count_printer("export"),
                )
                .await?;
            eprintln!();
            println!("exported {source} to {}: {r}", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cache(CacheCmd::Offline { state, config }) => {
            let client = client_for(&config)?;
            let body = serde_json::to_vec(&serde_json::json!({ "offline": state == "on" }))?;
            let (code, body) = client
                .request(hyper::Method::POST, "/api/v1/cache/offline", Some(body))
                .await?;
            if code != 200 {
                return Err(node_agent::client::answer_error(code, &body));
            }
            println!("forced offline: {state}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo { racks, dir } => {
            init_logging(log_format(cli.log_format, LogFormat::Plain), Some("warn"));
            node_agent::demo::run(racks as usize, dir, shutdown_token()).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn client_for(config: &Path) -> Result<AgentClient> {
    AgentClient::from_config(config).with_context(|| format!("using {}", config.display()))
}

/// Prints `what: 42% (...)` in place on a terminal, one line per update
/// otherwise; `amount` renders "done of total".
fn printer(what: &'static str, amount: fn(u64, u64) -> String) -> impl FnMut(u64, u64) {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    move |done, total| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let line = format!("{what}: {pct}% ({})", amount(done, total));
        if tty {
            eprint!("\r{line}   ");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
    }
}

/// Progress in bytes: `import: 42% (1.2G of 4.0G)`.
fn progress_printer(what: &'static str) -> impl FnMut(u64, u64) {
    printer(what, |d, t| {
        format!("{} of {}", human_bytes(d), human_bytes(t))
    })
}

/// Progress in tiles: `seed: 42% (420 of 1000 tiles)`.
fn count_printer(what: &'static str) -> impl FnMut(u64, u64) {
    printer(what, |d, t| format!("{d} of {t} tiles"))
}

async fn app_cmd(cmd: AppCmd) -> Result<ExitCode> {
    let post = |config: &PathBuf, path: String, body: serde_json::Value| {
        let client = client_for(config);
        async move {
            let (status, body) = client?
                .request(hyper::Method::POST, &path, Some(serde_json::to_vec(&body)?))
                .await?;
            if status != 200 {
                return Err(node_agent::client::answer_error(status, &body));
            }
            Ok(serde_json::from_slice::<serde_json::Value>(&body)?)
        }
    };
    match cmd {
        AppCmd::Deploy { manifest, config } => {
            // Parse here too: errors name the file, the appliance and the field.
            let specs = match deploy::appliance::load(&manifest) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("fieldrack: {e}");
                    return Ok(ExitCode::from(65));
                }
            };
            let text = std::fs::read_to_string(&manifest)?;
            post(
                &config,
                "/api/v1/apps".into(),
                serde_json::json!({ "manifest": text }),
            )
            .await?;
            for s in specs {
                println!("deployed {} (tier {}, driver {})", s.name, s.tier, s.driver);
            }
        }
        AppCmd::List { config, json } => {
            let client = client_for(&config)?;
            let apps: Vec<node_agent::supervisor::ApplianceStatus> =
                client.get_json("/api/v1/apps").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&apps)?);
            } else {
                println!(
                    "{:<20} {:<12} {:<9} {:>4} {:>6} {:>8}  REASON",
                    "APPLIANCE", "OWNER", "STATE", "TIER", "EPOCH", "SINCE_S"
                );
                for a in apps {
                    println!(
                        "{:<20} {:<12} {:<9} {:>4} {:>6} {:>8}  {}",
                        a.name,
                        a.owner.as_deref().unwrap_or("-"),
                        a.state,
                        a.tier,
                        a.epoch,
                        a.since_s.map_or("-".into(), |s| format!("{s:.1}")),
                        a.reason.as_deref().unwrap_or("")
                    );
                }
            }
        }
        AppCmd::Stop { name, config } => {
            post(
                &config,
                format!("/api/v1/apps/{name}/stop"),
                serde_json::json!({}),
            )
            .await?;
            println!("{name}: stopping");
        }
        AppCmd::Start { name, config } => {
            post(
                &config,
                format!("/api/v1/apps/{name}/start"),
                serde_json::json!({}),
            )
            .await?;
            println!("{name}: starting");
        }
        AppCmd::Move { name, to, config } => {
            post(
                &config,
                format!("/api/v1/apps/{name}/move"),
                serde_json::json!({ "to": to }),
            )
            .await?;
            println!("{name}: moving to {to}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn volume_cmd(cmd: VolumeCmd) -> Result<ExitCode> {
    match cmd {
        VolumeCmd::Create { name, size, config } => {
            let client = client_for(&config)?;
            let body = serde_json::to_vec(&serde_json::json!({ "name": name, "size": size }))?;
            let (status, body) = client
                .request(hyper::Method::POST, "/api/v1/volumes", Some(body))
                .await?;
            if status != 201 {
                return Err(node_agent::client::answer_error(status, &body));
            }
            println!("created volume {name} ({size})");
        }
        VolumeCmd::Import { name, from, config } => {
            let client = client_for(&config)?;
            let from =
                std::fs::canonicalize(&from).with_context(|| format!("{}", from.display()))?;
            let r = client
                .post_streaming(
                    &format!("/api/v1/volumes/{name}/import"),
                    serde_json::json!({ "from": from }),
                    progress_printer("import"),
                )
                .await?;
            eprintln!();
            println!(
                "imported {} as generation {}",
                from.display(),
                r["generation"]
            );
        }
        VolumeCmd::Export {
            name,
            to,
            generation,
            config,
        } => {
            let client = client_for(&config)?;
            let to = if to.is_absolute() {
                to
            } else {
                std::env::current_dir()?.join(to)
            };
            client
                .post_streaming(
                    &format!("/api/v1/volumes/{name}/export"),
                    serde_json::json!({ "to": to, "generation": generation }),
                    progress_printer("export"),
                )
                .await?;
            eprintln!();
            println!("exported {name} to {}", to.display());
        }
        VolumeCmd::Snapshot { name, config } => {
            let client = client_for(&config)?;
            let (status, body) = client
                .request(
                    hyper::Method::POST,
                    &format!("/api/v1/volumes/{name}/snapshot"),
                    None,
                )
                .await?;
            if status != 200 {
                return Err(node_agent::client::answer_error(status, &body));
            }
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            println!("{name}: generation {}", v["generation"]);
        }
        VolumeCmd::Status { config, json } => {
            let client = client_for(&config)?;
            let status: Status = client.get_json("/api/v1/status").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status.volumes)?);
            } else if status.volumes.is_empty() {
                println!("no volumes on rack {}", status.rack);
            } else {
                let table = render_table(&Status {
                    peers: Vec::new(),
                    revoked: Vec::new(),
                    ..status
                });
                print!(
                    "{}",
                    table
                        .lines()
                        .skip_while(|l| !l.starts_with("VOLUME"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                println!();
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn fleet_cmd(cmd: FleetCmd) -> Result<ExitCode> {
    match cmd {
        FleetCmd::Init {
            dir,
            racks,
            witness,
            local,
            name,
            site,
            valid_days,
        } => {
            let name = name.unwrap_or_else(|| {
                dir.canonicalize()
                    .unwrap_or_else(|_| dir.clone())
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "fleet".into())
            });
            let site = site.unwrap_or_else(|| "default".into());
            let specs: Vec<RackSpec> = racks
                .iter()
                .map(|r| (r, Role::Rack))
                .chain(witness.iter().map(|w| (w, Role::Witness)))
                .map(|(n, role)| RackSpec {
                    name: n.trim().to_string(),
                    role,
                    site: site.clone(),
                })
                .collect();
            let fleet = fleet::init(&dir, &name, &specs, local, valid_days)?;
            println!("fleet {:?} created in {}", fleet.name, dir.display());
            println!(
                "  fleet signing key: {} (keep it on this laptop)",
                dir.join(fleet::FLEET_KEY_FILE).display()
            );
            for r in &fleet.racks {
                println!(
                    "  {} {:<8} {}  api {}  {}",
                    r.role,
                    r.name,
                    r.mesh,
                    r.api,
                    dir.join(&r.name).join("rack.toml").display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        FleetCmd::AddRack {
            dir,
            rack,
            witness,
            site,
        } => {
            let spec = RackSpec {
                name: rack,
                role: if witness { Role::Witness } else { Role::Rack },
                site: site.unwrap_or_else(|| "default".into()),
            };
            let r = fleet::add_rack(&dir, &spec)?;
            println!(
                "added {} {} ({}) {}",
                r.role,
                r.name,
                r.peer_id,
                dir.join(&r.name).join("rack.toml").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        FleetCmd::Revoke {
            dir,
            rack,
            reason,
            config,
        } => {
            let rev = fleet::revoke(&dir, &rack, &reason)?;
            println!(
                "revoked rack {rack}; revocation written to {}",
                dir.join("revocations")
                    .join(format!("{rack}.json"))
                    .display()
            );
            if let Some(config) = config {
                let client = client_for(&config)?;
                let (status, body) = client
                    .request(
                        hyper::Method::POST,
                        "/api/v1/revocations",
                        Some(serde_json::to_vec(&rev)?),
                    )
                    .await?;
                if status != 200 {
                    return Err(node_agent::client::answer_error(status, &body)
                        .context("the agent refused the revocation"));
                }
                println!(
                    "handed to the agent at {}; it spreads through the mesh",
                    config.display()
                );
            } else {
                println!("hand it to any running rack with: fieldrack fleet revoke --dir {} --rack {rack} --config RACK.toml", dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
