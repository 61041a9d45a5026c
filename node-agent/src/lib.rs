//! The `fieldrack` agent and its command-line tools.
//!
//! Layout:
//! - [`agent`]: wires mesh, store, power and API into a running rack.
//! - [`api`]: the admin HTTP API (hyper).
//! - [`client`]: the CLI's client for that API.
//! - [`demo`]: `fieldrack demo`, a local field of racks.
//! - [`drivers`]: appliance drivers (process, QEMU), health probes.
//! - [`fleet`]: provisioning (`fleet init`, `add-rack`, `revoke`).
//! - [`metrics`]: Prometheus text.
//! - [`power`]: power telemetry (NUT, generator file or command).
//! - [`state`] / [`store`]: durable local state in sled behind a trait.
//! - [`status`]: the status document and its table rendering.

pub mod agent;
pub mod api;
pub mod appliances;
pub mod cache_mesh;
pub mod client;
pub mod demo;
pub mod drivers;
pub mod fleet;
pub mod metrics;
pub mod power;
pub mod proxy;
pub mod state;
pub mod status;
pub mod store;
pub mod volumes;
