//! Storages the browser and Node offer, as one `BlockRead`/`BlockWrite` type:
//! bytes in memory (`Uint8Array`), a `File`/`Blob` (read-only, synchronous
//! reads with `FileReaderSync`, so in a worker), an OPFS
//! `FileSystemSyncAccessHandle` (read-write, dedicated worker), and a JS
//! object with synchronous `read(offset, length)`, `write(offset, bytes)`,
//! `size()` and `flush()` methods (e.g. over Node's `fs.readSync`).

use js_sys::{Function, Reflect, Uint8Array};
use qcowkit_core::{BlockRead, BlockWrite};
use wasm_bindgen::{JsCast, JsValue};

use crate::error::Code;

/// An error from a JS storage (or a JS callback), with its message and
/// the code it maps to.
#[derive(Debug, Clone)]
pub struct StorageError {
    /// What went wrong.
    pub message: String,
    /// Its code (`"io"` unless the thrown error says otherwise).
    pub code: Code,
}

impl StorageError {
    /// An I/O error.
    pub fn io(message: impl Into<String>) -> StorageError {
        StorageError::with(Code::Io, message)
    }

    /// An error with `code`.
    pub fn with(code: Code, message: impl Into<String>) -> StorageError {
        StorageError {
            message: message.into(),
            code,
        }
    }
}

impl core::fmt::Display for StorageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<JsValue> for StorageError {
    /// A thrown JS value: its message, and its code when it carries one
    /// of ours (`err.code`) or is a DOMException we know (`AbortError`:
    /// aborted, `NotFoundError`: not found, `NoModificationAllowedError`:
    /// busy); otherwise `"io"`.
    fn from(v: JsValue) -> Self {
        let prop = |k: &str| Reflect::get(&v, &JsValue::from_str(k)).ok()?.as_string();
        let message = if v.is_object() {
            prop("message")
        } else {
            v.as_string()
        }
        .unwrap_or_else(|| format!("{v:?}"));
        let code = v
            .is_object()
            .then(|| {
                prop("code").and_then(|c| Code::parse(&c)).or_else(|| {
                    match prop("name").as_deref() {
                        Some("AbortError") => Some(Code::Aborted),
                        Some("NotFoundError") => Some(Code::NotFound),
                        Some("NoModificationAllowedError") => Some(Code::Busy),
                        _ => None,
                    }
                })
            })
            .flatten()
            .unwrap_or(Code::Io);
        StorageError { message, code }
    }
}

/// The largest integer JavaScript numbers hold exactly (2^53 - 1).
pub const MAX_SAFE: u64 = (1 << 53) - 1;

/// Refuses file ranges JS storages cannot address exactly.
fn addressable(offset: u64, len: usize) -> Result<(), StorageError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= MAX_SAFE => Ok(()),
        _ => Err(StorageError::with(
            Code::OutOfBounds,
            format!(
                "file offset {offset} (+{len} bytes) is beyond Number.MAX_SAFE_INTEGER: JS storages address at most 2^53 - 1 bytes"
            ),
        )),
    }
}

/// One storage of any supported kind.
#[derive(Debug)]
pub enum Storage {
    /// Bytes in memory.
    Memory(Vec<u8>),
    /// A read-only `Blob` or `File`.
    Blob(web_sys::Blob),
    /// An OPFS synchronous access handle.
    Opfs(web_sys::FileSystemSyncAccessHandle),
    /// A JS object with `read`/`write`/`size`/`flush` methods.
    Object(JsValue),
}

fn method(obj: &JsValue, name: &str) -> Option<Function> {
    Reflect::get(obj, &JsValue::from_str(name))
        .ok()
        .and_then(|f| f.dyn_into::<Function>().ok())
}

impl Storage {
    /// Recognises what `value` is: a `Uint8Array`, an OPFS handle (has
    /// `getSize`), a storage object (has `read` and `size`), or a `Blob`.
    pub fn from_js(value: JsValue) -> Result<Storage, StorageError> {
        if let Some(a) = value.dyn_ref::<Uint8Array>() {
            return Ok(Storage::Memory(a.to_vec()));
        }
        if value.is_object() {
            if method(&value, "getSize").is_some() && method(&value, "truncate").is_some() {
                return Ok(Storage::Opfs(value.unchecked_into()));
            }
            if method(&value, "read").is_some() && method(&value, "size").is_some() {
                return Ok(Storage::Object(value));
            }
            if method(&value, "slice").is_some()
                && Reflect::has(&value, &"size".into()).unwrap_or(false)
            {
                return Ok(Storage::Blob(value.unchecked_into()));
            }
        }
        Err(StorageError::with(
            Code::InvalidArgument,
            "unsupported storage: expected a Uint8Array, Blob/File, OPFS sync access handle, or an object with read/size methods",
        ))
    }

    /// A second handle on the same storage, for reading what has been
    /// written so far: the same JS object, handle or blob (bytes in memory
    /// are copied).
    pub(crate) fn share(&self) -> Storage {
        match self {
            Storage::Memory(v) => Storage::Memory(v.clone()),
            Storage::Blob(b) => Storage::Blob(b.clone()),
            Storage::Opfs(h) => Storage::Opfs(h.clone()),
            Storage::Object(o) => Storage::Object(o.clone()),
        }
    }

    /// The bytes of a memory storage.
    pub fn into_bytes(self) -> Option<Vec<u8>> {
        match self {
            Storage::Memory(v) => Some(v),
            _ => None,
        }
    }
}

fn num(v: u64) -> JsValue {
    JsValue::from_f64(v as f64)
}

impl BlockRead for Storage {
    type Error = StorageError;

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        match self {
            Storage::Memory(v) => v
                .read_at(offset, buf)
                .map_err(|e| StorageError::io(e.to_string())),
            Storage::Blob(b) => {
                addressable(offset, buf.len())?;
                buf.fill(0);
                let size = b.size() as u64;
                if offset >= size || buf.is_empty() {
                    return Ok(());
                }
                let end = (offset + buf.len() as u64).min(size);
                let part = b.slice_with_f64_and_f64(offset as f64, end as f64)?;
                let reader = web_sys::FileReaderSync::new()?;
                let ab = reader.read_as_array_buffer(&part)?;
                let bytes = Uint8Array::new(&ab);
                let n = (bytes.length() as usize).min(buf.len());
                bytes.subarray(0, n as u32).copy_to(&mut buf[..n]);
                Ok(())
            }
            Storage::Opfs(h) => {
                addressable(offset, buf.len())?;
                buf.fill(0);
                let opts = web_sys::FileSystemReadWriteOptions::new();
                opts.set_at(offset as f64);
                h.read_with_u8_array_and_options(buf, &opts)?;
                Ok(())
            }
            Storage::Object(o) => {
                addressable(offset, buf.len())?;
                buf.fill(0);
                let f =
                    method(o, "read").ok_or_else(|| StorageError::io("storage has no read()"))?;
                let r = f.call2(o, &num(offset), &num(buf.len() as u64))?;
                let bytes = r
                    .dyn_into::<Uint8Array>()
                    .map_err(|_| StorageError::io("read() must return a Uint8Array"))?;
                let n = (bytes.length() as usize).min(buf.len());
                bytes.subarray(0, n as u32).copy_to(&mut buf[..n]);
                Ok(())
            }
        }
    }

    fn len(&mut self) -> Result<u64, StorageError> {
        match self {
            Storage::Memory(v) => Ok(Vec::len(v) as u64),
            Storage::Blob(b) => Ok(b.size() as u64),
            Storage::Opfs(h) => Ok(h.get_size()? as u64),
            Storage::Object(o) => {
                let f =
                    method(o, "size").ok_or_else(|| StorageError::io("storage has no size()"))?;
                f.call0(o)?
                    .as_f64()
                    .filter(|v| *v >= 0.0 && v.fract() == 0.0 && *v <= MAX_SAFE as f64)
                    .map(|v| v as u64)
                    .ok_or_else(|| {
                        StorageError::with(
                            Code::InvalidArgument,
                            "size() must return a whole number of bytes from 0 to Number.MAX_SAFE_INTEGER",
                        )
                    })
            }
        }
    }
}

impl BlockWrite for Storage {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), StorageError> {
        match self {
            Storage::Memory(v) => v
                .write_at(offset, buf)
                .map_err(|e| StorageError::io(e.to_string())),
            Storage::Blob(_) => Err(StorageError::with(
                Code::ReadOnly,
                "a Blob/File is read-only",
            )),
            Storage::Opfs(h) => {
                addressable(offset, buf.len())?;
                let opts = web_sys::FileSystemReadWriteOptions::new();
                opts.set_at(offset as f64);
                let n = h.write_with_u8_array_and_options(buf, &opts)?;
                if (n as usize) < buf.len() {
                    return Err(StorageError::io(format!("short write at {offset}")));
                }
                Ok(())
            }
            Storage::Object(o) => {
                addressable(offset, buf.len())?;
                let f = method(o, "write").ok_or_else(|| {
                    StorageError::with(Code::ReadOnly, "storage is read-only (no write())")
                })?;
                f.call2(o, &num(offset), &Uint8Array::from(buf))?;
                Ok(())
            }
        }
    }

    fn set_len(&mut self, len: u64) -> Result<(), StorageError> {
        match self {
            Storage::Memory(v) => {
                BlockWrite::set_len(v, len).map_err(|e| StorageError::io(e.to_string()))
            }
            Storage::Blob(_) => Err(StorageError::with(
                Code::ReadOnly,
                "a Blob/File is read-only",
            )),
            Storage::Opfs(h) => {
                addressable(len, 0)?;
                h.truncate_with_f64(len as f64)?;
                Ok(())
            }
            Storage::Object(o) => match method(o, "truncate") {
                Some(f) => {
                    addressable(len, 0)?;
                    f.call1(o, &num(len))?;
                    Ok(())
                }
                None => {
                    // Extend by writing the last byte.
                    if len > self.len()? {
                        self.write_at(len - 1, &[0])?;
                    }
                    Ok(())
                }
            },
        }
    }

    fn flush(&mut self) -> Result<(), StorageError> {
        match self {
            Storage::Memory(_) | Storage::Blob(_) => Ok(()),
            Storage::Opfs(h) => {
                h.flush()?;
                Ok(())
            }
            Storage::Object(o) => {
                if let Some(f) = method(o, "flush") {
                    f.call0(o)?;
                }
                Ok(())
            }
        }
    }
}
