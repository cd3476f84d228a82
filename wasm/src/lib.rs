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
//! `applySnapshot(idOrName)` (see `README.md`). What the guest disk holds:
//! `contents()` (partition table and file systems).
//!
//! Encrypted images (LUKS, the legacy AES method): `options.passphrase`
//! (and `backingPassphrases`) of `open`/`openWritable`, or a `Passphrases`
//! object that keeps them in the wasm memory for several opens; without
//! one an encrypted image opens for its metadata. `createImage` and the
//! conversions make LUKS images with `encrypt: { passphrase, ... }`.
//!
//! Storages: `Uint8Array`, `Blob`/`File` (read-only; synchronous reads need a
//! worker), an OPFS `FileSystemSyncAccessHandle` (read-write, dedicated
//! worker), or any object with synchronous `read(offset, length)`,
//! `write(offset, bytes)`, `size()` and `flush()` methods. Errors are thrown
//! as JS `Error`s carrying the core's message and a stable `code` (see
//! [`Code`]). Offsets and sizes are numbers, exact up to
//! `Number.MAX_SAFE_INTEGER`: larger ones are refused, never rounded.

mod contents;
mod convert;
mod create;
mod error;
mod maintain;
mod reports;
mod secrets;
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

pub use convert::{convert_raw_to_qcow2, Qcow2Writer};
pub use create::{create_image, create_image_bytes};
pub use error::{Code, QcowError};
pub use reports::inspect;
pub use secrets::Passphrases;
pub use storage::{Storage, StorageError};

use error::{CoreError, Res};
use reports::{info_of, offset_arg, safe_number, to_js, AllocationRange, HostRun, MapPage};
use secrets::Keys;
use sinks::{FnSink, Progress, StorageSink};

/// Runs `f` with a sink that hands each problem line to `on_problem` (when
/// given). The first exception `on_problem` throws stops the forwarding
/// and is returned, as an error (with its code), once `f` is done.
fn with_lines<T>(
    on_problem: Option<&Function>,
    f: impl FnOnce(&mut dyn FnMut(&str)) -> Res<T>,
) -> Res<T> {
    let mut thrown = None;
    let r = f(&mut |line| {
        if let (Some(cb), None) = (on_problem, &thrown) {
            if let Err(e) = cb.call1(&JsValue::NULL, &JsValue::from_str(line)) {
                thrown = Some(e);
            }
        }
    });
    if let Some(e) = thrown {
        let e = StorageError::from(e);
        return Err(QcowError::new(e.code, format!("onProblem threw: {e}")));
    }
    r
}

/// A property of an options object (absent, `undefined` or `null`: `None`).
pub(crate) fn option(options: &JsValue, key: &str) -> Res<Option<JsValue>> {
    if options.is_undefined() || options.is_null() {
        return Ok(None);
    }
    if !options.is_object() {
        return Err(QcowError::arg(format!(
            "options must be an object, not {}",
            options.js_typeof().as_string().unwrap_or_default()
        )));
    }
    let v = Reflect::get(options, &JsValue::from_str(key))?;
    Ok((!v.is_undefined() && !v.is_null()).then_some(v))
}

/// A numeric option (bytes, offsets): exact, at most `Number.MAX_SAFE_INTEGER`.
pub(crate) fn number_option(options: &JsValue, key: &str) -> Res<Option<u64>> {
    match option(options, key)? {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(n) => offset_arg(&format!("options.{key}"), n).map(Some),
            None => Err(QcowError::arg(format!("options.{key} must be a number"))),
        },
    }
}

/// A function option (callbacks).
pub(crate) fn function_option(options: &JsValue, key: &str) -> Res<Option<Function>> {
    match option(options, key)? {
        None => Ok(None),
        Some(v) => v
            .dyn_into::<Function>()
            .map(Some)
            .map_err(|_| QcowError::arg(format!("options.{key} must be a function"))),
    }
}

/// The guest range `[start, end)` of `options` (`start`, `end`), within a
/// disk of `size` bytes.
pub(crate) fn range_option(options: &JsValue, size: u64) -> Res<(u64, u64)> {
    let start = number_option(options, "start")?.unwrap_or(0);
    let end = number_option(options, "end")?.unwrap_or(size);
    if start > end || end > size {
        return Err(QcowError::new(
            Code::OutOfBounds,
            format!("range {start}..{end} is not within the disk of {size} bytes"),
        ));
    }
    Ok((start, end))
}

/// `path` without `.` components and with `dir/..` pairs removed
/// (`"vm/../base.qcow2"` is `"base.qcow2"`); a leading `/` is kept.
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." if parts.last().is_some_and(|p| *p != "..") => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    if path.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

/// The files an image may name (backing files, data files), supplied by the
/// caller: a plain object or `Map` from file name to storage. A name is
/// found as QEMU resolves it (relative to the naming image's directory,
/// also with `..` removed), then by its exact spelling, then by its last
/// path component.
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
        let normal = normalize(&resolved);
        let base = name.rsplit('/').next().unwrap_or(name);
        let found = [resolved.as_str(), normal.as_str(), name, base]
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
            let (code, what) = match role {
                FileRole::Backing => (Code::MissingBacking, "backing file"),
                FileRole::DataFile => (Code::MissingDataFile, "data file"),
            };
            StorageError::with(
                code,
                format!("the image needs its {what} '{name}': supply it with the image"),
            )
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
    fn writer(&mut self) -> Res<&mut WritableImage<Storage>> {
        match &mut self.img {
            Access::Write(img) => Ok(img),
            Access::Read(_) => Err(CoreError::ReadOnly("opened read-only").into()),
            Access::Repair(_) => Err(CoreError::ReadOnly(
                "opened for repair only (reopen it with openWritable to change the disk)",
            )
            .into()),
        }
    }

    /// The file as it is now, opened afresh over the same storage without
    /// its backing or data files, when the image is opened for writing
    /// (what was written is flushed first: the writer knows a longer file
    /// than the one it opened); `None` for a read-only image.
    fn current_file(&mut self) -> Res<Option<Image<Storage>>> {
        match &mut self.img {
            Access::Read(_) => Ok(None),
            Access::Write(img) | Access::Repair(img) => {
                img.flush()?;
                let opts = OpenOptions {
                    no_backing: true,
                    no_data_file: true,
                    check_mode: true,
                    ..OpenOptions::default()
                };
                Ok(Some(Image::open(img.storage().share(), &opts)?))
            }
        }
    }
}

/// Opens `storage` named `name` with its `files`, unlocked with `keys`
/// (read-only, or for reading and writing).
pub(crate) fn open_image(
    name: &str,
    storage: JsValue,
    files: JsValue,
    keys: &Keys,
    writable: bool,
) -> Res<QcowImage> {
    let io = Storage::from_js(storage)?;
    let mut opener = NamedFiles { files };
    let opts = keys.open_options();
    let img = if writable {
        Access::Write(Box::new(WritableImage::open_with(
            io,
            name,
            name,
            &mut opener,
            &opts,
        )?))
    } else {
        Access::Read(Box::new(Image::open_with(
            io,
            name,
            name,
            &mut opener,
            &opts,
        )?))
    };
    Ok(QcowImage {
        img,
        name: name.to_string(),
    })
}

#[wasm_bindgen]
impl QcowImage {
    /// Opens `storage` (see the crate docs for the kinds) named `name`;
    /// `files` supplies backing/data files by name (object or Map; optional):
    /// a name the image stores is looked up resolved as QEMU resolves it
    /// (relative to the directory of the image naming it), then as stored,
    /// then by its last path component. `options.passphrase` unlocks an
    /// encrypted image (without it, it opens for its metadata only),
    /// `options.backingPassphrases` its encrypted backing files.
    pub fn open(
        name: &str,
        #[wasm_bindgen(unchecked_param_type = "Storage")] storage: JsValue,
        #[wasm_bindgen(unchecked_optional_param_type = "NamedFiles")] files: JsValue,
        #[wasm_bindgen(unchecked_optional_param_type = "OpenOptions")] options: JsValue,
    ) -> Res<QcowImage> {
        open_image(name, storage, files, &Keys::from_options(&options)?, false)
    }

    /// Opens `storage` for reading and writing (OPFS handle, storage object
    /// with `write`, or bytes in memory); an encrypted image needs its
    /// passphrase (`options` as `open`'s).
    #[wasm_bindgen(js_name = openWritable)]
    pub fn open_writable(
        name: &str,
        #[wasm_bindgen(unchecked_param_type = "Storage")] storage: JsValue,
        #[wasm_bindgen(unchecked_optional_param_type = "NamedFiles")] files: JsValue,
        #[wasm_bindgen(unchecked_optional_param_type = "OpenOptions")] options: JsValue,
    ) -> Res<QcowImage> {
        open_image(name, storage, files, &Keys::from_options(&options)?, true)
    }

    /// Virtual size in bytes.
    #[wasm_bindgen(js_name = virtualSize)]
    pub fn virtual_size(&self) -> Res<f64> {
        safe_number("the virtual size", self.image().size())
    }

    /// `qemu-img info --output=json` for this image, as an object.
    #[wasm_bindgen(unchecked_return_type = "ImageInfo")]
    pub fn info(&mut self) -> Res<JsValue> {
        let name = self.name.clone();
        to_js(&info_of(self.reader(), &name))
    }

    /// `info()` of this image and of every backing file below it, top
    /// first (the chain opened with the image).
    #[wasm_bindgen(unchecked_return_type = "ImageInfo[]")]
    pub fn chain(&mut self) -> Res<JsValue> {
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
    pub fn map(&mut self) -> Res<JsValue> {
        let img = self.reader();
        let entries = merged_map(0, img.size(), |pos, len| img.block_status(pos, len))?;
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
    ) -> Res<JsValue> {
        let start = offset_arg("start", start)?;
        let img = self.reader();
        let start = start.min(img.size());
        let (entries, next) = merged_page(
            start,
            img.size(),
            max_entries.max(1) as usize,
            |pos, len| img.block_status(pos, len),
        )?;
        let entries = entries
            .iter()
            .map(|(start, len, st)| MapEntry::new(*start, *len, st))
            .collect();
        to_js(&MapPage { entries, next })
    }

    /// The guest space by allocation category (the core's one definition),
    /// as `{ start, length, category }` ranges; `options.start`/`end`
    /// limit it to a range (a long walk can go in steps).
    #[wasm_bindgen(js_name = allocationMap, unchecked_return_type = "AllocationRange[]")]
    pub fn allocation_map(
        &mut self,
        #[wasm_bindgen(unchecked_optional_param_type = "RangeOptions")] options: JsValue,
    ) -> Res<JsValue> {
        let img = self.reader();
        let (start, end) = range_option(&options, img.size())?;
        let entries = merged_map(start, end, |pos, len| img.block_status(pos, len))?;
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

    /// Bytes of the guest disk (or of `options.start`..`end`) in each
    /// allocation category.
    #[wasm_bindgen(unchecked_return_type = "Allocation")]
    pub fn allocation(
        &mut self,
        #[wasm_bindgen(unchecked_optional_param_type = "RangeOptions")] options: JsValue,
    ) -> Res<JsValue> {
        let img = self.reader();
        let (start, end) = range_option(&options, img.size())?;
        let a = Allocation::of(start, end, |pos, len| img.block_status(pos, len))?;
        to_js(&a)
    }

    /// What each cluster of the image file holds, as runs covering the
    /// file in order: `{ start, len, kind }` with `kind` one of `HostUse`
    /// (header, tables, refcount structure, snapshot and bitmap metadata,
    /// guest data, compressed data, leaked or free clusters). On an image
    /// opened for writing, what was written is flushed first and the file
    /// is described as it is now.
    #[wasm_bindgen(js_name = hostLayout, unchecked_return_type = "HostRun[]")]
    pub fn host_layout(&mut self) -> Res<JsValue> {
        let runs = match self.current_file()? {
            Some(mut now) => now.host_layout()?,
            None => self.reader().host_layout()?,
        };
        let runs: Vec<HostRun> = runs
            .iter()
            .map(|r| HostRun {
                start: r.start,
                len: r.len,
                kind: r.kind.name(),
            })
            .collect();
        to_js(&runs)
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
    ) -> Res<JsValue> {
        let r = match self.current_file()? {
            Some(mut now) => with_lines(on_problem.as_ref(), |sink| Ok(now.check_with(sink)?))?,
            None => {
                let img = self.reader();
                with_lines(on_problem.as_ref(), |sink| Ok(img.check_with(sink)?))?
            }
        };
        to_js(&CheckSummary::of(&r, &self.name))
    }

    /// Reads `length` guest bytes at `offset`.
    pub fn read(&mut self, offset: f64, length: u32) -> Res<Uint8Array> {
        let offset = offset_arg("offset", offset)?;
        let mut buf = Vec::new();
        buf.try_reserve_exact(length as usize).map_err(|_| {
            QcowError::new(
                Code::OutOfMemory,
                format!("cannot allocate {length} bytes for a read"),
            )
        })?;
        buf.resize(length as usize, 0);
        self.reader().read_at(offset, &mut buf)?;
        Ok(Uint8Array::from(&buf[..]))
    }

    /// Writes `bytes` at guest `offset` (image opened writable).
    pub fn write(&mut self, offset: f64, bytes: &[u8]) -> Res<()> {
        let offset = offset_arg("offset", offset)?;
        Ok(self.writer()?.write_at(offset, bytes)?)
    }

    /// Makes written data durable.
    pub fn flush(&mut self) -> Res<()> {
        match &mut self.img {
            Access::Write(img) | Access::Repair(img) => Ok(img.flush()?),
            Access::Read(_) => Ok(()),
        }
    }

    /// Streams the guest contents (or `options.start`..`end` of them) as
    /// raw bytes: calls `sink(offset, bytes, length)` for consecutive
    /// chunks of at most `options.chunkSize` bytes (1 MiB by default);
    /// chunks that read as zeros are passed as `null` with their length
    /// (so a file sink can leave holes and a stream can write zeros).
    /// Never holds more than one chunk in memory. A sink that throws stops
    /// the conversion with its error (an `AbortError`: code `"aborted"`).
    #[wasm_bindgen(js_name = convertToRaw)]
    pub fn convert_to_raw(
        &mut self,
        #[wasm_bindgen(
            unchecked_param_type = "(offset: number, bytes: Uint8Array | null, length: number) => void"
        )]
        sink: &Function,
        #[wasm_bindgen(unchecked_optional_param_type = "ConvertToRawOptions")] options: JsValue,
    ) -> Res<()> {
        let chunk = number_option(&options, "chunkSize")?
            .unwrap_or(1 << 20)
            .clamp(4096, 64 << 20) as usize;
        let (start, end) = range_option(&options, self.image().size())?;
        let opts = CopyOptions { chunk, align: 1 };
        let mut target = FnSink { sink, chunk };
        copy(
            self.reader(),
            start,
            end,
            opts,
            &mut Decompressor::default(),
            &mut target,
        )?;
        Ok(())
    }

    /// Copies the guest contents into `target` (an OPFS handle or storage
    /// object) as a raw image, leaving zero ranges unwritten (holes):
    /// the target is emptied and sized to the virtual size first. With
    /// `options.start`/`end`, only that range is copied and the target is
    /// left as it is otherwise (a long conversion can go in steps: size
    /// the empty target first). `options.onProgress(done, total)` is
    /// called as the copy goes (bytes of the range).
    #[wasm_bindgen(js_name = convertToRawStorage)]
    pub fn convert_to_raw_storage(
        &mut self,
        #[wasm_bindgen(unchecked_param_type = "Storage")] target: JsValue,
        #[wasm_bindgen(unchecked_optional_param_type = "ConvertToRawOptions")] options: JsValue,
    ) -> Res<()> {
        use qcowkit_core::BlockWrite;
        let mut out = Storage::from_js(target)?;
        let size = self.image().size();
        let ranged = option(&options, "start")?.is_some() || option(&options, "end")?.is_some();
        let (start, end) = range_option(&options, size)?;
        let on_progress = function_option(&options, "onProgress")?;
        if !ranged {
            out.set_len(0)?;
            out.set_len(size)?;
        }
        let opts = CopyOptions {
            chunk: 4 << 20,
            align: 1,
        };
        let mut sink = Progress::new(StorageSink(&mut out), on_progress.as_ref(), start, end);
        sink.report(start)?;
        copy(
            self.reader(),
            start,
            end,
            opts,
            &mut Decompressor::default(),
            &mut sink,
        )?;
        out.flush()?;
        Ok(())
    }
}
