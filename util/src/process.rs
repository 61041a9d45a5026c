//! A guard that kills a child's whole process group if the code that
//! started it gives up on it (an error, a timeout, a cancelled future).
//!
//! The child must have been started as a group leader
//! (`Command::process_group(0)`), so its pid is the group id and the kill
//! reaches its grandchildren too.

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// SIGKILLs a process group when dropped, unless disarmed.
///
/// Disarm it once the child has been reaped: from then on its pid, which
/// is the group id, may be reused by an unrelated process.
#[derive(Debug)]
#[must_use = "dropping the guard kills the group at once"]
pub struct GroupKillGuard(Option<Pid>);

impl GroupKillGuard {
    /// Guard the group led by `pid` (`None`, e.g. a child already reaped,
    /// guards nothing).
    pub fn new(pid: Option<u32>) -> Self {
        Self(
            pid.and_then(|p| i32::try_from(p).ok())
                .filter(|p| *p > 1)
                .map(Pid::from_raw),
        )
    }

    /// Leave the group alone when dropped.
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKillGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    fn sleeper() -> std::process::Child {
        Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("spawn sleep")
    }

    #[test]
    fn dropping_kills_the_group() {
        let mut child = sleeper();
        drop(GroupKillGuard::new(Some(child.id())));
        let status = child.wait().unwrap();
        assert!(!status.success(), "killed, not finished: {status:?}");
    }

    #[test]
    fn a_disarmed_guard_leaves_the_group() {
        let mut child = sleeper();
        let mut guard = GroupKillGuard::new(Some(child.id()));
        guard.disarm();
        drop(guard);
        assert!(child.try_wait().unwrap().is_none(), "still running");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
