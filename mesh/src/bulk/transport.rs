//! The QUIC transport parameters of bulk connections: what libp2p-quic
//! does not let us choose (congestion controller, initial RTT, windows).
//!
//! Windows are sized from the largest bandwidth-delay product the field's
//! links have: 50 Mbit/s at 40 ms (250 kB) and 2 Mbit/s at 600 ms
//! (150 kB). A window of a few BDPs keeps a link full through a loss
//! recovery and the receiver's disk stalls; a much larger one only lets a
//! loss-based controller fill the radio's queue, which delays the control
//! traffic (SWIM, Raft) sharing the link.

use std::sync::Arc;
use std::time::Duration;

use deploy::config::Congestion;
use quinn::congestion::{BbrConfig, ControllerFactory, CubicConfig, NewRenoConfig};
use quinn::{MtuDiscoveryConfig, TransportConfig, VarInt};

/// The largest bandwidth-delay product targeted: 50 Mbit/s × 40 ms.
pub const MAX_BDP: u64 = 50_000_000 / 8 * 40 / 1000;

/// Per-stream receive window: four BDPs (see the module doc).
pub const STREAM_WINDOW: u64 = 4 * MAX_BDP;

/// Per-connection receive window: two streams at full window (a push and
/// a fetch or cache copy at once).
pub const CONNECTION_WINDOW: u64 = 2 * STREAM_WINDOW;

/// Bytes in flight a sender allows itself per connection, as much as the
/// peer lets it have.
pub const SEND_WINDOW: u64 = CONNECTION_WINDOW;

/// RTT assumed before the first sample. quinn's default (333 ms) is
/// RFC 9002's; the field's worst link is a 600 ms satellite hop, whose
/// first handshake retransmission should not fire before its answer can
/// arrive, while a LAN pays only for a lost Initial.
pub const INITIAL_RTT: Duration = Duration::from_millis(600);

/// Concurrent streams a peer may open on one bulk connection: pushes and
/// fetches are one stream each, at most a few per peer link at a time;
/// cache copies are short. More are queued by QUIC flow control.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// Keep-alive: a quiet connection sends a PING this often, well inside
/// the idle timeout and NAT/firewall UDP state lifetimes.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// The congestion controller factory for `cc`.
#[must_use]
pub fn controller(cc: Congestion) -> Arc<dyn ControllerFactory + Send + Sync + 'static> {
    match cc {
        Congestion::Bbr => Arc::new(BbrConfig::default()),
        Congestion::Cubic => Arc::new(CubicConfig::default()),
        Congestion::Newreno => Arc::new(NewRenoConfig::default()),
    }
}

/// The transport config of every bulk connection (both directions).
/// `idle_timeout` is the mesh's: a radio fade shorter than it keeps the
/// connection.
#[must_use]
pub fn config(cc: Congestion, idle_timeout: Duration) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.congestion_controller_factory(controller(cc));
    t.initial_rtt(INITIAL_RTT);
    t.stream_receive_window(varint(STREAM_WINDOW));
    t.receive_window(varint(CONNECTION_WINDOW));
    t.send_window(SEND_WINDOW);
    t.max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.datagram_receive_buffer_size(None);
    t.keep_alive_interval(Some(KEEP_ALIVE.min(idle_timeout / 2)));
    let idle_ms = u32::try_from(idle_timeout.as_millis()).unwrap_or(u32::MAX);
    t.max_idle_timeout(Some(VarInt::from_u32(idle_ms).into()));
    t.mtu_discovery_config(Some(MtuDiscoveryConfig::default()));
    t.allow_spin(false);
    t
}

// The windows cover the targeted links, each at least twice: 2 Mbit/s at
// 600 ms and 50 Mbit/s at 40 ms.
const _: () = assert!(STREAM_WINDOW >= 2 * (2_000_000 / 8 * 600 / 1000));
const _: () = assert!(STREAM_WINDOW >= 2 * MAX_BDP);
const _: () = assert!(CONNECTION_WINDOW >= STREAM_WINDOW);

fn varint(v: u64) -> VarInt {
    VarInt::from_u64(v).expect("window constants fit a QUIC varint")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_congestion_setting_builds_its_controller() {
        use quinn::congestion::{Bbr, Cubic, NewReno};
        let now = std::time::Instant::now();
        let build = |cc| controller(cc).build(now, 1200).into_any();
        assert!(build(Congestion::Bbr).downcast::<Bbr>().is_ok());
        assert!(build(Congestion::Cubic).downcast::<Cubic>().is_ok());
        assert!(build(Congestion::Newreno).downcast::<NewReno>().is_ok());
        for cc in [Congestion::Bbr, Congestion::Cubic, Congestion::Newreno] {
            let _ = config(cc, Duration::from_secs(30));
        }
    }
}
