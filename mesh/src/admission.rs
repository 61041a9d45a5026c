//! Fleet admission as a sans-IO state machine.
//!
//! libp2p-tls authenticates the remote PeerId; this decides whether that
//! PeerId belongs to the fleet. A peer is *admitted* once it presented a
//! certificate that verifies (fleet key, fleet name, bound to its PeerId,
//! unexpired) and whose PeerId is not revoked. Until then the node sends it
//! nothing but its own certificate and accepts nothing but its certificate;
//! if none arrives within the admission timeout the peer is disconnected.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use deploy::cert::{CertBody, CertError};
use deploy::{Certificate, Revocation, RevocationBody};
use libp2p::identity::ed25519;
use libp2p::PeerId;

/// Most revoked PeerIds remembered. A fleet has tens of racks; the bound
/// only stops a compromised fleet key holder... or a bug... from growing the
/// set without limit.
pub const MAX_REVOKED: usize = 4096;

/// Most peers waiting to present a certificate at once: connections beyond
/// the connection limit never get here, so this is a second line of defence.
pub const MAX_PENDING: usize = 1024;

/// Why a peer was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdmitError {
    /// The certificate did not verify.
    #[error("certificate refused: {0}")]
    Certificate(#[from] CertError),
    /// The PeerId was revoked by the fleet.
    #[error("peer {0} is revoked")]
    Revoked(PeerId),
}

/// Why an admitted peer lost its admission while connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lapse {
    /// Its certificate is not valid at this time any more (it expired, or
    /// the clock was stepped back before its `not_before`).
    Expired {
        /// The certificate's `not_before` (unix seconds).
        not_before: u64,
        /// The certificate's `not_after` (unix seconds).
        not_after: u64,
    },
    /// Its PeerId is revoked.
    Revoked,
}

impl std::fmt::Display for Lapse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lapse::Expired {
                not_before,
                not_after,
            } => write!(
                f,
                "certificate no longer valid (valid {not_before}..{not_after})"
            ),
            Lapse::Revoked => f.write_str("revoked"),
        }
    }
}

/// The result of offering a revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeOutcome {
    /// New: persist it, spread it, drop the peer.
    New(RevocationBody),
    /// Already known.
    Known,
}

/// Admission state of one node.
#[derive(Debug)]
pub struct Admission {
    fleet_key: ed25519::PublicKey,
    fleet_name: String,
    timeout: Duration,
    /// Peers connected but not yet admitted, with their deadline.
    pending: HashMap<PeerId, Instant>,
    /// Admitted peers and what their certificate says.
    admitted: HashMap<PeerId, CertBody>,
    /// Revoked PeerIds.
    /// Revoked PeerIds, with the rack names their revocations give.
    revoked: HashMap<PeerId, String>,
    /// The signed revocations, to pass on.
    revocations: Vec<Revocation>,
}

impl Admission {
    /// A node of fleet `fleet_name` trusting `fleet_key`.
    pub fn new(fleet_key: ed25519::PublicKey, fleet_name: String, timeout: Duration) -> Self {
        Self {
            fleet_key,
            fleet_name,
            timeout,
            pending: HashMap::new(),
            admitted: HashMap::new(),
            revoked: HashMap::new(),
            revocations: Vec::new(),
        }
    }

    /// A connection to `peer` was established. Returns false if the peer is
    /// revoked or too many peers are pending (disconnect it now).
    pub fn connected(&mut self, peer: PeerId, now: Instant) -> bool {
        if self.revoked.contains_key(&peer) {
            return false;
        }
        if self.admitted.contains_key(&peer) || self.pending.contains_key(&peer) {
            return true;
        }
        if self.pending.len() >= MAX_PENDING {
            return false;
        }
        self.pending.insert(peer, now + self.timeout);
        true
    }

    /// All connections to `peer` closed: it must present its certificate
    /// again next time.
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.pending.remove(peer);
        self.admitted.remove(peer);
    }

    /// `peer` presented `cert`. `unix_now` is wall-clock seconds (for expiry).
    /// On success returns the body and whether the peer is newly admitted.
    ///
    /// # Errors
    /// [`AdmitError`]: disconnect the peer.
    pub fn present(
        &mut self,
        peer: PeerId,
        cert: &Certificate,
        unix_now: u64,
    ) -> Result<(CertBody, bool), AdmitError> {
        if self.revoked.contains_key(&peer) {
            return Err(AdmitError::Revoked(peer));
        }
        let body = cert.verify(&self.fleet_key, &self.fleet_name, &peer, unix_now)?;
        self.pending.remove(&peer);
        let newly = self.admitted.insert(peer, body.clone()).is_none();
        Ok((body, newly))
    }

    /// Peers whose admission deadline passed: disconnect them.
    pub fn expired(&mut self, now: Instant) -> Vec<PeerId> {
        let late: Vec<PeerId> = self
            .pending
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(p, _)| *p)
            .collect();
        for p in &late {
            self.pending.remove(p);
        }
        late
    }

    /// Re-check every admitted peer at `unix_now` (wall-clock seconds):
    /// a certificate is checked at admission, but connections outlive it,
    /// so this runs periodically while they stay up. The peers returned
    /// are no longer admitted: disconnect them. A revoked peer is normally
    /// dropped by [`Admission::revoke`] already; it is checked here too so
    /// that no path can leave one admitted.
    pub fn recheck(&mut self, unix_now: u64) -> Vec<(PeerId, CertBody, Lapse)> {
        let lapsed: Vec<(PeerId, Lapse)> = self
            .admitted
            .iter()
            .filter_map(|(peer, body)| {
                if self.revoked.contains_key(peer) {
                    Some((*peer, Lapse::Revoked))
                } else if unix_now < body.not_before || unix_now >= body.not_after {
                    Some((
                        *peer,
                        Lapse::Expired {
                            not_before: body.not_before,
                            not_after: body.not_after,
                        },
                    ))
                } else {
                    None
                }
            })
            .collect();
        lapsed
            .into_iter()
            .filter_map(|(peer, why)| {
                let body = self.admitted.remove(&peer)?;
                Some((peer, body, why))
            })
            .collect()
    }

    /// Is `peer` admitted (may rack data flow to and from it)?
    pub fn is_admitted(&self, peer: &PeerId) -> bool {
        self.admitted.contains_key(peer)
    }

    /// The certificate body of an admitted peer.
    pub fn admitted(&self, peer: &PeerId) -> Option<&CertBody> {
        self.admitted.get(peer)
    }

    /// All admitted peers.
    pub fn admitted_peers(&self) -> impl Iterator<Item = (&PeerId, &CertBody)> {
        self.admitted.iter()
    }

    /// Offer a revocation (from the API, the store, or a peer).
    ///
    /// # Errors
    /// [`CertError`] if it is not signed by our fleet.
    pub fn revoke(&mut self, rev: &Revocation) -> Result<RevokeOutcome, CertError> {
        let body = rev.verify(&self.fleet_key, &self.fleet_name)?;
        let peer: PeerId = body
            .peer_id
            .parse()
            .expect("verified by Revocation::verify");
        if self.revoked.contains_key(&peer) {
            return Ok(RevokeOutcome::Known);
        }
        if self.revoked.len() >= MAX_REVOKED {
            return Err(CertError::Malformed("revocation list full".into()));
        }
        self.revoked.insert(peer, body.rack.clone());
        self.revocations.push(rev.clone());
        self.pending.remove(&peer);
        self.admitted.remove(&peer);
        Ok(RevokeOutcome::New(body))
    }

    /// Is `peer` revoked?
    pub fn is_revoked(&self, peer: &PeerId) -> bool {
        self.revoked.contains_key(peer)
    }

    /// Every revoked peer, with its rack's name.
    pub fn revoked_peers(&self) -> impl Iterator<Item = (&PeerId, &String)> {
        self.revoked.iter()
    }

    /// Every revocation known, to pass on to newly admitted peers.
    pub fn revocations(&self) -> &[Revocation] {
        &self.revocations
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deploy::cert::CERT_VERSION;
    use deploy::{FleetKey, Role};

    fn cert(fleet: &FleetKey, name: &str, peer: &PeerId) -> Certificate {
        fleet.issue(&cert_body(name, peer))
    }

    fn cert_body(name: &str, peer: &PeerId) -> CertBody {
        CertBody {
            version: CERT_VERSION,
            fleet: name.into(),
            rack: "b".into(),
            peer_id: peer.to_base58(),
            role: Role::Rack,
            site: "s".into(),
            serial: 1,
            not_before: 0,
            not_after: 1_000,
        }
    }

    fn revocation(fleet: &FleetKey, peer: &PeerId) -> Revocation {
        fleet.revoke(&RevocationBody {
            version: CERT_VERSION,
            fleet: "f".into(),
            rack: "b".into(),
            peer_id: peer.to_base58(),
            revoked_at: 1,
            reason: "test".into(),
        })
    }

    #[test]
    fn valid_peer_is_admitted_once() {
        let fleet = FleetKey::generate();
        let mut a = Admission::new(fleet.public(), "f".into(), Duration::from_secs(3));
        let peer = PeerId::random();
        let t0 = Instant::now();
        assert!(a.connected(peer, t0));
        assert!(!a.is_admitted(&peer));
        let (_, newly) = a.present(peer, &cert(&fleet, "f", &peer), 10).unwrap();
        assert!(newly);
        assert!(a.is_admitted(&peer));
        let (_, newly) = a.present(peer, &cert(&fleet, "f", &peer), 10).unwrap();
        assert!(!newly);
        assert!(a.expired(t0 + Duration::from_secs(10)).is_empty());
    }

    #[test]
    fn silent_peer_times_out() {
        let fleet = FleetKey::generate();
        let mut a = Admission::new(fleet.public(), "f".into(), Duration::from_secs(3));
        let peer = PeerId::random();
        let t0 = Instant::now();
        a.connected(peer, t0);
        assert!(a.expired(t0 + Duration::from_secs(2)).is_empty());
        assert_eq!(a.expired(t0 + Duration::from_secs(3)), vec![peer]);
        assert!(!a.is_admitted(&peer));
    }

    #[test]
    fn foreign_and_stolen_certificates_are_refused() {
        let fleet = FleetKey::generate();
        let other = FleetKey::generate();
        let mut a = Admission::new(fleet.public(), "f".into(), Duration::from_secs(3));
        let peer = PeerId::random();
        a.connected(peer, Instant::now());
        assert!(a.present(peer, &cert(&other, "f", &peer), 10).is_err());
        assert!(a.present(peer, &cert(&fleet, "g", &peer), 10).is_err());
        let victim = PeerId::random();
        assert!(a.present(peer, &cert(&fleet, "f", &victim), 10).is_err());
        assert!(a.present(peer, &cert(&fleet, "f", &peer), 5_000).is_err());
        assert!(!a.is_admitted(&peer));
    }

    #[test]
    fn certificates_are_rechecked_while_connected() {
        let fleet = FleetKey::generate();
        let mut a = Admission::new(fleet.public(), "f".into(), Duration::from_secs(3));
        let (p, q) = (PeerId::random(), PeerId::random());
        a.connected(p, Instant::now());
        a.connected(q, Instant::now());
        a.present(p, &cert(&fleet, "f", &p), 10).unwrap(); // valid 0..1000
        let mut long = cert_body("f", &q);
        long.not_after = 5_000;
        a.present(q, &fleet.issue(&long), 10).unwrap();
        // Table: (unix now, peers that lapse at that moment).
        let table: [(u64, Vec<PeerId>); 4] = [
            (10, vec![]),
            (999, vec![]),
            (1_000, vec![p]),
            (4_999, vec![]),
        ];
        for (now, want) in table {
            let got: Vec<PeerId> = a
                .recheck(now)
                .into_iter()
                .map(|(peer, _, _)| peer)
                .collect();
            assert_eq!(got, want, "at {now}");
        }
        assert!(!a.is_admitted(&p));
        assert!(a.is_admitted(&q));
        // A clock stepped back before `not_before` lapses too.
        let lapsed = a.recheck(0);
        assert!(lapsed.is_empty(), "not_before is 0: {lapsed:?}");
        let mut later = cert_body("f", &p);
        later.not_before = 100;
        a.connected(p, Instant::now());
        a.present(p, &fleet.issue(&later), 200).unwrap();
        let lapsed = a.recheck(50);
        assert_eq!(lapsed.len(), 1);
        assert!(matches!(
            lapsed[0].2,
            Lapse::Expired {
                not_before: 100,
                ..
            }
        ));
        // The expired peer is refused if it presents the same certificate again.
        assert!(a.present(p, &fleet.issue(&later), 500).is_ok());
        assert!(a.present(q, &fleet.issue(&long), 5_000).is_err());
    }

    #[test]
    fn revocation_evicts_and_blocks() {
        let fleet = FleetKey::generate();
        let mut a = Admission::new(fleet.public(), "f".into(), Duration::from_secs(3));
        let peer = PeerId::random();
        a.connected(peer, Instant::now());
        a.present(peer, &cert(&fleet, "f", &peer), 10).unwrap();
        let rev = revocation(&fleet, &peer);
        assert!(matches!(a.revoke(&rev), Ok(RevokeOutcome::New(_))));
        assert_eq!(a.revoke(&rev), Ok(RevokeOutcome::Known));
        assert!(!a.is_admitted(&peer));
        assert!(!a.connected(peer, Instant::now()));
        assert_eq!(
            a.present(peer, &cert(&fleet, "f", &peer), 10),
            Err(AdmitError::Revoked(peer))
        );
        assert_eq!(a.revocations().len(), 1);
        // a revocation signed by someone else is refused
        let forged = revocation(&FleetKey::generate(), &PeerId::random());
        assert!(a.revoke(&forged).is_err());
    }
}
