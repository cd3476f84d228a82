//! `qcow2 amend`: change a qcow2 image's options in place (qemu-img's
//! flags and messages): `refcount_bits` and `lazy_refcounts` so far.

use std::path::Path;

use clap::Parser;

use crate::Follow;
use qcowkit_core::OpenOptions;

/// Arguments of `qcow2 amend`.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  qcow2 amend -o refcount_bits=64 vm.qcow2\n  qcow2 amend -o lazy_refcounts=off vm.qcow2"
)]
pub struct Args {
    /// Image format (only `qcow2`).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Options to change: `refcount_bits=N`, `lazy_refcounts=on|off`.
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Accepted for qemu-img compatibility (the work is quick).
    #[arg(short = 'p')]
    pub progress: bool,
    /// The image.
    pub filename: String,
}

/// Runs `qcow2 amend`.
pub fn run(a: &Args) -> u8 {
    match amend(a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("qcow2: {e}");
            1
        }
    }
}

fn amend(a: &Args) -> Result<(), String> {
    if a.options.is_empty() {
        return Err("Must specify options (-o)\nTry 'qcow2 amend --help' for more info".into());
    }
    if let Some(f) = a.format.as_deref().filter(|f| *f != "qcow2") {
        return Err(format!(
            "Format driver '{f}' does not support option amendment"
        ));
    }
    let mut refcount_bits = None;
    let mut lazy = None;
    for o in &a.options {
        for (k, v) in qcowkit_options::split(o) {
            match k.as_str() {
                "refcount_bits" => {
                    refcount_bits = Some(v.parse::<u32>().map_err(|_| {
                        format!("Parameter 'refcount_bits' expects a number, got '{v}'")
                    })?)
                }
                "lazy_refcounts" => {
                    lazy = Some(match v.as_str() {
                        "on" => true,
                        "off" => false,
                        _ => {
                            return Err("Parameter 'lazy_refcounts' expects 'on' or 'off'".into())
                        }
                    })
                }
                "size" | "cluster_size" | "preallocation" | "extended_l2" | "compression_type"
                | "backing_file" | "backing_fmt" | "data_file" | "data_file_raw" | "compat"
                | "encryption" | "encrypt.format" => {
                    return Err(format!(
                        "Changing the option '{k}' is not supported (yet): only refcount_bits and lazy_refcounts"
                    ))
                }
                _ => return Err(format!("Invalid parameter '{k}'")),
            }
        }
    }
    let mut img = crate::open_qcow2_rw_following(
        Path::new(&a.filename),
        &OpenOptions::default(),
        Follow::Any,
    )
    .map_err(|e| format!("Could not open '{}': {e}", a.filename))?;
    if let Some(bits) = refcount_bits {
        img.set_refcount_bits(bits).map_err(strip)?;
    }
    if let Some(on) = lazy {
        img.set_lazy_refcounts(on).map_err(strip)?;
    }
    img.flush().map_err(|e| e.to_string())
}

/// qemu-img's sentence alone for refusals.
fn strip(e: crate::DiskError) -> String {
    match e {
        qcowkit_core::Error::Unsupported(why) => why.to_string(),
        e => e.to_string(),
    }
}
