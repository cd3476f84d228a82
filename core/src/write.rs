//! The write path: guest writes, zero writes, discards, compressed writes
//! and `flush`, with a write order that leaves at worst leaked clusters
//! after a crash.
//!
//! Write order (each arrow is a flush of the storage):
//! 1. guest data and new refcount blocks/increments are written,
//! 2. → refcount table entries pointing at new refcount blocks,
//! 3. → L2 tables (new or changed),
//! 4. → L1 entries pointing at new L2 tables,
//! 5. → refcount decrements of clusters no longer referenced,
//!    → done.
//!
//! A crash anywhere leaves every durable reference pointing at a cluster
//! whose refcount is durable and whose contents were written before it.

use alloc::vec::Vec;

use crate::backing::Opener;
use crate::bytes::{be64, put64, to_u64, to_usize};
use crate::header::{autoclear, incompat, CompressionType};
use crate::image::{Image, OpenOptions};
use crate::l2::{self, Subcluster, COPIED, ZERO};
use crate::{BlockWrite, Error};

type Res<T, R> = Result<T, Error<<R as crate::BlockRead>::Error>>;

/// State of an image opened for writing.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    /// Writes are allowed.
    pub(crate) enabled: bool,
    /// First cluster index worth searching for free space.
    pub(crate) free_hint: u64,
    /// End of the host file as far as allocations know.
    pub(crate) file_end: u64,
    /// Byte ranges whose clusters lose one reference once the L2/L1
    /// changes that dropped them are durable.
    pub(crate) pending_frees: Vec<(u64, u64)>,
    /// Where the next compressed cluster may be packed.
    pub(crate) compressed_next: Option<u64>,
    /// L1 entries changed in memory, not yet written.
    pub(crate) dirty_l1: alloc::collections::BTreeSet<usize>,
    /// Guest data was written since the last flush.
    pub(crate) data_dirty: bool,
}

/// Which kind of zeroing a range gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroKind {
    /// `write_zeroes`: reads as zeros afterwards.
    Zero,
    /// `discard`: QEMU's guest discard (zeros on v3, unallocated on v2).
    Discard,
}

impl<R: BlockWrite> Image<R> {
    /// Opens a standalone image for reading and writing.
    pub fn open_rw(io: R, opts: &OpenOptions) -> Res<Self, R> {
        let mut img = Self::open(io, opts)?;
        img.enable_writes()?;
        Ok(img)
    }

    /// Opens an image for reading and writing, with backing files and an
    /// external data file opened through `opener` (the data file must be
    /// opened writable by it).
    pub fn open_rw_with(
        io: R,
        name: &str,
        identity: &str,
        opener: &mut dyn Opener<R>,
        opts: &OpenOptions,
    ) -> Res<Self, R> {
        let mut img = Self::open_with(io, name, identity, opener, opts)?;
        img.enable_writes()?;
        Ok(img)
    }

    /// Prepares an opened image for writing, as QEMU does on a read-write
    /// open: refuses corrupt images, rebuilds refcounts of dirty (lazy
    /// refcount) images, and clears autoclear bits this implementation does
    /// not maintain (unknown ones, and the bitmaps bit since writes here do
    /// not update bitmaps).
    pub fn enable_writes(&mut self) -> Res<(), R> {
        if self.header.corrupt() {
            return Err(Error::ReadOnly(
                "the image is marked corrupt; repair it first",
            ));
        }
        if self.header.has_data_file() && self.data_file.is_none() {
            return Err(Error::MissingDataFile);
        }
        self.load_refcount_table()?;
        if self.l2_slice != self.cluster_size() {
            // Writing works on whole L2 tables: leave frugal slice mode.
            let cap = self.l2_cache.capacity();
            self.l2_slice = self.cluster_size();
            self.l2_cache = crate::cache::TableCache::new(cap);
        }
        self.writer.enabled = true;
        self.writer.file_end = self.file_len;
        // Enabled ("auto") bitmaps should track every write, which this
        // implementation does not do: mark them in use (inconsistent), as
        // QEMU does while it has them open, before anything is written.
        self.mark_auto_bitmaps_in_use()?;
        let keep = autoclear::DATA_FILE_RAW | autoclear::BITMAPS;
        let mut header_changed = false;
        if self.header.autoclear_features & !keep != 0 {
            self.header.autoclear_features &= keep;
            header_changed = true;
        }
        if self.header.dirty() {
            self.rebuild_refcounts()?;
            self.header.incompatible_features &= !incompat::DIRTY;
            header_changed = true;
        }
        if header_changed {
            self.write_header_fields()?;
        }
        Ok(())
    }

    fn mark_auto_bitmaps_in_use(&mut self) -> Res<(), R> {
        use crate::bitmap::{decode_entry, encode_flags, FLAG_AUTO, FLAG_IN_USE};
        let Some(ext) = self.header.bitmaps else {
            return Ok(());
        };
        let mut dir = alloc::vec![0u8; to_usize(ext.directory_size).unwrap_or(0)];
        self.io
            .read_at(ext.directory_offset, &mut dir)
            .map_err(Error::Io)?;
        let mut pos = 0usize;
        let mut changed = false;
        for _ in 0..ext.nb_bitmaps {
            let Some((b, next)) = decode_entry(&dir, pos) else {
                break;
            };
            if b.flags & FLAG_AUTO != 0 && b.flags & FLAG_IN_USE == 0 {
                let (at, flags) = encode_flags(pos, b.flags | FLAG_IN_USE);
                self.io
                    .write_at(ext.directory_offset + to_u64(at), &flags)
                    .map_err(Error::Io)?;
                changed = true;
            }
            pos = next;
        }
        if changed {
            self.io.flush().map_err(Error::Io)?;
        }
        Ok(())
    }

    /// Rewrites the feature fields of the header (v3 only; v2 has none).
    fn write_header_fields(&mut self) -> Res<(), R> {
        if let Some((at, bytes)) = self.header.encode_feature_fields() {
            self.io.write_at(at, &bytes).map_err(Error::Io)?;
            self.io.flush().map_err(Error::Io)?;
        }
        Ok(())
    }

    /// Sets every refcount to the number of references found by walking the
    /// metadata (repair of a dirty image), then makes it durable.
    fn rebuild_refcounts(&mut self) -> Res<(), R> {
        let counts = self.count_references()?;
        let cb = self.header.cluster_bits;
        let end = (to_u64(counts.len())).max(self.file_len.div_ceil(1 << cb));
        // Raising first, then lowering, keeps every intermediate state safe.
        for pass in 0..2 {
            for c in 0..end {
                let want = counts
                    .get(to_usize(c).unwrap_or(usize::MAX))
                    .copied()
                    .map_or(0, u64::from);
                let have = self.refcount(c)?;
                let delta = i64::try_from(want).unwrap_or(i64::MAX)
                    - i64::try_from(have).unwrap_or(i64::MAX);
                if (pass == 0 && delta > 0) || (pass == 1 && delta < 0) {
                    self.change_refcount(c, delta)?;
                }
            }
            self.write_refcounts()?;
        }
        Ok(())
    }

    fn require_writable(&self) -> Res<(), R> {
        if self.writer.enabled {
            Ok(())
        } else {
            Err(Error::ReadOnly("opened read-only"))
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Res<(), R> {
        let size = self.header.size;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfBounds { offset, len, size });
        }
        Ok(())
    }

    /// Writes `buf` at guest `offset`.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Res<(), R> {
        self.require_writable()?;
        self.check_range(offset, to_u64(buf.len()))?;
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + to_u64(done);
            let n = to_usize((cs - pos % cs).min(to_u64(buf.len() - done))).unwrap_or(0);
            self.write_in_cluster(pos, &buf[done..done + n])?;
            done += n;
            self.flush_if_over_budget()?;
        }
        Ok(())
    }

    /// Makes guest `[offset, offset + len)` read as zeros, using zero flags
    /// where whole clusters (or subclusters) are covered.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Res<(), R> {
        self.zero_range(offset, len, ZeroKind::Zero)
    }

    /// Discards guest `[offset, offset + len)`: whole clusters are freed and
    /// read as zeros (as unallocated on version 2 images, like QEMU);
    /// partial clusters are left unchanged.
    pub fn discard(&mut self, offset: u64, len: u64) -> Res<(), R> {
        self.zero_range(offset, len, ZeroKind::Discard)
    }

    fn zero_range(&mut self, offset: u64, len: u64, kind: ZeroKind) -> Res<(), R> {
        self.require_writable()?;
        self.check_range(offset, len)?;
        let cs = self.cluster_size();
        let size = self.header.size;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let cluster_start = pos - pos % cs;
            let cluster_end = (cluster_start + cs).min(size);
            let n = cluster_end.min(end) - pos;
            let whole = pos == cluster_start && pos + n == cluster_end;
            if whole {
                self.zero_cluster(cluster_start, kind)?;
            } else if kind == ZeroKind::Zero {
                if self.fmt.extended {
                    self.zero_subclusters(pos, n)?;
                } else {
                    let zeros = alloc::vec![0u8; to_usize(n).unwrap_or(0)];
                    self.write_in_cluster(pos, &zeros)?;
                }
            }
            pos += n;
            self.flush_if_over_budget()?;
        }
        Ok(())
    }

    /// Flushes early when dirty tables keep a cache above its budget.
    fn flush_if_over_budget(&mut self) -> Res<(), R> {
        if self.l2_cache.over_capacity() || self.refcounts.blocks.over_capacity() {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes everything written so far durable, in crash-safe order.
    pub fn flush(&mut self) -> Res<(), R> {
        if !self.writer.enabled {
            return Ok(());
        }
        if let Some(df) = self.data_file.as_mut() {
            if self.writer.data_dirty {
                df.flush().map_err(Error::Io)?;
            }
        }
        // 1-2: data and refcount increments, then table entries.
        self.write_refcounts()?;
        // 3: L2 tables.
        let dirty_l2 = self.l2_cache.dirty_offsets();
        if !dirty_l2.is_empty() {
            self.io.flush().map_err(Error::Io)?;
            for off in dirty_l2 {
                if let Some(t) = self.l2_cache.peek(off) {
                    let t = t.to_vec();
                    self.io.write_at(off, &t).map_err(Error::Io)?;
                }
                self.l2_cache.mark_clean(off);
            }
        }
        // 4: L1 entries (after the tables they point at are durable).
        if !self.writer.dirty_l1.is_empty() {
            self.io.flush().map_err(Error::Io)?;
            let dirty: Vec<usize> = core::mem::take(&mut self.writer.dirty_l1)
                .into_iter()
                .collect();
            let base = self.header.l1_table_offset;
            for i in dirty {
                let e = self.l1.get(i).copied().unwrap_or(0);
                self.io
                    .write_at(base + to_u64(i) * 8, &e.to_be_bytes())
                    .map_err(Error::Io)?;
            }
        }
        self.io.flush().map_err(Error::Io)?;
        self.writer.data_dirty = false;
        // 5: frees, now that nothing durable refers to those clusters.
        self.apply_pending_frees()?;
        Ok(())
    }

    /// Returns the offset of an L2 table for guest `offset` that may be
    /// modified in place: allocated (or copied, when shared with a snapshot).
    fn writable_l2(&mut self, offset: u64) -> Res<u64, R> {
        let cs = self.cluster_size();
        let cover_bits = self.header.cluster_bits + self.header.l2_entries().trailing_zeros();
        let idx = to_usize(offset >> cover_bits).unwrap_or(usize::MAX);
        let l1e = *self.l1.get(idx).ok_or(Error::corrupt(
            "guest offset beyond the L1 table",
            offset,
            to_u64(idx),
        ))?;
        let l2_off = l2::l1_offset(l1e);
        if l2_off != 0 && l2_off % cs != 0 {
            return Err(Error::corrupt(
                "L1 entry points to an unaligned L2 table",
                offset,
                l2_off,
            ));
        }
        if l2_off != 0 && l1e & COPIED != 0 {
            return Ok(l2_off);
        }
        if l2_off != 0 && self.refcount(l2_off / cs)? == 1 {
            // Exclusively owned but the flag is missing: just set it.
            self.l1[idx] = l2_off | COPIED;
            self.writer.dirty_l1.insert(idx);
            return Ok(l2_off);
        }
        let new = self.alloc_clusters(1)?;
        let contents = if l2_off == 0 {
            alloc::vec![0u8; to_usize(cs).unwrap_or(0)]
        } else {
            // Copy-on-write of a table shared with a snapshot.
            let t = self.l2_cache.get(&mut self.io, l2_off, cs)?.to_vec();
            self.writer.pending_frees.push((l2_off, cs));
            t
        };
        self.l2_cache.insert_dirty(new, contents);
        self.l1[idx] = new | COPIED;
        self.writer.dirty_l1.insert(idx);
        Ok(new)
    }

    /// Reads the (entry, bitmap) pair for guest `offset` from table `l2_off`.
    fn l2_entry(&mut self, l2_off: u64, offset: u64) -> Res<(u64, u64), R> {
        let cs = self.cluster_size();
        let at = self.l2_index(offset) * self.fmt.entry_size();
        let t = self.l2_cache.get(&mut self.io, l2_off, cs)?;
        let bitmap = if self.fmt.extended {
            be64(t, at + 8)
        } else {
            0
        };
        Ok((be64(t, at), bitmap))
    }

    fn set_l2_entry(&mut self, l2_off: u64, offset: u64, entry: u64, bitmap: u64) -> Res<(), R> {
        let cs = self.cluster_size();
        let at = self.l2_index(offset) * self.fmt.entry_size();
        let extended = self.fmt.extended;
        let t = self.l2_cache.get_mut(&mut self.io, l2_off, cs)?;
        put64(t, at, entry);
        if extended {
            put64(t, at + 8, bitmap);
        }
        Ok(())
    }

    fn l2_index(&self, offset: u64) -> usize {
        to_usize((offset >> self.header.cluster_bits) & (self.header.l2_entries() - 1)).unwrap_or(0)
    }

    /// Subcluster size in bytes (the cluster size without extended L2).
    fn sc_size(&self) -> u64 {
        if self.fmt.extended {
            self.cluster_size() / 32
        } else {
            self.cluster_size()
        }
    }

    /// Bitmask of the subclusters overlapping `[pos, pos + n)` in its cluster.
    fn sc_mask(&self, pos: u64, n: u64) -> u64 {
        let cs = self.cluster_size();
        let sc = self.sc_size();
        let first = (pos % cs) / sc;
        let last = ((pos % cs) + n - 1) / sc;
        let count = last - first + 1;
        let ones = if count >= 64 {
            u64::MAX
        } else {
            (1u64 << count) - 1
        };
        (ones << first) & 0xffff_ffff
    }

    /// Schedules the release of what an old entry referenced.
    fn release(&mut self, entry: u64, bitmap: u64, offset: u64) -> Res<(), R> {
        if self.fmt.data_file {
            return Ok(());
        }
        match self.fmt.subcluster(entry, bitmap, 0) {
            Ok(Subcluster::Compressed(d)) => {
                let start = d.offset & !511;
                self.writer
                    .pending_frees
                    .push((start, d.offset + d.size - start));
            }
            Ok(
                Subcluster::Normal { host }
                | Subcluster::ZeroAlloc { host }
                | Subcluster::UnallocatedAlloc { host },
            ) => {
                self.writer.pending_frees.push((host, self.cluster_size()));
            }
            Ok(_) => {}
            Err(e) => return Err(Error::corrupt(e.what(), offset, e.value())),
        }
        Ok(())
    }

    /// Allocates a host cluster for guest cluster `cluster_start`: in the
    /// image file, or at the same offset in the external data file.
    fn alloc_data_cluster(&mut self, cluster_start: u64) -> Res<u64, R> {
        if self.fmt.data_file {
            Ok(cluster_start)
        } else {
            self.alloc_clusters(1)
        }
    }

    fn write_data(&mut self, host: u64, data: &[u8]) -> Res<(), R> {
        self.writer.data_dirty = true;
        // Host space may be reused: a cached decompressed cluster is stale.
        self.invalidate_decompressed();
        let io = if self.fmt.data_file {
            self.data_file.as_mut().ok_or(Error::MissingDataFile)?
        } else {
            &mut self.io
        };
        io.write_at(host, data).map_err(Error::Io)
    }

    /// The guest view of `[pos, pos + len)` with `data` laid over `[at, at + data.len())`.
    fn merged(&mut self, pos: u64, len: u64, at: u64, data: &[u8]) -> Res<Vec<u8>, R> {
        let mut buf = alloc::vec![0u8; to_usize(len).unwrap_or(0)];
        let dstart = to_usize(at - pos).unwrap_or(0);
        let dend = dstart + data.len();
        // Read only the parts not overwritten.
        if dstart > 0 {
            self.read_at(pos, &mut buf[..dstart])?;
        }
        if dend < buf.len() {
            let tail = to_u64(dend);
            self.read_at(pos + tail, &mut buf[dend..])?;
        }
        buf[dstart..dend].copy_from_slice(data);
        Ok(buf)
    }

    /// Writes `data` inside one guest cluster.
    fn write_in_cluster(&mut self, pos: u64, data: &[u8]) -> Res<(), R> {
        if data.is_empty() {
            return Ok(());
        }
        let cs = self.cluster_size();
        let size = self.header.size;
        let cstart = pos - pos % cs;
        let cend = (cstart + cs).min(size);
        let l2_off = self.writable_l2(pos)?;
        let (entry, bitmap) = self.l2_entry(l2_off, pos)?;
        let sub = self
            .fmt
            .subcluster(entry, bitmap, 0)
            .map_err(|e| Error::corrupt(e.what(), pos, e.value()))?;
        let n = to_u64(data.len());
        let host_of = |s: Subcluster| match s {
            Subcluster::Normal { host }
            | Subcluster::ZeroAlloc { host }
            | Subcluster::UnallocatedAlloc { host } => Some(host),
            _ => None,
        };
        let owned = entry & COPIED != 0 && host_of(sub).is_some();
        if !self.fmt.extended {
            match sub {
                Subcluster::Normal { host } if owned => {
                    return self.write_data(host + pos % cs, data);
                }
                _ => {
                    // Whole new cluster (or rewrite of a zero-flagged one):
                    // the guest view with the new data laid over it.
                    let buf = self.merged(cstart, cend - cstart, pos, data)?;
                    let host = match sub {
                        Subcluster::ZeroAlloc { host } if owned => host,
                        _ => self.alloc_data_cluster(cstart)?,
                    };
                    self.write_data(host, &buf)?;
                    if host_of(sub) != Some(host) {
                        self.release(entry, bitmap, pos)?;
                    }
                    self.set_l2_entry(l2_off, pos, host | COPIED, 0)?;
                    return Ok(());
                }
            }
        }
        // Extended L2: work on the span of touched subclusters.
        let sc = self.sc_size();
        let span_start = pos - (pos - cstart) % sc;
        let span_end = (pos + n).div_ceil(sc).saturating_mul(sc).min(cend);
        let mask = self.sc_mask(pos, n);
        let (host, new_bitmap) = match sub {
            Subcluster::Compressed(_) => {
                // Decompress into a new, fully allocated cluster.
                let buf = self.merged(cstart, cend - cstart, pos, data)?;
                let host = self.alloc_data_cluster(cstart)?;
                self.write_data(host, &buf)?;
                self.release(entry, bitmap, pos)?;
                self.set_l2_entry(l2_off, pos, host | COPIED, l2::ALL_ALLOC)?;
                return Ok(());
            }
            _ if owned => (host_of(sub).unwrap_or(0), bitmap),
            _ if host_of(sub).is_some() => {
                // Shared with a snapshot: copy the whole cluster first.
                let old = host_of(sub).unwrap_or(0);
                let mut buf = alloc::vec![0u8; to_usize(cs).unwrap_or(0)];
                self.io.read_at(old, &mut buf).map_err(Error::Io)?;
                let host = self.alloc_data_cluster(cstart)?;
                self.write_data(host, &buf)?;
                self.release(entry, bitmap, pos)?;
                (host, bitmap)
            }
            _ => (self.alloc_data_cluster(cstart)?, bitmap),
        };
        let buf = self.merged(span_start, span_end - span_start, pos, data)?;
        self.write_data(host + (span_start - cstart), &buf)?;
        let alloc_bits = (new_bitmap & l2::ALL_ALLOC) | mask;
        let zero_bits = (new_bitmap >> 32) & !mask;
        self.set_l2_entry(l2_off, pos, host | COPIED, alloc_bits | (zero_bits << 32))?;
        Ok(())
    }

    /// Zeroes or discards one whole guest cluster.
    fn zero_cluster(&mut self, cstart: u64, kind: ZeroKind) -> Res<(), R> {
        let v3 = self.header.version >= 3;
        let raw_data_file = self.header.data_file_raw();
        let has_backing = self.backing().is_some() || self.header.backing_file.is_some();
        if raw_data_file || (!v3 && kind == ZeroKind::Zero && has_backing) {
            // The data file must stay a valid raw image / v2 has no zero
            // flag to hide the backing file: write real zeros.
            let cs = self.cluster_size();
            let len = (cstart + cs).min(self.header.size) - cstart;
            let zeros = alloc::vec![0u8; to_usize(len).unwrap_or(0)];
            return self.write_in_cluster(cstart, &zeros);
        }
        let l2_off = self.writable_l2(cstart)?;
        let (entry, bitmap) = self.l2_entry(l2_off, cstart)?;
        let (new_entry, new_bitmap) = if self.fmt.extended {
            (0, l2::ALL_ALLOC << 32)
        } else if v3 {
            (ZERO, 0)
        } else {
            (0, 0)
        };
        if self.fmt.data_file {
            // Data file clusters are not refcounted; keep the mapping's
            // identity offset out of the entry.
            self.set_l2_entry(l2_off, cstart, new_entry, new_bitmap)?;
            return Ok(());
        }
        self.release(entry, bitmap, cstart)?;
        self.set_l2_entry(l2_off, cstart, new_entry, new_bitmap)?;
        Ok(())
    }

    /// Extended L2: zero flags for fully covered subclusters, zeros written
    /// for partly covered ones (range inside one cluster).
    fn zero_subclusters(&mut self, pos: u64, n: u64) -> Res<(), R> {
        let sc = self.sc_size();
        let end = pos + n;
        let first_full = pos.div_ceil(sc) * sc;
        let last_full = end - end % sc;
        if first_full >= last_full {
            let zeros = alloc::vec![0u8; to_usize(n).unwrap_or(0)];
            return self.write_in_cluster(pos, &zeros);
        }
        if pos < first_full {
            let zeros = alloc::vec![0u8; to_usize(first_full - pos).unwrap_or(0)];
            self.write_in_cluster(pos, &zeros)?;
        }
        if last_full < end {
            let zeros = alloc::vec![0u8; to_usize(end - last_full).unwrap_or(0)];
            self.write_in_cluster(last_full, &zeros)?;
        }
        let l2_off = self.writable_l2(pos)?;
        let (entry, bitmap) = self.l2_entry(l2_off, pos)?;
        if entry & l2::COMPRESSED != 0 {
            // Compressed clusters have no subclusters: rewrite as data.
            let zeros = alloc::vec![0u8; to_usize(last_full - first_full).unwrap_or(0)];
            return self.write_in_cluster(first_full, &zeros);
        }
        let host = entry & l2::OFFSET_MASK;
        let owned_or_none = host == 0 || entry & COPIED != 0;
        if !owned_or_none {
            // Shared cluster: copy it (through a data write) before flagging.
            let zeros = alloc::vec![0u8; to_usize(last_full - first_full).unwrap_or(0)];
            return self.write_in_cluster(first_full, &zeros);
        }
        let mask = self.sc_mask(first_full, last_full - first_full);
        let alloc_bits = bitmap & l2::ALL_ALLOC & !mask;
        let zero_bits = ((bitmap >> 32) | mask) & 0xffff_ffff;
        self.set_l2_entry(l2_off, pos, entry, alloc_bits | (zero_bits << 32))?;
        Ok(())
    }

    /// Preallocates the whole disk (for `preallocation=metadata|falloc|full`):
    /// every guest cluster gets an L2 entry and a host cluster (contiguous
    /// runs, one L2 table at a time). With a backing file and extended L2,
    /// the subclusters stay unallocated so the backing file still shows
    /// through. `Full` writes zeros into the data clusters; `Falloc`
    /// reserves them with [`BlockWrite::preallocate`].
    pub fn preallocate(&mut self, mode: crate::create::Preallocation) -> Res<(), R> {
        use crate::create::Preallocation;
        self.require_writable()?;
        if mode == Preallocation::Off {
            return Ok(());
        }
        let cs = self.cluster_size();
        let size = self.header.size;
        let per_table = self.header.l2_coverage();
        let mut pos = 0u64;
        while pos < size {
            let table_end = (pos - pos % per_table + per_table).min(size);
            let l2_off = self.writable_l2(pos)?;
            // Clusters of this table that are still unallocated.
            let mut c = pos;
            while c < table_end {
                let (entry, bitmap) = self.l2_entry(l2_off, c)?;
                let unallocated = entry & l2::OFFSET_MASK == 0
                    && entry & l2::COMPRESSED == 0
                    && !(self.fmt.data_file && entry & COPIED != 0);
                if !unallocated {
                    c += cs;
                    continue;
                }
                // A run of unallocated clusters gets one contiguous allocation.
                let mut n = 1u64;
                while c + n * cs < table_end {
                    let (e, _) = self.l2_entry(l2_off, c + n * cs)?;
                    if e != 0 {
                        break;
                    }
                    n += 1;
                }
                let host = if self.fmt.data_file {
                    c
                } else {
                    self.alloc_clusters(n)?
                };
                let bytes = n * cs;
                let data_len = bytes.min(size - c);
                match mode {
                    Preallocation::Full => {
                        let zeros = alloc::vec![0u8; to_usize(cs).unwrap_or(0)];
                        for i in 0..n {
                            let len = cs.min(size - (c + i * cs));
                            self.write_data(host + i * cs, &zeros[..to_usize(len).unwrap_or(0)])?;
                        }
                    }
                    Preallocation::Falloc => {
                        let io = if self.fmt.data_file {
                            self.data_file.as_mut().ok_or(Error::MissingDataFile)?
                        } else {
                            &mut self.io
                        };
                        io.preallocate(host, data_len).map_err(Error::Io)?;
                    }
                    _ => {}
                }
                for i in 0..n {
                    // Like QEMU, subclusters stay unallocated (they read as
                    // zeros, or from the backing file).
                    let bm = if self.fmt.extended {
                        bitmap & (0xffff_ffff << 32)
                    } else {
                        0
                    };
                    self.set_l2_entry(l2_off, c + i * cs, (host + i * cs) | COPIED, bm)?;
                }
                c += bytes;
            }
            pos = table_end;
            self.flush_if_over_budget()?;
        }
        if self.fmt.data_file {
            // The data file covers the whole disk.
            if let Some(df) = self.data_file.as_mut() {
                if df.len().map_err(Error::Io)? < size {
                    df.set_len(size).map_err(Error::Io)?;
                }
            }
        } else if mode == Preallocation::Metadata || mode == Preallocation::Off {
            // The file must reach the end of the last data cluster.
            let end = self.writer.file_end;
            if self.io.len().map_err(Error::Io)? < end {
                self.io.set_len(end).map_err(Error::Io)?;
            }
        }
        self.flush()
    }

    /// Writes one whole guest cluster compressed with the image's
    /// compression type; keeps it uncompressed when compression does not
    /// make it smaller (like qemu-img). `data` is the cluster's contents
    /// (shorter only for the last cluster of the disk). Returns whether the
    /// cluster was stored compressed.
    pub fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Res<bool, R> {
        self.require_writable()?;
        let cs = self.cluster_size();
        if offset % cs != 0 || to_u64(data.len()) > cs || data.is_empty() {
            return Err(Error::Unsupported(
                "compressed writes cover exactly one cluster",
            ));
        }
        self.check_range(offset, to_u64(data.len()))?;
        if self.fmt.data_file {
            return Err(Error::Unsupported(
                "compressed clusters with an external data file",
            ));
        }
        let mut full = alloc::vec![0u8; to_usize(cs).unwrap_or(0)];
        full[..data.len()].copy_from_slice(data);
        let packed = crate::compress::compress(self.header.compression_type, &full);
        let Some(packed) = packed.filter(|p| to_u64(p.len()) < cs) else {
            self.write_at(offset, data)?;
            return Ok(false);
        };
        let len = to_u64(packed.len());
        let host = self.alloc_bytes(len)?;
        let desc = self.fmt.encode_compressed(host, len).ok_or(Error::corrupt(
            "compressed cluster offset not representable",
            offset,
            host,
        ))?;
        self.write_data(host, &packed)?;
        let l2_off = self.writable_l2(offset)?;
        let (entry, bitmap) = self.l2_entry(l2_off, offset)?;
        self.release(entry, bitmap, offset)?;
        self.set_l2_entry(l2_off, offset, desc, 0)?;
        self.flush_if_over_budget()?;
        let _ = CompressionType::Zlib;
        Ok(true)
    }
}
