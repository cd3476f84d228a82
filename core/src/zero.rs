//! Zero writes and discards: whole clusters (or subclusters) become zero
//! clusters, unallocated ones or, when the image cannot flag zeros, real
//! zeros; host clusters are freed or, for zero writes that may not unmap,
//! kept. Like every guest change, in memory until
//! [`WritableImage::flush`](crate::WritableImage::flush).

use crate::bytes::to_usize;
use crate::error::Error;
use crate::image::Res;
use crate::io::BlockWrite;
use crate::l2::{self, Subcluster, COPIED, ZERO};
use crate::writable::WritableImage;

/// Which kind of zeroing a range gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroKind {
    /// `write_zeroes`: reads as zeros afterwards.
    Zero,
    /// `write_zeroes_with(.., unmap: false)`: reads as zeros afterwards,
    /// and clusters the image owns keep their host clusters (QEMU's zero
    /// writes without `BDRV_REQ_MAY_UNMAP`).
    ZeroKeep,
    /// `discard`: QEMU's guest discard (zeros on v3, unallocated on v2).
    Discard,
    /// Unallocated (reads the backing file), whatever the version.
    Unallocate,
}

impl<R: BlockWrite> WritableImage<R> {
    /// Makes guest `[offset, offset + len)` read as zeros, using zero flags
    /// where whole clusters (or subclusters) are covered.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Res<(), R> {
        self.zero_range(offset, len, ZeroKind::Zero)
    }

    /// [`write_zeroes`](Self::write_zeroes), choosing what happens to
    /// host clusters: with `unmap` they are freed; without it, whole
    /// clusters the image owns keep their host cluster, flagged as zeros
    /// (a preallocated image stays preallocated, as QEMU keeps it for zero
    /// writes that may not unmap).
    pub fn write_zeroes_with(&mut self, offset: u64, len: u64, unmap: bool) -> Res<(), R> {
        let kind = if unmap {
            ZeroKind::Zero
        } else {
            ZeroKind::ZeroKeep
        };
        self.zero_range(offset, len, kind)
    }

    /// Whether zeroing guest `[offset, offset + len)` changes L2 entries
    /// only, writing no data: whole clusters (whole subclusters with
    /// extended L2 entries, or up to the end of the disk), on an image
    /// that can flag zeros (version 3, or nothing below to hide), without
    /// a raw external data file. The answer to NBD's `FAST_ZERO`.
    pub fn zeroes_are_cheap(&self, offset: u64, len: u64) -> bool {
        let size = self.img.header.size;
        let Some(end) = offset.checked_add(len).filter(|&e| e <= size) else {
            return false;
        };
        let unit = if self.img.fmt.extended {
            self.sc_size()
        } else {
            self.cluster_size()
        };
        let aligned = |x: u64| x.is_multiple_of(unit) || x == size;
        let v3 = self.img.header.version >= 3;
        let has_backing = self.backing().is_some() || self.img.header.backing_file.is_some();
        aligned(offset) && aligned(end) && !self.img.header.data_file_raw() && (v3 || !has_backing)
    }

    /// Discards guest `[offset, offset + len)`: whole clusters are freed and
    /// read as zeros (as unallocated on version 2 images, like QEMU);
    /// partial clusters are left unchanged.
    pub fn discard(&mut self, offset: u64, len: u64) -> Res<(), R> {
        self.zero_range(offset, len, ZeroKind::Discard)
    }

    fn zero_range(&mut self, offset: u64, len: u64, kind: ZeroKind) -> Res<(), R> {
        self.require_intact()?;
        self.check_range(offset, len)?;
        self.begin_guest_change(offset, len)?;
        let cs = self.cluster_size();
        let size = self.img.header.size;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let cluster_start = pos - pos % cs;
            let cluster_end = (cluster_start + cs).min(size);
            let n = cluster_end.min(end) - pos;
            let whole = pos == cluster_start && pos + n == cluster_end;
            if whole {
                self.zero_cluster(cluster_start, kind)?;
            } else if matches!(kind, ZeroKind::Zero | ZeroKind::ZeroKeep) {
                if self.img.fmt.extended {
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

    /// Zeroes or discards one whole guest cluster.
    fn zero_cluster(&mut self, cstart: u64, kind: ZeroKind) -> Res<(), R> {
        let v3 = self.img.header.version >= 3;
        let raw_data_file = self.img.header.data_file_raw();
        let has_backing = self.backing().is_some() || self.img.header.backing_file.is_some();
        if kind == ZeroKind::Unallocate && raw_data_file {
            return Err(Error::Unsupported(
                "unallocating a cluster of an image whose external data file is raw",
            ));
        }
        let zeroing = matches!(kind, ZeroKind::Zero | ZeroKind::ZeroKeep);
        if raw_data_file || (!v3 && zeroing && has_backing) {
            // The data file must stay a valid raw image / v2 has no zero
            // flag to hide the backing file: write real zeros.
            let cs = self.cluster_size();
            let len = (cstart + cs).min(self.img.header.size) - cstart;
            let zeros = alloc::vec![0u8; to_usize(len).unwrap_or(0)];
            return self.write_in_cluster(cstart, &zeros);
        }
        let l2_off = self.writable_l2(cstart)?;
        let (entry, bitmap) = self.l2_entry(l2_off, cstart)?;
        if kind == ZeroKind::ZeroKeep && !self.img.fmt.data_file && entry & COPIED != 0 {
            // An owned host cluster (normal, or already preallocated
            // zeros) stays allocated and reads as zeros.
            let host = match self.img.fmt.subcluster(entry, bitmap, 0) {
                Ok(
                    Subcluster::Normal { host }
                    | Subcluster::ZeroAlloc { host }
                    | Subcluster::UnallocatedAlloc { host },
                ) => Some(host),
                _ => None,
            };
            if let Some(host) = host {
                let cs = self.cluster_size();
                let host = host - host % cs;
                // A data cluster, never metadata (a damaged pointer).
                self.guard(host, cs, 0)?;
                let (e, b) = if self.img.fmt.extended {
                    (host | COPIED, l2::ALL_ALLOC << 32)
                } else if v3 {
                    (host | COPIED | ZERO, 0)
                } else {
                    // Version 2 has no zero flag: the data is zeroed.
                    let len = (cstart + cs).min(self.img.header.size) - cstart;
                    let zeros = alloc::vec![0u8; to_usize(len).unwrap_or(0)];
                    return self.write_in_cluster(cstart, &zeros);
                };
                self.set_l2_entry(l2_off, cstart, e, b)?;
                return Ok(());
            }
        }
        let (new_entry, new_bitmap) = if kind == ZeroKind::Unallocate {
            (0, 0)
        } else if self.img.fmt.extended {
            (0, l2::ALL_ALLOC << 32)
        } else if v3 {
            (ZERO, 0)
        } else {
            (0, 0)
        };
        if self.img.fmt.data_file {
            // Data file clusters are not refcounted; keep the mapping's
            // identity offset out of the entry.
            self.set_l2_entry(l2_off, cstart, new_entry, new_bitmap)?;
            return Ok(());
        }
        self.release(entry, bitmap, cstart)?;
        self.set_l2_entry(l2_off, cstart, new_entry, new_bitmap)?;
        Ok(())
    }

    /// Makes the whole cluster at guest `cstart` unallocated (the guest
    /// reads the backing file there), releasing what it held.
    pub(crate) fn unallocate_cluster(&mut self, cstart: u64) -> Res<(), R> {
        self.zero_cluster(cstart, ZeroKind::Unallocate)
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
}
