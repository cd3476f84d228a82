//! The crate's error type, [`Error`], and the decoders' own
//! [`FormatError`], which carries no storage error type so that pure
//! decoding can be used (and tested) without any I/O.

use alloc::boxed::Box;
use alloc::string::String;
use core::fmt;

/// Everything that can go wrong while opening or reading an image.
///
/// `E` is the error type of the storage ([`crate::BlockRead::Error`]).
/// Messages are lowercase and carry the offending values.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error<E> {
    /// The storage failed.
    Io(E),
    /// A header field or option has a value the format (or QEMU's limits)
    /// forbid: what the decoders report, without the storage's error type.
    Format(FormatError),
    /// The image is encrypted and no passphrase was given to open it (or
    /// its method is one this implementation cannot read).
    Encrypted {
        /// `"aes"` or `"luks"` (or `"unknown"` for other values).
        method: &'static str,
    },
    /// Metadata found while reading is inconsistent.
    Corrupt {
        /// What is wrong, naming the structure.
        what: &'static str,
        /// Where it was found (host offset of the table, or guest offset).
        offset: u64,
        /// The offending value.
        value: u64,
    },
    /// A compressed cluster could not be decompressed.
    Decompress {
        /// Host offset of the compressed data.
        host_offset: u64,
        /// Why decompression failed.
        reason: &'static str,
    },
    /// A guest access outside the virtual disk.
    OutOfBounds {
        /// Start of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Virtual size of the disk.
        size: u64,
    },
    /// The image names a backing file but no opener was given, or following is disabled.
    BackingNotAllowed {
        /// The backing file name stored in the image.
        name: String,
    },
    /// A backing chain refers back to a file already in the chain.
    BackingLoop {
        /// The file seen twice.
        name: String,
    },
    /// A backing chain is deeper than the configured limit.
    BackingTooDeep {
        /// The limit.
        limit: u32,
    },
    /// Opening a backing or data file failed.
    Open {
        /// The name passed to the opener.
        name: String,
        /// The opener's error.
        source: E,
    },
    /// An error inside a backing file, with its name.
    Backing {
        /// The backing file's name.
        name: String,
        /// What went wrong in it.
        source: Box<Error<E>>,
    },
    /// No key slot of an encrypted image opens with the passphrase given.
    InvalidPassphrase,
    /// The image needs an external data file that was not supplied.
    MissingDataFile,
    /// The backing file format is not one this crate reads.
    UnsupportedBackingFormat(String),
    /// A requested operation is not supported on this image.
    Unsupported(&'static str),
    /// The image is read-only (opened read-only, or marked corrupt).
    ReadOnly(&'static str),
    /// An invariant of this implementation failed (a bug, not a property of
    /// the image).
    Internal(&'static str),
    /// A write was refused because it would land on metadata it was not
    /// meant for (a corrupted pointer); the image is marked corrupt, as
    /// QEMU does.
    MetadataOverlap {
        /// The structure the write would have overwritten (QEMU's name).
        structure: &'static str,
        /// Host offset of the refused write.
        offset: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// A repair limited to leaks (`check -r leaks`) found a refcount
    /// structure that must be rebuilt (`check -r all` does that).
    NeedsRebuild,
    /// The image names itself as its external data file.
    NamesItself {
        /// The name stored in the image.
        name: String,
    },
    /// A persistent bitmap asked for by name cannot be read.
    Bitmap {
        /// The bitmap's name.
        name: String,
        /// Why (`not found`, `is inconsistent`, ...).
        problem: &'static str,
    },
    /// The heap could not hold a buffer the image needs (on a small heap,
    /// e.g. firmware, a table larger than the memory available).
    OutOfMemory {
        /// What the buffer was for.
        what: &'static str,
        /// Its size in bytes.
        bytes: u64,
    },
}

impl<E> Error<E> {
    /// Shorthand for an invalid field ([`FormatError::InvalidField`]).
    pub(crate) fn field(field: &'static str, value: u64, reason: &'static str) -> Self {
        Error::Format(FormatError::field(field, value, reason))
    }

    /// Shorthand for [`Error::Corrupt`].
    pub(crate) fn corrupt(what: &'static str, offset: u64, value: u64) -> Self {
        Error::Corrupt {
            what,
            offset,
            value,
        }
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "i/o error: {e}"),
            Error::Format(e) => e.fmt(f),
            Error::Encrypted { method } => write!(
                f,
                "image is encrypted with {method}: a passphrase is required to open it"
            ),
            Error::InvalidPassphrase => {
                f.write_str("Invalid password, cannot unlock any keyslot")
            }
            Error::Corrupt {
                what,
                offset,
                value,
            } => write!(f, "corrupt image: {what} (value {value:#x} at {offset:#x})"),
            Error::Decompress {
                host_offset,
                reason,
            } => write!(
                f,
                "cannot decompress cluster at host offset {host_offset:#x}: {reason}"
            ),
            Error::OutOfBounds { offset, len, size } => write!(
                f,
                "access of {len} bytes at offset {offset} is beyond the virtual size {size}"
            ),
            Error::BackingNotAllowed { name } => {
                write!(
                    f,
                    "image has backing file '{name}' but backing files are not followed"
                )
            }
            Error::BackingLoop { name } => {
                write!(f, "backing chain loops: '{name}' appears twice")
            }
            Error::BackingTooDeep { limit } => {
                write!(f, "backing chain is deeper than the limit of {limit}")
            }
            Error::Open { name, source } => write!(f, "cannot open '{name}': {source}"),
            Error::Backing { name, source } => write!(f, "backing file '{name}': {source}"),
            Error::MissingDataFile => write!(f, "image needs an external data file"),
            Error::UnsupportedBackingFormat(fmt_name) => {
                write!(f, "unsupported backing file format '{fmt_name}'")
            }
            Error::Unsupported(what) => write!(f, "unsupported: {what}"),
            Error::ReadOnly(why) => write!(f, "image is read-only: {why}"),
            Error::Internal(what) => write!(f, "internal error: {what}"),
            Error::MetadataOverlap {
                structure,
                offset,
                len,
            } => write!(
                f,
                "preventing invalid write on metadata (overlaps with {structure}): {len} bytes at host offset {offset:#x}; the image is marked corrupt"
            ),
            Error::NeedsRebuild => write!(
                f,
                "the refcount structure must be rebuilt; repair with -r all"
            ),
            Error::NamesItself { name } => {
                write!(f, "the image names itself ('{name}') as its data file")
            }
            Error::Bitmap { name, problem } => write!(f, "Bitmap '{name}' {problem}"),
            Error::OutOfMemory { what, bytes } => {
                write!(f, "cannot allocate {bytes} bytes for {what}")
            }
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for Error<E> {}

/// What the pure decoders and option checks report: a field or option with
/// a value the format (or QEMU's limits) forbid. [`Error::Format`] wraps it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// The first four bytes are not `QFI\xfb`.
    BadMagic(u32),
    /// The header's version is neither 2 nor 3.
    UnsupportedVersion(u32),
    /// A header or metadata field has a value the format (or QEMU's limits) forbid.
    InvalidField {
        /// Name of the field, as the qcow2 specification spells it.
        field: &'static str,
        /// The offending value.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The image sets incompatible feature bits this implementation does not know.
    UnknownIncompatibleFeatures {
        /// The unknown bits.
        bits: u64,
        /// Their names from the image's feature name table, comma separated (may be empty).
        names: String,
    },
    /// An image creation option (or combination) is refused.
    InvalidOption {
        /// The option's qemu-img name.
        option: &'static str,
        /// Why it is refused.
        reason: &'static str,
    },
}

impl FormatError {
    /// Shorthand for [`FormatError::InvalidField`].
    pub(crate) fn field(field: &'static str, value: u64, reason: &'static str) -> Self {
        FormatError::InvalidField {
            field,
            value,
            reason,
        }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::BadMagic(m) => write!(
                f,
                "not a qcow2 image (magic {m:#010x}, expected 0x514649fb)"
            ),
            FormatError::UnsupportedVersion(v) => {
                write!(f, "unsupported qcow2 version {v} (supported: 2 and 3)")
            }
            FormatError::InvalidField {
                field,
                value,
                reason,
            } => write!(f, "invalid {field} {value} ({value:#x}): {reason}"),
            FormatError::UnknownIncompatibleFeatures { bits, names } => {
                write!(f, "unsupported incompatible features {bits:#x}")?;
                if !names.is_empty() {
                    write!(f, " ({names})")?;
                }
                Ok(())
            }
            FormatError::InvalidOption { option, reason } => {
                write!(f, "invalid option {option}: {reason}")
            }
        }
    }
}

impl core::error::Error for FormatError {}

impl<E> From<FormatError> for Error<E> {
    fn from(e: FormatError) -> Self {
        Error::Format(e)
    }
}
