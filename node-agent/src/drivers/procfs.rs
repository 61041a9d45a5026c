//! The few `/proc` reads the drivers need: process-group membership,
//! stop states, command lines and environments.

use std::path::Path;

/// `(state, pgrp)` from `/proc/<pid>/stat` (or a task's stat file).
fn parse_stat(text: &str) -> Option<(char, i32)> {
    // "pid (comm) S ppid pgrp ...": comm may hold spaces and parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

fn stat_of(path: &Path) -> Option<(char, i32)> {
    parse_stat(&std::fs::read_to_string(path).ok()?)
}

/// A state in which a process runs no code and never will again (zombie,
/// dead).
fn is_gone(state: char) -> bool {
    matches!(state, 'Z' | 'X' | 'x')
}

/// Every live (not zombie) process whose process group is `pgid`.
pub(crate) fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            matches!(stat_of(&Path::new("/proc").join(pid.to_string()).join("stat")),
                Some((state, pgrp)) if pgrp == pgid && !is_gone(state))
        })
        .collect()
}

/// Whether the process `pid` is alive (exists and is not a zombie).
#[cfg(test)]
pub(crate) fn is_alive(pid: i32) -> bool {
    matches!(stat_of(&Path::new("/proc").join(pid.to_string()).join("stat")), Some((s, _)) if !is_gone(s))
}

/// True when every thread of every live member of the group is stopped
/// (`T`). A group with no live member counts as stopped.
pub(crate) fn group_stopped(pgid: i32) -> bool {
    group_members(pgid).into_iter().all(|pid| {
        let tasks = Path::new("/proc").join(pid.to_string()).join("task");
        let Ok(dir) = std::fs::read_dir(&tasks) else {
            return true; // exited meanwhile
        };
        dir.filter_map(|e| e.ok())
            .all(|t| match stat_of(&t.path().join("stat")) {
                Some((state, _)) => state == 'T' || is_gone(state),
                None => true, // thread exited meanwhile
            })
    })
}

/// `/proc/<pid>/cmdline` (NUL-separated argv).
pub(crate) fn cmdline(pid: i32) -> Option<Vec<u8>> {
    std::fs::read(Path::new("/proc").join(pid.to_string()).join("cmdline")).ok()
}

/// Every live process whose environment holds exactly `entry` (`K=V`):
/// an appliance's processes, also those that left its process group.
pub(crate) fn with_env(entry: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| environ_has(*pid, entry))
        .filter(|pid| {
            matches!(stat_of(&Path::new("/proc").join(pid.to_string()).join("stat")),
                Some((state, _)) if !is_gone(state))
        })
        .collect()
}

/// Whether `/proc/<pid>/environ` holds exactly the entry `entry` (`K=V`).
pub(crate) fn environ_has(pid: i32, entry: &str) -> bool {
    std::fs::read(Path::new("/proc").join(pid.to_string()).join("environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|e| e == entry.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_awkward_names() {
        assert_eq!(parse_stat("42 (sh) S 1 42 42 0"), Some(('S', 42)));
        assert_eq!(parse_stat("42 (a b) c) T 1 7 42 0"), Some(('T', 7)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_in_its_group() {
        let me = std::process::id() as i32;
        let pgid = nix::unistd::getpgrp().as_raw();
        assert!(group_members(pgid).contains(&me));
        assert!(is_alive(me));
        assert!(!group_stopped(pgid));
        assert!(cmdline(me).is_some_and(|c| !c.is_empty()));
    }
}
