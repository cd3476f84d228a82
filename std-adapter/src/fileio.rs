//! [`FileIo`]: a `std::fs::File` as qcow2 storage, with qemu-img's cache
//! modes ([`CacheMode`]): the page cache or `O_DIRECT` (through aligned
//! bounce buffers, so the core's small metadata writes work unchanged),
//! `O_DSYNC`, and whether a flush syncs at all.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use qcowkit_core::{BlockRead, BlockWrite};

/// qemu-img's cache modes (`-t`): how writes reach the disk and what a
/// flush does.
///
/// | mode | page cache | each write | flush |
/// |---|---|---|---|
/// | `writeback` | yes | cached | `fdatasync` |
/// | `unsafe` | yes | cached | nothing |
/// | `none` (`off`) | no (`O_DIRECT`) | to the device | `fdatasync` |
/// | `writethrough` | yes | synchronous (`O_DSYNC`) | `fdatasync` |
/// | `directsync` | no (`O_DIRECT`) | synchronous (`O_DSYNC`) | `fdatasync` |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CacheMode {
    /// The page cache; flushes sync (qemu-img's default for most commands).
    #[default]
    Writeback,
    /// The page cache; flushes do nothing (qemu-img convert's default for
    /// its target: a killed conversion leaves an unusable target either
    /// way).
    Unsafe,
    /// `O_DIRECT`: no page cache; flushes sync.
    #[value(alias = "off")]
    None,
    /// Every write synchronous (`O_DSYNC`), through the page cache.
    Writethrough,
    /// `O_DIRECT` and every write synchronous.
    Directsync,
}

impl CacheMode {
    /// Whether the page cache is bypassed (`O_DIRECT`).
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }

    /// Whether every write is synchronous (`O_DSYNC`).
    pub fn dsync(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }

    /// Whether a flush syncs the file.
    pub fn syncs(self) -> bool {
        self != CacheMode::Unsafe
    }

    /// The `open(2)` flags of this mode for reading only (`O_DIRECT`).
    pub(crate) fn read_flags(self) -> i32 {
        if self.direct() {
            nix::libc::O_DIRECT
        } else {
            0
        }
    }

    /// The `open(2)` flags of this mode.
    pub(crate) fn flags(self) -> i32 {
        let mut f = 0;
        if self.direct() {
            f |= nix::libc::O_DIRECT;
        }
        if self.dsync() {
            f |= nix::libc::O_DSYNC;
        }
        f
    }

    /// `options` (read and write) with this mode's flags.
    pub fn open_options(self) -> FsOpenOptions {
        let mut o = FsOpenOptions::new();
        o.read(true).write(true).custom_flags(self.flags());
        o
    }
}

/// Creates `path` empty (or empties it) and opens it in cache mode
/// `cache`, as qemu-img does: created without `O_TRUNC`, truncated, closed
/// and opened again. The close after the truncation is cheap while the file
/// is empty; ext4 otherwise flushes a file truncated to nothing when it is
/// closed, which for a target rewritten in place costs the whole write-back
/// at the end.
pub fn create_empty(path: &Path, cache: CacheMode) -> io::Result<File> {
    let f = FsOpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    f.set_len(0)?;
    drop(f);
    cache.open_options().open(path)
}

/// Offsets, lengths and buffer addresses of `O_DIRECT` I/O are multiples of
/// this (4 KiB covers devices with 512-byte and 4 KiB sectors).
const ALIGN: usize = 4096;
/// Largest piece of one `O_DIRECT` transfer through the bounce buffer.
const DIRECT_PIECE: usize = 1 << 20;

/// A `std::fs::File` as qcow2 storage.
#[derive(Debug)]
pub struct FileIo {
    file: File,
    cache: CacheMode,
    /// Bounce buffer of `O_DIRECT` transfers (over-allocated by [`ALIGN`]
    /// so an aligned window fits).
    bounce: Vec<u8>,
}

impl FileIo {
    /// Wraps an open file (opened with the page cache; flushes sync).
    pub fn new(file: File) -> Self {
        FileIo::with_cache(file, CacheMode::Writeback)
    }

    /// Wraps a file opened with `cache`'s flags (see
    /// [`CacheMode::open_options`]).
    pub fn with_cache(file: File, cache: CacheMode) -> Self {
        FileIo {
            file,
            cache,
            bounce: Vec::new(),
        }
    }

    /// Opens `path` read-only.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(FileIo::new(File::open(path)?))
    }

    /// Opens `path` for reading and writing.
    pub fn open_rw(path: &Path) -> io::Result<Self> {
        FileIo::open_rw_with(path, CacheMode::Writeback)
    }

    /// Opens `path` for reading and writing in cache mode `cache`.
    pub fn open_rw_with(path: &Path, cache: CacheMode) -> io::Result<Self> {
        Ok(FileIo::with_cache(cache.open_options().open(path)?, cache))
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The cache mode.
    pub fn cache(&self) -> CacheMode {
        self.cache
    }

    /// Reads `[offset, offset + buf.len())` with `O_DIRECT`: whole aligned
    /// blocks through the bounce buffer, zeros past the end of the file.
    fn direct_read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let (start, skip, want, len) = piece(offset + done as u64, buf.len() - done);
            let w = window(&mut self.bounce, len);
            let got = read_full(&self.file, w, start)?;
            let useful = got.saturating_sub(skip).min(want);
            buf[done..done + useful].copy_from_slice(&w[skip..skip + useful]);
            buf[done + useful..done + want].fill(0);
            done += want;
        }
        Ok(())
    }

    /// Writes with `O_DIRECT`: partial blocks at either end are read, merged
    /// and written whole; the file keeps its exact length.
    fn direct_write(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        let old_len = self.file.metadata()?.len();
        let mut done = 0usize;
        while done < buf.len() {
            let (start, skip, n, len) = piece(offset + done as u64, buf.len() - done);
            let w = window(&mut self.bounce, len);
            if skip != 0 || n % ALIGN != 0 {
                // Keep the bytes of the partial blocks around the data.
                let got = read_full(&self.file, w, start)?;
                w[got..].fill(0);
            }
            w[skip..skip + n].copy_from_slice(&buf[done..done + n]);
            self.file.write_all_at(w, start)?;
            done += n;
        }
        // Whole blocks may have written past the intended end.
        let new_len = old_len.max(end);
        if new_len % ALIGN as u64 != 0 && self.file.metadata()?.len() != new_len {
            self.file.set_len(new_len)?;
        }
        Ok(())
    }
}

/// The next piece of an `O_DIRECT` transfer at `pos` with `left` bytes to
/// go: the aligned start, the bytes to skip there, the bytes of the
/// transfer in this piece, and the aligned length to read or write.
fn piece(pos: u64, left: usize) -> (u64, usize, usize, usize) {
    let start = pos - pos % ALIGN as u64;
    let skip = (pos - start) as usize;
    let n = left.min(DIRECT_PIECE - skip);
    (start, skip, n, (skip + n).div_ceil(ALIGN) * ALIGN)
}

/// An [`ALIGN`]-aligned window of `len` bytes in `bounce` (grown as needed).
fn window(bounce: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if Vec::len(bounce) < len + ALIGN {
        bounce.resize(len + ALIGN, 0);
    }
    let pad = bounce.as_ptr().align_offset(ALIGN).min(ALIGN);
    &mut bounce[pad..pad + len]
}

/// Reads into `buf` at `pos` until it is full or the file ends; returns the
/// bytes read.
fn read_full(file: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl BlockRead for FileIo {
    type Error = io::Error;

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset.checked_add(buf.len() as u64).is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "offset overflow",
            ));
        }
        if self.cache.direct() {
            return self.direct_read(offset, buf);
        }
        let got = read_full(&self.file, buf, offset)?;
        buf[got..].fill(0);
        Ok(())
    }

    fn len(&mut self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn allocation(&mut self, offset: u64, len: u64) -> io::Result<Option<(bool, u64)>> {
        use rustix::fs::{seek, SeekFrom};
        let size = self.file.metadata()?.len();
        if offset >= size {
            return Ok(Some((false, len)));
        }
        let end = offset.saturating_add(len).min(size);
        let data = match seek(&self.file, SeekFrom::Data(offset)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => size,
            Err(_) => return Ok(None),
        };
        if data > offset {
            return Ok(Some((false, data.min(end) - offset)));
        }
        let hole = match seek(&self.file, SeekFrom::Hole(offset)) {
            Ok(h) => h,
            Err(_) => return Ok(None),
        };
        Ok(Some((true, hole.min(end).max(offset + 1) - offset)))
    }

    fn allocated_size(&mut self) -> io::Result<Option<u64>> {
        Ok(Some(self.file.metadata()?.blocks() * 512))
    }
}

impl BlockWrite for FileIo {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.cache.direct() {
            return self.direct_write(offset, buf);
        }
        self.file.write_all_at(buf, offset)
    }

    fn preallocate(&mut self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        match fallocate(&self.file, FallocateFlags::empty(), offset, len) {
            Ok(()) => Ok(()),
            // File systems without fallocate: extending is the fallback.
            Err(_) => {
                let end = offset.saturating_add(len);
                if end > self.file.metadata()?.len() {
                    self.file.set_len(end)?;
                }
                Ok(())
            }
        }
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    /// Beyond the end of the file, extends it (a hole reads as zeros);
    /// inside it, `fallocate(FALLOC_FL_ZERO_RANGE)`, falling back to
    /// punching a hole and then to writing zeros.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        let file_len = self.file.metadata()?.len();
        let inside = end.min(file_len).saturating_sub(offset);
        if inside > 0 {
            let keep = FallocateFlags::KEEP_SIZE;
            let zeroed = fallocate(
                &self.file,
                FallocateFlags::ZERO_RANGE | keep,
                offset,
                inside,
            )
            .or_else(|_| {
                fallocate(
                    &self.file,
                    FallocateFlags::PUNCH_HOLE | keep,
                    offset,
                    inside,
                )
            });
            if zeroed.is_err() {
                let zeros = vec![0u8; inside.min(1 << 20) as usize];
                let mut done = 0;
                while done < inside {
                    let n = (inside - done).min(zeros.len() as u64) as usize;
                    self.write_at(offset + done, &zeros[..n])?;
                    done += n as u64;
                }
            }
        }
        if end > file_len {
            self.file.set_len(end)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.cache.syncs() {
            self.file.sync_data()
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_reads_zeros_past_end_and_reports_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [1u8, 2, 3]).unwrap();
        let mut f = FileIo::open(&p).unwrap();
        let mut buf = [9u8; 6];
        f.read_at(1, &mut buf).unwrap();
        assert_eq!(buf, [2, 3, 0, 0, 0, 0]);
        let sparse = dir.path().join("s");
        let file = File::create(&sparse).unwrap();
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[1; 4096], 1 << 19).unwrap();
        let mut s = FileIo::new(file);
        let (data, run) = s.allocation(0, 1 << 20).unwrap().unwrap();
        assert!(!data);
        assert!(run > 0 && run <= 1 << 19);
    }

    #[test]
    fn every_cache_mode_reads_back_unaligned_writes_and_keeps_the_length() {
        let dir = tempfile::tempdir().unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for mode in [
            CacheMode::Writeback,
            CacheMode::Unsafe,
            CacheMode::None,
            CacheMode::Writethrough,
            CacheMode::Directsync,
        ] {
            let p = dir.path().join(format!("{mode:?}"));
            std::fs::write(&p, []).unwrap();
            let mut f = FileIo::open_rw_with(&p, mode).unwrap();
            assert_eq!(f.cache(), mode);
            let mut model = Vec::new();
            for i in 0..40u64 {
                let at = next(3 << 20);
                let len = 1 + next(if i % 4 == 0 { 2 << 20 } else { 9000 }) as usize;
                let fill = (i as u8).wrapping_mul(37) | 1;
                f.write_at(at, &vec![fill; len]).unwrap();
                let end = at as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[at as usize..end].fill(fill);
                assert_eq!(f.len().unwrap(), model.len() as u64, "{mode:?}: length");
            }
            f.flush().unwrap();
            let mut back = vec![0u8; model.len() + 5000];
            f.read_at(0, &mut back).unwrap();
            assert!(back[..model.len()] == model[..], "{mode:?}: contents");
            assert!(
                back[model.len()..].iter().all(|b| *b == 0),
                "{mode:?}: past the end"
            );
            let at = model.len() as u64 - 3;
            let mut tail = [9u8; 7];
            f.read_at(at, &mut tail).unwrap();
            assert_eq!(&tail[..3], &model[model.len() - 3..], "{mode:?}");
            assert_eq!(&tail[3..], &[0; 4], "{mode:?}");
            assert_eq!(std::fs::read(&p).unwrap(), model, "{mode:?}: the file");
        }
    }

    #[test]
    fn zeroes_inside_the_file_and_beyond_it() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [CacheMode::Writeback, CacheMode::None] {
            let p = dir.path().join(format!("z{mode:?}"));
            std::fs::write(&p, vec![7u8; 100_000]).unwrap();
            let mut f = FileIo::open_rw_with(&p, mode).unwrap();
            f.write_zeroes(5000, 70_000).unwrap();
            f.write_zeroes(90_000, 30_000).unwrap();
            let mut want = vec![7u8; 120_000];
            want[5000..75_000].fill(0);
            want[90_000..].fill(0);
            assert_eq!(std::fs::read(&p).unwrap(), want, "{mode:?}");
        }
    }
}
