//! Single flight: one upstream fetch per key, streamed to every waiter.
//!
//! The first request for a key that is not in the store *starts* a flight
//! (a task independent of any client, so the fetch completes and is stored
//! even if every client goes away); later requests for the same key *join*
//! it. There is no timeout after which a joiner gives up and sends its own
//! request: waiters wait for the one fetch, however long it takes (the
//! fetch itself has upstream timeouts, and then every waiter learns the
//! same outcome).
//!
//! Bytes fan out as they arrive: the flight keeps the chunks received so
//! far, so a joiner gets the whole body from the start, and each waiter
//! reads at its own pace. The buffer is bounded by
//! [`crate::store::MAX_OBJECT_BYTES`] (anything larger is not cached
//! anyway): beyond it the flight stops taking joiners and keeps only a
//! trailing window of [`OVERFLOW_WINDOW`] bytes; a waiter that falls
//! further behind than that loses its response (its connection is cut, so
//! the client sees a truncated transfer, never a wrong one). The fetch
//! never waits for a slow client.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hyper::HeaderMap;
use tokio::sync::watch;

use crate::store::{KeyHash, MAX_OBJECT_BYTES};

/// Bytes kept for waiters once a body outgrows [`MAX_OBJECT_BYTES`].
pub const OVERFLOW_WINDOW: usize = 8 * 1024 * 1024;

/// What the flight learned first.
#[derive(Debug, Clone)]
pub enum Head {
    /// A response whose body follows as chunks.
    Response {
        /// Status.
        status: u16,
        /// End-to-end headers.
        headers: HeaderMap,
        /// Whether it will be stored once complete.
        storing: bool,
        /// It came from a mesh peer, not the backhaul.
        from_peer: bool,
        /// Unix seconds the request was sent.
        request_time: u64,
        /// Unix seconds its head arrived.
        response_time: u64,
    },
    /// Our stored copy was revalidated (304) and freshened in the store:
    /// read it from there.
    Revalidated,
    /// No response: why.
    Failed(FailKind),
}

/// Why a flight produced no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// The backhaul (or this upstream) is known down or forced offline; not tried.
    Offline,
    /// Tried and could not reach it (connect/response timeout, unreachable).
    Unreachable,
    /// Reached it and the exchange failed (refused, reset, protocol error).
    Upstream,
    /// The daily backhaul quota for this class is used up.
    Quota,
    /// The upstream answered with something that is not what we asked
    /// for (a tile source returning HTML: a captive portal).
    WrongContent,
}

#[derive(Default)]
struct State {
    head: Option<Head>,
    chunks: VecDeque<Bytes>,
    /// Index (in the whole body's chunk sequence) of `chunks[0]`.
    first_index: usize,
    buffered: usize,
    overflowed: bool,
    /// `Some(true)` complete, `Some(false)` failed midway.
    done: Option<bool>,
    joiners: usize,
}

/// One in-progress fetch.
pub struct Flight {
    state: Mutex<State>,
    version: watch::Sender<u64>,
}

impl std::fmt::Debug for Flight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flight").finish_non_exhaustive()
    }
}

impl Flight {
    fn new() -> Flight {
        Flight {
            state: Mutex::new(State::default()),
            version: watch::channel(0).0,
        }
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Publishes the head (once).
    pub fn set_head(&self, head: Head) {
        self.state.lock().expect("lock").head = Some(head);
        self.bump();
    }

    /// Appends a body chunk. Returns false once the body outgrew the buffer
    /// bound (the caller should then stop trying to store it).
    pub fn push(&self, chunk: Bytes, flights: &Flights, key: &KeyHash) -> bool {
        let mut st = self.state.lock().expect("lock");
        st.buffered += chunk.len();
        st.chunks.push_back(chunk);
        let mut fits = true;
        if st.buffered > MAX_OBJECT_BYTES || st.overflowed {
            fits = false;
            if !st.overflowed {
                st.overflowed = true;
                drop(st);
                flights.forget(key, self);
                st = self.state.lock().expect("lock");
            }
            while st.buffered > OVERFLOW_WINDOW && st.chunks.len() > 1 {
                let c = st.chunks.pop_front().expect("non-empty");
                st.buffered -= c.len();
                st.first_index += 1;
            }
        }
        drop(st);
        self.bump();
        fits
    }

    /// Marks the body complete (`ok`) or cut short.
    pub fn finish(&self, ok: bool) {
        self.state.lock().expect("lock").done = Some(ok);
        self.bump();
    }

    /// A reader positioned at the start of the body.
    pub fn subscribe(self: &Arc<Self>) -> Subscriber {
        Subscriber {
            flight: self.clone(),
            rx: self.version.subscribe(),
            next: 0,
        }
    }

    /// How many requests joined after the first.
    pub fn joiners(&self) -> usize {
        self.state.lock().expect("lock").joiners
    }
}

/// Why a waiter's body stream ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The upstream body was cut short.
    #[error("upstream body ended early")]
    Truncated,
    /// This waiter fell more than [`OVERFLOW_WINDOW`] behind an oversized body.
    #[error("client too slow for an uncacheable large body")]
    FellBehind,
}

/// One waiter's view of a flight.
pub struct Subscriber {
    flight: Arc<Flight>,
    rx: watch::Receiver<u64>,
    next: usize,
}

impl Subscriber {
    /// Waits for the head. Cancel-safe.
    pub async fn head(&mut self) -> Head {
        loop {
            if let Some(h) = self.flight.state.lock().expect("lock").head.clone() {
                return h;
            }
            if self.rx.changed().await.is_err() {
                return Head::Failed(FailKind::Upstream);
            }
        }
    }

    /// The next body chunk; `None` at the end. Cancel-safe.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, StreamError>> {
        loop {
            {
                let st = self.flight.state.lock().expect("lock");
                if self.next < st.first_index {
                    return Some(Err(StreamError::FellBehind));
                }
                if let Some(c) = st.chunks.get(self.next - st.first_index) {
                    self.next += 1;
                    return Some(Ok(c.clone()));
                }
                match st.done {
                    Some(true) => return None,
                    Some(false) => return Some(Err(StreamError::Truncated)),
                    None => {}
                }
            }
            if self.rx.changed().await.is_err() {
                return Some(Err(StreamError::Truncated));
            }
        }
    }

    /// The whole body (for small bodies and tests).
    ///
    /// # Errors
    /// As [`Subscriber::next_chunk`].
    pub async fn collect(&mut self) -> Result<Bytes, StreamError> {
        let mut v = Vec::new();
        while let Some(c) = self.next_chunk().await {
            v.extend_from_slice(&c?);
        }
        Ok(Bytes::from(v))
    }

    /// Turns the subscriber into a stream of chunks.
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = Result<Bytes, StreamError>> + Send + 'static {
        futures::stream::unfold(
            self,
            |mut s| async move { s.next_chunk().await.map(|c| (c, s)) },
        )
    }
}

/// The table of flights in progress, by key.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<KeyHash, Arc<Flight>>>,
}

impl std::fmt::Debug for Flights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights")
            .field("in_flight", &self.len())
            .finish()
    }
}

impl Flights {
    /// Joins the flight for `key`, or creates it. Returns the flight and
    /// whether the caller is its leader (and so must start the fetch and
    /// eventually call [`Flights::remove`]).
    pub fn join(&self, key: &KeyHash) -> (Arc<Flight>, bool) {
        let mut map = self.map.lock().expect("lock");
        if let Some(f) = map.get(key) {
            f.state.lock().expect("lock").joiners += 1;
            return (f.clone(), false);
        }
        let f = Arc::new(Flight::new());
        map.insert(*key, f.clone());
        (f, true)
    }

    /// Removes the flight for `key` if it is `flight` (called by the leader
    /// once the result is in the store, so later requests find it there).
    pub fn remove(&self, key: &KeyHash, flight: &Arc<Flight>) {
        self.forget(key, flight);
    }

    fn forget(&self, key: &KeyHash, flight: &Flight) {
        let mut map = self.map.lock().expect("lock");
        if map
            .get(key)
            .is_some_and(|f| std::ptr::eq(Arc::as_ptr(f), flight))
        {
            map.remove(key);
        }
    }

    /// Whether a flight for `key` is in progress.
    pub fn contains(&self, key: &KeyHash) -> bool {
        self.map.lock().expect("lock").contains_key(key)
    }

    /// Flights in progress.
    pub fn len(&self) -> usize {
        self.map.lock().expect("lock").len()
    }

    /// Whether no flight is in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn joiners_share_one_flight_and_stream() {
        let flights = Arc::new(Flights::default());
        let key = [1u8; 16];
        let (f, leader) = flights.join(&key);
        assert!(leader);
        let mut early = f.subscribe();
        f.set_head(Head::Revalidated);
        assert!(matches!(early.head().await, Head::Revalidated));
        f.push(Bytes::from_static(b"ab"), &flights, &key);
        assert_eq!(early.next_chunk().await.unwrap().unwrap(), "ab");
        // A late joiner still gets the body from the start.
        let (g, leader2) = flights.join(&key);
        assert!(!leader2);
        let mut late = g.subscribe();
        let waiter = tokio::spawn(async move { late.collect().await });
        f.push(Bytes::from_static(b"cd"), &flights, &key);
        f.finish(true);
        assert_eq!(waiter.await.unwrap().unwrap(), "abcd");
        assert_eq!(early.collect().await.unwrap(), "cd");
        assert_eq!(f.joiners(), 1);
        flights.remove(&key, &f);
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn oversized_bodies_stay_bounded() {
        let flights = Flights::default();
        let key = [2u8; 16];
        let (f, _) = flights.join(&key);
        let mut slow = f.subscribe();
        let mb = Bytes::from(vec![0u8; 1024 * 1024]);
        for _ in 0..(MAX_OBJECT_BYTES / mb.len() + 16) {
            f.push(mb.clone(), &flights, &key);
        }
        assert!(f.state.lock().unwrap().buffered <= OVERFLOW_WINDOW + mb.len());
        assert!(flights.is_empty(), "no joiners once overflowed");
        assert_eq!(
            slow.next_chunk().await.unwrap(),
            Err(StreamError::FellBehind)
        );
        f.finish(false);
    }
}
