//! Appliance checks shared by the failover tests and the drill: the test
//! appliance (`fixtures/recorder.py`), its manifest, and the two checkers
//! that prove what the issue asks:
//!
//! - [`check_records`]: a volume image holds an unbroken prefix of records
//!   (numbered from 0, no torn record, no reordering, epochs never go back);
//! - [`check_witness`]: from one appliance's own log, no two epochs ever
//!   ran at the same time (no duplicate appliance), each on one rack (the
//!   general checker, for logs shared by many appliances, is
//!   [`crate::history`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::agent::workspace_root;

/// Bytes per record.
pub const RECORD: usize = 64;

/// The recorder appliance script.
#[must_use]
pub fn recorder_script() -> PathBuf {
    workspace_root().join("field-tests/fixtures/recorder.py")
}

/// A manifest for one recorder appliance with a 64 MiB volume; every
/// record is also logged to `witness`.
#[must_use]
pub fn recorder_manifest(name: &str, tier: u8, witness: &Path) -> String {
    Recorder::new(name, tier, witness).manifest()
}

/// A recorder appliance's manifest, with its knobs.
#[derive(Debug, Clone, Copy)]
pub struct Recorder<'a> {
    /// Appliance name (its volume is `<name>-data`).
    pub name: &'a str,
    /// Tier.
    pub tier: u8,
    /// The shared witness log.
    pub witness: &'a Path,
    /// `stop_grace_ms`; `None` leaves the default.
    pub stop_grace_ms: Option<u64>,
    /// Ignore SIGTERM and write on until SIGKILL.
    pub ignore_term: bool,
    /// Volume size (`64M`...).
    pub size: &'a str,
    /// The rack placement should prefer.
    pub prefer: Option<&'a str>,
}

impl<'a> Recorder<'a> {
    /// The usual recorder: stops within a second of SIGTERM, a 64 MiB
    /// volume, placed anywhere.
    #[must_use]
    pub fn new(name: &'a str, tier: u8, witness: &'a Path) -> Recorder<'a> {
        Recorder {
            name,
            tier,
            witness,
            stop_grace_ms: Some(1000),
            ignore_term: false,
            size: "64M",
            prefer: None,
        }
    }

    /// The `[[appliance]]` table.
    #[must_use]
    pub fn manifest(&self) -> String {
        let grace = self
            .stop_grace_ms
            .map_or(String::new(), |g| format!("stop_grace_ms = {g}\n"));
        let term = if self.ignore_term {
            ", IGNORE_TERM = \"1\""
        } else {
            ""
        };
        format!(
            r#"[[appliance]]
name = "{name}"
driver = "process"
command = ["/usr/bin/python3", "{script}"]
tier = {tier}
{grace}env = {{ WITNESS = "{witness}"{term} }}
[[appliance.volume]]
name = "{name}-data"
size = "{size}"
{prefer}"#,
            prefer = self.prefer.map_or(String::new(), |r| format!(
                "[appliance.placement]\nracks = [\"{r}\"]\n"
            )),
            name = self.name,
            tier = self.tier,
            size = self.size,
            script = recorder_script().display(),
            witness = self.witness.display(),
        )
    }
}

/// What a volume image holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Records {
    /// Records in the unbroken prefix.
    pub count: u64,
    /// Per epoch: (first seq, last seq, rack).
    pub epochs: BTreeMap<u64, (u64, u64, String)>,
}

/// Check that `image` holds an unbroken prefix of records.
///
/// # Errors
/// A torn record (magic without a valid checksum), a record out of order,
/// or an epoch going back.
pub fn check_records(image: &Path) -> Result<Records> {
    let data = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let mut out = Records {
        count: 0,
        epochs: BTreeMap::new(),
    };
    let mut last_epoch = 0;
    for (i, rec) in data.chunks_exact(RECORD).enumerate() {
        if &rec[..4] != b"FRR1" {
            if rec.iter().any(|b| *b != 0) {
                bail!("record {i}: garbage where the prefix should end");
            }
            // The rest must be empty: records after a hole would be reordered.
            if let Some(j) = data[i * RECORD..]
                .chunks_exact(RECORD)
                .position(|r| &r[..4] == b"FRR1")
            {
                bail!("record {} follows a hole at {i}", i + j);
            }
            break;
        }
        let crc = u32::from_le_bytes(rec[60..64].try_into().expect("4 bytes"));
        if crc32(&rec[..60]) != crc {
            bail!("record {i} is torn (bad checksum)");
        }
        let seq = u64::from_le_bytes(rec[4..12].try_into().expect("8"));
        let epoch = u64::from_le_bytes(rec[12..20].try_into().expect("8"));
        if seq != i as u64 {
            bail!("record {i} carries sequence number {seq}");
        }
        if epoch < last_epoch {
            bail!("record {i}: epoch {epoch} after epoch {last_epoch}");
        }
        last_epoch = epoch;
        let rack = String::from_utf8_lossy(&rec[20..36])
            .trim_end_matches('\0')
            .to_owned();
        out.epochs
            .entry(epoch)
            .and_modify(|e| e.1 = seq)
            .or_insert((seq, seq, rack));
        out.count += 1;
    }
    Ok(out)
}

/// One epoch as the witness log saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochRun {
    /// The rack it ran on.
    pub rack: String,
    /// First and last record time (unix ms).
    pub first_ms: u64,
    /// Last record time.
    pub last_ms: u64,
    /// Records written.
    pub records: u64,
}

/// Check the shared witness log of an appliance: every epoch ran on one
/// rack, and no epoch wrote after a later one had begun.
///
/// # Errors
/// A duplicate (overlapping epochs, or one epoch on two racks), or an
/// unreadable log.
pub fn check_witness(path: &Path) -> Result<BTreeMap<u64, EpochRun>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut runs: BTreeMap<u64, EpochRun> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (rack, epoch, ms) = match f[..] {
            [rack, epoch, _seq, ms] | [rack, epoch, _seq, ms, _] => (rack, epoch, ms),
            // A line cut by a kill at the very end of the log.
            _ => continue,
        };
        let (Ok(epoch), Ok(ms)) = (epoch.parse::<u64>(), ms.parse::<u64>()) else {
            continue;
        };
        let r = runs.entry(epoch).or_insert_with(|| EpochRun {
            rack: rack.to_owned(),
            first_ms: ms,
            last_ms: ms,
            records: 0,
        });
        if r.rack != rack {
            bail!("line {n}: epoch {epoch} ran on both {} and {rack}", r.rack);
        }
        r.first_ms = r.first_ms.min(ms);
        r.last_ms = r.last_ms.max(ms);
        r.records += 1;
    }
    let list: Vec<(&u64, &EpochRun)> = runs.iter().collect();
    for w in list.windows(2) {
        let ((e1, a), (e2, b)) = (w[0], w[1]);
        if a.last_ms >= b.first_ms {
            bail!(
                "two copies ran at once: epoch {e1} on {} wrote until {} ms, epoch {e2} on {} began at {} ms",
                a.rack,
                a.last_ms,
                b.rack,
                b.first_ms
            );
        }
    }
    Ok(runs)
}

/// CRC-32 (IEEE), as Python's `zlib.crc32` (the recorder's checksum).
pub use util::record::crc32;

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, epoch: u64) -> Vec<u8> {
        let mut r = b"FRR1".to_vec();
        r.extend_from_slice(&seq.to_le_bytes());
        r.extend_from_slice(&epoch.to_le_bytes());
        r.extend_from_slice(b"rack-a\0\0\0\0\0\0\0\0\0\0");
        r.resize(60, 0);
        let c = crc32(&r);
        r.extend_from_slice(&c.to_le_bytes());
        r
    }

    #[test]
    fn crc_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn records_prefix_torn_and_reordered() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let mut img: Vec<u8> = (0..5).flat_map(|i| record(i, 1 + i / 3)).collect();
        img.resize(64 * 20, 0);
        std::fs::write(&p, &img).unwrap();
        let r = check_records(&p).unwrap();
        assert_eq!(r.count, 5);
        assert_eq!(r.epochs[&1], (0, 2, "rack-a".into()));
        assert_eq!(r.epochs[&2], (3, 4, "rack-a".into()));

        let mut torn = img.clone();
        torn[64 * 2 + 30] ^= 1;
        std::fs::write(&p, &torn).unwrap();
        assert!(check_records(&p).unwrap_err().to_string().contains("torn"));

        let mut hole = img.clone();
        hole[64 * 8..64 * 9].copy_from_slice(&record(8, 2));
        std::fs::write(&p, &hole).unwrap();
        assert!(check_records(&p).unwrap_err().to_string().contains("hole"));

        let mut back: Vec<u8> = [record(0, 2), record(1, 1)].concat();
        back.resize(64 * 4, 0);
        std::fs::write(&p, &back).unwrap();
        assert!(check_records(&p).unwrap_err().to_string().contains("epoch"));
    }

    #[test]
    fn witness_catches_overlap_and_split_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w");
        std::fs::write(&p, "a 1 0 100\na 1 1 200\nb 2 2 300\nb 2 3 400\n").unwrap();
        let runs = check_witness(&p).unwrap();
        assert_eq!(runs[&1].last_ms, 200);
        assert_eq!(runs[&2].rack, "b");
        std::fs::write(&p, "a 1 0 100\nb 2 1 150\na 1 2 200\n").unwrap();
        assert!(check_witness(&p)
            .unwrap_err()
            .to_string()
            .contains("at once"));
        std::fs::write(&p, "a 1 0 100\nb 1 1 150\n").unwrap();
        assert!(check_witness(&p).unwrap_err().to_string().contains("both"));
    }
}
