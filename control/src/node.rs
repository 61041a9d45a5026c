//! One rack's part of the control plane: the Raft node, the server for
//! inbound calls, cluster formation and growth, and (on the leader) the
//! placement loop.
//!
//! Cluster formation: a rack whose Raft state is empty waits `settle`
//! after start, then asks every admitted peer whether it is in a cluster.
//! If none is, and its node id is the lowest among them, it initialises a
//! cluster of itself; the leader then adds every admitted rack and witness
//! as a voter. A rack that finds a cluster waits to be added.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mesh::membership::State;
use mesh::MeshHandle;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, Raft, ServerState, SnapshotPolicy};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use util::time::unix_ms;

use crate::field::{Carried, Command, FieldState, Response};
use crate::lease::{LeaseConfig, LeaseWatch};
use crate::net::{
    read_frame, write_frame, Net, NetworkFactory, ProposeReply, Reply, Request, RAFT_PROTOCOL,
};
use crate::placement::{plan, RackView};
use crate::store::{open_db, Applies, LogStore, StateMachine};
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
    /// Raft heartbeat.
    pub heartbeat: Duration,
    /// Raft election timeout (min; max is 2×).
    pub election_timeout: Duration,
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
    /// Defaults for a rack named `rack` with its state under `dir`.
    #[must_use]
    pub fn new(dir: std::path::PathBuf, rack: &str) -> Self {
        Self {
            dir,
            rack: rack.to_owned(),
            lease: LeaseConfig::default(),
            heartbeat: Duration::from_millis(250),
            election_timeout: Duration::from_millis(1500),
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
    /// Consecutive checks that saw a larger (winning) cluster.
    foreign_seen: Mutex<u32>,
    events: tokio::sync::broadcast::Sender<ControlEvent>,
    /// The voters of the cluster this rack left, refused until it is in
    /// the new one (its old leader would pull it back otherwise).
    left: Mutex<BTreeSet<NodeId>>,
    id: NodeId,
    settings: ControlSettings,
    net: Arc<Net>,
    mesh: MeshHandle,
    applies: Applies,
    started: Instant,
    down_since: Mutex<HashMap<String, u64>>,
    /// Since when the leader has seen each voter dead.
    voter_dead_since: Mutex<HashMap<NodeId, Instant>>,
    elect_enabled: std::sync::atomic::AtomicBool,
    last_append: Mutex<Instant>,
}

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
        let (sm, applies) = StateMachine::open(&db, leases, state_tx.clone())?;
        let et = settings.election_timeout.as_millis() as u64;
        let config = Config {
            cluster_name: "fieldrack".into(),
            heartbeat_interval: settings.heartbeat.as_millis() as u64,
            election_timeout_min: et,
            election_timeout_max: et * 2,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(2000),
            max_in_snapshot_log_to_keep: 500,
            install_snapshot_timeout: 5000,
            ..Config::default()
        }
        .validate()
        .map_err(|e| ControlError::Raft(e.to_string()))?;
        let config = Arc::new(config);
        let net = Arc::new(Net::new(mesh.clone()));
        let id = node_id(&local_peer);
        let raft = Raft::new(
            id,
            config.clone(),
            NetworkFactory { net: net.clone() },
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
            foreign_seen: Mutex::new(0),
            events: tokio::sync::broadcast::channel(EVENT_QUEUE).0,
            left: Mutex::default(),
            id,
            settings,
            net,
            mesh: mesh.clone(),
            applies,
            started: now,
            down_since: Mutex::default(),
            voter_dead_since: Mutex::default(),
            elect_enabled: std::sync::atomic::AtomicBool::new(true),
            last_append: Mutex::new(now),
        });
        let streams = mesh
            .accept_streams(RAFT_PROTOCOL)
            .map_err(|e| ControlError::Raft(e.to_string()))?;
        tokio::spawn(me.clone().serve(streams, cancel.clone()));
        tokio::spawn(me.clone().membership_loop(local_peer, cancel.clone()));
        tokio::spawn(me.clone().placement_loop(cancel.clone()));
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

    /// Whether this rack leads right now.
    #[must_use]
    pub fn is_leader(&self) -> bool {
        let m = self.raft().metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
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
            let raft = self.raft();
            let leader = match tokio::time::timeout(left, raft.client_write(cmd.clone())).await {
                Err(_) => return Err(ControlError::NoLeader(timeout)),
                Ok(Ok(r)) => return refused(r.data),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => f.leader_id,
                Ok(Err(e)) => return Err(ControlError::Raft(e.to_string())),
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
                        left.min(Duration::from_secs(3)),
                    )
                    .await
                {
                    Ok(Reply::Propose(ProposeReply::Applied(r))) => return refused(r),
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
            Request::Snapshot(r) => Reply::Snapshot(self.raft().install_snapshot(r).await),
            Request::Propose(cmd) => Reply::Propose(if self.is_leader() {
                match self.raft().client_write(cmd).await {
                    Ok(r) => ProposeReply::Applied(r.data),
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                        ProposeReply::NotLeader(f.leader_id)
                    }
                    Err(e) => ProposeReply::Failed(e.to_string()),
                }
            } else {
                ProposeReply::NotLeader(self.raft().current_leader().await)
            }),
            Request::Hello => Reply::Hello {
                node_id: self.id,
                initialized: self.raft().is_initialized().await.unwrap_or(false),
                leader: self.raft().current_leader().await,
                voters: self.voters().into_iter().collect(),
            },
            Request::Relay { to, request } => {
                if matches!(*request, Request::Relay { .. }) {
                    return Reply::Error("relays are one hop".into());
                }
                match to.parse::<PeerId>() {
                    Ok(p) => match self.net.direct(p, &request, Duration::from_secs(2)).await {
                        Ok(r) => r,
                        Err(e) => Reply::Error(format!("relay to {to}: {e}")),
                    },
                    Err(e) => Reply::Error(format!("relay target {to:?}: {e}")),
                }
            }
        }
    }

    /// Racks alive in the mesh's membership, with their names: (peer,
    /// rack). Not only the ones this rack is connected to: a rack that
    /// only reaches the field through another (one radio link) is reached
    /// through a relay.
    fn live_peers(status: &mesh::MeshStatus) -> Vec<(PeerId, String)> {
        let revoked: BTreeSet<PeerId> = status.revoked_peers.iter().map(|(p, _)| *p).collect();
        status
            .peers
            .iter()
            .filter(|p| p.state == State::Alive && !revoked.contains(&p.peer_id))
            .filter_map(|p| Some((p.peer_id, p.rack.clone()?)))
            .collect()
    }

    async fn membership_loop(self: Arc<Self>, local_peer: PeerId, cancel: CancellationToken) {
        let me = RackNode {
            rack: self.settings.rack.clone(),
            peer_id: local_peer.to_base58(),
        };
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            let initialized = self.raft().is_initialized().await.unwrap_or(false);
            if !initialized {
                if self.started.elapsed() >= self.settings.settle {
                    self.maybe_initialize(&me).await;
                }
                continue;
            }
            // One view of the mesh for this round's checks.
            let Ok(status) = self.mesh.status().await else {
                continue;
            };
            if self.merge(&status).await {
                continue;
            }
            self.left.lock().expect("left lock").clear();
            self.deploy_carried().await;
            if self.is_leader() {
                self.grow(&status).await;
                self.shrink(&status).await;
            }
        }
    }

    /// This cluster's voters (empty when in none).
    fn voters(&self) -> BTreeSet<NodeId> {
        let m = self.raft().metrics();
        let m = m.borrow();
        m.membership_config.membership().voter_ids().collect()
    }

    /// Why a Raft call from `from` (a leader or candidate) is refused: it is
    /// not in this rack's cluster. Two clusters that met (racks that formed
    /// their own while cut off) never mix their logs; one of them leaves.
    fn foreign(&self, from: Option<NodeId>) -> Option<String> {
        let from = from?;
        let m = self.raft().metrics();
        let m = m.borrow();
        let mem = m.membership_config.membership();
        if mem.voter_ids().next().is_none() {
            // In no cluster: anyone may add us, except the one we left.
            return self
                .left
                .lock()
                .expect("left lock")
                .contains(&from)
                .then(|| format!("node {from} is in the cluster this rack left"));
        }
        if mem.nodes().any(|(id, _)| *id == from) {
            return None;
        }
        Some(format!(
            "node {from} is not in this rack's control-plane cluster"
        ))
    }

    /// Two clusters met: racks cut off from each other at first boot each
    /// formed one. The larger (by voters; on a tie, the one holding the
    /// lowest node id) stays; every rack of the other leaves its cluster,
    /// forgetting its Raft state, and is added to the winner by its leader,
    /// carrying its appliances' definitions over (deployed there unless the
    /// winner has appliances of the same names). Its appliances stop when
    /// its cluster state empties; the winner places them again. Returns
    /// whether this rack left.
    async fn merge(&self, status: &mesh::MeshStatus) -> bool {
        let ours = self.voters();
        if ours.is_empty() {
            return false;
        }
        // Live racks outside our voters; and, while we have no leader, our
        // own voters too (the leader may have moved to another cluster,
        // leaving us behind). A healthy field asks nobody.
        let heard = Instant::now()
            .saturating_duration_since(*self.last_append.lock().expect("last_append lock"));
        let leaderless = !self.is_leader() && heard > self.settings.heartbeat * 3;
        let others: Vec<PeerId> = Self::live_peers(status)
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| node_id(p) != self.id && (leaderless || !ours.contains(&node_id(p))))
            .collect();
        let hellos = others.into_iter().map(|peer| async move {
            match self
                .net
                .call(peer, &Request::Hello, Duration::from_secs(1))
                .await
            {
                Ok(Reply::Hello { voters, .. }) => Some(voters),
                _ => None,
            }
        });
        let answers = futures::future::join_all(hellos).await;
        let mut winner: Option<BTreeSet<NodeId>> = None;
        for voters in answers.into_iter().flatten() {
            let theirs: BTreeSet<NodeId> = voters.into_iter().collect();
            // Another cluster: it is in none of ours and we are in none of
            // its. (Racks that already moved over sit in both lists: they
            // count for neither side.)
            if theirs.is_empty() || theirs.contains(&self.id) {
                continue;
            }
            if wins(&theirs, &ours) && winner.as_ref().is_none_or(|w| wins(&theirs, w)) {
                winner = Some(theirs);
            }
        }
        let seen = {
            let mut n = self.foreign_seen.lock().expect("foreign_seen lock");
            *n = if winner.is_some() { *n + 1 } else { 0 };
            *n
        };
        // Seen on several checks in a row (settle), not a passing view.
        let needed = (self.settings.settle.as_millis() / 500).max(2) as u32;
        let Some(winner) = winner.filter(|_| seen >= needed) else {
            return false;
        };
        tracing::warn!(
            our_voters = ours.len(),
            their_voters = winner.len(),
            "met a control-plane cluster that wins over ours (more voters of its own, or the lowest node id); leaving ours to join it"
        );
        let carried: Vec<String> = self.applies.state.borrow().apps.keys().cloned().collect();
        match self.leave().await {
            Ok(()) => self.event(ControlEvent::LeftCluster {
                our_voters: ours.len(),
                their_voters: winner.len(),
                carried,
            }),
            Err(e) => tracing::error!(error = %e, "leaving the control-plane cluster failed"),
        }
        true
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
        *self.left.lock().expect("left lock") = self.voters();
        let old = self.raft();
        if let Err(e) = old.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        crate::store::leave_incarnation(&self.db).map_err(|e| ControlError::Store(e.into()))?;
        let log = LogStore::new(&self.db).map_err(|e| ControlError::Store(e.into()))?;
        let (sm, _) =
            StateMachine::open(&self.db, self.applies.leases.clone(), self.state_tx.clone())?;
        let raft = Raft::new(
            self.id,
            self.config.clone(),
            NetworkFactory {
                net: self.net.clone(),
            },
            log,
            sm,
        )
        .await
        .map_err(|e| ControlError::Raft(e.to_string()))?;
        *self.raft.write().expect("raft lock") = raft;
        *self.foreign_seen.lock().expect("foreign_seen lock") = 0;
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

    /// Pre-vote by hand (openraft 0.9 has none): a rack that stops hearing
    /// from the leader may start elections only if it reaches a majority of
    /// the voters and none of those it reaches follows a leader that it
    /// reaches too. Otherwise every election it tried while cut off would
    /// raise its term, and on reconnecting that term would depose a healthy
    /// leader, leaving the field leaderless long enough for leases to lapse.
    async fn guard_elections(&self) {
        if self.is_leader() {
            self.set_elect(true, 0, 0);
            return;
        }
        let heard = Instant::now()
            .saturating_duration_since(*self.last_append.lock().expect("last_append lock"));
        if heard < self.settings.heartbeat * 3 {
            self.set_elect(true, 0, 0);
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
        if voters.is_empty() {
            return;
        }
        let timeout = self.settings.heartbeat.max(Duration::from_millis(400));
        let pings = voters
            .iter()
            .filter(|(id, _)| *id != self.id)
            .filter_map(|(id, n)| Some((*id, n.peer_id.parse::<PeerId>().ok()?)))
            .map(|(id, peer)| async move {
                match self.net.call(peer, &Request::Hello, timeout).await {
                    Ok(Reply::Hello { leader, .. }) => Some((id, leader)),
                    _ => None,
                }
            });
        let answers: Vec<(NodeId, Option<NodeId>)> = futures::future::join_all(pings)
            .await
            .into_iter()
            .flatten()
            .collect();
        let reachable: BTreeSet<NodeId> = answers.iter().map(|(id, _)| *id).collect();
        let leader_alive = answers
            .iter()
            .any(|(_, l)| l.is_some_and(|l| l != self.id && reachable.contains(&l)));
        let majority = (reachable.len() + 1) * 2 > voters.len();
        self.set_elect(majority && !leader_alive, reachable.len() + 1, voters.len());
    }

    fn set_elect(&self, on: bool, reachable: usize, voters: usize) {
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
        self.raft().runtime_config().elect(on);
    }

    async fn maybe_initialize(&self, me: &RackNode) {
        let peers = self.mesh.admitted();
        if peers.iter().any(|(p, _)| node_id(p) < self.id) {
            return; // the lowest id forms the cluster
        }
        for (p, rack) in &peers {
            match self
                .net
                .direct(*p, &Request::Hello, Duration::from_secs(1))
                .await
            {
                Ok(Reply::Hello {
                    initialized: true, ..
                }) => {
                    tracing::info!(%rack, "a cluster exists; waiting to be added to it");
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(%rack, error = %e, "no answer before forming a cluster");
                    return;
                }
            }
        }
        let members = BTreeMap::from([(self.id, me.clone())]);
        match self.raft().initialize(members).await {
            Ok(()) => tracing::info!("formed a new control-plane cluster"),
            Err(e) => tracing::debug!(error = %e, "initialize"),
        }
    }

    /// On the leader: make every live admitted rack a voter.
    async fn grow(&self, status: &mesh::MeshStatus) {
        let (voters, nodes) = {
            let m = self.raft().metrics();
            let m = m.borrow();
            let mem = m.membership_config.membership();
            let voters: BTreeSet<NodeId> = mem.voter_ids().collect();
            let nodes: BTreeSet<NodeId> = mem.nodes().map(|(k, _)| *k).collect();
            (voters, nodes)
        };
        for (peer, rack) in Self::live_peers(status) {
            let id = node_id(&peer);
            if voters.contains(&id) {
                continue;
            }
            let node = RackNode {
                rack: rack.clone(),
                peer_id: peer.to_base58(),
            };
            if !nodes.contains(&id) {
                // Only a rack in no cluster, or one of ours that was taken
                // out while it was dead (its stale voters overlap ours): a
                // rack of another cluster would refuse our calls (it leaves
                // its cluster first if ours wins).
                match self
                    .net
                    .call(peer, &Request::Hello, Duration::from_secs(1))
                    .await
                {
                    Ok(Reply::Hello { voters: theirs, .. })
                        if theirs.is_empty() || theirs.iter().any(|v| voters.contains(v)) => {}
                    _ => continue,
                }
                let raft = self.raft();
                let add = raft.add_learner(id, node, true);
                match tokio::time::timeout(Duration::from_secs(10), add).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(%rack, error = %e, "adding a learner");
                        continue;
                    }
                    Err(_) => {
                        tracing::warn!(%rack, "adding a learner timed out");
                        continue;
                    }
                }
            }
            let raft = self.raft();
            let change =
                raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false);
            match tokio::time::timeout(Duration::from_secs(10), change).await {
                Ok(Ok(_)) => tracing::info!(%rack, "joined the control plane as a voter"),
                Ok(Err(e)) => tracing::warn!(%rack, error = %e, "promoting to voter"),
                Err(_) => tracing::warn!(%rack, "promoting to voter timed out"),
            }
            return; // one membership change at a time
        }
    }

    /// On the leader: take out of the cluster a rack whose certificate was
    /// revoked (and forget its report), or a voter dead for
    /// `remove_dead_after` (growth adds it back if it returns). Never
    /// itself; one change at a time.
    async fn shrink(&self, status: &mesh::MeshStatus) {
        let nodes: Vec<(NodeId, RackNode, bool)> = {
            let m = self.raft().metrics();
            let m = m.borrow();
            let mem = m.membership_config.membership();
            let voters: BTreeSet<NodeId> = mem.voter_ids().collect();
            mem.nodes()
                .filter(|(id, _)| **id != self.id)
                .map(|(id, n)| (*id, n.clone(), voters.contains(id)))
                .collect()
        };
        let revoked: BTreeSet<String> = status
            .revoked_peers
            .iter()
            .map(|(p, _)| p.to_base58())
            .collect();
        // A revoked rack's report goes too, member or not (it may have been
        // taken out for being dead before it was revoked).
        // Not if a rack of that name is admitted again (a replacement given
        // a new certificate under the old name).
        let state = self.applies.state.borrow().clone();
        let admitted: BTreeSet<String> = self.mesh.admitted().into_iter().map(|(_, r)| r).collect();
        for (peer, rack) in &status.revoked_peers {
            let member = nodes.iter().any(|(_, n, _)| n.peer_id == peer.to_base58());
            let reused = *rack == self.settings.rack || admitted.contains(rack);
            if !member && !reused && state.racks.contains_key(rack) {
                let cmd = Command::ForgetRack { rack: rack.clone() };
                match self.raft().client_write(cmd).await {
                    Ok(_) => {
                        tracing::warn!(%rack, "forgot a revoked rack");
                        self.event(ControlEvent::RackForgotten { rack: rack.clone() });
                    }
                    Err(e) => tracing::warn!(%rack, error = %e, "forgetting a revoked rack"),
                }
                return;
            }
        }
        let alive: BTreeSet<String> = status
            .peers
            .iter()
            .filter(|p| p.state != State::Dead)
            .map(|p| p.peer_id.to_base58())
            .collect();
        let now = Instant::now();
        let mut gone = None;
        {
            let mut dead = self.voter_dead_since.lock().expect("voter_dead_since lock");
            dead.retain(|id, _| nodes.iter().any(|(n, _, _)| n == id));
            for (id, node, voter) in &nodes {
                if revoked.contains(&node.peer_id) {
                    gone = Some((
                        *id,
                        node.clone(),
                        *voter,
                        true,
                        "its certificate was revoked".to_owned(),
                    ));
                    break;
                }
                if !voter || alive.contains(&node.peer_id) {
                    dead.remove(id);
                    continue;
                }
                let since = *dead.entry(*id).or_insert(now);
                if let Some(limit) = self.settings.remove_dead_after {
                    if now.duration_since(since) >= limit {
                        gone = Some((
                            *id,
                            node.clone(),
                            true,
                            false,
                            format!("dead for {limit:?}"),
                        ));
                        break;
                    }
                }
            }
        }
        let Some((id, node, voter, forget, why)) = gone else {
            return;
        };
        let mut changes = vec![ChangeMembers::RemoveNodes(BTreeSet::from([id]))];
        if voter {
            changes.insert(0, ChangeMembers::RemoveVoters(BTreeSet::from([id])));
        }
        for change in changes {
            let raft = self.raft();
            let change = raft.change_membership(change, false);
            match tokio::time::timeout(Duration::from_secs(10), change).await {
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
        tracing::warn!(rack = %node.rack, %why, "removed from the control plane");
        self.event(ControlEvent::VoterRemoved {
            rack: node.rack.clone(),
            why: why.clone(),
        });
        self.voter_dead_since
            .lock()
            .expect("voter_dead_since lock")
            .remove(&id);
        let reused = self.mesh.admitted().iter().any(|(_, r)| *r == node.rack);
        if forget && !reused {
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

    /// The racks as placement sees them: up = alive in membership (or us)
    /// and renewing within one lease.
    async fn rack_views(&self, state: &FieldState) -> Vec<RackView> {
        let now = Instant::now();
        let mesh_state: HashMap<String, State> = match self.mesh.status().await {
            Ok(s) => s
                .peers
                .iter()
                .filter_map(|p| Some((p.rack.clone()?, p.state)))
                .collect(),
            Err(_) => HashMap::new(),
        };
        let lease = self.settings.lease.lease;
        let young = self.started.elapsed() < lease;
        let leases = self
            .applies
            .leases
            .lock()
            .expect("lease watch lock")
            .clone();
        let mut down = self.down_since.lock().expect("down_since lock");
        state
            .racks
            .keys()
            .map(|rack| {
                // A renewal applied moments ago proves the rack is up and
                // reaches the quorum, whatever gossip says: a rack that was
                // cut off comes back believing the others dead, and until
                // they refute it SWIM repeats that.
                let fresh = leases
                    .renew_age(rack, now)
                    .is_some_and(|a| a < self.settings.lease.renew_every * 3);
                let in_mesh = *rack == self.settings.rack
                    || fresh
                    || mesh_state.get(rack).is_some_and(|s| *s != State::Dead);
                let renewing = match leases.renew_age(rack, now) {
                    Some(age) => age < lease,
                    None => young,
                };
                let up = in_mesh && renewing;
                let down_since_ms = if up {
                    down.remove(rack);
                    None
                } else {
                    Some(*down.entry(rack.clone()).or_insert_with(unix_ms))
                };
                RackView {
                    name: rack.clone(),
                    up,
                    down_since_ms,
                }
            })
            .collect()
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
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.settings.plan_every) => {}
                _ = state_rx.changed() => {}
            }
            if !self.is_leader() {
                continue;
            }
            let state = self.applies.state.borrow().clone();
            let views = self.rack_views(&state).await;
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

/// Whether cluster `a` (its voters) wins over cluster `b` when they meet:
/// more voters of its own (not in both), then the lowest such node id.
/// Both sides decide alike from the same two lists.
fn wins(a: &BTreeSet<NodeId>, b: &BTreeSet<NodeId>) -> bool {
    let only_a: BTreeSet<NodeId> = a.difference(b).copied().collect();
    let only_b: BTreeSet<NodeId> = b.difference(a).copied().collect();
    (std::cmp::Reverse(only_a.len()), only_a.first())
        < (std::cmp::Reverse(only_b.len()), only_b.first())
}

fn refused(r: Response) -> Result<Response, ControlError> {
    match r {
        Response::Refused(why) => Err(ControlError::Refused(why)),
        other => Ok(other),
    }
}
