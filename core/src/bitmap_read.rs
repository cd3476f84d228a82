//! Reading persistent dirty bitmaps: which guest ranges a bitmap marks
//! dirty, as runs (what NBD's `qemu:dirty-bitmap:NAME` context reports).
//! An image open for writing answers with the bits it keeps in memory
//! since its last flush.

use alloc::string::ToString;
use alloc::vec::Vec;

use crate::bitmap::{Bitmap, FLAG_IN_USE};
use crate::bitmap_write::{table_entries, ALL_ONES, ENTRY_OFFSET, GRANULARITY_BITS};
use crate::bytes::to_usize;
use crate::error::Error;
use crate::heap;
use crate::image::{Image, Res};
use crate::io::{BlockRead, BlockWrite};
use crate::writable::WritableImage;

/// One cluster of a bitmap's bits.
pub(crate) enum Bits {
    /// No cluster: every bit clear.
    Clear,
    /// No cluster, flagged all ones.
    Set,
    /// The cluster's bytes (bit i is bit i % 8 of byte i / 8).
    Some(Vec<u8>),
}

impl Bits {
    fn get(&self, i: u64) -> bool {
        match self {
            Bits::Clear => false,
            Bits::Set => true,
            Bits::Some(b) => to_usize(i / 8)
                .and_then(|at| b.get(at))
                .is_some_and(|byte| byte >> (i % 8) & 1 != 0),
        }
    }
}

/// Consecutive entries of a bitmap table, from entry `first`.
pub(crate) struct TablePart {
    first: u64,
    entries: Vec<u64>,
}

impl TablePart {
    /// Entry `idx` of the table (0, no cluster, when not held).
    fn entry(&self, idx: u64) -> u64 {
        idx.checked_sub(self.first)
            .and_then(to_usize)
            .and_then(|i| self.entries.get(i))
            .copied()
            .unwrap_or(0)
    }
}

fn push(out: &mut Vec<(u64, bool)>, len: u64, dirty: bool) {
    match out.last_mut() {
        Some(last) if last.1 == dirty => last.0 += len,
        _ => out.push((len, dirty)),
    }
}

/// The runs of `[offset, offset + len)` (inside a disk of `size` bytes)
/// as a bitmap of granularity `2^gran_bits` with clusters of `cs` bytes
/// marks them, the clusters fetched through `cluster` (by table index,
/// each once). Appends `(length, dirty)` runs to `out`, neighbours of the
/// same state merged, stopping once `out` holds `max` runs.
pub(crate) fn runs<E>(
    gran_bits: u8,
    cs: u64,
    offset: u64,
    len: u64,
    max: usize,
    mut cluster: impl FnMut(u64) -> Result<Bits, E>,
    out: &mut Vec<(u64, bool)>,
) -> Result<(), E> {
    let end = offset.saturating_add(len);
    let per_cluster = cs.saturating_mul(8).max(1);
    let gran = 1u64 << gran_bits;
    let mut pos = offset;
    let mut current: Option<(u64, Bits)> = None;
    while pos < end {
        let bit = pos >> gran_bits;
        let idx = bit / per_cluster;
        if current.as_ref().is_none_or(|(i, _)| *i != idx) {
            current = Some((idx, cluster(idx)?));
        }
        let Some((_, bits)) = &current else {
            break;
        };
        // A cluster without bits of its own answers for all it covers.
        let upto = match bits {
            Bits::Clear | Bits::Set => (idx + 1).saturating_mul(per_cluster).saturating_mul(gran),
            Bits::Some(_) => (bit + 1).saturating_mul(gran),
        };
        let n = upto.min(end) - pos;
        let dirty = bits.get(bit % per_cluster);
        if out.len() >= max && out.last().is_none_or(|l| l.1 != dirty) {
            break;
        }
        push(out, n, dirty);
        pos += n;
    }
    Ok(())
}

/// Checks that bitmap `b` is one whose bits can be read.
fn readable<E>(b: &Bitmap, size: u64, cs: u64) -> Result<(), Error<E>> {
    let bad = |problem| {
        Err(Error::Bitmap {
            name: b.name.clone(),
            problem,
        })
    };
    if b.flags & FLAG_IN_USE != 0 {
        return bad("is inconsistent (flagged in use): it cannot be read");
    }
    if b.kind != 1 || !GRANULARITY_BITS.contains(&b.granularity_bits) {
        return bad("has a type or granularity that cannot be read");
    }
    if u64::from(b.table_size) != table_entries(size, b.granularity_bits, cs) {
        return Err(Error::corrupt(
            "bitmap table size does not match the disk size",
            b.table_offset,
            u64::from(b.table_size),
        ));
    }
    Ok(())
}

impl<R: BlockRead> Image<R> {
    fn bitmap_named(&self, name: &str) -> Res<Bitmap, R> {
        self.bitmaps
            .iter()
            .find(|b| b.name == name)
            .cloned()
            .ok_or_else(|| Error::Bitmap {
                name: name.to_string(),
                problem: "not found",
            })
    }

    /// Checks that persistent bitmap `name` exists and can be read.
    pub fn check_bitmap(&self, name: &str) -> Res<(), R> {
        let b = self.bitmap_named(name)?;
        readable(&b, self.header.size, self.cluster_size())
    }

    /// The runs of `[offset, offset + len)` as persistent bitmap `name`
    /// marks them: `(length, dirty)` appended to `out`, neighbours of the
    /// same state merged, at most `max` of them (they may then cover less
    /// than `len`). A bitmap flagged in use (not saved cleanly) is refused,
    /// as QEMU refuses to export it.
    pub fn dirty_runs(
        &mut self,
        name: &str,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<(u64, bool)>,
    ) -> Res<(), R> {
        self.check_range(offset, len)?;
        let b = self.bitmap_named(name)?;
        let cs = self.cluster_size();
        readable(&b, self.header.size, cs)?;
        // Only the table entries covering the range: a few KiB whatever
        // the bitmap's size.
        let per_entry = (cs * 8) << b.granularity_bits;
        let first = offset / per_entry;
        let count = (offset + len)
            .div_ceil(per_entry)
            .saturating_sub(first)
            .max(1);
        let entries = self.bitmap_table_part(&b, first, count)?;
        let table = TablePart { first, entries };
        runs(
            b.granularity_bits,
            cs,
            offset,
            len,
            max,
            |idx| self.bitmap_bits(&table, idx, b.table_offset),
            out,
        )
    }

    /// Entries `first..first + count` of a bitmap's table (those past its
    /// end left out), read from the image; a table reaching past the end of
    /// the file is corrupt.
    fn bitmap_table_part(&mut self, b: &Bitmap, first: u64, count: u64) -> Res<Vec<u64>, R> {
        let count = count.min(u64::from(b.table_size).saturating_sub(first));
        let at = b.table_offset.saturating_add(first.saturating_mul(8));
        if at.saturating_add(count * 8) > self.file_len() {
            return Err(Error::corrupt(
                "bitmap table reaches past the end of the image",
                b.table_offset,
                u64::from(b.table_size),
            ));
        }
        let mut raw = heap::zeroed(count * 8, "a bitmap table")?;
        self.io.read_at(at, &mut raw).map_err(Error::Io)?;
        heap::entries(&raw, "a bitmap table")
    }

    /// Cluster `idx` of a bitmap whose table entries `table` holds.
    fn bitmap_bits(&mut self, table: &TablePart, idx: u64, table_offset: u64) -> Res<Bits, R> {
        let entry = table.entry(idx);
        let off = entry & ENTRY_OFFSET;
        if off == 0 {
            return Ok(if entry & ALL_ONES != 0 {
                Bits::Set
            } else {
                Bits::Clear
            });
        }
        let cs = self.cluster_size();
        let file_len = self.file_len();
        if !off.is_multiple_of(cs) || off.saturating_add(cs) > file_len {
            return Err(Error::corrupt(
                "bitmap table entry points outside the image",
                table_offset,
                entry,
            ));
        }
        let mut bits = heap::zeroed(cs, "a bitmap cluster")?;
        self.io.read_at(off, &mut bits).map_err(Error::Io)?;
        Ok(Bits::Some(bits))
    }
}

impl<R: BlockWrite> WritableImage<R> {
    /// [`Image::dirty_runs`] of an image open for writing: a bitmap it
    /// keeps up to date answers with its bits in memory (what the writes
    /// since the last flush set), not only with what is stored.
    pub fn dirty_runs(
        &mut self,
        name: &str,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<(u64, bool)>,
    ) -> Res<(), R> {
        let Some(t) = self.tracked_named(name) else {
            return self.img.dirty_runs(name, offset, len, max, out);
        };
        self.img.check_range(offset, len)?;
        let cs = self.cluster_size();
        let gran_bits = self.tracked_granularity(t);
        let table_offset = self.tracked_table_offset(t);
        let table = TablePart {
            first: 0,
            entries: self.tracked_table(t)?,
        };
        runs(
            gran_bits,
            cs,
            offset,
            len,
            max,
            |idx| match self.tracked_cluster(t, idx) {
                Some(bits) => Ok(Bits::Some(bits)),
                None => self.img.bitmap_bits(&table, idx, table_offset),
            },
            out,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// Granularity 64 KiB, 512-byte clusters (4096 bits, 256 MiB each):
    /// cluster 0 has bits 1 and 2 set, cluster 1 is all ones, cluster 2
    /// all clear.
    fn fetch(idx: u64) -> Result<Bits, ()> {
        Ok(match idx {
            0 => {
                let mut b = vec![0u8; 512];
                b[0] = 0b110;
                Bits::Some(b)
            }
            1 => Bits::Set,
            _ => Bits::Clear,
        })
    }

    #[test]
    fn runs_follow_the_bits_and_stop_at_max() {
        let k = 64u64 << 10;
        let mut out = Vec::new();
        runs(16, 512, 0, 4 * k, 100, fetch, &mut out).unwrap();
        assert_eq!(out, vec![(k, false), (2 * k, true), (k, false)]);
        // Unaligned edges, across clusters of each kind.
        out.clear();
        let cl = 4096 * k;
        runs(16, 512, cl - 100, 2 * cl, 100, fetch, &mut out).unwrap();
        assert_eq!(out, vec![(100, false), (cl, true), (cl - 100, false)]);
        // At most `max` runs.
        out.clear();
        runs(16, 512, 0, 4 * k, 2, fetch, &mut out).unwrap();
        assert_eq!(out, vec![(k, false), (2 * k, true)]);
        // The fetch's errors are the answer.
        out.clear();
        assert_eq!(
            runs(16, 512, 0, 1, 9, |_| Err::<Bits, _>(7), &mut out),
            Err(7)
        );
    }
}
