//! `qcow2 resize`: grow or shrink the guest disk of a qcow2 (or raw)
//! image, with qemu-img's flags, rules and messages.

use std::path::Path;

use clap::Parser;

use super::parse_format;
use crate::{Follow, Format};
use qcowkit_core::Preallocation;

/// Arguments of `qcow2 resize`.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  qcow2 resize vm.qcow2 +10G\n  qcow2 resize --preallocation=falloc vm.qcow2 40G\n  qcow2 resize --shrink vm.qcow2 8G      deletes what lies past 8 GiB"
)]
pub struct Args {
    /// Image format (probed when omitted).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Quiet: do not print "Image resized.".
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Allow the new size to be smaller (data past it is deleted).
    #[arg(long)]
    pub shrink: bool,
    /// Preallocate the grown range: off, metadata, falloc or full.
    #[arg(long)]
    pub preallocation: Option<String>,
    /// The image.
    pub filename: String,
    /// New size, or `+SIZE` / `-SIZE` relative to the current one
    /// (suffixes k, M, G, T, P, E).
    #[arg(allow_hyphen_values = true)]
    pub size: String,
}

/// Runs `qcow2 resize`.
pub fn run(a: &Args) -> u8 {
    match resize(a) {
        Ok(()) => {
            if !a.quiet {
                println!("Image resized.");
            }
            0
        }
        Err(e) => {
            eprintln!("qcow2: {e}");
            1
        }
    }
}

fn resize(a: &Args) -> Result<(), String> {
    let prealloc = match a.preallocation.as_deref() {
        None => Preallocation::Off,
        Some(p) => qcowkit_options::parse_preallocation(p)
            .ok_or(format!("Invalid preallocation mode '{p}'"))?,
    };
    let (sign, number) = match a.size.as_bytes().first() {
        Some(b'+') => (1i8, &a.size[1..]),
        Some(b'-') => (-1, &a.size[1..]),
        _ => (0, &a.size[..]),
    };
    let n = qcowkit_options::parse_size(number).ok_or(
        "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.",
    )?;
    let path = Path::new(&a.filename);
    let format = match parse_format(&a.format)? {
        Some(f) => f,
        None => crate::FileIo::open(path)
            .and_then(|mut io| crate::probe(&mut io))
            .map_err(|e| format!("Could not open '{}': {e}", a.filename))?,
    };
    let mut img = match format {
        Format::Qcow2 => Some(
            crate::open_qcow2_rw_following(path, &super::open_options(), Follow::Any)
                .map_err(|e| format!("Could not open '{}': {e}", a.filename))?,
        ),
        Format::Raw => None,
    };
    if let Some(img) = &img {
        // qemu-img's refusal, naming the bitmap, before anything is written.
        if let Some(b) = img
            .bitmaps()
            .iter()
            .find(|b| b.flags & qcowkit_core::bitmap::FLAG_IN_USE != 0)
        {
            return Err(format!(
                "Bitmap '{}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk",
                b.name
            ));
        }
    }
    let current = match &img {
        Some(i) => i.size(),
        None => std::fs::metadata(path).map_err(|e| e.to_string())?.len(),
    };
    let total = match sign {
        1 => current.checked_add(n),
        -1 => current.checked_sub(n).filter(|t| *t > 0),
        _ => Some(n).filter(|t| *t > 0),
    }
    .ok_or("New image size must be positive")?;
    if total <= current && prealloc != Preallocation::Off {
        return Err("Preallocation can only be used for growing images".into());
    }
    if total < current && !a.shrink {
        return Err("Use the --shrink option to perform a shrink operation.\nqcow2: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.".into());
    }
    match img.as_mut() {
        Some(i) => i.resize(total, prealloc).map_err(|e| match e {
            // qemu-img's sentence alone.
            qcowkit_core::Error::Format(qcowkit_core::FormatError::InvalidOption {
                reason,
                ..
            }) => reason.to_string(),
            e => e.to_string(),
        }),
        None => {
            if let (Some(p), true) = (&a.preallocation, prealloc != Preallocation::Off) {
                return Err(format!(
                    "Unsupported preallocation mode '{p}' for a raw image"
                ));
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| format!("Could not open '{}': {e}", a.filename))?;
            crate::lock::lock(&f, crate::lock::Access::Write)
                .map_err(|e| format!("Could not open '{}': {e}", a.filename))?;
            f.set_len(total).map_err(|e| e.to_string())
        }
    }
}
