//! Taking internal snapshots (`qemu-img snapshot -c`), as QEMU lays them
//! out: a copy of the active L1 table, one more reference to every L2
//! table and cluster it reaches, COPIED flags cleared in the active tables,
//! and a new snapshot table switched to with one header write.
//!
//! Crash safety: the refcounts are raised first (a crash then leaves
//! leaks), the L1 copy and the new table are written to new clusters, and
//! only the header write makes the snapshot exist.

use alloc::string::String;
use alloc::vec::Vec;

use crate::bytes::{put64, to_u64};
use crate::error::Error;
use crate::heap;
use crate::image::Res;
use crate::io::BlockWrite;
use crate::l2::{self, Subcluster, COPIED};
use crate::overlap;
use crate::snapshot::Snapshot;
use crate::writable::WritableImage;

/// Byte offset of `nb_snapshots`, followed by `snapshots_offset`.
const SNAPSHOT_FIELDS: u64 = 60;
/// Largest snapshot table QEMU accepts.
const MAX_TABLE_BYTES: u64 = 64 << 20;

impl<R: BlockWrite> WritableImage<R> {
    /// Takes an internal snapshot of the disk as it is now, named `name`,
    /// dated `date_sec`.`date_nsec` (seconds since 1970; the core has no
    /// clock), with the next free numeric ID (returned). No VM state is
    /// saved (`vm-state-size` 0), as qemu-img does.
    pub fn create_snapshot(&mut self, name: &str, date_sec: u32, date_nsec: u32) -> Res<String, R> {
        self.require_intact()?;
        if self.img.header.has_data_file() {
            return Err(Error::Unsupported(
                "internal snapshots of an image with an external data file",
            ));
        }
        if self.img.header.nb_snapshots >= crate::header::MAX_SNAPSHOTS {
            return Err(Error::Unsupported("too many snapshots"));
        }
        if crate::refcount::max_refcount(self.img.header.refcount_order) < 2 {
            return Err(Error::Unsupported(
                "snapshots need refcounts of at least 2 bits (qemu-img amend -o refcount_bits=16)",
            ));
        }
        if name.len() > usize::from(u16::MAX) {
            return Err(Error::Unsupported("snapshot name too long"));
        }
        self.require_consistent()?;
        let cs = self.cluster_size();
        let id = next_id(&self.img.snapshots);
        // 1. One more reference to every table and cluster the active L1
        //    reaches.
        self.reference_active_tables()?;
        self.write_refcounts()?;
        self.img.io.flush().map_err(Error::Io)?;
        // 2. The L1 copy, COPIED cleared.
        let l1_len = to_u64(self.img.l1.len()) * 8;
        let l1_copy = if l1_len == 0 {
            0
        } else {
            let clusters = l1_len.div_ceil(cs);
            let mut table = heap::zeroed(clusters * cs, "the snapshot's L1 table")?;
            for (i, e) in self.img.l1.iter().enumerate() {
                put64(&mut table, i * 8, e & !COPIED);
            }
            let at = self.alloc_clusters(clusters)?;
            self.metadata.insert(at, l1_len, overlap::INACTIVE_L1);
            self.write_refcounts()?;
            self.put(at, &table, overlap::INACTIVE_L1)?;
            at
        };
        // 3. The active tables are shared now: COPIED cleared (after the
        //    refcounts, at the flush).
        self.clear_active_copied()?;
        self.flush()?;
        // The tables are the snapshot's too from now on (written in place
        // only for the flags above).
        for i in 0..self.img.l1.len() {
            let l2_off = l2::l1_offset(self.img.l1[i]);
            if l2_off != 0 {
                self.metadata.insert(l2_off, cs, overlap::INACTIVE_L2);
            }
        }
        // 4. The new snapshot table, then the switch.
        let snap = Snapshot {
            l1_table_offset: l1_copy,
            l1_size: self.img.header.l1_size,
            id: id.clone(),
            name: String::from(name),
            date_sec,
            date_nsec,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.img.header.size),
            icount: Some(0),
            extra_unknown: Vec::new(),
        };
        let mut snapshots = self.img.snapshots.clone();
        snapshots.push(snap);
        self.write_snapshot_table(snapshots)?;
        Ok(id)
    }

    /// Deletes the first snapshot named `name` (as `qemu-img snapshot -d`
    /// finds it): the snapshot table without it is switched to first, then
    /// the references its L1 table held are dropped and the active tables'
    /// COPIED flags set where a cluster is theirs alone again. A crash
    /// after the switch leaves leaked clusters. Returns false when no
    /// snapshot has that name.
    pub fn delete_snapshot(&mut self, name: &str) -> Res<bool, R> {
        self.require_intact()?;
        let Some(index) = self.img.snapshots.iter().position(|s| s.name == name) else {
            return Ok(false);
        };
        let gone = self.img.snapshots[index].clone();
        let mut rest = self.img.snapshots.clone();
        rest.remove(index);
        let end = self.file_end;
        if self.img.snapshot_l1(index, end).is_err() {
            // A broken entry: dropped alone; what it held is left as
            // leaked clusters (check -r leaks frees them).
            self.flush()?;
            self.write_snapshot_table(rest)?;
            return Ok(true);
        }
        self.require_consistent()?;
        self.write_snapshot_table(rest)?;
        // The snapshot's L1 table, read as far as the file holds it.
        let cs = self.cluster_size();
        let l1_bytes = u64::from(gone.l1_size) * 8;
        let readable = self
            .file_end
            .saturating_sub(gone.l1_table_offset)
            .min(l1_bytes);
        let mut raw = heap::zeroed(readable, "a snapshot's L1 table")?;
        if gone.l1_table_offset.is_multiple_of(cs) && gone.l1_table_offset != 0 {
            self.img
                .io
                .read_at(gone.l1_table_offset, &mut raw)
                .map_err(Error::Io)?;
        }
        let l1 = heap::entries(&raw, "a snapshot's L1 table")?;
        drop(raw);
        self.img.invalidate_decompressed();
        self.reference_tables(&l1, -1)?;
        if l1_bytes > 0 && gone.l1_table_offset.is_multiple_of(cs) && gone.l1_table_offset != 0 {
            let cb = self.img.header.cluster_bits;
            for c in gone.l1_table_offset >> cb..=(gone.l1_table_offset + l1_bytes - 1) >> cb {
                if self.refcount(c)? > 0 {
                    self.change_refcount(c, -1)?;
                }
            }
        }
        self.write_refcounts()?;
        self.img.io.flush().map_err(Error::Io)?;
        // What the snapshot shared is the active tables' alone again.
        self.recompute_active_copied()?;
        self.metadata = crate::writable::metadata_of(&mut self.img, &self.refcounts)?;
        self.flush()?;
        Ok(true)
    }

    /// Reverts the disk to the snapshot with ID or else name `id_or_name`
    /// (`qemu-img snapshot -a`): the disk takes the snapshot's size, the
    /// snapshot's tables gain a reference, the active L1 table gets the
    /// snapshot's entries, and the tables it held lose theirs. A crash
    /// leaves at worst leaks. Returns false when there is no such snapshot.
    /// Refused, as by QEMU, while the image has persistent bitmaps.
    pub fn apply_snapshot(&mut self, id_or_name: &str) -> Res<bool, R> {
        self.require_intact()?;
        if !self.img.bitmaps.is_empty() {
            // As QEMU: the bitmaps could not say what the revert changed.
            return Err(Error::Unsupported("Device has active dirty bitmaps"));
        }
        let Some(index) = self.img.find_snapshot(id_or_name) else {
            return Ok(false);
        };
        if self.img.header.has_data_file() {
            return Err(Error::Unsupported(
                "internal snapshots of an image with an external data file",
            ));
        }
        let sn = self.img.snapshots[index].clone();
        let end = self.file_end;
        let mut l1 = self.img.snapshot_l1(index, end)?;
        self.require_consistent()?;
        if let Some(size) = sn.disk_size.filter(|&s| s != self.img.header.size) {
            self.resize(size, crate::create::Preallocation::Off)?;
        }
        if u64::from(sn.l1_size) > to_u64(self.img.l1.len()) {
            self.grow_l1(u64::from(sn.l1_size))?;
        }
        l1.resize(self.img.l1.len(), 0);
        // 1. The snapshot's tables gain the active layer's reference.
        self.reference_tables(&l1, 1)?;
        self.write_refcounts()?;
        self.img.io.flush().map_err(Error::Io)?;
        // 2. The active L1 table takes the snapshot's entries.
        let mut table = heap::zeroed(to_u64(l1.len()) * 8, "the L1 table")?;
        for (i, e) in l1.iter().enumerate() {
            put64(&mut table, i * 8, *e);
        }
        let at = self.img.header.l1_table_offset;
        self.put(at, &table, overlap::ACTIVE_L1)?;
        self.img.io.flush().map_err(Error::Io)?;
        // 3. The tables the active layer held lose its reference.
        let old = core::mem::replace(&mut self.img.l1, l1);
        self.img.invalidate_decompressed();
        self.reference_tables(&old, -1)?;
        self.write_refcounts()?;
        self.img.io.flush().map_err(Error::Io)?;
        self.metadata = crate::writable::metadata_of(&mut self.img, &self.refcounts)?;
        self.recompute_active_copied()?;
        self.flush()?;
        Ok(true)
    }

    /// Makes the COPIED flags of the active L1 entries, and of the entries
    /// of active L2 tables that are not shared, say whether their cluster
    /// has refcount 1 (QEMU's rule; written at the flush, after the
    /// refcounts). A snapshot's L1 copy may carry flags from when it was
    /// active, and a deleted snapshot leaves clusters unshared.
    fn recompute_active_copied(&mut self) -> Res<(), R> {
        let cs = self.cluster_size();
        let mut table: Vec<u8> = Vec::new();
        let mut flips = Vec::new();
        for i in 0..self.img.l1.len() {
            let e = self.img.l1[i];
            let l2_off = l2::l1_offset(e);
            if l2_off == 0 {
                continue;
            }
            let alone = self.refcount(l2_off / cs)? == 1;
            let want = if alone { e | COPIED } else { e & !COPIED };
            if want != e {
                self.img.l1[i] = want;
                self.dirty_l1.insert(i);
            }
            if !alone {
                // Shared with a snapshot: not written in place (its
                // entries' clusters are shared too: their flags are clear).
                continue;
            }
            self.copied_mismatches(l2_off, &mut table, &mut flips)?;
            if !flips.is_empty() {
                // The table may have been a snapshot's too: it is not any
                // more (its refcount is 1).
                self.metadata.remove(l2_off, cs, overlap::INACTIVE_L2);
                self.correct_copied(l2_off, &flips)?;
            }
        }
        Ok(())
    }

    /// Raises by one the refcount of every L2 table of the active L1 and
    /// of every cluster those tables reach (compressed ones included).
    fn reference_active_tables(&mut self) -> Res<(), R> {
        let l1 = core::mem::take(&mut self.img.l1);
        let r = self.reference_tables(&l1, 1);
        self.img.l1 = l1;
        r
    }

    /// Adds `delta` (1 or -1) to the refcount of every L2 table `l1` names
    /// and of every cluster those tables reach (compressed ones included).
    /// Lowering never goes below 0 (a damaged image's refcount may already
    /// read 0; the reference is gone either way).
    fn reference_tables(&mut self, l1: &[u64], delta: i64) -> Res<(), R> {
        let cs = self.cluster_size();
        let cb = self.img.header.cluster_bits;
        let fmt = self.img.fmt;
        let mut table: Vec<u8> = Vec::new();
        for &l1_entry in l1 {
            let l2_off = l2::l1_offset(l1_entry);
            if l2_off == 0 || !l2_off.is_multiple_of(cs) || l2_off >= self.file_end {
                continue;
            }
            self.bump(l2_off >> cb, delta)?;
            table.clear();
            table.extend_from_slice(self.img.l2_cache.get(&mut self.img.io, l2_off, cs)?);
            for j in 0..table.len() / fmt.entry_size() {
                let (entry, host) = fmt.host_cluster_at(&table, j);
                let range = match (host, fmt.subcluster(entry, 0, 0)) {
                    (Some(h), _) if !fmt.data_file => Some((h, cs)),
                    (_, Ok(Subcluster::Compressed(d))) => {
                        let start = d.offset & !511;
                        Some((start, d.offset.saturating_add(d.size) - start))
                    }
                    _ => None,
                };
                if let Some((start, len)) = range {
                    for c in start >> cb..=(start + len - 1) >> cb {
                        self.bump(c, delta)?;
                    }
                }
            }
            if self.refcounts.blocks.over_capacity() {
                self.write_refcounts()?;
            }
        }
        Ok(())
    }

    /// [`WritableImage::change_refcount`] that skips lowering a refcount
    /// already at 0.
    fn bump(&mut self, cluster: u64, delta: i64) -> Res<(), R> {
        if delta < 0 && self.refcount(cluster)? == 0 {
            return Ok(());
        }
        self.change_refcount(cluster, delta)?;
        if delta < 0 && self.refcount(cluster)? == 0 {
            // Free now: no cached copy may outlive it.
            let at = cluster << self.img.header.cluster_bits;
            self.img.l2_cache.forget(at);
        }
        Ok(())
    }

    /// Clears the COPIED flag of every active L1 and L2 entry (their
    /// clusters now have more than one reference); written at the flush.
    fn clear_active_copied(&mut self) -> Res<(), R> {
        let cs = self.cluster_size();
        let fmt = self.img.fmt;
        for i in 0..self.img.l1.len() {
            let e = self.img.l1[i];
            let l2_off = l2::l1_offset(e);
            if l2_off == 0 {
                continue;
            }
            if e & COPIED != 0 {
                self.img.l1[i] = e & !COPIED;
                self.dirty_l1.insert(i);
            }
            // Written only when a flag changes (a table shared already has
            // none set, and is not written in place).
            let t = self.img.l2_cache.get(&mut self.img.io, l2_off, cs)?;
            let n = t.len() / fmt.entry_size();
            let any = (0..n).any(|j| crate::bytes::be64(t, j * fmt.entry_size()) & COPIED != 0);
            if !any {
                continue;
            }
            let t = self.img.l2_cache.get_mut(&mut self.img.io, l2_off, cs)?;
            for j in 0..n {
                let at = j * fmt.entry_size();
                let entry = crate::bytes::be64(t, at);
                if entry & COPIED != 0 {
                    put64(t, at, entry & !COPIED);
                }
            }
            self.flush_if_over_budget()?;
        }
        Ok(())
    }

    /// Writes `snapshots` as the snapshot table in new clusters, switches
    /// the header to it (count and offset in one write), frees the old one.
    pub(crate) fn write_snapshot_table(&mut self, snapshots: Vec<Snapshot>) -> Res<(), R> {
        let cs = self.cluster_size();
        let mut bytes = Vec::new();
        for s in &snapshots {
            bytes.extend_from_slice(&s.encode());
        }
        let len = to_u64(bytes.len());
        if len > MAX_TABLE_BYTES {
            return Err(Error::Unsupported("snapshot table too large"));
        }
        let at = if len == 0 {
            0
        } else {
            let clusters = len.div_ceil(cs);
            let at = self.alloc_clusters(clusters)?;
            self.metadata.insert(at, len, overlap::SNAPSHOT_TABLE);
            self.write_refcounts()?;
            self.put(at, &bytes, overlap::SNAPSHOT_TABLE)?;
            self.img.io.flush().map_err(Error::Io)?;
            at
        };
        let count =
            u32::try_from(snapshots.len()).map_err(|_| Error::Internal("snapshot count"))?;
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&count.to_be_bytes());
        fields[4..].copy_from_slice(&at.to_be_bytes());
        self.put(SNAPSHOT_FIELDS, &fields, overlap::HEADER)?;
        self.img.io.flush().map_err(Error::Io)?;
        let (old, old_len) = (
            self.img.header.snapshots_offset,
            self.img.snapshot_table_len,
        );
        if self.img.header.nb_snapshots > 0 && old_len > 0 {
            self.metadata.remove(old, old_len, overlap::SNAPSHOT_TABLE);
            self.defer_free(old, old_len);
        }
        self.img.header.nb_snapshots = count;
        self.img.header.snapshots_offset = at;
        self.img.snapshot_table_len = len;
        self.img.snapshots = snapshots;
        self.flush()
    }
}

/// An L2 entry whose COPIED flag disagrees with its cluster's refcount:
/// its byte offset in the table, the entry, the refcount, and the entry
/// with the flag corrected (set exactly when the refcount is 1).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopiedFix {
    pub(crate) at: usize,
    pub(crate) entry: u64,
    pub(crate) refcount: u64,
    pub(crate) corrected: u64,
}

impl<R: BlockWrite> WritableImage<R> {
    /// The entries of the L2 table at `l2_off` (read into `table`) whose
    /// COPIED flag disagrees with their cluster's refcount, into `out`
    /// (cleared first). With an external data file every cluster is the
    /// entry's own (refcount 1).
    pub(crate) fn copied_mismatches(
        &mut self,
        l2_off: u64,
        table: &mut Vec<u8>,
        out: &mut Vec<CopiedFix>,
    ) -> Res<(), R> {
        let cs = self.cluster_size();
        let fmt = self.img.fmt;
        table.clear();
        table.extend_from_slice(self.img.l2_cache.get(&mut self.img.io, l2_off, cs)?);
        out.clear();
        for j in 0..table.len() / fmt.entry_size() {
            let (entry, Some(host)) = fmt.host_cluster_at(table, j) else {
                continue;
            };
            let refcount = if fmt.data_file {
                1
            } else {
                self.refcount(host / cs)?
            };
            let corrected = if refcount == 1 {
                entry | COPIED
            } else {
                entry & !COPIED
            };
            if corrected != entry {
                out.push(CopiedFix {
                    at: j * fmt.entry_size(),
                    entry,
                    refcount,
                    corrected,
                });
            }
        }
        Ok(())
    }

    /// Writes the corrected entries `fixes` into the cached L2 table at
    /// `l2_off` (to disk at the flush, after the refcounts).
    pub(crate) fn correct_copied(&mut self, l2_off: u64, fixes: &[CopiedFix]) -> Res<(), R> {
        let cs = self.cluster_size();
        let t = self.img.l2_cache.get_mut(&mut self.img.io, l2_off, cs)?;
        for f in fixes {
            put64(t, f.at, f.corrected);
        }
        self.flush_if_over_budget()
    }
}

/// The next snapshot ID: one more than the largest numeric ID (QEMU's rule).
fn next_id(snapshots: &[Snapshot]) -> String {
    let max = snapshots
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    alloc::format!("{}", max.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_largest_numeric_one() {
        let mk = |id: &str| Snapshot {
            l1_table_offset: 0,
            l1_size: 0,
            id: id.into(),
            name: String::new(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: None,
            icount: None,
            extra_unknown: Vec::new(),
        };
        assert_eq!(next_id(&[]), "1");
        assert_eq!(next_id(&[mk("1"), mk("7"), mk("x")]), "8");
    }
}
