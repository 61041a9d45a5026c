//! The destination policy: where the proxy may connect on a client's behalf.
//!
//! A forward-proxy request (`GET http://host/...`, `CONNECT host:port`) is a
//! client asking the rack to open a connection for it. Without a policy the
//! rack's Wi-Fi reaches everything the rack reaches: its admin API on
//! loopback, services bound to loopback only, the mesh, the site's private
//! networks. So every such connection is judged here first, sans-IO:
//!
//! 1. [`Policy::parse_host`] turns the request's host into an address when
//!    it is one, in *every* spelling a resolver would accept (`127.1`,
//!    `2130706433`, `0x7f.1`, `0177.0.0.1`, `[::ffff:127.0.0.1]`, a trailing
//!    dot), and refuses `localhost` and `*.localhost` by name (RFC 6761).
//!    A host that looks numeric but is not a valid address is refused rather
//!    than handed to a resolver that might read it some other way.
//! 2. The caller resolves a name (the only I/O), then [`Policy::check`]
//!    judges *every* resolved address: one internal address refuses the
//!    whole destination (a name that resolves to both a public and a
//!    loopback address is a rebinding attempt, not a choice).
//! 3. The caller connects only to the addresses checked (never a second
//!    lookup, which could answer differently).
//!
//! Refused always, whatever the operator allows: the rack's own listening
//! sockets (the proxy's, the admin API's, the mesh's) on any local address,
//! and the rack's own non-loopback addresses. Refused unless an operator
//! lists them in `allow_destinations`: loopback, unspecified, link-local,
//! multicast, broadcast, reserved/documentation blocks and private ranges
//! (RFC 1918, CGNAT, benchmarking, ULA), also when embedded in IPv6 (mapped,
//! compatible, NAT64, 6to4). `CONNECT` is allowed only to `connect_ports`.
//!
//! Requests Fieldrack makes itself (tile sources, probes, the seeder) go to
//! upstreams an operator named in `rack.toml` and are not judged here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::Cidr;

/// Why a destination was refused: the rule, named in the 403 and in
/// `fieldrack_cache_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// `localhost` or a name under `.localhost`.
    LocalhostName,
    /// Looks like a numeric address but is not a valid one.
    MalformedAddress,
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 0.0.0.0/8, ::.
    Unspecified,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// RFC 1918, 100.64.0.0/10, 198.18.0.0/15, fc00::/7, fec0::/10.
    Private,
    /// Reserved, documentation and protocol-assignment blocks.
    Reserved,
    /// One of the rack's own (non-loopback) addresses.
    OwnAddress,
    /// One of the rack's own listening sockets (proxy, API, mesh).
    OwnSocket,
    /// `CONNECT` to a port not in `connect_ports`.
    Port,
}

impl Refusal {
    /// Every refusal, in [`Refusal::index`] order.
    pub const ALL: [Refusal; 12] = [
        Refusal::LocalhostName,
        Refusal::MalformedAddress,
        Refusal::Loopback,
        Refusal::Unspecified,
        Refusal::LinkLocal,
        Refusal::Multicast,
        Refusal::Broadcast,
        Refusal::Private,
        Refusal::Reserved,
        Refusal::OwnAddress,
        Refusal::OwnSocket,
        Refusal::Port,
    ];

    /// Position in [`Refusal::ALL`] (for counters).
    pub fn index(self) -> usize {
        Refusal::ALL
            .iter()
            .position(|r| *r == self)
            .expect("every refusal is listed")
    }

    /// The metric label and the rule's short name.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::LocalhostName => "localhost_name",
            Refusal::MalformedAddress => "malformed_address",
            Refusal::Loopback => "loopback",
            Refusal::Unspecified => "unspecified",
            Refusal::LinkLocal => "link_local",
            Refusal::Multicast => "multicast",
            Refusal::Broadcast => "broadcast",
            Refusal::Private => "private",
            Refusal::Reserved => "reserved",
            Refusal::OwnAddress => "own_address",
            Refusal::OwnSocket => "own_socket",
            Refusal::Port => "port",
        }
    }

    /// A sentence for the 403 body.
    pub fn explain(self) -> &'static str {
        match self {
            Refusal::LocalhostName => "the destination is this machine (localhost)",
            Refusal::MalformedAddress => "the destination is not a valid address",
            Refusal::Loopback => "the destination is a loopback address",
            Refusal::Unspecified => "the destination is an unspecified address (0.0.0.0 or ::)",
            Refusal::LinkLocal => "the destination is a link-local address",
            Refusal::Multicast => "the destination is a multicast address",
            Refusal::Broadcast => "the destination is a broadcast address",
            Refusal::Private => {
                "the destination is a private network address not allowed by the operator"
            }
            Refusal::Reserved => "the destination is a reserved address",
            Refusal::OwnAddress => "the destination is one of this rack's own addresses",
            Refusal::OwnSocket => "the destination is one of this rack's own services",
            Refusal::Port => "CONNECT is allowed only to the configured ports",
        }
    }
}

/// What a request's host is, before any resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// An address (however it was spelled).
    Ip(IpAddr),
    /// A DNS name to resolve (lower case, without a trailing dot).
    Name(String),
}

/// The policy: what the operator allows and what is always the rack's own.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `allow_destinations`: blocks an operator opened explicitly.
    pub allow: Vec<Cidr>,
    /// `connect_ports`: ports `CONNECT` may reach.
    pub connect_ports: Vec<u16>,
    /// The rack's own listening sockets; an unspecified IP means every
    /// local address (and loopback) on that port.
    pub own_sockets: Vec<SocketAddr>,
}

/// The address class of `ip` (after unwrapping IPv4 embedded in IPv6), or
/// `None` for an ordinary public unicast address.
pub fn classify(ip: IpAddr) -> Option<Refusal> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn classify_v4(ip: Ipv4Addr) -> Option<Refusal> {
    let table: &[([u8; 4], u32, Refusal)] = &[
        ([0, 0, 0, 0], 8, Refusal::Unspecified),
        ([127, 0, 0, 0], 8, Refusal::Loopback),
        ([169, 254, 0, 0], 16, Refusal::LinkLocal),
        ([255, 255, 255, 255], 32, Refusal::Broadcast),
        ([224, 0, 0, 0], 4, Refusal::Multicast),
        ([240, 0, 0, 0], 4, Refusal::Reserved),
        ([10, 0, 0, 0], 8, Refusal::Private),
        ([172, 16, 0, 0], 12, Refusal::Private),
        ([192, 168, 0, 0], 16, Refusal::Private),
        ([100, 64, 0, 0], 10, Refusal::Private),
        ([198, 18, 0, 0], 15, Refusal::Private),
        ([192, 0, 0, 0], 24, Refusal::Reserved),
        ([192, 0, 2, 0], 24, Refusal::Reserved),
        ([198, 51, 100, 0], 24, Refusal::Reserved),
        ([203, 0, 113, 0], 24, Refusal::Reserved),
        ([192, 88, 99, 0], 24, Refusal::Reserved),
    ];
    table
        .iter()
        .find(|(net, p, _)| in_v4(ip, *net, *p))
        .map(|(_, _, r)| *r)
}

fn classify_v6(ip: Ipv6Addr) -> Option<Refusal> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some(Refusal::Unspecified);
    }
    if ip.is_loopback() {
        return Some(Refusal::Loopback);
    }
    if s[0] & 0xff00 == 0xff00 {
        return Some(Refusal::Multicast);
    }
    if s[0] & 0xffc0 == 0xfe80 {
        return Some(Refusal::LinkLocal);
    }
    if s[0] & 0xfe00 == 0xfc00 || s[0] & 0xffc0 == 0xfec0 {
        return Some(Refusal::Private);
    }
    // Documentation, discard-only, the rest of ::/8 (not mapped/compatible
    // forms, handled before), and anything outside global unicast 2000::/3.
    if (s[0] == 0x2001 && s[1] == 0x0db8)
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0])
        || s[0] & 0xe000 != 0x2000
    {
        return Some(Refusal::Reserved);
    }
    None
}

/// IPv4 carried inside an IPv6 address in a way that reaches it:
/// IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64
/// `64:ff9b::a.b.c.d` (RFC 6052) and 6to4 `2002:aabb:ccdd::` (RFC 3056).
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0; 6] && !ip.is_unspecified() && !ip.is_loopback() {
        return Some(tail());
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail());
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// One part of an inet_aton address: decimal, `0x` hex or `0` octal.
fn aton_part(p: &str) -> Option<u64> {
    if p.is_empty() {
        return None;
    }
    let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        (h, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if digits.is_empty() {
        return Some(0); // "0x" alone is 0 for inet_aton
    }
    if digits.len() > 12 {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// inet_aton(3) and the WHATWG URL host parser: 1 to 4 parts, the last
/// filling the remaining bytes (`127.1`, `2130706433`, `0x7f.0.0.1`).
pub fn parse_ipv4_loose(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let nums: Vec<u64> = parts.iter().map(|p| aton_part(p)).collect::<Option<_>>()?;
    let (last, init) = nums.split_last()?;
    if init.iter().any(|n| *n > 255) {
        return None;
    }
    let rest_bits = 8 * (4 - init.len() as u32);
    if *last >= 1u64 << rest_bits {
        return None;
    }
    let mut v: u64 = 0;
    for (i, n) in init.iter().enumerate() {
        v |= n << (24 - 8 * i as u32);
    }
    Some(Ipv4Addr::from((v | last) as u32))
}

/// Whether a label is numeric in the WHATWG sense (then the whole host must
/// parse as IPv4, or it is invalid).
fn numeric_label(l: &str) -> bool {
    !l.is_empty()
        && (l.bytes().all(|b| b.is_ascii_digit())
            || ((l.starts_with("0x") || l.starts_with("0X"))
                && l[2..].bytes().all(|b| b.is_ascii_hexdigit())))
}

impl Policy {
    /// What `host` (as in a URL or `CONNECT` authority, brackets allowed)
    /// is: an address in any spelling, or a name to resolve.
    ///
    /// # Errors
    /// [`Refusal::LocalhostName`] for `localhost` and `*.localhost`,
    /// [`Refusal::MalformedAddress`] for numeric-looking garbage.
    pub fn parse_host(host: &str) -> Result<Host, Refusal> {
        let h = host.trim();
        if let Some(inner) = h.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
            // Zone ids (`%eth0`) only make sense for link-local: refuse.
            return inner
                .parse::<Ipv6Addr>()
                .map(|v6| Host::Ip(IpAddr::V6(v6)))
                .map_err(|_| Refusal::MalformedAddress);
        }
        if let Ok(v6) = h.parse::<Ipv6Addr>() {
            return Ok(Host::Ip(IpAddr::V6(v6)));
        }
        let lower = h.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        if name.is_empty() || name.contains(['%', '[', ']', '/', '\\', '@', ' ']) {
            return Err(Refusal::MalformedAddress);
        }
        if name == "localhost" || name.ends_with(".localhost") {
            return Err(Refusal::LocalhostName);
        }
        let last = name.rsplit('.').next().unwrap_or("");
        if numeric_label(last) {
            return parse_ipv4_loose(name)
                .map(|v4| Host::Ip(IpAddr::V4(v4)))
                .ok_or(Refusal::MalformedAddress);
        }
        Ok(Host::Name(name.to_string()))
    }

    /// Whether the operator opened `ip` explicitly.
    fn allowed(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|c| c.contains(ip))
    }

    /// Judges one resolved destination. `is_local` says whether an address
    /// is one of this machine's own (the caller asks the kernel).
    ///
    /// # Errors
    /// The rule that refuses it.
    pub fn check_addr(
        &self,
        dest: SocketAddr,
        is_local: &dyn Fn(IpAddr) -> bool,
    ) -> Result<(), Refusal> {
        let ip = match dest.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(dest.ip()),
            v4 => v4,
        };
        let class = classify(ip);
        let local = || {
            matches!(class, Some(Refusal::Loopback | Refusal::Unspecified))
                || is_local(ip)
                || embedded_v4(match ip {
                    IpAddr::V6(v6) => v6,
                    IpAddr::V4(_) => Ipv6Addr::UNSPECIFIED,
                })
                .is_some_and(|v4| is_local(IpAddr::V4(v4)))
        };
        for own in &self.own_sockets {
            if own.port() != dest.port() {
                continue;
            }
            let own_ip = match own.ip() {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(own.ip()),
                v4 => v4,
            };
            if own_ip == ip || ((own_ip.is_unspecified() || own_ip.is_loopback()) && local()) {
                return Err(Refusal::OwnSocket);
            }
        }
        if class != Some(Refusal::Loopback) && class != Some(Refusal::Unspecified) && is_local(ip) {
            return Err(Refusal::OwnAddress);
        }
        match class {
            Some(r) if !self.allowed(ip) => Err(r),
            _ => Ok(()),
        }
    }

    /// Judges every resolved address of a destination: any refused one
    /// refuses it all.
    ///
    /// # Errors
    /// The first refusal.
    pub fn check(
        &self,
        addrs: &[SocketAddr],
        is_local: &dyn Fn(IpAddr) -> bool,
    ) -> Result<(), Refusal> {
        addrs.iter().try_for_each(|a| self.check_addr(*a, is_local))
    }

    /// Whether `CONNECT` may reach `port`.
    ///
    /// # Errors
    /// [`Refusal::Port`].
    pub fn check_connect_port(&self, port: u16) -> Result<(), Refusal> {
        if self.connect_ports.contains(&port) {
            Ok(())
        } else {
            Err(Refusal::Port)
        }
    }
}

/// Asks the kernel whether `ip` is one of this machine's addresses: binding
/// a UDP socket to it succeeds only then (no packet is sent). Fails closed:
/// any error other than "address not available" counts as local. Loopback
/// and unspecified are answered without a syscall.
pub fn kernel_is_local(ip: IpAddr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    if let IpAddr::V6(v6) = ip {
        if v6.segments()[0] & 0xffc0 == 0xfe80 || v6.is_multicast() {
            return false; // needs a scope id to bind; refused by class anyway
        }
    }
    if let IpAddr::V4(v4) = ip {
        if v4.is_multicast() || v4.is_broadcast() {
            return false;
        }
    }
    match std::net::UdpSocket::bind(SocketAddr::new(ip, 0)) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::AddrNotAvailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn never_local(_: IpAddr) -> bool {
        false
    }

    fn host_ip(s: &str) -> IpAddr {
        match Policy::parse_host(s) {
            Ok(Host::Ip(ip)) => ip,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn every_spelling_of_loopback_is_an_address() {
        for s in [
            "127.0.0.1",
            "127.1",
            "2130706433",
            "0x7f.1",
            "0x7f000001",
            "0177.0.0.1",
            "0177.0.0.01",
            "127.0.0.1.",
            "[::ffff:127.0.0.1]",
            "[::ffff:7f00:1]",
            "[::1]",
            "::1",
            "[::127.0.0.1]",
            "[64:ff9b::7f00:1]",
            "[2002:7f00:1::]",
            "127.000.000.001",
        ] {
            let ip = host_ip(s);
            assert_eq!(classify(ip), Some(Refusal::Loopback), "{s} -> {ip}");
            let p = Policy::default();
            assert_eq!(
                p.check_addr(SocketAddr::new(ip, 80), &never_local),
                Err(Refusal::Loopback),
                "{s}"
            );
        }
        for s in ["0.0.0.0", "0", "[::]", "0x0", "0.0"] {
            assert_eq!(classify(host_ip(s)), Some(Refusal::Unspecified), "{s}");
        }
    }

    #[test]
    fn names() {
        for s in ["localhost", "LOCALHOST.", "api.localhost", "x.LocalHost."] {
            assert_eq!(Policy::parse_host(s), Err(Refusal::LocalhostName), "{s}");
        }
        assert_eq!(
            Policy::parse_host("Tile.Example.org."),
            Ok(Host::Name("tile.example.org".into()))
        );
        // Numeric-looking but not an address: never handed to a resolver.
        for s in [
            "1.2.3.4.5",
            "256.1.1.1",
            "1.2.3.256",
            "09.1.1.1",
            "4294967296",
            "0x1.0x2.3.4.5",
        ] {
            assert_eq!(Policy::parse_host(s), Err(Refusal::MalformedAddress), "{s}");
        }
        assert_eq!(
            Policy::parse_host("[fe80::1%eth0]"),
            Err(Refusal::MalformedAddress)
        );
        // A name that merely starts with digits is a name.
        assert_eq!(
            Policy::parse_host("1.example"),
            Ok(Host::Name("1.example".into()))
        );
    }

    #[test]
    fn classes() {
        let t = [
            ("10.1.2.3", Some(Refusal::Private)),
            ("172.31.255.1", Some(Refusal::Private)),
            ("172.32.0.1", None),
            ("192.168.1.1", Some(Refusal::Private)),
            ("100.64.0.1", Some(Refusal::Private)),
            ("100.128.0.1", None),
            ("198.18.0.1", Some(Refusal::Private)),
            ("198.19.255.255", Some(Refusal::Private)),
            ("169.254.169.254", Some(Refusal::LinkLocal)),
            ("224.0.0.1", Some(Refusal::Multicast)),
            ("255.255.255.255", Some(Refusal::Broadcast)),
            ("240.0.0.1", Some(Refusal::Reserved)),
            ("192.0.2.1", Some(Refusal::Reserved)),
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("fe80::1", Some(Refusal::LinkLocal)),
            ("fd00::1", Some(Refusal::Private)),
            ("fc00::1", Some(Refusal::Private)),
            ("ff02::1", Some(Refusal::Multicast)),
            ("2001:db8::1", Some(Refusal::Reserved)),
            ("2606:4700::1111", None),
            ("::ffff:10.0.0.1", Some(Refusal::Private)),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::a9fe:a9fe", Some(Refusal::LinkLocal)),
            ("2002:c0a8:0101::1", Some(Refusal::Private)),
            ("2002:0808:0808::1", None),
        ];
        for (s, want) in t {
            assert_eq!(classify(s.parse().unwrap()), want, "{s}");
        }
    }

    #[test]
    fn operator_allow_list_opens_private_but_never_own_sockets() {
        let p = Policy {
            allow: vec![
                Cidr::parse("10.20.0.0/16").unwrap(),
                Cidr::parse("127.0.0.0/8").unwrap(),
            ],
            connect_ports: vec![443],
            own_sockets: vec![
                "0.0.0.0:3128".parse().unwrap(),
                "127.0.0.1:7480".parse().unwrap(),
                "10.20.0.5:7400".parse().unwrap(),
            ],
        };
        let rack_addr: IpAddr = "10.20.0.5".parse().unwrap();
        let is_local = move |ip: IpAddr| ip.is_loopback() || ip == rack_addr;
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(p.check_addr(sa("10.20.3.4:80"), &is_local), Ok(()));
        assert_eq!(
            p.check_addr(sa("10.21.3.4:80"), &is_local),
            Err(Refusal::Private)
        );
        assert_eq!(p.check_addr(sa("127.0.0.1:8080"), &is_local), Ok(()));
        assert_eq!(
            p.check_addr(sa("127.0.0.1:3128"), &is_local),
            Err(Refusal::OwnSocket)
        );
        assert_eq!(
            p.check_addr(sa("127.0.0.2:3128"), &is_local),
            Err(Refusal::OwnSocket)
        );
        assert_eq!(
            p.check_addr(sa("[::ffff:127.0.0.1]:7480"), &is_local),
            Err(Refusal::OwnSocket)
        );
        assert_eq!(
            p.check_addr(sa("10.20.0.5:3128"), &is_local),
            Err(Refusal::OwnSocket)
        );
        assert_eq!(
            p.check_addr(sa("10.20.0.5:22"), &is_local),
            Err(Refusal::OwnAddress)
        );
        assert_eq!(
            p.check_addr(sa("0.0.0.0:8080"), &is_local),
            Err(Refusal::Unspecified)
        );
        assert_eq!(
            p.check(&[sa("8.8.8.8:80"), sa("127.0.0.1:3128")], &is_local),
            Err(Refusal::OwnSocket),
            "one bad address refuses all"
        );
        assert_eq!(p.check_connect_port(443), Ok(()));
        assert_eq!(p.check_connect_port(22), Err(Refusal::Port));
    }

    #[test]
    fn refusal_labels_are_distinct() {
        let mut l: Vec<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
        l.sort_unstable();
        l.dedup();
        assert_eq!(l.len(), Refusal::ALL.len());
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn kernel_knows_loopback_and_not_documentation_addresses() {
        assert!(kernel_is_local("127.0.0.1".parse().unwrap()));
        assert!(!kernel_is_local("192.0.2.77".parse().unwrap()));
    }

    proptest! {
        /// Any IPv4 address, in any inet_aton spelling, parses back to itself,
        /// so no spelling slips past the class check.
        #[test]
        fn loose_spellings_round_trip(v in any::<u32>(), form in 0u8..6) {
            let ip = Ipv4Addr::from(v);
            let o = ip.octets();
            let s = match form {
                0 => ip.to_string(),
                1 => v.to_string(),
                2 => format!("0x{v:x}"),
                3 => format!("0{:o}.0{:o}.0{:o}.0{:o}", o[0], o[1], o[2], o[3]),
                4 => format!("{}.{}", o[0], v & 0x00ff_ffff),
                _ => format!("0x{:x}.{}.{}", o[0], o[1], v & 0xffff),
            };
            prop_assert_eq!(Policy::parse_host(&s), Ok(Host::Ip(IpAddr::V4(ip))));
            prop_assert_eq!(Policy::parse_host(&format!("{s}.")), Ok(Host::Ip(IpAddr::V4(ip))));
        }

        /// Wrapping an IPv4 address in IPv6 (mapped, NAT64) never changes its class.
        #[test]
        fn embedding_keeps_the_class(v in any::<u32>()) {
            let ip = Ipv4Addr::from(v);
            let mapped = ip.to_ipv6_mapped();
            let o = ip.octets();
            let nat64 = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0,
                u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([o[2], o[3]]));
            prop_assert_eq!(classify(IpAddr::V6(mapped)), classify(IpAddr::V4(ip)));
            prop_assert_eq!(classify(IpAddr::V6(nat64)), classify(IpAddr::V4(ip)));
        }

        /// The policy refuses every non-public address unless allowed.
        #[test]
        fn default_policy_refuses_every_internal_class(v in any::<u32>(), port in 1u16..) {
            let ip = IpAddr::V4(Ipv4Addr::from(v));
            let r = Policy::default().check_addr(SocketAddr::new(ip, port), &never_local);
            prop_assert_eq!(r.err(), classify(ip));
        }
    }
}
