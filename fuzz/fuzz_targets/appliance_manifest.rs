//! Appliance manifests (`[[appliance]]` tables): parse and validate
//! (`deploy::appliance::parse_manifest`), check dependencies; a manifest
//! that validates must serialise (`to_toml`) into one that reads back to
//! the same appliances. Also the size parser operators type on the CLI.
#![no_main]

use deploy::appliance::{check_dependencies, parse_manifest, parse_size, to_toml};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_size(text);
    let Ok(specs) = parse_manifest(text) else {
        return;
    };
    let _ = check_dependencies(&specs);
    let again = parse_manifest(&to_toml(&specs))
        .expect("a validated manifest serialises to one that validates");
    assert_eq!(again, specs, "manifest round trip changed the appliances");
});
