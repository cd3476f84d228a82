//! MBR: the four entries of the first sector, and the extended
//! partition's chain of EBRs holding the logical partitions.
#![deny(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]

use super::{
    byte, lba_bytes, le16, le32, push, read_in, sub, Invalid, Partition, PartitionName,
    PartitionTable, PartitionType, ReadAt, Res, MAX_EBR_LINKS, SECTOR_SIZE,
};

/// Whether `s` (a first sector with `55 aa`) is a FAT, exFAT or NTFS boot
/// sector rather than an MBR: such a volume has no partition table (as
/// blkid decides).
pub(super) fn is_boot_sector(s: &[u8]) -> bool {
    let oem = sub(s, 3, 8);
    if oem == b"NTFS    " || oem == b"EXFAT   " {
        return true;
    }
    let jump = matches!(byte(s, 0), 0xeb | 0xe9);
    let bps = le16(s, 11);
    let spc = byte(s, 13);
    let reserved = le16(s, 14);
    let fats = byte(s, 16);
    let fat_name = sub(s, 0x36, 3) == b"FAT" || sub(s, 0x52, 3) == b"FAT";
    jump && fat_name
        && matches!(bps, 512 | 1024 | 2048 | 4096)
        && spc.is_power_of_two()
        && reserved >= 1
        && matches!(fats, 1 | 2)
}

/// One 16-byte MBR or EBR entry.
#[derive(Clone, Copy)]
pub(super) struct MbrEntry {
    pub(super) status: u8,
    pub(super) kind: u8,
    pub(super) lba: u32,
    pub(super) sectors: u32,
}

pub(super) fn mbr_entries(s: &[u8]) -> [MbrEntry; 4] {
    let e = |i: usize| {
        let at = 446usize.saturating_add(i.saturating_mul(16));
        MbrEntry {
            status: byte(s, at),
            kind: byte(s, at.saturating_add(4)),
            lba: le32(s, at.saturating_add(8)),
            sectors: le32(s, at.saturating_add(12)),
        }
    };
    [e(0), e(1), e(2), e(3)]
}

impl MbrEntry {
    pub(super) fn used(&self) -> bool {
        self.kind != 0 && self.sectors != 0
    }
}

/// Follows an extended partition's chain of EBRs, adding its logical
/// partitions. Each EBR's first used non-extended entry is a logical
/// partition (relative to that EBR); its first extended entry links the
/// next EBR (relative to the extended partition's start), as Linux reads it.
pub(super) fn follow_ebr_chain<R: ReadAt + ?Sized>(
    io: &mut R,
    disk_size: u64,
    ext: &MbrEntry,
    table: &mut PartitionTable,
    next: &mut u32,
    visited: &mut heapless::Vec<u64, MAX_EBR_LINKS>,
) -> Res<(), R::Error> {
    let base = u64::from(ext.lba);
    let mut ebr = base;
    loop {
        let bad = |field, value, reason| Invalid {
            structure: "EBR at LBA",
            at: ebr,
            field,
            value,
            reason,
        };
        if visited.contains(&ebr) {
            return Err(bad(
                "EBR LBA",
                ebr,
                "the extended partition's chain loops back to this EBR",
            )
            .into());
        }
        if visited.push(ebr).is_err() {
            return Err(bad(
                "EBR LBA",
                ebr,
                "the extended partition's chain has more than 128 links",
            )
            .into());
        }
        let mut s = [0u8; 512];
        let Some(offset) = lba_bytes(ebr, SECTOR_SIZE) else {
            return Err(bad("EBR LBA", ebr, "beyond any disk").into());
        };
        if !read_in(io, disk_size, offset, &mut s)? {
            return Err(bad("EBR LBA", ebr, "beyond the end of the disk").into());
        }
        if sub(&s, 510, 2) != [0x55, 0xaa] {
            // Linux ends the chain at an EBR without a signature.
            return Ok(());
        }
        let entries = mbr_entries(&s);
        if let Some(d) = entries
            .iter()
            .find(|e| e.used() && !PartitionType::Mbr(e.kind).is_extended())
        {
            let Some(start) = ebr.checked_add(u64::from(d.lba)) else {
                return Err(bad("logical partition start", u64::from(d.lba), "overflows").into());
            };
            push(
                table,
                Partition {
                    number: *next,
                    start: start.saturating_mul(SECTOR_SIZE),
                    size: u64::from(d.sectors).saturating_mul(SECTOR_SIZE),
                    kind: PartitionType::Mbr(d.kind),
                    bootable: d.status == 0x80,
                    logical: true,
                    attributes: 0,
                    guid: None,
                    name: PartitionName::default(),
                },
            );
            *next = next.saturating_add(1);
        }
        let Some(link) = entries
            .iter()
            .find(|e| e.used() && PartitionType::Mbr(e.kind).is_extended())
        else {
            return Ok(());
        };
        let Some(n) = base.checked_add(u64::from(link.lba)) else {
            return Err(bad("next EBR LBA", u64::from(link.lba), "overflows").into());
        };
        ebr = n;
    }
}

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]
pub(super) mod tests {
    use super::super::tests::{invalid, put32, read};
    use super::super::{Flag, Scheme, MAX_PARTITIONS};
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use alloc::vec::Vec;

    /// Writes MBR-style entry `i` of the sector at `sector_at`.
    pub(in crate::partition) fn entry(
        d: &mut [u8],
        sector_at: usize,
        i: usize,
        status: u8,
        kind: u8,
        lba: u32,
        n: u32,
    ) {
        let at = sector_at + 446 + i * 16;
        d[at] = status;
        d[at + 4] = kind;
        put32(d, at + 8, lba);
        put32(d, at + 12, n);
        d[sector_at + 510] = 0x55;
        d[sector_at + 511] = 0xaa;
    }

    /// An MBR disk: a bootable Linux partition, an extended partition at
    /// LBA 100 holding `logicals` logical partitions (EBRs 20 sectors
    /// apart, each partition 10 sectors after its EBR).
    pub(in crate::partition) fn mbr_disk(logicals: u32) -> Vec<u8> {
        let mut d = vec![0u8; 512 * (200 + 20 * logicals as usize)];
        entry(&mut d, 0, 0, 0x80, 0x83, 2048 / 512, 50);
        entry(&mut d, 0, 1, 0, 0x05, 100, 20 * logicals + 10);
        put32(&mut d, 440, 0xdead_beef);
        for k in 0..logicals {
            let ebr = 100 + 20 * k;
            let at = ebr as usize * 512;
            entry(&mut d, at, 0, 0, 0x82, 10, 5 + k);
            if k + 1 < logicals {
                entry(&mut d, at, 1, 0, 0x05, 20 * (k + 1), 20);
            }
        }
        d
    }

    #[test]
    fn mbr_with_logical_partitions() {
        let t = read(&mbr_disk(3)).unwrap().unwrap();
        assert_eq!(
            t.scheme,
            Scheme::Mbr {
                disk_id: 0xdead_beef
            }
        );
        let got: Vec<_> = t
            .partitions
            .iter()
            .map(|p| (p.number, p.start / 512, p.size / 512, p.logical, p.bootable))
            .collect();
        assert_eq!(
            got,
            [
                (1, 4, 50, false, true),
                (2, 100, 70, false, false),
                (5, 110, 5, true, false),
                (6, 130, 6, true, false),
                (7, 150, 7, true, false),
            ]
        );
        let p = &t.partitions;
        assert_eq!(p[0].kind.name(), Some("Linux"));
        assert_eq!(p[1].kind.to_string(), "Extended");
        assert!(p[1].kind.is_extended());
        assert_eq!(p[2].kind.to_string(), "Linux swap");
        assert_eq!(
            PartitionType::Mbr(0x42).to_string(),
            "Windows dynamic (LDM)"
        );
        assert_eq!(PartitionType::Mbr(0x99).to_string(), "0x99");
        assert_eq!(p[0].flags().collect::<Vec<_>>(), [Flag::Bootable]);
    }

    #[test]
    fn ebr_chain_loop_is_refused() {
        let mut d = mbr_disk(3);
        // The third EBR links back to the second.
        entry(&mut d, 140 * 512, 1, 0, 0x05, 20, 20);
        let i = invalid(read(&d));
        assert_eq!((i.structure, i.at, i.field), ("EBR at LBA", 120, "EBR LBA"));
        assert!(i.reason.contains("loops"), "{i}");
        // An EBR linking to itself (the first: offset 0 from the start).
        let mut d = mbr_disk(1);
        entry(&mut d, 100 * 512, 1, 0, 0x05, 0, 20);
        let i = invalid(read(&d));
        assert_eq!(i.at, 100, "{i}");
    }

    #[test]
    fn ebr_chain_too_long_or_outside_is_refused() {
        let d = mbr_disk(MAX_EBR_LINKS as u32 + 5);
        let i = invalid(read(&d));
        assert!(i.reason.contains("more than 128 links"), "{i}");
        let mut d = mbr_disk(2);
        entry(&mut d, 120 * 512, 1, 0, 0x05, 0xffff_0000, 20);
        let i = invalid(read(&d));
        assert_eq!(i.at, 100 + 0xffff_0000, "{i}");
        assert!(i.reason.contains("beyond the end of the disk"), "{i}");
        assert!(
            i.to_string().starts_with("EBR at LBA 4294901860: EBR LBA"),
            "{i}"
        );
        // 128 links is the limit, not an error.
        let t = read(&mbr_disk(MAX_EBR_LINKS as u32)).unwrap().unwrap();
        assert_eq!(t.partitions.len(), MAX_PARTITIONS);
        assert_eq!(t.omitted as usize, 2 + MAX_EBR_LINKS - MAX_PARTITIONS);
    }

    #[test]
    fn not_a_partition_table() {
        assert!(read(&[0u8; 4096]).unwrap().is_none());
        assert!(read(&[0u8; 100]).unwrap().is_none());
        // A status byte that is neither 0x00 nor 0x80.
        let mut d = mbr_disk(0);
        d[446] = 0x12;
        assert!(read(&d).unwrap().is_none());
        // A FAT boot sector (a volume without a table).
        let mut d = vec![0u8; 4096];
        d[0..3].copy_from_slice(&[0xeb, 0x3c, 0x90]);
        d[11..13].copy_from_slice(&512u16.to_le_bytes());
        d[13] = 4;
        d[14] = 1;
        d[16] = 2;
        d[0x36..0x3b].copy_from_slice(b"FAT16");
        d[510] = 0x55;
        d[511] = 0xaa;
        assert!(read(&d).unwrap().is_none());
        d[3..11].copy_from_slice(b"NTFS    ");
        d[0x36..0x3b].fill(0);
        assert!(read(&d).unwrap().is_none());
    }
}
