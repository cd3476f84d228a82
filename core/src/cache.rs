//! A bounded cache of metadata tables (L2 tables, refcount blocks) keyed by
//! host offset, evicting the least recently used clean table in O(1): the
//! tables sit in a slab, clean ones also on a doubly linked recency list;
//! dirty tables (changed in memory, not yet written) are never evicted.

use alloc::vec::Vec;
use hashbrown::HashMap;

use crate::bytes::to_usize;
use crate::error::Error;
use crate::io::BlockRead;

/// No neighbour on the recency list.
const NIL: usize = usize::MAX;

#[derive(Debug)]
struct Slot {
    offset: u64,
    data: Vec<u8>,
    dirty: bool,
    /// Neighbours on the clean recency list (more and less recent).
    newer: usize,
    older: usize,
}

/// Cached tables keyed by host offset, at most `capacity` of them (more
/// only while dirty tables keep it above).
#[derive(Debug)]
pub(crate) struct TableCache {
    index: HashMap<u64, usize>,
    slots: Vec<Slot>,
    /// Slots of removed tables, for reuse.
    free: Vec<usize>,
    /// Most and least recently used clean tables.
    newest: usize,
    oldest: usize,
    dirty_count: usize,
    capacity: usize,
    /// Number of table reads from storage (for tests and statistics).
    pub(crate) misses: u64,
}

impl TableCache {
    /// A cache holding up to `capacity` tables (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        TableCache {
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            newest: NIL,
            oldest: NIL,
            dirty_count: 0,
            capacity: capacity.max(1),
            misses: 0,
        }
    }

    /// Number of tables held now.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Maximum number of tables held.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    fn unlink(&mut self, i: usize) {
        let (newer, older) = (self.slots[i].newer, self.slots[i].older);
        match newer {
            NIL => self.newest = older,
            n => self.slots[n].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => self.slots[o].newer = newer,
        }
        self.slots[i].newer = NIL;
        self.slots[i].older = NIL;
    }

    fn push_newest(&mut self, i: usize) {
        self.slots[i].older = self.newest;
        self.slots[i].newer = NIL;
        match self.newest {
            NIL => self.oldest = i,
            n => self.slots[n].newer = i,
        }
        self.newest = i;
    }

    /// Marks slot `i` used now.
    fn touch(&mut self, i: usize) {
        if !self.slots[i].dirty && self.newest != i {
            self.unlink(i);
            self.push_newest(i);
        }
    }

    /// Removes the least recently used clean table when the cache is full
    /// and returns its buffer for reuse.
    fn evict_one(&mut self) -> Option<Vec<u8>> {
        if self.index.len() < self.capacity || self.oldest == NIL {
            return None;
        }
        let i = self.oldest;
        self.unlink(i);
        self.index.remove(&self.slots[i].offset);
        self.free.push(i);
        Some(core::mem::take(&mut self.slots[i].data))
    }

    /// Stores a new table and returns its slot (listed as newest if clean).
    fn store(&mut self, offset: u64, data: Vec<u8>, dirty: bool) -> usize {
        let slot = Slot {
            offset,
            data,
            dirty,
            newer: NIL,
            older: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.index.insert(offset, i);
        if dirty {
            self.dirty_count += 1;
        } else {
            self.push_newest(i);
        }
        i
    }

    /// The slot of the table of `size` bytes at `offset`, read on a miss.
    fn slot<R: BlockRead>(
        &mut self,
        io: &mut R,
        offset: u64,
        size: u64,
    ) -> Result<usize, Error<R::Error>> {
        if let Some(&i) = self.index.get(&offset) {
            self.touch(i);
            return Ok(i);
        }
        let len = to_usize(size).ok_or(Error::field("table size", size, "too large"))?;
        let mut buf = self.evict_one().unwrap_or_default();
        buf.clear();
        buf.try_reserve_exact(len).map_err(|_| Error::OutOfMemory {
            what: "a metadata table",
            bytes: size,
        })?;
        buf.resize(len, 0);
        io.read_at(offset, &mut buf).map_err(Error::Io)?;
        self.misses = self.misses.wrapping_add(1);
        Ok(self.store(offset, buf, false))
    }

    /// Returns the table of `size` bytes at `offset`, reading it on a miss.
    pub(crate) fn get<R: BlockRead>(
        &mut self,
        io: &mut R,
        offset: u64,
        size: u64,
    ) -> Result<&[u8], Error<R::Error>> {
        let i = self.slot(io, offset, size)?;
        Ok(self.slots[i].data.as_slice())
    }

    /// Returns the table for modification (reading it on a miss) and marks it dirty.
    pub(crate) fn get_mut<R: BlockRead>(
        &mut self,
        io: &mut R,
        offset: u64,
        size: u64,
    ) -> Result<&mut [u8], Error<R::Error>> {
        let i = self.slot(io, offset, size)?;
        if !self.slots[i].dirty {
            self.unlink(i);
            self.slots[i].dirty = true;
            self.dirty_count += 1;
        }
        Ok(self.slots[i].data.as_mut_slice())
    }

    /// Inserts a new table with the given contents, marked dirty.
    pub(crate) fn insert_dirty(&mut self, offset: u64, data: Vec<u8>) {
        self.forget(offset);
        let _ = self.evict_one();
        self.store(offset, data, true);
    }

    /// Offsets of the dirty tables, in ascending order.
    pub(crate) fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .index
            .iter()
            .filter(|(_, &i)| self.slots[i].dirty)
            .map(|(&o, _)| o)
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether any table is dirty.
    pub(crate) fn has_dirty(&self) -> bool {
        self.dirty_count > 0
    }

    /// The cached contents of a table, if present.
    pub(crate) fn peek(&self, offset: u64) -> Option<&[u8]> {
        self.index
            .get(&offset)
            .map(|&i| self.slots[i].data.as_slice())
    }

    /// Marks a table as written; trims the cache back to its capacity.
    pub(crate) fn mark_clean(&mut self, offset: u64) {
        if let Some(&i) = self.index.get(&offset) {
            if self.slots[i].dirty {
                self.slots[i].dirty = false;
                self.dirty_count -= 1;
                self.push_newest(i);
            }
        }
        while self.index.len() > self.capacity {
            if self.evict_one().is_none() {
                break;
            }
        }
    }

    /// Whether dirty tables keep the cache above its capacity.
    pub(crate) fn over_capacity(&self) -> bool {
        self.index.len() > self.capacity
    }

    /// Drops a table from the cache (e.g. after its cluster was freed).
    pub(crate) fn forget(&mut self, offset: u64) {
        if let Some(i) = self.index.remove(&offset) {
            if self.slots[i].dirty {
                self.dirty_count -= 1;
            } else {
                self.unlink(i);
            }
            self.slots[i].data = Vec::new();
            self.free.push(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut disk: Vec<u8> = (0..=255u8).collect();
        let mut c = TableCache::new(2);
        assert_eq!(c.get(&mut disk, 0, 4).unwrap(), [0, 1, 2, 3]);
        assert_eq!(c.get(&mut disk, 8, 4).unwrap(), [8, 9, 10, 11]);
        c.get(&mut disk, 0, 4).unwrap();
        c.get(&mut disk, 16, 4).unwrap(); // evicts 8
        assert_eq!(c.misses, 3);
        c.get(&mut disk, 0, 4).unwrap();
        assert_eq!(c.misses, 3);
        c.get(&mut disk, 8, 4).unwrap();
        assert_eq!(c.misses, 4);
        assert!(c.len() <= c.capacity());
    }

    #[test]
    fn dirty_tables_stay_until_written() {
        let mut disk: Vec<u8> = (0..=255u8).collect();
        let mut c = TableCache::new(2);
        c.get_mut(&mut disk, 0, 4).unwrap()[0] = 99;
        c.insert_dirty(64, alloc::vec![7; 4]);
        c.get(&mut disk, 8, 4).unwrap();
        c.get(&mut disk, 16, 4).unwrap();
        // Two dirty tables are kept over the capacity; clean ones rotate.
        assert_eq!(c.peek(0), Some(&[99, 1, 2, 3][..]));
        assert_eq!(c.peek(64), Some(&[7; 4][..]));
        assert!(c.over_capacity());
        assert_eq!(c.dirty_offsets(), [0, 64]);
        c.mark_clean(0);
        c.mark_clean(64);
        assert!(!c.has_dirty());
        assert!(c.len() <= 2);
        c.forget(64);
        assert_eq!(c.peek(64), None);
    }

    proptest::proptest! {
        /// The cache agrees with the storage plus its dirty changes, and
        /// never holds more than its capacity plus its dirty tables.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((0u8..4, 0u64..12), 1..200), cap in 1usize..5) {
            let mut disk: Vec<u8> = (0..=255u8).collect();
            let mut model: hashbrown::HashMap<u64, u8> = hashbrown::HashMap::new();
            let mut c = TableCache::new(cap);
            for (op, t) in ops {
                let off = t * 16;
                match op {
                    0 => {
                        let v = c.get(&mut disk, off, 16).unwrap()[0];
                        let want = model.get(&off).copied().unwrap_or(disk[off as usize]);
                        proptest::prop_assert_eq!(v, want);
                    }
                    1 => {
                        let cur = c.get(&mut disk, off, 16).unwrap()[0];
                        c.get_mut(&mut disk, off, 16).unwrap()[0] = cur.wrapping_add(1);
                        model.insert(off, cur.wrapping_add(1));
                    }
                    2 => {
                        for o in c.dirty_offsets() {
                            let b = c.peek(o).unwrap()[0];
                            disk[o as usize] = b;
                            c.mark_clean(o);
                        }
                        model.clear();
                    }
                    _ => {
                        if !model.contains_key(&off) {
                            c.forget(off);
                        }
                    }
                }
                proptest::prop_assert!(c.len() <= cap + model.len());
            }
        }
    }
}
