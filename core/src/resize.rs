//! Resizing the guest disk (`qemu-img resize`), in QEMU's order and with
//! its rules.
//!
//! Growing: a larger L1 table, when needed, is written to new clusters and
//! switched to with one header write (the old one freed after); then the
//! size field; then the new range preallocated as asked. Shrinking: the
//! clusters past the new end are discarded and L2 tables that no longer
//! cover the disk freed (made durable first), then the size field, then
//! the file's unused tail cut. A crash leaves the old or the new size with
//! consistent tables (at worst leaked clusters).

use crate::bytes::{put64, to_usize};
use crate::create::Preallocation;
use crate::error::Error;
use crate::heap;
use crate::image::Res;
use crate::io::BlockWrite;
use crate::l2;
use crate::overlap;
use crate::writable::WritableImage;

/// A refused new size.
fn refuse<E>(reason: &'static str) -> Error<E> {
    Error::Format(crate::error::FormatError::InvalidOption {
        option: "size",
        reason,
    })
}

/// Byte offset of the header's `size` field.
const SIZE_FIELD: u64 = 24;
/// Byte offset of `l1_size`, followed by `l1_table_offset`.
const L1_FIELDS: u64 = 36;

impl<R: BlockWrite> WritableImage<R> {
    /// Changes the guest disk's size to `size` bytes (a multiple of 512),
    /// preallocating a grown range as `prealloc` asks (only when growing).
    /// Shrinking deletes the data past the new end. Refused, as by QEMU,
    /// for a version 2 image with snapshots or with a persistent bitmap
    /// flagged in use (inconsistent); the bitmaps are resized with the
    /// disk.
    pub fn resize(&mut self, size: u64, prealloc: Preallocation) -> Res<(), R> {
        self.require_intact()?;
        let old = self.img.header.size;
        if !size.is_multiple_of(512) {
            return Err(refuse("The new size must be a multiple of 512"));
        }
        if size > i64::MAX as u64 - 512 {
            return Err(refuse("image size too large"));
        }
        if self.img.header.nb_snapshots > 0 && self.img.header.version < 3 {
            return Err(Error::Unsupported(
                "Can't resize a v2 image which has snapshots",
            ));
        }
        if self.bitmap_blocking_resize().is_some() {
            return Err(Error::Unsupported(
                "a persistent bitmap is inconsistent (in use) or of a kind this implementation cannot resize; remove it first",
            ));
        }
        let per_l2 = self.img.header.l2_coverage();
        let needed = size.div_ceil(per_l2);
        if needed.saturating_mul(8) > crate::header::MAX_L1_BYTES {
            return Err(refuse(
                "The image size is too large (try using a larger cluster size)",
            ));
        }
        if size < old && prealloc != Preallocation::Off {
            return Err(Error::Unsupported(
                "Preallocation can't be used for shrinking an image",
            ));
        }
        self.require_consistent()?;
        if size < old {
            self.shrink(size, needed)?;
        } else {
            if needed > u64::from(self.img.header.l1_size) {
                self.grow_l1(needed)?;
            }
            self.set_size(size)?;
            let mode = if prealloc == Preallocation::Off && self.img.header.data_file_raw() {
                // A raw data file must read like the image: its tables
                // cover the whole disk (QEMU does the same).
                Preallocation::Metadata
            } else {
                prealloc
            };
            match mode {
                Preallocation::Off => {
                    if let Some(df) = self.img.data_file.as_mut() {
                        df.set_len(size).map_err(Error::Io)?;
                    }
                }
                m => self.preallocate_range(m, old, size)?,
            }
        }
        self.flush()
    }

    /// Writes a new size into the header (after a flush of what the new
    /// size relies on).
    /// Persistent bitmaps are resized with it: new tables and a new
    /// directory first, then one header write switching the size and the
    /// directory together, then the old tables freed.
    fn set_size(&mut self, size: u64) -> Res<(), R> {
        self.img.io.flush().map_err(Error::Io)?;
        if !self.img.bitmaps.is_empty() {
            if let Some((ext, frees)) = self.resized_bitmaps(size)? {
                let old = self.img.header.bitmaps;
                let mut h = self.img.header.clone();
                h.size = size;
                h.bitmaps = Some(ext);
                self.write_header_cluster(h)?;
                if let Some(o) = old {
                    self.metadata.remove(
                        o.directory_offset,
                        o.directory_size,
                        overlap::BITMAP_DIRECTORY,
                    );
                }
                self.metadata.insert(
                    ext.directory_offset,
                    ext.directory_size,
                    overlap::BITMAP_DIRECTORY,
                );
                for (at, len) in frees {
                    self.defer_free(at, len);
                }
                self.reload_bitmaps()?;
                return self.flush();
            }
        }
        self.put(SIZE_FIELD, &size.to_be_bytes(), overlap::HEADER)?;
        self.img.io.flush().map_err(Error::Io)?;
        self.img.header.size = size;
        Ok(())
    }

    /// Moves the active L1 table to new clusters holding `entries` entries
    /// (the old ones, then zeros), switches the header to it, and frees the
    /// old table.
    pub(crate) fn grow_l1(&mut self, entries: u64) -> Res<(), R> {
        let cs = self.cluster_size();
        let bytes = entries * 8;
        let clusters = bytes.div_ceil(cs);
        let mut table = heap::zeroed(clusters * cs, "the L1 table")?;
        for (i, e) in self.img.l1.iter().enumerate() {
            put64(&mut table, i * 8, *e);
        }
        let new = self.alloc_clusters(clusters)?;
        self.metadata.insert(new, clusters * cs, overlap::ACTIVE_L1);
        // The new table's refcounts, then the table, then the switch.
        self.write_refcounts()?;
        self.put(new, &table, overlap::ACTIVE_L1)?;
        self.img.io.flush().map_err(Error::Io)?;
        let l1_size = u32::try_from(entries).map_err(|_| Error::Internal("L1 size"))?;
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&l1_size.to_be_bytes());
        fields[4..].copy_from_slice(&new.to_be_bytes());
        self.put(L1_FIELDS, &fields, overlap::HEADER)?;
        self.img.io.flush().map_err(Error::Io)?;
        let old = self.img.header.l1_table_offset;
        let old_len = u64::from(self.img.header.l1_size) * 8;
        self.img.header.l1_table_offset = new;
        self.img.header.l1_size = l1_size;
        self.img.l1.resize(to_usize(entries).unwrap_or(0), 0);
        if old_len > 0 {
            self.metadata.remove(old, old_len, overlap::ACTIVE_L1);
            self.defer_free(old, old_len);
        }
        self.flush()
    }

    /// Shrinks the disk to `size`: clusters past it discarded, L2 tables
    /// past the first `keep` L1 entries freed (the L1 table keeps its size,
    /// as QEMU's does), then the size field and the file's unused tail.
    fn shrink(&mut self, size: u64, keep: u64) -> Res<(), R> {
        let cs = self.cluster_size();
        let old = self.img.header.size;
        let from = size.div_ceil(cs) * cs;
        if from < old {
            self.discard(from, old - from)?;
        }
        self.drop_l2_tables(to_usize(keep).unwrap_or(usize::MAX));
        self.flush()?;
        self.set_size(size)?;
        if let Some(df) = self.img.data_file.as_mut() {
            df.set_len(size).map_err(Error::Io)?;
        }
        self.cut_unused_tail()
    }

    /// Drops the L2 tables of L1 entries `from..` (entries zeroed, tables
    /// freed once the L1 table is durable). Their entries must have been
    /// released already.
    pub(crate) fn drop_l2_tables(&mut self, from: usize) {
        let cs = self.cluster_size();
        for i in from..self.img.l1.len() {
            let l2_off = l2::l1_offset(self.img.l1[i]);
            if l2_off == 0 {
                continue;
            }
            self.img.l1[i] = 0;
            self.dirty_l1.insert(i);
            self.img.l2_cache.forget(l2_off);
            self.metadata.remove(l2_off, cs, overlap::ACTIVE_L2);
            self.defer_free(l2_off, cs);
        }
    }

    /// Cuts the file after its last cluster in use (call after a flush).
    pub(crate) fn cut_unused_tail(&mut self) -> Res<(), R> {
        let cs = self.cluster_size();
        let mut end = self.file_end.div_ceil(cs);
        while end > 1 && self.refcount(end - 1)? == 0 {
            end -= 1;
        }
        if end * cs < self.img.io.len().map_err(Error::Io)? {
            self.img.io.set_len(end * cs).map_err(Error::Io)?;
            self.file_end = end * cs;
            self.img.file_len = self.img.file_len.min(end * cs);
        }
        Ok(())
    }
}
