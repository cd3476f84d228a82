//! What an NBD export serves: an image opened by path (qcow2 through the
//! core, or raw), and the operations the protocol's commands become.
//!
//! Writes go through one [`WritableImage`] behind a mutex, so they stay
//! serialised through the core's write path (its crash-safe flush order
//! and overlap checks). A read-only export keeps a small pool of read
//! handles, each with its own caches, so reads run in parallel.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use qcowkit_core::{BlockRead, BlockStatus, BlockWrite, WritableImage};

use super::proto;
use crate::{Disk, DiskError, FileIo};

/// What `NBD_CMD_TRIM` does (qemu-nbd's `--discard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Discard {
    /// Trims are accepted and do nothing (qemu-nbd's default).
    #[default]
    Ignore,
    /// Trims free the clusters (reading as zeros afterwards).
    Unmap,
}

/// What writes of all-zero data become (qemu-nbd's `--detect-zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Written as data.
    #[default]
    Off,
    /// Written as zeroes (zero clusters where whole clusters are covered).
    On,
    /// As `On`, freeing the clusters when trims unmap (`--discard=unmap`).
    Unmap,
}

/// How an export is offered.
#[derive(Debug, Clone, Default)]
pub struct ExportConfig {
    /// The export's name (`-x`).
    pub name: String,
    /// Its description (`-D`).
    pub description: Option<String>,
    /// What trims do.
    pub discard: Discard,
    /// What writes of zeros become.
    pub detect_zeroes: DetectZeroes,
    /// Offer QEMU's `qemu:allocation-depth` context (`-A`).
    pub allocation_depth: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`.
    pub multi_conn: bool,
    /// Persistent bitmaps offered as `qemu:dirty-bitmap:NAME` (`-B`).
    pub bitmaps: Vec<String>,
}

/// The image behind an export.
pub enum Backend {
    /// Read-only: a pool of handles on the same image.
    ReadOnly(Vec<Disk>),
    /// A qcow2 image open for writing.
    Qcow2(Box<WritableImage<FileIo>>),
    /// A raw file open for writing, and its size.
    Raw(FileIo, u64),
}

enum Store {
    Pool {
        /// The free handles, and how many requests wait for one.
        free: Mutex<(Vec<Disk>, usize)>,
        returned: Condvar,
    },
    Qcow2(Mutex<Box<WritableImage<FileIo>>>),
    Raw(Mutex<FileIo>),
}

/// An error of an export operation: the NBD error number and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    /// `NBD_E*` (an errno value).
    pub errno: u32,
    /// What went wrong, for structured error replies.
    pub message: String,
}

impl OpError {
    /// An error with `errno` and `message`.
    pub fn new(errno: u32, message: impl Into<String>) -> OpError {
        OpError {
            errno,
            message: message.into(),
        }
    }
}

fn io_errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(28) => proto::ENOSPC,
        Some(1 | 13 | 30) => proto::EPERM,
        _ => proto::EIO,
    }
}

impl From<DiskError> for OpError {
    fn from(e: DiskError) -> OpError {
        let errno = match &e {
            qcowkit_core::Error::OutOfBounds { .. } => proto::EINVAL,
            qcowkit_core::Error::Io(io) => io_errno(io),
            qcowkit_core::Error::ReadOnly(_) => proto::EPERM,
            qcowkit_core::Error::OutOfMemory { .. } => proto::ENOMEM,
            _ => proto::EIO,
        };
        OpError::new(errno, e.to_string())
    }
}

impl From<io::Error> for OpError {
    fn from(e: io::Error) -> OpError {
        OpError::new(io_errno(&e), e.to_string())
    }
}

/// One extent of block status: a length and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes.
    pub len: u64,
    /// Not allocated (`NBD_STATE_HOLE`): no data in any layer.
    pub hole: bool,
    /// Reads as zeros (`NBD_STATE_ZERO`).
    pub zero: bool,
    /// The backing chain layer defining it, 1 for the image itself; 0
    /// when no layer does (QEMU's `qemu:allocation-depth`).
    pub depth: u32,
}

impl Extent {
    fn of(s: &BlockStatus, len: u64) -> Extent {
        Extent {
            len,
            hole: !s.data,
            zero: s.zero,
            depth: if s.present { s.depth + 1 } else { 0 },
        }
    }

    /// `base:allocation`'s flags.
    pub fn flags(&self) -> u32 {
        (if self.hole { proto::STATE_HOLE } else { 0 })
            | (if self.zero { proto::STATE_ZERO } else { 0 })
    }
}

/// An image served over NBD.
pub struct Export {
    config: ExportConfig,
    size: u64,
    preferred_block: u32,
    read_only: bool,
    store: Store,
    /// Set at shutdown: requests still arriving get `ESHUTDOWN`.
    closing: AtomicBool,
}

/// The largest request the server takes (`NBD_INFO_BLOCK_SIZE`'s maximum,
/// as qemu-nbd's): 32 MiB.
pub const MAX_REQUEST: u32 = 32 << 20;

impl Export {
    /// An export of `backend` offered as `config` says.
    pub fn new(config: ExportConfig, backend: Backend) -> Result<Export, String> {
        let (size, cluster, read_only, store) = match backend {
            Backend::ReadOnly(disks) => {
                let first = disks.first().ok_or("an export needs an image")?;
                let cluster = match first.image() {
                    crate::DiskImage::Qcow2(img) => img.cluster_size(),
                    crate::DiskImage::Raw(_) => 4096,
                };
                let size = first.size();
                let store = Store::Pool {
                    free: Mutex::new((disks, 0)),
                    returned: Condvar::new(),
                };
                (size, cluster, true, store)
            }
            Backend::Qcow2(img) => {
                let (size, cluster) = (img.size(), img.cluster_size());
                (size, cluster, false, Store::Qcow2(Mutex::new(img)))
            }
            Backend::Raw(io, size) => (size, 4096, false, Store::Raw(Mutex::new(io))),
        };
        let preferred_block = cluster.clamp(4096, u64::from(MAX_REQUEST)) as u32;
        Ok(Export {
            config,
            size,
            preferred_block,
            read_only,
            store,
            closing: AtomicBool::new(false),
        })
    }

    /// How the export is offered.
    pub fn config(&self) -> &ExportConfig {
        &self.config
    }

    /// The guest size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the export refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Block size constraints: minimum, preferred, maximum.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        (1, self.preferred_block, MAX_REQUEST)
    }

    /// The transmission flags of this export.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = proto::TF_HAS_FLAGS | proto::TF_SEND_FLUSH | proto::TF_SEND_DF;
        f |= proto::TF_SEND_CACHE;
        if self.read_only {
            f |= proto::TF_READ_ONLY;
        } else {
            f |= proto::TF_SEND_FUA
                | proto::TF_SEND_TRIM
                | proto::TF_SEND_WRITE_ZEROES
                | proto::TF_SEND_FAST_ZERO;
        }
        if self.config.multi_conn {
            f |= proto::TF_CAN_MULTI_CONN;
        }
        f
    }

    /// Refuses (`EINVAL`) a range reaching past the end of the export.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<(), OpError> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(OpError::new(
                proto::EINVAL,
                format!(
                    "request of {len} bytes at offset {offset} past the end of the export ({} bytes)",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    fn writable(&self) -> Result<(), OpError> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(OpError::new(
                proto::ESHUTDOWN,
                "the server is shutting down",
            ));
        }
        if self.read_only {
            return Err(OpError::new(proto::EPERM, "the export is read-only"));
        }
        Ok(())
    }

    /// The image for one request: a handle of the pool (waiting for one
    /// when all are busy), or the writable image's lock. Held for the
    /// whole request, so a request costs one hand-over, not one per piece.
    fn handle(&self) -> Result<Handle<'_>, OpError> {
        match &self.store {
            Store::Pool { free, returned } => {
                let mut g = lock(free);
                loop {
                    if let Some(d) = g.0.pop() {
                        return Ok(Handle::Disk(Some(d), free, returned));
                    }
                    g.1 += 1;
                    g = returned.wait(g).unwrap_or_else(|p| p.into_inner());
                    g.1 -= 1;
                }
            }
            Store::Qcow2(m) => Ok(Handle::Qcow2(image_lock(m)?)),
            Store::Raw(m) => Ok(Handle::Raw(image_lock(m)?)),
        }
    }

    /// Reads guest bytes.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), OpError> {
        self.check_range(offset, buf.len() as u64)?;
        self.handle()?.read(offset, buf)
    }

    /// Reads `buf.len()` guest bytes at `offset` for a structured reply:
    /// the ranges reading as zeros (from block status, at most
    /// `max_extents` runs) are left zero in `buf` and returned as `(start
    /// in buf, length, zero)` pieces covering `buf`, the others read.
    pub fn read_sparse(
        &self,
        offset: u64,
        buf: &mut [u8],
        max_extents: usize,
    ) -> Result<Vec<(u64, u64, bool)>, OpError> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        let mut h = self.handle()?;
        let extents = h.extents(offset, len, max_extents)?;
        let mut pieces: Vec<(u64, u64, bool)> = Vec::with_capacity(extents.len() + 1);
        let mut at = 0u64;
        for e in &extents {
            pieces.push((at, e.len, e.zero));
            at += e.len;
        }
        if at < len {
            // Past the extents' limit: read as data.
            pieces.push((at, len - at, false));
        }
        for &(at, n, zero) in &pieces {
            if !zero {
                h.read(offset + at, &mut buf[at as usize..(at + n) as usize])?;
            }
        }
        Ok(pieces)
    }

    /// Block status of `[offset, offset + len)` as extents (adjacent ones
    /// with equal state merged), at most `max` of them; they may cover
    /// less than `len` when `max` is reached.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, OpError> {
        self.check_range(offset, len)?;
        self.handle()?.extents(offset, len, max)
    }

    /// The runs of `[offset, offset + len)` as the export's bitmap number
    /// `index` marks them: (length, dirty), at most `max` runs.
    pub fn dirty_runs(
        &self,
        index: usize,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<(u64, bool)>, OpError> {
        self.check_range(offset, len)?;
        let name = self
            .config
            .bitmaps
            .get(index)
            .ok_or_else(|| OpError::new(proto::EINVAL, "no such bitmap"))?;
        let mut out = Vec::new();
        match &mut self.handle()? {
            Handle::Disk(Some(d), ..) => match d.image_mut() {
                crate::DiskImage::Qcow2(img) => img.dirty_runs(name, offset, len, max, &mut out)?,
                crate::DiskImage::Raw(_) => {
                    return Err(OpError::new(proto::EINVAL, "a raw image has no bitmaps"))
                }
            },
            Handle::Qcow2(img) => img.dirty_runs(name, offset, len, max, &mut out)?,
            _ => return Err(OpError::new(proto::EINVAL, "a raw image has no bitmaps")),
        }
        Ok(out)
    }

    /// Checks that every bitmap of the configuration can be exported.
    pub fn check_bitmaps(&self) -> Result<(), String> {
        for name in &self.config.bitmaps {
            let handle = self.handle().map_err(|e| e.message)?;
            let checked = match &handle {
                Handle::Disk(Some(d), ..) => match d.image() {
                    crate::DiskImage::Qcow2(img) => img.check_bitmap(name),
                    crate::DiskImage::Raw(_) => return Err("a raw image has no bitmaps".into()),
                },
                Handle::Qcow2(img) => img.check_bitmap(name),
                _ => return Err("a raw image has no bitmaps".into()),
            };
            checked.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Writes guest bytes; with `fua`, durable before returning.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), OpError> {
        self.writable()?;
        self.check_range(offset, data.len() as u64)?;
        if self.config.detect_zeroes != DetectZeroes::Off && qcowkit_core::copy::is_zero(data) {
            let unmap = self.config.detect_zeroes == DetectZeroes::Unmap
                && self.config.discard == Discard::Unmap;
            return self.write_zeroes(offset, data.len() as u64, unmap, false, fua);
        }
        match &self.store {
            Store::Qcow2(m) => {
                let mut img = image_lock(m)?;
                img.write_at(offset, data)?;
                if fua {
                    img.flush()?;
                }
            }
            Store::Raw(m) => {
                let mut io = image_lock(m)?;
                io.write_at(offset, data)?;
                if fua {
                    io.flush()?;
                }
            }
            Store::Pool { .. } => return Err(OpError::new(proto::EPERM, "read-only")),
        }
        Ok(())
    }

    /// Makes a range read as zeros. `unmap`: its clusters may be freed
    /// (no `NBD_CMD_FLAG_NO_HOLE`); `fast`: refuse with `ENOTSUP` unless
    /// it needs no data written (`NBD_CMD_FLAG_FAST_ZERO`).
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), OpError> {
        self.writable()?;
        self.check_range(offset, len)?;
        let not_fast = || OpError::new(proto::ENOTSUP, "zeroing this range needs data written");
        match &self.store {
            Store::Qcow2(m) => {
                let mut img = image_lock(m)?;
                if fast && !img.zeroes_are_cheap(offset, len) {
                    return Err(not_fast());
                }
                img.write_zeroes_with(offset, len, unmap)?;
                if fua {
                    img.flush()?;
                }
            }
            Store::Raw(m) => {
                let mut io = image_lock(m)?;
                if unmap && self.config.discard == Discard::Unmap {
                    punch_hole(&io, offset, len).or_else(|_| io.write_zeroes(offset, len))?;
                } else {
                    io.write_zeroes(offset, len)?;
                }
                if fua {
                    io.flush()?;
                }
            }
            Store::Pool { .. } => return Err(OpError::new(proto::EPERM, "read-only")),
        }
        Ok(())
    }

    /// A trim: frees the range with `--discard=unmap`, else nothing.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), OpError> {
        self.writable()?;
        self.check_range(offset, len)?;
        if self.config.discard == Discard::Ignore {
            return Ok(());
        }
        match &self.store {
            Store::Qcow2(m) => {
                let mut img = image_lock(m)?;
                img.discard(offset, len)?;
                if fua {
                    img.flush()?;
                }
            }
            Store::Raw(m) => {
                let io = image_lock(m)?;
                // Only whole file system blocks are given back; the rest
                // keeps its data, as a trim allows.
                let _ = punch_hole(&io, offset, len);
            }
            Store::Pool { .. } => return Err(OpError::new(proto::EPERM, "read-only")),
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<(), OpError> {
        match &self.store {
            Store::Qcow2(m) => Ok(image_lock(m)?.flush()?),
            Store::Raw(m) => Ok(image_lock(m)?.flush()?),
            Store::Pool { .. } => Ok(()),
        }
    }

    /// `NBD_CMD_CACHE`: reads the range's tables and data ahead, so later
    /// reads find them cached (in the image's caches and the page cache).
    pub fn cache(&self, offset: u64, len: u64) -> Result<(), OpError> {
        self.check_range(offset, len)?;
        let mut buf = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            self.read(pos, &mut buf[..n])?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Refuses further changes and flushes (at shutdown).
    pub fn close(&self) -> Result<(), OpError> {
        self.closing.store(true, Ordering::SeqCst);
        self.flush()
    }
}

/// The image held for one request (see [`Export::handle`]).
enum Handle<'a> {
    /// A handle of a read-only export's pool, given back on drop.
    Disk(Option<Disk>, &'a Mutex<(Vec<Disk>, usize)>, &'a Condvar),
    Qcow2(MutexGuard<'a, Box<WritableImage<FileIo>>>),
    Raw(MutexGuard<'a, FileIo>),
}

impl Handle<'_> {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), OpError> {
        match self {
            Handle::Disk(Some(d), ..) => Ok(d.read_at(offset, buf)?),
            Handle::Disk(None, ..) => Err(OpError::new(proto::EIO, "no image handle")),
            Handle::Qcow2(img) => Ok(img.read_at(offset, buf)?),
            Handle::Raw(io) => Ok(io.read_at(offset, buf)?),
        }
    }

    fn status(&mut self, offset: u64, len: u64) -> Result<(BlockStatus, u64), OpError> {
        match self {
            Handle::Disk(Some(d), ..) => Ok(d.block_status(offset, len)?),
            Handle::Disk(None, ..) => Err(OpError::new(proto::EIO, "no image handle")),
            Handle::Qcow2(img) => Ok(img.block_status(offset, len)?),
            Handle::Raw(io) => Ok(qcowkit_core::map::raw_status(&mut **io, offset, len, 0)?),
        }
    }

    /// Block status as merged extents (see [`Export::extents`]).
    fn extents(&mut self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, OpError> {
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let (s, n) = self.status(pos, end - pos)?;
            if n == 0 {
                return Err(OpError::new(proto::EIO, "block status made no progress"));
            }
            let n = n.min(end - pos);
            let e = Extent::of(&s, n);
            let full = out.len() >= max;
            match out.last_mut() {
                Some(last)
                    if last.hole == e.hole && last.zero == e.zero && last.depth == e.depth =>
                {
                    last.len += n;
                }
                _ if full => break,
                _ => out.push(e),
            }
            pos += n;
        }
        Ok(out)
    }
}

impl Drop for Handle<'_> {
    fn drop(&mut self) {
        if let Handle::Disk(d, free, returned) = self {
            if let Some(d) = d.take() {
                let mut g = lock(free);
                g.0.push(d);
                if g.1 > 0 {
                    returned.notify_one();
                }
            }
        }
    }
}

fn punch_hole(io: &FileIo, offset: u64, len: u64) -> io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    fallocate(
        io.file(),
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .map_err(io::Error::from)
}

/// Locks the image of a writable export. After a panic in another holder
/// (a bug) the image's state in memory is not trusted: every later
/// request fails with `EIO` rather than write on it.
fn image_lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, OpError> {
    m.lock().map_err(|_| {
        OpError::new(
            proto::EIO,
            "the image is unusable after an internal error; nothing more is written",
        )
    })
}

/// Locks `m`, going on after a panic in another holder (the data it
/// guards is an image whose own state stays consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
