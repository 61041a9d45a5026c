//! Reading raw images chunk by chunk and writing them back.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::chunk_store::{ChunkStore, ChunkStoreError};
use crate::fsutil::{self, TempFile};
use crate::id::{hash_many, is_zero, ChunkId};
use crate::manifest::Manifest;

/// Bytes read (and hashed in parallel) per batch while scanning an image:
/// big enough that reads are large and thread hand-offs are rare, small
/// enough to be a trivial amount of memory.
const SCAN_BATCH_BYTES: u64 = 8 << 20;

/// Chunks per stripe when materialising with several threads: 1 MiB runs
/// keep each thread's writes sequential.
const MATERIALISE_STRIPE: usize = 16;

/// Threads that read, verify and write chunks when materialising an image.
const MATERIALISE_THREADS: usize = 4;

/// Finds the data (non-hole) ranges of a file with `SEEK_DATA`/`SEEK_HOLE`
/// so scans skip holes without reading them: a thin 4 GiB image with
/// 100 MiB written reads 100 MiB.
struct DataMap<'a> {
    file: &'a File,
    /// Cached data interval `[data, hole)`.
    data: u64,
    hole: u64,
    len: u64,
}

impl<'a> DataMap<'a> {
    fn new(file: &'a File, len: u64) -> Self {
        Self {
            file,
            data: 0,
            hole: 0,
            len,
        }
    }

    /// Whether `[s, e)` may hold data.
    fn has_data(&mut self, s: u64, e: u64) -> io::Result<bool> {
        if s >= self.len {
            return Ok(false);
        }
        if s >= self.hole {
            match rustix::fs::seek(self.file, rustix::fs::SeekFrom::Data(s)) {
                Ok(d) => {
                    self.data = d;
                    self.hole = rustix::fs::seek(self.file, rustix::fs::SeekFrom::Hole(d))?;
                }
                // ENXIO: no data at or after `s`.
                Err(rustix::io::Errno::NXIO) => {
                    self.data = self.len;
                    self.hole = u64::MAX;
                }
                // A filesystem without SEEK_DATA: everything is data.
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                    self.data = 0;
                    self.hole = u64::MAX;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.data < e && self.hole > s)
    }
}

/// Read `buf.len()` bytes at `offset`; bytes past the end of the file read
/// as zeros (an image shorter than its volume is zero-extended).
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Where a scan hands each non-zero chunk: `(index, bytes, id)`.
pub(crate) type Sink<'a, E> = dyn FnMut(usize, &[u8], ChunkId) -> Result<(), E> + 'a;

/// Why a scan stopped.
#[derive(Debug)]
pub(crate) enum ScanError<E> {
    /// Reading the image failed.
    Read(io::Error),
    /// The sink refused a chunk.
    Sink(E),
}

/// What a scan read and found.
#[derive(Debug)]
pub(crate) struct Scanned {
    /// One entry per chunk scanned, in order (`None` for zero chunks).
    pub entries: Vec<Option<ChunkId>>,
    /// Bytes actually read from the file (holes are skipped unread).
    pub bytes_read: u64,
}

/// Chunk the first `size` bytes of `file` into `chunk_size` pieces, hashing
/// in parallel, and hand every non-zero chunk to `sink(index, data, id)`.
/// Returns the manifest entries (`None` for zero chunks). Holes are skipped
/// without reading. `progress(done, size)` after each batch.
pub(crate) fn scan<E>(
    file: &File,
    size: u64,
    chunk_size: u32,
    progress: &mut dyn FnMut(u64, u64),
    sink: &mut Sink<'_, E>,
) -> Result<Scanned, ScanError<E>> {
    let n = usize::try_from(size.div_ceil(u64::from(chunk_size))).unwrap_or(usize::MAX);
    scan_chunks(
        file,
        size,
        chunk_size,
        std::slice::from_ref(&(0..n)),
        progress,
        sink,
    )
}

/// [`scan`] restricted to the chunks whose indices lie in `runs` (sorted,
/// disjoint, within the image): the entries returned are those chunks', in
/// order. `progress(done, total)` counts the bytes of the selected chunks.
pub(crate) fn scan_chunks<E>(
    file: &File,
    size: u64,
    chunk_size: u32,
    runs: &[Range<usize>],
    progress: &mut dyn FnMut(u64, u64),
    sink: &mut Sink<'_, E>,
) -> Result<Scanned, ScanError<E>> {
    let cs = u64::from(chunk_size);
    let chunk_len = |i: usize| (size.saturating_sub(i as u64 * cs)).min(cs);
    let selected: usize = runs.iter().map(ExactSizeIterator::len).sum();
    let total: u64 = runs
        .iter()
        .map(|r| {
            let (s, e) = (r.start as u64 * cs, (r.end as u64 * cs).min(size));
            e.saturating_sub(s)
        })
        .sum();
    let file_len = file.metadata().map_err(ScanError::Read)?.len();
    let mut map = DataMap::new(file, file_len);
    let mut out = Vec::with_capacity(selected);
    let per_batch = usize::try_from((SCAN_BATCH_BYTES / cs).max(1)).unwrap_or(1);
    let mut buf = vec![0u8; per_batch.min(selected.max(1)) * chunk_size as usize];
    let mut bytes_read = 0u64;
    let mut done = 0u64;
    let mut indices = runs.iter().flat_map(Clone::clone).peekable();
    while indices.peek().is_some() {
        let batch: Vec<usize> = indices.by_ref().take(per_batch).collect();
        // Which chunks of the batch may hold data; read runs of them that
        // are contiguous both in the file and in the buffer.
        let mut slots: Vec<Option<(usize, usize)>> = Vec::with_capacity(batch.len()); // (buf start, len)
        let mut run: Option<(u64, usize, usize)> = None; // (file offset, buf start, len)
        let mut flush =
            |run: Option<(u64, usize, usize)>, buf: &mut [u8]| -> Result<(), ScanError<E>> {
                if let Some((off, b, l)) = run {
                    read_full_at(file, &mut buf[b..b + l], off).map_err(ScanError::Read)?;
                    bytes_read += l as u64;
                }
                Ok(())
            };
        for (k, &i) in batch.iter().enumerate() {
            let start = i as u64 * cs;
            let len = usize::try_from(chunk_len(i)).unwrap_or(0);
            done += len as u64;
            if map
                .has_data(start, start + len as u64)
                .map_err(ScanError::Read)?
            {
                let at = k * chunk_size as usize;
                slots.push(Some((at, len)));
                run = match run {
                    Some((off, b, l)) if b + l == at && off + l as u64 == start => {
                        Some((off, b, l + len))
                    }
                    other => {
                        flush(other, &mut buf)?;
                        Some((start, at, len))
                    }
                };
            } else {
                slots.push(None);
            }
        }
        flush(run, &mut buf)?;
        let datas: Vec<(usize, &[u8])> = slots
            .iter()
            .enumerate()
            .filter_map(|(k, s)| s.map(|(at, len)| (k, &buf[at..at + len])))
            .filter(|(_, d)| !is_zero(d))
            .collect();
        let ids = hash_many(&datas.iter().map(|(_, d)| *d).collect::<Vec<_>>());
        let mut entries = vec![None; batch.len()];
        for ((k, data), id) in datas.iter().zip(ids) {
            sink(batch[*k], data, id).map_err(ScanError::Sink)?;
            entries[*k] = Some(id);
        }
        out.extend(entries);
        progress(done.min(total), total);
    }
    if selected == 0 {
        progress(0, 0);
    }
    Ok(Scanned {
        entries: out,
        bytes_read,
    })
}

/// Why an image could not be materialised.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MaterialiseError {
    /// The store lacks a chunk the manifest needs.
    #[error("chunk {0} is not in the store")]
    MissingChunk(ChunkId),
    /// Reading a chunk failed (including [`ChunkStoreError::Corrupt`]).
    #[error(transparent)]
    Chunks(#[from] ChunkStoreError),
    /// Writing the image failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The disk is full; nothing was replaced.
    #[error("disk full writing {path}")]
    DiskFull {
        /// The file.
        path: std::path::PathBuf,
    },
}

fn mat_io(path: &Path) -> impl FnOnce(io::Error) -> MaterialiseError {
    let path = path.to_path_buf();
    move |source| {
        if fsutil::is_disk_full(&source) {
            MaterialiseError::DiskFull { path }
        } else {
            MaterialiseError::Io { path, source }
        }
    }
}

/// Write the image `m` describes to `dst`: a temp file beside it (sparse:
/// zero chunks are holes), fsynced, renamed over `dst`, directory fsynced.
/// `dst` is either untouched or completely the new image, even on a crash.
pub(crate) fn materialise(
    store: &ChunkStore,
    m: &Manifest,
    dst: &Path,
    mode: u32,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), MaterialiseError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = fsutil::parent_or_dot(dst);
    let base = dst.file_name().and_then(|n| n.to_str()).unwrap_or("image");
    let tmp = TempFile::new(dir.join(fsutil::unique_tmp_name(&format!(".{base}"))));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp.path())
        .map_err(mat_io(tmp.path()))?;
    file.set_len(m.size).map_err(mat_io(tmp.path()))?;
    write_chunks(store, m, &file, tmp.path(), progress)?;
    file.sync_all().map_err(mat_io(tmp.path()))?;
    drop(file);
    fsutil::rename_durable(tmp.path(), dst).map_err(mat_io(dst))?;
    tmp.disarm();
    Ok(())
}

/// Write every stored chunk of `m` into `file` (which is already `m.size`
/// long and zero), on several threads.
fn write_chunks(
    store: &ChunkStore,
    m: &Manifest,
    file: &File,
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), MaterialiseError> {
    let cs = u64::from(m.chunk_size);
    let present: Vec<usize> = (0..m.chunks.len())
        .filter(|i| m.chunks[*i].is_some())
        .collect();
    let stripes: Vec<&[usize]> = present.chunks(MATERIALISE_STRIPE).collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, MATERIALISE_THREADS);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicU64::new(0);
    let total = m.size;
    let failed = std::sync::atomic::AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let result = std::thread::scope(|s| -> Result<(), MaterialiseError> {
        let mut handles = Vec::new();
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, done, failed, stripes) = (&next, &done, &failed, &stripes);
            handles.push(s.spawn(move || -> Result<(), MaterialiseError> {
                loop {
                    if failed.load(std::sync::atomic::Ordering::Relaxed) {
                        return Ok(());
                    }
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(stripe) = stripes.get(k) else {
                        return Ok(());
                    };
                    let mut bytes = 0;
                    for &i in *stripe {
                        let Some(id) = m.chunks[i] else { continue };
                        let r = (|| {
                            let data =
                                store.read(&id)?.ok_or(MaterialiseError::MissingChunk(id))?;
                            if data.len() != m.chunk_len(i) as usize {
                                // Right hash, wrong length: the manifest is
                                // inconsistent with the chunk (cannot happen
                                // for manifests this crate built).
                                return Err(MaterialiseError::Chunks(ChunkStoreError::Corrupt {
                                    id,
                                }));
                            }
                            file.write_all_at(&data, i as u64 * cs)
                                .map_err(mat_io(path))?;
                            Ok(data.len() as u64)
                        })();
                        match r {
                            Ok(n) => bytes += n,
                            Err(e) => {
                                failed.store(true, std::sync::atomic::Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                    done.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                    let _ = tx.send(bytes);
                }
            }));
        }
        drop(tx);
        // Report progress from the calling thread (the callback is not Send).
        let mut sofar = 0u64;
        for b in rx {
            sofar += b;
            progress(sofar, total);
        }
        for h in handles {
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        }
        Ok(())
    });
    let _ = done;
    result?;
    progress(total, total);
    Ok(())
}

/// Whether `dir`'s filesystem can reflink (FICLONE): probed once per store
/// with two small temp files.
pub(crate) fn probe_reflink(dir: &Path) -> bool {
    let a = TempFile::new(dir.join(fsutil::unique_tmp_name("reflink-probe-a")));
    let b = TempFile::new(dir.join(fsutil::unique_tmp_name("reflink-probe-b")));
    let r = (|| -> io::Result<()> {
        let fa = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(a.path())?;
        fa.write_all_at(&[1u8; 4096], 0)?;
        let fb = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(b.path())?;
        rustix::fs::ioctl_ficlone(&fb, &fa)?;
        Ok(())
    })();
    r.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_skips_holes_and_zero_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let cs = 4096u32;
        f.set_len(40 * 4096 + 100).unwrap();
        f.write_all_at(&[1u8; 10], 3 * 4096 + 5).unwrap(); // chunk 3
        f.write_all_at(&[0u8; 4096], 7 * 4096).unwrap(); // chunk 7: written zeros
        f.write_all_at(&[2u8; 8192], 20 * 4096).unwrap(); // chunks 20, 21
        f.write_all_at(&[3u8; 50], 40 * 4096 + 10).unwrap(); // short last chunk
        let mut seen = Vec::new();
        let entries = scan::<()>(&f, 40 * 4096 + 100, cs, &mut |_, _| {}, &mut |i, d, id| {
            assert_eq!(ChunkId::of(d), id);
            seen.push((i, d.len()));
            Ok(())
        })
        .unwrap()
        .entries;
        assert_eq!(entries.len(), 41);
        assert_eq!(seen, vec![(3, 4096), (20, 4096), (21, 4096), (40, 100)]);
        let present: Vec<usize> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_some())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(present, vec![3, 20, 21, 40]);
        // A volume larger than the file: zero-extended.
        let entries = scan::<()>(&f, 100 * 4096, cs, &mut |_, _| {}, &mut |_, _, _| Ok(()))
            .unwrap()
            .entries;
        assert_eq!(entries.len(), 100);
        assert_eq!(entries.iter().flatten().count(), 4);
    }
}
