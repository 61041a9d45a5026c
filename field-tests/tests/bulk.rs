//! The bulk data plane over an emulated `radio-poor` link (10 Mbit/s,
//! 20 ms ± 10 one way, 2 % bursty loss): a 64 MiB volume replicates from
//! `a` to `b` bit-identically, and the control traffic sharing the
//! saturated link keeps its timing (no rack is ever reported dead; the
//! `suspect` samples and Raft elections are printed). The goodput, as a fraction of
//! `rate × (1 − loss)`, is printed, never asserted: figures come from
//! the benchmark (`field_tests::bench::goodput`, and the ignored test
//! below that runs it).
//!
//! `cargo test -p field-tests --test bulk -- --nocapture` (about 90 s).
//! The whole comparison (four profiles × three congestion controllers
//! and libp2p; about 25 minutes):
//! `cargo test -p field-tests --test bulk -- --ignored --nocapture`
//! (`GOODPUT_MIB`, `GOODPUT_TIMEOUT_S`, `GOODPUT_LINK_BYTES_PER_S` (a
//! replication cap), `GOODPUT_PROFILES` space-separated
//! specs, `GOODPUT_VARIANTS` such as `bbr,cubic,libp2p` narrow it).
//!
//! Needs root (namespaces, TUN devices); skips with `SKIP:` otherwise.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use field_tests::bench::goodput::{self, GoodputArgs, GoodputRow, Variant};
use field_tests::linkem::skip_test as skip;
use field_tests::linkem::{LinkProfile, Profile};
use field_tests::{Field, Fleet};

/// The volume's size.
const MIB: u64 = 64;

/// Bound on the transfer: past it the test fails (a transfer that does
/// not finish is a bug, not a slow figure).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(75);

#[test]
fn a_64_mib_volume_replicates_over_radio_poor_on_the_bulk_plane() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let _serial = field_tests::serial();
    let spec = "radio-poor";
    let profile: Profile = spec.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let field = Field::new(["a", "b"])?;
    let _link = field.emulated_link("a", "b", LinkProfile::symmetric(profile.clone()), 7)?;
    let mut fleet = Fleet::provision(&["a", "b"])?;
    let variant = Variant::Bulk("bbr".into());
    goodput::configure(&fleet, &variant, 0)?;
    let image = goodput::write_image(&fleet, MIB)?;
    let _agents = fleet.start_all(&field)?;
    let result = (|| {
        let (seconds, watch) = goodput::transfer(&fleet, &field, &image, TRANSFER_TIMEOUT)?;
        let args = GoodputArgs {
            mib: MIB,
            timeout: TRANSFER_TIMEOUT,
            link_bytes_per_s: 0,
            ..GoodputArgs::default()
        };
        let row = GoodputRow::new(spec, &profile, &variant, &args, seconds, &watch);
        println!("{}", row.line());
        ensure!(seconds.is_some(), "no replica within {TRANSFER_TIMEOUT:?}");
        ensure!(watch.dead == 0, "a rack was reported dead during the push");
        println!(
            "control traffic during the push: {} of {} peer-state samples suspect, {} Raft elections",
            watch.suspect,
            watch.samples,
            watch.elections()
        );
        let exported = fleet.dir().join("replica.img");
        goodput::export(&fleet, &field, "b", &exported)?;
        let replica = std::fs::read(&exported).context("reading the export")?;
        let original = std::fs::read(&image)?;
        ensure!(replica == original, "the replica differs from the image");
        let s = fleet.status(&field, "a")?;
        println!("a's view of b after the push: {}", s.summary());
        Ok(())
    })();
    if result.is_err() {
        fleet.dump_logs(60);
        fleet.keep();
    }
    result
}

#[test]
#[ignore = "about 25 minutes: cargo test -p field-tests --test bulk -- --ignored --nocapture"]
fn goodput_per_profile_and_congestion_controller() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let _serial = field_tests::serial();
    let mut args = GoodputArgs::default();
    if let Ok(mib) = std::env::var("GOODPUT_MIB") {
        args.mib = mib.parse().context("GOODPUT_MIB")?;
    }
    if let Ok(cap) = std::env::var("GOODPUT_LINK_BYTES_PER_S") {
        args.link_bytes_per_s = cap.parse().context("GOODPUT_LINK_BYTES_PER_S")?;
    }
    if let Ok(t) = std::env::var("GOODPUT_TIMEOUT_S") {
        args.timeout = Duration::from_secs(t.parse().context("GOODPUT_TIMEOUT_S")?);
    }
    if let Ok(p) = std::env::var("GOODPUT_PROFILES") {
        args.profiles = p.split(' ').map(String::from).collect();
    }
    if let Ok(v) = std::env::var("GOODPUT_VARIANTS") {
        args.variants = v
            .split(',')
            .map(|v| match v {
                "libp2p" => Variant::Libp2p,
                cc => Variant::Bulk(cc.into()),
            })
            .collect();
    }
    let rows = goodput::run(args)?;
    println!("\n{:-^100}", " goodput (fraction of rate × (1 − loss)) ");
    for r in &rows {
        println!("{}", r.line());
    }
    Ok(())
}
