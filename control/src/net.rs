//! Raft messages over the mesh: one raw libp2p stream per call on the
//! fleet-authenticated connection (`/fieldrack/raft/1`), a length-prefixed
//! JSON request and its reply.
//!
//! Radio links fail one at a time: when rack A cannot reach rack B but both
//! reach C, a call from A to B is relayed by C (one hop). Raft then sees a
//! connected field and a single cut link changes nothing: no election
//! churn, no lost lease, no failover.
//!
//! Timeouts follow each peer's measured call time ([`timeouts`]), within the
//! caller's floor and the control plane's Raft call timeout, so a rack behind
//! a satellite hop is waited for as long as its calls take.

pub mod timeouts;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::PeerId;
use mesh::MeshHandle;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use self::timeouts::CallTimeouts;
use crate::field::{Command, Response};
use crate::{NodeId, RackNode, TypeConfig};

/// The stream protocol.
pub const RAFT_PROTOCOL: &str = "/fieldrack/raft/1";
/// Largest frame accepted (a snapshot of a big field, or a long append).
pub const MAX_FRAME: usize = 32 << 20;
/// After a direct call to a peer fails, go through a relay first for this long.
const DIRECT_BACKOFF: Duration = Duration::from_secs(5);

/// A call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Raft: append entries / heartbeat.
    Append(AppendEntriesRequest<TypeConfig>),
    /// Raft: vote.
    Vote(VoteRequest<NodeId>),
    /// Raft: snapshot chunk.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// Apply a command (sent to the leader).
    Propose(Command),
    /// A Raft call (append, vote, snapshot) from a member of control-plane
    /// cluster `cluster` ([`Net::cluster`]): Raft's terms and leader ids
    /// do not tell two clusters that formed apart from each other (each
    /// starts at term 1), so a rack refuses the Raft calls of a cluster it
    /// is not in.
    InCluster {
        /// The sender's cluster.
        cluster: u64,
        /// The call.
        request: Box<Request>,
    },
    /// Who are you, and are you in a cluster?
    Hello,
    /// Pass `request` on to `to` (base58 PeerId) directly.
    Relay {
        /// Final target.
        to: String,
        /// What to pass on.
        request: Box<Request>,
    },
}

/// The answer to a [`Request::Propose`].
#[derive(Debug, Serialize, Deserialize)]
pub enum ProposeReply {
    /// Committed and applied.
    Applied(Response),
    /// Not the leader; this one may be.
    NotLeader(Option<NodeId>),
    /// Failed.
    Failed(String),
}

/// A reply.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// To [`Request::Append`].
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To [`Request::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To [`Request::Snapshot`].
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// To [`Request::Propose`].
    Propose(ProposeReply),
    /// To [`Request::Hello`].
    Hello {
        /// Its Raft node id.
        node_id: NodeId,
        /// Whether it is in a cluster.
        initialized: bool,
        /// The leader it knows of.
        leader: Option<NodeId>,
        /// The voters of its cluster (empty when it is in none).
        #[serde(default)]
        voters: Vec<NodeId>,
        /// The last entry of its Raft log: the pre-vote refuses a
        /// candidate whose log is older ([`crate::formation::election_gate`]).
        #[serde(default)]
        last_log: Option<openraft::LogId<NodeId>>,
        /// Its cluster's id (`None`: in none; absent from older racks).
        #[serde(default)]
        cluster: Option<u64>,
    },
    /// The call could not be served (relay target unreachable...).
    Error(String),
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    /// No stream, or it broke.
    #[error("{0}")]
    Io(String),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A malformed frame.
    #[error("bad frame: {0}")]
    Frame(String),
}

/// Write one frame.
///
/// # Errors
/// I/O errors.
pub async fn write_frame<W: futures::AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), NetError> {
    let body = serde_json::to_vec(msg).map_err(|e| NetError::Frame(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(NetError::Frame(format!(
            "{} bytes is too large",
            body.len()
        )));
    }
    let len = u32::try_from(body.len()).expect("bounded by MAX_FRAME");
    let io = |e: std::io::Error| NetError::Io(e.to_string());
    w.write_all(&len.to_be_bytes()).await.map_err(io)?;
    w.write_all(&body).await.map_err(io)?;
    w.flush().await.map_err(io)
}

/// Read one frame.
///
/// # Errors
/// I/O errors, oversize or undecodable frames.
pub async fn read_frame<R: futures::AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<T, NetError> {
    let io = |e: std::io::Error| NetError::Io(e.to_string());
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(io)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(NetError::Frame(format!("{len} bytes is too large")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(io)?;
    serde_json::from_slice(&body).map_err(|e| NetError::Frame(e.to_string()))
}

/// Calls to other racks, direct or relayed.
pub struct Net {
    mesh: MeshHandle,
    direct_failed: Mutex<HashMap<PeerId, Instant>>,
    /// Each peer's measured call time: the timeouts of calls to it.
    timeouts: Mutex<CallTimeouts<PeerId>>,
    /// The longest any call may be given (the Raft call timeout).
    ceiling: Duration,
    /// This rack's control-plane cluster, sent with every Raft call
    /// ([`Request::InCluster`]), and the Raft instance it belongs to.
    cluster: Mutex<ClusterSlot>,
    /// The voters of its membership as last observed (empty: unknown,
    /// every target treated as a voter).
    voters: Mutex<std::collections::BTreeSet<NodeId>>,
}

/// Shortest time between two appends to a learner. Every rack renews its
/// lease through the log every second, so in a field of N racks the
/// leader had about N appends a second to send to every learner, each a
/// stream of its own: with 24 learners at 32 racks that traffic was most
/// of the field's idle CPU. A learner does not count toward a commit, so
/// its appends wait for this and carry what gathered meanwhile (at most
/// two a second); voters are paced less ([`VOTER_APPEND_EVERY`]), since
/// a commit waits for them. A learner's view of the field is this much
/// older at most: it delays what it learns (an appliance assigned to it
/// starts up to this much later), never what it may do, since its own
/// start gate counts from when it applied the old owner's renewal.
pub const LEARNER_APPEND_EVERY: Duration = Duration::from_millis(500);

/// Shortest time between two appends to a voter. Unpaced, a field of N
/// racks sent every voter about N appends a second (one per renewal), each
/// a stream of its own; paced, an append carries the renewals that
/// gathered meanwhile. A commit waits at most this much longer: nothing
/// next to the lease (8 s) or a failover's timers.
pub const VOTER_APPEND_EVERY: Duration = Duration::from_millis(200);

/// How long an append waits at `now`, the last one to the same node sent
/// at `last`, appends to it being at least `every` apart.
#[must_use]
pub fn append_wait(every: Duration, last: Option<Instant>, now: Instant) -> Duration {
    last.map_or(Duration::ZERO, |t| {
        every.saturating_sub(now.saturating_duration_since(t))
    })
}

impl Net {
    /// Over `mesh`; no call is given more than `ceiling`.
    #[must_use]
    pub fn new(mesh: MeshHandle, ceiling: Duration) -> Self {
        Self {
            mesh,
            direct_failed: Mutex::default(),
            timeouts: Mutex::default(),
            ceiling,
            cluster: Mutex::default(),
            voters: Mutex::default(),
        }
    }

    /// The voters of this rack's membership, as just observed.
    pub fn set_voters(&self, voters: &std::collections::BTreeSet<NodeId>) {
        let mut v = self.voters.lock().expect("voters lock");
        if *v != *voters {
            v.clone_from(voters);
        }
    }

    /// Whether `target` is known to be a learner (a member, not a voter).
    fn is_learner(&self, target: NodeId) -> bool {
        let v = self.voters.lock().expect("voters lock");
        !v.is_empty() && !v.contains(&target)
    }

    /// This rack's control-plane cluster, if it is in one.
    #[must_use]
    pub fn cluster(&self) -> Option<u64> {
        self.cluster.lock().expect("cluster lock").cluster
    }

    /// The current Raft instance joined `cluster` (`None`: none).
    pub fn set_cluster(&self, cluster: Option<u64>) {
        self.cluster.lock().expect("cluster lock").cluster = cluster;
    }

    /// The rack left its cluster: a new Raft instance, in no cluster yet,
    /// replaces the old one. Returns the new instance's number, for its
    /// [`NetworkFactory`].
    pub fn leave_cluster(&self) -> u64 {
        self.cluster.lock().expect("cluster lock").leave()
    }

    /// The cluster a call of Raft instance `instance` carries; `None` if
    /// that instance was replaced ([`ClusterSlot::for_instance`]).
    #[must_use]
    pub fn cluster_for(&self, instance: u64) -> Option<Option<u64>> {
        self.cluster
            .lock()
            .expect("cluster lock")
            .for_instance(instance)
    }

    /// The current Raft instance's number.
    #[must_use]
    pub fn instance(&self) -> u64 {
        self.cluster.lock().expect("cluster lock").instance
    }

    /// How long a direct call to `peer` should be given: what its answered
    /// calls took (see [`timeouts`]), at least `floor`, at most the Raft
    /// call timeout (or `floor`, if larger).
    #[must_use]
    pub fn timeout_for(&self, peer: &PeerId, floor: Duration) -> Duration {
        self.timeouts
            .lock()
            .expect("timeouts lock")
            .timeout(peer, floor, self.ceiling)
    }

    /// What is known of calls to `peer` (for status).
    #[must_use]
    pub fn estimate(&self, peer: &PeerId) -> Option<timeouts::Estimate> {
        self.timeouts.lock().expect("timeouts lock").estimate(peer)
    }

    /// One call on a direct stream.
    ///
    /// # Errors
    /// [`NetError`].
    pub async fn direct(
        &self,
        peer: PeerId,
        req: &Request,
        timeout: Duration,
    ) -> Result<Reply, NetError> {
        let started = Instant::now();
        let call = async {
            let mut s = self
                .mesh
                .open_stream(peer, RAFT_PROTOCOL)
                .await
                .map_err(|e| NetError::Io(e.to_string()))?;
            write_frame(&mut s, req).await?;
            let reply = read_frame(&mut s).await?;
            let _ = s.close().await;
            Ok(reply)
        };
        let r = match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(NetError::Timeout(timeout)),
        };
        // A relayed call's time is two hops' and says little of this one.
        if !matches!(req, Request::Relay { .. }) {
            let mut timeouts = self.timeouts.lock().expect("timeouts lock");
            match &r {
                Ok(_) => timeouts.answered(&peer, started.elapsed()),
                Err(NetError::Timeout(gave)) => timeouts.timed_out(&peer, *gave),
                Err(_) => {}
            }
        }
        let mut failed = self.direct_failed.lock().expect("direct_failed lock");
        match &r {
            Ok(_) => {
                failed.remove(&peer);
            }
            Err(_) => {
                failed.insert(peer, Instant::now());
            }
        }
        r
    }

    async fn relayed(
        &self,
        peer: PeerId,
        req: &Request,
        timeout: Duration,
    ) -> Result<Reply, NetError> {
        let relay_req = Request::Relay {
            to: peer.to_base58(),
            request: Box::new(req.clone()),
        };
        let deadline = Instant::now() + timeout;
        let mut last = NetError::Io("no relay reaches it".into());
        for (via, _) in self.mesh.admitted() {
            if via == peer {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NetError::Timeout(timeout));
            }
            match self.direct(via, &relay_req, left).await {
                Ok(Reply::Error(e)) => last = NetError::Io(e),
                Ok(r) => return Ok(r),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// A call to `peer`: direct, else through a relay (relay first while
    /// the direct path is known to fail). The first path gets half of
    /// `timeout`, or what calls to `peer` take if that is longer (a slow
    /// link is slow both ways round); the second gets the rest.
    ///
    /// # Errors
    /// [`NetError`] when neither path answers within `timeout`.
    pub async fn call(
        &self,
        peer: PeerId,
        req: &Request,
        timeout: Duration,
    ) -> Result<Reply, NetError> {
        let deadline = Instant::now() + timeout;
        let recently_failed = self
            .direct_failed
            .lock()
            .expect("direct_failed lock")
            .get(&peer)
            .is_some_and(|t| t.elapsed() < DIRECT_BACKOFF);
        let first = self.timeout_for(&peer, timeout / 2).min(timeout);
        let rest = || deadline.saturating_duration_since(Instant::now());
        if recently_failed {
            match self.relayed(peer, req, first).await {
                Ok(r) => Ok(r),
                Err(e) if rest().is_zero() => Err(e),
                Err(_) => self.direct(peer, req, rest()).await,
            }
        } else {
            match self.direct(peer, req, first).await {
                Ok(r) => Ok(r),
                Err(e) if rest().is_zero() => Err(e),
                Err(_) => self.relayed(peer, req, rest()).await,
            }
        }
    }
}

/// Makes a [`Conn`] per target node.
#[derive(Clone)]
pub struct NetworkFactory {
    pub(crate) net: Arc<Net>,
    /// The Raft instance it serves ([`Net::instance`]).
    pub(crate) instance: u64,
}

/// The cluster a Raft instance's calls carry. When a rack leaves its
/// cluster (formation found a winning one), its old Raft instance is shut
/// down, but a call of one of its replication streams may still be on its
/// way out; read after the leave, the cluster would be none, and the call
/// would go out as a rack in no cluster may send one: a vote or an append
/// that a rack of the winning cluster still listing the sender accepts,
/// with the old cluster's log (that made one rack's Raft core panic on
/// entries it had applied and no longer held). So each instance has a
/// number, and a call of a replaced instance is never sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterSlot {
    /// The current Raft instance (0 at start, one more per leave).
    pub instance: u64,
    /// Its cluster, once it is in one.
    pub cluster: Option<u64>,
}

impl ClusterSlot {
    /// Leave: a new instance in no cluster.
    pub fn leave(&mut self) -> u64 {
        self.instance += 1;
        self.cluster = None;
        self.instance
    }

    /// The cluster a call of `instance` carries; `None` if that instance
    /// was replaced (the call must not go out).
    #[must_use]
    pub fn for_instance(&self, instance: u64) -> Option<Option<u64>> {
        (instance == self.instance).then_some(self.cluster)
    }
}

/// Raft's connection to one node.
pub struct Conn {
    net: Arc<Net>,
    /// The Raft instance that made it.
    instance: u64,
    target: NodeId,
    peer: Option<PeerId>,
    /// When the last append to it was sent (appends are paced).
    last_append: Option<Instant>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Conn;

    async fn new_client(&mut self, target: NodeId, node: &RackNode) -> Conn {
        Conn {
            net: self.net.clone(),
            instance: self.instance,
            target,
            peer: node.peer_id.parse().ok(),
            last_append: None,
        }
    }
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, RackNode, RaftError<NodeId, E>>;

impl Conn {
    async fn call(&self, req: Request, timeout: Duration) -> Result<Reply, Unreachable> {
        let peer = self.peer.ok_or_else(|| {
            Unreachable::new(&NetError::Io(format!("node {} has no PeerId", self.target)))
        })?;
        let Some(cluster) = self.net.cluster_for(self.instance) else {
            return Err(Unreachable::new(&NetError::Io(
                "this Raft instance was replaced: the rack left its cluster".into(),
            )));
        };
        let req = match cluster {
            Some(cluster) => Request::InCluster {
                cluster,
                request: Box::new(req),
            },
            None => req,
        };
        self.net
            .call(peer, &req, timeout)
            .await
            .map_err(|e| Unreachable::new(&e))
    }
}

fn unexpected<E: std::error::Error>(r: &Reply) -> RpcErr<E> {
    let what = match r {
        Reply::Error(e) => e.clone(),
        other => format!("unexpected reply {other:?}"),
    };
    RPCError::Network(NetworkError::new(&NetError::Frame(what)))
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let mut ttl = option.hard_ttl();
        let every = if self.net.is_learner(self.target) {
            LEARNER_APPEND_EVERY
        } else {
            VOTER_APPEND_EVERY
        };
        let wait = append_wait(every, self.last_append, Instant::now()).min(ttl / 2);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
            ttl = ttl.saturating_sub(wait);
        }
        self.last_append = Some(Instant::now());
        match self.call(Request::Append(rpc), ttl).await? {
            Reply::Append(Ok(r)) => Ok(r),
            Reply::Append(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        match self.call(Request::Snapshot(rpc), option.hard_ttl()).await? {
            Reply::Snapshot(Ok(r)) => Ok(r),
            Reply::Snapshot(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self.call(Request::Vote(rpc), option.hard_ttl()).await? {
            Reply::Vote(Ok(r)) => Ok(r),
            Reply::Vote(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(unexpected(&other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_raft_instance_sends_nothing_not_even_without_a_cluster() {
        let mut slot = super::ClusterSlot::default();
        assert_eq!(
            slot.for_instance(0),
            Some(None),
            "a new rack calls as one in no cluster"
        );
        slot.cluster = Some(7);
        assert_eq!(slot.for_instance(0), Some(Some(7)));
        let next = slot.leave();
        assert_eq!(next, 1);
        assert_eq!(
            slot.for_instance(0),
            None,
            "the old instance's calls stay home"
        );
        assert_eq!(slot.for_instance(1), Some(None));
        slot.cluster = Some(9);
        assert_eq!(slot.for_instance(1), Some(Some(9)));
        assert_eq!(slot.for_instance(0), None);
    }

    #[test]
    fn appends_to_a_node_are_at_least_their_pace_apart() {
        let t0 = Instant::now();
        for every in [super::LEARNER_APPEND_EVERY, super::VOTER_APPEND_EVERY] {
            assert_eq!(super::append_wait(every, None, t0), Duration::ZERO);
            assert_eq!(super::append_wait(every, Some(t0), t0), every);
            let later = t0 + every / 5;
            assert_eq!(
                super::append_wait(every, Some(t0), later),
                every - every / 5
            );
            assert_eq!(
                super::append_wait(every, Some(t0), t0 + every * 3),
                Duration::ZERO
            );
        }
        assert!(super::VOTER_APPEND_EVERY < super::LEARNER_APPEND_EVERY);
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversize_is_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Request::Hello).await.unwrap();
        let mut r = futures::io::Cursor::new(buf);
        let back: Request = read_frame(&mut r).await.unwrap();
        assert!(matches!(back, Request::Hello));

        let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        let mut r = futures::io::Cursor::new(huge);
        let e = read_frame::<_, Request>(&mut r).await.unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");

        let mut garbage = 3u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"{{{");
        let mut r = futures::io::Cursor::new(garbage);
        assert!(matches!(
            read_frame::<_, Request>(&mut r).await,
            Err(NetError::Frame(_))
        ));
    }
}
