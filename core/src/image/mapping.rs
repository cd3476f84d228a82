//! What a guest range holds at one layer: one walk over the L2 entries.

use super::{Image, Mapping, Res};
use crate::bytes::{be64, to_usize};
use crate::error::Error;
use crate::io::BlockRead;
use crate::l2::{self, Subcluster};

impl<R: BlockRead> Image<R> {
    /// (not looking into the backing file), for up to `max_len` bytes.
    /// Returns the mapping and the length of the run it covers (at least 1
    /// byte when `max_len > 0` and `offset` is inside the disk; 0 otherwise).
    pub fn map_shallow(&mut self, offset: u64, max_len: u64) -> Res<(Mapping, u64), R> {
        let size = self.header.size;
        if offset >= size || max_len == 0 {
            return Ok((Mapping::Unallocated { host_offset: None }, 0));
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
            return Ok((unalloc, limit - offset));
        };
        let l2_offset = l2::l1_offset(l1e);
        if l2_offset == 0 {
            return Ok((unalloc, limit - offset));
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
        let (first, mut end) = classify(offset)?;
        let mapping = match first {
            Subcluster::Unallocated => unalloc,
            Subcluster::Zero => Mapping::Zero { host_offset: None },
            Subcluster::UnallocatedAlloc { host } => Mapping::Unallocated {
                host_offset: Some(host + in_cluster(offset)),
            },
            Subcluster::ZeroAlloc { host } => Mapping::Zero {
                host_offset: Some(host + in_cluster(offset)),
            },
            Subcluster::Normal { host } => {
                if fmt.data_file && host != offset & !(cluster_size - 1) {
                    return Err(Error::corrupt(
                        "external data file offset does not match the guest offset",
                        offset,
                        host,
                    ));
                }
                Mapping::Data {
                    host_offset: host + in_cluster(offset),
                    external: fmt.data_file,
                }
            }
            Subcluster::Compressed(d) => {
                if fmt.data_file {
                    return Err(Error::corrupt(
                        "compressed cluster in an image with an external data file",
                        offset,
                        d.offset,
                    ));
                }
                let cluster_end = (offset | (cluster_size - 1)).saturating_add(1);
                return Ok((
                    Mapping::Compressed {
                        host_offset: d.offset,
                        size: d.size,
                        cluster_start: offset & !(cluster_size - 1),
                    },
                    cluster_end.min(limit) - offset,
                ));
            }
        };
        // Extend the run while the following subclusters continue it.
        while end < limit {
            let (next, next_end) = classify(end)?;
            let expected = |host: Option<u64>| host.map(|h| h + (end - offset));
            let continues = match (mapping, next) {
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
            if !continues {
                break;
            }
            end = next_end;
        }
        Ok((mapping, end.min(limit) - offset))
    }
}
