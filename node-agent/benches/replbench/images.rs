//! Test images: random volumes, thin (sparse) images, scattered 4 KiB
//! writes, clone differences. Everything is seeded, so a run is repeatable.
//! Random bytes are incompressible and never repeat, so neither side can
//! win by compression or by accidental deduplication.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Block size of the "small writes" (a page / filesystem block).
pub const BLOCK: u64 = 4096;
/// Bytes generated and written per step.
const STEP: usize = 4 << 20;

pub const MIB: u64 = 1 << 20;

/// Write `len` random bytes to a new file at `path`.
pub fn random_file(path: &Path, len: u64, seed: u64) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut buf = vec![0u8; STEP];
    let mut left = len;
    while left > 0 {
        let n = left.min(STEP as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// Where the data of a thin image lies: `extents` equal extents of random
/// data, one at the start of every `size / extents` bytes; the rest are
/// holes (read as zeros).
#[derive(Debug, Clone, Copy)]
pub struct ThinLayout {
    /// Image size.
    pub size: u64,
    /// Bytes of random data.
    pub data: u64,
    /// Number of data extents.
    pub extents: u64,
}

impl ThinLayout {
    /// The data extents as (offset, length).
    pub fn extents(&self) -> Vec<(u64, u64)> {
        let stride = self.size / self.extents;
        let len = self.data / self.extents;
        (0..self.extents).map(|k| (k * stride, len)).collect()
    }

    /// One-line description for the report.
    pub fn describe(&self) -> String {
        format!(
            "{} MiB sparse file: {} extents of {} MiB random data, one every {} MiB; the rest holes",
            self.size / MIB,
            self.extents,
            self.data / self.extents / MIB,
            self.size / self.extents / MIB
        )
    }
}

/// Create a sparse image following `layout`.
pub fn thin_image(path: &Path, layout: ThinLayout, seed: u64) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(layout.size)?;
    let mut buf = vec![0u8; STEP];
    for (off, len) in layout.extents() {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(STEP as u64) as usize;
            rng.fill_bytes(&mut buf[..n]);
            f.write_all_at(&buf[..n], off + done)?;
            done += n as u64;
        }
    }
    f.sync_all()?;
    Ok(())
}

/// Overwrite `count` distinct 4 KiB blocks, chosen uniformly over the whole
/// `size` bytes of the file (holes included), with random data. Returns the
/// block indices, sorted.
pub fn scattered_writes(
    path: &Path,
    size: u64,
    count: usize,
    seed: u64,
) -> anyhow::Result<Vec<u64>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let blocks = (size / BLOCK) as usize;
    let mut picked: Vec<u64> = rand::seq::index::sample(&mut rng, blocks, count)
        .into_iter()
        .map(|b| b as u64)
        .collect();
    picked.sort_unstable();
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut buf = [0u8; BLOCK as usize];
    for b in &picked {
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, b * BLOCK)?;
    }
    f.sync_all()?;
    Ok(picked)
}

/// How a clone differs from its base: a contiguous run of new bytes (files
/// written after cloning: packages, logs) plus scattered 4 KiB block writes
/// (filesystem metadata, config files, machine id, ssh host keys).
#[derive(Debug, Clone, Copy)]
pub struct CloneDiff {
    /// Length of the contiguous rewritten run.
    pub run: u64,
    /// Number of scattered 4 KiB writes.
    pub scattered: usize,
}

impl CloneDiff {
    /// Bytes a clone differs in.
    pub fn bytes(&self) -> u64 {
        self.run + self.scattered as u64 * BLOCK
    }
}

/// Bytes overwritten in a file, to undo them.
pub type Undo = Vec<(u64, Vec<u8>)>;

/// Apply clone `i`'s differences to the base image at `path` (of `size`
/// bytes) and return what they overwrote.
pub fn apply_clone_diff(
    path: &Path,
    size: u64,
    diff: CloneDiff,
    seed: u64,
) -> anyhow::Result<Undo> {
    let mut rng = StdRng::seed_from_u64(seed);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut undo = Undo::new();
    let mut write = |off: u64, len: u64, rng: &mut StdRng| -> anyhow::Result<()> {
        let mut old = vec![0u8; len as usize];
        f.read_exact_at(&mut old, off)?;
        let mut new = vec![0u8; len as usize];
        rng.fill_bytes(&mut new);
        f.write_all_at(&new, off)?;
        undo.push((off, old));
        Ok(())
    };
    let blocks = size / BLOCK;
    let run_blocks = diff.run.div_ceil(BLOCK);
    let start = rng.gen_range(0..blocks.saturating_sub(run_blocks).max(1));
    write(start * BLOCK, diff.run.min(size), &mut rng)?;
    for b in rand::seq::index::sample(&mut rng, blocks as usize, diff.scattered) {
        write(b as u64 * BLOCK, BLOCK, &mut rng)?;
    }
    f.sync_all()?;
    Ok(undo)
}

/// Put back what [`apply_clone_diff`] overwrote (in reverse order, so
/// overlapping writes unwind correctly).
pub fn undo(path: &Path, undo: Undo) -> anyhow::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    for (off, old) in undo.into_iter().rev() {
        f.write_all_at(&old, off)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Whether two files have the same length and bytes.
pub fn same_bytes(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (fa, fb) = (
        File::open(a).with_context(|| format!("opening {}", a.display()))?,
        File::open(b).with_context(|| format!("opening {}", b.display()))?,
    );
    let len = fa.metadata()?.len();
    if fb.metadata()?.len() != len {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; STEP], vec![0u8; STEP]);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(STEP as u64) as usize;
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}
