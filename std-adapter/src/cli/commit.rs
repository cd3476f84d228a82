//! `qcow2 commit`: write what an overlay holds into its backing file (or a
//! deeper base with `-b`), then empty the overlay unless `-d` (or `-b`,
//! which implies it). qemu-img's flags, messages and exit codes.

use std::path::Path;
use std::time::Instant;

use clap::Parser;
use indicatif::ProgressBar;

use crate::{CacheMode, DiskImage, FileIo, Follow, Format, NativeCodec};
use qcowkit_core::commit::{commit, ChainLayer, StorageSink};
use qcowkit_core::copy::{CopyOptions, ImageSink, Sink};
use qcowkit_core::Preallocation;

/// Arguments of `qcow2 commit`.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  qcow2 commit overlay.qcow2                 into its backing file, then empty it\n  qcow2 commit -d overlay.qcow2              keep the overlay as it is\n  qcow2 commit -b base.qcow2 top.qcow2       into a deeper base (the images in between\n                                             no longer read as before)"
)]
pub struct Args {
    /// Image format (only `qcow2` images have a backing file).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Cache mode of the image and the base (`writeback` by default).
    #[arg(short = 't', value_enum, default_value = "writeback")]
    pub cache: CacheMode,
    /// The base to commit into: a file of the image's backing chain,
    /// relative to the directory of the image naming it. Implies -d.
    #[arg(short = 'b')]
    pub base: Option<String>,
    /// Drop: leave the image as it is instead of emptying it.
    #[arg(short = 'd')]
    pub drop: bool,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet: do not print "Image committed.".
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Rate limit in bytes per second (suffixes k, M, G).
    #[arg(short = 'r')]
    pub rate: Option<String>,
    /// The image.
    pub filename: String,
}

/// Runs `qcow2 commit`.
pub fn run(a: &Args) -> u8 {
    match commit_image(a) {
        Ok(()) => {
            if !a.quiet {
                println!("Image committed.");
            }
            0
        }
        Err(e) => {
            eprintln!("qcow2: {e}");
            1
        }
    }
}

/// The base chosen in the image's chain.
struct Base {
    depth: u32,
    path: String,
    format: Format,
}

fn commit_image(a: &Args) -> Result<(), String> {
    let rate = match a.rate.as_deref() {
        None => None,
        Some(r) => Some(
            qcowkit_options::parse_size(r)
                .filter(|&n| i64::try_from(n).is_ok())
                .ok_or(format!("Invalid rate limit specified: '{r}'"))?,
        ),
    };
    let format = super::parse_format(&a.format)?;
    if format == Some(Format::Raw) {
        return Err("Image does not have a backing file".into());
    }
    let path = Path::new(&a.filename);
    let base = find_base(a, format)?;
    let drop = a.drop || a.base.is_some();
    let open_err = |name: &str, e: &dyn std::fmt::Display| format!("Could not open '{name}': {e}");

    // The base, open for writing (and locked) first; the image's chain
    // then opens it again without a lock of its own.
    let base_path = Path::new(&base.path);
    let held = vec![crate::identity_of(base_path).map_err(|e| open_err(&base.path, &e))?];
    let mut target = match base.format {
        Format::Qcow2 => Target::Qcow2(Box::new(
            crate::open_qcow2_rw_with(base_path, &super::open_options(), Follow::Any, a.cache)
                .map_err(|e| open_err(&base.path, &e))?,
        )),
        Format::Raw => {
            let io =
                FileIo::open_rw_with(base_path, a.cache).map_err(|e| open_err(&base.path, &e))?;
            crate::lock::lock(io.file(), crate::lock::Access::Write)
                .map_err(|e| open_err(&base.path, &e))?;
            Target::Raw(io)
        }
    };
    let mut top =
        crate::open_qcow2_rw_beside(path, &super::open_options(), Follow::Any, a.cache, &held)
            .map_err(|e| open_err(&a.filename, &e))?;
    if top.chain_layer(base.depth).map(|l| l.name().to_string()) != Some(base.path.clone()) {
        return Err(format!(
            "The backing chain of '{}' changed while it was opened",
            a.filename
        ));
    }

    // A smaller base grows to the image's size first (it never shrinks).
    let size = top.size();
    let pb = super::progress::bar(a.progress && !a.quiet, size);
    let mut codec = NativeCodec::all_cores();
    let failed = |e: &dyn std::fmt::Display| format!("Failed to commit: {e}");
    match &mut target {
        Target::Qcow2(base_img) => {
            if base_img.size() < size {
                base_img
                    .resize(size, Preallocation::Off)
                    .map_err(|e| failed(&e))?;
            }
            let align = base_img.cluster_size();
            let mut sink = ImageSink::new(base_img);
            sink.over_backing = true;
            let mut sink = Paced::new(&mut sink, &pb, rate);
            let opts = CopyOptions {
                align,
                ..CopyOptions::default()
            };
            commit(&mut *top, base.depth, opts, &mut codec, &mut sink).map_err(|e| failed(&e))?;
            base_img.flush().map_err(|e| failed(&e))?;
        }
        Target::Raw(io) => {
            use qcowkit_core::{BlockRead as _, BlockWrite as _};
            if io.len().map_err(|e| failed(&e))? < size {
                io.set_len(size).map_err(|e| failed(&e))?;
            }
            let mut sink = StorageSink::new(io);
            let mut sink = Paced::new(&mut sink, &pb, rate);
            commit(
                &mut *top,
                base.depth,
                CopyOptions::default(),
                &mut codec,
                &mut sink,
            )
            .map_err(|e| failed(&e))?;
            io.flush().map_err(|e| failed(&e))?;
        }
    }
    pb.finish_and_clear();
    // The base is durable: emptying the image now uncovers the same data.
    if !drop {
        top.make_empty()
            .map_err(|e| format!("Failed to empty '{}': {e}", a.filename))?;
    }
    top.flush().map_err(|e| e.to_string())
}

/// Finds the base in the chain of the image (opened without locks, only
/// to read the chain's names).
fn find_base(a: &Args, format: Option<Format>) -> Result<Base, String> {
    let disk = super::open_disk(&a.filename, format, super::open_options(), true)
        .map_err(|e| format!("Could not open '{}': {e}", a.filename))?;
    let DiskImage::Qcow2(img) = disk.image() else {
        return Err("Image does not have a backing file".into());
    };
    let layer = |d: u32| {
        img.chain_layer(d).map(|l| match l {
            ChainLayer::Qcow2(i) => (i.name().to_string(), Format::Qcow2),
            ChainLayer::Raw { name, .. } => (name.to_string(), Format::Raw),
        })
    };
    let chosen = match &a.base {
        None => layer(1)
            .map(|l| (1, l))
            .ok_or("Image does not have a backing file")?,
        Some(b) => {
            let real = |p: &str| std::fs::canonicalize(p).ok();
            let mut found = None;
            let mut d = 0;
            while let (Some((parent, _)), Some(below)) = (layer(d), layer(d + 1)) {
                let wanted = qcowkit_core::backing::resolve_name(&parent, b);
                if real(&wanted).is_some() && real(&wanted) == real(&below.0) {
                    found = Some((d + 1, below));
                    break;
                }
                d += 1;
            }
            found.ok_or(format!(
                "Did not find '{b}' in the backing chain of '{}'",
                a.filename
            ))?
        }
    };
    let (depth, (path, format)) = chosen;
    Ok(Base {
        depth,
        path,
        format,
    })
}

/// Where the commit writes.
enum Target {
    Qcow2(Box<qcowkit_core::WritableImage<FileIo>>),
    Raw(FileIo),
}

/// A sink that advances the progress bar and holds the pace under a rate
/// limit (bytes per second) by waiting before writes that would exceed it.
struct Paced<'a, S: ?Sized> {
    inner: &'a mut S,
    pb: &'a ProgressBar,
    rate: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl<'a, S: Sink + ?Sized> Paced<'a, S> {
    fn new(inner: &'a mut S, pb: &'a ProgressBar, rate: Option<u64>) -> Self {
        Paced {
            inner,
            pb,
            rate,
            start: Instant::now(),
            bytes: 0,
        }
    }

    fn account(&mut self, end: u64, len: u64) {
        self.pb.set_position(end);
        self.bytes = self.bytes.saturating_add(len);
        if let Some(rate) = self.rate.filter(|&r| r > 0) {
            let due = std::time::Duration::from_secs_f64(self.bytes as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(self.start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}

impl<S: Sink + ?Sized> Sink for Paced<'_, S> {
    type Error = S::Error;

    fn data(&mut self, offset: u64, buf: &mut Vec<u8>, len: usize) -> Result<(), S::Error> {
        self.account(offset + len as u64, len as u64);
        self.inner.data(offset, buf, len)
    }

    fn zeroes(&mut self, offset: u64, len: u64) -> Result<(), S::Error> {
        self.account(offset + len, 0);
        self.inner.zeroes(offset, len)
    }
}
