//! Scenarios: one fault from the command line (`power-loss b`,
//! `cut-link a b --one-way`, `partition a,b|c`) or steps from a drill file
//! (TOML, every key checked, errors naming the key).

use std::time::Duration;

use serde::Deserialize;

use super::faults::{Fault, MAX_ACTIVE, MAX_DURATION_MS};

/// How long a fault lasts unless told: long enough for a failover (≤ 20 s)
/// and a re-protection, short enough for an exercise.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(60);
/// Battery runtime of a `generator` fault unless told: the default
/// `power.dying_runtime_s` (300) plus a minute, so `dying` comes after 60 s.
pub const DEFAULT_RUNTIME_S: u64 = 360;

/// One step of a drill: a fault, for a while.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The fault.
    pub fault: Fault,
    /// How long (the faulted agents heal it by themselves then).
    pub duration: Duration,
}

/// A whole drill: its steps, one after the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// The steps.
    pub steps: Vec<Step>,
}

impl Scenario {
    /// As the command line spells it.
    #[must_use]
    pub fn describe(&self) -> String {
        self.steps
            .iter()
            .map(|s| s.fault.describe())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Why a scenario is refused; names the argument or key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// Bad command-line words.
    #[error("invalid scenario `{words}`: {reason}")]
    Args {
        /// The words.
        words: String,
        /// Why.
        reason: String,
    },
    /// Bad drill file.
    #[error("drill file: invalid `{key}`: {reason}")]
    File {
        /// The key, e.g. `step[1].rack`.
        key: String,
        /// Why.
        reason: String,
    },
}

/// The scenario names, with their arguments (for `drill list`).
pub const SCENARIOS: [(&str, &str); 6] = [
    (
        "power-loss RACK",
        "the rack's power dies: appliances killed, silent on mesh and bulk, back at the end",
    ),
    (
        "isolate RACK",
        "the rack loses every link (it keeps running)",
    ),
    (
        "cut-link A B [--one-way]",
        "the link between two racks is cut (one-way: A to B only)",
    ),
    (
        "partition A,B|C [--one-way]",
        "the field splits in two (one-way: left to right only)",
    ),
    (
        "generator RACK [--runtime S]",
        "mains fail, the generator does not start: battery counting down to dying",
    ),
    (
        "backhaul-down [RACK]",
        "the proxy acts as if the satellite link were gone (every rack by default)",
    ),
];

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect()
}

/// One fault from the command line's words.
///
/// # Errors
/// [`ScenarioError::Args`].
pub fn parse_words(
    words: &[String],
    one_way: bool,
    runtime_s: Option<u64>,
    duration: Duration,
) -> Result<Scenario, ScenarioError> {
    let err = |reason: &str| ScenarioError::Args {
        words: words.join(" "),
        reason: reason.to_owned(),
    };
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let fault = match w.as_slice() {
        ["power-loss", rack] => Fault::PowerLoss {
            rack: (*rack).into(),
        },
        ["isolate", rack] => Fault::Isolate {
            rack: (*rack).into(),
        },
        ["cut-link", a, b] => Fault::CutLink {
            a: (*a).into(),
            b: (*b).into(),
            one_way,
        },
        ["partition", sides] => {
            let (l, r) = sides
                .split_once('|')
                .ok_or_else(|| err("a partition is `A,B|C`"))?;
            Fault::Partition {
                left: list(l),
                right: list(r),
                one_way,
            }
        }
        ["generator", rack] => Fault::Generator {
            rack: (*rack).into(),
            runtime_s: runtime_s.unwrap_or(DEFAULT_RUNTIME_S),
        },
        ["backhaul-down"] => Fault::BackhaulDown { rack: None },
        ["backhaul-down", rack] => Fault::BackhaulDown {
            rack: Some((*rack).into()),
        },
        [] => return Err(err("name a scenario (`fieldrack drill list`)")),
        [kind, ..] if SCENARIOS.iter().any(|(s, _)| s.starts_with(kind)) => {
            return Err(err("wrong number of arguments (`fieldrack drill list`)"))
        }
        _ => return Err(err("unknown scenario (`fieldrack drill list`)")),
    };
    if one_way && !matches!(fault, Fault::CutLink { .. } | Fault::Partition { .. }) {
        return Err(err("--one-way applies to cut-link and partition only"));
    }
    fault.validate().map_err(|e| err(&e.to_string()))?;
    check_duration(duration).map_err(|r| err(&r))?;
    Ok(Scenario {
        steps: vec![Step { fault, duration }],
    })
}

fn check_duration(d: Duration) -> Result<(), String> {
    let ms = d.as_millis();
    if ms == 0 || ms > u128::from(MAX_DURATION_MS) {
        return Err(format!("a duration is 1 s to {} s", MAX_DURATION_MS / 1000));
    }
    Ok(())
}

/// A drill file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DrillFile {
    /// Default duration of every step, seconds.
    duration_s: Option<u64>,
    step: Vec<FileStep>,
}

/// One `[[step]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStep {
    fault: String,
    rack: Option<String>,
    a: Option<String>,
    b: Option<String>,
    left: Option<Vec<String>>,
    right: Option<Vec<String>>,
    #[serde(default)]
    one_way: bool,
    runtime_s: Option<u64>,
    duration_s: Option<u64>,
}

/// A drill file's steps.
///
/// # Errors
/// [`ScenarioError::File`] naming the key.
pub fn parse_file(text: &str) -> Result<Scenario, ScenarioError> {
    let file: DrillFile = toml::from_str(text).map_err(|e| ScenarioError::File {
        key: e
            .span()
            .map_or_else(|| "file".to_owned(), |s| key_at(text, s.start)),
        reason: e.message().to_owned(),
    })?;
    if file.step.is_empty() || file.step.len() > MAX_ACTIVE {
        return Err(ScenarioError::File {
            key: "step".into(),
            reason: format!("a drill has 1 to {MAX_ACTIVE} steps"),
        });
    }
    let mut steps = Vec::new();
    for (i, s) in file.step.into_iter().enumerate() {
        let key = |k: &str| format!("step[{i}].{k}");
        let need = |v: Option<String>, k: &str| {
            v.ok_or_else(|| ScenarioError::File {
                key: key(k),
                reason: format!("required for `{}`", s.fault),
            })
        };
        let fault = match s.fault.as_str() {
            "power-loss" => Fault::PowerLoss {
                rack: need(s.rack.clone(), "rack")?,
            },
            "isolate" => Fault::Isolate {
                rack: need(s.rack.clone(), "rack")?,
            },
            "cut-link" => Fault::CutLink {
                a: need(s.a.clone(), "a")?,
                b: need(s.b.clone(), "b")?,
                one_way: s.one_way,
            },
            "partition" => Fault::Partition {
                left: s.left.clone().unwrap_or_default(),
                right: s.right.clone().unwrap_or_default(),
                one_way: s.one_way,
            },
            "generator" => Fault::Generator {
                rack: need(s.rack.clone(), "rack")?,
                runtime_s: s.runtime_s.unwrap_or(DEFAULT_RUNTIME_S),
            },
            "backhaul-down" => Fault::BackhaulDown {
                rack: s.rack.clone(),
            },
            other => {
                return Err(ScenarioError::File {
                    key: key("fault"),
                    reason: format!("unknown fault `{other}`"),
                })
            }
        };
        fault.validate().map_err(|e| ScenarioError::File {
            key: key("fault"),
            reason: e.to_string(),
        })?;
        let secs = s
            .duration_s
            .or(file.duration_s)
            .unwrap_or(DEFAULT_DURATION.as_secs());
        let duration = Duration::from_secs(secs);
        check_duration(duration).map_err(|reason| ScenarioError::File {
            key: if s.duration_s.is_some() {
                key("duration_s")
            } else {
                "duration_s".into()
            },
            reason,
        })?;
        steps.push(Step { fault, duration });
    }
    Ok(Scenario { steps })
}

/// The key whose value starts at byte `at` (for TOML's own errors).
fn key_at(text: &str, at: usize) -> String {
    let line = text[..at.min(text.len())]
        .rsplit('\n')
        .next()
        .unwrap_or_default();
    let full_line = text[at.min(text.len()) - line.len()..]
        .lines()
        .next()
        .unwrap_or_default();
    full_line
        .split('=')
        .next()
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .unwrap_or("file")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn command_line_scenarios() {
        let d = DEFAULT_DURATION;
        let one = |s: &str, one_way| {
            parse_words(&words(s), one_way, None, d).map(|x| x.steps[0].fault.clone())
        };
        assert_eq!(
            one("power-loss b", false),
            Ok(Fault::PowerLoss { rack: "b".into() })
        );
        assert_eq!(
            one("cut-link a b", true),
            Ok(Fault::CutLink {
                a: "a".into(),
                b: "b".into(),
                one_way: true
            })
        );
        assert_eq!(
            one("partition a,b|c", false),
            Ok(Fault::Partition {
                left: vec!["a".into(), "b".into()],
                right: vec!["c".into()],
                one_way: false
            })
        );
        assert_eq!(
            one("backhaul-down", false),
            Ok(Fault::BackhaulDown { rack: None })
        );
        assert_eq!(
            one("generator c", false),
            Ok(Fault::Generator {
                rack: "c".into(),
                runtime_s: DEFAULT_RUNTIME_S
            })
        );
        for bad in ["power-loss", "melt b", "cut-link a a", "partition a,b", ""] {
            assert!(one(bad, false).is_err(), "{bad}");
        }
        assert!(one("isolate b", true).is_err(), "--one-way on isolate");
        assert!(parse_words(&words("isolate b"), false, None, Duration::ZERO).is_err());
    }

    #[test]
    fn drill_files_name_the_key_at_fault() {
        let ok = parse_file(
            r#"
duration_s = 30
[[step]]
fault = "power-loss"
rack = "b"
[[step]]
fault = "cut-link"
a = "a"
b = "c"
one_way = true
duration_s = 10
"#,
        )
        .unwrap();
        assert_eq!(ok.steps.len(), 2);
        assert_eq!(ok.steps[0].duration, Duration::from_secs(30));
        assert_eq!(ok.steps[1].duration, Duration::from_secs(10));
        assert_eq!(ok.describe(), "power-loss b; cut-link a c --one-way");

        let cases = [
            ("[[step]]\nfault = \"isolate\"\n", "step[0].rack"),
            ("[[step]]\nfault = \"melt\"\n", "step[0].fault"),
            (
                "[[step]]\nfault = \"isolate\"\nrack = \"b\"\nduration_s = 0\n",
                "step[0].duration_s",
            ),
            (
                "[[step]]\nfault = \"isolate\"\nrack = \"b\"\ncolour = 1\n",
                "colour",
            ),
            ("step = []\n", "step"),
        ];
        for (text, key) in cases {
            match parse_file(text) {
                Err(ScenarioError::File { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
