//! Writes the seed corpus of the `mesh_frames` fuzz target
//! (`fuzz/corpus/mesh_frames/`) with the codec the swarm uses:
//! `scripts/fuzz seeds` runs it. Keys are the fuzz fixtures' fixed ones
//! (`fuzz/src/lib.rs`), so the certificates and revocations verify there.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use deploy::cert::CERT_VERSION;
use deploy::power::PowerStatus;
use deploy::{CertBody, FleetKey, RevocationBody, Role};
use futures::executor::block_on;
use futures::io::Cursor;
use libp2p::identity::{ed25519, Keypair};
use libp2p::request_response::cbor::codec::Codec as CborCodec;
use libp2p::request_response::Codec;
use libp2p::{PeerId, StreamProtocol};

use crate::membership::{Message, State, Update};
use crate::protocol::{AdmitRequest, AdmitResponse, Rpc, RpcReply, ADMIT_PROTOCOL, RPC_PROTOCOL};
use crate::RackInfo;

/// `fuzz/src/lib.rs`: `FLEET_SECRET`, `PRESENTER_SECRET`, `FLEET`, `NOW`.
const FLEET_SECRET: [u8; 32] = [7; 32];
const PRESENTER_SECRET: [u8; 32] = [9; 32];
const FLEET: &str = "fuzz";
const NOW: u64 = 1_800_000_000;

fn seed(name: &str, mode: u8, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/mesh_frames");
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), [&[mode][..], bytes].concat()).expect("write seed");
}

fn request<Req, Resp>(proto: &'static str, req: Req) -> Vec<u8>
where
    Req: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
    Resp: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
{
    let mut out = Cursor::new(Vec::new());
    block_on(CborCodec::<Req, Resp>::default().write_request(
        &StreamProtocol::new(proto),
        &mut out,
        req,
    ))
    .expect("encode");
    out.into_inner()
}

fn response<Req, Resp>(proto: &'static str, resp: Resp) -> Vec<u8>
where
    Req: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
    Resp: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
{
    let mut out = Cursor::new(Vec::new());
    block_on(CborCodec::<Req, Resp>::default().write_response(
        &StreamProtocol::new(proto),
        &mut out,
        resp,
    ))
    .expect("encode");
    out.into_inner()
}

fn info(rack: &str) -> RackInfo {
    RackInfo {
        rack: rack.into(),
        role: Role::Rack,
        site: "north".into(),
        cpus: 8,
        memory_mb: 16_384,
        power: PowerStatus {
            battery_runtime_s: Some(1200),
            battery_charge_pct: Some(80.5),
            ..PowerStatus::default()
        },
        version: "0.1.0".into(),
        api: "127.0.0.1:7480".into(),
        bulk_port: None,
    }
}

#[test]
#[ignore = "writes fuzz/corpus; run by scripts/fuzz seeds"]
fn write_fuzz_seeds() {
    let fleet = FleetKey::from_secret_b64(&B64.encode(FLEET_SECRET)).expect("fleet key");
    let secret = ed25519::SecretKey::try_from_bytes(PRESENTER_SECRET).expect("32 bytes");
    let presenter = Keypair::from(ed25519::Keypair::from(secret))
        .public()
        .to_peer_id();
    let other = PeerId::from_public_key(
        &Keypair::from(ed25519::Keypair::from(
            ed25519::SecretKey::try_from_bytes([11; 32]).expect("32 bytes"),
        ))
        .public(),
    );
    let cert = fleet.issue(&CertBody {
        version: CERT_VERSION,
        fleet: FLEET.into(),
        rack: "a".into(),
        peer_id: presenter.to_base58(),
        role: Role::Rack,
        site: "north".into(),
        serial: 42,
        not_before: NOW - 86_400,
        not_after: NOW + 86_400 * 365,
    });
    let rev = fleet.revoke(&RevocationBody {
        version: CERT_VERSION,
        fleet: FLEET.into(),
        rack: "a".into(),
        peer_id: presenter.to_base58(),
        revoked_at: NOW,
        reason: "stolen".into(),
    });
    let updates = vec![
        Update {
            id: presenter,
            state: State::Alive,
            incarnation: 3,
            meta_version: 3,
            meta: Some(info("a")),
            accuser: None,
        },
        Update {
            id: other,
            state: State::Suspect,
            incarnation: 1,
            meta_version: 0,
            meta: None,
            accuser: None,
        },
    ];

    let admit =
        request::<AdmitRequest, AdmitResponse>(ADMIT_PROTOCOL, AdmitRequest { certificate: cert });
    seed("admit-request", 0, &admit);
    seed(
        "admit-accepted",
        1,
        &response::<AdmitRequest, AdmitResponse>(ADMIT_PROTOCOL, AdmitResponse::Accepted),
    );
    seed(
        "admit-rejected",
        1,
        &response::<AdmitRequest, AdmitResponse>(
            ADMIT_PROTOCOL,
            AdmitResponse::Rejected {
                reason: "certificate expired".into(),
            },
        ),
    );
    let ping = Message::Ping {
        seq: 7,
        updates: updates.clone(),
    };
    seed(
        "rpc-ping",
        2,
        &request::<Rpc, RpcReply>(RPC_PROTOCOL, Rpc::Swim(ping)),
    );
    let ping_req = Message::PingReq {
        seq: 8,
        target: other,
        updates: updates.clone(),
    };
    seed(
        "rpc-ping-req",
        2,
        &request::<Rpc, RpcReply>(RPC_PROTOCOL, Rpc::Swim(ping_req)),
    );
    seed(
        "rpc-revocations",
        2,
        &request::<Rpc, RpcReply>(RPC_PROTOCOL, Rpc::Revocations(vec![rev])),
    );
    seed(
        "reply-ok",
        3,
        &response::<Rpc, RpcReply>(RPC_PROTOCOL, RpcReply::Ok),
    );
    let ack = Message::Ack { seq: 7, updates };
    seed(
        "reply-ack",
        3,
        &response::<Rpc, RpcReply>(RPC_PROTOCOL, RpcReply::Swim(ack)),
    );
}
