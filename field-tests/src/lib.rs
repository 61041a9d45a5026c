//! Field tests: real `fieldrack` agents in Linux network namespaces, with
//! network faults, driven only through the binary's CLI.
//!
//! Layout:
//! - [`netns`]: [`Field`], one namespace per rack on a virtual switch, with
//!   faults (`cut`, `cut_oneway`, `isolate`, `heal_all`) and probes;
//! - [`owner_lock`]: which harness process's namespaces are still in use
//!   (a lock each process holds), for the sweep of stale ones;
//! - [`control_watch`]: leader changes, terms, lease renewal gaps and
//!   appliance moves, sampled from the racks' status;
//! - [`history`]: the history checker: from the recorders' shared witness
//!   log, every interval in which two copies of one appliance wrote;
//! - [`linkem`]: a link emulator between two racks of a field (delay,
//!   jitter, loss, rate, queue, fades) with named profiles;
//! - [`drill`]: repeated faults on a live 3-rack field, with timings
//!   (`kill-rack`), on the bridge or over emulated links;
//! - [`bench`]: the link benchmarks of `linkbench` (failure detection,
//!   failover, replication goodput over emulated links), with their
//!   targets;
//! - [`agent`]: finding the binary, provisioning a [`Fleet`], running
//!   [`Agent`]s inside a field, reading their [`Status`];
//! - this file: [`available`], [`serial`], and the polling helpers
//!   [`wait_until`] and [`hold_for`].
//!
//! Needs root, iproute2 and nftables. Tests call [`available`] first and
//! skip (printing `SKIP: <reason>`) only when namespaces cannot be created.
//!
//! Errors are `anyhow`: this crate is test code, consumed by tests and the
//! `field-tests` CLI only.

pub mod agent;
pub mod appliance;
pub mod bench;
pub mod control_watch;
pub mod drill;
pub mod history;
pub mod linkem;
pub mod netns;
pub mod owner_lock;
pub mod proxy_client;

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

pub use agent::{fieldrack_bin, Agent, Fleet, PeerState, PeerStatus, Status};
pub use netns::{available, Field, FieldBuilder};

/// How often [`wait_until`] and [`hold_for`] poll.
pub const POLL: Duration = Duration::from_millis(200);

/// Serialises field tests within one process: each runs several agents on
/// a 2-core machine and measures timings, so running them side by side
/// would make both slow and flaky. Hold the guard for the whole test. A
/// panic in another test does not poison it for the rest.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Polls `check` every [`POLL`] until it returns `Ok(true)`; returns how long
/// that took. `Err` from `check` counts as "not yet" (an agent still
/// starting, say); the last one is reported on timeout.
///
/// # Errors
/// If `timeout` passes first.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let last_err = match check() {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => None,
            Err(e) => Some(e),
        };
        if start.elapsed() >= timeout {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Polls `check` every [`POLL`] for `duration`, failing as soon as it
/// returns `Ok(false)`. `Err` from `check` is tolerated up to
/// `max_consecutive_errors` times in a row (a status call slowed down by a
/// busy machine), then fails too. Returns the number of polls made.
///
/// # Errors
/// On the first violation, or too many errors in a row.
pub fn hold_for(
    duration: Duration,
    what: &str,
    max_consecutive_errors: u32,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<u32> {
    let start = Instant::now();
    let mut polls = 0;
    let mut errors = 0;
    while start.elapsed() < duration {
        polls += 1;
        match check() {
            Ok(true) => errors = 0,
            Ok(false) => bail!("{what} stopped holding after {:?}", start.elapsed()),
            Err(e) => {
                errors += 1;
                if errors > max_consecutive_errors {
                    bail!(
                        "{what}: {errors} errors in a row after {:?}: {e:#}",
                        start.elapsed()
                    );
                }
            }
        }
        std::thread::sleep(POLL);
    }
    Ok(polls)
}
