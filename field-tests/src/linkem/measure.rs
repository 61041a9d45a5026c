//! Measuring a link from the outside, through real UDP sockets in two rack
//! namespaces: what the emulator's self-test and `field-tests linkem
//! --measure` report.
//!
//! - [`probe`]: a paced stream of small datagrams, well below the link's
//!   rate, each carrying its sequence number and send time; gives the loss
//!   ratio and the one-way delay. Sender and receiver share this machine's
//!   clock, so one-way delay needs no clock sync; arrival times are the
//!   kernel's receive timestamps (`SO_TIMESTAMPNS`), so a receiver thread
//!   that the scheduler wakes late does not count as link delay.
//! - [`flood`]: datagrams offered above the link's rate for a while; the
//!   receiver's byte count between its first and last datagram gives the
//!   rate the link delivers, `rate × (1 − loss)`.
//!
//! Byte counts are IP packet sizes (UDP payload + 28), the unit the
//! emulator's rate applies to.

use std::io::IoSliceMut;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
use nix::sys::time::TimeSpec;

use anyhow::{anyhow, ensure, Context, Result};

use crate::netns::Field;

/// IPv4 (20) plus UDP (8) header bytes.
pub const IP_UDP_OVERHEAD: usize = 28;

/// Port the measuring receiver listens on.
const PORT: u16 = 7398;

/// Receive buffer asked for the measuring socket: a flood at 1.3 × 1 Gbit/s
/// that the receiver thread falls 20 ms behind on fits.
const RCVBUF: usize = 4 << 20;

/// Bytes at the start of every datagram: sequence number and send time.
const HEADER: usize = 16;

/// What [`probe`] saw.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeReport {
    pub sent: u64,
    pub received: u64,
    /// One-way delays of the received probes, in arrival order.
    pub delays: Vec<Duration>,
    /// Sequence numbers of the received probes, in arrival order.
    pub seqs: Vec<u64>,
}

impl ProbeReport {
    pub fn loss(&self) -> f64 {
        1.0 - self.received as f64 / self.sent.max(1) as f64
    }

    pub fn mean_delay(&self) -> Duration {
        let total: Duration = self.delays.iter().sum();
        total / self.delays.len().max(1) as u32
    }

    /// The mean of the middle `1 − 2 × TRIM` of the one-way delays: the
    /// mean of a symmetric jitter, not moved by the few probes whose sender
    /// the scheduler paused between stamping and sending them.
    pub fn trimmed_mean_delay(&self) -> Duration {
        let mut sorted = self.delays.clone();
        sorted.sort_unstable();
        let cut = (sorted.len() as f64 * TRIM) as usize;
        let middle = &sorted[cut..sorted.len() - cut];
        middle.iter().sum::<Duration>() / middle.len().max(1) as u32
    }

    /// The median one-way delay: unlike the mean, not moved by the odd
    /// probe whose sender the scheduler paused.
    pub fn median_delay(&self) -> Duration {
        let mut sorted = self.delays.clone();
        sorted.sort_unstable();
        sorted.get(sorted.len() / 2).copied().unwrap_or_default()
    }

    pub fn min_delay(&self) -> Duration {
        self.delays.iter().copied().min().unwrap_or_default()
    }

    pub fn max_delay(&self) -> Duration {
        self.delays.iter().copied().max().unwrap_or_default()
    }

    /// The longest run of consecutive probes lost, e.g. by a fade.
    pub fn longest_gap(&self) -> u64 {
        let mut seqs = self.seqs.clone();
        seqs.sort_unstable();
        let mut prev: Option<u64> = None;
        let mut longest = 0;
        for seq in seqs.iter().copied().chain([self.sent]) {
            let missing = match prev {
                Some(p) => seq.saturating_sub(p + 1),
                None => seq,
            };
            longest = longest.max(missing);
            prev = Some(seq);
        }
        longest
    }
}

/// What [`flood`] saw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FloodReport {
    /// Offered, bits per second of IP packets.
    pub offered_bps: f64,
    /// Delivered, bits per second of IP packets, between the first and the
    /// last datagram received.
    pub delivered_bps: f64,
    pub sent: u64,
    pub received: u64,
}

/// Sends `count` probes of `payload` bytes from `from` to `to` at `per_sec`,
/// then waits `drain` for the stragglers.
pub fn probe(
    field: &Field,
    from: &str,
    to: &str,
    count: u64,
    per_sec: u64,
    payload: usize,
    drain: Duration,
) -> Result<ProbeReport> {
    ensure!(payload >= HEADER, "a probe carries at least {HEADER} bytes");
    let mut delays = Vec::with_capacity(count as usize);
    let mut seqs = Vec::with_capacity(count as usize);
    let (sent, received) = exchange(
        field,
        from,
        to,
        drain,
        |sock, dst| send_paced(sock, dst, count, per_sec, payload),
        |buf, arrived| {
            seqs.push(u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")));
            let sent_at = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
            delays.push(arrived.saturating_sub(Duration::from_nanos(sent_at)));
        },
    )?;
    Ok(ProbeReport {
        sent,
        received: received.count,
        delays,
        seqs,
    })
}

/// Offers `offered_bps` (IP bytes) of `payload`-byte datagrams from `from`
/// to `to` for `duration`, then waits `drain` for the queue to empty.
pub fn flood(
    field: &Field,
    from: &str,
    to: &str,
    offered_bps: u64,
    duration: Duration,
    payload: usize,
    drain: Duration,
) -> Result<FloodReport> {
    ensure!(
        payload >= HEADER,
        "a datagram carries at least {HEADER} bytes"
    );
    let wire_bits = ((payload + IP_UDP_OVERHEAD) * 8) as u64;
    let per_sec = (offered_bps / wire_bits).max(1);
    let count = (per_sec as f64 * duration.as_secs_f64()).ceil() as u64;
    // Datagrams per send: a burst every 100 µs or so, so a sender thread
    // keeps up with 1 Gbit/s (one datagram per system call does not).
    let burst = u16::try_from((per_sec / 10_000).clamp(1, MAX_GSO_SEGMENTS)).unwrap_or(1);
    let (sent, received) = exchange(
        field,
        from,
        to,
        drain,
        |sock, dst| send_bursts(sock, dst, count, per_sec, payload, burst),
        |_, _| {},
    )?;
    let span = received.last.saturating_sub(received.first).as_secs_f64();
    ensure!(
        received.count >= 2 && span > 0.0,
        "the flood delivered {} datagram(s): nothing to measure",
        received.count
    );
    // The first datagram's bytes were delivered before the span starts.
    let delivered_bits = ((received.count - 1) * wire_bits) as f64;
    Ok(FloodReport {
        offered_bps: (per_sec * wire_bits) as f64,
        delivered_bps: delivered_bits / span,
        sent,
        received: received.count,
    })
}

#[derive(Debug, Default)]
struct Received {
    count: u64,
    first: Duration,
    last: Duration,
}

/// Runs `send` in `from` and a receiver in `to` that calls `on_datagram`
/// with each datagram and its arrival time (see [`wall_clock`]) until
/// `drain` after the sender is done. Returns what `send` returned and the
/// counts.
fn exchange(
    field: &Field,
    from: &str,
    to: &str,
    drain: Duration,
    send: impl FnOnce(&UdpSocket, SocketAddrV4) -> Result<u64> + Send,
    mut on_datagram: impl FnMut(&[u8], Duration) + Send,
) -> Result<(u64, Received)> {
    let dst = SocketAddrV4::new(field.ip(to)?, PORT);
    let done = AtomicBool::new(false);
    let (ready_tx, ready_rx) = mpsc::sync_channel::<()>(1);
    std::thread::scope(|s| {
        let done = &done;
        let receiver = s.spawn(move || {
            let ready_tx = ready_tx;
            field.run_in(to, || {
                let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT))
                    .context("binding the measuring socket")?;
                // FORCE: past net.core.rmem_max, which is for unprivileged
                // sockets; the harness runs as root.
                setsockopt(&sock, sockopt::RcvBufForce, &RCVBUF).context("SO_RCVBUFFORCE")?;
                setsockopt(&sock, sockopt::ReceiveTimestampns, &true).context("SO_TIMESTAMPNS")?;
                sock.set_read_timeout(Some(Duration::from_millis(20)))?;
                let _ = ready_tx.send(());
                let mut got = Received::default();
                let mut buf = vec![0u8; 65536];
                let mut cmsg = nix::cmsg_space!(TimeSpec);
                let mut drain_until: Option<Instant> = None;
                loop {
                    if let Some(until) = drain_until {
                        if Instant::now() >= until {
                            return Ok(got);
                        }
                    } else if done.load(Ordering::SeqCst) {
                        drain_until = Some(Instant::now() + drain);
                    }
                    match receive(&sock, &mut buf, &mut cmsg) {
                        Ok(Some((n, arrived))) if n >= HEADER => {
                            if got.count == 0 {
                                got.first = arrived;
                            }
                            got.last = arrived;
                            got.count += 1;
                            on_datagram(&buf[..n], arrived);
                        }
                        Ok(_) => {}
                        Err(e) => return Err(e).context("receiving"),
                    }
                }
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| anyhow!("the receiver in rack {to} did not start"))?;
        let sent = field.run_in(from, || {
            let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
            send(&sock, dst)
        });
        done.store(true, Ordering::SeqCst);
        let received = receiver
            .join()
            .map_err(|_| anyhow!("the receiver panicked"))??;
        Ok((sent?, received))
    })
}

/// Sends `count` datagrams of `payload` bytes at `per_sec`, each stamped
/// with its sequence number and send time ([`wall_clock`]). A sender that falls
/// behind catches up in a burst, as an application would. Datagrams the
/// local stack refuses (`ENOBUFS` when the TUN's queue is full) are not
/// counted as sent. Returns the number sent.
fn send_paced(
    sock: &UdpSocket,
    dst: SocketAddrV4,
    count: u64,
    per_sec: u64,
    payload: usize,
) -> Result<u64> {
    let start = Instant::now();
    let mut buf = vec![0u8; payload];
    let mut sent = 0;
    for seq in 0..count {
        let due = start + Duration::from_secs_f64(seq as f64 / per_sec as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        buf[..8].copy_from_slice(&seq.to_le_bytes());
        let stamp = wall_clock().as_nanos() as u64;
        buf[8..16].copy_from_slice(&stamp.to_le_bytes());
        match sock.send_to(&buf, dst) {
            Ok(_) => sent += 1,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => {}
            Err(e) => return Err(e).with_context(|| format!("sending to {dst}")),
        }
    }
    Ok(sent)
}

/// Most datagrams in one send with UDP segmentation offload: 44 of the
/// flood's 1228-byte datagrams fill a 64 KiB super-packet.
const MAX_GSO_SEGMENTS: u64 = 44;

/// Like [`send_paced`], `burst` datagrams at a time in one send (UDP
/// segmentation offload: the kernel hands the TUN one super-packet, which
/// the emulator splits, so the link still sees single datagrams). Every
/// datagram carries its own sequence number and send time.
fn send_bursts(
    sock: &UdpSocket,
    dst: SocketAddrV4,
    count: u64,
    per_sec: u64,
    payload: usize,
    burst: u16,
) -> Result<u64> {
    if burst <= 1 {
        return send_paced(sock, dst, count, per_sec, payload);
    }
    let start = Instant::now();
    let mut buf = vec![0u8; payload * usize::from(burst)];
    let addr = nix::sys::socket::SockaddrIn::from(dst);
    let segment = u16::try_from(payload).context("a datagram fits a UDP segment")?;
    let mut sent = 0;
    let mut seq = 0;
    while seq < count {
        let n = u64::from(burst).min(count - seq);
        let due = start + Duration::from_secs_f64(seq as f64 / per_sec as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let stamp = wall_clock().as_nanos() as u64;
        for (i, d) in buf.chunks_mut(payload).take(n as usize).enumerate() {
            d[..8].copy_from_slice(&(seq + i as u64).to_le_bytes());
            d[8..16].copy_from_slice(&stamp.to_le_bytes());
        }
        let bytes = &buf[..payload * n as usize];
        let r = nix::sys::socket::sendmsg(
            sock.as_raw_fd(),
            &[std::io::IoSlice::new(bytes)],
            &[nix::sys::socket::ControlMessage::UdpGsoSegments(&segment)],
            MsgFlags::empty(),
            Some(&addr),
        );
        match r {
            Ok(_) => sent += n,
            Err(nix::errno::Errno::ENOBUFS) => {}
            Err(e) => return Err(e).with_context(|| format!("sending to {dst}")),
        }
        seq += n;
    }
    Ok(sent)
}

/// Time since the Unix epoch: the clock of the kernel's receive
/// timestamps, so send and receive times compare.
fn wall_clock() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

/// One datagram into `buf`: its length and kernel receive time, or `None`
/// if the read timed out.
fn receive(
    sock: &UdpSocket,
    buf: &mut [u8],
    cmsg: &mut Vec<u8>,
) -> Result<Option<(usize, Duration)>> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(cmsg), MsgFlags::empty()) {
        Ok(msg) => msg,
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return Ok(None),
        Err(e) => return Err(e).context("receiving"),
    };
    let mut arrived = None;
    for c in msg.cmsgs().context("reading control messages")? {
        if let ControlMessageOwned::ScmTimestampns(ts) = c {
            arrived = Some(Duration::from(ts));
        }
    }
    // No timestamp (should not happen once SO_TIMESTAMPNS is on): now.
    Ok(Some((msg.bytes, arrived.unwrap_or_else(wall_clock))))
}

/// Payload of a delay/loss probe: 92 bytes on the wire.
pub const PROBE_PAYLOAD: usize = 64;

/// Payload of a flood datagram: 1228 bytes on the wire, under the MTU.
pub const FLOOD_PAYLOAD: usize = 1200;

/// Most probes per second: a paced sender thread keeps up with this on a
/// busy 2-core machine.
const MAX_PROBES_PER_SEC: u64 = 4000;

/// Share of the link's rate the probes use, so they queue behind each
/// other rarely and their delay is the link's, not the queue's.
const PROBE_SHARE: f64 = 0.3;

/// The flood offers this much more than the link's rate, so the link's
/// queue never runs dry while the sender is paused by the scheduler.
const FLOOD_OVERLOAD: f64 = 1.3;

/// Share of the probes cut from each end of the delays before their
/// mean is taken ([`ProbeReport::trimmed_mean_delay`]). A scheduler that
/// pauses the probe sender between its time stamp and its send adds
/// milliseconds to the probes of the pause, a few in a hundred when the
/// machine is busy.
pub const TRIM: f64 = 0.05;

/// The delay of the reference link [`path_latency`] measures. Not zero:
/// with no delay, the emulator's writer thread wakes for each packet as it
/// comes, which a link with a delay hides within it (every profile's
/// delay is at least 0.1 ms), and the path would seem some 15 µs slower
/// than it is.
pub const REFERENCE_DELAY: Duration = Duration::from_micros(50);

/// How long [`path_latency`] probes the bare path.
const BASELINE_FOR: Duration = Duration::from_secs(1);

/// Relative tolerance of the self-test: 10 % of the profile.
pub const TOLERANCE: f64 = 0.10;

/// Floor of the delay tolerance: a thread waking from `sleep` some
/// microseconds late, and the spread between two runs of the path's own
/// latency; only `lan`'s 0.1 ms has a tenth below it.
pub const DELAY_FLOOR: Duration = Duration::from_micros(15);

/// Standard deviations a measured loss ratio may stray from the profile's
/// when that is wider than [`TOLERANCE`]: 3.3 σ fails a correct emulator
/// about once in a thousand runs. A short run cannot pin down a 0.1 % loss
/// to 10 % (that takes millions of packets; the core's unit tests do it).
pub const LOSS_SIGMAS: f64 = 3.3;

/// How long a self-test measures.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// How long the probe stream lasts.
    pub probe_for: Duration,
    /// How long the flood lasts.
    pub flood_for: Duration,
}

impl Plan {
    /// About 8 s per direction, for the test suite.
    pub const QUICK: Plan = Plan {
        probe_for: Duration::from_secs(4),
        flood_for: Duration::from_secs(2),
    };

    /// About a minute per direction: tighter loss figures.
    pub const LONG: Plan = Plan {
        probe_for: Duration::from_secs(40),
        flood_for: Duration::from_secs(10),
    };
}

/// One direction's self-test: the profile and what was measured through it.
#[derive(Clone, Debug)]
pub struct SelfTest {
    pub profile: super::Profile,
    /// The path's own one-way latency beside the link's ([`path_latency`]).
    pub baseline: Duration,
    pub probe: ProbeReport,
    pub flood: FloodReport,
}

/// Probes per second and how many, for a probe stream of `duration` over
/// a link of `profile`: [`PROBE_SHARE`] of its rate, at most
/// [`MAX_PROBES_PER_SEC`].
fn probe_pace(profile: &super::Profile, duration: Duration) -> (u64, u64) {
    let probe_bits = ((PROBE_PAYLOAD + IP_UDP_OVERHEAD) * 8) as f64;
    let per_sec =
        ((profile.rate_bps as f64 * PROBE_SHARE / probe_bits) as u64).clamp(1, MAX_PROBES_PER_SEC);
    ((per_sec as f64 * duration.as_secs_f64()) as u64, per_sec)
}

/// The one-way latency of the path itself, `a` → `b` and `b` → `a`: what
/// the emulator's two TUN hops and the measuring sockets cost beside the
/// link's delay. Measured through an emulated link with `profiles`' rates,
/// [`REFERENCE_DELAY`] and nothing else ([`super::Profile::bare`]), which
/// it builds and removes, as the trimmed mean of [`BASELINE_FOR`] of
/// probes less that delay. A self-test takes it off what it measures
/// before comparing with the profile's delay. Call it while `a` and `b`
/// have no emulated link.
pub fn path_latency(
    field: &Field,
    a: &str,
    b: &str,
    profiles: &super::LinkProfile,
) -> Result<[Duration; 2]> {
    let bare = super::LinkProfile::asymmetric(
        profiles.a_to_b.bare(REFERENCE_DELAY),
        profiles.b_to_a.bare(REFERENCE_DELAY),
    );
    let _link = super::EmulatedLink::between(field, a, b, bare, 0)?;
    let mut latency = [Duration::ZERO; 2];
    let directions = [(a, b, &profiles.a_to_b), (b, a, &profiles.b_to_a)];
    for (slot, (from, to, profile)) in latency.iter_mut().zip(directions) {
        let (count, per_sec) = probe_pace(profile, BASELINE_FOR);
        let drain = profile.queue + Duration::from_millis(300);
        let report = probe(field, from, to, count, per_sec, PROBE_PAYLOAD, drain)?;
        ensure!(
            report.received * 2 > count,
            "{from} -> {to}: only {} of {count} probes crossed a link without loss",
            report.received
        );
        *slot = report.trimmed_mean_delay().saturating_sub(REFERENCE_DELAY);
    }
    Ok(latency)
}

impl SelfTest {
    /// Measures the direction `from` → `to` of an emulated link with
    /// `profile`: a probe stream, then a flood. `baseline`: the path's own
    /// latency that way ([`path_latency`]).
    pub fn run(
        field: &Field,
        from: &str,
        to: &str,
        profile: &super::Profile,
        baseline: Duration,
        plan: Plan,
    ) -> Result<SelfTest> {
        let drain = profile.queue + profile.delay + profile.jitter + Duration::from_millis(300);
        let (count, per_sec) = probe_pace(profile, plan.probe_for);
        let probe = probe(field, from, to, count, per_sec, PROBE_PAYLOAD, drain)?;
        let offered = (profile.rate_bps as f64 * FLOOD_OVERLOAD) as u64;
        let flood = flood(
            field,
            from,
            to,
            offered,
            plan.flood_for,
            FLOOD_PAYLOAD,
            drain,
        )?;
        Ok(SelfTest {
            profile: profile.clone(),
            baseline,
            probe,
            flood,
        })
    }

    /// The one-way delay the link adds to a probe beyond the bare path's
    /// (which has its serialisation too): the profile's delay.
    pub fn expected_delay(&self) -> Duration {
        self.profile.delay
    }

    /// The one-way delay the link added to the probes: their trimmed mean
    /// less the bare path's.
    pub fn added_delay(&self) -> Duration {
        self.probe
            .trimmed_mean_delay()
            .saturating_sub(self.baseline)
    }

    /// The rate a saturated link should deliver: lost packets used the link
    /// too.
    pub fn expected_rate(&self) -> f64 {
        self.profile.rate_bps as f64 * (1.0 - self.profile.loss.ratio())
    }

    /// How far the measured loss ratio may be from the profile's: 10 %, or
    /// [`LOSS_SIGMAS`] standard deviations of the estimate if wider. Bursty
    /// losses are correlated, which inflates the variance by about
    /// `2 × burst − 1`.
    pub fn loss_tolerance(&self) -> f64 {
        let p = self.profile.loss.ratio();
        let n = self.probe.sent.max(1) as f64;
        let inflation = 2.0 * self.profile.loss.mean_burst() - 1.0;
        let sigma = (p * (1.0 - p) * inflation / n).sqrt();
        (TOLERANCE * p).max(LOSS_SIGMAS * sigma)
    }

    /// What is out of tolerance, one line each; empty if all is well.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let expected = self.expected_delay();
        let delay_tol = expected.mul_f64(TOLERANCE).max(DELAY_FLOOR);
        let added = self.added_delay();
        if added.abs_diff(expected) > delay_tol {
            out.push(format!(
                "added one-way delay {added:.2?}, expected {expected:.2?} ± {delay_tol:.2?}"
            ));
        }
        let (loss, p, tol) = (
            self.probe.loss(),
            self.profile.loss.ratio(),
            self.loss_tolerance(),
        );
        if (loss - p).abs() > tol {
            out.push(format!(
                "loss {:.3} %, expected {:.3} % ± {:.3} %",
                loss * 100.0,
                p * 100.0,
                tol * 100.0
            ));
        }
        let (rate, want) = (self.flood.delivered_bps, self.expected_rate());
        if (rate / want - 1.0).abs() > TOLERANCE {
            out.push(format!(
                "delivered {:.3} Mbit/s, expected {:.3} Mbit/s ± 10 %",
                rate / 1e6,
                want / 1e6
            ));
        }
        out
    }
}

impl std::fmt::Display for SelfTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "delay {:.2?} over a {:.2?} path (expected {:.2?}; trimmed mean {:.2?}, mean {:.2?}, \
             median {:.2?}, min {:.2?}, max {:.2?}); loss {:.3} % of {} probes (expected {:.3} % ± {:.3} %); \
             rate {:.3} Mbit/s (expected {:.3}, offered {:.3}) -> {}",
            self.added_delay(),
            self.baseline,
            self.expected_delay(),
            self.probe.trimmed_mean_delay(),
            self.probe.mean_delay(),
            self.probe.median_delay(),
            self.probe.min_delay(),
            self.probe.max_delay(),
            self.probe.loss() * 100.0,
            self.probe.sent,
            self.profile.loss.ratio() * 100.0,
            self.loss_tolerance() * 100.0,
            self.flood.delivered_bps / 1e6,
            self.expected_rate() / 1e6,
            self.flood.offered_bps / 1e6,
            if self.failures().is_empty() {
                "PASS"
            } else {
                "FAIL"
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(sent: u64, seqs: &[u64], delays_ms: &[u64]) -> ProbeReport {
        ProbeReport {
            sent,
            received: seqs.len() as u64,
            delays: delays_ms
                .iter()
                .map(|d| Duration::from_millis(*d))
                .collect(),
            seqs: seqs.to_vec(),
        }
    }

    #[test]
    fn longest_gap_counts_missing_runs_at_either_end_too() {
        assert_eq!(report(10, &[0, 1, 2, 6, 7, 8, 9], &[]).longest_gap(), 3);
        assert_eq!(report(10, &[5, 6, 7, 8, 9], &[]).longest_gap(), 5);
        assert_eq!(report(10, &[0, 1], &[]).longest_gap(), 8);
        assert_eq!(report(3, &[2, 0, 1], &[]).longest_gap(), 0);
        assert_eq!(report(4, &[], &[]).longest_gap(), 4);
    }

    #[test]
    fn delay_statistics() {
        let r = report(5, &[0, 1, 2, 3], &[10, 40, 20, 30]);
        assert_eq!(r.mean_delay(), Duration::from_millis(25));
        assert_eq!(r.median_delay(), Duration::from_millis(30));
        assert_eq!(r.min_delay(), Duration::from_millis(10));
        assert_eq!(r.max_delay(), Duration::from_millis(40));
        assert!((r.loss() - 0.2).abs() < 1e-12);
    }

    #[test]
    fn the_trimmed_mean_drops_the_paused_senders_probes() {
        // 40 probes at 10 ms and two that a paused sender stamped 500 ms
        // early: 5 % of 42 is 2 cut at each end.
        let mut delays = vec![10; 40];
        delays.extend([500, 500]);
        let seqs: Vec<u64> = (0..42).collect();
        let r = report(42, &seqs, &delays);
        assert_eq!(r.trimmed_mean_delay(), Duration::from_millis(10));
        assert!(r.mean_delay() > Duration::from_millis(30));
        // Too few to cut: the plain mean.
        assert_eq!(
            report(2, &[0, 1], &[10, 30]).trimmed_mean_delay(),
            Duration::from_millis(20)
        );
    }

    #[test]
    fn the_delay_judged_is_what_the_link_adds_to_the_bare_path() {
        let flood = FloodReport {
            offered_bps: 1.3e9,
            delivered_bps: 1e9,
            sent: 0,
            received: 0,
        };
        let test = |probe_us: u64, baseline_us: u64| SelfTest {
            profile: "lan".parse().unwrap(),
            baseline: Duration::from_micros(baseline_us),
            probe: ProbeReport {
                sent: 100,
                received: 100,
                delays: vec![Duration::from_micros(probe_us); 100],
                seqs: (0..100).collect(),
            },
            flood,
        };
        // 0.1 ms over a 25 µs path: 125 µs measured.
        assert!(test(125, 25).failures().is_empty());
        assert_eq!(test(125, 25).added_delay(), Duration::from_micros(100));
        // Within the floor, not within a tenth of 0.1 ms.
        assert!(test(139, 25).failures().is_empty());
        let late = test(145, 25).failures();
        assert_eq!(late.len(), 1, "{late:?}");
        assert!(
            late[0].starts_with("added one-way delay 120.00µs"),
            "{late:?}"
        );
        // Early is as wrong as late; a path slower than the link is not negative.
        assert_eq!(test(105, 25).failures().len(), 1);
        assert_eq!(test(20, 25).added_delay(), Duration::ZERO);
    }

    #[test]
    fn loss_tolerance_is_ten_percent_or_the_sampling_error() {
        let test = |spec: &str, sent: u64| SelfTest {
            profile: spec.parse().unwrap(),
            baseline: Duration::ZERO,
            probe: report(sent, &[], &[]),
            flood: FloodReport {
                offered_bps: 0.0,
                delivered_bps: 0.0,
                sent: 0,
                received: 0,
            },
        };
        // 5 % over ten million probes: 10 % of 5 % is wider than 3.3 σ.
        assert!((test("lossy", 10_000_000).loss_tolerance() - 0.005).abs() < 1e-12);
        // 0.1 % over 16000 probes: 3.3 σ = 3.3 × sqrt(0.001 × 0.999 / 16000).
        let sigma = (0.001f64 * 0.999 / 16000.0).sqrt();
        let tol = test("radio-good", 16_000).loss_tolerance();
        assert!((tol - 3.3 * sigma).abs() < 1e-12);
        // Bursts of 3 inflate the variance five-fold.
        let bursty = test("lossy,burst=3", 16_000).loss_tolerance();
        let random = test("lossy", 16_000).loss_tolerance();
        assert!((bursty / random - 5f64.sqrt()).abs() < 1e-9);
        assert_eq!(test("lan", 100).loss_tolerance(), 0.0);
    }
}
