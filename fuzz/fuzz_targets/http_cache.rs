//! HTTP caching semantics (`cache_proxy::http_cache`): `Cache-Control`,
//! `Pragma`, `Vary`, dates, ages, validators and freshness, as the proxy
//! evaluates them for every request it answers from the cache.
//!
//! Input: request, response and response times and "now" (three `u32`, as
//! the store keeps them), a status (`u16`), then text: request header
//! lines, a `--` line, the stored response's header lines, a `--` line,
//! the header lines of a 304 that revalidates it.
#![no_main]

use cache_proxy::http_cache::{self, Directives, Stored, Verdict};
use fieldrack_fuzz::{headers_from_text, take_u32};
use hyper::{header, Method};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (request_time, data) = take_u32(data);
    let (response_time, data) = take_u32(data);
    let (now, data) = take_u32(data);
    if data.len() < 2 {
        return;
    }
    let status = u16::from_le_bytes([data[0], data[1]]);
    let text = String::from_utf8_lossy(&data[2..]);
    let mut parts = text.splitn(3, "\n--\n");
    let req = headers_from_text(parts.next().unwrap_or(""));
    let resp = headers_from_text(parts.next().unwrap_or(""));
    let not_modified = headers_from_text(parts.next().unwrap_or(""));
    let (request_time, response_time, now) = (
        u64::from(request_time),
        u64::from(response_time),
        u64::from(now),
    );

    let _ = Directives::parse_request(&req);
    let d = Directives::parse(&resp);
    if let Some(m) = d.max_age {
        assert!(m <= http_cache::DELTA_SECONDS_MAX);
    }
    let stored_ok = http_cache::storable(&Method::GET, &req, status, &resp).is_ok();
    let _ = http_cache::storable(&Method::POST, &req, status, &resp);
    match http_cache::vary_fields(&resp) {
        Some(fields) => {
            let _ = http_cache::vary_key(&fields, &req);
        }
        None => assert!(!stored_ok, "Vary: * must not be stored"),
    }
    for (_, v) in resp.iter() {
        if let Ok(s) = v.to_str() {
            let _ = http_cache::parse_date(s);
        }
    }
    let stored = Stored {
        status,
        headers: resp.clone(),
        request_time,
        response_time,
    };
    let _ = stored.freshness_lifetime();
    let age = stored.current_age(now);
    let ttl = stored.ttl(now);
    let _ = stored.staleness(now);
    let _ = stored.conditional_headers();
    let _ = stored.has_validator();
    let e = http_cache::evaluate(&req, &stored, now);
    assert_eq!((e.age, e.ttl), (age, ttl));
    if e.verdict == Verdict::Fresh && ttl <= 0 {
        assert!(
            stored.stale_allowed(),
            "served stale against the origin's word"
        );
    }
    let _ = http_cache::stale_if_error(&req, &stored, now, false);
    let _ = http_cache::stale_if_error(&req, &stored, now, true);
    let _ = http_cache::client_not_modified(&req, &resp);
    if let Some(fresh) = stored.freshen(&not_modified, now, now) {
        let _ = http_cache::evaluate(&req, &fresh, now);
        for name in fresh.headers.keys() {
            assert!(
                *name == header::CONTENT_LENGTH
                    || *name == header::CONTENT_ENCODING
                    || !http_cache::is_hop_by_hop(name)
                    || resp.contains_key(name),
                "freshen copied hop-by-hop {name}"
            );
        }
    }
    let mut forwarded = req.clone();
    http_cache::strip_hop_by_hop(&mut forwarded);
    for name in forwarded.keys() {
        assert!(
            !http_cache::is_hop_by_hop(name),
            "{name} survived stripping"
        );
    }
});
