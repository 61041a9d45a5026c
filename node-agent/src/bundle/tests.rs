use std::os::unix::fs::PermissionsExt;

use super::*;

/// Two racks on two sites and a witness; one appliance with a 1 MiB image;
/// a tile pack on the north site.
const FIELD: &str = r#"
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
site = "south"
address = "10.0.0.2"
power = "generator"
cpus = 4
memory_mb = 4096
disk = "1G"
[[witness]]
name = "w"
site = "south"
address = "10.0.0.3"
[[appliance]]
manifest = "apps.toml"
images = { db = "db.img" }
[[tile_source]]
name = "osm"
url = "http://127.0.0.1:9/{z}/{x}/{y}.png"
[[tile_pack]]
name = "map"
path = "map.mbtiles"
source = "osm"
sites = ["north"]
"#;

const APPS: &str = r#"
[[appliance]]
name = "clinic"
driver = "process"
command = ["/bin/true"]
tier = 0
memory_mb = 256
[[appliance.volume]]
name = "db"
size = "1M"
"#;

/// A field directory and its bundles.
struct Built {
    laptop: tempfile::TempDir,
    out: PathBuf,
    image: Vec<u8>,
}

fn build_field() -> Built {
    let laptop = tempfile::tempdir().unwrap();
    let d = laptop.path();
    std::fs::write(d.join("field.toml"), FIELD).unwrap();
    std::fs::write(d.join("apps.toml"), APPS).unwrap();
    let image: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(d.join("db.img"), &image).unwrap();
    std::fs::write(d.join("map.mbtiles"), b"SQLite format 3\0 pretend tiles").unwrap();
    let out = d.join("bundles");
    let mut steps = Vec::new();
    let built = build(
        &d.join("field.toml"),
        &out,
        &d.join("fleet"),
        &mut |what, _, _| {
            steps.push(what.to_string());
        },
    )
    .unwrap();
    assert_eq!(
        built.iter().map(|b| b.rack.as_str()).collect::<Vec<_>>(),
        ["a", "b", "w"]
    );
    assert!(steps.iter().any(|s| s.contains("volume db")), "{steps:?}");
    assert!(steps.iter().any(|s| s.contains("hashing")), "{steps:?}");
    Built { laptop, out, image }
}

fn no_progress() -> impl FnMut(u64, u64) {
    |_, _| {}
}

#[test]
fn bundles_verify_install_and_preload_every_copy() {
    let b = build_field();
    let (fleet, key) = fleet::load(&b.laptop.path().join("fleet")).unwrap();
    assert_eq!(
        fleet.racks.len(),
        3,
        "fleet.toml lists the racks for revoke"
    );
    for rack in ["a", "b", "w"] {
        let v = verify(&b.out.join(rack), Some(&key.public()), &mut no_progress()).unwrap();
        assert_eq!(v.body.rack, rack);
        assert_eq!(v.config.mesh.bootstrap.len(), 2, "every other member");
    }
    let a = verify(&b.out.join("a"), None, &mut no_progress()).unwrap();
    assert!(a.body.files.contains_key("tiles/osm/map.mbtiles"));
    assert!(a.body.files.contains_key("systemd/fieldrack.service"));
    let bv = verify(&b.out.join("b"), None, &mut no_progress()).unwrap();
    assert!(
        !bv.body.files.keys().any(|f| f.starts_with("tiles/")),
        "south has no pack"
    );
    assert_eq!(
        bv.config.power.file.as_deref(),
        Some(Path::new(GENERATOR_FILE))
    );

    // Install a and b under their own roots; both hold generation 1 of
    // db, exactly one the live image.
    let mut owners = 0;
    for rack in ["a", "b"] {
        let root = tempfile::tempdir().unwrap();
        let bin = Path::new("/opt/fieldrack/bin/fieldrack");
        let done = install(
            &b.out.join(rack),
            root.path(),
            Some(&key.public()),
            bin,
            &mut |_, _, _| {},
        )
        .unwrap();
        assert!(matches!(done.systemd, SystemdOutcome::Skipped(_)));
        assert!(!done.data_kept);
        let config = RackConfig::load(&done.config).unwrap();
        assert_eq!(
            config.data_dir.canonicalize().unwrap(),
            root.path().join(VAR_DIR).canonicalize().unwrap(),
            "rack.toml finds its data under any root"
        );
        for secret in ["identity.key", API_TOKEN_FILE] {
            let mode = std::fs::metadata(root.path().join(ETC_DIR).join(secret))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{secret}");
        }
        let unit = std::fs::read_to_string(&done.unit).unwrap();
        assert!(unit.contains("Type=notify"), "{unit}");
        assert!(
            unit.contains(&format!("WatchdogSec={WATCHDOG_SEC}")),
            "{unit}"
        );
        assert!(unit.contains("Restart=on-failure"), "{unit}");
        assert!(
            unit.contains(&format!(
                "ExecStart={} agent --config {}",
                bin.display(),
                done.config.display()
            )),
            "{unit}"
        );
        let store = VolumeStore::open(config.data_dir.join(STORE_DIR)).unwrap();
        assert_eq!(store.latest("db").unwrap().unwrap().generation, 1);
        if store.owns("db").unwrap() {
            owners += 1;
            assert_eq!(std::fs::read(store.image_path("db")).unwrap(), b.image);
        }
        let packs = root
            .path()
            .join(VAR_DIR)
            .join(TILE_PACKS_DIR)
            .join("osm")
            .join("map.mbtiles");
        assert_eq!(packs.exists(), rack == "a");
        // Every rack serves the field's tile sources.
        assert_eq!(config.tile_source.len(), 1);
        assert_eq!(config.tile_source[0].name, "osm");
        // A second install keeps the data and refreshes the config.
        drop(store);
        let again = install(&b.out.join(rack), root.path(), None, bin, &mut |_, _, _| {}).unwrap();
        assert!(again.data_kept);
    }
    assert_eq!(owners, 1, "one owner, one replica");
}

#[test]
fn a_flipped_byte_an_extra_file_or_a_foreign_key_is_refused_naming_the_file() {
    let b = build_field();
    let dir = b.out.join("a");
    let (_, key) = fleet::load(&b.laptop.path().join("fleet")).unwrap();
    // One flipped byte deep in the volume store.
    let victim = verify(&dir, None, &mut no_progress())
        .unwrap()
        .body
        .files
        .iter()
        .filter(|(f, _)| f.starts_with("data/"))
        .max_by_key(|(_, h)| h.size)
        .map(|(f, _)| f.clone())
        .unwrap();
    let path = dir.join(&victim);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = verify(&dir, Some(&key.public()), &mut no_progress()).unwrap_err();
    assert!(
        matches!(&err, VerifyError::Mismatch { file, .. } if *file == victim),
        "{err}"
    );
    assert!(err.to_string().starts_with(&victim), "{err}");
    let root = tempfile::tempdir().unwrap();
    let refused = install(&dir, root.path(), None, Path::new("/x"), &mut |_, _, _| {}).unwrap_err();
    assert!(format!("{refused:#}").contains(&victim), "{refused:#}");
    assert!(!root.path().join(ETC_DIR).exists(), "nothing installed");
    bytes[mid] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    verify(&dir, None, &mut no_progress()).unwrap();

    // A file slipped in.
    std::fs::write(dir.join("config/extra.sh"), b"#!/bin/sh").unwrap();
    let err = verify(&dir, None, &mut no_progress()).unwrap_err();
    assert!(
        matches!(&err, VerifyError::Unlisted(f) if f == "config/extra.sh"),
        "{err}"
    );
    std::fs::remove_file(dir.join("config/extra.sh")).unwrap();

    // A listed file removed.
    let cert = std::fs::read(dir.join("config/rack.cert")).unwrap();
    std::fs::remove_file(dir.join("config/rack.cert")).unwrap();
    let err = verify(&dir, None, &mut no_progress()).unwrap_err();
    assert!(
        matches!(&err, VerifyError::Missing(f) if f == "config/rack.cert"),
        "{err}"
    );
    std::fs::write(dir.join("config/rack.cert"), cert).unwrap();

    // Another fleet's key: the manifest is refused.
    let other = FleetKey::generate();
    let err = verify(&dir, Some(&other.public()), &mut no_progress()).unwrap_err();
    assert!(
        matches!(err, VerifyError::Manifest(BundleError::BadSignature)),
        "{err}"
    );
    assert!(err.to_string().starts_with(BUNDLE_MANIFEST), "{err}");

    // A bundle re-signed by another fleet but keeping our rack.toml: the
    // config names a key that did not sign it.
    let body = verify(&dir, None, &mut no_progress()).unwrap().body;
    std::fs::write(
        dir.join(BUNDLE_MANIFEST),
        other.sign_bundle(&body).to_json(),
    )
    .unwrap();
    let err = verify(&dir, None, &mut no_progress()).unwrap_err();
    assert!(
        matches!(err, VerifyError::Manifest(BundleError::BadSignature)),
        "{err}"
    );
    let err = verify(&dir, Some(&other.public()), &mut no_progress()).unwrap_err();
    assert!(matches!(err, VerifyError::Config(_)), "{err}");
    assert!(err.to_string().starts_with("config/rack.toml"), "{err}");
}

#[test]
fn a_second_build_into_the_same_directory_is_refused() {
    let b = build_field();
    let d = b.laptop.path();
    let err = build(
        &d.join("field.toml"),
        &b.out,
        &d.join("fleet"),
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("exists"), "{err:#}");
}
