//! Library reads side by side: every reader opens each image and reads all
//! of it in `read_at`-style chunks (1 MiB by default), through
//!
//! - `qcowkit-std` (ours: `Disk::open`, whose image decodes compressed
//!   clusters with `NativeCodec` on every core, behind the 4 MiB read-ahead
//!   window), plus two variants of ours for context: the same with a
//!   one-thread `NativeCodec`, and the bare core (`Image` over a `FileIo`,
//!   the core's own no_std codecs, no read-ahead);
//! - the peers `imago` (its `sync` build), `qcow2-rs` (async API on its
//!   `pread` backend, driven by a single-threaded `block_on`),
//!   `qcow2-core`, and `qcow` (the only one that reads zstd clusters).
//!
//! Per image and reader it prints the median time (open plus reads; the
//! checksum is computed outside the timed part) of N rounds, the reader
//! order rotating from round to round, MiB/s of guest data, a checksum of
//! every byte read (which must be the same for every reader, and equal to
//! that of `--expect-raw`'s file when given: a mismatch exits 1) and the
//! ratio best peer's time / ours. A peer that cannot open or read an image
//! (e.g. zstd clusters) is shown as `n/a: reason` and skipped.
//!
//! ```text
//! peers [--runs N] [--chunk-kib K] [--readers KEY,..] [--expect-raw RAW] IMAGE...
//! KEY: ours, ours-1t, core, imago, qcow2-rs, qcow2-core, qcow
//! ```

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[path = "../checksum.rs"]
mod checksum;
use checksum::Checksum;

/// One reader of whole images, opened per run.
trait Reader {
    /// Virtual disk size in bytes.
    fn size(&self) -> u64;
    /// Fills all of `buf` with guest bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
}

/// A reader's name and how to open an image with it.
struct Contender {
    /// Short name for `--readers`.
    key: &'static str,
    name: &'static str,
    /// Ours (a variant of our crates) or a peer.
    ours: bool,
    how: How,
}

/// How a contender reads.
enum How {
    /// Opened and read in this process.
    Library(fn(&Path) -> Result<Box<dyn Reader>, String>),
    /// A separate program (its crate cannot be linked beside ours), whose
    /// path is in this environment variable: `PROGRAM IMAGE CHUNK_BYTES`
    /// opens and reads the whole image once and prints `SECONDS CHECKSUM
    /// SIZE` (checksum in hex, time of open and reads).
    Program(&'static str),
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

// ---- ours -------------------------------------------------------------

struct Ours(qcowkit_std::Disk);

impl Reader for Ours {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read_at(offset, buf).map_err(err)
    }
}

fn open_ours(path: &Path) -> Result<Box<dyn Reader>, String> {
    let disk = qcowkit_std::Disk::open(path, &qcowkit_std::DiskOptions::default()).map_err(err)?;
    Ok(Box::new(Ours(disk)))
}

fn open_ours_one_thread(path: &Path) -> Result<Box<dyn Reader>, String> {
    let mut disk =
        qcowkit_std::Disk::open(path, &qcowkit_std::DiskOptions::default()).map_err(err)?;
    if let qcowkit_std::DiskImage::Qcow2(img) = disk.image_mut() {
        img.set_codec(Box::new(qcowkit_std::NativeCodec::new(1)));
    }
    Ok(Box::new(Ours(disk)))
}

struct OursCore(qcowkit_core::Image<qcowkit_std::FileIo>);

impl Reader for OursCore {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read_at(offset, buf).map_err(err)
    }
}

fn open_ours_core(path: &Path) -> Result<Box<dyn Reader>, String> {
    let io = qcowkit_std::FileIo::open(path).map_err(err)?;
    let img = qcowkit_core::Image::open(io, &qcowkit_core::OpenOptions::default()).map_err(err)?;
    Ok(Box::new(OursCore(img)))
}

// ---- imago ------------------------------------------------------------

struct Imago(imago::FormatAccess<imago::file::File>);

impl Reader for Imago {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read(buf, offset).map_err(err)
    }
}

fn open_imago(path: &Path) -> Result<Box<dyn Reader>, String> {
    use imago::FormatDriverBuilder;
    let qcow2 = imago::qcow2::Qcow2::<imago::file::File>::builder_path(path)
        .open(imago::PermissiveImplicitOpenGate::default())
        .map_err(err)?;
    Ok(Box::new(Imago(imago::FormatAccess::new(qcow2))))
}

// ---- qcow2-rs ---------------------------------------------------------

struct Qcow2Rs(qcow2_rs::dev::Qcow2Dev<qcow2_rs::sync_io::Qcow2IoSync>);

impl Reader for Qcow2Rs {
    fn size(&self) -> u64 {
        self.0.info.virtual_size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        // It stops at the first cluster it cannot read and returns the
        // bytes done so far: a short count is its error.
        let n = futures_executor::block_on(self.0.read_at(buf, offset)).map_err(err)?;
        if n != buf.len() {
            return Err(format!(
                "short read at {offset:#x}: {n} of {} bytes",
                buf.len()
            ));
        }
        Ok(())
    }
}

fn open_qcow2_rs(path: &Path) -> Result<Box<dyn Reader>, String> {
    let params = qcow2_rs::dev::Qcow2DevParams::new(9, None, None, true, false);
    let dev = qcow2_rs::utils::qcow2_setup_dev_sync(path, &params).map_err(err)?;
    futures_executor::block_on(dev.qcow2_prep_io()).map_err(err)?;
    Ok(Box::new(Qcow2Rs(dev)))
}

// ---- qcow2-core -------------------------------------------------------

struct Qcow2Core(qcow2::Qcow2Reader);

impl Reader for Qcow2Core {
    fn size(&self) -> u64 {
        self.0.virtual_disk_size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.seek(SeekFrom::Start(offset)).map_err(err)?;
        self.0.read_exact(buf).map_err(err)
    }
}

fn open_qcow2_core(path: &Path) -> Result<Box<dyn Reader>, String> {
    Ok(Box::new(Qcow2Core(
        qcow2::Qcow2Reader::open(path).map_err(err)?,
    )))
}

// ---- qcow (a separate program: bench/qcow-reader) ---------------------

/// Runs the program in `var` on `path`; see [`How::Program`].
fn run_program(var: &str, path: &Path, chunk: usize) -> Result<Run, String> {
    let prog = std::env::var_os(var).ok_or(format!("{var} is not set"))?;
    let out = std::process::Command::new(&prog)
        .arg(path)
        .arg(chunk.to_string())
        .output()
        .map_err(|e| format!("{}: {e}", Path::new(&prog).display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(why.lines().next().unwrap_or("failed").to_string());
    }
    let f: Vec<&str> = text.split_whitespace().collect();
    match f[..] {
        [secs, sum, size] => Ok(Run {
            secs: secs.parse().map_err(err)?,
            sum: u64::from_str_radix(sum, 16).map_err(err)?,
            size: size.parse().map_err(err)?,
        }),
        _ => Err(format!("unexpected output {text:?}")),
    }
}

const CONTENDERS: &[Contender] = &[
    Contender {
        key: "ours",
        name: "qcowkit-std",
        ours: true,
        how: How::Library(open_ours),
    },
    Contender {
        key: "ours-1t",
        name: "qcowkit-std 1 thread",
        ours: true,
        how: How::Library(open_ours_one_thread),
    },
    Contender {
        key: "core",
        name: "qcowkit-core",
        ours: true,
        how: How::Library(open_ours_core),
    },
    Contender {
        key: "imago",
        name: "imago 0.2.6",
        ours: false,
        how: How::Library(open_imago),
    },
    Contender {
        key: "qcow2-rs",
        name: "qcow2-rs 0.1.6",
        ours: false,
        how: How::Library(open_qcow2_rs),
    },
    Contender {
        key: "qcow2-core",
        name: "qcow2-core 0.3.4",
        ours: false,
        how: How::Library(open_qcow2_core),
    },
    Contender {
        key: "qcow",
        name: "qcow 1.2.0",
        ours: false,
        how: How::Program("QCOW_READER"),
    },
];

/// Index of the reader the ratio is taken against.
const OURS: usize = 0;

// ---- runs -------------------------------------------------------------

struct Run {
    secs: f64,
    sum: u64,
    size: u64,
}

/// Opens `path` with `c` and reads all of it in `buf`-sized chunks.
fn run_once(c: &Contender, path: &Path, buf: &mut [u8]) -> Result<Run, String> {
    let open = match c.how {
        How::Library(open) => open,
        How::Program(var) => return run_program(var, path, buf.len()),
    };
    let attempt = catch_unwind(AssertUnwindSafe(|| {
        let start = Instant::now();
        let mut r = open(path)?;
        let mut busy = start.elapsed();
        let size = r.size();
        let mut sum = Checksum::new();
        let mut pos = 0u64;
        while pos < size {
            let n = (size - pos).min(buf.len() as u64) as usize;
            let t = Instant::now();
            r.read_at(pos, &mut buf[..n])
                .map_err(|e| format!("read at {pos:#x}: {e}"))?;
            busy += t.elapsed();
            sum.update(&buf[..n]);
            pos += n as u64;
        }
        let t = Instant::now();
        drop(r);
        busy += t.elapsed();
        Ok(Run {
            secs: busy.as_secs_f64(),
            sum: sum.finish(),
            size,
        })
    }));
    match attempt {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(format!("panicked: {what}"))
        }
    }
}

/// The checksum of a raw file read in `buf`-sized chunks.
fn raw_checksum(path: &Path, buf: &mut [u8]) -> Result<(u64, u64), String> {
    let mut f = File::open(path).map_err(err)?;
    let mut sum = Checksum::new();
    let mut size = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]).map_err(err)? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
        size += n as u64;
    }
    Ok((sum.finish(), size))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// What the header says about compression: "zstd" when the compression
/// type bit is set, else "zlib" (the type compressed clusters would use).
fn compression_type(path: &Path) -> String {
    let mut h = [0u8; 112];
    let Ok(mut f) = File::open(path) else {
        return "?".into();
    };
    if f.read_exact(&mut h).is_err() || &h[..4] != b"QFI\xfb" {
        return "not qcow2".into();
    }
    let version = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let incompat = u64::from_be_bytes(h[72..80].try_into().unwrap_or_default());
    if version >= 3 && incompat & 8 != 0 {
        match h[104] {
            1 => "zstd".into(),
            t => format!("{t} (unknown)"),
        }
    } else {
        "zlib".into()
    }
}

struct Args {
    runs: usize,
    chunk: usize,
    readers: Vec<usize>,
    expect_raw: Option<PathBuf>,
    images: Vec<PathBuf>,
}

const USAGE: &str =
    "usage: peers [--runs N] [--chunk-kib K] [--readers KEY,..] [--expect-raw RAW] IMAGE...
readers (KEY): ours, ours-1t, core, imago, qcow2-rs, qcow2-core, qcow (ours is always run)";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        runs: 5,
        chunk: 1 << 20,
        readers: (0..CONTENDERS.len()).collect(),
        expect_raw: None,
        images: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--runs" => {
                a.runs = value("--runs")?
                    .parse()
                    .map_err(|e| format!("--runs: {e}"))?;
                if a.runs == 0 {
                    return Err("--runs must be at least 1".into());
                }
            }
            "--chunk-kib" => {
                let k: usize = value("--chunk-kib")?
                    .parse()
                    .map_err(|e| format!("--chunk-kib: {e}"))?;
                if k == 0 {
                    return Err("--chunk-kib must be at least 1".into());
                }
                a.chunk = k * 1024;
            }
            "--readers" => {
                let list = value("--readers")?;
                a.readers = Vec::new();
                for want in list.split(',') {
                    let i = CONTENDERS
                        .iter()
                        .position(|c| c.key == want)
                        .ok_or(format!("unknown reader '{want}'"))?;
                    a.readers.push(i);
                }
                if !a.readers.contains(&OURS) {
                    a.readers.insert(0, OURS);
                }
            }
            "--expect-raw" => a.expect_raw = Some(value("--expect-raw")?.into()),
            "-h" | "--help" => return Err(String::new()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            _ => a.images.push(arg.into()),
        }
    }
    if a.images.is_empty() {
        return Err("no image given".into());
    }
    Ok(a)
}

/// One image's outcome for the summary.
struct Summary {
    image: String,
    ours: f64,
    best_peer: Option<(&'static str, f64)>,
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("peers: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut buf = vec![0u8; args.chunk];
    let mut failed = false;
    // A peer's panic is reported as its `n/a` reason, not on stderr.
    std::panic::set_hook(Box::new(|_| {}));

    let expected = match &args.expect_raw {
        None => None,
        Some(p) => match raw_checksum(p, &mut buf) {
            Ok((sum, size)) => {
                println!(
                    "reference {}: {:.1} MiB, checksum {sum:016x}",
                    p.display(),
                    size as f64 / 1048576.0
                );
                Some(sum)
            }
            Err(e) => {
                eprintln!("peers: {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        },
    };

    let mut summaries = Vec::new();
    for image in &args.images {
        let name = image.file_name().map_or_else(
            || image.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        let file_mib = std::fs::metadata(image).map_or(0.0, |m| m.len() as f64 / 1048576.0);
        println!();
        println!(
            "== {name}: {file_mib:.1} MiB file, compression type {}, {} KiB chunks, median of {} runs",
            compression_type(image),
            args.chunk / 1024,
            args.runs
        );

        // An untimed first round: warms the page cache, finds who can read
        // the image at all, and fixes the checksum every run must repeat.
        let mut outcome: Vec<Result<(u64, u64), String>> = Vec::new();
        for &i in &args.readers {
            outcome.push(run_once(&CONTENDERS[i], image, &mut buf).map(|r| (r.sum, r.size)));
        }
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); args.readers.len()];
        let able: Vec<usize> = (0..args.readers.len())
            .filter(|&k| outcome[k].is_ok())
            .collect();
        for round in 0..args.runs {
            for j in 0..able.len() {
                let k = able[(j + round) % able.len()];
                if outcome[k].is_err() {
                    continue; // failed in an earlier round
                }
                let c = &CONTENDERS[args.readers[k]];
                match run_once(c, image, &mut buf) {
                    Ok(r) if Ok((r.sum, r.size)) == outcome[k] => times[k].push(r.secs),
                    Ok(r) => {
                        outcome[k] = Err(format!(
                            "checksum changed between runs: {:016x} then {:016x}",
                            outcome[k].as_ref().map_or(0, |o| o.0),
                            r.sum
                        ));
                        failed = true;
                    }
                    Err(e) => {
                        outcome[k] = Err(format!("failed in a later run: {e}"));
                        failed = true;
                    }
                }
            }
        }

        let ours_k = args.readers.iter().position(|&i| i == OURS).unwrap_or(0);
        let ours_time = match &outcome[ours_k] {
            Ok(_) if !times[ours_k].is_empty() => Some(median(&mut times[ours_k].clone())),
            _ => None,
        };
        let reference = expected.or_else(|| outcome[ours_k].as_ref().ok().map(|o| o.0));

        println!(
            "{:<22} {:>10} {:>9}  {:<16} {:>10}",
            "reader", "median ms", "MiB/s", "checksum", "time/ours"
        );
        let mut best_peer: Option<(&'static str, f64)> = None;
        let mut peer_mismatch = false;
        for (k, &i) in args.readers.iter().enumerate() {
            let c = &CONTENDERS[i];
            match &outcome[k] {
                Err(e) => {
                    let e = e.lines().next().unwrap_or("");
                    if c.ours {
                        // Ours must read every image.
                        failed = true;
                        println!("{:<22} FAILED: {e}", c.name);
                    } else {
                        println!("{:<22} n/a: {e}", c.name);
                    }
                }
                Ok((sum, size)) => {
                    let t = median(&mut times[k]);
                    let ratio = ours_time.map_or("-".into(), |o| format!("{:.2}", t / o));
                    let mut mark = "";
                    if reference.is_some_and(|r| r != *sum) {
                        mark = "  MISMATCH";
                        peer_mismatch |= !c.ours;
                        failed = true;
                    }
                    println!(
                        "{:<22} {:>10.1} {:>9.1}  {:016x} {:>10}{mark}",
                        c.name,
                        t * 1000.0,
                        *size as f64 / 1048576.0 / t,
                        sum,
                        ratio
                    );
                    if !c.ours && mark.is_empty() && best_peer.is_none_or(|(_, b)| t < b) {
                        best_peer = Some((c.name, t));
                    }
                }
            }
        }
        if let Some(o) = ours_time {
            match best_peer {
                Some((p, t)) => println!("best peer / ours: {:.2} ({p})", t / o),
                None if peer_mismatch => {
                    println!("best peer / ours: n/a (no peer read this image correctly)")
                }
                None => println!("best peer / ours: n/a (no peer could read this image)"),
            }
            summaries.push(Summary {
                image: name,
                ours: o,
                best_peer,
            });
        }
    }

    if summaries.len() > 1 {
        println!();
        println!(
            "{:<22} {:>10} {:<18} {:>10} {:>16}",
            "image", "ours ms", "best peer", "peer ms", "best peer / ours"
        );
        for s in &summaries {
            match s.best_peer {
                Some((p, t)) => println!(
                    "{:<22} {:>10.1} {:<18} {:>10.1} {:>16.2}",
                    s.image,
                    s.ours * 1000.0,
                    p,
                    t * 1000.0,
                    t / s.ours
                ),
                None => println!(
                    "{:<22} {:>10.1} {:<18} {:>10} {:>16}",
                    s.image,
                    s.ours * 1000.0,
                    "n/a",
                    "-",
                    "-"
                ),
            }
        }
    }
    println!();
    println!(
        "(times: open + all reads, checksum excluded; ratio above 1 means ours is faster; \
         qcowkit-std decodes on {} threads, the peers on one)",
        std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
    );
    if failed {
        eprintln!("peers: a reader failed or checksums differ");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
