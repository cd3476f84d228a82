//! Read-only consistency check: every reference to a host cluster is counted
//! and compared with the on-disk refcounts, as `qemu-img check` does.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::bytes::{be64, to_u64, to_usize};
use crate::error::Error;
use crate::heap;
use crate::image::Image;
use crate::io::BlockRead;
use crate::l2::{self, Subcluster, COPIED};
use crate::refcount;

/// Largest number of host clusters the check tracks (bounds its memory: two
/// bytes per cluster).
pub const MAX_CHECK_CLUSTERS: u64 = 1 << 28;

/// The result of [`Image::check`], with qemu-img's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Metadata errors (refcount too low, misaligned or out-of-file tables, ...).
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Errors that stopped part of the check (I/O errors).
    pub check_errors: u64,
    /// Leaked clusters a repair freed (`qemu-img check -r`).
    pub leaks_fixed: u64,
    /// Corruptions a repair fixed.
    pub corruptions_fixed: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in the active L1 table.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed clusters in the active L1 table.
    pub compressed_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// One line per problem, in qemu-img's wording (at most
    /// [`MAX_CHECK_MESSAGES`]; the counters stay exact).
    pub messages: Vec<String>,
    /// Problems found beyond [`MAX_CHECK_MESSAGES`], not kept as lines.
    pub omitted_messages: u64,
}

/// Most problem lines a [`CheckReport`] keeps (bounds its memory on
/// hostile images; the counters stay exact).
pub const MAX_CHECK_MESSAGES: usize = 10_000;

impl CheckReport {
    /// Records one problem line (or counts it once the cap is reached).
    pub fn note(&mut self, line: String) {
        if self.messages.len() < MAX_CHECK_MESSAGES {
            self.messages.push(line);
        } else {
            self.omitted_messages = self.omitted_messages.saturating_add(1);
        }
    }
}

/// The report being built, and where problem lines go as they are found:
/// into the report (capped) or to the caller of [`Image::check_with`].
pub(crate) struct Findings<'a> {
    report: CheckReport,
    sink: Option<&'a mut dyn FnMut(&str)>,
    /// A repair's first pass (`-r all`): what to rewrite, as QEMU's check
    /// does while it walks.
    pub(crate) mend: Option<Mend>,
}

/// What a repair rewrites that its first check pass found.
#[derive(Debug, Default)]
pub(crate) struct Mend {
    /// L2 entries of preallocated zero clusters with an unaligned host
    /// offset: (file offset of the entry, its new bytes).
    pub(crate) entries: Vec<(u64, Vec<u8>)>,
    /// The snapshot table has entries without the extra data version 3
    /// requires: it is written again.
    pub(crate) snapshot_table: bool,
}

impl<'a> Findings<'a> {
    pub(crate) fn new(report: CheckReport, sink: Option<&'a mut dyn FnMut(&str)>) -> Self {
        Findings {
            report,
            sink,
            mend: None,
        }
    }

    /// Records one problem line: streamed to the sink, or kept (capped).
    pub(crate) fn note(&mut self, line: String) {
        match &mut self.sink {
            Some(sink) => sink(&line),
            None => self.report.note(line),
        }
    }
}

impl core::ops::Deref for Findings<'_> {
    type Target = CheckReport;
    fn deref(&self) -> &CheckReport {
        &self.report
    }
}

impl core::ops::DerefMut for Findings<'_> {
    fn deref_mut(&mut self) -> &mut CheckReport {
        &mut self.report
    }
}

/// References to every host cluster of the file, counted exactly: 16 bits
/// per cluster, larger counts kept aside (any refcount width holds them).
#[derive(Debug)]
pub(crate) struct Refs {
    counts: Vec<u16>,
    big: alloc::collections::BTreeMap<u64, u64>,
    cluster_bits: u32,
    file_len: u64,
    /// The largest refcount the image's refcount width holds.
    max: u64,
    /// Clusters past the end of the file that something references (not
    /// counted: a rebuild must not place new structures on them), at most
    /// [`MAX_BEYOND`]; `beyond_overflow` when there were more.
    pub(crate) beyond: alloc::collections::BTreeSet<u64>,
    pub(crate) beyond_overflow: bool,
}

/// Most clusters past the end of the file a check remembers.
const MAX_BEYOND: usize = 1 << 16;

impl<R: BlockRead> Image<R> {
    /// Checks the image's metadata; reads everything, writes nothing. The
    /// report keeps the first [`MAX_CHECK_MESSAGES`] problem lines.
    pub fn check(&mut self) -> Result<CheckReport, Error<R::Error>> {
        let file_len = self.file_len;
        self.check_file(file_len, None, true)
    }

    /// [`Image::check`], handing each problem line to `on_problem` as it is
    /// found instead of keeping it: memory stays bounded however many
    /// problems a damaged image has, and a host can print them as they
    /// come. The returned report's counters are exact; its `messages` are
    /// empty.
    ///
    /// ```
    /// # use qcowkit_core::{create, CreateOptions, Image, OpenOptions};
    /// let mut disk = Vec::new();
    /// let opts = CreateOptions {
    ///     size: 1 << 20,
    ///     ..CreateOptions::default()
    /// };
    /// create::format(&mut disk, &opts)?;
    /// let mut img = Image::open(disk, &OpenOptions::default())?;
    /// let mut lines = 0;
    /// let report = img.check_with(&mut |_line| lines += 1)?;
    /// assert_eq!((report.corruptions, report.leaks, lines), (0, 0, 0));
    /// # Ok::<(), Box<dyn core::error::Error>>(())
    /// ```
    pub fn check_with(
        &mut self,
        on_problem: &mut dyn FnMut(&str),
    ) -> Result<CheckReport, Error<R::Error>> {
        let file_len = self.file_len;
        self.check_file(file_len, Some(on_problem), true)
    }

    /// [`Image::check`] of a file at least `file_len` bytes long (a writer
    /// may have allocated beyond the length seen at open).
    /// `copied`: also compare the COPIED flags with the refcounts (a
    /// repair does that itself, after fixing the refcounts).
    pub(crate) fn check_file(
        &mut self,
        file_len: u64,
        sink: Option<&mut dyn FnMut(&str)>,
        copied: bool,
    ) -> Result<CheckReport, Error<R::Error>> {
        self.check_file_mending(file_len, sink, copied, None)
    }

    /// [`Image::check_file`] that, given `mend`, collects the L2 entries a
    /// repair rewrites (see [`Findings::mend`]), saying `Repairing` for
    /// them and counting neither them nor their reference.
    pub(crate) fn check_file_mending(
        &mut self,
        file_len: u64,
        sink: Option<&mut dyn FnMut(&str)>,
        copied: bool,
        mend: Option<&mut Mend>,
    ) -> Result<CheckReport, Error<R::Error>> {
        let cb = self.header.cluster_bits;
        let cs = 1u64 << cb;
        let report = CheckReport {
            total_clusters: self.header.size.div_ceil(cs),
            ..CheckReport::default()
        };
        let mut rep = Findings::new(report, sink);
        if mend.is_some() {
            rep.mend = Some(Mend::default());
        }
        // Version 3 snapshot entries carry at least the VM state size and
        // the disk size (checked first, as QEMU reads the table first).
        if self.header.version >= 3 {
            for (i, sn) in self.snapshots.iter().enumerate() {
                if sn.disk_size.is_none() {
                    let what = if rep.mend.is_some() {
                        "Repairing"
                    } else {
                        "ERROR"
                    };
                    rep.note(format!("{what} snapshot table entry {i} is incomplete"));
                    match rep.mend.as_mut() {
                        Some(m) => {
                            m.snapshot_table = true;
                            rep.corruptions_fixed += 1;
                        }
                        None => rep.corruptions += 1,
                    }
                }
            }
        }
        let walked = self.walk_references(&mut rep, file_len);
        if let (Some(out), Some(found)) = (mend, rep.mend.take()) {
            *out = found;
        }
        let (refs, blocks) = walked?;
        let file_clusters = refs.file_clusters();

        // Compare references with refcounts.
        let mut disk_rc = OnDiskRefcounts::new(&self.header, blocks);
        let mut highest: Option<u64> = None;
        for i in 0..file_clusters {
            let on_disk = disk_rc.get(&mut self.io, i).map_err(Error::Io)?;
            let computed = refs.get(i);
            if on_disk > 0 || computed > 0 {
                highest = Some(i);
            }
            if on_disk != computed {
                let kind = if on_disk < computed {
                    "ERROR"
                } else {
                    "Leaked"
                };
                rep.note(format!(
                    "{kind} cluster {i} refcount={on_disk} reference={computed}"
                ));
                if on_disk < computed {
                    rep.corruptions += 1;
                } else {
                    rep.leaks += 1;
                }
            }
        }
        rep.image_end_offset = highest.map_or(0, |h| (h + 1) << cb);

        // COPIED flags of the active tables against on-disk refcounts.
        if copied {
            self.check_copied(&mut rep, &mut disk_rc)?;
        }
        Ok(rep.report)
    }

    /// Counts the references to every host cluster (used to rebuild the
    /// refcounts of a dirty image).
    /// `file_len` is the end of the file as the caller knows it (a writer
    /// may have allocated past the length seen at open).
    pub(crate) fn count_references(&mut self, file_len: u64) -> Result<Refs, Error<R::Error>> {
        let mut rep = Findings::new(CheckReport::default(), None);
        let (refs, _) = self.walk_references(&mut rep, file_len)?;
        Ok(refs)
    }

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

    fn check_copied(
        &mut self,
        rep: &mut Findings<'_>,
        disk_rc: &mut OnDiskRefcounts,
    ) -> Result<(), Error<R::Error>> {
        let cb = self.header.cluster_bits;
        let cs = 1u64 << cb;
        let mut refcount_of =
            |io: &mut R, off: u64| -> Result<u64, R::Error> { disk_rc.get(io, off >> cb) };
        let fmt = self.fmt;
        let mut table = alloc::vec![0u8; to_usize(cs).unwrap_or(0)];
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let l2_off = l2::l1_offset(e);
            if l2_off == 0 || !l2_off.is_multiple_of(cs) {
                continue;
            }
            let rc = refcount_of(&mut self.io, l2_off).map_err(Error::Io)?;
            if (rc == 1) != (e & COPIED != 0) {
                rep.corruptions += 1;
                rep.note(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                ));
            }
            self.io.read_at(l2_off, &mut table).map_err(Error::Io)?;
            if fmt.data_file {
                continue;
            }
            for j in 0..table.len() / fmt.entry_size() {
                let (entry, Some(host)) = fmt.host_cluster_at(&table, j) else {
                    continue;
                };
                let rc = refcount_of(&mut self.io, host).map_err(Error::Io)?;
                if (rc == 1) != (entry & COPIED != 0) {
                    rep.corruptions += 1;
                    rep.note(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                    ));
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

/// On-disk refcounts read through the refcount blocks the check validated
/// (0 for missing or invalid ones), one block buffered at a time.
pub(crate) struct OnDiskRefcounts {
    blocks: Vec<u64>,
    buf: Vec<u8>,
    loaded: Option<usize>,
    order: u32,
    per_block: u64,
}

impl OnDiskRefcounts {
    pub(crate) fn new(h: &crate::header::Header, blocks: Vec<u64>) -> Self {
        OnDiskRefcounts {
            blocks,
            buf: alloc::vec![0u8; to_usize(h.cluster_size()).unwrap_or(0)],
            loaded: None,
            order: h.refcount_order,
            per_block: refcount::block_entries(h.cluster_bits, h.refcount_order),
        }
    }

    /// The refcount of host cluster `cluster`.
    pub(crate) fn get<R: BlockRead>(&mut self, io: &mut R, cluster: u64) -> Result<u64, R::Error> {
        let bi = to_usize(cluster / self.per_block).unwrap_or(usize::MAX);
        match self.blocks.get(bi) {
            Some(&b) if b != 0 => {
                if self.loaded != Some(bi) {
                    io.read_at(b, &mut self.buf)?;
                    self.loaded = Some(bi);
                }
                Ok(refcount::get(
                    &self.buf,
                    self.order,
                    cluster % self.per_block,
                ))
            }
            _ => Ok(0),
        }
    }
}

impl Refs {
    /// Number of clusters counted.
    pub(crate) fn clusters(&self) -> u64 {
        to_u64(self.counts.len())
    }

    /// Clusters whose refcounts are compared: the file's, and the slot
    /// past its last cluster only when something references it (QEMU
    /// grows its table only then).
    pub(crate) fn file_clusters(&self) -> u64 {
        let n = to_u64(self.counts.len());
        if n > 0 && self.get(n - 1) == 0 {
            n - 1
        } else {
            n
        }
    }

    /// The references to cluster `c`.
    pub(crate) fn get(&self, c: u64) -> u64 {
        match self.big.get(&c) {
            Some(n) => *n,
            None => to_usize(c)
                .and_then(|i| self.counts.get(i))
                .map_or(0, |n| u64::from(*n)),
        }
    }

    /// Counts one reference to every cluster overlapping `[offset, offset + len)`.
    fn inc(&mut self, rep: &mut Findings<'_>, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = offset.saturating_add(len);
        if end.saturating_sub(self.file_len) >= 1u64 << self.cluster_bits {
            rep.corruptions += 1;
            rep.note(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {len:#x}"
            ));
            let (first, last) = (offset >> self.cluster_bits, (end - 1) >> self.cluster_bits);
            for c in first..=last {
                if self.beyond.len() >= MAX_BEYOND {
                    self.beyond_overflow = true;
                    break;
                }
                self.beyond.insert(c);
            }
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (end - 1) >> self.cluster_bits;
        for c in first..=last {
            if self.get(c) >= self.max {
                // QEMU's wording: the width cannot hold another reference.
                rep.corruptions += 1;
                rep.note(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    c << self.cluster_bits
                ));
                rep.note(String::from(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing",
                ));
                continue;
            }
            match to_usize(c).and_then(|i| self.counts.get_mut(i)) {
                Some(n) if *n == u16::MAX => {
                    *self.big.entry(c).or_insert(u64::from(u16::MAX)) += 1;
                }
                Some(n) => *n += 1,
                None => {
                    rep.corruptions += 1;
                    rep.note(format!(
                        "ERROR cluster {c} (offset {:#x}) is beyond the end of the image file",
                        c << self.cluster_bits
                    ));
                    // One message per out-of-file range is enough.
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_count_past_16_bits() {
        let mut refs = Refs {
            counts: alloc::vec![0u16; 4],
            big: alloc::collections::BTreeMap::new(),
            cluster_bits: 9,
            file_len: 2048,
            max: u64::MAX,
            beyond: alloc::collections::BTreeSet::new(),
            beyond_overflow: false,
        };
        let mut rep = Findings::new(CheckReport::default(), None);
        for _ in 0..70_000 {
            refs.inc(&mut rep, 512, 512);
        }
        refs.inc(&mut rep, 0, 1024);
        assert_eq!((refs.get(0), refs.get(1), refs.get(2)), (1, 70_001, 0));
        assert_eq!(rep.corruptions, 0);
    }
}
