//! FAT12/16/32 and exFAT: the boot sector, and the label in the root
//! directory.
#![deny(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]

use crate::partition::{byte, bytes, le16, le32, le64, sub, ReadAt};

use super::{label_bytes, label_utf16, pow2, Content, Kind, Label, VolumeId, Window};

/// Reads up to `max` bytes of a directory at `start` in 512-byte pieces,
/// calling `entry` for each 32-byte entry until it returns `Some` or says
/// to stop (`Err(())`).
fn scan_dir<R: ReadAt + ?Sized, T>(
    w: &mut Window<'_, R>,
    start: u64,
    max: u64,
    mut entry: impl FnMut(&[u8]) -> Result<Option<T>, ()>,
) -> Result<Option<T>, R::Error> {
    let mut done = 0u64;
    while done < max.min(16384) {
        let mut s = [0u8; 512];
        if !w.read(start.saturating_add(done), &mut s)? {
            return Ok(None);
        }
        for e in s.chunks_exact(32) {
            match entry(e) {
                Ok(Some(t)) => return Ok(Some(t)),
                Ok(None) => {}
                Err(()) => return Ok(None),
            }
        }
        done = done.saturating_add(512);
    }
    Ok(None)
}

/// exFAT: `EXFAT   ` at 3, the label in the root directory's first cluster.
pub(super) fn exfat<R: ReadAt + ?Sized>(
    w: &mut Window<'_, R>,
    s: &[u8],
) -> Result<Option<Content>, R::Error> {
    if sub(s, 3, 8) != b"EXFAT   " || sub(s, 11, 53).iter().any(|b| *b != 0) {
        return Ok(None);
    }
    let bps_shift = u32::from(byte(s, 108));
    let spc_shift = u32::from(byte(s, 109));
    if !(9..=12).contains(&bps_shift) || spc_shift > 25u32.saturating_sub(bps_shift) {
        return Ok(None);
    }
    let cluster = pow2(bps_shift.saturating_add(spc_shift));
    let mut c = Content::new(Kind::Exfat);
    c.id = Some(VolumeId::Serial32(le32(s, 100)));
    c.block_size = cluster;
    c.size = le64(s, 72).checked_mul(1u64 << bps_shift);
    c.version = Some(u32::from(byte(s, 105)));
    let heap = u64::from(le32(s, 88));
    let root = u64::from(le32(s, 96));
    if let (Some(cluster), Some(rel)) = (cluster, root.checked_sub(2)) {
        let sector = rel
            .checked_shl(spc_shift)
            .and_then(|r| r.checked_add(heap))
            .and_then(|r| r.checked_mul(1u64 << bps_shift));
        if let Some(at) = sector {
            let label = scan_dir(w, at, u64::from(cluster), |e| match byte(e, 0) {
                0x00 => Err(()),
                0x83 => {
                    let n = usize::from(byte(e, 1).min(11));
                    Ok(Some(label_utf16(sub(e, 2, n.saturating_mul(2)))))
                }
                _ => Ok(None),
            })?;
            if let Some(l) = label {
                c.label = l;
            }
        }
    }
    Ok(Some(c))
}

/// FAT12/16/32: a valid BPB; which FAT from the BPB and the cluster count
/// (as Linux decides); the label from the root directory's volume label entry, else
/// from the boot sector (`NO NAME` is none).
pub(super) fn fat<R: ReadAt + ?Sized>(
    w: &mut Window<'_, R>,
    s: &[u8],
) -> Result<Option<Content>, R::Error> {
    let bps = u32::from(le16(s, 11));
    let spc = u32::from(byte(s, 13));
    let reserved = u32::from(le16(s, 14));
    let fats = u32::from(byte(s, 16));
    let root_entries = u32::from(le16(s, 17));
    let media = byte(s, 21);
    let named = sub(s, 0x36, 3) == b"FAT" || sub(s, 0x52, 3) == b"FAT";
    let jump = byte(s, 0) == 0xe9 || (byte(s, 0) == 0xeb && byte(s, 2) == 0x90);
    if !(named || jump)
        || !matches!(bps, 512 | 1024 | 2048 | 4096)
        || spc == 0
        || !spc.is_power_of_two()
        || reserved == 0
        || !(1..=4).contains(&fats)
        || !(media == 0xf0 || media >= 0xf8)
    {
        return Ok(None);
    }
    let fat16_size = u32::from(le16(s, 22));
    let fat_size = match fat16_size {
        0 => le32(s, 36),
        n => n,
    };
    let total = match u32::from(le16(s, 19)) {
        0 => le32(s, 32),
        n => n,
    };
    let root_sectors = root_entries
        .checked_mul(32)
        .and_then(|b| b.checked_add(bps.saturating_sub(1)))
        .and_then(|b| b.checked_div(bps));
    let fat_end = fats
        .checked_mul(fat_size)
        .and_then(|f| f.checked_add(reserved));
    let (Some(root_sectors), Some(fat_end)) = (root_sectors, fat_end) else {
        return Ok(None);
    };
    let Some(first_data) = fat_end.checked_add(root_sectors) else {
        return Ok(None);
    };
    if fat_size == 0 || total <= first_data {
        return Ok(None);
    }
    // FAT32 keeps its FAT size in the 32-bit field (the 16-bit one is 0),
    // whatever its cluster count (mkfs.vfat -F 32 makes small ones); the
    // others are FAT12 below 4085 clusters (as Linux and blkid decide).
    let clusters = total
        .saturating_sub(first_data)
        .checked_div(spc)
        .unwrap_or(0);
    let kind = if fat16_size == 0 {
        Kind::Fat32
    } else if clusters < 4085 {
        Kind::Fat12
    } else {
        Kind::Fat16
    };
    // The extended BPB: at 0x40 for FAT32, at 0x24 otherwise.
    let ebpb: usize = if kind == Kind::Fat32 { 0x40 } else { 0x24 };
    let (sig_at, id_at, label_at) = (
        ebpb.saturating_add(2),
        ebpb.saturating_add(3),
        ebpb.saturating_add(7),
    );
    let mut c = Content::new(kind);
    c.block_size = bps.checked_mul(spc);
    c.size = Some(u64::from(total).saturating_mul(u64::from(bps)));
    let mut boot_label = Label::new();
    if matches!(byte(s, sig_at), 0x28 | 0x29) {
        c.id = Some(VolumeId::Serial32(le32(s, id_at)));
        if byte(s, sig_at) == 0x29 {
            boot_label = label_bytes(sub(s, label_at, 11));
        }
    }
    // The root directory: after the FATs (FAT12/16), or its first cluster.
    let (root_sector, root_bytes) = if kind == Kind::Fat32 {
        let cl = le32(s, 44);
        let at = cl
            .checked_sub(2)
            .and_then(|r| r.checked_mul(spc))
            .and_then(|r| r.checked_add(first_data));
        (at, spc.saturating_mul(bps))
    } else {
        (Some(fat_end), root_entries.saturating_mul(32))
    };
    let mut label = None;
    if let Some(sector) = root_sector {
        let at = u64::from(sector).saturating_mul(u64::from(bps));
        label = scan_dir(w, at, u64::from(root_bytes), |e| match byte(e, 0) {
            0x00 => Err(()),
            0xe5 => Ok(None),
            _ => {
                let attr = byte(e, 11);
                if attr & 0x0f != 0x0f && attr & 0x18 == 0x08 {
                    let mut name: [u8; 11] = bytes(e, 0);
                    if name[0] == 0x05 {
                        name[0] = 0xe5;
                    }
                    Ok(Some(label_bytes(&name)))
                } else {
                    Ok(None)
                }
            }
        })?;
    }
    let label = label.unwrap_or(boot_label);
    if label.as_str() != "NO NAME" {
        c.label = label;
    }
    Ok(Some(c))
}

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]
pub(super) mod tests {
    use super::super::tests::{at, probe_all};
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use alloc::vec::Vec;

    pub(in crate::signature) fn fat16() -> Vec<u8> {
        // 16 MiB, 2 KiB clusters: 8192 clusters is FAT16.
        let mut d = vec![0u8; 64 * 1024];
        at(&mut d, 0, &[0xeb, 0x3c, 0x90]);
        at(&mut d, 11, &512u16.to_le_bytes());
        d[13] = 4;
        at(&mut d, 14, &4u16.to_le_bytes());
        d[16] = 2;
        at(&mut d, 17, &512u16.to_le_bytes());
        at(&mut d, 19, &32768u16.to_le_bytes());
        d[21] = 0xf8;
        at(&mut d, 22, &32u16.to_le_bytes());
        d[0x26] = 0x29;
        at(&mut d, 0x27, &0xd9c8_6cecu32.to_le_bytes());
        at(&mut d, 0x2b, b"BOOTLABEL  FAT16   ");
        // Root directory after 4 reserved + 2 x 32 FAT sectors.
        let root = (4 + 64) * 512;
        at(&mut d, root, b"DELETED    ");
        d[root] = 0xe5;
        d[root + 11] = 0x08;
        at(
            &mut d,
            root + 32,
            b"A\0b\0c\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        );
        d[root + 32 + 11] = 0x0f;
        at(&mut d, root + 64, b"ROOT LABEL ");
        d[root + 64 + 11] = 0x08;
        d[510] = 0x55;
        d[511] = 0xaa;
        d
    }

    #[test]
    fn fat_label_from_the_root_directory() {
        let d = fat16();
        let c = probe_all(&d).unwrap();
        assert_eq!((c.kind, c.label.as_str()), (Kind::Fat16, "ROOT LABEL"));
        assert_eq!(c.id.unwrap().to_string(), "D9C8-6CEC");
        assert_eq!((c.block_size, c.size), (Some(2048), Some(16 << 20)));
        // No root entry: the boot sector's label; "NO NAME" is none.
        let mut d = fat16();
        d[(4 + 64) * 512 + 64..].fill(0);
        assert_eq!(probe_all(&d).unwrap().label.as_str(), "BOOTLABEL");
        at(&mut d, 0x2b, b"NO NAME    ");
        assert_eq!(probe_all(&d).unwrap().label.as_str(), "");
        // Fewer clusters: FAT12.
        let mut d = fat16();
        at(&mut d, 19, &4000u16.to_le_bytes());
        assert_eq!(probe_all(&d).unwrap().kind, Kind::Fat12);
        // FAT32: no root entries, 32-bit FAT size, label at 0x47.
        let mut d = vec![0u8; 2 << 20];
        at(&mut d, 0, &[0xeb, 0x58, 0x90]);
        at(&mut d, 11, &512u16.to_le_bytes());
        d[13] = 1;
        at(&mut d, 14, &32u16.to_le_bytes());
        d[16] = 2;
        d[21] = 0xf8;
        at(&mut d, 32, &200_000u32.to_le_bytes());
        at(&mut d, 36, &1600u32.to_le_bytes());
        at(&mut d, 44, &2u32.to_le_bytes());
        d[0x42] = 0x29;
        at(&mut d, 0x43, &0x1234_abcdu32.to_le_bytes());
        at(&mut d, 0x47, b"ESP        FAT32   ");
        let c = probe_all(&d).unwrap();
        assert_eq!((c.kind, c.label.as_str()), (Kind::Fat32, "ESP"));
        assert_eq!(c.id.unwrap().to_string(), "1234-ABCD");
        // The root cluster (2) starts after 32 + 2 x 1600 sectors.
        let root = (32 + 3200) * 512;
        at(&mut d, root, b"EFI SYSTEM ");
        d[root + 11] = 0x08;
        assert_eq!(probe_all(&d).unwrap().label.as_str(), "EFI SYSTEM");
        // A BPB of zeros is not FAT.
        let mut d = fat16();
        at(&mut d, 22, &0u16.to_le_bytes());
        assert_eq!(probe_all(&d), None);
    }
}
