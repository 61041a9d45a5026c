//! `fieldrack cache offline` and `fieldrack discover`: the caching proxy.

use std::fmt::Write;
use std::time::Duration;

use super::exit::Failure;
use super::{client_for, CacheCmd};

/// Run a `cache` command.
///
/// # Errors
/// The agent unreachable or refusing (404 if it runs no proxy).
pub async fn run(cmd: CacheCmd) -> Result<(), Failure> {
    match cmd {
        CacheCmd::Offline { state, config } => {
            client_for(&config)?.cache_offline(state == "on").await?;
            println!("forced offline: {state}");
        }
    }
    Ok(())
}

/// Listen `timeout` seconds for racks' proxies on this segment (mDNS).
///
/// # Errors
/// If mDNS cannot be used here.
pub async fn discover(timeout: u64) -> Result<(), Failure> {
    let found = node_agent::proxy::discover(Duration::from_secs(timeout)).await?;
    if found.is_empty() {
        eprintln!("no rack answered within {timeout}s");
    }
    print!("{}", render_found(&found));
    Ok(())
}

/// One line per rack: its name, proxy auto-config URL and tile server.
#[must_use]
pub fn render_found(found: &[(String, String)]) -> String {
    let mut out = String::new();
    for (rack, addr) in found {
        let _ = writeln!(out, "{rack}\thttp://{addr}/proxy.pac\thttp://{addr}/tiles/");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rack_found_gives_its_pac_and_tile_urls() {
        let found = vec![("a".to_owned(), "10.0.0.1:3128".to_owned())];
        assert_eq!(
            render_found(&found),
            "a\thttp://10.0.0.1:3128/proxy.pac\thttp://10.0.0.1:3128/tiles/\n"
        );
    }
}
