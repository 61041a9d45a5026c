//! `fieldrack demo`: a whole local field on this machine, no configuration.
//!
//! Provisions a 3-rack fleet with loopback addresses in a temporary
//! directory, each rack with the generated sample map as a tile source
//! ([`crate::sample_tiles`]), starts the agents as child processes (logs to
//! files), imports the sample map into every rack, deploys a small sample
//! appliance ([`SAMPLE_APPLIANCE`]) with a replicated volume, prints the
//! console and map URLs with a login to paste, and stops everything
//! cleanly on Ctrl-C. Killing the rack that runs the appliance moves it,
//! live in the console.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use deploy::Role;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

use crate::client::AgentClient;
use crate::fleet::{self, RackSpec};
use crate::status::render_table;

/// Children get this long after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// The sample map's `[[tile_source]]` name.
pub const SAMPLE_SOURCE: &str = "sample";
/// The sample appliance's name.
pub const SAMPLE_APPLIANCE: &str = "logbook";

/// The sample appliance: a shell loop stamping the time and the rack it
/// runs on into its replicated volume every second (in place, so the
/// volume stays its size), like a registration desk's logbook.
fn sample_manifest() -> String {
    format!(
        r#"[[appliance]]
name = "{SAMPLE_APPLIANCE}"
driver = "process"
command = ["/bin/sh", "-c", "i=0; while :; do printf '%-63s\\n' \"$(date -u +%FT%TZ) $FIELDRACK_RACK epoch $FIELDRACK_EPOCH\" | dd of=\"$FIELDRACK_VOLUME_LOGBOOK_DATA\" bs=64 seek=$((i % 4096)) conv=notrunc 2>/dev/null; i=$((i + 1)); sleep 1; done"]
tier = 1
stop_grace_ms = 2000
[[appliance.volume]]
name = "{SAMPLE_APPLIANCE}-data"
size = "4M"
"#
    )
}

/// Adds the sample map as a tile source of the rack whose config is
/// `config` (its origin is the discard port: its tiles come only from the
/// import).
fn add_sample_source(config: &Path) -> Result<()> {
    let mut cfg = deploy::RackConfig::load(config)?;
    if cfg.proxy.is_none() {
        return Ok(());
    }
    let source: deploy::config::TileSource = toml::from_str(&format!(
        "name = \"{SAMPLE_SOURCE}\"\nurl = \"http://127.0.0.1:9/{{z}}/{{x}}/{{y}}.png\"\nformat = \"png\"\nattribution = \"Fieldrack sample map (generated, not a real place)\"\n"
    ))
    .context("the sample tile source")?;
    cfg.tile_source.push(source);
    std::fs::write(config, cfg.to_toml())
        .with_context(|| format!("writing {}", config.display()))?;
    Ok(())
}

struct Children(Vec<(String, Child)>);

impl Children {
    fn stop(&mut self) {
        for (_, c) in &self.0 {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        for (name, c) in &mut self.0 {
            loop {
                match c.try_wait() {
                    Ok(Some(status)) => {
                        println!("  rack {name} stopped ({status})");
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        println!("  rack {name} killed after {STOP_GRACE:?}");
                        break;
                    }
                }
            }
        }
        self.0.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Run the demo until `shutdown`.
///
/// # Errors
/// If provisioning or starting an agent fails.
pub async fn run(racks: usize, dir: Option<PathBuf>, shutdown: CancellationToken) -> Result<()> {
    let (dir, _tmp) = match dir {
        Some(d) => (d, None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("fieldrack-demo-")
                .tempdir()?;
            (t.path().to_owned(), Some(t))
        }
    };
    let names = rack_names(racks);
    let specs: Vec<RackSpec> = names
        .iter()
        .map(|n| RackSpec {
            name: n.clone(),
            role: Role::Rack,
            site: format!("site-{n}"),
        })
        .collect();
    fleet::init(&dir, "demo", &specs, true, 30).context("provisioning the demo fleet")?;
    println!("Provisioned a {racks}-rack fleet in {}", dir.display());
    for n in &names {
        add_sample_source(&dir.join(n).join("rack.toml"))?;
    }
    let exe = std::env::current_exe().context("finding the fieldrack binary")?;
    let mut children = Children(Vec::new());
    for n in &names {
        let config = dir.join(n).join("rack.toml");
        let log = std::fs::File::create(dir.join(n).join("agent.log"))?;
        let child = Command::new(&exe)
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting rack {n}"))?;
        children.0.push((n.clone(), child));
    }
    let clients: Vec<(String, PathBuf, AgentClient)> = names
        .iter()
        .map(|n| {
            let p = dir.join(n).join("rack.toml");
            AgentClient::from_config(&p)
                .map(|c| (n.clone(), p, c))
                .map_err(anyhow::Error::from)
        })
        .collect::<Result<_>>()?;
    let t0 = Instant::now();
    let formed = wait_for_mesh(&clients, racks, &shutdown).await;
    match formed {
        Some(true) => println!("Full mesh formed in {:.1}s.\n", t0.elapsed().as_secs_f64()),
        Some(false) => println!("The mesh has not fully formed yet; see the agent logs.\n"),
        None => {
            children.stop();
            return Ok(());
        }
    }
    if formed == Some(true) {
        mission(&dir, &clients).await;
    }
    print_field(&dir, &clients).await;
    print_pages(&dir, &clients, &children);
    println!(
        "Try:  {} status --config {}",
        exe.display(),
        dir.join(&names[0]).join("rack.toml").display()
    );
    println!(
        "      kill the rack running {SAMPLE_APPLIANCE} (its pid is in `ps`, or press Ctrl-Z and `kill -9` it)"
    );
    println!(
        "      and watch the console mark it dead and move {SAMPLE_APPLIANCE} to another rack."
    );
    println!("Ctrl-C stops the field.\n");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(15)) => {
                for (name, c) in &mut children.0 {
                    if let Ok(Some(st)) = c.try_wait() {
                        println!("rack {name} exited ({st})");
                    }
                }
                print_tables(&clients).await;
            }
        }
    }
    println!("\nStopping the field…");
    children.stop();
    Ok(())
}

/// `a`, `b`... for up to 26 racks; `r01`, `r02`... beyond.
fn rack_names(racks: usize) -> Vec<String> {
    if racks <= 26 {
        (b'a'..)
            .take(racks)
            .map(|c| char::from(c).to_string())
            .collect()
    } else {
        (1..=racks).map(|i| format!("r{i:02}")).collect()
    }
}

async fn wait_for_mesh(
    clients: &[(String, PathBuf, AgentClient)],
    racks: usize,
    shutdown: &CancellationToken,
) -> Option<bool> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let mut all = true;
        for (_, _, c) in clients {
            let alive = match c.status().await {
                Ok(s) => s
                    .peers
                    .iter()
                    .filter(|p| p.state == mesh::membership::State::Alive)
                    .count(),
                Err(_) => 0,
            };
            all &= alive + 1 == racks;
        }
        if all {
            return Some(true);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    Some(false)
}

/// Imports the sample map into every rack and deploys the sample
/// appliance; failures are printed, not fatal (the field still runs).
async fn mission(dir: &Path, clients: &[(String, PathBuf, AgentClient)]) {
    let archive = dir.join("sample-map.pmtiles");
    if let Err(e) = std::fs::write(&archive, crate::sample_tiles::sample_pmtiles()) {
        println!("writing the sample map failed: {e}");
        return;
    }
    for (name, _, c) in clients {
        match c.tiles_import(SAMPLE_SOURCE, &archive, |_| {}).await {
            Ok(r) => println!(
                "rack {name}: imported the sample map ({} tiles)",
                r["tiles"].as_u64().unwrap_or(0)
            ),
            Err(e) => println!("rack {name}: importing the sample map failed: {e:#}"),
        }
    }
    if let Some((_, _, c)) = clients.first() {
        match c.app_deploy(&sample_manifest()).await {
            Ok(_) => println!(
                "Deployed the sample appliance {SAMPLE_APPLIANCE} with a replicated volume {SAMPLE_APPLIANCE}-data.\n"
            ),
            Err(e) => println!("deploying {SAMPLE_APPLIANCE} failed: {e:#}\n"),
        }
    }
}

/// The console and map of every rack, with the login to paste.
fn print_pages(dir: &Path, clients: &[(String, PathBuf, AgentClient)], children: &Children) {
    println!("Open in a browser (no internet needed):");
    for (name, config, _) in clients {
        let Some(proxy) = deploy::RackConfig::load(config).ok().and_then(|c| c.proxy) else {
            continue;
        };
        let token = std::fs::read_to_string(dir.join(name).join("api-token")).unwrap_or_default();
        let pid = children
            .0
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, c)| c.id());
        println!(
            "  rack {name} (pid {pid}): console http://{}/console/  (login: {})",
            proxy.listen,
            token.trim()
        );
        println!(
            "          map     http://{}/{}",
            proxy.listen,
            crate::sample_tiles::sample_view()
        );
    }
    println!();
}

async fn print_field(dir: &Path, clients: &[(String, PathBuf, AgentClient)]) {
    for (name, config, _) in clients {
        let cfg = deploy::RackConfig::load(config).ok();
        let token = std::fs::read_to_string(dir.join(name).join("api-token")).unwrap_or_default();
        if let Some(cfg) = cfg {
            println!(
                "rack {name}: API http://{}/api/v1/status  metrics http://{}/metrics  (Authorization: Bearer {})",
                cfg.api.listen,
                cfg.api.listen,
                token.trim()
            );
            println!(
                "        config {}  log {}",
                config.display(),
                dir.join(name).join("agent.log").display()
            );
        }
    }
    println!();
    print_tables(clients).await;
}

async fn print_tables(clients: &[(String, PathBuf, AgentClient)]) {
    for (name, _, c) in clients {
        match c.status().await {
            Ok(s) => println!("{}", render_table(&s)),
            Err(e) => println!("rack {name}: unreachable ({e:#})\n"),
        }
    }
}
