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
