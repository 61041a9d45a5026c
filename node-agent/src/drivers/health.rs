//! Health probes: one TCP connect, HTTP/1.1 GET or command run, bounded
//! by the spec's `timeout_ms`.

use std::process::Stdio;
use std::time::Duration;

use deploy::appliance::{HealthCheck, HealthSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use util::process::GroupKillGuard;

/// Longest HTTP status line read.
const MAX_STATUS_LINE: usize = 1024;

/// Run one probe. `Ok(())` is healthy; `Err` says why not.
///
/// # Errors
/// A human-readable reason: refused, timed out, wrong status, exit status.
pub async fn check_health(h: &HealthSpec) -> Result<(), String> {
    let timeout = Duration::from_millis(h.timeout_ms);
    match tokio::time::timeout(timeout, probe(&h.check)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", h.timeout_ms)),
    }
}

async fn probe(check: &HealthCheck) -> Result<(), String> {
    match check {
        HealthCheck::Tcp { port, host } => {
            let host = host.as_deref().unwrap_or("127.0.0.1");
            TcpStream::connect((unbracket(host), *port))
                .await
                .map(drop)
                .map_err(|e| format!("tcp {host}:{port}: {e}"))
        }
        HealthCheck::Http { url, status } => http(url, *status).await,
        HealthCheck::Command { command } => run(command).await,
    }
}

fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Split `http://host[:port][/path]` into (authority, host, port, path).
fn parse_url(url: &str) -> Result<(&str, &str, u16, &str), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (
            &authority[..i],
            authority[i + 1..]
                .parse()
                .map_err(|_| format!("{url:?}: bad port"))?,
        ),
        _ => (authority, 80),
    };
    if host.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    Ok((authority, unbracket(host), port, path))
}

async fn http(url: &str, expected: Option<u16>) -> Result<(), String> {
    let (authority, host, port, path) = parse_url(url)?;
    let mut s = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: fieldrack-health\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < MAX_STATUS_LINE {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.lines().next().unwrap_or("");
    let code: u16 = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {url}: not an HTTP response: {line:?}"))?;
    let ok = match expected {
        Some(e) => code == e,
        None => (200..300).contains(&code),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "GET {url}: status {code}, expected {}",
            expected.map_or_else(|| "2xx".to_string(), |e| e.to_string())
        ))
    }
}

async fn run(command: &[String]) -> Result<(), String> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| "empty health command".to_string())?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    // Kills the probe's process group if the probe is abandoned (timeout).
    let mut guard = GroupKillGuard::new(child.id());
    let status = child.wait().await.map_err(|e| format!("{program}: {e}"))?;
    // Reaped: its group id may be reused from now on.
    guard.disarm();
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program}: {}", super::ExitInfo::from(status)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn spec(check: HealthCheck) -> HealthSpec {
        HealthSpec {
            check,
            interval_ms: 1000,
            timeout_ms: 2000,
            start_grace_ms: 0,
        }
    }

    #[test]
    fn urls() {
        assert_eq!(parse_url("http://h/x?y").unwrap(), ("h", "h", 80, "/x?y"));
        assert_eq!(parse_url("http://h:81").unwrap(), ("h:81", "h", 81, "/"));
        assert_eq!(
            parse_url("http://[::1]:82/").unwrap(),
            ("[::1]:82", "::1", 82, "/")
        );
        assert_eq!(
            parse_url("http://[::1]/").unwrap(),
            ("[::1]", "::1", 80, "/")
        );
        assert!(parse_url("https://h/").is_err());
        assert!(parse_url("http://h:x/").is_err());
        assert!(parse_url("http:///").is_err());
    }

    #[tokio::test]
    async fn tcp_against_a_real_listener() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let check = |host: Option<&str>| {
            spec(HealthCheck::Tcp {
                port,
                host: host.map(str::to_string),
            })
        };
        assert_eq!(check_health(&check(None)).await, Ok(()));
        assert_eq!(check_health(&check(Some("127.0.0.1"))).await, Ok(()));
        drop(l);
        let err = check_health(&check(None)).await.unwrap_err();
        assert!(err.contains("refused"), "{err}");
    }

    /// A one-request HTTP server answering `status_line`.
    async fn serve(status_line: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = vec![0u8; 1024];
            let n = s.read(&mut req).await.unwrap();
            s.write_all(format!("{status_line}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await
                .unwrap();
            String::from_utf8_lossy(&req[..n]).into_owned()
        });
        (port, task)
    }

    #[tokio::test]
    async fn http_statuses() {
        let (port, server) = serve("HTTP/1.1 204 No Content").await;
        let url = format!("http://127.0.0.1:{port}/healthz");
        let ok = spec(HealthCheck::Http {
            url: url.clone(),
            status: None,
        });
        assert_eq!(check_health(&ok).await, Ok(()));
        let req = server.await.unwrap();
        assert!(req.starts_with("GET /healthz HTTP/1.1\r\n"), "{req}");
        assert!(
            req.contains(&format!("Host: 127.0.0.1:{port}\r\n")),
            "{req}"
        );

        let (port, _server) = serve("HTTP/1.1 503 Service Unavailable").await;
        let url = format!("http://127.0.0.1:{port}/");
        let err = check_health(&spec(HealthCheck::Http { url, status: None }))
            .await
            .unwrap_err();
        assert!(err.contains("503") && err.contains("2xx"), "{err}");

        let (port, _server) = serve("HTTP/1.0 302 Found").await;
        let url = format!("http://127.0.0.1:{port}/");
        let want_302 = spec(HealthCheck::Http {
            url,
            status: Some(302),
        });
        assert_eq!(check_health(&want_302).await, Ok(()));
    }

    #[tokio::test]
    async fn http_that_never_answers_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let mut h = spec(HealthCheck::Http {
            url: format!("http://127.0.0.1:{port}/"),
            status: None,
        });
        h.timeout_ms = 200;
        let err = check_health(&h).await.unwrap_err();
        assert!(err.contains("200 ms"), "{err}");
        drop(l);
    }

    #[tokio::test]
    async fn commands() {
        let cmd = |c: &[&str]| {
            spec(HealthCheck::Command {
                command: c.iter().map(|s| s.to_string()).collect(),
            })
        };
        assert_eq!(check_health(&cmd(&["true"])).await, Ok(()));
        let err = check_health(&cmd(&["sh", "-c", "exit 3"]))
            .await
            .unwrap_err();
        assert!(err.contains("exit status 3"), "{err}");
        assert!(check_health(&cmd(&["/nonexistent/probe"])).await.is_err());
        // A hung probe is cut off at the timeout and its group killed.
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 1000 & echo $! > {}; wait", pidfile.display());
        let mut hung = cmd(&["sh", "-c", &script]);
        hung.timeout_ms = 500;
        let err = check_health(&hung).await.unwrap_err();
        assert!(err.contains("500 ms"), "{err}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut gone = false;
        for _ in 0..500 {
            if !super::super::procfs::is_alive(pid) {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            gone,
            "the probe's background sleep {pid} survived the timeout"
        );
    }
}
