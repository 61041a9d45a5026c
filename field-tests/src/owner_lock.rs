//! Whether the harness process that created a namespace still runs.
//!
//! Every harness process holds an exclusive `flock` on
//! `/run/fieldrack-tests/<pid>.lock` from before it creates its first
//! namespace until it exits (the kernel drops the lock when the process
//! dies, however it dies). A namespace `fr-<pid>-...` is in use exactly
//! while that lock is held. No clock is involved: test lanes run side by
//! side, and a machine whose wall clock steps (a CI VM syncing its time)
//! must never make one lane delete another's live namespaces.
//!
//! A pid reused by an unrelated process holds no lock, so its namespaces
//! are stale. A pid reused by a new harness process is handled by that
//! process: its first sweep, before it creates anything, removes the
//! namespaces named after its own pid (`netns::sweep_once`).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::PathBuf;
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Where the liveness locks live (`/run` is a tmpfs: cleared at boot, like
/// the namespaces themselves).
const LOCK_DIR: &str = "/run/fieldrack-tests";

/// What the sweep may do with a namespace of harness process `pid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Its creator still runs: leave it alone.
    InUse,
    /// Its creator is gone: delete it.
    Stale,
}

impl Liveness {
    /// The liveness of the namespaces of harness process `pid`. This
    /// process's own are in use (it holds its lock, or its pid exists).
    pub fn of(pid: u32) -> Liveness {
        let path = lock_path(pid);
        match File::open(&path) {
            Ok(file) => match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(_held) => {
                    // Nobody holds it: its process is gone. Remove the file
                    // while holding the lock (a new process with this pid
                    // creates a fresh one).
                    let _ = std::fs::remove_file(&path);
                    Liveness::Stale
                }
                Err((_, Errno::EWOULDBLOCK)) => Liveness::InUse,
                // Cannot tell: never break a running harness.
                Err(_) => Liveness::InUse,
            },
            // No lock file: a harness from before the locks, or one whose
            // file a sweep removed just as it opened it. Only a pid that no
            // longer exists is surely stale.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    Liveness::InUse
                } else {
                    Liveness::Stale
                }
            }
            Err(_) => Liveness::InUse,
        }
    }
}

/// Takes this process's liveness lock, once; it is held until the process
/// exits. Must run before the process creates its first namespace.
pub fn hold_own() -> io::Result<()> {
    static OWN: OnceLock<Result<Flock<File>, String>> = OnceLock::new();
    OWN.get_or_init(|| {
        let take = || -> io::Result<Flock<File>> {
            std::fs::create_dir_all(LOCK_DIR)?;
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(lock_path(std::process::id()))?;
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))
        };
        take().map_err(|e| format!("taking {}: {e}", lock_path(std::process::id()).display()))
    })
    .as_ref()
    .map(|_| ())
    .map_err(|e| io::Error::other(e.clone()))
}

/// Removes the lock files of processes that are gone (one per harness
/// process that ever ran; tiny, but they add up over a machine's life).
pub fn remove_stale_locks() {
    let Ok(entries) = std::fs::read_dir(LOCK_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_suffix(".lock")?.parse::<u32>().ok());
        if let Some(pid) = pid {
            // Removes the file when nobody holds it.
            let _ = Liveness::of(pid);
        }
    }
}

/// The lock file of harness process `pid`.
pub fn lock_path(pid: u32) -> PathBuf {
    PathBuf::from(format!("{LOCK_DIR}/{pid}.lock"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn as_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_held_lock_means_in_use_and_a_dead_holder_means_stale() {
        if !as_root() {
            eprintln!("SKIP: not root (locks live in {LOCK_DIR})");
            return;
        }
        hold_own().unwrap();
        // A child that locks a file named after its pid, as a harness
        // process does, and keeps it (same pid, same descriptor) in sleep.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec 9>{LOCK_DIR}/$$.lock && flock -x 9 && echo locked && exec sleep 30"
            ))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "locked");
        assert_eq!(Liveness::of(pid), Liveness::InUse);
        assert_eq!(
            Liveness::of(pid),
            Liveness::InUse,
            "looking does not take it"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(Liveness::of(pid), Liveness::Stale);
        assert!(!lock_path(pid).exists(), "a stale lock file is removed");
        assert_eq!(Liveness::of(std::process::id()), Liveness::InUse);
    }
}
