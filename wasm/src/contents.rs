//! What the guest disk holds (`QcowImage.contents()`): the partition table
//! (MBR with logical partitions, or GPT) and the file system or other
//! content of each partition and of the whole disk, from the core's
//! `partition` and `signature` modules, with the keys of
//! `qcow2-info --json`'s `"contents"`.

use qcowkit_core::contents::disk_contents;
use wasm_bindgen::prelude::*;

use crate::error::Res;
use crate::reports::to_js;
use crate::QcowImage;

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
        let img = self.reader();
        let size = img.size();
        to_js(&disk_contents(img, size)?)
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
