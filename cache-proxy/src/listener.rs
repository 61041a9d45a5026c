//! Bounds on the proxy's listener: how many connections in all and per
//! client address, and how long a connection may sit without moving a byte.
//!
//! A flood of the proxy must never starve anyone else: not other proxy
//! clients (the per-client cap), not the admin API or the mesh sharing the
//! process's file descriptors (the global cap, derived from the open-file
//! limit), and not the proxy itself over time (every connection is timed
//! out: hyper's header-read timeout while waiting for a request head, and
//! [`Activity`] for a request or tunnel during which nothing moves).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::client_limits::ClientId;

/// The most connections the proxy ever holds, whatever the limit: map
/// clients open 6-8 each, a relief site has a few hundred devices.
pub const MAX_CONNECTIONS: usize = 4096;
/// The fewest connections a derived cap allows (a tiny open-file limit must
/// still leave the proxy usable).
pub const MIN_CONNECTIONS: usize = 16;
/// Descriptors left for everything but the proxy's connections when the cap
/// is derived from the open-file limit: the admin API (64 connections), the
/// mesh's sockets, sled and SQLite files, pack files, appliance pipes and
/// the proxy's own store, with room to spare.
pub const FD_RESERVE: u64 = 384;
/// Descriptors one proxy connection can hold: the client's socket and one
/// upstream (a tunnel's, or a fetch's).
pub const FDS_PER_CONNECTION: u64 = 2;

/// The global connection cap for an open-file soft limit of `soft`.
pub fn derive_cap(soft: u64) -> usize {
    let n = soft.saturating_sub(FD_RESERVE) / FDS_PER_CONNECTION;
    usize::try_from(n)
        .unwrap_or(usize::MAX)
        .clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
}

/// The global connection cap: `configured` if not 0, else derived from the
/// process's current open-file soft limit (read when the proxy starts, after
/// the agent raised it).
pub fn connection_cap(configured: usize) -> usize {
    if configured > 0 {
        return configured.min(MAX_CONNECTIONS);
    }
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    derive_cap(soft)
}

/// The key a client is counted under: its IPv4 address, or its IPv6 /64
/// (one device picks any address in its /64 at will).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Connections open per client (a [`ClientId`]: this rack's clients by
/// key; at a gateway, another rack's by that rack and key).
#[derive(Debug)]
pub struct ClientSlots {
    map: Mutex<HashMap<ClientId, usize>>,
    max: usize,
}

/// One connection's place in [`ClientSlots`]; released on drop.
#[derive(Debug)]
pub struct ClientSlot {
    slots: Arc<ClientSlots>,
    key: ClientId,
}

impl ClientSlots {
    /// At most `max` connections per client key. The map holds one entry
    /// per client with a connection open, so it is bounded by the global cap.
    pub fn new(max: usize) -> Arc<ClientSlots> {
        Arc::new(ClientSlots {
            map: Mutex::default(),
            max,
        })
    }

    /// A slot for a connection from `ip`, or `None` when it has `max`.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        self.try_take_for(ClientId::local(ip))
    }

    /// A slot for `key`, or `None` when it has `max`.
    pub fn try_take_for(self: &Arc<Self>, key: ClientId) -> Option<ClientSlot> {
        let mut m = self.map.lock().expect("lock");
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            slots: self.clone(),
            key,
        })
    }

    /// Connections open from `ip`'s key.
    pub fn count(&self, ip: IpAddr) -> usize {
        let m = self.map.lock().expect("lock");
        m.get(&ClientId::local(ip)).copied().unwrap_or(0)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut m = self.slots.map.lock().expect("lock");
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// When a connection last moved a byte.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last byte moved.
    pub fn idle_for(&self) -> Duration {
        let now = self.epoch.elapsed();
        now.saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Resolves once nothing moved for `limit`. Cancel-safe.
    pub async fn idle(&self, limit: Duration) {
        loop {
            let idle = self.idle_for();
            if idle >= limit {
                return;
            }
            tokio::time::sleep(limit - idle).await;
        }
    }
}

/// An I/O object that records its activity: every read or write that moves
/// bytes touches the shared [`Activity`]. It stays inside hyper's upgraded
/// stream, so a `CONNECT` tunnel is watched the same way.
#[derive(Debug)]
pub struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    /// Wraps `io`.
    pub fn new(io: T, activity: Arc<Activity>) -> Watched<T> {
        activity.touch();
        Watched { io, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What a connection holds while it is open (also inside a `CONNECT`
/// tunnel, which outlives hyper's connection): its global and per-client
/// slots and its activity clock.
#[derive(Debug)]
pub struct ConnGuard {
    /// The global slot.
    pub _global: tokio::sync::OwnedSemaphorePermit,
    /// The per-client slot.
    pub _client: ClientSlot,
    /// Last byte moved.
    pub activity: Arc<Activity>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn caps_follow_the_open_file_limit() {
        assert_eq!(derive_cap(1024), (1024 - 384) / 2);
        assert_eq!(derive_cap(0), MIN_CONNECTIONS);
        assert_eq!(derive_cap(400), MIN_CONNECTIONS);
        assert_eq!(derive_cap(1 << 20), MAX_CONNECTIONS);
        assert_eq!(derive_cap(u64::MAX), MAX_CONNECTIONS);
        assert!(connection_cap(0) >= MIN_CONNECTIONS);
        assert_eq!(connection_cap(7), 7);
    }

    #[test]
    fn per_client_slots_are_released() {
        let s = ClientSlots::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let one = s.try_take(a).unwrap();
        let _two = s.try_take(mapped).unwrap();
        assert!(
            s.try_take(a).is_none(),
            "mapped form counts as the same client"
        );
        assert!(s.try_take("10.0.0.2".parse().unwrap()).is_some());
        drop(one);
        assert_eq!(s.count(a), 1);
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let _x = s.try_take(v6a).unwrap();
        let _y = s.try_take(v6b).unwrap();
        assert!(s.try_take(v6a).is_none(), "one /64 is one client");
        // At a gateway, the same address behind two racks is two clients.
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let _b = s.try_take_for(ClientId::forwarded("b", ip)).unwrap();
        let _b2 = s.try_take_for(ClientId::forwarded("b", ip)).unwrap();
        assert!(s.try_take_for(ClientId::forwarded("b", ip)).is_none());
        assert!(s.try_take_for(ClientId::forwarded("c", ip)).is_some());
        assert!(s.try_take(ip).is_some(), "and neither is a local client");
    }

    proptest! {
        #[test]
        fn derived_cap_is_bounded_and_monotonic(a in any::<u64>(), b in any::<u64>()) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(derive_cap(lo) <= derive_cap(hi));
            prop_assert!((MIN_CONNECTIONS..=MAX_CONNECTIONS).contains(&derive_cap(a)));
            // Room is always left for the rest of the agent.
            if a >= FD_RESERVE + 2 * MIN_CONNECTIONS as u64 {
                prop_assert!(derive_cap(a) as u64 * FDS_PER_CONNECTION + FD_RESERVE <= a);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_resolves_only_after_silence() {
        let a = Arc::new(Activity::default());
        a.touch();
        let t0 = Instant::now();
        a.idle(Duration::from_secs(5)).await;
        assert!(t0.elapsed() >= Duration::from_secs(5));
    }
}
