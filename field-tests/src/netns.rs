//! A "field": one network namespace per rack, all plugged into a bridge that
//! lives in its own "switch" namespace, plus nftables faults.
//!
//! Topology of a field built from racks `[a, b, c]`:
//!
//! ```text
//!   fr-<pid>-<n>-sw        (switch namespace: br0, mcast_snooping 0)
//!     p0 ── veth ── eth0 in fr-<pid>-<n>-r0  (rack a, 198.18.0.10/24)
//!     p1 ── veth ── eth0 in fr-<pid>-<n>-r1  (rack b, 198.18.0.11/24)
//!     p2 ── veth ── eth0 in fr-<pid>-<n>-r2  (rack c, 198.18.0.12/24)
//! ```
//!
//! Nothing is created in the host namespace: veths are created directly in
//! the switch namespace with their peer in the rack namespace, and the bridge
//! has no uplink. Addresses are from 198.18.0.0/24 (RFC 2544), and racks have
//! no default route, so traffic cannot leave the field.
//!
//! Each rack gets a route for 224.0.0.0/4 on `eth0`: without it, a process
//! that sends to an mDNS group without `IP_MULTICAST_IF` gets `ENETUNREACH`
//! (a real rack has a default route that covers this).
//!
//! Faults are nftables rules in an `inet fieldtest` table inside the racks'
//! namespaces, on the **input** hook only: a drop on the output hook makes
//! `sendmsg` fail with `EPERM` in the sender, which an agent can see, unlike a
//! real lost packet. Rules match the sender's MAC address (each rack's is
//! fixed), so IPv4, IPv6 and multicast are all covered. ARP is not filtered
//! (it never reaches the `inet` hooks), which does not matter: a rack that can
//! resolve a neighbour but never hears from it is still cut off.
//!
//! [`Field::emulated_link`] routes the IP traffic of two racks through the
//! link emulator ([`crate::linkem`]) instead of the bridge; the MAC-matching
//! faults above do not see that traffic, the emulator's own fades do.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::owner_lock;
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Prefix of every namespace this harness creates; `sweep_stale` relies on it.
pub const NS_PREFIX: &str = "fr-";

/// Name of the nftables table the harness owns in each rack namespace.
const NFT_TABLE: &str = "fieldtest";

/// First host number of rack addresses: rack `i` is `198.18.0.(10 + i)`.
const FIRST_HOST: u8 = 10;

/// Most racks in one field: keeps host numbers under 255.
pub const MAX_RACKS: usize = 200;

/// The multicast group used by [`Field::multicast_reaches`]: mDNS's.
pub const MDNS_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);

/// Port for the harness's own probes; not 5353, so a probe does not collide
/// with (or get answered by) a running agent's mDNS responder.
const PROBE_PORT: u16 = 7399;

/// Distinguishes fields created by one process.
static FIELD_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The sweep of stale namespaces runs once per process.
static SWEPT: OnceLock<()> = OnceLock::new();

/// A network fault installed in a [`Field`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// Nothing from `from` reaches `to` (the other direction still works).
    OneWay { from: usize, to: usize },
    /// Nothing reaches the rack, nothing from it reaches anyone.
    Isolate(usize),
}

/// One rack's namespace.
#[derive(Debug)]
struct Rack {
    /// The rack's name, as given to `fieldrack fleet init --racks`.
    name: String,
    /// Name of its network namespace.
    ns: String,
    /// Address of its `eth0`.
    ip: Ipv4Addr,
    /// MAC of its `eth0`, fixed so nftables rules can match the sender.
    mac: String,
}

/// Builds a [`Field`].
#[derive(Debug, Default)]
pub struct FieldBuilder {
    racks: Vec<String>,
}

impl FieldBuilder {
    /// Adds a rack.
    pub fn rack(mut self, name: impl Into<String>) -> Self {
        self.racks.push(name.into());
        self
    }

    /// Adds several racks.
    pub fn racks<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.racks.extend(names.into_iter().map(Into::into));
        self
    }

    /// Creates the namespaces. On error, whatever was created is removed.
    pub fn build(self) -> Result<Field> {
        ensure!(!self.racks.is_empty(), "a field needs at least one rack");
        ensure!(self.racks.len() <= MAX_RACKS, "at most {MAX_RACKS} racks");
        let unique: BTreeSet<&String> = self.racks.iter().collect();
        ensure!(unique.len() == self.racks.len(), "duplicate rack names");
        sweep_once();

        let n = FIELD_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NS_PREFIX}{}-{n}", std::process::id());
        let racks = self
            .racks
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                let host = FIRST_HOST + i as u8;
                Rack {
                    name,
                    ns: format!("{prefix}-r{i}"),
                    ip: Ipv4Addr::new(198, 18, 0, host),
                    mac: format!("02:00:c6:12:00:{host:02x}"),
                }
            })
            .collect();
        let field = Field {
            switch: format!("{prefix}-sw"),
            racks,
            faults: Mutex::new(BTreeSet::new()),
            created: Mutex::new(Vec::new()),
        };
        // If setup fails half-way, dropping `field` removes what exists.
        field.setup()?;
        Ok(field)
    }
}

/// A set of rack namespaces on one virtual switch. Dropping it kills every
/// process left in its namespaces and deletes them.
#[derive(Debug)]
pub struct Field {
    /// Name of the switch namespace holding the bridge.
    switch: String,
    /// The racks, in the order given to the builder.
    racks: Vec<Rack>,
    /// Faults in force; the nftables rules are regenerated from this set.
    faults: Mutex<BTreeSet<Fault>>,
    /// Namespaces created so far, so Drop removes exactly those.
    created: Mutex<Vec<String>>,
}

impl Field {
    /// Starts building a field.
    pub fn builder() -> FieldBuilder {
        FieldBuilder::default()
    }

    /// Shorthand for `Field::builder().racks(names).build()`.
    pub fn new<I, S>(names: I) -> Result<Field>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Field::builder().racks(names).build()
    }

    fn setup(&self) -> Result<()> {
        self.add_ns(&self.switch)?;
        ip(&[
            "-n",
            &self.switch,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
            "stp_state",
            "0",
        ])?;
        ip(&["-n", &self.switch, "link", "set", "br0", "up"])?;
        for (i, rack) in self.racks.iter().enumerate() {
            let port = format!("p{i}");
            self.add_ns(&rack.ns)?;
            ip(&[
                "-n",
                &self.switch,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &rack.ns,
            ])?;
            ip(&[
                "-n",
                &self.switch,
                "link",
                "set",
                &port,
                "master",
                "br0",
                "up",
            ])?;
            ip(&["-n", &rack.ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &rack.ns,
                "link",
                "set",
                "eth0",
                "address",
                &rack.mac,
                "multicast",
                "on",
                "up",
            ])?;
            ip(&[
                "-n",
                &rack.ns,
                "addr",
                "add",
                &format!("{}/24", rack.ip),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &rack.ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])?;
            // Answer pings to 224.0.0.1, so `ping` can check multicast too.
            let out = self.exec(
                &rack.name,
                &[
                    "sh",
                    "-c",
                    "echo 0 > /proc/sys/net/ipv4/icmp_echo_ignore_broadcasts",
                ],
            )?;
            check(&out, "set icmp_echo_ignore_broadcasts")?;
            self.apply_rules(i, &BTreeSet::new())?;
        }
        Ok(())
    }

    fn add_ns(&self, ns: &str) -> Result<()> {
        ip(&["netns", "add", ns])?;
        self.created.lock().unwrap().push(ns.to_owned());
        Ok(())
    }

    /// Rack names, in order.
    pub fn racks(&self) -> impl Iterator<Item = &str> {
        self.racks.iter().map(|r| r.name.as_str())
    }

    fn index(&self, rack: &str) -> Result<usize> {
        self.racks
            .iter()
            .position(|r| r.name == rack)
            .ok_or_else(|| anyhow!("no rack named {rack:?} in this field"))
    }

    fn rack(&self, rack: &str) -> Result<&Rack> {
        Ok(&self.racks[self.index(rack)?])
    }

    /// The rack's network namespace name (for `ip netns exec`).
    pub fn namespace(&self, rack: &str) -> Result<&str> {
        Ok(&self.rack(rack)?.ns)
    }

    /// The namespace holding the bridge.
    pub fn switch_namespace(&self) -> &str {
        &self.switch
    }

    /// The rack's address on the field's LAN.
    pub fn ip(&self, rack: &str) -> Result<Ipv4Addr> {
        Ok(self.rack(rack)?.ip)
    }

    /// A `Command` that runs `program` inside the rack's namespace; add
    /// arguments and stdio, then spawn it. `ip netns exec` execs the program
    /// directly, so the child's pid is the program's.
    pub fn command(&self, rack: &str, program: impl AsRef<OsStr>) -> Result<Command> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.rack(rack)?.ns])
            .arg(program);
        Ok(cmd)
    }

    /// Runs `argv` inside the rack's namespace and waits for it; the exit
    /// status is not checked.
    pub fn exec(&self, rack: &str, argv: &[&str]) -> Result<Output> {
        let (program, args) = argv.split_first().context("empty command")?;
        self.command(rack, program)?
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {argv:?} in rack {rack}"))
    }

    /// Starts `argv` inside the rack's namespace without waiting.
    pub fn spawn(&self, rack: &str, argv: &[&str]) -> Result<Child> {
        let (program, args) = argv.split_first().context("empty command")?;
        self.command(rack, program)?
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {argv:?} in rack {rack}"))
    }

    /// Runs `f` on a fresh thread that has entered the rack's network
    /// namespace: sockets it opens live in the rack. Lets the harness probe
    /// the network without external tools.
    pub fn run_in<T, F>(&self, rack: &str, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce() -> Result<T> + Send,
    {
        let ns = self.rack(rack)?.ns.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&ns)?;
                f()
            })
            .join()
            .map_err(|_| anyhow!("thread in rack {rack} panicked"))?
        })
    }

    /// Joins racks `a` and `b` by an emulated link with `profiles` (see
    /// [`crate::linkem::EmulatedLink::between`]); dropping the link returns
    /// them to the bridge.
    pub fn emulated_link(
        &self,
        a: &str,
        b: &str,
        profiles: crate::linkem::LinkProfile,
        seed: u64,
    ) -> Result<crate::linkem::EmulatedLink<'_>> {
        crate::linkem::EmulatedLink::between(self, a, b, profiles, seed)
    }

    /// Joins each of `racks`, given with its link's seed, to rack `to` by
    /// a symmetric emulated link on `profile` (a star around `to`).
    ///
    /// # Errors
    /// If a TUN device or route cannot be set up.
    pub fn emulated_links_to(
        &self,
        to: &str,
        racks: &[(u64, &str)],
        profile: &crate::linkem::Profile,
    ) -> Result<Vec<crate::linkem::EmulatedLink<'_>>> {
        racks
            .iter()
            .map(|&(seed, rack)| {
                let profiles = crate::linkem::LinkProfile::symmetric(profile.clone());
                self.emulated_link(rack, to, profiles, seed)
            })
            .collect()
    }

    /// Drops all traffic between `a` and `b`, both ways.
    pub fn cut(&self, a: &str, b: &str) -> Result<()> {
        let (a, b) = (self.index(a)?, self.index(b)?);
        ensure!(a != b, "cannot cut a rack from itself");
        self.change(|f| {
            f.insert(Fault::OneWay { from: a, to: b });
            f.insert(Fault::OneWay { from: b, to: a });
        })
    }

    /// Drops traffic from `from` to `to`; `to` can still reach `from`.
    pub fn cut_oneway(&self, from: &str, to: &str) -> Result<()> {
        let (from, to) = (self.index(from)?, self.index(to)?);
        ensure!(from != to, "cannot cut a rack from itself");
        self.change(|f| {
            f.insert(Fault::OneWay { from, to });
        })
    }

    /// Drops everything to and from `rack`, except its own loopback traffic
    /// (so its API and `fieldrack status` still work).
    pub fn isolate(&self, rack: &str) -> Result<()> {
        let r = self.index(rack)?;
        self.change(|f| {
            f.insert(Fault::Isolate(r));
        })
    }

    /// Removes faults between `a` and `b` (both directions); isolations stay.
    pub fn heal(&self, a: &str, b: &str) -> Result<()> {
        let (a, b) = (self.index(a)?, self.index(b)?);
        self.change(|f| {
            f.remove(&Fault::OneWay { from: a, to: b });
            f.remove(&Fault::OneWay { from: b, to: a });
        })
    }

    /// Removes every fault.
    pub fn heal_all(&self) -> Result<()> {
        self.change(|f| f.clear())
    }

    /// Faults in force, in rack-name terms, for logging.
    pub fn faults(&self) -> Vec<String> {
        let name = |i: usize| self.racks[i].name.as_str();
        self.faults
            .lock()
            .unwrap()
            .iter()
            .map(|f| match f {
                Fault::OneWay { from, to } => format!("{} -x-> {}", name(*from), name(*to)),
                Fault::Isolate(r) => format!("isolate {}", name(*r)),
            })
            .collect()
    }

    /// Applies `edit` to the fault set and rewrites every rack's rules. The
    /// lock is held throughout so concurrent changes cannot interleave.
    fn change(&self, edit: impl FnOnce(&mut BTreeSet<Fault>)) -> Result<()> {
        let mut faults = self.faults.lock().unwrap();
        edit(&mut faults);
        for i in 0..self.racks.len() {
            self.apply_rules(i, &faults)?;
        }
        Ok(())
    }

    /// Replaces rack `i`'s `inet fieldtest` table atomically (one `nft -f`
    /// transaction) with the input-hook drops that `faults` imply there.
    fn apply_rules(&self, i: usize, faults: &BTreeSet<Fault>) -> Result<()> {
        let mut rules = Vec::new();
        for fault in faults {
            match *fault {
                Fault::OneWay { from, to } if to == i => {
                    rules.push(format!("ether saddr {} drop", self.racks[from].mac));
                }
                Fault::Isolate(r) if r == i => rules.push("iifname != \"lo\" drop".to_owned()),
                Fault::Isolate(r) => {
                    rules.push(format!("ether saddr {} drop", self.racks[r].mac));
                }
                Fault::OneWay { .. } => {}
            }
        }
        let script = format!(
            "table inet {NFT_TABLE}\n\
             delete table inet {NFT_TABLE}\n\
             table inet {NFT_TABLE} {{\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority -10; policy accept;\n\
             {}\
             \t}}\n\
             }}\n",
            rules
                .iter()
                .map(|r| format!("\t\t{r}\n"))
                .collect::<String>()
        );
        let rack = &self.racks[i];
        let mut child = self
            .command(&rack.name, "nft")?
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nft (is nftables installed?)")?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        check(&out, &format!("nft -f in rack {}:\n{script}", rack.name))
    }

    /// Whether one `ping` from `from` to `to` gets an answer within 1 s.
    pub fn ping(&self, from: &str, to: &str) -> Result<bool> {
        let dst = self.ip(to)?.to_string();
        let out = self.exec(from, &["ping", "-c1", "-W1", "-n", &dst])?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => bail!(
                "ping failed to run (is iputils-ping installed?): {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Whether a UDP datagram sent from `from` to `to`'s address arrives
    /// (several tries within about 1 s). Tests one direction only.
    pub fn udp_reaches(&self, from: &str, to: &str) -> Result<bool> {
        let dst = SocketAddrV4::new(self.ip(to)?, PROBE_PORT);
        self.probe(from, to, dst, None)
    }

    /// Whether a UDP datagram that `from` sends to the mDNS group (without
    /// choosing an interface, as a naive app would) reaches a socket in `to`
    /// that joined the group on its `eth0`.
    pub fn multicast_reaches(&self, from: &str, to: &str) -> Result<bool> {
        let dst = SocketAddrV4::new(MDNS_GROUP, PROBE_PORT);
        self.probe(from, to, dst, Some(self.ip(to)?))
    }

    fn probe(
        &self,
        from: &str,
        to: &str,
        dst: SocketAddrV4,
        join_on: Option<Ipv4Addr>,
    ) -> Result<bool> {
        const TRIES: u32 = 5;
        const WAIT: Duration = Duration::from_millis(200);
        let (ready_tx, ready_rx) = mpsc::sync_channel::<()>(1);
        let done = std::sync::atomic::AtomicBool::new(false);
        let token = format!("fieldtest-probe-{}", std::process::id());
        std::thread::scope(|s| {
            let receiver = s.spawn(|| {
                // Owned by this thread, so a failure before the send below
                // disconnects the channel and releases the sender.
                let ready_tx = ready_tx;
                self.run_in(to, || {
                    let bind = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, dst.port());
                    let sock = UdpSocket::bind(bind).context("binding probe socket")?;
                    if let Some(iface) = join_on {
                        sock.join_multicast_v4(dst.ip(), &iface)
                            .context("joining multicast group")?;
                    }
                    let _ = ready_tx.send(());
                    sock.set_read_timeout(Some(WAIT))?;
                    let deadline = Instant::now() + WAIT * (TRIES + 1);
                    let mut buf = [0u8; 128];
                    while Instant::now() < deadline {
                        if let Ok((n, _)) = sock.recv_from(&mut buf) {
                            if buf[..n] == *token.as_bytes() {
                                done.store(true, Ordering::SeqCst);
                                return Ok(true);
                            }
                        }
                    }
                    done.store(true, Ordering::SeqCst);
                    Ok(false)
                })
            });
            // Disconnected (the receiver failed early) also releases us.
            let _ = ready_rx.recv_timeout(Duration::from_secs(5));
            let sent = self.run_in(from, || {
                let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
                for _ in 0..TRIES {
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                    sock.send_to(token.as_bytes(), dst)
                        .with_context(|| format!("sending probe to {dst}"))?;
                    std::thread::sleep(WAIT);
                }
                Ok(())
            });
            let received = receiver
                .join()
                .map_err(|_| anyhow!("probe receiver panicked"))?;
            sent?;
            received
        })
    }

    /// Kills what still runs in this field's namespaces and deletes them.
    fn teardown(&self) {
        let created = std::mem::take(&mut *self.created.lock().unwrap());
        for ns in created.iter().rev() {
            kill_all_in(ns);
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("field-tests: cleanup of namespace {ns}: {e:#}");
            }
        }
    }
}

impl Drop for Field {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Moves the calling thread into namespace `ns`.
fn enter(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering namespace {ns}"))
}

/// Runs `ip ARGS` in the host namespace, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running `ip` (is iproute2 installed?)")?;
    check(&out, &format!("ip {}", args.join(" ")))
}

fn check(out: &Output, what: &str) -> Result<()> {
    if out.status.success() {
        Ok(())
    } else {
        bail!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
}

/// Namespace names (from `ip netns list`).
pub fn list_namespaces() -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .stdin(Stdio::null())
        .output()
        .context("running `ip netns list`")?;
    check(&out, "ip netns list")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        // Lines look like "name" or "name (id: 3)".
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// SIGKILLs every process in namespace `ns`. Only used on namespaces this
/// harness created (now or in an earlier, killed run), so these are
/// processes the harness started.
fn kill_all_in(ns: &str) {
    let Ok(out) = Command::new("ip")
        .args(["netns", "pids", ns])
        .stdin(Stdio::null())
        .output()
    else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// The creating process's pid, if `ns` is a harness namespace.
fn owner_pid(ns: &str) -> Option<u32> {
    ns.strip_prefix(NS_PREFIX)?.split('-').next()?.parse().ok()
}

/// Deletes `fr-<pid>-...` namespaces whose creating process is gone (left
/// by a run that was killed before its Drop guards ran; see
/// [`owner_lock`]), killing whatever still runs in them. Returns the names
/// removed.
pub fn sweep_stale() -> Result<Vec<String>> {
    sweep(|pid| owner_lock::Liveness::of(pid) == owner_lock::Liveness::Stale)
}

/// Deletes the harness namespaces whose owner pid `stale` says is gone.
fn sweep(stale: impl Fn(u32) -> bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for ns in list_namespaces()? {
        let Some(pid) = owner_pid(&ns) else { continue };
        if !stale(pid) {
            continue;
        }
        kill_all_in(&ns);
        ip(&["netns", "del", &ns])?;
        removed.push(ns);
    }
    Ok(removed)
}

/// Takes this process's liveness lock and sweeps, once, before the process
/// creates its first namespace. Namespaces already named after this pid
/// were left by an earlier process that had the same pid.
fn sweep_once() {
    SWEPT.get_or_init(|| {
        if let Err(e) = owner_lock::hold_own() {
            eprintln!("field-tests: {e}: other runs may take this run's namespaces for stale");
        }
        let me = std::process::id();
        match sweep(|pid| pid == me || owner_lock::Liveness::of(pid) == owner_lock::Liveness::Stale)
        {
            Ok(removed) if !removed.is_empty() => {
                eprintln!("field-tests: removed stale namespaces {removed:?}");
            }
            Ok(_) => {}
            Err(e) => eprintln!("field-tests: sweeping stale namespaces: {e:#}"),
        }
        owner_lock::remove_stale_locks();
    });
}

/// Namespaces created by this process that still exist (for leak checks).
pub fn own_namespaces() -> Result<Vec<String>> {
    let me = std::process::id();
    Ok(list_namespaces()?
        .into_iter()
        .filter(|ns| owner_pid(ns) == Some(me))
        .collect())
}

/// `Ok(())` if this machine can create network namespaces, else why not.
/// Cached: the probe runs once per process.
pub fn available() -> Result<(), String> {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    AVAILABLE
        .get_or_init(|| {
            if !nix::unistd::geteuid().is_root() {
                return Err("not root: network namespaces need root".into());
            }
            match Command::new("ip").arg("-V").output() {
                Ok(o) if o.status.success() => {}
                _ => return Err("`ip` (iproute2) is not installed".into()),
            }
            sweep_once();
            let probe = format!("{NS_PREFIX}{}-probe", std::process::id());
            ip(&["netns", "add", &probe])
                .map_err(|e| format!("cannot create a network namespace: {e:#}"))?;
            ip(&["netns", "del", &probe]).map_err(|e| format!("{e:#}"))?;
            Ok(())
        })
        .clone()
}
