//! Reports as plain JavaScript objects (with TypeScript types): what the
//! core computes, in qemu-img's JSON shapes.

use qcowkit_core::backing::resolve_name;
use qcowkit_core::map::Category;
use qcowkit_core::report::{Info, InfoParams, MapEntry};
use qcowkit_core::{Image, OpenOptions};
use wasm_bindgen::prelude::*;

use crate::error::{Code, QcowError, Res};
use crate::storage::MAX_SAFE;
use crate::Storage;
use js_sys::Reflect;

/// A guest range and its allocation category ([`QcowImage::allocation_map`]).
#[derive(serde::Serialize)]
pub(crate) struct AllocationRange {
    pub(crate) start: u64,
    pub(crate) length: u64,
    pub(crate) category: Category,
}

/// One page of a map (`QcowImage.mapPage`).
#[derive(serde::Serialize)]
pub(crate) struct MapPage {
    pub entries: Vec<MapEntry>,
    pub next: Option<u64>,
}

/// A run of the image file with one use ([`QcowImage::host_layout`]).
#[derive(serde::Serialize)]
pub(crate) struct HostRun {
    pub start: u64,
    pub len: u64,
    pub kind: &'static str,
}

/// A guest offset or length given by JavaScript as a number: a finite,
/// whole, non-negative number no larger than `Number.MAX_SAFE_INTEGER`
/// (beyond that numbers are not exact).
pub(crate) fn offset_arg(name: &str, v: f64) -> Res<u64> {
    if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= MAX_SAFE as f64 {
        Ok(v as u64)
    } else {
        Err(QcowError::arg(format!(
            "{name} must be a whole number from 0 to Number.MAX_SAFE_INTEGER (2^53 - 1), not {v}"
        )))
    }
}

/// A 64-bit value returned as a number: refused above
/// `Number.MAX_SAFE_INTEGER`, never rounded.
pub(crate) fn safe_number(what: &str, v: u64) -> Res<f64> {
    if v <= MAX_SAFE {
        Ok(v as f64)
    } else {
        Err(too_large(what, v))
    }
}

fn too_large(what: &str, v: u64) -> QcowError {
    QcowError::new(
        Code::Unsupported,
        format!("{what} is {v}, beyond Number.MAX_SAFE_INTEGER (2^53 - 1): it cannot be returned exactly as a JavaScript number"),
    )
}

/// A report as a plain JavaScript object, with the content of qemu-img's
/// JSON: every integer exact (one above `Number.MAX_SAFE_INTEGER` is
/// refused, naming the field).
pub(crate) fn to_js<T: serde::Serialize>(v: &T) -> Res<JsValue> {
    let value =
        serde_json::to_value(v).map_err(|e| QcowError::new(Code::Internal, e.to_string()))?;
    let mut path = String::from("value");
    js_value(&value, &mut path)
}

fn js_value(v: &serde_json::Value, path: &mut String) -> Res<JsValue> {
    use serde_json::Value;
    Ok(match v {
        Value::Null => JsValue::NULL,
        Value::Bool(b) => JsValue::from_bool(*b),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                safe_number(path, u)?.into()
            } else if let Some(i) = n.as_i64() {
                if i.unsigned_abs() > MAX_SAFE {
                    return Err(too_large(path, i.unsigned_abs()));
                }
                (i as f64).into()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into()
            }
        }
        Value::String(s) => JsValue::from_str(s),
        Value::Array(items) => {
            let out = js_sys::Array::new_with_length(items.len() as u32);
            for (i, item) in items.iter().enumerate() {
                let at = path.len();
                path.push_str(&format!("[{i}]"));
                out.set(i as u32, js_value(item, path)?);
                path.truncate(at);
            }
            out.into()
        }
        Value::Object(map) => {
            let out = js_sys::Object::new();
            for (k, item) in map {
                let at = path.len();
                path.push('.');
                path.push_str(k);
                let value = js_value(item, path)?;
                path.truncate(at);
                Reflect::set(&out, &JsValue::from_str(k), &value)?;
            }
            out.into()
        }
    })
}

/// `qemu-img info` of `storage` named `name`, without opening any file it
/// names: `format` is `raw` when the storage is not a qcow2 image. For
/// telling which of several files is the top of a chain.
#[wasm_bindgen(unchecked_return_type = "ImageInfo")]
pub fn inspect(
    name: &str,
    #[wasm_bindgen(unchecked_param_type = "Storage")] storage: JsValue,
) -> Res<JsValue> {
    use qcowkit_core::BlockRead;
    let mut io = Storage::from_js(storage)?;
    let mut magic = [0u8; 4];
    io.read_at(0, &mut magic)?;
    let actual = io.len()?;
    if !qcowkit_core::header::Header::has_magic(&magic) {
        return to_js(&Info::raw(name, actual, actual));
    }
    let opts = OpenOptions {
        no_backing: true,
        no_data_file: true,
        ..OpenOptions::default()
    };
    let mut img = Image::open(io, &opts)?;
    to_js(&info_of(&mut img, name))
}

#[wasm_bindgen(typescript_custom_section)]
const REPORT_TYPES: &'static str = r#"
/** `qemu-img info --output=json` of one image. */
export interface ImageInfo {
  "backing-filename-format"?: string;
  snapshots?: SnapshotInfo[];
  "virtual-size": number;
  filename: string;
  "cluster-size"?: number;
  format: "qcow2" | "raw";
  "actual-size": number;
  "format-specific"?: { type: "qcow2"; data: Qcow2Info };
  "full-backing-filename"?: string;
  "backing-filename"?: string;
  "dirty-flag": boolean;
  /**
   * The image is encrypted (LUKS or the legacy AES method; the facts are in
   * `format-specific.data.encrypt`): its guest data needs the passphrase (`OpenOptions`).
   */
  encrypted?: true;
  /** The files this image names that opening it would open (not a qemu-img key). */
  "files-to-open"?: { role: "backing" | "data-file"; name: string; path: string }[];
}
/** One internal snapshot of an image. */
export interface SnapshotInfo {
  icount?: number;
  "vm-clock-nsec": number;
  name: string;
  "date-sec": number;
  "date-nsec": number;
  "vm-clock-sec": number;
  id: string;
  "vm-state-size": number;
}
/** The qcow2 facts of `qemu-img info` (absent fields: version 2 images). */
export interface Qcow2Info {
  compat: "0.10" | "1.1";
  "compression-type": "zlib" | "zstd";
  "lazy-refcounts"?: boolean;
  bitmaps?: { flags: string[]; name: string; granularity: number }[];
  "refcount-bits": number;
  "data-file"?: string;
  "data-file-raw"?: boolean;
  corrupt?: boolean;
  "extended-l2"?: boolean;
  /** The encryption, as `qemu-img info` shows it (readable without the passphrase). */
  encrypt?: EncryptInfo;
}
/**
 * The encryption facts of `qemu-img info` (`format-specific.data.encrypt`), readable without the
 * passphrase: a LUKS header's algorithms, UUID and key slots, or only the format of the legacy
 * AES method.
 */
export type EncryptInfo = LuksEncryptInfo | AesEncryptInfo;
/** The legacy qcow2 AES method (`encryption=on`): nothing more is stored. */
export interface AesEncryptInfo {
  format: "aes";
}
/** A LUKS1 header, as `qemu-img info --output=json` shows it. */
export interface LuksEncryptInfo {
  /** IV generator: `"plain"`, `"plain64"` or `"essiv"` (as the header says). */
  "ivgen-alg": "plain" | "plain64" | "essiv" | (string & {});
  /** Whether the header is detached from the data (never inside qcow2). */
  "detached-header": false;
  /** PBKDF2 and anti-forensic split hash (`"sha256"`, ...). */
  "hash-alg": HashAlg | (string & {});
  /** The cipher and its key size: `"aes-128"`, `"aes-192"`, `"aes-256"` (other ciphers cannot be read). */
  "cipher-alg": "aes-128" | "aes-192" | "aes-256" | (string & {});
  /** The volume's UUID. */
  uuid: string;
  /** ESSIV's hash (only with `"ivgen-alg": "essiv"`). */
  "ivgen-hash-alg"?: HashAlg | (string & {});
  format: "luks";
  /** `"xts"`, `"cbc"`, `"ctr"` or `"ecb"`. */
  "cipher-mode": "xts" | "cbc" | "ctr" | "ecb" | (string & {});
  /** The eight key slots, in order. */
  slots: SlotInfo[];
  /** Where the encrypted payload would start, in bytes from the header (unused inside qcow2). */
  "payload-offset": number;
  /** PBKDF2 iterations of the master key digest. */
  "master-key-iters": number;
}
/** One LUKS key slot: an active one holds a copy of the master key, locked by a passphrase. */
export type SlotInfo =
  | {
      active: true;
      /** PBKDF2 iterations of the passphrase. */
      iters: number;
      /** Offset of its key material in bytes from the header. */
      "key-offset": number;
      /** Anti-forensic stripes (4000). */
      stripes: number;
    }
  | { active: false; "key-offset": number };
/** One entry of `qemu-img map --output=json`. */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  compressed: boolean;
  offset?: number;
}
/** One page of the map: `next` is where the next page starts, `null` after the last. */
export interface MapPage {
  entries: MapEntry[];
  next: number | null;
}
/** A run of the image file with one use (`hostLayout()`): `kind` is what its clusters hold. */
export interface HostRun {
  /** Offset in the file, in bytes. */
  start: number;
  /** Length in bytes. */
  len: number;
  kind: HostUse;
}
/**
 * What a cluster of the image file holds: the header, the active L1 and L2 tables, the refcount
 * table and blocks, the snapshot table and the tables only snapshots use, bitmap metadata, the
 * encryption header, guest data (plain or compressed), a leaked cluster (its refcount says in use
 * but nothing refers to it) or nothing.
 */
export type HostUse =
  | "header" | "l1" | "l2" | "refcount-table" | "refcount-block" | "snapshot-table"
  | "snapshot-l1" | "snapshot-l2" | "bitmap" | "crypto-header" | "data" | "compressed"
  | "leaked" | "free";
/** A guest range `[start, end)` of an operation (default: the whole disk). */
export interface RangeOptions {
  start?: number;
  end?: number;
}
/**
 * A storage: bytes in memory (a private copy), a read-only `Blob`/`File` (synchronous reads:
 * in a worker), an OPFS sync access handle (read-write, in a dedicated worker), or an object
 * with synchronous methods (e.g. over Node's `fs.readSync`/`fs.writeSync`).
 */
export type Storage = Uint8Array | Blob | FileSystemSyncAccessHandle | StorageObject;
/** A storage made of synchronous methods; offsets and lengths are exact numbers. */
export interface StorageObject {
  /** `length` bytes at `offset` (shorter at the end of the file: the rest reads as zeros). */
  read(offset: number, length: number): Uint8Array;
  /** The file's length in bytes. */
  size(): number;
  /** Writes `bytes` at `offset` (writable storages only). */
  write?(offset: number, bytes: Uint8Array): void;
  /** Sets the file's length. */
  truncate?(length: number): void;
  /** Makes what was written durable. */
  flush?(): void;
}
/** Backing and data files an image may name, by name (see `QcowImage.open`). */
export type NamedFiles = Record<string, Storage> | Map<string, Storage>;
/** Called with the bytes done so far and the total; throwing (e.g. `signal.throwIfAborted()`) stops the operation with that error. */
export type ProgressCallback = (done: number, total: number) => void;
/** A guest range and its allocation category. */
export interface AllocationRange {
  start: number;
  length: number;
  category: "data" | "compressed" | "zero" | "backing" | "unallocated";
}
/** Bytes of the guest disk in each allocation category. */
export interface Allocation {
  data: number;
  compressed: number;
  zero: number;
  backing: number;
  unallocated: number;
}
/** `qemu-img check --output=json`: counters that are 0 are left out, as qemu-img does. */
export interface CheckResult {
  "image-end-offset"?: number;
  "compressed-clusters"?: number;
  "total-clusters"?: number;
  corruptions?: number;
  "corruptions-fixed"?: number;
  "check-errors": number;
  leaks?: number;
  "leaks-fixed"?: number;
  "allocated-clusters"?: number;
  filename: string;
  format: "qcow2";
  "fragmented-clusters"?: number;
}
"#;

/// `info()` of an opened image named `name`.
pub(crate) fn info_of(img: &mut Image<Storage>, name: &str) -> Info {
    let actual = img.storage_len().unwrap_or(0);
    let full = img.backing().map(|b| b.name().to_string());
    let data = img
        .header()
        .data_file
        .as_deref()
        .map(|d| resolve_name(name, d));
    let p = InfoParams {
        filename: name,
        full_backing_filename: full.as_deref(),
        full_data_filename: data.as_deref(),
        actual_size: actual,
    };
    Info::of(img, &p)
}
