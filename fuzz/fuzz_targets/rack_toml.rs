//! `rack.toml`: parse and validate (`deploy::RackConfig::parse`); a file
//! that validates must serialise (`to_toml`, used by provisioning) into a
//! file that validates to the same configuration.
#![no_main]

use std::path::Path;

use deploy::RackConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("rack.toml");
    let Ok(config) = RackConfig::parse(text, path) else {
        return;
    };
    let again = RackConfig::parse(&config.to_toml(), path)
        .expect("a validated rack.toml serialises to one that validates");
    assert_eq!(again, config, "rack.toml round trip changed the config");
    let _ = config.api_addr();
});
