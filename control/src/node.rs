//! One rack's part of the control plane: the Raft node, the server for
//! inbound calls, cluster formation and growth, and (on the leader) the
//! placement loop.
//!
//! Cluster formation, growth, merge and shrink are decided by
//! [`crate::formation::Formation`] (sans-IO); this module only gathers its
//! observations, asks the peers it names and carries out its actions.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mesh::MeshHandle;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, Raft, ServerState, SnapshotPolicy};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use util::time::unix_ms;

use crate::election::ElectionTimer;
use crate::field::{Carried, Command, FieldState, Response};
use crate::formation::{
    election_gate, Action, Admitted, Answers, Asks, Formation, FormationSettings, Hello,
    Membership, MeshView, Observation, PeerSeen, RaftView, Removal, Route, Wait, CHECK_EVERY,
    HELLO_TIMEOUT, MEMBERSHIP_CHANGE_TIMEOUT, PREVOTE_MIN_TIMEOUT,
};
use crate::lease::{LeaseConfig, LeaseWatch};
use crate::net::{
    read_frame, write_frame, Net, NetworkFactory, ProposeReply, Reply, Request, RAFT_PROTOCOL,
};
use crate::placement::{self, plan, RackView};
use crate::store::{open_db, Applies, LogStore, StateMachine};
use crate::view::{self, FieldView, PeerFacts, ViewInputs, ViewTiming};
use crate::{node_id, NodeId, RackNode, TypeConfig};

/// How the control plane runs (`[control]` in rack.toml).
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// Where its sled database lives.
    pub dir: std::path::PathBuf,
    /// This rack's name.
    pub rack: String,
    /// Lease timings.
    pub lease: LeaseConfig,
    /// How often the leader sends heartbeats (this control plane sends
    /// them itself, see [`crate::election`]).
    pub heartbeat: Duration,
    /// Election timeout: a follower stands after the leader lease or this,
    /// whichever is longer, plus a random part of up to this
    /// ([`crate::election::ElectionTimer`]).
    pub election_timeout: Duration,
    /// Longest a Raft call may take (openraft's `heartbeat_interval`, the
    /// timeout of every append); also the leader lease during which voters
    /// refuse candidates, and the ceiling of every per-peer call timeout
    /// ([`crate::net::timeouts`]).
    pub rpc_timeout: Duration,
    /// Wait this long after start before forming a new cluster.
    pub settle: Duration,
    /// How often the leader re-plans.
    pub plan_every: Duration,
    /// The leader takes a voter dead this long out of the cluster (added
    /// back by growth when it returns); `None`: never. Revoked racks go at
    /// once.
    pub remove_dead_after: Option<Duration>,
}

impl ControlSettings {
    /// The timings formation decides with.
    #[must_use]
    pub fn formation(&self) -> FormationSettings {
        FormationSettings {
            settle: self.settle,
            heartbeat: self.heartbeat,
            remove_dead_after: self.remove_dead_after,
        }
    }

    /// Defaults for a rack named `rack` with its state under `dir`.
    #[must_use]
    pub fn new(dir: std::path::PathBuf, rack: &str) -> Self {
        Self {
            dir,
            rack: rack.to_owned(),
            lease: LeaseConfig::default(),
            heartbeat: Duration::from_millis(250),
            election_timeout: Duration::from_millis(1500),
            rpc_timeout: Duration::from_millis(3000),
            settle: Duration::from_secs(2),
            plan_every: Duration::from_millis(500),
            remove_dead_after: Some(Duration::from_secs(600)),
        }
    }
}

/// What the control plane did that operators want in the event log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlEvent {
    /// This rack left its cluster to join one that won (they formed apart).
    LeftCluster {
        /// Voters of the cluster it left.
        our_voters: usize,
        /// Voters of the cluster it joins.
        their_voters: usize,
        /// Appliances it carries over.
        carried: Vec<String>,
    },
    /// Appliances carried from a merged cluster were adopted.
    Adopted {
        /// Their names.
        names: Vec<String>,
    },
    /// The leader took a rack out of the voters.
    VoterRemoved {
        /// The rack.
        rack: String,
        /// Why (dead for how long, or revoked).
        why: String,
    },
    /// A revoked rack's report was forgotten.
    RackForgotten {
        /// The rack.
        rack: String,
    },
}

impl ControlEvent {
    /// The event's kind in the agent's event log.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            ControlEvent::LeftCluster { .. } => "control_left_cluster",
            ControlEvent::Adopted { .. } => "control_adopted",
            ControlEvent::VoterRemoved { .. } => "control_voter_removed",
            ControlEvent::RackForgotten { .. } => "control_rack_forgotten",
        }
    }
}

/// A relayed call's timeout on the relay, before anything is measured of
/// the target (a relay's caller bounds the whole call anyway).
const RELAY_TIMEOUT: Duration = Duration::from_secs(2);

/// Control events buffered for slow subscribers.
const EVENT_QUEUE: usize = 64;

/// Why a control-plane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The database could not be opened or used.
    #[error("control store")]
    Store(#[from] crate::store::OpenError),
    /// Raft refused to start.
    #[error("raft: {0}")]
    Raft(String),
    /// No leader could be reached in time (no quorum on this side?).
    #[error(
        "no control-plane leader reachable within {0:?} (is a majority of racks up and reachable?)"
    )]
    NoLeader(Duration),
    /// The command was committed but refused by the state machine.
    #[error(transparent)]
    Refused(#[from] crate::field::Refusal),
}

/// What `status` shows of the control plane.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ControlStatus {
    /// This rack's Raft node id.
    pub node_id: NodeId,
    /// Whether this rack is in a cluster.
    pub initialized: bool,
    /// `leader`, `follower`, `candidate` or `learner`.
    pub role: String,
    /// The leader's rack name, if known.
    pub leader: Option<String>,
    /// Current term.
    pub term: u64,
    /// Voting racks (names).
    pub voters: Vec<String>,
    /// Last applied log index.
    pub applied: Option<u64>,
    /// A majority of voters answered this rack within one lease (a
    /// command it proposed, such as its lease renewal, committed). After a
    /// restart `leader` names the leader remembered from before until
    /// the field answers: only this says a majority is reachable.
    #[serde(default)]
    pub majority: bool,
}

/// The running control plane of one rack.
pub struct Control {
    /// The Raft node; replaced when this rack leaves its cluster to join
    /// another (see [`Control::leave`]).
    raft: std::sync::RwLock<Raft<TypeConfig>>,
    db: sled::Db,
    config: Arc<Config>,
    /// Where the state machine publishes the applied state (kept across a
    /// reset, so watchers keep watching).
    state_tx: watch::Sender<Arc<FieldState>>,
    /// Appliances this rack brought from a cluster it left, to deploy in the
    /// one it joined.
    carried: Mutex<Vec<Carried>>,
    /// Formation's state (who may vote): what the membership loop
    /// remembers between checks.
    formation: Mutex<Formation>,
    events: tokio::sync::broadcast::Sender<ControlEvent>,
    id: NodeId,
    settings: ControlSettings,
    net: Arc<Net>,
    mesh: MeshHandle,
    applies: Applies,
    started: Instant,
    down_since: Mutex<HashMap<String, u64>>,
    /// When a command this rack proposed last committed: proof that a
    /// majority of voters answered (a remembered leader is not).
    committed_at: Mutex<Option<Instant>>,
    /// The pre-vote's last verdict (logged when it changes).
    elect_enabled: std::sync::atomic::AtomicBool,
    /// When this rack last heard a leader (an append accepted), or led.
    last_append: Mutex<Instant>,
    /// When this rack may stand for election next.
    election: Mutex<ElectionTimer>,
}

/// How writing a command through this rack's Raft node ended, short of
/// being applied.
enum WriteError {
    /// Not the leader; this one may be.
    NotLeader(Option<NodeId>),
    /// Failed (the reason as Raft gave it).
    Failed(String),
}

/// Most entries in one append: a renewal carries its rack's report (about
/// a kilobyte), and a 2 Mbit/s satellite hop must carry a whole append well
/// within the Raft call timeout (64 KB: a quarter of a second).
const MAX_PAYLOAD_ENTRIES: u64 = 64;

/// Snapshot chunk size: one chunk crosses a 2 Mbit/s hop in about a
/// second, well within `install_snapshot_timeout`.
const SNAPSHOT_CHUNK: u64 = 256 << 10;

impl Control {
    /// Open the store, start Raft and the loops; they stop on `cancel`
    /// (then call [`Control::shutdown`]).
    ///
    /// # Errors
    /// [`ControlError`] if the store cannot be opened or Raft cannot start.
    pub async fn start(
        settings: ControlSettings,
        mesh: MeshHandle,
        local_peer: PeerId,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, ControlError> {
        settings.lease.validate().map_err(ControlError::Raft)?;
        let db = open_db(&settings.dir)?;
        let log = LogStore::new(&db).map_err(|e| ControlError::Store(e.into()))?;
        let now = Instant::now();
        let (state_tx, _) = watch::channel(Arc::new(FieldState::default()));
        let leases = Arc::new(Mutex::new(LeaseWatch::new(settings.lease, now)));
        let (sm, applies) = StateMachine::open(&db, leases, log.receipts(), state_tx.clone())?;
        // openraft's heartbeat_interval is the timeout of every append:
        // the Raft call timeout. Its own heartbeats and elections are off
        // (see crate::election); its election timeouts only set the leader
        // lease (election_timeout_max) during which voters refuse
        // candidates, just above the call timeout (it must exceed it).
        let rpc = u64::try_from(settings.rpc_timeout.as_millis()).unwrap_or(u64::MAX / 4);
        let config = Config {
            cluster_name: "fieldrack".into(),
            heartbeat_interval: rpc,
            election_timeout_min: rpc + 1,
            election_timeout_max: rpc + 2,
            enable_heartbeat: false,
            enable_elect: false,
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(2000),
            max_in_snapshot_log_to_keep: 500,
            install_snapshot_timeout: 5000,
            ..Config::default()
        }
        .validate()
        .map_err(|e| ControlError::Raft(e.to_string()))?;
        let config = Arc::new(config);
        let net = Arc::new(Net::new(mesh.clone(), settings.rpc_timeout));
        net.set_cluster(crate::store::stored_cluster(&db)?);
        let election = ElectionTimer::new(
            Duration::from_millis(config.election_timeout_max) + settings.heartbeat,
            settings.election_timeout,
            rand::random(),
        );
        let id = node_id(&local_peer);
        let raft = Raft::new(
            id,
            config.clone(),
            NetworkFactory {
                net: net.clone(),
                instance: net.instance(),
            },
            log,
            sm,
        )
        .await
        .map_err(|e| ControlError::Raft(e.to_string()))?;
        let me = Arc::new(Self {
            raft: std::sync::RwLock::new(raft),
            db,
            config,
            state_tx,
            carried: Mutex::default(),
            formation: Mutex::new(Formation::new(
                id,
                RackNode {
                    rack: settings.rack.clone(),
                    peer_id: local_peer.to_base58(),
                },
                settings.formation(),
                now,
            )),
            events: tokio::sync::broadcast::channel(EVENT_QUEUE).0,
            id,
            settings,
            net,
            mesh: mesh.clone(),
            applies,
            started: now,
            down_since: Mutex::default(),
            committed_at: Mutex::default(),
            elect_enabled: std::sync::atomic::AtomicBool::new(true),
            last_append: Mutex::new(now),
            election: Mutex::new(election),
        });
        let streams = mesh
            .accept_streams(RAFT_PROTOCOL)
            .map_err(|e| ControlError::Raft(e.to_string()))?;
        tokio::spawn(me.clone().serve(streams, cancel.clone()));
        tokio::spawn(me.clone().membership_loop(cancel.clone()));
        tokio::spawn(me.clone().placement_loop(cancel.clone()));
        tokio::spawn(me.clone().heartbeat_loop(cancel.clone()));
        tokio::spawn(me.clone().election_guard_loop(cancel));
        Ok(me)
    }

    /// Membership changes, merges and adoptions, as they happen.
    #[must_use]
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<ControlEvent> {
        self.events.subscribe()
    }

    fn event(&self, ev: ControlEvent) {
        let _ = self.events.send(ev);
    }

    /// The current Raft node.
    fn raft(&self) -> Raft<TypeConfig> {
        self.raft.read().expect("raft lock").clone()
    }

    /// Why this rack's Raft core is dead, if it is: it panicked or its
    /// storage failed (a normal stop, at shutdown or while leaving a
    /// cluster, is not a failure). A rack in that state takes no part in
    /// the control plane until its agent restarts: the systemd watchdog is
    /// no longer fed ([`Control::core_failure`] is its health check), and
    /// the membership loop logs it.
    #[must_use]
    pub fn core_failure(&self) -> Option<String> {
        let raft = self.raft();
        let m = raft.metrics();
        let state = m.borrow().running_state.clone();
        match state {
            Ok(()) | Err(openraft::error::Fatal::Stopped) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Stop Raft.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft().shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }

    /// This rack's node id.
    #[must_use]
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The applied field state (this rack's copy; may lag the leader's).
    #[must_use]
    pub fn state(&self) -> watch::Receiver<Arc<FieldState>> {
        self.applies.state.clone()
    }

    /// What applying the log taught about other racks' leases.
    #[must_use]
    pub fn leases(&self) -> Arc<Mutex<LeaseWatch>> {
        self.applies.leases.clone()
    }

    /// Lease timings.
    #[must_use]
    pub fn lease_config(&self) -> LeaseConfig {
        self.settings.lease
    }

    /// The term this rack leads in, if it leads right now.
    fn leader_term(&self) -> Option<u64> {
        let m = self.raft().metrics();
        let m = m.borrow();
        (m.state == ServerState::Leader && m.current_leader == Some(self.id))
            .then_some(m.current_term)
    }

    /// Whether this rack leads right now.
    #[must_use]
    pub fn is_leader(&self) -> bool {
        self.leader_term().is_some()
    }

    /// Status for `fieldrack status`.
    #[must_use]
    pub fn status(&self) -> ControlStatus {
        let m = self.raft().metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let name = |id: &NodeId| {
            membership
                .get_node(id)
                .map_or_else(|| id.to_string(), |n| n.rack.clone())
        };
        let voters: Vec<String> = membership.voter_ids().map(|id| name(&id)).collect();
        ControlStatus {
            node_id: self.id,
            initialized: !voters.is_empty(),
            role: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .into(),
            leader: m.current_leader.as_ref().map(name),
            term: m.current_term,
            voters,
            applied: m.last_applied.map(|l| l.index),
            majority: self.committed_within(self.lease_config().lease),
        }
    }

    fn leader_peer(&self, leader: NodeId) -> Option<PeerId> {
        let m = self.raft().metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .get_node(&leader)
            .and_then(|n| n.peer_id.parse().ok())
    }

    /// Whether a command this rack proposed committed within `within`.
    #[must_use]
    pub fn committed_within(&self, within: Duration) -> bool {
        self.committed_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() <= within)
    }

    fn note_commit(&self) {
        *self
            .committed_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
    }

    /// Commit `cmd` through this rack's Raft node, if it leads.
    async fn write(&self, cmd: Command) -> Result<Response, WriteError> {
        match self.raft().client_write(cmd).await {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(WriteError::NotLeader(f.leader_id))
            }
            Err(e) => Err(WriteError::Failed(e.to_string())),
        }
    }

    /// Commit `cmd` through the leader (forwarding to it if need be) and
    /// return what applying it said.
    ///
    /// # Errors
    /// [`ControlError::NoLeader`] if no leader answers within `timeout`;
    /// [`ControlError::Refused`] if the state machine refused the command.
    pub async fn propose(&self, cmd: Command, timeout: Duration) -> Result<Response, ControlError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ControlError::NoLeader(timeout));
            }
            let leader = match tokio::time::timeout(left, self.write(cmd.clone())).await {
                Err(_) => return Err(ControlError::NoLeader(timeout)),
                Ok(Ok(r)) => {
                    self.note_commit();
                    return refused(r);
                }
                Ok(Err(WriteError::NotLeader(l))) => l,
                Ok(Err(WriteError::Failed(e))) => return Err(ControlError::Raft(e)),
            };
            if let Some(peer) = leader
                .filter(|l| *l != self.id)
                .and_then(|l| self.leader_peer(l))
            {
                match self
                    .net
                    .call(
                        peer,
                        &Request::Propose(cmd.clone()),
                        left.min(self.settings.rpc_timeout.max(Duration::from_secs(3))),
                    )
                    .await
                {
                    Ok(Reply::Propose(ProposeReply::Applied(r))) => {
                        self.note_commit();
                        return refused(r);
                    }
                    Ok(Reply::Propose(ProposeReply::Failed(e))) => {
                        return Err(ControlError::Raft(e))
                    }
                    Ok(_) | Err(_) => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(100).min(left)).await;
        }
    }

    async fn serve(self: Arc<Self>, mut streams: mesh::AdmittedStreams, cancel: CancellationToken) {
        let inflight = Arc::new(tokio::sync::Semaphore::new(64));
        loop {
            let (peer, mut stream) = tokio::select! {
                _ = cancel.cancelled() => return,
                s = streams.next() => match s { Some(s) => s, None => return },
            };
            let Ok(permit) = inflight.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many raft calls in flight; dropping one");
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let req: Request =
                    match tokio::time::timeout(Duration::from_secs(10), read_frame(&mut stream))
                        .await
                    {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "bad raft call");
                            return;
                        }
                        Err(_) => return,
                    };
                let reply = me.handle(req).await;
                let _ = write_frame(&mut stream, &reply).await;
                let _ = futures::AsyncWriteExt::close(&mut stream).await;
            });
        }
    }

    async fn handle(&self, req: Request) -> Reply {
        match req {
            Request::Append(r) => {
                if let Some(why) = self.foreign(r.vote.leader_id().voted_for()) {
                    return Reply::Error(why);
                }
                let reply = self.raft().append_entries(r).await;
                if reply.as_ref().is_ok_and(|r| {
                    !matches!(r, openraft::raft::AppendEntriesResponse::HigherVote(_))
                }) {
                    *self.last_append.lock().expect("last_append lock") = Instant::now();
                }
                Reply::Append(reply)
            }
            Request::Vote(r) => match self.foreign(r.vote.leader_id().voted_for()) {
                Some(why) => Reply::Error(why),
                None => Reply::Vote(self.raft().vote(r).await),
            },
            Request::Snapshot(r) => match self.foreign(r.vote.leader_id().voted_for()) {
                Some(why) => Reply::Error(why),
                None => Reply::Snapshot(self.raft().install_snapshot(r).await),
            },
            Request::Propose(cmd) => Reply::Propose(match self.write(cmd).await {
                Ok(r) => ProposeReply::Applied(r),
                Err(WriteError::NotLeader(l)) => ProposeReply::NotLeader(l),
                Err(WriteError::Failed(e)) => ProposeReply::Failed(e),
            }),
            Request::Hello => Reply::Hello {
                node_id: self.id,
                initialized: self.raft().is_initialized().await.unwrap_or(false),
                leader: self.raft().current_leader().await,
                voters: self.voters().into_iter().collect(),
                last_log: self.last_log_id().await,
                cluster: self.net.cluster(),
            },
            Request::Relay { to, request } => {
                if matches!(*request, Request::Relay { .. }) {
                    return Reply::Error("relays are one hop".into());
                }
                match to.parse::<PeerId>() {
                    Ok(p) => match self
                        .net
                        .direct(p, &request, self.net.timeout_for(&p, RELAY_TIMEOUT))
                        .await
                    {
                        Ok(r) => r,
                        Err(e) => Reply::Error(format!("relay to {to}: {e}")),
                    },
                    Err(e) => Reply::Error(format!("relay target {to:?}: {e}")),
                }
            }
            Request::InCluster { cluster, request } => {
                if !matches!(
                    *request,
                    Request::Append(_) | Request::Vote(_) | Request::Snapshot(_)
                ) {
                    return Reply::Error("only Raft calls carry a cluster".into());
                }
                if let Some(why) = self.other_cluster(cluster).await {
                    return Reply::Error(why);
                }
                let reply = Box::pin(self.handle(*request)).await;
                let accepted = match &reply {
                    Reply::Append(Ok(r)) => {
                        !matches!(r, openraft::raft::AppendEntriesResponse::HigherVote(_))
                    }
                    Reply::Snapshot(Ok(_)) => true,
                    _ => false,
                };
                if accepted && self.net.cluster() != Some(cluster) {
                    self.join_cluster(cluster);
                }
                reply
            }
        }
    }

    /// Why a Raft call from control-plane cluster `theirs` is refused, if
    /// it is: this rack is in another one. A rack no cluster has taken in
    /// yet (no membership, nothing in its log) may be taken in by any: the
    /// formation's refusal ([`Formation::refusal`]) still keeps it from
    /// switching between two leaders adding it at once.
    async fn other_cluster(&self, theirs: u64) -> Option<String> {
        let ours = self.net.cluster()?;
        if ours == theirs
            || (self.membership().voters.is_empty() && self.last_log_id().await.is_none())
        {
            return None;
        }
        Some(format!(
            "a call from control-plane cluster {theirs:016x}; this rack is in {ours:016x}"
        ))
    }

    /// This rack was taken into cluster `id`: recorded durably (a restart
    /// keeps refusing other clusters) before it is used.
    fn join_cluster(&self, id: u64) {
        match crate::store::store_cluster(&self.db, id) {
            Ok(()) => {
                tracing::info!(cluster = %format!("{id:016x}"), "in control-plane cluster");
                self.net.set_cluster(Some(id));
            }
            Err(e) => tracing::warn!(error = %e, "recording the control-plane cluster"),
        }
    }

    /// The membership loop: every [`CHECK_EVERY`], one formation check.
    async fn membership_loop(self: Arc<Self>, cancel: CancellationToken) {
        let mut failure_logged = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            if let Some(why) = self.core_failure() {
                if !failure_logged {
                    tracing::error!(
                        %why,
                        "the control plane's Raft core stopped: this rack takes no part in it until the agent restarts (systemd's watchdog restarts it)"
                    );
                    failure_logged = true;
                }
                continue;
            }
            self.formation_check().await;
        }
    }

    /// Observe, ask the peers formation names, let it decide, carry its
    /// actions out (see [`crate::formation`] for the rules).
    async fn formation_check(&self) {
        let Some((obs, peers)) = self.observe().await else {
            return;
        };
        self.net.set_voters(&obs.raft.membership.voters);
        let asks = self.formation().asks(&obs);
        let answers = self.hellos(asks, &peers).await;
        let actions = self.formation().decide(&obs, &answers);
        for action in actions {
            self.perform(action, &answers).await;
        }
    }

    fn formation(&self) -> std::sync::MutexGuard<'_, Formation> {
        self.formation.lock().expect("formation lock")
    }

    /// What formation decides from, with the PeerIds of the node ids it
    /// may name. `None` when this rack is in a cluster but the mesh did not
    /// answer: skip this check.
    async fn observe(&self) -> Option<(Observation, HashMap<NodeId, PeerId>)> {
        let initialized = self.raft().is_initialized().await.unwrap_or(false);
        let status = match self.mesh.status().await {
            Ok(s) => Some(s),
            Err(_) if initialized => return None,
            Err(_) => None,
        };
        let mut peers: HashMap<NodeId, PeerId> = HashMap::new();
        let admitted = self
            .mesh
            .admitted()
            .into_iter()
            .map(|(p, rack)| {
                let id = node_id(&p);
                peers.insert(id, p);
                Admitted { id, rack }
            })
            .collect();
        // Node ids to PeerIds also while in no cluster: a rack that left one
        // asks the voters it left, which it may reach only through a relay.
        if let Some(s) = &status {
            peers.extend(s.peers.iter().map(|p| (node_id(&p.peer_id), p.peer_id)));
        }
        let mesh = status.filter(|_| initialized).map(|s| MeshView {
            peers: s
                .peers
                .iter()
                .map(|p| PeerSeen {
                    id: node_id(&p.peer_id),
                    peer_id: p.peer_id.to_base58(),
                    rack: p.rack.clone(),
                    site: p.meta.as_ref().map(|m| m.site.clone()),
                    state: p.state,
                })
                .collect(),
            revoked: s
                .revoked_peers
                .iter()
                .map(|(p, rack)| (p.to_base58(), rack.clone()))
                .collect(),
        });
        let obs = Observation {
            now: Instant::now(),
            raft: RaftView {
                initialized,
                leader: self.is_leader(),
                last_append: *self.last_append.lock().expect("last_append lock"),
                membership: self.membership(),
                cluster: self.net.cluster(),
            },
            admitted,
            mesh,
            reported: self.applies.state.borrow().racks.keys().cloned().collect(),
        };
        Some((obs, peers))
    }

    /// This rack's Raft membership.
    fn membership(&self) -> Membership {
        let m = self.raft().metrics();
        let m = m.borrow();
        let mem = m.membership_config.membership();
        Membership {
            voters: mem.voter_ids().collect(),
            nodes: mem.nodes().map(|(id, n)| (*id, n.clone())).collect(),
        }
    }

    /// Ask `Hello` of the peers formation named, all at once, each within
    /// [`HELLO_TIMEOUT`]; the silent ones are absent from the answers.
    async fn hellos(&self, asks: Asks, peers: &HashMap<NodeId, PeerId>) -> Answers {
        let calls = asks
            .iter()
            .filter_map(|(id, route)| Some((*id, *route, *peers.get(id)?)))
            .map(|(id, route, peer)| async move {
                let timeout = self.net.timeout_for(&peer, HELLO_TIMEOUT);
                let reply = match route {
                    Route::Direct => self.net.direct(peer, &Request::Hello, timeout).await,
                    Route::AnyPath => self.net.call(peer, &Request::Hello, timeout).await,
                };
                match reply {
                    Ok(Reply::Hello {
                        initialized,
                        voters,
                        cluster,
                        ..
                    }) => Some((
                        id,
                        Hello {
                            initialized,
                            voters: voters.into_iter().collect(),
                            cluster,
                        },
                    )),
                    Ok(_) => None,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "no answer to hello");
                        None
                    }
                }
            });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Form a new cluster of `voters`, under a new cluster id. The id is
    /// recorded only once Raft took the membership: if a leader's append
    /// made this rack a member meanwhile, `initialize` refuses and the id
    /// adopted from that leader stays.
    async fn new_cluster(
        &self,
        voters: std::collections::BTreeMap<NodeId, RackNode>,
    ) -> Result<(), String> {
        self.raft()
            .initialize(voters)
            .await
            .map_err(|e| e.to_string())?;
        self.join_cluster(rand::random::<u64>().max(1));
        Ok(())
    }

    /// Carry out one formation action.
    async fn perform(&self, action: Action, answers: &Answers) {
        match action {
            Action::Wait(Wait::ClusterExists { rack }) => {
                tracing::info!(%rack, "a cluster exists; waiting to be added to it");
            }
            Action::Wait(Wait::NoAnswer { rack }) => {
                tracing::debug!(%rack, "no answer before forming a cluster");
            }
            Action::Wait(Wait::Settling | Wait::NotLowest) => {}
            Action::Bootstrap { voters } => match self.new_cluster(voters).await {
                Ok(()) => tracing::info!("formed a new control-plane cluster"),
                Err(e) => tracing::debug!(error = %e, "initialize"),
            },
            Action::Leave {
                our_voters,
                their_voters,
            } => {
                tracing::warn!(
                    our_voters,
                    their_voters,
                    "met a control-plane cluster that wins over ours (more voters of its own, or the lowest node id); leaving ours to join it"
                );
                let carried: Vec<String> =
                    self.applies.state.borrow().apps.keys().cloned().collect();
                match self.leave().await {
                    Ok(()) => self.event(ControlEvent::LeftCluster {
                        our_voters,
                        their_voters,
                        carried,
                    }),
                    Err(e) => {
                        tracing::error!(error = %e, "leaving the control-plane cluster failed");
                    }
                }
            }
            Action::AdoptCarried => self.deploy_carried().await,
            Action::AddLearner { id, node } => {
                let rack = node.rack.clone();
                let raft = self.raft();
                let add = raft.add_learner(id, node, true);
                match tokio::time::timeout(MEMBERSHIP_CHANGE_TIMEOUT, add).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(%rack, error = %e, "adding a learner");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%rack, "adding a learner timed out");
                        return;
                    }
                }
                // Promote it now, unless a fresh look says otherwise (it
                // was revoked while it caught up).
                let Some((obs, _)) = self.observe().await else {
                    return;
                };
                let next = self.formation().grow(&obs, answers);
                if let Some(Action::Promote { id, rack }) = next {
                    self.promote(id, &rack).await;
                }
            }
            Action::Promote { id, rack } => self.promote(id, &rack).await,
            Action::ForgetRack { rack } => {
                let cmd = Command::ForgetRack { rack: rack.clone() };
                match self.raft().client_write(cmd).await {
                    Ok(_) => {
                        tracing::warn!(%rack, "forgot a revoked rack");
                        self.event(ControlEvent::RackForgotten { rack });
                    }
                    Err(e) => tracing::warn!(%rack, error = %e, "forgetting a revoked rack"),
                }
            }
            Action::Remove {
                id,
                node,
                voter,
                why,
                forget,
            } => self.remove(id, &node, voter, why, forget).await,
        }
    }

    /// Make member `id` a voter.
    async fn promote(&self, id: NodeId, rack: &str) {
        let raft = self.raft();
        let change =
            raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false);
        match tokio::time::timeout(MEMBERSHIP_CHANGE_TIMEOUT, change).await {
            Ok(Ok(_)) => tracing::info!(%rack, "joined the control plane as a voter"),
            Ok(Err(e)) => tracing::warn!(%rack, error = %e, "promoting to voter"),
            Err(_) => tracing::warn!(%rack, "promoting to voter timed out"),
        }
    }

    /// Take member `id` out of the cluster (out of the voters first), then
    /// forget its report if `forget`.
    async fn remove(&self, id: NodeId, node: &RackNode, voter: bool, why: Removal, forget: bool) {
        let mut changes = vec![ChangeMembers::RemoveNodes(BTreeSet::from([id]))];
        if voter {
            changes.insert(0, ChangeMembers::RemoveVoters(BTreeSet::from([id])));
        }
        for change in changes {
            let raft = self.raft();
            let change = raft.change_membership(change, false);
            match tokio::time::timeout(MEMBERSHIP_CHANGE_TIMEOUT, change).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(rack = %node.rack, error = %e, "removing from the control plane");
                    return;
                }
                Err(_) => {
                    tracing::warn!(rack = %node.rack, "removing from the control plane timed out");
                    return;
                }
            }
        }
        let why = why.to_string();
        tracing::warn!(rack = %node.rack, %why, "removed from the control plane");
        self.event(ControlEvent::VoterRemoved {
            rack: node.rack.clone(),
            why,
        });
        self.formation().removed(id);
        if forget {
            let cmd = Command::ForgetRack {
                rack: node.rack.clone(),
            };
            match self.raft().client_write(cmd).await {
                Ok(_) => self.event(ControlEvent::RackForgotten {
                    rack: node.rack.clone(),
                }),
                Err(e) => {
                    tracing::warn!(rack = %node.rack, error = %e, "forgetting a revoked rack");
                }
            }
        }
    }

    /// This cluster's voters (empty when in none).
    fn voters(&self) -> BTreeSet<NodeId> {
        self.membership().voters
    }

    /// Why a Raft call from `from` (a leader or candidate) is refused (see
    /// [`Formation::refusal`]).
    fn foreign(&self, from: Option<NodeId>) -> Option<String> {
        let membership = self.membership();
        self.formation()
            .refusal(from, &membership, Instant::now())
            .map(|r| r.to_string())
    }

    /// Forget this rack's cluster: keep its appliances' definitions to
    /// carry over, stop Raft, start an empty node on a new incarnation of
    /// the store (fresh trees; the old ones are dropped at the next start).
    async fn leave(&self) -> Result<(), ControlError> {
        let specs: Vec<Carried> = self
            .applies
            .state
            .borrow()
            .apps
            .values()
            .map(|a| Carried {
                spec: a.spec.clone(),
                epoch: a.epoch,
                running: a.running,
                owner: a.owner.clone(),
            })
            .collect();
        self.carried.lock().expect("carried lock").extend(specs);
        let old = self.raft();
        if let Err(e) = old.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        crate::store::leave_incarnation(&self.db).map_err(|e| ControlError::Store(e.into()))?;
        let instance = self.net.leave_cluster();
        let log = LogStore::new(&self.db).map_err(|e| ControlError::Store(e.into()))?;
        let (sm, _) = StateMachine::open(
            &self.db,
            self.applies.leases.clone(),
            log.receipts(),
            self.state_tx.clone(),
        )?;
        let raft = Raft::new(
            self.id,
            self.config.clone(),
            NetworkFactory {
                net: self.net.clone(),
                instance,
            },
            log,
            sm,
        )
        .await
        .map_err(|e| ControlError::Raft(e.to_string()))?;
        *self.raft.write().expect("raft lock") = raft;
        // What the old cluster's log taught about leases means nothing in
        // the new one.
        *self.applies.leases.lock().expect("lease watch lock") =
            LeaseWatch::new(self.settings.lease, Instant::now());
        Ok(())
    }

    /// Once in the new cluster: deploy what this rack carried over from
    /// the cluster it left, except appliances the field already has under
    /// those names (kept for a retry while no leader answers).
    async fn deploy_carried(&self) {
        let specs = std::mem::take(&mut *self.carried.lock().expect("carried lock"));
        if specs.is_empty() {
            return;
        }
        let state = self.applies.state.borrow().clone();
        let new: Vec<Carried> = specs
            .into_iter()
            .filter(|c| !state.apps.contains_key(&c.spec.name))
            .collect();
        if new.is_empty() {
            return;
        }
        let names: Vec<String> = new.iter().map(|c| c.spec.name.clone()).collect();
        let deploy = Command::Adopt { apps: new.clone() };
        match self.propose(deploy, Duration::from_secs(5)).await {
            Ok(_) => {
                tracing::info!(?names, "deployed appliances carried from a merged cluster");
                self.event(ControlEvent::Adopted { names });
            }
            Err(ControlError::Refused(why)) => {
                tracing::warn!(?names, %why, "appliances carried from a merged cluster refused");
            }
            Err(e) => {
                tracing::debug!(?names, error = %e, "deploying carried appliances; will retry");
                self.carried.lock().expect("carried lock").extend(new);
            }
        }
    }

    /// Elections by hand (openraft's own are off, see
    /// [`crate::election`]): once the election timer is due, the pre-vote
    /// ([`crate::formation::election_gate`]: a follower may stand only if it
    /// reaches a majority and none of those follows a leader it reaches),
    /// then the election itself.
    async fn guard_elections(&self) {
        let now = Instant::now();
        if self.is_leader() {
            *self.last_append.lock().expect("last_append lock") = now;
            return;
        }
        let heard = *self.last_append.lock().expect("last_append lock");
        if !self.election.lock().expect("election lock").due(now, heard) {
            return;
        }
        let voters: Vec<(NodeId, RackNode)> = {
            let m = self.raft().metrics();
            let m = m.borrow();
            let mem = m.membership_config.membership();
            mem.voter_ids()
                .filter_map(|id| mem.get_node(&id).map(|n| (id, n.clone())))
                .collect()
        };
        if !voters.iter().any(|(id, _)| *id == self.id) {
            return;
        }
        let floor = self.settings.heartbeat.max(PREVOTE_MIN_TIMEOUT);
        let mine = self.last_log_id().await;
        let pings = voters
            .iter()
            .filter(|(id, _)| *id != self.id)
            .filter_map(|(id, n)| Some((*id, n.peer_id.parse::<PeerId>().ok()?)))
            .map(|(id, peer)| async move {
                let timeout = self.net.timeout_for(&peer, floor);
                match self.net.call(peer, &Request::Hello, timeout).await {
                    // A voter that moved to another cluster since is not
                    // reached: it would not vote here.
                    Ok(Reply::Hello {
                        leader,
                        last_log,
                        cluster,
                        ..
                    }) if cluster.is_none() || cluster == self.net.cluster() => {
                        Some((id, leader, last_log > mine))
                    }
                    _ => None,
                }
            });
        let answers: Vec<(NodeId, Option<NodeId>, bool)> = futures::future::join_all(pings)
            .await
            .into_iter()
            .flatten()
            .collect();
        let gate = election_gate(self.id, voters.len(), &answers);
        self.log_gate(gate.elect, gate.reachable, gate.voters);
        // A leader heard while the pre-vote ran wins over its verdict.
        let heard_now = *self.last_append.lock().expect("last_append lock");
        if gate.elect && heard_now == heard {
            if let Err(e) = self.raft().trigger().elect().await {
                tracing::warn!(error = %e, "starting an election");
            }
        }
        self.election
            .lock()
            .expect("election lock")
            .tried(Instant::now(), rand::random());
    }

    /// The last entry of this rack's Raft log (what Raft's vote rule
    /// compares), `None` if it cannot be read.
    async fn last_log_id(&self) -> Option<openraft::LogId<NodeId>> {
        use openraft::storage::RaftLogStorage as _;
        let mut log = LogStore::new(&self.db).ok()?;
        log.get_log_state().await.ok()?.last_log_id
    }

    fn log_gate(&self, on: bool, reachable: usize, voters: usize) {
        if on
            != self
                .elect_enabled
                .swap(on, std::sync::atomic::Ordering::Relaxed)
        {
            if on {
                tracing::info!(reachable, voters, "elections enabled");
            } else {
                tracing::info!(
                    reachable,
                    voters,
                    "elections held: no majority reachable, or a live leader exists"
                );
            }
        }
    }

    /// The leader's heartbeats, every [`ControlSettings::heartbeat`]
    /// (openraft's own are off: its period is the call timeout). A
    /// follower's replication stream sends one call at a time, so over a
    /// slow link heartbeats go as fast as the link answers.
    async fn heartbeat_loop(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.settings.heartbeat) => {}
            }
            if self.is_leader() {
                if let Err(e) = self.raft().trigger().heartbeat().await {
                    tracing::debug!(error = %e, "heartbeat");
                }
            }
        }
    }

    /// The racks as placement sees them: up = alive in membership (or us)
    /// and renewing within one lease.
    /// The field as this rack sees it now: the one answer to which racks
    /// are up, admitted, revoked, renewing, dying, where, with what
    /// capacity (see [`crate::view`]). Works on every rack, leader or
    /// not; a rack that cannot reach the mesh actor sees only itself and
    /// the replicated state.
    pub async fn field_view(&self) -> FieldView {
        let state = self.applies.state.borrow().clone();
        self.view_of(&state).await
    }

    /// [`Self::field_view`] over a given applied state, remembering when
    /// each rack was first seen down.
    async fn view_of(&self, state: &FieldState) -> FieldView {
        let now = Instant::now();
        let (peers, revoked) = match self.mesh.status().await {
            Ok(s) => (
                s.peers
                    .into_iter()
                    .filter_map(|p| {
                        Some(PeerFacts {
                            rack: p.rack?,
                            state: p.state,
                            rtt_ms: p
                                .rtt
                                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                            meta: p.meta,
                        })
                    })
                    .collect(),
                s.revoked_peers.into_iter().map(|(_, r)| r).collect(),
            ),
            Err(_) => (Vec::new(), BTreeSet::new()),
        };
        let admitted = self.mesh.admitted().into_iter().map(|(_, r)| r).collect();
        let leases = self
            .applies
            .leases
            .lock()
            .expect("lease watch lock")
            .clone();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let renew_age_ms = state
            .racks
            .keys()
            .chain(peers.iter().map(|p: &PeerFacts| &p.rack))
            .chain(std::iter::once(&self.settings.rack))
            .filter_map(|r| Some((r.clone(), ms(leases.renew_age(r, now)?))))
            .collect();
        let lease = self.settings.lease;
        let mut down = self.down_since.lock().expect("down_since lock");
        let inputs = ViewInputs {
            local: self.settings.rack.clone(),
            reports: state.racks.clone(),
            peers,
            admitted,
            revoked,
            renew_age_ms,
            timing: ViewTiming {
                lease_ms: ms(lease.lease),
                fresh_ms: ms(lease.renew_every * 3),
            },
            young: self.started.elapsed() < lease.lease,
            down_since: down.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        };
        let view = view::compute(&inputs, unix_ms());
        down.clear();
        down.extend(
            view.racks
                .iter()
                .filter_map(|r| Some((r.name.clone(), r.down_since_ms?))),
        );
        view
    }

    async fn election_guard_loop(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.settings.heartbeat) => {}
            }
            self.guard_elections().await;
        }
    }

    async fn placement_loop(self: Arc<Self>, cancel: CancellationToken) {
        let mut state_rx = self.applies.state.clone();
        // At most half a lease: an owner that died with the old leader is
        // then failed over no later than its lease alone would allow.
        let settle = self.settings.lease.lease / 2;
        // The term this rack leads in, and since when: a new term, even
        // one this rack wins again, follows a time nobody could renew.
        let mut leading: Option<(u64, Instant)> = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.settings.plan_every) => {}
                _ = state_rx.changed() => {}
            }
            let Some(term) = self.leader_term() else {
                leading = None;
                continue;
            };
            if leading.is_none_or(|(t, _)| t != term) {
                leading = Some((term, Instant::now()));
            }
            let since = leading.map_or_else(Instant::now, |(_, at)| at);
            let state = self.applies.state.borrow().clone();
            let view = self.view_of(&state).await;
            let racks: Vec<(bool, bool)> = view
                .racks
                .iter()
                .filter(|r| {
                    state
                        .racks
                        .get(&r.name)
                        .is_some_and(|x| x.role == deploy::Role::Rack)
                })
                // Possibly alive: not known dead. A rack this leader has no
                // membership state of yet (it has just started) may well be.
                .map(|r| {
                    let maybe_alive = !r.revoked
                        && r.membership
                            .is_none_or(|m| m != mesh::membership::State::Dead);
                    (maybe_alive, r.up)
                })
                .collect();
            if !placement::settled_after_election(since.elapsed(), settle, &racks) {
                tracing::debug!(
                    "new leader: waiting for the reachable racks to renew before placing"
                );
                continue;
            }
            let views = rack_views(&state, view);
            for cmd in plan(&state, &views, unix_ms()) {
                if let Command::Assign {
                    name,
                    owner,
                    transfer,
                    ..
                } = &cmd
                {
                    tracing::info!(
                        appliance = %name,
                        to = owner.as_deref().unwrap_or("-"),
                        from = transfer.from.as_deref().unwrap_or("-"),
                        reason = %transfer.reason,
                        "placement"
                    );
                }
                match self.raft().client_write(cmd).await {
                    Ok(r) => {
                        if let Response::Refused(why) = r.data {
                            tracing::debug!(%why, "placement decision refused (stale)");
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "placement decision not committed");
                        break;
                    }
                }
            }
        }
    }
}

/// Placement's racks: those the replicated state holds a report of, up
/// or down by the field view's one rule.
fn rack_views(state: &FieldState, view: FieldView) -> Vec<RackView> {
    view.racks
        .into_iter()
        .filter(|r| state.racks.contains_key(&r.name))
        .map(|r| RackView {
            name: r.name,
            up: r.up,
            down_since_ms: r.down_since_ms,
        })
        .collect()
}

fn refused(r: Response) -> Result<Response, ControlError> {
    match r {
        Response::Refused(why) => Err(ControlError::Refused(why)),
        other => Ok(other),
    }
}
