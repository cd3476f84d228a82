//! The internal snapshot table: pure decoding and encoding of its entries.

use alloc::string::String;
use alloc::vec::Vec;

use crate::bytes::{align8, be16, be32, be64, put16, put32, put64};

/// Size of the fixed part of a snapshot table entry.
pub const FIXED_LEN: usize = 40;
/// QEMU's limit on a snapshot entry's extra data.
pub const MAX_EXTRA: u32 = 1024;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest run time in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state in bytes.
    pub vm_state_size: u64,
    /// Virtual disk size at the time of the snapshot, if recorded.
    pub disk_size: Option<u64>,
    /// Instruction count (record/replay), if recorded.
    pub icount: Option<u64>,
    /// Extra data beyond the known fields, kept verbatim.
    pub extra_unknown: Vec<u8>,
}

/// The variable lengths announced by the fixed part of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryLengths {
    /// Extra data length.
    pub extra: u32,
    /// ID string length.
    pub id: u16,
    /// Name length.
    pub name: u16,
}

impl EntryLengths {
    /// Reads the lengths from the 40-byte fixed part.
    pub fn from_fixed(fixed: &[u8]) -> Self {
        EntryLengths {
            extra: be32(fixed, 36),
            id: be16(fixed, 12),
            name: be16(fixed, 14),
        }
    }

    /// Length of the variable part (extra + id + name), before padding.
    pub fn variable(&self) -> usize {
        self.extra as usize + usize::from(self.id) + usize::from(self.name)
    }

    /// Total entry length including the fixed part and padding.
    pub fn total(&self) -> usize {
        align8(FIXED_LEN + self.variable()).unwrap_or(usize::MAX)
    }
}

impl Snapshot {
    /// Decodes an entry from its fixed part and its variable part (which
    /// holds at least [`EntryLengths::variable`] bytes).
    pub fn decode(fixed: &[u8], var: &[u8]) -> Snapshot {
        let lens = EntryLengths::from_fixed(fixed);
        let extra_len = lens.extra as usize;
        let extra = var.get(..extra_len).unwrap_or(&[]);
        let id_end = extra_len + usize::from(lens.id);
        let id = var.get(extra_len..id_end).unwrap_or(&[]);
        let name = var
            .get(id_end..id_end + usize::from(lens.name))
            .unwrap_or(&[]);
        let mut vm_state_size = u64::from(be32(fixed, 32));
        if extra.len() >= 8 {
            vm_state_size = be64(extra, 0);
        }
        Snapshot {
            l1_table_offset: be64(fixed, 0),
            l1_size: be32(fixed, 8),
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            date_sec: be32(fixed, 16),
            date_nsec: be32(fixed, 20),
            vm_clock_nsec: be64(fixed, 24),
            vm_state_size,
            disk_size: (extra.len() >= 16).then(|| be64(extra, 8)),
            icount: (extra.len() >= 24).then(|| be64(extra, 16)),
            extra_unknown: extra.get(24..).unwrap_or(&[]).to_vec(),
        }
    }

    /// Encodes the entry (with padding), writing the extra data QEMU writes
    /// for version 3 images (VM state size, disk size and icount).
    pub fn encode(&self) -> Vec<u8> {
        let mut extra = Vec::new();
        extra.extend_from_slice(&self.vm_state_size.to_be_bytes());
        extra.extend_from_slice(&self.disk_size.unwrap_or(0).to_be_bytes());
        extra.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
        extra.extend_from_slice(&self.extra_unknown);
        let mut b = alloc::vec![0u8; FIXED_LEN];
        put64(&mut b, 0, self.l1_table_offset);
        put32(&mut b, 8, self.l1_size);
        put16(&mut b, 12, self.id.len() as u16);
        put16(&mut b, 14, self.name.len() as u16);
        put32(&mut b, 16, self.date_sec);
        put32(&mut b, 20, self.date_nsec);
        put64(&mut b, 24, self.vm_clock_nsec);
        put32(&mut b, 32, u32::try_from(self.vm_state_size).unwrap_or(0));
        put32(&mut b, 36, extra.len() as u32);
        b.extend_from_slice(&extra);
        b.extend_from_slice(self.id.as_bytes());
        b.extend_from_slice(self.name.as_bytes());
        let padded = align8(b.len()).unwrap_or(b.len());
        b.resize(padded, 0);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = Snapshot {
            l1_table_offset: 0x40000,
            l1_size: 3,
            id: "1".into(),
            name: "before-upgrade".into(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 42,
            vm_state_size: 0,
            disk_size: Some(1 << 30),
            icount: Some(u64::MAX),
            extra_unknown: Vec::new(),
        };
        let b = s.encode();
        assert_eq!(b.len() % 8, 0);
        let lens = EntryLengths::from_fixed(&b);
        assert_eq!(lens.total(), b.len());
        assert_eq!(Snapshot::decode(&b[..FIXED_LEN], &b[FIXED_LEN..]), s);
    }

    #[test]
    fn short_extra_keeps_defaults() {
        let mut fixed = [0u8; FIXED_LEN];
        put32(&mut fixed, 32, 77);
        let s = Snapshot::decode(&fixed, &[]);
        assert_eq!(s.vm_state_size, 77);
        assert_eq!(s.disk_size, None);
        assert_eq!(s.icount, None);
    }
}
