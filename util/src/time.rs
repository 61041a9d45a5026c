//! The wall clock as Unix time.
//!
//! For timestamps in records, reports and logs. Leases, timeouts and other
//! decisions use monotonic `Instant`s, never these.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
#[must_use]
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Seconds since the Unix epoch (0 if the clock is before 1970).
#[must_use]
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_milliseconds_agree() {
        let (s, ms) = (unix_secs(), unix_ms());
        // 2020-01-01 is long past; the two readings are a moment apart.
        assert!(s > 1_577_836_800, "clock reads {s}");
        assert!(ms / 1000 >= s && ms / 1000 - s <= 1, "{ms} ms vs {s} s");
    }
}
