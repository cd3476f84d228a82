//! `qcow2 map`: the allocation map, as `qemu-img map` prints it.

use std::io::Write;

use clap::Parser;

use super::{parse_format, report, Output};
use crate::{Disk, DiskImage};
use qcowkit_core::report::MapEntry;
use qcowkit_core::BlockStatus;

/// Arguments of `qcow2 map`.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  qcow2 map vm.qcow2\n  qcow2 map --output=json -s 1G -l 64M vm.qcow2"
)]
pub struct Args {
    /// Image format; probed when omitted.
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub output: Output,
    /// First guest offset to map.
    #[arg(short = 's', long = "start-offset")]
    pub start_offset: Option<String>,
    /// Number of bytes to map.
    #[arg(short = 'l', long = "max-length")]
    pub max_length: Option<String>,
    /// Accepted for qemu-img compatibility.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// L2 cache size in bytes (suffixes k, M, G).
    #[arg(long = "l2-cache-size")]
    pub l2_cache_size: Option<String>,
    /// Which files named by the image to open.
    #[command(flatten)]
    pub files: super::FollowArgs,
    /// The image.
    pub filename: String,
}

/// One merged range of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Status of the range.
    pub status: BlockStatus,
}

/// Runs `qcow2 map`.
pub fn run(a: &Args) -> u8 {
    let fmt = match parse_format(&a.format) {
        Ok(f) => f,
        Err(e) => {
            report("map", e);
            return 1;
        }
    };
    let opts = match super::cache_options(&a.l2_cache_size) {
        Ok(o) => o,
        Err(e) => {
            report("map", e);
            return 1;
        }
    };
    let mut disk =
        match super::open_disk_with(&a.filename, fmt, opts, a.files.policy(), a.force_share) {
            Ok(d) => d,
            Err(e) => {
                report(format!("Could not open '{}'", a.filename), e);
                return 1;
            }
        };
    let size = disk.size();
    let parse = |s: &Option<String>, default: u64| match s {
        None => Some(default),
        Some(v) => super::parse_size(v),
    };
    let (Some(start), Some(len)) = (parse(&a.start_offset, 0), parse(&a.max_length, size)) else {
        report("map", "invalid offset or length");
        return 1;
    };
    let end = start.saturating_add(len).min(size);
    // Printed as the map is walked, like qemu-img (memory stays flat).
    let names = layer_names(&disk);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut first = true;
    let human = a.output == Output::Human;
    if human {
        let _ = writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        );
    }
    let walked = qcowkit_core::map::for_each_merged(
        start.min(size),
        end,
        |pos, len| disk.block_status(pos, len).map_err(Stop::Disk),
        |(start, length, status)| {
            let e = Entry {
                start,
                length,
                status,
            };
            if !human {
                let sep = if first { "[" } else { ",\n" };
                first = false;
                return write!(out, "{sep}{}", json_line(&e)).map_err(Stop::Out);
            }
            let s = &e.status;
            if s.data && s.offset.is_none() {
                return Err(Stop::Compressed);
            }
            if s.data && !s.zero {
                let file = names.name(s.depth, s.external);
                writeln!(
                    out,
                    "{:<16}{:<16}{:<16}{}",
                    hex(e.start),
                    hex(e.length),
                    hex(s.offset.unwrap_or(0)),
                    file
                )
                .map_err(Stop::Out)?;
            }
            Ok(())
        },
    );
    if !human && walked.is_ok() {
        let _ = writeln!(out, "{}]", if first { "[" } else { "" });
    }
    let _ = out.flush();
    match walked {
        Ok(()) => 0,
        Err(Stop::Compressed) => {
            report(
                "map",
                "File contains external, encrypted or compressed clusters.",
            );
            1
        }
        Err(Stop::Disk(e)) => {
            report("map", e);
            1
        }
        Err(Stop::Out(e)) => {
            report("map", e);
            1
        }
    }
}

/// Why printing the map stopped.
enum Stop {
    Disk(crate::DiskError),
    Compressed,
    Out(std::io::Error),
}

/// The file names of a chain's layers, for the human map.
struct LayerNames {
    /// (image name, its external data file resolved) per depth; a raw
    /// backing file last.
    layers: Vec<(String, String)>,
}

impl LayerNames {
    fn name(&self, depth: u32, external: bool) -> &str {
        match self.layers.get(depth as usize) {
            Some((_, df)) if external => df,
            Some((n, _)) => n,
            None => "",
        }
    }
}

fn layer_names(disk: &Disk) -> LayerNames {
    let mut layers = Vec::new();
    let DiskImage::Qcow2(img) = disk.image() else {
        return LayerNames { layers };
    };
    let mut cur: &qcowkit_core::Image<crate::FileIo> = img;
    loop {
        let df = cur.header().data_file.clone().unwrap_or_default();
        layers.push((
            cur.name().to_string(),
            qcowkit_core::backing::resolve_name(cur.name(), &df),
        ));
        match cur.backing() {
            Some(qcowkit_core::Backing::Qcow2(b)) => cur = b,
            Some(b @ qcowkit_core::Backing::Raw { .. }) => {
                layers.push((b.name().to_string(), String::new()));
                break;
            }
            None => break,
        }
    }
    LayerNames { layers }
}

/// `%#x` (no prefix for zero), like qemu-img.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// qemu-img's spacing of map entries: `{ "key": value, "key": value}`.
struct QemuLine;

impl serde_json::ser::Formatter for QemuLine {
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b"{ ")
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// One entry in `qemu-img map --output=json` syntax.
pub fn json_line(e: &Entry) -> String {
    use serde::Serialize;
    let entry = MapEntry::new(e.start, e.length, &e.status);
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuLine);
    match entry.serialize(&mut ser) {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(_) => String::new(),
    }
}
