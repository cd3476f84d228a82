//! Compressed clusters: raw deflate (zlib type) and zstd, both ways.
//!
//! Both decoders fill exactly one cluster and ignore what follows the
//! compressed stream (the last sector may hold the next cluster's data), as
//! QEMU does. Compressing a cluster is separate from placing it in an image
//! ([`crate::WritableImage::place_compressed`]), so a host can compress many
//! clusters at once ([`Codec::compress_many`], on several threads) and place
//! them in order.

use crate::header::CompressionType;

/// Largest zstd window accepted, bounding the decoder's allocation on
/// hostile input (QEMU's own frames use a window no larger than a cluster).
pub const MAX_ZSTD_WINDOW: u64 = 8 * 1024 * 1024;

/// Why a compressed cluster could not be decoded.
pub type DecompressError = &'static str;

/// Decompresses `input` into all of `out` (one cluster).
pub fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), DecompressError> {
    Decompressor::default().decompress(kind, input, out)
}

/// One compressed cluster to decode: `input` (the compressed bytes, which
/// may run past the end of the stream) into all of `out` (one cluster).
#[derive(Debug)]
pub struct Job<'a> {
    /// The image's compression type.
    pub kind: CompressionType,
    /// Compressed bytes.
    pub input: &'a [u8],
    /// Exactly one cluster of output.
    pub out: &'a mut [u8],
}

/// One cluster to compress: `input` (a whole cluster, the last one of a disk
/// zero-padded), and after [`Codec::compress_many`], `out` holding the
/// compressed bytes when they are smaller than the cluster (`packed`).
#[derive(Debug)]
pub struct PackJob<'a> {
    /// The cluster.
    pub input: &'a [u8],
    /// The compressed bytes, when `packed`.
    pub out: alloc::vec::Vec<u8>,
    /// Whether compressing made the cluster smaller (else store it plainly).
    pub packed: bool,
}

impl<'a> PackJob<'a> {
    /// A job for `input`.
    pub fn new(input: &'a [u8]) -> Self {
        PackJob {
            input,
            out: alloc::vec::Vec::new(),
            packed: false,
        }
    }
}

/// Codecs of compressed clusters, pluggable: the core ships its no_std
/// [`Decompressor`] and encoders; a host may plug in native ones and run
/// [`Codec::decompress_many`] and [`Codec::compress_many`] on several
/// threads.
pub trait Codec {
    /// Decompresses `input` into all of `out` (one cluster).
    fn decompress(
        &mut self,
        kind: CompressionType,
        input: &[u8],
        out: &mut [u8],
    ) -> Result<(), DecompressError>;

    /// Decompresses every job; on failure returns the index of a failed
    /// job and why. The default decodes them one after the other.
    fn decompress_many(&mut self, jobs: &mut [Job<'_>]) -> Result<(), (usize, DecompressError)> {
        decompress_in_turn(self, jobs)
    }

    /// Compresses one cluster into `out` (cleared first); returns whether
    /// the result is smaller than the cluster. Any standard stream QEMU
    /// reads will do; the default uses the core's encoders.
    fn compress(
        &mut self,
        kind: CompressionType,
        input: &[u8],
        out: &mut alloc::vec::Vec<u8>,
    ) -> bool {
        out.clear();
        match compress(kind, input) {
            Some(c) if c.len() < input.len() => {
                *out = c;
                true
            }
            _ => false,
        }
    }

    /// Compresses every job; the default does them one after the other.
    fn compress_many(&mut self, kind: CompressionType, jobs: &mut [PackJob<'_>]) {
        compress_in_turn(self, kind, jobs);
    }
}

/// Compresses `jobs` one after the other with `codec` (what
/// [`Codec::compress_many`] does unless a codec spreads the work).
pub fn compress_in_turn<C: Codec + ?Sized>(
    codec: &mut C,
    kind: CompressionType,
    jobs: &mut [PackJob<'_>],
) {
    for j in jobs.iter_mut() {
        j.packed = codec.compress(kind, j.input, &mut j.out);
    }
}

/// Decodes `jobs` one after the other with `codec` (what
/// [`Codec::decompress_many`] does unless a codec spreads the work); on
/// failure, the index of the failed job and why.
pub fn decompress_in_turn<C: Codec + ?Sized>(
    codec: &mut C,
    jobs: &mut [Job<'_>],
) -> Result<(), (usize, DecompressError)> {
    for (i, j) in jobs.iter_mut().enumerate() {
        codec
            .decompress(j.kind, j.input, j.out)
            .map_err(|e| (i, e))?;
    }
    Ok(())
}

impl Codec for Decompressor {
    fn decompress(
        &mut self,
        kind: CompressionType,
        input: &[u8],
        out: &mut [u8],
    ) -> Result<(), DecompressError> {
        Decompressor::decompress(self, kind, input, out)
    }
}

/// Decoder state reused across clusters (saves an allocation per cluster).
#[derive(Default)]
pub struct Decompressor {
    zlib: Option<alloc::boxed::Box<miniz_oxide::inflate::core::DecompressorOxide>>,
    zstd: Option<ruzstd::decoding::FrameDecoder>,
}

impl core::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Decompressor")
    }
}

impl Decompressor {
    /// Decompresses `input` into all of `out` (one cluster).
    pub fn decompress(
        &mut self,
        kind: CompressionType,
        input: &[u8],
        out: &mut [u8],
    ) -> Result<(), DecompressError> {
        match kind {
            CompressionType::Zlib => {
                let state = self.zlib.get_or_insert_with(alloc::boxed::Box::default);
                state.init();
                inflate(state, input, out)
            }
            CompressionType::Zstd => {
                let window = MAX_ZSTD_WINDOW.max(crate::bytes::to_u64(out.len()));
                let dec = self.zstd.get_or_insert_with(|| {
                    let mut d = ruzstd::decoding::FrameDecoder::new();
                    d.set_max_window_size(window);
                    d
                });
                dec.set_max_window_size(window);
                unzstd(dec, input, out)
            }
        }
    }
}

/// Compresses one cluster with `kind`; `None` if the encoder failed.
/// Callers store the cluster uncompressed when the result is not smaller.
pub fn compress(kind: CompressionType, cluster: &[u8]) -> Option<alloc::vec::Vec<u8>> {
    match kind {
        CompressionType::Zlib => Some(miniz_oxide::deflate::compress_to_vec(cluster, 6)),
        CompressionType::Zstd => Some(ruzstd::encoding::compress_to_vec(
            cluster,
            ruzstd::encoding::CompressionLevel::Fastest,
        )),
    }
}

fn inflate(
    state: &mut miniz_oxide::inflate::core::DecompressorOxide,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), DecompressError> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags};
    use miniz_oxide::inflate::TINFLStatus;
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _read, written) = decompress(state, input, out, 0, flags);
    match status {
        _ if written == out.len() => Ok(()),
        TINFLStatus::Done => Err("deflate stream ends before a full cluster"),
        TINFLStatus::FailedCannotMakeProgress | TINFLStatus::NeedsMoreInput => {
            Err("deflate stream is truncated")
        }
        _ => Err("invalid deflate data"),
    }
}

fn unzstd(
    frame: &mut ruzstd::decoding::FrameDecoder,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), DecompressError> {
    use ruzstd::decoding::StreamingDecoder;
    use ruzstd::io::Read;
    let mut src = input;
    let mut done = 0usize;
    // A cluster may consist of several frames; each iteration consumes one.
    // Every frame either produces output or consumes input, so this ends.
    while done < out.len() {
        let before = src.len();
        let progressed = {
            let mut dec = StreamingDecoder::new_with_decoder(&mut src, &mut *frame)
                .map_err(|_| "invalid zstd frame header")?;
            let mut progressed = false;
            loop {
                let n = dec
                    .read(&mut out[done..])
                    .map_err(|_| "invalid zstd data")?;
                if n == 0 {
                    break;
                }
                progressed = true;
                done += n;
                if done == out.len() {
                    return Ok(());
                }
            }
            progressed
        };
        if !progressed && src.len() >= before {
            return Err("zstd stream ends before a full cluster");
        }
        if src.is_empty() {
            return Err("zstd stream ends before a full cluster");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn inflate_round_trip_with_trailing_garbage() {
        let data: alloc::vec::Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut c = miniz_oxide::deflate::compress_to_vec(&data, 6);
        c.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zlib, &c, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn inflate_short_or_garbage_fails() {
        let data = vec![7u8; 1000];
        let c = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zlib, &c, &mut out).is_err());
        assert!(decompress(CompressionType::Zlib, &[0xff; 64], &mut out).is_err());
        assert!(decompress(CompressionType::Zlib, &[], &mut out).is_err());
    }

    #[test]
    fn zstd_garbage_fails() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zstd, &[0xff; 64], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[], &mut out).is_err());
        // A frame header announcing a window beyond the limit.
        let hostile = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xf8, 0, 0, 0, 0];
        assert!(decompress(CompressionType::Zstd, &hostile, &mut out).is_err());
    }
}
