//! Admin API connection slots: why a flood of silent connections cannot
//! lock an operator out.
//!
//! Every accepted connection starts in the *handshake* pool: it has not yet
//! sent a request carrying the API token. That pool is bounded (derived from
//! the open-file limit, see [`crate::limits`]) and, when it is full, a new
//! connection does not wait: the **oldest** waiting connection is shed
//! (closed) to make room. The same happens within one client address when
//! that address holds its share ([`ApiLimits::per_address`]), so one remote
//! host cannot fill the pool, and on loopback, where everyone shares
//! 127.0.0.1, the rule still holds. A waiting connection is also closed
//! after [`super::HEADER_READ_TIMEOUT`] at the latest.
//!
//! A connection whose request carries the valid token moves to the
//! *authenticated* pool, which connections without the token can never
//! enter: a request without it is answered 401 and its connection closed.
//! When the authenticated pool is full the request is answered 503 and the
//! connection closed. An authenticated connection idle for
//! [`super::HEADER_READ_TIMEOUT`] between requests is closed too.
//!
//! Why an honest client always gets through: say the handshake pool has
//! `n` slots and the client sends its request head `d` after connecting
//! (under a millisecond for the CLI on loopback). It is shed only if `n`
//! newer connections were accepted within `d`: silent connections, however
//! many, are older than it and are shed first. Once its head is read it
//! leaves the pool, so neither silence nor volume from others can touch it
//! afterwards. Accepting never waits for a slot, so it is never stuck in the
//! kernel's backlog behind silent connections either.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::limits::FdBudget;

/// The API's connection caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Connections that have not yet sent an authorized request.
    pub handshakes: usize,
    /// Of those, at most this many from one client address.
    pub per_address: usize,
    /// Connections that sent an authorized request.
    pub authenticated: usize,
}

impl ApiLimits {
    /// The caps from the process's descriptor budget. One address gets a
    /// quarter of the handshake slots (at least 4), so four remote hosts
    /// are needed to fill the pool; loopback clients share one address.
    pub fn from_budget(b: &FdBudget) -> Self {
        Self {
            handshakes: b.api_handshakes,
            per_address: (b.api_handshakes / 4).max(4),
            authenticated: b.api_authenticated,
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ApiConnStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Waiting connections shed to make room for a newer one.
    pub shed: AtomicU64,
    /// Connections closed for not sending a request head in time (after
    /// accepting, or idle between requests).
    pub timed_out: AtomicU64,
    /// Authorized requests refused (503) because the authenticated pool
    /// was full.
    pub refused: AtomicU64,
    /// `accept` failures (`EMFILE` and the like), each followed by a pause.
    pub accept_errors: AtomicU64,
}

/// The shared slot table.
#[derive(Debug)]
pub struct Slots {
    limits: ApiLimits,
    inner: Mutex<Inner>,
    /// Counters.
    pub stats: ApiConnStats,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    /// Waiting connections by age (ids grow).
    waiting: BTreeMap<u64, Waiting>,
    authenticated: usize,
}

#[derive(Debug)]
struct Waiting {
    ip: IpAddr,
    shed: CancellationToken,
}

const WAITING: u8 = 0;
const AUTHENTICATED: u8 = 1;
const GONE: u8 = 2;

/// One connection's hold on a slot; released on drop.
#[derive(Debug)]
pub struct Ticket {
    slots: Arc<Slots>,
    id: u64,
    state: AtomicU8,
    /// Cancelled when this connection is shed.
    pub shed: CancellationToken,
}

/// The authenticated pool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many authenticated API connections")]
pub struct Full;

impl Slots {
    /// An empty table with these caps.
    pub fn new(limits: ApiLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            inner: Mutex::new(Inner::default()),
            stats: ApiConnStats::default(),
        })
    }

    /// The caps.
    pub fn limits(&self) -> ApiLimits {
        self.limits
    }

    /// (waiting, authenticated) connections now.
    pub fn occupancy(&self) -> (usize, usize) {
        let inner = self.inner.lock().expect("slots lock");
        (inner.waiting.len(), inner.authenticated)
    }

    /// A connection from `ip` was accepted: it takes a waiting slot,
    /// shedding the oldest waiting connection of the same address if that
    /// address holds its share, else the oldest of all if the pool is full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Ticket {
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.inner.lock().expect("slots lock");
        let same: Vec<u64> = inner
            .waiting
            .iter()
            .filter(|(_, w)| w.ip == ip)
            .map(|(id, _)| *id)
            .collect();
        let victim = if same.len() >= self.limits.per_address {
            same.first().copied()
        } else if inner.waiting.len() >= self.limits.handshakes {
            inner.waiting.keys().next().copied()
        } else {
            None
        };
        if let Some(id) = victim {
            if let Some(w) = inner.waiting.remove(&id) {
                w.shed.cancel();
                self.stats.shed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let shed = CancellationToken::new();
        inner.waiting.insert(
            id,
            Waiting {
                ip,
                shed: shed.clone(),
            },
        );
        Ticket {
            slots: self.clone(),
            id,
            state: AtomicU8::new(WAITING),
            shed,
        }
    }
}

impl Ticket {
    /// This connection sent a request with the valid token: move it to the
    /// authenticated pool (no-op if it is there already).
    ///
    /// # Errors
    /// [`Full`]: answer 503 and close the connection (it holds no slot
    /// any more).
    pub fn authenticate(&self) -> Result<(), Full> {
        match self.state.load(Ordering::Acquire) {
            AUTHENTICATED => return Ok(()),
            GONE => return Err(Full),
            _ => {}
        }
        let mut inner = self.slots.inner.lock().expect("slots lock");
        inner.waiting.remove(&self.id);
        if inner.authenticated >= self.slots.limits.authenticated {
            self.state.store(GONE, Ordering::Release);
            self.slots.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Full);
        }
        inner.authenticated += 1;
        self.state.store(AUTHENTICATED, Ordering::Release);
        Ok(())
    }

    /// The table's counters.
    pub fn stats(&self) -> &ApiConnStats {
        &self.slots.stats
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut inner = self.slots.inner.lock().expect("slots lock");
        match self.state.load(Ordering::Acquire) {
            WAITING => {
                inner.waiting.remove(&self.id);
            }
            AUTHENTICATED => inner.authenticated -= 1,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> ApiLimits {
        ApiLimits {
            handshakes: 8,
            per_address: 4,
            authenticated: 2,
        }
    }

    const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn a_fresh_client_survives_any_number_of_silent_ones() {
        let slots = Slots::new(limits());
        let silent: Vec<Ticket> = (0..200).map(|_| slots.admit(LOOPBACK)).collect();
        let honest = slots.admit(LOOPBACK);
        assert!(!honest.shed.is_cancelled());
        assert_eq!(honest.authenticate(), Ok(()));
        // Another 1000 silent connections cannot touch it now.
        let more: Vec<Ticket> = (0..1000).map(|_| slots.admit(LOOPBACK)).collect();
        assert!(!honest.shed.is_cancelled());
        assert_eq!(slots.occupancy(), (4, 1));
        let shed = silent
            .iter()
            .chain(&more)
            .filter(|t| t.shed.is_cancelled())
            .count();
        assert_eq!(shed, 1200 - 4);
        assert_eq!(slots.stats.shed.load(Ordering::Relaxed), 1200 - 4);
    }

    #[test]
    fn one_address_cannot_take_the_whole_pool() {
        let slots = Slots::new(limits());
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let flood: Vec<Ticket> = (0..100).map(|_| slots.admit(a)).collect();
        let others: Vec<Ticket> = (0..4).map(|_| slots.admit(b)).collect();
        assert!(others.iter().all(|t| !t.shed.is_cancelled()));
        assert_eq!(flood.iter().filter(|t| !t.shed.is_cancelled()).count(), 4);
    }

    #[test]
    fn authenticated_pool_is_bounded_and_released() {
        let slots = Slots::new(limits());
        let t1 = slots.admit(LOOPBACK);
        let t2 = slots.admit(LOOPBACK);
        let t3 = slots.admit(LOOPBACK);
        assert_eq!(t1.authenticate(), Ok(()));
        assert_eq!(t1.authenticate(), Ok(()), "idempotent");
        assert_eq!(t2.authenticate(), Ok(()));
        assert_eq!(t3.authenticate(), Err(Full));
        assert_eq!(slots.occupancy(), (0, 2));
        drop(t1);
        let t4 = slots.admit(LOOPBACK);
        assert_eq!(t4.authenticate(), Ok(()));
        drop((t2, t3, t4));
        assert_eq!(slots.occupancy(), (0, 0));
    }

    proptest! {
        /// Whatever the sequence of arrivals, authentications and closes,
        /// the pools stay within their caps and empty out when every
        /// connection is gone.
        #[test]
        fn pools_stay_bounded(ops in prop::collection::vec((0u8..3, 0u8..4), 0..300)) {
            let slots = Slots::new(limits());
            let mut open: Vec<Ticket> = Vec::new();
            for (op, who) in ops {
                match op {
                    0 => open.push(slots.admit(IpAddr::V4([198, 18, 0, who].into()))),
                    1 => { if let Some(t) = open.get(usize::from(who) % open.len().max(1)) { let _ = t.authenticate(); } }
                    _ => { if !open.is_empty() { open.remove(usize::from(who) % open.len()); } }
                }
                open.retain(|t| !t.shed.is_cancelled());
                let (w, a) = slots.occupancy();
                prop_assert!(w <= limits().handshakes && a <= limits().authenticated);
            }
            drop(open);
            prop_assert_eq!(slots.occupancy(), (0, 0));
        }
    }
}
