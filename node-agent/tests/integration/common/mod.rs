//! Helpers for tests that run real `fieldrack` agents on loopback.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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
        // The whole logs, kept past the temp dir for a closer look.
        let kept = std::env::temp_dir().join(format!("fieldrack-failed-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&kept);
        eprintln!("---- the agents' logs are kept in {}", kept.display());
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(&p, kept.join(e.file_name()));
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
        Agent::start_bin(BIN, config, log)
    }

    /// Like [`Agent::start`], with the agent binary at `bin`.
    pub fn start_bin(bin: &str, config: &Path, log: &Path) -> Agent {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(bin)
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

/// `fieldrack <args> --config <rack's rack.toml>`, run to its end.
pub fn cli_output(fleet: &Fleet, rack: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(fleet.config(rack))
        .output()
        .unwrap()
}

/// [`cli_output`] that must succeed: its standard output.
pub fn cli(fleet: &Fleet, rack: &str, args: &[&str]) -> String {
    let out = cli_output(fleet, rack, args);
    assert!(
        out.status.success(),
        "fieldrack {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The generation of volume `name` that `rack` reports, if it holds one.
pub async fn generation_on(fleet: &Fleet, rack: &str, name: &str) -> Option<u64> {
    status(&fleet.client(rack))
        .await?
        .volumes
        .into_iter()
        .find(|v| v.name == name)
        .and_then(|v| v.generation)
}

/// Adds a PNG `[[tile_source]]` named `name` whose origin is
/// `127.0.0.1:port`, plus `extra` lines, to a rack's config; returns the
/// rack's proxy address.
pub fn add_tile_source(fleet: &Fleet, rack: &str, name: &str, port: u16, extra: &str) -> String {
    let p = fleet.config(rack);
    let mut text = std::fs::read_to_string(&p).unwrap();
    text.push_str(&format!(
        "\n[[tile_source]]\nname = \"{name}\"\nurl = \"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.png\"\nformat = \"png\"\n{extra}"
    ));
    std::fs::write(&p, &text).unwrap();
    let cfg = deploy::RackConfig::load(&p).unwrap();
    cfg.proxy.unwrap().listen.to_string()
}

/// One HTTP/1.1 exchange with `addr` on a fresh connection (`Connection:
/// close`; a body is sent as JSON): status, head, de-chunked body.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    if let Some(b) = body {
        s.write_all(b).await.unwrap();
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (code, head, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + n]);
        b = &b[nl + 2 + n + 2..];
    }
}
