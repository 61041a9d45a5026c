//! `fieldrack agent`: check the configuration (exit 64 naming the field),
//! set up logging, run until SIGTERM/SIGINT.

use std::path::Path;

use deploy::config::LogFormat;
use deploy::RackConfig;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::exit::Failure;
use super::LogFormatArg;

/// Run a rack's agent from its rack.toml.
///
/// # Errors
/// [`Failure::BadConfig`] for a refused rack.toml, proxy section or
/// identity; the agent's own failure otherwise.
pub async fn run(config: &Path, log: Option<LogFormatArg>) -> Result<(), Failure> {
    let cfg = RackConfig::load(config).map_err(|e| Failure::BadConfig(e.into()))?;
    if let Err(e) = node_agent::proxy::config(&cfg) {
        return Err(Failure::BadConfig(
            anyhow::Error::new(e).context(config.display().to_string()),
        ));
    }
    init_logging(log_format(log, cfg.log.format), cfg.log.level.as_deref());
    node_agent::agent::load_identity(&cfg).map_err(Failure::BadConfig)?;
    let span = tracing::info_span!("rack", rack = %cfg.rack);
    node_agent::agent::run(cfg, config, shutdown_token())
        .instrument(span)
        .await?;
    Ok(())
}

/// `--log-format` wins over rack.toml's `[log] format`.
#[must_use]
pub fn log_format(cli: Option<LogFormatArg>, config: LogFormat) -> LogFormat {
    match cli {
        Some(LogFormatArg::Json) => LogFormat::Json,
        Some(LogFormatArg::Plain) => LogFormat::Plain,
        None => config,
    }
}

/// The default filter. openraft logs every heartbeat the leader sends at
/// `info` and every failed append to a rack that is down at `error`,
/// several lines a second: the mesh already reports racks going down.
pub const DEFAULT_LOG_FILTER: &str = "info,libp2p_swarm=warn,libp2p_quic=warn,mdns_sd=warn,\
     openraft::core::raft_core=warn,openraft::replication=off";

/// Logs on stderr; `RUST_LOG` wins over `level`.
pub fn init_logging(format: LogFormat, level: Option<&str>) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(level.unwrap_or(DEFAULT_LOG_FILTER))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Plain => builder.init(),
    }
}

/// The root cancellation token: cancelled on the first SIGTERM or SIGINT.
///
/// # Panics
/// If the signal handlers cannot be installed (outside a tokio runtime).
#[must_use]
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        t.cancel();
    });
    token
}
