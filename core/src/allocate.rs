//! Cluster allocation and refcount updates for the write path.
//!
//! Refcount changes are made in the refcount block cache and written by
//! [`Image::write_refcounts`] before any L2/L1 entry that depends on them
//! (see `write.rs` for the whole write order). Decrements are never applied
//! directly: they wait in `pending_frees` until the entries that dropped the
//! references are durable.

use alloc::vec::Vec;

use crate::bytes::{put64, to_u64, to_usize};
use crate::error::Error;
use crate::io::BlockWrite;
use crate::refcount;
use crate::writable::WritableImage;

use crate::image::Res;
use crate::overlap;

impl<R: BlockWrite> WritableImage<R> {
    fn per_block(&self) -> u64 {
        refcount::block_entries(self.img.header.cluster_bits, self.img.header.refcount_order)
    }

    /// Adds `delta` to the refcount of host cluster `cluster`, creating the
    /// refcount block (and growing the table) when needed.
    pub(crate) fn change_refcount(&mut self, cluster: u64, delta: i64) -> Res<(), R> {
        let cs = self.cluster_size();
        let order = self.img.header.refcount_order;
        let block = self.ensure_refcount_block(cluster)?;
        let per_block = self.per_block();
        let data = self.refcounts.blocks.get_mut(&mut self.img.io, block, cs)?;
        let idx = cluster % per_block;
        let old = refcount::get(data, order, idx);
        let new = if delta >= 0 {
            old.checked_add(delta.unsigned_abs())
                .filter(|n| *n <= refcount::max_refcount(order))
                .ok_or(Error::corrupt(
                    "refcount overflow",
                    cluster << self.img.header.cluster_bits,
                    old,
                ))?
        } else {
            old.checked_sub(delta.unsigned_abs()).ok_or(Error::corrupt(
                "refcount underflow",
                cluster << self.img.header.cluster_bits,
                old,
            ))?
        };
        refcount::set(data, order, idx, new);
        if new == 0 && cluster < self.free_hint {
            self.free_hint = cluster;
        }
        Ok(())
    }

    /// Returns the offset of the refcount block covering `cluster`, creating
    /// it (self-describing when it lies in its own range) if needed.
    fn ensure_refcount_block(&mut self, cluster: u64) -> Res<u64, R> {
        let cs = self.cluster_size();
        let per_block = self.per_block();
        let ti = to_usize(cluster / per_block).ok_or(Error::Unsupported("image too large"))?;
        let len = self.refcounts.table.len();
        if ti >= len {
            self.grow_refcount_table(ti)?;
        }
        let entry = self.refcounts.entry(to_u64(ti));
        let off = refcount::table_entry_offset(entry);
        if off != 0 {
            if !off.is_multiple_of(cs) {
                return Err(Error::corrupt(
                    "refcount block not aligned to a cluster",
                    to_u64(ti),
                    off,
                ));
            }
            return Ok(off);
        }
        // A new block: place it at the first free cluster. If that cluster
        // is inside the new block's own range, the block records itself; if
        // it is in another range without a block, that range's block is
        // created first (it then records itself at that cluster).
        let range_start = to_u64(ti) * per_block;
        let order = self.img.header.refcount_order;
        loop {
            let candidate = self.find_free(1)?;
            let cti = candidate / per_block;
            let block_off = candidate * cs;
            let mut data = alloc::vec![0u8; to_usize(cs).unwrap_or(0)];
            let has_block = |r: &crate::rctable::Refcounts| r.entry(cti) != 0;
            if cti == to_u64(ti) {
                refcount::set(&mut data, order, candidate - range_start, 1);
            } else if !has_block(&self.refcounts) {
                self.ensure_refcount_block(candidate)?;
                continue;
            }
            self.metadata.insert(block_off, cs, overlap::REFCOUNT_BLOCK);
            self.reserve(block_off, cs, overlap::REFCOUNT_BLOCK)?;
            self.refcounts.blocks.insert_dirty(block_off, data);
            if let Some(e) = self.refcounts.table.get_mut(ti) {
                *e = block_off;
            }
            self.refcounts.dirty_entries.insert(ti);
            if cti != to_u64(ti) {
                self.change_refcount(candidate, 1)?;
            }
            let end = (candidate + 1) * cs;
            self.file_end = self.file_end.max(end);
            return Ok(block_off);
        }
    }

    /// Finds `n` contiguous free clusters, searching from the hint (which
    /// moves to the first free cluster seen).
    pub(crate) fn find_free(&mut self, n: u64) -> Res<u64, R> {
        let mut start = self.free_hint;
        let mut run = 0u64;
        let mut c = start;
        let mut first_free = None;
        // Clusters past the end of every refcount block read as free, so the
        // search always ends.
        let limit = crate::header::MAX_HOST_OFFSET >> self.img.header.cluster_bits;
        while run < n {
            if c >= limit {
                return Err(Error::Unsupported("host file would exceed 2^56 bytes"));
            }
            // Never cluster 0, never a cluster holding metadata, whatever
            // the refcounts on disk say.
            let cs = 1u64 << self.img.header.cluster_bits;
            let kinds = self.metadata.kinds(c * cs, cs);
            if kinds != 0 && c * cs >= self.file_end.saturating_add(cs) {
                // Metadata said to lie a cluster or more past the end of the
                // file (a damaged table size or offset; less than a cluster
                // past it is a file ending inside its last cluster, which
                // QEMU tolerates): skipping it could grow the file without
                // bound. Refused as QEMU refuses the overlapping write, and
                // the image marked corrupt.
                return Err(self.overlap_error(kinds, c * cs, cs));
            }
            if self.unused(c)? {
                if run == 0 {
                    start = c;
                }
                first_free.get_or_insert(c);
                run += 1;
            } else {
                run = 0;
            }
            c += 1;
        }
        if let Some(f) = first_free {
            self.free_hint = f;
        }
        Ok(start)
    }

    /// Whether cluster `c` can be handed out: not cluster 0, no metadata,
    /// not waiting to be freed, refcount 0, and (while rebuilding) not
    /// referenced.
    fn unused(&mut self, c: u64) -> Res<bool, R> {
        let cs = 1u64 << self.img.header.cluster_bits;
        Ok(c != 0
            && self.rebuilding.as_ref().is_none_or(|r| r.get(c) == 0)
            && self.metadata.kinds(c * cs, cs) == 0
            && self.pending_map.kinds(c * cs, cs) == 0
            && self.refcount(c)? == 0)
    }

    /// Allocates `n` contiguous clusters (refcount 1 each) and returns the
    /// host offset of the first.
    pub(crate) fn alloc_clusters(&mut self, n: u64) -> Res<u64, R> {
        let per_block = self.per_block();
        loop {
            let start = self.find_free(n)?;
            // Every block covering the run must exist first; creating one may
            // take a cluster of the run, so then search again.
            for bi in start / per_block..=(start + n - 1) / per_block {
                self.ensure_refcount_block(bi * per_block)?;
            }
            let mut still_free = true;
            for c in start..start + n {
                if self.refcount(c)? != 0 {
                    still_free = false;
                    break;
                }
            }
            if !still_free {
                continue;
            }
            for c in start..start + n {
                self.change_refcount(c, 1)?;
            }
            let end = (start + n) << self.img.header.cluster_bits;
            self.file_end = self.file_end.max(end);
            return Ok(start << self.img.header.cluster_bits);
        }
    }

    /// Allocates cluster `c` (refcount 1) if it can be handed out; false if
    /// not (creating its refcount block may take it, too).
    fn take_next_cluster(&mut self, c: u64) -> Res<bool, R> {
        let limit = crate::header::MAX_HOST_OFFSET >> self.img.header.cluster_bits;
        if c >= limit || !self.unused(c)? {
            return Ok(false);
        }
        let per_block = self.per_block();
        self.ensure_refcount_block(c / per_block * per_block)?;
        if !self.unused(c)? {
            return Ok(false);
        }
        self.change_refcount(c, 1)?;
        let end = (c + 1) << self.img.header.cluster_bits;
        self.file_end = self.file_end.max(end);
        Ok(true)
    }

    /// Takes back clusters `[host, host + n clusters)` just allocated by
    /// [`WritableImage::alloc_clusters`] and never referenced (the write
    /// they were for failed): a failed write allocates nothing.
    pub(crate) fn unallocate(&mut self, host: u64, n: u64) -> Res<(), R> {
        let c = host >> self.img.header.cluster_bits;
        for i in c..c + n {
            self.change_refcount(i, -1)?;
        }
        Ok(())
    }

    /// Allocates `len` bytes (at most one cluster) for compressed data,
    /// packing consecutive compressed clusters into shared host clusters like
    /// QEMU. Each host cluster's refcount counts the compressed clusters in it.
    pub(crate) fn alloc_bytes(&mut self, len: u64) -> Res<u64, R> {
        let cs = self.cluster_size();
        if let Some(next) = self.compressed_next {
            let (c, used) = (next / cs, next % cs);
            let rc = self.refcount(c)?;
            let room = rc > 0 && rc < refcount::max_refcount(self.img.header.refcount_order);
            if used != 0 && room && used + len <= cs {
                self.change_refcount(c, 1)?;
                self.compressed_next = Some(next + len);
                return Ok(next);
            }
            if used != 0 && room && self.take_next_cluster(c + 1)? {
                // Spanning into the cluster right after, as QEMU packs
                // compressed data: both count this compressed cluster.
                self.change_refcount(c, 1)?;
                self.compressed_next = Some(next + len);
                return Ok(next);
            }
        }
        let off = self.alloc_clusters(1)?;
        self.compressed_next = Some(off + len);
        Ok(off)
    }

    /// Grows the refcount table so that index `needed` exists: a new, larger
    /// table and the refcount blocks describing it are written past the end
    /// of the image, made durable, and only then does the header point at it.
    fn grow_refcount_table(&mut self, needed: usize) -> Res<(), R> {
        // The limit first: a hostile index must not drive the sizing loop.
        if to_u64(needed).saturating_add(1).saturating_mul(8)
            > crate::header::MAX_REFCOUNT_TABLE_BYTES
        {
            return Err(Error::Unsupported("refcount table would exceed 8 MiB"));
        }
        // Dirty blocks the new table will point at must be durable first.
        self.write_refcounts()?;
        let cs = self.cluster_size();
        let per_block = self.per_block();
        let old = self.refcounts.table.clone();
        let area = self.file_end.max(self.img.file_len).div_ceil(cs).max(
            // Never below clusters the table already covers.
            to_u64(old.len()) * per_block,
        );
        // New table entries: at least `needed + 1`, 50% headroom; its
        // clusters and new blocks go at `area`, covering themselves.
        let mut entries = (needed + 1).max(old.len() + old.len() / 2).max(1);
        let (table_clusters, new_blocks) = loop {
            let table_clusters = (to_u64(entries) * 8).div_ceil(cs);
            // Blocks needed to describe area .. area + table + blocks.
            let mut blocks = 1u64;
            loop {
                let end = area + table_clusters + blocks;
                let first_bi = area / per_block;
                let last_bi = (end - 1) / per_block;
                let missing = (first_bi..=last_bi)
                    .filter(|bi| {
                        old.get(to_usize(*bi).unwrap_or(usize::MAX))
                            .is_none_or(|e| *e == 0)
                    })
                    .count();
                if to_u64(missing) <= blocks {
                    break;
                }
                blocks = to_u64(missing);
            }
            let last_bi = (area + table_clusters + blocks - 1) / per_block;
            if to_usize(last_bi).is_some_and(|b| b < entries) {
                break (table_clusters, blocks);
            }
            entries = to_usize(last_bi).unwrap_or(usize::MAX).saturating_add(1);
        };
        let table_bytes = table_clusters * cs;
        if table_bytes > crate::header::MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::Unsupported("refcount table would exceed 8 MiB"));
        }
        // Layout: new blocks first, then the table.
        let blocks_start = area;
        let table_start = area + new_blocks;
        let mut table = old.clone();
        table.resize(to_usize(table_bytes / 8).unwrap_or(0), 0);
        // Assign the new blocks to the missing indexes covering the area.
        let mut next_block = blocks_start;
        let end = table_start + table_clusters;
        let mut block_data: Vec<(u64, Vec<u8>)> = Vec::new();
        for bi in area / per_block..=(end - 1) / per_block {
            let i = to_usize(bi).unwrap_or(usize::MAX);
            if table.get(i).is_some_and(|e| *e != 0) {
                continue;
            }
            let off = next_block * cs;
            next_block += 1;
            table[i] = off;
            block_data.push((off, alloc::vec![0u8; to_usize(cs).unwrap_or(0)]));
        }
        // Refcounts of the new clusters (blocks and table) are 1: in the new
        // blocks, or in existing blocks (cached, written below).
        for c in blocks_start..end {
            let bi = to_usize(c / per_block).unwrap_or(usize::MAX);
            let block_off = table[bi];
            if let Some((_, d)) = block_data.iter_mut().find(|(o, _)| *o == block_off) {
                refcount::set(d, self.img.header.refcount_order, c % per_block, 1);
            } else {
                let data = self
                    .refcounts
                    .blocks
                    .get_mut(&mut self.img.io, block_off, cs)?;
                refcount::set(data, self.img.header.refcount_order, c % per_block, 1);
            }
        }
        // The new blocks and table are metadata from now on.
        for (off, _) in &block_data {
            self.metadata.insert(*off, cs, overlap::REFCOUNT_BLOCK);
        }
        self.metadata
            .insert(table_start * cs, table_bytes, overlap::REFCOUNT_TABLE);
        for (off, d) in &block_data {
            self.put(*off, d, overlap::REFCOUNT_BLOCK)?;
        }
        let mut raw = alloc::vec![0u8; to_usize(table_bytes).unwrap_or(0)];
        for (i, e) in table.iter().enumerate() {
            put64(&mut raw, i * 8, *e);
        }
        self.put(table_start * cs, &raw, overlap::REFCOUNT_TABLE)?;
        self.write_refcount_blocks()?;
        self.img.io.flush().map_err(Error::Io)?;
        // Switch the header to the new table (one sector-sized write).
        let old_offset = self.img.header.refcount_table_offset;
        let old_clusters = u64::from(self.img.header.refcount_table_clusters);
        let mut switched = self.img.header.clone();
        switched.refcount_table_offset = table_start * cs;
        switched.refcount_table_clusters = u32::try_from(table_clusters).unwrap_or(u32::MAX);
        let (at, fields) = switched.encode_refcount_table_fields();
        self.put(at, &fields, overlap::HEADER)?;
        self.img.io.flush().map_err(Error::Io)?;
        self.img.header = switched;
        self.metadata
            .remove(old_offset, old_clusters * cs, overlap::REFCOUNT_TABLE);
        self.refcounts.table = table;
        self.refcounts.table_offset = self.img.header.refcount_table_offset;
        self.refcounts.dirty_entries.clear();
        for (off, d) in block_data {
            self.refcounts.blocks.insert_dirty(off, d);
            self.refcounts.blocks.mark_clean(off);
        }
        self.file_end = self.file_end.max(end * cs);
        // The old table's clusters are free once the header switch is durable.
        if old_offset != 0 && old_clusters > 0 {
            self.defer_free(old_offset, old_clusters * cs);
        }
        Ok(())
    }

    /// Writes dirty refcount blocks (no flush).
    fn write_refcount_blocks(&mut self) -> Res<(), R> {
        for off in self.refcounts.blocks.dirty_offsets() {
            if let Some(d) = self.refcounts.blocks.peek(off) {
                let d = d.to_vec();
                self.put(off, &d, overlap::REFCOUNT_BLOCK)?;
            }
            self.refcounts.blocks.mark_clean(off);
        }
        Ok(())
    }

    /// Makes all refcount changes durable: dirty blocks, flush, then the
    /// refcount table entries pointing at new blocks, flush.
    pub(crate) fn write_refcounts(&mut self) -> Res<(), R> {
        let blocks_dirty = self.refcounts.blocks.has_dirty();
        if !blocks_dirty && self.refcounts.dirty_entries.is_empty() {
            return Ok(());
        }
        self.write_refcount_blocks()?;
        self.img.io.flush().map_err(Error::Io)?;
        // New table entries, in dependency order: a block placed in the
        // range of another new block is counted there, so its entry becomes
        // durable only after that block's entry (a crash may keep any
        // subset of unflushed writes).
        let mut dirty: Vec<usize> = core::mem::take(&mut self.refcounts.dirty_entries)
            .into_iter()
            .collect();
        let per_block = self.per_block();
        let cs = self.cluster_size();
        let base = self.img.header.refcount_table_offset;
        while !dirty.is_empty() {
            let counted_in = |e: u64| to_usize(refcount::table_entry_offset(e) / cs / per_block);
            let (ready, waiting): (Vec<usize>, Vec<usize>) = dirty.iter().partition(|&&i| {
                let j = counted_in(self.refcounts.entry(to_u64(i)));
                j == Some(i) || j.is_none_or(|j| !dirty.contains(&j))
            });
            // A cycle cannot happen (each new block is counted in a block
            // that existed or was created first); written all at once if
            // it did.
            let ready = if ready.is_empty() {
                waiting.clone()
            } else {
                ready
            };
            for &i in &ready {
                let e = self.refcounts.entry(to_u64(i));
                self.put(
                    base + to_u64(i) * 8,
                    &e.to_be_bytes(),
                    overlap::REFCOUNT_TABLE,
                )?;
            }
            self.img.io.flush().map_err(Error::Io)?;
            dirty.retain(|i| !ready.contains(i));
        }
        Ok(())
    }

    /// Drops one reference to the clusters of `[offset, offset + len)` at
    /// the next flush, once the entries that held it are durably gone;
    /// until then they are not handed out again.
    pub(crate) fn defer_free(&mut self, offset: u64, len: u64) {
        self.pending_frees.push((offset, len));
        self.pending_map.insert(offset, len, 1);
    }

    /// Applies the pending frees (after the references are durably gone).
    pub(crate) fn apply_pending_frees(&mut self) -> Res<(), R> {
        let frees = core::mem::take(&mut self.pending_frees);
        self.pending_map = crate::overlap::MetadataMap::new();
        if frees.is_empty() {
            return Ok(());
        }
        self.img.invalidate_decompressed();
        let cb = self.img.header.cluster_bits;
        for (off, len) in frees {
            if len == 0 {
                continue;
            }
            for c in off >> cb..=(off + len - 1) >> cb {
                if self.refcount(c)? == 0 {
                    // A damaged image whose refcount already reads 0: the
                    // cluster is unreferenced now, which is all a free
                    // does (QEMU reports the underflow and goes on too).
                    continue;
                }
                self.change_refcount(c, -1)?;
                if self.refcount(c)? == 0 {
                    self.img.l2_cache.forget(c << cb);
                    self.refcounts.blocks.forget(c << cb);
                }
            }
        }
        self.compressed_next = None;
        self.write_refcounts()
    }
}
