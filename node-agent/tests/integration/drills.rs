//! `fieldrack drill` against real agents on loopback: the stop conditions.

use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Whether `rack` has a drill fault in force.
async fn faulted(fleet: &Fleet, rack: &str) -> bool {
    fleet
        .client(rack)
        .drill_faults()
        .await
        .is_ok_and(|f| !f.is_empty())
}

/// A drill isolating rack a for a minute, run from b, is stopped by
/// `fieldrack drill abort` from c: the faulted agent heals at once, the
/// running command ends with an `aborted` report naming why, and every
/// rack keeps that report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_abort_from_another_rack_heals_the_field_at_once() {
    let fleet = Fleet::init("a,b,c", &[]);
    let _agents = start_field(&fleet).await;
    let run = isolate_a_from_b(&fleet).await;
    let t_abort = Instant::now();
    let out = cli(&fleet, "c", &["drill", "abort"]);
    eprintln!("{out}");
    let id = aborted(run, t_abort, &fleet).await;
    for rack in ["a", "b", "c"] {
        kept_aborted(&fleet, rack, &id, "fieldrack drill abort").await;
    }
}

/// A rack the drill does not name dies during it (a real failure): the
/// drill stops at once, heals the faulted rack and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_failure_during_a_drill_stops_it() {
    let fleet = Fleet::init("a,b,c", &[]);
    let mut agents = start_field(&fleet).await;
    let run = isolate_a_from_b(&fleet).await;
    let t_kill = Instant::now();
    agents[2].sigkill();
    let id = aborted(run, t_kill, &fleet).await;
    for rack in ["a", "b"] {
        kept_aborted(&fleet, rack, &id, "a real failure").await;
    }
}

/// Three agents, a full mesh, and every rack seeing a leader and the
/// three voters (the drill's majority precondition).
async fn start_field(fleet: &Fleet) -> Vec<Agent> {
    let agents = vec![fleet.start("a"), fleet.start("b"), fleet.start("c")];
    wait_until(
        Duration::from_secs(30),
        "full mesh and three voters",
        || async {
            if !all_see(fleet, &["a", "b", "c"], "alive").await {
                return false;
            }
            for r in ["a", "b", "c"] {
                let ok = status(&fleet.client(r)).await.is_some_and(|s| {
                    s.control
                        .as_ref()
                        .is_some_and(|c| c.leader.is_some() && c.voters.len() == 3)
                });
                if !ok {
                    return false;
                }
            }
            true
        },
    )
    .await;
    agents
}

/// `fieldrack drill run isolate a --duration 60` from rack b, running
/// once rack a holds the fault.
async fn isolate_a_from_b(fleet: &Fleet) -> Child {
    let mut run = Command::new(BIN)
        .args(["drill", "run", "isolate", "a", "--duration", "60", "--html"])
        .arg(fleet.dir.path().join("drill.html"))
        .arg("--config")
        .arg(fleet.config("b"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !faulted(fleet, "a").await {
        if run.try_wait().unwrap().is_some() {
            let out = run.wait_with_output().unwrap();
            panic!(
                "the drill ended before rack a held its fault:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "rack a never held the drill's fault"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run
}

/// The drill's command ends well before its minute, not passed, having
/// healed rack a; returns the drill's id.
async fn aborted(run: Child, since: Instant, fleet: &Fleet) -> String {
    let out = tokio::task::spawn_blocking(move || run.wait_with_output().unwrap())
        .await
        .unwrap();
    let took = since.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        took < Duration::from_secs(30),
        "the drill ran on for {took:?}"
    );
    assert!(!out.status.success(), "an aborted drill does not pass");
    assert!(text.contains("ABORTED"), "{text}");
    assert!(!faulted(fleet, "a").await, "rack a still faulted");
    text.lines()
        .find_map(|l| l.strip_prefix("drill ")?.split(':').next())
        .expect("the drill printed its id")
        .to_owned()
}

/// `rack` keeps the drill's report, `aborted` for a reason naming `why`.
async fn kept_aborted(fleet: &Fleet, rack: &str, id: &str, why: &str) {
    let reports = fleet.client(rack).drill_reports().await.unwrap();
    let r = reports
        .iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("rack {rack} keeps no report {id}"));
    assert_eq!(r.outcome, "aborted");
    assert!(
        r.abort_reason.as_deref().is_some_and(|w| w.contains(why)),
        "{:?}",
        r.abort_reason
    );
}
