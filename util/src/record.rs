//! The envelope of every record Fieldrack keeps in sled:
//! `[version: u8][crc32 of payload: u32 LE][payload]`.
//!
//! sled 0.34 is barely maintained and has open corruption reports, so a
//! record is checked when it is read: a flipped bit, a torn or truncated
//! value or a record of another format version is reported as a
//! [`RecordError`] and never handed on as if it were good. The version
//! byte is the caller's payload format: bump it when the payload's
//! encoding changes.

/// Bytes before the payload: the version and the checksum.
pub const HEADER_LEN: usize = 5;

/// Why a stored record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// Shorter than the header: torn or truncated.
    #[error("record too short ({len} bytes)")]
    TooShort {
        /// Its length.
        len: usize,
    },
    /// Written in a format version this build does not read.
    #[error("unknown record version {found} (this build reads version {expected})")]
    UnknownVersion {
        /// The version byte found.
        found: u8,
        /// The version expected.
        expected: u8,
    },
    /// The payload does not match its checksum: corrupt.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// The checksum in the header.
        stored: u32,
        /// The payload's checksum.
        computed: u32,
    },
}

/// CRC-32 (IEEE, as zlib), table-free bitwise version: records are small.
#[must_use]
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Wrap a payload of format `version`.
#[must_use]
pub fn seal(version: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + HEADER_LEN);
    v.push(version);
    v.extend_from_slice(&crc32(payload).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// Check a record of format `version` and return its payload.
///
/// # Errors
/// [`RecordError`] if it is too short, of another version, or corrupt.
pub fn open(version: u8, record: &[u8]) -> Result<&[u8], RecordError> {
    if record.len() < HEADER_LEN {
        return Err(RecordError::TooShort { len: record.len() });
    }
    if record[0] != version {
        return Err(RecordError::UnknownVersion {
            found: record[0],
            expected: version,
        });
    }
    let stored = u32::from_le_bytes([record[1], record[2], record[3], record[4]]);
    let payload = &record[HEADER_LEN..];
    let computed = crc32(payload);
    if computed != stored {
        return Err(RecordError::Checksum { stored, computed });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn crc32_matches_reference() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn short_and_foreign_records_are_refused() {
        assert_eq!(open(1, &[1, 0]), Err(RecordError::TooShort { len: 2 }));
        let r = seal(2, b"x");
        assert_eq!(
            open(1, &r),
            Err(RecordError::UnknownVersion {
                found: 2,
                expected: 1
            })
        );
        // A bare JSON value (a record written before envelopes) is refused.
        assert!(matches!(
            open(1, br#"{"a":1}"#),
            Err(RecordError::UnknownVersion { found: b'{', .. })
        ));
    }

    proptest! {
        #[test]
        fn roundtrip(version: u8, payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let r = seal(version, &payload);
            prop_assert_eq!(open(version, &r).unwrap(), &payload[..]);
        }

        #[test]
        fn any_single_bit_flip_is_detected(
            payload in proptest::collection::vec(any::<u8>(), 1..256),
            pos in any::<proptest::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut r = seal(1, &payload);
            let i = pos.index(r.len());
            r[i] ^= 1 << bit;
            prop_assert!(open(1, &r).is_err());
        }
    }
}
