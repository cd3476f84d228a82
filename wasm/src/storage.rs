//! Storages the browser and Node offer, as one `BlockRead`/`BlockWrite` type:
//! bytes in memory (`Uint8Array`), a `File`/`Blob` (read-only, synchronous
//! reads with `FileReaderSync`, so in a worker), an OPFS
//! `FileSystemSyncAccessHandle` (read-write, dedicated worker), and a JS
//! object with synchronous `read(offset, length)`, `write(offset, bytes)`,
//! `size()` and `flush()` methods (e.g. over Node's `fs.readSync`).

use js_sys::{Function, Reflect, Uint8Array};
use qcowkit_core::{BlockRead, BlockWrite};
use wasm_bindgen::{JsCast, JsValue};

/// An error from a JS storage, with its message.
#[derive(Debug, Clone)]
pub struct StorageError(pub String);

impl core::fmt::Display for StorageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<JsValue> for StorageError {
    fn from(v: JsValue) -> Self {
        let msg = v
            .dyn_ref::<js_sys::Error>()
            .map(|e| String::from(e.message()))
            .or_else(|| v.as_string())
            .unwrap_or_else(|| format!("{v:?}"));
        StorageError(msg)
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
        Err(StorageError(
            "unsupported storage: expected a Uint8Array, Blob/File, OPFS sync access handle, or an object with read/size methods".into(),
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
                .map_err(|e| StorageError(e.to_string())),
            Storage::Blob(b) => {
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
                buf.fill(0);
                let opts = web_sys::FileSystemReadWriteOptions::new();
                opts.set_at(offset as f64);
                h.read_with_u8_array_and_options(buf, &opts)?;
                Ok(())
            }
            Storage::Object(o) => {
                buf.fill(0);
                let f = method(o, "read").ok_or(StorageError("storage has no read()".into()))?;
                let r = f.call2(o, &num(offset), &num(buf.len() as u64))?;
                let bytes = r
                    .dyn_into::<Uint8Array>()
                    .map_err(|_| StorageError("read() must return a Uint8Array".into()))?;
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
                let f = method(o, "size").ok_or(StorageError("storage has no size()".into()))?;
                f.call0(o)?
                    .as_f64()
                    .map(|v| v as u64)
                    .ok_or(StorageError("size() must return a number".into()))
            }
        }
    }
}

impl BlockWrite for Storage {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), StorageError> {
        match self {
            Storage::Memory(v) => v
                .write_at(offset, buf)
                .map_err(|e| StorageError(e.to_string())),
            Storage::Blob(_) => Err(StorageError("a Blob/File is read-only".into())),
            Storage::Opfs(h) => {
                let opts = web_sys::FileSystemReadWriteOptions::new();
                opts.set_at(offset as f64);
                let n = h.write_with_u8_array_and_options(buf, &opts)?;
                if (n as usize) < buf.len() {
                    return Err(StorageError(format!("short write at {offset}")));
                }
                Ok(())
            }
            Storage::Object(o) => {
                let f = method(o, "write")
                    .ok_or(StorageError("storage is read-only (no write())".into()))?;
                f.call2(o, &num(offset), &Uint8Array::from(buf))?;
                Ok(())
            }
        }
    }

    fn set_len(&mut self, len: u64) -> Result<(), StorageError> {
        match self {
            Storage::Memory(v) => {
                BlockWrite::set_len(v, len).map_err(|e| StorageError(e.to_string()))
            }
            Storage::Blob(_) => Err(StorageError("a Blob/File is read-only".into())),
            Storage::Opfs(h) => {
                h.truncate_with_f64(len as f64)?;
                Ok(())
            }
            Storage::Object(o) => match method(o, "truncate") {
                Some(f) => {
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
