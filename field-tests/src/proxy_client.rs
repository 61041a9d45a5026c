//! A raw HTTP/1.1 client for a rack's proxy, as a staff laptop speaks
//! to it: one request on a fresh connection, the answer read as far as its
//! `Content-Length` says.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};

/// How long to wait for a connection or for the answer's next bytes.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `request` to `proxy` and returns its answer: the head and, after
/// it, as much body as `Content-Length` says (a refused `CONNECT` may keep
/// the connection open, so the answer ends where its length says).
pub fn ask(proxy: SocketAddr, request: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&proxy, ANSWER_TIMEOUT)
        .with_context(|| format!("connecting to the proxy at {proxy}"))?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    s.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(head_end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..head_end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|n| answer.len() >= head_end + 4 + n) {
                break;
            }
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) if e.kind() == ErrorKind::ConnectionReset && !answer.is_empty() => break,
            Err(e) => return Err(e).context("reading the proxy's answer"),
        }
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}
