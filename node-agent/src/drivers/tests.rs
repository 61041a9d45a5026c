//! Shared helpers for the driver tests, and tests of the shared parts.

use std::path::Path;
use std::time::Duration;

use deploy::appliance::{parse_manifest, ApplianceSpec};

use super::*;

/// A valid spec from a manifest body (without the `[[appliance]]` line).
pub(crate) fn spec(body: &str) -> ApplianceSpec {
    parse_manifest(&format!("[[appliance]]\n{body}"))
        .unwrap()
        .remove(0)
}

/// A TOML array of strings.
pub(crate) fn toml_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Poll `f` every 20 ms for up to 20 s (a generous bound, not a timing
/// assertion); true once it holds.
pub(crate) async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

pub(crate) fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn log_rotates_once_at_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.log");
    let mut log = LogWriter::open(&path, 100).await.unwrap();
    log.write(&[b'1'; 60]).await.unwrap();
    log.write(&[b'2'; 60]).await.unwrap();
    log.write(&[b'3'; 30]).await.unwrap();
    log.file.flush().await.unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("a.log.1")).unwrap(),
        [b'1'; 60]
    );
    let mut rest = vec![b'2'; 60];
    rest.extend([b'3'; 30]);
    assert_eq!(std::fs::read(&path).unwrap(), rest);
    log.write(&[b'4'; 20]).await.unwrap();
    log.file.flush().await.unwrap();
    // one rotation only: the oldest generation is replaced
    assert_eq!(std::fs::read(dir.path().join("a.log.1")).unwrap(), rest);
    assert_eq!(std::fs::read(&path).unwrap(), [b'4'; 20]);
    // reopening continues counting from the file's size
    let log = LogWriter::open(&path, 100).await.unwrap();
    assert_eq!(log.size, 20);
}

#[test]
fn exit_info() {
    let ok = ExitInfo {
        code: Some(0),
        signal: None,
    };
    assert!(ok.success());
    let killed = ExitInfo {
        code: None,
        signal: Some(9),
    };
    assert!(!killed.success());
    assert_eq!(killed.to_string(), "killed by SIGKILL");
    assert_eq!(
        ExitInfo {
            code: Some(3),
            signal: None
        }
        .to_string(),
        "exit status 3"
    );
}

#[test]
fn programs_are_found_like_execvp() {
    assert!(find_in_path("sh", DEFAULT_PATH).is_some());
    assert!(find_in_path("/bin/sh", "").is_some());
    assert!(find_in_path("no-such-program-here", DEFAULT_PATH).is_none());
    assert!(find_in_path("sh", "").is_none());
}
