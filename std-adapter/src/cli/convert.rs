//! `qcow2 convert`: guest data into a sparse raw file or a new qcow2 image.

use clap::Parser;

use super::{parse_format, progress, report};
use crate::{CacheMode, Disk, FileIo, Format, NativeCodec};
use qcowkit_core::copy::{copy, CopyOptions, ImageSink, Sink};
use qcowkit_core::{BlockWrite, WritableImage};

/// Size of the copy buffer.
pub const CHUNK: u64 = 2 * 1024 * 1024;
/// Buffers in flight between the reading and the writing thread.
const IN_FLIGHT: usize = 4;

/// Arguments of `qcow2 convert`.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  qcow2 convert -O raw vm.qcow2 vm.raw\n  qcow2 convert -p -c -O qcow2 -o compression_type=zstd disk.raw vm.qcow2"
)]
pub struct Args {
    /// Source format (`qcow2` or `raw`); probed when omitted.
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Output format (`raw` or `qcow2`).
    #[arg(short = 'O', default_value = "raw")]
    pub output_format: String,
    /// Creation options of a qcow2 target (as for `create`); may repeat.
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Compress every cluster of a qcow2 target (when it gets smaller).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Backing file of a qcow2 target: only what differs from it is written.
    #[arg(short = 'B')]
    pub backing: Option<String>,
    /// Format of the `-B` backing file.
    #[arg(short = 'F')]
    pub backing_format: Option<String>,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Cache mode of the target (qemu-img's default, `unsafe`, never
    /// syncs: a conversion killed halfway leaves an unusable target either
    /// way; `writeback` syncs when done, `none` bypasses the page cache).
    #[arg(short = 't', value_enum, default_value = "unsafe")]
    pub cache: CacheMode,
    /// Accepted for qemu-img compatibility (images are opened read-only).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// L2 cache size in bytes (suffixes k, M, G).
    #[arg(long = "l2-cache-size")]
    pub l2_cache_size: Option<String>,
    /// Which files named by the image to open.
    #[command(flatten)]
    pub files: super::FollowArgs,
    /// Read the source as internal snapshot SNAPSHOT saved it: its ID or
    /// name, or `snapshot.id=ID` / `snapshot.name=NAME`.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    pub snapshot_param: Option<String>,
    /// Read the source as internal snapshot ID_OR_NAME saved it (qemu-img's
    /// older flag; like `-l`).
    #[arg(short = 's', value_name = "ID_OR_NAME")]
    pub snapshot: Option<String>,
    /// Source image.
    pub source: String,
    /// Destination file.
    pub dest: String,
}

/// Runs `qcow2 convert`.
pub fn run(a: &Args) -> u8 {
    match convert(a) {
        Ok(()) => 0,
        Err((what, why)) => {
            report(what, why);
            1
        }
    }
}

fn convert(a: &Args) -> Result<(), (String, String)> {
    let src_fmt = parse_format(&a.format).map_err(|e| ("convert".to_string(), e))?;
    let out_fmt = Format::parse(&a.output_format).ok_or((
        "convert".to_string(),
        format!("Unknown file format '{}'", a.output_format),
    ))?;
    if out_fmt == Format::Raw && (a.compress || a.backing.is_some() || !a.options.is_empty()) {
        return Err((
            "convert".into(),
            "-c, -B and -o need a qcow2 target (-O qcow2)".into(),
        ));
    }
    let opts = super::cache_options(&a.l2_cache_size).map_err(|e| ("convert".to_string(), e))?;
    let mut disk = super::open_disk_with(&a.source, src_fmt, opts, a.files.policy(), a.force_share)
        .map_err(|e| (format!("Could not open '{}'", a.source), e.to_string()))?;
    if let Some(want) = a.snapshot_param.as_deref().or(a.snapshot.as_deref()) {
        load_snapshot(&mut disk, want)?;
    }
    match out_fmt {
        Format::Raw => copy_to_raw(&mut disk, &a.dest, a.progress, a.cache),
        Format::Qcow2 => copy_to_qcow2(&mut disk, a),
    }
}

/// Switches `disk` to the internal snapshot `param` names (`ID_OR_NAME`,
/// `snapshot.id=ID`, `snapshot.name=NAME`), with qemu-img's messages.
pub(super) fn load_snapshot(disk: &mut crate::Disk, param: &str) -> Result<(), (String, String)> {
    let fail = |why: String| ("Failed to load snapshot".to_string(), why);
    let mut key = param.to_string();
    for part in param.split(',') {
        if let Some(v) = part
            .strip_prefix("snapshot.id=")
            .or_else(|| part.strip_prefix("snapshot.name="))
        {
            key = v.to_string();
        }
    }
    match disk.image_mut() {
        crate::DiskImage::Qcow2(img) => match img.load_snapshot(&key) {
            Ok(true) => Ok(()),
            Ok(false) => Err(fail("Can't find snapshot".into())),
            Err(e) => Err(fail(e.to_string())),
        },
        crate::DiskImage::Raw(_) => Err(fail("raw images have no snapshots".into())),
    }
}

/// Why a copy stopped: reading the source, or writing the target.
#[derive(Debug)]
pub enum CopyError {
    /// Reading the source failed.
    Read(crate::DiskError),
    /// Writing the target failed (the message).
    Write(String),
}

impl From<crate::DiskError> for CopyError {
    fn from(e: crate::DiskError) -> Self {
        CopyError::Read(e)
    }
}

/// A sink whose errors are writing errors (told apart from reading
/// errors), showing progress.
pub struct Writing<'a, S> {
    /// The sink.
    pub sink: S,
    /// Progress (guest offsets).
    pub pb: &'a indicatif::ProgressBar,
}

impl<S: Sink> Sink for Writing<'_, S>
where
    S::Error: std::fmt::Display,
{
    type Error = CopyError;

    fn data(&mut self, offset: u64, buf: &mut Vec<u8>, len: usize) -> Result<(), CopyError> {
        self.sink
            .data(offset, buf, len)
            .map_err(|e| CopyError::Write(e.to_string()))?;
        self.pb.set_position(offset + len as u64);
        Ok(())
    }

    fn zeroes(&mut self, offset: u64, len: u64) -> Result<(), CopyError> {
        self.sink
            .zeroes(offset, len)
            .map_err(|e| CopyError::Write(e.to_string()))?;
        self.pb.set_position(offset + len);
        Ok(())
    }
}

/// Copies the guest contents of `disk` into a new qcow2 image.
fn copy_to_qcow2(disk: &mut Disk, a: &Args) -> Result<(), (String, String)> {
    let size = disk.size();
    let mut copts = super::create::build(
        &a.dest,
        &a.options,
        &a.backing,
        &a.backing_format,
        &Some(size.to_string()),
        true,
    )
    .map_err(|e| (a.dest.clone(), e))?;
    copts.size = size;
    if a.compress && copts.encrypt.is_some() {
        return Err((
            a.dest.clone(),
            "Compression and encryption not supported at the same time".into(),
        ));
    }
    let mut img = crate::create_qcow2_with(std::path::Path::new(&a.dest), &copts, a.cache)
        .map_err(|e| (a.dest.clone(), e.to_string()))?;
    let cs = img.cluster_size();
    let pb = progress::bar(a.progress, size);
    // Clusters are compressed a chunk at a time on every core (libdeflate,
    // libzstd), then placed in order.
    let mut codec = NativeCodec::all_cores();
    let mut sink = ImageSink::new(&mut img).with_codec(&mut codec);
    sink.compress = a.compress;
    sink.over_backing = a.backing.is_some();
    let copied = copy_threaded(disk, 0, size, cs, &mut sink, &pb).map_err(|e| match e {
        CopyError::Read(e) => ("error while reading".to_string(), e.to_string()),
        CopyError::Write(e) => ("error while writing".to_string(), e),
    });
    // Flushed either way: on an error, what was written stays durable and
    // referenced (closing cleanly, as QEMU does).
    let flushed = img
        .flush()
        .map_err(|e| ("error while writing".to_string(), e.to_string()));
    copied.and(flushed)?;
    pb.finish_and_clear();
    Ok(())
}

/// What the reading thread hands the writing one.
enum Piece {
    /// `len` bytes of data at a guest offset, in a buffer to send back.
    Data(Vec<u8>, u64, usize),
    /// A run of zeros: guest offset and length.
    Zeros(u64, u64),
}

/// The reading side of [`copy_threaded`]: passes each piece to the writer
/// thread; full buffers go there, empty ones come back.
struct Forward<'a> {
    full: std::sync::mpsc::SyncSender<Piece>,
    empty: std::sync::mpsc::Receiver<Vec<u8>>,
    pb: &'a indicatif::ProgressBar,
}

impl Sink for Forward<'_> {
    type Error = CopyError;

    fn data(&mut self, offset: u64, buf: &mut Vec<u8>, len: usize) -> Result<(), CopyError> {
        // The writer's error is reported when it is joined.
        let gone = || CopyError::Write("the writer stopped".into());
        let mut spare = self.empty.recv().map_err(|_| gone())?;
        if spare.len() < buf.len() {
            spare.resize(buf.len(), 0);
        }
        std::mem::swap(buf, &mut spare);
        self.full
            .send(Piece::Data(spare, offset, len))
            .map_err(|_| gone())?;
        self.pb.set_position(offset + len as u64);
        Ok(())
    }

    fn zeroes(&mut self, offset: u64, len: u64) -> Result<(), CopyError> {
        let gone = || CopyError::Write("the writer stopped".into());
        self.full
            .send(Piece::Zeros(offset, len))
            .map_err(|_| gone())?;
        self.pb.set_position(offset + len);
        Ok(())
    }
}

/// Copies guest `[start, end)` of `disk` into `target`, reading on this
/// thread while a second one writes (at most a few chunks apart),
/// with chunks aligned to `align`.
pub fn copy_threaded<S>(
    disk: &mut Disk,
    start: u64,
    end: u64,
    align: u64,
    target: &mut S,
    pb: &indicatif::ProgressBar,
) -> Result<(), CopyError>
where
    S: Sink + Send,
    S::Error: std::fmt::Display,
{
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Piece>(IN_FLIGHT);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..IN_FLIGHT {
        let _ = empty_tx.send(vec![0u8; CHUNK as usize]);
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<(), String> {
            for piece in full_rx {
                match piece {
                    Piece::Data(mut buf, pos, len) => {
                        target.data(pos, &mut buf, len).map_err(|e| e.to_string())?;
                        let _ = empty_tx.send(buf);
                    }
                    Piece::Zeros(pos, len) => {
                        target.zeroes(pos, len).map_err(|e| e.to_string())?;
                    }
                }
            }
            Ok(())
        });
        let mut forward = Forward {
            full: full_tx,
            empty: empty_rx,
            pb,
        };
        let opts = CopyOptions {
            chunk: CHUNK as usize,
            align,
        };
        let copied = copy(
            disk,
            start,
            end,
            opts,
            &mut NativeCodec::all_cores(),
            &mut forward,
        );
        drop(forward);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err("writer thread panicked".into()));
        match (copied, written) {
            (_, Err(e)) => Err(CopyError::Write(e)),
            (r, Ok(())) => r,
        }
    })
}

/// A sink writing a sparse raw file: data at its offset minus `shift`,
/// zero runs left as holes.
struct RawSink<'a> {
    out: &'a mut FileIo,
    /// Guest offset written at target offset 0.
    shift: u64,
}

impl Sink for RawSink<'_> {
    type Error = std::io::Error;

    fn data(&mut self, offset: u64, buf: &mut Vec<u8>, len: usize) -> std::io::Result<()> {
        write_sparse(self.out, &buf[..len], offset - self.shift)
    }

    fn zeroes(&mut self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// Copies the guest range `[start, end)` of `disk` into `out` (at offset
/// `start` - `start`, i.e. from 0), leaving zero runs as holes; a writer
/// thread writes while this one reads.
pub fn copy_range_to_raw(
    disk: &mut Disk,
    start: u64,
    end: u64,
    out: &mut FileIo,
    pb: &indicatif::ProgressBar,
) -> Result<(), CopyError> {
    let mut sink = RawSink { out, shift: start };
    copy_threaded(disk, start, end, 1, &mut sink, pb)
}

/// Creates (or truncates) the raw file `dest` of `len` bytes, opened in
/// cache mode `cache`.
pub fn create_raw(dest: &str, len: u64, cache: CacheMode) -> std::io::Result<FileIo> {
    let file = crate::create_empty(std::path::Path::new(dest), cache)?;
    file.set_len(len)?;
    Ok(FileIo::with_cache(file, cache))
}

/// Copies the guest contents of `disk` into a new sparse raw file at
/// `dest`, written in cache mode `cache` (a flush at the end syncs unless
/// the mode is `unsafe`).
pub fn copy_to_raw(
    disk: &mut Disk,
    dest: &str,
    show_progress: bool,
    cache: CacheMode,
) -> Result<(), (String, String)> {
    let out_err = |e: String| (format!("Could not write '{dest}'"), e);
    let size = disk.size();
    let mut out = create_raw(dest, size, cache).map_err(|e| out_err(e.to_string()))?;
    let pb = progress::bar(show_progress, size);
    copy_range_to_raw(disk, 0, size, &mut out, &pb).map_err(|e| match e {
        CopyError::Read(e) => ("error while reading".to_string(), e.to_string()),
        CopyError::Write(e) => out_err(e),
    })?;
    out.flush().map_err(|e| out_err(e.to_string()))?;
    pb.finish_and_clear();
    Ok(())
}

/// Makes a finished target durable once, whatever its cache mode (dd's
/// targets are written without intermediate syncs, then synced when
/// complete, as qemu-img's close does).
pub fn sync_target(img: &WritableImage<FileIo>) -> std::io::Result<()> {
    img.storage().file().sync_data()
}

/// Writes `data` at `offset`, leaving 4 KiB blocks of zeros as holes and
/// writing each run of non-zero blocks with one call.
pub fn write_sparse(out: &mut FileIo, data: &[u8], offset: u64) -> std::io::Result<()> {
    const BLOCK: usize = 4096;
    let mut run_start: Option<usize> = None;
    let mut i = 0;
    while i < data.len() {
        let end = (i + BLOCK).min(data.len());
        let zero = qcowkit_core::copy::is_zero(&data[i..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                out.write_at(offset + s as u64, &data[s..i])?;
                run_start = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(s) = run_start {
        out.write_at(offset + s as u64, &data[s..])?;
    }
    Ok(())
}
