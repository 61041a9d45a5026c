//! Power telemetry end to end: [`PowerMonitor`] against Debian's real NUT
//! server (`upsd` + the `dummy-ups` driver, package `nut-server`), and against
//! the generator file and command sources.
//!
//! The NUT test runs its own `dummy-ups` and `upsd` in a temp dir, on a free
//! port, configured through `NUT_CONFPATH` / `NUT_STATEPATH` /
//! `NUT_ALTPIDPATH`; nothing under /etc/nut or /run/nut is used or changed.
//! Both daemons run in the foreground (`-F`) and, when the test runs as root,
//! with `-u root` so they do not drop to the `nut` user (which could not read
//! the temp dir). They are killed by a guard even if the test panics.
//!
//! If NUT is not installed, the test fails and says to run the setup script.

use crate::common;

use std::fs;
use std::io::Read as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deploy::config::{NutConfig, PowerConfig};
use deploy::power::{NutErrorCode, NutResponseError, PowerSource, PowerStatus};
use node_agent::power::{read_nut, NutClientError, PowerMonitor};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const SETUP_HINT: &str = "NUT is not installed: run the setup script \
    (it installs the Debian package `nut-server`: apt-get install -y nut-server)";

/// Where Debian and other distributions put NUT's programs. Debian's
/// /sbin/upsd is a shell wrapper that refuses to start unless
/// /etc/nut/nut.conf says MODE=standalone, so the real binaries under
/// /lib/nut come first and scripts are skipped.
const NUT_DIRS: &[&str] = &[
    "/lib/nut",
    "/usr/lib/nut",
    "/usr/libexec/nut",
    "/usr/sbin",
    "/sbin",
];

/// How long to wait for daemons to come up and for readings to change. The
/// driver re-reads its file every second and upsd relays it at once; the
/// monitor polls every 200 ms, so changes normally show within ~2 s.
const WAIT: Duration = Duration::from_secs(15);

fn find_nut_program(name: &str) -> PathBuf {
    for dir in NUT_DIRS {
        let path = Path::new(dir).join(name);
        let Ok(mut file) = fs::File::open(&path) else {
            continue;
        };
        let mut magic = [0u8; 2];
        if file.read_exact(&mut magic).is_ok() && &magic != b"#!" {
            return path;
        }
    }
    panic!("{name} not found in {NUT_DIRS:?}. {SETUP_HINT}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon killed (and reaped) when dropped.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(
        name: &'static str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &Path)],
        log: PathBuf,
    ) -> Self {
        let out = fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program:?}: {e}. {SETUP_HINT}"));
        Self { name, child, log }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    fn log(&self) -> String {
        format!(
            "--- {} log ---\n{}",
            self.name,
            fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private NUT installation: one `dummy-ups` UPS called `dummy`, one upsd.
struct Nut {
    // Fields drop in order: daemons before the directory they live in.
    upsd: Option<Daemon>,
    driver: Daemon,
    port: u16,
    dummy_file: PathBuf,
    dir: tempfile::TempDir,
}

impl Nut {
    fn start(initial: &str) -> Self {
        let driver_bin = find_nut_program("dummy-ups");
        let upsd_bin = find_nut_program("upsd");
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path();
        let state = conf.join("state");
        fs::create_dir(&state).unwrap();
        let port = free_port();
        let dummy_file = conf.join("dummy.dev");
        fs::write(&dummy_file, initial).unwrap();
        // dummy-loop: re-read the file every `pollinterval` (the default for
        // *.dev files, dummy-once, only re-reads when the mtime changes,
        // which has one-second granularity on some filesystems).
        fs::write(
            conf.join("ups.conf"),
            format!(
                "[dummy]\n  driver = dummy-ups\n  port = {}\n  mode = dummy-loop\n  pollinterval = 1\n  desc = \"fieldrack test UPS\"\n",
                dummy_file.display()
            ),
        )
        .unwrap();
        fs::write(
            conf.join("upsd.conf"),
            format!("LISTEN 127.0.0.1 {port}\nSTATEPATH {}\n", state.display()),
        )
        .unwrap();
        fs::write(
            conf.join("upsd.users"),
            "[monitor]\n  password = \"s3cret pass\"\n  upsmon primary\n",
        )
        .unwrap();
        fs::write(conf.join("nut.conf"), "MODE=standalone\n").unwrap();

        let env: [(&str, &Path); 3] = [
            ("NUT_CONFPATH", conf),
            ("NUT_STATEPATH", &state),
            ("NUT_ALTPIDPATH", &state),
        ];
        // As root, both daemons would switch to the `nut` user, which cannot
        // read this private temp dir; keep them root. As non-root they stay
        // whoever runs the test.
        let running_as_root = fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false);
        let user: &[&str] = if running_as_root {
            &["-u", "root"]
        } else {
            &[]
        };

        let driver_args = [&["-a", "dummy", "-F"][..], user].concat();
        let mut driver = Daemon::spawn(
            "dummy-ups",
            &driver_bin,
            &driver_args,
            &env,
            conf.join("driver.log"),
        );
        let socket = state.join("dummy-ups-dummy");
        let deadline = Instant::now() + WAIT;
        while !socket.exists() {
            if let Some(status) = driver.exited() {
                panic!(
                    "dummy-ups exited ({status}) before creating {socket:?}\n{}",
                    driver.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "dummy-ups did not create {socket:?}\n{}",
                driver.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }

        let upsd_args = [&["-F"][..], user].concat();
        let mut upsd = Daemon::spawn("upsd", &upsd_bin, &upsd_args, &env, conf.join("upsd.log"));
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = upsd.exited() {
                panic!("upsd exited ({status})\n{}\n{}", upsd.log(), driver.log());
            }
            assert!(
                Instant::now() < deadline,
                "upsd does not listen on {port}\n{}",
                upsd.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            upsd: Some(upsd),
            driver,
            port,
            dummy_file,
            dir,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Replace the dummy file atomically, so the driver never reads half of it.
    fn set_dummy(&self, contents: &str) {
        let tmp = self.dir.path().join("dummy.tmp");
        fs::write(&tmp, contents).unwrap();
        fs::rename(&tmp, &self.dummy_file).unwrap();
    }

    fn stop_upsd(&mut self) {
        self.upsd.take();
    }

    fn logs(&self) -> String {
        let upsd = self.upsd.as_ref().map(Daemon::log).unwrap_or_default();
        format!("{upsd}\n{}", self.driver.log())
    }
}

/// Wait until the published status satisfies `pred`; panic with the last
/// status and `context()` otherwise.
async fn wait_for(
    rx: &mut watch::Receiver<PowerStatus>,
    what: &str,
    pred: impl FnMut(&PowerStatus) -> bool,
    context: impl FnOnce() -> String,
) -> PowerStatus {
    let result = tokio::time::timeout(WAIT, rx.wait_for(pred))
        .await
        .map(|r| r.map(|s| s.clone()));
    match result {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => panic!("power monitor stopped while waiting for {what}"),
        Err(_) => panic!(
            "no {what} within {WAIT:?}; last status {:?}\n{}",
            *rx.borrow(),
            context()
        ),
    }
}

fn config(poll_interval_ms: u64) -> PowerConfig {
    PowerConfig {
        poll_interval_ms,
        dying_runtime_s: 300,
        ..PowerConfig::default()
    }
}

#[tokio::test]
async fn nut_dummy_ups_online_battery_and_server_loss() {
    let mut nut = Nut::start("ups.status: OL\nbattery.charge: 100\nbattery.runtime: 3600\n");
    let nut_config = NutConfig {
        addr: nut.addr(),
        ups: "dummy".into(),
        // upsd does not require credentials for LIST VAR; sending them (with
        // a space in the password) checks USERNAME/PASSWORD and quoting.
        username: Some("monitor".into()),
        password: Some("s3cret pass".into()),
    };

    // A typed error for a UPS upsd does not know.
    let err = read_nut(&NutConfig {
        ups: "nope".into(),
        ..nut_config.clone()
    })
    .await
    .unwrap_err();
    assert!(
        matches!(&err, NutClientError::Response(NutResponseError::Server(e)) if e.code == NutErrorCode::UnknownUps),
        "{err}"
    );

    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    let mut rx = PowerMonitor::spawn(
        PowerConfig {
            nut: Some(nut_config),
            ..config(200)
        },
        cancel.clone(),
    );

    // 1. On line, full battery: grid, healthy.
    let s = wait_for(
        &mut rx,
        "a first NUT reading",
        |s| s.error.is_none(),
        || nut.logs(),
    )
    .await;
    assert_eq!(
        s,
        PowerStatus {
            source: PowerSource::Grid,
            battery_runtime_s: Some(3600),
            battery_charge_pct: Some(100.0),
            fuel_pct: None,
            dying: false,
            error: None,
        }
    );

    // 2. On battery with 120 s left (< 300): battery, dying.
    let changed = Instant::now();
    nut.set_dummy("ups.status: OB\nbattery.charge: 40\nbattery.runtime: 120\n");
    let s = wait_for(
        &mut rx,
        "the switch to battery",
        |s| s.source == PowerSource::Battery,
        || nut.logs(),
    )
    .await;
    assert!(s.dying, "{s:?}");
    assert_eq!(s.battery_runtime_s, Some(120));
    assert_eq!(s.battery_charge_pct, Some(40.0));
    assert_eq!(s.error, None);
    eprintln!(
        "dummy-ups change seen by the monitor after {:?}",
        changed.elapsed()
    );

    // 3. upsd gone: error set, last values kept.
    nut.stop_upsd();
    let s = wait_for(
        &mut rx,
        "an error after upsd stopped",
        |s| s.error.is_some(),
        || nut.logs(),
    )
    .await;
    assert_eq!(
        (s.source, s.dying, s.battery_runtime_s, s.battery_charge_pct),
        (PowerSource::Battery, true, Some(120), Some(40.0)),
        "{s:?}"
    );
    let error = s.error.unwrap();
    assert!(error.contains("dummy@127.0.0.1"), "{error}");
    eprintln!("error with upsd stopped: {error}");
}

#[tokio::test]
async fn file_source() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("power.json");
    let write = |json: &str| {
        let tmp = dir.path().join("power.tmp");
        fs::write(&tmp, json).unwrap();
        fs::rename(&tmp, &path).unwrap();
    };
    write(
        r#"{"source": "generator", "battery_runtime_s": 1234, "battery_charge_pct": 80.0, "fuel_pct": 42.5}"#,
    );
    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    let mut rx = PowerMonitor::spawn(
        PowerConfig {
            file: Some(path.clone()),
            ..config(100)
        },
        cancel.clone(),
    );

    let s = wait_for(
        &mut rx,
        "a generator reading",
        |s| s.error.is_none(),
        String::new,
    )
    .await;
    assert_eq!(
        s,
        PowerStatus {
            source: PowerSource::Generator,
            battery_runtime_s: Some(1234),
            battery_charge_pct: Some(80.0),
            fuel_pct: Some(42.5),
            dying: false,
            error: None,
        }
    );

    write(
        r#"{"source": "battery", "battery_runtime_s": 100, "battery_charge_pct": 10, "fuel_pct": null}"#,
    );
    let s = wait_for(
        &mut rx,
        "battery",
        |s| s.source == PowerSource::Battery,
        String::new,
    )
    .await;
    assert!(s.dying);
    assert_eq!((s.battery_runtime_s, s.fuel_pct), (Some(100), None));

    write(r#"{"source": "battery", "runtime": 100}"#);
    let s = wait_for(
        &mut rx,
        "an error for a bad report",
        |s| s.error.is_some(),
        String::new,
    )
    .await;
    assert_eq!(
        (s.source, s.dying, s.battery_runtime_s),
        (PowerSource::Battery, true, Some(100))
    );
    let error = s.error.unwrap();
    assert!(error.contains("unknown field `runtime`"), "{error}");

    fs::remove_file(&path).unwrap();
    let s = wait_for(
        &mut rx,
        "an error for a missing file",
        |s| s.error.as_deref() != Some(error.as_str()),
        String::new,
    )
    .await;
    assert!(
        s.error
            .as_deref()
            .unwrap_or("")
            .contains("cannot read power file"),
        "{s:?}"
    );
    assert_eq!(s.source, PowerSource::Battery);

    write(r#"{"source": "grid"}"#);
    let s = wait_for(&mut rx, "recovery", |s| s.error.is_none(), String::new).await;
    assert_eq!(s, PowerStatus::default());
}

#[tokio::test]
async fn command_source() {
    let sh = |script: &str| {
        Some(vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            script.to_owned(),
        ])
    };
    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();

    let mut rx = PowerMonitor::spawn(
        PowerConfig {
            command: sh(
                r#"echo '{"source": "generator", "battery_charge_pct": 80.0, "fuel_pct": 42.5}'"#,
            ),
            ..config(100)
        },
        cancel.child_token(),
    );
    let s = wait_for(
        &mut rx,
        "a generator reading",
        |s| s.error.is_none(),
        String::new,
    )
    .await;
    assert_eq!(
        (s.source, s.fuel_pct, s.battery_charge_pct, s.dying),
        (PowerSource::Generator, Some(42.5), Some(80.0), false)
    );

    // Out of fuel counts as dying.
    let mut rx = PowerMonitor::spawn(
        PowerConfig {
            command: sh(r#"echo '{"source": "generator", "fuel_pct": 0}'"#),
            ..config(100)
        },
        cancel.child_token(),
    );
    let s = wait_for(
        &mut rx,
        "a generator reading",
        |s| s.error.is_none(),
        String::new,
    )
    .await;
    assert!(s.dying, "{s:?}");

    // A failing command: an error, and the initial values stay.
    let mut rx = PowerMonitor::spawn(
        PowerConfig {
            command: sh("echo 'no controller' >&2; exit 2"),
            ..config(100)
        },
        cancel.child_token(),
    );
    let s = wait_for(
        &mut rx,
        "a command error",
        |s| {
            s.error
                .as_deref()
                .is_some_and(|e| e.contains("no controller"))
        },
        String::new,
    )
    .await;
    assert_eq!((s.source, s.dying), (PowerSource::Grid, false));
}

/// With NUT's dummy-ups reporting rack a's battery running down, its
/// appliance moves to another rack before the runtime reaches zero, and
/// every record it wrote on a is on the new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_rack_hands_its_appliance_over_before_the_battery_runs_out() {
    use field_tests::appliance::{check_records, check_witness, recorder_manifest};

    let nut = Nut::start("ups.status: OL\nbattery.charge: 100\nbattery.runtime: 3600\n");
    let f = common::Fleet::init("a,b,c", &[]);
    for r in ["a", "b", "c"] {
        let p = f.config(r);
        let mut text = fs::read_to_string(&p).unwrap().replace(
            "[volumes]\nreplication_factor = 2\nsnapshot_interval_s = 2",
            "[volumes]\nreplication_factor = 2\nsnapshot_interval_s = 1",
        );
        if r == "a" {
            text = text.replace(
                "[power]\n",
                &format!(
                    "[power]\nnut = {{ addr = \"{}\", ups = \"dummy\" }}\n",
                    nut.addr()
                ),
            );
            text = text
                .replace("poll_interval_ms = 2000", "poll_interval_ms = 500")
                .replace("dying_runtime_s = 300", "dying_runtime_s = 30");
        }
        fs::write(&p, text).unwrap();
    }
    let _agents: Vec<common::Agent> = ["a", "b", "c"].iter().map(|r| f.start(r)).collect();
    let client = |r: &str| f.client(r);
    let app = |r: &'static str| {
        let c = client(r);
        async move {
            common::status(&c)
                .await
                .and_then(|s| s.appliances.into_iter().find(|a| a.name == "radio"))
        }
    };
    let witness = f.dir.path().join("witness.log");
    let manifest = f.dir.path().join("radio.toml");
    fs::write(
        &manifest,
        recorder_manifest("radio", 0, &witness)
            .replace("tier = 0\n", "tier = 0\nplacement = { racks = [\"a\"] }\n"),
    )
    .unwrap();
    common::wait_until(
        Duration::from_secs(30),
        "a control plane of 3 voters",
        || async {
            common::status(&client("b"))
                .await
                .and_then(|s| s.control)
                .is_some_and(|c| c.voters.len() == 3 && c.leader.is_some())
        },
    )
    .await;
    // Placement prefers a only once the leader has a's report and counts
    // it up: deploying earlier would place the radio on b or c.
    common::wait_until(
        Duration::from_secs(30),
        "all three racks up and reported on the leader",
        || async {
            let Some(leader) = common::status(&client("b"))
                .await
                .and_then(|s| s.control)
                .and_then(|c| c.leader)
            else {
                return false;
            };
            common::status(&client(&leader))
                .await
                .and_then(|s| s.field)
                .is_some_and(|v| {
                    ["a", "b", "c"]
                        .iter()
                        .all(|r| v.rack(r).is_some_and(|r| r.up && r.reported))
                })
        },
    )
    .await;
    // The same view is served alone at /api/v1/field. a's own view has
    // its report once a has applied the entry that carries it (a follower
    // applies what the leader committed a moment later).
    let field_of_a = || async {
        let (code, body) = client("a")
            .request(hyper::Method::GET, "/api/v1/field", None)
            .await
            .unwrap();
        assert_eq!(code, 200);
        serde_json::from_slice::<control::FieldView>(&body).unwrap()
    };
    common::wait_until(
        Duration::from_secs(10),
        "a's own view has its report",
        || async { field_of_a().await.rack("a").is_some_and(|a| a.reported) },
    )
    .await;
    let view = field_of_a().await;
    let a = view.rack("a").expect("a in its own view");
    assert!(a.local && a.up && a.admitted && a.reachable, "{a:?}");
    assert!(
        a.free_bytes.is_some_and(|b| b > 0),
        "a reports its free bytes: {a:?}"
    );
    assert_eq!(a.power_source, Some(PowerSource::Grid), "{a:?}");
    let out = Command::new(common::BIN)
        .args(["app", "deploy"])
        .arg(&manifest)
        .arg("--config")
        .arg(f.config("b"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::wait_until(Duration::from_secs(30), "radio running on a", || async {
        app("b")
            .await
            .is_some_and(|a| a.state == "running" && a.owner.as_deref() == Some("a"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The generator stops: on battery, the runtime counts down in real time.
    let t0 = Instant::now();
    let mut runtime = 45i64;
    let moved = loop {
        nut.set_dummy(&format!(
            "ups.status: OB\nbattery.charge: 20\nbattery.runtime: {runtime}\n"
        ));
        if let Some(a) = app("c").await {
            if a.state == "running" && a.owner.as_deref() != Some("a") {
                break a;
            }
        }
        assert!(
            runtime > 0,
            "the battery ran out before radio moved: {:?}\n{}",
            app("c").await,
            nut.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        runtime = 45 - t0.elapsed().as_secs() as i64;
    };
    println!(
        "battery on at runtime 45 s, dying below 30 s; radio running on {} after {:.1} s (runtime left {runtime} s)",
        moved.owner.as_deref().unwrap(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(moved.reason.as_deref(), Some("power"));

    tokio::time::sleep(Duration::from_secs(1)).await;
    let owner = moved.owner.unwrap();
    let s = common::status(&f.client(&owner)).await.unwrap();
    let image = s
        .volumes
        .iter()
        .find(|v| v.name == "radio-data")
        .and_then(|v| v.image.clone())
        .unwrap();
    let records = check_records(Path::new(&image)).unwrap();
    let runs = check_witness(&witness).unwrap();
    let (old_epoch, &(_, last_old, ref rack)) = records.epochs.iter().next().unwrap();
    assert_eq!(rack, "a");
    assert_eq!(
        last_old + 1,
        runs[old_epoch].records,
        "every record written on a is on {owner}"
    );
}
