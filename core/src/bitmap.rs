//! The persistent bitmap directory: pure decoding of its entries.

use alloc::string::String;

use crate::bytes::{align8, be16, be32, be64};

/// Size of the fixed part of a bitmap directory entry.
pub const FIXED_LEN: usize = 24;

/// Offset of the flags field inside a directory entry.
const FLAGS_FIELD: usize = 12;

/// Bitmap flag: the bitmap was not saved cleanly.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Bitmap flag: the bitmap tracks all writes.
pub const FLAG_AUTO: u32 = 1 << 1;
/// Bitmap flag: unknown extra data may be ignored.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;

/// One persistent dirty bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags (`in_use`, `auto`, `extra_data_compatible`).
    pub flags: u32,
    /// Bitmap type (1: dirty tracking).
    pub kind: u8,
    /// log2 of the granularity in bytes.
    pub granularity_bits: u8,
    /// Name.
    pub name: String,
}

impl Bitmap {
    /// Granularity in bytes (saturating for hostile values).
    pub fn granularity(&self) -> u64 {
        1u64.checked_shl(self.granularity_bits.into()).unwrap_or(0)
    }

    /// Flag names as qemu-img prints them.
    pub fn flag_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        [(FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto")]
            .into_iter()
            .filter(|(bit, _)| self.flags & bit != 0)
            .map(|(_, n)| n)
    }
}

/// Decodes the directory entry starting at `pos` in `dir`; returns the entry
/// and the position of the next one, or `None` if it does not fit.
pub fn decode_entry(dir: &[u8], pos: usize) -> Option<(Bitmap, usize)> {
    let fixed = dir.get(pos..pos.checked_add(FIXED_LEN)?)?;
    let name_size = usize::from(be16(fixed, 18));
    let extra = usize::try_from(be32(fixed, 20)).ok()?;
    let name_start = pos.checked_add(FIXED_LEN)?.checked_add(extra)?;
    let name = dir.get(name_start..name_start.checked_add(name_size)?)?;
    let next = align8(name_start.checked_add(name_size)?)?;
    Some((
        Bitmap {
            table_offset: be64(fixed, 0),
            table_size: be32(fixed, 8),
            flags: be32(fixed, 12),
            kind: fixed[16],
            granularity_bits: fixed[17],
            name: String::from_utf8_lossy(name).into_owned(),
        },
        next,
    ))
}

/// The bytes that set the flags of the directory entry starting at `pos`
/// in the directory: their position relative to the directory's start and
/// their contents.
pub fn encode_flags(pos: usize, flags: u32) -> (usize, [u8; 4]) {
    (pos.saturating_add(FLAGS_FIELD), flags.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_entry() {
        let mut d = alloc::vec![0u8; 32];
        d[0..8].copy_from_slice(&0x50000u64.to_be_bytes());
        d[8..12].copy_from_slice(&1u32.to_be_bytes());
        d[12..16].copy_from_slice(&FLAG_AUTO.to_be_bytes());
        d[16] = 1;
        d[17] = 16;
        d[18..20].copy_from_slice(&3u16.to_be_bytes());
        d[24..27].copy_from_slice(b"bm0");
        let (b, next) = decode_entry(&d, 0).unwrap();
        assert_eq!(next, 32);
        assert_eq!(b.name, "bm0");
        assert_eq!(b.granularity(), 65536);
        assert_eq!(b.flag_names().collect::<alloc::vec::Vec<_>>(), ["auto"]);
        assert!(decode_entry(&d, 16).is_none());
        let (at, bytes) = encode_flags(0, FLAG_AUTO | FLAG_IN_USE);
        d[at..at + 4].copy_from_slice(&bytes);
        assert_eq!(
            decode_entry(&d, 0).unwrap().0.flags,
            FLAG_AUTO | FLAG_IN_USE
        );
    }
}
