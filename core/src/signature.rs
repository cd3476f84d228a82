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

use crate::partition::{byte, bytes, crc32_raw, le16, le32, le64, read_within, sub, ReadAt, Uuid};

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

/// The feature flags of an ext2/3/4 superblock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtFeatures {
    /// `s_feature_compat`.
    pub compat: u32,
    /// `s_feature_incompat`.
    pub incompat: u32,
    /// `s_feature_ro_compat`.
    pub ro_compat: u32,
}

/// One ext feature flag: which word and which bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtFeature {
    /// 0: compatible, 1: incompatible, 2: read-only compatible.
    pub set: u8,
    /// The bit (0-31).
    pub bit: u8,
}

const EXT_COMPAT: &[(u8, &str)] = &[
    (0, "dir_prealloc"),
    (1, "imagic_inodes"),
    (2, "has_journal"),
    (3, "ext_attr"),
    (4, "resize_inode"),
    (5, "dir_index"),
    (6, "lazy_bg"),
    (8, "snapshot_bitmap"),
    (9, "sparse_super2"),
    (10, "fast_commit"),
    (11, "stable_inodes"),
    (12, "orphan_file"),
];
const EXT_INCOMPAT: &[(u8, &str)] = &[
    (0, "compression"),
    (1, "filetype"),
    (2, "needs_recovery"),
    (3, "journal_dev"),
    (4, "meta_bg"),
    (6, "extent"),
    (7, "64bit"),
    (8, "mmp"),
    (9, "flex_bg"),
    (10, "ea_inode"),
    (12, "dirdata"),
    (13, "metadata_csum_seed"),
    (14, "large_dir"),
    (15, "inline_data"),
    (16, "encrypt"),
    (17, "casefold"),
];
const EXT_RO_COMPAT: &[(u8, &str)] = &[
    (0, "sparse_super"),
    (1, "large_file"),
    (3, "huge_file"),
    (4, "uninit_bg"),
    (5, "dir_nlink"),
    (6, "extra_isize"),
    (7, "snapshot"),
    (8, "quota"),
    (9, "bigalloc"),
    (10, "metadata_csum"),
    (11, "replica"),
    (12, "read-only"),
    (13, "project"),
    (14, "shared_blocks"),
    (15, "verity"),
    (16, "orphan_present"),
];

impl ExtFeature {
    /// e2fsprogs' name of the feature (`"has_journal"`, `"extent"`,
    /// `"metadata_csum"`, ...), `None` for a bit it does not name.
    pub fn name(&self) -> Option<&'static str> {
        let table = match self.set {
            0 => EXT_COMPAT,
            1 => EXT_INCOMPAT,
            _ => EXT_RO_COMPAT,
        };
        table.iter().find(|t| t.0 == self.bit).map(|t| t.1)
    }
}

impl fmt::Display for ExtFeature {
    /// The name, or e2fsprogs' `FEATURE_C12` / `FEATURE_I20` / `FEATURE_R30`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => {
                let c = match self.set {
                    0 => 'C',
                    1 => 'I',
                    _ => 'R',
                };
                write!(f, "FEATURE_{c}{}", self.bit)
            }
        }
    }
}

impl ExtFeatures {
    /// The features set, in dumpe2fs's order (compatible, incompatible,
    /// read-only compatible; each by bit).
    pub fn iter(&self) -> impl Iterator<Item = ExtFeature> + '_ {
        let words = [self.compat, self.incompat, self.ro_compat];
        (0u8..3).flat_map(move |set| {
            let w = words.get(usize::from(set)).copied().unwrap_or(0);
            (0u8..32)
                .filter(move |b| w & (1u32 << b) != 0)
                .map(move |bit| ExtFeature { set, bit })
        })
    }
}

/// A LUKS volume's cipher: `aes` and `xts-plain64`, for example.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cipher {
    /// The cipher name (`aes`, `serpent`, ...).
    pub name: heapless::String<32>,
    /// The mode (`xts-plain64`, `cbc-essiv:sha256`, ...).
    pub mode: heapless::String<32>,
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

/// A nested qcow2 image: magic `QFI\xfb`, version 2 or 3.
fn qcow2(s: &[u8]) -> Option<Content> {
    if sub(s, 0, 4) != b"QFI\xfb" {
        return None;
    }
    let version = be32(s, 4);
    let cluster_bits = be32(s, 20);
    if !matches!(version, 2 | 3) || !(9..=21).contains(&cluster_bits) {
        return None;
    }
    let mut c = Content::new(Kind::Qcow2);
    c.version = Some(version);
    c.block_size = pow2(cluster_bits);
    c.size = Some(be64(s, 24));
    Some(c)
}

/// LUKS1 / LUKS2 (the binary header; LUKS2's cipher from its JSON).
fn luks<R: ReadAt + ?Sized>(w: &mut Window<'_, R>, s: &[u8]) -> Result<Option<Content>, R::Error> {
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

/// XFS: superblock at 0, magic `XFSB` (big-endian fields).
fn xfs(s: &[u8]) -> Option<Content> {
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

/// LVM2 PV: a `LABELONE` label in one of the first four sectors, its CRC
/// (LVM's seed 0xf597a6cf, over the label from byte 20) checked.
fn lvm2<R: ReadAt + ?Sized>(w: &mut Window<'_, R>) -> Result<Option<Content>, R::Error> {
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

/// ext2/3/4: superblock at 1024, magic 0xef53; which of the three from the
/// feature flags, as blkid decides.
fn ext<R: ReadAt + ?Sized>(w: &mut Window<'_, R>) -> Result<Option<Content>, R::Error> {
    let mut s = [0u8; 512];
    if !w.read(1024, &mut s)? || le16(&s, 0x38) != 0xef53 {
        return Ok(None);
    }
    let log = le32(&s, 0x18);
    if log > 6 {
        return Ok(None);
    }
    let f = if le32(&s, 0x4c) >= 1 {
        ExtFeatures {
            compat: le32(&s, 0x5c),
            incompat: le32(&s, 0x60),
            ro_compat: le32(&s, 0x64),
        }
    } else {
        ExtFeatures::default()
    };
    const HAS_JOURNAL: u32 = 0x4;
    const JOURNAL_DEV: u32 = 0x8;
    const EXT23_RO: u32 = 0x7; // sparse_super, large_file, btree_dir
    const EXT2_INCOMPAT: u32 = 0x12; // filetype, meta_bg
    const EXT3_INCOMPAT: u32 = 0x16; // filetype, needs_recovery, meta_bg
    let ext23 = f.ro_compat & !EXT23_RO == 0;
    let kind = if f.incompat & JOURNAL_DEV != 0 {
        Kind::ExtJournal
    } else if f.compat & HAS_JOURNAL == 0 && ext23 && f.incompat & !EXT2_INCOMPAT == 0 {
        Kind::Ext2
    } else if f.compat & HAS_JOURNAL != 0 && ext23 && f.incompat & !EXT3_INCOMPAT == 0 {
        Kind::Ext3
    } else {
        Kind::Ext4
    };
    let block = 1024u32.checked_shl(log);
    let mut blocks = u64::from(le32(&s, 4));
    if f.incompat & 0x80 != 0 {
        blocks |= u64::from(le32(&s, 0x150)) << 32;
    }
    let mut c = Content::new(kind);
    c.block_size = block;
    c.size = block.and_then(|b| blocks.checked_mul(u64::from(b)));
    c.id = Some(VolumeId::Uuid(Uuid(bytes(&s, 0x68))));
    c.label = label_utf8(sub(&s, 0x78, 16));
    c.ext_features = Some(f);
    Ok(Some(c))
}

/// Btrfs: superblock at 64 KiB, magic `_BHRfS_M`.
fn btrfs<R: ReadAt + ?Sized>(w: &mut Window<'_, R>) -> Result<Option<Content>, R::Error> {
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

/// ISO 9660: the primary volume descriptor (`\x01CD001\x01`), the first of
/// the volume descriptors from 32 KiB (at most 8 looked at: a boot record
/// may come first).
fn iso9660<R: ReadAt + ?Sized>(w: &mut Window<'_, R>) -> Result<Option<Content>, R::Error> {
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

/// Linux swap: `SWAPSPACE2` (version 1, with UUID and label at 1024) or
/// `SWAP-SPACE` (version 0) at the end of the first page, for pages of 4
/// to 64 KiB.
fn swap<R: ReadAt + ?Sized>(w: &mut Window<'_, R>) -> Result<Option<Content>, R::Error> {
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
fn exfat<R: ReadAt + ?Sized>(w: &mut Window<'_, R>, s: &[u8]) -> Result<Option<Content>, R::Error> {
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

/// NTFS: `NTFS    ` at 3; the serial number from the boot sector, the label
/// from the `$VOLUME_NAME` attribute of MFT record 3 (`$Volume`), its
/// update sequence applied.
fn ntfs<R: ReadAt + ?Sized>(w: &mut Window<'_, R>, s: &[u8]) -> Result<Option<Content>, R::Error> {
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

/// FAT12/16/32: a valid BPB; which FAT from the BPB and the cluster count
/// (as Linux decides); the label from the root directory's volume label entry, else
/// from the boot sector (`NO NAME` is none).
fn fat<R: ReadAt + ?Sized>(w: &mut Window<'_, R>, s: &[u8]) -> Result<Option<Content>, R::Error> {
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
mod tests {
    use super::*;
    use crate::partition::{from_fn, Uuid};
    use alloc::string::{String, ToString};
    use alloc::vec;
    use alloc::vec::Vec;

    fn at(d: &mut [u8], off: usize, b: &[u8]) {
        d[off..off + b.len()].copy_from_slice(b);
    }

    fn probe_all(d: &[u8]) -> Option<Content> {
        let mut io = d;
        probe(&mut io, 0, d.len() as u64).unwrap()
    }

    const U: [u8; 16] = [
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x10, 0x32, 0x54, 0x76, 0x98, 0xba, 0xdc,
        0xfe,
    ];

    fn ext_sb(compat: u32, incompat: u32, ro: u32) -> Vec<u8> {
        let mut d = vec![0u8; 8192];
        let s = 1024;
        at(&mut d, s + 4, &1000u32.to_le_bytes());
        at(&mut d, s + 0x18, &2u32.to_le_bytes());
        at(&mut d, s + 0x38, &0xef53u16.to_le_bytes());
        at(&mut d, s + 0x4c, &1u32.to_le_bytes());
        at(&mut d, s + 0x5c, &compat.to_le_bytes());
        at(&mut d, s + 0x60, &incompat.to_le_bytes());
        at(&mut d, s + 0x64, &ro.to_le_bytes());
        at(&mut d, s + 0x68, &U);
        at(&mut d, s + 0x78, b"rootfs\0\0garbage!");
        at(&mut d, s + 0x150, &1u32.to_le_bytes());
        d
    }

    #[test]
    fn ext_versions_and_features() {
        let c = probe_all(&ext_sb(0x38, 0x2, 0x3)).unwrap();
        assert_eq!(c.kind, Kind::Ext2);
        assert_eq!(c.label.as_str(), "rootfs");
        assert_eq!(
            c.id.unwrap().to_string(),
            "01234567-89ab-cdef-1032-547698badcfe"
        );
        assert_eq!((c.block_size, c.size), (Some(4096), Some(4096 * 1000)));
        let c = probe_all(&ext_sb(0x3c, 0x6, 0x3)).unwrap();
        assert_eq!(c.kind, Kind::Ext3);
        // extent + 64bit: ext4, and the high half of the block count counts.
        let c = probe_all(&ext_sb(0x3c, 0x2c2, 0x46b)).unwrap();
        assert_eq!(c.kind, Kind::Ext4);
        assert_eq!(c.size, Some(4096 * ((1u64 << 32) + 1000)));
        let names: Vec<String> = c
            .ext_features
            .unwrap()
            .iter()
            .map(|f| f.to_string())
            .collect();
        assert_eq!(
            names.join(" "),
            "has_journal ext_attr resize_inode dir_index filetype extent 64bit flex_bg \
             sparse_super large_file huge_file dir_nlink extra_isize metadata_csum"
        );
        // Unknown bits in e2fsprogs' form.
        let f = ExtFeatures {
            compat: 1 << 30,
            incompat: 1 << 20,
            ro_compat: 1 << 31,
        };
        let names: Vec<String> = f.iter().map(|f| f.to_string()).collect();
        assert_eq!(names, ["FEATURE_C30", "FEATURE_I20", "FEATURE_R31"]);
        // No journal but ext4 features: ext4; a journal device.
        assert_eq!(probe_all(&ext_sb(0, 0x40, 0)).unwrap().kind, Kind::Ext4);
        assert_eq!(
            probe_all(&ext_sb(0, 0x8, 0)).unwrap().kind,
            Kind::ExtJournal
        );
        // An absurd block size is not ext.
        let mut d = ext_sb(0, 0, 0);
        d[1024 + 0x18] = 40;
        assert_eq!(probe_all(&d), None);
    }

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

    fn fat16() -> Vec<u8> {
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
    fn ntfs_volume() -> Vec<u8> {
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
