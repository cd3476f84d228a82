//! Repair, as `qemu-img check -r leaks|all` does it: refcounts set to the
//! references the metadata holds, a refcount structure that cannot be
//! trusted rebuilt beside the old one, COPIED flags made to match the
//! refcounts, and the corrupt and dirty bits cleared once nothing is left
//! to fix. Guest data and tables are never rewritten except for those
//! flags, so a repair keeps every byte the image holds.
//!
//! Crash safety: refcounts are raised before anything relies on them and
//! lowered only for clusters nothing references; a rebuilt structure is
//! written in free space past the end of the file and switched to with one
//! header write, so a crash leaves either the old structure or the new one.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::vec::Vec;

use crate::bytes::{put64, to_u64, to_usize};
use crate::check::{CheckReport, Findings, Mend, OnDiskRefcounts, Refs};
use crate::error::Error;
use crate::header::incompat;
use crate::heap;
use crate::image::Res;
use crate::io::BlockWrite;
use crate::l2::{self, COPIED};
use crate::overlap;
use crate::rctable::Refcounts;
use crate::refcount;
use crate::writable::{metadata_of, WritableImage};

/// What [`WritableImage::repair`] may fix (`qemu-img check -r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// `-r leaks`: refcounts higher than the references are lowered (and
    /// COPIED flags fixed when nothing else is wrong). An image whose
    /// refcount structure must be rebuilt is refused
    /// ([`Error::NeedsRebuild`]).
    Leaks,
    /// `-r all`: also refcounts that are too low are raised, COPIED flags
    /// fixed, and a broken refcount structure rebuilt.
    All,
}

/// What [`WritableImage::repair`] found and left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// The check before repairing.
    pub found: CheckReport,
    /// The check after repairing (`found` itself when nothing needed
    /// fixing), with `leaks_fixed` and `corruptions_fixed` set to what
    /// the repair removed.
    pub left: CheckReport,
    /// Whether the refcount structure was rebuilt.
    pub rebuilt: bool,
}

impl<R: BlockWrite> WritableImage<R> {
    /// Repairs the image (open it with [`WritableImage::for_repair`]):
    /// checks it, fixes what `mode` allows, and checks it again. Every
    /// problem and repair line goes to `on_problem` as it is found, in
    /// qemu-img's wording (the problems of both checks, and `Repairing ...`
    /// lines between them).
    pub fn repair(
        &mut self,
        mode: RepairMode,
        on_problem: &mut dyn FnMut(&str),
    ) -> Res<RepairReport, R> {
        self.flush()?;
        // References against refcounts; the COPIED flags come after the
        // refcounts are fixed (a wrong refcount makes its flag look wrong).
        let mut mend = Mend::default();
        let found = self.img.check_file_mending(
            self.file_len(),
            Some(&mut *on_problem),
            false,
            (mode == RepairMode::All).then_some(&mut mend),
        )?;
        // What QEMU's repair rewrites while it checks: L2 entries, and the
        // snapshot table with every entry's extra data complete.
        let cs = self.cluster_size();
        for (at, bytes) in &mend.entries {
            self.put(*at, bytes, overlap::ACTIVE_L2 | overlap::INACTIVE_L2)?;
            self.img.l2_cache.forget(at - at % cs);
        }
        if !mend.entries.is_empty() {
            self.img.io.flush().map_err(Error::Io)?;
        }
        if mend.snapshot_table {
            let size = self.img.header.size;
            let mut snapshots = self.img.snapshots.clone();
            for sn in &mut snapshots {
                sn.disk_size.get_or_insert(size);
            }
            self.write_snapshot_table(snapshots)?;
        }
        let mut rebuilt = false;
        let (mut leaks_fixed, mut corruptions_fixed) = (0u64, found.corruptions_fixed);
        let mut too_low_left = false;
        let mut now_one = BTreeSet::new();
        // (Rewriting something may uncover clusters past the old end of the
        // file that a crash left counted: compared again then too.)
        let rewrote = mend.snapshot_table || !mend.entries.is_empty();
        if found.corruptions + found.leaks > 0 || rewrote {
            let mut quiet = |_: &str| {};
            let mut walk = Findings::new(CheckReport::default(), Some(&mut quiet));
            let (refs, blocks) = self.img.walk_references(&mut walk, self.file_len())?;
            drop(walk);
            if self.needs_rebuild(&refs, &blocks)? {
                if mode == RepairMode::Leaks {
                    on_problem("ERROR need to rebuild refcount structures");
                    return Err(Error::NeedsRebuild);
                }
                on_problem("Rebuilding refcount structure");
                self.rebuild_structure(&refs, &blocks)?;
                rebuilt = true;
                drop(refs);
                // What the new structure fixed: what a count now misses.
                // The walk's own problems are reported again, as QEMU's
                // count after a rebuild reports them.
                let mut walk = Findings::new(CheckReport::default(), Some(&mut *on_problem));
                self.img.walk_references(&mut walk, self.file_len())?;
                drop(walk);
                let mut quiet = |_: &str| {};
                let after = self
                    .img
                    .check_file(self.file_len(), Some(&mut quiet), false)?;
                leaks_fixed += found.leaks.saturating_sub(after.leaks);
                corruptions_fixed += found.corruptions.saturating_sub(after.corruptions);
                too_low_left = after.corruptions > 0;
            } else {
                let (lowered, raised, low) =
                    self.fix_refcounts(mode, &refs, blocks, &mut now_one, on_problem)?;
                leaks_fixed += lowered;
                corruptions_fixed += raised;
                too_low_left = low;
            }
        }
        // COPIED flags: with `-r leaks` only when nothing else is wrong, as
        // QEMU does, and always those of clusters this repair lowered to
        // one reference (left alone, the repair would have made them wrong).
        let fix_flags = mode == RepairMode::All
            || (!too_low_left && found.check_errors == 0 && found.corruptions == 0);
        let (flags, flags_fixed) = self.fix_copied(fix_flags, &now_one, on_problem)?;
        corruptions_fixed += flags_fixed;
        let flags = flags - flags_fixed;
        self.flush()?;
        let mut left = if leaks_fixed + corruptions_fixed > 0 {
            self.img
                .check_file(self.file_len(), Some(&mut *on_problem), true)?
        } else {
            let mut same = found.clone();
            same.corruptions += flags;
            same
        };
        left.leaks_fixed = leaks_fixed;
        left.corruptions_fixed = corruptions_fixed;
        // Nothing left that a writer must be kept from: the image is usable.
        let bits = incompat::CORRUPT | incompat::DIRTY;
        if left.corruptions == 0
            && left.check_errors == 0
            && self.img.header.incompatible_features & bits != 0
        {
            self.img.header.incompatible_features &= !bits;
            self.write_header_fields()?;
        }
        Ok(RepairReport {
            found,
            left,
            rebuilt,
        })
    }

    /// The end of the file as the writer knows it.
    fn file_len(&self) -> u64 {
        self.file_end.max(self.img.file_len)
    }

    /// Whether the refcount structure cannot be fixed in place (QEMU's
    /// rule): a refcount table entry with reserved bits, unaligned or past
    /// the file, a refcount block shared with anything else, or a cluster
    /// in use whose refcount reads 0 (its block may be missing or wrong).
    fn needs_rebuild(&mut self, refs: &Refs, blocks: &[u64]) -> Res<bool, R> {
        let cb = self.img.header.cluster_bits;
        for (i, &e) in self.refcounts.table.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let block = blocks.get(i).copied().unwrap_or(0);
            if e & refcount::TABLE_RESERVED != 0 || block == 0 || refs.get(block >> cb) != 1 {
                return Ok(true);
            }
        }
        let mut disk = OnDiskRefcounts::new(&self.img.header, blocks.to_vec());
        for c in 0..refs.file_clusters() {
            if refs.get(c) > 0 && disk.get(&mut self.img.io, c).map_err(Error::Io)? == 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Sets every refcount that differs from the references: lowered in
    /// both modes, raised with [`RepairMode::All`]. Returns how many were
    /// lowered and raised, and whether a refcount too low was left.
    fn fix_refcounts(
        &mut self,
        mode: RepairMode,
        refs: &Refs,
        blocks: Vec<u64>,
        now_one: &mut BTreeSet<u64>,
        on_problem: &mut dyn FnMut(&str),
    ) -> Res<(u64, u64, bool), R> {
        let max = refcount::max_refcount(self.img.header.refcount_order);
        let mut disk = OnDiskRefcounts::new(&self.img.header, blocks);
        let (mut lowered, mut raised, mut too_low_left) = (0u64, 0u64, false);
        for c in 0..refs.file_clusters() {
            let have = disk.get(&mut self.img.io, c).map_err(Error::Io)?;
            let want = refs.get(c);
            if have == want {
                continue;
            }
            let fix = have > want || (mode == RepairMode::All && want <= max);
            if !fix {
                on_problem(&format!(
                    "ERROR cluster {c} refcount={have} reference={want}"
                ));
                too_low_left = true;
                continue;
            }
            on_problem(&format!(
                "Repairing cluster {c} refcount={have} reference={want}"
            ));
            let delta =
                i64::try_from(want).unwrap_or(i64::MAX) - i64::try_from(have).unwrap_or(i64::MAX);
            self.change_refcount(c, delta)?;
            if have > want {
                lowered += 1;
                if want == 1 {
                    now_one.insert(c);
                }
            } else {
                raised += 1;
            }
            // Bounded memory: changed blocks go out as the cache fills.
            if self.refcounts.blocks.over_capacity() {
                self.write_refcounts()?;
            }
        }
        if lowered + raised > 0 {
            self.write_refcounts()?;
        }
        Ok((lowered, raised, too_low_left))
    }

    /// Counts the COPIED flags of the active L1 and L2 tables that do not
    /// match the refcounts (set exactly when the refcount is 1), each
    /// reported, and corrects them (written at the next flush, after the
    /// refcounts) when `fix`, or when their cluster is in `now_one`.
    /// Snapshot tables are left alone, as QEMU does. Returns how many were
    /// wrong and how many of those were corrected.
    fn fix_copied(
        &mut self,
        fix: bool,
        now_one: &BTreeSet<u64>,
        on_problem: &mut dyn FnMut(&str),
    ) -> Res<(u64, u64), R> {
        let cs = self.cluster_size();
        let fmt = self.img.fmt;
        let (mut wrong, mut fixed) = (0u64, 0u64);
        // One buffer for every table (a hostile L1 may name one table many
        // times).
        let mut table: Vec<u8> = Vec::new();
        let mut flips = Vec::new();
        for i in 0..self.img.l1.len() {
            let e = self.img.l1[i];
            let l2_off = l2::l1_offset(e);
            if l2_off == 0 || !l2_off.is_multiple_of(cs) || l2_off >= self.file_len() {
                continue;
            }
            let rc = self.refcount(l2_off / cs)?;
            if (rc == 1) != (e & COPIED != 0) {
                wrong += 1;
                let mend = fix || now_one.contains(&(l2_off / cs));
                let what = if mend { "Repairing" } else { "ERROR" };
                on_problem(&format!(
                    "{what} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                ));
                if mend {
                    self.img.l1[i] = if rc == 1 { e | COPIED } else { e & !COPIED };
                    self.dirty_l1.insert(i);
                    fixed += 1;
                }
            }
            if fmt.data_file {
                continue;
            }
            // The entries of the table that disagree with their refcounts.
            self.copied_mismatches(l2_off, &mut table, &mut flips)?;
            flips.retain(|f| {
                let mend = fix || now_one.contains(&((f.entry & l2::OFFSET_MASK) / cs));
                let what = if mend { "Repairing" } else { "ERROR" };
                on_problem(&format!(
                    "{what} OFLAG_COPIED data cluster: l2_entry={:x} refcount={}",
                    f.entry, f.refcount
                ));
                wrong += 1;
                mend
            });
            fixed += to_u64(flips.len());
            if !flips.is_empty() {
                self.correct_copied(l2_off, &flips)?;
            }
        }
        Ok((wrong, fixed))
    }

    /// Writes a new refcount structure holding exactly the references
    /// counted in `refs` (less the old structure's own clusters), in free
    /// space past the end of the file, and switches the header to it.
    fn rebuild_structure(&mut self, refs: &Refs, blocks: &[u64]) -> Res<(), R> {
        let order = self.img.header.refcount_order;
        self.rebuild_structure_with(refs, blocks, order)
    }

    /// [`WritableImage::rebuild_structure`] with refcounts of
    /// `2^order` bits (the header's width changes with the switch, in the
    /// same write).
    pub(crate) fn rebuild_structure_with(
        &mut self,
        refs: &Refs,
        blocks: &[u64],
        order: u32,
    ) -> Res<(), R> {
        let h = self.img.header.clone();
        let cb = h.cluster_bits;
        let cs = 1u64 << cb;
        let per_block = refcount::block_entries(cb, order);
        let max = refcount::max_refcount(order);
        // The old table and blocks lose their references with the switch.
        let old_table = h.refcount_table_offset >> cb
            ..(h.refcount_table_offset >> cb) + u64::from(h.refcount_table_clusters);
        let mut old_blocks: alloc::collections::BTreeMap<u64, u64> =
            alloc::collections::BTreeMap::new();
        for &b in blocks.iter().filter(|&&b| b != 0) {
            *old_blocks.entry(b >> cb).or_insert(0) += 1;
        }
        let count = |c: u64| {
            let own = u64::from(old_table.contains(&c)) + old_blocks.get(&c).copied().unwrap_or(0);
            refs.get(c).saturating_sub(own).min(max)
        };
        // New blocks and table start past everything in use and the file.
        let used = (0..refs.clusters())
            .rev()
            .find(|&c| count(c) > 0)
            .map_or(0, |c| c + 1);
        // Clusters past the end of the file that tables point at are not
        // free: guest reads there would see the new structure.
        if refs.beyond_overflow {
            return Err(Error::Unsupported(
                "too many references past the end of the file to place a new refcount structure",
            ));
        }
        let mut start = used.max(self.file_len().div_ceil(cs));
        let (mut nb, mut nt) = (1u64, 1u64);
        loop {
            let end = start + nb + nt;
            let b = end.div_ceil(per_block);
            let t = (b * 8).div_ceil(cs);
            if let Some(&taken) = refs.beyond.range(start..start + b + t).next_back() {
                start = taken + 1;
                continue;
            }
            if (b, t) == (nb, nt) {
                break;
            }
            (nb, nt) = (b, t);
        }
        let new_end = start + nb + nt;
        if nt * cs > crate::header::MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::Unsupported("refcount table needed is too large"));
        }
        let mut block = heap::zeroed(cs, "a refcount block")?;
        for k in 0..nb {
            block.fill(0);
            for idx in 0..per_block {
                let c = k * per_block + idx;
                let v = if c < start {
                    count(c)
                } else {
                    u64::from(c < new_end)
                };
                refcount::set(&mut block, order, idx, v);
            }
            self.put((start + k) * cs, &block, overlap::REFCOUNT_BLOCK)?;
        }
        let mut table = heap::zeroed(nt * cs, "the refcount table")?;
        for k in 0..nb {
            put64(&mut table, to_usize(k * 8).unwrap_or(0), (start + k) * cs);
        }
        self.put((start + nb) * cs, &table, overlap::REFCOUNT_TABLE)?;
        self.img.io.flush().map_err(Error::Io)?;
        // The switch: one header write.
        let mut switched = h;
        switched.refcount_table_offset = (start + nb) * cs;
        switched.refcount_table_clusters =
            u32::try_from(nt).map_err(|_| Error::Internal("refcount table size"))?;
        if order == switched.refcount_order {
            let (at, fields) = switched.encode_refcount_table_fields();
            self.put(at, &fields, overlap::HEADER)?;
        } else {
            // The table's offset and size and the width are apart in the
            // header: one write of everything between them.
            switched.refcount_order = order;
            let fixed = switched.encode_fixed();
            self.put(48, &fixed[48..100], overlap::HEADER)?;
        }
        self.img.io.flush().map_err(Error::Io)?;
        self.img.header = switched;
        self.file_end = self.file_end.max(new_end * cs);
        self.img.file_len = self.img.file_len.max(new_end * cs);
        self.refcounts = Refcounts::load(
            &mut self.img.io,
            &self.img.header,
            self.img.refcount_cache_blocks,
        )?;
        self.metadata = metadata_of(&mut self.img, &self.refcounts)?;
        self.free_hint = 0;
        Ok(())
    }
}
