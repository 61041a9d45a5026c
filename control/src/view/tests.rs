use std::collections::{BTreeMap, BTreeSet};

use deploy::power::{PowerSource, PowerStatus};
use deploy::Role;
use mesh::membership::State;
use mesh::RackInfo;
use proptest::prelude::*;

use super::*;
use crate::field::RackReport;

const LEASE: u64 = 8_000;
const FRESH: u64 = 3_000;
const NOW: u64 = 1_000_000;

fn timing() -> ViewTiming {
    ViewTiming {
        lease_ms: LEASE,
        fresh_ms: FRESH,
    }
}

fn report(site: &str) -> RackReport {
    RackReport {
        role: Role::Rack,
        site: site.into(),
        cpus: 4,
        memory_mb: 4096,
        at_ms: NOW - 500,
        ..RackReport::default()
    }
}

fn meta(rack: &str, site: &str, dying: bool) -> RackInfo {
    RackInfo {
        rack: rack.into(),
        role: Role::Rack,
        site: site.into(),
        cpus: 2,
        memory_mb: 1024,
        power: PowerStatus {
            source: PowerSource::Battery,
            dying,
            ..PowerStatus::default()
        },
        version: "test".into(),
        api: String::new(),
        bulk_port: None,
    }
}

fn peer(rack: &str, state: State) -> PeerFacts {
    PeerFacts {
        rack: rack.into(),
        state,
        rtt_ms: Some(3),
        meta: Some(meta(rack, "gossip-site", false)),
    }
}

/// Local rack `a`, renewing; nothing else known.
fn base() -> ViewInputs {
    ViewInputs {
        local: "a".into(),
        reports: BTreeMap::from([("a".into(), report("north"))]),
        peers: Vec::new(),
        admitted: BTreeSet::new(),
        revoked: BTreeSet::new(),
        renew_age_ms: BTreeMap::from([("a".into(), 100)]),
        timing: timing(),
        young: false,
        down_since: BTreeMap::new(),
    }
}

/// `base` plus rack `b` with the given facts.
fn with_b(
    state: Option<State>,
    admitted: bool,
    renew_age: Option<u64>,
    revoked: bool,
    young: bool,
) -> ViewInputs {
    let mut i = base();
    i.young = young;
    i.reports.insert("b".into(), report("south"));
    if let Some(s) = state {
        i.peers.push(peer("b", s));
    }
    if admitted {
        i.admitted.insert("b".into());
    }
    if let Some(a) = renew_age {
        i.renew_age_ms.insert("b".into(), a);
    }
    if revoked {
        i.revoked.insert("b".into());
    }
    i
}

/// The rule as a table: (SWIM state, admitted, renewal age, revoked,
/// young) → (up, renewing, reachable).
#[test]
fn the_up_rule_as_a_table() {
    use State::{Alive, Dead, Suspect};
    type Case = (
        &'static str,
        Option<State>,
        bool,
        Option<u64>,
        bool,
        bool,
        bool,
        bool,
        bool,
    );
    #[rustfmt::skip]
    let cases: &[Case] = &[
        // what,                                   swim,         adm,   renew,        rev,   young, up,    renewing, reachable
        ("alive, admitted, renewing",              Some(Alive),  true,  Some(500),    false, false, true,  true,  true),
        ("suspect still counts as in the mesh",    Some(Suspect),true,  Some(500),    false, false, true,  true,  true),
        ("dead but a fresh renewal: up",           Some(Dead),   true,  Some(1_000),  false, false, true,  true,  false),
        ("dead, renewal not fresh: down",          Some(Dead),   true,  Some(4_000),  false, false, false, true,  false),
        ("alive but not renewing: down",           Some(Alive),  true,  Some(9_000),  false, false, false, false, true),
        ("never renewed, control plane old: down", Some(Alive),  true,  None,         false, false, false, false, true),
        ("never renewed, control plane young: up", Some(Alive),  true,  None,         false, true,  true,  true,  true),
        ("relayed only (not admitted): still up",  Some(Alive),  false, Some(500),    false, false, true,  true,  false),
        ("unknown to SWIM, fresh renewal: up",     None,         false, Some(500),    false, false, true,  true,  false),
        ("unknown to SWIM, stale renewal: down",   None,         false, Some(5_000),  false, false, false, true,  false),
        ("revoked: down whatever else",            None,         false, Some(500),    true,  false, false, true,  false),
    ];
    for &(what, swim, adm, renew, rev, young, up, renewing, reachable) in cases {
        let v = compute(&with_b(swim, adm, renew, rev, young), NOW);
        let b = v.rack("b").expect("b in view");
        assert_eq!(b.up, up, "{what}: up");
        assert_eq!(b.renewing, renewing, "{what}: renewing");
        assert_eq!(b.reachable, reachable, "{what}: reachable");
        assert_eq!(b.revoked, rev, "{what}: revoked");
        assert_eq!(b.down_since_ms.is_none(), up, "{what}: down_since");
    }
}

#[test]
fn the_local_rack_is_in_the_mesh_but_must_renew() {
    let v = compute(&base(), NOW);
    let a = v.rack("a").unwrap();
    assert!(a.local && a.up && a.admitted && a.reachable);
    assert_eq!(a.membership, None);
    let mut i = base();
    i.renew_age_ms.insert("a".into(), LEASE + 1);
    let a = compute(&i, NOW).rack("a").unwrap().clone();
    assert!(
        !a.up,
        "a rack that cannot renew (minority side) is down, even to itself"
    );
    assert_eq!(a.down_since_ms, Some(NOW));
}

#[test]
fn down_since_is_kept_from_the_previous_view_and_cleared_when_up() {
    let mut i = with_b(Some(State::Dead), false, None, false, false);
    i.down_since.insert("b".into(), NOW - 7_000);
    let v = compute(&i, NOW);
    assert_eq!(v.rack("b").unwrap().down_since_ms, Some(NOW - 7_000));
    let mut i = with_b(Some(State::Alive), true, Some(100), false, false);
    i.down_since.insert("b".into(), NOW - 7_000);
    assert_eq!(compute(&i, NOW).rack("b").unwrap().down_since_ms, None);
}

#[test]
fn report_wins_over_gossip_and_gossip_fills_what_is_missing() {
    let mut i = with_b(Some(State::Alive), true, Some(100), false, false);
    i.reports.get_mut("b").unwrap().free_bytes = Some(77);
    i.peers.push(PeerFacts {
        meta: Some(meta("c", "east", true)),
        ..peer("c", State::Alive)
    });
    let v = compute(&i, NOW);
    let b = v.rack("b").unwrap();
    assert_eq!(b.site.as_deref(), Some("south"), "report's site");
    assert_eq!(b.cpus, Some(4));
    assert_eq!(b.free_bytes, Some(77));
    assert_eq!(
        b.power_source,
        Some(PowerSource::Battery),
        "gossip fills the source"
    );
    assert!(b.reported);
    assert_eq!(b.report_age_ms, Some(500));
    let c = v.rack("c").unwrap();
    assert_eq!(c.site.as_deref(), Some("east"), "gossip's site");
    assert_eq!(c.cpus, Some(2));
    assert!(c.dying, "gossip says dying before the next report does");
    assert!(!c.reported);
    assert_eq!(c.free_bytes, None);
}

#[test]
fn a_dying_report_makes_the_rack_dying() {
    let mut i = with_b(Some(State::Alive), true, Some(100), false, false);
    i.reports.get_mut("b").unwrap().power_dying = true;
    assert!(compute(&i, NOW).rack("b").unwrap().dying);
}

#[test]
fn a_name_carried_by_an_unrevoked_member_is_not_revoked() {
    // Revoked, then re-provisioned under the same name with a new key.
    let i = with_b(Some(State::Alive), true, Some(100), true, false);
    let b = compute(&i, NOW).rack("b").unwrap().clone();
    assert!(!b.revoked && b.up);
}

#[test]
fn of_several_members_with_one_name_the_best_state_counts() {
    let mut i = with_b(Some(State::Dead), true, Some(9_000), false, false);
    i.peers.push(peer("b", State::Alive));
    i.peers.push(peer("b", State::Suspect));
    assert_eq!(
        compute(&i, NOW).rack("b").unwrap().membership,
        Some(State::Alive)
    );
}

#[test]
fn every_known_name_appears_once_sorted() {
    let mut i = with_b(Some(State::Alive), true, Some(100), false, false);
    i.peers.push(peer("c", State::Alive));
    i.peers.push(peer("c", State::Dead));
    i.revoked.insert("z".into());
    let names: Vec<String> = compute(&i, NOW).racks.into_iter().map(|r| r.name).collect();
    assert_eq!(names, vec!["a", "b", "c", "z"]);
}

#[test]
fn the_view_is_json() {
    let v = compute(
        &with_b(Some(State::Alive), true, Some(100), false, false),
        NOW,
    );
    let text = serde_json::to_string(&v).unwrap();
    assert!(text.contains("\"membership\":\"alive\""), "{text}");
    let back: FieldView = serde_json::from_str(&text).unwrap();
    assert_eq!(back, v);
}

fn arb_state() -> impl Strategy<Value = Option<State>> {
    prop_oneof![
        Just(None),
        Just(Some(State::Alive)),
        Just(Some(State::Suspect)),
        Just(Some(State::Dead)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the facts: up implies renewing, not revoked and in the
    /// mesh; a rack is down exactly when it has a down_since; a rack not
    /// reachable is never the local one; down_since never moves forward.
    #[test]
    fn up_follows_the_rule(
        racks in proptest::collection::vec(
            (arb_state(), any::<bool>(), proptest::option::of(0u64..20_000), any::<bool>(),
             any::<bool>(), proptest::option::of(0u64..5_000)),
            1..8),
        young in any::<bool>(),
    ) {
        let mut i = base();
        i.young = young;
        for (n, (swim, adm, renew, rev, reported, down)) in racks.iter().enumerate() {
            let name = format!("r{n}");
            if let Some(s) = swim { i.peers.push(peer(&name, *s)); }
            if *adm { i.admitted.insert(name.clone()); }
            if let Some(a) = renew { i.renew_age_ms.insert(name.clone(), *a); }
            if *rev { i.revoked.insert(name.clone()); }
            if *reported { i.reports.insert(name.clone(), report("s")); }
            if let Some(d) = down { i.down_since.insert(name.clone(), NOW - d); }
        }
        let v = compute(&i, NOW);
        // Known: through the mesh, a report or a revocation (a renewal age
        // or an admission alone names no rack of its own).
        let known = racks.iter().filter(|(swim, _, _, rev, reported, _)| swim.is_some() || *rev || *reported).count();
        prop_assert_eq!(v.racks.len(), known + 1);
        for r in &v.racks {
            let in_mesh = r.local
                || r.renew_age_ms.is_some_and(|a| a < FRESH)
                || r.membership.is_some_and(|s| s != State::Dead);
            prop_assert_eq!(r.up, in_mesh && r.renewing && !r.revoked, "{:?}", r);
            prop_assert_eq!(r.up, r.down_since_ms.is_none());
            if let (Some(d), Some(prev)) = (r.down_since_ms, i.down_since.get(&r.name)) {
                prop_assert_eq!(d, *prev);
            }
            if r.reachable && !r.local {
                prop_assert!(r.admitted && !r.revoked);
            }
            prop_assert_eq!(r.reported, i.reports.contains_key(&r.name));
        }
    }
}
