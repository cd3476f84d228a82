//! Backing files and external data files: the [`Opener`] policy through
//! which the core asks its host to open files an image names.
//!
//! Opening a file because an image names it is a security decision, so the
//! core never does it by itself: the caller passes an opener that resolves
//! names (QEMU resolves them relative to the directory of the naming image),
//! may refuse them, and returns an identity used to detect loops.

use alloc::string::String;

use crate::BlockRead;

/// Why a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    /// A backing file of a qcow2 image.
    Backing,
    /// An external data file of a qcow2 image.
    DataFile,
}

/// A file opened by an [`Opener`].
#[derive(Debug)]
pub struct Opened<R> {
    /// The storage.
    pub io: R,
    /// The resolved name (e.g. the path joined with the naming image's
    /// directory); shown as `full-backing-filename` and passed as `parent`
    /// when this file names further files.
    pub resolved: String,
    /// A stable identity of the underlying file (e.g. a canonical path or
    /// device and inode) used to detect loops in backing chains.
    pub identity: String,
}

/// Opens the files images name: backing files and external data files.
pub trait Opener<R: BlockRead> {
    /// Opens `name`, named by the image whose resolved name is `parent`.
    fn open(&mut self, parent: &str, name: &str, role: FileRole) -> Result<Opened<R>, R::Error>;
}

/// The layer below an image: another qcow2 image or a raw file.
#[derive(Debug)]
pub enum Backing<R: BlockRead> {
    /// A qcow2 backing image (with its own chain).
    Qcow2(alloc::boxed::Box<crate::Image<R>>),
    /// A raw backing file.
    Raw {
        /// The storage.
        io: R,
        /// Its length in bytes (its virtual size).
        size: u64,
        /// Its resolved name.
        name: String,
    },
}

impl<R: BlockRead> Backing<R> {
    /// Virtual size of the backing layer.
    pub fn size(&self) -> u64 {
        match self {
            Backing::Qcow2(img) => img.size(),
            Backing::Raw { size, .. } => *size,
        }
    }

    /// Resolved name of the backing layer.
    pub fn name(&self) -> &str {
        match self {
            Backing::Qcow2(img) => img.name(),
            Backing::Raw { name, .. } => name,
        }
    }

    /// Format name (`qcow2` or `raw`).
    pub fn format(&self) -> &'static str {
        match self {
            Backing::Qcow2(_) => "qcow2",
            Backing::Raw { .. } => "raw",
        }
    }
}
