//! The host-file layout of an image: what each cluster of the file holds
//! (header, tables, refcount structure, snapshot and bitmap metadata, guest
//! data, or nothing), as runs, for pictures of where things sit and how
//! fragmented the file is. A read-only walk of the metadata.

use alloc::vec::Vec;

use crate::bytes::{be64, to_u64, to_usize};
use crate::error::Error;
use crate::heap;
use crate::image::{Image, Res};
use crate::io::BlockRead;
use crate::l2::{self, Subcluster};
use crate::rctable::Refcounts;
use crate::refcount;

/// What a cluster of the image file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum HostUse {
    /// Nothing refers to it and its refcount is 0 (or it has none).
    Free = 0,
    /// The header (and its extensions, backing file name).
    Header,
    /// The active L1 table.
    L1,
    /// An L2 table of the active L1 table.
    L2,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    SnapshotL1,
    /// An L2 table only snapshots use.
    SnapshotL2,
    /// Bitmap directory, tables or data.
    Bitmap,
    /// The encryption header.
    CryptoHeader,
    /// Guest data (or preallocated zeros).
    Data,
    /// Compressed guest data.
    Compressed,
    /// Its refcount says in use, but nothing refers to it (leaked).
    Leaked,
}

impl HostUse {
    /// A short name for the kind ("header", "l1", "l2", "refcount-table",
    /// "refcount-block", "snapshot-table", "snapshot-l1", "snapshot-l2",
    /// "bitmap", "crypto-header", "data", "compressed", "leaked", "free").
    pub fn name(self) -> &'static str {
        match self {
            HostUse::Free => "free",
            HostUse::Header => "header",
            HostUse::L1 => "l1",
            HostUse::L2 => "l2",
            HostUse::RefcountTable => "refcount-table",
            HostUse::RefcountBlock => "refcount-block",
            HostUse::SnapshotTable => "snapshot-table",
            HostUse::SnapshotL1 => "snapshot-l1",
            HostUse::SnapshotL2 => "snapshot-l2",
            HostUse::Bitmap => "bitmap",
            HostUse::CryptoHeader => "crypto-header",
            HostUse::Data => "data",
            HostUse::Compressed => "compressed",
            HostUse::Leaked => "leaked",
        }
    }

    /// Priority when two uses claim one cluster (metadata wins over data,
    /// which wins over nothing).
    fn rank(self) -> u8 {
        match self {
            HostUse::Free => 0,
            HostUse::Leaked => 1,
            HostUse::Data | HostUse::Compressed => 2,
            _ => 3,
        }
    }
}

/// A run of clusters of the file with one use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRun {
    /// Offset in the file.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the clusters hold.
    pub kind: HostUse,
}

/// One use per cluster of the file.
struct Uses {
    kinds: Vec<u8>,
    cluster_bits: u32,
}

impl Uses {
    fn mark(&mut self, offset: u64, len: u64, kind: HostUse) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset.saturating_add(len) - 1) >> self.cluster_bits;
        for c in first..=last {
            let Some(k) = to_usize(c).and_then(|i| self.kinds.get_mut(i)) else {
                return;
            };
            if kind.rank() >= from_u8(*k).rank() {
                *k = kind as u8;
            }
        }
    }
}

fn from_u8(k: u8) -> HostUse {
    const ALL: [HostUse; 14] = [
        HostUse::Free,
        HostUse::Header,
        HostUse::L1,
        HostUse::L2,
        HostUse::RefcountTable,
        HostUse::RefcountBlock,
        HostUse::SnapshotTable,
        HostUse::SnapshotL1,
        HostUse::SnapshotL2,
        HostUse::Bitmap,
        HostUse::CryptoHeader,
        HostUse::Data,
        HostUse::Compressed,
        HostUse::Leaked,
    ];
    ALL.get(usize::from(k)).copied().unwrap_or(HostUse::Free)
}

/// Most clusters of a file the layout is computed for (one byte each).
pub const MAX_LAYOUT_CLUSTERS: u64 = 64 << 20;

impl<R: BlockRead> Image<R> {
    /// What each cluster of the image file holds, as runs in file order
    /// covering the whole file. Pointers outside the file or unaligned
    /// are skipped (a check reports them). Refused for files of more than
    /// [`MAX_LAYOUT_CLUSTERS`] clusters (one byte per cluster is kept).
    pub fn host_layout(&mut self) -> Res<Vec<HostRun>, R> {
        let cb = self.header.cluster_bits;
        let cs = 1u64 << cb;
        let file_len = self.io.len().map_err(Error::Io)?;
        let clusters = file_len.div_ceil(cs);
        if clusters > MAX_LAYOUT_CLUSTERS {
            return Err(Error::Unsupported("file too large for a layout"));
        }
        let mut uses = Uses {
            kinds: heap::zeroed(clusters, "the host layout")?,
            cluster_bits: cb,
        };
        let h = self.header.clone();
        uses.mark(0, cs, HostUse::Header);
        let ok = |off: u64| off != 0 && off.is_multiple_of(cs) && off < file_len;

        // Snapshots first: a table the active L1 shares with a snapshot is
        // then marked again as the active layer's.
        if h.nb_snapshots > 0 {
            uses.mark(
                h.snapshots_offset,
                self.snapshot_table_len,
                HostUse::SnapshotTable,
            );
        }
        for i in 0..self.snapshots.len() {
            let s = &self.snapshots[i];
            uses.mark(
                s.l1_table_offset,
                u64::from(s.l1_size) * 8,
                HostUse::SnapshotL1,
            );
            if let Ok(sl1) = self.snapshot_l1(i, file_len) {
                self.mark_tables(&mut uses, &sl1, HostUse::SnapshotL2, file_len)?;
            }
        }
        // Active tables and their data.
        let l1 = self.l1.clone();
        uses.mark(h.l1_table_offset, u64::from(h.l1_size) * 8, HostUse::L1);
        self.mark_tables(&mut uses, &l1, HostUse::L2, file_len)?;
        // Refcount structure.
        let rt_len = u64::from(h.refcount_table_clusters) * cs;
        uses.mark(h.refcount_table_offset, rt_len, HostUse::RefcountTable);
        let mut rc = Refcounts::load(&mut self.io, &h, 4)?;
        for i in 0..to_u64(rc.table.len()) {
            let b = refcount::table_entry_offset(rc.entry(i));
            if ok(b) {
                uses.mark(b, cs, HostUse::RefcountBlock);
            }
        }
        // Bitmaps and encryption header.
        if let Some(ext) = h.bitmaps {
            uses.mark(ext.directory_offset, ext.directory_size, HostUse::Bitmap);
            for b in self.bitmaps.clone() {
                let bytes = u64::from(b.table_size) * 8;
                if !ok(b.table_offset) || b.table_offset.saturating_add(bytes) > file_len {
                    continue;
                }
                uses.mark(b.table_offset, bytes, HostUse::Bitmap);
                let mut raw = heap::zeroed(bytes, "a bitmap table")?;
                self.io
                    .read_at(b.table_offset, &mut raw)
                    .map_err(Error::Io)?;
                for c in raw.chunks_exact(8) {
                    let off = be64(c, 0) & 0x00ff_ffff_ffff_fe00;
                    if ok(off) {
                        uses.mark(off, cs, HostUse::Bitmap);
                    }
                }
            }
        }
        if let Some(c) = h.crypto {
            uses.mark(c.offset, c.length, HostUse::CryptoHeader);
        }
        // What nothing refers to: free, or leaked when its refcount says
        // otherwise.
        for c in 0..clusters {
            let i = to_usize(c).unwrap_or(usize::MAX);
            if uses.kinds.get(i) == Some(&(HostUse::Free as u8))
                && rc.get(&mut self.io, c).unwrap_or(0) > 0
            {
                uses.kinds[i] = HostUse::Leaked as u8;
            }
        }
        // Runs.
        let mut runs: Vec<HostRun> = Vec::new();
        for (i, &k) in uses.kinds.iter().enumerate() {
            let kind = from_u8(k);
            let start = to_u64(i) << cb;
            let len = cs.min(file_len - start);
            match runs.last_mut() {
                Some(r) if r.kind == kind && r.start + r.len == start => r.len += len,
                _ => runs.push(HostRun { start, len, kind }),
            }
        }
        Ok(runs)
    }

    /// Marks the L2 tables of `l1` as `table_kind` and the clusters their
    /// entries hold as data or compressed data.
    fn mark_tables(
        &mut self,
        uses: &mut Uses,
        l1: &[u64],
        table_kind: HostUse,
        file_len: u64,
    ) -> Res<(), R> {
        let cs = self.cluster_size();
        let fmt = self.fmt;
        let mut table = heap::zeroed(cs, "an L2 table")?;
        let mut seen = alloc::collections::BTreeSet::new();
        for &e in l1 {
            let t = l2::l1_offset(e);
            if t == 0 || !t.is_multiple_of(cs) || t.saturating_add(cs) > file_len || !seen.insert(t)
            {
                continue;
            }
            uses.mark(t, cs, table_kind);
            self.io.read_at(t, &mut table).map_err(Error::Io)?;
            for j in 0..table.len() / fmt.entry_size() {
                let at = j * fmt.entry_size();
                let entry = be64(&table, at);
                let bitmap = if fmt.extended {
                    be64(&table, at + 8)
                } else {
                    0
                };
                match fmt.subcluster(entry, bitmap, 0) {
                    Ok(Subcluster::Compressed(d)) => {
                        let start = d.offset & !511;
                        uses.mark(
                            start,
                            d.offset.saturating_add(d.size) - start,
                            HostUse::Compressed,
                        );
                    }
                    Ok(_) if fmt.data_file => {}
                    Ok(Subcluster::Normal { host })
                    | Ok(Subcluster::ZeroAlloc { host })
                    | Ok(Subcluster::UnallocatedAlloc { host }) => {
                        uses.mark(host, cs, HostUse::Data);
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}
