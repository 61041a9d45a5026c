//! mesh's integration tests, one module per subject, in one test binary
//! (each test binary links the whole dependency tree again: one binary
//! builds and links once). Run one subject with
//! `cargo test -p mesh --test integration admission::`.

mod admission;
mod bulk;
mod common;
mod membership_sim;
