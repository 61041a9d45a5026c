//! datastore's integration tests, one module per subject, in one test binary
//! (each test binary links the whole dependency tree again: one binary
//! builds and links once). Run one subject with
//! `cargo test -p datastore --test integration dirty::`.

mod dirty;
mod durability;
mod manifest_delta;
mod measure;
mod replicate;
