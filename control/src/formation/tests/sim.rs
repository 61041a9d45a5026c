//! A deterministic simulated field: N racks (some of them witnesses), each
//! running [`Formation`] every [`CHECK_EVERY`], over a simulated Raft
//! membership and a simulated mesh, with seeded boot orders, partitions
//! and heals, revocations (one of them right after the rack became a
//! learner, before its promotion) and racks turning foreign.
//!
//! The simulated Raft keeps what formation relies on: a cluster commits a
//! membership change only through a leader that reaches a majority of its
//! voters; a member learns the membership only from its cluster's leader;
//! a rack accepts a leader's calls only if [`Formation::refusal`] says so;
//! leaving wipes a rack's membership. A leader stays while it reaches a
//! majority; then a seeded pick among the voters that do leads (Raft's
//! elections, without terms or logs, which formation does not read).
//!
//! Checked on every seed:
//! - a revoked or foreign rack is never added as a learner nor promoted;
//! - a rack never forms a cluster while a rack it reaches is in one;
//! - once the field is whole again, two clusters that both hold a
//!   majority of their voters (both have a leader) never stay side by side
//!   longer than a merge takes;
//! - within a bounded simulated time after the last fault, the field is
//!   one cluster whose voters are exactly the admitted, unrevoked racks,
//!   revoked racks' reports are forgotten, and it stays so.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use mesh::membership::State;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::super::*;

/// Seeds run by [`every_seed_converges_safely`].
const SEEDS: u64 = 500;

/// After the last fault, the field must be one cluster within this long:
/// `remove_dead_after` (10 s, for a foreign rack), a merge (settle, 2 s)
/// and a learner + promotion per rack, with room to spare.
const CONVERGE_WITHIN: Duration = Duration::from_secs(40);

/// Once converged, the field must stay so this long.
const STAY_FOR: Duration = Duration::from_secs(10);

/// Two clusters with leaders that reach each other must be one within
/// this long: `settle` worth of sightings, a check to leave, and a few
/// checks for the stragglers.
const MERGE_WITHIN: Duration = Duration::from_secs(5);

fn settings() -> FormationSettings {
    super::settings()
}

/// A scheduled fault.
#[derive(Debug, Clone)]
enum Fault {
    /// Every rack's partition group (same group: reachable).
    Partition(Vec<usize>),
    /// Everyone reaches everyone.
    Heal,
    /// Revoke rack i (if the field keeps a majority without it).
    Revoke(usize),
    /// Rack i's certificate stops being accepted (not admitted, not
    /// revoked: it simply vanishes from the mesh).
    Foreign(usize),
}

#[derive(Debug, Clone)]
struct Scenario {
    /// (node id, rack name, boot offset).
    racks: Vec<(NodeId, String, Duration)>,
    /// Faults by time offset.
    faults: Vec<(Duration, Fault)>,
    /// Revoke this rack the moment it is added as a learner.
    revoke_on_learner: Option<usize>,
}

impl Scenario {
    fn random(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.gen_range(3..=6);
        let witnesses = rng.gen_range(0..=1);
        let mut ids: BTreeSet<NodeId> = BTreeSet::new();
        while ids.len() < n {
            ids.insert(rng.gen_range(1..1_000));
        }
        let mut ids: Vec<NodeId> = ids.into_iter().collect();
        ids.shuffle(&mut rng);
        let racks = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let name = if i < witnesses {
                    format!("witness-{i}")
                } else {
                    format!("rack-{i}")
                };
                (*id, name, Duration::from_millis(rng.gen_range(0..60) * 100))
            })
            .collect();
        let secs = |rng: &mut StdRng, lo: u64, hi: u64| {
            Duration::from_millis(rng.gen_range(lo * 10..hi * 10) * 100)
        };
        let split = |rng: &mut StdRng| -> Vec<usize> {
            let groups = rng.gen_range(2..=3);
            (0..n).map(|_| rng.gen_range(0..groups)).collect()
        };
        let mut faults = Vec::new();
        match rng.gen_range(0..4) {
            // Cut off from each other at first boot.
            0 => {
                faults.push((Duration::ZERO, Fault::Partition(split(&mut rng))));
                let heal = secs(&mut rng, 4, 25);
                faults.push((heal, Fault::Heal));
            }
            // A partition once the field formed (long ones outlast
            // remove_dead_after).
            1 => {
                let at = secs(&mut rng, 8, 20);
                faults.push((at, Fault::Partition(split(&mut rng))));
                let heal = at + secs(&mut rng, 2, 30);
                faults.push((heal, Fault::Heal));
            }
            // Both, with a flapping link in between.
            2 => {
                faults.push((Duration::ZERO, Fault::Partition(split(&mut rng))));
                let heal = secs(&mut rng, 3, 12);
                faults.push((heal, Fault::Heal));
                let again = heal + secs(&mut rng, 0, 4);
                faults.push((again, Fault::Partition(split(&mut rng))));
                faults.push((again + secs(&mut rng, 1, 15), Fault::Heal));
            }
            _ => {}
        }
        // At most a minority of the field goes bad, so a majority remains.
        let bad_max = (n - 1) / 2;
        let mut bad: Vec<usize> = (0..n).collect();
        bad.shuffle(&mut rng);
        bad.truncate(rng.gen_range(0..=bad_max));
        let mut revoke_on_learner = None;
        for i in bad {
            match rng.gen_range(0..3) {
                0 => faults.push((secs(&mut rng, 0, 25), Fault::Revoke(i))),
                1 => faults.push((secs(&mut rng, 0, 25), Fault::Foreign(i))),
                _ => {
                    // Mid-promotion, or later if it never is a learner.
                    revoke_on_learner = Some(i);
                    faults.push((Duration::from_secs(30), Fault::Revoke(i)));
                }
            }
        }
        faults.sort_by_key(|(t, _)| *t);
        Scenario {
            racks,
            faults,
            revoke_on_learner,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Cluster {
    membership: Membership,
    /// Its leader (a rack index), kept while it holds a majority; then
    /// a seeded pick among the voters that do (an election).
    leader: Option<usize>,
    /// Racks with a report in this cluster's field state.
    reported: BTreeSet<String>,
}

struct SimRack {
    id: NodeId,
    name: String,
    boot_at: Instant,
    formation: Option<Formation>,
    revoked: bool,
    foreign: bool,
    group: usize,
    /// The membership this rack knows (what its Raft state holds).
    known: Membership,
    /// The cluster it replicates from (stays set when removed: its state
    /// is stale, not gone).
    cluster: Option<u64>,
    last_append: Instant,
}

struct Field {
    racks: Vec<SimRack>,
    clusters: BTreeMap<u64, Cluster>,
    next_cluster: u64,
    now: Instant,
    t0: Instant,
    revoke_on_learner: Option<usize>,
    /// Since when two leader-holding clusters have reached each other.
    side_by_side: BTreeMap<(u64, u64), Instant>,
    trace: Vec<String>,
    stats: Stats,
    /// Elections and the order racks check in.
    rng: StdRng,
}

/// What the seeds exercised, so a run shows it covered the hard cases.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    /// Clusters formed.
    bootstraps: u32,
    /// Racks that left a cluster for a winner.
    leaves: u32,
    /// Racks revoked right after becoming learners.
    revoked_mid_promotion: u32,
    /// Members taken out (dead or revoked).
    removals: u32,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Self) {
        self.bootstraps += o.bootstraps;
        self.leaves += o.leaves;
        self.revoked_mid_promotion += o.revoked_mid_promotion;
        self.removals += o.removals;
    }
}

impl Field {
    fn new(seed: u64, s: &Scenario) -> Self {
        let t0 = Instant::now();
        Field {
            racks: s
                .racks
                .iter()
                .map(|(id, name, boot)| SimRack {
                    id: *id,
                    name: name.clone(),
                    boot_at: t0 + *boot,
                    formation: None,
                    revoked: false,
                    foreign: false,
                    group: 0,
                    known: Membership::default(),
                    cluster: None,
                    last_append: t0,
                })
                .collect(),
            clusters: BTreeMap::new(),
            next_cluster: 1,
            now: t0,
            t0,
            revoke_on_learner: s.revoke_on_learner,
            side_by_side: BTreeMap::new(),
            trace: Vec::new(),
            stats: Stats::default(),
            rng: StdRng::seed_from_u64(seed ^ 0x5eed),
        }
    }

    fn rack_node(&self, i: usize) -> RackNode {
        RackNode {
            rack: self.racks[i].name.clone(),
            peer_id: format!("peer-{}", self.racks[i].id),
        }
    }

    fn index(&self, id: NodeId) -> usize {
        self.racks
            .iter()
            .position(|r| r.id == id)
            .expect("a known node id")
    }

    fn booted(&self, i: usize) -> bool {
        self.now >= self.racks[i].boot_at
    }

    fn good(&self, i: usize) -> bool {
        !self.racks[i].revoked && !self.racks[i].foreign
    }

    fn reachable(&self, i: usize, j: usize) -> bool {
        i == j
            || (self.booted(i)
                && self.booted(j)
                && self.good(i)
                && self.good(j)
                && self.racks[i].group == self.racks[j].group)
    }

    /// The cluster's leader, if it still holds a majority.
    fn leader(&self, c: u64) -> Option<usize> {
        let l = self.clusters[&c].leader?;
        self.electable(c).contains(&l).then_some(l)
    }

    /// Elections: a cluster whose leader lost its majority gets a new one,
    /// picked by the seed among the voters that reach a majority.
    fn elect(&mut self) {
        let cids: Vec<u64> = self.clusters.keys().copied().collect();
        for c in cids {
            if self.leader(c).is_some() {
                continue;
            }
            let new = self.electable(c).choose(&mut self.rng).copied();
            self.clusters.get_mut(&c).expect("cluster").leader = new;
        }
    }

    /// The voters of cluster `c` active in it that reach a majority of
    /// its voters.
    fn electable(&self, c: u64) -> Vec<usize> {
        let voters = &self.clusters[&c].membership.voters;
        let active = |i: usize| {
            self.booted(i) && self.racks[i].cluster == Some(c) && voters.contains(&self.racks[i].id)
        };
        let mut candidates: Vec<usize> = voters
            .iter()
            .map(|v| self.index(*v))
            .filter(|i| active(*i))
            .collect();
        candidates.sort_by_key(|i| self.racks[*i].id);
        candidates.retain(|l| {
            let reached = voters
                .iter()
                .map(|v| self.index(*v))
                .filter(|v| active(*v) && self.reachable(*l, *v))
                .count();
            reached * 2 > voters.len()
        });
        candidates
    }

    /// Leaders replicate the membership to the members they reach, and
    /// the racks they reach renew (a report).
    fn sync(&mut self) {
        self.elect();
        let cids: Vec<u64> = self.clusters.keys().copied().collect();
        for c in cids {
            let Some(l) = self.leader(c) else { continue };
            let m = self.clusters[&c].membership.clone();
            for i in 0..self.racks.len() {
                if self.racks[i].cluster == Some(c)
                    && m.nodes.contains_key(&self.racks[i].id)
                    && self.reachable(l, i)
                {
                    self.racks[i].known = m.clone();
                    self.racks[i].last_append = self.now;
                    let name = self.racks[i].name.clone();
                    self.clusters
                        .get_mut(&c)
                        .expect("cluster")
                        .reported
                        .insert(name);
                }
            }
        }
    }

    fn observe(&self, i: usize) -> Observation {
        let r = &self.racks[i];
        let initialized = !r.known.voters.is_empty();
        let leader = r.cluster.and_then(|c| self.leader(c)) == Some(i);
        let others = (0..self.racks.len()).filter(|j| *j != i);
        Observation {
            now: self.now,
            raft: RaftView {
                initialized,
                leader,
                last_append: r.last_append,
                membership: r.known.clone(),
                cluster: r.cluster,
            },
            admitted: others
                .clone()
                .filter(|j| self.reachable(i, *j))
                .map(|j| Admitted {
                    id: self.racks[j].id,
                    rack: self.racks[j].name.clone(),
                })
                .collect(),
            mesh: initialized.then(|| MeshView {
                peers: others
                    .clone()
                    .filter(|j| self.booted(*j) && !self.racks[*j].foreign)
                    .map(|j| PeerSeen {
                        id: self.racks[j].id,
                        peer_id: format!("peer-{}", self.racks[j].id),
                        rack: Some(self.racks[j].name.clone()),
                        site: None,
                        state: if self.reachable(i, j) {
                            State::Alive
                        } else {
                            State::Dead
                        },
                    })
                    .collect(),
                revoked: (0..self.racks.len())
                    .filter(|j| self.racks[*j].revoked)
                    .map(|j| {
                        (
                            format!("peer-{}", self.racks[j].id),
                            self.racks[j].name.clone(),
                        )
                    })
                    .collect(),
            }),
            reported: r
                .cluster
                .map(|c| self.clusters[&c].reported.clone())
                .unwrap_or_default(),
        }
    }

    fn answers(&self, i: usize, asks: &Asks) -> Answers {
        asks.keys()
            .map(|id| self.index(*id))
            .filter(|j| self.reachable(i, *j))
            .map(|j| {
                let known = &self.racks[j].known;
                (
                    self.racks[j].id,
                    Hello {
                        initialized: !known.voters.is_empty(),
                        voters: known.voters.clone(),
                        cluster: self.racks[j].cluster,
                    },
                )
            })
            .collect()
    }

    fn t(&self) -> f64 {
        self.now.duration_since(self.t0).as_secs_f64()
    }

    fn fail(&self, seed: u64, what: &str) -> ! {
        let trace = self
            .trace
            .iter()
            .rev()
            .take(40)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        panic!(
            "seed {seed}: at t={:.1}s: {what}\nlast events:\n{trace}",
            self.t()
        );
    }

    /// The leader-only change `action` by rack `i` (checked against the
    /// simulated Raft).
    fn leads(&self, i: usize) -> Option<u64> {
        let c = self.racks[i].cluster?;
        (self.leader(c) == Some(i)).then_some(c)
    }

    fn perform(
        &mut self,
        seed: u64,
        i: usize,
        f: &mut Formation,
        action: Action,
        answers: &Answers,
    ) {
        let me = self.racks[i].id;
        self.trace.push(format!(
            "t={:.1} {}({me}): {action:?}",
            self.t(),
            self.racks[i].name
        ));
        match action {
            Action::Wait(_) | Action::AdoptCarried => {}
            Action::Bootstrap { voters } => {
                if let Some(j) = (0..self.racks.len()).find(|j| {
                    *j != i && self.reachable(i, *j) && !self.racks[*j].known.voters.is_empty()
                }) {
                    self.fail(
                        seed,
                        &format!(
                            "{} formed a cluster beside {}'s",
                            self.racks[i].name, self.racks[j].name
                        ),
                    );
                }
                let c = self.next_cluster;
                self.next_cluster += 1;
                self.stats.bootstraps += 1;
                let membership = Membership {
                    voters: voters.keys().copied().collect(),
                    nodes: voters,
                };
                self.clusters.insert(
                    c,
                    Cluster {
                        membership: membership.clone(),
                        leader: Some(i),
                        reported: BTreeSet::new(),
                    },
                );
                self.racks[i].cluster = Some(c);
                self.racks[i].known = membership;
            }
            Action::Leave { .. } => {
                self.stats.leaves += 1;
                self.racks[i].cluster = None;
                self.racks[i].known = Membership::default();
            }
            Action::AddLearner { id, node } => {
                let Some(c) = self.leads(i) else { return };
                let j = self.index(id);
                if !self.reachable(i, j) {
                    return; // the call fails
                }
                if !self.good(j) {
                    self.fail(
                        seed,
                        &format!("{} added as a learner while revoked or foreign", node.rack),
                    );
                }
                let now = self.now;
                let rack = &mut self.racks[j];
                let accepts = match rack.formation.as_mut() {
                    Some(fj) => fj.refusal(Some(me), &rack.known, now).is_none(),
                    None => false,
                };
                if !accepts {
                    return;
                }
                let cl = self.clusters.get_mut(&c).expect("cluster");
                cl.membership.nodes.insert(id, node);
                let m = cl.membership.clone();
                self.racks[j].cluster = Some(c);
                self.racks[j].known = m;
                if self.revoke_on_learner == Some(j) {
                    self.revoke_on_learner = None;
                    self.racks[j].revoked = true;
                    self.stats.revoked_mid_promotion += 1;
                    self.trace.push(format!(
                        "t={:.1} {} revoked mid-promotion",
                        self.t(),
                        self.racks[j].name
                    ));
                }
                // As node.rs does: look again, promote if grow still says so.
                self.sync();
                let obs = self.observe(i);
                if let Some(next @ Action::Promote { .. }) = f.grow(&obs, answers) {
                    self.perform(seed, i, f, next, answers);
                }
            }
            Action::Promote { id, rack } => {
                let Some(c) = self.leads(i) else { return };
                let j = self.index(id);
                if !self.good(j) {
                    self.fail(
                        seed,
                        &format!("{rack} promoted to voter while revoked or foreign"),
                    );
                }
                if !self.reachable(i, j) || !self.clusters[&c].membership.nodes.contains_key(&id) {
                    return;
                }
                self.clusters
                    .get_mut(&c)
                    .expect("cluster")
                    .membership
                    .voters
                    .insert(id);
            }
            Action::ForgetRack { rack } => {
                let Some(c) = self.leads(i) else { return };
                self.clusters
                    .get_mut(&c)
                    .expect("cluster")
                    .reported
                    .remove(&rack);
            }
            Action::Remove {
                id, node, forget, ..
            } => {
                let Some(c) = self.leads(i) else { return };
                if id == me {
                    self.fail(seed, "the leader removed itself");
                }
                let cl = self.clusters.get_mut(&c).expect("cluster");
                cl.membership.voters.remove(&id);
                cl.membership.nodes.remove(&id);
                self.stats.removals += 1;
                if forget {
                    cl.reported.remove(&node.rack);
                }
                f.removed(id);
            }
        }
        self.sync();
    }

    /// Apply a fault, unless it would take a majority of some cluster's
    /// voters away for good (then it is dropped: the field is assumed to
    /// keep a majority).
    fn fault(&mut self, fault: &Fault) {
        match fault {
            Fault::Partition(groups) => {
                for (r, g) in self.racks.iter_mut().zip(groups) {
                    r.group = *g;
                }
            }
            Fault::Heal => self.racks.iter_mut().for_each(|r| r.group = 0),
            Fault::Revoke(i) | Fault::Foreign(i) => {
                let i = *i;
                let id = self.racks[i].id;
                let survivable = self.clusters.values().all(|c| {
                    let v = &c.membership.voters;
                    !v.contains(&id) || {
                        let rest = v
                            .iter()
                            .filter(|x| **x != id && self.good(self.index(**x)))
                            .count();
                        rest * 2 > v.len()
                    }
                });
                if !survivable || !self.good(i) {
                    self.trace
                        .push(format!("t={:.1} {fault:?} dropped", self.t()));
                    return;
                }
                if matches!(fault, Fault::Revoke(_)) {
                    self.racks[i].revoked = true;
                } else {
                    self.racks[i].foreign = true;
                }
                if self.revoke_on_learner == Some(i) {
                    self.revoke_on_learner = None;
                }
            }
        }
        self.trace
            .push(format!("t={:.1} fault {fault:?}", self.t()));
    }

    /// One check of every booted rack, in a seeded order.
    fn step(&mut self, seed: u64) {
        let mut order: Vec<usize> = (0..self.racks.len()).filter(|i| self.booted(*i)).collect();
        order.shuffle(&mut self.rng);
        for i in order {
            let mut f = match self.racks[i].formation.take() {
                Some(f) => f,
                None => Formation::new(
                    self.racks[i].id,
                    self.rack_node(i),
                    settings(),
                    self.racks[i].boot_at,
                ),
            };
            self.sync();
            let obs = self.observe(i);
            let asks = f.asks(&obs);
            let answers = self.answers(i, &asks);
            for action in f.decide(&obs, &answers) {
                self.perform(seed, i, &mut f, action, &answers);
            }
            self.racks[i].formation = Some(f);
        }
    }

    /// Two leader-holding clusters that reach each other are one within
    /// [`MERGE_WITHIN`].
    fn check_side_by_side(&mut self, seed: u64) {
        let led: Vec<(u64, usize)> = self
            .clusters
            .keys()
            .filter_map(|c| Some((*c, self.leader(*c)?)))
            .collect();
        let mut now_side = BTreeSet::new();
        for (a, la) in &led {
            for (b, lb) in &led {
                if a < b && self.reachable(*la, *lb) {
                    now_side.insert((*a, *b));
                }
            }
        }
        self.side_by_side.retain(|k, _| now_side.contains(k));
        for k in now_side {
            let since = *self.side_by_side.entry(k).or_insert(self.now);
            if self.now.duration_since(since) > MERGE_WITHIN {
                self.fail(
                    seed,
                    &format!("clusters {} and {} both hold a majority of their voters and reach each other", k.0, k.1),
                );
            }
        }
    }

    /// The field is one cluster of exactly the good racks, every one of
    /// them knowing it, and no revoked rack's report remains.
    fn converged(&self) -> Result<(), String> {
        let good: BTreeSet<NodeId> = (0..self.racks.len())
            .filter(|i| self.good(*i))
            .map(|i| self.racks[i].id)
            .collect();
        let any = (0..self.racks.len())
            .find(|i| self.good(*i))
            .ok_or("no good rack")?;
        let c = self.racks[any]
            .cluster
            .ok_or("a good rack is in no cluster")?;
        let cl = &self.clusters[&c];
        self.leader(c).ok_or("no leader")?;
        // Every rack votes up to MAX_VOTERS; past that, voters are some
        // of the racks and the rest learners.
        let voters_ok = if good.len() <= MAX_VOTERS {
            cl.membership.voters == good
        } else {
            cl.membership.voters.len() == MAX_VOTERS && cl.membership.voters.is_subset(&good)
        };
        if !voters_ok {
            return Err(format!(
                "voters {:?}, admitted racks {good:?}",
                cl.membership.voters
            ));
        }
        if cl.membership.nodes.keys().copied().collect::<BTreeSet<_>>() != good {
            return Err(format!("members {:?}", cl.membership.nodes.keys()));
        }
        for i in (0..self.racks.len()).filter(|i| self.good(*i)) {
            if self.racks[i].cluster != Some(c) || self.racks[i].known != cl.membership {
                return Err(format!("{} is not in the cluster", self.racks[i].name));
            }
        }
        for r in self.racks.iter().filter(|r| r.revoked) {
            if cl.reported.contains(&r.name) {
                return Err(format!("revoked {}'s report is kept", r.name));
            }
        }
        Ok(())
    }
}

/// Run one scenario; panics (naming the seed) on a broken invariant.
/// Returns how long after the last fault the field was one cluster, and
/// what it exercised.
fn run(seed: u64, scenario: &Scenario) -> (Duration, Stats) {
    let mut field = Field::new(seed, scenario);
    let last_boot = scenario.racks.iter().map(|r| r.2).max().unwrap_or_default();
    let last_fault = scenario
        .faults
        .iter()
        .map(|f| f.0)
        .max()
        .unwrap_or_default()
        .max(last_boot);
    let mut faults = scenario.faults.iter().peekable();
    let mut converged_at: Option<Instant> = None;
    loop {
        field.now += CHECK_EVERY;
        let elapsed = field.now.duration_since(field.t0);
        while let Some((_, fault)) = faults.next_if(|(t, _)| *t <= elapsed) {
            field.fault(fault);
        }
        field.step(seed);
        let healed = elapsed > last_fault;
        if healed {
            field.check_side_by_side(seed);
        }
        if !healed {
            continue;
        }
        match (field.converged(), converged_at) {
            (Ok(()), None) => converged_at = Some(field.now),
            (Ok(()), Some(at)) if field.now.duration_since(at) >= STAY_FOR => {
                return (at.duration_since(field.t0 + last_fault), field.stats);
            }
            (Ok(()), Some(_)) => {}
            (Err(why), Some(_)) => field.fail(seed, &format!("converged, then not: {why}")),
            (Err(why), None) => {
                if elapsed > last_fault + CONVERGE_WITHIN {
                    field.fail(
                        seed,
                        &format!("not one cluster {CONVERGE_WITHIN:?} after the last fault: {why}"),
                    );
                }
            }
        }
    }
}

#[test]
fn every_seed_converges_safely() {
    let mut slowest = Duration::ZERO;
    let mut stats = Stats::default();
    for seed in 0..SEEDS {
        let scenario = Scenario::random(seed);
        let (took, s) = run(seed, &scenario);
        slowest = slowest.max(took);
        stats += s;
    }
    eprintln!(
        "{SEEDS} seeds: the slowest field was one cluster {slowest:?} after its last fault; {stats:?}"
    );
    // The seeds must exercise what they are meant to, or they prove little.
    assert!(
        stats.leaves > 0 && stats.revoked_mid_promotion > 0 && stats.removals > 0,
        "{stats:?}"
    );
}

#[test]
fn every_boot_order_of_four_racks_forms_one_cluster() {
    let ids = [40, 10, 30, 20];
    let mut orders = vec![vec![0usize, 1, 2, 3]];
    // All 24 permutations (Heap's algorithm would do; these are few).
    let mut all = Vec::new();
    for a in 0..4 {
        for b in 0..4 {
            for c in 0..4 {
                for d in 0..4 {
                    let p = vec![a, b, c, d];
                    if p.iter().collect::<BTreeSet<_>>().len() == 4 {
                        all.push(p);
                    }
                }
            }
        }
    }
    orders.extend(all);
    for (n, order) in orders.iter().enumerate() {
        // Boots 3 s apart, longer than settle: each early rack may form
        // its own cluster before the next one boots.
        let racks = order
            .iter()
            .enumerate()
            .map(|(k, i)| {
                (
                    ids[*i],
                    format!("rack-{i}"),
                    Duration::from_secs(3 * k as u64),
                )
            })
            .collect();
        let (_, stats) = run(
            n as u64,
            &Scenario {
                racks,
                faults: Vec::new(),
                revoke_on_learner: None,
            },
        );
        assert_eq!(
            stats.removals, 0,
            "order {order:?}: nobody is dead or revoked"
        );
    }
}

/// A field of 32 racks powered on within a few seconds, cut into several
/// groups at first: many small clusters form, then merge as the groups
/// reach each other. Racks leave one cluster for another while the
/// others still list them, so a rack may find itself listed by a cluster
/// it is not in: it must still tell that cluster from its own.
#[test]
fn thirty_two_racks_booting_at_once_form_one_cluster() {
    for seed in 0..4 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut ids: BTreeSet<NodeId> = BTreeSet::new();
        while ids.len() < 32 {
            ids.insert(rng.gen_range(1..100_000));
        }
        let racks: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let boot = Duration::from_millis(rng.gen_range(0..40) * 100);
                (*id, format!("r{i:02}"), boot)
            })
            .collect();
        let groups = rng.gen_range(3..=8);
        let split = (0..32).map(|_| rng.gen_range(0..groups)).collect();
        let heal = Duration::from_millis(rng.gen_range(40..120) * 100);
        let scenario = Scenario {
            racks,
            faults: vec![
                (Duration::ZERO, Fault::Partition(split)),
                (heal, Fault::Heal),
            ],
            revoke_on_learner: None,
        };
        let (_, stats) = run(seed, &scenario);
        assert!(stats.leaves > 0, "seed {seed}: clusters merged: {stats:?}");
    }
}

#[test]
fn racks_cut_off_at_first_boot_merge_into_the_larger_cluster() {
    // 3 | 2 at first boot: both sides form; on heal the side of two
    // leaves (fewer voters of its own) and the field is one cluster.
    let racks: Vec<_> = [5, 9, 2, 7, 3]
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, format!("rack-{i}"), Duration::ZERO))
        .collect();
    let scenario = Scenario {
        racks,
        faults: vec![
            (Duration::ZERO, Fault::Partition(vec![0, 0, 1, 0, 1])),
            (Duration::from_secs(10), Fault::Heal),
        ],
        revoke_on_learner: None,
    };
    let (_, stats) = run(1, &scenario);
    assert_eq!(stats.bootstraps, 2, "each side formed a cluster");
    assert_eq!(stats.leaves, 2, "both racks of the smaller side left");
}

#[test]
fn a_rack_revoked_mid_promotion_never_votes_and_is_forgotten() {
    let racks: Vec<_> = [5, 9, 2]
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, format!("rack-{i}"), Duration::from_secs(i as u64)))
        .collect();
    for seed in 0..20 {
        let scenario = Scenario {
            racks: racks.clone(),
            faults: Vec::new(),
            // rack-1 (id 9) boots last but one; it is revoked the moment
            // it becomes a learner.
            revoke_on_learner: Some(1),
        };
        let (_, stats) = run(seed, &scenario);
        assert_eq!(stats.revoked_mid_promotion, 1, "seed {seed}");
    }
}
