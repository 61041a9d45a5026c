//! Volume manifests (`datastore::Manifest::decode`), the encoding that
//! crosses the network in a push and sits on disk for every generation.
//!
//! Mode byte: odd, the input is decoded as it is; even, its last 16 bytes
//! are first replaced by the checksum of the rest (as a sender computes
//! it), so the fuzzer gets past the checksum to the counts, bitmap and
//! ids. Whatever decodes is valid and re-encodes to the very same bytes
//! (the encoding is canonical: a manifest's id is the hash of it).
#![no_main]

use datastore::Manifest;
use fieldrack_fuzz::split_mode;
use libfuzzer_sys::fuzz_target;

/// Length of the trailing checksum (see `datastore::manifest`).
const CHECKSUM_LEN: usize = 16;

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = split_mode(data) else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode % 2 == 0 && bytes.len() >= CHECKSUM_LEN {
        let body = bytes.len() - CHECKSUM_LEN;
        let sum = blake3::hash(&bytes[..body]);
        bytes[body..].copy_from_slice(&sum.as_bytes()[..CHECKSUM_LEN]);
    }
    if let Ok(m) = Manifest::decode(&bytes) {
        assert!(m.validate().is_ok());
        assert_eq!(m.encode(), bytes, "manifest encoding is not canonical");
        let _ = (m.stored_bytes(), m.referenced(), m.id());
    }
});
