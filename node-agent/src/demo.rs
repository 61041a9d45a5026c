//! `fieldrack demo`: a whole local field on this machine, no configuration.
//!
//! Provisions a 3-rack fleet with loopback addresses in a temporary
//! directory, starts the agents as child processes (logs to files), prints
//! the field's status and URLs, and stops everything cleanly on Ctrl-C.

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
    let names: Vec<String> = (0..racks)
        .map(|i| ((b'a' + i as u8) as char).to_string())
        .collect();
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
    print_field(&dir, &clients).await;
    println!(
        "Try:  {} status --config {}",
        exe.display(),
        dir.join("a/rack.toml").display()
    );
    println!("      kill one rack's process and watch the others mark it dead.");
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

async fn wait_for_mesh(
    clients: &[(String, PathBuf, AgentClient)],
    racks: usize,
    shutdown: &CancellationToken,
) -> Option<bool> {
    let deadline = Instant::now() + Duration::from_secs(20);
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
