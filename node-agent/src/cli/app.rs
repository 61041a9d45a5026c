//! `fieldrack app …`: deploy, list, stop, start and move appliances.

use std::fmt::Write;

use anyhow::Context;
use deploy::appliance::ApplianceSpec;
use node_agent::supervisor::ApplianceStatus;

use super::exit::Failure;
use super::{client_for, AppCmd};

/// Run an `app` command.
///
/// # Errors
/// [`Failure::BadInput`] for a manifest that does not parse; the agent
/// unreachable or refusing otherwise.
pub async fn run(cmd: AppCmd) -> Result<(), Failure> {
    match cmd {
        AppCmd::Deploy { manifest, config } => {
            // Parse here too: errors name the file, the appliance and the
            // field, before any agent is asked.
            let specs =
                deploy::appliance::load(&manifest).map_err(|e| Failure::BadInput(e.into()))?;
            let text = std::fs::read_to_string(&manifest)
                .with_context(|| format!("reading {}", manifest.display()))?;
            client_for(&config)?.app_deploy(&text).await?;
            print!("{}", render_deployed(&specs));
        }
        AppCmd::List { config, json } => {
            let apps = client_for(&config)?.apps().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&apps)?);
            } else {
                print!("{}", render_list(&apps));
            }
        }
        AppCmd::Stop { name, config } => {
            client_for(&config)?.app_stop(&name).await?;
            println!("{name}: stopping");
        }
        AppCmd::Start { name, config } => {
            client_for(&config)?.app_start(&name).await?;
            println!("{name}: starting");
        }
        AppCmd::Move { name, to, config } => {
            client_for(&config)?.app_move(&name, &to).await?;
            println!("{name}: moving to {to}");
        }
    }
    Ok(())
}

/// One line per appliance deployed.
#[must_use]
pub fn render_deployed(specs: &[ApplianceSpec]) -> String {
    let mut out = String::new();
    for s in specs {
        let _ = writeln!(
            out,
            "deployed {} (tier {}, driver {})",
            s.name, s.tier, s.driver
        );
    }
    out
}

/// `app list`: where each appliance runs, its state and why it is there.
#[must_use]
pub fn render_list(apps: &[ApplianceStatus]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<12} {:<9} {:>4} {:>6} {:>8}  REASON",
        "APPLIANCE", "OWNER", "STATE", "TIER", "EPOCH", "SINCE_S"
    );
    for a in apps {
        let _ = writeln!(
            out,
            "{:<20} {:<12} {:<9} {:>4} {:>6} {:>8}  {}",
            a.name,
            a.owner.as_deref().unwrap_or("-"),
            a.state,
            a.tier,
            a.epoch,
            a.since_s.map_or("-".into(), |s| format!("{s:.1}")),
            a.reason.as_deref().unwrap_or("")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_a_table_of_typed_rows() {
        let apps = vec![
            ApplianceStatus {
                name: "registry".into(),
                owner: Some("b".into()),
                state: "running".into(),
                tier: 0,
                epoch: 3,
                since_s: Some(12.345),
                reason: Some("failover".into()),
            },
            ApplianceStatus {
                name: "maps".into(),
                owner: None,
                state: "stopped".into(),
                tier: 2,
                epoch: 0,
                since_s: None,
                reason: None,
            },
        ];
        assert_eq!(
            render_list(&apps),
            "APPLIANCE            OWNER        STATE     TIER  EPOCH  SINCE_S  REASON\n\
             registry             b            running      0      3     12.3  failover\n\
             maps                 -            stopped      2      0        -  \n"
        );
        assert_eq!(
            render_list(&[]),
            "APPLIANCE            OWNER        STATE     TIER  EPOCH  SINCE_S  REASON\n"
        );
    }

    #[test]
    fn deployed_appliances_are_named_with_tier_and_driver() {
        let specs = deploy::appliance::parse_manifest(
            "[[appliance]]\nname = \"db\"\ndriver = \"process\"\ncommand = [\"true\"]\ntier = 1\n",
        )
        .unwrap();
        assert_eq!(
            render_deployed(&specs),
            "deployed db (tier 1, driver process)\n"
        );
    }
}
