//! Real processes, no mocks.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deploy::appliance::ApplianceSpec;

use crate::drivers::procfs::is_alive;
use crate::drivers::tests::{eventually, read_pid, spec, toml_list};
use crate::drivers::{kill_leftover, launch, DriverError, Instance, LaunchSpec, PID_FILE};

fn sh(name: &str, script: &str) -> ApplianceSpec {
    spec(&format!(
        "name = \"{name}\"\ndriver = \"process\"\ncommand = {}\n",
        toml_list(&["sh", "-c", script])
    ))
}

async fn start(run_dir: &Path, spec: &ApplianceSpec) -> Instance {
    launch(LaunchSpec {
        rack: "rack-a",
        spec,
        epoch: 7,
        volumes: Vec::new(),
        run_dir: run_dir.to_owned(),
    })
    .await
    .unwrap()
}

/// Launch and wait for the script to create `ready` (so traps are set).
async fn start_ready(run_dir: &Path, spec: &ApplianceSpec) -> Instance {
    let inst = start(run_dir, spec).await;
    let ready = run_dir.join("ready");
    assert!(
        eventually(|| ready.exists()).await,
        "the appliance never got ready"
    );
    inst
}

#[tokio::test]
async fn environment_logs_and_pid_file() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let image = dir.path().join("registry-data.img");
    std::fs::write(&image, [0u8; 4096]).unwrap();
    let spec =
        spec(&format!(
        "name = \"registry\"\ndriver = \"process\"\ncommand = {}\nenv = {{ MODE = \"field\" }}\n\
         [[appliance.volume]]\nname = \"registry-data\"\nsize = 4096\n",
        toml_list(&["sh", "-c", "env > env.out; echo to-stdout; echo to-stderr >&2; exit 3"])
    ));
    let mut inst = launch(LaunchSpec {
        rack: "rack-a",
        spec: &spec,
        epoch: 7,
        volumes: vec![("registry-data".into(), image.clone())],
        run_dir: run_dir.clone(),
    })
    .await
    .unwrap();
    assert_eq!(read_pid(&run_dir.join(PID_FILE)), inst.pid() as i32);
    let exit = inst.wait().await;
    assert_eq!(exit.code, Some(3));
    assert!(!exit.success());
    assert_eq!(inst.wait().await, exit, "wait is repeatable");
    assert_eq!(inst.try_wait(), Some(exit));

    let env = std::fs::read_to_string(run_dir.join("env.out")).unwrap();
    let lines: Vec<&str> = env.lines().collect();
    for want in [
        "FIELDRACK_RACK=rack-a".to_string(),
        "FIELDRACK_APPLIANCE=registry".to_string(),
        "FIELDRACK_EPOCH=7".to_string(),
        format!("FIELDRACK_VOLUME_REGISTRY_DATA={}", image.display()),
        "MODE=field".to_string(),
    ] {
        assert!(lines.contains(&want.as_str()), "{want} missing from\n{env}");
    }
    assert!(lines.iter().any(|l| l.starts_with("PATH=")), "{env}");
    // The agent's own environment does not leak in.
    assert!(std::env::var("CARGO_MANIFEST_DIR").is_ok());
    assert!(!env.contains("CARGO_MANIFEST_DIR"), "{env}");

    let log = std::fs::read_to_string(run_dir.join("registry.log")).unwrap();
    assert!(
        log.contains("to-stdout") && log.contains("to-stderr"),
        "{log}"
    );
    assert!(log.contains("registry epoch 7 on rack rack-a"), "{log}");
}

#[tokio::test]
async fn try_wait_sees_a_natural_exit() {
    let dir = tempfile::tempdir().unwrap();
    let mut inst = start(dir.path(), &sh("quick", "exit 0")).await;
    let mut seen = None;
    assert!(
        eventually(|| {
            seen = inst.try_wait();
            seen.is_some()
        })
        .await
    );
    assert!(seen.unwrap().success());
}

#[tokio::test]
async fn stop_sends_sigterm_first() {
    let dir = tempfile::tempdir().unwrap();
    let script = "trap 'echo term > marker; exit 0' TERM; touch ready; while :; do sleep 0.1; done";
    let mut inst = start_ready(dir.path(), &sh("polite", script)).await;
    let exit = inst.stop(Duration::from_secs(20)).await;
    assert_eq!(exit.code, Some(0), "{exit}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("marker")).unwrap(),
        "term\n"
    );
}

#[tokio::test]
async fn stop_sigkills_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let script = "trap '' TERM; touch ready; while :; do sleep 0.1; done";
    let mut inst = start_ready(dir.path(), &sh("stubborn", script)).await;
    let pid = inst.pid() as i32;
    let grace = Duration::from_millis(500);
    let t = Instant::now();
    let exit = inst.stop(grace).await;
    let took = t.elapsed();
    assert_eq!(exit.signal, Some(9), "{exit}");
    assert!(
        took >= grace,
        "SIGKILL came before the grace period: {took:?}"
    );
    assert!(took < Duration::from_secs(30), "stop took {took:?}");
    assert!(!is_alive(pid));
}

#[tokio::test]
async fn the_whole_group_dies() {
    let dir = tempfile::tempdir().unwrap();
    // stop: a grandchild that ignores TERM is killed after the grace period
    let script = "(trap '' TERM; exec sleep 1000) & echo $! > child.pid; touch ready; wait";
    let mut inst = start_ready(dir.path(), &sh("family", script)).await;
    let grandchild = read_pid(&dir.path().join("child.pid"));
    assert!(is_alive(grandchild));
    inst.stop(Duration::from_millis(300)).await;
    assert!(
        eventually(|| !is_alive(grandchild)).await,
        "grandchild {grandchild} survived stop"
    );

    // kill: immediate, whole group
    let dir = tempfile::tempdir().unwrap();
    let script = "sleep 1000 & echo $! > child.pid; touch ready; wait";
    let mut inst = start_ready(dir.path(), &sh("fenced", script)).await;
    let grandchild = read_pid(&dir.path().join("child.pid"));
    inst.kill();
    assert_eq!(inst.wait().await.signal, Some(9));
    assert!(
        eventually(|| !is_alive(grandchild)).await,
        "grandchild {grandchild} survived kill"
    );

    // natural exit of the main process: what is left of the group is killed
    let dir = tempfile::tempdir().unwrap();
    let script = "sleep 1000 & echo $! > child.pid; touch ready; exit 0";
    let mut inst = start_ready(dir.path(), &sh("orphaning", script)).await;
    let grandchild = read_pid(&dir.path().join("child.pid"));
    assert!(inst.wait().await.success());
    assert!(
        eventually(|| !is_alive(grandchild)).await,
        "grandchild {grandchild} outlived its appliance"
    );

    // a grandchild that left the group (setsid) dies with the appliance
    let dir = tempfile::tempdir().unwrap();
    let script = "setsid sleep 1000 & echo $! > child.pid; touch ready; exit 0";
    let mut inst = start_ready(dir.path(), &sh("escaping", script)).await;
    let escaped = read_pid(&dir.path().join("child.pid"));
    assert!(eventually(|| own_session(escaped)).await, "setsid ran");
    assert!(inst.wait().await.success());
    assert!(
        eventually(|| !is_alive(escaped)).await,
        "{escaped}, which left the group, outlived its appliance"
    );

    // drop: an untracked appliance is a second copy waiting to happen
    let dir = tempfile::tempdir().unwrap();
    let inst = start_ready(dir.path(), &sh("dropped", "touch ready; exec sleep 1000")).await;
    let pid = inst.pid() as i32;
    drop(inst);
    assert!(
        eventually(|| !is_alive(pid)).await,
        "dropping the Instance left {pid} running"
    );
}

/// Whether `pid` leads its own session (it called setsid).
fn own_session(pid: i32) -> bool {
    nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid))).is_ok_and(|s| s.as_raw() == pid)
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[tokio::test]
async fn pause_hooks_stop_every_writer() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let script = "(while :; do echo y >> b; done) & touch ready; while :; do echo x >> a; done";
    let mut inst = start_ready(dir.path(), &sh("writer", script)).await;
    assert!(eventually(|| size(&a) > 0 && size(&b) > 0).await);
    let hooks = inst.pause_hooks();
    let h = hooks.clone();
    tokio::task::spawn_blocking(move || h.pause())
        .await
        .unwrap()
        .unwrap();
    let before = (size(&a), size(&b));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((size(&a), size(&b)), before, "a paused writer wrote");
    hooks.resume();
    assert!(
        eventually(|| size(&a) > before.0 && size(&b) > before.1).await,
        "writers did not resume"
    );
    inst.stop(Duration::from_secs(5)).await;
    // After the exit the hooks have nothing to pause.
    tokio::task::spawn_blocking(move || hooks.pause())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn process_appliances_have_no_qemu_features() {
    let dir = tempfile::tempdir().unwrap();
    let mut inst = start(dir.path(), &sh("plain", "exec sleep 1000")).await;
    assert!(!inst.capture("x", &dir.path().join("copy")).await.unwrap());
    assert!(matches!(
        inst.qmp("query-status", serde_json::Value::Null).await,
        Err(DriverError::NotQemu(_))
    ));
    assert_eq!(inst.accel(), None);
    inst.kill();
    inst.wait().await;
}

#[tokio::test]
async fn launch_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let missing = spec("name = \"m\"\ndriver = \"process\"\ncommand = [\"/nonexistent/prog\"]\n");
    let l = |spec| LaunchSpec {
        rack: "r",
        spec,
        epoch: 1,
        volumes: Vec::new(),
        run_dir: dir.path().join("run"),
    };
    let e = launch(l(&missing)).await.unwrap_err();
    assert!(matches!(e, DriverError::MissingProgram { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/prog"), "{e}");
    let with_volume = spec(
        "name = \"v\"\ndriver = \"process\"\ncommand = [\"true\"]\n[[appliance.volume]]\nname = \"d\"\nsize = 4096\n",
    );
    let e = launch(l(&with_volume)).await.unwrap_err();
    assert!(
        e.to_string().contains("no image path for volume \"d\""),
        "{e}"
    );
}

#[tokio::test]
async fn leftovers_of_an_earlier_run_are_killed_only_if_ours() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    // Ours: the recorded leader still runs the recorded command.
    let mut inst = start(&run_dir, &sh("old", "exec sleep 1000")).await;
    let pid = inst.pid();
    assert_eq!(kill_leftover(&run_dir).unwrap(), Some(pid));
    assert_eq!(inst.wait().await.signal, Some(9));
    assert!(!run_dir.join(PID_FILE).exists());
    assert_eq!(kill_leftover(&run_dir).unwrap(), None);

    // Ours, leader gone: a member carrying FIELDRACK_RUN_DIR of this run dir.
    let mut inst = start_ready(
        &run_dir,
        &sh(
            "old",
            "sleep 1000 & echo $! > child.pid; touch ready; exec sleep 1000",
        ),
    )
    .await;
    let child = read_pid(&run_dir.join("child.pid"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(inst.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = inst.child.wait().await; // reap the leader without the driver's cleanup
    assert!(is_alive(child));
    let pid_file = run_dir.join(PID_FILE);
    std::fs::write(&pid_file, format!("{}\n", inst.pid())).unwrap();
    assert_eq!(kill_leftover(&run_dir).unwrap(), Some(inst.pid()));
    assert!(eventually(|| !is_alive(child)).await);
    inst.group.set_done();
    drop(inst);

    // A leftover that left the group (setsid), its group gone: found by
    // its environment. (The same run dir: the last run's files go first.)
    for f in ["ready", "child.pid"] {
        let _ = std::fs::remove_file(run_dir.join(f));
    }
    let mut inst = start_ready(
        &run_dir,
        &sh(
            "old",
            "setsid sleep 1000 & echo $! > child.pid; touch ready; exec sleep 1000",
        ),
    )
    .await;
    let escaped = read_pid(&run_dir.join("child.pid"));
    assert!(eventually(|| own_session(escaped)).await, "setsid ran");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(inst.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = inst.child.wait().await;
    assert!(is_alive(escaped));
    std::fs::write(&pid_file, format!("{}\n", inst.pid())).unwrap();
    assert_eq!(kill_leftover(&run_dir).unwrap(), None, "its group is gone");
    assert!(
        eventually(|| !is_alive(escaped)).await,
        "{escaped} survived"
    );
    inst.group.set_done();
    drop(inst);

    // Not ours: a recycled pid running something else is left alone.
    let mut other = std::process::Command::new("sleep")
        .arg("1000")
        .process_group(0)
        .spawn()
        .unwrap();
    std::fs::write(&pid_file, format!("{}\n", other.id())).unwrap();
    assert_eq!(kill_leftover(&run_dir).unwrap(), None);
    assert!(is_alive(other.id() as i32));
    other.kill().unwrap();
    other.wait().unwrap();
}

const HELPER_ENV: &str = "FIELDRACK_TEST_PDEATHSIG_DIR";

/// Run by `appliance_dies_with_its_agent` in a separate process: launch an
/// appliance through the real driver, say so, and wait to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process for appliance_dies_with_its_agent"]
async fn pdeathsig_helper() {
    let dir =
        PathBuf::from(std::env::var(HELPER_ENV).expect("run by appliance_dies_with_its_agent"));
    let spec = sh("orphan", "exec sleep 1000");
    let inst = start(&dir.join("run"), &spec).await;
    std::fs::write(dir.join("ready"), inst.pid().to_string()).unwrap();
    std::future::pending::<()>().await;
}

/// The agent is SIGKILLed: its appliance must not keep running (after a
/// failover that would be two copies).
#[tokio::test]
async fn appliance_dies_with_its_agent() {
    /// Kills the helper even when an assertion fails first.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "drivers::process::tests::pdeathsig_helper",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_ENV, dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut agent = Reap(agent);
    let ready = dir.path().join("ready");
    assert!(
        eventually(|| std::fs::read_to_string(&ready).is_ok_and(|s| !s.is_empty())).await,
        "the helper never launched its appliance"
    );
    let pid = read_pid(&ready);
    assert_eq!(read_pid(&dir.path().join("run").join(PID_FILE)), pid);
    assert!(is_alive(pid));
    agent.0.kill().unwrap(); // SIGKILL: no destructor, no stop()
    agent.0.wait().unwrap();
    assert!(
        eventually(|| !is_alive(pid)).await,
        "appliance {pid} outlived its agent"
    );
}
