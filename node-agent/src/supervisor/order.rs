//! The order in which appliances stop when the agent shuts down.

use std::collections::{BTreeMap, BTreeSet};

/// The waves in which to stop `running` appliances: every appliance in a
/// wave before the ones it starts `after` (a web app before its database),
/// so nothing loses what it depends on while it still runs; the appliances
/// of one wave depend on none of each other and stop together, so a
/// shutdown takes one stop grace per level of dependency, not one per
/// appliance. Names outside `running` are ignored; a cycle (refused at
/// deploy) is broken by taking its first name alone.
pub fn stop_waves(running: &[String], after: impl Fn(&str) -> Vec<String>) -> Vec<Vec<String>> {
    let set: BTreeSet<&str> = running.iter().map(String::as_str).collect();
    // Dependents of each appliance among the running ones.
    let mut dependents: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for name in &set {
        for dep in after(name) {
            if let Some(d) = set.get(dep.as_str()) {
                dependents.entry(d).or_default().insert(name);
            }
        }
    }
    let mut waves = Vec::new();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    while done.len() < set.len() {
        // Those whose dependents have all stopped; if none (a cycle), the
        // first left.
        let ready: Vec<&str> = set
            .iter()
            .filter(|n| !done.contains(*n))
            .filter(|n| {
                dependents
                    .get(*n)
                    .is_none_or(|ds| ds.iter().all(|d| done.contains(d)))
            })
            .copied()
            .collect();
        let next = if ready.is_empty() {
            set.iter()
                .copied()
                .filter(|n| !done.contains(n))
                .take(1)
                .collect()
        } else {
            ready
        };
        for n in &next {
            done.insert(n);
        }
        waves.push(next.into_iter().map(str::to_owned).collect());
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::stop_waves;

    fn waves(running: &[&str], deps: &[(&str, &[&str])]) -> Vec<Vec<String>> {
        let running: Vec<String> = running.iter().map(|s| (*s).to_owned()).collect();
        stop_waves(&running, |n| {
            deps.iter()
                .find(|(a, _)| *a == n)
                .map(|(_, d)| d.iter().map(|s| (*s).to_owned()).collect())
                .unwrap_or_default()
        })
    }

    #[test]
    fn dependents_stop_before_what_they_start_after() {
        // web after api after db; voip on its own; a dependency not running.
        let got = waves(
            &["db", "voip", "web", "api"],
            &[("web", &["api"]), ("api", &["db", "cache"])],
        );
        // Independent appliances stop together; each level waits for the
        // one that depends on it.
        assert_eq!(got, [vec!["voip", "web"], vec!["api"], vec!["db"]]);
    }

    #[test]
    fn eight_independent_appliances_stop_in_one_wave() {
        let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
        let got = waves(&names, &[]);
        assert_eq!(got, [names.to_vec()]);
    }

    #[test]
    fn a_cycle_still_stops_everything_once() {
        let got = waves(&["a", "b"], &[("a", &["b"]), ("b", &["a"])]);
        let mut all: Vec<String> = got.concat();
        all.sort();
        assert_eq!(all, ["a", "b"]);
    }
}
