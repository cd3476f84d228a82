//! `qcow2 measure`: the file size a new image would need, for a disk of a
//! given size or for the contents of an existing image (qemu-img's
//! numbers, keys and messages).

use clap::Parser;

use super::{json_text, open_disk, options, parse_format, parse_size, Output};
use crate::DiskImage;
use qcowkit_core::measure::{bitmaps_size, fully_allocated_size, Measure};
use qcowkit_core::{CreateOptions, Preallocation};

/// Arguments of `qcow2 measure`.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  qcow2 measure -O qcow2 --size 20G\n  qcow2 measure -O qcow2 -o cluster_size=2M disk.raw\n  qcow2 measure --output=json -O qcow2 vm.qcow2\n  qcow2 measure -O qcow2 -l before-upgrade vm.qcow2   as a snapshot saved it"
)]
pub struct Args {
    /// Format of the image measured (probed when omitted).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Format of the new image: `raw` (the default, as qemu-img's) or `qcow2`.
    #[arg(short = 'O', default_value = "raw")]
    pub out_format: String,
    /// Options of the new image (`-o cluster_size=...,refcount_bits=...`).
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Measure a disk of this size instead of an image.
    #[arg(long = "size")]
    pub size: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub output: Output,
    /// Measure the image as internal snapshot SNAPSHOT saved it: its ID or
    /// name, or `snapshot.id=ID` / `snapshot.name=NAME`.
    #[arg(short = 'l')]
    pub snapshot: Option<String>,
    /// Take no locks (measure an image in use).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image measured.
    pub filename: Option<String>,
}

/// Runs `qcow2 measure`.
pub fn run(a: &Args) -> u8 {
    match measure(a) {
        Ok(m) => {
            match a.output {
                Output::Json => println!("{}", json_text(&m)),
                Output::Human => {
                    println!("required size: {}", m.required);
                    println!("fully allocated size: {}", m.fully_allocated);
                    if let Some(b) = m.bitmaps {
                        println!("bitmaps size: {b}");
                    }
                }
            }
            0
        }
        Err(e) => {
            eprintln!("qcow2: {e}");
            1
        }
    }
}

fn measure(a: &Args) -> Result<Measure, String> {
    let size = match (&a.size, &a.filename) {
        (Some(_), Some(_)) => {
            return Err("--size N cannot be used together with a filename.".into())
        }
        (None, None) => return Err("Either --size N or one filename must be specified.".into()),
        (Some(s), None) => {
            Some(parse_size(s).ok_or(format!("Invalid image size specified: '{s}'"))?)
        }
        (None, Some(_)) => None,
    };
    if a.filename.is_none() && (a.format.is_some() || a.snapshot.is_some()) {
        return Err("--image-opts, -f, and -l require a filename argument.".into());
    }
    if a.out_format != "raw" && a.out_format != "qcow2" {
        return Err(format!(
            "Block driver '{}' does not support size measurement",
            a.out_format
        ));
    }
    let mut c = CreateOptions::default();
    for o in &a.options {
        options::apply(&mut c, o)
            .map_err(|e| format!("{e}\nInvalid options for file format '{}'", a.out_format))?;
    }
    // The source: its size, the bytes of its clusters holding data, and
    // its bitmaps.
    let mut source = None;
    if let Some(name) = &a.filename {
        let fmt = parse_format(&a.format)?;
        let mut disk = open_disk(name, fmt, super::open_options(), a.force_share)
            .map_err(|e| format!("Could not open '{name}': {e}"))?;
        if let Some(sn) = &a.snapshot {
            super::convert::load_snapshot(&mut disk, sn)
                .map_err(|(what, why)| format!("{what}: {why}"))?;
        }
        source = Some((disk.size(), data_clusters(&mut disk, c.cluster_size)?, {
            match disk.image() {
                DiskImage::Qcow2(img) if img.header().version >= 3 => Some(img.bitmaps().to_vec()),
                _ => None,
            }
        }));
    }
    let disk_size = size.or(source.as_ref().map(|s| s.0)).unwrap_or(0);
    if a.out_format == "raw" {
        return Ok(Measure {
            bitmaps: None,
            required: disk_size,
            fully_allocated: disk_size,
        });
    }
    c.size = disk_size;
    // qemu-img's wording for an L1 table above its 32 MiB limit.
    let entry = if c.extended_l2 { 16 } else { 8 };
    if c.cluster_size.is_power_of_two()
        && disk_size
            .div_ceil(c.cluster_size)
            .div_ceil(c.cluster_size / entry)
            .saturating_mul(8)
            > qcowkit_core::header::MAX_L1_BYTES
    {
        return Err("The image size is too large (try using a larger cluster size)".into());
    }
    let (cluster_bits, refcount_order) = c.validate().map_err(|e| e.to_string())?;
    let cs = 1u64 << cluster_bits;
    let virtual_size = disk_size.div_ceil(cs) * cs;
    let fully = fully_allocated_size(virtual_size, cs, refcount_order, c.extended_l2);
    let data = match &source {
        _ if matches!(c.preallocation, Preallocation::Full | Preallocation::Falloc) => virtual_size,
        // The new image's backing file may share nothing with the source.
        Some(_) if c.backing_file.is_some() => virtual_size,
        Some((_, data, _)) => *data,
        None => 0,
    };
    let bitmaps = match &source {
        Some((size, _, Some(b))) if c.v3 => Some(bitmaps_size(b, *size, cs)),
        _ => None,
    };
    Ok(Measure {
        bitmaps,
        required: fully - virtual_size + data,
        fully_allocated: fully,
    })
}

/// Bytes of the `cluster_size` clusters of `disk` that hold data somewhere
/// in its chain (zero and unallocated ranges need no cluster).
fn data_clusters(disk: &mut crate::Disk, cluster_size: u64) -> Result<u64, String> {
    let size = disk.size();
    let mut counted_to = 0u64;
    let mut total = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let (st, n) = disk
            .block_status(pos, size - pos)
            .map_err(|e| format!("Unable to get block status: {e}"))?;
        if n == 0 {
            return Err("Unable to get block status: no progress".into());
        }
        if st.data && !st.zero {
            let first = (pos / cluster_size * cluster_size).max(counted_to);
            let end = (pos + n).div_ceil(cluster_size) * cluster_size;
            total += end - first;
            counted_to = end;
        }
        pos += n;
    }
    Ok(total)
}
