//! Helpers for tests that run real `fieldrack` agents on loopback.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use node_agent::client::AgentClient;
use node_agent::status::Status;

pub const BIN: &str = env!("CARGO_BIN_EXE_fieldrack");

/// A provisioned fleet in a temp dir.
pub struct Fleet {
    pub dir: tempfile::TempDir,
}

impl Fleet {
    pub fn init(racks: &str, extra: &[&str]) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .args(["fleet", "init", "--dir"])
            .arg(dir.path())
            .args(["--racks", racks, "--local", "--name", "test"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fleet init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Fleet { dir }
    }

    pub fn config(&self, rack: &str) -> PathBuf {
        self.dir.path().join(rack).join("rack.toml")
    }

    pub fn start(&self, rack: &str) -> Agent {
        Agent::start(
            &self.config(rack),
            &self.dir.path().join(format!("{rack}.log")),
        )
    }

    pub fn client(&self, rack: &str) -> AgentClient {
        AgentClient::from_config(&self.config(rack)).unwrap()
    }
}

impl Drop for Fleet {
    /// On a failing test, show what the agents said.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("  ")).collect();
                eprintln!("---- {} (last 40 lines) ----", p.display());
                for l in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// A running agent, killed on drop.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(config: &Path, log: &Path) -> Agent {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(BIN)
            .arg("agent")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Agent {
            child,
            log: log.to_owned(),
        }
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn status(c: &AgentClient) -> Option<Status> {
    c.status().await.ok()
}

pub fn state_of(s: &Status, rack: &str) -> Option<String> {
    s.peers
        .iter()
        .find(|p| p.rack.as_deref() == Some(rack))
        .map(|p| format!("{:?}", p.state).to_lowercase())
}

/// Poll `f` every 100 ms until it returns true; returns the time it took.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    loop {
        if f().await {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every rack in `racks` sees every other as `state`.
pub async fn all_see(fleet: &Fleet, racks: &[&str], state: &str) -> bool {
    for r in racks {
        let Some(s) = status(&fleet.client(r)).await else {
            return false;
        };
        for o in racks.iter().filter(|o| *o != r) {
            if state_of(&s, o).as_deref() != Some(state) {
                return false;
            }
        }
    }
    true
}

pub async fn metric(c: &AgentClient, name: &str) -> f64 {
    let text = c.metrics().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
