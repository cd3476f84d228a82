//! A bounded cache of metadata tables (L2 tables, refcount blocks) keyed by
//! host offset, evicting the least recently used table.

use alloc::vec::Vec;
use hashbrown::HashMap;

use crate::bytes::to_usize;
use crate::{BlockRead, Error};

/// Cached tables keyed by host offset, at most `capacity` of them.
#[derive(Debug)]
pub(crate) struct TableCache {
    tables: HashMap<u64, (Vec<u8>, u64)>,
    capacity: usize,
    tick: u64,
    /// Number of table reads from storage (for tests and statistics).
    pub(crate) misses: u64,
}

impl TableCache {
    /// A cache holding up to `capacity` tables (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        TableCache {
            tables: HashMap::new(),
            capacity: capacity.max(1),
            tick: 0,
            misses: 0,
        }
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
            let mut buf = if self.tables.len() >= self.capacity {
                // Reuse the least recently used table's buffer.
                let oldest = self
                    .tables
                    .iter()
                    .min_by_key(|(_, (_, t))| *t)
                    .map(|(k, _)| *k);
                oldest
                    .and_then(|k| self.tables.remove(&k))
                    .map(|(b, _)| b)
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
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
            None => Err(Error::corrupt("table cache lost an entry", offset, 0)),
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
        assert!(c.tables.len() <= c.capacity());
    }
}
