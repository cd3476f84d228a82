//! Creating images and converting raw disks to qcow2, with qemu-img's
//! option names (parsed by `qcowkit-options`).

use js_sys::{Object, Reflect, Uint8Array};
use qcowkit_core::compress::Decompressor;
use qcowkit_core::copy::{copy, CopyOptions, ImageSink, RawDisk};
use qcowkit_core::{CreateOptions, OpenOptions, WritableImage};
use qcowkit_options::OptionError;
use wasm_bindgen::prelude::*;

use crate::{js_err, Storage};

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
