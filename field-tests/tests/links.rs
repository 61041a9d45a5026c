//! Failure detection of real `fieldrack` agents over emulated field links
//! (`field_tests::linkem`): three racks, the links to rack `c` slow or
//! lossy, the others on the clean bridge.
//!
//! - `satellite` (600 ms round trip, 1 % loss) links to `c` for 60 s, and
//!   separately `lossy` (15 ms, 5 % loss): no rack is ever reported `dead`,
//!   at most 5 % of the peer states sampled are `suspect`;
//! - `radio-poor` (20 ms +- 10, 2 % bursty loss) links to `c`, then `c`
//!   killed: `dead` on both survivors within 10 s.
//!
//! About 2.5 minutes in all, one test at a time (`field_tests::serial()`):
//! `cargo test -p field-tests --test links -- --nocapture`. The 10-minute
//! watches of the link benchmark are ignored by default:
//! `cargo test -p field-tests --test links -- --ignored --nocapture`.
//!
//! Needs root (namespaces, TUN devices); skips with `SKIP:` otherwise.
//! `FIELDTESTS_KEEP=1` keeps the agents' logs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use field_tests::bench::profile;
use field_tests::linkem::skip_test as skip;
use field_tests::linkem::EmulatedLink;
use field_tests::{wait_until, Agent, Field, Fleet, PeerState, Status, POLL};

const RACKS: [&str; 3] = ["a", "b", "c"];

/// The rack behind the emulated links.
const REMOTE: &str = "c";

/// All racks see each other `alive` within this from start (over a
/// satellite hop the first exchanges take several round trips).
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// The quick watch of each slow-link profile.
const WATCH: Duration = Duration::from_secs(60);

/// The long watch (the link benchmark's figure).
const LONG_WATCH: Duration = Duration::from_secs(600);

/// Issue 12: at most this fraction of peer-state samples `suspect`.
const MAX_SUSPECT_FRACTION: f64 = 0.05;

/// Issue 12: a killed rack behind `radio-poor` is `dead` within this,
/// measured from the kill to the status poll that saw it (so polling is
/// included, no slack added).
const DEAD_WITHIN: Duration = Duration::from_secs(10);

/// How long the `radio-poor` links carry traffic before the kill, so the
/// racks have measured them.
const SETTLE: Duration = Duration::from_secs(10);

/// Status calls that may fail in a row while watching (a busy machine).
const STATUS_ERRORS_TOLERATED: u32 = 3;

/// Both links to [`REMOTE`] with `spec`.
fn links_to_remote<'f>(field: &'f Field, spec: &str) -> Result<Vec<EmulatedLink<'f>>> {
    field.emulated_links_to(REMOTE, &[(11, "a"), (12, "b")], &profile(spec)?)
}

fn statuses(fleet: &Fleet, field: &Field, racks: &[&str]) -> Result<Vec<Status>> {
    racks.iter().map(|r| fleet.status(field, r)).collect()
}

fn full_mesh(fleet: &Fleet, field: &Field) -> Result<bool> {
    for s in statuses(fleet, field, &RACKS)? {
        for other in RACKS.iter().filter(|o| **o != s.rack) {
            if s.state_of(other) != Some(PeerState::Alive) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// What a watch saw.
#[derive(Default)]
struct Watch {
    samples: usize,
    suspect: usize,
    /// (observer, subject) -> (samples, suspect samples).
    per_pair: BTreeMap<(String, String), (usize, usize)>,
    /// Last round trip each observer reported for each subject (ms).
    rtt_ms: BTreeMap<(String, String), f64>,
}

impl Watch {
    fn fraction(&self) -> f64 {
        if self.samples == 0 {
            return 0.0;
        }
        self.suspect as f64 / self.samples as f64
    }

    fn print(&self, label: &str) {
        println!(
            "[{label}] {} of {} peer-state samples suspect ({:.2} %), no dead",
            self.suspect,
            self.samples,
            self.fraction() * 100.0
        );
        for ((o, s), (n, k)) in &self.per_pair {
            let rtt = self
                .rtt_ms
                .get(&(o.clone(), s.clone()))
                .map_or_else(|| "-".to_string(), |r| format!("{r:.0} ms"));
            println!("[{label}]   {o} about {s}: {k}/{n} suspect, rtt {rtt}");
        }
    }
}

/// Samples every rack's view of every other for `duration`; fails at once
/// if any rack reports another `dead` (or forgets it).
fn watch(fleet: &Fleet, field: &Field, duration: Duration) -> Result<Watch> {
    let mut w = Watch::default();
    let start = Instant::now();
    let mut errors = 0;
    while start.elapsed() < duration {
        match statuses(fleet, field, &RACKS) {
            Ok(all) => {
                errors = 0;
                for s in all {
                    for other in RACKS.iter().filter(|o| **o != s.rack) {
                        let Some(peer) = s.peer(other) else {
                            bail!("rack {} no longer lists {other}: {}", s.rack, s.summary());
                        };
                        if peer.state == PeerState::Dead {
                            bail!(
                                "rack {} reports {other} dead after {:?}: {}",
                                s.rack,
                                start.elapsed(),
                                s.summary()
                            );
                        }
                        let key = (s.rack.clone(), other.to_string());
                        let pair = w.per_pair.entry(key.clone()).or_default();
                        pair.0 += 1;
                        w.samples += 1;
                        if peer.state != PeerState::Alive {
                            pair.1 += 1;
                            w.suspect += 1;
                        }
                        if let Some(r) = peer.rtt_ms {
                            w.rtt_ms.insert(key, r);
                        }
                    }
                }
            }
            Err(e) => {
                errors += 1;
                if errors > STATUS_ERRORS_TOLERATED {
                    return Err(e).context("status kept failing while watching");
                }
            }
        }
        std::thread::sleep(POLL);
    }
    Ok(w)
}

/// A fleet of three racks with the links to `c` on `spec`, formed.
struct Scene {
    agents: Vec<Agent>,
    fleet: Fleet,
}

fn start(field: &Field) -> Result<Scene> {
    let fleet = Fleet::provision(&RACKS)?;
    let agents = fleet.start_all(field)?;
    let took = wait_until(FORM_TIMEOUT, "a full mesh of alive racks", || {
        full_mesh(&fleet, field)
    })?;
    println!("full mesh formed {:.1} s after start", took.as_secs_f64());
    Ok(Scene { agents, fleet })
}

/// On failure, the agents' logs are worth more than the error alone.
fn report<T>(scene: &mut Scene, result: Result<T>) -> Result<T> {
    if let Err(e) = &result {
        eprintln!("FAILED: {e:#}");
        scene.fleet.dump_logs(60);
        scene.fleet.keep();
    }
    result
}

/// Watches a fleet whose links to `c` are on `spec` for `duration`.
fn slow_links_watch(spec: &str, duration: Duration) -> Result<Watch> {
    let field = Field::new(RACKS)?;
    let _links = links_to_remote(&field, spec)?;
    let mut scene = start(&field)?;
    let result = watch(&scene.fleet, &field, duration);
    let w = report(&mut scene, result)?;
    w.print(spec);
    ensure!(
        w.fraction() <= MAX_SUSPECT_FRACTION,
        "{spec}: {:.2} % of samples suspect (at most {:.0} %)",
        w.fraction() * 100.0,
        MAX_SUSPECT_FRACTION * 100.0
    );
    Ok(w)
}

/// Kills `c` behind `radio-poor` links; returns when each survivor first
/// reported it dead, from the kill.
fn kill_behind_radio_poor(field: &Field, scene: &mut Scene) -> Result<BTreeMap<String, Duration>> {
    let w = watch(&scene.fleet, field, SETTLE)?;
    w.print("radio-poor, before the kill");
    let agent = scene
        .agents
        .iter_mut()
        .find(|a| a.rack() == REMOTE)
        .context("the remote rack's agent")?;
    agent.kill()?;
    let killed = Instant::now();
    let mut dead_after: BTreeMap<String, Duration> = BTreeMap::new();
    let waited = wait_until(DEAD_WITHIN * 2, "a and b report c dead", || {
        for rack in ["a", "b"] {
            let s = scene.fleet.status(field, rack)?;
            let other = if rack == "a" { "b" } else { "a" };
            if s.state_of(other) != Some(PeerState::Alive) {
                bail!("{rack} reports {other} {:?}", s.state_of(other));
            }
            if !dead_after.contains_key(rack) && s.state_of(REMOTE) == Some(PeerState::Dead) {
                dead_after.insert(rack.to_string(), killed.elapsed());
            }
        }
        Ok(dead_after.len() == 2)
    });
    for (rack, t) in &dead_after {
        println!(
            "killed c dead on {rack} {:.2} s after the kill (radio-poor)",
            t.as_secs_f64()
        );
    }
    waited?;
    Ok(dead_after)
}

#[test]
fn a_rack_behind_satellite_links_stays_alive() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let _serial = field_tests::serial();
    slow_links_watch("satellite", WATCH).map(|_| ())
}

/// A fresh fleet: racks that had just measured a satellite round trip to
/// `c` would keep long timeouts for it for a while (the RTT variance decays
/// by a quarter per sample), which is right for them but not this figure.
#[test]
fn a_rack_killed_behind_radio_poor_links_is_dead_within_10s() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let _serial = field_tests::serial();
    let field = Field::new(RACKS)?;
    let _links = links_to_remote(&field, "radio-poor")?;
    let mut scene = start(&field)?;
    let result = kill_behind_radio_poor(&field, &mut scene);
    let dead_after = report(&mut scene, result)?;
    for (rack, t) in &dead_after {
        ensure!(
            *t <= DEAD_WITHIN,
            "c dead on {rack} only {:.2} s after the kill (at most {DEAD_WITHIN:?})",
            t.as_secs_f64()
        );
    }
    Ok(())
}

#[test]
fn a_rack_behind_lossy_links_stays_alive() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let _serial = field_tests::serial();
    slow_links_watch("lossy", WATCH).map(|_| ())
}

#[test]
#[ignore = "10 minutes per profile: cargo test -p field-tests --test links -- --ignored --nocapture"]
fn ten_minutes_behind_satellite_and_lossy_links() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let _serial = field_tests::serial();
    for spec in ["satellite", "lossy"] {
        slow_links_watch(spec, LONG_WATCH)?;
    }
    Ok(())
}
