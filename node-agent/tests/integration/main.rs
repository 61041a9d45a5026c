//! node-agent's integration tests, one module per subject, in one test binary
//! (each test binary links the whole dependency tree again: one binary
//! builds and links once). Run one subject with
//! `cargo test -p node-agent --test integration volumes::`.

mod agents;
mod appliances;
mod browser;
mod bulk;
mod cache;
mod client;
mod common;
mod crash;
mod drills;
mod power_nut;
mod qemu_capture;
mod scale;
mod security;
mod volumes;
