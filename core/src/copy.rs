//! The data mover: one routine ([`copy`]) that moves a guest range of a
//! disk (a qcow2 image with its chain, or a raw file) to a [`Sink`],
//! chunk by chunk, skipping what reads as zeros and decoding compressed
//! clusters through a pluggable [`Codec`]. convert (both directions), dd,
//! the firmware's reader and the browser converters all use it;
//! [`ImageSink`] is the sink that writes into a new qcow2 image.

use alloc::vec::Vec;

use crate::bytes::{to_u64, to_usize};
use crate::compress::{Codec, Decompressor, PackJob};
use crate::error::Error;
use crate::image::{Chunk, Image};
use crate::io::{BlockRead, BlockWrite};
use crate::writable::WritableImage;

/// Default size of a copy's data chunks (2 MiB).
pub const DEFAULT_CHUNK: usize = 2 * 1024 * 1024;

/// A disk whose guest data can be read chunk by chunk: a qcow2 [`Image`]
/// or a [`RawDisk`].
pub trait ChunkRead {
    /// The error of reading.
    type Error;

    /// Virtual size in bytes.
    fn disk_size(&self) -> u64;

    /// Reads from `pos`, at most `max` bytes: a run of zeros or data in
    /// `buf`, ending on a multiple of `align` (see [`Image::read_chunk`]).
    fn read_chunk(
        &mut self,
        pos: u64,
        max: u64,
        align: u64,
        buf: &mut [u8],
        codec: &mut dyn Codec,
    ) -> Result<Chunk, Self::Error>;
}

impl<R: BlockRead> ChunkRead for Image<R> {
    type Error = Error<R::Error>;

    fn disk_size(&self) -> u64 {
        self.size()
    }

    fn read_chunk(
        &mut self,
        pos: u64,
        max: u64,
        align: u64,
        buf: &mut [u8],
        codec: &mut dyn Codec,
    ) -> Result<Chunk, Self::Error> {
        Image::read_chunk(self, pos, max, align, buf, codec)
    }
}

/// A raw disk image: the storage's bytes are the guest's. Holes the storage
/// reports ([`BlockRead::allocation`]) read as zeros without being read.
#[derive(Debug)]
pub struct RawDisk<R> {
    /// The storage.
    pub io: R,
    /// Its length in bytes (the virtual size).
    pub size: u64,
}

impl<R: BlockRead> RawDisk<R> {
    /// A raw disk over `io`, as long as the storage is.
    pub fn new(mut io: R) -> Result<Self, Error<R::Error>> {
        let size = io.len().map_err(Error::Io)?;
        Ok(RawDisk { io, size })
    }
}

impl<R: BlockRead> ChunkRead for RawDisk<R> {
    type Error = Error<R::Error>;

    fn disk_size(&self) -> u64 {
        self.size
    }

    fn read_chunk(
        &mut self,
        pos: u64,
        max: u64,
        align: u64,
        buf: &mut [u8],
        _codec: &mut dyn Codec,
    ) -> Result<Chunk, Self::Error> {
        let size = self.size;
        if pos.checked_add(max).is_none_or(|e| e > size) {
            return Err(Error::OutOfBounds {
                offset: pos,
                len: max,
                size,
            });
        }
        let align = align.max(1);
        let end = pos + max;
        if let Some((false, run)) = self.io.allocation(pos, max).map_err(Error::Io)? {
            let hole_end = pos.saturating_add(run).min(end);
            let n = if hole_end == end {
                hole_end
            } else {
                hole_end - hole_end % align
            };
            if n > pos {
                return Ok(Chunk::Zero(n - pos));
            }
        }
        let mut n = max.min(to_u64(buf.len()));
        if pos + n < end && n > align {
            n -= (pos + n) % align;
        }
        let len = to_usize(n).unwrap_or(0);
        self.io.read_at(pos, &mut buf[..len]).map_err(Error::Io)?;
        Ok(Chunk::Data(len))
    }
}

/// Where [`copy`] puts guest data.
pub trait Sink {
    /// The sink's error; reading errors convert into it.
    type Error;

    /// `buf[..len]` holds the guest bytes of `[offset, offset + len)`. The
    /// sink may keep the buffer by swapping another one in (the copy
    /// resizes it as needed), e.g. to hand it to a writer thread.
    fn data(&mut self, offset: u64, buf: &mut Vec<u8>, len: usize) -> Result<(), Self::Error>;

    /// `[offset, offset + len)` reads as zeros.
    fn zeroes(&mut self, offset: u64, len: u64) -> Result<(), Self::Error>;
}

/// Tuning of [`copy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOptions {
    /// Largest data chunk in bytes.
    pub chunk: usize,
    /// Chunks start and end on multiples of this (e.g. the target's
    /// cluster size), except at the end of the range.
    pub align: u64,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            chunk: DEFAULT_CHUNK,
            align: 1,
        }
    }
}

/// Moves the guest range `[start, end)` of `src` to `sink`: zero runs as
/// [`Sink::zeroes`], everything else as [`Sink::data`] chunks, in order.
pub fn copy<D, S>(
    src: &mut D,
    start: u64,
    end: u64,
    opts: CopyOptions,
    codec: &mut dyn Codec,
    sink: &mut S,
) -> Result<(), S::Error>
where
    D: ChunkRead + ?Sized,
    S: Sink + ?Sized,
    S::Error: From<D::Error>,
{
    let chunk = opts
        .chunk
        .max(to_usize(opts.align).unwrap_or(usize::MAX))
        .max(1);
    let mut buf = alloc::vec![0u8; chunk];
    let mut pos = start;
    while pos < end {
        if buf.len() < chunk {
            buf.resize(chunk, 0);
        }
        match src.read_chunk(pos, end - pos, opts.align, &mut buf, codec)? {
            Chunk::Zero(n) => {
                sink.zeroes(pos, n)?;
                pos += n;
            }
            Chunk::Data(n) => {
                sink.data(pos, &mut buf, n)?;
                pos += to_u64(n);
            }
        }
    }
    Ok(())
}

/// A [`Sink`] that writes guest data into a qcow2 image, one target
/// cluster at a time: clusters that read as zeros stay unallocated (or,
/// over a backing file, clusters equal to what the target already reads
/// are skipped), the others are written plainly or compressed. Use it with
/// [`CopyOptions::align`] set to the target's cluster size.
pub struct ImageSink<'a, W: BlockWrite> {
    img: &'a mut WritableImage<W>,
    /// Guest offset of the source that lands at offset 0 of the target.
    pub shift: u64,
    /// Store clusters compressed (when that makes them smaller).
    pub compress: bool,
    /// Compare with what the target reads already (its backing file) and
    /// write only the clusters that differ; zero runs are compared too.
    pub over_backing: bool,
    base: Vec<u8>,
    /// Encoders for compressed clusters (the core's when `None`).
    codec: Option<&'a mut (dyn Codec + Send)>,
    /// Output buffers of compression jobs, kept for the next chunk.
    spare: Vec<Vec<u8>>,
}

/// What [`ImageSink`] does with one target cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Nothing more (the target reads it already, or it was zeroed).
    Done,
    /// Write it plainly (merged with plain neighbours).
    Plain,
    /// Compress it (written plainly if that does not make it smaller).
    Compress,
}

impl<W: BlockWrite> core::fmt::Debug for ImageSink<'_, W> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ImageSink")
            .field("shift", &self.shift)
            .field("compress", &self.compress)
            .field("over_backing", &self.over_backing)
            .field("codec", &self.codec.is_some())
            .finish_non_exhaustive()
    }
}

impl<'a, W: BlockWrite> ImageSink<'a, W> {
    /// A sink writing into `img` at the source's own offsets.
    pub fn new(img: &'a mut WritableImage<W>) -> Self {
        ImageSink {
            img,
            shift: 0,
            compress: false,
            over_backing: false,
            base: Vec::new(),
            codec: None,
            spare: Vec::new(),
        }
    }

    /// Compresses with `codec`'s encoders, a chunk's clusters at once
    /// ([`Codec::compress_many`], which a host may spread over threads).
    pub fn with_codec(mut self, codec: &'a mut (dyn Codec + Send)) -> Self {
        self.codec = Some(codec);
        self
    }

    /// Whether `[at, at + len)` is one whole cluster of the target (or the
    /// whole last, partial one).
    fn whole_cluster(&self, at: u64, len: usize) -> bool {
        let cs = self.img.cluster_size();
        let end = at.saturating_add(to_u64(len));
        at.is_multiple_of(cs) && (end - at == cs || end == self.img.size())
    }

    /// Decides what to do with one target cluster (or the disk's last,
    /// partial one) at target offset `at`: nothing when the target reads it
    /// already, zeroing it (done here), or writing it, plainly or
    /// compressed (done by the caller, which merges and batches).
    fn cluster(&mut self, at: u64, data: &[u8]) -> Result<Action, Error<W::Error>> {
        let zero = is_zero(data);
        let same = if self.over_backing {
            self.base.resize(data.len(), 0);
            self.img.read_at(at, &mut self.base)?;
            self.base == data
        } else {
            zero
        };
        if same {
            Ok(Action::Done)
        } else if zero {
            self.img.write_zeroes(at, to_u64(data.len()))?;
            Ok(Action::Done)
        } else if self.compress && self.whole_cluster(at, data.len()) {
            Ok(Action::Compress)
        } else {
            Ok(Action::Plain)
        }
    }
}

/// Whether `b` is all zeros, looked at eight bytes at a time.
pub fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    for block in &mut blocks {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            acc |= u64::from_ne_bytes(a);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|x| *x == 0)
}

impl<W: BlockWrite> Sink for ImageSink<'_, W> {
    type Error = Error<W::Error>;

    fn data(&mut self, offset: u64, buf: &mut Vec<u8>, len: usize) -> Result<(), Self::Error> {
        let cs = self.img.cluster_size();
        let start = offset - self.shift;
        let data = &buf[..len];
        // What to do with each cluster: (start in `data`, end, action).
        let mut plan: Vec<(usize, usize, Action)> = Vec::new();
        let mut done = 0usize;
        while done < len {
            let at = start + to_u64(done);
            // Up to the next target cluster boundary.
            let n = to_usize(cs - at % cs).map_or(len - done, |n| n.min(len - done));
            let action = self.cluster(at, &data[done..done + n])?;
            plan.push((done, done + n, action));
            done += n;
        }
        // The clusters to compress, all at once (a short last cluster of
        // the disk is compressed zero-padded, as the format stores it).
        let padded: Vec<u8> = match plan.last() {
            Some(&(s, e, Action::Compress)) if to_u64(e - s) < cs => {
                let mut p = alloc::vec![0u8; to_usize(cs).unwrap_or(0)];
                p[..e - s].copy_from_slice(&data[s..e]);
                p
            }
            _ => Vec::new(),
        };
        let mut jobs: Vec<PackJob<'_>> = plan
            .iter()
            .filter(|p| p.2 == Action::Compress)
            .map(|&(s, e, _)| {
                let mut job = if to_u64(e - s) < cs {
                    PackJob::new(&padded)
                } else {
                    PackJob::new(&data[s..e])
                };
                job.out = self.spare.pop().unwrap_or_default();
                job
            })
            .collect();
        if !jobs.is_empty() {
            let kind = self.img.header().compression_type;
            match self.codec.as_deref_mut() {
                Some(codec) => codec.compress_many(kind, &mut jobs),
                None => Decompressor::default().compress_many(kind, &mut jobs),
            }
        }
        // In order: compressed clusters placed, plain ones gathered into
        // runs (one write each).
        let mut jobs = jobs.into_iter();
        let mut run: Option<usize> = None;
        for &(s, _, action) in &plan {
            let packed = match action {
                Action::Compress => match jobs.next() {
                    Some(j) if j.packed => Some(j),
                    Some(j) => {
                        self.spare.push(j.out);
                        None
                    }
                    None => None,
                },
                _ => None,
            };
            let plain = action == Action::Plain || (action == Action::Compress && packed.is_none());
            if !plain {
                if let Some(r) = run.take() {
                    self.img.write_at(start + to_u64(r), &data[r..s])?;
                }
            }
            if let Some(job) = packed {
                self.img.place_compressed(start + to_u64(s), &job.out)?;
                self.spare.push(job.out);
            } else if plain && run.is_none() {
                run = Some(s);
            }
        }
        if let Some(r) = run {
            self.img.write_at(start + to_u64(r), &data[r..])?;
        }
        Ok(())
    }

    fn zeroes(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        if !self.over_backing {
            return Ok(());
        }
        let cs = self.img.cluster_size();
        let zeros = alloc::vec![0u8; to_usize(cs).unwrap_or(0)];
        let mut at = offset - self.shift;
        let end = at + len;
        while at < end {
            let n = (end - at).min(cs - at % cs);
            self.cluster(at, &zeros[..to_usize(n).unwrap_or(0)])?;
            at += n;
        }
        Ok(())
    }
}
