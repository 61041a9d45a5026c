//! Compact on-disk encodings of the index values.
//!
//! A million tiles must fit in 1.10 × their payload, so per-object metadata
//! is squeezed: the headers that repeat across a source's responses
//! (`Content-Type`, `Cache-Control`, `Vary`, ...) go into a shared,
//! reference-counted *header block*; only the volatile ones (`Date`,
//! `Expires`, `Last-Modified`, `Age`, `ETag`) stay per object.
//!
//! [`MetaRecord`] (version 2) is what the SQLite index stores per object:
//! dates as signed varint deltas from the request time (a `Date` costs one
//! or two bytes), hex `ETag`s as raw bytes (half their text). A typical tile
//! costs about 30 bytes of it. [`ObjectRecord`] and [`BlobLoc`] are the
//! version-1 encodings of the former sled index, kept for compatibility of
//! this module's API; the store no longer writes them.
//!
//! Every value starts with a version byte; decoding an unknown version
//! fails instead of guessing.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::http_cache::{fmt_date, parse_date};

/// Version of the object record encoding.
pub const OBJECT_VERSION: u8 = 1;

/// Flag: the object belongs to a seeded (pinned) region, never evicted.
pub const FLAG_PINNED: u8 = 1;

/// Length of a body hash kept in the index: the first 16 bytes of BLAKE3.
pub const HASH_LEN: usize = 16;

/// A body's identity: 128 bits of BLAKE3.
pub type BodyHash = [u8; HASH_LEN];

/// Hash of a body.
pub fn body_hash(body: &[u8]) -> BodyHash {
    let mut h = [0u8; HASH_LEN];
    h.copy_from_slice(&blake3::hash(body).as_bytes()[..HASH_LEN]);
    h
}

/// An object's index record.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectRecord {
    /// `FLAG_*` bits.
    pub flags: u8,
    /// HTTP status.
    pub status: u16,
    /// Unix seconds, request sent.
    pub request_time: u32,
    /// Unix seconds, response received.
    pub response_time: u32,
    /// Coarse last access (Unix minutes), for approximate LRU.
    pub last_access: u32,
    /// Body length.
    pub body_len: u32,
    /// Body hash, key of the blob index.
    pub body_hash: BodyHash,
    /// Shared header block id (`[0; 8]` for none).
    pub header_block: [u8; 8],
    /// Per-object headers, in the order they appeared.
    pub volatile: Vec<Volatile>,
}

/// A per-object header kept outside the shared block.
#[derive(Debug, Clone, PartialEq)]
pub enum Volatile {
    /// `Date`, Unix seconds.
    Date(u32),
    /// `Expires`, Unix seconds.
    Expires(u32),
    /// `Last-Modified`, Unix seconds.
    LastModified(u32),
    /// `Age`, seconds.
    Age(u32),
    /// `ETag`, raw.
    ETag(Vec<u8>),
}

/// Why a record did not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// Truncated or malformed.
    #[error("malformed record")]
    Malformed,
    /// Written by a newer version.
    #[error("unknown record version {0}")]
    Version(u8),
}

impl ObjectRecord {
    /// Serialises.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        v.push(OBJECT_VERSION);
        v.push(self.flags);
        v.extend_from_slice(&self.status.to_le_bytes());
        v.extend_from_slice(&self.request_time.to_le_bytes());
        v.extend_from_slice(&self.response_time.to_le_bytes());
        v.extend_from_slice(&self.last_access.to_le_bytes());
        v.extend_from_slice(&self.body_len.to_le_bytes());
        v.extend_from_slice(&self.body_hash);
        v.extend_from_slice(&self.header_block);
        v.push(self.volatile.len() as u8);
        for f in &self.volatile {
            match f {
                Volatile::Date(t) => {
                    v.push(0);
                    v.extend_from_slice(&t.to_le_bytes());
                }
                Volatile::Expires(t) => {
                    v.push(1);
                    v.extend_from_slice(&t.to_le_bytes());
                }
                Volatile::LastModified(t) => {
                    v.push(2);
                    v.extend_from_slice(&t.to_le_bytes());
                }
                Volatile::Age(t) => {
                    v.push(3);
                    v.extend_from_slice(&t.to_le_bytes());
                }
                Volatile::ETag(e) => {
                    v.push(4);
                    v.push(e.len() as u8);
                    v.extend_from_slice(e);
                }
            }
        }
        v
    }

    /// Deserialises.
    ///
    /// # Errors
    /// Malformed input or an unknown version.
    pub fn decode(b: &[u8]) -> Result<ObjectRecord, DecodeError> {
        let mut r = Reader(b);
        let version = r.u8()?;
        if version != OBJECT_VERSION {
            return Err(DecodeError::Version(version));
        }
        let flags = r.u8()?;
        let status = u16::from_le_bytes(r.take(2)?.try_into().expect("2"));
        let request_time = r.u32()?;
        let response_time = r.u32()?;
        let last_access = r.u32()?;
        let body_len = r.u32()?;
        let body_hash = r.take(HASH_LEN)?.try_into().expect("16");
        let header_block = r.take(8)?.try_into().expect("8");
        let n = r.u8()?;
        let mut volatile = Vec::with_capacity(n as usize);
        for _ in 0..n {
            volatile.push(match r.u8()? {
                0 => Volatile::Date(r.u32()?),
                1 => Volatile::Expires(r.u32()?),
                2 => Volatile::LastModified(r.u32()?),
                3 => Volatile::Age(r.u32()?),
                4 => {
                    let l = r.u8()? as usize;
                    Volatile::ETag(r.take(l)?.to_vec())
                }
                _ => return Err(DecodeError::Malformed),
            });
        }
        if !r.0.is_empty() {
            return Err(DecodeError::Malformed);
        }
        Ok(ObjectRecord {
            flags,
            status,
            request_time,
            response_time,
            last_access,
            body_len,
            body_hash,
            header_block,
            volatile,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Malformed);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn uvar(&mut self) -> Result<u64, DecodeError> {
        let mut n = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            if i == 9 && b > 1 {
                return Err(DecodeError::Malformed);
            }
            n |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(DecodeError::Malformed)
    }
    fn ivar(&mut self) -> Result<i64, DecodeError> {
        let z = self.uvar()?;
        Ok((z >> 1) as i64 ^ -((z & 1) as i64))
    }
    /// A date stored as a delta from `base`; must land in `u32`.
    fn date(&mut self, base: i64) -> Result<u32, DecodeError> {
        let d = self.ivar()?;
        base.checked_add(d)
            .and_then(|t| u32::try_from(t).ok())
            .ok_or(DecodeError::Malformed)
    }
}

/// Splits headers into the shared block text and the per-object fields.
/// A date that would not survive the round trip byte for byte (an
/// obsolete format, or `Expires: 0`) stays in the block, so what we serve
/// is always what we received.
pub fn split_headers(headers: &HeaderMap) -> (Vec<u8>, Vec<Volatile>) {
    let mut block = Vec::new();
    let mut volatile = Vec::new();
    for (name, value) in headers {
        if *name == header::CONTENT_LENGTH {
            continue; // derived from the body on the way out
        }
        let as_date = || {
            let s = value.to_str().ok()?;
            let t = parse_date(s)?;
            let t32 = u32::try_from(t).ok()?;
            (fmt_date(t) == s).then_some(t32)
        };
        // A field given more than once stays in the block, all its values
        // in their order: split across block and per-object fields, its
        // values would come back reordered.
        let single = headers.get_all(name).iter().nth(1).is_none();
        let v = if !single {
            None
        } else if *name == header::DATE {
            as_date().map(Volatile::Date)
        } else if *name == header::EXPIRES {
            as_date().map(Volatile::Expires)
        } else if *name == header::LAST_MODIFIED {
            as_date().map(Volatile::LastModified)
        } else if *name == header::AGE {
            value
                .to_str()
                .ok()
                .and_then(|s| s.parse::<u32>().ok().filter(|n| n.to_string() == s))
                .map(Volatile::Age)
        } else if *name == header::ETAG && value.len() <= 255 {
            Some(Volatile::ETag(value.as_bytes().to_vec()))
        } else {
            None
        };
        match v {
            Some(v)
                if !volatile
                    .iter()
                    .any(|o| std::mem::discriminant(o) == std::mem::discriminant(&v)) =>
            {
                volatile.push(v)
            }
            _ => {
                block.extend_from_slice(name.as_str().as_bytes());
                block.extend_from_slice(b": ");
                block.extend_from_slice(value.as_bytes());
                block.push(b'\n');
            }
        }
    }
    (block, volatile)
}

/// Inverse of [`split_headers`].
pub fn join_headers(block: &[u8], volatile: &[Volatile]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for line in block.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Some(i) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..i]),
            HeaderValue::from_bytes(line[i + 1..].strip_prefix(b" ").unwrap_or(&line[i + 1..])),
        ) else {
            continue;
        };
        h.append(n, v);
    }
    for f in volatile {
        let date =
            |t: &u32| HeaderValue::from_str(&fmt_date(u64::from(*t))).expect("date is ascii");
        match f {
            Volatile::Date(t) => h.append(header::DATE, date(t)),
            Volatile::Expires(t) => h.append(header::EXPIRES, date(t)),
            Volatile::LastModified(t) => h.append(header::LAST_MODIFIED, date(t)),
            Volatile::Age(t) => h.append(header::AGE, HeaderValue::from(*t)),
            Volatile::ETag(e) => match HeaderValue::from_bytes(e) {
                Ok(v) => h.append(header::ETAG, v),
                Err(_) => false,
            },
        };
    }
    h
}

/// Id of a header block: 64 bits of BLAKE3; `[0; 8]` means "no block".
pub fn block_id(block: &[u8]) -> [u8; 8] {
    if block.is_empty() {
        return [0; 8];
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&blake3::hash(block).as_bytes()[..8]);
    if id == [0; 8] {
        id[0] = 1;
    }
    id
}

/// A blob index value: where a body lives and how many objects use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLoc {
    /// Pack file number.
    pub pack: u32,
    /// Offset of the record (header included) in the pack.
    pub offset: u64,
    /// Body length.
    pub len: u32,
    /// Objects referring to it.
    pub refs: u32,
}

impl BlobLoc {
    /// Serialises (20 bytes).
    pub fn encode(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..4].copy_from_slice(&self.pack.to_le_bytes());
        b[4..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..20].copy_from_slice(&self.refs.to_le_bytes());
        b
    }
    /// Deserialises.
    ///
    /// # Errors
    /// Wrong length.
    pub fn decode(b: &[u8]) -> Result<BlobLoc, DecodeError> {
        if b.len() != 20 {
            return Err(DecodeError::Malformed);
        }
        Ok(BlobLoc {
            pack: u32::from_le_bytes(b[0..4].try_into().expect("4")),
            offset: u64::from_le_bytes(b[4..12].try_into().expect("8")),
            len: u32::from_le_bytes(b[12..16].try_into().expect("4")),
            refs: u32::from_le_bytes(b[16..20].try_into().expect("4")),
        })
    }
}

/// Version of the [`MetaRecord`] encoding.
pub const META_VERSION: u8 = 2;

/// The per-object metadata kept in the index besides the body hash, the
/// header block id, the access time and the flags (which are columns of
/// their own so that eviction and the hit path need not decode this).
#[derive(Debug, Clone, PartialEq)]
pub struct MetaRecord {
    /// HTTP status.
    pub status: u16,
    /// Unix seconds, request sent.
    pub request_time: u32,
    /// Unix seconds, response received.
    pub response_time: u32,
    /// Per-object headers, in the order they appeared.
    pub volatile: Vec<Volatile>,
}

const TAG_DATE: u8 = 0;
const TAG_EXPIRES: u8 = 1;
const TAG_LAST_MODIFIED: u8 = 2;
const TAG_AGE: u8 = 3;
const TAG_ETAG_RAW: u8 = 4;
const TAG_ETAG_HEX: u8 = 5;
const TAG_ETAG_WEAK_HEX: u8 = 6;

fn put_uvar(v: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        v.push((n as u8) | 0x80);
        n >>= 7;
    }
    v.push(n as u8);
}

fn put_ivar(v: &mut Vec<u8>, n: i64) {
    put_uvar(v, ((n << 1) ^ (n >> 63)) as u64);
}

/// `"0123abcd"` or `W/"0123abcd"` (lower-case hex, even length, non-empty):
/// `(weak, bytes)`, which re-encode to exactly the same text.
fn hex_etag(e: &[u8]) -> Option<(bool, Vec<u8>)> {
    let (weak, rest) = match e.strip_prefix(b"W/") {
        Some(r) => (true, r),
        None => (false, e),
    };
    let hex = rest.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if hex.is_empty() || hex.len() % 2 != 0 {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = Vec::with_capacity(hex.len() / 2);
    for pair in hex.chunks_exact(2) {
        out.push(nib(pair[0])? << 4 | nib(pair[1])?);
    }
    Some((weak, out))
}

fn unhex_etag(weak: bool, bytes: &[u8]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut e = Vec::with_capacity(bytes.len() * 2 + 4);
    if weak {
        e.extend_from_slice(b"W/");
    }
    e.push(b'"');
    for b in bytes {
        e.push(HEX[usize::from(b >> 4)]);
        e.push(HEX[usize::from(b & 15)]);
    }
    e.push(b'"');
    e
}

impl MetaRecord {
    /// Serialises.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(40);
        v.push(META_VERSION);
        v.extend_from_slice(&self.status.to_le_bytes());
        v.extend_from_slice(&self.request_time.to_le_bytes());
        let base = i64::from(self.request_time);
        put_ivar(&mut v, i64::from(self.response_time) - base);
        v.push(self.volatile.len().min(255) as u8);
        for f in self.volatile.iter().take(255) {
            match f {
                Volatile::Date(t) => {
                    v.push(TAG_DATE);
                    put_ivar(&mut v, i64::from(*t) - base);
                }
                Volatile::Expires(t) => {
                    v.push(TAG_EXPIRES);
                    put_ivar(&mut v, i64::from(*t) - base);
                }
                Volatile::LastModified(t) => {
                    v.push(TAG_LAST_MODIFIED);
                    put_ivar(&mut v, i64::from(*t) - base);
                }
                Volatile::Age(t) => {
                    v.push(TAG_AGE);
                    put_uvar(&mut v, u64::from(*t));
                }
                Volatile::ETag(e) => match hex_etag(e).filter(|(_, b)| b.len() <= 255) {
                    Some((weak, bytes)) => {
                        v.push(if weak {
                            TAG_ETAG_WEAK_HEX
                        } else {
                            TAG_ETAG_HEX
                        });
                        v.push(bytes.len() as u8);
                        v.extend_from_slice(&bytes);
                    }
                    None => {
                        // split_headers keeps ETags of at most 255 bytes.
                        let e = &e[..e.len().min(255)];
                        v.push(TAG_ETAG_RAW);
                        v.push(e.len() as u8);
                        v.extend_from_slice(e);
                    }
                },
            }
        }
        v
    }

    /// Deserialises.
    ///
    /// # Errors
    /// Malformed input or an unknown version.
    pub fn decode(b: &[u8]) -> Result<MetaRecord, DecodeError> {
        let mut r = Reader(b);
        let version = r.u8()?;
        if version != META_VERSION {
            return Err(DecodeError::Version(version));
        }
        let status = u16::from_le_bytes(r.take(2)?.try_into().expect("2"));
        let request_time = r.u32()?;
        let base = i64::from(request_time);
        let response_time = r.date(base)?;
        let n = r.u8()?;
        let mut volatile = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            volatile.push(match r.u8()? {
                TAG_DATE => Volatile::Date(r.date(base)?),
                TAG_EXPIRES => Volatile::Expires(r.date(base)?),
                TAG_LAST_MODIFIED => Volatile::LastModified(r.date(base)?),
                TAG_AGE => {
                    Volatile::Age(u32::try_from(r.uvar()?).map_err(|_| DecodeError::Malformed)?)
                }
                TAG_ETAG_RAW => {
                    let l = usize::from(r.u8()?);
                    Volatile::ETag(r.take(l)?.to_vec())
                }
                t @ (TAG_ETAG_HEX | TAG_ETAG_WEAK_HEX) => {
                    let l = usize::from(r.u8()?);
                    if l == 0 {
                        return Err(DecodeError::Malformed);
                    }
                    Volatile::ETag(unhex_etag(t == TAG_ETAG_WEAK_HEX, r.take(l)?))
                }
                _ => return Err(DecodeError::Malformed),
            });
        }
        if !r.0.is_empty() {
            return Err(DecodeError::Malformed);
        }
        Ok(MetaRecord {
            status,
            request_time,
            response_time,
            volatile,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn headers_round_trip_and_share_blocks() {
        let mut a = HeaderMap::new();
        a.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        a.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=86400"),
        );
        a.insert(
            header::DATE,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        a.insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        a.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        a.insert(header::EXPIRES, HeaderValue::from_static("0"));
        let (block, vol) = split_headers(&a);
        let back = join_headers(&block, &vol);
        a.remove(header::CONTENT_LENGTH);
        assert_eq!(back.len(), a.len());
        for (k, v) in &a {
            assert_eq!(back.get(k), Some(v), "{k}");
        }
        let mut b = a.clone();
        b.insert(
            header::DATE,
            HeaderValue::from_static("Mon, 07 Nov 1994 08:49:37 GMT"),
        );
        b.insert(header::ETAG, HeaderValue::from_static("\"other\""));
        assert_eq!(block_id(&split_headers(&b).0), block_id(&block));
    }

    /// Found by the `store_codec` fuzz target: a field given twice had its
    /// first value stored per object and the second in the block, so the
    /// two came back swapped (another ETag first after a restart).
    #[test]
    fn repeated_fields_keep_their_order() {
        let mut a = HeaderMap::new();
        for (n, v) in [
            (header::ETAG, "\"first\""),
            (header::ETAG, "\"second\""),
            (header::DATE, "Sun, 06 Nov 1994 08:49:37 GMT"),
            (header::DATE, "Mon, 07 Nov 1994 08:49:37 GMT"),
            (header::AGE, "5"),
        ] {
            a.append(n, HeaderValue::from_static(v));
        }
        let (block, vol) = split_headers(&a);
        assert_eq!(vol, [Volatile::Age(5)]);
        assert_eq!(join_headers(&block, &vol), a);
    }

    #[test]
    fn meta_record_is_small_and_exact() {
        let r = MetaRecord {
            status: 200,
            request_time: 1_700_000_000,
            response_time: 1_700_000_001,
            volatile: vec![
                Volatile::Date(1_700_000_001),
                Volatile::LastModified(1_704_067_200),
                Volatile::ETag(b"\"0123456789abcdef\"".to_vec()),
            ],
        };
        let enc = r.encode();
        assert!(enc.len() <= 30, "{} bytes", enc.len());
        assert_eq!(MetaRecord::decode(&enc).unwrap(), r);
        for etag in [
            &b"W/\"00ff\""[..],
            b"\"ABCD\"",
            b"\"abc\"",
            b"\"\"",
            b"W/\"\"",
            b"xyz",
            b"",
        ] {
            let r = MetaRecord {
                volatile: vec![Volatile::ETag(etag.to_vec())],
                ..r.clone()
            };
            assert_eq!(MetaRecord::decode(&r.encode()).unwrap(), r);
        }
    }

    proptest! {
        #[test]
        fn meta_record_round_trip(status in any::<u16>(), req in any::<u32>(), resp in any::<u32>(),
                                  dates in proptest::collection::vec(any::<u32>(), 3), age in any::<u32>(),
                                  etag in proptest::collection::vec(any::<u8>(), 0..255), hex in any::<bool>()) {
            let etag = if hex { unhex_etag(etag.len() % 2 == 1, &etag[..etag.len().min(127)]) } else { etag };
            let r = MetaRecord { status, request_time: req, response_time: resp,
                volatile: vec![Volatile::Date(dates[0]), Volatile::Expires(dates[1]), Volatile::LastModified(dates[2]),
                               Volatile::Age(age), Volatile::ETag(etag)] };
            let enc = r.encode();
            prop_assert_eq!(MetaRecord::decode(&enc).unwrap(), r);
            for cut in 0..enc.len() {
                prop_assert!(MetaRecord::decode(&enc[..cut]).is_err());
            }
        }

        #[test]
        fn meta_record_decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = MetaRecord::decode(&b);
        }

        #[test]
        fn record_round_trip(flags in any::<u8>(), status in any::<u16>(), t in any::<u32>(), len in any::<u32>(),
                             h in any::<[u8; 16]>(), etag in proptest::collection::vec(any::<u8>(), 0..255)) {
            let r = ObjectRecord { flags, status, request_time: t, response_time: t ^ 5, last_access: t / 60,
                body_len: len, body_hash: h, header_block: [3; 8],
                volatile: vec![Volatile::Date(t), Volatile::ETag(etag), Volatile::Age(7)] };
            let enc = r.encode();
            prop_assert_eq!(ObjectRecord::decode(&enc).unwrap(), r);
            for cut in 0..enc.len() {
                prop_assert!(ObjectRecord::decode(&enc[..cut]).is_err());
            }
        }
    }
}
