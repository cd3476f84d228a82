//! GPT: the primary and backup headers, the partition entry array, and
//! the CRC32 that guards both.
#![deny(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]

use super::{
    bytes, lba_bytes, le16, le32, le64, push, read_in, sub, Invalid, Partition, PartitionName,
    PartitionTable, PartitionType, ReadAt, Res, Scheme, Uuid, MAX_GPT_ARRAY_BYTES, SECTOR_SIZE,
};

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

pub(super) fn read_gpt<R: ReadAt + ?Sized>(
    io: &mut R,
    disk_size: u64,
) -> Res<PartitionTable, R::Error> {
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
pub(super) mod tests {
    use super::super::mbr::tests::entry;
    use super::super::tests::{invalid, put32, put64, read};
    use super::super::types::tests::{ESP, LINUX};
    use super::super::{Flag, MAX_PARTITIONS};
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use alloc::vec::Vec;

    /// A GPT disk of `sectors` sectors of `ss` bytes: protective MBR,
    /// primary header at LBA 1 and entries at LBA 2, backup entries and
    /// header at the end.
    pub(in crate::partition) struct Gpt {
        ss: usize,
        sectors: usize,
        entries: u32,
        entry_size: u32,
        parts: Vec<(&'static str, u64, u64, u64, &'static str)>,
    }

    impl Gpt {
        pub(in crate::partition) fn new(sectors: usize) -> Gpt {
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

        pub(in crate::partition) fn build(&self) -> Vec<u8> {
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

    pub(in crate::partition) fn check_two_partitions(t: &PartitionTable, ss: u64) {
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
}
