//! Where replicas go: a pure function of the field's state.
//!
//! Replica sets are sticky: a replica that is alive keeps its place (moving
//! data is expensive on radio links); a dead one is replaced (re-protection,
//! without an operator). A replica on a rack whose power is dying is kept
//! too while the rack lives: the copy exists now, and shipping a new one
//! over a radio link may not finish before the battery would have; it is
//! replaced when the rack goes down. New replicas go to alive racks (never
//! witnesses), racks whose power is not dying first (a dying rack gets a
//! new copy only when no other rack can take it: better than none), then
//! on sites not yet holding a copy when possible, then to the rack with the
//! most free bytes for volume data (unknown counts as none), then by name,
//! so every rack computes the same answer.

use std::collections::HashSet;

/// What the planner knows about a rack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RackView {
    /// Rack name.
    pub rack: String,
    /// Site (failure domain).
    pub site: String,
    /// Up in the field and reachable for pushes right now.
    pub alive: bool,
    /// Its power is about to fail: avoided for new replicas.
    pub dying: bool,
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
            a.dying
                .cmp(&b.dying)
                .then(new_site(b).cmp(&new_site(a)))
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
            dying: false,
            witness: false,
            free_bytes: None,
        }
    }

    #[test]
    fn new_replicas_avoid_dying_racks_and_prefer_free_space() {
        let owner = rack("a", "s1", true);
        let free = |name: &str, site: &str, bytes: Option<u64>, dying: bool| RackView {
            free_bytes: bytes,
            dying,
            ..rack(name, site, true)
        };
        type Case = (
            &'static str,
            Vec<RackView>,
            &'static [&'static str],
            usize,
            &'static [&'static str],
        );
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("a dying rack on a new site loses to a healthy one on the owner's site",
             vec![free("b", "s1", None, false), free("c", "s2", Some(1 << 40), true)], &[], 2, &["b"]),
            ("a dying rack is used when nothing else can hold a copy",
             vec![free("c", "s2", None, true)], &[], 2, &["c"]),
            ("a current replica on a dying rack is kept while it lives",
             vec![free("b", "s1", None, false), free("c", "s2", None, true)], &["c"], 2, &["c"]),
            ("among healthy racks of new sites, more free bytes wins",
             vec![free("b", "s2", Some(10), false), free("c", "s3", Some(20), false)], &[], 2, &["c"]),
            ("unknown free bytes count as none",
             vec![free("b", "s2", None, false), free("c", "s3", Some(1), false)], &[], 2, &["c"]),
            ("a new site still wins over free bytes",
             vec![free("b", "s1", Some(1 << 40), false), free("c", "s2", Some(1), false)], &[], 2, &["c"]),
            ("healthy first, then the dying one, for three copies",
             vec![free("b", "s2", Some(5), true), free("c", "s1", Some(1), false)], &[], 3, &["c", "b"]),
        ];
        for (what, others, current, factor, want) in cases {
            let mut racks = vec![owner.clone()];
            racks.extend(others.iter().cloned());
            let current: Vec<String> = current.iter().map(|c| (*c).to_string()).collect();
            assert_eq!(
                choose_replicas(&owner, &current, &racks, *factor),
                *want,
                "{what}"
            );
        }
    }

    #[test]
    fn a_dying_replica_is_replaced_once_it_goes_down() {
        let owner = rack("a", "s1", true);
        let mut c = rack("c", "s2", true);
        c.dying = true;
        let mut racks = vec![owner.clone(), rack("b", "s1", true), c];
        assert_eq!(choose_replicas(&owner, &["c".into()], &racks, 2), vec!["c"]);
        racks[2].alive = false;
        assert_eq!(choose_replicas(&owner, &["c".into()], &racks, 2), vec!["b"]);
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
            dying in proptest::collection::vec(any::<bool>(), 8),
            sites in proptest::collection::vec(0u8..3, 8),
            factor in 1usize..5,
            current in proptest::collection::vec(0usize..8, 0..4),
        ) {
            let racks: Vec<RackView> = alive.iter().enumerate()
                .map(|(i, a)| RackView { dying: dying[i], ..rack(&format!("r{i}"), &format!("s{}", sites[i]), *a) })
                .collect();
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
            // A dying rack is newly chosen only if no healthy eligible rack
            // was left out.
            let kept: Vec<&String> = got.iter().filter(|g| current.contains(g)).collect();
            let new_dying = got.iter().any(|g| !kept.contains(&g) && racks.iter().any(|r| &r.rack == g && r.dying));
            let healthy_left_out = racks.iter().any(|r| r.alive && !r.dying && r.rack != owner.rack && !got.contains(&r.rack));
            prop_assert!(!(new_dying && healthy_left_out), "{:?}", got);
        }
    }
}
