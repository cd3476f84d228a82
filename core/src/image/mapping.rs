//! What a guest range holds at one layer: one walk over the L2 entries,
//! answered as runs of one [`Mapping`] each.

use alloc::vec::Vec;

use super::{Image, Mapping, Res};
use crate::bytes::{be64, to_usize};
use crate::error::Error;
use crate::io::BlockRead;
use crate::l2::{self, Subcluster};

/// A run of guest bytes with one [`Mapping`] at one layer (what
/// [`Image::map_range`] answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Guest offset of the run.
    pub start: u64,
    /// Length of the run in bytes.
    pub len: u64,
    /// What the run holds at this layer.
    pub mapping: Mapping,
}

impl Run {
    /// Guest offset just past the run.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// Whether `next` (starting where `prev` ends) continues `prev`'s mapping.
fn continues(prev: &Run, next: &Run) -> bool {
    let shifted = |h: Option<u64>| h.map(|h| h.saturating_add(prev.len));
    match (prev.mapping, next.mapping) {
        (Mapping::Unallocated { host_offset: a }, Mapping::Unallocated { host_offset: b })
        | (Mapping::Zero { host_offset: a }, Mapping::Zero { host_offset: b }) => shifted(a) == b,
        (
            Mapping::Data {
                host_offset: a,
                external: ea,
            },
            Mapping::Data {
                host_offset: b,
                external: eb,
            },
        ) => ea == eb && shifted(Some(a)) == Some(b),
        _ => false,
    }
}

impl<R: BlockRead> Image<R> {
    /// Says what the guest range starting at `offset` holds at this layer
    /// (not looking into the backing file), for up to `max_len` bytes.
    /// Returns the mapping and the length of the run it covers (at least 1
    /// byte when `max_len > 0` and `offset` is inside the disk; 0 otherwise).
    pub fn map_shallow(&mut self, offset: u64, max_len: u64) -> Res<(Mapping, u64), R> {
        let mut first = (Mapping::Unallocated { host_offset: None }, 0);
        self.walk_slice(offset, max_len, &mut |m, len| {
            first = (m, len);
            false
        })?;
        Ok(first)
    }

    /// Appends to `out` what `[offset, offset + len)` (clipped to the disk)
    /// holds at this layer, as runs of one mapping each: every L2 table
    /// (slice) the range touches is looked up once.
    pub fn map_range(&mut self, offset: u64, len: u64, out: &mut Vec<Run>) -> Res<(), R> {
        self.map_range_capped(offset, len, usize::MAX, out)
    }

    /// [`Image::map_range`] that stops once `out` holds `cap` runs (the
    /// last one may then end before the range does).
    pub(crate) fn map_range_capped(
        &mut self,
        offset: u64,
        len: u64,
        cap: usize,
        out: &mut Vec<Run>,
    ) -> Res<(), R> {
        let end = offset.saturating_add(len).min(self.header.size);
        let mut pos = offset;
        while pos < end && out.len() < cap {
            let before = pos;
            self.walk_slice(pos, end - pos, &mut |mapping, n| {
                let e = Run {
                    start: pos,
                    len: n,
                    mapping,
                };
                match out.last_mut() {
                    Some(last) if last.end() == pos && continues(last, &e) => last.len += n,
                    _ => out.push(e),
                }
                pos += n;
                out.len() < cap
            })?;
            if pos == before {
                return Err(Error::Internal("mapping made no progress"));
            }
        }
        Ok(())
    }

    /// Walks the runs of `[offset, offset + max_len)` inside the L2 table
    /// slice that maps `offset`, calling `emit(mapping, len)` for each in
    /// order until it returns `false`. Emits nothing outside the disk.
    fn walk_slice(
        &mut self,
        offset: u64,
        max_len: u64,
        emit: &mut dyn FnMut(Mapping, u64) -> bool,
    ) -> Res<(), R> {
        let size = self.header.size;
        if offset >= size || max_len == 0 {
            return Ok(());
        }
        let cb = self.fmt.cluster_bits;
        let l2_entries = self.header.l2_entries();
        let coverage_bits = cb + l2_entries.trailing_zeros();
        let l1_index = offset >> coverage_bits;
        let coverage_end = (l1_index + 1)
            .checked_shl(coverage_bits)
            .unwrap_or(u64::MAX);
        let limit = offset.saturating_add(max_len).min(size).min(coverage_end);
        let unalloc = Mapping::Unallocated { host_offset: None };
        let Some(&l1e) = to_usize(l1_index).and_then(|i| self.l1.get(i)) else {
            emit(unalloc, limit - offset);
            return Ok(());
        };
        let l2_offset = l2::l1_offset(l1e);
        if l2_offset == 0 {
            emit(unalloc, limit - offset);
            return Ok(());
        }
        let cluster_size = 1u64 << cb;
        if l2_offset & (cluster_size - 1) != 0 {
            return Err(Error::corrupt(
                "L1 entry points to an unaligned L2 table",
                offset,
                l2_offset,
            ));
        }
        let fmt = self.fmt;
        let entry_size = fmt.entry_size();
        // Which slice of the table holds the entry (the whole table unless frugal).
        let slice = self.l2_slice;
        let slice_entries = slice / entry_size as u64;
        let slice_bits = cb + slice_entries.trailing_zeros();
        let first_idx = (offset >> cb) & (l2_entries - 1);
        let slice_off = l2_offset + (first_idx / slice_entries) * slice;
        let slice_end = ((offset >> slice_bits) + 1)
            .checked_shl(slice_bits)
            .unwrap_or(u64::MAX);
        let limit = limit.min(slice_end);
        let table = self.l2_cache.get(&mut self.io, slice_off, slice)?;
        let sc_bits = if fmt.extended { cb - 5 } else { cb };
        let classify = |pos: u64| -> Result<(Subcluster, u64), Error<R::Error>> {
            let idx = to_usize((pos >> cb) & (slice_entries - 1)).unwrap_or(0);
            let at = idx * entry_size;
            let entry = be64(table, at);
            let bitmap = if fmt.extended { be64(table, at + 8) } else { 0 };
            let sc = u32::try_from((pos >> sc_bits) & 31).unwrap_or(0);
            let sub = fmt
                .subcluster(entry, bitmap, sc)
                .map_err(|e| Error::corrupt(e.what(), pos, e.value()))?;
            // End of this subcluster (or cluster).
            let end = ((pos >> sc_bits) + 1) << sc_bits;
            Ok((sub, end))
        };
        let in_cluster = |pos: u64| pos & (cluster_size - 1);
        let mut start = offset;
        let (mut first, mut end) = classify(start)?;
        loop {
            let mapping = match first {
                Subcluster::Unallocated => unalloc,
                Subcluster::Zero => Mapping::Zero { host_offset: None },
                Subcluster::UnallocatedAlloc { host } => Mapping::Unallocated {
                    host_offset: Some(host + in_cluster(start)),
                },
                Subcluster::ZeroAlloc { host } => Mapping::Zero {
                    host_offset: Some(host + in_cluster(start)),
                },
                Subcluster::Normal { host } => {
                    if fmt.data_file && host != start & !(cluster_size - 1) {
                        return Err(Error::corrupt(
                            "external data file offset does not match the guest offset",
                            start,
                            host,
                        ));
                    }
                    Mapping::Data {
                        host_offset: host + in_cluster(start),
                        external: fmt.data_file,
                    }
                }
                Subcluster::Compressed(d) => {
                    if fmt.data_file {
                        return Err(Error::corrupt(
                            "compressed cluster in an image with an external data file",
                            start,
                            d.offset,
                        ));
                    }
                    // One run per compressed cluster.
                    end = (start | (cluster_size - 1)).saturating_add(1);
                    Mapping::Compressed {
                        host_offset: d.offset,
                        size: d.size,
                        cluster_start: start & !(cluster_size - 1),
                    }
                }
            };
            // Extend the run while the following subclusters continue it.
            let mut next = None;
            let compressed = matches!(mapping, Mapping::Compressed { .. });
            while end < limit && !compressed {
                let (sub, sub_end) = classify(end)?;
                let expected = |host: Option<u64>| host.map(|h| h + (end - start));
                let continued = match (mapping, sub) {
                    (Mapping::Unallocated { host_offset: None }, Subcluster::Unallocated) => true,
                    (Mapping::Zero { host_offset: None }, Subcluster::Zero) => true,
                    (
                        Mapping::Unallocated {
                            host_offset: h @ Some(_),
                        },
                        Subcluster::UnallocatedAlloc { host },
                    )
                    | (
                        Mapping::Zero {
                            host_offset: h @ Some(_),
                        },
                        Subcluster::ZeroAlloc { host },
                    ) => expected(h) == Some(host + in_cluster(end)),
                    (Mapping::Data { host_offset, .. }, Subcluster::Normal { host }) => {
                        expected(Some(host_offset)) == Some(host + in_cluster(end))
                            && !(fmt.data_file && host != end & !(cluster_size - 1))
                    }
                    _ => false,
                };
                if !continued {
                    next = Some((sub, sub_end));
                    break;
                }
                end = sub_end;
            }
            let run_end = end.min(limit);
            if !emit(mapping, run_end - start) || run_end >= limit {
                return Ok(());
            }
            start = run_end;
            (first, end) = match next {
                Some(n) => n,
                None => classify(start)?,
            };
        }
    }
}
