//! What a disk or partition holds: file system and content signatures,
//! read without a heap.
//!
//! [`probe`] looks at a byte range of anything [`ReadAt`] reads (the guest
//! view of an [`Image`](crate::Image), a partition found by
//! [`PartitionTable::read`](crate::partition::PartitionTable::read), a byte
//! slice) and says what it holds: ext2/3/4, XFS, Btrfs, FAT12/16/32, exFAT,
//! NTFS, ISO 9660, Linux swap, an LVM2 physical volume, LUKS (1 or 2) or a
//! qcow2 image, with the label, UUID or serial number, sizes and the
//! details each format keeps in its first blocks. Every read is bounded (a
//! few KiB per probe, never past the range) and goes into a buffer on the
//! stack (at most 4 KiB); results live in fixed-capacity
//! [`heapless`] strings. Malformed content is "not recognised", never a
//! panic or an error: only the reader's errors are returned.
//!
//! ```
//! use qcowkit_core::signature::{probe, Kind};
//!
//! fn describe(volume: &[u8]) -> Option<Kind> {
//!     let mut io = volume;
//!     probe(&mut io, 0, volume.len() as u64).ok().flatten().map(|c| c.kind)
//! }
//! # assert_eq!(describe(&[0u8; 4096]), None);
//! ```
#![deny(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]

use core::fmt;

use crate::partition::{byte, bytes, read_within, sub, ReadAt, Uuid};

// One module per family of formats; `probe` (here) tries them in turn.
mod btrfs;
mod ext;
mod fat;
mod iso9660;
mod luks;
mod lvm;
mod ntfs;
mod qcow2;
mod swap;
mod xfs;

pub use ext::{ExtFeature, ExtFeatures};
pub use luks::Cipher;

use btrfs::btrfs;
use ext::ext;
use fat::{exfat, fat};
use iso9660::iso9660;
use luks::luks;
use lvm::lvm2;
use ntfs::ntfs;
use qcow2::qcow2;
use swap::swap;
use xfs::xfs;

/// The longest label kept, in bytes of UTF-8 (Btrfs labels reach 255
/// bytes; longer NTFS labels are cut at a character boundary).
pub const LABEL_MAX: usize = 256;

/// A volume label (empty when the volume has none).
pub type Label = heapless::String<LABEL_MAX>;

/// What a volume is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// ext2: no journal, no ext3/ext4 feature.
    Ext2,
    /// ext3: a journal and no feature beyond ext3's.
    Ext3,
    /// ext4: a feature beyond ext3's (extents, 64bit, flex_bg, ...).
    Ext4,
    /// An external ext3/ext4 journal device.
    ExtJournal,
    /// XFS.
    Xfs,
    /// Btrfs.
    Btrfs,
    /// FAT12 (fewer than 4085 clusters).
    Fat12,
    /// FAT16 (4085 clusters or more).
    Fat16,
    /// FAT32 (the FAT size in the 32-bit field).
    Fat32,
    /// exFAT.
    Exfat,
    /// NTFS.
    Ntfs,
    /// An ISO 9660 file system (CD/DVD image).
    Iso9660,
    /// Linux swap space.
    Swap,
    /// An LVM2 physical volume.
    Lvm2,
    /// A LUKS encrypted volume ([`Content::version`] 1 or 2).
    Luks,
    /// A qcow2 image (inside the disk).
    Qcow2,
}

impl Kind {
    /// The name in words: `"ext4"`, `"XFS"`, `"FAT32"`, `"LVM2 PV"`, ...
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Ext2 => "ext2",
            Kind::Ext3 => "ext3",
            Kind::Ext4 => "ext4",
            Kind::ExtJournal => "ext journal",
            Kind::Xfs => "XFS",
            Kind::Btrfs => "Btrfs",
            Kind::Fat12 => "FAT12",
            Kind::Fat16 => "FAT16",
            Kind::Fat32 => "FAT32",
            Kind::Exfat => "exFAT",
            Kind::Ntfs => "NTFS",
            Kind::Iso9660 => "ISO 9660",
            Kind::Swap => "Linux swap",
            Kind::Lvm2 => "LVM2 PV",
            Kind::Luks => "LUKS",
            Kind::Qcow2 => "qcow2",
        }
    }

    /// The `TYPE` blkid gives it (`"vfat"`, `"crypto_LUKS"`,
    /// `"LVM2_member"`, ...; `"qcow2"`, which blkid does not detect).
    pub fn blkid_type(&self) -> &'static str {
        match self {
            Kind::Ext2 => "ext2",
            Kind::Ext3 => "ext3",
            Kind::Ext4 => "ext4",
            Kind::ExtJournal => "jbd",
            Kind::Xfs => "xfs",
            Kind::Btrfs => "btrfs",
            Kind::Fat12 | Kind::Fat16 | Kind::Fat32 => "vfat",
            Kind::Exfat => "exfat",
            Kind::Ntfs => "ntfs",
            Kind::Iso9660 => "iso9660",
            Kind::Swap => "swap",
            Kind::Lvm2 => "LVM2_member",
            Kind::Luks => "crypto_LUKS",
            Kind::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A volume's identifier, in the form its format uses (and blkid prints).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeId {
    /// A UUID (ext, XFS, Btrfs, swap, LUKS).
    Uuid(Uuid),
    /// A 32-bit volume serial number (FAT, exFAT), shown as `ABCD-1234`.
    Serial32(u32),
    /// NTFS's 64-bit volume serial number, shown as 16 hex digits.
    Serial64(u64),
    /// LVM2's 32-character PV UUID, shown in its 6-4-4-4-4-4-6 form.
    Lvm([u8; 32]),
    /// ISO 9660's volume modification (or creation) date, the 16 digits
    /// `YYYYMMDDHHMMSScc`, shown as `YYYY-MM-DD-HH-MM-SS-cc` (blkid's UUID).
    IsoDate([u8; 16]),
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VolumeId::Uuid(u) => u.fmt(f),
            VolumeId::Serial32(s) => write!(f, "{:04X}-{:04X}", s >> 16, s & 0xffff),
            VolumeId::Serial64(s) => write!(f, "{s:016X}"),
            VolumeId::Lvm(id) => write_groups(f, id, &[6, 4, 4, 4, 4, 4, 6]),
            VolumeId::IsoDate(d) => write_groups(f, d, &[4, 2, 2, 2, 2, 2, 2]),
        }
    }
}

/// Writes `b` as ASCII in groups of `sizes` joined by `-`.
fn write_groups(f: &mut fmt::Formatter<'_>, b: &[u8], sizes: &[usize]) -> fmt::Result {
    let mut at = 0usize;
    for (i, n) in sizes.iter().enumerate() {
        if i > 0 {
            f.write_str("-")?;
        }
        for &c in sub(b, at, *n) {
            fmt::Write::write_char(f, char::from(c))?;
        }
        at = at.saturating_add(*n);
    }
    Ok(())
}

/// What [`probe`] found.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content {
    /// The file system or content.
    pub kind: Kind,
    /// The label (empty when none).
    pub label: Label,
    /// UUID or serial number.
    pub id: Option<VolumeId>,
    /// The allocation unit in bytes: the block size (ext, XFS), the sector
    /// size (Btrfs), the cluster size (FAT, exFAT, NTFS, qcow2), the
    /// logical block size (ISO 9660), the page size (swap).
    pub block_size: Option<u32>,
    /// The size in bytes the volume says it has (for a qcow2 image, its
    /// virtual size).
    pub size: Option<u64>,
    /// The format's version: LUKS 1 or 2, swap 0 or 1, XFS 4 or 5, qcow2 2
    /// or 3, exFAT's major revision.
    pub version: Option<u32>,
    /// ext2/3/4: the feature flags.
    pub ext_features: Option<ExtFeatures>,
    /// LUKS: the cipher and mode (LUKS1 from the header; LUKS2 from the
    /// data segment in the header's JSON, when within its first 4 KiB).
    pub cipher: Option<Cipher>,
}

impl Content {
    fn new(kind: Kind) -> Content {
        Content {
            kind,
            label: Label::new(),
            id: None,
            block_size: None,
            size: None,
            version: None,
            ext_features: None,
            cipher: None,
        }
    }
}

/// The range being probed: reads are relative to its start and refused
/// past its end.
struct Window<'a, R: ?Sized> {
    io: &'a mut R,
    base: u64,
    len: u64,
}

impl<R: ReadAt + ?Sized> Window<'_, R> {
    /// Reads `buf.len()` bytes at `at`; `Ok(false)` when they are not all
    /// inside the range.
    fn read(&mut self, at: u64, buf: &mut [u8]) -> Result<bool, R::Error> {
        let Ok(n) = u64::try_from(buf.len()) else {
            return Ok(false);
        };
        match (at.checked_add(n), self.base.checked_add(at)) {
            (Some(end), Some(abs)) if end <= self.len => read_within(self.io, u64::MAX, abs, buf),
            _ => Ok(false),
        }
    }
}

/// Looks at `len` bytes at `offset` and says what they hold, or `None`.
///
/// Reads stay inside the range: a few sectors at fixed places (the first
/// 4 sectors, 1 KiB at 1024 and at 64 KiB, 1 KiB of up to 8 ISO 9660
/// volume descriptors from 32 KiB, the end of the first page for swap), plus, once a format is recognised, what its label
/// needs: one FAT/exFAT root directory cluster (at most 16 KiB), NTFS's
/// `$Volume` MFT record (at most 4 KiB), 4 KiB of LUKS2 JSON.
///
/// # Errors
/// Only the reader's: content that is not a known format, or is
/// malformed, is `Ok(None)` (or found without the parts that are
/// malformed, e.g. a label).
pub fn probe<R: ReadAt + ?Sized>(
    io: &mut R,
    offset: u64,
    len: u64,
) -> Result<Option<Content>, R::Error> {
    let mut w = Window {
        io,
        base: offset,
        len,
    };
    let mut s0 = [0u8; 512];
    let have0 = w.read(0, &mut s0)?;
    if have0 {
        if let Some(c) = qcow2(&s0) {
            return Ok(Some(c));
        }
        if let Some(c) = luks(&mut w, &s0)? {
            return Ok(Some(c));
        }
        if let Some(c) = xfs(&s0) {
            return Ok(Some(c));
        }
    }
    if let Some(c) = lvm2(&mut w)? {
        return Ok(Some(c));
    }
    if let Some(c) = ext(&mut w)? {
        return Ok(Some(c));
    }
    if let Some(c) = btrfs(&mut w)? {
        return Ok(Some(c));
    }
    if let Some(c) = iso9660(&mut w)? {
        return Ok(Some(c));
    }
    if let Some(c) = swap(&mut w)? {
        return Ok(Some(c));
    }
    if have0 {
        if let Some(c) = exfat(&mut w, &s0)? {
            return Ok(Some(c));
        }
        if let Some(c) = ntfs(&mut w, &s0)? {
            return Ok(Some(c));
        }
        if let Some(c) = fat(&mut w, &s0)? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

/// Appends `c` to `label` unless it is full.
fn push_char<const N: usize>(label: &mut heapless::String<N>, c: char) -> bool {
    label.push(c).is_ok()
}

/// A label from UTF-8 bytes (up to the first NUL; invalid sequences read as
/// U+FFFD; trailing spaces dropped).
fn label_utf8<const N: usize>(b: &[u8]) -> heapless::String<N> {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    let mut out = heapless::String::new();
    'outer: for chunk in b.get(..end).unwrap_or(&[]).utf8_chunks() {
        for c in chunk.valid().chars() {
            if !push_char(&mut out, c) {
                break 'outer;
            }
        }
        if !chunk.invalid().is_empty() && !push_char(&mut out, char::REPLACEMENT_CHARACTER) {
            break;
        }
    }
    trim_end(&mut out);
    out
}

/// A label from single-byte characters (FAT's OEM code page read as
/// Latin-1; trailing spaces and NULs dropped).
fn label_bytes(b: &[u8]) -> Label {
    let mut out = Label::new();
    for &c in b {
        if c == 0 || !push_char(&mut out, char::from(c)) {
            break;
        }
    }
    trim_end(&mut out);
    out
}

/// A label from UTF-16LE bytes (up to a NUL; unpaired surrogates read as
/// U+FFFD).
fn label_utf16(b: &[u8]) -> Label {
    let units = b
        .chunks_exact(2)
        .map(|p| u16::from_le_bytes([byte(p, 0), byte(p, 1)]))
        .take_while(|u| *u != 0);
    let mut out = Label::new();
    for c in char::decode_utf16(units) {
        if !push_char(&mut out, c.unwrap_or(char::REPLACEMENT_CHARACTER)) {
            break;
        }
    }
    trim_end(&mut out);
    out
}

fn trim_end<const N: usize>(s: &mut heapless::String<N>) {
    while s.ends_with(' ') {
        s.pop();
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(bytes(b, at))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes(b, at))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes(b, at))
}

/// `1 << shift` as a `u32`, if it fits.
fn pow2(shift: u32) -> Option<u32> {
    1u32.checked_shl(shift)
}

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]
mod tests {
    use super::ext::tests::ext_sb;
    use super::fat::tests::fat16;
    use super::ntfs::tests::ntfs_volume;
    use super::*;
    use crate::partition::{crc32_raw, from_fn, Uuid};
    use alloc::string::ToString;
    use alloc::vec;

    pub(super) fn at(d: &mut [u8], off: usize, b: &[u8]) {
        d[off..off + b.len()].copy_from_slice(b);
    }

    pub(super) fn probe_all(d: &[u8]) -> Option<Content> {
        let mut io = d;
        probe(&mut io, 0, d.len() as u64).unwrap()
    }

    pub(super) const U: [u8; 16] = [
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x10, 0x32, 0x54, 0x76, 0x98, 0xba, 0xdc,
        0xfe,
    ];

    #[test]
    fn xfs_btrfs_iso_qcow2() {
        let mut d = vec![0u8; 0x10000 + 4096];
        at(&mut d, 0, b"XFSB");
        at(&mut d, 4, &4096u32.to_be_bytes());
        at(&mut d, 8, &100u64.to_be_bytes());
        at(&mut d, 32, &U);
        at(&mut d, 100, &0xb4a5u16.to_be_bytes());
        at(&mut d, 102, &512u16.to_be_bytes());
        at(&mut d, 108, b"data");
        let c = probe_all(&d).unwrap();
        assert_eq!(
            (c.kind, c.label.as_str(), c.version),
            (Kind::Xfs, "data", Some(5))
        );
        assert_eq!((c.block_size, c.size), (Some(4096), Some(409_600)));

        let mut d = vec![0u8; 0x10000 + 4096];
        let s = 0x10000;
        at(&mut d, s + 0x20, &U);
        at(&mut d, s + 0x40, b"_BHRfS_M");
        at(&mut d, s + 0x70, &(1u64 << 30).to_le_bytes());
        at(&mut d, s + 0x90, &4096u32.to_le_bytes());
        at(&mut d, s + 0x12b, "h\u{f6}me".as_bytes());
        let c = probe_all(&d).unwrap();
        assert_eq!((c.kind, c.label.as_str()), (Kind::Btrfs, "h\u{f6}me"));
        assert_eq!((c.block_size, c.size), (Some(4096), Some(1 << 30)));
        // A Btrfs label of 256 bytes without a NUL is cut at 256.
        at(&mut d, s + 0x12b, &[b'x'; 300]);
        assert_eq!(probe_all(&d).unwrap().label.len(), 256);

        // A boot record first, then the primary volume descriptor.
        let mut d = vec![0u8; 0xa000];
        at(&mut d, 0x8000, b"\x00CD001\x01EL TORITO SPECIFICATION");
        let p = 0x8800;
        at(&mut d, p, b"\x01CD001\x01");
        at(&mut d, p + 40, b"MY_DISC                         ");
        at(&mut d, p + 80, &100u32.to_le_bytes());
        at(&mut d, p + 128, &2048u16.to_le_bytes());
        at(&mut d, p + 813, b"2026112811401200");
        let c = probe_all(&d).unwrap();
        assert_eq!((c.kind, c.label.as_str()), (Kind::Iso9660, "MY_DISC"));
        assert_eq!(c.id.unwrap().to_string(), "2026-11-28-11-40-12-00");
        assert_eq!(c.size, Some(204_800));
        // A set terminator before any primary descriptor: not ISO 9660.
        d[0x8000] = 0xff;
        assert_eq!(probe_all(&d), None);

        let mut d = vec![0u8; 512];
        at(&mut d, 0, b"QFI\xfb\0\0\0\x03");
        at(&mut d, 20, &16u32.to_be_bytes());
        at(&mut d, 24, &(1u64 << 40).to_be_bytes());
        let c = probe_all(&d).unwrap();
        assert_eq!(
            (c.kind, c.version, c.size, c.block_size),
            (Kind::Qcow2, Some(3), Some(1 << 40), Some(65536))
        );
        d[7] = 9;
        assert_eq!(probe_all(&d), None);
    }

    #[test]
    fn swap_lvm_luks() {
        let mut d = vec![0u8; 8192];
        at(&mut d, 4096 - 10, b"SWAPSPACE2");
        at(&mut d, 1024, &1u32.to_le_bytes());
        at(&mut d, 1028, &255u32.to_le_bytes());
        at(&mut d, 1036, &U);
        at(&mut d, 1052, b"swappy");
        let c = probe_all(&d).unwrap();
        assert_eq!(
            (c.kind, c.version, c.label.as_str()),
            (Kind::Swap, Some(1), "swappy")
        );
        assert_eq!(
            (c.size, c.id),
            (Some(1 << 20), Some(VolumeId::Uuid(Uuid(U))))
        );
        // Made on a big-endian machine.
        at(&mut d, 1024, &1u32.to_be_bytes());
        at(&mut d, 1028, &255u32.to_be_bytes());
        assert_eq!(probe_all(&d).unwrap().size, Some(1 << 20));
        // 64 KiB pages.
        let mut d = vec![0u8; 65536];
        at(&mut d, 65536 - 10, b"SWAP-SPACE");
        let c = probe_all(&d).unwrap();
        assert_eq!((c.version, c.block_size), (Some(0), Some(65536)));

        let mut d = vec![0u8; 4096];
        let l = 512;
        at(&mut d, l, b"LABELONE");
        at(&mut d, l + 8, &1u64.to_le_bytes());
        at(&mut d, l + 20, &32u32.to_le_bytes());
        at(&mut d, l + 24, b"LVM2 001");
        at(&mut d, l + 32, b"AbCdEf0123456789ghijklMNOPQRSTuv");
        at(&mut d, l + 64, &(8u64 << 20).to_le_bytes());
        let crc = crc32_raw(0xf597_a6cf, &d[l + 20..l + 512]);
        at(&mut d, l + 16, &crc.to_le_bytes());
        let c = probe_all(&d).unwrap();
        assert_eq!(c.kind, Kind::Lvm2);
        assert_eq!(
            c.id.unwrap().to_string(),
            "AbCdEf-0123-4567-89gh-ijkl-MNOP-QRSTuv"
        );
        assert_eq!(c.size, Some(8 << 20));
        d[l + 40] ^= 1;
        assert_eq!(probe_all(&d), None, "a bad CRC is not a PV");

        let mut d = vec![0u8; 16384];
        at(&mut d, 0, b"LUKS\xba\xbe\0\x01aes");
        at(&mut d, 40, b"xts-plain64");
        at(&mut d, 168, b"02a88cfc-4a6b-4835-9589-d59d9202e9d5");
        let c = probe_all(&d).unwrap();
        assert_eq!((c.kind, c.version), (Kind::Luks, Some(1)));
        let cipher = c.cipher.unwrap();
        assert_eq!(
            (cipher.name.as_str(), cipher.mode.as_str()),
            ("aes", "xts-plain64")
        );
        assert_eq!(
            c.id.unwrap().to_string(),
            "02a88cfc-4a6b-4835-9589-d59d9202e9d5"
        );
        let mut d = vec![0u8; 16384];
        at(&mut d, 0, b"LUKS\xba\xbe\0\x02");
        at(&mut d, 24, b"vault");
        at(&mut d, 168, b"39300276-782F-4cc9-84f3-a99211c72d33");
        at(
            &mut d,
            4096,
            br#"{"keyslots":{"0":{"area":{"encryption":"twofish-cbc-plain"}}},"segments":{"0":{"type":"crypt","encryption": "serpent-xts-plain64"}}}"#,
        );
        let c = probe_all(&d).unwrap();
        assert_eq!((c.version, c.label.as_str()), (Some(2), "vault"));
        let cipher = c.cipher.unwrap();
        assert_eq!(
            (cipher.name.as_str(), cipher.mode.as_str()),
            ("serpent", "xts-plain64")
        );
        assert_eq!(
            c.id.unwrap().to_string(),
            "39300276-782f-4cc9-84f3-a99211c72d33"
        );
    }

    #[test]
    fn windows_and_hostile_bytes() {
        // Probes never read outside the window, and a window too small for
        // a format does not find it.
        let d = ext_sb(0x3c, 0x2c2, 0x46b);
        let mut io = &d[..];
        assert_eq!(probe(&mut io, 0, 1500).unwrap(), None);
        let mut big = vec![0u8; 4096];
        big.extend_from_slice(&d);
        let mut io = &big[..];
        assert_eq!(
            probe(&mut io, 4096, 8192).unwrap().unwrap().kind,
            Kind::Ext4
        );
        assert_eq!(probe(&mut io, u64::MAX - 10, 1000).unwrap(), None);

        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds = [ext_sb(0x3c, 0x2c2, 0x46b), fat16(), ntfs_volume()];
        for round in 0..3000 {
            let mut d = seeds[round % 3].clone();
            d.resize(0x11000, 0);
            for _ in 0..(1 + next() % 16) {
                let region = [
                    0usize,
                    1024,
                    4 * 4096 + 3 * 1024,
                    (4 + 64) * 512,
                    0x8000,
                    0x10000,
                ][next() as usize % 6];
                let i = region + next() as usize % 1024;
                d[i] = next() as u8;
            }
            if round % 7 == 0 {
                // Format magics over random bytes.
                let magic: &[u8] = [
                    &b"EXFAT   "[..],
                    b"NTFS    ",
                    b"LUKS\xba\xbe\0\x02",
                    b"XFSB",
                    b"QFI\xfb",
                ][next() as usize % 5];
                at(
                    &mut d,
                    if magic.len() == 8 && magic[0] != b'L' {
                        3
                    } else {
                        0
                    },
                    magic,
                );
            }
            let len = d.len() as u64;
            let mut total = 0usize;
            let mut io = from_fn(|off: u64, buf: &mut [u8]| {
                assert!(off + buf.len() as u64 <= len, "read past the window");
                assert!(buf.len() <= 4096, "a read of {} bytes", buf.len());
                total += buf.len();
                BlockRead::read_at(&mut &d[..], off, buf)
            });
            let _ = probe(&mut io, 0, len);
            assert!(total <= 64 * 1024, "{total} bytes read");
        }
    }

    use crate::io::BlockRead;
}
