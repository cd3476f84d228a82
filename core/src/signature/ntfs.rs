//! NTFS: the boot sector, and the label from the `$Volume` MFT record.
#![deny(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]

use crate::partition::{byte, bytes, le16, le32, le64, sub, ReadAt};

use super::{label_utf16, pow2, Content, Kind, Label, VolumeId, Window};

/// NTFS: `NTFS    ` at 3; the serial number from the boot sector, the label
/// from the `$VOLUME_NAME` attribute of MFT record 3 (`$Volume`), its
/// update sequence applied.
pub(super) fn ntfs<R: ReadAt + ?Sized>(
    w: &mut Window<'_, R>,
    s: &[u8],
) -> Result<Option<Content>, R::Error> {
    if sub(s, 3, 8) != b"NTFS    " {
        return Ok(None);
    }
    let bps = u32::from(le16(s, 11));
    let raw = byte(s, 13);
    let spc = if raw <= 0x80 {
        Some(u32::from(raw))
    } else {
        256u32.checked_sub(u32::from(raw)).and_then(pow2)
    };
    let cluster = spc.and_then(|n| n.checked_mul(bps));
    let (Some(cluster), true) = (
        cluster,
        bps.is_power_of_two() && (256..=4096).contains(&bps),
    ) else {
        return Ok(None);
    };
    if cluster == 0 || !cluster.is_power_of_two() || cluster > (1 << 21) {
        return Ok(None);
    }
    let mut c = Content::new(Kind::Ntfs);
    c.id = Some(VolumeId::Serial64(le64(s, 72)));
    c.block_size = Some(cluster);
    c.size = le64(s, 40).checked_mul(u64::from(bps));
    let per = byte(s, 64);
    let record = if per < 0x80 {
        u32::from(per).checked_mul(cluster)
    } else {
        256u32.checked_sub(u32::from(per)).and_then(pow2)
    };
    let Some(record) = record.filter(|r| (512..=4096).contains(r) && r.is_power_of_two()) else {
        return Ok(Some(c));
    };
    let at = le64(s, 48)
        .checked_mul(u64::from(cluster))
        .and_then(|m| m.checked_add(u64::from(record).saturating_mul(3)));
    let mut buf = [0u8; 4096];
    let Ok(rlen) = usize::try_from(record) else {
        return Ok(Some(c));
    };
    let rec = buf.get_mut(..rlen).unwrap_or(&mut []);
    if let Some(at) = at {
        if w.read(at, rec)? {
            if let Some(label) = ntfs_volume_name(rec) {
                c.label = label;
            }
        }
    }
    Ok(Some(c))
}

/// The `$VOLUME_NAME` (0x60) attribute's value in an MFT record.
fn ntfs_volume_name(rec: &mut [u8]) -> Option<Label> {
    if sub(rec, 0, 4) != b"FILE" {
        return None;
    }
    // The update sequence: the last two bytes of every 512-byte stride hold
    // the sequence number; the real bytes are in the array.
    let usa = usize::from(le16(rec, 4));
    let count = usize::from(le16(rec, 6));
    let strides = rec.len() / 512;
    if count != strides.checked_add(1)? {
        return None;
    }
    let seq: [u8; 2] = bytes(rec, usa);
    for i in 1..count {
        let pos = i.checked_mul(512)?.checked_sub(2)?;
        let fix: [u8; 2] = bytes(rec, usa.checked_add(i.checked_mul(2)?)?);
        let slot = rec.get_mut(pos..pos.checked_add(2)?)?;
        if slot != seq {
            return None;
        }
        slot.copy_from_slice(&fix);
    }
    let mut off = usize::from(le16(rec, 20));
    for _ in 0..rec.len() / 16 {
        let kind = le32(rec, off);
        if kind == 0xffff_ffff {
            return None;
        }
        let len = usize::try_from(le32(rec, off.checked_add(4)?)).ok()?;
        if len < 16 || off.checked_add(len)? > rec.len() {
            return None;
        }
        if kind == 0x60 && byte(rec, off.checked_add(8)?) == 0 {
            let vlen = usize::try_from(le32(rec, off.checked_add(16)?)).ok()?;
            let voff = usize::from(le16(rec, off.checked_add(20)?));
            if voff.checked_add(vlen)? > len {
                return None;
            }
            return Some(label_utf16(sub(rec, off.checked_add(voff)?, vlen)));
        }
        off = off.checked_add(len)?;
    }
    None
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

    #[test]
    fn exfat_and_ntfs_labels() {
        let mut d = vec![0u8; 1 << 20];
        at(&mut d, 0, &[0xeb, 0x76, 0x90]);
        at(&mut d, 3, b"EXFAT   ");
        at(&mut d, 72, &2048u64.to_le_bytes());
        at(&mut d, 88, &128u32.to_le_bytes());
        at(&mut d, 96, &4u32.to_le_bytes());
        at(&mut d, 100, &0x6b7f_bd9cu32.to_le_bytes());
        d[105] = 1;
        d[108] = 9;
        d[109] = 3;
        let root = (128 + 2 * 8) * 512;
        d[root] = 0x81;
        d[root + 32] = 0x83;
        d[root + 33] = 4;
        at(&mut d, root + 34, b"\xe9\0t\0\xe9\0!\0");
        let c = probe_all(&d).unwrap();
        assert_eq!((c.kind, c.label.as_str()), (Kind::Exfat, "\u{e9}t\u{e9}!"));
        assert_eq!(
            (c.id.unwrap().to_string(), c.block_size),
            ("6B7F-BD9C".to_string(), Some(4096))
        );
        assert_eq!((c.size, c.version), (Some(1 << 20), Some(1)));

        let mut d = ntfs_volume();
        let c = probe_all(&d).unwrap();
        assert_eq!((c.kind, c.label.as_str()), (Kind::Ntfs, "Windows \u{2603}"));
        assert_eq!(c.id.unwrap().to_string(), "2634068D3DDAB42F");
        assert_eq!((c.block_size, c.size), (Some(4096), Some(8 << 20)));
        // A broken update sequence: NTFS without a label.
        let rec = 4 * 4096 + 3 * 1024;
        d[rec + 510] ^= 1;
        let c = probe_all(&d).unwrap();
        assert_eq!((c.kind, c.label.as_str()), (Kind::Ntfs, ""));
        // An attribute of length 0 (a loop if followed): no label.
        let mut d = ntfs_volume();
        at(&mut d, rec + 56 + 4, &0u32.to_le_bytes());
        assert_eq!(probe_all(&d).unwrap().label.as_str(), "");
        // An attribute running past the record.
        let mut d = ntfs_volume();
        at(&mut d, rec + 56 + 4, &5000u32.to_le_bytes());
        assert_eq!(probe_all(&d).unwrap().label.as_str(), "");
    }

    /// An NTFS volume: 4 KiB clusters, the MFT at cluster 4, 1 KiB records,
    /// record 3 with a `$VOLUME_NAME` that crosses the first 512-byte stride.
    pub(in crate::signature) fn ntfs_volume() -> Vec<u8> {
        let mut d = vec![0u8; 64 * 1024];
        at(&mut d, 3, b"NTFS    ");
        at(&mut d, 11, &512u16.to_le_bytes());
        d[13] = 8;
        at(&mut d, 40, &16384u64.to_le_bytes());
        at(&mut d, 48, &4u64.to_le_bytes());
        d[64] = 0xf6; // 2^10 bytes per record
        at(&mut d, 72, &0x2634_068d_3dda_b42fu64.to_le_bytes());
        let rec = 4 * 4096 + 3 * 1024;
        let r = &mut d[rec..rec + 1024];
        at(r, 0, b"FILE");
        at(r, 4, &48u16.to_le_bytes());
        at(r, 6, &3u16.to_le_bytes());
        at(r, 20, &56u16.to_le_bytes());
        // A $STANDARD_INFORMATION attribute, then $VOLUME_NAME at 0x1e8
        // whose name crosses byte 510.
        at(r, 56, &0x10u32.to_le_bytes());
        at(r, 60, &0x1b0u32.to_le_bytes());
        let v = 56 + 0x1b0;
        at(r, v, &0x60u32.to_le_bytes());
        at(r, v + 4, &0x30u32.to_le_bytes());
        at(r, v + 16, &18u32.to_le_bytes());
        at(r, v + 20, &0x18u16.to_le_bytes());
        let mut name = Vec::new();
        for u in "Windows \u{2603}".encode_utf16() {
            name.extend_from_slice(&u.to_le_bytes());
        }
        at(r, v + 0x18, &name);
        at(r, v + 0x30, &0xffff_ffffu32.to_le_bytes());
        // The update sequence: number 0x0007, real bytes in the array.
        let real1 = [r[510], r[511]];
        let real2 = [r[1022], r[1023]];
        at(r, 48, &[7, 0]);
        at(r, 50, &real1);
        at(r, 52, &real2);
        at(r, 510, &[7, 0]);
        at(r, 1022, &[7, 0]);
        d
    }
}
