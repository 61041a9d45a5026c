//! Which pushes a replication tick starts: a pure decision over the
//! replicas' state, the links already busy and recent failures (time is
//! passed in), so that its rules are tested without a network or a clock.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::records::ReplicaRecord;
use super::replication::{REPROTECT_AFTER, RETRY_AFTER};
use crate::replicate::plan::RackView;

/// An owned volume as a tick sees it.
#[derive(Debug, Clone)]
pub(crate) struct Owned {
    /// The volume.
    pub(crate) volume: String,
    /// Its newest generation.
    pub(crate) latest: u64,
    /// Its replicas as placed this tick.
    pub(crate) replicas: Vec<ReplicaRecord>,
}

/// One push to start: `generation` of `volume` to `rack`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Job {
    /// The volume.
    pub(crate) volume: String,
    /// The replica rack.
    pub(crate) rack: String,
    /// The generation to offer (the volume's newest).
    pub(crate) generation: u64,
}

/// The pushes to start now, in order: one to every replica behind its
/// volume's newest generation, except on a link already carrying a push
/// (`busy`: concurrent pushes of volumes sharing chunks would each send
/// the shared chunks; sequential ones deduplicate, and one volume cannot
/// starve another on a thin link), except a (volume, rack) whose push
/// failed less than [`RETRY_AFTER`] before `now`, and at most `permits`.
pub(crate) fn due(
    owned: &[Owned],
    busy: &HashSet<String>,
    failed_at: &HashMap<(String, String), Instant>,
    now: Instant,
    permits: usize,
) -> Vec<Job> {
    let mut links: HashSet<&str> = busy.iter().map(String::as_str).collect();
    let mut jobs = Vec::new();
    for o in owned {
        for r in o.replicas.iter().filter(|r| r.generation < Some(o.latest)) {
            if jobs.len() == permits {
                return jobs;
            }
            if links.contains(r.rack.as_str()) {
                continue;
            }
            let key = (o.volume.clone(), r.rack.clone());
            if failed_at
                .get(&key)
                .is_some_and(|t| now.saturating_duration_since(*t) < RETRY_AFTER)
            {
                continue;
            }
            links.insert(&r.rack);
            jobs.push(Job {
                volume: o.volume.clone(),
                rack: r.rack.clone(),
                generation: o.latest,
            });
        }
    }
    jobs
}

/// Failed pushes to retry at once because their rack's link came back.
///
/// A push cut by a fade fails when the link is lost (the rack leaves
/// `reachable`); waiting [`RETRY_AFTER`] from the failure would start the
/// retry up to that long after the link's return. Instead each rack with a
/// failed push that is seen unreachable goes into `lost`; once it is
/// reachable again, its failures are forgotten (so [`due`] starts them at
/// the next tick, which the loop runs often while failures are pending).
/// A push that failed with the link up (a refusal, a full disk) waits
/// [`RETRY_AFTER`] as before. Returns the (volume, rack) pairs released.
pub(crate) fn release_returned(
    failed_at: &mut HashMap<(String, String), Instant>,
    lost: &mut HashSet<String>,
    reachable: &HashSet<String>,
) -> Vec<(String, String)> {
    for (_, rack) in failed_at.keys() {
        if !reachable.contains(rack) {
            lost.insert(rack.clone());
        }
    }
    let back: HashSet<String> = lost.intersection(reachable).cloned().collect();
    let released: Vec<(String, String)> = failed_at
        .keys()
        .filter(|(_, rack)| back.contains(rack))
        .cloned()
        .collect();
    for key in &released {
        failed_at.remove(key);
    }
    // Bounded by the failures: a rack without one is no longer tracked.
    lost.retain(|r| !back.contains(r) && failed_at.keys().any(|(_, fr)| fr == r));
    released
}

/// Whether a push that failed should start again at the next tick rather
/// than after [`RETRY_AFTER`]: its stream was cut (`cut`: the connection
/// was lost or replaced, e.g. by the bulk plane when a fade ended) after it
/// had sent `sent_chunks` > 0. The replica kept the whole frames that
/// arrived, so the next push costs an offer round trip and resumes; each
/// quick retry needs progress by the attempt before it, so a link that
/// cuts every push at once falls back to [`RETRY_AFTER`].
pub(crate) fn retry_at_once(cut: bool, sent_chunks: u64) -> bool {
    cut && sent_chunks > 0
}

/// Racks unavailable for pushes (not up, or not reachable) for less than
/// [`REPROTECT_AFTER`]: a volume's current replica on one of them is kept
/// rather than re-protected elsewhere at once, since a fade of seconds
/// would otherwise cost a whole new copy on another rack while the
/// interrupted one waits, mostly transferred, for its link. `since`
/// remembers when each rack became unavailable (only racks in `racks`,
/// so it is bounded by them).
pub(crate) fn held_racks(
    racks: &[RackView],
    since: &mut HashMap<String, Instant>,
    now: Instant,
) -> HashSet<String> {
    since.retain(|r, _| racks.iter().any(|x| &x.rack == r && !x.alive));
    racks
        .iter()
        .filter(|r| !r.alive)
        .filter(|r| {
            let from = *since.entry(r.rack.clone()).or_insert(now);
            now.saturating_duration_since(from) < REPROTECT_AFTER
        })
        .map(|r| r.rack.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn replica(rack: &str, generation: Option<u64>) -> ReplicaRecord {
        ReplicaRecord {
            rack: rack.into(),
            generation,
            generation_created_ms: None,
        }
    }

    fn owned(volume: &str, latest: u64, replicas: &[(&str, Option<u64>)]) -> Owned {
        Owned {
            volume: volume.into(),
            latest,
            replicas: replicas.iter().map(|(r, g)| replica(r, *g)).collect(),
        }
    }

    fn pairs(jobs: &[Job]) -> Vec<(&str, &str, u64)> {
        jobs.iter()
            .map(|j| (j.volume.as_str(), j.rack.as_str(), j.generation))
            .collect()
    }

    /// (name, owned volumes, busy links, failures, permits, pushes wanted).
    type Case = (
        &'static str,
        Vec<Owned>,
        HashSet<String>,
        HashMap<(String, String), Instant>,
        usize,
        Vec<(&'static str, &'static str, u64)>,
    );

    #[test]
    fn table() {
        let now = Instant::now();
        let failed = |v: &str, r: &str, ago: Duration| {
            HashMap::from([((v.to_owned(), r.to_owned()), now - ago)])
        };
        let busy = |r: &[&str]| r.iter().map(|s| (*s).to_owned()).collect::<HashSet<_>>();
        let none = HashMap::new();
        let cases: Vec<Case> = vec![
            (
                "up to date: nothing",
                vec![owned("v", 3, &[("b", Some(3))])],
                busy(&[]),
                none.clone(),
                4,
                vec![],
            ),
            (
                "never pushed",
                vec![owned("v", 1, &[("b", None)])],
                busy(&[]),
                none.clone(),
                4,
                vec![("v", "b", 1)],
            ),
            (
                "behind: the newest",
                vec![owned("v", 5, &[("b", Some(2)), ("c", Some(5))])],
                busy(&[]),
                none.clone(),
                4,
                vec![("v", "b", 5)],
            ),
            (
                "link busy",
                vec![owned("v", 2, &[("b", Some(1))])],
                busy(&["b"]),
                none.clone(),
                4,
                vec![],
            ),
            (
                "one push per link per tick",
                vec![
                    owned("v", 2, &[("b", None)]),
                    owned("w", 2, &[("b", None), ("c", None)]),
                ],
                busy(&[]),
                none.clone(),
                4,
                vec![("v", "b", 2), ("w", "c", 2)],
            ),
            (
                "failed just now",
                vec![owned("v", 2, &[("b", None)])],
                busy(&[]),
                failed("v", "b", Duration::from_secs(1)),
                4,
                vec![],
            ),
            (
                "failed long ago",
                vec![owned("v", 2, &[("b", None)])],
                busy(&[]),
                failed("v", "b", RETRY_AFTER),
                4,
                vec![("v", "b", 2)],
            ),
            (
                "another volume failed",
                vec![owned("v", 2, &[("b", None)])],
                busy(&[]),
                failed("w", "b", Duration::ZERO),
                4,
                vec![("v", "b", 2)],
            ),
            (
                "no permits",
                vec![owned("v", 2, &[("b", None)])],
                busy(&[]),
                none.clone(),
                0,
                vec![],
            ),
            (
                "permits bound the tick",
                vec![owned("v", 2, &[("b", None), ("c", None), ("d", None)])],
                busy(&[]),
                none.clone(),
                2,
                vec![("v", "b", 2), ("v", "c", 2)],
            ),
        ];
        for (name, owned, busy, failed_at, permits, want) in cases {
            let jobs = due(&owned, &busy, &failed_at, now, permits);
            assert_eq!(pairs(&jobs), want, "{name}");
        }
    }

    fn set(racks: &[&str]) -> HashSet<String> {
        racks.iter().map(|s| (*s).to_owned()).collect()
    }

    fn key(v: &str, r: &str) -> (String, String) {
        (v.to_owned(), r.to_owned())
    }

    /// A push to b fails while b is unreachable (a fade): it is released
    /// the first tick b is reachable again, however recent the failure; a
    /// push that failed with its link up is not.
    #[test]
    fn failures_are_released_when_the_link_returns() {
        let now = Instant::now();
        let mut failed = HashMap::from([(key("v", "b"), now), (key("w", "c"), now)]);
        let mut lost = HashSet::new();
        // The tick of the failure: b is gone, c is there.
        assert!(release_returned(&mut failed, &mut lost, &set(&["c"])).is_empty());
        assert_eq!(lost, set(&["b"]));
        // Still gone.
        assert!(release_returned(&mut failed, &mut lost, &set(&["c"])).is_empty());
        // Back: released at once; c's failure keeps its RETRY_AFTER.
        let released = release_returned(&mut failed, &mut lost, &set(&["b", "c"]));
        assert_eq!(released, vec![key("v", "b")]);
        assert_eq!(
            failed.keys().cloned().collect::<Vec<_>>(),
            vec![key("w", "c")]
        );
        assert!(lost.is_empty());
        // A failure whose rack never left is never released early.
        assert!(release_returned(&mut failed, &mut lost, &set(&["b", "c"])).is_empty());
    }

    #[test]
    fn only_a_cut_after_progress_is_retried_at_once() {
        for (cut, sent, want) in [
            (true, 5, true),
            (true, 0, false),
            (false, 5, false),
            (false, 0, false),
        ] {
            assert_eq!(retry_at_once(cut, sent), want, "cut={cut} sent={sent}");
        }
    }

    fn view(rack: &str, alive: bool) -> RackView {
        RackView {
            rack: rack.to_owned(),
            site: "s".to_owned(),
            alive,
            dying: false,
            witness: false,
            free_bytes: None,
        }
    }

    #[test]
    fn unavailable_racks_are_held_for_a_while() {
        let t0 = Instant::now();
        let mut since = HashMap::new();
        let racks = [view("a", false), view("b", true)];
        assert_eq!(held_racks(&racks, &mut since, t0), set(&["a"]));
        let later = t0 + REPROTECT_AFTER - Duration::from_millis(1);
        assert_eq!(held_racks(&racks, &mut since, later), set(&["a"]));
        assert!(held_racks(&racks, &mut since, t0 + REPROTECT_AFTER).is_empty());
        // Available again: forgotten, so the next loss counts afresh.
        let back = [view("a", true), view("b", true)];
        assert!(held_racks(&back, &mut since, t0 + REPROTECT_AFTER).is_empty());
        assert!(since.is_empty());
        let t1 = t0 + REPROTECT_AFTER * 2;
        assert_eq!(held_racks(&racks, &mut since, t1), set(&["a"]));
    }

    fn arb_owned() -> impl Strategy<Value = Vec<Owned>> {
        let rack = prop::sample::select(vec!["a", "b", "c", "d", "e"]);
        let replicas = prop::collection::vec((rack, prop::option::of(0u64..6)), 0..4);
        prop::collection::vec((0u64..6, replicas), 0..6).prop_map(|vs| {
            vs.into_iter()
                .enumerate()
                .map(|(i, (latest, reps))| Owned {
                    volume: format!("v{i}"),
                    latest,
                    replicas: reps.into_iter().map(|(r, g)| replica(r, g)).collect(),
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn every_push_obeys_the_rules(
            owned in arb_owned(),
            busy in prop::collection::hash_set(prop::sample::select(vec!["a", "b", "c", "d", "e"]), 0..3),
            failed in prop::collection::vec((0usize..6, prop::sample::select(vec!["a", "b", "c", "d", "e"]), 0u64..6), 0..4),
            permits in 0usize..5,
        ) {
            let now = Instant::now() + Duration::from_secs(60);
            let busy: HashSet<String> = busy.into_iter().map(str::to_owned).collect();
            let failed_at: HashMap<(String, String), Instant> = failed
                .into_iter()
                .map(|(v, r, ago)| ((format!("v{v}"), r.to_owned()), now - Duration::from_secs(ago)))
                .collect();
            let jobs = due(&owned, &busy, &failed_at, now, permits);
            prop_assert!(jobs.len() <= permits);
            let mut links = HashSet::new();
            for j in &jobs {
                prop_assert!(!busy.contains(&j.rack), "a busy link gets no second push");
                prop_assert!(links.insert(j.rack.clone()), "one push per link");
                let o = owned.iter().find(|o| o.volume == j.volume).unwrap();
                prop_assert_eq!(j.generation, o.latest);
                prop_assert!(o.replicas.iter().any(|r| r.rack == j.rack && r.generation < Some(o.latest)));
                let key = (j.volume.clone(), j.rack.clone());
                prop_assert!(failed_at.get(&key).is_none_or(|t| now - *t >= RETRY_AFTER));
            }
            // Nothing eligible is left out while permits remain.
            if jobs.len() < permits {
                for o in &owned {
                    for r in o.replicas.iter().filter(|r| r.generation < Some(o.latest)) {
                        let key = (o.volume.clone(), r.rack.clone());
                        let retry_ok = failed_at.get(&key).is_none_or(|t| now - *t >= RETRY_AFTER);
                        if retry_ok && !busy.contains(&r.rack) {
                            prop_assert!(links.contains(&r.rack), "{} to {} was due", o.volume, r.rack);
                        }
                    }
                }
            }
        }
    }
}
