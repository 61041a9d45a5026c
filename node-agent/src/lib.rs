//! The `fieldrack` agent and its command-line tools.
//!
//! Layout:
//! - [`agent`]: wires mesh, store, power and API into a running rack.
//! - [`api`]: the admin HTTP API (hyper).
//! - [`client`]: the CLI's client for that API.
//! - [`demo`]: `fieldrack demo`, a local field of racks.
//! - [`drivers`]: appliance drivers (process, QEMU), health probes.
//! - [`fleet`]: provisioning (`fleet init`, `add-rack`, `revoke`).
//! - [`limits`]: the open-file limit and each listener's share of it.
//! - [`metrics`]: Prometheus text.
//! - [`power`]: power telemetry (NUT, generator file or command).
//! - [`state`] / [`store`]: durable local state in sled behind a trait.
//! - [`status`]: the status document and its table rendering.
//! - [`supervisor`]: runs the appliances this rack's lease covers (a pure
//!   planner, one fencing task per instance).

pub mod agent;
pub mod api;
pub mod cache_mesh;
pub mod client;
pub mod demo;
pub mod drivers;
pub mod fleet;
pub mod limits;
pub mod metrics;
pub mod power;
pub mod proxy;
pub mod state;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod volumes;
