//! The refcount table and a bounded cache of refcount blocks: lookups of a
//! host cluster's refcount. A leaf type: it takes the storage explicitly,
//! so the read path (QEMU's preallocation heuristic), the writer and the
//! check can each hold one without sharing an image.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use crate::bytes::to_usize;
use crate::cache::TableCache;
use crate::error::Error;
use crate::header::Header;
use crate::heap;
use crate::io::BlockRead;
use crate::refcount;

/// The refcount table (in memory) and cached refcount blocks.
#[derive(Debug)]
pub(crate) struct Refcounts {
    /// Refcount table entries.
    pub(crate) table: Vec<u64>,
    /// Host offset of the refcount table.
    pub(crate) table_offset: u64,
    /// Cached refcount blocks, keyed by host offset.
    pub(crate) blocks: TableCache,
    /// Refcount table entries changed in memory, not yet written.
    pub(crate) dirty_entries: BTreeSet<usize>,
    cluster_bits: u32,
    order: u32,
}

impl Refcounts {
    /// Reads the refcount table of the image with header `h`; caches up to
    /// `blocks` refcount blocks.
    pub(crate) fn load<R: BlockRead>(
        io: &mut R,
        h: &Header,
        blocks: usize,
    ) -> Result<Self, Error<R::Error>> {
        let len = u64::from(h.refcount_table_clusters) * h.cluster_size();
        let mut raw = heap::zeroed(len, "the refcount table")?;
        io.read_at(h.refcount_table_offset, &mut raw)
            .map_err(Error::Io)?;
        Ok(Refcounts {
            table: heap::entries(&raw, "the refcount table")?,
            table_offset: h.refcount_table_offset,
            blocks: TableCache::new(blocks),
            dirty_entries: BTreeSet::new(),
            cluster_bits: h.cluster_bits,
            order: h.refcount_order,
        })
    }

    /// Refcount entries per refcount block.
    pub(crate) fn per_block(&self) -> u64 {
        refcount::block_entries(self.cluster_bits, self.order)
    }

    /// The refcount table entry at `index` (0 beyond the table).
    pub(crate) fn entry(&self, index: u64) -> u64 {
        to_usize(index)
            .and_then(|i| self.table.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// The on-disk refcount of host cluster `cluster` (0 when no refcount
    /// block covers it).
    pub(crate) fn get<R: BlockRead>(
        &mut self,
        io: &mut R,
        cluster: u64,
    ) -> Result<u64, Error<R::Error>> {
        let cs = 1u64 << self.cluster_bits;
        let per_block = self.per_block();
        let idx = cluster / per_block;
        let block = refcount::table_entry_offset(self.entry(idx));
        if block == 0 {
            return Ok(0);
        }
        if !block.is_multiple_of(cs) {
            return Err(Error::corrupt(
                "refcount block not aligned to a cluster",
                self.table_offset + idx * 8,
                block,
            ));
        }
        let data = self.blocks.get(io, block, cs)?;
        Ok(refcount::get(data, self.order, cluster % per_block))
    }
}
