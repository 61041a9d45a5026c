//! Who may vote: cluster formation, growth, merge and shrink as a sans-IO
//! state machine.
//!
//! [`Formation`] takes what one rack observes (an [`Observation`]: the
//! time, its Raft membership and role, the admitted peers and their SWIM
//! state, revocations, which racks have a report) plus the answers peers
//! gave to `Hello` ([`Answers`]) and returns what to do ([`Action`]s). It
//! performs no I/O and reads no clock: `node.rs` gathers the observation,
//! asks the peers [`Formation::asks`] names, feeds both to
//! [`Formation::decide`] and carries the actions out. That split is what
//! lets `formation/tests.rs` run a seeded simulated field of racks through
//! boot orders, partitions, heals and revocations.
//!
//! The rules, in the order [`Formation::decide`] applies them:
//! 1. **Bootstrap** (in no cluster): after [`FormationSettings::settle`],
//!    the rack with the lowest node id among the admitted peers forms a
//!    cluster of itself, and only if every admitted peer answered that it
//!    is in none. Any silence means wait: a peer that does not answer may
//!    be in a cluster.
//! 2. **Merge** (in a cluster): a live peer in another cluster (neither
//!    side's voters include the other) whose voters [`wins`] over ours, seen
//!    on [`FormationSettings::merge_confirmations`] checks in a row, makes
//!    this rack leave its cluster to be added to the winner. Both sides
//!    rank the two voter lists alike, so exactly one side leaves. Until it
//!    is in the winner, a rack that left refuses Raft calls from the
//!    voters it left, except those seen to have moved to the winner.
//! 3. **Grow** (leader only): the first live, admitted, unrevoked peer that
//!    is not a voter is promoted if it already is a member (a learner, or a
//!    voter taken out while it was dead) and there are fewer than
//!    [`MAX_VOTERS`] voters, the learner promoted being one from the site
//!    with the fewest voters; otherwise added as a learner, and only if it
//!    is in no cluster or its stale voters overlap ours. A field larger
//!    than [`MAX_VOTERS`] keeps the rest as learners; when rule 4 takes a
//!    dead voter out, a learner is promoted in its place.
//! 4. **Shrink** (leader only): a revoked rack's report is forgotten; a
//!    revoked member is removed at once (never this rack); a voter not seen
//!    alive for [`FormationSettings::remove_dead_after`] is removed (grow
//!    adds it back when it returns).
//!
//! At most one membership change per check: Raft changes membership one
//! step at a time, and a change decided on a stale view must not pile up
//! behind another.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use mesh::membership::State;

use crate::{NodeId, RackNode};

/// Most voters the control plane keeps; the other racks are learners
/// (they replicate the log and renew leases, but do not vote). Every
/// commit and election waits for a majority of voters, over radio links:
/// seven tolerate three losses, and more would only slow each commit (as
/// etcd and Consul advise, 5 or 7).
pub const MAX_VOTERS: usize = 7;

/// How often the membership loop observes and decides. Half a second keeps
/// a new rack's wait to become a voter short while asking each peer at
/// most twice a second.
pub const CHECK_EVERY: Duration = Duration::from_millis(500);

/// How long a `Hello` may take. One second covers a relayed call over a
/// slow radio hop; a peer slower than that is treated as silent this check.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a member that answered it is in this rack's cluster is not
/// asked again while the cluster has a leader. In a field of 32 racks, 24
/// of them learners, asking every member every check was most of an idle
/// agent's CPU, and asking each every 5 s still a large part of it; a
/// member that leaves for another cluster is seen within this (the racks
/// of that cluster that are not members are asked every check as before).
pub const SAME_CLUSTER_RECHECK: Duration = Duration::from_secs(60);

/// [`SAME_CLUSTER_RECHECK`] while this rack's cluster has no leader, as
/// when the others left it behind for another cluster: they are seen to
/// have moved within this. Not every check: at first boot every cluster
/// is leaderless a while, and 32 racks asking each other twice a second
/// overload a small machine.
pub const SAME_CLUSTER_RECHECK_LEADERLESS: Duration = Duration::from_secs(5);

/// How long one membership change (add a learner, promote, remove) may
/// take before the loop gives up and decides again on a fresh view. A
/// learner's catch-up ships the log or a snapshot, hence ten seconds.
pub const MEMBERSHIP_CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The fewest consecutive checks that must see a winning cluster before
/// this rack leaves its own: one sighting may be a passing view (a peer
/// mid-leave answers with the voters it is about to drop).
pub const MIN_MERGE_CONFIRMATIONS: u32 = 2;

/// Heartbeats without an append after which a follower counts itself
/// leaderless: three missed heartbeats, as Raft's own election timeout
/// is a small multiple of the heartbeat.
pub const LEADER_SILENCE_HEARTBEATS: u32 = 3;

/// The timings of formation (from `[control]` in rack.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormationSettings {
    /// Wait this long after start before forming a new cluster, and see a
    /// winning cluster for this long before leaving ours: long enough for
    /// admission and a first round of gossip, so a rack does not form a
    /// cluster of its own beside one it has not heard of yet.
    pub settle: Duration,
    /// Raft's heartbeat: a follower that heard no append for
    /// [`LEADER_SILENCE_HEARTBEATS`] of them is leaderless and then also
    /// asks its own voters which cluster they are in (its leader may have
    /// left for another cluster).
    pub heartbeat: Duration,
    /// The leader takes a voter dead this long out of the cluster, so that
    /// a rack that never returns stops counting toward the majority;
    /// `None`: never. Revoked racks go at once.
    pub remove_dead_after: Option<Duration>,
}

impl FormationSettings {
    /// Consecutive checks that must see a winning cluster before leaving:
    /// [`Self::settle`] worth of checks, at least
    /// [`MIN_MERGE_CONFIRMATIONS`].
    #[must_use]
    pub fn merge_confirmations(&self) -> u32 {
        let checks = self.settle.as_millis() / CHECK_EVERY.as_millis();
        u32::try_from(checks)
            .unwrap_or(u32::MAX)
            .max(MIN_MERGE_CONFIRMATIONS)
    }
}

/// This rack's Raft node as the membership loop sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftView {
    /// Whether Raft has any membership (this rack is in a cluster).
    pub initialized: bool,
    /// Whether this rack leads.
    pub leader: bool,
    /// When a leader's append last reached this rack.
    pub last_append: Instant,
    /// Its membership.
    pub membership: Membership,
    /// Its cluster's id (`None`: in none).
    pub cluster: Option<u64>,
}

impl RaftView {
    /// Whether a peer that answered `hello` is in this rack's cluster
    /// (`me`). By cluster id when both know theirs. Voter lists alone
    /// cannot tell: a rack that left a cluster stays listed there until it
    /// is taken out, so a rival cluster may list this rack among its
    /// voters. A rack too old to send its id is in ours when it lists the
    /// same voters or lists us.
    #[must_use]
    pub fn same_cluster(&self, me: NodeId, hello: &Hello) -> bool {
        self.same_id(hello)
            .unwrap_or_else(|| hello.voters == self.membership.voters || hello.voters.contains(&me))
    }

    /// Whether `hello` carries this rack's cluster id; `None` when either
    /// side has no id to compare.
    #[must_use]
    pub fn same_id(&self, hello: &Hello) -> Option<bool> {
        Some(self.cluster? == hello.cluster?)
    }
}

/// A Raft membership: who votes, who replicates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Membership {
    /// The voters (empty when in no cluster).
    pub voters: BTreeSet<NodeId>,
    /// Every member (voters and learners).
    pub nodes: BTreeMap<NodeId, RackNode>,
}

/// A peer in the mesh's SWIM membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSeen {
    /// Its node id.
    pub id: NodeId,
    /// Its PeerId (base58), as Raft's membership records it.
    pub peer_id: String,
    /// Its rack name, once gossip taught it.
    pub rack: Option<String>,
    /// Its site, once gossip taught it (voters are spread across sites).
    pub site: Option<String>,
    /// Alive, suspected or dead.
    pub state: State,
}

/// The mesh as seen this check (present once this rack is in a cluster).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeshView {
    /// Every peer SWIM knows of, in the mesh's order (grow takes the first
    /// candidate in it).
    pub peers: Vec<PeerSeen>,
    /// Revoked peers: (PeerId base58, rack name).
    pub revoked: Vec<(String, String)>,
}

/// An admitted peer (certificate checked, connected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Its node id.
    pub id: NodeId,
    /// Its rack name.
    pub rack: String,
}

/// Everything one check decides from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Now (the caller's clock).
    pub now: Instant,
    /// The Raft node.
    pub raft: RaftView,
    /// Admitted peers.
    pub admitted: Vec<Admitted>,
    /// SWIM membership and revocations; `None` while in no cluster (not
    /// needed then) or when the mesh did not answer.
    pub mesh: Option<MeshView>,
    /// Racks that have a report in the field state.
    pub reported: BTreeSet<String>,
}

/// A peer's answer to `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello {
    /// Whether it is in a cluster.
    pub initialized: bool,
    /// Its cluster's voters (empty when in none).
    pub voters: BTreeSet<NodeId>,
    /// Its cluster's id (`None`: in none, or a rack too old to say).
    pub cluster: Option<u64>,
}

/// The answers of the peers asked this check; a peer absent did not answer.
pub type Answers = BTreeMap<NodeId, Hello>;

/// How to reach the peers to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Only over a direct connection: before forming a cluster, a peer not
    /// directly reachable must count as silent.
    Direct,
    /// Directly or relayed by a third rack.
    AnyPath,
}

/// Whom to send `Hello` this check, and how (empty: nobody).
pub type Asks = BTreeMap<NodeId, Route>;

/// Why a member is taken out of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Its certificate was revoked.
    Revoked,
    /// It has been dead this long (`remove_dead_after`).
    DeadFor(Duration),
}

impl fmt::Display for Removal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Removal::Revoked => write!(f, "its certificate was revoked"),
            Removal::DeadFor(limit) => write!(f, "dead for {limit:?}"),
        }
    }
}

/// Why this check changes nothing (logged by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// Not in a cluster and `settle` has not passed since start.
    Settling,
    /// A peer with a lower node id forms the cluster.
    NotLowest,
    /// An admitted peer is in a cluster: wait to be added to it.
    ClusterExists {
        /// That peer's rack.
        rack: String,
    },
    /// An admitted peer did not answer; it may be in a cluster.
    NoAnswer {
        /// That peer's rack.
        rack: String,
    },
}

/// What the membership loop does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing this check, and why.
    Wait(Wait),
    /// Initialise a new cluster with these voters (this rack alone).
    Bootstrap {
        /// The voters.
        voters: BTreeMap<NodeId, RackNode>,
    },
    /// Leave this cluster (wipe Raft state, keep the appliances to carry)
    /// to be added to a cluster that wins.
    Leave {
        /// Voters of the cluster it leaves.
        our_voters: usize,
        /// Voters of the cluster it joins.
        their_voters: usize,
    },
    /// Propose `Adopt` for appliances carried from a cluster left earlier
    /// (if any are pending).
    AdoptCarried,
    /// Add a rack as a learner. On success the caller observes again and
    /// asks [`Formation::grow`], which promotes it unless it was revoked
    /// meanwhile.
    AddLearner {
        /// Its node id.
        id: NodeId,
        /// How Raft reaches it.
        node: RackNode,
    },
    /// Make a member a voter.
    Promote {
        /// Its node id.
        id: NodeId,
        /// Its rack.
        rack: String,
    },
    /// Forget the report of a revoked rack that is no member.
    ForgetRack {
        /// The rack.
        rack: String,
    },
    /// Take a member out of the cluster (out of the voters first if it is
    /// one), then forget its report if `forget`.
    Remove {
        /// Its node id.
        id: NodeId,
        /// Its node.
        node: RackNode,
        /// Whether it is a voter.
        voter: bool,
        /// Why.
        why: Removal,
        /// Forget its report afterwards (revoked, and no rack of its name
        /// admitted again).
        forget: bool,
    },
}

/// Why a Raft call from a leader or candidate is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// It is in the cluster this rack just left (it would pull it back).
    #[error("node {0} is in the cluster this rack left")]
    LeftCluster(NodeId),
    /// It is not a member of this rack's cluster.
    #[error("node {0} is not in this rack's control-plane cluster")]
    Foreign(NodeId),
    /// This rack, in no cluster, is being added to another leader's.
    #[error("node {from} calls, but this rack is being added to node {by}'s cluster")]
    BeingAdded {
        /// The leader adding this rack.
        by: NodeId,
        /// The refused caller.
        from: NodeId,
    },
}

/// One rack's formation state: what it must remember between checks.
#[derive(Debug, Clone)]
pub struct Formation {
    me: NodeId,
    my_node: RackNode,
    settings: FormationSettings,
    started: Instant,
    /// Consecutive checks that saw a winning cluster.
    foreign_seen: u32,
    /// The voters of the cluster this rack left, refused until it is in
    /// the new one (its old leader would pull it back otherwise), or until
    /// each of them is seen in the cluster joined.
    left: BTreeSet<NodeId>,
    /// The winner's own voters when this rack left (not in the cluster
    /// left): a rack whose voters include one of them is in the winner.
    joining: BTreeSet<NodeId>,
    /// On the leader: since when each member voter has been seen dead.
    /// Holds only current members, so it is bounded by the membership.
    dead_since: HashMap<NodeId, Instant>,
    /// While in no cluster: the leader this rack is being added by, and
    /// when it last called. Two clusters may both try to add a rack that
    /// is in none; it follows the first until that one's membership
    /// reaches it (then only members are heard), or until it falls
    /// silent.
    adopted_by: Option<(NodeId, Instant)>,
    /// Members that last answered they are in this rack's cluster, and
    /// when: not asked again for [`SAME_CLUSTER_RECHECK`]. Holds only
    /// current members, so it is bounded by the membership.
    same_cluster: HashMap<NodeId, Instant>,
}

impl Formation {
    /// A rack's formation state, started at `started`.
    #[must_use]
    pub fn new(
        me: NodeId,
        my_node: RackNode,
        settings: FormationSettings,
        started: Instant,
    ) -> Self {
        Self {
            me,
            my_node,
            settings,
            started,
            foreign_seen: 0,
            left: BTreeSet::new(),
            joining: BTreeSet::new(),
            dead_since: HashMap::new(),
            adopted_by: None,
            same_cluster: HashMap::new(),
        }
    }

    /// Whom to ask `Hello` before [`Formation::decide`].
    #[must_use]
    pub fn asks(&self, obs: &Observation) -> Asks {
        if !obs.raft.initialized {
            // The voters of the cluster left, to learn which of them have
            // moved to the winner since.
            let mut asks: Asks = self.left.iter().map(|id| (*id, Route::AnyPath)).collect();
            if obs.now.saturating_duration_since(self.started) >= self.settings.settle
                && !obs.admitted.iter().any(|a| a.id < self.me)
            {
                asks.extend(obs.admitted.iter().map(|a| (a.id, Route::Direct)));
            }
            return asks;
        }
        let Some(mesh) = obs.mesh.as_ref() else {
            return Asks::new();
        };
        if obs.raft.membership.voters.is_empty() {
            return Asks::new();
        }
        let leaderless = self.leaderless(obs);
        let mut peers: BTreeSet<NodeId> = live_peers(mesh)
            .map(|p| p.id)
            .filter(|id| *id != self.me && (leaderless || !obs.raft.membership.voters.contains(id)))
            .collect();
        if obs.raft.leader {
            peers.extend(
                live_peers(mesh)
                    .filter(|p| !obs.raft.membership.nodes.contains_key(&p.id))
                    .map(|p| p.id),
            );
        }
        peers
            .into_iter()
            .filter(|id| !self.known_same_cluster(*id, obs.now, leaderless))
            .map(|id| (id, Route::AnyPath))
            .collect()
    }

    /// A member that answered, less than [`SAME_CLUSTER_RECHECK`] ago, that
    /// it is in this rack's cluster.
    fn known_same_cluster(&self, id: NodeId, now: Instant, leaderless: bool) -> bool {
        let recheck = if leaderless {
            SAME_CLUSTER_RECHECK_LEADERLESS
        } else {
            SAME_CLUSTER_RECHECK
        };
        self.same_cluster
            .get(&id)
            .is_some_and(|t| now.saturating_duration_since(*t) < recheck)
    }

    /// Remember which members answered they are in this rack's cluster
    /// (its voters, or voters that include this rack); forget the others.
    fn note_same_cluster(&mut self, obs: &Observation, answers: &Answers) {
        let members = &obs.raft.membership.nodes;
        self.same_cluster.retain(|id, _| members.contains_key(id));
        for (id, h) in answers {
            let same = h.initialized && obs.raft.same_cluster(self.me, h);
            if same && members.contains_key(id) {
                self.same_cluster.insert(*id, obs.now);
            } else {
                self.same_cluster.remove(id);
            }
        }
    }

    /// Decide this check's actions from the observation and the answers to
    /// [`Formation::asks`].
    pub fn decide(&mut self, obs: &Observation, answers: &Answers) -> Vec<Action> {
        if !obs.raft.initialized {
            self.same_cluster.clear();
            self.forgive(answers);
            return vec![self.bootstrap(obs, answers)];
        }
        let Some(mesh) = obs.mesh.as_ref() else {
            return Vec::new();
        };
        self.note_same_cluster(obs, answers);
        if let Some(leave) = self.merge(obs, mesh, answers) {
            return vec![leave];
        }
        self.left.clear();
        self.joining.clear();
        let mut actions = vec![Action::AdoptCarried];
        if obs.raft.leader {
            actions.extend(self.grow(obs, answers));
            actions.extend(self.shrink(obs, mesh));
        }
        actions
    }

    /// Rule 1: form a cluster of this rack, or wait.
    fn bootstrap(&self, obs: &Observation, answers: &Answers) -> Action {
        if obs.now.saturating_duration_since(self.started) < self.settings.settle {
            return Action::Wait(Wait::Settling);
        }
        if obs.admitted.iter().any(|a| a.id < self.me) {
            return Action::Wait(Wait::NotLowest);
        }
        for a in &obs.admitted {
            match answers.get(&a.id) {
                Some(h) if h.initialized => {
                    return Action::Wait(Wait::ClusterExists {
                        rack: a.rack.clone(),
                    })
                }
                Some(_) => {}
                None => {
                    return Action::Wait(Wait::NoAnswer {
                        rack: a.rack.clone(),
                    })
                }
            }
        }
        Action::Bootstrap {
            voters: BTreeMap::from([(self.me, self.my_node.clone())]),
        }
    }

    /// Rule 2: leave for a winning cluster once it has been seen long
    /// enough.
    fn merge(&mut self, obs: &Observation, mesh: &MeshView, answers: &Answers) -> Option<Action> {
        let ours = &obs.raft.membership.voters;
        if ours.is_empty() {
            return None;
        }
        let leaderless = self.leaderless(obs);
        let mut winner: Option<&BTreeSet<NodeId>> = None;
        for peer in
            live_peers(mesh).filter(|p| p.id != self.me && (leaderless || !ours.contains(&p.id)))
        {
            let Some(hello) = answers.get(&peer.id) else {
                continue;
            };
            let theirs = &hello.voters;
            // Another cluster (racks that already moved over sit in both
            // lists: they count for neither side).
            if theirs.is_empty() || obs.raft.same_cluster(self.me, hello) {
                continue;
            }
            // The same voters under another id (two clusters formed from
            // the same racks): the lower id wins.
            let beats_ours = if theirs == ours {
                hello.cluster < obs.raft.cluster
            } else {
                wins(theirs, ours)
            };
            if beats_ours && winner.is_none_or(|w| wins(theirs, w)) {
                winner = Some(theirs);
            }
        }
        self.foreign_seen = if winner.is_some() {
            self.foreign_seen + 1
        } else {
            0
        };
        let winner = winner.filter(|_| self.foreign_seen >= self.settings.merge_confirmations())?;
        let their_voters = winner.len();
        self.foreign_seen = 0;
        // Racks already in both lists moved to the winner: they may add us.
        self.left = ours
            .difference(winner)
            .copied()
            .filter(|id| *id != self.me)
            .collect();
        self.joining = winner.difference(ours).copied().collect();
        Some(Action::Leave {
            our_voters: ours.len(),
            their_voters,
        })
    }

    /// Rule 3 (leader): the next rack to add as a learner or promote, if
    /// any. Also what the caller asks after a learner was added, on a
    /// fresh observation: a rack revoked since is not promoted.
    #[must_use]
    pub fn grow(&self, obs: &Observation, answers: &Answers) -> Option<Action> {
        let mesh = obs.mesh.as_ref()?;
        if !obs.raft.leader {
            return None;
        }
        let voters = &obs.raft.membership.voters;
        for peer in live_peers(mesh) {
            if voters.contains(&peer.id) {
                continue;
            }
            let rack = peer.rack.clone().unwrap_or_default();
            if obs.raft.membership.nodes.contains_key(&peer.id) {
                if voters.len() >= MAX_VOTERS {
                    continue;
                }
                let pick = spread_pick(mesh, &obs.raft.membership).unwrap_or(peer);
                return Some(Action::Promote {
                    id: pick.id,
                    rack: pick.rack.clone().unwrap_or_default(),
                });
            }
            // Only a rack in no cluster, or one of ours that was taken out
            // while it was dead (its cluster id is ours; from a rack too
            // old to send it, its stale voters overlap ours): a rack of
            // another cluster would refuse our calls (it leaves its
            // cluster first if ours wins).
            let ours = |h: &Hello| {
                obs.raft
                    .same_id(h)
                    .unwrap_or_else(|| !h.voters.is_disjoint(voters))
            };
            match answers.get(&peer.id) {
                Some(h) if h.voters.is_empty() || ours(h) => {
                    return Some(Action::AddLearner {
                        id: peer.id,
                        node: RackNode {
                            rack,
                            peer_id: peer.peer_id.clone(),
                        },
                    });
                }
                _ => {}
            }
        }
        None
    }

    /// Rule 4 (leader): forget a revoked rack's report, or take one member
    /// out (revoked, or dead too long). Never this rack.
    fn shrink(&mut self, obs: &Observation, mesh: &MeshView) -> Option<Action> {
        let admitted: BTreeSet<&str> = obs.admitted.iter().map(|a| a.rack.as_str()).collect();
        // A revoked rack's report goes too, member or not (it may have been
        // taken out for being dead before it was revoked). Not if a rack of
        // that name is admitted again (a replacement given a new
        // certificate under the old name).
        for (peer, rack) in &mesh.revoked {
            let member = obs
                .raft
                .membership
                .nodes
                .values()
                .any(|n| n.peer_id == *peer);
            let reused = *rack == self.my_node.rack || admitted.contains(rack.as_str());
            if !member && !reused && obs.reported.contains(rack) {
                return Some(Action::ForgetRack { rack: rack.clone() });
            }
        }
        let revoked: BTreeSet<&str> = mesh.revoked.iter().map(|(p, _)| p.as_str()).collect();
        let alive: BTreeSet<&str> = mesh
            .peers
            .iter()
            .filter(|p| p.state != State::Dead)
            .map(|p| p.peer_id.as_str())
            .collect();
        let members = obs
            .raft
            .membership
            .nodes
            .iter()
            .filter(|(id, _)| **id != self.me);
        self.dead_since
            .retain(|id, _| *id != self.me && obs.raft.membership.nodes.contains_key(id));
        for (id, node) in members {
            let voter = obs.raft.membership.voters.contains(id);
            if revoked.contains(node.peer_id.as_str()) {
                return Some(Action::Remove {
                    id: *id,
                    node: node.clone(),
                    voter,
                    why: Removal::Revoked,
                    forget: !admitted.contains(node.rack.as_str()),
                });
            }
            if !voter || alive.contains(node.peer_id.as_str()) {
                self.dead_since.remove(id);
                continue;
            }
            let since = *self.dead_since.entry(*id).or_insert(obs.now);
            if let Some(limit) = self.settings.remove_dead_after {
                if obs.now.saturating_duration_since(since) >= limit {
                    return Some(Action::Remove {
                        id: *id,
                        node: node.clone(),
                        voter: true,
                        why: Removal::DeadFor(limit),
                        forget: false,
                    });
                }
            }
        }
        None
    }

    /// While in no cluster after leaving one: a voter of the cluster left
    /// that now answers with voters of the cluster joined has moved there
    /// too, and may add this rack (it may even lead the winner by now).
    fn forgive(&mut self, answers: &Answers) {
        let joining = &self.joining;
        self.left.retain(|id| {
            answers
                .get(id)
                .is_none_or(|h| h.voters.is_disjoint(joining))
        });
    }

    /// A member was taken out: stop timing its death.
    pub fn removed(&mut self, id: NodeId) {
        self.dead_since.remove(&id);
    }

    /// Whether a Raft call from `from` (a leader or candidate) at `now` is
    /// refused, given this rack's membership: it is not in this rack's
    /// cluster (two clusters that met never mix their logs), or, while in
    /// none, it is in the cluster this rack left, or another leader is
    /// adding this rack (heard within [`LEADER_SILENCE_HEARTBEATS`]
    /// heartbeats).
    pub fn refusal(
        &mut self,
        from: Option<NodeId>,
        membership: &Membership,
        now: Instant,
    ) -> Option<Refusal> {
        let from = from?;
        if membership.voters.is_empty() {
            if self.left.contains(&from) {
                return Some(Refusal::LeftCluster(from));
            }
            let silence = self.settings.heartbeat * LEADER_SILENCE_HEARTBEATS;
            if let Some((by, at)) = self.adopted_by {
                if by != from && now.saturating_duration_since(at) <= silence {
                    return Some(Refusal::BeingAdded { by, from });
                }
            }
            self.adopted_by = Some((from, now));
            return None;
        }
        self.adopted_by = None;
        if membership.nodes.contains_key(&from) {
            return None;
        }
        Some(Refusal::Foreign(from))
    }

    /// No leader's append for [`LEADER_SILENCE_HEARTBEATS`] heartbeats,
    /// and not the leader.
    fn leaderless(&self, obs: &Observation) -> bool {
        let heard = obs.now.saturating_duration_since(obs.raft.last_append);
        !obs.raft.leader && heard > self.settings.heartbeat * LEADER_SILENCE_HEARTBEATS
    }
}

/// Peers alive in SWIM, not revoked, with a known rack name. Not only the
/// ones this rack is connected to: a rack that only reaches the field
/// through another (one radio link) is reached through a relay.
/// The live learner to promote: the first, in the mesh's order, of those
/// whose site has the fewest voters (sites as gossiped; a voter of unknown
/// site counts for none).
fn spread_pick<'a>(mesh: &'a MeshView, membership: &Membership) -> Option<&'a PeerSeen> {
    let mut per_site: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &mesh.peers {
        if membership.voters.contains(&p.id) {
            if let Some(site) = p.site.as_deref() {
                *per_site.entry(site).or_default() += 1;
            }
        }
    }
    live_peers(mesh)
        .filter(|p| !membership.voters.contains(&p.id) && membership.nodes.contains_key(&p.id))
        .min_by_key(|p| {
            p.site
                .as_deref()
                .map_or(0, |s| per_site.get(s).copied().unwrap_or(0))
        })
}

fn live_peers(mesh: &MeshView) -> impl Iterator<Item = &PeerSeen> {
    let revoked: BTreeSet<&str> = mesh.revoked.iter().map(|(p, _)| p.as_str()).collect();
    mesh.peers.iter().filter(move |p| {
        p.state == State::Alive && p.rack.is_some() && !revoked.contains(p.peer_id.as_str())
    })
}

/// Whether cluster `a` (its voters) wins over cluster `b` when they meet:
/// more voters of its own (not in both), then the lowest such node id.
/// Both sides decide alike from the same two lists, and the order is
/// total and antisymmetric, so of two distinct clusters exactly one wins.
#[must_use]
pub fn wins(a: &BTreeSet<NodeId>, b: &BTreeSet<NodeId>) -> bool {
    let only_a: BTreeSet<NodeId> = a.difference(b).copied().collect();
    let only_b: BTreeSet<NodeId> = b.difference(a).copied().collect();
    (std::cmp::Reverse(only_a.len()), only_a.first())
        < (std::cmp::Reverse(only_b.len()), only_b.first())
}

/// The least time a pre-vote `Hello` may take, whatever the heartbeat:
/// shorter than a relayed round trip over a radio hop would count reachable
/// voters as cut off and hold elections that should run. A peer whose calls
/// take longer gets what they take (`net::timeouts`).
pub const PREVOTE_MIN_TIMEOUT: Duration = Duration::from_millis(400);

/// The pre-vote's verdict (openraft 0.9 has none of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElectionGate {
    /// Elections allowed.
    pub elect: bool,
    /// Voters reached (this rack included).
    pub reachable: usize,
    /// Voters in the membership.
    pub voters: usize,
}

/// Whether a follower that stopped hearing from its leader may start
/// elections: only if a majority of the `voters` would vote for it (itself
/// and the voters it reaches whose log is not newer than its own) and none
/// of those it reaches (`answers`: (voter, the leader it follows, whether
/// its log is newer than ours)) follows a leader that it reaches too.
/// Otherwise every election it tried while cut off would raise its term,
/// and on reconnecting that term would depose a healthy leader, leaving
/// the field leaderless long enough for leases to lapse. The log check is
/// Raft's own vote rule, asked first: after a cold start a rack whose log
/// is behind would otherwise stand again and again, each time raising the
/// term over the one rack that can win, and no leader would be elected.
#[must_use]
pub fn election_gate(
    me: NodeId,
    voters: usize,
    answers: &[(NodeId, Option<NodeId>, bool)],
) -> ElectionGate {
    let reachable: BTreeSet<NodeId> = answers.iter().map(|(id, _, _)| *id).collect();
    let leader_alive = answers
        .iter()
        .any(|(_, l, _)| l.is_some_and(|l| l != me && reachable.contains(&l)));
    let would_vote = answers.iter().filter(|(_, _, newer)| !newer).count() + 1;
    let majority = would_vote * 2 > voters;
    ElectionGate {
        elect: majority && !leader_alive,
        reachable: reachable.len() + 1,
        voters,
    }
}

#[cfg(test)]
mod tests;
