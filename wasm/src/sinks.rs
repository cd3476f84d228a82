//! The copy sinks of the converters: a JS function, or a storage written
//! as a raw image.

use js_sys::{Function, Uint8Array};
use qcowkit_core::copy::Sink;
use wasm_bindgen::prelude::*;

use crate::error::CoreError;
use crate::{Storage, StorageError};

/// A JS function `sink(offset, bytes | null, length)` as a copy's sink;
/// zero runs are passed in pieces of at most `chunk` bytes.
pub(crate) struct FnSink<'a> {
    pub(crate) sink: &'a Function,
    pub(crate) chunk: usize,
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
pub(crate) struct StorageSink<'a>(pub(crate) &'a mut Storage);

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

/// A sink that reports progress: `on_progress(done, total)` after each
/// piece, with the bytes of `[start, end)` done so far. An exception the
/// callback throws stops the copy with its error (and code).
pub(crate) struct Progress<'a, S> {
    inner: S,
    on_progress: Option<&'a Function>,
    start: u64,
    total: u64,
}

impl<'a, S> Progress<'a, S> {
    pub(crate) fn new(inner: S, on_progress: Option<&'a Function>, start: u64, end: u64) -> Self {
        Progress {
            inner,
            on_progress,
            start,
            total: end - start,
        }
    }

    /// Reports that the copy reached guest offset `pos`.
    pub(crate) fn report(&self, pos: u64) -> Result<(), CoreError> {
        if let Some(cb) = self.on_progress {
            cb.call2(
                &JsValue::NULL,
                &((pos - self.start) as f64).into(),
                &(self.total as f64).into(),
            )
            .map_err(|e| CoreError::Io(StorageError::from(e)))?;
        }
        Ok(())
    }
}

impl<S: Sink<Error = CoreError>> Sink for Progress<'_, S> {
    type Error = CoreError;

    fn data(&mut self, offset: u64, buf: &mut Vec<u8>, len: usize) -> Result<(), CoreError> {
        self.inner.data(offset, buf, len)?;
        self.report(offset + len as u64)
    }

    fn zeroes(&mut self, offset: u64, len: u64) -> Result<(), CoreError> {
        self.inner.zeroes(offset, len)?;
        self.report(offset + len)
    }
}
