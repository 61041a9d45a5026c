//! `field.toml`: the plan of a whole field, written on the provisioning
//! laptop before racks ship. `fieldrack fleet plan` validates it and prints
//! the failure plan; `fieldrack fleet bundle` turns it into one signed
//! bundle per rack.
//!
//! ```toml
//! fleet = "haiti-relief"
//!
//! [[site]]
//! name = "jacmel"
//!
//! [[rack]]
//! name = "jacmel-1"
//! site = "jacmel"
//! address = "10.20.0.11"   # its IP on the radio network
//! power = "nut"            # grid | nut | generator
//! cpus = 8
//! memory_mb = 32768
//! disk = "2T"              # room for volume data
//!
//! [[witness]]
//! name = "jacmel-w"
//! site = "jacmel"
//! address = "10.20.0.10"
//!
//! [[appliance]]
//! manifest = "apps/clinic.toml"         # `[[appliance]]` tables
//! images = { clinic-db = "images/clinic-db.img" }
//!
//! [[tile_source]]          # as in rack.toml, on every rack
//! name = "osm"
//! url = "https://tile.example.org/{z}/{x}/{y}.png"
//!
//! [[tile_pack]]             # imported (pinned) into its source's cache
//! name = "haiti"
//! path = "tiles/haiti.mbtiles"
//! source = "osm"
//! sites = ["jacmel"]
//!
//! [backhaul]                # the `[proxy.backhaul]` of every rack
//! daily_quota_bytes = 2000000000
//! ```
//!
//! [`FieldPlan::parse`] checks the text alone; [`Field::load`] also reads
//! the appliance manifests it names and checks the whole (images name
//! volumes that exist, dependencies resolve). Every refusal names the
//! field: ``field.toml: invalid `rack[1].site`: no [[site]] named "x"``.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::appliance::{self, check_dependencies, ApplianceSpec};
use crate::config::BackhaulConfig;
use crate::{validate_rack_name, Role};

/// Most racks and witnesses in one field: membership, gossip and the
/// control plane are sized and tested for this many.
pub const MAX_FIELD_RACKS: usize = 32;

/// Longest site name: sites appear in certificates, tables and metrics.
pub const MAX_SITE_NAME: usize = 64;

/// Longest certificate lifetime accepted (ten years): beyond that nobody
/// remembers the fleet key exists.
pub const MAX_VALID_DAYS: u64 = 3650;

/// Most copies of a volume a plan may ask for.
pub const MAX_REPLICATION_FACTOR: usize = 8;

/// A whole `field.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldPlan {
    /// The fleet's name: in every certificate, so two fields never mix.
    pub fleet: String,
    /// Certificate lifetime, days.
    #[serde(default = "default_valid_days")]
    pub valid_days: u64,
    /// Copies of each volume on distinct racks, the owner's included
    /// (`[volumes] replication_factor` of every rack).
    #[serde(default = "default_replication_factor")]
    pub replication_factor: usize,
    /// The failure domains (a camp, a hospital compound).
    #[serde(default, rename = "site")]
    pub sites: Vec<SiteSpec>,
    /// Racks: run appliances, hold volumes.
    #[serde(default, rename = "rack")]
    pub racks: Vec<MemberSpec>,
    /// Witnesses: vote and relay only.
    #[serde(default, rename = "witness")]
    pub witnesses: Vec<MemberSpec>,
    /// The appliance catalog: manifests and the disk images of their volumes.
    #[serde(default, rename = "appliance")]
    pub appliances: Vec<CatalogEntry>,
    /// Map tile sources, the `[[tile_source]]` of every rack.
    #[serde(default, rename = "tile_source")]
    pub tile_sources: Vec<crate::config::TileSource>,
    /// Map packs preloaded onto every rack of the sites that carry them.
    #[serde(default, rename = "tile_pack")]
    pub tile_packs: Vec<TilePack>,
    /// The satellite backhaul, as every rack's `[proxy.backhaul]`.
    #[serde(default)]
    pub backhaul: BackhaulConfig,
}

/// `[[site]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    /// Unique, 1–64 characters.
    pub name: String,
}

/// `[[rack]]` or `[[witness]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSpec {
    /// Rack name (`[a-z0-9-]`, unique across racks and witnesses).
    pub name: String,
    /// Its `[[site]]`.
    pub site: String,
    /// Its IP on the radio network; peers dial it there.
    pub address: IpAddr,
    /// Where its power comes from.
    #[serde(default)]
    pub power: PowerSpec,
    /// CPUs offered to appliances (racks only).
    #[serde(default)]
    pub cpus: u32,
    /// Memory offered to appliances, MiB (racks only).
    #[serde(default)]
    pub memory_mb: u64,
    /// Bytes of disk for volume data (racks only): `"2T"` or a number.
    #[serde(default, deserialize_with = "appliance::deserialize_size")]
    pub disk: u64,
    /// Ports, when the defaults do not suit.
    #[serde(default)]
    pub ports: Ports,
}

/// `ports = { ... }` of a rack. The bulk plane uses `mesh + 1` (UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ports {
    /// Mesh (QUIC, UDP).
    pub mesh: u16,
    /// Admin API (TCP, loopback only).
    pub api: u16,
    /// Proxy and tile server (TCP).
    pub proxy: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            mesh: 7400,
            api: 7480,
            proxy: 3128,
        }
    }
}

impl Ports {
    /// The bulk plane's UDP port, next to the mesh's.
    #[must_use]
    pub fn bulk(&self) -> u16 {
        self.mesh.wrapping_add(1)
    }
}

/// A rack's power source, as far as its `[power]` table is concerned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerSpec {
    /// Mains or an external supply without telemetry.
    #[default]
    Grid,
    /// A UPS behind NUT's `upsd` on the rack (UPS name `ups`, port 3493).
    Nut,
    /// A generator controller writing [`GENERATOR_FILE`].
    Generator,
}

/// Where a generator controller writes its JSON on a rack.
pub const GENERATOR_FILE: &str = "/run/fieldrack/generator.json";

/// `[[appliance]]` of `field.toml`: one manifest file and the images of
/// its volumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    /// A manifest (`[[appliance]]` tables), relative to `field.toml`.
    pub manifest: PathBuf,
    /// Volume name → its disk image (raw or qcow2), relative to
    /// `field.toml`. Volumes without one start empty.
    #[serde(default)]
    pub images: BTreeMap<String, PathBuf>,
}

/// `[[tile_pack]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TilePack {
    /// `[a-z0-9_-]`, unique.
    pub name: String,
    /// An `.mbtiles` or `.pmtiles` file, relative to `field.toml`.
    pub path: PathBuf,
    /// The `[[tile_source]]` whose tiles it holds: the racks import it
    /// into that source's cache, pinned.
    pub source: String,
    /// The sites whose every rack carries it.
    pub sites: Vec<String>,
}

/// Why a `field.toml` was refused. Always names the file; `Invalid` names
/// the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FieldError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax or type error (the message names the key and line).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("{path}: invalid `{field}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted field, e.g. `rack[1].site`.
        field: String,
        /// Why.
        reason: String,
    },
    /// A manifest named by `appliance[i].manifest` was refused.
    #[error("{path}: invalid `appliance[{index}].manifest`: {source}")]
    Manifest {
        /// The field file.
        path: PathBuf,
        /// Which catalog entry.
        index: usize,
        /// What is wrong in the manifest.
        source: appliance::ManifestError,
    },
}

fn default_valid_days() -> u64 {
    365
}
fn default_replication_factor() -> usize {
    2
}

impl FieldPlan {
    /// Parse and validate `text`; `path` is only used in messages.
    ///
    /// # Errors
    /// [`FieldError::Parse`] or [`FieldError::Invalid`], naming the field.
    pub fn parse(text: &str, path: &Path) -> Result<Self, FieldError> {
        let plan: FieldPlan = toml::from_str(text).map_err(|e| FieldError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        plan.validate()
            .map_err(|(field, reason)| FieldError::Invalid {
                path: path.to_owned(),
                field,
                reason,
            })?;
        Ok(plan)
    }

    /// Every member (racks, then witnesses) with its role.
    pub fn members(&self) -> impl Iterator<Item = (&MemberSpec, Role)> {
        self.racks
            .iter()
            .map(|r| (r, Role::Rack))
            .chain(self.witnesses.iter().map(|w| (w, Role::Witness)))
    }

    /// The tile packs carried by racks of `site`.
    pub fn packs_of_site<'a>(&'a self, site: &'a str) -> impl Iterator<Item = &'a TilePack> {
        self.tile_packs
            .iter()
            .filter(move |p| p.sites.iter().any(|s| s == site))
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: String, reason: String| Err((field, reason));
        if self.fleet.trim().is_empty() {
            return bad("fleet".into(), "must not be empty".into());
        }
        if !(1..=MAX_VALID_DAYS).contains(&self.valid_days) {
            return bad(
                "valid_days".into(),
                format!("{} is out of range 1..={MAX_VALID_DAYS}", self.valid_days),
            );
        }
        if !(1..=MAX_REPLICATION_FACTOR).contains(&self.replication_factor) {
            return bad(
                "replication_factor".into(),
                format!(
                    "{} is out of range 1..={MAX_REPLICATION_FACTOR}",
                    self.replication_factor
                ),
            );
        }
        let mut sites = BTreeSet::new();
        for (i, s) in self.sites.iter().enumerate() {
            if s.name.is_empty() || s.name.len() > MAX_SITE_NAME {
                return bad(
                    format!("site[{i}].name"),
                    format!("must be 1..={MAX_SITE_NAME} characters"),
                );
            }
            if !sites.insert(s.name.as_str()) {
                return bad(
                    format!("site[{i}].name"),
                    format!("{:?} is named twice", s.name),
                );
            }
        }
        if self.racks.is_empty() {
            return bad("rack".into(), "a field needs at least one [[rack]]".into());
        }
        let total = self.racks.len() + self.witnesses.len();
        if total > MAX_FIELD_RACKS {
            return bad(
                "rack".into(),
                format!("{total} racks and witnesses; a field holds at most {MAX_FIELD_RACKS}"),
            );
        }
        let mut names = BTreeSet::new();
        let mut endpoints = BTreeMap::new();
        for (table, list) in [("rack", &self.racks), ("witness", &self.witnesses)] {
            for (i, m) in list.iter().enumerate() {
                let at = |f: &str| format!("{table}[{i}].{f}");
                if let Err(e) = validate_rack_name(&m.name) {
                    return bad(at("name"), e.to_string());
                }
                if !names.insert(m.name.as_str()) {
                    return bad(
                        at("name"),
                        format!(
                            "{:?} is named twice (racks and witnesses share names)",
                            m.name
                        ),
                    );
                }
                if !sites.contains(m.site.as_str()) {
                    return bad(at("site"), format!("no [[site]] named {:?}", m.site));
                }
                if m.address.is_unspecified() || m.address.is_multicast() {
                    return bad(
                        at("address"),
                        format!("{} is not an address peers can dial", m.address),
                    );
                }
                let p = m.ports;
                if p.mesh == 0 || p.api == 0 || p.proxy == 0 || p.mesh == u16::MAX {
                    return bad(
                        at("ports"),
                        "ports must be 1..=65534 (mesh + 1 is the bulk plane)".into(),
                    );
                }
                if p.api == p.proxy {
                    return bad(at("ports.proxy"), "must differ from ports.api".into());
                }
                for (proto, port) in [
                    ("udp", p.mesh),
                    ("udp", p.bulk()),
                    ("tcp", p.api),
                    ("tcp", p.proxy),
                ] {
                    if let Some(other) = endpoints.insert((m.address, proto, port), m.name.clone())
                    {
                        return bad(
                            at("address"),
                            format!(
                                "{}/{proto} port {port} is also used by {other:?}",
                                m.address
                            ),
                        );
                    }
                }
                if table == "rack" {
                    if m.cpus == 0 {
                        return bad(at("cpus"), "a rack offers at least one CPU".into());
                    }
                    if m.memory_mb == 0 {
                        return bad(at("memory_mb"), "a rack offers some memory".into());
                    }
                    if m.disk == 0 {
                        return bad(at("disk"), "a rack needs disk for volume data".into());
                    }
                }
            }
        }
        for (i, a) in self.appliances.iter().enumerate() {
            if a.manifest.as_os_str().is_empty() {
                return bad(
                    format!("appliance[{i}].manifest"),
                    "must name a file".into(),
                );
            }
            for (vol, img) in &a.images {
                if let Err(e) = appliance::validate_name(vol) {
                    return bad(format!("appliance[{i}].images.{vol}"), e);
                }
                if img.as_os_str().is_empty() {
                    return bad(
                        format!("appliance[{i}].images.{vol}"),
                        "must name a file".into(),
                    );
                }
            }
        }
        crate::config::proxy::validate(None, &self.tile_sources)?;
        let mut packs = BTreeSet::new();
        for (i, p) in self.tile_packs.iter().enumerate() {
            let at = |f: &str| format!("tile_pack[{i}].{f}");
            if p.name.is_empty()
                || p.name.len() > 64
                || !p
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
            {
                return bad(at("name"), "1-64 characters of a-z, 0-9, '-', '_'".into());
            }
            if !packs.insert(p.name.as_str()) {
                return bad(at("name"), format!("{:?} is named twice", p.name));
            }
            if TilePackFormat::of(&p.path).is_none() {
                return bad(at("path"), "must end in .mbtiles or .pmtiles".into());
            }
            if !self.tile_sources.iter().any(|t| t.name == p.source) {
                return bad(
                    at("source"),
                    format!("no [[tile_source]] named {:?}", p.source),
                );
            }
            if p.sites.is_empty() {
                return bad(at("sites"), "name at least one site".into());
            }
            for (j, s) in p.sites.iter().enumerate() {
                if !sites.contains(s.as_str()) {
                    return bad(
                        format!("tile_pack[{i}].sites[{j}]"),
                        format!("no [[site]] named {s:?}"),
                    );
                }
            }
        }
        Ok(())
    }
}

/// The container format of a tile pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TilePackFormat {
    /// An SQLite MBTiles file.
    MbTiles,
    /// A single-file PMTiles archive.
    PmTiles,
}

impl TilePackFormat {
    /// From the file name's extension.
    #[must_use]
    pub fn of(path: &Path) -> Option<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("mbtiles") => Some(Self::MbTiles),
            Some("pmtiles") => Some(Self::PmTiles),
            _ => None,
        }
    }
}

/// A field plan with its manifests read and every relative path made
/// absolute (relative to `field.toml`'s directory).
#[derive(Debug, Clone)]
pub struct Field {
    /// The plan.
    pub plan: FieldPlan,
    /// Every appliance of the catalog.
    pub apps: Vec<ApplianceSpec>,
    /// Volume name → its image, for volumes that have one.
    pub images: BTreeMap<String, PathBuf>,
    /// Tile pack name → its file.
    pub packs: BTreeMap<String, PathBuf>,
}

impl Field {
    /// Read `field.toml`, validate it, read its manifests, check the whole.
    ///
    /// # Errors
    /// [`FieldError`], naming the field.
    pub fn load(path: &Path) -> Result<Self, FieldError> {
        let text = std::fs::read_to_string(path).map_err(|source| FieldError::Read {
            path: path.to_owned(),
            source,
        })?;
        let plan = FieldPlan::parse(&text, path)?;
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let mut manifests = Vec::new();
        for (index, entry) in plan.appliances.iter().enumerate() {
            let specs = appliance::load(&dir.join(&entry.manifest)).map_err(|source| {
                FieldError::Manifest {
                    path: path.to_owned(),
                    index,
                    source,
                }
            })?;
            manifests.push(specs);
        }
        let images = plan
            .appliances
            .iter()
            .map(|e| {
                e.images
                    .iter()
                    .map(|(v, p)| (v.clone(), dir.join(p)))
                    .collect()
            })
            .collect::<Vec<BTreeMap<_, _>>>();
        let packs = plan
            .tile_packs
            .iter()
            .map(|p| (p.name.clone(), dir.join(&p.path)))
            .collect();
        Self::check(plan, manifests, images, packs).map_err(|(field, reason)| FieldError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        })
    }

    /// Cross-checks between the plan and its manifests (pure).
    fn check(
        plan: FieldPlan,
        manifests: Vec<Vec<ApplianceSpec>>,
        images: Vec<BTreeMap<String, PathBuf>>,
        packs: BTreeMap<String, PathBuf>,
    ) -> Result<Self, (String, String)> {
        let mut apps: Vec<ApplianceSpec> = Vec::new();
        let mut volumes: BTreeMap<String, String> = BTreeMap::new();
        let mut all_images = BTreeMap::new();
        for (i, (specs, imgs)) in manifests.into_iter().zip(images).enumerate() {
            for s in specs {
                if apps.iter().any(|a| a.name == s.name) {
                    return Err((
                        format!("appliance[{i}].manifest"),
                        format!("appliance {:?} is already in the catalog", s.name),
                    ));
                }
                for v in &s.volume {
                    if let Some(other) = volumes.insert(v.name.clone(), s.name.clone()) {
                        return Err((
                            format!("appliance[{i}].manifest"),
                            format!("volume {:?} belongs to {other:?} already", v.name),
                        ));
                    }
                }
                apps.push(s);
            }
            for (vol, img) in imgs {
                let known = apps.iter().flat_map(|a| &a.volume).any(|v| v.name == vol);
                if !known {
                    return Err((
                        format!("appliance[{i}].images.{vol}"),
                        format!("no appliance of this manifest has a volume {vol:?}"),
                    ));
                }
                all_images.insert(vol, img);
            }
        }
        if let Err(e) = check_dependencies(&apps) {
            return Err(("appliance".into(), e.to_string()));
        }
        let sites: BTreeSet<&str> = plan.sites.iter().map(|s| s.name.as_str()).collect();
        let rack_names: BTreeSet<&str> = plan.racks.iter().map(|r| r.name.as_str()).collect();
        for a in &apps {
            for r in &a.placement.racks {
                if !rack_names.contains(r.as_str()) {
                    return Err((
                        "appliance".into(),
                        format!(
                            "appliance {:?}: placement.racks names no [[rack]] {r:?}",
                            a.name
                        ),
                    ));
                }
            }
            for s in &a.placement.sites {
                if !sites.contains(s.as_str()) {
                    return Err((
                        "appliance".into(),
                        format!(
                            "appliance {:?}: placement.sites names no [[site]] {s:?}",
                            a.name
                        ),
                    ));
                }
            }
        }
        Ok(Self {
            plan,
            apps,
            images: all_images,
            packs,
        })
    }
}

#[cfg(test)]
mod tests;
