//! Partition tables: MBR (with the extended partition's chain of logical
//! partitions) and GPT (both headers, CRC32-checked), read without a heap.
//!
//! Everything is read through [`ReadAt`], a positional reader: the guest
//! view of an [`Image`](crate::Image), any [`BlockRead`] storage, or a
//! closure ([`from_fn`]). Reads are bounded (a sector at a time, at most
//! [`MAX_GPT_ARRAY_BYTES`] for a GPT partition entry array) and never reach
//! past the disk size the caller gives. Results live in fixed-capacity
//! [`heapless`] collections ([`MAX_PARTITIONS`] partitions): a bootloader
//! without an allocator can use this module. A [`PartitionTable`] takes
//! about 17 KiB (on the stack, or wherever the caller keeps it); reading
//! one uses about 3 KiB of stack besides.
//!
//! Sectors are 512 bytes; a GPT written for 4096-byte sectors (header at
//! byte 4096) is recognised too, and [`GptInfo::sector_size`] says which.
//!
//! Hostile input never panics, never loops (the extended partition's chain
//! is bounded and checked for cycles) and never sizes anything from an
//! unchecked field; arithmetic is checked throughout (the module denies
//! clippy's `arithmetic_side_effects` and `indexing_slicing`).
//!
//! ```
//! use qcowkit_core::partition::PartitionTable;
//!
//! fn list(disk: &[u8]) {
//!     let mut io = disk;
//!     match PartitionTable::read(&mut io, disk.len() as u64) {
//!         Ok(Some(table)) => {
//!             for p in &table.partitions {
//!                 println!("{}: {} bytes at {}, {}", p.number, p.size, p.start, p.kind);
//!             }
//!         }
//!         Ok(None) => println!("no partition table"),
//!         Err(e) => println!("{e}"),
//!     }
//! }
//! # list(&[0u8; 1024]);
//! ```
#![deny(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]

use core::fmt;

use crate::io::BlockRead;

/// Bytes per sector of an MBR, and of a GPT unless it is found at byte 4096.
pub const SECTOR_SIZE: u64 = 512;

/// How many partitions a [`PartitionTable`] holds; further ones are counted
/// in [`PartitionTable::omitted`].
pub const MAX_PARTITIONS: usize = 128;

/// The most links of an extended partition's chain followed (more is an
/// error, as is a chain that comes back to an EBR already seen).
pub const MAX_EBR_LINKS: usize = 128;

/// The largest GPT partition entry array read (its CRC32 covers all of it):
/// 1 MiB, 8192 entries of 128 bytes. Larger arrays are refused.
pub const MAX_GPT_ARRAY_BYTES: u64 = 1 << 20;

/// A positional reader: what the partition and signature probes read
/// through.
///
/// Implemented for every [`BlockRead`] storage (bytes past its end read as
/// zeros), for [`Image`](crate::Image) (its guest view, through the
/// backing chain) and, through [`from_fn`], for any closure.
pub trait ReadAt {
    /// The reader's error.
    type Error;

    /// Reads exactly `buf.len()` bytes at `offset`. Callers never read past
    /// the size they were given for the disk.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
}

impl<T: BlockRead + ?Sized> ReadAt for T {
    type Error = T::Error;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), T::Error> {
        BlockRead::read_at(self, offset, buf)
    }
}

impl<R: BlockRead> ReadAt for crate::Image<R> {
    type Error = crate::Error<R::Error>;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        crate::Image::read_at(self, offset, buf)
    }
}

/// A [`ReadAt`] over a closure `FnMut(offset, buf) -> Result<(), E>`; made
/// by [`from_fn`].
pub struct FromFn<F>(pub F);

impl<E, F: FnMut(u64, &mut [u8]) -> Result<(), E>> ReadAt for FromFn<F> {
    type Error = E;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), E> {
        (self.0)(offset, buf)
    }
}

/// Reads through a closure: `from_fn(|offset, buf| disk.read_at(offset, buf))`.
pub fn from_fn<E, F: FnMut(u64, &mut [u8]) -> Result<(), E>>(f: F) -> FromFn<F> {
    FromFn(f)
}

/// Reads `buf.len()` bytes at `offset` if they lie inside `[0, limit)`;
/// `Ok(false)` (and nothing read) otherwise.
pub(crate) fn read_within<R: ReadAt + ?Sized>(
    io: &mut R,
    limit: u64,
    offset: u64,
    buf: &mut [u8],
) -> Result<bool, R::Error> {
    let Ok(len) = u64::try_from(buf.len()) else {
        return Ok(false);
    };
    match offset.checked_add(len) {
        Some(end) if end <= limit => {
            io.read_at(offset, buf)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// `N` bytes of `b` at `at` (zeros where `b` is too short).
pub(crate) fn bytes<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = at.checked_add(N).and_then(|end| b.get(at..end)) {
        a.copy_from_slice(s);
    }
    a
}

/// The byte at `at` (0 past the end).
pub(crate) fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

/// Little-endian `u16` at `at`.
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes(b, at))
}

/// Little-endian `u32` at `at`.
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes(b, at))
}

/// Little-endian `u64` at `at`.
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes(b, at))
}

/// The bytes `b[at..at + len]`, or an empty slice when out of range.
pub(crate) fn sub(b: &[u8], at: usize, len: usize) -> &[u8] {
    at.checked_add(len)
        .and_then(|end| b.get(at..end))
        .unwrap_or(&[])
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xedb88320) lookup table.
const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0u32;
    while i < 256 {
        let mut c = i;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        #[allow(clippy::indexing_slicing, clippy::as_conversions)]
        {
            t[i as usize] = c;
        }
        i += 1;
    }
    t
};

/// Runs the reflected CRC-32 register over `data` from `crc` (no initial or
/// final inversion: `!crc32_raw(!0, data)` is the usual CRC32, and LVM2
/// uses the register as it is, from its own seed).
pub(crate) fn crc32_raw(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        let idx = usize::from(crc.to_le_bytes()[0] ^ b);
        crc = CRC_TABLE.get(idx).copied().unwrap_or(0) ^ (crc >> 8);
    }
    crc
}

/// The CRC32 of zlib, GPT and most formats.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    !crc32_raw(!0, data)
}

/// A GUID/UUID as 16 bytes in the order of its text form
/// (`00112233-4455-6677-8899-aabbccddeeff`).
///
/// GPT stores the first three fields little-endian
/// ([`Uuid::from_gpt_bytes`]); file systems store the text order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// The all-zero UUID.
    pub const NIL: Uuid = Uuid([0; 16]);

    /// From GPT's on-disk (mixed-endian) layout.
    pub fn from_gpt_bytes(b: [u8; 16]) -> Uuid {
        let mut u = b;
        u.swap(0, 3);
        u.swap(1, 2);
        u.swap(4, 5);
        u.swap(6, 7);
        Uuid(u)
    }

    /// Parses the text form (36 characters, hyphens at 8, 13, 18 and 23,
    /// hex digits of either case).
    pub fn parse(text: &str) -> Option<Uuid> {
        let t = text.as_bytes();
        if t.len() != 36 {
            return None;
        }
        let mut out = [0u8; 16];
        let mut n = 0usize;
        let mut hi: Option<u8> = None;
        for (i, &c) in t.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if c != b'-' {
                    return None;
                }
                continue;
            }
            let v = char::from(c).to_digit(16)?;
            let v = u8::try_from(v).ok()?;
            match hi.take() {
                None => hi = Some(v),
                Some(h) => {
                    *out.get_mut(n)? = (h << 4) | v;
                    n = n.checked_add(1)?;
                }
            }
        }
        Some(Uuid(out))
    }

    /// Whether every byte is zero.
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }

    fn write(&self, f: &mut fmt::Formatter<'_>, upper: bool) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            if upper {
                write!(f, "{b:02X}")?;
            } else {
                write!(f, "{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Uuid {
    /// Lowercase text form, as blkid prints file system UUIDs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, false)
    }
}

impl fmt::UpperHex for Uuid {
    /// Uppercase text form, as sfdisk and sgdisk print GPT GUIDs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, true)
    }
}

/// A GUID from its text form, at compile time (for the type table).
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::as_conversions
)]
const fn guid(s: &str) -> Uuid {
    let t = s.as_bytes();
    let mut out = [0u8; 16];
    let mut i = 0;
    let mut n = 0;
    while i < t.len() {
        let c = t[i];
        if c == b'-' {
            i += 1;
            continue;
        }
        let hi = hex_digit(c);
        let lo = hex_digit(t[i + 1]);
        out[n] = (hi << 4) | lo;
        n += 1;
        i += 2;
    }
    assert!(n == 16);
    Uuid(out)
}

#[allow(clippy::arithmetic_side_effects)]
const fn hex_digit(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("not a hex digit"),
    }
}

/// The Microsoft basic data type GUID (its attribute bits 60-63 have names).
const MS_BASIC_DATA: Uuid = guid("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7");

/// Well-known GPT partition type GUIDs and their names (util-linux's words).
const GPT_TYPES: &[(Uuid, &str)] = &[
    (guid("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"), "EFI System"),
    (
        guid("024DEE41-33E7-11D3-9D69-0008C781F39F"),
        "MBR partition scheme",
    ),
    (
        guid("D3BFE2DE-3DAF-11DF-BA40-E3A556D89593"),
        "Intel Fast Flash",
    ),
    (guid("21686148-6449-6E6F-744E-656564454649"), "BIOS boot"),
    (
        guid("9E1A2D38-C612-4316-AA26-8B49521E5A8B"),
        "PowerPC PReP boot",
    ),
    (
        guid("E3C9E316-0B5C-4DB8-817D-F92DF00215AE"),
        "Microsoft reserved",
    ),
    (MS_BASIC_DATA, "Microsoft basic data"),
    (
        guid("5808C8AA-7E8F-42E0-85D2-E1E90434CFB3"),
        "Microsoft LDM metadata",
    ),
    (
        guid("AF9B60A0-1431-4F62-BC68-3311714A69AD"),
        "Microsoft LDM data",
    ),
    (
        guid("DE94BBA4-06D1-4D40-A16A-BFD50179D6AC"),
        "Windows recovery environment",
    ),
    (
        guid("E75CAF8F-F680-4CEE-AFA3-B001E56EFC2D"),
        "Microsoft Storage Spaces",
    ),
    (guid("0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"), "Linux swap"),
    (
        guid("0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
        "Linux filesystem",
    ),
    (
        guid("3B8F8425-20E0-4F3B-907F-1A25A76F98E8"),
        "Linux server data",
    ),
    (
        guid("44479540-F297-41B2-9AF7-D131D5F0458A"),
        "Linux root (x86)",
    ),
    (
        guid("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
        "Linux root (x86-64)",
    ),
    (
        guid("69DAD710-2CE4-4E3C-B16C-21A1D49ABED3"),
        "Linux root (ARM)",
    ),
    (
        guid("B921B045-1DF0-41C3-AF44-4C6F280D3FAE"),
        "Linux root (ARM-64)",
    ),
    (
        guid("72EC70A6-CF74-40E6-BD49-4BDA08E8F224"),
        "Linux root (RISC-V-64)",
    ),
    (
        guid("75250D76-8CC6-458E-BD66-BD47CC81A812"),
        "Linux /usr (x86)",
    ),
    (
        guid("8484680C-9521-48C6-9C11-B0720656F69E"),
        "Linux /usr (x86-64)",
    ),
    (
        guid("7D0359A3-02B3-4F0A-865C-654403E70625"),
        "Linux /usr (ARM)",
    ),
    (
        guid("B0E01050-EE5F-4390-949A-9101B17104E9"),
        "Linux /usr (ARM-64)",
    ),
    (
        guid("8DA63339-0007-60C0-C436-083AC8230908"),
        "Linux reserved",
    ),
    (guid("933AC7E1-2EB4-4F13-B844-0E14E2AEF915"), "Linux home"),
    (guid("A19D880F-05FC-4D3B-A006-743F0F84911E"), "Linux RAID"),
    (guid("E6D6D379-F507-44C2-A23C-238F2A3DF928"), "Linux LVM"),
    (
        guid("4D21B016-B534-45C2-A9FB-5C16E091FD2D"),
        "Linux variable data",
    ),
    (
        guid("7EC6F557-3BC5-4ACA-B293-16EF5DF639D1"),
        "Linux temporary data",
    ),
    (
        guid("BC13C2FF-59E6-4262-A352-B275FD6F7172"),
        "Linux extended boot",
    ),
    (
        guid("773F91EF-66D4-49B5-BD83-D683BF40AD16"),
        "Linux user's home",
    ),
    (guid("CA7D7CCB-63ED-4C53-861C-1742536059CC"), "Linux LUKS"),
    (
        guid("7FFEC5C9-2D00-49B7-8941-3EA10A5586B7"),
        "Linux dm-crypt",
    ),
    (guid("516E7CB4-6ECF-11D6-8FF8-00022D09712B"), "FreeBSD data"),
    (guid("83BD6B9D-7F41-11DC-BE0B-001560B84F0F"), "FreeBSD boot"),
    (guid("516E7CB5-6ECF-11D6-8FF8-00022D09712B"), "FreeBSD swap"),
    (guid("516E7CB6-6ECF-11D6-8FF8-00022D09712B"), "FreeBSD UFS"),
    (guid("516E7CBA-6ECF-11D6-8FF8-00022D09712B"), "FreeBSD ZFS"),
    (guid("824CC7A0-36A8-11E3-890A-952519AD3F61"), "OpenBSD data"),
    (guid("49F48D32-B10E-11DC-B99B-0019D1879648"), "NetBSD swap"),
    (guid("49F48D5A-B10E-11DC-B99B-0019D1879648"), "NetBSD FFS"),
    (
        guid("48465300-0000-11AA-AA11-00306543ECAC"),
        "Apple HFS/HFS+",
    ),
    (guid("7C3457EF-0000-11AA-AA11-00306543ECAC"), "Apple APFS"),
    (guid("426F6F74-0000-11AA-AA11-00306543ECAC"), "Apple boot"),
    (guid("6A82CB45-1DD2-11B2-99A6-080020736631"), "Solaris boot"),
    (guid("6A85CF4D-1DD2-11B2-99A6-080020736631"), "Solaris root"),
    (
        guid("6A898CC3-1DD2-11B2-99A6-080020736631"),
        "Solaris /usr & Apple ZFS",
    ),
    (
        guid("FE3A2A5D-4F32-41A7-B725-ACCC3285A309"),
        "ChromeOS kernel",
    ),
    (
        guid("3CB8E202-3B7E-47DD-8A3C-7FF2A13CFCEC"),
        "ChromeOS root fs",
    ),
    (
        guid("2E0A753D-9E48-43B0-8337-B15192CB1B5E"),
        "ChromeOS reserved",
    ),
    (guid("AA31E02A-400F-11DB-9590-000C2911D1B8"), "VMware VMFS"),
    (
        guid("9D275380-40AD-11DB-BF97-000C2911D1B8"),
        "VMware Diagnostic",
    ),
    (
        guid("C91818F9-8025-47AF-89D2-F030D7000C2C"),
        "Plan 9 partition",
    ),
    (guid("42465331-3BA3-10F1-802A-4861696B7521"), "Haiku BFS"),
];

/// Well-known MBR partition type ids and their names.
const MBR_TYPES: &[(u8, &str)] = &[
    (0x01, "FAT12"),
    (0x04, "FAT16 (<32 MiB)"),
    (0x05, "Extended"),
    (0x06, "FAT16"),
    (0x07, "NTFS/exFAT"),
    (0x0b, "FAT32"),
    (0x0c, "FAT32 (LBA)"),
    (0x0e, "FAT16 (LBA)"),
    (0x0f, "Extended (LBA)"),
    (0x11, "Hidden FAT12"),
    (0x12, "Compaq diagnostics"),
    (0x14, "Hidden FAT16 (<32 MiB)"),
    (0x16, "Hidden FAT16"),
    (0x17, "Hidden NTFS/exFAT"),
    (0x1b, "Hidden FAT32"),
    (0x1c, "Hidden FAT32 (LBA)"),
    (0x1e, "Hidden FAT16 (LBA)"),
    (0x27, "Hidden NTFS (Windows RE)"),
    (0x39, "Plan 9"),
    (0x42, "Windows dynamic (LDM)"),
    (0x4d, "QNX4.x"),
    (0x63, "GNU HURD or SysV"),
    (0x81, "Minix / old Linux"),
    (0x82, "Linux swap"),
    (0x83, "Linux"),
    (0x84, "Intel hibernation"),
    (0x85, "Linux extended"),
    (0x86, "NTFS volume set"),
    (0x87, "NTFS volume set"),
    (0x88, "Linux plaintext"),
    (0x8e, "Linux LVM"),
    (0xa5, "FreeBSD"),
    (0xa6, "OpenBSD"),
    (0xa8, "Darwin UFS"),
    (0xa9, "NetBSD"),
    (0xab, "Darwin boot"),
    (0xaf, "HFS/HFS+"),
    (0xbe, "Solaris boot"),
    (0xbf, "Solaris"),
    (0xda, "Non-FS data"),
    (0xde, "Dell utility"),
    (0xea, "Linux extended boot"),
    (0xee, "GPT protective"),
    (0xef, "EFI System (FAT)"),
    (0xfb, "VMware VMFS"),
    (0xfc, "VMware VMKCORE"),
    (0xfd, "Linux RAID autodetect"),
];

/// What kind of partition: an MBR type id or a GPT type GUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionType {
    /// An MBR partition type id (`0x83` Linux, `0x0c` FAT32 (LBA), ...).
    Mbr(u8),
    /// A GPT partition type GUID.
    Gpt(Uuid),
}

impl PartitionType {
    /// The type in words (`"Linux filesystem"`, `"EFI System"`, `"FAT32
    /// (LBA)"`, ...), or `None` for a type this module does not know.
    pub fn name(&self) -> Option<&'static str> {
        match self {
            PartitionType::Mbr(id) => MBR_TYPES.iter().find(|t| t.0 == *id).map(|t| t.1),
            PartitionType::Gpt(g) => GPT_TYPES.iter().find(|t| t.0 == *g).map(|t| t.1),
        }
    }

    /// Whether this is an MBR extended partition (a container of logical
    /// partitions: `0x05`, `0x0f` or `0x85`).
    pub fn is_extended(&self) -> bool {
        matches!(self, PartitionType::Mbr(0x05 | 0x0f | 0x85))
    }
}

impl fmt::Display for PartitionType {
    /// The name, or the id as `0x42` / the GUID (uppercase) when unknown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.name(), self) {
            (Some(n), _) => f.write_str(n),
            (None, PartitionType::Mbr(id)) => write!(f, "{id:#04x}"),
            (None, PartitionType::Gpt(g)) => write!(f, "{g:X}"),
        }
    }
}

/// A GPT partition name: 36 UTF-16LE code units, as stored (NUL-padded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionName(pub [u16; 36]);

impl Default for PartitionName {
    fn default() -> Self {
        PartitionName([0; 36])
    }
}

impl PartitionName {
    /// The name's characters up to the first NUL (unpaired surrogates read
    /// as U+FFFD).
    pub fn chars(&self) -> impl Iterator<Item = char> + '_ {
        char::decode_utf16(self.0.iter().copied().take_while(|u| *u != 0))
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
    }

    /// Whether the name is empty.
    pub fn is_empty(&self) -> bool {
        self.0.first().is_none_or(|u| *u == 0)
    }
}

impl fmt::Display for PartitionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        for c in self.chars() {
            f.write_char(c)?;
        }
        Ok(())
    }
}

/// A partition flag or attribute, in words when it has a name.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    /// MBR: the active (boot) flag, status byte `0x80`.
    Bootable,
    /// GPT attribute bit 0: required by the platform.
    Required,
    /// GPT attribute bit 1: EFI firmware must not produce a block I/O
    /// protocol for it.
    NoBlockIo,
    /// GPT attribute bit 2: legacy BIOS bootable.
    LegacyBiosBootable,
    /// GPT attribute bit 60 of a Microsoft basic data partition: read-only.
    ReadOnly,
    /// GPT attribute bit 61 of a Microsoft basic data partition: a shadow copy.
    ShadowCopy,
    /// GPT attribute bit 62 of a Microsoft basic data partition: hidden.
    Hidden,
    /// GPT attribute bit 63 of a Microsoft basic data partition: no drive letter.
    NoAutomount,
    /// Another GPT attribute bit (3-47 reserved, 48-63 type specific).
    Bit(u8),
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Flag::Bootable => f.write_str("bootable"),
            Flag::Required => f.write_str("required"),
            Flag::NoBlockIo => f.write_str("no block IO protocol"),
            Flag::LegacyBiosBootable => f.write_str("legacy BIOS bootable"),
            Flag::ReadOnly => f.write_str("read-only"),
            Flag::ShadowCopy => f.write_str("shadow copy"),
            Flag::Hidden => f.write_str("hidden"),
            Flag::NoAutomount => f.write_str("no automount"),
            Flag::Bit(b) => write!(f, "attribute bit {b}"),
        }
    }
}

/// One partition.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// The number Linux gives it: GPT entry index + 1; MBR 1-4 for the
    /// primary entries, 5 and up for logical partitions in chain order.
    pub number: u32,
    /// Start, in bytes from the start of the disk.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Type id or GUID.
    pub kind: PartitionType,
    /// MBR: the active flag (status `0x80`).
    pub bootable: bool,
    /// MBR: a logical partition (inside an extended partition).
    pub logical: bool,
    /// GPT: the attribute bits (0 for MBR partitions).
    pub attributes: u64,
    /// GPT: the unique partition GUID.
    pub guid: Option<Uuid>,
    /// GPT: the partition name (empty for MBR partitions).
    pub name: PartitionName,
}

impl Partition {
    /// The flags and attributes set, in bit order (see [`Flag`]).
    pub fn flags(&self) -> Flags {
        Flags {
            bootable: self.bootable,
            bits: self.attributes,
            ms_data: self.kind == PartitionType::Gpt(MS_BASIC_DATA),
        }
    }

    /// The part of the partition inside a disk of `disk_size` bytes, as
    /// (offset, length): what a probe of its contents may read.
    pub fn region(&self, disk_size: u64) -> (u64, u64) {
        let start = self.start.min(disk_size);
        let end = self.start.saturating_add(self.size).min(disk_size);
        (start, end.saturating_sub(start))
    }
}

/// The flags of a [`Partition`], from [`Partition::flags`].
#[derive(Clone, Debug)]
pub struct Flags {
    bootable: bool,
    bits: u64,
    ms_data: bool,
}

impl Iterator for Flags {
    type Item = Flag;
    fn next(&mut self) -> Option<Flag> {
        if self.bootable {
            self.bootable = false;
            return Some(Flag::Bootable);
        }
        if self.bits == 0 {
            return None;
        }
        let bit = self.bits.trailing_zeros();
        self.bits &= self.bits.wrapping_sub(1);
        let bit = u8::try_from(bit).unwrap_or(u8::MAX);
        Some(match (bit, self.ms_data) {
            (0, _) => Flag::Required,
            (1, _) => Flag::NoBlockIo,
            (2, _) => Flag::LegacyBiosBootable,
            (60, true) => Flag::ReadOnly,
            (61, true) => Flag::ShadowCopy,
            (62, true) => Flag::Hidden,
            (63, true) => Flag::NoAutomount,
            (b, _) => Flag::Bit(b),
        })
    }
}

/// Which GPT header the partitions were read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GptHeader {
    /// The primary header (LBA 1) and its entry array.
    Primary,
    /// The backup header (the disk's last LBA) and its entry array: the
    /// primary one is damaged ([`GptInfo::primary_problem`] says how).
    Backup,
}

/// What a GPT says besides its partitions.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GptInfo {
    /// The header used.
    pub header: GptHeader,
    /// Why the primary header (or its entry array) was not used.
    pub primary_problem: Option<Invalid>,
    /// What is wrong with the backup header when the primary one was used
    /// (its header is checked, and its entry array's CRC32 field compared
    /// with the primary's; its array itself is not read).
    pub backup_problem: Option<Invalid>,
    /// Bytes per sector: 512, or 4096 when the header was found there.
    pub sector_size: u32,
    /// The disk GUID.
    pub disk_guid: Uuid,
    /// First LBA partitions may use.
    pub first_usable_lba: u64,
    /// Last LBA partitions may use.
    pub last_usable_lba: u64,
    /// LBA of the other header, as the header used names it.
    pub alternate_lba: u64,
    /// Entries in the partition entry array (used or not).
    pub entries: u32,
    /// Bytes per entry (128 × 2^n).
    pub entry_size: u32,
}

/// The kind of partition table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// A DOS/MBR partition table.
    Mbr {
        /// The disk identifier (bytes 440-443).
        disk_id: u32,
    },
    /// A GUID partition table (behind a protective MBR).
    Gpt(GptInfo),
}

/// A partition table and its partitions.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionTable {
    /// MBR or GPT, and what the table says besides its partitions.
    pub scheme: Scheme,
    /// The partitions in number order (MBR: primary entries, extended
    /// included, then logical partitions in chain order).
    pub partitions: heapless::Vec<Partition, MAX_PARTITIONS>,
    /// Partitions that did not fit in [`MAX_PARTITIONS`].
    pub omitted: u32,
}

/// A field of a partition table with a value that cannot be right.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// The structure: `"primary GPT header at LBA"`, `"backup GPT header at
    /// LBA"`, `"GPT partition entry"`, `"EBR at LBA"`, `"MBR entry"`.
    pub structure: &'static str,
    /// Where: the LBA of a header or EBR, the number of an entry.
    pub at: u64,
    /// The field, as its specification names it (`HeaderCRC32`,
    /// `NumberOfPartitionEntries`, ...).
    pub field: &'static str,
    /// The value found.
    pub value: u64,
    /// Why it is refused.
    pub reason: &'static str,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {} {} ({:#x}): {}",
            self.structure, self.at, self.field, self.value, self.value, self.reason
        )
    }
}

/// Why a partition table could not be read.
#[derive(Debug)]
#[non_exhaustive]
pub enum TableError<E> {
    /// The reader failed.
    Io(E),
    /// The table has a field that cannot be right (for a GPT: the primary
    /// header's problem, when the backup is unusable too).
    Invalid(Invalid),
}

impl<E> From<Invalid> for TableError<E> {
    fn from(i: Invalid) -> Self {
        TableError::Invalid(i)
    }
}

impl<E: fmt::Display> fmt::Display for TableError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::Io(e) => write!(f, "cannot read the partition table: {e}"),
            TableError::Invalid(i) => write!(f, "invalid partition table: {i}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for TableError<E> {}

type Res<T, E> = Result<T, TableError<E>>;

/// Reads with `read_within`, mapping the reader's error.
fn read_in<R: ReadAt + ?Sized>(
    io: &mut R,
    limit: u64,
    offset: u64,
    buf: &mut [u8],
) -> Res<bool, R::Error> {
    read_within(io, limit, offset, buf).map_err(TableError::Io)
}

/// Whether `s` (a first sector with `55 aa`) is a FAT, exFAT or NTFS boot
/// sector rather than an MBR: such a volume has no partition table (as
/// blkid decides).
fn is_boot_sector(s: &[u8]) -> bool {
    let oem = sub(s, 3, 8);
    if oem == b"NTFS    " || oem == b"EXFAT   " {
        return true;
    }
    let jump = matches!(byte(s, 0), 0xeb | 0xe9);
    let bps = le16(s, 11);
    let spc = byte(s, 13);
    let reserved = le16(s, 14);
    let fats = byte(s, 16);
    let fat_name = sub(s, 0x36, 3) == b"FAT" || sub(s, 0x52, 3) == b"FAT";
    jump && fat_name
        && matches!(bps, 512 | 1024 | 2048 | 4096)
        && spc.is_power_of_two()
        && reserved >= 1
        && matches!(fats, 1 | 2)
}

/// One 16-byte MBR or EBR entry.
#[derive(Clone, Copy)]
struct MbrEntry {
    status: u8,
    kind: u8,
    lba: u32,
    sectors: u32,
}

fn mbr_entries(s: &[u8]) -> [MbrEntry; 4] {
    let e = |i: usize| {
        let at = 446usize.saturating_add(i.saturating_mul(16));
        MbrEntry {
            status: byte(s, at),
            kind: byte(s, at.saturating_add(4)),
            lba: le32(s, at.saturating_add(8)),
            sectors: le32(s, at.saturating_add(12)),
        }
    };
    [e(0), e(1), e(2), e(3)]
}

impl MbrEntry {
    fn used(&self) -> bool {
        self.kind != 0 && self.sectors != 0
    }
}

/// Adds a partition, or counts it in `omitted` when the table is full.
fn push(table: &mut PartitionTable, p: Partition) {
    if table.partitions.push(p).is_err() {
        table.omitted = table.omitted.saturating_add(1);
    }
}

fn lba_bytes(lba: u64, sector: u64) -> Option<u64> {
    lba.checked_mul(sector)
}

impl PartitionTable {
    /// Reads the partition table of a disk of `disk_size` bytes.
    ///
    /// `Ok(None)`: no partition table (no `55 aa` signature, status bytes
    /// other than `0x00`/`0x80`, or a FAT/exFAT/NTFS boot sector: a volume
    /// without a table). An MBR with a `0xee` entry is a GPT's protective
    /// MBR: the GPT is read (the primary header, else the backup at the
    /// last LBA). Reads are bounded: the first sectors, one sector per EBR
    /// (at most [`MAX_EBR_LINKS`]), the GPT headers and entry arrays (at
    /// most [`MAX_GPT_ARRAY_BYTES`] each).
    ///
    /// # Errors
    /// [`TableError::Io`] when the reader fails; [`TableError::Invalid`]
    /// naming the field and value for a broken EBR chain (a loop, a link
    /// outside the disk, too many links) or a GPT whose two headers are
    /// both unusable.
    pub fn read<R: ReadAt + ?Sized>(
        io: &mut R,
        disk_size: u64,
    ) -> Res<Option<PartitionTable>, R::Error> {
        let mut s = [0u8; 512];
        if !read_in(io, disk_size, 0, &mut s)? {
            return Ok(None);
        }
        let signed = sub(&s, 510, 2) == [0x55, 0xaa];
        let entries = mbr_entries(&s);
        let disk_id = le32(&s, 440);
        let protective = signed && entries.iter().any(|e| e.kind == 0xee);
        if protective || !signed {
            // Without an MBR signature a GPT may still be there (a damaged
            // or missing protective MBR).
            let mut gpt_here = false;
            if !signed {
                for at in [SECTOR_SIZE, 4096] {
                    let mut h = [0u8; 8];
                    gpt_here |= read_in(io, disk_size, at, &mut h)? && &h == b"EFI PART";
                }
            }
            if protective || gpt_here {
                return read_gpt(io, disk_size).map(Some);
            }
            return Ok(None);
        }
        if entries.iter().any(|e| !matches!(e.status, 0x00 | 0x80)) || is_boot_sector(&s) {
            return Ok(None);
        }
        let mut table = PartitionTable {
            scheme: Scheme::Mbr { disk_id },
            partitions: heapless::Vec::new(),
            omitted: 0,
        };
        for (i, e) in (1u32..).zip(entries.iter()) {
            if !e.used() {
                continue;
            }
            push(
                &mut table,
                Partition {
                    number: i,
                    start: u64::from(e.lba).saturating_mul(SECTOR_SIZE),
                    size: u64::from(e.sectors).saturating_mul(SECTOR_SIZE),
                    kind: PartitionType::Mbr(e.kind),
                    bootable: e.status == 0x80,
                    logical: false,
                    attributes: 0,
                    guid: None,
                    name: PartitionName::default(),
                },
            );
        }
        let mut next = 5u32;
        let mut visited = heapless::Vec::<u64, MAX_EBR_LINKS>::new();
        for e in entries.iter() {
            if e.used() && PartitionType::Mbr(e.kind).is_extended() {
                follow_ebr_chain(io, disk_size, e, &mut table, &mut next, &mut visited)?;
            }
        }
        Ok(Some(table))
    }
}

/// Follows an extended partition's chain of EBRs, adding its logical
/// partitions. Each EBR's first used non-extended entry is a logical
/// partition (relative to that EBR); its first extended entry links the
/// next EBR (relative to the extended partition's start), as Linux reads it.
fn follow_ebr_chain<R: ReadAt + ?Sized>(
    io: &mut R,
    disk_size: u64,
    ext: &MbrEntry,
    table: &mut PartitionTable,
    next: &mut u32,
    visited: &mut heapless::Vec<u64, MAX_EBR_LINKS>,
) -> Res<(), R::Error> {
    let base = u64::from(ext.lba);
    let mut ebr = base;
    loop {
        let bad = |field, value, reason| Invalid {
            structure: "EBR at LBA",
            at: ebr,
            field,
            value,
            reason,
        };
        if visited.contains(&ebr) {
            return Err(bad(
                "EBR LBA",
                ebr,
                "the extended partition's chain loops back to this EBR",
            )
            .into());
        }
        if visited.push(ebr).is_err() {
            return Err(bad(
                "EBR LBA",
                ebr,
                "the extended partition's chain has more than 128 links",
            )
            .into());
        }
        let mut s = [0u8; 512];
        let Some(offset) = lba_bytes(ebr, SECTOR_SIZE) else {
            return Err(bad("EBR LBA", ebr, "beyond any disk").into());
        };
        if !read_in(io, disk_size, offset, &mut s)? {
            return Err(bad("EBR LBA", ebr, "beyond the end of the disk").into());
        }
        if sub(&s, 510, 2) != [0x55, 0xaa] {
            // Linux ends the chain at an EBR without a signature.
            return Ok(());
        }
        let entries = mbr_entries(&s);
        if let Some(d) = entries
            .iter()
            .find(|e| e.used() && !PartitionType::Mbr(e.kind).is_extended())
        {
            let Some(start) = ebr.checked_add(u64::from(d.lba)) else {
                return Err(bad("logical partition start", u64::from(d.lba), "overflows").into());
            };
            push(
                table,
                Partition {
                    number: *next,
                    start: start.saturating_mul(SECTOR_SIZE),
                    size: u64::from(d.sectors).saturating_mul(SECTOR_SIZE),
                    kind: PartitionType::Mbr(d.kind),
                    bootable: d.status == 0x80,
                    logical: true,
                    attributes: 0,
                    guid: None,
                    name: PartitionName::default(),
                },
            );
            *next = next.saturating_add(1);
        }
        let Some(link) = entries
            .iter()
            .find(|e| e.used() && PartitionType::Mbr(e.kind).is_extended())
        else {
            return Ok(());
        };
        let Some(n) = base.checked_add(u64::from(link.lba)) else {
            return Err(bad("next EBR LBA", u64::from(link.lba), "overflows").into());
        };
        ebr = n;
    }
}

/// A GPT header's fields, after validation.
#[derive(Clone, Copy)]
struct Header {
    my_lba: u64,
    alternate_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: Uuid,
    entries_lba: u64,
    entries: u32,
    entry_size: u32,
    entries_crc: u32,
}

/// Reads and validates the GPT header at `lba` (sectors of `ss` bytes) on a
/// disk of `sectors` sectors.
fn gpt_header<R: ReadAt + ?Sized>(
    io: &mut R,
    disk_size: u64,
    ss: u64,
    lba: u64,
    structure: &'static str,
) -> Res<Result<Header, Invalid>, R::Error> {
    let bad = |field, value, reason| {
        Ok(Err(Invalid {
            structure,
            at: lba,
            field,
            value,
            reason,
        }))
    };
    let mut s = [0u8; 512];
    let read = match lba_bytes(lba, ss) {
        Some(off) => read_in(io, disk_size, off, &mut s)?,
        None => false,
    };
    if !read {
        return bad("MyLBA", lba, "beyond the end of the disk");
    }
    if sub(&s, 0, 8) != b"EFI PART" {
        return bad("Signature", le64(&s, 0), "not \"EFI PART\"");
    }
    let header_size = le32(&s, 12);
    if !(92..=512).contains(&header_size) {
        return bad(
            "HeaderSize",
            u64::from(header_size),
            "outside 92..=512 bytes",
        );
    }
    let stored = le32(&s, 16);
    let mut copy = s;
    if let Some(f) = copy.get_mut(16..20) {
        f.fill(0);
    }
    let n = usize::try_from(header_size).unwrap_or(0);
    if crc32(sub(&copy, 0, n)) != stored {
        return bad(
            "HeaderCRC32",
            u64::from(stored),
            "does not match the CRC32 of the header",
        );
    }
    let h = Header {
        my_lba: le64(&s, 24),
        alternate_lba: le64(&s, 32),
        first_usable: le64(&s, 40),
        last_usable: le64(&s, 48),
        disk_guid: Uuid::from_gpt_bytes(bytes(&s, 56)),
        entries_lba: le64(&s, 72),
        entries: le32(&s, 80),
        entry_size: le32(&s, 84),
        entries_crc: le32(&s, 88),
    };
    let sectors = disk_size.checked_div(ss).unwrap_or(0);
    if h.my_lba != lba {
        return bad("MyLBA", h.my_lba, "not the LBA the header was read from");
    }
    if h.last_usable >= sectors {
        return bad("LastUsableLBA", h.last_usable, "beyond the end of the disk");
    }
    if h.first_usable > h.last_usable {
        return bad(
            "FirstUsableLBA",
            h.first_usable,
            "greater than LastUsableLBA",
        );
    }
    if h.entry_size < 128 || !h.entry_size.is_power_of_two() {
        return bad(
            "SizeOfPartitionEntry",
            u64::from(h.entry_size),
            "not 128 x 2^n bytes",
        );
    }
    let array = u64::from(h.entries).saturating_mul(u64::from(h.entry_size));
    if array > MAX_GPT_ARRAY_BYTES {
        return bad(
            "NumberOfPartitionEntries",
            u64::from(h.entries),
            "the entry array would be larger than 1 MiB",
        );
    }
    let start = lba_bytes(h.entries_lba, ss);
    let end = start.and_then(|s| s.checked_add(array));
    let (Some(start), Some(end)) = (start, end) else {
        return bad("PartitionEntryLBA", h.entries_lba, "beyond any disk");
    };
    if end > disk_size {
        return bad(
            "PartitionEntryLBA",
            h.entries_lba,
            "the entry array reaches past the end of the disk",
        );
    }
    let header_start = lba.saturating_mul(ss);
    if start < header_start.saturating_add(ss) && end > header_start {
        return bad(
            "PartitionEntryLBA",
            h.entries_lba,
            "the entry array overlaps the header",
        );
    }
    Ok(Ok(h))
}

/// Reads a header's entry array: CRC32 checked over all of it, the used
/// entries collected.
fn gpt_entries<R: ReadAt + ?Sized>(
    io: &mut R,
    disk_size: u64,
    ss: u64,
    h: &Header,
    table: &mut PartitionTable,
    structure: &'static str,
) -> Res<Result<(), Invalid>, R::Error> {
    table.partitions.clear();
    table.omitted = 0;
    let size = u64::from(h.entry_size);
    let array = u64::from(h.entries).saturating_mul(size);
    let start = h.entries_lba.saturating_mul(ss);
    let mut crc = !0u32;
    let mut first_bad: Option<Invalid> = None;
    let mut chunk = [0u8; 512];
    let mut done = 0u64;
    let mut number = 0u32;
    while done < array {
        let n = (array.saturating_sub(done)).min(512);
        let len = usize::try_from(n).unwrap_or(512);
        let buf = chunk.get_mut(..len).unwrap_or(&mut []);
        if !read_in(io, disk_size, start.saturating_add(done), buf)? {
            return Ok(Err(Invalid {
                structure,
                at: h.my_lba,
                field: "PartitionEntryLBA",
                value: h.entries_lba,
                reason: "the entry array reaches past the end of the disk",
            }));
        }
        crc = crc32_raw(crc, buf);
        // Entries are 128 x 2^n bytes: they start at multiples of their
        // size, so each one's first 128 bytes lie inside one 512-byte chunk.
        let mut at = 0u64;
        while at < n {
            let pos = done.saturating_add(at);
            if pos.checked_rem(size) == Some(0) {
                number = number.saturating_add(1);
                let off = usize::try_from(at).unwrap_or(0);
                if let Err(e) = gpt_entry(sub(buf, off, 128), number, ss, table) {
                    first_bad.get_or_insert(e);
                }
            }
            at = at.saturating_add(128);
        }
        done = done.saturating_add(n);
    }
    if !crc != h.entries_crc {
        table.partitions.clear();
        table.omitted = 0;
        return Ok(Err(Invalid {
            structure,
            at: h.my_lba,
            field: "PartitionEntryArrayCRC32",
            value: u64::from(h.entries_crc),
            reason: "does not match the CRC32 of the entry array",
        }));
    }
    match first_bad {
        Some(e) => Err(e.into()),
        None => Ok(Ok(())),
    }
}

/// Decodes one 128-byte GPT entry (skipped when its type GUID is zero).
fn gpt_entry(e: &[u8], number: u32, ss: u64, table: &mut PartitionTable) -> Result<(), Invalid> {
    let kind = Uuid::from_gpt_bytes(bytes(e, 0));
    if kind.is_nil() {
        return Ok(());
    }
    let first = le64(e, 32);
    let last = le64(e, 40);
    let bad = |field, value, reason| Invalid {
        structure: "GPT partition entry",
        at: u64::from(number),
        field,
        value,
        reason,
    };
    if first > last {
        return Err(bad("EndingLBA", last, "before StartingLBA"));
    }
    let start = lba_bytes(first, ss).ok_or(bad("StartingLBA", first, "beyond any disk"))?;
    let size = last
        .checked_sub(first)
        .and_then(|d| d.checked_add(1))
        .and_then(|n| n.checked_mul(ss))
        .ok_or(bad("EndingLBA", last, "beyond any disk"))?;
    let mut name = [0u16; 36];
    for (i, u) in name.iter_mut().enumerate() {
        *u = le16(e, 56usize.saturating_add(i.saturating_mul(2)));
    }
    push(
        table,
        Partition {
            number,
            start,
            size,
            kind: PartitionType::Gpt(kind),
            bootable: false,
            logical: false,
            attributes: le64(e, 48),
            guid: Some(Uuid::from_gpt_bytes(bytes(e, 16))),
            name: PartitionName(name),
        },
    );
    Ok(())
}

/// Finds the sector size of the GPT header at `lba` (a function of the
/// sector size): 512, or 4096 if only there the signature is found.
fn gpt_sector_size<R: ReadAt + ?Sized>(
    io: &mut R,
    disk_size: u64,
    lba: impl Fn(u64) -> u64,
) -> Res<u64, R::Error> {
    for ss in [SECTOR_SIZE, 4096] {
        let mut sig = [0u8; 8];
        if let Some(off) = lba_bytes(lba(ss), ss) {
            if read_in(io, disk_size, off, &mut sig)? && &sig == b"EFI PART" {
                return Ok(ss);
            }
        }
    }
    Ok(SECTOR_SIZE)
}

fn read_gpt<R: ReadAt + ?Sized>(io: &mut R, disk_size: u64) -> Res<PartitionTable, R::Error> {
    let mut table = PartitionTable {
        scheme: Scheme::Mbr { disk_id: 0 },
        partitions: heapless::Vec::new(),
        omitted: 0,
    };
    let info = |h: &Header, header, ss: u64, primary_problem, backup_problem| {
        Scheme::Gpt(GptInfo {
            header,
            primary_problem,
            backup_problem,
            sector_size: u32::try_from(ss).unwrap_or(512),
            disk_guid: h.disk_guid,
            first_usable_lba: h.first_usable,
            last_usable_lba: h.last_usable,
            alternate_lba: h.alternate_lba,
            entries: h.entries,
            entry_size: h.entry_size,
        })
    };
    // The primary header.
    const PRIMARY: &str = "primary GPT header at LBA";
    const BACKUP: &str = "backup GPT header at LBA";
    let ss = gpt_sector_size(io, disk_size, |_| 1)?;
    let primary_problem = match gpt_header(io, disk_size, ss, 1, PRIMARY)? {
        Ok(h) => match gpt_entries(io, disk_size, ss, &h, &mut table, PRIMARY)? {
            Ok(()) => {
                let backup_problem = check_backup(io, disk_size, ss, &h)?;
                table.scheme = info(&h, GptHeader::Primary, ss, None, backup_problem);
                return Ok(table);
            }
            Err(e) => e,
        },
        Err(e) => e,
    };
    // The backup header at the disk's last LBA.
    let last = |ss: u64| disk_size.checked_div(ss).unwrap_or(0).saturating_sub(1);
    let ss = gpt_sector_size(io, disk_size, last)?;
    let lba = last(ss);
    if let Ok(h) = gpt_header(io, disk_size, ss, lba, BACKUP)? {
        if let Ok(()) = gpt_entries(io, disk_size, ss, &h, &mut table, BACKUP)? {
            table.scheme = info(&h, GptHeader::Backup, ss, Some(primary_problem), None);
            return Ok(table);
        }
    }
    Err(primary_problem.into())
}

/// Checks the backup header the primary names: valid, and naming the same
/// entry array CRC32.
fn check_backup<R: ReadAt + ?Sized>(
    io: &mut R,
    disk_size: u64,
    ss: u64,
    primary: &Header,
) -> Res<Option<Invalid>, R::Error> {
    const BACKUP: &str = "backup GPT header at LBA";
    if primary.alternate_lba == primary.my_lba {
        return Ok(Some(Invalid {
            structure: "primary GPT header at LBA",
            at: primary.my_lba,
            field: "AlternateLBA",
            value: primary.alternate_lba,
            reason: "names the primary header itself",
        }));
    }
    match gpt_header(io, disk_size, ss, primary.alternate_lba, BACKUP)? {
        Err(e) => Ok(Some(e)),
        Ok(b) if b.entries_crc != primary.entries_crc => Ok(Some(Invalid {
            structure: BACKUP,
            at: b.my_lba,
            field: "PartitionEntryArrayCRC32",
            value: u64::from(b.entries_crc),
            reason: "differs from the primary header's",
        })),
        Ok(_) => Ok(None),
    }
}

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use alloc::vec::Vec;

    const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
    const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

    fn put32(d: &mut [u8], at: usize, v: u32) {
        d[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put64(d: &mut [u8], at: usize, v: u64) {
        d[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Writes MBR-style entry `i` of the sector at `sector_at`.
    fn entry(d: &mut [u8], sector_at: usize, i: usize, status: u8, kind: u8, lba: u32, n: u32) {
        let at = sector_at + 446 + i * 16;
        d[at] = status;
        d[at + 4] = kind;
        put32(d, at + 8, lba);
        put32(d, at + 12, n);
        d[sector_at + 510] = 0x55;
        d[sector_at + 511] = 0xaa;
    }

    fn read(d: &[u8]) -> Result<Option<PartitionTable>, TableError<crate::MemError>> {
        let mut io = d;
        PartitionTable::read(&mut io, d.len() as u64)
    }

    fn invalid(r: Result<Option<PartitionTable>, TableError<crate::MemError>>) -> Invalid {
        match r {
            Err(TableError::Invalid(i)) => i,
            other => panic!("expected an invalid table, got {other:?}"),
        }
    }

    /// An MBR disk: a bootable Linux partition, an extended partition at
    /// LBA 100 holding `logicals` logical partitions (EBRs 20 sectors
    /// apart, each partition 10 sectors after its EBR).
    fn mbr_disk(logicals: u32) -> Vec<u8> {
        let mut d = vec![0u8; 512 * (200 + 20 * logicals as usize)];
        entry(&mut d, 0, 0, 0x80, 0x83, 2048 / 512, 50);
        entry(&mut d, 0, 1, 0, 0x05, 100, 20 * logicals + 10);
        put32(&mut d, 440, 0xdead_beef);
        for k in 0..logicals {
            let ebr = 100 + 20 * k;
            let at = ebr as usize * 512;
            entry(&mut d, at, 0, 0, 0x82, 10, 5 + k);
            if k + 1 < logicals {
                entry(&mut d, at, 1, 0, 0x05, 20 * (k + 1), 20);
            }
        }
        d
    }

    #[test]
    fn mbr_with_logical_partitions() {
        let t = read(&mbr_disk(3)).unwrap().unwrap();
        assert_eq!(
            t.scheme,
            Scheme::Mbr {
                disk_id: 0xdead_beef
            }
        );
        let got: Vec<_> = t
            .partitions
            .iter()
            .map(|p| (p.number, p.start / 512, p.size / 512, p.logical, p.bootable))
            .collect();
        assert_eq!(
            got,
            [
                (1, 4, 50, false, true),
                (2, 100, 70, false, false),
                (5, 110, 5, true, false),
                (6, 130, 6, true, false),
                (7, 150, 7, true, false),
            ]
        );
        let p = &t.partitions;
        assert_eq!(p[0].kind.name(), Some("Linux"));
        assert_eq!(p[1].kind.to_string(), "Extended");
        assert!(p[1].kind.is_extended());
        assert_eq!(p[2].kind.to_string(), "Linux swap");
        assert_eq!(
            PartitionType::Mbr(0x42).to_string(),
            "Windows dynamic (LDM)"
        );
        assert_eq!(PartitionType::Mbr(0x99).to_string(), "0x99");
        assert_eq!(p[0].flags().collect::<Vec<_>>(), [Flag::Bootable]);
    }

    #[test]
    fn ebr_chain_loop_is_refused() {
        let mut d = mbr_disk(3);
        // The third EBR links back to the second.
        entry(&mut d, 140 * 512, 1, 0, 0x05, 20, 20);
        let i = invalid(read(&d));
        assert_eq!((i.structure, i.at, i.field), ("EBR at LBA", 120, "EBR LBA"));
        assert!(i.reason.contains("loops"), "{i}");
        // An EBR linking to itself (the first: offset 0 from the start).
        let mut d = mbr_disk(1);
        entry(&mut d, 100 * 512, 1, 0, 0x05, 0, 20);
        let i = invalid(read(&d));
        assert_eq!(i.at, 100, "{i}");
    }

    #[test]
    fn ebr_chain_too_long_or_outside_is_refused() {
        let d = mbr_disk(MAX_EBR_LINKS as u32 + 5);
        let i = invalid(read(&d));
        assert!(i.reason.contains("more than 128 links"), "{i}");
        let mut d = mbr_disk(2);
        entry(&mut d, 120 * 512, 1, 0, 0x05, 0xffff_0000, 20);
        let i = invalid(read(&d));
        assert_eq!(i.at, 100 + 0xffff_0000, "{i}");
        assert!(i.reason.contains("beyond the end of the disk"), "{i}");
        assert!(
            i.to_string().starts_with("EBR at LBA 4294901860: EBR LBA"),
            "{i}"
        );
        // 128 links is the limit, not an error.
        let t = read(&mbr_disk(MAX_EBR_LINKS as u32)).unwrap().unwrap();
        assert_eq!(t.partitions.len(), MAX_PARTITIONS);
        assert_eq!(t.omitted as usize, 2 + MAX_EBR_LINKS - MAX_PARTITIONS);
    }

    #[test]
    fn not_a_partition_table() {
        assert!(read(&[0u8; 4096]).unwrap().is_none());
        assert!(read(&[0u8; 100]).unwrap().is_none());
        // A status byte that is neither 0x00 nor 0x80.
        let mut d = mbr_disk(0);
        d[446] = 0x12;
        assert!(read(&d).unwrap().is_none());
        // A FAT boot sector (a volume without a table).
        let mut d = vec![0u8; 4096];
        d[0..3].copy_from_slice(&[0xeb, 0x3c, 0x90]);
        d[11..13].copy_from_slice(&512u16.to_le_bytes());
        d[13] = 4;
        d[14] = 1;
        d[16] = 2;
        d[0x36..0x3b].copy_from_slice(b"FAT16");
        d[510] = 0x55;
        d[511] = 0xaa;
        assert!(read(&d).unwrap().is_none());
        d[3..11].copy_from_slice(b"NTFS    ");
        d[0x36..0x3b].fill(0);
        assert!(read(&d).unwrap().is_none());
    }

    /// A GPT disk of `sectors` sectors of `ss` bytes: protective MBR,
    /// primary header at LBA 1 and entries at LBA 2, backup entries and
    /// header at the end.
    struct Gpt {
        ss: usize,
        sectors: usize,
        entries: u32,
        entry_size: u32,
        parts: Vec<(&'static str, u64, u64, u64, &'static str)>,
    }

    impl Gpt {
        fn new(sectors: usize) -> Gpt {
            Gpt {
                ss: 512,
                sectors,
                entries: 128,
                entry_size: 128,
                parts: vec![
                    (ESP, 34, 99, 0x1, "EFI system"),
                    (LINUX, 100, 199, 0x4 | (1 << 60), "root \u{e9}\u{1F600}"),
                ],
            }
        }

        fn array(&self) -> Vec<u8> {
            let mut a = vec![0u8; (self.entries * self.entry_size) as usize];
            for (i, (kind, first, last, attrs, name)) in self.parts.iter().enumerate() {
                let e = &mut a[i * self.entry_size as usize..];
                let g = Uuid::parse(kind).unwrap().0;
                let mut gpt = g;
                gpt.swap(0, 3);
                gpt.swap(1, 2);
                gpt.swap(4, 5);
                gpt.swap(6, 7);
                e[0..16].copy_from_slice(&gpt);
                e[16..32].copy_from_slice(&[i as u8 + 1; 16]);
                put64(e, 32, *first);
                put64(e, 40, *last);
                put64(e, 48, *attrs);
                for (k, u) in name.encode_utf16().enumerate() {
                    e[56 + 2 * k..58 + 2 * k].copy_from_slice(&u.to_le_bytes());
                }
            }
            a
        }

        fn header(&self, my: u64, alt: u64, entries_lba: u64, array_crc: u32) -> [u8; 92] {
            let mut h = [0u8; 92];
            h[0..8].copy_from_slice(b"EFI PART");
            put32(&mut h, 8, 0x10000);
            put32(&mut h, 12, 92);
            put64(&mut h, 24, my);
            put64(&mut h, 32, alt);
            put64(&mut h, 40, 34);
            put64(&mut h, 48, self.sectors as u64 - 34);
            h[56..72].copy_from_slice(&[0x11; 16]);
            put64(&mut h, 72, entries_lba);
            put32(&mut h, 80, self.entries);
            put32(&mut h, 84, self.entry_size);
            put32(&mut h, 88, array_crc);
            let crc = crc32(&h);
            put32(&mut h, 16, crc);
            h
        }

        fn build(&self) -> Vec<u8> {
            let ss = self.ss;
            let mut d = vec![0u8; ss * self.sectors];
            entry(&mut d, 0, 0, 0, 0xee, 1, (self.sectors - 1) as u32);
            let a = self.array();
            let crc = crc32(&a);
            let last = self.sectors as u64 - 1;
            let array_sectors = a.len().div_ceil(ss) as u64;
            let backup_entries = last - array_sectors;
            d[ss..ss + 92].copy_from_slice(&self.header(1, last, 2, crc));
            d[2 * ss..2 * ss + a.len()].copy_from_slice(&a);
            let at = backup_entries as usize * ss;
            d[at..at + a.len()].copy_from_slice(&a);
            let at = last as usize * ss;
            d[at..at + 92].copy_from_slice(&self.header(last, 1, backup_entries, crc));
            d
        }
    }

    fn gpt_info(t: &PartitionTable) -> &GptInfo {
        match &t.scheme {
            Scheme::Gpt(g) => g,
            other => panic!("not a GPT: {other:?}"),
        }
    }

    fn check_two_partitions(t: &PartitionTable, ss: u64) {
        let p = &t.partitions;
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].number, p[0].start, p[0].size), (1, 34 * ss, 66 * ss));
        assert_eq!(
            (p[1].number, p[1].start, p[1].size),
            (2, 100 * ss, 100 * ss)
        );
        assert_eq!(p[0].kind.to_string(), "EFI System");
        assert_eq!(p[1].kind.name(), Some("Linux filesystem"));
        assert_eq!(p[0].name.to_string(), "EFI system");
        assert_eq!(p[1].name.to_string(), "root \u{e9}\u{1F600}");
        assert_eq!(p[1].guid, Some(Uuid([2; 16])));
        assert_eq!(p[0].flags().collect::<Vec<_>>(), [Flag::Required]);
        // Bit 60 is named only for Microsoft basic data.
        assert_eq!(
            p[1].flags().map(|f| f.to_string()).collect::<Vec<_>>(),
            ["legacy BIOS bootable", "attribute bit 60"]
        );
    }

    #[test]
    fn gpt_primary() {
        let d = Gpt::new(400).build();
        let t = read(&d).unwrap().unwrap();
        let g = gpt_info(&t);
        assert_eq!(g.header, GptHeader::Primary);
        assert_eq!((g.primary_problem, g.backup_problem), (None, None));
        assert_eq!((g.sector_size, g.entries, g.entry_size), (512, 128, 128));
        assert_eq!(
            (g.first_usable_lba, g.last_usable_lba, g.alternate_lba),
            (34, 366, 399)
        );
        assert_eq!(g.disk_guid, Uuid([0x11; 16]));
        check_two_partitions(&t, 512);
    }

    #[test]
    fn gpt_backup_when_primary_damaged() {
        let good = Gpt::new(400).build();
        // Zeroed header, bad header CRC, bad entry array (CRC), header
        // naming another LBA: each falls back to the backup, saying why.
        type Damage = fn(&mut Vec<u8>);
        let cases: [(&str, Damage); 4] = [
            ("Signature", |d| d[512..1024].fill(0)),
            ("HeaderCRC32", |d| d[512 + 40] ^= 1),
            ("PartitionEntryArrayCRC32", |d| d[1024 + 60] ^= 1),
            ("MyLBA", |d| {
                put64(d, 512 + 24, 7);
                d[512 + 16..512 + 20].fill(0);
                let crc = crc32(&d[512..512 + 92]);
                put32(d, 512 + 16, crc);
            }),
        ];
        for (field, damage) in cases {
            let mut d = good.clone();
            damage(&mut d);
            let t = read(&d).unwrap().unwrap();
            let g = gpt_info(&t);
            assert_eq!(g.header, GptHeader::Backup, "{field}");
            let p = g.primary_problem.unwrap();
            assert_eq!(
                (p.structure, p.at, p.field),
                ("primary GPT header at LBA", 1, field)
            );
            assert_eq!(g.alternate_lba, 1);
            check_two_partitions(&t, 512);
        }
        // A protective MBR alone, both GPT headers gone: an error naming the
        // primary's problem.
        let mut d = good.clone();
        d[512..1024].fill(0);
        let n = d.len();
        d[n - 512..].fill(0);
        let i = invalid(read(&d));
        assert_eq!(i.field, "Signature");
        // No MBR signature but a GPT: read anyway.
        let mut d = good.clone();
        d[510] = 0;
        assert_eq!(read(&d).unwrap().unwrap().partitions.len(), 2);
    }

    #[test]
    fn gpt_backup_problem_is_reported() {
        let mut d = Gpt::new(400).build();
        let n = d.len();
        d[n - 512 + 30] ^= 0xff;
        let t = read(&d).unwrap().unwrap();
        let g = gpt_info(&t);
        assert_eq!(g.header, GptHeader::Primary);
        let b = g.backup_problem.unwrap();
        assert_eq!((b.at, b.field), (399, "HeaderCRC32"));
        // A primary header naming itself as the backup.
        let mut d = Gpt::new(400).build();
        put64(&mut d, 512 + 32, 1);
        d[512 + 16..512 + 20].fill(0);
        let crc = crc32(&d[512..512 + 92]);
        put32(&mut d, 512 + 16, crc);
        let t = read(&d).unwrap().unwrap();
        let b = gpt_info(&t).backup_problem.unwrap();
        assert_eq!((b.field, b.value), ("AlternateLBA", 1));
    }

    #[test]
    fn gpt_hostile_headers() {
        // Absurd entry counts and sizes, CRCs correct: refused by name.
        let mut g = Gpt::new(400);
        g.entries = u32::MAX;
        g.parts.clear();
        let mut d = vec![0u8; 400 * 512];
        entry(&mut d, 0, 0, 0, 0xee, 1, 399);
        d[512..604].copy_from_slice(&g.header(1, 399, 2, 0));
        d[399 * 512..399 * 512 + 92].copy_from_slice(&g.header(399, 1, 300, 0));
        let i = invalid(read(&d));
        assert_eq!(
            (i.field, i.value),
            ("NumberOfPartitionEntries", u64::from(u32::MAX))
        );
        assert!(
            i.to_string()
                .contains("NumberOfPartitionEntries 4294967295"),
            "{i}"
        );
        for (size, field) in [
            (100, "SizeOfPartitionEntry"),
            (0, "SizeOfPartitionEntry"),
            (384, "SizeOfPartitionEntry"),
        ] {
            g.entries = 4;
            g.entry_size = size;
            d[512..604].copy_from_slice(&g.header(1, 399, 2, 0));
            d[399 * 512..399 * 512 + 92].copy_from_slice(&g.header(399, 1, 300, 0));
            assert_eq!(invalid(read(&d)).field, field, "entry size {size}");
        }
        // An entry array reaching past the end, or over the header.
        g.entry_size = 128;
        for (lba, reason) in [
            (400, "past the end"),
            (1, "overlaps the header"),
            (u64::MAX / 2, "beyond any disk"),
        ] {
            d[512..604].copy_from_slice(&g.header(1, 399, lba, 0));
            d[399 * 512..399 * 512 + 92].fill(0);
            let i = invalid(read(&d));
            assert_eq!(i.field, "PartitionEntryLBA");
            assert!(i.reason.contains(reason), "{i}");
        }
        // A header size beyond the sector.
        let mut d = Gpt::new(400).build();
        put32(&mut d, 512 + 12, 4096);
        let t = read(&d).unwrap().unwrap();
        assert_eq!(gpt_info(&t).primary_problem.unwrap().field, "HeaderSize");
    }

    #[test]
    fn gpt_entries_of_other_sizes_and_counts() {
        let mut g = Gpt::new(400);
        g.entry_size = 256;
        g.entries = 64;
        check_two_partitions(&read(&g.build()).unwrap().unwrap(), 512);
        g.entry_size = 1024;
        g.entries = 16;
        check_two_partitions(&read(&g.build()).unwrap().unwrap(), 512);
        // 4096-byte sectors: the header at byte 4096.
        let mut g = Gpt::new(400);
        g.ss = 4096;
        let t = read(&g.build()).unwrap().unwrap();
        assert_eq!(gpt_info(&t).sector_size, 4096);
        check_two_partitions(&t, 4096);
        // ... also through the backup.
        let mut d = g.build();
        d[4096..8192].fill(0);
        let t = read(&d).unwrap().unwrap();
        assert_eq!(
            (gpt_info(&t).header, gpt_info(&t).sector_size),
            (GptHeader::Backup, 4096)
        );
        check_two_partitions(&t, 4096);
    }

    #[test]
    fn gpt_more_partitions_than_capacity() {
        let mut g = Gpt::new(2000);
        g.entries = 200;
        g.parts = (0..200)
            .map(|i| (LINUX, 100 + i, 100 + i, 0, "p"))
            .collect();
        let t = read(&g.build()).unwrap().unwrap();
        assert_eq!(t.partitions.len(), MAX_PARTITIONS);
        assert_eq!(t.omitted, 200 - MAX_PARTITIONS as u32);
        assert_eq!(t.partitions[127].number, 128);
    }

    #[test]
    fn gpt_entry_ending_before_start() {
        let mut g = Gpt::new(400);
        g.parts[1].2 = 50;
        let i = invalid(read(&g.build()));
        assert_eq!(
            (i.structure, i.at, i.field, i.value),
            ("GPT partition entry", 2, "EndingLBA", 50)
        );
    }

    #[test]
    fn truncated_disks() {
        let d = Gpt::new(400).build();
        for len in [
            0, 511, 512, 513, 1024, 1100, 2048, 10000, 17408, 17920, 30000, 204_000,
        ] {
            let mut io = &d[..];
            // Never a panic; short disks hold no usable GPT.
            let r = PartitionTable::read(&mut io, len);
            if len < 17920 {
                assert!(!matches!(r, Ok(Some(_))), "{len}: {r:?}");
            }
        }
        // The MBR's logical chain with the disk cut short.
        let d = mbr_disk(3);
        let mut io = &d[..];
        let i = match PartitionTable::read(&mut io, 130 * 512) {
            Err(TableError::Invalid(i)) => i,
            other => panic!("{other:?}"),
        };
        assert_eq!(i.at, 140);
    }

    #[test]
    fn random_bytes_never_panic_and_reads_stay_bounded() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let base = Gpt::new(300).build();
        for round in 0..3000 {
            let mut d = if round % 2 == 0 {
                base.clone()
            } else {
                mbr_disk(4)
            };
            // Flip a few bytes in the interesting places.
            for _ in 0..(1 + next() % 8) {
                let region =
                    [0usize, 512, 1024, 100 * 512, 120 * 512, d.len() - 512][next() as usize % 6];
                let at = (region + next() as usize % 512).min(d.len() - 1);
                d[at] = next() as u8;
            }
            let len = d.len() as u64;
            let mut reads = 0u32;
            let mut io = from_fn(|off: u64, buf: &mut [u8]| {
                reads += 1;
                assert!(off + buf.len() as u64 <= len, "read past the disk");
                assert!(buf.len() <= 512, "a read of {} bytes", buf.len());
                BlockRead::read_at(&mut &d[..], off, buf)
            });
            let _ = PartitionTable::read(&mut io, len);
            assert!(
                reads <= 2 + 2 * (2 + 2 * 32) + MAX_EBR_LINKS as u32,
                "{reads} reads"
            );
        }
    }

    #[test]
    fn uuid_text() {
        let u = Uuid::parse(ESP).unwrap();
        assert_eq!(u.to_string(), ESP.to_ascii_lowercase());
        assert_eq!(alloc::format!("{u:X}"), ESP);
        assert_eq!(u, guid(ESP));
        assert!(Uuid::parse("C12A7328-F81F-11D2-BA4B-00A0C93EC93").is_none());
        assert!(Uuid::parse("C12A7328+F81F-11D2-BA4B-00A0C93EC93B").is_none());
        assert!(Uuid::parse("G12A7328-F81F-11D2-BA4B-00A0C93EC93B").is_none());
        assert_eq!(
            PartitionType::Gpt(Uuid([0xab; 16])).to_string(),
            "ABABABAB-ABAB-ABAB-ABAB-ABABABABABAB"
        );
        // zlib's check value.
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn reads_the_guest_view_of_an_image() {
        // A qcow2 image (4 KiB clusters) whose guest disk holds the GPT.
        let disk = Gpt::new(400).build();
        let opts = crate::CreateOptions {
            size: disk.len() as u64,
            cluster_size: 4096,
            ..crate::CreateOptions::default()
        };
        let mut file = Vec::new();
        crate::create::format(&mut file, &opts).unwrap();
        let mut w = crate::WritableImage::open(file, &crate::OpenOptions::default()).unwrap();
        w.write_at(0, &disk).unwrap();
        w.flush().unwrap();
        let file = w.into_inner();
        let mut img = crate::Image::open(file, &crate::OpenOptions::default()).unwrap();
        let size = img.size();
        let t = PartitionTable::read(&mut img, size).unwrap().unwrap();
        check_two_partitions(&t, 512);
    }
}
