//! cache-proxy's integration tests, one module per subject, in one test
//! binary (each test binary links the whole dependency tree again: one
//! binary builds and links once). Run one subject with
//! `cargo test -p cache-proxy --test integration proxy::`.

mod common;
mod limits;
mod mbtiles;
mod million;
mod pmtiles;
mod proxy;
mod security;
mod tls;
