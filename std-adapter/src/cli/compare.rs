//! `qcow2 compare`: exit 0 identical, 1 different, 2 error (like qemu-img).

use clap::Parser;

use super::{parse_format, progress, report};
use crate::{Disk, NativeCodec};
use qcowkit_core::copy::ChunkRead;
use qcowkit_core::Chunk;

const CHUNK: u64 = 2 * 1024 * 1024;

/// Arguments of `qcow2 compare`.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  qcow2 compare vm.qcow2 vm.raw\n  qcow2 compare -s -q old.qcow2 new.qcow2 && echo identical"
)]
pub struct Args {
    /// Format of the first image; probed when omitted.
    #[arg(short = 'f')]
    pub format1: Option<String>,
    /// Format of the second image; probed when omitted.
    #[arg(short = 'F')]
    pub format2: Option<String>,
    /// Strict mode: images of different sizes differ.
    #[arg(short = 's')]
    pub strict: bool,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet: print nothing, only set the exit status.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Accepted for qemu-img compatibility.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// L2 cache size in bytes (suffixes k, M, G).
    #[arg(long = "l2-cache-size")]
    pub l2_cache_size: Option<String>,
    /// Which files named by the image to open.
    #[command(flatten)]
    pub files: super::FollowArgs,
    /// First image.
    pub image1: String,
    /// Second image.
    pub image2: String,
}

/// Outcome of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Same guest contents.
    Identical,
    /// First differing offset (512-byte granularity, as qemu-img reports),
    /// and whether it lies past the end of the shorter image.
    MismatchAt(u64, bool),
    /// Sizes differ in strict mode.
    SizeMismatch,
}

/// Runs `qcow2 compare`.
pub fn run(a: &Args) -> u8 {
    let say = |msg: &str| {
        if !a.quiet {
            println!("{msg}");
        }
    };
    let open = |name: &str, f: &Option<String>| -> Result<Disk, String> {
        let fmt = parse_format(f)?;
        let opts = super::cache_options(&a.l2_cache_size)?;
        super::open_disk_with(name, fmt, opts, a.files.policy(), a.force_share)
            .map_err(|e| format!("Could not open '{name}': {e}"))
    };
    let disks = open(&a.image1, &a.format1).and_then(|d1| Ok((d1, open(&a.image2, &a.format2)?)));
    let (mut d1, mut d2) = match disks {
        Ok(d) => d,
        Err(e) => {
            report("compare", e);
            return 2;
        }
    };
    match compare(&mut d1, &mut d2, a.strict, a.progress) {
        Ok(Outcome::Identical) => {
            if d1.size() != d2.size() {
                say("Warning: Image size mismatch!");
            }
            say("Images are identical.");
            0
        }
        Ok(Outcome::MismatchAt(off, in_tail)) => {
            if in_tail {
                say("Warning: Image size mismatch!");
            }
            say(&format!("Content mismatch at offset {off}!"));
            1
        }
        Ok(Outcome::SizeMismatch) => {
            say("Strict mode: Image size mismatch!");
            1
        }
        Err(e) => {
            report("compare", e);
            2
        }
    }
}

/// The chunk of a disk read last, so that each byte is read once even
/// when the two disks' chunks end at different offsets.
struct Ahead {
    start: u64,
    len: u64,
    zero: bool,
    buf: Vec<u8>,
}

impl Ahead {
    fn new() -> Self {
        Ahead {
            start: 0,
            len: 0,
            zero: true,
            buf: vec![0u8; CHUNK as usize],
        }
    }

    /// What `disk` holds from `pos` (below `end`): `None` for a run of
    /// zeros of the returned length, else the data.
    fn at(
        &mut self,
        disk: &mut Disk,
        pos: u64,
        end: u64,
        codec: &mut NativeCodec,
    ) -> Result<(Option<&[u8]>, u64), crate::DiskError> {
        if !(self.start..self.start + self.len).contains(&pos) {
            (self.zero, self.len) =
                match disk.read_chunk(pos, end - pos, 1, &mut self.buf, codec)? {
                    Chunk::Zero(n) => (true, n),
                    Chunk::Data(n) => (false, n as u64),
                };
            self.start = pos;
        }
        let skip = pos - self.start;
        let len = self.len - skip;
        if self.zero {
            return Ok((None, len));
        }
        let from = skip as usize;
        Ok((Some(&self.buf[from..from + len as usize]), len))
    }
}

/// Compares two disks; the longer one's tail must read as zeros unless `strict`.
pub fn compare(
    d1: &mut Disk,
    d2: &mut Disk,
    strict: bool,
    show: bool,
) -> Result<Outcome, crate::DiskError> {
    let (s1, s2) = (d1.size(), d2.size());
    if strict && s1 != s2 {
        return Ok(Outcome::SizeMismatch);
    }
    let common = s1.min(s2);
    let pb = progress::bar(show, s1.max(s2));
    let mut codec = NativeCodec::all_cores();
    let (mut a1, mut a2) = (Ahead::new(), Ahead::new());
    let nonzero = |b: &[u8]| b.iter().position(|x| *x != 0);
    let mut pos = 0;
    while pos < common {
        let (c1, n1) = a1.at(d1, pos, common, &mut codec)?;
        let (c2, n2) = a2.at(d2, pos, common, &mut codec)?;
        let n = n1.min(n2);
        let m = n as usize;
        let differs = match (c1, c2) {
            (None, None) => None,
            (Some(b), None) | (None, Some(b)) => nonzero(&b[..m]),
            (Some(x), Some(y)) => x[..m].iter().zip(&y[..m]).position(|(p, q)| p != q),
        };
        if let Some(i) = differs {
            return Ok(Outcome::MismatchAt((pos + i as u64) & !511, false));
        }
        pos += n;
        pb.set_position(pos);
    }
    // The longer image must read as zeros past the common part.
    let (longer, total) = if s1 > s2 { (d1, s1) } else { (d2, s2) };
    let mut ahead = Ahead::new();
    while pos < total {
        let (c, n) = ahead.at(longer, pos, total, &mut codec)?;
        if let Some(i) = c.and_then(nonzero) {
            return Ok(Outcome::MismatchAt((pos + i as u64) & !511, true));
        }
        pos += n;
        pb.set_position(pos);
    }
    pb.finish_and_clear();
    Ok(Outcome::Identical)
}
