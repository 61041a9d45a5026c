//! Tests of the harness itself (namespaces, faults, cleanup); no agent needed.
//!
//! Tests take `field_tests::serial()`, so they run one at a time even under
//! the default parallel test runner: the leak checks count this process's
//! namespaces, which a concurrent test would disturb.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use field_tests::{netns, owner_lock, Field};

/// Skips (returns `Ok`) when namespaces cannot be created here.
macro_rules! require_netns {
    () => {
        if let Err(why) = field_tests::available() {
            println!("SKIP: {why}");
            return Ok(());
        }
    };
}

fn no_leftovers() -> Result<()> {
    let left = netns::own_namespaces()?;
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

#[test]
fn healthy_field_has_unicast_and_multicast_everywhere() -> Result<()> {
    require_netns!();
    let _serial = field_tests::serial();
    {
        let field = Field::new(["a", "b", "c"])?;
        let racks: Vec<&str> = field.racks().collect();
        for from in &racks {
            for to in racks.iter().filter(|to| *to != from) {
                ensure!(field.ping(from, to)?, "ping {from} -> {to}");
                ensure!(field.udp_reaches(from, to)?, "udp {from} -> {to}");
                ensure!(
                    field.multicast_reaches(from, to)?,
                    "multicast {from} -> {to}"
                );
            }
        }
        // Each rack's loopback works (agents' APIs listen there).
        let out = field.exec("b", &["ping", "-c1", "-W1", "127.0.0.1"])?;
        ensure!(out.status.success(), "loopback ping in rack b");
    }
    no_leftovers()
}

#[test]
fn cut_blocks_both_ways_and_heal_restores() -> Result<()> {
    require_netns!();
    let _serial = field_tests::serial();
    {
        let field = Field::new(["a", "b", "c"])?;
        field.cut("a", "b")?;
        ensure!(!field.udp_reaches("a", "b")?, "a -> b passed the cut");
        ensure!(!field.udp_reaches("b", "a")?, "b -> a passed the cut");
        ensure!(!field.multicast_reaches("a", "b")?, "multicast a -> b");
        ensure!(field.udp_reaches("a", "c")?, "a -> c is not cut");
        ensure!(field.udp_reaches("c", "b")?, "c -> b is not cut");
        ensure!(field.multicast_reaches("c", "a")?, "multicast c -> a");
        field.heal("a", "b")?;
        ensure!(
            field.faults().is_empty(),
            "faults left: {:?}",
            field.faults()
        );
        ensure!(field.udp_reaches("a", "b")?, "a -> b after heal");
        ensure!(field.udp_reaches("b", "a")?, "b -> a after heal");
    }
    no_leftovers()
}

#[test]
fn cut_oneway_blocks_only_that_direction() -> Result<()> {
    require_netns!();
    let _serial = field_tests::serial();
    {
        let field = Field::new(["a", "b"])?;
        field.cut_oneway("a", "b")?;
        ensure!(!field.udp_reaches("a", "b")?, "a -> b passed the cut");
        ensure!(field.udp_reaches("b", "a")?, "b -> a should still work");
        // Ping needs both directions, so it fails either way.
        ensure!(
            !field.ping("b", "a")?,
            "ping b -> a got a reply through a cut"
        );
        field.heal_all()?;
        ensure!(field.ping("a", "b")?, "ping a -> b after heal");
    }
    no_leftovers()
}

#[test]
fn isolate_blocks_everything_but_loopback() -> Result<()> {
    require_netns!();
    let _serial = field_tests::serial();
    {
        let field = Field::new(["a", "b", "c"])?;
        field.isolate("c")?;
        for other in ["a", "b"] {
            ensure!(!field.udp_reaches(other, "c")?, "{other} -> c reached");
            ensure!(!field.udp_reaches("c", other)?, "c -> {other} reached");
            ensure!(!field.multicast_reaches("c", other)?, "mcast c -> {other}");
        }
        ensure!(field.udp_reaches("a", "b")?, "a -> b is not isolated");
        let out = field.exec("c", &["ping", "-c1", "-W1", "127.0.0.1"])?;
        ensure!(out.status.success(), "loopback in the isolated rack");
        field.heal_all()?;
        ensure!(field.udp_reaches("a", "c")?, "a -> c after heal");
        ensure!(field.udp_reaches("c", "b")?, "c -> b after heal");
    }
    no_leftovers()
}

#[test]
fn drop_kills_processes_and_removes_namespaces_even_on_panic() -> Result<()> {
    require_netns!();
    let _serial = field_tests::serial();
    let mut pids = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let field = Field::new(["a", "b"]).expect("field");
        let child = field.spawn("a", &["sleep", "60"]).expect("spawn");
        pids.push(child.id());
        // The child handle is leaked on purpose: Drop must still kill it.
        std::mem::forget(child);
        panic!("deliberate panic with a field alive");
    }));
    ensure!(result.is_err(), "the closure should have panicked");
    no_leftovers()?;
    for pid in pids {
        // A killed, unreaped child is a zombie: state Z, or gone.
        std::thread::sleep(Duration::from_millis(100));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().unwrap_or("").trim().chars().next();
        ensure!(
            matches!(state, None | Some('Z')),
            "process {pid} still running after Drop: {stat}"
        );
    }
    Ok(())
}

#[test]
fn sweep_removes_namespaces_of_dead_runs() -> Result<()> {
    require_netns!();
    let _serial = field_tests::serial();
    // A pid that does not exist now stands for a killed earlier run.
    let dead = (100_000..4_000_000u32)
        .rev()
        .find(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .expect("some free pid");
    let stale = format!("{}{dead}-0-r0", netns::NS_PREFIX);
    let st = Command::new("ip").args(["netns", "add", &stale]).status()?;
    ensure!(st.success(), "creating {stale}");
    let removed = netns::sweep_stale()?;
    let still_there = netns::list_namespaces()?.contains(&stale);
    if still_there {
        let _ = Command::new("ip").args(["netns", "del", &stale]).status();
    }
    ensure!(removed.contains(&stale), "sweep removed {removed:?}");
    ensure!(!still_there, "{stale} still exists after sweep");
    Ok(())
}

#[test]
fn sweep_keeps_namespaces_of_live_runs_whatever_the_clocks() -> Result<()> {
    require_netns!();
    let _serial = field_tests::serial();
    // Another harness process: it holds the lock named after its pid
    // (as `owner_lock::hold_own` does) and has a namespace.
    let lock_dir = owner_lock::lock_path(0);
    let lock_dir = lock_dir.parent().expect("lock dir");
    std::fs::create_dir_all(lock_dir)?;
    let mut other = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec 9>{}/$$.lock && flock -x 9 && echo locked && exec sleep 60",
            lock_dir.display()
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(other.stdout.take().expect("stdout")),
        &mut line,
    )?;
    ensure!(
        line.trim() == "locked",
        "the other run did not lock: {line:?}"
    );
    let ns = format!("{}{}-0-r0", netns::NS_PREFIX, other.id());
    let st = Command::new("ip").args(["netns", "add", &ns]).status()?;
    ensure!(st.success(), "creating {ns}");
    // The namespace is younger than its process here; with a wall clock
    // that steps, it may look older: the sweep looks at the lock only.
    let kept = !netns::sweep_stale()?.contains(&ns);
    let _ = other.kill();
    let _ = other.wait();
    let removed_after_exit = netns::sweep_stale()?.contains(&ns);
    if netns::list_namespaces()?.contains(&ns) {
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
    ensure!(kept, "the sweep removed {ns} while its run was alive");
    ensure!(
        removed_after_exit,
        "the sweep kept {ns} after its run exited"
    );
    Ok(())
}
