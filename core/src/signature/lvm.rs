//! LVM2 physical volumes: the `LABELONE` label and its CRC.
#![deny(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]

use crate::partition::{bytes, crc32_raw, le32, le64, sub, ReadAt};

use super::{Content, Kind, VolumeId, Window};

/// LVM2 PV: a `LABELONE` label in one of the first four sectors, its CRC
/// (LVM's seed 0xf597a6cf, over the label from byte 20) checked.
pub(super) fn lvm2<R: ReadAt + ?Sized>(w: &mut Window<'_, R>) -> Result<Option<Content>, R::Error> {
    for sector in 0u64..4 {
        let mut s = [0u8; 512];
        if !w.read(sector.saturating_mul(512), &mut s)? {
            return Ok(None);
        }
        if sub(&s, 0, 8) != b"LABELONE" || sub(&s, 24, 8) != b"LVM2 001" {
            continue;
        }
        if le64(&s, 8) != sector || crc32_raw(0xf597_a6cf, sub(&s, 20, 492)) != le32(&s, 16) {
            continue;
        }
        let Ok(pv) = usize::try_from(le32(&s, 20)) else {
            continue;
        };
        if pv < 32 || pv.saturating_add(40) > 512 {
            continue;
        }
        let mut c = Content::new(Kind::Lvm2);
        c.id = Some(VolumeId::Lvm(bytes(&s, pv)));
        c.size = Some(le64(&s, pv.saturating_add(32)));
        c.version = Some(2);
        return Ok(Some(c));
    }
    Ok(None)
}
