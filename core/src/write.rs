//! Guest writes: each changes data clusters and L2 entries in memory;
//! [`WritableImage::flush`] makes them durable in order. The L2 entry
//! helpers here serve zero writes (`zero.rs`) and compressed writes
//! (`compressed.rs`) too.

use alloc::vec::Vec;

use crate::bytes::{be64, put64, to_u64, to_usize};
use crate::error::Error;
use crate::image::Crypt;
use crate::image::Res;
use crate::io::BlockWrite;
use crate::l2::{self, Subcluster, COPIED};
use crate::overlap;
use crate::writable::WritableImage;

impl<R: BlockWrite> WritableImage<R> {
    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Res<(), R> {
        let size = self.img.header.size;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfBounds { offset, len, size });
        }
        Ok(())
    }

    /// Writes `buf` at guest `offset`.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Res<(), R> {
        self.require_intact()?;
        self.check_range(offset, to_u64(buf.len()))?;
        self.begin_guest_change(offset, to_u64(buf.len()))?;
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + to_u64(done);
            if pos.is_multiple_of(cs) {
                let n = self.write_new_run(pos, &buf[done..])?;
                if n > 0 {
                    done += n;
                    self.flush_if_over_budget()?;
                    continue;
                }
            }
            let n = to_usize((cs - pos % cs).min(to_u64(buf.len() - done))).unwrap_or(0);
            self.write_in_cluster(pos, &buf[done..done + n])?;
            done += n;
            self.flush_if_over_budget()?;
        }
        Ok(())
    }

    /// Writes the leading whole clusters of `data` (from cluster-aligned
    /// guest `pos`) that need a new host cluster anyway (unallocated, zero,
    /// compressed or shared ones: nothing of them is kept) into one run of
    /// contiguous new clusters, with one data write. Returns the bytes
    /// written; 0 when fewer than two such clusters lead (the general path
    /// takes them).
    fn write_new_run(&mut self, pos: u64, data: &[u8]) -> Res<usize, R> {
        let cs = self.cluster_size();
        let size = self.img.header.size;
        let whole = (to_u64(data.len()) / cs).min(size.saturating_sub(pos) / cs);
        if whole < 2 {
            return Ok(0);
        }
        let mut entries: Vec<(u64, u64, u64)> = Vec::new();
        for i in 0..whole {
            let cpos = pos + i * cs;
            let l2_off = self.writable_l2(cpos)?;
            let (entry, bitmap) = self.l2_entry(l2_off, cpos)?;
            let Ok(sub) = self.fmt.subcluster(entry, bitmap, 0) else {
                break; // the general path reports it
            };
            let has_host = matches!(
                sub,
                Subcluster::Normal { .. }
                    | Subcluster::ZeroAlloc { .. }
                    | Subcluster::UnallocatedAlloc { .. }
            );
            if has_host && entry & COPIED != 0 {
                break; // owned: written in place by the general path
            }
            entries.push((l2_off, entry, bitmap));
        }
        let k = to_u64(entries.len());
        if k < 2 {
            return Ok(0);
        }
        let bytes = to_usize(k * cs).unwrap_or(0);
        let host = if self.img.fmt.data_file {
            pos
        } else {
            self.alloc_clusters(k)?
        };
        if let Err(e) = self.write_data(host, &data[..bytes]) {
            if !self.img.fmt.data_file {
                self.unallocate(host, k)?;
            }
            return Err(e);
        }
        let bits = if self.img.fmt.extended {
            l2::ALL_ALLOC
        } else {
            0
        };
        for (i, (l2_off, entry, bitmap)) in (0u64..).zip(entries) {
            let cpos = pos + i * cs;
            self.release(entry, bitmap, cpos)?;
            self.set_l2_entry(l2_off, cpos, (host + i * cs) | COPIED, bits)?;
        }
        Ok(bytes)
    }

    /// Returns the offset of an L2 table for guest `offset` that may be
    /// modified in place: allocated (or copied, when shared with a snapshot).
    pub(crate) fn writable_l2(&mut self, offset: u64) -> Res<u64, R> {
        let cs = self.cluster_size();
        let cover_bits =
            self.img.header.cluster_bits + self.img.header.l2_entries().trailing_zeros();
        let idx = to_usize(offset >> cover_bits).unwrap_or(usize::MAX);
        let l1e = *self.img.l1.get(idx).ok_or(Error::corrupt(
            "guest offset beyond the L1 table",
            offset,
            to_u64(idx),
        ))?;
        let l2_off = l2::l1_offset(l1e);
        if l2_off != 0 && !l2_off.is_multiple_of(cs) {
            return Err(Error::corrupt(
                "L1 entry points to an unaligned L2 table",
                offset,
                l2_off,
            ));
        }
        if l2_off != 0 {
            // An L2 table (maybe one a snapshot shares), never anything else.
            self.guard(l2_off, cs, overlap::ACTIVE_L2 | overlap::INACTIVE_L2)?;
        }
        // A snapshot's table is never modified in place, whatever the flag
        // or the refcount on disk claim (a damaged image).
        let shared = l2_off != 0 && self.metadata.kinds(l2_off, cs) & overlap::INACTIVE_L2 != 0;
        let exclusive = l2_off != 0 && (l1e & COPIED != 0 || self.refcount(l2_off / cs)? == 1);
        if exclusive && !shared {
            if l1e & COPIED == 0 {
                // Exclusively owned but the flag is missing: just set it.
                self.img.l1[idx] = l2_off | COPIED;
                self.dirty_l1.insert(idx);
            }
            return Ok(l2_off);
        }
        // Copy-on-write of a table shared with a snapshot: its contents.
        let contents = if l2_off == 0 {
            alloc::vec![0u8; to_usize(cs).unwrap_or(0)]
        } else {
            self.img
                .l2_cache
                .get(&mut self.img.io, l2_off, cs)?
                .to_vec()
        };
        let new = self.alloc_clusters(1)?;
        // A full disk fails here; the old table is still the one in use
        // (and protected), and the new cluster is taken back.
        if let Err(e) = self.reserve(new, cs, overlap::ACTIVE_L2) {
            self.unallocate(new, 1)?;
            return Err(e);
        }
        self.metadata.insert(new, cs, overlap::ACTIVE_L2);
        if l2_off != 0 {
            // Only the snapshot's (inactive) table from now on. Its refcount
            // drops by the active table's reference, unless the image
            // claimed it exclusive: then the count on disk never had it.
            if !exclusive {
                self.defer_free(l2_off, cs);
            }
            self.metadata.remove(l2_off, cs, overlap::ACTIVE_L2);
        }
        self.img.l2_cache.insert_dirty(new, contents);
        self.img.l1[idx] = new | COPIED;
        self.dirty_l1.insert(idx);
        Ok(new)
    }

    /// Reads the (entry, bitmap) pair for guest `offset` from table `l2_off`.
    pub(crate) fn l2_entry(&mut self, l2_off: u64, offset: u64) -> Res<(u64, u64), R> {
        let cs = self.cluster_size();
        let at = self.l2_index(offset) * self.img.fmt.entry_size();
        let t = self.img.l2_cache.get(&mut self.img.io, l2_off, cs)?;
        let bitmap = if self.img.fmt.extended {
            be64(t, at + 8)
        } else {
            0
        };
        Ok((be64(t, at), bitmap))
    }

    pub(crate) fn set_l2_entry(
        &mut self,
        l2_off: u64,
        offset: u64,
        entry: u64,
        bitmap: u64,
    ) -> Res<(), R> {
        let cs = self.cluster_size();
        let at = self.l2_index(offset) * self.img.fmt.entry_size();
        let extended = self.img.fmt.extended;
        let t = self.img.l2_cache.get_mut(&mut self.img.io, l2_off, cs)?;
        put64(t, at, entry);
        if extended {
            put64(t, at + 8, bitmap);
        }
        Ok(())
    }

    pub(crate) fn l2_index(&self, offset: u64) -> usize {
        to_usize((offset >> self.img.header.cluster_bits) & (self.img.header.l2_entries() - 1))
            .unwrap_or(0)
    }

    /// Subcluster size in bytes (the cluster size without extended L2).
    pub(crate) fn sc_size(&self) -> u64 {
        if self.img.fmt.extended {
            self.cluster_size() / 32
        } else {
            self.cluster_size()
        }
    }

    /// Bitmask of the subclusters overlapping `[pos, pos + n)` in its cluster.
    pub(crate) fn sc_mask(&self, pos: u64, n: u64) -> u64 {
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
    pub(crate) fn release(&mut self, entry: u64, bitmap: u64, offset: u64) -> Res<(), R> {
        if self.img.fmt.data_file {
            return Ok(());
        }
        match self.img.fmt.subcluster(entry, bitmap, 0) {
            Ok(Subcluster::Compressed(d)) => {
                let start = d.offset & !511;
                let len = d.offset + d.size - start;
                // Metadata is never freed as if it were guest data.
                self.guard(start, len, 0)?;
                self.defer_free(start, len);
            }
            Ok(
                Subcluster::Normal { host }
                | Subcluster::ZeroAlloc { host }
                | Subcluster::UnallocatedAlloc { host },
            ) => {
                let cs = self.cluster_size();
                self.guard(host, cs, 0)?;
                self.defer_free(host, cs);
            }
            Ok(_) => {}
            Err(e) => return Err(Error::corrupt(e.what(), offset, e.value())),
        }
        Ok(())
    }

    /// Allocates a host cluster for guest cluster `cluster_start`: in the
    /// image file, or at the same offset in the external data file.
    pub(crate) fn alloc_data_cluster(&mut self, cluster_start: u64) -> Res<u64, R> {
        if self.img.fmt.data_file {
            Ok(cluster_start)
        } else {
            self.alloc_clusters(1)
        }
    }

    pub(crate) fn write_data(&mut self, host: u64, data: &[u8]) -> Res<(), R> {
        self.data_dirty = true;
        // Host space may be reused: a cached decompressed cluster is stale.
        self.img.invalidate_decompressed();
        if let Crypt::Open { cipher, .. } = &self.img.crypt {
            // Whole sectors, encrypted by their host sector number; the
            // sectors a write covers in part are read and decrypted first.
            let cipher = cipher.clone();
            let sector = crate::luks::SECTOR as u64;
            let start = host - host % sector;
            let end = (host + to_u64(data.len())).div_ceil(sector) * sector;
            let mut buf = crate::heap::zeroed(end - start, "an encryption buffer")?;
            let skip = to_usize(host - start).unwrap_or(0);
            if start != host || end != host + to_u64(data.len()) {
                let crypt = self.img.crypt.clone();
                match (self.img.fmt.data_file, self.img.data_file.as_mut()) {
                    (true, Some(df)) => crypt.read(df, start, start, &mut buf)?,
                    (true, None) => return Err(Error::MissingDataFile),
                    (false, _) => crypt.read(&mut self.img.io, start, start, &mut buf)?,
                }
            }
            buf[skip..skip + data.len()].copy_from_slice(data);
            cipher.encrypt(start / sector, &mut buf);
            return self.write_plain(start, &buf);
        }
        self.write_plain(host, data)
    }

    /// Writes `data` at `host` of the file holding guest data as it is.
    pub(crate) fn write_plain(&mut self, host: u64, data: &[u8]) -> Res<(), R> {
        if self.img.fmt.data_file {
            let df = self.img.data_file.as_mut().ok_or(Error::MissingDataFile)?;
            return df.write_at(host, data).map_err(Error::Io);
        }
        // Guest data never lands on metadata, whatever a pointer says.
        self.put(host, data, 0)
    }

    /// Makes host `[host, host + len)` of guest data read as zeros, as
    /// cheaply as the storage can (see [`BlockWrite::write_zeroes`]).
    pub(crate) fn zero_data(&mut self, host: u64, len: u64) -> Res<(), R> {
        self.data_dirty = true;
        self.img.invalidate_decompressed();
        if self.img.fmt.data_file {
            let df = self.img.data_file.as_mut().ok_or(Error::MissingDataFile)?;
            return df.write_zeroes(host, len).map_err(Error::Io);
        }
        self.guard(host, len, 0)?;
        self.img.io.write_zeroes(host, len).map_err(Error::Io)
    }

    /// The guest view of `[pos, pos + len)` with `data` laid over `[at, at + data.len())`.
    pub(crate) fn merged(&mut self, pos: u64, len: u64, at: u64, data: &[u8]) -> Res<Vec<u8>, R> {
        let mut buf = alloc::vec![0u8; to_usize(len).unwrap_or(0)];
        let dstart = to_usize(at - pos).unwrap_or(0);
        let dend = dstart + data.len();
        // Read only the parts not overwritten.
        if dstart > 0 {
            self.img.read_at(pos, &mut buf[..dstart])?;
        }
        if dend < buf.len() {
            let tail = to_u64(dend);
            self.img.read_at(pos + tail, &mut buf[dend..])?;
        }
        buf[dstart..dend].copy_from_slice(data);
        Ok(buf)
    }

    /// Writes `data` inside one guest cluster.
    pub(crate) fn write_in_cluster(&mut self, pos: u64, data: &[u8]) -> Res<(), R> {
        if data.is_empty() {
            return Ok(());
        }
        let cs = self.cluster_size();
        let size = self.img.header.size;
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
        if !self.img.fmt.extended {
            match sub {
                Subcluster::Normal { host } if owned => {
                    return self.write_data(host + pos % cs, data);
                }
                _ => {
                    // Whole new cluster (or rewrite of a zero-flagged one):
                    // the guest view with the new data laid over it. When
                    // that view is zeros, the storage zeroes the cluster
                    // (one cheap call) and only the data is written.
                    let zeros = match sub {
                        Subcluster::Zero | Subcluster::ZeroAlloc { .. } => true,
                        Subcluster::Unallocated => {
                            self.backing().is_none() && self.img.header.backing_file.is_none()
                        }
                        _ => false,
                    };
                    let whole = n == cend - cstart;
                    // Read (and decompress) what is kept before allocating:
                    // a failure then allocates nothing.
                    // (Zeros of an encrypted image are written encrypted.)
                    let buf = if zeros && !whole && !self.img.crypt.is_some() {
                        None
                    } else {
                        Some(self.merged(cstart, cend - cstart, pos, data)?)
                    };
                    let reused = match sub {
                        Subcluster::ZeroAlloc { host } if owned => Some(host),
                        _ => None,
                    };
                    let host = match reused {
                        Some(h) => h,
                        None => self.alloc_data_cluster(cstart)?,
                    };
                    let written = match buf {
                        None => self
                            .zero_data(host, cend - cstart)
                            .and_then(|()| self.write_data(host + (pos - cstart), data)),
                        Some(buf) => self.write_data(host, &buf),
                    };
                    if let Err(e) = written {
                        if reused.is_none() && !self.img.fmt.data_file {
                            self.unallocate(host, 1)?;
                        }
                        return Err(e);
                    }
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
                // (Decrypted where it is, encrypted again where it goes.)
                let crypt = self.img.crypt.clone();
                crypt.read(&mut self.img.io, old, cstart, &mut buf)?;
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
}
