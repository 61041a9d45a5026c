//! SWIM failure detection and membership gossip, as a sans-IO state machine.
//!
//! [`Membership`] is driven by [`Membership::handle`]: the swarm actor feeds it
//! [`Input`]s (a ~100 ms tick, received messages, connection and revocation
//! events) and carries out the returned [`Output`]s over libp2p. There is no
//! I/O, clock or global RNG inside: time comes in as `now`, randomness from a
//! caller-seeded [`StdRng`], so `mesh/tests/membership_sim.rs` runs whole
//! fleets deterministically with seeded loss, cuts, kills and restarts.
//!
//! The protocol is SWIM with the parts of Lifeguard that memberlist relies on
//! most:
//! - each probe interval, ping the next member of a shuffled round-robin
//!   order; without an ack within its probe timeout, ask up to
//!   `indirect_probes` other members to ping it (`PingReq`); without any ack
//!   by the end of the interval (or of the indirect legs' timeouts, if
//!   later), suspect it;
//! - the probe timeout follows each member's measured round trip
//!   (`rtt`: RFC 6298 `srtt + 4 rttvar`, floored by the configured
//!   `probe_timeout`, at most [`PROBE_TIMEOUT_CEILING`]), so a satellite hop
//!   is not a failed probe;
//! - Lifeguard's local health multiplier (`health`) stretches our own
//!   timeouts and interval while we miss acks or have to refute, so a rack
//!   with a bad link does not accuse everyone;
//! - Lifeguard's dynamic suspicion (`suspicion`): a suspicion not refuted
//!   in time becomes a death; it lasts from [`SUSPICION_MAX_MULT`] times
//!   `suspect_timeout` down to `suspect_timeout` as distinct accusers
//!   (named in [`Update::accuser`]) confirm it;
//! - state spreads by piggybacking updates on every message, and the
//!   incarnation number orders them (see [`overrides`]);
//! - "buddy system": any message to a member we hold as suspect or dead
//!   carries that record first, so the member refutes it at once.
//!
//! Additions over plain SWIM, each because a simulated scenario needed it:
//! - every [`DEAD_POKE_ROUNDS`] probe rounds we ping one random dead member,
//!   so a healed partition merges again even if the swarm never reports a
//!   reconnect (the ping carries the dead record; the member refutes it);
//! - when a message shows that a peer holds a stale or wrong record of us,
//!   our own record rides on our next messages to it, and if we had to refute
//!   and the message was not a ping (so no reply is due), we ping it;
//! - likewise, a non-ping message (ack, ping-req) from a member we hold as
//!   suspect or dead gets a ping back carrying that record (at most one such
//!   ping per member per probe timeout), so a suspect whose own probes happen to go to dead
//!   racks still hears of its suspicion within milliseconds, not seconds;
//! - for the same reason, whoever starts suspecting a member (by its own
//!   probe or by gossip) pings it with the suspicion, and again on each
//!   tick (at most once per probe timeout) while it stays suspect, so a
//!   refutation never waits for a probe round that local health stretched;
//! - `meta_version` starts at `incarnation << 32`, so a restarted rack (which
//!   comes back with a higher, persisted incarnation) wins over the metadata
//!   of its previous life without persisting the version itself.
//!
//! Layout:
//! - this file: the public types and the state machine;
//! - `broadcast`: the bounded, retransmit-limited gossip queue;
//! - `rtt`, `health`, `suspicion`: the adaptive timings above;
//! - `tests`: unit tests (override rules, refutation, timers, hostile input).

mod broadcast;
mod health;
mod rtt;
mod suspicion;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

pub use broadcast::MAX_BROADCASTS;
pub use health::{LocalHealth, MAX_LOCAL_HEALTH};
pub use rtt::{leg_timeout, probe_timeout, RttEstimate, LEG_TIMEOUT_FLOOR, PROBE_TIMEOUT_CEILING};
pub use suspicion::{timeout as suspicion_timeout, SUSPICION_CONFIRMATIONS, SUSPICION_MAX_MULT};

use suspicion::Suspicion;

/// Most members tracked. The fleet is a few dozen racks; 1024 leaves ample
/// room while bounding memory and the O(n) scans a probe round does, and
/// stops a lying peer from growing the table without limit. Newcomers beyond
/// it are ignored.
pub const MAX_MEMBERS: usize = 1024;

/// Most revoked ids remembered. Revocations are rare operator actions, and
/// fleet admission refuses revoked certificates anyway, so this set is a
/// second line of defence; past the bound the oldest revocation is forgotten.
pub const MAX_REVOKED: usize = 4096;

/// Most outstanding pings we track by sequence number (pings relayed for
/// others' indirect probes, and fire-and-forget pokes). Entries also expire
/// after one probe interval. With ~1 probe per member per second and up to
/// 16 indirect requests each, a few dozen are live at a time; the bound stops
/// a flood of `PingReq`s from growing the map (the oldest entry is dropped).
pub const MAX_PENDING: usize = 256;

/// Most piggybacked updates applied from one received message. Senders put
/// at most `max_piggyback` (16 by default) plus two priority records on a
/// message; anything beyond this bound is a lying or misconfigured peer.
pub const MAX_UPDATES_PER_MESSAGE: usize = 256;

/// Most intermediaries asked per indirect probe, whatever the config says:
/// more adds load without adding much confidence.
pub const MAX_INDIRECT_PROBES: usize = 16;

/// How many messages to a member carry our own record after we learn it is
/// new (or new again): enough that one or two lost messages do not leave it
/// without our metadata.
pub const SELF_INTRO_MESSAGES: u8 = 3;

/// Ping one random dead member every this many probe rounds (2 s by
/// default): quick enough to merge a healed partition within a few seconds,
/// slow enough that truly dead racks cost almost nothing.
pub const DEAD_POKE_ROUNDS: u64 = 2;

/// Longest any configured duration is taken to be, so deadline arithmetic on
/// `Instant` can never overflow (which would panic).
pub const MAX_TIMER: Duration = Duration::from_secs(24 * 3600);

/// Gossip retransmission multiplier: each update is sent about
/// `RETRANSMIT_MULT * ceil(log2(n + 1))` times, n being the live fleet size.
pub const RETRANSMIT_MULT: u32 = 3;

/// Live members a verdict of ours (Suspect, Dead) is pushed to at once, in
/// a ping that carries it, instead of waiting for our next probe round to
/// piggyback it (memberlist's `GossipNodes`). Without the push, every hop
/// of a verdict waits up to a (health-stretched) probe interval, and a
/// killed rack's death reached the last survivor seconds after the first.
pub const SPREAD_FANOUT: usize = 3;

/// SWIM timings. See `deploy::config::MembershipConfig` for the TOML form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Period of the probe round (one direct probe per round).
    pub probe_interval: Duration,
    /// Wait at least this long for a direct ack before asking others to
    /// probe: the floor of each member's RTT-derived timeout, and the
    /// timeout while its RTT is not measured yet.
    pub probe_timeout: Duration,
    /// How many other members are asked to probe indirectly.
    pub indirect_probes: usize,
    /// How long a suspect has to refute before it is declared dead, once
    /// enough other racks confirmed the suspicion (the shortest suspicion;
    /// the longest is [`SUSPICION_MAX_MULT`] times this).
    pub suspect_timeout: Duration,
    /// How many gossip updates ride on each message (the buddy record and our
    /// own introduction come on top).
    pub max_piggyback: usize,
}

impl Config {
    /// The config from `rack.toml`'s `[membership]` section.
    pub fn from_toml(c: &deploy::config::MembershipConfig) -> Self {
        Self {
            probe_interval: Duration::from_millis(c.probe_interval_ms),
            probe_timeout: Duration::from_millis(c.probe_timeout_ms),
            indirect_probes: c.indirect_probes,
            suspect_timeout: Duration::from_millis(c.suspect_timeout_ms),
            max_piggyback: c.max_piggyback,
        }
    }

    /// Clamps values that would overflow deadline arithmetic or make messages
    /// unboundedly large.
    fn clamped(mut self) -> Self {
        self.probe_interval = self.probe_interval.min(MAX_TIMER);
        self.probe_timeout = self.probe_timeout.min(MAX_TIMER);
        self.suspect_timeout = self.suspect_timeout.min(MAX_TIMER);
        self.indirect_probes = self.indirect_probes.min(MAX_INDIRECT_PROBES);
        self.max_piggyback = self.max_piggyback.min(MAX_UPDATES_PER_MESSAGE - 2);
        self
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_millis(1_000),
            probe_timeout: Duration::from_millis(500),
            indirect_probes: 3,
            suspect_timeout: Duration::from_millis(4_000),
            max_piggyback: 16,
        }
    }
}

/// What we believe about a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Answering probes (or not yet shown otherwise).
    Alive,
    /// Missed a probe round; has `suspect_timeout` to refute.
    Suspect,
    /// Did not refute in time. Kept in the table until revoked.
    Dead,
}

/// The rack metadata gossiped with membership (role, capacity, power...).
/// Opaque to this module.
pub trait Meta:
    Clone
    + std::fmt::Debug
    + PartialEq
    + serde::Serialize
    + serde::de::DeserializeOwned
    + Send
    + 'static
{
}
impl<T> Meta for T where
    T: Clone
        + std::fmt::Debug
        + PartialEq
        + serde::Serialize
        + serde::de::DeserializeOwned
        + Send
        + 'static
{
}

/// One piggybacked membership record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Update<M> {
    /// Whom it is about.
    pub id: PeerId,
    /// Its state, ordered by `incarnation` (see [`overrides`]).
    pub state: State,
    /// Only the member itself raises this, to refute suspicion or on restart.
    pub incarnation: u64,
    /// Version of `meta`; only the member itself raises it. Highest wins.
    pub meta_version: u64,
    /// The member's metadata, if the sender knows it.
    pub meta: Option<M>,
    /// With `Suspect`: the rack whose own probe failed (Lifeguard counts
    /// distinct accusers as independent confirmations). Absent from older
    /// racks' messages; the sender then stands in for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuser: Option<PeerId>,
}

/// The membership wire protocol.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Message<M> {
    /// "Are you alive?" Answered by an `Ack` with the same `seq`.
    Ping { seq: u64, updates: Vec<Update<M>> },
    /// Answer to a `Ping`, or a forwarded answer to a `PingReq`.
    Ack { seq: u64, updates: Vec<Update<M>> },
    /// "Please ping `target` for me and forward its ack with my `seq`."
    PingReq {
        seq: u64,
        target: PeerId,
        updates: Vec<Update<M>>,
    },
}

/// What the swarm actor feeds [`Membership::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum Input<M> {
    /// Called every ~100 ms; the core decides when to probe or time out.
    Tick,
    /// A membership message from a fleet-verified peer.
    Received { from: PeerId, msg: Message<M> },
    /// A fleet-verified peer connected: track it (or poke it if we think it
    /// is dead).
    Discovered { id: PeerId },
    /// Remove forever; never re-add, ignore its messages and updates about it.
    /// Produces no output. Revoking ourselves is ignored (the agent stops).
    Revoked { id: PeerId },
    /// Local metadata changed: bump `meta_version` and gossip it.
    SetMeta(M),
    /// Its fleet admission lapsed while it was connected (its certificate
    /// expired): declare it dead now, at its current incarnation, and
    /// gossip that. Unlike [`Input::Revoked`] it may come back: once it is
    /// admitted again (a renewed certificate) it refutes with a higher
    /// incarnation like any rack returning from the dead.
    Expelled { id: PeerId },
}

/// What the swarm actor must carry out (or report) after [`Membership::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum Output<M> {
    /// Send `msg` to `to`, best effort. Losing it is fine.
    Send { to: PeerId, msg: Message<M> },
    /// A member's state changed (`from: None` = newly learned).
    Changed {
        id: PeerId,
        from: Option<State>,
        to: State,
    },
    /// A member's meta was updated (also emitted when a newly learned member
    /// arrives with meta).
    MetaChanged { id: PeerId },
}

/// What we know about one member.
#[derive(Debug, Clone)]
pub struct Member<M> {
    /// Its peer id.
    pub id: PeerId,
    /// What we believe.
    pub state: State,
    /// The incarnation `state` was asserted at.
    pub incarnation: u64,
    /// Version of `meta` (0 while unknown).
    pub meta_version: u64,
    /// Its metadata, once learned.
    pub meta: Option<M>,
    /// Last direct probe round trip (a sample, not the smoothed estimate).
    pub rtt: Option<Duration>,
    /// Last time we heard from it directly (or an ack about it via an
    /// indirect probe).
    pub last_seen: Option<Instant>,
    /// When it entered its current state.
    pub since: Instant,
}

/// Whether an update `(new, new_inc)` replaces our record `(cur, cur_inc)`.
///
/// Alive(i) overrides any state with incarnation < i (so a restarted or
/// refuting member comes back even from Dead). Suspect(i) overrides Alive(j<=i)
/// and Suspect(j<i). Dead(i) overrides Alive(j<=i), Suspect(j<=i), Dead(j<i).
pub fn overrides(cur: State, cur_inc: u64, new: State, new_inc: u64) -> bool {
    match (new, cur) {
        (State::Alive, _) => new_inc > cur_inc,
        (State::Suspect, State::Alive) => new_inc >= cur_inc,
        (State::Suspect, State::Suspect) => new_inc > cur_inc,
        (State::Suspect, State::Dead) => false,
        (State::Dead, State::Alive | State::Suspect) => new_inc >= cur_inc,
        (State::Dead, State::Dead) => new_inc > cur_inc,
    }
}

/// A member plus the bookkeeping that is not part of its public view.
struct Entry<M> {
    /// The public view.
    member: Member<M>,
    /// Our suspicion of it (only while Suspect): when it turns into a death.
    suspicion: Option<Suspicion>,
    /// The accuser our `Suspect` record of it names.
    accuser: Option<PeerId>,
    /// Smoothed round trip of our pings to it.
    rtt: Option<RttEstimate>,
    /// How many more messages to it carry our own record.
    intro_left: u8,
    /// When we last pinged it outside the probe round, to rate-limit such
    /// pings to one per probe timeout (a member that cannot refute must not
    /// turn ack -> ping -> ack into a loop).
    last_poked: Option<Instant>,
}

impl<M: Meta> Entry<M> {
    fn record(&self) -> Update<M> {
        Update {
            id: self.member.id,
            state: self.member.state,
            incarnation: self.member.incarnation,
            meta_version: self.member.meta_version,
            meta: self.member.meta.clone(),
            accuser: match self.member.state {
                State::Suspect => self.accuser,
                State::Alive | State::Dead => None,
            },
        }
    }

    /// Takes one round-trip sample of a ping to it.
    fn sample_rtt(&mut self, rtt: Duration) {
        self.member.rtt = Some(rtt);
        self.rtt = Some(RttEstimate::update(self.rtt, rtt));
    }
}

/// The probe round in progress.
struct Probe {
    /// Whom we are probing.
    target: PeerId,
    /// Seq of our direct ping; intermediaries forward acks with it.
    seq: u64,
    /// When the direct ping left, for the rtt.
    sent_at: Instant,
    /// When, without a direct ack, the indirect phase starts.
    direct_deadline: Instant,
    /// When, without any ack, the probe has failed: the end of the probe
    /// interval, or later if the indirect legs need longer.
    deadline: Instant,
    /// Whom we asked to probe indirectly; only their forwarded acks count.
    intermediaries: Vec<PeerId>,
    /// Whether the indirect phase has started.
    indirect_sent: bool,
    /// Whether any ack (direct or indirect) arrived.
    acked: bool,
}

/// A ping we sent outside the probe round, awaiting its ack.
enum Pending {
    /// We ping `target` on behalf of `requester`'s indirect probe.
    Relay {
        requester: PeerId,
        requester_seq: u64,
        target: PeerId,
        sent_at: Instant,
        expires: Instant,
    },
    /// A fire-and-forget ping (discovery, dead poke, refutation).
    Poke {
        target: PeerId,
        sent_at: Instant,
        expires: Instant,
    },
}

impl Pending {
    fn expires(&self) -> Instant {
        match self {
            Pending::Relay { expires, .. } | Pending::Poke { expires, .. } => *expires,
        }
    }

    fn involves(&self, id: &PeerId) -> bool {
        match self {
            Pending::Relay {
                requester, target, ..
            } => requester == id || target == id,
            Pending::Poke { target, .. } => target == id,
        }
    }
}

/// How a received update about ourselves relates to what we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SelfView {
    /// The sender's record of us is current.
    Current,
    /// The sender holds an older or negative record; it should hear ours.
    Stale,
    /// We had to raise our incarnation or meta version to override it.
    Refuted,
}

/// The SWIM state machine of one rack. See the module docs.
pub struct Membership<M> {
    /// Our own id; never a member of the table.
    local: PeerId,
    /// Our incarnation; raised only by refutation.
    incarnation: u64,
    /// Our metadata.
    meta: M,
    /// Version of `meta`; see the module docs for why it starts at
    /// `incarnation << 32`.
    meta_version: u64,
    /// Timings, clamped.
    config: Config,
    /// The only source of randomness (probe order, intermediaries, pokes).
    rng: StdRng,
    /// Everyone else we know of, at most [`MAX_MEMBERS`]. A BTreeMap so
    /// iteration (and so the whole machine) is deterministic.
    members: BTreeMap<PeerId, Entry<M>>,
    /// Ids never to track again, at most [`MAX_REVOKED`].
    revoked: BTreeSet<PeerId>,
    /// Revocation order, to forget the oldest when `revoked` is full.
    revoked_order: VecDeque<PeerId>,
    /// Shuffled round-robin probe order (members only).
    probe_order: Vec<PeerId>,
    /// Next position in `probe_order`.
    probe_index: usize,
    /// When the next probe round starts.
    next_probe_at: Instant,
    /// Probe rounds started, to schedule dead pokes.
    rounds: u64,
    /// The probe round in progress.
    probe: Option<Probe>,
    /// Next ping sequence number.
    next_seq: u64,
    /// Outstanding non-probe pings by seq, at most [`MAX_PENDING`].
    pending: BTreeMap<u64, Pending>,
    /// Updates waiting to be piggybacked.
    queue: broadcast::Queue<M>,
    /// Lifeguard's local health: scales our probe timeouts and interval.
    health: LocalHealth,
}

impl<M: Meta> Membership<M> {
    /// A membership table holding only ourselves.
    ///
    /// `incarnation` must be higher than in any previous run of this rack
    /// (the agent persists it), so the fleet lets the new run override the
    /// old one's Suspect/Dead record and metadata.
    pub fn new(
        local: PeerId,
        incarnation: u64,
        meta: M,
        config: Config,
        mut rng: StdRng,
        now: Instant,
    ) -> Self {
        let config = config.clamped();
        // Spread first probes so racks started together do not probe in step.
        let jitter_ms = rng.gen_range(0..=config.probe_interval.as_millis().min(60_000) as u64);
        let mut this = Self {
            local,
            incarnation,
            meta,
            meta_version: initial_meta_version(incarnation),
            rng,
            members: BTreeMap::new(),
            revoked: BTreeSet::new(),
            revoked_order: VecDeque::new(),
            probe_order: Vec::new(),
            probe_index: 0,
            next_probe_at: now + Duration::from_millis(jitter_ms),
            rounds: 0,
            probe: None,
            next_seq: 0,
            pending: BTreeMap::new(),
            queue: broadcast::Queue::new(),
            health: LocalHealth::default(),
            config,
        };
        let record = this.self_record();
        this.queue.push(record, false);
        this
    }

    /// Advances the machine by one input. Never panics, whatever the peers
    /// send.
    pub fn handle(&mut self, now: Instant, input: Input<M>) -> Vec<Output<M>> {
        let mut out = Vec::new();
        match input {
            Input::Tick => self.on_tick(now, &mut out),
            Input::Received { from, msg } => self.on_message(now, from, msg, &mut out),
            Input::Discovered { id } => self.on_discovered(now, id, &mut out),
            Input::Revoked { id } => self.on_revoked(id),
            Input::SetMeta(meta) => self.on_set_meta(meta),
            Input::Expelled { id } => self.on_expelled(now, id, &mut out),
        }
        out
    }

    /// Every member we know of, dead ones included, not including ourselves.
    pub fn members(&self) -> impl Iterator<Item = &Member<M>> {
        self.members.values().map(|e| &e.member)
    }

    /// One member, if known.
    pub fn member(&self, id: &PeerId) -> Option<&Member<M>> {
        self.members.get(id).map(|e| &e.member)
    }

    /// Our own id.
    pub fn local_id(&self) -> PeerId {
        self.local
    }

    /// Our current incarnation; persist it, and restart with one more.
    pub fn local_incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Our current metadata version.
    pub fn local_meta_version(&self) -> u64 {
        self.meta_version
    }

    /// Our local health score (0 = healthy, up to [`MAX_LOCAL_HEALTH`]).
    pub fn local_health(&self) -> u32 {
        self.health.score()
    }

    /// A member's smoothed round trip, once measured.
    pub fn rtt_estimate(&self, id: &PeerId) -> Option<RttEstimate> {
        self.members.get(id).and_then(|e| e.rtt)
    }

    /// How long a direct probe of `id` started now would wait for its ack:
    /// its RTT-derived timeout scaled by our local health.
    pub fn probe_timeout_of(&self, id: &PeerId) -> Option<Duration> {
        self.members.get(id).map(|e| self.direct_timeout(e))
    }

    /// How long our suspicion of `id` lasts in all, with the confirmations
    /// counted so far (None unless it is Suspect).
    pub fn suspicion_timeout_of(&self, id: &PeerId) -> Option<Duration> {
        self.members
            .get(id)
            .and_then(|e| e.suspicion.as_ref())
            .map(Suspicion::timeout)
    }

    /// The probe interval as our local health stretches it.
    pub fn current_probe_interval(&self) -> Duration {
        self.health.scale(self.config.probe_interval)
    }

    fn direct_timeout(&self, e: &Entry<M>) -> Duration {
        self.health
            .scale(rtt::probe_timeout(e.rtt, self.config.probe_timeout))
    }

    /// How long pings outside the probe round wait for their ack: a probe
    /// interval, or as long as the slowest acceptable round trip.
    fn pending_ttl(&self) -> Duration {
        self.config.probe_interval.max(PROBE_TIMEOUT_CEILING)
    }

    /// Racks believed alive or suspect, ourselves included.
    fn fleet_size(&self) -> usize {
        1 + self
            .members
            .values()
            .filter(|e| e.member.state != State::Dead)
            .count()
    }

    // --- inputs -----------------------------------------------------------

    fn on_tick(&mut self, now: Instant, out: &mut Vec<Output<M>>) {
        // Suspicions that ran out.
        let expired: Vec<PeerId> = self
            .members
            .values()
            .filter(|e| {
                e.member.state == State::Suspect
                    && e.suspicion.as_ref().is_some_and(|s| s.deadline() <= now)
            })
            .map(|e| e.member.id)
            .collect();
        for id in expired {
            self.declare(now, id, State::Dead, out);
        }

        // Keep telling suspects (at most one ping per probe timeout each):
        // a refutation must not wait for our probe round to come by, which
        // local health may have stretched to several seconds.
        let suspects: Vec<PeerId> = self
            .members
            .values()
            .filter(|e| e.member.state == State::Suspect)
            .map(|e| e.member.id)
            .collect();
        for id in suspects {
            if self.may_poke(&id, now) {
                self.poke(now, id, out);
            }
        }

        self.pending.retain(|_, p| p.expires() > now);

        // Indirect phase of the current probe.
        let indirect_due = self.probe.as_ref().and_then(|p| {
            let due = !p.acked && !p.indirect_sent && now >= p.direct_deadline;
            due.then_some((p.target, p.seq))
        });
        if let Some((target, seq)) = indirect_due {
            self.start_indirect(now, target, seq, out);
        }

        // A probe whose indirect phase ran out without any ack has failed.
        let failed = self
            .probe
            .as_ref()
            .is_some_and(|p| !p.acked && p.indirect_sent && now >= p.deadline);
        if failed {
            if let Some(p) = self.probe.take() {
                self.probe_failed(now, p.target, out);
            }
        }

        // A new round once the interval is over and the last probe is
        // answered or failed (a slow link's probe may outlast the interval).
        let idle = self.probe.as_ref().is_none_or(|p| p.acked);
        if now >= self.next_probe_at && idle {
            self.probe = None;
            // Keep the round period exact (not tick-rounded) unless we fell
            // behind, in which case start afresh from now.
            let interval = self.health.scale(self.config.probe_interval);
            let next = self.next_probe_at + interval;
            self.next_probe_at = if next > now { next } else { now + interval };
            self.start_probe(now, out);
            self.rounds = self.rounds.wrapping_add(1);
            if self.rounds.is_multiple_of(DEAD_POKE_ROUNDS) {
                self.poke_random_dead(now, out);
            }
        }
    }

    /// Our own probe of `id` got no ack at all. That counts against our own
    /// health unless another rack already suspects it too (Lifeguard learns
    /// that from intermediaries' nacks; a suspicion from elsewhere is the
    /// same evidence that the fault is the target's, not ours).
    fn probe_failed(&mut self, now: Instant, id: PeerId, out: &mut Vec<Output<M>>) {
        let suspected_elsewhere = self
            .members
            .get(&id)
            .is_some_and(|e| e.member.state == State::Suspect && e.accuser != Some(self.local));
        if !suspected_elsewhere {
            self.health.worse();
        }
        self.suspect_by_probe(now, id, out);
    }

    /// Our own probe of `id` failed: suspect it, or, if it is already
    /// suspect, confirm that suspicion as an independent accuser.
    fn suspect_by_probe(&mut self, now: Instant, id: PeerId, out: &mut Vec<Output<M>>) {
        let local = self.local;
        let Some(e) = self.members.get_mut(&id) else {
            return;
        };
        match e.member.state {
            State::Alive => self.declare(now, id, State::Suspect, out),
            State::Suspect => {
                let new = e.suspicion.as_mut().is_some_and(|s| s.confirm(local));
                if new {
                    // Tell the others: for them we are one more accuser.
                    e.accuser = Some(local);
                    let record = e.record();
                    self.queue.push(record, false);
                }
            }
            State::Dead => {}
        }
    }

    fn on_message(
        &mut self,
        now: Instant,
        from: PeerId,
        msg: Message<M>,
        out: &mut Vec<Output<M>>,
    ) {
        if from == self.local || self.revoked.contains(&from) {
            return;
        }
        let (updates, is_ping) = match &msg {
            Message::Ping { updates, .. } => (updates, true),
            Message::Ack { updates, .. } | Message::PingReq { updates, .. } => (updates, false),
        };
        let mut view = SelfView::Current;
        for u in updates.iter().take(MAX_UPDATES_PER_MESSAGE) {
            if u.id == self.local {
                view = view.max(self.on_self_update(u));
            } else {
                self.apply(now, from, u, out);
            }
        }

        if !self.members.contains_key(&from) {
            // Any fleet-verified peer that talks to us is a member.
            self.add_member(now, from, State::Alive, 0, 0, None, out);
        }
        if let Some(e) = self.members.get_mut(&from) {
            e.member.last_seen = Some(now);
            if view != SelfView::Current {
                e.intro_left = SELF_INTRO_MESSAGES;
            }
        }

        match msg {
            Message::Ping { seq, .. } => {
                let updates = self.piggyback(&from);
                out.push(Output::Send {
                    to: from,
                    msg: Message::Ack { seq, updates },
                });
            }
            Message::Ack { seq, .. } => self.on_ack(now, from, seq, out),
            Message::PingReq { seq, target, .. } => self.on_ping_req(now, from, seq, target, out),
        }

        if !is_ping {
            // No reply is due, but the sender must hear our refutation soon;
            // and a sender we hold Suspect/Dead must hear that record soon
            // (a suspect whose own probes go to dead racks may otherwise
            // hear nothing for seconds). At most one such ping in flight.
            let negative = self
                .members
                .get(&from)
                .is_some_and(|e| e.member.state != State::Alive);
            if view == SelfView::Refuted || (negative && self.may_poke(&from, now)) {
                self.poke(now, from, out);
            }
        }
    }

    /// Whether an opportunistic ping to `id` is allowed now: at most one per
    /// probe timeout per member.
    fn may_poke(&self, id: &PeerId, now: Instant) -> bool {
        self.members.get(id).is_some_and(|e| {
            e.last_poked
                .is_none_or(|t| now.saturating_duration_since(t) >= self.config.probe_timeout)
        })
    }

    fn on_ack(&mut self, now: Instant, from: PeerId, seq: u64, out: &mut Vec<Output<M>>) {
        if let Some(p) = self.probe.as_mut() {
            if p.seq == seq && !p.acked {
                let target = p.target;
                if from == target {
                    p.acked = true;
                    self.health.better();
                    let rtt = now.saturating_duration_since(p.sent_at);
                    if let Some(e) = self.members.get_mut(&target) {
                        e.sample_rtt(rtt);
                    }
                    return;
                }
                if p.intermediaries.contains(&from) {
                    p.acked = true;
                    self.health.better();
                    if let Some(e) = self.members.get_mut(&target) {
                        e.member.last_seen = Some(now);
                    }
                    return;
                }
            }
        }
        let matches = match self.pending.get(&seq) {
            Some(Pending::Relay { target, .. }) | Some(Pending::Poke { target, .. }) => {
                *target == from
            }
            None => false,
        };
        if !matches {
            return;
        }
        match self.pending.remove(&seq) {
            Some(Pending::Relay {
                requester,
                requester_seq,
                sent_at,
                ..
            }) => {
                if let Some(e) = self.members.get_mut(&from) {
                    e.sample_rtt(now.saturating_duration_since(sent_at));
                }
                if self.revoked.contains(&requester) {
                    return;
                }
                let updates = self.piggyback(&requester);
                out.push(Output::Send {
                    to: requester,
                    msg: Message::Ack {
                        seq: requester_seq,
                        updates,
                    },
                });
            }
            Some(Pending::Poke { sent_at, .. }) => {
                if let Some(e) = self.members.get_mut(&from) {
                    e.sample_rtt(now.saturating_duration_since(sent_at));
                }
            }
            None => {}
        }
    }

    fn on_ping_req(
        &mut self,
        now: Instant,
        from: PeerId,
        requester_seq: u64,
        target: PeerId,
        out: &mut Vec<Output<M>>,
    ) {
        // We only relay to members we track; asking us to ping ourselves, the
        // requester, or a stranger is ignored.
        if target == self.local || target == from || !self.members.contains_key(&target) {
            return;
        }
        let seq = self.take_seq();
        self.insert_pending(
            seq,
            Pending::Relay {
                requester: from,
                requester_seq,
                target,
                sent_at: now,
                expires: now + self.pending_ttl(),
            },
        );
        let updates = self.piggyback(&target);
        out.push(Output::Send {
            to: target,
            msg: Message::Ping { seq, updates },
        });
    }

    fn on_discovered(&mut self, now: Instant, id: PeerId, out: &mut Vec<Output<M>>) {
        if id == self.local || self.revoked.contains(&id) {
            return;
        }
        match self.members.get_mut(&id) {
            None => {
                if self.add_member(now, id, State::Alive, 0, 0, None, out) {
                    self.poke(now, id, out);
                }
            }
            Some(e) if e.member.state != State::Alive => {
                // The ping carries its Suspect/Dead record first: it refutes.
                // Not rate-limited: a connection is news (and the swarm
                // bounds how often peers connect).
                self.poke(now, id, out);
            }
            Some(e) => {
                // A reconnect may be a restarted rack that forgot us.
                e.intro_left = SELF_INTRO_MESSAGES;
            }
        }
    }

    fn on_revoked(&mut self, id: PeerId) {
        if id == self.local {
            return;
        }
        if self.revoked.insert(id) {
            self.revoked_order.push_back(id);
            while self.revoked_order.len() > MAX_REVOKED {
                if let Some(old) = self.revoked_order.pop_front() {
                    self.revoked.remove(&old);
                }
            }
        }
        self.members.remove(&id);
        if let Some(pos) = self.probe_order.iter().position(|p| p == &id) {
            self.probe_order.remove(pos);
            if pos < self.probe_index {
                self.probe_index -= 1;
            }
        }
        self.queue.remove(&id);
        self.pending.retain(|_, p| !p.involves(&id));
        if self.probe.as_ref().is_some_and(|p| p.target == id) {
            self.probe = None;
        }
        if let Some(p) = self.probe.as_mut() {
            p.intermediaries.retain(|i| i != &id);
        }
        tracing::debug!(peer = %id, "membership: revoked");
    }

    fn on_expelled(&mut self, now: Instant, id: PeerId, out: &mut Vec<Output<M>>) {
        let Some(e) = self.members.get_mut(&id) else {
            return;
        };
        let from = e.member.state;
        if from == State::Dead {
            return;
        }
        e.member.state = State::Dead;
        e.member.since = now;
        e.suspicion = None;
        let record = e.record();
        self.queue.push(record, false);
        if self.probe.as_ref().is_some_and(|p| p.target == id) {
            self.probe = None;
        }
        out.push(Output::Changed {
            id,
            from: Some(from),
            to: State::Dead,
        });
        tracing::debug!(peer = %id, ?from, "membership: expelled (admission lapsed)");
    }

    fn on_set_meta(&mut self, meta: M) {
        self.meta = meta;
        self.meta_version = self.meta_version.saturating_add(1);
        let record = self.self_record();
        self.queue.push(record, false);
    }

    // --- updates ----------------------------------------------------------

    /// Applies a gossiped update about someone else, received from `from`.
    fn apply(&mut self, now: Instant, from: PeerId, u: &Update<M>, out: &mut Vec<Output<M>>) {
        let fleet_size = self.fleet_size();
        let local = self.local;
        if self.revoked.contains(&u.id) {
            return;
        }
        let Some(e) = self.members.get_mut(&u.id) else {
            // Like memberlist, only an Alive record introduces a member: a
            // Suspect/Dead record about a stranger tells us nothing useful.
            if u.state == State::Alive
                && self.add_member(
                    now,
                    u.id,
                    u.state,
                    u.incarnation,
                    u.meta_version,
                    u.meta.clone(),
                    out,
                )
            {
                if u.meta.is_some() {
                    out.push(Output::MetaChanged { id: u.id });
                }
                if let Some(e) = self.members.get(&u.id) {
                    let record = e.record();
                    self.queue.push(record, false);
                }
            }
            return;
        };

        let mut relay = false;
        let mut poke = false;
        // Whoever accuses (or, from an older rack, the sender standing in).
        let accuser = (u.state == State::Suspect).then(|| u.accuser.unwrap_or(from));
        if overrides(e.member.state, e.member.incarnation, u.state, u.incarnation) {
            let old_state = e.member.state;
            let old_inc = e.member.incarnation;
            e.member.state = u.state;
            e.member.incarnation = u.incarnation;
            e.suspicion = match u.state {
                // Hearing a suspicion starts our own timer for it, at its
                // longest until others confirm it.
                State::Suspect => Some(Suspicion::new(
                    now,
                    accuser,
                    fleet_size,
                    self.config.suspect_timeout,
                )),
                State::Alive | State::Dead => None,
            };
            e.accuser = accuser;
            if u.state == State::Alive && u.incarnation > old_inc {
                // A refutation or a restart: it may have lost our record.
                e.intro_left = SELF_INTRO_MESSAGES;
            }
            if old_state != u.state {
                e.member.since = now;
                out.push(Output::Changed {
                    id: u.id,
                    from: Some(old_state),
                    to: u.state,
                });
                tracing::debug!(peer = %u.id, from = ?old_state, to = ?u.state, incarnation = u.incarnation, "membership: state changed by gossip");
                // Back from the dead: it probably holds us dead too. Newly
                // suspect: tell it at once, so it refutes within a round trip.
                poke = old_state == State::Dead || u.state == State::Suspect;
            }
            relay = true;
        } else if u.state == State::Suspect
            && e.member.state == State::Suspect
            && u.incarnation == e.member.incarnation
        {
            // The same suspicion from another accuser: a confirmation,
            // which shortens our timer; pass it on so others count it too.
            if let Some(who) = accuser.filter(|w| *w != local && *w != u.id) {
                if e.suspicion.as_mut().is_some_and(|s| s.confirm(who)) {
                    let mut record = e.record();
                    record.accuser = Some(who);
                    self.queue.push(record, false);
                }
            }
        }
        if let Some(meta) = &u.meta {
            if u.meta_version > e.member.meta_version {
                e.member.meta = Some(meta.clone());
                e.member.meta_version = u.meta_version;
                out.push(Output::MetaChanged { id: u.id });
                relay = true;
            }
        }
        if relay {
            let record = e.record();
            self.queue.push(record, false);
        }
        if poke && self.may_poke(&u.id, now) {
            self.poke(now, u.id, out);
        }
    }

    /// Handles an update about ourselves: refute if needed.
    fn on_self_update(&mut self, u: &Update<M>) -> SelfView {
        let mut view = SelfView::Current;
        let refute_inc = match u.state {
            State::Suspect | State::Dead => u.incarnation >= self.incarnation,
            // Someone holds us at a higher incarnation than we know (an older
            // run of this rack got further): our Alive would be ignored.
            State::Alive => u.incarnation > self.incarnation,
        };
        if refute_inc {
            let next = u.incarnation.saturating_add(1);
            if next > self.incarnation {
                self.incarnation = next;
                view = SelfView::Refuted;
                if u.state != State::Alive {
                    // Others could not reach us: maybe our own link is bad.
                    self.health.worse();
                }
                tracing::debug!(incarnation = next, about = ?u.state, "membership: refuting");
            }
        } else if u.state != State::Alive || u.incarnation < self.incarnation {
            view = SelfView::Stale;
        }

        let meta_conflict = u.meta_version > self.meta_version
            || (u.meta_version == self.meta_version
                && u.meta.as_ref().is_some_and(|m| m != &self.meta));
        if meta_conflict {
            // A previous run's metadata, or a lie: out-version it.
            let next = u.meta_version.saturating_add(1);
            if next > self.meta_version {
                self.meta_version = next;
                view = SelfView::Refuted;
            }
        } else if u.meta_version < self.meta_version {
            view = view.max(SelfView::Stale);
        }

        if view == SelfView::Refuted {
            let record = self.self_record();
            self.queue.push(record, true);
        }
        view
    }

    /// Our own verdict on a member (Suspect after a failed probe, Dead after
    /// the suspicion ran out), at its current incarnation.
    fn declare(&mut self, now: Instant, id: PeerId, to: State, out: &mut Vec<Output<M>>) {
        let fleet_size = self.fleet_size();
        let Some(e) = self.members.get_mut(&id) else {
            return;
        };
        let from = e.member.state;
        let allowed = matches!(
            (from, to),
            (State::Alive, State::Suspect) | (State::Suspect, State::Dead)
        );
        if !allowed {
            return;
        }
        e.member.state = to;
        e.member.since = now;
        e.suspicion = (to == State::Suspect).then(|| {
            Suspicion::new(
                now,
                Some(self.local),
                fleet_size,
                self.config.suspect_timeout,
            )
        });
        e.accuser = (to == State::Suspect).then_some(self.local);
        let record = e.record();
        self.queue.push(record, false);
        out.push(Output::Changed {
            id,
            from: Some(from),
            to,
        });
        tracing::debug!(peer = %id, ?from, ?to, incarnation = e.member.incarnation, "membership: state changed by probe");
        if to == State::Suspect && self.may_poke(&id, now) {
            // If it is only our link (or luck) that failed, the ping carries
            // the suspicion to it and it refutes within a round trip.
            self.poke(now, id, out);
        }
        self.spread(now, id, out);
    }

    /// Push a fresh verdict about `about` to up to [`SPREAD_FANOUT`] other
    /// live members now (each at most once per probe timeout); the rest
    /// hear it by piggyback as before.
    fn spread(&mut self, now: Instant, about: PeerId, out: &mut Vec<Output<M>>) {
        for to in self.random_alive_except(about, SPREAD_FANOUT) {
            if self.may_poke(&to, now) {
                self.poke(now, to, out);
            }
        }
    }

    /// Adds a member; false if the table is full (it is then ignored).
    #[allow(clippy::too_many_arguments)]
    fn add_member(
        &mut self,
        now: Instant,
        id: PeerId,
        state: State,
        incarnation: u64,
        meta_version: u64,
        meta: Option<M>,
        out: &mut Vec<Output<M>>,
    ) -> bool {
        if self.members.len() >= MAX_MEMBERS || id == self.local || self.revoked.contains(&id) {
            return false;
        }
        let entry = Entry {
            member: Member {
                id,
                state,
                incarnation,
                meta_version,
                meta,
                rtt: None,
                last_seen: None,
                since: now,
            },
            suspicion: (state == State::Suspect).then(|| {
                Suspicion::new(
                    now,
                    None,
                    self.members.len() + 2,
                    self.config.suspect_timeout,
                )
            }),
            accuser: None,
            rtt: None,
            intro_left: SELF_INTRO_MESSAGES,
            last_poked: None,
        };
        self.members.insert(id, entry);
        // Random position in the rest of this pass: probed soon, but not in a
        // predictable slot.
        let lo = self.probe_index.min(self.probe_order.len());
        let pos = self.rng.gen_range(lo..=self.probe_order.len());
        self.probe_order.insert(pos, id);
        out.push(Output::Changed {
            id,
            from: None,
            to: state,
        });
        tracing::debug!(peer = %id, ?state, incarnation, "membership: new member");
        true
    }

    // --- probing ----------------------------------------------------------

    fn start_probe(&mut self, now: Instant, out: &mut Vec<Output<M>>) {
        let Some(target) = self.next_probe_target() else {
            return;
        };
        let seq = self.take_seq();
        let updates = self.piggyback(&target);
        let direct = self
            .members
            .get(&target)
            .map_or(self.config.probe_timeout, |e| self.direct_timeout(e));
        self.probe = Some(Probe {
            target,
            seq,
            sent_at: now,
            direct_deadline: now + direct,
            // Called right after `next_probe_at` moved on: the probe has
            // (at least) this round to succeed.
            deadline: self.next_probe_at.max(now + direct),
            intermediaries: Vec::new(),
            indirect_sent: false,
            acked: false,
        });
        out.push(Output::Send {
            to: target,
            msg: Message::Ping { seq, updates },
        });
    }

    fn next_probe_target(&mut self) -> Option<PeerId> {
        // Two passes at most: the rest of this one, then a reshuffled one.
        let bound = 2 * self.probe_order.len() + 2;
        for _ in 0..bound {
            if self.probe_index >= self.probe_order.len() {
                let members = &self.members;
                self.probe_order.retain(|id| members.contains_key(id));
                self.probe_order.shuffle(&mut self.rng);
                self.probe_index = 0;
                if self.probe_order.is_empty() {
                    return None;
                }
            }
            let id = self.probe_order[self.probe_index];
            self.probe_index += 1;
            if self
                .members
                .get(&id)
                .is_some_and(|e| e.member.state != State::Dead)
            {
                return Some(id);
            }
        }
        None
    }

    fn start_indirect(&mut self, now: Instant, target: PeerId, seq: u64, out: &mut Vec<Output<M>>) {
        if self
            .members
            .get(&target)
            .is_none_or(|e| e.member.state == State::Dead)
        {
            self.probe = None;
            return;
        }
        let chosen = self.random_alive_except(target, self.config.indirect_probes);
        // Each relayed ack crosses two legs: us to the intermediary and
        // back, and the intermediary to the target and back (guessed as our
        // own round trip to the target). Wait for the slowest chosen one,
        // and at least one more direct round trip for the retry below.
        let target_leg = self
            .members
            .get(&target)
            .map_or(self.config.probe_timeout, |e| {
                rtt::leg_timeout(e.rtt, self.config.probe_timeout)
            });
        let legs = chosen
            .iter()
            .map(|via| {
                let via_leg = self
                    .members
                    .get(via)
                    .map_or(self.config.probe_timeout, |e| {
                        rtt::leg_timeout(e.rtt, self.config.probe_timeout)
                    });
                via_leg.saturating_add(target_leg)
            })
            .max()
            .unwrap_or(target_leg);
        let indirect_deadline = now + self.health.scale(legs);
        // A second direct ping with the same seq, alongside the relayed
        // ones (memberlist's fallback ping): one lost datagram of a lossy
        // radio link no longer makes a suspicion when the intermediaries
        // are slow, dead, or (in a fleet of two) absent.
        let updates = self.piggyback(&target);
        out.push(Output::Send {
            to: target,
            msg: Message::Ping { seq, updates },
        });
        for via in &chosen {
            let updates = self.piggyback(via);
            out.push(Output::Send {
                to: *via,
                msg: Message::PingReq {
                    seq,
                    target,
                    updates,
                },
            });
        }
        if let Some(p) = self.probe.as_mut() {
            p.intermediaries = chosen;
            p.indirect_sent = true;
            p.deadline = p.deadline.max(indirect_deadline);
        }
    }

    /// Up to `n` members alive in our view, other than `except`, at random.
    fn random_alive_except(&mut self, except: PeerId, n: usize) -> Vec<PeerId> {
        let alive: Vec<PeerId> = self
            .members
            .values()
            .filter(|e| e.member.state == State::Alive && e.member.id != except)
            .map(|e| e.member.id)
            .collect();
        alive.choose_multiple(&mut self.rng, n).copied().collect()
    }

    fn poke_random_dead(&mut self, now: Instant, out: &mut Vec<Output<M>>) {
        let dead: Vec<PeerId> = self
            .members
            .values()
            .filter(|e| e.member.state == State::Dead)
            .map(|e| e.member.id)
            .collect();
        if let Some(id) = dead.choose(&mut self.rng).copied() {
            self.poke(now, id, out);
        }
    }

    /// A ping outside the probe round; its ack only updates the rtt.
    fn poke(&mut self, now: Instant, to: PeerId, out: &mut Vec<Output<M>>) {
        if let Some(e) = self.members.get_mut(&to) {
            e.last_poked = Some(now);
        }
        let seq = self.take_seq();
        self.insert_pending(
            seq,
            Pending::Poke {
                target: to,
                sent_at: now,
                expires: now + self.pending_ttl(),
            },
        );
        let updates = self.piggyback(&to);
        out.push(Output::Send {
            to,
            msg: Message::Ping { seq, updates },
        });
    }

    fn insert_pending(&mut self, seq: u64, p: Pending) {
        while self.pending.len() >= MAX_PENDING {
            // Seqs grow, so the first key is the oldest.
            if self.pending.pop_first().is_none() {
                break;
            }
        }
        self.pending.insert(seq, p);
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        seq
    }

    // --- gossip -----------------------------------------------------------

    fn self_record(&self) -> Update<M> {
        Update {
            id: self.local,
            state: State::Alive,
            incarnation: self.incarnation,
            meta_version: self.meta_version,
            meta: Some(self.meta.clone()),
            accuser: None,
        }
    }

    /// The updates for the next message to `to`: its own record first if we
    /// hold it Suspect/Dead (buddy system), then our own record if it is new
    /// to us, then up to `max_piggyback` from the queue.
    fn piggyback(&mut self, to: &PeerId) -> Vec<Update<M>> {
        let mut updates = Vec::new();
        let mut skip = Vec::new();
        let self_record = self.self_record();
        if let Some(e) = self.members.get_mut(to) {
            if e.member.state != State::Alive {
                updates.push(e.record());
                skip.push(*to);
            }
            if e.intro_left > 0 {
                e.intro_left -= 1;
                updates.push(self_record);
                skip.push(self.local);
            }
        }
        let live = self
            .members
            .values()
            .filter(|e| e.member.state != State::Dead)
            .count();
        let limit = retransmit_limit(live + 1);
        updates.extend(self.queue.select(&skip, self.config.max_piggyback, limit));
        updates
    }
}

/// `RETRANSMIT_MULT * ceil(log2(n + 1))`, at least `RETRANSMIT_MULT`.
fn retransmit_limit(n: usize) -> u32 {
    let x = (n as u64).saturating_add(1);
    let ceil_log2 = 64 - (x - 1).leading_zeros();
    RETRANSMIT_MULT * ceil_log2.max(1)
}

/// A run's first meta version: above any version a previous run (with a
/// lower incarnation) can have reached, so restarts need not persist it.
fn initial_meta_version(incarnation: u64) -> u64 {
    (incarnation.min(u64::from(u32::MAX)) << 32).saturating_add(1)
}
