//! The pack being appended to, and how its bytes reach the disk.
//!
//! Appends go to an in-memory buffer ([`PackBuf`]) that always starts at a
//! file offset aligned to [`ALIGN`]. A flush writes it in one of two ways:
//! - *cached* (the default): one buffered `pwrite` of the whole buffer;
//!   the bytes stay in the page cache, where a push reading them back
//!   soon (the owner replicating a fresh snapshot) finds them;
//! - *uncached*, for bytes nobody will read soon (a replica receiving a
//!   push): the aligned part goes straight from the buffer to the disk
//!   (`O_DIRECT`), without a page-cache copy, and only the last partial
//!   block (under 4 KiB) through the page cache when a sync needs every
//!   byte in the file. The same buffer memory carries the whole transfer:
//!   on a virtual machine every fresh page-cache page can cost a fault in
//!   the host, and that, not hashing, was most of a replica's CPU.
//!
//! Either way the aligned prefix written leaves the buffer and the partial
//! block stays (rewritten by the next flush), so the buffer stays aligned.
//! Bytes between `buf_start` and `written` are both in the file and in the
//! buffer; reads take them from the buffer. Filesystems without
//! `O_DIRECT` (tmpfs) fall back to cached writes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::pack;

/// Alignment of direct writes (offset, length and memory): the largest
/// logical block size of common disks.
pub(super) const ALIGN: usize = 4096;

/// An append buffer whose first byte is [`ALIGN`]-aligned in memory.
pub(super) struct PackBuf {
    raw: Vec<u8>,
    /// Offset of the aligned start in `raw`.
    off: usize,
    len: usize,
}

impl PackBuf {
    pub(super) fn with_capacity(cap: usize) -> Self {
        let raw = vec![0u8; cap + ALIGN];
        let off = raw.as_ptr().align_offset(ALIGN);
        Self { raw, off, len: 0 }
    }

    fn capacity(&self) -> usize {
        self.raw.len() - self.off
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }

    pub(super) fn get(&self, range: std::ops::Range<usize>) -> Option<&[u8]> {
        self.as_slice().get(range)
    }

    pub(super) fn extend_from_slice(&mut self, data: &[u8]) {
        if self.len + data.len() > self.capacity() {
            let mut bigger = Self::with_capacity((self.len + data.len()).max(self.capacity() * 2));
            bigger.extend_from_slice(self.as_slice());
            *self = bigger;
        }
        let at = self.off + self.len;
        self.raw[at..at + data.len()].copy_from_slice(data);
        self.len += data.len();
    }

    /// Drop the first `n` bytes.
    fn drain_front(&mut self, n: usize) {
        let n = n.min(self.len);
        self.raw
            .copy_within(self.off + n..self.off + self.len, self.off);
        self.len -= n;
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

/// The pack being appended to.
pub(super) struct Active {
    pub(super) no: u32,
    pub(super) file: Arc<File>,
    /// The same file opened for direct writes, where the filesystem allows.
    direct: Option<File>,
    pub(super) path: PathBuf,
    /// File offset of the buffer's first byte (a multiple of [`ALIGN`]).
    pub(super) buf_start: u64,
    /// Bytes of the file handed to the kernel (at least `buf_start`).
    pub(super) written: u64,
    pub(super) buf: PackBuf,
}

/// How much a flush must write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flush {
    /// Make room in the buffer: direct writes may leave the last partial
    /// block buffered only.
    Room,
    /// Every buffered byte into the file (a sync, a seal).
    All,
}

impl Active {
    /// Continue appending to an existing pack file of `len` bytes, reusing
    /// `buf`'s memory.
    pub(super) fn resume(
        no: u32,
        file: File,
        path: PathBuf,
        len: u64,
        mut buf: PackBuf,
    ) -> io::Result<Self> {
        // The buffer starts at the block holding the end of the file.
        let buf_start = len - len % ALIGN as u64;
        let mut head = vec![0u8; (len - buf_start) as usize];
        file.read_exact_at(&mut head, buf_start)?;
        buf.clear();
        buf.extend_from_slice(&head);
        Ok(Self {
            no,
            direct: open_direct(&path),
            file: Arc::new(file),
            path,
            buf_start,
            written: len,
            buf,
        })
    }

    /// Create pack `no` with its header, reusing `buf`'s memory.
    pub(super) fn create(packs_dir: &Path, no: u32, buf: PackBuf) -> io::Result<Self> {
        let path = packs_dir.join(pack::pack_file_name(no));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let header = pack::pack_header(no);
        file.write_all_at(&header, 0)?;
        Self::resume(no, file, path, header.len() as u64, buf)
    }

    /// The file offset one past the last appended byte.
    pub(super) fn end(&self) -> u64 {
        self.buf_start + self.buf.len() as u64
    }

    /// Give up the buffer (to the next active pack).
    pub(super) fn take_buf(&mut self) -> PackBuf {
        std::mem::replace(&mut self.buf, PackBuf::with_capacity(0))
    }

    /// Hand buffered bytes to the kernel (see the module doc). On failure
    /// (a full disk) the bytes not written stay buffered and nothing is
    /// lost.
    pub(super) fn flush(&mut self, how: Flush, uncached: bool) -> io::Result<()> {
        let aligned = self.buf.len() - self.buf.len() % ALIGN;
        // Bytes of the buffer now in the file, from its start.
        let mut done = 0usize;
        let mut result = Ok(());
        if uncached && aligned > 0 {
            if let Some(d) = &self.direct {
                match write_all_at(d, &self.buf.as_slice()[..aligned], self.buf_start) {
                    (n, Ok(())) => done = n,
                    (n, Err(e))
                        if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
                    {
                        // The filesystem refuses direct writes after all:
                        // write through the page cache from now on.
                        tracing::debug!(path = %self.path.display(), "direct writes refused; using the page cache");
                        self.direct = None;
                        done = n;
                    }
                    (n, Err(e)) => {
                        done = n;
                        result = Err(e);
                    }
                }
            }
        }
        let direct_done = self.direct.is_some() && uncached && result.is_ok();
        if result.is_ok() && (!direct_done || how == Flush::All) && done < self.buf.len() {
            let (n, r) = write_all_at(
                &self.file,
                &self.buf.as_slice()[done..],
                self.buf_start + done as u64,
            );
            done += n;
            result = r;
        }
        self.wrote(done);
        result
    }

    /// The buffer's first `done` bytes are in the file: the aligned part of
    /// them leaves the buffer.
    fn wrote(&mut self, done: usize) {
        self.written = self.written.max(self.buf_start + done as u64);
        let drained = done - done % ALIGN;
        self.buf.drain_front(drained);
        self.buf_start += drained as u64;
    }

    /// What a write cut short (a full disk) leaves: the buffer's first `n`
    /// bytes in the file.
    #[cfg(test)]
    pub(super) fn write_prefix(&mut self, n: usize) {
        let (done, r) = write_all_at(&self.file, &self.buf.as_slice()[..n], self.buf_start);
        r.expect("write");
        self.wrote(done);
    }
}

/// `pwrite` until all of `data` is written or an error; bytes written.
fn write_all_at(f: &File, data: &[u8], at: u64) -> (usize, io::Result<()>) {
    let mut done = 0usize;
    while done < data.len() {
        match f.write_at(&data[done..], at + done as u64) {
            Ok(0) => return (done, Err(io::Error::from(io::ErrorKind::WriteZero))),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (done, Err(e)),
        }
    }
    (done, Ok(()))
}

/// The pack opened for direct writes, or `None` where that is refused.
fn open_direct(path: &Path) -> Option<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_keep_the_buffer_aligned_and_the_file_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a =
            Active::create(dir.path(), 1, PackBuf::with_capacity(64 << 10)).expect("create");
        let mut expect = pack::pack_header(1).to_vec();
        let mut x = 7u8;
        for round in 0..40usize {
            let n = 1 + (round * 7919) % 20_000;
            let data: Vec<u8> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(31).wrapping_add(17);
                    x
                })
                .collect();
            a.buf.extend_from_slice(&data);
            expect.extend_from_slice(&data);
            let how = if round % 3 == 0 {
                Flush::All
            } else {
                Flush::Room
            };
            a.flush(how, round % 2 == 0).expect("flush");
            assert_eq!(a.buf_start % ALIGN as u64, 0);
            assert_eq!(a.buf.as_slice().as_ptr().align_offset(ALIGN), 0);
            assert_eq!(a.end(), expect.len() as u64);
            // What the buffer holds matches the bytes at its offset.
            assert_eq!(a.buf.as_slice(), &expect[a.buf_start as usize..]);
            if how == Flush::All {
                assert_eq!(a.written, expect.len() as u64);
                assert_eq!(std::fs::read(&a.path).expect("read"), expect);
            }
        }
        a.flush(Flush::All, true).expect("flush");
        assert_eq!(std::fs::read(&a.path).expect("read"), expect);
        // Resuming the file continues where it ended.
        let len = expect.len() as u64;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&a.path)
            .expect("open");
        let path = a.path.clone();
        let mut b = Active::resume(1, f, path, len, a.take_buf()).expect("resume");
        b.buf.extend_from_slice(b"tail");
        expect.extend_from_slice(b"tail");
        b.flush(Flush::All, true).expect("flush");
        assert_eq!(std::fs::read(&b.path).expect("read"), expect);
    }
}
