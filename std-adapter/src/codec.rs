//! [`NativeCodec`]: the core's [`Codec`] with native decoders (libzstd for
//! zstd clusters) and the clusters of a chunk decoded on several threads.

use qcowkit_core::compress::{decompress_in_turn, Codec, DecompressError, Decompressor, Job};
use qcowkit_core::header::CompressionType;

/// Decodes compressed clusters with libzstd (zstd) and the core's inflate
/// (zlib), spreading [`Codec::decompress_many`] over `threads` threads.
#[derive(Debug)]
pub struct NativeCodec {
    zlib: Decompressor,
    threads: usize,
}

impl NativeCodec {
    /// A codec using up to `threads` threads (at least one).
    pub fn new(threads: usize) -> Self {
        NativeCodec {
            zlib: Decompressor::default(),
            threads: threads.max(1),
        }
    }

    /// A codec using every core (at most 8 threads).
    pub fn all_cores() -> Self {
        Self::new(
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(8),
        )
    }
}

impl Default for NativeCodec {
    fn default() -> Self {
        Self::all_cores()
    }
}

/// Decodes one cluster: libzstd for zstd, the core's inflate for zlib.
fn decode(
    zlib: &mut Decompressor,
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), DecompressError> {
    match kind {
        CompressionType::Zstd => zstd_cluster(input, out),
        _ => zlib.decompress(kind, input, out),
    }
}

impl Codec for NativeCodec {
    fn decompress(
        &mut self,
        kind: CompressionType,
        input: &[u8],
        out: &mut [u8],
    ) -> Result<(), DecompressError> {
        decode(&mut self.zlib, kind, input, out)
    }

    fn decompress_many(&mut self, jobs: &mut [Job<'_>]) -> Result<(), (usize, DecompressError)> {
        if self.threads == 1 || jobs.len() < 2 {
            return decompress_in_turn(self, jobs);
        }
        let per = jobs.len().div_ceil(self.threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = jobs
                .chunks_mut(per)
                .enumerate()
                .map(|(g, group)| {
                    scope.spawn(move || {
                        decompress_in_turn(&mut NativeCodec::new(1), group)
                            .map_err(|(i, e)| (g * per + i, e))
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or(Err((0, "decompression thread panicked")))
            })
        })
    }
}

/// Decompresses zstd frames from `input` until `out` (one cluster) is full,
/// ignoring what follows, like QEMU; errors when the data ends early, is
/// invalid, or makes no progress.
fn zstd_cluster(input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_in_parallel_and_reports_the_failed_job() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8).collect();
        let z = zstd::bulk::compress(&data, 3).unwrap();
        let mut outs = vec![vec![0u8; 65536]; 5];
        let bad = [0xffu8; 16];
        let mut jobs: Vec<Job<'_>> = outs
            .iter_mut()
            .enumerate()
            .map(|(i, out)| Job {
                kind: CompressionType::Zstd,
                input: if i == 3 { &bad[..] } else { &z[..] },
                out,
            })
            .collect();
        let mut codec = NativeCodec::new(2);
        assert_eq!(codec.decompress_many(&mut jobs).unwrap_err().0, 3);
        jobs.remove(3);
        codec.decompress_many(&mut jobs).unwrap();
        drop(jobs);
        assert_eq!(outs[4], data);
    }
}
