//! ISO 9660: the primary volume descriptor.
#![deny(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]

use crate::partition::{byte, bytes, le16, le32, sub, ReadAt};

use super::{label_bytes, Content, Kind, VolumeId, Window};

/// ISO 9660: the primary volume descriptor (`\x01CD001\x01`), the first of
/// the volume descriptors from 32 KiB (at most 8 looked at: a boot record
/// may come first).
pub(super) fn iso9660<R: ReadAt + ?Sized>(
    w: &mut Window<'_, R>,
) -> Result<Option<Content>, R::Error> {
    let mut s = [0u8; 1024];
    let mut found = false;
    for i in 0u64..8 {
        if !w.read(0x8000u64.saturating_add(i.saturating_mul(2048)), &mut s)?
            || sub(&s, 1, 5) != b"CD001"
            || byte(&s, 0) == 0xff
        {
            return Ok(None);
        }
        if byte(&s, 0) == 1 && byte(&s, 6) == 1 {
            found = true;
            break;
        }
    }
    if !found {
        return Ok(None);
    }
    let block = le16(&s, 128);
    let mut c = Content::new(Kind::Iso9660);
    c.label = label_bytes(sub(&s, 40, 32));
    c.block_size = Some(u32::from(block));
    c.size = u64::from(le32(&s, 80)).checked_mul(u64::from(block));
    let date = |at: usize| {
        let d: [u8; 16] = bytes(&s, at);
        (d.iter().all(u8::is_ascii_digit) && d.iter().any(|c| *c != b'0')).then_some(d)
    };
    c.id = date(830).or_else(|| date(813)).map(VolumeId::IsoDate);
    Ok(Some(c))
}
