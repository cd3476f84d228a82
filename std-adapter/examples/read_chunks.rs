//! Reads a whole image through the library in 1 MiB `read_at` calls and
//! prints the time taken (the library-read figure of `scripts/bench.sh`'s
//! peer comparison): `cargo run --release --example read_chunks -- IMAGE`.

use std::time::Instant;

use qcowkit_std::{Disk, DiskOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: read_chunks IMAGE")?;
    let start = Instant::now();
    let mut disk = Disk::open(path.as_ref(), &DiskOptions::default())?;
    let size = disk.size();
    let mut buf = vec![0u8; 1 << 20];
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
