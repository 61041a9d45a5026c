//! The supervisor's effects that take time, each run in a task of its
//! own: an instance's whole life (volume promotion, launch, supervision),
//! a handover (final snapshot shipped, `Released` committed) and a QEMU
//! capture. None of them holds anything the supervisor loop, another
//! instance or the renewal loop needs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::{Command, FieldState, FieldView};
use deploy::appliance::{ApplianceSpec, DriverKind};
use mesh::membership::State as MemberState;
use tokio::sync::{mpsc, watch};

use super::instance::{self, Guard, StopRequest};
use super::{Report, Supervisor};
use crate::drivers::{self, CaptureKind, Capturer, LaunchSpec};

/// The racks that are up: admitted, not revoked, not dead in SWIM, and
/// renewing their lease.
fn live_racks(view: &FieldView) -> BTreeSet<String> {
    view.racks
        .iter()
        .filter(|r| {
            r.admitted && !r.revoked && r.renewing && r.membership != Some(MemberState::Dead)
        })
        .map(|r| r.name.clone())
        .collect()
}

/// The live rack (other than `me`, one of `live`) that reported the newest
/// generation of `volume`: while one holds it, the volume must come from
/// it, never be created empty here. A holder that is down does not count:
/// the appliance is restarted here rather than wait for it.
fn held_elsewhere(
    field: &FieldState,
    me: &str,
    volume: &str,
    live: &BTreeSet<String>,
) -> Option<(String, u64)> {
    field
        .racks
        .iter()
        .filter(|(rack, _)| rack.as_str() != me && live.contains(rack.as_str()))
        .filter_map(|(rack, r)| Some((rack.clone(), *r.volumes.get(volume)?)))
        .filter(|(_, g)| *g > 0)
        .max_by_key(|(_, g)| *g)
}

/// An instance's whole life, in its own task: prepare its volumes
/// (promotion), launch it unless its deadline or a stop comes first, then
/// own it until it ended (see [`instance::supervise`]).
pub(super) async fn run_instance(
    sup: Arc<Supervisor>,
    spec: ApplianceSpec,
    epoch: u64,
    stop: watch::Receiver<Option<StopRequest>>,
    tx: mpsc::Sender<Report>,
) {
    let app = spec.name.clone();
    let started = Instant::now();
    let mut vols = Vec::new();
    let mut how = BTreeMap::new();
    let live = if spec.volume.is_empty() {
        BTreeSet::new()
    } else {
        live_racks(&sup.control.field_view().await)
    };
    for v in &spec.volume {
        let elsewhere = held_elsewhere(&sup.control.state().borrow(), &sup.rack, &v.name, &live);
        match sup.volumes.ensure_owned(&v.name, v.size, elsewhere).await {
            Ok((path, h)) => {
                how.insert(v.name.clone(), h);
                vols.push((v.name.clone(), path));
            }
            Err(e) => {
                let stranded = matches!(e, datastore::service::VolumeError::HeldElsewhere { .. });
                let error = format!("volume {}: {e}", v.name);
                let _ = tx
                    .send(Report::NotLaunched {
                        app,
                        epoch,
                        error,
                        volumes: true,
                        stranded,
                    })
                    .await;
                return;
            }
        }
    }
    let mut guard = Guard {
        app: app.clone(),
        epoch,
        cfg: sup.control.lease_config(),
        stop_grace: Duration::from_millis(spec.stop_grace_ms),
        lease: sup.lease.subscribe(),
        stop,
    };
    let launch = drivers::launch(LaunchSpec {
        rack: &sup.rack,
        spec: &spec,
        epoch,
        volumes: vols,
        run_dir: sup.run_root.join(&app),
    });
    let launched = tokio::select! {
        biased;
        () = guard.must_not_run() => None,
        r = launch => Some(r),
    };
    let inst = match launched {
        Some(Ok(inst)) => inst,
        Some(Err(e)) => {
            let _ = tx
                .send(Report::NotLaunched {
                    app,
                    epoch,
                    error: e.to_string(),
                    volumes: false,
                    stranded: false,
                })
                .await;
            return;
        }
        None => {
            let _ = tx
                .send(Report::NotLaunched {
                    app,
                    epoch,
                    error: "stopped before it was launched".into(),
                    volumes: true,
                    stranded: false,
                })
                .await;
            return;
        }
    };
    let hooks = inst.pause_hooks();
    let qemu = spec.driver == DriverKind::Qemu;
    for v in &spec.volume {
        sup.volumes.set_pause_hooks(&v.name, Some(hooks.clone()));
        sup.volumes.set_external_capture(&v.name, qemu);
    }
    let launched = Report::Launched {
        app: app.clone(),
        epoch,
        pid: inst.pid(),
        capturer: inst.capturer(),
        volumes: how,
        prepare_ms: started.elapsed().as_millis() as u64,
    };
    // Supervision starts now; the report waits for queue room alongside.
    let (ended, _) = tokio::join!(instance::supervise(inst, guard), tx.send(launched));
    for v in &spec.volume {
        sup.volumes.set_pause_hooks(&v.name, None);
        sup.volumes.set_external_capture(&v.name, false);
    }
    let _ = tx.send(Report::Ended { app, epoch, ended }).await;
}

/// Planned transfer away from us, once the appliance is stopped: ship
/// its volumes to the new owner, then release it. True once released.
pub(super) async fn hand_over(
    sup: &Supervisor,
    spec: &ApplianceSpec,
    epoch: u64,
    to: &str,
) -> bool {
    let mut shipped = BTreeMap::new();
    for v in &spec.volume {
        if !sup.owns(&v.name).await {
            continue;
        }
        match sup.volumes.ship(&v.name, to).await {
            Ok(g) => {
                shipped.insert(v.name.clone(), g);
            }
            Err(e) => {
                tracing::warn!(appliance = %spec.name, volume = %v.name, %to, error = %e, "handover shipment failed; will retry");
                return false;
            }
        }
    }
    let cmd = Command::Released {
        name: spec.name.clone(),
        epoch,
        volumes: shipped.clone(),
    };
    match sup.control.propose(cmd, Duration::from_secs(5)).await {
        Ok(_) => {
            tracing::info!(appliance = %spec.name, %to, ?shipped, "handed over");
            sup.event(
                "appliance_handed_over",
                serde_json::json!({"appliance": spec.name, "epoch": epoch, "to": to, "volumes": shipped}),
            );
            true
        }
        Err(e) => {
            tracing::warn!(appliance = %spec.name, error = %e, "release not committed; will retry");
            false
        }
    }
}

/// QEMU appliances: point-in-time copies made by QEMU itself
/// (`blockdev-backup` over QMP), so the VM is never paused for a snapshot.
/// Each volume's capture copies only what the guest wrote since the
/// store's newest generation when the drive's dirty bitmap is provably
/// clean against it, else the whole disk (see `drivers::qemu`).
pub(super) async fn capture(sup: &Supervisor, spec: &ApplianceSpec, capturer: &Capturer) {
    let held = sup.volumes.held_generations().await;
    let dir = sup.run_root.join(&spec.name);
    for v in &spec.volume {
        let latest = held.get(&v.name).copied().filter(|g| *g > 0);
        match capture_volume(&sup.volumes, capturer, &v.name, &dir, latest).await {
            Ok(Some(c)) => tracing::info!(
                volume = %v.name,
                generation = c.generation,
                base = c.base,
                copied = c.copied,
                bytes_read = c.bytes_read,
                "captured through QMP"
            ),
            Ok(None) => tracing::debug!(volume = %v.name, "nothing written since the last capture"),
            Err(e) => tracing::warn!(volume = %v.name, error = %e, "QMP capture failed"),
        }
    }
}

/// What one volume's capture recorded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Recorded {
    /// The new generation.
    pub generation: u64,
    /// The generation it was built on (an incremental capture).
    pub base: Option<u64>,
    /// Bytes QEMU copied.
    pub copied: u64,
    /// Bytes the store read from the capture.
    pub bytes_read: u64,
}

/// Why a volume's capture recorded nothing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CaptureError {
    /// QEMU could not make the copy.
    #[error("capture: {0}")]
    Driver(#[from] drivers::DriverError),
    /// The store did not record it.
    #[error("recording the capture: {0}")]
    Store(#[from] datastore::service::VolumeError),
}

/// Capture `volume` (the store's newest generation of it is `latest`)
/// and record it as its next generation; tell the capturer's bitmap
/// ledger whether the store committed it. `Ok(None)`: nothing written.
pub(crate) async fn capture_volume(
    volumes: &datastore::service::VolumeService,
    capturer: &Capturer,
    volume: &str,
    dir: &std::path::Path,
    latest: Option<u64>,
) -> Result<Option<Recorded>, CaptureError> {
    let Some(c) = capturer.capture_since(volume, dir, latest).await? else {
        return Ok(None);
    };
    let recorded = match &c.kind {
        // A complete copy: base 0 reads all of it.
        CaptureKind::Full => {
            volumes
                .snapshot_changed(volume, c.source.clone(), 0, Vec::new())
                .await
        }
        CaptureKind::Changed { base, ranges } => {
            volumes
                .snapshot_changes_only(volume, c.source.clone(), *base, ranges.clone())
                .await
        }
    };
    match recorded {
        Ok(r) => {
            capturer.committed(volume, r.manifest.generation);
            Ok(Some(Recorded {
                generation: r.manifest.generation,
                base: r.base,
                copied: c.copied,
                bytes_read: r.bytes_read,
            }))
        }
        Err(e) => {
            capturer.abandoned(volume);
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control::RackReport;

    #[test]
    fn the_newest_holder_elsewhere_is_named() {
        let mut field = FieldState::default();
        for (rack, g) in [("a", Some(9)), ("b", Some(4)), ("c", None), ("d", Some(0))] {
            let mut r = RackReport::default();
            if let Some(g) = g {
                r.volumes.insert("vol".into(), g);
            }
            field.racks.insert(rack.into(), r);
        }
        let all: BTreeSet<String> = ["a", "b", "c", "d"].map(String::from).into();
        assert_eq!(
            held_elsewhere(&field, "c", "vol", &all),
            Some(("a".into(), 9))
        );
        assert_eq!(
            held_elsewhere(&field, "a", "vol", &all),
            Some(("b".into(), 4))
        );
        assert_eq!(held_elsewhere(&field, "c", "other", &all), None);
        let a_down: BTreeSet<String> = ["b", "c", "d"].map(String::from).into();
        assert_eq!(
            held_elsewhere(&field, "c", "vol", &a_down),
            Some(("b".into(), 4)),
            "a holder that is down does not count"
        );
        let only_d = FieldState {
            racks: field.racks.into_iter().filter(|(r, _)| r == "d").collect(),
            ..FieldState::default()
        };
        assert_eq!(
            held_elsewhere(&only_d, "c", "vol", &all),
            None,
            "generation 0 is nothing"
        );
    }
}
