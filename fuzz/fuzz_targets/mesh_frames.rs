//! Mesh frames: the CBOR messages of `/fieldrack/admit/1` and
//! `/fieldrack/rpc/1`, decoded by the very codec the swarm uses
//! (`libp2p::request_response::cbor` with its default size limits), then
//! handled the way the node handles them: certificates and revocations go
//! through `Admission` (verified against a fixed fleet key; a revoked
//! presenter is refused afterwards), SWIM messages are fed to a
//! `Membership` state machine ("never panics, whatever the peers send").
//! Whatever decodes must re-encode to bytes that decode to the same bytes.
//!
//! Mode byte (low two bits): 0 `AdmitRequest`, 1 `AdmitResponse`, 2 `Rpc`,
//! 3 `RpcReply`.
#![no_main]

use std::time::{Duration, Instant};

use fieldrack_fuzz::{fleet_keypair, peer, presenter, split_mode, FLEET, NOW};
use futures::executor::block_on;
use futures::io::Cursor;
use libfuzzer_sys::fuzz_target;
use libp2p::request_response::cbor::codec::Codec as CborCodec;
use libp2p::request_response::Codec;
use libp2p::StreamProtocol;
use mesh::admission::Admission;
use mesh::membership::{self, Input, Membership};
use mesh::protocol::{AdmitRequest, AdmitResponse, Rpc, RpcReply, ADMIT_PROTOCOL, RPC_PROTOCOL};
use mesh::RackInfo;
use rand::SeedableRng;

fn request<Req, Resp>(proto: &'static str, bytes: &[u8]) -> Option<Req>
where
    Req: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
    Resp: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
{
    let proto = StreamProtocol::new(proto);
    let mut codec = CborCodec::<Req, Resp>::default();
    let req = block_on(codec.read_request(&proto, &mut Cursor::new(bytes))).ok()?;
    let mut out = Cursor::new(Vec::new());
    block_on(codec.write_request(&proto, &mut out, req)).expect("re-encode");
    let once = out.into_inner();
    let again = block_on(codec.read_request(&proto, &mut Cursor::new(&once[..])))
        .expect("a re-encoded request decodes");
    let mut out = Cursor::new(Vec::new());
    block_on(codec.write_request(&proto, &mut out, again)).expect("re-encode");
    assert_eq!(out.into_inner(), once, "request encoding is not stable");
    block_on(codec.read_request(&proto, &mut Cursor::new(&once[..]))).ok()
}

fn response<Req, Resp>(proto: &'static str, bytes: &[u8]) -> Option<Resp>
where
    Req: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
    Resp: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
{
    let proto = StreamProtocol::new(proto);
    let mut codec = CborCodec::<Req, Resp>::default();
    let resp = block_on(codec.read_response(&proto, &mut Cursor::new(bytes))).ok()?;
    let mut out = Cursor::new(Vec::new());
    block_on(codec.write_response(&proto, &mut out, resp)).expect("re-encode");
    let once = out.into_inner();
    let again = block_on(codec.read_response(&proto, &mut Cursor::new(&once[..])))
        .expect("a re-encoded response decodes");
    let mut out = Cursor::new(Vec::new());
    block_on(codec.write_response(&proto, &mut out, again)).expect("re-encode");
    assert_eq!(out.into_inner(), once, "response encoding is not stable");
    block_on(codec.read_response(&proto, &mut Cursor::new(&once[..]))).ok()
}

fn local_info() -> RackInfo {
    RackInfo {
        rack: "local".into(),
        role: deploy::Role::Rack,
        site: "s".into(),
        cpus: 4,
        memory_mb: 4096,
        power: Default::default(),
        version: "0".into(),
        api: "127.0.0.1:7480".into(),
        bulk_port: None,
    }
}

/// Feeds a received SWIM message to a fresh membership, then lets time
/// run past every timeout so deadlines computed from it are exercised.
fn swim(msg: membership::Message<RackInfo>) {
    let start = Instant::now();
    let local = peer([13; 32]);
    let mut m = Membership::new(
        local,
        1,
        local_info(),
        membership::Config::default(),
        rand::rngs::StdRng::seed_from_u64(1),
        start,
    );
    let from = presenter();
    m.handle(start, Input::Discovered { id: from });
    m.handle(start, Input::Received { from, msg });
    for s in [1, 2, 5, 30, 120] {
        m.handle(start + Duration::from_secs(s), Input::Tick);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = split_mode(data) else {
        return;
    };
    let mut admission = Admission::new(
        fleet_keypair().public(),
        FLEET.to_string(),
        Duration::from_secs(10),
    );
    let peer = presenter();
    admission.connected(peer, Instant::now());
    match mode & 3 {
        0 => {
            if let Some(req) = request::<AdmitRequest, AdmitResponse>(ADMIT_PROTOCOL, rest) {
                if let Ok((body, _)) = admission.present(peer, &req.certificate, NOW) {
                    assert!(admission.is_admitted(&peer));
                    assert_eq!(body.peer_id, peer.to_base58());
                }
            }
        }
        1 => {
            let _ = response::<AdmitRequest, AdmitResponse>(ADMIT_PROTOCOL, rest);
        }
        2 => match request::<Rpc, RpcReply>(RPC_PROTOCOL, rest) {
            Some(Rpc::Swim(msg)) => swim(msg),
            Some(Rpc::Revocations(revs)) => {
                for r in revs
                    .iter()
                    .take(mesh::protocol::MAX_REVOCATIONS_PER_MESSAGE)
                {
                    let _ = admission.revoke(r);
                }
                if admission.is_revoked(&peer) {
                    assert!(!admission.is_admitted(&peer));
                }
            }
            None => {}
        },
        _ => {
            if let Some(RpcReply::Swim(msg)) = response::<Rpc, RpcReply>(RPC_PROTOCOL, rest) {
                swim(msg);
            }
        }
    }
});
