//! `fieldrack fleet …`: provisioning on the laptop that holds the fleet
//! key, and handing a revocation to a running agent.

use std::fmt::Write;
use std::path::Path;

use anyhow::Context;
use deploy::Role;
use node_agent::fleet::{self, FleetFile, FleetRack, RackSpec};

use super::exit::Failure;
use super::{client_for, FleetCmd};

/// Run a `fleet` command.
///
/// # Errors
/// Provisioning failures; the agent unreachable or refusing a revocation.
pub async fn run(cmd: FleetCmd) -> Result<(), Failure> {
    match cmd {
        FleetCmd::Init {
            dir,
            racks,
            witness,
            local,
            name,
            site,
            valid_days,
        } => {
            let name = name.unwrap_or_else(|| {
                dir.canonicalize()
                    .unwrap_or_else(|_| dir.clone())
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "fleet".into())
            });
            let site = site.unwrap_or_else(|| "default".into());
            let specs: Vec<RackSpec> = racks
                .iter()
                .map(|r| (r, Role::Rack))
                .chain(witness.iter().map(|w| (w, Role::Witness)))
                .map(|(n, role)| RackSpec {
                    name: n.trim().to_string(),
                    role,
                    site: site.clone(),
                })
                .collect();
            let fleet = fleet::init(&dir, &name, &specs, local, valid_days)?;
            print!("{}", render_init(&dir, &fleet));
        }
        FleetCmd::Plan { field } => super::field::plan(&field)?,
        FleetCmd::Bundle { field, out, fleet } => super::field::bundle(&field, &out, fleet)?,
        FleetCmd::AddRack {
            dir,
            rack,
            witness,
            site,
        } => {
            let spec = RackSpec {
                name: rack,
                role: if witness { Role::Witness } else { Role::Rack },
                site: site.unwrap_or_else(|| "default".into()),
            };
            let r = fleet::add_rack(&dir, &spec)?;
            println!("{}", render_added(&dir, &r));
        }
        FleetCmd::Revoke {
            dir,
            rack,
            reason,
            config,
        } => {
            let rev = fleet::revoke(&dir, &rack, &reason)?;
            println!(
                "revoked rack {rack}; revocation written to {}",
                dir.join("revocations")
                    .join(format!("{rack}.json"))
                    .display()
            );
            if let Some(config) = config {
                client_for(&config)?
                    .revoke(&rev)
                    .await
                    .context("the agent refused the revocation")?;
                println!(
                    "handed to the agent at {}; it spreads through the mesh",
                    config.display()
                );
            } else {
                println!(
                    "hand it to any running rack with: fieldrack fleet revoke --dir {} --rack {rack} --config RACK.toml",
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

/// What `fleet init` made: the key, and per rack its addresses and config.
#[must_use]
pub fn render_init(dir: &Path, fleet: &FleetFile) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "fleet {:?} created in {}", fleet.name, dir.display());
    let _ = writeln!(
        out,
        "  fleet signing key: {} (keep it on this laptop)",
        dir.join(fleet::FLEET_KEY_FILE).display()
    );
    for r in &fleet.racks {
        let _ = writeln!(
            out,
            "  {} {:<8} {}  api {}  {}",
            r.role,
            r.name,
            r.mesh,
            r.api,
            dir.join(&r.name).join("rack.toml").display()
        );
    }
    out
}

/// What `fleet add-rack` made (one line, no newline).
#[must_use]
pub fn render_added(dir: &Path, r: &FleetRack) -> String {
    format!(
        "added {} {} ({}) {}",
        r.role,
        r.name,
        r.peer_id,
        dir.join(&r.name).join("rack.toml").display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rack(name: &str, role: Role) -> FleetRack {
        FleetRack {
            name: name.into(),
            peer_id: format!("12D3Koo{name}"),
            role,
            site: "default".into(),
            mesh: "/ip4/127.0.0.1/udp/7101/quic-v1".into(),
            api: "127.0.0.1:7201".into(),
            revoked: false,
        }
    }

    #[test]
    fn init_lists_the_key_and_every_rack() {
        let fleet = FleetFile {
            name: "relief".into(),
            public_key: "AAAA".into(),
            local: true,
            valid_days: 365,
            racks: vec![rack("a", Role::Rack), rack("w", Role::Witness)],
        };
        let out = render_init(Path::new("/f"), &fleet);
        assert_eq!(
            out,
            format!(
                "fleet \"relief\" created in /f\n  fleet signing key: /f/{} (keep it on this laptop)\n  \
                 {} a        /ip4/127.0.0.1/udp/7101/quic-v1  api 127.0.0.1:7201  /f/a/rack.toml\n  \
                 {} w        /ip4/127.0.0.1/udp/7101/quic-v1  api 127.0.0.1:7201  /f/w/rack.toml\n",
                fleet::FLEET_KEY_FILE,
                Role::Rack,
                Role::Witness,
            )
        );
        assert_eq!(
            render_added(Path::new("/f"), &rack("d", Role::Rack)),
            format!("added {} d (12D3Kood) /f/d/rack.toml", Role::Rack)
        );
    }
}
