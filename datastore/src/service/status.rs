//! The `volumes` part of the agent's status document.

use serde::{Deserialize, Serialize};

use super::pacing::Backlog;
use super::records::VolumeRecord;
use super::replication::Running;
use super::VolumeService;
use crate::replicate::blocking;
use crate::VolumeInfo;

/// `volumes[]` in the status document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// Volume name.
    pub name: String,
    /// Owning rack.
    pub owner: Option<String>,
    /// Newest generation held here.
    pub generation: Option<u64>,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Replicas (owner side only).
    pub replicas: Vec<ReplicaStatus>,
    /// Recovery point: seconds of writes that would be lost if the owner
    /// died now (age of the newest snapshot some replica holds); owner side.
    pub rpo_s: Option<f64>,
    /// Bytes of new generations the slowest replica does not hold yet (an
    /// upper bound: the chunk bytes each generation stored anew); owner side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_waiting: Option<u64>,
    /// Seconds until that replica is expected to catch up, from the
    /// measured push rate to it (absent until a push was measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
    /// The current snapshot interval (it grows while replication lags).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_interval_s: Option<f64>,
    /// Generations held here.
    pub generations_held: Vec<u64>,
    /// Path of the live raw image (owner side): what appliances open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Transfer in progress to or from this rack, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<String>,
}

/// `volumes[].replicas[]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Replica rack.
    pub rack: String,
    /// Newest generation it holds.
    pub generation: Option<u64>,
    /// How far behind the owner's newest snapshot it is, in seconds.
    pub lag_s: Option<f64>,
    /// Bytes of newer generations it does not hold yet (upper bound).
    #[serde(default)]
    pub bytes_waiting: u64,
    /// The measured push rate to it, bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_bytes_per_s: Option<f64>,
    /// Seconds until it holds the newest generation at that rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
}

impl VolumeService {
    /// The `volumes` part of the status document.
    pub async fn status(&self) -> Vec<VolumeStatus> {
        // Store reads stay off the runtime: the volume list and, per volume,
        // when its newest snapshot was taken (for lag and RPO).
        let st = self.store.clone();
        let list: Vec<(VolumeInfo, Option<u64>)> = blocking(move || {
            st.list()
                .map(|l| {
                    l.into_iter()
                        .map(|v| {
                            let created =
                                st.latest(&v.name).ok().flatten().map(|m| m.created_at_ms);
                            (v, created)
                        })
                        .collect()
                })
                .unwrap_or_default()
        })
        .await;
        let records = self.records.all();
        let running = self.running.lock().expect("running lock").clone();
        let now = util::time::unix_ms();
        list.into_iter()
            .map(|(v, latest_created)| {
                let rec = records.get(&v.name).cloned().unwrap_or_default();
                let image = v
                    .has_live_image
                    .then(|| self.store.image_path(&v.name).display().to_string());
                let (owner, replicas, rpo_s) = if v.has_live_image {
                    let (mut replicas, rpo_s) = replicas(&rec, latest_created, now);
                    let b = self.backlogs.lock().expect("backlogs lock");
                    for r in &mut replicas {
                        let backlog = Backlog {
                            waiting_bytes: b.waiting(&v.name, r.generation),
                            push_bytes_per_s: b.rate(&r.rack),
                        };
                        r.bytes_waiting = backlog.waiting_bytes;
                        r.push_bytes_per_s = backlog.push_bytes_per_s;
                        r.eta_s = backlog.eta().map(|d| round_s(d.as_secs_f64()));
                    }
                    (Some(self.settings.rack.clone()), replicas, rpo_s)
                } else {
                    (rec.owner.clone(), Vec::new(), None)
                };
                let slowest = replicas
                    .iter()
                    .max_by_key(|r| r.bytes_waiting)
                    .map(|r| (r.bytes_waiting, r.eta_s));
                let interval = self
                    .paces
                    .lock()
                    .expect("paces lock")
                    .get(&v.name)
                    .map(|p| p.interval.as_secs_f64());
                VolumeStatus {
                    transfer: transfer(&running, &v.name),
                    image,
                    owner,
                    generation: (v.generation > 0).then_some(v.generation),
                    size_bytes: v.size,
                    replicas,
                    rpo_s,
                    bytes_waiting: slowest.map(|(w, _)| w),
                    eta_s: slowest.and_then(|(_, e)| e),
                    snapshot_interval_s: interval.filter(|_| v.has_live_image),
                    generations_held: v.generations_held,
                    name: v.name,
                }
            })
            .collect()
    }
}

/// An owned volume's replicas with their lag behind its newest snapshot
/// (created at `latest_created`), and its recovery point at `now` (unix ms).
fn replicas(
    rec: &VolumeRecord,
    latest_created: Option<u64>,
    now: u64,
) -> (Vec<ReplicaStatus>, Option<f64>) {
    let reps = rec
        .replicas
        .iter()
        .map(|r| ReplicaStatus {
            rack: r.rack.clone(),
            generation: r.generation,
            lag_s: match (latest_created, r.generation_created_ms) {
                (Some(l), Some(c)) => Some(l.saturating_sub(c) as f64 / 1000.0),
                _ => None,
            },
            bytes_waiting: 0,
            push_bytes_per_s: None,
            eta_s: None,
        })
        .collect();
    let newest_replicated = rec
        .replicas
        .iter()
        .filter_map(|r| r.generation_created_ms)
        .max();
    (
        reps,
        newest_replicated.map(|c| now.saturating_sub(c) as f64 / 1000.0),
    )
}

/// Seconds to one decimal, for the status document.
fn round_s(s: f64) -> f64 {
    (s * 10.0).round() / 10.0
}

/// The push of `volume` in flight, described for an operator.
fn transfer(running: &Running, volume: &str) -> Option<String> {
    running
        .iter()
        .find(|((vol, _), _)| vol == volume)
        .map(|((_, rack), (generation, p))| {
            let (sent, total) = p.get();
            match (sent * 100).checked_div(total) {
                None => format!("offering generation {generation} to {rack}"),
                Some(pct) => format!(
                    "sending generation {generation} to {rack}: {pct}% ({sent} of {total} chunks)"
                ),
            }
        })
}
