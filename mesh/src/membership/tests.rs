//! Unit tests: override rules, refutation, timers, probing, bounds, and
//! hostile input. Whole-fleet behaviour is in `tests/integration/membership_sim.rs`.

use super::*;
use proptest::prelude::*;
use rand::SeedableRng;

fn peer(i: u8) -> PeerId {
    let mut secret = [i; 32];
    secret[0] = 0xA5;
    libp2p::identity::Keypair::ed25519_from_bytes(secret)
        .expect("32 bytes are a valid ed25519 secret")
        .public()
        .to_peer_id()
}

fn node(i: u8, now: Instant) -> Membership<String> {
    Membership::new(
        peer(i),
        0,
        format!("rack-{i}"),
        Config::default(),
        StdRng::seed_from_u64(u64::from(i)),
        now,
    )
}

fn up(id: PeerId, state: State, incarnation: u64) -> Update<String> {
    Update {
        id,
        state,
        incarnation,
        meta_version: 0,
        meta: None,
        accuser: None,
    }
}

/// Delivers `updates` on an Ack with a seq nobody waits for.
fn gossip(
    m: &mut Membership<String>,
    now: Instant,
    from: PeerId,
    updates: Vec<Update<String>>,
) -> Vec<Output<String>> {
    m.handle(
        now,
        Input::Received {
            from,
            msg: Message::Ack {
                seq: u64::MAX,
                updates,
            },
        },
    )
}

fn sends(out: &[Output<String>]) -> Vec<(PeerId, Message<String>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { to, msg } => Some((*to, msg.clone())),
            _ => None,
        })
        .collect()
}

fn changes(out: &[Output<String>]) -> Vec<(PeerId, Option<State>, State)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Changed { id, from, to } => Some((*id, *from, *to)),
            _ => None,
        })
        .collect()
}

fn updates_of(msg: &Message<String>) -> &[Update<String>] {
    match msg {
        Message::Ping { updates, .. }
        | Message::Ack { updates, .. }
        | Message::PingReq { updates, .. } => updates,
    }
}

fn state(m: &Membership<String>, id: &PeerId) -> Option<State> {
    m.member(id).map(|m| m.state)
}

const TICK: Duration = Duration::from_millis(100);

/// Ticks until a probe `Ping` goes out; returns (time, target, seq).
fn tick_until_probe(m: &mut Membership<String>, now: &mut Instant) -> (PeerId, u64) {
    for _ in 0..50 {
        *now += TICK;
        let out = m.handle(*now, Input::Tick);
        for (to, msg) in sends(&out) {
            if let Message::Ping { seq, .. } = msg {
                if m.probe.as_ref().is_some_and(|p| p.seq == seq) {
                    return (to, seq);
                }
            }
        }
    }
    panic!("no probe within 5 s");
}

#[test]
fn config_from_toml_defaults_match() {
    let toml = deploy::config::MembershipConfig::default();
    assert_eq!(Config::from_toml(&toml), Config::default());
    let custom = deploy::config::MembershipConfig {
        probe_interval_ms: 200,
        probe_timeout_ms: 50,
        indirect_probes: 2,
        suspect_timeout_ms: 900,
        max_piggyback: 4,
    };
    let c = Config::from_toml(&custom);
    assert_eq!(c.probe_interval, Duration::from_millis(200));
    assert_eq!(c.probe_timeout, Duration::from_millis(50));
    assert_eq!(c.indirect_probes, 2);
    assert_eq!(c.suspect_timeout, Duration::from_millis(900));
    assert_eq!(c.max_piggyback, 4);
}

#[test]
fn override_rules() {
    use State::*;
    // Alive(i) overrides anything with a lower incarnation, nothing else.
    for cur in [Alive, Suspect, Dead] {
        assert!(overrides(cur, 3, Alive, 4), "Alive(4) over {cur:?}(3)");
        assert!(!overrides(cur, 4, Alive, 4), "Alive(4) not over {cur:?}(4)");
        assert!(!overrides(cur, 5, Alive, 4));
    }
    // Suspect(i) overrides Alive(j<=i) and Suspect(j<i), never Dead.
    assert!(overrides(Alive, 4, Suspect, 4));
    assert!(overrides(Alive, 3, Suspect, 4));
    assert!(!overrides(Alive, 5, Suspect, 4));
    assert!(overrides(Suspect, 3, Suspect, 4));
    assert!(!overrides(Suspect, 4, Suspect, 4));
    assert!(!overrides(Dead, 3, Suspect, 4));
    // Dead(i) overrides Alive(j<=i), Suspect(j<=i), Dead(j<i).
    assert!(overrides(Alive, 4, Dead, 4));
    assert!(overrides(Suspect, 4, Dead, 4));
    assert!(!overrides(Suspect, 5, Dead, 4));
    assert!(overrides(Dead, 3, Dead, 4));
    assert!(!overrides(Dead, 4, Dead, 4));
}

#[test]
fn gossip_applies_override_rules() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let (a, x) = (peer(1), peer(2));
    let steps = [
        (Alive, 5, Some(Alive)),
        (Suspect, 4, Some(Alive)),
        (Suspect, 5, Some(Suspect)),
        (Alive, 5, Some(Suspect)),
        (Alive, 6, Some(Alive)),
        (Dead, 6, Some(Dead)),
        (Alive, 6, Some(Dead)),
        (Suspect, 7, Some(Dead)),
        // A restarted rack comes back with a higher incarnation.
        (Alive, 7, Some(Alive)),
    ];
    use State::*;
    for (i, (s, inc, want)) in steps.into_iter().enumerate() {
        gossip(&mut m, t0, a, vec![up(x, s, inc)]);
        assert_eq!(state(&m, &x), want, "step {i}: {s:?}({inc})");
    }
    assert_eq!(m.member(&x).map(|m| m.incarnation), Some(7));
}

#[test]
fn suspect_or_dead_about_strangers_is_ignored() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let out = gossip(
        &mut m,
        t0,
        peer(1),
        vec![up(peer(2), State::Suspect, 1), up(peer(3), State::Dead, 9)],
    );
    assert!(m.member(&peer(2)).is_none());
    assert!(m.member(&peer(3)).is_none());
    // The sender itself is now known.
    assert_eq!(changes(&out), vec![(peer(1), None, State::Alive)]);
}

#[test]
fn refutes_suspicion_about_itself() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let a = peer(1);
    // Suspect at our incarnation, on a Ping: the Ack carries Alive(self, 1).
    let out = m.handle(
        t0,
        Input::Received {
            from: a,
            msg: Message::Ping {
                seq: 9,
                updates: vec![up(peer(0), State::Suspect, 0)],
            },
        },
    );
    assert_eq!(m.local_incarnation(), 1);
    let s = sends(&out);
    assert_eq!(s.len(), 1);
    let (to, msg) = &s[0];
    assert_eq!(*to, a);
    assert!(matches!(msg, Message::Ack { seq: 9, .. }));
    assert!(updates_of(msg).iter().any(|u| u.id == peer(0)
        && u.state == State::Alive
        && u.incarnation == 1
        && u.meta.is_some()));

    // Dead at a higher incarnation, on an Ack: bump past it and ping the sender.
    let out = gossip(&mut m, t0, a, vec![up(peer(0), State::Dead, 5)]);
    assert_eq!(m.local_incarnation(), 6);
    let s = sends(&out);
    assert_eq!(s.len(), 1, "{out:?}");
    assert!(matches!(s[0].1, Message::Ping { .. }));
    assert!(updates_of(&s[0].1)
        .iter()
        .any(|u| u.id == peer(0) && u.state == State::Alive && u.incarnation == 6));

    // Old news does not bump.
    gossip(&mut m, t0, a, vec![up(peer(0), State::Suspect, 3)]);
    assert_eq!(m.local_incarnation(), 6);
}

#[test]
fn suspicion_times_out_into_death() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let (a, x) = (peer(1), peer(2));
    gossip(&mut m, t0, a, vec![up(x, State::Alive, 0)]);
    let heard = t0 + Duration::from_millis(50);
    let out = gossip(&mut m, heard, a, vec![up(x, State::Suspect, 0)]);
    assert_eq!(changes(&out), vec![(x, Some(State::Alive), State::Suspect)]);
    // A fleet of three cannot supply the confirmations Lifeguard waits
    // for: the shortest suspicion at once.
    let timeout = Config::default().suspect_timeout;
    assert_eq!(m.suspicion_timeout_of(&x), Some(timeout));

    let out = m.handle(heard + timeout - TICK, Input::Tick);
    assert!(changes(&out).is_empty());
    assert_eq!(state(&m, &x), Some(State::Suspect));

    let out = m.handle(heard + timeout, Input::Tick);
    assert_eq!(changes(&out), vec![(x, Some(State::Suspect), State::Dead)]);
    assert_eq!(m.member(&x).map(|m| m.since), Some(heard + timeout));

    // The death is gossiped on the next message to someone else.
    let out = m.handle(
        heard + timeout,
        Input::Received {
            from: a,
            msg: Message::Ping {
                seq: 1,
                updates: vec![],
            },
        },
    );
    let s = sends(&out);
    assert!(updates_of(&s[0].1)
        .iter()
        .any(|u| u.id == x && u.state == State::Dead));
}

#[test]
fn refutation_in_time_prevents_death() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let (a, x) = (peer(1), peer(2));
    gossip(
        &mut m,
        t0,
        a,
        vec![up(x, State::Alive, 0), up(x, State::Suspect, 0)],
    );
    gossip(
        &mut m,
        t0 + Duration::from_secs(1),
        x,
        vec![up(x, State::Alive, 1)],
    );
    let out = m.handle(t0 + Duration::from_secs(10), Input::Tick);
    assert!(!changes(&out).iter().any(|c| c.2 == State::Dead));
    assert_eq!(state(&m, &x), Some(State::Alive));
}

#[test]
fn failed_probe_with_single_member_retries_directly_then_suspects() {
    let mut now = Instant::now();
    let mut m = node(0, now);
    let b = peer(1);
    m.handle(now, Input::Discovered { id: b });
    let (target, seq) = tick_until_probe(&mut m, &mut now);
    assert_eq!(target, b);
    let mut retried = None;
    let mut suspected = None;
    for _ in 0..20 {
        now += TICK;
        let out = m.handle(now, Input::Tick);
        let s = sends(&out);
        assert!(!s
            .iter()
            .any(|(_, msg)| matches!(msg, Message::PingReq { .. })));
        if s.iter()
            .any(|(to, msg)| *to == b && matches!(msg, Message::Ping { seq: q, .. } if *q == seq))
        {
            assert!(suspected.is_none(), "retry after the suspicion");
            retried = Some(now);
        }
        if changes(&out).contains(&(b, Some(State::Alive), State::Suspect)) {
            suspected = Some(now);
            break;
        }
    }
    let (retried, suspected) = (
        retried.expect("the probe's ping is sent again before suspecting"),
        suspected.expect("single member suspected after the retry timed out"),
    );
    assert!(suspected > retried);
    assert!(suspected - retried <= Config::default().probe_timeout + TICK);
}

#[test]
fn an_ack_to_the_direct_retry_saves_the_probe() {
    let mut now = Instant::now();
    let mut m = node(0, now);
    let b = peer(1);
    m.handle(now, Input::Discovered { id: b });
    let (_, seq) = tick_until_probe(&mut m, &mut now);
    // The first ping (or its ack) is lost; the retry goes out.
    loop {
        now += TICK;
        let out = m.handle(now, Input::Tick);
        if sends(&out)
            .iter()
            .any(|(to, msg)| *to == b && matches!(msg, Message::Ping { seq: q, .. } if *q == seq))
        {
            break;
        }
    }
    m.handle(
        now + Duration::from_millis(5),
        Input::Received {
            from: b,
            msg: Message::Ack {
                seq,
                updates: vec![],
            },
        },
    );
    // Past this probe's deadline (the next round, unanswered, could not
    // suspect before its own retry timed out).
    for _ in 0..10 {
        now += TICK;
        let out = m.handle(now, Input::Tick);
        assert!(
            !changes(&out)
                .iter()
                .any(|c| c.0 == b && c.2 == State::Suspect),
            "suspected although the retry was acked"
        );
    }
    assert_eq!(state(&m, &b), Some(State::Alive));
}

/// Sets up 0 with members 1 and 2, runs a probe to the target without a
/// direct ack, and returns (now, target, the other, seq) right after the
/// PingReq went out.
fn probe_into_indirect_phase() -> (Membership<String>, Instant, PeerId, PeerId, u64) {
    let mut now = Instant::now();
    let mut m = node(0, now);
    m.handle(now, Input::Discovered { id: peer(1) });
    m.handle(now, Input::Discovered { id: peer(2) });
    let (target, seq) = tick_until_probe(&mut m, &mut now);
    let other = if target == peer(1) { peer(2) } else { peer(1) };
    for _ in 0..5 {
        now += TICK;
        let out = m.handle(now, Input::Tick);
        let reqs: Vec<_> = sends(&out)
            .into_iter()
            .filter(|(_, msg)| matches!(msg, Message::PingReq { .. }))
            .collect();
        if !reqs.is_empty() {
            assert_eq!(reqs.len(), 1);
            assert_eq!(reqs[0].0, other);
            assert!(
                matches!(reqs[0].1, Message::PingReq { seq: s, target: t, .. } if s == seq && t == target)
            );
            return (m, now, target, other, seq);
        }
    }
    panic!("no PingReq after the probe timeout");
}

#[test]
fn indirect_ack_prevents_suspicion() {
    let (mut m, mut now, target, other, seq) = probe_into_indirect_phase();
    now += Duration::from_millis(30);
    m.handle(
        now,
        Input::Received {
            from: other,
            msg: Message::Ack {
                seq,
                updates: vec![],
            },
        },
    );
    assert_eq!(m.member(&target).and_then(|m| m.last_seen), Some(now));
    // Through the end of this round and into the next (whose own probe is
    // unanswered here, but cannot fail before its round ends).
    for _ in 0..10 {
        now += TICK;
        let out = m.handle(now, Input::Tick);
        assert!(!changes(&out).iter().any(|c| c.0 == target), "{out:?}");
    }
    assert_eq!(state(&m, &target), Some(State::Alive));
}

#[test]
fn no_ack_at_all_means_suspicion_once_the_indirect_legs_ran_out() {
    let (mut m, mut now, target, other, seq) = probe_into_indirect_phase();
    let asked = now;
    // An ack with the right seq from someone we did not ask does not count.
    m.handle(
        now,
        Input::Received {
            from: peer(7),
            msg: Message::Ack {
                seq,
                updates: vec![],
            },
        },
    );
    let mut suspected = None;
    for _ in 0..20 {
        now += TICK;
        let out = m.handle(now, Input::Tick);
        if changes(&out).contains(&(target, Some(State::Alive), State::Suspect)) {
            suspected = Some(now);
            break;
        }
    }
    // Neither round trip is measured yet: each leg gets the configured
    // probe timeout.
    let legs = 2 * Config::default().probe_timeout;
    let at = suspected.expect("suspected");
    assert!(
        at >= asked + legs && at < asked + legs + 2 * TICK,
        "{:?}",
        at - asked
    );
    assert_eq!(state(&m, &other), Some(State::Alive));
}

#[test]
fn direct_ack_records_rtt() {
    let mut now = Instant::now();
    let mut m = node(0, now);
    m.handle(now, Input::Discovered { id: peer(1) });
    let (target, seq) = tick_until_probe(&mut m, &mut now);
    let later = now + Duration::from_millis(42);
    m.handle(
        later,
        Input::Received {
            from: target,
            msg: Message::Ack {
                seq,
                updates: vec![],
            },
        },
    );
    let member = m.member(&target).expect("member");
    assert_eq!(member.rtt, Some(Duration::from_millis(42)));
    assert_eq!(member.last_seen, Some(later));
}

#[test]
fn relays_indirect_probes() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let (req, target) = (peer(1), peer(2));
    m.handle(t0, Input::Discovered { id: target });
    let out = m.handle(
        t0,
        Input::Received {
            from: req,
            msg: Message::PingReq {
                seq: 77,
                target,
                updates: vec![],
            },
        },
    );
    let s = sends(&out);
    assert_eq!(s.len(), 1);
    let Message::Ping { seq, .. } = s[0].1 else {
        panic!("expected a ping, got {s:?}");
    };
    assert_eq!(s[0].0, target);
    let out = m.handle(
        t0,
        Input::Received {
            from: target,
            msg: Message::Ack {
                seq,
                updates: vec![],
            },
        },
    );
    let s = sends(&out);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].0, req);
    assert!(matches!(s[0].1, Message::Ack { seq: 77, .. }));
    // A second ack for the same seq is not forwarded twice.
    let out = m.handle(
        t0,
        Input::Received {
            from: target,
            msg: Message::Ack {
                seq,
                updates: vec![],
            },
        },
    );
    assert!(sends(&out).is_empty());
}

#[test]
fn buddy_system_puts_the_suspicion_first() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let (a, x) = (peer(1), peer(2));
    gossip(
        &mut m,
        t0,
        a,
        vec![up(x, State::Alive, 3), up(x, State::Suspect, 3)],
    );
    let out = m.handle(
        t0,
        Input::Received {
            from: x,
            msg: Message::Ping {
                seq: 1,
                updates: vec![],
            },
        },
    );
    let s = sends(&out);
    // The sender of an accusation without accuser stands in for it.
    let accused = Update {
        accuser: Some(a),
        ..up(x, State::Suspect, 3)
    };
    assert_eq!(updates_of(&s[0].1)[0], accused);
}

#[test]
fn a_new_suspect_is_told_at_once() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let (a, x) = (peer(1), peer(2));
    gossip(&mut m, t0, a, vec![up(x, State::Alive, 2)]);
    let out = gossip(&mut m, t0, a, vec![up(x, State::Suspect, 2)]);
    let s = sends(&out);
    assert_eq!(s.len(), 1, "{out:?}");
    assert_eq!(s[0].0, x);
    let accused = Update {
        accuser: Some(a),
        ..up(x, State::Suspect, 2)
    };
    assert_eq!(updates_of(&s[0].1)[0], accused);
    // A non-ping from the suspect while that ping is in flight: no second one.
    let out = gossip(&mut m, t0, x, vec![]);
    assert!(sends(&out).is_empty(), "{out:?}");
    // Once it has expired, an ack or ping-req from the suspect is answered
    // with a ping carrying the suspicion.
    let later = t0 + Duration::from_secs(2);
    // A tick keeps telling it, one ping per probe timeout...
    let out = m.handle(later, Input::Tick);
    let told: Vec<_> = sends(&out).into_iter().filter(|(to, _)| *to == x).collect();
    assert!(!told.is_empty(), "{out:?}");
    // (The round's probe may go to it too; each carries the suspicion.)
    assert!(told.len() <= 2, "{out:?}");
    for (_, msg) in &told {
        assert_eq!(updates_of(msg)[0].state, State::Suspect);
    }
    let out = gossip(&mut m, later, x, vec![]);
    assert!(sends(&out).is_empty(), "{out:?}");
    // ...and so does an ack or ping-req from it, within the same limit.
    let later = later + Config::default().probe_timeout;
    let out = gossip(&mut m, later, x, vec![]);
    let s = sends(&out);
    assert_eq!(s.len(), 1, "{out:?}");
    assert_eq!(updates_of(&s[0].1)[0].state, State::Suspect);
}

#[test]
fn dead_members_are_poked_but_not_probed() {
    let mut now = Instant::now();
    let mut m = node(0, now);
    let (a, x) = (peer(1), peer(2));
    m.handle(now, Input::Discovered { id: a });
    gossip(
        &mut m,
        now,
        a,
        vec![up(x, State::Alive, 0), up(x, State::Dead, 0)],
    );
    let mut pokes = 0;
    for _ in 0..50 {
        now += TICK;
        let out = m.handle(now, Input::Tick);
        assert!(m.probe.as_ref().is_none_or(|p| p.target != x));
        for (to, msg) in sends(&out) {
            if let (true, Message::Ping { seq, .. }) = (to == a, &msg) {
                // a answers, so our local health stays perfect.
                m.handle(
                    now,
                    Input::Received {
                        from: a,
                        msg: Message::Ack {
                            seq: *seq,
                            updates: vec![],
                        },
                    },
                );
            }
            if to == x {
                assert!(matches!(msg, Message::Ping { .. }));
                assert_eq!(updates_of(&msg)[0], up(x, State::Dead, 0));
                pokes += 1;
            }
        }
    }
    // One every DEAD_POKE_ROUNDS probe rounds over 5 s.
    assert!((2..=3).contains(&pokes), "{pokes} pokes");
}

#[test]
fn discovery_introduces_us_and_pokes_the_dead() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let b = peer(1);
    let out = m.handle(t0, Input::Discovered { id: b });
    assert_eq!(changes(&out), vec![(b, None, State::Alive)]);
    let s = sends(&out);
    assert_eq!(s.len(), 1);
    assert!(updates_of(&s[0].1)
        .iter()
        .any(|u| u.id == peer(0) && u.meta.as_deref() == Some("rack-0")));

    gossip(&mut m, t0, peer(2), vec![up(b, State::Dead, 0)]);
    let out = m.handle(t0, Input::Discovered { id: b });
    let s = sends(&out);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].0, b);
    assert_eq!(updates_of(&s[0].1)[0], up(b, State::Dead, 0));
}

#[test]
fn revoked_members_stay_gone() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let (a, x) = (peer(1), peer(2));
    m.handle(t0, Input::Discovered { id: x });
    assert!(m.handle(t0, Input::Revoked { id: x }).is_empty());
    assert!(m.member(&x).is_none());
    assert!(m.handle(t0, Input::Discovered { id: x }).is_empty());
    let out = m.handle(
        t0,
        Input::Received {
            from: x,
            msg: Message::Ping {
                seq: 1,
                updates: vec![up(a, State::Alive, 0)],
            },
        },
    );
    assert!(out.is_empty());
    gossip(&mut m, t0, a, vec![up(x, State::Alive, 99)]);
    assert!(m.member(&x).is_none());
    assert!(m.members().all(|mem| mem.id != x));
}

#[test]
fn expelled_member_is_dead_at_once_gossiped_and_may_return() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let (a, x) = (peer(1), peer(2));
    m.handle(t0, Input::Discovered { id: a });
    m.handle(t0, Input::Discovered { id: x });
    gossip(&mut m, t0, a, vec![up(x, State::Alive, 5)]);
    let out = m.handle(t0, Input::Expelled { id: x });
    assert_eq!(changes(&out), vec![(x, Some(State::Alive), State::Dead)]);
    assert_eq!(state(&m, &x), Some(State::Dead));
    assert_eq!(m.member(&x).map(|mem| mem.incarnation), Some(5));
    // Expelling again, or a stranger, changes nothing.
    assert!(m.handle(t0, Input::Expelled { id: x }).is_empty());
    assert!(m.handle(t0, Input::Expelled { id: peer(9) }).is_empty());
    // An alive record at the same incarnation does not revive it...
    gossip(&mut m, t0, a, vec![up(x, State::Alive, 5)]);
    assert_eq!(state(&m, &x), Some(State::Dead));
    // ...the death is gossiped to the others...
    let mut now = t0;
    let mut told = false;
    for _ in 0..100 {
        now += TICK;
        for (to, msg) in sends(&m.handle(now, Input::Tick)) {
            told |= to == a
                && updates_of(&msg)
                    .iter()
                    .any(|u| u.id == x && u.state == State::Dead && u.incarnation == 5);
        }
    }
    assert!(told, "the expulsion was never gossiped to a");
    // ...and a refutation (re-admitted with a renewed certificate) brings
    // it back, unlike a revocation.
    gossip(&mut m, now, a, vec![up(x, State::Alive, 6)]);
    assert_eq!(state(&m, &x), Some(State::Alive));
}

#[test]
fn meta_spreads_and_highest_version_wins() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let a = peer(1);
    m.handle(t0, Input::Discovered { id: a });
    let before = m.local_meta_version();
    m.handle(t0, Input::SetMeta("rack-0 v2".into()));
    assert_eq!(m.local_meta_version(), before + 1);
    let out = m.handle(
        t0,
        Input::Received {
            from: a,
            msg: Message::Ping {
                seq: 1,
                updates: vec![],
            },
        },
    );
    let s = sends(&out);
    assert!(updates_of(&s[0].1).iter().any(|u| u.id == peer(0)
        && u.meta.as_deref() == Some("rack-0 v2")
        && u.meta_version == before + 1));

    let with_meta = |v: u64, s: &str| Update {
        id: a,
        state: State::Alive,
        incarnation: 0,
        meta_version: v,
        meta: Some(s.to_string()),
        accuser: None,
    };
    let out = gossip(&mut m, t0, a, vec![with_meta(5, "five")]);
    assert!(out.contains(&Output::MetaChanged { id: a }));
    gossip(&mut m, t0, a, vec![with_meta(4, "four")]);
    assert_eq!(
        m.member(&a).and_then(|m| m.meta.clone()).as_deref(),
        Some("five")
    );
    // Meta rides on Suspect/Dead records too.
    gossip(
        &mut m,
        t0,
        peer(2),
        vec![Update {
            state: State::Suspect,
            ..with_meta(6, "six")
        }],
    );
    assert_eq!(
        m.member(&a).and_then(|m| m.meta.clone()).as_deref(),
        Some("six")
    );
}

#[test]
fn restart_meta_version_beats_the_previous_run() {
    let t0 = Instant::now();
    let mut old = node(0, t0);
    for i in 0..1000 {
        old.handle(t0, Input::SetMeta(format!("v{i}")));
    }
    let new: Membership<String> = Membership::new(
        peer(0),
        old.local_incarnation() + 1,
        "fresh".into(),
        Config::default(),
        StdRng::seed_from_u64(1),
        t0,
    );
    assert!(new.local_meta_version() > old.local_meta_version());
}

#[test]
fn a_previous_runs_meta_version_is_outversioned() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let v = m.local_meta_version();
    gossip(
        &mut m,
        t0,
        peer(1),
        vec![Update {
            id: peer(0),
            state: State::Alive,
            incarnation: 0,
            meta_version: v + 10,
            meta: Some("old run".into()),
            accuser: None,
        }],
    );
    assert_eq!(m.local_meta_version(), v + 11);
}

#[test]
fn hostile_messages_are_harmless() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let a = peer(1);
    // PingReq about ourselves, the requester, and a stranger: nothing sent.
    for target in [peer(0), a, peer(9)] {
        let out = m.handle(
            t0,
            Input::Received {
                from: a,
                msg: Message::PingReq {
                    seq: u64::MAX,
                    target,
                    updates: vec![],
                },
            },
        );
        assert!(sends(&out).is_empty(), "{target}: {out:?}");
    }
    // Acks for unknown seqs, messages from ourselves.
    let out = m.handle(
        t0,
        Input::Received {
            from: a,
            msg: Message::Ack {
                seq: 12345,
                updates: vec![],
            },
        },
    );
    assert!(sends(&out).is_empty());
    assert!(m
        .handle(
            t0,
            Input::Received {
                from: peer(0),
                msg: Message::Ping {
                    seq: 0,
                    updates: vec![]
                }
            }
        )
        .is_empty());
    // Saturated incarnations and versions do not overflow.
    gossip(
        &mut m,
        t0,
        a,
        vec![
            Update {
                id: peer(0),
                state: State::Dead,
                incarnation: u64::MAX,
                meta_version: u64::MAX,
                meta: Some("x".into()),
                accuser: None,
            },
            up(peer(2), State::Alive, u64::MAX),
            up(peer(2), State::Dead, u64::MAX),
        ],
    );
    assert_eq!(m.local_incarnation(), u64::MAX);
    assert_eq!(state(&m, &peer(2)), Some(State::Dead));
    m.handle(t0 + Duration::from_secs(3600), Input::Tick);
}

#[test]
fn a_member_that_cannot_refute_does_not_cause_a_ping_loop() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let x = peer(2);
    gossip(
        &mut m,
        t0,
        peer(1),
        vec![up(x, State::Alive, u64::MAX), up(x, State::Dead, u64::MAX)],
    );
    let mut pings = 0;
    for i in 0..20u64 {
        // Acks from x arriving every 10 ms, never refuting.
        let out = gossip(
            &mut m,
            t0 + Duration::from_millis(10 * i),
            x,
            vec![up(x, State::Alive, 0)],
        );
        pings += sends(&out).len();
    }
    assert_eq!(state(&m, &x), Some(State::Dead));
    assert!(pings <= 1, "{pings} pings in 200 ms");
}

#[test]
fn table_pending_and_queue_are_bounded() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let ids: Vec<PeerId> = (0..MAX_MEMBERS + 100).map(|_| PeerId::random()).collect();
    for chunk in ids.chunks(200) {
        let updates = chunk.iter().map(|id| up(*id, State::Alive, 1)).collect();
        gossip(&mut m, t0, ids[0], updates);
    }
    assert_eq!(m.members().count(), MAX_MEMBERS);
    assert!(m.queue.len() <= MAX_BROADCASTS);

    let target = ids[1];
    for seq in 0..(MAX_PENDING as u64 * 3) {
        m.handle(
            t0,
            Input::Received {
                from: ids[0],
                msg: Message::PingReq {
                    seq,
                    target,
                    updates: vec![],
                },
            },
        );
    }
    assert!(m.pending.len() <= MAX_PENDING);
    // Pending relays expire.
    m.handle(t0 + Duration::from_secs(5), Input::Tick);
    assert!(m.pending.is_empty());
}

fn arb_state() -> impl Strategy<Value = State> {
    prop_oneof![Just(State::Alive), Just(State::Suspect), Just(State::Dead)]
}

fn arb_update() -> impl Strategy<Value = Update<String>> {
    (
        0u8..6,
        arb_state(),
        prop_oneof![0u64..4, Just(u64::MAX)],
        0u64..4,
        proptest::option::of("[a-c]"),
        proptest::option::of(0u8..6),
    )
        .prop_map(
            |(i, state, incarnation, meta_version, meta, accuser)| Update {
                id: peer(i),
                state,
                incarnation,
                meta_version,
                meta,
                accuser: accuser.map(peer),
            },
        )
}

fn arb_input() -> impl Strategy<Value = (u64, Input<String>)> {
    let msg = (
        0u8..3,
        prop_oneof![0u64..8, Just(u64::MAX)],
        0u8..6,
        proptest::collection::vec(arb_update(), 0..5),
    )
        .prop_map(|(kind, seq, target, updates)| match kind {
            0 => Message::Ping { seq, updates },
            1 => Message::Ack { seq, updates },
            _ => Message::PingReq {
                seq,
                target: peer(target),
                updates,
            },
        });
    let input = prop_oneof![
        4 => Just(Input::Tick),
        6 => (0u8..6, msg).prop_map(|(from, msg)| Input::Received { from: peer(from), msg }),
        1 => (0u8..6).prop_map(|i| Input::Discovered { id: peer(i) }),
        1 => (1u8..6).prop_map(|i| Input::Revoked { id: peer(i) }),
        1 => (0u8..6).prop_map(|i| Input::Expelled { id: peer(i) }),
        1 => "[a-c]".prop_map(Input::SetMeta),
    ];
    (0u64..700, input)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary input sequences never panic and keep the table's invariants.
    #[test]
    fn arbitrary_inputs_keep_invariants(inputs in proptest::collection::vec(arb_input(), 0..200)) {
        let mut now = Instant::now();
        let mut m = node(0, now);
        let mut revoked = BTreeSet::new();
        let mut last_inc = m.local_incarnation();
        for (advance_ms, input) in inputs {
            now += Duration::from_millis(advance_ms);
            if let Input::Revoked { id } = &input {
                revoked.insert(*id);
            }
            let out = m.handle(now, input);
            for o in &out {
                if let Output::Send { to, msg } = o {
                    prop_assert!(to != &peer(0));
                    prop_assert!(!revoked.contains(to));
                    prop_assert!(updates_of(msg).len() <= Config::default().max_piggyback + 2);
                }
            }
            prop_assert!(m.local_incarnation() >= last_inc);
            last_inc = m.local_incarnation();
            prop_assert!(m.member(&peer(0)).is_none());
            for id in &revoked {
                prop_assert!(m.member(id).is_none());
            }
            for mem in m.members() {
                prop_assert_eq!(m.members.get(&mem.id).map(|e| e.suspicion.is_some()), Some(mem.state == State::Suspect));
                let base = Config::default().probe_timeout;
                let t = m.probe_timeout_of(&mem.id).expect("a member has a timeout");
                prop_assert!(t >= base);
                prop_assert!(t <= PROBE_TIMEOUT_CEILING * (MAX_LOCAL_HEALTH + 1));
                if let Some(t) = m.suspicion_timeout_of(&mem.id) {
                    let min = Config::default().suspect_timeout;
                    prop_assert!(t >= min && t <= min * SUSPICION_MAX_MULT);
                }
            }
            prop_assert!(m.local_health() <= MAX_LOCAL_HEALTH);
            prop_assert!(m.pending.len() <= MAX_PENDING);
        }
    }
}

// --- adaptive timeouts, local health, dynamic suspicion -------------------

const MS: Duration = Duration::from_millis(1);

#[test]
fn rtt_estimate_follows_rfc_6298() {
    let first = RttEstimate::update(None, 600 * MS);
    assert_eq!(first.srtt, 600 * MS);
    assert_eq!(first.rttvar, 300 * MS);
    // A second, equal sample: srtt stays, rttvar shrinks by a quarter.
    let second = RttEstimate::update(Some(first), 600 * MS);
    assert_eq!(second.srtt, 600 * MS);
    assert_eq!(second.rttvar, 225 * MS);
    // A 200 ms deviation: srtt moves by 1/8 of it, rttvar towards it by 1/4.
    let third = RttEstimate::update(Some(second), 800 * MS);
    assert_eq!(third.srtt, 625 * MS);
    assert_eq!(third.rttvar, Duration::from_micros(218_750));
}

#[test]
fn probe_timeout_is_floored_by_config_and_ceilinged() {
    let floor = 500 * MS;
    assert_eq!(probe_timeout(None, floor), floor);
    let lan = RttEstimate {
        srtt: 2 * MS,
        rttvar: MS,
    };
    assert_eq!(probe_timeout(Some(lan), floor), floor);
    let sat = RttEstimate {
        srtt: 600 * MS,
        rttvar: 20 * MS,
    };
    assert_eq!(probe_timeout(Some(sat), floor), 680 * MS);
    let broken = RttEstimate {
        srtt: Duration::from_secs(20),
        rttvar: Duration::from_secs(5),
    };
    assert_eq!(probe_timeout(Some(broken), floor), PROBE_TIMEOUT_CEILING);
    // A configured floor above the ceiling wins.
    assert_eq!(
        probe_timeout(Some(broken), 5 * PROBE_TIMEOUT_CEILING),
        5 * PROBE_TIMEOUT_CEILING
    );
    // Legs have their own small floor, and the config value while unknown.
    assert_eq!(leg_timeout(Some(lan), floor), LEG_TIMEOUT_FLOOR);
    assert_eq!(leg_timeout(None, floor), floor);
    assert_eq!(leg_timeout(Some(broken), floor), PROBE_TIMEOUT_CEILING);
}

/// Node 0 with members 1 and 2, whose probes of both were acked after
/// `rtt` a few times (so their estimates are about `rtt`). Returns it with
/// the time.
fn node_with_measured_rtt(rtt: Duration) -> (Membership<String>, Instant) {
    let mut now = Instant::now();
    let mut m = node(0, now);
    m.handle(now, Input::Discovered { id: peer(1) });
    m.handle(now, Input::Discovered { id: peer(2) });
    for _ in 0..8 {
        let (target, seq) = tick_until_probe(&mut m, &mut now);
        now += rtt;
        m.handle(
            now,
            Input::Received {
                from: target,
                msg: Message::Ack {
                    seq,
                    updates: vec![],
                },
            },
        );
    }
    (m, now)
}

#[test]
fn a_600ms_link_gets_a_probe_timeout_above_its_round_trip() {
    let (mut m, mut now) = node_with_measured_rtt(600 * MS);
    for id in [peer(1), peer(2)] {
        let e = m.rtt_estimate(&id).expect("measured");
        assert!(e.srtt.abs_diff(600 * MS) < 10 * MS, "{e:?}");
        let t = m.probe_timeout_of(&id).expect("member");
        assert!(t > 600 * MS && t <= PROBE_TIMEOUT_CEILING, "{t:?}");
    }
    assert_eq!(m.local_health(), 0);
    // A probe answered after 650 ms needs no indirect phase.
    let (target, seq) = tick_until_probe(&mut m, &mut now);
    let sent = now;
    let mut out = Vec::new();
    while now < sent + 600 * MS {
        now += TICK;
        out.extend(m.handle(now, Input::Tick));
    }
    assert!(
        !sends(&out)
            .iter()
            .any(|(_, msg)| matches!(msg, Message::PingReq { .. })),
        "asked for indirect probes before the RTT-derived timeout: {out:?}"
    );
    m.handle(
        sent + 650 * MS,
        Input::Received {
            from: target,
            msg: Message::Ack {
                seq,
                updates: vec![],
            },
        },
    );
    for _ in 0..30 {
        now += TICK;
        let out = m.handle(now, Input::Tick);
        assert!(!changes(&out).iter().any(|c| c.0 == target), "{out:?}");
    }
}

#[test]
fn indirect_phase_waits_for_both_slow_legs_past_the_interval() {
    let (mut m, mut now) = node_with_measured_rtt(600 * MS);
    let (target, seq) = tick_until_probe(&mut m, &mut now);
    let sent = now;
    let other = if target == peer(1) { peer(2) } else { peer(1) };
    // No direct ack: the PingReq leaves after the direct timeout.
    let mut asked_at = None;
    for _ in 0..30 {
        now += TICK;
        let out = m.handle(now, Input::Tick);
        if sends(&out)
            .iter()
            .any(|(to, msg)| *to == other && matches!(msg, Message::PingReq { .. }))
        {
            asked_at = Some(now);
            break;
        }
    }
    let asked_at = asked_at.expect("indirect phase started");
    assert!(asked_at - sent > 600 * MS);
    // The relayed ack crosses two 600 ms legs: it arrives 1.2 s later, past
    // the 1 s probe interval, and still counts.
    let mut out = Vec::new();
    while now < asked_at + 1_200 * MS {
        now += TICK;
        out.extend(m.handle(now, Input::Tick));
    }
    assert!(!changes(&out).iter().any(|c| c.0 == target), "{out:?}");
    m.handle(
        now,
        Input::Received {
            from: other,
            msg: Message::Ack {
                seq,
                updates: vec![],
            },
        },
    );
    for _ in 0..30 {
        now += TICK;
        let out = m.handle(now, Input::Tick);
        assert!(!changes(&out).iter().any(|c| c.0 == target), "{out:?}");
    }
    assert_eq!(state(&m, &target), Some(State::Alive));
}

#[test]
fn failed_probes_raise_local_health_and_stretch_the_interval() {
    let mut now = Instant::now();
    let mut m = node(0, now);
    for i in 1..=4 {
        m.handle(now, Input::Discovered { id: peer(i) });
    }
    let base = Config::default().probe_interval;
    assert_eq!(m.current_probe_interval(), base);
    // Nobody answers anything: every probe fails.
    let mut failed = 0;
    for _ in 0..600 {
        now += TICK;
        let out = m.handle(now, Input::Tick);
        failed += changes(&out)
            .iter()
            .filter(|c| c.2 == State::Suspect)
            .count();
        if m.local_health() >= 2 {
            break;
        }
    }
    assert!(failed >= 2, "{failed}");
    assert!(m.local_health() >= 2);
    assert_eq!(m.current_probe_interval(), base * (m.local_health() + 1));
    let lhm = m.local_health();
    for id in (1..=4).map(peer) {
        if let Some(t) = m.probe_timeout_of(&id) {
            assert_eq!(t, Config::default().probe_timeout * (lhm + 1));
        }
    }
    // An answered probe brings it down by one.
    let (target, seq) = tick_until_probe(&mut m, &mut now);
    let before = m.local_health();
    m.handle(
        now,
        Input::Received {
            from: target,
            msg: Message::Ack {
                seq,
                updates: vec![],
            },
        },
    );
    assert_eq!(m.local_health(), before - 1);
}

#[test]
fn local_health_is_bounded_and_scales() {
    let mut h = LocalHealth::default();
    assert_eq!(h.scale(500 * MS), 500 * MS);
    for _ in 0..100 {
        h.worse();
    }
    assert_eq!(h.score(), MAX_LOCAL_HEALTH);
    assert_eq!(h.scale(500 * MS), 500 * MS * (MAX_LOCAL_HEALTH + 1));
    for _ in 0..100 {
        h.better();
    }
    assert_eq!(h.score(), 0);
}

#[test]
fn refuting_a_suspicion_raises_local_health() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let a = peer(1);
    gossip(&mut m, t0, a, vec![up(peer(0), State::Suspect, 0)]);
    assert_eq!(m.local_incarnation(), 1);
    assert_eq!(m.local_health(), 1);
    // A stale record of us is no evidence against our link.
    gossip(&mut m, t0, a, vec![up(peer(0), State::Alive, 0)]);
    assert_eq!(m.local_health(), 1);
}

#[test]
fn suspicion_timeout_shrinks_with_confirmations() {
    let (min, max) = (Duration::from_secs(4), Duration::from_secs(8));
    assert_eq!(suspicion_timeout(min, max, 0, 0), min);
    assert_eq!(suspicion_timeout(min, max, 3, 0), max);
    assert_eq!(suspicion_timeout(min, max, 3, 3), min);
    assert_eq!(suspicion_timeout(min, max, 3, 9), min);
    // log scaling: the first confirmation takes half the span.
    let one = suspicion_timeout(min, max, 3, 1);
    assert!(one.abs_diff(Duration::from_secs(6)) < MS, "{one:?}");
}

#[test]
fn independent_accusers_shorten_a_suspicion_relays_do_not() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let x = peer(9);
    let others: Vec<PeerId> = (1..=5).map(peer).collect();
    for o in &others {
        gossip(&mut m, t0, *o, vec![up(x, State::Alive, 0)]);
    }
    // Fleet of 7 (us, x, five others): 3 confirmations expected.
    let accused = |accuser: PeerId| Update {
        accuser: Some(accuser),
        ..up(x, State::Suspect, 0)
    };
    gossip(&mut m, t0, others[0], vec![accused(others[0])]);
    let max = Config::default().suspect_timeout * SUSPICION_MAX_MULT;
    assert_eq!(m.suspicion_timeout_of(&x), Some(max));
    // The same accusation relayed by others is not a confirmation.
    for o in &others[1..] {
        gossip(&mut m, t0, *o, vec![accused(others[0])]);
    }
    assert_eq!(m.suspicion_timeout_of(&x), Some(max));
    // Two more accusers (however they reach us) shorten it, step by step.
    gossip(&mut m, t0, others[4], vec![accused(others[1])]);
    let one = m.suspicion_timeout_of(&x).expect("suspect");
    assert!(one < max);
    gossip(&mut m, t0, others[4], vec![accused(others[2])]);
    let two = m.suspicion_timeout_of(&x).expect("suspect");
    assert!(two < one);
    // The confirmation is passed on, naming its accuser.
    let out = m.handle(
        t0,
        Input::Received {
            from: others[3],
            msg: Message::Ping {
                seq: 1,
                updates: vec![],
            },
        },
    );
    assert!(sends(&out).iter().any(|(_, msg)| updates_of(msg)
        .iter()
        .any(|u| u.id == x && u.accuser.is_some())));
    // Ourselves as accuser, or x accusing itself, count for nothing.
    gossip(&mut m, t0, others[4], vec![accused(peer(0)), accused(x)]);
    assert_eq!(m.suspicion_timeout_of(&x), Some(two));
    // A third accuser brings it to the shortest; death follows then.
    gossip(&mut m, t0, others[4], vec![accused(others[3])]);
    assert_eq!(
        m.suspicion_timeout_of(&x),
        Some(Config::default().suspect_timeout)
    );
    let out = m.handle(t0 + Config::default().suspect_timeout, Input::Tick);
    assert_eq!(changes(&out), vec![(x, Some(State::Suspect), State::Dead)]);
}

#[test]
fn an_accusation_without_accuser_is_the_senders() {
    let t0 = Instant::now();
    let mut m = node(0, t0);
    let (a, b, x) = (peer(1), peer(2), peer(9));
    gossip(&mut m, t0, a, vec![up(x, State::Alive, 0)]);
    gossip(&mut m, t0, b, vec![up(x, State::Alive, 0)]);
    gossip(&mut m, t0, peer(3), vec![]);
    gossip(&mut m, t0, a, vec![up(x, State::Suspect, 0)]);
    let max = Config::default().suspect_timeout * SUSPICION_MAX_MULT;
    assert_eq!(m.suspicion_timeout_of(&x), Some(max));
    gossip(&mut m, t0, b, vec![up(x, State::Suspect, 0)]);
    assert!(m.suspicion_timeout_of(&x) < Some(max));
}

#[test]
fn our_own_failed_probe_of_a_suspect_confirms_it() {
    let mut now = Instant::now();
    let mut m = node(0, now);
    let (a, b) = (peer(1), peer(2));
    for i in 1..=4 {
        m.handle(now, Input::Discovered { id: peer(i) });
    }
    // Let the discovery pokes expire; then b accuses a.
    now += Duration::from_secs(5);
    gossip(
        &mut m,
        now,
        b,
        vec![Update {
            accuser: Some(b),
            ..up(a, State::Suspect, 0)
        }],
    );
    let max = Config::default().suspect_timeout * SUSPICION_MAX_MULT;
    assert_eq!(m.suspicion_timeout_of(&a), Some(max));
    // Everyone but a answers our probes; nobody relays for a.
    let mut confirmed = false;
    for _ in 0..200 {
        now += TICK;
        let out = m.handle(now, Input::Tick);
        assert!(!changes(&out).iter().any(|c| c.0 != a), "{out:?}");
        for (to, msg) in sends(&out) {
            if let (true, Message::Ping { seq, .. }) = (to != a, &msg) {
                m.handle(
                    now,
                    Input::Received {
                        from: to,
                        msg: Message::Ack {
                            seq: *seq,
                            updates: vec![],
                        },
                    },
                );
            }
        }
        if m.suspicion_timeout_of(&a) < Some(max) {
            confirmed = true;
            break;
        }
    }
    assert!(confirmed, "own failed probe did not confirm the suspicion");
    // b suspected a first: the failure is a's, not ours.
    assert_eq!(m.local_health(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// The timeout stays within the configured floor and the ceiling (or
    /// the floor, if higher), whatever the samples.
    #[test]
    fn rtt_timeout_stays_within_bounds(
        samples in proptest::collection::vec(0u64..60_000, 1..50),
        floor_ms in 1u64..5_000,
    ) {
        let floor = Duration::from_millis(floor_ms);
        let mut e = None;
        for s in samples {
            let next = RttEstimate::update(e, Duration::from_millis(s));
            e = Some(next);
            let t = probe_timeout(e, floor);
            prop_assert!(t >= floor);
            prop_assert!(t <= floor.max(PROBE_TIMEOUT_CEILING));
            let leg = leg_timeout(e, floor);
            prop_assert!((LEG_TIMEOUT_FLOOR..=PROBE_TIMEOUT_CEILING).contains(&leg));
        }
    }

    /// Steady samples converge: srtt to the sample, the timeout to just
    /// above it (or the floor).
    #[test]
    fn steady_samples_converge(rtt_ms in 1u64..2_500) {
        let rtt = Duration::from_millis(rtt_ms);
        let mut e = None;
        for _ in 0..200 {
            e = Some(RttEstimate::update(e, rtt));
        }
        let e = e.expect("sampled");
        prop_assert!(e.srtt.abs_diff(rtt) <= MS);
        prop_assert!(e.raw_timeout() >= rtt);
        prop_assert!(e.raw_timeout() <= rtt + 5 * MS);
    }

    /// More confirmations never lengthen a suspicion; it stays in
    /// [min, max].
    #[test]
    fn suspicion_timeout_is_monotone_and_bounded(
        min_ms in 1u64..100_000,
        mult in 1u32..5,
        k in 0u32..10,
        c in 0u32..12,
    ) {
        let min = Duration::from_millis(min_ms);
        let max = min * mult;
        let t = suspicion_timeout(min, max, k, c);
        prop_assert!(t >= min && t <= max);
        prop_assert!(suspicion_timeout(min, max, k, c + 1) <= t);
    }
}
