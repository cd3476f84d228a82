//! XFS: the superblock at byte 0.
#![deny(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]

use crate::partition::{bytes, sub, Uuid};

use super::{be16, be32, be64, label_utf8, Content, Kind, VolumeId};

/// XFS: superblock at 0, magic `XFSB` (big-endian fields).
pub(super) fn xfs(s: &[u8]) -> Option<Content> {
    if sub(s, 0, 4) != b"XFSB" {
        return None;
    }
    let block = be32(s, 4);
    let version = be16(s, 100) & 0xf;
    let sect = be16(s, 102);
    if !block.is_power_of_two()
        || !(512..=65536).contains(&block)
        || !(1..=5).contains(&version)
        || !sect.is_power_of_two()
        || !(512..=32768).contains(&sect)
    {
        return None;
    }
    let mut c = Content::new(Kind::Xfs);
    c.block_size = Some(block);
    c.size = be64(s, 8).checked_mul(u64::from(block));
    c.id = Some(VolumeId::Uuid(Uuid(bytes(s, 32))));
    c.label = label_utf8(sub(s, 108, 12));
    c.version = Some(u32::from(version));
    Some(c)
}
