//! Reports as plain JavaScript objects (with TypeScript types): what the
//! core computes, in qemu-img's JSON shapes.

use qcowkit_core::backing::resolve_name;
use qcowkit_core::map::Category;
use qcowkit_core::report::{Info, InfoParams, MapEntry};
use qcowkit_core::{Image, OpenOptions};
use wasm_bindgen::prelude::*;

use crate::{js_err, Storage, StorageError};

/// A guest range and its allocation category ([`QcowImage::allocation_map`]).
#[derive(serde::Serialize)]
pub(crate) struct AllocationRange {
    pub(crate) start: u64,
    pub(crate) length: u64,
    pub(crate) category: Category,
}

/// A report as a plain JavaScript object: the same content `JSON.parse`
/// gives for qemu-img's JSON (numbers beyond 2^53 lose precision there
/// too).
/// One page of a map (`QcowImage.mapPage`).
#[derive(serde::Serialize)]
pub(crate) struct MapPage {
    pub entries: Vec<MapEntry>,
    pub next: Option<u64>,
}

/// A guest offset or length given by JavaScript as a number: a finite,
/// whole, non-negative number no larger than 2^53 (beyond that numbers are
/// not exact).
pub(crate) fn offset_arg(name: &str, v: f64) -> Result<u64, JsError> {
    if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= 9_007_199_254_740_992.0 {
        Ok(v as u64)
    } else {
        Err(JsError::new(&format!(
            "{name} must be a whole number from 0 to 2^53, not {v}"
        )))
    }
}

pub(crate) fn to_js<T: serde::Serialize>(v: &T) -> Result<JsValue, JsError> {
    let text = serde_json::to_string(v).map_err(js_err)?;
    js_sys::JSON::parse(&text).map_err(|e| js_err(StorageError::from(e)))
}

/// `qemu-img info` of `storage` named `name`, without opening any file it
/// names: `format` is `raw` when the storage is not a qcow2 image. For
/// telling which of several files is the top of a chain.
#[wasm_bindgen(unchecked_return_type = "ImageInfo")]
pub fn inspect(name: &str, storage: JsValue) -> Result<JsValue, JsError> {
    use qcowkit_core::BlockRead;
    let mut io = Storage::from_js(storage).map_err(js_err)?;
    let mut magic = [0u8; 4];
    io.read_at(0, &mut magic).map_err(js_err)?;
    let actual = io.len().map_err(js_err)?;
    if !qcowkit_core::header::Header::has_magic(&magic) {
        return to_js(&Info::raw(name, actual, actual));
    }
    let opts = OpenOptions {
        no_backing: true,
        no_data_file: true,
        ..OpenOptions::default()
    };
    let mut img = Image::open(io, &opts).map_err(js_err)?;
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
}
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
