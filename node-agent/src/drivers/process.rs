//! The process driver: `command` in its own process group.
//!
//! The environment is *not* inherited from the agent (it may hold tokens):
//! the appliance sees `PATH` (the agent's, or a default), the spec's `env`
//! (which may override `PATH`), and `FIELDRACK_RACK`, `FIELDRACK_APPLIANCE`,
//! `FIELDRACK_EPOCH`, `FIELDRACK_RUN_DIR` and one `FIELDRACK_VOLUME_<NAME>`
//! per volume holding the raw image path. The working directory is the run
//! directory.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datastore::PauseHooks;
use deploy::appliance::volume_env_name;
use nix::sys::signal::Signal;

use super::{
    procfs, spawn_appliance, DriverError, Group, Instance, LaunchSpec, DEFAULT_PATH, RUN_DIR_ENV,
};

/// How long a pause may take to see every thread of the group stopped
/// (a process in uninterruptible disk I/O stops when the I/O completes).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for the group to stop.
const PAUSE_POLL: Duration = Duration::from_millis(2);

/// Launch a process appliance (use [`super::launch`]).
///
/// # Errors
/// See [`DriverError`].
pub async fn launch(l: LaunchSpec<'_>) -> Result<Instance, DriverError> {
    let spec = l.spec;
    if spec.command.is_empty() {
        return Err(DriverError::Invalid {
            appliance: spec.name.clone(),
            reason: "the process driver needs a command".into(),
        });
    }
    check_volumes(&l)?;
    let env = environment(&l);
    let s = spawn_appliance(&l, &spec.command, &env).await?;
    tracing::info!(appliance = %spec.name, pid = s.pid, epoch = l.epoch, log = %s.log_path.display(), "process appliance started");
    Ok(Instance::spawned(&spec.name, s))
}

/// Every volume of the spec has exactly one path, and nothing else does.
pub(crate) fn check_volumes(l: &LaunchSpec<'_>) -> Result<(), DriverError> {
    let invalid = |reason: String| DriverError::Invalid {
        appliance: l.spec.name.clone(),
        reason,
    };
    for v in &l.spec.volume {
        match l.volumes.iter().filter(|(n, _)| *n == v.name).count() {
            1 => {}
            0 => return Err(invalid(format!("no image path for volume {:?}", v.name))),
            _ => return Err(invalid(format!("volume {:?} given twice", v.name))),
        }
    }
    if let Some((n, _)) = l
        .volumes
        .iter()
        .find(|(n, _)| !l.spec.volume.iter().any(|v| v.name == *n))
    {
        return Err(invalid(format!("volume {n:?} is not in the spec")));
    }
    Ok(())
}

/// The appliance's whole environment.
fn environment(l: &LaunchSpec<'_>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![(
        "PATH".into(),
        std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into()),
    )];
    for (k, v) in &l.spec.env {
        env.retain(|(e, _)| e != k);
        env.push((k.clone(), v.clone()));
    }
    let run_dir = std::path::absolute(&l.run_dir).unwrap_or_else(|_| l.run_dir.clone());
    env.push(("FIELDRACK_RACK".into(), l.rack.into()));
    env.push(("FIELDRACK_APPLIANCE".into(), l.spec.name.clone()));
    env.push(("FIELDRACK_EPOCH".into(), l.epoch.to_string()));
    env.push((RUN_DIR_ENV.into(), run_dir.display().to_string()));
    for (name, path) in &l.volumes {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        env.push((volume_env_name(name), path.display().to_string()));
    }
    env
}

/// Freezes a process group with SIGSTOP (see [`Instance::pause_hooks`]).
pub(crate) struct GroupPause {
    group: Arc<Group>,
}

impl GroupPause {
    pub(crate) fn new(group: Arc<Group>) -> Self {
        Self { group }
    }
}

impl PauseHooks for GroupPause {
    fn pause(&self) -> io::Result<()> {
        if !self.group.signal(Signal::SIGSTOP) {
            return Ok(()); // exited: nothing writes any more
        }
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        // Two consecutive scans with everything stopped: a member forked
        // during the first scan is caught by the second.
        let mut stopped_scans = 0;
        while stopped_scans < 2 {
            if procfs::group_stopped(self.group.pgid()) {
                stopped_scans += 1;
                continue;
            }
            stopped_scans = 0;
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "process group {} not stopped after {PAUSE_TIMEOUT:?}",
                        self.group.pgid()
                    ),
                ));
            }
            std::thread::sleep(PAUSE_POLL);
        }
        Ok(())
    }

    fn resume(&self) {
        self.group.signal(Signal::SIGCONT);
    }
}

#[cfg(test)]
mod tests;
