//! `fieldrack volume …`: create, import, export, snapshot, status.

use anyhow::Context;
use node_agent::status::render_volumes;
use node_agent::volumes::VolumeStatus;

use super::exit::Failure;
use super::{absolute, client_for, progress, VolumeCmd};

/// Run a `volume` command.
///
/// # Errors
/// A local path that cannot be resolved; the agent unreachable or refusing.
pub async fn run(cmd: VolumeCmd) -> Result<(), Failure> {
    match cmd {
        VolumeCmd::Create { name, size, config } => {
            client_for(&config)?.volume_create(&name, &size).await?;
            println!("created volume {name} ({size})");
        }
        VolumeCmd::Import { name, from, config } => {
            let client = client_for(&config)?;
            // The agent refuses relative paths and symlinks: resolve both.
            let from =
                std::fs::canonicalize(&from).with_context(|| format!("{}", from.display()))?;
            let r = client
                .volume_import(&name, &from, progress::printer("import", progress::bytes))
                .await?;
            progress::finish();
            println!("imported {} as generation {}", from.display(), r.generation);
        }
        VolumeCmd::Export {
            name,
            to,
            generation,
            kept,
            config,
        } => {
            let client = client_for(&config)?;
            let to = absolute(to)?;
            let progress = progress::printer("export", progress::bytes);
            match kept {
                Some(kept_ms) => {
                    client
                        .volume_export_kept(&name, kept_ms, &to, progress)
                        .await?
                }
                None => {
                    client
                        .volume_export(&name, &to, generation, progress)
                        .await?
                }
            };
            progress::finish();
            println!("exported {name} to {}", to.display());
        }
        VolumeCmd::Snapshot { name, config } => {
            let r = client_for(&config)?.volume_snapshot(&name).await?;
            println!("{name}: generation {}", r.generation);
        }
        VolumeCmd::Kept { config, json } => {
            let kept = client_for(&config)?.volumes_kept().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&kept)?);
            } else {
                print!("{}", render_kept(&kept));
            }
        }
        VolumeCmd::DropKept {
            name,
            kept_ms,
            config,
        } => {
            let k = client_for(&config)?
                .volume_drop_kept(&name, kept_ms)
                .await?;
            println!(
                "dropped the kept copy of {} (generation {}, kept at {})",
                k.volume, k.generation, k.kept_ms
            );
        }
        VolumeCmd::Status { config, json } => {
            let status = client_for(&config)?.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status.volumes)?);
            } else {
                print!("{}", render_status(&status.rack, &status.volumes));
            }
        }
    }
    Ok(())
}

/// `volume kept`: one line per kept copy, or a line saying there are none.
fn render_kept(kept: &[datastore::KeptCopy]) -> String {
    if kept.is_empty() {
        return "no kept copies\n".into();
    }
    let mut out = format!(
        "{:<24} {:>10} {:>15} {:>12}  {}\n",
        "VOLUME", "GENERATION", "KEPT_MS", "SIZE", "CAPTURED"
    );
    for k in kept {
        out += &format!(
            "{:<24} {:>10} {:>15} {:>12}  {} s before it was kept\n",
            k.volume,
            k.generation,
            k.kept_ms,
            k.size,
            k.kept_ms.saturating_sub(k.captured_ms) / 1000
        );
    }
    out += "export one: fieldrack volume export NAME --to FILE --kept KEPT_MS; drop it: fieldrack volume drop-kept NAME KEPT_MS\n";
    out
}

/// `volume status`: the volume table of `fieldrack status`, or a line
/// saying there are none.
#[must_use]
pub fn render_status(rack: &str, volumes: &[VolumeStatus]) -> String {
    if volumes.is_empty() {
        format!("no volumes on rack {rack}\n")
    } else {
        render_volumes(volumes)
    }
}

#[cfg(test)]
mod tests {
    use node_agent::volumes::ReplicaStatus;

    use super::*;

    #[test]
    fn the_table_is_rendered_from_typed_volumes() {
        let volumes = vec![
            VolumeStatus {
                name: "db".into(),
                owner: Some("a".into()),
                generation: Some(7),
                size_bytes: 4 << 30,
                replicas: vec![
                    ReplicaStatus {
                        rack: "b".into(),
                        generation: Some(7),
                        lag_s: Some(0.4),
                        bytes_waiting: 0,
                        push_bytes_per_s: Some(1e6),
                        eta_s: Some(0.0),
                    },
                    ReplicaStatus {
                        rack: "c".into(),
                        generation: None,
                        lag_s: None,
                        bytes_waiting: 3 << 20,
                        push_bytes_per_s: None,
                        eta_s: None,
                    },
                ],
                rpo_s: Some(2.0),
                bytes_waiting: Some(3 << 20),
                eta_s: None,
                snapshot_interval_s: Some(2.0),
                generations_held: vec![6, 7],
                image: Some("/data/volumes/db/live.img".into()),
                transfer: Some("pushing to c".into()),
            },
            VolumeStatus {
                name: "scratch".into(),
                owner: None,
                generation: None,
                size_bytes: 512,
                replicas: Vec::new(),
                rpo_s: None,
                bytes_waiting: None,
                eta_s: None,
                snapshot_interval_s: None,
                generations_held: Vec::new(),
                image: None,
                transfer: None,
            },
        ];
        assert_eq!(
            render_status("a", &volumes),
            "VOLUME           OWNER       GEN       SIZE      RPO  replicas\n\
             db               a             7       4.0G     2.0s  b@7 (lag 0s), c@- (3.0M waiting)  [pushing to c]\n\
             scratch          ?             -       512B        -  \n"
        );
    }

    #[test]
    fn no_volumes_says_so() {
        assert_eq!(render_status("a", &[]), "no volumes on rack a\n");
    }
}
