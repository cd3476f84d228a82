//! Linux swap: the signature at the end of the first page, and the
//! version 1 header.
#![deny(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]

use crate::partition::{bytes, le32, sub, ReadAt, Uuid};

use super::{be32, label_utf8, Content, Kind, VolumeId, Window};

/// Linux swap: `SWAPSPACE2` (version 1, with UUID and label at 1024) or
/// `SWAP-SPACE` (version 0) at the end of the first page, for pages of 4
/// to 64 KiB.
pub(super) fn swap<R: ReadAt + ?Sized>(w: &mut Window<'_, R>) -> Result<Option<Content>, R::Error> {
    for page in [4096u32, 8192, 16384, 32768, 65536] {
        let mut magic = [0u8; 10];
        if !w.read(u64::from(page).saturating_sub(10), &mut magic)? {
            return Ok(None);
        }
        let mut c = Content::new(Kind::Swap);
        c.block_size = Some(page);
        if &magic == b"SWAP-SPACE" {
            c.version = Some(0);
            return Ok(Some(c));
        }
        if &magic != b"SWAPSPACE2" {
            continue;
        }
        let mut h = [0u8; 64];
        if !w.read(1024, &mut h)? {
            return Ok(None);
        }
        // The header is in the byte order of the machine that made it.
        let (version, last_page) = match (le32(&h, 0), be32(&h, 0)) {
            (1, _) => (1, le32(&h, 4)),
            (_, 1) => (1, be32(&h, 4)),
            _ => continue,
        };
        c.version = Some(version);
        c.size = u64::from(last_page)
            .checked_add(1)
            .and_then(|n| n.checked_mul(u64::from(page)));
        c.id = Some(VolumeId::Uuid(Uuid(bytes(&h, 12))));
        c.label = label_utf8(sub(&h, 28, 16));
        return Ok(Some(c));
    }
    Ok(None)
}
