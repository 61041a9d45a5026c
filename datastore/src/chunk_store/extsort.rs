//! External sort of fixed-size records, for the store's maintenance passes
//! (gc's live set, scrub's and compaction's pack order) in bounded memory
//! whatever the number of chunks.
//!
//! Records are pushed into an in-memory buffer of at most
//! [`SORT_BUFFER_BYTES`]; a full buffer is sorted, deduplicated and
//! written out as a *run* to an unlinked temporary file (so a crash leaves
//! nothing behind); at most [`MAX_FANIN`] runs exist at a time (when that
//! many are written they are merged into one). Reading merges the runs
//! (and the last buffer) with a heap and yields every distinct record once,
//! in ascending byte order: the order of sled's keys, so a sorted stream
//! of chunk ids can be merge-joined with the index.
//!
//! Why a sorted run rather than a Bloom filter: the answer is exact (no
//! second pass over the manifests to recheck a "maybe"), the same code
//! also orders scrub and compaction reads by pack and offset, and the
//! temporary space it needs (32 bytes per live id) is small next to the
//! chunks themselves.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of records kept in memory before a run is written. 8 MiB makes
/// runs long (a 10-million-chunk live set is 40 runs) at a memory cost a
/// rack does not notice.
pub(crate) const SORT_BUFFER_BYTES: usize = 8 << 20;

/// Runs open at once; reaching it merges them into one. Each open run
/// holds a read buffer of [`RUN_READ_BUF`] while merging, so this bounds
/// the merge's memory (32 × 64 KiB) and its file descriptors.
pub(crate) const MAX_FANIN: usize = 32;

/// Read buffer of one run while merging: large enough that reading a run
/// is sequential I/O.
const RUN_READ_BUF: usize = 64 << 10;

/// Write buffer of a run being written.
const RUN_WRITE_BUF: usize = 1 << 20;

/// Distinguishes temporary files of sorters of one process.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// A sorted, deduplicated run on disk.
struct Run {
    file: File,
}

/// Collects records of `N` bytes; [`ExtSorter::finish`] gives them back
/// sorted and distinct.
pub(crate) struct ExtSorter<const N: usize> {
    /// Where run files are created (and at once unlinked).
    dir: PathBuf,
    /// Records not yet written to a run.
    buf: Vec<[u8; N]>,
    /// Records per run: [`SORT_BUFFER_BYTES`] / `N`.
    cap: usize,
    /// Runs written.
    runs: Vec<Run>,
}

impl<const N: usize> ExtSorter<N> {
    /// A sorter whose runs go to files in `dir` (removed on creation: only
    /// the open descriptor keeps them).
    pub(crate) fn new(dir: &Path) -> Self {
        Self::with_buffer(dir, SORT_BUFFER_BYTES)
    }

    /// [`ExtSorter::new`] with a smaller buffer (tests: many runs from few
    /// records).
    pub(crate) fn with_buffer(dir: &Path, bytes: usize) -> Self {
        let cap = (bytes / N).max(1);
        Self {
            dir: dir.to_path_buf(),
            buf: Vec::with_capacity(cap.min(4096)),
            cap,
            runs: Vec::new(),
        }
    }

    /// The directory runs are written in (for error messages).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Add a record.
    ///
    /// # Errors
    /// Writing a run failed (a full disk included).
    pub(crate) fn push(&mut self, rec: [u8; N]) -> io::Result<()> {
        self.buf.push(rec);
        if self.buf.len() >= self.cap {
            self.spill()?;
        }
        Ok(())
    }

    /// Sort the buffer into a new run; merge all runs into one when there
    /// are [`MAX_FANIN`] of them.
    fn spill(&mut self) -> io::Result<()> {
        self.buf.sort_unstable();
        self.buf.dedup();
        let file = self.temp_file()?;
        let mut w = BufWriter::with_capacity(RUN_WRITE_BUF, file);
        for r in &self.buf {
            w.write_all(r)?;
        }
        let file = w.into_inner().map_err(io::IntoInnerError::into_error)?;
        self.runs.push(Run { file });
        self.buf.clear();
        if self.runs.len() >= MAX_FANIN {
            let runs = std::mem::take(&mut self.runs);
            let mut merged = Merge::<N>::new(runs, Vec::new())?;
            let file = self.temp_file()?;
            let mut w = BufWriter::with_capacity(RUN_WRITE_BUF, file);
            while let Some(r) = merged.next_record()? {
                w.write_all(&r)?;
            }
            let file = w.into_inner().map_err(io::IntoInnerError::into_error)?;
            self.runs.push(Run { file });
        }
        Ok(())
    }

    /// A new, already unlinked, file in `dir`.
    fn temp_file(&self) -> io::Result<File> {
        let name = format!(
            "sort-{}-{}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = self.dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(file)
    }

    /// Every distinct record pushed, in ascending order.
    ///
    /// # Errors
    /// Reading or writing runs failed.
    pub(crate) fn finish(mut self) -> io::Result<Sorted<N>> {
        self.buf.sort_unstable();
        self.buf.dedup();
        let buf = std::mem::take(&mut self.buf);
        let runs = std::mem::take(&mut self.runs);
        Ok(Sorted {
            merge: Merge::new(runs, buf)?,
        })
    }
}

/// The merged output of an [`ExtSorter`].
pub(crate) struct Sorted<const N: usize> {
    merge: Merge<N>,
}

impl<const N: usize> Sorted<N> {
    /// The next record, `None` at the end.
    ///
    /// # Errors
    /// Reading a run failed.
    pub(crate) fn next_record(&mut self) -> io::Result<Option<[u8; N]>> {
        self.merge.next_record()
    }
}

/// A k-way merge of sorted runs and one sorted in-memory vector, dropping
/// duplicates.
struct Merge<const N: usize> {
    readers: Vec<BufReader<File>>,
    /// The next record of each source: (record, source); source
    /// `readers.len()` is the in-memory vector.
    heap: BinaryHeap<Reverse<([u8; N], usize)>>,
    mem: std::vec::IntoIter<[u8; N]>,
    last: Option<[u8; N]>,
}

impl<const N: usize> Merge<N> {
    fn new(runs: Vec<Run>, mem: Vec<[u8; N]>) -> io::Result<Self> {
        let mut readers = Vec::with_capacity(runs.len());
        for mut r in runs {
            r.file.seek(SeekFrom::Start(0))?;
            readers.push(BufReader::with_capacity(RUN_READ_BUF, r.file));
        }
        let mut m = Self {
            heap: BinaryHeap::with_capacity(readers.len() + 1),
            readers,
            mem: mem.into_iter(),
            last: None,
        };
        for i in 0..=m.readers.len() {
            m.refill(i)?;
        }
        Ok(m)
    }

    /// Put source `i`'s next record on the heap.
    fn refill(&mut self, i: usize) -> io::Result<()> {
        let next = if i == self.readers.len() {
            self.mem.next()
        } else {
            read_record(&mut self.readers[i])?
        };
        if let Some(r) = next {
            self.heap.push(Reverse((r, i)));
        }
        Ok(())
    }

    fn next_record(&mut self) -> io::Result<Option<[u8; N]>> {
        while let Some(Reverse((r, i))) = self.heap.pop() {
            self.refill(i)?;
            if self.last != Some(r) {
                self.last = Some(r);
                return Ok(Some(r));
            }
        }
        Ok(None)
    }
}

/// One record from a run; `None` at its end. A run's length is always a
/// multiple of `N` (written whole by this module); a partial one is an
/// I/O error.
fn read_record<const N: usize>(r: &mut BufReader<File>) -> io::Result<Option<[u8; N]>> {
    let mut rec = [0u8; N];
    let mut got = 0;
    while got < N {
        match r.read(&mut rec[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(rec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sort_all(dir: &Path, buffer: usize, recs: &[[u8; 4]]) -> Vec<[u8; 4]> {
        let mut s = ExtSorter::<4>::with_buffer(dir, buffer);
        for r in recs {
            s.push(*r).unwrap();
        }
        let mut out = Vec::new();
        let mut it = s.finish().unwrap();
        while let Some(r) = it.next_record().unwrap() {
            out.push(r);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the buffer size (one run, many runs, more than
        /// `MAX_FANIN` runs merged along the way), the output is the sorted
        /// distinct input.
        #[test]
        fn output_is_sorted_distinct_input(
            recs in proptest::collection::vec(
                (0u8..4, any::<u8>(), 0u8..4).prop_map(|(a, b, c)| [a, b, 0, c]),
                0..600,
            ),
            buffer in 4usize..64,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut want = recs.clone();
            want.sort_unstable();
            want.dedup();
            prop_assert_eq!(sort_all(dir.path(), buffer, &recs), want);
            // Runs are unlinked at once: nothing is left in the directory.
            prop_assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }
}
