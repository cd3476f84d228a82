//! Conversions into new qcow2 images: [`Qcow2Writer`] (a new image written
//! in steps, from guest data handed to it or copied from an image), and the
//! one-call converters built on it (`convertRawToQcow2`,
//! `QcowImage.convertToQcow2`).

use qcowkit_core::compress::Decompressor;
use qcowkit_core::copy::{copy, CopyOptions, ImageSink, RawDisk, Sink};
use qcowkit_core::{BlockRead, WritableImage};
use wasm_bindgen::prelude::*;

use crate::create::create_options;
use crate::error::{CoreError, QcowError, Res};
use crate::reports::{offset_arg, safe_number};
use crate::sinks::Progress;
use crate::{function_option, option, range_option, QcowImage, Storage};

/// Largest chunk a copy into a new image moves at once.
const CHUNK: usize = 4 << 20;

/// A new qcow2 image being written: formatted in its target storage when
/// made, then written with guest data (`write`, `copyFrom`, in any number
/// of steps), then finished (`finish`: everything flushed). Clusters that
/// read as zeros stay unallocated; with `compress`, clusters are stored
/// compressed (plainly when that is not smaller).
///
/// ```js
/// const w = new Qcow2Writer(opfsHandle, { size: file.size, compress: true, compression_type: "zstd" });
/// for (let at = 0; at < file.size; at += 16 << 20)
///   w.write(at, new Uint8Array(await file.slice(at, at + (16 << 20)).arrayBuffer()));
/// w.finish();
/// w.free();
/// ```
#[wasm_bindgen]
pub struct Qcow2Writer {
    img: Box<WritableImage<Storage>>,
    compress: bool,
}

/// Refuses creation options a conversion target cannot take: the data is
/// written whole into the image itself.
fn conversion_options(options: &JsValue) -> Res<(qcowkit_core::CreateOptions, bool)> {
    for key in ["backing_file", "backing_fmt", "data_file", "data_file_raw"] {
        if option(options, key)?.is_some() {
            return Err(QcowError::arg(format!(
                "option {key} is not supported for conversions (the image is written standalone)"
            )));
        }
    }
    let compress = match option(options, "compress")? {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| QcowError::arg("options.compress must be a boolean"))?,
    };
    let c = create_options(options)?;
    if compress && c.encrypt.is_some() {
        // As qemu-img refuses `convert -c` into an encrypted image.
        return Err(QcowError::arg(
            "Compression and encryption not supported at the same time",
        ));
    }
    Ok((c, compress))
}

impl Qcow2Writer {
    /// Formats `target` with `c` (its size set) and opens it for writing.
    fn create(target: JsValue, c: &qcowkit_core::CreateOptions, compress: bool) -> Res<Self> {
        let mut io = Storage::from_js(target)?;
        qcowkit_core::BlockWrite::set_len(&mut io, 0)?;
        crate::create::format(&mut io, c)?;
        let img = WritableImage::open(io, &crate::create::creating(c))?;
        Ok(Qcow2Writer {
            img: Box::new(img),
            compress,
        })
    }

    fn sink(&mut self) -> ImageSink<'_, Storage> {
        let mut sink = ImageSink::new(&mut self.img);
        sink.compress = self.compress;
        sink
    }

    fn copy_options(&self) -> CopyOptions {
        CopyOptions {
            chunk: CHUNK,
            align: self.img.cluster_size(),
        }
    }

    /// Checks that `[start, end)` may be written: within the disk, starting
    /// on a cluster.
    fn writable_range(&self, start: u64, end: u64) -> Res<()> {
        let size = self.img.size();
        if end > size {
            return Err(QcowError::new(
                crate::Code::OutOfBounds,
                format!("{start}..{end} is beyond the new image's virtual size {size}"),
            ));
        }
        let cs = self.img.cluster_size();
        if !start.is_multiple_of(cs) || (!end.is_multiple_of(cs) && end != size) {
            return Err(QcowError::arg(format!(
                "writes must start on a cluster ({cs} bytes) and end on one or at the end of the disk: {start}..{end}"
            )));
        }
        Ok(())
    }
}

#[wasm_bindgen]
impl Qcow2Writer {
    /// Formats `target` (an OPFS handle or storage object; emptied first)
    /// as a new qcow2 image with qemu-img's creation options (`size` is
    /// required) plus `compress: true` for compressed clusters.
    #[wasm_bindgen(constructor)]
    pub fn new(
        #[wasm_bindgen(unchecked_param_type = "Storage")] target: JsValue,
        #[wasm_bindgen(unchecked_param_type = "Qcow2WriterOptions")] options: JsValue,
    ) -> Res<Qcow2Writer> {
        if option(&options, "size")?.is_none() {
            return Err(QcowError::arg(
                "options.size (the virtual size) is required",
            ));
        }
        let (c, compress) = conversion_options(&options)?;
        Qcow2Writer::create(target, &c, compress)
    }

    /// The new image's virtual size in bytes.
    #[wasm_bindgen(getter, js_name = virtualSize)]
    pub fn virtual_size(&self) -> Res<f64> {
        safe_number("the virtual size", self.img.size())
    }

    /// The new image's cluster size in bytes.
    #[wasm_bindgen(getter, js_name = clusterSize)]
    pub fn cluster_size(&self) -> f64 {
        self.img.cluster_size() as f64
    }

    /// Writes guest data at `offset`: a multiple of the cluster size, and
    /// `bytes` a whole number of clusters unless they reach the end of the
    /// disk. Clusters of zeros are not written (they read as zeros).
    pub fn write(&mut self, offset: f64, bytes: Vec<u8>) -> Res<()> {
        let offset = offset_arg("offset", offset)?;
        let mut bytes = bytes;
        let len = bytes.len();
        self.writable_range(offset, offset + len as u64)?;
        self.sink().data(offset, &mut bytes, len)?;
        Ok(())
    }

    /// Copies the guest contents of `source` (all of it, or
    /// `options.start`..`end`) to the same offsets of the new image;
    /// `options.onProgress(done, total)` reports the bytes of the range.
    #[wasm_bindgen(js_name = copyFrom)]
    pub fn copy_from(
        &mut self,
        source: &mut QcowImage,
        #[wasm_bindgen(unchecked_optional_param_type = "CopyFromOptions")] options: JsValue,
    ) -> Res<()> {
        let (start, end) = range_option(&options, source.image().size())?;
        self.writable_range(start, end)?;
        let on_progress = function_option(&options, "onProgress")?;
        let opts = self.copy_options();
        let mut sink = Progress::new(self.sink(), on_progress.as_ref(), start, end);
        sink.report(start)?;
        copy(
            source.reader(),
            start,
            end,
            opts,
            &mut Decompressor::default(),
            &mut sink,
        )?;
        Ok(())
    }

    /// Makes the new image complete and durable (flushes everything).
    pub fn finish(&mut self) -> Res<()> {
        Ok(self.img.flush()?)
    }
}

/// Copies a whole disk into `writer` with progress, then finishes it.
fn copy_all<D>(writer: &mut Qcow2Writer, src: &mut D, options: &JsValue) -> Res<()>
where
    D: qcowkit_core::copy::ChunkRead<Error = CoreError>,
{
    let size = src.disk_size();
    let on_progress = function_option(options, "onProgress")?;
    let opts = writer.copy_options();
    let mut sink = Progress::new(writer.sink(), on_progress.as_ref(), 0, size);
    sink.report(0)?;
    copy(src, 0, size, opts, &mut Decompressor::default(), &mut sink)?;
    writer.finish()
}

/// Converts a raw disk image (`source`: any storage) into a new qcow2 image
/// in `target` (OPFS handle or storage object), with qemu-img's creation
/// options (the size is the source's) plus `compress: true` for compressed
/// clusters; `onProgress(done, total)` reports the bytes read.
#[wasm_bindgen(js_name = convertRawToQcow2)]
pub fn convert_raw_to_qcow2(
    #[wasm_bindgen(unchecked_param_type = "Storage")] source: JsValue,
    #[wasm_bindgen(unchecked_param_type = "Storage")] target: JsValue,
    #[wasm_bindgen(unchecked_optional_param_type = "ConvertOptions")] options: JsValue,
) -> Res<()> {
    if option(&options, "size")?.is_some() {
        return Err(QcowError::arg("options.size: the size is the source's"));
    }
    let mut src = Storage::from_js(source)?;
    let size = src.len()?;
    let (mut c, compress) = conversion_options(&options)?;
    c.size = size;
    let mut writer = Qcow2Writer::create(target, &c, compress)?;
    let mut raw = RawDisk { io: src, size };
    copy_all(&mut writer, &mut raw, &options)
}

#[wasm_bindgen]
impl QcowImage {
    /// Converts the guest contents (through the whole backing chain) into
    /// a new standalone qcow2 image in `target` (OPFS handle or storage
    /// object), as `qemu-img convert -O qcow2` does, with qemu-img's
    /// creation options (the size is this image's) plus `compress: true`;
    /// `onProgress(done, total)` reports the guest bytes done.
    #[wasm_bindgen(js_name = convertToQcow2)]
    pub fn convert_to_qcow2(
        &mut self,
        #[wasm_bindgen(unchecked_param_type = "Storage")] target: JsValue,
        #[wasm_bindgen(unchecked_optional_param_type = "ConvertOptions")] options: JsValue,
    ) -> Res<()> {
        if option(&options, "size")?.is_some() {
            return Err(QcowError::arg("options.size: the size is the source's"));
        }
        let (mut c, compress) = conversion_options(&options)?;
        c.size = self.image().size();
        let mut writer = Qcow2Writer::create(target, &c, compress)?;
        copy_all(&mut writer, self.reader(), &options)
    }
}

#[wasm_bindgen(typescript_custom_section)]
const CONVERT_TYPES: &'static str = r#"
/** Options of the conversions into qcow2: qemu-img's creation options (the size is the source's). */
export interface ConvertOptions extends Omit<CreateOptions, "size" | "backing_file" | "backing_fmt" | "data_file" | "data_file_raw"> {
  /** Store clusters compressed with `compression_type` (as `qemu-img convert -c`). */
  compress?: boolean;
  /** Bytes done so far and the total; throwing stops the conversion with that error. */
  onProgress?: ProgressCallback;
}
/** Options of `new Qcow2Writer(target, options)`: the conversion options plus the virtual size. */
export interface Qcow2WriterOptions extends Omit<ConvertOptions, "onProgress"> {
  size: number | string;
}
/** Options of `Qcow2Writer.copyFrom`. */
export interface CopyFromOptions extends RangeOptions {
  onProgress?: ProgressCallback;
}
/** Options of `convertToRaw` and `convertToRawStorage`. */
export interface ConvertToRawOptions extends RangeOptions {
  /** Largest chunk handed to the sink (`convertToRaw`), 4 KiB to 64 MiB (1 MiB by default). */
  chunkSize?: number;
  /** Bytes of the range done so far and its total (`convertToRawStorage`). */
  onProgress?: ProgressCallback;
}
"#;
