//! The supervisor's effects that take time, each run in a task of its
//! own: an instance's whole life (volume promotion, launch, supervision),
//! a handover (final snapshot shipped, `Released` committed) and a QEMU
//! capture. None of them holds anything the supervisor loop, another
//! instance or the renewal loop needs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::Command;
use deploy::appliance::{ApplianceSpec, DriverKind};
use tokio::sync::{mpsc, watch};

use super::instance::{self, Guard, StopRequest};
use super::{Report, Supervisor};
use crate::drivers::{self, Capturer, LaunchSpec};

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
    for v in &spec.volume {
        match sup.volumes.ensure_owned(&v.name, v.size).await {
            Ok((path, h)) => {
                how.insert(v.name.clone(), h);
                vols.push((v.name.clone(), path));
            }
            Err(e) => {
                let error = format!("volume {}: {e}", v.name);
                let _ = tx
                    .send(Report::NotLaunched {
                        app,
                        epoch,
                        error,
                        volumes: true,
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
pub(super) async fn capture(sup: &Supervisor, spec: &ApplianceSpec, capturer: &Capturer) {
    for v in &spec.volume {
        let dest = sup
            .run_root
            .join(&spec.name)
            .join(format!("capture-{}.raw", v.name));
        let r = match capturer.capture(&v.name, &dest).await {
            Ok(()) => sup
                .volumes
                .snapshot_from(&v.name, dest.clone())
                .await
                .map(|m| m.generation)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let _ = std::fs::remove_file(&dest);
        match r {
            Ok(g) => tracing::info!(volume = %v.name, generation = g, "captured through QMP"),
            Err(e) => tracing::warn!(volume = %v.name, error = %e, "QMP capture failed"),
        }
    }
}
