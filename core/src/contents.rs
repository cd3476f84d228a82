//! What the guest disk holds, as a typed report: the partition table (the
//! [`partition`](crate::partition) module) and the file system or other
//! content of each partition and of the whole disk (the
//! [`signature`] module), with the keys of
//! `qcow2-info --json`'s `"contents"` (with the `serde` feature). Every
//! host builds it here and shows it its own way.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::partition::{GptHeader, PartitionTable, PartitionType, ReadAt, Scheme, TableError};
use crate::signature::{self, Content};

#[cfg(feature = "serde")]
use serde::Serialize;

/// What the guest disk holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub struct DiskContents {
    /// The partition table, if any.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub partition_table: Option<TableRef>,
    /// Why the partition table could not be read (a loop of EBRs, two
    /// damaged GPT headers): part of the report, not an error.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub error: Option<String>,
    /// The partitions, in number order.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Vec::is_empty"))]
    pub partitions: Vec<PartitionRef>,
    /// Partitions beyond what the core keeps (128).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "is_zero"))]
    pub omitted_partitions: u32,
    /// What starts at the disk's first byte, when recognised (a file
    /// system on the whole disk).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub filesystem: Option<FilesystemRef>,
}

#[cfg(feature = "serde")]
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A partition table, in [`DiskContents`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub struct TableRef {
    /// `gpt` or `mbr`.
    #[cfg_attr(feature = "serde", serde(rename = "type"))]
    pub kind: &'static str,
    /// Bytes per sector.
    pub sector_size: u32,
    /// MBR: the disk identifier (`0x1234abcd`).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub disk_id: Option<String>,
    /// GPT: the disk GUID (uppercase).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub disk_guid: Option<String>,
    /// GPT: `primary` or `backup`, the header the partitions come from.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub header: Option<&'static str>,
    /// GPT: why the primary header was not used.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub primary_problem: Option<String>,
    /// GPT: what is wrong with the backup header.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub backup_problem: Option<String>,
}

/// A partition, in [`DiskContents`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub struct PartitionRef {
    /// Its number (GPT entry + 1; MBR 1-4 primary, 5 and up logical).
    pub number: u32,
    /// Start in bytes.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Type in words (util-linux's names), or the id/GUID when unknown.
    #[cfg_attr(feature = "serde", serde(rename = "type"))]
    pub kind: String,
    /// The MBR type id (`0x83`) or GPT type GUID (uppercase).
    pub type_id: String,
    /// GPT partition name.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub name: Option<String>,
    /// GPT unique partition GUID (uppercase).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub uuid: Option<String>,
    /// MBR: a logical partition.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "core::ops::Not::not"))]
    pub logical: bool,
    /// Flags and attributes in words.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Vec::is_empty"))]
    pub flags: Vec<String>,
    /// What the partition holds, if recognised (never probed for an MBR
    /// extended partition: a container).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub filesystem: Option<FilesystemRef>,
    /// An MBR extended partition.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub extended: bool,
}

/// A file system or other content, in [`DiskContents`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub struct FilesystemRef {
    /// In words: `ext4`, `FAT32`, `LUKS`, `LVM2 PV`, ...
    #[cfg_attr(feature = "serde", serde(rename = "type"))]
    pub kind: &'static str,
    /// blkid's `TYPE` (`vfat`, `crypto_LUKS`, `LVM2_member`, ...).
    pub blkid_type: &'static str,
    /// Label.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub label: Option<String>,
    /// UUID or serial number, as blkid prints it.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub uuid: Option<String>,
    /// The format's version (LUKS, swap, XFS, qcow2, exFAT).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub version: Option<u32>,
    /// Block, cluster, sector or page size in bytes.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub block_size: Option<u32>,
    /// The size the volume says it has (a qcow2 image: its virtual size).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub size: Option<u64>,
    /// ext2/3/4 feature names, as dumpe2fs lists them.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub features: Option<Vec<String>>,
    /// LUKS cipher (`aes`).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub cipher: Option<String>,
    /// LUKS cipher mode (`xts-plain64`).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub cipher_mode: Option<String>,
}

impl FilesystemRef {
    /// The report of a probe's finding.
    pub fn of(c: &Content) -> FilesystemRef {
        FilesystemRef {
            kind: c.kind.name(),
            blkid_type: c.kind.blkid_type(),
            label: (!c.label.is_empty()).then(|| c.label.to_string()),
            uuid: c.id.map(|i| i.to_string()),
            version: c.version,
            block_size: c.block_size,
            size: c.size,
            features: c
                .ext_features
                .map(|f| f.iter().map(|f| f.to_string()).collect()),
            cipher: c.cipher.as_ref().map(|c| c.name.to_string()),
            cipher_mode: c.cipher.as_ref().map(|c| c.mode.to_string()),
        }
    }
}

impl TableRef {
    /// The report of a partition table's scheme.
    pub fn of(scheme: &Scheme) -> TableRef {
        match scheme {
            Scheme::Mbr { disk_id } => TableRef {
                kind: "mbr",
                sector_size: 512,
                disk_id: Some(format!("{disk_id:#010x}")),
                disk_guid: None,
                header: None,
                primary_problem: None,
                backup_problem: None,
            },
            Scheme::Gpt(g) => TableRef {
                kind: "gpt",
                sector_size: g.sector_size,
                disk_id: None,
                disk_guid: Some(format!("{:X}", g.disk_guid)),
                header: Some(match g.header {
                    GptHeader::Primary => "primary",
                    GptHeader::Backup => "backup",
                }),
                primary_problem: g.primary_problem.map(|p| p.to_string()),
                backup_problem: g.backup_problem.map(|p| p.to_string()),
            },
        }
    }
}

/// Reads the partition table of a disk of `size` bytes read through `io`
/// and probes each partition (not an MBR extended partition) and the
/// whole disk. A table that cannot be right is reported in
/// [`DiskContents::error`]; only the reader's errors are errors. Reads are
/// bounded: a few KiB per partition.
pub fn disk_contents<R: ReadAt + ?Sized>(io: &mut R, size: u64) -> Result<DiskContents, R::Error> {
    let mut c = DiskContents::default();
    match PartitionTable::read(io, size) {
        Ok(Some(table)) => {
            c.partition_table = Some(TableRef::of(&table.scheme));
            c.omitted_partitions = table.omitted;
            for p in &table.partitions {
                let (offset, len) = p.region(size);
                let extended = p.kind.is_extended();
                let filesystem = if extended {
                    None
                } else {
                    signature::probe(io, offset, len)?
                        .as_ref()
                        .map(FilesystemRef::of)
                };
                c.partitions.push(PartitionRef {
                    number: p.number,
                    start: p.start,
                    size: p.size,
                    kind: p.kind.to_string(),
                    type_id: match p.kind {
                        PartitionType::Mbr(id) => format!("{id:#04x}"),
                        PartitionType::Gpt(g) => format!("{g:X}"),
                    },
                    name: p.guid.map(|_| p.name.to_string()),
                    uuid: p.guid.map(|g| format!("{g:X}")),
                    logical: p.logical,
                    flags: p.flags().map(|f| f.to_string()).collect(),
                    filesystem,
                    extended,
                });
            }
        }
        Ok(None) => {}
        Err(TableError::Io(e)) => return Err(e),
        Err(TableError::Invalid(i)) => c.error = Some(format!("invalid partition table: {i}")),
    }
    c.filesystem = signature::probe(io, 0, size)?
        .as_ref()
        .map(FilesystemRef::of);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition;

    #[test]
    fn an_empty_disk_holds_nothing_and_a_broken_reader_is_an_error() {
        let disk = alloc::vec![0u8; 1 << 20];
        let mut io = partition::from_fn(|off: u64, buf: &mut [u8]| {
            let at = off as usize;
            buf.copy_from_slice(&disk[at..at + buf.len()]);
            Ok::<(), ()>(())
        });
        assert_eq!(disk_contents(&mut io, 1 << 20), Ok(DiskContents::default()));
        let mut broken = partition::from_fn(|_: u64, _: &mut [u8]| Err::<(), _>("gone"));
        assert_eq!(disk_contents(&mut broken, 1 << 20), Err("gone"));
    }
}
