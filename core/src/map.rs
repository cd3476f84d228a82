//! Block status through the backing chain, as `qemu-img map` reports it.

use crate::error::Error;
use crate::image::{Backing, Image, Mapping};
use crate::io::BlockRead;

/// The state of a guest range, following the chain down to the layer that
/// defines it (the fields of `qemu-img map --output=json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Number of layers below the top where the state was found.
    pub depth: u32,
    /// Allocated at that layer (data, or zeros the layer itself records).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data (possibly compressed).
    pub data: bool,
    /// Compressed cluster.
    pub compressed: bool,
    /// Host offset in the file holding the data, when it has one.
    pub offset: Option<u64>,
    /// Whether `offset` refers to an external data file.
    pub external: bool,
}

impl BlockStatus {
    fn new(depth: u32) -> Self {
        BlockStatus {
            depth,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            external: false,
        }
    }

    /// Whether the range is known to read as zeros without holding data.
    pub fn reads_as_zero(&self) -> bool {
        self.zero && !self.data
    }

    /// Whether a range with status `next` directly after `len` bytes of this
    /// one can be reported as one range.
    pub fn continues(&self, len: u64, next: &BlockStatus) -> bool {
        let offset_ok = match (self.offset, next.offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a.checked_add(len) == Some(b),
            _ => false,
        };
        offset_ok
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.external == next.external
    }
}

/// How the bytes of a guest disk are stored, in bytes per category: the
/// one definition of the allocation categories every host shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Allocation {
    /// Uncompressed data in the image itself.
    pub data: u64,
    /// Compressed clusters.
    pub compressed: u64,
    /// Zero clusters recorded by the image.
    pub zero: u64,
    /// Read from a backing file.
    pub backing: u64,
    /// Not allocated anywhere (reads as zeros).
    pub unallocated: u64,
}

/// The allocation category of a guest range (see [`Allocation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Category {
    /// Uncompressed data in the image itself.
    Data,
    /// Compressed clusters.
    Compressed,
    /// Zero clusters recorded by the image.
    Zero,
    /// Read from a backing file.
    Backing,
    /// Not allocated anywhere (reads as zeros).
    Unallocated,
}

impl Category {
    /// The category of a range with status `s`: from a backing layer; else
    /// compressed; else data (also when flagged zero over preallocated
    /// data); else zeros the image records; else unallocated.
    pub fn of(s: &BlockStatus) -> Category {
        if s.depth > 0 && s.present {
            Category::Backing
        } else if s.compressed {
            Category::Compressed
        } else if s.data {
            Category::Data
        } else if s.present {
            Category::Zero
        } else {
            Category::Unallocated
        }
    }
}

impl Allocation {
    /// Counts `len` bytes with status `s` in their [`Category`].
    pub fn add(&mut self, s: &BlockStatus, len: u64) {
        let slot = match Category::of(s) {
            Category::Backing => &mut self.backing,
            Category::Compressed => &mut self.compressed,
            Category::Data => &mut self.data,
            Category::Zero => &mut self.zero,
            Category::Unallocated => &mut self.unallocated,
        };
        *slot = slot.saturating_add(len);
    }

    /// The allocation of `[start, end)`, walked with `status` (which
    /// returns the status at an offset and its run length).
    pub fn of<E>(
        start: u64,
        end: u64,
        mut status: impl FnMut(u64, u64) -> Result<(BlockStatus, u64), E>,
    ) -> Result<Allocation, E> {
        let mut a = Allocation::default();
        let mut pos = start;
        while pos < end {
            let (st, run) = status(pos, end - pos)?;
            if run == 0 {
                break;
            }
            a.add(&st, run);
            pos += run;
        }
        Ok(a)
    }
}

/// One merged range of a map: start, length and status.
pub type MapEntry = (u64, u64, BlockStatus);

/// Walks `[start, end)` with `status` (which returns the status at an
/// offset and its run length) and merges adjacent runs that continue each
/// other, as `qemu-img map` prints them. Shared by every host.
pub fn merged_map<E>(
    start: u64,
    end: u64,
    status: impl FnMut(u64, u64) -> Result<(BlockStatus, u64), E>,
) -> Result<alloc::vec::Vec<MapEntry>, E> {
    let mut out: alloc::vec::Vec<MapEntry> = alloc::vec::Vec::new();
    for_each_merged(start, end, status, |e| {
        out.push(e);
        Ok(())
    })?;
    Ok(out)
}

/// Like [`merged_map`], handing each merged range to `emit` as soon as it
/// is complete: memory does not grow with the map (the CLI prints as it
/// goes).
pub fn for_each_merged<E>(
    start: u64,
    end: u64,
    status: impl FnMut(u64, u64) -> Result<(BlockStatus, u64), E>,
    mut emit: impl FnMut(MapEntry) -> Result<(), E>,
) -> Result<(), E> {
    walk_merged(start, end, status, |e| emit(e).map(|()| true)).map(|_| ())
}

/// One page of [`merged_map`]: at most `max_entries` merged ranges from
/// `start`, and the offset the next page starts at (`None` once `end` is
/// reached). Pages end on range boundaries, so the pages of a disk,
/// joined, are exactly its map; a host with a fixed memory budget (the
/// wasm package) hands the map out this way.
pub fn merged_page<E>(
    start: u64,
    end: u64,
    max_entries: usize,
    status: impl FnMut(u64, u64) -> Result<(BlockStatus, u64), E>,
) -> Result<(alloc::vec::Vec<MapEntry>, Option<u64>), E> {
    let max_entries = max_entries.max(1);
    let mut out: alloc::vec::Vec<MapEntry> = alloc::vec::Vec::new();
    let next = walk_merged(start, end, status, |e| {
        out.push(e);
        Ok(out.len() < max_entries)
    })?;
    Ok((out, next))
}

/// Merges the runs of `[start, end)`, handing each complete range to
/// `emit`, which says whether to go on. Returns where it stopped early
/// (the end of the last range emitted), or `None` when it reached `end`.
fn walk_merged<E>(
    start: u64,
    end: u64,
    mut status: impl FnMut(u64, u64) -> Result<(BlockStatus, u64), E>,
    mut emit: impl FnMut(MapEntry) -> Result<bool, E>,
) -> Result<Option<u64>, E> {
    let mut cur: Option<MapEntry> = None;
    let mut pos = start;
    while pos < end {
        let (st, run) = status(pos, end - pos)?;
        if run == 0 {
            break;
        }
        match &mut cur {
            Some((_, len, last)) if last.continues(*len, &st) => *len += run,
            _ => {
                if let Some(done) = cur.take() {
                    let done_end = done.0 + done.1;
                    if !emit(done)? {
                        return Ok(Some(done_end));
                    }
                }
                cur = Some((pos, run, st));
            }
        }
        pos += run;
    }
    if let Some(done) = cur {
        emit(done)?;
    }
    Ok(None)
}

/// Block status of a raw file at `depth`: data or hole (via
/// [`BlockRead::allocation`]), the offset being the guest offset.
pub fn raw_status<R: BlockRead>(
    io: &mut R,
    offset: u64,
    len: u64,
    depth: u32,
) -> Result<(BlockStatus, u64), R::Error> {
    let (data, run) = match io.allocation(offset, len)? {
        Some((data, run)) if run > 0 => (data, run.min(len)),
        _ => (true, len),
    };
    let mut s = BlockStatus::new(depth);
    s.present = true;
    s.data = data;
    s.zero = !data;
    s.offset = Some(offset);
    Ok((s, run))
}

impl<R: BlockRead> Image<R> {
    /// Block status of up to `len` bytes at `offset`, descending the backing
    /// chain like `qemu-img map`. Returns the status and the run length.
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Result<(BlockStatus, u64), Error<R::Error>> {
        self.block_status_at(offset, len, 0)
    }

    fn block_status_at(
        &mut self,
        offset: u64,
        len: u64,
        depth: u32,
    ) -> Result<(BlockStatus, u64), Error<R::Error>> {
        let (m, mut run) = self.map_shallow(offset, len)?;
        let mut s = BlockStatus::new(depth);
        match m {
            Mapping::Data {
                host_offset,
                external,
            } => {
                s.present = true;
                s.data = true;
                // Like QEMU, no host offsets for encrypted images.
                s.offset = (!self.crypt.is_some()).then_some(host_offset);
                s.external = external;
                // Like QEMU, look for holes in the file under data ranges of
                // metadata-preallocated images: they read as zeros.
                if self.metadata_preallocated()? {
                    let io = match (external, self.data_file.as_mut()) {
                        (true, Some(df)) => df,
                        _ => &mut self.io,
                    };
                    if let Some((data, n)) = io.allocation(host_offset, run).map_err(Error::Io)? {
                        if n > 0 {
                            run = run.min(n);
                        }
                        s.zero = !data;
                    }
                }
            }
            Mapping::Compressed { .. } => {
                s.present = true;
                s.data = true;
                s.compressed = true;
            }
            Mapping::Zero { host_offset } => {
                s.present = true;
                s.zero = true;
                s.offset = host_offset.filter(|_| !self.crypt.is_some());
                s.external = host_offset.is_some() && self.fmt.data_file;
            }
            Mapping::Unallocated { host_offset } => {
                let backing = self.backing_mut();
                match backing {
                    Some(b) if offset < b.size() => {
                        let below = run.min(b.size() - offset);
                        return match b {
                            Backing::Qcow2(img) => img.block_status_at(offset, below, depth + 1),
                            Backing::Raw { io, .. } => {
                                raw_status(io, offset, below, depth + 1).map_err(Error::Io)
                            }
                        };
                    }
                    _ => {
                        s.zero = true;
                        s.offset = host_offset.filter(|_| !self.crypt.is_some());
                        s.external = host_offset.is_some() && self.fmt.data_file;
                    }
                }
            }
        }
        Ok((s, run))
    }
}
