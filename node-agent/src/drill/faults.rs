//! The faults a drill injects, as a sans-IO core: which faults are in force
//! on this rack, until when, and what each means for this rack (its
//! [`Effect`]). Time is an input (unix milliseconds of *this* rack's clock:
//! the deadline is computed here from the order's duration, so another
//! rack's clock never decides when this one heals, and it survives a
//! restart because the shell stores it).
//!
//! Every rack of the field receives every order of a drill and derives
//! its own part: the faulted rack goes silent, both ends of a cut link
//! drop each other, and uninvolved racks only remember that a drill runs
//! (so a second one is refused anywhere).

use std::collections::BTreeSet;

use deploy::power::{PowerSource, PowerStatus};
use mesh::TrafficFilter;
use serde::{Deserialize, Serialize};

/// Longest fault: a drill is an exercise, and a forgotten fault must heal
/// by itself within the working hour.
pub const MAX_DURATION_MS: u64 = 60 * 60 * 1000;
/// Most faults in force at once (one drill file's steps).
pub const MAX_ACTIVE: usize = 16;
/// Most racks one fault names (a field's racks).
pub const MAX_RACKS_PER_FAULT: usize = 64;

/// One fault, as the operator names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Fault {
    /// The rack's power dies: its appliances are killed, it goes silent on
    /// the mesh and the bulk plane, and comes back at the deadline.
    PowerLoss {
        /// The rack.
        rack: String,
    },
    /// The rack loses every link (it keeps running).
    Isolate {
        /// The rack.
        rack: String,
    },
    /// The link between two racks is cut (`one_way`: `a` to `b` only).
    CutLink {
        /// One end.
        a: String,
        /// The other.
        b: String,
        /// Only traffic from `a` to `b` is dropped.
        #[serde(default)]
        one_way: bool,
    },
    /// The field splits in two (`one_way`: `left` to `right` only).
    Partition {
        /// One side.
        left: Vec<String>,
        /// The other.
        right: Vec<String>,
        /// Only traffic from `left` to `right` is dropped.
        #[serde(default)]
        one_way: bool,
    },
    /// The rack's mains fail and the generator does not start: on battery,
    /// the runtime counting down from `runtime_s` until `dying`.
    Generator {
        /// The rack.
        rack: String,
        /// Battery runtime at the start, seconds.
        runtime_s: u64,
    },
    /// The proxy acts as if the backhaul were gone (`rack` None: every rack).
    BackhaulDown {
        /// The rack, or every rack.
        #[serde(default)]
        rack: Option<String>,
    },
}

/// Why a fault or an order is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// A rack named twice, or on both sides.
    #[error("rack `{0}` is named twice")]
    RackTwice(String),
    /// A partition side is empty.
    #[error("a partition needs racks on both sides")]
    EmptySide,
    /// Too many racks.
    #[error("a fault names at most {MAX_RACKS_PER_FAULT} racks")]
    TooManyRacks,
    /// The duration is zero or over [`MAX_DURATION_MS`].
    #[error("duration must be between 1 ms and {MAX_DURATION_MS} ms, not {0} ms")]
    Duration(u64),
    /// Another drill is running here.
    #[error("drill `{0}` is running; abort it first (`fieldrack drill abort`)")]
    OtherDrill(String),
    /// [`MAX_ACTIVE`] faults are in force already.
    #[error("at most {MAX_ACTIVE} faults at once")]
    TooMany,
}

impl Fault {
    /// Every rack it names.
    #[must_use]
    pub fn racks(&self) -> Vec<&str> {
        match self {
            Self::PowerLoss { rack } | Self::Isolate { rack } | Self::Generator { rack, .. } => {
                vec![rack]
            }
            Self::CutLink { a, b, .. } => vec![a, b],
            Self::Partition { left, right, .. } => {
                left.iter().chain(right).map(String::as_str).collect()
            }
            Self::BackhaulDown { rack } => rack.iter().map(String::as_str).collect(),
        }
    }

    /// Racks that stop serving or may lose their appliances: those whose
    /// appliances may move (their lease cannot be renewed).
    #[must_use]
    pub fn cut_off(&self) -> Vec<&str> {
        match self {
            Self::PowerLoss { rack } | Self::Isolate { rack } => vec![rack],
            Self::Partition { left, right, .. } => {
                // The smaller side loses the majority (ties: the left).
                let side = if left.len() <= right.len() {
                    left
                } else {
                    right
                };
                side.iter().map(String::as_str).collect()
            }
            Self::CutLink { .. } | Self::Generator { .. } | Self::BackhaulDown { .. } => vec![],
        }
    }

    /// Racks whose appliances move: those cut off, and a rack whose
    /// power is dying (its appliances are handed over while it still can).
    #[must_use]
    pub fn moves_from(&self) -> Vec<&str> {
        match self {
            Self::Generator { rack, .. } => vec![rack],
            _ => self.cut_off(),
        }
    }

    /// Check the racks it names.
    ///
    /// # Errors
    /// [`OrderError`].
    pub fn validate(&self) -> Result<(), OrderError> {
        let racks = self.racks();
        if racks.len() > MAX_RACKS_PER_FAULT {
            return Err(OrderError::TooManyRacks);
        }
        if let Self::Partition { left, right, .. } = self {
            if left.is_empty() || right.is_empty() {
                return Err(OrderError::EmptySide);
            }
        }
        let mut seen = BTreeSet::new();
        for r in racks {
            if !seen.insert(r) {
                return Err(OrderError::RackTwice(r.to_owned()));
            }
        }
        Ok(())
    }

    /// The scenario as the command line spells it.
    #[must_use]
    pub fn describe(&self) -> String {
        let way = |one: bool| if one { " --one-way" } else { "" };
        match self {
            Self::PowerLoss { rack } => format!("power-loss {rack}"),
            Self::Isolate { rack } => format!("isolate {rack}"),
            Self::CutLink { a, b, one_way } => format!("cut-link {a} {b}{}", way(*one_way)),
            Self::Partition {
                left,
                right,
                one_way,
            } => format!(
                "partition {}|{}{}",
                left.join(","),
                right.join(","),
                way(*one_way)
            ),
            Self::Generator { rack, runtime_s } => {
                format!("generator {rack} --runtime {runtime_s}")
            }
            Self::BackhaulDown { rack } => {
                format!(
                    "backhaul-down{}",
                    rack.as_ref().map_or(String::new(), |r| format!(" {r}"))
                )
            }
        }
    }
}

/// What the drill asks of every rack: this fault, for this long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultOrder {
    /// The drill it belongs to.
    pub drill: String,
    /// The fault.
    pub fault: Fault,
    /// How long it lasts; the rack heals it by itself at the end.
    pub duration_ms: u64,
}

/// A fault in force on this rack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveFault {
    /// The drill it belongs to.
    pub drill: String,
    /// The fault.
    pub fault: Fault,
    /// When it began here (unix ms, this rack's clock).
    pub since_ms: u64,
    /// When this rack heals it (unix ms, this rack's clock).
    pub deadline_ms: u64,
}

/// A generator fault's power reading: on battery, counting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneratorOverride {
    /// When the mains failed (unix ms).
    pub since_ms: u64,
    /// Battery runtime then, seconds.
    pub runtime_s: u64,
}

impl GeneratorOverride {
    /// The power reading at `now_ms`: on battery, the runtime left, dying
    /// below `dying_runtime_s`.
    #[must_use]
    pub fn reading(&self, now_ms: u64, dying_runtime_s: u64) -> PowerStatus {
        let elapsed = now_ms.saturating_sub(self.since_ms) / 1000;
        let left = self.runtime_s.saturating_sub(elapsed);
        PowerStatus {
            source: PowerSource::Battery,
            battery_runtime_s: Some(left),
            battery_charge_pct: None,
            fuel_pct: Some(0.0),
            dying: left < dying_runtime_s,
            error: None,
        }
    }
}

/// What the faults in force mean for one rack.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effect {
    /// What the mesh drops.
    pub filter: TrafficFilter,
    /// Appliances killed, no lease renewal: the rack has no power.
    pub power_off: bool,
    /// The power reading is overridden.
    pub generator: Option<GeneratorOverride>,
    /// The proxy never touches the backhaul.
    pub backhaul_down: bool,
}

/// The faults in force on one rack.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    active: Vec<ActiveFault>,
}

impl Faults {
    /// From what the store held (a restart), healing what expired meanwhile.
    #[must_use]
    pub fn restore(stored: Vec<ActiveFault>, now_ms: u64) -> (Self, Vec<ActiveFault>) {
        let mut f = Self {
            active: stored.into_iter().take(MAX_ACTIVE).collect(),
        };
        let healed = f.expire(now_ms);
        (f, healed)
    }

    /// Take an order at `now_ms`.
    ///
    /// # Errors
    /// [`OrderError`]: a bad fault or duration, another drill in force, too
    /// many faults. Nothing changes then.
    pub fn order(&mut self, now_ms: u64, order: FaultOrder) -> Result<ActiveFault, OrderError> {
        order.fault.validate()?;
        if order.duration_ms == 0 || order.duration_ms > MAX_DURATION_MS {
            return Err(OrderError::Duration(order.duration_ms));
        }
        if let Some(other) = self.active.iter().find(|a| a.drill != order.drill) {
            return Err(OrderError::OtherDrill(other.drill.clone()));
        }
        if self.active.len() >= MAX_ACTIVE {
            return Err(OrderError::TooMany);
        }
        let a = ActiveFault {
            drill: order.drill,
            fault: order.fault,
            since_ms: now_ms,
            deadline_ms: now_ms + order.duration_ms,
        };
        self.active.push(a.clone());
        Ok(a)
    }

    /// Heal every fault whose deadline passed; returns them.
    pub fn expire(&mut self, now_ms: u64) -> Vec<ActiveFault> {
        let (gone, kept) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|a| a.deadline_ms <= now_ms);
        self.active = kept;
        gone
    }

    /// Heal everything (an abort); returns what was in force.
    pub fn clear(&mut self) -> Vec<ActiveFault> {
        std::mem::take(&mut self.active)
    }

    /// The faults in force.
    #[must_use]
    pub fn active(&self) -> &[ActiveFault] {
        &self.active
    }

    /// When the next fault heals.
    #[must_use]
    pub fn next_deadline(&self) -> Option<u64> {
        self.active.iter().map(|a| a.deadline_ms).min()
    }

    /// What the faults mean for rack `me`.
    #[must_use]
    pub fn effect(&self, me: &str) -> Effect {
        let mut e = Effect::default();
        let both = |e: &mut Effect, other: &str, from: bool, to: bool| {
            if from {
                e.filter.drop_from.insert(other.to_owned());
            }
            if to {
                e.filter.drop_to.insert(other.to_owned());
            }
        };
        for a in &self.active {
            match &a.fault {
                Fault::PowerLoss { rack } if rack == me => {
                    e.filter.silent = true;
                    e.power_off = true;
                }
                Fault::Isolate { rack } if rack == me => e.filter.silent = true,
                Fault::Isolate { rack } => both(&mut e, rack, true, true),
                Fault::CutLink {
                    a: x,
                    b: y,
                    one_way,
                } => {
                    if x == me {
                        both(&mut e, y, !one_way, true);
                    } else if y == me {
                        both(&mut e, x, true, !one_way);
                    }
                }
                Fault::Partition {
                    left,
                    right,
                    one_way,
                } => {
                    if left.iter().any(|r| r == me) {
                        for r in right {
                            both(&mut e, r, !one_way, true);
                        }
                    } else if right.iter().any(|r| r == me) {
                        for r in left {
                            both(&mut e, r, true, !one_way);
                        }
                    }
                }
                Fault::Generator { rack, runtime_s } if rack == me => {
                    e.generator = Some(GeneratorOverride {
                        since_ms: a.since_ms,
                        runtime_s: *runtime_s,
                    });
                }
                Fault::BackhaulDown { rack } if rack.as_deref().is_none_or(|r| r == me) => {
                    e.backhaul_down = true;
                }
                Fault::PowerLoss { .. } | Fault::Generator { .. } | Fault::BackhaulDown { .. } => {}
            }
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(drill: &str, fault: Fault, ms: u64) -> FaultOrder {
        FaultOrder {
            drill: drill.into(),
            fault,
            duration_ms: ms,
        }
    }

    fn set(r: &[&str]) -> BTreeSet<String> {
        r.iter().map(|s| (*s).to_owned()).collect()
    }

    fn filter(silent: bool, from: &[&str], to: &[&str]) -> TrafficFilter {
        TrafficFilter {
            silent,
            drop_from: set(from),
            drop_to: set(to),
        }
    }

    #[test]
    fn effects_per_rack() {
        let cut = |one_way| Fault::CutLink {
            a: "a".into(),
            b: "b".into(),
            one_way,
        };
        let part = |one_way| Fault::Partition {
            left: vec!["a".into(), "b".into()],
            right: vec!["c".into()],
            one_way,
        };
        // (fault, rack, filter, power_off, backhaul_down)
        let table: Vec<(Fault, &str, TrafficFilter, bool, bool)> = vec![
            (
                Fault::PowerLoss { rack: "b".into() },
                "b",
                filter(true, &[], &[]),
                true,
                false,
            ),
            (
                Fault::PowerLoss { rack: "b".into() },
                "a",
                filter(false, &[], &[]),
                false,
                false,
            ),
            (
                Fault::Isolate { rack: "b".into() },
                "b",
                filter(true, &[], &[]),
                false,
                false,
            ),
            (
                Fault::Isolate { rack: "b".into() },
                "c",
                filter(false, &["b"], &["b"]),
                false,
                false,
            ),
            (cut(false), "a", filter(false, &["b"], &["b"]), false, false),
            (cut(false), "b", filter(false, &["a"], &["a"]), false, false),
            (cut(false), "c", filter(false, &[], &[]), false, false),
            (cut(true), "a", filter(false, &[], &["b"]), false, false),
            (cut(true), "b", filter(false, &["a"], &[]), false, false),
            (
                part(false),
                "a",
                filter(false, &["c"], &["c"]),
                false,
                false,
            ),
            (
                part(false),
                "c",
                filter(false, &["a", "b"], &["a", "b"]),
                false,
                false,
            ),
            (part(true), "b", filter(false, &[], &["c"]), false, false),
            (
                part(true),
                "c",
                filter(false, &["a", "b"], &[]),
                false,
                false,
            ),
            (
                Fault::BackhaulDown { rack: None },
                "c",
                filter(false, &[], &[]),
                false,
                true,
            ),
            (
                Fault::BackhaulDown {
                    rack: Some("a".into()),
                },
                "c",
                filter(false, &[], &[]),
                false,
                false,
            ),
        ];
        for (fault, me, want, power_off, backhaul) in table {
            let mut f = Faults::default();
            f.order(1_000, order("d1", fault.clone(), 10_000)).unwrap();
            let e = f.effect(me);
            assert_eq!(e.filter, want, "{fault:?} on {me}");
            assert_eq!(e.power_off, power_off, "{fault:?} on {me}");
            assert_eq!(e.backhaul_down, backhaul, "{fault:?} on {me}");
        }
    }

    #[test]
    fn deadlines_heal_in_order_and_survive_a_restart() {
        let mut f = Faults::default();
        f.order(
            1_000,
            order("d1", Fault::PowerLoss { rack: "b".into() }, 5_000),
        )
        .unwrap();
        f.order(
            2_000,
            order("d1", Fault::Isolate { rack: "c".into() }, 10_000),
        )
        .unwrap();
        assert_eq!(f.next_deadline(), Some(6_000));
        assert!(f.expire(5_999).is_empty());
        assert!(f.effect("b").power_off);
        // A restart at 7 s: the power loss healed while the agent was down.
        let (mut f, healed) = Faults::restore(f.active().to_vec(), 7_000);
        assert_eq!(healed.len(), 1);
        assert_eq!(healed[0].fault, Fault::PowerLoss { rack: "b".into() });
        assert!(!f.effect("b").power_off);
        assert!(f.effect("c").filter.silent);
        assert_eq!(f.next_deadline(), Some(12_000));
        assert_eq!(f.expire(12_000).len(), 1);
        assert_eq!(f.effect("c"), Effect::default());
        assert_eq!(f.next_deadline(), None);
    }

    #[test]
    fn refusals_change_nothing() {
        let mut f = Faults::default();
        f.order(0, order("d1", Fault::Isolate { rack: "a".into() }, 1_000))
            .unwrap();
        let before = f.clone();
        let cases = [
            (
                order("d2", Fault::Isolate { rack: "b".into() }, 1_000),
                OrderError::OtherDrill("d1".into()),
            ),
            (
                order("d1", Fault::Isolate { rack: "b".into() }, 0),
                OrderError::Duration(0),
            ),
            (
                order(
                    "d1",
                    Fault::Isolate { rack: "b".into() },
                    MAX_DURATION_MS + 1,
                ),
                OrderError::Duration(MAX_DURATION_MS + 1),
            ),
            (
                order(
                    "d1",
                    Fault::CutLink {
                        a: "a".into(),
                        b: "a".into(),
                        one_way: false,
                    },
                    1_000,
                ),
                OrderError::RackTwice("a".into()),
            ),
            (
                order(
                    "d1",
                    Fault::Partition {
                        left: vec![],
                        right: vec!["a".into()],
                        one_way: false,
                    },
                    1_000,
                ),
                OrderError::EmptySide,
            ),
        ];
        for (o, want) in cases {
            assert_eq!(f.order(10, o), Err(want));
            assert_eq!(f, before);
        }
        for i in 1..MAX_ACTIVE {
            f.order(
                0,
                order(
                    "d1",
                    Fault::Isolate {
                        rack: format!("r{i}"),
                    },
                    1_000,
                ),
            )
            .unwrap();
        }
        assert_eq!(
            f.order(0, order("d1", Fault::Isolate { rack: "x".into() }, 1_000)),
            Err(OrderError::TooMany)
        );
        assert_eq!(f.clear().len(), MAX_ACTIVE);
        assert!(f.active().is_empty());
    }

    #[test]
    fn generator_counts_down_to_dying() {
        let g = GeneratorOverride {
            since_ms: 10_000,
            runtime_s: 400,
        };
        let at = |s: u64| g.reading(10_000 + s * 1000, 300);
        assert_eq!(at(0).battery_runtime_s, Some(400));
        assert!(!at(0).dying);
        assert_eq!(at(0).source, PowerSource::Battery);
        assert!(!at(100).dying);
        assert!(at(101).dying);
        assert_eq!(at(1_000).battery_runtime_s, Some(0));
    }

    #[test]
    fn orders_round_trip_as_json() {
        let o = order(
            "d1",
            Fault::Partition {
                left: vec!["a".into(), "b".into()],
                right: vec!["c".into()],
                one_way: true,
            },
            30_000,
        );
        let j = serde_json::to_value(&o).unwrap();
        assert_eq!(j["fault"]["kind"], "partition");
        assert_eq!(serde_json::from_value::<FaultOrder>(j).unwrap(), o);
        assert_eq!(o.fault.describe(), "partition a,b|c --one-way");
    }
}
