//! `qcow2 dd`: qemu-img dd's `key=value` syntax, copying guest data to a raw file.

use super::convert::{CopyError, Writing};
use super::{parse_size, report};
use crate::{CacheMode, Format, NativeCodec};
use qcowkit_core::copy::{copy, CopyOptions, ImageSink};

/// Parsed dd arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdArgs {
    /// Input image.
    pub input: String,
    /// Output file.
    pub output: String,
    /// Block size in bytes.
    pub bs: u64,
    /// Number of blocks to copy (all when `None`).
    pub count: Option<u64>,
    /// Blocks to skip in the input.
    pub skip: u64,
    /// Input format.
    pub format: Option<Format>,
    /// Output format (raw unless `-O qcow2`).
    pub output_format: Format,
    /// Which files named by the input image to open (`--no-follow`,
    /// `--follow=any|inside|none`).
    pub follow: crate::Follow,
}

/// Parses `if= of= bs= count= skip=` and `-f FMT` / `-O FMT`.
pub fn parse(args: &[String]) -> Result<DdArgs, String> {
    let mut input = None;
    let mut output = None;
    let mut bs = 512u64;
    let mut count = None;
    let mut skip = 0u64;
    let mut format = None;
    let mut output_format = Format::Raw;
    let mut follow = crate::Follow::Any;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--no-follow" {
            follow = crate::Follow::None;
            continue;
        }
        if let Some(p) = a.strip_prefix("--follow=") {
            follow = match p {
                "any" => crate::Follow::Any,
                "inside" => crate::Follow::Inside,
                "none" => crate::Follow::None,
                _ => return Err(format!("invalid --follow policy '{p}' (any, inside, none)")),
            };
            continue;
        }
        if a == "-f" || a == "-O" {
            let v = it.next().ok_or(format!("option {a} needs a value"))?;
            let f = Format::parse(v).ok_or(format!("Unknown file format '{v}'"))?;
            if a == "-f" {
                format = Some(f);
            } else {
                output_format = f;
            }
            continue;
        }
        let (k, v) = a
            .split_once('=')
            .ok_or(format!("unrecognized operand {a}"))?;
        let num = || parse_size(v).ok_or(format!("invalid number: '{v}'"));
        match k {
            "if" => input = Some(v.to_string()),
            "of" => output = Some(v.to_string()),
            "bs" => {
                bs = num()?;
                if bs == 0 {
                    return Err(format!("invalid number: '{v}'"));
                }
            }
            "count" => count = Some(num()?),
            "skip" => skip = num()?,
            _ => return Err(format!("unrecognized operand {a}")),
        }
    }
    Ok(DdArgs {
        input: input.ok_or("Must specify both input and output files")?,
        output: output.ok_or("Must specify both input and output files")?,
        bs,
        count,
        skip,
        format,
        output_format,
        follow,
    })
}

/// Runs `qcow2 dd`.
pub fn run(args: &[String]) -> u8 {
    let a = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            report("dd", e);
            return 1;
        }
    };
    let opened = super::open_disk_with(&a.input, a.format, super::open_options(), a.follow, false);
    let mut disk = match opened {
        Ok(d) => d,
        Err(e) => {
            report(format!("Could not open '{}'", a.input), e);
            return 1;
        }
    };
    // qemu-img dd counts `count` from the start of the input, skipped
    // blocks included, and sizes the output up to a multiple of 512.
    let size = disk.size();
    let start = a.skip.saturating_mul(a.bs).min(size);
    let end = match a.count {
        Some(c) => c.saturating_mul(a.bs).min(size),
        None => size,
    };
    let len = end.saturating_sub(start);
    let out_len = len.div_ceil(512) * 512;
    enum Out {
        Raw(crate::FileIo),
        Qcow2(Box<qcowkit_core::WritableImage<crate::FileIo>>),
    }
    // Written without intermediate syncs (the target is of no use until
    // complete), then synced once when done, as qemu-img dd's close does.
    let mut out = match a.output_format {
        Format::Raw => match super::convert::create_raw(&a.output, out_len, CacheMode::Unsafe) {
            Ok(f) => Out::Raw(f),
            Err(e) => {
                report(format!("Could not open '{}'", a.output), e);
                return 1;
            }
        },
        Format::Qcow2 => {
            let c = qcowkit_core::CreateOptions {
                size: out_len,
                ..qcowkit_core::CreateOptions::default()
            };
            match crate::create_qcow2_with(std::path::Path::new(&a.output), &c, CacheMode::Unsafe) {
                Ok(img) => Out::Qcow2(Box::new(img)),
                Err(e) => {
                    report(format!("Could not create '{}'", a.output), e);
                    return 1;
                }
            }
        }
    };
    let chunk = a.bs.clamp(4096, 4 << 20) as usize;
    let copied = match &mut out {
        Out::Raw(f) => {
            let pb = indicatif::ProgressBar::hidden();
            super::convert::copy_range_to_raw(&mut disk, start, end.max(start), f, &pb).and_then(
                |()| {
                    f.file()
                        .sync_data()
                        .map_err(|e| CopyError::Write(e.to_string()))
                },
            )
        }
        Out::Qcow2(img) => {
            let cs = img.cluster_size();
            let mut sink = ImageSink::new(img);
            sink.shift = start;
            let opts = CopyOptions { chunk, align: cs };
            let pb = indicatif::ProgressBar::hidden();
            let mut target = Writing { sink, pb: &pb };
            let copied = copy(
                &mut disk,
                start,
                end.max(start),
                opts,
                &mut NativeCodec::all_cores(),
                &mut target,
            );
            // Flushed either way: on an error, what was written stays
            // durable and referenced (closing cleanly, as QEMU does).
            let flushed = img
                .flush()
                .and_then(|()| super::convert::sync_target(img).map_err(qcowkit_core::Error::Io))
                .map_err(|e| CopyError::Write(e.to_string()));
            copied.and(flushed)
        }
    };
    match copied {
        Ok(()) => 0,
        Err(CopyError::Read(e)) => {
            report("error while reading", e);
            1
        }
        Err(CopyError::Write(e)) => {
            report(format!("Could not write '{}'", a.output), e);
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_operands() {
        let a = parse(&s(&[
            "if=a.qcow2",
            "of=b",
            "bs=1M",
            "count=3",
            "skip=2",
            "-f",
            "qcow2",
        ]))
        .unwrap();
        assert_eq!(a.bs, 1 << 20);
        assert_eq!(a.count, Some(3));
        assert_eq!(a.skip, 2);
        assert_eq!(a.format, Some(Format::Qcow2));
        assert!(parse(&s(&["if=a"])).is_err());
        assert!(parse(&s(&["if=a", "of=b", "bs=0"])).is_err());
        assert!(parse(&s(&["if=a", "of=b", "foo=1"])).is_err());
        let q = parse(&s(&["-O", "qcow2", "if=a", "of=b", "--no-follow"])).unwrap();
        assert_eq!(q.output_format, Format::Qcow2);
        assert_eq!(q.follow, crate::Follow::None);
        let i = parse(&s(&["if=a", "of=b", "--follow=inside"])).unwrap();
        assert_eq!(i.follow, crate::Follow::Inside);
        assert!(parse(&s(&["if=a", "of=b", "--follow=maybe"])).is_err());
    }
}
