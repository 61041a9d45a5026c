//! The tile packs a rack's bundle carried: imported into their source's
//! cache, pinned (never evicted, served offline), once.
//!
//! `fieldrack install` puts each pack at
//! `<data_dir>/tile-packs/<source>/<file>`, the source being the
//! `[[tile_source]]` field.toml's `[[tile_pack]]` named. At start the
//! agent imports every pack not imported yet, one after another, in the
//! background (a pack of gigabytes takes minutes; the map serves what is
//! in while it runs). A pack is imported when its marker
//! `<file>.imported` holds the pack file's size and modification time:
//! a pack replaced by a new bundle is imported again, and an import cut
//! by a stop is run again at the next start (an import resumes: the
//! tiles it stored are not rewritten). A failed import is retried every
//! [`RETRY`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use deploy::bundle::SignedBundle;
use tokio_util::sync::CancellationToken;

use crate::bundle::{TILES_DIR, TILE_PACKS_DIR};
use deploy::bundle::BUNDLE_MANIFEST;

/// Between two attempts at a pack whose import failed.
pub const RETRY: Duration = Duration::from_secs(60);

/// One pack of the installed bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundledPack {
    /// Where `fieldrack install` put it.
    pub path: PathBuf,
    /// Its size in the signed manifest.
    pub size: u64,
    /// The tile source it is imported into.
    pub source: String,
}

impl BundledPack {
    /// The file in place at its signed size.
    #[must_use]
    pub fn present(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| m.len() == self.size)
    }

    /// Imported into its source's cache, and not replaced since.
    #[must_use]
    pub fn imported(&self) -> bool {
        match (
            std::fs::read_to_string(marker(&self.path)),
            stamp(&self.path),
        ) {
            (Ok(m), Ok(s)) => m.trim() == s,
            _ => false,
        }
    }
}

/// The packs the installed bundle carried (none when the rack was not
/// installed from a bundle).
#[must_use]
pub fn bundled(config_dir: &Path, data_dir: &Path) -> Vec<BundledPack> {
    let Ok(text) = std::fs::read_to_string(config_dir.join(BUNDLE_MANIFEST)) else {
        return Vec::new();
    };
    // Integrity is `doctor`'s business; here only the list matters, so
    // the body is read without the key.
    let Ok(signed) = SignedBundle::from_json(&text) else {
        return Vec::new();
    };
    let Ok(body) = signed.unverified_body() else {
        return Vec::new();
    };
    body.files
        .iter()
        .filter_map(|(rel, h)| {
            let name = rel.strip_prefix(&format!("{TILES_DIR}/"))?;
            let (source, _) = name.split_once('/')?;
            Some(BundledPack {
                path: data_dir.join(TILE_PACKS_DIR).join(name),
                size: h.size,
                source: source.to_owned(),
            })
        })
        .collect()
}

fn marker(pack: &Path) -> PathBuf {
    let mut name = pack.file_name().unwrap_or_default().to_os_string();
    name.push(".imported");
    pack.with_file_name(name)
}

/// What the marker of an import of `pack` as it is now holds.
fn stamp(pack: &Path) -> std::io::Result<String> {
    let m = std::fs::metadata(pack)?;
    let mtime = m
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    Ok(format!("{} {mtime}", m.len()))
}

/// Import every pack of `packs` not imported yet into `proxy`, retrying
/// failures every [`RETRY`], until all are in or `cancel`.
pub async fn import_all(
    proxy: cache_proxy::ProxyHandle,
    packs: Vec<BundledPack>,
    events: crate::state::AgentState,
    cancel: CancellationToken,
) {
    let mut pending: Vec<BundledPack> = packs.into_iter().filter(|p| !p.imported()).collect();
    while !pending.is_empty() {
        let mut failed = Vec::new();
        for pack in pending {
            let started = std::time::Instant::now();
            let result = cache_proxy::mbtiles::import_cancellable(
                &proxy,
                &pack.source,
                &pack.path,
                &cancel,
                |_| {},
            )
            .await;
            if cancel.is_cancelled() {
                return;
            }
            let written = result.map_err(anyhow::Error::from).and_then(|r| {
                let s = stamp(&pack.path)?;
                util::fs::write_durable(&marker(&pack.path), s.as_bytes(), 0o644)?;
                Ok(r)
            });
            match written {
                Ok(r) => {
                    tracing::info!(pack = %pack.path.display(), source = %pack.source, tiles = r.tiles + r.unchanged, ms = started.elapsed().as_millis() as u64, "tile pack imported (pinned)");
                    let _ = events.record_event(
                        "tile_pack_imported",
                        serde_json::json!({
                            "pack": pack.path.display().to_string(),
                            "source": pack.source,
                            "tiles": r.tiles + r.unchanged,
                        }),
                    );
                }
                Err(e) => {
                    tracing::warn!(pack = %pack.path.display(), source = %pack.source, error = %format!("{e:#}"), retry_s = RETRY.as_secs(), "tile pack import failed");
                    failed.push(pack);
                }
            }
        }
        pending = failed;
        if !pending.is_empty() {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(RETRY) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_holds_only_for_the_file_it_was_written_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("osm").join("haiti.pmtiles");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"pack one").unwrap();
        let pack = BundledPack {
            path: path.clone(),
            size: 8,
            source: "osm".into(),
        };
        assert!(pack.present());
        assert!(!pack.imported());
        std::fs::write(marker(&path), stamp(&path).unwrap()).unwrap();
        assert!(pack.imported());
        assert_eq!(
            marker(&path),
            dir.path().join("osm").join("haiti.pmtiles.imported")
        );
        // A new bundle's pack in its place must be imported again.
        std::fs::write(&path, b"pack two, longer").unwrap();
        assert!(!pack.imported());
        assert!(!pack.present(), "not the signed size");
    }
}
