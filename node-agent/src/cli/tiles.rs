//! `fieldrack tiles …`: seed, import and export map tiles.

use anyhow::Context;

use super::exit::Failure;
use super::{absolute, client_for, progress, TileRegion, TilesCmd};

/// Run a `tiles` command.
///
/// # Errors
/// A local path that cannot be resolved; the agent unreachable or refusing.
pub async fn run(cmd: TilesCmd) -> Result<(), Failure> {
    match cmd {
        TilesCmd::Seed {
            region:
                TileRegion {
                    source,
                    bbox,
                    zoom,
                    config,
                },
        } => {
            let r = client_for(&config)?
                .tiles_seed(
                    &source,
                    &bbox,
                    &zoom,
                    progress::printer("seed", progress::tiles),
                )
                .await?;
            progress::finish();
            println!("seeded {source}: {}", report(&r)?);
        }
        TilesCmd::Sample { file } => {
            std::fs::write(&file, node_agent::sample_tiles::sample_pmtiles())
                .with_context(|| format!("writing {}", file.display()))
                .map_err(Failure::from)?;
            println!(
                "wrote the sample map to {} (PNG tiles; view {})",
                file.display(),
                node_agent::sample_tiles::sample_view()
            );
        }
        TilesCmd::Import {
            file,
            source,
            config,
        } => {
            let client = client_for(&config)?;
            let file =
                std::fs::canonicalize(&file).with_context(|| format!("{}", file.display()))?;
            let r = client
                .tiles_import(&source, &file, progress::printer("import", progress::tiles))
                .await?;
            progress::finish();
            println!("imported into {source}: {}", report(&r)?);
        }
        TilesCmd::Export {
            file,
            region:
                TileRegion {
                    source,
                    bbox,
                    zoom,
                    config,
                },
        } => {
            let client = client_for(&config)?;
            let file = absolute(file)?;
            let r = client
                .tiles_export(
                    &source,
                    &bbox,
                    &zoom,
                    &file,
                    progress::printer("export", progress::tiles),
                )
                .await?;
            progress::finish();
            println!("exported {source} to {}: {}", file.display(), report(&r)?);
        }
    }
    Ok(())
}

/// A job's final counts as one line of JSON, keys in alphabetical order.
///
/// # Errors
/// If it cannot be encoded (not for the types it is used with).
pub fn report(r: &impl serde::Serialize) -> serde_json::Result<String> {
    Ok(serde_json::to_value(r)?.to_string())
}

#[cfg(test)]
mod tests {
    use node_agent::client::SeedReport;

    use super::*;

    #[test]
    fn counts_print_as_one_json_line() {
        let r = SeedReport {
            total: 1365,
            fetched: 1000,
            skipped: 360,
            failed: 5,
        };
        assert_eq!(
            report(&r).unwrap(),
            r#"{"failed":5,"fetched":1000,"skipped":360,"total":1365}"#
        );
    }
}
