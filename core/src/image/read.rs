//! Reading guest data: what a guest range holds through the whole backing
//! chain ([`Image::extents`], one L2 walk per layer), and one routine that
//! moves it into a buffer ([`Image::read_chunk`]), decoding compressed
//! clusters through a pluggable [`Codec`]. [`Image::read_at`] and every
//! copy (convert, dd, compare, the hosts' converters) use it.

use alloc::boxed::Box;
use alloc::vec::Vec;

use super::{Backing, Image, Mapping, Res, Run};
use crate::bytes::{to_u64, to_usize};
use crate::compress::{Codec, Job};
use crate::error::Error;
use crate::heap;
use crate::io::BlockRead;

/// Where the bytes of an [`Extent`] come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Uncompressed bytes at `host` in the layer's file: its image file, its
    /// external data file (`external`), or a raw backing file.
    Data {
        /// Host offset of the extent's first byte.
        host: u64,
        /// The bytes live in the layer's external data file.
        external: bool,
    },
    /// Inside one compressed cluster of the layer.
    Compressed {
        /// Host offset of the compressed data.
        host: u64,
        /// Upper bound of the compressed data's length.
        size: u64,
        /// Guest offset of the start of the cluster.
        cluster_start: u64,
    },
    /// Reads as zeros (zero clusters, or unallocated all the way down).
    Zero,
}

/// A guest range with one source, after following the backing chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Layer holding the bytes: 0 is this image, 1 its backing file, ...
    pub depth: u32,
    /// Where the bytes are.
    pub source: Source,
}

impl Extent {
    /// Guest offset just past the extent.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// Extents [`Image::read_chunk`] looks at for one chunk of data: bounds
/// the work per chunk when data and zeros alternate finely.
const CHUNK_EXTENTS: usize = 64;

/// Zero runs shorter than this inside data are read as zeros into the data
/// chunk rather than ending it (see [`Image::read_chunk`]).
const ZERO_SPLIT: u64 = 1 << 20;

/// What [`Image::read_chunk`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// This many bytes read as zeros (nothing was read; may exceed the buffer).
    Zero(u64),
    /// This many bytes of guest data were placed at the start of the buffer.
    Data(usize),
}

/// Appends `e` to `out`, merging it with the previous extent when it
/// continues it (zeros after zeros, contiguous data of the same layer).
fn push(out: &mut Vec<Extent>, e: Extent) {
    if e.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        let merges = last.end() == e.start
            && match (last.source, e.source) {
                (Source::Zero, Source::Zero) => true,
                (
                    Source::Data {
                        host: a,
                        external: ea,
                    },
                    Source::Data {
                        host: b,
                        external: eb,
                    },
                ) => last.depth == e.depth && ea == eb && a.checked_add(last.len) == Some(b),
                _ => false,
            };
        if merges {
            last.len += e.len;
            return;
        }
    }
    out.push(e);
}

/// One layer of the chain: a qcow2 image or a raw backing file.
enum Layer<'a, R: BlockRead> {
    Qcow2(&'a mut Image<R>),
    Raw(&'a mut R),
}

/// Wraps `e` as an error inside the backing file `name`.
fn in_backing<E>(name: &str, e: Error<E>) -> Error<E> {
    Error::Backing {
        name: alloc::string::String::from(name),
        source: Box::new(e),
    }
}

impl<R: BlockRead> Image<R> {
    /// Reads `buf.len()` guest bytes at `offset`, following the backing chain.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Res<(), R> {
        if let Some(mut codec) = self.codec.take() {
            let r = self.read_all(offset, buf, &mut *codec.0);
            self.codec = Some(codec);
            return r;
        }
        let mut codec = core::mem::take(&mut self.decompressor);
        let r = self.read_all(offset, buf, &mut codec);
        self.decompressor = codec;
        r
    }

    fn read_all<C: Codec + ?Sized>(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        codec: &mut C,
    ) -> Res<(), R> {
        self.check_range(offset, to_u64(buf.len()))?;
        // The common case first: one run of data or zeros in this image.
        let (mapping, run) = self.map_shallow(offset, to_u64(buf.len()))?;
        if run == to_u64(buf.len()) {
            match mapping {
                Mapping::Data {
                    host_offset,
                    external: false,
                } => return self.crypt.read(&mut self.io, host_offset, offset, buf),
                Mapping::Zero { .. } => {
                    buf.fill(0);
                    return Ok(());
                }
                _ => {}
            }
        }
        let mut ext = core::mem::take(&mut self.extent_scratch);
        ext.clear();
        let r = self
            .extents(offset, to_u64(buf.len()), &mut ext)
            .and_then(|()| self.fill(offset, &ext, buf, codec));
        self.extent_scratch = ext;
        r
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Res<(), R> {
        let size = self.header.size;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfBounds { offset, len, size });
        }
        Ok(())
    }

    /// Appends to `out` what `[offset, offset + len)` (clipped to the disk)
    /// holds through the whole backing chain: uncompressed data in some
    /// layer's file, a compressed cluster, or zeros. Each layer's L2 tables
    /// are walked once for the range.
    pub fn extents(&mut self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Res<(), R> {
        self.extents_capped(offset, len, usize::MAX, out)
    }

    /// [`Image::extents`] that stops once `out` holds `cap` extents (the
    /// last one may then end before the range does).
    fn extents_capped(
        &mut self,
        offset: u64,
        len: u64,
        cap: usize,
        out: &mut Vec<Extent>,
    ) -> Res<(), R> {
        let end = offset.saturating_add(len).min(self.header.size);
        if offset < end {
            self.extents_at(offset, end, 0, cap, out)?;
        }
        Ok(())
    }

    fn extents_at(
        &mut self,
        offset: u64,
        end: u64,
        depth: u32,
        cap: usize,
        out: &mut Vec<Extent>,
    ) -> Res<(), R> {
        let mut runs = core::mem::take(&mut self.run_scratch);
        runs.clear();
        let walked = self.map_range_capped(offset, end - offset, cap, &mut runs);
        let r = walked.and_then(|()| self.extents_of_runs(&runs, depth, cap, out));
        self.run_scratch = runs;
        r
    }

    /// [`Image::extents`] of the runs of this layer (at `depth`).
    fn extents_of_runs(
        &mut self,
        runs: &[Run],
        depth: u32,
        cap: usize,
        out: &mut Vec<Extent>,
    ) -> Res<(), R> {
        for &r in runs {
            if out.len() >= cap {
                break;
            }
            let at = |source| Extent {
                start: r.start,
                len: r.len,
                depth,
                source,
            };
            match r.mapping {
                Mapping::Data {
                    host_offset,
                    external,
                } => push(
                    out,
                    at(Source::Data {
                        host: host_offset,
                        external,
                    }),
                ),
                Mapping::Zero { .. } => push(out, at(Source::Zero)),
                Mapping::Compressed {
                    host_offset,
                    size,
                    cluster_start,
                } => push(
                    out,
                    at(Source::Compressed {
                        host: host_offset,
                        size,
                        cluster_start,
                    }),
                ),
                Mapping::Unallocated { .. } => {
                    let inside = match self.backing.as_mut() {
                        Some(b) => r.end().min(b.size().max(r.start)),
                        None => r.start,
                    };
                    match self.backing.as_mut() {
                        Some(Backing::Qcow2(img)) if r.start < inside => img
                            .extents_at(r.start, inside, depth + 1, cap, out)
                            .map_err(|e| in_backing(&img.name, e))?,
                        Some(Backing::Raw { .. }) if r.start < inside => push(
                            out,
                            Extent {
                                start: r.start,
                                len: inside - r.start,
                                depth: depth + 1,
                                source: Source::Data {
                                    host: r.start,
                                    external: false,
                                },
                            },
                        ),
                        _ => {}
                    }
                    push(
                        out,
                        Extent {
                            start: inside,
                            len: r.end() - inside,
                            depth,
                            source: Source::Zero,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// The layer at `depth` (0 is this image).
    fn layer(&mut self, depth: u32) -> Option<Layer<'_, R>> {
        let mut cur: &mut Image<R> = self;
        for d in 0..depth {
            cur = match cur.backing.as_mut()? {
                Backing::Qcow2(img) => img,
                Backing::Raw { io, .. } if d + 1 == depth => return Some(Layer::Raw(io)),
                Backing::Raw { .. } => return None,
            };
        }
        Some(Layer::Qcow2(cur))
    }

    /// Wraps an error of the layer at `depth` the way reading through the
    /// chain reports it: inside each qcow2 backing file on the way down.
    fn at_depth(&self, depth: u32, e: Error<R::Error>) -> Error<R::Error> {
        let mut names = Vec::new();
        let mut cur = self.backing.as_ref();
        for _ in 0..depth {
            match cur {
                Some(Backing::Qcow2(img)) => {
                    names.push(img.name.as_str());
                    cur = img.backing.as_ref();
                }
                _ => break,
            }
        }
        names
            .into_iter()
            .rev()
            .fold(e, |e, name| in_backing(name, e))
    }

    /// Reads guest data from `pos`, at most `max` bytes: either a run that
    /// reads as zeros ([`Chunk::Zero`], any length up to `max`, nothing
    /// read) or data placed at the start of `buf` ([`Chunk::Data`], at most
    /// `buf.len()` bytes, zeros included where they are too short to skip).
    /// Chunks end on multiples of `align` (e.g. a target's cluster size)
    /// unless they end at `pos + max`; `buf` must hold at least `align`
    /// bytes. Compressed clusters are decoded through `codec`, all those of
    /// one chunk in one [`Codec::decompress_many`] call.
    pub fn read_chunk<C: Codec + ?Sized>(
        &mut self,
        pos: u64,
        max: u64,
        align: u64,
        buf: &mut [u8],
        codec: &mut C,
    ) -> Res<Chunk, R> {
        self.check_range(pos, max)?;
        let align = align.max(1);
        let window = to_u64(buf.len());
        if window < align || max == 0 {
            return Err(Error::Internal("read buffer smaller than the alignment"));
        }
        let end = pos + max;
        let round = |x: u64| if x == end { x } else { x - x % align };
        let mut ext = core::mem::take(&mut self.extent_scratch);
        // A run of zeros first: follow it (in growing windows) to its end.
        let mut zero_end = pos;
        let mut step = window;
        loop {
            ext.clear();
            self.extents_capped(zero_end, step.min(end - zero_end), 2, &mut ext)?;
            let Some(first) = ext.first().filter(|e| e.source == Source::Zero) else {
                break;
            };
            zero_end = first.end();
            if ext.len() > 1 || zero_end == end {
                break;
            }
            step = step.saturating_mul(2);
        }
        let zero = round(zero_end);
        if zero > pos {
            self.extent_scratch = ext;
            return Ok(Chunk::Zero(zero - pos));
        }
        // Data: up to the buffer's size or the first zero run that holds a
        // whole aligned block and is long enough to be worth a chunk of its
        // own (shorter ones are read as zeros inside the data, so chunks
        // stay large: fewer hand-offs, bigger decompression batches; sinks
        // still find the zeros).
        ext.clear();
        self.extents_capped(pos, window.min(max), CHUNK_EXTENTS, &mut ext)?;
        let split = ZERO_SPLIT.max(align);
        let mut data_end = pos;
        for e in &ext {
            if e.source == Source::Zero && e.start > pos && (e.len >= split || e.end() == end) {
                let block = e.start.div_ceil(align).saturating_mul(align);
                if block < round(e.end()) || e.end() == end {
                    data_end = block.min(e.end());
                    break;
                }
            }
            data_end = e.end();
        }
        let data_end = if round(data_end) > pos {
            round(data_end)
        } else {
            data_end
        };
        let n = to_usize(data_end - pos).unwrap_or(0);
        let filled = self.fill(pos, &ext, &mut buf[..n], codec);
        self.extent_scratch = ext;
        filled?;
        Ok(Chunk::Data(n))
    }

    /// Fills `out` (guest bytes from `pos`) from the extents covering it.
    fn fill<C: Codec + ?Sized>(
        &mut self,
        pos: u64,
        ext: &[Extent],
        out: &mut [u8],
        codec: &mut C,
    ) -> Res<(), R> {
        let end = pos + to_u64(out.len());
        // Whole compressed clusters: (extent index, input range).
        let mut batch: Vec<(usize, usize, usize)> = Vec::new();
        let mut inputs = core::mem::take(&mut self.input_scratch);
        inputs.clear();
        for (i, e) in ext.iter().enumerate() {
            let (s, t) = (e.start.max(pos), e.end().min(end));
            if s >= t {
                continue;
            }
            let dst = &mut out[to_usize(s - pos).unwrap_or(0)..to_usize(t - pos).unwrap_or(0)];
            let depth = e.depth;
            let r =
                match (e.source, self.layer(depth)) {
                    (Source::Zero, _) => {
                        dst.fill(0);
                        Ok(())
                    }
                    (Source::Data { host, external }, Some(layer)) => {
                        let at = host + (s - e.start);
                        match layer {
                            Layer::Raw(io) => io.read_at(at, dst).map_err(Error::Io),
                            Layer::Qcow2(img) if external => {
                                let io = img.data_file.as_mut().ok_or(Error::MissingDataFile)?;
                                img.crypt.read(io, at, s, dst)
                            }
                            Layer::Qcow2(img) => img.crypt.read(&mut img.io, at, s, dst),
                        }
                    }
                    (
                        Source::Compressed {
                            host,
                            size,
                            cluster_start,
                        },
                        Some(Layer::Qcow2(img)),
                    ) => {
                        let whole = s == cluster_start && t - s == img.cluster_size();
                        if whole {
                            let from = inputs.len();
                            let len = to_usize(size).unwrap_or(0);
                            inputs.resize(from + len, 0);
                            let r = img.io.read_at(host, &mut inputs[from..]).map_err(Error::Io);
                            batch.push((i, from, from + len));
                            r
                        } else {
                            img.cached_cluster(host, size, codec).and_then(|cluster| {
                                let skip = to_usize(s - cluster_start).unwrap_or(0);
                                let src = cluster.get(skip..skip + dst.len()).ok_or(
                                    Error::corrupt("compressed read outside the cluster", s, host),
                                )?;
                                dst.copy_from_slice(src);
                                Ok(())
                            })
                        }
                    }
                    _ => Err(Error::Internal("extent names a missing layer")),
                };
            if let Err(e) = r {
                self.input_scratch = inputs;
                return Err(self.at_depth(depth, e));
            }
        }
        let r = self.decompress_batch(pos, ext, &batch, &inputs, out, codec);
        self.input_scratch = inputs;
        r
    }

    /// Decodes the whole compressed clusters of `batch` straight into `out`.
    fn decompress_batch<C: Codec + ?Sized>(
        &mut self,
        pos: u64,
        ext: &[Extent],
        batch: &[(usize, usize, usize)],
        inputs: &[u8],
        out: &mut [u8],
        codec: &mut C,
    ) -> Res<(), R> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut jobs: Vec<Job<'_>> = Vec::with_capacity(batch.len());
        let mut kinds = Vec::with_capacity(batch.len());
        for &(i, _, _) in batch {
            let depth = ext.get(i).map_or(0, |e| e.depth);
            kinds.push(match self.layer(depth) {
                Some(Layer::Qcow2(img)) => img.header.compression_type,
                _ => return Err(Error::Internal("extent names a missing layer")),
            });
        }
        let mut rest: &mut [u8] = out;
        let mut at = pos;
        for (&(i, from, to), kind) in batch.iter().zip(kinds) {
            let Some(e) = ext.get(i) else {
                return Err(Error::Internal("compressed extent lost"));
            };
            let skip = to_usize(e.start - at).unwrap_or(0);
            let len = to_usize(e.len).unwrap_or(0);
            let (_, tail) = core::mem::take(&mut rest).split_at_mut(skip);
            let (dst, tail) = tail.split_at_mut(len);
            rest = tail;
            at = e.end();
            jobs.push(Job {
                kind,
                input: &inputs[from..to],
                out: dst,
            });
        }
        codec.decompress_many(&mut jobs).map_err(|(j, reason)| {
            let e = batch.get(j).and_then(|b| ext.get(b.0));
            let (depth, host_offset) = match e.map(|e| (e.depth, e.source)) {
                Some((d, Source::Compressed { host, .. })) => (d, host),
                _ => (0, 0),
            };
            self.at_depth(
                depth,
                Error::Decompress {
                    host_offset,
                    reason,
                },
            )
        })
    }

    /// Forgets the cached decompressed cluster (its host space may be reused).
    pub(crate) fn invalidate_decompressed(&mut self) {
        self.decompressed = None;
    }

    /// The cluster compressed at `host_offset`, decoded (the last one is
    /// cached, for reads of parts of a cluster).
    fn cached_cluster<C: Codec + ?Sized>(
        &mut self,
        host_offset: u64,
        size: u64,
        codec: &mut C,
    ) -> Res<&[u8], R> {
        let hit = matches!(&self.decompressed, Some((o, _)) if *o == host_offset);
        if !hit {
            let cluster_size = self.cluster_size();
            let mut input = heap::zeroed(size, "a compressed cluster")?;
            self.io
                .read_at(host_offset, &mut input)
                .map_err(Error::Io)?;
            let mut out = match self.decompressed.take() {
                Some((_, b)) if to_u64(b.len()) == cluster_size => b,
                _ => heap::zeroed(cluster_size, "a decompressed cluster")?,
            };
            codec
                .decompress(self.header.compression_type, &input, &mut out)
                .map_err(|reason| Error::Decompress {
                    host_offset,
                    reason,
                })?;
            self.decompressed = Some((host_offset, out));
        }
        match &self.decompressed {
            Some((_, b)) => Ok(b),
            None => Err(Error::Internal("decompression cache lost")),
        }
    }
}
