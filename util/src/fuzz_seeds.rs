//! Writes the seed corpus of the `stored_record` fuzz target
//! (`fuzz/corpus/stored_record/`) with the real encoder, [`seal`]:
//! `scripts/fuzz seeds` runs it. Each seed is the target's mode byte
//! (bit 0: version 2 expected; bits 2..: which bit to flip) and a record
//! of the payloads the agent and the control plane store (JSON).

use std::path::Path;

use crate::record::seal;

#[test]
#[ignore = "writes fuzz/corpus; run by scripts/fuzz seeds"]
fn write_fuzz_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/stored_record");
    std::fs::create_dir_all(&dir).expect("corpus dir");
    let payloads: [(&str, u8, &[u8]); 4] = [
        ("incarnation", 1, br#"1796151698"#),
        (
            "revocation",
            1,
            br#"{"peer":"12D3KooW","reason":"lost","revoked_at":1796151698}"#,
        ),
        (
            "vote",
            2,
            br#"{"leader_id":{"term":3,"node_id":7},"committed":true}"#,
        ),
        ("empty", 1, b""),
    ];
    for (i, (name, version, payload)) in payloads.into_iter().enumerate() {
        let mode = (version - 1) | ((i as u8) << 2);
        let mut bytes = vec![mode];
        bytes.extend(seal(version, payload));
        std::fs::write(dir.join(name), bytes).expect("write seed");
    }
}
