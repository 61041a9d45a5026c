//! The rack's web pages, embedded in the binary: the offline map viewer
//! (served at the proxy's root) and the operator console (`/console/`).
//!
//! The pages are our own plain HTML, CSS and ES modules in `assets/`; the
//! map library (Leaflet) comes from the npm registry into `node_modules/`
//! (`./scripts/setup` runs `npm ci`). `build.rs` embeds both, each file raw
//! and pre-compressed with gzip, with a strong ETag of its content, so a
//! rack with no internet serves everything itself and never compresses on
//! the request path.
//!
//! This crate knows no HTTP library: [`get`] finds an asset, [`negotiate`]
//! decides (from the request's `If-None-Match` and `Accept-Encoding`)
//! whether the answer is a 304, the gzip body or the raw one, and
//! [`Asset::cache_control`] says how long a browser may keep it.
//!
//! Layout:
//! - `assets/map.html`, `map.js`, `map.css`: the map viewer.
//! - `assets/console.html`, `console.js`, `console.css`: the console.
//! - `assets/common.css`: colours and type shared by both.

/// One embedded file.
#[derive(Debug)]
pub struct Asset {
    /// The URL path it is served at.
    pub path: &'static str,
    /// Its media type.
    pub content_type: &'static str,
    /// Strong ETag (quoted), from a hash of `body`: changes exactly when
    /// the content does, so a browser revalidates cheaply with a 304.
    pub etag: &'static str,
    /// The raw bytes.
    pub body: &'static [u8],
    /// The same, gzip-compressed at build time.
    pub gzip: &'static [u8],
}

/// Every embedded file.
pub static ASSETS: &[Asset] = include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// The asset served at `path` (a URL path without query), if any.
#[must_use]
pub fn get(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

/// What to answer for an asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `304 Not Modified`: the client's copy is current.
    NotModified,
    /// `200` with the gzip body and `Content-Encoding: gzip`.
    Gzip,
    /// `200` with the raw body.
    Identity,
}

impl Asset {
    /// `Cache-Control` for this asset. Pages are revalidated on every load
    /// (`no-cache`: a 304 costs one round trip on the site network), so an
    /// upgraded rack serves its new page at once; the files they load keep
    /// for an hour, the ETag making the next check a 304.
    #[must_use]
    pub fn cache_control(&self) -> &'static str {
        if self.content_type.starts_with("text/html") {
            "no-cache"
        } else {
            "public, max-age=3600"
        }
    }

    /// The answer to a request carrying `if_none_match` and
    /// `accept_encoding` (header values as sent).
    #[must_use]
    pub fn negotiate(&self, if_none_match: Option<&str>, accept_encoding: Option<&str>) -> Answer {
        if if_none_match.is_some_and(|v| etag_matches(v, self.etag)) {
            return Answer::NotModified;
        }
        if accept_encoding.is_some_and(accepts_gzip) && self.gzip.len() < self.body.len() {
            Answer::Gzip
        } else {
            Answer::Identity
        }
    }
}

/// RFC 9110 §13.1.2: `*` or a list of entity tags, compared weakly (a
/// `W/` prefix on the client's tag still matches).
fn etag_matches(header: &str, etag: &str) -> bool {
    header
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
}

/// `Accept-Encoding` lists gzip with a non-zero quality.
fn accepts_gzip(header: &str) -> bool {
    header.split(',').any(|item| {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or("");
        let q_zero = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        });
        (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !q_zero
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn every_asset_is_served_with_a_valid_gzip_copy_and_distinct_path() {
        for a in ASSETS {
            let mut out = Vec::new();
            flate_check(a.gzip, &mut out);
            assert_eq!(out, a.body, "{}: gzip copy differs", a.path);
            assert_eq!(ASSETS.iter().filter(|b| b.path == a.path).count(), 1);
            assert!(a.etag.starts_with('"') && a.etag.len() == 34, "{}", a.etag);
        }
        assert!(get("/").is_some() && get("/console/").is_some());
        assert!(get("/map/leaflet.js").is_some());
        assert!(get("/nope").is_none());
    }

    fn flate_check(gz: &[u8], out: &mut Vec<u8>) {
        out.clear();
        flate2::read::GzDecoder::new(gz).read_to_end(out).unwrap();
    }

    #[test]
    fn pages_reference_no_other_host() {
        for a in ASSETS
            .iter()
            .filter(|a| !a.content_type.starts_with("image/"))
        {
            let text = without_block_comments(std::str::from_utf8(a.body).unwrap());
            let text = text.as_str();
            for bad in [
                "http://",
                "https://",
                "//cdn",
                "fonts.googleapis",
                "tile.openstreetmap",
            ] {
                for (i, _) in text.match_indices(bad) {
                    let context = &text[i.saturating_sub(40)..(i + 60).min(text.len())];
                    // Leaflet names its home page and the SVG namespace in
                    // strings it never fetches.
                    let harmless = context.contains("leafletjs.com")
                        || context.contains("www.w3.org/2000/svg")
                        || context.contains("www.w3.org/1999/xlink");
                    assert!(harmless, "{} references another host: …{context}…", a.path);
                }
            }
        }
    }

    /// The text with `/* ... */` comments removed (a comment loads nothing).
    fn without_block_comments(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(i) = rest.find("/*") {
            out.push_str(&rest[..i]);
            rest = rest[i..].find("*/").map_or("", |j| &rest[i + j + 2..]);
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn negotiation_table() {
        let a = get("/map/leaflet.js").unwrap();
        let cases: &[(Option<&str>, Option<&str>, Answer)] = &[
            (None, None, Answer::Identity),
            (None, Some("gzip, deflate, br"), Answer::Gzip),
            (None, Some("br;q=1, gzip;q=0"), Answer::Identity),
            (None, Some("*"), Answer::Gzip),
            (Some(a.etag), Some("gzip"), Answer::NotModified),
            (Some("\"other\", W/\"x\""), Some("gzip"), Answer::Gzip),
            (Some("*"), None, Answer::NotModified),
        ];
        for (inm, ae, want) in cases {
            assert_eq!(a.negotiate(*inm, *ae), *want, "{inm:?} {ae:?}");
        }
        let weak = format!("W/{}", a.etag);
        assert_eq!(a.negotiate(Some(&weak), None), Answer::NotModified);
        assert_eq!(a.cache_control(), "public, max-age=3600");
        assert_eq!(get("/").unwrap().cache_control(), "no-cache");
    }
}
