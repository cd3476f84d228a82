//! Committing an overlay into a backing file (`qemu-img commit`): what the
//! layers above the base hold is written into the base, then the top image
//! may be emptied so that it reads through to the base again.
//!
//! The order keeps the guest's view whole after a crash at any point: the
//! base receives the data first (the top still shadows every range being
//! written), and only once the base is durable does emptying the top
//! uncover it.

use crate::copy::{copy, CopyOptions, Sink};
use crate::error::Error;
use crate::image::{Backing, Image, Mapping, Res};
use crate::io::{BlockRead, BlockWrite};
use crate::writable::WritableImage;
use crate::Codec;

impl<R: BlockRead> Image<R> {
    /// Whether guest `[offset, offset + run)` is allocated in this image or
    /// in a layer of its chain less than `base_depth` layers below it
    /// (QEMU's "allocated above the base"): returns that and the length
    /// `run` (at most `len`) of the range sharing the answer. The layer at
    /// `base_depth` and those below it are never consulted. A range past
    /// the end of a shorter layer in between reads as zeros there, so it
    /// counts as allocated.
    pub fn allocated_above(
        &mut self,
        offset: u64,
        len: u64,
        base_depth: u32,
    ) -> Res<(bool, u64), R> {
        let len = len.min(self.size().saturating_sub(offset));
        if len == 0 {
            return Ok((false, 0));
        }
        let (m, run) = self.map_shallow(offset, len)?;
        let run = run.clamp(1, len);
        if !matches!(m, Mapping::Unallocated { .. }) {
            return Ok((true, run));
        }
        if base_depth <= 1 {
            return Ok((false, run));
        }
        match self.backing_mut() {
            None => Ok((true, run)),
            Some(b) if offset >= b.size() => Ok((true, run)),
            Some(Backing::Raw { size, .. }) => Ok((true, run.min(*size - offset))),
            Some(Backing::Qcow2(img)) => {
                let below = run.min(img.size() - offset);
                img.allocated_above(offset, below, base_depth - 1)
            }
        }
    }

    /// The layer `depth` levels below this image (0: this image itself),
    /// if the chain is that deep.
    pub fn chain_layer(&self, depth: u32) -> Option<ChainLayer<'_, R>> {
        let mut cur = self;
        for _ in 0..depth.saturating_sub(1) {
            match cur.backing()? {
                Backing::Qcow2(img) => cur = img,
                Backing::Raw { .. } => return None,
            }
        }
        if depth == 0 {
            return Some(ChainLayer::Qcow2(cur));
        }
        Some(match cur.backing()? {
            Backing::Qcow2(img) => ChainLayer::Qcow2(img),
            Backing::Raw { name, size, .. } => ChainLayer::Raw { name, size: *size },
        })
    }
}

/// One layer of a backing chain, as [`Image::chain_layer`] finds it.
#[derive(Debug)]
pub enum ChainLayer<'a, R: BlockRead> {
    /// A qcow2 image.
    Qcow2(&'a Image<R>),
    /// A raw file.
    Raw {
        /// Its resolved name.
        name: &'a str,
        /// Its size in bytes.
        size: u64,
    },
}

impl<R: BlockRead> ChainLayer<'_, R> {
    /// The layer's resolved name.
    pub fn name(&self) -> &str {
        match self {
            ChainLayer::Qcow2(img) => img.name(),
            ChainLayer::Raw { name, .. } => name,
        }
    }
}

/// Writes into the layer `base_depth` levels below `top` (through `sink`,
/// which writes into that layer: an [`ImageSink`](crate::copy::ImageSink)
/// with `over_backing` set, or a [`StorageSink`] for a raw file) every
/// range the layers above it hold, as the guest reads it through `top`:
/// data, and zeros where a layer above records zeros. Only `[0,
/// top.size())` is written; a base smaller than that must be grown first.
/// `copy` sets the chunk size and alignment (the base's cluster size).
pub fn commit<R, S>(
    top: &mut Image<R>,
    base_depth: u32,
    opts: CopyOptions,
    codec: &mut dyn Codec,
    sink: &mut S,
) -> Result<(), S::Error>
where
    R: BlockRead,
    S: Sink + ?Sized,
    S::Error: From<Error<R::Error>>,
{
    if base_depth == 0 || top.chain_layer(base_depth).is_none() {
        return Err(
            Error::<R::Error>::Unsupported("the base is not in the image's backing chain").into(),
        );
    }
    let size = top.size();
    let mut pos = 0u64;
    while pos < size {
        let (allocated, run) = top.allocated_above(pos, size - pos, base_depth)?;
        let run = run.clamp(1, size - pos);
        if allocated {
            copy(top, pos, pos + run, opts, codec, sink)?;
        }
        pos += run;
    }
    Ok(())
}

/// A [`Sink`] writing guest data into raw storage at the same offsets (a
/// raw base being committed into): data is written, zero runs are written
/// as zeros wherever the storage does not read as zeros already (holes and
/// zero bytes are left alone).
#[derive(Debug)]
pub struct StorageSink<'a, W: BlockWrite> {
    io: &'a mut W,
    buf: alloc::vec::Vec<u8>,
}

impl<'a, W: BlockWrite> StorageSink<'a, W> {
    /// A sink over `io`.
    pub fn new(io: &'a mut W) -> Self {
        StorageSink {
            io,
            buf: alloc::vec::Vec::new(),
        }
    }
}

impl<W: BlockWrite> Sink for StorageSink<'_, W> {
    type Error = Error<W::Error>;

    fn data(
        &mut self,
        offset: u64,
        buf: &mut alloc::vec::Vec<u8>,
        len: usize,
    ) -> Result<(), Self::Error> {
        self.io.write_at(offset, &buf[..len]).map_err(Error::Io)
    }

    fn zeroes(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        const STEP: u64 = 1 << 20;
        let end = offset.saturating_add(len);
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(STEP);
            if let Some((false, hole)) = self.io.allocation(pos, n).map_err(Error::Io)? {
                if hole > 0 {
                    pos += hole.min(n);
                    continue;
                }
            }
            let k = crate::bytes::to_usize(n).unwrap_or(0);
            self.buf.resize(k, 0);
            self.io.read_at(pos, &mut self.buf).map_err(Error::Io)?;
            if !crate::copy::is_zero(&self.buf) {
                self.buf.fill(0);
                self.io.write_at(pos, &self.buf).map_err(Error::Io)?;
            }
            pos += n;
        }
        Ok(())
    }
}

impl<R: BlockWrite> WritableImage<R> {
    /// Empties the image (`bdrv_make_empty`, what `qemu-img commit` does to
    /// the top image after committing it): every cluster becomes
    /// unallocated, so the guest reads the backing file everywhere, the L2
    /// tables are freed and the file's unused tail is cut. Snapshots keep
    /// their data. A crash leaves part of the image emptied, at worst with
    /// leaked clusters.
    pub fn make_empty(&mut self) -> Res<(), R> {
        self.require_intact()?;
        if self.img.header.data_file_raw() {
            return Err(Error::Unsupported(
                "emptying an image whose external data file is raw",
            ));
        }
        self.require_consistent()?;
        let size = self.img.header.size;
        self.begin_guest_change(0, size)?;
        let cs = self.cluster_size();
        let per_l2 = self.img.header.l2_coverage();
        for idx in 0..self.img.l1.len() {
            let start = crate::bytes::to_u64(idx).saturating_mul(per_l2);
            if start >= size {
                break;
            }
            if crate::l2::l1_offset(self.img.l1[idx]) == 0 {
                continue;
            }
            let end = start.saturating_add(per_l2).min(size);
            let mut pos = start;
            while pos < end {
                let l2_off = self.writable_l2(pos)?;
                let (entry, bitmap) = self.l2_entry(l2_off, pos)?;
                if entry != 0 || bitmap != 0 {
                    self.unallocate_cluster(pos)?;
                    self.flush_if_over_budget()?;
                }
                pos += cs;
            }
        }
        self.drop_l2_tables(0);
        self.flush()?;
        self.cut_unused_tail()
    }
}
