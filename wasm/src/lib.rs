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
//! Maintenance, as qemu-img does it: `QcowImage.openForRepair` and
//! `repair("leaks" | "all")` (`check -r`), `resize(size, { shrink })`,
//! `snapshots()`, `createSnapshot(name)`, `deleteSnapshot(name)` and
//! `applySnapshot(idOrName)` (see `README.md`).
//!
//! Storages: `Uint8Array`, `Blob`/`File` (read-only; synchronous reads need a
//! worker), an OPFS `FileSystemSyncAccessHandle` (read-write, dedicated
//! worker), or any object with synchronous `read(offset, length)`,
//! `write(offset, bytes)`, `size()` and `flush()` methods. Errors are thrown
//! as JS `Error`s carrying the core's message.

mod create;
mod maintain;
mod reports;
mod sinks;
mod storage;

use js_sys::{Function, Reflect, Uint8Array};
use qcowkit_core::backing::resolve_name;
use qcowkit_core::compress::Decompressor;
use qcowkit_core::copy::{copy, CopyOptions};
use qcowkit_core::map::{merged_map, merged_page, Allocation, Category};
use qcowkit_core::report::{CheckSummary, Info, MapEntry};
use qcowkit_core::{Backing, FileRole, Image, OpenOptions, Opened, Opener, WritableImage};
use wasm_bindgen::prelude::*;

pub use create::{convert_raw_to_qcow2, create_image, create_image_bytes};
pub use reports::inspect;
pub use storage::{Storage, StorageError};

use reports::{info_of, offset_arg, to_js, AllocationRange, MapPage};
use sinks::{FnSink, StorageSink};

fn js_err(e: impl core::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// Runs `f` with a sink that hands each problem line to `on_problem` (when
/// given). The first exception `on_problem` throws stops the forwarding
/// and is returned, as an error, once `f` is done.
fn with_lines<T>(
    on_problem: Option<&Function>,
    f: impl FnOnce(&mut dyn FnMut(&str)) -> Result<T, JsError>,
) -> Result<T, JsError> {
    let mut thrown = None;
    let r = f(&mut |line| {
        if let (Some(cb), None) = (on_problem, &thrown) {
            if let Err(e) = cb.call1(&JsValue::NULL, &JsValue::from_str(line)) {
                thrown = Some(e);
            }
        }
    });
    if let Some(e) = thrown {
        return Err(JsError::new(&format!(
            "onProblem threw: {}",
            StorageError::from(e)
        )));
    }
    r
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

/// An image opened for reading only, for reading and writing, or for a
/// repair (no backing or data file opened: metadata only).
enum Access {
    Read(Box<Image<Storage>>),
    Write(Box<WritableImage<Storage>>),
    Repair(Box<WritableImage<Storage>>),
}

impl QcowImage {
    /// The image, for reading.
    fn reader(&mut self) -> &mut Image<Storage> {
        match &mut self.img {
            Access::Read(img) => img,
            Access::Write(img) | Access::Repair(img) => img,
        }
    }

    /// The image, for reading, shared.
    fn image(&self) -> &Image<Storage> {
        match &self.img {
            Access::Read(img) => img,
            Access::Write(img) | Access::Repair(img) => img,
        }
    }

    /// The image, for writing (an error when opened read-only or for a
    /// repair).
    fn writer(&mut self) -> Result<&mut WritableImage<Storage>, JsError> {
        match &mut self.img {
            Access::Write(img) => Ok(img),
            Access::Read(_) => Err(js_err(qcowkit_core::Error::<StorageError>::ReadOnly(
                "opened read-only",
            ))),
            Access::Repair(_) => Err(js_err(qcowkit_core::Error::<StorageError>::ReadOnly(
                "opened for repair only (reopen it with openWritable to change the disk)",
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
            img: Access::Read(Box::new(img)),
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
            img: Access::Write(Box::new(img)),
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
        let name = self.name.clone();
        to_js(&info_of(self.reader(), &name))
    }

    /// `info()` of this image and of every backing file below it, top
    /// first (the chain opened with the image).
    #[wasm_bindgen(unchecked_return_type = "ImageInfo[]")]
    pub fn chain(&mut self) -> Result<JsValue, JsError> {
        let name = self.name.clone();
        let top = self.reader();
        let mut out = vec![info_of(top, &name)];
        let mut below = top.backing_mut();
        while let Some(b) = below {
            match b {
                Backing::Qcow2(img) => {
                    let n = img.name().to_string();
                    out.push(info_of(img, &n));
                    below = img.backing_mut();
                }
                Backing::Raw { io, size, name } => {
                    let actual = qcowkit_core::BlockRead::len(io).unwrap_or(0);
                    out.push(Info::raw(name, *size, actual));
                    break;
                }
            }
        }
        to_js(&out)
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

    /// One page of [`QcowImage::map`]: at most `maxEntries` entries from
    /// guest offset `start`, and `next`, the offset of the next page (or
    /// `null` after the last). Memory stays bounded whatever the image.
    ///
    /// ```js
    /// for (let at = 0; at !== null; ) {
    ///   const page = img.mapPage(at, 1000);
    ///   page.entries.forEach(show);
    ///   at = page.next;
    /// }
    /// ```
    #[wasm_bindgen(js_name = mapPage, unchecked_return_type = "MapPage")]
    pub fn map_page(
        &mut self,
        start: f64,
        #[wasm_bindgen(js_name = maxEntries)] max_entries: u32,
    ) -> Result<JsValue, JsError> {
        let img = self.reader();
        let start = offset_arg("start", start)?.min(img.size());
        let (entries, next) = merged_page(start, img.size(), max_entries as usize, |pos, len| {
            img.block_status(pos, len)
        })
        .map_err(js_err)?;
        let entries = entries
            .iter()
            .map(|(start, len, st)| MapEntry::new(*start, *len, st))
            .collect();
        to_js(&MapPage { entries, next })
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
    /// `onProblem`, when given, is called with each problem line as it is
    /// found (`qemu-img check` prints them on stderr); the counts in the
    /// result are exact either way. On an image opened for writing, what
    /// was written is flushed first and the file is checked as it is now.
    #[wasm_bindgen(unchecked_return_type = "CheckResult")]
    pub fn check(
        &mut self,
        #[wasm_bindgen(js_name = onProblem, unchecked_optional_param_type = "(line: string) => void")]
        on_problem: Option<Function>,
    ) -> Result<JsValue, JsError> {
        let r = match &mut self.img {
            Access::Read(img) => with_lines(on_problem.as_ref(), |sink| {
                img.check_with(sink).map_err(js_err)
            })?,
            Access::Write(img) | Access::Repair(img) => {
                // The writer knows a longer file than the one it opened:
                // the file as it is now, opened afresh over the same storage.
                img.flush().map_err(js_err)?;
                let opts = OpenOptions {
                    no_backing: true,
                    no_data_file: true,
                    check_mode: true,
                    ..OpenOptions::default()
                };
                let mut now = Image::open(img.storage().share(), &opts).map_err(js_err)?;
                with_lines(on_problem.as_ref(), |sink| {
                    now.check_with(sink).map_err(js_err)
                })?
            }
        };
        to_js(&CheckSummary::of(&r, &self.name))
    }

    /// Reads `length` guest bytes at `offset`.
    pub fn read(&mut self, offset: f64, length: u32) -> Result<Uint8Array, JsError> {
        let mut buf = vec![0u8; length as usize];
        self.reader()
            .read_at(offset_arg("offset", offset)?, &mut buf)
            .map_err(js_err)?;
        Ok(Uint8Array::from(&buf[..]))
    }

    /// Writes `bytes` at guest `offset` (image opened writable).
    pub fn write(&mut self, offset: f64, bytes: &[u8]) -> Result<(), JsError> {
        self.writer()?
            .write_at(offset_arg("offset", offset)?, bytes)
            .map_err(js_err)
    }

    /// Makes written data durable.
    pub fn flush(&mut self) -> Result<(), JsError> {
        match &mut self.img {
            Access::Write(img) | Access::Repair(img) => img.flush().map_err(js_err),
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
