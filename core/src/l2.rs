//! L1 and L2 table entries, normal and extended: pure decoding and encoding.

/// Offset bits 9-55 of L1 entries, standard L2 entries and refcount table entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Bit 62: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard descriptor: the cluster reads as zeros (v3, no extended L2).
pub const ZERO: u64 = 1;
/// All 32 allocation bits of an extended L2 bitmap.
pub const ALL_ALLOC: u64 = 0xffff_ffff;
/// Number of subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// Host offset of the L2 table an L1 entry points at (0 = unallocated).
pub fn l1_offset(entry: u64) -> u64 {
    entry & OFFSET_MASK
}

/// Reserved bits of an L1 entry that must be zero (bits 0-8 and 56-62).
pub fn l1_reserved(entry: u64) -> u64 {
    entry & !(OFFSET_MASK | COPIED)
}

/// What one subcluster (or whole cluster, without extended L2) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subcluster {
    /// Not allocated, no host cluster: read from the backing file (or zeros).
    Unallocated,
    /// Not allocated, but the cluster has a host cluster (extended L2 only):
    /// read from the backing file (or zeros).
    UnallocatedAlloc {
        /// Host offset of the cluster.
        host: u64,
    },
    /// Reads as zeros, no host cluster.
    Zero,
    /// Reads as zeros, with a preallocated host cluster.
    ZeroAlloc {
        /// Host offset of the cluster.
        host: u64,
    },
    /// Data at a host cluster.
    Normal {
        /// Host offset of the cluster.
        host: u64,
    },
    /// A compressed cluster.
    Compressed(CompressedDescriptor),
}

/// Location of a compressed cluster's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host offset of the first compressed byte (not aligned).
    pub offset: u64,
    /// Upper bound of the compressed length in bytes (whole 512-byte sectors
    /// minus the offset into the first one).
    pub size: u64,
}

/// Why an L2 entry is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryError {
    /// The host offset is not cluster aligned.
    Unaligned(u64),
    /// The extended L2 bitmap marks a subcluster both allocated and zero, or
    /// allocated in a cluster without host offset.
    InvalidBitmap(u64),
    /// A compressed entry has a nonzero subcluster bitmap.
    CompressedBitmap(u64),
    /// Reserved bits are set.
    Reserved(u64),
}

impl EntryError {
    /// Human description of the problem.
    pub fn what(&self) -> &'static str {
        match self {
            EntryError::Unaligned(_) => "L2 entry host offset not aligned to a cluster",
            EntryError::InvalidBitmap(_) => "L2 subcluster bitmap is invalid",
            EntryError::CompressedBitmap(_) => "compressed L2 entry has a subcluster bitmap",
            EntryError::Reserved(_) => "L2 entry has reserved bits set",
        }
    }

    /// The offending value.
    pub fn value(&self) -> u64 {
        match self {
            EntryError::Unaligned(v)
            | EntryError::InvalidBitmap(v)
            | EntryError::CompressedBitmap(v)
            | EntryError::Reserved(v) => *v,
        }
    }
}

/// Reserved bits set in a standard L2 entry (QEMU's read path ignores
/// them; the consistency check reports them). Compressed entries have none
/// checked here.
pub fn l2_reserved(entry: u64, extended: bool) -> u64 {
    if entry & COMPRESSED != 0 {
        return 0;
    }
    let mask = if extended {
        0x3f00_0000_0000_01ff
    } else {
        0x3f00_0000_0000_01fe
    };
    entry & mask
}

/// Geometry needed to decode entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryFormat {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Extended L2 entries (with subcluster bitmaps).
    pub extended: bool,
    /// The image uses an external data file (offset 0 with COPIED is valid).
    pub data_file: bool,
}

impl EntryFormat {
    /// Size of one L2 entry in bytes (8 or 16).
    pub fn entry_size(&self) -> usize {
        if self.extended {
            16
        } else {
            8
        }
    }

    /// Shift of the compressed sector count field.
    fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Decodes the compressed cluster descriptor of `entry`.
    pub fn compressed(&self, entry: u64) -> CompressedDescriptor {
        let shift = self.csize_shift();
        let offset_mask = (1u64 << shift) - 1;
        let sectors_mask = (1u64 << (self.cluster_bits - 8)) - 1;
        let offset = entry & offset_mask;
        let sectors = ((entry >> shift) & sectors_mask) + 1;
        CompressedDescriptor {
            offset,
            size: sectors * 512 - (offset & 511),
        }
    }

    /// Encodes a compressed descriptor for data at `offset` of `len` bytes.
    /// Returns `None` when it cannot be represented.
    pub fn encode_compressed(&self, offset: u64, len: u64) -> Option<u64> {
        let shift = self.csize_shift();
        if len == 0 || offset >> shift != 0 {
            return None;
        }
        let last = offset.checked_add(len - 1)?;
        let extra_sectors = (last >> 9) - (offset >> 9);
        if extra_sectors > (1u64 << (self.cluster_bits - 8)) - 1 {
            return None;
        }
        Some(COMPRESSED | (extra_sectors << shift) | offset)
    }

    /// Entry `j` of the L2 table `table` and the host cluster it holds
    /// uncompressed (data, or preallocated zeros), if any.
    pub fn host_cluster_at(&self, table: &[u8], j: usize) -> (u64, Option<u64>) {
        let at = j * self.entry_size();
        let entry = crate::bytes::be64(table, at);
        let bitmap = if self.extended {
            crate::bytes::be64(table, at + 8)
        } else {
            0
        };
        let host = match self.subcluster(entry, bitmap, 0) {
            Ok(Subcluster::Normal { host })
            | Ok(Subcluster::ZeroAlloc { host })
            | Ok(Subcluster::UnallocatedAlloc { host }) => Some(host),
            _ => None,
        };
        (entry, host)
    }

    /// Classifies subcluster `sc` (0 without extended L2) of the entry
    /// `(entry, bitmap)`; `bitmap` is ignored without extended L2.
    pub fn subcluster(&self, entry: u64, bitmap: u64, sc: u32) -> Result<Subcluster, EntryError> {
        if entry & COMPRESSED != 0 {
            return Ok(Subcluster::Compressed(self.compressed(entry)));
        }
        let host = entry & OFFSET_MASK;
        let cluster_mask = (1u64 << self.cluster_bits) - 1;
        let allocated = host != 0 || (self.data_file && entry & COPIED != 0);
        if allocated && host & cluster_mask != 0 {
            return Err(EntryError::Unaligned(host));
        }
        if !self.extended {
            return Ok(match (entry & ZERO != 0, allocated) {
                (true, true) => Subcluster::ZeroAlloc { host },
                (true, false) => Subcluster::Zero,
                (false, true) => Subcluster::Normal { host },
                (false, false) => Subcluster::Unallocated,
            });
        }
        let alloc_bits = bitmap & ALL_ALLOC;
        let zero_bits = bitmap >> 32;
        if alloc_bits & zero_bits != 0 {
            return Err(EntryError::InvalidBitmap(bitmap));
        }
        let bit = 1u64 << (sc % SUBCLUSTERS);
        if allocated {
            Ok(if zero_bits & bit != 0 {
                Subcluster::ZeroAlloc { host }
            } else if alloc_bits & bit != 0 {
                Subcluster::Normal { host }
            } else {
                Subcluster::UnallocatedAlloc { host }
            })
        } else if alloc_bits != 0 {
            Err(EntryError::InvalidBitmap(bitmap))
        } else if zero_bits & bit != 0 {
            Ok(Subcluster::Zero)
        } else {
            Ok(Subcluster::Unallocated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STD: EntryFormat = EntryFormat {
        cluster_bits: 16,
        extended: false,
        data_file: false,
    };
    const EXT: EntryFormat = EntryFormat {
        cluster_bits: 16,
        extended: true,
        data_file: false,
    };

    #[test]
    fn standard_entries() {
        assert_eq!(STD.subcluster(0, 0, 0), Ok(Subcluster::Unallocated));
        assert_eq!(STD.subcluster(1, 0, 0), Ok(Subcluster::Zero));
        assert_eq!(
            STD.subcluster(COPIED | 0x50000, 0, 0),
            Ok(Subcluster::Normal { host: 0x50000 })
        );
        assert_eq!(
            STD.subcluster(0x50000 | 1, 0, 0),
            Ok(Subcluster::ZeroAlloc { host: 0x50000 })
        );
        assert_eq!(
            STD.subcluster(0x50200, 0, 0),
            Err(EntryError::Unaligned(0x50200))
        );
        assert_eq!(l2_reserved(0x50000 | 2, false), 2);
        assert_eq!(l2_reserved(0x50000 | 1, true), 1);
        assert_eq!(l2_reserved(COMPRESSED | 3, false), 0);
    }

    #[test]
    fn data_file_offset_zero() {
        let f = EntryFormat {
            data_file: true,
            ..STD
        };
        assert_eq!(
            f.subcluster(COPIED, 0, 0),
            Ok(Subcluster::Normal { host: 0 })
        );
        assert_eq!(f.subcluster(0, 0, 0), Ok(Subcluster::Unallocated));
    }

    #[test]
    fn extended_entries() {
        let e = 0x50000 | COPIED;
        let bm = 0b01 | (0b10 << 32);
        assert_eq!(
            EXT.subcluster(e, bm, 0),
            Ok(Subcluster::Normal { host: 0x50000 })
        );
        assert_eq!(
            EXT.subcluster(e, bm, 1),
            Ok(Subcluster::ZeroAlloc { host: 0x50000 })
        );
        assert_eq!(
            EXT.subcluster(e, bm, 2),
            Ok(Subcluster::UnallocatedAlloc { host: 0x50000 })
        );
        assert_eq!(EXT.subcluster(0, 1 << 33, 1), Ok(Subcluster::Zero));
        assert_eq!(EXT.subcluster(0, 1 << 33, 0), Ok(Subcluster::Unallocated));
        assert_eq!(EXT.subcluster(0, 1, 0), Err(EntryError::InvalidBitmap(1)));
        assert_eq!(
            EXT.subcluster(e, 1 | (1 << 32), 0),
            Err(EntryError::InvalidBitmap(1 | (1 << 32)))
        );
    }

    #[test]
    fn compressed_round_trip() {
        let raw = STD.encode_compressed(0x12345, 3000).unwrap();
        let d = STD.compressed(raw);
        assert_eq!(d.offset, 0x12345);
        assert!(d.size >= 3000 && d.size < 3000 + 1024);
    }

    proptest! {
        #[test]
        fn compressed_descriptor_covers_data(bits in 9u32..=21, off in 0u64..(1u64 << 40), len in 1u64..4096) {
            let f = EntryFormat { cluster_bits: bits, extended: false, data_file: false };
            let len = len.min(1u64 << bits);
            if let Some(raw) = f.encode_compressed(off, len) {
                let d = f.compressed(raw);
                prop_assert_eq!(d.offset, off);
                prop_assert!(d.size >= len);
                prop_assert!(d.size < len + 1024);
            }
        }

        #[test]
        fn any_entry_decodes_without_panic(bits in 9u32..=21, ext: bool, df: bool, entry: u64, bitmap: u64, sc in 0u32..32) {
            let f = EntryFormat { cluster_bits: if ext { bits.max(14) } else { bits }, extended: ext, data_file: df };
            match f.subcluster(entry, bitmap, sc) {
                Ok(Subcluster::Normal { host } | Subcluster::ZeroAlloc { host } | Subcluster::UnallocatedAlloc { host }) => {
                    prop_assert_eq!(host & ((1u64 << f.cluster_bits) - 1), 0);
                    prop_assert!(host < 1u64 << 56);
                }
                Ok(Subcluster::Compressed(d)) => prop_assert!(d.size >= 1 && d.size <= (1u64 << f.cluster_bits) * 2),
                _ => {}
            }
        }
    }
}
