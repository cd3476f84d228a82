//! Btrfs: the superblock at 64 KiB.
#![deny(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]

use crate::partition::{bytes, le32, le64, sub, ReadAt, Uuid};

use super::{label_utf8, Content, Kind, VolumeId, Window};

/// Btrfs: superblock at 64 KiB, magic `_BHRfS_M`.
pub(super) fn btrfs<R: ReadAt + ?Sized>(
    w: &mut Window<'_, R>,
) -> Result<Option<Content>, R::Error> {
    let mut s = [0u8; 1024];
    if !w.read(0x10000, &mut s)? || sub(&s, 0x40, 8) != b"_BHRfS_M" {
        return Ok(None);
    }
    let sector = le32(&s, 0x90);
    let mut c = Content::new(Kind::Btrfs);
    c.id = Some(VolumeId::Uuid(Uuid(bytes(&s, 0x20))));
    c.size = Some(le64(&s, 0x70));
    c.block_size = (sector.is_power_of_two() && (512..=65536).contains(&sector)).then_some(sector);
    c.label = label_utf8(sub(&s, 0x12b, 256));
    Ok(Some(c))
}
