//! Rack bundles: built on the provisioning laptop from a `field.toml`
//! (`fieldrack fleet bundle`), verified and installed on the rack
//! (`fieldrack install`).
//!
//! ```text
//! OUT/<rack>/bundle.json            signed manifest: BLAKE3 of every file below
//! OUT/<rack>/config/rack.toml       the rack's config
//! OUT/<rack>/config/identity.key    its libp2p key (0600)
//! OUT/<rack>/config/rack.cert       its certificate
//! OUT/<rack>/config/api-token       the admin API token (0600)
//! OUT/<rack>/config/appliances.toml the field's appliance catalog
//! OUT/<rack>/systemd/fieldrack.service
//! OUT/<rack>/data/volumes/...       preloaded volume store (racks only):
//!                                   each volume it owns (live image and
//!                                   generation 1) or replicates (generation 1)
//! OUT/<rack>/tiles/<source>/<pack>.mbtiles  the tile packs of its site,
//!                                   by the tile source they fill
//! ```
//!
//! Installed (under `--root`, `/` by default):
//!
//! ```text
//! /etc/fieldrack/                   config/* and bundle.json, byte for byte
//! /var/lib/fieldrack/               data/* (the rack's data_dir)
//! /var/lib/fieldrack/tile-packs/    tiles/* (imported into the map cache
//!                                   at start: crate::tile_packs)
//! /etc/systemd/system/fieldrack.service
//! ```
//!
//! `rack.toml` names its data directory relative to itself
//! (`../../var/lib/fieldrack`), so the same bytes work under any root and
//! `fieldrack doctor` can check installed files against the signed hashes.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use datastore::volume::VolumeStore;
use deploy::bundle::{
    BundleBody, BundleError, FileHash, SignedBundle, BUNDLE_MANIFEST, BUNDLE_VERSION,
    MAX_MANIFEST_LEN,
};
use deploy::cert::decode_public_key;
use deploy::config::{
    ApiConfig, BulkConfig, FleetRef, MeshConfig, NutConfig, PowerConfig, ProxyConfig, RackConfig,
    API_TOKEN_FILE,
};
use deploy::field::{Field, MemberSpec, PowerSpec, GENERATOR_FILE};
use deploy::{FleetKey, Role};
use libp2p::identity::{ed25519, Keypair};
use libp2p::PeerId;
use util::fs::{write_durable, PUBLIC, SECRET};
use util::time::unix_secs;

use crate::field_plan;
use crate::fleet::{self, FleetFile, FleetRack};
use crate::volumes::STORE_DIR;

/// Bundle directory of configuration files.
pub const CONFIG_DIR: &str = "config";
/// Bundle directory of the data directory's preloaded content.
pub const DATA_DIR: &str = "data";
/// Bundle directory of tile packs.
pub const TILES_DIR: &str = "tiles";
/// Bundle directory of the systemd unit.
pub const SYSTEMD_DIR: &str = "systemd";
/// The unit's name.
pub const UNIT_NAME: &str = "fieldrack.service";
/// The catalog file beside rack.toml.
pub const APPLIANCES_FILE: &str = "appliances.toml";

/// Where configuration is installed, under the root.
pub const ETC_DIR: &str = "etc/fieldrack";
/// The data directory, under the root.
pub const VAR_DIR: &str = "var/lib/fieldrack";
/// Tile packs, under the data directory.
pub const TILE_PACKS_DIR: &str = "tile-packs";
/// Where the unit is installed, under the root.
pub const UNIT_DIR: &str = "etc/systemd/system";
/// The binary the bundled unit runs.
pub const DEFAULT_BINARY: &str = "/usr/local/bin/fieldrack";

/// `WatchdogSec` of the unit: the agent feeds it every half of this. Long
/// enough that a 2-core rack under a full import never misses it, short
/// enough that a wedged agent is restarted before its lease (and the
/// field's failover) would make the restart pointless.
pub const WATCHDOG_SEC: u64 = 30;

/// Bytes read at a time while hashing and copying.
const IO_BUF: usize = 1 << 20;

/// The systemd unit of a rack.
#[must_use]
pub fn systemd_unit(rack: &str, binary: &str, config: &str) -> String {
    format!(
        "[Unit]\n\
         Description=Fieldrack agent (rack {rack})\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         Type=notify\n\
         NotifyAccess=main\n\
         ExecStart={binary} agent --config {config}\n\
         WatchdogSec={WATCHDOG_SEC}\n\
         Restart=on-failure\n\
         RestartSec=2\n\
         TimeoutStopSec=30\n\
         LimitNOFILE=65536\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// One bundle written by [`build`].
#[derive(Debug, Clone)]
pub struct Built {
    /// The rack.
    pub rack: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Files listed in its manifest.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// `fieldrack fleet bundle`: one signed bundle per rack and witness of
/// `field_toml` under `out`, signed by the key in `fleet_dir` (created
/// there, with `fleet.toml`, if missing, so `fleet revoke --dir` works
/// later). `progress(what, done, total)` reports long steps.
///
/// # Errors
/// The plan is refused, a file cannot be read or written, an image cannot
/// be imported.
pub fn build(
    field_toml: &Path,
    out: &Path,
    fleet_dir: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Vec<Built>> {
    let field = Field::load(field_toml)?;
    let plan = &field.plan;
    let key = fleet_key(fleet_dir, &plan.fleet, plan.valid_days)?;
    for (name, path) in field.images.iter().chain(&field.packs) {
        if !path.is_file() {
            bail!("{name}: {} is not a readable file", path.display());
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Identities first: every rack's bootstrap list names every other's PeerId.
    let mut ids = BTreeMap::new();
    for (m, role) in plan.members() {
        let dir = out.join(&m.name);
        if dir.exists() {
            bail!(
                "{} exists: bundles are built once (new identities each time); remove it first",
                dir.display()
            );
        }
        let (identity, cert) =
            fleet::issue_identity(&key, &plan.fleet, &m.name, role, &m.site, plan.valid_days);
        ids.insert(m.name.clone(), (identity, cert, role));
    }
    let layout = field_plan::layout(&field);
    let catalog = deploy::appliance::to_toml(&pinned_catalog(&field, &layout));
    let mut fleet_file = FleetFile {
        name: plan.fleet.clone(),
        public_key: key.public_key_b64(),
        local: false,
        valid_days: plan.valid_days,
        racks: Vec::new(),
    };
    let mut built = Vec::new();
    for (m, role) in plan.members() {
        let dir = out.join(&m.name);
        let cfg = dir.join(CONFIG_DIR);
        std::fs::create_dir_all(&cfg)?;
        let (identity, cert, _) = &ids[&m.name];
        write_durable(
            &cfg.join("identity.key"),
            &identity
                .to_protobuf_encoding()
                .context("encoding identity")?,
            SECRET,
        )?;
        write_durable(&cfg.join("rack.cert"), cert.to_json().as_bytes(), PUBLIC)?;
        write_durable(
            &cfg.join(API_TOKEN_FILE),
            fleet::new_api_token().as_bytes(),
            SECRET,
        )?;
        let config = rack_config(&field, &key, m, role, &ids);
        write_durable(&cfg.join("rack.toml"), config.to_toml().as_bytes(), PUBLIC)?;
        write_durable(&cfg.join(APPLIANCES_FILE), catalog.as_bytes(), PUBLIC)?;
        let sd = dir.join(SYSTEMD_DIR);
        std::fs::create_dir_all(&sd)?;
        let unit = systemd_unit(&m.name, DEFAULT_BINARY, "/etc/fieldrack/rack.toml");
        write_durable(&sd.join(UNIT_NAME), unit.as_bytes(), PUBLIC)?;
        if role == Role::Rack {
            preload_volumes(&field, &layout, &m.name, &dir, progress)?;
            let tiles = dir.join(TILES_DIR);
            for pack in plan.packs_of_site(&m.site) {
                // tiles/<source>/<file>: the rack imports it into that
                // source (crate::tile_packs).
                let into = tiles.join(&pack.source);
                std::fs::create_dir_all(&into)?;
                let src = &field.packs[&pack.name];
                let name = src.file_name().context("a tile pack names a file")?;
                let what = format!("{}: tile pack {}", m.name, pack.name);
                copy_file(src, &into.join(name), PUBLIC, &mut |d, t| {
                    progress(&what, d, t)
                })?;
            }
        }
        let body = manifest_of(&dir, &plan.fleet, &m.name, &mut |d, t| {
            progress(&format!("{}: hashing", m.name), d, t);
        })?;
        let signed = key.sign_bundle(&body);
        write_durable(
            &dir.join(BUNDLE_MANIFEST),
            signed.to_json().as_bytes(),
            PUBLIC,
        )?;
        fleet_file.racks.push(FleetRack {
            name: m.name.clone(),
            peer_id: PeerId::from(identity.public()).to_base58(),
            role,
            site: m.site.clone(),
            mesh: config.mesh.listen[0].clone(),
            api: config.api.listen.clone(),
            revoked: false,
        });
        built.push(Built {
            rack: m.name.clone(),
            dir,
            files: body.files.len(),
            bytes: body.files.values().map(|f| f.size).sum(),
        });
    }
    fleet::save_fleet(fleet_dir, &fleet_file)?;
    Ok(built)
}

/// The catalog as bundled: an appliance whose manifest names no preferred
/// rack prefers the rack the plan placed it on, the one its preloaded
/// live image is on (placement would otherwise be free to pick any rack
/// holding a copy, depending on which reported first, and the preloaded
/// owner would hand its image over on the first day).
fn pinned_catalog(field: &Field, layout: &field_plan::Layout) -> Vec<deploy::ApplianceSpec> {
    field
        .apps
        .iter()
        .map(|a| {
            let mut a = a.clone();
            if a.placement.racks.is_empty() {
                if let Some(owner) = layout.owners.get(&a.name) {
                    a.placement.racks.push(owner.clone());
                }
            }
            a
        })
        .collect()
}

/// The fleet key in `dir`, created (with the directory) if missing.
fn fleet_key(dir: &Path, name: &str, valid_days: u64) -> Result<FleetKey> {
    if dir.join(fleet::FLEET_KEY_FILE).exists() {
        let (f, key) = fleet::load(dir)?;
        if f.name != name {
            bail!(
                "{} holds fleet {:?}, the plan is for {name:?}",
                dir.display(),
                f.name
            );
        }
        return Ok(key);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = FleetKey::generate();
    write_durable(
        &dir.join(fleet::FLEET_KEY_FILE),
        key.to_secret_b64().as_bytes(),
        SECRET,
    )?;
    fleet::save_fleet(
        dir,
        &FleetFile {
            name: name.into(),
            public_key: key.public_key_b64(),
            local: false,
            valid_days,
            racks: Vec::new(),
        },
    )?;
    Ok(key)
}

/// The `rack.toml` of member `m`.
fn rack_config(
    field: &Field,
    key: &FleetKey,
    m: &MemberSpec,
    role: Role,
    ids: &BTreeMap<String, (Keypair, deploy::Certificate, Role)>,
) -> RackConfig {
    let plan = &field.plan;
    let ip = |a: &std::net::IpAddr| match a {
        std::net::IpAddr::V4(v) => format!("/ip4/{v}"),
        std::net::IpAddr::V6(v) => format!("/ip6/{v}"),
    };
    let unspecified = if m.address.is_ipv4() {
        "/ip4/0.0.0.0"
    } else {
        "/ip6/::"
    };
    let bootstrap = plan
        .members()
        .filter(|(o, _)| o.name != m.name)
        .map(|(o, _)| {
            let peer = PeerId::from(ids[&o.name].0.public());
            format!("{}/udp/{}/quic-v1/p2p/{peer}", ip(&o.address), o.ports.mesh)
        })
        .collect();
    let power = match m.power {
        PowerSpec::Grid => PowerConfig::default(),
        PowerSpec::Nut => PowerConfig {
            nut: Some(NutConfig {
                addr: "127.0.0.1:3493".into(),
                ups: "ups".into(),
                username: None,
                password: None,
            }),
            ..PowerConfig::default()
        },
        PowerSpec::Generator => PowerConfig {
            file: Some(GENERATOR_FILE.into()),
            ..PowerConfig::default()
        },
    };
    let bulk_host = if m.address.is_ipv4() {
        "0.0.0.0"
    } else {
        "[::]"
    };
    RackConfig {
        rack: m.name.clone(),
        role,
        site: m.site.clone(),
        fleet: FleetRef {
            name: plan.fleet.clone(),
            public_key: key.public_key_b64(),
        },
        data_dir: PathBuf::from("../..").join(VAR_DIR),
        identity_key: "identity.key".into(),
        certificate: "rack.cert".into(),
        mesh: MeshConfig {
            listen: vec![format!("{unspecified}/udp/{}/quic-v1", m.ports.mesh)],
            bootstrap,
            ..MeshConfig::default()
        },
        membership: Default::default(),
        api: ApiConfig {
            listen: format!("127.0.0.1:{}", m.ports.api),
        },
        power,
        capacity: deploy::config::Capacity {
            cpus: m.cpus,
            memory_mb: m.memory_mb,
        },
        volumes: deploy::config::VolumesConfig {
            replication_factor: plan.replication_factor,
            ..Default::default()
        },
        control: Default::default(),
        bulk: BulkConfig {
            listen: format!("{bulk_host}:{}", m.ports.bulk()),
            ..BulkConfig::default()
        },
        proxy: (role == Role::Rack).then(|| ProxyConfig {
            listen: std::net::SocketAddr::new(
                if m.address.is_ipv4() {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                },
                m.ports.proxy,
            ),
            allow_networks: [
                "127.0.0.0/8",
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "fd00::/8",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            backhaul: plan.backhaul.clone(),
            ..ProxyConfig::default()
        }),
        tile_source: plan.tile_sources.clone(),
        log: Default::default(),
        console: Default::default(),
    }
}

/// Import every image `rack` holds a copy of into the bundle's volume
/// store with the datastore's own import (real chunks and manifests):
/// the owner keeps the live image, a replica only the generation.
fn preload_volumes(
    field: &Field,
    layout: &field_plan::Layout,
    rack: &str,
    dir: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<()> {
    let mine: Vec<(&String, bool)> = layout
        .copies
        .iter()
        .filter(|(v, racks)| field.images.contains_key(*v) && racks.iter().any(|r| r == rack))
        .map(|(v, racks)| (v, racks[0] == rack))
        .collect();
    if mine.is_empty() {
        return Ok(());
    }
    let store_dir = dir.join(DATA_DIR).join(STORE_DIR);
    std::fs::create_dir_all(&store_dir)?;
    let store = VolumeStore::open(&store_dir)
        .with_context(|| format!("opening a volume store in {}", store_dir.display()))?;
    for (volume, owner) in mine {
        let image = &field.images[volume];
        let what = format!("{rack}: volume {volume}");
        let m = store
            .import(volume, image, &mut |d, t| progress(&what, d, t))
            .with_context(|| format!("importing {} as {volume}", image.display()))?;
        if !owner {
            // A replica holds the generation, not the live image.
            let live = store.image_path(volume);
            std::fs::remove_file(&live).with_context(|| format!("removing {}", live.display()))?;
        }
        tracing::info!(rack, volume, generation = m.generation, owner, "preloaded");
    }
    drop(store);
    // The store empties tmp/ (dirty-tracking clones) on open, and
    // recreates both directories: not bundle content.
    let tmp = store_dir.join("tmp");
    std::fs::remove_dir_all(&tmp).with_context(|| format!("emptying {}", tmp.display()))?;
    let _ = std::fs::remove_dir(store_dir.join("volumes"));
    Ok(())
}

/// Copy `from` to `to` (mode `mode`), synced.
fn copy_file(from: &Path, to: &Path, mode: u32, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut src =
        std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let total = src.metadata()?.len();
    if let Some(p) = to.parent() {
        std::fs::create_dir_all(p)?;
    }
    let mut tmp_name = to.file_name().context("a file name")?.to_owned();
    tmp_name.push(".partial");
    let tmp = to.with_file_name(tmp_name);
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let mut buf = vec![0u8; IO_BUF];
    let mut done = 0;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])?;
        done += n as u64;
        progress(done, total);
    }
    dst.sync_all()?;
    drop(dst);
    util::fs::rename_durable(&tmp, to)
        .with_context(|| format!("renaming into {}", to.display()))?;
    Ok(())
}

/// BLAKE3 and size of one file.
///
/// # Errors
/// Reading it.
pub fn hash_file(path: &Path, progress: &mut dyn FnMut(u64)) -> std::io::Result<FileHash> {
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; IO_BUF];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
        progress(n as u64);
    }
    Ok(FileHash {
        size,
        blake3: h.finalize().to_hex().to_string(),
    })
}

/// Every regular file under `dir` (relative, `/`-separated, sorted), the
/// signed manifest excepted. Anything else (a symlink, a device) is an
/// error: a bundle holds plain files.
fn walk(dir: &Path) -> std::io::Result<Vec<String>> {
    fn go(root: &Path, rel: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(root.join(rel))? {
            let entry = entry?;
            let ty = entry.file_type()?;
            let path = rel.join(entry.file_name());
            if ty.is_dir() {
                go(root, &path, out)?;
            } else if ty.is_file() {
                out.push(path.to_string_lossy().into_owned());
            } else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is not a plain file", path.display()),
                ));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    go(dir, Path::new(""), &mut out)?;
    out.retain(|p| p != BUNDLE_MANIFEST);
    out.sort();
    Ok(out)
}

fn manifest_of(
    dir: &Path,
    fleet: &str,
    rack: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<BundleBody> {
    let files = walk(dir)?;
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len()))
        .sum();
    let mut done = 0;
    let mut hashes = BTreeMap::new();
    for f in files {
        let h = hash_file(&dir.join(&f), &mut |n| {
            done += n;
            progress(done, total);
        })
        .with_context(|| format!("hashing {f}"))?;
        hashes.insert(f, h);
    }
    Ok(BundleBody {
        version: BUNDLE_VERSION,
        fleet: fleet.into(),
        rack: rack.into(),
        created_at: unix_secs(),
        files: hashes,
    })
}

/// Why a bundle was refused. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file, relative to the bundle.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The signed manifest is refused (foreign, altered, malformed).
    #[error("{BUNDLE_MANIFEST}: {0}")]
    Manifest(#[from] BundleError),
    /// `config/rack.toml` is unusable or does not match the manifest.
    #[error("config/rack.toml: {0}")]
    Config(String),
    /// A listed file is absent.
    #[error("{0}: listed in the signed manifest but missing")]
    Missing(String),
    /// A file that the manifest does not list.
    #[error("{0}: not in the signed manifest")]
    Unlisted(String),
    /// A file whose content is not what was signed.
    #[error("{file}: content does not match the signed hash (expected {expected}, found {found})")]
    Mismatch {
        /// The file.
        file: String,
        /// Signed BLAKE3.
        expected: String,
        /// Found BLAKE3.
        found: String,
    },
}

/// A verified bundle.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The manifest.
    pub body: BundleBody,
    /// Its rack.toml.
    pub config: RackConfig,
    /// The key that signed it.
    pub fleet_key: ed25519::PublicKey,
}

/// Verify the bundle in `dir`: the manifest's signature against
/// `fleet_key` (without one, the key in the bundle's own rack.toml, which
/// then only proves the bundle is intact), that the manifest is for the
/// rack and fleet of its rack.toml, then every file's hash, and that no
/// file is unlisted.
///
/// # Errors
/// [`VerifyError`], naming the file.
pub fn verify(
    dir: &Path,
    fleet_key: Option<&ed25519::PublicKey>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Verified, VerifyError> {
    let read_small = |rel: &str| -> Result<String, VerifyError> {
        let path = dir.join(rel);
        let read = |source| VerifyError::Read {
            file: rel.into(),
            source,
        };
        let len = std::fs::metadata(&path).map_err(read)?.len();
        if len > MAX_MANIFEST_LEN {
            return Err(VerifyError::Manifest(BundleError::Malformed(format!(
                "{len} bytes, more than a manifest can be"
            ))));
        }
        std::fs::read_to_string(&path).map_err(read)
    };
    let signed = SignedBundle::from_json(&read_small(BUNDLE_MANIFEST)?)?;
    let config_rel = format!("{CONFIG_DIR}/rack.toml");
    let config_text = read_small(&config_rel)?;
    let config = RackConfig::parse(&config_text, Path::new(&config_rel))
        .map_err(|e| VerifyError::Config(e.to_string()))?;
    let own = decode_public_key(&config.fleet.public_key)
        .map_err(|e| VerifyError::Config(e.to_string()))?;
    let key = fleet_key.cloned().unwrap_or_else(|| own.clone());
    let body = signed.verify(&key)?;
    if own != key {
        return Err(VerifyError::Config(format!(
            "names fleet key {}, the bundle is signed by {}",
            config.fleet.public_key,
            deploy::cert::encode_public_key(&key)
        )));
    }
    if body.rack != config.rack || body.fleet != config.fleet.name {
        return Err(VerifyError::Config(format!(
            "is for rack {:?} of fleet {:?}, the manifest for rack {:?} of fleet {:?}",
            config.rack, config.fleet.name, body.rack, body.fleet
        )));
    }
    let total: u64 = body.files.values().map(|f| f.size).sum();
    let mut done = 0;
    for (rel, want) in &body.files {
        let path = dir.join(rel);
        if !path.exists() {
            return Err(VerifyError::Missing(rel.clone()));
        }
        let found = hash_file(&path, &mut |n| {
            done += n;
            progress(done, total);
        })
        .map_err(|source| VerifyError::Read {
            file: rel.clone(),
            source,
        })?;
        if found != *want {
            return Err(VerifyError::Mismatch {
                file: rel.clone(),
                expected: want.blake3.clone(),
                found: found.blake3,
            });
        }
    }
    let present = walk(dir).map_err(|source| VerifyError::Read {
        file: ".".into(),
        source,
    })?;
    if let Some(extra) = present.into_iter().find(|p| !body.files.contains_key(p)) {
        return Err(VerifyError::Unlisted(extra));
    }
    Ok(Verified {
        body,
        config,
        fleet_key: key,
    })
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The rack.
    pub rack: String,
    /// rack.toml as installed.
    pub config: PathBuf,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The data directory already held a volume store, kept as it was.
    pub data_kept: bool,
    /// The unit file.
    pub unit: PathBuf,
    /// What happened with systemctl.
    pub systemd: SystemdOutcome,
}

/// Whether the unit was enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemdOutcome {
    /// `systemctl daemon-reload` and `enable` ran.
    Enabled,
    /// Not under systemd, or installing under another root: not run.
    Skipped(String),
}

/// `fieldrack install`: verify the bundle in `dir`, then install it under
/// `root`. The unit runs `binary`. systemctl runs only when `root` is `/`
/// and the machine runs systemd. A data directory that already holds a
/// volume store is kept as it is (a re-install refreshes config only).
///
/// # Errors
/// [`VerifyError`] (in the chain) for a refused bundle; I/O failures.
pub fn install(
    dir: &Path,
    root: &Path,
    fleet_key: Option<&ed25519::PublicKey>,
    binary: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Installed> {
    let v = verify(dir, fleet_key, &mut |d, t| progress("verifying", d, t))?;
    let etc = root.join(ETC_DIR);
    let var = root.join(VAR_DIR);
    std::fs::create_dir_all(&etc).with_context(|| format!("creating {}", etc.display()))?;
    std::fs::create_dir_all(&var).with_context(|| format!("creating {}", var.display()))?;
    let data_kept = var.join(STORE_DIR).exists();
    for rel in v.body.files.keys() {
        let src = dir.join(rel);
        let (dst, mode) = if let Some(name) = rel.strip_prefix(&format!("{CONFIG_DIR}/")) {
            let secret = name == "identity.key" || name == API_TOKEN_FILE;
            (etc.join(name), if secret { SECRET } else { PUBLIC })
        } else if let Some(sub) = rel.strip_prefix(&format!("{DATA_DIR}/")) {
            if data_kept {
                continue;
            }
            (var.join(sub), SECRET)
        } else if let Some(name) = rel.strip_prefix(&format!("{TILES_DIR}/")) {
            (var.join(TILE_PACKS_DIR).join(name), PUBLIC)
        } else {
            continue; // the unit, rendered below
        };
        copy_file(&src, &dst, mode, &mut |d, t| progress(rel, d, t))?;
    }
    write_durable(
        &etc.join(BUNDLE_MANIFEST),
        &std::fs::read(dir.join(BUNDLE_MANIFEST))?,
        PUBLIC,
    )?;
    let config = etc.join("rack.toml");
    let unit_dir = root.join(UNIT_DIR);
    std::fs::create_dir_all(&unit_dir)?;
    let unit = unit_dir.join(UNIT_NAME);
    write_durable(
        &unit,
        systemd_unit(
            &v.config.rack,
            &binary.to_string_lossy(),
            &config.to_string_lossy(),
        )
        .as_bytes(),
        PUBLIC,
    )?;
    let systemd = if root != Path::new("/") {
        SystemdOutcome::Skipped(format!("installed under {}", root.display()))
    } else if !Path::new("/run/systemd/system").is_dir() {
        SystemdOutcome::Skipped("this machine does not run systemd".into())
    } else {
        for args in [&["daemon-reload"][..], &["enable", UNIT_NAME][..]] {
            let status = std::process::Command::new("systemctl")
                .args(args)
                .status()
                .context("running systemctl")?;
            if !status.success() {
                bail!("systemctl {} failed: {status}", args.join(" "));
            }
        }
        SystemdOutcome::Enabled
    };
    Ok(Installed {
        rack: v.config.rack,
        config,
        data_dir: var,
        data_kept,
        unit,
        systemd,
    })
}

#[cfg(test)]
mod tests;
