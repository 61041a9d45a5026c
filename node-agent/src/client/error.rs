//! What can go wrong talking to an agent.

use std::path::PathBuf;
use std::time::Duration;

use deploy::config::ConfigError;
use hyper::StatusCode;
use serde::Deserialize;

/// Why a client could not be made from a `rack.toml`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FromConfigError {
    /// The rack.toml itself (its error names the file and field).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The `api-token` file beside it.
    #[error("reading {path}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Why a request to the agent failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No TCP connection (the agent is not running, or elsewhere).
    #[error("connecting to the agent API at {addr} (is the agent running?)")]
    Connect {
        /// The API address from rack.toml.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Connected, but no (whole) answer within [`TIMEOUT`].
    #[error("the agent at {addr} did not answer within {timeout:?}")]
    Timeout {
        /// The API address.
        addr: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The HTTP exchange broke off.
    #[error("HTTP exchange with the agent at {addr} failed")]
    Http {
        /// The API address.
        addr: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// The request could not be built (e.g. a name that cannot be part of
    /// a URI path).
    #[error("cannot build a request for {path}")]
    Request {
        /// The path asked for.
        path: String,
        /// Why.
        source: hyper::http::Error,
    },
    /// The request body could not be encoded.
    #[error("cannot encode the request for {path}")]
    Encode {
        /// The path asked for.
        path: String,
        /// Why.
        source: serde_json::Error,
    },
    /// The agent refused: its status and its whole error chain. For a
    /// streamed operation that failed after it started, the status is the
    /// stream's (200) and the message the operation's error line.
    #[error(
        "agent answered {} {}: {message}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )]
    Answer {
        /// The HTTP status (507 disk full, 503 no majority, 404 unknown,
        /// 409 conflict, 400 bad input...).
        status: StatusCode,
        /// The agent's `error` (its whole cause chain, `outer: inner`), or
        /// the raw body if it sent none.
        message: String,
        /// For a 400, the request field at fault, if the agent named it.
        field: Option<String>,
    },
    /// The answer was not the JSON expected.
    #[error("agent sent malformed JSON for {path}")]
    Malformed {
        /// The path asked for.
        path: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A line of a streamed answer was not JSON.
    #[error("agent sent a malformed progress line")]
    MalformedLine {
        /// The parse error.
        source: serde_json::Error,
    },
    /// A line of a streamed answer (or an error document) longer than
    /// [`super::MAX_JOB_LINE`].
    #[error("agent sent a line longer than {limit} bytes")]
    LineTooLong {
        /// The bound.
        limit: usize,
    },
    /// A streamed answer ended without its result line.
    #[error("the agent closed the stream without a result")]
    NoResult,
}

impl ClientError {
    /// The agent's error answer: its status, and its `error` and `field`
    /// from the body, or the raw body if it is not such a document.
    #[must_use]
    pub fn answer(status: StatusCode, body: &[u8]) -> Self {
        #[derive(Deserialize)]
        struct ErrorBody {
            error: String,
            field: Option<String>,
        }
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(b) => Self::Answer {
                status,
                message: b.error,
                field: b.field,
            },
            Err(_) => Self::Answer {
                status,
                message: String::from_utf8_lossy(body).trim().to_owned(),
                field: None,
            },
        }
    }

    /// The HTTP status, if the agent answered with a refusal.
    #[must_use]
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Answer { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_keeps_status_message_and_field() {
        let e = ClientError::answer(
            StatusCode::BAD_REQUEST,
            br#"{"error": "invalid `size`: 3 is not a multiple of 512", "field": "size"}"#,
        );
        assert_eq!(e.status(), Some(StatusCode::BAD_REQUEST));
        assert_eq!(
            e.to_string(),
            "agent answered 400 Bad Request: invalid `size`: 3 is not a multiple of 512"
        );
        let ClientError::Answer { field, .. } = e else {
            panic!("an answer");
        };
        assert_eq!(field.as_deref(), Some("size"));
    }

    #[test]
    fn a_refusal_without_an_error_document_shows_the_body() {
        let e = ClientError::answer(StatusCode::INSUFFICIENT_STORAGE, b"  disk full\n");
        assert_eq!(
            e.to_string(),
            "agent answered 507 Insufficient Storage: disk full"
        );
    }

    #[test]
    fn a_status_without_a_reason_phrase_prints_bare() {
        let e = ClientError::answer(StatusCode::from_u16(599).unwrap(), b"{\"error\": \"x\"}");
        assert_eq!(e.to_string(), "agent answered 599 : x");
    }
}
