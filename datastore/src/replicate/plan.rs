//! Where replicas go: a pure function of the field's state.
//!
//! Replica sets are sticky: a replica that is alive keeps its place (moving
//! data is expensive on radio links); a dead one is replaced (re-protection,
//! without an operator). New replicas go to alive racks (never witnesses)
//! on sites not yet holding a copy when possible, then to the rack with the
//! most free capacity, then by name, so every rack computes the same answer.

use std::collections::HashSet;

/// What the planner knows about a rack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RackView {
    /// Rack name.
    pub rack: String,
    /// Site (failure domain).
    pub site: String,
    /// Alive in membership right now.
    pub alive: bool,
    /// Witnesses store no volumes.
    pub witness: bool,
    /// Free bytes for volume data, if known (more is better).
    pub free_bytes: Option<u64>,
}

/// Choose the replica racks of a volume owned by `owner` with `factor`
/// copies in all (the owner's included), keeping `current` where possible.
pub fn choose_replicas(
    owner: &RackView,
    current: &[String],
    racks: &[RackView],
    factor: usize,
) -> Vec<String> {
    let want = factor.saturating_sub(1);
    let eligible = |r: &RackView| r.alive && !r.witness && r.rack != owner.rack;
    let mut chosen: Vec<String> = Vec::new();
    for name in current {
        if chosen.len() < want
            && !chosen.contains(name)
            && racks.iter().any(|r| &r.rack == name && eligible(r))
        {
            chosen.push(name.clone());
        }
    }
    let mut sites: HashSet<String> = std::iter::once(owner.site.clone())
        .chain(
            chosen
                .iter()
                .filter_map(|n| racks.iter().find(|r| &r.rack == n).map(|r| r.site.clone())),
        )
        .collect();
    while chosen.len() < want {
        let mut candidates: Vec<&RackView> = racks
            .iter()
            .filter(|r| eligible(r) && !chosen.contains(&r.rack))
            .collect();
        if candidates.is_empty() {
            break;
        }
        candidates.sort_by(|a, b| {
            let new_site = |r: &RackView| !sites.contains(&r.site);
            new_site(b)
                .cmp(&new_site(a))
                .then(b.free_bytes.unwrap_or(0).cmp(&a.free_bytes.unwrap_or(0)))
                .then(a.rack.cmp(&b.rack))
        });
        let pick = candidates[0];
        sites.insert(pick.site.clone());
        chosen.push(pick.rack.clone());
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rack(name: &str, site: &str, alive: bool) -> RackView {
        RackView {
            rack: name.into(),
            site: site.into(),
            alive,
            witness: false,
            free_bytes: None,
        }
    }

    #[test]
    fn prefers_other_sites() {
        let owner = rack("a", "s1", true);
        let racks = vec![owner.clone(), rack("b", "s1", true), rack("c", "s2", true)];
        assert_eq!(choose_replicas(&owner, &[], &racks, 2), vec!["c"]);
        assert_eq!(choose_replicas(&owner, &[], &racks, 3), vec!["c", "b"]);
    }

    #[test]
    fn sticky_while_alive_replaced_when_dead() {
        let owner = rack("a", "s1", true);
        let mut racks = vec![owner.clone(), rack("b", "s1", true), rack("c", "s2", true)];
        assert_eq!(
            choose_replicas(&owner, &["b".into()], &racks, 2),
            vec!["b"],
            "sticky"
        );
        racks[1].alive = false;
        assert_eq!(
            choose_replicas(&owner, &["b".into()], &racks, 2),
            vec!["c"],
            "re-protected"
        );
    }

    #[test]
    fn never_witnesses_never_owner() {
        let owner = rack("a", "s1", true);
        let mut w = rack("w", "s2", true);
        w.witness = true;
        let racks = vec![owner.clone(), w];
        assert!(choose_replicas(&owner, &[], &racks, 2).is_empty());
    }

    proptest! {
        #[test]
        fn replicas_are_distinct_eligible_and_bounded(
            alive in proptest::collection::vec(any::<bool>(), 1..8),
            sites in proptest::collection::vec(0u8..3, 8),
            factor in 1usize..5,
            current in proptest::collection::vec(0usize..8, 0..4),
        ) {
            let racks: Vec<RackView> = alive.iter().enumerate()
                .map(|(i, a)| rack(&format!("r{i}"), &format!("s{}", sites[i]), *a)).collect();
            let owner = racks[0].clone();
            let current: Vec<String> = current.iter().map(|i| format!("r{i}")).collect();
            let got = choose_replicas(&owner, &current, &racks, factor);
            prop_assert!(got.len() < factor.max(1));
            let set: HashSet<&String> = got.iter().collect();
            prop_assert_eq!(set.len(), got.len());
            for g in &got {
                let r = racks.iter().find(|r| &r.rack == g).unwrap();
                prop_assert!(r.alive && r.rack != owner.rack);
            }
            let eligible = racks.iter().filter(|r| r.alive && r.rack != owner.rack).count();
            prop_assert_eq!(got.len(), eligible.min(factor - 1));
        }
    }
}
