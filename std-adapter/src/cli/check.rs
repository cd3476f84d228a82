//! `qcow2 check`: read-only consistency check with qemu-img's exit codes
//! (0 clean, 1 check failed, 2 corruptions, 3 leaks only).

use clap::Parser;

use super::{open_disk, parse_format, report, Output};
use crate::DiskImage;
use qcowkit_core::report::CheckSummary;
use qcowkit_core::{CheckReport, OpenOptions, RepairMode};

/// Arguments of `qcow2 check`.
#[derive(Debug, Parser)]
#[command(
    after_help = "Exit status: 0 clean, 2 corruptions, 3 leaked clusters only, 1 the check failed, 63 not a qcow2 image.\n\nExamples:\n  qcow2 check vm.qcow2\n  qcow2 check -r leaks vm.qcow2     free leaked clusters\n  qcow2 check -r all --output=json vm.qcow2"
)]
pub struct Args {
    /// Image format; probed when omitted.
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub output: Output,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Take no locks (inspect an image in use); not with `-r`.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Repair: `leaks` frees leaked clusters; `all` also fixes refcounts
    /// that are too low and COPIED flags, and rebuilds a broken refcount
    /// structure. The corrupt and dirty bits are cleared once nothing is
    /// left to fix. Guest data is never changed.
    #[arg(short = 'r', long = "repair", value_parser = ["leaks", "all"])]
    pub repair: Option<String>,
    /// The image.
    pub filename: String,
}

/// Exit status for a report, as qemu-img computes it.
pub fn exit_code(r: &CheckReport) -> u8 {
    if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    }
}

/// Runs `qcow2 check`.
pub fn run(a: &Args) -> u8 {
    let fmt = match parse_format(&a.format) {
        Ok(f) => f,
        Err(e) => {
            report("check", e);
            return 1;
        }
    };
    if let Some(mode) = &a.repair {
        return repair(a, fmt, mode);
    }
    let opts = OpenOptions {
        no_backing: true,
        no_data_file: true,
        check_mode: true,
        ..super::open_options()
    };
    let disk = match open_disk(&a.filename, fmt, opts, a.force_share) {
        Ok(d) => d,
        Err(e) => {
            report(format!("Could not open '{}'", a.filename), e);
            return 1;
        }
    };
    let mut img = match disk.into_image() {
        DiskImage::Qcow2(img) => img,
        DiskImage::Raw { .. } => {
            report("check", "This image format does not support checks");
            return 63;
        }
    };
    // Problems are printed as they are found (like qemu-img), so memory
    // stays bounded however damaged the image is.
    let r = match img.check_with(&mut |line| eprintln!("{line}")) {
        Ok(r) => r,
        Err(e) => {
            report("check", e);
            return 1;
        }
    };
    print_report(a, &r);
    exit_code(&r)
}

/// Prints the summary (or JSON) of the last check.
fn print_report(a: &Args, r: &CheckReport) {
    match a.output {
        Output::Json => {
            let summary = CheckSummary::of(r, &a.filename);
            println!("{}", super::json_text(&summary));
        }
        Output::Human if !a.quiet || exit_code(r) != 0 => print!("{}", human(r)),
        Output::Human => {}
    }
}

/// `check -r MODE`: repairs, then reports the check made after it.
fn repair(a: &Args, fmt: Option<crate::Format>, mode: &str) -> u8 {
    if a.force_share {
        report(
            "check",
            "--force-share/-U cannot be used with -r (a repair writes)",
        );
        return 1;
    }
    let path = std::path::Path::new(&a.filename);
    let format = match fmt {
        Some(f) => f,
        None => match crate::FileIo::open(path).and_then(|mut io| crate::probe(&mut io)) {
            Ok(f) => f,
            Err(e) => {
                report(format!("Could not open '{}'", a.filename), e);
                return 1;
            }
        },
    };
    if format != crate::Format::Qcow2 {
        report("check", "This image format does not support checks");
        return 63;
    }
    let mut img = match crate::open_qcow2_for_repair(path) {
        Ok(i) => i,
        Err(e) => {
            report(format!("Could not open '{}'", a.filename), e);
            return 1;
        }
    };
    let mode = if mode == "all" {
        RepairMode::All
    } else {
        RepairMode::Leaks
    };
    let done = match img.repair(mode, &mut |line| eprintln!("{line}")) {
        Ok(d) => d,
        Err(e) => {
            report("Check failed", e);
            return 1;
        }
    };
    let r = &done.left;
    if a.output == Output::Human && !a.quiet && r.leaks_fixed + r.corruptions_fixed > 0 {
        print!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    print_report(a, r);
    exit_code(r)
}

/// qemu-img's human summary.
pub fn human(r: &CheckReport) -> String {
    let mut out = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out += "No errors were found on the image.\n";
    } else {
        if r.corruptions > 0 {
            out += &format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            out += &format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            out += &format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            );
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let a = r.allocated_clusters as f64;
        out += &format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            a * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / a,
            r.compressed_clusters as f64 * 100.0 / a
        );
    }
    if r.image_end_offset > 0 {
        out += &format!("Image end offset: {}\n", r.image_end_offset);
    }
    out
}
