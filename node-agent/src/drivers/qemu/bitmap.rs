//! Dirty tracking of a VM's drives, without I/O: which generation a
//! drive's dirty bitmap is clean against ([`Ledger`]), and which byte
//! ranges an incremental backup copied ([`changed_ranges`]).
//!
//! QEMU keeps one dirty bitmap per drive (QMP `block-dirty-bitmap-add`): a
//! bit per 64 KiB cluster, set by every guest write. A capture is a
//! `blockdev-backup` with that bitmap and `bitmap-mode: on-success`: at the
//! job's start QEMU hands new writes to a successor bitmap; if the job
//! succeeds the bitmap *becomes* that successor (the writes since the
//! capture's point in time), if it fails the two are merged back (nothing
//! lost). So after a successful capture the bitmap is clean against that
//! capture, and once the datastore has committed the capture as generation
//! `g`, the next capture may copy only the set clusters and build
//! generation `g + 1` on `g`.
//!
//! The ledger is the bookkeeping of that promise, and it errs one way
//! only: whenever it cannot prove the bitmap is clean against the newest
//! generation the store holds (a new QEMU, a bitmap re-created, a job whose
//! end was not seen, a commit not confirmed, another snapshot of the volume
//! in between), it answers [`Pass::Full`]. A full pass is a cost; an
//! incremental pass on the wrong base would be a wrong manifest.
//!
//! The ledger lives in the driver's state of one QEMU process
//! ([`super::Vm`]), like the bitmap in that QEMU's memory (the drives'
//! raw images cannot carry a persistent one). Only a clean stop hands
//! both on: the bitmap saved in a qcow2 of its own and its base in a
//! record beside it ([`super::saved`]), which the next QEMU on this rack
//! takes back ([`Ledger::restored`]); anything else starts anew, with
//! nothing to trust.

use std::ops::Range;

use serde::Deserialize;

/// What the bitmap is known to cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing provable: the next capture is a full pass.
    Unknown,
    /// Every cluster written since the point in time of generation `base`
    /// is set in the bitmap.
    Clean { base: u64 },
    /// A backup job with the bitmap runs; `was` is the state to go back to
    /// if QEMU reports that it failed (the bitmap is then merged back).
    InFlight { was: Option<u64> },
    /// The job succeeded: the bitmap is clean against this capture, which
    /// has no generation number until the store commits it.
    Captured,
}

/// How the next capture of a drive must be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Copy the whole disk (and reset the bitmap at the copy's point in
    /// time, so the pass after it can be incremental).
    Full,
    /// Copy only the clusters set in the bitmap; everything else is as in
    /// generation `base`.
    Incremental {
        /// The generation the changes apply to.
        base: u64,
    },
}

/// Which generation a drive's dirty bitmap is clean against.
#[derive(Debug, Clone)]
pub struct Ledger {
    state: State,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new()
    }
}

impl Ledger {
    /// A new bitmap: nothing known yet.
    #[must_use]
    pub fn new() -> Self {
        Self {
            state: State::Unknown,
        }
    }

    /// The pass the next capture must make when the store's newest
    /// generation of the volume is `latest` (`None`: it holds none). Moves
    /// to "in flight": report the job's end with [`Ledger::job_succeeded`]
    /// or [`Ledger::job_failed`], or [`Ledger::lost`] when its end is not
    /// known.
    pub fn begin(&mut self, latest: Option<u64>) -> Pass {
        let was = match self.state {
            State::Clean { base } => Some(base),
            _ => None,
        };
        self.state = State::InFlight { was };
        match (was, latest) {
            (Some(base), Some(latest)) if base == latest => Pass::Incremental { base },
            _ => Pass::Full,
        }
    }

    /// QEMU reported that the job failed or was cancelled: with
    /// `on-success` the bitmap was merged back, as it was before.
    pub fn job_failed(&mut self) {
        self.state = match self.state {
            State::InFlight { was: Some(base) } => State::Clean { base },
            _ => State::Unknown,
        };
    }

    /// QEMU reported that the job completed: the bitmap is now clean
    /// against this capture.
    pub fn job_succeeded(&mut self) {
        self.state = match self.state {
            State::InFlight { .. } => State::Captured,
            _ => State::Unknown,
        };
    }

    /// The store committed the capture as `generation`.
    pub fn committed(&mut self, generation: u64) {
        self.state = match self.state {
            State::Captured => State::Clean { base: generation },
            _ => State::Unknown,
        };
    }

    /// A new bitmap that a previous QEMU's saved bitmap, clean against
    /// `base`, was merged into before the guest ran
    /// ([`super::saved`]): as clean against `base` as that one was.
    /// Anything but a fresh ledger stays as it is not (nothing proven).
    pub fn restored(&mut self, base: u64) {
        self.state = match self.state {
            State::Unknown => State::Clean { base },
            _ => State::Unknown,
        };
    }

    /// Anything else: the capture was not committed, the job's end was not
    /// seen, the bitmap was (re)created or found unusable. The next pass is
    /// full.
    pub fn lost(&mut self) {
        self.state = State::Unknown;
    }

    /// The generation the bitmap is clean against, if one is proven.
    #[must_use]
    pub fn base(&self) -> Option<u64> {
        match self.state {
            State::Clean { base } => Some(base),
            _ => None,
        }
    }
}

/// Why `qemu-img map` output could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// Not the JSON list `qemu-img map --output=json` prints.
    #[error("qemu-img map output is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// An entry without `present` (QEMU older than 6.2 does not print it,
    /// and without it a copied zero cluster cannot be told from one never
    /// written).
    #[error("qemu-img map entry at {start} has no \"present\" field (QEMU too old)")]
    NoPresent {
        /// The entry's offset.
        start: u64,
    },
    /// An entry past the end of the disk, or overflowing.
    #[error("qemu-img map entry {start}+{length} is outside a disk of {size} bytes")]
    OutOfRange {
        /// The entry's offset.
        start: u64,
        /// Its length.
        length: u64,
        /// The disk's size.
        size: u64,
    },
}

#[derive(Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    present: Option<bool>,
}

/// The byte ranges an incremental backup copied, from `qemu-img map
/// --output=json` of its fresh qcow2 target: every cluster the job wrote
/// is allocated there (`present`), a cluster that read as zeros included
/// (it is written as a zero cluster, `present` and `zero`), and nothing
/// else is. Sorted, adjacent ranges merged.
///
/// # Errors
/// [`MapError`].
pub fn changed_ranges(json: &[u8], size: u64) -> Result<Vec<Range<u64>>, MapError> {
    let entries: Vec<MapEntry> = serde_json::from_slice(json)?;
    let mut out: Vec<Range<u64>> = Vec::new();
    for e in entries {
        let present = e.present.ok_or(MapError::NoPresent { start: e.start })?;
        let end = e
            .start
            .checked_add(e.length)
            .filter(|end| *end <= size)
            .ok_or(MapError::OutOfRange {
                start: e.start,
                length: e.length,
                size,
            })?;
        if !present || e.length == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.end >= e.start => last.end = last.end.max(end),
            _ => out.push(e.start..end),
        }
    }
    out.sort_by_key(|r| r.start);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn passes_by_state() {
        // (events before, latest generation in the store, expected pass)
        type Step = fn(&mut Ledger);
        let commit7: Step = |l| {
            l.begin(None);
            l.job_succeeded();
            l.committed(7);
        };
        let cases: Vec<(&str, Vec<Step>, Option<u64>, Pass)> = vec![
            ("new bitmap", vec![], Some(3), Pass::Full),
            (
                "restored, store unchanged",
                vec![|l| l.restored(5)],
                Some(5),
                Pass::Incremental { base: 5 },
            ),
            (
                "restored, store moved on",
                vec![|l| l.restored(5)],
                Some(6),
                Pass::Full,
            ),
            (
                "restored over a known state",
                vec![commit7, |l| l.restored(7)],
                Some(7),
                Pass::Full,
            ),
            ("new bitmap, empty store", vec![], None, Pass::Full),
            (
                "committed",
                vec![commit7],
                Some(7),
                Pass::Incremental { base: 7 },
            ),
            ("store moved on", vec![commit7], Some(8), Pass::Full),
            ("store went back", vec![commit7], Some(6), Pass::Full),
            ("store emptied", vec![commit7], None, Pass::Full),
            (
                "failed job keeps the base",
                vec![commit7, |l| {
                    l.begin(Some(7));
                    l.job_failed();
                }],
                Some(7),
                Pass::Incremental { base: 7 },
            ),
            (
                "job end not seen",
                vec![commit7, |l| {
                    l.begin(Some(7));
                    l.lost();
                }],
                Some(7),
                Pass::Full,
            ),
            (
                "job done, commit failed",
                vec![commit7, |l| {
                    l.begin(Some(7));
                    l.job_succeeded();
                    l.lost();
                }],
                Some(7),
                Pass::Full,
            ),
            (
                "job done, commit not reported",
                vec![commit7, |l| {
                    l.begin(Some(7));
                    l.job_succeeded();
                }],
                Some(7),
                Pass::Full,
            ),
            (
                "commit without a job",
                vec![commit7, |l| l.committed(9)],
                Some(9),
                Pass::Full,
            ),
            (
                "bitmap re-created",
                vec![commit7, |l| l.lost()],
                Some(7),
                Pass::Full,
            ),
        ];
        for (what, steps, latest, want) in cases {
            let mut l = Ledger::new();
            for s in steps {
                s(&mut l);
            }
            assert_eq!(l.begin(latest), want, "{what}");
        }
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Begin(Option<u64>),
        Failed,
        Succeeded,
        Committed(u64),
        Lost,
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            proptest::option::of(0u64..4).prop_map(Ev::Begin),
            Just(Ev::Failed),
            Just(Ev::Succeeded),
            (0u64..4).prop_map(Ev::Committed),
            Just(Ev::Lost),
        ]
    }

    proptest! {
        /// Against a model of QEMU's bitmap: an incremental pass is only
        /// ever planned on the generation the bitmap really is clean
        /// against, and that generation is the store's newest.
        #[test]
        fn incremental_only_on_the_true_base(events in proptest::collection::vec(ev(), 0..40)) {
            let mut l = Ledger::new();
            // What the bitmap truly covers: writes since the point in
            // time of `truth` (None: unknown, e.g. since QEMU started).
            let mut truth: Option<u64> = None;
            // A job ran and succeeded: the bitmap is clean against a
            // capture not yet numbered.
            let mut captured = false;
            let mut running: Option<Option<u64>> = None;
            for e in events {
                match e {
                    Ev::Begin(latest) => {
                        if let Pass::Incremental { base } = l.begin(latest) {
                            prop_assert_eq!(Some(base), truth);
                            prop_assert_eq!(Some(base), latest);
                        }
                        running = Some(truth);
                        captured = false;
                    }
                    Ev::Failed => {
                        if let Some(was) = running.take() {
                            truth = was;
                        }
                        l.job_failed();
                    }
                    Ev::Succeeded => {
                        if running.take().is_some() {
                            truth = None;
                            captured = true;
                        }
                        l.job_succeeded();
                    }
                    Ev::Committed(g) => {
                        if captured {
                            truth = Some(g);
                        }
                        captured = false;
                        l.committed(g);
                    }
                    Ev::Lost => {
                        running = None;
                        captured = false;
                        truth = None;
                        l.lost();
                    }
                }
            }
        }
    }

    #[test]
    fn ranges_from_qemu_img_map() {
        // What QEMU 7.2 printed for a backup of three dirty clusters, one
        // of which read as zeros.
        let json = br#"[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 0},
{ "start": 65536, "length": 983040, "depth": 0, "present": false, "zero": true, "data": false},
{ "start": 1048576, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 1048576},
{ "start": 1114112, "length": 983040, "depth": 0, "present": false, "zero": true, "data": false},
{ "start": 2097152, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false},
{ "start": 2162688, "length": 64946176, "depth": 0, "present": false, "zero": true, "data": false}]"#;
        assert_eq!(
            changed_ranges(json, 64 << 20).unwrap(),
            vec![0..65536, 1048576..1114112, 2097152..2162688]
        );
        // Adjacent allocated entries merge.
        let json =
            br#"[{"start":0,"length":10,"present":true},{"start":10,"length":5,"present":true}]"#;
        assert_eq!(changed_ranges(json, 20).unwrap(), vec![0..15]);
        assert!(matches!(
            changed_ranges(br#"[{"start":0,"length":10,"zero":true}]"#, 20),
            Err(MapError::NoPresent { start: 0 })
        ));
        assert!(matches!(
            changed_ranges(br#"[{"start":15,"length":10,"present":true}]"#, 20),
            Err(MapError::OutOfRange { .. })
        ));
        assert!(matches!(
            changed_ranges(b"nope", 20),
            Err(MapError::Json(_))
        ));
        assert_eq!(changed_ranges(b"[]", 20).unwrap(), Vec::<Range<u64>>::new());
    }
}
