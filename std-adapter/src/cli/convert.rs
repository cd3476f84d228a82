//! `qcow2 convert`: guest data into a sparse raw file or a new qcow2 image.

use std::fs::OpenOptions as FsOpenOptions;
use std::os::unix::fs::FileExt;

use clap::Parser;

use super::{parse_format, progress, report};
use crate::{Disk, Format};

/// Size of the copy buffer.
pub const CHUNK: u64 = 2 * 1024 * 1024;
/// Buffers in flight between the reading and the writing thread.
const IN_FLIGHT: usize = 4;

/// Arguments of `qcow2 convert`.
#[derive(Debug, Parser)]
pub struct Args {
    /// Source format (`qcow2` or `raw`); probed when omitted.
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Output format (`raw` or `qcow2`).
    #[arg(short = 'O', default_value = "raw")]
    pub output_format: String,
    /// Creation options of a qcow2 target (as for `create`); may repeat.
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Compress every cluster of a qcow2 target (when it gets smaller).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Backing file of a qcow2 target: only what differs from it is written.
    #[arg(short = 'B')]
    pub backing: Option<String>,
    /// Format of the `-B` backing file.
    #[arg(short = 'F')]
    pub backing_format: Option<String>,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Accepted for qemu-img compatibility (images are opened read-only).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// L2 cache size in bytes (suffixes k, M, G).
    #[arg(long = "l2-cache-size")]
    pub l2_cache_size: Option<String>,
    /// Refuse to open backing and data files the image names (for untrusted images).
    #[arg(long = "no-follow")]
    pub no_follow: bool,
    /// Source image.
    pub source: String,
    /// Destination file.
    pub dest: String,
}

/// Runs `qcow2 convert`.
pub fn run(a: &Args) -> u8 {
    match convert(a) {
        Ok(()) => 0,
        Err((what, why)) => {
            report(what, why);
            1
        }
    }
}

fn convert(a: &Args) -> Result<(), (String, String)> {
    let src_fmt = parse_format(&a.format).map_err(|e| ("convert".to_string(), e))?;
    let out_fmt = Format::parse(&a.output_format).ok_or((
        "convert".to_string(),
        format!("Unknown file format '{}'", a.output_format),
    ))?;
    if out_fmt == Format::Raw && (a.compress || a.backing.is_some() || !a.options.is_empty()) {
        return Err((
            "convert".into(),
            "-c, -B and -o need a qcow2 target (-O qcow2)".into(),
        ));
    }
    let opts = super::cache_options(&a.l2_cache_size).map_err(|e| ("convert".to_string(), e))?;
    let mut disk = super::open_disk_with(&a.source, src_fmt, opts, a.no_follow)
        .map_err(|e| (format!("Could not open '{}'", a.source), e.to_string()))?;
    match out_fmt {
        Format::Raw => copy_to_raw(&mut disk, &a.dest, a.progress),
        Format::Qcow2 => copy_to_qcow2(&mut disk, a),
    }
}

/// Copies the guest contents of `disk` into a new qcow2 image.
fn copy_to_qcow2(disk: &mut Disk, a: &Args) -> Result<(), (String, String)> {
    let size = disk.size();
    let mut copts = super::create::build(
        &a.dest,
        &a.options,
        &a.backing,
        &a.backing_format,
        &Some(size.to_string()),
        true,
    )
    .map_err(|e| (a.dest.clone(), e))?;
    copts.size = size;
    let mut img = crate::create_qcow2(std::path::Path::new(&a.dest), &copts)
        .map_err(|e| (a.dest.clone(), e.to_string()))?;
    let with_backing = a.backing.is_some();
    let cs = img.cluster_size();
    let chunk = CHUNK.max(cs);
    let pb = progress::bar(a.progress, size);
    let read_err = |e: crate::DiskError| ("error while reading".to_string(), e.to_string());
    let write_err = |e: crate::DiskError| ("error while writing".to_string(), e.to_string());
    let mut src = vec![0u8; chunk as usize];
    let mut base = vec![0u8; chunk as usize];
    let mut pos = 0u64;
    while pos < size {
        let len = (size - pos).min(chunk);
        let (st, run) = disk.block_status(pos, len).map_err(read_err)?;
        // Without a backing file, ranges that read as zeros stay unallocated.
        if st.reads_as_zero() && !with_backing && run >= cs.min(size - pos) {
            let skip = if run == size - pos {
                run
            } else {
                run - run % cs
            };
            if skip > 0 {
                pos += skip;
                pb.set_position(pos);
                continue;
            }
        }
        let n = len as usize;
        disk.read_at(pos, &mut src[..n]).map_err(read_err)?;
        if with_backing {
            img.read_at(pos, &mut base[..n]).map_err(read_err)?;
        }
        let mut off = 0usize;
        while off < n {
            let end = (off + cs as usize).min(n);
            let cluster = &src[off..end];
            let same = if with_backing {
                cluster == &base[off..end]
            } else {
                cluster.iter().all(|b| *b == 0)
            };
            let at = pos + off as u64;
            if !same {
                if cluster.iter().all(|b| *b == 0) {
                    img.write_zeroes(at, cluster.len() as u64)
                        .map_err(write_err)?;
                } else if a.compress {
                    img.write_compressed(at, cluster).map_err(write_err)?;
                } else {
                    img.write_at(at, cluster).map_err(write_err)?;
                }
            }
            off = end;
        }
        pos += len;
        pb.set_position(pos);
    }
    img.flush().map_err(write_err)?;
    pb.finish_and_clear();
    Ok(())
}

/// Copies the guest contents of `disk` into a new sparse raw file at `dest`.
pub fn copy_to_raw(
    disk: &mut Disk,
    dest: &str,
    show_progress: bool,
) -> Result<(), (String, String)> {
    let out_err = |e: std::io::Error| (format!("Could not write '{dest}'"), e.to_string());
    let out = FsOpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dest)
        .map_err(out_err)?;
    let size = disk.size();
    out.set_len(size).map_err(out_err)?;
    let pb = progress::bar(show_progress, size);
    let read_err = |e: crate::DiskError| ("error while reading".to_string(), e.to_string());
    // Reading and writing overlap: this thread reads guest data into
    // buffers, a writer thread writes them (sparse) and hands them back.
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, u64)>(IN_FLIGHT);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..IN_FLIGHT {
        let _ = empty_tx.send(vec![0u8; CHUNK as usize]);
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| -> std::io::Result<()> {
            for (buf, pos) in full_rx {
                write_sparse(&out, &buf, pos)?;
                let _ = empty_tx.send(buf);
            }
            Ok(())
        });
        let mut result = Ok(());
        let mut pos = 0u64;
        while pos < size {
            let step = disk.block_status(pos, (size - pos).min(CHUNK));
            let (st, run) = match step {
                Ok(v) => v,
                Err(e) => {
                    result = Err(read_err(e));
                    break;
                }
            };
            if run == 0 {
                result = Err(("convert".into(), format!("no progress at offset {pos}")));
                break;
            }
            let mut run = run;
            if !st.reads_as_zero() {
                let Ok(mut buf) = empty_rx.recv() else {
                    break; // the writer stopped: its error is reported below
                };
                let mut filled = match disk {
                    Disk::Qcow2(img) if st.compressed && st.depth == 0 => {
                        decompress_batch(img, pos, (size - pos).min(CHUNK), &mut buf)
                    }
                    _ => Ok(0),
                };
                if matches!(filled, Ok(0)) {
                    buf.resize(run as usize, 0);
                    filled = disk.read_at(pos, &mut buf).map(|()| run);
                }
                match filled {
                    Ok(n) => run = n,
                    Err(e) => {
                        result = Err(read_err(e));
                        break;
                    }
                }
                if full_tx.send((buf, pos)).is_err() {
                    break;
                }
            }
            pos += run;
            pb.set_position(pos);
        }
        drop(full_tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("writer thread panicked")));
        result.and(written.map_err(out_err))
    })?;
    pb.finish_and_clear();
    // Like qemu-img convert (cache mode "unsafe" for the target), no fsync.
    Ok(())
}

/// Reads the run of compressed clusters starting at guest `pos` (at most
/// `max` bytes) into `buf`, decompressing them on several threads (the core
/// says where each cluster is; this host does the parallel work). Returns
/// the number of guest bytes filled.
fn decompress_batch(
    img: &mut qcowkit_core::Image<crate::FileIo>,
    pos: u64,
    max: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, crate::DiskError> {
    use qcowkit_core::{BlockRead, Mapping};
    let kind = img.header().compression_type;
    let cs = img.cluster_size() as usize;
    // (host offset, skip into cluster, length, compressed bytes)
    let mut jobs: Vec<(u64, usize, usize, Vec<u8>)> = Vec::new();
    let mut at = pos;
    while at < pos + max {
        let (m, run) = img.map_shallow(at, pos + max - at)?;
        let Mapping::Compressed {
            host_offset,
            size,
            cluster_start,
        } = m
        else {
            break;
        };
        let mut input = vec![0u8; size as usize];
        img.io_mut()
            .read_at(host_offset, &mut input)
            .map_err(qcowkit_core::Error::Io)?;
        jobs.push((
            host_offset,
            (at - cluster_start) as usize,
            run as usize,
            input,
        ));
        at += run;
    }
    let total = (at - pos) as usize;
    buf.resize(total, 0);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let per = jobs.len().div_ceil(threads).max(1);
    // Split the output buffer along the jobs, one slice per job.
    let mut slices: Vec<&mut [u8]> = Vec::with_capacity(jobs.len());
    let mut rest: &mut [u8] = buf.as_mut_slice();
    for j in &jobs {
        let (head, tail) = rest.split_at_mut(j.2);
        slices.push(head);
        rest = tail;
    }
    let failed = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let mut job_iter = jobs.iter().zip(slices);
        loop {
            let group: Vec<_> = job_iter.by_ref().take(per).collect();
            if group.is_empty() {
                break;
            }
            handles.push(scope.spawn(move || {
                let mut dec = qcowkit_core::compress::Decompressor::default();
                let mut cluster = vec![0u8; cs];
                for ((host, skip, len, input), out) in group {
                    let done = if kind == qcowkit_core::header::CompressionType::Zstd {
                        // libzstd on the host (the no_std core uses ruzstd).
                        zstd_cluster(input, &mut cluster)
                    } else {
                        dec.decompress(kind, input, &mut cluster)
                    };
                    done.map_err(|reason| (*host, reason))?;
                    out.copy_from_slice(&cluster[*skip..*skip + *len]);
                }
                Ok::<(), (u64, &'static str)>(())
            }));
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(Err((0, "decompression thread panicked")))
            })
            .find_map(Result::err)
    });
    if let Some((host_offset, reason)) = failed {
        return Err(qcowkit_core::Error::Decompress {
            host_offset,
            reason,
        });
    }
    Ok(total as u64)
}

/// Decompresses zstd frames from `input` until `out` (one cluster) is full,
/// ignoring what follows, like QEMU; errors when the data ends early, is
/// invalid, or makes no progress.
fn zstd_cluster(input: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new().map_err(|_| "cannot start the zstd decoder")?;
    // Bound the window like the core does for hostile frames.
    dec.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(23))
        .map_err(|_| "cannot configure the zstd decoder")?;
    let mut src = InBuffer::around(input);
    let mut dst = OutBuffer::around(out);
    while dst.pos() < dst.capacity() {
        let (in_before, out_before) = (src.pos(), dst.pos());
        dec.run(&mut src, &mut dst)
            .map_err(|_| "invalid zstd data")?;
        if src.pos() == in_before && dst.pos() == out_before {
            return Err("zstd stream ends before a full cluster");
        }
    }
    Ok(())
}

/// Writes `data` at `offset`, leaving 4 KiB blocks of zeros as holes and
/// writing each run of non-zero blocks with one call.
pub fn write_sparse(out: &std::fs::File, data: &[u8], offset: u64) -> std::io::Result<()> {
    const BLOCK: usize = 4096;
    let mut run_start: Option<usize> = None;
    let mut i = 0;
    while i < data.len() {
        let end = (i + BLOCK).min(data.len());
        let zero = data[i..end].iter().all(|b| *b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                out.write_all_at(&data[s..i], offset + s as u64)?;
                run_start = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(s) = run_start {
        out.write_all_at(&data[s..], offset + s as u64)?;
    }
    Ok(())
}
