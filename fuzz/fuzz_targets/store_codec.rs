//! The cache store's on-disk records (`cache_proxy::store::codec`), read
//! back from the SQLite index at every hit and after every restart.
//!
//! Mode byte, then:
//! - 0: an object record; one that decodes re-encodes to the same bytes;
//! - 1: a metadata record; one that decodes survives a re-encoding, and its
//!   per-object headers rebuild a header map;
//! - 2: a blob location (same round trip as 0);
//! - 3: header lines; split into the shared block and per-object fields
//!   and joined again, they are the same headers, values in their order;
//! - otherwise: a raw header block as stored, joined into headers.
#![no_main]

use cache_proxy::store::codec::{join_headers, split_headers, BlobLoc, MetaRecord, ObjectRecord};
use fieldrack_fuzz::{headers_from_text, split_mode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = split_mode(data) else {
        return;
    };
    match mode {
        0 => {
            if let Ok(r) = ObjectRecord::decode(rest) {
                assert_eq!(r.encode(), rest, "object record encoding is not canonical");
                let _ = join_headers(b"", &r.volatile);
            }
        }
        1 => {
            if let Ok(m) = MetaRecord::decode(rest) {
                let again = MetaRecord::decode(&m.encode()).expect("a re-encoded record decodes");
                assert_eq!(again, m, "metadata record changed in a round trip");
                let _ = join_headers(b"", &m.volatile);
            }
        }
        2 => {
            if let Ok(b) = BlobLoc::decode(rest) {
                assert_eq!(&b.encode()[..], rest);
            }
        }
        3 => {
            let mut headers = headers_from_text(&String::from_utf8_lossy(rest));
            let (block, volatile) = split_headers(&headers);
            // Content-Length is derived from the body on the way out.
            headers.remove(hyper::header::CONTENT_LENGTH);
            assert_eq!(
                join_headers(&block, &volatile),
                headers,
                "headers changed between the store and the wire"
            );
        }
        _ => {
            let _ = join_headers(rest, &[]);
        }
    }
});
