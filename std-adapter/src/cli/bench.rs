//! `qcow2 bench`: qemu-img bench's flags, run in-process, plus `--random`
//! and `--seed` for uniformly random offsets inside the image.

use std::path::Path;
use std::time::Instant;

use clap::Parser;

use super::{parse_format, parse_size, report};
use crate::{CacheMode, Disk, DiskOptions, Format};

/// Arguments of `qcow2 bench`.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  qcow2 bench -c 100000 vm.qcow2                 4 KiB reads, one after the other\n  qcow2 bench -w --pattern=0xa5 -S 64k vm.qcow2   writes, each into a new cluster"
)]
pub struct Args {
    /// Image format; probed when omitted.
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Cache mode of the image (as qemu-img bench: `writeback` by
    /// default; `none` bypasses the page cache, `unsafe` never syncs).
    #[arg(short = 't', long = "cache", value_enum, default_value = "writeback")]
    pub cache: CacheMode,
    /// Number of I/O requests.
    #[arg(short = 'c', long = "count", default_value = "75000")]
    pub count: u64,
    /// Requests in parallel (accepted; requests run one after another here).
    #[arg(short = 'd', long = "depth", default_value = "64")]
    pub depth: u64,
    /// Size of each request (suffixes k, M).
    #[arg(short = 's', long = "buffer-size", default_value = "4k")]
    pub size: String,
    /// Offset of the first request.
    #[arg(short = 'o', long = "offset", default_value = "0")]
    pub offset: String,
    /// Increment between request offsets (default: the request size); an
    /// offset past the end wraps modulo (image size - request size), as in
    /// qemu-img since its 2025 fix.
    #[arg(short = 'S', long = "step-size")]
    pub step: Option<String>,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    pub write: bool,
    /// Byte written by write requests (decimal, 0x hexadecimal or 0 octal,
    /// as qemu-img takes it).
    #[arg(long = "pattern", default_value = "0")]
    pub pattern: String,
    /// Flush after every N requests (writes only; 0: never).
    #[arg(long = "flush-interval", default_value = "0")]
    pub flush_interval: u64,
    /// Uniformly random offsets, aligned to the request size, inside the image.
    #[arg(long = "random")]
    pub random: bool,
    /// Seed of `--random` (printed, so a run can be repeated).
    #[arg(long = "seed")]
    pub seed: Option<u64>,
    /// Read without taking locks (qemu-img's force-share), e.g. an image
    /// another process is writing; not with `-w`.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Which files named by the image to open.
    #[command(flatten)]
    pub files: super::FollowArgs,
    /// Quiet: print only the results.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// The image.
    pub filename: String,
}

/// A small deterministic generator (xorshift64*) for `--random`.
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (0 is remapped).
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Runs `qcow2 bench`.
pub fn run(a: &Args) -> u8 {
    match bench(a) {
        Ok(()) => 0,
        Err(e) => {
            report("bench", e);
            1
        }
    }
}

fn bench(a: &Args) -> Result<(), String> {
    let size = parse_size(&a.size)
        .filter(|s| *s > 0)
        .ok_or("invalid buffer size")?;
    let offset = parse_size(&a.offset).ok_or("invalid offset")?;
    let step = match &a.step {
        Some(s) => parse_size(s).ok_or("invalid step size")?,
        None => size,
    };
    let pattern = match qcowkit_options::parse_number(&a.pattern) {
        None => return Err(format!("Invalid pattern byte specified: '{}'.", a.pattern)),
        Some(p) => u8::try_from(p)
            .map_err(|_| "Invalid pattern byte specified. Must be between 0 and 255.")?,
    };
    let fmt = parse_format(&a.format)?;
    // qemu-img's refusals, in its order.
    if a.flush_interval > 0 && !a.write {
        return Err("--flush-interval is only available in write tests".into());
    }
    if a.flush_interval > 0 && a.flush_interval < a.depth {
        return Err("Flush interval can't be smaller than depth".into());
    }
    if a.write && a.force_share {
        return Err("force-share (-U) can only be used for reading".into());
    }
    let mut img = if a.write {
        let is_qcow2 = match fmt {
            Some(f) => f == Format::Qcow2,
            None => {
                let mut io =
                    crate::FileIo::open(Path::new(&a.filename)).map_err(|e| e.to_string())?;
                crate::probe(&mut io).map_err(|e| e.to_string())? == Format::Qcow2
            }
        };
        if !is_qcow2 {
            return Err("write benchmarks need a qcow2 image".into());
        }
        Target::Rw(Box::new(
            crate::open_qcow2_rw_with(
                Path::new(&a.filename),
                &super::open_options(),
                a.files.policy(),
                a.cache,
            )
            .map_err(|e| format!("Could not open '{}': {e}", a.filename))?,
        ))
    } else {
        let opts = DiskOptions {
            format: fmt,
            qcow2: super::open_options(),
            follow: a.files.policy(),
            force_share: a.force_share,
            // Each request reaches the file, as qemu-img bench's do.
            read_ahead: 0,
        };
        Target::Ro(
            Disk::open_with_cache(Path::new(&a.filename), &opts, a.cache)
                .map_err(|e| format!("Could not open '{}': {e}", a.filename))?,
        )
    };
    let disk_size = img.size();
    if size > disk_size {
        return Err("request size larger than the image".into());
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut rng = Rng::new(seed);
    let kind = if a.write { "write" } else { "read" };
    if !a.quiet {
        if a.random {
            println!(
                "Sending {} {kind} requests, {size} bytes each, at random offsets (seed {seed})",
                a.count
            );
        } else {
            println!(
                "Sending {} {kind} requests, {size} bytes each, {} in parallel (starting at offset {offset}, step size {step})",
                a.count, a.depth
            );
        }
    }
    let mut buf = vec![pattern; size as usize];
    let slots = disk_size / size;
    let mut pos = offset;
    let start = Instant::now();
    for i in 0..a.count {
        let at = if a.random {
            (rng.next_u64() % slots) * size
        } else {
            // qemu-img's rule (as fixed upstream in 2025, so a wrapped
            // request never runs past the end): the next offset is taken
            // modulo the last offset a whole request fits at.
            let p = pos;
            pos = match disk_size.checked_sub(size) {
                Some(room) if room > 0 => pos.saturating_add(step) % room,
                _ => 0,
            };
            p
        };
        let step = img.io(at, &mut buf, a.write).and_then(|()| {
            if a.write && a.flush_interval > 0 && (i + 1) % a.flush_interval == 0 {
                img.flush()
            } else {
                Ok(())
            }
        });
        if let Err(e) = step {
            // Close cleanly, as QEMU does: what completed is made durable
            // (in the crash-safe order; a failing flush leaves at worst
            // leaked clusters).
            let _ = img.flush();
            return Err(e.to_string());
        }
    }
    img.flush().map_err(|e| e.to_string())?;
    let secs = start.elapsed().as_secs_f64();
    println!("Run completed in {secs:.3} seconds.");
    let ops = a.count as f64 / secs.max(1e-9);
    println!(
        "{ops:.0} ops/s, {:.1} MiB/s",
        ops * size as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

enum Target {
    Ro(Disk),
    Rw(Box<qcowkit_core::WritableImage<crate::FileIo>>),
}

impl Target {
    fn size(&self) -> u64 {
        match self {
            Target::Ro(d) => d.size(),
            Target::Rw(i) => i.size(),
        }
    }
    fn io(&mut self, at: u64, buf: &mut [u8], write: bool) -> Result<(), crate::DiskError> {
        match self {
            Target::Ro(d) => d.read_at(at, buf),
            Target::Rw(i) if write => i.write_at(at, buf),
            Target::Rw(i) => i.read_at(at, buf),
        }
    }
    fn flush(&mut self) -> Result<(), crate::DiskError> {
        match self {
            Target::Ro(_) => Ok(()),
            Target::Rw(i) => i.flush(),
        }
    }
}
