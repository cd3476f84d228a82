//! LUKS1 and LUKS2 volumes: the binary header, and LUKS2's cipher from
//! its JSON area. (Probing only: unlocking encrypted qcow2 images is
//! `crate::luks`.)
#![deny(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]

use crate::partition::{sub, ReadAt, Uuid};

use super::{be16, label_utf8, Content, Kind, VolumeId, Window};

/// A LUKS volume's cipher: `aes` and `xts-plain64`, for example.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cipher {
    /// The cipher name (`aes`, `serpent`, ...).
    pub name: heapless::String<32>,
    /// The mode (`xts-plain64`, `cbc-essiv:sha256`, ...).
    pub mode: heapless::String<32>,
}

/// LUKS1 / LUKS2 (the binary header; LUKS2's cipher from its JSON).
pub(super) fn luks<R: ReadAt + ?Sized>(
    w: &mut Window<'_, R>,
    s: &[u8],
) -> Result<Option<Content>, R::Error> {
    if sub(s, 0, 6) != b"LUKS\xba\xbe" {
        return Ok(None);
    }
    let version = be16(s, 6);
    let mut c = Content::new(Kind::Luks);
    c.version = Some(u32::from(version));
    let uuid = label_utf8::<40>(sub(s, 168, 40));
    c.id = Uuid::parse(&uuid).map(VolumeId::Uuid);
    match version {
        1 => {
            c.cipher = Some(Cipher {
                name: label_utf8(sub(s, 8, 32)),
                mode: label_utf8(sub(s, 40, 32)),
            });
        }
        2 => {
            c.label = label_utf8(sub(s, 24, 48));
            let mut json = [0u8; 4096];
            if w.read(4096, &mut json)? {
                c.cipher = luks2_cipher(&json);
            }
        }
        _ => return Ok(None),
    }
    Ok(Some(c))
}

/// The first index of `needle` in `hay` at or after `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let rest = hay.get(from..)?;
    let i = rest.windows(needle.len()).position(|w| w == needle)?;
    from.checked_add(i)
}

/// The data segment's `"encryption"` value in LUKS2 JSON (`aes-xts-plain64`),
/// split at its first `-` into cipher and mode.
fn luks2_cipher(json: &[u8]) -> Option<Cipher> {
    let seg = find(json, b"\"segments\"", 0)?;
    let key = find(json, b"\"encryption\"", seg)?;
    let mut i = key.checked_add(12)?;
    while matches!(json.get(i), Some(b' ' | b':' | b'\t' | b'\n' | b'\r')) {
        i = i.checked_add(1)?;
    }
    if json.get(i) != Some(&b'"') {
        return None;
    }
    let start = i.checked_add(1)?;
    let len = json
        .get(start..)?
        .iter()
        .take(64)
        .position(|c| *c == b'"')?;
    let value = sub(json, start, len);
    let dash = value.iter().position(|c| *c == b'-').unwrap_or(value.len());
    Some(Cipher {
        name: label_utf8(value.get(..dash).unwrap_or(&[])),
        mode: label_utf8(value.get(dash.saturating_add(1)..).unwrap_or(&[])),
    })
}
