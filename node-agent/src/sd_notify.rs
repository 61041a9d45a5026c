//! systemd's notify protocol: `READY=1` once the agent serves, `WATCHDOG=1`
//! while it lives, `STOPPING=1` on the way out. A datagram of `KEY=VALUE`
//! lines to the unix socket named by `$NOTIFY_SOCKET` (a path, or `@name`
//! in the abstract namespace); see sd_notify(3). A few lines of std, so no
//! crate for it. Without `$NOTIFY_SOCKET` (not under systemd) nothing is
//! sent.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A connected notify socket.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
}

impl Notifier {
    /// The socket `$NOTIFY_SOCKET` names, if set.
    ///
    /// # Errors
    /// The socket named cannot be reached.
    pub fn from_env() -> io::Result<Option<Self>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => Self::connect(&s.to_string_lossy()).map(Some),
        }
    }

    /// Connect to `addr`: a path, or `@name` for the abstract namespace.
    ///
    /// # Errors
    /// The socket cannot be reached.
    pub fn connect(addr: &str) -> io::Result<Self> {
        let sock = UnixDatagram::unbound()?;
        if let Some(name) = addr.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            sock.connect_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
        } else {
            sock.connect(Path::new(addr))?;
        }
        Ok(Self { sock })
    }

    /// Send one state message (`READY=1`, `WATCHDOG=1`...).
    ///
    /// # Errors
    /// The send failed (systemd gone).
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.sock.send(state.as_bytes()).map(|_| ())
    }
}

/// Tell systemd the agent serves (`READY=1`), then feed its watchdog
/// until `cancel`. Called once the API listens and every component has
/// started; a rack waiting for peers is still "ready" (it serves status
/// and waits for a majority on its own).
///
/// `failure` is the agent's health check: while it names a failure (the
/// control plane's Raft core died), the watchdog is not fed, so systemd
/// restarts the agent within `WatchdogSec`.
pub async fn ready_and_feed(
    notifier: Arc<Notifier>,
    failure: impl Fn() -> Option<String> + Send + 'static,
    cancel: CancellationToken,
) {
    if let Err(e) = notifier.notify("READY=1\nSTATUS=serving") {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
    if let Some(every) = watchdog_interval() {
        feed(&notifier, every, failure, cancel).await;
    }
}

/// `WATCHDOG=1` every `every` while `failure` names none, until `cancel`.
async fn feed(
    notifier: &Notifier,
    every: Duration,
    failure: impl Fn() -> Option<String>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {
                if let Some(why) = failure() {
                    tracing::error!(%why, "not feeding the systemd watchdog: the agent is unhealthy");
                    continue;
                }
                if let Err(e) = notifier.notify("WATCHDOG=1") {
                    tracing::warn!(error = %e, "cannot feed the systemd watchdog");
                }
            }
        }
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, as
/// sd_watchdog_enabled(3) advises, when `$WATCHDOG_PID` is unset or ours.
#[must_use]
pub fn watchdog_interval() -> Option<Duration> {
    interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] from the variables' values (pure).
#[must_use]
pub fn interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watchdog is fed while the agent is healthy and starved once
    /// its health check names a failure (then systemd restarts it).
    #[tokio::test]
    async fn an_unhealthy_agent_stops_feeding_the_watchdog() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_nonblocking(true).unwrap();
        let n = Arc::new(Notifier::connect(&path.to_string_lossy()).unwrap());
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let (n, failed, cancel) = (n.clone(), failed.clone(), cancel.clone());
            async move {
                let check = move || {
                    failed
                        .load(std::sync::atomic::Ordering::SeqCst)
                        .then(|| "raft core panicked".to_owned())
                };
                feed(&n, Duration::from_millis(20), check, cancel).await;
            }
        });
        let count = |server: &UnixDatagram| {
            let mut buf = [0u8; 64];
            let mut k = 0;
            while let Ok(len) = server.recv(&mut buf) {
                assert_eq!(&buf[..len], b"WATCHDOG=1");
                k += 1;
            }
            k
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(count(&server) >= 3, "a healthy agent feeds the watchdog");
        failed.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        count(&server);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(count(&server), 0, "an unhealthy agent does not");
        cancel.cancel();
        task.await.unwrap();
    }

    #[test]
    fn messages_arrive_on_a_real_datagram_socket() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(&path.to_string_lossy()).unwrap();
        n.notify("READY=1\nSTATUS=serving").unwrap();
        n.notify("WATCHDOG=1").unwrap();
        let mut buf = [0u8; 128];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn abstract_sockets_work_too() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("fieldrack-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        Notifier::connect(&format!("@{name}"))
            .unwrap()
            .notify("READY=1")
            .unwrap();
        let mut buf = [0u8; 16];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
    }

    #[test]
    fn watchdog_interval_is_half_and_only_for_us() {
        let cases: &[(Option<&str>, Option<&str>, Option<u64>)] = &[
            (Some("30000000"), None, Some(15_000)),
            (Some("30000000"), Some("42"), Some(15_000)),
            (Some("30000000"), Some("43"), None),
            (Some("0"), None, None),
            (Some("x"), None, None),
            (None, Some("42"), None),
        ];
        for (usec, pid, want) in cases {
            assert_eq!(
                interval_from(*usec, *pid, 42),
                want.map(Duration::from_millis),
                "{usec:?} {pid:?}"
            );
        }
    }
}
