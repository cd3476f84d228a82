//! `qcow2 convert`: guest data out of an image into a sparse raw file.

use std::fs::OpenOptions as FsOpenOptions;
use std::os::unix::fs::FileExt;

use clap::Parser;

use super::{open_disk, parse_format, progress, report};
use crate::{Disk, Format};

/// Size of the copy buffer.
pub const CHUNK: u64 = 2 * 1024 * 1024;

/// Arguments of `qcow2 convert`.
#[derive(Debug, Parser)]
pub struct Args {
    /// Source format (`qcow2` or `raw`); probed when omitted.
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Output format (`raw`).
    #[arg(short = 'O', default_value = "raw")]
    pub output_format: String,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Accepted for qemu-img compatibility (images are opened read-only).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// L2 cache size in bytes (suffixes k, M, G).
    #[arg(long = "l2-cache-size")]
    pub l2_cache_size: Option<String>,
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
    match Format::parse(&a.output_format) {
        Some(Format::Raw) => {}
        Some(Format::Qcow2) => {
            return Err((
                "convert".into(),
                "output format qcow2 is not supported yet (use -O raw)".into(),
            ))
        }
        None => {
            return Err((
                "convert".into(),
                format!("Unknown file format '{}'", a.output_format),
            ))
        }
    }
    let opts = super::cache_options(&a.l2_cache_size).map_err(|e| ("convert".to_string(), e))?;
    let mut disk = open_disk(&a.source, src_fmt, opts)
        .map_err(|e| (format!("Could not open '{}'", a.source), e.to_string()))?;
    copy_to_raw(&mut disk, &a.dest, a.progress)
}

/// Copies the guest contents of `disk` into a new sparse raw file at `dest`.
pub fn copy_to_raw(
    disk: &mut Disk,
    dest: &str,
    show_progress: bool,
) -> Result<(), (String, String)> {
    let out_err = |e: std::io::Error| (format!("Could not write '{dest}'"), e.to_string());
    let out = FsOpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dest)
        .map_err(out_err)?;
    let size = disk.size();
    out.set_len(size).map_err(out_err)?;
    let pb = progress::bar(show_progress, size);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    let read_err = |e: crate::DiskError| ("error while reading".to_string(), e.to_string());
    while pos < size {
        let (st, run) = disk
            .block_status(pos, (size - pos).min(CHUNK))
            .map_err(read_err)?;
        if run == 0 {
            return Err(("convert".into(), format!("no progress at offset {pos}")));
        }
        if !st.reads_as_zero() {
            let chunk = &mut buf[..run as usize];
            disk.read_at(pos, chunk).map_err(read_err)?;
            // Keep the output sparse: skip 4 KiB blocks of zeros.
            for (i, block) in chunk.chunks(4096).enumerate() {
                if block.iter().any(|b| *b != 0) {
                    out.write_all_at(block, pos + (i as u64) * 4096)
                        .map_err(out_err)?;
                }
            }
        }
        pos += run;
        pb.set_position(pos);
    }
    pb.finish_and_clear();
    out.sync_all().map_err(out_err)?;
    Ok(())
}
