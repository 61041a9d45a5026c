//! Writes the seed corpus of the `replication_wire` and `volume_manifest`
//! fuzz targets (`fuzz/corpus/<target>/`) with the real encoders (frames
//! from `write_frame`, manifests from `Manifest::encode`, deltas from
//! `delta::encode`): `scripts/fuzz seeds` runs it.

use std::path::Path;

use futures::executor::block_on;

use crate::manifest::delta as manifest_delta;
use crate::manifest::Manifest;
use crate::replicate::delta;
use crate::replicate::wire::{
    write_frame, Abort, Committed, DeltaHead, Frame, Hello, Holding, Kind, NeedEnd, PROTO,
};
use crate::ChunkId;

fn seed(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

/// Frames laid out as they go on the wire.
fn stream(frames: &[(Kind, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (kind, payload) in frames {
        block_on(write_frame(&mut out, *kind, payload)).expect("frame");
    }
    out
}

fn json(f: Frame) -> (Kind, Vec<u8>) {
    (f.kind, f.payload)
}

#[test]
#[ignore = "writes fuzz/corpus; run by scripts/fuzz seeds"]
fn write_fuzz_seeds() {
    // Small chunks keep the seeds small; 4 KiB is the smallest legal size.
    let chunk_size = 4096u32;
    let a = vec![1u8; chunk_size as usize];
    let mut b = a.clone();
    b[100] = 2;
    let (ida, idb) = (ChunkId::of(&a), ChunkId::of(&b));
    let manifest = Manifest {
        volume: "registry-data".into(),
        generation: 3,
        size: 5 * u64::from(chunk_size) - 512,
        chunk_size,
        chunks: vec![Some(ida), None, Some(idb), Some(ida), None],
        created_at_ms: 1_800_000_000_000,
    };
    let encoded = manifest.encode();
    let single = Manifest {
        volume: "v".into(),
        generation: 1,
        size: 4096,
        chunk_size,
        chunks: vec![None],
        created_at_ms: 0,
    }
    .encode();
    for (name, bytes) in [("five-chunks", &encoded), ("one-zero-chunk", &single)] {
        // Mode 1: as it is; mode 0: the target recomputes the checksum.
        seed(
            "volume_manifest",
            &format!("{name}-raw"),
            &[&[1u8][..], bytes].concat(),
        );
        seed(
            "volume_manifest",
            &format!("{name}-fixed"),
            &[&[0u8][..], bytes].concat(),
        );
    }

    let hello = Hello {
        proto: PROTO,
        owner: "a".into(),
        volume: manifest.volume.clone(),
        generation: manifest.generation,
        manifest_len: encoded.len() as u64,
    };
    let chunk = [ida.as_bytes().as_slice(), &a].concat();
    // A delta pays off from two blocks on: one of two changed.
    let (a2, mut b2) = (vec![1u8; 8192], vec![1u8; 8192]);
    b2[100] = 2;
    let (ida2, idb2) = (ChunkId::of(&a2), ChunkId::of(&b2));
    let d = delta::encode(idb2.as_bytes(), ida2.as_bytes(), &a2, &b2).expect("a one-block delta");
    let (half1, half2) = encoded.split_at(encoded.len() / 2);
    seed(
        "replication_wire",
        "push-owner",
        &stream(&[
            json(Frame::json(Kind::Hello, &hello)),
            (Kind::ManifestPart, half1.to_vec()),
            (Kind::ManifestPart, half2.to_vec()),
            (Kind::Chunk, chunk.clone()),
            (Kind::Delta, d),
            (Kind::Done, Vec::new()),
        ]),
    );
    // Version 2: the generation as a delta of the one the replica holds
    // (the same base as `fieldrack_fuzz::manifest_delta_base`).
    let base = Manifest {
        generation: 2,
        chunks: vec![Some(ida), None, None, Some(ida), None],
        created_at_ms: 1_799_999_990_000,
        ..manifest.clone()
    };
    let md = manifest_delta::encode(&base, &manifest);
    let rebuilt = manifest_delta::apply(&base, &md, &manifest.id(), 1 << 20);
    assert_eq!(rebuilt.as_ref(), Ok(&manifest), "the seed's delta applies");
    let head = DeltaHead {
        base: 2,
        delta_len: md.len() as u64,
        manifest_id: manifest.id(),
    };
    seed(
        "replication_wire",
        "push-owner-delta",
        &stream(&[
            json(Frame::json(Kind::Hello, &hello)),
            json(Frame::json(Kind::DeltaHead, &head)),
            (Kind::ManifestDeltaPart, md),
            (Kind::Done, Vec::new()),
        ]),
    );
    seed(
        "replication_wire",
        "push-replica-holding",
        &stream(&[
            json(Frame::json(
                Kind::Holding,
                &Holding {
                    generations: vec![2, 1],
                },
            )),
            json(Frame::json(Kind::Committed, &Committed { generation: 3 })),
        ]),
    );
    seed(
        "replication_wire",
        "push-replica",
        &stream(&[
            (Kind::NeedPart, vec![0b0000_0101]),
            json(Frame::json(
                Kind::NeedEnd,
                &NeedEnd {
                    have_generation: Some(2),
                    missing: 2,
                },
            )),
            json(Frame::json(Kind::Committed, &Committed { generation: 3 })),
        ]),
    );
    seed(
        "replication_wire",
        "fetch",
        &stream(&[
            (Kind::Want, [*ida.as_bytes(), *idb.as_bytes()].concat()),
            (Kind::End, Vec::new()),
            (Kind::Chunk, chunk),
            (Kind::Missing, idb.as_bytes().to_vec()),
            (Kind::End, Vec::new()),
        ]),
    );
    let zeros_delta = delta::encode_against_zeros(ida.as_bytes(), &{
        let mut z = vec![0u8; 8192];
        z[5] = 1;
        z
    })
    .expect("a sparse chunk is a delta against zeros");
    seed(
        "replication_wire",
        "delta-then-abort",
        &stream(&[
            (Kind::Delta, zeros_delta),
            json(Frame::json(
                Kind::Abort,
                &Abort {
                    reason: "chunk failed verification".into(),
                    bad_chunk: Some(idb),
                },
            )),
        ]),
    );
}
