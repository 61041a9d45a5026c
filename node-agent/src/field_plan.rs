//! The failure plan of a field (`fieldrack fleet plan`): where everything
//! runs with every rack up, and, for each rack, what happens if it dies.
//!
//! Nothing here decides anything of its own: owners come from the control
//! plane's placement ([`control::placement::plan`], run to a fixed point
//! the way the leader would over successive rounds), replicas from the
//! datastore's [`datastore::replicate::plan::choose_replicas`], so the plan
//! shows what the running field will do. `fleet bundle` uses the same
//! [`Layout`] to decide which rack gets which preloaded volume.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use control::field::{AppRecord, Command, FieldState, RackReport, Response};
use control::placement::{self, RackView};
use datastore::replicate::plan::{choose_replicas, RackView as ReplicaView};
use deploy::field::Field;
use deploy::Role;

/// Rounds of placement run to reach a fixed point: each round places what
/// the previous one freed (preemption takes two), so a handful suffices;
/// the bound keeps a planner bug from looping forever.
const MAX_ROUNDS: usize = 16;

/// Where everything is with every rack up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Appliance → owner (absent: nowhere fits).
    pub owners: BTreeMap<String, String>,
    /// Volume → the racks that hold a copy, the owner first.
    pub copies: BTreeMap<String, Vec<String>>,
}

/// What happens when one rack dies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    /// The rack that dies.
    pub rack: String,
    /// Appliances that move: (appliance, from, to).
    pub moves: Vec<(String, String, String)>,
    /// Appliances stopped to make room for more important ones.
    pub preempted: Vec<String>,
    /// Appliances left without a rack: (appliance, tier).
    pub homeless: Vec<(String, u8)>,
}

/// One rack's disk: what its volumes and tile packs need against what it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The rack.
    pub rack: String,
    /// Bytes of volume copies it holds (owner or replica).
    pub volumes: u64,
    /// Bytes of tile packs it carries.
    pub tiles: u64,
    /// Bytes of disk it has for them.
    pub have: u64,
}

impl Disk {
    /// Volumes and packs together.
    #[must_use]
    pub fn need(&self) -> u64 {
        self.volumes + self.tiles
    }
}

/// The whole failure plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailurePlan {
    /// Every rack up.
    pub layout: Layout,
    /// Appliances that fit nowhere even with every rack up.
    pub unplaced: Vec<String>,
    /// One entry per rack (witnesses run nothing, so they have none).
    pub losses: Vec<Loss>,
    /// Per rack.
    pub disks: Vec<Disk>,
}

impl FailurePlan {
    /// Tier 0–1 appliances that lose their rack in some single failure
    /// (N+1 capacity is not there for them): (dead rack, appliance).
    #[must_use]
    pub fn critical_gaps(&self) -> Vec<(String, String)> {
        self.losses
            .iter()
            .flat_map(|l| {
                l.homeless
                    .iter()
                    .filter(|(_, tier)| *tier <= 1)
                    .map(|(a, _)| (l.rack.clone(), a.clone()))
            })
            .collect()
    }

    /// Racks whose disk is too small.
    pub fn full_disks(&self) -> impl Iterator<Item = &Disk> {
        self.disks.iter().filter(|d| d.need() > d.have)
    }
}

/// The field state the leader would start from: every member's report (its
/// declared capacity) and the whole catalog deployed, running.
fn initial_state(field: &Field) -> FieldState {
    let mut state = FieldState::default();
    for (m, role) in field.plan.members() {
        state.racks.insert(
            m.name.clone(),
            RackReport {
                role,
                site: m.site.clone(),
                cpus: m.cpus,
                memory_mb: m.memory_mb,
                free_bytes: Some(m.disk),
                ..RackReport::default()
            },
        );
    }
    let r = state.apply(&Command::Deploy {
        specs: field.apps.clone(),
    });
    debug_assert_eq!(r, Response::Ok, "Field::load checked the catalog");
    state
}

/// Run placement to its fixed point with `down` racks down.
fn settle(state: &mut FieldState, down: &[&str], now_ms: u64) {
    let views: Vec<RackView> = state
        .racks
        .keys()
        .map(|name| {
            let is_down = down.contains(&name.as_str());
            RackView {
                name: name.clone(),
                up: !is_down,
                down_since_ms: is_down.then_some(0),
            }
        })
        .collect();
    for _ in 0..MAX_ROUNDS {
        let commands = placement::plan(state, &views, now_ms);
        if commands.is_empty() {
            return;
        }
        for c in &commands {
            state.apply(c);
        }
    }
}

fn owners(state: &FieldState) -> BTreeMap<String, String> {
    state
        .apps
        .values()
        .filter_map(|a: &AppRecord| Some((a.spec.name.clone(), a.owner.clone()?)))
        .collect()
}

/// The layout with every rack up (also what `fleet bundle` preloads).
#[must_use]
pub fn layout(field: &Field) -> Layout {
    let mut state = initial_state(field);
    settle(&mut state, &[], 0);
    layout_of(field, &state)
}

fn layout_of(field: &Field, state: &FieldState) -> Layout {
    let owners = owners(state);
    let views: Vec<ReplicaView> = field
        .plan
        .members()
        .map(|(m, role)| ReplicaView {
            rack: m.name.clone(),
            site: m.site.clone(),
            alive: true,
            dying: false,
            witness: role == Role::Witness,
            free_bytes: Some(m.disk),
        })
        .collect();
    let mut copies = BTreeMap::new();
    for a in &field.apps {
        let Some(owner) = owners.get(&a.name) else {
            continue;
        };
        let Some(owner_view) = views.iter().find(|v| &v.rack == owner) else {
            continue;
        };
        for v in &a.volume {
            let mut racks = vec![owner.clone()];
            racks.extend(choose_replicas(
                owner_view,
                &[],
                &views,
                field.plan.replication_factor,
            ));
            copies.insert(v.name.clone(), racks);
        }
    }
    Layout { owners, copies }
}

/// The failure plan of `field`. `file_size` gives a tile pack's size (the
/// CLI reads the file; tests pass numbers).
#[must_use]
pub fn failure_plan(field: &Field, file_size: &dyn Fn(&str) -> u64) -> FailurePlan {
    let mut state = initial_state(field);
    settle(&mut state, &[], 0);
    let layout = layout_of(field, &state);
    // Copies held count for placement: a failover prefers the rack
    // holding the freshest replica, as in the running field.
    for (vol, racks) in &layout.copies {
        for r in racks {
            if let Some(report) = state.racks.get_mut(r) {
                report.volumes.insert(vol.clone(), 1);
            }
        }
    }
    let unplaced = field
        .apps
        .iter()
        .filter(|a| !layout.owners.contains_key(&a.name))
        .map(|a| a.name.clone())
        .collect();
    let tier: BTreeMap<&str, u8> = field
        .apps
        .iter()
        .map(|a| (a.name.as_str(), a.tier))
        .collect();
    let mut losses = Vec::new();
    for rack in &field.plan.racks {
        let mut after = state.clone();
        settle(&mut after, &[&rack.name], 1);
        let now = owners(&after);
        let mut loss = Loss {
            rack: rack.name.clone(),
            moves: Vec::new(),
            preempted: Vec::new(),
            homeless: Vec::new(),
        };
        for (app, before) in &layout.owners {
            // Placement leaves an appliance that fits nowhere with its
            // dead owner (or, preempted earlier in the same rounds, none).
            match now.get(app) {
                Some(to) if to == &rack.name => {
                    loss.homeless.push((app.clone(), tier[app.as_str()]));
                }
                Some(to) if to != before => {
                    loss.moves.push((app.clone(), before.clone(), to.clone()));
                }
                Some(_) => {}
                None if before == &rack.name => {
                    loss.homeless.push((app.clone(), tier[app.as_str()]));
                }
                None => loss.preempted.push(app.clone()),
            }
        }
        losses.push(loss);
    }
    let sizes: BTreeMap<&str, u64> = field
        .apps
        .iter()
        .flat_map(|a| &a.volume)
        .map(|v| (v.name.as_str(), v.size))
        .collect();
    let disks = field
        .plan
        .racks
        .iter()
        .map(|r| Disk {
            rack: r.name.clone(),
            volumes: layout
                .copies
                .iter()
                .filter(|(_, racks)| racks.contains(&r.name))
                .map(|(v, _)| sizes[v.as_str()])
                .sum(),
            tiles: field
                .plan
                .packs_of_site(&r.site)
                .map(|p| file_size(&p.name))
                .sum(),
            have: r.disk,
        })
        .collect();
    FailurePlan {
        layout,
        unplaced,
        losses,
        disks,
    }
}

/// The plan as the operator reads it.
#[must_use]
pub fn render(field: &Field, plan: &FailurePlan) -> String {
    use crate::status::human_bytes;
    let mut out = String::new();
    let p = &field.plan;
    let _ = writeln!(
        out,
        "field {:?}: {} sites, {} racks, {} witnesses, {} appliances, {} tile packs",
        p.fleet,
        p.sites.len(),
        p.racks.len(),
        p.witnesses.len(),
        field.apps.len(),
        p.tile_packs.len()
    );
    let _ = writeln!(out, "\nwith every rack up:");
    for a in &field.apps {
        let owner = plan
            .layout
            .owners
            .get(&a.name)
            .map_or("(nowhere fits)", String::as_str);
        let _ = write!(out, "  {:<20} tier {}  on {owner}", a.name, a.tier);
        for v in &a.volume {
            if let Some(racks) = plan.layout.copies.get(&v.name) {
                let _ = write!(out, "  {} on {}", v.name, racks.join(","));
            }
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "\nif a rack dies:");
    for l in &plan.losses {
        if l.moves.is_empty() && l.preempted.is_empty() && l.homeless.is_empty() {
            let _ = writeln!(out, "  {}: nothing moves", l.rack);
            continue;
        }
        let _ = writeln!(out, "  {}:", l.rack);
        for (app, from, to) in &l.moves {
            let _ = writeln!(out, "    {app}: {from} -> {to}");
        }
        for app in &l.preempted {
            let _ = writeln!(out, "    {app}: stopped to make room");
        }
        for (app, tier) in &l.homeless {
            let mark = if *tier <= 1 { "  NO N+1 CAPACITY" } else { "" };
            let _ = writeln!(out, "    {app} (tier {tier}): does not fit anywhere{mark}");
        }
    }
    let _ = writeln!(out, "\ndisk per rack (volume copies + tile packs / disk):");
    for d in &plan.disks {
        let mark = if d.need() > d.have { "  TOO SMALL" } else { "" };
        let _ = writeln!(
            out,
            "  {:<12} {} + {} / {}{mark}",
            d.rack,
            human_bytes(d.volumes),
            human_bytes(d.tiles),
            human_bytes(d.have)
        );
    }
    let gaps = plan.critical_gaps();
    let full = plan.full_disks().count();
    let _ = writeln!(
        out,
        "\n{}",
        if gaps.is_empty() && full == 0 && plan.unplaced.is_empty() {
            "plan OK: every tier 0-1 appliance survives any single rack loss".to_string()
        } else {
            format!(
                "plan has problems: {} unplaced, {} tier 0-1 gaps at N+1, {full} disks too small",
                plan.unplaced.len(),
                gaps.len()
            )
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = r#"
fleet = "t"
[[site]]
name = "north"
[[site]]
name = "south"
[[rack]]
name = "a"
site = "north"
address = "10.0.0.1"
cpus = 4
memory_mb = 4096
disk = "1G"
[[rack]]
name = "b"
site = "north"
address = "10.0.0.2"
cpus = 4
memory_mb = 4096
disk = "1G"
[[rack]]
name = "c"
site = "south"
address = "10.0.0.3"
cpus = 2
memory_mb = 2048
disk = "100M"
[[witness]]
name = "w"
site = "south"
address = "10.0.0.4"
[[tile_source]]
name = "osm"
url = "http://127.0.0.1:9/{z}/{x}/{y}.png"
[[tile_pack]]
name = "map"
path = "map.mbtiles"
source = "osm"
sites = ["south"]
[[appliance]]
manifest = "apps.toml"
"#;

    fn app(name: &str, tier: u8, cpus: u32, volume: Option<&str>) -> String {
        let mut t = format!(
            "[[appliance]]\nname = \"{name}\"\ndriver = \"process\"\ncommand = [\"/bin/true\"]\ntier = {tier}\ncpus = {cpus}\nmemory_mb = 512\n"
        );
        if let Some(v) = volume {
            t.push_str(&format!(
                "[[appliance.volume]]\nname = \"{v}\"\nsize = \"256M\"\n"
            ));
        }
        t
    }

    fn field(apps: &str) -> Field {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("field.toml"), PLAN).unwrap();
        std::fs::write(d.path().join("apps.toml"), apps).unwrap();
        Field::load(&d.path().join("field.toml")).unwrap()
    }

    #[test]
    fn a_dead_owner_hands_its_appliances_to_the_replica_holder() {
        let f = field(&format!(
            "{}{}",
            app("clinic", 0, 2, Some("clinic-db")),
            app("radio", 1, 1, None)
        ));
        let plan = failure_plan(&f, &|_| 50 << 20);
        let owner = plan.layout.owners["clinic"].clone();
        let copies = &plan.layout.copies["clinic-db"];
        assert_eq!(copies.len(), 2, "replication factor 2: {copies:?}");
        assert_eq!(copies[0], owner);
        assert!(!copies.contains(&"w".to_string()), "never a witness");
        let loss = plan.losses.iter().find(|l| l.rack == owner).unwrap();
        assert!(
            loss.moves
                .contains(&("clinic".into(), owner.clone(), copies[1].clone())),
            "failover goes where the replica is: {loss:?}"
        );
        assert!(plan.critical_gaps().is_empty(), "{plan:?}");
        assert!(plan.unplaced.is_empty());
        assert_eq!(plan.losses.len(), 3, "one per rack, none for the witness");
        let text = render(&f, &plan);
        assert!(
            text.contains(&format!("clinic: {owner} -> {}", copies[1])),
            "{text}"
        );
        // c (100M) cannot hold its 256M copy plus the site's 50M pack.
        assert!(
            text.contains("TOO SMALL") && text.contains("1 disks too small"),
            "{text}"
        );
    }

    #[test]
    fn tier_zero_without_room_at_n_plus_one_is_reported() {
        // Two 4-CPU tier-0 appliances fill a and b; c (2 CPUs) cannot take
        // either, and nothing lower can be preempted.
        let f = field(&format!("{}{}", app("x", 0, 4, None), app("y", 0, 4, None)));
        let plan = failure_plan(&f, &|_| 0);
        let gaps = plan.critical_gaps();
        assert_eq!(gaps.len(), 2, "{plan:?}");
        assert!(render(&f, &plan).contains("NO N+1 CAPACITY"));
    }

    #[test]
    fn lower_tiers_are_preempted_for_tier_zero() {
        // a and b hold the 4-CPU apps; when the tier-0 one's rack dies,
        // the tier-3 one on the other rack is stopped to make room.
        let f = field(&format!(
            "{}{}",
            app("vital", 0, 4, None),
            app("extra", 3, 4, None)
        ));
        let plan = failure_plan(&f, &|_| 0);
        let vital_on = plan.layout.owners["vital"].clone();
        let loss = plan.losses.iter().find(|l| l.rack == vital_on).unwrap();
        assert_eq!(loss.preempted, ["extra"], "{loss:?}");
        assert!(loss.moves.iter().any(|(a, _, _)| a == "vital"), "{loss:?}");
        assert!(plan.critical_gaps().is_empty());
    }

    #[test]
    fn disks_count_volume_copies_and_site_packs() {
        let f = field(&app("clinic", 0, 1, Some("clinic-db")));
        let plan = failure_plan(&f, &|name| {
            assert_eq!(name, "map");
            60 << 20
        });
        let total: u64 = plan.disks.iter().map(|d| d.volumes).sum();
        assert_eq!(total, 2 * (256 << 20), "two copies: {plan:?}");
        let c = plan.disks.iter().find(|d| d.rack == "c").unwrap();
        assert_eq!(c.tiles, 60 << 20, "site south carries the pack");
        let a = plan.disks.iter().find(|d| d.rack == "a").unwrap();
        assert_eq!(a.tiles, 0);
        // c has 100M: the pack fits, a 256M copy would not.
        let full: Vec<_> = plan.full_disks().map(|d| d.rack.clone()).collect();
        let c_holds = plan.layout.copies["clinic-db"].contains(&"c".to_string());
        assert_eq!(full.contains(&"c".to_string()), c_holds, "{plan:?}");
    }
}
