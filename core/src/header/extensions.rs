//! Header extensions: the area between the fixed header and the backing
//! file name (backing format, feature names, bitmaps, encryption, external
//! data file). Pure decoding and encoding.

use alloc::string::String;
use alloc::vec::Vec;

use super::{
    autoclear, FeatureName, Header, MAX_BACKING_NAME, MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES,
    V2_HEADER_LEN,
};
use crate::bytes::{align8, be32, be64, put32, put64, to_u64, to_usize};
use crate::error::FormatError;

/// Header extension type: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension type: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension type: persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension type: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension type: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Reserved field (must be zero).
    pub reserved: u32,
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Host offset of the bitmap directory.
    pub directory_offset: u64,
}

/// The full disk encryption header pointer extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoExt {
    /// Host offset of the encryption header.
    pub offset: u64,
    /// Length of the encryption header in bytes.
    pub length: u64,
}

/// A header extension this implementation does not interpret, kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownExtension {
    /// Extension type.
    pub kind: u32,
    /// Extension data (without padding).
    pub data: Vec<u8>,
}

impl Header {
    /// Whether `buf` (a prefix of the first cluster) holds the whole header:
    /// its extensions up to the end marker and the backing file name. When
    /// it does not (or the fields are odd), read the whole first cluster.
    pub fn fits_in(buf: &[u8]) -> bool {
        let version = be32(buf, 4);
        let mut off = if version >= 3 {
            be32(buf, 100) as usize
        } else {
            V2_HEADER_LEN as usize
        };
        let backing_end = be64(buf, 8).saturating_add(u64::from(be32(buf, 16)));
        if be64(buf, 8) != 0 && backing_end > to_u64(buf.len()) {
            return false;
        }
        loop {
            let Some(hdr_end) = off.checked_add(8).filter(|e| *e <= buf.len()) else {
                return false;
            };
            let kind = be32(buf, off);
            if kind == EXT_END {
                return true;
            }
            let len = be32(buf, off + 4) as usize;
            off = match align8(len).and_then(|l| hdr_end.checked_add(l)) {
                Some(o) => o,
                None => return false,
            };
        }
    }

    pub(super) fn parse_extensions(
        &mut self,
        buf: &[u8],
        start: u64,
        end: u64,
    ) -> Result<(), FormatError> {
        let mut off = start;
        let mut bitmaps_seen = None;
        while off < end {
            let ext_hdr_end =
                off.checked_add(8)
                    .filter(|e| *e <= end)
                    .ok_or(FormatError::field(
                        "header extension offset",
                        off,
                        "header extension does not fit in the header area",
                    ))?;
            let pos = to_usize(off).unwrap_or(usize::MAX);
            let kind = be32(buf, pos);
            let len = be32(buf, pos.saturating_add(4));
            if u64::from(len) > end - ext_hdr_end {
                return Err(FormatError::field(
                    "header extension length",
                    len.into(),
                    "header extension too large",
                ));
            }
            let data_start = to_usize(ext_hdr_end).unwrap_or(usize::MAX);
            let data = data_start
                .checked_add(len as usize)
                .and_then(|e| buf.get(data_start..e))
                .unwrap_or(&[]);
            match kind {
                EXT_END => return self.finish_extensions(bitmaps_seen),
                EXT_BACKING_FORMAT => {
                    if len >= 16 {
                        return Err(FormatError::field(
                            "backing format extension length",
                            len.into(),
                            "backing format name too long (must be < 16)",
                        ));
                    }
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let raw = &e[2..48];
                        let n = raw.iter().position(|c| *c == 0).unwrap_or(raw.len());
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&raw[..n]).into_owned(),
                        });
                    }
                }
                EXT_DATA_FILE => {
                    if len > MAX_BACKING_NAME {
                        return Err(FormatError::field(
                            "data file extension length",
                            len.into(),
                            "external data file name longer than 1023 bytes",
                        ));
                    }
                    self.data_file = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_CRYPTO => {
                    if len != 16 {
                        return Err(FormatError::field(
                            "encryption header extension length",
                            len.into(),
                            "must be 16",
                        ));
                    }
                    self.crypto = Some(CryptoExt {
                        offset: be64(data, 0),
                        length: be64(data, 8),
                    });
                }
                EXT_BITMAPS => {
                    if len != 24 {
                        return Err(FormatError::field(
                            "bitmaps extension length",
                            len.into(),
                            "must be 24",
                        ));
                    }
                    bitmaps_seen = Some(BitmapsExt {
                        reserved: be32(data, 4),
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    });
                }
                _ => self.unknown_extensions.push(UnknownExtension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            off = ext_hdr_end.saturating_add(u64::from(len).div_ceil(8) * 8);
        }
        self.finish_extensions(bitmaps_seen)
    }

    fn finish_extensions(&mut self, bitmaps: Option<BitmapsExt>) -> Result<(), FormatError> {
        let Some(b) = bitmaps else {
            return Ok(());
        };
        if self.autoclear_features & autoclear::BITMAPS == 0 {
            // Written by a program without bitmap support: the bitmaps are stale.
            self.bitmaps_inconsistent = true;
            return Ok(());
        }
        if b.reserved != 0 {
            return Err(FormatError::field(
                "bitmaps extension reserved field",
                b.reserved.into(),
                "must be zero",
            ));
        }
        if b.nb_bitmaps == 0 || b.nb_bitmaps > MAX_BITMAPS {
            return Err(FormatError::field(
                "nb_bitmaps",
                b.nb_bitmaps.into(),
                "must be between 1 and 65535",
            ));
        }
        if b.directory_size > MAX_BITMAP_DIRECTORY_BYTES {
            return Err(FormatError::field(
                "bitmap_directory_size",
                b.directory_size,
                "bitmap directory too large",
            ));
        }
        if b.directory_offset % self.cluster_size() != 0 || b.directory_offset == 0 {
            return Err(FormatError::field(
                "bitmap_directory_offset",
                b.directory_offset,
                "not aligned to a cluster boundary",
            ));
        }
        self.bitmaps = Some(b);
        Ok(())
    }

    /// Encodes the header extensions (ending with the end marker).
    pub fn encode_extensions(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let mut push = |kind: u32, data: &[u8]| {
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            let padded = align8(b.len()).unwrap_or(b.len());
            b.resize(padded, 0);
        };
        if let Some(f) = &self.backing_format {
            push(EXT_BACKING_FORMAT, f.as_bytes());
        }
        if let Some(d) = &self.data_file {
            push(EXT_DATA_FILE, d.as_bytes());
        }
        if let Some(c) = &self.crypto {
            let mut d = [0u8; 16];
            put64(&mut d, 0, c.offset);
            put64(&mut d, 8, c.length);
            push(EXT_CRYPTO, &d);
        }
        if let Some(bm) = &self.bitmaps {
            let mut d = [0u8; 24];
            put32(&mut d, 0, bm.nb_bitmaps);
            put64(&mut d, 8, bm.directory_size);
            put64(&mut d, 16, bm.directory_offset);
            push(EXT_BITMAPS, &d);
        }
        for u in &self.unknown_extensions {
            push(u.kind, &u.data);
        }
        if !self.feature_names.is_empty() {
            let mut d = Vec::with_capacity(self.feature_names.len() * 48);
            for f in &self.feature_names {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                d.extend_from_slice(&e);
            }
            push(EXT_FEATURE_TABLE, &d);
        }
        push(EXT_END, &[]);
        b
    }
}
