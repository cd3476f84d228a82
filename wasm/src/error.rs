//! Errors as JavaScript `Error`s with a stable `code` (see `ErrorCode` in
//! the TypeScript types): the core's error variants mapped onto a small
//! set, exhaustively, with `"internal"` as the fallback.

use js_sys::Reflect;
use qcowkit_core::FormatError;
use wasm_bindgen::prelude::*;

use crate::StorageError;

/// The core's errors, with the storages' error type.
pub(crate) type CoreError = qcowkit_core::Error<StorageError>;

/// The stable error codes (`err.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// A bad argument: options, offsets, sizes, modes, storage objects.
    InvalidArgument,
    /// Not a qcow2 image, or a header field with a value the format forbids.
    Format,
    /// Valid, but not supported: version, features, writing the legacy AES
    /// method, a value above `Number.MAX_SAFE_INTEGER`, an operation on
    /// this image.
    Unsupported,
    /// Inconsistent metadata (a repair may help).
    Corrupt,
    /// A backing file the image names was not supplied.
    MissingBacking,
    /// The external data file the image names was not supplied.
    MissingDataFile,
    /// The image (or a backing file) is encrypted and its data was read
    /// without its passphrase.
    PassphraseRequired,
    /// The passphrase given unlocks no key slot of the image (or of a
    /// backing file: the message names it).
    InvalidPassphrase,
    /// The storage failed.
    Io,
    /// An access beyond the end of the disk (or of what JS can address).
    OutOfBounds,
    /// Opened read-only (or for repair only), or a read-only storage.
    ReadOnly,
    /// No such snapshot, image id or file.
    NotFound,
    /// A buffer the image needs does not fit in memory.
    OutOfMemory,
    /// In use: re-entered from a callback, or a file locked by another handle.
    Busy,
    /// Cancelled (an `AbortSignal`, or a callback that threw an `AbortError`).
    Aborted,
    /// A bug, or an error without a better code.
    Internal,
}

impl Code {
    /// The code's string, as `err.code` holds it.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidArgument => "invalid-argument",
            Code::Format => "format",
            Code::Unsupported => "unsupported",
            Code::Corrupt => "corrupt",
            Code::MissingBacking => "missing-backing",
            Code::MissingDataFile => "missing-data-file",
            Code::PassphraseRequired => "passphrase-required",
            Code::InvalidPassphrase => "invalid-passphrase",
            Code::Io => "io",
            Code::OutOfBounds => "out-of-bounds",
            Code::ReadOnly => "read-only",
            Code::NotFound => "not-found",
            Code::OutOfMemory => "out-of-memory",
            Code::Busy => "busy",
            Code::Aborted => "aborted",
            Code::Internal => "internal",
        }
    }

    /// Every code, for parsing.
    const ALL: [Code; 16] = [
        Code::InvalidArgument,
        Code::Format,
        Code::Unsupported,
        Code::Corrupt,
        Code::MissingBacking,
        Code::MissingDataFile,
        Code::PassphraseRequired,
        Code::InvalidPassphrase,
        Code::Io,
        Code::OutOfBounds,
        Code::ReadOnly,
        Code::NotFound,
        Code::OutOfMemory,
        Code::Busy,
        Code::Aborted,
        Code::Internal,
    ];

    /// The code named `s`, if it is one of ours.
    pub fn parse(s: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The code of a core error: every variant mapped, `Internal` for
    /// variants added later.
    pub fn of(e: &CoreError) -> Code {
        use qcowkit_core::Error as E;
        match e {
            E::Io(s) => s.code,
            E::Format(FormatError::InvalidOption { .. }) => Code::InvalidArgument,
            E::Format(
                FormatError::UnsupportedVersion(_)
                | FormatError::UnknownIncompatibleFeatures { .. },
            ) => Code::Unsupported,
            E::Format(_) => Code::Format,
            // "unknown": a method this implementation cannot read at all.
            E::Encrypted { method } if *method == "unknown" => Code::Unsupported,
            E::Encrypted { .. } => Code::PassphraseRequired,
            E::InvalidPassphrase => Code::InvalidPassphrase,
            E::Corrupt { .. }
            | E::Decompress { .. }
            | E::MetadataOverlap { .. }
            | E::NeedsRebuild
            | E::BackingLoop { .. }
            | E::NamesItself { .. } => Code::Corrupt,
            E::OutOfBounds { .. } => Code::OutOfBounds,
            E::BackingNotAllowed { .. } => Code::MissingBacking,
            E::BackingTooDeep { .. } | E::UnsupportedBackingFormat(_) | E::Unsupported(_) => {
                Code::Unsupported
            }
            E::Open { source, .. } => source.code,
            E::Backing { source, .. } => Code::of(source),
            E::MissingDataFile => Code::MissingDataFile,
            E::ReadOnly(_) => Code::ReadOnly,
            E::Internal(_) => Code::Internal,
            E::OutOfMemory { .. } => Code::OutOfMemory,
            _ => Code::Internal,
        }
    }
}

/// An error thrown to JavaScript: an `Error` with `code` (and the name
/// `AbortError` for `"aborted"`).
#[derive(Debug, Clone)]
pub struct QcowError {
    /// The stable code.
    pub code: Code,
    /// The message (the core's or qemu-img's words).
    pub message: String,
}

impl QcowError {
    /// An error with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> QcowError {
        QcowError {
            code,
            message: message.into(),
        }
    }

    /// A bad argument.
    pub fn arg(message: impl Into<String>) -> QcowError {
        QcowError::new(Code::InvalidArgument, message)
    }
}

impl From<CoreError> for QcowError {
    fn from(e: CoreError) -> QcowError {
        QcowError::new(Code::of(&e), e.to_string())
    }
}

impl From<StorageError> for QcowError {
    fn from(e: StorageError) -> QcowError {
        QcowError::new(e.code, e.message)
    }
}

impl From<JsValue> for QcowError {
    fn from(v: JsValue) -> QcowError {
        StorageError::from(v).into()
    }
}

impl From<QcowError> for JsValue {
    fn from(e: QcowError) -> JsValue {
        let err = js_sys::Error::new(&e.message);
        if e.code == Code::Aborted {
            err.set_name("AbortError");
        }
        let _ = Reflect::set(&err, &"code".into(), &e.code.as_str().into());
        err.into()
    }
}

/// The result of an exported function.
pub type Res<T> = Result<T, QcowError>;

#[wasm_bindgen(typescript_custom_section)]
const ERROR_TYPES: &'static str = r#"
/**
 * The stable `code` of every error the package throws (and the worker client rejects with):
 * - `"invalid-argument"`: a bad argument (options, offsets, sizes, modes, storage objects; numbers
 *   above `Number.MAX_SAFE_INTEGER`);
 * - `"format"`: not a qcow2 image, or a header field with a value the format forbids;
 * - `"unsupported"`: valid but not supported (version, incompatible features, writing into an
 *   image of the legacy AES method, a 64-bit value above `Number.MAX_SAFE_INTEGER` that cannot be returned exactly, an operation
 *   this image cannot do);
 * - `"corrupt"`: inconsistent metadata (a repair may help);
 * - `"missing-backing"` / `"missing-data-file"`: a file the image names was not supplied;
 * - `"passphrase-required"`: the guest data of an encrypted image (or of an encrypted backing
 *   file, named in the message) was read, or the image opened for writing, without its
 *   passphrase (an encrypted image opens for its metadata without one);
 * - `"invalid-passphrase"`: the passphrase unlocks no key slot of the image (or of the backing
 *   file the message names): "Invalid password, cannot unlock any keyslot";
 * - `"io"`: the storage failed;
 * - `"out-of-bounds"`: an access beyond the end of the disk;
 * - `"read-only"`: opened read-only or for repair only, or a read-only storage;
 * - `"not-found"`: no such snapshot, image id or OPFS file;
 * - `"out-of-memory"`: a buffer the image needs does not fit in memory;
 * - `"busy"`: in use (re-entered from a callback, or an OPFS file locked by another handle);
 * - `"aborted"`: cancelled (`name` is `"AbortError"`);
 * - `"internal"`: a bug, or an error without a better code (the fallback).
 */
export type ErrorCode =
  | "invalid-argument" | "format" | "unsupported" | "corrupt" | "missing-backing"
  | "missing-data-file" | "passphrase-required" | "invalid-passphrase" | "io" | "out-of-bounds"
  | "read-only" | "not-found" | "out-of-memory" | "busy" | "aborted" | "internal";
/** What the package throws: an `Error` with a stable `code`. */
export interface QcowError extends Error {
  code: ErrorCode;
}
"#;
