//! A bounded cache of metadata tables (L2 tables, refcount blocks) keyed by
//! host offset, evicting the least recently used table.

use alloc::vec::Vec;
use hashbrown::{HashMap, HashSet};

use crate::bytes::to_usize;
use crate::error::Error;
use crate::io::BlockRead;

/// Cached tables keyed by host offset, at most `capacity` of them.
#[derive(Debug)]
pub(crate) struct TableCache {
    tables: HashMap<u64, (Vec<u8>, u64)>,
    capacity: usize,
    tick: u64,
    /// Number of table reads from storage (for tests and statistics).
    pub(crate) misses: u64,
    /// Tables modified in memory and not yet written (never evicted).
    dirty: HashSet<u64>,
}

impl TableCache {
    /// A cache holding up to `capacity` tables (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        TableCache {
            tables: HashMap::new(),
            capacity: capacity.max(1),
            tick: 0,
            misses: 0,
            dirty: HashSet::new(),
        }
    }

    /// Number of tables held now.
    pub(crate) fn len(&self) -> usize {
        self.tables.len()
    }

    /// Maximum number of tables held.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Returns the table of `size` bytes at `offset`, reading it on a miss.
    pub(crate) fn get<R: BlockRead>(
        &mut self,
        io: &mut R,
        offset: u64,
        size: u64,
    ) -> Result<&[u8], Error<R::Error>> {
        self.tick = self.tick.wrapping_add(1);
        let tick = self.tick;
        if !self.tables.contains_key(&offset) {
            let len = to_usize(size).ok_or(Error::field("table size", size, "too large"))?;
            let mut buf = self.evict_one().unwrap_or_default();
            buf.resize(len, 0);
            io.read_at(offset, &mut buf).map_err(Error::Io)?;
            self.misses = self.misses.wrapping_add(1);
            self.tables.insert(offset, (buf, tick));
        }
        match self.tables.get_mut(&offset) {
            Some((buf, t)) => {
                *t = tick;
                Ok(buf.as_slice())
            }
            None => Err(Error::Internal("table cache lost an entry")),
        }
    }

    /// Frees room for one more table when full: removes the least recently
    /// used clean table and returns its buffer for reuse. Dirty tables are
    /// never evicted (the cache then grows until the owner writes them).
    fn evict_one(&mut self) -> Option<Vec<u8>> {
        if self.tables.len() < self.capacity {
            return None;
        }
        let oldest = self
            .tables
            .iter()
            .filter(|(k, _)| !self.dirty.contains(*k))
            .min_by_key(|(_, (_, t))| *t)
            .map(|(k, _)| *k)?;
        self.tables.remove(&oldest).map(|(b, _)| b)
    }

    /// Returns the table for modification (reading it on a miss) and marks it dirty.
    pub(crate) fn get_mut<R: BlockRead>(
        &mut self,
        io: &mut R,
        offset: u64,
        size: u64,
    ) -> Result<&mut [u8], Error<R::Error>> {
        self.get(io, offset, size)?;
        self.dirty.insert(offset);
        match self.tables.get_mut(&offset) {
            Some((buf, _)) => Ok(buf.as_mut_slice()),
            None => Err(Error::Internal("table cache lost an entry")),
        }
    }

    /// Inserts a new table with the given contents, marked dirty.
    pub(crate) fn insert_dirty(&mut self, offset: u64, data: Vec<u8>) {
        self.tick = self.tick.wrapping_add(1);
        if !self.tables.contains_key(&offset) {
            let _ = self.evict_one();
        }
        self.tables.insert(offset, (data, self.tick));
        self.dirty.insert(offset);
    }

    /// Offsets of the dirty tables, in ascending order.
    pub(crate) fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.dirty.iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// Whether any table is dirty.
    pub(crate) fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The cached contents of a table, if present.
    pub(crate) fn peek(&self, offset: u64) -> Option<&[u8]> {
        self.tables.get(&offset).map(|(b, _)| b.as_slice())
    }

    /// Marks a table as written; trims the cache back to its capacity.
    pub(crate) fn mark_clean(&mut self, offset: u64) {
        self.dirty.remove(&offset);
        while self.tables.len() > self.capacity {
            if self.evict_one().is_none() {
                break;
            }
        }
    }

    /// Whether dirty tables keep the cache above its capacity.
    pub(crate) fn over_capacity(&self) -> bool {
        self.tables.len() > self.capacity
    }

    /// Drops a table from the cache (e.g. after its cluster was freed).
    pub(crate) fn forget(&mut self, offset: u64) {
        self.dirty.remove(&offset);
        self.tables.remove(&offset);
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
        assert!(c.tables.len() <= c.capacity());
    }
}
