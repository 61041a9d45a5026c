//! The I/O shell: a [`DirectionCore`] per direction between two TUN devices.
//!
//! Each rack of the pair gets a TUN device `lem<N>` (N: the last octet of
//! the peer's address) and a /32 route to the peer through it, with its own
//! address as source. The more specific route wins over the field's /24 on
//! `eth0`, so IP traffic between the two racks, and only it, goes through
//! this process; the racks' other neighbours still go over the bridge.
//! Packets are whole IP packets (no Ethernet, no ARP), so nftables faults of
//! [`Field`], which match MAC addresses, do not apply to an emulated link:
//! use [`EmulatedLink::set_down`] instead.
//!
//! Per direction, a reader thread takes packets from the sender's TUN and
//! asks the core for a verdict; a writer thread sleeps until each delivery
//! time and writes the packet into the receiver's TUN. The devices use the
//! kernel's offloads (virtio-net headers, TSO and USO): one read brings a
//! TCP or UDP super-packet of up to 64 KiB, which is split so that the core
//! still judges every packet, and the packets due together are coalesced
//! again into one write, when the last of them is due (a packet is never
//! written early). One packet per system call carried about 190
//! Mbit/s; `lan` asks for 1 Gbit/s. Plain threads rather
//! than tokio: tokio's timers have millisecond granularity, a fifth of
//! `radio-good`'s 5 ms delay, while `thread::sleep` is good to about 0.1 ms.
//! The four threads ask for real-time (`SCHED_FIFO`) priority, since on a
//! busy machine an ordinary thread can wait milliseconds to run, which would
//! count as link delay; they block on I/O or sleep between packets, and the
//! kernel's real-time throttling caps them anyway.

use std::process::{Command, Stdio};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tun_rs::{
    DeviceBuilder, GROTable, InterruptEvent, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN,
};

use super::core::{Counters, DirectionCore, Verdict};
use super::profile::{LinkProfile, Profile};
use crate::netns::Field;

/// Most packets in flight per direction (accepted by the core, not yet
/// written). The core's queue bounds the waiting packets in time; this bounds
/// the memory for those plus the ones "on the wire" during the delay: a
/// saturated 1 Gbit/s link with 5 ms of queue and 0.1 ms of delay holds
/// about 500 full-size packets, a satellite link with 500 ms of queue and
/// 300 ms of delay about 135. Beyond it a packet is dropped and counted.
pub const MAX_IN_FLIGHT: usize = 8192;

/// Largest read from a TUN device: a super-packet of up to 64 KiB and its
/// virtio-net header.
const MAX_PACKET: usize = 65536 + VIRTIO_NET_HDR_LEN;

/// Largest packet a super-packet is split into, or read alone: the TUN's
/// MTU is 1500; a jumbo frame a misconfigured MTU let through still fits
/// (a larger one is dropped and counted).
const MAX_SPLIT_PACKET: usize = 9216;

/// Room in front of every queued packet for the virtio-net header of the
/// write that carries it.
const HEADROOM: usize = VIRTIO_NET_HDR_LEN;

/// Packets due this close together are written together, when the last
/// of them is due: a writer waking once per packet could not keep up with
/// 1 Gbit/s. A packet is never written early, and late by at most this,
/// as a network card's interrupt moderation would hold it.
const BATCH_SLACK: Duration = Duration::from_micros(50);

/// `SCHED_FIFO` priority of the emulator's threads: above every ordinary
/// thread, below the kernel's own real-time threads (which use 50 and up).
const RT_PRIORITY: u32 = 20;

/// How often a writer with nothing to write checks whether to stop.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Which way through the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    AToB,
    BToA,
}

/// Counters of one direction, from the core and the shell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    pub core: Counters,
    /// Accepted by the core but dropped because [`MAX_IN_FLIGHT`] packets
    /// were already in flight.
    pub dropped_in_flight: u64,
    /// Writes into the receiving TUN that failed (a batch counts once).
    pub write_errors: u64,
    /// Reads the kernel handed over that could not be split into IP
    /// packets (dropped).
    pub unsplittable: u64,
}

#[derive(Debug, Default)]
struct Shared {
    core: Option<DirectionCore>,
    dropped_in_flight: u64,
    write_errors: u64,
    unsplittable: u64,
}

/// A link between two racks of a [`Field`] through the emulator. Dropping it
/// stops the threads and removes the TUN devices and routes; it borrows the
/// field so it cannot outlive the namespaces.
pub struct EmulatedLink<'f> {
    field: &'f Field,
    racks: [String; 2],
    devices: [String; 2],
    directions: [Arc<Mutex<Shared>>; 2],
    stop: Arc<InterruptEvent>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for EmulatedLink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatedLink")
            .field("racks", &self.racks)
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

impl<'f> EmulatedLink<'f> {
    /// Routes traffic between racks `a` and `b` of `field` through an
    /// emulated link with `profiles`; `seed` makes its randomness
    /// reproducible (each direction gets its own stream).
    pub fn between(
        field: &'f Field,
        a: &str,
        b: &str,
        profiles: LinkProfile,
        seed: u64,
    ) -> Result<EmulatedLink<'f>> {
        anyhow::ensure!(a != b, "a link joins two different racks");
        let (ip_a, ip_b) = (field.ip(a)?, field.ip(b)?);
        let dev_a = format!("lem{}", ip_b.octets()[3]);
        let dev_b = format!("lem{}", ip_a.octets()[3]);
        let tun_a = Arc::new(create_tun(field, a, &dev_a)?);
        let tun_b = Arc::new(create_tun(field, b, &dev_b)?);
        let stop = Arc::new(InterruptEvent::new().context("creating the stop event")?);
        let mut link = EmulatedLink {
            field,
            racks: [a.to_owned(), b.to_owned()],
            devices: [dev_a.clone(), dev_b.clone()],
            directions: Default::default(),
            stop,
            threads: Vec::new(),
        };
        // From here on, dropping `link` undoes what exists.
        for (rack, dev, peer, own) in [(a, &dev_a, ip_b, ip_a), (b, &dev_b, ip_a, ip_b)] {
            configure(field, rack, dev, peer, own)?;
        }
        let start = Instant::now();
        let LinkProfile { a_to_b, b_to_a } = profiles;
        link.start_direction(0, a_to_b, seed, &tun_a, &tun_b, start)?;
        link.start_direction(
            1,
            b_to_a,
            seed ^ 0x9e37_79b9_7f4a_7c15,
            &tun_b,
            &tun_a,
            start,
        )?;
        Ok(link)
    }

    fn start_direction(
        &mut self,
        index: usize,
        profile: Profile,
        seed: u64,
        from: &Arc<SyncDevice>,
        to: &Arc<SyncDevice>,
        start: Instant,
    ) -> Result<()> {
        let shared = &self.directions[index];
        shared.lock().unwrap().core = Some(DirectionCore::new(profile, seed));
        let (tx, rx) = sync_channel(MAX_IN_FLIGHT);
        let name = format!("linkem-{}", self.devices[index]);
        let reader = {
            let (from, shared, stop) = (from.clone(), shared.clone(), self.stop.clone());
            std::thread::Builder::new()
                .name(format!("{name}-rx"))
                .spawn(move || read_loop(&from, &shared, &stop, &tx, start))?
        };
        self.threads.push(reader);
        let writer = {
            let (to, shared, stop) = (to.clone(), shared.clone(), self.stop.clone());
            std::thread::Builder::new()
                .name(format!("{name}-tx"))
                .spawn(move || write_loop(&to, &shared, &stop, &rx, start))?
        };
        self.threads.push(writer);
        Ok(())
    }

    /// Forces both directions down (a fade on command) or lifts that.
    pub fn set_down(&self, down: bool) {
        self.set_direction_down(Direction::AToB, down);
        self.set_direction_down(Direction::BToA, down);
    }

    /// Forces one direction down or lifts that.
    pub fn set_direction_down(&self, direction: Direction, down: bool) {
        if let Some(core) = self.directions[direction as usize]
            .lock()
            .unwrap()
            .core
            .as_mut()
        {
            core.set_down(down);
        }
    }

    /// Counters of one direction so far.
    pub fn stats(&self, direction: Direction) -> DirectionStats {
        let shared = self.directions[direction as usize].lock().unwrap();
        DirectionStats {
            core: shared
                .core
                .as_ref()
                .map(DirectionCore::counters)
                .unwrap_or_default(),
            dropped_in_flight: shared.dropped_in_flight,
            write_errors: shared.write_errors,
            unsplittable: shared.unsplittable,
        }
    }

    /// The TUN device's name in rack `a` (index 0) or `b` (index 1).
    pub fn device(&self, index: usize) -> &str {
        &self.devices[index]
    }
}

impl Drop for EmulatedLink<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.stop.trigger() {
            eprintln!("field-tests: stopping the link emulator: {e}");
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // The devices vanish with their last descriptor, their routes with
        // them; deleting explicitly also covers a device that outlived us.
        for (rack, dev) in self.racks.iter().zip(&self.devices) {
            let _ = self.field.exec(rack, &["ip", "link", "del", dev]);
        }
    }
}

/// Creates TUN device `name` inside `rack`'s namespace.
fn create_tun(field: &Field, rack: &str, name: &str) -> Result<SyncDevice> {
    let name = name.to_owned();
    field
        .run_in(rack, move || {
            DeviceBuilder::new()
                .name(&name)
                .packet_information(false)
                .offload(true)
                .build_sync()
                .with_context(|| format!("creating TUN device {name} (is /dev/net/tun there?)"))
        })
        .with_context(|| format!("in rack {rack}"))
}

/// Brings `dev` up in `rack` and routes `peer` through it from `own`.
fn configure(
    field: &Field,
    rack: &str,
    dev: &str,
    peer: std::net::Ipv4Addr,
    own: std::net::Ipv4Addr,
) -> Result<()> {
    let ipv6_off = format!("net.ipv6.conf.{dev}.disable_ipv6=1");
    let steps: [&[&str]; 3] = [
        // No IPv6 link-local chatter (router solicitations, MLD) on the link.
        &["sysctl", "-qw", &ipv6_off],
        &["ip", "link", "set", dev, "up"],
        &[
            "ip",
            "route",
            "add",
            &format!("{peer}/32"),
            "dev",
            dev,
            "src",
            &own.to_string(),
        ],
    ];
    for argv in steps {
        let out = field.exec(rack, argv)?;
        anyhow::ensure!(
            out.status.success(),
            "{argv:?} in rack {rack}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Reads packets from `from` (a super-packet split into its packets), asks
/// the core about each, queues survivors for delivery with [`HEADROOM`]
/// in front.
fn read_loop(
    from: &SyncDevice,
    shared: &Mutex<Shared>,
    stop: &InterruptEvent,
    tx: &SyncSender<(Duration, Vec<u8>)>,
    start: Instant,
) {
    raise_priority();
    let mut raw = vec![0u8; MAX_PACKET];
    let mut bufs = vec![vec![0u8; HEADROOM + MAX_SPLIT_PACKET]; IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    loop {
        let n = match from.recv_multiple_intr(&mut raw, &mut bufs, &mut sizes, HEADROOM, stop) {
            Ok(n) => n,
            Err(_) if stop.is_trigger() => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // A super-packet the splitter refuses (not IP, a bad header:
            // errors of its own, with no OS error code): lost on the link,
            // as a real one would be. An error from the device itself ends
            // the loop below, never spins it.
            Err(e)
                if e.raw_os_error().is_none()
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Other
                    ) =>
            {
                shared.lock().unwrap().unsplittable += 1;
                continue;
            }
            // The device is gone (its namespace deleted).
            Err(_) => return,
        };
        let now = start.elapsed();
        let mut guard = shared.lock().unwrap();
        for (buf, len) in bufs.iter().zip(&sizes).take(n) {
            let Some(core) = guard.core.as_mut() else {
                return;
            };
            if let Verdict::Deliver { at } = core.offer(now, *len) {
                match tx.try_send((at, buf[..HEADROOM + len].to_vec())) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => guard.dropped_in_flight += 1,
                    Err(TrySendError::Disconnected(_)) => return,
                }
            }
        }
    }
}

/// Writes packets into `to` at their delivery times, never early, until
/// stopped: those due within [`BATCH_SLACK`] of each other go in one batch, coalesced
/// into super-packets where they belong to one flow.
fn write_loop(
    to: &SyncDevice,
    shared: &Mutex<Shared>,
    stop: &InterruptEvent,
    rx: &Receiver<(Duration, Vec<u8>)>,
    start: Instant,
) {
    raise_priority();
    let mut gro = GROTable::default();
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(IDEAL_BATCH_SIZE);
    let mut held: Option<(Duration, Vec<u8>)> = None;
    loop {
        let (at, packet) = match held.take() {
            Some(item) => item,
            None => match rx.recv_timeout(STOP_POLL) {
                Ok(item) => item,
                Err(RecvTimeoutError::Timeout) => continue,
                // The reader stopped.
                Err(RecvTimeoutError::Disconnected) => return,
            },
        };
        if stop.is_trigger() {
            return;
        }
        // The batch: this packet and those due within BATCH_SLACK of it
        // (read by the time it is due), written when the last is due.
        wait_until(start, at);
        let mut due = at;
        batch.push(packet);
        while batch.len() < IDEAL_BATCH_SIZE {
            match rx.try_recv() {
                Ok((next, p)) if next <= at + BATCH_SLACK => {
                    due = due.max(next);
                    batch.push(p);
                }
                Ok(item) => {
                    held = Some(item);
                    break;
                }
                Err(_) => break,
            }
        }
        wait_until(start, due);
        if to
            .send_multiple_intr(&mut gro, &mut batch, HEADROOM, stop)
            .is_err()
        {
            shared.lock().unwrap().write_errors += 1;
        }
        batch.clear();
    }
}

/// Returns at `at` (time since `start`), never before.
fn wait_until(start: Instant, at: Duration) {
    let wait = at.saturating_sub(start.elapsed());
    if !wait.is_zero() {
        std::thread::sleep(wait);
    }
}

/// Gives the calling thread real-time priority (see the module doc), with
/// `chrt` since this crate makes no system calls of its own. Best effort: a
/// machine that refuses gets a less precise link, and a note on stderr.
fn raise_priority() {
    let tid = nix::unistd::gettid().to_string();
    let out = Command::new("chrt")
        .args(["--fifo", "--pid", &RT_PRIORITY.to_string(), &tid])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "field-tests: link emulator thread {tid} keeps normal priority: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => {
            eprintln!("field-tests: link emulator thread {tid} keeps normal priority: chrt: {e}")
        }
    }
}
