//! Drills: faults injected into a live field on the operator's order,
//! measured and reported (`fieldrack drill`).
//!
//! Layout:
//! - [`faults`]: sans-IO: the faults, their deadlines, what each means
//!   for one rack (table-tested).
//! - [`enforce`]: the agent's side: orders from the admin API, stored
//!   durably, carried out (mesh filter, power cut, power reading, proxy
//!   backhaul) and healed at their deadline by the faulted agent itself.
//! - [`scenario`]: scenarios from the command line or a drill file.
//! - [`plan`]: sans-IO: preconditions and blast radius from the racks'
//!   status.
//! - [`report`]: sans-IO: the timeline and verdicts from probes and the
//!   racks' event logs; the stable report JSON, its table and its HTML
//!   timeline.
//! - [`probe`]: what each rack answers to a steady-state probe (a tile
//!   through its own proxy).

pub mod enforce;
pub mod faults;
pub mod plan;
pub mod probe;
pub mod report;
pub mod scenario;

pub use enforce::{power_overlay, DrillError, Enforcer, Targets};
pub use faults::{ActiveFault, Fault, FaultOrder};
