//! The `fieldrack` agent and its command-line tools.
//!
//! Layout:
//! - [`agent`]: wires mesh, store, power and API into a running rack.
//! - [`api`]: the admin HTTP API (hyper).
//! - [`client`]: the CLI's client for that API.
//! - [`demo`]: `fieldrack demo`, a local field of racks.
//! - [`drill`]: `fieldrack drill`: faults enforced by each agent with
//!   deadlines, preconditions, probes and the drill report.
//! - [`drivers`]: appliance drivers (process, QEMU), health probes.
//! - [`fleet`]: provisioning (`fleet init`, `add-rack`, `revoke`).
//! - [`field_plan`]: the failure plan of a `field.toml` (`fleet plan`).
//! - [`bundle`]: signed rack bundles (`fleet bundle`, `install`).
//! - [`doctor`]: the readiness checks of a rack (`fieldrack doctor`).
//! - [`sd_notify`]: systemd readiness and watchdog notifications.
//! - [`protected`]: time to protected, and deploying the installed catalog.
//! - [`quorum_override`]: the operator's audited override of a lost quorum.
//! - [`limits`]: the open-file limit and each listener's share of it.
//! - [`metrics`]: Prometheus text.
//! - [`power`]: power telemetry (NUT, generator file or command).
//! - [`state`] / [`store`]: durable local state in sled behind a trait.
//! - [`status`]: the status document and its table rendering.
//! - [`supervisor`]: runs the appliances this rack's lease covers (a pure
//!   planner, one fencing task per instance).

pub mod agent;
pub mod api;
pub mod bulk;
pub mod bundle;
pub mod cache_mesh;
pub mod client;
pub mod console;
pub mod demo;
pub mod doctor;
pub mod drill;
pub mod drivers;
pub mod field_plan;
pub mod fleet;
pub mod limits;
pub mod metrics;
pub mod power;
pub mod protected;
pub mod proxy;
pub mod quorum_override;
pub mod resend;
pub mod sample_tiles;
pub mod sd_notify;
pub mod state;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod tile_packs;
pub mod volumes;
