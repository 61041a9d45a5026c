//! The order in which appliances stop when the agent shuts down.

use std::collections::{BTreeMap, BTreeSet};

/// The order to stop `running` appliances in: every appliance before the
/// ones it starts `after` (a web app before its database), so nothing
/// loses what it depends on while it still runs. Names outside `running`
/// are ignored; a cycle (refused at deploy) falls back to name order.
pub fn stop_order(running: &[String], after: impl Fn(&str) -> Vec<String>) -> Vec<String> {
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
    let mut order = Vec::new();
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
        for n in next {
            done.insert(n);
            order.push(n.to_owned());
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::stop_order;

    fn order(running: &[&str], deps: &[(&str, &[&str])]) -> Vec<String> {
        let running: Vec<String> = running.iter().map(|s| (*s).to_owned()).collect();
        stop_order(&running, |n| {
            deps.iter()
                .find(|(a, _)| *a == n)
                .map(|(_, d)| d.iter().map(|s| (*s).to_owned()).collect())
                .unwrap_or_default()
        })
    }

    #[test]
    fn dependents_stop_before_what_they_start_after() {
        // web after api after db; voip on its own; a dependency not running.
        let got = order(
            &["db", "voip", "web", "api"],
            &[("web", &["api"]), ("api", &["db", "cache"])],
        );
        let pos = |n: &str| got.iter().position(|x| x == n).expect(n);
        assert_eq!(got.len(), 4);
        assert!(pos("web") < pos("api") && pos("api") < pos("db"), "{got:?}");
    }

    #[test]
    fn a_cycle_still_stops_everything_once() {
        let mut got = order(&["a", "b"], &[("a", &["b"]), ("b", &["a"])]);
        got.sort();
        assert_eq!(got, ["a", "b"]);
    }
}
