//! `qcow2 create`: new qcow2 images with qemu-img's options.

use std::path::Path;

use clap::Parser;

use super::{options, parse_size, report};
use crate::{Disk, DiskOptions, Format};
use qcowkit_core::{CreateOptions, OpenOptions};

/// Arguments of `qcow2 create`.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  qcow2 create -f qcow2 vm.qcow2 20G\n  qcow2 create -f qcow2 -o cluster_size=128k,extended_l2=on vm.qcow2 20G\n  qcow2 create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2"
)]
pub struct Args {
    /// Image format (only `qcow2`).
    #[arg(short = 'f', default_value = "qcow2")]
    pub format: String,
    /// Creation options (`-o cluster_size=64k,extended_l2=on,...`); may repeat.
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Backing file.
    #[arg(short = 'b')]
    pub backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F')]
    pub backing_format: Option<String>,
    /// Do not open the backing file (the size must then be given).
    #[arg(short = 'u')]
    pub unsafe_backing: bool,
    /// Quiet: do not print the "Formatting" line.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The new image.
    pub filename: String,
    /// Virtual size (suffixes k, M, G, T); defaults to the backing file's size.
    pub size: Option<String>,
}

/// Builds creation options from `-o`, `-b`, `-F` and the size argument.
/// `base` is the image path, against which a backing file is resolved.
pub fn build(
    base: &str,
    options: &[String],
    backing: &Option<String>,
    backing_format: &Option<String>,
    size: &Option<String>,
    open_backing: bool,
) -> Result<CreateOptions, String> {
    let mut c = CreateOptions::default();
    let mut size_given = false;
    // The secret and the iteration time are the command line's business;
    // the rest is the image's.
    let (mut key_secret, mut iter_time) = (None, 2000u64);
    for o in options {
        let mut rest = Vec::new();
        for (k, v) in options::split(o) {
            match k.as_str() {
                "encrypt.key-secret" => key_secret = Some(v),
                "encrypt.iter-time" => {
                    iter_time = v.parse().map_err(|_| {
                        format!("Parameter 'encrypt.iter-time' expects a number, got '{v}'")
                    })?
                }
                _ => rest.push(format!("{k}={}", v.replace(',', ",,"))),
            }
        }
        if !rest.is_empty() {
            size_given |= options::apply(&mut c, &rest.join(",")).map_err(|e| e.to_string())?;
        }
    }
    if let Some(e) = c.encrypt.as_mut() {
        e.passphrase = match key_secret {
            Some(id) => super::secret(&id)?,
            None => super::passphrase()
                .ok_or("Parameter 'encrypt.key-secret' is required for cipher")?,
        };
        let (slot, mk) = crate::luks_iterations(e, iter_time);
        e.slot_iterations = slot;
        e.mk_iterations = mk;
    } else if key_secret.is_some() {
        return Err("encrypt.key-secret needs encrypt.format=luks".into());
    }
    if let Some(b) = backing {
        c.backing_file = Some(b.clone());
    }
    if let Some(f) = backing_format {
        c.backing_format = Some(f.clone());
    }
    if let Some(s) = size {
        c.size = parse_size(s).ok_or(format!("Invalid image size specified: '{s}'"))?;
        if c.size > i64::MAX as u64 {
            return Err(format!(
                "Invalid image size specified. Must be between 0 and {}.",
                i64::MAX
            ));
        }
        size_given = true;
    }
    if let Some(b) = &c.backing_file {
        let fmt = match c.backing_format.as_deref() {
            None => None,
            Some(f) => Some(Format::parse(f).ok_or(format!("Unknown backing file format '{f}'"))?),
        };
        if open_backing || !size_given {
            let full = qcowkit_core::backing::resolve_name(base, b);
            let opts = DiskOptions {
                format: fmt,
                qcow2: OpenOptions {
                    no_backing: false,
                    ..super::open_options()
                },
                follow: crate::Follow::Any,
                ..DiskOptions::default()
            };
            let disk = Disk::open(Path::new(&full), &opts)
                .map_err(|e| format!("Could not open backing file '{full}': {e}"))?;
            if !size_given {
                c.size = disk.size();
                size_given = true;
            }
            if c.backing_format.is_none() {
                c.backing_format = Some(disk.format().name().to_string());
            }
        }
    }
    if !size_given {
        return Err("Image creation needs a size parameter".into());
    }
    Ok(c)
}

/// Runs `qcow2 create`.
pub fn run(a: &Args) -> u8 {
    if a.format != "qcow2" {
        report(
            "create",
            format!("only -f qcow2 is supported, not '{}'", a.format),
        );
        return 1;
    }
    let c = match build(
        &a.filename,
        &a.options,
        &a.backing,
        &a.backing_format,
        &a.size,
        !a.unsafe_backing,
    ) {
        Ok(c) => c,
        Err(e) => {
            report(&a.filename, e);
            return 1;
        }
    };
    if !a.quiet {
        println!("{}", options::describe(&a.filename, &c));
    }
    match crate::create_qcow2(Path::new(&a.filename), &c) {
        Ok(mut img) => match img.flush() {
            Ok(()) => 0,
            Err(e) => {
                report(&a.filename, e);
                1
            }
        },
        Err(e) => {
            report(&a.filename, e);
            1
        }
    }
}
