//! The few helpers every Fieldrack crate needs, each written once.
//!
//! The bottom of the dependency graph: it depends on no other crate of the
//! workspace, so the storage engine (`datastore`) and the proxy
//! (`cache-proxy`), which know nothing of libp2p or the fleet, can use it as
//! well as the agent.
//!
//! - [`time`]: the wall clock as Unix seconds and milliseconds (for records
//!   and reports only: no decision in Fieldrack is taken on a wall clock).
//! - [`fs`]: durable file writes (temp file, fsync, rename, fsync the
//!   directory) and the disk-full test.
//! - [`record`]: the `[version][crc32][payload]` envelope of every record
//!   kept in sled.
//! - [`process`]: a guard that kills a child's process group unless disarmed.

pub mod fs;
pub mod process;
pub mod record;
pub mod time;

#[cfg(test)]
mod fuzz_seeds;
