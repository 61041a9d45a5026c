//! Single flight: one upstream fetch per key, streamed to every waiter.
//!
//! The first request for a key that is not in the store *starts* a flight
//! (a task independent of any client, so a cacheable fetch completes and is
//! stored even if every client goes away); later requests for the same key
//! *join* it. There is no timeout after which a joiner gives up and sends
//! its own request: waiters wait for the one fetch, however long it takes
//! (the fetch itself has upstream timeouts, and then every waiter learns
//! the same outcome).
//!
//! Bytes fan out as they arrive. The flight holds the only copy of the body
//! while it is fetched: while it may still be stored (and joiners may still
//! come) it keeps every chunk, so a joiner gets the whole body from the
//! start; once it will not be stored (uncacheable, larger than
//! [`crate::store::MAX_OBJECT_BYTES`], or over the byte budget) or once it
//! is stored, it takes no more joiners and keeps only what some waiter has
//! not read yet, at most [`OVERFLOW_WINDOW`] bytes behind the newest: a
//! waiter that falls further behind loses its response (its connection is
//! cut, so the client sees a truncated transfer, never a wrong one).
//!
//! Every chunk held counts against one budget for the whole proxy,
//! [`MAX_FLIGHT_BYTES`]. A fetch that would exceed it gives up storing
//! first (dropping what no waiter still needs); a fetch that still cannot
//! get room waits for its waiters to read (backpressure on the upstream),
//! and is abandoned after [`BUDGET_WAIT`]. A fetch whose body will not be
//! stored stops as soon as no waiter is left ([`Flight::readers_gone`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::HeaderMap;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::store::{KeyHash, MAX_OBJECT_BYTES};

/// Bytes kept for waiters once a flight no longer keeps the whole body.
pub const OVERFLOW_WINDOW: usize = 8 * 1024 * 1024;
/// Body bytes all flights together may hold in memory: four objects of the
/// largest storable size. Beyond it fetches stop storing, then wait; the
/// agent's memory stays bounded however many large downloads run at once.
pub const MAX_FLIGHT_BYTES: usize = 256 * 1024 * 1024;
/// How long a fetch waits for room in [`MAX_FLIGHT_BYTES`] (its waiters
/// reading) before it is abandoned: as long as an upstream may stay silent.
pub const BUDGET_WAIT: Duration = Duration::from_secs(30);

/// What the flight learned first.
#[derive(Debug, Clone)]
pub enum Head {
    /// A response whose body follows as chunks.
    Response {
        /// Status.
        status: u16,
        /// End-to-end headers.
        headers: HeaderMap,
        /// Whether it is meant to be stored once complete (whether it
        /// was is [`Subscriber::stored`]).
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
    /// The response declared more bytes than are left of the class's
    /// share of today's quota; its body was not fetched.
    TooLarge { declared: u64, left: u64 },
    /// The upstream answered with something that is not what we asked
    /// for (a tile source returning HTML: a captive portal).
    WrongContent,
    /// The destination policy refused the destination: nothing was sent.
    Refused(crate::policy::Refusal),
}

/// Why a chunk could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// No room in [`MAX_FLIGHT_BYTES`] within [`BUDGET_WAIT`]: abandon.
    #[error("no room for the body in the proxy's in-flight byte budget")]
    Starved,
}

#[derive(Default)]
struct State {
    head: Option<Head>,
    /// Chunks held, each with its share of the byte budget.
    chunks: VecDeque<(Bytes, OwnedSemaphorePermit)>,
    /// Index (in the whole body's chunk sequence) of `chunks[0]`.
    first_index: usize,
    buffered: usize,
    /// Whether every chunk is kept (the body may still be stored, joiners
    /// may still come); false once the flight left the table.
    keep_all: bool,
    /// `Some(true)` complete, `Some(false)` failed midway.
    done: Option<bool>,
    /// Whether the body was stored, once known.
    stored: Option<bool>,
    joiners: usize,
    /// Each live subscriber's next chunk index.
    readers: HashMap<u64, usize>,
    next_reader: u64,
}

impl State {
    /// Drops chunks no reader needs (when not keeping all), and beyond the
    /// window whoever needs them.
    fn trim(&mut self) {
        if self.keep_all {
            return;
        }
        let needed = self.readers.values().copied().min().unwrap_or(usize::MAX);
        while self.first_index < needed && !self.chunks.is_empty() {
            self.pop();
        }
        while self.buffered > OVERFLOW_WINDOW && self.chunks.len() > 1 {
            self.pop();
        }
    }

    fn pop(&mut self) {
        let (c, _permit) = self.chunks.pop_front().expect("non-empty");
        self.buffered -= c.len();
        self.first_index += 1;
    }
}

/// One in-progress fetch.
pub struct Flight {
    state: Mutex<State>,
    version: watch::Sender<u64>,
    budget: Arc<Semaphore>,
}

impl std::fmt::Debug for Flight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flight").finish_non_exhaustive()
    }
}

impl Flight {
    fn new(budget: Arc<Semaphore>) -> Flight {
        Flight {
            state: Mutex::new(State {
                keep_all: true,
                ..State::default()
            }),
            version: watch::channel(0).0,
            budget,
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

    /// Stops keeping the whole body: no more joiners, chunks freed once
    /// every waiter read them. For a body that will not be stored, or was.
    pub fn stop_keeping(&self, flights: &Flights, key: &KeyHash) {
        flights.forget(key, self);
        let mut st = self.state.lock().expect("lock");
        st.keep_all = false;
        st.trim();
        drop(st);
        self.bump();
    }

    /// Appends a body chunk. `Ok(false)` once the body can no longer be
    /// stored (larger than [`MAX_OBJECT_BYTES`], or no room for all of it in
    /// the byte budget): the caller stops trying to store it. Waits (not
    /// longer than [`BUDGET_WAIT`]) for the waiters to read when even a
    /// window does not fit. Cancel-safe (a cancelled push adds nothing).
    ///
    /// # Errors
    /// [`PushError::Starved`]: abandon the fetch.
    pub async fn push(
        &self,
        chunk: Bytes,
        flights: &Flights,
        key: &KeyHash,
    ) -> Result<bool, PushError> {
        let want = u32::try_from(chunk.len().clamp(1, MAX_FLIGHT_BYTES)).unwrap_or(u32::MAX);
        let mut fits = true;
        let permit = match self.budget.clone().try_acquire_many_owned(want) {
            Ok(p) => p,
            Err(_) => {
                if self.state.lock().expect("lock").keep_all {
                    fits = false;
                    self.stop_keeping(flights, key);
                }
                match tokio::time::timeout(
                    BUDGET_WAIT,
                    self.budget.clone().acquire_many_owned(want),
                )
                .await
                {
                    Ok(Ok(p)) => p,
                    _ => return Err(PushError::Starved),
                }
            }
        };
        let mut st = self.state.lock().expect("lock");
        st.buffered += chunk.len();
        st.chunks.push_back((chunk, permit));
        if st.keep_all && st.buffered > MAX_OBJECT_BYTES {
            fits = false;
            drop(st);
            self.stop_keeping(flights, key);
        } else {
            fits &= st.keep_all;
            st.trim();
            drop(st);
            self.bump();
        }
        Ok(fits)
    }

    /// Marks the body complete (`ok`) or cut short.
    pub fn finish(&self, ok: bool) {
        self.state.lock().expect("lock").done = Some(ok);
        self.bump();
    }

    /// Records whether the body was stored.
    pub fn set_stored(&self, stored: bool) {
        self.state.lock().expect("lock").stored = Some(stored);
        self.bump();
    }

    /// The whole body, if the flight kept all of it and it is complete: what
    /// the leader stores. One chunk is handed over without a copy.
    pub fn body(&self) -> Option<Bytes> {
        let st = self.state.lock().expect("lock");
        if !st.keep_all || st.first_index != 0 || st.done != Some(true) {
            return None;
        }
        if st.chunks.len() == 1 {
            return Some(st.chunks[0].0.clone());
        }
        let mut v = Vec::with_capacity(st.buffered);
        for (c, _) in &st.chunks {
            v.extend_from_slice(c);
        }
        Some(Bytes::from(v))
    }

    fn subscribe_locked(self: &Arc<Self>, st: &mut State) -> Subscriber {
        let id = st.next_reader;
        st.next_reader += 1;
        st.readers.insert(id, 0);
        Subscriber {
            flight: self.clone(),
            rx: self.version.subscribe(),
            next: 0,
            id,
        }
    }

    /// A reader positioned at the start of the body.
    pub fn subscribe(self: &Arc<Self>) -> Subscriber {
        let mut st = self.state.lock().expect("lock");
        self.subscribe_locked(&mut st)
    }

    /// How many requests joined after the first.
    pub fn joiners(&self) -> usize {
        self.state.lock().expect("lock").joiners
    }

    /// Whether some waiter is still subscribed.
    pub fn has_readers(&self) -> bool {
        !self.state.lock().expect("lock").readers.is_empty()
    }

    /// Resolves once no waiter is subscribed. Cancel-safe.
    pub async fn readers_gone(&self) {
        let mut rx = self.version.subscribe();
        loop {
            if !self.has_readers() {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Body bytes this flight holds.
    pub fn buffered(&self) -> usize {
        self.state.lock().expect("lock").buffered
    }
}

/// Why a waiter's body stream ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The upstream body was cut short.
    #[error("upstream body ended early")]
    Truncated,
    /// This waiter fell more than [`OVERFLOW_WINDOW`] behind a body the
    /// flight does not keep whole.
    #[error("client too slow for an uncacheable large body")]
    FellBehind,
}

/// One waiter's view of a flight; unsubscribes on drop (so an uncacheable
/// fetch stops once its last waiter leaves).
pub struct Subscriber {
    flight: Arc<Flight>,
    rx: watch::Receiver<u64>,
    next: usize,
    id: u64,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let mut st = self.flight.state.lock().expect("lock");
        st.readers.remove(&self.id);
        st.trim();
        drop(st);
        self.flight.bump();
    }
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

    /// Waits until it is known whether the body was stored: true only once
    /// it really was. Cancel-safe.
    pub async fn stored(&mut self) -> bool {
        loop {
            {
                let st = self.flight.state.lock().expect("lock");
                if let Some(s) = st.stored {
                    return s;
                }
                if st.done == Some(false) || (!st.keep_all && st.done.is_none()) {
                    return false;
                }
            }
            if self.rx.changed().await.is_err() {
                return false;
            }
        }
    }

    /// The next body chunk; `None` at the end. Cancel-safe.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, StreamError>> {
        loop {
            {
                let mut st = self.flight.state.lock().expect("lock");
                if self.next < st.first_index {
                    return Some(Err(StreamError::FellBehind));
                }
                if let Some((c, _)) = st.chunks.get(self.next - st.first_index) {
                    let c = c.clone();
                    self.next += 1;
                    st.readers.insert(self.id, self.next);
                    if !st.keep_all {
                        st.trim();
                        drop(st);
                        // Room may have been freed for a fetch waiting on it.
                        self.flight.bump();
                    }
                    return Some(Ok(c));
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

/// The table of flights in progress, by key, and their byte budget.
pub struct Flights {
    map: Mutex<HashMap<KeyHash, Arc<Flight>>>,
    budget: Arc<Semaphore>,
    capacity: usize,
}

impl Default for Flights {
    fn default() -> Self {
        Flights::with_budget(MAX_FLIGHT_BYTES)
    }
}

impl std::fmt::Debug for Flights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights")
            .field("in_flight", &self.len())
            .finish()
    }
}

impl Flights {
    /// A table whose flights together hold at most `bytes` of body.
    pub fn with_budget(bytes: usize) -> Flights {
        Flights {
            map: Mutex::default(),
            budget: Arc::new(Semaphore::new(bytes)),
            capacity: bytes,
        }
    }

    /// Joins the flight for `key`, or creates it, subscribed from the start
    /// (atomically: nothing can be trimmed in between). Returns the flight,
    /// the subscription and whether the caller is its leader (and so must
    /// start the fetch and eventually call [`Flights::remove`]). A flight
    /// that already failed is not joined: its leader has yet to take it out
    /// of the table, and a client that retries at once must get a fetch of
    /// its own, not the same failure again.
    pub fn join(&self, key: &KeyHash) -> (Arc<Flight>, Subscriber, bool) {
        let mut map = self.map.lock().expect("lock");
        if let Some(f) = map.get(key) {
            let mut st = f.state.lock().expect("lock");
            if !matches!(st.head, Some(Head::Failed(_))) {
                st.joiners += 1;
                let sub = f.subscribe_locked(&mut st);
                return (f.clone(), sub, false);
            }
        }
        let f = Arc::new(Flight::new(self.budget.clone()));
        map.insert(*key, f.clone());
        let sub = f.subscribe();
        (f, sub, true)
    }

    /// Removes the flight for `key` if it is `flight` (called by the leader
    /// once the result is in the store, so later requests find it there);
    /// from then on it keeps only what its waiters have not read.
    pub fn remove(&self, key: &KeyHash, flight: &Arc<Flight>) {
        flight.stop_keeping(self, key);
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

    /// Body bytes all flights hold now (of [`MAX_FLIGHT_BYTES`]).
    pub fn bytes_held(&self) -> u64 {
        (self.capacity - self.budget.available_permits()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn joiners_share_one_flight_and_stream() {
        let flights = Arc::new(Flights::default());
        let key = [1u8; 16];
        let (f, mut early, leader) = flights.join(&key);
        assert!(leader);
        f.set_head(Head::Revalidated);
        assert!(matches!(early.head().await, Head::Revalidated));
        assert!(f
            .push(Bytes::from_static(b"ab"), &flights, &key)
            .await
            .unwrap());
        assert_eq!(early.next_chunk().await.unwrap().unwrap(), "ab");
        // A late joiner still gets the body from the start.
        let (g, mut late, leader2) = flights.join(&key);
        assert!(!leader2);
        assert!(Arc::ptr_eq(&f, &g));
        let waiter = tokio::spawn(async move { late.collect().await });
        f.push(Bytes::from_static(b"cd"), &flights, &key)
            .await
            .unwrap();
        f.finish(true);
        assert_eq!(waiter.await.unwrap().unwrap(), "abcd");
        assert_eq!(f.body().unwrap(), "abcd");
        assert_eq!(early.collect().await.unwrap(), "cd");
        assert_eq!(f.joiners(), 1);
        flights.remove(&key, &f);
        assert!(flights.is_empty());
        drop(early);
        assert_eq!(flights.bytes_held(), 0, "nobody needs the chunks any more");
    }

    #[tokio::test]
    async fn a_failed_flight_still_in_the_table_is_not_joined() {
        let flights = Arc::new(Flights::default());
        let key = [3u8; 16];
        let (failed, mut first, leader) = flights.join(&key);
        assert!(leader);
        failed.set_head(Head::Failed(FailKind::WrongContent));
        assert!(matches!(first.head().await, Head::Failed(_)));
        // Its leader has not removed it yet: a retry leads a new flight.
        let (retry, _sub, leader) = flights.join(&key);
        assert!(leader, "a retry must fetch again");
        assert!(!Arc::ptr_eq(&failed, &retry));
        // The old leader's removal leaves the new flight in place.
        flights.remove(&key, &failed);
        assert!(flights.contains(&key));
        flights.remove(&key, &retry);
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn oversized_bodies_stay_bounded() {
        let flights = Flights::default();
        let key = [2u8; 16];
        let (f, mut slow, _) = flights.join(&key);
        let mb = Bytes::from(vec![0u8; 1024 * 1024]);
        let mut fits = true;
        for _ in 0..(MAX_OBJECT_BYTES / mb.len() + 16) {
            fits &= f.push(mb.clone(), &flights, &key).await.unwrap();
        }
        assert!(!fits);
        assert!(f.buffered() <= OVERFLOW_WINDOW + mb.len());
        assert!(flights.is_empty(), "no joiners once overflowed");
        assert_eq!(
            slow.next_chunk().await.unwrap(),
            Err(StreamError::FellBehind)
        );
        f.finish(false);
        assert!(!slow.stored().await);
    }

    #[tokio::test]
    async fn uncacheable_bodies_keep_only_what_readers_lack() {
        let flights = Flights::default();
        let key = [3u8; 16];
        let (f, mut sub, _) = flights.join(&key);
        f.stop_keeping(&flights, &key);
        assert!(flights.is_empty());
        for _ in 0..4 {
            f.push(Bytes::from(vec![1u8; 1000]), &flights, &key)
                .await
                .unwrap();
        }
        assert_eq!(f.buffered(), 4000);
        sub.next_chunk().await.unwrap().unwrap();
        sub.next_chunk().await.unwrap().unwrap();
        assert_eq!(f.buffered(), 2000, "read chunks are freed");
        assert!(f.has_readers());
        drop(sub);
        assert!(!f.has_readers());
        assert_eq!(f.buffered(), 0);
        f.readers_gone().await;
        assert_eq!(flights.bytes_held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_byte_budget_stops_storing_then_waits_for_readers() {
        let flights = Flights::with_budget(10_000);
        let (a, _sa, _) = flights.join(&[4u8; 16]);
        let (b, mut sb, _) = flights.join(&[5u8; 16]);
        assert!(a
            .push(Bytes::from(vec![0; 6000]), &flights, &[4u8; 16])
            .await
            .unwrap());
        assert!(b
            .push(Bytes::from(vec![0; 3000]), &flights, &[5u8; 16])
            .await
            .unwrap());
        // No room for b's next chunk: b gives up storing, keeps what its
        // reader lacks, and waits for it to read.
        let key_b = [5u8; 16];
        let b2 = b.clone();
        let flights = Arc::new(flights);
        let fl = flights.clone();
        let push =
            tokio::spawn(async move { b2.push(Bytes::from(vec![0; 2000]), &fl, &key_b).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!push.is_finished());
        sb.next_chunk().await.unwrap().unwrap();
        assert_eq!(
            push.await.unwrap(),
            Ok(false),
            "pushed, but no longer storable"
        );
        assert!(flights.bytes_held() <= 10_000);
        // A flight that cannot get room while its reader sleeps is abandoned.
        let r = b.push(Bytes::from(vec![0; 9000]), &flights, &key_b).await;
        assert_eq!(r, Err(PushError::Starved));
    }
}
