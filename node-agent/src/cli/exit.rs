//! How a failed command ends: the one place that prints an error with its
//! whole cause chain and picks the process's exit code.

use std::process::ExitCode;

/// Exit code for a bad configuration or usage (sysexits' EX_USAGE): the
/// agent's rack.toml, identity or proxy settings refused.
pub const EX_CONFIG: u8 = 64;
/// Exit code for a refused input file (sysexits' EX_DATAERR): an appliance
/// manifest that does not parse, checked before the agent is asked.
pub const EX_DATAERR: u8 = 65;
/// Exit code for any other failure.
pub const EX_FAILURE: u8 = 1;

/// Why a command failed, which decides how the process exits.
#[derive(Debug)]
pub enum Failure {
    /// The configuration is unusable ([`EX_CONFIG`]).
    BadConfig(anyhow::Error),
    /// An input file is refused ([`EX_DATAERR`]).
    BadInput(anyhow::Error),
    /// Anything else: the agent refused, could not be reached... ([`EX_FAILURE`]).
    Failed(anyhow::Error),
}

/// `?` on any error makes an ordinary failure.
impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Self::Failed(e.into())
    }
}

impl Failure {
    /// The process's exit code.
    #[must_use]
    pub fn code(&self) -> u8 {
        match self {
            Self::BadConfig(_) => EX_CONFIG,
            Self::BadInput(_) => EX_DATAERR,
            Self::Failed(_) => EX_FAILURE,
        }
    }

    /// What is printed (after `fieldrack: `): the whole chain.
    #[must_use]
    pub fn message(&self) -> String {
        match self {
            Self::BadConfig(e) => format!("bad configuration: {}", chain(e)),
            Self::BadInput(e) | Self::Failed(e) => chain(e),
        }
    }
}

/// Every message of an error's cause chain, `outer: inner: os error`.
/// A cause whose text its parent already ends with (errors that print
/// their source themselves, as `cannot read X: {source}`) is not repeated.
#[must_use]
pub fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut parent = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out.push_str(&text);
        } else if !parent.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        parent = text;
    }
    out
}

/// Print a failure (on stderr) and turn the outcome into the exit code.
#[must_use]
pub fn report(outcome: Result<(), Failure>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("fieldrack: {}", f.message());
            ExitCode::from(f.code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read /x/rack.toml: {source}")]
    struct SaysItsSource {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("snapshot of db failed")]
    struct Outer {
        source: std::io::Error,
    }

    fn eio() -> std::io::Error {
        std::io::Error::from_raw_os_error(5)
    }

    #[test]
    fn the_whole_chain_is_printed_outer_first() {
        let e = anyhow::Error::new(Outer { source: eio() }).context("the agent refused");
        let f = Failure::from(e);
        assert_eq!(f.code(), EX_FAILURE);
        assert_eq!(
            f.message(),
            format!("the agent refused: snapshot of db failed: {}", eio())
        );
    }

    #[test]
    fn a_cause_its_parent_already_prints_is_not_repeated() {
        let e = anyhow::Error::new(SaysItsSource { source: eio() });
        assert_eq!(chain(&e), format!("cannot read /x/rack.toml: {}", eio()));
        let e = Err::<(), _>(e).context("using /x/rack.toml").unwrap_err();
        assert_eq!(
            chain(&e),
            format!("using /x/rack.toml: cannot read /x/rack.toml: {}", eio())
        );
    }

    #[test]
    fn an_agent_refusal_prints_its_status_and_the_agents_chain() {
        let e = node_agent::client::ClientError::answer(
            hyper::StatusCode::INSUFFICIENT_STORAGE,
            br#"{"error": "disk full writing /v/db: No space left on device (os error 28)"}"#,
        );
        let f = Failure::from(e);
        assert_eq!(f.code(), EX_FAILURE);
        assert_eq!(
            f.message(),
            "agent answered 507 Insufficient Storage: disk full writing /v/db: \
             No space left on device (os error 28)"
        );
    }

    #[test]
    fn a_connection_failure_names_the_agent_and_the_os_error() {
        let e = node_agent::client::ClientError::Connect {
            addr: "127.0.0.1:7700".into(),
            source: std::io::Error::from_raw_os_error(111),
        };
        let msg = Failure::from(e).message();
        assert_eq!(
            msg,
            format!(
                "connecting to the agent API at 127.0.0.1:7700 (is the agent running?): {}",
                std::io::Error::from_raw_os_error(111)
            )
        );
    }

    #[test]
    fn each_kind_has_its_exit_code_and_prefix() {
        let config = Failure::BadConfig(anyhow::anyhow!("rack.toml: invalid `mesh.listen[0]`: x"));
        assert_eq!(config.code(), 64);
        assert_eq!(
            config.message(),
            "bad configuration: rack.toml: invalid `mesh.listen[0]`: x"
        );
        let input = Failure::BadInput(anyhow::anyhow!("m.toml: appliance x: invalid `tier`"));
        assert_eq!(input.code(), 65);
        assert_eq!(input.message(), "m.toml: appliance x: invalid `tier`");
    }
}
