//! Creating images, with qemu-img's option names (parsed by
//! `qcowkit-options`).

use js_sys::{Object, Uint8Array};
use qcowkit_core::{CreateOptions, OpenOptions, WritableImage};
use qcowkit_options::OptionError;
use wasm_bindgen::prelude::*;

use crate::error::{QcowError, Res};
use crate::Storage;

/// Keys of option objects that are not creation options (conversion
/// flags and callbacks), skipped by [`create_options`].
const NOT_CREATION: [&str; 5] = ["compress", "onProgress", "chunkSize", "start", "end"];

/// qemu-img's creation options from an options object (`{ size: "1G",
/// cluster_size: 65536, extended_l2: true, ... }`); booleans are `on`/`off`.
pub(crate) fn create_options(options: &JsValue) -> Res<CreateOptions> {
    let mut c = CreateOptions::default();
    if options.is_undefined() || options.is_null() {
        return Ok(c);
    }
    let obj: &Object = options.dyn_ref().ok_or_else(|| {
        QcowError::arg("options must be an object like { size: '1G', cluster_size: 65536 }")
    })?;
    for entry in Object::entries(obj).iter() {
        let pair: js_sys::Array = entry.unchecked_into();
        let key = pair.get(0).as_string().unwrap_or_default();
        let v = pair.get(1);
        if NOT_CREATION.contains(&key.as_str()) || v.is_undefined() {
            continue;
        }
        let value = if let Some(b) = v.as_bool() {
            if b { "on" } else { "off" }.to_string()
        } else if let Some(n) = v.as_f64() {
            format!("{n}")
        } else if let Some(s) = v.as_string() {
            s
        } else {
            return Err(QcowError::arg(format!(
                "option {key} must be a string, number or boolean"
            )));
        };
        qcowkit_options::set(&mut c, &key, &value).map_err(|e| {
            let why = match e {
                OptionError::InvalidValue { reason, .. } => reason,
                _ => "unknown option",
            };
            QcowError::arg(format!("invalid option {key}={value}: {why}"))
        })?;
    }
    Ok(c)
}

/// Open options while creating: the backing file is recorded, not opened.
pub(crate) fn creating() -> OpenOptions {
    OpenOptions {
        no_backing: true,
        ..OpenOptions::default()
    }
}

/// Creates a new qcow2 image in `target` (an OPFS handle or storage object)
/// with qemu-img's option names (`size`, `cluster_size`, `extended_l2`,
/// `compression_type`, ...).
#[wasm_bindgen(js_name = createImage)]
pub fn create_image(
    #[wasm_bindgen(unchecked_param_type = "Storage")] target: JsValue,
    #[wasm_bindgen(unchecked_param_type = "CreateOptions")] options: JsValue,
) -> Res<()> {
    let c = create_options(&options)?;
    let mut io = Storage::from_js(target)?;
    qcowkit_core::BlockWrite::set_len(&mut io, 0)?;
    qcowkit_core::create::format(&mut io, &c)?;
    let mut img = WritableImage::open(io, &creating())?;
    img.preallocate(c.preallocation)?;
    Ok(img.flush()?)
}

/// Creates a new qcow2 image in memory and returns its bytes.
#[wasm_bindgen(js_name = createImageBytes)]
pub fn create_image_bytes(
    #[wasm_bindgen(unchecked_param_type = "CreateOptions")] options: JsValue,
) -> Res<Uint8Array> {
    let c = create_options(&options)?;
    let mut bytes: Vec<u8> = Vec::new();
    qcowkit_core::create::format(&mut bytes, &c).map_err(|e| QcowError::arg(e.to_string()))?;
    let mut img = WritableImage::open(Storage::Memory(bytes), &creating())?;
    img.preallocate(c.preallocation)?;
    img.flush()?;
    let out = img.into_inner().into_bytes().unwrap_or_default();
    Ok(Uint8Array::from(&out[..]))
}

#[wasm_bindgen(typescript_custom_section)]
const CREATE_TYPES: &'static str = r#"
/** qemu-img's creation options (`qemu-img create -o`), by qemu-img's names. */
export interface CreateOptions {
  /** Virtual size: bytes, or a string with a suffix (`"10G"`). */
  size?: number | string;
  /** Cluster size: 512 bytes to 2 MiB, a power of two (64 KiB by default). */
  cluster_size?: number | string;
  compat?: "0.10" | "1.1" | "v2" | "v3";
  refcount_bits?: 1 | 2 | 4 | 8 | 16 | 32 | 64;
  /** Extended L2 entries (subclusters). */
  extended_l2?: boolean;
  compression_type?: "zlib" | "zstd";
  preallocation?: "off" | "metadata" | "falloc" | "full";
  lazy_refcounts?: boolean;
  backing_file?: string;
  backing_fmt?: string;
  data_file?: string;
  data_file_raw?: boolean;
}
"#;
