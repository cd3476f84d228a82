//! # qcowkit-std
//!
//! [`qcowkit_core`] on `std::fs` files: [`FileIo`] (positional reads and
//! writes with `pread`/`pwrite`, holes reported with `SEEK_DATA`),
//! [`FsOpener`] (resolves backing and data file names relative to the
//! naming image's directory, as QEMU does for backing files), and [`Disk`],
//! a qcow2 or raw image opened by path. The `qcow2` and `qcow2-info`
//! binaries are built on these, and so is [`nbd`], the NBD server of
//! `qcow2 serve`.
//!
//! ```no_run
//! use qcowkit_std::{Disk, DiskOptions};
//!
//! let mut disk = Disk::open("vm.qcow2".as_ref(), &DiskOptions::default())?;
//! let mut mbr = [0u8; 512];
//! disk.read_at(0, &mut mbr)?;
//! # Ok::<(), qcowkit_std::DiskError>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fs::OpenOptions as FsOpenOptions;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use lock::Access;
pub use qcowkit_core as core;
use qcowkit_core::backing::resolve_name;
use qcowkit_core::copy::{ChunkRead, RawDisk};
use qcowkit_core::{
    map::raw_status, BlockRead, BlockStatus, FileRole, Image, OpenOptions, Opened, Opener,
    WritableImage,
};
use qcowkit_core::{Chunk, Codec};

pub mod cli;
mod codec;
mod fileio;
pub mod lock;
pub mod nbd;
mod readahead;

pub use codec::NativeCodec;
pub use fileio::{create_empty, CacheMode, FileIo};
pub use readahead::DEFAULT_WINDOW as DEFAULT_READ_AHEAD;

/// Which files named by an image (backing files, external data files) an
/// opener opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Follow {
    /// Any name, as QEMU does. The default: images made or kept by their
    /// owner name their backing files by absolute or relative paths (as
    /// qemu-img writes them), and qemu-img follows them all.
    #[default]
    Any,
    /// Only relative names that stay inside the naming image's directory
    /// (no absolute names, no `..` or symbolic-link escapes): for images
    /// from elsewhere that bring their chain with them.
    Inside,
    /// None: for untrusted images (`--no-follow`).
    None,
}

/// Checks that `policy` allows opening `name`, named by the image
/// `parent` as its `role` file; returns the resolved path.
pub fn check_follow(
    policy: Follow,
    parent: &str,
    name: &str,
    role: FileRole,
) -> io::Result<PathBuf> {
    let resolved = resolve_name(parent, name);
    let what = match role {
        FileRole::Backing => "backing file",
        FileRole::DataFile => "data file",
    };
    let refuse = |why: &str| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the image names {what} '{resolved}', and {why}"),
        )
    };
    match policy {
        Follow::Any => {}
        Follow::None => return Err(refuse("following files named by images is disabled")),
        Follow::Inside => {
            if name.starts_with('/') {
                return Err(refuse(
                    "only relative names inside its directory are followed",
                ));
            }
            let dir = match Path::new(parent).parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let dir = std::fs::canonicalize(dir)?;
            let target = std::fs::canonicalize(&resolved)?;
            if !target.starts_with(&dir) {
                return Err(refuse("it is outside the image's directory"));
            }
        }
    }
    if let Ok(m) = std::fs::metadata(&resolved) {
        if !m.file_type().is_file() {
            return Err(not_regular(Path::new(&resolved)));
        }
    }
    Ok(PathBuf::from(resolved))
}

/// Opens an image given by the user without blocking: regular files and
/// block devices are images; a FIFO or socket is refused.
fn open_top(path: &Path, cache: CacheMode) -> io::Result<FileIo> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = FsOpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | cache.read_flags())
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_fifo() || kind.is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{}' is a FIFO or socket, not an image", path.display()),
        ));
    }
    Ok(FileIo::with_cache(file, cache))
}

/// Opens a file an image names without blocking (a FIFO would block a
/// plain open) and refuses anything but a regular file.
fn open_named(path: &Path, write: bool, cache: CacheMode) -> io::Result<FileIo> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = if write {
        cache.flags()
    } else {
        cache.read_flags()
    };
    let file = FsOpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nix::libc::O_NONBLOCK | flags)
        .open(path)?;
    if !file.metadata()?.file_type().is_file() {
        return Err(not_regular(path));
    }
    Ok(FileIo::with_cache(file, cache))
}

fn not_regular(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "'{}' is not a regular file (a device, FIFO or socket named by an image is refused)",
            path.display()
        ),
    )
}

/// Opens backing and data files on the local file system.
#[derive(Debug, Clone, Default)]
pub struct FsOpener {
    /// Open external data files read-write (backing files are always
    /// opened read-only).
    pub writable: bool,
    /// Which named files to open (default: any, like QEMU).
    pub follow: Follow,
    /// Take no locks (qemu-img's `-U`): read files other processes may be
    /// writing.
    pub force_share: bool,
    /// Cache mode of the files opened (as qemu-img's `-t`/`-T` apply to a
    /// whole chain).
    pub cache: CacheMode,
    /// Identities of the files of this chain opened so far (the top image
    /// first): a file met again is handed back unlocked, so that the core
    /// reports the loop instead of a lock conflict with ourselves.
    pub opened: Vec<String>,
}

impl Opener<FileIo> for FsOpener {
    fn open(&mut self, parent: &str, name: &str, role: FileRole) -> io::Result<Opened<FileIo>> {
        let path = check_follow(self.follow, parent, name, role)?;
        let write = self.writable && role == FileRole::DataFile;
        let io = open_named(&path, write, self.cache)?;
        let identity = identity_of(&path)?;
        if !self.force_share && !self.opened.contains(&identity) {
            let access = if write { Access::Write } else { Access::Read };
            lock::lock(io.file(), access)?;
        }
        self.opened.push(identity.clone());
        Ok(Opened {
            io,
            resolved: path.to_string_lossy().into_owned(),
            identity,
        })
    }
}

/// A stable identity for a file: its device and inode.
pub fn identity_of(path: &Path) -> io::Result<String> {
    let m = std::fs::metadata(path)?;
    Ok(format!("{}:{}", m.dev(), m.ino()))
}

/// Image formats the tools read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// qcow2.
    Qcow2,
    /// A raw disk image.
    Raw,
}

impl Format {
    /// Parses a `-f` argument.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "qcow2" => Some(Format::Qcow2),
            "raw" => Some(Format::Raw),
            _ => None,
        }
    }

    /// The qemu-img name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// Errors of [`Disk`].
pub type DiskError = qcowkit_core::Error<io::Error>;

/// Options for [`Disk::open`].
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// Format; `None` probes (qcow2 magic, else raw).
    pub format: Option<Format>,
    /// Options passed to the qcow2 core.
    pub qcow2: OpenOptions,
    /// Which files named by the image to open.
    pub follow: Follow,
    /// Take no locks (qemu-img's `-U`): inspect images other processes
    /// may be writing.
    pub force_share: bool,
    /// Bytes [`Disk::read_at`] reads ahead of a sequential walk in small
    /// requests (at most half this size), decoding a window's compressed
    /// clusters together on every core; random and large reads are not
    /// affected. 0 turns it off. Default [`DEFAULT_READ_AHEAD`] (4 MiB,
    /// allocated on first use).
    pub read_ahead: usize,
}

impl Default for DiskOptions {
    fn default() -> DiskOptions {
        DiskOptions {
            format: None,
            qcow2: OpenOptions::default(),
            follow: Follow::default(),
            force_share: false,
            read_ahead: DEFAULT_READ_AHEAD,
        }
    }
}

/// A disk image opened by path: qcow2 (with its chain) or raw, read
/// through a read-ahead window ([`DiskOptions::read_ahead`]).
#[derive(Debug)]
pub struct Disk {
    image: DiskImage,
    ahead: readahead::ReadAhead,
}

/// What a [`Disk`] opened.
#[derive(Debug)]
pub enum DiskImage {
    /// A qcow2 image.
    Qcow2(Box<Image<FileIo>>),
    /// A raw image.
    Raw(RawDisk<FileIo>),
}

impl Disk {
    /// Opens `path` with `opts`, following backing files relative to it.
    pub fn open(path: &Path, opts: &DiskOptions) -> Result<Disk, DiskError> {
        Disk::open_with_cache(path, opts, CacheMode::Writeback)
    }

    /// [`Disk::open`] with every file of the chain read in cache mode
    /// `cache` (`none`: `O_DIRECT`).
    pub fn open_with_cache(
        path: &Path,
        opts: &DiskOptions,
        cache: CacheMode,
    ) -> Result<Disk, DiskError> {
        let name = path.to_string_lossy().into_owned();
        let open_err = |source| qcowkit_core::Error::Open {
            name: name.clone(),
            source,
        };
        let mut io = open_top(path, cache).map_err(open_err)?;
        if !opts.force_share {
            lock::lock(io.file(), Access::Read).map_err(open_err)?;
        }
        let format = match opts.format {
            Some(f) => f,
            None => probe(&mut io).map_err(qcowkit_core::Error::Io)?,
        };
        let ahead = readahead::ReadAhead::new(opts.read_ahead);
        let image = match format {
            Format::Raw => DiskImage::Raw(RawDisk::new(io)?),
            Format::Qcow2 => {
                let identity = identity_of(path).map_err(open_err)?;
                let mut opener = FsOpener {
                    writable: false,
                    follow: opts.follow,
                    force_share: opts.force_share,
                    cache,
                    opened: vec![identity.clone()],
                };
                let mut img = Image::open_with(io, &name, &identity, &mut opener, &opts.qcow2)?;
                // Library reads decode with the native codecs, on every core.
                img.set_codec(Box::new(NativeCodec::all_cores()));
                DiskImage::Qcow2(Box::new(img))
            }
        };
        Ok(Disk { image, ahead })
    }

    /// The image opened (qcow2 or raw), for what [`Disk`] does not wrap.
    pub fn image(&self) -> &DiskImage {
        &self.image
    }

    /// The image opened, mutably (reads through it bypass the window).
    pub fn image_mut(&mut self) -> &mut DiskImage {
        &mut self.image
    }

    /// The image opened, without the read-ahead window.
    pub fn into_image(self) -> DiskImage {
        self.image
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match &self.image {
            DiskImage::Qcow2(img) => img.size(),
            DiskImage::Raw(raw) => raw.size,
        }
    }

    /// The format.
    pub fn format(&self) -> Format {
        match self.image {
            DiskImage::Qcow2(_) => Format::Qcow2,
            DiskImage::Raw(_) => Format::Raw,
        }
    }

    /// Reads guest bytes (through the read-ahead window when the reads
    /// walk the disk in small steps).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let size = self.size();
        let image = &mut self.image;
        self.ahead.read(offset, buf, size, |o, b| match image {
            DiskImage::Qcow2(img) => img.read_at(o, b),
            DiskImage::Raw(raw) => raw.io.read_at(o, b).map_err(qcowkit_core::Error::Io),
        })
    }

    /// Block status (see [`Image::block_status`]).
    pub fn block_status(&mut self, offset: u64, len: u64) -> Result<(BlockStatus, u64), DiskError> {
        match &mut self.image {
            DiskImage::Qcow2(img) => img.block_status(offset, len),
            DiskImage::Raw(raw) => {
                raw_status(&mut raw.io, offset, len, 0).map_err(qcowkit_core::Error::Io)
            }
        }
    }
}

impl ChunkRead for Disk {
    type Error = DiskError;

    fn disk_size(&self) -> u64 {
        self.size()
    }

    fn read_chunk(
        &mut self,
        pos: u64,
        max: u64,
        align: u64,
        buf: &mut [u8],
        codec: &mut dyn Codec,
    ) -> Result<Chunk, DiskError> {
        match &mut self.image {
            DiskImage::Qcow2(img) => img.read_chunk(pos, max, align, buf, codec),
            DiskImage::Raw(raw) => raw.read_chunk(pos, max, align, buf, codec),
        }
    }
}

/// Creates a new qcow2 image at `path` (replacing any file there), with its
/// external data file when the options name one, preallocated as asked, and
/// returns it open for writing. Backing and data file names are resolved
/// relative to `path`'s directory.
pub fn create_qcow2(
    path: &Path,
    opts: &qcowkit_core::CreateOptions,
) -> Result<WritableImage<FileIo>, DiskError> {
    create_qcow2_with(path, opts, CacheMode::Writeback)
}

/// [`create_qcow2`] with the image file (not its data file) written in
/// cache mode `cache`.
pub fn create_qcow2_with(
    path: &Path,
    opts: &qcowkit_core::CreateOptions,
    cache: CacheMode,
) -> Result<WritableImage<FileIo>, DiskError> {
    use qcowkit_core::Error;
    let name = path.to_string_lossy().into_owned();
    let open_err = |source| Error::Open {
        name: name.clone(),
        source,
    };
    opts.validate().map_err(Error::Format)?;
    if let Some(df) = &opts.data_file {
        let df_path = PathBuf::from(resolve_name(&name, df));
        let f = create_empty(&df_path, CacheMode::Writeback).map_err(|source| Error::Open {
            name: df.clone(),
            source,
        })?;
        if opts.data_file_raw {
            f.set_len(opts.rounded_size().unwrap_or(0))
                .map_err(Error::Io)?;
        }
    }
    let file = create_empty(path, cache).map_err(open_err)?;
    let mut io = FileIo::with_cache(file, cache);
    lock::lock(io.file(), Access::Write).map_err(open_err)?;
    let mut rng_failed = None;
    qcowkit_core::create::format_with_random(&mut io, opts, &mut |b| {
        if let Err(e) = getrandom::fill(b) {
            rng_failed = Some(e);
        }
    })?;
    if let Some(e) = rng_failed {
        return Err(Error::Io(io::Error::other(format!(
            "no random bytes for the encryption keys: {e}"
        ))));
    }
    let identity = identity_of(path).map_err(open_err)?;
    let mut opener = FsOpener {
        writable: true,
        follow: Follow::Any,
        force_share: false,
        cache: CacheMode::Writeback,
        opened: vec![identity.clone()],
    };
    let open_opts = OpenOptions {
        passphrase: opts.encrypt.as_ref().map(|e| e.passphrase.clone()),
        ..OpenOptions::default()
    };
    let mut img = WritableImage::open_with(io, &name, &identity, &mut opener, &open_opts)?;
    img.preallocate(opts.preallocation)?;
    Ok(img)
}

/// PBKDF2 iterations for a new LUKS header that take about `iter_time_ms`
/// milliseconds on this machine to check a passphrase (QEMU's
/// `encrypt.iter-time`): (key slot, master key digest), measured with the
/// options' hash and key length, at least 1000 each (QEMU's floor; the
/// digest gets an eighth of the time, as QEMU gives it).
pub fn luks_iterations(o: &qcowkit_core::luks::LuksOptions, iter_time_ms: u64) -> (u32, u32) {
    let rate = |out_len: usize| {
        let mut out = vec![0u8; out_len];
        let mut rounds = 1u32 << 12;
        loop {
            let t = std::time::Instant::now();
            o.hash.pbkdf2(b"benchmark", &[0u8; 32], rounds, &mut out);
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if ms > 50.0 || rounds >= 1 << 26 {
                return f64::from(rounds) / ms.max(0.001);
            }
            rounds *= 4;
        }
    };
    let per_ms_slot = rate(o.master_key_len() as usize);
    let per_ms_mk = rate(20);
    let clamp = |x: f64| x.clamp(1000.0, f64::from(u32::MAX)) as u32;
    (
        clamp(per_ms_slot * iter_time_ms as f64),
        clamp(per_ms_mk * iter_time_ms as f64 / 8.0),
    )
}

/// Opens an existing qcow2 image for writing (its data file writable too),
/// following any file it names.
pub fn open_qcow2_rw(path: &Path, opts: &OpenOptions) -> Result<WritableImage<FileIo>, DiskError> {
    open_qcow2_rw_following(path, opts, Follow::Any)
}

/// [`open_qcow2_rw`], opening the files the image names as `follow` allows.
pub fn open_qcow2_rw_following(
    path: &Path,
    opts: &OpenOptions,
    follow: Follow,
) -> Result<WritableImage<FileIo>, DiskError> {
    open_qcow2_rw_with(path, opts, follow, CacheMode::Writeback)
}

/// [`open_qcow2_rw_following`] with the image file in cache mode `cache`.
pub fn open_qcow2_rw_with(
    path: &Path,
    opts: &OpenOptions,
    follow: Follow,
    cache: CacheMode,
) -> Result<WritableImage<FileIo>, DiskError> {
    open_qcow2_rw_beside(path, opts, follow, cache, &[])
}

/// [`open_qcow2_rw_with`] for a process that already holds files of the
/// chain open under their own locks (e.g. a base image open for writing,
/// `qemu-img commit`): the files whose [`identity_of`] is in `held` are
/// opened without locking them again (which would conflict with the
/// process's own lock).
pub fn open_qcow2_rw_beside(
    path: &Path,
    opts: &OpenOptions,
    follow: Follow,
    cache: CacheMode,
    held: &[String],
) -> Result<WritableImage<FileIo>, DiskError> {
    let name = path.to_string_lossy().into_owned();
    let open_err = |source| qcowkit_core::Error::Open {
        name: name.clone(),
        source,
    };
    let io = FileIo::open_rw_with(path, cache).map_err(open_err)?;
    lock::lock(io.file(), Access::Write).map_err(open_err)?;
    let identity = identity_of(path).map_err(open_err)?;
    let mut opener = FsOpener {
        writable: true,
        follow,
        force_share: false,
        cache,
        opened: held.iter().cloned().chain([identity.clone()]).collect(),
    };
    let mut img = WritableImage::open_with(io, &name, &identity, &mut opener, opts)?;
    img.set_codec(Box::new(NativeCodec::all_cores()));
    Ok(img)
}

/// Opens the qcow2 image at `path` for [`WritableImage::repair`]
/// (`qemu-img check -r`): read-write and locked, in check mode (a corrupt
/// or dirty image opens), without its backing or data files (a repair
/// touches neither).
pub fn open_qcow2_for_repair(path: &Path) -> Result<WritableImage<FileIo>, DiskError> {
    let name = path.to_string_lossy().into_owned();
    let open_err = |source| qcowkit_core::Error::Open {
        name: name.clone(),
        source,
    };
    let io = FileIo::open_rw_with(path, CacheMode::Writeback).map_err(open_err)?;
    lock::lock(io.file(), Access::Write).map_err(open_err)?;
    let opts = OpenOptions {
        no_backing: true,
        no_data_file: true,
        check_mode: true,
        ..OpenOptions::default()
    };
    WritableImage::for_repair(Image::open(io, &opts)?)
}

/// Detects the format from the first bytes.
pub fn probe(io: &mut FileIo) -> io::Result<Format> {
    let mut magic = [0u8; 4];
    io.read_at(0, &mut magic)?;
    Ok(if qcowkit_core::header::Header::has_magic(&magic) {
        Format::Qcow2
    } else {
        Format::Raw
    })
}
