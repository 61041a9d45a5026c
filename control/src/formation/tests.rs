//! Formation's rules as tables, and a seeded simulated field of racks
//! running [`Formation`] over a simulated Raft membership.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use mesh::membership::State;
use proptest::prelude::*;

use super::*;

mod sim;

fn node(id: NodeId) -> RackNode {
    RackNode {
        rack: format!("r{id}"),
        peer_id: format!("p{id}"),
    }
}

fn settings() -> FormationSettings {
    FormationSettings {
        settle: Duration::from_secs(2),
        heartbeat: Duration::from_millis(250),
        remove_dead_after: Some(Duration::from_secs(10)),
    }
}

fn machine(me: NodeId, t0: Instant) -> Formation {
    Formation::new(me, node(me), settings(), t0)
}

fn peer(id: NodeId, state: State) -> PeerSeen {
    PeerSeen {
        id,
        peer_id: format!("p{id}"),
        rack: Some(format!("r{id}")),
        site: None,
        state,
    }
}

/// The answer of a rack too old to send its cluster id.
fn hello(voters: &[NodeId]) -> Hello {
    Hello {
        initialized: !voters.is_empty(),
        voters: voters.iter().copied().collect(),
        cluster: None,
    }
}

/// The answer of a rack in cluster `cluster`.
fn hello_in(cluster: u64, voters: &[NodeId]) -> Hello {
    Hello {
        cluster: Some(cluster),
        ..hello(voters)
    }
}

fn answers(list: &[(NodeId, &[NodeId])]) -> Answers {
    list.iter().map(|(id, v)| (*id, hello(v))).collect()
}

/// An observation of a rack outside any cluster.
fn lonely(now: Instant, admitted: &[NodeId]) -> Observation {
    Observation {
        now,
        raft: RaftView {
            initialized: false,
            leader: false,
            last_append: now,
            membership: Membership::default(),
            cluster: None,
        },
        admitted: admitted
            .iter()
            .map(|id| Admitted {
                id: *id,
                rack: format!("r{id}"),
            })
            .collect(),
        mesh: None,
        reported: BTreeSet::new(),
    }
}

/// The cluster id of every [`InCluster`] observation.
const OUR_CLUSTER: u64 = 0xc1;

/// An observation of a rack in a cluster of `voters` (+ `learners`), all
/// of `alive` alive in the mesh and admitted.
#[derive(Clone)]
struct InCluster {
    now: Instant,
    leader: bool,
    last_append: Instant,
    voters: Vec<NodeId>,
    learners: Vec<NodeId>,
    peers: Vec<PeerSeen>,
    revoked: Vec<NodeId>,
    reported: Vec<NodeId>,
}

impl InCluster {
    fn new(now: Instant, voters: &[NodeId]) -> Self {
        Self {
            now,
            leader: true,
            last_append: now,
            voters: voters.to_vec(),
            learners: Vec::new(),
            peers: Vec::new(),
            revoked: Vec::new(),
            reported: Vec::new(),
        }
    }

    fn obs(&self) -> Observation {
        let nodes = self
            .voters
            .iter()
            .chain(&self.learners)
            .map(|id| (*id, node(*id)))
            .collect();
        Observation {
            now: self.now,
            raft: RaftView {
                initialized: true,
                leader: self.leader,
                last_append: self.last_append,
                membership: Membership {
                    voters: self.voters.iter().copied().collect(),
                    nodes,
                },
                cluster: Some(OUR_CLUSTER),
            },
            admitted: self
                .peers
                .iter()
                .filter(|p| p.state != State::Dead && !self.revoked.contains(&p.id))
                .map(|p| Admitted {
                    id: p.id,
                    rack: format!("r{}", p.id),
                })
                .collect(),
            mesh: Some(MeshView {
                peers: self.peers.clone(),
                revoked: self
                    .revoked
                    .iter()
                    .map(|id| (format!("p{id}"), format!("r{id}")))
                    .collect(),
            }),
            reported: self.reported.iter().map(|id| format!("r{id}")).collect(),
        }
    }
}

fn at(t0: Instant, ms: u64) -> Instant {
    t0 + Duration::from_millis(ms)
}

// ---- rule 1: bootstrap ----

#[test]
fn bootstrap_table() {
    let t0 = Instant::now();
    let settled = at(t0, 2_000);
    let me = 5;
    let formed = Action::Bootstrap {
        voters: BTreeMap::from([(me, node(me))]),
    };
    let cases: Vec<(&str, Instant, Vec<NodeId>, Answers, Action)> = vec![
        (
            "before settle nobody forms",
            at(t0, 1_999),
            vec![],
            Answers::new(),
            Action::Wait(Wait::Settling),
        ),
        (
            "alone after settle: form",
            settled,
            vec![],
            Answers::new(),
            formed.clone(),
        ),
        (
            "lowest, every peer in no cluster: form",
            settled,
            vec![7, 9],
            answers(&[(7, &[]), (9, &[])]),
            formed.clone(),
        ),
        (
            "a lower id forms, not us",
            settled,
            vec![7, 3],
            answers(&[(7, &[]), (3, &[])]),
            Action::Wait(Wait::NotLowest),
        ),
        (
            "a peer is in a cluster: wait to be added",
            settled,
            vec![7, 9],
            answers(&[(7, &[]), (9, &[9, 11])]),
            Action::Wait(Wait::ClusterExists { rack: "r9".into() }),
        ),
        (
            "a silent peer may be in a cluster: wait",
            settled,
            vec![7, 9],
            answers(&[(7, &[])]),
            Action::Wait(Wait::NoAnswer { rack: "r9".into() }),
        ),
    ];
    for (name, now, admitted, answers, want) in cases {
        let mut f = machine(me, t0);
        let obs = lonely(now, &admitted);
        assert_eq!(f.decide(&obs, &answers), vec![want], "{name}");
    }
}

#[test]
fn bootstrap_asks_every_admitted_peer_directly_and_only_when_it_may_form() {
    let t0 = Instant::now();
    let f = machine(5, t0);
    assert_eq!(f.asks(&lonely(at(t0, 100), &[7])), Asks::new(), "settling");
    assert_eq!(
        f.asks(&lonely(at(t0, 2_000), &[7, 3])),
        Asks::new(),
        "not lowest"
    );
    assert_eq!(
        f.asks(&lonely(at(t0, 2_000), &[7, 9])),
        Asks::from([(7, Route::Direct), (9, Route::Direct)])
    );
}

// ---- rule 2: merge ----

#[test]
fn merge_leaves_for_a_winner_only_after_settle_worth_of_sightings() {
    let t0 = Instant::now();
    let mut f = machine(5, t0);
    let mut c = InCluster::new(t0, &[5, 6]);
    c.peers = vec![peer(1, State::Alive), peer(2, State::Alive)];
    let theirs = answers(&[(1, &[1, 2]), (2, &[1, 2])]);
    let needed = settings().merge_confirmations();
    assert_eq!(needed, 4, "2 s of 500 ms checks");
    for check in 1..needed {
        let actions = f.decide(&c.obs(), &theirs);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Leave { .. })),
            "left on sighting {check}"
        );
    }
    // One check without a sighting starts the count again.
    f.decide(&c.obs(), &Answers::new());
    for _ in 1..needed {
        f.decide(&c.obs(), &theirs);
    }
    assert_eq!(
        f.decide(&c.obs(), &theirs),
        vec![Action::Leave {
            our_voters: 2,
            their_voters: 2
        }]
    );
    // While in no cluster, a voter of the cluster left is refused; another
    // rack is not.
    let empty = Membership::default();
    assert_eq!(
        f.refusal(Some(6), &empty, t0),
        Some(Refusal::LeftCluster(6))
    );
    assert_eq!(f.refusal(Some(1), &empty, t0), None);
}

#[test]
fn merge_table() {
    let t0 = Instant::now();
    let me = 5;
    // (name, our voters, their voters as answered by peer 8, leaves?)
    let cases: Vec<(&str, Vec<NodeId>, Vec<NodeId>, bool)> = vec![
        (
            "more voters of their own win",
            vec![5, 6],
            vec![8, 9, 10],
            true,
        ),
        ("fewer of their own lose", vec![5, 6, 7], vec![8, 9], false),
        (
            "tie: the lowest id of their own wins",
            vec![5, 6],
            vec![3, 8],
            true,
        ),
        (
            "tie: ours holds the lowest id",
            vec![5, 6],
            vec![8, 9],
            false,
        ),
        (
            "racks in both lists count for neither",
            vec![5, 6, 8],
            vec![8, 9],
            false,
        ),
        (
            "a cluster that lists us is ours",
            vec![5, 6],
            vec![5, 8, 9],
            false,
        ),
        (
            "a peer in no cluster is no rival",
            vec![5, 6],
            vec![],
            false,
        ),
    ];
    for (name, ours, theirs, leaves) in cases {
        let mut c = InCluster::new(t0, &ours);
        c.leader = false;
        c.peers = vec![peer(8, State::Alive)];
        let left = leaves_within_confirmations(machine(me, t0), &c, &answers(&[(8, &theirs)]));
        assert_eq!(left, leaves, "{name}");
    }
}

/// Whether `f`, observing `c` and hearing `a` for a merge's worth of
/// checks, leaves its cluster.
fn leaves_within_confirmations(mut f: Formation, c: &InCluster, a: &Answers) -> bool {
    (0..settings().merge_confirmations()).fold(false, |left, _| {
        left | f
            .decide(&c.obs(), a)
            .iter()
            .any(|a| matches!(a, Action::Leave { .. }))
    })
}

/// With cluster ids, "same cluster" is exact: a rival that still lists
/// this rack among its voters (it was added there, then joined another
/// cluster before its first append arrived) is a rival all the same, and
/// a member whose voters differ from ours (a change under way) is ours.
/// Seen at 32 racks: a rack sat for minutes in a cluster whose other
/// voters had all moved to the winner, which listed it too, each side
/// taking the other for its own.
#[test]
fn merge_table_by_cluster_id() {
    let t0 = Instant::now();
    let me = 5;
    // (name, our voters, peer 8's cluster and voters, leaves?)
    type Case<'a> = (&'a str, Vec<NodeId>, u64, Vec<NodeId>, bool);
    let cases: Vec<Case> = vec![
        (
            "a rival that lists us is still a rival",
            vec![5, 6, 7],
            0xd2,
            vec![5, 6, 8, 9, 10, 11, 12],
            true,
        ),
        (
            "a rival that lists us and loses is left behind",
            vec![5, 6, 7, 13],
            0xd2,
            vec![5, 8],
            false,
        ),
        (
            "our cluster whatever its voters",
            vec![5, 6],
            OUR_CLUSTER,
            vec![6, 8, 9, 10],
            false,
        ),
        (
            "the same voters under a lower id win",
            vec![5, 8],
            0x01,
            vec![5, 8],
            true,
        ),
        (
            "the same voters under a higher id lose",
            vec![5, 8],
            0xff,
            vec![5, 8],
            false,
        ),
    ];
    for (name, ours, cluster, theirs, leaves) in cases {
        let f = machine(me, t0);
        // Leaderless (no append for 10 s), so voters of ours are asked too:
        // two clusters that list the same voters cannot both lead.
        let mut c = InCluster::new(at(t0, 10_000), &ours);
        c.last_append = t0;
        c.leader = false;
        c.peers = vec![peer(8, State::Alive)];
        let a = Answers::from([(8, hello_in(cluster, &theirs))]);
        assert_eq!(leaves_within_confirmations(f, &c, &a), leaves, "{name}");
    }
}

/// A leader adds a rack of another cluster as a learner never, even one
/// whose voters overlap ours (racks that moved over sit in both lists):
/// it would refuse our calls and sit listed in two clusters. It adds a
/// rack of its own cluster back.
#[test]
fn grow_adds_no_rack_of_another_cluster() {
    let t0 = Instant::now();
    let f = machine(5, t0);
    let mut c = InCluster::new(t0, &[5, 6]);
    c.peers = vec![peer(6, State::Alive), peer(8, State::Alive)];
    let rival = Answers::from([(8, hello_in(0xd2, &[6, 8]))]);
    assert_eq!(f.grow(&c.obs(), &rival), None);
    let old = Answers::from([(8, hello(&[6, 8]))]);
    assert!(
        matches!(
            f.grow(&c.obs(), &old),
            Some(Action::AddLearner { id: 8, .. })
        ),
        "a rack too old to say is judged by its voters"
    );
    let ours = Answers::from([(8, hello_in(OUR_CLUSTER, &[6, 8]))]);
    assert!(matches!(
        f.grow(&c.obs(), &ours),
        Some(Action::AddLearner { id: 8, .. })
    ));
}

#[test]
fn merge_asks_only_outsiders_unless_leaderless() {
    let t0 = Instant::now();
    let f = machine(5, t0);
    let mut c = InCluster::new(at(t0, 10_000), &[5, 6]);
    c.leader = false;
    c.last_append = at(t0, 10_000);
    c.peers = vec![peer(6, State::Alive), peer(8, State::Alive)];
    let ids = |a: Asks| a.into_keys().collect::<BTreeSet<_>>();
    assert_eq!(ids(f.asks(&c.obs())), BTreeSet::from([8]));
    // Silent leader for more than three heartbeats: ask our voters too.
    c.last_append = at(t0, 10_000 - 751);
    assert_eq!(ids(f.asks(&c.obs())), BTreeSet::from([6, 8]));
}

#[test]
fn members_known_to_be_in_our_cluster_are_asked_only_every_recheck() {
    let t0 = Instant::now();
    let mut f = machine(5, t0);
    let mut c = InCluster::new(at(t0, 10_000), &[5, 6]);
    c.learners = vec![7, 8];
    c.peers = vec![
        peer(6, State::Alive),
        peer(7, State::Alive),
        peer(8, State::Alive),
        peer(9, State::Alive),
    ];
    let ids = |a: Asks| a.into_keys().collect::<BTreeSet<_>>();
    assert_eq!(ids(f.asks(&c.obs())), BTreeSet::from([7, 8, 9]));
    // 7 answers our voters, 8 another cluster's, 9 (no member) ours too.
    let _ = f.decide(
        &c.obs(),
        &answers(&[(7, &[5, 6]), (8, &[1, 2]), (9, &[5, 6])]),
    );
    c.now = at(t0, 10_500);
    assert_eq!(
        ids(f.asks(&c.obs())),
        BTreeSet::from([8, 9]),
        "7 rests; a member in another cluster and a non-member are asked every check"
    );
    // A follower whose leader fell silent asks them again sooner.
    let mut silent = c.clone();
    silent.leader = false;
    let soon = u64::try_from(SAME_CLUSTER_RECHECK_LEADERLESS.as_millis()).unwrap();
    silent.now = at(t0, 10_000 + soon - 1);
    silent.last_append = at(t0, 10_000 + soon - 1 - 751);
    assert!(!ids(f.asks(&silent.obs())).contains(&7));
    silent.now = at(t0, 10_000 + soon);
    silent.last_append = at(t0, 10_000 + soon - 751);
    assert!(ids(f.asks(&silent.obs())).contains(&7));
    let recheck = u64::try_from(SAME_CLUSTER_RECHECK.as_millis()).unwrap();
    c.now = at(t0, 10_000 + recheck - 1);
    assert!(!ids(f.asks(&c.obs())).contains(&7));
    c.now = at(t0, 10_000 + recheck);
    assert!(
        ids(f.asks(&c.obs())).contains(&7),
        "asked again after the recheck"
    );
    // Silence (no answer) does not keep it resting.
    let _ = f.decide(&c.obs(), &answers(&[]));
    c.now = at(t0, 10_000 + recheck + 500);
    assert!(ids(f.asks(&c.obs())).contains(&7));
    // A rack that is no member any more is forgotten.
    let _ = f.decide(&c.obs(), &answers(&[(7, &[5, 6])]));
    c.learners = vec![8];
    let _ = f.decide(&c.obs(), &answers(&[]));
    c.learners = vec![7, 8];
    assert!(ids(f.asks(&c.obs())).contains(&7));
}

#[test]
fn being_in_a_cluster_again_forgets_the_cluster_left() {
    let t0 = Instant::now();
    let mut f = machine(5, t0);
    let mut c = InCluster::new(t0, &[5, 6]);
    c.leader = false;
    c.peers = vec![peer(1, State::Alive)];
    let a = answers(&[(1, &[1, 2])]);
    for _ in 0..settings().merge_confirmations() {
        f.decide(&c.obs(), &a);
    }
    assert_eq!(
        f.refusal(Some(6), &Membership::default(), t0),
        Some(Refusal::LeftCluster(6))
    );
    let mut joined = InCluster::new(t0, &[1, 2, 5]);
    joined.leader = false;
    f.decide(&joined.obs(), &Answers::new());
    assert_eq!(f.refusal(Some(6), &Membership::default(), t0), None);
    // In a cluster: members are heard, others refused.
    let m = joined.obs().raft.membership;
    assert_eq!(f.refusal(Some(2), &m, t0), None);
    assert_eq!(f.refusal(Some(9), &m, t0), Some(Refusal::Foreign(9)));
    assert_eq!(f.refusal(None, &m, t0), None);
}

#[test]
fn a_voter_left_behind_is_heard_again_once_it_moved_to_the_winner() {
    // Without this, a rack of the losing cluster that moved over first
    // and then led the winner could never add the ones that followed.
    let t0 = Instant::now();
    let mut f = machine(5, t0);
    let mut c = InCluster::new(t0, &[5, 6, 7]);
    c.leader = false;
    c.peers = vec![peer(1, State::Alive)];
    let a = answers(&[(1, &[1, 2, 3, 4])]);
    for _ in 0..settings().merge_confirmations() {
        f.decide(&c.obs(), &a);
    }
    let empty = Membership::default();
    assert_eq!(
        f.refusal(Some(6), &empty, t0),
        Some(Refusal::LeftCluster(6))
    );
    // In no cluster: it asks the voters it left, whatever else it asks.
    let obs = lonely(at(t0, 2_500), &[1, 6, 7]);
    let asks = f.asks(&obs);
    assert_eq!(asks.get(&6), Some(&Route::AnyPath));
    assert_eq!(asks.get(&7), Some(&Route::AnyPath));
    // 6 moved to the winner; 7 still answers with the old voters.
    let moved = answers(&[(6, &[1, 2, 3, 4, 6]), (7, &[5, 6, 7])]);
    assert_eq!(f.decide(&obs, &moved), vec![Action::Wait(Wait::NotLowest)]);
    assert_eq!(f.refusal(Some(6), &empty, t0), None);
    assert_eq!(
        f.refusal(Some(7), &empty, t0),
        Some(Refusal::LeftCluster(7))
    );
    // Silence forgives nobody.
    f.decide(&obs, &Answers::new());
    assert_eq!(
        f.refusal(Some(7), &empty, t0),
        Some(Refusal::LeftCluster(7))
    );
}

// ---- rule 3: grow ----

/// A peer on a site.
fn sited(id: NodeId, site: &str) -> PeerSeen {
    PeerSeen {
        site: Some(site.into()),
        ..peer(id, State::Alive)
    }
}

#[test]
fn voters_stop_at_the_cap_and_a_lost_one_is_replaced_across_sites() {
    let t0 = Instant::now();
    let me = 1;
    let promote = |id: NodeId| {
        Some(Action::Promote {
            id,
            rack: format!("r{id}"),
        })
    };
    // Seven voters: a live learner stays one; a new rack still joins as a
    // learner (it replicates and renews, it does not vote).
    let voters: Vec<NodeId> = (1..=7).collect();
    let mut c = InCluster::new(t0, &voters);
    c.peers = (2..=7).map(|id| sited(id, "north")).collect();
    c.peers.push(sited(8, "north"));
    c.learners = vec![8];
    let f = machine(me, t0);
    assert_eq!(f.grow(&c.obs(), &Answers::new()), None);
    c.peers.push(sited(9, "south"));
    assert_eq!(
        f.grow(&c.obs(), &answers(&[(9, &[])])),
        Some(Action::AddLearner {
            id: 9,
            node: node(9)
        })
    );
    // A voter (7) taken out for being dead: a learner takes its place,
    // the one from the site with fewest voters (south over north), even
    // though north's comes first in the mesh's order.
    c.voters = (1..=6).collect();
    c.peers.retain(|p| p.id != 7);
    c.learners = vec![8, 9];
    assert_eq!(f.grow(&c.obs(), &Answers::new()), promote(9));
    // Among equals, the mesh's order.
    c.peers = (2..=6)
        .map(|id| sited(id, "north"))
        .chain([sited(8, "south"), sited(9, "south")])
        .collect();
    assert_eq!(f.grow(&c.obs(), &Answers::new()), promote(8));
}

#[test]
fn grow_table() {
    let t0 = Instant::now();
    let me = 1;
    // (name, peers, learners, revoked, answers, want)
    type Case = (
        &'static str,
        Vec<PeerSeen>,
        Vec<NodeId>,
        Vec<NodeId>,
        Answers,
        Option<Action>,
    );
    let add = |id: NodeId| Action::AddLearner { id, node: node(id) };
    let cases: Vec<Case> = vec![
        (
            "a rack in no cluster is added as a learner",
            vec![peer(2, State::Alive)],
            vec![],
            vec![],
            answers(&[(2, &[])]),
            Some(add(2)),
        ),
        (
            "a learner is promoted",
            vec![peer(2, State::Alive)],
            vec![2],
            vec![],
            Answers::new(),
            Some(Action::Promote {
                id: 2,
                rack: "r2".into(),
            }),
        ),
        (
            "a voter taken out while dead (its voters overlap ours) is added back",
            vec![peer(2, State::Alive)],
            vec![],
            vec![],
            answers(&[(2, &[1, 2])]),
            Some(add(2)),
        ),
        (
            "a rack of another cluster is left alone (it leaves first if we win)",
            vec![peer(2, State::Alive)],
            vec![],
            vec![],
            answers(&[(2, &[2, 3])]),
            None,
        ),
        (
            "a silent rack is not added",
            vec![peer(2, State::Alive)],
            vec![],
            vec![],
            Answers::new(),
            None,
        ),
        (
            "a suspected rack is not added",
            vec![peer(2, State::Suspect)],
            vec![],
            vec![],
            answers(&[(2, &[])]),
            None,
        ),
        (
            "a revoked rack is never added",
            vec![peer(2, State::Alive)],
            vec![],
            vec![2],
            answers(&[(2, &[])]),
            None,
        ),
        (
            "a revoked learner is never promoted",
            vec![peer(2, State::Alive)],
            vec![2],
            vec![2],
            Answers::new(),
            None,
        ),
        (
            "one change at a time, in the mesh's order",
            vec![peer(3, State::Alive), peer(2, State::Alive)],
            vec![2],
            vec![],
            answers(&[(3, &[])]),
            Some(add(3)),
        ),
    ];
    for (name, peers, learners, revoked, answers, want) in cases {
        let mut c = InCluster::new(t0, &[me]);
        c.peers = peers;
        c.learners = learners;
        c.revoked = revoked;
        let f = machine(me, t0);
        assert_eq!(f.grow(&c.obs(), &answers), want, "{name}");
        // decide() carries the same verdict, after AdoptCarried.
        let mut f = machine(me, t0);
        let got = f.decide(&c.obs(), &answers);
        assert_eq!(got.first(), Some(&Action::AdoptCarried), "{name}");
        assert_eq!(
            got.get(1)
                .filter(|a| !matches!(a, Action::Remove { .. } | Action::ForgetRack { .. })),
            want.as_ref(),
            "{name}"
        );
    }
}

#[test]
fn followers_neither_grow_nor_shrink() {
    let t0 = Instant::now();
    let mut c = InCluster::new(t0, &[1, 2]);
    c.leader = false;
    c.peers = vec![peer(2, State::Alive), peer(3, State::Alive)];
    c.revoked = vec![2];
    let mut f = machine(1, t0);
    assert_eq!(
        f.decide(&c.obs(), &answers(&[(3, &[])])),
        vec![Action::AdoptCarried]
    );
}

// ---- rule 4: shrink ----

#[test]
fn a_revoked_member_goes_at_once_and_its_report_with_it() {
    let t0 = Instant::now();
    let mut f = machine(1, t0);
    let mut c = InCluster::new(t0, &[1, 2, 3]);
    c.learners = vec![4];
    c.peers = vec![
        peer(2, State::Alive),
        peer(3, State::Alive),
        peer(4, State::Alive),
    ];
    c.revoked = vec![3];
    assert_eq!(
        f.decide(&c.obs(), &Answers::new()).last(),
        Some(&Action::Remove {
            id: 3,
            node: node(3),
            voter: true,
            why: Removal::Revoked,
            forget: true,
        })
    );
    // A revoked learner goes too, not being a voter.
    c.revoked = vec![4];
    assert_eq!(
        f.decide(&c.obs(), &Answers::new()).last(),
        Some(&Action::Remove {
            id: 4,
            node: node(4),
            voter: false,
            why: Removal::Revoked,
            forget: true,
        })
    );
}

#[test]
fn forget_table() {
    let t0 = Instant::now();
    // (name, revoked id, reported?, its name admitted again?, member?, forgets?)
    let cases = [
        (
            "revoked, no member, reported: forget",
            7,
            true,
            false,
            false,
            true,
        ),
        (
            "nothing to forget without a report",
            7,
            false,
            false,
            false,
            false,
        ),
        (
            "a replacement under the old name keeps it",
            7,
            true,
            true,
            false,
            false,
        ),
        ("a member is removed instead", 7, true, false, true, false),
    ];
    for (name, id, reported, reused, member, forgets) in cases {
        let mut f = machine(1, t0);
        let mut c = InCluster::new(t0, &[1, 2]);
        c.peers = vec![peer(2, State::Alive)];
        if member {
            c.learners = vec![id];
        }
        c.revoked = vec![id];
        if reported {
            c.reported = vec![id];
        }
        let mut obs = c.obs();
        if reused {
            obs.admitted.push(Admitted {
                id: 70,
                rack: format!("r{id}"),
            });
        }
        let got = f.decide(&obs, &Answers::new());
        assert_eq!(
            got.contains(&Action::ForgetRack {
                rack: format!("r{id}")
            }),
            forgets,
            "{name}: {got:?}"
        );
    }
    // A revoked rack under this rack's own name is a replacement too.
    let mut f = Formation::new(
        1,
        RackNode {
            rack: "r7".into(),
            peer_id: "p1".into(),
        },
        settings(),
        t0,
    );
    let mut c = InCluster::new(t0, &[1]);
    c.revoked = vec![7];
    c.reported = vec![7];
    assert_eq!(
        f.decide(&c.obs(), &Answers::new()),
        vec![Action::AdoptCarried]
    );
}

#[test]
fn a_dead_voter_goes_after_remove_dead_after_and_never_this_rack() {
    let t0 = Instant::now();
    let limit = settings().remove_dead_after.expect("set");
    let mut f = machine(1, t0);
    let mut c = InCluster::new(t0, &[1, 2, 3]);
    c.peers = vec![peer(2, State::Alive), peer(3, State::Dead)];
    let removes = |f: &mut Formation, c: &InCluster| {
        f.decide(&c.obs(), &Answers::new())
            .into_iter()
            .filter(|a| matches!(a, Action::Remove { .. }))
            .collect::<Vec<_>>()
    };
    assert!(removes(&mut f, &c).is_empty(), "dead from now");
    c.now = t0 + limit - Duration::from_millis(1);
    assert!(removes(&mut f, &c).is_empty(), "not yet");
    // Seen suspected (not dead) restarts the clock.
    c.peers[1].state = State::Suspect;
    assert!(removes(&mut f, &c).is_empty());
    c.peers[1].state = State::Dead;
    let back = c.now;
    assert!(removes(&mut f, &c).is_empty());
    c.now = back + limit;
    assert_eq!(
        removes(&mut f, &c),
        vec![Action::Remove {
            id: 3,
            node: node(3),
            voter: true,
            why: Removal::DeadFor(limit),
            forget: false,
        }]
    );
    // Never: with no limit.
    let mut never = Formation::new(
        1,
        node(1),
        FormationSettings {
            remove_dead_after: None,
            ..settings()
        },
        t0,
    );
    c.now = t0;
    removes(&mut never, &c);
    c.now = t0 + Duration::from_secs(86_400);
    assert!(removes(&mut never, &c).is_empty());
    // Never this rack, even revoked and dead in its own view.
    let mut c = InCluster::new(t0, &[1, 2]);
    c.peers = vec![peer(2, State::Alive)];
    c.revoked = vec![1];
    assert!(removes(&mut f, &c).is_empty());
}

#[test]
fn removal_reasons_read_as_before() {
    assert_eq!(Removal::Revoked.to_string(), "its certificate was revoked");
    assert_eq!(
        Removal::DeadFor(Duration::from_secs(600)).to_string(),
        "dead for 600s"
    );
}

// ---- elections ----

#[test]
fn election_gate_table() {
    // (name, voters, answers (voter, its leader, its log newer), elect)
    type Case = (
        &'static str,
        usize,
        Vec<(NodeId, Option<NodeId>, bool)>,
        bool,
    );
    let cases: Vec<Case> = vec![
        ("alone of three: hold", 3, vec![], false),
        (
            "two of three, nobody led: elect",
            3,
            vec![(2, None, false)],
            true,
        ),
        (
            "a reached voter follows a reached leader: hold",
            3,
            vec![(2, Some(3), false), (3, Some(3), false)],
            false,
        ),
        (
            "its leader is out of reach: elect",
            3,
            vec![(2, Some(3), false)],
            true,
        ),
        (
            "a voter still names us: elect",
            3,
            vec![(2, Some(1), false)],
            true,
        ),
        (
            "two of four is no majority: hold",
            4,
            vec![(2, None, false)],
            false,
        ),
        (
            "the one voter reached has a newer log: hold (it must stand)",
            3,
            vec![(2, None, true)],
            false,
        ),
        (
            "one of two reached has a newer log: still a majority",
            3,
            vec![(2, None, true), (3, None, false)],
            true,
        ),
    ];
    for (name, voters, answers, elect) in cases {
        let g = election_gate(1, voters, &answers);
        assert_eq!(g.elect, elect, "{name}");
        assert_eq!(g.reachable, answers.len() + 1, "{name}");
        assert_eq!(g.voters, voters, "{name}");
    }
}

// ---- wins ----

proptest! {
    /// Of two distinct clusters exactly one wins, so the two sides of a
    /// merge never both leave, nor both stay.
    #[test]
    fn exactly_one_of_two_distinct_clusters_wins(
        a in proptest::collection::btree_set(0u64..12, 1..6),
        b in proptest::collection::btree_set(0u64..12, 1..6),
    ) {
        prop_assume!(a != b);
        prop_assert!(wins(&a, &b) != wins(&b, &a));
    }
}

#[test]
fn a_rack_in_no_cluster_follows_one_leader_adding_it() {
    // Two clusters that both see a rack in none may both add it: it
    // follows the first, or it would take entries of both logs.
    let t0 = Instant::now();
    let mut f = machine(5, t0);
    let empty = Membership::default();
    assert_eq!(f.refusal(Some(1), &empty, t0), None);
    assert_eq!(
        f.refusal(Some(9), &empty, at(t0, 100)),
        Some(Refusal::BeingAdded { by: 1, from: 9 })
    );
    // The first keeps calling: still it alone.
    assert_eq!(f.refusal(Some(1), &empty, at(t0, 400)), None);
    let silence = settings().heartbeat * LEADER_SILENCE_HEARTBEATS;
    assert!(f
        .refusal(Some(9), &empty, at(t0, 400) + silence / 2)
        .is_some());
    // Silent for longer than a leader may be: another may add it.
    assert_eq!(f.refusal(Some(9), &empty, at(t0, 401) + silence), None);
    // Once the membership arrived, members are heard and others refused.
    let mut m = Membership::default();
    m.voters.insert(9);
    m.nodes.insert(9, Default::default());
    m.nodes.insert(5, Default::default());
    assert_eq!(f.refusal(Some(9), &m, at(t0, 500) + silence), None);
    assert_eq!(
        f.refusal(Some(1), &m, at(t0, 500) + silence),
        Some(Refusal::Foreign(1))
    );
}
