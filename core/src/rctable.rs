//! Refcount lookups through the refcount table and a bounded cache of
//! refcount blocks, and QEMU's detection of metadata-preallocated images.

use alloc::vec::Vec;

use crate::bytes::{be64, to_usize};
use crate::image::Image;
use crate::refcount;
use crate::{BlockRead, Error};

/// Refcount table (loaded on first use) and refcount block cache.
#[derive(Debug)]
pub(crate) struct Refcounts {
    pub(crate) table: Option<Vec<u64>>,
    pub(crate) blocks: crate::cache::TableCache,
    /// Refcount table entries changed in memory, not yet written.
    pub(crate) dirty_entries: alloc::collections::BTreeSet<usize>,
}

impl Refcounts {
    /// An empty state caching up to `blocks` refcount blocks.
    pub(crate) fn new(blocks: usize) -> Self {
        Refcounts {
            table: None,
            blocks: crate::cache::TableCache::new(blocks),
            dirty_entries: alloc::collections::BTreeSet::new(),
        }
    }
}

impl<R: BlockRead> Image<R> {
    /// The on-disk refcount of host cluster `cluster` (0 when no refcount
    /// block covers it).
    pub fn refcount(&mut self, cluster: u64) -> Result<u64, Error<R::Error>> {
        let cb = self.header.cluster_bits;
        let cs = 1u64 << cb;
        let order = self.header.refcount_order;
        self.load_refcount_table()?;
        let per_block = refcount::block_entries(cb, order);
        let idx = cluster / per_block;
        let entry = self
            .refcounts
            .table
            .as_ref()
            .and_then(|t| to_usize(idx).and_then(|i| t.get(i)).copied())
            .unwrap_or(0);
        let block = refcount::table_entry_offset(entry);
        if block == 0 {
            return Ok(0);
        }
        if block % cs != 0 {
            return Err(Error::corrupt(
                "refcount block not aligned to a cluster",
                self.header.refcount_table_offset + idx * 8,
                block,
            ));
        }
        let data = self.refcounts.blocks.get(&mut self.io, block, cs)?;
        Ok(refcount::get(data, order, cluster % per_block))
    }

    /// Loads the refcount table into memory (once).
    pub(crate) fn load_refcount_table(&mut self) -> Result<(), Error<R::Error>> {
        let cs = self.cluster_size();
        if self.refcounts.table.is_none() {
            let len = u64::from(self.header.refcount_table_clusters) * cs;
            let mut raw = alloc::vec![0u8; to_usize(len).unwrap_or(0)];
            self.io
                .read_at(self.header.refcount_table_offset, &mut raw)
                .map_err(Error::Io)?;
            self.refcounts.table = Some(raw.chunks_exact(8).map(|c| be64(c, 0)).collect());
        }
        Ok(())
    }

    /// Whether the image looks preallocated with `preallocation=metadata`
    /// (QEMU's heuristic: clearly more clusters in use per the refcounts than
    /// the file really occupies). Such images' data ranges are checked for
    /// holes by [`Image::block_status`], as QEMU does.
    pub fn metadata_preallocated(&mut self) -> Result<bool, Error<R::Error>> {
        if let Some(v) = self.metadata_prealloc {
            return Ok(v);
        }
        let cs = self.cluster_size();
        let v = match self.io.allocated_size().map_err(Error::Io)? {
            None => false,
            Some(real) => {
                let real_clusters = real / cs;
                let threshold = (real_clusters.saturating_mul(10) / 9).max(real_clusters + 2);
                let end = self.file_len.div_ceil(cs);
                let mut used = 0u64;
                let mut i = 0u64;
                while i < end && used < threshold {
                    if self.refcount(i)? > 0 {
                        used += 1;
                    }
                    i += 1;
                }
                used >= threshold
            }
        };
        self.metadata_prealloc = Some(v);
        Ok(v)
    }
}
