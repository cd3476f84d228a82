//! `qcow-reader IMAGE CHUNK_BYTES`: opens IMAGE with the `qcow` crate,
//! reads all of it in CHUNK_BYTES chunks (`Seek` + `read_exact`) and prints
//! `SECONDS CHECKSUM SIZE`: the time of open and reads, the checksum of
//! every byte (hex, as `peers` computes it) and the virtual size. Run by
//! `peers` as the `qcow` contender.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::time::Instant;

#[path = "../../src/checksum.rs"]
mod checksum;

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(chunk)) = (args.next(), args.next()) else {
        return Err("usage: qcow-reader IMAGE CHUNK_BYTES".into());
    };
    let chunk: usize = chunk.parse().map_err(|e| format!("CHUNK_BYTES: {e}"))?;
    let mut buf = vec![0u8; chunk.max(1)];
    let mut sum = checksum::Checksum::new();
    let start = Instant::now();
    let mut busy;
    let size;
    {
        let image = qcow::open(&path).map_err(|e| e.to_string())?.unwrap_qcow2();
        let mut file = BufReader::new(File::open(&path).map_err(|e| e.to_string())?);
        let mut reader = image.reader(&mut file);
        size = image.header.size;
        busy = start.elapsed();
        let mut pos = 0u64;
        while pos < size {
            let n = (size - pos).min(buf.len() as u64) as usize;
            let t = Instant::now();
            reader
                .seek(SeekFrom::Start(pos))
                .and_then(|_| reader.read_exact(&mut buf[..n]))
                .map_err(|e| format!("read at {pos:#x}: {e}"))?;
            busy += t.elapsed();
            sum.update(&buf[..n]);
            pos += n as u64;
        }
        let t = Instant::now();
        drop(reader);
        busy += t.elapsed();
    }
    println!("{:.6} {:016x} {size}", busy.as_secs_f64(), sum.finish());
    Ok(())
}
