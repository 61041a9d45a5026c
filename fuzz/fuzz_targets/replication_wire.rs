//! Replication wire frames (`datastore::replicate::wire`): a stream of
//! `[kind][len][payload]` frames read with `read_frame` until it ends or
//! fails, each payload decoded the way the push and fetch protocols decode
//! it: JSON control frames into their closed types, chunk frames as
//! `[id][bytes]`, deltas (`replicate::delta::header` / `apply`, against a
//! zero base of the announced length when it is a legal chunk length),
//! id lists, and the manifest parts concatenated and decoded; manifest
//! delta parts concatenated and applied to the fixed base
//! (`fieldrack_fuzz::manifest_delta_base`) against the announced identity (a
//! rebuilt manifest must have it).
#![no_main]

use datastore::manifest::{delta as manifest_delta, Manifest, MAX_CHUNK_SIZE};
use datastore::replicate::delta;
use datastore::replicate::wire::{
    read_frame, Committed, DeltaHead, Hello, Holding, Kind, NeedEnd, MAX_FRAME,
};
use datastore::ChunkId;
use futures::executor::block_on;
use futures::io::Cursor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut stream = Cursor::new(data);
    let mut manifest = Vec::new();
    let mut manifest_delta = Vec::new();
    let mut announced = ChunkId([0; 32]);
    // A frame takes at least its 5-byte header, so this always ends.
    while let Ok(Some(frame)) = block_on(read_frame(&mut stream)) {
        assert!(frame.payload.len() <= MAX_FRAME);
        let p = &frame.payload;
        match frame.kind {
            Kind::Hello => {
                let _ = frame.parse::<Hello>();
            }
            Kind::NeedEnd => {
                let _ = frame.parse::<NeedEnd>();
            }
            Kind::Committed => {
                let _ = frame.parse::<Committed>();
            }
            Kind::ManifestPart => manifest.extend_from_slice(p),
            Kind::Holding => {
                let _ = frame.parse::<Holding>();
            }
            Kind::DeltaHead => {
                if let Ok(h) = frame.parse::<DeltaHead>() {
                    announced = h.manifest_id;
                }
            }
            Kind::ManifestDeltaPart => manifest_delta.extend_from_slice(p),
            Kind::Chunk => {
                if p.len() >= 32 {
                    let id = ChunkId::from_slice(&p[..32]).expect("32 bytes");
                    let _ = id == ChunkId::of(&p[32..]);
                }
            }
            Kind::Delta => {
                if let Ok(h) = delta::header(p) {
                    if h.len <= MAX_CHUNK_SIZE as usize {
                        let base = vec![0u8; h.len];
                        if let Ok(chunk) = delta::apply(&base, p) {
                            assert_eq!(chunk.len(), h.len);
                        }
                    }
                }
            }
            Kind::Want | Kind::Missing => {
                for id in p.chunks(32) {
                    let _ = ChunkId::from_slice(id);
                }
            }
            Kind::NeedPart | Kind::Done | Kind::End | Kind::Abort => {}
        }
    }
    if !manifest.is_empty() {
        let _ = Manifest::decode(&manifest);
    }
    if !manifest_delta.is_empty() {
        let base = fieldrack_fuzz::manifest_delta_base();
        if let Ok(m) = manifest_delta::apply(&base, &manifest_delta, &announced, 1 << 20) {
            assert_eq!(m.id(), announced);
        }
    }
});
