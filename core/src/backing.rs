//! Backing files and external data files: the [`Opener`] policy through
//! which the core asks its host to open files an image names.
//!
//! Opening a file because an image names it is a security decision, so the
//! core never does it by itself: the caller passes an opener that resolves
//! names (QEMU resolves them relative to the directory of the naming image),
//! may refuse them, and returns an identity used to detect loops.

use alloc::string::String;

use crate::io::BlockRead;

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

/// Resolves a file name `name` stored in the image whose resolved name is
/// `parent`, as QEMU does for backing files: an absolute name (or an empty
/// one) is kept, a relative one is joined to the parent's directory. Pure
/// string work, shared by every host's opener.
pub fn resolve_name(parent: &str, name: &str) -> String {
    if name.starts_with('/') || name.is_empty() {
        return String::from(name);
    }
    match parent.rfind('/') {
        Some(i) => {
            let mut out = String::from(&parent[..=i]);
            out.push_str(name);
            out
        }
        None => String::from(name),
    }
}

#[cfg(test)]
mod tests {
    use super::resolve_name;

    #[test]
    fn resolves_like_qemu() {
        assert_eq!(
            resolve_name("/a/b/top.qcow2", "base.qcow2"),
            "/a/b/base.qcow2"
        );
        assert_eq!(resolve_name("top.qcow2", "base.qcow2"), "base.qcow2");
        assert_eq!(resolve_name("d/top.qcow2", "../base"), "d/../base");
        assert_eq!(resolve_name("/a/top", "/abs/base"), "/abs/base");
        assert_eq!(resolve_name("/a/top", ""), "");
    }
}
