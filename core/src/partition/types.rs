//! Partition types: MBR type ids and GPT type GUIDs, and their names.
#![deny(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]

use core::fmt;

use super::Uuid;

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
pub(super) const MS_BASIC_DATA: Uuid = guid("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7");

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

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::as_conversions
)]
pub(super) mod tests {
    use super::super::gpt::crc32;
    use super::*;
    use alloc::string::ToString;

    pub(in crate::partition) const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
    pub(in crate::partition) const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

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
}
