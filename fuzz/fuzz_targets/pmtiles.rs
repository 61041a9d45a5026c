//! PMTiles v3 (`cache_proxy::pmtiles`), the archives operators import.
//!
//! Mode byte, then:
//! - 0: a header (`Header::parse`, the first 127 bytes) and a directory
//!   (`decode_directory`, the rest; the whole input when shorter); a directory that decodes re-encodes
//!   (`encode_directory`) to one that decodes to the same entries;
//! - otherwise: a whole archive, written to a file and opened through the
//!   reader the import uses (`Archive::open`, `validate`, every entry's
//!   tile data, the metadata).
#![no_main]

use std::sync::OnceLock;

use cache_proxy::pmtiles::{self, Archive, Header, HEADER_LEN};
use fieldrack_fuzz::split_mode;
use libfuzzer_sys::fuzz_target;

/// Tiles read per input: enough to reach every code path, few enough that
/// an archive addressing millions of tiles stays a fast input.
const MAX_TILES_READ: usize = 64;

fn scratch() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = split_mode(data) else {
        return;
    };
    if mode == 0 {
        let directory = match rest.split_first_chunk::<HEADER_LEN>() {
            Some((head, directory)) => {
                if let Ok(h) = Header::parse(head) {
                    assert_eq!(Header::parse(&h.encode()).expect("re-encoded header"), h);
                }
                directory
            }
            None => rest,
        };
        if let Ok(entries) = pmtiles::decode_directory(directory) {
            let again = pmtiles::decode_directory(&pmtiles::encode_directory(&entries))
                .expect("a re-encoded directory decodes");
            assert_eq!(again, entries, "directory changed in a round trip");
        }
        return;
    }
    let path = scratch().path().join("input.pmtiles");
    std::fs::write(&path, rest).expect("write the archive");
    let Ok(mut archive) = Archive::open(&path) else {
        return;
    };
    if archive.validate().is_err() {
        return;
    }
    let mut read = 0;
    let _ = archive.for_each_entry(|a, e| {
        let data = a.tile_data(e)?;
        assert_eq!(data.len(), e.length as usize);
        read += 1;
        Ok(read < MAX_TILES_READ)
    });
    let _ = archive.metadata();
});
