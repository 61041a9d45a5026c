//! Power telemetry as plain data: what the status API shows and the mesh gossips.
//!
//! Parsing of NUT variable lists and of the generator JSON format lives here
//! (pure functions); the I/O that fetches them lives in `node-agent`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where the rack's power comes from right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerSource {
    /// Mains / a healthy external supply.
    #[default]
    Grid,
    /// A running generator.
    Generator,
    /// On battery (UPS on battery, generator stopped).
    Battery,
}

/// The rack's power state. Field names are part of the status JSON contract.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PowerStatus {
    /// grid / generator / battery.
    pub source: PowerSource,
    /// Seconds of battery left, if known.
    pub battery_runtime_s: Option<u64>,
    /// Battery charge in percent, if known.
    pub battery_charge_pct: Option<f64>,
    /// Generator fuel in percent, if known.
    pub fuel_pct: Option<f64>,
    /// True when the rack is about to lose power: battery runtime below the
    /// configured threshold, or the source says so.
    pub dying: bool,
    /// Why the last reading failed, if it did (the previous values are kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

// ---------------------------------------------------------------------------
// NUT network protocol (upsd, TCP port 3493)
// ---------------------------------------------------------------------------

/// Longest protocol line accepted from upsd, without its line ending. Real
/// lines are well under 200 bytes (`VAR ups name "value"`, values at most a
/// few dozen characters); anything longer is a broken or hostile server, and
/// the bound keeps a reader's buffer small.
pub const MAX_NUT_LINE: usize = 4096;

/// Most variables accepted in one `LIST VAR` answer. A large real UPS exports
/// about 150; `dummy-ups` about 20. With [`MAX_NUT_LINE`] this bounds the
/// memory one answer can take.
pub const MAX_NUT_VARS: usize = 1024;

/// The variables of one UPS, `name → value`, as upsd lists them.
pub type NutVars = BTreeMap<String, String>;

/// Why a protocol line could not be split into words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NutWordsError {
    /// A `"` was opened and never closed.
    #[error("unterminated quoted string")]
    UnterminatedQuote,
    /// The line ends right after a `\`.
    #[error("line ends in a lone backslash")]
    DanglingEscape,
    /// Longer than [`MAX_NUT_LINE`].
    #[error("line is {len} bytes, more than {MAX_NUT_LINE}")]
    TooLong {
        /// The line's length in bytes.
        len: usize,
    },
}

/// The separators NUT's `parseconf` splits words on (C `isspace`).
fn is_nut_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// Split one protocol line (without its line ending) into words the way NUT's
/// `parseconf` does: words are separated by whitespace; `"..."` groups a word
/// that may contain spaces (and may be empty); `\` takes the next character
/// literally, inside or outside quotes (so `\"` and `\\` are a quote and a
/// backslash).
///
/// # Errors
/// [`NutWordsError`] for an unclosed quote, a trailing `\`, or a line longer
/// than [`MAX_NUT_LINE`].
pub fn split_nut_words(line: &str) -> Result<Vec<String>, NutWordsError> {
    if line.len() > MAX_NUT_LINE {
        return Err(NutWordsError::TooLong { len: line.len() });
    }
    let mut words = Vec::new();
    let mut word = String::new();
    // True once the current word has begun: `""` is an empty word, not nothing.
    let mut in_word = false;
    let mut in_quote = false;
    let mut escaped = false;
    for c in line.chars() {
        if escaped {
            word.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
            in_word = true;
        } else if c == '"' {
            in_quote = !in_quote;
            in_word = true;
        } else if is_nut_space(c) && !in_quote {
            if in_word {
                words.push(std::mem::take(&mut word));
                in_word = false;
            }
        } else {
            word.push(c);
            in_word = true;
        }
    }
    if escaped {
        return Err(NutWordsError::DanglingEscape);
    }
    if in_quote {
        return Err(NutWordsError::UnterminatedQuote);
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// A word that cannot travel in a line-based protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a NUT protocol word must not contain a line break or NUL")]
pub struct UnsendableWord;

/// Quote one word for a command sent to upsd, so that [`split_nut_words`]
/// (and upsd's own parser) reads it back unchanged: plain words are sent as
/// they are; empty words and words with whitespace, control characters, `"`,
/// `\` or `#` are put in quotes with `"` and `\` escaped.
///
/// # Errors
/// [`UnsendableWord`] if the word holds `\n`, `\r` or NUL.
pub fn quote_nut_word(word: &str) -> Result<String, UnsendableWord> {
    if word.contains(['\n', '\r', '\0']) {
        return Err(UnsendableWord);
    }
    let plain = !word.is_empty()
        && !word
            .chars()
            .any(|c| c.is_control() || is_nut_space(c) || matches!(c, '"' | '\\' | '#'));
    if plain {
        return Ok(word.to_owned());
    }
    let mut out = String::with_capacity(word.len() + 2);
    out.push('"');
    for c in word.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(out)
}

/// An `ERR <code> [<detail>]` answer from upsd.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upsd answered ERR {code}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
pub struct NutServerError {
    /// The error code.
    pub code: NutErrorCode,
    /// Extra words after the code, if upsd sent any.
    pub detail: Option<String>,
}

/// The error codes of the NUT network protocol (`docs/net-protocol.txt`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NutErrorCode {
    /// `ACCESS-DENIED`: bad credentials or not allowed from this host.
    AccessDenied,
    /// `UNKNOWN-UPS`: no UPS of that name on this upsd.
    UnknownUps,
    /// `VAR-NOT-SUPPORTED`.
    VarNotSupported,
    /// `CMD-NOT-SUPPORTED`.
    CmdNotSupported,
    /// `INVALID-ARGUMENT`.
    InvalidArgument,
    /// `INSTCMD-FAILED`.
    InstcmdFailed,
    /// `SET-FAILED`.
    SetFailed,
    /// `READONLY`.
    Readonly,
    /// `TOO-LONG`.
    TooLong,
    /// `FEATURE-NOT-SUPPORTED`.
    FeatureNotSupported,
    /// `FEATURE-NOT-CONFIGURED`.
    FeatureNotConfigured,
    /// `ALREADY-SSL-MODE`.
    AlreadySslMode,
    /// `DRIVER-NOT-CONNECTED`: upsd runs but the UPS driver does not.
    DriverNotConnected,
    /// `DATA-STALE`: the driver stopped updating (cable, UPS or driver gone).
    DataStale,
    /// `ALREADY-LOGGED-IN`.
    AlreadyLoggedIn,
    /// `INVALID-PASSWORD`.
    InvalidPassword,
    /// `ALREADY-SET-PASSWORD`.
    AlreadySetPassword,
    /// `INVALID-USERNAME`.
    InvalidUsername,
    /// `ALREADY-SET-USERNAME`.
    AlreadySetUsername,
    /// `USERNAME-REQUIRED`.
    UsernameRequired,
    /// `PASSWORD-REQUIRED`.
    PasswordRequired,
    /// `UNKNOWN-COMMAND`.
    UnknownCommand,
    /// `INVALID-VALUE`.
    InvalidValue,
    /// A code this client does not know (a newer upsd). Kept verbatim so the
    /// operator sees what the server said; this is wire data, not a
    /// catch-all for our own failures.
    Unrecognized(String),
}

impl NutErrorCode {
    /// Read a code as upsd spells it.
    pub fn from_wire(code: &str) -> Self {
        match code {
            "ACCESS-DENIED" => Self::AccessDenied,
            "UNKNOWN-UPS" => Self::UnknownUps,
            "VAR-NOT-SUPPORTED" => Self::VarNotSupported,
            "CMD-NOT-SUPPORTED" => Self::CmdNotSupported,
            "INVALID-ARGUMENT" => Self::InvalidArgument,
            "INSTCMD-FAILED" => Self::InstcmdFailed,
            "SET-FAILED" => Self::SetFailed,
            "READONLY" => Self::Readonly,
            "TOO-LONG" => Self::TooLong,
            "FEATURE-NOT-SUPPORTED" => Self::FeatureNotSupported,
            "FEATURE-NOT-CONFIGURED" => Self::FeatureNotConfigured,
            "ALREADY-SSL-MODE" => Self::AlreadySslMode,
            "DRIVER-NOT-CONNECTED" => Self::DriverNotConnected,
            "DATA-STALE" => Self::DataStale,
            "ALREADY-LOGGED-IN" => Self::AlreadyLoggedIn,
            "INVALID-PASSWORD" => Self::InvalidPassword,
            "ALREADY-SET-PASSWORD" => Self::AlreadySetPassword,
            "INVALID-USERNAME" => Self::InvalidUsername,
            "ALREADY-SET-USERNAME" => Self::AlreadySetUsername,
            "USERNAME-REQUIRED" => Self::UsernameRequired,
            "PASSWORD-REQUIRED" => Self::PasswordRequired,
            "UNKNOWN-COMMAND" => Self::UnknownCommand,
            "INVALID-VALUE" => Self::InvalidValue,
            other => Self::Unrecognized(other.to_owned()),
        }
    }

    /// The code as upsd spells it.
    pub fn as_wire(&self) -> &str {
        match self {
            Self::AccessDenied => "ACCESS-DENIED",
            Self::UnknownUps => "UNKNOWN-UPS",
            Self::VarNotSupported => "VAR-NOT-SUPPORTED",
            Self::CmdNotSupported => "CMD-NOT-SUPPORTED",
            Self::InvalidArgument => "INVALID-ARGUMENT",
            Self::InstcmdFailed => "INSTCMD-FAILED",
            Self::SetFailed => "SET-FAILED",
            Self::Readonly => "READONLY",
            Self::TooLong => "TOO-LONG",
            Self::FeatureNotSupported => "FEATURE-NOT-SUPPORTED",
            Self::FeatureNotConfigured => "FEATURE-NOT-CONFIGURED",
            Self::AlreadySslMode => "ALREADY-SSL-MODE",
            Self::DriverNotConnected => "DRIVER-NOT-CONNECTED",
            Self::DataStale => "DATA-STALE",
            Self::AlreadyLoggedIn => "ALREADY-LOGGED-IN",
            Self::InvalidPassword => "INVALID-PASSWORD",
            Self::AlreadySetPassword => "ALREADY-SET-PASSWORD",
            Self::InvalidUsername => "INVALID-USERNAME",
            Self::AlreadySetUsername => "ALREADY-SET-USERNAME",
            Self::UsernameRequired => "USERNAME-REQUIRED",
            Self::PasswordRequired => "PASSWORD-REQUIRED",
            Self::UnknownCommand => "UNKNOWN-COMMAND",
            Self::InvalidValue => "INVALID-VALUE",
            Self::Unrecognized(s) => s,
        }
    }
}

impl std::fmt::Display for NutErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_wire())
    }
}

/// If `words` is an `ERR` line, the typed error it carries.
fn server_error(words: &[String]) -> Option<NutServerError> {
    match words {
        [first, rest @ ..] if first == "ERR" => {
            let code = NutErrorCode::from_wire(rest.first().map(String::as_str).unwrap_or(""));
            let detail = (rest.len() > 1).then(|| rest[1..].join(" "));
            Some(NutServerError { code, detail })
        }
        _ => None,
    }
}

/// Longest excerpt of an offending line kept in an error message.
const MAX_QUOTED_LINE: usize = 120;

fn excerpt(line: &str) -> String {
    match line.char_indices().nth(MAX_QUOTED_LINE) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line.to_owned(),
    }
}

/// Why an answer from upsd was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NutResponseError {
    /// A line could not be split into words.
    #[error("bad NUT protocol line: {0}")]
    Words(#[from] NutWordsError),
    /// upsd answered `ERR ...`.
    #[error(transparent)]
    Server(#[from] NutServerError),
    /// A line that has no place here.
    #[error("unexpected line from upsd (expected {expected}): {line:?}")]
    Unexpected {
        /// What the parser was waiting for.
        expected: &'static str,
        /// The line (shortened).
        line: String,
    },
    /// The answer is about another UPS than the one asked for.
    #[error("upsd answered about UPS {found:?}, asked about {expected:?}")]
    WrongUps {
        /// The UPS asked about.
        expected: String,
        /// The UPS named in the answer.
        found: String,
    },
    /// More than [`MAX_NUT_VARS`] variables.
    #[error("upsd listed more than {MAX_NUT_VARS} variables")]
    TooManyVars,
    /// The answer stopped before `END LIST VAR`.
    #[error("the answer ended before END LIST VAR")]
    Truncated,
}

/// Check the one-line answer to `USERNAME`, `PASSWORD` or `LOGOUT`: `OK ...`.
///
/// # Errors
/// [`NutResponseError::Server`] for `ERR ...`, `Unexpected` for anything else.
pub fn parse_nut_ok(line: &str) -> Result<(), NutResponseError> {
    let words = split_nut_words(line)?;
    if let Some(e) = server_error(&words) {
        return Err(e.into());
    }
    match words.first() {
        Some(w) if w == "OK" => Ok(()),
        _ => Err(NutResponseError::Unexpected {
            expected: "OK",
            line: excerpt(line),
        }),
    }
}

/// Where a [`ListVarParser`] is in the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListState {
    /// Waiting for `BEGIN LIST VAR <ups>`.
    Begin,
    /// Reading `VAR` lines until `END LIST VAR <ups>`.
    Vars,
    /// `END` seen; the answer is complete.
    Done,
}

/// A sans-IO parser for the answer to `LIST VAR <ups>`, fed one line at a
/// time so the caller can stop reading exactly at `END LIST VAR`:
///
/// ```text
/// BEGIN LIST VAR ups
/// VAR ups battery.charge "100"
/// VAR ups ups.status "OL"
/// END LIST VAR ups
/// ```
///
/// An `ERR ...` line at any point becomes [`NutResponseError::Server`].
#[derive(Debug, Clone)]
pub struct ListVarParser {
    /// The UPS asked about; every line must name it.
    ups: String,
    /// Progress through the answer.
    state: ListState,
    /// Variables seen so far (bounded by [`MAX_NUT_VARS`]).
    vars: NutVars,
}

impl ListVarParser {
    /// A parser for the answer about `ups`.
    pub fn new(ups: &str) -> Self {
        Self {
            ups: ups.to_owned(),
            state: ListState::Begin,
            vars: NutVars::new(),
        }
    }

    /// Feed one line (without its line ending). Returns the variables once
    /// the `END` line arrives, `None` while more lines are needed.
    ///
    /// # Errors
    /// [`NutResponseError`]; the parser should be dropped after one.
    pub fn feed(&mut self, line: &str) -> Result<Option<NutVars>, NutResponseError> {
        let words = split_nut_words(line)?;
        if let Some(e) = server_error(&words) {
            return Err(e.into());
        }
        let w: Vec<&str> = words.iter().map(String::as_str).collect();
        match (self.state, w.as_slice()) {
            (ListState::Begin, ["BEGIN", "LIST", "VAR", ups]) => {
                self.check_ups(ups)?;
                self.state = ListState::Vars;
                Ok(None)
            }
            (ListState::Vars, ["VAR", ups, name, value]) => {
                self.check_ups(ups)?;
                if !self.vars.contains_key(*name) && self.vars.len() >= MAX_NUT_VARS {
                    return Err(NutResponseError::TooManyVars);
                }
                self.vars.insert((*name).to_owned(), (*value).to_owned());
                Ok(None)
            }
            (ListState::Vars, ["END", "LIST", "VAR", ups]) => {
                self.check_ups(ups)?;
                self.state = ListState::Done;
                Ok(Some(std::mem::take(&mut self.vars)))
            }
            (state, _) => Err(NutResponseError::Unexpected {
                expected: match state {
                    ListState::Begin => "BEGIN LIST VAR",
                    ListState::Vars => "VAR or END LIST VAR",
                    ListState::Done => "nothing after END LIST VAR",
                },
                line: excerpt(line),
            }),
        }
    }

    fn check_ups(&self, found: &str) -> Result<(), NutResponseError> {
        if found == self.ups {
            Ok(())
        } else {
            Err(NutResponseError::WrongUps {
                expected: self.ups.clone(),
                found: found.to_owned(),
            })
        }
    }
}

/// Parse a whole `LIST VAR <ups>` answer (lines separated by `\n` or
/// `\r\n`). Lines after `END LIST VAR` are not looked at.
///
/// # Errors
/// As [`ListVarParser::feed`], plus [`NutResponseError::Truncated`] if the
/// text ends before `END LIST VAR`.
pub fn parse_list_var(ups: &str, text: &str) -> Result<NutVars, NutResponseError> {
    let mut parser = ListVarParser::new(ups);
    for line in text.lines() {
        if let Some(vars) = parser.feed(line)? {
            return Ok(vars);
        }
    }
    Err(NutResponseError::Truncated)
}

/// A percentage in `0..=100`, or `None` for anything else (garbage from a
/// driver is "unknown", not a reason to drop the whole reading).
fn nut_percent(value: &str) -> Option<f64> {
    let v: f64 = value.trim().parse().ok()?;
    (v.is_finite() && (0.0..=100.0).contains(&v)).then_some(v)
}

/// Whole seconds from a NUT number (`"120"` or `"120.5"`), or `None`.
fn nut_seconds(value: &str) -> Option<u64> {
    let value = value.trim();
    if let Ok(v) = value.parse::<u64>() {
        return Some(v);
    }
    let v: f64 = value.parse().ok()?;
    // `as` saturates at u64::MAX, which is "plenty" and harmless.
    (v.is_finite() && v >= 0.0).then_some(v as u64)
}

/// Why a UPS's variables say nothing usable about its power.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NutStatusError {
    /// No `ups.status` variable at all.
    #[error("the UPS reports no ups.status")]
    Missing,
    /// `ups.status` is `WAIT`: the driver has started but has no data yet
    /// (it says so for a second or more after start-up). Reading this as
    /// "on grid" would hide a rack that is on battery while its agent or
    /// driver restarts.
    #[error("the UPS driver has no data yet (ups.status WAIT)")]
    DriverWaiting,
}

/// Whether `vars` carry a usable `ups.status`.
///
/// # Errors
/// [`NutStatusError`] when they do not; a caller should treat that as a
/// failed reading.
pub fn check_nut_status(vars: &NutVars) -> Result<(), NutStatusError> {
    let status = vars.get("ups.status").ok_or(NutStatusError::Missing)?;
    let mut flags = status.split_ascii_whitespace().peekable();
    if flags.peek().is_none() {
        return Err(NutStatusError::Missing);
    }
    if flags.all(|f| f == "WAIT") {
        return Err(NutStatusError::DriverWaiting);
    }
    Ok(())
}

/// Turn a UPS's NUT variables into a [`PowerStatus`].
///
/// - `ups.status` is a space-separated list of flags: `OB` (on battery)
///   makes the source [`PowerSource::Battery`], anything else
///   [`PowerSource::Grid`]; `LB` is "low battery"; `FSD` is "forced
///   shutdown" (upsmon is about to cut power); other flags (`OL`, `CHRG`,
///   `RB`, `BYPASS`, ...) are ignored.
/// - `battery.charge` → `battery_charge_pct` (ignored unless in 0..=100);
///   `battery.runtime` → `battery_runtime_s` (whole seconds).
/// - `dying` = `FSD`, or on battery and (`LB`, or runtime below
///   `dying_runtime_s`): in every case the rack must hand its work over now.
///
/// If [`check_nut_status`] fails (no `ups.status`, or only `WAIT`), the
/// returned status has `error` set: the caller treats it as a failed
/// reading, not as "on grid".
pub fn status_from_nut(vars: &NutVars, dying_runtime_s: u64) -> PowerStatus {
    let flags: Vec<&str> = vars
        .get("ups.status")
        .map(|s| s.split_ascii_whitespace().collect())
        .unwrap_or_default();
    let on_battery = flags.contains(&"OB");
    let low_battery = flags.contains(&"LB");
    let forced_shutdown = flags.contains(&"FSD");
    let battery_runtime_s = vars.get("battery.runtime").and_then(|v| nut_seconds(v));
    let battery_charge_pct = vars.get("battery.charge").and_then(|v| nut_percent(v));
    let runtime_low = battery_runtime_s.is_some_and(|r| r < dying_runtime_s);
    PowerStatus {
        source: if on_battery {
            PowerSource::Battery
        } else {
            PowerSource::Grid
        },
        battery_runtime_s,
        battery_charge_pct,
        fuel_pct: None,
        dying: forced_shutdown || (on_battery && (low_battery || runtime_low)),
        error: check_nut_status(vars).err().map(|e| e.to_string()),
    }
}

// ---------------------------------------------------------------------------
// Generator / external JSON
// ---------------------------------------------------------------------------

/// Largest power JSON accepted from a file or a command; a real report is
/// under 200 bytes, and the bound keeps a runaway command from eating memory.
pub const MAX_GENERATOR_JSON: usize = 64 * 1024;

/// The power report a generator controller writes to `power.file`, or a
/// `power.command` prints on stdout: one JSON object.
///
/// ```json
/// {"source": "generator", "battery_runtime_s": 1234, "battery_charge_pct": 80.0,
///  "fuel_pct": 42.5, "dying": false}
/// ```
///
/// - `source` (required): `"grid"`, `"generator"` or `"battery"`.
/// - `battery_runtime_s` (optional): whole seconds of battery left, an
///   integer ≥ 0.
/// - `battery_charge_pct`, `fuel_pct` (optional): numbers in 0..=100.
/// - `dying` (optional): the controller's own "power is about to go" verdict.
///
/// Optional fields may be missing or `null` (both mean unknown). Unknown
/// fields are refused, so a misspelt field name is reported instead of being
/// silently read as "unknown". Surrounding whitespace (such as `echo`'s
/// newline) is fine. Writers should replace the file atomically (write a
/// temp file, rename): a half-written file is reported as an error.
///
/// The rack counts as `dying` if `dying` is true, or the source is battery
/// and `battery_runtime_s` is below `power.dying_runtime_s`, or the source is
/// generator and `fuel_pct` is 0. `"dying": false` does not override the
/// last two.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorReport {
    /// Where the power comes from.
    pub source: PowerSource,
    /// Seconds of battery left, if known.
    #[serde(default)]
    pub battery_runtime_s: Option<u64>,
    /// Battery charge in percent, if known.
    #[serde(default)]
    pub battery_charge_pct: Option<f64>,
    /// Generator fuel in percent, if known.
    #[serde(default)]
    pub fuel_pct: Option<f64>,
    /// The controller's own dying verdict, if it has one.
    #[serde(default)]
    pub dying: Option<bool>,
}

/// Why a power JSON report was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GeneratorJsonError {
    /// Nothing but whitespace.
    #[error("the power report is empty")]
    Empty,
    /// More than [`MAX_GENERATOR_JSON`] bytes.
    #[error("the power report is {len} bytes, more than {MAX_GENERATOR_JSON}")]
    TooLarge {
        /// Its size in bytes.
        len: usize,
    },
    /// Not JSON, not an object, a missing `source`, an unknown field or a
    /// value of the wrong type; the message names the field and position.
    #[error("malformed power report: {0}")]
    Malformed(#[source] serde_json::Error),
    /// A percentage outside 0..=100.
    #[error("power report field {field} is {value}, outside 0..=100")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
}

/// Parse a [`GeneratorReport`] and compute the rack's [`PowerStatus`].
///
/// # Errors
/// [`GeneratorJsonError`]; never panics, whatever the bytes.
pub fn parse_generator_json(
    bytes: &[u8],
    dying_runtime_s: u64,
) -> Result<PowerStatus, GeneratorJsonError> {
    if bytes.len() > MAX_GENERATOR_JSON {
        return Err(GeneratorJsonError::TooLarge { len: bytes.len() });
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(GeneratorJsonError::Empty);
    }
    let report: GeneratorReport =
        serde_json::from_slice(bytes).map_err(GeneratorJsonError::Malformed)?;
    status_from_generator(&report, dying_runtime_s)
}

/// Compute the rack's [`PowerStatus`] from a decoded [`GeneratorReport`].
///
/// # Errors
/// [`GeneratorJsonError::OutOfRange`] for a percentage outside 0..=100.
pub fn status_from_generator(
    report: &GeneratorReport,
    dying_runtime_s: u64,
) -> Result<PowerStatus, GeneratorJsonError> {
    for (field, value) in [
        ("battery_charge_pct", report.battery_charge_pct),
        ("fuel_pct", report.fuel_pct),
    ] {
        if let Some(v) = value {
            if !(v.is_finite() && (0.0..=100.0).contains(&v)) {
                return Err(GeneratorJsonError::OutOfRange { field, value: v });
            }
        }
    }
    let runtime_low = report.source == PowerSource::Battery
        && report
            .battery_runtime_s
            .is_some_and(|r| r < dying_runtime_s);
    let out_of_fuel = report.source == PowerSource::Generator && report.fuel_pct == Some(0.0);
    Ok(PowerStatus {
        source: report.source,
        battery_runtime_s: report.battery_runtime_s,
        battery_charge_pct: report.battery_charge_pct,
        fuel_pct: report.fuel_pct,
        dying: report.dying.unwrap_or(false) || runtime_low || out_of_fuel,
        error: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vars(pairs: &[(&str, &str)]) -> NutVars {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn words_plain_quoted_escaped() {
        assert_eq!(
            split_nut_words("VAR ups battery.charge \"100\"").unwrap(),
            ["VAR", "ups", "battery.charge", "100"]
        );
        assert_eq!(
            split_nut_words(r#"VAR u d "Dummy \"big\" UPS""#).unwrap()[3],
            r#"Dummy "big" UPS"#
        );
        assert_eq!(
            split_nut_words(r#"VAR u p "C:\\nut\\x""#).unwrap()[3],
            r"C:\nut\x"
        );
        assert_eq!(split_nut_words(r#"a "" b"#).unwrap(), ["a", "", "b"]);
        assert_eq!(split_nut_words("  a\t b  ").unwrap(), ["a", "b"]);
        assert_eq!(split_nut_words(r"a\ b").unwrap(), ["a b"]);
        assert_eq!(split_nut_words("").unwrap(), Vec::<String>::new());
        assert_eq!(
            split_nut_words("\"a b"),
            Err(NutWordsError::UnterminatedQuote)
        );
        assert_eq!(split_nut_words("a\\"), Err(NutWordsError::DanglingEscape));
        let long = "a".repeat(MAX_NUT_LINE + 1);
        assert_eq!(
            split_nut_words(&long),
            Err(NutWordsError::TooLong {
                len: MAX_NUT_LINE + 1
            })
        );
        assert!(split_nut_words(&long[1..]).is_ok());
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_nut_word("dummy").unwrap(), "dummy");
        assert_eq!(quote_nut_word("").unwrap(), "\"\"");
        assert_eq!(quote_nut_word("p w\"\\#").unwrap(), r#""p w\"\\#""#);
        assert_eq!(quote_nut_word("a\nb"), Err(UnsendableWord));
    }

    #[test]
    fn list_var_block() {
        let text = "BEGIN LIST VAR dummy\r\n\
                    VAR dummy battery.charge \"100\"\r\n\
                    VAR dummy device.model \"Dummy \\\"UPS\\\"\"\r\n\
                    VAR dummy ups.status \"OL CHRG\"\r\n\
                    END LIST VAR dummy\r\n";
        let v = parse_list_var("dummy", text).unwrap();
        assert_eq!(v["battery.charge"], "100");
        assert_eq!(v["device.model"], "Dummy \"UPS\"");
        assert_eq!(v["ups.status"], "OL CHRG");
        assert_eq!(v.len(), 3);

        assert_eq!(
            parse_list_var("dummy", "BEGIN LIST VAR dummy\nEND LIST VAR dummy\n").unwrap(),
            NutVars::new()
        );
    }

    #[test]
    fn list_var_errors() {
        let e = parse_list_var("nope", "ERR UNKNOWN-UPS\n").unwrap_err();
        assert_eq!(
            e,
            NutResponseError::Server(NutServerError {
                code: NutErrorCode::UnknownUps,
                detail: None
            })
        );
        assert_eq!(e.to_string(), "upsd answered ERR UNKNOWN-UPS");
        let e = parse_list_var("u", "BEGIN LIST VAR u\nERR DATA-STALE\n").unwrap_err();
        assert!(matches!(
            e,
            NutResponseError::Server(NutServerError {
                code: NutErrorCode::DataStale,
                ..
            })
        ));
        let e = parse_list_var("u", "ERR FUTURE-THING some detail\n").unwrap_err();
        assert_eq!(
            e,
            NutResponseError::Server(NutServerError {
                code: NutErrorCode::Unrecognized("FUTURE-THING".into()),
                detail: Some("some detail".into()),
            })
        );
        assert_eq!(
            parse_list_var("u", "BEGIN LIST VAR u\nVAR u a \"1\"\n"),
            Err(NutResponseError::Truncated)
        );
        assert!(matches!(
            parse_list_var("u", "BEGIN LIST VAR v\n"),
            Err(NutResponseError::WrongUps { .. })
        ));
        assert!(matches!(
            parse_list_var("u", "VAR u a \"1\"\n"),
            Err(NutResponseError::Unexpected {
                expected: "BEGIN LIST VAR",
                ..
            })
        ));
        assert!(matches!(
            parse_list_var("u", "BEGIN LIST VAR u\nVAR u a\n"),
            Err(NutResponseError::Unexpected { .. })
        ));
        assert!(matches!(
            parse_list_var("u", "BEGIN LIST VAR u\nVAR u a \"1\n"),
            Err(NutResponseError::Words(NutWordsError::UnterminatedQuote))
        ));
        let mut p = ListVarParser::new("u");
        p.feed("BEGIN LIST VAR u").unwrap();
        p.feed("END LIST VAR u").unwrap().unwrap();
        assert!(p.feed("END LIST VAR u").is_err());
    }

    #[test]
    fn list_var_is_bounded() {
        let mut p = ListVarParser::new("u");
        p.feed("BEGIN LIST VAR u").unwrap();
        for i in 0..MAX_NUT_VARS {
            assert_eq!(p.feed(&format!("VAR u v{i} \"1\"")).unwrap(), None);
        }
        // Repeating a known name is fine; a new one is one too many.
        assert_eq!(p.feed("VAR u v0 \"2\"").unwrap(), None);
        assert_eq!(
            p.feed("VAR u extra \"1\""),
            Err(NutResponseError::TooManyVars)
        );
    }

    #[test]
    fn ok_replies() {
        assert_eq!(parse_nut_ok("OK"), Ok(()));
        assert_eq!(parse_nut_ok("OK Goodbye"), Ok(()));
        assert!(matches!(
            parse_nut_ok("ERR ACCESS-DENIED"),
            Err(NutResponseError::Server(NutServerError {
                code: NutErrorCode::AccessDenied,
                ..
            }))
        ));
        assert!(matches!(
            parse_nut_ok("HELLO"),
            Err(NutResponseError::Unexpected { .. })
        ));
        assert!(matches!(
            parse_nut_ok(""),
            Err(NutResponseError::Unexpected { .. })
        ));
    }

    #[test]
    fn nut_online() {
        let s = status_from_nut(
            &vars(&[
                ("ups.status", "OL"),
                ("battery.charge", "100"),
                ("battery.runtime", "3600"),
            ]),
            300,
        );
        assert_eq!(
            s,
            PowerStatus {
                source: PowerSource::Grid,
                battery_runtime_s: Some(3600),
                battery_charge_pct: Some(100.0),
                fuel_pct: None,
                dying: false,
                error: None,
            }
        );
        // Low runtime while on grid (charging) is not dying.
        let s = status_from_nut(
            &vars(&[("ups.status", "OL CHRG"), ("battery.runtime", "10")]),
            300,
        );
        assert_eq!((s.source, s.dying), (PowerSource::Grid, false));
    }

    #[test]
    fn nut_on_battery() {
        let s = status_from_nut(
            &vars(&[("ups.status", "OB DISCHRG"), ("battery.runtime", "120")]),
            300,
        );
        assert_eq!(
            (s.source, s.dying, s.battery_runtime_s),
            (PowerSource::Battery, true, Some(120))
        );
        let s = status_from_nut(
            &vars(&[("ups.status", "OB"), ("battery.runtime", "1200")]),
            300,
        );
        assert_eq!((s.source, s.dying), (PowerSource::Battery, false));
        // Exactly at the threshold is not below it.
        let s = status_from_nut(
            &vars(&[("ups.status", "OB"), ("battery.runtime", "300")]),
            300,
        );
        assert!(!s.dying);
        // LB wins even with a long (or unknown) runtime estimate.
        let s = status_from_nut(
            &vars(&[("ups.status", "OB LB"), ("battery.runtime", "5000")]),
            300,
        );
        assert!(s.dying);
        let s = status_from_nut(&vars(&[("ups.status", "OB LB")]), 300);
        assert!(s.dying);
        // LB without OB (e.g. OL LB while recharging) is not dying.
        let s = status_from_nut(&vars(&[("ups.status", "OL LB")]), 300);
        assert!(!s.dying);
    }

    #[test]
    fn nut_odd_values() {
        let s = status_from_nut(
            &vars(&[
                ("ups.status", "OB"),
                ("battery.charge", "95.5"),
                ("battery.runtime", "99.9"),
            ]),
            300,
        );
        assert_eq!(
            (s.battery_charge_pct, s.battery_runtime_s),
            (Some(95.5), Some(99))
        );
        let s = status_from_nut(
            &vars(&[
                ("ups.status", "OL"),
                ("battery.charge", "n/a"),
                ("battery.runtime", "-5"),
            ]),
            300,
        );
        assert_eq!((s.battery_charge_pct, s.battery_runtime_s), (None, None));
        let s = status_from_nut(&vars(&[("battery.charge", "140")]), 300);
        assert_eq!(s.battery_charge_pct, None);
        assert!(s.error.is_some(), "no ups.status must be flagged");
        assert_eq!(check_nut_status(&vars(&[])), Err(NutStatusError::Missing));
        assert_eq!(
            check_nut_status(&vars(&[("ups.status", " ")])),
            Err(NutStatusError::Missing)
        );
        assert_eq!(
            check_nut_status(&vars(&[("ups.status", "WAIT")])),
            Err(NutStatusError::DriverWaiting)
        );
        let s = status_from_nut(&vars(&[("ups.status", "WAIT")]), 300);
        assert_eq!(
            s.error.as_deref(),
            Some("the UPS driver has no data yet (ups.status WAIT)")
        );
        assert_eq!(
            check_nut_status(&vars(&[("ups.status", "OB WAIT")])),
            Ok(())
        );
    }

    #[test]
    fn generator_json() {
        let s = parse_generator_json(
            br#"{"source": "generator", "battery_runtime_s": 1234, "battery_charge_pct": 80.0, "fuel_pct": 42.5, "dying": false}"#,
            300,
        )
        .unwrap();
        assert_eq!(
            s,
            PowerStatus {
                source: PowerSource::Generator,
                battery_runtime_s: Some(1234),
                battery_charge_pct: Some(80.0),
                fuel_pct: Some(42.5),
                dying: false,
                error: None,
            }
        );
        let s = parse_generator_json(b"{\"source\":\"grid\"}\n", 300).unwrap();
        assert_eq!(s, PowerStatus::default());
        let s = parse_generator_json(br#"{"source":"grid","fuel_pct":null,"dying":null}"#, 300)
            .unwrap();
        assert_eq!(s, PowerStatus::default());
    }

    #[test]
    fn generator_dying_rules() {
        let dying = |json: &str| parse_generator_json(json.as_bytes(), 300).unwrap().dying;
        assert!(dying(r#"{"source":"grid","dying":true}"#));
        assert!(dying(r#"{"source":"battery","battery_runtime_s":299}"#));
        assert!(!dying(r#"{"source":"battery","battery_runtime_s":300}"#));
        assert!(!dying(r#"{"source":"battery"}"#));
        assert!(!dying(r#"{"source":"generator","battery_runtime_s":10}"#));
        assert!(dying(
            r#"{"source":"battery","battery_runtime_s":10,"dying":false}"#
        ));
        assert!(dying(r#"{"source":"generator","fuel_pct":0}"#));
        assert!(dying(r#"{"source":"generator","fuel_pct":0.0}"#));
        assert!(!dying(r#"{"source":"generator","fuel_pct":0.5}"#));
        assert!(!dying(r#"{"source":"grid","fuel_pct":0}"#));
    }

    #[test]
    fn generator_json_errors() {
        let err = |json: &str| parse_generator_json(json.as_bytes(), 300).unwrap_err();
        assert!(matches!(err(""), GeneratorJsonError::Empty));
        assert!(matches!(err(" \n"), GeneratorJsonError::Empty));
        assert!(matches!(err("{"), GeneratorJsonError::Malformed(_)));
        assert!(matches!(err("[]"), GeneratorJsonError::Malformed(_)));
        assert!(matches!(err("{}"), GeneratorJsonError::Malformed(_)));
        assert!(matches!(
            err(r#"{"source":"wind"}"#),
            GeneratorJsonError::Malformed(_)
        ));
        assert!(matches!(
            err(r#"{"source":"grid","battery_runtime_s":-1}"#),
            GeneratorJsonError::Malformed(_)
        ));
        assert!(matches!(
            err(r#"{"source":"grid","battery_runtime_s":1.5}"#),
            GeneratorJsonError::Malformed(_)
        ));
        assert!(matches!(
            err(r#"{"source":"grid"} {"source":"grid"}"#),
            GeneratorJsonError::Malformed(_)
        ));
        let e = err(r#"{"source":"grid","fuel":3}"#);
        assert!(e.to_string().contains("unknown field `fuel`"), "{e}");
        let e = err(r#"{"source":"generator","fuel_pct":101}"#);
        assert!(
            matches!(
                e,
                GeneratorJsonError::OutOfRange {
                    field: "fuel_pct",
                    ..
                }
            ),
            "{e}"
        );
        let e = err(r#"{"source":"battery","battery_charge_pct":-3}"#);
        assert!(matches!(
            e,
            GeneratorJsonError::OutOfRange {
                field: "battery_charge_pct",
                ..
            }
        ));
        let big = format!("{{\"source\":\"grid\"}}{}", " ".repeat(MAX_GENERATOR_JSON));
        assert!(matches!(err(&big), GeneratorJsonError::TooLarge { .. }));
    }

    fn any_source() -> impl Strategy<Value = PowerSource> {
        prop_oneof![
            Just(PowerSource::Grid),
            Just(PowerSource::Generator),
            Just(PowerSource::Battery)
        ]
    }

    /// Percentages with one decimal: serde_json (without `float_roundtrip`)
    /// may be off by one ulp on arbitrary doubles, which is not our concern.
    fn tenths() -> impl Strategy<Value = f64> {
        (0u32..=1000).prop_map(|t| f64::from(t) / 10.0)
    }

    /// Strings that can travel in one protocol line.
    fn sendable() -> impl Strategy<Value = String> {
        "[^\n\r\0]{0,40}"
    }

    proptest! {
        #[test]
        fn split_never_panics(line in "\\PC{0,200}") {
            let _ = split_nut_words(&line);
        }

        #[test]
        fn quote_roundtrips(words in proptest::collection::vec(sendable(), 0..6)) {
            let line = words.iter().map(|w| quote_nut_word(w).unwrap()).collect::<Vec<_>>().join(" ");
            prop_assert_eq!(split_nut_words(&line).unwrap(), words);
        }

        #[test]
        fn list_var_roundtrips(
            ups in "[a-z][a-z0-9_-]{0,15}",
            vars in proptest::collection::btree_map("[a-z][a-z0-9._]{0,30}", sendable(), 0..40),
        ) {
            let mut text = format!("BEGIN LIST VAR {ups}\n");
            for (k, v) in &vars {
                text += &format!("VAR {ups} {k} {}\n", quote_nut_word(v).unwrap());
            }
            text += &format!("END LIST VAR {ups}\n");
            prop_assert_eq!(parse_list_var(&ups, &text).unwrap(), vars);
        }

        #[test]
        fn list_var_never_panics(text in "\\PC{0,300}") {
            let _ = parse_list_var("u", &text);
        }

        #[test]
        fn nut_status_invariants(
            flags in proptest::sample::subsequence(vec!["OL", "OB", "LB", "CHRG", "DISCHRG", "RB", "FSD"], 0..=7),
            runtime in proptest::option::of(0u64..10_000),
            threshold in 0u64..10_000,
        ) {
            let mut v = vars(&[("ups.status", &flags.join(" "))]);
            if let Some(r) = runtime {
                v.insert("battery.runtime".into(), r.to_string());
            }
            let s = status_from_nut(&v, threshold);
            let ob = flags.contains(&"OB");
            prop_assert_eq!(s.source == PowerSource::Battery, ob);
            prop_assert_eq!(
                s.dying,
                flags.contains(&"FSD") || (ob && (flags.contains(&"LB") || runtime.is_some_and(|r| r < threshold)))
            );
            prop_assert_eq!(s.battery_runtime_s, runtime);
            prop_assert_eq!(s.error.is_none(), !flags.is_empty());
        }

        #[test]
        fn generator_json_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_generator_json(&bytes, 300);
        }

        #[test]
        fn generator_json_roundtrips(
            source in any_source(),
            runtime in proptest::option::of(any::<u64>()),
            charge in proptest::option::of(tenths()),
            fuel in proptest::option::of(prop_oneof![Just(0.0f64), tenths()]),
            dying in proptest::option::of(any::<bool>()),
            threshold in any::<u64>(),
        ) {
            let report = GeneratorReport {
                source,
                battery_runtime_s: runtime,
                battery_charge_pct: charge,
                fuel_pct: fuel,
                dying,
            };
            let json = serde_json::to_vec(&report).unwrap();
            let s = parse_generator_json(&json, threshold).unwrap();
            prop_assert_eq!(s.source, source);
            prop_assert_eq!(s.battery_runtime_s, runtime);
            prop_assert_eq!(s.battery_charge_pct, charge);
            prop_assert_eq!(s.fuel_pct, fuel);
            prop_assert!(s.error.is_none());
            let expected = dying == Some(true)
                || (source == PowerSource::Battery && runtime.is_some_and(|r| r < threshold))
                || (source == PowerSource::Generator && fuel == Some(0.0));
            prop_assert_eq!(s.dying, expected);
        }
    }
}
