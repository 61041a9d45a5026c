//! Discovery of fleet peers on the local segment with mDNS (DNS-SD), via
//! `mdns-sd`.
//!
//! Each rack announces `_fieldrack._udp.local.` with TXT records naming its
//! fleet and PeerId, and browses for the same. Discovery is only a hint of
//! where to dial: admission still decides who gets in, so a forged
//! announcement costs one refused handshake. Multicast does not cross routed
//! radio links; static bootstrap addresses cover those.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The DNS-SD service type racks announce.
pub const SERVICE_TYPE: &str = "_fieldrack._udp.local.";

/// A fleet peer seen on the segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// Its PeerId (claimed; admission verifies).
    pub peer: PeerId,
    /// Where to dial it.
    pub addrs: Vec<Multiaddr>,
}

/// Why mDNS could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// mdns-sd refused.
    #[error("mdns: {0}")]
    Mdns(#[from] mdns_sd::Error),
}

/// The process's one mDNS responder, shared by everything that announces
/// or browses (the mesh's discovery, the proxy's advertisement): a second
/// `ServiceDaemon` would open a second set of multicast sockets and answer
/// the same queries twice.
///
/// Cheap to clone. The daemon starts on first use (a rack that neither
/// browses nor advertises never opens a multicast socket) and shuts down,
/// sending goodbyes for every service registered on it, when the token
/// given to [`Mdns::new`] is cancelled.
#[derive(Clone)]
pub struct Mdns {
    daemon: Arc<Mutex<Option<ServiceDaemon>>>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Mdns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let started = self.daemon.lock().map(|d| d.is_some()).unwrap_or(false);
        f.debug_struct("Mdns").field("started", &started).finish()
    }
}

impl Mdns {
    /// A handle; nothing starts until [`Mdns::daemon`] is called.
    #[must_use]
    pub fn new(cancel: CancellationToken) -> Self {
        Self {
            daemon: Arc::default(),
            cancel,
        }
    }

    /// The daemon, started on the first call. Must be called within a
    /// tokio runtime (the shutdown waits on a task).
    ///
    /// # Errors
    /// [`DiscoveryError`] if mdns-sd cannot start.
    pub fn daemon(&self) -> Result<ServiceDaemon, DiscoveryError> {
        let mut slot = self.daemon.lock().expect("mdns lock");
        if let Some(d) = &*slot {
            return Ok(d.clone());
        }
        let daemon = ServiceDaemon::new()?;
        let (cancel, stop) = (self.cancel.clone(), daemon.clone());
        tokio::spawn(async move {
            cancel.cancelled().await;
            // Sends the goodbye announcements from mdns-sd's own thread.
            let _ = stop.shutdown();
        });
        *slot = Some(daemon.clone());
        Ok(daemon)
    }
}

/// Start announcing and browsing on `mdns`. Found peers are sent on
/// `found` (a full channel drops the sighting: the next announcement
/// repeats it).
///
/// # Errors
/// [`DiscoveryError`] if the daemon cannot start or register.
pub fn spawn(
    mdns: &Mdns,
    fleet: &str,
    rack: &str,
    local: PeerId,
    port: u16,
    found: mpsc::Sender<Discovered>,
    cancel: CancellationToken,
) -> Result<(), DiscoveryError> {
    let daemon = mdns.daemon()?;
    let peer_b58 = local.to_base58();
    let short = &peer_b58[peer_b58.len().saturating_sub(8)..];
    let instance = format!("{rack}-{short}");
    let host = format!("fieldrack-{}-{short}.local.", rack);
    let mut props = HashMap::new();
    props.insert("fleet".to_string(), fleet.to_string());
    props.insert("peer".to_string(), peer_b58.clone());
    let info =
        ServiceInfo::new(SERVICE_TYPE, &instance, &host, "", port, props)?.enable_addr_auto();
    daemon.register(info)?;
    let events = daemon.browse(SERVICE_TYPE)?;
    let fleet = fleet.to_string();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                ev = events.recv_async() => {
                    let Ok(ev) = ev else { break };
                    if let ServiceEvent::ServiceResolved(svc) = ev {
                        if svc.txt_properties.get_property_val_str("fleet") != Some(fleet.as_str()) {
                            continue;
                        }
                        let Some(peer) = svc
                            .txt_properties
                            .get_property_val_str("peer")
                            .and_then(|p| p.parse::<PeerId>().ok())
                        else {
                            continue;
                        };
                        if peer == local {
                            continue;
                        }
                        let addrs: Vec<Multiaddr> = svc
                            .addresses
                            .iter()
                            .map(|ip| ip.to_ip_addr())
                            .filter(|ip| !ip.is_unspecified() && !ip.is_multicast())
                            .map(|ip| {
                                Multiaddr::from(ip)
                                    .with(Protocol::Udp(svc.port))
                                    .with(Protocol::QuicV1)
                                    .with(Protocol::P2p(peer))
                            })
                            .collect();
                        if !addrs.is_empty() {
                            tracing::debug!(%peer, ?addrs, "mdns: discovered");
                            let _ = found.try_send(Discovered { peer, addrs });
                        }
                    }
                }
            }
        }
        // The daemon is shared: stop browsing; the goodbyes go out when
        // its owner shuts it down.
        let _ = daemon.stop_browse(SERVICE_TYPE);
    });
    Ok(())
}
