//! `qcow2 map`: the allocation map, as `qemu-img map` prints it.

use clap::Parser;

use super::{parse_format, report, Output};
use crate::Disk;
use qcowkit_core::report::MapEntry;
use qcowkit_core::BlockStatus;

/// Arguments of `qcow2 map`.
#[derive(Debug, Parser)]
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

/// Collects the merged map of `[start, end)`.
pub fn collect(disk: &mut Disk, start: u64, end: u64) -> Result<Vec<Entry>, crate::DiskError> {
    let merged = qcowkit_core::map::merged_map(start, end, |pos, len| disk.block_status(pos, len))?;
    Ok(merged
        .into_iter()
        .map(|(start, length, status)| Entry {
            start,
            length,
            status,
        })
        .collect())
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
    let entries = match collect(&mut disk, start.min(size), end) {
        Ok(e) => e,
        Err(e) => {
            report("map", e);
            return 1;
        }
    };
    match a.output {
        Output::Json => {
            let lines: Vec<String> = entries.iter().map(json_line).collect();
            println!("[{}]", lines.join(",\n"));
            0
        }
        Output::Human => {
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for e in &entries {
                let s = &e.status;
                if s.data && s.offset.is_none() {
                    report(
                        "map",
                        "File contains external, encrypted or compressed clusters.",
                    );
                    return 1;
                }
                if s.data && !s.zero {
                    let file = layer_name(&disk, s.depth, s.external);
                    println!(
                        "{:<16}{:<16}{:<16}{}",
                        hex(e.start),
                        hex(e.length),
                        hex(s.offset.unwrap_or(0)),
                        file
                    );
                }
            }
            0
        }
    }
}

/// `%#x` (no prefix for zero), like qemu-img.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

fn layer_name(disk: &Disk, depth: u32, external: bool) -> String {
    let Disk::Qcow2(img) = disk else {
        return String::new();
    };
    let mut cur: &qcowkit_core::Image<crate::FileIo> = img;
    for _ in 0..depth {
        match cur.backing() {
            Some(qcowkit_core::Backing::Qcow2(b)) => cur = b,
            Some(b @ qcowkit_core::Backing::Raw { .. }) => return b.name().to_string(),
            None => break,
        }
    }
    if external {
        let df = cur.header().data_file.clone().unwrap_or_default();
        return qcowkit_core::backing::resolve_name(cur.name(), &df);
    }
    cur.name().to_string()
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
