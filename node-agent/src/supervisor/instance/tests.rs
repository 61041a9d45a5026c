//! Instance tasks on real process groups that ignore SIGTERM: fenced at
//! their deadline, concurrently, whatever else happens. The safety
//! assertions (dead before the lease ends) are strict; waits are generous.

use std::time::{Duration, Instant};

use control::{Lease, LeaseConfig};
use deploy::appliance::parse_manifest;
use tokio::sync::watch;

use super::*;
use crate::drivers::{self, LaunchSpec};

/// A process appliance that ignores SIGTERM (as a database flushing or a
/// VM's guest shutdown would) and its children too.
const STUBBORN: &str = "trap '' TERM; while :; do sleep 0.05; done";

async fn launch(dir: &std::path::Path, name: &str, stop_grace_ms: u64) -> Instance {
    let spec = parse_manifest(&format!(
        "[[appliance]]\nname = \"{name}\"\ndriver = \"process\"\ncommand = [\"sh\", \"-c\", \"{STUBBORN}\"]\nstop_grace_ms = {stop_grace_ms}\n"
    ))
    .unwrap()
    .remove(0);
    drivers::launch(LaunchSpec {
        rack: "a",
        spec: &spec,
        epoch: 1,
        volumes: vec![],
        run_dir: dir.join(name),
    })
    .await
    .unwrap()
}

/// A lease granted so that its fence time is `fence_in` from now.
fn lease_fencing_in(cfg: &LeaseConfig, app: &[String], fence_in: Duration) -> Lease {
    let sent = Instant::now() + fence_in + cfg.fence_before - cfg.lease;
    let mut l = Lease::default();
    l.granted(sent, app.iter().map(|a| (a.clone(), 1)).collect());
    l
}

fn guard(
    app: &str,
    cfg: LeaseConfig,
    stop_grace_ms: u64,
    lease: watch::Receiver<Lease>,
    stop: watch::Receiver<Option<StopRequest>>,
) -> Guard {
    Guard {
        app: app.into(),
        epoch: 1,
        cfg,
        stop_grace: Duration::from_millis(stop_grace_ms),
        lease,
        stop,
    }
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_stubborn_instances_are_all_dead_before_the_lease_ends() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LeaseConfig::default();
    let names: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
    let (lease_tx, lease_rx) =
        watch::channel(lease_fencing_in(&cfg, &names, Duration::from_millis(500)));
    let lease_end = lease_tx.borrow().expires(&cfg).unwrap();
    let mut tasks = Vec::new();
    // The renewal loop is starved: no grant arrives, nobody touches the
    // lease; every stop request channel stays silent.
    let mut stop_txs = Vec::new();
    for name in &names {
        let inst = launch(dir.path(), name, 3000).await;
        let pid = inst.pid();
        let (stop_tx, stop_rx) = watch::channel(None);
        stop_txs.push(stop_tx);
        let g = guard(name, cfg, 3000, lease_rx.clone(), stop_rx);
        tasks.push((pid, tokio::spawn(supervise(inst, g))));
    }
    let started = Instant::now();
    for (pid, t) in tasks {
        let ended = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("fenced within 30 s")
            .unwrap();
        let dead_at = Instant::now();
        assert_eq!(ended.stopped, Some(StopWhy::Fence));
        assert_eq!(ended.exit.signal, Some(9), "{ended:?}");
        assert!(!alive(pid));
        let left = ended.lease_left_ms.unwrap();
        println!("pid {pid}: dead {left} ms before the lease ended");
        assert!(left > 0, "pid {pid} outlived the lease by {} ms", -left);
        assert!(dead_at < lease_end, "collected after the lease ended");
    }
    println!(
        "eight fenced in {:.2} s (fence grace {:?}, lease end {:.2} s after start)",
        started.elapsed().as_secs_f64(),
        cfg.fence_grace,
        lease_end.saturating_duration_since(started).as_secs_f64()
    );
    drop(lease_tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polite_stop_that_would_outlive_the_lease_becomes_a_fence() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LeaseConfig::default();
    let names = vec!["slow".to_owned()];
    let (lease_tx, lease_rx) =
        watch::channel(lease_fencing_in(&cfg, &names, Duration::from_millis(300)));
    let lease_end = lease_tx.borrow().expires(&cfg).unwrap();
    // The renewal loop is gone altogether.
    drop(lease_tx);
    let inst = launch(dir.path(), "slow", 60_000).await;
    let (stop_tx, stop_rx) = watch::channel(None);
    let task = tokio::spawn(supervise(
        inst,
        guard("slow", cfg, 60_000, lease_rx, stop_rx),
    ));
    // A reassignment asks for a polite stop with a minute of grace.
    stop_tx
        .send(Some(StopRequest {
            grace: Duration::from_secs(60),
            why: StopWhy::Unassigned,
        }))
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("ended within 30 s")
        .unwrap();
    assert_eq!(ended.stopped, Some(StopWhy::Fence), "{ended:?}");
    assert!(ended.lease_left_ms.unwrap() > 0, "{ended:?}");
    assert!(Instant::now() < lease_end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_without_it_fences_at_once_and_an_exit_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LeaseConfig::default();
    let names = vec!["x".to_owned()];
    let (lease_tx, lease_rx) =
        watch::channel(lease_fencing_in(&cfg, &names, Duration::from_secs(4)));
    let inst = launch(dir.path(), "x", 200).await;
    let (_stop_tx, stop_rx) = watch::channel(None);
    let task = tokio::spawn(supervise(inst, guard("x", cfg, 200, lease_rx, stop_rx)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    lease_tx.send_modify(|l| l.granted(Instant::now(), vec![]));
    let ended = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("ended")
        .unwrap();
    assert_eq!(ended.stopped, Some(StopWhy::Fence));
    // Its own stop grace (200 ms) is shorter than the fence grace.
    println!("fenced {:?} after the grant dropped it", t.elapsed());

    // An instance that exits by itself is reported as such.
    let spec = parse_manifest(
        "[[appliance]]\nname = \"brief\"\ndriver = \"process\"\ncommand = [\"sh\", \"-c\", \"exit 3\"]\n",
    )
    .unwrap()
    .remove(0);
    let inst = drivers::launch(LaunchSpec {
        rack: "a",
        spec: &spec,
        epoch: 1,
        volumes: vec![],
        run_dir: dir.path().join("brief"),
    })
    .await
    .unwrap();
    let (lease_tx, lease_rx) = watch::channel(lease_fencing_in(
        &cfg,
        &["brief".to_owned()],
        Duration::from_secs(4),
    ));
    let (_stop_tx, stop_rx) = watch::channel(None);
    let ended = supervise(inst, guard("brief", cfg, 3000, lease_rx, stop_rx)).await;
    assert_eq!(ended.stopped, None);
    assert_eq!(ended.exit.code, Some(3));
    drop(lease_tx);
}
