//! HTTP caching semantics, sans-IO: RFC 9111 (freshness, storability,
//! validation, `Vary`, serving stale when disconnected), RFC 5861
//! (`stale-while-revalidate`, `stale-if-error`) and RFC 9211 (`Cache-Status`).
//!
//! Nothing here does I/O or reads a clock: every function that depends on
//! time takes `now` in Unix seconds (HTTP dates have one-second resolution).
//! The proxy in [`crate::engine`] asks these functions what to do and does it.
//!
//! We are a *shared* cache, so `s-maxage`, `private` and `Authorization`
//! rules for shared caches apply.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};

/// Heuristic freshness is this fraction (1/N) of the time since
/// `Last-Modified` (RFC 9111 §4.2.2 suggests 10 %).
pub const HEURISTIC_DIVISOR: u64 = 10;
/// Cap on heuristic freshness: a day. A tile last changed a year ago would
/// otherwise be fresh for five weeks with no chance to pick up a fix.
pub const HEURISTIC_MAX_SECS: u64 = 86_400;
/// RFC 9111 §1.2.2: delta-seconds too large to represent count as 2^31.
pub const DELTA_SECONDS_MAX: u64 = 1 << 31;

/// Parsed `Cache-Control` directives, request or response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directives {
    /// `max-age`; an unparsable value counts as 0 (stale), per RFC 9111 §4.2.1.
    pub max_age: Option<u64>,
    /// `s-maxage` (shared caches only; implies `proxy-revalidate`).
    pub s_maxage: Option<u64>,
    /// `no-cache` (qualified forms treated as unqualified: stricter, simpler).
    pub no_cache: bool,
    /// `no-store`.
    pub no_store: bool,
    /// `private` (qualified forms treated as unqualified).
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `must-revalidate`.
    pub must_revalidate: bool,
    /// `proxy-revalidate`.
    pub proxy_revalidate: bool,
    /// `immutable` (RFC 8246): no revalidation on client reloads.
    pub immutable: bool,
    /// RFC 5861 `stale-while-revalidate`.
    pub stale_while_revalidate: Option<u64>,
    /// RFC 5861 `stale-if-error`.
    pub stale_if_error: Option<u64>,
    /// Request `max-stale`; `Some(u64::MAX)` when given without a value.
    pub max_stale: Option<u64>,
    /// Request `min-fresh`.
    pub min_fresh: Option<u64>,
    /// Request `only-if-cached`.
    pub only_if_cached: bool,
}

fn parse_delta(v: Option<&str>) -> Option<u64> {
    let v = v?.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        v.parse::<u64>()
            .unwrap_or(DELTA_SECONDS_MAX)
            .min(DELTA_SECONDS_MAX),
    )
}

/// Splits a comma-separated header list, honouring quoted strings.
fn split_list(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.retain(|p| !p.is_empty());
    out
}

impl Directives {
    /// Parses every `Cache-Control` field line in `headers`. Unknown
    /// directives are ignored; when a directive repeats, the smaller value
    /// wins (the more conservative reading).
    pub fn parse(headers: &HeaderMap) -> Directives {
        let mut d = Directives::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(s) = value.to_str() else { continue };
            for item in split_list(s) {
                let (name, arg) = match item.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (item, None),
                };
                let name = name.to_ascii_lowercase();
                let min = |old: Option<u64>, new: u64| Some(old.map_or(new, |o| o.min(new)));
                match name.as_str() {
                    "max-age" => d.max_age = min(d.max_age, parse_delta(arg).unwrap_or(0)),
                    "s-maxage" => d.s_maxage = min(d.s_maxage, parse_delta(arg).unwrap_or(0)),
                    "no-cache" => d.no_cache = true,
                    "no-store" => d.no_store = true,
                    "private" => d.private = true,
                    "public" => d.public = true,
                    "must-revalidate" => d.must_revalidate = true,
                    "proxy-revalidate" => d.proxy_revalidate = true,
                    "immutable" => d.immutable = true,
                    "only-if-cached" => d.only_if_cached = true,
                    "stale-while-revalidate" => {
                        if let Some(v) = parse_delta(arg) {
                            d.stale_while_revalidate = min(d.stale_while_revalidate, v);
                        }
                    }
                    "stale-if-error" => {
                        if let Some(v) = parse_delta(arg) {
                            d.stale_if_error = min(d.stale_if_error, v);
                        }
                    }
                    "max-stale" => {
                        let v = match arg {
                            None => u64::MAX,
                            Some(a) => parse_delta(Some(a)).unwrap_or(0),
                        };
                        d.max_stale = min(d.max_stale, v);
                    }
                    "min-fresh" => {
                        if let Some(v) = parse_delta(arg) {
                            d.min_fresh = min(d.min_fresh, v);
                        }
                    }
                    _ => {}
                }
            }
        }
        d
    }

    /// Request directives, with HTTP/1.0 `Pragma: no-cache` honoured when
    /// the request has no `Cache-Control` (RFC 9111 §5.4).
    pub fn parse_request(headers: &HeaderMap) -> Directives {
        let mut d = Directives::parse(headers);
        if !headers.contains_key(header::CACHE_CONTROL) {
            d.no_cache |= headers
                .get_all(header::PRAGMA)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| {
                    split_list(v)
                        .iter()
                        .any(|p| p.eq_ignore_ascii_case("no-cache"))
                });
        }
        d
    }
}

/// An HTTP date header as Unix seconds.
pub fn header_date(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    let v = headers.get(name)?.to_str().ok()?;
    parse_date(v)
}

/// Parses an HTTP date (IMF-fixdate, RFC 850 or asctime) to Unix seconds.
pub fn parse_date(v: &str) -> Option<u64> {
    let t = httpdate::parse_http_date(v.trim()).ok()?;
    Some(
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

/// Formats Unix seconds as an IMF-fixdate.
pub fn fmt_date(secs: u64) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// Statuses cacheable by default (heuristically), RFC 9110 §15.1.
pub fn heuristically_cacheable(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Statuses this cache understands well enough to store at all. 206 is
/// left out: we do not combine ranges.
fn understood_status(status: u16) -> bool {
    heuristically_cacheable(status) || matches!(status, 302 | 303 | 307)
}

/// Why a response was not stored; reported in `Cache-Status: ...; detail=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    /// Only GET responses are stored.
    Method,
    /// A status we do not store (206, 5xx, ...).
    Status,
    /// `no-store` on the request or response.
    NoStore,
    /// `private` response.
    Private,
    /// Request carried `Authorization` and the response did not allow sharing.
    Authorization,
    /// `Vary: *`.
    VaryStar,
    /// `Set-Cookie` without `public`/`s-maxage`: never share one client's cookie.
    SetCookie,
    /// Not heuristically cacheable and no explicit freshness.
    NoFreshness,
    /// Partial content / `Content-Range`.
    Partial,
}

impl NotStorable {
    /// Short token for `Cache-Status` `detail`.
    pub fn token(self) -> &'static str {
        match self {
            NotStorable::Method => "method",
            NotStorable::Status => "status",
            NotStorable::NoStore => "no-store",
            NotStorable::Private => "private",
            NotStorable::Authorization => "authorization",
            NotStorable::VaryStar => "vary-star",
            NotStorable::SetCookie => "set-cookie",
            NotStorable::NoFreshness => "no-freshness",
            NotStorable::Partial => "partial",
        }
    }
}

/// RFC 9111 §3 for a shared cache: may this response be stored?
///
/// # Errors
/// The first reason it may not.
pub fn storable(
    method: &Method,
    req: &HeaderMap,
    status: u16,
    resp: &HeaderMap,
) -> Result<(), NotStorable> {
    if method != Method::GET {
        return Err(NotStorable::Method);
    }
    if status == 206 || resp.contains_key(header::CONTENT_RANGE) {
        return Err(NotStorable::Partial);
    }
    if !understood_status(status) {
        return Err(NotStorable::Status);
    }
    let rq = Directives::parse(req);
    let rs = Directives::parse(resp);
    if rq.no_store || rs.no_store {
        return Err(NotStorable::NoStore);
    }
    if rs.private {
        return Err(NotStorable::Private);
    }
    if req.contains_key(header::AUTHORIZATION)
        && !(rs.public || rs.s_maxage.is_some() || rs.must_revalidate)
    {
        return Err(NotStorable::Authorization);
    }
    if vary_fields(resp).is_none() {
        return Err(NotStorable::VaryStar);
    }
    if resp.contains_key(header::SET_COOKIE) && !(rs.public || rs.s_maxage.is_some()) {
        return Err(NotStorable::SetCookie);
    }
    let explicit = rs.public
        || rs.max_age.is_some()
        || rs.s_maxage.is_some()
        || resp.contains_key(header::EXPIRES);
    if !explicit && !heuristically_cacheable(status) {
        return Err(NotStorable::NoFreshness);
    }
    Ok(())
}

/// The field names in `Vary`, lower-cased and sorted; `None` for `Vary: *`.
pub fn vary_fields(resp: &HeaderMap) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for v in resp.get_all(header::VARY) {
        let s = v.to_str().unwrap_or("*");
        for f in split_list(s) {
            if f == "*" {
                return None;
            }
            out.push(f.to_ascii_lowercase());
        }
    }
    out.sort();
    out.dedup();
    Some(out)
}

/// The secondary cache key for `fields` (from [`vary_fields`]): each
/// field's request value, whitespace around commas normalised. Two requests
/// may share a stored response only if these are equal.
pub fn vary_key(fields: &[String], req: &HeaderMap) -> String {
    let mut k = String::new();
    for f in fields {
        k.push_str(f);
        k.push('=');
        let vals: Vec<&str> = req
            .get_all(f.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(split_list)
            .collect();
        k.push_str(&vals.join(","));
        k.push('\n');
    }
    k
}

/// A response as the cache holds it: status, end-to-end headers as received
/// (hop-by-hop removed), and when it was requested and received.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// Status code.
    pub status: u16,
    /// End-to-end headers.
    pub headers: HeaderMap,
    /// Unix seconds when the request that produced it was sent.
    pub request_time: u64,
    /// Unix seconds when its head arrived.
    pub response_time: u64,
}

impl Stored {
    /// Response directives.
    pub fn directives(&self) -> Directives {
        Directives::parse(&self.headers)
    }

    /// RFC 9111 §4.2.1 freshness lifetime for a shared cache, with the
    /// §4.2.2 heuristic (10 % of the time since `Last-Modified`, capped at
    /// [`HEURISTIC_MAX_SECS`]) when nothing explicit is given.
    pub fn freshness_lifetime(&self) -> u64 {
        let d = self.directives();
        if let Some(s) = d.s_maxage {
            return s;
        }
        if let Some(m) = d.max_age {
            return m;
        }
        let date = header_date(&self.headers, &header::DATE).unwrap_or(self.response_time);
        if self.headers.contains_key(header::EXPIRES) {
            // An invalid Expires (e.g. "0") means "already expired".
            return match header_date(&self.headers, &header::EXPIRES) {
                Some(e) => e.saturating_sub(date),
                None => 0,
            };
        }
        if heuristically_cacheable(self.status) || d.public {
            if let Some(lm) = header_date(&self.headers, &header::LAST_MODIFIED) {
                return (date.saturating_sub(lm) / HEURISTIC_DIVISOR).min(HEURISTIC_MAX_SECS);
            }
        }
        0
    }

    /// RFC 9111 §4.2.3 `corrected_initial_age`: the age it had on arrival.
    pub fn initial_age(&self) -> u64 {
        let age_value = self
            .headers
            .get(header::AGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_delta(Some(v)))
            .unwrap_or(0);
        let date = header_date(&self.headers, &header::DATE).unwrap_or(self.response_time);
        let apparent = self.response_time.saturating_sub(date);
        let delay = self.response_time.saturating_sub(self.request_time);
        apparent.max(age_value.saturating_add(delay))
    }

    /// RFC 9111 §4.2.3 `current_age` at `now`.
    pub fn current_age(&self, now: u64) -> u64 {
        self.initial_age()
            .saturating_add(now.saturating_sub(self.response_time))
    }

    /// Remaining freshness at `now`: negative when stale (RFC 9211 `ttl`).
    pub fn ttl(&self, now: u64) -> i64 {
        self.freshness_lifetime() as i64 - self.current_age(now) as i64
    }

    /// How long it has been stale at `now` (0 while fresh).
    pub fn staleness(&self, now: u64) -> u64 {
        (-self.ttl(now)).max(0) as u64
    }

    /// RFC 9111 §4.2.4: may this be served stale at all (when disconnected,
    /// or within `stale-if-error`/`stale-while-revalidate`)? Never when the
    /// origin said `no-cache`, `must-revalidate`, `proxy-revalidate` or
    /// `s-maxage`.
    pub fn stale_allowed(&self) -> bool {
        let d = self.directives();
        !(d.no_cache || d.must_revalidate || d.proxy_revalidate || d.s_maxage.is_some())
    }

    /// The validators for a conditional request (RFC 9111 §4.3.1).
    pub fn conditional_headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = Vec::new();
        if let Some(etag) = self.headers.get(header::ETAG) {
            out.push((header::IF_NONE_MATCH, etag.clone()));
        }
        if let Some(lm) = self.headers.get(header::LAST_MODIFIED) {
            out.push((header::IF_MODIFIED_SINCE, lm.clone()));
        }
        out
    }

    /// Whether it has any validator, i.e. whether revalidation can succeed
    /// with a 304.
    pub fn has_validator(&self) -> bool {
        self.headers.contains_key(header::ETAG) || self.headers.contains_key(header::LAST_MODIFIED)
    }

    /// RFC 9111 §4.3.4: freshen with the headers of a 304 answering our
    /// conditional request sent at `request_time` and received at
    /// `response_time`. Returns `None` when the 304 names a different
    /// strong validator than ours (it validated some other response; fetch
    /// afresh).
    pub fn freshen(
        &self,
        not_modified: &HeaderMap,
        request_time: u64,
        response_time: u64,
    ) -> Option<Stored> {
        if let (Some(new), Some(old)) = (
            not_modified.get(header::ETAG),
            self.headers.get(header::ETAG),
        ) {
            if !etag_weak_eq(new.as_bytes(), old.as_bytes()) {
                return None;
            }
        }
        let mut headers = self.headers.clone();
        for name in not_modified.keys() {
            if is_hop_by_hop(name)
                || *name == header::CONTENT_LENGTH
                || *name == header::CONTENT_ENCODING
            {
                continue;
            }
            headers.remove(name);
            for v in not_modified.get_all(name) {
                headers.append(name.clone(), v.clone());
            }
        }
        // A 304 without Age must not keep the old Age.
        if !not_modified.contains_key(header::AGE) {
            headers.remove(header::AGE);
        }
        Some(Stored {
            status: self.status,
            headers,
            request_time,
            response_time,
        })
    }
}

fn strip_weak(tag: &[u8]) -> &[u8] {
    tag.strip_prefix(b"W/").unwrap_or(tag)
}

/// RFC 9110 §8.8.3.2 weak comparison.
pub fn etag_weak_eq(a: &[u8], b: &[u8]) -> bool {
    strip_weak(a.trim_ascii()) == strip_weak(b.trim_ascii())
}

/// What the cache should do with a stored response for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it.
    Fresh,
    /// Serve it now and revalidate in the background (RFC 5861).
    StaleWhileRevalidate,
    /// Validate (conditional request) before serving.
    MustValidate,
}

/// Result of [`evaluate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evaluation {
    /// The decision.
    pub verdict: Verdict,
    /// RFC 9211 `ttl` at `now`.
    pub ttl: i64,
    /// Current age at `now`.
    pub age: u64,
}

/// RFC 9111 §4 and RFC 5861: may `stored` answer a request with headers
/// `req` at `now`, while connected?
pub fn evaluate(req: &HeaderMap, stored: &Stored, now: u64) -> Evaluation {
    let rq = Directives::parse_request(req);
    let rs = stored.directives();
    let lifetime = stored.freshness_lifetime();
    let age = stored.current_age(now);
    let ttl = lifetime as i64 - age as i64;
    let e = |verdict| Evaluation { verdict, ttl, age };
    if rs.no_cache || (rq.no_cache && !rs.immutable) {
        return e(Verdict::MustValidate);
    }
    let mut fresh = ttl > 0;
    if let Some(max_age) = rq.max_age {
        if age > max_age && !(rs.immutable && ttl > 0) {
            fresh = false;
        }
    }
    if let Some(min_fresh) = rq.min_fresh {
        if ttl < min_fresh as i64 {
            fresh = false;
        }
    }
    if fresh {
        return e(Verdict::Fresh);
    }
    let staleness = (-ttl).max(0) as u64;
    if stored.stale_allowed() {
        if let Some(max_stale) = rq.max_stale {
            if staleness <= max_stale && rq.max_age.is_none() && rq.min_fresh.is_none() {
                return e(Verdict::Fresh);
            }
        }
        if let Some(swr) = rs.stale_while_revalidate {
            if staleness <= swr && rq.max_age.is_none() {
                return e(Verdict::StaleWhileRevalidate);
            }
        }
    }
    e(Verdict::MustValidate)
}

/// RFC 5861 §4: may `stored` be served because the origin failed (5xx or
/// unreachable) while revalidating? Any stale response allowed by
/// [`Stored::stale_allowed`] may be served when the origin cannot be
/// reached (RFC 9111 §4.2.4, disconnected); after an error *response*
/// only within `stale-if-error` (request or response directive).
pub fn stale_if_error(req: &HeaderMap, stored: &Stored, now: u64, unreachable: bool) -> bool {
    if !stored.stale_allowed() {
        return false;
    }
    if unreachable {
        return true;
    }
    let window = Directives::parse(req)
        .stale_if_error
        .into_iter()
        .chain(stored.directives().stale_if_error)
        .max();
    window.is_some_and(|w| stored.staleness(now) <= w)
}

/// Whether an error status from the origin allows `stale-if-error`.
pub fn is_error_status(status: u16) -> bool {
    matches!(status, 500 | 502 | 503 | 504)
}

/// Evaluates the client's own conditional headers against a stored
/// response: true when the client should get 304 Not Modified
/// (RFC 9110 §13.2.2: `If-None-Match` takes precedence over
/// `If-Modified-Since`).
pub fn client_not_modified(req: &HeaderMap, stored: &HeaderMap) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH) {
        let Ok(inm) = inm.to_str() else { return false };
        if inm.trim() == "*" {
            return true;
        }
        let Some(etag) = stored.get(header::ETAG) else {
            return false;
        };
        return split_list(inm)
            .iter()
            .any(|t| etag_weak_eq(t.as_bytes(), etag.as_bytes()));
    }
    if let (Some(ims), Some(lm)) = (
        header_date(req, &header::IF_MODIFIED_SINCE),
        header_date(stored, &header::LAST_MODIFIED),
    ) {
        return lm <= ims;
    }
    false
}

/// Whether a request method with a response status invalidates stored
/// responses for its URI (RFC 9111 §4.4).
pub fn invalidates(method: &Method, status: StatusCode) -> bool {
    !method.is_safe() && (status.is_success() || status.is_redirection())
}

/// Hop-by-hop header names never forwarded (RFC 9110 §7.6.1, plus the
/// legacy `Proxy-Connection` and `Keep-Alive`).
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` is in [`HOP_BY_HOP`].
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Removes hop-by-hop fields, including those listed in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_list)
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(*n);
    }
}

/// RFC 9211 `fwd` parameter values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fwd {
    /// Not cacheable by configuration or request (`fwd=bypass`).
    Bypass,
    /// Method not cacheable.
    Method,
    /// Nothing stored under the URI.
    UriMiss,
    /// Stored, but `Vary` did not match.
    VaryMiss,
    /// Generic miss.
    Miss,
    /// The client asked for validation (`no-cache`).
    Request,
    /// Stored and stale: forwarded to validate.
    Stale,
}

impl Fwd {
    fn token(self) -> &'static str {
        match self {
            Fwd::Bypass => "bypass",
            Fwd::Method => "method",
            Fwd::UriMiss => "uri-miss",
            Fwd::VaryMiss => "vary-miss",
            Fwd::Miss => "miss",
            Fwd::Request => "request",
            Fwd::Stale => "stale",
        }
    }
}

/// One `Cache-Status` list member (RFC 9211), built up then rendered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStatus {
    /// Served from cache without forwarding.
    pub hit: bool,
    /// Why the request was forwarded, if it was.
    pub fwd: Option<Fwd>,
    /// Status the next hop answered with.
    pub fwd_status: Option<u16>,
    /// Remaining freshness of the response served.
    pub ttl: Option<i64>,
    /// Whether the forwarded response was stored.
    pub stored: bool,
    /// Whether this request was collapsed into another's upstream fetch.
    pub collapsed: bool,
    /// Free-form detail token (`offline`, `stale-if-error`, `peer`, ...).
    pub detail: Option<&'static str>,
}

impl CacheStatus {
    /// Renders the field value with `cache` as the cache's identifier.
    pub fn render(&self, cache: &str) -> String {
        let mut s = String::from(cache);
        if self.hit {
            s.push_str("; hit");
        } else if let Some(f) = self.fwd {
            s.push_str("; fwd=");
            s.push_str(f.token());
        }
        if let Some(st) = self.fwd_status {
            s.push_str(&format!("; fwd-status={st}"));
        }
        if let Some(t) = self.ttl {
            s.push_str(&format!("; ttl={t}"));
        }
        if self.stored {
            s.push_str("; stored");
        }
        if self.collapsed {
            s.push_str("; collapsed");
        }
        if let Some(d) = self.detail {
            s.push_str("; detail=");
            s.push_str(d);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: u64 = 1_700_000_000;

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn stored(pairs: &[(&str, &str)]) -> Stored {
        let mut p: Vec<(&str, String)> = pairs.iter().map(|(k, v)| (*k, v.to_string())).collect();
        if !pairs.iter().any(|(k, _)| k.eq_ignore_ascii_case("date")) {
            p.push(("date", fmt_date(T0)));
        }
        let mut h = HeaderMap::new();
        for (k, v) in &p {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        Stored {
            status: 200,
            headers: h,
            request_time: T0,
            response_time: T0,
        }
    }

    #[test]
    fn directive_parsing() {
        let d = Directives::parse(&hm(&[
            ("cache-control", "public, max-age=60, s-maxage=\"30\""),
            (
                "cache-control",
                "Stale-While-Revalidate=10, stale-if-error=86400, max-age=90",
            ),
        ]));
        assert_eq!(d.max_age, Some(60));
        assert_eq!(d.s_maxage, Some(30));
        assert!(d.public);
        assert_eq!(d.stale_while_revalidate, Some(10));
        assert_eq!(d.stale_if_error, Some(86400));
        let d = Directives::parse(&hm(&[(
            "cache-control",
            "max-age=abc, private=\"set-cookie, x\"",
        )]));
        assert_eq!(d.max_age, Some(0), "invalid max-age is stale");
        assert!(d.private);
        let d = Directives::parse(&hm(&[("cache-control", "max-age=99999999999999999999")]));
        assert_eq!(d.max_age, Some(DELTA_SECONDS_MAX));
        let d = Directives::parse_request(&hm(&[("pragma", "no-cache")]));
        assert!(d.no_cache);
        let d = Directives::parse_request(&hm(&[
            ("pragma", "no-cache"),
            ("cache-control", "max-age=5"),
        ]));
        assert!(!d.no_cache, "Pragma ignored when Cache-Control present");
        let d = Directives::parse(&hm(&[("cache-control", "max-stale")]));
        assert_eq!(d.max_stale, Some(u64::MAX));
    }

    #[test]
    fn freshness_sources_in_order() {
        assert_eq!(
            stored(&[("cache-control", "max-age=60, s-maxage=5")]).freshness_lifetime(),
            5
        );
        assert_eq!(
            stored(&[("cache-control", "max-age=60")]).freshness_lifetime(),
            60
        );
        let exp = fmt_date(T0 + 300);
        assert_eq!(
            stored(&[("expires", exp.as_str()), ("cache-control", "max-age=60")])
                .freshness_lifetime(),
            60,
            "max-age beats Expires"
        );
        assert_eq!(
            stored(&[("expires", exp.as_str())]).freshness_lifetime(),
            300
        );
        assert_eq!(stored(&[("expires", "0")]).freshness_lifetime(), 0);
        let lm = fmt_date(T0 - 1000);
        assert_eq!(
            stored(&[("last-modified", lm.as_str())]).freshness_lifetime(),
            100
        );
        let lm = fmt_date(T0 - 100 * 86_400);
        assert_eq!(
            stored(&[("last-modified", lm.as_str())]).freshness_lifetime(),
            HEURISTIC_MAX_SECS
        );
        assert_eq!(stored(&[]).freshness_lifetime(), 0);
    }

    #[test]
    fn age_calculation() {
        // Origin says Age 10; the response took 2 s to arrive.
        let mut s = stored(&[("cache-control", "max-age=100"), ("age", "10")]);
        s.request_time = T0 - 2;
        s.response_time = T0;
        assert_eq!(s.initial_age(), 12);
        assert_eq!(s.current_age(T0 + 50), 62);
        assert_eq!(s.ttl(T0 + 50), 38);
        // Date in the past: apparent age dominates.
        let d = fmt_date(T0 - 30);
        let s = stored(&[("date", d.as_str()), ("cache-control", "max-age=100")]);
        assert_eq!(s.initial_age(), 30);
        // Date in the future (clock skew): apparent age clamps to 0.
        let d = fmt_date(T0 + 30);
        let s = stored(&[("date", d.as_str())]);
        assert_eq!(s.initial_age(), 0);
    }

    #[test]
    fn storability() {
        let get = Method::GET;
        let none = HeaderMap::new();
        let ok = hm(&[("cache-control", "max-age=60")]);
        assert_eq!(storable(&get, &none, 200, &ok), Ok(()));
        assert_eq!(
            storable(&Method::POST, &none, 200, &ok),
            Err(NotStorable::Method)
        );
        assert_eq!(
            storable(
                &get,
                &none,
                200,
                &hm(&[("cache-control", "no-store, max-age=60")])
            ),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            storable(&get, &hm(&[("cache-control", "no-store")]), 200, &ok),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            storable(
                &get,
                &none,
                200,
                &hm(&[("cache-control", "private, max-age=60")])
            ),
            Err(NotStorable::Private)
        );
        let auth = hm(&[("authorization", "Bearer x")]);
        assert_eq!(
            storable(&get, &auth, 200, &ok),
            Err(NotStorable::Authorization)
        );
        assert_eq!(
            storable(
                &get,
                &auth,
                200,
                &hm(&[("cache-control", "public, max-age=60")])
            ),
            Ok(())
        );
        assert_eq!(
            storable(&get, &auth, 200, &hm(&[("cache-control", "s-maxage=60")])),
            Ok(())
        );
        assert_eq!(
            storable(&get, &none, 200, &hm(&[("vary", "Accept-Encoding, *")])),
            Err(NotStorable::VaryStar)
        );
        assert_eq!(storable(&get, &none, 206, &ok), Err(NotStorable::Partial));
        assert_eq!(storable(&get, &none, 500, &ok), Err(NotStorable::Status));
        assert_eq!(
            storable(&get, &none, 302, &none),
            Err(NotStorable::NoFreshness)
        );
        assert_eq!(storable(&get, &none, 302, &ok), Ok(()));
        assert_eq!(
            storable(&get, &none, 404, &none),
            Ok(()),
            "heuristically cacheable"
        );
        assert_eq!(
            storable(
                &get,
                &none,
                200,
                &hm(&[("set-cookie", "a=b"), ("cache-control", "max-age=6")])
            ),
            Err(NotStorable::SetCookie)
        );
    }

    #[test]
    fn evaluation() {
        let s = stored(&[("cache-control", "max-age=60")]);
        let none = HeaderMap::new();
        assert_eq!(evaluate(&none, &s, T0 + 10).verdict, Verdict::Fresh);
        assert_eq!(evaluate(&none, &s, T0 + 10).ttl, 50);
        assert_eq!(evaluate(&none, &s, T0 + 61).verdict, Verdict::MustValidate);
        let nc = hm(&[("cache-control", "no-cache")]);
        assert_eq!(evaluate(&nc, &s, T0 + 10).verdict, Verdict::MustValidate);
        let ma = hm(&[("cache-control", "max-age=5")]);
        assert_eq!(evaluate(&ma, &s, T0 + 10).verdict, Verdict::MustValidate);
        let mf = hm(&[("cache-control", "min-fresh=55")]);
        assert_eq!(evaluate(&mf, &s, T0 + 10).verdict, Verdict::MustValidate);
        let ms = hm(&[("cache-control", "max-stale=30")]);
        assert_eq!(evaluate(&ms, &s, T0 + 80).verdict, Verdict::Fresh);
        assert_eq!(evaluate(&ms, &s, T0 + 100).verdict, Verdict::MustValidate);
        let swr = stored(&[("cache-control", "max-age=60, stale-while-revalidate=30")]);
        assert_eq!(
            evaluate(&none, &swr, T0 + 80).verdict,
            Verdict::StaleWhileRevalidate
        );
        assert_eq!(
            evaluate(&none, &swr, T0 + 91).verdict,
            Verdict::MustValidate
        );
        let mr = stored(&[(
            "cache-control",
            "max-age=60, must-revalidate, stale-while-revalidate=30",
        )]);
        assert_eq!(evaluate(&none, &mr, T0 + 80).verdict, Verdict::MustValidate);
        assert_eq!(evaluate(&ms, &mr, T0 + 80).verdict, Verdict::MustValidate);
        let rnc = stored(&[("cache-control", "no-cache, max-age=600")]);
        assert_eq!(evaluate(&none, &rnc, T0).verdict, Verdict::MustValidate);
    }

    #[test]
    fn stale_rules() {
        let none = HeaderMap::new();
        let s = stored(&[("cache-control", "max-age=60, stale-if-error=100")]);
        assert!(stale_if_error(&none, &s, T0 + 150, false));
        assert!(!stale_if_error(&none, &s, T0 + 170, false));
        assert!(
            stale_if_error(&none, &s, T0 + 100_000, true),
            "disconnected"
        );
        let plain = stored(&[("cache-control", "max-age=60")]);
        assert!(!stale_if_error(&none, &plain, T0 + 61, false));
        assert!(stale_if_error(
            &hm(&[("cache-control", "stale-if-error=10")]),
            &plain,
            T0 + 65,
            false
        ));
        for cc in [
            "max-age=60, must-revalidate",
            "s-maxage=60",
            "max-age=1, proxy-revalidate",
            "no-cache",
        ] {
            let s = stored(&[("cache-control", cc)]);
            assert!(!s.stale_allowed(), "{cc}");
            assert!(!stale_if_error(&none, &s, T0 + 100, true), "{cc}");
        }
    }

    #[test]
    fn validation_and_freshening() {
        let lm = fmt_date(T0 - 500);
        let s = stored(&[
            ("cache-control", "max-age=60"),
            ("etag", "\"v1\""),
            ("last-modified", lm.as_str()),
            ("content-type", "image/png"),
            ("x-old", "1"),
        ]);
        let c = s.conditional_headers();
        assert_eq!(
            c[0],
            (header::IF_NONE_MATCH, HeaderValue::from_static("\"v1\""))
        );
        assert_eq!(c[1].0, header::IF_MODIFIED_SINCE);
        let d = fmt_date(T0 + 1000);
        let nm = hm(&[
            ("cache-control", "max-age=120"),
            ("etag", "W/\"v1\""),
            ("date", d.as_str()),
        ]);
        let f = s.freshen(&nm, T0 + 999, T0 + 1000).unwrap();
        assert_eq!(f.freshness_lifetime(), 120);
        assert_eq!(f.headers.get("content-type").unwrap(), "image/png");
        assert_eq!(f.headers.get("x-old").unwrap(), "1");
        assert_eq!(
            evaluate(&HeaderMap::new(), &f, T0 + 1050).verdict,
            Verdict::Fresh
        );
        assert!(s.freshen(&hm(&[("etag", "\"v2\"")]), T0, T0).is_none());
    }

    #[test]
    fn client_conditionals() {
        let lm = fmt_date(T0 - 500);
        let st = hm(&[("etag", "\"abc\""), ("last-modified", lm.as_str())]);
        assert!(client_not_modified(
            &hm(&[("if-none-match", "\"x\", W/\"abc\"")]),
            &st
        ));
        assert!(!client_not_modified(
            &hm(&[("if-none-match", "\"x\"")]),
            &st
        ));
        assert!(client_not_modified(&hm(&[("if-none-match", "*")]), &st));
        let later = fmt_date(T0);
        assert!(client_not_modified(
            &hm(&[("if-modified-since", later.as_str())]),
            &st
        ));
        let earlier = fmt_date(T0 - 501);
        assert!(!client_not_modified(
            &hm(&[("if-modified-since", earlier.as_str())]),
            &st
        ));
        // If-None-Match wins over If-Modified-Since.
        assert!(!client_not_modified(
            &hm(&[
                ("if-none-match", "\"x\""),
                ("if-modified-since", later.as_str())
            ]),
            &st
        ));
    }

    #[test]
    fn vary_keys() {
        let r = hm(&[
            ("vary", "Accept-Encoding"),
            ("vary", "accept-language, Accept-Encoding"),
        ]);
        let f = vary_fields(&r).unwrap();
        assert_eq!(f, vec!["accept-encoding", "accept-language"]);
        let a = vary_key(
            &f,
            &hm(&[("accept-encoding", "gzip,  br"), ("accept-language", "fr")]),
        );
        let b = vary_key(
            &f,
            &hm(&[("accept-encoding", "gzip, br"), ("accept-language", "fr")]),
        );
        let c = vary_key(
            &f,
            &hm(&[("accept-encoding", "gzip"), ("accept-language", "fr")]),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn hop_by_hop() {
        let mut h = hm(&[
            ("connection", "close, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "5"),
            ("transfer-encoding", "chunked"),
            ("content-type", "text/plain"),
            ("proxy-authorization", "Basic x"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }

    #[test]
    fn cache_status_rendering() {
        let s = CacheStatus {
            hit: true,
            ttl: Some(-30),
            detail: Some("offline"),
            ..Default::default()
        };
        assert_eq!(s.render("rack1"), "rack1; hit; ttl=-30; detail=offline");
        let s = CacheStatus {
            fwd: Some(Fwd::UriMiss),
            fwd_status: Some(200),
            stored: true,
            collapsed: true,
            ..Default::default()
        };
        assert_eq!(
            s.render("r"),
            "r; fwd=uri-miss; fwd-status=200; stored; collapsed"
        );
    }

    proptest! {
        /// Age never decreases with time and ttl falls one for one.
        #[test]
        fn age_monotonic(age in 0u64..10_000, delay in 0u64..100, skew in -500i64..500, max_age in 0u64..100_000, dt in 0u64..1_000_000) {
            let date = fmt_date((T0 as i64 + skew) as u64);
            let a = age.to_string();
            let cc = format!("max-age={max_age}");
            let mut s = stored(&[("date", date.as_str()), ("age", a.as_str()), ("cache-control", cc.as_str())]);
            s.request_time = T0 - delay;
            let now = T0 + dt;
            prop_assert!(s.current_age(now) >= age + delay);
            prop_assert!(s.current_age(now + 1) == s.current_age(now) + 1);
            prop_assert_eq!(s.ttl(now) - s.ttl(now + 7), 7);
        }

        /// A response that is fresh for a plain request is never rejected
        /// by the disconnected (stale) path, and no-store is never storable.
        #[test]
        fn consistency(max_age in 0u64..1000, dt in 0u64..2000, ns in any::<bool>(), priv_ in any::<bool>(), mr in any::<bool>()) {
            let mut cc = format!("max-age={max_age}");
            if ns { cc.push_str(", no-store"); }
            if priv_ { cc.push_str(", private"); }
            if mr { cc.push_str(", must-revalidate"); }
            let s = stored(&[("cache-control", cc.as_str())]);
            let st = storable(&Method::GET, &HeaderMap::new(), 200, &s.headers);
            prop_assert_eq!(st.is_ok(), !ns && !priv_);
            let ev = evaluate(&HeaderMap::new(), &s, T0 + dt);
            prop_assert_eq!(ev.verdict == Verdict::Fresh, dt < max_age);
            prop_assert_eq!(stale_if_error(&HeaderMap::new(), &s, T0 + dt, true), !mr);
        }

        /// The Cache-Control parser never panics and round-trips max-age.
        #[test]
        fn parser_total(s in "[ -~]{0,80}", n in 0u64..1_000_000) {
            if let Ok(v) = HeaderValue::from_str(&s) {
                let mut h = HeaderMap::new();
                h.insert(header::CACHE_CONTROL, v);
                let _ = Directives::parse(&h);
                let _ = vary_fields(&h);
            }
            let cc = format!("{s}, max-age={n}");
            if let Ok(v) = HeaderValue::from_str(&cc) {
                let mut h = HeaderMap::new();
                h.insert(header::CACHE_CONTROL, v);
                let d = Directives::parse(&h);
                if !s.contains('"') && !s.to_ascii_lowercase().contains("max-age") {
                    prop_assert_eq!(d.max_age, Some(n));
                }
            }
        }
    }
}
