//! The supervisor's decisions as a table of cases, and properties over
//! arbitrary fields, leases and local states.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use control::{
    AppRecord, AppReport, AppState, FieldState, Lease, LeaseConfig, RackReport, Transfer,
};
use deploy::appliance::parse_manifest;
use proptest::prelude::*;

use super::*;

const RACK: &str = "a";

fn spec(name: &str, extra: &str) -> deploy::appliance::ApplianceSpec {
    parse_manifest(&format!(
        "[[appliance]]\nname = \"{name}\"\ndriver = \"process\"\ncommand = [\"true\"]\n{extra}\n[[appliance.volume]]\nname = \"{name}-data\"\nsize = \"1M\"\n"
    ))
    .unwrap()
    .remove(0)
}

fn record(name: &str, owner: Option<&str>, epoch: u64, transfer: Option<Transfer>) -> AppRecord {
    AppRecord {
        spec: spec(name, ""),
        running: true,
        owner: owner.map(str::to_owned),
        epoch,
        transfer,
        move_to: None,
    }
}

fn transfer(from: Option<&str>, planned: bool, released: Option<u64>) -> Transfer {
    Transfer {
        from: from.map(str::to_owned),
        reason: "failover".into(),
        planned,
        released: released.map(|g| BTreeMap::from([("x-data".to_owned(), g)])),
        detected_ms: None,
        decided_ms: 0,
    }
}

/// One case: the world, and what the plan must contain or not.
#[derive(Debug)]
struct World {
    t0: Instant,
    cfg: LeaseConfig,
    lease: Lease,
    field: FieldState,
    gates: BTreeMap<String, Instant>,
    held: BTreeMap<String, u64>,
    slots: BTreeMap<String, Slot>,
    chores: Chores,
}

impl World {
    /// Rack `a` holds a fresh grant for `x` at `epoch`.
    fn new() -> Self {
        let t0 = Instant::now();
        Self {
            t0,
            cfg: LeaseConfig::default(),
            lease: Lease::default(),
            field: FieldState::default(),
            gates: BTreeMap::new(),
            held: BTreeMap::new(),
            slots: BTreeMap::new(),
            chores: Chores::default(),
        }
    }

    fn app(mut self, r: AppRecord) -> Self {
        self.field.apps.insert(r.spec.name.clone(), r);
        self
    }

    fn granted(mut self, grants: &[(&str, u64)]) -> Self {
        self.lease.granted(
            self.t0,
            grants.iter().map(|(a, e)| ((*a).to_owned(), *e)).collect(),
        );
        self
    }

    /// A newer renewal, sent `after` the first grant, granted these.
    fn granted_later(mut self, after: Duration, grants: &[(&str, u64)]) -> Self {
        self.lease.granted(
            self.t0 + after,
            grants.iter().map(|(a, e)| ((*a).to_owned(), *e)).collect(),
        );
        self
    }

    fn slot(mut self, name: &str, epoch: u64, task: Task) -> Self {
        let mut s = Slot::new(epoch, self.t0, 0);
        s.task = task;
        if task == Task::Running {
            s.state = AppState::Running;
        }
        self.slots.insert(name.to_owned(), s);
        self
    }

    /// Rack `rack` reports running `app` at `epoch` with its volume.
    fn running_on(mut self, rack: &str, app: &str, epoch: u64) -> Self {
        self.field.racks.insert(
            rack.into(),
            RackReport {
                apps: BTreeMap::from([(
                    app.into(),
                    AppReport {
                        epoch,
                        state: AppState::Running,
                        since_ms: 0,
                    },
                )]),
                volumes: BTreeMap::from([(format!("{app}-data"), 1)]),
                ..RackReport::default()
            },
        );
        self
    }

    fn plan_at(&self, after: Duration) -> Plan {
        plan(&View {
            now: self.t0 + after,
            rack: RACK,
            cfg: &self.cfg,
            lease: &self.lease,
            field: &self.field,
            gates: &self.gates,
            held: &self.held,
            slots: &self.slots,
            chores: &self.chores,
            capture_every: Duration::from_secs(10),
        })
    }
}

/// `x` moved to `b` at epoch 2 by `t`, and runs there.
fn moved_to_b(t: Transfer) -> World {
    World::new()
        .app(record("x", Some("b"), 2, Some(t)))
        .granted(&[])
        .running_on("b", "x", 2)
}

/// Give `x`'s volume up to `b`'s epoch 2.
fn demote_x(shipped: BTreeMap<String, u64>) -> Action {
    Action::Demote {
        app: "x".into(),
        epoch: 2,
        volumes: vec!["x-data".into()],
        shipped,
    }
}

fn fence(app: &str, epoch: u64) -> Action {
    Action::Fence {
        app: app.into(),
        epoch,
    }
}

/// The polite stop of an instance now assigned elsewhere (the default
/// 3 s grace).
fn unassigned_stop(app: &str, epoch: u64) -> Action {
    Action::Stop {
        app: app.into(),
        epoch,
        grace: Duration::from_millis(3_000),
        why: StopWhy::Unassigned,
    }
}

fn start(app: &str, epoch: u64) -> Action {
    Action::Start {
        app: app.into(),
        epoch,
    }
}

const S: fn(u64) -> Duration = Duration::from_secs;

/// One row of the table: what, the world, how long after the grant, what
/// the plan must contain, what it must not.
type Case = (&'static str, World, Duration, Vec<Action>, Vec<Action>);

#[test]
fn table() {
    let cfg = LeaseConfig::default();
    let fence_time = cfg.lease - cfg.fence_before; // 5 s after the grant
    let gate_1 = |w: World| {
        let t = w.t0 + S(12);
        let mut w = w;
        w.gates.insert("x".into(), t);
        w
    };
    // (what, world, seconds after the grant, must contain, must not contain)
    let cases: Vec<Case> = vec![
        (
            "first placement starts at once",
            World::new()
                .app(record("x", Some(RACK), 1, None))
                .granted(&[("x", 1)]),
            S(1),
            vec![start("x", 1)],
            vec![],
        ),
        (
            "no start without a grant",
            World::new().app(record("x", Some(RACK), 1, None)),
            S(1),
            vec![],
            vec![start("x", 1)],
        ),
        (
            "no start past the fence time",
            World::new()
                .app(record("x", Some(RACK), 1, None))
                .granted(&[("x", 1)]),
            fence_time,
            vec![],
            vec![start("x", 1)],
        ),
        (
            "a running instance past the fence time is fenced",
            World::new()
                .app(record("x", Some(RACK), 1, None))
                .granted(&[("x", 1)])
                .slot("x", 1, Task::Running),
            fence_time,
            vec![fence("x", 1)],
            vec![start("x", 1)],
        ),
        (
            "a starting instance the grant no longer lists is fenced",
            World::new()
                .app(record("x", Some(RACK), 1, None))
                .granted(&[])
                .slot("x", 1, Task::Starting),
            S(1),
            vec![fence("x", 1)],
            vec![],
        ),
        (
            "a running instance a newer grant dropped runs on until the log shows why",
            World::new()
                .app(record("x", Some(RACK), 1, None))
                .granted(&[("x", 1)])
                .granted_later(S(1), &[])
                .slot("x", 1, Task::Running),
            S(2),
            vec![],
            vec![fence("x", 1), unassigned_stop("x", 1)],
        ),
        (
            "a running instance a newer grant dropped is stopped politely once it moved",
            World::new()
                .app(record("x", Some("b"), 2, None))
                .granted(&[("x", 1)])
                .granted_later(S(1), &[])
                .slot("x", 1, Task::Running),
            S(2),
            vec![unassigned_stop("x", 1)],
            vec![fence("x", 1)],
        ),
        (
            "a dropped instance is fenced at the fence time of the last grant that listed it",
            World::new()
                .app(record("x", Some(RACK), 1, None))
                .granted(&[("x", 1)])
                .granted_later(S(1), &[])
                .slot("x", 1, Task::Running),
            fence_time,
            vec![fence("x", 1)],
            vec![],
        ),
        (
            "a polite stop that outlives the lease becomes a fence",
            World::new()
                .app(record("x", Some("b"), 2, None))
                .granted(&[("x", 1)])
                .slot("x", 1, Task::Stopping { fenced: false }),
            fence_time + S(1),
            vec![fence("x", 1)],
            vec![],
        ),
        (
            "a leased instance reassigned elsewhere stops with its grace",
            World::new()
                .app(record("x", Some("b"), 2, None))
                .granted(&[("x", 1)])
                .slot("x", 1, Task::Running),
            S(1),
            vec![unassigned_stop("x", 1)],
            vec![fence("x", 1)],
        ),
        (
            "a failover waits for the old owner's gate",
            gate_1(
                World::new()
                    .app(record(
                        "x",
                        Some(RACK),
                        3,
                        Some(transfer(Some("b"), false, None)),
                    ))
                    .granted(&[("x", 3)]),
            ),
            S(4),
            vec![],
            vec![start("x", 3)],
        ),
        (
            "a released handover starts once the shipped generation is held",
            World {
                held: BTreeMap::from([("x-data".to_owned(), 7)]),
                ..World::new()
                    .app(record(
                        "x",
                        Some(RACK),
                        3,
                        Some(transfer(Some("b"), true, Some(7))),
                    ))
                    .granted(&[("x", 3)])
            },
            S(1),
            vec![start("x", 3)],
            vec![],
        ),
        (
            "a released handover waits for the shipped generation",
            World {
                held: BTreeMap::from([("x-data".to_owned(), 6)]),
                ..World::new()
                    .app(record(
                        "x",
                        Some(RACK),
                        3,
                        Some(transfer(Some("b"), true, Some(7))),
                    ))
                    .granted(&[("x", 3)])
            },
            S(1),
            vec![],
            vec![start("x", 3)],
        ),
        (
            "a new epoch waits while the old epoch still stops",
            World::new()
                .app(record("x", Some(RACK), 2, None))
                .granted(&[("x", 2)])
                .slot("x", 1, Task::Stopping { fenced: true }),
            S(1),
            vec![],
            vec![start("x", 2)],
        ),
        (
            "a planned transfer away is handed over once stopped",
            World::new()
                .app(record(
                    "x",
                    Some("b"),
                    2,
                    Some(transfer(Some(RACK), true, None)),
                ))
                .granted(&[])
                .slot("x", 1, Task::Idle),
            S(1),
            vec![Action::HandOver {
                app: "x".into(),
                epoch: 2,
                to: "b".into(),
            }],
            vec![],
        ),
        (
            "after a handover, the volume is given up naming the generation shipped",
            moved_to_b(transfer(Some(RACK), true, Some(7))),
            S(1),
            vec![demote_x(BTreeMap::from([("x-data".into(), 7)]))],
            vec![],
        ),
        (
            "after a failover, nothing was shipped: the volume is given up and kept",
            moved_to_b(transfer(Some(RACK), false, None)),
            S(1),
            vec![demote_x(BTreeMap::new())],
            vec![],
        ),
    ];
    for (what, world, at, want, refuse) in cases {
        let p = world.plan_at(at);
        for w in &want {
            assert!(p.actions.contains(w), "{what}: {w:?} missing from {p:?}");
        }
        for r in &refuse {
            assert!(!p.actions.contains(r), "{what}: {r:?} in {p:?}");
        }
        if want.is_empty() {
            assert!(
                !p.actions.iter().any(|a| matches!(a, Action::Start { .. })),
                "{what}: {p:?}"
            );
        }
    }
}

#[test]
fn a_gate_is_a_wake_up() {
    let w = World::new()
        .app(record(
            "x",
            Some(RACK),
            3,
            Some(transfer(Some("b"), false, None)),
        ))
        .granted(&[("x", 3)]);
    let mut w = w;
    let gate = w.t0 + S(2);
    w.gates.insert("x".into(), gate);
    let p = w.plan_at(S(1));
    assert_eq!(p.wake, Some(gate));
    assert!(w.plan_at(S(2)).actions.contains(&start("x", 3)));
}

#[test]
fn restarts_back_off_then_give_up() {
    let t0 = Instant::now();
    let mut s = Slot::new(1, t0, 0);
    let spec = spec(
        "x",
        "restart = { policy = \"always\", max_restarts = 2, window_s = 60 }",
    );
    s.task = Task::Running;
    let AfterExit::Restart(first) = after_exit(&mut s, &spec, false, t0, 0) else {
        panic!("restarts")
    };
    assert_eq!(first, t0 + BACKOFF_BASE);
    s.task = Task::Running;
    let AfterExit::Restart(second) = after_exit(&mut s, &spec, true, t0, 0) else {
        panic!("restarts")
    };
    assert_eq!(second, t0 + BACKOFF_BASE * 2);
    assert_eq!(
        after_exit(&mut s, &spec, true, t0, 0),
        AfterExit::Failed { gave_up: true }
    );
    assert_eq!(s.state, AppState::Failed);
}

#[test]
fn probes_restart_after_the_limit_or_a_failed_start() {
    let t0 = Instant::now();
    let mut s = Slot::new(1, t0, 0);
    s.launched(t0, 0);
    let (i, g) = (Duration::from_secs(1), Duration::from_secs(5));
    assert_eq!(probed(&mut s, false, i, g, t0 + S(1), 0), Probed::Unchanged);
    assert_eq!(probed(&mut s, false, i, g, t0 + S(6), 0), Probed::Restart);
    let mut s = Slot::new(1, t0, 0);
    s.launched(t0, 0);
    assert_eq!(
        probed(&mut s, true, i, g, t0, 0),
        Probed::Healthy { first: true }
    );
    for k in 1..UNHEALTHY_LIMIT {
        assert_eq!(
            probed(&mut s, false, i, g, t0 + S(k as u64), 0),
            Probed::Unchanged
        );
    }
    assert_eq!(probed(&mut s, false, i, g, t0 + S(9), 0), Probed::Restart);
    assert!(s.restart_due);
}

/// Arbitrary worlds: a few appliances, each owned here or elsewhere at
/// some epoch, a grant listing some of them, slots in any state, gates and
/// released generations anywhere in time.
fn arb_world() -> impl Strategy<Value = (World, Duration)> {
    let app = (
        prop::option::of(prop::sample::select(vec![RACK, "b", "c"])),
        1u64..4,
        any::<bool>(), // running
        prop::option::of((
            prop::sample::select(vec![RACK, "b"]),
            any::<bool>(),
            prop::option::of(0u64..4),
        )),
        prop::option::of((0u64..4, 0u8..4)), // slot: epoch, task
        any::<bool>(),                       // granted
        prop::option::of(0u64..20),          // gate (s)
        0u64..4,                             // held generation
    );
    (
        prop::collection::vec(app, 1..5),
        0u64..20_000,
        prop::option::of(0u64..20_000),
    )
        .prop_map(|(apps, now_ms, sent_ms)| {
            let mut w = World::new();
            let mut grants = Vec::new();
            for (i, (owner, epoch, running, tr, slot, granted, gate, held)) in
                apps.into_iter().enumerate()
            {
                let name = format!("x{i}");
                let mut r = record(&name, owner, epoch, None);
                r.running = running;
                r.transfer = tr.map(|(from, planned, rel)| Transfer {
                    released: rel.map(|g| BTreeMap::from([(format!("{name}-data"), g)])),
                    ..transfer(Some(from), planned, None)
                });
                if granted {
                    grants.push((name.clone(), epoch));
                }
                if let Some((e, t)) = slot {
                    let mut s = Slot::new(e, w.t0, 0);
                    s.task = match t {
                        0 => Task::Idle,
                        1 => Task::Starting,
                        2 => Task::Running,
                        _ => Task::Stopping { fenced: false },
                    };
                    w.slots.insert(name.clone(), s);
                }
                if let Some(g) = gate {
                    w.gates.insert(name.clone(), w.t0 + S(g));
                }
                w.held.insert(format!("{name}-data"), held);
                w.field.apps.insert(name, r);
            }
            if let Some(sent) = sent_ms {
                w.lease.granted(w.t0 + Duration::from_millis(sent), grants);
            }
            // Reports of other racks, so that dependencies and demotions
            // have something to look at.
            w.field.racks.insert(
                "b".into(),
                RackReport {
                    apps: BTreeMap::from([(
                        "x0".into(),
                        AppReport {
                            epoch: 1,
                            state: AppState::Running,
                            since_ms: 0,
                        },
                    )]),
                    ..RackReport::default()
                },
            );
            (w, Duration::from_millis(now_ms))
        })
}

proptest! {
    /// Fencing: every instance the lease does not cover now is fenced in
    /// the same plan. Starting: never before the previous owner certainly
    /// stopped, never without the lease, never twice, never next to a live
    /// task of the same appliance.
    #[test]
    fn safety((w, after) in arb_world()) {
        let p = w.plan_at(after);
        let now = w.t0 + after;
        for (name, s) in &w.slots {
            let unfenced = matches!(s.task, Task::Starting | Task::Running | Task::Stopping { fenced: false });
            if unfenced && !w.lease.covers(name, s.epoch, now, &w.cfg) {
                prop_assert!(p.actions.contains(&fence(name, s.epoch)), "{name} not fenced: {p:?}");
            }
        }
        let mut started = BTreeSet::new();
        for a in &p.actions {
            if let Action::Start { app, epoch } = a {
                prop_assert!(started.insert(app.clone()), "two starts of {app}");
                prop_assert!(w.lease.may_run(app, *epoch, now, &w.cfg), "{app} started outside its lease");
                prop_assert!(!w.slots.get(app).is_some_and(|s| s.task.live()), "{app} started next to a live task");
                let rec = &w.field.apps[app];
                prop_assert_eq!(rec.owner.as_deref(), Some(RACK));
                prop_assert!(rec.running);
                let t = rec.transfer.as_ref();
                let from_elsewhere = t.and_then(|t| t.from.as_deref()).is_some_and(|f| f != RACK);
                let released_and_held = from_elsewhere && t.and_then(|t| t.released.as_ref()).is_some_and(|r| {
                    r.iter().all(|(v, g)| w.held.get(v).is_some_and(|h| h >= g))
                });
                let gate_passed = w.gates.get(app).is_some_and(|g| now >= *g);
                let first = !from_elsewhere && *epoch <= 1;
                prop_assert!(first || released_and_held || gate_passed,
                    "{app} started before its previous owner certainly stopped");
            }
            if let Action::Fence { app, .. } | Action::Stop { app, .. } = a {
                prop_assert!(!started.contains(app), "{app} started and stopped in one plan");
            }
        }
    }

    /// Carrying the plans out (as the shell does, with instances that stop
    /// at once) never gives one appliance two live tasks, and leaves no
    /// instance outside its lease after the next plan.
    #[test]
    fn repeated_plans_never_double_start((mut w, after) in arb_world(), steps in 1usize..6) {
        let mut now = after;
        for _ in 0..steps {
            let p = w.plan_at(now);
            for a in &p.actions {
                match a {
                    Action::Start { app, epoch } => {
                        let s = w.slots.entry(app.clone()).or_insert_with(|| Slot::new(*epoch, w.t0, 0));
                        prop_assert!(!s.task.live(), "second start of {app}");
                        *s = Slot::new(*epoch, w.t0, 0);
                        s.task = Task::Running;
                    }
                    Action::Fence { app, .. } | Action::Stop { app, .. } => {
                        w.slots.get_mut(app).expect("a slot").task = Task::Idle;
                    }
                    _ => {}
                }
            }
            now += Duration::from_millis(700);
        }
    }
}
