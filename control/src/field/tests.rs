use std::collections::BTreeMap;

use deploy::appliance::{parse_manifest, ApplianceSpec};
use deploy::Role;
use proptest::prelude::*;

use super::*;

/// Specs from manifest text.
fn specs(toml: &str) -> Vec<ApplianceSpec> {
    parse_manifest(toml).expect("valid manifest")
}

/// One process appliance with optional extra TOML lines and volumes.
fn app(name: &str, extra: &str, volumes: &[&str]) -> ApplianceSpec {
    let mut t = format!(
        "[[appliance]]\nname = \"{name}\"\ndriver = \"process\"\ncommand = [\"/bin/true\"]\n{extra}\n"
    );
    for v in volumes {
        t.push_str(&format!(
            "[[appliance.volume]]\nname = \"{v}\"\nsize = \"64M\"\n"
        ));
    }
    let mut s = specs(&t);
    assert_eq!(s.len(), 1);
    s.remove(0)
}

fn deploy(state: &mut FieldState, s: Vec<ApplianceSpec>) -> Response {
    state.apply(&Command::Deploy { specs: s })
}

fn report(role: Role) -> RackReport {
    RackReport {
        role,
        site: "north".into(),
        cpus: 4,
        memory_mb: 4096,
        ..RackReport::default()
    }
}

fn renew(state: &mut FieldState, rack: &str, role: Role) -> Response {
    state.apply(&Command::Renew {
        rack: rack.into(),
        report: report(role),
    })
}

fn transfer(reason: &str, planned: bool) -> Transfer {
    Transfer {
        from: None,
        reason: reason.into(),
        planned,
        released: None,
        detected_ms: None,
        decided_ms: 1,
    }
}

fn assign(
    state: &mut FieldState,
    name: &str,
    owner: Option<&str>,
    expect: u64,
    t: Transfer,
) -> Response {
    state.apply(&Command::Assign {
        name: name.into(),
        owner: owner.map(str::to_owned),
        expect_epoch: expect,
        transfer: t,
    })
}

fn refused(r: &Response) -> bool {
    matches!(r, Response::Refused(_))
}

#[test]
fn deploy_adds_new_appliances_unplaced_and_running() {
    let mut s = FieldState::default();
    let r = deploy(
        &mut s,
        specs(
            r#"
[[appliance]]
name = "db"
driver = "process"
command = ["/bin/db"]
tier = 0
[[appliance.volume]]
name = "db-data"
size = "64M"

[[appliance]]
name = "web"
driver = "process"
command = ["/bin/web"]
after = ["db"]
"#,
        ),
    );
    assert_eq!(r, Response::Ok);
    assert_eq!(s.apps.len(), 2);
    let db = &s.apps["db"];
    assert!(db.running);
    assert_eq!(db.owner, None);
    assert_eq!(db.epoch, 0);
    assert_eq!(db.transfer, None);
    assert_eq!(db.move_to, None);
    assert_eq!(db.spec.tier, 0);
    assert_eq!(
        s.appliance_volumes(),
        BTreeMap::from([("db-data".to_owned(), "db".to_owned())])
    );
}

#[test]
fn an_update_keeps_owner_and_epoch_and_replaces_the_spec() {
    let mut s = FieldState::default();
    assert_eq!(deploy(&mut s, vec![app("web", "", &[])]), Response::Ok);
    assert_eq!(
        assign(&mut s, "web", Some("a"), 0, transfer("placed", false)),
        Response::Ok
    );
    assert_eq!(
        s.apply(&Command::SetRunning {
            name: "web".into(),
            running: false
        }),
        Response::Ok
    );
    let updated = app("web", "cpus = 2\nmemory_mb = 128", &[]);
    assert_eq!(deploy(&mut s, vec![updated.clone()]), Response::Ok);
    let w = &s.apps["web"];
    assert_eq!(w.spec, updated);
    assert_eq!(w.owner.as_deref(), Some("a"));
    assert_eq!(w.epoch, 1);
    assert!(w.transfer.is_some());
    assert!(w.running, "deploying again asks for it to run");
}

#[test]
fn deploy_refuses_a_name_given_twice_and_changes_nothing() {
    let mut s = FieldState::default();
    let r = deploy(
        &mut s,
        vec![app("web", "", &[]), app("web", "cpus = 2", &[])],
    );
    assert!(refused(&r), "{r:?}");
    assert!(s.apps.is_empty());
}

#[test]
fn deploy_refuses_unknown_dependencies_and_cycles() {
    let mut s = FieldState::default();
    let r = deploy(&mut s, vec![app("web", "after = [\"db\"]", &[])]);
    assert!(refused(&r), "{r:?}");
    assert!(s.apps.is_empty());

    // A cycle through an already deployed appliance.
    assert_eq!(
        deploy(
            &mut s,
            vec![app("db", "after = [\"web\"]", &[]), app("web", "", &[])]
        ),
        Response::Ok
    );
    let before = s.clone();
    let r = deploy(&mut s, vec![app("web", "after = [\"db\"]", &[])]);
    assert!(refused(&r), "{r:?}");
    assert_eq!(s, before);

    // A dependency on an already deployed appliance is fine.
    assert_eq!(
        deploy(&mut s, vec![app("cache", "after = [\"db\"]", &[])]),
        Response::Ok
    );
    assert_eq!(s.apps.len(), 3);
}

#[test]
fn deploy_refuses_a_volume_shared_by_two_appliances() {
    let mut s = FieldState::default();
    let r = deploy(
        &mut s,
        vec![app("a", "", &["data"]), app("b", "", &["data"])],
    );
    assert!(refused(&r), "{r:?}");
    assert!(s.apps.is_empty());

    assert_eq!(deploy(&mut s, vec![app("a", "", &["data"])]), Response::Ok);
    let before = s.clone();
    let r = deploy(&mut s, vec![app("b", "", &["data"])]);
    assert!(refused(&r), "{r:?}");
    assert_eq!(s, before);
    // The same appliance redeployed with its own volume is fine.
    assert_eq!(
        deploy(&mut s, vec![app("a", "cpus = 2", &["data"])]),
        Response::Ok
    );
}

#[test]
fn set_running_toggles_a_known_appliance_only() {
    let mut s = FieldState::default();
    deploy(&mut s, vec![app("web", "", &[])]);
    assert_eq!(
        s.apply(&Command::SetRunning {
            name: "web".into(),
            running: false
        }),
        Response::Ok
    );
    assert!(!s.apps["web"].running);
    assert_eq!(
        s.apply(&Command::SetRunning {
            name: "web".into(),
            running: true
        }),
        Response::Ok
    );
    assert!(s.apps["web"].running);
    assert!(refused(&s.apply(&Command::SetRunning {
        name: "nope".into(),
        running: false
    })));
}

#[test]
fn move_needs_a_reporting_rack_with_role_rack() {
    let mut s = FieldState::default();
    deploy(&mut s, vec![app("web", "", &[])]);
    let mv = |to: &str| Command::Move {
        name: "web".into(),
        to: to.into(),
    };
    assert!(refused(&s.apply(&mv("b"))), "unknown rack");
    renew(&mut s, "w", Role::Witness);
    assert!(refused(&s.apply(&mv("w"))), "a witness runs nothing");
    assert_eq!(s.apps["web"].move_to, None);

    renew(&mut s, "b", Role::Rack);
    assert_eq!(s.apply(&mv("b")), Response::Ok);
    assert_eq!(s.apps["web"].move_to.as_deref(), Some("b"));
    assert!(refused(&s.apply(&Command::Move {
        name: "nope".into(),
        to: "b".into()
    })));

    // Moving to where it already is cancels a pending move.
    renew(&mut s, "a", Role::Rack);
    assign(&mut s, "web", Some("a"), 0, transfer("placed", false));
    assert_eq!(s.apply(&mv("b")), Response::Ok);
    assert_eq!(s.apply(&mv("a")), Response::Ok);
    assert_eq!(s.apps["web"].move_to, None);
}

#[test]
fn assign_increments_the_epoch_and_refuses_stale_decisions() {
    let mut s = FieldState::default();
    deploy(&mut s, vec![app("web", "", &[])]);
    assert_eq!(
        assign(&mut s, "web", Some("a"), 0, transfer("placed", false)),
        Response::Ok
    );
    assert_eq!(s.apps["web"].epoch, 1);
    assert_eq!(s.apps["web"].owner.as_deref(), Some("a"));
    assert_eq!(s.apps["web"].transfer.as_ref().unwrap().reason, "placed");

    let before = s.clone();
    let r = assign(&mut s, "web", Some("b"), 0, transfer("failover", false));
    assert!(
        refused(&r),
        "a decision taken at epoch 0 is stale at 1: {r:?}"
    );
    assert_eq!(s, before);

    assert_eq!(
        assign(&mut s, "web", None, 1, transfer("stopped", true)),
        Response::Ok
    );
    assert_eq!(s.apps["web"].epoch, 2);
    assert_eq!(s.apps["web"].owner, None);
    assert!(refused(&assign(
        &mut s,
        "nope",
        None,
        0,
        transfer("placed", false)
    )));
}

#[test]
fn assign_clears_move_to_when_the_move_happens() {
    let mut s = FieldState::default();
    renew(&mut s, "a", Role::Rack);
    renew(&mut s, "b", Role::Rack);
    renew(&mut s, "c", Role::Rack);
    deploy(&mut s, vec![app("web", "", &[])]);
    assign(&mut s, "web", Some("a"), 0, transfer("placed", false));
    s.apply(&Command::Move {
        name: "web".into(),
        to: "b".into(),
    });
    // A failover elsewhere keeps the operator's wish.
    assign(&mut s, "web", Some("c"), 1, transfer("failover", false));
    assert_eq!(s.apps["web"].move_to.as_deref(), Some("b"));
    // Landing on the target clears it.
    assign(&mut s, "web", Some("b"), 2, transfer("failover", false));
    assert_eq!(s.apps["web"].move_to, None);
    // So does a transfer for the reason "move".
    s.apply(&Command::Move {
        name: "web".into(),
        to: "c".into(),
    });
    assert_eq!(s.apps["web"].move_to.as_deref(), Some("c"));
    assign(&mut s, "web", Some("c"), 3, transfer("move", true));
    assert_eq!(s.apps["web"].move_to, None);
    assert_eq!(s.apps["web"].epoch, 4);
}

#[test]
fn renew_grants_exactly_the_running_appliances_the_rack_owns() {
    let mut s = FieldState::default();
    deploy(
        &mut s,
        vec![
            app("one", "", &[]),
            app("two", "", &[]),
            app("three", "", &[]),
            app("idle", "", &[]),
            app("loose", "", &[]),
        ],
    );
    assign(&mut s, "one", Some("a"), 0, transfer("placed", false));
    assign(&mut s, "two", Some("a"), 0, transfer("placed", false));
    assign(&mut s, "two", Some("a"), 1, transfer("placed", false));
    assign(&mut s, "three", Some("b"), 0, transfer("placed", false));
    assign(&mut s, "idle", Some("a"), 0, transfer("placed", false));
    s.apply(&Command::SetRunning {
        name: "idle".into(),
        running: false,
    });
    let mut rep = report(Role::Rack);
    rep.volumes.insert("v".into(), 3);
    let r = s.apply(&Command::Renew {
        rack: "a".into(),
        report: rep.clone(),
    });
    assert_eq!(
        r,
        Response::Granted(vec![("one".into(), 1), ("two".into(), 2)])
    );
    assert_eq!(s.racks["a"], rep, "the report is stored");
    assert_eq!(
        renew(&mut s, "b", Role::Rack),
        Response::Granted(vec![("three".into(), 1)])
    );
    assert_eq!(renew(&mut s, "c", Role::Rack), Response::Granted(vec![]));
    assert_eq!(
        s.apply(&Command::ForgetRack { rack: "c".into() }),
        Response::Ok
    );
    assert!(!s.racks.contains_key("c"));
}

#[test]
fn released_only_for_a_planned_transfer_at_the_current_epoch() {
    let mut s = FieldState::default();
    deploy(&mut s, vec![app("db", "", &["db-data"])]);
    let vols = BTreeMap::from([("db-data".to_owned(), 7)]);
    let rel = |epoch: u64| Command::Released {
        name: "db".into(),
        epoch,
        volumes: vols.clone(),
    };
    assert!(refused(&s.apply(&rel(0))), "no transfer yet");
    assign(&mut s, "db", Some("a"), 0, transfer("placed", false));
    assert!(refused(&s.apply(&rel(1))), "not a handover");
    let mut t = transfer("power", true);
    t.from = Some("a".into());
    assign(&mut s, "db", Some("b"), 1, t);
    assert!(refused(&s.apply(&rel(1))), "an older epoch");
    assert!(refused(&s.apply(&rel(3))), "a future epoch");
    assert_eq!(s.apps["db"].transfer.as_ref().unwrap().released, None);
    assert_eq!(s.apply(&rel(2)), Response::Ok);
    assert_eq!(
        s.apps["db"].transfer.as_ref().unwrap().released,
        Some(vols.clone())
    );
    assert!(refused(&s.apply(&Command::Released {
        name: "nope".into(),
        epoch: 2,
        volumes: vols
    })));
}

const NAMES: [&str; 4] = ["a0", "a1", "a2", "a3"];
const RACKS: [&str; 3] = ["r0", "r1", "w"];
const VOLUMES: [&str; 2] = ["v0", "v1"];

fn arb_spec() -> impl Strategy<Value = ApplianceSpec> {
    (
        0..NAMES.len(),
        1..4u32,
        prop::option::of(0..NAMES.len()),
        prop::option::of(0..VOLUMES.len()),
    )
        .prop_map(|(i, cpus, after, vol)| {
            let after = after
                .filter(|a| *a != i)
                .map_or(String::new(), |a| format!("after = [\"{}\"]", NAMES[a]));
            let vols: Vec<&str> = vol.map(|v| VOLUMES[v]).into_iter().collect();
            app(NAMES[i], &format!("cpus = {cpus}\n{after}"), &vols)
        })
}

fn arb_command() -> impl Strategy<Value = Command> {
    let name = prop::sample::select(NAMES.to_vec()).prop_map(str::to_owned);
    let rack = prop::sample::select(RACKS.to_vec()).prop_map(str::to_owned);
    let owner = prop::option::of(rack.clone());
    let reason = prop::sample::select(vec!["placed", "move", "failover", "power"]);
    prop_oneof![
        3 => prop::collection::vec(arb_spec(), 0..3).prop_map(|specs| Command::Deploy { specs }),
        1 => (name.clone(), any::<bool>())
            .prop_map(|(name, running)| Command::SetRunning { name, running }),
        1 => (name.clone(), rack.clone()).prop_map(|(name, to)| Command::Move { name, to }),
        4 => (name.clone(), owner, 0..4u64, reason, any::<bool>()).prop_map(
            |(name, owner, expect_epoch, reason, planned)| Command::Assign {
                name,
                owner,
                expect_epoch,
                transfer: transfer(reason, planned),
            }
        ),
        2 => (rack.clone(), any::<bool>()).prop_map(|(rack, witness)| Command::Renew {
            rack,
            report: report(if witness { Role::Witness } else { Role::Rack }),
        }),
        1 => (name, 0..4u64).prop_map(|(name, epoch)| Command::Released {
            name,
            epoch,
            volumes: BTreeMap::from([("v0".to_owned(), epoch)]),
        }),
        1 => rack.prop_map(|rack| Command::ForgetRack { rack }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Every rack applies the same log to the same state: apply is a
    /// function of (state, command), and an epoch only ever grows.
    #[test]
    fn apply_is_deterministic_and_epochs_never_decrease(
        cmds in prop::collection::vec(arb_command(), 0..40)
    ) {
        let mut one = FieldState::default();
        let mut two = FieldState::default();
        for cmd in &cmds {
            let before = one.clone();
            let r1 = one.apply(cmd);
            let r2 = two.apply(cmd);
            prop_assert_eq!(&r1, &r2);
            prop_assert_eq!(&one, &two);
            // Through a serialisation round trip (what a snapshot does) too.
            let copy: FieldState = serde_json::from_slice(&serde_json::to_vec(&one).unwrap()).unwrap();
            prop_assert_eq!(&copy, &one);
            for (name, a) in &before.apps {
                let now = &one.apps[name];
                prop_assert!(now.epoch >= a.epoch, "{} went from {} to {}", name, a.epoch, now.epoch);
                if now.epoch != a.epoch {
                    prop_assert!(matches!(cmd, Command::Assign { .. }), "only an assignment moves an epoch");
                    prop_assert_eq!(now.epoch, a.epoch + 1);
                }
                if now.owner != a.owner {
                    prop_assert!(now.epoch > a.epoch, "an owner changes only with a new epoch");
                }
            }
            if refused(&r1) {
                prop_assert_eq!(&one, &before, "a refused command changes nothing");
            }
        }
    }
}

#[test]
fn adopted_appliances_keep_their_epochs_and_never_replace_ours() {
    let mut s = FieldState::default();
    assert_eq!(
        deploy(&mut s, vec![app("web", "", &["web-data"])]),
        Response::Ok
    );
    let carried = |name: &str, epoch, running, vols: &[&str]| Carried {
        spec: app(name, "", vols),
        epoch,
        running,
        owner: Some("x".into()),
    };
    let r = s.apply(&Command::Adopt {
        apps: vec![
            carried("web", 9, true, &[]),
            carried("db", 7, false, &["db-data"]),
        ],
    });
    assert_eq!(r, Response::Ok);
    assert_eq!(s.apps["web"].epoch, 0, "ours stays as it was");
    assert_eq!(s.apps["web"].spec.volume.len(), 1);
    assert_eq!(s.apps["db"].epoch, 7, "the carried epoch is kept");
    assert_eq!(s.apps["db"].owner.as_deref(), Some("x"), "and its owner");
    assert!(!s.apps["db"].running);
    // A carried appliance that would share our volume is refused whole.
    let r = s.apply(&Command::Adopt {
        apps: vec![carried("cache", 3, true, &["web-data"])],
    });
    assert!(matches!(r, Response::Refused(_)), "{r:?}");
    assert!(!s.apps.contains_key("cache"));
}

/// Reports stored or sent before `power_source` and `free_bytes` existed
/// still decode (the log and snapshots are JSON in a versioned envelope,
/// and the version did not change).
#[test]
fn a_report_without_power_source_or_free_bytes_decodes() {
    let old = r#"{"role":"rack","site":"north","cpus":4,"memory_mb":4096,
        "power_dying":false,"volumes":{},"apps":{},"at_ms":7}"#;
    let r: RackReport = serde_json::from_str(old).expect("old report decodes");
    assert_eq!(r.free_bytes, None);
    assert_eq!(r.power_source, None);
    assert_eq!(r.at_ms, 7);
    let new = RackReport {
        free_bytes: Some(1 << 30),
        power_source: Some(deploy::power::PowerSource::Battery),
        ..r
    };
    let back: RackReport = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
    assert_eq!(back, new);
}
