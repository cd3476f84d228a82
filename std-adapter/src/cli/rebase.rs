//! `qcow2 rebase`: give an image a new backing file. Safe mode (the
//! default) first copies into the image every cluster it does not hold
//! whose contents differ between the old and the new backing file, so the
//! guest sees the same disk; `-u` only rewrites the name; `-b ""` makes
//! the image stand alone (flatten). qemu-img's flags and messages.

use std::path::Path;

use clap::Parser;

use crate::{Disk, DiskOptions, Follow, Format};
use qcowkit_core::OpenOptions;

/// Arguments of `qcow2 rebase`.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  qcow2 rebase -b new-base.qcow2 -F qcow2 overlay.qcow2\n  qcow2 rebase -u -b moved/base.qcow2 -F qcow2 overlay.qcow2   only the name\n  qcow2 rebase -b \"\" overlay.qcow2                            stand alone"
)]
pub struct Args {
    /// Image format (only `qcow2`).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// The new backing file (relative names are relative to the image's
    /// directory); "" for none.
    #[arg(short = 'b', allow_hyphen_values = true)]
    pub backing: String,
    /// The new backing file's format (needed unless -b "").
    #[arg(short = 'F')]
    pub backing_format: Option<String>,
    /// Unsafe: only change the name (the guest sees whatever the new
    /// backing file holds).
    #[arg(short = 'u')]
    pub unsafe_mode: bool,
    /// Show progress (of the copy of what differs).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image.
    pub filename: String,
}

/// Runs `qcow2 rebase`.
pub fn run(a: &Args) -> u8 {
    match rebase(a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("qcow2: {e}");
            1
        }
    }
}

fn rebase(a: &Args) -> Result<(), String> {
    if let Some(f) = a.format.as_deref().filter(|f| *f != "qcow2") {
        return Err(format!("Format driver '{f}' does not support rebasing"));
    }
    let new_name = (!a.backing.is_empty()).then_some(a.backing.as_str());
    if new_name.is_some() && a.backing_format.is_none() {
        return Err(format!(
            "Could not change the backing file to '{}': backing format must be specified",
            a.backing
        ));
    }
    let path = Path::new(&a.filename);
    let follow = if a.unsafe_mode {
        Follow::None
    } else {
        Follow::Any
    };
    let opts = OpenOptions {
        no_backing: a.unsafe_mode,
        ..super::open_options()
    };
    let mut img = crate::open_qcow2_rw_following(path, &opts, follow)
        .map_err(|e| format!("Could not open '{}': {e}", a.filename))?;
    if !a.unsafe_mode {
        // The new backing file, as the image will name it.
        let mut new = match new_name {
            None => None,
            Some(name) => {
                let full = qcowkit_core::backing::resolve_name(&a.filename, name);
                let fmt = a
                    .backing_format
                    .as_deref()
                    .map(|f| Format::parse(f).ok_or(format!("Unknown file format '{f}'")))
                    .transpose()?;
                let dopts = DiskOptions {
                    format: fmt,
                    force_share: true,
                    ..DiskOptions::default()
                };
                Some(Disk::open(Path::new(&full), &dopts).map_err(|e| {
                    format!(
                        "Could not open new backing file '{name}': Could not open '{full}': {e}"
                    )
                })?)
            }
        };
        let pb = super::progress::bar(a.progress && !a.quiet, img.size());
        img.copy_backing_differences(
            new.as_mut(),
            &mut crate::NativeCodec::all_cores(),
            &mut |done, _| pb.set_position(done),
        )
        .map_err(|e| format!("Error while rebasing: {e}"))?;
        pb.finish_and_clear();
    }
    img.set_backing_name(new_name, new_name.and(a.backing_format.as_deref()))
        .map_err(|e| format!("Could not change the backing file to '{}': {e}", a.backing))?;
    img.flush().map_err(|e| e.to_string())
}
