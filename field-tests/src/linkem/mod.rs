//! A link emulator: delay, jitter, loss, rate, queue and fades between two
//! racks of a [`Field`](crate::Field), since this kernel has no `tc netem`.
//!
//! - [`profile`]: what a direction does to packets ([`Profile`]), the named
//!   profiles (`lan`, `radio-good`, `radio-poor`, `lossy`, `satellite`,
//!   `fading`) and their `name,key=value` overrides;
//! - [`core`]: the sans-IO model of one direction ([`DirectionCore`]):
//!   arrival time and length in, delivery time or drop reason out, with
//!   injected time and a seeded RNG;
//! - [`link`]: the I/O shell ([`EmulatedLink`]): TUN devices in both racks,
//!   routed to each other through a core per direction;
//! - [`measure`]: UDP probes and floods through real sockets, with which the
//!   emulator checks itself against its profile.

pub mod core;
pub mod link;
pub mod measure;
pub mod profile;

pub use self::core::{Counters, DirectionCore, DropReason, Verdict};
pub use self::link::{Direction, DirectionStats, EmulatedLink};
pub use self::profile::{Fade, LinkProfile, Loss, Profile, ProfileError, PROFILE_NAMES};

/// Why emulated links cannot run on this machine (no network namespaces,
/// see [`crate::available`], or no TUN device), or `None` if they can.
#[must_use]
pub fn unavailable() -> Option<String> {
    if let Err(why) = crate::available() {
        return Some(why);
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun: this kernel has no TUN devices".into());
    }
    None
}

/// For a test over emulated links: whether to skip it here, having printed
/// `SKIP:` and why ([`unavailable`]).
#[must_use]
pub fn skip_test() -> bool {
    match unavailable() {
        Some(why) => {
            println!("SKIP: {why}");
            true
        }
        None => false,
    }
}
