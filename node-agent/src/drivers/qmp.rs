//! A small QMP (QEMU Machine Protocol) client.
//!
//! [`Qmp`] is the async client an [`super::Instance`] keeps: it reads the
//! greeting, negotiates `qmp_capabilities`, tags each command with an id and
//! routes the answer back; asynchronous events go to a bounded broadcast.
//! [`execute_blocking`] is a one-shot synchronous exchange on a second
//! monitor socket, for [`datastore::PauseHooks`] (a sync trait).

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

use super::DriverError;

/// Longest QMP message accepted (query-* answers are a few KiB).
const MAX_LINE: u64 = 1 << 20;
/// Events kept for slow subscribers; the drivers wait for one or two.
const EVENT_QUEUE: usize = 256;
/// A command QEMU has not answered in this long is given up on.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A connected, negotiated QMP session.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    waiters: Waiters,
    /// The reader task holds the only strong sender, so subscribers see
    /// the channel close when the connection does (QEMU gone).
    events: broadcast::WeakSender<Value>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn protocol(msg: impl Into<String>) -> DriverError {
    DriverError::QmpProtocol(msg.into())
}

/// Turn a QMP answer into its `return` value or a typed error.
fn answer(command: &str, v: Value) -> Result<Value, DriverError> {
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    if let Some(e) = v.get("error") {
        let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        return Err(DriverError::Qmp {
            command: command.into(),
            class: text("class"),
            desc: text("desc"),
        });
    }
    Err(protocol(format!("unexpected answer to {command}: {v}")))
}

fn is_answer(v: &Value) -> bool {
    v.get("return").is_some() || v.get("error").is_some()
}

async fn read_message<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<Option<Value>, DriverError> {
    let mut line = Vec::new();
    let n = r
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| protocol(format!("read: {e}")))?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') && n as u64 == MAX_LINE {
        return Err(protocol("message longer than 1 MiB"));
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| protocol(format!("bad JSON from QEMU: {e}")))
}

impl Qmp {
    /// Connect to a QMP socket, read the greeting and negotiate
    /// capabilities.
    ///
    /// # Errors
    /// [`DriverError::QmpProtocol`] when the socket refuses, the greeting is
    /// not QMP's, or negotiation fails.
    pub async fn connect(path: &Path) -> Result<Self, DriverError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| protocol(format!("connect {}: {e}", path.display())))?;
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let greeting = tokio::time::timeout(COMMAND_TIMEOUT, read_message(&mut r))
            .await
            .map_err(|_| protocol("no greeting"))??
            .ok_or_else(|| protocol("closed before the greeting"))?;
        if greeting.get("QMP").is_none() {
            return Err(protocol(format!("not a QMP greeting: {greeting}")));
        }
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .await
            .map_err(|e| protocol(format!("write: {e}")))?;
        loop {
            let msg = tokio::time::timeout(COMMAND_TIMEOUT, read_message(&mut r))
                .await
                .map_err(|_| protocol("no answer to qmp_capabilities"))??
                .ok_or_else(|| protocol("closed during negotiation"))?;
            if is_answer(&msg) {
                answer("qmp_capabilities", msg)?;
                break;
            }
        }
        let waiters: Waiters = Arc::default();
        let (events, _) = broadcast::channel(EVENT_QUEUE);
        let weak = events.downgrade();
        let reader = tokio::spawn(read_loop(r, waiters.clone(), events));
        Ok(Self {
            writer: tokio::sync::Mutex::new(w),
            waiters,
            events: weak,
            next_id: AtomicU64::new(1),
            reader,
        })
    }

    /// Events from now on (`{"event": ..., "data": ..., "timestamp": ...}`).
    /// The channel closes when the connection does.
    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        match self.events.upgrade() {
            Some(tx) => tx.subscribe(),
            None => {
                // Already closed: a receiver that says so.
                let (_, rx) = broadcast::channel(1);
                rx
            }
        }
    }

    /// Run `cmd` with `args` (`Value::Null` or `{}` for none).
    ///
    /// # Errors
    /// [`DriverError::Qmp`] with QEMU's error, [`DriverError::QmpProtocol`]
    /// when the connection is gone or QEMU does not answer in
    /// [`COMMAND_TIMEOUT`].
    pub async fn execute(&self, cmd: &str, args: Value) -> Result<Value, DriverError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": cmd, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters lock poisoned")
            .insert(id, tx);
        let mut line = msg.to_string();
        line.push('\n');
        let sent = self.writer.lock().await.write_all(line.as_bytes()).await;
        if let Err(e) = sent {
            self.waiters
                .lock()
                .expect("waiters lock poisoned")
                .remove(&id);
            return Err(protocol(format!("{cmd}: write: {e}")));
        }
        let reply = tokio::time::timeout(COMMAND_TIMEOUT, rx).await;
        self.waiters
            .lock()
            .expect("waiters lock poisoned")
            .remove(&id);
        match reply {
            Ok(Ok(v)) => answer(cmd, v),
            Ok(Err(_)) => Err(protocol(format!("{cmd}: connection closed"))),
            Err(_) => Err(protocol(format!("{cmd}: no answer in {COMMAND_TIMEOUT:?}"))),
        }
    }
}

async fn read_loop(
    mut r: BufReader<tokio::net::unix::OwnedReadHalf>,
    waiters: Waiters,
    events: broadcast::Sender<Value>,
) {
    loop {
        match read_message(&mut r).await {
            Ok(Some(msg)) if msg.get("event").is_some() => {
                let _ = events.send(msg);
            }
            Ok(Some(msg)) => {
                let id = msg.get("id").and_then(Value::as_u64);
                let waiter =
                    id.and_then(|id| waiters.lock().expect("waiters lock poisoned").remove(&id));
                match waiter {
                    Some(w) => {
                        let _ = w.send(msg);
                    }
                    None => tracing::debug!(%msg, "QMP answer nobody waits for"),
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "QMP connection failed");
                break;
            }
        }
    }
    // Dropping the senders fails every pending command.
    waiters.lock().expect("waiters lock poisoned").clear();
}

/// Connect, negotiate, run one command and disconnect, synchronously,
/// each step bounded by `timeout`.
///
/// # Errors
/// As [`Qmp::execute`].
pub fn execute_blocking(
    path: &Path,
    cmd: &str,
    args: Value,
    timeout: Duration,
) -> Result<Value, DriverError> {
    let stream = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| protocol(format!("connect {}: {e}", path.display())))?;
    let io = |e: std::io::Error| protocol(format!("{cmd}: {e}"));
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut w = stream.try_clone().map_err(io)?;
    let mut r = std::io::BufReader::new(stream);
    let mut read = || -> Result<Value, DriverError> {
        let mut line = Vec::new();
        let n = std::io::Read::take(&mut r, MAX_LINE)
            .read_until(b'\n', &mut line)
            .map_err(io)?;
        if n == 0 {
            return Err(protocol(format!("{cmd}: connection closed")));
        }
        serde_json::from_slice(&line).map_err(|e| protocol(format!("bad JSON from QEMU: {e}")))
    };
    let greeting = read()?;
    if greeting.get("QMP").is_none() {
        return Err(protocol(format!("not a QMP greeting: {greeting}")));
    }
    let mut answer_of = |name: &str, msg: Value| -> Result<Value, DriverError> {
        writeln!(w, "{msg}").map_err(io)?;
        loop {
            let m = read()?;
            if is_answer(&m) {
                return answer(name, m);
            }
        }
    };
    answer_of("qmp_capabilities", json!({"execute": "qmp_capabilities"}))?;
    let mut msg = json!({ "execute": cmd });
    if !args.is_null() {
        msg["arguments"] = args;
    }
    answer_of(cmd, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_typed() {
        assert_eq!(answer("x", json!({"return": {}})).unwrap(), json!({}));
        match answer(
            "stop",
            json!({"error": {"class": "GenericError", "desc": "nope"}}),
        ) {
            Err(DriverError::Qmp {
                command,
                class,
                desc,
            }) => {
                assert_eq!(
                    (command.as_str(), class.as_str(), desc.as_str()),
                    ("stop", "GenericError", "nope")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            answer("x", json!({"event": "STOP"})),
            Err(DriverError::QmpProtocol(_))
        ));
    }

    /// A fake QMP server on a real socket: greeting, negotiation, an event
    /// interleaved before an answer, an error answer.
    #[tokio::test]
    async fn client_against_a_scripted_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .await
                .unwrap();
            let neg: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(neg["execute"], "qmp_capabilities");
            w.write_all(b"{\"return\": {}}\r\n").await.unwrap();
            while let Some(l) = lines.next_line().await.unwrap() {
                let m: Value = serde_json::from_str(&l).unwrap();
                let id = m["id"].clone();
                let reply = if m["execute"] == "query-status" {
                    json!({"return": {"status": "running"}, "id": id})
                } else {
                    json!({"error": {"class": "CommandNotFound", "desc": "no such command"}, "id": id})
                };
                w.write_all(format!("{}\r\n", json!({"event": "TICK", "data": {}})).as_bytes())
                    .await
                    .unwrap();
                w.write_all(format!("{reply}\r\n").as_bytes())
                    .await
                    .unwrap();
            }
        });
        let qmp = Qmp::connect(&path).await.unwrap();
        let mut events = qmp.subscribe();
        let status = qmp.execute("query-status", Value::Null).await.unwrap();
        assert_eq!(status["status"], "running");
        assert_eq!(events.recv().await.unwrap()["event"], "TICK");
        match qmp.execute("nope", json!({})).await {
            Err(DriverError::Qmp { class, .. }) => assert_eq!(class, "CommandNotFound"),
            other => panic!("{other:?}"),
        }
        drop(qmp);
        server.abort();
    }
}
