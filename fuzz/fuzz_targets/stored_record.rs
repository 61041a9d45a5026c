//! The envelope of every record kept in sled (`util::record`): the agent's
//! store (incarnation, revocations, event log) and the control plane's
//! Raft log, vote and applied state all read their values through
//! `open` before anything decodes the payload.
//!
//! Mode byte: its low bit picks the version the reader expects (1 or 2);
//! bit 1 set, the input's checksum is first rewritten to match its payload
//! (as a writer would), so the fuzzer also reaches the version check and
//! the payload. Whatever opens must seal back to the very same bytes, and
//! a record that opens must be refused once any single bit of it flips.
#![no_main]

use fieldrack_fuzz::split_mode;
use libfuzzer_sys::fuzz_target;
use util::record::{crc32, open, seal, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = split_mode(data) else {
        return;
    };
    let version = 1 + (mode & 1);
    let mut bytes = rest.to_vec();
    if mode & 2 != 0 && bytes.len() >= HEADER_LEN {
        let sum = crc32(&bytes[HEADER_LEN..]);
        bytes[1..HEADER_LEN].copy_from_slice(&sum.to_le_bytes());
    }
    let Ok(payload) = open(version, &bytes) else {
        return;
    };
    assert_eq!(seal(version, payload), bytes, "open and seal disagree");
    // The payloads are JSON: decoding one never panics, whatever it holds.
    let _ = serde_json::from_slice::<serde_json::Value>(payload);
    // CRC-32 detects every single-bit error.
    let bit = usize::from(mode >> 2) % (bytes.len() * 8);
    let mut flipped = bytes.clone();
    flipped[bit / 8] ^= 1 << (bit % 8);
    assert!(open(version, &flipped).is_err(), "a flipped bit {bit} went unnoticed");
});
