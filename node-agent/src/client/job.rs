//! Reading a long job's NDJSON answer, sans I/O: chunks of the body in as
//! they arrive (a line may span chunks), events out, then the result.
//!
//! The lines: `{"estimate": {"tiles"}}` (tile seeding), any number of
//! `{"progress": {"done", "total"}}`, then one `{"result": ...}` or
//! `{"error": "..."}`. An answer that is not a 2xx is an error document,
//! read whole.

use hyper::StatusCode;
use serde::Deserialize;

use super::answers::JobEvent;
use super::error::ClientError;

/// Longest line (or error document) accepted: the agent's lines are a few
/// hundred bytes; an endless line from something that is not our agent
/// must not grow the buffer without end.
pub const MAX_LINE: usize = 1 << 20;

/// One NDJSON line: exactly one of the fields is set.
#[derive(Deserialize)]
struct JobLine {
    progress: Option<JobProgress>,
    estimate: Option<JobEstimate>,
    error: Option<String>,
    result: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct JobProgress {
    done: u64,
    total: u64,
}

#[derive(Deserialize)]
struct JobEstimate {
    tiles: u64,
}

/// The state of one job answer being read.
#[derive(Debug)]
pub struct JobReader {
    status: StatusCode,
    buf: Vec<u8>,
    result: Option<serde_json::Value>,
}

impl JobReader {
    /// For an answer of `status`.
    #[must_use]
    pub fn new(status: StatusCode) -> Self {
        Self {
            status,
            buf: Vec::new(),
            result: None,
        }
    }

    /// The next chunk of the body: every complete line in it is handled
    /// (`on_event` per estimate or progress line).
    ///
    /// # Errors
    /// The job's error line (as [`ClientError::Answer`] with the stream's
    /// status), a line that is not JSON, or one over [`MAX_LINE`].
    pub fn feed(
        &mut self,
        data: &[u8],
        on_event: &mut impl FnMut(JobEvent),
    ) -> Result<(), ClientError> {
        self.buf.extend_from_slice(data);
        if self.status.is_success() {
            while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                self.line(&line, on_event)?;
            }
        }
        if self.buf.len() > MAX_LINE {
            return Err(ClientError::LineTooLong { limit: MAX_LINE });
        }
        Ok(())
    }

    fn line(
        &mut self,
        line: &[u8],
        on_event: &mut impl FnMut(JobEvent),
    ) -> Result<(), ClientError> {
        let line: JobLine =
            serde_json::from_slice(line).map_err(|source| ClientError::MalformedLine { source })?;
        if let Some(p) = line.progress {
            on_event(JobEvent::Progress {
                done: p.done,
                total: p.total,
            });
        } else if let Some(e) = line.estimate {
            on_event(JobEvent::Estimate { tiles: e.tiles });
        } else if let Some(message) = line.error {
            return Err(ClientError::Answer {
                status: self.status,
                message,
                field: None,
            });
        } else if let Some(r) = line.result {
            self.result = Some(r);
        }
        Ok(())
    }

    /// The body ended: the job's result.
    ///
    /// # Errors
    /// The agent's refusal (a non-2xx answer), or no result line.
    pub fn finish(self) -> Result<serde_json::Value, ClientError> {
        if !self.status.is_success() {
            return Err(ClientError::answer(self.status, &self.buf));
        }
        self.result.ok_or(ClientError::NoResult)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` in chunks of `chunk` bytes; the events and the outcome.
    fn read(
        status: StatusCode,
        body: &str,
        chunk: usize,
    ) -> (Vec<JobEvent>, Result<serde_json::Value, ClientError>) {
        let mut events = Vec::new();
        let mut reader = JobReader::new(status);
        for part in body.as_bytes().chunks(chunk) {
            if let Err(e) = reader.feed(part, &mut |e| events.push(e)) {
                return (events, Err(e));
            }
        }
        (events, reader.finish())
    }

    const SEED: &str = "{\"estimate\":{\"tiles\":21}}\n\
                        {\"progress\":{\"done\":10,\"total\":21}}\n\
                        {\"progress\":{\"done\":21,\"total\":21}}\n\
                        {\"result\":{\"total\":21,\"fetched\":20,\"skipped\":1,\"failed\":0}}\n";

    #[test]
    fn events_then_the_result_however_the_body_is_cut() {
        for chunk in [1, 3, 7, 64, SEED.len()] {
            let (events, result) = read(StatusCode::OK, SEED, chunk);
            assert_eq!(
                events,
                vec![
                    JobEvent::Estimate { tiles: 21 },
                    JobEvent::Progress {
                        done: 10,
                        total: 21
                    },
                    JobEvent::Progress {
                        done: 21,
                        total: 21
                    },
                ],
                "chunks of {chunk}"
            );
            assert_eq!(result.unwrap()["fetched"], 20, "chunks of {chunk}");
        }
    }

    #[test]
    fn an_error_line_is_the_jobs_failure_with_the_streams_status() {
        let body = "{\"progress\":{\"done\":1,\"total\":4}}\n{\"error\":\"import of db failed: short read\"}\n";
        let (events, result) = read(StatusCode::OK, body, 5);
        assert_eq!(events, vec![JobEvent::Progress { done: 1, total: 4 }]);
        let e = result.unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::OK));
        assert_eq!(
            e.to_string(),
            "agent answered 200 OK: import of db failed: short read"
        );
    }

    #[test]
    fn a_refusal_is_read_whole_with_its_field() {
        let body = r#"{"error": "invalid `from`: not an absolute path", "field": "from"}"#;
        let (events, result) = read(StatusCode::BAD_REQUEST, body, 4);
        assert!(events.is_empty());
        let ClientError::Answer {
            status,
            message,
            field,
        } = result.unwrap_err()
        else {
            panic!("an answer");
        };
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(message, "invalid `from`: not an absolute path");
        assert_eq!(field.as_deref(), Some("from"));
    }

    #[test]
    fn a_stream_without_result_or_with_garbage_fails() {
        let (_, result) = read(
            StatusCode::OK,
            "{\"progress\":{\"done\":1,\"total\":1}}\n",
            8,
        );
        assert!(matches!(result, Err(ClientError::NoResult)), "{result:?}");
        let (_, result) = read(StatusCode::OK, "not json\n", 8);
        assert!(
            matches!(result, Err(ClientError::MalformedLine { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn an_endless_line_is_refused_at_the_bound() {
        let mut reader = JobReader::new(StatusCode::OK);
        let chunk = vec![b'x'; 64 * 1024];
        let mut fed = 0;
        let err = loop {
            match reader.feed(&chunk, &mut |_| {}) {
                Ok(()) => fed += chunk.len(),
                Err(e) => break e,
            }
            assert!(fed <= MAX_LINE, "still buffering after {fed} bytes");
        };
        assert!(matches!(err, ClientError::LineTooLong { .. }), "{err:?}");
    }
}
