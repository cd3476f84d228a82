//! Refcount table and refcount block entries of every width (1 to 64 bits):
//! pure decoding and encoding.

use crate::l2::OFFSET_MASK;

/// Reserved bits of a refcount table entry (bits 0-8).
pub const TABLE_RESERVED: u64 = 0x1ff;

/// Host offset of the refcount block a refcount table entry points at.
pub fn table_entry_offset(entry: u64) -> u64 {
    entry & !TABLE_RESERVED
}

/// Whether a refcount table entry has offset bits beyond the 56-bit limit.
pub fn table_entry_too_big(entry: u64) -> bool {
    entry & !(OFFSET_MASK | TABLE_RESERVED) != 0
}

/// Number of refcount entries in one block for `cluster_bits` and `refcount_order`.
pub fn block_entries(cluster_bits: u32, refcount_order: u32) -> u64 {
    1u64 << (cluster_bits + 3 - refcount_order)
}

/// Largest refcount representable with `refcount_order`.
pub fn max_refcount(refcount_order: u32) -> u64 {
    if refcount_order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << refcount_order)) - 1
    }
}

/// Reads entry `index` of a refcount block of width `1 << order` bits.
/// Sub-byte widths count from the least significant bit. Out of range reads 0.
pub fn get(block: &[u8], order: u32, index: u64) -> u64 {
    let Ok(index) = usize::try_from(index) else {
        return 0;
    };
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let Some(byte) = block.get(index / per_byte) else {
                return 0;
            };
            let shift = (index % per_byte) * bits;
            u64::from((byte >> shift) & ((1u8 << bits) - 1))
        }
        _ => {
            let width = 1usize << (order - 3);
            let Some(start) = index.checked_mul(width) else {
                return 0;
            };
            let Some(s) = start.checked_add(width).and_then(|e| block.get(start..e)) else {
                return 0;
            };
            s.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        }
    }
}

/// Writes `value` (truncated to the width) at entry `index`; out of range is ignored.
pub fn set(block: &mut [u8], order: u32, index: u64, value: u64) {
    let Ok(index) = usize::try_from(index) else {
        return;
    };
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let Some(byte) = block.get_mut(index / per_byte) else {
                return;
            };
            let shift = (index % per_byte) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        _ => {
            let width = 1usize << (order - 3);
            let Some(start) = index.checked_mul(width) else {
                return;
            };
            if let Some(s) = start
                .checked_add(width)
                .and_then(|e| block.get_mut(start..e))
            {
                let bytes = value.to_be_bytes();
                s.copy_from_slice(&bytes[8 - width..]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sub_byte_lsb_first() {
        let block = [0b1000_0001u8, 0b0000_0010];
        assert_eq!(get(&block, 0, 0), 1);
        assert_eq!(get(&block, 0, 7), 1);
        assert_eq!(get(&block, 0, 9), 1);
        assert_eq!(get(&block, 1, 0), 1);
        assert_eq!(get(&block, 1, 3), 2);
        assert_eq!(get(&block, 2, 1), 8);
        assert_eq!(get(&block, 3, 1), 2);
        assert_eq!(get(&block, 4, 0), 0x8102);
        assert_eq!(get(&block, 4, 1), 0);
    }

    #[test]
    fn limits() {
        assert_eq!(max_refcount(0), 1);
        assert_eq!(max_refcount(4), 0xffff);
        assert_eq!(max_refcount(6), u64::MAX);
        assert_eq!(block_entries(16, 4), 32768);
        assert_eq!(block_entries(9, 6), 64);
    }

    proptest! {
        #[test]
        fn set_get_round_trip(order in 0u32..=6, index in 0u64..64, value: u64, fill: u8) {
            let mut block = [fill; 512];
            let v = value & max_refcount(order);
            let neighbour = get(&block, order, index ^ 1);
            set(&mut block, order, index, v);
            prop_assert_eq!(get(&block, order, index), v);
            prop_assert_eq!(get(&block, order, index ^ 1), neighbour);
        }
    }
}
