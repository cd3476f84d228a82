//! Keeping persistent dirty bitmaps true while guest data changes, as QEMU
//! keeps the bitmaps it has open: before the first change an enabled
//! ("auto") bitmap is flagged in use, every changed range sets its bits,
//! and at each flush the bits are stored and the flag cleared. A crash in
//! between leaves the bitmap flagged in use, which QEMU reads as
//! inconsistent: never a bitmap that misses a write. Bitmaps this code
//! cannot follow (unknown kind or extra data, a table of the wrong size)
//! are only flagged in use. Also resizing bitmaps with the disk.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::bitmap::{
    decode_entry, encode_flags, FLAG_AUTO, FLAG_EXTRA_DATA_COMPATIBLE, FLAG_IN_USE,
};
use crate::bytes::{be32, to_u64, to_usize};
use crate::error::Error;
use crate::header::BitmapsExt;
use crate::heap;
use crate::image::Res;
use crate::io::BlockWrite;
use crate::overlap;
use crate::writable::WritableImage;

/// Offset mask of a bitmap table entry.
pub(crate) const ENTRY_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// A table entry with no cluster whose bits all read as ones.
pub(crate) const ALL_ONES: u64 = 1;
/// Changed bitmap clusters held in memory before they are written out.
const CHANGED_BUDGET: u64 = 8 << 20;
/// Smallest and largest granularity QEMU accepts (log2 of bytes).
pub(crate) const GRANULARITY_BITS: core::ops::RangeInclusive<u8> = 9..=31;

/// The bitmaps resized: the new directory's extension, and the clusters
/// (offset, length) the old ones held that the new ones do not.
pub(crate) type Resized = (BitmapsExt, Vec<(u64, u64)>);

/// An enabled bitmap being kept up to date.
#[derive(Debug)]
pub(crate) struct Tracked {
    /// Its name.
    name: alloc::string::String,
    /// Position of its entry in the directory.
    pos: usize,
    /// Its flags, without in-use.
    flags: u32,
    /// log2 of its granularity in bytes.
    gran_bits: u8,
    /// Host offset of its table.
    table_offset: u64,
    /// Its table, once loaded.
    table: Option<Vec<u64>>,
    /// Entries of the table changed in memory.
    table_dirty: bool,
    /// Bitmap clusters changed since they were last written: table index
    /// to contents.
    changed: BTreeMap<u64, Vec<u8>>,
}

/// Number of bitmap table entries a bitmap of granularity `gran_bits` needs
/// for a disk of `size` bytes with clusters of `cs` bytes.
pub(crate) fn table_entries(size: u64, gran_bits: u8, cs: u64) -> u64 {
    let bits = size.div_ceil(1u64 << gran_bits);
    bits.div_ceil(8).div_ceil(cs)
}

/// Sets bits `lo..=hi` of `bits` (bit i is bit i % 8 of byte i / 8).
fn set_bits(bits: &mut [u8], lo: u64, hi: u64) {
    let mut i = lo;
    while i <= hi {
        let byte = to_usize(i / 8).unwrap_or(usize::MAX);
        if i.is_multiple_of(8) && hi - i >= 7 {
            // Whole bytes at once.
            let last = to_usize((hi + 1) / 8).unwrap_or(usize::MAX).min(bits.len());
            if let Some(run) = bits.get_mut(byte..last) {
                run.fill(0xff);
            }
            i = to_u64(last) * 8;
            continue;
        }
        if let Some(b) = bits.get_mut(byte) {
            *b |= 1 << (i % 8);
        }
        i += 1;
    }
}

/// Clears the bits of `bits` from bit `from` on.
fn clear_bits_from(bits: &mut [u8], from: u64) {
    let byte = to_usize(from / 8).unwrap_or(usize::MAX);
    if let Some(b) = bits.get_mut(byte) {
        *b &= (1u8 << (from % 8)).wrapping_sub(1);
    }
    if let Some(rest) = bits.get_mut(byte.saturating_add(1)..) {
        rest.fill(0);
    }
}

impl<R: BlockWrite> WritableImage<R> {
    /// Called before guest data in `[offset, offset + len)` changes
    /// (writes, zeroing, discards, emptying, reverting to a snapshot):
    /// refuses a corrupt image; the first time, flags enabled bitmaps in
    /// use, durably, before anything changes; then sets their bits for the
    /// range.
    pub(crate) fn begin_guest_change(&mut self, offset: u64, len: u64) -> Res<(), R> {
        self.require_intact()?;
        if !self.bitmaps_marked {
            self.open_bitmaps()?;
            self.bitmaps_marked = true;
        }
        if len > 0 && !self.tracked.is_empty() {
            self.mark_dirty(offset, len)?;
        }
        Ok(())
    }

    /// Reads the bitmap directory (`None` without bitmaps).
    fn read_directory(&mut self) -> Res<Option<(BitmapsExt, Vec<u8>)>, R> {
        let Some(ext) = self.img.header.bitmaps else {
            return Ok(None);
        };
        let mut dir = heap::zeroed(ext.directory_size, "the bitmap directory")?;
        self.img
            .io
            .read_at(ext.directory_offset, &mut dir)
            .map_err(Error::Io)?;
        Ok(Some((ext, dir)))
    }

    /// Flags every enabled, consistent bitmap in use and starts keeping
    /// those it can follow.
    fn open_bitmaps(&mut self) -> Res<(), R> {
        let Some((ext, dir)) = self.read_directory()? else {
            return Ok(());
        };
        let cs = self.cluster_size();
        let size = self.img.header.size;
        let mut pos = 0usize;
        let mut changed = false;
        for _ in 0..ext.nb_bitmaps {
            let Some((b, next)) = decode_entry(&dir, pos) else {
                break;
            };
            if b.flags & FLAG_AUTO != 0 && b.flags & FLAG_IN_USE == 0 {
                let (at, flags) = encode_flags(pos, b.flags | FLAG_IN_USE);
                self.put(
                    ext.directory_offset + to_u64(at),
                    &flags,
                    overlap::BITMAP_DIRECTORY,
                )?;
                changed = true;
                let extra = be32(&dir[pos..], 20);
                let followable = b.kind == 1
                    && GRANULARITY_BITS.contains(&b.granularity_bits)
                    && (extra == 0 || b.flags & FLAG_EXTRA_DATA_COMPATIBLE != 0)
                    && b.table_offset != 0
                    && b.table_offset % cs == 0
                    && u64::from(b.table_size) == table_entries(size, b.granularity_bits, cs);
                if followable {
                    self.tracked.push(Tracked {
                        name: b.name.clone(),
                        pos,
                        flags: b.flags,
                        gran_bits: b.granularity_bits,
                        table_offset: b.table_offset,
                        table: None,
                        table_dirty: false,
                        changed: BTreeMap::new(),
                    });
                }
            }
            pos = next;
        }
        if changed {
            self.img.io.flush().map_err(Error::Io)?;
        }
        Ok(())
    }

    /// Sets the bits of every followed bitmap for `[offset, offset + len)`.
    fn mark_dirty(&mut self, offset: u64, len: u64) -> Res<(), R> {
        let cs = self.cluster_size();
        let per_cluster = cs * 8;
        let end = offset
            .saturating_add(len)
            .min(self.img.header.size.max(offset + 1));
        for t in 0..self.tracked.len() {
            let g = self.tracked[t].gran_bits;
            let first = offset >> g;
            let last = (end - 1) >> g;
            for idx in first / per_cluster..=last / per_cluster {
                let base = idx * per_cluster;
                let lo = first.max(base) - base;
                let hi = last.min(base + per_cluster - 1) - base;
                if let Some(bits) = self.bitmap_cluster(t, idx)? {
                    set_bits(bits, lo, hi);
                }
            }
        }
        let held: u64 = self
            .tracked
            .iter()
            .map(|t| to_u64(t.changed.len()) * cs)
            .sum();
        if held > CHANGED_BUDGET {
            self.write_bitmap_changes()?;
        }
        Ok(())
    }

    /// The in-memory copy of cluster `idx` of followed bitmap `t`, loaded on
    /// first use; `None` when its bits all read as ones already.
    fn bitmap_cluster(&mut self, t: usize, idx: u64) -> Res<Option<&mut Vec<u8>>, R> {
        let cs = self.cluster_size();
        let file_end = self.file_end;
        if !self.tracked[t].changed.contains_key(&idx) {
            let entry = self
                .bitmap_table(t)?
                .get(to_usize(idx).unwrap_or(usize::MAX))
                .copied();
            let Some(entry) = entry else {
                return Ok(None);
            };
            let off = entry & ENTRY_OFFSET;
            if off == 0 && entry & ALL_ONES != 0 {
                return Ok(None);
            }
            let mut bits = heap::zeroed(cs, "a bitmap cluster")?;
            if off != 0 {
                if !off.is_multiple_of(cs) || off.saturating_add(cs) > file_end {
                    return Err(Error::corrupt(
                        "bitmap table entry points outside the image",
                        self.tracked[t].table_offset,
                        entry,
                    ));
                }
                self.img.io.read_at(off, &mut bits).map_err(Error::Io)?;
            }
            self.tracked[t].changed.insert(idx, bits);
        }
        Ok(self.tracked[t].changed.get_mut(&idx))
    }

    /// The table of followed bitmap `t`, loaded on first use.
    fn bitmap_table(&mut self, t: usize) -> Res<&mut Vec<u64>, R> {
        if self.tracked[t].table.is_none() {
            let cs = self.cluster_size();
            let n = table_entries(self.img.header.size, self.tracked[t].gran_bits, cs);
            let mut raw = heap::zeroed(n * 8, "a bitmap table")?;
            self.img
                .io
                .read_at(self.tracked[t].table_offset, &mut raw)
                .map_err(Error::Io)?;
            self.tracked[t].table = Some(heap::entries(&raw, "a bitmap table")?);
        }
        self.tracked[t]
            .table
            .as_mut()
            .ok_or(Error::Internal("bitmap table"))
    }

    /// Writes the changed bitmap clusters (new clusters for those that had
    /// none, their refcounts durable first) and the tables that gained
    /// entries. The bitmaps stay flagged in use.
    fn write_bitmap_changes(&mut self) -> Res<(), R> {
        let mut any_table = false;
        for t in 0..self.tracked.len() {
            let changed = core::mem::take(&mut self.tracked[t].changed);
            for (idx, bits) in changed {
                let i = to_usize(idx).unwrap_or(usize::MAX);
                let entry = self.bitmap_table(t)?.get(i).copied().unwrap_or(0);
                let mut off = entry & ENTRY_OFFSET;
                if off == 0 {
                    if bits.iter().all(|b| *b == 0) {
                        continue;
                    }
                    off = self.alloc_clusters(1)?;
                    if let Some(e) = self.bitmap_table(t)?.get_mut(i) {
                        *e = off;
                    }
                    self.tracked[t].table_dirty = true;
                    any_table = true;
                }
                self.put(off, &bits, 0)?;
            }
        }
        if any_table {
            // New clusters' refcounts and contents before the tables
            // point at them.
            self.write_refcounts()?;
            self.img.io.flush().map_err(Error::Io)?;
            for t in 0..self.tracked.len() {
                if !core::mem::take(&mut self.tracked[t].table_dirty) {
                    continue;
                }
                let at = self.tracked[t].table_offset;
                let raw: Vec<u8> = self
                    .bitmap_table(t)?
                    .iter()
                    .flat_map(|e| e.to_be_bytes())
                    .collect();
                self.put(at, &raw, 0)?;
            }
        }
        Ok(())
    }

    /// At a flush: stores the followed bitmaps' bits, then clears their
    /// in-use flags (each durable before the next step). The next change
    /// of guest data flags them again.
    pub(crate) fn store_bitmaps(&mut self) -> Res<(), R> {
        if !self.bitmaps_marked {
            return Ok(());
        }
        self.write_bitmap_changes()?;
        let tracked = core::mem::take(&mut self.tracked);
        self.bitmaps_marked = false;
        if tracked.is_empty() {
            return Ok(());
        }
        self.img.io.flush().map_err(Error::Io)?;
        let dir_off = self
            .img
            .header
            .bitmaps
            .map(|e| e.directory_offset)
            .ok_or(Error::Internal("bitmap directory"))?;
        for t in &tracked {
            let (at, flags) = encode_flags(t.pos, t.flags & !FLAG_IN_USE);
            self.put(dir_off + to_u64(at), &flags, overlap::BITMAP_DIRECTORY)?;
        }
        self.img.io.flush().map_err(Error::Io)?;
        self.reload_bitmaps()
    }

    /// The followed bitmap named `name`, if any.
    pub(crate) fn tracked_named(&self, name: &str) -> Option<usize> {
        self.tracked.iter().position(|t| t.name == name)
    }

    /// log2 of the granularity of followed bitmap `t`.
    pub(crate) fn tracked_granularity(&self, t: usize) -> u8 {
        self.tracked[t].gran_bits
    }

    /// Host offset of the table of followed bitmap `t`.
    pub(crate) fn tracked_table_offset(&self, t: usize) -> u64 {
        self.tracked[t].table_offset
    }

    /// The table of followed bitmap `t` as it stands in memory.
    pub(crate) fn tracked_table(&mut self, t: usize) -> Res<Vec<u64>, R> {
        Ok(self.bitmap_table(t)?.clone())
    }

    /// Cluster `idx` of followed bitmap `t`, when it changed in memory.
    pub(crate) fn tracked_cluster(&self, t: usize, idx: u64) -> Option<Vec<u8>> {
        self.tracked[t].changed.get(&idx).cloned()
    }

    /// Reads the bitmap list again after the directory changed.
    pub(crate) fn reload_bitmaps(&mut self) -> Res<(), R> {
        let Some((ext, dir)) = self.read_directory()? else {
            self.img.bitmaps.clear();
            return Ok(());
        };
        let mut list = Vec::new();
        let mut pos = 0usize;
        for _ in 0..ext.nb_bitmaps {
            let Some((b, next)) = decode_entry(&dir, pos) else {
                break;
            };
            list.push(b);
            pos = next;
        }
        self.img.bitmaps = list;
        Ok(())
    }

    /// Whether every bitmap can be resized with the disk: none is flagged
    /// in use (inconsistent) and each is one this code can follow. Returns
    /// the name of the first that cannot.
    pub(crate) fn bitmap_blocking_resize(&self) -> Option<&str> {
        let cs = self.cluster_size();
        let size = self.img.header.size;
        self.img.bitmaps.iter().find_map(|b| {
            let ok = b.flags & FLAG_IN_USE == 0
                && b.kind == 1
                && GRANULARITY_BITS.contains(&b.granularity_bits)
                && b.table_offset % cs == 0
                && u64::from(b.table_size) == table_entries(size, b.granularity_bits, cs);
            (!ok).then_some(b.name.as_str())
        })
    }

    /// New tables and a new directory for every bitmap sized for a disk of
    /// `size` bytes: entries kept as far as both sizes reach, a last kept
    /// cluster with bits past the new end copied without them, zero entries
    /// for growth. Everything is written to new clusters and made durable;
    /// returns the directory's extension for the header switch, and the
    /// clusters the old bitmaps no longer need after it (to free then).
    pub(crate) fn resized_bitmaps(&mut self, size: u64) -> Res<Option<Resized>, R> {
        let Some((ext, mut dir)) = self.read_directory()? else {
            return Ok(None);
        };
        let cs = self.cluster_size();
        let old_size = self.img.header.size;
        let mut frees: Vec<(u64, u64)> = Vec::new();
        let mut pos = 0usize;
        for _ in 0..ext.nb_bitmaps {
            let Some((b, next)) = decode_entry(&dir, pos) else {
                break;
            };
            let g = b.granularity_bits;
            let old_n = u64::from(b.table_size);
            let new_n = table_entries(size, g, cs);
            let mut raw = heap::zeroed(old_n * 8, "a bitmap table")?;
            self.img
                .io
                .read_at(b.table_offset, &mut raw)
                .map_err(Error::Io)?;
            let old = heap::entries(&raw, "a bitmap table")?;
            let mut table: Vec<u64> = heap::zeroed(new_n, "a bitmap table")?;
            let keep = old_n.min(new_n);
            let k = to_usize(keep).unwrap_or(0);
            table[..k].copy_from_slice(&old[..k]);
            // Bits past the new end in the last kept cluster (shrinking).
            let bits_total = size.div_ceil(1u64 << g);
            let per_cluster = cs * 8;
            if size < old_size && new_n > 0 && !bits_total.is_multiple_of(per_cluster) {
                let i = to_usize(new_n - 1).unwrap_or(0);
                let entry = table[i];
                let off = entry & ENTRY_OFFSET;
                if off != 0 || entry & ALL_ONES != 0 {
                    let mut bits = heap::zeroed(cs, "a bitmap cluster")?;
                    if off != 0 {
                        self.img.io.read_at(off, &mut bits).map_err(Error::Io)?;
                        frees.push((off, cs));
                    } else {
                        bits.fill(0xff);
                    }
                    clear_bits_from(&mut bits, bits_total % per_cluster);
                    let new = self.alloc_clusters(1)?;
                    self.put(new, &bits, 0)?;
                    table[i] = new;
                }
            }
            for &e in old.iter().skip(to_usize(keep).unwrap_or(usize::MAX)) {
                let off = e & ENTRY_OFFSET;
                if off != 0 {
                    frees.push((off, cs));
                }
            }
            let table_at = if new_n == 0 {
                0
            } else {
                let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
                let at = self.alloc_clusters(to_u64(bytes.len()).div_ceil(cs))?;
                self.put(at, &bytes, 0)?;
                at
            };
            frees.push((b.table_offset, (old_n * 8).div_ceil(cs) * cs));
            dir[pos..pos + 8].copy_from_slice(&table_at.to_be_bytes());
            let n32 =
                u32::try_from(new_n).map_err(|_| Error::Unsupported("bitmap table too large"))?;
            dir[pos + 8..pos + 12].copy_from_slice(&n32.to_be_bytes());
            pos = next;
        }
        let dir_at = self.alloc_clusters(to_u64(dir.len()).div_ceil(cs))?;
        self.put(dir_at, &dir, 0)?;
        frees.push((ext.directory_offset, ext.directory_size.div_ceil(cs) * cs));
        self.write_refcounts()?;
        self.img.io.flush().map_err(Error::Io)?;
        Ok(Some((
            BitmapsExt {
                directory_offset: dir_at,
                ..ext
            },
            frees,
        )))
    }
}
