//! Power telemetry I/O: reads the rack's power state from a NUT server
//! (`upsd`), a JSON file or a command, and publishes it on a
//! [`tokio::sync::watch`] channel.
//!
//! All parsing is pure and lives in [`deploy::power`]; this module only moves
//! bytes, with every read bounded in time and size:
//!
//! - [`NutClient`]: a minimal client for the NUT network protocol
//!   (`USERNAME`, `PASSWORD`, `LIST VAR`, `LOGOUT`) over tokio TCP.
//! - [`read_power_file`], [`run_power_command`]: the generator JSON sources.
//! - [`PowerMonitor`]: the actor that polls the configured source every
//!   `power.poll_interval_ms`, keeps the last good values when a reading
//!   fails (and says why in `error`), and logs transitions.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use deploy::config::{NutConfig, PowerConfig};
use deploy::power::{
    check_nut_status, parse_generator_json, parse_nut_ok, quote_nut_word, status_from_nut,
    GeneratorJsonError, ListVarParser, NutResponseError, NutStatusError, NutVars, PowerSource,
    PowerStatus, UnsendableWord, MAX_GENERATOR_JSON, MAX_NUT_LINE,
};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use util::process::GroupKillGuard;

/// How long to wait for upsd to accept a TCP connection. upsd is normally on
/// the same LAN or host; two seconds is long for a LAN and short enough that
/// a dead server does not hold up the poll loop.
pub const NUT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long to wait for each line from upsd. upsd answers from its cache, so
/// any delay is the network or a wedged server.
pub const NUT_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Deadline for a whole NUT session (connect, log in, list, log out), so a
/// server that drips one line just under [`NUT_READ_TIMEOUT`] cannot stall a
/// poll for minutes.
pub const NUT_SESSION_TIMEOUT: Duration = Duration::from_secs(5);

/// Most bytes accepted from upsd in one session. A large UPS lists about 150
/// variables of under 100 bytes (~15 KiB); this leaves room and still caps
/// memory at a quarter MiB whatever the server sends.
pub const MAX_NUT_RESPONSE: usize = 256 * 1024;

/// How long `power.command` may run before it and its process group are
/// killed. A status script reads a serial port or a local HTTP API; five
/// seconds is generous and still shorter than a sensible poll interval.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// How much of a failing command's stderr is quoted in the error; the rest is
/// read and thrown away so the command never blocks on a full pipe.
pub const MAX_COMMAND_STDERR: usize = 1024;

/// Shortest poll interval honoured: `poll_interval_ms = 0` would otherwise
/// be a busy loop (and `tokio::time::interval` panics on zero).
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long to wait for a killed command to be reaped.
const KILL_REAP_TIMEOUT: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// NUT client
// ---------------------------------------------------------------------------

/// Why talking to upsd failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NutClientError {
    /// The address did not resolve or the connection was refused.
    #[error("cannot connect to upsd at {addr}: {source}")]
    Connect {
        /// `host:port` from the config.
        addr: String,
        /// The I/O error.
        source: io::Error,
    },
    /// No connection within [`NUT_CONNECT_TIMEOUT`].
    #[error("connecting to upsd at {addr} timed out after {NUT_CONNECT_TIMEOUT:?}")]
    ConnectTimeout {
        /// `host:port` from the config.
        addr: String,
    },
    /// upsd sent nothing for [`NUT_READ_TIMEOUT`].
    #[error("upsd did not answer within {NUT_READ_TIMEOUT:?}")]
    ReadTimeout,
    /// The whole exchange took longer than [`NUT_SESSION_TIMEOUT`].
    #[error("the NUT session took longer than {NUT_SESSION_TIMEOUT:?}")]
    SessionTimeout,
    /// Reading or writing the socket failed.
    #[error("I/O error talking to upsd: {0}")]
    Io(#[from] io::Error),
    /// upsd closed the connection before answering.
    #[error("upsd closed the connection")]
    Closed,
    /// A line longer than [`MAX_NUT_LINE`].
    #[error("upsd sent a line longer than {MAX_NUT_LINE} bytes")]
    LineTooLong,
    /// More than [`MAX_NUT_RESPONSE`] bytes in one session.
    #[error("upsd sent more than {MAX_NUT_RESPONSE} bytes")]
    ResponseTooLarge,
    /// upsd answered `ERR ...` or something unparseable.
    #[error(transparent)]
    Response(#[from] NutResponseError),
    /// A configured name or credential cannot be sent (line break or NUL).
    #[error("cannot send the {what} to upsd: {source}")]
    Unsendable {
        /// Which argument: "UPS name", "username", "password".
        what: &'static str,
        /// Why.
        source: UnsendableWord,
    },
}

/// One connection to upsd. Use [`read_nut`] for the usual
/// connect/list/logout sequence.
#[derive(Debug)]
pub struct NutClient {
    /// Buffered read half; lines are read through a length limit.
    reader: BufReader<OwnedReadHalf>,
    /// Write half for commands.
    writer: OwnedWriteHalf,
    /// Bytes upsd may still send on this connection ([`MAX_NUT_RESPONSE`]).
    budget: usize,
}

impl NutClient {
    /// Connect to upsd at `addr` (`host:port`).
    ///
    /// # Errors
    /// [`NutClientError::Connect`] or [`NutClientError::ConnectTimeout`].
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future drops the half-open connection.
    pub async fn connect(addr: &str) -> Result<Self, NutClientError> {
        let stream = timeout(NUT_CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| NutClientError::ConnectTimeout {
                addr: addr.to_owned(),
            })?
            .map_err(|source| NutClientError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        // Small request/response lines: don't let Nagle delay them.
        let _ = stream.set_nodelay(true);
        let (read, writer) = stream.into_split();
        Ok(Self {
            reader: BufReader::new(read),
            writer,
            budget: MAX_NUT_RESPONSE,
        })
    }

    /// Send `USERNAME` and/or `PASSWORD` (each only if given). Only needed
    /// if upsd is configured to require them; `LIST VAR` is public by default.
    ///
    /// # Errors
    /// [`NutClientError`]; `ERR ...` answers arrive as
    /// [`NutClientError::Response`].
    ///
    /// # Cancel safety
    /// Not cancel-safe: drop the client if the future is dropped.
    pub async fn authenticate(
        &mut self,
        username: Option<&str>,
        password: Option<&str>,
    ) -> Result<(), NutClientError> {
        if let Some(user) = username {
            self.send("USERNAME", "username", user).await?;
            parse_nut_ok(&self.read_line().await?)?;
        }
        if let Some(pass) = password {
            self.send("PASSWORD", "password", pass).await?;
            parse_nut_ok(&self.read_line().await?)?;
        }
        Ok(())
    }

    /// `LIST VAR <ups>`: all variables of one UPS.
    ///
    /// # Errors
    /// [`NutClientError`]; e.g. `ERR UNKNOWN-UPS`, `ERR DATA-STALE` and
    /// `ERR DRIVER-NOT-CONNECTED` arrive as [`NutClientError::Response`].
    ///
    /// # Cancel safety
    /// Not cancel-safe: drop the client if the future is dropped.
    pub async fn list_var(&mut self, ups: &str) -> Result<NutVars, NutClientError> {
        self.send("LIST VAR", "UPS name", ups).await?;
        let mut parser = ListVarParser::new(ups);
        loop {
            let line = self.read_line().await?;
            if let Some(vars) = parser.feed(&line)? {
                return Ok(vars);
            }
        }
    }

    /// Say `LOGOUT` and close the connection.
    ///
    /// # Errors
    /// [`NutClientError`] if upsd does not answer `OK`.
    pub async fn logout(mut self) -> Result<(), NutClientError> {
        self.writer.write_all(b"LOGOUT\n").await?;
        parse_nut_ok(&self.read_line().await?)?;
        let _ = self.writer.shutdown().await;
        Ok(())
    }

    /// Send `<command> <arg>`, quoting `arg`.
    async fn send(
        &mut self,
        command: &str,
        what: &'static str,
        arg: &str,
    ) -> Result<(), NutClientError> {
        let arg =
            quote_nut_word(arg).map_err(|source| NutClientError::Unsendable { what, source })?;
        let line = format!("{command} {arg}\n");
        self.writer.write_all(line.as_bytes()).await?;
        Ok(())
    }

    /// Read one line, without its `\n` / `\r\n`, within [`NUT_READ_TIMEOUT`],
    /// at most [`MAX_NUT_LINE`] bytes, charged against the session budget.
    async fn read_line(&mut self) -> Result<String, NutClientError> {
        // Room for the longest line plus "\r\n", and one byte more to detect
        // an overlong line without reading it all.
        let limit = MAX_NUT_LINE + 3;
        let mut buf = Vec::with_capacity(128);
        let n = timeout(
            NUT_READ_TIMEOUT,
            (&mut self.reader)
                .take(limit as u64)
                .read_until(b'\n', &mut buf),
        )
        .await
        .map_err(|_| NutClientError::ReadTimeout)??;
        self.budget = self
            .budget
            .checked_sub(n)
            .ok_or(NutClientError::ResponseTooLarge)?;
        if buf.last() != Some(&b'\n') {
            return Err(if n >= limit {
                NutClientError::LineTooLong
            } else {
                NutClientError::Closed
            });
        }
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        if buf.len() > MAX_NUT_LINE {
            return Err(NutClientError::LineTooLong);
        }
        // upsd speaks ASCII; a stray byte should not lose the whole reading.
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

/// One NUT reading: connect, authenticate if configured, `LIST VAR`,
/// `LOGOUT`; all within [`NUT_SESSION_TIMEOUT`].
///
/// # Errors
/// [`NutClientError`]. A failed `LOGOUT` after a good list is only logged.
///
/// # Cancel safety
/// Cancel-safe: the connection is dropped with the future.
pub async fn read_nut(config: &NutConfig) -> Result<NutVars, NutClientError> {
    timeout(NUT_SESSION_TIMEOUT, async {
        let mut client = NutClient::connect(&config.addr).await?;
        client
            .authenticate(config.username.as_deref(), config.password.as_deref())
            .await?;
        let vars = client.list_var(&config.ups).await?;
        if let Err(e) = client.logout().await {
            tracing::debug!(error = %e, "NUT logout failed (reading kept)");
        }
        Ok(vars)
    })
    .await
    .map_err(|_| NutClientError::SessionTimeout)?
}

// ---------------------------------------------------------------------------
// File and command sources
// ---------------------------------------------------------------------------

/// Why `power.file` could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PowerFileError {
    /// Missing, unreadable, a directory...
    #[error("cannot read power file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Larger than [`MAX_GENERATOR_JSON`].
    #[error("power file {path} is larger than {MAX_GENERATOR_JSON} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
}

/// Read the generator JSON file, at most [`MAX_GENERATOR_JSON`] bytes.
///
/// # Errors
/// [`PowerFileError`].
///
/// # Cancel safety
/// Cancel-safe (nothing is written).
pub async fn read_power_file(path: &Path) -> Result<Vec<u8>, PowerFileError> {
    let read_err = |source| PowerFileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(read_err)?;
    match read_limited(file, MAX_GENERATOR_JSON).await {
        Ok(bytes) => Ok(bytes),
        Err(LimitedReadError::TooLarge) => Err(PowerFileError::TooLarge {
            path: path.to_owned(),
        }),
        Err(LimitedReadError::Io(e)) => Err(read_err(e)),
    }
}

/// Why `power.command` did not produce a report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PowerCommandError {
    /// `power.command` is an empty list.
    #[error("power.command names no program")]
    NoProgram,
    /// The program could not be started.
    #[error("cannot run power command {program:?}: {source}")]
    Spawn {
        /// argv[0].
        program: String,
        /// The I/O error.
        source: io::Error,
    },
    /// Still running after the timeout; its process group was killed.
    #[error("power command {program:?} did not finish within {after:?} and was killed")]
    Timeout {
        /// argv[0].
        program: String,
        /// The timeout.
        after: Duration,
    },
    /// More than [`MAX_GENERATOR_JSON`] bytes on stdout; it was killed.
    #[error(
        "power command {program:?} printed more than {MAX_GENERATOR_JSON} bytes and was killed"
    )]
    TooMuchOutput {
        /// argv[0].
        program: String,
    },
    /// Exited unsuccessfully.
    #[error("power command {program:?} failed ({status}){}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Failed {
        /// argv[0].
        program: String,
        /// Exit code or signal.
        status: ExitStatus,
        /// The start of its stderr ([`MAX_COMMAND_STDERR`] bytes), trimmed.
        stderr: String,
    },
    /// Reading its output or waiting for it failed.
    #[error("I/O error running power command {program:?}: {source}")]
    Io {
        /// argv[0].
        program: String,
        /// The I/O error.
        source: io::Error,
    },
}

/// Run `power.command` and return its stdout: stdin is `/dev/null`, the
/// command runs in its own process group, which is killed after
/// [`COMMAND_TIMEOUT`] or once stdout passes [`MAX_GENERATOR_JSON`] bytes.
///
/// # Errors
/// [`PowerCommandError`]; a non-zero exit is an error even if it printed JSON.
///
/// # Cancel safety
/// Cancel-safe: dropping the future kills the command's process group.
pub async fn run_power_command(argv: &[String]) -> Result<Vec<u8>, PowerCommandError> {
    run_command_bounded(argv, COMMAND_TIMEOUT, MAX_GENERATOR_JSON).await
}

async fn run_command_bounded(
    argv: &[String],
    deadline: Duration,
    max_stdout: usize,
) -> Result<Vec<u8>, PowerCommandError> {
    let (program, args) = argv.split_first().ok_or(PowerCommandError::NoProgram)?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| PowerCommandError::Spawn {
            program: program.clone(),
            source,
        })?;
    let mut group = GroupKillGuard::new(child.id());
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        unreachable!("stdout and stderr are piped");
    };
    let outcome = timeout(deadline, async {
        let (out, err) = tokio::try_join!(
            read_limited(&mut stdout, max_stdout),
            read_prefix_and_drain(&mut stderr, MAX_COMMAND_STDERR),
        )?;
        let status = child.wait().await.map_err(LimitedReadError::Io)?;
        // Reaped: the pid (and group id) may be reused from now on.
        group.disarm();
        Ok::<_, LimitedReadError>((out, err, status))
    })
    .await;
    let io_err = |source| PowerCommandError::Io {
        program: program.clone(),
        source,
    };
    let failure = match outcome {
        Ok(Ok((out, err, status))) => {
            if status.success() {
                return Ok(out);
            }
            return Err(PowerCommandError::Failed {
                program: program.clone(),
                status,
                stderr: String::from_utf8_lossy(&err).trim().to_owned(),
            });
        }
        Ok(Err(LimitedReadError::TooLarge)) => PowerCommandError::TooMuchOutput {
            program: program.clone(),
        },
        Ok(Err(LimitedReadError::Io(e))) => io_err(e),
        Err(_) => PowerCommandError::Timeout {
            program: program.clone(),
            after: deadline,
        },
    };
    // Not reaped yet, so the group id is still ours: kill the whole group
    // (grandchildren too), then reap the child.
    drop(group);
    let _ = child.start_kill();
    let _ = timeout(KILL_REAP_TIMEOUT, child.wait()).await;
    Err(failure)
}

/// Why a bounded read stopped.
#[derive(Debug)]
enum LimitedReadError {
    /// More than the limit.
    TooLarge,
    /// The read failed.
    Io(io::Error),
}

/// Read to EOF, failing as soon as more than `max` bytes arrive.
async fn read_limited<R: AsyncRead + Unpin>(
    reader: R,
    max: usize,
) -> Result<Vec<u8>, LimitedReadError> {
    let mut buf = Vec::new();
    reader
        .take(max as u64 + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(LimitedReadError::Io)?;
    if buf.len() > max {
        return Err(LimitedReadError::TooLarge);
    }
    Ok(buf)
}

/// Keep the first `max` bytes, read and discard the rest until EOF.
async fn read_prefix_and_drain<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Vec<u8>, LimitedReadError> {
    let mut kept = Vec::new();
    (&mut *reader)
        .take(max as u64)
        .read_to_end(&mut kept)
        .await
        .map_err(LimitedReadError::Io)?;
    tokio::io::copy(reader, &mut tokio::io::sink())
        .await
        .map_err(LimitedReadError::Io)?;
    Ok(kept)
}

// ---------------------------------------------------------------------------
// The monitor
// ---------------------------------------------------------------------------

/// Why one power reading failed. The monitor keeps the previous values and
/// puts this error's message in [`PowerStatus::error`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PowerReadError {
    /// Talking to upsd failed.
    #[error("NUT {ups}@{addr}: {source}")]
    Nut {
        /// The UPS name.
        ups: String,
        /// upsd's address.
        addr: String,
        /// What went wrong.
        source: NutClientError,
    },
    /// upsd answered, but without a usable `ups.status`.
    #[error("NUT {ups}@{addr}: {source}")]
    NutStatus {
        /// The UPS name.
        ups: String,
        /// upsd's address.
        addr: String,
        /// What is wrong with it.
        source: NutStatusError,
    },
    /// `power.file` could not be read.
    #[error(transparent)]
    File(#[from] PowerFileError),
    /// `power.command` failed.
    #[error(transparent)]
    Command(#[from] PowerCommandError),
    /// The file or command produced a bad report.
    #[error("{origin}: {source}")]
    Report {
        /// "power file PATH" or "power command PROGRAM".
        origin: String,
        /// Why the report was refused.
        source: GeneratorJsonError,
    },
}

/// Where readings come from, decided once from the config.
#[derive(Debug, Clone)]
enum Source {
    /// Nothing configured: grid, healthy.
    None,
    /// A NUT server.
    Nut(NutConfig),
    /// A generator JSON file.
    File(PathBuf),
    /// A command printing generator JSON.
    Command(Vec<String>),
}

impl Source {
    fn from_config(config: &PowerConfig) -> Self {
        let configured = [
            config.nut.is_some(),
            config.file.is_some(),
            config.command.is_some(),
        ];
        if configured.iter().filter(|c| **c).count() > 1 {
            // Config validation refuses this; if it slips through, say which wins.
            tracing::warn!(
                "several power sources configured; using the first of nut, file, command"
            );
        }
        if let Some(nut) = &config.nut {
            Self::Nut(nut.clone())
        } else if let Some(path) = &config.file {
            Self::File(path.clone())
        } else if let Some(argv) = &config.command {
            Self::Command(argv.clone())
        } else {
            Self::None
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Nut(_) => "nut",
            Self::File(_) => "file",
            Self::Command(_) => "command",
        }
    }

    /// One reading.
    async fn read(&self, dying_runtime_s: u64) -> Result<PowerStatus, PowerReadError> {
        match self {
            Self::None => Ok(PowerStatus::default()),
            Self::Nut(nut) => {
                let vars = read_nut(nut).await.map_err(|source| PowerReadError::Nut {
                    ups: nut.ups.clone(),
                    addr: nut.addr.clone(),
                    source,
                })?;
                check_nut_status(&vars).map_err(|source| PowerReadError::NutStatus {
                    ups: nut.ups.clone(),
                    addr: nut.addr.clone(),
                    source,
                })?;
                Ok(status_from_nut(&vars, dying_runtime_s))
            }
            Self::File(path) => {
                let bytes = read_power_file(path).await?;
                parse_generator_json(&bytes, dying_runtime_s).map_err(|source| {
                    PowerReadError::Report {
                        origin: format!("power file {}", path.display()),
                        source,
                    }
                })
            }
            Self::Command(argv) => {
                let bytes = run_power_command(argv).await?;
                parse_generator_json(&bytes, dying_runtime_s).map_err(|source| {
                    PowerReadError::Report {
                        origin: format!(
                            "power command {:?}",
                            argv.first().map(String::as_str).unwrap_or("")
                        ),
                        source,
                    }
                })
            }
        }
    }
}

/// The message [`PowerStatus::error`] carries until the first reading.
pub const NO_READING_YET: &str = "no power reading yet";

/// Polls the configured power source and publishes a [`PowerStatus`] on a
/// watch channel: receivers always see the latest state, and are woken only
/// when it changes.
///
/// With no source configured it publishes grid/healthy once and idles until
/// cancelled. With a source, the first value is grid with
/// `error = "no power reading yet"` until the first reading (taken at once);
/// a failed reading keeps the previous values and sets `error`; a good
/// reading clears it.
///
/// Either `let (monitor, rx) = PowerMonitor::new(..)` and put
/// `monitor.run()` in the caller's `JoinSet`, or [`PowerMonitor::spawn`].
#[derive(Debug)]
pub struct PowerMonitor {
    /// What to read, how often, and the dying threshold.
    config: PowerConfig,
    /// Stops [`PowerMonitor::run`]; a child of the agent's root token.
    cancel: CancellationToken,
    /// Where each new status is published.
    tx: watch::Sender<PowerStatus>,
}

impl PowerMonitor {
    /// A monitor and the receiver of its status.
    pub fn new(
        config: PowerConfig,
        cancel: CancellationToken,
    ) -> (Self, watch::Receiver<PowerStatus>) {
        let initial = match Source::from_config(&config) {
            Source::None => PowerStatus::default(),
            _ => PowerStatus {
                error: Some(NO_READING_YET.to_owned()),
                ..PowerStatus::default()
            },
        };
        let (tx, rx) = watch::channel(initial);
        (Self { config, cancel, tx }, rx)
    }

    /// Start the monitor on the current tokio runtime; it stops when
    /// `cancel` fires or every receiver is dropped.
    pub fn spawn(config: PowerConfig, cancel: CancellationToken) -> watch::Receiver<PowerStatus> {
        let (monitor, rx) = Self::new(config, cancel);
        tokio::spawn(monitor.run());
        rx
    }

    /// Poll until `cancel` fires (or all receivers are gone). A reading in
    /// flight is abandoned on cancel (a command is killed with it).
    pub async fn run(self) {
        let source = Source::from_config(&self.config);
        let span = tracing::info_span!("power", source = source.kind());
        self.run_inner(source).instrument(span).await;
    }

    async fn run_inner(self, source: Source) {
        if let Source::None = source {
            tracing::debug!("no power source configured: reporting grid, healthy");
            self.tx.send_replace(PowerStatus::default());
            self.cancel.cancelled().await;
            return;
        }
        let period = Duration::from_millis(self.config.poll_interval_ms).max(MIN_POLL_INTERVAL);
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => break,
                _ = ticks.tick() => {}
            }
            if self.tx.is_closed() {
                tracing::debug!("nobody watches power status any more; stopping");
                break;
            }
            let reading = tokio::select! {
                biased;
                () = self.cancel.cancelled() => break,
                r = source.read(self.config.dying_runtime_s) => r,
            };
            self.apply(reading);
        }
        tracing::debug!("power monitor stopped");
    }

    /// Merge one reading into the published status and log what changed.
    fn apply(&self, reading: Result<PowerStatus, PowerReadError>) {
        let prev = self.tx.borrow().clone();
        let next = match reading {
            Ok(status) => status,
            Err(e) => PowerStatus {
                error: Some(e.to_string()),
                ..prev.clone()
            },
        };
        log_transition(&prev, &next);
        self.tx.send_if_modified(|current| {
            if *current == next {
                false
            } else {
                *current = next;
                true
            }
        });
    }
}

/// Log what changed between two published states. Events carry an `event`
/// field (`power.source`, `power.dying`, `power.recovered`, `power.error`)
/// for tests and log pipelines.
fn log_transition(prev: &PowerStatus, next: &PowerStatus) {
    let first = prev.error.as_deref() == Some(NO_READING_YET);
    match (&prev.error, &next.error) {
        (_, Some(e)) if prev.error.as_ref() != Some(e) => {
            tracing::warn!(event = "power.error", error = %e, "power reading failed; keeping the last values");
        }
        (Some(_), None) if !first => {
            tracing::info!(event = "power.recovered", "power readings are back");
        }
        _ => {}
    }
    if next.error.is_some() {
        return;
    }
    if first || prev.source != next.source {
        let source = source_name(next.source);
        if next.source == PowerSource::Grid {
            tracing::info!(event = "power.source", source, "rack power source");
        } else {
            tracing::warn!(
                event = "power.source",
                source,
                battery_runtime_s = next.battery_runtime_s,
                battery_charge_pct = next.battery_charge_pct,
                fuel_pct = next.fuel_pct,
                "rack power source"
            );
        }
    }
    if next.dying && (first || !prev.dying) {
        tracing::warn!(
            event = "power.dying",
            dying = true,
            source = source_name(next.source),
            battery_runtime_s = next.battery_runtime_s,
            fuel_pct = next.fuel_pct,
            "rack power is about to fail"
        );
    } else if !next.dying && prev.dying && !first {
        tracing::info!(
            event = "power.dying",
            dying = false,
            "rack power no longer dying"
        );
    }
}

fn source_name(source: PowerSource) -> &'static str {
    match source {
        PowerSource::Grid => "grid",
        PowerSource::Generator => "generator",
        PowerSource::Battery => "battery",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    /// A one-connection fake upsd: reads lines, answers each with the
    /// scripted text for the first word-prefix that matches, and returns the
    /// lines it received.
    async fn fake_upsd(
        script: Vec<(&'static str, String)>,
    ) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let (r, mut w) = sock.into_split();
            let mut lines = BufReader::new(r).lines();
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                seen.push(line.clone());
                let Some((_, answer)) = script.iter().find(|(p, _)| line.starts_with(p)) else {
                    break;
                };
                // An answer without a final newline is a server dying mid-line.
                let last = line == "LOGOUT" || !answer.ends_with('\n');
                if w.write_all(answer.as_bytes()).await.is_err() || last {
                    break;
                }
            }
            seen
        });
        (addr, task)
    }

    fn list_answer(ups: &str, vars: &[(&str, &str)]) -> String {
        let mut s = format!("BEGIN LIST VAR {ups}\n");
        for (k, v) in vars {
            s += &format!("VAR {ups} {k} \"{v}\"\n");
        }
        s + &format!("END LIST VAR {ups}\n")
    }

    fn nut_config(addr: &str, ups: &str) -> NutConfig {
        NutConfig {
            addr: addr.to_owned(),
            ups: ups.to_owned(),
            username: None,
            password: None,
        }
    }

    #[tokio::test]
    async fn nut_session_with_credentials() {
        // A UPS name with a space, to exercise quoting both ways.
        let (addr, server) = fake_upsd(vec![
            ("USERNAME", "OK\n".into()),
            ("PASSWORD", "OK\n".into()),
            (
                "LIST VAR",
                list_answer(
                    "\"ups 1\"",
                    &[("ups.status", "OL"), ("battery.charge", "97")],
                ),
            ),
            ("LOGOUT", "OK Goodbye\n".into()),
        ])
        .await;
        let mut config = nut_config(&addr, "ups 1");
        config.username = Some("mon".into());
        config.password = Some("pa ss\"word".into());
        let vars = read_nut(&config).await.unwrap();
        assert_eq!(vars["battery.charge"], "97");
        let seen = server.await.unwrap();
        assert_eq!(
            seen,
            [
                "USERNAME mon",
                r#"PASSWORD "pa ss\"word""#,
                r#"LIST VAR "ups 1""#,
                "LOGOUT"
            ]
        );

        // An answer about another UPS is refused.
        let (addr, _server) = fake_upsd(vec![("LIST VAR", list_answer("other", &[]))]).await;
        let err = read_nut(&nut_config(&addr, "ups")).await.unwrap_err();
        assert!(
            matches!(
                err,
                NutClientError::Response(NutResponseError::WrongUps { .. })
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn nut_session_lists_and_logs_out() {
        let (addr, server) = fake_upsd(vec![
            (
                "LIST VAR",
                list_answer("ups", &[("ups.status", "OB LB"), ("battery.runtime", "60")]),
            ),
            ("LOGOUT", "OK Goodbye\n".into()),
        ])
        .await;
        let vars = read_nut(&nut_config(&addr, "ups")).await.unwrap();
        assert_eq!(vars["ups.status"], "OB LB");
        assert_eq!(server.await.unwrap(), ["LIST VAR ups", "LOGOUT"]);
    }

    #[tokio::test]
    async fn nut_server_errors_are_typed() {
        let (addr, _server) = fake_upsd(vec![("LIST VAR", "ERR UNKNOWN-UPS\n".into())]).await;
        let err = read_nut(&nut_config(&addr, "nope")).await.unwrap_err();
        assert!(
            matches!(
                &err,
                NutClientError::Response(NutResponseError::Server(e))
                    if e.code == deploy::power::NutErrorCode::UnknownUps
            ),
            "{err}"
        );
        let (addr, _server) = fake_upsd(vec![("USERNAME", "ERR ACCESS-DENIED\n".into())]).await;
        let mut config = nut_config(&addr, "ups");
        config.username = Some("x".into());
        let err = read_nut(&config).await.unwrap_err();
        assert_eq!(err.to_string(), "upsd answered ERR ACCESS-DENIED");
    }

    #[tokio::test]
    async fn nut_long_lines_and_big_answers_are_refused() {
        let long = format!(
            "BEGIN LIST VAR ups\nVAR ups x \"{}\"\n",
            "a".repeat(MAX_NUT_LINE)
        );
        let (addr, _server) = fake_upsd(vec![("LIST VAR", long)]).await;
        let err = read_nut(&nut_config(&addr, "ups")).await.unwrap_err();
        assert!(matches!(err, NutClientError::LineTooLong), "{err}");

        // Many legal lines, repeating one variable so the var cap is not hit.
        let mut big = String::from("BEGIN LIST VAR ups\n");
        let line = format!("VAR ups x \"{}\"\n", "a".repeat(1000));
        while big.len() <= MAX_NUT_RESPONSE {
            big += &line;
        }
        let (addr, _server) = fake_upsd(vec![("LIST VAR", big)]).await;
        let err = read_nut(&nut_config(&addr, "ups")).await.unwrap_err();
        assert!(matches!(err, NutClientError::ResponseTooLarge), "{err}");
    }

    #[tokio::test]
    async fn nut_closed_refused_and_silent() {
        let (addr, _server) =
            fake_upsd(vec![("LIST VAR", "BEGIN LIST VAR ups\nVAR ups a".into())]).await;
        let err = read_nut(&nut_config(&addr, "ups")).await.unwrap_err();
        assert!(matches!(err, NutClientError::Closed), "{err}");

        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = read_nut(&nut_config(&port.to_string(), "ups"))
            .await
            .unwrap_err();
        assert!(matches!(err, NutClientError::Connect { .. }), "{err}");

        // Accepts, never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let _hold = tokio::spawn(async move {
            let (_sock, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let started = std::time::Instant::now();
        let err = read_nut(&nut_config(&addr, "ups")).await.unwrap_err();
        assert!(matches!(err, NutClientError::ReadTimeout), "{err}");
        assert!(started.elapsed() < NUT_READ_TIMEOUT + Duration::from_secs(2));
    }

    #[tokio::test]
    async fn command_ok_and_failures() {
        let out = run_power_command(&argv(&["/bin/sh", "-c", "echo '{\"source\":\"grid\"}'"]))
            .await
            .unwrap();
        assert_eq!(out, b"{\"source\":\"grid\"}\n");

        let err = run_power_command(&argv(&["/bin/sh", "-c", "echo oops >&2; exit 3"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, PowerCommandError::Failed { stderr, .. } if stderr == "oops"),
            "{err}"
        );

        let err = run_power_command(&argv(&["/nonexistent/power-script"]))
            .await
            .unwrap_err();
        assert!(matches!(err, PowerCommandError::Spawn { .. }), "{err}");

        let err = run_power_command(&[]).await.unwrap_err();
        assert!(matches!(err, PowerCommandError::NoProgram));
    }

    #[tokio::test]
    async fn command_bounds() {
        // A grandchild keeps stdout open: only the group kill ends it.
        let started = std::time::Instant::now();
        let err = run_command_bounded(
            &argv(&["/bin/sh", "-c", "sleep 30 & sleep 30"]),
            Duration::from_millis(300),
            MAX_GENERATOR_JSON,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, PowerCommandError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));

        // Cancelling the reading kills the whole group too.
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let args = argv(&["/bin/sh", "-c", &script]);
        let run = run_power_command(&args);
        assert!(timeout(Duration::from_millis(500), run).await.is_err());
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = || {
            // Killed and reaped by init, or a zombie awaiting reaping.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !gone() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(), "grandchild {pid} survived cancellation");

        let err = run_command_bounded(
            &argv(&["/bin/sh", "-c", "yes"]),
            Duration::from_secs(5),
            1000,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, PowerCommandError::TooMuchOutput { .. }),
            "{err}"
        );

        // Lots of stderr does not block the command.
        let out = run_command_bounded(
            &argv(&["/bin/sh", "-c", "head -c 1000000 /dev/zero >&2; echo ok"]),
            Duration::from_secs(5),
            100,
        )
        .await
        .unwrap();
        assert_eq!(out, b"ok\n");
    }

    #[tokio::test]
    async fn file_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_power_file(&dir.path().join("missing.json"))
            .await
            .unwrap_err();
        assert!(matches!(err, PowerFileError::Read { .. }), "{err}");
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; MAX_GENERATOR_JSON + 1]).unwrap();
        let err = read_power_file(&big).await.unwrap_err();
        assert!(matches!(err, PowerFileError::TooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn no_source_is_grid_and_healthy() {
        let cancel = CancellationToken::new();
        let (monitor, rx) = PowerMonitor::new(PowerConfig::default(), cancel.clone());
        assert_eq!(*rx.borrow(), PowerStatus::default());
        let task = tokio::spawn(monitor.run());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(*rx.borrow(), PowerStatus::default());
        assert!(
            !task.is_finished(),
            "keeps the channel open until cancelled"
        );
        cancel.cancel();
        timeout(Duration::from_secs(1), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn zero_interval_and_failure_keep_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("power.json");
        std::fs::write(&path, br#"{"source":"battery","battery_runtime_s":50}"#).unwrap();
        let config = PowerConfig {
            file: Some(path.clone()),
            poll_interval_ms: 0,
            ..PowerConfig::default()
        };
        let cancel = CancellationToken::new();
        let (monitor, mut rx) = PowerMonitor::new(config, cancel.clone());
        assert_eq!(rx.borrow().error.as_deref(), Some(NO_READING_YET));
        let task = tokio::spawn(monitor.run());
        let s = timeout(Duration::from_secs(5), rx.wait_for(|s| s.error.is_none()))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert_eq!(
            (s.source, s.dying, s.battery_runtime_s),
            (PowerSource::Battery, true, Some(50))
        );
        std::fs::write(&path, b"{not json").unwrap();
        let s = timeout(Duration::from_secs(5), rx.wait_for(|s| s.error.is_some()))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert_eq!(
            (s.source, s.dying, s.battery_runtime_s),
            (PowerSource::Battery, true, Some(50))
        );
        assert!(s.error.unwrap().contains("malformed power report"));
        cancel.cancel();
        timeout(Duration::from_secs(1), task)
            .await
            .unwrap()
            .unwrap();
    }
}
