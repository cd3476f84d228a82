//! Walking the metadata: every table, snapshot, bitmap and refcount
//! structure of the file, each reference to a host cluster counted.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::bytes::{be64, to_u64, to_usize};
use crate::error::Error;
use crate::heap;
use crate::image::Image;
use crate::io::BlockRead;
use crate::l2::{self, Subcluster};
use crate::refcount;

use super::{Findings, Refs, MAX_CHECK_CLUSTERS};

impl<R: BlockRead> Image<R> {
    /// Walks all metadata counting references; returns the counts and the
    /// refcount block offsets (0 for missing or invalid ones).
    pub(crate) fn walk_references(
        &mut self,
        rep: &mut Findings<'_>,
        file_len: u64,
    ) -> Result<(Refs, Vec<u64>), Error<R::Error>> {
        let cb = self.header.cluster_bits;
        let cs = 1u64 << cb;
        let file_len = self.file_len.max(file_len);
        let file_clusters = file_len.div_ceil(cs);
        if file_clusters > MAX_CHECK_CLUSTERS {
            return Err(Error::Unsupported("image file too large to check"));
        }
        // One extra slot: QEMU tolerates references less than a cluster past
        // the end of the file (a partial last cluster).
        let mut refs = Refs {
            counts: heap::zeroed(file_clusters + 1, "the check's reference counts")?,
            big: alloc::collections::BTreeMap::new(),
            cluster_bits: cb,
            file_len,
            max: refcount::max_refcount(self.header.refcount_order),
            beyond: alloc::collections::BTreeSet::new(),
            beyond_overflow: false,
        };
        let rep = &mut *rep;

        // Header cluster.
        refs.inc(rep, 0, cs);

        // Active L1 and its tables, with fragmentation statistics.
        // Taken out while walked (not copied: it may be 32 MiB), put back
        // whatever the walk returns.
        let l1 = core::mem::take(&mut self.l1);
        refs.inc(rep, self.header.l1_table_offset, to_u64(l1.len()) * 8);
        let mut table = Vec::new();
        let walked = self.check_l1(rep, &mut refs, &l1, true, &mut table);
        self.l1 = l1;
        walked?;

        // Snapshots.
        let snaps = self.snapshots().to_vec();
        let table_len = self.snapshot_table_len;
        for s in &snaps {
            if s.l1_table_offset % cs != 0 {
                rep.corruptions += 1;
                rep.note(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    s.id, s.name, s.l1_table_offset
                ));
                continue;
            }
            if u64::from(s.l1_size) * 8 > crate::header::MAX_L1_BYTES {
                rep.corruptions += 1;
                rep.note(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    s.id, s.name, s.l1_size
                ));
                continue;
            }
            // The whole table is counted; its entries are read only as far
            // as the file holds them (beyond it they would read as zeros).
            let bytes = u64::from(s.l1_size) * 8;
            let readable = file_len.saturating_sub(s.l1_table_offset).min(bytes);
            let mut raw = heap::zeroed(readable, "a snapshot's L1 table")?;
            if let Err(e) = self.io.read_at(s.l1_table_offset, &mut raw) {
                rep.check_errors += 1;
                rep.note(format!("ERROR reading snapshot L1 table: {e}"));
                continue;
            }
            let sl1 = heap::entries(&raw, "a snapshot's L1 table")?;
            refs.inc(rep, s.l1_table_offset, bytes);
            self.check_l1(rep, &mut refs, &sl1, false, &mut table)?;
        }
        if self.header.nb_snapshots > 0 {
            refs.inc(rep, self.header.snapshots_offset, table_len);
        }

        // Encryption header and bitmaps.
        if let Some(c) = self.header.crypto {
            refs.inc(rep, c.offset, c.length);
        }
        if let Some(ext) = self.header.bitmaps {
            refs.inc(rep, ext.directory_offset, ext.directory_size);
            for b in self.bitmaps().to_vec() {
                if b.table_offset % cs != 0 {
                    rep.corruptions += 1;
                    rep.note(format!(
                        "ERROR bitmap '{}' table offset {:#x} is not cluster aligned",
                        b.name, b.table_offset
                    ));
                    continue;
                }
                // The whole table is counted; its entries are read (in
                // pieces) only as far as the file holds them.
                let bytes = u64::from(b.table_size) * 8;
                refs.inc(rep, b.table_offset, bytes);
                let readable = file_len.saturating_sub(b.table_offset).min(bytes);
                let mut raw = alloc::vec![0u8; to_usize(readable.min(64 << 10)).unwrap_or(0)];
                let mut done = 0u64;
                while done < readable {
                    let n = to_usize((readable - done).min(to_u64(raw.len()))).unwrap_or(0);
                    self.io
                        .read_at(b.table_offset + done, &mut raw[..n])
                        .map_err(Error::Io)?;
                    for c in raw[..n].chunks_exact(8) {
                        let off = be64(c, 0) & l2::OFFSET_MASK;
                        if off != 0 {
                            refs.inc(rep, off, cs);
                        }
                    }
                    done += to_u64(n);
                }
            }
        }

        // Refcount table and blocks.
        let rt_off = self.header.refcount_table_offset;
        let rt_len = u64::from(self.header.refcount_table_clusters) * cs;
        refs.inc(rep, rt_off, rt_len);
        let mut rt_raw = heap::zeroed(rt_len, "the refcount table")?;
        self.io.read_at(rt_off, &mut rt_raw).map_err(Error::Io)?;
        let rt = heap::entries(&rt_raw, "the refcount table")?;
        drop(rt_raw);
        let mut blocks: Vec<u64> = Vec::with_capacity(rt.len());
        for (i, e) in rt.iter().enumerate() {
            let off = refcount::table_entry_offset(*e);
            if *e & refcount::TABLE_RESERVED != 0 {
                rep.corruptions += 1;
                rep.note(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                blocks.push(0);
                continue;
            }
            if off == 0 {
                blocks.push(0);
                continue;
            }
            if !off.is_multiple_of(cs) {
                rep.corruptions += 1;
                rep.note(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                blocks.push(0);
                continue;
            }
            if off >> cb >= file_clusters {
                rep.corruptions += 1;
                rep.note(format!("ERROR refcount block {i} is outside image"));
                blocks.push(0);
                continue;
            }
            refs.inc(rep, off, cs);
            let n = refs.get(off >> cb);
            if n != 1 {
                // Shared with a structure counted before it.
                rep.corruptions += 1;
                rep.note(format!("ERROR refcount block {i} refcount={n}"));
            }
            blocks.push(off);
        }

        Ok((refs, blocks))
    }

    fn check_l1(
        &mut self,
        rep: &mut Findings<'_>,
        refs: &mut Refs,
        l1: &[u64],
        active: bool,
        table: &mut Vec<u8>,
    ) -> Result<(), Error<R::Error>> {
        let cb = self.header.cluster_bits;
        let cs = 1u64 << cb;
        let fmt = self.fmt;
        let entry_size = fmt.entry_size();
        let mut next_contiguous = 0u64;
        // One cluster buffer for every L1 table walked (a hostile image may
        // list tens of thousands of empty snapshot tables).
        table.resize(to_usize(cs).unwrap_or(0), 0);
        let table = table.as_mut_slice();
        for (i, &e) in l1.iter().enumerate() {
            let l2_off = l2::l1_offset(e);
            if l2_off == 0 {
                continue;
            }
            if l2::l1_reserved(e) != 0 {
                rep.corruptions += 1;
                rep.note(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
            }
            if !l2_off.is_multiple_of(cs) {
                rep.corruptions += 1;
                rep.note(format!(
                    "ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                continue;
            }
            refs.inc(rep, l2_off, cs);
            if let Err(err) = self.io.read_at(l2_off, table) {
                rep.check_errors += 1;
                rep.note(format!(
                    "ERROR reading L2 table at {l2_off:#x} (L1 index {i}): {err}"
                ));
                continue;
            }
            for j in 0..table.len() / entry_size {
                let at = j * entry_size;
                let entry = be64(table, at);
                let bitmap = if fmt.extended { be64(table, at + 8) } else { 0 };
                if l2::l2_reserved(entry, fmt.extended) != 0 {
                    rep.corruptions += 1;
                    rep.note(format!(
                        "ERROR found l2 entry with reserved bits set: {entry:x}"
                    ));
                }
                let sub = match fmt.subcluster(entry, bitmap, 0) {
                    Ok(s) => s,
                    Err(l2::EntryError::Unaligned(off)) => {
                        let holds_data = if fmt.extended {
                            bitmap & l2::ALL_ALLOC != 0
                        } else {
                            entry & l2::ZERO == 0
                        };
                        if holds_data {
                            rep.note(format!(
                                "ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            ));
                        } else {
                            let what = if rep.mend.is_some() {
                                "Repairing"
                            } else {
                                "ERROR"
                            };
                            rep.note(format!(
                                "{what} offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                            ));
                            let bytes = if fmt.extended {
                                let zeros = (bitmap | bitmap << 32) & !l2::ALL_ALLOC;
                                let mut b = alloc::vec![0u8; 16];
                                b[8..].copy_from_slice(&zeros.to_be_bytes());
                                b
                            } else {
                                alloc::vec::Vec::from(l2::ZERO.to_be_bytes())
                            };
                            if let Some(m) = rep.mend.as_mut() {
                                // Rewritten as a plain zero cluster: neither
                                // counted nor referenced any more.
                                m.entries.push((l2_off + to_u64(at), bytes));
                                rep.corruptions_fixed += 1;
                                continue;
                            }
                        }
                        // Counted like QEMU counts it: allocated, and a
                        // reference to the clusters the range touches.
                        rep.corruptions += 1;
                        let place = (cs, active, fmt.data_file);
                        count_host(rep, refs, off, place, &mut next_contiguous);
                        continue;
                    }
                    Err(err) => {
                        rep.corruptions += 1;
                        rep.note(format!(
                            "ERROR invalid cluster entry: {} ({:#x})",
                            err.what(),
                            err.value()
                        ));
                        continue;
                    }
                };
                match sub {
                    Subcluster::Compressed(d) => {
                        if fmt.extended && bitmap != 0 {
                            rep.corruptions += 1;
                            rep.note(format!(
                                "ERROR compressed cluster {d:?} has a non-zero subcluster bitmap {bitmap:x}"
                            ));
                        }
                        if fmt.data_file {
                            rep.corruptions += 1;
                            rep.note(String::from(
                                "ERROR compressed cluster in an image with an external data file",
                            ));
                            continue;
                        }
                        if active {
                            rep.allocated_clusters += 1;
                            rep.compressed_clusters += 1;
                            rep.fragmented_clusters += 1;
                        }
                        let start = d.offset & !511;
                        let end = d.offset.saturating_add(d.size);
                        refs.inc(rep, start, end - start);
                    }
                    Subcluster::Normal { host }
                    | Subcluster::ZeroAlloc { host }
                    | Subcluster::UnallocatedAlloc { host } => {
                        let place = (cs, active, fmt.data_file);
                        count_host(rep, refs, host, place, &mut next_contiguous);
                    }
                    Subcluster::Zero | Subcluster::Unallocated => {}
                }
            }
        }
        Ok(())
    }
}

/// Counts the host cluster at `host` an L2 entry holds: the statistics of
/// the active tables (allocated, fragmented when it does not follow the
/// previous one, `next`) and, without an external data file, a reference.
/// `place` is (cluster size, active table, external data file).
fn count_host(
    rep: &mut Findings<'_>,
    refs: &mut Refs,
    host: u64,
    (cs, active, data_file): (u64, bool, bool),
    next: &mut u64,
) {
    if active {
        rep.allocated_clusters += 1;
        if *next != 0 && host != *next {
            rep.fragmented_clusters += 1;
        }
        *next = host + cs;
    }
    if !data_file {
        refs.inc(rep, host, cs);
    }
}
