//! The metadata map: which host byte ranges of an image hold metadata, and
//! of which kind (QEMU's overlap-check set: header, active L1 and L2
//! tables, refcount table and blocks, snapshot table, inactive L1 tables,
//! bitmap directory, encryption header). The writer keeps it up to date
//! and checks every write against it, so that a corrupted pointer can never
//! make it write guest data (or the wrong table) over metadata.

use alloc::collections::BTreeMap;

/// The header cluster.
pub const HEADER: u16 = 1 << 0;
/// The active L1 table.
pub const ACTIVE_L1: u16 = 1 << 1;
/// An L2 table of the active L1 table.
pub const ACTIVE_L2: u16 = 1 << 2;
/// The refcount table.
pub const REFCOUNT_TABLE: u16 = 1 << 3;
/// A refcount block.
pub const REFCOUNT_BLOCK: u16 = 1 << 4;
/// The snapshot table.
pub const SNAPSHOT_TABLE: u16 = 1 << 5;
/// The L1 table of an internal snapshot.
pub const INACTIVE_L1: u16 = 1 << 6;
/// The bitmap directory.
pub const BITMAP_DIRECTORY: u16 = 1 << 7;
/// The encryption header.
pub const CRYPTO_HEADER: u16 = 1 << 8;
/// An L2 table of an internal snapshot's L1 table.
pub const INACTIVE_L2: u16 = 1 << 9;

/// QEMU's name of the first kind in `kinds`.
pub fn name(kinds: u16) -> &'static str {
    const NAMES: [&str; 10] = [
        "qcow2 header",
        "active L1 table",
        "active L2 table",
        "refcount table",
        "refcount block",
        "snapshot table",
        "inactive L1 table",
        "bitmap directory",
        "encryption header",
        "inactive L2 table",
    ];
    let i = usize::try_from(kinds.trailing_zeros()).unwrap_or(usize::MAX);
    NAMES.get(i).copied().unwrap_or("metadata")
}

/// Host byte ranges and the kinds of metadata each holds (a range may hold
/// several kinds when a corrupted image makes two structures overlap).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MetadataMap {
    /// Disjoint ranges: start -> (end, kinds).
    ranges: BTreeMap<u64, (u64, u16)>,
}

impl MetadataMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of disjoint ranges held.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether no range is held.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The kinds of metadata overlapping `[start, start + len)`.
    pub fn kinds(&self, start: u64, len: u64) -> u16 {
        let end = start.saturating_add(len);
        if len == 0 {
            return 0;
        }
        let mut out = 0;
        for (_, &(e, k)) in self.ranges.range(..end).rev() {
            if e <= start {
                break;
            }
            out |= k;
        }
        out
    }

    /// Applies `f` to the kinds of every byte of `[start, start + len)`,
    /// splitting ranges at the edges; ranges left without kinds are dropped.
    fn update(&mut self, start: u64, len: u64, f: impl Fn(u16) -> u16) {
        let end = start.saturating_add(len);
        if len == 0 {
            return;
        }
        // The ranges overlapping [start, end), in order.
        let mut hit: alloc::vec::Vec<(u64, u64, u16)> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, &(e, _))| e > start)
            .map(|(&s, &(e, k))| (s, e, k))
            .collect();
        hit.reverse();
        for (s, _, _) in &hit {
            self.ranges.remove(s);
        }
        let mut put = |s: u64, e: u64, k: u16| {
            if s < e && k != 0 {
                self.ranges.insert(s, (e, k));
            }
        };
        let mut pos = start;
        for (s, e, k) in hit {
            // Parts outside [start, end) keep their kinds.
            put(s, start.max(s).min(e), k);
            put(end.max(s).min(e), e, k);
            // The gap before this range, then the overlap.
            put(pos, s.max(pos).min(end), f(0));
            put(s.max(start), e.min(end), f(k));
            pos = pos.max(e.min(end));
        }
        put(pos, end, f(0));
    }

    /// Records that `[start, start + len)` holds metadata of `kind`.
    pub fn insert(&mut self, start: u64, len: u64, kind: u16) {
        self.update(start, len, |k| k | kind);
    }

    /// Records that `[start, start + len)` no longer holds metadata of `kind`.
    pub fn remove(&mut self, start: u64, len: u64, kind: u16) {
        self.update(start, len, |k| k & !kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kinds_split_and_merge_by_byte() {
        let mut m = MetadataMap::new();
        m.insert(0, 512, HEADER);
        m.insert(4096, 8192, ACTIVE_L2);
        m.insert(6144, 4096, REFCOUNT_BLOCK);
        assert_eq!(m.kinds(0, 1), HEADER);
        assert_eq!(m.kinds(512, 3584), 0);
        assert_eq!(m.kinds(4000, 200), ACTIVE_L2);
        assert_eq!(m.kinds(6000, 200), ACTIVE_L2 | REFCOUNT_BLOCK);
        assert_eq!(m.kinds(10240, 100), ACTIVE_L2);
        assert_eq!(m.kinds(12288, 1 << 40), 0);
        m.remove(4096, 8192, ACTIVE_L2);
        assert_eq!(m.kinds(4096, 2048), 0);
        assert_eq!(m.kinds(6144, 4096), REFCOUNT_BLOCK);
        assert_eq!(m.kinds(10240, 2048), 0);
        assert_eq!(name(REFCOUNT_BLOCK | ACTIVE_L2), "active L2 table");
        assert_eq!(name(HEADER), "qcow2 header");
    }

    proptest! {
        /// The map answers like a byte-by-byte model.
        #[test]
        fn matches_a_byte_model(ops in proptest::collection::vec((0u64..64, 1u64..24, 0u32..9, proptest::bool::ANY), 1..40)) {
            let mut m = MetadataMap::new();
            let mut model = [0u16; 96];
            for (s, l, k, add) in ops {
                let kind = 1u16 << k;
                if add { m.insert(s, l, kind) } else { m.remove(s, l, kind) }
                for b in &mut model[s as usize..(s + l) as usize] {
                    if add { *b |= kind } else { *b &= !kind }
                }
            }
            for s in 0..96u64 {
                for l in 1..8u64 {
                    let e = (s + l).min(96);
                    let want = model[s as usize..e as usize].iter().fold(0, |a, b| a | b);
                    prop_assert_eq!(m.kinds(s, e - s), want, "at {} len {}", s, e - s);
                }
            }
            // Ranges stay disjoint and non-empty.
            let mut last = 0;
            for (&s, &(e, k)) in &m.ranges {
                prop_assert!(s >= last && s < e && k != 0);
                last = e;
            }
        }
    }
}
