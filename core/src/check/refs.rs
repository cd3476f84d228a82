//! The references counted to every host cluster, and the on-disk
//! refcounts they are compared with.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::bytes::{to_u64, to_usize};
use crate::io::BlockRead;
use crate::refcount;

use super::Findings;

/// References to every host cluster of the file, counted exactly: 16 bits
/// per cluster, larger counts kept aside (any refcount width holds them).
#[derive(Debug)]
pub(crate) struct Refs {
    pub(super) counts: Vec<u16>,
    pub(super) big: alloc::collections::BTreeMap<u64, u64>,
    pub(super) cluster_bits: u32,
    pub(super) file_len: u64,
    /// The largest refcount the image's refcount width holds.
    pub(super) max: u64,
    /// Clusters past the end of the file that something references (not
    /// counted: a rebuild must not place new structures on them), at most
    /// [`MAX_BEYOND`]; `beyond_overflow` when there were more.
    pub(crate) beyond: alloc::collections::BTreeSet<u64>,
    pub(crate) beyond_overflow: bool,
}

/// Most clusters past the end of the file a check remembers.
const MAX_BEYOND: usize = 1 << 16;

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
    pub(super) fn inc(&mut self, rep: &mut Findings<'_>, offset: u64, len: u64) {
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

#[cfg(test)]
mod tests {
    use super::super::CheckReport;
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
