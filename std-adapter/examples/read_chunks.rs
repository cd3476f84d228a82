//! Reads a whole image through the library in `read_at` calls of one size
//! (1 MiB unless given) and prints the time taken:
//! `cargo run --release --example read_chunks -- IMAGE [CHUNK_BYTES] [--no-read-ahead]`.

use std::time::Instant;

use qcowkit_std::{Disk, DiskOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: read_chunks IMAGE [CHUNK_BYTES] [--no-read-ahead]";
    let path = args.next().ok_or(usage)?;
    let mut chunk = 1 << 20;
    let mut opts = DiskOptions::default();
    for a in args {
        if a == "--no-read-ahead" {
            opts.read_ahead = 0;
        } else {
            chunk = a.parse().map_err(|_| usage)?;
        }
    }
    let start = Instant::now();
    let mut disk = Disk::open(path.as_ref(), &opts)?;
    let size = disk.size();
    let mut buf = vec![0u8; chunk];
    let mut sum = 0u64;
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        disk.read_at(pos, &mut buf[..n])?;
        // Touch the bytes so the reads cannot be skipped.
        sum = buf[..n]
            .iter()
            .step_by(4096)
            .fold(sum, |a, b| a.wrapping_add(u64::from(*b)));
        pos += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{size} bytes in {secs:.3} s ({:.0} MiB/s), checksum {sum}",
        size as f64 / secs / 1048576.0
    );
    Ok(())
}
