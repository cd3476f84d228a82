//! What the guest disk holds (`QcowImage.contents()`): the partition table
//! (MBR with logical partitions, or GPT) and the file system or other
//! content of each partition and of the whole disk, from the core's
//! `partition` and `signature` modules, with the keys of
//! `qcow2-info --json`'s `"contents"`.

use qcowkit_core::partition::{GptHeader, PartitionTable, PartitionType, Scheme, TableError};
use qcowkit_core::signature::{self, Content};
use qcowkit_core::Image;
use serde::Serialize;
use wasm_bindgen::prelude::*;

use crate::error::Res;
use crate::reports::to_js;
use crate::{QcowImage, Storage};

/// What the guest disk holds (the shape of `qcow2-info --json`'s
/// `contents`).
#[derive(Default, Serialize)]
#[serde(rename_all = "kebab-case")]
struct Contents {
    #[serde(skip_serializing_if = "Option::is_none")]
    partition_table: Option<TableRef>,
    /// Why the partition table could not be read (a broken table).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    partitions: Vec<PartitionRef>,
    #[serde(skip_serializing_if = "is_zero")]
    omitted_partitions: u32,
    /// What starts at the disk's first byte, if recognised.
    #[serde(skip_serializing_if = "Option::is_none")]
    filesystem: Option<FilesystemRef>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct TableRef {
    #[serde(rename = "type")]
    kind: &'static str,
    sector_size: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk_guid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    primary_problem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backup_problem: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct PartitionRef {
    number: u32,
    start: u64,
    size: u64,
    #[serde(rename = "type")]
    kind: String,
    type_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uuid: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    logical: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    flags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    filesystem: Option<FilesystemRef>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct FilesystemRef {
    #[serde(rename = "type")]
    kind: &'static str,
    blkid_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    block_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    features: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cipher: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cipher_mode: Option<String>,
}

impl FilesystemRef {
    fn of(c: Content) -> FilesystemRef {
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
            cipher_mode: c.cipher.map(|c| c.mode.to_string()),
        }
    }
}

/// `len` bytes at `offset` probed: what they hold, if recognised. Only the
/// storage's errors are errors.
fn probe(img: &mut Image<Storage>, offset: u64, len: u64) -> Res<Option<FilesystemRef>> {
    Ok(signature::probe(img, offset, len)?.map(FilesystemRef::of))
}

fn table_ref(scheme: &Scheme) -> TableRef {
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

/// Reads the partition table of the guest disk and probes each partition
/// (not an MBR extended partition: a container) and the whole disk.
fn contents_of(img: &mut Image<Storage>) -> Res<Contents> {
    let size = img.size();
    let mut c = Contents::default();
    match PartitionTable::read(img, size) {
        Ok(Some(table)) => {
            c.partition_table = Some(table_ref(&table.scheme));
            c.omitted_partitions = table.omitted;
            for p in &table.partitions {
                let (offset, len) = p.region(size);
                let filesystem = if p.kind.is_extended() {
                    None
                } else {
                    probe(img, offset, len)?
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
                });
            }
        }
        Ok(None) => {}
        Err(TableError::Io(e)) => return Err(e.into()),
        // A broken table is part of the report (as qcow2-info shows it).
        Err(e) => c.error = Some(e.to_string()),
    }
    c.filesystem = probe(img, 0, size)?;
    Ok(c)
}

#[wasm_bindgen]
impl QcowImage {
    /// What the guest disk holds: the partition table (MBR, with logical
    /// partitions, or GPT, from the backup header when the primary is
    /// damaged) and the file system or other content of each partition
    /// (ext2/3/4, XFS, Btrfs, FAT12/16/32, exFAT, NTFS, ISO 9660, swap,
    /// LVM2 PV, LUKS, qcow2) and of the whole disk, with the keys of
    /// `qcow2-info --json`'s `"contents"`. A table that cannot be right
    /// (a loop of EBRs, two damaged GPT headers) is reported in `error`,
    /// not thrown; the storage's errors are thrown with their codes. Reads
    /// are bounded: a few KiB per partition.
    #[wasm_bindgen(unchecked_return_type = "DiskContents")]
    pub fn contents(&mut self) -> Res<JsValue> {
        to_js(&contents_of(self.reader())?)
    }
}

#[wasm_bindgen(typescript_custom_section)]
const CONTENTS_TYPES: &'static str = r#"
/**
 * What the guest disk holds (`contents()`), with the keys of `qcow2-info --json`'s `"contents"`:
 * the partition table, or `error` when it cannot be read (a loop of EBRs, two damaged GPT
 * headers), its partitions in number order, and `filesystem`, what starts at the disk's first
 * byte (a file system on the whole disk), when recognised.
 */
export interface DiskContents {
  "partition-table"?: PartitionTableInfo;
  /** Why the partition table could not be read: `"invalid partition table: ..."`, naming the field. */
  error?: string;
  partitions?: PartitionInfo[];
  /** Partitions beyond the 128 the core keeps. */
  "omitted-partitions"?: number;
  filesystem?: FilesystemInfo;
}
/** A partition table. */
export interface PartitionTableInfo {
  type: "mbr" | "gpt";
  /** Bytes per sector: 512, or 4096 for a GPT found at byte 4096. */
  "sector-size": number;
  /** MBR: the disk identifier, `"0x1234abcd"`. */
  "disk-id"?: string;
  /** GPT: the disk GUID (uppercase). */
  "disk-guid"?: string;
  /** GPT: the header the partitions were read from. */
  header?: "primary" | "backup";
  /** GPT: why the primary header (or its entry array) was not used. */
  "primary-problem"?: string;
  /** GPT: what is wrong with the backup header when the primary was used. */
  "backup-problem"?: string;
}
/** A partition: MBR 1-4 primary (an extended one included) and 5 and up logical; GPT entry + 1. */
export interface PartitionInfo {
  number: number;
  /** Start in bytes from the start of the disk. */
  start: number;
  /** Size in bytes. */
  size: number;
  /** The type in words (util-linux's names), or `type-id` when unknown. */
  type: string;
  /** The MBR type id (`"0x83"`) or the GPT type GUID (uppercase). */
  "type-id": string;
  /** GPT: the partition name (may be empty). */
  name?: string;
  /** GPT: the unique partition GUID (uppercase). */
  uuid?: string;
  /** MBR: a logical partition (inside the extended one). */
  logical?: true;
  /**
   * Flags and attributes in words: `"bootable"` (MBR), `"required"`, `"no block IO protocol"`,
   * `"legacy BIOS bootable"`, `"read-only"`, `"shadow copy"`, `"hidden"`, `"no automount"`,
   * `"attribute bit N"` (GPT).
   */
  flags?: string[];
  /** What the partition holds, when recognised (never for an MBR extended partition). */
  filesystem?: FilesystemInfo;
}
/** A file system or other content. */
export interface FilesystemInfo {
  type: FilesystemType;
  /** blkid's `TYPE`: `"ext4"`, `"vfat"`, `"ntfs"`, `"crypto_LUKS"`, `"LVM2_member"`, `"swap"`, ... (`"qcow2"`). */
  "blkid-type": string;
  label?: string;
  /**
   * UUID or serial number as blkid prints it: a UUID (ext, XFS, Btrfs, swap, LUKS), `"ABCD-1234"`
   * (FAT, exFAT), 16 hex digits (NTFS), LVM2's 6-4-4-4-4-4-6 form, ISO 9660's date.
   */
  uuid?: string;
  /** The format's version: LUKS 1 or 2, swap, XFS 4 or 5, qcow2 2 or 3, exFAT's major revision. */
  version?: number;
  /** Block size (ext, XFS, ISO 9660), sector size (Btrfs), cluster size (FAT, exFAT, NTFS, qcow2), page size (swap). */
  "block-size"?: number;
  /** The size in bytes the volume says it has (a qcow2 image: its virtual size). */
  size?: number;
  /** ext2/3/4: the feature names, as dumpe2fs lists them. */
  features?: string[];
  /** LUKS: the cipher (`"aes"`). */
  cipher?: string;
  /** LUKS: the cipher mode (`"xts-plain64"`). */
  "cipher-mode"?: string;
}
/** What a volume is, in words. */
export type FilesystemType =
  | "ext2" | "ext3" | "ext4" | "ext journal" | "XFS" | "Btrfs" | "FAT12" | "FAT16" | "FAT32"
  | "exFAT" | "NTFS" | "ISO 9660" | "Linux swap" | "LVM2 PV" | "LUKS" | "qcow2";
"#;
