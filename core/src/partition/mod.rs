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

// MBR and its EBR chain live in `mbr`, GPT (headers, entry array, CRC32)
// in `gpt`, partition type ids and GUIDs and their names in `types`.
mod gpt;
mod mbr;
mod types;

pub(crate) use gpt::crc32_raw;
pub use gpt::{GptHeader, GptInfo};
pub use types::PartitionType;

use gpt::read_gpt;
use mbr::{follow_ebr_chain, is_boot_sector, mbr_entries};
use types::MS_BASIC_DATA;

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

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]
mod tests {
    use super::gpt::tests::{check_two_partitions, Gpt};
    use super::mbr::tests::mbr_disk;
    use super::*;
    use alloc::vec::Vec;

    pub(super) fn put32(d: &mut [u8], at: usize, v: u32) {
        d[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub(super) fn put64(d: &mut [u8], at: usize, v: u64) {
        d[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    pub(super) fn read(d: &[u8]) -> Result<Option<PartitionTable>, TableError<crate::MemError>> {
        let mut io = d;
        PartitionTable::read(&mut io, d.len() as u64)
    }

    pub(super) fn invalid(
        r: Result<Option<PartitionTable>, TableError<crate::MemError>>,
    ) -> Invalid {
        match r {
            Err(TableError::Invalid(i)) => i,
            other => panic!("expected an invalid table, got {other:?}"),
        }
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
