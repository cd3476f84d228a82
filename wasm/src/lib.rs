//! # qcowkit-wasm
//!
//! qcow2 disk images in JavaScript, over the same core as the `qcow2` CLI.
//! Built with `wasm-pack build --target web` (or `--target nodejs`).
//!
//! ```js
//! import init, { QcowImage } from "qcowkit";
//! await init();
//! const img = QcowImage.open("vm.qcow2", bytesOrFileOrHandle, { "base.qcow2": baseFile });
//! console.log(img.info());                 // an object like `qemu-img info --output=json`
//! const firstSector = img.read(0, 512);     // Uint8Array
//! ```
//!
//! Storages: `Uint8Array`, `Blob`/`File` (read-only; synchronous reads need a
//! worker), an OPFS `FileSystemSyncAccessHandle` (read-write, dedicated
//! worker), or any object with synchronous `read(offset, length)`,
//! `write(offset, bytes)`, `size()` and `flush()` methods. Errors are thrown
//! as JS `Error`s carrying the core's message.

mod storage;

use js_sys::{Function, Object, Reflect, Uint8Array};
use qcowkit_core::backing::resolve_name;
use qcowkit_core::compress::Decompressor;
use qcowkit_core::copy::{copy, CopyOptions, ImageSink, RawDisk, Sink};
use qcowkit_core::map::{merged_map, Allocation, Category};
use qcowkit_core::report::{CheckSummary, Info, InfoParams, MapEntry};
use qcowkit_core::{CreateOptions, FileRole, Image, OpenOptions, Opened, Opener, WritableImage};
use qcowkit_options::OptionError;
use wasm_bindgen::prelude::*;

pub use storage::{Storage, StorageError};

fn js_err(e: impl core::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// The files an image may name (backing files, data files), supplied by the
/// caller: a plain object or `Map` from file name to storage. A name is
/// found by its exact spelling, then by its last path component.
struct NamedFiles {
    files: JsValue,
}

impl NamedFiles {
    /// Finds the file `name` named by the image `parent`: by the name
    /// resolved against the parent's directory (the core's rule), then by
    /// the name as stored, then by its last path component.
    fn lookup(&self, parent: &str, name: &str) -> Option<(String, JsValue)> {
        if self.files.is_undefined() || self.files.is_null() {
            return None;
        }
        let get = |key: &str| -> Option<JsValue> {
            let v = if let Some(m) = self.files.dyn_ref::<js_sys::Map>() {
                m.get(&JsValue::from_str(key))
            } else {
                Reflect::get(&self.files, &JsValue::from_str(key)).ok()?
            };
            (!v.is_undefined() && !v.is_null()).then_some(v)
        };
        let resolved = resolve_name(parent, name);
        let base = name.rsplit('/').next().unwrap_or(name);
        let found = [resolved.as_str(), name, base]
            .into_iter()
            .find_map(|key| get(key).map(|v| (key.to_string(), v)));
        found
    }
}

impl Opener<Storage> for NamedFiles {
    fn open(
        &mut self,
        parent: &str,
        name: &str,
        role: FileRole,
    ) -> Result<Opened<Storage>, StorageError> {
        let (key, value) = self.lookup(parent, name).ok_or_else(|| {
            StorageError(format!(
                "the image needs its {} '{name}': supply it with the image",
                match role {
                    FileRole::Backing => "backing file",
                    FileRole::DataFile => "data file",
                }
            ))
        })?;
        Ok(Opened {
            io: Storage::from_js(value)?,
            resolved: key.clone(),
            identity: key,
        })
    }
}

/// An opened disk image (qcow2 with its backing chain).
#[wasm_bindgen]
pub struct QcowImage {
    img: Access,
    name: String,
}

/// An image opened for reading only, or for reading and writing.
enum Access {
    Read(Image<Storage>),
    Write(WritableImage<Storage>),
}

impl QcowImage {
    /// The image, for reading.
    fn reader(&mut self) -> &mut Image<Storage> {
        match &mut self.img {
            Access::Read(img) => img,
            Access::Write(img) => img,
        }
    }

    /// The image, for reading, shared.
    fn image(&self) -> &Image<Storage> {
        match &self.img {
            Access::Read(img) => img,
            Access::Write(img) => img,
        }
    }

    /// The image, for writing (an error when opened read-only).
    fn writer(&mut self) -> Result<&mut WritableImage<Storage>, JsError> {
        match &mut self.img {
            Access::Write(img) => Ok(img),
            Access::Read(_) => Err(js_err(qcowkit_core::Error::<StorageError>::ReadOnly(
                "opened read-only",
            ))),
        }
    }
}

#[wasm_bindgen]
impl QcowImage {
    /// Opens `storage` (see the crate docs for the kinds) named `name`;
    /// `files` supplies backing/data files by name (object or Map; optional).
    pub fn open(name: &str, storage: JsValue, files: JsValue) -> Result<QcowImage, JsError> {
        let io = Storage::from_js(storage).map_err(js_err)?;
        let mut opener = NamedFiles { files };
        let img = Image::open_with(io, name, name, &mut opener, &OpenOptions::default())
            .map_err(js_err)?;
        Ok(QcowImage {
            img: Access::Read(img),
            name: name.to_string(),
        })
    }

    /// Opens `storage` for reading and writing (OPFS handle, storage object
    /// with `write`, or bytes in memory).
    #[wasm_bindgen(js_name = openWritable)]
    pub fn open_writable(
        name: &str,
        storage: JsValue,
        files: JsValue,
    ) -> Result<QcowImage, JsError> {
        let io = Storage::from_js(storage).map_err(js_err)?;
        let mut opener = NamedFiles { files };
        let img = WritableImage::open_with(io, name, name, &mut opener, &OpenOptions::default())
            .map_err(js_err)?;
        Ok(QcowImage {
            img: Access::Write(img),
            name: name.to_string(),
        })
    }

    /// Virtual size in bytes.
    #[wasm_bindgen(js_name = virtualSize)]
    pub fn virtual_size(&self) -> f64 {
        self.image().size() as f64
    }

    /// `qemu-img info --output=json` for this image, as an object.
    #[wasm_bindgen(unchecked_return_type = "ImageInfo")]
    pub fn info(&mut self) -> Result<JsValue, JsError> {
        let actual = self.reader().storage_len().unwrap_or(0);
        let full = self.reader().backing().map(|b| b.name().to_string());
        let p = InfoParams {
            filename: &self.name,
            full_backing_filename: full.as_deref(),
            actual_size: actual,
        };
        to_js(&Info::of(self.image(), &p))
    }

    /// `qemu-img map --output=json` for this image, as an array of objects.
    #[wasm_bindgen(unchecked_return_type = "MapEntry[]")]
    pub fn map(&mut self) -> Result<JsValue, JsError> {
        let img = self.reader();
        let entries =
            merged_map(0, img.size(), |pos, len| img.block_status(pos, len)).map_err(js_err)?;
        let entries: Vec<MapEntry> = entries
            .iter()
            .map(|(start, len, st)| MapEntry::new(*start, *len, st))
            .collect();
        to_js(&entries)
    }

    /// The guest space by allocation category (the core's one definition),
    /// as `{ start, length, category }` ranges.
    #[wasm_bindgen(js_name = allocationMap, unchecked_return_type = "AllocationRange[]")]
    pub fn allocation_map(&mut self) -> Result<JsValue, JsError> {
        let img = self.reader();
        let entries =
            merged_map(0, img.size(), |pos, len| img.block_status(pos, len)).map_err(js_err)?;
        let mut ranges: Vec<AllocationRange> = Vec::new();
        for (start, length, st) in &entries {
            let category = Category::of(st);
            match ranges.last_mut() {
                Some(r) if r.category == category && r.start + r.length == *start => {
                    r.length += length
                }
                _ => ranges.push(AllocationRange {
                    start: *start,
                    length: *length,
                    category,
                }),
            }
        }
        to_js(&ranges)
    }

    /// Bytes of the guest disk in each allocation category.
    #[wasm_bindgen(unchecked_return_type = "Allocation")]
    pub fn allocation(&mut self) -> Result<JsValue, JsError> {
        let img = self.reader();
        let a =
            Allocation::of(0, img.size(), |pos, len| img.block_status(pos, len)).map_err(js_err)?;
        to_js(&a)
    }

    /// `qemu-img check --output=json` as an object (a read-only check).
    #[wasm_bindgen(unchecked_return_type = "CheckResult")]
    pub fn check(&mut self) -> Result<JsValue, JsError> {
        let r = self.reader().check().map_err(js_err)?;
        to_js(&CheckSummary::of(&r, &self.name))
    }

    /// Reads `length` guest bytes at `offset`.
    pub fn read(&mut self, offset: f64, length: u32) -> Result<Uint8Array, JsError> {
        let mut buf = vec![0u8; length as usize];
        self.reader()
            .read_at(offset as u64, &mut buf)
            .map_err(js_err)?;
        Ok(Uint8Array::from(&buf[..]))
    }

    /// Writes `bytes` at guest `offset` (image opened writable).
    pub fn write(&mut self, offset: f64, bytes: &[u8]) -> Result<(), JsError> {
        self.writer()?
            .write_at(offset as u64, bytes)
            .map_err(js_err)
    }

    /// Makes written data durable.
    pub fn flush(&mut self) -> Result<(), JsError> {
        match &mut self.img {
            Access::Write(img) => img.flush().map_err(js_err),
            Access::Read(_) => Ok(()),
        }
    }

    /// Streams the guest contents as raw bytes: calls `sink(offset, bytes)`
    /// for consecutive chunks of at most `chunk_size` bytes; chunks that
    /// read as zeros are passed as `null` with their length as the third
    /// argument (so a file sink can leave holes and a stream can write
    /// zeros). Never holds more than one chunk in memory.
    #[wasm_bindgen(js_name = convertToRaw)]
    pub fn convert_to_raw(&mut self, sink: &Function, chunk_size: u32) -> Result<(), JsError> {
        let chunk = chunk_size.max(4096) as usize;
        let size = self.image().size();
        let opts = CopyOptions { chunk, align: 1 };
        let mut target = FnSink { sink, chunk };
        copy(
            self.reader(),
            0,
            size,
            opts,
            &mut Decompressor::default(),
            &mut target,
        )
        .map_err(js_err)
    }

    /// Copies the guest contents into `target` (an OPFS handle or storage
    /// object) as a raw image, leaving zero ranges unwritten.
    #[wasm_bindgen(js_name = convertToRawStorage)]
    pub fn convert_to_raw_storage(&mut self, target: JsValue) -> Result<(), JsError> {
        use qcowkit_core::BlockWrite;
        let mut out = Storage::from_js(target).map_err(js_err)?;
        let size = self.image().size();
        out.set_len(0).map_err(js_err)?;
        out.set_len(size).map_err(js_err)?;
        let opts = CopyOptions {
            chunk: 1 << 20,
            align: 1,
        };
        copy(
            self.reader(),
            0,
            size,
            opts,
            &mut Decompressor::default(),
            &mut StorageSink(&mut out),
        )
        .map_err(js_err)?;
        out.flush().map_err(js_err)
    }
}

/// A guest range and its allocation category ([`QcowImage::allocation_map`]).
#[derive(serde::Serialize)]
struct AllocationRange {
    start: u64,
    length: u64,
    category: Category,
}

/// A report as a plain JavaScript object: the same content `JSON.parse`
/// gives for qemu-img's JSON (numbers beyond 2^53 lose precision there
/// too).
fn to_js<T: serde::Serialize>(v: &T) -> Result<JsValue, JsError> {
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
    let img = Image::open(io, &opts).map_err(js_err)?;
    let full = img
        .header()
        .backing_file
        .as_deref()
        .map(|b| resolve_name(name, b));
    let p = InfoParams {
        filename: name,
        full_backing_filename: full.as_deref(),
        actual_size: actual,
    };
    to_js(&Info::of(&img, &p))
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
/** `qemu-img check --output=json`. */
export interface CheckResult {
  "image-end-offset": number;
  "compressed-clusters": number;
  "total-clusters": number;
  "check-errors": number;
  leaks?: number;
  corruptions?: number;
  "allocated-clusters": number;
  filename: string;
  format: "qcow2";
  "fragmented-clusters": number;
}
"#;

/// Errors of the converters: the core's, with the storages' error type.
type CoreError = qcowkit_core::Error<StorageError>;

/// A JS function `sink(offset, bytes | null, length)` as a copy's sink;
/// zero runs are passed in pieces of at most `chunk` bytes.
struct FnSink<'a> {
    sink: &'a Function,
    chunk: usize,
}

impl Sink for FnSink<'_> {
    type Error = CoreError;

    fn data(&mut self, offset: u64, buf: &mut Vec<u8>, len: usize) -> Result<(), CoreError> {
        self.sink
            .call3(
                &JsValue::NULL,
                &(offset as f64).into(),
                &Uint8Array::from(&buf[..len]),
                &(len as f64).into(),
            )
            .map(|_| ())
            .map_err(|e| CoreError::Io(StorageError::from(e)))
    }

    fn zeroes(&mut self, offset: u64, len: u64) -> Result<(), CoreError> {
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(self.chunk as u64);
            self.sink
                .call3(
                    &JsValue::NULL,
                    &(pos as f64).into(),
                    &JsValue::NULL,
                    &(n as f64).into(),
                )
                .map_err(|e| CoreError::Io(StorageError::from(e)))?;
            pos += n;
        }
        Ok(())
    }
}

/// A storage written as a raw image: data at its guest offset, buffers of
/// zeros not written.
struct StorageSink<'a>(&'a mut Storage);

impl Sink for StorageSink<'_> {
    type Error = CoreError;

    fn data(&mut self, offset: u64, buf: &mut Vec<u8>, len: usize) -> Result<(), CoreError> {
        use qcowkit_core::BlockWrite;
        let b = &buf[..len];
        if b.iter().any(|x| *x != 0) {
            self.0.write_at(offset, b).map_err(CoreError::Io)?;
        }
        Ok(())
    }

    fn zeroes(&mut self, _offset: u64, _len: u64) -> Result<(), CoreError> {
        Ok(())
    }
}

fn create_options(options: &JsValue) -> Result<CreateOptions, JsError> {
    let mut c = CreateOptions::default();
    if options.is_undefined() || options.is_null() {
        return Ok(c);
    }
    let obj: &Object = options.dyn_ref().ok_or_else(|| {
        JsError::new("options must be an object like { size: '1G', cluster_size: 65536 }")
    })?;
    for entry in Object::entries(obj).iter() {
        let pair: js_sys::Array = entry.unchecked_into();
        let key = pair.get(0).as_string().unwrap_or_default();
        if key == "compress" {
            continue; // a conversion flag, not a creation option
        }
        let v = pair.get(1);
        let value = if let Some(b) = v.as_bool() {
            if b {
                "on".to_string()
            } else {
                "off".to_string()
            }
        } else if let Some(n) = v.as_f64() {
            format!("{n}")
        } else {
            v.as_string().unwrap_or_default()
        };
        qcowkit_options::set(&mut c, &key, &value).map_err(|e| {
            let why = match e {
                OptionError::InvalidValue { reason, .. } => reason,
                _ => "unknown option",
            };
            JsError::new(&format!("invalid option {key}={value}: {why}"))
        })?;
    }
    Ok(c)
}

/// Creates a new qcow2 image in `target` (an OPFS handle or storage object)
/// with qemu-img's option names (`size`, `cluster_size`, `extended_l2`,
/// `compression_type`, ...).
#[wasm_bindgen(js_name = createImage)]
pub fn create_image(target: JsValue, options: JsValue) -> Result<(), JsError> {
    let c = create_options(&options)?;
    let mut io = Storage::from_js(target).map_err(js_err)?;
    qcowkit_core::BlockWrite::set_len(&mut io, 0).map_err(js_err)?;
    qcowkit_core::create::format(&mut io, &c).map_err(js_err)?;
    let mut img = WritableImage::open(io, &creating()).map_err(js_err)?;
    img.preallocate(c.preallocation).map_err(js_err)?;
    img.flush().map_err(js_err)
}

/// Open options while creating: the backing file is recorded, not opened.
fn creating() -> OpenOptions {
    OpenOptions {
        no_backing: true,
        ..OpenOptions::default()
    }
}

/// Creates a new qcow2 image in memory and returns its bytes.
#[wasm_bindgen(js_name = createImageBytes)]
pub fn create_image_bytes(options: JsValue) -> Result<Uint8Array, JsError> {
    let c = create_options(&options)?;
    let mut bytes: Vec<u8> = Vec::new();
    qcowkit_core::create::format(&mut bytes, &c).map_err(js_err)?;
    let mut img = WritableImage::open(Storage::Memory(bytes), &creating()).map_err(js_err)?;
    img.preallocate(c.preallocation).map_err(js_err)?;
    img.flush().map_err(js_err)?;
    let out = img.into_inner().into_bytes().unwrap_or_default();
    Ok(Uint8Array::from(&out[..]))
}

/// Converts a raw disk image (`source`: any storage) into a new qcow2 image
/// in `target` (OPFS handle or storage object), with qemu-img's creation
/// options plus `compress: true` for compressed clusters.
#[wasm_bindgen(js_name = convertRawToQcow2)]
pub fn convert_raw_to_qcow2(
    source: JsValue,
    target: JsValue,
    options: JsValue,
) -> Result<(), JsError> {
    use qcowkit_core::BlockRead;
    let compress = !options.is_undefined()
        && !options.is_null()
        && Reflect::get(&options, &"compress".into())
            .ok()
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
    let mut src = Storage::from_js(source).map_err(js_err)?;
    let size = src.len().map_err(js_err)?;
    let mut c = create_options(&options)?;
    c.size = size;
    let mut io = Storage::from_js(target).map_err(js_err)?;
    qcowkit_core::BlockWrite::set_len(&mut io, 0).map_err(js_err)?;
    qcowkit_core::create::format(&mut io, &c).map_err(js_err)?;
    let mut img = WritableImage::open(io, &OpenOptions::default()).map_err(js_err)?;
    let opts = CopyOptions {
        chunk: 1 << 20,
        align: img.cluster_size(),
    };
    let mut sink = ImageSink::new(&mut img);
    sink.compress = compress;
    let mut raw = RawDisk { io: src, size };
    copy(
        &mut raw,
        0,
        size,
        opts,
        &mut Decompressor::default(),
        &mut sink,
    )
    .map_err(js_err)?;
    img.flush().map_err(js_err)
}
