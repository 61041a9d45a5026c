use std::path::Path;

use super::*;

/// A valid plan: two sites, three racks, a witness, a tile pack.
pub(crate) const GOOD: &str = r#"
fleet = "haiti"

[[site]]
name = "north"
[[site]]
name = "south"

[[rack]]
name = "a"
site = "north"
address = "10.0.0.1"
power = "nut"
cpus = 8
memory_mb = 16384
disk = "1T"

[[rack]]
name = "b"
site = "north"
address = "10.0.0.2"
cpus = 8
memory_mb = 16384
disk = "1T"

[[rack]]
name = "c"
site = "south"
address = "10.0.0.3"
cpus = 4
memory_mb = 8192
disk = "500G"

[[witness]]
name = "w"
site = "south"
address = "10.0.0.4"

[[tile_source]]
name = "osm"
url = "https://tile.example.org/{z}/{x}/{y}.png"

[[tile_pack]]
name = "haiti"
path = "tiles/haiti.mbtiles"
source = "osm"
sites = ["north"]
"#;

fn parse(text: &str) -> Result<FieldPlan, FieldError> {
    FieldPlan::parse(text, Path::new("field.toml"))
}

#[test]
fn a_good_plan_parses_with_defaults() {
    let p = parse(GOOD).unwrap();
    assert_eq!(p.valid_days, 365);
    assert_eq!(p.replication_factor, 2);
    assert_eq!(p.racks[0].power, PowerSpec::Nut);
    assert_eq!(p.racks[1].power, PowerSpec::Grid);
    assert_eq!(p.racks[2].disk, 500 << 30);
    assert_eq!(p.racks[0].ports.bulk(), 7401);
    let roles: Vec<_> = p.members().map(|(m, r)| (m.name.as_str(), r)).collect();
    assert_eq!(
        roles,
        [
            ("a", Role::Rack),
            ("b", Role::Rack),
            ("c", Role::Rack),
            ("w", Role::Witness)
        ]
    );
    assert_eq!(p.packs_of_site("north").count(), 1);
    assert_eq!(p.packs_of_site("south").count(), 0);
}

/// Each mutation of [`GOOD`] is refused with an error naming the field.
#[test]
fn refusals_name_the_field() {
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str)] = &[
        ("fleet = \"haiti\"", "fleet = \" \"", "invalid `fleet`"),
        ("fleet = \"haiti\"", "fleet = \"haiti\"\nvalid_days = 0", "invalid `valid_days`"),
        ("fleet = \"haiti\"", "fleet = \"haiti\"\nreplication_factor = 9", "invalid `replication_factor`"),
        ("name = \"south\"", "name = \"north\"", "invalid `site[1].name`"),
        ("name = \"b\"", "name = \"a\"", "invalid `rack[1].name`"),
        ("name = \"w\"", "name = \"c\"", "invalid `witness[0].name`"),
        ("name = \"b\"", "name = \"B\"", "invalid `rack[1].name`"),
        ("site = \"south\"\naddress = \"10.0.0.3\"", "site = \"east\"\naddress = \"10.0.0.3\"", "invalid `rack[2].site`"),
        ("address = \"10.0.0.2\"", "address = \"10.0.0.1\"", "invalid `rack[1].address`"),
        ("address = \"10.0.0.4\"", "address = \"0.0.0.0\"", "invalid `witness[0].address`"),
        ("address = \"10.0.0.2\"", "address = \"10.0.0.2\"\nports = { api = 3128 }", "invalid `rack[1].ports.proxy`"),
        ("address = \"10.0.0.2\"", "address = \"10.0.0.2\"\nports = { mesh = 0 }", "invalid `rack[1].ports`"),
        ("cpus = 4", "cpus = 0", "invalid `rack[2].cpus`"),
        ("memory_mb = 8192", "memory_mb = 0", "invalid `rack[2].memory_mb`"),
        ("disk = \"500G\"", "disk = 0", "invalid `rack[2].disk`"),
        ("path = \"tiles/haiti.mbtiles\"", "path = \"tiles/haiti.zip\"", "invalid `tile_pack[0].path`"),
        ("sites = [\"north\"]", "sites = []", "invalid `tile_pack[0].sites`"),
        ("sites = [\"north\"]", "sites = [\"north\", \"west\"]", "invalid `tile_pack[0].sites[1]`"),
        ("name = \"haiti\"", "name = \"Haiti\"", "invalid `tile_pack[0].name`"),
        ("source = \"osm\"", "source = \"topo\"", "invalid `tile_pack[0].source`"),
        ("name = \"osm\"", "name = \"OSM\"", "invalid `tile_source[0].name`"),
        ("{z}/{x}/{y}.png", "{x}/{y}.png", "invalid `tile_source[0].url`"),
    ];
    for (from, to, want) in cases {
        assert!(GOOD.contains(from), "{from:?} not in GOOD");
        let text = GOOD.replacen(from, to, 1);
        let err = parse(&text).expect_err(to).to_string();
        assert!(err.starts_with("field.toml: "), "{err}");
        assert!(err.contains(want), "{to:?}: want {want:?}, got {err}");
    }
    // No rack at all.
    let err = parse("fleet = \"x\"\n").unwrap_err().to_string();
    assert!(err.contains("invalid `rack`"), "{err}");
}

#[test]
fn unknown_keys_and_bad_types_are_refused_naming_the_key() {
    let err = parse(&GOOD.replacen("cpus = 8", "cpus = 8\ngpus = 1", 1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("gpus"), "{err}");
    let err = parse(&GOOD.replacen("power = \"nut\"", "power = \"wind\"", 1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("wind"), "{err}");
}

#[test]
fn more_than_the_field_limit_is_refused() {
    let mut text = String::from("fleet = \"x\"\n[[site]]\nname = \"s\"\n");
    for i in 0..=MAX_FIELD_RACKS {
        text.push_str(&format!(
            "[[rack]]\nname = \"r{i}\"\nsite = \"s\"\naddress = \"10.0.{}.{}\"\ncpus = 1\nmemory_mb = 1\ndisk = 1\n",
            i / 200,
            i % 200 + 1
        ));
    }
    let err = parse(&text).unwrap_err().to_string();
    assert!(
        err.contains("invalid `rack`") && err.contains("at most 32"),
        "{err}"
    );
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

const CLINIC: &str = r#"
[[appliance]]
name = "clinic"
driver = "process"
command = ["/bin/true"]
tier = 0
[[appliance.volume]]
name = "clinic-db"
size = "64M"
"#;

#[test]
fn load_reads_manifests_and_checks_images() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "apps/clinic.toml", CLINIC);
    let catalog = "\n[[appliance]]\nmanifest = \"apps/clinic.toml\"\nimages = { clinic-db = \"img/db.img\" }\n";
    write(d.path(), "field.toml", &format!("{GOOD}{catalog}"));
    let f = Field::load(&d.path().join("field.toml")).unwrap();
    assert_eq!(f.apps.len(), 1);
    assert_eq!(f.images["clinic-db"], d.path().join("img/db.img"));
    assert_eq!(f.packs["haiti"], d.path().join("tiles/haiti.mbtiles"));

    // An image for a volume no appliance has.
    write(
        d.path(),
        "field.toml",
        &format!("{GOOD}{}", catalog.replace("clinic-db =", "nope =")),
    );
    let err = Field::load(&d.path().join("field.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid `appliance[0].images.nope`"), "{err}");

    // A broken manifest is named through the catalog entry.
    write(
        d.path(),
        "apps/clinic.toml",
        &CLINIC.replace("tier = 0", "tier = 9"),
    );
    write(d.path(), "field.toml", &format!("{GOOD}{catalog}"));
    let err = Field::load(&d.path().join("field.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("invalid `appliance[0].manifest`") && err.contains("tier"),
        "{err}"
    );

    // The same appliance twice.
    write(d.path(), "apps/clinic.toml", CLINIC);
    write(
        d.path(),
        "field.toml",
        &format!("{GOOD}{catalog}\n[[appliance]]\nmanifest = \"apps/clinic.toml\"\n"),
    );
    let err = Field::load(&d.path().join("field.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid `appliance[1].manifest`"), "{err}");

    // A missing file names itself.
    let err = Field::load(&d.path().join("nope.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.toml"), "{err}");
}
