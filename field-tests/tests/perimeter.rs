//! The rack's perimeter as relief staff's devices see it: a client in a
//! namespace of its own on the racks' segment uses rack a's proxy (the
//! default, non-`--local` fleet config: `0.0.0.0:3128`) and tries every
//! spelling of every internal destination it can think of: the rack's own
//! loopback services and admin API, the rack's own address, the other
//! rack, its own address. Every attempt must be refused (403 naming a
//! rule) and the canary services listening inside rack a must never see a
//! connection. A request the proxy answers itself (`/proxy.pac`) proves
//! the client is allowed, so the 403s are the destination policy's.
//!
//! Needs root, iproute2 and nftables; skips (printing `SKIP:`) only when
//! namespaces cannot be created.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::{bail, Result};
use field_tests::proxy_client::ask;
use field_tests::{wait_until, Field, Fleet};

/// How long the client waits for any one answer.
/// Connections a canary listener accepted so far (non-blocking).
fn accepted(l: &TcpListener) -> usize {
    let mut n = 0;
    while l.accept().is_ok() {
        n += 1;
    }
    n
}

#[test]
fn no_internal_destination_is_reachable_through_the_proxy_from_the_staff_side() -> Result<()> {
    if let Err(why) = field_tests::available() {
        println!("SKIP: {why}");
        return Ok(());
    }
    let _serial = field_tests::serial();
    // "staff" is a namespace on the same segment with no agent: a phone.
    let field = Field::new(["a", "b", "staff"])?;
    let fleet = Fleet::provision(&["a", "b"])?;
    // The staff segment of this test bed is 198.18.0.0/24.
    fleet.edit_configs("\"fd00::/8\"", "\"fd00::/8\", \"198.18.0.0/24\"")?;
    let mut agents = Vec::new();
    for rack in ["a", "b"] {
        agents.push(fleet.start(&field, rack)?);
    }
    let a_ip = field.ip("a")?;
    let b_ip = field.ip("b")?;
    let staff_ip = field.ip("staff")?;
    let proxy = SocketAddr::from((a_ip, 3128));

    // Canaries inside rack a: a service bound to loopback only, one on
    // every address (reachable as the rack's own address), and one on
    // loopback port 443, the one port `CONNECT` may open.
    let (loopback_canary, any_canary, tls_canary) = field.run_in("a", || {
        let lo = TcpListener::bind("127.0.0.1:0")?;
        let any = TcpListener::bind("0.0.0.0:0")?;
        let tls = TcpListener::bind("127.0.0.1:443")?;
        for l in [&lo, &any, &tls] {
            l.set_nonblocking(true)?;
        }
        Ok((lo, any, tls))
    })?;
    let lo_port = loopback_canary.local_addr()?.port();
    let any_port = any_canary.local_addr()?.port();

    let result = (|| -> Result<()> {
        wait_until(Duration::from_secs(20), "rack a's proxy answering", || {
            field.run_in("staff", || {
                let pac = ask(
                    proxy,
                    "GET /proxy.pac HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                )?;
                Ok(pac.starts_with("HTTP/1.1 200"))
            })
        })?;

        // Every spelling of every internal destination, on the canaries'
        // ports and on the admin API's (127.0.0.1:7480 on every rack).
        let hosts = [
            "127.0.0.1".to_owned(),
            "127.1".into(),
            "2130706433".into(),
            "0x7f000001".into(),
            "0x7f.1".into(),
            "0177.0.0.1".into(),
            "0.0.0.0".into(),
            "0".into(),
            "[::1]".into(),
            "[::ffff:127.0.0.1]".into(),
            "[::ffff:7f00:1]".into(),
            "localhost".into(),
            "localhost.".into(),
            "LOCALHOST".into(),
            a_ip.to_string(),
            b_ip.to_string(),
            staff_ip.to_string(),
        ];
        let ports = [lo_port, any_port, 443, 7480, 3128];
        let mut tried = 0;
        let mut reached = Vec::new();
        field.run_in("staff", || {
            for host in &hosts {
                for port in ports {
                    for request in [
                        format!("GET http://{host}:{port}/api/v1/status HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"),
                        format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"),
                    ] {
                        tried += 1;
                        let answer = ask(proxy, &request)?;
                        let status = answer.lines().next().unwrap_or("");
                        if !(status.starts_with("HTTP/1.1 403") && answer.contains("rule:")) {
                            reached.push(format!("{}: {status}", request.lines().next().unwrap_or("")));
                        }
                    }
                }
            }
            Ok(())
        })?;
        println!("{tried} attempts through rack a's proxy from the staff side");
        if !reached.is_empty() {
            bail!(
                "not refused by the destination policy:\n{}",
                reached.join("\n")
            );
        }
        let (lo, any, tls) = (
            accepted(&loopback_canary),
            accepted(&any_canary),
            accepted(&tls_canary),
        );
        if lo + any + tls > 0 {
            bail!("the canaries inside rack a were reached: loopback {lo}, any-address {any}, 443 {tls}");
        }
        println!("all {tried} refused (403, rule named); the canaries saw no connection");
        Ok(())
    })();
    if let Err(e) = &result {
        eprintln!("FAILED: {e:#}");
        fleet.dump_logs(40);
    }
    drop(agents);
    result
}
