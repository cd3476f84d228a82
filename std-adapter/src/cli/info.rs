//! `qcow2 info`: qemu-img's keys and layout.

use clap::Parser;
use serde_json::Value;

use super::{human, open_disk, parse_format, report, Output};
use crate::{Disk, Format};
use qcowkit_core::{BlockRead, OpenOptions};

/// Arguments of `qcow2 info`.
#[derive(Debug, Parser)]
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
    /// Accepted for qemu-img compatibility (images are always opened read-only).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
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
    let mut infos = Vec::new();
    let mut next = Some((a.filename.clone(), format));
    while let Some((name, fmt)) = next.take() {
        let opts = OpenOptions {
            no_backing: true,
            no_data_file: true,
            ..OpenOptions::default()
        };
        let disk = match open_disk(&name, fmt, opts) {
            Ok(d) => d,
            Err(e) => {
                report(format!("Could not open '{name}'"), e);
                return 1;
            }
        };
        let v = image_info(&name, disk);
        if a.backing_chain {
            if let Some(full) = v.get("full-backing-filename").and_then(Value::as_str) {
                let bfmt = v
                    .get("backing-filename-format")
                    .and_then(Value::as_str)
                    .and_then(Format::parse);
                if infos.len() > qcowkit_core::DEFAULT_MAX_CHAIN_DEPTH as usize {
                    report("info", "backing chain is too deep or loops");
                    return 1;
                }
                next = Some((full.to_string(), bfmt));
            }
        }
        infos.push(v);
    }
    match a.output {
        Output::Json => {
            let v = if a.backing_chain {
                Value::Array(infos)
            } else {
                infos.pop().unwrap_or(Value::Null)
            };
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Output::Human => {
            let texts: Vec<String> = infos.iter().map(human_info).collect();
            print!("{}", texts.join("\n"));
        }
    }
    0
}

/// Builds qemu-img's JSON object for one image (the core's report).
pub fn image_info(name: &str, disk: Disk) -> Value {
    let text = match disk {
        Disk::Raw(mut raw) => {
            let actual = raw.io.allocated_size().ok().flatten().unwrap_or(0);
            qcowkit_core::report::raw_info_json(name, raw.size, actual)
        }
        Disk::Qcow2(mut img) => {
            let actual = img.allocated_size().ok().flatten().unwrap_or(0);
            let full = img
                .header()
                .backing_file
                .as_deref()
                .map(|b| qcowkit_core::backing::resolve_name(name, b));
            let p = qcowkit_core::report::InfoParams {
                filename: name,
                full_backing_filename: full.as_deref(),
                actual_size: actual,
            };
            qcowkit_core::report::info_json(&img, &p)
        }
    };
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Renders qemu-img's human layout from the JSON object.
pub fn human_info(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let mut out = String::new();
    out += &format!("image: {}\n", s("filename"));
    out += &format!("file format: {}\n", s("format"));
    out += &format!(
        "virtual size: {} ({} bytes)\n",
        human::size(n("virtual-size")),
        n("virtual-size")
    );
    out += &format!("disk size: {}\n", human::size(n("actual-size")));
    if v.get("cluster-size").is_some() {
        out += &format!("cluster_size: {}\n", n("cluster-size"));
    }
    if v.get("backing-filename").is_some() {
        let (b, full) = (s("backing-filename"), s("full-backing-filename"));
        if b == full {
            out += &format!("backing file: {b}\n");
        } else {
            out += &format!("backing file: {b} (actual path: {full})\n");
        }
        if v.get("backing-filename-format").is_some() {
            out += &format!("backing file format: {}\n", s("backing-filename-format"));
        }
    }
    if let Some(Value::Array(snaps)) = v.get("snapshots") {
        out += "Snapshot list:\n";
        out += &format!(
            "{:<7} {:<17} {:>7}{:>20}{:>16}{:>11}\n",
            "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
        );
        for sn in snaps {
            let g = |k: &str| sn.get(k).and_then(Value::as_u64).unwrap_or(0);
            let icount = sn
                .get("icount")
                .and_then(Value::as_u64)
                .map(|i| i.to_string())
                .unwrap_or_default();
            out += &format!(
                "{:<7} {:<17} {:>7}{:>20}{:>16}{:>11}\n",
                sn.get("id").and_then(Value::as_str).unwrap_or(""),
                sn.get("name").and_then(Value::as_str).unwrap_or(""),
                human::size(g("vm-state-size")),
                human::date(g("date-sec")),
                human::vm_clock(g("vm-clock-sec") * 1_000_000_000 + g("vm-clock-nsec")),
                icount
            );
        }
    }
    if let Some(data) = v
        .pointer("/format-specific/data")
        .and_then(Value::as_object)
    {
        out += "Format specific information:\n";
        for (k, val) in data {
            let key = k.replace('-', " ");
            match val {
                Value::Array(items) => {
                    out += &format!("    {key}:\n");
                    for (i, item) in items.iter().enumerate() {
                        out += &format!("        [{i}]:\n");
                        if let Some(obj) = item.as_object() {
                            for (ik, iv) in obj {
                                match iv {
                                    Value::Array(fl) => {
                                        out += &format!("            {ik}:\n");
                                        for (j, f) in fl.iter().enumerate() {
                                            out += &format!(
                                                "                [{j}]: {}\n",
                                                f.as_str().unwrap_or("")
                                            );
                                        }
                                    }
                                    other => {
                                        out += &format!("            {ik}: {}\n", plain(other))
                                    }
                                }
                            }
                        }
                    }
                }
                other => out += &format!("    {key}: {}\n", plain(other)),
            }
        }
    }
    out
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
