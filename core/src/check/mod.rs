//! Read-only consistency check: every reference to a host cluster is counted
//! and compared with the on-disk refcounts, as `qemu-img check` does.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::error::Error;
use crate::image::Image;
use crate::io::BlockRead;

// Walking the metadata lives in `walk`, the reference counts and the
// on-disk refcounts they are compared with in `refs`, the COPIED flags'
// check in `copied`.
mod copied;
mod refs;
mod walk;

pub(crate) use refs::{OnDiskRefcounts, Refs};

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
}
