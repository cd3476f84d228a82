//! `qcow2 amend`: change a qcow2 image's options in place (qemu-img's
//! flags and messages): `compat`, `refcount_bits`, `lazy_refcounts`,
//! `data_file`, `data_file_raw=off` and `size`, in qemu-img's order.

use std::path::Path;

use clap::Parser;

use crate::Follow;

/// Arguments of `qcow2 amend`.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  qcow2 amend -o refcount_bits=64 vm.qcow2\n  qcow2 amend -o compat=0.10 vm.qcow2          for version 2 readers\n  qcow2 amend -o data_file=moved.data vm.qcow2"
)]
pub struct Args {
    /// Image format (only `qcow2`).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Options to change: `compat=0.10|1.1`, `refcount_bits=N`,
    /// `lazy_refcounts=on|off`, `data_file=NAME`, `data_file_raw=off`,
    /// `size=SIZE`.
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Show progress (by operation: version, refcount width, data file,
    /// lazy refcounts, size).
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
    let mut o = Amend::default();
    for opt in &a.options {
        for (k, v) in qcowkit_options::split(opt) {
            o.parse(&k, v)?;
        }
    }
    let path = Path::new(&a.filename);
    let mut img = crate::open_qcow2_rw_following(path, &super::open_options(), Follow::Any)
        .map_err(|e| format!("Could not open '{}': {e}", a.filename))?;
    let h = img.header().clone();
    let version = o.version.unwrap_or(h.version);
    // Refusals that need no change first, so that a refused amend leaves
    // the image as it was.
    if (o.backing_file.is_some() || o.backing_fmt.is_some())
        && (o.backing_file != h.backing_file || o.backing_fmt != h.backing_format)
    {
        return Err("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into());
    }
    if o.lazy == Some(true) && version < 3 {
        return Err("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into());
    }
    if let Some(bits) = o.refcount_bits {
        if version < 3 && bits != 16 && bits.is_power_of_two() && bits <= 64 {
            return Err("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into());
        }
    }
    // QEMU's order: upgrade, refcount width, data file, lazy refcounts,
    // size, downgrade; progress counts the operations done.
    let steps = [
        version > h.version,
        o.refcount_bits.is_some(),
        o.data_file_raw.is_some() || o.data_file.is_some(),
        o.lazy.is_some(),
        o.size.is_some(),
        version < h.version,
    ];
    let pb = super::progress::steps(
        a.progress && !a.quiet,
        steps.iter().filter(|s| **s).count() as u64,
    );
    pb.set_position(0);
    if version > h.version {
        img.set_version(version).map_err(strip)?;
        pb.inc(1);
    }
    if let Some(bits) = o.refcount_bits {
        img.set_refcount_bits(bits).map_err(strip)?;
        pb.inc(1);
    }
    if let Some(raw) = o.data_file_raw {
        img.set_data_file_raw(raw).map_err(strip)?;
    }
    if let Some(name) = &o.data_file {
        img.set_data_file_name(name).map_err(strip)?;
    }
    if o.data_file_raw.is_some() || o.data_file.is_some() {
        pb.inc(1);
    }
    if let Some(on) = o.lazy {
        img.set_lazy_refcounts(on).map_err(strip)?;
        pb.inc(1);
    }
    if let Some(size) = o.size {
        img.resize(size, qcowkit_core::Preallocation::Off)
            .map_err(strip)?;
        pb.inc(1);
    }
    if version < h.version {
        img.set_version(version).map_err(strip)?;
        pb.inc(1);
    }
    pb.finish();
    img.flush().map_err(|e| e.to_string())
}

/// The options given to amend.
#[derive(Default)]
struct Amend {
    version: Option<u32>,
    refcount_bits: Option<u32>,
    lazy: Option<bool>,
    data_file: Option<String>,
    data_file_raw: Option<bool>,
    size: Option<u64>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
}

impl Amend {
    fn parse(&mut self, k: &str, v: String) -> Result<(), String> {
        let bool_of = |v: &str| match v {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(format!("Parameter '{k}' expects 'on' or 'off'")),
        };
        match k {
            "compat" => {
                self.version = Some(match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(format!("Unknown compatibility level {v}")),
                })
            }
            "refcount_bits" => {
                let bits = v
                    .parse::<u32>()
                    .map_err(|_| format!("Parameter 'refcount_bits' expects a number, got '{v}'"))?;
                if bits == 0 || bits > 64 || !bits.is_power_of_two() {
                    return Err(
                        "Refcount width must be a power of two and may not exceed 64 bits".into(),
                    );
                }
                self.refcount_bits = Some(bits);
            }
            "lazy_refcounts" => self.lazy = Some(bool_of(&v)?),
            "data_file" => self.data_file = Some(v),
            "data_file_raw" => self.data_file_raw = Some(bool_of(&v)?),
            "size" => {
                self.size = Some(qcowkit_options::parse_size(&v).ok_or(
                    "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.",
                )?)
            }
            "backing_file" => self.backing_file = Some(v),
            "backing_fmt" => self.backing_fmt = Some(v),
            "cluster_size" | "preallocation" | "extended_l2" | "compression_type"
            | "encryption" | "encrypt.format" | "nocow" | "cluster-size" => {
                return Err(format!(
                    "Invalid parameter '{k}'\nThis option is only supported for image creation"
                ))
            }
            _ => return Err(format!("Invalid parameter '{k}'")),
        }
        Ok(())
    }
}

/// qemu-img's sentence alone for refusals.
fn strip(e: crate::DiskError) -> String {
    match e {
        qcowkit_core::Error::Unsupported(why) => why.to_string(),
        e => e.to_string(),
    }
}
