//! The service's local operations: what the API and the appliance
//! supervisor call. Store work runs on the blocking pool, never on the
//! runtime.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{VolumeError, VolumeService};
use crate::replicate::blocking;
use crate::{volume, ImportSource, Manifest};

/// Sets a flag when dropped: a blocking job whose future went away stops.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl VolumeService {
    /// Create an owned volume.
    ///
    /// # Errors
    /// [`VolumeError::Create`].
    pub async fn create(&self, name: String, size: u64) -> Result<(), VolumeError> {
        let st = self.store.clone();
        blocking(move || st.create(&name, size).map(|_| ())).await?;
        Ok(())
    }

    /// Whether this rack owns `name`'s live image.
    ///
    /// # Errors
    /// [`VolumeError::Store`] if the registry cannot be read.
    pub async fn owns(&self, name: &str) -> Result<bool, VolumeError> {
        let (st, n) = (self.store.clone(), name.to_owned());
        Ok(blocking(move || st.owns(&n)).await?)
    }

    /// Import a raw or qcow2 image into a volume (its next generation).
    /// `from` must be an absolute path to a regular file inside
    /// [`VolumeService::import_dirs`]; it is opened and checked before any
    /// lock is taken. Stops, leaving the volume unchanged, when `cancel`
    /// fires or the future is dropped.
    ///
    /// # Errors
    /// [`VolumeError::Import`].
    pub async fn import(
        &self,
        name: String,
        from: PathBuf,
        cancel: CancellationToken,
        progress: impl FnMut(u64, u64) + Send + 'static,
    ) -> Result<Manifest, VolumeError> {
        let st = self.store.clone();
        let dirs = self.import_dirs.clone();
        let mut progress = progress;
        let stop = Arc::new(AtomicBool::new(false));
        let _stop_on_drop = SetOnDrop(stop.clone());
        let bridge = {
            let stop = stop.clone();
            tokio::spawn(async move {
                cancel.cancelled().await;
                stop.store(true, Ordering::SeqCst);
            })
        };
        let _bridge = tokio_util::task::AbortOnDropHandle::new(bridge);
        let m = blocking(move || -> Result<Manifest, volume::ImportError> {
            let src = ImportSource::open(&from, Some(dirs.as_slice()))?;
            st.import_source(&name, src, &stop, &mut progress)
        })
        .await?;
        self.wake.notify_one();
        Ok(m)
    }

    /// Export a generation (newest by default) to a raw image.
    ///
    /// # Errors
    /// [`VolumeError::Export`].
    pub async fn export(
        &self,
        name: String,
        generation: Option<u64>,
        to: PathBuf,
        progress: impl FnMut(u64, u64) + Send + 'static,
    ) -> Result<(), VolumeError> {
        let st = self.store.clone();
        let mut progress = progress;
        blocking(move || st.export(&name, generation, &to, &mut progress).map(|_| ())).await?;
        Ok(())
    }

    /// Newest complete generation held of every volume (owned or replica).
    pub async fn held_generations(&self) -> BTreeMap<String, u64> {
        let st = self.store.clone();
        blocking(move || st.list())
            .await
            .map(|l| {
                l.into_iter()
                    .filter(|v| v.generation > 0 || v.has_live_image)
                    .map(|v| (v.name, v.generation))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Make sure this rack owns `name` with a live image: already owned,
    /// else promoted from the newest replica generation held, else created
    /// empty with `size`, unless `held_elsewhere` names another rack and the
    /// generation of the volume it reported: a volume the field has seen is
    /// never created empty behind an operator's back. Returns the image
    /// path and how it was obtained (`owned`, `promoted` or `created`).
    ///
    /// # Errors
    /// [`VolumeError::HeldElsewhere`] (nothing created), else
    /// [`VolumeError`].
    pub async fn ensure_owned(
        &self,
        name: &str,
        size: u64,
        held_elsewhere: Option<(String, u64)>,
    ) -> Result<(PathBuf, &'static str), VolumeError> {
        let st = self.store.clone();
        let n = name.to_owned();
        let how = blocking(move || -> Result<&'static str, VolumeError> {
            if st.owns(&n)? {
                return Ok("owned");
            }
            if st.latest(&n)?.is_some() {
                st.promote(&n, &mut |_, _| {})?;
                return Ok("promoted");
            }
            if let Some((rack, generation)) = held_elsewhere {
                return Err(VolumeError::HeldElsewhere {
                    volume: n,
                    rack,
                    generation,
                });
            }
            st.create(&n, size)?;
            Ok("created")
        })
        .await?;
        if how == "promoted" {
            // We own it now: forget whose replica it was.
            self.records.update(name, |rec| rec.owner = None);
        }
        self.wake.notify_one();
        Ok((self.store.image_path(name), how))
    }

    /// Stop owning `name`: another rack is its primary now. The volume
    /// (live image and generations) is dropped, so the new owner's
    /// generations replace it without conflict; shared chunks stay until
    /// the next prune and are not resent.
    ///
    /// The appliance is stopped here by now, so its live image is captured
    /// one last time first. Unless that capture is exactly generation
    /// `shipped` (what a planned handover gave the new owner), this rack may
    /// hold writes the new owner never got (a failover from an older
    /// replica): the capture is then kept ([`volume::kept`]) for an
    /// operator to export or drop. Returns the copy kept, if any.
    ///
    /// # Errors
    /// [`VolumeError::Store`].
    pub async fn demote(
        &self,
        name: &str,
        shipped: Option<u64>,
    ) -> Result<Option<crate::KeptCopy>, VolumeError> {
        self.set_pause_hooks(name, None);
        let (st, n) = (self.store.clone(), name.to_owned());
        let kept = blocking(move || -> Result<_, VolumeError> {
            let last = match st.snapshot(&n, &crate::NoPause, &mut |_, _| {}) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(volume = %n, error = %e, "last capture before demotion failed; keeping the newest generation");
                    st.latest(&n)?
                }
            };
            let given = match (&last, shipped) {
                (None, _) => true,
                (Some(m), Some(g)) => st.manifest(&n, g)?.is_some_and(|s| s.chunks == m.chunks),
                (Some(_), None) => false,
            };
            if given {
                st.delete(&n)?;
                Ok(None)
            } else {
                Ok(st.keep_and_delete(&n, util::time::unix_ms())?)
            }
        })
        .await?;
        self.records.forget(name);
        self.backlogs.lock().expect("backlogs lock").forget(name);
        tracing::info!(volume = %name, kept = kept.is_some(), "demoted: another rack owns it now");
        Ok(kept)
    }

    /// Every kept copy on this rack ([`volume::kept`]).
    ///
    /// # Errors
    /// [`VolumeError::Store`].
    pub async fn kept(&self) -> Result<Vec<crate::KeptCopy>, VolumeError> {
        let st = self.store.clone();
        Ok(blocking(move || st.kept()).await?)
    }

    /// Write kept copy (`name`, `kept_ms`) to `to` as a raw image.
    ///
    /// # Errors
    /// [`VolumeError::Export`].
    pub async fn export_kept(
        &self,
        name: String,
        kept_ms: u64,
        to: PathBuf,
        progress: impl FnMut(u64, u64) + Send + 'static,
    ) -> Result<(), VolumeError> {
        let st = self.store.clone();
        let mut progress = progress;
        blocking(move || {
            st.export_kept(&name, kept_ms, &to, &mut progress)
                .map(|_| ())
        })
        .await?;
        Ok(())
    }

    /// Drop kept copy (`name`, `kept_ms`).
    ///
    /// # Errors
    /// [`VolumeError::Store`] (`NotFound` if there is no such copy).
    pub async fn drop_kept(
        &self,
        name: String,
        kept_ms: u64,
    ) -> Result<crate::KeptCopy, VolumeError> {
        let st = self.store.clone();
        Ok(blocking(move || st.drop_kept(&name, kept_ms)).await?)
    }
}
