//! Progress of long operations (volume import/export, tiles), on stderr:
//! rewritten in place on a terminal, one line per update otherwise (logs
//! and tests read those).

use std::io::{IsTerminal, Write};

use node_agent::client::JobEvent;
use node_agent::status::human_bytes;

/// `what: 42% (amount)`, `amount` rendering "done of total".
#[must_use]
pub fn line(what: &str, done: u64, total: u64, amount: fn(u64, u64) -> String) -> String {
    let pct = (done * 100).checked_div(total).unwrap_or(100);
    format!("{what}: {pct}% ({})", amount(done, total))
}

/// Bytes: `1.2G of 4.0G`.
#[must_use]
pub fn bytes(done: u64, total: u64) -> String {
    format!("{} of {}", human_bytes(done), human_bytes(total))
}

/// Tiles: `420 of 1000 tiles`.
#[must_use]
pub fn tiles(done: u64, total: u64) -> String {
    format!("{done} of {total} tiles")
}

/// The estimate line a tile job announces first.
#[must_use]
pub fn estimate(tiles: u64) -> String {
    format!("estimate: {{\"tiles\":{tiles}}}")
}

/// Prints a job's events on stderr.
pub fn printer(what: &'static str, amount: fn(u64, u64) -> String) -> impl FnMut(JobEvent) {
    let tty = std::io::stderr().is_terminal();
    move |event| match event {
        JobEvent::Estimate { tiles } => eprintln!("{}", estimate(tiles)),
        JobEvent::Progress { done, total } => {
            let line = line(what, done, total, amount);
            if tty {
                eprint!("\r{line}   ");
                let _ = std::io::stderr().flush();
            } else {
                eprintln!("{line}");
            }
        }
    }
}

/// Prints progress of a multi-step local operation (`fleet bundle`,
/// `install`): `step: 42% (1.2G of 4.0G)`, at most once per percent per
/// step so a log of a 1 GiB import stays short.
pub fn stepper() -> impl FnMut(&str, u64, u64) {
    let tty = std::io::stderr().is_terminal();
    let mut last: Option<(String, u64)> = None;
    move |what, done, total| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        if last.as_ref().is_some_and(|(w, p)| w == what && *p == pct) {
            return;
        }
        last = Some((what.to_owned(), pct));
        let line = line(what, done, total, bytes);
        if tty {
            eprint!("\r{line}   ");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
    }
}

/// Ends the progress line before the result is printed.
pub fn finish() {
    eprintln!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_show_percent_and_amount() {
        assert_eq!(
            line("import", 1 << 30, 4 << 30, bytes),
            "import: 25% (1.0G of 4.0G)"
        );
        assert_eq!(
            line("seed", 420, 1000, tiles),
            "seed: 42% (420 of 1000 tiles)"
        );
        // Nothing to do is done.
        assert_eq!(line("export", 0, 0, tiles), "export: 100% (0 of 0 tiles)");
        assert_eq!(estimate(1365), r#"estimate: {"tiles":1365}"#);
    }
}
