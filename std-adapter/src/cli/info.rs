//! `qcow2 info`: qemu-img's keys and layout.

use clap::Parser;

use super::{human, open_disk, parse_format, report, Output};
use crate::{Disk, DiskImage, Format};
use qcowkit_core::report::{Info, InfoParams};
use qcowkit_core::{BlockRead, OpenOptions};

/// Arguments of `qcow2 info`.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  qcow2 info vm.qcow2\n  qcow2 info --output=json --backing-chain overlay.qcow2"
)]
pub struct Args {
    /// Image format (`qcow2` or `raw`); probed when omitted.
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub output: Output,
    /// Show every image of the backing chain.
    #[arg(long = "backing-chain")]
    pub backing_chain: bool,
    /// Read without taking locks (an image another process is writing).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Which backing files `--backing-chain` opens.
    #[command(flatten)]
    pub files: super::FollowArgs,
    /// The image.
    pub filename: String,
}

/// Runs `qcow2 info`.
pub fn run(a: &Args) -> u8 {
    let format = match parse_format(&a.format) {
        Ok(f) => f,
        Err(e) => {
            report("info", e);
            return 1;
        }
    };
    let mut infos: Vec<Info> = Vec::new();
    let mut next = Some((a.filename.clone(), format));
    while let Some((name, fmt)) = next.take() {
        let opts = OpenOptions {
            no_backing: true,
            no_data_file: true,
            ..super::open_options()
        };
        let disk = match open_disk(&name, fmt, opts, a.force_share) {
            Ok(d) => d,
            Err(e) => {
                report(format!("Could not open '{name}'"), e);
                return 1;
            }
        };
        let info = image_info(&name, disk);
        if a.backing_chain {
            if let Some(stored) = &info.backing_filename {
                let bfmt = info
                    .backing_filename_format
                    .as_deref()
                    .and_then(Format::parse);
                if infos.len() > qcowkit_core::DEFAULT_MAX_CHAIN_DEPTH as usize {
                    report("info", "backing chain is too deep or loops");
                    return 1;
                }
                let role = qcowkit_core::FileRole::Backing;
                match crate::check_follow(a.files.policy(), &name, stored, role) {
                    Ok(path) => next = Some((path.to_string_lossy().into_owned(), bfmt)),
                    Err(e) => {
                        report(format!("Could not open '{name}''s backing file"), e);
                        return 1;
                    }
                }
            }
        }
        infos.push(info);
    }
    match a.output {
        Output::Json => {
            let text = if a.backing_chain {
                super::json_text(&infos)
            } else {
                super::json_text(&infos.pop())
            };
            println!("{text}");
        }
        Output::Human => {
            let texts: Vec<String> = infos.iter().map(human_info).collect();
            print!("{}", texts.join("\n"));
        }
    }
    0
}

/// qemu-img's info report for one image.
pub fn image_info(name: &str, disk: Disk) -> Info {
    match disk.into_image() {
        DiskImage::Raw(mut raw) => {
            let actual = raw.io.allocated_size().ok().flatten().unwrap_or(0);
            Info::raw(name, raw.size, actual)
        }
        DiskImage::Qcow2(mut img) => {
            let actual = img.allocated_size().ok().flatten().unwrap_or(0);
            let full = img
                .header()
                .backing_file
                .as_deref()
                .map(|b| qcowkit_core::backing::resolve_name(name, b));
            let data = img
                .header()
                .data_file
                .as_deref()
                .map(|d| qcowkit_core::backing::resolve_name(name, d));
            let p = InfoParams {
                filename: name,
                full_backing_filename: full.as_deref(),
                full_data_filename: data.as_deref(),
                actual_size: actual,
            };
            Info::of(&img, &p)
        }
    }
}

/// qemu-img's snapshot table (header line and one line per snapshot), as
/// `info` and `snapshot -l` print it.
pub fn snapshot_table(snapshots: &[qcowkit_core::report::SnapshotInfo]) -> String {
    let mut out = format!(
        "{:<7} {:<17} {:>7}{:>20}{:>16}{:>11}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snapshots {
        out += &format!(
            "{:<7} {:<17} {:>7}{:>20}{:>16}{:>11}\n",
            sn.id,
            sn.name,
            human::size(sn.vm_state_size),
            human::date(sn.date_sec),
            human::vm_clock(sn.vm_clock_sec * 1_000_000_000 + sn.vm_clock_nsec),
            sn.icount.map(|i| i.to_string()).unwrap_or_default()
        );
    }
    out
}

/// Renders qemu-img's human layout of an info report.
pub fn human_info(v: &Info) -> String {
    let mut out = String::new();
    out += &format!("image: {}\n", v.filename);
    out += &format!("file format: {}\n", v.format);
    out += &format!(
        "virtual size: {} ({} bytes)\n",
        human::size(v.virtual_size),
        v.virtual_size
    );
    out += &format!("disk size: {}\n", human::size(v.actual_size));
    if v.encrypted == Some(true) {
        out += "encrypted: yes\n";
    }
    if let Some(cs) = v.cluster_size {
        out += &format!("cluster_size: {cs}\n");
    }
    if let Some(b) = &v.backing_filename {
        let full = v.full_backing_filename.as_deref().unwrap_or("");
        if b == full {
            out += &format!("backing file: {b}\n");
        } else {
            out += &format!("backing file: {b} (actual path: {full})\n");
        }
        if let Some(f) = &v.backing_filename_format {
            out += &format!("backing file format: {f}\n");
        }
    }
    if !v.snapshots.is_empty() {
        out += "Snapshot list:\n";
        out += &snapshot_table(&v.snapshots);
    }
    if let Some(fs) = &v.format_specific {
        let d = &fs.data;
        out += "Format specific information:\n";
        out += &format!("    compat: {}\n", d.compat);
        out += &format!("    compression type: {}\n", d.compression_type);
        if let Some(l) = d.lazy_refcounts {
            out += &format!("    lazy refcounts: {l}\n");
        }
        if let Some(bitmaps) = &d.bitmaps {
            out += "    bitmaps:\n";
            for (i, b) in bitmaps.iter().enumerate() {
                out += &format!("        [{i}]:\n");
                out += "            flags:\n";
                for (j, f) in b.flags.iter().enumerate() {
                    out += &format!("                [{j}]: {f}\n");
                }
                out += &format!("            name: {}\n", b.name);
                out += &format!("            granularity: {}\n", b.granularity);
            }
        }
        out += &format!("    refcount bits: {}\n", d.refcount_bits);
        if let Some(e) = &d.encrypt {
            out += &encrypt_block(e);
        }
        if let Some(df) = &d.data_file {
            out += &format!("    data file: {df}\n");
        }
        if let Some(raw) = d.data_file_raw {
            out += &format!("    data file raw: {raw}\n");
        }
        if let Some(c) = d.corrupt {
            out += &format!("    corrupt: {c}\n");
        }
        if let Some(e) = d.extended_l2 {
            out += &format!("    extended l2: {e}\n");
        }
    }
    out
}

/// qemu-img's human layout of the encryption facts.
fn encrypt_block(e: &qcowkit_core::report::EncryptInfo) -> String {
    let mut out = String::from("    encrypt:\n");
    let mut line = |k: &str, v: &dyn std::fmt::Display| out += &format!("        {k}: {v}\n");
    if let Some(v) = &e.ivgen_alg {
        line("ivgen alg", v);
    }
    if let Some(v) = e.detached_header {
        line("detached header", &v);
    }
    if let Some(v) = &e.hash_alg {
        line("hash alg", v);
    }
    if let Some(v) = &e.cipher_alg {
        line("cipher alg", v);
    }
    if let Some(v) = &e.uuid {
        line("uuid", v);
    }
    if let Some(v) = &e.ivgen_hash_alg {
        line("ivgen hash alg", v);
    }
    line("format", &e.format);
    if let Some(v) = &e.cipher_mode {
        line("cipher mode", v);
    }
    if let Some(slots) = &e.slots {
        out += "        slots:\n";
        for (i, s) in slots.iter().enumerate() {
            out += &format!("            [{i}]:\n");
            out += &format!("                active: {}\n", s.active);
            if let Some(n) = s.iters {
                out += &format!("                iters: {n}\n");
            }
            out += &format!("                key offset: {}\n", s.key_offset);
            if let Some(n) = s.stripes {
                out += &format!("                stripes: {n}\n");
            }
        }
    }
    if let Some(v) = e.payload_offset {
        out += &format!("        payload offset: {v}\n");
    }
    if let Some(v) = e.master_key_iters {
        out += &format!("        master key iters: {v}\n");
    }
    out
}
